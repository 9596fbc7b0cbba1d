//! One hot showing cannot take every pooled connection from the others.

use std::time::{Duration, Instant};

use futures::future::join_all;

use crate::helpers::*;

/// Blocks every hold of `schedule` at its last statement (the event
/// counter's row lock), as a drop's queue inside PostgreSQL would, and
/// fires `n` starts at it; returns them still running.
async fn stuck_show(
    db: &TestDb,
    r: &Replica,
    schedule: i64,
    n: usize,
) -> (tokio_postgres::Client, Vec<tokio::task::JoinHandle<u16>>) {
    let locker = db.client().await;
    locker.batch_execute("BEGIN").await.unwrap();
    locker
        .execute(
            "SELECT 1 FROM schedule_event_counters WHERE schedule_id = $1 FOR UPDATE",
            &[&schedule],
        )
        .await
        .unwrap();
    let tokens = join_all((0..n).map(|_| r.guest())).await;
    let starts = tokens
        .into_iter()
        .enumerate()
        .map(|(i, token)| {
            let http = r.http.clone();
            let url = r.url("/api/bookings/start");
            let col = (i % 10) as i64 + 1;
            let row = (i / 10) as i64 + 1;
            tokio::spawn(async move {
                http.post(url)
                    .bearer_auth(token)
                    .json(&start_body(schedule, &[(row, col)]))
                    .send()
                    .await
                    .map_or(0, |r| r.status().as_u16())
            })
        })
        .collect();
    (locker, starts)
}

#[tokio::test]
async fn a_hot_show_leaves_connections_for_the_others() {
    for (per_show, admitted_elsewhere) in [(2, true), (4, false)] {
        let (db, r) = TestDb::with_replica(
            ReplicaOpts::default()
                .with("DB_POOL_SIZE", 4)
                .with("HOLD_CONCURRENCY_PER_SHOW", per_show),
        )
        .await;
        let hot = r.create_schedule(2, 10, &[]).await;
        let other = r.create_schedule(2, 10, &[]).await;
        let (locker, starts) = stuck_show(&db, &r, hot, 10).await;
        // The hot show's transactions are inside, waiting on the lock.
        db.wait_count(
            "hot-show holds waiting on the counter lock",
            Duration::from_secs(10),
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() \
                 AND application_name = 'seatsync' AND wait_event_type = 'Lock'",
            &[],
            per_show as i64,
        )
        .await;
        let inside = per_show;
        let token = r.guest().await;
        let sent = Instant::now();
        let elsewhere =
            tokio::time::timeout(Duration::from_secs(3), r.start(&token, other, &[(1, 1)])).await;
        let waited = sent.elapsed();
        match (&elsewhere, admitted_elsewhere) {
            (Ok(resp), true) => assert_eq!(resp.status, 201, "{}", resp.body),
            (Err(_), false) => {}
            (other, _) => panic!(
                "per show {per_show}: the other show's start: {:?}",
                other.as_ref().map(|r| r.status)
            ),
        }
        // Let the hot show go: every start of it is answered.
        locker.batch_execute("ROLLBACK").await.unwrap();
        let statuses: Vec<u16> = join_all(starts)
            .await
            .into_iter()
            .map(|s| s.unwrap())
            .collect();
        assert!(statuses.iter().all(|s| *s == 201), "{statuses:?}");
        println!(
            "admission: HOLD_CONCURRENCY_PER_SHOW={per_show} of DB_POOL_SIZE=4, {inside} hot-show holds stuck inside: \
             another show's start {} after {:.0} ms; the hot show's 10 starts all 201 once released",
            if elsewhere.is_ok() { "answered 201" } else { "still waiting" },
            waited.as_secs_f64() * 1000.0
        );
        db.assert_consistent().await;
    }
}
