//! Logging: `RUST_LOG` filters (default `info`); lines on stderr, as text
//! for people or as JSON for log collectors (`LOG_FORMAT`).

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
