//! Doomed starts answered from a replica's live seat map: only when the map
//! can prove the seats are taken at a recent committed state, never for a
//! seat free by the database clock, and never across a gap.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use futures::future::join_all;
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use serde_json::Value;

use crate::helpers::*;

fn from_memory(resp: &ApiResponse) -> bool {
    resp.headers
        .get("x-answered-from")
        .is_some_and(|v| v == "memory")
}

/// Starts `seats` as `token` on `r` until the answer comes from memory.
async fn until_from_memory(
    r: &Replica,
    token: &str,
    schedule: i64,
    seats: &[(i64, i64)],
) -> ApiResponse {
    wait_for(
        "an answer from the live map",
        Duration::from_secs(10),
        || async {
            let resp = r.start(token, schedule, seats).await;
            from_memory(&resp).then_some(resp)
        },
    )
    .await
}

#[tokio::test]
async fn a_live_map_answers_doomed_starts_exactly_and_nothing_else() {
    let (db, a, b) = TestDb::with_two_replicas(ReplicaOpts::default()).await;
    let schedule = a.create_schedule(3, 4, &[]).await;
    let [alice, bob] = a.guests().await;
    let held = a.hold(&alice, schedule, &[(1, 1)]).await;

    let doomed = until_from_memory(&b, &bob, schedule, &[(1, 1)]).await;
    doomed.assert_problem(409, "seats_taken");
    assert_eq!(seat_set(&doomed.body["seats"]), set_of(&[(1, 1)]));
    // Exactly the taken ones of what was asked.
    let mixed = b.start(&bob, schedule, &[(1, 1), (1, 2)]).await;
    assert!(from_memory(&mixed));
    assert_eq!(seat_set(&mixed.body["seats"]), set_of(&[(1, 1)]));
    // Her own seats: the database answers booking_in_progress.
    let own = b.start(&alice, schedule, &[(1, 1)]).await;
    own.assert_problem(409, "booking_in_progress");
    assert!(!from_memory(&own));
    // A free seat: only the database holds it.
    let free = b.start(&bob, schedule, &[(2, 2)]).await;
    assert_eq!(free.status, 201, "{}", free.body);
    assert!(!from_memory(&free));
    // Sold seats too.
    assert_eq!(a.confirm(&alice, &held.booking_id()).await.status, 200);
    let [carol] = a.guests().await;
    let sold = until_from_memory(&b, &carol, schedule, &[(1, 1)]).await;
    assert_eq!(seat_set(&sold.body["seats"]), set_of(&[(1, 1)]));
    assert!(b.metric("seatsync_booking_starts_total").await >= 4.0);
    db.assert_consistent().await;
}

#[tokio::test]
async fn a_seat_released_by_cancel_is_free_on_another_replica_once_its_stream_carried_it() {
    let (db, a, b) = TestDb::with_two_replicas(ReplicaOpts::default()).await;
    let schedule = a.create_schedule(2, 2, &[]).await;
    let [alice, bob] = a.guests().await;
    let held = a.hold(&alice, schedule, &[(1, 1)]).await;
    until_from_memory(&b, &bob, schedule, &[(1, 1)]).await;

    let mut stream = b.subscribe(schedule, None).await;
    assert_eq!(a.cancel(&alice, &held.booking_id()).await.status, 200);
    match stream.next_event(Duration::from_secs(5)).await {
        Some(SseFrame::Event { action, .. }) => assert_eq!(action, "RELEASED"),
        other => panic!("{other:?}"),
    }
    let started = Instant::now();
    let resp = b.start(&bob, schedule, &[(1, 1)]).await;
    assert_eq!(resp.status, 201, "{}", resp.body);
    println!(
        "live map: a start right after the RELEASED reached replica B's stream got 201 in {:?}",
        started.elapsed()
    );
    db.assert_consistent().await;
}

#[tokio::test]
async fn a_hold_past_its_expiry_is_never_answered_from_memory() {
    let opts = ReplicaOpts::default()
        .with("HOLD_SECONDS", 3)
        // The sweeper idles: the expired hold stays in the tables.
        .with("SWEEP_INTERVAL_MS", 60_000);
    let (db, a, b) = TestDb::with_two_replicas(opts).await;
    let schedule = a.create_schedule(2, 2, &[]).await;
    let [alice, bob] = a.guests().await;
    let held = a.hold(&alice, schedule, &[(1, 1)]).await;
    let expires: DateTime<Utc> = timestamp(&held.body["expiresAt"]);
    let doomed = until_from_memory(&b, &bob, schedule, &[(1, 1)]).await;
    doomed.assert_problem(409, "seats_taken");

    db.wait_clock_past(expires).await;
    assert_eq!(
        db.overdue_holds(schedule).await,
        1,
        "the sweeper must not have run"
    );
    let resp = b.start(&bob, schedule, &[(1, 1)]).await;
    assert_eq!(
        resp.status, 201,
        "an expired, unswept hold got {}",
        resp.body
    );
    assert!(!from_memory(&resp));
    db.assert_consistent().await;
}

#[tokio::test]
async fn a_listener_cut_makes_the_map_step_aside_until_it_is_caught_up() {
    let (db, a, b) = TestDb::with_two_replicas(ReplicaOpts::default()).await;
    let schedule = a.create_schedule(2, 3, &[]).await;
    let [alice, bob, carol] = a.guests().await;
    let held = a.hold(&alice, schedule, &[(1, 1)]).await;
    until_from_memory(&b, &bob, schedule, &[(1, 1)]).await;
    let reconnects = b.metric("seatsync_listener_reconnects_total").await;

    // Cut every listener and release the seat at once: B may miss the
    // RELEASED notification entirely.
    let c = db.client().await;
    c.execute(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
         WHERE datname = current_database() AND application_name = 'seatsync-listener'",
        &[],
    )
    .await
    .unwrap();
    assert_eq!(a.cancel(&alice, &held.booking_id()).await.status, 200);
    wait_for("B's listener back", Duration::from_secs(10), || async {
        (b.metric("seatsync_listener_reconnects_total").await > reconnects && b.ready().await)
            .then_some(())
    })
    .await;
    // The seat is free, whatever B's map knew before the cut.
    let resp = b.start(&bob, schedule, &[(1, 1)]).await;
    assert_eq!(resp.status, 201, "{}", resp.body);

    // A fresh map answers again once loaded.
    a.hold(&carol, schedule, &[(2, 2)]).await;
    let [dave] = a.guests().await;
    let again = until_from_memory(&b, &dave, schedule, &[(2, 2)]).await;
    assert_eq!(seat_set(&again.body["seats"]), set_of(&[(2, 2)]));
    db.assert_consistent().await;
}

#[tokio::test]
async fn a_party_that_cannot_sit_together_is_refused_from_memory() {
    let (db, a, b) = TestDb::with_two_replicas(ReplicaOpts::default()).await;
    let schedule = a.create_schedule(1, 4, &[]).await;
    let [alice, carol, bob] = a.guests().await;
    a.hold(&alice, schedule, &[(1, 1)]).await;
    a.hold(&carol, schedule, &[(1, 3)]).await;
    let body = serde_json::json!({"scheduleId": schedule, "quantity": 2});
    let refused = wait_for(
        "a best-available answer from the live map",
        Duration::from_secs(10),
        || async {
            let resp = b
                .post("/api/bookings/start", Some(&bob), Some(body.clone()))
                .await;
            from_memory(&resp).then_some(resp)
        },
    )
    .await;
    refused.assert_problem(409, "no_seats_together");
    assert_eq!(refused.body["largestBlock"], 1);
    // A party that fits goes to the database and is held.
    let one = b
        .post(
            "/api/bookings/start",
            Some(&bob),
            Some(serde_json::json!({"scheduleId": schedule, "quantity": 1})),
        )
        .await;
    assert_eq!(one.status, 201, "{}", one.body);
    assert!(!from_memory(&one));
    db.assert_consistent().await;
}

/// Event log rows with their commit-side timestamp.
async fn event_log(db: &TestDb, schedule: i64) -> Vec<(i64, String, SeatSet, DateTime<Utc>)> {
    db.client()
        .await
        .query(
            "SELECT event_id, action, seats, created_at FROM seat_events \
             WHERE schedule_id = $1 ORDER BY event_id",
            &[&schedule],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| {
            (
                r.get(0),
                r.get(1),
                seat_set(&r.get::<_, Value>(2)),
                r.get(3),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_a_storm_every_answer_from_memory_named_seats_really_taken() {
    const ROWS: i64 = 4;
    const COLS: i64 = 8;
    let (db, a, b) = TestDb::with_two_replicas(ReplicaOpts::default()).await;
    let schedule = a.create_schedule(ROWS, COLS, &[]).await;
    let replicas = [a, b];
    let tokens: [String; 160] = replicas[0].guests().await;
    let mut rng = StdRng::seed_from_u64(0x5ea7_4000);

    // Waves of starts over a small hall, with some holders cancelling, so
    // seats are taken and freed while doomed starts keep coming.
    let mut answers: Vec<(Instant, Instant, SeatSet, ApiResponse)> = Vec::new();
    let started = Instant::now();
    let origin_wall = Utc::now();
    for wave in 0..8 {
        let plan: Vec<(usize, Vec<(i64, i64)>)> = (0..tokens.len())
            .map(|u| {
                let n = rng.random_range(1..=2i64);
                let row = rng.random_range(1..=ROWS);
                let col = rng.random_range(1..=COLS - 1);
                (u, (0..n).map(|i| (row, col + i)).collect())
            })
            .collect();
        let wave_answers = join_all(plan.iter().map(|(u, seats)| {
            let r = &replicas[(u + wave) % 2];
            let token = &tokens[*u];
            async move {
                let sent = Instant::now();
                let resp = r.start(token, schedule, seats).await;
                (sent, Instant::now(), set_of(seats), resp)
            }
        }))
        .await;
        for (_, _, _, resp) in &wave_answers {
            assert!(resp.status < 500, "{}", resp.body);
        }
        // Half of this wave's holders cancel.
        let cancels = wave_answers
            .iter()
            .enumerate()
            .filter(|(i, (_, _, _, r))| r.status == 201 && i % 2 == 0);
        join_all(cancels.map(|(i, (_, _, _, r))| {
            let user = plan[i].0;
            let replica = &replicas[user % 2];
            let token = &tokens[user];
            async move { assert_eq!(replica.cancel(token, &r.booking_id()).await.status, 200) }
        }))
        .await;
        answers.extend(wave_answers);
    }

    // Every seat's taken intervals, in event ids, from the log.
    let log = event_log(&db, schedule).await;
    let mut taken_since: BTreeMap<(i64, i64), i64> = BTreeMap::new();
    let mut intervals: BTreeMap<(i64, i64), Vec<(i64, i64)>> = BTreeMap::new();
    for (id, action, seats, _) in &log {
        for seat in seats {
            match action.as_str() {
                "OCCUPIED" => {
                    taken_since.insert(*seat, *id);
                }
                "RELEASED" => {
                    let from = taken_since.remove(seat).expect("released a held seat");
                    intervals.entry(*seat).or_default().push((from, *id));
                }
                _ => {}
            }
        }
    }
    for (seat, from) in taken_since {
        intervals.entry(seat).or_default().push((from, i64::MAX));
    }
    let time_of = |id: i64| log.iter().find(|e| e.0 == id).map(|e| e.3);
    let (mut memory, mut database) = (0, 0);
    for (sent, recv, _, resp) in &answers {
        if resp.status != 409 || resp.body["code"] != "seats_taken" {
            continue;
        }
        if !from_memory(resp) {
            database += 1;
            continue;
        }
        memory += 1;
        let named = seat_set(&resp.body["seats"]);
        // Some committed state had all of them taken at once: a state is an
        // event id k, each seat taken over [from, to) containing k.
        let candidates: Vec<i64> = named
            .iter()
            .flat_map(|s| {
                intervals
                    .get(s)
                    .into_iter()
                    .flatten()
                    .map(|(from, _)| *from)
            })
            .collect();
        let state = candidates.into_iter().filter(|k| {
            named.iter().all(|s| {
                intervals
                    .get(s)
                    .is_some_and(|iv| iv.iter().any(|(from, to)| from <= k && k < to))
            })
        });
        // ... and it was recent: it still held, or ended, no earlier than
        // shortly before the start was sent.
        let sent_wall = origin_wall + chrono::Duration::from_std(*sent - started).unwrap();
        let recv_wall = origin_wall + chrono::Duration::from_std(*recv - started).unwrap();
        let recent = state.into_iter().any(|k| {
            let ends: Vec<i64> = named
                .iter()
                .map(|s| {
                    intervals[s]
                        .iter()
                        .find(|(from, to)| *from <= k && k < *to)
                        .map_or(i64::MAX, |(_, to)| *to)
                })
                .collect();
            let until = ends.into_iter().min().unwrap_or(i64::MAX);
            let began = time_of(k).unwrap_or(recv_wall);
            began <= recv_wall
                && (until == i64::MAX
                    || time_of(until).is_none_or(|t| t >= sent_wall - chrono::Duration::seconds(2)))
        });
        assert!(
            recent,
            "answered from memory, but {named:?} were never taken together lately: {}",
            resp.body
        );
    }
    println!(
        "live map storm: {} starts on 2 replicas in {:.1} s; 409 seats_taken answered from memory {memory}, from the database {database}; \
         every answer from memory named seats taken together at a committed state at most 2 s before it was sent",
        answers.len(),
        started.elapsed().as_secs_f64()
    );
    assert!(memory > 0, "the live map never answered");
    db.assert_consistent().await;
}
