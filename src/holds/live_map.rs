//! A live seat map per hot showing, on every replica, so that a start
//! doomed to `409 seats_taken` is answered without the database.
//!
//! Every replica already receives every seat event through its LISTEN
//! connection. A map is loaded from the database on first use (one read: the
//! held and sold seats with their holders and expiries, the event id they
//! reflect, and the database clock), then kept current by the relay. It is
//! trusted only while it has no gap: events must follow one another by id
//! (ids are dense per showing), a listener reconnect drops every map, and a
//! map unused for a while is dropped too.
//!
//! The guarantee: a `409` answered from a map names seats that were held or
//! sold at a committed state at most one notification delay old, and never a
//! seat that is free by the database clock. A seat counts as taken only when
//! it is sold, or held by another user until a time that the database clock
//! cannot have reached yet (bounded from above by the clock reading taken at
//! load). Anything else (a hold near its expiry, the user's own hold, a hold
//! whose expiry the map does not know, a seat the map has not seen, no map)
//! goes to the transaction, and a `201` only ever comes from the database.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use uuid::Uuid;

use super::allocate::FreeMap;
use super::SeatStore;
use crate::events::{SeatAction, SeatEvent};
use crate::schedules::{Schedule, Seat};

/// How far past the clock bound a hold must last to count as taken: covers
/// the clock drifting between loads.
const EXPIRY_MARGIN_MICROS: i64 = 500_000;

/// Far longer than a notification takes to come back.
const RELEASED_HERE_WAIT: Duration = Duration::from_secs(5);

/// What a map knows of a seat that is not free.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Taken {
    /// Sold; to whom, when the map knows.
    Sold { owner: Option<Uuid> },
    /// Held; by whom and until when (database clock, microseconds), when
    /// the event that said so carried it.
    Held {
        holder: Option<Uuid>,
        expires_at_micros: Option<i64>,
    },
}

/// The held and sold seats of a showing as one database read saw them.
#[derive(Debug, Clone)]
pub struct MapSnapshot {
    pub last_event_id: i64,
    /// Seat, its holder or buyer, and for a hold its expiry (microseconds);
    /// no expiry: sold.
    pub seats: Vec<(Seat, Uuid, Option<i64>)>,
    /// The database clock during the read, microseconds since the epoch.
    pub db_now_micros: i64,
}

enum ShowMap {
    /// Being loaded: events relayed meanwhile wait here, so none falls
    /// between the read and the map.
    Loading {
        buffered: Vec<SeatEvent>,
    },
    Live(LiveShow),
}

struct LiveShow {
    last_event_id: i64,
    taken: HashMap<Seat, Taken>,
    /// Seats this replica released itself whose `RELEASED` has not come
    /// back through the relay yet, with the last event id seen when they
    /// were released and when to stop waiting for it: until then they are
    /// the database's to answer, so a user who cancels and picks the same
    /// seats again is never refused by a map a few milliseconds old.
    released_here: HashMap<Seat, (i64, Instant)>,
    /// Upper bound of (database clock - this replica's clock), microseconds.
    clock_ahead_micros: i64,
    last_used: Instant,
}

/// What a map can say of one seat for one user.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Certainty {
    /// Sold to, or held long enough by, someone else.
    Taken,
    /// Not taken at the map's state.
    Free,
    /// The user's own seat, a hold near its expiry, a seat released here
    /// whose event has not come back, or an owner the map does not know.
    Unsure,
}

/// Why a map could not decide.
enum Undecided {
    Ask,
    Load,
}

impl From<Undecided> for Verdict {
    fn from(u: Undecided) -> Self {
        match u {
            Undecided::Ask => Verdict::AskTheDatabase,
            Undecided::Load => Verdict::Load,
        }
    }
}

impl From<Undecided> for BestVerdict {
    fn from(u: Undecided) -> Self {
        match u {
            Undecided::Ask => BestVerdict::AskTheDatabase,
            Undecided::Load => BestVerdict::Load,
        }
    }
}

/// What a map says about a best-available start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BestVerdict {
    /// No block of the party's size, even counting uncertain seats free:
    /// `409 no_seats_together` with this `largestBlock`.
    NoBlock {
        largest: u16,
    },
    AskTheDatabase,
    Load,
}

impl LiveShow {
    /// `db_now_bound`: an upper bound of the database clock now.
    fn certainty(&self, seat: &Seat, user: Uuid, db_now_bound: i64) -> Certainty {
        if self.released_here.contains_key(seat) {
            return Certainty::Unsure;
        }
        match self.taken.get(seat) {
            None => Certainty::Free,
            Some(Taken::Sold { owner: Some(owner) }) if *owner != user => Certainty::Taken,
            Some(Taken::Held {
                holder: Some(holder),
                expires_at_micros: Some(expires),
            }) if *holder != user && *expires > db_now_bound + EXPIRY_MARGIN_MICROS => {
                Certainty::Taken
            }
            Some(Taken::Held { .. } | Taken::Sold { .. }) => Certainty::Unsure,
        }
    }

    /// Applies the next event; false when it is not the next (a gap).
    fn apply(&mut self, event: &SeatEvent) -> bool {
        if event.event_id <= self.last_event_id {
            return true;
        }
        if event.event_id != self.last_event_id + 1 {
            return false;
        }
        for seat in &event.seats {
            if self
                .released_here
                .get(seat)
                .is_some_and(|(seen, _)| event.event_id > *seen)
            {
                self.released_here.remove(seat);
            }
            match event.action {
                SeatAction::Occupied => {
                    self.taken.insert(
                        *seat,
                        Taken::Held {
                            holder: event.holder,
                            expires_at_micros: event.expires_at_micros,
                        },
                    );
                }
                SeatAction::Confirmed => {
                    let held_by = match self.taken.get(seat) {
                        Some(Taken::Held { holder, .. }) => *holder,
                        _ => None,
                    };
                    let owner = event.holder.or(held_by);
                    self.taken.insert(*seat, Taken::Sold { owner });
                }
                SeatAction::Released => {
                    self.taken.remove(seat);
                }
            }
        }
        self.last_event_id = event.event_id;
        true
    }
}

/// What a map says about a start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// These of the requested seats are taken, and every other requested
    /// seat is known free: `409 seats_taken` with exactly these.
    Taken(Vec<Seat>),
    /// Only the transaction can say.
    AskTheDatabase,
    /// As above, and there is no map yet: load one.
    Load,
}

/// The live maps of this replica.
#[derive(Clone)]
pub struct LiveMaps {
    maps: Arc<Mutex<HashMap<i64, ShowMap>>>,
    /// Whether the LISTEN connection is up: no map is trusted otherwise.
    listener_up: Arc<AtomicBool>,
}

impl LiveMaps {
    pub fn new(listener_up: Arc<AtomicBool>) -> Self {
        Self {
            maps: Arc::default(),
            listener_up,
        }
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<i64, ShowMap>> {
        self.maps.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Decides a start of `user` for `seats` (sorted) if the map can;
    /// `now_micros` is this replica's clock.
    pub fn verdict(
        &self,
        schedule_id: i64,
        user: Uuid,
        seats: &[Seat],
        now_micros: i64,
    ) -> Verdict {
        self.with_live(schedule_id, now_micros, |show, bound| {
            let mut taken = Vec::new();
            for seat in seats {
                match show.certainty(seat, user, bound) {
                    Certainty::Taken => taken.push(*seat),
                    Certainty::Free => {}
                    Certainty::Unsure => return Verdict::AskTheDatabase,
                }
            }
            if taken.is_empty() {
                Verdict::AskTheDatabase
            } else {
                Verdict::Taken(taken)
            }
        })
    }

    /// Decides a best-available start if the map can: doomed when no block
    /// of `quantity` is free even counting every seat the map is unsure of
    /// as free. Then `Taken` is empty and `largest_block` the longest run
    /// free on that count.
    pub fn best_available_verdict(
        &self,
        schedule: &Schedule,
        user: Uuid,
        quantity: u16,
        now_micros: i64,
    ) -> BestVerdict {
        self.with_live(schedule.id, now_micros, |show, bound| {
            let grid = schedule.grid();
            let surely_taken = show
                .taken
                .keys()
                .filter(|seat| show.certainty(seat, user, bound) == Certainty::Taken)
                .copied();
            let free = FreeMap::new(
                grid.rows as i16,
                grid.cols as i16,
                schedule.blocked.iter().copied().chain(surely_taken),
            );
            let largest = free.largest_block();
            if largest < quantity {
                BestVerdict::NoBlock { largest }
            } else {
                BestVerdict::AskTheDatabase
            }
        })
    }

    fn with_live<T: From<Undecided>>(
        &self,
        schedule_id: i64,
        now_micros: i64,
        decide: impl FnOnce(&LiveShow, i64) -> T,
    ) -> T {
        if !self.listener_up.load(Ordering::SeqCst) {
            return Undecided::Ask.into();
        }
        let mut maps = self.lock();
        let show = match maps.get_mut(&schedule_id) {
            None => return Undecided::Load.into(),
            Some(ShowMap::Loading { .. }) => return Undecided::Ask.into(),
            Some(ShowMap::Live(show)) => show,
        };
        show.last_used = Instant::now();
        show.released_here
            .retain(|_, (_, until)| *until > Instant::now());
        decide(show, now_micros + show.clock_ahead_micros)
    }

    /// Marks a map as loading; false when one exists or is loading already.
    pub fn begin_load(&self, schedule_id: i64) -> bool {
        let mut maps = self.lock();
        if maps.contains_key(&schedule_id) {
            return false;
        }
        maps.insert(
            schedule_id,
            ShowMap::Loading {
                buffered: Vec::new(),
            },
        );
        true
    }

    /// Installs the map read as `snapshot` (read after [`Self::begin_load`]),
    /// with the events relayed since. `read_started_micros` is this
    /// replica's clock when the read was sent.
    pub fn finish_load(&self, schedule_id: i64, snapshot: MapSnapshot, read_started_micros: i64) {
        let mut maps = self.lock();
        let Some(ShowMap::Loading { buffered }) = maps.remove(&schedule_id) else {
            // Dropped meanwhile (a listener reconnect): start over later.
            return;
        };
        let mut show = LiveShow {
            last_event_id: snapshot.last_event_id,
            taken: snapshot
                .seats
                .into_iter()
                .map(|(seat, owner, expires)| {
                    let state = match expires {
                        None => Taken::Sold { owner: Some(owner) },
                        Some(expires) => Taken::Held {
                            holder: Some(owner),
                            expires_at_micros: Some(expires),
                        },
                    };
                    (seat, state)
                })
                .collect(),
            // The read happened after it was sent: the database clock was
            // at most this far ahead of ours.
            clock_ahead_micros: snapshot.db_now_micros - read_started_micros,
            released_here: HashMap::new(),
            last_used: Instant::now(),
        };
        if buffered.iter().all(|e| show.apply(e)) {
            maps.insert(schedule_id, ShowMap::Live(show));
        }
    }

    /// Loads the showing's map in the background, unless one exists or is
    /// loading.
    pub fn load(&self, store: Arc<dyn SeatStore>, schedule_id: i64) {
        if !self.begin_load(schedule_id) {
            return;
        }
        let maps = self.clone();
        tokio::spawn(async move {
            let started = chrono::Utc::now().timestamp_micros();
            match store.map_snapshot(schedule_id).await {
                Ok(snapshot) => maps.finish_load(schedule_id, snapshot, started),
                Err(e) => {
                    tracing::debug!(schedule_id, error = %e, "live seat map not loaded");
                    maps.abandon_load(schedule_id);
                }
            }
        });
    }

    /// Gives up a load that failed.
    pub fn abandon_load(&self, schedule_id: i64) {
        let mut maps = self.lock();
        if matches!(maps.get(&schedule_id), Some(ShowMap::Loading { .. })) {
            maps.remove(&schedule_id);
        }
    }

    /// Feeds a relayed event to its showing's map, if it has one. A gap
    /// drops the map: it is reloaded on a later start.
    pub fn relay(&self, event: &SeatEvent) {
        let mut maps = self.lock();
        let gap = match maps.get_mut(&event.schedule_id) {
            None => false,
            Some(ShowMap::Loading { buffered }) => {
                buffered.push(event.clone());
                false
            }
            Some(ShowMap::Live(show)) => !show.apply(event),
        };
        if gap {
            maps.remove(&event.schedule_id);
            metrics::counter!("seatsync_live_map_gaps_total").increment(1);
        }
    }

    /// Notes seats this replica has just released (a cancel it committed):
    /// the map leaves them to the database until their `RELEASED` event
    /// arrives, or for at most `RELEASED_HERE_WAIT`.
    pub fn released_here(&self, schedule_id: i64, seats: &[Seat]) {
        if let Some(ShowMap::Live(show)) = self.lock().get_mut(&schedule_id) {
            let until = Instant::now() + RELEASED_HERE_WAIT;
            for seat in seats {
                show.released_here
                    .insert(*seat, (show.last_event_id, until));
            }
        }
    }

    /// Notes a hold this replica has just committed, ahead of its `OCCUPIED`
    /// event, so that the next start here already sees it (the event, when
    /// it comes, says the same).
    pub fn held_here(
        &self,
        schedule_id: i64,
        seats: &[Seat],
        holder: Uuid,
        expires_at_micros: i64,
    ) {
        if let Some(ShowMap::Live(show)) = self.lock().get_mut(&schedule_id) {
            for seat in seats {
                show.released_here.remove(seat);
                show.taken.insert(
                    *seat,
                    Taken::Held {
                        holder: Some(holder),
                        expires_at_micros: Some(expires_at_micros),
                    },
                );
            }
        }
    }

    /// Drops every map: called when the listener (re)connects, since
    /// notifications sent while it was down are gone.
    pub fn reset(&self) {
        self.lock().clear();
    }

    /// Drops maps no start has used for `quiet`.
    pub fn forget_quiet(&self, quiet: Duration) {
        self.lock().retain(|_, map| match map {
            ShowMap::Loading { .. } => true,
            ShowMap::Live(show) => show.last_used.elapsed() < quiet,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECOND: i64 = 1_000_000;

    fn seat(row: i16, col: i16) -> Seat {
        Seat { row, col }
    }

    fn event(id: i64, action: SeatAction, seats: &[Seat], hold: Option<(Uuid, i64)>) -> SeatEvent {
        SeatEvent {
            schedule_id: 1,
            event_id: id,
            action,
            seats: seats.to_vec(),
            at_micros: None,
            holder: hold.map(|h| h.0),
            expires_at_micros: hold.map(|h| h.1),
        }
    }

    fn loaded(seats: Vec<(Seat, Uuid, Option<i64>)>, last: i64) -> LiveMaps {
        let maps = LiveMaps::new(Arc::new(AtomicBool::new(true)));
        assert!(maps.begin_load(1));
        maps.finish_load(
            1,
            MapSnapshot {
                last_event_id: last,
                seats,
                db_now_micros: 1000 * SECOND,
            },
            1000 * SECOND,
        );
        maps
    }

    #[test]
    fn sold_and_long_held_seats_are_taken_everything_else_asks() {
        let (alice, bob) = (Uuid::new_v4(), Uuid::new_v4());
        let now = 1000 * SECOND;
        let maps = loaded(
            vec![
                (seat(1, 1), Uuid::new_v4(), None),
                (seat(1, 2), alice, Some(now + 60 * SECOND)),
                (seat(1, 3), alice, Some(now + SECOND / 10)),
            ],
            5,
        );
        let verdict = |user, seats: &[Seat]| maps.verdict(1, user, seats, now);
        assert_eq!(
            verdict(bob, &[seat(1, 1), seat(2, 1)]),
            Verdict::Taken(vec![seat(1, 1)])
        );
        assert_eq!(
            verdict(bob, &[seat(1, 2)]),
            Verdict::Taken(vec![seat(1, 2)])
        );
        // Her own hold: the database says booking_in_progress.
        assert_eq!(verdict(alice, &[seat(1, 2)]), Verdict::AskTheDatabase);
        // About to expire: it may be free by the database clock.
        assert_eq!(
            verdict(bob, &[seat(1, 1), seat(1, 3)]),
            Verdict::AskTheDatabase
        );
        assert_eq!(verdict(bob, &[seat(2, 2)]), Verdict::AskTheDatabase);
        assert_eq!(maps.verdict(2, bob, &[seat(1, 1)], now), Verdict::Load);
    }

    #[test]
    fn events_keep_it_current_and_a_gap_drops_it() {
        let (alice, bob) = (Uuid::new_v4(), Uuid::new_v4());
        let now = 1000 * SECOND;
        let maps = loaded(vec![], 5);
        let later = now + 300 * SECOND;
        maps.relay(&event(
            6,
            SeatAction::Occupied,
            &[seat(1, 1)],
            Some((alice, later)),
        ));
        assert_eq!(
            maps.verdict(1, bob, &[seat(1, 1)], now),
            Verdict::Taken(vec![seat(1, 1)])
        );
        maps.relay(&event(7, SeatAction::Released, &[seat(1, 1)], None));
        assert_eq!(
            maps.verdict(1, bob, &[seat(1, 1)], now),
            Verdict::AskTheDatabase
        );
        // Already applied: ignored. Event 9 without 8: the map is dropped.
        maps.relay(&event(
            7,
            SeatAction::Occupied,
            &[seat(1, 1)],
            Some((alice, later)),
        ));
        maps.relay(&event(9, SeatAction::Confirmed, &[seat(1, 2)], None));
        assert_eq!(maps.verdict(1, bob, &[seat(1, 2)], now), Verdict::Load);
    }

    #[test]
    fn seats_released_here_are_the_databases_until_their_event_comes_back() {
        let (alice, bob) = (Uuid::new_v4(), Uuid::new_v4());
        let now = 1000 * SECOND;
        let maps = loaded(vec![(seat(1, 1), alice, Some(now + 60 * SECOND))], 5);
        maps.released_here(1, &[seat(1, 1)]);
        assert_eq!(
            maps.verdict(1, bob, &[seat(1, 1)], now),
            Verdict::AskTheDatabase
        );
        // Another seat's event does not settle it; its RELEASED does.
        maps.relay(&event(
            6,
            SeatAction::Occupied,
            &[seat(2, 2)],
            Some((bob, now + 60 * SECOND)),
        ));
        assert_eq!(
            maps.verdict(1, alice, &[seat(1, 1)], now),
            Verdict::AskTheDatabase
        );
        maps.relay(&event(7, SeatAction::Released, &[seat(1, 1)], None));
        maps.relay(&event(
            8,
            SeatAction::Occupied,
            &[seat(1, 1)],
            Some((alice, now + 60 * SECOND)),
        ));
        assert_eq!(
            maps.verdict(1, bob, &[seat(1, 1)], now),
            Verdict::Taken(vec![seat(1, 1)])
        );
    }

    #[test]
    fn a_full_hall_refuses_a_party_only_when_no_block_could_be_free() {
        let (alice, bob) = (Uuid::new_v4(), Uuid::new_v4());
        let now = 1000 * SECOND;
        let hall = Schedule {
            id: 1,
            title: "t".into(),
            starts_at: chrono::Utc::now(),
            rows: 1,
            cols: 4,
            blocked: vec![seat(1, 4)],
        };
        let long = now + 60 * SECOND;
        let maps = loaded(
            vec![(seat(1, 1), alice, None), (seat(1, 3), alice, Some(long))],
            5,
        );
        // Seat 2 alone is free: a pair is doomed, the largest block is 1.
        assert_eq!(
            maps.best_available_verdict(&hall, bob, 2, now),
            BestVerdict::NoBlock { largest: 1 }
        );
        assert_eq!(
            maps.best_available_verdict(&hall, bob, 1, now),
            BestVerdict::AskTheDatabase
        );
        // Her own seats may be hers again (an idempotent replay): unsure,
        // so counted free, and a pair might fit.
        assert_eq!(
            maps.best_available_verdict(&hall, alice, 2, now),
            BestVerdict::AskTheDatabase
        );
    }

    #[test]
    fn events_during_the_load_are_applied_after_it() {
        let (alice, bob) = (Uuid::new_v4(), Uuid::new_v4());
        let now = 1000 * SECOND;
        let maps = LiveMaps::new(Arc::new(AtomicBool::new(true)));
        assert!(maps.begin_load(1));
        assert!(!maps.begin_load(1));
        // 4 is in the read, 5 came after it.
        maps.relay(&event(
            4,
            SeatAction::Occupied,
            &[seat(1, 1)],
            Some((alice, now + 60 * SECOND)),
        ));
        maps.relay(&event(5, SeatAction::Confirmed, &[seat(1, 1)], None));
        assert_eq!(
            maps.verdict(1, bob, &[seat(1, 1)], now),
            Verdict::AskTheDatabase
        );
        maps.finish_load(
            1,
            MapSnapshot {
                last_event_id: 4,
                seats: vec![(seat(1, 1), alice, Some(now + 60 * SECOND))],
                db_now_micros: now,
            },
            now,
        );
        assert_eq!(
            maps.verdict(1, bob, &[seat(1, 1)], now),
            Verdict::Taken(vec![seat(1, 1)])
        );
    }

    #[test]
    fn nothing_is_trusted_while_the_listener_is_down_or_after_it_reconnects() {
        let bob = Uuid::new_v4();
        let up = Arc::new(AtomicBool::new(true));
        let maps = LiveMaps::new(up.clone());
        assert!(maps.begin_load(1));
        maps.finish_load(
            1,
            MapSnapshot {
                last_event_id: 1,
                seats: vec![(seat(1, 1), Uuid::new_v4(), None)],
                db_now_micros: 0,
            },
            0,
        );
        up.store(false, Ordering::SeqCst);
        assert_eq!(
            maps.verdict(1, bob, &[seat(1, 1)], 0),
            Verdict::AskTheDatabase
        );
        up.store(true, Ordering::SeqCst);
        maps.reset();
        assert_eq!(maps.verdict(1, bob, &[seat(1, 1)], 0), Verdict::Load);
    }
}
