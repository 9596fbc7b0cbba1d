//! **pgbench**: `deploy/bench/hold.pgbench` runs the service's hold
//! transaction statement for statement without HTTP, with pgbench (`-n -c C
//! -j 2 -T S`), on fresh schedules of the bench database: the ceiling the
//! service is measured against.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::process::Command;

use crate::cpu::CpuProbe;
use crate::env::BenchEnv;
use crate::hold::{HOLD_SECONDS, PAIRS, PAIRS_PER_ROW};
use crate::report::RunResult;
use crate::{HoldArgs, Result};

pub(crate) struct RemoveDirOnDrop(PathBuf);

impl Drop for RemoveDirOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub(crate) fn pgbench_script(args: &HoldArgs) -> PathBuf {
    args.pgbench_script.clone().unwrap_or_else(|| {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/bench/hold.pgbench")
    })
}

pub(crate) async fn pgbench_run(
    args: &HoldArgs,
    env: &BenchEnv,
    schedules: &[i64],
) -> Result<(RunResult, u64)> {
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
pub(crate) fn read_pgbench_logs(dir: &Path) -> Vec<u64> {
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
