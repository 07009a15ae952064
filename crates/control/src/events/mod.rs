//! The cluster's event stream (`GET /v1/events`, served by the host's `api::events`).
//!
//! Events are written to the store, never kept only in memory, so that every replica serves
//! every event of the cluster:
//! - the code that makes a change publishes its event explicitly, after the change succeeded:
//!   every task and worker change through [`crate::lifecycle`] (with its cause), policy changes
//!   where they are made (the policy API, the policy sync's automatic rollback). This module
//!   holds what an event says ([`task_state`], [`worker`], [`policy`], [`repair`], ...);
//! - [`EventSink`] hands them to one writer task per replica, which records whatever has
//!   queued up meanwhile with one [`EventStore::append_events`]: the operation that caused an
//!   event never waits for it, and a failed write is logged and counted
//!   (`cloudai_events_recorded_total{outcome="lost"}`), never returned;
//! - [`EventHub`] tails the store (every [`POLL`], at once after a local write) and fans the
//!   new events out to the subscribers of this replica, in id order; the events its own
//!   writer recorded it takes from memory and asks the store only for the other ids (on
//!   MongoDB each id is one lookup: this took the event stream's cost on FerretDB from
//!   +43–50% to about +30% of the time of 800 task changes). It also prunes what is older
//!   than the retention window.
//!
//! Ids are given by the store. On MongoDB an id can be given before its event is visible (ids
//! are taken in blocks, then inserted): the tailer delivers ids in order and waits up to
//! [`GAP_WAIT`] at a missing one before it gives up on it (a write that failed).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::Utc;
use serde_json::json;
use tokio::sync::{Notify, broadcast, mpsc};

use crate::model::{PolicyKind, Task};
use crate::store::{EventStore, NewEvent, StoredEvent};

#[cfg(test)]
mod tests;

/// The topics a client may ask for.
pub const TOPICS: [&str; 4] = ["task", "worker", "policy", "reconciler"];

/// How often the tailer reads the store when nothing local woke it.
pub const POLL: Duration = Duration::from_millis(150);

/// The least time between two tailer reads.
const MIN_TAIL_GAP: Duration = Duration::from_millis(50);

/// How long the tailer waits for a missing id before skipping it.
pub const GAP_WAIT: Duration = Duration::from_secs(2);

/// Most events one tailer read takes.
const TAIL_BATCH: u32 = 512;

/// How long the writer gathers events before it writes them.
const LINGER: Duration = Duration::from_millis(10);

/// Most events one write records.
const WRITE_BATCH: usize = 512;

/// Most own events held for the tailer; past it the oldest are dropped (and read back from
/// the store like any other).
const MAX_OWN: usize = 65_536;

/// How far past the watermark the tailer tells the store which ids it holds (a MongoDB read
/// walks at most 16 ranges of 256 ids).
const KNOWN_WINDOW: u64 = 4096;

/// How many events a subscriber may fall behind before it reads them from the store again.
const FANOUT_CAPACITY: usize = 4096;

/// How often expired events are pruned, at most (half the retention when that is shorter).
const PRUNE_EVERY: Duration = Duration::from_secs(60);

/// The default retention window of `serve --event-retention`.
pub const DEFAULT_RETENTION: Duration = Duration::from_secs(3600);

/// A new event, stamped now.
pub fn event(
    topic: &str,
    kind: &str,
    task_id: Option<&str>,
    worker_id: Option<&str>,
    user_id: Option<&str>,
    data: serde_json::Value,
) -> NewEvent {
    NewEvent {
        topic: topic.to_string(),
        kind: kind.to_string(),
        at: crate::model::now(),
        task_id: task_id.map(str::to_string),
        worker_id: worker_id.map(str::to_string),
        user_id: user_id.map(str::to_string),
        data,
    }
}

/// A reconciler repair event: `details` are the ids involved.
pub fn repair(repair: &str, task_id: Option<&str>, worker_id: Option<&str>) -> NewEvent {
    let mut data = json!({ "repair": repair });
    if let Some(task_id) = task_id {
        data["task_id"] = json!(task_id);
    }
    if let Some(worker_id) = worker_id {
        data["worker_id"] = json!(worker_id);
    }
    event("reconciler", "repair", task_id, worker_id, None, data)
}

/// A task's `task.submitted` event (with its array and index, when it is part of one).
pub fn task_submitted(task: &Task) -> NewEvent {
    let mut data = json!({
        "status": task.status.as_str(),
        "docker_image": task.docker_image,
        "priority": task.priority,
    });
    if task.array_id.is_some() {
        data["array_id"] = json!(task.array_id);
        data["array_index"] = json!(task.array_index);
    }
    event(
        "task",
        "submitted",
        Some(&task.task_id),
        None,
        Some(&task.user_id),
        data,
    )
}

/// A task's `task.state` event: its new status, `worker_id` where it now runs (placed), and
/// `cause`, what moved it (a [`crate::lifecycle::Cause`]'s name).
pub fn task_state(task: &Task, worker_id: Option<&str>, cause: &str) -> NewEvent {
    event(
        "task",
        "state",
        Some(&task.task_id),
        worker_id,
        Some(&task.user_id),
        json!({
            "status": task.status.as_str(),
            "reason": task.status_reason,
            "attempts": task.attempts,
            "worker_id": worker_id,
            "cause": cause,
        }),
    )
}

/// A running task asked to stop for a preemption (not a status change: it runs until its
/// worker stops it); `user_id` is its owner, who may see it.
pub fn task_preempted(task_id: &str, user_id: Option<&str>, by: &str, reason: &str) -> NewEvent {
    event(
        "task",
        "preempted",
        Some(task_id),
        None,
        user_id,
        json!({ "preempted_by": by, "reason": reason }),
    )
}

/// What happened to a worker (`worker.<kind>`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkerChange {
    Joined,
    Drained,
    Undrained,
    Lost,
    Reactivated,
    Removed,
}

impl WorkerChange {
    pub fn as_str(self) -> &'static str {
        match self {
            WorkerChange::Joined => "joined",
            WorkerChange::Drained => "drained",
            WorkerChange::Undrained => "undrained",
            WorkerChange::Lost => "lost",
            WorkerChange::Reactivated => "reactivated",
            WorkerChange::Removed => "removed",
        }
    }
}

/// A worker's event.
pub fn worker(change: WorkerChange, worker_id: &str) -> NewEvent {
    event(
        "worker",
        change.as_str(),
        None,
        Some(worker_id),
        None,
        json!({}),
    )
}

/// What happened to a policy version (`policy.<kind>`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PolicyChange {
    Uploaded,
    /// Made active by an operator.
    Activated,
    /// Made active again in place of a newer one, by an operator's rollback or automatically
    /// after the newer one failed repeatedly.
    RolledBack,
}

impl PolicyChange {
    fn as_str(self) -> &'static str {
        match self {
            PolicyChange::Uploaded => "uploaded",
            PolicyChange::Activated => "activated",
            PolicyChange::RolledBack => "rolled_back",
        }
    }
}

/// A policy version's event.
pub fn policy(change: PolicyChange, name: &str, version: &str, kind: PolicyKind) -> NewEvent {
    event(
        "policy",
        change.as_str(),
        None,
        None,
        None,
        json!({"name": name, "version": version, "kind": kind.as_str()}),
    )
}

/// A policy version taken out of service automatically, with the reason.
pub fn policy_deactivated(name: &str, version: &str, kind: PolicyKind, reason: &str) -> NewEvent {
    event(
        "policy",
        "deactivated",
        None,
        None,
        None,
        json!({"name": name, "version": version, "kind": kind.as_str(), "reason": reason}),
    )
}

/// Where events are published: queued for this replica's writer task, or nowhere (a process
/// or test that streams no events).
#[derive(Clone, Default)]
pub struct EventSink {
    queue: Option<mpsc::UnboundedSender<NewEvent>>,
}

impl EventSink {
    /// A sink that drops every event (nothing streams them).
    pub fn off() -> Self {
        EventSink { queue: None }
    }

    /// A sink whose events the caller receives (tests of what a change publishes).
    #[cfg(test)]
    pub(crate) fn capture() -> (Self, mpsc::UnboundedReceiver<NewEvent>) {
        let (queue, events) = mpsc::unbounded_channel();
        (EventSink { queue: Some(queue) }, events)
    }

    /// Queues `event`; never blocks and never fails the caller.
    pub fn publish(&self, event: NewEvent) {
        let Some(queue) = &self.queue else { return };
        if queue.send(event).is_err() {
            crate::metrics::events_written(1, false);
            tracing::warn!("event dropped: the event writer has stopped");
        }
    }
}

/// This replica's view of the stream: the tailer's position and the fan-out to subscribers.
pub struct EventHub {
    store: Arc<dyn EventStore>,
    fanout: broadcast::Sender<Arc<StoredEvent>>,
    /// The last id the tailer delivered: every event up to it is in the store.
    watermark: AtomicU64,
    wake: Notify,
    /// This replica's own recorded events not delivered yet: the tailer takes them from here
    /// and reads only the other replicas' ids from the store (on MongoDB a read is one
    /// lookup per id).
    own: Mutex<BTreeMap<u64, Arc<StoredEvent>>>,
}

impl EventHub {
    /// Starts the writer and the tailer on `store`.
    /// The writer stops once every [`EventSink`] is dropped, the tailer when `stop` fires or
    /// the hub is dropped.
    pub async fn start(
        store: Arc<dyn EventStore>,
        retention: Duration,
        stop: tokio_util::sync::CancellationToken,
    ) -> (Arc<EventHub>, EventSink) {
        let head = match store.event_bounds().await {
            Ok(bounds) => bounds.head,
            Err(error) => {
                tracing::warn!(%error, "reading the event stream's head; starting from 0");
                0
            }
        };
        let (fanout, _) = broadcast::channel(FANOUT_CAPACITY);
        let hub = Arc::new(EventHub {
            store: store.clone(),
            fanout,
            watermark: AtomicU64::new(head),
            wake: Notify::new(),
            own: Mutex::default(),
        });
        let (queue, pending) = mpsc::unbounded_channel();
        tokio::spawn(write_loop(store, pending, Arc::downgrade(&hub)));
        tokio::spawn(tail_loop(Arc::downgrade(&hub), retention, stop));
        (hub, EventSink { queue: Some(queue) })
    }

    /// Every event up to this id is recorded and has been fanned out.
    pub fn watermark(&self) -> u64 {
        self.watermark.load(Ordering::Acquire)
    }

    /// New events from now on (subscribe before reading the backlog up to [`Self::watermark`]).
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<StoredEvent>> {
        self.fanout.subscribe()
    }

    pub fn store(&self) -> &Arc<dyn EventStore> {
        &self.store
    }

    /// Remembers events this replica recorded (the writer's), for the tailer.
    fn recorded(&self, ids: &[u64], events: &[NewEvent]) {
        let mut own = self.own.lock().unwrap_or_else(|e| e.into_inner());
        for (id, event) in ids.iter().zip(events) {
            let stored = StoredEvent {
                id: *id,
                event: event.clone(),
            };
            own.insert(*id, Arc::new(stored));
        }
        while own.len() > MAX_OWN {
            own.pop_first();
        }
    }

    /// Reads what is new since the watermark and fans it out; `true` when it should read
    /// again at once (a full batch).
    async fn tail_once(&self, gap_since: &mut Option<Instant>) -> bool {
        let mut watermark = self.watermark();
        // The own events the read may reach, held here: the map may drop its oldest meanwhile.
        let mut page: BTreeMap<u64, Arc<StoredEvent>> = {
            let mut own = self.own.lock().unwrap_or_else(|e| e.into_inner());
            *own = own.split_off(&(watermark + 1));
            own.range(..=watermark.saturating_add(KNOWN_WINDOW))
                .map(|(id, e)| (*id, e.clone()))
                .collect()
        };
        let known: BTreeSet<u64> = page.keys().copied().collect();
        let read = match self
            .store
            .events_after_except(watermark, TAIL_BATCH, &known)
            .await
        {
            Ok(read) => read,
            Err(error) => {
                tracing::warn!(%error, "tailing the event stream; retrying");
                return false;
            }
        };
        let full = read.covered_to.is_some();
        // Own events only up to where the read went (later ones may follow ids not read yet);
        // one recorded since `known` was taken may come from the read as well.
        let upto = read.covered_to.unwrap_or(u64::MAX);
        page.retain(|id, _| *id <= upto);
        {
            let own = self.own.lock().unwrap_or_else(|e| e.into_inner());
            for (id, event) in own.range(watermark + 1..=upto) {
                page.entry(*id).or_insert_with(|| event.clone());
            }
        }
        for event in read.events {
            page.entry(event.id).or_insert_with(|| Arc::new(event));
        }
        for (_, event) in page {
            if event.id != watermark + 1 {
                let since = *gap_since.get_or_insert_with(Instant::now);
                if since.elapsed() < GAP_WAIT {
                    // Perhaps still being written by another replica: read again soon.
                    return false;
                }
                tracing::warn!(
                    missing_from = watermark + 1,
                    missing_to = event.id - 1,
                    "event ids never written (a failed event write); skipped"
                );
            }
            *gap_since = None;
            watermark = event.id;
            // The watermark moves first: a subscriber that missed this send reads the event
            // from the store.
            self.watermark.store(watermark, Ordering::Release);
            let _ = self.fanout.send(event);
        }
        full
    }
}

async fn tail_loop(
    hub: std::sync::Weak<EventHub>,
    retention: Duration,
    stop: tokio_util::sync::CancellationToken,
) {
    let mut gap_since = None;
    let mut last_prune: Option<Instant> = None;
    let prune_every = (retention / 2).clamp(Duration::from_millis(500), PRUNE_EVERY);
    loop {
        let Some(hub) = hub.upgrade() else { return };
        while hub.tail_once(&mut gap_since).await {}
        if last_prune.is_none_or(|at| at.elapsed() >= prune_every) {
            last_prune = Some(Instant::now());
            let before = Utc::now()
                - chrono::Duration::from_std(retention).unwrap_or(chrono::Duration::hours(1));
            match hub.store.prune_events(before).await {
                Ok(0) => {}
                Ok(removed) => tracing::info!(removed, "pruned expired events"),
                Err(error) => tracing::warn!(%error, "pruning expired events"),
            }
        }
        // Under a burst of local writes, one read per MIN_TAIL_GAP rather than one per write.
        tokio::time::sleep(MIN_TAIL_GAP).await;
        tokio::select! {
            () = hub.wake.notified() => {}
            () = tokio::time::sleep(POLL - MIN_TAIL_GAP) => {}
            () = stop.cancelled() => return,
        }
    }
}

async fn write_loop(
    store: Arc<dyn EventStore>,
    mut pending: mpsc::UnboundedReceiver<NewEvent>,
    hub: std::sync::Weak<EventHub>,
) {
    let mut batch = Vec::with_capacity(WRITE_BATCH);
    // What queued while the previous write ran (or lingered) goes out in the next one.
    while pending.recv_many(&mut batch, WRITE_BATCH).await > 0 {
        // A short wait gathers a burst (a placement round, a submission burst) into one
        // write: fewer store round trips competing with the scheduler's.
        tokio::time::sleep(LINGER).await;
        while batch.len() < WRITE_BATCH {
            match pending.try_recv() {
                Ok(event) => batch.push(event),
                Err(_) => break,
            }
        }
        let written = store.append_events(&batch).await;
        crate::metrics::events_written(batch.len(), written.is_ok());
        if let (Ok(ids), Some(hub)) = (&written, hub.upgrade()) {
            hub.recorded(ids, &batch);
        }
        if let Err(error) = written {
            let first = batch.first().map(|e| format!("{}.{}", e.topic, e.kind));
            tracing::error!(
                %error,
                events = batch.len(),
                first = first.as_deref().unwrap_or(""),
                "recording events failed; they are lost to the event stream"
            );
        }
        batch.clear();
        if let Some(hub) = hub.upgrade() {
            hub.wake.notify_one();
        }
    }
}
