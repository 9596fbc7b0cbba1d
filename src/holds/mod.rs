//! The booking domain: seats, holds and their state machine.
//!
//! Nothing here knows about HTTP. Handlers talk to a [`SeatStore`]; the
//! PostgreSQL implementation lives in [`postgres`], and a Redis one could
//! take its place without the handlers noticing.

pub mod admission;
pub mod allocate;
pub mod live_map;
pub mod postgres;
pub mod sweeper;

use std::collections::BTreeSet;
use std::sync::Arc;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::events::SeatAction;
use crate::schedules::{RequestedSeat, Schedule, Seat};

/// Where a booking is in its life. Only `Pending` can change, and it changes
/// exactly once.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum BookingStatus {
    Pending,
    Confirmed,
    Cancelled,
    Expired,
}

impl BookingStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "PENDING",
            Self::Confirmed => "CONFIRMED",
            Self::Cancelled => "CANCELLED",
            Self::Expired => "EXPIRED",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "PENDING" => Self::Pending,
            "CONFIRMED" => Self::Confirmed,
            "CANCELLED" => Self::Cancelled,
            "EXPIRED" => Self::Expired,
            _ => return None,
        })
    }
}

/// A seat that is held or sold, as the snapshot lists it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct SeatState {
    pub row: i16,
    pub col: i16,
    /// `OCCUPIED` (held) or `CONFIRMED` (sold).
    pub status: SeatAction,
}

/// A booking as its owner sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Booking {
    pub id: Uuid,
    pub schedule_id: i64,
    pub user_id: Uuid,
    pub status: BookingStatus,
    pub seats: Vec<Seat>,
    pub expires_at: DateTime<Utc>,
}

/// The held and sold seats of a schedule, and the id of the last seat event
/// they reflect, read in one database snapshot.
#[derive(Debug, Clone)]
pub struct SeatSnapshot {
    pub schedule_id: i64,
    pub last_event_id: i64,
    pub seats: Vec<SeatState>,
}

/// Which seats a start asks for.
#[derive(Debug, Clone)]
pub enum SeatChoice {
    /// These seats. Sorted and free of duplicates: every transaction
    /// inserts seats in the same order, so overlapping holds wait on each
    /// other instead of deadlocking.
    Seats(Vec<Seat>),
    /// The best block of `quantity` adjacent free seats of one row
    /// (see [`allocate`]), chosen when the transaction decides.
    BestAvailable {
        quantity: u16,
        schedule: Arc<Schedule>,
    },
}

/// A request to hold seats, already checked against the schedule.
#[derive(Debug, Clone)]
pub struct HoldRequest {
    pub user_id: Uuid,
    pub schedule_id: i64,
    pub choice: SeatChoice,
    pub idempotency_key: Option<String>,
}

impl HoldRequest {
    /// What makes two requests "the same body" for `Idempotency-Key`: the
    /// schedule and the set of seats, in any order, or the party size.
    pub fn fingerprint(&self) -> String {
        let mut out = format!("{}:", self.schedule_id);
        match &self.choice {
            SeatChoice::Seats(seats) => {
                for s in seats {
                    out.push_str(&format!("{}.{};", s.row, s.col));
                }
            }
            SeatChoice::BestAvailable { quantity, .. } => out.push_str(&format!("best:{quantity}")),
        }
        out
    }
}

/// The result of a successful `hold_seats`.
#[derive(Debug, Clone)]
pub struct HoldOutcome {
    pub booking: Booking,
    /// True when an `Idempotency-Key` matched an existing booking and nothing
    /// new was held.
    pub replayed: bool,
}

/// Why a booking operation did not happen. Every variant but `Unavailable`
/// is the caller's to fix; none of them changed anything.
#[derive(Debug, thiserror::Error)]
pub enum HoldError {
    #[error("{field}: {reason}")]
    InvalidRequest { field: String, reason: String },
    #[error("schedule {0} does not exist")]
    ScheduleNotFound(i64),
    #[error("{} of the requested seats are already held or sold", .0.len())]
    SeatsTaken(Vec<Seat>),
    #[error(
        "no {quantity} adjacent seats are free in any row; the longest free run is {largest_block}"
    )]
    NoSeatsTogether { quantity: u16, largest_block: u16 },
    #[error("you already have a pending booking {0} for this schedule")]
    BookingInProgress(Uuid),
    #[error("this Idempotency-Key was used for a different request")]
    IdempotencyKeyReused,
    #[error("booking not found")]
    BookingNotFound,
    #[error("the booking expired before it was confirmed")]
    BookingExpired,
    #[error("the booking was cancelled")]
    BookingCancelled,
    #[error("the booking is already confirmed")]
    BookingConfirmed,
    #[error("seat store unavailable: {0}")]
    Unavailable(String),
}

/// Where holds live. All operations are atomic: they either happen whole,
/// with their seat event, or not at all.
#[async_trait]
pub trait SeatStore: Send + Sync + 'static {
    /// Holds every seat of the request or none of them.
    async fn hold_seats(
        &self,
        request: HoldRequest,
        hold_seconds: u32,
    ) -> Result<HoldOutcome, HoldError>;
    /// The booking, if `user_id` owns it.
    async fn booking(&self, user_id: Uuid, booking_id: Uuid) -> Result<Booking, HoldError>;
    /// Marks a pending, unexpired booking as paid. Idempotent.
    async fn confirm(&self, user_id: Uuid, booking_id: Uuid) -> Result<Booking, HoldError>;
    /// Releases a pending, unexpired booking. Idempotent.
    async fn cancel(&self, user_id: Uuid, booking_id: Uuid) -> Result<Booking, HoldError>;
    /// Expires up to `limit` overdue holds; returns how many it released.
    /// Safe to run on every replica at once: no hold is released twice.
    async fn release_expired(&self, limit: i64) -> Result<usize, HoldError>;
    /// Held and sold seats with the last event id they reflect.
    async fn seat_snapshot(&self, schedule_id: i64) -> Result<SeatSnapshot, HoldError>;
    /// The same with every hold's holder and expiry, and the store's clock:
    /// what a replica's live seat map starts from.
    async fn map_snapshot(&self, schedule_id: i64) -> Result<live_map::MapSnapshot, HoldError>;
}

/// Checks a best-available party size: an integer in 1..=`max_seats`. A
/// size longer than any row is valid (it gets `NoSeatsTogether`).
pub fn validate_quantity(quantity: &serde_json::Value, max_seats: u16) -> Result<u16, HoldError> {
    quantity
        .as_i64()
        .filter(|q| (1..=i64::from(max_seats)).contains(q))
        .and_then(|q| u16::try_from(q).ok())
        .ok_or_else(|| HoldError::InvalidRequest {
            field: "quantity".into(),
            reason: format!("must be an integer in 1..={max_seats}, got {quantity}"),
        })
}

/// Checks a hold request against the schedule and returns the seats sorted.
/// `field` prefixes name the offending element, e.g. `seats[2].col`.
pub fn validate_seats(
    schedule: &Schedule,
    requested: &[RequestedSeat],
    max_seats: u16,
) -> Result<Vec<Seat>, HoldError> {
    let invalid = |field: String, reason: String| HoldError::InvalidRequest { field, reason };
    if requested.is_empty() {
        return Err(invalid(
            "seats".into(),
            "at least one seat is required".into(),
        ));
    }
    if requested.len() > usize::from(max_seats) {
        return Err(invalid(
            "seats".into(),
            format!(
                "at most {max_seats} seats per booking, got {}",
                requested.len()
            ),
        ));
    }
    let grid = schedule.grid();
    let blocked: BTreeSet<Seat> = schedule.blocked.iter().copied().collect();
    let mut seen = BTreeSet::new();
    for (i, &s) in requested.iter().enumerate() {
        let seat = grid
            .locate(s)
            .map_err(|e| invalid(format!("seats[{i}].{}", e.coordinate), e.reason))?;
        if blocked.contains(&seat) {
            return Err(invalid(
                format!("seats[{i}]"),
                format!("seat row {} col {} is blocked", seat.row, seat.col),
            ));
        }
        if !seen.insert(seat) {
            return Err(invalid(
                format!("seats[{i}]"),
                format!("seat row {} col {} is requested twice", seat.row, seat.col),
            ));
        }
    }
    Ok(seen.into_iter().collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn schedule() -> Schedule {
        Schedule {
            id: 1,
            title: "t".into(),
            starts_at: Utc::now(),
            rows: 3,
            cols: 4,
            blocked: vec![Seat { row: 1, col: 1 }],
        }
    }

    fn req(seats: &[(i64, i64)]) -> Vec<RequestedSeat> {
        seats
            .iter()
            .map(|&(row, col)| RequestedSeat { row, col })
            .collect()
    }

    #[test]
    fn sorts_valid_seats() {
        let seats = validate_seats(&schedule(), &req(&[(2, 2), (1, 2)]), 4).unwrap();
        assert_eq!(
            seats,
            vec![Seat { row: 1, col: 2 }, Seat { row: 2, col: 2 }]
        );
    }

    #[test]
    fn rejects_bad_seats_naming_the_field() {
        let cases: &[(&[(i64, i64)], &str)] = &[
            (&[], "seats"),
            (&[(1, 2), (1, 3), (1, 4), (2, 1), (2, 2)], "seats"),
            (&[(0, 1)], "seats[0].row"),
            (&[(1, 2), (4, 1)], "seats[1].row"),
            (&[(1, 5)], "seats[0].col"),
            (&[(1, i64::MAX)], "seats[0].col"),
            (&[(1, 1)], "seats[0]"),
            (&[(2, 2), (2, 2)], "seats[1]"),
        ];
        for (seats, field) in cases {
            match validate_seats(&schedule(), &req(seats), 4) {
                Err(HoldError::InvalidRequest { field: f, .. }) => {
                    assert_eq!(&f, field, "{seats:?}")
                }
                other => panic!("{seats:?}: {other:?}"),
            }
        }
    }
}
