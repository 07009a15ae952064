//! One scheduling round as the policies see it: the contract's columns built from
//! [`crate::model`] documents (strings interned, ids kept on the host side), and the decision
//! the host takes back.

use std::collections::{BTreeMap, HashMap};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::bindings::types::{
    AttributeColumn, LabelIndex, PlacementInput as WitInput, Resources as WitResources,
    TaskColumns, UserUsage, WorkerColumns,
};
use crate::model::{RuntimeSample, Task, Usage, Worker};

/// Attribute names of the runtime history, followed by the task type.
pub const MEAN_RUNTIME_ATTRIBUTE: &str = "mean-runtime-s:";
pub const RUNS_ATTRIBUTE: &str = "runs:";

/// How many of the newest successful runs the runtime history covers: recent enough to follow
/// a change of hardware or code, many enough for a stable mean per type and worker.
pub const RUNTIME_HISTORY_WINDOW: u32 = 5_000;

/// Observed runtimes by task type and worker (sum and count of successful runs): what a
/// placement policy sees as the worker attributes `mean-runtime-s:<type>` and `runs:<type>`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RuntimeHistory {
    by_type: HashMap<String, HashMap<String, (f64, u32)>>,
}

/// One task type's runs on one worker, as a cluster snapshot records the history.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RuntimeStat {
    pub task_type: String,
    pub worker_id: String,
    pub mean_runtime_s: f64,
    pub runs: u32,
}

impl RuntimeHistory {
    /// The history as a list, by task type then worker.
    pub fn stats(&self) -> Vec<RuntimeStat> {
        let mut stats: Vec<RuntimeStat> = self
            .by_type
            .iter()
            .flat_map(|(task_type, workers)| {
                workers
                    .iter()
                    .map(move |(worker_id, (sum, runs))| RuntimeStat {
                        task_type: task_type.clone(),
                        worker_id: worker_id.clone(),
                        mean_runtime_s: sum / f64::from((*runs).max(1)),
                        runs: *runs,
                    })
            })
            .collect();
        stats.sort_by(|a, b| (&a.task_type, &a.worker_id).cmp(&(&b.task_type, &b.worker_id)));
        stats
    }

    /// The history a snapshot recorded (entries with no runs or a non-finite mean ignored).
    pub fn from_stats(stats: &[RuntimeStat]) -> Self {
        let mut history = RuntimeHistory::default();
        for s in stats
            .iter()
            .filter(|s| s.runs > 0 && s.mean_runtime_s.is_finite() && s.mean_runtime_s >= 0.0)
        {
            history
                .by_type
                .entry(s.task_type.clone())
                .or_default()
                .insert(
                    s.worker_id.clone(),
                    (s.mean_runtime_s * f64::from(s.runs), s.runs),
                );
        }
        history
    }

    pub fn from_samples(samples: &[RuntimeSample]) -> Self {
        let mut history = RuntimeHistory::default();
        for s in samples.iter().filter(|s| s.runtime_s.is_finite()) {
            let slot = history
                .by_type
                .entry(s.task_type.clone())
                .or_default()
                .entry(s.worker_id.clone())
                .or_default();
            slot.0 += s.runtime_s.max(0.0);
            slot.1 += 1;
        }
        history
    }

    /// Mean runtime and number of runs of `task_type` on `worker_id`, when it ran there.
    pub fn on_worker(&self, task_type: &str, worker_id: &str) -> Option<(f64, u32)> {
        let (sum, runs) = *self.by_type.get(task_type)?.get(worker_id)?;
        (runs > 0).then(|| (sum / f64::from(runs), runs))
    }

    pub fn is_empty(&self) -> bool {
        self.by_type.is_empty()
    }
}

/// A scheduling round: the batch of tasks (in queue order) and the candidate workers, in the
/// contract's columnar shape, ready to hand to a guest without conversion.
#[derive(Debug, Clone, PartialEq)]
pub struct PlacementInput {
    pub(crate) wit: WitInput,
    /// Worker ids by index: kept on the host side, since a policy answers with indices and
    /// passing one string per worker would dominate the cost of a call.
    worker_ids: Vec<String>,
    /// The running tasks a `cloudai:policy@0.2.0` policy may preempt (empty unless
    /// [`Self::with_preemptible`] gave them), in the order of their columns.
    pub(crate) running: Vec<RunningTask>,
}

/// A running task a preempting policy may stop: the host's side of one entry of the 0.2.0
/// `running-columns`.
#[derive(Debug, Clone, PartialEq)]
pub struct RunningTask {
    pub task_id: String,
    pub user_id: String,
    /// The attempt it runs at: a preemption applies to that attempt only.
    pub attempt: u32,
    /// Index into the round's workers.
    pub worker: u32,
    pub priority: i32,
    pub request: crate::model::Resources,
    /// Seconds since its placement.
    pub age_s: f64,
}

/// The admission decision for one task, as the host acts on it: the guest's
/// `admission-decision` (of either contract) converted where the runtime calls the guest, the
/// built-in default's and the failure fallback's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AdmissionDecision {
    /// Queue the task.
    Accept,
    /// Fail the task with this reason.
    Reject(String),
    /// Keep the task pending with this reason; it is checked again after the back-off.
    Defer(String),
}

/// The placement decision for one task, checked by the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Run the task on the worker with this index ([`PlacementInput::worker_id`]).
    Assign { worker: u32 },
    /// Leave the task queued, with the reason shown to its user.
    Wait { reason: String },
    /// No worker could ever hold the task: it fails with this reason.
    Unschedulable { reason: String },
    /// Stop the running tasks `victims` (indices into [`PlacementInput::running_task`]) on
    /// `worker` to make room for the task, which stays queued until they have stopped
    /// (`cloudai:policy@0.2.0` only).
    Preempt { worker: u32, victims: Vec<u32> },
}

/// Interns strings: each distinct string gets one index into `strings`.
#[derive(Default)]
struct Interner {
    strings: Vec<String>,
    index: HashMap<String, u32>,
}

impl Interner {
    fn intern(&mut self, s: &str) -> u32 {
        if let Some(&i) = self.index.get(s) {
            return i;
        }
        // More than 4 billion distinct strings cannot fit in memory anyway.
        let i = u32::try_from(self.strings.len()).unwrap_or(u32::MAX);
        self.strings.push(s.to_string());
        self.index.insert(s.to_string(), i);
        i
    }

    fn labels<'a>(
        &mut self,
        out: &mut LabelIndex,
        labels: impl IntoIterator<Item = (&'a String, &'a String)>,
    ) {
        for (k, v) in labels {
            let pair = (self.intern(k), self.intern(v));
            out.pairs.push(pair);
        }
        out.offsets.push(len_u32(out.pairs.len()));
    }
}

fn len_u32(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

fn new_label_index(capacity: usize) -> LabelIndex {
    let mut offsets = Vec::with_capacity(capacity + 1);
    offsets.push(0);
    LabelIndex {
        offsets,
        pairs: Vec::new(),
    }
}

/// Seconds from `earlier` to `now`, never negative (clocks of replicas differ a little).
fn seconds_since(now: DateTime<Utc>, earlier: DateTime<Utc>) -> f64 {
    ((now - earlier).num_milliseconds().max(0)) as f64 / 1000.0
}

impl PlacementInput {
    /// Builds a round from tasks (in queue order) and workers. Workers that are inactive or
    /// draining are left out (the contract promises candidates only); heartbeat freshness is
    /// the caller's filter. A worker's running-task count comes from its last reported usage
    /// (0 when none): see [`Self::with_running_tasks`] to supply the store's count instead.
    /// Attributes `cpu-utilisation` and `memory-utilisation` (0..1) are known for workers that
    /// reported usage.
    pub fn build(tasks: &[Task], workers: &[Worker], now: DateTime<Utc>) -> Self {
        let workers: Vec<&Worker> = workers
            .iter()
            .filter(|w| w.is_active && !w.draining)
            .collect();
        let mut strings = Interner::default();
        let n = workers.len();
        let mut w = WorkerColumns {
            total_cpu: Vec::with_capacity(n),
            total_memory: Vec::with_capacity(n),
            total_storage: Vec::with_capacity(n),
            total_gpu: Vec::with_capacity(n),
            allocated_cpu: Vec::with_capacity(n),
            allocated_memory: Vec::with_capacity(n),
            allocated_storage: Vec::with_capacity(n),
            allocated_gpu: Vec::with_capacity(n),
            available_cpu: Vec::with_capacity(n),
            available_memory: Vec::with_capacity(n),
            available_storage: Vec::with_capacity(n),
            available_gpu: Vec::with_capacity(n),
            heartbeat_age_s: Vec::with_capacity(n),
            running_tasks: Vec::with_capacity(n),
            labels: new_label_index(n),
            attributes: Vec::new(),
        };
        let mut cpu_util = AttributeColumn {
            name: "cpu-utilisation".to_string(),
            known: Vec::with_capacity(n),
            values: Vec::with_capacity(n),
        };
        let mut mem_util = AttributeColumn {
            name: "memory-utilisation".to_string(),
            known: Vec::with_capacity(n),
            values: Vec::with_capacity(n),
        };
        let now_ms = now.timestamp_millis();
        let mut worker_ids = Vec::with_capacity(n);
        for worker in &workers {
            w.total_cpu.push(worker.total_cpu);
            w.total_memory.push(worker.total_memory);
            w.total_storage.push(worker.total_storage);
            w.total_gpu.push(worker.total_gpu);
            w.allocated_cpu.push(worker.allocated_cpu);
            w.allocated_memory.push(worker.allocated_memory);
            w.allocated_storage.push(worker.allocated_storage);
            w.allocated_gpu.push(worker.allocated_gpu);
            w.available_cpu.push(worker.available_cpu);
            w.available_memory.push(worker.available_memory);
            w.available_storage.push(worker.available_storage);
            w.available_gpu.push(worker.available_gpu);
            let age_ms = now_ms.saturating_sub(worker.last_heartbeat.saturating_mul(1000));
            w.heartbeat_age_s.push(age_ms.max(0) as f64 / 1000.0);
            w.running_tasks
                .push(worker.usage.map_or(0, |u| u.running_tasks));
            worker_ids.push(worker.worker_id.clone());
            strings.labels(&mut w.labels, &worker.labels);
            for (column, value) in [
                (&mut cpu_util, worker.usage.map(|u| u.cpu_percent)),
                (&mut mem_util, worker.usage.map(|u| u.memory_percent)),
            ] {
                let value = value.filter(|v| v.is_finite()).map(|v| v / 100.0);
                column.known.push(value.is_some());
                column.values.push(value.unwrap_or(0.0));
            }
        }
        w.attributes = vec![cpu_util, mem_util];

        let m = tasks.len();
        let mut t = TaskColumns {
            req_cpu: Vec::with_capacity(m),
            req_memory: Vec::with_capacity(m),
            req_storage: Vec::with_capacity(m),
            req_gpu: Vec::with_capacity(m),
            priority: Vec::with_capacity(m),
            attempts: Vec::with_capacity(m),
            age_s: Vec::with_capacity(m),
            id: Vec::with_capacity(m),
            user: Vec::with_capacity(m),
            image: Vec::with_capacity(m),
            labels: new_label_index(m),
        };
        for task in tasks {
            t.req_cpu.push(task.req_cpu);
            t.req_memory.push(task.req_memory);
            t.req_storage.push(task.req_storage);
            t.req_gpu.push(task.req_gpu);
            t.priority.push(task.priority);
            t.attempts.push(task.attempts);
            t.age_s.push(seconds_since(now, task.created_at));
            t.id.push(strings.intern(&task.task_id));
            t.user.push(strings.intern(&task.user_id));
            t.image.push(strings.intern(&task.docker_image));
            strings.labels(&mut t.labels, &task.labels);
        }
        PlacementInput {
            wit: WitInput {
                strings: strings.strings,
                workers: w,
                tasks: t,
            },
            worker_ids,
            running: Vec::new(),
        }
    }

    /// Replaces the running-task counts with the store's, by worker id (0 for a worker not in
    /// the map).
    pub fn with_running_tasks(mut self, counts: &BTreeMap<String, u32>) -> Self {
        for (slot, id) in self
            .wit
            .workers
            .running_tasks
            .iter_mut()
            .zip(&self.worker_ids)
        {
            *slot = counts.get(id).copied().unwrap_or(0);
        }
        self
    }

    /// Adds, for each task type of the batch that has history, the worker attributes
    /// `mean-runtime-s:<type>` (mean seconds of its successful runs on the worker) and
    /// `runs:<type>` (how many), known for the workers it ran on.
    pub fn with_runtime_history<'t>(
        mut self,
        task_types: impl IntoIterator<Item = &'t str>,
        history: &RuntimeHistory,
    ) -> Self {
        let mut seen = std::collections::HashSet::new();
        for task_type in task_types {
            if !seen.insert(task_type) || !history.by_type.contains_key(task_type) {
                continue;
            }
            let n = self.worker_ids.len();
            let mut mean = AttributeColumn {
                name: format!("{MEAN_RUNTIME_ATTRIBUTE}{task_type}"),
                known: Vec::with_capacity(n),
                values: Vec::with_capacity(n),
            };
            let mut runs = AttributeColumn {
                name: format!("{RUNS_ATTRIBUTE}{task_type}"),
                known: Vec::with_capacity(n),
                values: Vec::with_capacity(n),
            };
            for id in &self.worker_ids {
                let observed = history.on_worker(task_type, id);
                for (column, value) in [
                    (&mut mean, observed.map(|(m, _)| m)),
                    (&mut runs, observed.map(|(_, r)| f64::from(r))),
                ] {
                    column.known.push(value.is_some());
                    column.values.push(value.unwrap_or(0.0));
                }
            }
            self.wit.workers.attributes.push(mean);
            self.wit.workers.attributes.push(runs);
        }
        self
    }

    /// A round given directly in the contract's shape (tests, snapshots, the smoke check).
    /// Workers are named `worker-<index>`.
    pub fn from_columns(wit: WitInput) -> Self {
        let worker_ids = (0..wit.workers.total_cpu.len())
            .map(|i| format!("worker-{i}"))
            .collect();
        PlacementInput {
            wit,
            worker_ids,
            running: Vec::new(),
        }
    }

    /// The contract's columns.
    pub fn columns(&self) -> &WitInput {
        &self.wit
    }

    pub fn worker_count(&self) -> usize {
        self.wit.workers.total_cpu.len()
    }

    pub fn task_count(&self) -> usize {
        self.wit.tasks.req_cpu.len()
    }

    /// The id of the worker at `index`.
    pub fn worker_id(&self, index: u32) -> Option<&str> {
        self.worker_ids.get(index as usize).map(String::as_str)
    }

    /// The running task a preemption names by `index` (see [`Decision::Preempt`]).
    pub fn running_task(&self, index: u32) -> Option<&RunningTask> {
        self.running.get(index as usize)
    }

    /// The ids of the running tasks `victims` names (`?` for an index out of range).
    pub fn victim_ids(&self, victims: &[u32]) -> Vec<String> {
        victims
            .iter()
            .map(|&v| {
                self.running_task(v)
                    .map_or("?", |r| r.task_id.as_str())
                    .to_string()
            })
            .collect()
    }

    /// The running tasks a preempting policy sees, in the order of its columns.
    pub fn running_tasks(&self) -> &[RunningTask] {
        &self.running
    }

    /// The index of the worker `worker_id` in this round, when it is a candidate.
    pub fn worker_index(&self, worker_id: &str) -> Option<u32> {
        self.worker_ids
            .iter()
            .position(|id| id == worker_id)
            .and_then(|i| u32::try_from(i).ok())
    }

    /// The id of the task at `index`.
    pub fn task_id(&self, index: usize) -> Option<&str> {
        let id = *self.wit.tasks.id.get(index)?;
        self.wit.strings.get(id as usize).map(String::as_str)
    }

    /// A small cluster for the smoke check at upload: four workers of different shapes (one
    /// with a GPU, one busy) and three tasks, one of which fits nowhere.
    pub fn synthetic() -> Self {
        use crate::model::Resources;
        let now = crate::model::now();
        let mut workers: Vec<Worker> = [
            ("smoke-w0", Resources::new(4.0, 16.0, 100.0, 0.0)),
            ("smoke-w1", Resources::new(8.0, 32.0, 200.0, 1.0)),
            ("smoke-w2", Resources::new(2.0, 4.0, 50.0, 0.0)),
            ("smoke-w3", Resources::new(16.0, 64.0, 500.0, 0.0)),
        ]
        .into_iter()
        .map(|(id, total)| {
            Worker::new(
                id.to_string(),
                "127.0.0.1".to_string(),
                total,
                BTreeMap::from([("zone".to_string(), "a".to_string())]),
                String::new(),
            )
        })
        .collect();
        if let Some(busy) = workers.get_mut(3) {
            busy.allocated_cpu = 12.0;
            busy.allocated_memory = 48.0;
            busy.available_cpu = 4.0;
            busy.available_memory = 16.0;
        }
        let tasks: Vec<Task> = [
            ("smoke-t0", Resources::new(1.0, 2.0, 10.0, 0.0)),
            ("smoke-t1", Resources::new(2.0, 8.0, 10.0, 1.0)),
            ("smoke-t2", Resources::new(64.0, 1.0, 1.0, 0.0)),
        ]
        .into_iter()
        .map(|(id, req)| {
            Task::new_pending(
                id.to_string(),
                "smoke".to_string(),
                "busybox".to_string(),
                req,
            )
        })
        .collect();
        PlacementInput::build(&tasks, &workers, now)
    }
}

/// A user's usage as the admission world sees it.
impl From<Usage> for UserUsage {
    fn from(usage: Usage) -> Self {
        UserUsage {
            running_tasks: usage.running_tasks,
            queued_tasks: usage.queued_tasks,
            pending_tasks: usage.pending_tasks,
            reserved: WitResources {
                cpu: usage.reserved.cpu,
                memory: usage.reserved.memory,
                storage: usage.reserved.storage,
                gpu: usage.reserved.gpu,
            },
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::model::{Resources, WorkerUsage};

    fn worker(id: &str, total: Resources) -> Worker {
        Worker::new(
            id.to_string(),
            "127.0.0.1".to_string(),
            total,
            BTreeMap::new(),
            String::new(),
        )
    }

    #[test]
    fn build_interns_strings_fills_columns_and_skips_non_candidates() {
        let now = crate::model::now();
        let mut w0 = worker("w0", Resources::new(4.0, 8.0, 10.0, 0.0));
        w0.labels.insert("zone".into(), "a".into());
        w0.last_heartbeat = now.timestamp() - 3;
        w0.usage = Some(WorkerUsage {
            cpu_percent: 50.0,
            memory_percent: 25.0,
            running_tasks: 2,
        });
        let mut draining = worker("w-draining", Resources::new(4.0, 8.0, 10.0, 0.0));
        draining.draining = true;
        let mut inactive = worker("w-inactive", Resources::new(4.0, 8.0, 10.0, 0.0));
        inactive.is_active = false;
        let mut w1 = worker("w1", Resources::new(2.0, 2.0, 2.0, 1.0));
        w1.labels.insert("zone".into(), "b".into());

        let mut t0 = Task::new_pending(
            "t0".into(),
            "alice".into(),
            "img".into(),
            Resources::new(1.0, 1.0, 1.0, 0.0),
        );
        t0.labels.insert("zone".into(), "a".into());
        t0.created_at = now - chrono::Duration::seconds(10);
        let t1 = Task::new_pending(
            "t1".into(),
            "alice".into(),
            "img".into(),
            Resources::new(0.5, 0.5, 0.5, 1.0),
        );

        let input = PlacementInput::build(&[t0, t1], &[w0, draining, inactive, w1], now);
        let c = input.columns();
        assert_eq!(input.worker_count(), 2);
        assert_eq!(input.task_count(), 2);
        assert_eq!(input.worker_id(0), Some("w0"));
        assert_eq!(input.worker_id(1), Some("w1"));
        assert_eq!(input.worker_id(2), None);
        assert_eq!(input.task_id(1), Some("t1"));
        // "zone", "a", "alice", "img" each appear once.
        for s in ["zone", "a", "alice", "img"] {
            assert_eq!(c.strings.iter().filter(|x| *x == s).count(), 1, "{s}");
        }
        assert_eq!(c.workers.labels.offsets, vec![0, 1, 2]);
        assert_eq!(c.tasks.labels.offsets, vec![0, 1, 1]);
        let (k, v) = c.workers.labels.pairs[1];
        assert_eq!(
            (
                c.strings[k as usize].as_str(),
                c.strings[v as usize].as_str()
            ),
            ("zone", "b")
        );
        assert_eq!(c.tasks.user[0], c.tasks.user[1]);
        assert_eq!(c.workers.total_gpu, vec![0.0, 1.0]);
        assert_eq!(c.workers.available_cpu, vec![4.0, 2.0]);
        assert_eq!(c.workers.running_tasks, vec![2, 0]);
        assert!(c.workers.heartbeat_age_s[0] >= 3.0 && c.workers.heartbeat_age_s[0] < 4.0);
        assert_eq!(c.tasks.age_s[0], 10.0);
        let cpu = &c.workers.attributes[0];
        assert_eq!(cpu.name, "cpu-utilisation");
        assert_eq!(cpu.known, vec![true, false]);
        assert_eq!(cpu.values[0], 0.5);

        let counts = BTreeMap::from([("w1".to_string(), 7)]);
        let input = input.with_running_tasks(&counts);
        assert_eq!(input.columns().workers.running_tasks, vec![0, 7]);
    }

    #[test]
    fn runtime_history_adds_mean_and_runs_per_task_type_of_the_batch() {
        let now = crate::model::now();
        let workers = [
            worker("w0", Resources::new(4.0, 8.0, 10.0, 0.0)),
            worker("w1", Resources::new(4.0, 8.0, 10.0, 0.0)),
        ];
        let task = |id: &str, image: &str, kind: Option<&str>| {
            let mut t = Task::new_pending(
                id.into(),
                "alice".into(),
                image.into(),
                Resources::new(1.0, 1.0, 1.0, 0.0),
            );
            if let Some(kind) = kind {
                t.labels
                    .insert(crate::model::TASK_TYPE_LABEL.into(), kind.into());
            }
            t
        };
        let tasks = [
            task("t0", "etl:1", Some("etl")),
            task("t1", "busybox:latest", None),
            task("t2", "other:1", Some("etl")),
            task("t3", "never-ran:1", None),
        ];
        assert_eq!(tasks[0].task_type(), "etl");
        assert_eq!(tasks[1].task_type(), "busybox:latest");
        let sample = |w: &str, kind: &str, runtime_s: f64| RuntimeSample {
            worker_id: w.into(),
            task_type: kind.into(),
            runtime_s,
        };
        let history = RuntimeHistory::from_samples(&[
            sample("w1", "etl", 10.0),
            sample("w1", "etl", 20.0),
            sample("w0", "busybox:latest", 1.0),
            sample("w-gone", "etl", 99.0),
            sample("w0", "unused", 5.0),
            sample("w0", "etl", f64::NAN),
        ]);
        let input = PlacementInput::build(&tasks, &workers, now)
            .with_runtime_history(tasks.iter().map(Task::task_type), &history);
        let attributes = &input.columns().workers.attributes;
        let names: Vec<&str> = attributes.iter().map(|a| a.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "cpu-utilisation",
                "memory-utilisation",
                "mean-runtime-s:etl",
                "runs:etl",
                "mean-runtime-s:busybox:latest",
                "runs:busybox:latest",
            ],
            "one pair per type of the batch with history, each once"
        );
        assert_eq!(attributes[2].known, vec![false, true]);
        assert_eq!(attributes[2].values[1], 15.0);
        assert_eq!(attributes[3].values[1], 2.0);
        assert_eq!(attributes[4].known, vec![true, false]);
        assert_eq!(attributes[4].values[0], 1.0);
        assert_eq!(RuntimeHistory::from_stats(&history.stats()), history);
    }

    #[test]
    fn synthetic_cluster_is_well_formed() {
        let input = PlacementInput::synthetic();
        assert_eq!(input.worker_count(), 4);
        assert_eq!(input.task_count(), 3);
        let w = &input.columns().workers;
        for i in 0..4 {
            assert_eq!(w.available_cpu[i], w.total_cpu[i] - w.allocated_cpu[i]);
        }
    }
}
