//! A `seatsync serve` process with its log captured, for tests that read
//! what it logs or how it exits (the usual [`super::Replica`] inherits its
//! stderr and must come up ready).

use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader, Lines};
use tokio::process::{Child, ChildStderr};

use super::seatsync_command;

pub struct LoggedReplica {
    child: Child,
    /// `http://127.0.0.1:<port>`, once it printed where it listens.
    pub base: String,
    stderr: Lines<BufReader<ChildStderr>>,
}

impl LoggedReplica {
    /// Starts a replica on `database_url` with `env` on top of the test
    /// defaults, and waits until it listens.
    pub async fn start(database_url: &str, env: &[(&str, &str)]) -> LoggedReplica {
        let mut cmd = seatsync_command(database_url);
        cmd.env("DB_POOL_SIZE", "2");
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn seatsync");
        let mut stdout = BufReader::new(child.stdout.take().expect("stdout")).lines();
        let base = tokio::time::timeout(Duration::from_secs(30), async {
            while let Ok(Some(line)) = stdout.next_line().await {
                if let Some(addr) = line.strip_prefix("seatsync listening on ") {
                    return addr.trim().to_owned();
                }
            }
            panic!("seatsync exited before listening");
        })
        .await
        .expect("listening within 30 s");
        tokio::spawn(async move { while let Ok(Some(_)) = stdout.next_line().await {} });
        let stderr = BufReader::new(child.stderr.take().expect("stderr")).lines();
        LoggedReplica {
            child,
            base,
            stderr,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    /// The next log line that satisfies `matches`, within `timeout`.
    pub async fn log_line(&mut self, timeout: Duration, matches: impl Fn(&str) -> bool) -> String {
        tokio::time::timeout(timeout, async {
            while let Ok(Some(line)) = self.stderr.next_line().await {
                if matches(&line) {
                    return line;
                }
            }
            panic!("the log ended before the line looked for");
        })
        .await
        .expect("the log line within the deadline")
    }

    /// Every log line until the process exits, and how it exited.
    pub async fn exit(mut self, timeout: Duration) -> (ExitStatus, Vec<String>) {
        tokio::time::timeout(timeout, async {
            let mut lines = Vec::new();
            while let Ok(Some(line)) = self.stderr.next_line().await {
                lines.push(line);
            }
            (self.child.wait().await.expect("wait"), lines)
        })
        .await
        .expect("the replica exits within the deadline")
    }
}
