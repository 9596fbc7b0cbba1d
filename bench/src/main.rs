//! Benchmarks a seatsync build against its own database.
//!
//! ```sh
//! cargo build --release --workspace
//! # the hold transaction through the service vs. the same transaction through pgbench
//! target/release/seatsync-bench hold --seconds 10 --concurrency 32
//! # SSE fan-out: delivery latency, missed/duplicated events, memory per stream
//! target/release/seatsync-bench fanout --clients 10000
//! # a ticket drop: 20,000 fans click within 1 s for 1,000 seats
//! target/release/seatsync-bench drop --fans 20000 --seats 1000 --window-ms 1000 --replicas 2
//! ```
//!
//! Every run creates a database `seatsync_bench_<random>` next to
//! `--database-url`, starts `--replicas` release replicas on it (loopback
//! only), and drops the database and stops the replicas at the end, also on
//! error and on Ctrl-C/SIGTERM. (A run killed with SIGKILL leaves its
//! database behind: `DROP DATABASE seatsync_bench_... WITH (FORCE)`.)
//!
//! One module per scenario: `hold` (hold throughput, see there for how the
//! runs are made comparable), `pgbench` (the same transaction without HTTP:
//! the ceiling), `fanout` (SSE streams), `drop` (a ticket drop); `report`
//! prints tables, writes JSON results and draws the SVG plot.

mod cpu;
mod drop;
mod env;
mod fanout;
mod hold;
mod http;
mod pgbench;
mod replicas;
mod report;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::env::BenchEnv;
use crate::replicas::{default_binary, raise_nofile_limit, spawn_replica, wait_ready};

pub(crate) type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub(crate) type Result<T, E = BoxError> = std::result::Result<T, E>;

pub(crate) const REQUEST_TIMEOUT: Duration = Duration::from_secs(15);

#[derive(Debug, Parser)]
#[command(
    name = "seatsync-bench",
    about = "Benchmarks seatsync: hold throughput vs. pgbench, SSE fan-out, ticket drops"
)]
struct Cli {
    #[command(subcommand)]
    scenario: Scenario,
}

#[derive(Debug, Subcommand)]
enum Scenario {
    /// Hold throughput and latency: the service vs. pgbench running the same transaction.
    Hold(HoldArgs),
    /// Only the pgbench side of `hold`: the database's ceiling for the hold transaction.
    Pgbench(HoldArgs),
    /// SSE fan-out: delivery latency, missed/duplicated events, memory per stream.
    #[command(alias = "sse")]
    Fanout(FanoutArgs),
    /// A ticket drop: N fans click within a window for M seats.
    Drop(drop::DropArgs),
    /// Draws the drop runs' JSON results as an SVG plot (latency against load).
    Plot(report::PlotArgs),
}

/// What every scenario that runs replicas takes.
#[derive(Debug, Clone, Args)]
pub(crate) struct Common {
    /// Server to create the bench database on (any database of it; trust or password in the URL).
    #[arg(
        long,
        default_value = "postgres://postgres@127.0.0.1:5432/postgres",
        value_name = "URL"
    )]
    pub(crate) database_url: String,
    /// The seatsync binary [default: `seatsync` next to this executable,
    /// i.e. <target-dir>/release/seatsync].
    #[arg(long, value_name = "PATH")]
    pub(crate) binary: Option<PathBuf>,
    /// Replica processes (workers, SSE clients and fans are spread over them)
    /// [default: 1; drop: 2].
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=8))]
    pub(crate) replicas: Option<u64>,
    /// Extra environment for the replicas, e.g. DB_POOL_SIZE=32 or
    /// TOKIO_WORKER_THREADS=4 (repeatable).
    #[arg(long = "replica-env", value_name = "KEY=VALUE", value_parser = parse_key_value)]
    pub(crate) replica_env: Vec<(String, String)>,
    /// Leave the bench database behind (for inspection); it is printed at the end.
    #[arg(long)]
    pub(crate) keep_database: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum Prefill {
    None,
    Young,
    Mature,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum Protocol {
    Simple,
    Extended,
    Prepared,
}

impl Protocol {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Protocol::Simple => "simple",
            Protocol::Extended => "extended",
            Protocol::Prepared => "prepared",
        }
    }
}

#[derive(Debug, Clone, Args)]
pub(crate) struct HoldArgs {
    #[command(flatten)]
    pub(crate) common: Common,
    /// Measured seconds of each run.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=600))]
    pub(crate) seconds: u64,
    /// Unmeasured seconds before the service run (connections, prepared statements).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(0..=60))]
    pub(crate) warmup: u64,
    /// Concurrent workers (service) and pgbench clients.
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u64).range(1..=1024))]
    pub(crate) concurrency: u64,
    /// pgbench clients, if not --concurrency.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=1024))]
    pub(crate) pgbench_clients: Option<u64>,
    /// Highest throughput to size the grid for (schedules are created for
    /// max-rate x duration holds of each run; a run stops early if it runs out).
    #[arg(long, default_value_t = 5000, value_parser = clap::value_parser!(u64).range(10..=100_000))]
    pub(crate) max_rate: u64,
    /// pgbench executable.
    #[arg(
        long,
        default_value = "/usr/lib/postgresql/15/bin/pgbench",
        value_name = "PATH"
    )]
    pub(crate) pgbench: PathBuf,
    /// pgbench script [default: deploy/bench/hold.pgbench of this repository].
    #[arg(long, value_name = "PATH")]
    pub(crate) pgbench_script: Option<PathBuf>,
    /// pgbench query protocol (-M). The service uses prepared statements;
    /// `simple` is pgbench's default.
    #[arg(long, value_enum, default_value_t = Protocol::Simple)]
    pub(crate) pgbench_protocol: Protocol,
    /// Rounds of (service run, pgbench run), alternating which goes
    /// first; the final line reports the means.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=20))]
    pub(crate) rounds: u64,
    /// Database state before the runs (then ANALYZE). `mature`: 120
    /// past sold-out schedules of 100 seats, so the planner estimates a new
    /// schedule's seats from the average. `young`: one past schedule of 10,000
    /// seats, so it estimates a new schedule at ~0 rows (the plan a young
    /// deployment gets). `none`: empty, never-analyzed tables.
    #[arg(long, value_enum, default_value_t = Prefill::Mature)]
    pub(crate) prefill: Prefill,
    /// Only the service run.
    #[arg(long)]
    pub(crate) skip_pgbench: bool,
    /// Only the pgbench run (e.g. to try variants with --pgbench-script).
    #[arg(long)]
    pub(crate) skip_service: bool,
}

#[derive(Debug, Clone, Args)]
pub(crate) struct FanoutArgs {
    #[command(flatten)]
    pub(crate) common: Common,
    /// Streams to open.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..=20_000))]
    pub(crate) clients: u64,
    /// Holds to make while the streams are open (one event each).
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u64).range(1..=5000))]
    pub(crate) holds: u64,
    /// Holds per second.
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u64).range(1..=1000))]
    pub(crate) rate: u64,
    /// Streams being opened at once.
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u64).range(1..=4096))]
    pub(crate) connect_parallelism: u64,
}

fn parse_key_value(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_owned(), v.to_owned())),
        _ => Err(format!("expected KEY=VALUE, got {s:?}")),
    }
}

/// What a scenario needs of the replicas it runs against.
struct Setup<'a> {
    common: &'a Common,
    replicas: u64,
    /// Open descriptors the scenario needs, here and in the replicas.
    descriptors: u64,
    /// Replica environment of the scenario (the caller's --replica-env wins).
    env: Vec<(String, String)>,
    /// Files that must exist before anything is created: (what, path).
    inputs: Vec<(&'static str, PathBuf)>,
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.scenario {
        Scenario::Hold(args) => hold_scenario(args).await,
        Scenario::Pgbench(mut args) => {
            args.skip_service = true;
            args.skip_pgbench = false;
            hold_scenario(args).await
        }
        Scenario::Fanout(args) => {
            let setup = Setup {
                common: &args.common,
                replicas: args.common.replicas.unwrap_or(1),
                descriptors: args.clients + 1024,
                // Every stream comes from this one address.
                env: vec![
                    ("SSE_MAX_PER_IP".to_owned(), args.clients.to_string()),
                    ("RATE_LIMIT_IP".to_owned(), "0".to_owned()),
                ],
                inputs: Vec::new(),
            };
            with_replicas(setup, Run::Fanout(&args)).await
        }
        Scenario::Drop(args) => {
            let replicas = args.common.replicas.unwrap_or(2);
            let setup = Setup {
                common: &args.common,
                replicas,
                descriptors: 2 * args.connections * replicas + 1024,
                env: Vec::new(),
                inputs: Vec::new(),
            };
            with_replicas(setup, Run::Drop(&args)).await
        }
        Scenario::Plot(args) => report::plot(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench: error: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn hold_scenario(args: HoldArgs) -> Result<()> {
    if args.skip_service && args.skip_pgbench {
        return Err("--skip-service and --skip-pgbench leave nothing to run".into());
    }
    let mut inputs = Vec::new();
    if !args.skip_pgbench {
        inputs.push(("pgbench", args.pgbench.clone()));
        inputs.push(("pgbench script", pgbench::pgbench_script(&args)));
    }
    let setup = Setup {
        common: &args.common,
        replicas: args.common.replicas.unwrap_or(1),
        descriptors: 1024,
        env: vec![
            // Nothing expires during a run, and a sweep scans every pending
            // hold (see `hold`). --replica-env SWEEP_INTERVAL_MS=500 restores it.
            ("SWEEP_INTERVAL_MS".to_owned(), "60000".to_owned()),
            // The workers and their 5,000 guest tokens all come from this one
            // address, which the per-address abuse limit (1,000 requests/s)
            // would throttle: the run measures the hold, not the limit.
            ("RATE_LIMIT_IP".to_owned(), "0".to_owned()),
        ],
        inputs,
    };
    with_replicas(setup, Run::Hold(&args)).await
}

enum Run<'a> {
    Hold(&'a HoldArgs),
    Fanout(&'a FanoutArgs),
    Drop(&'a drop::DropArgs),
}

/// Creates the bench database and replicas, runs the scenario, and tears
/// everything down however it ends (error, Ctrl-C, SIGTERM).
async fn with_replicas(setup: Setup<'_>, run: Run<'_>) -> Result<()> {
    // Streams and connections need a descriptor each, here and in the
    // replicas (which inherit this limit), so raise it before anything is
    // spawned.
    let nofile = raise_nofile_limit(setup.descriptors);
    if nofile < setup.descriptors {
        eprintln!(
            "bench: warning: open-files limit is {nofile}, below the {} this run needs",
            setup.descriptors
        );
    }
    let mut env = BenchEnv::new(&setup.common.database_url);
    env.keep = setup.common.keep_database;
    let outcome = tokio::select! {
        r = async {
            let http = start(&setup, &mut env).await?;
            match run {
                Run::Hold(args) => hold::hold_mode(args, &env, &http).await,
                Run::Fanout(args) => fanout::sse_mode(args, &env, &http).await,
                Run::Drop(args) => drop::drop_mode(args, &env, &http).await,
            }
        } => r,
        _ = shutdown_signal() => Err("interrupted".into()),
    };
    env.teardown().await;
    outcome
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

async fn start(setup: &Setup<'_>, env: &mut BenchEnv) -> Result<reqwest::Client> {
    let binary = match &setup.common.binary {
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
    for (what, path) in &setup.inputs {
        if !path.is_file() {
            return Err(format!("no {what} at {} (see --help)", path.display()).into());
        }
    }
    env.create_database().await?;
    // Our defaults first: the caller's --replica-env entries come later and
    // win (a later `Command::env` overrides an earlier one).
    let mut extra_env = vec![("HOLD_SECONDS".to_owned(), hold::HOLD_SECONDS.to_string())];
    extra_env.extend(setup.env.iter().cloned());
    extra_env.extend(setup.common.replica_env.iter().cloned());
    for i in 0..setup.replicas as usize {
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
    Ok(http)
}
