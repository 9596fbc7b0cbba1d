//! Typed configuration, read once at start-up from flags and the environment.
//!
//! Every field can be set by a flag or by the environment variable named in
//! its `env` attribute (the README's configuration table lists them all).
//! Values are validated here, so a bad setting stops the
//! process with one clear line instead of failing later under load.

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::db::StatementMode;
use crate::telemetry::LogFormat;

/// The most seats one booking may ask for. The `OCCUPIED` NOTIFY payload
/// carries every seat of a booking and must stay far below PostgreSQL's
/// 8000-byte limit; 100 seats is about 2.5 KB.
pub const MAX_SEATS_LIMIT: u16 = 100;

#[derive(Debug, Parser)]
#[command(
    name = "seatsync",
    version,
    about = "Seat reservation service with real-time seat maps"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub config: Config,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run a replica (the default).
    Serve,
    /// Apply the migrations in `sql/` and exit.
    Migrate,
}

#[derive(Debug, Clone, Args)]
pub struct Config {
    /// PostgreSQL for the pool. Unset: start the embedded private cluster
    /// (development default) under `--data-dir`.
    #[arg(long, env = "DATABASE_URL", global = true)]
    pub database_url: Option<String>,

    /// Direct connection for LISTEN and for the migrations' session lock.
    /// Must not go through a transaction pooler, where LISTEN silently does
    /// nothing and a session lock is not held. Defaults to DATABASE_URL.
    #[arg(long, env = "LISTEN_DATABASE_URL", global = true)]
    pub listen_database_url: Option<String>,

    /// Log lines as `text` (for people) or `json` (one object per line, with
    /// the request id of every line logged while serving a request).
    #[arg(long, env = "LOG_FORMAT", value_enum, default_value_t = LogFormat::Text, global = true)]
    pub log_format: LogFormat,

    /// How pooled statements are sent: `prepared` (named, cached per
    /// connection) or `unnamed` (parse, bind and execute in one flight,
    /// nothing kept on the server connection), for a DATABASE_URL through
    /// PgBouncer's transaction mode before 1.21. Unset: `unnamed` when
    /// LISTEN_DATABASE_URL names another server than DATABASE_URL (the
    /// pooler set-up), else `prepared`.
    #[arg(long, env = "DB_STATEMENTS", value_enum, global = true)]
    pub db_statements: Option<StatementMode>,

    /// Address to bind.
    #[arg(long, env = "HOST", default_value = "0.0.0.0", global = true)]
    pub host: IpAddr,

    /// Port to bind; 0 picks a free one (the bound address is printed).
    #[arg(long, env = "PORT", default_value_t = 8080, global = true)]
    pub port: u16,

    /// How long a hold lasts before it expires, in seconds.
    #[arg(long, env = "HOLD_SECONDS", default_value_t = 300,
          value_parser = clap::value_parser!(u32).range(1..=86_400), global = true)]
    pub hold_seconds: u32,

    /// Most seats in one booking.
    #[arg(long, env = "MAX_SEATS_PER_BOOKING", default_value_t = 4,
          value_parser = clap::value_parser!(u16).range(1..=MAX_SEATS_LIMIT as i64), global = true)]
    pub max_seats_per_booking: u16,

    /// Silence after which an SSE stream gets a heartbeat comment. Must stay
    /// below every idle timeout between browser and replica (nginx: 60 s).
    #[arg(long, env = "HEARTBEAT_SECONDS", default_value_t = 45,
          value_parser = clap::value_parser!(u32).range(1..=3_600), global = true)]
    pub heartbeat_seconds: u32,

    /// HS256 secret for user tokens, shared by every replica. Required unless
    /// the embedded development database is used.
    #[arg(long, env = "AUTH_SECRET", hide_env_values = true, global = true)]
    pub auth_secret: Option<String>,

    /// Whether `POST /api/auth/guest` issues tokens.
    #[arg(long, env = "AUTH_GUEST", default_value_t = true, action = clap::ArgAction::Set,
          value_parser = clap::builder::BoolishValueParser::new(), global = true)]
    pub auth_guest: bool,

    /// Lifetime of a guest token, in seconds.
    #[arg(long, env = "TOKEN_TTL_SECONDS", default_value_t = 86_400,
          value_parser = clap::value_parser!(u32).range(60..=31_536_000), global = true)]
    pub token_ttl_seconds: u32,

    /// Bearer token for admin endpoints. Unset: admin endpoints answer 403.
    #[arg(long, env = "ADMIN_TOKEN", hide_env_values = true, global = true)]
    pub admin_token: Option<String>,

    /// Connections in this replica's pool.
    #[arg(long, env = "DB_POOL_SIZE", default_value_t = 16,
          value_parser = clap::value_parser!(u32).range(1..=1_000), global = true)]
    pub db_pool_size: u32,

    /// Hold transactions of one showing at once on this replica; the rest
    /// of its starts queue, and the other showings keep the remaining
    /// connections. 0: three quarters of DB_POOL_SIZE.
    #[arg(long, env = "HOLD_CONCURRENCY_PER_SHOW", default_value_t = 0,
          value_parser = clap::value_parser!(u32).range(0..=1_000), global = true)]
    pub hold_concurrency_per_show: u32,

    /// How often the sweeper looks for expired holds, in milliseconds. Holds
    /// are released within this interval (plus one transaction) of expiry.
    #[arg(long, env = "SWEEP_INTERVAL_MS", default_value_t = 500,
          value_parser = clap::value_parser!(u32).range(10..=60_000), global = true)]
    pub sweep_interval_ms: u32,

    /// How long seat events stay in the log for resuming streams, in seconds.
    #[arg(long, env = "EVENT_RETENTION_SECONDS", default_value_t = 3_600,
          value_parser = clap::value_parser!(u32).range(1..=31_536_000), global = true)]
    pub event_retention_seconds: u32,

    /// Most SSE streams this replica serves at once; above it new streams get 503.
    #[arg(long, env = "SSE_MAX_CONNECTIONS", default_value_t = 20_000,
          value_parser = clap::value_parser!(u32).range(1..=1_000_000), global = true)]
    pub sse_max_connections: u32,

    /// Most SSE streams one client address may hold on this replica. High
    /// on purpose: thousands of fans can share one address (stadium Wi-Fi,
    /// carrier NAT); it only stops one address taking a replica's streams.
    #[arg(long, env = "SSE_MAX_PER_IP", default_value_t = 2_000,
          value_parser = clap::value_parser!(u32).range(1..=1_000_000), global = true)]
    pub sse_max_per_ip: u32,

    /// Starts per second one user may make on this replica (bursts of five
    /// times as many pass); above it `429 rate_limited`. 0 turns it off.
    #[arg(long, env = "RATE_LIMIT_USER", default_value_t = 2,
          value_parser = clap::value_parser!(u32).range(0..=1_000_000), global = true)]
    pub rate_limit_user: u32,

    /// Booking and guest-token requests per second from one client address
    /// on this replica (bursts of twice as many pass); above it `429
    /// rate_limited`. 0 turns it off. High on purpose, see SSE_MAX_PER_IP.
    #[arg(long, env = "RATE_LIMIT_IP", default_value_t = 1_000,
          value_parser = clap::value_parser!(u32).range(0..=10_000_000), global = true)]
    pub rate_limit_ip: u32,

    /// Peers whose `X-Forwarded-For` names the client (comma-separated IPs
    /// or CIDR blocks: the load balancers). Anyone else's header is ignored.
    #[arg(
        long,
        env = "TRUSTED_PROXIES",
        value_delimiter = ',',
        default_value = "127.0.0.0/8,::1",
        value_parser = ip_or_network,
        global = true
    )]
    pub trusted_proxies: Vec<ipnet::IpNet>,

    /// Seconds a client may take to send a request's head; slower ones are
    /// closed (slowloris).
    #[arg(long, env = "HEADER_READ_TIMEOUT_SECONDS", default_value_t = 10,
          value_parser = clap::value_parser!(u32).range(1..=600), global = true)]
    pub header_read_timeout_seconds: u32,

    /// Largest request head in bytes; larger ones get `431`.
    #[arg(long, env = "MAX_HEADER_BYTES", default_value_t = 16 * 1024,
          value_parser = clap::value_parser!(u32).range(8 * 1024..=1024 * 1024), global = true)]
    pub max_header_bytes: u32,

    /// Seconds any request but a seat stream may take; then `503`, and
    /// nothing it was doing is committed.
    #[arg(long, env = "REQUEST_TIMEOUT_SECONDS", default_value_t = 15,
          value_parser = clap::value_parser!(u32).range(1..=600), global = true)]
    pub request_timeout_seconds: u32,

    /// Events a seat-stream subscriber may fall behind the live feed before
    /// it is cut off (it then reconnects with Last-Event-ID and replays from
    /// the log). Bounds the memory a slow viewer can pin.
    #[arg(long, env = "SSE_CLIENT_BUFFER", default_value_t = 1_024,
          value_parser = clap::value_parser!(u32).range(1..=1_000_000), global = true)]
    pub sse_client_buffer: u32,

    /// Seconds that data sent to a client may stay unacknowledged (a client
    /// that stopped reading, or vanished) before its connection is dropped.
    /// Frees the SSE stream such a client holds.
    #[arg(long, env = "CLIENT_WRITE_TIMEOUT_SECONDS", default_value_t = 30,
          value_parser = clap::value_parser!(u32).range(1..=3_600), global = true)]
    pub client_write_timeout_seconds: u32,

    /// Where the embedded development cluster keeps its data.
    #[arg(
        long,
        env = "SEATSYNC_DATA_DIR",
        default_value = ".seatsync",
        global = true
    )]
    pub data_dir: PathBuf,

    /// Port of the embedded development cluster.
    #[arg(
        long,
        env = "SEATSYNC_EMBEDDED_PG_PORT",
        default_value_t = 54329,
        global = true
    )]
    pub embedded_pg_port: u16,
}

/// A configuration that parsed but makes no sense.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("AUTH_SECRET is required when DATABASE_URL is set (at least 32 bytes, the same on every replica)")]
    MissingAuthSecret,
    #[error("AUTH_SECRET must be at least 32 bytes long (HS256 wants a key as long as its hash)")]
    WeakAuthSecret,
    #[error("ADMIN_TOKEN must be at least 16 characters long")]
    WeakAdminToken,
    #[error("{name} is not a valid PostgreSQL URL: {reason}")]
    BadDatabaseUrl { name: &'static str, reason: String },
}

impl Config {
    /// Checks what clap cannot: relations between settings. `serving` is
    /// false for `seatsync migrate`, which needs only the database: a
    /// migration job should not have to be handed the token secret.
    pub fn validate(&self, serving: bool) -> Result<(), ConfigError> {
        if let Some(url) = &self.database_url {
            check_pg_url("DATABASE_URL", url)?;
            if serving && self.auth_secret.is_none() {
                return Err(ConfigError::MissingAuthSecret);
            }
        }
        if let Some(url) = &self.listen_database_url {
            check_pg_url("LISTEN_DATABASE_URL", url)?;
        }
        if self.auth_secret.as_ref().is_some_and(|s| s.len() < 32) {
            return Err(ConfigError::WeakAuthSecret);
        }
        if self.admin_token.as_ref().is_some_and(|s| s.len() < 16) {
            return Err(ConfigError::WeakAdminToken);
        }
        Ok(())
    }

    /// The connection that must not go through a transaction pooler.
    pub fn direct_database_url(&self) -> Option<&str> {
        self.listen_database_url
            .as_deref()
            .or(self.database_url.as_deref())
    }

    /// `DB_STATEMENTS`, or what its absence means.
    pub fn statement_mode(&self) -> StatementMode {
        self.db_statements
            .unwrap_or(match (&self.database_url, &self.listen_database_url) {
                (Some(pooled), Some(direct)) if pooled != direct => StatementMode::Unnamed,
                _ => StatementMode::Prepared,
            })
    }

    /// `HOLD_CONCURRENCY_PER_SHOW`, or what 0 means.
    pub fn holds_per_show(&self) -> usize {
        match self.hold_concurrency_per_show {
            0 => (self.db_pool_size as usize * 3 / 4).max(1),
            n => n as usize,
        }
    }

    pub fn heartbeat(&self) -> Duration {
        Duration::from_secs(self.heartbeat_seconds.into())
    }

    pub fn client_write_timeout(&self) -> Duration {
        Duration::from_secs(self.client_write_timeout_seconds.into())
    }

    pub fn sweep_interval(&self) -> Duration {
        Duration::from_millis(self.sweep_interval_ms.into())
    }
}

fn check_pg_url(name: &'static str, url: &str) -> Result<(), ConfigError> {
    url.parse::<tokio_postgres::Config>()
        .map(|_| ())
        .map_err(|e| ConfigError::BadDatabaseUrl {
            name,
            // The cause says what is wrong ("invalid port"); never the URL
            // itself, which may hold a password.
            reason: match std::error::Error::source(&e) {
                Some(cause) => format!("{e}: {cause}"),
                None => e.to_string(),
            },
        })
}

/// An IP address (a network of one) or a CIDR block.
fn ip_or_network(s: &str) -> Result<ipnet::IpNet, String> {
    let s = s.trim();
    s.parse::<ipnet::IpNet>()
        .or_else(|_| s.parse::<IpAddr>().map(ipnet::IpNet::from))
        .map_err(|_| format!("{s:?} is neither an IP address nor a CIDR block"))
}
