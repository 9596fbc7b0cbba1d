//! Extractors whose every rejection is an [`ApiError`]: axum's own
//! plain-text 400/415/422 answers never reach a client.

use axum::body::Body;
use axum::extract::{FromRequest, FromRequestParts, Path, Request};

use axum::http::{header, request::Parts};
use serde::de::DeserializeOwned;
use uuid::Uuid;

use super::error::ApiError;
use crate::json::Object;

/// Largest request body accepted anywhere.
pub const MAX_BODY_BYTES: usize = 64 * 1024;

/// A JSON body: `application/json` (or `+json`), at most 64 KiB, no unknown
/// fields, every error naming the offending field.
pub struct ApiJson<T>(pub T);

impl<S, T> FromRequest<S> for ApiJson<T>
where
    S: Send + Sync,
    T: DeserializeOwned,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, _state: &S) -> Result<Self, Self::Rejection> {
        let content_type = req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        let mime = content_type
            .split(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase();
        if !(mime == "application/json"
            || (mime.starts_with("application/") && mime.ends_with("+json")))
        {
            return Err(ApiError::invalid(
                "Content-Type",
                "must be application/json",
            ));
        }
        let body: Body = req.into_body();
        let bytes = axum::body::to_bytes(body, MAX_BODY_BYTES)
            .await
            .map_err(|_| ApiError::PayloadTooLarge {
                limit: MAX_BODY_BYTES,
            })?;
        parse_json(&bytes).map(ApiJson)
    }
}

/// Deserializes a JSON object, reporting the JSON path of the first problem.
pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let value = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        // serde_path_to_error writes "?" for a key it had not read yet.
        let path = e
            .path()
            .to_string()
            .trim_end_matches('?')
            .trim_end_matches('.')
            .to_owned();
        let inner = e.into_inner();
        // A missing, unknown or repeated member is named only in the
        // message; the path stops at the object that holds it.
        let field = match missing_or_unknown_field(&inner.to_string()) {
            Some(name) if path.is_empty() => Some(name),
            Some(name) if path != name && !path.ends_with(&format!(".{name}")) => {
                Some(format!("{path}.{name}"))
            }
            _ if path.is_empty() => None,
            _ => Some(path),
        };
        let detail = match &field {
            Some(f) => format!("{f}: {}", strip_position(&inner.to_string())),
            None => format!("body: {}", strip_position(&inner.to_string())),
        };
        ApiError::InvalidRequest {
            field: field.or_else(|| Some("body".into())),
            detail,
        }
    })?;
    de.end()
        .map_err(|e| ApiError::invalid("body", strip_position(&e.to_string())))?;
    let Object(value) = value;
    Ok(value)
}

/// serde names missing, unknown and repeated fields only in its message.
fn missing_or_unknown_field(message: &str) -> Option<String> {
    let rest = message
        .strip_prefix("missing field `")
        .or_else(|| message.strip_prefix("unknown field `"))
        .or_else(|| message.strip_prefix("duplicate field `"))?;
    rest.split('`').next().map(str::to_owned)
}

fn strip_position(message: &str) -> String {
    match message.rfind(" at line ") {
        Some(i) => message[..i].to_owned(),
        None => message.to_owned(),
    }
}

/// A schedule id from the path: a positive 64-bit integer.
pub struct ScheduleIdPath(pub i64);

impl<S: Send + Sync> FromRequestParts<S> for ScheduleIdPath {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let raw = raw_id(parts, state).await?;
        match raw.parse::<i64>() {
            Ok(id) if id > 0 => Ok(ScheduleIdPath(id)),
            _ => Err(ApiError::invalid(
                "id",
                format!("schedule id must be a positive 64-bit integer, got {raw:?}"),
            )),
        }
    }
}

/// A booking id from the path: a UUID in any case.
pub struct BookingIdPath(pub Uuid);

impl<S: Send + Sync> FromRequestParts<S> for BookingIdPath {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let raw = raw_id(parts, state).await?;
        Uuid::try_parse(&raw)
            .map(BookingIdPath)
            .map_err(|_| ApiError::invalid("id", format!("booking id must be a UUID, got {raw:?}")))
    }
}

async fn raw_id<S: Send + Sync>(parts: &mut Parts, state: &S) -> Result<String, ApiError> {
    Path::<String>::from_request_parts(parts, state)
        .await
        .map(|Path(s)| s)
        .map_err(|e| ApiError::invalid("id", e.body_text()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Body {
        a: i64,
        b: Vec<Inner>,
    }
    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Inner {
        row: i64,
    }

    fn field_of(json: &str) -> String {
        match parse_json::<Body>(json.as_bytes()) {
            Err(ApiError::InvalidRequest { field, .. }) => field.unwrap_or_default(),
            other => panic!("{json}: {other:?}"),
        }
    }

    #[test]
    fn names_the_offending_field() {
        assert_eq!(field_of(r#"{"a": "x", "b": []}"#), "a");
        assert_eq!(field_of(r#"{"a": 1, "b": [{"row": 1.5}]}"#), "b[0].row");
        assert_eq!(field_of(r#"{"a": 1, "b": [], "c": 1}"#), "c");
        assert_eq!(field_of(r#"{"b": []}"#), "a");
        assert_eq!(field_of(r#"{"a": 99999999999999999999, "b": []}"#), "a");
        assert_eq!(field_of(r#"{"a": 1, "b": []} x"#), "body");
        assert_eq!(field_of(r#"{"a": 1,"#), "body");
        assert_eq!(field_of(r#"{"a": 1, "b": [{}]}"#), "b[0].row");
        assert_eq!(field_of(r#"{"a": 1, "b": [{"row": 1, "x": 1}]}"#), "b[0].x");
        assert_eq!(field_of(r#"{"a": 1, "a": 1, "b": []}"#), "a");
        // Positional arrays are not objects.
        assert_eq!(field_of(r#"[1, []]"#), "body");
    }
}
