//! Real-time seat maps. One [`listener::ListenerRelay`] per replica LISTENs on
//! PostgreSQL and feeds [`hub::ScheduleHubs`], a broadcast channel per
//! schedule with viewers; [`stream`] turns a subscription into one browser's
//! SSE stream, replaying from [`event_log`] where a client or the relay
//! missed something.

pub mod event_log;
pub mod hub;
pub mod listener;
pub mod retention;
pub mod stream;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::holds::{Seat, SeatAction};

/// One committed seat change, as logged and as notified.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SeatEvent {
    pub schedule_id: i64,
    pub event_id: i64,
    pub action: SeatAction,
    pub seats: Vec<Seat>,
}

/// The `data:` of an SSE seat event.
#[derive(Serialize)]
struct EventData<'a> {
    action: SeatAction,
    seats: &'a [Seat],
}

/// A seat event framed for the wire once, then shared by every stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub id: i64,
    pub bytes: Bytes,
}

impl SeatEvent {
    pub fn to_frame(&self) -> Frame {
        // Serializing a struct of enums and integers cannot fail.
        let data = serde_json::to_string(&EventData {
            action: self.action,
            seats: &self.seats,
        })
        .unwrap_or_default();
        Frame {
            id: self.event_id,
            bytes: Bytes::from(format!("id: {}\ndata: {}\n\n", self.event_id, data)),
        }
    }
}

/// Sent when continuity cannot be guaranteed: the client reloads the snapshot.
pub const RESYNC_FRAME: &[u8] = b"event: resync\ndata: {}\n\n";
/// First bytes of every stream: how long EventSource waits to reconnect.
pub const RETRY_FRAME: &[u8] = b"retry: 3000\n\n";
/// Heartbeat comment, so proxies see traffic on a quiet stream.
pub const HEARTBEAT_FRAME: &[u8] = b": heartbeat\n\n";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_an_event_on_one_data_line() {
        let e = SeatEvent {
            schedule_id: 1,
            event_id: 43,
            action: SeatAction::Occupied,
            seats: vec![Seat { row: 1, col: 5 }, Seat { row: 1, col: 6 }],
        };
        assert_eq!(
            e.to_frame().bytes,
            Bytes::from_static(
                b"id: 43\ndata: {\"action\":\"OCCUPIED\",\"seats\":[{\"row\":1,\"col\":5},{\"row\":1,\"col\":6}]}\n\n"
            )
        );
    }

    #[test]
    fn parses_the_notify_payload() {
        let p = r#"{"scheduleId": 7, "eventId": 3, "action": "RELEASED", "seats": [{"col": 2, "row": 1}]}"#;
        let e: SeatEvent = serde_json::from_str(p).unwrap();
        assert_eq!(e.schedule_id, 7);
        assert_eq!(e.seats, vec![Seat { row: 1, col: 2 }]);
    }
}
