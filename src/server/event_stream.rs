//! Seat-event streams opened on a fresh connection are answered here,
//! without hyper.
//!
//! Why: a ticket drop keeps tens of thousands of streams open and idle, and
//! an idle stream on a hyper connection keeps hyper's read buffer, its
//! response-head buffer and its dispatcher (about 20 KiB of resident memory
//! per stream, measured). Here a stream costs its socket, its seat-event
//! stream and a few hundred bytes of state.
//!
//! Only the plainest request takes this path: the first request of a
//! connection, `GET /api/schedules/{id}/seats/stream[?query]` over HTTP/1.1
//! or 1.0, with a complete, well-formed head within the head limit and no
//! body.
//! Anything else, including every malformed or oversized head, goes to
//! hyper with the bytes read so far put back, so its answers stay hyper's.
//! The request still runs through the whole router (limits, request id,
//! metrics, errors); only the response is written here (chunked for
//! HTTP/1.1, ended by closing for HTTP/1.0), and the connection closes
//! after it. A proxy that sends each stream on a connection of its own
//! (no upstream keep-alive, or HTTP/1.0) gets this path for every stream.

use std::io::IoSlice;
use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;
use std::time::SystemTime;

use axum::body::{Body, HttpBody};
use axum::extract::ConnectInfo;
use axum::http::{header, HeaderName, HeaderValue, Method, Request, Response, Version};
use axum::Router;
use bytes::{Bytes, BytesMut};
use futures::Stream;
use std::net::SocketAddr;
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

use crate::realtime::direct::DirectSink;
use crate::realtime::stream::DirectWrites;

/// Headers a request may carry on this path (more go to hyper).
const MAX_HEADERS: usize = 64;

/// What the first request head of a connection turned out to be.
pub enum Sniffed {
    /// A seat-stream request, parsed; the connection is answered here.
    SeatStream(Box<Request<Body>>),
    /// Anything else: hyper serves the connection from these bytes on.
    Other(Bytes),
    /// Nothing to serve: the client left, or sent no complete head in
    /// time (as hyper's own head timeout would, the connection is closed).
    Gone,
}

/// Reads a connection's first request head, to tell whether it is a
/// seat-stream request. The whole head, for every connection: hyper's own
/// head timeout starts again when it gets the connection, so a head it
/// got half-sent could hold the connection for nearly twice the timeout.
pub async fn sniff(
    tcp: &mut TcpStream,
    max_head: usize,
    deadline: Instant,
    shutdown: &CancellationToken,
) -> Sniffed {
    let mut buf = BytesMut::with_capacity(1024);
    loop {
        if buf.capacity() - buf.len() < 512 {
            buf.reserve(1024);
        }
        let read = tokio::select! {
            _ = shutdown.cancelled() => return Sniffed::Gone,
            read = tokio::time::timeout_at(deadline, tcp.read_buf(&mut buf)) => read,
        };
        match read {
            Err(_) | Ok(Err(_)) => return Sniffed::Gone,
            Ok(Ok(0)) if buf.is_empty() => return Sniffed::Gone,
            // A head cut short: hyper answers it as it would have.
            Ok(Ok(0)) => return Sniffed::Other(buf.freeze()),
            Ok(Ok(_)) => {}
        }
        if buf.len() > max_head {
            // hyper reads the rest and the router answers `431`.
            return Sniffed::Other(buf.freeze());
        }
        match parse(&buf) {
            Parse::Partial => continue,
            Parse::Other => return Sniffed::Other(buf.freeze()),
            Parse::SeatStream(request) => return Sniffed::SeatStream(request),
        }
    }
}

enum Parse {
    Partial,
    Other,
    SeatStream(Box<Request<Body>>),
}

fn parse(buf: &[u8]) -> Parse {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut head = httparse::Request::new(&mut headers);
    let length = match head.parse(buf) {
        Ok(httparse::Status::Partial) => return Parse::Partial,
        Ok(httparse::Status::Complete(n)) => n,
        Err(_) => return Parse::Other,
    };
    let version = match head.version {
        Some(1) => Version::HTTP_11,
        Some(0) => Version::HTTP_10,
        _ => return Parse::Other,
    };
    // Bytes past the head would be a pipelined request or a body.
    if length != buf.len() || head.method != Some("GET") {
        return Parse::Other;
    }
    let Some(target) = head.path.filter(|p| is_seat_stream_path(p)) else {
        return Parse::Other;
    };
    let Ok(mut request) = Request::builder()
        .method(Method::GET)
        .uri(target)
        .version(version)
        .body(Body::empty())
    else {
        return Parse::Other;
    };
    let map = request.headers_mut();
    for h in head.headers.iter() {
        let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(h.name.as_bytes()),
            HeaderValue::from_bytes(h.value),
        ) else {
            return Parse::Other;
        };
        // A body, or a protocol switch, is hyper's business.
        let body_or_upgrade = name == header::TRANSFER_ENCODING
            || name == header::UPGRADE
            || name == header::EXPECT
            || (name == header::CONTENT_LENGTH && value.as_bytes() != b"0");
        if body_or_upgrade {
            return Parse::Other;
        }
        map.append(name, value);
    }
    Parse::SeatStream(Box::new(request))
}

/// `/api/schedules/{id}/seats/stream`, with or without a query.
fn is_seat_stream_path(target: &str) -> bool {
    let path = target.split_once('?').map_or(target, |(p, _)| p);
    path.strip_prefix("/api/schedules/")
        .and_then(|rest| rest.strip_suffix("/seats/stream"))
        .is_some_and(|id| !id.is_empty() && !id.contains('/'))
}

/// Answers a seat-stream request through the router and writes the
/// response. Returns when the response has ended or the client has left.
pub async fn serve(tcp: TcpStream, peer: SocketAddr, request: Box<Request<Body>>, app: Router) {
    let mut request = *request;
    request.extensions_mut().insert(ConnectInfo(peer));
    let chunked_ok = request.version() == Version::HTTP_11;
    // Boxed: the router's future is large, and only needed until the head.
    let response = match Box::pin(app.oneshot(request)).await {
        Ok(response) => response,
        Err(never) => match never {},
    };
    if let Err(e) = write_response(tcp, response, chunked_ok).await {
        tracing::debug!(error = %e, %peer, "seat stream connection ended");
    }
}

/// The socket, as the schedule's writer task writes to it. The stream is
/// inline: the writer reaches the socket of each of thousands of streams
/// per event, and every pointer on the way is a likely cache miss.
struct SocketSink {
    tcp: TcpStream,
    chunked: bool,
}

impl DirectSink for SocketSink {
    fn try_write_vectored(&self, parts: &[IoSlice<'_>]) -> std::io::Result<usize> {
        // `send(2)` straight on the socket, not tokio's `try_write`: it
        // skips the file layer of `write(2)`, and the writer touches one
        // socket object less per stream (measured: tokio's readiness check
        // was 6% of a replica's samples). The socket is non-blocking, so
        // a full one answers `WouldBlock`; tokio's readiness still says
        // writable then, and this connection's next write finds out.
        let socket = socket2::SockRef::from(&self.tcp);
        match parts {
            [one] => socket.send(one),
            _ => socket.send_vectored(parts),
        }
    }

    fn chunked(&self) -> bool {
        self.chunked
    }
}

async fn write_response(
    tcp: TcpStream,
    response: Response<Body>,
    chunked_ok: bool,
) -> std::io::Result<()> {
    let (mut parts, body) = response.into_parts();
    let length = body.size_hint().exact();
    let chunked = length.is_none() && chunked_ok;
    // Shared with the schedule's writer task while the stream is direct.
    let sink = Arc::new(SocketSink { tcp, chunked });
    let tcp = &sink.tcp;
    let mut head = Vec::with_capacity(512);
    head.extend_from_slice(b"HTTP/1.1 ");
    head.extend_from_slice(parts.status.as_str().as_bytes());
    head.push(b' ');
    head.extend_from_slice(parts.status.canonical_reason().unwrap_or("").as_bytes());
    head.extend_from_slice(b"\r\n");
    for (name, value) in &parts.headers {
        let framing = name == header::CONNECTION
            || name == header::TRANSFER_ENCODING
            || name == header::CONTENT_LENGTH;
        if !framing {
            head.extend_from_slice(name.as_str().as_bytes());
            head.extend_from_slice(b": ");
            head.extend_from_slice(value.as_bytes());
            head.extend_from_slice(b"\r\n");
        }
    }
    if !parts.headers.contains_key(header::DATE) {
        head.extend_from_slice(b"date: ");
        head.extend_from_slice(httpdate::fmt_http_date(SystemTime::now()).as_bytes());
        head.extend_from_slice(b"\r\n");
    }
    if let Some(n) = length {
        head.extend_from_slice(format!("content-length: {n}\r\n").as_bytes());
    } else if chunked {
        head.extend_from_slice(b"transfer-encoding: chunked\r\n");
    }
    head.extend_from_slice(b"connection: close\r\n\r\n");
    write_all_vectored(tcp, &[&head]).await?;
    drop(head);

    // A live stream lets its schedule's writer write to this socket while
    // it is caught up. Then this task must write the writer's unwritten
    // rest before anything else, and say when it holds nothing unwritten.
    let lane = parts
        .extensions
        .remove::<DirectWrites>()
        .filter(|_| length.is_none())
        .and_then(|direct| direct.attach(sink.clone()));
    let mut data = body.into_data_stream();
    // The client sends nothing more; a read only ever ends the stream
    // (EOF or an error), so a closed stream's resources go at once.
    let mut probe = [0u8; 8];
    // Whether the body last answered Pending to this task, so that it will
    // wake the task for what comes next: then it need not be asked again
    // before the task sleeps. Each ask that answers Pending registers with
    // the schedule's broadcast channel, on a lock every stream shares.
    // With a lane, any wake-up may be the writer handing the lane back,
    // which only the body sees: it is asked every time.
    let mut armed = false;
    loop {
        let mut batch = Batch::default();
        let mut skip_body = std::mem::take(&mut armed) && lane.is_none();
        let step = std::future::poll_fn(|cx| {
            if let Some(rest) = lane.as_ref().and_then(|l| l.take_rest()) {
                return Poll::Ready(Step::Rest(rest));
            }
            if !std::mem::take(&mut skip_body) {
                // Only the body's last answer counts: a Pending from an
                // earlier poll was spent by the wake-up that led here.
                armed = false;
                // Everything already queued goes out in one write, as with
                // hyper: in a drop, events come faster than one write each.
                while batch.count() < MAX_BATCH {
                    if let Some(lane) = &lane {
                        lane.set_flushed(batch.count() == 0);
                    }
                    match Pin::new(&mut data).poll_next(cx) {
                        Poll::Ready(Some(Ok(bytes))) => batch.push(bytes),
                        Poll::Ready(Some(Err(e))) => {
                            return Poll::Ready(Step::Failed(std::io::Error::other(e)))
                        }
                        Poll::Ready(None) => return Poll::Ready(Step::Ended),
                        Poll::Pending => {
                            armed = true;
                            break;
                        }
                    }
                }
                if let Some(lane) = &lane {
                    lane.set_flushed(false);
                }
                if batch.count() > 0 {
                    return Poll::Ready(Step::Write);
                }
            }
            loop {
                match tcp.poll_read_ready(cx) {
                    Poll::Ready(Ok(())) => {}
                    Poll::Ready(Err(_)) => return Poll::Ready(Step::Closed),
                    Poll::Pending => return Poll::Pending,
                }
                match tcp.try_read(&mut probe) {
                    Ok(0) => return Poll::Ready(Step::Closed),
                    Ok(_) => {
                        // Stray bytes from the client: ignored, look again
                        // later (a flood of them does not hold the thread).
                        cx.waker().wake_by_ref();
                        return Poll::Pending;
                    }
                    // Readiness is cleared: the next poll registers.
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                    Err(_) => return Poll::Ready(Step::Closed),
                }
            }
        })
        .await;
        // The writer's rest goes first: the body's frames came after it (the
        // stream took the lane back before it yielded them, and the writer
        // writes only while the lane is direct).
        if let Some(rest) = lane.as_ref().and_then(|l| l.take_rest()) {
            write_all_vectored(tcp, &[&rest]).await?;
        }
        match step {
            Step::Rest(rest) => write_all_vectored(tcp, &[&rest]).await?,
            Step::Write => {
                // A write that had to wait for the socket let this task
                // sleep, and a wake-up from the body may have been spent on
                // it: then the body must be asked again.
                if waited_for(batch.write(tcp, chunked)).await? {
                    armed = false;
                }
            }
            Step::Ended => {
                batch.write(tcp, chunked).await?;
                break;
            }
            Step::Closed => return Ok(()),
            Step::Failed(e) => return Err(e),
        }
    }
    // The stream has ended, and its lane has forgotten the socket.
    drop(data);
    if chunked {
        write_all_vectored(tcp, &[b"0\r\n\r\n"]).await?;
    }
    socket2::SockRef::from(tcp).shutdown(std::net::Shutdown::Write)
}

/// Runs `write`; `Ok(true)` if it did not finish at its first poll.
async fn waited_for(
    write: impl std::future::Future<Output = std::io::Result<()>>,
) -> std::io::Result<bool> {
    let mut write = std::pin::pin!(write);
    let mut waited = false;
    std::future::poll_fn(|cx| match write.as_mut().poll(cx) {
        Poll::Ready(result) => Poll::Ready(result.map(|()| waited)),
        Poll::Pending => {
            waited = true;
            Poll::Pending
        }
    })
    .await
}

/// What one wake-up of a stream's connection found.
enum Step {
    /// The writer task's unwritten rest, already framed.
    Rest(Bytes),
    /// Frames to write.
    Write,
    /// The response ended (after the frames gathered, if any).
    Ended,
    /// The client left.
    Closed,
    Failed(std::io::Error),
}

/// Frames written together: at most this many per system call.
const MAX_BATCH: usize = 64;

/// Frames to write in one system call (one chunk, when chunked). The
/// usual case, one frame, allocates nothing.
#[derive(Default)]
struct Batch {
    first: Option<Bytes>,
    more: Vec<Bytes>,
    len: usize,
}

impl Batch {
    fn count(&self) -> usize {
        usize::from(self.first.is_some()) + self.more.len()
    }

    fn push(&mut self, bytes: Bytes) {
        if bytes.is_empty() {
            return;
        }
        self.len += bytes.len();
        if self.first.is_none() {
            self.first = Some(bytes);
        } else {
            self.more.push(bytes);
        }
    }

    async fn write(&self, tcp: &TcpStream, chunked: bool) -> std::io::Result<()> {
        let Some(first) = &self.first else {
            return Ok(());
        };
        let mut size = [0u8; 18];
        let size = if chunked {
            let n = chunk_size_line(self.len, &mut size);
            &size[..n]
        } else {
            &[]
        };
        let end: &[u8] = if chunked { b"\r\n" } else { b"" };
        if self.more.is_empty() {
            return write_all_vectored(tcp, &[size, first, end]).await;
        }
        let mut parts: Vec<&[u8]> = Vec::with_capacity(self.more.len() + 3);
        parts.extend([size, &first[..]]);
        parts.extend(self.more.iter().map(|f| &f[..]));
        parts.push(end);
        write_all_vectored(tcp, &parts).await
    }
}

/// Writes `parts` in as few system calls as the socket allows.
async fn write_all_vectored(tcp: &TcpStream, parts: &[&[u8]]) -> std::io::Result<()> {
    let total: usize = parts.iter().map(|p| p.len()).sum();
    let mut written = 0;
    while written < total {
        // Skip what is already out, then write the rest in one call.
        let mut skip = written;
        let rest = parts.iter().filter_map(|p| {
            if skip >= p.len() {
                skip -= p.len();
                None
            } else {
                let slice = IoSlice::new(&p[skip..]);
                skip = 0;
                Some(slice)
            }
        });
        let n = if parts.len() <= 3 {
            let mut few = [IoSlice::new(&[]); 3];
            let mut k = 0;
            for slice in rest {
                few[k] = slice;
                k += 1;
            }
            try_write_vectored(tcp, &few[..k]).await?
        } else {
            let many: Vec<IoSlice<'_>> = rest.collect();
            try_write_vectored(tcp, &many).await?
        };
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        written += n;
    }
    Ok(())
}

/// Writes what the socket takes of `parts`, waiting until it takes some.
async fn try_write_vectored(tcp: &TcpStream, parts: &[IoSlice<'_>]) -> std::io::Result<usize> {
    loop {
        tcp.writable().await?;
        match tcp.try_write_vectored(parts) {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            written => return written,
        }
    }
}

/// Writes `{len:x}\r\n` into `out`, returning its length.
fn chunk_size_line(len: usize, out: &mut [u8; 18]) -> usize {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let digits = (usize::BITS - len.leading_zeros()).div_ceil(4).max(1) as usize;
    for i in 0..digits {
        out[digits - 1 - i] = HEX[(len >> (4 * i)) & 0xf];
    }
    out[digits] = b'\r';
    out[digits + 1] = b'\n';
    digits + 2
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recognises_only_seat_stream_paths() {
        for yes in [
            "/api/schedules/1/seats/stream",
            "/api/schedules/1/seats/stream?lastEventId=4",
            "/api/schedules/abc/seats/stream",
        ] {
            assert!(is_seat_stream_path(yes), "{yes}");
        }
        for no in [
            "/api/schedules//seats/stream",
            "/api/schedules/1/2/seats/stream",
            "/api/schedules/1/seats/streams",
            "/api/schedules/1/seat-status",
            "/api/schedules/1/seats/stream/",
        ] {
            assert!(!is_seat_stream_path(no), "{no}");
        }
    }

    #[test]
    fn takes_only_plain_complete_stream_heads() {
        let stream = |head: &str| matches!(parse(head.as_bytes()), Parse::SeatStream(_));
        assert!(stream(
            "GET /api/schedules/1/seats/stream HTTP/1.1\r\nHost: x\r\nLast-Event-ID: 3\r\n\r\n"
        ));
        assert!(matches!(
            parse(b"GET /api/schedules/1/seats/stream HTTP/1.1\r\nHost: x\r\n"),
            Parse::Partial
        ));
        assert!(stream("GET /api/schedules/1/seats/stream HTTP/1.0\r\n\r\n"));
        for other in [
            "POST /api/schedules/1/seats/stream HTTP/1.1\r\n\r\n",
            "GET /api/schedules/1/seats/stream HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc",
            "GET /api/schedules/1/seats/stream HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
            "GET /api/schedules/1/seats/stream HTTP/1.1\r\n\r\nGET / HTTP/1.1\r\n\r\n",
            "GET /api/schedules/1/seats/stream HTTP/1.1\r\nBad Header: x\r\n\r\n",
            "GET /api/schedules/1 HTTP/1.1\r\n\r\n",
        ] {
            assert!(!stream(other), "{other:?}");
        }
    }

    #[test]
    fn writes_chunk_sizes_in_hex() {
        let mut out = [0u8; 18];
        for (len, want) in [
            (0, "0\r\n"),
            (10, "a\r\n"),
            (255, "ff\r\n"),
            (4096, "1000\r\n"),
        ] {
            let n = chunk_size_line(len, &mut out);
            assert_eq!(&out[..n], want.as_bytes());
        }
    }
}
