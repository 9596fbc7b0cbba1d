//! Seat maps kept the way the page keeps them, and a script of changes
//! that feeds them.

use std::collections::BTreeMap;
use std::time::Duration;

use super::{LoggedEvent, Replica, SseClient, SseFrame};

/// Applies events to a seat map the way a browser does.
pub fn apply(map: &mut BTreeMap<(i64, i64), String>, action: &str, seats: &[(i64, i64)]) {
    for s in seats {
        match action {
            "RELEASED" => {
                map.remove(s);
            }
            a => {
                map.insert(*s, a.to_owned());
            }
        }
    }
}

/// The seat map that `events` produce from an empty one.
pub fn replayed_map(events: &[LoggedEvent]) -> BTreeMap<(i64, i64), String> {
    let mut map = BTreeMap::new();
    for e in events {
        let seats: Vec<(i64, i64)> = e.seats.iter().copied().collect();
        apply(&mut map, &e.action, &seats);
    }
    map
}

/// A client that keeps a seat map the way the page does: snapshot plus the
/// events after it, checking that ids are dense (no gap, no duplicate).
pub struct SeatMapClient {
    pub name: String,
    pub schedule: i64,
    pub sse: SseClient,
    pub map: BTreeMap<(i64, i64), String>,
    /// Every event up to here is reflected in `map`.
    pub applied_upto: i64,
    /// The id of the last event received, None until the first one after
    /// subscribing live or after a resync.
    pub last_id: Option<i64>,
    pub resyncs: usize,
    pub events: usize,
}

impl SeatMapClient {
    /// Snapshot (from `snap`) first, then the stream (from `streamer`)
    /// resumed at the snapshot's lastEventId.
    pub async fn snapshot_then_stream(
        name: &str,
        snap: &Replica,
        streamer: &Replica,
        schedule: i64,
    ) -> Self {
        let (last, map) = snap.snapshot(schedule).await;
        let sse = streamer.subscribe(schedule, Some(&last.to_string())).await;
        Self::new(name, schedule, sse, (last, map), Some(last))
    }

    /// The stream first (live, no Last-Event-ID), then the snapshot: events
    /// at or below its lastEventId are already in it.
    pub async fn stream_then_snapshot(
        name: &str,
        snap: &Replica,
        streamer: &Replica,
        schedule: i64,
    ) -> Self {
        let sse = streamer.subscribe(schedule, None).await;
        let snapshot = snap.snapshot(schedule).await;
        Self::new(name, schedule, sse, snapshot, None)
    }

    fn new(
        name: &str,
        schedule: i64,
        sse: SseClient,
        (last, map): (i64, BTreeMap<(i64, i64), String>),
        last_id: Option<i64>,
    ) -> Self {
        SeatMapClient {
            name: name.into(),
            schedule,
            sse,
            map,
            applied_upto: last,
            last_id,
            resyncs: 0,
            events: 0,
        }
    }

    /// Reconnects to `streamer` with the last event id it has, as
    /// EventSource does.
    pub async fn reconnect(&mut self, streamer: &Replica) {
        let last = self.applied_upto.to_string();
        self.sse = streamer.subscribe(self.schedule, Some(&last)).await;
        self.last_id = Some(self.applied_upto);
    }

    /// Applies one frame. A resync reloads the snapshot from `resync_from`;
    /// without one a resync is a failure.
    pub async fn apply_frame(&mut self, frame: SseFrame, resync_from: Option<&Replica>) {
        match frame {
            SseFrame::Event { id, action, seats } => {
                match self.last_id {
                    Some(last) => assert_eq!(
                        id,
                        last + 1,
                        "{}: event {id} after {last}: a gap or a duplicate",
                        self.name
                    ),
                    // Subscribed before the snapshot was taken: nothing after
                    // the snapshot may be missing.
                    None => assert!(
                        id <= self.applied_upto + 1,
                        "{}: first event {id}, but the snapshot is at {}",
                        self.name,
                        self.applied_upto
                    ),
                }
                self.last_id = Some(id);
                self.events += 1;
                if id > self.applied_upto {
                    apply(&mut self.map, &action, &seats);
                    self.applied_upto = id;
                }
            }
            SseFrame::Resync => {
                let Some(r) = resync_from else {
                    panic!("{}: unexpected resync", self.name);
                };
                self.resyncs += 1;
                let (last, map) = r.snapshot(self.schedule).await;
                self.map = map;
                self.applied_upto = last;
                self.last_id = None;
            }
            SseFrame::Comment | SseFrame::Retry(_) => {}
        }
    }

    /// Reads until the map reflects event `upto`; panics at the deadline.
    pub async fn catch_up(&mut self, upto: i64, timeout: Duration, resync_from: Option<&Replica>) {
        let deadline = tokio::time::Instant::now() + timeout;
        while self.applied_upto < upto {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.sse.next_event(left).await {
                Some(f) => self.apply_frame(f, resync_from).await,
                None => panic!(
                    "{}: stuck at event {} (want {upto}) after {timeout:?}",
                    self.name, self.applied_upto
                ),
            }
        }
    }
}

/// Makes one seat event per `step`: a hold of two fresh seats, then the
/// confirm (every third step) or the cancel of that hold. Needs a grid of
/// at least 10 x 20; seats stay distinct for the first 100 steps.
#[derive(Default)]
pub struct ChangeScript {
    n: i64,
    pending: Option<(String, String)>,
}

impl ChangeScript {
    pub fn new() -> Self {
        Self::default()
    }

    pub async fn step(&mut self, r: &Replica, schedule: i64) {
        self.n += 1;
        match self.pending.take() {
            None => {
                let token = r.guest().await;
                let (row, col) = (1 + self.n % 10, 1 + 2 * ((self.n / 10) % 10));
                let resp = r
                    .start(&token, schedule, &[(row, col), (row, col + 1)])
                    .await;
                assert_eq!(resp.status, 201, "{}", resp.body);
                self.pending = Some((token, resp.booking_id()));
            }
            Some((token, id)) if self.n % 3 == 0 => {
                assert_eq!(r.confirm(&token, &id).await.status, 200)
            }
            Some((token, id)) => assert_eq!(r.cancel(&token, &id).await.status, 200),
        }
    }
}
