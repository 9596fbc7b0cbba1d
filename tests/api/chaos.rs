//! A randomized chaos test: a booking storm on three replicas of a private
//! PostgreSQL cluster while replicas are killed (`-9`) and restarted on new
//! ports, listener and pooled backends are terminated, viewers drop their
//! streams and resume, and PostgreSQL restarts once. Afterwards every
//! invariant of the contract is checked against the answers given during
//! the storm.
//!
//! The plan (every user's choices, every viewer's drops, the faults and
//! their times) comes from one seed: `SEATSYNC_CHAOS_SEED` replays it (the
//! timing of the real processes differs run to run). The storm lasts
//! `SEATSYNC_CHAOS_SECONDS` (default 60).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use futures::future::join_all;
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use serde_json::{json, Value};
use tokio::sync::watch;

use crate::helpers::*;

const REPLICAS: usize = 3;
const USERS: usize = 40;
const SCHEDULES: usize = 2;
const VIEWERS_PER_SCHEDULE: usize = 4;
const COLS: i64 = 20;
/// Short, so that holds expire (and are swept) many times during the storm.
const HOLD_SECONDS: i64 = 3;
/// How long after a fault ended (the replica or database serving again)
/// 5xx answers and broken connections are still put down to it.
const FAULT_GRACE: Duration = Duration::from_secs(3);
/// Users aim at the first this many seats not known to be sold, so that
/// holds keep colliding however far the hall has sold.
const HOT_SEATS: usize = 40;
/// The contract: an expired hold is released within 2 s.
const RELEASE_WITHIN: f64 = 2.0;

fn chaos_seed() -> u64 {
    match std::env::var("SEATSYNC_CHAOS_SEED") {
        Ok(s) => {
            let s = s.trim();
            let parsed = match s.strip_prefix("0x") {
                Some(hex) => u64::from_str_radix(hex, 16),
                None => s.parse(),
            };
            parsed.unwrap_or_else(|e| panic!("SEATSYNC_CHAOS_SEED={s}: {e}"))
        }
        Err(_) => rand::random(),
    }
}

fn storm_duration() -> Duration {
    let secs = std::env::var("SEATSYNC_CHAOS_SECONDS")
        .ok()
        .map(|s| {
            s.trim()
                .parse::<u64>()
                .unwrap_or_else(|e| panic!("SEATSYNC_CHAOS_SECONDS={s}: {e}"))
        })
        .unwrap_or(60);
    Duration::from_secs(secs.max(20))
}

/// A sub-seed per part of the plan, so that each user's and viewer's
/// choices depend only on the seed and its index.
fn sub_rng(seed: u64, part: u64, index: u64) -> StdRng {
    StdRng::seed_from_u64(
        seed ^ part.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ index.wrapping_mul(0xbf58_476d_1ce4_e5b9),
    )
}

/// The base URLs of the replicas that run, by slot. A killed replica's
/// slot is empty until its successor (on a new port) is ready.
#[derive(Clone, Default)]
struct Live(Arc<Mutex<[Option<String>; REPLICAS]>>);

impl Live {
    /// Slot `want` if it runs, else the next one that does.
    fn pick(&self, want: usize) -> Option<(usize, String)> {
        let slots = self.0.lock().unwrap();
        (0..REPLICAS)
            .map(|i| (want + i) % REPLICAS)
            .find_map(|i| slots[i].clone().map(|b| (i, b)))
    }

    fn set(&self, slot: usize, base: Option<String>) {
        self.0.lock().unwrap()[slot] = base;
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum FaultKind {
    KillReplica,
    TerminateListeners,
    TerminatePooled,
    PgRestart,
}

impl fmt::Display for FaultKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            FaultKind::KillReplica => "kill -9 + restart of a replica",
            FaultKind::TerminateListeners => "pg_terminate_backend of listeners",
            FaultKind::TerminatePooled => "pg_terminate_backend of pooled connections",
            FaultKind::PgRestart => "PostgreSQL restart",
        })
    }
}

/// When a fault was in force: from its injection until what it broke
/// served again, plus [`FAULT_GRACE`].
#[derive(Clone, Default)]
struct Windows(Arc<Mutex<Vec<Window>>>);

/// A fault's kind, when it was injected, and when it stopped counting.
type Window = (FaultKind, Instant, Option<Instant>);

/// A seat map: (row, col) -> OCCUPIED or CONFIRMED.
type SeatMap = BTreeMap<(i64, i64), String>;

impl Windows {
    fn open(&self, kind: FaultKind) -> usize {
        let mut w = self.0.lock().unwrap();
        w.push((kind, Instant::now(), None));
        w.len() - 1
    }

    fn close(&self, i: usize) {
        self.0.lock().unwrap()[i].2 = Some(Instant::now() + FAULT_GRACE);
    }

    /// The faults in force at any time between `from` and `to`.
    fn during(&self, from: Instant, to: Instant) -> Vec<FaultKind> {
        self.0
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, start, end)| *start <= to && end.is_none_or(|e| from <= e))
            .map(|(k, _, _)| *k)
            .collect()
    }
}

/// One planned fault: what, and when (from the start of the storm).
#[derive(Debug, Clone)]
enum Fault {
    /// Kill -9 the replica in `slot`; start a new one after `down`.
    Kill {
        slot: usize,
        down: Duration,
    },
    /// Terminate the LISTEN backend of the replica in `slot`, or of all.
    Listeners {
        slot: Option<usize>,
    },
    /// Terminate each pooled backend with probability `percent`, chosen by
    /// `pick` (a seed).
    Pooled {
        percent: u32,
        pick: u64,
    },
    PgRestart,
}

impl Fault {
    fn kind(&self) -> FaultKind {
        match self {
            Fault::Kill { .. } => FaultKind::KillReplica,
            Fault::Listeners { .. } => FaultKind::TerminateListeners,
            Fault::Pooled { .. } => FaultKind::TerminatePooled,
            Fault::PgRestart => FaultKind::PgRestart,
        }
    }
}

/// Faults every 3-7 s from the 4th second to 6 s before the end, and
/// exactly one PostgreSQL restart between 35% and 65% of the storm.
fn plan_faults(seed: u64, storm: Duration) -> Vec<(Duration, Fault)> {
    let mut rng = sub_rng(seed, 1, 0);
    let mut plan = Vec::new();
    let last = storm.saturating_sub(Duration::from_secs(6));
    let mut t = Duration::from_secs(4);
    while t < last {
        let fault = match rng.random_range(0..100) {
            0..35 => Fault::Kill {
                slot: rng.random_range(0..REPLICAS),
                down: Duration::from_millis(rng.random_range(500..4000)),
            },
            35..65 => Fault::Listeners {
                slot: rng.random_bool(0.7).then(|| rng.random_range(0..REPLICAS)),
            },
            _ => Fault::Pooled {
                percent: [30, 60, 100][rng.random_range(0..3)],
                pick: rng.random(),
            },
        };
        plan.push((t, fault));
        t += Duration::from_millis(rng.random_range(3000..7000));
    }
    let restart_at = storm.mul_f64(rng.random_range(0.35..0.65));
    plan.push((restart_at, Fault::PgRestart));
    plan.sort_by_key(|(t, _)| *t);
    plan
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum OpKind {
    Start,
    BestAvailable,
    Confirm,
    Cancel,
}

/// A request's answer, or why there was none.
#[derive(Debug)]
enum Outcome {
    Answer {
        status: u16,
        problem: bool,
        body: Value,
    },
    Lost(String),
}

/// One request of the storm, as sent and answered.
#[derive(Debug)]
struct Op {
    kind: OpKind,
    user: usize,
    slot: usize,
    schedule: i64,
    sent: Instant,
    recv: Instant,
    outcome: Outcome,
    /// The booking confirmed or cancelled.
    booking: Option<String>,
    /// The seats a start named, or the quantity a best-available start asked.
    seats: Option<SeatSet>,
    quantity: Option<usize>,
}

impl Op {
    fn status(&self) -> Option<u16> {
        match &self.outcome {
            Outcome::Answer { status, .. } => Some(*status),
            Outcome::Lost(_) => None,
        }
    }

    fn body(&self) -> &Value {
        match &self.outcome {
            Outcome::Answer { body, .. } => body,
            Outcome::Lost(_) => &Value::Null,
        }
    }

    fn code(&self) -> &str {
        self.body()["code"].as_str().unwrap_or("")
    }
}

/// What the storm's users, viewers and faults share.
struct Ctx {
    http: reqwest::Client,
    live: Live,
    /// (schedule id, rows)
    schedules: Vec<(i64, i64)>,
    /// Seats known to be sold (confirmed), per schedule.
    sold: Mutex<HashMap<i64, BTreeSet<(i64, i64)>>>,
    storm_end: Instant,
}

impl Ctx {
    /// Sends one request (retrying connection errors and 5xx on the next
    /// live replica, with the same Idempotency-Key, as the page does) and
    /// records every attempt. The last answer below 500, if any.
    #[allow(clippy::too_many_arguments)]
    async fn call(
        &self,
        ops: &mut Vec<Op>,
        kind: OpKind,
        user: usize,
        want: usize,
        schedule: i64,
        path: &str,
        token: &str,
        body: Option<Value>,
        key: Option<&str>,
        booking: Option<&str>,
    ) -> Option<(u16, Value)> {
        for attempt in 0..4 {
            if attempt > 0 && Instant::now() >= self.storm_end {
                return None;
            }
            let Some((slot, base)) = self.live.pick(want + attempt) else {
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            };
            let mut req = self.http.post(format!("{base}{path}")).bearer_auth(token);
            if let Some(b) = &body {
                req = req.json(b);
            }
            if let Some(k) = key {
                req = req.header("Idempotency-Key", k);
            }
            let sent = Instant::now();
            let outcome = match req.send().await {
                Ok(r) => {
                    let status = r.status().as_u16();
                    let problem = r
                        .headers()
                        .get("content-type")
                        .is_some_and(|v| v == "application/problem+json");
                    match r.bytes().await {
                        Ok(bytes) => Outcome::Answer {
                            status,
                            problem,
                            body: serde_json::from_slice(&bytes).unwrap_or(Value::Null),
                        },
                        Err(e) => Outcome::Lost(format!("{status}, then the body: {e}")),
                    }
                }
                Err(e) => Outcome::Lost(e.to_string()),
            };
            let recv = Instant::now();
            let (seats, quantity) = match (kind, &body) {
                (OpKind::Start, Some(b)) => (Some(seat_set(&b["seats"])), None),
                (OpKind::BestAvailable, Some(b)) => {
                    (None, b["quantity"].as_u64().map(|q| q as usize))
                }
                _ => (None, None),
            };
            let answer = match &outcome {
                Outcome::Answer { status, body, .. } if *status < 500 => {
                    Some((*status, body.clone()))
                }
                _ => None,
            };
            ops.push(Op {
                kind,
                user,
                slot,
                schedule,
                sent,
                recv,
                outcome,
                booking: booking.map(str::to_owned),
                seats,
                quantity,
            });
            if answer.is_some() {
                return answer;
            }
            tokio::time::sleep(Duration::from_millis(150 * (attempt as u64 + 1))).await;
        }
        None
    }

    /// The first `HOT_SEATS` seats of `schedule` not known to be sold, in
    /// row order: where everybody wants to sit.
    fn hot_seats(&self, schedule: i64, rows: i64) -> Vec<(i64, i64)> {
        let sold = self.sold.lock().unwrap();
        let sold = sold.get(&schedule);
        (1..=rows)
            .flat_map(|r| (1..=COLS).map(move |c| (r, c)))
            .filter(|s| !sold.is_some_and(|set| set.contains(s)))
            .take(HOT_SEATS)
            .collect()
    }

    /// A snapshot from any live replica (starting at slot `want`), retried
    /// for up to 30 s while replicas or the database are down.
    async fn snapshot(&self, schedule: i64, want: usize) -> Option<(i64, SeatMap)> {
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut attempt = 0;
        while Instant::now() < deadline {
            attempt += 1;
            if let Some((_, base)) = self.live.pick(want + attempt) {
                let url = format!("{base}/api/schedules/{schedule}/seat-status");
                if let Ok(r) = self.http.get(url).send().await {
                    if r.status() == 200 {
                        if let Ok(body) = r.json::<Value>().await {
                            return Some(parse_snapshot(&body));
                        }
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        None
    }
}

enum After {
    Confirm,
    Cancel,
    /// Walk away and let the hold expire.
    Abandon,
}

/// Everything a user decides in one round, drawn up front so that the
/// plan does not depend on the answers.
struct Round {
    think: Duration,
    replica: usize,
    schedule: usize,
    best: bool,
    n: usize,
    picks: [usize; 4],
    after: After,
    hold: Duration,
    second_replica: usize,
}

impl Round {
    fn draw(rng: &mut StdRng) -> Round {
        Round {
            think: Duration::from_millis(rng.random_range(20..250)),
            replica: rng.random_range(0..REPLICAS),
            schedule: rng.random_range(0..SCHEDULES),
            best: rng.random_bool(0.2),
            n: rng.random_range(1..=4),
            picks: [
                rng.random_range(0..HOT_SEATS),
                rng.random_range(0..HOT_SEATS),
                rng.random_range(0..HOT_SEATS),
                rng.random_range(0..HOT_SEATS),
            ],
            after: match rng.random_range(0..100) {
                0..8 => After::Confirm,
                8..65 => After::Cancel,
                _ => After::Abandon,
            },
            hold: Duration::from_millis(rng.random_range(50..1500)),
            second_replica: rng.random_range(0..REPLICAS),
        }
    }
}

/// One user's session: rounds of start, then confirm, cancel or walk away,
/// until the storm ends. Every request is recorded.
async fn user(ctx: Arc<Ctx>, u: usize, token: String, mut rng: StdRng) -> Vec<Op> {
    let mut ops = Vec::new();
    let mut round = 0;
    loop {
        let plan = Round::draw(&mut rng);
        round += 1;
        tokio::time::sleep(plan.think).await;
        if Instant::now() >= ctx.storm_end {
            return ops;
        }
        let (schedule, rows) = ctx.schedules[plan.schedule];
        let hot = ctx.hot_seats(schedule, rows);
        let (kind, body) = if plan.best || hot.is_empty() {
            (
                OpKind::BestAvailable,
                json!({"scheduleId": schedule, "quantity": plan.n}),
            )
        } else {
            let mut seats = SeatSet::new();
            for p in plan.picks.iter().take(plan.n) {
                seats.insert(hot[p % hot.len()]);
            }
            let seats: Vec<(i64, i64)> = seats.into_iter().collect();
            (OpKind::Start, start_body(schedule, &seats))
        };
        let key = format!("chaos-{u}-{round}");
        let answer = ctx
            .call(
                &mut ops,
                kind,
                u,
                plan.replica,
                schedule,
                "/api/bookings/start",
                &token,
                Some(body),
                Some(&key),
                None,
            )
            .await;
        // A booking_in_progress names the user's own hold (perhaps one whose
        // answer was lost to a fault): the user deals with it as planned.
        let (booking, seats) = match answer {
            Some((201, b)) => (
                b["bookingId"].as_str().map(str::to_owned),
                Some(seat_set(&b["seats"])),
            ),
            Some((409, b)) if b["code"] == "booking_in_progress" => {
                (b["bookingId"].as_str().map(str::to_owned), None)
            }
            _ => (None, None),
        };
        let Some(booking) = booking else { continue };
        tokio::time::sleep(plan.hold).await;
        if Instant::now() >= ctx.storm_end {
            return ops;
        }
        let (kind, action) = match plan.after {
            After::Confirm => (OpKind::Confirm, "confirm"),
            After::Cancel => (OpKind::Cancel, "cancel"),
            After::Abandon => continue,
        };
        let answer = ctx
            .call(
                &mut ops,
                kind,
                u,
                plan.second_replica,
                schedule,
                &format!("/api/bookings/{booking}/{action}"),
                &token,
                None,
                None,
                Some(&booking),
            )
            .await;
        if let (Some((200, _)), OpKind::Confirm, Some(seats)) = (answer, kind, seats) {
            ctx.sold
                .lock()
                .unwrap()
                .entry(schedule)
                .or_default()
                .extend(seats);
        }
    }
}

/// A viewer of one schedule that keeps its seat map the way the page does
/// (snapshot, then events with dense ids; a resync reloads the snapshot),
/// drops its stream now and then without a word, and resumes on any live
/// replica with `Last-Event-ID`.
struct Viewer {
    name: String,
    schedule: i64,
    rng: StdRng,
    live_first: bool,
    loaded: bool,
    map: SeatMap,
    applied_upto: i64,
    last_id: Option<i64>,
    events: usize,
    resyncs: usize,
    drops: usize,
    ends: usize,
    connects: usize,
    failed_connects: usize,
    violations: Vec<String>,
}

impl Viewer {
    fn new(name: String, schedule: i64, mut rng: StdRng) -> Viewer {
        Viewer {
            name,
            schedule,
            live_first: rng.random_bool(0.5),
            rng,
            loaded: false,
            map: BTreeMap::new(),
            applied_upto: 0,
            last_id: None,
            events: 0,
            resyncs: 0,
            drops: 0,
            ends: 0,
            connects: 0,
            failed_connects: 0,
            violations: Vec::new(),
        }
    }

    /// Opens the stream on the replica in slot `want` (or the next live one)
    /// and reads its `retry:`; None if that failed.
    async fn open(&mut self, ctx: &Ctx, want: usize, last: Option<i64>) -> Option<SseClient> {
        let (_, base) = ctx.live.pick(want)?;
        let url = format!("{base}{}", stream_path(self.schedule));
        let header = last.map(|l| l.to_string());
        let connect = SseClient::try_connect(&url, header.as_deref());
        let Ok(Ok(mut sse)) = tokio::time::timeout(Duration::from_secs(15), connect).await else {
            return None;
        };
        if sse.status != 200 {
            return None;
        }
        match sse.next_or_end(Duration::from_secs(5)).await {
            Ok(Some(SseFrame::Retry(_))) => Some(sse),
            _ => None,
        }
    }

    async fn connect(&mut self, ctx: &Ctx) -> Option<SseClient> {
        let want = self.rng.random_range(0..REPLICAS);
        let sse = if self.loaded {
            let sse = self.open(ctx, want, Some(self.applied_upto)).await?;
            self.last_id = Some(self.applied_upto);
            sse
        } else if self.live_first {
            // Subscribed before the snapshot: events up to its lastEventId
            // may arrive too and are already in it.
            let sse = self.open(ctx, want, None).await?;
            let (last, map) = ctx.snapshot(self.schedule, want + 1).await?;
            (self.applied_upto, self.map, self.last_id) = (last, map, None);
            self.loaded = true;
            sse
        } else {
            let (last, map) = ctx.snapshot(self.schedule, want).await?;
            let sse = self.open(ctx, want, Some(last)).await?;
            (self.applied_upto, self.map, self.last_id) = (last, map, Some(last));
            self.loaded = true;
            sse
        };
        self.connects += 1;
        Some(sse)
    }

    async fn apply(&mut self, ctx: &Ctx, frame: SseFrame) {
        match frame {
            SseFrame::Event { id, action, seats } => {
                match self.last_id {
                    Some(last) if id != last + 1 => self.violations.push(format!(
                        "{}: event {id} after {last}: a gap or a duplicate",
                        self.name
                    )),
                    None if id > self.applied_upto + 1 => self.violations.push(format!(
                        "{}: first event {id}, but the snapshot is at {}",
                        self.name, self.applied_upto
                    )),
                    _ => {}
                }
                self.last_id = Some(id);
                self.events += 1;
                if id > self.applied_upto {
                    apply(&mut self.map, &action, &seats);
                    self.applied_upto = id;
                }
            }
            SseFrame::Resync => {
                self.resyncs += 1;
                let want = self.rng.random_range(0..REPLICAS);
                match ctx.snapshot(self.schedule, want).await {
                    Some((last, map)) => {
                        (self.applied_upto, self.map, self.last_id) = (last, map, None);
                    }
                    None => self.violations.push(format!(
                        "{}: no snapshot within 30 s after a resync",
                        self.name
                    )),
                }
            }
            SseFrame::Comment | SseFrame::Retry(_) => {}
        }
    }
}

/// Runs a viewer until `target` names an event id for its schedule that
/// its map has reached (or 30 s after that, or its first violation).
async fn view(
    ctx: Arc<Ctx>,
    mut v: Viewer,
    target: watch::Receiver<Option<BTreeMap<i64, i64>>>,
) -> Viewer {
    let mut sse: Option<SseClient> = None;
    let mut drop_at = Instant::now();
    let mut catch_up_deadline: Option<Instant> = None;
    loop {
        if !v.violations.is_empty() {
            return v;
        }
        let want = target.borrow().as_ref().map(|t| t[&v.schedule]);
        if let Some(want) = want {
            if v.loaded && v.applied_upto >= want {
                return v;
            }
            let deadline =
                *catch_up_deadline.get_or_insert(Instant::now() + Duration::from_secs(30));
            if Instant::now() >= deadline {
                v.violations.push(format!(
                    "{}: stuck at event {} (want {want}) 30 s after the storm settled",
                    v.name, v.applied_upto
                ));
                return v;
            }
        }
        let Some(stream) = sse.as_mut() else {
            match v.connect(&ctx).await {
                Some(s) => {
                    sse = Some(s);
                    drop_at =
                        Instant::now() + Duration::from_millis(v.rng.random_range(1500..6000));
                }
                None => {
                    v.failed_connects += 1;
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
            continue;
        };
        let storming = Instant::now() < ctx.storm_end;
        let wait = if storming {
            drop_at
                .saturating_duration_since(Instant::now())
                .min(Duration::from_millis(250))
        } else {
            Duration::from_millis(250)
        };
        match stream.next_or_end(wait).await {
            Ok(Some(frame)) => v.apply(&ctx, frame).await,
            Ok(None) => {
                v.ends += 1;
                sse = None;
            }
            Err(_) => {}
        }
        if storming && sse.is_some() && Instant::now() >= drop_at {
            // Abruptly, mid-stream: the reader task is aborted and the
            // connection dropped.
            sse = None;
            v.drops += 1;
        }
    }
}

/// Samples, every 500 ms, how far past its expiry the most overdue PENDING
/// booking is (database clock); negative when none is overdue.
async fn watch_overdue(url: String, stop: Arc<AtomicBool>) -> Vec<(Instant, f64)> {
    let mut samples = Vec::new();
    let mut client: Option<tokio_postgres::Client> = None;
    while !stop.load(Ordering::SeqCst) {
        if client.as_ref().is_none_or(|c| c.is_closed()) {
            client = match tokio_postgres::connect(&url, tokio_postgres::NoTls).await {
                Ok((c, conn)) => {
                    tokio::spawn(conn);
                    Some(c)
                }
                Err(_) => None,
            };
        }
        if let Some(c) = &client {
            let at = Instant::now();
            if let Ok(row) = c
                .query_one(
                    "SELECT coalesce(max(extract(epoch FROM clock_timestamp() - expires_at)), -1)::float8 \
                     FROM bookings WHERE status = 'PENDING'",
                    &[],
                )
                .await
            {
                samples.push((at, row.get(0)));
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    samples
}

async fn pg(url: &str) -> Option<tokio_postgres::Client> {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .ok()?;
    tokio::spawn(conn);
    Some(client)
}

/// Waits until each of `slots` answers `/readyz` 200; false after 30 s.
async fn all_ready(http: &reqwest::Client, live: &Live, slots: &[usize]) -> bool {
    let deadline = Instant::now() + Duration::from_secs(30);
    for &slot in slots {
        loop {
            let base = live.0.lock().unwrap()[slot].clone();
            let ok = match base {
                Some(b) => http
                    .get(format!("{b}/readyz"))
                    .timeout(Duration::from_secs(3))
                    .send()
                    .await
                    .is_ok_and(|r| r.status() == 200),
                None => false,
            };
            if ok {
                break;
            }
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }
    true
}

/// What the injection of one fault did.
struct Injected {
    kind: FaultKind,
    at: Duration,
    /// Until what it broke served again.
    took: Duration,
    detail: String,
}

/// Injects the planned faults, one after the other, until the storm ends.
#[allow(clippy::too_many_arguments)]
async fn inject(
    plan: &[(Duration, Fault)],
    start: Instant,
    cluster: &PgCluster,
    db: &TestDb,
    opts: &ReplicaOpts,
    replicas: &mut [Option<Replica>],
    ctx: &Ctx,
    windows: &Windows,
    violations: &Mutex<Vec<String>>,
) -> Vec<Injected> {
    let mut done = Vec::new();
    let all: Vec<usize> = (0..REPLICAS).collect();
    for (at, fault) in plan {
        tokio::time::sleep_until((start + *at).into()).await;
        let t = Instant::now();
        let window = windows.open(fault.kind());
        let (affected, detail) = match fault {
            Fault::Kill { slot, down } => {
                let mut r = replicas[*slot]
                    .take()
                    .expect("every slot runs between faults");
                r.kill().await;
                ctx.live.set(*slot, None);
                tokio::time::sleep(*down).await;
                let fresh = Replica::spawn(db, opts.clone()).await;
                let detail = format!(
                    "replica {slot} ({} -> {}), down {down:?}",
                    r.base, fresh.base
                );
                ctx.live.set(*slot, Some(fresh.base.clone()));
                replicas[*slot] = Some(fresh);
                (vec![*slot], detail)
            }
            Fault::Listeners { slot } => {
                let ports = slot.map(|s| {
                    local_ports(replicas[s].as_ref().and_then(Replica::pid).expect("runs"))
                });
                let mut n = 0;
                if let Some(c) = pg(&db.url).await {
                    let rows = c
                        .query(
                            "SELECT pid, client_port FROM pg_stat_activity \
                             WHERE application_name = 'seatsync-listener' AND datname = $1",
                            &[&db.name],
                        )
                        .await
                        .unwrap_or_default();
                    for row in rows {
                        let port: Option<i32> = row.get(1);
                        if ports
                            .as_ref()
                            .is_some_and(|p| !port.is_some_and(|port| p.contains(&(port as u16))))
                        {
                            continue;
                        }
                        let pid: i32 = row.get(0);
                        n += usize::from(terminate_backend(&c, pid).await.unwrap_or(false));
                    }
                }
                let affected = slot.map_or(all.clone(), |s| vec![s]);
                let which = slot.map_or("all replicas".to_owned(), |s| format!("replica {s}"));
                (affected, format!("{n} listener(s) of {which}"))
            }
            Fault::Pooled { percent, pick } => {
                let mut rng = StdRng::seed_from_u64(*pick);
                let (mut n, mut of) = (0, 0);
                if let Some(c) = pg(&db.url).await {
                    let rows = c
                        .query(
                            "SELECT pid FROM pg_stat_activity WHERE application_name = 'seatsync' \
                             AND datname = $1 ORDER BY pid",
                            &[&db.name],
                        )
                        .await
                        .unwrap_or_default();
                    of = rows.len();
                    for row in rows {
                        if rng.random_range(0..100) >= *percent {
                            continue;
                        }
                        let pid: i32 = row.get(0);
                        n += usize::from(terminate_backend(&c, pid).await.unwrap_or(false));
                    }
                }
                (all.clone(), format!("{n} of {of} pooled ({percent}%)"))
            }
            Fault::PgRestart => {
                let up = cluster.restart().await;
                (
                    all.clone(),
                    format!("accepting connections again after {:?}", up - t),
                )
            }
        };
        if !all_ready(&ctx.http, &ctx.live, &affected).await {
            violations.lock().unwrap().push(format!(
                "{}: replicas {affected:?} not ready 30 s after it",
                fault.kind()
            ));
        }
        windows.close(window);
        done.push(Injected {
            kind: fault.kind(),
            at: t - start,
            took: t.elapsed(),
            detail,
        });
    }
    done
}

/// A booking as the table holds it at the end.
struct Booked {
    schedule: i64,
    status: String,
    seats: SeatSet,
    expires_at: DateTime<Utc>,
}

async fn bookings_in_table(c: &tokio_postgres::Client) -> HashMap<String, Booked> {
    c.query(
        "SELECT id::text, schedule_id, status, seats, expires_at FROM bookings",
        &[],
    )
    .await
    .unwrap()
    .iter()
    .map(|r| {
        (
            r.get::<_, String>(0),
            Booked {
                schedule: r.get(1),
                status: r.get(2),
                seats: seat_set(&r.get::<_, Value>(3)),
                expires_at: r.get(4),
            },
        )
    })
    .collect()
}

/// Adjacent seats of one row: what best available holds.
fn one_block(seats: &SeatSet) -> bool {
    let rows: BTreeSet<i64> = seats.iter().map(|s| s.0).collect();
    let cols: Vec<i64> = seats.iter().map(|s| s.1).collect();
    rows.len() == 1 && cols.windows(2).all(|w| w[1] == w[0] + 1)
}

/// Checks every answer against the table: a 2xx (or a 409/410 that names
/// a state) must have committed what it claimed, or a later legal state.
/// Returns violations; counts answers in `by_answer`.
fn check_answers(
    ops: &[Op],
    table: &HashMap<String, Booked>,
    windows: &Windows,
    by_answer: &mut BTreeMap<(OpKind, String), usize>,
    server_errors: &mut BTreeMap<String, usize>,
) -> Vec<String> {
    let mut v = Vec::new();
    for op in ops {
        let answer = match &op.outcome {
            Outcome::Answer { status, body, .. } => {
                let code = body["code"]
                    .as_str()
                    .map(|c| format!(" {c}"))
                    .unwrap_or_default();
                format!("{status}{code}")
            }
            Outcome::Lost(_) => "no answer".to_owned(),
        };
        *by_answer.entry((op.kind, answer.clone())).or_default() += 1;
        let faults = windows.during(op.sent, op.recv);
        let status = match &op.outcome {
            Outcome::Lost(e) => {
                if faults.is_empty() {
                    v.push(format!(
                        "{:?} by user {} to replica {}: connection error outside any fault: {e}",
                        op.kind, op.user, op.slot
                    ));
                }
                continue;
            }
            Outcome::Answer {
                status,
                problem,
                body,
            } => {
                if *status >= 400
                    && !(*problem && body["status"] == *status && body["code"].is_string())
                {
                    v.push(format!(
                        "{:?}: {status} is not a clean problem+json: {body}",
                        op.kind
                    ));
                }
                *status
            }
        };
        if status >= 500 {
            let during: BTreeSet<String> = faults.iter().map(|k| format!("{k:?}")).collect();
            let during = if during.is_empty() {
                "no fault".to_owned()
            } else {
                during.into_iter().collect::<Vec<_>>().join("+")
            };
            *server_errors
                .entry(format!("{:?} {answer} during {during}", op.kind))
                .or_default() += 1;
            if faults.is_empty() {
                v.push(format!(
                    "{:?} by user {} on replica {}: {answer} outside any fault: {}",
                    op.kind,
                    op.user,
                    op.slot,
                    op.body()
                ));
            }
            continue;
        }
        let body = op.body();
        // The state an answer claims for its booking, which must be the
        // final one unless it is PENDING (which may move on).
        let (booking, claim) = match (op.kind, status, op.code()) {
            (OpKind::Start | OpKind::BestAvailable, 201, _) => {
                let id = body["bookingId"].as_str().unwrap_or_default().to_owned();
                let seats = seat_set(&body["seats"]);
                match op.kind {
                    OpKind::Start if op.seats.as_ref() != Some(&seats) => v.push(format!(
                        "start of {:?} answered 201 with seats {seats:?}",
                        op.seats
                    )),
                    OpKind::BestAvailable
                        if Some(seats.len()) != op.quantity || !one_block(&seats) =>
                    {
                        v.push(format!(
                            "best available of {:?} answered 201 with seats {seats:?}",
                            op.quantity
                        ))
                    }
                    _ => {}
                }
                if let Some(b) = table.get(&id) {
                    if b.seats != seats || b.schedule != op.schedule {
                        v.push(format!(
                            "booking {id}: answered {seats:?} of schedule {}, table has {:?} of {}",
                            op.schedule, b.seats, b.schedule
                        ));
                    }
                    let answered = body["expiresAt"]
                        .as_str()
                        .and_then(|s| DateTime::parse_from_rfc3339(s).ok());
                    if answered.map(|t| t.with_timezone(&Utc)) != Some(b.expires_at) {
                        v.push(format!(
                            "booking {id}: answered expiresAt {}, table has {}",
                            body["expiresAt"], b.expires_at
                        ));
                    }
                }
                (id, body["status"].as_str().unwrap_or_default().to_owned())
            }
            (OpKind::Start, 409, "seats_taken") => {
                let taken = seat_set(&body["seats"]);
                if taken.is_empty() || !op.seats.as_ref().is_some_and(|s| taken.is_subset(s)) {
                    v.push(format!("seats_taken for {:?} lists {taken:?}", op.seats));
                }
                continue;
            }
            (OpKind::BestAvailable, 409, "no_seats_together") => continue,
            (OpKind::Start | OpKind::BestAvailable, 409, "booking_in_progress") => (
                body["bookingId"].as_str().unwrap_or_default().to_owned(),
                "PENDING".to_owned(),
            ),
            (OpKind::Confirm, 200, _) => (
                op.booking.clone().unwrap_or_default(),
                "CONFIRMED".to_owned(),
            ),
            (OpKind::Cancel, 200, _) => (
                op.booking.clone().unwrap_or_default(),
                "CANCELLED".to_owned(),
            ),
            (OpKind::Confirm | OpKind::Cancel, 410, "booking_expired") => {
                (op.booking.clone().unwrap_or_default(), "EXPIRED".to_owned())
            }
            (OpKind::Confirm, 409, "booking_cancelled") => (
                op.booking.clone().unwrap_or_default(),
                "CANCELLED".to_owned(),
            ),
            (OpKind::Cancel, 409, "booking_confirmed") => (
                op.booking.clone().unwrap_or_default(),
                "CONFIRMED".to_owned(),
            ),
            _ => {
                v.push(format!(
                    "{:?} by user {}: unexpected answer {answer}: {body}",
                    op.kind, op.user
                ));
                continue;
            }
        };
        let settles = matches!(op.kind, OpKind::Confirm | OpKind::Cancel) && status == 200;
        if settles && body["status"].as_str() != Some(claim.as_str()) {
            v.push(format!(
                "{:?} of {booking} answered {status} with status {}",
                op.kind, body["status"]
            ));
        }
        match table.get(&booking) {
            None => v.push(format!(
                "{:?} answered {answer} for booking {booking}, which the table does not have",
                op.kind
            )),
            Some(b) if claim != "PENDING" && b.status != claim => v.push(format!(
                "{:?} answered {answer} ({claim}) for booking {booking}, which ended {}",
                op.kind, b.status
            )),
            Some(_) => {}
        }
    }
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_storm_with_random_faults_keeps_every_invariant() {
    let seed = chaos_seed();
    println!("chaos seed: {seed} (replay: SEATSYNC_CHAOS_SEED={seed})");
    let storm = storm_duration();
    let bound = storm + Duration::from_secs(240);
    tokio::time::timeout(bound, chaos(seed, storm))
        .await
        .unwrap_or_else(|_| panic!("seed {seed}: the chaos test did not finish within {bound:?}"));
}

async fn chaos(seed: u64, storm: Duration) {
    let began = Instant::now();
    let plan = plan_faults(seed, storm);
    println!(
        "plan: {}s storm, {USERS} users, {} viewers, {REPLICAS} replicas, {SCHEDULES} schedules, \
         HOLD_SECONDS={HOLD_SECONDS}; faults:",
        storm.as_secs(),
        SCHEDULES * VIEWERS_PER_SCHEDULE
    );
    for (at, f) in &plan {
        println!("  at {:>5.1}s {f:?}", at.as_secs_f64());
    }

    let cluster = PgCluster::start().await;
    let db = TestDb::create_on(&cluster.admin_url()).await;
    let opts = ReplicaOpts::default()
        .with("HOLD_SECONDS", HOLD_SECONDS)
        .with("HEARTBEAT_SECONDS", 1)
        // Every fault makes replicas log; errors are enough to read here.
        .with(
            "RUST_LOG",
            std::env::var("SEATSYNC_TEST_LOG").unwrap_or_else(|_| "error".into()),
        );
    let mut replicas: Vec<Option<Replica>> =
        join_all((0..REPLICAS).map(|_| Replica::spawn(&db, opts.clone())))
            .await
            .into_iter()
            .map(Some)
            .collect();
    let first = replicas[0].as_ref().unwrap();
    // Long enough that the hall does not sell out in a long run.
    let rows = (storm.as_secs() as i64 / 2).clamp(16, 100);
    let mut schedules = Vec::new();
    for _ in 0..SCHEDULES {
        schedules.push((first.create_schedule(rows, COLS, &[]).await, rows));
    }
    let tokens: [String; USERS] = first.guests().await;
    let live = Live::default();
    for (i, r) in replicas.iter().enumerate() {
        live.set(i, r.as_ref().map(|r| r.base.clone()));
    }
    let setup = began.elapsed();

    let storm_start = Instant::now();
    let ctx = Arc::new(Ctx {
        http: reqwest::Client::builder()
            .timeout(Duration::from_secs(20))
            // Below the replicas' idle timeout, so that an idle connection is
            // never reused just as the server closes it.
            .pool_idle_timeout(Duration::from_secs(5))
            .build()
            .unwrap(),
        live: live.clone(),
        schedules: schedules.clone(),
        sold: Mutex::default(),
        storm_end: storm_start + storm,
    });
    let windows = Windows::default();
    let violations: Mutex<Vec<String>> = Mutex::default();
    let (target_tx, target_rx) = watch::channel(None);
    let viewers: Vec<_> = (0..SCHEDULES * VIEWERS_PER_SCHEDULE)
        .map(|i| {
            let schedule = schedules[i % SCHEDULES].0;
            let v = Viewer::new(
                format!("viewer {i} (schedule {schedule})"),
                schedule,
                sub_rng(seed, 3, i as u64),
            );
            tokio::spawn(view(ctx.clone(), v, target_rx.clone()))
        })
        .collect();
    let users: Vec<_> = tokens
        .iter()
        .enumerate()
        .map(|(u, t)| tokio::spawn(user(ctx.clone(), u, t.clone(), sub_rng(seed, 2, u as u64))))
        .collect();
    let stop_watch = Arc::new(AtomicBool::new(false));
    let overdue = tokio::spawn(watch_overdue(db.url.clone(), stop_watch.clone()));

    let injected = inject(
        &plan,
        storm_start,
        &cluster,
        &db,
        &opts,
        &mut replicas,
        &ctx,
        &windows,
        &violations,
    )
    .await;
    let mut ops: Vec<Op> = Vec::new();
    for u in users {
        ops.extend(u.await.expect("user task"));
    }
    let storm_took = storm_start.elapsed();
    let replicas: Vec<Replica> = replicas.into_iter().map(|r| r.expect("all run")).collect();

    // Settle: every replica serving, and the database clock past every
    // booking's expiry by the 2 s the contract allows for its release.
    let settle = Instant::now();
    if !all_ready(&ctx.http, &live, &(0..REPLICAS).collect::<Vec<_>>()).await {
        violations
            .lock()
            .unwrap()
            .push("replicas not ready 30 s after the storm".into());
    }
    let latest: Option<DateTime<Utc>> = db
        .client()
        .await
        .query_one("SELECT max(expires_at) FROM bookings", &[])
        .await
        .unwrap()
        .get(0);
    if let Some(t) = latest {
        db.wait_clock_past(t + chrono::Duration::milliseconds((RELEASE_WITHIN * 1000.0) as i64))
            .await;
    }
    stop_watch.store(true, Ordering::SeqCst);
    let overdue = overdue.await.unwrap();
    let still_pending = db
        .count(
            "SELECT count(*) FROM bookings WHERE status = 'PENDING' \
             AND expires_at + interval '2 seconds' < clock_timestamp()",
            &[],
        )
        .await;
    if still_pending > 0 {
        violations.lock().unwrap().push(format!(
            "{still_pending} bookings PENDING more than 2 s past expiresAt after the storm settled"
        ));
    }
    let settled = settle.elapsed();

    // Snapshots: the same on every replica, equal to the seat table and to
    // the event log replayed.
    let mut truth: BTreeMap<i64, (i64, SeatMap)> = BTreeMap::new();
    let mut event_counts: BTreeMap<i64, BTreeMap<String, usize>> = BTreeMap::new();
    let table = bookings_in_table(&db.client().await).await;
    for &(schedule, _) in &schedules {
        let snap = replicas[0].snapshot(schedule).await;
        for (i, r) in replicas.iter().enumerate().skip(1) {
            if r.snapshot(schedule).await != snap {
                violations.lock().unwrap().push(format!(
                    "schedule {schedule}: replica {i}'s snapshot differs from replica 0's"
                ));
            }
        }
        let events = db.logged_seat_events(schedule).await;
        if events.iter().enumerate().any(|(i, e)| e.id != i as i64 + 1)
            || events.len() as i64 != snap.0
        {
            violations.lock().unwrap().push(format!(
                "schedule {schedule}: the log's ids are not 1..={} ({} events)",
                snap.0,
                events.len()
            ));
        }
        if replayed_map(&events) != snap.1 {
            violations.lock().unwrap().push(format!(
                "schedule {schedule}: the log replayed differs from the snapshot"
            ));
        }
        let mut in_table = BTreeMap::new();
        for b in table.values().filter(|b| b.schedule == schedule) {
            if b.status == "PENDING" || b.status == "CONFIRMED" {
                let s = if b.status == "PENDING" {
                    "OCCUPIED"
                } else {
                    "CONFIRMED"
                };
                for seat in &b.seats {
                    in_table.insert(*seat, s.to_owned());
                }
            }
        }
        if in_table != snap.1 {
            violations.lock().unwrap().push(format!(
                "schedule {schedule}: the snapshot differs from the live bookings"
            ));
        }
        // One event per change of a booking: its hold, and its sale or release.
        let counts = event_counts.entry(schedule).or_default();
        for e in &events {
            *counts.entry(e.action.clone()).or_default() += 1;
        }
        let of = |pred: &dyn Fn(&Booked) -> bool| {
            table
                .values()
                .filter(|b| b.schedule == schedule && pred(b))
                .count()
        };
        let expected = [
            ("OCCUPIED", of(&|_| true)),
            ("CONFIRMED", of(&|b| b.status == "CONFIRMED")),
            (
                "RELEASED",
                of(&|b| b.status == "CANCELLED" || b.status == "EXPIRED"),
            ),
        ];
        for (action, want) in expected {
            let got = counts.get(action).copied().unwrap_or(0);
            if got != want {
                violations.lock().unwrap().push(format!(
                    "schedule {schedule}: {got} {action} events for {want} such bookings"
                ));
            }
        }
        truth.insert(schedule, snap);
    }

    // Every viewer catches up to the final snapshot and holds exactly it.
    let t = Instant::now();
    target_tx.send_replace(Some(
        truth.iter().map(|(s, (last, _))| (*s, *last)).collect(),
    ));
    let mut viewed = Vec::new();
    for v in viewers {
        let v = v.await.expect("viewer task");
        if v.violations.is_empty() && v.map != truth[&v.schedule].1 {
            violations.lock().unwrap().push(format!(
                "{}: its map differs from the final snapshot",
                v.name
            ));
        }
        viewed.push(v);
    }
    let converged = t.elapsed();

    let mut by_answer = BTreeMap::new();
    let mut server_errors = BTreeMap::new();
    let answer_violations =
        check_answers(&ops, &table, &windows, &mut by_answer, &mut server_errors);
    let calm: Vec<f64> = overdue
        .iter()
        .filter(|(at, _)| windows.during(*at, *at).is_empty())
        .map(|(_, s)| *s)
        .collect();
    let max_calm = calm.iter().copied().fold(0.0f64, f64::max);
    let max_all = overdue.iter().map(|(_, s)| *s).fold(0.0f64, f64::max);
    if max_calm > RELEASE_WITHIN {
        violations.lock().unwrap().push(format!(
            "a PENDING booking {max_calm:.2} s past its expiry while no fault was in force"
        ));
    }
    let deadlocks = db.deadlocks_after_shutdown(replicas).await;

    // Figures first, so that a failing run still shows them.
    println!(
        "chaos seed {seed}: storm {storm_took:.1?} (set-up {setup:.1?}, settled {settled:.1?} after, \
         viewers converged {converged:.1?} after that), total {:.1?}",
        began.elapsed()
    );
    println!("operations by kind and answer ({} requests):", ops.len());
    for ((kind, answer), n) in &by_answer {
        println!("  {kind:?} -> {answer}: {n}");
    }
    let conflicts: usize = by_answer
        .iter()
        .filter(|((_, a), _)| a.starts_with("409"))
        .map(|(_, n)| n)
        .sum();
    println!("conflicts (409): {conflicts}");
    let fivexx: usize = server_errors.values().sum();
    let lost = ops.iter().filter(|o| o.status().is_none()).count();
    println!("5xx: {fivexx}; no answer (connection errors): {lost}");
    for (what, n) in &server_errors {
        println!("  {what}: {n}");
    }
    let mut by_fault: BTreeMap<FaultKind, Vec<&Injected>> = BTreeMap::new();
    for f in &injected {
        by_fault.entry(f.kind).or_default().push(f);
    }
    println!("faults injected: {}", injected.len());
    for (kind, list) in &by_fault {
        println!("  {kind}: {}", list.len());
        for f in list {
            println!(
                "    at {:>5.1}s, served again after {:.2?}: {}",
                f.at.as_secs_f64(),
                f.took,
                f.detail
            );
        }
    }
    let statuses: BTreeMap<&str, usize> = table.values().fold(BTreeMap::new(), |mut m, b| {
        *m.entry(b.status.as_str()).or_default() += 1;
        m
    });
    let answered: BTreeSet<&str> = ops
        .iter()
        .filter(|o| o.status() == Some(201))
        .filter_map(|o| o.body()["bookingId"].as_str())
        .collect();
    println!(
        "bookings in the table: {statuses:?}; {} of them never answered 201 (answer lost to a fault)",
        table.keys().filter(|k| !answered.contains(k.as_str())).count()
    );
    println!("events per schedule: {event_counts:?}");
    println!(
        "overdue PENDING (DB clock, sampled every 500 ms): max {max_calm:.2} s over {} samples with no \
         fault in force, max {max_all:.2} s over all {} samples; after settling: {still_pending}",
        calm.len(),
        overdue.len()
    );
    let (drops, ends, resyncs, failed) = viewed.iter().fold((0, 0, 0, 0), |a, v| {
        (
            a.0 + v.drops,
            a.1 + v.ends,
            a.2 + v.resyncs,
            a.3 + v.failed_connects,
        )
    });
    println!(
        "viewers: {} viewers, {drops} abrupt drops, {ends} streams ended by the server side, \
         {failed} failed (re)connects, {resyncs} resyncs",
        viewed.len()
    );
    for v in &viewed {
        println!(
            "  {}: {} connects, {} events, at event {} of {}",
            v.name, v.connects, v.events, v.applied_upto, truth[&v.schedule].0
        );
    }
    let mut violations = violations.into_inner().unwrap();
    violations.extend(answer_violations);
    violations.extend(viewed.iter().flat_map(|v| v.violations.clone()));
    // Panics (after the figures above) if a seat is held twice.
    db.assert_consistent().await;
    println!(
        "invariants: no seat held twice: ok; snapshots equal on every replica, to the table and to the \
         log: {}; deadlocks: {deadlocks}; violations: {}",
        if violations.iter().any(|v| v.starts_with("schedule")) { "NO" } else { "ok" },
        violations.len()
    );
    for v in violations.iter().take(40) {
        println!("  VIOLATION: {v}");
    }
    assert!(
        violations.is_empty(),
        "seed {seed}: {} violations, first: {}",
        violations.len(),
        violations[0]
    );
    assert_eq!(deadlocks, 0, "seed {seed}: hold transactions deadlocked");
}
