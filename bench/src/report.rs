//! Results: the hold table and percentiles.

use crate::cpu::{num_cpus, CpuReport};

/// One row of the result table.
pub(crate) struct RunResult {
    pub(crate) name: String,
    pub(crate) rate: f64,
    pub(crate) latencies_us: Vec<u64>,
    pub(crate) errors: u64,
    pub(crate) transactions: u64,
    pub(crate) cpu: CpuReport,
}

pub(crate) fn print_table(results: &[&RunResult]) {
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

pub(crate) fn percentile(sorted: &[u64], q: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

pub(crate) fn percentile_i(sorted: &[i64], q: f64) -> i64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}
