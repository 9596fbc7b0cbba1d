//! What every request leaves behind: a request id (taken from a sane
//! incoming `X-Request-Id`, else a fresh UUID) that is returned in the
//! response header and carried by every log line of the request (its
//! span), and the request counter and latency histogram by route and status.

use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::http::{header, HeaderName, HeaderValue};
use axum::middleware::Next;
use axum::response::Response;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use uuid::Uuid;

pub static REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// Longest incoming request id that is passed on; anything longer, or not
/// plain printable ASCII, is replaced (it ends up in logs and headers).
const MAX_REQUEST_ID: usize = 128;

pub async fn observe(
    State(shutting_down): State<CancellationToken>,
    mut req: Request,
    next: Next,
) -> Response {
    let started = Instant::now();
    let id = req
        .headers()
        .get(&REQUEST_ID)
        .filter(|v| {
            let b = v.as_bytes();
            !b.is_empty() && b.len() <= MAX_REQUEST_ID && b.iter().all(|c| c.is_ascii_graphic())
        })
        .cloned()
        .unwrap_or_else(|| {
            // A hyphenated UUID is always a valid header value.
            HeaderValue::from_str(&Uuid::new_v4().to_string())
                .unwrap_or(HeaderValue::from_static("unknown"))
        });
    req.headers_mut().insert(REQUEST_ID.clone(), id.clone());
    let method = req.method().clone();
    // The route pattern, not the path: one series per route, whatever ids
    // clients send.
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or("unmatched", |p| p.as_str())
        .to_owned();
    let span = tracing::info_span!(
        "request",
        request_id = %id.to_str().unwrap_or_default(),
        method = %method,
        route = %route,
    );
    let mut response = next.run(req).instrument(span.clone()).await;
    let status = response.status();
    let elapsed = started.elapsed();
    let labels = [
        ("method", method.as_str().to_owned()),
        ("route", route),
        ("status", status.as_u16().to_string()),
    ];
    metrics::counter!("seatsync_http_requests_total", &labels).increment(1);
    metrics::histogram!("seatsync_http_request_duration_seconds", &labels)
        .record(elapsed.as_secs_f64());
    // Debug only: at info, a ticket drop would log every doomed start. A
    // failure logs itself where it happens, inside this span.
    span.in_scope(|| {
        tracing::debug!(
            status = status.as_u16(),
            elapsed_ms = elapsed.as_millis() as u64,
            "request answered"
        )
    });
    response.headers_mut().insert(REQUEST_ID.clone(), id);
    if shutting_down.is_cancelled() {
        // Draining: every answer ends its connection (see startup).
        response
            .headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    response
}
