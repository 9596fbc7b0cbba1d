//! The one LISTEN connection of this replica.
//!
//! It is a plain `tokio_postgres` connection, not a pooled one: deadpool
//! drives pooled connections itself and drops their notifications. We drive
//! it with `Connection::poll_message` and keep its `Client` alive.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use tokio::sync::mpsc;
use tokio_postgres::{AsyncMessage, NoTls, Notification};
use tokio_util::sync::CancellationToken;

use super::event_log::EventLog;
use super::hub::ScheduleHubs;
use crate::db::{pg_config, DbError};
use crate::events::{SeatEvent, NOTIFY_CHANNEL};
use crate::holds::live_map::LiveMaps;

/// How often the listener proves its connection alive with a query: a
/// half-open socket would otherwise look healthy while nothing arrives.
const HEALTH_CHECK_EVERY: Duration = Duration::from_secs(2);
const HEALTH_CHECK_TIMEOUT: Duration = Duration::from_secs(3);
const BACKOFF_MIN: Duration = Duration::from_millis(100);
/// Short: the replica serves nothing while its listener is down, so it
/// must notice a database that is back within a second. An attempt against
/// a database that is down is one refused connection; one that hangs is
/// bounded by the connect timeout.
const BACKOFF_MAX: Duration = Duration::from_millis(500);
/// Notifications buffered between the socket and the relay. When full, the
/// driver stops reading and PostgreSQL queues for us, so memory stays bounded.
const NOTIFICATION_BUFFER: usize = 4_096;

pub const LISTENER_APPLICATION_NAME: &str = "seatsync-listener";

/// Relays committed seat events from PostgreSQL to this replica's hubs.
pub struct ListenerRelay {
    url: String,
    hubs: ScheduleHubs,
    maps: LiveMaps,
    log: EventLog,
    ready: Arc<AtomicBool>,
    shutdown: CancellationToken,
}

impl ListenerRelay {
    pub fn new(
        url: String,
        hubs: ScheduleHubs,
        maps: LiveMaps,
        log: EventLog,
        ready: Arc<AtomicBool>,
        shutdown: CancellationToken,
    ) -> Self {
        Self {
            url,
            hubs,
            maps,
            log,
            ready,
            shutdown,
        }
    }

    /// Runs until shutdown, reconnecting with backoff whenever the
    /// connection is lost. While it is down the replica reports not-ready.
    pub async fn run(self) {
        let mut backoff = BACKOFF_MIN;
        loop {
            let result = self.session(&mut backoff).await;
            self.set_ready(false);
            if self.shutdown.is_cancelled() {
                return;
            }
            if let Err(e) = result {
                tracing::warn!(error = %e, retry_in_ms = backoff.as_millis() as u64, "seat event listener down");
            }
            metrics::counter!("seatsync_listener_reconnects_total").increment(1);
            tokio::select! {
                _ = self.shutdown.cancelled() => return,
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    }

    fn set_ready(&self, up: bool) {
        self.ready.store(up, Ordering::SeqCst);
        metrics::gauge!("seatsync_listener_up").set(if up { 1.0 } else { 0.0 });
    }

    async fn session(&self, backoff: &mut Duration) -> Result<(), DbError> {
        let mut cfg = pg_config(&self.url)?;
        // Named, so operators (and fault tests) can find it in pg_stat_activity.
        cfg.application_name(LISTENER_APPLICATION_NAME);
        let (client, mut connection) = cfg.connect(NoTls).await?;
        let (tx, mut notifications) = mpsc::channel::<Notification>(NOTIFICATION_BUFFER);
        let driver = tokio::spawn(async move {
            let mut messages = futures::stream::poll_fn(move |cx| connection.poll_message(cx));
            while let Some(message) = messages.next().await {
                match message {
                    Ok(AsyncMessage::Notification(n)) => {
                        if tx.send(n).await.is_err() {
                            return;
                        }
                    }
                    Ok(_) => {}
                    Err(e) => {
                        tracing::warn!(error = %crate::db::one_line_chain(&e), "listener connection failed");
                        return;
                    }
                }
            }
        });
        // Abort the driver however this session ends.
        let _driver = AbortOnDrop(driver);

        client
            .batch_execute(&format!("LISTEN {NOTIFY_CHANNEL}"))
            .await?;
        // Everything committed while we were not listening is in the log:
        // replay it to the schedules that have viewers before going live.
        self.hubs.begin_generation();
        // What was committed while no one listened never reaches the maps.
        self.maps.reset();
        self.close_gaps().await;
        self.set_ready(true);
        *backoff = BACKOFF_MIN;
        tracing::info!("seat event listener up");

        let mut health = tokio::time::interval(HEALTH_CHECK_EVERY);
        health.tick().await;
        loop {
            tokio::select! {
                _ = self.shutdown.cancelled() => return Ok(()),
                n = notifications.recv() => match n {
                    Some(n) => self.relay(&n),
                    None => return Err(DbError::ConnectionLost("the server closed the listener connection")),
                },
                _ = health.tick() => {
                    match tokio::time::timeout(HEALTH_CHECK_TIMEOUT, client.simple_query("SELECT 1")).await {
                        Ok(Ok(_)) => {}
                        Ok(Err(e)) => return Err(e.into()),
                        Err(_) => return Err(DbError::ConnectionLost("listener health check timed out")),
                    }
                }
            }
        }
    }

    fn relay(&self, n: &Notification) {
        match serde_json::from_str::<SeatEvent>(n.payload()) {
            Ok(event) => {
                metrics::counter!("seatsync_events_relayed_total").increment(1);
                self.hubs.publish(&event);
                self.maps.relay(&event);
                // Commit to hand-over to this replica's streams, which write
                // it at once. Across machines this includes clock skew.
                if let Some(at) = event.at_micros {
                    let now = chrono::Utc::now().timestamp_micros();
                    metrics::histogram!("seatsync_event_commit_to_send_seconds")
                        .record(now.saturating_sub(at).max(0) as f64 / 1e6);
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, payload = n.payload(), "unreadable seat notification")
            }
        }
    }

    /// Replays, per schedule with viewers, the events after its low-water
    /// mark. Streams drop what they already have, so overlap is harmless;
    /// where the log cannot fill the gap, they are told to resync.
    async fn close_gaps(&self) {
        for (schedule_id, low_water) in self.hubs.active() {
            let Some(from) = low_water else { continue };
            let result = async {
                let upto = self.log.last_event_id(schedule_id).await?.unwrap_or(from);
                self.log.replay(schedule_id, from, upto).await
            }
            .await;
            match result {
                Ok(events) => {
                    for e in &events {
                        self.hubs.publish(e);
                    }
                    if !events.is_empty() {
                        tracing::info!(
                            schedule_id,
                            replayed = events.len(),
                            "closed gap after listener reconnect"
                        );
                    }
                }
                Err(e) => {
                    tracing::warn!(schedule_id, error = %e, "cannot replay gap; asking clients to resync");
                    self.hubs.resync(schedule_id);
                }
            }
        }
    }
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
