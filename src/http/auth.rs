//! Who is calling: the bearer-token extractors.

use axum::extract::FromRequestParts;
use axum::http::{header, request::Parts};
use uuid::Uuid;

use super::error::ApiError;
use super::AppState;
use crate::auth::constant_time_eq;

/// The user a valid bearer token speaks for.
pub struct User(pub Uuid);

/// A caller that presented the admin token.
pub struct Admin;

fn bearer(parts: &Parts) -> Result<Option<&str>, ApiError> {
    let Some(value) = parts.headers.get(header::AUTHORIZATION) else {
        return Ok(None);
    };
    let value = value
        .to_str()
        .map_err(|_| ApiError::Unauthorized("malformed Authorization header".into()))?;
    let mut it = value.splitn(2, ' ');
    match (it.next(), it.next()) {
        (Some(scheme), Some(token))
            if scheme.eq_ignore_ascii_case("bearer") && !token.trim().is_empty() =>
        {
            Ok(Some(token.trim()))
        }
        _ => Err(ApiError::Unauthorized(
            "expected 'Authorization: Bearer <token>'".into(),
        )),
    }
}

impl FromRequestParts<AppState> for User {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        let token = bearer(parts)?
            .ok_or_else(|| ApiError::Unauthorized("a bearer token is required".into()))?;
        Ok(User(state.tokens.verify(token)?))
    }
}

impl FromRequestParts<AppState> for Admin {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        let token = bearer(parts)?
            .ok_or_else(|| ApiError::Unauthorized("the admin token is required".into()))?;
        match &state.admin_token {
            Some(admin) if constant_time_eq(token.as_bytes(), admin.as_bytes()) => Ok(Admin),
            Some(_) => Err(ApiError::Forbidden("not the admin token".into())),
            None => Err(ApiError::Forbidden(
                "admin endpoints are disabled: ADMIN_TOKEN is not set".into(),
            )),
        }
    }
}

pub fn router() -> axum::Router<AppState> {
    axum::Router::new().route("/api/auth/guest", axum::routing::post(issue_guest_token))
}

#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct GuestTokenResponse {
    /// Bearer token for the booking endpoints; valid on every replica.
    pub token: String,
    pub user_id: Uuid,
    #[schema(value_type = String, format = DateTime)]
    #[serde(serialize_with = "super::ops::rfc3339")]
    pub expires_at: chrono::DateTime<chrono::Utc>,
}

#[utoipa::path(post, path = "/api/auth/guest", tag = "auth",
    responses(
        (status = 201, body = GuestTokenResponse),
        (status = 403, body = super::error::Problem, content_type = "application/problem+json",
         description = "guest tokens are disabled (AUTH_GUEST=false)"),
    ))]
pub async fn issue_guest_token(
    axum::extract::State(state): axum::extract::State<AppState>,
) -> Result<impl axum::response::IntoResponse, ApiError> {
    if !state.limits.auth_guest {
        return Err(ApiError::Forbidden(
            "guest tokens are disabled on this service".into(),
        ));
    }
    let issued = state.tokens.issue_guest()?;
    Ok((
        axum::http::StatusCode::CREATED,
        axum::Json(GuestTokenResponse {
            token: issued.token,
            user_id: issued.user_id,
            expires_at: issued.expires_at,
        }),
    ))
}
