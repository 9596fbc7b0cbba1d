//! Bookings: start (hold), read, confirm, cancel.

use axum::extract::State;
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::auth::User;
use super::error::{ApiError, Problem};
use super::extract::{ApiJson, BookingIdPath};
use super::AppState;
use crate::holds::live_map::{BestVerdict, Verdict};
use crate::holds::{
    validate_quantity, validate_seats, Booking, BookingStatus, HoldError, HoldRequest, SeatChoice,
};
use crate::schedules::Schedule;
use crate::schedules::{RequestedSeat, Seat};
use std::sync::Arc;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/api/bookings/start", post(start_booking))
        .route("/api/bookings/{id}", get(get_booking))
        .route("/api/bookings/{id}/confirm", post(confirm_booking))
        .route("/api/bookings/{id}/cancel", post(cancel_booking))
}

/// Exactly one of `seats` and `quantity`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct StartBookingRequest {
    pub schedule_id: i64,
    /// 1..=maxSeatsPerBooking distinct, bookable seats.
    #[serde(default, deserialize_with = "present")]
    pub seats: Option<Vec<RequestedSeat>>,
    /// Best available: hold this many adjacent free seats of one row,
    /// chosen by the server (1..=maxSeatsPerBooking).
    #[serde(default, deserialize_with = "present")]
    #[schema(value_type = Option<u16>, minimum = 1)]
    pub quantity: Option<serde_json::Value>,
}

/// A member that is there, even as `null`: absent and `null` are not the
/// same request (a `null` quantity is a wrong type, not a missing one).
fn present<'de, D, T>(deserializer: D) -> Result<Option<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    T::deserialize(deserializer).map(Some)
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct BookingResponse {
    pub booking_id: Uuid,
    pub schedule_id: i64,
    pub status: BookingStatus,
    pub seats: Vec<Seat>,
    #[schema(value_type = String, format = DateTime)]
    #[serde(serialize_with = "super::ops::rfc3339")]
    pub expires_at: DateTime<Utc>,
}

impl From<Booking> for BookingResponse {
    fn from(b: Booking) -> Self {
        Self {
            booking_id: b.id,
            schedule_id: b.schedule_id,
            status: b.status,
            seats: b.seats,
            expires_at: b.expires_at,
        }
    }
}

const MAX_IDEMPOTENCY_KEY: usize = 255;

/// Says which part of the replica answered a start: `memory` when its live
/// seat map did (see `holds::live_map`); absent when the database did.
static ANSWERED_FROM: HeaderName = HeaderName::from_static("x-answered-from");

/// The answer to a start that the replica's live seat map can prove
/// doomed, if it can; loads the map on first use.
fn doomed_from_memory(
    state: &AppState,
    schedule: &Arc<Schedule>,
    user: Uuid,
    choice: &SeatChoice,
) -> Option<Response> {
    let now = Utc::now().timestamp_micros();
    let maps = &state.live_maps;
    let (refusal, outcome, load) = match choice {
        SeatChoice::Seats(seats) => match maps.verdict(schedule.id, user, seats, now) {
            Verdict::Taken(taken) => (Some(HoldError::SeatsTaken(taken)), "seats_taken", false),
            Verdict::Load => (None, "", true),
            Verdict::AskTheDatabase => (None, "", false),
        },
        SeatChoice::BestAvailable { quantity, .. } => {
            match maps.best_available_verdict(schedule, user, *quantity, now) {
                BestVerdict::NoBlock { largest } => (
                    Some(HoldError::NoSeatsTogether {
                        quantity: *quantity,
                        largest_block: largest,
                    }),
                    "no_seats_together",
                    false,
                ),
                BestVerdict::Load => (None, "", true),
                BestVerdict::AskTheDatabase => (None, "", false),
            }
        }
    };
    if load {
        maps.load(state.store.clone(), schedule.id);
    }
    let refusal = refusal?;
    count_start(outcome, "memory");
    // Which answers the replica's live map gave: for operators and for the
    // tests of its guarantee.
    let header = [(ANSWERED_FROM.clone(), HeaderValue::from_static("memory"))];
    Some((header, ApiError::from(refusal)).into_response())
}

fn count_start(outcome: &'static str, answered_from: &'static str) {
    metrics::counter!("seatsync_booking_starts_total", "outcome" => outcome, "answered_from" => answered_from)
        .increment(1);
    match outcome {
        "held" => metrics::counter!("seatsync_holds_total", "outcome" => "started").increment(1),
        "seats_taken" | "no_seats_together" => {
            metrics::counter!("seatsync_holds_total", "outcome" => "conflicted").increment(1)
        }
        _ => {}
    }
}

fn idempotency_key(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    let Some(v) = headers.get("idempotency-key") else {
        return Ok(None);
    };
    let bytes = v.as_bytes();
    if bytes.is_empty()
        || bytes.len() > MAX_IDEMPOTENCY_KEY
        || !bytes.iter().all(|b| (0x20..=0x7e).contains(b))
    {
        return Err(ApiError::invalid(
            "Idempotency-Key",
            format!("must be 1 to {MAX_IDEMPOTENCY_KEY} printable ASCII characters"),
        ));
    }
    Ok(Some(String::from_utf8_lossy(bytes).into_owned()))
}

#[utoipa::path(post, path = "/api/bookings/start", tag = "bookings",
    request_body = StartBookingRequest,
    params(("Idempotency-Key" = Option<String>, Header, description = "Makes retries safe: same key and body, same booking")),
    security(("user" = [])),
    responses(
        (status = 201, body = BookingResponse, description = "All seats held"),
        (status = 400, body = Problem, content_type = "application/problem+json"),
        (status = 401, body = Problem, content_type = "application/problem+json"),
        (status = 404, body = Problem, content_type = "application/problem+json"),
        (status = 409, body = Problem, content_type = "application/problem+json",
         description = "seats_taken (with `seats`), no_seats_together (with `largestBlock`), booking_in_progress (with `bookingId`) or idempotency_key_reused"),
        (status = 413, body = Problem, content_type = "application/problem+json"),
        (status = 429, body = Problem, content_type = "application/problem+json", description = "rate_limited, with Retry-After"),
    ))]
pub async fn start_booking(
    State(state): State<AppState>,
    User(user_id): User,
    headers: HeaderMap,
    ApiJson(req): ApiJson<StartBookingRequest>,
) -> Result<Response, ApiError> {
    state.abuse.check_user_start(user_id)?;
    let idempotency_key = idempotency_key(&headers)?;
    if req.schedule_id <= 0 {
        return Err(ApiError::invalid(
            "scheduleId",
            "must be a positive integer",
        ));
    }
    let schedule = state
        .schedules
        .get(req.schedule_id)
        .await?
        .ok_or(ApiError::ScheduleNotFound(req.schedule_id))?;
    let max = state.limits.max_seats_per_booking;
    let choice = match (req.seats, req.quantity) {
        (Some(seats), None) => SeatChoice::Seats(validate_seats(&schedule, &seats, max)?),
        (None, Some(quantity)) => SeatChoice::BestAvailable {
            quantity: validate_quantity(&quantity, max)?,
            schedule: schedule.clone(),
        },
        (Some(_), Some(_)) => {
            return Err(ApiError::invalid(
                "quantity",
                "send either seats or quantity, not both",
            ))
        }
        (None, None) => {
            return Err(ApiError::invalid(
                "seats",
                "seats (or quantity, for best available) is required",
            ))
        }
    };
    if let Some(doomed) = doomed_from_memory(&state, &schedule, user_id, &choice) {
        return Ok(doomed);
    }
    let request = HoldRequest {
        user_id,
        schedule_id: schedule.id,
        choice,
        idempotency_key,
    };
    let admitted = state.admission.enter(schedule.id).await;
    let result = state
        .store
        .hold_seats(request, state.limits.hold_seconds)
        .await;
    drop(admitted);
    let label = match &result {
        Ok(o) if o.replayed => "replayed",
        Ok(_) => "held",
        Err(HoldError::SeatsTaken(_)) => "seats_taken",
        Err(HoldError::NoSeatsTogether { .. }) => "no_seats_together",
        Err(_) => "refused",
    };
    count_start(label, "database");
    let outcome = result?;
    if !outcome.replayed {
        let b = &outcome.booking;
        state.live_maps.held_here(
            b.schedule_id,
            &b.seats,
            user_id,
            b.expires_at.timestamp_micros(),
        );
    }
    Ok((
        StatusCode::CREATED,
        Json(BookingResponse::from(outcome.booking)),
    )
        .into_response())
}

#[utoipa::path(get, path = "/api/bookings/{id}", tag = "bookings",
    params(("id" = Uuid, Path, description = "Booking id")),
    security(("user" = [])),
    responses(
        (status = 200, body = BookingResponse),
        (status = 400, body = Problem, content_type = "application/problem+json"),
        (status = 401, body = Problem, content_type = "application/problem+json"),
        (status = 404, body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn get_booking(
    State(state): State<AppState>,
    User(user_id): User,
    BookingIdPath(id): BookingIdPath,
) -> Result<Json<BookingResponse>, ApiError> {
    Ok(Json(state.store.booking(user_id, id).await?.into()))
}

#[utoipa::path(post, path = "/api/bookings/{id}/confirm", tag = "bookings",
    params(("id" = Uuid, Path, description = "Booking id")),
    security(("user" = [])),
    responses(
        (status = 200, body = BookingResponse, description = "Confirmed (idempotent)"),
        (status = 400, body = Problem, content_type = "application/problem+json"),
        (status = 401, body = Problem, content_type = "application/problem+json"),
        (status = 404, body = Problem, content_type = "application/problem+json"),
        (status = 409, body = Problem, content_type = "application/problem+json", description = "booking_cancelled"),
        (status = 410, body = Problem, content_type = "application/problem+json", description = "booking_expired"),
    ))]
pub async fn confirm_booking(
    State(state): State<AppState>,
    User(user_id): User,
    BookingIdPath(id): BookingIdPath,
) -> Result<Json<BookingResponse>, ApiError> {
    let booking = state.store.confirm(user_id, id).await?;
    metrics::counter!("seatsync_holds_total", "outcome" => "confirmed").increment(1);
    Ok(Json(booking.into()))
}

#[utoipa::path(post, path = "/api/bookings/{id}/cancel", tag = "bookings",
    params(("id" = Uuid, Path, description = "Booking id")),
    security(("user" = [])),
    responses(
        (status = 200, body = BookingResponse, description = "Cancelled (idempotent)"),
        (status = 400, body = Problem, content_type = "application/problem+json"),
        (status = 401, body = Problem, content_type = "application/problem+json"),
        (status = 404, body = Problem, content_type = "application/problem+json"),
        (status = 409, body = Problem, content_type = "application/problem+json", description = "booking_confirmed"),
        (status = 410, body = Problem, content_type = "application/problem+json", description = "booking_expired"),
    ))]
pub async fn cancel_booking(
    State(state): State<AppState>,
    User(user_id): User,
    BookingIdPath(id): BookingIdPath,
) -> Result<Json<BookingResponse>, ApiError> {
    let booking = state.store.cancel(user_id, id).await?;
    state
        .live_maps
        .released_here(booking.schedule_id, &booking.seats);
    metrics::counter!("seatsync_holds_total", "outcome" => "cancelled").increment(1);
    Ok(Json(booking.into()))
}
