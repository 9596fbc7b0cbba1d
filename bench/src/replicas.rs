//! Release replicas of the seatsync binary on the bench database (loopback
//! only, `PORT=0`), and the process limits they inherit from us.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use crate::env::BenchEnv;
use crate::{BoxError, Result};

/// `<dir of this executable>/seatsync`: the release binary of the same
/// target directory when run as `target/release/seatsync-bench` or with
/// `cargo run --release -p seatsync-bench`.
pub(crate) fn default_binary() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|d| d.join("seatsync")))
        .filter(|p| p.is_file())
        .unwrap_or_else(|| PathBuf::from("target/release/seatsync"))
}

pub(crate) struct Replica {
    pub(crate) child: Child,
    pub(crate) pid: u32,
    pub(crate) addr: SocketAddr,
    pub(crate) base: String,
}
pub(crate) async fn spawn_replica(
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

pub(crate) async fn wait_ready(http: &reqwest::Client, base: &str) -> Result<()> {
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

/// Raises the soft open-files limit to `need` (and the hard one, if allowed);
/// returns the soft limit in force.
pub(crate) fn raise_nofile_limit(need: u64) -> u64 {
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

pub(crate) fn vm_rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
        })
        .unwrap_or(0)
}
