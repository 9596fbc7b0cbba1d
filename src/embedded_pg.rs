//! The development default: a private PostgreSQL cluster in a project-local
//! directory, started from the machine's PostgreSQL binaries, so
//! `cargo run --release` works with no database set up.

use std::path::{Path, PathBuf};
use std::process::Stdio;

use tokio::process::Command;

#[derive(Debug, thiserror::Error)]
pub enum EmbeddedError {
    #[error("PostgreSQL binaries (initdb, pg_ctl) not found: install Debian's `postgresql` package or set DATABASE_URL")]
    BinariesMissing,
    #[error("{step} failed: {detail}")]
    Step { step: &'static str, detail: String },
    #[error("io error during {step}: {source}")]
    Io {
        step: &'static str,
        source: std::io::Error,
    },
}

/// A running private cluster; stopped by [`EmbeddedPostgres::stop`].
pub struct EmbeddedPostgres {
    bin_dir: PathBuf,
    pgdata: PathBuf,
    run_as_postgres: bool,
    pub url: String,
}

const DATABASE: &str = "seatsync";

/// The newest `/usr/lib/postgresql/<version>/bin`, else whatever is on PATH.
fn find_bin_dir() -> Option<PathBuf> {
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let v = e.file_name().to_string_lossy().parse::<u32>().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").exists().then_some((v, bin))
        })
        .collect();
    versions.sort();
    if let Some((_, bin)) = versions.pop() {
        return Some(bin);
    }
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .find(|p| p.join("initdb").exists() && p.join("pg_ctl").exists())
    })
}

fn is_root() -> bool {
    // PostgreSQL refuses to run as root; as root we run it as `postgres`.
    std::process::Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

impl EmbeddedPostgres {
    pub async fn start(data_dir: &Path, port: u16) -> Result<Self, EmbeddedError> {
        let bin_dir = find_bin_dir().ok_or(EmbeddedError::BinariesMissing)?;
        let base = std::env::current_dir()
            .map_err(|source| EmbeddedError::Io {
                step: "cwd",
                source,
            })?
            .join(data_dir);
        let pgdata = base.join("pgdata");
        std::fs::create_dir_all(&base).map_err(|source| EmbeddedError::Io {
            step: "create data dir",
            source,
        })?;
        let run_as_postgres = is_root();
        let me = Self {
            bin_dir,
            pgdata,
            run_as_postgres,
            url: format!("postgres://postgres@127.0.0.1:{port}/{DATABASE}"),
        };

        if !me.pgdata.join("PG_VERSION").exists() {
            if run_as_postgres {
                me.run(
                    "chown data dir",
                    Command::new("chown")
                        .arg("-R")
                        .arg("postgres:postgres")
                        .arg(&base),
                )
                .await?;
            }
            let initdb = me.bin_dir.join("initdb");
            let mut cmd = me.pg_command(&initdb);
            cmd.arg("-D").arg(&me.pgdata).args([
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
                "--no-sync",
            ]);
            me.run("initdb", &mut cmd).await?;
        }

        let mut status = me.pg_command(&me.bin_dir.join("pg_ctl"));
        status.arg("-D").arg(&me.pgdata).arg("status");
        let running = status
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .await
            .is_ok_and(|s| s.success());
        if !running {
            let mut start = me.pg_command(&me.bin_dir.join("pg_ctl"));
            start
                .arg("-D")
                .arg(&me.pgdata)
                .arg("-l")
                .arg(me.pgdata.join("server.log"))
                .arg("-o")
                .arg(format!("-p {port} -c listen_addresses=127.0.0.1 -c unix_socket_directories='' -c max_connections=200"))
                .args(["-w", "-t", "60", "start"]);
            me.run("pg_ctl start", &mut start).await?;
        }
        me.ensure_database(port).await?;
        Ok(me)
    }

    fn pg_command(&self, program: &Path) -> Command {
        if self.run_as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(program);
            c
        } else {
            Command::new(program)
        }
    }

    async fn run(&self, step: &'static str, cmd: &mut Command) -> Result<(), EmbeddedError> {
        let out = cmd
            .output()
            .await
            .map_err(|source| EmbeddedError::Io { step, source })?;
        if out.status.success() {
            Ok(())
        } else {
            Err(EmbeddedError::Step {
                step,
                detail: format!(
                    "{} {}",
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                )
                .trim()
                .to_owned(),
            })
        }
    }

    async fn ensure_database(&self, port: u16) -> Result<(), EmbeddedError> {
        let admin_url = format!("postgres://postgres@127.0.0.1:{port}/postgres");
        let step_err = |e: tokio_postgres::Error| EmbeddedError::Step {
            step: "create database",
            detail: e.to_string(),
        };
        let (client, conn) = tokio_postgres::connect(&admin_url, tokio_postgres::NoTls)
            .await
            .map_err(step_err)?;
        let driver = tokio::spawn(conn);
        let exists = client
            .query_opt("SELECT 1 FROM pg_database WHERE datname = $1", &[&DATABASE])
            .await
            .map_err(step_err)?
            .is_some();
        if !exists {
            // An identifier cannot be a parameter; DATABASE is a constant.
            client
                .batch_execute(&format!("CREATE DATABASE {DATABASE}"))
                .await
                .map_err(step_err)?;
        }
        drop(client);
        let _ = driver.await;
        Ok(())
    }

    /// Stops the cluster (fast mode: running transactions are rolled back).
    pub async fn stop(&self) {
        let mut stop = self.pg_command(&self.bin_dir.join("pg_ctl"));
        stop.arg("-D")
            .arg(&self.pgdata)
            .args(["-m", "fast", "-w", "stop"]);
        if let Err(e) = self.run("pg_ctl stop", &mut stop).await {
            tracing::warn!(error = %e, "stopping the embedded PostgreSQL failed");
        }
    }
}
