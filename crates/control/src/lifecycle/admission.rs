//! Admission's changes: a `pending` task accepted (-> `queued`), rejected (-> `failed` with
//! the policy's reason) or deferred (stays `pending` with the reason). The decisions are the
//! scheduler's ([`crate::scheduler::admit_task`]).

use super::{Cause, Lifecycle};
use crate::model::{self, Task, TaskStatus};
use crate::policy::AdmissionDecision;
use crate::store::{StoreError, TaskUpdate};

/// What admission did with a task.
#[derive(Debug, Clone, PartialEq)]
pub enum Admitted {
    /// Now `queued`.
    Queued(Task),
    /// Now `failed`, with the policy's reason in `error` and `status_reason`.
    Rejected { task: Task, reason: String },
    /// Still `pending`, with the reason in `status_reason`.
    Deferred { task: Task, reason: String },
}

const PENDING: [TaskStatus; 1] = [TaskStatus::Pending];

impl Lifecycle {
    /// Writes an admission decision as a conditional transition from `pending`. `Conflict`
    /// when the task left `pending` meanwhile (cancelled, or admitted elsewhere).
    #[tracing::instrument(name = "admit", skip_all, fields(task_id = %task.task_id, user_id = %task.user_id))]
    pub async fn admit(
        &self,
        task: &Task,
        decision: AdmissionDecision,
    ) -> Result<Admitted, StoreError> {
        let id = task.task_id.as_str();
        let (to, update) = match &decision {
            AdmissionDecision::Accept => (TaskStatus::Queued, accepted()),
            AdmissionDecision::Reject(reason) => (
                TaskStatus::Failed,
                TaskUpdate {
                    completed_at: Some(model::now()),
                    error: Some(reason.clone()),
                    status_reason: Some(Some(reason.clone())),
                    clear_claim: true,
                    ..TaskUpdate::default()
                },
            ),
            // Written even when the reason is unchanged: the update time is what puts the task
            // back by the back-off in the admission batch.
            AdmissionDecision::Defer(reason) => (
                TaskStatus::Pending,
                TaskUpdate {
                    status_reason: Some(Some(reason.clone())),
                    ..TaskUpdate::default()
                },
            ),
        };
        let task = self
            .store
            .transition_task(id, &PENDING, to, &update)
            .await?;
        self.moved(&PENDING, &task, Cause::Admission);
        Ok(match decision {
            AdmissionDecision::Accept => {
                tracing::info!(task_id = id, user_id = %task.user_id, "task admitted");
                Admitted::Queued(task)
            }
            AdmissionDecision::Reject(reason) => {
                tracing::info!(task_id = id, user_id = %task.user_id, %reason, "task rejected by admission");
                Admitted::Rejected { task, reason }
            }
            AdmissionDecision::Defer(reason) => {
                tracing::debug!(task_id = id, user_id = %task.user_id, %reason, "task deferred");
                Admitted::Deferred { task, reason }
            }
        })
    }

    /// Accepts many pending tasks in one batched transition (an array's, an admission pass's
    /// chunk). Returns those it moved; one that left `pending` meanwhile is left alone.
    pub async fn accept_many(&self, task_ids: &[String]) -> Result<Vec<Task>, StoreError> {
        let moved = self
            .store
            .transition_tasks(task_ids, &PENDING, TaskStatus::Queued, &accepted())
            .await?;
        for task in &moved {
            tracing::debug!(task_id = %task.task_id, user_id = %task.user_id, "task admitted");
            self.moved(&PENDING, task, Cause::Admission);
        }
        Ok(moved)
    }
}

fn accepted() -> TaskUpdate {
    TaskUpdate {
        status_reason: Some(None),
        ..TaskUpdate::default()
    }
}
