//! The `EVENTS` table of the event stream. Ids come from `AUTOINCREMENT`: every write goes
//! through the one writer thread and commits in id order, so a reader never sees a gap that
//! is later filled.

use chrono::{DateTime, Utc};
use rusqlite::{Connection, OptionalExtension, Row, params};

use super::{date_text, get_date, sql_err};
use crate::{EventBounds, NewEvent, Result, StoreError, StoredEvent};

pub(super) const SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS EVENTS (
    id        INTEGER PRIMARY KEY AUTOINCREMENT,
    topic     TEXT NOT NULL,
    kind      TEXT NOT NULL,
    at        TEXT NOT NULL,
    task_id   TEXT,
    worker_id TEXT,
    user_id   TEXT,
    data      TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS EVENTS_at ON EVENTS (at);
"#;

pub(super) fn create_schema(conn: &Connection) -> rusqlite::Result<()> {
    conn.execute_batch(SCHEMA)
}

pub(super) fn append(conn: &Connection, events: &[NewEvent]) -> Result<Vec<u64>> {
    let mut stmt = conn
        .prepare_cached(
            "INSERT INTO EVENTS (topic, kind, at, task_id, worker_id, user_id, data) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        )
        .map_err(sql_err("recording events"))?;
    let mut ids = Vec::with_capacity(events.len());
    for e in events {
        stmt.execute(params![
            e.topic,
            e.kind,
            date_text(&e.at),
            e.task_id,
            e.worker_id,
            e.user_id,
            e.data.to_string()
        ])
        .map_err(sql_err("recording events"))?;
        let id = u64::try_from(conn.last_insert_rowid())
            .map_err(|e| StoreError::backend("recording events", e))?;
        ids.push(id);
    }
    Ok(ids)
}

fn event_from_row(row: &Row<'_>) -> rusqlite::Result<StoredEvent> {
    let id: i64 = row.get(0)?;
    let data: String = row.get(7)?;
    Ok(StoredEvent {
        id: u64::try_from(id).map_err(|e| super::conversion(0, e))?,
        event: NewEvent {
            topic: row.get(1)?,
            kind: row.get(2)?,
            at: get_date(row, 3)?,
            task_id: row.get(4)?,
            worker_id: row.get(5)?,
            user_id: row.get(6)?,
            data: serde_json::from_str(&data).map_err(|e| super::conversion(7, e))?,
        },
    })
}

pub(super) fn after(conn: &Connection, after: u64, limit: u32) -> Result<Vec<StoredEvent>> {
    let after = i64::try_from(after).unwrap_or(i64::MAX);
    let mut stmt = conn
        .prepare_cached(
            "SELECT id, topic, kind, at, task_id, worker_id, user_id, data FROM EVENTS \
             WHERE id > ?1 ORDER BY id LIMIT ?2",
        )
        .map_err(sql_err("reading events"))?;
    let rows = stmt
        .query_map(params![after, limit], event_from_row)
        .map_err(sql_err("reading events"))?;
    rows.collect::<rusqlite::Result<Vec<_>>>()
        .map_err(sql_err("reading events"))
}

pub(super) fn bounds(conn: &Connection) -> Result<EventBounds> {
    let head: Option<i64> = conn
        .query_row(
            "SELECT seq FROM sqlite_sequence WHERE name = 'EVENTS'",
            [],
            |row| row.get(0),
        )
        .optional()
        .map_err(sql_err("reading the event bounds"))?;
    let oldest: Option<i64> = conn
        .query_row("SELECT MIN(id) FROM EVENTS", [], |row| row.get(0))
        .map_err(sql_err("reading the event bounds"))?;
    let head = head.and_then(|h| u64::try_from(h).ok()).unwrap_or(0);
    let oldest = oldest
        .and_then(|o| u64::try_from(o).ok())
        .unwrap_or(head + 1);
    Ok(EventBounds { oldest, head })
}

pub(super) fn prune(conn: &Connection, before: DateTime<Utc>) -> Result<u64> {
    // A prefix by id: everything below the first event that is recent enough (all of them
    // when none is), so that `oldest` stays a single boundary.
    let removed = conn
        .prepare_cached(
            "DELETE FROM EVENTS WHERE id < COALESCE(\
                 (SELECT MIN(id) FROM EVENTS WHERE at >= ?1), \
                 (SELECT MAX(id) + 1 FROM EVENTS))",
        )
        .and_then(|mut stmt| stmt.execute(params![date_text(&before)]))
        .map_err(sql_err("pruning events"))?;
    Ok(removed as u64)
}
