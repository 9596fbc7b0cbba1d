//! Hot-show admission: at most so many hold transactions of one showing at
//! once on this replica, so that a showing in a ticket drop cannot take every
//! pooled connection from the others. Its holds are serialized by its event
//! counter anyway, so more connections would not make it faster; they would
//! only queue inside PostgreSQL while other showings wait for the pool.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// A place in a showing's queue of hold transactions, held until dropped.
// The permit is never read: holding it is the point, until the drop.
pub struct Admitted(#[allow(dead_code)] OwnedSemaphorePermit);

#[derive(Clone)]
pub struct ShowAdmission {
    per_show: usize,
    shows: Arc<Mutex<HashMap<i64, Arc<Semaphore>>>>,
}

impl ShowAdmission {
    pub fn new(per_show: usize) -> Self {
        Self {
            per_show: per_show.max(1),
            shows: Arc::default(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<i64, Arc<Semaphore>>> {
        self.shows.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits for a place among the showing's hold transactions. `None`
    /// only if the gate was closed, which never happens: then the caller
    /// goes ahead unguarded rather than refusing a fan.
    pub async fn enter(&self, schedule_id: i64) -> Option<Admitted> {
        let gate = self
            .lock()
            .entry(schedule_id)
            .or_insert_with(|| Arc::new(Semaphore::new(self.per_show)))
            .clone();
        gate.acquire_owned().await.ok().map(Admitted)
    }

    /// Forgets the gates of showings with nobody inside or waiting.
    pub fn forget_idle(&self) {
        let per_show = self.per_show;
        self.lock()
            .retain(|_, gate| Arc::strong_count(gate) > 1 || gate.available_permits() < per_show);
    }
}
