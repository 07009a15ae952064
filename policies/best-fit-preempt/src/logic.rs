//! Best-fit with preemption (contract 0.2.0): each task goes to the fitting worker left with
//! the least capacity, exactly as `best-fit` places it; a task that fits on no worker now
//! preempts running tasks of lower priority when that makes room.
//!
//! Placement: score of a worker = sum over the resources it has (total > 0) of
//! `remaining / total` after placing the task; lowest score wins, lowest index on ties.
//!
//! Preemption ([`cloudai_policy_kit::place_preempting`]): only for a task that fits no worker's
//! free capacity now but some worker's total. On each worker, the running tasks of strictly
//! lower priority not yet named by this batch are taken lowest priority first, then youngest
//! first, skipping any that frees none of what the task still lacks, until the worker's free
//! capacity (less the batch's assignments on it) plus theirs holds the task. The worker needing
//! the fewest victims wins, then the lowest highest victim priority, then the least total victim
//! age, then the lowest index. Victims are named once per batch and their capacity is not
//! reused within it; otherwise the task waits with best-fit's reason.

use cloudai_policy_kit::{
    Candidate, PreemptingDecision, Rank, Ranking, Running, Tasks, Workers, remaining_fraction_sum,
};

/// The best-fit ranking (the same as `best-fit`'s).
pub struct BestFit;

impl Ranking for BestFit {
    fn rank(&self, _request: &[f64; 4], candidate: &Candidate) -> Option<Rank> {
        Some(Rank::score(remaining_fraction_sum(candidate)))
    }
}

/// One decision per task, in order; `priority` is the tasks' priority column.
pub fn place(
    workers: &Workers<'_>,
    tasks: &Tasks<'_>,
    priority: &[i32],
    running: &Running<'_>,
) -> Vec<PreemptingDecision> {
    cloudai_policy_kit::place_preempting(workers, tasks, priority, running, &BestFit)
}

#[cfg(test)]
mod tests {
    use super::BestFit;
    use cloudai_policy_kit::Decision::{Assign, Unschedulable, Wait};
    use cloudai_policy_kit::PreemptingDecision::{self, Place, Preempt};
    use cloudai_policy_kit::testing::{busy, idle, run, run_preempting, running};

    #[test]
    fn places_as_best_fit_when_everything_fits() {
        let workers = [
            idle([16.0, 64.0, 100.0, 0.0]),
            busy([8.0, 16.0, 100.0, 0.0], [4.0, 8.0, 100.0, 0.0]),
            idle([4.0, 8.0, 100.0, 1.0]),
        ];
        let tasks = [
            [4.0, 8.0, 10.0, 0.0],
            [2.0, 4.0, 0.0, 0.0],
            [2.0, 4.0, 0.0, 0.0],
            [1.0, 1.0, 0.0, 1.0],
            [32.0, 1.0, 0.0, 0.0],
            [16.0, 64.0, 0.0, 0.0],
        ];
        let expected: Vec<PreemptingDecision> =
            run(&cloudai_policy_best_fit::logic::BestFit, &workers, &tasks)
                .into_iter()
                .map(Place)
                .collect();
        let low = [running(1, [4.0, 8.0, 0.0, 0.0], -5, 1.0)];
        let with_priority: Vec<([f64; 4], i32)> = tasks.iter().map(|t| (*t, 0)).collect();
        let got = run_preempting(&BestFit, &workers, &with_priority, &low);
        assert_eq!(got, expected);
        assert!(matches!(got[4], Place(Unschedulable(_))));
    }

    #[test]
    fn a_high_priority_task_preempts_the_fewest_lowest_priority_youngest_tasks() {
        let workers = [
            busy([8.0, 32.0, 0.0, 0.0], [0.0, 16.0, 0.0, 0.0]),
            busy([8.0, 32.0, 0.0, 0.0], [2.0, 16.0, 0.0, 0.0]),
        ];
        let r = [
            running(0, [4.0, 8.0, 0.0, 0.0], 0, 100.0),
            running(0, [4.0, 8.0, 0.0, 0.0], 0, 10.0),
            running(1, [2.0, 4.0, 0.0, 0.0], 0, 5.0),
            running(1, [4.0, 4.0, 0.0, 0.0], 3, 1.0),
            running(1, [2.0, 4.0, 0.0, 0.0], 10, 1.0),
        ];
        let d = run_preempting(
            &BestFit,
            &workers,
            &[([4.0, 4.0, 0.0, 0.0], 5), ([4.0, 4.0, 0.0, 0.0], 5)],
            &r,
        );
        // First task: worker 0 needs one victim (the younger of its two), and so does worker 1
        // with its 2 free CPU (its priority-0 task); same count, same priority, so the least
        // age wins: worker 1's 5 s. Second task: worker 1 has only its priority-3 task left
        // (the priority-10 one outranks the task), worker 0 still a priority-0 one: worker 0.
        assert_eq!(
            d,
            vec![
                Preempt {
                    worker: 1,
                    victims: vec![2]
                },
                Preempt {
                    worker: 0,
                    victims: vec![1]
                },
            ]
        );
    }

    #[test]
    fn waits_rather_than_stop_a_task_of_equal_or_higher_priority() {
        let workers = [busy([4.0, 8.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0])];
        let r = [running(0, [4.0, 8.0, 0.0, 0.0], 5, 1.0)];
        let d = run_preempting(&BestFit, &workers, &[([1.0, 1.0, 0.0, 0.0], 5)], &r);
        assert_eq!(
            d,
            vec![Place(Wait(
                "no worker has 1 CPU free (largest free: 0 CPU), 1 GB memory free \
                 (largest free: 0 GB)"
                    .into()
            ))]
        );
        // A later, lower-priority task that fits still gets free room on another worker.
        let workers = [
            busy([4.0, 8.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]),
            idle([2.0, 2.0, 0.0, 0.0]),
        ];
        let d = run_preempting(&BestFit, &workers, &[([1.0, 1.0, 0.0, 0.0], 0)], &r);
        assert_eq!(d, vec![Place(Assign(1))]);
    }
}
