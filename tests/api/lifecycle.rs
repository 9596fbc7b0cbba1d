//! The life of a stream: resources freed when clients go, the connection
//! cap, graceful shutdown with hand-over to another replica, and clients
//! that stop reading.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use futures::StreamExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::mpsc;

use crate::helpers::*;

async fn wait_metric(r: &Replica, name: &str, want: f64, timeout: Duration) -> Duration {
    let t = Instant::now();
    wait_for(&format!("{name} == {want}"), timeout, || async {
        (r.metric(name).await == want).then_some(())
    })
    .await;
    t.elapsed()
}

#[tokio::test]
async fn closed_clients_free_their_stream_and_channel() {
    let (_db, r) = TestDb::with_replica(ReplicaOpts::default().with("HEARTBEAT_SECONDS", 1)).await;
    let s1 = r.create_schedule(10, 20, &[]).await;
    let s2 = r.create_schedule(10, 20, &[]).await;
    let base = r.metric("seatsync_sse_connections").await;
    assert_eq!(r.metric("seatsync_sse_channels").await, 0.0);

    let a1 = r.subscribe(s1, None).await;
    let a2 = r.subscribe(s1, Some("0")).await;
    let b1 = r.subscribe(s2, None).await;
    // A raw client that vanishes without a word (RST, no FIN).
    let raw = raw_stream(&r, s2, false).await;
    wait_metric(
        &r,
        "seatsync_sse_connections",
        base + 4.0,
        Duration::from_secs(5),
    )
    .await;
    assert_eq!(r.metric("seatsync_sse_channels").await, 2.0);

    // Closing both of s1's clients drops its channel, not s2's.
    a1.close();
    drop(a2);
    let t1 = wait_metric(
        &r,
        "seatsync_sse_connections",
        base + 2.0,
        Duration::from_secs(5),
    )
    .await;
    wait_metric(&r, "seatsync_sse_channels", 1.0, Duration::from_secs(5)).await;

    b1.close();
    raw.set_zero_linger().unwrap();
    drop(raw);
    let t2 = wait_metric(&r, "seatsync_sse_connections", base, Duration::from_secs(5)).await;
    wait_metric(&r, "seatsync_sse_channels", 0.0, Duration::from_secs(5)).await;
    println!("closed streams released after {t1:?} and {t2:?}");

    // And the replica still streams afterwards.
    let mut again = r.subscribe(s1, None).await;
    let mut changes = ChangeScript::new();
    changes.step(&r, s1).await;
    assert!(matches!(
        again.next_event(Duration::from_secs(5)).await,
        Some(SseFrame::Event { id: 1, .. })
    ));
}

#[tokio::test]
async fn connection_cap_refuses_with_503_and_retry_after_then_admits_again() {
    let (_db, r) = TestDb::with_replica(
        ReplicaOpts::default()
            .with("SSE_MAX_CONNECTIONS", 2)
            .with("HEARTBEAT_SECONDS", 1),
    )
    .await;
    let s1 = r.create_schedule(10, 20, &[]).await;
    let s2 = r.create_schedule(10, 20, &[]).await;
    let first = r.subscribe(s1, None).await;
    let mut second = r.subscribe(s2, None).await;

    for (schedule, header) in [(s1, None), (s2, Some("0")), (s1, Some("x"))] {
        let headers: Vec<(&str, &str)> = header.map(|h| ("Last-Event-ID", h)).into_iter().collect();
        let resp = r
            .request(
                reqwest::Method::GET,
                &stream_path(schedule),
                None,
                None,
                &headers,
            )
            .await;
        resp.assert_problem(503, "too_many_streams");
        let retry_after = resp
            .headers
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        assert!(
            retry_after.is_some(),
            "503 without a numeric Retry-After: {:?}",
            resp.headers
        );
    }
    // Refusals hold no slot, and other endpoints are not capped.
    assert_eq!(r.metric("seatsync_sse_connections").await, 2.0);
    assert_eq!(r.get("/api/schedules", None).await.status, 200);
    // An unknown schedule (404, or 503 at the cap: either error may win)
    // takes no slot either.
    let resp = r.get(&stream_path(999_999), None).await;
    assert!(resp.status == 404 || resp.status == 503, "{}", resp.status);
    assert_eq!(r.metric("seatsync_sse_connections").await, 2.0);

    first.close();
    let freed = wait_metric(&r, "seatsync_sse_connections", 1.0, Duration::from_secs(5)).await;
    let mut third = r.subscribe(s1, None).await;
    println!("slot freed {freed:?} after the client left");
    let resp = r.get(&stream_path(s2), None).await;
    resp.assert_problem(503, "too_many_streams");

    // Both admitted streams work.
    ChangeScript::new().step(&r, s1).await;
    ChangeScript::new().step(&r, s2).await;
    for sse in [&mut third, &mut second] {
        assert!(matches!(
            sse.next_event(Duration::from_secs(5)).await,
            Some(SseFrame::Event { id: 1, .. })
        ));
    }
}

/// How a stream read with reqwest ended.
#[derive(Debug, PartialEq)]
enum End {
    /// The server finished the body (the terminating chunk arrived).
    Clean,
    /// The connection broke mid-body.
    Broken(String),
}

/// A reqwest-read stream that reports frames and how it ended.
async fn tracked_stream(
    r: &Replica,
    schedule: i64,
    last_event_id: Option<&str>,
) -> (
    mpsc::UnboundedReceiver<SseFrame>,
    tokio::task::JoinHandle<End>,
) {
    let mut req = reqwest::Client::new().get(r.url(&stream_path(schedule)));
    if let Some(id) = last_event_id {
        req = req.header("Last-Event-ID", id);
    }
    let resp = req.send().await.expect("stream");
    assert_eq!(resp.status(), 200);
    let (tx, rx) = mpsc::unbounded_channel();
    let task = tokio::spawn(async move {
        let mut body = resp.bytes_stream();
        let mut buf = String::new();
        loop {
            match body.next().await {
                None => return End::Clean,
                Some(Err(e)) => return End::Broken(format!("{e:?}")),
                Some(Ok(chunk)) => {
                    buf.push_str(&String::from_utf8_lossy(&chunk));
                    for f in take_frames(&mut buf) {
                        let _ = tx.send(f);
                    }
                }
            }
        }
    });
    (rx, task)
}

#[tokio::test]
async fn sigterm_ends_streams_cleanly_and_clients_resume_elsewhere_missing_nothing() {
    let opts = ReplicaOpts::default().with("HEARTBEAT_SECONDS", 1);
    let (db, mut a, b) = TestDb::with_two_replicas(opts).await;
    let schedule = a.create_schedule(10, 20, &[]).await;
    let mut changes = ChangeScript::new();
    let mut client = SeatMapClient::snapshot_then_stream("client", &a, &a, schedule).await;
    let mut live_first = SeatMapClient::stream_then_snapshot("live first", &b, &a, schedule).await;
    let (mut tracked, tracked_end) = tracked_stream(&a, schedule, None).await;
    for _ in 0..4 {
        changes.step(&b, schedule).await;
    }
    client.catch_up(4, Duration::from_secs(5), None).await;
    live_first.catch_up(4, Duration::from_secs(5), None).await;
    assert_eq!(a.metric("seatsync_sse_connections").await, 3.0);

    // Changes keep coming through B during the shutdown and the switch.
    let writer = {
        let b = &b;
        async move {
            for _ in 0..8 {
                changes.step(b, schedule).await;
            }
            changes
        }
    };
    let readyz = a.url("/readyz");
    let observe = async {
        let t = Instant::now();
        let ended = apply_until_end(&mut client, Duration::from_secs(9)).await;
        let ended_after = t.elapsed();
        let live_first_ended = apply_until_end(&mut live_first, Duration::from_secs(9)).await;
        // Shutdown began (the streams ended): readiness must not say 200,
        // whether the replica still answers (503) or no longer accepts.
        let ready = reqwest::Client::new()
            .get(&readyz)
            .timeout(Duration::from_secs(2))
            .send()
            .await
            .map(|r| r.status().as_u16());
        (ended, ended_after, live_first_ended, ready)
    };
    let t = Instant::now();
    let (status, (ended, ended_after, live_first_ended, ready), mut changes) =
        tokio::join!(a.terminate(Duration::from_secs(10)), observe, writer);
    let exit_after = t.elapsed();
    assert!(ended, "the stream did not end after SIGTERM");
    assert!(live_first_ended);
    assert_eq!(
        tracked_end.await.unwrap(),
        End::Clean,
        "streams end cleanly"
    );
    while let Ok(f) = tracked.try_recv() {
        assert_ne!(f, SseFrame::Resync);
    }
    assert!(
        !matches!(ready, Ok(200)),
        "/readyz said 200 after shutdown began: {ready:?}"
    );
    assert!(status.success(), "exit status {status:?}");
    assert!(exit_after < Duration::from_secs(10));
    println!(
        "SIGTERM: streams ended after {ended_after:?}, exit 0 after {exit_after:?}, /readyz then: {ready:?}"
    );

    // EventSource reconnects to the other replica with its Last-Event-ID.
    client.reconnect(&b).await;
    live_first.reconnect(&b).await;
    for _ in 0..2 {
        changes.step(&b, schedule).await;
    }
    let (last, truth) = b.snapshot(schedule).await;
    assert_eq!(last, 14);
    for c in [&mut client, &mut live_first] {
        c.catch_up(last, Duration::from_secs(5), None).await;
        assert_eq!(c.map, truth, "{} diverged", c.name);
        assert_eq!(c.sse.next_event(Duration::from_millis(200)).await, None);
    }
    db.assert_consistent().await;
}

/// Applies frames until the stream ends; false if it is still open at the
/// deadline.
async fn apply_until_end(c: &mut SeatMapClient, timeout: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match c.sse.next(left).await {
            Some(f) => c.apply_frame(f, None).await,
            None => return tokio::time::Instant::now() < deadline,
        }
    }
}

/// Opens a seat stream on a raw socket and reads the response head
/// (asserting 200); reads nothing more by itself. `small` gives the socket a
/// small receive buffer and a small MSS, like a client on a thin link: the
/// server sizes its send buffer by the peer's MSS, so it fills after some
/// 100 KB instead of 4 MB on loopback.
async fn raw_stream(r: &Replica, schedule: i64, small: bool) -> TcpStream {
    let addr: SocketAddr = r
        .base
        .strip_prefix("http://")
        .expect("http base")
        .parse()
        .expect("socket address");
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    if small {
        socket.set_recv_buffer_size(4096).unwrap();
        socket.set_tcp_mss(1000).unwrap();
    }
    socket.set_nonblocking(true).unwrap();
    let socket = TcpSocket::from_std_stream(socket.into());
    let mut s = socket.connect(addr).await.expect("connect");
    s.write_all(
        format!(
            "GET {} HTTP/1.1\r\nHost: {addr}\r\nAccept: text/event-stream\r\n\r\n",
            stream_path(schedule)
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    // Byte by byte, so nothing after the head is consumed.
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut byte = [0u8; 1];
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut byte))
            .await
            .expect("response head")
            .expect("read");
        assert_eq!(n, 1, "closed before the head ended");
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head);
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains("transfer-encoding: chunked"),
        "{head}"
    );
    s
}

/// De-chunks a raw HTTP/1.1 chunked body: the payload so far, and whether
/// the terminating chunk has arrived.
fn dechunk(raw: &[u8]) -> (Vec<u8>, bool) {
    let mut body = Vec::new();
    let mut rest = raw;
    while let Some(nl) = rest.windows(2).position(|w| w == b"\r\n") {
        let size_line = std::str::from_utf8(&rest[..nl]).unwrap();
        let size = usize::from_str_radix(size_line.split(';').next().unwrap().trim(), 16)
            .unwrap_or_else(|_| panic!("bad chunk size {size_line:?}"));
        if size == 0 {
            return (body, rest[nl + 2..].starts_with(b"\r\n"));
        }
        if rest.len() < nl + 2 + size + 2 {
            break; // the rest of the chunk has not arrived
        }
        body.extend_from_slice(&rest[nl + 2..nl + 2 + size]);
        rest = &rest[nl + 2 + size + 2..];
    }
    (body, false)
}

/// Reads a raw chunked SSE body until it ends. Returns the frames and
/// whether it ended cleanly (the terminating chunk) rather than broken off.
async fn read_raw_to_end(s: &mut TcpStream, timeout: Duration) -> (Vec<SseFrame>, bool) {
    let mut raw = Vec::new();
    let deadline = tokio::time::Instant::now() + timeout;
    let mut buf = vec![0u8; 64 * 1024];
    let (body, clean) = loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match tokio::time::timeout(left, s.read(&mut buf)).await {
            Err(_) => panic!(
                "raw stream did not end within {timeout:?} ({} bytes)",
                raw.len()
            ),
            Ok(Ok(0)) | Ok(Err(_)) => break (dechunk(&raw).0, false),
            Ok(Ok(n)) => {
                raw.extend_from_slice(&buf[..n]);
                // The connection stays open (keep-alive) after a clean end.
                if let (body, true) = dechunk(&raw) {
                    break (body, true);
                }
            }
        }
    };
    let mut text = String::from_utf8_lossy(&body).into_owned();
    (take_frames(&mut text), clean)
}

/// Whether the kernel has an ESTABLISHED server-side socket from
/// `server_port` to `client_port` (Linux /proc/net/tcp).
fn established(server_port: u16, client_port: u16) -> bool {
    let text = std::fs::read_to_string("/proc/net/tcp").unwrap_or_default();
    let port = |addr: &str| {
        addr.rsplit(':')
            .next()
            .and_then(|p| u16::from_str_radix(p, 16).ok())
    };
    text.lines().skip(1).any(|line| {
        let cols: Vec<&str> = line.split_whitespace().collect();
        cols.len() > 3
            && port(cols[1]) == Some(server_port)
            && port(cols[2]) == Some(client_port)
            && cols[3] == "01"
    })
}

/// Holds and releases one whole half of the grid per step: two events of
/// 50 seats each (about 1 KB per frame), so socket buffers fill quickly.
async fn big_step(r: &Replica, token: &str, schedule: i64, half: i64) {
    let seats: Vec<(i64, i64)> = (1..=5)
        .flat_map(|row| (1..=10).map(move |col| (row + 5 * half, col)))
        .collect();
    let resp = r.hold(token, schedule, &seats).await;
    assert_eq!(r.cancel(token, &resp.booking_id()).await.status, 200);
}

#[tokio::test]
async fn clients_that_stop_reading_are_cut_off_without_hurting_others() {
    let db = TestDb::create().await;
    let common = ReplicaOpts::default()
        .with("HEARTBEAT_SECONDS", 1)
        .with("MAX_SEATS_PER_BOOKING", 100);
    // A drops a connection whose data stays unacknowledged for 2 s; B keeps
    // the default (30 s) but lets a subscriber fall only 64 events behind.
    let (a, b) = tokio::join!(
        Replica::spawn(&db, common.clone().with("CLIENT_WRITE_TIMEOUT_SECONDS", 2)),
        Replica::spawn(&db, common.with("SSE_CLIENT_BUFFER", 64))
    );
    let schedule = a.create_schedule(10, 10, &[]).await;
    let mut normal_a = SeatMapClient::snapshot_then_stream("normal on A", &a, &a, schedule).await;
    let mut normal_b = SeatMapClient::snapshot_then_stream("normal on B", &b, &b, schedule).await;
    // Never reads after the head.
    let stuck = raw_stream(&a, schedule, true).await;
    // Stops reading now, resumes later.
    let mut paused = raw_stream(&b, schedule, true).await;
    assert_eq!(a.metric("seatsync_sse_connections").await, 2.0);
    assert_eq!(b.metric("seatsync_sse_connections").await, 2.0);
    let server_port = a.base.rsplit(':').next().unwrap().parse::<u16>().unwrap();
    let client_port = stuck.local_addr().unwrap().port();
    assert!(established(server_port, client_port));

    let tokens = [a.guest().await, b.guest().await];
    let started = Instant::now();
    let mut worst = Duration::ZERO;
    let mut steps = 0;
    // Thousands of events until A has dropped the stuck client; the normal
    // clients must keep up all along.
    let dropped_after = loop {
        if a.metric("seatsync_sse_connections").await == 1.0 {
            break started.elapsed();
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "the client that stopped reading was never disconnected ({steps} steps)"
        );
        tokio::join!(
            big_step(&a, &tokens[0], schedule, 0),
            big_step(&b, &tokens[1], schedule, 1)
        );
        steps += 1;
        // From the round's last commit to both normal clients having it.
        let t = Instant::now();
        let (last, _) = a.snapshot(schedule).await;
        normal_a.catch_up(last, Duration::from_secs(2), None).await;
        normal_b.catch_up(last, Duration::from_secs(2), None).await;
        worst = worst.max(t.elapsed());
    };
    assert!(
        worst < Duration::from_secs(1),
        "normal clients fell behind by {worst:?}"
    );
    // More events while the paused client still does not read: its stream
    // on B falls more than 64 behind.
    for _ in 0..30 {
        tokio::join!(
            big_step(&a, &tokens[0], schedule, 0),
            big_step(&b, &tokens[1], schedule, 1)
        );
    }
    let (last, truth) = a.snapshot(schedule).await;
    for c in [&mut normal_a, &mut normal_b] {
        c.catch_up(last, Duration::from_secs(2), None).await;
        assert_eq!(c.map, truth);
        assert_eq!(c.resyncs, 0);
    }
    println!(
        "slow clients: {steps} rounds ({} events) until the stuck client was dropped after \
         {dropped_after:?}; normal clients at most {worst:?} behind; {last} events in all",
        steps * 4
    );

    // The stuck client's connection is gone on the server side, not just
    // its stream.
    assert!(
        !established(server_port, client_port),
        "the server still holds the stuck connection"
    );
    drop(stuck);

    // The paused client resumes: it gets a dense prefix, then the stream
    // ends cleanly (cut off, never skipping), and it resumes from there.
    let (frames, clean) = read_raw_to_end(&mut paused, Duration::from_secs(10)).await;
    assert!(clean, "the lagging client's stream must end cleanly");
    let ids: Vec<i64> = frames
        .iter()
        .filter_map(|f| match f {
            SseFrame::Event { id, .. } => Some(*id),
            SseFrame::Resync => panic!("resync instead of a cut-off"),
            _ => None,
        })
        .collect();
    assert!(!ids.is_empty());
    assert_eq!(
        ids,
        (1..=ids.len() as i64).collect::<Vec<_>>(),
        "dense from 1"
    );
    let got = *ids.last().unwrap();
    assert!(
        got < last,
        "the paused client was not cut off ({got} of {last})"
    );
    assert!(b.metric("seatsync_sse_lagged_total").await >= 1.0);
    wait_metric(&b, "seatsync_sse_connections", 1.0, Duration::from_secs(5)).await;
    // Resuming from the cut replays exactly the rest.
    let mut from_cut = b.subscribe(schedule, Some(&got.to_string())).await;
    let replayed = from_cut.frames_until(last, Duration::from_secs(10)).await;
    let replayed_ids: Vec<i64> = replayed
        .iter()
        .map(|f| match f {
            SseFrame::Event { id, .. } => *id,
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(replayed_ids, (got + 1..=last).collect::<Vec<_>>());
    println!("paused client: cut off at event {got} of {last}, resumed by replay");
    db.assert_consistent().await;
}

/// Reads a raw chunked stream until it has carried the event `last`;
/// returns the ids of every event, in the order they came.
async fn read_raw_until(s: &mut TcpStream, last: i64, timeout: Duration) -> Vec<i64> {
    let mut raw = Vec::new();
    let deadline = tokio::time::Instant::now() + timeout;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let (body, ended) = dechunk(&raw);
        assert!(!ended, "the stream ended");
        let mut text = String::from_utf8_lossy(&body).into_owned();
        let ids: Vec<i64> = take_frames(&mut text)
            .into_iter()
            .filter_map(|f| match f {
                SseFrame::Event { id, .. } => Some(id),
                SseFrame::Resync => panic!("resync"),
                _ => None,
            })
            .collect();
        if ids.last() == Some(&last) {
            return ids;
        }
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match tokio::time::timeout(left, s.read(&mut buf)).await {
            Err(_) => panic!("event {last} did not arrive within {timeout:?}; got {ids:?}"),
            Ok(Ok(0)) | Ok(Err(_)) => panic!("the stream broke off; got {ids:?}"),
            Ok(Ok(n)) => raw.extend_from_slice(&buf[..n]),
        }
    }
}

/// The sum of a labelled counter's series whose labels contain `label`.
async fn metric_with(r: &Replica, name: &str, label: &str) -> f64 {
    r.metrics_text()
        .await
        .lines()
        .filter(|l| l.split(['{', ' ']).next() == Some(name) && l.contains(label))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .fold(0.0, |a, b| a + b)
}

#[tokio::test]
async fn caught_up_streams_are_written_by_the_schedules_writer() {
    let db = TestDb::create().await;
    let r = Replica::spawn(&db, ReplicaOpts::default()).await;
    let schedule = r.create_schedule(10, 10, &[]).await;
    let mut raw: Vec<TcpStream> = Vec::new();
    for _ in 0..3 {
        raw.push(raw_stream(&r, schedule, false).await);
    }
    for col in 1..=10 {
        let token = r.guest().await;
        r.hold(&token, schedule, &[(1, col)]).await;
    }
    let (last, _) = r.snapshot(schedule).await;
    assert_eq!(last, 10);
    for s in &mut raw {
        let ids = read_raw_until(s, last, Duration::from_secs(5)).await;
        assert_eq!(ids, (1..=last).collect::<Vec<_>>());
    }
    // Each stream went direct once and was never handed back: the writer,
    // not the streams' own tasks, wrote all 30 deliveries.
    let handoffs = r.metric("seatsync_sse_direct_handoffs_total").await;
    let handbacks = r.metric("seatsync_sse_direct_handbacks_total").await;
    println!(
        "direct: {handoffs} hand-offs, {} hand-backs for 3 streams x {last} events",
        handbacks as i64
    );
    assert_eq!(handoffs, 3.0);
    assert_eq!(handbacks, 0.0);
    assert_eq!(r.metric("seatsync_sse_direct_streams").await, 3.0);
    // A stream that ends leaves the writer at once.
    drop(raw.pop());
    wait_metric(
        &r,
        "seatsync_sse_direct_streams",
        2.0,
        Duration::from_secs(5),
    )
    .await;
    wait_metric(&r, "seatsync_sse_connections", 2.0, Duration::from_secs(5)).await;
}

#[tokio::test]
async fn a_direct_stream_whose_socket_fills_gets_every_event_once_in_order() {
    let db = TestDb::create().await;
    // A channel long enough that the paused client is never cut off: this
    // is about the hand-back, not the lag.
    let r = Replica::spawn(
        &db,
        ReplicaOpts::default()
            .with("MAX_SEATS_PER_BOOKING", 100)
            .with("SSE_CLIENT_BUFFER", 100_000),
    )
    .await;
    let schedule = r.create_schedule(10, 10, &[]).await;
    let mut paused = raw_stream(&r, schedule, true).await;
    let mut reading = raw_stream(&r, schedule, false).await;
    let token = r.guest().await;
    // Events of about 1 KB until the paused client's socket has filled:
    // the writer wrote part of a write, or nothing, and handed back.
    let started = Instant::now();
    let mut steps = 0;
    while r.metric("seatsync_sse_direct_handbacks_total").await == 0.0 {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the paused client's socket never filled ({steps} steps)"
        );
        big_step(&r, &token, schedule, 0).await;
        steps += 1;
    }
    // A few more while it stays full, then it reads again.
    for _ in 0..20 {
        big_step(&r, &token, schedule, 0).await;
    }
    let (last, _) = r.snapshot(schedule).await;
    let all: Vec<i64> = (1..=last).collect();
    assert_eq!(
        read_raw_until(&mut reading, last, Duration::from_secs(10)).await,
        all
    );
    assert_eq!(
        read_raw_until(&mut paused, last, Duration::from_secs(10)).await,
        all,
        "every event once, in order"
    );
    // Caught up, both streams are the writer's again.
    wait_metric(
        &r,
        "seatsync_sse_direct_streams",
        2.0,
        Duration::from_secs(5),
    )
    .await;
    println!(
        "full socket: {steps} steps to fill it, {last} events; hand-offs {}, hand-backs {} \
         ({} partial write, {} socket full)",
        r.metric("seatsync_sse_direct_handoffs_total").await,
        r.metric("seatsync_sse_direct_handbacks_total").await,
        metric_with(&r, "seatsync_sse_direct_handbacks_total", "partial_write").await,
        metric_with(&r, "seatsync_sse_direct_handbacks_total", "socket_full").await
    );
    // Only the paused client's socket filled.
    let slow = metric_with(&r, "seatsync_sse_direct_handbacks_total", "partial_write").await
        + metric_with(&r, "seatsync_sse_direct_handbacks_total", "socket_full").await;
    assert_eq!(slow, r.metric("seatsync_sse_direct_handbacks_total").await);
    assert_eq!(r.metric("seatsync_sse_lagged_total").await, 0.0);
    db.assert_consistent().await;
}
