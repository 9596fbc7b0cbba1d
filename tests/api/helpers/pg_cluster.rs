//! A private PostgreSQL cluster for one test (which may stop and restart it:
//! the shared server must never be touched), and a PgBouncer in
//! transaction mode in front of a server.
//!
//! PostgreSQL refuses to run as root and PgBouncer warns against it, so
//! when the tests run as root both run as the `postgres` user, as in
//! `deploy/test.sh`.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::process::{Child, Command};
use uuid::Uuid;

const PG_USER: &str = "postgres";

fn running_as_root() -> bool {
    // The owner of /proc/self is this process's effective uid; no libc needed.
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

/// The newest installed PostgreSQL's server binaries (Debian layout).
fn pg_bin_dir() -> PathBuf {
    if let Ok(dir) = std::env::var("SEATSYNC_TEST_PG_BIN") {
        return dir.into();
    }
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .expect("no /usr/lib/postgresql: install Debian's postgresql (deploy/test.sh does)")
        .flatten()
        .filter_map(|e| {
            let version = e.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").is_file().then_some((version, bin))
        })
        .collect();
    found.sort();
    found.pop().expect("no initdb under /usr/lib/postgresql").1
}

fn pgbouncer_binary() -> PathBuf {
    std::env::var("SEATSYNC_TEST_PGBOUNCER")
        .unwrap_or_else(|_| "/usr/sbin/pgbouncer".into())
        .into()
}

/// A port nobody listens on right now. Another process may take it before
/// our server binds it; start-up then times out naming its log.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind a free port")
        .port()
}

/// A fresh directory the server user may write to.
fn private_dir(what: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("seatsync-{what}-{}", Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).expect("create temp dir");
    if running_as_root() {
        let ok = std::process::Command::new("chown")
            .arg(format!("{PG_USER}:{PG_USER}"))
            .arg(&dir)
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "chown {} to {PG_USER}", dir.display());
    }
    dir
}

/// `program` as the server user: through `runuser` when we are root.
fn as_pg_user(program: &Path) -> std::process::Command {
    if running_as_root() {
        let mut cmd = std::process::Command::new("runuser");
        cmd.args(["-u", PG_USER, "--"]).arg(program);
        cmd
    } else {
        std::process::Command::new(program)
    }
}

async fn run_ok(cmd: std::process::Command, what: &str) {
    let mut cmd = Command::from(cmd);
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .await
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(
        out.status.success(),
        "{what} failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Connects and runs one simple query: a server that accepts TCP but is
/// still starting up or shutting down does not count.
async fn answers(url: &str) -> bool {
    let Ok(mut cfg) = url.parse::<tokio_postgres::Config>() else {
        return false;
    };
    cfg.connect_timeout(Duration::from_millis(500));
    let Ok(Ok((client, conn))) =
        tokio::time::timeout(Duration::from_secs(1), cfg.connect(tokio_postgres::NoTls)).await
    else {
        return false;
    };
    let driver = tokio::spawn(conn);
    let ok = tokio::time::timeout(Duration::from_secs(1), client.simple_query("SELECT 1"))
        .await
        .is_ok_and(|r| r.is_ok());
    drop(client);
    let _ = driver.await;
    ok
}

/// Polls `url` every 5 ms until it answers; the instant it first did.
async fn wait_answers(url: &str, timeout: Duration, log: &Path) -> Instant {
    let deadline = Instant::now() + timeout;
    loop {
        if answers(url).await {
            return Instant::now();
        }
        if Instant::now() >= deadline {
            panic!(
                "{url} did not answer within {timeout:?}; log {}:\n{}",
                log.display(),
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// A PostgreSQL cluster of one test's own, on a free port. Dropped, it is
/// stopped at once (`-m immediate`) and its directory removed.
pub struct PgCluster {
    dir: PathBuf,
    bin: PathBuf,
    pub port: u16,
}

impl PgCluster {
    pub async fn start() -> PgCluster {
        let bin = pg_bin_dir();
        let dir = private_dir("pg");
        let mut initdb = as_pg_user(&bin.join("initdb"));
        initdb.arg("-D").arg(dir.join("data")).args([
            "-U",
            PG_USER,
            "--auth=trust",
            "-E",
            "UTF8",
            "--no-sync",
        ]);
        let cluster = PgCluster {
            dir,
            bin,
            port: free_port(),
        };
        run_ok(initdb, "initdb").await;
        cluster.pg_ctl_start().await;
        wait_answers(
            &cluster.admin_url(),
            Duration::from_secs(30),
            &cluster.log(),
        )
        .await;
        cluster
    }

    /// A URL of the `postgres` database, for [`super::TestDb::create_on`].
    pub fn admin_url(&self) -> String {
        format!("postgres://{PG_USER}@127.0.0.1:{}/postgres", self.port)
    }

    /// The server log (`pg_ctl -l`).
    pub fn log(&self) -> PathBuf {
        self.dir.join("server.log")
    }

    fn pg_ctl(&self) -> std::process::Command {
        let mut cmd = as_pg_user(&self.bin.join("pg_ctl"));
        cmd.arg("-D").arg(self.dir.join("data"));
        cmd
    }

    /// Starts the server without waiting: `pg_ctl -w` polls only every
    /// 100 ms, and callers measure from the instant it answers.
    async fn pg_ctl_start(&self) {
        let mut cmd = self.pg_ctl();
        cmd.arg("-l")
            .arg(self.log())
            .arg("-W")
            .arg("-o")
            .arg(format!(
                "-p {} -c listen_addresses=127.0.0.1 -c unix_socket_directories='' -c fsync=off",
                self.port
            ));
        cmd.arg("start");
        run_ok(cmd, "pg_ctl start").await;
    }

    /// Stops the server (`-m fast`: sessions are cut, committed data is
    /// checkpointed), starts it again, and returns the instant it first
    /// accepted a connection and answered a query again.
    pub async fn restart(&self) -> Instant {
        let mut stop = self.pg_ctl();
        stop.args(["-m", "fast", "-w", "-t", "60", "stop"]);
        run_ok(stop, "pg_ctl stop").await;
        self.pg_ctl_start().await;
        wait_answers(&self.admin_url(), Duration::from_secs(30), &self.log()).await
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        let _ = self
            .pg_ctl()
            .args(["-m", "immediate", "-w", "stop"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A PgBouncer in transaction mode in front of one server, on a free port.
/// Dropped, it is killed and its directory removed.
pub struct PgBouncer {
    dir: PathBuf,
    child: Child,
    pub port: u16,
}

impl PgBouncer {
    /// Any database name through it reaches the same name on `server_host`:
    /// `server_port` (the `*` entry), as user `postgres` with trust auth.
    /// At most `server_pool` server connections per database: fewer than
    /// the clients, so a client's transactions land on different ones.
    pub async fn start(server_host: &str, server_port: u16, server_pool: u32) -> PgBouncer {
        let dir = private_dir("pgbouncer");
        let port = free_port();
        // trust still requires the user to be listed in auth_file.
        std::fs::write(dir.join("userlist.txt"), format!("\"{PG_USER}\" \"\"\n"))
            .expect("write userlist");
        // No ignore_startup_parameters: tokio-postgres sends only user,
        // database, client_encoding and application_name, all of which
        // PgBouncer 1.18 knows (extra_float_digits, which JDBC sends and
        // PgBouncer rejects by default, is not among them).
        let ini = format!(
            "[databases]\n\
             * = host={server_host} port={server_port}\n\
             [pgbouncer]\n\
             listen_addr = 127.0.0.1\n\
             listen_port = {port}\n\
             unix_socket_dir =\n\
             auth_type = trust\n\
             auth_file = {userlist}\n\
             pool_mode = transaction\n\
             default_pool_size = {server_pool}\n\
             max_client_conn = 1000\n\
             logfile = {log}\n\
             log_connections = 0\n\
             log_disconnections = 0\n",
            userlist = dir.join("userlist.txt").display(),
            log = dir.join("pgbouncer.log").display(),
        );
        let ini_path = dir.join("pgbouncer.ini");
        std::fs::write(&ini_path, ini).expect("write pgbouncer.ini");
        if running_as_root() {
            let ok = std::process::Command::new("chown")
                .arg("-R")
                .arg(format!("{PG_USER}:{PG_USER}"))
                .arg(&dir)
                .status()
                .is_ok_and(|s| s.success());
            assert!(ok, "chown {}", dir.display());
        }
        // setpriv execs PgBouncer in place (runuser would stay its parent),
        // so the child we kill on drop is PgBouncer itself.
        let mut cmd = if running_as_root() {
            let mut c = Command::new("setpriv");
            c.args([
                &format!("--reuid={PG_USER}"),
                &format!("--regid={PG_USER}"),
                "--init-groups",
                "--",
            ])
            .arg(pgbouncer_binary());
            c
        } else {
            Command::new(pgbouncer_binary())
        };
        cmd.arg(&ini_path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true);
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("start {}: {e}", pgbouncer_binary().display()));
        let bouncer = PgBouncer { dir, child, port };
        wait_answers(
            &bouncer.url("postgres"),
            Duration::from_secs(20),
            &bouncer.dir.join("pgbouncer.log"),
        )
        .await;
        bouncer
    }

    /// A URL of database `dbname` through this PgBouncer.
    pub fn url(&self, dbname: &str) -> String {
        format!("postgres://{PG_USER}@127.0.0.1:{}/{dbname}", self.port)
    }

    /// Kills it now: its server connections close with it.
    pub async fn kill(&mut self) {
        let _ = self.child.kill().await;
    }
}

impl Drop for PgBouncer {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
