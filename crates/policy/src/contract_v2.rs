//! The host's side of `cloudai:policy@0.2.0` (preemption): the running tasks a placement
//! policy may stop, added to a round; the round, an admission check and its answer converted
//! between the 0.1.0 types the host works with and 0.2.0's.
//!
//! Only what a preemption may legitimately name is offered: tasks on a candidate worker,
//! preemptible, not already being stopped, running at the attempt their assignment holds, and
//! of a priority lower than the batch's highest (no task of the batch could preempt any
//! other). The host checks every `preempt` answer again ([`super::validate`]).

use std::collections::HashMap;

use chrono::{DateTime, Utc};

use super::bindings::types as v1;
use super::bindings::types_v2 as v2;
use super::input::{PlacementInput, RunningTask};
use crate::model::{Assignment, Task, TaskStatus};

impl PlacementInput {
    /// Adds the running tasks a preempting policy may stop, from `running` (each task with its
    /// active assignment), ordered by worker, then priority (lowest first), then placement
    /// (newest first): the order a simple policy takes victims in.
    pub fn with_preemptible(mut self, running: &[(Task, Assignment)], now: DateTime<Utc>) -> Self {
        let Some(highest) = self.wit.tasks.priority.iter().max().copied() else {
            return self;
        };
        let mut offered: Vec<RunningTask> = running
            .iter()
            .filter(|(task, assignment)| {
                task.status == TaskStatus::Running
                    && task.preemptible
                    && !task.cancel_requested
                    // It can run again: a task on its last attempt is never preempted.
                    && task.attempts < task.max_attempts
                    && task.priority < highest
                    && !assignment.released
                    && assignment.is_attempt_of(task)
            })
            .filter_map(|(task, assignment)| {
                Some(RunningTask {
                    task_id: task.task_id.clone(),
                    user_id: task.user_id.clone(),
                    attempt: assignment.attempt,
                    worker: self.worker_index(&assignment.worker_id)?,
                    priority: task.priority,
                    request: assignment.request(),
                    age_s: ((now - assignment.assigned_at).num_milliseconds().max(0)) as f64
                        / 1000.0,
                })
            })
            .collect();
        offered.sort_by(|a, b| {
            (a.worker, a.priority)
                .cmp(&(b.worker, b.priority))
                .then(a.age_s.total_cmp(&b.age_s))
                .then_with(|| a.task_id.cmp(&b.task_id))
        });
        self.running = offered;
        self
    }

    /// The round in the shape of `cloudai:policy@0.2.0`: the same columns, plus the running
    /// tasks a policy may preempt.
    pub(crate) fn columns_v2(&self) -> v2::PlacementInput {
        let w = &self.wit.workers;
        let t = &self.wit.tasks;
        let mut strings = self.wit.strings.clone();
        let mut index: HashMap<String, u32> = HashMap::new();
        let mut intern = |s: &str, strings: &mut Vec<String>| -> u32 {
            if index.is_empty() {
                for (i, known) in strings.iter().enumerate() {
                    index.insert(known.clone(), u32::try_from(i).unwrap_or(u32::MAX));
                }
            }
            if let Some(&i) = index.get(s) {
                return i;
            }
            let i = u32::try_from(strings.len()).unwrap_or(u32::MAX);
            strings.push(s.to_string());
            index.insert(s.to_string(), i);
            i
        };
        let n = self.running.len();
        let mut running = v2::RunningColumns {
            worker: Vec::with_capacity(n),
            req_cpu: Vec::with_capacity(n),
            req_memory: Vec::with_capacity(n),
            req_storage: Vec::with_capacity(n),
            req_gpu: Vec::with_capacity(n),
            priority: Vec::with_capacity(n),
            age_s: Vec::with_capacity(n),
            id: Vec::with_capacity(n),
            user: Vec::with_capacity(n),
        };
        for r in &self.running {
            running.worker.push(r.worker);
            running.req_cpu.push(r.request.cpu);
            running.req_memory.push(r.request.memory);
            running.req_storage.push(r.request.storage);
            running.req_gpu.push(r.request.gpu);
            running.priority.push(r.priority);
            running.age_s.push(r.age_s);
            running.id.push(intern(&r.task_id, &mut strings));
            running.user.push(intern(&r.user_id, &mut strings));
        }
        v2::PlacementInput {
            strings,
            workers: v2::WorkerColumns {
                total_cpu: w.total_cpu.clone(),
                total_memory: w.total_memory.clone(),
                total_storage: w.total_storage.clone(),
                total_gpu: w.total_gpu.clone(),
                allocated_cpu: w.allocated_cpu.clone(),
                allocated_memory: w.allocated_memory.clone(),
                allocated_storage: w.allocated_storage.clone(),
                allocated_gpu: w.allocated_gpu.clone(),
                available_cpu: w.available_cpu.clone(),
                available_memory: w.available_memory.clone(),
                available_storage: w.available_storage.clone(),
                available_gpu: w.available_gpu.clone(),
                heartbeat_age_s: w.heartbeat_age_s.clone(),
                running_tasks: w.running_tasks.clone(),
                labels: labels_v2(&w.labels),
                attributes: w
                    .attributes
                    .iter()
                    .map(|a| v2::AttributeColumn {
                        name: a.name.clone(),
                        known: a.known.clone(),
                        values: a.values.clone(),
                    })
                    .collect(),
            },
            tasks: v2::TaskColumns {
                req_cpu: t.req_cpu.clone(),
                req_memory: t.req_memory.clone(),
                req_storage: t.req_storage.clone(),
                req_gpu: t.req_gpu.clone(),
                priority: t.priority.clone(),
                attempts: t.attempts.clone(),
                age_s: t.age_s.clone(),
                id: t.id.clone(),
                user: t.user.clone(),
                image: t.image.clone(),
                labels: labels_v2(&t.labels),
            },
            running,
        }
    }
}

/// An admission check in the 0.2.0 types (the same records as 0.1.0's).
pub(crate) fn admission_v2(
    task: &v1::AdmissionTask,
    usage: &v1::UserUsage,
) -> (v2::AdmissionTask, v2::UserUsage) {
    let resources = |r: &v1::Resources| v2::Resources {
        cpu: r.cpu,
        memory: r.memory,
        storage: r.storage,
        gpu: r.gpu,
    };
    (
        v2::AdmissionTask {
            id: task.id.clone(),
            user: task.user.clone(),
            image: task.image.clone(),
            request: resources(&task.request),
            priority: task.priority,
            labels: task.labels.clone(),
            attempts: task.attempts,
            age_s: task.age_s,
        },
        v2::UserUsage {
            running_tasks: usage.running_tasks,
            queued_tasks: usage.queued_tasks,
            pending_tasks: usage.pending_tasks,
            reserved: resources(&usage.reserved),
        },
    )
}

/// A 0.2.0 admission decision in the host's (0.1.0) type.
pub(crate) fn admission_decision_v1(decision: v2::AdmissionDecision) -> v1::AdmissionDecision {
    match decision {
        v2::AdmissionDecision::Accept => v1::AdmissionDecision::Accept,
        v2::AdmissionDecision::Reject(r) => v1::AdmissionDecision::Reject(r),
        v2::AdmissionDecision::Defer(r) => v1::AdmissionDecision::Defer(r),
    }
}

fn labels_v2(labels: &v1::LabelIndex) -> v2::LabelIndex {
    v2::LabelIndex {
        offsets: labels.offsets.clone(),
        pairs: labels.pairs.clone(),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::model::{Resources, Worker};

    fn worker(id: &str) -> Worker {
        Worker::new(
            id.to_string(),
            "127.0.0.1".to_string(),
            Resources::new(4.0, 8.0, 10.0, 0.0),
            BTreeMap::new(),
            String::new(),
        )
    }

    fn task(id: &str, user: &str, priority: i32) -> Task {
        let mut t = Task::new_pending(
            id.into(),
            user.into(),
            "img".into(),
            Resources::new(1.0, 1.0, 0.0, 0.0),
        );
        t.priority = priority;
        t
    }

    /// `task` running on `worker_id` since `age_s` seconds before `now`.
    fn running(
        id: &str,
        priority: i32,
        worker_id: &str,
        age_s: i64,
        now: DateTime<Utc>,
    ) -> (Task, Assignment) {
        let mut t = task(id, "bob", priority);
        t.status = TaskStatus::Running;
        let mut a = crate::model::Assignment::for_next_attempt(&t, worker_id, "claim", now);
        a.assigned_at = now - chrono::Duration::seconds(age_s);
        t.attempts = a.attempt;
        t.placed_by = a.placed_by.clone();
        (t, a)
    }

    #[test]
    fn offers_only_lower_priority_preemptible_tasks_on_candidates_in_victim_order() {
        let now = crate::model::now();
        let workers = [worker("w0"), worker("w1")];
        let batch = [task("urgent", "alice", 10), task("normal", "alice", 0)];
        let mut not_preemptible = running("keep", 0, "w0", 5, now);
        not_preemptible.0.preemptible = false;
        let mut stopping = running("stopping", 0, "w0", 5, now);
        stopping.0.cancel_requested = true;
        let all = vec![
            running("w1-old", 0, "w1", 100, now),
            running("w0-p5", 5, "w0", 1, now),
            running("w0-young", 0, "w0", 2, now),
            running("w0-old", 0, "w0", 50, now),
            running("equal", 10, "w0", 1, now),
            running("elsewhere", 0, "w-gone", 1, now),
            not_preemptible,
            stopping,
        ];
        let input = PlacementInput::build(&batch, &workers, now).with_preemptible(&all, now);
        let ids: Vec<&str> = input
            .running_tasks()
            .iter()
            .map(|r| r.task_id.as_str())
            .collect();
        assert_eq!(ids, ["w0-young", "w0-old", "w0-p5", "w1-old"]);
        let v2 = input.columns_v2();
        assert_eq!(v2.running.worker, [0, 0, 0, 1]);
        assert_eq!(v2.running.priority, [0, 0, 5, 0]);
        assert_eq!(v2.running.age_s, [2.0, 50.0, 1.0, 100.0]);
        let named: Vec<&str> = v2
            .running
            .id
            .iter()
            .map(|&i| v2.strings[i as usize].as_str())
            .collect();
        assert_eq!(named, ids);
        // A string already in the round (the user "alice" of the batch, "bob" once) is not
        // repeated.
        let bobs = v2.strings.iter().filter(|s| *s == "bob").count();
        assert_eq!(bobs, 1);
        assert_eq!(v2.tasks.priority, [10, 0]);
        assert_eq!(v2.workers.total_cpu, input.columns().workers.total_cpu);
    }

    #[test]
    fn a_batch_of_one_priority_offers_nothing_above_it() {
        let now = crate::model::now();
        let input = PlacementInput::build(&[task("t", "alice", 0)], &[worker("w0")], now)
            .with_preemptible(&[running("r", 0, "w0", 1, now)], now);
        assert!(input.running_tasks().is_empty());
        assert!(input.columns_v2().running.worker.is_empty());
    }
}
