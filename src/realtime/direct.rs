//! Direct fan-out: a stream that is caught up hands its socket to its
//! schedule's writer task, which writes each event straight to every such
//! socket, with no task woken per stream.
//!
//! Why: in a ticket drop every event goes to thousands of streams on each
//! replica. Waking and polling one task per stream per event cost about a
//! third of the CPU of a delivery (measured with `perf`); the writer pays
//! one wake per event (or per batch of events) instead.
//!
//! The stream stays in charge of everything but the plain case. The writer
//! writes only to a lane that is *direct*: its stream has written every
//! frame it had, its channel was empty when it went direct, and it is
//! waiting. Anything the writer cannot do without waiting (a full socket,
//! a partial write, a gap in the ids, a resync, falling behind its own
//! channel, shutdown) hands the lane back: the stream wakes, takes its
//! position from the lane and reads its own channel as before, skipping
//! what the writer already wrote.

use std::io::{self, IoSlice};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use futures::task::AtomicWaker;
use tokio::sync::broadcast::{self, error::RecvError, error::TryRecvError};
use tokio::time::Instant;

use super::hub::HubMessage;
use super::Frame;

/// A client's socket, as the writer task sees it.
pub trait DirectSink: Send + Sync + 'static {
    /// Writes what the socket takes now, without waiting: `WouldBlock` when
    /// it takes nothing.
    fn try_write_vectored(&self, parts: &[IoSlice<'_>]) -> io::Result<usize>;
    /// Whether each frame goes out as an HTTP/1.1 chunk.
    fn chunked(&self) -> bool;
}

/// Frames the writer sends in one system call at most.
const MAX_BATCH: usize = 64;

/// One stream's connection to its schedule's writer.
pub struct Lane {
    state: Mutex<LaneState>,
    /// The stream's task, woken when the lane is handed back.
    waker: AtomicWaker,
    /// Set by the connection before it asks the stream for frames while it
    /// holds none unwritten: only then may the stream go direct, or the
    /// writer's frames could overtake the connection's.
    flushed: AtomicBool,
    /// The stream is gone: nothing is written to this lane again. Outside
    /// the lock, so that the writer prunes its lanes without taking it.
    gone: AtomicBool,
}

#[derive(Default)]
struct LaneState {
    sink: Option<Arc<dyn DirectSink>>,
    /// The sink's framing, kept here to spare a look into it per write.
    chunked: bool,
    /// The writer may write: the stream is waiting and owns nothing unsent.
    direct: bool,
    /// The id of the last event written to the socket (whole or in part).
    pos: i64,
    /// The unwritten tail of a partial write, already framed: the
    /// connection writes it before anything else.
    rest: Option<Bytes>,
    /// A write failed: the client is gone.
    broken: bool,
    /// When the writer last wrote (for the stream's heartbeat).
    last_write: Option<Instant>,
}

/// What the stream learns when it takes its lane back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TakenBack {
    /// The last event id written to the socket.
    pub pos: i64,
    pub last_write: Option<Instant>,
    pub broken: bool,
}

/// What an attempt to go direct found.
#[derive(Debug)]
pub enum GoDirect {
    /// The writer writes from now on; wait for [`Lane::poll_handed_back`].
    Direct,
    /// Not now (no socket, or the connection holds unwritten frames).
    NotNow,
    /// The channel was not empty: this is its next message.
    Message(Result<HubMessage, RecvError>),
}

impl Lane {
    pub fn new() -> Arc<Self> {
        Arc::new(Lane {
            state: Mutex::default(),
            waker: AtomicWaker::new(),
            flushed: AtomicBool::new(false),
            gone: AtomicBool::new(false),
        })
    }

    fn lock(&self) -> MutexGuard<'_, LaneState> {
        // Every update of the state is a plain assignment: a panic while
        // holding the lock cannot leave it half-updated.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Gives the writer a socket to write to (the connection does this
    /// once, before it writes the response body).
    pub fn attach(&self, sink: Arc<dyn DirectSink>) {
        let mut st = self.lock();
        if !self.is_gone() {
            st.chunked = sink.chunked();
            st.sink = Some(sink);
        }
    }

    pub(super) fn is_gone(&self) -> bool {
        self.gone.load(Ordering::Acquire)
    }

    /// The stream ended: the writer forgets the socket at once, so that it
    /// closes with the connection.
    pub fn detach(&self) {
        let mut st = self.lock();
        self.gone.store(true, Ordering::Release);
        leave_direct(&mut st);
        st.sink = None;
    }

    /// The connection says whether it holds nothing unwritten as it asks
    /// the stream for frames: only then may the stream go direct.
    pub fn set_flushed(&self, flushed: bool) {
        self.flushed.store(flushed, Ordering::Relaxed);
    }

    /// Ready while the connection holds nothing unwritten. It registers no
    /// waker: the connection sets the flag, then polls the stream.
    pub fn poll_flushed(&self) -> Poll<()> {
        if self.flushed.load(Ordering::Relaxed) {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    }

    /// The unwritten tail of the writer's last write, if any.
    pub fn take_rest(&self) -> Option<Bytes> {
        self.lock().rest.take()
    }

    /// Hands the socket to the writer if the stream, at `pos`, has nothing
    /// left to read. Checked under the lane's lock, which the writer takes
    /// for every write: an event the writer skipped because the lane was
    /// not yet direct is still in the channel here, and one sent after is
    /// written by the writer.
    pub fn try_go_direct(&self, rx: &mut broadcast::Receiver<HubMessage>, pos: i64) -> GoDirect {
        if !self.flushed.load(Ordering::Relaxed) {
            return GoDirect::NotNow;
        }
        let mut st = self.lock();
        if st.sink.is_none() || self.is_gone() || st.broken || st.rest.is_some() {
            // Until the connection flushes again: the stream waits on it.
            self.flushed.store(false, Ordering::Relaxed);
            return GoDirect::NotNow;
        }
        match rx.try_recv() {
            Err(TryRecvError::Empty) => {
                st.direct = true;
                st.pos = pos;
                metrics::counter!("seatsync_sse_direct_handoffs_total").increment(1);
                metrics::gauge!("seatsync_sse_direct_streams").increment(1.0);
                GoDirect::Direct
            }
            Ok(message) => GoDirect::Message(Ok(message)),
            Err(TryRecvError::Lagged(n)) => GoDirect::Message(Err(RecvError::Lagged(n))),
            Err(TryRecvError::Closed) => GoDirect::Message(Err(RecvError::Closed)),
        }
    }

    /// Ready once the writer has handed the lane back.
    pub fn poll_handed_back(&self, cx: &mut Context<'_>) -> Poll<()> {
        self.waker.register(cx.waker());
        if self.lock().direct {
            Poll::Pending
        } else {
            Poll::Ready(())
        }
    }

    /// The stream takes the lane back (to write something itself, or
    /// because the writer handed it back).
    pub fn take_back(&self) -> TakenBack {
        let mut st = self.lock();
        leave_direct(&mut st);
        TakenBack {
            pos: st.pos,
            last_write: st.last_write,
            broken: st.broken,
        }
    }

    /// The writer gives up the lane; the stream carries on.
    pub(super) fn hand_back(&self, reason: Handback) {
        let was_direct = leave_direct(&mut self.lock());
        if was_direct {
            reason.count();
            self.waker.wake();
        }
    }

    /// Writes the frames after the lane's position, in order, if the lane
    /// is direct and they continue it without a gap. `frames` are in
    /// publishing order.
    pub(super) fn deliver(&self, frames: &[Arc<Frame>], now: Instant) {
        let mut st = self.lock();
        if !st.direct {
            return;
        }
        let pos = st.pos;
        let Some(start) = frames.iter().position(|f| f.id > pos) else {
            return;
        };
        let mut end = start;
        while end < frames.len() && frames[end].id == pos + 1 + (end - start) as i64 {
            end += 1;
        }
        let end = end.min(start + MAX_BATCH);
        // Whatever is not written now, the stream writes (or replays).
        let gap = end < frames.len();
        let chunked = st.chunked;
        let outcome = match &st.sink {
            Some(sink) if end > start => {
                let mut slices = [IoSlice::new(&[]); MAX_BATCH];
                for (slice, f) in slices.iter_mut().zip(&frames[start..end]) {
                    *slice = IoSlice::new(wire(f, chunked));
                }
                match sink.try_write_vectored(&slices[..end - start]) {
                    Ok(n) => Written::Some(n),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => Written::Nothing,
                    Err(_) => Written::Failed,
                }
            }
            _ => Written::Nothing,
        };
        let handed_back = match outcome {
            Written::Some(n) => {
                st.pos = frames[end - 1].id;
                st.last_write = Some(now);
                let sent = &frames[start..end];
                let total: usize = sent.iter().map(|f| wire(f, chunked).len()).sum();
                if n < total {
                    st.rest = Some(unwritten(sent, chunked, n));
                    Some(Handback::PartialWrite)
                } else {
                    gap.then_some(Handback::Gap)
                }
            }
            Written::Nothing if end > start => Some(Handback::SocketFull),
            Written::Nothing => Some(Handback::Gap),
            Written::Failed => {
                st.broken = true;
                Some(Handback::WriteFailed)
            }
        };
        if let Some(reason) = handed_back {
            leave_direct(&mut st);
            drop(st);
            reason.count();
            self.waker.wake();
        }
    }
}

/// Ends the lane's direct spell, if it is in one; whether it was.
fn leave_direct(st: &mut LaneState) -> bool {
    let was = std::mem::take(&mut st.direct);
    if was {
        metrics::gauge!("seatsync_sse_direct_streams").decrement(1.0);
    }
    was
}

/// Why the writer handed a lane back (the label of
/// `seatsync_sse_direct_handbacks_total`).
#[derive(Debug, Clone, Copy)]
pub(super) enum Handback {
    /// The socket took nothing: a slow client.
    SocketFull,
    /// The socket took part of a write: a slow client, and the connection
    /// writes the rest.
    PartialWrite,
    /// The next event is not the one after the lane's position.
    Gap,
    WriteFailed,
    /// A resync, the writer falling behind its channel, or the channel
    /// closing.
    Writer,
}

impl Handback {
    fn count(self) {
        let reason = match self {
            Handback::SocketFull => "socket_full",
            Handback::PartialWrite => "partial_write",
            Handback::Gap => "gap",
            Handback::WriteFailed => "write_failed",
            Handback::Writer => "writer",
        };
        metrics::counter!("seatsync_sse_direct_handbacks_total", "reason" => reason).increment(1);
    }
}

enum Written {
    Some(usize),
    Nothing,
    Failed,
}

/// A frame as it goes on this lane's wire.
fn wire(frame: &Frame, chunked: bool) -> &Bytes {
    if chunked {
        &frame.chunk
    } else {
        &frame.bytes
    }
}

/// The wire bytes of `frames` after the first `written`.
fn unwritten(frames: &[Arc<Frame>], chunked: bool, mut written: usize) -> Bytes {
    let mut rest = BytesMut::new();
    for f in frames {
        let p = wire(f, chunked);
        if written >= p.len() {
            written -= p.len();
        } else {
            rest.extend_from_slice(&p[written..]);
            written = 0;
        }
    }
    rest.freeze()
}

/// The lanes of one schedule that have a socket.
pub(super) type Lanes = Arc<Mutex<Vec<Arc<Lane>>>>;

/// One schedule's writer: reads the schedule's channel and writes each
/// batch of events to every direct lane. Ends when the channel closes
/// (the schedule's last subscriber left, or shutdown), handing every lane
/// back so that each stream ends after its own channel.
///
/// Events that arrive while a round of writes is under way join it for
/// the lanes not yet written (one send carries both), and start the next
/// round, where the lanes written before get them. Under load the lanes
/// late in a round so get the next event without waiting for a whole
/// round, in fewer sends.
pub(super) async fn write_loop(mut rx: broadcast::Receiver<HubMessage>, lanes: Lanes) {
    let mut batch: Vec<Arc<Frame>> = Vec::with_capacity(MAX_BATCH);
    let mut stop: Option<Stop> = None;
    loop {
        if batch.is_empty() {
            let first = rx.recv().await;
            take(first, &mut batch, &mut stop);
        }
        gather(&mut rx, &mut batch, &mut stop);
        let snapshot: Vec<Arc<Lane>> = {
            let mut lanes = lanes.lock().unwrap_or_else(|p| p.into_inner());
            lanes.retain(|l| !l.is_gone());
            lanes.clone()
        };
        let now = Instant::now();
        let round = batch.len();
        for (i, lane) in snapshot.iter().enumerate() {
            if i % LANES_PER_LOOK == 0 && i > 0 {
                gather(&mut rx, &mut batch, &mut stop);
            }
            if !batch.is_empty() {
                lane.deliver(&batch, now);
            }
        }
        if let Some(why) = stop.take() {
            for lane in &snapshot {
                lane.hand_back(Handback::Writer);
            }
            if why == Stop::Closed {
                return;
            }
            batch.clear();
            continue;
        }
        // What joined mid-round is still owed to the lanes before it.
        batch.drain(..round);
    }
}

/// Lanes written between two looks at the channel within a round.
const LANES_PER_LOOK: usize = 64;

/// Why the writer stops following its lanes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stop {
    /// A resync, or the writer fell behind its channel: a lane cannot
    /// follow past it, its stream reads its own channel (and replays
    /// from the log where needed).
    HandBack,
    Closed,
}

fn take(
    message: Result<HubMessage, RecvError>,
    batch: &mut Vec<Arc<Frame>>,
    stop: &mut Option<Stop>,
) {
    match message {
        Ok(HubMessage::Event(frame)) => batch.push(frame),
        Ok(HubMessage::Resync) | Err(RecvError::Lagged(_)) => *stop = Some(Stop::HandBack),
        Err(RecvError::Closed) => *stop = Some(Stop::Closed),
    }
}

/// Adds what the channel holds now to `batch`, up to a stop.
fn gather(
    rx: &mut broadcast::Receiver<HubMessage>,
    batch: &mut Vec<Arc<Frame>>,
    stop: &mut Option<Stop>,
) {
    while stop.is_none() && batch.len() < MAX_BATCH {
        let message = match rx.try_recv() {
            Ok(m) => Ok(m),
            Err(TryRecvError::Empty) => return,
            Err(TryRecvError::Lagged(n)) => Err(RecvError::Lagged(n)),
            Err(TryRecvError::Closed) => Err(RecvError::Closed),
        };
        take(message, batch, stop);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::realtime::test_event;

    /// A socket that takes up to `room` bytes, then blocks.
    struct Sink {
        written: Mutex<Vec<u8>>,
        room: Mutex<usize>,
        fail: bool,
    }

    impl Sink {
        fn new(room: usize) -> Arc<Self> {
            Arc::new(Sink {
                written: Mutex::default(),
                room: Mutex::new(room),
                fail: false,
            })
        }
        fn text(&self) -> String {
            String::from_utf8(self.written.lock().unwrap().clone()).unwrap()
        }
    }

    impl DirectSink for Sink {
        fn try_write_vectored(&self, parts: &[IoSlice<'_>]) -> io::Result<usize> {
            if self.fail {
                return Err(io::ErrorKind::BrokenPipe.into());
            }
            let mut room = self.room.lock().unwrap();
            if *room == 0 {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            let mut n = 0;
            for p in parts {
                let take = p.len().min(*room);
                self.written.lock().unwrap().extend_from_slice(&p[..take]);
                *room -= take;
                n += take;
            }
            Ok(n)
        }
        fn chunked(&self) -> bool {
            false
        }
    }

    fn frame(id: i64) -> Arc<Frame> {
        Arc::new(Frame::of(&test_event(id)))
    }

    fn direct_lane(sink: Arc<Sink>, pos: i64) -> Arc<Lane> {
        let lane = Lane::new();
        lane.attach(sink);
        lane.set_flushed(true);
        let (_tx, mut rx) = broadcast::channel::<HubMessage>(4);
        assert!(matches!(lane.try_go_direct(&mut rx, pos), GoDirect::Direct));
        lane
    }

    #[test]
    fn writes_what_follows_the_position_and_skips_what_it_had() {
        let sink = Sink::new(usize::MAX);
        let lane = direct_lane(sink.clone(), 2);
        lane.deliver(&[frame(1), frame(2), frame(3), frame(4)], Instant::now());
        lane.deliver(&[frame(4)], Instant::now());
        assert_eq!(sink.text(), format!("{}{}", text(3), text(4)));
        let back = lane.take_back();
        assert_eq!((back.pos, back.broken), (4, false));
        assert!(back.last_write.is_some());
    }

    fn text(id: i64) -> String {
        String::from_utf8(frame(id).bytes.to_vec()).unwrap()
    }

    #[test]
    fn a_gap_is_written_up_to_and_then_handed_back() {
        let sink = Sink::new(usize::MAX);
        let lane = direct_lane(sink.clone(), 0);
        lane.deliver(&[frame(1), frame(3)], Instant::now());
        assert_eq!(sink.text(), text(1));
        assert!(!lane.lock().direct);
        assert_eq!(lane.take_back().pos, 1);
    }

    #[test]
    fn a_partial_write_leaves_its_tail_for_the_connection() {
        let sink = Sink::new(10);
        let lane = direct_lane(sink.clone(), 0);
        lane.deliver(&[frame(1), frame(2)], Instant::now());
        let rest = lane.take_rest().expect("a rest");
        assert_eq!(
            format!(
                "{}{}",
                sink.text(),
                String::from_utf8(rest.to_vec()).unwrap()
            ),
            format!("{}{}", text(1), text(2))
        );
        assert_eq!(lane.take_back().pos, 2);
        // Handed back: nothing more is written.
        *sink.room.lock().unwrap() = usize::MAX;
        lane.deliver(&[frame(3)], Instant::now());
        assert_eq!(sink.text().len(), 10);
    }

    #[test]
    fn a_full_socket_hands_back_with_the_position_unchanged() {
        let sink = Sink::new(0);
        let lane = direct_lane(sink.clone(), 5);
        lane.deliver(&[frame(6)], Instant::now());
        assert!(lane.take_rest().is_none());
        assert_eq!(lane.take_back().pos, 5);
    }

    #[test]
    fn a_failed_write_marks_the_lane_broken() {
        let sink = Arc::new(Sink {
            written: Mutex::default(),
            room: Mutex::new(usize::MAX),
            fail: true,
        });
        let lane = direct_lane(sink, 0);
        lane.deliver(&[frame(1)], Instant::now());
        assert!(!lane.lock().direct);
        assert!(lane.take_back().broken);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_writer_gives_every_direct_lane_every_event_once_in_order() {
        let (tx, _) = broadcast::channel::<HubMessage>(4096);
        let lanes = Lanes::default();
        let mut sinks = Vec::new();
        for _ in 0..300 {
            let sink = Sink::new(usize::MAX);
            lanes.lock().unwrap().push(direct_lane(sink.clone(), 0));
            sinks.push(sink);
        }
        let writer = tokio::spawn(write_loop(tx.subscribe(), lanes));
        // Sent from another thread while the writer writes, so that events
        // also join rounds under way.
        let sender = std::thread::spawn(move || {
            for id in 1..=500 {
                tx.send(HubMessage::Event(frame(id))).unwrap();
                if id % 50 == 0 {
                    std::thread::sleep(std::time::Duration::from_millis(1));
                }
            }
        });
        sender.join().unwrap();
        // The channel closed: the writer writes what it has, then ends.
        writer.await.unwrap();
        let all: String = (1..=500).map(text).collect();
        for sink in &sinks {
            assert_eq!(sink.text(), all);
        }
    }

    #[test]
    fn goes_direct_only_when_flushed_attached_and_the_channel_is_empty() {
        let (tx, mut rx) = broadcast::channel::<HubMessage>(4);
        let lane = Lane::new();
        lane.set_flushed(true);
        assert!(matches!(lane.try_go_direct(&mut rx, 0), GoDirect::NotNow));
        lane.attach(Sink::new(usize::MAX));
        lane.set_flushed(false);
        assert!(matches!(lane.try_go_direct(&mut rx, 0), GoDirect::NotNow));
        lane.set_flushed(true);
        tx.send(HubMessage::Event(frame(1))).unwrap();
        assert!(matches!(
            lane.try_go_direct(&mut rx, 0),
            GoDirect::Message(Ok(HubMessage::Event(_)))
        ));
        assert!(matches!(lane.try_go_direct(&mut rx, 1), GoDirect::Direct));
        lane.detach();
        assert!(lane.is_gone());
        assert!(!lane.lock().direct);
    }
}
