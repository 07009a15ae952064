//! The reconciler: repairs what crashes, lost workers and races leave behind
//! (docs/consistency.md), on one host replica at a time.
//!
//! Every replica runs a [`Reconciler`]; only the one holding the store's `reconciler` lease
//! acts (`lease`). The lease saves work, it does not make the repairs safe: every repair is
//! a conditional update on the state the pass read (a task moves only at the attempt it was
//! read at, a release happens once per assignment, a drift repair applies only to the worker
//! values it observed), so two replicas acting at once (a holder that outlived its lease
//! during a long pass) still never apply a repair twice.
//!
//! Each pass ([`Reconciler::pass`]):
//! - workers whose heartbeat is older than the grace period become inactive; their running
//!   tasks are re-queued (attempts kept) or failed with `worker_lost` once `max_attempts` is
//!   used, and their reservations released (`workers`);
//! - a lost worker that heartbeats again is re-activated ([`worker_returned`], also called by
//!   the heartbeat API);
//! - running tasks past their `timeout_s` are failed with `timeout` (`tasks`);
//! - active assignments whose task is no longer running at their attempt are released, and
//!   running tasks whose attempt holds no active assignment are re-queued (or failed);
//! - expired placement claims are cleared;
//! - `allocated_*` / `available_*` are recomputed from the active assignments when they
//!   drift (`drift`).
//!
//! Every repair is made through [`Lifecycle`] as a [`crate::lifecycle::Cause::Repair`] (its
//! events add a `reconciler.repair`), logged with the ids involved and counted in
//! [`ReconcilerCounters`].

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::lifecycle::Lifecycle;
use crate::model;
use crate::scheduler::{SchedulerConfig, Wakeup};
use crate::store::{LeaseStore, Store, StoreError};

mod drift;
mod lease;
mod tasks;
#[cfg(test)]
mod tests;
mod workers;

pub use crate::lifecycle::WORKER_LOST;
pub use lease::LEASE_NAME;
pub use tasks::TIMEOUT;
pub use workers::worker_returned;

/// The reconciler's settings. The heartbeat grace period is the scheduler's
/// [`SchedulerConfig::heartbeat_staleness`]: one setting for "this worker is gone".
#[derive(Debug, Clone, PartialEq)]
pub struct ReconcilerConfig {
    /// Time between passes (default 1 s).
    pub interval: Duration,
    /// How long the lease holds without renewal (default 5 s): another replica takes over
    /// within this (plus one renewal tick) when the holder dies. Renewed every `lease_ttl / 3`.
    pub lease_ttl: Duration,
    /// How long a suspicious state must last before it is repaired (default 5 s): an
    /// assignment must be this old before it counts as orphaned, and a drift must be observed
    /// unchanged for this long plus the scheduler's claim lease (the longest a placement in
    /// flight holds a reservation without its assignment), so that a placement in flight is
    /// never "repaired" away.
    pub settle: Duration,
}

impl Default for ReconcilerConfig {
    fn default() -> Self {
        ReconcilerConfig {
            interval: Duration::from_secs(1),
            lease_ttl: Duration::from_secs(5),
            settle: Duration::from_secs(5),
        }
    }
}

/// What reconciliation repaired (one pass's, or the totals in [`ReconcilerCounters`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Repairs {
    /// Workers marked inactive for want of a heartbeat.
    pub workers_lost: u64,
    /// Lost workers active again after a heartbeat.
    pub workers_returned: u64,
    /// Running tasks of lost workers (or left without an active assignment) put back in the
    /// queue.
    pub tasks_requeued: u64,
    /// Such tasks failed with `worker_lost` instead (attempts used up).
    pub tasks_failed_lost: u64,
    /// Running tasks failed with `timeout`.
    pub tasks_timed_out: u64,
    /// Active assignments whose task had moved on (not running at their attempt), released.
    pub orphans_released: u64,
    /// Reservations the reconciler returned (lost workers' and orphans').
    pub reservations_released: u64,
    /// Expired placement claims cleared.
    pub claims_cleared: u64,
    /// Workers whose `allocated_*`/`available_*` were recomputed from their assignments.
    pub drift_repaired: u64,
}

impl Repairs {
    /// Each kind of repair with its count, as the metrics name them.
    pub fn by_kind(&self) -> [(&'static str, u64); 9] {
        [
            ("workers_lost", self.workers_lost),
            ("workers_returned", self.workers_returned),
            ("tasks_requeued", self.tasks_requeued),
            ("tasks_failed_lost", self.tasks_failed_lost),
            ("tasks_timed_out", self.tasks_timed_out),
            ("orphans_released", self.orphans_released),
            ("reservations_released", self.reservations_released),
            ("claims_cleared", self.claims_cleared),
            ("drift_repaired", self.drift_repaired),
        ]
    }

    fn add(&mut self, other: &Repairs) {
        self.workers_lost += other.workers_lost;
        self.workers_returned += other.workers_returned;
        self.tasks_requeued += other.tasks_requeued;
        self.tasks_failed_lost += other.tasks_failed_lost;
        self.tasks_timed_out += other.tasks_timed_out;
        self.orphans_released += other.orphans_released;
        self.reservations_released += other.reservations_released;
        self.claims_cleared += other.claims_cleared;
        self.drift_repaired += other.drift_repaired;
    }

    /// Something changed that may let the scheduler place more.
    fn frees_capacity(&self) -> bool {
        self.workers_returned
            + self.tasks_requeued
            + self.reservations_released
            + self.claims_cleared
            + self.drift_repaired
            > 0
    }
}

/// Running totals of one reconciler, for tests and metrics.
#[derive(Debug, Default)]
pub struct ReconcilerCounters {
    passes: AtomicU64,
    failed_passes: AtomicU64,
    leases_acquired: AtomicU64,
    holding: AtomicBool,
    repairs: Mutex<Repairs>,
}

impl ReconcilerCounters {
    /// Passes run (while holding the lease).
    pub fn passes(&self) -> u64 {
        self.passes.load(Ordering::Relaxed)
    }

    /// Passes that stopped on a store error (retried at the next interval).
    pub fn failed_passes(&self) -> u64 {
        self.failed_passes.load(Ordering::Relaxed)
    }

    /// Times this reconciler took the lease (it did not hold it just before).
    pub fn leases_acquired(&self) -> u64 {
        self.leases_acquired.load(Ordering::Relaxed)
    }

    /// Whether the last renewal succeeded.
    pub fn holds_lease(&self) -> bool {
        self.holding.load(Ordering::Relaxed)
    }

    /// Every repair made so far.
    pub fn repairs(&self) -> Repairs {
        *self.repairs.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn record(&self, pass: &Repairs) {
        self.passes.fetch_add(1, Ordering::Relaxed);
        self.repairs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .add(pass);
    }
}

/// One host replica's reconciler.
pub struct Reconciler {
    /// Where its lease is kept; everything else goes through `lifecycle`.
    leases: Arc<dyn LeaseStore>,
    /// Every change a pass makes, as [`crate::lifecycle::Cause::Repair`]; the wake-up of the
    /// scheduler it tells about freed capacity.
    lifecycle: Lifecycle,
    config: ReconcilerConfig,
    /// The heartbeat grace period (the scheduler's staleness).
    grace: Duration,
    /// This replica's lease holder id, random per process.
    holder: String,
    counters: Arc<ReconcilerCounters>,
    drift: drift::DriftTracker,
}

impl Reconciler {
    pub fn new(
        store: Arc<dyn Store>,
        wakeup: Wakeup,
        scheduler: &SchedulerConfig,
        config: ReconcilerConfig,
    ) -> Self {
        Reconciler {
            lifecycle: Lifecycle::new(store.clone(), wakeup),
            leases: store,
            grace: scheduler.heartbeat_staleness,
            holder: format!("reconciler-{}", uuid::Uuid::new_v4().simple()),
            counters: Arc::default(),
            // A placement holds its reservation without an assignment for at most its claim
            // lease (it gives up past it), so a drift younger than that plus `settle` may be
            // a placement in flight on a slow store, never repaired.
            drift: drift::DriftTracker::new(scheduler.claim_lease + config.settle),
            config,
        }
    }

    /// Publishes the events of its repairs on `events`.
    pub fn with_events(mut self, events: crate::events::EventSink) -> Self {
        self.lifecycle = self.lifecycle.with_events(events);
        self
    }

    /// The id this replica's lease carries.
    pub fn holder(&self) -> &str {
        &self.holder
    }

    pub fn counters(&self) -> Arc<ReconcilerCounters> {
        self.counters.clone()
    }

    /// Takes or renews the lease and, when held, runs one pass. `Ok(None)` when another
    /// replica holds the lease.
    pub async fn tick(&mut self) -> Result<Option<Repairs>, StoreError> {
        if !self.renew_lease().await? {
            return Ok(None);
        }
        self.pass().await.map(Some)
    }

    /// Runs until `shutdown` resolves: renews the lease every `lease_ttl / 3` (or every
    /// interval when shorter) and runs a pass every interval while it holds the lease. On
    /// shutdown the lease is given up, so that another replica takes over at once.
    pub async fn run(mut self, shutdown: impl Future<Output = ()>) {
        let renew_every = (self.config.lease_ttl / 3)
            .min(self.config.interval)
            .max(Duration::from_millis(10));
        tracing::info!(
            holder = %self.holder,
            interval_ms = self.config.interval.as_millis() as u64,
            lease_ttl_ms = self.config.lease_ttl.as_millis() as u64,
            grace_s = self.grace.as_secs(),
            "reconciler started"
        );
        tokio::pin!(shutdown);
        let mut last_pass: Option<Instant> = None;
        loop {
            let held = match self.renew_lease().await {
                Ok(held) => held,
                Err(error) => {
                    tracing::warn!(holder = %self.holder, %error, "renewing the reconciler lease failed; not acting until it succeeds");
                    self.counters.holding.store(false, Ordering::Relaxed);
                    false
                }
            };
            if held && last_pass.is_none_or(|at| at.elapsed() >= self.config.interval) {
                last_pass = Some(Instant::now());
                if let Err(error) = self.pass().await {
                    self.counters.failed_passes.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(%error, "reconciler pass failed; retrying at the next interval");
                }
            }
            tokio::select! {
                () = &mut shutdown => break,
                () = tokio::time::sleep(renew_every) => {}
            }
        }
        self.give_up_lease().await;
        tracing::info!(holder = %self.holder, "reconciler stopped");
    }

    /// One reconciliation pass (the caller holds the lease). `Err` when a store read failed;
    /// what was repaired before that stays repaired (and counted).
    pub async fn pass(&mut self) -> Result<Repairs, StoreError> {
        let started = Instant::now();
        let mut repairs = Repairs::default();
        let outcome = self.pass_into(&mut repairs).await;
        self.counters.record(&repairs);
        crate::metrics::reconciler_repairs(&repairs.by_kind());
        if repairs.frees_capacity() {
            self.lifecycle.wakeup().capacity_changed();
        }
        if repairs != Repairs::default() {
            tracing::info!(
                ?repairs,
                latency_ms = started.elapsed().as_secs_f64() * 1000.0,
                "reconciler pass repaired"
            );
        }
        outcome.map(|()| repairs)
    }

    async fn pass_into(&mut self, repairs: &mut Repairs) -> Result<(), StoreError> {
        let lifecycle = &self.lifecycle;
        let now = model::now();
        let lost = workers::lose_stale_workers(lifecycle, self.grace, now, repairs).await?;
        tasks::repair_assignments(lifecycle, &lost, now, self.config.settle, repairs).await?;
        tasks::clear_expired_claims(lifecycle, now, repairs).await?;
        self.drift.repair(lifecycle, repairs).await
    }
}

fn chrono_duration(d: Duration) -> chrono::Duration {
    chrono::Duration::from_std(d).unwrap_or(chrono::Duration::MAX)
}
