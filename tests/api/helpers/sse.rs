//! Reading seat streams: frames parsed from `text/event-stream`.

use std::time::Duration;

use futures::StreamExt;
use serde_json::Value;
use tokio::sync::mpsc;

/// One parsed SSE frame.
#[derive(Debug, Clone, PartialEq)]
pub enum SseFrame {
    Retry(u64),
    Event {
        id: i64,
        action: String,
        seats: Vec<(i64, i64)>,
    },
    Resync,
    Comment,
}

/// Reads a seat stream in the background and hands out parsed frames.
pub struct SseClient {
    pub status: u16,
    pub headers: reqwest::header::HeaderMap,
    rx: mpsc::UnboundedReceiver<SseFrame>,
    task: tokio::task::JoinHandle<()>,
}

impl SseClient {
    pub async fn connect(url: &str, last_event_id: Option<&str>) -> SseClient {
        Self::try_connect(url, last_event_id)
            .await
            .expect("stream request")
    }

    /// Like [`SseClient::connect`], for tests where the server may be gone
    /// (killed replicas): the connection error instead of a panic.
    pub async fn try_connect(
        url: &str,
        last_event_id: Option<&str>,
    ) -> Result<SseClient, reqwest::Error> {
        let mut req = reqwest::Client::new().get(url);
        if let Some(id) = last_event_id {
            req = req.header("Last-Event-ID", id);
        }
        let resp = req.send().await?;
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let (tx, rx) = mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            let mut body = resp.bytes_stream();
            let mut buf = String::new();
            while let Some(Ok(chunk)) = body.next().await {
                buf.push_str(&String::from_utf8_lossy(&chunk));
                for frame in take_frames(&mut buf) {
                    if tx.send(frame).is_err() {
                        return;
                    }
                }
            }
        });
        Ok(SseClient {
            status,
            headers,
            rx,
            task,
        })
    }

    /// The next frame, or None if the stream ended or `timeout` passed.
    pub async fn next(&mut self, timeout: Duration) -> Option<SseFrame> {
        tokio::time::timeout(timeout, self.rx.recv())
            .await
            .ok()
            .flatten()
    }

    /// The next frame; `Ok(None)` once the stream ended (the server closed
    /// it or the connection broke), `Err` if it was only silent for `timeout`.
    pub async fn next_or_end(
        &mut self,
        timeout: Duration,
    ) -> Result<Option<SseFrame>, tokio::time::error::Elapsed> {
        tokio::time::timeout(timeout, self.rx.recv()).await
    }

    /// The next frame that is not a comment or retry.
    pub async fn next_event(&mut self, timeout: Duration) -> Option<SseFrame> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.next(left).await? {
                SseFrame::Comment | SseFrame::Retry(_) => continue,
                f => return Some(f),
            }
        }
    }

    /// Event and resync frames (seats sorted; comments and `retry:` skipped)
    /// until an event with id >= `upto` arrives. Panics with what it has
    /// seen if the stream ends or `timeout` passes first.
    pub async fn frames_until(&mut self, upto: i64, timeout: Duration) -> Vec<SseFrame> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut seen = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.next_event(left).await {
                Some(f) => {
                    let done = matches!(f, SseFrame::Event { id, .. } if id >= upto);
                    seen.push(sorted_frame(f));
                    if done {
                        return seen;
                    }
                }
                None => panic!("no event {upto} within {timeout:?}; saw {seen:?}"),
            }
        }
    }

    /// Whether the stream has ended (closed by the server or a proxy in
    /// between) and every frame it carried was handed out: where EventSource
    /// reconnects.
    pub fn ended(&self) -> bool {
        // In this order: once the reader finished, nothing more is queued.
        self.task.is_finished() && self.rx.is_empty()
    }

    pub fn close(self) {
        self.task.abort();
    }
}

impl Drop for SseClient {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Takes the complete blocks (each ended by a blank line) out of `buf` and
/// parses them, for tests that read a stream themselves too.
pub fn take_frames(buf: &mut String) -> Vec<SseFrame> {
    let mut frames = Vec::new();
    while let Some(end) = buf.find("\n\n") {
        let block: String = buf.drain(..end + 2).collect();
        frames.extend(parse_block(&block));
    }
    frames
}

/// The frame with its seats sorted: seat lists have no guaranteed order.
pub fn sorted_frame(frame: SseFrame) -> SseFrame {
    match frame {
        SseFrame::Event {
            id,
            action,
            mut seats,
        } => {
            seats.sort();
            SseFrame::Event { id, action, seats }
        }
        other => other,
    }
}

fn parse_block(block: &str) -> Option<SseFrame> {
    let mut id = None;
    let mut event = None;
    let mut data = String::new();
    let mut retry = None;
    let mut comment = false;
    for line in block.lines() {
        if line.starts_with(':') {
            comment = true;
        } else if let Some(v) = line.strip_prefix("id: ") {
            id = v.parse::<i64>().ok();
        } else if let Some(v) = line.strip_prefix("event: ") {
            event = Some(v.to_owned());
        } else if let Some(v) = line.strip_prefix("data: ") {
            data.push_str(v);
        } else if let Some(v) = line.strip_prefix("retry: ") {
            retry = v.parse().ok();
        }
    }
    if let Some(r) = retry {
        return Some(SseFrame::Retry(r));
    }
    if event.as_deref() == Some("resync") {
        return Some(SseFrame::Resync);
    }
    if let Some(id) = id {
        let v: Value = serde_json::from_str(&data).expect("event data is JSON");
        let seats = v["seats"]
            .as_array()
            .expect("seats")
            .iter()
            .map(|s| (s["row"].as_i64().unwrap(), s["col"].as_i64().unwrap()))
            .collect();
        return Some(SseFrame::Event {
            id,
            action: v["action"].as_str().unwrap().to_owned(),
            seats,
        });
    }
    comment.then_some(SseFrame::Comment)
}
