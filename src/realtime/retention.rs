//! Prunes the seat event log. A client resuming from before the retained
//! window gets `event: resync` instead of a replay.

use std::time::Duration;

use deadpool_postgres::Pool;
use tokio_util::sync::CancellationToken;

use crate::db::{DbError, PgConn};

/// Deletes in batches, skipping rows another replica is already deleting,
/// so replicas pruning at once neither wait on each other nor hold long locks.
const PRUNE_EVENTS: &str = "DELETE FROM seat_events WHERE (schedule_id, event_id) IN ( \
       SELECT schedule_id, event_id FROM seat_events \
       WHERE created_at < now() - $1::int * interval '1 second' \
       LIMIT $2 FOR UPDATE SKIP LOCKED)";
const PRUNE_BATCH: i64 = 5_000;

pub async fn prune_once(pool: &Pool, retention_seconds: u32) -> Result<u64, DbError> {
    let client = PgConn::get(pool).await?;
    let stmt = client.prepare_cached(PRUNE_EVENTS).await?;
    let retention = i32::try_from(retention_seconds).unwrap_or(i32::MAX);
    let mut total = 0;
    loop {
        let n = client.execute(&stmt, &[&retention, &PRUNE_BATCH]).await?;
        total += n;
        if n < PRUNE_BATCH as u64 {
            return Ok(total);
        }
    }
}

pub async fn run_pruner(pool: Pool, retention_seconds: u32, shutdown: CancellationToken) {
    // Often enough that the log never holds much more than the window.
    let every = Duration::from_secs(u64::from(retention_seconds / 4).clamp(1, 60));
    let mut ticker = tokio::time::interval(every);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = ticker.tick() => {}
        }
        match prune_once(&pool, retention_seconds).await {
            Ok(0) => {}
            Ok(n) => tracing::debug!(pruned = n, "seat events pruned"),
            Err(e) => tracing::warn!(error = %e, "pruning seat events failed"),
        }
    }
}
