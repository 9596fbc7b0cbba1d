//! `seatsync serve` processes on free ports, and a client for the HTTP
//! contract they serve.

use std::collections::BTreeMap;
use std::process::Stdio;
use std::time::Duration;

use futures::future::join_all;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use super::{wait_for, LoggedEvent, SseClient, SseFrame, TestDb};

pub const AUTH_SECRET: &str = "integration-test-secret-0123456789";
pub const ADMIN_TOKEN: &str = "integration-admin-token-0123456789";

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

/// The seat stream of a schedule.
pub fn stream_path(schedule: i64) -> String {
    format!("/api/schedules/{schedule}/seats/stream")
}

pub fn start_body(schedule: i64, seats: &[(i64, i64)]) -> Value {
    let seats: Vec<Value> = seats
        .iter()
        .map(|&(r, c)| json!({"row": r, "col": c}))
        .collect();
    json!({"scheduleId": schedule, "seats": seats})
}

/// A seat-status body as (lastEventId, {(row, col) -> status}).
pub fn parse_snapshot(body: &Value) -> (i64, BTreeMap<(i64, i64), String>) {
    let last = body["lastEventId"]
        .as_str()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("snapshot without lastEventId: {body}"));
    let seats = body["seats"]
        .as_array()
        .unwrap_or_else(|| panic!("snapshot without seats: {body}"))
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

/// `seatsync serve` on `database_url`, a free port of 127.0.0.1, and the
/// test secrets, with nothing else from the environment.
pub fn seatsync_command(database_url: &str) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_seatsync"));
    cmd.env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("DATABASE_URL", database_url)
        .env("AUTH_SECRET", AUTH_SECRET)
        .env("ADMIN_TOKEN", ADMIN_TOKEN)
        .env("HOST", "127.0.0.1")
        .env("PORT", "0");
    cmd
}

/// A running `seatsync serve` process on a free port, or (from
/// [`Replica::behind`]) the same client for an address in front of replicas.
pub struct Replica {
    /// None for [`Replica::behind`]: no process of its own.
    child: Option<Child>,
    pub base: String,
    pub http: reqwest::Client,
}

impl Replica {
    pub async fn spawn(db: &TestDb, opts: ReplicaOpts) -> Replica {
        Self::spawn_url(&db.url, opts).await
    }

    /// A replica whose pool goes to `database_url`, which need not be the
    /// test database's own URL (a pooler in front of it, say).
    pub async fn spawn_url(database_url: &str, opts: ReplicaOpts) -> Replica {
        let mut cmd = seatsync_command(database_url);
        cmd.env("SWEEP_INTERVAL_MS", "200")
            // Small pools: parallel tests share one server's max_connections.
            .env("DB_POOL_SIZE", "6")
            // Most tests play many users, or one user many times, from one
            // address at machine speed: what the abuse limits are there to
            // stop. The limits' own tests turn them back on.
            .env("RATE_LIMIT_USER", "0")
            .env("RATE_LIMIT_IP", "0")
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
            child: Some(child),
            base,
            http: reqwest::Client::new(),
        };
        wait_for("replica ready", Duration::from_secs(20), || async {
            replica.ready().await.then_some(())
        })
        .await;
        replica
    }

    /// The HTTP contract at `base`, served by replicas behind a proxy (nginx)
    /// rather than by a process this value runs.
    pub fn behind(base: &str) -> Replica {
        Replica {
            child: None,
            base: base.to_owned(),
            http: reqwest::Client::new(),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    pub async fn ready(&self) -> bool {
        matches!(self.http.get(self.url("/readyz")).send().await, Ok(r) if r.status() == StatusCode::OK)
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

    /// The process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref()?.id()
    }

    /// Sends SIGTERM and waits (bounded) for the exit status.
    pub async fn terminate(&mut self, timeout: Duration) -> std::process::ExitStatus {
        let child = self.child.as_mut().expect("a replica process");
        let pid = child.id().expect("running");
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status();
        tokio::time::timeout(timeout, child.wait())
            .await
            .expect("replica did not exit in time after SIGTERM")
            .expect("wait")
    }

    pub async fn kill(&mut self) {
        if let Some(child) = self.child.as_mut() {
            let _ = child.kill().await;
        }
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

    /// `N` guest tokens, fetched at once.
    pub async fn guests<const N: usize>(&self) -> [String; N] {
        let tokens = join_all((0..N).map(|_| self.guest())).await;
        tokens.try_into().expect("N tokens")
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

    /// A start that must be granted: the 201 answer.
    pub async fn hold(&self, token: &str, schedule: i64, seats: &[(i64, i64)]) -> ApiResponse {
        let resp = self.start(token, schedule, seats).await;
        assert_eq!(resp.status, 201, "{}", resp.body);
        resp
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

    /// The booking as `token`'s user sees it.
    pub async fn booking(&self, token: &str, booking: impl std::fmt::Display) -> ApiResponse {
        self.get(&format!("/api/bookings/{booking}"), Some(token))
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
        parse_snapshot(&r.body)
    }

    /// Opens the seat stream; `last_event_id` goes in the header.
    pub async fn stream(&self, schedule: i64, last_event_id: Option<&str>) -> SseClient {
        SseClient::connect(&self.url(&stream_path(schedule)), last_event_id).await
    }

    /// Opens the seat stream, asserting 200 and the opening `retry: 3000`
    /// (after which the client misses nothing).
    pub async fn subscribe(&self, schedule: i64, last_event_id: Option<&str>) -> SseClient {
        let sse = self.stream(schedule, last_event_id).await;
        opened(sse, schedule).await
    }

    /// Like [`Replica::subscribe`], resuming with `?lastEventId=` and
    /// optionally a `Last-Event-ID` header as well.
    pub async fn subscribe_query(
        &self,
        schedule: i64,
        query: &str,
        header: Option<&str>,
    ) -> SseClient {
        let url = self.url(&format!("{}?lastEventId={query}", stream_path(schedule)));
        opened(SseClient::connect(&url, header).await, schedule).await
    }

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

    /// The `/metrics` page.
    pub async fn metrics_text(&self) -> String {
        self.http
            .get(self.url("/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    /// Reads a Prometheus gauge or counter (summing labelled series).
    pub async fn metric(&self, name: &str) -> f64 {
        let text = self.metrics_text().await;
        text.lines()
            .filter(|l| !l.starts_with('#'))
            .filter(|l| l.split([' ', '{']).next() == Some(name))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }
}

/// `sse` after asserting 200 and reading the opening `retry: 3000`.
async fn opened(mut sse: SseClient, schedule: i64) -> SseClient {
    assert_eq!(sse.status, 200, "stream of schedule {schedule}");
    assert_eq!(
        sse.next(Duration::from_secs(5)).await,
        Some(SseFrame::Retry(3000)),
        "a stream opens with retry: 3000"
    );
    sse
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
