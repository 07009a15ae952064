//! Admission: the active admission policy decides whether a `pending` task is accepted,
//! rejected or deferred (checked again after the back-off); [`Lifecycle::admit`] writes the
//! decision. Runs inline on submit and in the scheduler's admission pass, which also picks up
//! any task the inline check could not finish.

use std::collections::HashMap;
use std::sync::Arc;

use super::{Scheduler, chrono_duration, source_label};
use crate::lifecycle::{Admitted, Lifecycle};
use crate::model::Usage;
use crate::model::{self, Task, TaskStatus};
use crate::policy::AdmissionDecision;
use crate::policy::snapshot::admission_task;
use crate::policy::{PolicyKind, PolicyRuntime};
use crate::store::{StoreError, TaskQuery, TaskStore};

/// Checks one pending task with the active admission policy (with its user's usage from the
/// store) and applies the decision. `Conflict` when the task left `pending` meanwhile (it was
/// cancelled, or another replica admitted it).
pub async fn admit_task(
    lifecycle: &Lifecycle,
    policies: &Arc<PolicyRuntime>,
    task: &Task,
) -> Result<Admitted, StoreError> {
    let decisions =
        decide_reading_usage(&**lifecycle.store(), policies, vec![task.clone()]).await?;
    match decisions.into_iter().next() {
        Some(decision) => lifecycle.admit(task, decision).await,
        None => Err(StoreError::backend(
            format!("admitting task {}", task.task_id),
            "the admission check returned no decision",
        )),
    }
}

/// Most tasks one batched admission decides and writes at once.
const ADMISSION_CHUNK: usize = 1_000;

/// Admits many pending tasks (an array's, or an admission pass's batch): the policy decides
/// each in order, with the usage its user had before the chunk plus the tasks it accepted
/// before this one; the accepted tasks of a chunk move to `queued` in one batched transition,
/// the others are written one by one as [`admit_task`] writes them. A task that left
/// `pending` meanwhile (cancelled, admitted elsewhere) is left alone and not counted.
pub async fn admit_tasks(
    lifecycle: &Lifecycle,
    policies: &Arc<PolicyRuntime>,
    tasks: &[Task],
) -> Result<AdmissionStats, StoreError> {
    // A task awaiting its dependencies is the dependency pass's to release, never admitted.
    let tasks: Vec<Task> = tasks
        .iter()
        .filter(|t| !t.awaiting_dependencies)
        .cloned()
        .collect();
    let mut stats = AdmissionStats {
        checked: tasks.len(),
        ..AdmissionStats::default()
    };
    for chunk in tasks.chunks(ADMISSION_CHUNK) {
        let decisions =
            decide_reading_usage(&**lifecycle.store(), policies, chunk.to_vec()).await?;
        let mut accepted = Vec::new();
        for (task, decision) in chunk.iter().zip(decisions) {
            if decision == AdmissionDecision::Accept {
                accepted.push(task.task_id.clone());
                continue;
            }
            match lifecycle.admit(task, decision).await {
                Ok(Admitted::Queued(_)) => stats.queued += 1,
                Ok(Admitted::Rejected { .. }) => stats.rejected += 1,
                Ok(Admitted::Deferred { .. }) => stats.deferred += 1,
                Err(StoreError::Conflict { .. }) => {}
                Err(error) => {
                    tracing::warn!(task_id = %task.task_id, %error, "applying an admission decision");
                }
            }
        }
        if !accepted.is_empty() {
            stats.queued += lifecycle.accept_many(&accepted).await?.len();
        }
    }
    Ok(stats)
}

/// Decides `tasks` in order, reading their users' usage from the store only when an
/// admission policy is active: the built-in default accepts without it, and on a store
/// without pushed-down aggregates (FerretDB) the read costs a scan of the user's tasks.
async fn decide_reading_usage(
    store: &dyn TaskStore,
    policies: &Arc<PolicyRuntime>,
    tasks: Vec<Task>,
) -> Result<Vec<AdmissionDecision>, StoreError> {
    if let Some(decisions) = decide(policies, tasks.clone(), None).await? {
        return Ok(decisions);
    }
    let mut usage = HashMap::new();
    for task in &tasks {
        if !usage.contains_key(&task.user_id) {
            let u = store.user_usage(&task.user_id).await?;
            usage.insert(task.user_id.clone(), u);
        }
    }
    decide(policies, tasks, Some(usage)).await?.ok_or_else(|| {
        StoreError::backend(
            "running the admission policy",
            "no decision although every user's usage was read",
        )
    })
}

/// Runs the policy on `tasks` in order, on a blocking thread, counting each accepted task in
/// its user's usage for the tasks that follow. `None` when `usage` was not read and an
/// admission policy is active (it needs usage).
async fn decide(
    policies: &Arc<PolicyRuntime>,
    tasks: Vec<Task>,
    mut usage: Option<HashMap<String, Usage>>,
) -> Result<Option<Vec<AdmissionDecision>>, StoreError> {
    let policies = Arc::clone(policies);
    tokio::task::spawn_blocking(move || {
        let now = model::now();
        tasks
            .iter()
            .map(|task| {
                let user = usage
                    .as_mut()
                    .map(|u| u.entry(task.user_id.clone()).or_default());
                let seen = user
                    .as_ref()
                    .map(|u| crate::policy::bindings::types::UserUsage::from(**u));
                let outcome = policies.admit_lazily(&admission_task(task, now), seen.as_ref())?;
                let (name, version, fallback) = outcome.source.metric_labels();
                crate::metrics::policy_call(
                    PolicyKind::Admission.as_str(),
                    name,
                    version,
                    fallback,
                    outcome.elapsed,
                );
                if let Some(user) = user
                    && outcome.decision == AdmissionDecision::Accept
                {
                    user.pending_tasks = user.pending_tasks.saturating_sub(1);
                    user.queued_tasks += 1;
                }
                tracing::debug!(
                    task_id = %task.task_id,
                    user_id = %task.user_id,
                    policy = %source_label(&outcome.source),
                    decision = ?outcome.decision,
                    "admission decided"
                );
                Some(outcome.decision)
            })
            .collect()
    })
    .await
    .map_err(|e| StoreError::backend("running the admission policy", e.to_string()))
}

/// What one admission pass did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AdmissionStats {
    pub checked: usize,
    pub queued: usize,
    pub rejected: usize,
    pub deferred: usize,
}

impl Scheduler {
    /// Checks the pending tasks that are due (never checked, or deferred longer ago than the
    /// back-off), up to one batch. The placement round that follows in the same cycle places
    /// what was queued.
    pub async fn admission_pass(&self) -> Result<AdmissionStats, StoreError> {
        let due_before = model::now() - chrono_duration(self.config.admission_backoff);
        let mut tasks = self
            .lifecycle
            .store()
            .admission_batch(self.config.batch_size, due_before)
            .await?;
        // Deferred tasks of users whose usage just went down, whatever their back-off.
        for user_id in self.lifecycle.wakeup().take_usage_changed() {
            let room = (self.config.batch_size as usize).saturating_sub(tasks.len());
            if room == 0 {
                break;
            }
            let page = self
                .lifecycle
                .store()
                .list_tasks(&TaskQuery {
                    status: Some(TaskStatus::Pending),
                    user_id: Some(user_id),
                    limit: room as u32,
                    after: None,
                    array_id: None,
                })
                .await?;
            for task in page.tasks {
                // Only tasks a check deferred (they carry its reason): a task never checked is
                // its submission's to admit inline, and deciding it here too would race that
                // answer (the back-off path takes it if the submission could not).
                // Never one awaiting its dependencies (its reason says what it waits for).
                if task.status_reason.is_some()
                    && !task.awaiting_dependencies
                    && !tasks.iter().any(|t| t.task_id == task.task_id)
                {
                    tasks.push(task);
                }
            }
        }
        if tasks.is_empty() {
            return Ok(AdmissionStats::default());
        }
        let stats = admit_tasks(&self.lifecycle, &self.policies, &tasks).await?;
        tracing::debug!(
            checked = stats.checked,
            queued = stats.queued,
            rejected = stats.rejected,
            deferred = stats.deferred,
            "admission pass"
        );
        Ok(stats)
    }
}
