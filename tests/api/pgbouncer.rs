//! Behind PgBouncer in transaction mode, and across a PostgreSQL restart.
//!
//! - Replicas whose pool goes through PgBouncer (transaction mode) and whose
//!   LISTEN connection goes direct pick unnamed statements by themselves
//!   and survive a booking storm with live viewers on both replicas.
//! - Forced to `DB_STATEMENTS=prepared` there, they fail the way PgBouncer
//!   1.18 makes named statements fail: the reason the setting exists.
//! - A restarted PostgreSQL is served again within a second of accepting
//!   connections, with nothing lost and every viewer converged.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use futures::future::join_all;
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use reqwest::Method;

use crate::helpers::*;

const ROWS: i64 = 4;
const COLS: i64 = 6;
/// Server connections PgBouncer keeps per database: fewer than the two
/// replicas' 12 pooled connections, so consecutive transactions of one
/// pooled connection land on different server connections.
const BOUNCER_SERVER_POOL: u32 = 4;

fn host_port(url: &str) -> (String, u16) {
    let cfg: tokio_postgres::Config = url.parse().expect("database url");
    let host = match cfg.get_hosts().first() {
        Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
        _ => "127.0.0.1".into(),
    };
    (host, cfg.get_ports().first().copied().unwrap_or(5432))
}

/// Replica settings for a pool through `bouncer` and LISTEN (and
/// migrations) direct to `db`.
async fn behind_bouncer(db: &TestDb, bouncer: &PgBouncer, opts: ReplicaOpts) -> (Replica, Replica) {
    let pooled = bouncer.url(&db.name);
    let opts = opts.with("LISTEN_DATABASE_URL", &db.url);
    tokio::join!(
        Replica::spawn_url(&pooled, opts.clone()),
        Replica::spawn_url(&pooled, opts)
    )
}

/// One request of a user's session and what came of it.
enum Step {
    Start {
        seats: SeatSet,
        resp: ApiResponse,
        sent: Instant,
        recv: Instant,
    },
    Confirm {
        booking: String,
        resp: ApiResponse,
    },
    Cancel {
        booking: String,
        resp: ApiResponse,
        sent: Instant,
    },
}

impl Step {
    fn resp(&self) -> &ApiResponse {
        match self {
            Step::Start { resp, .. } | Step::Confirm { resp, .. } | Step::Cancel { resp, .. } => {
                resp
            }
        }
    }
}

/// `rounds` starts of random overlapping seats, alternating replicas; a
/// granted hold is mostly cancelled, sometimes confirmed, through the other
/// replica, so seats keep changing hands while others start.
async fn user_session(
    replicas: &[&Replica; 2],
    user: usize,
    token: &str,
    schedule: i64,
    rounds: usize,
) -> Vec<Step> {
    let mut rng = StdRng::seed_from_u64(0x9b0_0000 + user as u64);
    let mut steps = Vec::new();
    for round in 0..rounds {
        let r = replicas[(user + round) % 2];
        let other = replicas[(user + round + 1) % 2];
        let seats = random_seats(&mut rng, ROWS, COLS);
        let sent = Instant::now();
        let resp = r.start(token, schedule, &seats).await;
        let recv = Instant::now();
        let booking = (resp.status == 201).then(|| resp.booking_id());
        steps.push(Step::Start {
            seats: seats.into_iter().collect(),
            resp,
            sent,
            recv,
        });
        let Some(booking) = booking else { continue };
        match rng.random_range(0..100) {
            0..10 => {
                let resp = other.confirm(token, &booking).await;
                steps.push(Step::Confirm { booking, resp });
            }
            10..92 => {
                let sent = Instant::now();
                let resp = other.cancel(token, &booking).await;
                steps.push(Step::Cancel {
                    booking,
                    resp,
                    sent,
                });
            }
            _ => {}
        }
    }
    steps
}

async fn storm(
    replicas: [&Replica; 2],
    schedule: i64,
    tokens: &[String],
    rounds: usize,
) -> Vec<Vec<Step>> {
    join_all(
        tokens
            .iter()
            .enumerate()
            .map(|(u, t)| user_session(&replicas, u, t, schedule, rounds)),
    )
    .await
}

struct Hold {
    seats: SeatSet,
    start_sent: Instant,
    start_recv: Instant,
    confirmed: bool,
    /// When the cancel that released it was sent.
    released: Option<Instant>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn through_pgbouncer_transaction_mode_a_booking_storm_keeps_every_invariant() {
    let db = TestDb::create().await;
    let (host, port) = host_port(&db.url);
    let mut bouncer = PgBouncer::start(&host, port, BOUNCER_SERVER_POOL).await;
    // No DB_STATEMENTS: two different URLs must mean unnamed statements.
    let (a, b) = behind_bouncer(&db, &bouncer, ReplicaOpts::default()).await;
    let schedule = a.create_schedule(ROWS, COLS, &[]).await;

    let mut clients = vec![
        SeatMapClient::snapshot_then_stream("A1", &a, &a, schedule).await,
        SeatMapClient::stream_then_snapshot("A2 (live first)", &b, &a, schedule).await,
        SeatMapClient::snapshot_then_stream("B1", &b, &b, schedule).await,
        SeatMapClient::stream_then_snapshot("B2 (live first)", &a, &b, schedule).await,
    ];
    let tokens: [String; 120] = a.guests().await;
    let rounds = 6;
    let t = Instant::now();
    let sessions = storm([&a, &b], schedule, &tokens, rounds).await;
    let took = t.elapsed();

    let requests = sessions.iter().flatten().count();
    let server_errors: Vec<&ApiResponse> = sessions
        .iter()
        .flatten()
        .map(Step::resp)
        .filter(|r| r.status >= 500)
        .collect();
    assert!(
        server_errors.is_empty(),
        "{} of {requests} requests answered 5xx, first: {} {}",
        server_errors.len(),
        server_errors[0].status,
        server_errors[0].body
    );

    let mut holds: BTreeMap<String, Hold> = BTreeMap::new();
    let (mut confirms, mut cancels, mut seats_taken, mut in_progress) = (0, 0, 0, 0);
    for steps in &sessions {
        for step in steps {
            match step {
                Step::Start {
                    seats,
                    resp,
                    sent,
                    recv,
                } => match resp.status {
                    201 => {
                        assert_eq!(&seat_set(&resp.body["seats"]), seats, "{}", resp.body);
                        holds.insert(
                            resp.booking_id(),
                            Hold {
                                seats: seats.clone(),
                                start_sent: *sent,
                                start_recv: *recv,
                                confirmed: false,
                                released: None,
                            },
                        );
                    }
                    409 if resp.body["code"] == "booking_in_progress" => in_progress += 1,
                    409 => {
                        resp.assert_problem(409, "seats_taken");
                        seats_taken += 1;
                    }
                    s => panic!("start answered {s}: {}", resp.body),
                },
                Step::Confirm { booking, resp } => {
                    assert_eq!(resp.status, 200, "confirm of a fresh hold: {}", resp.body);
                    confirms += 1;
                    holds.get_mut(booking).expect("own booking").confirmed = true;
                }
                Step::Cancel {
                    booking,
                    resp,
                    sent,
                } => {
                    assert_eq!(resp.status, 200, "cancel of a fresh hold: {}", resp.body);
                    cancels += 1;
                    holds.get_mut(booking).expect("own booking").released = Some(*sent);
                }
            }
        }
    }

    // No two holds of a seat were live at once: of every overlapping pair,
    // one was cancelled before the other was granted.
    let list: Vec<&Hold> = holds.values().collect();
    for (i, x) in list.iter().enumerate() {
        for y in &list[i + 1..] {
            if x.seats.is_disjoint(&y.seats) {
                continue;
            }
            let x_first = x.released.is_some_and(|sent| sent < y.start_recv);
            let y_first = y.released.is_some_and(|sent| sent < x.start_recv);
            assert!(
                x_first || y_first,
                "{:?} and {:?} were held at the same time (starts sent {:?} apart)",
                x.seats,
                y.seats,
                y.start_sent.max(x.start_sent) - y.start_sent.min(x.start_sent)
            );
        }
    }

    // The snapshot, from either replica, is exactly the live bookings.
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
    let (last, truth) = a.snapshot(schedule).await;
    assert_eq!(truth, expected, "snapshot differs from the live bookings");
    assert_eq!(b.snapshot(schedule).await, (last, truth.clone()));

    // One event per change, and every viewer on either replica rebuilt the
    // final map from its snapshot and the stream, densely.
    let events = db.logged_seat_events(schedule).await;
    let count = |action: &str| events.iter().filter(|e| e.action == action).count();
    assert_eq!(count("OCCUPIED"), holds.len());
    assert_eq!(count("CONFIRMED"), confirms);
    assert_eq!(count("RELEASED"), cancels);
    assert_eq!(events.len() as i64, last);
    assert_eq!(replayed_map(&events), truth);
    let t = Instant::now();
    for c in &mut clients {
        c.catch_up(last, Duration::from_secs(10), None).await;
        assert_eq!(c.map, truth, "{} diverged", c.name);
        assert_eq!(c.resyncs, 0, "{}: resync", c.name);
    }
    let converged = t.elapsed();
    db.assert_consistent().await;

    // The backends PgBouncer holds outlive the replicas: kill it first so
    // every session has reported its deadlock count.
    let replicas = vec![a, b];
    bouncer.kill().await;
    let deadlocks = db.deadlocks_after_shutdown(replicas).await;
    println!(
        "pgbouncer (transaction mode, DB_STATEMENTS unset): {requests} requests from {} users \
         in {took:?}, 0 5xx: held {}, confirmed {confirms}, cancelled {cancels}, seats_taken \
         {seats_taken}, booking_in_progress {in_progress}; {} events; {} viewers converged \
         {converged:?} after the storm, 0 resyncs; deadlocks {deadlocks}",
        tokens.len(),
        holds.len(),
        events.len(),
        clients.len(),
    );
    for c in &clients {
        println!(
            "  {}: {} events, at event {}",
            c.name, c.events, c.applied_upto
        );
    }
    assert_eq!(deadlocks, 0, "hold transactions deadlocked");
}

/// Lines of a PostgreSQL log that report a named statement missing or
/// already there.
fn prepared_statement_errors(log: &str) -> (usize, usize) {
    let lines = || log.lines().filter(|l| l.contains("prepared statement \""));
    (
        lines().filter(|l| l.contains("\" does not exist")).count(),
        lines().filter(|l| l.contains("\" already exists")).count(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn through_pgbouncer_forced_prepared_statements_fail() {
    // A cluster of its own, so its log holds only this test's errors.
    let cluster = PgCluster::start().await;
    let db = TestDb::create_on(&cluster.admin_url()).await;
    let bouncer = PgBouncer::start("127.0.0.1", cluster.port, BOUNCER_SERVER_POOL).await;
    // The schedule comes from a replica connected directly, which cannot fail.
    let direct = Replica::spawn(&db, ReplicaOpts::default()).await;
    let schedule = direct.create_schedule(ROWS, COLS, &[]).await;
    // Their failures are the point; the server log below says what they were.
    let opts = ReplicaOpts::default()
        .with("DB_STATEMENTS", "prepared")
        .with("RUST_LOG", "off");
    let (a, b) = behind_bouncer(&db, &bouncer, opts).await;
    let tokens: [String; 60] = direct.guests().await;
    let sessions = storm([&a, &b], schedule, &tokens, 4).await;

    let requests = sessions.iter().flatten().count();
    let mut by_status: BTreeMap<u16, usize> = BTreeMap::new();
    for s in sessions.iter().flatten() {
        *by_status.entry(s.resp().status).or_default() += 1;
    }
    let server_errors: usize = by_status.range(500..).map(|(_, n)| n).sum();
    let log = std::fs::read_to_string(cluster.log()).expect("server log");
    let (missing, duplicate) = prepared_statement_errors(&log);
    println!(
        "pgbouncer (transaction mode, DB_STATEMENTS=prepared): {requests} requests, answers by \
         status {by_status:?}; server log: {missing} x prepared statement \"..\" does not exist, \
         {duplicate} x already exists"
    );
    assert!(
        server_errors > 0,
        "named statements through a transaction pooler should have failed"
    );
    assert!(
        missing + duplicate > 0,
        "the 5xx answers should come from named statements missing or duplicated on server connections"
    );
    // Failed transactions roll back: whatever did commit is consistent.
    db.assert_consistent().await;
    let (_, snap) = direct.snapshot(schedule).await;
    let live = db
        .count(
            "SELECT count(*) FROM schedule_seat_status WHERE schedule_id = $1",
            &[&schedule],
        )
        .await;
    assert_eq!(snap.len() as i64, live);
}

/// Polls `r` every 5 ms until it is ready and a snapshot read and a hold
/// (of `seat`, by a user of its own) both succeed; the instant they did.
async fn serving_again(r: &Replica, schedule: i64, seat: (i64, i64)) -> Instant {
    let token = r.guest().await;
    let deadline = Instant::now() + Duration::from_secs(30);
    let seat_status = format!("/api/schedules/{schedule}/seat-status");
    loop {
        if r.ready_status().await == Some(200)
            && r.request(Method::GET, &seat_status, None, None, &[])
                .await
                .status
                == 200
        {
            let resp = r.start(&token, schedule, &[seat]).await;
            assert!(
                resp.status == 201 || resp.status >= 500,
                "hold after restart: {} {}",
                resp.status,
                resp.body
            );
            if resp.status == 201 {
                return Instant::now();
            }
        }
        assert!(
            Instant::now() < deadline,
            "{} not serving 30 s after the restart",
            r.base
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_postgres_restart_replicas_serve_within_a_second_losing_nothing() {
    let cluster = PgCluster::start().await;
    let db = TestDb::create_on(&cluster.admin_url()).await;
    let (a, b) = tokio::join!(
        Replica::spawn(&db, ReplicaOpts::default()),
        Replica::spawn(&db, ReplicaOpts::default())
    );
    let schedule = a.create_schedule(10, 20, &[]).await;
    let mut clients = vec![
        SeatMapClient::snapshot_then_stream("A1", &a, &a, schedule).await,
        SeatMapClient::stream_then_snapshot("A2 (live first)", &b, &a, schedule).await,
        SeatMapClient::snapshot_then_stream("B1", &b, &b, schedule).await,
    ];

    // Holds made before the restart, through both replicas; one confirmed.
    let tokens: [String; 6] = a.guests().await;
    let mut before = BTreeMap::new();
    for (i, token) in tokens.iter().enumerate() {
        let r = if i % 2 == 0 { &a } else { &b };
        let seats = [(1, 1 + 2 * i as i64), (1, 2 + 2 * i as i64)];
        let id = r.hold(token, schedule, &seats).await.booking_id();
        let status = if i == 0 {
            assert_eq!(b.confirm(token, &id).await.status, 200);
            "CONFIRMED"
        } else {
            "OCCUPIED"
        };
        for s in seats {
            before.insert(s, status.to_owned());
        }
    }
    let (last, snap) = a.snapshot(schedule).await;
    assert_eq!(snap, before);
    for c in &mut clients {
        c.catch_up(last, Duration::from_secs(5), None).await;
    }

    let t = Instant::now();
    let up = cluster.restart().await;
    let down_for = up - t;
    let (ready_a, ready_b) = tokio::join!(
        serving_again(&a, schedule, (5, 1)),
        serving_again(&b, schedule, (5, 2))
    );
    let recovery_a = ready_a.saturating_duration_since(up);
    let recovery_b = ready_b.saturating_duration_since(up);
    println!(
        "postgres restart: stop + start took {down_for:?}; from accepting connections to \
         serving again (ready, snapshot and hold succeed): A {recovery_a:?}, B {recovery_b:?}"
    );

    // Nothing committed before the restart is lost; the two holds made to
    // probe recovery are there too.
    let (last, truth) = b.snapshot(schedule).await;
    let mut expected = before.clone();
    expected.insert((5, 1), "OCCUPIED".into());
    expected.insert((5, 2), "OCCUPIED".into());
    assert_eq!(truth, expected, "the snapshot after the restart");
    assert_eq!(a.snapshot(schedule).await, (last, truth.clone()));

    // Viewers connected before the restart get what happened since, once
    // each listener has reconnected (and replayed the gap), then live changes.
    let t = Instant::now();
    for c in &mut clients {
        let from = if c.name.starts_with('A') { &a } else { &b };
        c.catch_up(last, Duration::from_secs(10), Some(from)).await;
        assert_eq!(c.map, truth, "{} diverged after the restart", c.name);
    }
    let converged = t.elapsed();
    let token = b.guest().await;
    b.hold(&token, schedule, &[(6, 6)]).await;
    let (last, truth) = a.snapshot(schedule).await;
    for c in &mut clients {
        let from = if c.name.starts_with('A') { &a } else { &b };
        c.catch_up(last, Duration::from_secs(5), Some(from)).await;
        assert_eq!(c.map, truth, "{} diverged after a live change", c.name);
    }
    for c in &clients {
        println!(
            "  {}: {} events, {} resyncs, at event {}",
            c.name, c.events, c.resyncs, c.applied_upto
        );
    }
    println!("postgres restart: all viewers converged {converged:?} after both served again");
    assert!(
        clients.iter().all(|c| c.resyncs == 0),
        "a resync although the log kept every event"
    );
    db.assert_consistent().await;
    assert!(
        recovery_a < Duration::from_secs(1) && recovery_b < Duration::from_secs(1),
        "replicas served again {recovery_a:?} / {recovery_b:?} after PostgreSQL accepted \
         connections; want < 1 s"
    );
}
