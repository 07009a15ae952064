//! WebAssembly glue: the WIT bindings of the `placement` world, the configuration kept by the
//! instance, and the `place` export that hands [`crate::logic`] plain views of the round (the
//! runtime history found among the worker attributes, each task's type and SLA label).
// Natively (tests, clippy) nothing calls the exports: they only link into a Wasm module.
#![cfg_attr(not(target_arch = "wasm32"), allow(dead_code))]

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};

#[allow(unsafe_code)]
mod bindings {
    ::wit_bindgen::generate!({ path: "../../wit", world: "placement" });
}

use bindings::cloudai::policy::types::{
    AttributeColumn, LabelIndex, PlacementDecision, PlacementInput,
};
use cloudai_policy_kit::{Decision, Tasks, Workers};

use crate::logic::{self, Attribute, Config, History, Round, SLA_LABEL, TASK_TYPE_LABEL, TaskInfo};

const MEAN_RUNTIME: &str = "mean-runtime-s:";
const RUNS: &str = "runs:";

/// The configuration `configure` accepted; the host calls it first on every fresh instance.
static CONFIG: Mutex<Option<Config>> = Mutex::new(None);

struct Component;

impl bindings::exports::cloudai::policy::config::Guest for Component {
    fn configure(config: String) -> Result<(), String> {
        let config = Config::parse(&config)?;
        *CONFIG.lock().unwrap_or_else(PoisonError::into_inner) = Some(config);
        Ok(())
    }
}

impl bindings::Guest for Component {
    fn place(input: PlacementInput) -> Vec<PlacementDecision> {
        let config = CONFIG
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
            .unwrap_or_default();
        logic::place(&round(&input), &config)
            .into_iter()
            .map(|d| match d {
                Decision::Assign(w) => PlacementDecision::Assign(w),
                Decision::Wait(r) => PlacementDecision::Wait(r),
                Decision::Unschedulable(r) => PlacementDecision::Unschedulable(r),
            })
            .collect()
    }
}

fn attribute(a: &AttributeColumn) -> Attribute<'_> {
    Attribute {
        known: &a.known,
        values: &a.values,
    }
}

fn round(input: &PlacementInput) -> Round<'_> {
    let (w, t) = (&input.workers, &input.tasks);
    let named = |name: &str| w.attributes.iter().find(|a| a.name == name);
    let mut history = HashMap::new();
    for a in &w.attributes {
        if let Some(task_type) = a.name.strip_prefix(MEAN_RUNTIME) {
            let runs = named(&format!("{RUNS}{task_type}")).map(attribute);
            history.insert(
                task_type,
                History {
                    mean_runtime_s: attribute(a),
                    runs,
                },
            );
        }
    }
    let string = |i: u32| input.strings.get(i as usize).map(String::as_str);
    let info = (0..t.req_cpu.len())
        .map(|i| {
            let label = |key: &str| label(&t.labels, i, key, &input.strings);
            TaskInfo {
                task_type: label(TASK_TYPE_LABEL)
                    .or_else(|| t.image.get(i).and_then(|s| string(*s)))
                    .unwrap_or(""),
                sla_multiplier: label(SLA_LABEL)
                    .and_then(|v| v.trim().parse::<f64>().ok())
                    .filter(|k| k.is_finite() && *k > 0.0),
                age_s: t.age_s.get(i).copied().unwrap_or(0.0),
            }
        })
        .collect();
    Round {
        workers: Workers {
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
        },
        tasks: Tasks {
            request: [&t.req_cpu, &t.req_memory, &t.req_storage, &t.req_gpu],
        },
        info,
        cpu_utilisation: named("cpu-utilisation").map(attribute),
        history,
    }
}

/// The value of entity `i`'s label `key`, if it has one.
fn label<'a>(labels: &LabelIndex, i: usize, key: &str, strings: &'a [String]) -> Option<&'a str> {
    let start = *labels.offsets.get(i)? as usize;
    let end = *labels.offsets.get(i + 1)? as usize;
    let s = |i: u32| strings.get(i as usize).map(String::as_str);
    labels
        .pairs
        .get(start..end)?
        .iter()
        .find(|(k, _)| s(*k) == Some(key))
        .and_then(|(_, v)| s(*v))
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
        AttributeColumn, LabelIndex, PlacementDecision, PlacementInput, TaskColumns, WorkerColumns,
    };

    /// Two workers, worker 0 half allocated (best-fit's choice); the history says tasks of
    /// type "train" ran 4x faster on worker 1, and nothing about the unlabelled task's image.
    fn input(task_labels: LabelIndex, age_s: f64) -> PlacementInput {
        let two = |x: f64| vec![x, x];
        let attribute = |name: &str, values: Vec<f64>| AttributeColumn {
            name: name.into(),
            known: vec![true, true],
            values,
        };
        PlacementInput {
            strings: vec![
                "task-type".into(),
                "train".into(),
                "img:1".into(),
                "sla-multiplier".into(),
                "1.2".into(),
            ],
            workers: WorkerColumns {
                total_cpu: two(8.0),
                total_memory: two(16.0),
                total_storage: two(0.0),
                total_gpu: two(0.0),
                allocated_cpu: vec![4.0, 0.0],
                allocated_memory: two(0.0),
                allocated_storage: two(0.0),
                allocated_gpu: two(0.0),
                available_cpu: vec![4.0, 8.0],
                available_memory: two(16.0),
                available_storage: two(0.0),
                available_gpu: two(0.0),
                heartbeat_age_s: two(0.0),
                running_tasks: vec![0, 0],
                labels: LabelIndex {
                    offsets: vec![0, 0, 0],
                    pairs: Vec::new(),
                },
                attributes: vec![
                    attribute("cpu-utilisation", vec![0.0, 0.9]),
                    attribute("mean-runtime-s:train", vec![40.0, 10.0]),
                    attribute("runs:train", vec![20.0, 20.0]),
                ],
            },
            tasks: TaskColumns {
                req_cpu: vec![1.0, 1.0],
                req_memory: vec![1.0, 1.0],
                req_storage: vec![0.0, 0.0],
                req_gpu: vec![0.0, 0.0],
                priority: vec![0, 0],
                attempts: vec![0, 0],
                age_s: vec![age_s, age_s],
                id: vec![2, 2],
                user: vec![2, 2],
                image: vec![2, 2],
                labels: task_labels,
            },
        }
    }

    #[test]
    fn the_glue_reads_task_types_sla_labels_and_history_from_the_attributes() {
        // Task 0 is a "train" task: worker 1 runs it 4x faster despite its measured load.
        // Task 1 has no type label, so its type is its image, with no history: best-fit
        // packs it onto worker 0.
        let labelled = LabelIndex {
            offsets: vec![0, 1, 1],
            pairs: vec![(0, 1)],
        };
        let d: Vec<Option<u32>> = Component::place(input(labelled, 0.0))
            .into_iter()
            .map(|d| match d {
                PlacementDecision::Assign(w) => Some(w),
                _ => None,
            })
            .collect();
        assert_eq!(d, vec![Some(1), Some(0)]);
    }

    #[test]
    fn configure_refuses_a_bad_configuration() {
        use super::bindings::exports::cloudai::policy::config::Guest as Config;
        assert!(Component::configure("{\"sla_multiplier\": -1}".into()).is_err());
        assert!(Component::configure("{}".into()).is_ok());
    }
}
