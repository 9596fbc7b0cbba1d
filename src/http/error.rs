//! The HTTP edge's one error type. Every failure of every layer is mapped to
//! an [`ApiError`] once, here, and leaves as `application/problem+json`
//! (RFC 9457) with a stable `code`.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use uuid::Uuid;

use crate::auth::AuthError;
use crate::db::DbError;
use crate::holds::HoldError;
use crate::realtime::stream::OpenError;
use crate::schedules::{ScheduleError, Seat};

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{detail}")]
    InvalidRequest {
        field: Option<String>,
        detail: String,
    },
    #[error("request body is larger than {limit} bytes")]
    PayloadTooLarge { limit: usize },
    #[error("request line and headers are larger than {limit} bytes")]
    HeadersTooLarge { limit: usize },
    #[error("{0}")]
    Unauthorized(String),
    #[error("{0}")]
    Forbidden(String),
    #[error("schedule {0} does not exist")]
    ScheduleNotFound(i64),
    #[error("no such resource")]
    RouteNotFound,
    #[error("method not allowed")]
    MethodNotAllowed,
    #[error(transparent)]
    Hold(HoldError),
    #[error("this replica serves its maximum number of seat streams")]
    TooManyStreams,
    #[error("too many requests; try again in {retry_after_seconds} s")]
    RateLimited { retry_after_seconds: u64 },
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    Internal(String),
}

impl ApiError {
    pub fn invalid(field: impl Into<String>, detail: impl std::fmt::Display) -> Self {
        let field = field.into();
        ApiError::InvalidRequest {
            detail: format!("{field}: {detail}"),
            field: Some(field),
        }
    }

    fn parts(&self) -> (StatusCode, &'static str, &'static str) {
        use HoldError as H;
        match self {
            ApiError::InvalidRequest { .. } => (
                StatusCode::BAD_REQUEST,
                "invalid_request",
                "Invalid request",
            ),
            ApiError::PayloadTooLarge { .. } => (
                StatusCode::PAYLOAD_TOO_LARGE,
                "payload_too_large",
                "Payload too large",
            ),
            ApiError::HeadersTooLarge { .. } => (
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                "headers_too_large",
                "Request headers too large",
            ),
            ApiError::Unauthorized(_) => (StatusCode::UNAUTHORIZED, "unauthorized", "Unauthorized"),
            ApiError::Forbidden(_) => (StatusCode::FORBIDDEN, "forbidden", "Forbidden"),
            ApiError::ScheduleNotFound(_) | ApiError::Hold(H::ScheduleNotFound(_)) => (
                StatusCode::NOT_FOUND,
                "schedule_not_found",
                "Schedule not found",
            ),
            ApiError::Hold(H::BookingNotFound) => (
                StatusCode::NOT_FOUND,
                "booking_not_found",
                "Booking not found",
            ),
            ApiError::RouteNotFound => (StatusCode::NOT_FOUND, "not_found", "Not found"),
            ApiError::MethodNotAllowed => (
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "Method not allowed",
            ),
            ApiError::Hold(H::InvalidRequest { .. }) => (
                StatusCode::BAD_REQUEST,
                "invalid_request",
                "Invalid request",
            ),
            ApiError::Hold(H::SeatsTaken(_)) => {
                (StatusCode::CONFLICT, "seats_taken", "Seats taken")
            }
            ApiError::Hold(H::NoSeatsTogether { .. }) => (
                StatusCode::CONFLICT,
                "no_seats_together",
                "No seats together",
            ),
            ApiError::Hold(H::BookingInProgress(_)) => (
                StatusCode::CONFLICT,
                "booking_in_progress",
                "Booking in progress",
            ),
            ApiError::Hold(H::IdempotencyKeyReused) => (
                StatusCode::CONFLICT,
                "idempotency_key_reused",
                "Idempotency key reused",
            ),
            ApiError::Hold(H::BookingExpired) => {
                (StatusCode::GONE, "booking_expired", "Booking expired")
            }
            ApiError::Hold(H::BookingCancelled) => (
                StatusCode::CONFLICT,
                "booking_cancelled",
                "Booking cancelled",
            ),
            ApiError::Hold(H::BookingConfirmed) => (
                StatusCode::CONFLICT,
                "booking_confirmed",
                "Booking confirmed",
            ),
            ApiError::RateLimited { .. } => (
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limited",
                "Too many requests",
            ),
            ApiError::TooManyStreams => (
                StatusCode::SERVICE_UNAVAILABLE,
                "too_many_streams",
                "Too many streams",
            ),
            ApiError::Hold(H::Unavailable(_)) | ApiError::Unavailable(_) => (
                StatusCode::SERVICE_UNAVAILABLE,
                "service_unavailable",
                "Service unavailable",
            ),
            ApiError::Internal(_) => (
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal_error",
                "Internal server error",
            ),
        }
    }

    /// The problem body: the members every problem has, and the extra
    /// ones of its code.
    fn problem(&self) -> (StatusCode, Problem) {
        let (status, code, title) = self.parts();
        let detail = match self {
            // Never leak database internals to clients; they go to the log.
            ApiError::Hold(HoldError::Unavailable(e)) | ApiError::Unavailable(e) => {
                tracing::warn!(error = %e, "request failed: store unavailable");
                "the service is temporarily unavailable; nothing was changed, try again".to_owned()
            }
            ApiError::Internal(e) => {
                tracing::error!(error = %e, "request failed: internal error");
                "internal error; nothing was changed".to_owned()
            }
            other => other.to_string(),
        };
        let mut problem = Problem {
            r#type: format!("urn:seatsync:problem:{code}"),
            title,
            status: status.as_u16(),
            detail,
            code,
            field: None,
            seats: None,
            booking_id: None,
            largest_block: None,
        };
        match self {
            ApiError::InvalidRequest { field, .. } => problem.field = field.clone(),
            ApiError::Hold(HoldError::InvalidRequest { field, .. }) => {
                problem.field = Some(field.clone())
            }
            ApiError::Hold(HoldError::SeatsTaken(seats)) => problem.seats = Some(seats.clone()),
            ApiError::Hold(HoldError::NoSeatsTogether { largest_block, .. }) => {
                problem.largest_block = Some(*largest_block)
            }
            ApiError::Hold(HoldError::BookingInProgress(id)) => problem.booking_id = Some(*id),
            _ => {}
        }
        (status, problem)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, problem) = self.problem();
        let retry_after = match self {
            ApiError::RateLimited {
                retry_after_seconds,
            } => Some(retry_after_seconds.max(1)),
            _ if status == StatusCode::SERVICE_UNAVAILABLE => Some(1),
            _ => None,
        };
        let mut response = (status, axum::Json(problem)).into_response();
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        if let Some(seconds) = retry_after {
            headers.insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        if status == StatusCode::PAYLOAD_TOO_LARGE {
            // The rest of the body is left unread, so hyper closes the
            // connection after this answer. Say so: a keep-alive client
            // would otherwise send its next request on a dead connection.
            headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        if status == StatusCode::UNAUTHORIZED {
            headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}

impl From<HoldError> for ApiError {
    fn from(e: HoldError) -> Self {
        ApiError::Hold(e)
    }
}

impl From<OpenError> for ApiError {
    fn from(e: OpenError) -> Self {
        match e {
            OpenError::ScheduleNotFound(id) => ApiError::ScheduleNotFound(id),
            OpenError::Db(e) => e.into(),
        }
    }
}

impl From<DbError> for ApiError {
    fn from(e: DbError) -> Self {
        ApiError::Unavailable(e.to_string())
    }
}

impl From<ScheduleError> for ApiError {
    fn from(e: ScheduleError) -> Self {
        match e {
            ScheduleError::Invalid { field, reason } => ApiError::invalid(field, reason),
            ScheduleError::Db(e) => e.into(),
        }
    }
}

impl From<AuthError> for ApiError {
    fn from(e: AuthError) -> Self {
        match e {
            AuthError::InvalidToken => ApiError::Unauthorized("invalid or expired token".into()),
            AuthError::Signing(e) => ApiError::Internal(e),
        }
    }
}

/// Every error body (RFC 9457), as sent and as the OpenAPI document
/// describes it.
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Problem {
    /// URI naming the problem type.
    r#type: String,
    title: &'static str,
    status: u16,
    detail: String,
    /// Stable, machine-readable error code.
    code: &'static str,
    /// The offending field, for `invalid_request`.
    #[serde(skip_serializing_if = "Option::is_none")]
    field: Option<String>,
    /// For `seats_taken`: the requested seats that are held or sold.
    #[serde(skip_serializing_if = "Option::is_none")]
    seats: Option<Vec<Seat>>,
    /// For `booking_in_progress`: the user's pending booking.
    #[serde(skip_serializing_if = "Option::is_none")]
    booking_id: Option<Uuid>,
    /// For `no_seats_together`: the longest run of adjacent free seats in
    /// any row right now (0 when none).
    #[serde(skip_serializing_if = "Option::is_none")]
    largest_block: Option<u16>,
}
