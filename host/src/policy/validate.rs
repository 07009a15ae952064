//! Checks a placement policy's answer before the host acts on it: one decision per task,
//! every worker index in range, and no worker given more than it has available, counting the
//! batch's own earlier assignments.

use super::bindings::types::PlacementDecision;
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

/// The checks of [`validate_placement`] on decisions already converted.
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
    for (j, decision) in decisions.iter().enumerate() {
        let Decision::Assign { worker } = decision else {
            continue;
        };
        let i = *worker as usize;
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
        const NAMES: [&str; 4] = ["cpu", "memory", "storage", "gpu"];
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
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::policy::native::tests::round;

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

    #[test]
    fn no_tasks_no_workers_is_a_valid_empty_answer() {
        let empty = round(&[], &[]);
        assert_eq!(validate_placement(&empty, vec![]).unwrap(), vec![]);
    }
}
