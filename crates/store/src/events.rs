//! The records of the event stream (`GET /v1/events`, published by the host's `events` module) as the stores keep
//! them: an id the store gives, the event's routing fields, and its `data` as JSON.

use chrono::{DateTime, Utc};

/// An event to record; the store gives it its id.
#[derive(Debug, Clone, PartialEq)]
pub struct NewEvent {
    /// `task`, `worker`, `policy` or `reconciler`.
    pub topic: String,
    pub kind: String,
    pub at: DateTime<Utc>,
    pub task_id: Option<String>,
    pub worker_id: Option<String>,
    /// The owner of the task, for task events (who may see them).
    pub user_id: Option<String>,
    /// A JSON object.
    pub data: serde_json::Value,
}

/// A recorded event.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredEvent {
    /// Strictly increasing in the order of recording (per store).
    pub id: u64,
    pub event: NewEvent,
}

/// What [`super::EventStore::events_after_except`] read.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct EventRead {
    /// The events found, by id.
    pub events: Vec<StoredEvent>,
    /// `Some(id)`: the read stopped at `id` (a limit), more may follow; `None`: it covered
    /// every id given when it ran.
    pub covered_to: Option<u64>,
}

/// What [`super::EventStore::event_bounds`] answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EventBounds {
    /// Every event with a smaller id was pruned (`head + 1` when none is stored).
    pub oldest: u64,
    /// The largest id given so far; 0 before the first event.
    pub head: u64,
}
