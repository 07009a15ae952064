//! The task lifecycle: every change of a task's state (and of a worker's), each with its
//! [`Cause`], and the event that tells it.
//!
//! | from | change ([`Lifecycle`] method, cause) | to |
//! |---|---|---|
//! | — | `submit`, `submit_array` (request) | pending |
//! | pending | `admit` accept, `accept_many` (admission) | queued |
//! | pending | `admit` defer, `explain` (admission, dependencies): the reason only | pending |
//! | pending | `admit` reject (admission); `fail_unrun`: a broken dependency | failed |
//! | pending, queued | `cancel`, `cancel_many` (request) | cancelled |
//! | queued | `explain` (placement): why it waits | queued |
//! | queued | `fail_unrun` (placement): no worker could ever hold it | failed |
//! | queued | `place` (placement): claimed, reserved, assigned | running |
//! | running | `started` (worker): the container's start time only | running |
//! | running | `request_cancel` (request), `preempt` (placement): asks its worker to stop it | running |
//! | running | `finish_*` (worker's report; repair: a timeout) | completed, failed, cancelled |
//! | running | `finish_*` with `Finish::Preempted` (worker) | queued |
//! | running | `requeue_or_fail` (repair, worker returned): its worker was lost | queued, or failed |
//!
//! [`Lifecycle`] is the only writer of these changes: the API's handlers (submit, cancel, the
//! worker's reports), the scheduler (admission, dependencies, placement, preemption) and the
//! reconciler (timeouts, lost workers, orphans, claims, drift) call it. Each method is one
//! conditional store write (or the store's batched or transactional form of several), so a
//! change that lost a race changes nothing and says so (`Conflict`); on success it publishes
//! the change's event on the [`EventSink`] it was given, explicitly: nothing infers an event
//! from which store call ran. The reconciler's changes carry [`Cause::Repair`] and add a
//! `reconciler.repair` event naming what was repaired.
//!
//! Where this sits in a task's life: docs/architecture.md; why each write is safe under
//! crashes and races: docs/consistency.md.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use serde_json::json;

use crate::events::{self, EventSink, WorkerChange};
use crate::model::{self, Assignment, Resources, Task, TaskStatus, Worker};
use crate::store::{
    IdempotencyKey, RoundOutcome, RoundPlan, Store, StoreError, SubmitOutcome, TaskUpdate,
};

mod admission;
mod finish;
#[cfg(test)]
mod tests;
mod wakeup;

pub use admission::Admitted;
pub use finish::Finish;
pub use wakeup::Wakeup;

/// The `error` of a task failed because its worker was lost with no attempt left.
pub const WORKER_LOST: &str = "worker_lost";

/// The states a cancellation moves at once (a running task is asked to stop instead).
const WAITING: [TaskStatus; 2] = [TaskStatus::Pending, TaskStatus::Queued];

fn cancelled_by(by: &str) -> TaskUpdate {
    TaskUpdate {
        completed_at: Some(model::now()),
        status_reason: Some(Some(format!("cancelled by {by}"))),
        clear_claim: true,
        ..TaskUpdate::default()
    }
}

/// Why a task or worker changed: recorded in the change's event (`cause` of `task.state`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cause<'a> {
    /// Its owner (or an admin) asked: a submission or a cancellation.
    Request,
    /// The admission policy decided (inline on submit, or in an admission pass).
    Admission,
    /// Its dependencies were met, or can no longer be met.
    Dependencies,
    /// A placement round: placed, preempted, held back, or found unschedulable.
    Placement,
    /// Its worker reported (a start, an end, a stop for a preemption).
    Worker,
    /// A lost worker came back: what it ran before it was lost is given up.
    WorkerReturned,
    /// An operator changed a worker (registered, drained, removed it).
    Operator,
    /// The reconciler repaired what a crash, a lost worker or a timeout left; `worker_id` is
    /// the worker whose work it was, when known. Adds a `reconciler.repair` event.
    Repair { worker_id: Option<&'a str> },
}

impl Cause<'_> {
    /// The name in events.
    pub fn as_str(&self) -> &'static str {
        match self {
            Cause::Request => "request",
            Cause::Admission => "admission",
            Cause::Dependencies => "dependencies",
            Cause::Placement => "placement",
            Cause::Worker => "worker",
            Cause::WorkerReturned => "worker_returned",
            Cause::Operator => "operator",
            Cause::Repair { .. } => "repair",
        }
    }

    fn is_repair(&self) -> bool {
        matches!(self, Cause::Repair { .. })
    }
}

/// The writer of task and worker state changes (see the module docs). Cheap to clone.
#[derive(Clone)]
pub struct Lifecycle {
    store: Arc<dyn Store>,
    events: EventSink,
    wakeup: Wakeup,
}

impl Lifecycle {
    /// Changes on `store` that wake `wakeup`'s scheduler where they free capacity or usage;
    /// no events until [`Self::with_events`].
    pub fn new(store: Arc<dyn Store>, wakeup: Wakeup) -> Self {
        Lifecycle {
            store,
            events: EventSink::off(),
            wakeup,
        }
    }

    /// Publishes every change's event on `events`.
    pub fn with_events(mut self, events: EventSink) -> Self {
        self.events = events;
        self
    }

    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    pub fn wakeup(&self) -> &Wakeup {
        &self.wakeup
    }

    /// Where this lifecycle publishes (for the changes made elsewhere: policies).
    pub fn events(&self) -> &EventSink {
        &self.events
    }

    fn state_changed(&self, task: &Task, worker_id: Option<&str>, cause: Cause<'_>) {
        self.events
            .publish(events::task_state(task, worker_id, cause.as_str()));
        if let Cause::Repair {
            worker_id: repaired,
        } = cause
        {
            let repair = match task.status {
                TaskStatus::Queued => "task_requeued",
                TaskStatus::Failed => "task_failed",
                _ => "task_changed",
            };
            // The task's event names where it now runs; the repair names what was repaired.
            self.events.publish(events::repair(
                repair,
                Some(&task.task_id),
                worker_id.or(repaired),
            ));
        }
    }

    /// Publishes the state event of a move from one of `from` to `task`'s status, unless it
    /// was no status change (a reason update).
    fn moved(&self, from: &[TaskStatus], task: &Task, cause: Cause<'_>) {
        if from.iter().any(|f| *f != task.status) {
            self.state_changed(task, None, cause);
        }
    }

    fn released(&self, ass_id: &str, cause: Cause<'_>) {
        if cause.is_repair() {
            let mut event = events::repair("assignment_released", None, None);
            event.data["ass_id"] = json!(ass_id);
            self.events.publish(event);
        }
    }

    fn worker_changed(&self, change: WorkerChange, worker_id: &str, cause: Cause<'_>) {
        self.events.publish(events::worker(change, worker_id));
        if cause.is_repair() {
            let repair = format!("worker_{}", change.as_str());
            self.events
                .publish(events::repair(&repair, None, Some(worker_id)));
        }
    }

    // --- tasks ---

    /// Stores a new `pending` task (see [`crate::store::TaskStore::insert_task`]); a replay of
    /// an earlier submission with the same key changes nothing.
    pub async fn submit(
        &self,
        task: &Task,
        idempotency: Option<&IdempotencyKey>,
    ) -> Result<SubmitOutcome, StoreError> {
        let outcome = self.store.insert_task(task, idempotency).await?;
        if outcome.created {
            self.events.publish(events::task_submitted(&outcome.task));
        }
        Ok(outcome)
    }

    /// Stores an array's tasks together (all or none); one `task.submitted` per task.
    pub async fn submit_array(
        &self,
        tasks: &[Task],
        idempotency: Option<&IdempotencyKey>,
    ) -> Result<SubmitOutcome, StoreError> {
        let outcome = self.store.insert_tasks(tasks, idempotency).await?;
        if outcome.created {
            for task in tasks {
                self.events.publish(events::task_submitted(task));
            }
        }
        Ok(outcome)
    }

    /// Releases tasks whose dependencies are met to admission (they stay `pending`, no longer
    /// awaiting). Not a status change, no event. Returns those it released.
    pub async fn dependencies_met(&self, task_ids: &[String]) -> Result<Vec<Task>, StoreError> {
        self.store.release_tasks(task_ids).await
    }

    /// Keeps tasks in `status` (`pending` or `queued`) with `reason` shown to their users:
    /// awaiting dependencies, deferred, waiting for a preemption. Not a status change, no
    /// event. Returns the tasks it updated (those still in `status`).
    pub async fn explain(
        &self,
        task_ids: &[String],
        status: TaskStatus,
        reason: &str,
    ) -> Result<Vec<Task>, StoreError> {
        let update = TaskUpdate {
            status_reason: Some(Some(reason.to_string())),
            ..TaskUpdate::default()
        };
        self.transition_many(task_ids, &[status], status, &update)
            .await
    }

    /// `transition_tasks`, as one conditional write where there is one task (the batched
    /// form reads its tasks back: one command more on MongoDB).
    async fn transition_many(
        &self,
        task_ids: &[String],
        from: &[TaskStatus],
        to: TaskStatus,
        update: &TaskUpdate,
    ) -> Result<Vec<Task>, StoreError> {
        let [task_id] = task_ids else {
            return self
                .store
                .transition_tasks(task_ids, from, to, update)
                .await;
        };
        match self.store.transition_task(task_id, from, to, update).await {
            Ok(task) => Ok(vec![task]),
            Err(StoreError::Conflict { .. } | StoreError::NotFound { .. }) => Ok(Vec::new()),
            Err(error) => Err(error),
        }
    }

    /// Fails tasks that never ran (still in `from`: `pending` or `queued`) with `reason` as
    /// their error: a broken dependency, a task no worker could ever hold. Returns those it
    /// failed; the others moved meanwhile and are left alone.
    pub async fn fail_unrun(
        &self,
        task_ids: &[String],
        from: TaskStatus,
        reason: &str,
        cause: Cause<'_>,
    ) -> Result<Vec<Task>, StoreError> {
        let update = TaskUpdate {
            completed_at: Some(model::now()),
            error: Some(reason.to_string()),
            status_reason: Some(Some(reason.to_string())),
            clear_claim: true,
            ..TaskUpdate::default()
        };
        let failed = self
            .transition_many(task_ids, &[from], TaskStatus::Failed, &update)
            .await?;
        for task in &failed {
            self.state_changed(task, None, cause);
        }
        Ok(failed)
    }

    /// Cancels a waiting task (`pending` or `queued`) at once, as asked by `by`. `Conflict`
    /// when it started or ended meanwhile, changing nothing.
    pub async fn cancel(&self, task_id: &str, by: &str) -> Result<Task, StoreError> {
        let task = self
            .store
            .transition_task(task_id, &WAITING, TaskStatus::Cancelled, &cancelled_by(by))
            .await?;
        self.state_changed(&task, None, Cause::Request);
        Ok(task)
    }

    /// [`Self::cancel`] for many tasks, batched where the store can. Returns those it
    /// cancelled; one that started or ended meanwhile is left alone.
    pub async fn cancel_many(
        &self,
        task_ids: &[String],
        by: &str,
    ) -> Result<Vec<Task>, StoreError> {
        let cancelled = self
            .store
            .transition_tasks(task_ids, &WAITING, TaskStatus::Cancelled, &cancelled_by(by))
            .await?;
        for task in &cancelled {
            self.state_changed(task, None, Cause::Request);
        }
        Ok(cancelled)
    }

    /// Asks the worker of a running task to stop it (`cancel_requested`); the worker's report
    /// of the stop finishes it as `cancelled`. Not a status change, no event.
    pub async fn request_cancel(&self, task_id: &str) -> Result<Task, StoreError> {
        self.store.request_cancel(task_id).await
    }

    /// Writes a placement round ([`crate::store::Store::place_round`]): each placed task's
    /// event names its worker.
    pub async fn place(&self, plan: &RoundPlan) -> Result<RoundOutcome, StoreError> {
        let outcome = self.store.place_round(plan).await?;
        for (task, assignment) in &outcome.placed {
            self.state_changed(task, Some(&assignment.worker_id), Cause::Placement);
        }
        Ok(outcome)
    }

    /// Asks running tasks (`victims`, each at its attempt) to stop for the task `by`. Returns
    /// those it marked; each gets a `task.preempted` event.
    pub async fn preempt(
        &self,
        victims: &[(String, u32)],
        by: &str,
        reason: &str,
    ) -> Result<Vec<String>, StoreError> {
        let marked = self.store.request_preemption(victims, by, reason).await?;
        for task_id in &marked {
            // Its owner may see the event.
            let user_id = self.store.get_task(task_id).await.ok().map(|t| t.user_id);
            self.events.publish(events::task_preempted(
                task_id,
                user_id.as_deref(),
                by,
                reason,
            ));
        }
        Ok(marked)
    }

    /// Records the container's start of `assignment`'s attempt (`started_at`, once). Not a
    /// status change, no event. `Conflict` when the task no longer runs that attempt.
    pub async fn started(
        &self,
        assignment: &Assignment,
        at: DateTime<Utc>,
    ) -> Result<Task, StoreError> {
        self.store
            .transition_attempt(
                &assignment.task_id,
                assignment.attempt,
                &[TaskStatus::Running],
                TaskStatus::Running,
                &TaskUpdate {
                    started_at: Some(at),
                    ..TaskUpdate::default()
                },
            )
            .await
    }

    /// Takes a task running at its current attempt off its execution (its worker was lost, or
    /// its reservation was returned while it ran): back to the queue with `attempts` kept, or
    /// failed with [`WORKER_LOST`] when no attempt is left. One conditional update on that
    /// attempt: `Conflict` when the task finished or moved meanwhile, changing nothing.
    pub async fn requeue_or_fail(
        &self,
        task: &Task,
        why: &str,
        cause: Cause<'_>,
    ) -> Result<Task, StoreError> {
        let attempt = task.attempts;
        let (to, update) = if attempt < task.max_attempts {
            (
                TaskStatus::Queued,
                TaskUpdate {
                    status_reason: Some(Some(format!(
                        "{why} during attempt {attempt} of {}; queued again",
                        task.max_attempts
                    ))),
                    clear_claim: true,
                    // A preemption of the lost attempt is moot: the task runs normally next time.
                    clear_preemption: task.preempted_by.is_some(),
                    ..TaskUpdate::default()
                },
            )
        } else {
            (
                TaskStatus::Failed,
                TaskUpdate {
                    completed_at: Some(model::now()),
                    error: Some(WORKER_LOST.to_string()),
                    status_reason: Some(Some(format!(
                        "{WORKER_LOST}: {why} during attempt {attempt} of {}",
                        task.max_attempts
                    ))),
                    clear_claim: true,
                    ..TaskUpdate::default()
                },
            )
        };
        let moved = self
            .store
            .transition_attempt(&task.task_id, attempt, &[TaskStatus::Running], to, &update)
            .await?;
        self.state_changed(&moved, None, cause);
        Ok(moved)
    }

    /// Returns an assignment's reservation, exactly once (`true` for the call that did).
    pub async fn release(&self, ass_id: &str, cause: Cause<'_>) -> Result<bool, StoreError> {
        let released = self.store.release(ass_id).await?;
        if released {
            self.released(ass_id, cause);
        }
        Ok(released)
    }

    /// Returns the reservation of an assignment whose task never ran under it (see
    /// [`crate::store::AssignmentStore::release_unstarted`]).
    pub async fn release_unstarted(
        &self,
        ass_id: &str,
        cause: Cause<'_>,
    ) -> Result<bool, StoreError> {
        let released = self.store.release_unstarted(ass_id).await?;
        if released {
            self.released(ass_id, cause);
        }
        Ok(released)
    }

    /// Clears up to `limit` placement claims expired at `now` (the tasks show as plainly
    /// queued again); each is a `claim_cleared` repair.
    pub async fn clear_expired_claims(
        &self,
        now: DateTime<Utc>,
        limit: u32,
    ) -> Result<Vec<Task>, StoreError> {
        let cleared = self.store.clear_expired_claims(now, limit).await?;
        for task in &cleared {
            self.events
                .publish(events::repair("claim_cleared", Some(&task.task_id), None));
        }
        Ok(cleared)
    }

    // --- workers ---

    /// Registers a worker.
    pub async fn worker_joined(&self, worker: &Worker) -> Result<(), StoreError> {
        self.store.insert_worker(worker).await?;
        self.worker_changed(WorkerChange::Joined, &worker.worker_id, Cause::Operator);
        Ok(())
    }

    /// Drains a worker (no new placements) or ends its drain.
    pub async fn set_draining(
        &self,
        worker_id: &str,
        draining: bool,
    ) -> Result<Worker, StoreError> {
        let worker = self.store.set_draining(worker_id, draining).await?;
        let change = if draining {
            WorkerChange::Drained
        } else {
            WorkerChange::Undrained
        };
        self.worker_changed(change, worker_id, Cause::Operator);
        Ok(worker)
    }

    /// Removes a worker from the registry.
    pub async fn remove_worker(&self, worker_id: &str) -> Result<(), StoreError> {
        self.store.delete_worker(worker_id).await?;
        self.worker_changed(WorkerChange::Removed, worker_id, Cause::Operator);
        Ok(())
    }

    /// Marks a worker inactive unless it heartbeated at or after `heartbeat_before` (one
    /// conditional update); `true` when it did.
    pub async fn lose_worker(
        &self,
        worker_id: &str,
        heartbeat_before: i64,
        cause: Cause<'_>,
    ) -> Result<bool, StoreError> {
        let lost = self
            .store
            .mark_worker_lost(worker_id, heartbeat_before)
            .await?;
        if lost {
            self.worker_changed(WorkerChange::Lost, worker_id, cause);
        }
        Ok(lost)
    }

    /// Makes a lost worker active again.
    pub async fn reactivate_worker(
        &self,
        worker_id: &str,
        cause: Cause<'_>,
    ) -> Result<Worker, StoreError> {
        let worker = self.store.set_worker_active(worker_id, true).await?;
        self.worker_changed(WorkerChange::Reactivated, worker_id, cause);
        Ok(worker)
    }

    /// Sets a worker's accounting to what its active assignments hold, when the worker is
    /// still as `observed` (see [`crate::store::WorkerStore::repair_allocation`]); each repair
    /// is an `allocation_drift` event.
    pub async fn repair_allocation(
        &self,
        observed: &Worker,
        allocated: &Resources,
    ) -> Result<bool, StoreError> {
        let repaired = self.store.repair_allocation(observed, allocated).await?;
        if repaired {
            self.events.publish(events::repair(
                "allocation_drift",
                None,
                Some(&observed.worker_id),
            ));
        }
        Ok(repaired)
    }
}
