//! One client's seat-event stream: replay what it missed, then go live,
//! with no gap and no duplicate at the seam.
//!
//! The subscription to the schedule's channel is taken *before* the
//! starting position is read from the database, so every event committed
//! after that read arrives live; events at or below the position are
//! dropped. Ids are dense per schedule, so a hole in the live sequence is
//! seen at once and filled from the log.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::Stream;
use tokio::sync::broadcast::error::RecvError;
use tokio::time::Instant;

use super::direct::{DirectSink, GoDirect, Lane};
use super::event_log::EventLog;
use super::hub::{HubMessage, ScheduleHubs, Subscription};
use super::{Frame, HEARTBEAT_FRAME, RESYNC_FRAME, RETRY_FRAME};
use crate::db::DbError;

/// Where a client asked to start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resume {
    /// No `Last-Event-ID`: changes from the moment of subscription.
    Live,
    /// Replay everything after this id.
    After(i64),
    /// A `Last-Event-ID` that is not a number: resync, then live.
    Invalid,
}

impl Resume {
    pub fn parse(value: Option<&str>) -> Self {
        match value.map(str::trim) {
            None => Resume::Live,
            Some(v) => match v.parse::<i64>() {
                Ok(n) if n >= 0 => Resume::After(n),
                _ => Resume::Invalid,
            },
        }
    }
}

/// Why a stream could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("schedule {0} does not exist")]
    ScheduleNotFound(i64),
    #[error(transparent)]
    Db(#[from] DbError),
}

/// Opens the seat-event streams of this replica's clients.
#[derive(Clone)]
pub struct SeatStreams {
    hubs: ScheduleHubs,
    log: EventLog,
    heartbeat: Duration,
}

impl SeatStreams {
    pub fn new(hubs: ScheduleHubs, log: EventLog, heartbeat: Duration) -> Self {
        Self {
            hubs,
            log,
            heartbeat,
        }
    }

    /// Ends every stream (shutdown), see [`ScheduleHubs::close`].
    pub fn end_all(&self) {
        self.hubs.close();
    }

    /// The hubs the listener relay publishes to.
    pub fn hubs(&self) -> &ScheduleHubs {
        &self.hubs
    }

    /// The log the listener relay replays gaps from.
    pub fn log(&self) -> &EventLog {
        &self.log
    }

    /// Schedules with a live channel on this replica.
    pub fn channel_count(&self) -> usize {
        self.hubs.channel_count()
    }

    /// Opens one client's stream of a schedule's seat events, starting where
    /// `resume` says. `guard` lives as long as the stream (it keeps the
    /// connection gauge honest).
    ///
    /// The order is the whole point: subscribe, then read the position
    /// (nothing committed after the read can be missed), then register the
    /// position with the hub at once (so a listener reconnect's gap replay
    /// covers this client), then check that the listener did not reconnect
    /// meanwhile.
    ///
    /// With the stream comes its [`DirectWrites`]: a connection that can
    /// write to its socket without waiting hands it over through it.
    pub async fn open<G: Send + 'static>(
        &self,
        schedule_id: i64,
        mut resume: Resume,
        guard: G,
    ) -> Result<
        (
            impl Stream<Item = Result<Bytes, Infallible>> + Send + 'static,
            DirectWrites,
        ),
        OpenError,
    > {
        let generation = self.hubs.generation();
        let sub = self.hubs.subscribe(schedule_id);
        let mut newest = self.last_event_id(schedule_id).await?;
        self.hubs.register_position(schedule_id, newest);
        if self.hubs.generation() != generation {
            // The listener reconnected while we subscribed, and its gap
            // replay may have run before we registered: events committed
            // while it was down were never notified. Replay up to now
            // ourselves.
            let now = self.last_event_id(schedule_id).await?;
            if resume == Resume::Live {
                resume = Resume::After(newest);
            }
            newest = now;
        }
        let lane = Lane::new();
        let direct = DirectWrites {
            lane: lane.clone(),
            hubs: self.hubs.clone(),
            schedule_id,
        };
        Ok((
            seat_event_stream(self.clone(), sub, resume, newest, guard, lane),
            direct,
        ))
    }

    async fn last_event_id(&self, schedule_id: i64) -> Result<i64, OpenError> {
        self.log
            .last_event_id(schedule_id)
            .await?
            .ok_or(OpenError::ScheduleNotFound(schedule_id))
    }
}

/// Lets the schedule's writer task write a stream's events straight to its
/// client's socket while the stream is caught up (see
/// [`super::direct`]). Unused, the stream writes everything itself.
#[derive(Clone)]
pub struct DirectWrites {
    lane: Arc<Lane>,
    hubs: ScheduleHubs,
    schedule_id: i64,
}

impl DirectWrites {
    /// Hands over the socket. From now on the connection must tell the
    /// lane when it holds nothing unwritten ([`Lane::set_flushed`]) and
    /// write the lane's rest ([`Lane::take_rest`]) before anything else.
    pub fn attach(&self, sink: Arc<dyn DirectSink>) -> Option<Arc<Lane>> {
        if !self.hubs.register_lane(self.schedule_id, self.lane.clone()) {
            return None;
        }
        self.lane.attach(sink);
        Some(self.lane.clone())
    }
}

/// Forgets the socket when the stream ends.
struct Detach(Arc<Lane>);

impl Drop for Detach {
    fn drop(&mut self) {
        self.0.detach();
    }
}

/// The byte stream of one client. `newest` is the schedule's last event
/// id, read after `sub` was taken; it is where a live stream starts.
fn seat_event_stream<G: Send + 'static>(
    ctx: SeatStreams,
    mut sub: Subscription,
    resume: Resume,
    newest: i64,
    guard: G,
    lane: Arc<Lane>,
) -> impl Stream<Item = Result<Bytes, Infallible>> + Send + 'static {
    async_stream::stream! {
        let _guard = guard;
        let _detach = Detach(lane.clone());
        let schedule_id = sub.schedule_id();
        yield Ok(Bytes::from_static(RETRY_FRAME));

        // `pos`: the last event id this client has. `None` after a resync
        // the relay could not repair: the next live event sets it.
        let mut pos: Option<i64> = Some(newest);
        match resume {
            Resume::Live => {}
            Resume::Invalid => yield Ok(Bytes::from_static(RESYNC_FRAME)),
            Resume::After(n) if n > newest => yield Ok(Bytes::from_static(RESYNC_FRAME)),
            Resume::After(n) => {
                // Boxed here and below: kept inline, a database query's
                // state would make every idle stream that much larger.
                for f in Box::pin(replay_frames(&ctx.log, schedule_id, n, newest)).await {
                    yield Ok(f);
                }
            }
        }

        // One timer per stream, re-armed only when it fires: an event costs
        // a clock read, not a timer registration. It fires `heartbeat` after
        // the last frame sent, or later, never sooner.
        let mut last_sent = Instant::now();
        let heartbeat = tokio::time::sleep_until(last_sent + ctx.heartbeat);
        tokio::pin!(heartbeat);
        // Whether the schedule's writer task writes this stream's events.
        let mut direct = false;
        // Set when the lane comes back: the channel was not read while the
        // writer wrote, so its first read may report a lag.
        let mut back_from_direct = false;
        // Such a lag, until the next event shows whether it lost anything:
        // it did if that event is past the position (the writer had
        // written up to it), and then the client is as slow as any other
        // that lags.
        let mut lagged_while_direct = false;
        loop {
            let message = if direct {
                let handed_back = tokio::select! {
                    biased;
                    () = std::future::poll_fn(|cx| lane.poll_handed_back(cx)) => true,
                    () = &mut heartbeat => false,
                };
                let back = lane.take_back();
                direct = false;
                back_from_direct = true;
                if back.broken {
                    break;
                }
                pos = Some(back.pos);
                if let Some(at) = back.last_write {
                    last_sent = last_sent.max(at);
                }
                if handed_back {
                    continue;
                }
                Err(())
            } else {
                let ready = match pos {
                    Some(p) => sub.go_direct(&lane, p),
                    None => GoDirect::NotNow,
                };
                match ready {
                    GoDirect::Direct => {
                        direct = true;
                        continue;
                    }
                    GoDirect::Message(m) => Ok(m),
                    GoDirect::NotNow => tokio::select! {
                        biased;
                        m = sub.recv() => Ok(m),
                        () = &mut heartbeat => Err(()),
                        // The connection has written everything: try again.
                        () = std::future::poll_fn(|_| lane.poll_flushed()), if pos.is_some() => continue,
                    },
                }
            };
            let mut lost = false;
            if let Ok(read) = &message {
                if back_from_direct && matches!(read, Err(RecvError::Lagged(_))) {
                    back_from_direct = false;
                    lagged_while_direct = true;
                    continue;
                }
                back_from_direct = false;
                lost = std::mem::take(&mut lagged_while_direct);
            }
            match message {
                Err(()) => {
                    let now = Instant::now();
                    if now >= last_sent + ctx.heartbeat {
                        last_sent = now;
                        yield Ok(Bytes::from_static(HEARTBEAT_FRAME));
                    }
                    heartbeat.as_mut().reset(last_sent + ctx.heartbeat);
                }
                Ok(Ok(HubMessage::Event(frame))) => {
                    let expected = pos.map(|p| p + 1);
                    match expected {
                        Some(next) if frame.id < next => continue,
                        Some(next) if frame.id > next && lost => {
                            // Overwritten in the channel while the socket
                            // was full: cut off, as below.
                            metrics::counter!("seatsync_sse_lagged_total").increment(1);
                            tracing::debug!(schedule_id, "slow SSE client disconnected");
                            break;
                        }
                        Some(next) if frame.id > next => {
                            // A hole: fill it from the log, or resync.
                            for f in Box::pin(replay_frames(&ctx.log, schedule_id, next - 1, frame.id - 1)).await {
                                yield Ok(f);
                            }
                        }
                        _ => {}
                    }
                    pos = Some(frame.id);
                    last_sent = Instant::now();
                    yield Ok(frame.bytes.clone());
                }
                Ok(Ok(HubMessage::Resync)) => {
                    pos = None;
                    last_sent = Instant::now();
                    yield Ok(Bytes::from_static(RESYNC_FRAME));
                }
                Ok(Err(RecvError::Lagged(missed))) => {
                    // Too slow to keep up. Ending the stream bounds memory;
                    // EventSource reconnects with Last-Event-ID and replays.
                    metrics::counter!("seatsync_sse_lagged_total").increment(1);
                    tracing::debug!(schedule_id, missed, "slow SSE client disconnected");
                    break;
                }
                Ok(Err(RecvError::Closed)) => break,
            }
        }
    }
}

/// The frames of the events `after < id <= upto`, or a resync frame when
/// the log cannot provide every one of them (pruned, or unreachable).
async fn replay_frames(log: &EventLog, schedule_id: i64, after: i64, upto: i64) -> Vec<Bytes> {
    match log.replay(schedule_id, after, upto).await {
        Ok(events) => events.iter().map(|e| Frame::of(e).bytes).collect(),
        Err(e) => {
            tracing::debug!(schedule_id, after, upto, error = %e, "cannot replay; resync");
            vec![Bytes::from_static(RESYNC_FRAME)]
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_resume_positions() {
        assert_eq!(Resume::parse(None), Resume::Live);
        assert_eq!(Resume::parse(Some("42")), Resume::After(42));
        assert_eq!(Resume::parse(Some(" 7 ")), Resume::After(7));
        assert_eq!(Resume::parse(Some("-1")), Resume::Invalid);
        assert_eq!(Resume::parse(Some("x")), Resume::Invalid);
        assert_eq!(Resume::parse(Some("99999999999999999999")), Resume::Invalid);
    }
}
