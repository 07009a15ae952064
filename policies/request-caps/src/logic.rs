//! Request caps: a task whose request exceeds a configured per-resource maximum is rejected,
//! with a reason naming every resource over its cap; any other task is accepted.
//!
//! Configuration (JSON, every key optional, `{}` caps nothing):
//! `{"max_cpu": 8, "max_memory": 32, "max_storage": 200, "max_gpu": 1}`, in CPU cores, GB of
//! memory, GB of storage and GPU devices. Unknown keys and negative or non-numeric values are
//! refused, so that a typo (`max_cpus`) cannot silently cap nothing.

use cloudai_policy_kit::{Admission, AdmissionPolicy, RESOURCES, Submission, Usage};
use serde::Deserialize;

/// The configured maximum per resource, in [`RESOURCES`] order; `None` is uncapped.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Caps {
    /// Maximum request per resource.
    pub max: [Option<f64>; 4],
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    max_cpu: Option<f64>,
    max_memory: Option<f64>,
    max_storage: Option<f64>,
    max_gpu: Option<f64>,
}

impl Caps {
    /// Parses and validates the policy's configuration.
    pub fn from_json(config: &str) -> Result<Caps, String> {
        let c: Config =
            serde_json::from_str(config).map_err(|e| format!("request-caps configuration: {e}"))?;
        let caps = Caps {
            max: [c.max_cpu, c.max_memory, c.max_storage, c.max_gpu],
        };
        for (res, max) in RESOURCES.iter().zip(caps.max) {
            if let Some(m) = max
                && !(m.is_finite() && m >= 0.0)
            {
                return Err(format!(
                    "request-caps configuration: max_{} must be a number >= 0",
                    res.name()
                ));
            }
        }
        Ok(caps)
    }
}

impl AdmissionPolicy for Caps {
    fn configure(config: &str) -> Result<Self, String> {
        Caps::from_json(config)
    }

    fn admit(&self, task: &Submission<'_>, _usage: &Usage) -> Admission {
        admit(self, &task.request)
    }
}

/// Accepts `request` (`[cpu, memory, storage, gpu]`) unless it exceeds a cap.
pub fn admit(caps: &Caps, request: &[f64; 4]) -> Admission {
    let over: Vec<String> = RESOURCES
        .iter()
        .zip(caps.max)
        .zip(request)
        .filter_map(|((res, max), &req)| {
            let max = max?;
            (req > max).then(|| {
                format!(
                    "{} request of {} exceeds the cap of {}",
                    res.name(),
                    res.describe_short(req),
                    res.describe_short(max)
                )
            })
        })
        .collect();
    if over.is_empty() {
        Admission::Accept
    } else {
        Admission::Reject(over.join("; "))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::{Admission, Caps, admit};

    #[test]
    fn accepts_requests_up_to_and_including_the_caps() {
        let caps = Caps::from_json(r#"{"max_cpu": 8, "max_memory": 32, "max_gpu": 1}"#).unwrap();
        assert_eq!(admit(&caps, &[8.0, 32.0, 5000.0, 1.0]), Admission::Accept);
    }

    #[test]
    fn rejects_naming_every_resource_over_its_cap() {
        let caps = Caps::from_json(r#"{"max_cpu": 8, "max_memory": 32, "max_gpu": 1}"#).unwrap();
        assert_eq!(
            admit(&caps, &[16.0, 32.5, 0.0, 0.0]),
            Admission::Reject(
                "cpu request of 16 CPU exceeds the cap of 8 CPU; memory request of 32.5 GB exceeds the cap of 32 GB"
                    .into()
            )
        );
        assert_eq!(
            admit(&caps, &[1.0, 1.0, 0.0, 2.0]),
            Admission::Reject("gpu request of 2 GPU exceeds the cap of 1 GPU".into())
        );
    }

    #[test]
    fn an_empty_configuration_caps_nothing() {
        let caps = Caps::from_json("{}").unwrap();
        assert_eq!(caps, Caps::default());
        assert_eq!(admit(&caps, &[1e6, 1e6, 1e6, 1e3]), Admission::Accept);
    }

    #[test]
    fn refuses_typos_negative_caps_and_malformed_json() {
        let typo = Caps::from_json(r#"{"max_cpus": 8}"#).unwrap_err();
        assert!(typo.contains("unknown field `max_cpus`"), "{typo}");
        let negative = Caps::from_json(r#"{"max_gpu": -1}"#).unwrap_err();
        assert!(
            negative.contains("max_gpu must be a number >= 0"),
            "{negative}"
        );
        assert!(Caps::from_json(r#"{"max_cpu": "8"}"#).is_err());
        assert!(Caps::from_json("not json").is_err());
    }
}
