//! A cluster snapshot: what a scheduling round sees (the candidate workers, the queue, the
//! pending tasks and each user's usage), as one JSON document. `GET /v1/cluster/snapshot`
//! exports it, `cloudai policy test --snapshot` replays a policy against it offline, and a
//! dry run builds one from the store. The same document drives the policy conformance kit.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::bindings::types::{AdmissionTask, Resources as WitResources, UserUsage};
use super::{PlacementInput, RUNTIME_HISTORY_WINDOW, RuntimeHistory, RuntimeStat};
use crate::model::{Assignment, Task, TaskStatus, Usage, Worker, queue_order};
use crate::store::{AssignmentFilter, Store, TaskQuery, TaskStore};

/// The version of the snapshot document's shape.
pub const SNAPSHOT_FORMAT: u32 = 1;

/// Everything a placement round or an admission check reads, at one instant.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ClusterSnapshot {
    /// [`SNAPSHOT_FORMAT`]; a reader refuses a format it does not know.
    pub format: u32,
    /// When it was taken: task ages and heartbeat ages are computed from this instant.
    pub taken_at: DateTime<Utc>,
    /// Every registered worker, inactive and draining ones included (a round leaves them out).
    pub workers: Vec<Worker>,
    /// The `queued` tasks, in queue order: what a placement round takes as its batch.
    #[serde(default)]
    pub queued: Vec<Task>,
    /// The `pending` tasks, oldest first: what admission checks.
    #[serde(default)]
    pub pending: Vec<Task>,
    /// Tasks running on each worker, by worker id (absent: 0).
    #[serde(default)]
    pub running_tasks: BTreeMap<String, u32>,
    /// Each user's current usage, by user id (absent: none).
    #[serde(default)]
    pub usage: BTreeMap<String, Usage>,
    /// The runtime history placement policies see (mean runtime per task type and worker,
    /// from the newest successful runs in RESULTS).
    #[serde(default)]
    pub runtime_history: Vec<RuntimeStat>,
    /// The running tasks a preempting policy (`cloudai:policy@0.2.0`) may stop, each with
    /// the assignment it runs under: preemptible, not being stopped; lowest priority first.
    #[serde(default)]
    pub preemptible: Vec<RunningAssignment>,
}

/// A running task and the assignment it runs under.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RunningAssignment {
    pub task: Task,
    pub assignment: Assignment,
}

impl ClusterSnapshot {
    /// Parses a snapshot document, refusing unknown fields and unknown formats.
    pub fn from_json(text: &str) -> Result<Self, String> {
        let snapshot: ClusterSnapshot = serde_json::from_str(text).map_err(|e| e.to_string())?;
        if snapshot.format != SNAPSHOT_FORMAT {
            return Err(format!(
                "snapshot format {} is not supported (this host reads format {SNAPSHOT_FORMAT})",
                snapshot.format
            ));
        }
        Ok(snapshot)
    }

    /// The placement round of this snapshot: its queue against its candidate workers.
    pub fn placement_input(&self) -> PlacementInput {
        self.placement_input_for(&self.queued)
    }

    /// A placement round of `tasks` against this snapshot's candidate workers.
    pub fn placement_input_for(&self, tasks: &[Task]) -> PlacementInput {
        let preemptible: Vec<(Task, Assignment)> = self
            .preemptible
            .iter()
            .map(|r| (r.task.clone(), r.assignment.clone()))
            .collect();
        PlacementInput::build(tasks, &self.workers, self.taken_at)
            .with_running_tasks(&self.running_tasks)
            .with_runtime_history(
                tasks.iter().map(Task::task_type),
                &RuntimeHistory::from_stats(&self.runtime_history),
            )
            .with_preemptible(&preemptible, self.taken_at)
    }

    /// The admission check of each pending task, with its user's usage.
    pub fn admission_inputs(&self) -> Vec<(AdmissionTask, UserUsage)> {
        self.pending
            .iter()
            .map(|task| {
                let usage = self.usage.get(&task.user_id).copied().unwrap_or_default();
                (admission_task(task, self.taken_at), UserUsage::from(usage))
            })
            .collect()
    }

    /// Reads a snapshot from the store: every worker, up to `max_tasks` queued tasks in queue
    /// order (priority first, then oldest), up to `max_tasks` pending tasks oldest first, the
    /// running tasks per worker and each user's usage.
    pub async fn capture(
        store: &dyn Store,
        now: DateTime<Utc>,
        max_tasks: usize,
    ) -> crate::store::Result<Self> {
        let workers = store.list_workers().await?;
        let mut queued = all_with_status(store, TaskStatus::Queued).await?;
        queued.sort_by(queue_order);
        let mut pending = all_with_status(store, TaskStatus::Pending).await?;
        pending.sort_by(|a, b| (a.created_at, &a.task_id).cmp(&(b.created_at, &b.task_id)));
        let running = all_with_status(store, TaskStatus::Running).await?;

        let mut usage: BTreeMap<String, Usage> = BTreeMap::new();
        for task in &queued {
            usage.entry(task.user_id.clone()).or_default().queued_tasks += 1;
        }
        for task in &pending {
            usage.entry(task.user_id.clone()).or_default().pending_tasks += 1;
        }
        for task in &running {
            let entry = usage.entry(task.user_id.clone()).or_default();
            entry.running_tasks += 1;
            entry.reserved.cpu += task.req_cpu;
            entry.reserved.memory += task.req_memory;
            entry.reserved.storage += task.req_storage;
            entry.reserved.gpu += task.req_gpu;
        }
        let assignments = store
            .list_assignments(&AssignmentFilter {
                active_only: true,
                ..AssignmentFilter::default()
            })
            .await?;
        let mut running_tasks: BTreeMap<String, u32> = BTreeMap::new();
        for assignment in &assignments {
            *running_tasks
                .entry(assignment.worker_id.clone())
                .or_default() += 1;
        }
        let mut by_task: std::collections::HashMap<&str, Vec<&Assignment>> =
            std::collections::HashMap::new();
        for a in &assignments {
            by_task.entry(a.task_id.as_str()).or_default().push(a);
        }
        let mut preemptible: Vec<RunningAssignment> = running
            .iter()
            .filter(|t| t.preemptible && !t.cancel_requested)
            .filter_map(|task| {
                let assignment = by_task
                    .get(task.task_id.as_str())?
                    .iter()
                    .find(|a| a.holds(task))?;
                Some(RunningAssignment {
                    task: task.clone(),
                    assignment: (*assignment).clone(),
                })
            })
            .collect();
        preemptible.sort_by(|a, b| {
            (a.task.priority, &a.task.task_id).cmp(&(b.task.priority, &b.task.task_id))
        });
        preemptible.truncate(max_tasks);
        queued.truncate(max_tasks);
        pending.truncate(max_tasks);
        let runtime_history =
            RuntimeHistory::from_samples(&store.recent_runtimes(RUNTIME_HISTORY_WINDOW).await?)
                .stats();
        Ok(ClusterSnapshot {
            format: SNAPSHOT_FORMAT,
            taken_at: now,
            workers,
            queued,
            pending,
            running_tasks,
            usage,
            runtime_history,
            preemptible,
        })
    }
}

/// A task as the admission world sees it.
pub fn admission_task(task: &Task, now: DateTime<Utc>) -> AdmissionTask {
    AdmissionTask {
        id: task.task_id.clone(),
        user: task.user_id.clone(),
        image: task.docker_image.clone(),
        request: WitResources {
            cpu: task.req_cpu,
            memory: task.req_memory,
            storage: task.req_storage,
            gpu: task.req_gpu,
        },
        priority: task.priority,
        labels: task
            .labels
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        attempts: task.attempts,
        age_s: ((now - task.created_at).num_milliseconds().max(0)) as f64 / 1000.0,
    }
}

/// Every task in `status`, following the listing's pages.
async fn all_with_status(
    store: &dyn TaskStore,
    status: TaskStatus,
) -> crate::store::Result<Vec<Task>> {
    let mut tasks = Vec::new();
    let mut query = TaskQuery {
        status: Some(status),
        limit: 500,
        ..TaskQuery::default()
    };
    loop {
        let page = store.list_tasks(&query).await?;
        tasks.extend(page.tasks);
        match page.next {
            Some(next) => query.after = Some(next),
            None => return Ok(tasks),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use crate::model::Resources;

    fn task(id: &str, priority: i32, age_s: i64) -> Task {
        let mut t = Task::new_pending(
            id.into(),
            "alice".into(),
            "busybox".into(),
            Resources::new(1.0, 1.0, 1.0, 0.0),
        );
        t.priority = priority;
        t.created_at -= chrono::Duration::seconds(age_s);
        t
    }

    #[test]
    fn queue_order_is_priority_then_age_then_id() {
        let mut tasks = [
            task("c", 0, 10),
            task("a", 5, 1),
            task("b", 0, 20),
            task("d", 5, 3),
        ];
        tasks.sort_by(queue_order);
        let ids: Vec<&str> = tasks.iter().map(|t| t.task_id.as_str()).collect();
        assert_eq!(ids, ["d", "a", "b", "c"]);
    }

    #[test]
    fn a_snapshot_round_trips_and_unknown_fields_or_formats_are_refused() {
        let snapshot = ClusterSnapshot {
            format: SNAPSHOT_FORMAT,
            taken_at: crate::model::now(),
            workers: vec![Worker::new(
                "w1".into(),
                "127.0.0.1".into(),
                Resources::new(4.0, 8.0, 100.0, 1.0),
                BTreeMap::new(),
                String::new(),
            )],
            queued: vec![task("t1", 5, 5)],
            pending: vec![],
            running_tasks: BTreeMap::new(),
            usage: BTreeMap::new(),
            runtime_history: vec![RuntimeStat {
                task_type: "busybox".into(),
                worker_id: "w1".into(),
                mean_runtime_s: 2.5,
                runs: 4,
            }],
            preemptible: vec![{
                let mut running = task("r1", 0, 60);
                let assignment = crate::model::Assignment::for_next_attempt(
                    &running,
                    "w1",
                    "claim",
                    crate::model::now(),
                );
                running.status = TaskStatus::Running;
                running.attempts = assignment.attempt;
                running.placed_by = assignment.placed_by.clone();
                RunningAssignment {
                    task: running,
                    assignment,
                }
            }],
        };
        let text = serde_json::to_string(&snapshot).unwrap();
        assert_eq!(ClusterSnapshot::from_json(&text).unwrap(), snapshot);
        let input = snapshot.placement_input();
        assert_eq!((input.worker_count(), input.task_count()), (1, 1));
        // A preempting policy replaying the snapshot sees what it may stop.
        let offered: Vec<&str> = input
            .running_tasks()
            .iter()
            .map(|r| r.task_id.as_str())
            .collect();
        assert_eq!(offered, ["r1"]);
        // The recorded history reaches the policy as the task type's attributes.
        let mean = input
            .columns()
            .workers
            .attributes
            .iter()
            .find(|a| a.name == "mean-runtime-s:busybox")
            .unwrap();
        assert_eq!((mean.known[0], mean.values[0]), (true, 2.5));
        // A snapshot written before the history existed still reads.
        let mut old: serde_json::Value = serde_json::from_str(&text).unwrap();
        old.as_object_mut().unwrap().remove("runtime_history");
        old.as_object_mut().unwrap().remove("preemptible");
        assert!(ClusterSnapshot::from_json(&old.to_string()).is_ok());

        let mut value: serde_json::Value = serde_json::from_str(&text).unwrap();
        value["format"] = 2.into();
        let err = ClusterSnapshot::from_json(&value.to_string()).unwrap_err();
        assert!(err.contains("format 2"), "{err}");
        value["format"] = 1.into();
        value["extra"] = true.into();
        let err = ClusterSnapshot::from_json(&value.to_string()).unwrap_err();
        assert!(err.contains("extra"), "{err}");
    }
}
