//! Shared test plumbing: per-test databases (`db`), replica processes and
//! the HTTP contract (`replica`), an SSE reader (`sse`), seat maps kept the
//! way the page keeps them (`seat_map`), private PostgreSQL clusters and
//! PgBouncers (`pg_cluster`), nginx in front (`nginx`), replicas whose log
//! is read (`process`), and what /proc says about a replica (`procfs`).

mod db;
mod nginx;
mod pg_cluster;
mod process;
mod procfs;
mod replica;
mod seat_map;
mod sse;

use std::collections::BTreeSet;
use std::future::Future;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::RngExt;
use serde_json::Value;

pub use db::*;
pub use nginx::*;
pub use pg_cluster::*;
pub use process::*;
pub use procfs::*;
pub use replica::*;
pub use seat_map::*;
pub use sse::*;

/// Polls `check` until it returns `Some`, or panics with `what` at the deadline.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        if Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Seats as (row, col), in an order of their own: requests and answers
/// may list them in any order.
pub type SeatSet = BTreeSet<(i64, i64)>;

pub fn set_of(seats: &[(i64, i64)]) -> SeatSet {
    seats.iter().copied().collect()
}

/// A JSON seat list as a set of (row, col).
pub fn seat_set(v: &Value) -> SeatSet {
    v.as_array()
        .unwrap_or_else(|| panic!("not a seat list: {v}"))
        .iter()
        .map(|s| (s["row"].as_i64().unwrap(), s["col"].as_i64().unwrap()))
        .collect()
}

/// 1-4 distinct seats of a `rows` x `cols` grid, in random order (the
/// server must not depend on the order it is sent).
pub fn random_seats(rng: &mut StdRng, rows: i64, cols: i64) -> Vec<(i64, i64)> {
    let n = rng.random_range(1..=4usize);
    let mut set = SeatSet::new();
    while set.len() < n {
        set.insert((rng.random_range(1..=rows), rng.random_range(1..=cols)));
    }
    let mut seats: Vec<(i64, i64)> = set.into_iter().collect();
    seats.shuffle(rng);
    seats
}

/// An RFC 3339 timestamp from a response.
pub fn timestamp(v: &Value) -> chrono::DateTime<chrono::Utc> {
    chrono::DateTime::parse_from_rfc3339(v.as_str().unwrap_or_else(|| panic!("not a time: {v}")))
        .unwrap_or_else(|e| panic!("not RFC 3339: {v}: {e}"))
        .with_timezone(&chrono::Utc)
}
