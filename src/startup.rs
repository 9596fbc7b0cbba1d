//! Wires configuration -> pools -> listener -> router, and supervises the
//! replica's background tasks until shutdown.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize};
use std::sync::Arc;
use std::time::Duration;

use chrono::{Duration as ChronoDuration, Utc};
use rand::RngExt;
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::auth::TokenAuthority;
use crate::config::Config;
use crate::db::{build_pool, migrate, Db, DbError};
use crate::embedded_pg::{EmbeddedError, EmbeddedPostgres};
use crate::holds::admission::ShowAdmission;
use crate::holds::live_map::LiveMaps;
use crate::holds::postgres::PgSeatStore;
use crate::holds::sweeper::run_sweeper;
use crate::holds::SeatStore;
use crate::http::limits::{AbuseLimits, LimitSettings};
use crate::http::{router, AppState, Limits};
use crate::realtime::event_log::EventLog;
use crate::realtime::hub::ScheduleHubs;
use crate::realtime::listener::ListenerRelay;
use crate::realtime::retention::run_pruner;
use crate::realtime::stream::SeatStreams;
use crate::schedules::{NewSchedule, RequestedSeat, ScheduleCatalog};
use crate::server::{serve, ConnectionLimits};

/// After SIGTERM (not-ready at once, streams ended), how long the replica
/// still answers, with `Connection: close`, before it closes its idle
/// connections. A load balancer may already have sent a request on an
/// idle keep-alive connection; closed at once, that request would fail,
/// and a `POST` is not retried elsewhere. Answered with `close`, the
/// connection ends cleanly after the answer instead.
const SHUTDOWN_DRAIN: Duration = Duration::from_secs(1);

/// Then how long in-flight requests get before the process exits anyway
/// (the contract allows 10 s in all).
const SHUTDOWN_GRACE: Duration = Duration::from_secs(8);

#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    #[error(transparent)]
    Db(#[from] DbError),
    /// The first contact with the database: most often a wrong setting.
    #[error("cannot migrate the database at {setting}: {source}")]
    Migrate {
        setting: &'static str,
        source: DbError,
    },
    #[error("embedded PostgreSQL: {0}")]
    Embedded(#[from] EmbeddedError),
    #[error("cannot bind {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("server error: {0}")]
    Serve(std::io::Error),
    #[error("the {task} task ended ({reason}); exiting so that the replica is restarted")]
    TaskEnded { task: &'static str, reason: String },
}

/// A built replica: bound, migrated, connected, not yet serving.
pub struct Application {
    listener: TcpListener,
    state: AppState,
    config: Config,
    embedded: Option<EmbeddedPostgres>,
    database_url: String,
}

fn random_secret() -> String {
    let mut bytes = [0u8; 24];
    rand::rng().fill(&mut bytes);
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl Application {
    pub async fn build(mut config: Config) -> Result<Self, StartupError> {
        let mut embedded = None;
        let database_url = match &config.database_url {
            Some(url) => url.clone(),
            None => {
                let pg = EmbeddedPostgres::start(&config.data_dir, config.embedded_pg_port).await?;
                tracing::info!(url = %pg.url, "embedded PostgreSQL running");
                let url = pg.url.clone();
                embedded = Some(pg);
                // Development only: fresh secrets each run, printed below.
                config.auth_secret.get_or_insert_with(random_secret);
                config.admin_token.get_or_insert_with(random_secret);
                url
            }
        };
        // The direct connection: the migrations' session lock would not be
        // held through a transaction pooler.
        let direct_url = config
            .listen_database_url
            .clone()
            .unwrap_or_else(|| database_url.clone());
        let applied = migrate(&direct_url)
            .await
            .map_err(|source| StartupError::Migrate {
                setting: if embedded.is_some() {
                    "the embedded cluster"
                } else if config.listen_database_url.is_some() {
                    "LISTEN_DATABASE_URL"
                } else {
                    "DATABASE_URL"
                },
                source,
            })?;
        if applied > 0 {
            tracing::info!(applied, "migrations applied");
        }
        let db = Db::new(
            build_pool(&database_url, config.db_pool_size as usize)?,
            config.statement_mode(),
        );
        tracing::info!(statements = ?config.statement_mode(), "database pool ready");

        let addr = SocketAddr::new(config.host, config.port);
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| StartupError::Bind { addr, source })?;

        let secret = config.auth_secret.clone().unwrap_or_default();
        // Events a viewer may fall behind before it is cut off (see `ScheduleHubs`).
        let shutdown = CancellationToken::new();
        let listener_ready = Arc::new(AtomicBool::new(false));
        let state = AppState {
            store: Arc::new(PgSeatStore::new(db.clone())) as Arc<dyn SeatStore>,
            schedules: ScheduleCatalog::new(db.clone()),
            tokens: TokenAuthority::new(secret.as_bytes(), config.token_ttl_seconds),
            admin_token: config.admin_token.as_deref().map(Arc::from),
            limits: Arc::new(Limits {
                hold_seconds: config.hold_seconds,
                max_seats_per_booking: config.max_seats_per_booking,
                sse_max_connections: config.sse_max_connections as usize,
                auth_guest: config.auth_guest,
            }),
            db: db.clone(),
            streams: SeatStreams::new(
                ScheduleHubs::new(config.sse_client_buffer as usize),
                EventLog::new(db),
                config.heartbeat(),
            ),
            live_maps: LiveMaps::new(listener_ready.clone()),
            admission: ShowAdmission::new(config.holds_per_show()),
            listener_ready,
            sse_connections: Arc::new(AtomicUsize::new(0)),
            abuse: Arc::new(AbuseLimits::new(LimitSettings {
                user_starts_per_second: config.rate_limit_user,
                address_requests_per_second: config.rate_limit_ip,
                streams_per_address: config.sse_max_per_ip,
                trusted_proxies: config.trusted_proxies.clone(),
                request_timeout: Duration::from_secs(config.request_timeout_seconds.into()),
                max_header_bytes: config.max_header_bytes as usize,
            })),
            shutdown,
            metrics: crate::telemetry::metrics_recorder(),
        };
        if config.sweep_interval_ms > 1_500 {
            tracing::warn!(
                sweep_interval_ms = config.sweep_interval_ms,
                "SWEEP_INTERVAL_MS above 1500: untouched expired holds may take longer than 2 s to be released"
            );
        }
        if state.admin_token.is_none() {
            tracing::warn!("ADMIN_TOKEN is not set: schedule creation is disabled");
        }
        Ok(Self {
            listener,
            state,
            config,
            embedded,
            database_url,
        })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves until SIGTERM or Ctrl-C, then shuts down gracefully.
    pub async fn run_until_stopped(self) -> Result<(), StartupError> {
        let Application {
            listener,
            state,
            config,
            embedded,
            database_url,
        } = self;
        let shutdown = state.shutdown.clone();
        let addr = listener.local_addr().map_err(StartupError::Serve)?;

        if embedded.is_some() {
            let demo = ensure_demo_schedule(&state).await;
            let host = if addr.ip().is_unspecified() {
                "127.0.0.1".to_owned()
            } else {
                addr.ip().to_string()
            };
            println!("seatsync (development mode, embedded PostgreSQL at {database_url})");
            if let Some(id) = demo {
                println!(
                    "  seat map:    http://{host}:{}/schedules/{id}",
                    addr.port()
                );
            }
            println!(
                "  admin token: {}",
                config.admin_token.as_deref().unwrap_or("")
            );
        }
        // Tests and scripts read this line to find the port.
        println!("seatsync listening on http://{addr}");

        let mut tasks = Supervisor::default();
        tasks.spawn(
            "sweeper",
            run_sweeper(
                state.store.clone(),
                config.sweep_interval(),
                shutdown.clone(),
            ),
        );
        tasks.spawn(
            "pruner",
            run_pruner(
                state.db.clone(),
                config.event_retention_seconds,
                shutdown.clone(),
            ),
        );
        let listen_url = config.listen_database_url.clone().unwrap_or(database_url);
        tasks.spawn(
            "listener",
            ListenerRelay::new(
                listen_url,
                state.streams.hubs().clone(),
                state.live_maps.clone(),
                state.streams.log().clone(),
                state.listener_ready.clone(),
                shutdown.clone(),
            )
            .run(),
        );
        tasks.spawn(
            "housekeeping",
            housekeeping(
                state.abuse.clone(),
                state.live_maps.clone(),
                state.admission.clone(),
                shutdown.clone(),
            ),
        );

        tokio::spawn({
            let shutdown = shutdown.clone();
            async move {
                shutdown_signal().await;
                tracing::info!("shutdown requested: not ready, ending streams, finishing requests");
                shutdown.cancel();
            }
        });

        let limits = ConnectionLimits {
            header_read_timeout: Duration::from_secs(config.header_read_timeout_seconds.into()),
            max_header_bytes: config.max_header_bytes as usize,
            write_timeout: config.client_write_timeout(),
        };
        // The server stops a little after shutdown begins (see SHUTDOWN_DRAIN).
        let stop_serving = CancellationToken::new();
        let streams = state.streams.clone();
        let server = tokio::spawn(serve(listener, router(state), limits, stop_serving.clone()));

        // Every background task runs until shutdown. One that ends sooner
        // (returned or panicked) leaves the replica broken in a way it
        // cannot see from inside: it turns not-ready, shuts down, and
        // exits non-zero so that its orchestrator starts a fresh one.
        let failed = tokio::select! {
            // Tasks end on shutdown too: that is not a failure.
            biased;
            _ = shutdown.cancelled() => None,
            ended = tasks.next_ended() => if shutdown.is_cancelled() {
                None
            } else {
                tracing::error!(task = ended.task, reason = %ended.reason, "background task ended; shutting down");
                shutdown.cancel();
                Some(ended)
            },
        };
        // Streams end now: EventSource reconnects to another replica at once.
        streams.end_all();
        if failed.is_none() {
            tokio::time::sleep(SHUTDOWN_DRAIN).await;
        }
        stop_serving.cancel();
        if tokio::time::timeout(SHUTDOWN_GRACE, server).await.is_err() {
            tracing::warn!("in-flight requests did not finish in time; exiting anyway");
        }
        tasks.shutdown().await;
        if let Some(pg) = embedded {
            pg.stop().await;
        }
        tracing::info!("stopped");
        match failed {
            Some(ended) => Err(StartupError::TaskEnded {
                task: ended.task,
                reason: ended.reason,
            }),
            None => Ok(()),
        }
    }
}

/// Every so often: forgets the rate-limit state of clients and the live
/// maps of showings that went quiet, so memory follows what is busy now.
async fn housekeeping(
    abuse: Arc<AbuseLimits>,
    maps: LiveMaps,
    admission: ShowAdmission,
    shutdown: CancellationToken,
) {
    let mut every = tokio::time::interval(Duration::from_secs(15));
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = every.tick() => {
                abuse.forget_idle();
                maps.forget_quiet(LIVE_MAP_QUIET);
                admission.forget_idle();
            }
        }
    }
}

/// A showing's live map is dropped after this long without a start.
const LIVE_MAP_QUIET: Duration = Duration::from_secs(60);

/// How a supervised task ended.
struct Ended {
    task: &'static str,
    reason: String,
}

/// The replica's background tasks, by name.
#[derive(Default)]
struct Supervisor {
    tasks: JoinSet<()>,
    names: HashMap<tokio::task::Id, &'static str>,
}

impl Supervisor {
    fn spawn(&mut self, name: &'static str, task: impl Future<Output = ()> + Send + 'static) {
        let handle = self.tasks.spawn(with_fault(name, task));
        self.names.insert(handle.id(), name);
    }

    /// The first task to end, and how. Pending forever when there are none.
    async fn next_ended(&mut self) -> Ended {
        let Some(ended) = self.tasks.join_next_with_id().await else {
            return std::future::pending().await;
        };
        let (id, reason) = match ended {
            Ok((id, ())) => (id, "it returned".to_owned()),
            Err(e) if e.is_panic() => {
                let id = e.id();
                let payload = e.into_panic();
                let message = payload
                    .downcast_ref::<&str>()
                    .map(|s| (*s).to_owned())
                    .or_else(|| payload.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "a panic".to_owned());
                (id, format!("it panicked: {message}"))
            }
            Err(e) => (e.id(), "it was cancelled".to_owned()),
        };
        Ended {
            task: self.names.get(&id).copied().unwrap_or("background task"),
            reason,
        }
    }

    async fn shutdown(&mut self) {
        self.tasks.shutdown().await;
    }
}

/// Test builds only: `SEATSYNC_FAULT=<task>` makes that task panic, and
/// `SEATSYNC_FAULT=<task>:return` makes it return, shortly after start.
#[cfg(feature = "fault-injection")]
fn with_fault(
    name: &'static str,
    task: impl Future<Output = ()> + Send + 'static,
) -> std::pin::Pin<Box<dyn Future<Output = ()> + Send>> {
    let fault = std::env::var("SEATSYNC_FAULT").unwrap_or_default();
    let (target, returns) = match fault.split_once(':') {
        Some((target, "return")) => (target.to_owned(), true),
        _ => (fault, false),
    };
    if target != name {
        return Box::pin(task);
    }
    Box::pin(async move {
        tokio::select! {
            _ = task => {}
            _ = tokio::time::sleep(Duration::from_millis(300)) => {
                if !returns {
                    panic!("injected fault in the {name} task");
                }
            }
        }
    })
}

#[cfg(not(feature = "fault-injection"))]
fn with_fault(
    _name: &'static str,
    task: impl Future<Output = ()> + Send + 'static,
) -> impl Future<Output = ()> + Send + 'static {
    task
}

/// A showing to click on in development mode, created once.
async fn ensure_demo_schedule(state: &AppState) -> Option<i64> {
    let existing = state.schedules.list().await.ok()?;
    if let Some(s) = existing.first() {
        return Some(s.id);
    }
    let demo = NewSchedule {
        title: "Demo: The Nutcracker".into(),
        starts_at: Utc::now() + ChronoDuration::days(30),
        rows: 10,
        cols: 20,
        blocked: vec![
            RequestedSeat { row: 1, col: 1 },
            RequestedSeat { row: 1, col: 20 },
        ],
    };
    state.schedules.create(demo).await.ok().map(|s| s.id)
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = terminate => {}
    }
}
