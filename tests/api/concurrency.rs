//! Hundreds of overlapping holds from many users on two replicas sharing one
//! database: the database must decide every race, and every answer must be
//! true (a 201 holds its seats alone, a 409 names seats that really were
//! held by someone whose hold succeeded).

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use futures::future::join_all;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{RngExt, SeedableRng};

use crate::helpers::*;

/// Far above how long a committed change takes to reach every replica.
const NOTIFICATION_DELAY_BOUND: Duration = Duration::from_secs(1);

const ROWS: i64 = 4;
const COLS: i64 = 6;

/// One `start` and what came of it, with the instants it was sent and
/// answered (a hold decided by the server lies between the two).
struct Attempt {
    user: usize,
    requested: SeatSet,
    resp: ApiResponse,
    sent: Instant,
    recv: Instant,
}

async fn timed_start(
    r: &Replica,
    user: usize,
    token: &str,
    schedule: i64,
    seats: &[(i64, i64)],
) -> Attempt {
    let sent = Instant::now();
    let resp = r.start(token, schedule, seats).await;
    Attempt {
        user,
        requested: seats.iter().copied().collect(),
        resp,
        sent,
        recv: Instant::now(),
    }
}

/// Two replicas on a fresh database, and a schedule of the small grid.
async fn two_replicas_and_a_schedule() -> (TestDb, [Replica; 2], i64) {
    let (db, a, b) = TestDb::with_two_replicas(ReplicaOpts::default()).await;
    let schedule = a.create_schedule(ROWS, COLS, &[]).await;
    (db, [a, b], schedule)
}

/// The seats a `seats_taken` answer names: at least one, all requested.
fn taken_seats(a: &Attempt) -> SeatSet {
    let taken = seat_set(&a.resp.body["seats"]);
    assert!(
        !taken.is_empty() && taken.is_subset(&a.requested),
        "{}",
        a.resp.body
    );
    taken
}

fn assert_no_server_error(what: &str, resp: &ApiResponse) {
    assert!(
        resp.status < 500,
        "{what} got {}: {}",
        resp.status,
        resp.body
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overlapping_starts_on_two_replicas_never_double_book() {
    let (db, replicas, schedule) = two_replicas_and_a_schedule().await;
    let tokens: [String; 240] = replicas[0].guests().await;
    let users = tokens.len();

    // Every user sends two different holds at once, one to each replica, so
    // the one-pending-booking rule is raced across processes too.
    let mut rng = StdRng::seed_from_u64(0x5ea7_0001);
    // (user, replica, seats)
    let mut plan: Vec<_> = (0..users)
        .flat_map(|u| [(u, 0), (u, 1)])
        .map(|(u, replica)| (u, replica, random_seats(&mut rng, ROWS, COLS)))
        .collect();
    plan.shuffle(&mut rng);

    let attempts: Vec<Attempt> = join_all(plan.iter().map(|(user, replica, seats)| {
        let r = &replicas[*replica];
        let token = &tokens[*user];
        async move { timed_start(r, *user, token, schedule, seats).await }
    }))
    .await;

    for a in &attempts {
        assert_no_server_error("start", &a.resp);
    }
    let held: Vec<&Attempt> = attempts.iter().filter(|a| a.resp.status == 201).collect();
    let mut holder_of: HashMap<(i64, i64), &Attempt> = HashMap::new();
    let mut booking_of_user: HashMap<usize, String> = HashMap::new();
    for a in &held {
        assert_eq!(a.resp.body["status"], "PENDING", "{}", a.resp.body);
        assert_eq!(a.resp.body["scheduleId"], schedule);
        assert_eq!(
            seat_set(&a.resp.body["seats"]),
            a.requested,
            "201 must hold exactly what was asked"
        );
        for seat in &a.requested {
            if let Some(other) = holder_of.insert(*seat, a) {
                panic!(
                    "seat {seat:?} held by two bookings: {} and {}",
                    other.resp.body, a.resp.body
                );
            }
        }
        assert!(
            booking_of_user
                .insert(a.user, a.resp.booking_id())
                .is_none(),
            "user {} got two pending bookings for one schedule",
            a.user
        );
    }
    let union: SeatSet = holder_of.keys().copied().collect();

    let (mut seats_taken, mut in_progress) = (0, 0);
    for a in attempts.iter().filter(|a| a.resp.status != 201) {
        assert_eq!(a.resp.status, 409, "unexpected answer: {}", a.resp.body);
        match a.resp.body["code"].as_str() {
            Some("seats_taken") => {
                seats_taken += 1;
                a.resp.assert_problem(409, "seats_taken");
                let taken = seat_set(&a.resp.body["seats"]);
                assert!(
                    !taken.is_empty(),
                    "seats_taken names no seat: {}",
                    a.resp.body
                );
                assert!(
                    taken.is_subset(&a.requested),
                    "{} is not a subset of {:?}",
                    a.resp.body,
                    a.requested
                );
                for seat in &taken {
                    // Nothing is released in this test, so the holder at the
                    // time of the 409 is the holder now, and its hold
                    // committed before this answer arrived.
                    let holder = holder_of.get(seat).unwrap_or_else(|| {
                        panic!(
                            "{seat:?} reported taken but no 201 holds it: {}",
                            a.resp.body
                        )
                    });
                    assert!(
                        holder.sent < a.recv,
                        "{seat:?} reported taken before its holder asked"
                    );
                }
            }
            Some("booking_in_progress") => {
                in_progress += 1;
                a.resp.assert_problem(409, "booking_in_progress");
                let mine = booking_of_user.get(&a.user).unwrap_or_else(|| {
                    panic!(
                        "booking_in_progress for a user with no hold: {}",
                        a.resp.body
                    )
                });
                assert_eq!(a.resp.body["bookingId"].as_str(), Some(mine.as_str()));
            }
            other => panic!("unexpected 409 {other:?}: {}", a.resp.body),
        }
    }

    // The snapshot (from either replica) is exactly the union of the holds.
    let expected: BTreeMap<(i64, i64), String> =
        union.iter().map(|s| (*s, "OCCUPIED".to_owned())).collect();
    let (last, snap) = replicas[1].snapshot(schedule).await;
    assert_eq!(snap, expected, "snapshot differs from the successful holds");
    assert_eq!(replicas[0].snapshot(schedule).await.1, expected);

    // One OCCUPIED event per successful hold, and nothing else.
    let events = replicas[0].replay_events(schedule, 0, last).await;
    assert_eq!(last as usize, held.len(), "one event per successful hold");
    assert!(events.iter().all(|e| e.action == "OCCUPIED"));
    let mut event_sets: Vec<SeatSet> = events.iter().map(|e| e.seats.clone()).collect();
    let mut held_sets: Vec<SeatSet> = held.iter().map(|a| a.requested.clone()).collect();
    event_sets.sort();
    held_sets.sort();
    assert_eq!(event_sets, held_sets);
    assert_eq!(replayed_map(&events), snap);
    db.assert_consistent().await;
    let deadlocks = db.deadlocks_after_shutdown(replicas.into()).await;

    println!(
        "concurrency: {} starts from {users} users on 2 replicas: held {} ({} seats of {}), seats_taken {seats_taken}, booking_in_progress {in_progress}, deadlocks {deadlocks}",
        attempts.len(),
        held.len(),
        union.len(),
        ROWS * COLS
    );
    assert_eq!(deadlocks, 0, "hold transactions deadlocked");
}

/// What one user did in the mixed test, in order.
enum Step {
    Start(Attempt),
    Confirm {
        booking: String,
        resp: ApiResponse,
    },
    Cancel {
        booking: String,
        resp: ApiResponse,
        sent: Instant,
        recv: Instant,
    },
}

/// A booking that got a 201, and how its hold ended (if it did).
struct Hold {
    user: usize,
    seats: SeatSet,
    start_sent: Instant,
    start_recv: Instant,
    confirmed: bool,
    /// Sent and answered instants of the cancel that released it.
    released: Option<(Instant, Instant)>,
}

async fn user_session(
    replicas: &[Replica; 2],
    user: usize,
    token: &str,
    schedule: i64,
    rounds: usize,
) -> Vec<Step> {
    let mut rng = StdRng::seed_from_u64(0x5ea7_1000 + user as u64);
    let mut steps = Vec::new();
    for round in 0..rounds {
        let r = &replicas[(user + round) % 2];
        let other = &replicas[(user + round + 1) % 2];
        let seats = random_seats(&mut rng, ROWS, COLS);
        let attempt = timed_start(r, user, token, schedule, &seats).await;
        let booking = (attempt.resp.status == 201).then(|| attempt.resp.booking_id());
        steps.push(Step::Start(attempt));
        let Some(booking) = booking else { continue };
        // Mostly cancels, so seats keep changing hands while others start.
        match rng.random_range(0..100) {
            0..10 => {
                let resp = other.confirm(token, &booking).await;
                steps.push(Step::Confirm { booking, resp });
            }
            10..92 => {
                let sent = Instant::now();
                let resp = other.cancel(token, &booking).await;
                let recv = Instant::now();
                steps.push(Step::Cancel {
                    booking,
                    resp,
                    sent,
                    recv,
                });
            }
            // Keep it pending: this user's later starts must be refused.
            _ => {}
        }
    }
    steps
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn starts_confirms_and_cancels_interleaved_keep_the_invariant() {
    let (db, replicas, schedule) = two_replicas_and_a_schedule().await;
    let tokens: [String; 120] = replicas[0].guests().await;
    let users = tokens.len();
    let rounds = 6;

    let sessions: Vec<Vec<Step>> =
        join_all((0..users).map(|u| user_session(&replicas, u, &tokens[u], schedule, rounds)))
            .await;

    let mut holds: BTreeMap<String, Hold> = BTreeMap::new();
    let mut refusals: Vec<&Attempt> = Vec::new();
    let (mut confirms, mut cancels, mut in_progress) = (0usize, 0usize, 0usize);
    for steps in &sessions {
        let mut pending_of_user: Option<String> = None;
        for step in steps {
            match step {
                Step::Start(a) => {
                    assert_no_server_error("start", &a.resp);
                    match a.resp.status {
                        201 => {
                            assert_eq!(seat_set(&a.resp.body["seats"]), a.requested);
                            let id = a.resp.booking_id();
                            assert!(
                                pending_of_user.is_none(),
                                "a second pending booking was granted"
                            );
                            pending_of_user = Some(id.clone());
                            holds.insert(
                                id,
                                Hold {
                                    user: a.user,
                                    seats: a.requested.clone(),
                                    start_sent: a.sent,
                                    start_recv: a.recv,
                                    confirmed: false,
                                    released: None,
                                },
                            );
                        }
                        409 if a.resp.body["code"] == "booking_in_progress" => {
                            in_progress += 1;
                            assert_eq!(
                                a.resp.body["bookingId"].as_str(),
                                pending_of_user.as_deref(),
                                "booking_in_progress must name the user's pending booking"
                            );
                        }
                        409 => {
                            a.resp.assert_problem(409, "seats_taken");
                            refusals.push(a);
                        }
                        s => panic!("start answered {s}: {}", a.resp.body),
                    }
                }
                Step::Confirm { booking, resp } => {
                    assert_eq!(resp.status, 200, "confirm of a fresh hold: {}", resp.body);
                    assert_eq!(resp.body["status"], "CONFIRMED");
                    confirms += 1;
                    holds.get_mut(booking).expect("own booking").confirmed = true;
                    pending_of_user = None;
                }
                Step::Cancel {
                    booking,
                    resp,
                    sent,
                    recv,
                } => {
                    assert_eq!(resp.status, 200, "cancel of a fresh hold: {}", resp.body);
                    assert_eq!(resp.body["status"], "CANCELLED");
                    cancels += 1;
                    holds.get_mut(booking).expect("own booking").released = Some((*sent, *recv));
                    pending_of_user = None;
                }
            }
        }
    }

    // No two holds of a seat were ever live at once: for every overlapping
    // pair, one was released (cancel sent) before the other was granted.
    let list: Vec<&Hold> = holds.values().collect();
    for (i, a) in list.iter().enumerate() {
        for b in &list[i + 1..] {
            if a.seats.is_disjoint(&b.seats) {
                continue;
            }
            let a_before_b = a.released.is_some_and(|(sent, _)| sent < b.start_recv);
            let b_before_a = b.released.is_some_and(|(sent, _)| sent < a.start_recv);
            assert!(
                a_before_b || b_before_a,
                "users {} and {} held {:?} and {:?} at the same time",
                a.user,
                b.user,
                a.seats,
                b.seats
            );
        }
    }

    // Every seat named in a seats_taken was held, at some instant of that
    // request, by a booking whose start succeeded. One answered by a
    // replica's live seat map reflects a committed state at most one
    // notification delay old (the README's guarantee): a release answered
    // on another replica just before may not have reached that map yet.
    for a in &refusals {
        let from_memory = a
            .resp
            .headers
            .get("x-answered-from")
            .is_some_and(|v| v == "memory");
        let delay = if from_memory {
            NOTIFICATION_DELAY_BOUND
        } else {
            Duration::ZERO
        };
        for seat in &taken_seats(a) {
            let plausible = holds.values().any(|h| {
                h.seats.contains(seat)
                    && h.start_sent < a.recv
                    && h.released.is_none_or(|(_, recv)| recv + delay > a.sent)
            });
            assert!(
                plausible,
                "{seat:?} reported taken while no successful hold had it: {}",
                a.resp.body
            );
        }
    }

    // The final snapshot is exactly the live holds: confirmed ones sold,
    // untouched ones held.
    let mut expected = BTreeMap::new();
    for h in holds.values().filter(|h| h.released.is_none()) {
        for seat in &h.seats {
            let status = if h.confirmed { "CONFIRMED" } else { "OCCUPIED" };
            assert!(
                expected.insert(*seat, status.to_owned()).is_none(),
                "{seat:?} is in two live bookings"
            );
        }
    }
    let (last, snap) = replicas[0].snapshot(schedule).await;
    assert_eq!(snap, expected, "snapshot differs from the live bookings");

    // One event per state change, no more: OCCUPIED per hold, CONFIRMED per
    // confirm, RELEASED per cancel; replaying them rebuilds the snapshot.
    let events = replicas[1].replay_events(schedule, 0, last).await;
    let count = |action: &str| events.iter().filter(|e| e.action == action).count();
    assert_eq!(count("OCCUPIED"), holds.len());
    assert_eq!(count("CONFIRMED"), confirms);
    assert_eq!(count("RELEASED"), cancels);
    assert_eq!(events.len() as i64, last);
    assert_eq!(replayed_map(&events), snap);
    assert_eq!(db.logged_seat_events(schedule).await, events);
    db.assert_consistent().await;
    let deadlocks = db.deadlocks_after_shutdown(replicas.into()).await;

    let starts: usize = sessions
        .iter()
        .flatten()
        .filter(|s| matches!(s, Step::Start(_)))
        .count();
    println!(
        "concurrency (mixed): {starts} starts from {users} users: held {}, confirmed {confirms}, cancelled {cancels}, seats_taken {}, booking_in_progress {in_progress}; {} events, deadlocks {deadlocks}",
        holds.len(),
        refusals.len(),
        events.len()
    );
    assert_eq!(deadlocks, 0, "hold transactions deadlocked");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_storm_of_starts_takes_over_expired_unswept_holds_without_409s() {
    let db = TestDb::create().await;
    // Sweepers idle for the whole test: every expired hold is met, and must
    // be released, by the concurrent starts themselves. The storm's own
    // holds last 300 s, so none of them expires meanwhile.
    let idle = ReplicaOpts::default().with("SWEEP_INTERVAL_MS", 60_000);
    let (short, r1, r2) = tokio::join!(
        Replica::spawn(&db, idle.clone().with("HOLD_SECONDS", 1)),
        Replica::spawn(&db, idle.clone()),
        Replica::spawn(&db, idle)
    );
    let storm_replicas = [&r1, &r2];
    let schedule = short.create_schedule(ROWS, COLS, &[]).await;

    // Fill the grid with 1-second holds of three seats each.
    let fillers: [String; 8] = short.guests().await;
    let old: Vec<(String, SeatSet)> = join_all(fillers.iter().enumerate().map(|(i, t)| {
        let seats: Vec<(i64, i64)> = (0..3)
            .map(|k| {
                let n = (i * 3 + k) as i64;
                (n / COLS + 1, n % COLS + 1)
            })
            .collect();
        let short = &short;
        async move {
            let resp = short.hold(t, schedule, &seats).await;
            (resp.booking_id(), seats.into_iter().collect::<SeatSet>())
        }
    }))
    .await;
    let (_, full) = short.snapshot(schedule).await;
    assert_eq!(full.len() as i64, ROWS * COLS);
    wait_for(
        "the fill holds to expire",
        Duration::from_secs(5),
        || async { (db.overdue_holds(schedule).await == old.len() as i64).then_some(()) },
    )
    .await;

    let tokens: [String; 300] = r1.guests().await;
    let users = tokens.len();
    let mut rng = StdRng::seed_from_u64(0x5ea7_2000);
    let plan: Vec<Vec<(i64, i64)>> = (0..users)
        .map(|_| random_seats(&mut rng, ROWS, COLS))
        .collect();
    let attempts: Vec<Attempt> = join_all(plan.iter().enumerate().map(|(u, seats)| {
        let r = storm_replicas[u % 2];
        let token = &tokens[u];
        async move { timed_start(r, u, token, schedule, seats).await }
    }))
    .await;

    let mut holder_of: HashMap<(i64, i64), &Attempt> = HashMap::new();
    let mut held = Vec::new();
    for a in &attempts {
        assert_no_server_error("start", &a.resp);
        match a.resp.status {
            201 => {
                assert_eq!(seat_set(&a.resp.body["seats"]), a.requested);
                for seat in &a.requested {
                    assert!(holder_of.insert(*seat, a).is_none(), "{seat:?} held twice");
                }
                held.push(a);
            }
            _ => a.resp.assert_problem(409, "seats_taken"),
        }
    }
    // An expired hold never causes a 409: every seat named taken is held
    // by a storm booking that asked before the answer came.
    for a in attempts.iter().filter(|a| a.resp.status == 409) {
        for seat in &taken_seats(a) {
            let holder = holder_of.get(seat).unwrap_or_else(|| {
                panic!(
                    "{seat:?} reported taken but only an expired hold had it: {}",
                    a.resp.body
                )
            });
            assert!(holder.sent < a.recv);
        }
    }

    // An old hold was released exactly when a new booking took one of its
    // seats, and its RELEASED comes before that booking's OCCUPIED.
    let (last, snap) = r2.snapshot(schedule).await;
    let events = r1.replay_events(schedule, 0, last).await;
    let event_id = |action: &str, seats: &SeatSet| -> Vec<i64> {
        events
            .iter()
            .filter(|e| e.action == action && &e.seats == seats)
            .map(|e| e.id)
            .collect()
    };
    let mut expected = BTreeMap::new();
    let mut taken_over = 0;
    for (id, seats) in &old {
        let successors: Vec<&&Attempt> = held
            .iter()
            .filter(|a| !a.requested.is_disjoint(seats))
            .collect();
        let released = event_id("RELEASED", seats);
        if successors.is_empty() {
            assert!(
                released.is_empty(),
                "hold {id} released without a successor"
            );
            expected.extend(seats.iter().map(|s| (*s, "OCCUPIED".to_owned())));
        } else {
            taken_over += 1;
            assert_eq!(released.len(), 1, "hold {id}: {released:?}");
            for a in successors {
                let occupied = event_id("OCCUPIED", &a.requested);
                assert_eq!(occupied.len(), 1);
                assert!(
                    released[0] < occupied[0],
                    "RELEASED after the successor's OCCUPIED"
                );
            }
        }
        let got = short
            .get(
                &format!("/api/bookings/{id}"),
                Some(&fillers[old.iter().position(|o| &o.0 == id).unwrap()]),
            )
            .await;
        assert_eq!(got.body["status"], "EXPIRED", "{}", got.body);
    }
    for a in &held {
        expected.extend(a.requested.iter().map(|s| (*s, "OCCUPIED".to_owned())));
    }
    assert_eq!(
        snap, expected,
        "snapshot differs from the new holds plus the untouched old ones"
    );
    assert_eq!(events.len(), old.len() + held.len() + taken_over);
    assert_eq!(replayed_map(&events), snap);
    db.assert_consistent().await;
    let deadlocks = db.deadlocks_after_shutdown(vec![short, r1, r2]).await;
    println!(
        "concurrency (expired takeover): {users} starts over {} expired holds: held {}, seats_taken {}, old holds released inline {taken_over}, deadlocks {deadlocks}",
        old.len(),
        held.len(),
        attempts.len() - held.len()
    );
    assert_eq!(deadlocks, 0, "hold transactions deadlocked");
}
