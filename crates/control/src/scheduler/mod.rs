//! The scheduler: admission (pending -> queued | failed) and placement rounds (queued ->
//! running) over the store and the policy runtime, following docs/consistency.md.
//!
//! Nothing here is shared between host replicas except through the store: a task is placed
//! only by the replica whose claim (owner + lease) it holds, a reservation is the store's one
//! conditional update, and every other write is conditional on the state the scheduler read.
//! Several replicas can therefore run [`Scheduler`] against one store; a lost race is re-planned
//! with fresh data, never applied twice.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use crate::lifecycle::Lifecycle;
use crate::policy::{PolicyRuntime, PolicySource};
use crate::store::Store;

mod admission;
pub mod dependencies;
mod placement;
mod runtimes;
#[cfg(test)]
pub(crate) mod tests;
mod view;

pub use crate::lifecycle::Wakeup;
pub use admission::{AdmissionStats, admit_task, admit_tasks};
pub use placement::RoundStats;

/// Tells the worker agents long-polling this replica for work that theirs may have changed (a
/// task placed, a cancellation asked). Every waiter sees every change; agents polling another
/// replica notice at that replica's next store check.
#[derive(Clone)]
pub struct WorkSignal(Arc<tokio::sync::watch::Sender<u64>>);

impl Default for WorkSignal {
    fn default() -> Self {
        WorkSignal(Arc::new(tokio::sync::watch::channel(0).0))
    }
}

impl WorkSignal {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn notify(&self) {
        self.0.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// A receiver whose `changed()` resolves at the next [`Self::notify`].
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.0.subscribe()
    }
}

/// How long a worker's heartbeat stays fresh by default: an older one leaves the worker out of
/// placement rounds, and the reconciler declares it lost (its next heartbeat re-activates it
/// and wakes the scheduler).
pub const DEFAULT_HEARTBEAT_STALENESS: Duration = Duration::from_secs(15);

/// The scheduler's settings.
#[derive(Debug, Clone, PartialEq)]
pub struct SchedulerConfig {
    /// Most tasks per placement round (one policy call) and per admission pass (default 100).
    pub batch_size: u32,
    /// Time between rounds when nothing wakes the scheduler (default 1 s).
    pub round_interval: Duration,
    /// How long a placement claim on a task holds (default 30 s); a replica that dies while
    /// placing leaves the task to others after this.
    pub claim_lease: Duration,
    /// Workers whose last heartbeat is older are not candidates (default 15 s).
    pub heartbeat_staleness: Duration,
    /// A deferred task is checked again after this long (default 2 s).
    pub admission_backoff: Duration,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        SchedulerConfig {
            batch_size: 100,
            round_interval: Duration::from_secs(1),
            claim_lease: Duration::from_secs(30),
            heartbeat_staleness: DEFAULT_HEARTBEAT_STALENESS,
            admission_backoff: Duration::from_secs(2),
        }
    }
}

/// Most placement rounds one wake-up runs back to back (each takes a fresh look at the store)
/// before the loop waits again: bounds a cycle when the queue is long.
const MAX_ROUNDS_PER_CYCLE: usize = 64;

/// One host replica's scheduler: an admission pass and placement rounds, on every wake-up and
/// every [`SchedulerConfig::round_interval`].
#[derive(Clone)]
pub struct Scheduler {
    /// Every task change this scheduler makes (admission, dependencies, placement), and the
    /// store and wake-up it reads.
    lifecycle: Lifecycle,
    policies: Arc<PolicyRuntime>,
    config: SchedulerConfig,
    /// This replica's id, random per process: the prefix of every claim it makes (each
    /// placement claims with a token of its own, `<owner>/<uuid>`).
    owner: String,
    /// Notified after a round placed tasks: the agents' long polls answer at once.
    work: WorkSignal,
    runtimes: Arc<runtimes::RuntimeHistoryCache>,
    /// The workers as the last round left them (see [`view`]).
    view: Arc<view::WorkerView>,
    /// When the next dependency pass is due (see [`DEPENDENCY_PASS_EVERY`]).
    dependencies_due: Arc<std::sync::Mutex<Option<std::time::Instant>>>,
}

/// How often the dependency pass runs at most while tasks await dependencies: a task whose
/// dependencies are met waits this long at most before it goes to admission. It is not run on
/// every wake-up (it reads the store), and while no task awaits anything only every
/// [`DEPENDENCY_PASS_IDLE`]: a store without pushed-down indexes (FerretDB 1.x) scans for it.
const DEPENDENCY_PASS_EVERY: Duration = Duration::from_millis(250);
const DEPENDENCY_PASS_IDLE: Duration = Duration::from_secs(2);

impl Scheduler {
    pub fn new(
        store: Arc<dyn Store>,
        policies: Arc<PolicyRuntime>,
        wakeup: Wakeup,
        config: SchedulerConfig,
    ) -> Self {
        Scheduler {
            lifecycle: Lifecycle::new(store, wakeup),
            policies,
            config,
            owner: format!("host-{}", uuid::Uuid::new_v4().simple()),
            work: WorkSignal::new(),
            runtimes: Arc::default(),
            view: Arc::default(),
            dependencies_due: Arc::default(),
        }
    }

    /// Notifies `work` whenever a round placed tasks (the agents' long polls wait on it).
    pub fn with_work_signal(mut self, work: WorkSignal) -> Self {
        self.work = work;
        self
    }

    /// Publishes the events of the changes this scheduler makes on `events`.
    pub fn with_events(mut self, events: crate::events::EventSink) -> Self {
        self.lifecycle = self.lifecycle.with_events(events);
        self
    }

    /// The owner id this replica's claims carry.
    pub fn owner(&self) -> &str {
        &self.owner
    }

    /// Runs admission and placement until `shutdown` resolves. A round in flight finishes
    /// first; a store error is logged and retried at the next tick.
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        tracing::info!(
            owner = %self.owner,
            batch_size = self.config.batch_size,
            round_interval_ms = self.config.round_interval.as_millis() as u64,
            "scheduler started"
        );
        tokio::pin!(shutdown);
        loop {
            self.cycle().await;
            tokio::select! {
                () = &mut shutdown => break,
                () = self.lifecycle.wakeup().woken() => {}
                () = tokio::time::sleep(self.config.round_interval) => {}
            }
        }
        tracing::info!(owner = %self.owner, "scheduler stopped");
    }

    /// One admission pass (after the dependency pass, when it is due), then placement rounds
    /// while they make progress.
    pub async fn cycle(&self) {
        let due = self
            .dependencies_due
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .is_none_or(|at| std::time::Instant::now() >= at);
        if due {
            let next = match self.dependency_pass().await {
                Ok(stats) if stats.checked == 0 => DEPENDENCY_PASS_IDLE,
                Ok(_) => DEPENDENCY_PASS_EVERY,
                Err(error) => {
                    tracing::warn!(%error, "dependency pass failed; retrying at the next tick");
                    DEPENDENCY_PASS_EVERY
                }
            };
            *self
                .dependencies_due
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner) =
                Some(std::time::Instant::now() + next);
        }
        match self.admission_pass().await {
            // A full batch: more may be due; the next cycle follows at once.
            Ok(stats) if stats.checked >= self.config.batch_size as usize => {
                self.lifecycle.wakeup().wake()
            }
            Ok(_) => {}
            Err(error) => {
                tracing::warn!(%error, "admission pass failed; retrying at the next tick");
            }
        }
        for _ in 0..MAX_ROUNDS_PER_CYCLE {
            match self.placement_round().await {
                Ok(stats) if stats.wants_another() => {}
                Ok(_) => break,
                Err(error) => {
                    tracing::warn!(%error, "placement round failed; retrying at the next tick");
                    break;
                }
            }
        }
    }
}

/// How a decision's source is named in logs.
fn source_label(source: &PolicySource) -> String {
    match source {
        PolicySource::Wasm { name, version } => format!("{name}@{version}"),
        PolicySource::Native => "native".to_string(),
        PolicySource::Fallback { name, version, .. } => {
            format!("native (fallback from {name}@{version})")
        }
    }
}

fn chrono_duration(d: Duration) -> chrono::Duration {
    chrono::Duration::from_std(d).unwrap_or(chrono::Duration::MAX)
}
