//! Soak, by flag only (it is `#[ignore]`d, so `cargo test` skips it):
//!
//! ```sh
//! SEATSYNC_SOAK_SECONDS=600 cargo test --test api soak -- --ignored --nocapture
//! ```
//!
//! Two replicas under holds (started, then cancelled or left to expire)
//! and SSE connection churn (connect, read a few events, drop) for the
//! duration. Every `SEATSYNC_SOAK_SAMPLE_SECONDS` (default 60) and at the
//! end it prints each replica's RSS, open file descriptors, pool usage and
//! stream count; then the growth after warm-up (2nd sample to the last).
//! Leaks show as growth: file descriptors and streams must return to where
//! they started once the load stops; RSS growth is printed (target < 5%).

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::join_all;
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use serde_json::{json, Value};

use crate::helpers::*;

const ROWS: i64 = 10;
const COLS: i64 = 20;
const USERS: usize = 16;
const CHURNERS: usize = 12;

fn env_secs(name: &str, default: u64) -> Duration {
    let secs = std::env::var(name)
        .ok()
        .map(|s| {
            s.trim()
                .parse::<u64>()
                .unwrap_or_else(|e| panic!("{name}={s}: {e}"))
        })
        .unwrap_or(default);
    Duration::from_secs(secs.max(1))
}

/// One replica's figures at one moment.
#[derive(Debug, Clone, Copy)]
struct Sample {
    rss_kib: u64,
    fds: usize,
    pool_size: f64,
    pool_available: f64,
    pool_waiting: f64,
    streams: f64,
    /// Connections of this test's own clients, kept alive by them.
    ours: usize,
}

impl Sample {
    async fn take(r: &Replica) -> Sample {
        // /metrics first: its connection is then open when the fds are
        // counted, the same way every time.
        let pool_size = r.metric("seatsync_db_pool_size").await;
        let pool_available = r.metric("seatsync_db_pool_available").await;
        let pool_waiting = r.metric("seatsync_db_pool_waiting").await;
        let streams = r.metric("seatsync_sse_connections").await;
        let pid = r.pid().expect("replica runs");
        Sample {
            rss_kib: rss_kib(pid).expect("VmRSS"),
            fds: open_fds(pid).expect("/proc/PID/fd"),
            ours: accepted_from(pid, http_port(r), std::process::id()),
            pool_size,
            pool_available,
            pool_waiting,
            streams,
        }
    }

    /// Descriptors other than pooled connections, which the pool keeps
    /// open once it grew (deadpool closes none of them while idle), and
    /// other than this test's own idle keep-alive connections (reqwest may
    /// keep one or two to read /metrics, differently from run to run).
    fn fds_left(&self) -> i64 {
        self.fds as i64 - self.pool_size as i64 - self.ours as i64
    }
}

#[derive(Default)]
struct Counts {
    starts: AtomicUsize,
    held: AtomicUsize,
    cancels: AtomicUsize,
    conflicts: AtomicUsize,
    server_errors: AtomicUsize,
    streams_opened: AtomicUsize,
    events_read: AtomicUsize,
}

async fn post(
    http: &reqwest::Client,
    url: String,
    token: Option<&str>,
    body: Option<Value>,
) -> (u16, Value) {
    let mut req = http.post(url);
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    if let Some(b) = body {
        req = req.json(&b);
    }
    let resp = req.send().await.expect("request");
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

/// Starts holds and cancels most of them; the rest expire.
async fn holder(
    bases: Vec<String>,
    http: reqwest::Client,
    token: String,
    schedule: i64,
    mut rng: StdRng,
    stop: Arc<AtomicBool>,
    counts: Arc<Counts>,
) {
    while !stop.load(Ordering::SeqCst) {
        tokio::time::sleep(Duration::from_millis(rng.random_range(100..400))).await;
        let base = &bases[rng.random_range(0..bases.len())];
        let body = if rng.random_bool(0.2) {
            json!({"scheduleId": schedule, "quantity": rng.random_range(1..=4)})
        } else {
            let n = rng.random_range(1..=4);
            let mut seats = SeatSet::new();
            while seats.len() < n {
                seats.insert((rng.random_range(1..=ROWS), rng.random_range(1..=COLS)));
            }
            start_body(schedule, &seats.into_iter().collect::<Vec<_>>())
        };
        let (status, resp) = post(
            &http,
            format!("{base}/api/bookings/start"),
            Some(&token),
            Some(body),
        )
        .await;
        counts.starts.fetch_add(1, Ordering::Relaxed);
        match status {
            201 => {
                counts.held.fetch_add(1, Ordering::Relaxed);
                if rng.random_bool(0.6) {
                    tokio::time::sleep(Duration::from_millis(rng.random_range(100..800))).await;
                    let id = resp["bookingId"].as_str().expect("bookingId");
                    let base = &bases[rng.random_range(0..bases.len())];
                    let (status, _) = post(
                        &http,
                        format!("{base}/api/bookings/{id}/cancel"),
                        Some(&token),
                        None,
                    )
                    .await;
                    counts.cancels.fetch_add(1, Ordering::Relaxed);
                    if status >= 500 {
                        counts.server_errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            409 => {
                counts.conflicts.fetch_add(1, Ordering::Relaxed);
            }
            s if s >= 500 => {
                counts.server_errors.fetch_add(1, Ordering::Relaxed);
            }
            s => panic!("start answered {s}: {resp}"),
        }
    }
}

/// Connects, reads a few events (or waits up to 2 s for them), drops the
/// stream; over and over.
async fn churner(
    bases: Vec<String>,
    schedule: i64,
    mut rng: StdRng,
    stop: Arc<AtomicBool>,
    counts: Arc<Counts>,
) {
    while !stop.load(Ordering::SeqCst) {
        let base = &bases[rng.random_range(0..bases.len())];
        let mut sse = SseClient::connect(&format!("{base}{}", stream_path(schedule)), None).await;
        assert_eq!(sse.status, 200, "stream");
        counts.streams_opened.fetch_add(1, Ordering::Relaxed);
        let want = rng.random_range(1..20);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
        for _ in 0..want {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match sse.next_event(left).await {
                Some(_) => {
                    counts.events_read.fetch_add(1, Ordering::Relaxed);
                }
                None => break,
            }
        }
        drop(sse);
    }
}

fn http_port(r: &Replica) -> u16 {
    r.base
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .expect("http://host:port")
}

fn fds_by_kind(r: &Replica) -> std::collections::BTreeMap<String, usize> {
    fd_kinds(r.pid().expect("replica runs"), http_port(r))
}

fn growth(from: f64, to: f64) -> f64 {
    (to - from) / from * 100.0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "soak: SEATSYNC_SOAK_SECONDS=600 cargo test --test api soak -- --ignored --nocapture"]
async fn soak_holds_and_stream_churn_leave_nothing_behind() {
    let duration = env_secs("SEATSYNC_SOAK_SECONDS", 600);
    let every = env_secs("SEATSYNC_SOAK_SAMPLE_SECONDS", 60);
    let opts = ReplicaOpts::default()
        .with("HOLD_SECONDS", 5)
        .with("HEARTBEAT_SECONDS", 5);
    let (_db, a, b) = TestDb::with_two_replicas(opts).await;
    let replicas = [&a, &b];
    // At rest: before any client but the one reading /metrics connected.
    let base: Vec<Sample> = join_all(replicas.iter().map(|r| Sample::take(r))).await;
    let base_kinds: Vec<_> = replicas.iter().map(|r| fds_by_kind(r)).collect();
    let schedule = a.create_schedule(ROWS, COLS, &[]).await;
    // A client of the load's own, dropped with it, so that its idle
    // keep-alive connections count neither at rest nor at the end.
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    let tokens = join_all((0..USERS).map(|_| async {
        let (status, body) = post(&http, a.url("/api/auth/guest"), None, None).await;
        assert_eq!(status, 201, "{body}");
        body["token"].as_str().expect("token").to_owned()
    }))
    .await;
    println!(
        "soak: {duration:?}, samples every {every:?}; 2 replicas, {USERS} holders, {CHURNERS} \
         stream churners; at rest: {base:?}"
    );

    let stop = Arc::new(AtomicBool::new(false));
    let counts = Arc::new(Counts::default());
    let bases: Vec<String> = replicas.iter().map(|r| r.base.clone()).collect();
    let mut tasks = Vec::new();
    for (u, token) in tokens.iter().enumerate() {
        tasks.push(tokio::spawn(holder(
            bases.clone(),
            http.clone(),
            token.clone(),
            schedule,
            StdRng::seed_from_u64(0x50a_0000 + u as u64),
            stop.clone(),
            counts.clone(),
        )));
    }
    for c in 0..CHURNERS {
        tasks.push(tokio::spawn(churner(
            bases.clone(),
            schedule,
            StdRng::seed_from_u64(0x50a_1000 + c as u64),
            stop.clone(),
            counts.clone(),
        )));
    }

    let started = Instant::now();
    let mut samples: Vec<(Duration, Vec<Sample>)> = Vec::new();
    loop {
        let at = started.elapsed();
        let s = join_all(replicas.iter().map(|r| Sample::take(r))).await;
        for (i, x) in s.iter().enumerate() {
            println!(
                "  t={:>4}s replica {i}: RSS {} KiB, fds {}, pool size {} available {} waiting {}, \
                 streams {}",
                at.as_secs(),
                x.rss_kib,
                x.fds,
                x.pool_size,
                x.pool_available,
                x.pool_waiting,
                x.streams
            );
        }
        samples.push((at, s));
        if at >= duration {
            break;
        }
        let next = (every * samples.len() as u32).min(duration);
        tokio::time::sleep_until((started + next).into()).await;
    }
    stop.store(true, Ordering::SeqCst);
    for t in tasks {
        tokio::time::timeout(Duration::from_secs(60), t)
            .await
            .expect("load stops within 60 s")
            .expect("load task");
    }
    drop(http);

    // Once the load has gone, every stream and socket it had is closed.
    let deadline = Instant::now() + Duration::from_secs(30);
    let t = Instant::now();
    let rest = loop {
        let now: Vec<Sample> = join_all(replicas.iter().map(|r| Sample::take(r))).await;
        // The sweeper checks a pooled connection out for a moment every
        // 200 ms: waited for like the rest.
        let back = now.iter().zip(&base).all(|(n, b)| {
            n.streams == b.streams
                && n.fds_left() == b.fds_left()
                && n.pool_available == n.pool_size
        });
        if back || Instant::now() >= deadline {
            break now;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let returned = t.elapsed();
    for (i, r) in replicas.iter().enumerate() {
        println!(
            "replica {i} descriptors at rest: {:?}; after the load: {:?}",
            base_kinds[i],
            fds_by_kind(r)
        );
    }

    let c = &counts;
    println!(
        "load: {} starts ({} held, {} conflicts), {} cancels, {} 5xx; {} streams opened, {} \
         events read",
        c.starts.load(Ordering::Relaxed),
        c.held.load(Ordering::Relaxed),
        c.conflicts.load(Ordering::Relaxed),
        c.cancels.load(Ordering::Relaxed),
        c.server_errors.load(Ordering::Relaxed),
        c.streams_opened.load(Ordering::Relaxed),
        c.events_read.load(Ordering::Relaxed),
    );
    let warm = if samples.len() > 2 { 1 } else { 0 };
    let (from_at, from) = &samples[warm];
    let (to_at, to) = samples.last().unwrap();
    for i in 0..replicas.len() {
        println!(
            "replica {i}: from t={}s to t={}s RSS {} -> {} KiB ({:+.1}%, target < 5%), fds {} -> {}; \
             after the load stopped (in {returned:?}): fds {} ({} beside the pool and our own keep-alive connections; {} at rest), \
             streams {} (at rest {}), pool size {} available {} waiting {}",
            from_at.as_secs(),
            to_at.as_secs(),
            from[i].rss_kib,
            to[i].rss_kib,
            growth(from[i].rss_kib as f64, to[i].rss_kib as f64),
            from[i].fds,
            to[i].fds,
            rest[i].fds,
            rest[i].fds_left(),
            base[i].fds_left(),
            rest[i].streams,
            base[i].streams,
            rest[i].pool_size,
            rest[i].pool_available,
            rest[i].pool_waiting,
        );
    }
    for i in 0..replicas.len() {
        assert_eq!(
            rest[i].streams, base[i].streams,
            "replica {i}: streams did not return to base"
        );
        assert_eq!(
            rest[i].fds_left(),
            base[i].fds_left(),
            "replica {i}: file descriptors did not return to base"
        );
        assert_eq!(
            rest[i].pool_available, rest[i].pool_size,
            "replica {i}: pooled connections still checked out at rest"
        );
    }
    assert_eq!(
        c.server_errors.load(Ordering::Relaxed),
        0,
        "5xx without any fault"
    );
}
