//! Assignments and claims: lost workers' assignments, timeouts, orphaned assignments and
//! expired placement claims.

use std::collections::HashMap;
use std::time::Duration;

use chrono::{DateTime, Utc};

use super::{Repairs, chrono_duration, workers};
use crate::lifecycle::{Cause, Finish, Lifecycle};
use crate::model::{Task, TaskStatus, Worker};
use crate::store::{AssignmentFilter, StoreError, TaskQuery, TaskStore};

/// The `error` of a task failed for running past its `timeout_s`.
pub const TIMEOUT: &str = "timeout";

/// Page size when reading the running tasks.
const RUNNING_PAGE: u32 = 1000;

/// Most expired claims cleared per pass.
const CLAIMS_PER_PASS: u32 = 1000;

/// Goes over every active assignment once: those of `lost` workers are lost; a running task
/// past its timeout (plus `settle`) is failed; an assignment older than `settle` whose task is not running at
/// its attempt (a placement that crashed after inserting it, a release that crashed half
/// way) is released.
pub(super) async fn repair_assignments(
    lifecycle: &Lifecycle,
    lost: &HashMap<String, Worker>,
    now: DateTime<Utc>,
    settle: Duration,
    repairs: &mut Repairs,
) -> Result<(), StoreError> {
    let store = &**lifecycle.store();
    let active = store
        .list_assignments(&AssignmentFilter {
            active_only: true,
            ..AssignmentFilter::default()
        })
        .await?;
    // Read after the assignments: a task placed in between is running here, not orphaned.
    let running = running_tasks(store).await?;
    let settled_before = now - chrono_duration(settle);
    for assignment in &active {
        let cause = Cause::Repair {
            worker_id: Some(&assignment.worker_id),
        };
        if lost.contains_key(&assignment.worker_id) && assignment.assigned_at < now {
            workers::lose_assignment(lifecycle, assignment, cause, repairs).await?;
            continue;
        }
        match running.get(&assignment.task_id) {
            Some(task) if assignment.is_attempt_of(task) => {
                let Some(timeout_s) = task.timeout_s else {
                    continue;
                };
                // Started at the container's start, or at the assignment until then (a
                // `started_at` older than the assignment is a previous attempt's).
                let start = task
                    .started_at
                    .map_or(assignment.assigned_at, |s| s.max(assignment.assigned_at));
                // The worker stops it at its timeout and reports it with its logs; this is the
                // backstop for a worker that does not, so it waits `settle` longer.
                let limit = chrono::Duration::seconds(i64::try_from(timeout_s).unwrap_or(i64::MAX))
                    + chrono_duration(settle);
                if now - start < limit {
                    continue;
                }
                let finish = Finish::Failed {
                    error: TIMEOUT.to_string(),
                    exit_code: None,
                };
                match lifecycle
                    .finish_attempt(&assignment.ass_id, finish, cause)
                    .await
                {
                    Ok(_) => {
                        repairs.tasks_timed_out += 1;
                        tracing::warn!(
                            task_id = %assignment.task_id,
                            worker_id = %assignment.worker_id,
                            ass_id = %assignment.ass_id,
                            timeout_s,
                            "task ran past its timeout: failed"
                        );
                    }
                    // It finished (or was lost) meanwhile.
                    Err(StoreError::Conflict { .. } | StoreError::NotFound { .. }) => {}
                    Err(error) => return Err(error),
                }
            }
            _ if assignment.assigned_at < settled_before => {
                release_orphan(lifecycle, assignment, repairs).await?;
            }
            _ => {} // young: a placement may be between its insert and `mark_running`
        }
    }
    // Running tasks whose attempt holds no active assignment (its reservation was returned
    // while it ran, e.g. by an orphan release racing a stalled placement): no worker
    // accounts for them, so they run again. Left alone while young, for the same reason.
    for task in running.values() {
        let held = active.iter().any(|a| a.is_attempt_of(task));
        if held || task.updated_at >= settled_before {
            continue;
        }
        let current = store
            .list_assignments(&AssignmentFilter {
                task_id: Some(task.task_id.clone()),
                active_only: true,
                ..AssignmentFilter::default()
            })
            .await?;
        if current.iter().any(|a| a.is_attempt_of(task)) {
            continue; // placed again since the listing
        }
        let why = "its assignment was released while it ran";
        let cause = Cause::Repair { worker_id: None };
        workers::requeue_or_fail(lifecycle, task, why, None, cause, repairs).await?;
    }
    Ok(())
}

/// Every running task, by id.
async fn running_tasks(store: &dyn TaskStore) -> Result<HashMap<String, Task>, StoreError> {
    let mut running = HashMap::new();
    let mut query = TaskQuery {
        status: Some(TaskStatus::Running),
        limit: RUNNING_PAGE,
        ..TaskQuery::default()
    };
    loop {
        let page = store.list_tasks(&query).await?;
        running.extend(page.tasks.into_iter().map(|t| (t.task_id.clone(), t)));
        match page.next {
            Some(next) => query.after = Some(next),
            None => return Ok(running),
        }
    }
}

/// Releases an assignment whose task is not running at its attempt, after checking the task
/// again (the listing is a little older than the assignment read).
async fn release_orphan(
    lifecycle: &Lifecycle,
    assignment: &crate::model::Assignment,
    repairs: &mut Repairs,
) -> Result<(), StoreError> {
    let status = match lifecycle.store().get_task(&assignment.task_id).await {
        Ok(task) if assignment.holds(&task) => {
            return Ok(());
        }
        // Claimed by the placement that made this assignment: it may still be between its
        // insert and `mark_running`, however slow the store. Once its lease expires the claim
        // is cleared (below), which also makes that placement's `mark_running` fail, and a
        // later pass releases the assignment. (Claimed by another placement: that one makes
        // an assignment of its own, so this one is an orphan.)
        Ok(task)
            if task.status == TaskStatus::Queued
                && task.owner.is_some()
                && (assignment.placed_by.is_none() || task.owner == assignment.placed_by) =>
        {
            return Ok(());
        }
        Ok(task) => format!("{} at attempt {}", task.status, task.attempts),
        Err(StoreError::NotFound { .. }) => "missing".to_string(),
        Err(error) => return Err(error),
    };
    // Its task never ran under it: a recount may have left its amounts out (a placement
    // whose insert landed late), so they go back only where none happened since the reserve.
    let cause = Cause::Repair {
        worker_id: Some(&assignment.worker_id),
    };
    if lifecycle
        .release_unstarted(&assignment.ass_id, cause)
        .await?
    {
        repairs.orphans_released += 1;
        repairs.reservations_released += 1;
        tracing::warn!(
            task_id = %assignment.task_id,
            worker_id = %assignment.worker_id,
            ass_id = %assignment.ass_id,
            attempt = assignment.attempt,
            task = %status,
            "orphaned assignment released: its task is not running at its attempt"
        );
    }
    Ok(())
}

/// Clears expired placement claims, so that the tasks show as plainly queued (the scheduler
/// already treats an expired claim as claimable).
pub(super) async fn clear_expired_claims(
    lifecycle: &Lifecycle,
    now: DateTime<Utc>,
    repairs: &mut Repairs,
) -> Result<(), StoreError> {
    for task in lifecycle.clear_expired_claims(now, CLAIMS_PER_PASS).await? {
        repairs.claims_cleared += 1;
        tracing::info!(
            task_id = %task.task_id,
            owner = task.owner.as_deref().unwrap_or(""),
            "expired placement claim cleared: the task is claimable again"
        );
    }
    Ok(())
}
