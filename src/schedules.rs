//! Schedules: showings with their seat grid. A schedule never changes once
//! created, so every replica caches the ones it has read.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, RwLock};

use chrono::{DateTime, Utc};
use postgres_types::{Json, Type};
use serde::{Deserialize, Deserializer, Serialize};

use crate::db::{Db, DbError, Sql, Statements};
use crate::json::Object;

/// A seat of a schedule's grid, 1-based; inside the grid by construction
/// (see [`Grid::locate`]).
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Serialize,
    Deserialize,
    utoipa::ToSchema,
)]
pub struct Seat {
    pub row: i16,
    pub col: i16,
}

/// A seat as a client named it, not yet checked against a grid. Wide
/// integers, so an out-of-range value gets a range error naming the field
/// rather than a type error.
#[derive(Debug, Clone, Copy, PartialEq, Eq, utoipa::ToSchema)]
pub struct RequestedSeat {
    pub row: i64,
    pub col: i64,
}

impl<'de> Deserialize<'de> for RequestedSeat {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Fields {
            row: i64,
            col: i64,
        }
        // `{"row": 1, "col": 5}` only: not the positional `[1, 5]` that a
        // derived impl would also take.
        let Object(Fields { row, col }) = Object::deserialize(deserializer)?;
        Ok(RequestedSeat { row, col })
    }
}

/// Why a requested seat is not in the grid: which coordinate, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutsideGrid {
    /// `row` or `col`.
    pub coordinate: &'static str,
    pub reason: String,
}

/// The dimensions of a seat grid; the one place that decides whether a
/// requested seat lies inside it.
#[derive(Debug, Clone, Copy)]
pub struct Grid {
    pub rows: i64,
    pub cols: i64,
}

impl Grid {
    pub fn locate(&self, seat: RequestedSeat) -> Result<Seat, OutsideGrid> {
        for (coordinate, value, max) in [("row", seat.row, self.rows), ("col", seat.col, self.cols)]
        {
            if !(1..=max).contains(&value) {
                return Err(OutsideGrid {
                    coordinate,
                    reason: format!("{coordinate} {value} is outside 1..={max}"),
                });
            }
        }
        // Grids are at most MAX_GRID wide, so the casts cannot truncate.
        Ok(Seat {
            row: seat.row as i16,
            col: seat.col as i16,
        })
    }
}

/// A showing and its grid.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Schedule {
    pub id: i64,
    pub title: String,
    pub starts_at: DateTime<Utc>,
    pub rows: i32,
    pub cols: i32,
    pub blocked: Vec<Seat>,
}

impl Schedule {
    pub fn grid(&self) -> Grid {
        Grid {
            rows: self.rows.into(),
            cols: self.cols.into(),
        }
    }
}

/// A schedule to create, as the admin sent it.
#[derive(Debug, Clone)]
pub struct NewSchedule {
    pub title: String,
    pub starts_at: DateTime<Utc>,
    pub rows: i64,
    pub cols: i64,
    pub blocked: Vec<RequestedSeat>,
}

/// A schedule that cannot be created as asked.
#[derive(Debug, thiserror::Error)]
pub enum ScheduleError {
    #[error("{field}: {reason}")]
    Invalid { field: String, reason: String },
    #[error(transparent)]
    Db(#[from] DbError),
}

pub const MAX_TITLE_CHARS: usize = 200;
pub const MAX_GRID: i64 = 100;

impl NewSchedule {
    fn validate(&self) -> Result<Vec<Seat>, ScheduleError> {
        let invalid = |field: String, reason: String| ScheduleError::Invalid { field, reason };
        // What is stored is the trimmed title, so that is what is checked.
        let title = self.title.trim();
        if title.is_empty() {
            return Err(invalid("title".into(), "must not be empty".into()));
        }
        if title.chars().count() > MAX_TITLE_CHARS {
            return Err(invalid(
                "title".into(),
                format!("at most {MAX_TITLE_CHARS} characters"),
            ));
        }
        if title.chars().any(char::is_control) {
            return Err(invalid(
                "title".into(),
                "must not contain control characters".into(),
            ));
        }
        for (name, v) in [("rows", self.rows), ("cols", self.cols)] {
            if !(1..=MAX_GRID).contains(&v) {
                return Err(invalid(
                    name.into(),
                    format!("must be in 1..={MAX_GRID}, got {v}"),
                ));
            }
        }
        let grid = Grid {
            rows: self.rows,
            cols: self.cols,
        };
        let mut blocked = BTreeSet::new();
        for (i, &requested) in self.blocked.iter().enumerate() {
            let seat = grid
                .locate(requested)
                .map_err(|e| invalid(format!("blocked[{i}].{}", e.coordinate), e.reason))?;
            if !blocked.insert(seat) {
                return Err(invalid(format!("blocked[{i}]"), "seat listed twice".into()));
            }
        }
        Ok(blocked.into_iter().collect())
    }
}

/// Creates the schedule and its event counter in one statement. Returns
/// `starts_at` as stored: PostgreSQL keeps microseconds, and every replica
/// must show the time the others read back from the table.
const INSERT_SCHEDULE: Sql = Sql {
    text: "WITH s AS ( \
       INSERT INTO schedules (title, starts_at, rows, cols, blocked) \
       VALUES ($1, $2, $3, $4, $5) RETURNING id, starts_at \
     ), c AS (INSERT INTO schedule_event_counters (schedule_id) SELECT id FROM s) \
     SELECT id, starts_at FROM s",
    types: &[
        Type::TEXT,
        Type::TIMESTAMPTZ,
        Type::INT4,
        Type::INT4,
        Type::JSONB,
    ],
};
const SELECT_SCHEDULE: Sql = Sql {
    text: "SELECT id, title, starts_at, rows, cols, blocked FROM schedules WHERE id = $1",
    types: &[Type::INT8],
};
const SELECT_SCHEDULES: Sql = Sql {
    text: "SELECT id, title, starts_at, rows, cols, blocked FROM schedules ORDER BY starts_at, id",
    types: &[],
};

/// Reads and creates schedules, caching them per replica.
#[derive(Clone)]
pub struct ScheduleCatalog {
    db: Db,
    cache: Arc<RwLock<HashMap<i64, Arc<Schedule>>>>,
}

impl ScheduleCatalog {
    pub fn new(db: Db) -> Self {
        Self {
            db,
            cache: Arc::default(),
        }
    }

    pub async fn create(&self, new: NewSchedule) -> Result<Arc<Schedule>, ScheduleError> {
        let blocked = new.validate()?;
        let conn = self.db.conn().await?;
        let row = conn
            .query_one(
                &INSERT_SCHEDULE,
                &[
                    &new.title.trim(),
                    &new.starts_at,
                    &(new.rows as i32),
                    &(new.cols as i32),
                    &Json(&blocked),
                ],
            )
            .await?;
        let schedule = Arc::new(Schedule {
            id: row.try_get(0).map_err(DbError::from)?,
            title: new.title.trim().to_owned(),
            starts_at: row.try_get(1).map_err(DbError::from)?,
            rows: new.rows as i32,
            cols: new.cols as i32,
            blocked,
        });
        self.remember(schedule.clone());
        Ok(schedule)
    }

    /// The schedule, from the cache or the database; `None` if it does not exist.
    pub async fn get(&self, id: i64) -> Result<Option<Arc<Schedule>>, DbError> {
        if let Some(s) = self
            .cache
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&id)
        {
            return Ok(Some(s.clone()));
        }
        let conn = self.db.conn().await?;
        let row = conn.query_opt(&SELECT_SCHEDULE, &[&id]).await?;
        Ok(match row {
            Some(row) => {
                let s = Arc::new(from_row(&row)?);
                self.remember(s.clone());
                Some(s)
            }
            None => None,
        })
    }

    pub async fn list(&self) -> Result<Vec<Schedule>, DbError> {
        let conn = self.db.conn().await?;
        let rows = conn.query(&SELECT_SCHEDULES, &[]).await?;
        rows.iter().map(from_row).collect()
    }

    fn remember(&self, s: Arc<Schedule>) {
        self.cache
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(s.id, s);
    }
}

fn from_row(row: &tokio_postgres::Row) -> Result<Schedule, DbError> {
    let Json(blocked): Json<Vec<Seat>> = row.try_get(5)?;
    Ok(Schedule {
        id: row.try_get(0)?,
        title: row.try_get(1)?,
        starts_at: row.try_get(2)?,
        rows: row.try_get(3)?,
        cols: row.try_get(4)?,
        blocked,
    })
}
