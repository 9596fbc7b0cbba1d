//! The HTTP edge: thin handlers, one module per resource. Handlers parse,
//! call the domain, and map errors once through [`error::ApiError`].

pub mod auth;
pub mod bookings;
pub mod error;
pub mod events;
pub mod extract;
pub mod limits;
pub mod observe;
pub mod openapi;
pub mod ops;
pub mod page;
pub mod schedules;

use std::sync::atomic::{AtomicBool, AtomicUsize};
use std::sync::Arc;

use axum::extract::Request;
use axum::http::header;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::Router;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio_util::sync::CancellationToken;

use crate::auth::TokenAuthority;
use crate::db::Db;
use crate::holds::admission::ShowAdmission;
use crate::holds::live_map::LiveMaps;
use crate::holds::SeatStore;
use crate::realtime::stream::SeatStreams;
use crate::schedules::ScheduleCatalog;
use error::ApiError;
use extract::MAX_BODY_BYTES;

/// Settings the handlers need, copied out of the configuration.
#[derive(Debug, Clone)]
pub struct Limits {
    pub hold_seconds: u32,
    pub max_seats_per_booking: u16,
    pub sse_max_connections: usize,
    pub auth_guest: bool,
}

/// Everything a handler may touch. Cheap to clone.
#[derive(Clone)]
pub struct AppState {
    /// Where holds live; handlers never see which store it is.
    pub store: Arc<dyn SeatStore>,
    /// Showings, cached per replica (they never change).
    pub schedules: ScheduleCatalog,
    /// Issues and checks guest tokens (HS256, shared by every replica).
    pub tokens: TokenAuthority,
    /// Bearer token of the admin endpoints; `None` disables them.
    pub admin_token: Option<Arc<str>>,
    pub limits: Arc<Limits>,
    /// The pooled connections, for `/readyz` and the pool gauges.
    pub db: Db,
    /// Opens SSE streams on this replica's broadcast hubs.
    pub streams: SeatStreams,
    /// Live seat maps of hot showings: doomed starts answered from memory.
    pub live_maps: LiveMaps,
    /// How many hold transactions one showing may run at once.
    pub admission: ShowAdmission,
    /// Whether this replica's LISTEN connection is up; `/readyz` reports it.
    pub listener_ready: Arc<AtomicBool>,
    /// Open SSE streams, held against `Limits::sse_max_connections`.
    pub sse_connections: Arc<AtomicUsize>,
    /// Rate limits, stream caps per address, the request time limit.
    pub abuse: Arc<limits::AbuseLimits>,
    /// Cancelled on SIGTERM: streams end, `/readyz` turns 503.
    pub shutdown: CancellationToken,
    /// Renders `/metrics`; `None` when another recorder was installed first
    /// (several applications in one test process).
    pub metrics: Option<PrometheusHandle>,
}

pub fn router(state: AppState) -> Router {
    let per_address = middleware::from_fn_with_state(state.clone(), limits::limit_address);
    let in_time = middleware::from_fn_with_state(state.clone(), limits::limit_time);
    Router::new()
        .merge(ops::router())
        .merge(auth::router().route_layer(per_address.clone()))
        .merge(page::router())
        .merge(openapi::router())
        .merge(schedules::router())
        .merge(bookings::router().route_layer(per_address))
        // Everything but the stream, which lives as long as its client.
        .route_layer(in_time)
        .merge(events::router())
        .fallback(|| async { ApiError::RouteNotFound })
        .method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed })
        .layer(middleware::from_fn(reject_large_bodies))
        .layer(middleware::from_fn_with_state(
            state.clone(),
            limits::limit_head,
        ))
        .layer(middleware::from_fn_with_state(
            state.shutdown.clone(),
            observe::observe,
        ))
        .with_state(state)
}

/// Refuses a declared oversized body before any handler runs, on every
/// route. Bodies without a length are capped by [`extract::ApiJson`].
async fn reject_large_bodies(req: Request, next: Next) -> Response {
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > MAX_BODY_BYTES as u64) {
        return ApiError::PayloadTooLarge {
            limit: MAX_BODY_BYTES,
        }
        .into_response();
    }
    next.run(req).await
}
