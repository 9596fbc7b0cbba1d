//! The LISTEN connection dies under live streams: the replica reports
//! not-ready, reconnects, and every connected client converges, missing
//! nothing and receiving nothing twice.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::helpers::*;

const LISTENERS: &str = "SELECT pid, client_port FROM pg_stat_activity \
     WHERE application_name = 'seatsync-listener' AND datname = $1";

/// Terminates the listener backends of database `db_name`; only those of
/// the replica process `only` if given. Returns how many were terminated.
async fn terminate_listeners(
    pg: &tokio_postgres::Client,
    db_name: &str,
    only: Option<u32>,
) -> usize {
    // Read afresh each time: a listener that reconnects has a new port.
    let ports = only.map(local_ports);
    let rows = pg.query(LISTENERS, &[&db_name]).await.unwrap();
    let mut killed = 0;
    for row in rows {
        let pid: i32 = row.get(0);
        let port: Option<i32> = row.get(1);
        if let Some(ports) = &ports {
            if !port.is_some_and(|p| ports.contains(&(p as u16))) {
                continue;
            }
        }
        killed += usize::from(terminate_backend(pg, pid).await.unwrap());
    }
    killed
}

/// Keeps terminating the chosen listener backends (each reconnect is cut
/// again within a few ms) until `stop` is set, so the replica's listener
/// stays down while the test makes changes. Counts terminations.
fn spawn_killer(
    pg: tokio_postgres::Client,
    db_name: String,
    replica_pid: Option<u32>,
    stop: Arc<AtomicBool>,
    killed: Arc<AtomicUsize>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        while !stop.load(Ordering::SeqCst) {
            let n = terminate_listeners(&pg, &db_name, replica_pid).await;
            killed.fetch_add(n, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
}

async fn wait_ready_status(r: &Replica, want: u16, timeout: Duration) -> Duration {
    let t = Instant::now();
    wait_for(&format!("/readyz to answer {want}"), timeout, || async {
        (r.ready_status().await == Some(want)).then_some(())
    })
    .await;
    t.elapsed()
}

#[tokio::test]
async fn listener_terminated_repeatedly_clients_converge_and_readiness_recovers() {
    let opts = ReplicaOpts::default().with("HEARTBEAT_SECONDS", 1);
    let (db, a, b) = TestDb::with_two_replicas(opts).await;
    let schedule = a.create_schedule(10, 20, &[]).await;
    let pg = db.client().await;
    let mut changes = ChangeScript::new();

    // Both replicas' listeners are visible, and tied to their processes.
    let backends = pg.query(LISTENERS, &[&db.name]).await.unwrap();
    assert_eq!(backends.len(), 2, "one listener per replica");

    let mut clients = vec![
        SeatMapClient::snapshot_then_stream("A1", &a, &a, schedule).await,
        SeatMapClient::stream_then_snapshot("A2 (live first)", &b, &a, schedule).await,
        SeatMapClient::snapshot_then_stream("B1", &b, &b, schedule).await,
    ];
    for _ in 0..3 {
        changes.step(&a, schedule).await;
    }

    for round in 0..4 {
        // Rounds 0 and 2: only A's listener (B's stays up); 1 and 3: every
        // listener of the database.
        let only_a = round % 2 == 0;
        let reconnects_a = a.metric("seatsync_listener_reconnects_total").await;
        let reconnects_b = b.metric("seatsync_listener_reconnects_total").await;
        let stop = Arc::new(AtomicBool::new(false));
        let killed = Arc::new(AtomicUsize::new(0));
        let only = only_a.then(|| a.pid().expect("replica runs"));
        let first = terminate_listeners(&pg, &db.name, only).await;
        assert_eq!(first, if only_a { 1 } else { 2 }, "round {round}");
        let killer = spawn_killer(
            db.client().await,
            db.name.clone(),
            only,
            stop.clone(),
            killed.clone(),
        );

        // Down: not ready. The killer keeps it down while we write.
        let dip = wait_ready_status(&a, 503, Duration::from_secs(5)).await;
        let mut made = 0;
        // Changes through the other replica, and through A itself (its own
        // NOTIFYs are lost to it as well while its listener is down).
        for i in 0..6 {
            let via = if i % 3 == 2 { &a } else { &b };
            changes.step(via, schedule).await;
            made += 1;
        }
        if round == 1 {
            // A client that arrives while the listener is down, and one
            // that resumes from an old position meanwhile.
            clients.push(
                SeatMapClient::snapshot_then_stream("A3 (joined while down)", &a, &a, schedule)
                    .await,
            );
            let mut resumed =
                SeatMapClient::snapshot_then_stream("A4 (resumed while down)", &b, &b, schedule)
                    .await;
            resumed.reconnect(&a).await;
            clients.push(resumed);
            changes.step(&b, schedule).await;
            made += 1;
        }
        stop.store(true, Ordering::SeqCst);
        killer.await.unwrap();

        let recovered = wait_ready_status(&a, 200, Duration::from_secs(15)).await;
        if !only_a {
            wait_ready_status(&b, 200, Duration::from_secs(15)).await;
        }
        let reconnects = a.metric("seatsync_listener_reconnects_total").await - reconnects_a;
        assert!(reconnects >= 1.0, "round {round}: A counted no reconnect");
        let b_reconnects = b.metric("seatsync_listener_reconnects_total").await - reconnects_b;
        if only_a {
            assert_eq!(
                b_reconnects, 0.0,
                "round {round}: B's listener was not touched"
            );
        } else {
            assert!(b_reconnects >= 1.0, "round {round}: B counted no reconnect");
        }

        // Recovered: every client converges on what was missed while the
        // listener was down, without waiting for any further change.
        let (last, truth) = a.snapshot(schedule).await;
        let t = Instant::now();
        for c in &mut clients {
            let resync_from = if c.name.starts_with('A') { &a } else { &b };
            c.catch_up(last, Duration::from_secs(5), Some(resync_from))
                .await;
            assert_eq!(c.map, truth, "round {round}: {} diverged", c.name);
        }
        let converged = t.elapsed();
        // And live again: a change after recovery reaches everyone, once.
        changes.step(&a, schedule).await;
        let (last, truth) = b.snapshot(schedule).await;
        for c in &mut clients {
            let resync_from = if c.name.starts_with('A') { &a } else { &b };
            c.catch_up(last, Duration::from_secs(5), Some(resync_from))
                .await;
            assert_eq!(c.map, truth, "round {round}: {} diverged", c.name);
        }
        println!(
            "round {round} ({}): 503 seen after {dip:?}, {} terminations, {reconnects} reconnects, \
             200 again {recovered:?} after the killing stopped, {made} changes meanwhile, all \
             clients converged {converged:?} after that",
            if only_a { "A only" } else { "all listeners" },
            first + killed.load(Ordering::SeqCst),
        );
    }
    for c in &clients {
        println!(
            "{}: {} events, {} resyncs, at event {}",
            c.name, c.events, c.resyncs, c.applied_upto
        );
    }
    // The database was reachable throughout, so every gap was replayable
    // from the log: nobody needed a resync.
    assert!(
        clients.iter().all(|c| c.resyncs == 0),
        "a resync although the log had every event"
    );
    db.assert_consistent().await;
}
