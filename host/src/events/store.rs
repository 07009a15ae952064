//! [`EventedStore`]: the store that publishes an event after each successful state change.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::sync::Arc;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde_json::json;

use super::{EventSink, event, repair};
use crate::model::Usage;
use crate::model::{
    ActivePolicy, Assignment, Dependency, PolicyKind, PolicyVersion, Resources, Task, TaskResult,
    TaskStatus, Worker, WorkerUsage,
};
use crate::store::{
    ArraySummary, AssignmentFilter, AssignmentStore, BlobStore, EndedAttempt, EventBounds,
    EventStore, IdempotencyKey, LeaseStore, NewEvent, OutputFileInfo, Result, RoundOutcome,
    RoundPlan, RoundReadPlan, RoundReads, RuntimeSample, Store, StoredEvent, SubmitOutcome,
    TaskCounts, TaskLogChunk, TaskPage, TaskQuery, TaskStore, TaskUpdate, WorkerStore,
};

tokio::task_local! {
    static ROLLBACK: ();
    static RECONCILING: ();
    static REPAIRED_WORKER: String;
}

/// Runs `f` as an operator's rollback: its activation is published as `policy.rolled_back`.
pub async fn as_rollback<F: Future>(f: F) -> F::Output {
    ROLLBACK.scope((), f).await
}

/// Runs `f` as a reconciler pass: its changes are published as `reconciler.repair` too.
pub async fn reconciling<F: Future>(f: F) -> F::Output {
    RECONCILING.scope((), f).await
}

/// Runs `f` as the reconciler's repair of work that ran on `worker_id` (a lost worker's
/// task): the repair events of its task changes name that worker (empty: none).
pub async fn repairing_worker<F: Future>(worker_id: &str, f: F) -> F::Output {
    REPAIRED_WORKER.scope(worker_id.to_string(), f).await
}

fn repaired_worker() -> Option<String> {
    REPAIRED_WORKER
        .try_with(String::clone)
        .ok()
        .filter(|w| !w.is_empty())
}

fn in_rollback() -> bool {
    ROLLBACK.try_with(|()| ()).is_ok()
}

fn in_reconciler() -> bool {
    RECONCILING.try_with(|()| ()).is_ok()
}

/// Delegates every call to `inner` and publishes the events of the state changes that
/// succeeded (see the module docs of [`crate::events`]).
pub struct EventedStore {
    inner: Arc<dyn Store>,
    sink: EventSink,
}

impl EventedStore {
    /// A release the reconciler made, as a repair event.
    fn publish_release(&self, ass_id: &str, released: bool) {
        if released && in_reconciler() {
            let mut event = repair("assignment_released", None, None);
            event.data["ass_id"] = json!(ass_id);
            self.publish(event);
        }
    }

    pub fn new(inner: Arc<dyn Store>, sink: EventSink) -> Self {
        EventedStore { inner, sink }
    }

    fn publish(&self, event: NewEvent) {
        self.sink.publish(event);
    }

    fn task_state(&self, task: &Task, worker_id: Option<&str>) {
        self.publish(event(
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
            }),
        ));
        if in_reconciler() {
            let kind = match task.status {
                TaskStatus::Queued => "task_requeued",
                TaskStatus::Failed => "task_failed",
                _ => "task_changed",
            };
            // The task's event names where it now runs; the repair names what was repaired.
            let repaired = repaired_worker();
            let worker_id = worker_id.or(repaired.as_deref());
            self.publish(repair(kind, Some(&task.task_id), worker_id));
        }
    }

    /// A transition from `from` to `to` changes the status unless every `from` is `to` (a
    /// reason or claim update).
    /// A task's `submitted` event (with its array and index, when it is part of one).
    fn submitted(&self, t: &Task) {
        let mut data = json!({
            "status": t.status.as_str(),
            "docker_image": t.docker_image,
            "priority": t.priority,
        });
        if t.array_id.is_some() {
            data["array_id"] = json!(t.array_id);
            data["array_index"] = json!(t.array_index);
        }
        self.publish(event(
            "task",
            "submitted",
            Some(&t.task_id),
            None,
            Some(&t.user_id),
            data,
        ));
    }

    fn after_transition(&self, from: &[TaskStatus], to: TaskStatus, task: &Task) {
        if from.iter().all(|f| *f == to) {
            return;
        }
        self.task_state(task, None);
    }

    fn worker(&self, kind: &str, worker_id: &str) {
        self.publish(event(
            "worker",
            kind,
            None,
            Some(worker_id),
            None,
            json!({}),
        ));
        if in_reconciler() {
            self.publish(repair(&format!("worker_{kind}"), None, Some(worker_id)));
        }
    }

    fn policy(&self, kind: &str, name: &str, version: &str, policy_kind: PolicyKind) {
        self.publish(event(
            "policy",
            kind,
            None,
            None,
            None,
            json!({"name": name, "version": version, "kind": policy_kind.as_str()}),
        ));
    }
}

#[async_trait]
impl Store for EventedStore {
    fn backend_name(&self) -> &'static str {
        self.inner.backend_name()
    }

    async fn place_round(&self, plan: &RoundPlan) -> Result<RoundOutcome> {
        let outcome = self.inner.place_round(plan).await?;
        for (task, assignment) in &outcome.placed {
            self.task_state(task, Some(&assignment.worker_id));
        }
        Ok(outcome)
    }

    async fn end_attempt(
        &self,
        task_id: &str,
        attempt: u32,
        result: Option<&TaskResult>,
        to: TaskStatus,
        update: &TaskUpdate,
    ) -> Result<EndedAttempt> {
        let ended = self
            .inner
            .end_attempt(task_id, attempt, result, to, update)
            .await?;
        self.after_transition(&[TaskStatus::Running], to, &ended.task);
        if in_reconciler() {
            for a in &ended.released {
                let mut event = repair("assignment_released", None, None);
                event.data["ass_id"] = json!(a.ass_id);
                self.publish(event);
            }
        }
        Ok(ended)
    }

    async fn ping(&self) -> Result<()> {
        self.inner.ping().await
    }

    async fn worker_work(&self, worker_id: &str) -> Result<Vec<(Assignment, Task)>> {
        self.inner.worker_work(worker_id).await
    }

    async fn round_reads(&self, plan: &RoundReadPlan) -> Result<RoundReads> {
        self.inner.round_reads(plan).await
    }
}

#[async_trait]
impl TaskStore for EventedStore {
    async fn insert_task(
        &self,
        task: &Task,
        idempotency: Option<&IdempotencyKey>,
    ) -> Result<SubmitOutcome> {
        let outcome = self.inner.insert_task(task, idempotency).await?;
        if outcome.created {
            self.submitted(&outcome.task);
        }
        Ok(outcome)
    }

    async fn transition_task(
        &self,
        task_id: &str,
        from: &[TaskStatus],
        to: TaskStatus,
        update: &TaskUpdate,
    ) -> Result<Task> {
        let task = self
            .inner
            .transition_task(task_id, from, to, update)
            .await?;
        self.after_transition(from, to, &task);
        Ok(task)
    }

    async fn transition_attempt(
        &self,
        task_id: &str,
        attempt: u32,
        from: &[TaskStatus],
        to: TaskStatus,
        update: &TaskUpdate,
    ) -> Result<Task> {
        let task = self
            .inner
            .transition_attempt(task_id, attempt, from, to, update)
            .await?;
        self.after_transition(from, to, &task);
        Ok(task)
    }

    async fn mark_running(&self, task_id: &str, owner: &str, attempts: u32) -> Result<Task> {
        let task = self.inner.mark_running(task_id, owner, attempts).await?;
        self.task_state(&task, None);
        Ok(task)
    }

    async fn clear_expired_claims(&self, now: DateTime<Utc>, limit: u32) -> Result<Vec<Task>> {
        let cleared = self.inner.clear_expired_claims(now, limit).await?;
        for task in &cleared {
            self.publish(repair("claim_cleared", Some(&task.task_id), None));
        }
        Ok(cleared)
    }

    async fn get_task(&self, task_id: &str) -> Result<Task> {
        self.inner.get_task(task_id).await
    }

    async fn insert_tasks(
        &self,
        tasks: &[Task],
        idempotency: Option<&IdempotencyKey>,
    ) -> Result<SubmitOutcome> {
        let outcome = self.inner.insert_tasks(tasks, idempotency).await?;
        if outcome.created {
            // One event per task, as for single submissions: a watcher of a task sees it.
            for t in tasks {
                self.submitted(t);
            }
        }
        Ok(outcome)
    }

    async fn array_summary(&self, array_id: &str) -> Result<ArraySummary> {
        self.inner.array_summary(array_id).await
    }

    async fn awaiting_dependency_sets(&self, limit: u32) -> Result<Vec<Vec<Dependency>>> {
        self.inner.awaiting_dependency_sets(limit).await
    }

    async fn awaiting_tasks(
        &self,
        dependencies: &[Dependency],
        limit: u32,
        after: Option<&str>,
    ) -> Result<Vec<Task>> {
        self.inner.awaiting_tasks(dependencies, limit, after).await
    }

    async fn release_tasks(&self, task_ids: &[String]) -> Result<Vec<Task>> {
        self.inner.release_tasks(task_ids).await
    }

    async fn transition_tasks(
        &self,
        task_ids: &[String],
        from: &[TaskStatus],
        to: TaskStatus,
        update: &TaskUpdate,
    ) -> Result<Vec<Task>> {
        let moved = self
            .inner
            .transition_tasks(task_ids, from, to, update)
            .await?;
        for task in &moved {
            self.after_transition(from, to, task);
        }
        Ok(moved)
    }

    async fn list_tasks(&self, query: &TaskQuery) -> Result<TaskPage> {
        self.inner.list_tasks(query).await
    }

    async fn claim_task(
        &self,
        task_id: &str,
        owner: &str,
        lease_until: DateTime<Utc>,
        now: DateTime<Utc>,
    ) -> Result<Task> {
        self.inner
            .claim_task(task_id, owner, lease_until, now)
            .await
    }

    async fn request_cancel(&self, task_id: &str) -> Result<Task> {
        self.inner.request_cancel(task_id).await
    }

    async fn request_preemption(
        &self,
        victims: &[(String, u32)],
        by: &str,
        reason: &str,
    ) -> Result<Vec<String>> {
        let marked = self.inner.request_preemption(victims, by, reason).await?;
        // Not a status change (the victim runs until its worker stops it): an event of its
        // own, with the victim's owner, who may see it.
        for task_id in &marked {
            let user_id = self.inner.get_task(task_id).await.ok().map(|t| t.user_id);
            self.publish(event(
                "task",
                "preempted",
                Some(task_id),
                None,
                user_id.as_deref(),
                json!({ "preempted_by": by, "reason": reason }),
            ));
        }
        Ok(marked)
    }

    async fn preemptible_running(
        &self,
        below_priority: i32,
        limit: u32,
    ) -> Result<Vec<(Task, Assignment)>> {
        self.inner.preemptible_running(below_priority, limit).await
    }

    async fn preemptions_in_progress(&self) -> Result<std::collections::BTreeMap<String, u32>> {
        self.inner.preemptions_in_progress().await
    }

    async fn user_usage(&self, user_id: &str) -> Result<Usage> {
        self.inner.user_usage(user_id).await
    }

    async fn task_counts(&self) -> Result<TaskCounts> {
        self.inner.task_counts().await
    }

    async fn admission_batch(&self, limit: u32, due_before: DateTime<Utc>) -> Result<Vec<Task>> {
        self.inner.admission_batch(limit, due_before).await
    }

    async fn claimable_tasks(
        &self,
        limit: u32,
        now: DateTime<Utc>,
        exclude_users: &[String],
    ) -> Result<Vec<Task>> {
        self.inner.claimable_tasks(limit, now, exclude_users).await
    }

    async fn running_counts(&self, users: &[String]) -> Result<BTreeMap<String, u32>> {
        self.inner.running_counts(users).await
    }

    async fn unclaim_task(&self, task_id: &str, owner: &str) -> Result<bool> {
        self.inner.unclaim_task(task_id, owner).await
    }
}

#[async_trait]
impl WorkerStore for EventedStore {
    async fn accounting_epochs(&self, worker_ids: &[&str]) -> Result<HashMap<String, i64>> {
        self.inner.accounting_epochs(worker_ids).await
    }

    async fn repair_allocation(&self, observed: &Worker, allocated: &Resources) -> Result<bool> {
        let repaired = self.inner.repair_allocation(observed, allocated).await?;
        if repaired {
            self.publish(repair("allocation_drift", None, Some(&observed.worker_id)));
        }
        Ok(repaired)
    }

    async fn insert_worker(&self, worker: &Worker) -> Result<()> {
        self.inner.insert_worker(worker).await?;
        self.worker("joined", &worker.worker_id);
        Ok(())
    }

    async fn set_draining(&self, worker_id: &str, draining: bool) -> Result<Worker> {
        let worker = self.inner.set_draining(worker_id, draining).await?;
        self.worker(if draining { "drained" } else { "undrained" }, worker_id);
        Ok(worker)
    }

    async fn set_worker_active(&self, worker_id: &str, active: bool) -> Result<Worker> {
        let worker = self.inner.set_worker_active(worker_id, active).await?;
        self.worker(if active { "reactivated" } else { "lost" }, worker_id);
        Ok(worker)
    }

    async fn mark_worker_lost(&self, worker_id: &str, heartbeat_before: i64) -> Result<bool> {
        let lost = self
            .inner
            .mark_worker_lost(worker_id, heartbeat_before)
            .await?;
        if lost {
            self.worker("lost", worker_id);
        }
        Ok(lost)
    }

    async fn delete_worker(&self, worker_id: &str) -> Result<()> {
        self.inner.delete_worker(worker_id).await?;
        self.worker("removed", worker_id);
        Ok(())
    }

    async fn get_worker(&self, worker_id: &str) -> Result<Worker> {
        self.inner.get_worker(worker_id).await
    }

    async fn list_workers(&self) -> Result<Vec<Worker>> {
        self.inner.list_workers().await
    }

    async fn heartbeat(
        &self,
        worker_id: &str,
        at_unix: i64,
        usage: Option<&WorkerUsage>,
    ) -> Result<Worker> {
        self.inner.heartbeat(worker_id, at_unix, usage).await
    }

    async fn reserve(&self, worker_id: &str, request: &Resources) -> Result<bool> {
        self.inner.reserve(worker_id, request).await
    }

    async fn unreserve(
        &self,
        worker_id: &str,
        request: &Resources,
        epoch: Option<i64>,
    ) -> Result<bool> {
        self.inner.unreserve(worker_id, request, epoch).await
    }
}

#[async_trait]
impl AssignmentStore for EventedStore {
    async fn release(&self, ass_id: &str) -> Result<bool> {
        let released = self.inner.release(ass_id).await?;
        self.publish_release(ass_id, released);
        Ok(released)
    }

    async fn release_unstarted(&self, ass_id: &str) -> Result<bool> {
        let released = self.inner.release_unstarted(ass_id).await?;
        self.publish_release(ass_id, released);
        Ok(released)
    }

    async fn insert_assignment(&self, assignment: &Assignment) -> Result<()> {
        self.inner.insert_assignment(assignment).await
    }

    async fn get_assignment(&self, ass_id: &str) -> Result<Assignment> {
        self.inner.get_assignment(ass_id).await
    }

    async fn list_assignments(&self, filter: &AssignmentFilter) -> Result<Vec<Assignment>> {
        self.inner.list_assignments(filter).await
    }

    async fn insert_result(&self, result: &TaskResult) -> Result<()> {
        self.inner.insert_result(result).await
    }

    async fn get_result(&self, task_id: &str) -> Result<TaskResult> {
        self.inner.get_result(task_id).await
    }

    async fn recent_runtimes(&self, limit: u32) -> Result<Vec<RuntimeSample>> {
        self.inner.recent_runtimes(limit).await
    }

    async fn count_assignments_since(&self, since: DateTime<Utc>) -> Result<u64> {
        self.inner.count_assignments_since(since).await
    }

    async fn active_assignment_counts(&self) -> Result<BTreeMap<String, u32>> {
        self.inner.active_assignment_counts().await
    }
}

#[async_trait]
impl BlobStore for EventedStore {
    async fn insert_policy_version(&self, version: &PolicyVersion, bytes: &[u8]) -> Result<()> {
        self.inner.insert_policy_version(version, bytes).await?;
        self.policy("uploaded", &version.name, &version.version, version.kind);
        Ok(())
    }

    async fn activate_policy(
        &self,
        kind: PolicyKind,
        name: &str,
        version: &str,
        activated_by: &str,
        expected_current: Option<(String, String)>,
    ) -> Result<ActivePolicy> {
        let active = self
            .inner
            .activate_policy(kind, name, version, activated_by, expected_current)
            .await?;
        let automatic = activated_by == crate::policy::sync::AUTO_ROLLBACK_BY;
        if automatic && let Some((failed, failed_version)) = &active.previous {
            self.publish(event(
                "policy",
                "deactivated",
                None,
                None,
                None,
                json!({
                    "name": failed, "version": failed_version, "kind": kind.as_str(),
                    "reason": format!("failed repeatedly: rolled back to {name}@{version}"),
                }),
            ));
        }
        let what = if automatic || in_rollback() {
            "rolled_back"
        } else {
            "activated"
        };
        self.policy(what, name, version, kind);
        Ok(active)
    }

    async fn clear_active_policy(
        &self,
        kind: PolicyKind,
        expected_current: (String, String),
    ) -> Result<()> {
        self.inner
            .clear_active_policy(kind, expected_current.clone())
            .await?;
        let (name, version) = expected_current;
        self.publish(event(
            "policy",
            "deactivated",
            None,
            None,
            None,
            json!({
                "name": name, "version": version, "kind": kind.as_str(),
                "reason": "failed repeatedly with no earlier version to restore: the native policy runs",
            }),
        ));
        Ok(())
    }

    async fn get_policy_version(&self, name: &str, version: &str) -> Result<PolicyVersion> {
        self.inner.get_policy_version(name, version).await
    }

    async fn get_policy_bytes(&self, name: &str, version: &str) -> Result<Vec<u8>> {
        self.inner.get_policy_bytes(name, version).await
    }

    async fn list_policy_versions(&self, name: Option<&str>) -> Result<Vec<PolicyVersion>> {
        self.inner.list_policy_versions(name).await
    }

    async fn delete_policy_version(&self, name: &str, version: &str) -> Result<()> {
        self.inner.delete_policy_version(name, version).await
    }

    async fn get_active_policy(&self, kind: PolicyKind) -> Result<Option<ActivePolicy>> {
        self.inner.get_active_policy(kind).await
    }

    async fn insert_log_chunk(&self, chunk: &TaskLogChunk) -> Result<bool> {
        self.inner.insert_log_chunk(chunk).await
    }

    async fn list_log_chunks(
        &self,
        task_id: &str,
        after: Option<(u32, u64)>,
        limit: u32,
    ) -> Result<Vec<TaskLogChunk>> {
        self.inner.list_log_chunks(task_id, after, limit).await
    }

    async fn put_output_file(
        &self,
        task_id: &str,
        attempt: u32,
        path: &str,
        bytes: &[u8],
    ) -> Result<OutputFileInfo> {
        self.inner
            .put_output_file(task_id, attempt, path, bytes)
            .await
    }

    async fn list_output_files(&self, task_id: &str) -> Result<Vec<OutputFileInfo>> {
        self.inner.list_output_files(task_id).await
    }

    async fn get_output_file(
        &self,
        task_id: &str,
        path: &str,
    ) -> Result<(OutputFileInfo, Vec<u8>)> {
        self.inner.get_output_file(task_id, path).await
    }
}

#[async_trait]
impl EventStore for EventedStore {
    async fn append_events(&self, events: &[NewEvent]) -> Result<Vec<u64>> {
        self.inner.append_events(events).await
    }

    async fn events_after(&self, after: u64, limit: u32) -> Result<Vec<StoredEvent>> {
        self.inner.events_after(after, limit).await
    }

    async fn events_after_except(
        &self,
        after: u64,
        limit: u32,
        known: &std::collections::BTreeSet<u64>,
    ) -> Result<crate::store::EventRead> {
        self.inner.events_after_except(after, limit, known).await
    }

    async fn event_bounds(&self) -> Result<EventBounds> {
        self.inner.event_bounds().await
    }

    async fn prune_events(&self, before: DateTime<Utc>) -> Result<u64> {
        self.inner.prune_events(before).await
    }
}

#[async_trait]
impl LeaseStore for EventedStore {
    async fn acquire_lease(
        &self,
        name: &str,
        holder: &str,
        until: DateTime<Utc>,
        now: DateTime<Utc>,
    ) -> Result<bool> {
        self.inner.acquire_lease(name, holder, until, now).await
    }

    async fn release_lease(&self, name: &str, holder: &str) -> Result<bool> {
        self.inner.release_lease(name, holder).await
    }
}
