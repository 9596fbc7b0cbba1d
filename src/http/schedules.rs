//! Schedules and their seat-status snapshots.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::auth::Admin;
use super::error::{ApiError, Problem};
use super::extract::{ApiJson, ScheduleIdPath};
use super::{AppState, Limits};
use crate::holds::SeatState;
use crate::schedules::{NewSchedule, RequestedSeat, Schedule, Seat};

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/api/schedules", get(list_schedules).post(create_schedule))
        .route("/api/schedules/{id}", get(get_schedule))
        .route("/api/schedules/{id}/seat-status", get(seat_status))
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct CreateScheduleRequest {
    /// What is shown.
    pub title: String,
    /// RFC 3339, e.g. `2026-12-24T19:30:00Z`.
    pub starts_at: String,
    /// 1..=100
    pub rows: i64,
    /// 1..=100
    pub cols: i64,
    /// Seats that can never be booked.
    #[serde(default)]
    pub blocked: Vec<RequestedSeat>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ScheduleResponse {
    pub id: i64,
    pub title: String,
    #[schema(value_type = String, format = DateTime)]
    #[serde(serialize_with = "super::ops::rfc3339")]
    pub starts_at: DateTime<Utc>,
    pub rows: i32,
    pub cols: i32,
    pub blocked: Vec<Seat>,
    pub max_seats_per_booking: u16,
    pub hold_seconds: u32,
}

impl ScheduleResponse {
    fn new(s: &Schedule, limits: &Limits) -> Self {
        Self {
            id: s.id,
            title: s.title.clone(),
            starts_at: s.starts_at,
            rows: s.rows,
            cols: s.cols,
            blocked: s.blocked.clone(),
            max_seats_per_booking: limits.max_seats_per_booking,
            hold_seconds: limits.hold_seconds,
        }
    }
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct SeatStatusResponse {
    pub schedule_id: i64,
    /// Id of the last seat event reflected here; resume the stream from it.
    pub last_event_id: String,
    /// Held (`OCCUPIED`) and sold (`CONFIRMED`) seats; others are free or blocked.
    pub seats: Vec<SeatState>,
}

#[utoipa::path(post, path = "/api/schedules", tag = "schedules",
    request_body = CreateScheduleRequest,
    security(("admin" = [])),
    responses(
        (status = 201, body = ScheduleResponse),
        (status = 400, body = Problem, content_type = "application/problem+json"),
        (status = 401, body = Problem, content_type = "application/problem+json"),
        (status = 403, body = Problem, content_type = "application/problem+json"),
        (status = 413, body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn create_schedule(
    State(state): State<AppState>,
    _admin: Admin,
    ApiJson(req): ApiJson<CreateScheduleRequest>,
) -> Result<impl IntoResponse, ApiError> {
    let starts_at = DateTime::parse_from_rfc3339(req.starts_at.trim())
        .map_err(|e| ApiError::invalid("startsAt", format!("not an RFC 3339 time: {e}")))?
        .with_timezone(&Utc);
    let new = NewSchedule {
        title: req.title,
        starts_at,
        rows: req.rows,
        cols: req.cols,
        blocked: req.blocked,
    };
    let schedule = state.schedules.create(new).await?;
    tracing::info!(schedule_id = schedule.id, "schedule created");
    Ok((
        StatusCode::CREATED,
        Json(ScheduleResponse::new(&schedule, &state.limits)),
    ))
}

#[utoipa::path(get, path = "/api/schedules", tag = "schedules",
    responses((status = 200, body = [ScheduleResponse])))]
pub async fn list_schedules(
    State(state): State<AppState>,
) -> Result<Json<Vec<ScheduleResponse>>, ApiError> {
    let list = state.schedules.list().await?;
    Ok(Json(
        list.iter()
            .map(|s| ScheduleResponse::new(s, &state.limits))
            .collect(),
    ))
}

#[utoipa::path(get, path = "/api/schedules/{id}", tag = "schedules",
    params(("id" = i64, Path, description = "Schedule id")),
    responses(
        (status = 200, body = ScheduleResponse),
        (status = 400, body = Problem, content_type = "application/problem+json"),
        (status = 404, body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn get_schedule(
    State(state): State<AppState>,
    ScheduleIdPath(id): ScheduleIdPath,
) -> Result<Json<ScheduleResponse>, ApiError> {
    let schedule = state
        .schedules
        .get(id)
        .await?
        .ok_or(ApiError::ScheduleNotFound(id))?;
    Ok(Json(ScheduleResponse::new(&schedule, &state.limits)))
}

#[utoipa::path(get, path = "/api/schedules/{id}/seat-status", tag = "schedules",
    params(("id" = i64, Path, description = "Schedule id")),
    responses(
        (status = 200, body = SeatStatusResponse),
        (status = 400, body = Problem, content_type = "application/problem+json"),
        (status = 404, body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn seat_status(
    State(state): State<AppState>,
    ScheduleIdPath(id): ScheduleIdPath,
) -> Result<Json<SeatStatusResponse>, ApiError> {
    let snapshot = state.store.seat_snapshot(id).await?;
    Ok(Json(SeatStatusResponse {
        schedule_id: snapshot.schedule_id,
        last_event_id: snapshot.last_event_id.to_string(),
        seats: snapshot.seats,
    }))
}
