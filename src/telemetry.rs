//! Logging: `RUST_LOG` filters (default `info`); lines on stderr, as text
//! for people or as JSON for log collectors (`LOG_FORMAT`). Metrics: the
//! Prometheus recorder behind `/metrics`, and every family it serves.

use std::sync::OnceLock;

use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tracing_subscriber::EnvFilter;

/// How log lines are written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    #[default]
    Text,
    /// One JSON object per line; fields of the enclosing span (the request
    /// id, method and route of a request) are on every line.
    Json,
}

pub fn init(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // When stderr is gone (a log collector died), drop the line. The
        // default reports the failed write with `eprintln!`, which panics on
        // the same broken pipe: at start-up that kills the process, and in
        // the SIGTERM handler it kills the task that begins the shutdown, so
        // the replica never exits.
        .log_internal_errors(false);
    // A second init (tests) is harmless.
    let _ = match format {
        LogFormat::Text => builder
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .try_init(),
        LogFormat::Json => builder
            .json()
            .with_current_span(true)
            .with_span_list(false)
            .try_init(),
    };
}

/// Seconds, from a fast answer to a slow one under a ticket drop.
const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// The process's Prometheus recorder, installed once; `None` when another
/// recorder was installed first.
pub fn metrics_recorder() -> Option<PrometheusHandle> {
    static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            // Histograms, not summaries: buckets add up across replicas.
            let handle = PrometheusBuilder::new()
                .set_buckets(LATENCY_BUCKETS)
                .ok()?
                .install_recorder()
                .ok()?;
            describe_metrics();
            Some(handle)
        })
        .clone()
}

/// Help text for every family, and zero for every counter, so dashboards
/// and alerts see each series from the start rather than from its first
/// event.
fn describe_metrics() {
    describe_counter!(
        "seatsync_http_requests_total",
        "HTTP requests answered, by method, route and status"
    );
    describe_histogram!(
        "seatsync_http_request_duration_seconds",
        Unit::Seconds,
        "Time to answer (for streams: to the response head), by method, route and status"
    );
    describe_counter!(
        "seatsync_holds_total",
        "Holds by outcome: started, conflicted (409 seats_taken), confirmed, cancelled, expired (by the sweeper)"
    );
    for outcome in ["started", "conflicted", "confirmed", "cancelled", "expired"] {
        metrics::counter!("seatsync_holds_total", "outcome" => outcome).absolute(0);
    }
    describe_counter!(
        "seatsync_booking_starts_total",
        "Start requests by outcome: held, replayed, seats_taken, refused"
    );
    describe_counter!(
        "seatsync_events_relayed_total",
        "Seat events this replica received on its LISTEN connection"
    );
    metrics::counter!("seatsync_events_relayed_total").absolute(0);
    describe_histogram!(
        "seatsync_event_commit_to_send_seconds",
        Unit::Seconds,
        "From the database clock just before an event's commit to its hand-over to this replica's streams"
    );
    describe_counter!(
        "seatsync_listener_reconnects_total",
        "Times the LISTEN connection was lost and is being re-established"
    );
    metrics::counter!("seatsync_listener_reconnects_total").absolute(0);
    describe_gauge!(
        "seatsync_listener_up",
        "1 while the LISTEN connection is up (the replica is ready only then)"
    );
    describe_gauge!("seatsync_db_pool_size", "Pooled connections open");
    describe_gauge!("seatsync_db_pool_available", "Pooled connections idle");
    describe_gauge!(
        "seatsync_db_pool_waiting",
        "Requests waiting for a pooled connection"
    );
    describe_gauge!("seatsync_sse_connections", "Open seat streams");
    describe_gauge!(
        "seatsync_sse_channels",
        "Schedules with viewers on this replica"
    );
    describe_counter!(
        "seatsync_sse_lagged_total",
        "Streams cut off for falling too far behind (they resume)"
    );
    metrics::counter!("seatsync_sse_lagged_total").absolute(0);
    describe_counter!(
        "seatsync_rate_limited_total",
        "Requests refused with 429, by limit: user (starts) or address"
    );
    for limit in ["user", "address"] {
        metrics::counter!("seatsync_rate_limited_total", "limit" => limit).absolute(0);
    }
}
