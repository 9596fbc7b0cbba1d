//! A database of its own per test, and what tests read from it directly:
//! table invariants, the seat-event log, deadlock counts.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::Value;
use tokio_postgres::types::ToSql;
use uuid::Uuid;

use super::{seat_set, wait_for, Replica, ReplicaOpts, SeatSet};

fn admin_url() -> String {
    std::env::var("SEATSYNC_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

async fn admin_client(url: &str) -> tokio_postgres::Client {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .unwrap_or_else(|e| panic!("cannot reach PostgreSQL at {url}: {e}"));
    tokio::spawn(conn);
    client
}

fn to_url(cfg: &tokio_postgres::Config) -> String {
    let host = match cfg.get_hosts().first() {
        Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
        _ => "127.0.0.1".into(),
    };
    let port = cfg.get_ports().first().copied().unwrap_or(5432);
    let user = cfg.get_user().unwrap_or("postgres");
    let password = cfg
        .get_password()
        .map(|p| format!(":{}", String::from_utf8_lossy(p)))
        .unwrap_or_default();
    format!(
        "postgres://{user}{password}@{host}:{port}/{}",
        cfg.get_dbname().unwrap_or("postgres")
    )
}

/// Ends one backend of the server `pg` is connected to; whether it did.
pub async fn terminate_backend(
    pg: &tokio_postgres::Client,
    pid: i32,
) -> Result<bool, tokio_postgres::Error> {
    Ok(pg
        .query_one("SELECT pg_terminate_backend($1)", &[&pid])
        .await?
        .get(0))
}

/// A seat event, as the log and the stream carry it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoggedEvent {
    pub id: i64,
    pub action: String,
    pub seats: SeatSet,
}

/// A database of its own for one test, dropped when the test ends.
pub struct TestDb {
    pub name: String,
    pub url: String,
    admin: String,
    /// For the reads below; tests that need a session of their own (locks,
    /// transactions) take one from [`TestDb::client`].
    shared: tokio::sync::OnceCell<tokio_postgres::Client>,
}

impl TestDb {
    pub async fn create() -> Self {
        Self::create_on(&admin_url()).await
    }

    /// A database of its own on the server of `admin` (a URL of any
    /// database there), such as a private cluster a test restarts.
    pub async fn create_on(admin: &str) -> Self {
        let admin = admin.to_owned();
        let name = format!("seatsync_test_{}", Uuid::new_v4().simple());
        admin_client(&admin)
            .await
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .expect("create test db");
        let mut cfg: tokio_postgres::Config = admin.parse().expect("admin url");
        cfg.dbname(&name);
        let url = to_url(&cfg);
        TestDb {
            name,
            url,
            admin,
            shared: tokio::sync::OnceCell::new(),
        }
    }

    /// A fresh database with one replica on it: where most tests start.
    pub async fn with_replica(opts: ReplicaOpts) -> (TestDb, Replica) {
        let db = TestDb::create().await;
        let r = Replica::spawn(&db, opts).await;
        (db, r)
    }

    /// A fresh database with two replicas of the same settings, started
    /// together.
    pub async fn with_two_replicas(opts: ReplicaOpts) -> (TestDb, Replica, Replica) {
        let db = TestDb::create().await;
        let (a, b) = tokio::join!(Replica::spawn(&db, opts.clone()), Replica::spawn(&db, opts));
        (db, a, b)
    }

    /// A client on the test database (for assertions and fault injection).
    pub async fn client(&self) -> tokio_postgres::Client {
        admin_client(&self.url).await
    }

    async fn shared(&self) -> &tokio_postgres::Client {
        self.shared.get_or_init(|| self.client()).await
    }

    /// The single integer `sql` selects, such as a `count(*)`.
    pub async fn count(&self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> i64 {
        self.shared()
            .await
            .query_one(sql, params)
            .await
            .unwrap()
            .get(0)
    }

    /// Waits until `sql` counts `want`; panics naming `what` at the deadline.
    pub async fn wait_count(
        &self,
        what: &str,
        timeout: Duration,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
        want: i64,
    ) {
        wait_for(what, timeout, || async {
            (self.count(sql, params).await == want).then_some(())
        })
        .await;
    }

    /// `PENDING` holds of `schedule` past their expiry by the database
    /// clock: expired, and not released yet.
    pub async fn overdue_holds(&self, schedule: i64) -> i64 {
        self.count(
            "SELECT count(*) FROM bookings WHERE schedule_id = $1 AND status = 'PENDING' \
             AND expires_at <= clock_timestamp()",
            &[&schedule],
        )
        .await
    }

    /// Waits until the database clock, which holds expire by, is past `t`.
    pub async fn wait_clock_past(&self, t: DateTime<Utc>) {
        let c = self.shared().await;
        let left = (t - Utc::now()).to_std().unwrap_or_default();
        wait_for(
            &format!("the database clock to pass {t}"),
            left + Duration::from_secs(10),
            || async {
                let past: bool = c
                    .query_one("SELECT clock_timestamp() > $1", &[&t])
                    .await
                    .unwrap()
                    .get(0);
                past.then_some(())
            },
        )
        .await;
    }

    /// Seats held by more than one booking (must always be 0) — checked
    /// directly in the tables, not through the API.
    pub async fn assert_consistent(&self) {
        let dup = self
            .count(
                "SELECT count(*) FROM (SELECT schedule_id, row_num, col_num FROM schedule_seat_status \
                 GROUP BY 1, 2, 3 HAVING count(*) > 1) d",
                &[],
            )
            .await;
        assert_eq!(dup, 0, "a seat is held twice");
        // Every seat row belongs to a live booking of the same schedule.
        let orphans = self
            .count(
                "SELECT count(*) FROM schedule_seat_status st JOIN bookings b ON b.id = st.booking_id \
                 WHERE b.status NOT IN ('PENDING', 'CONFIRMED') OR b.schedule_id <> st.schedule_id \
                 OR (b.status = 'CONFIRMED') <> (st.status = 'CONFIRMED')",
                &[],
            )
            .await;
        assert_eq!(orphans, 0, "seat rows disagree with their bookings");
        // Every live booking holds exactly its seats.
        let mismatched = self
            .count(
                "SELECT count(*) FROM bookings b WHERE b.status IN ('PENDING', 'CONFIRMED') AND \
                 jsonb_array_length(b.seats) <> (SELECT count(*) FROM schedule_seat_status st WHERE st.booking_id = b.id)",
                &[],
            )
            .await;
        assert_eq!(
            mismatched, 0,
            "a live booking does not hold exactly its seats"
        );
    }

    /// The `seat_events` rows of a schedule in id order, read from the table.
    pub async fn logged_seat_events(&self, schedule: i64) -> Vec<LoggedEvent> {
        let rows = self
            .shared()
            .await
            .query(
                "SELECT event_id, action, seats FROM seat_events WHERE schedule_id = $1 ORDER BY event_id",
                &[&schedule],
            )
            .await
            .unwrap();
        rows.iter()
            .map(|r| LoggedEvent {
                id: r.get(0),
                action: r.get(1),
                seats: seat_set(&r.get::<_, Value>(2)),
            })
            .collect()
    }

    /// Deadlocks PostgreSQL detected in this database. Kills `replicas`
    /// first and waits for their backends to exit, since a backend reports
    /// its counts when it ends.
    pub async fn deadlocks_after_shutdown(&self, replicas: Vec<Replica>) -> i64 {
        for mut r in replicas {
            r.kill().await;
        }
        self.wait_count(
            "the replicas' connections to close",
            Duration::from_secs(10),
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() \
             AND application_name = 'seatsync'",
            &[],
            0,
        )
        .await;
        self.count(
            "SELECT deadlocks FROM pg_stat_database WHERE datname = current_database()",
            &[],
        )
        .await
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let admin = self.admin.clone();
        let name = self.name.clone();
        // Drop runs outside async; a short-lived runtime on its own thread.
        let _ = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async move {
                if let Ok((c, conn)) = tokio_postgres::connect(&admin, tokio_postgres::NoTls).await
                {
                    tokio::spawn(conn);
                    let _ = c
                        .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                        .await;
                }
            });
        })
        .join();
    }
}
