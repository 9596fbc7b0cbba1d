//! A seat stream that opens a fresh connection is answered without hyper
//! (`src/server/event_stream.rs`); every other request, and a stream on a
//! connection that carried other requests, is hyper's. Both must speak the
//! same HTTP, over raw sockets as a browser or a proxy would.

use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::helpers::*;

fn host_port(r: &Replica) -> String {
    r.base.trim_start_matches("http://").to_owned()
}

/// A raw client: what it sent and what it read.
struct Raw {
    tcp: TcpStream,
    read: Vec<u8>,
}

impl Raw {
    async fn connect(r: &Replica) -> Raw {
        let tcp = TcpStream::connect(host_port(r)).await.expect("connect");
        Raw {
            tcp,
            read: Vec::new(),
        }
    }

    async fn send(&mut self, text: &str) {
        self.tcp.write_all(text.as_bytes()).await.expect("write");
    }

    /// Reads until `done` holds for what was read, or panics after 10 s.
    async fn read_until(&mut self, what: &str, done: impl Fn(&[u8]) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut buf = [0u8; 4096];
        while !done(&self.read) {
            let left = deadline.saturating_duration_since(Instant::now());
            let n = tokio::time::timeout(left, self.tcp.read(&mut buf))
                .await
                .unwrap_or_else(|_| {
                    panic!(
                        "no {what} within 10 s; read so far: {:?}",
                        String::from_utf8_lossy(&self.read)
                    )
                })
                .expect("read");
            assert!(
                n > 0,
                "closed before {what}: {:?}",
                String::from_utf8_lossy(&self.read)
            );
            self.read.extend_from_slice(&buf[..n]);
        }
    }

    /// The response head (lower-cased) once it is complete; the body bytes
    /// read so far stay in `read`.
    async fn head(&mut self) -> String {
        self.read_until("a response head", |b| find(b, b"\r\n\r\n").is_some())
            .await;
        let end = find(&self.read, b"\r\n\r\n").unwrap_or(0) + 4;
        let head = String::from_utf8_lossy(&self.read[..end]).to_ascii_lowercase();
        self.read.drain(..end);
        head
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.read).into_owned()
    }

    /// Waits for the server to close the connection; returns what came.
    async fn until_closed(&mut self) -> String {
        let mut buf = [0u8; 4096];
        loop {
            let n = tokio::time::timeout(Duration::from_secs(10), self.tcp.read(&mut buf))
                .await
                .expect("the server closes the connection within 10 s")
                .unwrap_or(0);
            if n == 0 {
                return self.text();
            }
            self.read.extend_from_slice(&buf[..n]);
        }
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn stream_request(schedule: i64, version: &str) -> String {
    format!(
        "GET /api/schedules/{schedule}/seats/stream {version}\r\nHost: x\r\n\
         Accept: text/event-stream\r\nX-Request-Id: raw-{schedule}\r\n\r\n"
    )
}

#[tokio::test]
async fn a_stream_on_a_fresh_connection_is_chunked_complete_and_cleaned_up() {
    let (_db, r) = TestDb::with_replica(ReplicaOpts::default()).await;
    let schedule = r.create_schedule(2, 4, &[]).await;
    let token = r.guest().await;
    // Warm up the pool, so that the gauge below only counts our stream.
    assert_eq!(r.metric("seatsync_sse_connections").await, 0.0);

    let mut c = Raw::connect(&r).await;
    c.send(&stream_request(schedule, "HTTP/1.1")).await;
    let head = c.head().await;
    assert!(head.starts_with("http/1.1 200 ok\r\n"), "{head}");
    for h in [
        "content-type: text/event-stream",
        "cache-control: no-cache",
        "x-accel-buffering: no",
        "transfer-encoding: chunked",
        "connection: close",
        "x-request-id: raw-",
        "date: ",
    ] {
        assert!(head.contains(h), "{h} missing in {head}");
    }
    assert!(!head.contains("content-length"), "{head}");
    // The first chunk: `retry: 3000`, framed as HTTP/1.1 chunks.
    c.read_until("the retry frame", |b| {
        find(b, b"retry: 3000\n\n\r\n").is_some()
    })
    .await;
    assert!(
        c.text().starts_with("d\r\nretry: 3000\n\n\r\n"),
        "{:?}",
        c.text()
    );
    c.read.clear();

    assert_eq!(r.hold(&token, schedule, &[(1, 2)]).await.status, 201);
    c.read_until("the event", |b| find(b, b"\n\n\r\n").is_some())
        .await;
    let chunk = c.text();
    let (size, rest) = chunk.split_once("\r\n").expect("a chunk size line");
    let frame = "id: 1\ndata: {\"action\":\"OCCUPIED\",\"seats\":[{\"row\":1,\"col\":2}]}\n\n";
    assert_eq!(usize::from_str_radix(size, 16), Ok(frame.len()));
    assert_eq!(rest, format!("{frame}\r\n"));

    assert_eq!(r.metric("seatsync_sse_connections").await, 1.0);
    drop(c);
    // A client that goes away frees its stream at once, not at a heartbeat.
    let gone_after = Instant::now();
    wait_for(
        "the stream gauge back to 0",
        Duration::from_secs(5),
        || async { (r.metric("seatsync_sse_connections").await == 0.0).then_some(()) },
    )
    .await;
    println!(
        "fresh-connection stream: chunked, headers complete, event framed; freed {:.0} ms after the client left",
        gone_after.elapsed().as_secs_f64() * 1000.0
    );
}

#[tokio::test]
async fn an_http_1_0_stream_is_ended_by_close_and_errors_are_whole_responses() {
    let (_db, r) = TestDb::with_replica(ReplicaOpts::default()).await;
    let schedule = r.create_schedule(2, 4, &[]).await;
    let token = r.guest().await;

    // HTTP/1.0 knows no chunks: the body is the raw event stream.
    let mut c = Raw::connect(&r).await;
    c.send(&stream_request(schedule, "HTTP/1.0")).await;
    let head = c.head().await;
    assert!(head.starts_with("http/1.1 200 ok\r\n"), "{head}");
    assert!(!head.contains("transfer-encoding"), "{head}");
    c.read_until("the retry frame", |b| b.starts_with(b"retry: 3000\n\n"))
        .await;
    // The schedule's writer task writes the event, unframed too.
    wait_for(
        "the stream to go direct",
        Duration::from_secs(5),
        || async { (r.metric("seatsync_sse_direct_streams").await == 1.0).then_some(()) },
    )
    .await;
    assert_eq!(r.hold(&token, schedule, &[(2, 4)]).await.status, 201);
    c.read_until("the event", |b| find(b, b"}\n\n").is_some())
        .await;
    assert_eq!(
        String::from_utf8_lossy(&c.read),
        "retry: 3000\n\nid: 1\ndata: {\"action\":\"OCCUPIED\",\"seats\":[{\"row\":2,\"col\":4}]}\n\n"
    );
    assert_eq!(r.metric("seatsync_sse_direct_handbacks_total").await, 0.0);

    // Refusals on this path are complete responses, then the close.
    for (path, status, code) in [
        (
            "/api/schedules/999/seats/stream",
            "404",
            "schedule_not_found",
        ),
        ("/api/schedules/abc/seats/stream", "400", "invalid_request"),
    ] {
        let mut c = Raw::connect(&r).await;
        c.send(&format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n"))
            .await;
        let head = c.head().await;
        assert!(head.starts_with(&format!("http/1.1 {status} ")), "{head}");
        assert!(
            head.contains("content-type: application/problem+json"),
            "{head}"
        );
        let length: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length: "))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no content-length in {head}"));
        let body = c.until_closed().await;
        assert_eq!(body.len(), length, "{body}");
        let problem: serde_json::Value = serde_json::from_str(&body).expect("problem json");
        assert_eq!(problem["code"], code, "{problem}");
    }
}

#[tokio::test]
async fn a_stream_after_other_requests_on_a_kept_alive_connection_is_served_too() {
    let (_db, r) = TestDb::with_replica(ReplicaOpts::default()).await;
    let schedule = r.create_schedule(2, 4, &[]).await;
    let token = r.guest().await;

    let mut c = Raw::connect(&r).await;
    // Two requests on one connection, the first of them a stream look-alike.
    c.send(&format!(
        "GET /api/schedules/{schedule}/seat-status HTTP/1.1\r\nHost: x\r\n\r\n"
    ))
    .await;
    let head = c.head().await;
    assert!(head.starts_with("http/1.1 200 ok\r\n"), "{head}");
    assert!(!head.contains("connection: close"), "{head}");
    let length: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length: "))
        .and_then(|v| v.trim().parse().ok())
        .expect("content-length");
    c.read_until("the snapshot", |b| b.len() >= length).await;
    c.read.drain(..length);

    c.send(&stream_request(schedule, "HTTP/1.1")).await;
    let head = c.head().await;
    assert!(head.starts_with("http/1.1 200 ok\r\n"), "{head}");
    assert!(head.contains("content-type: text/event-stream"), "{head}");
    c.read_until("the retry frame", |b| find(b, b"retry: 3000\n\n").is_some())
        .await;
    assert_eq!(r.hold(&token, schedule, &[(1, 1)]).await.status, 201);
    c.read_until("the event", |b| find(b, b"id: 1\ndata: ").is_some())
        .await;

    // A stream request with a body is not the plain kind: hyper reads the
    // body and the stream is served all the same.
    let mut c = Raw::connect(&r).await;
    c.send(&format!(
        "GET /api/schedules/{schedule}/seats/stream HTTP/1.1\r\nHost: x\r\n\
         Content-Length: 2\r\n\r\n{{}}"
    ))
    .await;
    let head = c.head().await;
    assert!(head.starts_with("http/1.1 200 ok\r\n"), "{head}");
    c.read_until("the retry frame", |b| find(b, b"retry: 3000\n\n").is_some())
        .await;
}

#[tokio::test]
async fn half_sent_stream_heads_are_closed_at_the_head_timeout() {
    let (_db, r) =
        TestDb::with_replica(ReplicaOpts::default().with("HEADER_READ_TIMEOUT_SECONDS", 1)).await;
    let schedule = r.create_schedule(2, 2, &[]).await;
    let mut slow = Vec::new();
    for _ in 0..50 {
        let mut c = Raw::connect(&r).await;
        c.send(&format!(
            "GET /api/schedules/{schedule}/seats/stream HTTP/1.1\r\nHost: x\r\nX-Slow: "
        ))
        .await;
        slow.push(c);
    }
    let started = Instant::now();
    for mut c in slow {
        let rest = c.until_closed().await;
        assert!(rest.is_empty(), "{rest}");
    }
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(5),
        "closed after {took:?}, timeout 1 s"
    );
    // A head that looks like a stream at first, turns out not to be one
    // and then stalls: closed at the same timeout, counted from the
    // connection's start (not started again when hyper takes it over).
    let connected = Instant::now();
    let mut c = Raw::connect(&r).await;
    c.send("GET /api/sched").await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    c.send("x HTTP/1.1\r\nHost: x\r\nX-Slow: ").await;
    let rest = c.until_closed().await;
    let diverted = connected.elapsed();
    assert!(rest.is_empty(), "{rest}");
    assert!(
        diverted < Duration::from_millis(1500),
        "closed after {diverted:?}, timeout 1 s from the connection's start"
    );
    // The replica still serves streams.
    let mut c = Raw::connect(&r).await;
    c.send(&stream_request(schedule, "HTTP/1.1")).await;
    assert!(c.head().await.starts_with("http/1.1 200 ok"));
    println!(
        "50 half-sent stream heads closed within {:.2} s (timeout 1 s); a half-sent other head after {:.2} s",
        took.as_secs_f64(),
        diverted.as_secs_f64()
    );
}

/// The chunks of a chunked body, as far as they are complete.
fn chunks(mut body: &[u8]) -> Vec<String> {
    let mut out = Vec::new();
    while let Some(line_end) = find(body, b"\r\n") {
        let Ok(size) = usize::from_str_radix(&String::from_utf8_lossy(&body[..line_end]), 16)
        else {
            break;
        };
        let start = line_end + 2;
        if body.len() < start + size + 2 {
            break;
        }
        out.push(String::from_utf8_lossy(&body[start..start + size]).into_owned());
        body = &body[start + size + 2..];
    }
    out
}

#[tokio::test]
async fn events_already_queued_go_out_together_in_order() {
    let (_db, r) = TestDb::with_replica(ReplicaOpts::default()).await;
    let schedule = r.create_schedule(7, 10, &[]).await;
    // 70 events: more than one write takes (64), so a full batch must be
    // followed by the rest without a new event to wake the stream.
    let users: [String; 70] = r.guests().await;
    let seat = |i: usize| ((i / 10) as i64 + 1, (i % 10) as i64 + 1);
    for (i, u) in users.iter().enumerate() {
        assert_eq!(r.hold(u, schedule, &[seat(i)]).await.status, 201);
    }
    // Resuming from 0: the 70 events are replayed at once.
    let mut c = Raw::connect(&r).await;
    c.send(&format!(
        "GET /api/schedules/{schedule}/seats/stream HTTP/1.1\r\nHost: x\r\nLast-Event-ID: 0\r\n\r\n"
    ))
    .await;
    c.head().await;
    c.read_until("70 events", |b| {
        chunks(b).concat().matches("\n\n").count() >= 71
    })
    .await;
    let got = chunks(&c.read);
    assert_eq!(got[0], "retry: 3000\n\n");
    let events: String = got[1..].concat();
    for (i, frame) in events.split_terminator("\n\n").enumerate() {
        let (row, col) = seat(i);
        assert_eq!(
            frame,
            format!(
                "id: {}\ndata: {{\"action\":\"OCCUPIED\",\"seats\":[{{\"row\":{row},\"col\":{col}}}]}}",
                i + 1
            )
        );
    }
    let per_chunk: Vec<usize> = got[1..].iter().map(|c| c.matches("\n\n").count()).collect();
    assert_eq!(
        per_chunk,
        [64, 6],
        "queued events share a write, 64 at most"
    );
}
