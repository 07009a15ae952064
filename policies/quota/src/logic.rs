//! Quota: per-user caps on tasks and reserved resources, checked when a task is admitted.
//!
//! Configuration (JSON, every key optional, `{}` caps nothing):
//!
//! ```json
//! {"default": {"max_running_tasks": 10, "max_queued_and_running_tasks": 50,
//!              "max_cpu": 32, "max_memory": 128, "max_storage": 1000, "max_gpu": 2,
//!              "max_priority": 10},
//!  "users": {"alice": {"max_gpu": 4}, "ci-bot": {"max_cpu": null, "max_priority": -5}}}
//! ```
//!
//! `default` applies to every user; an entry of `users` overrides it key by key for one user
//! (a key it leaves out keeps the default, `null` lifts that cap for the user). Resource caps
//! are in CPU cores, GB of memory, GB of storage and GPU devices, and bound what the user's
//! running tasks reserve together; task caps are counts; `max_priority` is the highest task
//! priority the user may submit (any whole number, negative included). Unknown keys and
//! negative (except `max_priority`), fractional (for counts and `max_priority`) or
//! non-numeric values are refused at `configure`, so that a typo cannot silently cap nothing.
//!
//! Decision on a task of user U:
//! - **reject** when it can never be admitted: its request alone exceeds one of U's resource
//!   caps, one of U's task caps is 0, or its priority exceeds U's `max_priority`; the reason
//!   names each such cap;
//! - **defer** when it fits the caps but not on top of U's current usage: U already runs
//!   `max_running_tasks` tasks, or has `max_queued_and_running_tasks` tasks queued or running,
//!   or what U's running tasks reserve plus this request exceeds a resource cap (checked for
//!   the resources the task requests, so a lowered cap does not block tasks that need none
//!   of that resource); the reason names each cap and the current usage, and the task is
//!   admitted once usage drops;
//! - **accept** otherwise.
//!
//! The usage the host reports counts the user's queued tasks but reserves resources for
//! running tasks only: a task already admitted (queued) counts against
//! `max_queued_and_running_tasks`, not against `max_running_tasks` or the resource caps. To
//! bound the tasks a user ever runs at once, set `max_queued_and_running_tasks`.

use std::collections::BTreeMap;

use cloudai_policy_kit::{Admission, AdmissionPolicy, RESOURCES, Submission, Usage};
use serde::{Deserialize, Deserializer};

/// One user's caps; `None` is uncapped.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Caps {
    /// Most tasks running at once.
    pub max_running_tasks: Option<u32>,
    /// Most tasks queued or running at once.
    pub max_queued_and_running_tasks: Option<u32>,
    /// Most resources reserved by running tasks together, per resource in [`RESOURCES`] order.
    pub max: [Option<f64>; 4],
    /// Highest priority a task may have.
    pub max_priority: Option<i32>,
}

/// The configured quota: the default caps and per-user overrides (already merged).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Quota {
    /// Caps of every user without an entry.
    pub default: Caps,
    /// Caps of the users with an entry, the default merged in.
    pub users: BTreeMap<String, Caps>,
}

/// A caps object as written: a key absent (`None`), `null` (`Some(None)`) or a number.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct CapsConfig {
    #[serde(default, deserialize_with = "present")]
    max_running_tasks: Option<Option<f64>>,
    #[serde(default, deserialize_with = "present")]
    max_queued_and_running_tasks: Option<Option<f64>>,
    #[serde(default, deserialize_with = "present")]
    max_cpu: Option<Option<f64>>,
    #[serde(default, deserialize_with = "present")]
    max_memory: Option<Option<f64>>,
    #[serde(default, deserialize_with = "present")]
    max_storage: Option<Option<f64>>,
    #[serde(default, deserialize_with = "present")]
    max_gpu: Option<Option<f64>>,
    #[serde(default, deserialize_with = "present")]
    max_priority: Option<Option<f64>>,
}

/// Tells a key written as `null` (lift the cap) from a key left out (keep the default).
fn present<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Option<f64>>, D::Error> {
    Option::<f64>::deserialize(d).map(Some)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    #[serde(default)]
    default: CapsConfig,
    #[serde(default)]
    users: BTreeMap<String, CapsConfig>,
}

fn error(message: impl std::fmt::Display) -> String {
    format!("quota configuration: {message}")
}

impl CapsConfig {
    /// These caps over `base`: a key written replaces the base's, a key left out keeps it.
    fn over(&self, base: &Caps, path: &str) -> Result<Caps, String> {
        let count = |key: &str, v: Option<Option<f64>>, base: Option<u32>| match v {
            None => Ok(base),
            Some(None) => Ok(None),
            Some(Some(n)) if n.is_finite() && n >= 0.0 && n.fract() == 0.0 && n <= 1e9 => {
                Ok(Some(n as u32))
            }
            Some(Some(_)) => Err(error(format!("{path}.{key} must be a whole number >= 0"))),
        };
        let amount = |key: &str, v: Option<Option<f64>>, base: Option<f64>| match v {
            None => Ok(base),
            Some(None) => Ok(None),
            Some(Some(n)) if n.is_finite() && n >= 0.0 => Ok(Some(n)),
            Some(Some(_)) => Err(error(format!("{path}.{key} must be a number >= 0"))),
        };
        let priority = |key: &str, v: Option<Option<f64>>, base: Option<i32>| match v {
            None => Ok(base),
            Some(None) => Ok(None),
            Some(Some(n))
                if n.is_finite()
                    && n.fract() == 0.0
                    && n >= f64::from(i32::MIN)
                    && n <= f64::from(i32::MAX) =>
            {
                Ok(Some(n as i32))
            }
            Some(Some(_)) => Err(error(format!(
                "{path}.{key} must be a whole number from {} to {}",
                i32::MIN,
                i32::MAX
            ))),
        };
        Ok(Caps {
            max_running_tasks: count(
                "max_running_tasks",
                self.max_running_tasks,
                base.max_running_tasks,
            )?,
            max_queued_and_running_tasks: count(
                "max_queued_and_running_tasks",
                self.max_queued_and_running_tasks,
                base.max_queued_and_running_tasks,
            )?,
            max: [
                amount("max_cpu", self.max_cpu, base.max[0])?,
                amount("max_memory", self.max_memory, base.max[1])?,
                amount("max_storage", self.max_storage, base.max[2])?,
                amount("max_gpu", self.max_gpu, base.max[3])?,
            ],
            max_priority: priority("max_priority", self.max_priority, base.max_priority)?,
        })
    }
}

impl Quota {
    /// Parses and validates the policy's configuration.
    pub fn from_json(config: &str) -> Result<Quota, String> {
        let c: Config = serde_json::from_str(config).map_err(error)?;
        let default = c.default.over(&Caps::default(), "default")?;
        let mut users = BTreeMap::new();
        for (user, caps) in &c.users {
            if user.is_empty() {
                return Err(error("users: a user id must not be empty"));
            }
            users.insert(user.clone(), caps.over(&default, &format!("users.{user}"))?);
        }
        Ok(Quota { default, users })
    }

    /// The caps that apply to `user`.
    pub fn caps_for(&self, user: &str) -> &Caps {
        self.users.get(user).unwrap_or(&self.default)
    }
}

impl AdmissionPolicy for Quota {
    fn configure(config: &str) -> Result<Self, String> {
        Quota::from_json(config)
    }

    fn admit(&self, task: &Submission<'_>, usage: &Usage) -> Admission {
        admit(self, task.user, task.priority, &task.request, usage)
    }
}

/// Decides on a task of `user` with `priority` requesting `request` (`[cpu, memory, storage,
/// gpu]`), given the user's current `usage`.
pub fn admit(
    quota: &Quota,
    user: &str,
    priority: i32,
    request: &[f64; 4],
    usage: &Usage,
) -> Admission {
    let caps = quota.caps_for(user);
    let counts = [
        ("max_running_tasks", caps.max_running_tasks),
        (
            "max_queued_and_running_tasks",
            caps.max_queued_and_running_tasks,
        ),
    ];

    // What no drop in usage can cure.
    let mut never: Vec<String> = counts
        .iter()
        .filter(|(_, cap)| *cap == Some(0))
        .map(|(key, _)| format!("quota {key} for user {user} is 0"))
        .collect();
    for ((res, max), &req) in RESOURCES.iter().zip(caps.max).zip(request) {
        if let Some(max) = max
            && req > max
        {
            never.push(format!(
                "{} request of {} exceeds the quota max_{} of {} for user {user}",
                res.name(),
                res.describe_short(req),
                res.name(),
                res.describe_short(max)
            ));
        }
    }
    if let Some(max) = caps.max_priority
        && priority > max
    {
        never.push(format!(
            "priority {priority} exceeds the quota max_priority of {max} for user {user}"
        ));
    }
    if !never.is_empty() {
        return Admission::Reject(never.join("; "));
    }

    // What the user's current usage leaves no room for.
    let mut later = Vec::new();
    if let Some(max) = caps.max_running_tasks
        && usage.running_tasks >= max
    {
        later.push(format!(
            "quota max_running_tasks = {max} for user {user}: {} running",
            usage.running_tasks
        ));
    }
    if let Some(max) = caps.max_queued_and_running_tasks {
        let admitted = u64::from(usage.queued_tasks) + u64::from(usage.running_tasks);
        if admitted >= u64::from(max) {
            later.push(format!(
                "quota max_queued_and_running_tasks = {max} for user {user}: {} queued + {} running",
                usage.queued_tasks, usage.running_tasks
            ));
        }
    }
    for (r, res) in RESOURCES.iter().enumerate() {
        // A task that requests none of a resource adds nothing to it, even when the user is
        // above that cap (lowered since): only what the task asks for is checked.
        if let Some(max) = caps.max[r]
            && request[r] > 0.0
            && usage.reserved[r] + request[r] > max
        {
            later.push(format!(
                "quota max_{} = {} for user {user}: {} reserved by running tasks + {} requested",
                res.name(),
                res.describe_short(max),
                res.describe_short(usage.reserved[r]),
                res.describe_short(request[r])
            ));
        }
    }
    if later.is_empty() {
        Admission::Accept
    } else {
        Admission::Defer(format!("{}; admitted once usage drops", later.join("; ")))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::{Admission, Caps, Quota, admit};
    use cloudai_policy_kit::Usage;

    const CONFIG: &str = r#"{
        "default": {"max_running_tasks": 3, "max_queued_and_running_tasks": 5,
                    "max_cpu": 8, "max_memory": 32, "max_gpu": 0},
        "users": {"alice": {"max_gpu": 2, "max_cpu": null}, "bob": {"max_running_tasks": 1}}
    }"#;

    fn usage(running: u32, queued: u32, reserved: [f64; 4]) -> Usage {
        Usage {
            running_tasks: running,
            queued_tasks: queued,
            pending_tasks: 1,
            reserved,
        }
    }

    fn idle() -> Usage {
        usage(0, 0, [0.0; 4])
    }

    #[test]
    fn users_overrides_merge_key_by_key_over_the_default() {
        let q = Quota::from_json(CONFIG).unwrap();
        assert_eq!(
            q.default,
            Caps {
                max_running_tasks: Some(3),
                max_queued_and_running_tasks: Some(5),
                max: [Some(8.0), Some(32.0), None, Some(0.0)],
                max_priority: None,
            }
        );
        // alice: GPU raised, CPU lifted by null, the rest inherited.
        assert_eq!(
            q.caps_for("alice"),
            &Caps {
                max_running_tasks: Some(3),
                max_queued_and_running_tasks: Some(5),
                max: [None, Some(32.0), None, Some(2.0)],
                max_priority: None,
            }
        );
        assert_eq!(q.caps_for("bob").max_running_tasks, Some(1));
        assert_eq!(q.caps_for("bob").max[0], Some(8.0));
        assert_eq!(q.caps_for("carol"), &q.default);
    }

    #[test]
    fn accepts_within_every_cap_up_to_the_limit() {
        let q = Quota::from_json(CONFIG).unwrap();
        assert_eq!(
            admit(&q, "carol", 0, &[2.0, 8.0, 100.0, 0.0], &idle()),
            Admission::Accept
        );
        // 6 + 2 = 8 CPU reserved: exactly the cap.
        assert_eq!(
            admit(
                &q,
                "carol",
                0,
                &[2.0, 8.0, 0.0, 0.0],
                &usage(2, 2, [6.0, 16.0, 0.0, 0.0])
            ),
            Admission::Accept
        );
        assert_eq!(
            admit(&q, "alice", 0, &[64.0, 1.0, 0.0, 2.0], &idle()),
            Admission::Accept
        );
    }

    #[test]
    fn rejects_a_request_that_alone_exceeds_a_cap_naming_it() {
        let q = Quota::from_json(CONFIG).unwrap();
        assert_eq!(
            admit(&q, "carol", 0, &[16.0, 64.0, 0.0, 0.0], &idle()),
            Admission::Reject(
                "cpu request of 16 CPU exceeds the quota max_cpu of 8 CPU for user carol; \
                 memory request of 64 GB exceeds the quota max_memory of 32 GB for user carol"
                    .into()
            )
        );
        assert_eq!(
            admit(&q, "carol", 0, &[1.0, 1.0, 0.0, 1.0], &idle()),
            Admission::Reject(
                "gpu request of 1 GPU exceeds the quota max_gpu of 0 GPU for user carol".into()
            )
        );
        // Rejection wins over deferral: usage dropping would not help.
        let busy = usage(3, 2, [8.0, 32.0, 0.0, 0.0]);
        assert!(matches!(
            admit(&q, "carol", 0, &[9.0, 1.0, 0.0, 0.0], &busy),
            Admission::Reject(_)
        ));
        let zero = Quota::from_json(r#"{"default": {"max_running_tasks": 0}}"#).unwrap();
        assert_eq!(
            admit(&zero, "carol", 0, &[1.0, 1.0, 0.0, 0.0], &idle()),
            Admission::Reject("quota max_running_tasks for user carol is 0".into())
        );
    }

    #[test]
    fn defers_when_current_usage_leaves_no_room_saying_which_cap_and_usage() {
        let q = Quota::from_json(CONFIG).unwrap();
        assert_eq!(
            admit(
                &q,
                "carol",
                0,
                &[4.0, 1.0, 0.0, 0.0],
                &usage(2, 0, [6.0, 4.0, 0.0, 0.0])
            ),
            Admission::Defer(
                "quota max_cpu = 8 CPU for user carol: 6 CPU reserved by running tasks + 4 CPU \
                 requested; admitted once usage drops"
                    .into()
            )
        );
        assert_eq!(
            admit(&q, "bob", 0, &[1.0, 1.0, 0.0, 0.0], &usage(1, 0, [1.0; 4])),
            Admission::Defer(
                "quota max_running_tasks = 1 for user bob: 1 running; admitted once usage drops"
                    .into()
            )
        );
        assert_eq!(
            admit(
                &q,
                "carol",
                0,
                &[1.0, 1.0, 0.0, 0.0],
                &usage(1, 4, [1.0; 4])
            ),
            Admission::Defer(
                "quota max_queued_and_running_tasks = 5 for user carol: 4 queued + 1 running; \
                 admitted once usage drops"
                    .into()
            )
        );
        // Over the GPU cap (lowered since those tasks started), but this task needs no GPU.
        assert_eq!(
            admit(
                &q,
                "carol",
                0,
                &[1.0, 1.0, 0.0, 0.0],
                &usage(1, 0, [1.0, 1.0, 0.0, 2.0])
            ),
            Admission::Accept
        );
        // Every cap hit is named.
        let Admission::Defer(reason) = admit(
            &q,
            "carol",
            0,
            &[1.0, 1.0, 0.0, 0.0],
            &usage(3, 2, [8.0, 32.0, 0.0, 0.0]),
        ) else {
            panic!("expected a deferral")
        };
        for cap in [
            "max_running_tasks",
            "max_queued_and_running_tasks",
            "max_cpu",
            "max_memory",
        ] {
            assert!(reason.contains(cap), "{reason}");
        }
    }

    #[test]
    fn an_empty_configuration_caps_nothing() {
        let q = Quota::from_json("{}").unwrap();
        assert_eq!(q, Quota::default());
        let huge = usage(u32::MAX, u32::MAX, [1e9; 4]);
        assert_eq!(
            admit(&q, "anyone", 0, &[1e6, 1e6, 1e6, 1e3], &huge),
            Admission::Accept
        );
    }

    const PRIORITY: &str = r#"{
        "default": {"max_priority": 10, "max_cpu": 8},
        "users": {"bob": {"max_priority": -5}, "ci-bot": {"max_priority": null},
                  "alice": {"max_cpu": 16}}
    }"#;

    #[test]
    fn rejects_a_priority_above_the_default_max_priority() {
        let q = Quota::from_json(PRIORITY).unwrap();
        assert_eq!(q.default.max_priority, Some(10));
        // alice overrides another key only: she keeps the default max_priority.
        assert_eq!(q.caps_for("alice").max_priority, Some(10));
        for user in ["carol", "alice"] {
            assert_eq!(
                admit(&q, user, 10, &[1.0, 1.0, 0.0, 0.0], &idle()),
                Admission::Accept
            );
            assert_eq!(
                admit(&q, user, -100, &[1.0, 1.0, 0.0, 0.0], &idle()),
                Admission::Accept
            );
            assert_eq!(
                admit(&q, user, 50, &[1.0, 1.0, 0.0, 0.0], &idle()),
                Admission::Reject(format!(
                    "priority 50 exceeds the quota max_priority of 10 for user {user}"
                ))
            );
        }
        // Named with every other cap no drop in usage can cure.
        assert_eq!(
            admit(&q, "carol", 11, &[9.0, 1.0, 0.0, 0.0], &idle()),
            Admission::Reject(
                "cpu request of 9 CPU exceeds the quota max_cpu of 8 CPU for user carol; \
                 priority 11 exceeds the quota max_priority of 10 for user carol"
                    .into()
            )
        );
    }

    #[test]
    fn a_user_entry_overrides_or_lifts_max_priority() {
        let q = Quota::from_json(PRIORITY).unwrap();
        assert_eq!(q.caps_for("bob").max_priority, Some(-5));
        assert_eq!(
            admit(&q, "bob", -5, &[1.0, 1.0, 0.0, 0.0], &idle()),
            Admission::Accept
        );
        assert_eq!(
            admit(&q, "bob", 0, &[1.0, 1.0, 0.0, 0.0], &idle()),
            Admission::Reject(
                "priority 0 exceeds the quota max_priority of -5 for user bob".into()
            )
        );
        // null lifts it: any priority, the other default caps kept.
        assert_eq!(q.caps_for("ci-bot").max_priority, None);
        assert_eq!(q.caps_for("ci-bot").max[0], Some(8.0));
        assert_eq!(
            admit(&q, "ci-bot", i32::MAX, &[1.0, 1.0, 0.0, 0.0], &idle()),
            Admission::Accept
        );
        // No max_priority configured: any priority.
        let none = Quota::from_json(r#"{"default": {"max_cpu": 8}}"#).unwrap();
        assert_eq!(
            admit(&none, "carol", i32::MAX, &[1.0, 1.0, 0.0, 0.0], &idle()),
            Admission::Accept
        );
    }

    #[test]
    fn the_component_policy_checks_the_task_priority() {
        use cloudai_policy_kit::{AdmissionPolicy, Submission};
        let q = <Quota as AdmissionPolicy>::configure(PRIORITY).unwrap();
        let task = |priority| Submission {
            id: "t",
            user: "bob",
            image: "busybox",
            request: [1.0, 1.0, 0.0, 0.0],
            priority,
            labels: &[],
            attempts: 0,
            age_s: 0.0,
        };
        assert_eq!(q.admit(&task(-5), &idle()), Admission::Accept);
        assert_eq!(
            q.admit(&task(50), &idle()),
            Admission::Reject(
                "priority 50 exceeds the quota max_priority of -5 for user bob".into()
            )
        );
    }

    #[test]
    fn refuses_a_max_priority_that_is_not_a_whole_number() {
        let err = |config: &str| Quota::from_json(config).unwrap_err();
        let bounds = "must be a whole number from -2147483648 to 2147483647";
        assert_eq!(
            err(r#"{"default": {"max_priority": 2.5}}"#),
            format!("quota configuration: default.max_priority {bounds}")
        );
        assert_eq!(
            err(r#"{"users": {"bob": {"max_priority": 3e9}}}"#),
            format!("quota configuration: users.bob.max_priority {bounds}")
        );
        assert!(err(r#"{"default": {"max_priority": "10"}}"#).starts_with("quota configuration:"));
        assert!(err(r#"{"default": {"max_priority": 1e400}}"#).starts_with("quota configuration:"));
        assert!(err(r#"{"default": {"max_priorty": 1}}"#).contains("unknown field `max_priorty`"));
        // Negative and extreme whole numbers are caps like any other.
        let q = Quota::from_json(r#"{"default": {"max_priority": -2147483648}}"#).unwrap();
        assert_eq!(q.default.max_priority, Some(i32::MIN));
    }

    #[test]
    fn refuses_unknown_keys_negative_fractional_and_non_numeric_values() {
        let err = |config: &str| Quota::from_json(config).unwrap_err();
        let typo = err(r#"{"default": {"max_cpus": 8}}"#);
        assert!(typo.contains("unknown field `max_cpus`"), "{typo}");
        let top = err(r#"{"defaults": {}}"#);
        assert!(top.contains("unknown field `defaults`"), "{top}");
        let negative = err(r#"{"users": {"alice": {"max_gpu": -1}}}"#);
        assert_eq!(
            negative,
            "quota configuration: users.alice.max_gpu must be a number >= 0"
        );
        let fraction = err(r#"{"default": {"max_running_tasks": 2.5}}"#);
        assert_eq!(
            fraction,
            "quota configuration: default.max_running_tasks must be a whole number >= 0"
        );
        assert!(err(r#"{"default": {"max_cpu": "8"}}"#).starts_with("quota configuration:"));
        // JSON has no NaN; a number too large for f64 is not finite.
        assert!(err(r#"{"default": {"max_cpu": NaN}}"#).starts_with("quota configuration:"));
        assert!(err(r#"{"default": {"max_memory": 1e400}}"#).starts_with("quota configuration:"));
        assert!(err(r#"{"users": {"": {}}}"#).contains("must not be empty"));
        assert!(err("not json").starts_with("quota configuration:"));
    }
}
