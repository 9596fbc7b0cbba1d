//! A ticket drop is an attack surface: scripts hammering start, streams
//! opened by the thousand, slow and half-open connections, forged tokens,
//! background tasks that die. Each limit answers as the contract says and
//! changes nothing.

use std::time::{Duration, Instant};

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use reqwest::Method;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::helpers::*;

fn host_port(r: &Replica) -> String {
    r.base.trim_start_matches("http://").to_owned()
}

/// Open file descriptors of a process.
fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

#[tokio::test]
async fn the_start_limit_stops_a_script_but_not_a_person() {
    // The defaults, as a replica runs without settings.
    let (db, r) = TestDb::with_replica(
        ReplicaOpts::default()
            .with("RATE_LIMIT_USER", 2)
            .with("RATE_LIMIT_IP", 1000),
    )
    .await;
    let schedule = r.create_schedule(5, 10, &[]).await;
    let [person, script] = r.guests().await;

    // A person: pick, pay, change their mind, pay again, a few times.
    for col in 1..=4 {
        let held = r.hold(&person, schedule, &[(1, col)]).await;
        assert_eq!(r.cancel(&person, &held.booking_id()).await.status, 200);
    }

    // A script: start as fast as it can.
    let mut answers = std::collections::BTreeMap::<u16, usize>::new();
    let mut retry_after = None;
    for i in 0..60 {
        let resp = r.start(&script, schedule, &[(2 + i % 3, 1 + i % 10)]).await;
        if resp.status == 429 {
            resp.assert_problem(429, "rate_limited");
            retry_after = resp.headers.get("retry-after").cloned();
        } else if resp.status == 201 {
            assert_eq!(r.cancel(&script, &resp.booking_id()).await.status, 200);
        }
        *answers.entry(resp.status).or_default() += 1;
    }
    let limited = answers.get(&429).copied().unwrap_or(0);
    let seconds: u64 = retry_after
        .expect("a Retry-After on 429")
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(limited >= 40, "{answers:?}");
    assert!((1..=5).contains(&seconds), "Retry-After {seconds}");
    // Every refused start wrote nothing: bookings are the person's 4 and
    // the script's allowed ones.
    let bookings = db.count("SELECT count(*) FROM bookings", &[]).await;
    assert_eq!(
        bookings as usize,
        4 + answers.get(&201).copied().unwrap_or(0)
    );
    println!("start limit: a person's 4 starts all passed; a script's 60 got {answers:?}, Retry-After {seconds} s");
    db.assert_consistent().await;
}

#[tokio::test]
async fn the_address_limit_counts_the_forwarded_client_only_behind_a_trusted_proxy() {
    let db = TestDb::create().await;
    let limited = |trusted: &str| {
        ReplicaOpts::default()
            .with("RATE_LIMIT_IP", 5)
            .with("TRUSTED_PROXIES", trusted)
    };
    let behind_lb = Replica::spawn(&db, limited("127.0.0.1")).await;
    let guest = |r: &Replica, forwarded: &str| {
        r.http
            .post(r.url("/api/auth/guest"))
            .header("x-forwarded-for", forwarded.to_owned())
            .send()
    };
    let status = |resp: reqwest::Result<reqwest::Response>| resp.unwrap().status().as_u16();
    // One client behind the trusted load balancer: stopped after its burst.
    let mut first = Vec::new();
    for _ in 0..30 {
        first.push(status(guest(&behind_lb, "203.0.113.7").await));
    }
    let refused = first.iter().filter(|s| **s == 429).count();
    assert!(refused >= 15, "{first:?}");
    // Another client behind the same balancer is not.
    assert_eq!(status(guest(&behind_lb, "203.0.113.8").await), 201);
    // The client's own claim left of the balancer's entry is not believed.
    assert_eq!(
        status(guest(&behind_lb, "198.51.100.1, 203.0.113.7").await),
        429
    );

    // A peer that is not a trusted proxy cannot pick its address by header.
    let direct = Replica::spawn(&db, limited("10.9.9.9")).await;
    let mut spoofed = Vec::new();
    for i in 0..30 {
        spoofed.push(status(guest(&direct, &format!("198.51.100.{i}")).await));
    }
    let spoof_refused = spoofed.iter().filter(|s| **s == 429).count();
    assert!(spoof_refused >= 15, "{spoofed:?}");
    println!(
        "address limit: one forwarded client got {refused} of 30 refused, its neighbour passed; \
         30 spoofed headers from an untrusted peer got {spoof_refused} refused"
    );
}

#[tokio::test]
async fn streams_per_address_are_capped_next_to_the_global_cap() {
    let (_db, r) = TestDb::with_replica(ReplicaOpts::default().with("SSE_MAX_PER_IP", 3)).await;
    let schedule = r.create_schedule(2, 2, &[]).await;
    let mut open = Vec::new();
    for _ in 0..3 {
        open.push(r.subscribe(schedule, None).await);
    }
    let refused = r.get(&stream_path(schedule), None).await;
    refused.assert_problem(503, "too_many_streams");
    assert!(refused.headers.contains_key("retry-after"));
    open.pop().unwrap().close();
    // The slot is given back as soon as the server sees the close.
    let again = wait_for("a stream slot freed", Duration::from_secs(5), || async {
        let resp = r
            .http
            .get(r.url(&stream_path(schedule)))
            .send()
            .await
            .ok()?;
        (resp.status() == 200).then_some(resp)
    })
    .await;
    drop(again);
    println!("streams per address: 3 open, the 4th refused with 503, admitted again after a close");
}

#[tokio::test]
async fn slow_and_oversized_request_heads_are_cut_off() {
    let (_db, r) = TestDb::with_replica(
        ReplicaOpts::default()
            .with("HEADER_READ_TIMEOUT_SECONDS", 1)
            .with("MAX_HEADER_BYTES", 16 * 1024),
    )
    .await;
    let pid = r.pid().expect("running");
    let base_fds = open_fds(pid);
    let addr = host_port(&r);

    // Slowloris: 300 connections that never finish their request head.
    let mut slow = Vec::new();
    for _ in 0..300 {
        let mut s = TcpStream::connect(&addr).await.unwrap();
        s.write_all(b"GET /api/schedules HTTP/1.1\r\nHost: x\r\nX-Slow: ")
            .await
            .unwrap();
        slow.push(s);
    }
    let opened = Instant::now();
    let peak = open_fds(pid);
    // A normal client is served meanwhile.
    assert_eq!(r.get("/api/schedules", None).await.status, 200);
    // Each is closed by the server once the timeout passes.
    let mut closed = 0;
    for mut s in slow {
        let mut buf = [0u8; 512];
        let read = tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf))
            .await
            .expect("the server closes a slow connection within 10 s");
        // Closed (0), or answered 408 and then closed.
        if matches!(read, Ok(0)) || read.is_err() || buf.starts_with(b"HTTP/1.1 408") {
            closed += 1;
        }
    }
    let took = opened.elapsed();
    assert_eq!(closed, 300);
    let after = wait_for(
        "descriptors back to base",
        Duration::from_secs(5),
        || async {
            let n = open_fds(pid);
            (n <= base_fds + 5).then_some(n)
        },
    )
    .await;

    // A head larger than the cap: 431, not a crash and not a hang.
    let big = "x".repeat(20 * 1024);
    // A new connection: the pooled one was idle past the 1 s head timeout,
    // which closes idle keep-alive connections too.
    let resp = reqwest::Client::new()
        .get(r.url("/api/schedules"))
        .header("x-big", big)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 431);
    // A 1 MB token: refused before anyone looks at it.
    let token = format!("a.{}.b", "x".repeat(1024 * 1024));
    let resp = reqwest::Client::new()
        .get(r.url("/api/bookings/00000000-0000-0000-0000-000000000000"))
        .bearer_auth(token)
        .send()
        .await;
    let status = resp.map(|r| r.status().as_u16()).unwrap_or(431);
    assert!(status == 431 || status == 401, "{status}");
    println!(
        "slowloris: 300 half-open heads closed within {:.1} s (timeout 1 s); descriptors {base_fds} -> {peak} -> {after}; \
         a 20 KiB head got 431, a 1 MB token {status}",
        took.as_secs_f64()
    );
}

#[tokio::test]
async fn a_request_that_sends_its_body_slowly_times_out_and_changes_nothing() {
    let (db, r) =
        TestDb::with_replica(ReplicaOpts::default().with("REQUEST_TIMEOUT_SECONDS", 1)).await;
    let schedule = r.create_schedule(2, 2, &[]).await;
    let token = r.guest().await;
    let mut s = TcpStream::connect(host_port(&r)).await.unwrap();
    let body = start_body(schedule, &[(1, 1)]).to_string();
    let head = format!(
        "POST /api/bookings/start HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).await.unwrap();
    s.write_all(&body.as_bytes()[..5]).await.unwrap();
    let started = Instant::now();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), async {
        let mut buf = [0u8; 4096];
        loop {
            let n = s.read(&mut buf).await.unwrap_or(0);
            answer.extend_from_slice(&buf[..n]);
            if n == 0 || answer.windows(4).any(|w| w == b"\r\n\r\n") {
                break;
            }
        }
    })
    .await
    .expect("an answer within 10 s");
    let text = String::from_utf8_lossy(&answer);
    assert!(text.starts_with("HTTP/1.1 503"), "{text}");
    assert!(text.to_ascii_lowercase().contains("retry-after"), "{text}");
    assert_eq!(db.count("SELECT count(*) FROM bookings", &[]).await, 0);
    println!(
        "request timeout: a start whose body stalled was answered 503 after {:.2} s (limit 1 s), nothing written",
        started.elapsed().as_secs_f64()
    );
}

fn jwt(alg: Algorithm, secret: &[u8], claims: Value) -> String {
    jsonwebtoken::encode(
        &Header::new(alg),
        &claims,
        &EncodingKey::from_secret(secret),
    )
    .unwrap()
}

#[tokio::test]
async fn forged_and_unusable_tokens_are_unauthorized_and_never_logged() {
    let db = TestDb::create().await;
    let mut r = LoggedReplica::start(&db.url, &[("RUST_LOG", "debug")]).await;
    let now = chrono::Utc::now().timestamp();
    let user = uuid::Uuid::new_v4().to_string();
    let secret = AUTH_SECRET.as_bytes();
    let good = jwt(
        Algorithm::HS256,
        secret,
        json!({"sub": user, "exp": now + 600}),
    );
    let unsigned = {
        // alg none: header and claims, no signature.
        use base64::Engine;
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        format!(
            "{}.{}.",
            b64.encode(r#"{"alg":"none","typ":"JWT"}"#),
            b64.encode(json!({"sub": user, "exp": now + 600}).to_string())
        )
    };
    let rs256_header = {
        // An HS256 signature under a header that claims RS256.
        let mut parts: Vec<String> = good.split('.').map(str::to_owned).collect();
        use base64::Engine;
        parts[0] = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .encode(r#"{"alg":"RS256","typ":"JWT"}"#);
        parts.join(".")
    };
    let cases: Vec<(&str, String)> = vec![
        ("alg none", unsigned),
        (
            "HS384",
            jwt(
                Algorithm::HS384,
                secret,
                json!({"sub": user, "exp": now + 600}),
            ),
        ),
        (
            "HS512",
            jwt(
                Algorithm::HS512,
                secret,
                json!({"sub": user, "exp": now + 600}),
            ),
        ),
        ("RS256 header", rs256_header),
        (
            "wrong secret",
            jwt(
                Algorithm::HS256,
                b"another-secret-of-at-least-32-bytes!",
                json!({"sub": user, "exp": now + 600}),
            ),
        ),
        (
            "expired",
            jwt(
                Algorithm::HS256,
                secret,
                json!({"sub": user, "exp": now - 60}),
            ),
        ),
        (
            "not valid yet",
            jwt(
                Algorithm::HS256,
                secret,
                json!({"sub": user, "exp": now + 600, "nbf": now + 300}),
            ),
        ),
        (
            "no sub",
            jwt(Algorithm::HS256, secret, json!({"exp": now + 600})),
        ),
        (
            "sub not a UUID",
            jwt(
                Algorithm::HS256,
                secret,
                json!({"sub": "alice", "exp": now + 600}),
            ),
        ),
        (
            "no exp",
            jwt(Algorithm::HS256, secret, json!({"sub": user})),
        ),
        ("trailing garbage", format!("{good}garbage")),
        ("extra segment", format!("{good}.x")),
        ("empty", String::new()),
    ];
    let http = reqwest::Client::new();
    for (what, token) in &cases {
        let resp = http
            .request(
                Method::GET,
                r.url("/api/bookings/00000000-0000-0000-0000-000000000000"),
            )
            .header("authorization", format!("Bearer {token}"))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 401, "{what}");
        let body: Value = resp.json().await.unwrap();
        assert_eq!(body["code"], "unauthorized", "{what}");
    }
    // The genuine token works (404: the booking does not exist).
    let ok = http
        .get(r.url("/api/bookings/00000000-0000-0000-0000-000000000000"))
        .bearer_auth(&good)
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), 404);
    // Wrong admin token: 403, compared in constant time (src/auth.rs).
    let wrong_admin = http
        .post(r.url("/api/schedules"))
        .bearer_auth("not-the-admin-token-0123456789")
        .json(&json!({"title": "x", "startsAt": "2027-01-01T00:00:00Z", "rows": 1, "cols": 1}))
        .send()
        .await
        .unwrap();
    assert_eq!(wrong_admin.status(), 403);

    // Flush the log with a marker request, then check no secret is in it.
    let _ = http.get(r.url("/healthz")).send().await;
    let marker = http
        .get(r.url("/no-such-route-marker"))
        .send()
        .await
        .unwrap();
    let marker_id = marker.headers()["x-request-id"]
        .to_str()
        .unwrap()
        .to_owned();
    let mut log = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            let line = r.log_line(Duration::from_secs(5), |_| true).await;
            let done = line.contains(&marker_id);
            log.push(line);
            if done {
                break;
            }
        }
    })
    .await;
    let text = log.join("\n");
    for (what, token) in &cases {
        if token.len() > 20 {
            let signature = token.rsplit('.').next().unwrap_or(token);
            assert!(
                signature.len() < 8 || !text.contains(signature),
                "the log shows the {what} token"
            );
        }
    }
    assert!(!text.contains(AUTH_SECRET) && !text.contains(ADMIN_TOKEN));
    assert!(!text.contains(good.as_str()));
    println!(
        "auth edges: {} forged or unusable tokens -> 401, a wrong admin token -> 403; {} log lines at debug hold no token or secret",
        cases.len(),
        log.len()
    );
}

#[tokio::test]
async fn a_background_task_that_dies_takes_the_replica_down_naming_it() {
    if !cfg!(feature = "fault-injection") {
        println!("supervision: skipped, the binary has no fault injection (the test command builds it with --features fault-injection)");
        return;
    }
    let db = TestDb::create().await;
    for (fault, task, how) in [
        ("sweeper", "sweeper", "panicked"),
        ("listener:return", "listener", "returned"),
        ("pruner", "pruner", "panicked"),
    ] {
        let r =
            LoggedReplica::start(&db.url, &[("SEATSYNC_FAULT", fault), ("RUST_LOG", "info")]).await;
        let started = Instant::now();
        let (status, log) = r.exit(Duration::from_secs(15)).await;
        assert!(!status.success(), "{fault}: exited {status:?}");
        let said = log
            .iter()
            .find(|l| l.contains("background task ended"))
            .unwrap_or_else(|| panic!("{fault}: no supervision line in {log:#?}"));
        assert!(said.contains(task) && said.contains(how), "{said}");
        let last = log.last().map(String::as_str).unwrap_or_default();
        assert!(last.contains(task), "the exit line names the task: {last}");
        println!(
            "supervision: fault {fault:?} -> exit {:?} after {:.2} s; {last}",
            status.code(),
            started.elapsed().as_secs_f64()
        );
    }
}

#[tokio::test]
async fn a_short_auth_secret_is_refused_at_start() {
    let db = TestDb::create().await;
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_seatsync"))
        .env_clear()
        .env("DATABASE_URL", &db.url)
        .env("AUTH_SECRET", "x".repeat(31))
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("AUTH_SECRET") && err.contains("32"), "{err}");
}
