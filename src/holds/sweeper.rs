//! Releases expired holds. Runs on every replica; `SKIP LOCKED` in the store
//! keeps them from releasing the same hold twice, and no single replica is
//! needed for expiry to happen.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::SeatStore;

/// Holds claimed per transaction: keeps each sweep transaction (and the
/// counter locks it takes) short when a whole show's holds expire together.
const SWEEP_BATCH: i64 = 100;

/// Sweeps every `interval` until `shutdown`. A sweep that hits the batch
/// limit goes again at once, so a backlog drains without waiting.
pub async fn run_sweeper(
    store: Arc<dyn SeatStore>,
    interval: Duration,
    shutdown: CancellationToken,
) {
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = ticker.tick() => {}
        }
        loop {
            match store.release_expired(SWEEP_BATCH).await {
                Ok(n) => {
                    if n > 0 {
                        metrics::counter!("seatsync_holds_total", "outcome" => "expired")
                            .increment(n as u64);
                        tracing::debug!(released = n, "expired holds released");
                    }
                    if (n as i64) < SWEEP_BATCH {
                        break;
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "sweep failed; retrying next tick");
                    break;
                }
            }
        }
    }
}
