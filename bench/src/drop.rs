//! **drop**: a ticket drop. `--fans` fans, each with its own guest token
//! (fetched before the clock starts), go for a hall of `--seats` seats; each
//! clicks at a uniformly random instant of `--window-ms` (seeded), asking for
//! 1-4 adjacent seats of a random row, or with `--best-available` for a
//! `quantity` of 1-4. A fan whose start gets a 409 tries once more, at once:
//! picked seats aim at another block that looks free in its view (every hold
//! the bench has seen answered, as the page's live map shows them, plus the
//! seats its 409 named), down to single seats; best available asks for
//! `largestBlock` seats, or gives up at 0.
//!
//! Fans reach the replicas round-robin through `--connections` keep-alive
//! connections per replica (a load balancer's upstream pool): a fan waits for
//! a free connection, and its latency counts from its click, queueing
//! included. Each fan sends its own `X-Forwarded-For` address, as it would
//! arrive through a load balancer, so the per-address limit sees fans, not
//! the bench.
//!
//! Reported: time to sell out (click window start to the 201 that held the
//! last seat), answer latency from the click, answers by status and code,
//! 409s answered from the replicas' live maps, 5xx and transport errors, a
//! check that no seat was held twice and that the 201s are exactly the seat
//! map, and CPU per start.

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Args;
use futures::stream::{self, StreamExt, TryStreamExt};
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use serde_json::{json, Value};
use tokio::sync::mpsc;

use crate::cpu::{postgres_processes_ms, CpuProbe};
use crate::env::BenchEnv;
use crate::http::HttpConn;
use crate::report::{percentile, write_result};
use crate::{BoxError, Common, Result};

/// The service's default `MAX_SEATS_PER_BOOKING`.
const MAX_PARTY: u32 = 4;

#[derive(Debug, Clone, Args)]
pub(crate) struct DropArgs {
    #[command(flatten)]
    pub(crate) common: Common,
    /// Fans clicking.
    #[arg(long, default_value_t = 20_000, value_parser = clap::value_parser!(u64).range(1..=200_000))]
    pub(crate) fans: u64,
    /// Seats in the hall (at most 10,000: a grid of up to 100 x 100).
    #[arg(long, default_value_t = 1_000, value_parser = clap::value_parser!(u64).range(1..=10_000))]
    pub(crate) seats: u64,
    /// Every fan clicks at a uniformly random instant of this window.
    #[arg(long, default_value_t = 1_000, value_parser = clap::value_parser!(u64).range(1..=600_000))]
    pub(crate) window_ms: u64,
    /// Fans ask for a quantity (the server picks the seats) instead of picking seats.
    #[arg(long)]
    pub(crate) best_available: bool,
    /// Keep-alive HTTP connections per replica (a load balancer's upstream pool).
    #[arg(long, default_value_t = 128, value_parser = clap::value_parser!(u64).range(1..=4096))]
    pub(crate) connections: u64,
    /// Seed of the fans' clicks and choices.
    #[arg(long, default_value_t = 1)]
    pub(crate) seed: u64,
    /// Directory for the JSON result (`drop-<time>-<mode>-<fans>.json`).
    #[arg(long, default_value = "docs/bench", value_name = "DIR")]
    pub(crate) results_dir: PathBuf,
    /// Print only; write no JSON result.
    #[arg(long)]
    pub(crate) no_save: bool,
}

/// The grid for `seats` seats: rows of 40 (wider when 100 rows are not
/// enough), the unused end of the last row blocked.
#[derive(Debug, Clone, Copy)]
struct Hall {
    rows: i64,
    cols: i64,
    seats: i64,
}

impl Hall {
    fn new(seats: i64) -> Self {
        let cols = ((seats + 99) / 100).max(40).min(seats);
        let rows = (seats + cols - 1) / cols;
        Self { rows, cols, seats }
    }

    /// Seats of `row` that exist (the last row may be cut short).
    fn row_len(&self, row: i64) -> i64 {
        if row < self.rows {
            self.cols
        } else {
            self.seats - (self.rows - 1) * self.cols
        }
    }

    fn blocked(&self) -> Vec<Value> {
        (self.row_len(self.rows) + 1..=self.cols)
            .map(|c| json!({"row": self.rows, "col": c}))
            .collect()
    }

    fn index(&self, (row, col): (i64, i64)) -> usize {
        ((row - 1) * self.cols + (col - 1)) as usize
    }

    /// A random block of `k` adjacent seats in a random row that has room.
    fn random_block(&self, rng: &mut StdRng, k: i64) -> Vec<(i64, i64)> {
        loop {
            let row = rng.random_range(1..=self.rows);
            let len = self.row_len(row);
            if len >= k {
                let first = rng.random_range(1..=len - k + 1);
                return (first..first + k).map(|c| (row, c)).collect();
            }
        }
    }

    /// A block of `k` seats that are all free in `taken`: random tries first,
    /// then a scan from a random row; smaller blocks when none of `k` is left.
    fn free_block(&self, rng: &mut StdRng, taken: &[bool], k: i64) -> Option<Vec<(i64, i64)>> {
        let free = |b: &[(i64, i64)]| b.iter().all(|&s| !taken[self.index(s)]);
        for _ in 0..32 {
            let b = self.random_block(rng, k);
            if free(&b) {
                return Some(b);
            }
        }
        let start = rng.random_range(0..self.rows);
        for size in (1..=k).rev() {
            for i in 0..self.rows {
                let row = 1 + (start + i) % self.rows;
                for first in 1..=self.row_len(row) - size + 1 {
                    let b: Vec<_> = (first..first + size).map(|c| (row, c)).collect();
                    if free(&b) {
                        return Some(b);
                    }
                }
            }
        }
        None
    }
}

struct Fan {
    /// Click instant, from the start of the window.
    click: Duration,
    party: u32,
    /// The picked seats (empty with --best-available).
    seats: Vec<(i64, i64)>,
    replica: usize,
    address: String,
}

/// One answer to a start.
#[derive(Debug, Clone)]
struct Answer {
    /// 0: no HTTP answer (transport error or timeout).
    status: u16,
    code: String,
    from_memory: bool,
    /// From the start of the window.
    at: Duration,
    /// Held (201) or named as taken (409 seats_taken).
    seats: Vec<(i64, i64)>,
    largest_block: Option<i64>,
}

struct FanResult {
    click: Duration,
    answers: Vec<Answer>,
    gave_up: bool,
}

struct Ctx {
    fans: Vec<Fan>,
    tokens: Vec<String>,
    t0: Instant,
    schedule: i64,
    hall: Hall,
    best_available: bool,
    seed: u64,
    /// The fans' shared view of taken seats (see the module doc).
    view: Mutex<Vec<bool>>,
}

pub(crate) async fn drop_mode(
    args: &DropArgs,
    env: &BenchEnv,
    http: &reqwest::Client,
) -> Result<()> {
    let hall = Hall::new(args.seats as i64);
    let bases: Vec<String> = env.replicas.iter().map(|r| r.base.clone()).collect();
    let mode = if args.best_available {
        "best-available"
    } else {
        "picked"
    };
    let schedule = create_hall(http, &bases[0], &env.admin_token, hall).await?;

    // The plan is fixed by the seed before anything is measured.
    let mut rng = StdRng::seed_from_u64(args.seed);
    let window = Duration::from_millis(args.window_ms);
    let n = args.fans as usize;
    let mut fans: Vec<Fan> = (0..n)
        .map(|i| {
            let click = Duration::from_nanos(rng.random_range(0..window.as_nanos() as u64));
            let party = rng.random_range(1..=MAX_PARTY);
            let seats = if args.best_available {
                Vec::new()
            } else {
                hall.random_block(&mut rng, i64::from(party))
            };
            Fan {
                click,
                party,
                seats,
                replica: i % bases.len(),
                address: format!("10.{}.{}.{}", (i >> 16) & 255, (i >> 8) & 255, i & 255),
            }
        })
        .collect();
    fans.sort_by_key(|f| f.click);

    let t = Instant::now();
    let tokens = fan_tokens(http, &bases, &fans).await?;
    println!(
        "bench: drop: {} fans, {} seats ({}x{} grid), {} ms window, {mode}, {} connection(s) per replica; tokens in {:.1} s",
        n,
        hall.seats,
        hall.rows,
        hall.cols,
        args.window_ms,
        args.connections,
        t.elapsed().as_secs_f64()
    );
    // The schedule's layout is cached per replica on first use: a drop
    // starts on a page fans have open, so that is warm.
    for b in &bases {
        http.get(format!("{b}/api/schedules/{schedule}"))
            .send()
            .await?;
    }

    // Connections first, so the clock measures starts, not TCP handshakes.
    let mut queues = Vec::new();
    let mut workers = Vec::new();
    let ctx_slot: Arc<tokio::sync::OnceCell<Arc<Ctx>>> = Arc::new(tokio::sync::OnceCell::new());
    for r in &env.replicas {
        let (tx, rx) = mpsc::unbounded_channel::<usize>();
        let rx = Arc::new(tokio::sync::Mutex::new(rx));
        queues.push(tx);
        for _ in 0..args.connections {
            let mut conn = HttpConn::new(r.addr);
            let warm = format!("GET /healthz HTTP/1.1\r\nHost: {}\r\n\r\n", r.addr);
            conn.send(warm.as_bytes()).await?;
            workers.push(tokio::spawn(worker(
                conn,
                r.addr,
                rx.clone(),
                ctx_slot.clone(),
            )));
        }
    }

    let pg_before = postgres_processes_ms();
    let probe = CpuProbe::begin(env).await?;
    let t0 = Instant::now() + Duration::from_millis(100);
    let ctx = Arc::new(Ctx {
        fans,
        tokens,
        t0,
        schedule,
        hall,
        best_available: args.best_available,
        seed: args.seed,
        view: Mutex::new(vec![false; (hall.rows * hall.cols) as usize]),
    });
    let _ = ctx_slot.set(ctx.clone());
    for (i, fan) in ctx.fans.iter().enumerate() {
        tokio::time::sleep_until((t0 + fan.click).into()).await;
        queues[fan.replica]
            .send(i)
            .map_err(|_| "drop: workers gone")?;
    }
    drop(queues);
    let mut results: Vec<FanResult> = Vec::with_capacity(n);
    for w in workers {
        results.extend(w.await?);
    }
    let finished = t0.elapsed();
    let cpu = probe.finish().await;
    let pg_all_ms = postgres_processes_ms() - pg_before;

    let snapshot = seat_snapshot(http, &bases[0], schedule).await?;
    let report = summarize(args, &ctx, &results, &snapshot, finished);
    let starts: u64 = results.iter().map(|r| r.answers.len() as u64).sum();
    let per_start = |ms: f64| ms / starts.max(1) as f64;
    println!(
        "cpu              per start: bench database backends {:.3} ms, all postgres processes {:.3} ms \
         (approximate: the server is shared), replicas {:.3} ms, this process {:.3} ms; machine {:.0}% busy",
        per_start(cpu.postgres_ms),
        per_start(pg_all_ms),
        per_start(cpu.replica_ms),
        per_start(cpu.load_ms),
        cpu.machine_busy * 100.0
    );
    let mut result = report.json;
    result["cpu"] = json!({
        "starts": starts,
        "benchDatabaseBackendsMsPerStart": per_start(cpu.postgres_ms),
        "allPostgresProcessesMsPerStart": per_start(pg_all_ms),
        "replicasMsPerStart": per_start(cpu.replica_ms),
        "loadGeneratorMsPerStart": per_start(cpu.load_ms),
        "machineBusy": cpu.machine_busy,
        "cores": crate::cpu::num_cpus(),
        "note": "one shared machine: PostgreSQL, replicas and this load generator on the same cores, \
                 other users' processes included in machineBusy and allPostgresProcesses",
    });
    result["command"] = json!(std::env::args().collect::<Vec<_>>().join(" "));
    if !args.no_save {
        let name = format!(
            "drop-{}-{mode}-{}.json",
            chrono::Utc::now().format("%Y%m%dT%H%M%SZ"),
            args.fans
        );
        let path = write_result(&args.results_dir, &name, &result)?;
        println!("bench: result written to {}", path.display());
    }
    if !report.problems.is_empty() {
        return Err(report.problems.join("; ").into());
    }
    Ok(())
}

async fn create_hall(
    http: &reqwest::Client,
    base: &str,
    admin_token: &str,
    hall: Hall,
) -> Result<i64> {
    let resp = http
        .post(format!("{base}/api/schedules"))
        .bearer_auth(admin_token)
        .json(&json!({
            "title": "bench drop",
            "startsAt": "2030-01-01T19:30:00Z",
            "rows": hall.rows,
            "cols": hall.cols,
            "blocked": hall.blocked(),
        }))
        .send()
        .await?;
    let status = resp.status().as_u16();
    let body: Value = resp.json().await?;
    match (status, body["id"].as_i64()) {
        (201, Some(id)) => Ok(id),
        _ => Err(format!("POST /api/schedules answered {status}: {body}").into()),
    }
}

/// A guest token per fan, each asked for from the fan's own address.
async fn fan_tokens(http: &reqwest::Client, bases: &[String], fans: &[Fan]) -> Result<Vec<String>> {
    stream::iter(fans.iter().enumerate())
        .map(|(i, fan)| {
            let url = format!("{}/api/auth/guest", bases[i % bases.len()]);
            async move {
                let resp = http
                    .post(url)
                    .header("X-Forwarded-For", &fan.address)
                    .send()
                    .await?;
                let status = resp.status().as_u16();
                let body: Value = resp.json().await?;
                match (status, body["token"].as_str()) {
                    (201, Some(t)) => Ok::<_, BoxError>(t.to_owned()),
                    _ => Err(format!("POST /api/auth/guest answered {status}: {body}").into()),
                }
            }
        })
        .buffered(64)
        .try_collect()
        .await
}

async fn seat_snapshot(
    http: &reqwest::Client,
    base: &str,
    schedule: i64,
) -> Result<HashSet<(i64, i64)>> {
    let body: Value = http
        .get(format!("{base}/api/schedules/{schedule}/seat-status"))
        .send()
        .await?
        .json()
        .await?;
    Ok(seats_of(&body["seats"]).into_iter().collect())
}

fn seats_of(v: &Value) -> Vec<(i64, i64)> {
    v.as_array()
        .into_iter()
        .flatten()
        .filter_map(|s| Some((s["row"].as_i64()?, s["col"].as_i64()?)))
        .collect()
}

fn start_body(ctx: &Ctx, seats: &[(i64, i64)], quantity: u32) -> String {
    if ctx.best_available {
        format!(r#"{{"scheduleId":{},"quantity":{quantity}}}"#, ctx.schedule)
    } else {
        let seats: Vec<String> = seats
            .iter()
            .map(|(r, c)| format!(r#"{{"row":{r},"col":{c}}}"#))
            .collect();
        format!(
            r#"{{"scheduleId":{},"seats":[{}]}}"#,
            ctx.schedule,
            seats.join(",")
        )
    }
}

async fn worker(
    mut conn: HttpConn,
    addr: SocketAddr,
    jobs: Arc<tokio::sync::Mutex<mpsc::UnboundedReceiver<usize>>>,
    ctx: Arc<tokio::sync::OnceCell<Arc<Ctx>>>,
) -> Vec<FanResult> {
    let mut out = Vec::new();
    loop {
        let next = jobs.lock().await.recv().await;
        let Some(i) = next else {
            return out;
        };
        let Some(ctx) = ctx.get() else {
            return out;
        };
        out.push(fan_turn(ctx, &mut conn, addr, i).await);
    }
}

async fn fan_turn(ctx: &Ctx, conn: &mut HttpConn, addr: SocketAddr, i: usize) -> FanResult {
    let fan = &ctx.fans[i];
    let mut rng = StdRng::seed_from_u64(ctx.seed ^ (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15));
    let mut seats = fan.seats.clone();
    let mut quantity = fan.party;
    let mut result = FanResult {
        click: fan.click,
        answers: Vec::with_capacity(2),
        gave_up: false,
    };
    for attempt in 0..2 {
        let body = start_body(ctx, &seats, quantity);
        let req = format!(
            "POST /api/bookings/start HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {}\r\n\
             X-Forwarded-For: {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            ctx.tokens[i],
            fan.address,
            body.len()
        );
        let res = conn.send_full(req.as_bytes()).await;
        let at = ctx.t0.elapsed();
        let answer = match res {
            Ok(r) => {
                let v: Value = serde_json::from_slice(&r.body).unwrap_or(Value::Null);
                Answer {
                    status: r.status,
                    code: v["code"].as_str().unwrap_or("").to_owned(),
                    from_memory: r.from_memory,
                    at,
                    seats: seats_of(&v["seats"]),
                    largest_block: v["largestBlock"].as_i64(),
                }
            }
            Err(e) => Answer {
                status: 0,
                code: format!("io {:?}", e.kind()),
                from_memory: false,
                at,
                seats: Vec::new(),
                largest_block: None,
            },
        };
        // What the fan's page would show: holds as they happen, and the
        // seats a 409 named.
        if answer.status == 201 || answer.code == "seats_taken" {
            let mut view = ctx.view.lock().unwrap_or_else(|p| p.into_inner());
            for &s in &answer.seats {
                if s.0 >= 1 && s.0 <= ctx.hall.rows && s.1 >= 1 && s.1 <= ctx.hall.cols {
                    let k = ctx.hall.index(s);
                    view[k] = true;
                }
            }
        }
        let retry = match (answer.status, answer.code.as_str()) {
            _ if attempt == 1 => None,
            (409, "seats_taken") => {
                let view = ctx.view.lock().unwrap_or_else(|p| p.into_inner());
                ctx.hall
                    .free_block(&mut rng, &view, i64::from(fan.party))
                    .map(|b| (b, fan.party))
            }
            (409, "no_seats_together") => match answer.largest_block {
                Some(l) if l > 0 => Some((Vec::new(), l.min(i64::from(MAX_PARTY)) as u32)),
                _ => None,
            },
            _ => None,
        };
        let conflicted = answer.status == 409;
        result.answers.push(answer);
        match retry {
            Some((s, q)) => {
                seats = s;
                quantity = q;
            }
            None => {
                result.gave_up = conflicted && attempt == 0;
                break;
            }
        }
    }
    result
}

struct Summary {
    json: Value,
    problems: Vec<String>,
}

fn summarize(
    args: &DropArgs,
    ctx: &Ctx,
    results: &[FanResult],
    snapshot: &HashSet<(i64, i64)>,
    finished: Duration,
) -> Summary {
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let mut problems = Vec::new();
    let mut by_code: BTreeMap<String, [u64; 2]> = BTreeMap::new();
    let (mut answers, mut created, mut from_memory, mut seats_taken) = (0u64, 0u64, 0u64, 0u64);
    let (mut server_errors, mut transport_errors, mut gave_up) = (0u64, 0u64, 0u64);
    let mut first_us = Vec::with_capacity(results.len());
    let mut final_us = Vec::with_capacity(results.len());
    let mut holds: Vec<(Duration, usize)> = Vec::new();
    let mut held: HashSet<(i64, i64)> = HashSet::new();
    let mut double = 0u64;
    for r in results {
        gave_up += u64::from(r.gave_up);
        for (attempt, a) in r.answers.iter().enumerate() {
            answers += 1;
            let key = match a.status {
                0 => a.code.clone(),
                s if a.code.is_empty() => s.to_string(),
                s => format!("{s} {}", a.code),
            };
            by_code.entry(key).or_default()[attempt.min(1)] += 1;
            match a.status {
                0 => transport_errors += 1,
                201 => {
                    created += 1;
                    holds.push((a.at, a.seats.len()));
                    for &s in &a.seats {
                        if !held.insert(s) {
                            double += 1;
                        }
                    }
                }
                s if s >= 500 => server_errors += 1,
                _ => {}
            }
            if a.code == "seats_taken" {
                seats_taken += 1;
                from_memory += u64::from(a.from_memory);
            }
        }
        let us = |a: &Answer| a.at.saturating_sub(r.click).as_micros() as u64;
        if let (Some(first), Some(last)) = (r.answers.first(), r.answers.last()) {
            first_us.push(us(first));
            final_us.push(us(last));
        }
    }
    first_us.sort_unstable();
    final_us.sort_unstable();
    holds.sort();
    let mut sum = 0usize;
    let sold_out_at = holds.iter().find_map(|&(at, n)| {
        sum += n;
        (sum as i64 >= ctx.hall.seats).then_some(at)
    });
    let last_hold = holds.last().map(|h| h.0);
    let agree = held == *snapshot;
    if double > 0 {
        problems.push(format!("{double} seats held twice"));
    }
    if !agree {
        problems.push(format!(
            "the 201s hold {} seats, the seat map shows {} ({} only in the 201s, {} only in the map)",
            held.len(),
            snapshot.len(),
            held.difference(snapshot).count(),
            snapshot.difference(&held).count()
        ));
    }
    if server_errors > 0 || transport_errors > 0 {
        problems.push(format!(
            "{server_errors} 5xx answers, {transport_errors} transport errors"
        ));
    }
    let pct = |v: &[u64]| {
        let q = |p: f64| percentile(v, p) as f64 / 1000.0;
        json!({"p50": q(0.50), "p90": q(0.90), "p99": q(0.99), "max": q(1.0)})
    };
    let show = |v: &Value| {
        format!(
            "p50 {:.0} ms, p90 {:.0} ms, p99 {:.0} ms, max {:.0} ms",
            v["p50"].as_f64().unwrap_or(0.0),
            v["p90"].as_f64().unwrap_or(0.0),
            v["p99"].as_f64().unwrap_or(0.0),
            v["max"].as_f64().unwrap_or(0.0)
        )
    };
    let first = pct(&first_us);
    let last = pct(&final_us);
    let mode = if ctx.best_available {
        "best-available"
    } else {
        "picked"
    };
    let offered = args.fans as f64 / (args.window_ms as f64 / 1000.0);

    println!();
    match sold_out_at {
        Some(t) => println!(
            "sold out         {:.2} s after the window opened ({} seats, {} holds); window {} ms, all answered after {:.2} s",
            t.as_secs_f64(),
            ctx.hall.seats,
            created,
            args.window_ms,
            finished.as_secs_f64()
        ),
        None => println!(
            "NOT sold out     {} of {} seats held, last hold {:.2} s after the window opened; all answered after {:.2} s",
            held.len(),
            ctx.hall.seats,
            last_hold.map_or(0.0, |t| t.as_secs_f64()),
            finished.as_secs_f64()
        ),
    }
    println!(
        "first answer     {} (from the click, queueing included)",
        show(&first)
    );
    println!(
        "last answer      {} (a fan's answer after its retry, if any)",
        show(&last)
    );
    let codes: Vec<String> = by_code
        .iter()
        .map(|(k, [a, b])| format!("{k}: {a} + {b}"))
        .collect();
    println!(
        "answers          {answers} ({} first + retry): {}",
        mode,
        codes.join(", ")
    );
    println!(
        "                 201s {:.1}% of answers; {from_memory} of {seats_taken} seats_taken answered from memory; \
         {gave_up} fans gave up after a 409; {server_errors} 5xx, {transport_errors} transport errors",
        100.0 * created as f64 / answers.max(1) as f64
    );
    println!(
        "seats            {} held by {created} 201s, {double} held twice; seat map {} seats: {}",
        held.len(),
        snapshot.len(),
        if agree {
            "equal to the 201s"
        } else {
            "DIFFERS"
        }
    );
    println!(
        "bench: drop {} fans/{} seats/{} ms {mode}: sold out {}, first answer p50 {:.0} ms p99 {:.0} ms max {:.0} ms",
        args.fans,
        ctx.hall.seats,
        args.window_ms,
        sold_out_at.map_or("never".to_owned(), |t| format!("{:.2} s", t.as_secs_f64())),
        first["p50"].as_f64().unwrap_or(0.0),
        first["p99"].as_f64().unwrap_or(0.0),
        first["max"].as_f64().unwrap_or(0.0),
    );

    let json = json!({
        "scenario": "drop",
        "mode": mode,
        "fans": args.fans,
        "seats": ctx.hall.seats,
        "grid": {"rows": ctx.hall.rows, "cols": ctx.hall.cols},
        "windowMs": args.window_ms,
        "offeredFansPerSecond": offered,
        "replicas": ctx.fans.iter().map(|f| f.replica).max().map_or(0, |m| m + 1),
        "connectionsPerReplica": args.connections,
        "seed": args.seed,
        "at": chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        "loadAverageBefore": std::fs::read_to_string("/proc/loadavg").unwrap_or_default().trim(),
        "soldOutSeconds": sold_out_at.map(|t| t.as_secs_f64()),
        "lastHoldSeconds": last_hold.map(|t| t.as_secs_f64()),
        "allAnsweredSeconds": finished.as_secs_f64(),
        "seatsHeld": held.len(),
        "firstAnswerFromClickMs": first,
        "lastAnswerFromClickMs": last,
        "answers": answers,
        "answersByCode": by_code.iter().map(|(k, [a, b])| (k.clone(), json!({"first": a, "retry": b}))).collect::<serde_json::Map<_, _>>(),
        "share201": created as f64 / answers.max(1) as f64,
        "seatsTakenFromMemory": from_memory,
        "seatsTaken": seats_taken,
        "gaveUp": gave_up,
        "serverErrors": server_errors,
        "transportErrors": transport_errors,
        "seatsHeldTwice": double,
        "snapshotEqualsHolds": agree,
        "firstAnswerMsAvg": ms(Duration::from_micros(first_us.iter().sum::<u64>() / first_us.len().max(1) as u64)),
    });
    Summary { json, problems }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hall_has_exactly_its_seats() {
        for seats in [1, 7, 40, 41, 1000, 4001, 10_000] {
            let h = Hall::new(seats);
            assert!(h.rows <= 100 && h.cols <= 100, "{h:?}");
            let total: i64 = (1..=h.rows).map(|r| h.row_len(r)).sum();
            assert_eq!(total, seats, "{h:?}");
            assert_eq!(h.blocked().len() as i64, h.rows * h.cols - seats);
        }
    }

    #[test]
    fn free_blocks_avoid_taken_seats_and_shrink_when_needed() {
        let h = Hall::new(8); // one row of 8
        let mut rng = StdRng::seed_from_u64(7);
        let mut taken = vec![true; 8];
        assert_eq!(h.free_block(&mut rng, &taken, 2), None);
        taken[5] = false;
        assert_eq!(h.free_block(&mut rng, &taken, 3), Some(vec![(1, 6)]));
        taken[6] = false;
        assert_eq!(
            h.free_block(&mut rng, &taken, 4),
            Some(vec![(1, 6), (1, 7)])
        );
    }
}
