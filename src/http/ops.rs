//! Operations endpoints: liveness, readiness, metrics.

use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use chrono::{DateTime, SecondsFormat, Utc};
use serde_json::json;

use super::AppState;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
}

/// Times leave as RFC 3339 in UTC with a `Z`, fractions only when present.
pub fn rfc3339<S: serde::Serializer>(t: &DateTime<Utc>, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&t.to_rfc3339_opts(SecondsFormat::AutoSi, true))
}

#[utoipa::path(get, path = "/healthz", tag = "operations", responses((status = 200, description = "The process runs")))]
pub async fn healthz() -> impl IntoResponse {
    Json(json!({"status": "ok"}))
}

const READY_DB_TIMEOUT: Duration = Duration::from_secs(2);

#[utoipa::path(get, path = "/readyz", tag = "operations", responses(
    (status = 200, description = "Database reachable and this replica's listener up"),
    (status = 503, description = "Not ready: database, listener, or shutting down"),
))]
pub async fn readyz(State(state): State<AppState>) -> Response {
    let shutting_down = state.shutdown.is_cancelled();
    let listener = state.listener_ready.load(Ordering::SeqCst);
    let database = !shutting_down
        && tokio::time::timeout(READY_DB_TIMEOUT, async {
            state.db.conn().await.ok()?.ping().await.ok()
        })
        .await
        .ok()
        .flatten()
        .is_some();
    let ready = !shutting_down && listener && database;
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = json!({
        "status": if ready { "ready" } else { "unavailable" },
        "database": database,
        "listener": listener,
        "shuttingDown": shutting_down,
    });
    (status, Json(body)).into_response()
}

#[utoipa::path(get, path = "/metrics", tag = "operations", responses((status = 200, description = "Prometheus text format")))]
pub async fn metrics(State(state): State<AppState>) -> Response {
    metrics::gauge!("seatsync_sse_connections")
        .set(state.sse_connections.load(Ordering::SeqCst) as f64);
    metrics::gauge!("seatsync_sse_channels").set(state.streams.channel_count() as f64);
    let pool = state.db.pool().status();
    metrics::gauge!("seatsync_db_pool_size").set(pool.size as f64);
    metrics::gauge!("seatsync_db_pool_available").set(pool.available as f64);
    metrics::gauge!("seatsync_db_pool_waiting").set(pool.waiting as f64);
    let body = state
        .metrics
        .as_ref()
        .map(|h| h.render())
        .unwrap_or_default();
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        body,
    )
        .into_response()
}
