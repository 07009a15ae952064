//! Persistence: the [`Store`] trait every backend implements, and its errors.
//!
//! Two backends: [`sqlite::SqliteStore`] (embedded, the default) and [`mongo::MongoStore`]
//! (MongoDB, for clusters). Both pass the same `conformance` suite (behind `test-support`).
//!
//! Every state change is a *conditional* single-record update: a task moves only from the
//! state the caller expected, a reservation succeeds only if the worker still has room, a
//! release happens once per assignment. Nothing relies on in-memory state, so several host
//! replicas can share one store (optimistic concurrency).

// The module docs link the private modules they describe: valid for readers of the code
// (`cargo doc --document-private-items`), which is whom they are written for.
#![allow(rustdoc::private_intra_doc_links)]

use std::collections::{BTreeMap, BTreeSet, HashMap};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
// The data model, under the name the host's modules use for it.
use cloudai_model as model;

pub use crate::model::RuntimeSample;
use crate::model::Usage;
use crate::model::{
    ActivePolicy, Assignment, Dependency, PolicyKind, PolicyVersion, Resources, Task, TaskResult,
    TaskStatus, Worker, WorkerUsage,
};
pub use events::{EventBounds, EventRead, NewEvent, StoredEvent};

pub mod backup;
/// The suite every backend passes: test support, not part of the product (the `test-support`
/// feature, which the host's tests and benches and the e2e tests turn on).
#[cfg(any(test, feature = "test-support"))]
pub mod conformance;
pub mod events;
pub mod mongo;
pub mod placement;
pub mod round_reads;
pub mod sqlite;

pub use placement::{PlannedPlacement, RoundOutcome, RoundPlan};
pub use round_reads::{RoundReadPlan, RoundReads, WorkerReads};

/// Size of one stored chunk of a policy component's bytes: far below MongoDB's 16 MiB
/// document limit, so that a component of any size (a Python guest is ~20 MB) fits.
pub const POLICY_CHUNK_BYTES: usize = 1024 * 1024;

/// SHA-256 (hex, lowercase) of `bytes`: the digest [`PolicyVersion::sha256`] and an output
/// file's `sha256` record.
pub fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(bytes))
}

/// How a policy version is named in errors: `name@version`.
pub(crate) fn policy_label(name: &str, version: &str) -> String {
    format!("{name}@{version}")
}

/// How an active version (or none) is named in a `Conflict`.
pub(crate) fn active_label(active: Option<&(String, String)>) -> String {
    active.map_or_else(|| "none active".to_string(), |(n, v)| policy_label(n, v))
}

/// Checks reassembled component bytes against their version's recorded size and digest.
pub(crate) fn verify_policy_bytes(version: &PolicyVersion, bytes: &[u8]) -> Result<()> {
    let what = || {
        format!(
            "reading the bytes of policy {}",
            policy_label(&version.name, &version.version)
        )
    };
    if bytes.len() as u64 != version.size_bytes {
        return Err(StoreError::backend(
            what(),
            format!(
                "reassembled {} bytes, but {} were stored",
                bytes.len(),
                version.size_bytes
            ),
        ));
    }
    let actual = sha256_hex(bytes);
    if actual != version.sha256 {
        return Err(StoreError::backend(
            what(),
            format!(
                "sha256 mismatch: the stored bytes hash to {actual}, the version records {}",
                version.sha256
            ),
        ));
    }
    Ok(())
}

/// Store errors by meaning, not by backend.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{kind} '{id}' not found")]
    NotFound { kind: &'static str, id: String },
    #[error("{kind} '{id}' already exists")]
    AlreadyExists { kind: &'static str, id: String },
    /// A conditional update did not apply: the record is not in the state the caller expected.
    #[error("{kind} '{id}' is {actual}, expected {expected}")]
    Conflict {
        kind: &'static str,
        id: String,
        expected: String,
        actual: String,
    },
    /// The same idempotency key was used before with a different request.
    #[error("idempotency key '{key}' was already used for a different request (task {task_id})")]
    IdempotencyMismatch { key: String, task_id: String },
    #[error("store backend error while {context}: {source}")]
    Backend {
        context: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

impl StoreError {
    pub fn backend(
        context: impl Into<String>,
        source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> Self {
        StoreError::Backend {
            context: context.into(),
            source: source.into(),
        }
    }
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// The client's idempotency key for a submission, with a digest of the request it came with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdempotencyKey {
    pub key: String,
    /// SHA-256 (hex) of the canonical request body: a reused key with another body is refused.
    pub request_sha256: String,
}

/// What [`TaskStore::insert_task`] did.
#[derive(Debug, Clone, PartialEq)]
pub struct SubmitOutcome {
    /// The stored task: the new one, or the one first submitted with the same key.
    pub task: Task,
    /// False when an earlier submission with the same idempotency key was returned instead.
    pub created: bool,
}

/// Position in the newest-first task listing: the last task of the previous page.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskCursor {
    pub created_at: DateTime<Utc>,
    pub task_id: String,
}

#[derive(Debug, Clone, Default)]
pub struct TaskQuery {
    pub status: Option<TaskStatus>,
    pub user_id: Option<String>,
    /// Page size; the backend returns at most this many (callers bound it).
    pub limit: u32,
    /// Start strictly after this position.
    pub after: Option<TaskCursor>,
    /// Only the tasks of this array.
    pub array_id: Option<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct TaskPage {
    /// Newest first: by `created_at` descending, then `task_id` descending.
    pub tasks: Vec<Task>,
    /// Present when more tasks may follow.
    pub next: Option<TaskCursor>,
}

impl TaskPage {
    /// A page from a listing that fetched `limit + 1` tasks: the extra one only tells that a
    /// next page exists, and the cursor points at the last task kept.
    pub fn from_overfetched(mut tasks: Vec<Task>, limit: u32) -> TaskPage {
        let limit = limit as usize;
        let next = if tasks.len() > limit {
            tasks.truncate(limit);
            tasks.last().map(|t| TaskCursor {
                created_at: t.created_at,
                task_id: t.task_id.clone(),
            })
        } else {
            None
        };
        TaskPage { tasks, next }
    }
}

/// What [`Store::end_attempt`] did.
#[derive(Debug, Clone, PartialEq)]
pub struct EndedAttempt {
    /// The task in its end state.
    pub task: Task,
    /// The assignments whose reservation this call returned (as they were before).
    pub released: Vec<Assignment>,
}

/// Fields a transition sets besides `status` and `updated_at`. `None` leaves a field alone.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TaskUpdate {
    pub started_at: Option<DateTime<Utc>>,
    pub completed_at: Option<DateTime<Utc>>,
    pub exit_code: Option<i64>,
    pub error: Option<String>,
    /// `Some(None)` clears the reason.
    pub status_reason: Option<Option<String>>,
    /// Adds one to `attempts`.
    pub increment_attempts: bool,
    /// Clears `owner` and `lease_expires_at`.
    pub clear_claim: bool,
    /// Clears `cancel_requested` and `preempted_by`: a preempted task queued again runs
    /// normally next time.
    pub clear_preemption: bool,
}

#[derive(Debug, Clone, Default)]
pub struct AssignmentFilter {
    pub task_id: Option<String>,
    pub worker_id: Option<String>,
    /// Only assignments whose reservation has not been released.
    pub active_only: bool,
}

/// A task array as its tasks stand (see [`TaskStore::array_summary`]).
#[derive(Debug, Clone, PartialEq)]
pub struct ArraySummary {
    pub array_id: String,
    /// Who submitted it (every task of an array has the same user).
    pub user_id: String,
    pub created_at: DateTime<Utc>,
    pub docker_image: String,
    /// Its tasks by status; their sum is the array's size.
    pub counts: TaskCounts,
}

/// How many tasks are in each status, counted by the store (never by listing the tasks).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TaskCounts {
    pub pending: u64,
    pub queued: u64,
    pub running: u64,
    pub completed: u64,
    pub failed: u64,
    pub cancelled: u64,
}

impl TaskCounts {
    pub fn get(&self, status: TaskStatus) -> u64 {
        *self.slot(status)
    }

    /// Adds `n` tasks of `status` (how a backend folds its grouped counts in).
    pub fn add(&mut self, status: TaskStatus, n: u64) {
        *self.slot_mut(status) += n;
    }

    /// Tasks waiting to run: pending (before admission) and queued (before placement).
    pub fn queue_depth(&self) -> u64 {
        self.pending + self.queued
    }

    fn slot(&self, status: TaskStatus) -> &u64 {
        match status {
            TaskStatus::Pending => &self.pending,
            TaskStatus::Queued => &self.queued,
            TaskStatus::Running => &self.running,
            TaskStatus::Completed => &self.completed,
            TaskStatus::Failed => &self.failed,
            TaskStatus::Cancelled => &self.cancelled,
        }
    }

    fn slot_mut(&mut self, status: TaskStatus) -> &mut u64 {
        match status {
            TaskStatus::Pending => &mut self.pending,
            TaskStatus::Queued => &mut self.queued,
            TaskStatus::Running => &mut self.running,
            TaskStatus::Completed => &mut self.completed,
            TaskStatus::Failed => &mut self.failed,
            TaskStatus::Cancelled => &mut self.cancelled,
        }
    }
}

/// A piece of a task's output, sent by its worker while the task runs. `(task_id, attempt,
/// seq)` identifies it, so a retried send stores it once; `seq` orders the chunks of an attempt
/// across both streams.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskLogChunk {
    pub task_id: String,
    pub attempt: u32,
    pub seq: u64,
    /// `stdout` or `stderr`.
    pub stream: String,
    pub text: String,
}

/// A file a task left under `/output`, as stored (without its bytes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutputFileInfo {
    pub task_id: String,
    /// Relative to `/output`, `/`-separated.
    pub path: String,
    pub attempt: u32,
    pub size_bytes: u64,
    /// SHA-256 (hex) of the bytes.
    pub sha256: String,
}

/// What the API lists of a stored output file.
impl From<OutputFileInfo> for crate::model::protocol::OutputEntry {
    fn from(info: OutputFileInfo) -> Self {
        crate::model::protocol::OutputEntry {
            path: info.path,
            size_bytes: info.size_bytes,
            sha256: info.sha256,
            attempt: info.attempt,
        }
    }
}

/// Checks reassembled output bytes against their recorded size and digest.
pub(crate) fn verify_output_bytes(info: &OutputFileInfo, bytes: &[u8]) -> Result<()> {
    if bytes.len() as u64 != info.size_bytes || sha256_hex(bytes) != info.sha256 {
        return Err(StoreError::backend(
            format!("reading output {} of task {}", info.path, info.task_id),
            format!(
                "reassembled {} bytes that do not match the recorded size {} and sha256",
                bytes.len(),
                info.size_bytes
            ),
        ));
    }
    Ok(())
}

/// The whole store: the sum of the per-concern traits below, plus what spans several
/// concerns (a worker's work, an attempt's end, a placement round's reads and write) and the
/// backend itself. A user that needs one concern can take that trait alone.
#[async_trait]
pub trait Store:
    TaskStore + WorkerStore + AssignmentStore + BlobStore + EventStore + LeaseStore + 'static
{
    /// Which backend this is, for logs and `/readyz`.
    fn backend_name(&self) -> &'static str;

    /// Cheap round trip to the backend.
    async fn ping(&self) -> Result<()>;

    /// The work of one worker now: its unreleased assignments that hold their task
    /// ([`Assignment::holds`]: running at that attempt, placed by that placement), each with
    /// its task, by `ass_id`. What a worker's long poll answers, so a backend answers it with
    /// one query. The default reads the assignments, then each task.
    async fn worker_work(&self, worker_id: &str) -> Result<Vec<(Assignment, Task)>> {
        let assignments = self
            .list_assignments(&AssignmentFilter {
                worker_id: Some(worker_id.to_string()),
                active_only: true,
                ..AssignmentFilter::default()
            })
            .await?;
        let mut work = Vec::with_capacity(assignments.len());
        for a in assignments {
            match self.get_task(&a.task_id).await {
                Ok(task) if a.holds(&task) => work.push((a, task)),
                Ok(_) | Err(StoreError::NotFound { .. }) => {}
                Err(error) => return Err(error),
            }
        }
        work.sort_by(|(x, _), (y, _)| x.ass_id.cmp(&y.ass_id));
        Ok(work)
    }

    /// Ends a running task's attempt: records `result` when given (a result the task has
    /// already, from an earlier try of the same report, is kept), moves the task from
    /// `running` at `attempt` to `to` with `update` ([`TaskStore::transition_attempt`]), and
    /// releases every active assignment of the task, each exactly once. `Conflict` when the
    /// task is not running at `attempt`; `NotFound` when there is no such task.
    ///
    /// The default does these one after another: a crash between them leaves a running task
    /// with its result (the report is sent again and finishes it), or a finished task whose
    /// reservation is still held (the reconciler releases an assignment whose task is not
    /// running). A backend with transactions does them at once.
    async fn end_attempt(
        &self,
        task_id: &str,
        attempt: u32,
        result: Option<&TaskResult>,
        to: TaskStatus,
        update: &TaskUpdate,
    ) -> Result<EndedAttempt> {
        if let Some(result) = result {
            match self.insert_result(result).await {
                Ok(()) | Err(StoreError::AlreadyExists { .. }) => {}
                Err(error) => return Err(error),
            }
        }
        let task = self
            .transition_attempt(task_id, attempt, &[TaskStatus::Running], to, update)
            .await?;
        let active = self
            .list_assignments(&AssignmentFilter {
                task_id: Some(task_id.to_string()),
                active_only: true,
                ..AssignmentFilter::default()
            })
            .await?;
        let mut released = Vec::with_capacity(active.len());
        for assignment in active {
            if self.release(&assignment.ass_id).await? {
                released.push(assignment);
            }
        }
        Ok(EndedAttempt { task, released })
    }

    /// A placement round's reads ([`round_reads`]): the fair batch of claimable tasks, the
    /// running counts of its users and, with `plan.workers`, the workers with their active
    /// assignment counts. The default takes them with the reads above (the queue and the
    /// workers side by side); the embedded store takes them in one call on its one connection,
    /// so that a round waits once behind the requests queued before it, not once per read.
    async fn round_reads(&self, plan: &RoundReadPlan) -> Result<RoundReads> {
        round_reads::round_reads_by_parts(self, plan).await
    }

    /// Writes a placement round's decisions: claims the tasks under `plan.claim`, reserves on
    /// each worker, inserts the assignments and marks the tasks running, so that every task of
    /// the plan ends placed (running, with its assignment and reservation), lost (another actor
    /// got there first: unclaimed, nothing of it reserved) or failed (a write failed; what it
    /// left behind is returned here or repaired by the reconciler). Never overcommits a worker.
    /// `Err` only when the round could not start.
    ///
    /// The default writes task by task with the single-record methods above; a backend
    /// overrides it to write a round in a few commands ([`placement::place_in_steps`]) or in
    /// one transaction.
    async fn place_round(&self, plan: &RoundPlan) -> Result<RoundOutcome> {
        placement::place_in_steps(self, &placement::TaskByTask(self), plan).await
    }
}

/// The TASKS collection: submitting, reading and moving tasks through their states, claims, cancellation and preemption marks, and the queue's reads.
#[async_trait]
pub trait TaskStore: Send + Sync {
    /// Inserts a new task. With an idempotency key already used by the same user: returns the
    /// first task (`created: false`) when the request digest matches, else
    /// [`StoreError::IdempotencyMismatch`]. `AlreadyExists` when `task_id` is taken.
    async fn insert_task(
        &self,
        task: &Task,
        idempotency: Option<&IdempotencyKey>,
    ) -> Result<SubmitOutcome>;

    /// Inserts the tasks of one array together: all or none (SQLite: one transaction;
    /// MongoDB: one unordered `insertMany`, after the idempotency key when there is one). The
    /// outcome's task is the array's first. With an idempotency key already used by the same
    /// user: the first task of the earlier submission (`created: false`) when the digest
    /// matches, else [`StoreError::IdempotencyMismatch`].
    async fn insert_tasks(
        &self,
        tasks: &[Task],
        idempotency: Option<&IdempotencyKey>,
    ) -> Result<SubmitOutcome>;

    /// The tasks of the array `array_id` counted by status; `NotFound` when it has none.
    async fn array_summary(&self, array_id: &str) -> Result<ArraySummary>;

    /// [`TaskStore::transition_task`] for each of `task_ids`, as one batch where the backend can:
    /// returns the tasks it moved; a task not in `from` (or absent) is left alone and not
    /// returned. The default makes one transition per task.
    async fn transition_tasks(
        &self,
        task_ids: &[String],
        from: &[TaskStatus],
        to: TaskStatus,
        update: &TaskUpdate,
    ) -> Result<Vec<Task>> {
        let mut moved = Vec::with_capacity(task_ids.len());
        for task_id in task_ids {
            match self.transition_task(task_id, from, to, update).await {
                Ok(task) => moved.push(task),
                Err(StoreError::Conflict { .. } | StoreError::NotFound { .. }) => {}
                Err(other) => return Err(other),
            }
        }
        Ok(moved)
    }

    /// The distinct `after` lists of the pending tasks awaiting their dependencies (at most
    /// `limit`): the dependency pass looks at each list once, however many tasks share it.
    async fn awaiting_dependency_sets(&self, limit: u32) -> Result<Vec<Vec<Dependency>>>;

    /// Pending tasks awaiting exactly these dependencies, by `task_id`, after `after` (a page).
    async fn awaiting_tasks(
        &self,
        dependencies: &[Dependency],
        limit: u32,
        after: Option<&str>,
    ) -> Result<Vec<Task>>;

    /// Releases pending tasks awaiting their dependencies to admission (clears
    /// `awaiting_dependencies` and the reason); returns those it released.
    async fn release_tasks(&self, task_ids: &[String]) -> Result<Vec<Task>>;

    async fn get_task(&self, task_id: &str) -> Result<Task>;

    async fn list_tasks(&self, query: &TaskQuery) -> Result<TaskPage>;

    /// Moves a task to `to` only if its status is one of `from`, in one conditional update,
    /// and applies `update`. `Conflict` (with the actual status) when it is not, `NotFound`
    /// when there is no such task. Returns the task after the update.
    async fn transition_task(
        &self,
        task_id: &str,
        from: &[TaskStatus],
        to: TaskStatus,
        update: &TaskUpdate,
    ) -> Result<Task>;

    /// Claims a `queued` task for placement by `owner` until `lease_until`: applies only when
    /// the task is queued and unclaimed, claimed by the same owner, or its lease expired before
    /// `now`. `Conflict` otherwise.
    async fn claim_task(
        &self,
        task_id: &str,
        owner: &str,
        lease_until: DateTime<Utc>,
        now: DateTime<Utc>,
    ) -> Result<Task>;

    /// Marks a `running` task as asked to stop (`cancel_requested`), clearing a preemption
    /// under way (`preempted_by`): the owner's cancel wins, and the stop ends the task.
    /// `Conflict` when the task is not running.
    async fn request_cancel(&self, task_id: &str) -> Result<Task>;

    /// Asks running tasks to stop for a preemption, each in one conditional update: each of
    /// `victims` (`(task_id, attempt)`) still `running` at that attempt, with an attempt left
    /// (`attempt < max_attempts`: it can run again), preemptible and not asked to stop already
    /// gets `cancel_requested`, `preempted_by` = `by` and `status_reason` = `reason`. Returns
    /// the ids it marked (the others finished, moved on, are on their last attempt, opted out
    /// or are being stopped already).
    async fn request_preemption(
        &self,
        victims: &[(String, u32)],
        by: &str,
        reason: &str,
    ) -> Result<Vec<String>>;

    /// What a preempting placement policy may stop: the `running` tasks that are preemptible,
    /// not asked to stop, with an attempt left, and of a priority below `below_priority`, each with the unreleased
    /// assignment it runs under; lowest priority first, at most `limit`.
    async fn preemptible_running(
        &self,
        below_priority: i32,
        limit: u32,
    ) -> Result<Vec<(Task, Assignment)>>;

    /// The preemptions under way: for each task some running tasks are being stopped for
    /// (`preempted_by`), how many of them are still running.
    async fn preemptions_in_progress(&self) -> Result<BTreeMap<String, u32>>;

    /// A user's usage as admission sees it: how many of their tasks are running, queued and
    /// pending, and the resources their running tasks hold. One indexed query on
    /// (user_id, status), not a scan of the user's history.
    async fn user_usage(&self, user_id: &str) -> Result<Usage>;

    /// Up to `limit` `pending` tasks last updated at or before `due_before`, least recently
    /// updated first: what an admission pass checks (a deferral updates the task, which puts
    /// it back by the back-off).
    async fn admission_batch(&self, limit: u32, due_before: DateTime<Utc>) -> Result<Vec<Task>>;

    /// Up to `limit` `queued` tasks that can be claimed at `now` (unclaimed, or whose lease
    /// expired before `now`), in queue order (priority descending, then `created_at`, then
    /// `task_id`: [`crate::model::queue_order`]), leaving out the tasks of
    /// `exclude_users`. Served by an index on (status, priority, created_at, task_id).
    async fn claimable_tasks(
        &self,
        limit: u32,
        now: DateTime<Utc>,
        exclude_users: &[String],
    ) -> Result<Vec<Task>>;

    /// How many `running` tasks each of `users` has (users with none are absent): the
    /// placement round's fair share. One query for all of them.
    async fn running_counts(&self, users: &[String]) -> Result<BTreeMap<String, u32>>;

    /// Moves a `queued` task claimed by `owner` to `running` in one conditional update:
    /// records `attempts`, clears the claim and the status reason (`started_at` stays unset:
    /// the worker sets it when the container starts). `Conflict` when the task is not queued
    /// or not claimed by `owner`; `NotFound` when there is no such task.
    async fn mark_running(&self, task_id: &str, owner: &str, attempts: u32) -> Result<Task>;

    /// Gives up `owner`'s claim on a queued task. `Ok(false)` when the task is not queued or
    /// not claimed by `owner` (nothing to give up).
    async fn unclaim_task(&self, task_id: &str, owner: &str) -> Result<bool>;

    /// [`TaskStore::transition_task`] that applies only while the task's `attempts` is `attempt`
    /// as well: how an actor that speaks for one attempt (a worker's report, the reconciler
    /// re-queuing a lost one) can never move a later attempt. `Conflict` otherwise.
    async fn transition_attempt(
        &self,
        task_id: &str,
        attempt: u32,
        from: &[TaskStatus],
        to: TaskStatus,
        update: &TaskUpdate,
    ) -> Result<Task>;

    /// Clears the claim (owner and lease) of up to `limit` `queued` tasks whose lease expired
    /// before `now`, each with one conditional update (a claim renewed meanwhile is kept).
    /// Returns the tasks it cleared, as they were before.
    async fn clear_expired_claims(&self, now: DateTime<Utc>, limit: u32) -> Result<Vec<Task>>;

    /// How many tasks are in each status: one grouped count (served by the status index),
    /// never a listing; the store may hold 100,000 tasks.
    async fn task_counts(&self) -> Result<TaskCounts>;
}

/// The WORKER_REGISTRY: registration, heartbeats, and each worker's resource accounting (the conditional reserve and its mirror, the reconciler's recount).
#[async_trait]
pub trait WorkerStore: Send + Sync {
    /// `AlreadyExists` when the worker id is taken.
    async fn insert_worker(&self, worker: &Worker) -> Result<()>;

    async fn get_worker(&self, worker_id: &str) -> Result<Worker>;

    /// All workers, by `worker_id`.
    async fn list_workers(&self) -> Result<Vec<Worker>>;

    /// Records a heartbeat: `last_heartbeat` (Unix seconds), `updated_at`, and the usage when
    /// given. Does not re-activate an inactive worker: that is the reconciler's decision.
    async fn heartbeat(
        &self,
        worker_id: &str,
        at_unix: i64,
        usage: Option<&WorkerUsage>,
    ) -> Result<Worker>;

    async fn set_draining(&self, worker_id: &str, draining: bool) -> Result<Worker>;

    async fn set_worker_active(&self, worker_id: &str, active: bool) -> Result<Worker>;

    /// Removes a worker. `Conflict` while it holds any active assignment.
    async fn delete_worker(&self, worker_id: &str) -> Result<()>;

    /// Reserves `request` on a worker in ONE conditional update: applies only if the worker is
    /// active, not draining, and every `available_*` is at least the request; then moves
    /// `allocated_*` up and `available_*` down together. `Ok(false)` when it did not apply
    /// (someone else took the capacity: re-plan), `NotFound` when the worker does not exist.
    async fn reserve(&self, worker_id: &str, request: &Resources) -> Result<bool>;

    /// The `accounting_epoch` of each of `worker_ids` that exists (how many times the
    /// reconciler has recounted its allocation), read in one query: what a placement round
    /// records in its assignments as `reserved_epoch`. The default knows none (a store that
    /// places in one transaction needs none).
    async fn accounting_epochs(&self, worker_ids: &[&str]) -> Result<HashMap<String, i64>> {
        let _ = worker_ids;
        Ok(HashMap::new())
    }

    /// Returns a reservation that never got its assignment (a placement failed between the
    /// reserve and the insert): moves `request` from `allocated_*` back to `available_*`, in
    /// one conditional update that applies only when `allocated_*` covers it and, when
    /// `epoch` is given, only while the worker's accounting epoch is still `epoch` (the one
    /// [`Self::accounting_epochs`] gave before the reserve: a recount since may already have
    /// left the reservation out). `Ok(false)` when it did not apply; `NotFound` when the
    /// worker does not exist.
    async fn unreserve(
        &self,
        worker_id: &str,
        request: &Resources,
        epoch: Option<i64>,
    ) -> Result<bool>;

    /// Marks a worker lost (`is_active: false`) in one conditional update that applies only
    /// while it is active and its `last_heartbeat` is before `heartbeat_before` (Unix
    /// seconds). `Ok(false)` when it did not apply (it heartbeated meanwhile, or is inactive
    /// already); `NotFound` when there is no such worker.
    async fn mark_worker_lost(&self, worker_id: &str, heartbeat_before: i64) -> Result<bool>;

    /// Sets a worker's `allocated_*` to `allocated` and `available_*` to `total_* -
    /// allocated`, in one conditional update that applies only while every total, allocated
    /// and available amount still equals `observed`'s: a reserve or a release since
    /// `observed` was read makes it not apply (`Ok(false)`). `NotFound` when there is no
    /// such worker.
    async fn repair_allocation(&self, observed: &Worker, allocated: &Resources) -> Result<bool>;
}

/// ASSIGNMENTS and RESULTS: placements holding their reservations, the once-only release, and the results of attempts.
#[async_trait]
pub trait AssignmentStore: Send + Sync {
    /// `AlreadyExists` when `ass_id` is taken.
    async fn insert_assignment(&self, assignment: &Assignment) -> Result<()>;

    async fn get_assignment(&self, ass_id: &str) -> Result<Assignment>;

    /// Oldest first.
    async fn list_assignments(&self, filter: &AssignmentFilter) -> Result<Vec<Assignment>>;

    /// Returns an assignment's reservation to its worker, exactly once: the first call marks
    /// the assignment released and gives the amounts back (`Ok(true)`); every later call does
    /// nothing (`Ok(false)`). `NotFound` when there is no such assignment.
    async fn release(&self, ass_id: &str) -> Result<bool>;

    /// [`Self::release`] for an assignment whose task never ran under it (a placement round
    /// that gave it up, an orphan the reconciler retires): the amounts go back only while the
    /// worker's accounting epoch is still the assignment's `reserved_epoch`. On a store whose
    /// placement is several writes, a recount between the round's reserve and its insert
    /// counted the worker without this reservation; returning it then would count it out
    /// twice, so it is left to the next recount instead (held, never overcommitted). The
    /// default is [`Self::release`]: a store that places in one transaction has no such gap.
    async fn release_unstarted(&self, ass_id: &str) -> Result<bool> {
        self.release(ass_id).await
    }

    /// `AlreadyExists` when the task already has a result.
    async fn insert_result(&self, result: &TaskResult) -> Result<()>;

    async fn get_result(&self, task_id: &str) -> Result<TaskResult>;

    /// The runtimes of the newest `limit` successful results that recorded one (newest
    /// first): the history placement policies see as mean runtimes per task type.
    async fn recent_runtimes(&self, limit: u32) -> Result<Vec<RuntimeSample>>;

    /// The number of active (unreleased) assignments of each worker that has any.
    async fn active_assignment_counts(&self) -> Result<BTreeMap<String, u32>>;

    /// How many assignments were made at or after `since` (the placements of a recent
    /// window), counted through an index on `assigned_at`.
    async fn count_assignments_since(&self, since: DateTime<Utc>) -> Result<u64>;
}

/// Stored bytes: policy components and which one is active, tasks' live output, and the files they leave.
#[async_trait]
pub trait BlobStore: Send + Sync {
    /// Stores a new policy version and its component `bytes`, in chunks of
    /// [`POLICY_CHUNK_BYTES`] (a 20 MB component fits every backend). `AlreadyExists` when
    /// (name, version) is taken. The caller computes `version.sha256` (see [`sha256_hex`])
    /// and `size_bytes`; the store records them as given. A version is never visible without
    /// all of its bytes: an interrupted insert leaves at most unreferenced chunks behind.
    async fn insert_policy_version(&self, version: &PolicyVersion, bytes: &[u8]) -> Result<()>;

    /// `NotFound` when there is no such version.
    async fn get_policy_version(&self, name: &str, version: &str) -> Result<PolicyVersion>;

    /// The component's bytes, reassembled from their chunks. `NotFound` when there is no such
    /// version; `Backend` (naming the version) when the bytes do not match the recorded
    /// `sha256` or `size_bytes` (a chunk is missing or corrupted).
    async fn get_policy_bytes(&self, name: &str, version: &str) -> Result<Vec<u8>>;

    /// Every version, or those of `name`: by name, then `uploaded_at`, then version.
    async fn list_policy_versions(&self, name: Option<&str>) -> Result<Vec<PolicyVersion>>;

    /// Removes a version and its bytes. `Conflict` while it is the active version of its kind,
    /// `NotFound` when there is no such version.
    async fn delete_policy_version(&self, name: &str, version: &str) -> Result<()>;

    /// The active version of `kind`; `None` before the first activation.
    async fn get_active_policy(&self, kind: PolicyKind) -> Result<Option<ActivePolicy>>;

    /// Makes (name, version) the active policy of `kind`, as a compare-and-swap: applies only
    /// when the currently active (name, version) equals `expected_current` (`None`: nothing is
    /// active yet), in one conditional write, and records the replaced one in `previous`.
    /// `Conflict` (with the actual active version) when the active version is not the expected
    /// one, and when the version's kind is not `kind`; `NotFound` when the version does not
    /// exist. Of several concurrent activations with the same `expected_current`, exactly one
    /// applies. Returns the new active record.
    async fn activate_policy(
        &self,
        kind: PolicyKind,
        name: &str,
        version: &str,
        activated_by: &str,
        expected_current: Option<(String, String)>,
    ) -> Result<ActivePolicy>;

    /// Leaves `kind` with no active policy (the hosts fall back to the native one), as a
    /// compare-and-swap: applies only while the active (name, version) is `expected_current`,
    /// in one conditional write. `Conflict` (with the actual active version, or none) otherwise.
    /// How a replica that deactivated a failing version with nothing to restore says so.
    async fn clear_active_policy(
        &self,
        kind: PolicyKind,
        expected_current: (String, String),
    ) -> Result<()>;

    /// Stores a chunk of live output. `Ok(false)` when a chunk with the same (task_id,
    /// attempt, seq) is already stored (a retried send): the first one is kept.
    async fn insert_log_chunk(&self, chunk: &TaskLogChunk) -> Result<bool>;

    /// Up to `limit` chunks of a task, by (attempt, seq), strictly after `after` (an
    /// (attempt, seq) position) when given.
    async fn list_log_chunks(
        &self,
        task_id: &str,
        after: Option<(u32, u64)>,
        limit: u32,
    ) -> Result<Vec<TaskLogChunk>>;

    /// Stores an output file of a task (in chunks of [`POLICY_CHUNK_BYTES`]), replacing a
    /// file stored before under the same path (a retried upload, a later attempt). A reader
    /// never sees a file without all of its bytes.
    async fn put_output_file(
        &self,
        task_id: &str,
        attempt: u32,
        path: &str,
        bytes: &[u8],
    ) -> Result<OutputFileInfo>;

    /// A task's output files, by path.
    async fn list_output_files(&self, task_id: &str) -> Result<Vec<OutputFileInfo>>;

    /// One output file and its bytes. `NotFound` when the task has no such file.
    async fn get_output_file(&self, task_id: &str, path: &str)
    -> Result<(OutputFileInfo, Vec<u8>)>;
}

/// The event log: appended in order, read by position, pruned by age.
#[async_trait]
pub trait EventStore: Send + Sync {
    /// Records `events` in order, each under a new id larger than every id given before;
    /// returns their ids. Not transactional across the batch.
    async fn append_events(&self, events: &[NewEvent]) -> Result<Vec<u64>>;

    /// Up to `limit` recorded events with an id above `after`, by id. Ids may have gaps (a
    /// write that failed, or one still in flight on another replica).
    async fn events_after(&self, after: u64, limit: u32) -> Result<Vec<StoredEvent>>;

    /// Like [`Self::events_after`], leaving out the ids in `known` (a replica's own events,
    /// which it holds already): a store that reads ids one by one skips them. Up to `limit`
    /// events; [`EventRead::covered_to`] says how far the read went.
    async fn events_after_except(
        &self,
        after: u64,
        limit: u32,
        known: &BTreeSet<u64>,
    ) -> Result<EventRead> {
        let page = self.events_after(after, limit).await?;
        let covered_to = (page.len() >= limit as usize)
            .then(|| page.last().map(|e| e.id))
            .flatten();
        let events = page
            .into_iter()
            .filter(|e| !known.contains(&e.id))
            .collect();
        Ok(EventRead { events, covered_to })
    }

    /// The oldest id that may still be stored, and the largest id given so far.
    async fn event_bounds(&self) -> Result<EventBounds>;

    /// Removes the events recorded before `before`, oldest first (a prefix by id); returns
    /// how many were removed.
    async fn prune_events(&self, before: DateTime<Utc>) -> Result<u64>;
}

/// Named leases: one holder at a time (the reconciler's, across replicas).
#[async_trait]
pub trait LeaseStore: Send + Sync {
    /// Takes or renews the lease `name` for `holder` until `until`, in ONE conditional write
    /// (an upsert): applies when nobody holds it, when `holder` already does, or when the
    /// current lease expired before `now`. `Ok(false)` while another holder's lease runs. Of
    /// several concurrent takers of a free lease exactly one gets `Ok(true)`.
    async fn acquire_lease(
        &self,
        name: &str,
        holder: &str,
        until: DateTime<Utc>,
        now: DateTime<Utc>,
    ) -> Result<bool>;

    /// Gives up `holder`'s lease `name` (anyone may take it at once). `Ok(false)` when
    /// `holder` does not hold it.
    async fn release_lease(&self, name: &str, holder: &str) -> Result<bool>;
}
