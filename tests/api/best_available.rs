//! Best available: `{"scheduleId", "quantity"}` holds the best block of
//! adjacent free seats, chosen by the server, with the same guarantees as a
//! start that names its seats.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use futures::future::join_all;
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use reqwest::Method;
use serde_json::{json, Value};

use crate::helpers::*;

fn best(schedule: i64, quantity: u64) -> Value {
    json!({"scheduleId": schedule, "quantity": quantity})
}

async fn start_best(r: &Replica, token: &str, schedule: i64, quantity: u64) -> ApiResponse {
    r.post(
        "/api/bookings/start",
        Some(token),
        Some(best(schedule, quantity)),
    )
    .await
}

/// A start of `body` under the one Idempotency-Key these tests use.
async fn keyed(r: &Replica, token: &str, body: Value) -> ApiResponse {
    r.request(
        Method::POST,
        "/api/bookings/start",
        Some(token),
        Some(body),
        &[("Idempotency-Key", "party-of-two")],
    )
    .await
}

/// Free seats of a row with no free neighbour: nobody can sit beside anyone.
fn orphans(rows: i64, cols: i64, taken: &SeatSet) -> usize {
    let free = |r: i64, c: i64| (1..=cols).contains(&c) && !taken.contains(&(r, c));
    (1..=rows)
        .flat_map(|r| (1..=cols).map(move |c| (r, c)))
        .filter(|&(r, c)| free(r, c) && !free(r, c - 1) && !free(r, c + 1))
        .count()
}

/// The longest run of free seats in any row.
fn largest_block(rows: i64, cols: i64, taken: &SeatSet) -> i64 {
    let mut best = 0;
    for r in 1..=rows {
        let mut run = 0;
        for c in 1..=cols {
            run = if taken.contains(&(r, c)) { 0 } else { run + 1 };
            best = best.max(run);
        }
    }
    best
}

#[tokio::test]
async fn best_available_holds_the_best_block_and_keeps_the_contract() {
    let (db, r) = TestDb::with_replica(ReplicaOpts::default()).await;
    // Row 1: seat 1 blocked. The centre block 3-4 would strand seat 2, so
    // the best block is 2-3 (as central as 4-5, which strands seat 6).
    let schedule = r.create_schedule(2, 6, &[(1, 1)]).await;
    let mut sse = r.subscribe(schedule, None).await;
    let [alice, bob, carol] = r.guests().await;

    let held = keyed(&r, &alice, best(schedule, 2)).await;
    assert_eq!(held.status, 201, "{}", held.body);
    assert_eq!(seat_set(&held.body["seats"]), set_of(&[(1, 2), (1, 3)]));
    assert_eq!(held.body["status"], "PENDING");
    match sse.next_event(Duration::from_secs(2)).await {
        Some(SseFrame::Event { action, seats, .. }) => {
            assert_eq!(action, "OCCUPIED");
            assert_eq!(set_of(&seats), set_of(&[(1, 2), (1, 3)]));
        }
        other => panic!("{other:?}"),
    }

    // Idempotency: the same body gets the same seats; another body (another
    // quantity, or seats instead) is a reused key.
    let replay = keyed(&r, &alice, best(schedule, 2)).await;
    assert_eq!(replay.status, 201, "{}", replay.body);
    assert_eq!(replay.body["bookingId"], held.body["bookingId"]);
    assert_eq!(replay.body["seats"], held.body["seats"]);
    for other in [best(schedule, 3), start_body(schedule, &[(1, 2), (1, 3)])] {
        keyed(&r, &alice, other)
            .await
            .assert_problem(409, "idempotency_key_reused");
    }
    // One pending booking per user and schedule, whichever way it was made.
    let again = start_best(&r, &alice, schedule, 1).await;
    again.assert_problem(409, "booking_in_progress");
    assert_eq!(again.body["bookingId"], held.body["bookingId"]);

    // Row 1 has 4-6 left: either pair strands a seat, and the front row
    // still comes first, so the more central pair.
    let next = start_best(&r, &bob, schedule, 2).await;
    assert_eq!(next.status, 201, "{}", next.body);
    assert_eq!(seat_set(&next.body["seats"]), set_of(&[(1, 4), (1, 5)]));

    // No block of 4 in row 1. In row 2 the centre block 2-5 would strand
    // seat 1; 1-4 and 3-6 strand nothing and are as central: the lower.
    let four = start_best(&r, &carol, schedule, 4).await;
    assert_eq!(four.status, 201, "{}", four.body);
    assert_eq!(
        seat_set(&four.body["seats"]),
        set_of(&[(2, 1), (2, 2), (2, 3), (2, 4)])
    );

    // Too long for what is left: no_seats_together with the longest run
    // (row 2, seats 5-6).
    let [dave] = r.guests().await;
    let none = start_best(&r, &dave, schedule, 3).await;
    none.assert_problem(409, "no_seats_together");
    assert_eq!(none.body["largestBlock"], 2, "{}", none.body);
    db.assert_consistent().await;
}

#[tokio::test]
async fn bad_best_available_bodies_are_refused_and_change_nothing() {
    let (db, r) = TestDb::with_replica(ReplicaOpts::default()).await;
    let schedule = r.create_schedule(2, 3, &[]).await;
    let token = r.guest().await;
    let cases = [
        (json!({"scheduleId": schedule, "quantity": 0}), "quantity"),
        (json!({"scheduleId": schedule, "quantity": 5}), "quantity"),
        (json!({"scheduleId": schedule, "quantity": -1}), "quantity"),
        (json!({"scheduleId": schedule, "quantity": 2.5}), "quantity"),
        (json!({"scheduleId": schedule, "quantity": "2"}), "quantity"),
        (
            json!({"scheduleId": schedule, "quantity": null}),
            "quantity",
        ),
        (json!({"scheduleId": schedule, "quantity": [2]}), "quantity"),
        (
            json!({"scheduleId": schedule, "quantity": 2, "seats": [{"row": 1, "col": 1}]}),
            "quantity",
        ),
        (json!({"scheduleId": schedule, "seats": null}), "seats"),
        (json!({"scheduleId": schedule}), "seats"),
        (
            json!({"scheduleId": schedule, "quantity": 2, "extra": 1}),
            "extra",
        ),
    ];
    for (body, field) in &cases {
        let resp = r
            .post("/api/bookings/start", Some(&token), Some(body.clone()))
            .await;
        resp.assert_problem(400, "invalid_request");
        assert_eq!(resp.body["field"], *field, "{body}: {}", resp.body);
    }
    // A party longer than any row is valid, and simply does not fit.
    let long = start_best(&r, &token, schedule, 4).await;
    long.assert_problem(409, "no_seats_together");
    assert_eq!(long.body["largestBlock"], 3);
    r.post(
        "/api/bookings/start",
        Some(&token),
        Some(best(schedule + 1000, 2)),
    )
    .await
    .assert_problem(404, "schedule_not_found");

    assert_eq!(db.count("SELECT count(*) FROM bookings", &[]).await, 0);
    assert_eq!(db.count("SELECT count(*) FROM seat_events", &[]).await, 0);
    println!(
        "{} bad best-available bodies refused, nothing written",
        cases.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_parties_on_two_replicas_fill_the_hall_with_disjoint_blocks() {
    const ROWS: i64 = 20;
    const COLS: i64 = 25;
    let (db, a, b) = TestDb::with_two_replicas(ReplicaOpts::default()).await;
    let schedule = a.create_schedule(ROWS, COLS, &[]).await;
    let replicas = [a, b];
    let tokens: [String; 1000] = replicas[0].guests().await;
    let mut rng = StdRng::seed_from_u64(0x5ea7_3000);
    let plan: Vec<(usize, u64)> = (0..tokens.len())
        .map(|u| (u, rng.random_range(1..=4u64)))
        .collect();

    let started = Instant::now();
    let answers: Vec<(u64, ApiResponse)> = join_all(plan.iter().map(|&(user, quantity)| {
        let r = &replicas[user % 2];
        let token = &tokens[user];
        async move { (quantity, start_best(r, token, schedule, quantity).await) }
    }))
    .await;
    let took = started.elapsed();

    let mut holder: BTreeMap<(i64, i64), String> = BTreeMap::new();
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    let mut refused_sizes = Vec::new();
    for (quantity, resp) in &answers {
        assert!(resp.status < 500, "{}: {}", resp.status, resp.body);
        match resp.status {
            201 => {
                let seats: Vec<(i64, i64)> = seat_set(&resp.body["seats"]).into_iter().collect();
                assert_eq!(seats.len() as u64, *quantity, "{}", resp.body);
                // Adjacent, one row.
                assert!(seats
                    .windows(2)
                    .all(|w| w[0].0 == w[1].0 && w[0].1 + 1 == w[1].1));
                for seat in seats {
                    if let Some(other) = holder.insert(seat, resp.booking_id()) {
                        panic!("seat {seat:?} held by {other} and {}", resp.body);
                    }
                }
            }
            409 => {
                assert_eq!(resp.body["code"], "no_seats_together", "{}", resp.body);
                let largest = resp.body["largestBlock"].as_u64().unwrap();
                assert!(largest < *quantity, "{}", resp.body);
                refused_sizes.push((*quantity, largest));
            }
            other => panic!("unexpected {other}: {}", resp.body),
        }
        *counts
            .entry(resp.body["code"].as_str().unwrap_or("held").to_owned())
            .or_default() += 1;
    }

    // The snapshot is exactly the union of the holds.
    let (_, snapshot) = replicas[1].snapshot(schedule).await;
    let taken: SeatSet = snapshot.keys().copied().collect();
    assert_eq!(taken, holder.keys().copied().collect::<SeatSet>());
    // Seats are only ever taken here, so a block too short when a party was
    // refused is too short at the end: no refusal while a block was free.
    let largest_now = largest_block(ROWS, COLS, &taken);
    for (quantity, largest_then) in &refused_sizes {
        assert!(
            largest_now < *quantity as i64 && largest_now <= *largest_then as i64,
            "refused a party of {quantity} (largest then {largest_then}) yet {largest_now} are free together"
        );
    }
    let orphaned = orphans(ROWS, COLS, &taken);
    let deadlocks = db
        .deadlocks_after_shutdown(replicas.into_iter().collect())
        .await;
    println!(
        "1000 best-available starts (1-4 seats) on 2 replicas, {} seats: {counts:?} in {:.2} s; \
         {} seats held, {} free, largest free block {largest_now}, orphaned single seats {orphaned}, deadlocks {deadlocks}",
        ROWS * COLS,
        took.as_secs_f64(),
        taken.len(),
        ROWS * COLS - taken.len() as i64,
    );
    assert_eq!(deadlocks, 0);
    db.assert_consistent().await;
}
