//! Prunes the seat event log. A client resuming from before the retained
//! window gets `event: resync` instead of a replay.

use std::time::Duration;

use postgres_types::Type;
use tokio_util::sync::CancellationToken;

use crate::db::{Db, DbError, Sql, Statements};

/// Deletes in batches, skipping rows another replica is already deleting,
/// so replicas pruning at once neither wait on each other nor hold long locks.
/// Returns how many it deleted as a row: every statement goes through one
/// query path, whatever `DB_STATEMENTS` says.
const PRUNE_EVENTS: Sql = Sql {
    text: "WITH pruned AS ( \
       DELETE FROM seat_events WHERE (schedule_id, event_id) IN ( \
         SELECT schedule_id, event_id FROM seat_events \
         WHERE created_at < now() - $1::int * interval '1 second' \
         LIMIT $2 FOR UPDATE SKIP LOCKED) \
       RETURNING 1) \
     SELECT count(*) FROM pruned",
    types: &[Type::INT4, Type::INT8],
};
const PRUNE_BATCH: i64 = 5_000;

pub async fn prune_once(db: &Db, retention_seconds: u32) -> Result<i64, DbError> {
    let conn = db.conn().await?;
    let retention = i32::try_from(retention_seconds).unwrap_or(i32::MAX);
    let mut total = 0;
    loop {
        let n: i64 = conn
            .query_one(&PRUNE_EVENTS, &[&retention, &PRUNE_BATCH])
            .await?
            .try_get(0)?;
        total += n;
        if n < PRUNE_BATCH {
            return Ok(total);
        }
    }
}

pub async fn run_pruner(db: Db, retention_seconds: u32, shutdown: CancellationToken) {
    // Often enough that the log never holds much more than the window.
    let every = Duration::from_secs(u64::from(retention_seconds / 4).clamp(1, 60));
    let mut ticker = tokio::time::interval(every);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = ticker.tick() => {}
        }
        match prune_once(&db, retention_seconds).await {
            Ok(0) => {}
            Ok(n) => tracing::debug!(pruned = n, "seat events pruned"),
            Err(e) => tracing::warn!(error = %e, "pruning seat events failed"),
        }
    }
}
