//! Dependencies between tasks (`after` in a task's spec, Slurm's `--dependency=afterok`): a
//! task whose dependencies are not all met is stored `pending` with `awaiting_dependencies`
//! set, which keeps it out of admission. The dependency pass, on every replica, reads the
//! distinct lists of dependencies waiting tasks have (100,000 tasks of an array waiting for
//! one task are one list, read from an index), looks at what each list names, and releases
//! its tasks to admission (every dependency met), fails them (one can no longer be met) or
//! leaves them waiting: the tasks themselves are read only when they move. Everything it
//! needs is in the store, so it works the same across replicas and after a restart.

use std::collections::HashMap;

use super::Scheduler;
use super::admission::admit_tasks;
use crate::lifecycle::{Cause, Lifecycle};
use crate::model::{Dependency, DependencyCondition, TaskStatus};
use crate::store::{StoreError, TaskCounts, TaskStore};

/// Most distinct dependency lists one pass looks at; tasks moved per page, and most pages one
/// list's tasks take in one pass (the rest move in the next).
const MAX_SETS: u32 = 1_000;
const PAGE: u32 = 1_000;
const MAX_PAGES: usize = 20;

/// What a dependency points at, now.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum TargetState {
    Task(TaskStatus),
    Array(TaskCounts),
    /// Neither a task nor an array of that id (a restore without it, say).
    Missing,
}

/// Whether a task may go on, as far as its dependencies say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Gate {
    Met,
    /// Not yet; why, for people.
    Waiting(String),
    /// Never: a dependency can no longer be met; why, for people.
    Broken(String),
}

/// One dependency against its target's state.
pub fn gate(dep: &Dependency, state: TargetState) -> Gate {
    let needs_success = dep.condition == DependencyCondition::Completed;
    let verb = if needs_success { "complete" } else { "finish" };
    match state {
        TargetState::Missing => Gate::Broken(format!("dependency {dep} does not exist")),
        TargetState::Task(TaskStatus::Completed) => Gate::Met,
        TargetState::Task(status @ (TaskStatus::Failed | TaskStatus::Cancelled)) => {
            if needs_success {
                Gate::Broken(format!(
                    "dependency {dep} is {status}: it can no longer complete"
                ))
            } else {
                Gate::Met
            }
        }
        TargetState::Task(_) => Gate::Waiting(format!("waiting for {dep} to {verb}")),
        TargetState::Array(counts) => {
            let unsuccessful = counts.failed + counts.cancelled;
            if needs_success && unsuccessful > 0 {
                return Gate::Broken(format!(
                    "dependency {dep} has {} failed and {} cancelled tasks: it can no longer \
                     complete",
                    counts.failed, counts.cancelled
                ));
            }
            // The reason stays the same while the array runs (its progress is the array's
            // own summary): a waiting task is written when what it waits for changes, not as
            // each task of the array ends.
            if counts.pending + counts.queued + counts.running == 0 {
                Gate::Met
            } else {
                Gate::Waiting(format!("waiting for {dep} to {verb}"))
            }
        }
    }
}

/// Every dependency of a task: broken when one is, else waiting when one is, else met.
pub fn gate_all(deps: &[Dependency], state: impl Fn(&Dependency) -> TargetState) -> Gate {
    let mut waiting = None;
    for dep in deps {
        match gate(dep, state(dep)) {
            Gate::Met => {}
            broken @ Gate::Broken(_) => return broken,
            Gate::Waiting(why) => {
                waiting.get_or_insert(why);
            }
        }
    }
    waiting.map_or(Gate::Met, Gate::Waiting)
}

/// The state of what `dep` points at, with the user it belongs to (`None` when missing).
pub async fn target_state(
    store: &dyn TaskStore,
    dep: &Dependency,
) -> Result<(TargetState, Option<String>), StoreError> {
    let read = match (&dep.task_id, &dep.array_id) {
        (Some(task_id), _) => store
            .get_task(task_id)
            .await
            .map(|t| (TargetState::Task(t.status), Some(t.user_id))),
        (None, Some(array_id)) => store
            .array_summary(array_id)
            .await
            .map(|a| (TargetState::Array(a.counts), Some(a.user_id))),
        (None, None) => Ok((TargetState::Missing, None)),
    };
    match read {
        Err(StoreError::NotFound { .. }) => Ok((TargetState::Missing, None)),
        other => other,
    }
}

/// What one dependency pass did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DependencyStats {
    pub checked: usize,
    pub released: usize,
    pub failed: usize,
}

impl Scheduler {
    /// For each distinct list of dependencies that waiting tasks have: releases its tasks to
    /// admission (and admits them at once) when every dependency is met, fails them when one
    /// can no longer be, and otherwise brings their reason up to date.
    pub async fn dependency_pass(&self) -> Result<DependencyStats, StoreError> {
        let store = &**self.lifecycle.store();
        let mut stats = DependencyStats::default();
        let mut states: HashMap<String, TargetState> = HashMap::new();
        for set in store.awaiting_dependency_sets(MAX_SETS).await? {
            stats.checked += 1;
            for dep in &set {
                if let std::collections::hash_map::Entry::Vacant(slot) =
                    states.entry(dep.to_string())
                {
                    slot.insert(target_state(store, dep).await?.0);
                }
            }
            let state = |dep: &Dependency| {
                states
                    .get(&dep.to_string())
                    .copied()
                    .unwrap_or(TargetState::Missing)
            };
            match gate_all(&set, state) {
                Gate::Met => {
                    // Released tasks leave the list: each page starts from the top.
                    for _ in 0..MAX_PAGES {
                        let page = store.awaiting_tasks(&set, PAGE, None).await?;
                        if page.is_empty() {
                            break;
                        }
                        let ids: Vec<String> = page.into_iter().map(|t| t.task_id).collect();
                        let released = self.lifecycle.dependencies_met(&ids).await?;
                        for task in &released {
                            tracing::info!(task_id = %task.task_id, user_id = %task.user_id, "dependencies met: the task goes to admission");
                        }
                        stats.released += released.len();
                        admit_tasks(&self.lifecycle, &self.policies, &released).await?;
                    }
                }
                Gate::Broken(why) => {
                    for _ in 0..MAX_PAGES {
                        let page = store.awaiting_tasks(&set, PAGE, None).await?;
                        if page.is_empty() {
                            break;
                        }
                        let ids: Vec<String> = page.into_iter().map(|t| t.task_id).collect();
                        let failed = self
                            .lifecycle
                            .fail_unrun(&ids, TaskStatus::Pending, &why, Cause::Dependencies)
                            .await?;
                        for task in &failed {
                            tracing::info!(task_id = %task.task_id, user_id = %task.user_id, reason = %why, "a dependency can no longer be met: task failed");
                        }
                        stats.failed += failed.len();
                    }
                }
                Gate::Waiting(why) => update_reasons(&self.lifecycle, &set, &why).await?,
            }
        }
        if stats.released > 0 {
            self.lifecycle.wakeup().wake();
        }
        Ok(stats)
    }
}

/// Sets `why` as the reason of the tasks waiting for `set`, when it changed (the tasks of one
/// list are written together, so the first one tells).
async fn update_reasons(
    lifecycle: &Lifecycle,
    set: &[Dependency],
    why: &str,
) -> Result<(), StoreError> {
    let store = lifecycle.store();
    let first = store.awaiting_tasks(set, 1, None).await?;
    if first
        .first()
        .is_none_or(|t| t.status_reason.as_deref() == Some(why))
    {
        return Ok(());
    }
    let mut after: Option<String> = None;
    for _ in 0..MAX_PAGES {
        let page = store.awaiting_tasks(set, PAGE, after.as_deref()).await?;
        let Some(last) = page.last() else { break };
        after = Some(last.task_id.clone());
        let ids: Vec<String> = page.iter().map(|t| t.task_id.clone()).collect();
        lifecycle.explain(&ids, TaskStatus::Pending, why).await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn on_task(condition: DependencyCondition) -> Dependency {
        Dependency {
            task_id: Some("task-a".into()),
            array_id: None,
            condition,
        }
    }

    fn on_array(condition: DependencyCondition) -> Dependency {
        Dependency {
            task_id: None,
            array_id: Some("array-a".into()),
            condition,
        }
    }

    fn counts(open: u64, completed: u64, failed: u64) -> TargetState {
        TargetState::Array(TaskCounts {
            running: open,
            completed,
            failed,
            ..TaskCounts::default()
        })
    }

    #[test]
    fn a_task_dependency_is_met_waiting_or_broken_by_its_state_and_condition() {
        use DependencyCondition::{Completed, Finished};
        let cases = [
            (Completed, TaskStatus::Completed, "met"),
            (Completed, TaskStatus::Failed, "broken"),
            (Completed, TaskStatus::Cancelled, "broken"),
            (Completed, TaskStatus::Running, "waiting"),
            (Completed, TaskStatus::Pending, "waiting"),
            (Finished, TaskStatus::Completed, "met"),
            (Finished, TaskStatus::Failed, "met"),
            (Finished, TaskStatus::Cancelled, "met"),
            (Finished, TaskStatus::Queued, "waiting"),
        ];
        for (condition, status, expected) in cases {
            let got = match gate(&on_task(condition), TargetState::Task(status)) {
                Gate::Met => "met",
                Gate::Waiting(_) => "waiting",
                Gate::Broken(_) => "broken",
            };
            assert_eq!(got, expected, "{condition:?} on a {status} task");
        }
        assert_eq!(
            gate(&on_task(Completed), TargetState::Task(TaskStatus::Running)),
            Gate::Waiting("waiting for task task-a to complete".into())
        );
        assert!(matches!(
            gate(&on_task(Finished), TargetState::Missing),
            Gate::Broken(why) if why.contains("does not exist")
        ));
    }

    #[test]
    fn an_array_dependency_needs_every_task() {
        use DependencyCondition::{Completed, Finished};
        assert_eq!(gate(&on_array(Completed), counts(0, 5, 0)), Gate::Met);
        assert_eq!(
            gate(&on_array(Completed), counts(2, 3, 0)),
            Gate::Waiting("waiting for array array-a to complete".into())
        );
        // One failure breaks `completed` at once, even while others run.
        assert!(matches!(
            gate(&on_array(Completed), counts(2, 2, 1)),
            Gate::Broken(why) if why.contains("1 failed")
        ));
        assert!(matches!(
            gate(&on_array(Finished), counts(2, 2, 1)),
            Gate::Waiting(_)
        ));
        assert_eq!(gate(&on_array(Finished), counts(0, 2, 3)), Gate::Met);
    }

    #[test]
    fn every_dependency_must_be_met_and_a_broken_one_wins() {
        let a = on_task(DependencyCondition::Completed);
        let b = on_array(DependencyCondition::Completed);
        let state = |running: bool, broken: bool| {
            move |dep: &Dependency| {
                if dep.task_id.is_some() {
                    TargetState::Task(if running {
                        TaskStatus::Running
                    } else {
                        TaskStatus::Completed
                    })
                } else {
                    counts(0, 1, u64::from(broken))
                }
            }
        };
        let deps = [a, b];
        assert_eq!(gate_all(&deps, state(false, false)), Gate::Met);
        assert!(matches!(
            gate_all(&deps, state(true, false)),
            Gate::Waiting(_)
        ));
        assert!(matches!(
            gate_all(&deps, state(true, true)),
            Gate::Broken(_)
        ));
        assert_eq!(gate_all(&[], state(true, true)), Gate::Met);
    }
}
