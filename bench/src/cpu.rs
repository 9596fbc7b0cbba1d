//! CPU accounting: this process, the replicas, the bench database's
//! PostgreSQL backends (polled in `pg_stat_activity`), the whole machine.

use std::collections::HashMap;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::env::{pg_connect, BenchEnv};
use crate::Result;

#[derive(Debug, Default, Clone)]
pub(crate) struct CpuReport {
    /// This process and its reaped children (pgbench).
    pub(crate) load_ms: f64,
    pub(crate) replica_ms: f64,
    pub(crate) postgres_ms: f64,
    /// Fraction of all cores busy (any process).
    pub(crate) machine_busy: f64,
    /// What the bench database's busy backends were doing, in samples:
    /// `CPU` (active, not waiting), `Lock:transactionid`, `IO:WALSync`,
    /// `idle in tx` (waiting for the client's next statement), ...
    pub(crate) waits: Vec<(String, u64)>,
    /// Samples of backends (any state but idle).
    pub(crate) busy_samples: u64,
    /// Sampling rounds.
    pub(crate) polls: u64,
}

/// CPU ticks per backend pid (at first sight, latest) and a histogram of
/// backend states, from polling `pg_stat_activity` every 100 ms.
#[derive(Default)]
pub(crate) struct Backends {
    pub(crate) ticks: HashMap<i32, (u64, u64)>,
    pub(crate) waits: HashMap<String, u64>,
    pub(crate) busy_samples: u64,
    pub(crate) polls: u64,
}

pub(crate) struct CpuProbe {
    pub(crate) self_start: f64,
    pub(crate) replica_pids: Vec<u32>,
    pub(crate) replica_start: f64,
    pub(crate) machine_start: (u64, u64),
    pub(crate) poller: tokio::task::JoinHandle<Backends>,
    pub(crate) stop: CancellationToken,
}

impl CpuProbe {
    pub(crate) async fn begin(env: &BenchEnv) -> Result<Self> {
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

    pub(crate) async fn finish(self) -> CpuReport {
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
    pub(crate) async fn poll(&mut self, admin: &tokio_postgres::Client, db: &str, baseline: bool) {
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

pub(crate) fn clock_ticks() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

pub(crate) fn num_cpus() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// utime + stime of a process, in clock ticks.
pub(crate) fn proc_ticks(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which may contain spaces: state is field 3.
    let rest = &stat[stat.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

/// (utime, stime) of a process, in milliseconds.
pub(crate) fn proc_user_sys_ms(pid: i32) -> (f64, f64) {
    let parse = || -> Option<(u64, u64)> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        let rest = &stat[stat.rfind(')')? + 1..];
        let f: Vec<&str> = rest.split_whitespace().collect();
        Some((f.get(11)?.parse().ok()?, f.get(12)?.parse().ok()?))
    };
    let (user, sys) = parse().unwrap_or((0, 0));
    let ms = 1000.0 / clock_ticks();
    (user as f64 * ms, sys as f64 * ms)
}

pub(crate) fn proc_cpu_ms(pid: i32) -> f64 {
    proc_ticks(pid).unwrap_or(0) as f64 * 1000.0 / clock_ticks()
}

/// (busy, total) jiffies over all cores.
pub(crate) fn machine_ticks() -> (u64, u64) {
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

pub(crate) fn rusage_ms(who: libc::c_int) -> f64 {
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

/// CPU time of every process named `postgres` (the postmaster's reaped
/// children included, so backends that ended count too), in ms. The server
/// is shared, so this also counts other users' work: an upper bound.
pub(crate) fn postgres_processes_ms() -> f64 {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return 0.0;
    };
    let mut ticks = 0u64;
    for entry in dir.flatten() {
        let name = entry.file_name();
        let Some(pid) = name.to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
            continue;
        };
        if &stat[open + 1..close] != "postgres" {
            continue;
        }
        // utime, stime, cutime, cstime: fields 14-17, i.e. 12-15 after the state.
        let f: Vec<&str> = stat[close + 1..].split_whitespace().collect();
        ticks += (11..=14)
            .filter_map(|i| f.get(i)?.parse::<u64>().ok())
            .sum::<u64>();
    }
    ticks as f64 * 1000.0 / clock_ticks()
}
