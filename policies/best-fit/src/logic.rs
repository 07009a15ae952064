//! Best-fit (bin-packing): each task goes to the fitting worker left with the least capacity.
//!
//! Score of a worker = sum over the resources it has (total > 0) of `remaining / total` after
//! placing the task, where `remaining = available - request`; lowest score wins, lowest index
//! on ties. Packing tight keeps large workers whole for large tasks.

use cloudai_policy_kit::{
    Candidate, Decision, Rank, Ranking, Tasks, Workers, remaining_fraction_sum,
};

/// The best-fit ranking.
pub struct BestFit;

impl Ranking for BestFit {
    fn rank(&self, _request: &[f64; 4], candidate: &Candidate) -> Option<Rank> {
        Some(Rank::score(remaining_fraction_sum(candidate)))
    }
}

/// One decision per task, in order.
pub fn place(workers: &Workers<'_>, tasks: &Tasks<'_>) -> Vec<Decision> {
    cloudai_policy_kit::place(workers, tasks, &BestFit)
}

#[cfg(test)]
mod tests {
    use super::BestFit;
    use cloudai_policy_kit::Decision::{Assign, Unschedulable, Wait};
    use cloudai_policy_kit::testing::{busy, idle, run};

    #[test]
    fn picks_the_worker_left_with_least_capacity() {
        let workers = [
            idle([16.0, 64.0, 100.0, 0.0]),
            idle([4.0, 8.0, 100.0, 0.0]),
            idle([8.0, 16.0, 100.0, 0.0]),
        ];
        assert_eq!(
            run(&BestFit, &workers, &[[4.0, 8.0, 10.0, 0.0]]),
            vec![Assign(1)]
        );
    }

    #[test]
    fn packs_a_batch_onto_one_worker_before_opening_another() {
        let workers = [
            idle([8.0, 16.0, 0.0, 0.0]),
            busy([8.0, 16.0, 0.0, 0.0], [4.0, 8.0, 0.0, 0.0]),
        ];
        let d = run(&BestFit, &workers, &[[2.0, 4.0, 0.0, 0.0]; 3]);
        // Worker 1 is fuller; it takes two tasks, then the third goes to worker 0.
        assert_eq!(d, vec![Assign(1), Assign(1), Assign(0)]);
    }

    #[test]
    fn ties_go_to_the_lowest_index() {
        let workers = [idle([4.0, 4.0, 0.0, 0.0]), idle([4.0, 4.0, 0.0, 0.0])];
        assert_eq!(
            run(&BestFit, &workers, &[[1.0, 1.0, 0.0, 0.0]]),
            vec![Assign(0)]
        );
    }

    #[test]
    fn waits_or_fails_with_a_reason() {
        let workers = [busy([4.0, 8.0, 0.0, 0.0], [1.0, 2.5, 0.0, 0.0])];
        let d = run(
            &BestFit,
            &workers,
            &[[1.0, 4.0, 0.0, 0.0], [1.0, 1.0, 0.0, 1.0]],
        );
        assert_eq!(
            d[0],
            Wait("no worker has 4 GB memory free (largest free: 2.5 GB)".into())
        );
        assert_eq!(
            d[1],
            Unschedulable("no worker has 1 GPU in total (largest: 0 GPU)".into())
        );
    }
}
