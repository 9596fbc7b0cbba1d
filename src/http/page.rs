//! The seat-map page, served by the same binary: plain ES modules and one
//! stylesheet embedded at compile time (no build step, no CDN), so a replica
//! serves its own page offline and a strict `'self'`-only CSP holds.

use axum::extract::Path;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;

use super::error::ApiError;
use super::AppState;

/// Only same-origin scripts, styles, fetches and streams; no inline code, no
/// framing. The page needs nothing else, so anything else is an injection.
const CONTENT_SECURITY_POLICY: &str =
    "default-src 'self'; connect-src 'self'; img-src 'self' data:; \
     style-src 'self'; script-src 'self'; object-src 'none'; base-uri 'none'; \
     frame-ancestors 'none'; form-action 'self'";

/// Assets keep stable URLs (no hashing step), so browsers must revalidate:
/// with the ETag that costs a 304 and no body.
const CACHE_CONTROL: &str = "no-cache";

struct Asset {
    name: &'static str,
    content_type: &'static str,
    body: &'static [u8],
    etag: &'static str,
}

macro_rules! asset {
    ($name:literal, $ct:expr) => {
        Asset {
            name: $name,
            content_type: $ct,
            body: include_bytes!(concat!("page/", $name)),
            etag: {
                const HASH: u64 = fnv1a(include_bytes!(concat!("page/", $name)));
                const HEX: [u8; 18] = etag_hex(HASH);
                match std::str::from_utf8(&HEX) {
                    Ok(s) => s,
                    Err(_) => panic!("etag is ASCII"),
                }
            },
        }
    };
}

const JS: &str = "text/javascript; charset=utf-8";
const HTML: &str = "text/html; charset=utf-8";
const CSS: &str = "text/css; charset=utf-8";

const INDEX: Asset = asset!("index.html", HTML);
const SCHEDULE: Asset = asset!("schedule.html", HTML);

/// Everything under `/assets/`; any other name is a 404 problem.
const ASSETS: &[Asset] = &[
    asset!("app.css", CSS),
    asset!("favicon.svg", "image/svg+xml"),
    asset!("store.js", JS),
    asset!("net.js", JS),
    asset!("view.js", JS),
    asset!("checkout.js", JS),
    asset!("list.js", JS),
    asset!("schedule.js", JS),
    asset!("text.js", JS),
];

/// FNV-1a: computed at compile time, so ETags cost nothing per request and
/// change exactly when an asset's bytes change.
const fn fnv1a(bytes: &[u8]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    let mut i = 0;
    while i < bytes.len() {
        hash ^= bytes[i] as u64;
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
        i += 1;
    }
    hash
}

/// `"<16 hex digits>"`, quotes included, as an ETag must be.
const fn etag_hex(hash: u64) -> [u8; 18] {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = [b'"'; 18];
    let mut i = 0;
    while i < 16 {
        out[1 + i] = DIGITS[((hash >> (60 - 4 * i)) & 0xf) as usize];
        i += 1;
    }
    out
}

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/", get(index_page))
        // The id is checked by the page against the API, which owns the
        // "no such schedule" answer; the shell is the same for every id.
        .route("/schedules/{id}", get(schedule_page))
        .route("/assets/{file}", get(asset))
}

async fn index_page(headers: HeaderMap) -> Response {
    serve(&INDEX, &headers)
}

async fn schedule_page(headers: HeaderMap) -> Response {
    serve(&SCHEDULE, &headers)
}

async fn asset(Path(file): Path<String>, headers: HeaderMap) -> Response {
    match ASSETS.iter().find(|a| a.name == file) {
        Some(a) => serve(a, &headers),
        None => ApiError::RouteNotFound.into_response(),
    }
}

fn serve(asset: &'static Asset, request: &HeaderMap) -> Response {
    let fresh = request
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.split(',')
                .any(|t| t.trim() == asset.etag || t.trim() == "*")
        });
    let mut response = if fresh {
        StatusCode::NOT_MODIFIED.into_response()
    } else {
        (
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static(asset.content_type),
            )],
            asset.body,
        )
            .into_response()
    };
    let h = response.headers_mut();
    h.insert(header::ETAG, HeaderValue::from_static(asset.etag));
    h.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static(CACHE_CONTROL),
    );
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CONTENT_SECURITY_POLICY),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn etags_differ_per_asset_and_are_quoted() {
        let mut seen = std::collections::HashSet::new();
        for a in ASSETS.iter().chain([&INDEX, &SCHEDULE]) {
            assert!(
                a.etag.starts_with('"') && a.etag.ends_with('"'),
                "{}",
                a.etag
            );
            assert_eq!(a.etag.len(), 18);
            assert!(seen.insert(a.etag), "duplicate etag for {}", a.name);
        }
    }

    #[test]
    fn fnv1a_matches_reference_vectors() {
        assert_eq!(fnv1a(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a(b"a"), 0xaf63_dc4c_8601_ec8c);
    }
}
