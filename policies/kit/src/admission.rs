//! Admission machinery shared by the shipped admission policies: plain views of the task and
//! of its user's usage, the decision, and the [`AdmissionPolicy`] trait that
//! [`admission_component!`](crate::admission_component) wraps into a component.

/// The decision on one task, mirroring the WIT `admission-decision`.
#[derive(Clone, Debug, PartialEq)]
pub enum Admission {
    /// The task may queue.
    Accept,
    /// The task fails with this reason: it could never be admitted.
    Reject(String),
    /// The task stays pending and is checked again later; the reason is shown to its user.
    Defer(String),
}

/// A task awaiting admission, mirroring the WIT `admission-task`.
#[derive(Clone, Copy, Debug)]
pub struct Submission<'a> {
    /// Task id.
    pub id: &'a str,
    /// The submitting user's id.
    pub user: &'a str,
    /// The image reference as submitted (`busybox:1.36`, `ghcr.io/acme/app@sha256:...`).
    pub image: &'a str,
    /// The request, `[cpu, memory, storage, gpu]` as in [`crate::RESOURCES`].
    pub request: [f64; 4],
    /// Higher runs first.
    pub priority: i32,
    /// The task's labels, (key, value).
    pub labels: &'a [(String, String)],
    /// Attempts already made.
    pub attempts: u32,
    /// Seconds since submission.
    pub age_s: f64,
}

/// What the submitting user already holds, mirroring the WIT `user-usage`.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Usage {
    /// Tasks of the user running now.
    pub running_tasks: u32,
    /// Tasks of the user admitted and waiting for a worker.
    pub queued_tasks: u32,
    /// Tasks of the user awaiting admission (this one included).
    pub pending_tasks: u32,
    /// Resources reserved by the user's running tasks, `[cpu, memory, storage, gpu]`.
    pub reserved: [f64; 4],
}

/// An admission policy: built from its JSON configuration, then asked about each task.
pub trait AdmissionPolicy: Sized {
    /// Parses and validates the configuration (JSON text, `{}` when none was given); an
    /// error is the reason shown to whoever uploads the policy.
    fn configure(config: &str) -> Result<Self, String>;

    /// Decides on one task given its user's current usage.
    fn admit(&self, task: &Submission<'_>, usage: &Usage) -> Admission;
}

/// The whole WebAssembly glue of an admission policy: the WIT bindings of the `admission`
/// world (generated in the calling crate, from `../../wit`), the configuration kept by the
/// instance (`configure` builds a `$policy`, an [`AdmissionPolicy`]), the `admit` export that
/// hands it plain views of the task and usage, and a native test that every WIT field reaches
/// its view. A policy crate's `component.rs` is one call:
/// `cloudai_policy_kit::admission_component!(crate::logic::Quota);`
/// (the crate depends on `wit-bindgen`).
#[macro_export]
macro_rules! admission_component {
    ($policy:ty) => {
        #[allow(unsafe_code)]
        mod bindings {
            ::wit_bindgen::generate!({ path: "../../wit", world: "admission" });
        }

        use bindings::cloudai::policy::types::{AdmissionDecision, AdmissionTask, UserUsage};
        use $crate::{Admission, AdmissionPolicy, Submission, Usage};

        /// The policy `configure` built; the host calls it first on every fresh instance.
        static POLICY: ::std::sync::Mutex<Option<$policy>> = ::std::sync::Mutex::new(None);

        struct Component;

        impl bindings::exports::cloudai::policy::config::Guest for Component {
            fn configure(config: String) -> Result<(), String> {
                let policy = <$policy as AdmissionPolicy>::configure(&config)?;
                *POLICY
                    .lock()
                    .unwrap_or_else(::std::sync::PoisonError::into_inner) = Some(policy);
                Ok(())
            }
        }

        impl bindings::Guest for Component {
            fn admit(task: AdmissionTask, usage: UserUsage) -> AdmissionDecision {
                let mut slot = POLICY
                    .lock()
                    .unwrap_or_else(::std::sync::PoisonError::into_inner);
                if slot.is_none() {
                    // The host always configures first; a caller that did not gets the
                    // policy's empty configuration, or a deferral saying why there is none.
                    match <$policy as AdmissionPolicy>::configure("{}") {
                        Ok(policy) => *slot = Some(policy),
                        Err(e) => {
                            return AdmissionDecision::Defer(format!(
                                "the admission policy is not configured: {e}"
                            ));
                        }
                    }
                }
                let Some(policy) = slot.as_ref() else {
                    return AdmissionDecision::Defer(
                        "the admission policy is not configured".to_owned(),
                    );
                };
                match policy.admit(&submission(&task), &to_usage(&usage)) {
                    Admission::Accept => AdmissionDecision::Accept,
                    Admission::Reject(r) => AdmissionDecision::Reject(r),
                    Admission::Defer(r) => AdmissionDecision::Defer(r),
                }
            }
        }

        fn submission(task: &AdmissionTask) -> Submission<'_> {
            let r = &task.request;
            Submission {
                id: &task.id,
                user: &task.user,
                image: &task.image,
                request: [r.cpu, r.memory, r.storage, r.gpu],
                priority: task.priority,
                labels: &task.labels,
                attempts: task.attempts,
                age_s: task.age_s,
            }
        }

        fn to_usage(usage: &UserUsage) -> Usage {
            let r = &usage.reserved;
            Usage {
                running_tasks: usage.running_tasks,
                queued_tasks: usage.queued_tasks,
                pending_tasks: usage.pending_tasks,
                reserved: [r.cpu, r.memory, r.storage, r.gpu],
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
        mod glue_tests {
            use super::bindings::cloudai::policy::types::{
                AdmissionTask, Resources, UserUsage,
            };

            #[test]
            fn the_glue_maps_every_field_to_its_view() {
                let task = AdmissionTask {
                    id: "t1".into(),
                    user: "alice".into(),
                    image: "busybox:1.36".into(),
                    request: Resources {
                        cpu: 1.0,
                        memory: 2.0,
                        storage: 3.0,
                        gpu: 4.0,
                    },
                    priority: -5,
                    labels: vec![("zone".into(), "a".into())],
                    attempts: 2,
                    age_s: 7.5,
                };
                let s = super::submission(&task);
                assert_eq!(
                    (s.id, s.user, s.image, s.request),
                    ("t1", "alice", "busybox:1.36", [1.0, 2.0, 3.0, 4.0])
                );
                assert_eq!((s.priority, s.attempts, s.age_s), (-5, 2, 7.5));
                assert_eq!(s.labels, &[("zone".to_string(), "a".to_string())]);
                let usage = UserUsage {
                    running_tasks: 1,
                    queued_tasks: 2,
                    pending_tasks: 3,
                    reserved: Resources {
                        cpu: 5.0,
                        memory: 6.0,
                        storage: 7.0,
                        gpu: 8.0,
                    },
                };
                assert_eq!(
                    super::to_usage(&usage),
                    $crate::Usage {
                        running_tasks: 1,
                        queued_tasks: 2,
                        pending_tasks: 3,
                        reserved: [5.0, 6.0, 7.0, 8.0],
                    }
                );
            }
        }
    };
}
