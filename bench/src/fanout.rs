//! **fanout** (`sse`): opens `--clients` streams (raw HTTP/1.1 over tokio
//! TCP, a minimal chunked + SSE parser), waits until every one has its
//! `retry:` line (subscribed), then makes `--holds` holds at `--rate` per
//! second and measures, for every client and event, the time from the hold's
//! `201` to the event's arrival; checks every client got every event exactly
//! once, in order, and reports the replicas' RSS before and after the clients
//! connect.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, Semaphore};
use tokio_util::sync::CancellationToken;

use crate::cpu::proc_user_sys_ms;
use crate::env::{create_schedules, guest_tokens, pg_connect, BenchEnv};
use crate::hold::{start_request, PAIRS_PER_ROW};
use crate::http::{find, read_head, Dechunker, HttpConn};
use crate::replicas::vm_rss_kib;
use crate::report::{percentile, percentile_i};
use crate::{FanoutArgs, Result};

/// A minimal `text/event-stream` parser: ids, `event: resync`, `retry:`.
#[derive(Default)]
pub(crate) struct SseParser {
    pub(crate) line: Vec<u8>,
    pub(crate) id: Option<u64>,
    pub(crate) has_data: bool,
    pub(crate) resync: bool,
}

pub(crate) enum SseItem {
    Retry,
    Event { id: Option<u64>, resync: bool },
}

impl SseParser {
    pub(crate) fn feed(&mut self, bytes: &[u8], mut emit: impl FnMut(SseItem)) {
        for &b in bytes {
            if b != b'\n' {
                self.line.push(b);
                continue;
            }
            if self.line.last() == Some(&b'\r') {
                self.line.pop();
            }
            if self.line.is_empty() {
                if self.has_data || self.id.is_some() || self.resync {
                    emit(SseItem::Event {
                        id: self.id.take(),
                        resync: std::mem::take(&mut self.resync),
                    });
                }
                self.has_data = false;
            } else if self.line[0] != b':' {
                let (field, value) = match find(&self.line, b":") {
                    Some(i) => {
                        let v = &self.line[i + 1..];
                        (&self.line[..i], v.strip_prefix(b" ").unwrap_or(v))
                    }
                    None => (&self.line[..], &b""[..]),
                };
                match field {
                    b"id" => {
                        self.id = std::str::from_utf8(value).ok().and_then(|v| v.parse().ok());
                    }
                    b"data" => self.has_data = true,
                    b"event" => self.resync = value == b"resync",
                    b"retry" => emit(SseItem::Retry),
                    _ => {}
                }
            }
            self.line.clear();
        }
    }
}

#[derive(Default)]
pub(crate) struct ClientLog {
    /// (event id, arrival).
    pub(crate) events: Vec<(u64, Instant)>,
    pub(crate) resyncs: u32,
    /// Reads that brought at least one event: events per such read shows
    /// how often the server merged events into one write.
    pub(crate) event_reads: u64,
    /// Saw `retry:`: from here on every event must arrive.
    pub(crate) subscribed: bool,
    /// The stream ended (or failed) before we stopped it.
    pub(crate) ended: Option<String>,
}

#[allow(clippy::too_many_arguments)]
pub(crate) async fn sse_client(
    addr: SocketAddr,
    request: Arc<Vec<u8>>,
    gate: Arc<Semaphore>,
    ready: mpsc::UnboundedSender<Result<(), String>>,
    stop: CancellationToken,
    received: Arc<AtomicU64>,
    expect_events: usize,
) -> ClientLog {
    let mut log = ClientLog {
        events: Vec::with_capacity(expect_events),
        ..ClientLog::default()
    };
    let mut ready = Some(ready);
    let result = async {
        let mut permit = Some(gate.acquire_owned().await.map_err(|e| e.to_string())?);
        let mut stream = tokio::time::timeout(Duration::from_secs(10), TcpStream::connect(addr))
            .await
            .map_err(|_| "connect timed out".to_string())?
            .map_err(|e| format!("connect: {e}"))?;
        stream.set_nodelay(true).map_err(|e| e.to_string())?;
        stream
            .write_all(&request)
            .await
            .map_err(|e| format!("write: {e}"))?;
        let mut buf = Vec::with_capacity(1024);
        let head = tokio::time::timeout(Duration::from_secs(10), read_head(&mut stream, &mut buf))
            .await
            .map_err(|_| "no response head within 10 s".to_string())?
            .map_err(|e| format!("head: {e}"))?;
        if head.status != 200 {
            return Err(format!("HTTP {}", head.status));
        }
        let mut dechunk = head.chunked.then(Dechunker::default);
        let mut parser = SseParser::default();
        let mut body = Vec::with_capacity(512);
        let mut chunk = vec![0u8; 2048];
        let mut first = std::mem::take(&mut buf);
        // One registration with the token for the whole stream: a new one
        // per read takes the token's lock, shared by every client, per
        // event, and the load generator would compete with the replicas.
        let stopped = stop.cancelled();
        tokio::pin!(stopped);
        loop {
            let now = Instant::now();
            body.clear();
            let input: &[u8] = &first;
            match &mut dechunk {
                Some(d) => d.feed(input, &mut body).map_err(|e| e.to_string())?,
                None => body.extend_from_slice(input),
            }
            let events_before = log.events.len();
            parser.feed(&body, |item| match item {
                SseItem::Retry => {
                    log.subscribed = true;
                    if let Some(tx) = ready.take() {
                        let _ = tx.send(Ok(()));
                        permit = None;
                    }
                }
                SseItem::Event { resync: true, .. } => log.resyncs += 1,
                SseItem::Event { id: Some(id), .. } => {
                    log.events.push((id, now));
                    received.fetch_add(1, Ordering::Relaxed);
                }
                SseItem::Event { id: None, .. } => {}
            });
            if log.events.len() > events_before {
                log.event_reads += 1;
            }
            if dechunk.as_ref().is_some_and(Dechunker::done) {
                return Err("stream ended".to_string());
            }
            let n = tokio::select! {
                _ = &mut stopped => return Ok(()),
                n = stream.read(&mut chunk) => n.map_err(|e| format!("read: {e}"))?,
            };
            if n == 0 {
                return Err("stream closed by the server".to_string());
            }
            first.clear();
            first.extend_from_slice(&chunk[..n]);
        }
    }
    .await;
    if let Err(e) = result {
        log.ended = Some(e.clone());
        if let Some(tx) = ready.take() {
            let _ = tx.send(Err(e));
        }
    }
    log
}

pub(crate) async fn sse_mode(
    args: &FanoutArgs,
    env: &BenchEnv,
    http: &reqwest::Client,
) -> Result<()> {
    let bases: Vec<String> = env.replicas.iter().map(|r| r.base.clone()).collect();
    let holds = args.holds as usize;
    let n_clients = args.clients as usize;
    let schedule = create_schedules(http, &bases[0], &env.admin_token, 1).await?[0];
    let tokens = guest_tokens(http, &bases, holds).await?;
    // Warm the schedule cache and the pool of every replica, so the first
    // stream or hold does not pay for it.
    for b in &bases {
        http.get(format!("{b}/api/schedules/{schedule}/seat-status"))
            .send()
            .await?;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_before: Vec<u64> = env.replicas.iter().map(|r| vm_rss_kib(r.pid)).collect();

    println!(
        "bench: sse: opening {n_clients} streams on schedule {schedule} ({} at a time)",
        args.connect_parallelism
    );
    let gate = Arc::new(Semaphore::new(args.connect_parallelism as usize));
    let stop = CancellationToken::new();
    let received = Arc::new(AtomicU64::new(0));
    let (ready_tx, mut ready_rx) = mpsc::unbounded_channel();
    let t_connect = Instant::now();
    let mut clients = Vec::with_capacity(n_clients);
    for i in 0..n_clients {
        let addr = env.replicas[i % env.replicas.len()].addr;
        let request = Arc::new(
            format!(
                "GET /api/schedules/{schedule}/seats/stream HTTP/1.1\r\nHost: {addr}\r\n\
                 Accept: text/event-stream\r\n\r\n"
            )
            .into_bytes(),
        );
        clients.push(tokio::spawn(sse_client(
            addr,
            request,
            gate.clone(),
            ready_tx.clone(),
            stop.clone(),
            received.clone(),
            holds,
        )));
    }
    drop(ready_tx);
    let mut subscribed = 0usize;
    let mut failures: HashMap<String, usize> = HashMap::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    while subscribed + failures.values().sum::<usize>() < n_clients {
        match tokio::time::timeout_at(deadline, ready_rx.recv()).await {
            Ok(Some(Ok(()))) => subscribed += 1,
            Ok(Some(Err(e))) => *failures.entry(e).or_default() += 1,
            Ok(None) => break,
            Err(_) => {
                stop.cancel();
                return Err(format!(
                    "only {subscribed} of {n_clients} streams subscribed within 120 s"
                )
                .into());
            }
        }
    }
    let connect_time = t_connect.elapsed();
    println!(
        "bench: sse: {subscribed} streams subscribed in {:.2} s, {} failed {:?}",
        connect_time.as_secs_f64(),
        failures.values().sum::<usize>(),
        failures
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss_connected: Vec<u64> = env.replicas.iter().map(|r| vm_rss_kib(r.pid)).collect();

    // Holds at a steady rate; each reports when its 201 arrived. The
    // replicas' CPU from here until every event is delivered is charged to
    // the deliveries: the holds themselves cost well under 1% of it.
    let cpu_before: Vec<(f64, f64)> = env
        .replicas
        .iter()
        .map(|r| proc_user_sys_ms(r.pid as i32))
        .collect();
    // The load generator's own share, for reading the latencies: its
    // clients compete with the replicas for the same cores.
    let own_before = proc_user_sys_ms(std::process::id() as i32);
    println!("bench: sse: {holds} holds at {}/s", args.rate);
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / args.rate as f64));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let tokens = Arc::new(tokens);
    let mut hold_tasks = Vec::with_capacity(holds);
    for k in 0..holds {
        tick.tick().await;
        let addr = env.replicas[k % env.replicas.len()].addr;
        let tokens = tokens.clone();
        hold_tasks.push(tokio::spawn(async move {
            let mut conn = HttpConn::new(addr);
            let req = start_request(&addr, &tokens[k], schedule, k as i64);
            let sent = Instant::now();
            let res = conn.send(&req).await;
            (res, sent, Instant::now())
        }));
    }
    let mut created: Vec<Option<Instant>> = vec![None; holds];
    let mut hold_latency = Vec::with_capacity(holds);
    let mut hold_errors = Vec::new();
    for (k, t) in hold_tasks.into_iter().enumerate() {
        match t.await? {
            (Ok((201, _)), sent, done) => {
                created[k] = Some(done);
                hold_latency.push((done - sent).as_micros() as u64);
            }
            (Ok((status, body)), _, _) => {
                hold_errors.push(format!("HTTP {status}: {}", String::from_utf8_lossy(&body)))
            }
            (Err(e), _, _) => hold_errors.push(format!("io: {e}")),
        }
    }
    let ok_holds = created.iter().filter(|c| c.is_some()).count();
    let target = (subscribed * ok_holds) as u64;
    let wait_from = Instant::now();
    while received.load(Ordering::Relaxed) < target && wait_from.elapsed() < Duration::from_secs(15)
    {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let cpu_ms: Vec<(f64, f64)> = env
        .replicas
        .iter()
        .zip(&cpu_before)
        .map(|(r, before)| {
            let (user, sys) = proc_user_sys_ms(r.pid as i32);
            (user - before.0, sys - before.1)
        })
        .collect();
    let own = {
        let (user, sys) = proc_user_sys_ms(std::process::id() as i32);
        (user - own_before.0, sys - own_before.1)
    };
    let rss_after: Vec<u64> = env.replicas.iter().map(|r| vm_rss_kib(r.pid)).collect();
    stop.cancel();
    let mut logs = Vec::with_capacity(n_clients);
    for c in clients {
        logs.push(c.await?);
    }

    // The truth: the schedule's event log (event id -> the hold it came from).
    let db = pg_connect(&env.db_url).await?;
    let rows = db
        .query(
            "SELECT event_id, seats FROM seat_events WHERE schedule_id = $1 ORDER BY event_id",
            &[&schedule],
        )
        .await?;
    let mut hold_of_event: HashMap<u64, usize> = HashMap::new();
    for row in &rows {
        let id: i64 = row.get(0);
        let seats: Value = row.get(1);
        let seat = seats
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|s| Some((s["row"].as_i64()?, s["col"].as_i64()?)))
            .min()
            .ok_or("an event without seats")?;
        let k = ((seat.0 - 1) * PAIRS_PER_ROW + (seat.1 - 1) / 2) as usize;
        hold_of_event.insert(id as u64, k);
    }

    let mut latencies: Vec<i64> = Vec::with_capacity(subscribed * ok_holds);
    let (mut missed, mut duplicated, mut unexpected, mut out_of_order, mut resyncs) =
        (0u64, 0u64, 0u64, 0u64, 0u64);
    let mut early = 0u64;
    let mut ended: HashMap<String, usize> = HashMap::new();
    let mut live_clients = 0usize;
    let event_reads: u64 = logs.iter().map(|l| l.event_reads).sum();
    for log in &logs {
        resyncs += log.resyncs as u64;
        if let Some(e) = &log.ended {
            *ended.entry(e.clone()).or_default() += 1;
        }
        if !log.subscribed {
            continue; // counted as a failure above
        }
        live_clients += 1;
        let mut seen: HashMap<u64, u32> = HashMap::with_capacity(log.events.len());
        let mut last = 0u64;
        for &(id, at) in &log.events {
            if id <= last {
                out_of_order += 1;
            }
            last = last.max(id);
            let count = seen.entry(id).or_default();
            *count += 1;
            if *count > 1 {
                duplicated += 1;
                continue;
            }
            match hold_of_event
                .get(&id)
                .and_then(|&k| created.get(k).copied().flatten())
            {
                Some(t201) => {
                    let d = at.duration_since(t201).as_micros() as i64;
                    if at < t201 {
                        early += 1;
                    }
                    latencies.push(d);
                }
                None => unexpected += 1,
            }
        }
        missed += hold_of_event
            .keys()
            .filter(|id| !seen.contains_key(id))
            .count() as u64;
    }
    latencies.sort_unstable();
    let ms = |us: i64| us as f64 / 1000.0;
    let mut hl = hold_latency.clone();
    hl.sort_unstable();

    println!();
    println!(
        "streams          {subscribed}/{n_clients} subscribed in {:.2} s ({} replica(s)); failures {:?}; ended early {:?}",
        connect_time.as_secs_f64(),
        env.replicas.len(),
        failures,
        ended
    );
    println!(
        "holds            {ok_holds}/{holds} ok at {}/s (start p50 {:.2} ms, p99 {:.2} ms); errors {}{}",
        args.rate,
        percentile(&hl, 0.5) as f64 / 1000.0,
        percentile(&hl, 0.99) as f64 / 1000.0,
        hold_errors.len(),
        hold_errors.first().map(|e| format!(" e.g. {e}")).unwrap_or_default()
    );
    println!(
        "events           {} in the log; delivered {} of {} client-event pairs to {live_clients} streams",
        hold_of_event.len(),
        latencies.len(),
        live_clients * hold_of_event.len()
    );
    println!(
        "delivery latency p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms (201 -> arrival; {early} arrived before their 201)",
        ms(percentile_i(&latencies, 0.5)),
        ms(percentile_i(&latencies, 0.99)),
        ms(latencies.last().copied().unwrap_or(0))
    );
    println!(
        "correctness      missed {missed}, duplicated {duplicated}, out of order {out_of_order}, unknown {unexpected}, resync {resyncs}"
    );
    for (i, r) in env.replicas.iter().enumerate() {
        let per_conn = |after: u64| {
            let clients_here = n_clients.div_ceil(env.replicas.len()).max(1);
            (after as f64 - rss_before[i] as f64) / clients_here as f64
        };
        println!(
            "replica {i} RSS    {} KiB before, {} KiB with streams ({:.1} KiB/stream), {} KiB after events ({:.1} KiB/stream) [pid {}]",
            rss_before[i],
            rss_connected[i],
            per_conn(rss_connected[i]),
            rss_after[i],
            per_conn(rss_after[i]),
            r.pid
        );
    }
    let user_ms: f64 = cpu_ms.iter().map(|c| c.0).sum();
    let sys_ms: f64 = cpu_ms.iter().map(|c| c.1).sum();
    let deliveries = latencies.len().max(1) as f64;
    let us_per_delivery = (user_ms + sys_ms) * 1000.0 / deliveries;
    println!(
        "replica CPU      {:.0} ms for {} deliveries ({:?} ms per replica): {us_per_delivery:.2} µs per delivered event ({:.2} user, {:.2} kernel)",
        user_ms + sys_ms,
        latencies.len(),
        cpu_ms.iter().map(|c| (c.0 + c.1).round() as i64).collect::<Vec<_>>(),
        user_ms * 1000.0 / deliveries,
        sys_ms * 1000.0 / deliveries,
    );
    println!(
        "load generator   {:.0} ms CPU over the same time: {:.2} µs per delivered event ({:.2} user, {:.2} kernel); \
         {event_reads} reads brought events ({:.2} events per read)",
        own.0 + own.1,
        (own.0 + own.1) * 1000.0 / deliveries,
        own.0 * 1000.0 / deliveries,
        own.1 * 1000.0 / deliveries,
        deliveries / event_reads.max(1) as f64,
    );
    let total_before: u64 = rss_before.iter().sum();
    let total_after: u64 = rss_connected.iter().sum();
    let kib_per_stream = (total_after as f64 - total_before as f64) / subscribed.max(1) as f64;
    println!(
        "bench: sse {subscribed} streams, {ok_holds} events, delivery p50 {:.2} ms p99 {:.2} ms max {:.2} ms, missed {missed}, duplicated {duplicated}, {kib_per_stream:.1} KiB/stream, {us_per_delivery:.2} µs CPU/delivery",
        ms(percentile_i(&latencies, 0.5)),
        ms(percentile_i(&latencies, 0.99)),
        ms(latencies.last().copied().unwrap_or(0)),
    );
    let failed_streams = failures.values().sum::<usize>();
    if missed > 0
        || duplicated > 0
        || unexpected > 0
        || out_of_order > 0
        || failed_streams > 0
        || !hold_errors.is_empty()
    {
        return Err(
            "sse run found missed/duplicated events, failed streams or failed holds".into(),
        );
    }
    Ok(())
}
