//! Test support, never in the product (the `test-support` feature): the fixtures the control
//! plane's tests share with the host's (real stores, a policy runtime, a scheduler's settings
//! for tests, the accounting invariant).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Duration;

use crate::lifecycle::Lifecycle;
use crate::model::{Assignment, Resources, Worker};
use crate::policy::{EngineSettings, PolicyEngine, PolicyRuntime, RuntimeSettings};
use crate::reconciler::{Reconciler, ReconcilerConfig, Repairs};
use crate::scheduler::{SchedulerConfig, Wakeup};
use crate::store::conformance::{sample_worker, unique_id};
use crate::store::sqlite::SqliteStore;
use crate::store::{AssignmentFilter, Store};

pub type Guard = Box<dyn std::any::Any + Send + Sync>;

/// The lifecycle over `store` that wakes `wakeup`, publishing nothing.
pub fn lifecycle(store: &Arc<dyn Store>, wakeup: &Wakeup) -> Lifecycle {
    Lifecycle::new(store.clone(), wakeup.clone())
}

pub fn sqlite() -> (Arc<dyn Store>, Guard) {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open_in_dir(dir.path()).unwrap();
    (Arc::new(store), Box::new(dir))
}

pub async fn mongo() -> Option<(Arc<dyn Store>, Guard)> {
    let (store, guard) = crate::store::mongo::testing::connect_test_store().await?;
    Some((Arc::new(store), Box::new(guard)))
}

pub fn policies() -> Arc<PolicyRuntime> {
    Arc::new(PolicyRuntime::new(
        PolicyEngine::new(EngineSettings::default()).unwrap(),
        RuntimeSettings::default(),
    ))
}

/// A config for tests: no timer to speak of (rounds run when the test says so), no back-off,
/// and workers fresh for 50 s after their last heartbeat (the simulated workers never beat
/// again; a test on a loaded FerretDB can outlast the default 15 s). A heartbeat a minute old
/// is still stale.
pub fn config(batch_size: u32) -> SchedulerConfig {
    SchedulerConfig {
        batch_size,
        round_interval: Duration::from_secs(3600),
        admission_backoff: Duration::ZERO,
        heartbeat_staleness: Duration::from_secs(50),
        ..SchedulerConfig::default()
    }
}

pub async fn add_worker(store: &dyn Store, total: Resources) -> Worker {
    let worker = sample_worker(&unique_id("w"), total);
    store.insert_worker(&worker).await.unwrap();
    worker
}

pub async fn active_assignments(
    store: &dyn Store,
    filter: AssignmentFilter,
) -> Vec<crate::model::Assignment> {
    store
        .list_assignments(&AssignmentFilter {
            active_only: true,
            ..filter
        })
        .await
        .unwrap()
}

/// The invariant of docs/consistency.md on every worker, exactly: `0 <= allocated <= total`,
/// `available = total - allocated`, `allocated` = the sum of its active assignments.
pub async fn assert_accounting(store: &dyn Store) {
    for worker in store.list_workers().await.unwrap() {
        assert_eq!(worker.invariant_violations(), Vec::<String>::new());
        let mut sum = Resources::default();
        for a in active_assignments(
            store,
            AssignmentFilter {
                worker_id: Some(worker.worker_id.clone()),
                ..AssignmentFilter::default()
            },
        )
        .await
        {
            sum.cpu += a.req_cpu;
            sum.memory += a.req_memory;
            sum.storage += a.req_storage;
            sum.gpu += a.req_gpu;
        }
        assert_eq!(worker.allocated(), sum, "worker {}", worker.worker_id);
    }
}

/// The grace period (the scheduler's heartbeat staleness) of the reconciler's tests.
pub const GRACE: Duration = Duration::from_secs(1);

/// [`config`] with workers lost after [`GRACE`].
pub fn scheduler_config() -> SchedulerConfig {
    SchedulerConfig {
        heartbeat_staleness: GRACE,
        ..config(100)
    }
}

/// A reconciler whose drift repairs wait `settle` alone (no claim lease on top).
pub fn reconciler(store: &Arc<dyn Store>, wakeup: &Wakeup, settle: Duration) -> Reconciler {
    reconciler_with_claim_lease(store, wakeup, settle, Duration::ZERO)
}

pub fn reconciler_with_claim_lease(
    store: &Arc<dyn Store>,
    wakeup: &Wakeup,
    settle: Duration,
    claim_lease: Duration,
) -> Reconciler {
    Reconciler::new(
        store.clone(),
        wakeup.clone(),
        &SchedulerConfig {
            claim_lease,
            ..scheduler_config()
        },
        ReconcilerConfig {
            interval: Duration::from_millis(100),
            lease_ttl: Duration::from_secs(1),
            settle,
        },
    )
}

/// One pass of the only reconciler, which holds the lease.
pub async fn held_tick(r: &mut Reconciler) -> Repairs {
    r.tick()
        .await
        .unwrap()
        .expect("the only reconciler holds the lease")
}

/// Makes a worker's last heartbeat a minute old.
pub async fn go_silent(store: &dyn Store, worker_id: &str) {
    let old = crate::model::now().timestamp() - 60;
    store.heartbeat(worker_id, old, None).await.unwrap();
}

/// The one active assignment of a task.
pub async fn active_of(store: &dyn Store, task_id: &str) -> Assignment {
    let active = active_assignments(
        store,
        AssignmentFilter {
            task_id: Some(task_id.to_string()),
            ..AssignmentFilter::default()
        },
    )
    .await;
    assert_eq!(active.len(), 1, "{task_id}: {active:?}");
    active.into_iter().next().unwrap()
}
