//! First-fit: each task goes to the first worker, by index, with enough free capacity.
//!
//! The cheapest policy: every fitting worker ranks the same, so the scan stops at the first one
//! (the kit's lowest-index tie-break, without looking further).

use cloudai_policy_kit::{Candidate, Decision, Rank, Ranking, Tasks, Workers};

/// The first-fit ranking.
pub struct FirstFit;

impl Ranking for FirstFit {
    const FIRST_MATCH: bool = true;

    fn rank(&self, _request: &[f64; 4], _candidate: &Candidate) -> Option<Rank> {
        Some(Rank::score(0.0))
    }
}

/// One decision per task, in order.
pub fn place(workers: &Workers<'_>, tasks: &Tasks<'_>) -> Vec<Decision> {
    cloudai_policy_kit::place(workers, tasks, &FirstFit)
}

#[cfg(test)]
mod tests {
    use super::FirstFit;
    use cloudai_policy_kit::Decision::{Assign, Unschedulable, Wait};
    use cloudai_policy_kit::testing::{busy, idle, run};

    #[test]
    fn takes_the_first_worker_that_fits_even_if_a_later_one_fits_better() {
        let workers = [
            busy([8.0, 16.0, 0.0, 0.0], [1.0, 16.0, 0.0, 0.0]),
            idle([64.0, 256.0, 0.0, 0.0]),
            idle([2.0, 4.0, 0.0, 0.0]),
        ];
        assert_eq!(
            run(&FirstFit, &workers, &[[2.0, 4.0, 0.0, 0.0]]),
            vec![Assign(1)]
        );
    }

    #[test]
    fn moves_on_when_its_own_assignments_fill_a_worker() {
        let workers = [idle([2.0, 4.0, 0.0, 0.0]), idle([2.0, 4.0, 0.0, 0.0])];
        let d = run(&FirstFit, &workers, &[[1.0, 2.0, 0.0, 0.0]; 5]);
        assert_eq!(d[..4], [Assign(0), Assign(0), Assign(1), Assign(1)]);
        assert_eq!(d[4], Wait("no worker has 1 CPU free (largest free: 0 CPU), 2 GB memory free (largest free: 0 GB)".into()));
    }

    #[test]
    fn a_request_larger_than_every_worker_is_unschedulable() {
        let workers = [idle([2.0, 4.0, 50.0, 0.0])];
        assert_eq!(
            run(&FirstFit, &workers, &[[1.0, 1.0, 80.0, 0.0]]),
            vec![Unschedulable(
                "no worker has 80 GB storage in total (largest: 50 GB)".into()
            )]
        );
    }
}
