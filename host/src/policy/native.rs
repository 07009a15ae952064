//! The built-in native best-fit: decides a round when no placement policy is active, and
//! whenever the active one fails. Deterministic: same input, same decisions.
//!
//! The algorithm (the shipped `best-fit` guest implements the same one, so that the two can
//! be compared decision for decision): tasks in queue order; a worker is feasible for a task
//! when its available capacity, minus what earlier tasks of the batch were given, covers the
//! request in all four resources; among feasible workers the one with the least remaining
//! capacity after placement wins, scored as the sum over resources the worker has
//! (`total > 0`) of `(remaining - request) / total`; ties go to the lower index. With no
//! feasible worker the task waits if some worker's total could hold it, and is unschedulable
//! if none could (or waits when there are no workers at all: one may register).

use super::bindings::types::{PlacementInput as WitInput, TaskColumns};
use super::input::{Decision, PlacementInput};

/// Decides a whole round with the native best-fit.
pub fn best_fit(input: &PlacementInput) -> Vec<Decision> {
    best_fit_columns(input.columns())
}

/// [`best_fit`] over the contract's columns.
pub fn best_fit_columns(input: &WitInput) -> Vec<Decision> {
    let w = &input.workers;
    let t = &input.tasks;
    // Row-major copies with the inverse totals, as the `best-fit` guest does: one worker's
    // numbers side by side in the hot loop, a multiply instead of a divide per resource, and
    // the very same arithmetic as the guest, so that both decide alike to the last bit.
    let mut rows: Vec<Row> = (0..w.total_cpu.len())
        .map(|i| {
            let total = [
                w.total_cpu[i],
                w.total_memory[i],
                w.total_storage[i],
                w.total_gpu[i],
            ];
            Row {
                total,
                inv_total: total.map(|t| if t > 0.0 { 1.0 / t } else { 0.0 }),
                free: [
                    w.available_cpu[i],
                    w.available_memory[i],
                    w.available_storage[i],
                    w.available_gpu[i],
                ],
            }
        })
        .collect();
    (0..t.req_cpu.len())
        .map(|j| decide(request(t, j), &mut rows))
        .collect()
}

/// One worker in the round: what it has, and what is still free of it.
struct Row {
    total: [f64; 4],
    inv_total: [f64; 4],
    free: [f64; 4],
}

fn request(t: &TaskColumns, j: usize) -> [f64; 4] {
    [
        t.req_cpu[j],
        t.req_memory[j],
        t.req_storage[j],
        t.req_gpu[j],
    ]
}

fn covers(have: &[f64; 4], need: &[f64; 4]) -> bool {
    have.iter().zip(need).all(|(h, n)| h >= n)
}

fn decide(req: [f64; 4], rows: &mut [Row]) -> Decision {
    let mut best: Option<(usize, f64)> = None;
    for (i, row) in rows.iter().enumerate() {
        if !covers(&row.free, &req) {
            continue;
        }
        // The sum over resources of remaining / total; a resource the worker lacks has an
        // inverse total of 0 and adds nothing.
        let score = (row.free[0] - req[0]) * row.inv_total[0]
            + (row.free[1] - req[1]) * row.inv_total[1]
            + (row.free[2] - req[2]) * row.inv_total[2]
            + (row.free[3] - req[3]) * row.inv_total[3];
        if best.is_none_or(|(_, s)| score < s) {
            best = Some((i, score));
        }
    }
    match best {
        Some((i, _)) => {
            for (slot, r) in rows[i].free.iter_mut().zip(req) {
                *slot -= r;
            }
            Decision::Assign { worker: i as u32 }
        }
        None if rows.is_empty() => Decision::Wait {
            reason: "no worker is available".to_string(),
        },
        None if rows.iter().any(|row| covers(&row.total, &req)) => Decision::Wait {
            reason: "no worker has enough free capacity now".to_string(),
        },
        None => Decision::Unschedulable {
            reason: format!(
                "no worker is large enough for cpu {}, memory {} GB, storage {} GB, gpu {}",
                req[0], req[1], req[2], req[3]
            ),
        },
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
pub(crate) mod tests {
    use super::*;
    use crate::policy::bindings::types::{LabelIndex, PlacementInput as WitInput, WorkerColumns};
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
            crate::policy::validate::check_decisions(&r, &d)
                .unwrap_or_else(|e| panic!("seed {seed}: {e}"));
        }
    }
}
