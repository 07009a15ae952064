//! The scheduler's view of the workers between rounds: the registry and the active assignment
//! counts, read whole from the store and then kept up to date with this scheduler's own
//! placements, so that back-to-back rounds (a long queue) do not each re-read 1,000 workers.
//!
//! The view only decides what a round *tries*: every placement is still the store's
//! conditional reserve, so a stale view can never overcommit a worker, only lose a race. It is
//! read again from the store:
//! - when it is older than [`MAX_AGE`] (capacity freed or taken through another replica);
//! - after a round that lost a race or failed a write (someone else changed the workers);
//! - when this replica freed capacity or a worker joined, returned or was undrained
//!   ([`Wakeup::capacity_changed`](super::Wakeup::capacity_changed));
//! - while it holds a worker with a stale heartbeat (one that heartbeats again is a candidate
//!   at once).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::model::{Assignment, Worker};
use crate::store::WorkerReads;

/// How long the view is trusted without a change of its own.
pub(super) const MAX_AGE: Duration = Duration::from_millis(500);

/// The workers and how many active assignments each holds, as of `read_at` plus this
/// scheduler's placements since.
#[derive(Clone)]
pub(super) struct Snapshot {
    pub workers: Arc<Vec<Worker>>,
    pub counts: Arc<BTreeMap<String, u32>>,
    read_at: Instant,
}

#[derive(Default)]
pub(super) struct WorkerView {
    current: Mutex<Option<Snapshot>>,
}

impl WorkerView {
    /// The view while it can be trusted: `None` (and forgotten) when it is missing, old,
    /// `changed`, or holds a worker whose heartbeat is older than `stale_before` (Unix
    /// seconds): such a worker is no candidate until its next heartbeat, which the view would
    /// not see. The round then reads the workers ([`Self::replace`]).
    pub(super) fn current(&self, changed: bool, stale_before: i64) -> Option<Snapshot> {
        let mut current = self.lock();
        let trusted = !changed
            && current.as_ref().is_some_and(|snapshot| {
                snapshot.read_at.elapsed() < MAX_AGE
                    && snapshot
                        .workers
                        .iter()
                        .all(|w| w.last_heartbeat >= stale_before)
            });
        if !trusted {
            *current = None;
        }
        current.clone()
    }

    /// Takes the workers as read from the store, the read having started at `read_at`.
    pub(super) fn replace(&self, read: WorkerReads, read_at: Instant) -> Snapshot {
        let snapshot = Snapshot {
            workers: Arc::new(read.workers),
            counts: Arc::new(read.active_assignments),
            read_at,
        };
        *self.lock() = Some(snapshot.clone());
        snapshot
    }

    /// Adds this scheduler's `placed` assignments to the view (what the store now holds).
    pub(super) fn record(&self, placed: &[Assignment]) {
        if placed.is_empty() {
            return;
        }
        let mut current = self.lock();
        let Some(snapshot) = current.as_mut() else {
            return;
        };
        let workers = Arc::make_mut(&mut snapshot.workers);
        for a in placed {
            // The registry is listed by worker_id.
            let Ok(i) = workers.binary_search_by(|w| w.worker_id.as_str().cmp(&a.worker_id)) else {
                // A worker the view does not know: read it all again next round.
                *current = None;
                return;
            };
            let w = &mut workers[i];
            w.allocated_cpu += a.req_cpu;
            w.allocated_memory += a.req_memory;
            w.allocated_storage += a.req_storage;
            w.allocated_gpu += a.req_gpu;
            w.available_cpu -= a.req_cpu;
            w.available_memory -= a.req_memory;
            w.available_storage -= a.req_storage;
            w.available_gpu -= a.req_gpu;
        }
        let counts = Arc::make_mut(&mut snapshot.counts);
        for a in placed {
            *counts.entry(a.worker_id.clone()).or_default() += 1;
        }
    }

    /// Forgets the view: the next round reads the store.
    pub(super) fn invalidate(&self) {
        *self.lock() = None;
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Snapshot>> {
        self.current.lock().unwrap_or_else(|e| e.into_inner())
    }
}
