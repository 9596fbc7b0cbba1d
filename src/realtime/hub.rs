//! A broadcast channel per schedule that has viewers on this replica, and
//! the schedule's writer task once a stream can be written directly (see
//! [`super::direct`]).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::broadcast;

use super::direct::{self, GoDirect, Lane, Lanes};
use super::Frame;
use crate::events::SeatEvent;

/// What a schedule's channel carries.
#[derive(Debug, Clone)]
pub enum HubMessage {
    /// A seat event, framed once for every subscriber.
    Event(Arc<Frame>),
    /// Continuity was lost (the relay could not replay a gap): subscribers
    /// tell their clients to reload the snapshot.
    Resync,
}

struct HubEntry {
    tx: broadcast::Sender<HubMessage>,
    /// Lowest event id that every subscriber is known to have reached (or
    /// will reach from its queue). After the listener reconnects the relay
    /// replays from here, so nobody misses what was committed meanwhile.
    low_water: Option<i64>,
    /// Streams whose sockets the schedule's writer may write to.
    lanes: Lanes,
    /// Whether the writer task runs: it holds one receiver of `tx`.
    writer: bool,
}

/// The per-schedule channels of this replica. A schedule's channel exists
/// while it has subscribers and is dropped with the last one.
#[derive(Clone)]
pub struct ScheduleHubs {
    inner: Arc<Mutex<HashMap<i64, HubEntry>>>,
    /// Events a subscriber may fall behind before it is cut off. A cut-off
    /// client reconnects with `Last-Event-ID` and replays from the log, so
    /// this bounds memory without losing anything.
    capacity: usize,
    /// Bumped each time the listener (re)connects, before it replays gaps:
    /// a stream that sees it change while subscribing replays for itself.
    generation: Arc<AtomicU64>,
    /// Set once at shutdown: every channel is gone and none is made again.
    closed: Arc<AtomicBool>,
}

impl ScheduleHubs {
    pub fn new(capacity: usize) -> Self {
        Self {
            inner: Arc::default(),
            capacity,
            generation: Arc::default(),
            closed: Arc::default(),
        }
    }

    /// Ends every stream (at shutdown): each gets what is already queued
    /// for it, then the end. A stream that subscribes later ends at once.
    /// Streams end through their channel rather than each watching the
    /// shutdown token, whose one lock every stream would take per event.
    pub fn close(&self) {
        let mut map = self.lock();
        self.closed.store(true, Ordering::SeqCst);
        map.clear();
    }

    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::SeqCst)
    }

    /// Called by the listener once LISTEN is in place, before it replays.
    pub fn begin_generation(&self) {
        self.generation.fetch_add(1, Ordering::SeqCst);
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<i64, HubEntry>> {
        // A panic while holding this lock cannot leave the map half-updated.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn subscribe(&self, schedule_id: i64) -> Subscription {
        let mut map = self.lock();
        if self.closed.load(Ordering::SeqCst) {
            return Subscription {
                rx: None,
                schedule_id,
                hubs: self.clone(),
            };
        }
        let entry = map.entry(schedule_id).or_insert_with(|| HubEntry {
            tx: broadcast::channel(self.capacity).0,
            low_water: None,
            lanes: Lanes::default(),
            writer: false,
        });
        Subscription {
            rx: Some(entry.tx.subscribe()),
            schedule_id,
            hubs: self.clone(),
        }
    }

    /// Lets the schedule's writer task write to `lane` when its stream goes
    /// direct (see [`direct`]); starts the writer with the first lane.
    /// `false` when the schedule has no channel (shutdown closed it).
    pub fn register_lane(&self, schedule_id: i64, lane: Arc<Lane>) -> bool {
        let mut map = self.lock();
        let Some(entry) = map.get_mut(&schedule_id) else {
            return false;
        };
        {
            let mut lanes = entry.lanes.lock().unwrap_or_else(|p| p.into_inner());
            if lanes.len() == lanes.capacity() {
                // Before it grows: the writer prunes only when events come.
                lanes.retain(|l| !l.is_gone());
            }
            lanes.push(lane);
        }
        if !entry.writer {
            entry.writer = true;
            // Subscribed here, under the lock, before any lane can go
            // direct: the writer sees every event a direct lane waits for.
            tokio::spawn(direct::write_loop(
                entry.tx.subscribe(),
                entry.lanes.clone(),
            ));
        }
        true
    }

    /// Records where a new subscriber starts, see [`HubEntry::low_water`].
    pub fn register_position(&self, schedule_id: i64, position: i64) {
        if let Some(entry) = self.lock().get_mut(&schedule_id) {
            entry.low_water = Some(entry.low_water.map_or(position, |lw| lw.min(position)));
        }
    }

    /// Sends an event to the schedule's subscribers, if it has any.
    pub fn publish(&self, event: &SeatEvent) {
        if !self.lock().contains_key(&event.schedule_id) {
            return;
        }
        let frame = Arc::new(Frame::of(event));
        let mut map = self.lock();
        if let Some(entry) = map.get_mut(&event.schedule_id) {
            entry.low_water = entry.low_water.map(|lw| lw.max(event.event_id));
            // No receivers is not an error: the last one may have just left.
            let _ = entry.tx.send(HubMessage::Event(frame));
        }
    }

    pub fn resync(&self, schedule_id: i64) {
        if let Some(entry) = self.lock().get(&schedule_id) {
            let _ = entry.tx.send(HubMessage::Resync);
        }
    }

    /// Schedules with subscribers and the position to replay from.
    pub fn active(&self) -> Vec<(i64, Option<i64>)> {
        self.lock()
            .iter()
            .map(|(id, e)| (*id, e.low_water))
            .collect()
    }

    /// Number of schedules with a live channel.
    pub fn channel_count(&self) -> usize {
        self.lock().len()
    }

    fn release(&self, schedule_id: i64) {
        let mut map = self.lock();
        if map
            .get(&schedule_id)
            .is_some_and(|e| e.tx.receiver_count() <= usize::from(e.writer))
        {
            map.remove(&schedule_id);
        }
    }
}

/// One client's receiver. Dropping it removes the schedule's channel when it
/// was the last.
pub struct Subscription {
    rx: Option<broadcast::Receiver<HubMessage>>,
    schedule_id: i64,
    hubs: ScheduleHubs,
}

impl Subscription {
    pub async fn recv(&mut self) -> Result<HubMessage, broadcast::error::RecvError> {
        match self.rx.as_mut() {
            Some(rx) => rx.recv().await,
            None => Err(broadcast::error::RecvError::Closed),
        }
    }

    pub fn schedule_id(&self) -> i64 {
        self.schedule_id
    }

    /// See [`Lane::try_go_direct`].
    pub fn go_direct(&mut self, lane: &Lane, pos: i64) -> GoDirect {
        match self.rx.as_mut() {
            Some(rx) => lane.try_go_direct(rx, pos),
            None => GoDirect::NotNow,
        }
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        // The receiver must be gone before the count is checked.
        drop(self.rx.take());
        self.hubs.release(self.schedule_id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::realtime::test_event as event;

    #[tokio::test]
    async fn channel_lives_exactly_as_long_as_its_subscribers() {
        let hubs = ScheduleHubs::new(8);
        let mut a = hubs.subscribe(1);
        let b = hubs.subscribe(1);
        assert_eq!(hubs.channel_count(), 1);
        hubs.publish(&event(1));
        match a.recv().await.unwrap() {
            HubMessage::Event(f) => assert_eq!(f.id, 1),
            other => panic!("{other:?}"),
        }
        drop(a);
        assert_eq!(hubs.channel_count(), 1);
        drop(b);
        assert_eq!(hubs.channel_count(), 0);
    }

    #[tokio::test]
    async fn low_water_is_min_of_positions_then_follows_publishes() {
        let hubs = ScheduleHubs::new(8);
        let _s = hubs.subscribe(1);
        hubs.register_position(1, 7);
        hubs.register_position(1, 5);
        assert_eq!(hubs.active(), vec![(1, Some(5))]);
        hubs.publish(&event(9));
        assert_eq!(hubs.active(), vec![(1, Some(9))]);
    }

    #[tokio::test]
    async fn close_ends_every_subscription_after_what_was_queued() {
        let hubs = ScheduleHubs::new(8);
        let mut s = hubs.subscribe(1);
        hubs.publish(&event(1));
        hubs.close();
        assert!(matches!(s.recv().await, Ok(HubMessage::Event(_))));
        assert!(matches!(
            s.recv().await,
            Err(broadcast::error::RecvError::Closed)
        ));
        let mut late = hubs.subscribe(1);
        assert!(matches!(
            late.recv().await,
            Err(broadcast::error::RecvError::Closed)
        ));
        assert_eq!(hubs.channel_count(), 0);
    }

    #[tokio::test]
    async fn a_slow_subscriber_lags_instead_of_growing() {
        let hubs = ScheduleHubs::new(4);
        let mut s = hubs.subscribe(1);
        for id in 1..=10 {
            hubs.publish(&event(id));
        }
        assert!(matches!(
            s.recv().await,
            Err(broadcast::error::RecvError::Lagged(_))
        ));
    }
}
