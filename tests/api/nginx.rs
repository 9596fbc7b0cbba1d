//! The service as its users reach it: through nginx configured by the
//! shipped `deploy/nginx/seatsync.conf`. Streams arrive unbuffered and
//! outlive nginx's read timeout; a replica killed or restarted under a
//! booking storm costs clients nothing but the requests in flight.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use reqwest::Method;
use serde_json::Value;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::helpers::*;

const USERS: u64 = 12;
const SUBSCRIBERS: usize = 6;
const ROWS: i64 = 20;
const COLS: i64 = 20;

#[tokio::test]
async fn sse_through_nginx_is_unbuffered_and_outlives_the_read_timeout() {
    let db = TestDb::create().await;
    // `quiet` heartbeats far less often than nginx's read timeout: the
    // control that shows the short timeout is really in force.
    let (r, quiet) = tokio::join!(
        Replica::spawn(&db, ReplicaOpts::default().with("HEARTBEAT_SECONDS", 1)),
        Replica::spawn(&db, ReplicaOpts::default().with("HEARTBEAT_SECONDS", 30)),
    );
    let read_timeout = Duration::from_secs(2);
    let opts = NginxOpts::default().set("proxy_read_timeout", "2s");
    let nginx = Nginx::start(&[&r], opts.clone()).await;
    let control = Nginx::start(&[&quiet], opts).await;
    let front = nginx.front();
    let schedule = front.create_schedule(10, 20, &[]).await;

    // The client's request id is used as is; without one, nginx's.
    let tagged = front
        .request(
            Method::GET,
            "/api/schedules",
            None,
            None,
            &[("X-Request-Id", "nginx-test-42")],
        )
        .await;
    assert_eq!(tagged.status, 200);
    let ids: Vec<_> = tagged.headers.get_all("x-request-id").iter().collect();
    assert_eq!(ids, ["nginx-test-42"], "X-Request-Id once, the client's");
    let untagged = front.get("/api/schedules", None).await;
    let id = untagged.headers["x-request-id"].to_str().unwrap();
    assert!(
        id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit()),
        "nginx's $request_id expected, got {id:?}"
    );

    let mut client =
        SeatMapClient::snapshot_then_stream("via nginx", &front, &front, schedule).await;
    let server = client.sse.headers["server"].to_str().unwrap().to_owned();
    assert!(server.starts_with("nginx"), "not through nginx: {server}");
    assert_eq!(
        client.sse.headers["content-type"].to_str().unwrap(),
        "text/event-stream"
    );

    // Each change reaches the stream at once: nothing waits in a buffer.
    let tokens = front.guests::<8>().await;
    let mut after_201 = Vec::new();
    let mut after_send = Vec::new();
    for (i, token) in tokens.iter().enumerate() {
        let row = 1 + i as i64;
        let sent = Instant::now();
        let resp = front.hold(token, schedule, &[(row, 1), (row, 2)]).await;
        let answered = Instant::now();
        let frame = client.sse.next_event(Duration::from_secs(2)).await;
        let arrived = Instant::now();
        let Some(f @ SseFrame::Event { .. }) = frame else {
            panic!("event {} not on the stream within 2 s: {frame:?}", i + 1);
        };
        client.apply_frame(f, None).await;
        after_201.push(arrived.saturating_duration_since(answered));
        after_send.push(arrived - sent);
        assert_eq!(front.cancel(token, &resp.booking_id()).await.status, 200);
        let f = client
            .sse
            .next_event(Duration::from_secs(2))
            .await
            .expect("RELEASED");
        client.apply_frame(f, None).await;
    }
    after_201.sort();
    after_send.sort();
    println!(
        "through nginx: event after the 201 p50 {:?} max {:?}; after the request was sent p50 {:?} max {:?} ({} holds)",
        after_201[after_201.len() / 2],
        after_201.last().unwrap(),
        after_send[after_send.len() / 2],
        after_send.last().unwrap(),
        after_201.len()
    );
    assert!(
        *after_201.last().unwrap() < Duration::from_millis(500),
        "an event reached the stream {:?} after its 201",
        after_201.last().unwrap()
    );

    // Quiet for more than 3x nginx's read timeout: the heartbeat keeps the
    // stream open, while the control stream (heartbeat 30 s) is cut.
    let quiet_for = read_timeout * 7 / 2;
    // From before the request: nginx's timer starts after it.
    let t = Instant::now();
    let mut control_sse = control.front().subscribe(schedule, None).await;
    let watch_control = async {
        while !control_sse.ended() {
            assert!(
                t.elapsed() < read_timeout * 3,
                "nginx did not cut a silent stream within 3x its read timeout"
            );
            if let Some(f) = control_sse.next(Duration::from_millis(100)).await {
                assert_eq!(
                    f,
                    SseFrame::Comment,
                    "the control stream carries nothing else"
                );
            }
        }
        t.elapsed()
    };
    let watch_main = async {
        let t = Instant::now();
        let mut heartbeats = 0;
        while t.elapsed() < quiet_for {
            match client.sse.next(quiet_for.saturating_sub(t.elapsed())).await {
                Some(SseFrame::Comment) => heartbeats += 1,
                Some(other) => panic!("nothing but heartbeats expected, got {other:?}"),
                None => assert!(
                    !client.sse.ended(),
                    "the stream ended after {:?} of quiet",
                    t.elapsed()
                ),
            }
        }
        heartbeats
    };
    let (cut_after, heartbeats) = tokio::join!(watch_control, watch_main);
    assert!(!client.sse.ended());
    assert!(heartbeats >= 5, "{heartbeats} heartbeats in {quiet_for:?}");
    assert!(cut_after >= read_timeout, "cut after {cut_after:?}");

    // And it still delivers.
    let sent = Instant::now();
    front.hold(&tokens[0], schedule, &[(10, 10)]).await;
    let (last, truth) = front.snapshot(schedule).await;
    client.catch_up(last, Duration::from_secs(2), None).await;
    println!(
        "stream open after {quiet_for:?} of quiet behind proxy_read_timeout {read_timeout:?} ({heartbeats} heartbeats), \
         next event after {:?}; the control stream (heartbeat 30 s) was cut after {cut_after:?}",
        sent.elapsed()
    );
    assert_eq!(client.map, truth);
    assert_eq!(last, 17);
    db.assert_consistent().await;
}

#[tokio::test]
async fn kill_9_of_a_replica_mid_storm_costs_only_the_requests_in_flight() {
    let mut cluster = Cluster::start(ReplicaOpts::default()).await;
    let follow = cluster.follow().await;
    let storm = Storm::start(&cluster.nginx.base, cluster.schedule);
    storm.wait_done(200, Duration::from_secs(20)).await;

    let streams = cluster.streams_per_replica().await;
    let victim = (0..streams.len()).max_by_key(|&i| streams[i]).unwrap();
    assert!(streams[victim] > 0, "no stream on any replica: {streams:?}");
    let at_kill = storm.done();
    let killed = Instant::now();
    cluster.replicas[victim].kill().await;
    let dead = Instant::now();
    storm
        .wait_done(at_kill + 300, Duration::from_secs(30))
        .await;
    // Past fail_timeout nginx tries the dead replica again: the refused
    // connect must be retried on another, not answered with an error.
    let probed = wait_for(
        "nginx to retry a request away from the dead replica",
        Duration::from_secs(10),
        || async {
            let retried = cluster.nginx.retried();
            (!retried.is_empty()).then_some(retried)
        },
    )
    .await;
    let after_kill = storm.done() - at_kill;
    let ledger = storm.stop().await;

    let failed = ledger.failed();
    for a in &failed {
        assert!(
            a.started < dead && a.ended > killed,
            "{} failed but was not in flight at the kill: {a:?}",
            a.what
        );
    }
    let (reconnects, events) = cluster.converge(follow, &ledger).await;
    println!(
        "kill -9 of replica {victim} of 3 (streams per replica {streams:?}) after {at_kill} requests, \
         {after_kill} after it: {} requests through nginx, {} failed, all in flight at the kill ({}), \
         retried by the client; nginx retried {} on another replica (first: {:?}); {reconnects} streams \
         reconnected, {SUBSCRIBERS} subscribers got all {events} events, {} confirmed and {} cancelled \
         bookings as answered",
        ledger.attempts.len(),
        failed.len(),
        failure_summary(&failed),
        cluster.nginx.retried().len(),
        probed[0],
        ledger.confirmed.len(),
        ledger.cancelled.len(),
    );
    assert_eq!(
        reconnects, streams[victim],
        "exactly the killed replica's streams reconnect"
    );
    cluster.db.assert_consistent().await;
}

#[tokio::test]
async fn rolling_restart_under_load_loses_no_event_and_no_request() {
    let mut cluster = Cluster::start(ReplicaOpts::default()).await;
    let follow = cluster.follow().await;
    let storm = Storm::start(&cluster.nginx.base, cluster.schedule);
    storm.wait_done(100, Duration::from_secs(20)).await;

    let mut windows = Vec::new();
    let mut ended_streams = 0;
    for i in 0..cluster.replicas.len() {
        let streams = cluster.streams_per_replica().await;
        ended_streams += streams[i];
        let port = upstream_addr(&cluster.replicas[i])
            .rsplit(':')
            .next()
            .unwrap()
            .to_owned();
        let term = Instant::now();
        let status = cluster.replicas[i].terminate(Duration::from_secs(10)).await;
        let exited = Instant::now();
        assert!(status.success(), "replica {i} exited with {status:?}");
        // On its port again: nginx's upstream list stays as it is.
        cluster.replicas[i] =
            Replica::spawn(&cluster.db, cluster.opts.clone().with("PORT", &port)).await;
        let ready = Instant::now();
        // nginx tried the port while it was closed and counts it failed for
        // fail_timeout (1 s): a restart must wait until nginx sends it
        // requests again, or with all replicas counted failed at once nginx
        // answers 502 (no live upstreams) without trying any.
        wait_for(
            "nginx to send bookings to the replacement",
            Duration::from_secs(10),
            || async { (booking_requests(&cluster.replicas[i]).await > 0.0).then_some(()) },
        )
        .await;
        println!(
            "replica {i} (port {port}, {} streams): exit 0 {:?} after SIGTERM, replacement ready {:?} later, \
             sent bookings by nginx {:?} after that",
            streams[i],
            exited - term,
            ready - exited,
            ready.elapsed()
        );
        windows.push((term, exited));
        let before = storm.done();
        storm.wait_done(before + 100, Duration::from_secs(20)).await;
    }
    let ledger = storm.stop().await;

    let failed = ledger.failed();
    for a in &failed {
        assert!(
            windows
                .iter()
                .any(|&(term, exited)| a.started < exited && a.ended > term),
            "{} failed but was not in flight during a shutdown: {a:?}",
            a.what
        );
    }
    let (reconnects, events) = cluster.converge(follow, &ledger).await;
    println!(
        "rolling restart of 3 replicas: {} requests through nginx, {} failed, all in flight during a shutdown ({}), \
         {} retried by nginx on another replica; {reconnects} stream reconnects, {SUBSCRIBERS} subscribers got all \
         {events} events, {} confirmed and {} cancelled bookings as answered",
        ledger.attempts.len(),
        failed.len(),
        failure_summary(&failed),
        cluster.nginx.retried().len(),
        ledger.confirmed.len(),
        ledger.cancelled.len(),
    );
    // The reason for each 502, in nginx's words (a replica gone is
    // "Connection refused"; a keep-alive connection the stopping replica
    // closed as nginx sent on it is "prematurely closed" / "reset").
    let mut reasons: BTreeMap<String, usize> = BTreeMap::new();
    for e in cluster.nginx.errors() {
        let why = e.split(" while ").next().unwrap_or(&e);
        let why = why
            .split("*")
            .nth(1)
            .map_or(why, |w| w.split_once(' ').map_or(w, |x| x.1));
        *reasons.entry(why.to_owned()).or_default() += 1;
    }
    println!("nginx error log: {reasons:?}");
    assert_eq!(
        reconnects, ended_streams,
        "every stream a shutdown ended reconnects, once"
    );
    cluster.db.assert_consistent().await;
}

/// Booking requests a replica has answered (its own metric): whether nginx
/// sends it traffic. /readyz and /metrics do not count.
async fn booking_requests(r: &Replica) -> f64 {
    let text = r.metrics_text().await;
    text.lines()
        .filter(|l| {
            l.starts_with("seatsync_http_requests_total{") && l.contains("route=\"/api/bookings")
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

fn failure_summary(failed: &[Attempt]) -> String {
    let mut by: BTreeMap<String, usize> = BTreeMap::new();
    for a in failed {
        let outcome = a
            .status
            .map_or_else(|| "connection error".into(), |s| s.to_string());
        *by.entry(format!("{} {outcome}", a.what)).or_default() += 1;
    }
    if by.is_empty() {
        return "none".into();
    }
    by.iter()
        .map(|(k, n)| format!("{n} x {k}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Three replicas on one database behind nginx, and a show.
/// (Fields drop in this order: nginx and the replicas before the database.)
struct Cluster {
    nginx: Nginx,
    replicas: Vec<Replica>,
    opts: ReplicaOpts,
    schedule: i64,
    db: TestDb,
}

/// Subscribers following the stream through nginx in tasks of their own;
/// `until` tells them the last event id to reach.
struct Followers {
    tasks: Vec<JoinHandle<(SeatMapClient, usize)>>,
    until: watch::Sender<Option<i64>>,
}

impl Cluster {
    async fn start(opts: ReplicaOpts) -> Cluster {
        let db = TestDb::create().await;
        let (a, b, c) = tokio::join!(
            Replica::spawn(&db, opts.clone()),
            Replica::spawn(&db, opts.clone()),
            Replica::spawn(&db, opts.clone()),
        );
        let nginx = Nginx::start(&[&a, &b, &c], NginxOpts::default()).await;
        let schedule = nginx.front().create_schedule(ROWS, COLS, &[]).await;
        Cluster {
            db,
            opts,
            replicas: vec![a, b, c],
            nginx,
            schedule,
        }
    }

    /// Open seat streams per replica, once all subscribers are connected.
    async fn streams_per_replica(&self) -> Vec<usize> {
        wait_for(
            &format!("{SUBSCRIBERS} streams open"),
            Duration::from_secs(10),
            || async {
                let mut per = Vec::new();
                for r in &self.replicas {
                    per.push(r.metric("seatsync_sse_connections").await as usize);
                }
                (per.iter().sum::<usize>() == SUBSCRIBERS).then_some(per)
            },
        )
        .await
    }

    /// Subscribers as the page makes them, through nginx: half take the
    /// snapshot first, half the stream first. Each reconnects through nginx
    /// with its last event id when its stream ends, as EventSource does.
    async fn follow(&self) -> Followers {
        let (until, rx) = watch::channel(None);
        let front = self.nginx.front();
        let mut tasks = Vec::new();
        for i in 0..SUBSCRIBERS {
            let name = format!("subscriber {i}");
            let c = if i % 2 == 0 {
                SeatMapClient::snapshot_then_stream(&name, &front, &front, self.schedule).await
            } else {
                SeatMapClient::stream_then_snapshot(&name, &front, &front, self.schedule).await
            };
            tasks.push(tokio::spawn(follow(c, self.nginx.base.clone(), rx.clone())));
        }
        Followers { tasks, until }
    }

    /// Every subscriber reaches the final snapshot and holds exactly it,
    /// which holds exactly the seats of the bookings answered as confirmed.
    /// Returns the reconnects and the events seen.
    async fn converge(&self, follow: Followers, ledger: &Ledger) -> (usize, i64) {
        let front = self.nginx.front();
        let (last, truth) = front.snapshot(self.schedule).await;
        follow.until.send_replace(Some(last));
        let mut reconnects = 0;
        for t in follow.tasks {
            let (c, n) = t.await.expect("subscriber task");
            assert_eq!(c.map, truth, "{} diverged", c.name);
            assert_eq!(c.resyncs, 0);
            reconnects += n;
        }
        let sold: SeatSet = truth
            .iter()
            .map(|(seat, status)| {
                assert_eq!(status, "CONFIRMED", "a hold outlived the storm: {seat:?}");
                *seat
            })
            .collect();
        let confirmed: SeatSet = ledger.confirmed.values().flatten().copied().collect();
        assert_eq!(
            sold, confirmed,
            "sold seats differ from the confirmed answers"
        );
        assert_eq!(
            replayed_map(&self.db.logged_seat_events(self.schedule).await),
            truth
        );
        // What each user was told is what the database says.
        for id in ledger.confirmed.keys() {
            assert_eq!(self.db_status(id).await, "CONFIRMED", "booking {id}");
        }
        for id in &ledger.cancelled {
            assert_eq!(self.db_status(id).await, "CANCELLED", "booking {id}");
        }
        (reconnects, last)
    }

    async fn db_status(&self, booking: &str) -> String {
        let id: uuid::Uuid = booking.parse().unwrap();
        self.db
            .client()
            .await
            .query_one("SELECT status::text FROM bookings WHERE id = $1", &[&id])
            .await
            .unwrap()
            .get(0)
    }
}

/// A subscriber until it has applied event `until`; reconnects through
/// nginx whenever its stream ends. Returns the client and its reconnects.
async fn follow(
    mut c: SeatMapClient,
    base: String,
    until: watch::Receiver<Option<i64>>,
) -> (SeatMapClient, usize) {
    let front = Replica::behind(&base);
    let deadline = Instant::now() + Duration::from_secs(90);
    let mut reconnects = 0;
    loop {
        let target = *until.borrow();
        if target.is_some_and(|last| c.applied_upto >= last) {
            return (c, reconnects);
        }
        assert!(
            Instant::now() < deadline,
            "{}: stuck at event {}",
            c.name,
            c.applied_upto
        );
        match c.sse.next(Duration::from_millis(100)).await {
            Some(f) => c.apply_frame(f, None).await,
            None if c.sse.ended() => {
                // subscribe asserts 200 and `retry:`: a 502 here would stop
                // a browser's EventSource for good.
                c.reconnect(&front).await;
                reconnects += 1;
            }
            None => {}
        }
    }
}

/// One HTTP request through nginx as a user made it.
#[derive(Debug, Clone)]
struct Attempt {
    what: &'static str,
    started: Instant,
    ended: Instant,
    /// None: no HTTP answer at all.
    status: Option<u16>,
}

impl Attempt {
    /// A gateway error or no answer: the request may or may not have taken
    /// effect, and the user retries it.
    fn failed(&self) -> bool {
        !matches!(self.status, Some(s) if !(502..=504).contains(&s))
    }
}

#[derive(Default)]
struct Ledger {
    attempts: Vec<Attempt>,
    /// Bookings answered as confirmed, with their seats.
    confirmed: BTreeMap<String, SeatSet>,
    /// Bookings answered as cancelled.
    cancelled: BTreeSet<String>,
}

impl Ledger {
    fn failed(&self) -> Vec<Attempt> {
        self.attempts
            .iter()
            .filter(|a| a.failed())
            .cloned()
            .collect()
    }
}

/// Users booking through nginx until stopped: start two adjacent seats
/// (with an Idempotency-Key), then confirm (1 in 6) or cancel. A request
/// that fails at the gateway is retried as it was, key included; any answer
/// the contract does not allow fails the test.
struct Storm {
    ledger: Arc<Mutex<Ledger>>,
    stop: Arc<AtomicBool>,
    users: Vec<JoinHandle<()>>,
}

impl Storm {
    fn start(base: &str, schedule: i64) -> Storm {
        let ledger = Arc::new(Mutex::new(Ledger::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let users = (0..USERS)
            .map(|u| {
                let user = User {
                    base: base.to_owned(),
                    http: reqwest::Client::new(),
                    ledger: ledger.clone(),
                };
                tokio::spawn(user.run(u, schedule, stop.clone()))
            })
            .collect();
        Storm {
            ledger,
            stop,
            users,
        }
    }

    fn done(&self) -> usize {
        self.ledger.lock().unwrap().attempts.len()
    }

    async fn wait_done(&self, n: usize, timeout: Duration) {
        wait_for(&format!("{n} requests through nginx"), timeout, || async {
            (self.done() >= n).then_some(())
        })
        .await;
    }

    /// Stops the users after their current booking and returns the ledger.
    async fn stop(self) -> Ledger {
        self.stop.store(true, Ordering::SeqCst);
        for u in self.users {
            tokio::time::timeout(Duration::from_secs(30), u)
                .await
                .expect("users stop within 30 s")
                .expect("user task");
        }
        Arc::try_unwrap(self.ledger)
            .ok()
            .expect("users are done")
            .into_inner()
            .unwrap()
    }
}

struct User {
    base: String,
    http: reqwest::Client,
    ledger: Arc<Mutex<Ledger>>,
}

impl User {
    async fn run(self, u: u64, schedule: i64, stop: Arc<AtomicBool>) {
        let mut rng = StdRng::seed_from_u64(u);
        let guest = self
            .call("guest", "/api/auth/guest", None, None, None)
            .await;
        assert_eq!(guest.0, 201, "{}", guest.1);
        let token = guest.1["token"].as_str().unwrap().to_owned();
        let mut n = 0;
        while !stop.load(Ordering::SeqCst) {
            n += 1;
            let (row, col) = (rng.random_range(1..=ROWS), rng.random_range(1..COLS));
            let seats = [(row, col), (row, col + 1)];
            let key = format!("user-{u}-{n}");
            let (status, body) = self
                .call(
                    "start",
                    "/api/bookings/start",
                    Some(&token),
                    Some(start_body(schedule, &seats)),
                    Some(&key),
                )
                .await;
            match (status, body["code"].as_str()) {
                (201, _) => {
                    assert_eq!(body["status"], "PENDING", "{body}");
                    assert_eq!(seat_set(&body["seats"]), set_of(&seats), "{body}");
                    let id = body["bookingId"].as_str().unwrap().to_owned();
                    let confirm = rng.random_range(0..6) == 0;
                    let (action, want) = if confirm {
                        ("confirm", "CONFIRMED")
                    } else {
                        ("cancel", "CANCELLED")
                    };
                    let path = format!("/api/bookings/{id}/{action}");
                    let (status, body) = self.call(action, &path, Some(&token), None, None).await;
                    assert_eq!(status, 200, "{action} {id}: {body}");
                    assert_eq!(body["status"], want, "{action} {id}: {body}");
                    let mut l = self.ledger.lock().unwrap();
                    if confirm {
                        l.confirmed.insert(id, set_of(&seats));
                    } else {
                        l.cancelled.insert(id);
                    }
                }
                (409, Some("seats_taken")) => {
                    let taken = seat_set(&body["seats"]);
                    assert!(
                        !taken.is_empty() && taken.is_subset(&set_of(&seats)),
                        "seats_taken lists {taken:?} for {seats:?}"
                    );
                }
                _ => panic!("start {seats:?}: {status} {body}"),
            }
        }
    }

    /// A POST through nginx, repeated (same key) while it fails at the
    /// gateway; every try goes into the ledger.
    async fn call(
        &self,
        what: &'static str,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
        key: Option<&str>,
    ) -> (u16, Value) {
        for _ in 0..5 {
            let mut req = self
                .http
                .post(format!("{}{path}", self.base))
                .timeout(Duration::from_secs(15));
            if let Some(t) = token {
                req = req.bearer_auth(t);
            }
            if let Some(b) = &body {
                req = req.json(b);
            }
            if let Some(k) = key {
                req = req.header("Idempotency-Key", k);
            }
            let started = Instant::now();
            let answer = match req.send().await {
                Ok(r) => {
                    let status = r.status().as_u16();
                    let bytes = r.bytes().await.unwrap_or_default();
                    Some((
                        status,
                        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
                    ))
                }
                Err(_) => None,
            };
            let attempt = Attempt {
                what,
                started,
                ended: Instant::now(),
                status: answer.as_ref().map(|a| a.0),
            };
            let failed = attempt.failed();
            self.ledger.lock().unwrap().attempts.push(attempt);
            if !failed {
                return answer.unwrap();
            }
        }
        panic!("{what} {path} failed 5 times through nginx");
    }
}
