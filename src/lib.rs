//! seatsync: seat reservations for ticket drops.
//!
//! Component map:
//! - [`config`]: typed settings from flags and environment.
//! - [`startup`]: builds a replica (pools, listener, sweeper, router) and runs it.
//! - [`holds`]: the booking domain and the [`holds::SeatStore`] trait, with
//!   the PostgreSQL store and the expiry sweeper.
//! - [`schedules`]: showings, their seat grid, and the seat coordinates.
//! - [`events`]: seat events as logged and notified, and their channel.
//! - [`realtime`]: the per-replica LISTEN relay, per-schedule broadcast hubs,
//!   SSE streams with resume, and event-log retention.
//! - [`auth`]: guest tokens and the admin token.
//! - [`http`]: thin handlers, extractors, the one HTTP error type
//!   (problem+json), OpenAPI, the seat-map page.
//! - [`db`], [`embedded_pg`], [`json`], [`telemetry`]: plumbing.

pub mod auth;
pub mod config;
pub mod db;
pub mod embedded_pg;
pub mod events;
pub mod holds;
pub mod http;
pub mod json;
pub mod realtime;
pub mod schedules;
pub mod server;
pub mod startup;
pub mod telemetry;
