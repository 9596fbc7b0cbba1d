//! Seat events: what every seat-changing transaction appends to the log and
//! notifies on one channel, and what every replica's listener relays.

use serde::{Deserialize, Serialize};

use crate::schedules::Seat;

/// The channel every seat-changing transaction notifies and every replica
/// LISTENs on.
pub const NOTIFY_CHANNEL: &str = "seatsync_seat_events";

/// What a seat event says happened to its seats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum SeatAction {
    Occupied,
    Confirmed,
    Released,
}

impl SeatAction {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Occupied => "OCCUPIED",
            Self::Confirmed => "CONFIRMED",
            Self::Released => "RELEASED",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "OCCUPIED" => Self::Occupied,
            "CONFIRMED" => Self::Confirmed,
            "RELEASED" => Self::Released,
            _ => return None,
        })
    }
}

// Read from the `action` of the log and the `status` of seat rows.
crate::text_enum_from_sql!(SeatAction, "seat action");

/// One committed seat change, as logged and as notified (the NOTIFY payload
/// is this, in camelCase JSON).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SeatEvent {
    pub schedule_id: i64,
    pub event_id: i64,
    pub action: SeatAction,
    pub seats: Vec<Seat>,
    /// The database clock just before the change committed, in
    /// microseconds since the epoch; only notifications carry it.
    #[serde(default)]
    pub at_micros: Option<i64>,
    /// For `OCCUPIED` notifications: the holding user.
    #[serde(default)]
    pub holder: Option<uuid::Uuid>,
    /// For `OCCUPIED` notifications: when the hold expires (database clock,
    /// microseconds since the epoch).
    #[serde(default)]
    pub expires_at_micros: Option<i64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_notify_payload() {
        let p = r#"{"scheduleId": 7, "eventId": 3, "action": "RELEASED", "seats": [{"col": 2, "row": 1}], "atMicros": 5}"#;
        let e: SeatEvent = serde_json::from_str(p).unwrap();
        assert_eq!(e.schedule_id, 7);
        assert_eq!(e.at_micros, Some(5));
        assert_eq!(e.action, SeatAction::Released);
        assert_eq!(e.seats, vec![Seat { row: 1, col: 2 }]);
    }
}
