//! PostgreSQL plumbing: the pool, migrations, and the one error type for
//! "the database did not do what we asked".

use std::future::Future;
use std::time::Duration;

use deadpool_postgres::{
    GenericClient, Manager, ManagerConfig, Object, Pool, RecyclingMethod, Runtime, Transaction,
};
use postgres_types::{ToSql, Type};
use tokio_postgres::{NoTls, Row};

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
    /// A statement that always returns a row returned none.
    #[error("no row returned by: {0}")]
    NoRow(&'static str),
    /// Data the schema's constraints should have kept out.
    #[error("unexpected data: {0}")]
    Unexpected(&'static str),
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

/// How statements reach the server (`DB_STATEMENTS`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum StatementMode {
    /// Named statements, prepared once per connection and cached: after
    /// the first use, one round trip per execution.
    #[default]
    Prepared,
    /// Unnamed statements: parse, bind and execute in one flight, nothing
    /// kept on the server connection. For transaction poolers (PgBouncer
    /// before 1.21) that hand each transaction to any server connection,
    /// where a named statement would be missing or already exist.
    Unnamed,
}

/// A statement and the types of its parameters. Declaring the types lets
/// it go out either way without asking the server to describe it first.
pub struct Sql {
    pub text: &'static str,
    pub types: &'static [Type],
}

/// The pool, and how its statements are sent.
#[derive(Clone)]
pub struct Db {
    pool: Pool,
    mode: StatementMode,
}

impl Db {
    pub fn new(pool: Pool, mode: StatementMode) -> Self {
        Self { pool, mode }
    }

    pub fn pool(&self) -> &Pool {
        &self.pool
    }

    pub async fn conn(&self) -> Result<Conn, DbError> {
        Ok(Conn {
            client: self.pool.get().await?,
            mode: self.mode,
        })
    }
}

/// A pooled connection.
pub struct Conn {
    client: Object,
    mode: StatementMode,
}

impl Conn {
    pub async fn transaction(&mut self) -> Result<Tx<'_>, DbError> {
        Ok(Tx {
            tx: self.client.transaction().await?,
            mode: self.mode,
        })
    }

    /// The simple query protocol: no statement at all, safe on any pooler.
    pub async fn ping(&self) -> Result<(), DbError> {
        self.client.simple_query("SELECT 1").await?;
        Ok(())
    }
}

/// A transaction on a pooled connection. Dropped without `commit`, it
/// rolls back.
pub struct Tx<'a> {
    tx: Transaction<'a>,
    mode: StatementMode,
}

impl Tx<'_> {
    /// Statements without parameters (savepoints), by the simple query
    /// protocol: nothing named is left on the connection.
    pub async fn batch(&self, sql: &str) -> Result<(), DbError> {
        Ok(self.tx.batch_execute(sql).await?)
    }

    pub async fn commit(self) -> Result<(), DbError> {
        Ok(self.tx.commit().await?)
    }

    pub async fn rollback(self) -> Result<(), DbError> {
        Ok(self.tx.rollback().await?)
    }
}

/// Runs [`Sql`] statements, on a connection or in a transaction.
pub trait Statements: Sync {
    fn query(
        &self,
        sql: &Sql,
        params: &[&(dyn ToSql + Sync)],
    ) -> impl Future<Output = Result<Vec<Row>, DbError>> + Send;

    /// The first row, if any.
    fn query_opt(
        &self,
        sql: &Sql,
        params: &[&(dyn ToSql + Sync)],
    ) -> impl Future<Output = Result<Option<Row>, DbError>> + Send {
        async move { Ok(self.query(sql, params).await?.into_iter().next()) }
    }

    /// The first row; none is an error.
    fn query_one(
        &self,
        sql: &Sql,
        params: &[&(dyn ToSql + Sync)],
    ) -> impl Future<Output = Result<Row, DbError>> + Send {
        async move {
            self.query_opt(sql, params)
                .await?
                .ok_or(DbError::NoRow(sql.text))
        }
    }
}

impl Statements for Conn {
    fn query(
        &self,
        sql: &Sql,
        params: &[&(dyn ToSql + Sync)],
    ) -> impl Future<Output = Result<Vec<Row>, DbError>> + Send {
        run(self.mode, &self.client, &**self.client, sql, params)
    }
}

impl Statements for Tx<'_> {
    fn query(
        &self,
        sql: &Sql,
        params: &[&(dyn ToSql + Sync)],
    ) -> impl Future<Output = Result<Vec<Row>, DbError>> + Send {
        run(self.mode, &self.tx, &*self.tx, sql, params)
    }
}

/// The one place that decides how a statement is sent: through deadpool's
/// statement cache (`cached`) or unnamed on the driver's client (`direct`),
/// two views of one connection.
async fn run<C, D>(
    mode: StatementMode,
    cached: &C,
    direct: &D,
    sql: &Sql,
    params: &[&(dyn ToSql + Sync)],
) -> Result<Vec<Row>, DbError>
where
    C: GenericClient + Sync,
    D: tokio_postgres::GenericClient + Sync,
{
    match mode {
        StatementMode::Prepared => {
            let statement = cached.prepare_typed_cached(sql.text, sql.types).await?;
            Ok(GenericClient::query(cached, &statement, params).await?)
        }
        StatementMode::Unnamed => {
            let typed: Vec<(&(dyn ToSql + Sync), Type)> = params
                .iter()
                .copied()
                .zip(sql.types.iter().cloned())
                .collect();
            Ok(tokio_postgres::GenericClient::query_typed(direct, sql.text, &typed).await?)
        }
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
        // A fan waiting in a ticket drop's queue is better served late than
        // refused; the request timeout (15 s by default) bounds it anyway.
        .wait_timeout(Some(Duration::from_secs(10)))
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
