//! Integration tests: real PostgreSQL, real replica processes, real HTTP and
//! SSE. Each test creates its own database and drops it afterwards.
//!
//! PostgreSQL is reached through `SEATSYNC_TEST_DATABASE_URL` (default
//! `postgres://postgres@127.0.0.1:5432/postgres`); `deploy/test.sh` makes
//! sure one is running.

mod admission;
mod bad_inputs;
mod best_available;
mod bookings;
mod chaos;
mod concurrency;
mod config;
mod expiry;
mod hardening;
mod helpers;
mod hold_invariant;
mod lifecycle;
mod listener_failure;
mod live_map;
mod nginx;
mod observability;
mod pgbouncer;
mod realtime;
mod smoke;
mod soak;
mod stream_connections;
