//! WebAssembly glue: the WIT bindings, the configuration held by this instance, and the
//! component's exports.
// Natively (tests, clippy) nothing calls the exports: they only link into a Wasm module.
#![cfg_attr(not(target_arch = "wasm32"), allow(dead_code))]

use std::sync::{Mutex, PoisonError};

#[allow(unsafe_code)]
mod bindings {
    wit_bindgen::generate!({ path: "../../wit", world: "admission" });
}

use crate::logic::{Admission, Caps, admit};
use bindings::cloudai::policy::types::{AdmissionDecision, AdmissionTask, UserUsage};

/// The caps `configure` accepted; the host calls it first on every fresh instance.
static CAPS: Mutex<Caps> = Mutex::new(Caps { max: [None; 4] });

struct Component;

impl bindings::exports::cloudai::policy::config::Guest for Component {
    fn configure(config: String) -> Result<(), String> {
        let caps = Caps::from_json(&config)?;
        *CAPS.lock().unwrap_or_else(PoisonError::into_inner) = caps;
        Ok(())
    }
}

impl bindings::Guest for Component {
    fn admit(task: AdmissionTask, _usage: UserUsage) -> AdmissionDecision {
        let r = &task.request;
        let caps = CAPS.lock().unwrap_or_else(PoisonError::into_inner);
        match admit(&caps, &[r.cpu, r.memory, r.storage, r.gpu]) {
            Admission::Accept => AdmissionDecision::Accept,
            Admission::Reject(reason) => AdmissionDecision::Reject(reason),
        }
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
        AdmissionDecision, AdmissionTask, Resources, UserUsage,
    };
    use super::bindings::exports::cloudai::policy::config::Guest as Config;

    fn task(cpu: f64, memory: f64, storage: f64, gpu: f64) -> AdmissionTask {
        AdmissionTask {
            id: "t".into(),
            user: "u".into(),
            image: "busybox".into(),
            request: Resources {
                cpu,
                memory,
                storage,
                gpu,
            },
            priority: 0,
            labels: Vec::new(),
            attempts: 0,
            age_s: 0.0,
        }
    }

    fn usage() -> UserUsage {
        let none = Resources {
            cpu: 0.0,
            memory: 0.0,
            storage: 0.0,
            gpu: 0.0,
        };
        UserUsage {
            running_tasks: 0,
            queued_tasks: 0,
            pending_tasks: 0,
            reserved: none,
        }
    }

    fn text(d: AdmissionDecision) -> String {
        match d {
            AdmissionDecision::Accept => "accept".into(),
            AdmissionDecision::Reject(r) => format!("reject: {r}"),
            AdmissionDecision::Defer(r) => format!("defer: {r}"),
        }
    }

    // One test: the caps are instance-wide state, as they are in the component.
    #[test]
    fn configure_sets_the_caps_that_admit_applies_per_resource() {
        assert!(Component::configure(r#"{"max_memory": -2}"#.into()).is_err());
        assert_eq!(
            Component::configure(r#"{"max_storage": 10, "max_gpu": 0}"#.into()),
            Ok(())
        );
        assert_eq!(
            text(Component::admit(task(64.0, 512.0, 10.0, 0.0), usage())),
            "accept"
        );
        assert_eq!(
            text(Component::admit(task(1.0, 1.0, 11.0, 0.0), usage())),
            "reject: storage request of 11 GB exceeds the cap of 10 GB"
        );
        assert_eq!(
            text(Component::admit(task(1.0, 1.0, 0.0, 1.0), usage())),
            "reject: gpu request of 1 GPU exceeds the cap of 0 GPU"
        );
    }
}
