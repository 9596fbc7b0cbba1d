//! Abuse limits, per replica: starts per user, booking requests per client
//! address, seat streams per client address, and a time limit on every
//! request but a stream. Each refusal is problem+json (`429 rate_limited`
//! with `Retry-After`, `503 too_many_streams`) and changes nothing.
//!
//! The address limits are backstops, high on purpose: thousands of fans can
//! share one address (stadium Wi-Fi, carrier NAT). What stops a script is
//! the per-user limit, which no person meets; the address limit stops one
//! that mints a guest token per request.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{ConnectInfo, FromRequestParts, Request, State};
use axum::http::request::Parts;
use axum::http::{Extensions, HeaderMap};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use ipnet::IpNet;
use uuid::Uuid;

use super::error::ApiError;
use super::AppState;

/// Settings of the limits, from the configuration.
#[derive(Debug, Clone)]
pub struct LimitSettings {
    /// Starts per second per user; 0 = off.
    pub user_starts_per_second: u32,
    /// Booking requests per second per address; 0 = off.
    pub address_requests_per_second: u32,
    pub streams_per_address: u32,
    pub trusted_proxies: Vec<IpNet>,
    pub request_timeout: Duration,
    /// Largest request head (request line and headers), in bytes.
    pub max_header_bytes: usize,
}

/// The limits' state on this replica.
pub struct AbuseLimits {
    user_starts: Option<DefaultKeyedRateLimiter<Uuid>>,
    address_requests: Option<DefaultKeyedRateLimiter<IpAddr>>,
    streams: Mutex<HashMap<IpAddr, u32>>,
    settings: LimitSettings,
}

/// A limiter allowing `rate` per second, in bursts of `burst_factor` times
/// as many; `None` when `rate` is 0 (off).
fn limiter<K: std::hash::Hash + Eq + Clone>(
    rate: u32,
    burst_factor: u32,
) -> Option<DefaultKeyedRateLimiter<K>> {
    let rate = NonZeroU32::new(rate)?;
    let burst = NonZeroU32::new(rate.get().saturating_mul(burst_factor)).unwrap_or(rate);
    Some(RateLimiter::keyed(
        Quota::per_second(rate).allow_burst(burst),
    ))
}

fn check<K: std::hash::Hash + Eq + Clone>(
    limiter: Option<&DefaultKeyedRateLimiter<K>>,
    key: &K,
    what: &'static str,
) -> Result<(), ApiError> {
    let Some(limiter) = limiter else {
        return Ok(());
    };
    limiter.check_key(key).map_err(|not_until| {
        let wait = not_until.wait_time_from(DefaultClock::default().now());
        metrics::counter!("seatsync_rate_limited_total", "limit" => what).increment(1);
        ApiError::RateLimited {
            // Whole seconds, rounded up: Retry-After has no fractions.
            retry_after_seconds: wait.as_secs() + u64::from(wait.subsec_nanos() > 0),
        }
    })
}

impl AbuseLimits {
    pub fn new(settings: LimitSettings) -> Self {
        Self {
            user_starts: limiter(settings.user_starts_per_second, 5),
            address_requests: limiter(settings.address_requests_per_second, 2),
            streams: Mutex::default(),
            settings,
        }
    }

    pub fn request_timeout(&self) -> Duration {
        self.settings.request_timeout
    }

    /// The client's address: the peer's, unless the peer is a trusted
    /// proxy; then the nearest address in `X-Forwarded-For` that is not
    /// one (a client can write anything to the left of it).
    pub fn client_address(&self, peer: IpAddr, headers: &HeaderMap) -> IpAddr {
        let trusted = |ip: &IpAddr| self.settings.trusted_proxies.iter().any(|n| n.contains(ip));
        if !trusted(&peer) {
            return peer;
        }
        let forwarded = headers
            .get_all("x-forwarded-for")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(|s| s.trim().parse::<IpAddr>())
            .collect::<Vec<_>>();
        for hop in forwarded.iter().rev() {
            match hop {
                Ok(ip) if trusted(ip) => continue,
                Ok(ip) => return *ip,
                // An unreadable hop: nothing left of it can be trusted.
                Err(_) => break,
            }
        }
        peer
    }

    pub fn check_user_start(&self, user: Uuid) -> Result<(), ApiError> {
        check(self.user_starts.as_ref(), &user, "user")
    }

    pub fn check_address(&self, address: IpAddr) -> Result<(), ApiError> {
        check(self.address_requests.as_ref(), &address, "address")
    }

    /// A place for one more stream of `address`, held until dropped.
    pub fn open_stream(self: &Arc<Self>, address: IpAddr) -> Option<AddressStream> {
        let mut streams = self.streams.lock().unwrap_or_else(|p| p.into_inner());
        let open = streams.entry(address).or_insert(0);
        if *open >= self.settings.streams_per_address {
            return None;
        }
        *open += 1;
        Some(AddressStream {
            limits: self.clone(),
            address,
        })
    }

    /// Forgets rate-limit state of keys that have been quiet, so memory
    /// follows the active clients, not every client ever seen.
    pub fn forget_idle(&self) {
        for l in self.user_starts.iter() {
            l.retain_recent();
            l.shrink_to_fit();
        }
        for l in self.address_requests.iter() {
            l.retain_recent();
            l.shrink_to_fit();
        }
    }
}

/// One open stream of an address.
pub struct AddressStream {
    limits: Arc<AbuseLimits>,
    address: IpAddr,
}

impl Drop for AddressStream {
    fn drop(&mut self) {
        let mut streams = self
            .limits
            .streams
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(open) = streams.get_mut(&self.address) {
            *open -= 1;
            if *open == 0 {
                streams.remove(&self.address);
            }
        }
    }
}

/// The client address of a request (see [`AbuseLimits::client_address`]).
pub struct ClientAddress(pub IpAddr);

impl ClientAddress {
    fn of(state: &AppState, extensions: &Extensions, headers: &HeaderMap) -> Self {
        // The server loop records every peer; unspecified only where a
        // request did not come through it.
        let peer = extensions
            .get::<ConnectInfo<SocketAddr>>()
            .map_or(IpAddr::from([0, 0, 0, 0]), |ConnectInfo(p)| p.ip());
        ClientAddress(state.abuse.client_address(peer, headers))
    }
}

impl FromRequestParts<AppState> for ClientAddress {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        Ok(ClientAddress::of(state, &parts.extensions, &parts.headers))
    }
}

/// Route layer: booking and guest-token requests per client address.
pub async fn limit_address(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let ClientAddress(address) = ClientAddress::of(&state, req.extensions(), req.headers());
    if let Err(e) = state.abuse.check_address(address) {
        return e.into_response();
    }
    next.run(req).await
}

/// Every request: a head (request line and headers) larger than
/// `MAX_HEADER_BYTES` gets `431`. hyper's read buffer bounds a head only
/// roughly (one read may take in more), so the exact limit is kept here.
pub async fn limit_head(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let limit = state.abuse.settings.max_header_bytes;
    let head = req.method().as_str().len()
        + req.uri().to_string().len()
        + req
            .headers()
            .iter()
            // "name: value\r\n"
            .map(|(name, value)| name.as_str().len() + value.len() + 4)
            .sum::<usize>();
    if head > limit {
        return ApiError::HeadersTooLarge { limit }.into_response();
    }
    next.run(req).await
}

/// Route layer: every request but a stream answers within the request
/// timeout. Dropping the handler rolls back any transaction it had open;
/// only a commit already sent when the time runs out can still land (a
/// retry with the same `Idempotency-Key` is safe either way).
pub async fn limit_time(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let limit = state.abuse.request_timeout();
    match tokio::time::timeout(limit, next.run(req)).await {
        Ok(response) => response,
        Err(_) => ApiError::Unavailable(format!(
            "the request took longer than {} s",
            limit.as_secs()
        ))
        .into_response(),
    }
}
