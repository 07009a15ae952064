//! Checks a placement policy's answer before the host acts on it: one decision per task,
//! every worker index in range, no worker given more than it has available, counting the
//! batch's own earlier assignments, and every preemption (0.2.0) one the host may carry out.

use super::bindings::types::PlacementDecision;
use super::bindings::types_v2::PlacementDecision as PlacementDecisionV2;
use super::engine::truncate;
use super::error::{PolicyError, Result};
use super::input::{Decision, PlacementInput};

/// Longest reason kept from a guest (bytes); the rest is cut.
pub const MAX_REASON_BYTES: usize = 512;

/// Turns a guest's answer into checked decisions, or says what is wrong with it.
pub fn validate_placement(
    input: &PlacementInput,
    answer: Vec<PlacementDecision>,
) -> Result<Vec<Decision>> {
    let decisions: Vec<Decision> = answer
        .into_iter()
        .map(|d| match d {
            PlacementDecision::Assign(worker) => Decision::Assign { worker },
            PlacementDecision::Wait(reason) => Decision::Wait {
                reason: truncate(&reason, MAX_REASON_BYTES).to_string(),
            },
            PlacementDecision::Unschedulable(reason) => Decision::Unschedulable {
                reason: truncate(&reason, MAX_REASON_BYTES).to_string(),
            },
        })
        .collect();
    check_decisions(input, &decisions)?;
    Ok(decisions)
}

/// [`validate_placement`] for a `cloudai:policy@0.2.0` answer, which may preempt.
pub fn validate_placement_v2(
    input: &PlacementInput,
    answer: Vec<PlacementDecisionV2>,
) -> Result<Vec<Decision>> {
    let decisions: Vec<Decision> = answer
        .into_iter()
        .map(|d| match d {
            PlacementDecisionV2::Assign(worker) => Decision::Assign { worker },
            PlacementDecisionV2::Wait(reason) => Decision::Wait {
                reason: truncate(&reason, MAX_REASON_BYTES).to_string(),
            },
            PlacementDecisionV2::Unschedulable(reason) => Decision::Unschedulable {
                reason: truncate(&reason, MAX_REASON_BYTES).to_string(),
            },
            PlacementDecisionV2::Preempt(p) => Decision::Preempt {
                worker: p.worker,
                victims: p.victims,
            },
        })
        .collect();
    check_decisions(input, &decisions)?;
    Ok(decisions)
}

const NAMES: [&str; 4] = ["cpu", "memory", "storage", "gpu"];

/// The checks of [`validate_placement`] on decisions already converted: one decision per
/// task; every index in range; no worker given more than it has available, counting the
/// batch's earlier assignments; and every preemption legitimate: victims running on its
/// worker, of a lower priority than the task, named once in the whole answer, and enough
/// (with what the worker has left) to hold the task. A preemption frees nothing within the
/// round: its victims still hold their capacity until they have stopped.
pub(crate) fn check_decisions(input: &PlacementInput, decisions: &[Decision]) -> Result<()> {
    let tasks = input.task_count();
    if decisions.len() != tasks {
        return Err(PolicyError::InvalidAnswer(format!(
            "{} decisions for {} tasks",
            decisions.len(),
            tasks
        )));
    }
    let w = &input.columns().workers;
    let t = &input.columns().tasks;
    let workers = input.worker_count();
    // Remaining capacity per worker, touched only for workers that get something.
    let mut remaining: Vec<Option<[f64; 4]>> = vec![None; workers];
    let mut named = vec![false; input.running_tasks().len()];
    for (j, decision) in decisions.iter().enumerate() {
        let (worker, victims) = match decision {
            Decision::Assign { worker } => (*worker, None),
            Decision::Preempt { worker, victims } => (*worker, Some(victims)),
            Decision::Wait { .. } | Decision::Unschedulable { .. } => continue,
        };
        let i = worker as usize;
        let Some(slot) = remaining.get_mut(i) else {
            return Err(PolicyError::InvalidAnswer(format!(
                "task {j} assigned to worker {worker}, but there are {workers} workers"
            )));
        };
        let rem = slot.get_or_insert([
            w.available_cpu[i],
            w.available_memory[i],
            w.available_storage[i],
            w.available_gpu[i],
        ]);
        let req = [
            t.req_cpu[j],
            t.req_memory[j],
            t.req_storage[j],
            t.req_gpu[j],
        ];
        let Some(victims) = victims else {
            for r in 0..4 {
                if req[r] > rem[r] {
                    return Err(PolicyError::InvalidAnswer(format!(
                        "task {j} assigned to worker {worker}, which has {} {} left for a request of {} \
                         (after the batch's earlier assignments)",
                        rem[r], NAMES[r], req[r]
                    )));
                }
            }
            for r in 0..4 {
                rem[r] -= req[r];
            }
            continue;
        };
        if victims.is_empty() {
            return Err(PolicyError::InvalidAnswer(format!(
                "task {j} preempts nothing on worker {worker}: assign it instead"
            )));
        }
        let priority = t.priority[j];
        let mut freed = *rem;
        for &v in victims {
            let Some(victim) = input.running_task(v) else {
                return Err(PolicyError::InvalidAnswer(format!(
                    "task {j} preempts running task {v}, but there are {} running tasks",
                    named.len()
                )));
            };
            if victim.worker != worker {
                return Err(PolicyError::InvalidAnswer(format!(
                    "task {j} preempts running task {v} on worker {worker}, but it runs on worker {}",
                    victim.worker
                )));
            }
            if victim.priority >= priority {
                return Err(PolicyError::InvalidAnswer(format!(
                    "task {j} (priority {priority}) preempts running task {v} of priority {}: \
                     only a lower priority may be preempted",
                    victim.priority
                )));
            }
            if std::mem::replace(&mut named[v as usize], true) {
                return Err(PolicyError::InvalidAnswer(format!(
                    "running task {v} is preempted twice in one answer"
                )));
            }
            let r = victim.request;
            for (f, amount) in freed.iter_mut().zip([r.cpu, r.memory, r.storage, r.gpu]) {
                *f += amount;
            }
        }
        for r in 0..4 {
            if req[r] > freed[r] {
                return Err(PolicyError::InvalidAnswer(format!(
                    "task {j} preempts {} tasks on worker {worker}, which would then have {} {} \
                     for a request of {}",
                    victims.len(),
                    freed[r],
                    NAMES[r],
                    req[r]
                )));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
pub(crate) mod tests {
    use super::*;
    use crate::native::tests::round;

    fn two_workers() -> PlacementInput {
        round(
            &[
                ([4.0, 4.0, 4.0, 0.0], [2.0, 2.0, 2.0, 0.0]),
                ([8.0, 8.0, 8.0, 1.0], [8.0, 8.0, 8.0, 1.0]),
            ],
            &[[1.0, 1.0, 1.0, 0.0], [1.5, 1.0, 1.0, 0.0]],
        )
    }

    fn invalid(r: Result<Vec<Decision>>) -> String {
        match r {
            Err(PolicyError::InvalidAnswer(why)) => why,
            other => panic!("expected InvalidAnswer, got {other:?}"),
        }
    }

    #[test]
    fn accepts_a_valid_answer_and_cuts_long_reasons() {
        let long = "é".repeat(1000);
        let d = validate_placement(
            &two_workers(),
            vec![PlacementDecision::Assign(0), PlacementDecision::Wait(long)],
        )
        .unwrap();
        assert_eq!(d[0], Decision::Assign { worker: 0 });
        let Decision::Wait { reason } = &d[1] else {
            panic!("{d:?}")
        };
        assert!(reason.len() <= MAX_REASON_BYTES && !reason.is_empty());
    }

    #[test]
    fn refuses_the_wrong_number_of_decisions() {
        let why = invalid(validate_placement(
            &two_workers(),
            vec![PlacementDecision::Assign(1)],
        ));
        assert!(why.contains("1 decisions for 2 tasks"), "{why}");
        let why = invalid(validate_placement(
            &two_workers(),
            vec![PlacementDecision::Assign(1); 3],
        ));
        assert!(why.contains("3 decisions"), "{why}");
    }

    #[test]
    fn refuses_a_worker_index_out_of_range() {
        let why = invalid(validate_placement(
            &two_workers(),
            vec![PlacementDecision::Assign(0), PlacementDecision::Assign(2)],
        ));
        assert!(why.contains("worker 2, but there are 2 workers"), "{why}");
        invalid(validate_placement(
            &two_workers(),
            vec![
                PlacementDecision::Assign(u32::MAX),
                PlacementDecision::Wait(String::new()),
            ],
        ));
    }

    #[test]
    fn refuses_overcommit_counting_the_batch_own_assignments() {
        // Each task alone fits worker 0 (2 cpu free); both together (2.5 cpu) do not.
        let why = invalid(validate_placement(
            &two_workers(),
            vec![PlacementDecision::Assign(0), PlacementDecision::Assign(0)],
        ));
        assert!(why.contains("task 1") && why.contains("cpu"), "{why}");
        // A GPU worker cannot give a GPU it does not have.
        let gpu = round(
            &[([4.0, 4.0, 4.0, 0.0], [4.0, 4.0, 4.0, 0.0])],
            &[[1.0, 1.0, 1.0, 1.0]],
        );
        let why = invalid(validate_placement(&gpu, vec![PlacementDecision::Assign(0)]));
        assert!(why.contains("gpu"), "{why}");
        // Spread over both workers, it is fine.
        validate_placement(
            &two_workers(),
            vec![PlacementDecision::Assign(0), PlacementDecision::Assign(1)],
        )
        .unwrap();
    }

    /// Worker 0 full (0.5 cpu free) running three tasks of priorities 0, 0 and 7; a batch of
    /// one task of priority 5 asking for 2 cpu, then one of priority 0 asking for 0.5.
    pub(crate) fn full_worker() -> PlacementInput {
        use crate::model::{Assignment, Resources, Task, TaskStatus, Worker};
        let now = crate::model::now();
        let worker = Worker {
            allocated_cpu: 3.5,
            available_cpu: 0.5,
            ..Worker::new(
                "w0".into(),
                "127.0.0.1".into(),
                Resources::new(4.0, 8.0, 8.0, 0.0),
                Default::default(),
                String::new(),
            )
        };
        let task = |id: &str, priority: i32, cpu: f64| {
            let mut t = Task::new_pending(
                id.into(),
                "u".into(),
                "img".into(),
                Resources::new(cpu, 1.0, 0.0, 0.0),
            );
            t.priority = priority;
            t
        };
        let running: Vec<(Task, Assignment)> = [("r0", 0), ("r1", 0), ("r7", 7)]
            .into_iter()
            .map(|(id, priority)| {
                let mut t = task(id, priority, 1.0);
                let a = crate::model::Assignment::for_next_attempt(&t, "w0", "c", now);
                t.status = TaskStatus::Running;
                t.attempts = a.attempt;
                t.placed_by = a.placed_by.clone();
                (t, a)
            })
            .collect();
        PlacementInput::build(
            &[task("urgent", 5, 2.0), task("small", 0, 0.5)],
            &[worker],
            now,
        )
        .with_preemptible(&running, now)
    }

    fn preempt(worker: u32, victims: &[u32]) -> PlacementDecisionV2 {
        PlacementDecisionV2::Preempt(crate::bindings::types_v2::Preemption {
            worker,
            victims: victims.to_vec(),
        })
    }

    #[test]
    fn accepts_a_preemption_that_makes_room_and_keeps_its_capacity_held() {
        let input = full_worker();
        // r7 is of a higher priority than the batch's highest but one: not offered.
        assert_eq!(input.running_tasks().len(), 2);
        let d = validate_placement_v2(
            &input,
            vec![preempt(0, &[0, 1]), PlacementDecisionV2::Assign(0)],
        )
        .unwrap();
        assert_eq!(
            d[0],
            Decision::Preempt {
                worker: 0,
                victims: vec![0, 1]
            }
        );
        // The small task took the 0.5 cpu left: the preemption held none of it. Had the
        // victims' capacity been counted free for the round, a second preemption of the same
        // worker would pass; it does not (each victim is named once, and nothing is freed).
        let why = invalid(validate_placement_v2(
            &input,
            vec![preempt(0, &[0]), PlacementDecisionV2::Assign(0)],
        ));
        assert!(why.contains("would then have 1.5 cpu"), "{why}");
    }

    #[test]
    fn refuses_preemptions_the_host_may_not_carry_out() {
        let input = full_worker();
        let wait = || PlacementDecisionV2::Wait(String::new());
        for (answer, expected) in [
            (preempt(0, &[]), "preempts nothing"),
            (preempt(0, &[2]), "there are 2 running tasks"),
            (preempt(1, &[0]), "there are 1 workers"),
            (preempt(0, &[0, 0]), "preempted twice"),
            (preempt(0, &[0]), "would then have 1.5 cpu"),
        ] {
            let why = invalid(validate_placement_v2(&input, vec![answer, wait()]));
            assert!(why.contains(expected), "{why} (expected {expected})");
        }
        // The second task (priority 0) may not preempt a task of priority 0.
        let why = invalid(validate_placement_v2(
            &input,
            vec![wait(), preempt(0, &[0])],
        ));
        assert!(why.contains("only a lower priority"), "{why}");
        // Named once across the answer, not only within a decision.
        let two = invalid(validate_placement_v2(
            &input,
            vec![preempt(0, &[0, 1]), preempt(0, &[1])],
        ));
        assert!(two.contains("priority 0") || two.contains("twice"), "{two}");
    }

    #[test]
    fn no_tasks_no_workers_is_a_valid_empty_answer() {
        let empty = round(&[], &[]);
        assert_eq!(validate_placement(&empty, vec![]).unwrap(), vec![]);
    }
}
