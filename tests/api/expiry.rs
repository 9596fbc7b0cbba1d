//! Hold expiry: holds end `HOLD_SECONDS` after they start, by the database
//! clock; the sweeper releases them promptly and exactly once, an expired
//! hold never blocks anyone even before it is swept, and confirm racing
//! cancel or expiry has exactly one winner that the events agree with.
//!
//! The tests and PostgreSQL run on one machine, so the system clock here is
//! the database clock `expiresAt` is measured by.

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures::future::join_all;
use serde_json::json;

use crate::helpers::*;

/// The API's promise: released within 2 s of expiry.
const RELEASE_WITHIN: chrono::TimeDelta = chrono::TimeDelta::seconds(2);

/// Lets time pass until `t`: only to send a request at a chosen moment,
/// never to wait for a state (that is [`TestDb::wait_clock_past`]).
async fn sleep_until(t: DateTime<Utc>) {
    if let Ok(d) = (t - Utc::now()).to_std() {
        tokio::time::sleep(d).await;
    }
}

/// Asserts that the next frame (within 5 s) is this seat event.
async fn assert_next_event(sse: &mut SseClient, id: i64, action: &str, seats: &[(i64, i64)]) {
    assert_eq!(
        next_seat_event(sse, Duration::from_secs(5)).await,
        (id, action.to_owned(), set_of(seats))
    );
}

async fn next_seat_event(sse: &mut SseClient, timeout: Duration) -> (i64, String, SeatSet) {
    match sse.next_event(timeout).await {
        Some(SseFrame::Event { id, action, seats }) => (id, action, seats.into_iter().collect()),
        other => panic!("expected a seat event, got {other:?}"),
    }
}

/// Waits until the table holds no `PENDING` booking of `schedule`.
async fn wait_all_settled(db: &TestDb, schedule: i64, timeout: Duration) {
    db.wait_count(
        "every hold of the schedule settled",
        timeout,
        "SELECT count(*) FROM bookings WHERE schedule_id = $1 AND status = 'PENDING'",
        &[&schedule],
        0,
    )
    .await;
}

/// (status, expires_at, updated_at) of a booking, from the table.
async fn booking_row(db: &TestDb, id: &str) -> (String, DateTime<Utc>, DateTime<Utc>) {
    let id: uuid::Uuid = id.parse().unwrap();
    let row = db
        .client()
        .await
        .query_one(
            "SELECT status, expires_at, updated_at FROM bookings WHERE id = $1",
            &[&id],
        )
        .await
        .unwrap();
    (row.get(0), row.get(1), row.get(2))
}

#[tokio::test]
async fn expired_hold_is_released_within_two_seconds_and_refuses_changes() {
    let (db, r) = TestDb::with_replica(ReplicaOpts::default().with("HOLD_SECONDS", 1)).await;
    let schedule = r.create_schedule(3, 3, &[]).await;
    let mut sse = r.subscribe(schedule, None).await;
    let token = r.guest().await;

    let before = Utc::now();
    let b = r.start(&token, schedule, &[(1, 1), (1, 2)]).await;
    let after = Utc::now();
    assert_eq!(b.status, 201, "{}", b.body);
    let id = b.booking_id();
    let expires_at = timestamp(&b.body["expiresAt"]);
    let hold = chrono::TimeDelta::seconds(1);
    let slack = chrono::TimeDelta::milliseconds(5);
    assert!(
        before + hold - slack <= expires_at && expires_at <= after + hold + slack,
        "expiresAt {expires_at} is not HOLD_SECONDS after the start ({before}..{after})"
    );
    assert_next_event(&mut sse, 1, "OCCUPIED", &[(1, 1), (1, 2)]).await;

    // The RELEASED event arrives no earlier than expiry and within 2 s of it.
    let (eid, action, seats) = next_seat_event(&mut sse, Duration::from_secs(10)).await;
    let arrived = Utc::now();
    assert_eq!(
        (eid, action.as_str(), seats),
        (2, "RELEASED", set_of(&[(1, 1), (1, 2)]))
    );
    assert!(
        arrived <= expires_at + RELEASE_WITHIN,
        "RELEASED arrived {} ms after expiresAt",
        (arrived - expires_at).num_milliseconds()
    );
    let (status, db_expires, released_at) = booking_row(&db, &id).await;
    assert_eq!(status, "EXPIRED");
    assert_eq!(db_expires, expires_at);
    assert!(
        released_at >= expires_at,
        "released {} ms before its expiry",
        (expires_at - released_at).num_milliseconds()
    );
    assert!(released_at <= expires_at + RELEASE_WITHIN);

    let got = r.booking(&token, &id).await;
    assert_eq!(got.status, 200, "{}", got.body);
    assert_eq!(got.body["status"], "EXPIRED");
    r.confirm(&token, &id)
        .await
        .assert_problem(410, "booking_expired");
    r.cancel(&token, &id)
        .await
        .assert_problem(410, "booking_expired");

    let (last, snap) = r.snapshot(schedule).await;
    assert_eq!(last, 2);
    assert!(snap.is_empty(), "{snap:?}");
    assert_eq!(
        db.logged_seat_events(schedule).await.len(),
        2,
        "a refused confirm or cancel must not add events"
    );
    db.assert_consistent().await;
    println!(
        "expiry: RELEASED arrived {} ms after expiresAt (released in the database {} ms after)",
        (arrived - expires_at).num_milliseconds(),
        (released_at - expires_at).num_milliseconds()
    );
}

#[tokio::test]
async fn expired_but_unswept_hold_never_blocks() {
    // The sweeper runs once at start-up and then not for a minute: every
    // expired hold below is released only by the request that meets it.
    let (db, r) = TestDb::with_replica(
        ReplicaOpts::default()
            .with("HOLD_SECONDS", 1)
            .with("SWEEP_INTERVAL_MS", 60_000),
    )
    .await;
    let schedule = r.create_schedule(4, 4, &[]).await;
    let mut sse = r.subscribe(schedule, None).await;
    let [alice, bob, carol, dave, erin, frank] = r.guests().await;

    let a = r
        .start_with_key(&alice, schedule, &[(1, 1), (1, 2)], "alice-key")
        .await;
    let c = r.start(&carol, schedule, &[(2, 1)]).await;
    let d = r
        .start_with_key(&dave, schedule, &[(3, 1), (3, 2)], "dave-key")
        .await;
    let e = r.start(&erin, schedule, &[(4, 1)]).await;
    let f = r.start(&frank, schedule, &[(4, 4)]).await;
    let mut expires = Vec::new();
    for resp in [&a, &c, &d, &e, &f] {
        assert_eq!(resp.status, 201, "{}", resp.body);
        expires.push(timestamp(&resp.body["expiresAt"]));
    }
    for expected_id in 1..=5 {
        let (id, action, _) = next_seat_event(&mut sse, Duration::from_secs(5)).await;
        assert_eq!((id, action.as_str()), (expected_id, "OCCUPIED"));
    }

    let latest = expires.iter().max().copied().unwrap();
    db.wait_clock_past(latest).await;
    // All five are past expiry by the database clock and still unswept.
    assert_eq!(
        db.overdue_holds(schedule).await,
        5,
        "the holds must be expired but not yet swept"
    );
    let got = r.booking(&alice, &a.booking_id()).await;
    assert_eq!(got.body["status"], "EXPIRED", "{}", got.body);

    // Another user takes an overlapping set: 201, and the old hold's
    // RELEASED precedes the new OCCUPIED.
    let b = r.start(&bob, schedule, &[(1, 2), (1, 3)]).await;
    assert_eq!(b.status, 201, "an expired hold caused {}", b.body);
    assert_next_event(&mut sse, 6, "RELEASED", &[(1, 1), (1, 2)]).await;
    assert_next_event(&mut sse, 7, "OCCUPIED", &[(1, 2), (1, 3)]).await;
    r.confirm(&alice, &a.booking_id())
        .await
        .assert_problem(410, "booking_expired");

    // The same user starts again on the schedule: no booking_in_progress.
    r.hold(&carol, schedule, &[(2, 2)]).await;
    assert_next_event(&mut sse, 8, "RELEASED", &[(2, 1)]).await;
    assert_next_event(&mut sse, 9, "OCCUPIED", &[(2, 2)]).await;

    // The Idempotency-Key of an expired booking is free again: the same key
    // and body make a new booking, which the key then names.
    let d2 = r
        .start_with_key(&dave, schedule, &[(3, 2), (3, 1)], "dave-key")
        .await;
    assert_eq!(d2.status, 201, "{}", d2.body);
    assert_ne!(
        d2.booking_id(),
        d.booking_id(),
        "an expired booking was replayed"
    );
    assert_eq!(d2.body["status"], "PENDING");
    assert!(timestamp(&d2.body["expiresAt"]) > Utc::now());
    assert_next_event(&mut sse, 10, "RELEASED", &[(3, 1), (3, 2)]).await;
    assert_next_event(&mut sse, 11, "OCCUPIED", &[(3, 1), (3, 2)]).await;
    let again = r
        .start_with_key(&dave, schedule, &[(3, 1), (3, 2)], "dave-key")
        .await;
    assert_eq!(again.status, 201, "{}", again.body);
    assert_eq!(again.booking_id(), d2.booking_id());

    // Confirm and cancel of an unswept expired hold: 410, and its seats are
    // released with the refusal.
    r.confirm(&erin, &e.booking_id())
        .await
        .assert_problem(410, "booking_expired");
    assert_next_event(&mut sse, 12, "RELEASED", &[(4, 1)]).await;
    r.cancel(&frank, &f.booking_id())
        .await
        .assert_problem(410, "booking_expired");
    assert_next_event(&mut sse, 13, "RELEASED", &[(4, 4)]).await;

    for (resp, token) in [
        (&a, &alice),
        (&c, &carol),
        (&d, &dave),
        (&e, &erin),
        (&f, &frank),
    ] {
        let got = r.booking(token, &resp.booking_id()).await;
        assert_eq!(got.body["status"], "EXPIRED", "{}", got.body);
        assert_eq!(booking_row(&db, &resp.booking_id()).await.0, "EXPIRED");
    }
    // The replayed start added nothing; the snapshot holds the new bookings.
    let (last, snap) = r.snapshot(schedule).await;
    assert_eq!(last, 13);
    let expected: BTreeMap<(i64, i64), String> = [(1, 2), (1, 3), (2, 2), (3, 1), (3, 2)]
        .into_iter()
        .map(|s| (s, "OCCUPIED".to_owned()))
        .collect();
    assert_eq!(snap, expected);
    assert_eq!(db.logged_seat_events(schedule).await.len(), 13);
    db.assert_consistent().await;
}

/// The outcome of one booking's race.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Winner {
    Confirm,
    Cancel,
    Expiry,
}

impl Winner {
    fn terminal_event(self) -> &'static str {
        match self {
            Winner::Confirm => "CONFIRMED",
            Winner::Cancel | Winner::Expiry => "RELEASED",
        }
    }

    fn status(self) -> &'static str {
        match self {
            Winner::Confirm => "CONFIRMED",
            Winner::Cancel => "CANCELLED",
            Winner::Expiry => "EXPIRED",
        }
    }
}

/// Decides who won from the two answers, failing on any combination that
/// means both or neither did.
fn winner(confirm: &ApiResponse, cancel: Option<&ApiResponse>) -> Winner {
    let code = |r: &ApiResponse| r.body["code"].as_str().map(str::to_owned);
    match (confirm.status, cancel.map(|c| c.status)) {
        (200, None) => Winner::Confirm,
        (200, Some(409)) if cancel.and_then(code).as_deref() == Some("booking_confirmed") => {
            Winner::Confirm
        }
        (409, Some(200)) if code(confirm).as_deref() == Some("booking_cancelled") => Winner::Cancel,
        (410, None) | (410, Some(410)) => {
            confirm.assert_problem(410, "booking_expired");
            if let Some(c) = cancel {
                c.assert_problem(410, "booking_expired");
            }
            Winner::Expiry
        }
        _ => panic!(
            "no single winner: confirm {} {}, cancel {:?}",
            confirm.status,
            confirm.body,
            cancel.map(|c| (c.status, &c.body))
        ),
    }
}

/// Every booking's events, keyed by its (disjoint) seat set: exactly one
/// OCCUPIED, then exactly one terminal event naming the winner.
fn assert_one_terminal_event_each(events: &[LoggedEvent], expected: &[(SeatSet, Winner)]) {
    let mut by_seats: BTreeMap<&SeatSet, Vec<&str>> = BTreeMap::new();
    for e in events {
        by_seats.entry(&e.seats).or_default().push(&e.action);
    }
    assert_eq!(
        by_seats.len(),
        expected.len(),
        "events for unknown seat sets"
    );
    for (seats, w) in expected {
        assert_eq!(
            by_seats.get(seats).map(Vec::as_slice),
            Some(&["OCCUPIED", w.terminal_event()][..]),
            "events of the booking holding {seats:?} (winner {w:?})"
        );
    }
}

/// Booking `i` of a race gets its own two seats of a 4-column grid.
fn race_seats(i: usize) -> Vec<(i64, i64)> {
    let row = (i / 2 + 1) as i64;
    let col = (i % 2 * 2 + 1) as i64;
    vec![(row, col), (row, col + 1)]
}

/// After the races on two replicas: the snapshot (from the first) is at one
/// OCCUPIED and one terminal event per booking, the stream (from the
/// second) replays the log exactly, each booking's events name its winner,
/// and they rebuild the snapshot. The deadlocks, once both are stopped.
async fn assert_race_events(
    db: &TestDb,
    [r1, r2]: [Replica; 2],
    schedule: i64,
    expected: &[(SeatSet, Winner)],
) -> i64 {
    let (last, snap) = r1.snapshot(schedule).await;
    assert_eq!(
        last,
        2 * expected.len() as i64,
        "one OCCUPIED and one terminal event per booking"
    );
    let events = r2.replay_events(schedule, 0, last).await;
    assert_eq!(db.logged_seat_events(schedule).await, events);
    assert_one_terminal_event_each(&events, expected);
    assert_eq!(replayed_map(&events), snap);
    db.assert_consistent().await;
    db.deadlocks_after_shutdown(vec![r1, r2]).await
}

async fn start_all(r: &Replica, schedule: i64, tokens: &[String]) -> Vec<ApiResponse> {
    let started = join_all(
        tokens
            .iter()
            .enumerate()
            .map(|(i, t)| async move { r.start(t, schedule, &race_seats(i)).await }),
    )
    .await;
    for s in &started {
        assert_eq!(s.status, 201, "{}", s.body);
    }
    started
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn confirm_racing_cancel_has_exactly_one_winner() {
    let (db, r1, r2) = TestDb::with_two_replicas(ReplicaOpts::default()).await;
    let schedule = r1.create_schedule(20, 4, &[]).await;
    let tokens: [String; 40] = r1.guests().await;
    let n = tokens.len();
    let started = start_all(&r1, schedule, &tokens).await;

    // Confirm on one replica, cancel on the other, all at once.
    let results = join_all(started.iter().zip(&tokens).map(|(s, t)| {
        let id = s.booking_id();
        let (r1, r2) = (&r1, &r2);
        async move {
            let (confirm, cancel) = tokio::join!(r1.confirm(t, &id), r2.cancel(t, &id));
            (confirm, cancel)
        }
    }))
    .await;

    let mut expected = Vec::new();
    for (i, (confirm, cancel)) in results.iter().enumerate() {
        let w = winner(confirm, Some(cancel));
        assert_ne!(w, Winner::Expiry, "a 300 s hold cannot expire here");
        let got = r2.booking(&tokens[i], &started[i].booking_id()).await;
        assert_eq!(got.body["status"], w.status(), "{}", got.body);
        expected.push((set_of(&race_seats(i)), w));
    }

    let deadlocks = assert_race_events(&db, [r1, r2], schedule, &expected).await;
    let confirms = expected
        .iter()
        .filter(|(_, w)| *w == Winner::Confirm)
        .count();
    println!(
        "expiry (confirm vs cancel): {n} races: confirm won {confirms}, cancel won {}, deadlocks {deadlocks}",
        n - confirms
    );
    assert_eq!(deadlocks, 0, "transactions deadlocked");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn confirm_racing_expiry_has_exactly_one_winner() {
    let opts = ReplicaOpts::default().with("HOLD_SECONDS", 1);
    let (db, r1, r2) = TestDb::with_two_replicas(opts).await;
    let schedule = r1.create_schedule(20, 4, &[]).await;
    let tokens: [String; 40] = r1.guests().await;
    let n = tokens.len();
    let started = start_all(&r1, schedule, &tokens).await;

    // Each booking is raced at its own offset from expiry, -100..+95 ms,
    // against both replicas' sweepers; every other one also against a cancel.
    let results = join_all(started.iter().zip(&tokens).enumerate().map(|(i, (s, t))| {
        let id = s.booking_id();
        let expires_at = timestamp(&s.body["expiresAt"]);
        let at = expires_at + chrono::TimeDelta::milliseconds(-100 + 5 * i as i64);
        let (r1, r2) = (&r1, &r2);
        async move {
            sleep_until(at).await;
            let sent = Utc::now();
            let (confirm, cancel) = if i % 2 == 0 {
                let (a, b) = tokio::join!(r1.confirm(t, &id), r2.cancel(t, &id));
                (a, Some(b))
            } else {
                (r1.confirm(t, &id).await, None)
            };
            (sent, Utc::now(), expires_at, confirm, cancel)
        }
    }))
    .await;

    let mut expected = Vec::new();
    let mut counts = [0usize; 3];
    for (i, (sent, recv, expires_at, confirm, cancel)) in results.iter().enumerate() {
        let w = winner(confirm, cancel.as_ref());
        // By the database clock: a change that won was decided before
        // expiry, an expiry after it.
        match w {
            Winner::Confirm | Winner::Cancel => assert!(
                sent < expires_at,
                "booking {i} changed {} ms after its expiry",
                (*sent - *expires_at).num_milliseconds()
            ),
            Winner::Expiry => assert!(recv > expires_at, "booking {i} expired early"),
        }
        counts[w as usize] += 1;
        expected.push((set_of(&race_seats(i)), w));
    }

    let latest = results.iter().map(|r| r.2).max().unwrap();
    let left = (latest + RELEASE_WITHIN - Utc::now())
        .to_std()
        .unwrap_or_default();
    wait_all_settled(&db, schedule, left + Duration::from_millis(500)).await;
    for (i, s) in started.iter().enumerate() {
        let got = r2.booking(&tokens[i], &s.booking_id()).await;
        assert_eq!(got.body["status"], expected[i].1.status(), "{}", got.body);
    }
    let deadlocks = assert_race_events(&db, [r1, r2], schedule, &expected).await;
    println!(
        "expiry (confirm vs cancel vs expiry): {n} races: confirm won {}, cancel won {}, expiry won {}, deadlocks {deadlocks}",
        counts[0], counts[1], counts[2]
    );
    assert_eq!(deadlocks, 0, "transactions deadlocked");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sweepers_on_three_replicas_release_each_hold_once() {
    let db = TestDb::create().await;
    // Sweeping every 20 ms on three replicas keeps them contending.
    let opts = ReplicaOpts::default()
        .with("HOLD_SECONDS", 1)
        .with("SWEEP_INTERVAL_MS", 20);
    let (r1, r2, r3) = tokio::join!(
        Replica::spawn(&db, opts.clone()),
        Replica::spawn(&db, opts.clone()),
        Replica::spawn(&db, opts)
    );
    let replicas = [&r1, &r2, &r3];
    let schedules = [
        r1.create_schedule(15, 4, &[]).await,
        r2.create_schedule(15, 4, &[]).await,
    ];
    let tokens: [String; 30] = r1.guests().await;
    let per_schedule = tokens.len();

    // Every user holds two seats on each schedule, spread over the replicas,
    // all at once: they expire together.
    let started = join_all(schedules.iter().flat_map(|&schedule| {
        let tokens = &tokens;
        (0..per_schedule).map(move |i| async move {
            let r = replicas[i % 3];
            (
                schedule,
                i,
                r.start(&tokens[i], schedule, &race_seats(i)).await,
            )
        })
    }))
    .await;
    let mut latest = Utc::now();
    for (_, _, s) in &started {
        assert_eq!(s.status, 201, "{}", s.body);
        latest = latest.max(timestamp(&s.body["expiresAt"]));
    }

    let left = (latest + RELEASE_WITHIN - Utc::now())
        .to_std()
        .unwrap_or_default();
    for schedule in schedules {
        wait_all_settled(&db, schedule, left + Duration::from_millis(500)).await;
    }
    let mut late = Vec::new();
    for (_, _, s) in &started {
        let (status, expires_at, released_at) = booking_row(&db, &s.booking_id()).await;
        assert_eq!(status, "EXPIRED");
        assert!(released_at >= expires_at, "released before expiry");
        if released_at > expires_at + RELEASE_WITHIN {
            late.push((released_at - expires_at).num_milliseconds());
        }
    }
    assert!(
        late.is_empty(),
        "holds released later than 2 s after expiry: {late:?} ms"
    );

    let expected: Vec<(SeatSet, Winner)> = (0..per_schedule)
        .map(|i| (set_of(&race_seats(i)), Winner::Expiry))
        .collect();
    let mut released = 0;
    for (k, schedule) in schedules.into_iter().enumerate() {
        let (last, snap) = replicas[k].snapshot(schedule).await;
        assert!(snap.is_empty(), "{snap:?}");
        assert_eq!(
            last,
            2 * per_schedule as i64,
            "one RELEASED per hold, no more"
        );
        let events = replicas[2 - k].replay_events(schedule, 0, last).await;
        assert_eq!(db.logged_seat_events(schedule).await, events);
        assert_one_terminal_event_each(&events, &expected);
        released += events.iter().filter(|e| e.action == "RELEASED").count();
    }
    db.assert_consistent().await;
    let holds = started.len();
    let deadlocks = db.deadlocks_after_shutdown(vec![r1, r2, r3]).await;
    println!(
        "expiry (3 sweepers): {holds} holds expired together, {released} RELEASED events, deadlocks {deadlocks}"
    );
    assert_eq!(deadlocks, 0, "sweepers deadlocked");
}

/// Backends of the replicas blocked on a lock: (pid, pids blocking it).
async fn lock_waiters(c: &tokio_postgres::Client) -> Vec<(i32, Vec<i32>)> {
    c.query(
        "SELECT pid, pg_blocking_pids(pid) FROM pg_stat_activity \
         WHERE datname = current_database() AND application_name = 'seatsync' \
         AND wait_event_type = 'Lock' ORDER BY pid",
        &[],
    )
    .await
    .unwrap()
    .iter()
    .map(|r| (r.get(0), r.get(1)))
    .collect()
}

/// Whether backend `pid` finished its transaction (idle) or waits for `on`.
async fn done_or_waiting_on(c: &tokio_postgres::Client, pid: i32, on: i32) -> bool {
    let row = c
        .query_one(
            "SELECT state = 'idle', pg_blocking_pids(pid) FROM pg_stat_activity WHERE pid = $1",
            &[&pid],
        )
        .await
        .unwrap();
    row.get::<_, bool>(0) || row.get::<_, Vec<i32>>(1).contains(&on)
}

/// Two starts take over expired, unswept holds while a sweeper releases one
/// of them and something else (a confirm, another sweeper) briefly locks
/// the other. The test plays those two with its own transactions so they
/// land at the worst moments. Both starts must be answered, one 201 and one
/// 409 naming the winner's seats, without a deadlock: PostgreSQL breaks one
/// only after `deadlock_timeout`, stalling every hold queued behind it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn takeover_racing_a_sweep_does_not_deadlock() {
    let db = TestDb::create().await;
    let idle = ReplicaOpts::default().with("SWEEP_INTERVAL_MS", 60_000);
    let (short, r) = tokio::join!(
        Replica::spawn(&db, idle.clone().with("HOLD_SECONDS", 1)),
        Replica::spawn(&db, idle)
    );
    let schedule = short.create_schedule(1, 3, &[]).await;
    let (p, q, u1, u2) = (
        short.guest().await,
        short.guest().await,
        r.guest().await,
        r.guest().await,
    );
    let mut old = Vec::new();
    for (token, seat) in [(&p, (1, 1)), (&q, (1, 2))] {
        let b = short.hold(token, schedule, &[seat]).await;
        let id: uuid::Uuid = b.booking_id().parse().unwrap();
        old.push((id, seat, timestamp(&b.body["expiresAt"])));
    }
    // Overdue holds are taken over in booking-id order: `first` is met first.
    old.sort();
    let [(first_id, first_seat), (second_id, _)] = [(old[0].0, old[0].1), (old[1].0, old[1].1)];
    db.wait_clock_past(old.iter().map(|o| o.2).max().unwrap())
        .await;

    let watcher = db.client().await;
    let sweeper = db.client().await;
    let other = db.client().await;
    sweeper.execute("BEGIN", &[]).await.unwrap();
    sweeper
        .execute(
            "SELECT 1 FROM bookings WHERE id = $1 FOR UPDATE",
            &[&first_id],
        )
        .await
        .unwrap();
    other.execute("BEGIN", &[]).await.unwrap();
    other
        .execute(
            "SELECT 1 FROM bookings WHERE id = $1 FOR UPDATE",
            &[&second_id],
        )
        .await
        .unwrap();

    // A wants all three seats, B the first hold's seat and the free one.
    let a = r.start(&u1, schedule, &[(1, 1), (1, 2), (1, 3)]);
    let script = async {
        let a_pid = wait_for(
            "A to wait for the first hold",
            Duration::from_secs(10),
            || async {
                let w = lock_waiters(&watcher).await;
                (w.len() == 1).then(|| w[0].0)
            },
        )
        .await;
        // The sweeper releases the first hold, as `release_expired` does.
        sweeper
            .execute(
                "UPDATE bookings SET status = 'EXPIRED', updated_at = clock_timestamp() WHERE id = $1",
                &[&first_id],
            )
            .await
            .unwrap();
        sweeper
            .execute(
                "DELETE FROM schedule_seat_status WHERE booking_id = $1",
                &[&first_id],
            )
            .await
            .unwrap();
        sweeper
            .execute(
                "WITH bumped AS (UPDATE schedule_event_counters SET last_event_id = last_event_id + 1 \
                   WHERE schedule_id = $1 RETURNING last_event_id) \
                 INSERT INTO seat_events (schedule_id, event_id, action, seats) \
                 SELECT $1, last_event_id, 'RELEASED', $2 FROM bumped",
                &[
                    &schedule,
                    &json!([{"row": first_seat.0, "col": first_seat.1}]),
                ],
            )
            .await
            .unwrap();
        let b_seats = [first_seat, (1, 3)];
        let b = r.start(&u2, schedule, &b_seats);
        let steps = async {
            let b_pid = wait_for("B to wait", Duration::from_secs(10), || async {
                let w = lock_waiters(&watcher).await;
                w.iter().find(|(pid, _)| *pid != a_pid).map(|(pid, _)| *pid)
            })
            .await;
            sweeper.execute("COMMIT", &[]).await.unwrap();
            // A is now held up by the other lock; B either finishes or
            // waits for A.
            wait_for(
                "B to finish or wait for A",
                Duration::from_secs(10),
                || async {
                    done_or_waiting_on(&watcher, b_pid, a_pid)
                        .await
                        .then_some(())
                },
            )
            .await;
            other.execute("ROLLBACK", &[]).await.unwrap();
        };
        tokio::join!(b, steps).0
    };
    let (a, b) = tokio::join!(a, script);

    assert!(a.status < 500 && b.status < 500, "{} / {}", a.body, b.body);
    let (winner, loser) = match (a.status, b.status) {
        (201, 409) => (&a, &b),
        (409, 201) => (&b, &a),
        _ => panic!("expected one 201 and one 409: {} / {}", a.body, b.body),
    };
    loser.assert_problem(409, "seats_taken");
    let won = seat_set(&winner.body["seats"]);
    assert!(seat_set(&loser.body["seats"]).is_subset(&won));
    let (_, snap) = r.snapshot(schedule).await;
    assert!(won.iter().all(|s| snap.contains_key(s)), "{snap:?}");
    db.assert_consistent().await;
    assert_eq!(
        db.deadlocks_after_shutdown(vec![short, r]).await,
        0,
        "the hold transactions deadlocked"
    );
}
