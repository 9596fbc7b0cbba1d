//! Seat events across replicas: delivery and latency, the wire format,
//! resuming (header and query), resync, retention, and convergence of many
//! subscribers under a storm of concurrent changes on two replicas.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::helpers::*;

/// Upper bound the brief sets for a change to reach a subscriber.
const MAX_LATENCY: Duration = Duration::from_secs(1);

fn event(id: i64, action: &str, seats: &[(i64, i64)]) -> SseFrame {
    let mut seats = seats.to_vec();
    seats.sort();
    SseFrame::Event {
        id,
        action: action.into(),
        seats,
    }
}

/// Waits for the next event and returns it with the time it took from `since`.
async fn next_event_timed(sse: &mut SseClient, since: Instant) -> (SseFrame, Duration) {
    let frame = sse
        .next_event(Duration::from_secs(5))
        .await
        .expect("an event within 5 s");
    (sorted_frame(frame), since.elapsed())
}

#[tokio::test]
async fn changes_on_one_replica_reach_subscribers_on_another_within_a_second() {
    let opts = ReplicaOpts::default()
        .with("HOLD_SECONDS", 1)
        .with("HEARTBEAT_SECONDS", 1);
    let (db, a, b) = TestDb::with_two_replicas(opts).await;
    let schedule = a.create_schedule(5, 8, &[]).await;

    let mut on_b = b.stream(schedule, None).await;
    assert_eq!(on_b.status, 200);
    let header = |name: &str| {
        on_b.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    assert_eq!(header("content-type").as_deref(), Some("text/event-stream"));
    assert_eq!(header("cache-control").as_deref(), Some("no-cache"));
    assert_eq!(header("x-accel-buffering").as_deref(), Some("no"));
    assert_eq!(
        on_b.next(Duration::from_secs(5)).await,
        Some(SseFrame::Retry(3000)),
        "the first frame is retry: 3000"
    );
    // A subscriber on the writing replica too: both must see the same sequence.
    let mut on_a = a.subscribe(schedule, None).await;

    let mut latencies = Vec::new();
    let u1 = a.guest().await;
    let u2 = a.guest().await;
    let u3 = a.guest().await;

    // 1: OCCUPIED
    let t = Instant::now();
    let r = a.hold(&u1, schedule, &[(1, 1), (1, 2)]).await;
    let booking1 = r.booking_id();
    let (f, lat) = next_event_timed(&mut on_b, t).await;
    assert_eq!(f, event(1, "OCCUPIED", &[(1, 1), (1, 2)]));
    latencies.push(("OCCUPIED", lat));

    // 2: CONFIRMED
    let t = Instant::now();
    assert_eq!(a.confirm(&u1, &booking1).await.status, 200);
    let (f, lat) = next_event_timed(&mut on_b, t).await;
    assert_eq!(f, event(2, "CONFIRMED", &[(1, 1), (1, 2)]));
    latencies.push(("CONFIRMED", lat));

    // 3, 4: OCCUPIED then RELEASED by cancel
    let r = a.hold(&u2, schedule, &[(2, 3)]).await;
    let booking2 = r.booking_id();
    let (f, _) = next_event_timed(&mut on_b, Instant::now()).await;
    assert_eq!(f, event(3, "OCCUPIED", &[(2, 3)]));
    let t = Instant::now();
    assert_eq!(a.cancel(&u2, &booking2).await.status, 200);
    let (f, lat) = next_event_timed(&mut on_b, t).await;
    assert_eq!(f, event(4, "RELEASED", &[(2, 3)]));
    latencies.push(("RELEASED (cancel)", lat));

    // 5, 6: OCCUPIED then RELEASED by expiry (HOLD_SECONDS=1), measured
    // from the hold's expiresAt (same host clock as the database).
    let r = a.hold(&u3, schedule, &[(3, 4), (3, 5), (4, 4)]).await;
    let expires_at = timestamp(&r.body["expiresAt"]);
    let (f, _) = next_event_timed(&mut on_b, Instant::now()).await;
    assert_eq!(f, event(5, "OCCUPIED", &[(3, 4), (3, 5), (4, 4)]));
    let f = on_b
        .next_event(Duration::from_secs(5))
        .await
        .map(sorted_frame);
    let received = chrono::Utc::now();
    assert_eq!(f, Some(event(6, "RELEASED", &[(3, 4), (3, 5), (4, 4)])));
    let after_expiry = (received - expires_at)
        .to_std()
        .expect("RELEASED must not arrive before the hold expired");
    latencies.push(("RELEASED (expiry, after expiresAt)", after_expiry));

    for (what, lat) in &latencies {
        println!("cross-replica latency {what}: {lat:?}");
        assert!(
            *lat < MAX_LATENCY,
            "{what} took {lat:?} to reach the other replica"
        );
    }

    // The same six events, in the same order, on the writing replica.
    let seen_on_a = on_a.frames_until(6, Duration::from_secs(5)).await;
    let ids: Vec<i64> = seen_on_a
        .iter()
        .map(|f| match f {
            SseFrame::Event { id, .. } => *id,
            other => panic!("unexpected {other:?}"),
        })
        .collect();
    assert_eq!(ids, vec![1, 2, 3, 4, 5, 6], "dense, ordered ids");

    // Silence: a heartbeat comment after about HEARTBEAT_SECONDS, no event.
    let t = Instant::now();
    assert_eq!(
        on_b.next(Duration::from_secs(3)).await,
        Some(SseFrame::Comment),
        "a heartbeat on a silent stream"
    );
    println!("heartbeat after {:?} of silence", t.elapsed());

    // The snapshot agrees with the stream.
    let (last, seats) = b.snapshot(schedule).await;
    assert_eq!(last, 6);
    let mut map = BTreeMap::new();
    apply(&mut map, "CONFIRMED", &[(1, 1), (1, 2)]);
    assert_eq!(seats, map);
    db.assert_consistent().await;
}

#[tokio::test]
async fn unknown_schedule_is_a_404_problem_before_any_stream() {
    let (_db, r) = TestDb::with_replica(ReplicaOpts::default()).await;
    let resp = r.get(&stream_path(987_654), None).await;
    resp.assert_problem(404, "schedule_not_found");
    let resp = r
        .request(
            reqwest::Method::GET,
            &stream_path(987_654),
            None,
            None,
            &[("Last-Event-ID", "3")],
        )
        .await;
    resp.assert_problem(404, "schedule_not_found");
    let resp = r.get("/api/schedules/abc/seats/stream", None).await;
    resp.assert_problem(400, "invalid_request");
    // Nothing was left subscribed by the refusals.
    assert_eq!(r.metric("seatsync_sse_connections").await, 0.0);
    assert_eq!(r.metric("seatsync_sse_channels").await, 0.0);
}

#[tokio::test]
async fn resuming_replays_exactly_the_missed_events_then_goes_live() {
    let (_db, a, b) = TestDb::with_two_replicas(ReplicaOpts::default()).await;
    let schedule = a.create_schedule(10, 20, &[]).await;
    // Connected throughout: the reference sequence.
    let mut reference = a.subscribe(schedule, None).await;
    let mut script = ChangeScript::new();

    let mut client = b.subscribe(schedule, None).await;
    for _ in 0..3 {
        script.step(&a, schedule).await;
    }
    let first = client.frames_until(3, Duration::from_secs(5)).await;
    drop(client); // disconnects
    for _ in 0..4 {
        script.step(&a, schedule).await;
    }
    let all = reference.frames_until(7, Duration::from_secs(5)).await;
    assert_eq!(all.len(), 7, "{all:?}");
    assert_eq!(first, all[..3]);

    // Resume on the other replica by header, by query, and with both (the
    // header wins); each gets exactly the missed events.
    let mut by_header = b.subscribe(schedule, Some("3")).await;
    let mut by_query = b.subscribe_query(schedule, "3", None).await;
    let mut both = b.subscribe_query(schedule, "1", Some("5")).await;
    let mut from_zero = a.subscribe(schedule, Some("0")).await;
    let mut at_newest = b.subscribe(schedule, Some("7")).await;
    assert_eq!(
        by_header.frames_until(7, Duration::from_secs(5)).await,
        all[3..]
    );
    assert_eq!(
        by_query.frames_until(7, Duration::from_secs(5)).await,
        all[3..]
    );
    assert_eq!(both.frames_until(7, Duration::from_secs(5)).await, all[5..]);
    assert_eq!(
        from_zero.frames_until(7, Duration::from_secs(5)).await,
        all[..]
    );

    // Then live, across the seam, exactly once each.
    script.step(&b, schedule).await;
    script.step(&a, schedule).await;
    let live = reference.frames_until(9, Duration::from_secs(5)).await;
    assert_eq!(live.len(), 2, "{live:?}");
    for sse in [
        &mut by_header,
        &mut by_query,
        &mut both,
        &mut from_zero,
        &mut at_newest,
    ] {
        assert_eq!(sse.frames_until(9, Duration::from_secs(5)).await, live);
    }
    // And nothing after that: no duplicate of the seam or of the replay.
    for sse in [&mut by_header, &mut by_query, &mut both, &mut at_newest] {
        assert_eq!(sse.next_event(Duration::from_millis(300)).await, None);
    }
}

#[tokio::test]
async fn a_position_ahead_of_the_log_or_not_a_number_resyncs_then_goes_live() {
    let (_db, r) = TestDb::with_replica(ReplicaOpts::default()).await;
    let schedule = r.create_schedule(10, 20, &[]).await;
    let mut script = ChangeScript::new();
    script.step(&r, schedule).await;
    script.step(&r, schedule).await;

    let mut clients = vec![
        ("header ahead", r.subscribe(schedule, Some("50")).await),
        ("header just ahead", r.subscribe(schedule, Some("3")).await),
        (
            "header not a number",
            r.subscribe(schedule, Some("abc")).await,
        ),
        ("header negative", r.subscribe(schedule, Some("-1")).await),
        ("query ahead", r.subscribe_query(schedule, "50", None).await),
        (
            "query not a number",
            r.subscribe_query(schedule, "x1", None).await,
        ),
        // The header wins, even when the parameter alone would be fine.
        (
            "bad header, good query",
            r.subscribe_query(schedule, "2", Some("nope")).await,
        ),
    ];
    for (what, sse) in &mut clients {
        assert_eq!(
            sse.next_event(Duration::from_secs(5)).await,
            Some(SseFrame::Resync),
            "{what}: first frame after retry"
        );
    }
    script.step(&r, schedule).await;
    for (what, sse) in &mut clients {
        match sse.next_event(Duration::from_secs(5)).await {
            Some(SseFrame::Event { id: 3, .. }) => {}
            other => panic!("{what}: expected live event 3 after the resync, got {other:?}"),
        }
    }
}

#[tokio::test]
async fn resuming_from_before_the_retained_window_resyncs() {
    let db = TestDb::create().await;
    let r = Replica::spawn(
        &db,
        ReplicaOpts::default().with("EVENT_RETENTION_SECONDS", 1),
    )
    .await;
    let schedule = r.create_schedule(10, 20, &[]).await;
    let mut script = ChangeScript::new();
    for _ in 0..3 {
        script.step(&r, schedule).await;
    }
    db.wait_count(
        "events 1..=3 pruned from seat_events",
        Duration::from_secs(10),
        "SELECT count(*) FROM seat_events WHERE schedule_id = $1 AND event_id <= 3",
        &[&schedule],
        0,
    )
    .await;

    let mut from_zero = r.subscribe(schedule, Some("0")).await;
    let mut from_two = r.subscribe_query(schedule, "2", None).await;
    // At the newest event nothing needs replaying: no resync.
    let mut at_newest = r.subscribe(schedule, Some("3")).await;
    for sse in [&mut from_zero, &mut from_two] {
        assert_eq!(
            sse.next_event(Duration::from_secs(5)).await,
            Some(SseFrame::Resync)
        );
    }
    script.step(&r, schedule).await;
    for sse in [&mut from_zero, &mut from_two, &mut at_newest] {
        match sse.next_event(Duration::from_secs(5)).await {
            Some(SseFrame::Event { id: 4, .. }) => {}
            other => panic!("expected live event 4, got {other:?}"),
        }
    }
}

/// Small deterministic PRNG (xorshift), one per worker.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

const ROWS: i64 = 10;
const COLS: i64 = 20;

/// Holds, confirms, cancels and abandons through both replicas, sometimes
/// racing a confirm against a cancel. Returns the number of successful holds.
async fn storm_worker(
    replicas: [Arc<Replica>; 2],
    schedule: i64,
    seed: u64,
    rounds: usize,
) -> usize {
    let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
    let mut held = 0;
    let mut token: Option<String> = None;
    for _ in 0..rounds {
        let r = &replicas[rng.below(2) as usize];
        let other = &replicas[rng.below(2) as usize];
        let tok = match &token {
            Some(t) => t.clone(),
            None => r.guest().await,
        };
        token = Some(tok.clone());
        let n = 1 + rng.below(3) as usize;
        let mut seats = Vec::new();
        while seats.len() < n {
            let seat = (
                1 + rng.below(ROWS as u64) as i64,
                1 + rng.below(COLS as u64) as i64,
            );
            if !seats.contains(&seat) {
                seats.push(seat);
            }
        }
        let resp = r.start(&tok, schedule, &seats).await;
        match resp.status {
            201 => held += 1,
            409 => continue,
            s => panic!("start: {s} {}", resp.body),
        }
        let booking = resp.booking_id();
        match rng.below(10) {
            0..=2 => {
                let s = other.confirm(&tok, &booking).await.status;
                assert!(s == 200 || s == 410, "confirm: {s}");
            }
            3..=5 => {
                let s = other.cancel(&tok, &booking).await.status;
                assert!(s == 200 || s == 410, "cancel: {s}");
            }
            6..=7 => {
                // Confirm racing cancel on different replicas: exactly one wins.
                let (c, x) = tokio::join!(r.confirm(&tok, &booking), other.cancel(&tok, &booking));
                let wins = [c.status, x.status].iter().filter(|s| **s == 200).count();
                assert!(
                    wins == 1 || (c.status == 410 && x.status == 410),
                    "confirm {} / cancel {}: {} {}",
                    c.status,
                    x.status,
                    c.body,
                    x.body
                );
            }
            _ => {
                // Abandoned: it expires (HOLD_SECONDS=1); a new user goes on.
                token = None;
            }
        }
    }
    held
}

#[tokio::test]
async fn storm_on_two_replicas_every_subscriber_converges_to_the_snapshot() {
    let opts = ReplicaOpts::default().with("HOLD_SECONDS", 1);
    let (db, a, b) = TestDb::with_two_replicas(opts).await;
    let (a, b) = (Arc::new(a), Arc::new(b));
    let schedule = a.create_schedule(ROWS, COLS, &[]).await;

    let mut subs = vec![
        SeatMapClient::snapshot_then_stream("A0 (snapshot A)", &a, &a, schedule).await,
        SeatMapClient::stream_then_snapshot("B0 (snapshot B, live first)", &b, &b, schedule).await,
    ];

    let started = Instant::now();
    let workers: Vec<_> = (0..8)
        .map(|i| tokio::spawn(storm_worker([a.clone(), b.clone()], schedule, i + 1, 40)))
        .collect();

    // Four more subscribers join mid-storm, at staggered points.
    for k in 1..=4i64 {
        let threshold = k * 30;
        wait_for("storm progress", Duration::from_secs(30), || async {
            (a.snapshot(schedule).await.0 >= threshold).then_some(())
        })
        .await;
        let (snap, streamer, label) = match k {
            1 => (&b, &a, "A1 (snapshot B)"),
            2 => (&a, &b, "B1 (snapshot A)"),
            3 => (&a, &a, "A2 (live first)"),
            _ => (&b, &b, "B2 (snapshot B)"),
        };
        subs.push(if k == 3 {
            SeatMapClient::stream_then_snapshot(label, snap, streamer, schedule).await
        } else {
            SeatMapClient::snapshot_then_stream(label, snap, streamer, schedule).await
        });
    }
    let mut held = 0;
    for w in workers {
        held += w.await.expect("worker");
    }
    let storm_time = started.elapsed();

    // Quiet: every abandoned hold expired and was released.
    let (final_id, final_map) = wait_for(
        "all abandoned holds released",
        Duration::from_secs(10),
        || async {
            let (id, map) = a.snapshot(schedule).await;
            (!map.values().any(|s| s == "OCCUPIED")).then_some((id, map))
        },
    )
    .await;
    assert_eq!(b.snapshot(schedule).await, (final_id, final_map.clone()));
    println!(
        "storm: {held} holds, {final_id} events in {storm_time:?}; {} seats sold",
        final_map.len()
    );
    assert!(final_id >= 200, "the storm made too few events: {final_id}");

    for s in &mut subs {
        s.catch_up(final_id, Duration::from_secs(10), None).await;
        assert_eq!(s.map, final_map, "{} diverged", s.name);
    }
    // A fresh subscriber from the final snapshot sees nothing more.
    let mut late = SeatMapClient::snapshot_then_stream("late", &b, &a, schedule).await;
    assert_eq!(late.sse.next_event(Duration::from_millis(300)).await, None);
    late.catch_up(final_id, Duration::from_secs(1), None).await;
    db.assert_consistent().await;
}
