//! Spread: each task goes to the least loaded fitting worker.
//!
//! Score of a worker = its load after placing the task, measured on its most loaded resource:
//! max over the resources it has (total > 0) of `(total - available + request) / total`.
//! Lowest score wins, lowest index on ties. Spreading keeps headroom everywhere and limits the
//! blast radius of losing one worker.

use cloudai_policy_kit::{Candidate, Decision, Rank, Ranking, Tasks, Workers, max_load_after};

/// The spread ranking.
pub struct Spread;

impl Ranking for Spread {
    fn rank(&self, _request: &[f64; 4], candidate: &Candidate) -> Option<Rank> {
        Some(Rank::score(max_load_after(candidate)))
    }
}

/// One decision per task, in order.
pub fn place(workers: &Workers<'_>, tasks: &Tasks<'_>) -> Vec<Decision> {
    cloudai_policy_kit::place(workers, tasks, &Spread)
}

#[cfg(test)]
mod tests {
    use super::Spread;
    use cloudai_policy_kit::Decision::{Assign, Wait};
    use cloudai_policy_kit::testing::{busy, idle, run};

    #[test]
    fn picks_the_least_loaded_worker() {
        let workers = [
            busy([8.0, 16.0, 0.0, 0.0], [4.0, 16.0, 0.0, 0.0]),
            busy([8.0, 16.0, 0.0, 0.0], [8.0, 4.0, 0.0, 0.0]),
            busy([8.0, 16.0, 0.0, 0.0], [6.0, 12.0, 0.0, 0.0]),
        ];
        // Loads after a 1 CPU / 1 GB task: w0 0.625 (cpu), w1 0.8125 (memory), w2 0.375.
        assert_eq!(
            run(&Spread, &workers, &[[1.0, 1.0, 0.0, 0.0]]),
            vec![Assign(2)]
        );
    }

    #[test]
    fn a_batch_is_spread_round_robin_over_equal_workers() {
        let workers = [
            idle([4.0, 8.0, 0.0, 0.0]),
            idle([4.0, 8.0, 0.0, 0.0]),
            idle([4.0, 8.0, 0.0, 0.0]),
        ];
        let d = run(&Spread, &workers, &[[1.0, 1.0, 0.0, 0.0]; 4]);
        assert_eq!(d, vec![Assign(0), Assign(1), Assign(2), Assign(0)]);
    }

    #[test]
    fn load_is_relative_to_each_workers_size() {
        // Same free CPU, but after the task the small worker is 75% loaded, the big one 94%.
        let workers = [
            busy([4.0, 8.0, 0.0, 0.0], [2.0, 8.0, 0.0, 0.0]),
            busy([16.0, 8.0, 0.0, 0.0], [2.0, 8.0, 0.0, 0.0]),
        ];
        assert_eq!(
            run(&Spread, &workers, &[[1.0, 0.0, 0.0, 0.0]]),
            vec![Assign(0)]
        );
    }

    #[test]
    fn waits_when_no_worker_has_room() {
        let workers = [busy([4.0, 8.0, 0.0, 0.0], [0.5, 8.0, 0.0, 0.0])];
        assert_eq!(
            run(&Spread, &workers, &[[1.0, 0.0, 0.0, 0.0]]),
            vec![Wait(
                "no worker has 1 CPU free (largest free: 0.5 CPU)".into()
            )]
        );
    }
}
