//! The cluster at a glance, read from the store in a handful of counting queries: what
//! `GET /v1/overview` returns and what the `/metrics` gauges show. Kept for a quarter of a
//! second ([`SampleCache`]) so that scrapers and dashboards together cost the store at most
//! four samples a second per replica, while a dashboard that reloads on an event still sees
//! its effect well within half a second.

use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};

use crate::model::{self, PolicyKind, Resources, Worker};
use crate::store::{Store, StoreError, TaskCounts};

/// How long a sample is served before the store is asked again.
pub const SAMPLE_TTL: Duration = Duration::from_millis(250);

/// The window of [`ClusterSample::placements_last_minute`].
const PLACEMENT_WINDOW: chrono::Duration = chrono::Duration::seconds(60);

/// Registered workers by state. `active` + `draining` + `lost` = `total`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WorkerCounts {
    pub total: u64,
    /// Taking new tasks: not lost, not draining.
    pub active: u64,
    /// Not lost, keeping its running tasks but taking no new ones.
    pub draining: u64,
    /// Marked inactive by the reconciler for want of a heartbeat.
    pub lost: u64,
}

/// One reading of the cluster's state.
#[derive(Debug, Clone, PartialEq)]
pub struct ClusterSample {
    pub tasks: TaskCounts,
    pub workers: WorkerCounts,
    /// Sum of `total_*` over the active workers (as counted in [`WorkerCounts::active`]).
    pub capacity: Resources,
    /// Sum of `allocated_*` over the same workers.
    pub allocated: Resources,
    /// Assignments made in the last 60 s, by any replica.
    pub placements_last_minute: u64,
    /// The active (name, version) of each kind, as the store records it.
    pub placement_policy: Option<(String, String)>,
    pub admission_policy: Option<(String, String)>,
    pub generated_at: DateTime<Utc>,
}

impl ClusterSample {
    /// Reads a sample: grouped task counts, the workers, a count of recent assignments and
    /// the two active-policy records, side by side.
    pub async fn read(store: &dyn Store) -> Result<ClusterSample, StoreError> {
        let now = model::now();
        let (tasks, workers, placements_last_minute, placement, admission) = tokio::try_join!(
            store.task_counts(),
            store.list_workers(),
            store.count_assignments_since(now - PLACEMENT_WINDOW),
            store.get_active_policy(PolicyKind::Placement),
            store.get_active_policy(PolicyKind::Admission),
        )?;
        let (workers, capacity, allocated) = summarize(&workers);
        Ok(ClusterSample {
            tasks,
            workers,
            capacity,
            allocated,
            placements_last_minute,
            placement_policy: placement.map(|a| (a.name, a.version)),
            admission_policy: admission.map(|a| (a.name, a.version)),
            generated_at: now,
        })
    }
}

/// Counts workers by state and sums the active ones' capacity and allocation.
fn summarize(workers: &[Worker]) -> (WorkerCounts, Resources, Resources) {
    let mut counts = WorkerCounts {
        total: workers.len() as u64,
        ..WorkerCounts::default()
    };
    let (mut capacity, mut allocated) = (Resources::default(), Resources::default());
    for worker in workers {
        if !worker.is_active {
            counts.lost += 1;
        } else if worker.draining {
            counts.draining += 1;
        } else {
            counts.active += 1;
            capacity = add(capacity, worker.total());
            allocated = add(allocated, worker.allocated());
        }
    }
    // Stored amounts are multiples of 1/1024 (see `model::quantize`): these sums are exact.
    (counts, capacity, allocated)
}

fn add(a: Resources, b: Resources) -> Resources {
    Resources::new(
        a.cpu + b.cpu,
        a.memory + b.memory,
        a.storage + b.storage,
        a.gpu + b.gpu,
    )
}

/// The last sample of one host's store, shared by its `/metrics` and `/v1/overview`. One
/// reader at a time: callers arriving during a read wait for it rather than read too.
#[derive(Clone, Default)]
pub struct SampleCache {
    last: Arc<tokio::sync::Mutex<Option<Timed>>>,
}

/// A sample and when it was read.
type Timed = (Instant, Arc<ClusterSample>);

impl SampleCache {
    /// A sample at most [`SAMPLE_TTL`] old. A failed read is not cached.
    pub async fn get(&self, store: &dyn Store) -> Result<Arc<ClusterSample>, StoreError> {
        let mut last = self.last.lock().await;
        if let Some((at, sample)) = &*last
            && at.elapsed() < SAMPLE_TTL
        {
            return Ok(sample.clone());
        }
        let sample = Arc::new(ClusterSample::read(store).await?);
        *last = Some((Instant::now(), sample.clone()));
        Ok(sample)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::store::conformance::sample_worker;

    #[test]
    fn workers_are_counted_by_state_and_only_active_ones_sum_up() {
        let mut active = sample_worker("a", Resources::new(4.0, 8.0, 100.0, 1.0));
        active.allocated_cpu = 1.5;
        active.allocated_memory = 2.0;
        let mut other = sample_worker("b", Resources::new(0.5, 0.25, 0.0, 0.0));
        other.allocated_cpu = 0.25;
        let mut draining = sample_worker("c", Resources::new(64.0, 64.0, 64.0, 8.0));
        draining.draining = true;
        let mut lost = sample_worker("d", Resources::new(64.0, 64.0, 64.0, 8.0));
        lost.is_active = false;
        lost.draining = true;
        let (counts, capacity, allocated) = summarize(&[active, other, draining, lost]);
        assert_eq!(
            counts,
            WorkerCounts {
                total: 4,
                active: 2,
                draining: 1,
                lost: 1
            }
        );
        assert_eq!(capacity, Resources::new(4.5, 8.25, 100.0, 1.0));
        assert_eq!(allocated, Resources::new(1.75, 2.0, 0.0, 0.0));
    }
}
