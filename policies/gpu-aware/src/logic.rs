//! GPU-aware: GPU workers are kept for GPU tasks.
//!
//! A task requesting GPUs goes to the best-fitting GPU worker (the only ones that can hold it).
//! A task requesting no GPU prefers workers without GPUs (tier 0) and uses a GPU worker (tier 1)
//! only when no GPU-less worker has room; within a tier, best-fit decides: the lowest sum over
//! the resources a worker has of `remaining / total` after placement, lowest index on ties.

use cloudai_policy_kit::{
    Candidate, Decision, Rank, Ranking, Tasks, Workers, remaining_fraction_sum,
};

const GPU: usize = 3;

/// The GPU-aware ranking.
pub struct GpuAware;

impl Ranking for GpuAware {
    fn rank(&self, request: &[f64; 4], candidate: &Candidate) -> Option<Rank> {
        let gpu_worker = candidate.total[GPU] > 0.0;
        // A GPU task only ever fits GPU workers, so only CPU-only tasks need the tiering.
        let tier = u32::from(request[GPU] == 0.0 && gpu_worker);
        Some(Rank {
            tier,
            score: remaining_fraction_sum(candidate),
        })
    }
}

/// One decision per task, in order.
pub fn place(workers: &Workers<'_>, tasks: &Tasks<'_>) -> Vec<Decision> {
    cloudai_policy_kit::place(workers, tasks, &GpuAware)
}

#[cfg(test)]
mod tests {
    use super::GpuAware;
    use cloudai_policy_kit::Decision::{Assign, Unschedulable, Wait};
    use cloudai_policy_kit::testing::{busy, idle, run};

    const GPU_BOX: [f64; 4] = [16.0, 64.0, 100.0, 4.0];
    const CPU_BOX: [f64; 4] = [16.0, 64.0, 100.0, 0.0];

    #[test]
    fn cpu_tasks_avoid_gpu_workers_even_when_these_fit_tighter() {
        // The GPU worker is fuller (a tighter best-fit), yet the CPU-only task skips it.
        let workers = [busy(GPU_BOX, [4.0, 16.0, 100.0, 4.0]), idle(CPU_BOX)];
        assert_eq!(
            run(&GpuAware, &workers, &[[2.0, 4.0, 0.0, 0.0]]),
            vec![Assign(1)]
        );
    }

    #[test]
    fn cpu_tasks_overflow_onto_gpu_workers_only_when_nothing_else_fits() {
        let workers = [idle(GPU_BOX), busy(CPU_BOX, [2.0, 64.0, 100.0, 0.0])];
        let d = run(&GpuAware, &workers, &[[2.0, 1.0, 0.0, 0.0]; 2]);
        assert_eq!(d, vec![Assign(1), Assign(0)]);
    }

    #[test]
    fn gpu_tasks_best_fit_among_gpu_workers() {
        let workers = [
            idle(CPU_BOX),
            idle(GPU_BOX),
            busy([16.0, 64.0, 100.0, 2.0], [16.0, 64.0, 100.0, 1.0]),
        ];
        let d = run(
            &GpuAware,
            &workers,
            &[[1.0, 1.0, 0.0, 1.0], [1.0, 1.0, 0.0, 1.0]],
        );
        // Worker 2 has one GPU left: the tightest fit; then only worker 1 has one.
        assert_eq!(d, vec![Assign(2), Assign(1)]);
    }

    #[test]
    fn gpu_tasks_wait_for_gpus_or_fail_without_gpu_workers() {
        let workers = [busy(GPU_BOX, [16.0, 64.0, 100.0, 1.0])];
        assert_eq!(
            run(&GpuAware, &workers, &[[1.0, 1.0, 0.0, 2.0]]),
            vec![Wait(
                "no worker has 2 GPU free (largest free: 1 GPU)".into()
            )]
        );
        assert_eq!(
            run(&GpuAware, &[idle(CPU_BOX)], &[[1.0, 1.0, 0.0, 1.0]]),
            vec![Unschedulable(
                "no worker has 1 GPU in total (largest: 0 GPU)".into()
            )]
        );
    }
}
