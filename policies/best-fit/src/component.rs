//! WebAssembly glue: the WIT bindings, the column views handed to [`crate::logic`], and the
//! component's exports.
// Natively (tests, clippy) nothing calls the exports: they only link into a Wasm module.
#![cfg_attr(not(target_arch = "wasm32"), allow(dead_code))]

#[allow(unsafe_code)]
mod bindings {
    wit_bindgen::generate!({ path: "../../wit", world: "placement" });
}

use bindings::cloudai::policy::types::{PlacementDecision, PlacementInput};
use cloudai_policy_kit::{Decision, Tasks, Workers};

struct Component;

impl bindings::exports::cloudai::policy::config::Guest for Component {
    fn configure(_config: String) -> Result<(), String> {
        Ok(())
    }
}

impl bindings::Guest for Component {
    fn place(input: PlacementInput) -> Vec<PlacementDecision> {
        let (w, t) = (&input.workers, &input.tasks);
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
        crate::logic::place(&workers, &tasks)
            .into_iter()
            .map(to_wit)
            .collect()
    }
}

fn to_wit(d: Decision) -> PlacementDecision {
    match d {
        Decision::Assign(w) => PlacementDecision::Assign(w),
        Decision::Wait(r) => PlacementDecision::Wait(r),
        Decision::Unschedulable(r) => PlacementDecision::Unschedulable(r),
    }
}

// Export symbol names such as `cloudai:policy/config@0.1.0#configure` are only valid in a Wasm
// module; a native cdylib's linker script rejects them.
#[cfg(target_arch = "wasm32")]
#[allow(unsafe_code)]
mod export {
    use super::{Component, bindings};
    bindings::export!(Component with_types_in bindings);
}

#[cfg(test)]
mod tests {
    use super::Component;
    use super::bindings::Guest;
    use super::bindings::cloudai::policy::types::{
        LabelIndex, PlacementDecision, PlacementInput, TaskColumns, WorkerColumns,
    };

    fn labels(n: usize) -> LabelIndex {
        LabelIndex {
            offsets: vec![0; n + 1],
            pairs: Vec::new(),
        }
    }

    /// Rows `[cpu, memory, storage, gpu]` into the WIT columns.
    fn input(total: &[[f64; 4]], free: &[[f64; 4]], req: &[[f64; 4]]) -> PlacementInput {
        let col = |rows: &[[f64; 4]], r: usize| rows.iter().map(|x| x[r]).collect::<Vec<_>>();
        let used: Vec<[f64; 4]> = total
            .iter()
            .zip(free)
            .map(|(t, f)| [t[0] - f[0], t[1] - f[1], t[2] - f[2], t[3] - f[3]])
            .collect();
        let (nw, nt) = (total.len(), req.len());
        PlacementInput {
            strings: vec!["w".into()],
            workers: WorkerColumns {
                total_cpu: col(total, 0),
                total_memory: col(total, 1),
                total_storage: col(total, 2),
                total_gpu: col(total, 3),
                allocated_cpu: col(&used, 0),
                allocated_memory: col(&used, 1),
                allocated_storage: col(&used, 2),
                allocated_gpu: col(&used, 3),
                available_cpu: col(free, 0),
                available_memory: col(free, 1),
                available_storage: col(free, 2),
                available_gpu: col(free, 3),
                heartbeat_age_s: vec![0.0; nw],
                running_tasks: vec![0; nw],
                labels: labels(nw),
                attributes: Vec::new(),
            },
            tasks: TaskColumns {
                req_cpu: col(req, 0),
                req_memory: col(req, 1),
                req_storage: col(req, 2),
                req_gpu: col(req, 3),
                priority: vec![0; nt],
                attempts: vec![0; nt],
                age_s: vec![0.0; nt],
                id: vec![0; nt],
                user: vec![0; nt],
                image: vec![0; nt],
                labels: labels(nt),
            },
        }
    }

    #[test]
    fn the_glue_maps_every_column_to_its_resource() {
        let total = [[4.0, 8.0, 0.0, 0.0], [4.0, 8.0, 10.0, 1.0]];
        let free = [[4.0, 8.0, 0.0, 0.0], [4.0, 8.0, 4.0, 1.0]];
        let req = [
            [1.0, 1.0, 3.0, 1.0],
            [1.0, 1.0, 5.0, 0.0],
            [5.0, 1.0, 0.0, 0.0],
            [1.0, 9.0, 0.0, 0.0],
            [1.0, 1.0, 0.0, 2.0],
        ];
        let d = Component::place(input(&total, &free, &req));
        let text = |d: &PlacementDecision| match d {
            PlacementDecision::Assign(w) => format!("assign {w}"),
            PlacementDecision::Wait(r) => format!("wait: {r}"),
            PlacementDecision::Unschedulable(r) => format!("unschedulable: {r}"),
        };
        let got: Vec<String> = d.iter().map(text).collect();
        assert_eq!(
            got,
            [
                "assign 1",
                "wait: no worker has 5 GB storage free (largest free: 1 GB)",
                "unschedulable: no worker has 5 CPU in total (largest: 4 CPU)",
                "unschedulable: no worker has 9 GB memory in total (largest: 8 GB)",
                "unschedulable: no worker has 2 GPU in total (largest: 1 GPU)",
            ]
        );
    }
}
