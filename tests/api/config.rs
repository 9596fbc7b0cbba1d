//! Bad configuration stops the real binary at start-up, quickly, with one
//! clear line naming the setting; `seatsync migrate` applies the schema
//! once, however often and however concurrently it is run.

use std::ffi::{OsStr, OsString};
use std::fmt::Debug;
use std::os::unix::ffi::OsStringExt;
use std::process::{ExitStatus, Stdio};
use std::time::{Duration, Instant};

use futures::future::join_all;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

use crate::helpers::*;

/// What a finished run of the binary left behind.
#[derive(Debug)]
struct Run {
    status: ExitStatus,
    stdout: String,
    stderr: String,
    took: Duration,
}

impl Run {
    /// The non-empty lines of stderr.
    fn error_lines(&self) -> Vec<&str> {
        self.stderr
            .lines()
            .filter(|l| !l.trim().is_empty())
            .collect()
    }
}

/// Runs `seatsync args...` with exactly `env` (plus PATH), bounded in time.
async fn run<V: AsRef<OsStr> + Debug>(args: &[&str], env: &[(&str, V)]) -> Run {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_seatsync"));
    cmd.args(args)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let started = Instant::now();
    let child = cmd.spawn().expect("spawn seatsync");
    let out = tokio::time::timeout(Duration::from_secs(20), child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("seatsync {args:?} with {env:?} did not exit within 20 s"))
        .expect("wait for seatsync");
    Run {
        status: out.status,
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        took: started.elapsed(),
    }
}

/// A valid serving configuration on `db`, on a free local port: each case
/// below breaks exactly one thing in it.
fn base_env(db: &TestDb) -> Vec<(&'static str, String)> {
    vec![
        ("DATABASE_URL", db.url.clone()),
        ("AUTH_SECRET", AUTH_SECRET.into()),
        ("ADMIN_TOKEN", ADMIN_TOKEN.into()),
        ("HOST", "127.0.0.1".into()),
        ("PORT", "0".into()),
    ]
}

/// `base` with `set` overriding (an empty value removes the variable).
fn env_with<'a>(
    base: &'a [(&'static str, String)],
    set: &'a [(&'static str, &'a str)],
) -> Vec<(&'a str, &'a str)> {
    let mut env: Vec<(&str, &str)> = base
        .iter()
        .filter(|(k, _)| !set.iter().any(|(s, _)| s == k))
        .map(|(k, v)| (*k, v.as_str()))
        .collect();
    env.extend(set.iter().filter(|(_, v)| !v.is_empty()).copied());
    env
}

/// One clear line, naming `setting`, a non-zero exit, and no panic.
fn assert_refused(run: &Run, what: &str, setting: &str) {
    assert!(
        !run.status.success(),
        "{what}: exited successfully: {run:?}"
    );
    assert!(
        run.took < Duration::from_secs(6),
        "{what}: took {:?} to give up",
        run.took
    );
    let lines = run.error_lines();
    assert_eq!(lines.len(), 1, "{what}: want one line on stderr: {run:?}");
    let line = lines[0];
    assert!(
        line.starts_with("seatsync: "),
        "{what}: not a seatsync message: {line}"
    );
    assert!(
        line.contains(setting),
        "{what}: does not name {setting}: {line}"
    );
    assert!(!line.contains("panicked"), "{what}: {line}");
    assert!(
        !run.stdout.contains("listening"),
        "{what}: it started serving: {run:?}"
    );
}

#[tokio::test]
async fn bad_settings_stop_the_process_with_one_clear_line() {
    let db = TestDb::create().await;
    let base = base_env(&db);
    let no_db = "postgres://postgres@127.0.0.1:1/seatsync";
    let missing_db = db.url.replace(&db.name, "seatsync_no_such_database");
    // (what, the settings changed, the setting the error must name)
    type Case<'a> = (&'a str, Vec<(&'static str, &'a str)>, &'a str);
    let cases: Vec<Case<'_>> = vec![
        ("PORT=abc", vec![("PORT", "abc")], "PORT"),
        ("PORT=70000", vec![("PORT", "70000")], "PORT"),
        ("PORT=-1", vec![("PORT", "-1")], "PORT"),
        ("HOST=nowhere", vec![("HOST", "nowhere")], "HOST"),
        (
            "HOLD_SECONDS=0",
            vec![("HOLD_SECONDS", "0")],
            "HOLD_SECONDS",
        ),
        (
            "HOLD_SECONDS=5m",
            vec![("HOLD_SECONDS", "5m")],
            "HOLD_SECONDS",
        ),
        (
            "MAX_SEATS_PER_BOOKING=1000",
            vec![("MAX_SEATS_PER_BOOKING", "1000")],
            "MAX_SEATS_PER_BOOKING",
        ),
        (
            "MAX_SEATS_PER_BOOKING=0",
            vec![("MAX_SEATS_PER_BOOKING", "0")],
            "MAX_SEATS_PER_BOOKING",
        ),
        (
            "HEARTBEAT_SECONDS=0",
            vec![("HEARTBEAT_SECONDS", "0")],
            "HEARTBEAT_SECONDS",
        ),
        (
            "AUTH_GUEST=maybe",
            vec![("AUTH_GUEST", "maybe")],
            "AUTH_GUEST",
        ),
        ("no AUTH_SECRET", vec![("AUTH_SECRET", "")], "AUTH_SECRET"),
        (
            "short AUTH_SECRET",
            vec![("AUTH_SECRET", "too-short")],
            "AUTH_SECRET",
        ),
        (
            "short ADMIN_TOKEN",
            vec![("ADMIN_TOKEN", "admin")],
            "ADMIN_TOKEN",
        ),
        (
            "TOKEN_TTL_SECONDS=5",
            vec![("TOKEN_TTL_SECONDS", "5")],
            "TOKEN_TTL_SECONDS",
        ),
        (
            "DB_POOL_SIZE=0",
            vec![("DB_POOL_SIZE", "0")],
            "DB_POOL_SIZE",
        ),
        (
            "DATABASE_URL not a URL",
            vec![("DATABASE_URL", "not a url")],
            "DATABASE_URL",
        ),
        (
            "DATABASE_URL with a bad port",
            vec![("DATABASE_URL", "postgres://postgres@127.0.0.1:notaport/db")],
            "DATABASE_URL",
        ),
        (
            "DATABASE_URL of another database system",
            vec![("DATABASE_URL", "mysql://root@127.0.0.1/seatsync")],
            "DATABASE_URL",
        ),
        (
            "LISTEN_DATABASE_URL not a URL",
            vec![("LISTEN_DATABASE_URL", "postgres://x:y:z")],
            "LISTEN_DATABASE_URL",
        ),
        (
            "DATABASE_URL nobody listens on",
            vec![("DATABASE_URL", no_db)],
            "DATABASE_URL",
        ),
        (
            "DATABASE_URL naming a missing database",
            vec![("DATABASE_URL", missing_db.as_str())],
            "DATABASE_URL",
        ),
    ];
    let runs = join_all(cases.iter().map(|(_, set, _)| {
        let env = env_with(&base, set);
        async move { run(&[], &env).await }
    }))
    .await;
    for ((what, _, setting), r) in cases.iter().zip(&runs) {
        assert_refused(r, what, setting);
    }
    // The cause is in the line, not just "error connecting".
    let unreachable = &runs[runs.len() - 2];
    assert!(
        unreachable.stderr.to_lowercase().contains("refused"),
        "{}",
        unreachable.stderr
    );
    let missing = &runs[runs.len() - 1];
    assert!(
        missing.stderr.contains("does not exist"),
        "{}",
        missing.stderr
    );

    // A value that is not even UTF-8 is named too.
    for setting in ["PORT", "DATABASE_URL"] {
        let mut env: Vec<(&str, OsString)> = base
            .iter()
            .filter(|(k, _)| *k != setting)
            .map(|(k, v)| (*k, OsString::from(v)))
            .collect();
        env.push((setting, OsString::from_vec(b"5432\xff".to_vec())));
        let r = run(&[], &env).await;
        assert_refused(&r, &format!("{setting} not UTF-8"), setting);
    }
    // So is a command that does not exist.
    let env = env_with(&base, &[]);
    let r = run(&["frobnicate"], &env).await;
    assert_refused(&r, "an unknown command", "frobnicate");

    // Control: the same base configuration does start.
    let ok = Replica::spawn(&db, ReplicaOpts::default()).await;
    assert!(ok.ready().await);
}

#[tokio::test]
async fn a_taken_port_stops_the_process_with_a_clear_line() {
    let db = TestDb::create().await;
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port().to_string();
    let base = base_env(&db);
    let set = [("PORT", port.as_str()), ("RUST_LOG", "warn")];
    let env = env_with(&base, &set);
    let r = run(&[], &env).await;
    assert!(!r.status.success(), "{r:?}");
    let lines = r.error_lines();
    let last = lines.last().copied().unwrap_or("");
    assert!(
        last.starts_with("seatsync: ") && last.contains(&port),
        "the last line should name the port: {r:?}"
    );
    drop(taken);
}

#[tokio::test]
async fn migrate_applies_once_and_needs_only_the_database() {
    let db = TestDb::create().await;
    let url = db.url.clone();
    let env = [("DATABASE_URL", url.as_str())];

    let first = run(&["migrate"], &env).await;
    assert!(first.status.success(), "{first:?}");
    assert_eq!(applied(&first), migration_count(), "{first:?}");
    // The schema is there.
    let tables = db
        .count(
            "SELECT count(*) FROM information_schema.tables WHERE table_schema = 'public' \
             AND table_name IN ('schedules', 'bookings', 'schedule_seat_status', 'seat_events')",
            &[],
        )
        .await;
    assert_eq!(tables, 4);

    let second = run(&["migrate"], &env).await;
    assert!(second.status.success(), "{second:?}");
    assert_eq!(applied(&second), 0, "{second:?}");

    // A replica starts on the migrated database and works.
    let r = Replica::spawn(&db, ReplicaOpts::default()).await;
    let schedule = r.create_schedule(2, 2, &[]).await;
    let token = r.guest().await;
    r.hold(&token, schedule, &[(1, 1)]).await;
    db.assert_consistent().await;

    // Without a database, or with one that cannot be reached: one clear line.
    let none = run::<&str>(&["migrate"], &[]).await;
    assert_refused(&none, "migrate without DATABASE_URL", "DATABASE_URL");
    let unreachable = run(
        &["migrate"],
        &[("DATABASE_URL", "postgres://postgres@127.0.0.1:1/seatsync")],
    )
    .await;
    assert_refused(&unreachable, "migrate on a closed port", "DATABASE_URL");
}

#[tokio::test]
async fn concurrent_migrations_both_succeed_and_apply_once() {
    let db = TestDb::create().await;
    let url = db.url.clone();
    let env = [("DATABASE_URL", url.as_str())];
    let runs = join_all((0..3).map(|_| run(&["migrate"], &env))).await;
    for r in &runs {
        assert!(r.status.success(), "{r:?}");
    }
    let total: usize = runs.iter().map(applied).sum();
    assert_eq!(
        total,
        migration_count(),
        "exactly one run applies each migration: {runs:?}"
    );
    let history = db
        .count("SELECT count(*) FROM refinery_schema_history", &[])
        .await;
    assert_eq!(history, migration_count() as i64);
}

/// The migrations in `sql/` (`V<n>__<name>.sql`).
fn migration_count() -> usize {
    std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/sql"))
        .expect("sql/")
        .filter_map(Result::ok)
        .filter(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            name.starts_with('V') && name.contains("__") && name.ends_with(".sql")
        })
        .count()
}

/// The count `seatsync migrate` reports on stdout.
fn applied(run: &Run) -> usize {
    run.stdout
        .lines()
        .find_map(|l| {
            l.strip_prefix("seatsync: ")?
                .strip_suffix(" migration(s) applied")?
                .parse()
                .ok()
        })
        .unwrap_or_else(|| panic!("no count of applied migrations in {run:?}"))
}

/// A log collector that went away must not take the replica down with it:
/// with stderr closed, it still starts, serves and stops cleanly.
#[tokio::test]
async fn a_closed_stderr_neither_crashes_nor_hangs_the_replica() {
    let db = TestDb::create().await;
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_seatsync"));
    cmd.env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .envs(base_env(&db))
        .env("RUST_LOG", "debug")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = cmd.spawn().unwrap();
    // Close the read end at once: every log line now hits a broken pipe.
    drop(child.stderr.take());
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let base = tokio::time::timeout(Duration::from_secs(20), async {
        while let Ok(Some(line)) = lines.next_line().await {
            if let Some(addr) = line.strip_prefix("seatsync listening on ") {
                return Some(addr.trim().to_owned());
            }
        }
        None
    })
    .await
    .expect("no listening line within 20 s");
    let Some(base) = base else {
        let status = child.wait().await.unwrap();
        panic!("seatsync died before listening: {status}");
    };
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    let http = reqwest::Client::new();
    wait_for("ready", Duration::from_secs(10), || async {
        let r = http.get(format!("{base}/readyz")).send().await.ok()?;
        (r.status() == 200).then_some(())
    })
    .await;
    let g = http
        .post(format!("{base}/api/auth/guest"))
        .send()
        .await
        .unwrap();
    assert_eq!(g.status(), 201);
    let pid = child.id().unwrap().to_string();
    std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    let status = tokio::time::timeout(Duration::from_secs(10), child.wait())
        .await
        .expect("no exit within 10 s of SIGTERM")
        .unwrap();
    assert!(status.success(), "{status}");
}
