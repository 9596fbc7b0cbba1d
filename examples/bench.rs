//! Benchmarks a seatsync build against its own database.
//!
//! ```sh
//! cargo build --release
//! # the hold transaction through the service vs. the same transaction through pgbench
//! cargo run --release --example bench -- --seconds 10 --concurrency 32
//! # SSE fan-out: delivery latency, missed/duplicated events, memory per stream
//! cargo run --release --example bench -- --mode sse --clients 10000
//! ```
//!
//! Every run creates a database `seatsync_bench_<random>` next to
//! `--database-url`, starts `--replicas` release replicas on it (loopback
//! only), and drops the database and stops the replicas at the end, also on
//! error and on Ctrl-C/SIGTERM. (A run killed with SIGKILL leaves its
//! database behind: `DROP DATABASE seatsync_bench_... WITH (FORCE)`.)
//!
//! **hold** (default): `--concurrency` workers each send `POST
//! /api/bookings/start` of two seats nobody else asks for, one request at a
//! time, for `--warmup` + `--seconds` seconds (only the latter is measured),
//! so every start succeeds and the run measures the hold transaction itself.
//! Positions come from one counter over enough fresh 100x100 schedules (5,000
//! two-seat holds each); 5,000 guest users are reused once per schedule (one
//! pending hold per user and schedule, so every start is the user's first on
//! that schedule). Then `deploy/bench/hold.pgbench` runs the same statements
//! with pgbench (`-n -c C -j 2 -T S`) on fresh schedules of the same database,
//! while the replicas keep running (their listener receives the NOTIFYs in
//! both runs). `--rounds N` repeats the pair, alternating which side goes
//! first, and reports means.
//!
//! So that both sides see the same database, and one that behaves like a
//! production one:
//! - before the runs the database gets a past (`--prefill`, default: 120
//!   sold-out schedules) and is analyzed: on empty tables the planner
//!   estimates a new schedule's seat rows at ~0 and reads every held seat of
//!   the schedule on each hold;
//! - ANALYZE runs before every run: it refreshes statistics and invalidates
//!   the plans the replicas' pooled connections cached earlier (a plan made
//!   while `schedules` was two pages seq-scans it once the counter updates
//!   have bloated it);
//! - each run is checked in the tables (one booking, two seat rows, one event
//!   per success), then its holds are marked CONFIRMED, so the next run does
//!   not start with thousands of pending holds;
//! - the replicas sweep once a minute (`SWEEP_INTERVAL_MS=60000`; nothing
//!   expires during a run, and a sweep scans all pending holds); sweeps that
//!   do run show up as `sweeper` in the backend profile.
//!
//! Reported per run: throughput, latency percentiles, errors (any non-201),
//! CPU per transaction of the load generator (this process, or pgbench), the
//! replica process(es) and the PostgreSQL backends of the bench database,
//! and what those backends were doing (sampled `pg_stat_activity`: CPU, lock
//! waits, idle in transaction waiting for the client, ...).
//!
//! **sse**: opens `--clients` streams (raw HTTP/1.1 over tokio TCP, a minimal
//! chunked + SSE parser), waits until every one has its `retry:` line
//! (subscribed), then makes `--holds` holds at `--rate` per second and
//! measures, for every client and event, the time from the hold's `201` to
//! the event's arrival; checks every client got every event exactly once, in
//! order, and reports the replicas' RSS before and after the clients connect.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{ExitCode, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Parser, ValueEnum};
use futures::stream::{self, StreamExt, TryStreamExt};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};
use tokio::sync::{mpsc, Semaphore};
use tokio_util::sync::CancellationToken;

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type Result<T, E = BoxError> = std::result::Result<T, E>;

const ROWS: i64 = 100;
const COLS: i64 = 100;
const PAIRS_PER_ROW: i64 = COLS / 2;
/// Two-seat holds that fit in one schedule.
const PAIRS: i64 = ROWS * PAIRS_PER_ROW;
/// Long enough that no hold expires (and no sweeper work starts) during a run.
const HOLD_SECONDS: u32 = 900;
const REQUEST_TIMEOUT: Duration = Duration::from_secs(15);
const MAX_HEAD_BYTES: usize = 64 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Mode {
    /// Hold throughput and latency: service vs. pgbench running the same transaction.
    Hold,
    /// SSE fan-out: delivery latency, missed/duplicated events, memory per stream.
    Sse,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Prefill {
    None,
    Young,
    Mature,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Protocol {
    Simple,
    Extended,
    Prepared,
}

impl Protocol {
    fn as_str(self) -> &'static str {
        match self {
            Protocol::Simple => "simple",
            Protocol::Extended => "extended",
            Protocol::Prepared => "prepared",
        }
    }
}

#[derive(Debug, Parser)]
#[command(
    name = "bench",
    about = "Benchmarks seatsync: hold throughput vs. pgbench, and SSE fan-out"
)]
struct Args {
    #[arg(long, value_enum, default_value_t = Mode::Hold)]
    mode: Mode,
    /// Server to create the bench database on (any database of it; trust or password in the URL).
    #[arg(
        long,
        default_value = "postgres://postgres@127.0.0.1:5432/postgres",
        value_name = "URL"
    )]
    database_url: String,
    /// The seatsync binary [default: `seatsync` next to this example's
    /// directory, i.e. <target-dir>/release/seatsync].
    #[arg(long, value_name = "PATH")]
    binary: Option<PathBuf>,
    /// Replica processes (hold workers and SSE clients are spread over them).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=8))]
    replicas: u64,
    /// Extra environment for the replicas, e.g. DB_POOL_SIZE=32 or
    /// TOKIO_WORKER_THREADS=4 (repeatable).
    #[arg(long = "replica-env", value_name = "KEY=VALUE", value_parser = parse_key_value)]
    replica_env: Vec<(String, String)>,
    /// Leave the bench database behind (for inspection); it is printed at the end.
    #[arg(long)]
    keep_database: bool,
    /// [hold] Measured seconds of each run.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=600))]
    seconds: u64,
    /// [hold] Unmeasured seconds before the service run (connections, prepared statements).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(0..=60))]
    warmup: u64,
    /// [hold] Concurrent workers (service) and pgbench clients.
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u64).range(1..=1024))]
    concurrency: u64,
    /// [hold] pgbench clients, if not --concurrency.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=1024))]
    pgbench_clients: Option<u64>,
    /// [hold] Highest throughput to size the grid for (schedules are created for
    /// max-rate x duration holds of each run; a run stops early if it runs out).
    #[arg(long, default_value_t = 5000, value_parser = clap::value_parser!(u64).range(10..=100_000))]
    max_rate: u64,
    /// [hold] pgbench executable.
    #[arg(
        long,
        default_value = "/usr/lib/postgresql/15/bin/pgbench",
        value_name = "PATH"
    )]
    pgbench: PathBuf,
    /// [hold] pgbench script [default: deploy/bench/hold.pgbench of this crate].
    #[arg(long, value_name = "PATH")]
    pgbench_script: Option<PathBuf>,
    /// [hold] pgbench query protocol (-M). The service uses prepared statements;
    /// `simple` is pgbench's default.
    #[arg(long, value_enum, default_value_t = Protocol::Simple)]
    pgbench_protocol: Protocol,
    /// [hold] Rounds of (service run, pgbench run), alternating which goes
    /// first; the final line reports the means.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=20))]
    rounds: u64,
    /// [hold] Database state before the runs (then ANALYZE). `mature`: 120
    /// past sold-out schedules of 100 seats, so the planner estimates a new
    /// schedule's seats from the average. `young`: one past schedule of 10,000
    /// seats, so it estimates a new schedule at ~0 rows (the plan a young
    /// deployment gets). `none`: empty, never-analyzed tables.
    #[arg(long, value_enum, default_value_t = Prefill::Mature)]
    prefill: Prefill,
    /// [hold] Only the service run.
    #[arg(long)]
    skip_pgbench: bool,
    /// [hold] Only the pgbench run (e.g. to try variants with --pgbench-script).
    #[arg(long)]
    skip_service: bool,
    /// [sse] Streams to open.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..=20_000))]
    clients: u64,
    /// [sse] Holds to make while the streams are open (one event each).
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u64).range(1..=5000))]
    holds: u64,
    /// [sse] Holds per second.
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u64).range(1..=1000))]
    rate: u64,
    /// [sse] Streams being opened at once.
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u64).range(1..=4096))]
    connect_parallelism: u64,
}

fn parse_key_value(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_owned(), v.to_owned())),
        _ => Err(format!("expected KEY=VALUE, got {s:?}")),
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    // Streams need a descriptor each, here and in the replicas (which
    // inherit this limit), so raise it before anything is spawned.
    let need = args.clients + 1024;
    let nofile = raise_nofile_limit(need);
    if args.mode == Mode::Sse && nofile < need {
        eprintln!(
            "bench: warning: open-files limit is {nofile}, below the {need} needed for {} streams",
            args.clients
        );
    }

    let mut env = BenchEnv::new(&args.database_url);
    env.keep = args.keep_database;
    let outcome = tokio::select! {
        r = run(&args, &mut env) => r,
        _ = shutdown_signal() => Err("interrupted".into()),
    };
    env.teardown().await;
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench: error: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term => {}
    }
}

async fn run(args: &Args, env: &mut BenchEnv) -> Result<()> {
    let binary = match &args.binary {
        Some(b) => b.clone(),
        None => default_binary(),
    };
    if !binary.is_file() {
        return Err(format!(
            "no seatsync binary at {} (run `cargo build --release` or pass --binary)",
            binary.display()
        )
        .into());
    }
    if args.mode == Mode::Hold && !args.skip_pgbench {
        let script = pgbench_script(args);
        for (what, path) in [("pgbench", &args.pgbench), ("pgbench script", &script)] {
            if !path.is_file() {
                return Err(format!("no {what} at {} (see --help)", path.display()).into());
            }
        }
    }
    env.create_database().await?;
    // Our defaults first: the caller's --replica-env entries come later and
    // win (a later `Command::env` overrides an earlier one).
    let mut extra_env = vec![("HOLD_SECONDS".to_owned(), HOLD_SECONDS.to_string())];
    if args.mode == Mode::Hold {
        // Nothing expires during a run, and a sweep scans every pending hold
        // (see the module doc). --replica-env SWEEP_INTERVAL_MS=500 restores it.
        extra_env.push(("SWEEP_INTERVAL_MS".to_owned(), "60000".to_owned()));
    }
    extra_env.extend(args.replica_env.iter().cloned());
    for i in 0..args.replicas as usize {
        let r = spawn_replica(&binary, env, &extra_env, i).await?;
        env.replicas.push(r);
    }
    let http = reqwest::Client::builder()
        .timeout(REQUEST_TIMEOUT)
        .build()?;
    for r in &env.replicas {
        wait_ready(&http, &r.base).await?;
    }
    println!(
        "bench: database {}, {} replica(s) of {} at {}",
        env.db_name,
        env.replicas.len(),
        binary.display(),
        env.replicas
            .iter()
            .map(|r| r.addr.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    );
    match args.mode {
        Mode::Hold => hold_mode(args, env, &http).await,
        Mode::Sse => sse_mode(args, env, &http).await,
    }
}

/// `<dir of this executable>/../seatsync`: the release binary of the same
/// target directory when run with `cargo run --release --example bench`.
fn default_binary() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent()?.parent().map(|d| d.join("seatsync")))
        .filter(|p| p.is_file())
        .unwrap_or_else(|| PathBuf::from("target/release/seatsync"))
}

// ---------------------------------------------------------------------------
// Database and replica processes

struct BenchEnv {
    admin_url: String,
    db_name: String,
    db_url: String,
    created: bool,
    keep: bool,
    replicas: Vec<Replica>,
    secret: String,
    admin_token: String,
}

struct Replica {
    child: Child,
    pid: u32,
    addr: SocketAddr,
    base: String,
}

impl BenchEnv {
    fn new(admin_url: &str) -> Self {
        let tag = uuid::Uuid::new_v4().simple().to_string();
        Self {
            admin_url: admin_url.to_owned(),
            db_name: format!("seatsync_bench_{}", &tag[..12]),
            db_url: String::new(),
            created: false,
            keep: false,
            replicas: Vec::new(),
            secret: format!("bench-secret-{tag}"),
            admin_token: format!("bench-admin-{tag}"),
        }
    }

    async fn create_database(&mut self) -> Result<()> {
        let mut url = reqwest::Url::parse(&self.admin_url)
            .map_err(|e| format!("--database-url {:?}: {e}", self.admin_url))?;
        url.set_path(&format!("/{}", self.db_name));
        self.db_url = url.to_string();
        let admin = pg_connect(&self.admin_url).await?;
        admin
            .batch_execute(&format!("CREATE DATABASE {}", self.db_name))
            .await
            .map_err(|e| format!("cannot create the bench database: {}", pg_error(&e)))?;
        self.created = true;
        Ok(())
    }

    async fn teardown(&mut self) {
        for r in &self.replicas {
            // SIGTERM: the replica ends its streams and exits on its own.
            if let Ok(pid) = i32::try_from(r.pid) {
                // SAFETY: plain kill(2) on a child we started and did not reap.
                unsafe {
                    libc::kill(pid, libc::SIGTERM);
                }
            }
        }
        for r in &mut self.replicas {
            if tokio::time::timeout(Duration::from_secs(12), r.child.wait())
                .await
                .is_err()
            {
                eprintln!(
                    "bench: replica {} did not stop on SIGTERM; killing it",
                    r.pid
                );
                let _ = r.child.kill().await;
            }
        }
        self.replicas.clear();
        if self.created && self.keep {
            println!(
                "bench: kept database {} (DROP DATABASE {} WITH (FORCE) when done)",
                self.db_url, self.db_name
            );
        } else if self.created {
            let dropped = async {
                let admin = pg_connect(&self.admin_url).await?;
                admin
                    .batch_execute(&format!(
                        "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                        self.db_name
                    ))
                    .await?;
                Ok::<_, BoxError>(())
            };
            match tokio::time::timeout(Duration::from_secs(30), dropped).await {
                Ok(Ok(())) => self.created = false,
                Ok(Err(e)) => eprintln!("bench: cannot drop database {}: {e}", self.db_name),
                Err(_) => eprintln!("bench: timed out dropping database {}", self.db_name),
            }
        }
    }
}

async fn pg_connect(url: &str) -> Result<tokio_postgres::Client> {
    let (client, conn) = tokio::time::timeout(
        Duration::from_secs(10),
        tokio_postgres::connect(url, tokio_postgres::NoTls),
    )
    .await
    .map_err(|_| format!("timed out connecting to {url}"))?
    .map_err(|e| format!("cannot connect to {url}: {}", pg_error(&e)))?;
    tokio::spawn(conn);
    Ok(client)
}

fn pg_error(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => db.message().to_owned(),
        None => {
            let mut s = e.to_string();
            let mut cause = std::error::Error::source(e);
            while let Some(c) = cause {
                s.push_str(": ");
                s.push_str(&c.to_string());
                cause = c.source();
            }
            s
        }
    }
}

async fn spawn_replica(
    binary: &Path,
    env: &BenchEnv,
    extra_env: &[(String, String)],
    index: usize,
) -> Result<Replica> {
    let mut cmd = Command::new(binary);
    cmd.env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("DATABASE_URL", &env.db_url)
        .env("AUTH_SECRET", &env.secret)
        .env("ADMIN_TOKEN", &env.admin_token)
        .env("HOST", "127.0.0.1")
        .env("PORT", "0")
        .env("RUST_LOG", "warn");
    for (k, v) in extra_env {
        cmd.env(k, v);
    }
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", binary.display()))?;
    let pid = child.id().ok_or("replica exited at once")?;
    let (Some(stdout), Some(stderr)) = (child.stdout.take(), child.stderr.take()) else {
        return Err("replica pipes missing".into());
    };
    tokio::spawn(async move {
        let mut lines = BufReader::new(stderr).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            eprintln!("[replica {index}] {line}");
        }
    });
    let mut lines = BufReader::new(stdout).lines();
    let found = tokio::time::timeout(Duration::from_secs(60), async {
        while let Some(line) = lines.next_line().await? {
            if let Some(addr) = line.trim().strip_prefix("seatsync listening on http://") {
                return Ok::<_, BoxError>(addr.parse::<SocketAddr>()?);
            }
        }
        Err("replica exited before it was listening".into())
    })
    .await;
    let addr = match found {
        Ok(Ok(addr)) => addr,
        Ok(Err(e)) => return Err(e),
        Err(_) => return Err("replica did not print its address within 60 s".into()),
    };
    // Keep draining stdout so the replica never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    Ok(Replica {
        child,
        pid,
        addr,
        base: format!("http://{addr}"),
    })
}

async fn wait_ready(http: &reqwest::Client, base: &str) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(r) = http.get(format!("{base}/readyz")).send().await {
            if r.status().as_u16() == 200 {
                return Ok(());
            }
        }
        if Instant::now() >= deadline {
            return Err(format!("{base}/readyz did not answer 200 within 30 s").into());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Creates `count` empty 100x100 schedules, one after the other (so their ids
/// are consecutive in a fresh database).
async fn create_schedules(
    http: &reqwest::Client,
    base: &str,
    admin_token: &str,
    count: usize,
) -> Result<Vec<i64>> {
    let mut ids = Vec::with_capacity(count);
    for i in 0..count {
        let resp = http
            .post(format!("{base}/api/schedules"))
            .bearer_auth(admin_token)
            .json(&json!({
                "title": format!("bench {i}"),
                "startsAt": "2030-01-01T19:30:00Z",
                "rows": ROWS,
                "cols": COLS,
                "blocked": [],
            }))
            .send()
            .await?;
        let status = resp.status().as_u16();
        let body: Value = resp.json().await?;
        match (status, body["id"].as_i64()) {
            (201, Some(id)) => ids.push(id),
            _ => return Err(format!("POST /api/schedules answered {status}: {body}").into()),
        }
    }
    Ok(ids)
}

async fn guest_tokens(
    http: &reqwest::Client,
    bases: &[String],
    count: usize,
) -> Result<Vec<String>> {
    stream::iter(0..count)
        .map(|i| {
            let url = format!("{}/api/auth/guest", bases[i % bases.len()]);
            async move {
                let resp = http.post(url).send().await?;
                let status = resp.status().as_u16();
                let body: Value = resp.json().await?;
                match (status, body["token"].as_str()) {
                    (201, Some(t)) => Ok::<_, BoxError>(t.to_owned()),
                    _ => Err(format!("POST /api/auth/guest answered {status}: {body}").into()),
                }
            }
        })
        .buffer_unordered(32)
        .try_collect()
        .await
}

/// Seat pair `p` (0-based) of a schedule: row `1 + p / 50`, columns `c, c + 1`.
fn pair_seats(p: i64) -> (i64, i64) {
    (1 + p / PAIRS_PER_ROW, 1 + 2 * (p % PAIRS_PER_ROW))
}

fn start_request(host: &SocketAddr, token: &str, schedule: i64, p: i64) -> Vec<u8> {
    let (row, col) = pair_seats(p);
    let body = format!(
        r#"{{"scheduleId":{schedule},"seats":[{{"row":{row},"col":{col}}},{{"row":{row},"col":{}}}]}}"#,
        col + 1
    );
    format!(
        "POST /api/bookings/start HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {token}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

// ---------------------------------------------------------------------------
// hold mode

#[derive(Default)]
struct HoldStats {
    /// 201s of measured requests.
    ok: u64,
    /// 201s during the warm-up.
    warmup_ok: u64,
    latencies_us: Vec<u64>,
    errors: u64,
    error_kinds: HashMap<String, u64>,
    error_samples: Vec<String>,
    /// Last completion of a measured request.
    last_done: Option<Instant>,
    exhausted: bool,
}

impl HoldStats {
    fn merge(&mut self, other: HoldStats) {
        self.ok += other.ok;
        self.warmup_ok += other.warmup_ok;
        self.latencies_us.extend(other.latencies_us);
        self.errors += other.errors;
        for (k, v) in other.error_kinds {
            *self.error_kinds.entry(k).or_default() += v;
        }
        for s in other.error_samples {
            if self.error_samples.len() < 5 {
                self.error_samples.push(s);
            }
        }
        self.last_done = self.last_done.max(other.last_done);
        self.exhausted |= other.exhausted;
    }

    fn error(&mut self, kind: String, sample: String) {
        self.errors += 1;
        *self.error_kinds.entry(kind).or_default() += 1;
        if self.error_samples.len() < 5 {
            self.error_samples.push(sample);
        }
    }
}

/// One row of the result table.
struct RunResult {
    name: String,
    rate: f64,
    latencies_us: Vec<u64>,
    errors: u64,
    transactions: u64,
    cpu: CpuReport,
}

async fn hold_mode(args: &Args, env: &BenchEnv, http: &reqwest::Client) -> Result<()> {
    if args.skip_service && args.skip_pgbench {
        return Err("--skip-service and --skip-pgbench leave nothing to run".into());
    }
    match args.prefill {
        Prefill::None => {}
        Prefill::Young => prefill(env, 1, PAIRS).await?,
        Prefill::Mature => prefill(env, 120, 50).await?,
    }
    let bases: Vec<String> = env.replicas.iter().map(|r| r.base.clone()).collect();
    let run_secs = args.seconds + args.warmup;
    let per_run = (args.max_rate * run_secs).div_ceil(PAIRS as u64).max(1) as usize;
    let t = Instant::now();
    let mut plan = Vec::new();
    for _ in 0..args.rounds {
        let base = &bases[0];
        let schedules = |skip: bool| async move {
            if skip {
                Ok(Vec::new())
            } else {
                create_schedules(http, base, &env.admin_token, per_run).await
            }
        };
        let service = schedules(args.skip_service).await?;
        let pgbench = schedules(args.skip_pgbench).await?;
        plan.push((service, pgbench));
    }
    let tokens = if args.skip_service {
        Vec::new()
    } else {
        guest_tokens(http, &bases, PAIRS as usize).await?
    };
    let tokens = Arc::new(tokens);
    println!(
        "bench: setup {:.1} s: {} round(s) of {} + {} schedules of {ROWS}x{COLS} \
         ({PAIRS} two-seat holds each), {} guest tokens",
        t.elapsed().as_secs_f64(),
        args.rounds,
        plan[0].0.len(),
        plan[0].1.len(),
        tokens.len()
    );

    let client = pg_connect(&env.db_url).await?;
    let mut service_results = Vec::new();
    let mut pgbench_results = Vec::new();
    let mut errors = 0;
    for (round, (service_schedules, pgbench_schedules)) in plan.iter().enumerate() {
        // Every other round runs pgbench first, so drift in the machine's
        // load does not always favour the same side.
        let pgbench_first = round % 2 == 1;
        for pgbench_turn in [pgbench_first, !pgbench_first] {
            // Fresh statistics before every run, which also invalidates the
            // plans cached by the replicas' pooled connections: a plan made
            // while `schedules` had 2 pages seq-scans it once the counter
            // updates have bloated it, until autovacuum gets to analyze it.
            // Both sides start from plans that fit the current tables.
            client.batch_execute("ANALYZE").await?;
            if pgbench_turn && !args.skip_pgbench {
                let (result, processed) = pgbench_run(args, env, pgbench_schedules).await?;
                // The tables must show exactly what the run reported.
                verify(&client, "pgbench", pgbench_schedules, processed).await?;
                settle(&client, pgbench_schedules).await?;
                pgbench_results.push(result);
            }
            if !pgbench_turn && !args.skip_service {
                let (result, stats) =
                    service_run(args, env, service_schedules, tokens.clone()).await?;
                verify(
                    &client,
                    "service",
                    service_schedules,
                    stats.ok + stats.warmup_ok,
                )
                .await?;
                settle(&client, service_schedules).await?;
                if stats.errors > 0 {
                    let mut kinds: Vec<_> = stats.error_kinds.iter().collect();
                    kinds.sort();
                    println!("bench: service errors: {kinds:?}");
                    for s in &stats.error_samples {
                        println!("  e.g. {s}");
                    }
                }
                if stats.exhausted {
                    println!(
                        "bench: warning: the service run used up its {} schedules; raise --max-rate",
                        service_schedules.len()
                    );
                }
                errors += stats.errors;
                service_results.push(result);
            }
        }
    }

    println!();
    let mut rows: Vec<&RunResult> = Vec::new();
    for i in 0..args.rounds as usize {
        rows.extend(service_results.get(i));
        if args.rounds > 1 {
            rows.extend(pgbench_results.get(i));
        }
    }
    if args.rounds == 1 {
        rows.extend(pgbench_results.first());
    }
    print_table(&rows);
    let mean = |rs: &[RunResult]| rs.iter().map(|r| r.rate).sum::<f64>() / rs.len().max(1) as f64;
    let service_rate = mean(&service_results);
    let pgbench_rate = mean(&pgbench_results);
    match (service_results.is_empty(), pgbench_results.is_empty()) {
        (false, false) => {
            let ratio = service_rate / pgbench_rate;
            if args.rounds > 1 {
                let per_round: Vec<String> = service_results
                    .iter()
                    .zip(&pgbench_results)
                    .map(|(s, p)| format!("{:.3}", s.rate / p.rate))
                    .collect();
                println!(
                    "per-round ratios {}; below: means over {} rounds",
                    per_round.join(", "),
                    args.rounds
                );
            }
            println!(
                "ratio service/pgbench = {ratio:.3} (target >= 0.8: {})",
                if ratio >= 0.8 { "met" } else { "NOT met" }
            );
            println!(
                "bench: service {service_rate:.1} holds/s, pgbench {pgbench_rate:.1} tps, ratio {ratio:.3}"
            );
        }
        (false, true) => println!("bench: service {service_rate:.1} holds/s, pgbench skipped"),
        _ => println!("bench: service skipped, pgbench {pgbench_rate:.1} tps"),
    }
    if errors > 0 {
        return Err(format!("{errors} service requests did not answer 201").into());
    }
    Ok(())
}

/// Gives the database a past before anything is prepared: `schedules`
/// sold-out schedules of `pairs` confirmed two-seat bookings each (with their
/// seats and events), which neither run touches; then ANALYZE. Whether the
/// planner can estimate a new schedule's seat rows depends on it (see
/// `--prefill`).
async fn prefill(env: &BenchEnv, schedules: i32, pairs: i64) -> Result<()> {
    let t = Instant::now();
    let db = pg_connect(&env.db_url).await?;
    let ids: Vec<i64> = db
        .query(
            "INSERT INTO schedules (title, starts_at, rows, cols) \
             SELECT 'bench past ' || g, now() - interval '1 day', $2, $3 \
             FROM generate_series(1, $1) g RETURNING id",
            &[&schedules, &(ROWS as i32), &(COLS as i32)],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let (per_row, pairs) = (PAIRS_PER_ROW as i32, pairs as i32);
    let steps: [(&str, &[&(dyn tokio_postgres::types::ToSql + Sync)]); 4] = [
        (
            "INSERT INTO bookings (id, schedule_id, user_id, status, seats, expires_at, request_fingerprint) \
             SELECT gen_random_uuid(), s, gen_random_uuid(), 'CONFIRMED', \
                    jsonb_build_array(jsonb_build_object('row', 1 + p / $2, 'col', 1 + 2 * (p % $2)), \
                                      jsonb_build_object('row', 1 + p / $2, 'col', 2 + 2 * (p % $2))), \
                    now(), '' \
             FROM unnest($1::bigint[]) s, generate_series(0, $3 - 1) p",
            &[&ids, &per_row, &pairs],
        ),
        (
            "INSERT INTO schedule_seat_status (schedule_id, row_num, col_num, booking_id, status, expires_at) \
             SELECT b.schedule_id, (s->>'row')::int2, (s->>'col')::int2, b.id, 'CONFIRMED', NULL \
             FROM bookings b, jsonb_array_elements(b.seats) s WHERE b.schedule_id = ANY($1)",
            &[&ids],
        ),
        (
            "INSERT INTO seat_events (schedule_id, event_id, action, seats) \
             SELECT schedule_id, row_number() OVER (PARTITION BY schedule_id), 'CONFIRMED', seats \
             FROM bookings WHERE schedule_id = ANY($1)",
            &[&ids],
        ),
        (
            "UPDATE schedule_event_counters SET last_event_id = $2 WHERE schedule_id = ANY($1)",
            &[&ids, &i64::from(pairs)],
        ),
    ];
    for (sql, params) in steps {
        db.execute(sql, params)
            .await
            .map_err(|e| format!("prefill: {}", pg_error(&e)))?;
    }
    db.batch_execute("ANALYZE").await?;
    println!(
        "bench: prefill {:.1} s: {schedules} past sold-out schedule(s) of {} seats, ANALYZE",
        t.elapsed().as_secs_f64(),
        2 * pairs
    );
    Ok(())
}

/// Marks a verified run's holds as paid, so the next run starts without
/// thousands of pending holds (which the sweeper scans).
async fn settle(client: &tokio_postgres::Client, schedules: &[i64]) -> Result<()> {
    client
        .execute(
            "UPDATE bookings SET status = 'CONFIRMED', updated_at = now() \
             WHERE schedule_id = ANY($1) AND status = 'PENDING'",
            &[&schedules],
        )
        .await?;
    client
        .execute(
            "UPDATE schedule_seat_status SET status = 'CONFIRMED', expires_at = NULL \
             WHERE schedule_id = ANY($1)",
            &[&schedules],
        )
        .await?;
    Ok(())
}

async fn service_run(
    args: &Args,
    env: &BenchEnv,
    schedules: &[i64],
    tokens: Arc<Vec<String>>,
) -> Result<(RunResult, HoldStats)> {
    let next = Arc::new(AtomicU64::new(0));
    let capacity = schedules.len() as u64 * PAIRS as u64;
    let schedules: Arc<Vec<i64>> = Arc::new(schedules.to_vec());
    let start = Instant::now();
    let measure_from = start + Duration::from_secs(args.warmup);
    let end = measure_from + Duration::from_secs(args.seconds);
    println!(
        "bench: service run: {} workers, POST /api/bookings/start of 2 free seats, {} s warm-up + {} s",
        args.concurrency, args.warmup, args.seconds
    );
    let mut workers = Vec::new();
    for w in 0..args.concurrency as usize {
        let addr = env.replicas[w % env.replicas.len()].addr;
        let next = next.clone();
        let schedules = schedules.clone();
        let tokens = tokens.clone();
        workers.push(tokio::spawn(async move {
            let mut stats = HoldStats::default();
            let mut conn = HttpConn::new(addr);
            while Instant::now() < end {
                let n = next.fetch_add(1, Ordering::Relaxed);
                if n >= capacity {
                    stats.exhausted = true;
                    break;
                }
                let n = n as i64;
                let schedule = schedules[(n / PAIRS) as usize];
                let p = n % PAIRS;
                let req = start_request(&addr, &tokens[p as usize], schedule, p);
                let started = Instant::now();
                let res = conn.send(&req).await;
                let done = Instant::now();
                let measured = started >= measure_from;
                match res {
                    Ok((201, _)) if measured => {
                        stats.ok += 1;
                        stats.latencies_us.push((done - started).as_micros() as u64);
                        stats.last_done = Some(done);
                    }
                    Ok((201, _)) => stats.warmup_ok += 1,
                    Ok((status, body)) => stats.error(
                        format!("HTTP {status}"),
                        format!("HTTP {status}: {}", String::from_utf8_lossy(&body)),
                    ),
                    Err(e) => stats.error(format!("io {:?}", e.kind()), format!("io: {e}")),
                }
            }
            stats
        }));
    }
    // CPU is accounted over the measured window only.
    tokio::time::sleep_until(measure_from.into()).await;
    let probe = CpuProbe::begin(env).await?;
    let mut stats = HoldStats::default();
    for w in workers {
        stats.merge(w.await?);
    }
    let cpu = probe.finish().await;
    let elapsed = stats
        .last_done
        .map(|d| d.duration_since(measure_from))
        .unwrap_or(Duration::from_secs(args.seconds))
        .max(Duration::from_millis(1));
    let rate = stats.ok as f64 / elapsed.as_secs_f64();
    let result = RunResult {
        name: format!("service {}x{}", env.replicas.len(), args.concurrency),
        rate,
        latencies_us: std::mem::take(&mut stats.latencies_us),
        errors: stats.errors,
        transactions: stats.ok,
        cpu,
    };
    println!(
        "bench: service run done: {} holds in {:.2} s, {} errors",
        stats.ok,
        elapsed.as_secs_f64(),
        stats.errors
    );
    Ok((result, stats))
}

struct RemoveDirOnDrop(PathBuf);

impl Drop for RemoveDirOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn pgbench_script(args: &Args) -> PathBuf {
    args.pgbench_script
        .clone()
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/bench/hold.pgbench"))
}

async fn pgbench_run(args: &Args, env: &BenchEnv, schedules: &[i64]) -> Result<(RunResult, u64)> {
    let first = schedules[0];
    if schedules
        .iter()
        .enumerate()
        .any(|(i, &id)| id != first + i as i64)
    {
        return Err(format!("pgbench needs consecutive schedule ids, got {schedules:?}").into());
    }
    let script = pgbench_script(args);
    let clients = args.pgbench_clients.unwrap_or(args.concurrency);
    let threads = clients.min(2);
    let log_dir = std::env::temp_dir().join(format!("{}-pgbench", env.db_name));
    std::fs::create_dir_all(&log_dir)?;
    // Removed however this function ends, also when Ctrl-C drops it.
    let _log_dir_guard = RemoveDirOnDrop(log_dir.clone());
    let mut cmd = Command::new(&args.pgbench);
    cmd.arg("-n")
        .args(["-M", args.pgbench_protocol.as_str()])
        .args(["-c", &clients.to_string()])
        .args(["-j", &threads.to_string()])
        .args(["-T", &args.seconds.to_string()])
        .arg("-f")
        .arg(&script)
        .args(["-D", &format!("sched_base={first}")])
        .args(["-D", &format!("nclients={clients}")])
        .args(["-D", "i=0"])
        .args(["-D", &format!("pairs={PAIRS}")])
        .args(["-D", &format!("pairs_per_row={PAIRS_PER_ROW}")])
        .args(["-D", &format!("hold={HOLD_SECONDS}")])
        .arg("--log")
        .arg(format!("--log-prefix={}", log_dir.join("hold").display()))
        .arg(&env.db_url)
        .stdin(Stdio::null())
        .kill_on_drop(true);
    println!(
        "bench: pgbench run: pgbench -n -M {} -c {clients} -j {threads} -T {} -f {} (schedules {}..={})",
        args.pgbench_protocol.as_str(),
        args.seconds,
        script.display(),
        first,
        schedules[schedules.len() - 1]
    );
    let probe = CpuProbe::begin(env).await?;
    let out = tokio::time::timeout(Duration::from_secs(args.seconds + 120), cmd.output()).await;
    let cpu = probe.finish().await;
    let latencies = read_pgbench_logs(&log_dir);
    let out = out
        .map_err(|_| "pgbench did not finish in time")?
        .map_err(|e| format!("cannot run {}: {e}", args.pgbench.display()))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let field = |prefix: &str| {
        stdout
            .lines()
            .find_map(|l| l.trim().strip_prefix(prefix).map(str::trim))
            .and_then(|v| v.split_whitespace().next())
            .map(str::to_owned)
    };
    let tps: Option<f64> = field("tps = ").and_then(|v| v.parse().ok());
    let processed: u64 = field("number of transactions actually processed:")
        .and_then(|v| v.split('/').next()?.parse().ok())
        .unwrap_or(0);
    let failed: u64 = field("number of failed transactions:")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let (Some(tps), true) = (tps, out.status.success()) else {
        return Err(format!("pgbench failed ({}):\n{stdout}\n{stderr}", out.status).into());
    };
    if !stderr.trim().is_empty() {
        eprintln!("pgbench: {}", stderr.trim());
    }
    println!("bench: pgbench run done: {processed} transactions, {failed} failed, tps = {tps:.1}");
    let result = RunResult {
        name: format!("pgbench -M {} -c{clients}", args.pgbench_protocol.as_str()),
        rate: tps,
        latencies_us: latencies,
        errors: failed,
        transactions: processed,
        cpu,
    };
    Ok((result, processed))
}

/// Per-transaction latencies (µs, third column) from `pgbench --log` files.
fn read_pgbench_logs(dir: &Path) -> Vec<u64> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return out;
    };
    for entry in entries.flatten() {
        let Ok(text) = std::fs::read_to_string(entry.path()) else {
            continue;
        };
        out.extend(
            text.lines()
                .filter_map(|l| l.split_whitespace().nth(2)?.parse::<u64>().ok()),
        );
    }
    out
}

/// Checks in the tables that `expected` holds committed on `schedules`, each
/// with one booking and two seat rows, and no seat twice.
async fn verify(
    client: &tokio_postgres::Client,
    what: &str,
    schedules: &[i64],
    expected: u64,
) -> Result<()> {
    let row = client
        .query_one(
            "SELECT (SELECT count(*) FROM bookings WHERE schedule_id = ANY($1) AND status = 'PENDING'), \
                    (SELECT count(*) FROM schedule_seat_status WHERE schedule_id = ANY($1)), \
                    (SELECT count(*) FROM seat_events WHERE schedule_id = ANY($1))",
            &[&schedules],
        )
        .await?;
    let (bookings, seats, events): (i64, i64, i64) = (row.get(0), row.get(1), row.get(2));
    let ok =
        bookings as u64 == expected && seats as u64 == 2 * expected && events as u64 == expected;
    println!(
        "bench: {what} check: {bookings} bookings, {seats} seat rows, {events} events for {expected} holds: {}",
        if ok { "ok" } else { "MISMATCH" }
    );
    if ok {
        Ok(())
    } else {
        Err(format!("{what}: the tables do not match the run").into())
    }
}

fn print_table(results: &[&RunResult]) {
    println!(
        "{:<26} {:>9} {:>8} {:>8} {:>8} {:>8} {:>7} | {:>25} | {:>6}",
        "run",
        "tx/s",
        "p50 ms",
        "p95 ms",
        "p99 ms",
        "max ms",
        "errors",
        "CPU ms/tx: load  app   pg",
        "busy"
    );
    for r in results {
        let mut l = r.latencies_us.clone();
        l.sort_unstable();
        let ms = |q: f64| percentile(&l, q) as f64 / 1000.0;
        let per_tx = |ms: f64| {
            if r.transactions == 0 {
                0.0
            } else {
                ms / r.transactions as f64
            }
        };
        println!(
            "{:<26} {:>9.1} {:>8.2} {:>8.2} {:>8.2} {:>8.2} {:>7} | {:>14.3} {:>5.3} {:>5.3} | {:>5.0}%",
            r.name,
            r.rate,
            ms(0.50),
            ms(0.95),
            ms(0.99),
            ms(1.0),
            r.errors,
            per_tx(r.cpu.load_ms),
            per_tx(r.cpu.replica_ms),
            per_tx(r.cpu.postgres_ms),
            r.cpu.machine_busy * 100.0
        );
    }
    println!(
        "(CPU ms/tx: load = this process + pgbench, app = replica process(es), pg = backends of the bench \
         database; busy = whole machine, all {} cores, incl. other users)",
        num_cpus()
    );
    println!("bench database backends, mean number per state (sampled every 100 ms; idle ones left out):");
    for r in results {
        let polls = r.cpu.polls.max(1) as f64;
        let top: Vec<String> = r
            .cpu
            .waits
            .iter()
            .take(7)
            .map(|(k, n)| format!("{k} {:.1}", *n as f64 / polls))
            .collect();
        println!(
            "  {:<26} busy {:>5.1}: {}",
            r.name,
            r.cpu.busy_samples as f64 / polls,
            top.join(", ")
        );
    }
}

fn percentile(sorted: &[u64], q: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

fn percentile_i(sorted: &[i64], q: f64) -> i64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

// ---------------------------------------------------------------------------
// CPU accounting

#[derive(Debug, Default, Clone)]
struct CpuReport {
    /// This process and its reaped children (pgbench).
    load_ms: f64,
    replica_ms: f64,
    postgres_ms: f64,
    /// Fraction of all cores busy (any process).
    machine_busy: f64,
    /// What the bench database's busy backends were doing, in samples:
    /// `CPU` (active, not waiting), `Lock:transactionid`, `IO:WALSync`,
    /// `idle in tx` (waiting for the client's next statement), ...
    waits: Vec<(String, u64)>,
    /// Samples of backends (any state but idle).
    busy_samples: u64,
    /// Sampling rounds.
    polls: u64,
}

/// CPU ticks per backend pid (at first sight, latest) and a histogram of
/// backend states, from polling `pg_stat_activity` every 100 ms.
#[derive(Default)]
struct Backends {
    ticks: HashMap<i32, (u64, u64)>,
    waits: HashMap<String, u64>,
    busy_samples: u64,
    polls: u64,
}

struct CpuProbe {
    self_start: f64,
    replica_pids: Vec<u32>,
    replica_start: f64,
    machine_start: (u64, u64),
    poller: tokio::task::JoinHandle<Backends>,
    stop: CancellationToken,
}

impl CpuProbe {
    async fn begin(env: &BenchEnv) -> Result<Self> {
        let replica_pids: Vec<u32> = env.replicas.iter().map(|r| r.pid).collect();
        let admin = pg_connect(&env.admin_url).await?;
        let db = env.db_name.clone();
        let stop = CancellationToken::new();
        // Backends of the bench database, polled: pgbench's come and go.
        let mut backends = Backends::default();
        backends.poll(&admin, &db, true).await;
        let poller = tokio::spawn({
            let stop = stop.clone();
            async move {
                loop {
                    tokio::select! {
                        _ = stop.cancelled() => break,
                        _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                    }
                    backends.poll(&admin, &db, false).await;
                }
                backends
            }
        });
        Ok(Self {
            self_start: rusage_ms(libc::RUSAGE_SELF) + rusage_ms(libc::RUSAGE_CHILDREN),
            replica_start: replica_pids.iter().map(|&p| proc_cpu_ms(p as i32)).sum(),
            replica_pids,
            machine_start: machine_ticks(),
            poller,
            stop,
        })
    }

    async fn finish(self) -> CpuReport {
        let load = rusage_ms(libc::RUSAGE_SELF) + rusage_ms(libc::RUSAGE_CHILDREN);
        let replica: f64 = self
            .replica_pids
            .iter()
            .map(|&p| proc_cpu_ms(p as i32))
            .sum();
        let machine = machine_ticks();
        self.stop.cancel();
        let backends = self.poller.await.unwrap_or_default();
        let postgres_ticks: u64 = backends
            .ticks
            .values()
            .map(|(base, last)| last.saturating_sub(*base))
            .sum();
        let total = machine.1.saturating_sub(self.machine_start.1).max(1);
        let busy = machine.0.saturating_sub(self.machine_start.0);
        let mut waits: Vec<(String, u64)> = backends.waits.into_iter().collect();
        waits.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        CpuReport {
            load_ms: load - self.self_start,
            replica_ms: replica - self.replica_start,
            postgres_ms: postgres_ticks as f64 * 1000.0 / clock_ticks(),
            machine_busy: busy as f64 / total as f64,
            waits,
            busy_samples: backends.busy_samples,
            polls: backends.polls,
        }
    }
}

impl Backends {
    async fn poll(&mut self, admin: &tokio_postgres::Client, db: &str, baseline: bool) {
        let Ok(rows) = admin
            .query(
                "SELECT pid, coalesce(state, ''), wait_event_type, wait_event, \
                        coalesce(query LIKE 'LISTEN%', false), \
                        coalesce(query LIKE 'UPDATE bookings b SET status = ''EXPIRED''%', false) \
                 FROM pg_stat_activity WHERE datname = $1",
                &[&db],
            )
            .await
        else {
            return;
        };
        if !baseline {
            self.polls += 1;
        }
        for row in rows {
            let pid: i32 = row.get(0);
            if let Some(t) = proc_ticks(pid) {
                // A backend first seen after the start began after it: all its CPU counts.
                let e = self
                    .ticks
                    .entry(pid)
                    .or_insert((if baseline { t } else { 0 }, t));
                e.1 = t;
            }
            let state: String = row.get(1);
            let listener: bool = row.get(4);
            if baseline || state == "idle" || listener {
                continue;
            }
            let wait_type: Option<String> = row.get(2);
            let wait: Option<String> = row.get(3);
            let sweeper: bool = row.get(5);
            let key = match (state.as_str(), wait_type, wait) {
                _ if sweeper => "sweeper".to_owned(),
                ("idle in transaction", _, _) => "idle in tx (client)".to_owned(),
                ("active", None, _) => "CPU".to_owned(),
                (_, Some(t), Some(w)) => format!("{t}:{w}"),
                (s, _, _) => s.to_owned(),
            };
            *self.waits.entry(key).or_default() += 1;
            self.busy_samples += 1;
        }
    }
}

fn clock_ticks() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

fn num_cpus() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// utime + stime of a process, in clock ticks.
fn proc_ticks(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which may contain spaces: state is field 3.
    let rest = &stat[stat.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

fn proc_cpu_ms(pid: i32) -> f64 {
    proc_ticks(pid).unwrap_or(0) as f64 * 1000.0 / clock_ticks()
}

/// (busy, total) jiffies over all cores.
fn machine_ticks() -> (u64, u64) {
    let Ok(stat) = std::fs::read_to_string("/proc/stat") else {
        return (0, 0);
    };
    let Some(line) = stat.lines().next() else {
        return (0, 0);
    };
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal (guest is inside user)
    let total: u64 = v.iter().take(8).sum();
    let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
    (total.saturating_sub(idle), total)
}

fn rusage_ms(who: libc::c_int) -> f64 {
    // SAFETY: getrusage writes into the struct we pass.
    let ru = unsafe {
        let mut ru: libc::rusage = std::mem::zeroed();
        if libc::getrusage(who, &mut ru) != 0 {
            return 0.0;
        }
        ru
    };
    let tv = |t: libc::timeval| t.tv_sec as f64 * 1000.0 + t.tv_usec as f64 / 1000.0;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// Raises the soft open-files limit to `need` (and the hard one, if allowed);
/// returns the soft limit in force.
fn raise_nofile_limit(need: u64) -> u64 {
    // SAFETY: getrlimit/setrlimit read and write the structs we pass.
    unsafe {
        let mut lim: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return 0;
        }
        let need = need as libc::rlim_t;
        if lim.rlim_cur >= need {
            return lim.rlim_cur as u64;
        }
        let want = libc::rlimit {
            rlim_cur: need,
            rlim_max: lim.rlim_max.max(need),
        };
        if libc::setrlimit(libc::RLIMIT_NOFILE, &want) != 0 {
            let capped = libc::rlimit {
                rlim_cur: lim.rlim_max,
                rlim_max: lim.rlim_max,
            };
            libc::setrlimit(libc::RLIMIT_NOFILE, &capped);
        }
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
        lim.rlim_cur as u64
    }
}

fn vm_rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
        })
        .unwrap_or(0)
}

// ---------------------------------------------------------------------------
// A minimal HTTP/1.1 client: keep-alive, one request at a time, as cheap per
// request as pgbench is per transaction.

struct HttpConn {
    addr: SocketAddr,
    stream: Option<TcpStream>,
    buf: Vec<u8>,
}

struct Head {
    status: u16,
    content_length: Option<usize>,
    chunked: bool,
    close: bool,
}

impl HttpConn {
    fn new(addr: SocketAddr) -> Self {
        Self {
            addr,
            stream: None,
            buf: Vec::with_capacity(4096),
        }
    }

    /// Sends one request and reads its response: (status, body).
    async fn send(&mut self, req: &[u8]) -> std::io::Result<(u16, Vec<u8>)> {
        let result = tokio::time::timeout(REQUEST_TIMEOUT, self.exchange(req))
            .await
            .unwrap_or_else(|_| {
                Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "no response within 15 s",
                ))
            });
        if result.is_err() {
            self.stream = None;
        }
        result
    }

    async fn exchange(&mut self, req: &[u8]) -> std::io::Result<(u16, Vec<u8>)> {
        if self.stream.is_none() {
            let s = TcpStream::connect(self.addr).await?;
            s.set_nodelay(true)?;
            self.stream = Some(s);
            self.buf.clear();
        }
        let Some(stream) = self.stream.as_mut() else {
            unreachable!("connected above");
        };
        stream.write_all(req).await?;
        let head = read_head(stream, &mut self.buf).await?;
        let body = if let Some(len) = head.content_length {
            while self.buf.len() < len {
                read_more(stream, &mut self.buf).await?;
            }
            self.buf.drain(..len).collect()
        } else if head.chunked {
            let mut body = Vec::new();
            let mut dechunk = Dechunker::default();
            let pending = std::mem::take(&mut self.buf);
            dechunk.feed(&pending, &mut body)?;
            let mut chunk = [0u8; 4096];
            while !dechunk.done() {
                let n = stream.read(&mut chunk).await?;
                if n == 0 {
                    return Err(std::io::ErrorKind::UnexpectedEof.into());
                }
                dechunk.feed(&chunk[..n], &mut body)?;
            }
            body
        } else {
            stream.read_to_end(&mut self.buf).await?;
            self.stream = None;
            std::mem::take(&mut self.buf)
        };
        if head.close {
            self.stream = None;
        }
        Ok((head.status, body))
    }
}

async fn read_more(stream: &mut TcpStream, buf: &mut Vec<u8>) -> std::io::Result<()> {
    let mut chunk = [0u8; 4096];
    let n = stream.read(&mut chunk).await?;
    if n == 0 {
        return Err(std::io::ErrorKind::UnexpectedEof.into());
    }
    buf.extend_from_slice(&chunk[..n]);
    Ok(())
}

/// Reads up to the end of a response head; leaves what follows in `buf`.
async fn read_head(stream: &mut TcpStream, buf: &mut Vec<u8>) -> std::io::Result<Head> {
    loop {
        if let Some(i) = find(buf, b"\r\n\r\n") {
            let head = parse_head(&buf[..i])?;
            buf.drain(..i + 4);
            return Ok(head);
        }
        if buf.len() > MAX_HEAD_BYTES {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "response head too large",
            ));
        }
        read_more(stream, buf).await?;
    }
}

fn parse_head(raw: &[u8]) -> std::io::Result<Head> {
    let bad = || std::io::Error::new(std::io::ErrorKind::InvalidData, "malformed response head");
    let text = std::str::from_utf8(raw).map_err(|_| bad())?;
    let mut lines = text.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .ok_or_else(bad)?;
    let mut head = Head {
        status,
        content_length: None,
        chunked: false,
        close: false,
    };
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("content-length") {
            head.content_length = value.parse().ok();
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            head.chunked = value.to_ascii_lowercase().contains("chunked");
        } else if name.eq_ignore_ascii_case("connection") {
            head.close = value.eq_ignore_ascii_case("close");
        }
    }
    Ok(head)
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// `Transfer-Encoding: chunked`, incrementally.
#[derive(Default)]
struct Dechunker {
    state: ChunkState,
    pending: Vec<u8>,
}

#[derive(Default, Clone, Copy, PartialEq, Eq)]
enum ChunkState {
    #[default]
    Size,
    Data(usize),
    DataEnd,
    Done,
}

impl Dechunker {
    fn done(&self) -> bool {
        self.state == ChunkState::Done
    }

    fn feed(&mut self, input: &[u8], out: &mut Vec<u8>) -> std::io::Result<()> {
        let bad = || std::io::Error::new(std::io::ErrorKind::InvalidData, "malformed chunked body");
        // The common case, a whole chunk in one read, needs no copy.
        let owned;
        let data: &[u8] = if self.pending.is_empty() {
            input
        } else {
            self.pending.extend_from_slice(input);
            owned = std::mem::take(&mut self.pending);
            &owned
        };
        let mut pos = 0;
        loop {
            match self.state {
                ChunkState::Size => {
                    let Some(i) = find(&data[pos..], b"\r\n") else {
                        break;
                    };
                    let line = std::str::from_utf8(&data[pos..pos + i]).map_err(|_| bad())?;
                    let hex = line.split(';').next().unwrap_or("").trim();
                    let size = usize::from_str_radix(hex, 16).map_err(|_| bad())?;
                    pos += i + 2;
                    self.state = if size == 0 {
                        ChunkState::Done
                    } else {
                        ChunkState::Data(size)
                    };
                }
                ChunkState::Data(rem) => {
                    let take = rem.min(data.len() - pos);
                    if take == 0 {
                        break;
                    }
                    out.extend_from_slice(&data[pos..pos + take]);
                    pos += take;
                    self.state = if take == rem {
                        ChunkState::DataEnd
                    } else {
                        ChunkState::Data(rem - take)
                    };
                }
                ChunkState::DataEnd => {
                    if data.len() - pos < 2 {
                        break;
                    }
                    pos += 2;
                    self.state = ChunkState::Size;
                }
                ChunkState::Done => break,
            }
        }
        if pos < data.len() && !self.done() {
            self.pending = data[pos..].to_vec();
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------
// sse mode

/// A minimal `text/event-stream` parser: ids, `event: resync`, `retry:`.
#[derive(Default)]
struct SseParser {
    line: Vec<u8>,
    id: Option<u64>,
    has_data: bool,
    resync: bool,
}

enum SseItem {
    Retry,
    Event { id: Option<u64>, resync: bool },
}

impl SseParser {
    fn feed(&mut self, bytes: &[u8], mut emit: impl FnMut(SseItem)) {
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
struct ClientLog {
    /// (event id, arrival).
    events: Vec<(u64, Instant)>,
    resyncs: u32,
    /// Saw `retry:`: from here on every event must arrive.
    subscribed: bool,
    /// The stream ended (or failed) before we stopped it.
    ended: Option<String>,
}

#[allow(clippy::too_many_arguments)]
async fn sse_client(
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
        loop {
            let now = Instant::now();
            body.clear();
            let input: &[u8] = &first;
            match &mut dechunk {
                Some(d) => d.feed(input, &mut body).map_err(|e| e.to_string())?,
                None => body.extend_from_slice(input),
            }
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
            if dechunk.as_ref().is_some_and(Dechunker::done) {
                return Err("stream ended".to_string());
            }
            let n = tokio::select! {
                _ = stop.cancelled() => return Ok(()),
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

async fn sse_mode(args: &Args, env: &BenchEnv, http: &reqwest::Client) -> Result<()> {
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

    // Holds at a steady rate; each reports when its 201 arrived.
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
    let total_before: u64 = rss_before.iter().sum();
    let total_after: u64 = rss_connected.iter().sum();
    let kib_per_stream = (total_after as f64 - total_before as f64) / subscribed.max(1) as f64;
    println!(
        "bench: sse {subscribed} streams, {ok_holds} events, delivery p50 {:.2} ms p99 {:.2} ms max {:.2} ms, missed {missed}, duplicated {duplicated}, {kib_per_stream:.1} KiB/stream",
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
