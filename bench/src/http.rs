//! A minimal HTTP/1.1 client: keep-alive, one request at a time, as cheap per
//! request as pgbench is per transaction.

use std::net::SocketAddr;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::REQUEST_TIMEOUT;

pub(crate) const MAX_HEAD_BYTES: usize = 64 * 1024;

pub(crate) struct HttpConn {
    pub(crate) addr: SocketAddr,
    pub(crate) stream: Option<TcpStream>,
    pub(crate) buf: Vec<u8>,
}

pub(crate) struct Head {
    pub(crate) status: u16,
    pub(crate) content_length: Option<usize>,
    pub(crate) chunked: bool,
    pub(crate) close: bool,
    /// `X-Answered-From: memory`: a 409 decided by the replica's live seat map.
    pub(crate) from_memory: bool,
}

/// A whole response, for callers that look at more than the status.
pub(crate) struct Response {
    pub(crate) status: u16,
    pub(crate) from_memory: bool,
    pub(crate) body: Vec<u8>,
}

impl HttpConn {
    pub(crate) fn new(addr: SocketAddr) -> Self {
        Self {
            addr,
            stream: None,
            buf: Vec::with_capacity(4096),
        }
    }

    /// Sends one request and reads its response: (status, body).
    pub(crate) async fn send(&mut self, req: &[u8]) -> std::io::Result<(u16, Vec<u8>)> {
        let r = self.send_full(req).await?;
        Ok((r.status, r.body))
    }

    pub(crate) async fn send_full(&mut self, req: &[u8]) -> std::io::Result<Response> {
        let result = tokio::time::timeout(REQUEST_TIMEOUT, self.exchange(req))
            .await
            .unwrap_or_else(|_| {
                Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "no response within 15 s",
                ))
            });
        if result.is_err() {
            self.stream = None;
        }
        result
    }

    pub(crate) async fn exchange(&mut self, req: &[u8]) -> std::io::Result<Response> {
        if self.stream.is_none() {
            let s = TcpStream::connect(self.addr).await?;
            s.set_nodelay(true)?;
            self.stream = Some(s);
            self.buf.clear();
        }
        let Some(stream) = self.stream.as_mut() else {
            unreachable!("connected above");
        };
        stream.write_all(req).await?;
        let head = read_head(stream, &mut self.buf).await?;
        let body = if let Some(len) = head.content_length {
            while self.buf.len() < len {
                read_more(stream, &mut self.buf).await?;
            }
            self.buf.drain(..len).collect()
        } else if head.chunked {
            let mut body = Vec::new();
            let mut dechunk = Dechunker::default();
            let pending = std::mem::take(&mut self.buf);
            dechunk.feed(&pending, &mut body)?;
            let mut chunk = [0u8; 4096];
            while !dechunk.done() {
                let n = stream.read(&mut chunk).await?;
                if n == 0 {
                    return Err(std::io::ErrorKind::UnexpectedEof.into());
                }
                dechunk.feed(&chunk[..n], &mut body)?;
            }
            body
        } else {
            stream.read_to_end(&mut self.buf).await?;
            self.stream = None;
            std::mem::take(&mut self.buf)
        };
        if head.close {
            self.stream = None;
        }
        Ok(Response {
            status: head.status,
            from_memory: head.from_memory,
            body,
        })
    }
}

pub(crate) async fn read_more(stream: &mut TcpStream, buf: &mut Vec<u8>) -> std::io::Result<()> {
    let mut chunk = [0u8; 4096];
    let n = stream.read(&mut chunk).await?;
    if n == 0 {
        return Err(std::io::ErrorKind::UnexpectedEof.into());
    }
    buf.extend_from_slice(&chunk[..n]);
    Ok(())
}

/// Reads up to the end of a response head; leaves what follows in `buf`.
pub(crate) async fn read_head(stream: &mut TcpStream, buf: &mut Vec<u8>) -> std::io::Result<Head> {
    loop {
        if let Some(i) = find(buf, b"\r\n\r\n") {
            let head = parse_head(&buf[..i])?;
            buf.drain(..i + 4);
            return Ok(head);
        }
        if buf.len() > MAX_HEAD_BYTES {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "response head too large",
            ));
        }
        read_more(stream, buf).await?;
    }
}

pub(crate) fn parse_head(raw: &[u8]) -> std::io::Result<Head> {
    let bad = || std::io::Error::new(std::io::ErrorKind::InvalidData, "malformed response head");
    let text = std::str::from_utf8(raw).map_err(|_| bad())?;
    let mut lines = text.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .ok_or_else(bad)?;
    let mut head = Head {
        status,
        content_length: None,
        chunked: false,
        close: false,
        from_memory: false,
    };
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("content-length") {
            head.content_length = value.parse().ok();
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            head.chunked = value.to_ascii_lowercase().contains("chunked");
        } else if name.eq_ignore_ascii_case("connection") {
            head.close = value.eq_ignore_ascii_case("close");
        } else if name.eq_ignore_ascii_case("x-answered-from") {
            head.from_memory = value.eq_ignore_ascii_case("memory");
        }
    }
    Ok(head)
}

pub(crate) fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// `Transfer-Encoding: chunked`, incrementally.
#[derive(Default)]
pub(crate) struct Dechunker {
    pub(crate) state: ChunkState,
    pub(crate) pending: Vec<u8>,
}

#[derive(Default, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ChunkState {
    #[default]
    Size,
    Data(usize),
    DataEnd,
    Done,
}

impl Dechunker {
    pub(crate) fn done(&self) -> bool {
        self.state == ChunkState::Done
    }

    pub(crate) fn feed(&mut self, input: &[u8], out: &mut Vec<u8>) -> std::io::Result<()> {
        let bad = || std::io::Error::new(std::io::ErrorKind::InvalidData, "malformed chunked body");
        // The common case, a whole chunk in one read, needs no copy.
        let owned;
        let data: &[u8] = if self.pending.is_empty() {
            input
        } else {
            self.pending.extend_from_slice(input);
            owned = std::mem::take(&mut self.pending);
            &owned
        };
        let mut pos = 0;
        loop {
            match self.state {
                ChunkState::Size => {
                    let Some(i) = find(&data[pos..], b"\r\n") else {
                        break;
                    };
                    let line = std::str::from_utf8(&data[pos..pos + i]).map_err(|_| bad())?;
                    let hex = line.split(';').next().unwrap_or("").trim();
                    let size = usize::from_str_radix(hex, 16).map_err(|_| bad())?;
                    pos += i + 2;
                    self.state = if size == 0 {
                        ChunkState::Done
                    } else {
                        ChunkState::Data(size)
                    };
                }
                ChunkState::Data(rem) => {
                    let take = rem.min(data.len() - pos);
                    if take == 0 {
                        break;
                    }
                    out.extend_from_slice(&data[pos..pos + take]);
                    pos += take;
                    self.state = if take == rem {
                        ChunkState::DataEnd
                    } else {
                        ChunkState::Data(rem - take)
                    };
                }
                ChunkState::DataEnd => {
                    if data.len() - pos < 2 {
                        break;
                    }
                    pos += 2;
                    self.state = ChunkState::Size;
                }
                ChunkState::Done => break,
            }
        }
        if pos < data.len() && !self.done() {
            self.pending = data[pos..].to_vec();
        }
        Ok(())
    }
}
