//! PostgreSQL plumbing: the pool, migrations, and the one error type for
//! "the database did not do what we asked".

use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Object, Pool, RecyclingMethod, Runtime};
use tokio_postgres::NoTls;

refinery::embed_migrations!("sql");

/// Taken around migrations so replicas that start together apply them once.
const MIGRATION_LOCK_KEY: i64 = 0x5ea7_5c00;
const LOCK_MIGRATIONS: &str = "SELECT pg_advisory_lock($1)";
const UNLOCK_MIGRATIONS: &str = "SELECT pg_advisory_unlock($1)";

/// The database failed or could not be reached. Never the caller's fault.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("database error: {}", one_line_chain(.0))]
    Postgres(#[from] tokio_postgres::Error),
    #[error("no database connection: {0}")]
    Pool(#[from] deadpool_postgres::PoolError),
    #[error("migration failed: {0}")]
    Migration(#[from] refinery::Error),
    /// A transaction lost a race it can win on a second try.
    #[error("transaction lost a race: {0}")]
    Contended(&'static str),
    /// A long-lived connection (the listener's) ended or stopped answering.
    #[error("connection lost: {0}")]
    ConnectionLost(&'static str),
    #[error("invalid database configuration: {0}")]
    Config(String),
}

/// An error and its causes as one line. tokio-postgres shows only its own
/// kind ("error connecting to server", "db error"); the cause is what an
/// operator needs ("Connection refused", "database \"x\" does not exist").
pub fn one_line_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        out.push_str(": ");
        out.push_str(&c.to_string());
        cause = c.source();
    }
    out.split_whitespace().collect::<Vec<_>>().join(" ")
}

impl DbError {
    /// The SQLSTATE, when PostgreSQL itself reported the error.
    pub fn sqlstate(&self) -> Option<&tokio_postgres::error::SqlState> {
        match self {
            DbError::Postgres(e) => e.code(),
            _ => None,
        }
    }
}

/// `FromSql` for an enum stored as text under a CHECK constraint, through
/// its `parse`: a value the constraint should have kept out is an error,
/// never a guess.
#[macro_export]
macro_rules! text_enum_from_sql {
    ($ty:ty, $what:literal) => {
        impl<'a> postgres_types::FromSql<'a> for $ty {
            fn from_sql(
                ty: &postgres_types::Type,
                raw: &'a [u8],
            ) -> Result<Self, Box<dyn std::error::Error + Sync + Send>> {
                let s = <&str as postgres_types::FromSql>::from_sql(ty, raw)?;
                Self::parse(s).ok_or_else(|| format!(concat!("unknown ", $what, " {:?}"), s).into())
            }

            fn accepts(ty: &postgres_types::Type) -> bool {
                <&str as postgres_types::FromSql>::accepts(ty)
            }
        }
    };
}

/// Pool checkout with the error type of this module.
pub struct PgConn;

impl PgConn {
    pub async fn get(pool: &Pool) -> Result<Object, DbError> {
        Ok(pool.get().await?)
    }
}

/// Parses a URL and turns on TCP keepalive, so a half-open connection to a
/// vanished server is noticed in seconds rather than hours.
pub fn pg_config(url: &str) -> Result<tokio_postgres::Config, DbError> {
    let mut cfg: tokio_postgres::Config = url
        .parse()
        .map_err(|e: tokio_postgres::Error| DbError::Config(e.to_string()))?;
    cfg.keepalives(true)
        .keepalives_idle(Duration::from_secs(10))
        .keepalives_interval(Duration::from_secs(5))
        .keepalives_retries(3)
        .connect_timeout(Duration::from_secs(5));
    if cfg.get_application_name().is_none() {
        cfg.application_name("seatsync");
    }
    Ok(cfg)
}

pub fn build_pool(url: &str, size: usize) -> Result<Pool, DbError> {
    let cfg = pg_config(url)?;
    let manager = Manager::from_config(
        cfg,
        NoTls,
        ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        },
    );
    Pool::builder(manager)
        .max_size(size)
        .runtime(Runtime::Tokio1)
        .wait_timeout(Some(Duration::from_secs(5)))
        .create_timeout(Some(Duration::from_secs(5)))
        .recycle_timeout(Some(Duration::from_secs(5)))
        .build()
        .map_err(|e| DbError::Config(e.to_string()))
}

/// Applies pending migrations under a session advisory lock: replicas that
/// start at the same moment queue up, and all but the first find nothing to do.
pub async fn migrate(url: &str) -> Result<usize, DbError> {
    let cfg = pg_config(url)?;
    let (mut client, connection) = cfg.connect(NoTls).await?;
    let driver = tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::warn!(error = %e, "migration connection ended");
        }
    });
    client
        .execute(LOCK_MIGRATIONS, &[&MIGRATION_LOCK_KEY])
        .await?;
    let report = migrations::runner().run_async(&mut client).await;
    // The lock dies with the session anyway; unlocking just lets the next
    // replica go on at once.
    let _ = client
        .execute(UNLOCK_MIGRATIONS, &[&MIGRATION_LOCK_KEY])
        .await;
    drop(client);
    let _ = driver.await;
    Ok(report?.applied_migrations().len())
}
