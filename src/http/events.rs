//! `GET /api/schedules/{id}/seats/stream`: the seat map's live feed.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::Response;
use axum::routing::get;
use axum::Router;

use super::error::{ApiError, Problem};
use super::extract::ScheduleIdPath;
use super::limits::ClientAddress;
use super::AppState;
use crate::realtime::stream::Resume;

pub fn router() -> Router<AppState> {
    Router::new().route("/api/schedules/{id}/seats/stream", get(seat_stream))
}

/// Counts a stream for as long as it lives; the gauge returns to its base
/// the moment a client goes away and its stream is dropped.
struct StreamSlot(Arc<AtomicUsize>);

impl StreamSlot {
    fn acquire(counter: &Arc<AtomicUsize>, max: usize) -> Option<Self> {
        counter
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()?;
        metrics::gauge!("seatsync_sse_connections").increment(1.0);
        Some(StreamSlot(counter.clone()))
    }
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
        metrics::gauge!("seatsync_sse_connections").decrement(1.0);
    }
}

#[utoipa::path(get, path = "/api/schedules/{id}/seats/stream", tag = "schedules",
    params(
        ("id" = i64, Path, description = "Schedule id"),
        ("lastEventId" = Option<String>, Query, description = "Resume after this event id (the Last-Event-ID header wins)"),
        ("Last-Event-ID" = Option<String>, Header, description = "Resume after this event id"),
    ),
    responses(
        (status = 200, content_type = "text/event-stream",
         description = "`retry: 3000`, then `id:`/`data:` seat events, `event: resync`, and `:` heartbeats"),
        (status = 400, body = Problem, content_type = "application/problem+json"),
        (status = 404, body = Problem, content_type = "application/problem+json"),
        (status = 503, body = Problem, content_type = "application/problem+json", description = "too_many_streams or shutting down"),
    ))]
pub async fn seat_stream(
    State(state): State<AppState>,
    ScheduleIdPath(id): ScheduleIdPath,
    query: Result<Query<HashMap<String, String>>, axum::extract::rejection::QueryRejection>,
    headers: HeaderMap,
    ClientAddress(address): ClientAddress,
) -> Result<Response, ApiError> {
    let Query(query) = query.map_err(|e| ApiError::invalid("query", e.body_text()))?;
    if state.shutdown.is_cancelled() {
        return Err(ApiError::Unavailable("replica is shutting down".into()));
    }
    state
        .schedules
        .get(id)
        .await?
        .ok_or(ApiError::ScheduleNotFound(id))?;
    let header_id = headers
        .get("last-event-id")
        .map(|v| v.to_str().unwrap_or("invalid"));
    let resume = Resume::parse(header_id.or(query.get("lastEventId").map(String::as_str)));

    let slot = StreamSlot::acquire(&state.sse_connections, state.limits.sse_max_connections)
        .ok_or(ApiError::TooManyStreams)?;
    let per_address = state
        .abuse
        .open_stream(address)
        .ok_or(ApiError::TooManyStreams)?;
    let (stream, direct) = state.streams.open(id, resume, (slot, per_address)).await?;
    let mut response = Response::new(Body::from_stream(stream));
    // For a connection that can hand its socket to the schedule's writer
    // (`server::event_stream`); any other drops it with the response.
    response.extensions_mut().insert(direct);
    *response.status_mut() = StatusCode::OK;
    let h = response.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert("x-accel-buffering", HeaderValue::from_static("no"));
    Ok(response)
}
