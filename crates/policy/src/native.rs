//! The built-in native best-fit: decides a round when no placement policy is active, and
//! whenever the active one fails. Deterministic: same input, same decisions.
//!
//! It is the shipped `best-fit` guest's own logic (`policies/best-fit`, over the policy kit),
//! linked natively: one implementation, so that the fallback and the guest decide alike,
//! decision for decision and reason for reason. Tasks in queue order; a worker is feasible for
//! a task when its available capacity, minus what earlier tasks of the batch were given, covers
//! the request in all four resources; among feasible workers the one left with the least
//! capacity wins (the sum over the resources it has of `remaining / total`), ties to the lower
//! index. With no feasible worker the task waits if some worker's total could hold it, and is
//! unschedulable if none could (or waits when there are no workers at all: one may register).

use cloudai_policy_kit::{Decision as KitDecision, Tasks, Workers};

use super::bindings::types::PlacementInput as WitInput;
use super::input::{Decision, PlacementInput};

/// Decides a whole round with the native best-fit.
pub fn best_fit(input: &PlacementInput) -> Vec<Decision> {
    best_fit_columns(input.columns())
}

/// [`best_fit`] over the contract's columns.
pub fn best_fit_columns(input: &WitInput) -> Vec<Decision> {
    let w = &input.workers;
    let t = &input.tasks;
    let workers = Workers {
        total: [
            &w.total_cpu,
            &w.total_memory,
            &w.total_storage,
            &w.total_gpu,
        ],
        available: [
            &w.available_cpu,
            &w.available_memory,
            &w.available_storage,
            &w.available_gpu,
        ],
    };
    let tasks = Tasks {
        request: [&t.req_cpu, &t.req_memory, &t.req_storage, &t.req_gpu],
    };
    cloudai_policy_best_fit::logic::place(&workers, &tasks)
        .into_iter()
        .map(|decision| match decision {
            KitDecision::Assign(worker) => Decision::Assign { worker },
            KitDecision::Wait(reason) => Decision::Wait { reason },
            KitDecision::Unschedulable(reason) => Decision::Unschedulable { reason },
        })
        .collect()
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
pub(crate) mod tests {
    use super::*;
    use crate::bindings::types::{
        LabelIndex, PlacementInput as WitInput, TaskColumns, WorkerColumns,
    };
    use rand::{Rng, SeedableRng, rngs::StdRng};

    fn labels(n: usize) -> LabelIndex {
        LabelIndex {
            offsets: vec![0; n + 1],
            pairs: vec![],
        }
    }

    /// A round in the contract's shape from (total, available) per worker and requests.
    /// A worker as (total, available).
    pub(crate) type Row = ([f64; 4], [f64; 4]);

    pub(crate) fn round(workers: &[Row], tasks: &[[f64; 4]]) -> PlacementInput {
        let col = |f: &dyn Fn(&Row) -> f64| workers.iter().map(f).collect::<Vec<_>>();
        let tcol = |r: usize| tasks.iter().map(|t| t[r]).collect::<Vec<_>>();
        let n = workers.len();
        let m = tasks.len();
        let strings: Vec<String> = (0..n)
            .map(|i| format!("w{i}"))
            .chain((0..m).map(|j| format!("t{j}")))
            .collect();
        PlacementInput::from_columns(WitInput {
            strings,
            workers: WorkerColumns {
                total_cpu: col(&|w| w.0[0]),
                total_memory: col(&|w| w.0[1]),
                total_storage: col(&|w| w.0[2]),
                total_gpu: col(&|w| w.0[3]),
                allocated_cpu: col(&|w| w.0[0] - w.1[0]),
                allocated_memory: col(&|w| w.0[1] - w.1[1]),
                allocated_storage: col(&|w| w.0[2] - w.1[2]),
                allocated_gpu: col(&|w| w.0[3] - w.1[3]),
                available_cpu: col(&|w| w.1[0]),
                available_memory: col(&|w| w.1[1]),
                available_storage: col(&|w| w.1[2]),
                available_gpu: col(&|w| w.1[3]),
                heartbeat_age_s: vec![1.0; n],
                running_tasks: vec![0; n],
                labels: labels(n),
                attributes: vec![],
            },
            tasks: TaskColumns {
                req_cpu: tcol(0),
                req_memory: tcol(1),
                req_storage: tcol(2),
                req_gpu: tcol(3),
                priority: vec![0; m],
                attempts: vec![0; m],
                age_s: vec![0.0; m],
                id: (n as u32..(n + m) as u32).collect(),
                user: vec![0; m],
                image: vec![0; m],
                labels: labels(m),
            },
        })
    }

    /// A random cluster of `n` workers and `m` tasks, amounts multiples of 1/4 (so exact).
    pub(crate) fn random_round(seed: u64, n: usize, m: usize) -> PlacementInput {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut q = |max: u32| f64::from(rng.random_range(0..=max * 4)) / 4.0;
        let workers: Vec<([f64; 4], [f64; 4])> = (0..n)
            .map(|_| {
                let total = [
                    q(16) + 1.0,
                    q(64) + 1.0,
                    q(500) + 1.0,
                    if q(1) > 0.5 { q(4) } else { 0.0 },
                ];
                let frac = [q(1), q(1), q(1), q(1)];
                let avail: Vec<f64> = total
                    .iter()
                    .zip(frac)
                    .map(|(t, f)| (t * f * 4.0).floor() / 4.0)
                    .collect();
                (total, [avail[0], avail[1], avail[2], avail[3]])
            })
            .collect();
        let tasks: Vec<[f64; 4]> = (0..m)
            .map(|_| [q(4), q(8), q(50), if q(1) > 0.75 { q(1) } else { 0.0 }])
            .collect();
        round(&workers, &tasks)
    }

    fn assign(i: u32) -> Decision {
        Decision::Assign { worker: i }
    }

    #[test]
    fn best_fit_prefers_the_tightest_worker() {
        let input = round(
            &[
                ([8.0, 8.0, 8.0, 0.0], [8.0, 8.0, 8.0, 0.0]),
                ([8.0, 8.0, 8.0, 0.0], [2.0, 2.0, 2.0, 0.0]),
                ([8.0, 8.0, 8.0, 0.0], [4.0, 4.0, 4.0, 0.0]),
            ],
            &[[1.0, 1.0, 1.0, 0.0]],
        );
        assert_eq!(best_fit(&input), vec![assign(1)]);
    }

    #[test]
    fn best_fit_keeps_gpu_workers_free_for_gpu_tasks() {
        let input = round(
            &[
                ([8.0, 8.0, 8.0, 2.0], [8.0, 8.0, 8.0, 2.0]),
                ([16.0, 16.0, 16.0, 0.0], [16.0, 16.0, 16.0, 0.0]),
            ],
            &[[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 1.0, 1.0]],
        );
        assert_eq!(best_fit(&input), vec![assign(1), assign(0)]);
    }

    #[test]
    fn best_fit_accounts_for_its_own_assignments_within_the_batch() {
        let input = round(
            &[([4.0, 4.0, 4.0, 0.0], [3.0, 3.0, 3.0, 0.0])],
            &[
                [2.0, 1.0, 1.0, 0.0],
                [2.0, 1.0, 1.0, 0.0],
                [1.0, 1.0, 1.0, 0.0],
            ],
        );
        let d = best_fit(&input);
        assert_eq!(d[0], assign(0));
        assert!(matches!(d[1], Decision::Wait { .. }), "{d:?}");
        assert_eq!(d[2], assign(0));
    }

    #[test]
    fn best_fit_says_unschedulable_only_when_no_worker_could_ever_hold_the_task() {
        let input = round(
            &[([4.0, 4.0, 4.0, 0.0], [0.0, 0.0, 0.0, 0.0])],
            &[[4.0, 4.0, 4.0, 0.0], [4.0, 4.0, 4.0, 1.0]],
        );
        let d = best_fit(&input);
        assert!(matches!(d[0], Decision::Wait { .. }), "{d:?}");
        assert!(matches!(d[1], Decision::Unschedulable { .. }), "{d:?}");
        let empty = round(&[], &[[1.0, 1.0, 1.0, 0.0]]);
        assert!(matches!(best_fit(&empty)[0], Decision::Wait { .. }));
    }

    #[test]
    fn best_fit_breaks_ties_by_lowest_index_and_is_deterministic() {
        let same = ([4.0, 4.0, 4.0, 0.0], [4.0, 4.0, 4.0, 0.0]);
        let input = round(&[same, same, same], &[[1.0, 1.0, 1.0, 0.0]]);
        assert_eq!(best_fit(&input), vec![assign(0)]);
        let r = random_round(7, 100, 50);
        assert_eq!(best_fit(&r), best_fit(&r));
    }

    #[test]
    fn best_fit_answers_always_pass_validation() {
        for seed in 0..50 {
            let r = random_round(seed, 20, 30);
            let d = best_fit(&r);
            crate::validate::check_decisions(&r, &d).unwrap_or_else(|e| panic!("seed {seed}: {e}"));
        }
    }
}
