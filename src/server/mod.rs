//! The HTTP server: an accept loop that gives every connection the limits a
//! ticket drop needs at the socket, before any handler runs.
//!
//! - A header read timeout: a client that opens a connection and never
//!   finishes its request head (slowloris) is closed after it, instead of
//!   holding a file descriptor for as long as it likes.
//! - A bound on hyper's read buffer (the exact request-head limit, `431`,
//!   is the router's).
//! - `TCP_USER_TIMEOUT`: a connection whose sent data stays unacknowledged
//!   is dropped (see [`limit_unacknowledged`]).
//! - The peer address for the rate limits, as `ConnectInfo`.
//!
//! A connection that opens with a seat-stream request is answered by
//! [`event_stream`] instead of hyper, to keep idle streams small.

mod event_stream;
mod rewind;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::Router;
use hyper::body::Incoming;
use hyper::Request;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

use event_stream::Sniffed;
use rewind::Rewind;

/// What every connection is held to.
#[derive(Debug, Clone, Copy)]
pub struct ConnectionLimits {
    pub header_read_timeout: Duration,
    /// The request-head limit; hyper's read buffer may grow to four times it.
    pub max_header_bytes: usize,
    pub write_timeout: Duration,
}

/// Serves `app` until `shutdown`, then lets open connections finish and
/// returns once they have (seat streams were ended before, through their
/// channels: `SeatStreams::end_all`).
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: ConnectionLimits,
    shutdown: CancellationToken,
) {
    let mut builder = Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        // Room for heads well past the limit, so that the exact limit is
        // the router's clean `431` (`http::limits::limit_head`). hyper's own
        // cap, hit mid-read, may reset the connection before the client has
        // finished sending, and the client then sees no answer at all.
        .max_buf_size((limits.max_header_bytes * 4).max(64 * 1024));
    let builder = Arc::new(builder);
    let graceful = GracefulShutdown::new();
    loop {
        let (stream, peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of file descriptors, most likely: accepting again
                    // at once would spin. Connections that end free some.
                    tracing::warn!(error = %e, "cannot accept a connection");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        if let Err(e) = limit_unacknowledged(&stream, limits.write_timeout) {
            tracing::warn!(error = %e, "cannot set TCP_USER_TIMEOUT on a client connection");
        }
        let _ = stream.set_nodelay(true);
        // The watcher also makes the graceful shutdown wait for this
        // connection while it is sniffed or holds a seat stream.
        tokio::spawn(connection(
            stream,
            peer,
            app.clone(),
            builder.clone(),
            graceful.watcher(),
            limits,
            shutdown.clone(),
        ));
    }
    drop(listener);
    graceful.shutdown().await;
}

/// Serves one client connection: a seat stream here, anything else with
/// hyper.
async fn connection(
    mut stream: TcpStream,
    peer: SocketAddr,
    app: Router,
    builder: Arc<Builder<TokioExecutor>>,
    watcher: Watcher,
    limits: ConnectionLimits,
    shutdown: CancellationToken,
) {
    let deadline = tokio::time::Instant::now() + limits.header_read_timeout;
    let prefix = match event_stream::sniff(
        &mut stream,
        limits.max_header_bytes,
        deadline,
        &shutdown,
    )
    .await
    {
        Sniffed::Gone => return,
        Sniffed::SeatStream(request) => {
            event_stream::serve(stream, peer, request, app).await;
            drop(watcher);
            return;
        }
        Sniffed::Other(prefix) => prefix,
    };
    let service = hyper::service::service_fn(move |mut req: Request<Incoming>| {
        req.extensions_mut().insert(ConnectInfo(peer));
        // The router is cloned per request: cheap (it is shared).
        app.clone().oneshot(req.map(Body::new))
    });
    // Boxed, so that a seat stream's task is not as large as hyper's.
    let connection = Box::pin(
        watcher.watch(
            builder
                .serve_connection_with_upgrades(TokioIo::new(Rewind::new(prefix, stream)), service)
                .into_owned(),
        ),
    );
    if let Err(e) = connection.await {
        tracing::debug!(error = %e, %peer, "connection ended with an error");
    }
}

/// Drops a client connection whose sent data stays unacknowledged for
/// `timeout`: a client that stopped reading (zero window; Linux 5.11+) or
/// vanished. Nothing else can end such a connection's SSE stream: once the
/// socket is full, hyper never polls the stream again, so it can neither
/// notice that it lags nor fail a heartbeat write, and it would hold its
/// connection slot (and up to the socket's send buffer) forever.
#[cfg(any(target_os = "linux", target_os = "android"))]
fn limit_unacknowledged(tcp: &TcpStream, timeout: Duration) -> std::io::Result<()> {
    socket2::SockRef::from(tcp).set_tcp_user_timeout(Some(timeout))
}

#[cfg(not(any(target_os = "linux", target_os = "android")))]
fn limit_unacknowledged(_: &TcpStream, _: Duration) -> std::io::Result<()> {
    Ok(())
}
