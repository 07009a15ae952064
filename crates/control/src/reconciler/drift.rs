//! Accounting drift: a worker's `allocated_*` / `available_*` recomputed from its active
//! assignments when they disagree.
//!
//! A disagreement is also what a placement in flight looks like (reserve done, assignment
//! not inserted yet) and what a release in flight looks like on MongoDB (assignment marked
//! released, amounts not returned yet). Repairing those would hand the same capacity out
//! twice. So a drift is repaired only once it has been observed UNCHANGED (same allocated,
//! same available, same sum of assignments) on every pass for at least `settle`, and the
//! repair is a conditional update on exactly the values observed: a reserve or release that
//! lands after the last observation makes it not apply. An in-flight write takes
//! milliseconds; to be "repaired away" it would have to stay in flight, with no other write
//! to that worker, across every pass of the settle window.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use super::Repairs;
use crate::lifecycle::Lifecycle;
use crate::model::{Resources, Worker};
use crate::store::{AssignmentFilter, StoreError};

/// One worker's drift as first observed, and when.
#[derive(Debug, Clone, PartialEq)]
struct Observed {
    allocated: Resources,
    available: Resources,
    expected: Resources,
}

pub(super) struct DriftTracker {
    settle: Duration,
    seen: HashMap<String, (Observed, Instant)>,
}

impl DriftTracker {
    pub(super) fn new(settle: Duration) -> Self {
        DriftTracker {
            settle,
            seen: HashMap::new(),
        }
    }

    /// Forgets every observation (the lease moved: they may be stale).
    pub(super) fn forget(&mut self) {
        self.seen.clear();
    }

    pub(super) async fn repair(
        &mut self,
        lifecycle: &Lifecycle,
        repairs: &mut Repairs,
    ) -> Result<(), StoreError> {
        let store = lifecycle.store();
        let workers = store.list_workers().await?;
        let active = store
            .list_assignments(&AssignmentFilter {
                active_only: true,
                ..AssignmentFilter::default()
            })
            .await?;
        let mut expected: HashMap<&str, Resources> = HashMap::new();
        for a in &active {
            let sum = expected.entry(a.worker_id.as_str()).or_default();
            sum.cpu += a.req_cpu;
            sum.memory += a.req_memory;
            sum.storage += a.req_storage;
            sum.gpu += a.req_gpu;
        }
        let mut still_drifting = HashMap::new();
        for worker in &workers {
            let expected = expected
                .get(worker.worker_id.as_str())
                .copied()
                .unwrap_or_default();
            let observed = Observed {
                allocated: worker.allocated(),
                available: worker.available(),
                expected,
            };
            if !drifts(worker, &expected) {
                continue;
            }
            let first_seen = match self.seen.remove(&worker.worker_id) {
                Some((before, at)) if before == observed => at,
                _ => Instant::now(),
            };
            if first_seen.elapsed() < self.settle {
                still_drifting.insert(worker.worker_id.clone(), (observed, first_seen));
                continue;
            }
            if !worker.total().covers(&expected) {
                // More is assigned than the worker has: no accounting makes that right.
                tracing::error!(
                    worker_id = %worker.worker_id,
                    ?expected,
                    total = ?worker.total(),
                    "active assignments exceed the worker's total; not repaired"
                );
                still_drifting.insert(worker.worker_id.clone(), (observed, first_seen));
                continue;
            }
            if lifecycle.repair_allocation(worker, &expected).await? {
                repairs.drift_repaired += 1;
                tracing::warn!(
                    worker_id = %worker.worker_id,
                    allocated_was = ?observed.allocated,
                    available_was = ?observed.available,
                    allocated_now = ?expected,
                    assignments = active.iter().filter(|a| a.worker_id == worker.worker_id).count(),
                    "worker accounting drift repaired from its active assignments"
                );
            }
        }
        self.seen = still_drifting;
        Ok(())
    }
}

/// The worker's accounting disagrees with `expected` (the sum of its active assignments).
fn drifts(worker: &Worker, expected: &Resources) -> bool {
    let total = worker.total();
    let expected_available = Resources::new(
        total.cpu - expected.cpu,
        total.memory - expected.memory,
        total.storage - expected.storage,
        total.gpu - expected.gpu,
    );
    worker.allocated() != *expected || worker.available() != expected_available
}
