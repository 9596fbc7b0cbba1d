//! Shared test plumbing: per-test databases, replica processes, an HTTP
//! client for the contract, and an SSE reader.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::future::Future;
use std::process::Stdio;
use std::time::{Duration, Instant};

use futures::StreamExt;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::mpsc;
use uuid::Uuid;

pub const AUTH_SECRET: &str = "integration-test-secret-0123456789";
pub const ADMIN_TOKEN: &str = "integration-admin-token-0123456789";

pub fn admin_url() -> String {
    std::env::var("SEATSYNC_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

/// Polls `check` until it returns `Some`, or panics with `what` at the deadline.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        if Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

async fn admin_client(url: &str) -> tokio_postgres::Client {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .unwrap_or_else(|e| panic!("cannot reach PostgreSQL at {url}: {e}"));
    tokio::spawn(conn);
    client
}

/// A database of its own for one test, dropped when the test ends.
pub struct TestDb {
    pub name: String,
    pub url: String,
    admin: String,
}

impl TestDb {
    pub async fn create() -> Self {
        let admin = admin_url();
        let name = format!("seatsync_test_{}", Uuid::new_v4().simple());
        admin_client(&admin)
            .await
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .expect("create test db");
        let mut cfg: tokio_postgres::Config = admin.parse().expect("admin url");
        cfg.dbname(&name);
        let url = to_url(&cfg);
        TestDb { name, url, admin }
    }

    /// A client on the test database (for assertions and fault injection).
    pub async fn client(&self) -> tokio_postgres::Client {
        admin_client(&self.url).await
    }

    /// Waits until the database clock, which holds expire by, is past `t`.
    pub async fn wait_clock_past(&self, t: chrono::DateTime<chrono::Utc>) {
        let c = self.client().await;
        let left = (t - chrono::Utc::now()).to_std().unwrap_or_default();
        wait_for(
            &format!("the database clock to pass {t}"),
            left + Duration::from_secs(10),
            || async {
                let past: bool = c
                    .query_one("SELECT clock_timestamp() > $1", &[&t])
                    .await
                    .unwrap()
                    .get(0);
                past.then_some(())
            },
        )
        .await;
    }

    /// Seats held by more than one booking (must always be 0) — checked
    /// directly in the tables, not through the API.
    pub async fn assert_consistent(&self) {
        let c = self.client().await;
        let dup: i64 = c
            .query_one(
                "SELECT count(*) FROM (SELECT schedule_id, row_num, col_num FROM schedule_seat_status \
                 GROUP BY 1, 2, 3 HAVING count(*) > 1) d",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(dup, 0, "a seat is held twice");
        // Every seat row belongs to a live booking of the same schedule.
        let orphans: i64 = c
            .query_one(
                "SELECT count(*) FROM schedule_seat_status st JOIN bookings b ON b.id = st.booking_id \
                 WHERE b.status NOT IN ('PENDING', 'CONFIRMED') OR b.schedule_id <> st.schedule_id \
                 OR (b.status = 'CONFIRMED') <> (st.status = 'CONFIRMED')",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(orphans, 0, "seat rows disagree with their bookings");
        // Every live booking holds exactly its seats.
        let mismatched: i64 = c
            .query_one(
                "SELECT count(*) FROM bookings b WHERE b.status IN ('PENDING', 'CONFIRMED') AND \
                 jsonb_array_length(b.seats) <> (SELECT count(*) FROM schedule_seat_status st WHERE st.booking_id = b.id)",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(
            mismatched, 0,
            "a live booking does not hold exactly its seats"
        );
    }
}

fn to_url(cfg: &tokio_postgres::Config) -> String {
    let host = match cfg.get_hosts().first() {
        Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
        _ => "127.0.0.1".into(),
    };
    let port = cfg.get_ports().first().copied().unwrap_or(5432);
    let user = cfg.get_user().unwrap_or("postgres");
    let password = cfg
        .get_password()
        .map(|p| format!(":{}", String::from_utf8_lossy(p)))
        .unwrap_or_default();
    format!(
        "postgres://{user}{password}@{host}:{port}/{}",
        cfg.get_dbname().unwrap_or("postgres")
    )
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let admin = self.admin.clone();
        let name = self.name.clone();
        // Drop runs outside async; a short-lived runtime on its own thread.
        let _ = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async move {
                if let Ok((c, conn)) = tokio_postgres::connect(&admin, tokio_postgres::NoTls).await
                {
                    tokio::spawn(conn);
                    let _ = c
                        .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                        .await;
                }
            });
        })
        .join();
    }
}

/// Settings for a replica process; unset fields keep the binary's defaults.
#[derive(Clone, Debug, Default)]
pub struct ReplicaOpts {
    pub env: BTreeMap<String, String>,
}

impl ReplicaOpts {
    pub fn with(mut self, key: &str, value: impl ToString) -> Self {
        self.env.insert(key.into(), value.to_string());
        self
    }
}

/// A running `seatsync serve` process on a free port.
pub struct Replica {
    pub child: Child,
    pub base: String,
    pub http: reqwest::Client,
}

impl Replica {
    pub async fn spawn(db: &TestDb, opts: ReplicaOpts) -> Replica {
        Self::spawn_url(&db.url, opts).await
    }

    pub async fn spawn_url(database_url: &str, opts: ReplicaOpts) -> Replica {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_seatsync"));
        cmd.env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("DATABASE_URL", database_url)
            .env("AUTH_SECRET", AUTH_SECRET)
            .env("ADMIN_TOKEN", ADMIN_TOKEN)
            .env("HOST", "127.0.0.1")
            .env("PORT", "0")
            .env("SWEEP_INTERVAL_MS", "200")
            // Small pools: parallel tests share one server's max_connections.
            .env("DB_POOL_SIZE", "6")
            .env(
                "RUST_LOG",
                std::env::var("SEATSYNC_TEST_LOG").unwrap_or_else(|_| "warn".into()),
            );
        for (k, v) in &opts.env {
            cmd.env(k, v);
        }
        cmd.stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true);
        let mut child = cmd.spawn().expect("spawn seatsync");
        let stdout = child.stdout.take().expect("stdout");
        let mut lines = BufReader::new(stdout).lines();
        let base = tokio::time::timeout(Duration::from_secs(30), async {
            while let Ok(Some(line)) = lines.next_line().await {
                if let Some(addr) = line.strip_prefix("seatsync listening on ") {
                    return addr.trim().to_owned();
                }
            }
            panic!("seatsync exited before listening");
        })
        .await
        .expect("replica did not start within 30 s");
        // Keep draining stdout so the child never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        let replica = Replica {
            child,
            base,
            http: reqwest::Client::new(),
        };
        replica.wait_ready(Duration::from_secs(20)).await;
        replica
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    pub async fn ready(&self) -> bool {
        matches!(self.http.get(self.url("/readyz")).send().await, Ok(r) if r.status() == StatusCode::OK)
    }

    pub async fn wait_ready(&self, timeout: Duration) {
        wait_for("replica ready", timeout, || async {
            self.ready().await.then_some(())
        })
        .await;
    }

    /// Sends SIGTERM and waits (bounded) for the exit status.
    pub async fn terminate(&mut self, timeout: Duration) -> std::process::ExitStatus {
        let pid = self.child.id().expect("running");
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status();
        tokio::time::timeout(timeout, self.child.wait())
            .await
            .expect("replica did not exit in time after SIGTERM")
            .expect("wait")
    }

    pub async fn kill(&mut self) {
        let _ = self.child.kill().await;
    }

    /// A raw request; returns status, headers and the body as JSON (Null if not JSON).
    pub async fn request(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
        headers: &[(&str, &str)],
    ) -> ApiResponse {
        let mut req = self.http.request(method, self.url(path));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        if let Some(b) = body {
            req = req.json(&b);
        }
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        ApiResponse::from(req.send().await.expect("request")).await
    }

    pub async fn get(&self, path: &str, token: Option<&str>) -> ApiResponse {
        self.request(Method::GET, path, token, None, &[]).await
    }

    pub async fn post(&self, path: &str, token: Option<&str>, body: Option<Value>) -> ApiResponse {
        self.request(Method::POST, path, token, body, &[]).await
    }

    pub async fn guest(&self) -> String {
        let r = self.post("/api/auth/guest", None, None).await;
        assert_eq!(r.status, 201, "{:?}", r.body);
        r.body["token"].as_str().expect("token").to_owned()
    }

    pub async fn create_schedule(&self, rows: i64, cols: i64, blocked: &[(i64, i64)]) -> i64 {
        let blocked: Vec<Value> = blocked
            .iter()
            .map(|&(r, c)| json!({"row": r, "col": c}))
            .collect();
        let r = self
            .post(
                "/api/schedules",
                Some(ADMIN_TOKEN),
                Some(
                    json!({"title": "Test show", "startsAt": "2026-12-24T19:30:00Z",
                            "rows": rows, "cols": cols, "blocked": blocked}),
                ),
            )
            .await;
        assert_eq!(r.status, 201, "{:?}", r.body);
        r.body["id"].as_i64().expect("id")
    }

    pub async fn start(&self, token: &str, schedule: i64, seats: &[(i64, i64)]) -> ApiResponse {
        self.post(
            "/api/bookings/start",
            Some(token),
            Some(start_body(schedule, seats)),
        )
        .await
    }

    pub async fn start_with_key(
        &self,
        token: &str,
        schedule: i64,
        seats: &[(i64, i64)],
        key: &str,
    ) -> ApiResponse {
        self.request(
            Method::POST,
            "/api/bookings/start",
            Some(token),
            Some(start_body(schedule, seats)),
            &[("Idempotency-Key", key)],
        )
        .await
    }

    pub async fn confirm(&self, token: &str, booking: &str) -> ApiResponse {
        self.post(
            &format!("/api/bookings/{booking}/confirm"),
            Some(token),
            None,
        )
        .await
    }

    pub async fn cancel(&self, token: &str, booking: &str) -> ApiResponse {
        self.post(
            &format!("/api/bookings/{booking}/cancel"),
            Some(token),
            None,
        )
        .await
    }

    /// The snapshot as (lastEventId, {(row, col) -> status}).
    pub async fn snapshot(&self, schedule: i64) -> (i64, BTreeMap<(i64, i64), String>) {
        let r = self
            .get(&format!("/api/schedules/{schedule}/seat-status"), None)
            .await;
        assert_eq!(r.status, 200, "{:?}", r.body);
        let last: i64 = r.body["lastEventId"]
            .as_str()
            .expect("lastEventId is a string")
            .parse()
            .expect("numeric");
        let seats = r.body["seats"]
            .as_array()
            .expect("seats")
            .iter()
            .map(|s| {
                (
                    (s["row"].as_i64().unwrap(), s["col"].as_i64().unwrap()),
                    s["status"].as_str().unwrap().to_owned(),
                )
            })
            .collect();
        (last, seats)
    }

    /// Opens the seat stream; `last_event_id` goes in the header.
    pub async fn stream(&self, schedule: i64, last_event_id: Option<&str>) -> SseClient {
        SseClient::connect(
            &self.url(&format!("/api/schedules/{schedule}/seats/stream")),
            last_event_id,
        )
        .await
    }

    /// Reads a Prometheus gauge or counter (summing labelled series).
    pub async fn metric(&self, name: &str) -> f64 {
        let text = self
            .http
            .get(self.url("/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        text.lines()
            .filter(|l| !l.starts_with('#'))
            .filter(|l| l.split([' ', '{']).next() == Some(name))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }
}

pub fn start_body(schedule: i64, seats: &[(i64, i64)]) -> Value {
    let seats: Vec<Value> = seats
        .iter()
        .map(|&(r, c)| json!({"row": r, "col": c}))
        .collect();
    json!({"scheduleId": schedule, "seats": seats})
}

#[derive(Debug)]
pub struct ApiResponse {
    pub status: u16,
    pub headers: reqwest::header::HeaderMap,
    pub body: Value,
}

impl ApiResponse {
    pub async fn from(r: reqwest::Response) -> Self {
        let status = r.status().as_u16();
        let headers = r.headers().clone();
        let bytes = r.bytes().await.unwrap_or_default();
        let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        ApiResponse {
            status,
            headers,
            body,
        }
    }

    pub fn content_type(&self) -> &str {
        self.headers
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    }

    /// Asserts a problem+json error with this status and code.
    pub fn assert_problem(&self, status: u16, code: &str) {
        assert_eq!(self.status, status, "body: {}", self.body);
        assert_eq!(
            self.content_type(),
            "application/problem+json",
            "body: {}",
            self.body
        );
        assert_eq!(self.body["code"], code, "body: {}", self.body);
        assert_eq!(self.body["status"], status);
        for member in ["type", "title", "detail"] {
            assert!(
                self.body[member].is_string(),
                "problem lacks {member}: {}",
                self.body
            );
        }
    }

    pub fn booking_id(&self) -> String {
        self.body["bookingId"]
            .as_str()
            .unwrap_or_else(|| panic!("no bookingId in {}", self.body))
            .to_owned()
    }
}

/// One parsed SSE frame.
#[derive(Debug, Clone, PartialEq)]
pub enum SseFrame {
    Retry(u64),
    Event {
        id: i64,
        action: String,
        seats: Vec<(i64, i64)>,
    },
    Resync,
    Comment,
}

/// Reads a seat stream in the background and hands out parsed frames.
pub struct SseClient {
    pub status: u16,
    pub headers: reqwest::header::HeaderMap,
    rx: mpsc::UnboundedReceiver<SseFrame>,
    task: tokio::task::JoinHandle<()>,
}

impl SseClient {
    pub async fn connect(url: &str, last_event_id: Option<&str>) -> SseClient {
        let mut req = reqwest::Client::new().get(url);
        if let Some(id) = last_event_id {
            req = req.header("Last-Event-ID", id);
        }
        let resp = req.send().await.expect("stream request");
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let (tx, rx) = mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            let mut body = resp.bytes_stream();
            let mut buf = String::new();
            while let Some(Ok(chunk)) = body.next().await {
                buf.push_str(&String::from_utf8_lossy(&chunk));
                while let Some(end) = buf.find("\n\n") {
                    let block: String = buf.drain(..end + 2).collect();
                    if let Some(frame) = parse_block(&block) {
                        if tx.send(frame).is_err() {
                            return;
                        }
                    }
                }
            }
        });
        SseClient {
            status,
            headers,
            rx,
            task,
        }
    }

    /// The next frame, or None if the stream ended or `timeout` passed.
    pub async fn next(&mut self, timeout: Duration) -> Option<SseFrame> {
        tokio::time::timeout(timeout, self.rx.recv())
            .await
            .ok()
            .flatten()
    }

    /// The next frame that is not a comment or retry.
    pub async fn next_event(&mut self, timeout: Duration) -> Option<SseFrame> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.next(left).await? {
                SseFrame::Comment | SseFrame::Retry(_) => continue,
                f => return Some(f),
            }
        }
    }

    /// Whether the server ended the stream within `timeout`.
    pub async fn ended(&mut self, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match tokio::time::timeout(left, self.rx.recv()).await {
                Ok(None) => return true,
                Ok(Some(_)) => continue,
                Err(_) => return false,
            }
        }
    }

    pub fn close(self) {
        self.task.abort();
    }
}

impl Drop for SseClient {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn parse_block(block: &str) -> Option<SseFrame> {
    let mut id = None;
    let mut event = None;
    let mut data = String::new();
    let mut retry = None;
    let mut comment = false;
    for line in block.lines() {
        if line.starts_with(':') {
            comment = true;
        } else if let Some(v) = line.strip_prefix("id: ") {
            id = v.parse::<i64>().ok();
        } else if let Some(v) = line.strip_prefix("event: ") {
            event = Some(v.to_owned());
        } else if let Some(v) = line.strip_prefix("data: ") {
            data.push_str(v);
        } else if let Some(v) = line.strip_prefix("retry: ") {
            retry = v.parse().ok();
        }
    }
    if let Some(r) = retry {
        return Some(SseFrame::Retry(r));
    }
    if event.as_deref() == Some("resync") {
        return Some(SseFrame::Resync);
    }
    if let Some(id) = id {
        let v: Value = serde_json::from_str(&data).expect("event data is JSON");
        let seats = v["seats"]
            .as_array()
            .expect("seats")
            .iter()
            .map(|s| (s["row"].as_i64().unwrap(), s["col"].as_i64().unwrap()))
            .collect();
        return Some(SseFrame::Event {
            id,
            action: v["action"].as_str().unwrap().to_owned(),
            seats,
        });
    }
    comment.then_some(SseFrame::Comment)
}

/// Applies events to a seat map the way a browser does.
pub fn apply(map: &mut BTreeMap<(i64, i64), String>, action: &str, seats: &[(i64, i64)]) {
    for s in seats {
        match action {
            "RELEASED" => {
                map.remove(s);
            }
            a => {
                map.insert(*s, a.to_owned());
            }
        }
    }
}

// ---- Seat-event log and booking-response helpers (concurrency, expiry, hold_invariant) ----

/// A seat event, as the log and the stream carry it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoggedEvent {
    pub id: i64,
    pub action: String,
    pub seats: std::collections::BTreeSet<(i64, i64)>,
}

impl TestDb {
    /// The `seat_events` rows of a schedule in id order, read from the table.
    pub async fn logged_seat_events(&self, schedule: i64) -> Vec<LoggedEvent> {
        let c = self.client().await;
        let rows = c
            .query(
                "SELECT event_id, action, seats FROM seat_events WHERE schedule_id = $1 ORDER BY event_id",
                &[&schedule],
            )
            .await
            .unwrap();
        rows.iter()
            .map(|r| LoggedEvent {
                id: r.get(0),
                action: r.get(1),
                seats: seat_set(&r.get::<_, Value>(2)),
            })
            .collect()
    }
}

impl Replica {
    /// Every event after `after` up to and including `until`, read from the
    /// SSE stream resumed with `Last-Event-ID: after`. Fails on a resync, a
    /// gap or a duplicate.
    pub async fn replay_events(&self, schedule: i64, after: i64, until: i64) -> Vec<LoggedEvent> {
        let mut sse = self.stream(schedule, Some(&after.to_string())).await;
        assert_eq!(sse.status, 200);
        let mut out: Vec<LoggedEvent> = Vec::new();
        let mut last = after;
        while last < until {
            match sse.next_event(Duration::from_secs(10)).await {
                Some(SseFrame::Event { id, action, seats }) => {
                    assert_eq!(id, last + 1, "event ids must be dense and ordered");
                    last = id;
                    out.push(LoggedEvent {
                        id,
                        action,
                        seats: seats.into_iter().collect(),
                    });
                }
                other => panic!("replaying {after}..={until}: got {other:?} after id {last}"),
            }
        }
        out
    }
}

/// A JSON seat list as a set of (row, col).
pub fn seat_set(v: &Value) -> std::collections::BTreeSet<(i64, i64)> {
    v.as_array()
        .unwrap_or_else(|| panic!("not a seat list: {v}"))
        .iter()
        .map(|s| (s["row"].as_i64().unwrap(), s["col"].as_i64().unwrap()))
        .collect()
}

/// An RFC 3339 timestamp from a response.
pub fn timestamp(v: &Value) -> chrono::DateTime<chrono::Utc> {
    chrono::DateTime::parse_from_rfc3339(v.as_str().unwrap_or_else(|| panic!("not a time: {v}")))
        .unwrap_or_else(|e| panic!("not RFC 3339: {v}: {e}"))
        .with_timezone(&chrono::Utc)
}

/// The seat map that `events` produce from an empty one.
pub fn replayed_map(events: &[LoggedEvent]) -> BTreeMap<(i64, i64), String> {
    let mut map = BTreeMap::new();
    for e in events {
        let seats: Vec<(i64, i64)> = e.seats.iter().copied().collect();
        apply(&mut map, &e.action, &seats);
    }
    map
}

// ---- SSE helpers (realtime, listener_failure, lifecycle) ----

/// Parses one SSE block (the text up to and including its blank line), for
/// tests that read a stream themselves.
pub fn parse_sse_block(block: &str) -> Option<SseFrame> {
    parse_block(block)
}

/// The frame with its seats sorted: seat lists have no guaranteed order.
pub fn sorted_frame(frame: SseFrame) -> SseFrame {
    match frame {
        SseFrame::Event {
            id,
            action,
            mut seats,
        } => {
            seats.sort();
            SseFrame::Event { id, action, seats }
        }
        other => other,
    }
}

impl SseClient {
    /// Event and resync frames (seats sorted; comments and `retry:` skipped)
    /// until an event with id >= `upto` arrives. Panics with what it has
    /// seen if the stream ends or `timeout` passes first.
    pub async fn frames_until(&mut self, upto: i64, timeout: Duration) -> Vec<SseFrame> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut seen = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.next_event(left).await {
                Some(f) => {
                    let done = matches!(f, SseFrame::Event { id, .. } if id >= upto);
                    seen.push(sorted_frame(f));
                    if done {
                        return seen;
                    }
                }
                None => panic!("no event {upto} within {timeout:?}; saw {seen:?}"),
            }
        }
    }
}

impl Replica {
    /// The process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// The `/readyz` status, or None when the replica does not answer.
    pub async fn ready_status(&self) -> Option<u16> {
        self.http
            .get(self.url("/readyz"))
            .timeout(Duration::from_secs(3))
            .send()
            .await
            .ok()
            .map(|r| r.status().as_u16())
    }
}

impl Replica {
    /// Opens the seat stream, asserting 200 and the opening `retry: 3000`
    /// (after which the client misses nothing).
    pub async fn subscribe(&self, schedule: i64, last_event_id: Option<&str>) -> SseClient {
        let mut sse = self.stream(schedule, last_event_id).await;
        assert_eq!(sse.status, 200, "stream of schedule {schedule}");
        assert_eq!(
            sse.next(Duration::from_secs(5)).await,
            Some(SseFrame::Retry(3000)),
            "a stream opens with retry: 3000"
        );
        sse
    }

    /// Like [`Replica::subscribe`], resuming with `?lastEventId=` and
    /// optionally a `Last-Event-ID` header as well.
    pub async fn subscribe_query(
        &self,
        schedule: i64,
        query: &str,
        header: Option<&str>,
    ) -> SseClient {
        let url = self.url(&format!(
            "/api/schedules/{schedule}/seats/stream?lastEventId={query}"
        ));
        let mut sse = SseClient::connect(&url, header).await;
        assert_eq!(sse.status, 200, "stream of schedule {schedule}");
        assert_eq!(
            sse.next(Duration::from_secs(5)).await,
            Some(SseFrame::Retry(3000)),
            "a stream opens with retry: 3000"
        );
        sse
    }
}

/// A client that keeps a seat map the way the page does: snapshot plus the
/// events after it, checking that ids are dense (no gap, no duplicate).
pub struct SeatMapClient {
    pub name: String,
    pub schedule: i64,
    pub sse: SseClient,
    pub map: BTreeMap<(i64, i64), String>,
    /// Every event up to here is reflected in `map`.
    pub applied_upto: i64,
    /// The id of the last event received, None until the first one after
    /// subscribing live or after a resync.
    pub last_id: Option<i64>,
    pub resyncs: usize,
    pub events: usize,
}

impl SeatMapClient {
    /// Snapshot (from `snap`) first, then the stream (from `streamer`)
    /// resumed at the snapshot's lastEventId.
    pub async fn snapshot_then_stream(
        name: &str,
        snap: &Replica,
        streamer: &Replica,
        schedule: i64,
    ) -> Self {
        let (last, map) = snap.snapshot(schedule).await;
        let sse = streamer.subscribe(schedule, Some(&last.to_string())).await;
        SeatMapClient {
            name: name.into(),
            schedule,
            sse,
            map,
            applied_upto: last,
            last_id: Some(last),
            resyncs: 0,
            events: 0,
        }
    }

    /// The stream first (live, no Last-Event-ID), then the snapshot: events
    /// at or below its lastEventId are already in it.
    pub async fn stream_then_snapshot(
        name: &str,
        snap: &Replica,
        streamer: &Replica,
        schedule: i64,
    ) -> Self {
        let sse = streamer.subscribe(schedule, None).await;
        let (last, map) = snap.snapshot(schedule).await;
        SeatMapClient {
            name: name.into(),
            schedule,
            sse,
            map,
            applied_upto: last,
            last_id: None,
            resyncs: 0,
            events: 0,
        }
    }

    /// Reconnects to `streamer` with the last event id it has, as
    /// EventSource does.
    pub async fn reconnect(&mut self, streamer: &Replica) {
        let last = self.applied_upto.to_string();
        self.sse = streamer.subscribe(self.schedule, Some(&last)).await;
        self.last_id = Some(self.applied_upto);
    }

    /// Applies one frame. A resync reloads the snapshot from `resync_from`;
    /// without one a resync is a failure.
    pub async fn apply_frame(&mut self, frame: SseFrame, resync_from: Option<&Replica>) {
        match frame {
            SseFrame::Event { id, action, seats } => {
                match self.last_id {
                    Some(last) => assert_eq!(
                        id,
                        last + 1,
                        "{}: event {id} after {last}: a gap or a duplicate",
                        self.name
                    ),
                    // Subscribed before the snapshot was taken: nothing after
                    // the snapshot may be missing.
                    None => assert!(
                        id <= self.applied_upto + 1,
                        "{}: first event {id}, but the snapshot is at {}",
                        self.name,
                        self.applied_upto
                    ),
                }
                self.last_id = Some(id);
                self.events += 1;
                if id > self.applied_upto {
                    apply(&mut self.map, &action, &seats);
                    self.applied_upto = id;
                }
            }
            SseFrame::Resync => {
                let Some(r) = resync_from else {
                    panic!("{}: unexpected resync", self.name);
                };
                self.resyncs += 1;
                let (last, map) = r.snapshot(self.schedule).await;
                self.map = map;
                self.applied_upto = last;
                self.last_id = None;
            }
            SseFrame::Comment | SseFrame::Retry(_) => {}
        }
    }

    /// Reads until the map reflects event `upto`; panics at the deadline.
    pub async fn catch_up(&mut self, upto: i64, timeout: Duration, resync_from: Option<&Replica>) {
        let deadline = tokio::time::Instant::now() + timeout;
        while self.applied_upto < upto {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.sse.next_event(left).await {
                Some(f) => self.apply_frame(f, resync_from).await,
                None => panic!(
                    "{}: stuck at event {} (want {upto}) after {timeout:?}",
                    self.name, self.applied_upto
                ),
            }
        }
    }
}

/// Makes one seat event per `step`: a hold of two fresh seats, then the
/// confirm (every third step) or the cancel of that hold. Needs a grid of
/// at least 10 x 20; seats stay distinct for the first 100 steps.
#[derive(Default)]
pub struct ChangeScript {
    n: i64,
    pending: Option<(String, String)>,
}

impl ChangeScript {
    pub fn new() -> Self {
        ChangeScript {
            n: 0,
            pending: None,
        }
    }

    pub async fn step(&mut self, r: &Replica, schedule: i64) {
        self.n += 1;
        match self.pending.take() {
            None => {
                let token = r.guest().await;
                let (row, col) = (1 + self.n % 10, 1 + 2 * ((self.n / 10) % 10));
                let resp = r
                    .start(&token, schedule, &[(row, col), (row, col + 1)])
                    .await;
                assert_eq!(resp.status, 201, "{}", resp.body);
                self.pending = Some((token, resp.booking_id()));
            }
            Some((token, id)) if self.n % 3 == 0 => {
                assert_eq!(r.confirm(&token, &id).await.status, 200)
            }
            Some((token, id)) => assert_eq!(r.cancel(&token, &id).await.status, 200),
        }
    }
}

impl TestDb {
    /// Deadlocks PostgreSQL detected in this database. Kills `replicas`
    /// first and waits for their backends to exit, since a backend reports
    /// its counts when it ends.
    pub async fn deadlocks_after_shutdown(&self, replicas: Vec<Replica>) -> i64 {
        for mut r in replicas {
            r.kill().await;
        }
        let c = self.client().await;
        wait_for(
            "the replicas' connections to close",
            Duration::from_secs(10),
            || async {
                let n: i64 = c
                    .query_one(
                        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() \
                         AND application_name = 'seatsync'",
                        &[],
                    )
                    .await
                    .unwrap()
                    .get(0);
                (n == 0).then_some(())
            },
        )
        .await;
        c.query_one(
            "SELECT deadlocks FROM pg_stat_database WHERE datname = current_database()",
            &[],
        )
        .await
        .unwrap()
        .get(0)
    }
}
