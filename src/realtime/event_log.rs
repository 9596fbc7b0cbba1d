//! Reads the seat event log that every seat-changing transaction appends to.

use postgres_types::{Json, Type};

use crate::db::{Db, DbError, Sql, Statements};
use crate::events::SeatEvent;
use crate::schedules::Seat;

const EVENTS_AFTER: Sql = Sql {
    text: "SELECT event_id, action, seats FROM seat_events \
     WHERE schedule_id = $1 AND event_id > $2 AND event_id <= $3 ORDER BY event_id LIMIT $4",
    types: &[Type::INT8, Type::INT8, Type::INT8, Type::INT8],
};
const LAST_EVENT_ID: Sql = Sql {
    text: "SELECT last_event_id FROM schedule_event_counters WHERE schedule_id = $1",
    types: &[Type::INT8],
};

/// Events fetched per query while replaying.
const PAGE: i64 = 500;

/// A replay could not be completed from the log.
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    /// Events after the position were pruned: only a resync can help.
    #[error("events after {0} are no longer retained")]
    Pruned(i64),
    #[error(transparent)]
    Db(#[from] DbError),
}

#[derive(Clone)]
pub struct EventLog {
    db: Db,
}

impl EventLog {
    pub fn new(db: Db) -> Self {
        Self { db }
    }

    /// The id of the schedule's newest event (0 when none); `None` if the
    /// schedule does not exist.
    pub async fn last_event_id(&self, schedule_id: i64) -> Result<Option<i64>, DbError> {
        let conn = self.db.conn().await?;
        match conn.query_opt(&LAST_EVENT_ID, &[&schedule_id]).await? {
            Some(row) => Ok(Some(row.try_get(0)?)),
            None => Ok(None),
        }
    }

    /// Every event with `after < id <= upto`, in order and without holes.
    /// Ids are dense per schedule, so a hole means pruned events.
    pub async fn replay(
        &self,
        schedule_id: i64,
        after: i64,
        upto: i64,
    ) -> Result<Vec<SeatEvent>, ReplayError> {
        let conn = self.db.conn().await?;
        let mut out = Vec::new();
        let mut pos = after;
        while pos < upto {
            let rows = conn
                .query(&EVENTS_AFTER, &[&schedule_id, &pos, &upto, &PAGE])
                .await?;
            if rows.is_empty() {
                return Err(ReplayError::Pruned(pos));
            }
            for row in rows {
                let event_id: i64 = row.try_get(0).map_err(DbError::from)?;
                if event_id != pos + 1 {
                    return Err(ReplayError::Pruned(pos));
                }
                let Json(seats): Json<Vec<Seat>> = row.try_get(2).map_err(DbError::from)?;
                out.push(SeatEvent {
                    schedule_id,
                    event_id,
                    action: row.try_get(1).map_err(DbError::from)?,
                    seats,
                    at_micros: None,
                    holder: None,
                    expires_at_micros: None,
                });
                pos = event_id;
            }
        }
        Ok(out)
    }
}
