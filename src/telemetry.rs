//! Logging: `RUST_LOG` filters (default `info`), human-readable lines on stderr.

use tracing_subscriber::EnvFilter;

pub fn init() {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    // A second init (tests) is harmless.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        // When stderr is gone (a log collector died), drop the line. The
        // default reports the failed write with `eprintln!`, which panics on
        // the same broken pipe: at start-up that kills the process, and in
        // the SIGTERM handler it kills the task that begins the shutdown, so
        // the replica never exits.
        .log_internal_errors(false)
        .try_init();
}
