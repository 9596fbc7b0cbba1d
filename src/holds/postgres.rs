//! The PostgreSQL seat store. Every change is one short transaction that
//! writes the change, appends its seat event and calls `pg_notify`, so an
//! event exists if and only if the change committed.
//!
//! Lock order, the same in every transaction, keeps them from deadlocking:
//! a start's per-user advisory lock, then booking rows (in id order), then
//! seat rows (in `(row, col)` order), then last the per-schedule event
//! counters (in schedule-id order). Nothing waits for a
//! lock while holding a counter, so counters are held only until commit.

use std::future::Future;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use postgres_types::{Json, Type};
use tokio_postgres::error::SqlState;
use tokio_postgres::Row;
use uuid::Uuid;

use super::allocate::{best_blocks, FreeMap};
use super::live_map::MapSnapshot;
use super::{
    Booking, BookingStatus, HoldError, HoldOutcome, HoldRequest, SeatChoice, SeatSnapshot,
    SeatState, SeatStore,
};
use crate::db::{Db, DbError, Sql, Statements, Tx};
use crate::events::{SeatAction, NOTIFY_CHANNEL};
use crate::schedules::{Schedule, Seat};

const INSERT_BOOKING: Sql = Sql {
    text: "INSERT INTO bookings \
       (id, schedule_id, user_id, status, seats, expires_at, idempotency_key, request_fingerprint) \
     VALUES ($1, $2, $3, 'PENDING', $4, now() + $5::int * interval '1 second', $6, $7) \
     ON CONFLICT DO NOTHING RETURNING expires_at",
    types: &[
        Type::UUID,
        Type::INT8,
        Type::UUID,
        Type::JSONB,
        Type::INT4,
        Type::TEXT,
        Type::TEXT,
    ],
};

const FIND_BY_IDEMPOTENCY_KEY: Sql = Sql {
    text: "SELECT id, schedule_id, user_id, status, seats, expires_at, request_fingerprint, \
       (status = 'PENDING' AND expires_at <= clock_timestamp()) AS overdue \
     FROM bookings WHERE user_id = $1 AND idempotency_key = $2 AND status IN ('PENDING', 'CONFIRMED') \
     FOR UPDATE",
    types: &[Type::UUID, Type::TEXT],
};

const FIND_PENDING_OF_USER: Sql = Sql {
    text: "SELECT id, (expires_at <= clock_timestamp()) AS overdue \
     FROM bookings WHERE schedule_id = $1 AND user_id = $2 AND status = 'PENDING' FOR UPDATE",
    types: &[Type::INT8, Type::UUID],
};

/// Holds seats in `(row, col)` order. A seat held by an uncommitted
/// transaction makes this wait for it; a committed one makes it skip the seat.
const INSERT_SEATS: Sql = Sql {
    text: "INSERT INTO schedule_seat_status \
       (schedule_id, row_num, col_num, booking_id, status, expires_at) \
     SELECT $1, s.r, s.c, $2, 'OCCUPIED', $3 FROM unnest($4::int2[], $5::int2[]) AS s(r, c) ORDER BY s.r, s.c \
     ON CONFLICT (schedule_id, row_num, col_num) DO NOTHING RETURNING row_num, col_num",
    types: &[Type::INT8, Type::UUID, Type::TIMESTAMPTZ, Type::INT2_ARRAY, Type::INT2_ARRAY],
};

/// One index probe per requested seat (`LATERAL ... OFFSET 0` keeps the
/// planner from turning it into a scan of every held seat of the show, which
/// it does while its statistics do not know the show yet: a sell-out would
/// then cost O(held seats) per start).
const SEAT_HOLDERS: Sql = Sql {
    text: "SELECT st.row_num, st.col_num, st.booking_id, \
       (st.status = 'OCCUPIED' AND st.expires_at <= clock_timestamp()) AS overdue, \
       (st.status = 'OCCUPIED' AND b.user_id = $4) AS own_hold \
     FROM unnest($2::int2[], $3::int2[]) AS q(r, c) \
     CROSS JOIN LATERAL (SELECT * FROM schedule_seat_status s \
       WHERE s.schedule_id = $1 AND s.row_num = q.r AND s.col_num = q.c OFFSET 0) st \
     JOIN bookings b ON b.id = st.booking_id",
    types: &[Type::INT8, Type::INT2_ARRAY, Type::INT2_ARRAY, Type::UUID],
};

/// Serializes one user's hold transactions (see `hold_attempt`). The
/// two-integer form is a key space of its own: it can never meet the
/// migration lock, which takes a single bigint key.
const LOCK_USER: Sql = Sql {
    text: "SELECT pg_advisory_xact_lock($1::int4, $2::int4)",
    types: &[Type::INT4, Type::INT4],
};
/// First key of every per-user lock, so other two-integer advisory locks
/// (of this or any other application on the database) keep out of its way.
const USER_LOCK_CLASS: i32 = 0x5ea7_0001;

/// First key of the per-show lock that best-available starts take turns on.
const SHOW_LOCK_CLASS: i32 = 0x5ea7_0002;

/// Second key of a show's lock; a collision only makes two shows' best
/// available starts take turns.
fn show_lock_key(schedule_id: i64) -> i32 {
    ((schedule_id >> 32) ^ schedule_id) as i32
}

/// Every held or sold seat of a show, with its holder and whether the hold
/// is overdue (free by the contract, not swept yet).
const SHOW_SEATS: Sql = Sql {
    text: "SELECT row_num, col_num, booking_id, \
       (status = 'OCCUPIED' AND expires_at <= clock_timestamp()) AS overdue \
     FROM schedule_seat_status WHERE schedule_id = $1",
    types: &[Type::INT8],
};

/// Candidates tried per read of the show's seats; only a start naming its
/// seats can take one first, so a second read is rarely needed.
const CANDIDATES_PER_ROUND: usize = 4;
const BEST_AVAILABLE_ROUNDS: usize = 3;

/// Second key of a user's lock. A collision between two users only
/// serializes their starts.
fn user_lock_key(user_id: Uuid) -> i32 {
    let (hi, lo) = user_id.as_u64_pair();
    let folded = hi ^ lo;
    ((folded >> 32) ^ folded) as u32 as i32
}

/// Expires one overdue hold. `clock_timestamp()`, not `now()`: after a lock
/// wait `now()` is stale and would let an overdue hold live on.
const EXPIRE_BOOKING: Sql = Sql {
    text: "UPDATE bookings SET status = 'EXPIRED', updated_at = clock_timestamp() \
     WHERE id = $1 AND status = 'PENDING' AND expires_at <= clock_timestamp() RETURNING schedule_id, seats",
    types: &[Type::UUID],
};

const DELETE_SEATS_OF: Sql = Sql {
    text: "DELETE FROM schedule_seat_status WHERE booking_id = ANY($1)",
    types: &[Type::UUID_ARRAY],
};

/// Bumps the schedule's counter (its row lock orders event ids by commit),
/// logs the event and notifies, all in one round trip. The notification
/// carries the database clock at this last statement before commit, so
/// replicas can measure how long events take to reach their clients, and
/// for a hold its holder and expiry, for the replicas' live seat maps (the
/// public stream carries neither).
const APPEND_EVENT: Sql = Sql {
    text: "WITH bumped AS ( \
       UPDATE schedule_event_counters SET last_event_id = last_event_id + 1 \
       WHERE schedule_id = $1 RETURNING last_event_id \
     ), logged AS ( \
       INSERT INTO seat_events (schedule_id, event_id, action, seats) \
       SELECT $1, last_event_id, $2, $3 FROM bumped RETURNING event_id \
     ) \
     SELECT event_id, pg_notify($4, json_build_object( \
       'scheduleId', $1::bigint, 'eventId', event_id, 'action', $2::text, 'seats', $3::jsonb, \
       'atMicros', (extract(epoch FROM clock_timestamp()) * 1000000)::bigint, \
       'holder', $5::uuid, 'expiresAtMicros', (extract(epoch FROM $6::timestamptz) * 1000000)::bigint \
     )::text)::text \
     FROM logged",
    types: &[
        Type::INT8,
        Type::TEXT,
        Type::JSONB,
        Type::TEXT,
        Type::UUID,
        Type::TIMESTAMPTZ,
    ],
};

const GET_BOOKING: Sql = Sql {
    text: "SELECT id, schedule_id, user_id, \
       CASE WHEN status = 'PENDING' AND expires_at <= clock_timestamp() THEN 'EXPIRED' ELSE status END, \
       seats, expires_at \
     FROM bookings WHERE id = $1 AND user_id = $2",
    types: &[Type::UUID, Type::UUID],
};

const LOCK_BOOKING: Sql = Sql {
    text: "SELECT id, schedule_id, user_id, status, seats, expires_at, \
       (status = 'PENDING' AND expires_at <= clock_timestamp()) AS overdue \
     FROM bookings WHERE id = $1 AND user_id = $2 FOR UPDATE",
    types: &[Type::UUID, Type::UUID],
};

const CONFIRM_BOOKING: Sql = Sql {
    text: "UPDATE bookings SET status = 'CONFIRMED', updated_at = clock_timestamp() \
     WHERE id = $1 AND user_id = $2 AND status = 'PENDING' AND expires_at > clock_timestamp() \
     RETURNING id, schedule_id, user_id, status, seats, expires_at",
    types: &[Type::UUID, Type::UUID],
};

const CONFIRM_SEATS: Sql = Sql {
    text: "UPDATE schedule_seat_status SET status = 'CONFIRMED', expires_at = NULL WHERE booking_id = $1",
    types: &[Type::UUID],
};

const CANCEL_BOOKING: Sql = Sql {
    text: "UPDATE bookings SET status = 'CANCELLED', updated_at = clock_timestamp() \
     WHERE id = $1 AND user_id = $2 AND status = 'PENDING' AND expires_at > clock_timestamp() \
     RETURNING id, schedule_id, user_id, status, seats, expires_at",
    types: &[Type::UUID, Type::UUID],
};

/// Claims overdue holds; `SKIP LOCKED` lets sweepers on every replica run at
/// once without two of them releasing the same hold or waiting on each other.
/// `(SELECT clock_timestamp())` is evaluated once, so the index scan on
/// `expires_at` can stop at the first hold not yet due (a volatile call per
/// row made every sweep read all pending holds: seconds with thousands).
const SWEEP_EXPIRED: Sql = Sql {
    text: "UPDATE bookings b SET status = 'EXPIRED', updated_at = clock_timestamp() \
     WHERE b.id = ANY(ARRAY( \
       SELECT id FROM bookings WHERE status = 'PENDING' AND expires_at <= (SELECT clock_timestamp()) \
       ORDER BY expires_at LIMIT $1 FOR UPDATE SKIP LOCKED)) \
     AND b.status = 'PENDING' \
     RETURNING b.id, b.schedule_id, b.seats",
    types: &[Type::INT8],
};

/// A live map's start: one statement, so the counter, the seats, their
/// holders and the clock come from one snapshot.
const MAP_SNAPSHOT: Sql = Sql {
    text: "SELECT sc.last_event_id, \
       (extract(epoch FROM statement_timestamp()) * 1000000)::bigint, \
       st.row_num, st.col_num, st.status, b.user_id, \
       (extract(epoch FROM st.expires_at) * 1000000)::bigint \
     FROM schedule_event_counters sc \
     LEFT JOIN schedule_seat_status st ON st.schedule_id = sc.schedule_id \
     LEFT JOIN bookings b ON b.id = st.booking_id \
     WHERE sc.schedule_id = $1",
    types: &[Type::INT8],
};

/// One statement, so the counter and the seats come from one snapshot.
const SNAPSHOT: Sql = Sql {
    text: "SELECT sc.last_event_id, st.row_num, st.col_num, st.status \
     FROM schedule_event_counters sc LEFT JOIN schedule_seat_status st ON st.schedule_id = sc.schedule_id \
     WHERE sc.schedule_id = $1",
    types: &[Type::INT8],
};

/// How often a hold transaction is tried before the caller gets a 503: a
/// start may need a round for each kind of overdue hold in its way (the
/// key's, the user's own, the seats' holders) plus a lost deadlock race.
const MAX_TX_ATTEMPTS: usize = 6;

/// [`SeatStore`] on PostgreSQL.
#[derive(Clone)]
pub struct PgSeatStore {
    db: Db,
}

impl PgSeatStore {
    pub fn new(db: Db) -> Self {
        Self { db }
    }
}

/// A seat event waiting to be appended at the end of its transaction.
struct PendingEvent {
    schedule_id: i64,
    action: SeatAction,
    seats: Vec<Seat>,
    /// For `OCCUPIED` and `CONFIRMED`: whose seats they are and, for a
    /// hold, until when. Carried by the notification (not the public
    /// stream) for the replicas' live maps.
    holder: Option<Uuid>,
    expires_at: Option<DateTime<Utc>>,
}

/// Collects a transaction's events and appends them last, in schedule order.
#[derive(Default)]
struct EventBatch(Vec<PendingEvent>);

impl EventBatch {
    fn push(&mut self, schedule_id: i64, action: SeatAction, seats: Vec<Seat>) {
        self.push_owned(schedule_id, action, seats, None, None);
    }

    fn push_owned(
        &mut self,
        schedule_id: i64,
        action: SeatAction,
        seats: Vec<Seat>,
        holder: Option<Uuid>,
        expires_at: Option<DateTime<Utc>>,
    ) {
        self.0.push(PendingEvent {
            schedule_id,
            action,
            seats,
            holder,
            expires_at,
        });
    }

    async fn append(mut self, tx: &Tx<'_>) -> Result<(), DbError> {
        // Stable: a schedule's RELEASED stays before its OCCUPIED.
        self.0.sort_by_key(|e| e.schedule_id);
        for e in &self.0 {
            tx.query_one(
                &APPEND_EVENT,
                &[
                    &e.schedule_id,
                    &e.action.as_str(),
                    &Json(&e.seats),
                    &NOTIFY_CHANNEL,
                    &e.holder,
                    &e.expires_at,
                ],
            )
            .await?;
        }
        Ok(())
    }
}

/// What one attempt of a store transaction decided. Failing is the other
/// way an attempt ends: a [`DbError`], retried when it is a lost race.
enum Decision<T> {
    /// Append the queued events, commit, and answer this. A refusal may
    /// commit too: an overdue booking released on the way stays released.
    Commit(Result<T, HoldError>),
    /// Roll back and refuse: nothing the attempt did stays.
    Refuse(HoldError),
    /// Roll back and try again, releasing these overdue holds first.
    ExpireFirst(Vec<Uuid>),
}

/// Seats as the two parallel arrays the statements `unnest`.
fn seat_arrays(seats: &[Seat]) -> (Vec<i16>, Vec<i16>) {
    seats.iter().map(|s| (s.row, s.col)).unzip()
}

crate::text_enum_from_sql!(BookingStatus, "booking status");

fn booking_from_row(row: &Row) -> Result<Booking, DbError> {
    let Json(seats): Json<Vec<Seat>> = row.try_get(4)?;
    Ok(Booking {
        id: row.try_get(0)?,
        schedule_id: row.try_get(1)?,
        user_id: row.try_get(2)?,
        status: row.try_get(3)?,
        seats,
        expires_at: row.try_get(5)?,
    })
}

fn is_retryable(e: &DbError) -> bool {
    matches!(e, DbError::Contended(_))
        || matches!(e.sqlstate(), Some(c) if *c == SqlState::T_R_DEADLOCK_DETECTED || *c == SqlState::T_R_SERIALIZATION_FAILURE)
}

/// Expires an overdue hold inside `tx` and queues its `RELEASED` event.
/// Returns false when the hold was not overdue or is no longer pending.
async fn expire_in_tx(
    tx: &Tx<'_>,
    booking_id: Uuid,
    events: &mut EventBatch,
) -> Result<bool, DbError> {
    let Some(row) = tx.query_opt(&EXPIRE_BOOKING, &[&booking_id]).await? else {
        return Ok(false);
    };
    let schedule_id: i64 = row.try_get(0)?;
    let Json(seats): Json<Vec<Seat>> = row.try_get(1)?;
    tx.query(&DELETE_SEATS_OF, &[&vec![booking_id]]).await?;
    events.push(schedule_id, SeatAction::Released, seats);
    Ok(true)
}

/// Who holds which of the requested seats.
struct SeatHolders {
    /// Seats held by live holds or sold, sorted.
    taken: Vec<Seat>,
    /// Holds in the way that expired but were not swept yet, sorted, so
    /// concurrent takeovers lock them in the same order.
    overdue: Vec<Uuid>,
    /// The requesting user's own live hold on some of these seats.
    own_hold: Option<Uuid>,
}

impl SeatHolders {
    /// What the holders force, if anything. The user's own pending hold is
    /// reported as such (`booking_in_progress` names it) rather than as
    /// taken seats.
    fn decision(self) -> Option<Decision<HoldOutcome>> {
        if let Some(own) = self.own_hold {
            return Some(Decision::Refuse(HoldError::BookingInProgress(own)));
        }
        if !self.taken.is_empty() {
            return Some(Decision::Refuse(HoldError::SeatsTaken(self.taken)));
        }
        if !self.overdue.is_empty() {
            // An expired hold must never cause a 409: release it, first.
            return Some(Decision::ExpireFirst(self.overdue));
        }
        None
    }
}

async fn seat_holders(
    tx: &Tx<'_>,
    req: &HoldRequest,
    seats: &[Seat],
) -> Result<SeatHolders, DbError> {
    let (rows, cols) = seat_arrays(seats);
    let holders = tx
        .query(
            &SEAT_HOLDERS,
            &[&req.schedule_id, &rows, &cols, &req.user_id],
        )
        .await?;
    let mut out = SeatHolders {
        taken: Vec::new(),
        overdue: Vec::new(),
        own_hold: None,
    };
    for h in &holders {
        let booking: Uuid = h.try_get(2)?;
        if h.try_get::<_, bool>(3)? {
            out.overdue.push(booking);
            continue;
        }
        if h.try_get::<_, bool>(4)? {
            out.own_hold = Some(booking);
        }
        out.taken.push(Seat {
            row: h.try_get(0)?,
            col: h.try_get(1)?,
        });
    }
    out.taken.sort();
    out.overdue.sort();
    out.overdue.dedup();
    Ok(out)
}

/// What the request's `Idempotency-Key` decides, if anything: a live
/// booking of the same request is answered again, one of another request
/// refuses, and an overdue one is released first (which frees the key).
async fn decide_by_key(
    tx: &Tx<'_>,
    req: &HoldRequest,
) -> Result<Option<Decision<HoldOutcome>>, DbError> {
    let Some(key) = &req.idempotency_key else {
        return Ok(None);
    };
    let Some(row) = tx
        .query_opt(&FIND_BY_IDEMPOTENCY_KEY, &[&req.user_id, key])
        .await?
    else {
        return Ok(None);
    };
    let booking = booking_from_row(&row)?;
    if row.try_get::<_, bool>(7)? {
        return Ok(Some(Decision::ExpireFirst(vec![booking.id])));
    }
    let fingerprint: Option<String> = row.try_get(6)?;
    Ok(Some(
        if fingerprint.as_deref() == Some(req.fingerprint().as_str()) {
            Decision::Commit(Ok(HoldOutcome {
                booking,
                replayed: true,
            }))
        } else {
            Decision::Refuse(HoldError::IdempotencyKeyReused)
        },
    ))
}

/// One try of the hold transaction. Events it queues in `events` are
/// appended if, and only if, the decision is to commit.
///
/// The common case: look at the seats' holders (none), insert the booking,
/// insert the seats in one sorted statement, done. When an expired but
/// unswept hold stands in the way (the user's own, the key's, or a seat's
/// holder), the attempt does not release it there and then: that would
/// lock a booking row after other locks, against the lock order, and
/// deadlock with a concurrent takeover. It asks the caller to start over
/// with those holds in `expire_first`, which are released first, in id
/// order, before any other lock is taken.
async fn hold_attempt(
    tx: &Tx<'_>,
    req: &HoldRequest,
    hold_seconds: i32,
    expire_first: &[Uuid],
    events: &mut EventBatch,
) -> Result<Decision<HoldOutcome>, DbError> {
    // One start at a time per user. Two concurrent starts of one user
    // (a double click, two tabs) race on the same unique-index entries
    // (one pending booking per user and schedule, the idempotency key),
    // and concurrent speculative inserts on one key can deadlock each
    // other inside PostgreSQL. Taken first, before any other lock.
    tx.query(&LOCK_USER, &[&USER_LOCK_CLASS, &user_lock_key(req.user_id)])
        .await?;
    for &id in expire_first {
        // Conditional: a no-op for a hold that ended meanwhile.
        expire_in_tx(tx, id, events).await?;
    }

    if let Some(decision) = decide_by_key(tx, req).await? {
        return Ok(decision);
    }

    let seats = match &req.choice {
        SeatChoice::Seats(seats) => seats,
        SeatChoice::BestAvailable { quantity, schedule } => {
            return best_available(tx, req, schedule, *quantity, hold_seconds, events).await;
        }
    };
    // Who holds the seats, before anything is written: a live hold means
    // 409 at once, and a transaction only ever writes seat rows once every
    // holder in its way is resolved. Otherwise it could hold some seats
    // while waiting on a seat row that a concurrent takeover is deleting,
    // and deadlock with it.
    if let Some(decision) = seat_holders(tx, req, seats).await?.decision() {
        return Ok(decision);
    }
    match insert_hold(tx, req, seats, hold_seconds, events).await? {
        Inserted::Decided(decision) => Ok(decision),
        Inserted::Lost(missing) => {
            if let Some(decision) = seat_holders(tx, req, &missing).await?.decision() {
                return Ok(decision);
            }
            // The holder ended between our insert and our look; inserting
            // again here would wait for seats out of order.
            Err(DbError::Contended("a seat changed hands during the hold"))
        }
    }
}

/// What inserting a hold came to.
enum Inserted {
    /// Held (commit), or refused by a unique index on the booking.
    Decided(Decision<HoldOutcome>),
    /// These seats went to a concurrent hold first; whatever was inserted
    /// is still in the transaction.
    Lost(Vec<Seat>),
}

/// Inserts the booking and its seats (sorted), queueing the `OCCUPIED`
/// event when every seat was held.
async fn insert_hold(
    tx: &Tx<'_>,
    req: &HoldRequest,
    seats: &[Seat],
    hold_seconds: i32,
    events: &mut EventBatch,
) -> Result<Inserted, DbError> {
    let booking_id = Uuid::new_v4();
    let fingerprint = req.fingerprint();
    let inserted = tx
        .query_opt(
            &INSERT_BOOKING,
            &[
                &booking_id,
                &req.schedule_id,
                &req.user_id,
                &Json(seats),
                &hold_seconds,
                &req.idempotency_key,
                &fingerprint,
            ],
        )
        .await?;
    let Some(row) = inserted else {
        // A unique index said no: the user's pending hold here, or the key.
        if let Some(row) = tx
            .query_opt(&FIND_PENDING_OF_USER, &[&req.schedule_id, &req.user_id])
            .await?
        {
            let existing: Uuid = row.try_get(0)?;
            if row.try_get::<_, bool>(1)? {
                return Ok(Inserted::Decided(Decision::ExpireFirst(vec![existing])));
            }
            if let Some(decision) = decide_by_key(tx, req).await? {
                return Ok(Inserted::Decided(decision));
            }
            return Ok(Inserted::Decided(Decision::Refuse(
                HoldError::BookingInProgress(existing),
            )));
        }
        if let Some(decision) = decide_by_key(tx, req).await? {
            return Ok(Inserted::Decided(decision));
        }
        // The conflicting booking ended after the insert saw it.
        return Err(DbError::Contended(
            "booking insert conflicted with a booking that ended",
        ));
    };
    let expires_at: DateTime<Utc> = row.try_get(0)?;

    let (rows, cols) = seat_arrays(seats);
    let inserted = tx
        .query(
            &INSERT_SEATS,
            &[&req.schedule_id, &booking_id, &expires_at, &rows, &cols],
        )
        .await?;
    if inserted.len() < seats.len() {
        let mut missing = seats.to_vec();
        for row in &inserted {
            let seat = Seat {
                row: row.try_get(0)?,
                col: row.try_get(1)?,
            };
            missing.retain(|s| *s != seat);
        }
        return Ok(Inserted::Lost(missing));
    }

    events.push_owned(
        req.schedule_id,
        SeatAction::Occupied,
        seats.to_vec(),
        Some(req.user_id),
        Some(expires_at),
    );
    Ok(Inserted::Decided(Decision::Commit(Ok(HoldOutcome {
        booking: Booking {
            id: booking_id,
            schedule_id: req.schedule_id,
            user_id: req.user_id,
            status: BookingStatus::Pending,
            seats: seats.to_vec(),
            expires_at,
        },
        replayed: false,
    }))))
}

/// Holds the best free block of `quantity` seats (see [`allocate`]).
///
/// Best-available starts of one show take turns on a per-show advisory
/// lock (after the booking rows, before any seat row, in the lock order),
/// so they never aim at the same block: each reads what is taken after the
/// one before it committed. Its commit comes right after, and the show's
/// event counter serializes commits anyway, so the turn costs little. A
/// start that names its seats can still win a candidate first: the unique
/// index decides, the candidate's inserts are rolled back to a savepoint
/// (which also releases their row locks, so no lock is held out of order)
/// and the next candidate is tried.
async fn best_available(
    tx: &Tx<'_>,
    req: &HoldRequest,
    schedule: &Schedule,
    quantity: u16,
    hold_seconds: i32,
    events: &mut EventBatch,
) -> Result<Decision<HoldOutcome>, DbError> {
    // The user's own pending booking here, settled before the turn: its row
    // may be locked by another start that is releasing it (overdue, in that
    // start's way) and that waits for this show's turn in its own right.
    // Waiting for that row while holding the turn would close a cycle.
    if let Some(row) = tx
        .query_opt(&FIND_PENDING_OF_USER, &[&req.schedule_id, &req.user_id])
        .await?
    {
        let existing: Uuid = row.try_get(0)?;
        return Ok(if row.try_get::<_, bool>(1)? {
            Decision::ExpireFirst(vec![existing])
        } else {
            Decision::Refuse(HoldError::BookingInProgress(existing))
        });
    }
    tx.query(
        &LOCK_USER,
        &[&SHOW_LOCK_CLASS, &show_lock_key(req.schedule_id)],
    )
    .await?;
    for _round in 0..BEST_AVAILABLE_ROUNDS {
        // Read committed: each read sees every hold committed before it.
        let taken = tx.query(&SHOW_SEATS, &[&req.schedule_id]).await?;
        let mut unavailable = schedule.blocked.clone();
        let mut overdue = Vec::new();
        for row in &taken {
            let seat = Seat {
                row: row.try_get(0)?,
                col: row.try_get(1)?,
            };
            if row.try_get::<_, bool>(3)? {
                // Free by the contract: released first if chosen.
                overdue.push((seat, row.try_get::<_, Uuid>(2)?));
            } else {
                unavailable.push(seat);
            }
        }
        let grid = schedule.grid();
        let map = FreeMap::new(grid.rows as i16, grid.cols as i16, unavailable);
        let candidates = best_blocks(&map, quantity, CANDIDATES_PER_ROUND);
        if candidates.is_empty() {
            return Ok(Decision::Refuse(HoldError::NoSeatsTogether {
                quantity,
                largest_block: map.largest_block(),
            }));
        }
        for block in candidates {
            let seats = block.seats();
            let mut in_the_way: Vec<Uuid> = overdue
                .iter()
                .filter(|(seat, _)| seats.contains(seat))
                .map(|(_, booking)| *booking)
                .collect();
            if !in_the_way.is_empty() {
                in_the_way.sort();
                in_the_way.dedup();
                return Ok(Decision::ExpireFirst(in_the_way));
            }
            tx.batch("SAVEPOINT candidate").await?;
            match insert_hold(tx, req, &seats, hold_seconds, events).await? {
                Inserted::Decided(decision) => return Ok(decision),
                Inserted::Lost(_) => tx.batch("ROLLBACK TO SAVEPOINT candidate").await?,
            }
        }
    }
    Err(DbError::Contended(
        "every best-available candidate was taken first",
    ))
}

/// Which terminal transition a pending booking is asked to make.
#[derive(Clone, Copy)]
enum Transition {
    Confirm,
    Cancel,
}

async fn transition_attempt(
    tx: &Tx<'_>,
    user_id: Uuid,
    booking_id: Uuid,
    to: Transition,
    events: &mut EventBatch,
) -> Result<Decision<Booking>, DbError> {
    let sql = match to {
        Transition::Confirm => &CONFIRM_BOOKING,
        Transition::Cancel => &CANCEL_BOOKING,
    };
    if let Some(row) = tx.query_opt(sql, &[&booking_id, &user_id]).await? {
        let booking = booking_from_row(&row)?;
        let (action, holder) = match to {
            Transition::Confirm => {
                tx.query(&CONFIRM_SEATS, &[&booking_id]).await?;
                (SeatAction::Confirmed, Some(user_id))
            }
            Transition::Cancel => {
                tx.query(&DELETE_SEATS_OF, &[&vec![booking_id]]).await?;
                (SeatAction::Released, None)
            }
        };
        events.push_owned(
            booking.schedule_id,
            action,
            booking.seats.clone(),
            holder,
            None,
        );
        return Ok(Decision::Commit(Ok(booking)));
    }
    // Not pending and in time: find out why, under the row lock so the
    // answer cannot change before we give it.
    let Some(row) = tx
        .query_opt(&LOCK_BOOKING, &[&booking_id, &user_id])
        .await?
    else {
        return Ok(Decision::Refuse(HoldError::BookingNotFound));
    };
    let booking = booking_from_row(&row)?;
    let overdue: bool = row.try_get(6)?;
    Ok(match (booking.status, to) {
        (BookingStatus::Pending, _) if overdue => {
            // Expired but not swept yet: release it now, so the RELEASED
            // event follows the refusal promptly.
            expire_in_tx(tx, booking.id, events).await?;
            Decision::Commit(Err(HoldError::BookingExpired))
        }
        (BookingStatus::Confirmed, Transition::Confirm)
        | (BookingStatus::Cancelled, Transition::Cancel) => Decision::Commit(Ok(booking)),
        (BookingStatus::Confirmed, Transition::Cancel) => {
            Decision::Refuse(HoldError::BookingConfirmed)
        }
        (BookingStatus::Cancelled, Transition::Confirm) => {
            Decision::Refuse(HoldError::BookingCancelled)
        }
        (BookingStatus::Expired, _) => Decision::Refuse(HoldError::BookingExpired),
        // Pending and in time, yet the update did not match: it changed
        // between the two statements. The retry will settle it.
        (BookingStatus::Pending, _) => {
            return Err(DbError::Contended("booking changed concurrently"))
        }
    })
}

async fn sweep_in_tx(
    tx: &Tx<'_>,
    limit: i64,
    events: &mut EventBatch,
) -> Result<Decision<usize>, DbError> {
    let rows = tx.query(&SWEEP_EXPIRED, &[&limit]).await?;
    if rows.is_empty() {
        return Ok(Decision::Commit(Ok(0)));
    }
    let mut ids = Vec::with_capacity(rows.len());
    for row in &rows {
        let id: Uuid = row.try_get(0)?;
        let Json(seats): Json<Vec<Seat>> = row.try_get(2)?;
        ids.push(id);
        // One event per booking keeps every NOTIFY payload small.
        events.push(row.try_get(1)?, SeatAction::Released, seats);
    }
    tx.query(&DELETE_SEATS_OF, &[&ids]).await?;
    Ok(Decision::Commit(Ok(rows.len())))
}

impl From<DbError> for HoldError {
    fn from(e: DbError) -> Self {
        HoldError::Unavailable(e.to_string())
    }
}

/// One kind of store transaction: what each attempt does. Run by
/// [`PgSeatStore::in_transaction`], which commits, rolls back or tries
/// again as the attempt decides.
trait TxAttempt: Sync {
    type Output: Send;

    fn attempt<'a>(
        &'a self,
        tx: &'a Tx<'a>,
        expire_first: &'a [Uuid],
        events: &'a mut EventBatch,
    ) -> impl Future<Output = Result<Decision<Self::Output>, DbError>> + Send + 'a;
}

/// Start: hold the request's seats.
struct Hold<'r> {
    req: &'r HoldRequest,
    hold_seconds: i32,
}

impl TxAttempt for Hold<'_> {
    type Output = HoldOutcome;

    fn attempt<'a>(
        &'a self,
        tx: &'a Tx<'a>,
        expire_first: &'a [Uuid],
        events: &'a mut EventBatch,
    ) -> impl Future<Output = Result<Decision<HoldOutcome>, DbError>> + Send + 'a {
        hold_attempt(tx, self.req, self.hold_seconds, expire_first, events)
    }
}

/// Confirm or cancel: move a pending booking to its end.
struct Move {
    user_id: Uuid,
    booking_id: Uuid,
    to: Transition,
}

impl TxAttempt for Move {
    type Output = Booking;

    fn attempt<'a>(
        &'a self,
        tx: &'a Tx<'a>,
        _expire_first: &'a [Uuid],
        events: &'a mut EventBatch,
    ) -> impl Future<Output = Result<Decision<Booking>, DbError>> + Send + 'a {
        transition_attempt(tx, self.user_id, self.booking_id, self.to, events)
    }
}

/// Expire overdue holds.
struct Sweep {
    limit: i64,
}

impl TxAttempt for Sweep {
    type Output = usize;

    fn attempt<'a>(
        &'a self,
        tx: &'a Tx<'a>,
        _expire_first: &'a [Uuid],
        events: &'a mut EventBatch,
    ) -> impl Future<Output = Result<Decision<usize>, DbError>> + Send + 'a {
        sweep_in_tx(tx, self.limit, events)
    }
}

impl PgSeatStore {
    /// Runs `attempt` in a transaction until it decides, retrying lost
    /// races (deadlocks, serialization failures, [`DbError::Contended`]) up
    /// to [`MAX_TX_ATTEMPTS`] times. Overdue holds an attempt found in its
    /// way reach the next attempt sorted and unique, so every transaction
    /// locks them in the same order.
    async fn in_transaction<A: TxAttempt>(
        &self,
        what: &'static str,
        attempt: A,
    ) -> Result<A::Output, HoldError> {
        let mut conn = self.db.conn().await?;
        let mut expire_first: Vec<Uuid> = Vec::new();
        let mut tries = 0;
        loop {
            tries += 1;
            let result = async {
                let tx = conn.transaction().await?;
                let mut events = EventBatch::default();
                match attempt.attempt(&tx, &expire_first, &mut events).await? {
                    Decision::Commit(answer) => {
                        events.append(&tx).await?;
                        tx.commit().await?;
                        Ok(answer)
                    }
                    Decision::Refuse(refusal) => {
                        // Includes any overdue holds it cleared: the
                        // sweeper releases those, with their events.
                        tx.rollback().await?;
                        Ok(Err(refusal))
                    }
                    Decision::ExpireFirst(ids) => {
                        tx.rollback().await?;
                        expire_first.extend(ids);
                        expire_first.sort();
                        expire_first.dedup();
                        Err(DbError::Contended("overdue holds in the way"))
                    }
                }
            }
            .await;
            match result {
                Ok(answer) => return answer,
                Err(e) if tries < MAX_TX_ATTEMPTS && is_retryable(&e) => {
                    tracing::debug!(error = %e, attempt = tries, "{what} transaction retried");
                }
                Err(e) => return Err(e.into()),
            }
        }
    }
}

#[async_trait]
impl SeatStore for PgSeatStore {
    async fn hold_seats(
        &self,
        req: HoldRequest,
        hold_seconds: u32,
    ) -> Result<HoldOutcome, HoldError> {
        let hold_seconds = i32::try_from(hold_seconds).unwrap_or(i32::MAX);
        self.in_transaction(
            "hold",
            Hold {
                req: &req,
                hold_seconds,
            },
        )
        .await
    }

    async fn booking(&self, user_id: Uuid, booking_id: Uuid) -> Result<Booking, HoldError> {
        let conn = self.db.conn().await?;
        match conn
            .query_opt(&GET_BOOKING, &[&booking_id, &user_id])
            .await?
        {
            Some(row) => Ok(booking_from_row(&row)?),
            None => Err(HoldError::BookingNotFound),
        }
    }

    async fn confirm(&self, user_id: Uuid, booking_id: Uuid) -> Result<Booking, HoldError> {
        self.in_transaction(
            "confirm",
            Move {
                user_id,
                booking_id,
                to: Transition::Confirm,
            },
        )
        .await
    }

    async fn cancel(&self, user_id: Uuid, booking_id: Uuid) -> Result<Booking, HoldError> {
        self.in_transaction(
            "cancel",
            Move {
                user_id,
                booking_id,
                to: Transition::Cancel,
            },
        )
        .await
    }

    async fn release_expired(&self, limit: i64) -> Result<usize, HoldError> {
        self.in_transaction("sweep", Sweep { limit }).await
    }

    async fn map_snapshot(&self, schedule_id: i64) -> Result<MapSnapshot, HoldError> {
        let conn = self.db.conn().await?;
        let rows = conn.query(&MAP_SNAPSHOT, &[&schedule_id]).await?;
        let Some(first) = rows.first() else {
            return Err(HoldError::ScheduleNotFound(schedule_id));
        };
        let mut snapshot = MapSnapshot {
            last_event_id: first.try_get(0).map_err(DbError::from)?,
            db_now_micros: first.try_get(1).map_err(DbError::from)?,
            seats: Vec::with_capacity(rows.len()),
        };
        for row in &rows {
            let read = || -> Result<_, tokio_postgres::Error> {
                Ok((
                    row.try_get::<_, Option<i16>>(2)?,
                    row.try_get::<_, Option<i16>>(3)?,
                    row.try_get::<_, Option<SeatAction>>(4)?,
                    row.try_get::<_, Option<Uuid>>(5)?,
                    row.try_get::<_, Option<i64>>(6)?,
                ))
            };
            let (Some(r), Some(c), Some(status), holder, expires) =
                read().map_err(DbError::from)?
            else {
                continue;
            };
            let (owner, expires) = match (status, holder, expires) {
                (SeatAction::Confirmed, Some(owner), _) => (owner, None),
                (_, Some(holder), Some(expires)) => (holder, Some(expires)),
                // A row the schema does not allow; refuse to guess.
                _ => return Err(DbError::Unexpected("a seat row without owner or expiry").into()),
            };
            snapshot
                .seats
                .push((Seat { row: r, col: c }, owner, expires));
        }
        Ok(snapshot)
    }

    async fn seat_snapshot(&self, schedule_id: i64) -> Result<SeatSnapshot, HoldError> {
        let conn = self.db.conn().await?;
        let rows = conn.query(&SNAPSHOT, &[&schedule_id]).await?;
        let Some(first) = rows.first() else {
            return Err(HoldError::ScheduleNotFound(schedule_id));
        };
        let last_event_id: i64 = first.try_get(0).map_err(DbError::from)?;
        let mut seats = Vec::with_capacity(rows.len());
        for row in &rows {
            // A schedule with no held seat comes back as one row of NULLs.
            let (Some(row_num), Some(col), Some(status)) = (
                row.try_get::<_, Option<i16>>(1).map_err(DbError::from)?,
                row.try_get::<_, Option<i16>>(2).map_err(DbError::from)?,
                row.try_get::<_, Option<SeatAction>>(3)
                    .map_err(DbError::from)?,
            ) else {
                continue;
            };
            seats.push(SeatState {
                row: row_num,
                col,
                status,
            });
        }
        Ok(SeatSnapshot {
            schedule_id,
            last_event_id,
            seats,
        })
    }
}
