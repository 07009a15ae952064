//! The end of a running task: its terminal state, its reservation returned exactly once, and
//! the scheduler woken for the capacity freed.

use super::{Cause, Lifecycle};
use crate::model::{self, Task, TaskResult, TaskStatus};
use crate::store::{AssignmentFilter, StoreError, TaskUpdate};

/// How a running task ended.
#[derive(Debug, Clone, PartialEq)]
pub enum Finish {
    Completed {
        exit_code: i64,
    },
    Failed {
        error: String,
        exit_code: Option<i64>,
    },
    Cancelled {
        reason: String,
    },
    /// Stopped for a preemption by the task `by`: queued again, the attempt counted, to run
    /// once capacity allows.
    Preempted {
        by: String,
    },
}

impl Lifecycle {
    /// Moves a `running` task to its terminal state, releases every active assignment of the task
    /// (each exactly once: the store guards the release by the assignment) and wakes the
    /// scheduler. When the task is already terminal (a duplicate report, or a retry after a crash
    /// between the transition and the release) the remaining releases are still made and
    /// `Conflict` is returned: this call did not finish it. `Conflict` without any release when
    /// the task is not running (pending or queued).
    pub async fn finish_task(
        &self,
        task_id: &str,
        finish: Finish,
        cause: Cause<'_>,
    ) -> Result<Task, StoreError> {
        self.finish_inner(task_id, None, finish, None, None, cause)
            .await
    }

    /// [`Self::finish_task`] on behalf of one assignment (a worker's report, or the reconciler's
    /// timeout): applies only while that assignment is unreleased and the task is running at its
    /// attempt, so a worker that lost its assignment (the task was re-queued, maybe placed
    /// again) can never finish a later attempt. `Conflict` otherwise, changing nothing;
    /// `NotFound` when there is no such assignment.
    pub async fn finish_attempt(
        &self,
        ass_id: &str,
        finish: Finish,
        cause: Cause<'_>,
    ) -> Result<Task, StoreError> {
        let assignment = self.store.get_assignment(ass_id).await?;
        self.finish_assignment(&assignment, finish, None, None, cause)
            .await
    }

    /// [`Self::finish_attempt`] with the assignment the caller has read, recording with the end the
    /// attempt's `result` (a worker's report; a result the task has already is kept) and its
    /// `started_at` (a worker that reports a task's start and end together), when given.
    pub async fn finish_assignment(
        &self,
        assignment: &crate::model::Assignment,
        finish: Finish,
        started_at: Option<chrono::DateTime<chrono::Utc>>,
        result: Option<TaskResult>,
        cause: Cause<'_>,
    ) -> Result<Task, StoreError> {
        if assignment.released {
            return Err(StoreError::Conflict {
                kind: "assignment",
                id: assignment.ass_id.clone(),
                expected: "active".to_string(),
                actual: "released".to_string(),
            });
        }
        self.finish_inner(
            &assignment.task_id,
            Some(assignment.attempt),
            finish,
            started_at,
            result,
            cause,
        )
        .await
    }

    #[tracing::instrument(name = "finish", skip_all, fields(task_id, attempt))]
    async fn finish_inner(
        &self,
        task_id: &str,
        attempt: Option<u32>,
        finish: Finish,
        started_at: Option<chrono::DateTime<chrono::Utc>>,
        result: Option<TaskResult>,
        cause: Cause<'_>,
    ) -> Result<Task, StoreError> {
        let (store, wakeup) = (&*self.store, &self.wakeup);
        let span = tracing::Span::current();
        span.record("task_id", task_id);
        if let Some(attempt) = attempt {
            span.record("attempt", attempt);
        }
        let (to, update) = match finish {
            Finish::Completed { exit_code } => (
                TaskStatus::Completed,
                TaskUpdate {
                    exit_code: Some(exit_code),
                    status_reason: Some(None),
                    ..TaskUpdate::default()
                },
            ),
            Finish::Failed { error, exit_code } => (
                TaskStatus::Failed,
                TaskUpdate {
                    exit_code,
                    status_reason: Some(Some(error.clone())),
                    error: Some(error),
                    ..TaskUpdate::default()
                },
            ),
            Finish::Cancelled { reason } => (
                TaskStatus::Cancelled,
                TaskUpdate {
                    status_reason: Some(Some(reason)),
                    ..TaskUpdate::default()
                },
            ),
            Finish::Preempted { by } => (
                TaskStatus::Queued,
                TaskUpdate {
                    status_reason: Some(Some(match attempt {
                        Some(attempt) => {
                            format!("preempted by {by} during attempt {attempt}; queued again")
                        }
                        None => format!("preempted by {by}; queued again"),
                    })),
                    clear_preemption: true,
                    ..TaskUpdate::default()
                },
            ),
        };
        // A preempted task is not done: it has no completion time.
        let completed_at = (to != TaskStatus::Queued).then(model::now);
        let update = TaskUpdate {
            started_at,
            completed_at,
            clear_claim: true,
            ..update
        };
        let finished = match attempt {
            // The result, the end state and the release together (one transaction where the
            // store has them).
            Some(attempt) => store
                .end_attempt(task_id, attempt, result.as_ref(), to, &update)
                .await
                .map(|ended| {
                    self.state_changed(&ended.task, None, cause);
                    for a in &ended.released {
                        tracing::info!(task_id, ass_id = %a.ass_id, worker_id = %a.worker_id, "reservation released");
                        self.released(&a.ass_id, cause);
                    }
                    if !ended.released.is_empty() {
                        wakeup.capacity_changed();
                    }
                    wakeup.usage_changed(&ended.task.user_id);
                    ended.task
                }),
            None => store
                .transition_task(task_id, &[TaskStatus::Running], to, &update)
                .await
                .inspect(|task| self.state_changed(task, None, cause)),
        };
        match &finished {
            // Released above.
            Ok(_) if attempt.is_some() => return finished,
            Ok(task) => wakeup.usage_changed(&task.user_id),
            Err(StoreError::Conflict { .. }) => {
                let task = store.get_task(task_id).await?;
                // A report for an earlier attempt leaves the later one's assignment alone.
                if !task.status.is_terminal() || attempt.is_some_and(|a| a != task.attempts) {
                    return finished;
                }
            }
            Err(_) => return finished,
        }
        let active = store
            .list_assignments(&AssignmentFilter {
                task_id: Some(task_id.to_string()),
                active_only: true,
                ..AssignmentFilter::default()
            })
            .await?;
        let mut released = 0;
        for assignment in &active {
            if self.release(&assignment.ass_id, cause).await? {
                released += 1;
                tracing::info!(task_id, ass_id = %assignment.ass_id, worker_id = %assignment.worker_id, "reservation released");
            }
        }
        if released > 0 {
            wakeup.capacity_changed();
        }
        finished
    }
}
