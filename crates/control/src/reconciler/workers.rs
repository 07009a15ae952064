//! Lost workers (no heartbeat within the grace period) and workers that come back.

use std::collections::HashMap;
use std::time::Duration;

use chrono::{DateTime, Utc};

use super::Repairs;
use crate::lifecycle::{Cause, Lifecycle};
use crate::model::{self, Assignment, Task, Worker};
use crate::store::{AssignmentFilter, StoreError};

/// Marks the workers whose last heartbeat is older than `grace` inactive (each with one
/// conditional update, so a heartbeat that lands first wins) and returns every inactive,
/// stale worker: those whose assignments are lost. An inactive worker with a fresh heartbeat
/// is re-activated here too (the heartbeat API normally does it at once).
pub(super) async fn lose_stale_workers(
    lifecycle: &Lifecycle,
    grace: Duration,
    now: DateTime<Utc>,
    repairs: &mut Repairs,
) -> Result<HashMap<String, Worker>, StoreError> {
    let stale_before = now.timestamp() - grace.as_secs() as i64;
    let mut lost = HashMap::new();
    for worker in lifecycle.store().list_workers().await? {
        let worker_id = worker.worker_id.as_str();
        let cause = Cause::Repair {
            worker_id: Some(worker_id),
        };
        if worker.last_heartbeat >= stale_before {
            if !worker.is_active {
                return_worker(lifecycle, worker_id, now, cause, repairs).await?;
            }
            continue;
        }
        if worker.is_active {
            if !lifecycle
                .lose_worker(worker_id, stale_before, cause)
                .await?
            {
                continue; // it heartbeated meanwhile
            }
            repairs.workers_lost += 1;
            tracing::warn!(
                worker_id,
                last_heartbeat = worker.last_heartbeat,
                grace_s = grace.as_secs(),
                "worker lost: no heartbeat within the grace period; marked inactive"
            );
        }
        lost.insert(worker.worker_id.clone(), worker);
    }
    Ok(lost)
}

/// A lost worker heartbeated again: its remaining assignments (from before it was lost) are
/// handled as lost, then it is active again with nothing assigned, and the scheduler is
/// woken. What the heartbeat API calls when the worker it recorded is inactive. Returns the
/// worker as it is now.
pub async fn worker_returned(lifecycle: &Lifecycle, worker_id: &str) -> Result<Worker, StoreError> {
    let mut repairs = Repairs::default();
    let cause = Cause::WorkerReturned;
    let worker = return_worker(lifecycle, worker_id, model::now(), cause, &mut repairs).await?;
    crate::metrics::reconciler_repairs(&repairs.by_kind());
    lifecycle.wakeup().capacity_changed();
    Ok(worker)
}

/// `cause`: a reconciler pass's repair, or the worker's own heartbeat.
async fn return_worker(
    lifecycle: &Lifecycle,
    worker_id: &str,
    now: DateTime<Utc>,
    cause: Cause<'_>,
    repairs: &mut Repairs,
) -> Result<Worker, StoreError> {
    let left = lifecycle
        .store()
        .list_assignments(&AssignmentFilter {
            worker_id: Some(worker_id.to_string()),
            active_only: true,
            ..AssignmentFilter::default()
        })
        .await?;
    for assignment in left.iter().filter(|a| a.assigned_at < now) {
        lose_assignment(lifecycle, assignment, cause, repairs).await?;
    }
    let worker = lifecycle.reactivate_worker(worker_id, cause).await?;
    repairs.workers_returned += 1;
    tracing::info!(
        worker_id,
        lost_assignments = left.len(),
        "lost worker heartbeated again: re-activated with nothing assigned"
    );
    Ok(worker)
}

/// An assignment on a lost worker: its task (when still running at this attempt) goes back
/// to the queue with `attempts` kept, or fails with [`WORKER_LOST`] when it has no attempt
/// left; then the reservation is released (exactly once, by the store's guard). The task
/// moves first, so that a crash in between leaves an active assignment on a lost worker,
/// which the next pass finds again.
pub(super) async fn lose_assignment(
    lifecycle: &Lifecycle,
    assignment: &Assignment,
    cause: Cause<'_>,
    repairs: &mut Repairs,
) -> Result<(), StoreError> {
    let (task_id, worker_id, ass_id) = (
        assignment.task_id.as_str(),
        assignment.worker_id.as_str(),
        assignment.ass_id.as_str(),
    );
    let task = match lifecycle.store().get_task(task_id).await {
        Ok(task) => Some(task),
        Err(StoreError::NotFound { .. }) => None,
        Err(error) => return Err(error),
    };
    let released = match task.filter(|t| assignment.holds(t)) {
        Some(task) => {
            let why = format!("worker {worker_id} was lost");
            requeue_or_fail(lifecycle, &task, &why, Some(assignment), cause, repairs).await?;
            lifecycle.release(ass_id, cause).await?
        }
        // Its task never ran under it (a placement that did not finish): see
        // `Store::release_unstarted`.
        None => lifecycle.release_unstarted(ass_id, cause).await?,
    };
    if released {
        repairs.reservations_released += 1;
        tracing::info!(
            task_id,
            worker_id,
            ass_id,
            "reservation of a lost worker released"
        );
    }
    Ok(())
}

/// Takes a task that is running at its current attempt off its (lost) execution
/// ([`Lifecycle::requeue_or_fail`]): back to the queue with `attempts` kept, or failed with
/// [`super::WORKER_LOST`] when no attempt is left; a task that finished or moved meanwhile is
/// left alone. `lost` is the assignment it ran under, when known: its worker is named in the
/// logs.
#[tracing::instrument(name = "requeue", skip_all, fields(
    task_id = %task.task_id,
    ass_id = lost.map(|a| a.ass_id.as_str()).unwrap_or_default(),
    worker_id = lost.map(|a| a.worker_id.as_str()).unwrap_or_default(),
    why = why,
))]
pub(super) async fn requeue_or_fail(
    lifecycle: &Lifecycle,
    task: &Task,
    why: &str,
    lost: Option<&Assignment>,
    cause: Cause<'_>,
    repairs: &mut Repairs,
) -> Result<(), StoreError> {
    let (task_id, attempt) = (task.task_id.as_str(), task.attempts);
    let ass_id = lost.map_or("", |a| a.ass_id.as_str());
    let worker_id = lost.map_or("", |a| a.worker_id.as_str());
    match lifecycle.requeue_or_fail(task, why, cause).await {
        Ok(moved) => {
            let outcome = if moved.status == model::TaskStatus::Queued {
                repairs.tasks_requeued += 1;
                "lost task queued again"
            } else {
                repairs.tasks_failed_lost += 1;
                "lost task failed: no attempt left"
            };
            tracing::warn!(task_id, ass_id, worker_id, attempt, why, "{outcome}");
        }
        // Finished (or moved) meanwhile.
        Err(StoreError::Conflict { .. } | StoreError::NotFound { .. }) => {}
        Err(error) => return Err(error),
    }
    Ok(())
}
