//! Real-time seat maps. One [`listener::ListenerRelay`] per replica LISTENs on
//! PostgreSQL and feeds [`hub::ScheduleHubs`], a broadcast channel per
//! schedule with viewers; [`stream`] turns a subscription into one browser's
//! SSE stream, replaying from [`event_log`] where a client or the relay
//! missed something; while a stream is caught up, its schedule's writer
//! ([`direct`]) writes the events to its socket.

pub mod direct;
pub mod event_log;
pub mod hub;
pub mod listener;
pub mod retention;
pub mod stream;

use bytes::Bytes;
use serde::Serialize;

use crate::events::{SeatAction, SeatEvent};
use crate::schedules::Seat;

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
    /// `bytes` as one HTTP/1.1 chunk, for streams written directly
    /// (see [`direct`]).
    pub chunk: Bytes,
}

impl Frame {
    pub fn of(event: &SeatEvent) -> Frame {
        // Serializing a struct of enums and integers cannot fail.
        let data = serde_json::to_string(&EventData {
            action: event.action,
            seats: &event.seats,
        })
        .unwrap_or_default();
        let bytes = format!("id: {}\ndata: {}\n\n", event.event_id, data);
        let chunk = format!("{:x}\r\n{bytes}\r\n", bytes.len());
        Frame {
            id: event.event_id,
            bytes: Bytes::from(bytes),
            chunk: Bytes::from(chunk),
        }
    }
}

/// Sent when continuity cannot be guaranteed: the client reloads the snapshot.
pub const RESYNC_FRAME: &[u8] = b"event: resync\ndata: {}\n\n";
/// First bytes of every stream: how long EventSource waits to reconnect.
pub const RETRY_FRAME: &[u8] = b"retry: 3000\n\n";
/// Heartbeat comment, so proxies see traffic on a quiet stream.
pub const HEARTBEAT_FRAME: &[u8] = b": heartbeat\n\n";

/// What the realtime modules' unit tests publish: one seat taken.
#[cfg(test)]
pub(crate) fn test_event(id: i64) -> SeatEvent {
    SeatEvent {
        schedule_id: 1,
        event_id: id,
        action: SeatAction::Occupied,
        seats: vec![Seat { row: 1, col: 1 }],
        at_micros: None,
        holder: None,
        expires_at_micros: None,
    }
}

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
            at_micros: Some(1),
            holder: None,
            expires_at_micros: None,
        };
        let frame = Frame::of(&e);
        assert_eq!(
            frame.chunk,
            Bytes::from(format!(
                "{:x}\r\n{}\r\n",
                frame.bytes.len(),
                std::str::from_utf8(&frame.bytes).unwrap()
            ))
        );
        assert_eq!(
            frame.bytes,
            Bytes::from_static(
                b"id: 43\ndata: {\"action\":\"OCCUPIED\",\"seats\":[{\"row\":1,\"col\":5},{\"row\":1,\"col\":6}]}\n\n"
            )
        );
    }
}
