//! The stored data model: TASKS, WORKER_REGISTRY, ASSIGNMENTS and RESULTS.
//!
//! Field names are the seed schema's (`../shared/seed/cloudai-database-schema.md`) and are
//! never renamed; everything a real scheduler needs beyond the seed is added beside them.
//! Resource amounts are `f64` as in the seed, but always quantized to multiples of
//! [`RESOURCE_QUANTUM`] so that a reserve followed by its release restores the exact value
//! (sums of such values are exact in `f64`; sums of arbitrary decimals are not).

pub mod protocol;

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, SubsecRound, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// Smallest unit of every resource: 1/1024 of a core, GB or device.
pub const RESOURCE_QUANTUM: f64 = 1.0 / 1024.0;

/// Rounds a resource amount to the nearest multiple of [`RESOURCE_QUANTUM`].
pub fn quantize(amount: f64) -> f64 {
    (amount / RESOURCE_QUANTUM).round() * RESOURCE_QUANTUM
}

/// Now, truncated to milliseconds: the precision of a BSON date, so that every timestamp
/// round-trips through both stores unchanged.
pub fn now() -> DateTime<Utc> {
    Utc::now().trunc_subsecs(3)
}

/// Lifecycle of a task. Every transition is a conditional update on the current state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum TaskStatus {
    /// Submitted, awaiting admission.
    Pending,
    /// Admitted, awaiting placement.
    Queued,
    /// Assigned to a worker.
    Running,
    Completed,
    Failed,
    Cancelled,
}

impl TaskStatus {
    pub const ALL: [TaskStatus; 6] = [
        TaskStatus::Pending,
        TaskStatus::Queued,
        TaskStatus::Running,
        TaskStatus::Completed,
        TaskStatus::Failed,
        TaskStatus::Cancelled,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            TaskStatus::Pending => "pending",
            TaskStatus::Queued => "queued",
            TaskStatus::Running => "running",
            TaskStatus::Completed => "completed",
            TaskStatus::Failed => "failed",
            TaskStatus::Cancelled => "cancelled",
        }
    }

    /// A terminal task never changes state again.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            TaskStatus::Completed | TaskStatus::Failed | TaskStatus::Cancelled
        )
    }
}

impl fmt::Display for TaskStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for TaskStatus {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        TaskStatus::ALL
            .into_iter()
            .find(|status| status.as_str() == s)
            .ok_or_else(|| {
                format!(
                    "unknown task status '{s}' (expected one of pending, queued, running, completed, failed, cancelled)"
                )
            })
    }
}

/// Bytes in one "GB" of memory or storage, everywhere in CloudAI (requests, capacities, the
/// limits given to Docker): 2^30, what `free -g` and Docker's `1g` mean.
pub const BYTES_PER_GB: f64 = 1_073_741_824.0;

/// A request or a capacity in the seed's units: cores, GB, GB, devices.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize, ToSchema)]
pub struct Resources {
    pub cpu: f64,
    pub memory: f64,
    pub storage: f64,
    pub gpu: f64,
}

impl Resources {
    pub fn new(cpu: f64, memory: f64, storage: f64, gpu: f64) -> Self {
        Resources {
            cpu,
            memory,
            storage,
            gpu,
        }
    }

    /// Every amount rounded to a multiple of [`RESOURCE_QUANTUM`].
    pub fn quantized(self) -> Self {
        Resources {
            cpu: quantize(self.cpu),
            memory: quantize(self.memory),
            storage: quantize(self.storage),
            gpu: quantize(self.gpu),
        }
    }

    /// True when every amount of `self` is at least the matching amount of `other`.
    pub fn covers(&self, other: &Resources) -> bool {
        self.cpu >= other.cpu
            && self.memory >= other.memory
            && self.storage >= other.storage
            && self.gpu >= other.gpu
    }
}

/// A TASKS document.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Task {
    // --- seed fields ---
    pub task_id: String,
    pub user_id: String,
    pub docker_image: String,
    pub command: Option<String>,
    pub req_cpu: f64,
    pub req_memory: f64,
    pub req_storage: f64,
    pub req_gpu: f64,
    pub status: TaskStatus,
    pub created_at: DateTime<Utc>,
    pub started_at: Option<DateTime<Utc>>,
    pub completed_at: Option<DateTime<Utc>>,
    // --- additions ---
    /// Higher runs first.
    pub priority: i32,
    pub labels: BTreeMap<String, String>,
    pub env: BTreeMap<String, String>,
    /// Wall-clock limit of one attempt, in seconds.
    pub timeout_s: Option<u64>,
    /// Execution is at-least-once: a task whose worker is lost is run again, up to this many
    /// attempts in all. `1` means never re-run.
    pub max_attempts: u32,
    pub attempts: u32,
    pub exit_code: Option<i64>,
    /// Why the task failed (or was cancelled), for humans.
    pub error: Option<String>,
    /// Why the task is in its current state, e.g. why it is still pending or queued.
    pub status_reason: Option<String>,
    /// A running task whose cancellation was asked for; the worker stops it.
    pub cancel_requested: bool,
    /// Host replica that holds the placement claim on this task, and until when.
    pub owner: Option<String>,
    pub lease_expires_at: Option<DateTime<Utc>>,
    /// The claim of the placement that started the current attempt; its assignment carries
    /// the same (see [`Assignment::is_attempt_of`]). Unset before the first placement.
    #[serde(default)]
    pub placed_by: Option<String>,
    /// The client's `Idempotency-Key`, when it gave one.
    pub idempotency_key: Option<String>,
    pub updated_at: DateTime<Utc>,
    /// The task array this task belongs to (`POST /v1/arrays`), if any.
    #[serde(default)]
    pub array_id: Option<String>,
    /// The task's index in its array, `0..count` (also `CLOUDAI_ARRAY_INDEX` in its env).
    #[serde(default)]
    pub array_index: Option<u32>,
    /// The tasks and arrays this task runs after (its spec's `after`).
    #[serde(default)]
    pub after: Vec<Dependency>,
    /// True while some of `after` is not met: the task stays `pending` and admission does not
    /// see it. Cleared once every dependency is met; the task fails when one can no longer be.
    #[serde(default)]
    pub awaiting_dependencies: bool,
    /// False when the task's owner opted out of preemption: no placement policy may stop it
    /// to make room for another task.
    #[serde(default = "preemptible_by_default")]
    pub preemptible: bool,
    /// The task a placement policy preempted this one for, while this attempt is being
    /// stopped (with `cancel_requested`); cleared when it is queued again.
    #[serde(default)]
    pub preempted_by: Option<String>,
}

fn preemptible_by_default() -> bool {
    true
}

/// The task label that names a task's type: tasks of one type are expected to run about
/// as long as each other (placement policies see the observed mean runtime per type).
pub const TASK_TYPE_LABEL: &str = "task-type";

impl Task {
    /// The task's type: its `task-type` label, else its image reference.
    pub fn task_type(&self) -> &str {
        self.labels
            .get(TASK_TYPE_LABEL)
            .map_or(self.docker_image.as_str(), String::as_str)
    }

    /// A new `pending` task created now, with the request quantized and every optional field
    /// empty (priority 0, 3 attempts at most).
    pub fn new_pending(
        task_id: String,
        user_id: String,
        docker_image: String,
        request: Resources,
    ) -> Self {
        let now = now();
        let request = request.quantized();
        Task {
            task_id,
            user_id,
            docker_image,
            command: None,
            req_cpu: request.cpu,
            req_memory: request.memory,
            req_storage: request.storage,
            req_gpu: request.gpu,
            status: TaskStatus::Pending,
            created_at: now,
            started_at: None,
            completed_at: None,
            priority: 0,
            labels: BTreeMap::new(),
            env: BTreeMap::new(),
            timeout_s: None,
            max_attempts: 3,
            attempts: 0,
            exit_code: None,
            error: None,
            status_reason: None,
            cancel_requested: false,
            owner: None,
            lease_expires_at: None,
            placed_by: None,
            idempotency_key: None,
            updated_at: now,
            array_id: None,
            array_index: None,
            after: Vec::new(),
            awaiting_dependencies: false,
            preemptible: true,
            preempted_by: None,
        }
    }

    pub fn request(&self) -> Resources {
        Resources::new(
            self.req_cpu,
            self.req_memory,
            self.req_storage,
            self.req_gpu,
        )
    }
}

/// A task or array another task runs after: exactly one of `task_id` and `array_id`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Dependency {
    /// A task of the same user, submitted before.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task_id: Option<String>,
    /// An array of the same user, submitted before: met when every one of its tasks is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub array_id: Option<String>,
    /// `completed` (default): the dependency must complete; the task fails when it fails or
    /// is cancelled. `finished`: it must end, however.
    #[serde(default)]
    pub condition: DependencyCondition,
}

impl fmt::Display for Dependency {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (&self.task_id, &self.array_id) {
            (Some(task_id), _) => write!(f, "task {task_id}"),
            (None, Some(array_id)) => write!(f, "array {array_id}"),
            (None, None) => write!(f, "nothing"),
        }
    }
}

/// When a [`Dependency`] is met.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum DependencyCondition {
    #[default]
    Completed,
    Finished,
}

/// What every task of an array finds in its environment.
pub const ARRAY_ID_ENV: &str = "CLOUDAI_ARRAY_ID";
pub const ARRAY_INDEX_ENV: &str = "CLOUDAI_ARRAY_INDEX";
pub const ARRAY_COUNT_ENV: &str = "CLOUDAI_ARRAY_COUNT";

/// A new array's id, `array-<uuid v7>`: its tasks are `task-<the same uuid>-<index>`.
pub fn new_array_id() -> String {
    format!("array-{}", uuid::Uuid::now_v7().simple())
}

/// Task `index` of the array `array_id` of `count` tasks, made from `template` (every field
/// but the id, the array fields and the array's env variables is the template's). The index
/// in the id is zero-padded to the width of `count - 1`, so that the ids of an array sort in
/// index order: the queue breaks ties of priority and creation time by task id.
pub fn array_task(template: &Task, array_id: &str, index: u32, count: u32) -> Task {
    let width = count.saturating_sub(1).max(1).to_string().len();
    let stem = array_id.strip_prefix("array-").unwrap_or(array_id);
    let mut task = template.clone();
    task.task_id = format!("task-{stem}-{index:0width$}");
    task.array_id = Some(array_id.to_string());
    task.array_index = Some(index);
    task.env
        .insert(ARRAY_ID_ENV.to_string(), array_id.to_string());
    task.env
        .insert(ARRAY_INDEX_ENV.to_string(), index.to_string());
    task.env
        .insert(ARRAY_COUNT_ENV.to_string(), count.to_string());
    task
}

/// A user's usage, as admission sees it (counted by the store, read by admission policies).
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Usage {
    pub running_tasks: u32,
    pub queued_tasks: u32,
    pub pending_tasks: u32,
    /// Resources reserved by the user's running tasks.
    pub reserved: Resources,
}

/// Queue order: higher priority first, then older, then by id (a total order, so that every
/// replica sees the same queue).
pub fn queue_order(a: &Task, b: &Task) -> std::cmp::Ordering {
    b.priority
        .cmp(&a.priority)
        .then(a.created_at.cmp(&b.created_at))
        .then(a.task_id.cmp(&b.task_id))
}

/// Usage a worker reports with its heartbeat.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize, ToSchema)]
pub struct WorkerUsage {
    pub cpu_percent: f64,
    pub memory_percent: f64,
    pub running_tasks: u32,
}

/// A WORKER_REGISTRY document.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Worker {
    // --- seed fields ---
    pub worker_id: String,
    pub worker_ip: String,
    pub total_cpu: f64,
    pub total_memory: f64,
    pub total_storage: f64,
    pub total_gpu: f64,
    pub allocated_cpu: f64,
    pub allocated_memory: f64,
    pub allocated_storage: f64,
    pub allocated_gpu: f64,
    pub available_cpu: f64,
    pub available_memory: f64,
    pub available_storage: f64,
    pub available_gpu: f64,
    pub is_active: bool,
    /// Unix seconds.
    pub last_heartbeat: i64,
    pub registered_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    // --- additions ---
    /// A draining worker keeps its running tasks but receives no new ones.
    pub draining: bool,
    pub labels: BTreeMap<String, String>,
    pub usage: Option<WorkerUsage>,
    /// SHA-256 (hex) of the worker's own API token. Never leaves the host.
    #[serde(skip)]
    pub token_sha256: String,
}

impl Worker {
    /// A new, active worker with nothing allocated.
    pub fn new(
        worker_id: String,
        worker_ip: String,
        total: Resources,
        labels: BTreeMap<String, String>,
        token_sha256: String,
    ) -> Self {
        let now = now();
        let total = total.quantized();
        Worker {
            worker_id,
            worker_ip,
            total_cpu: total.cpu,
            total_memory: total.memory,
            total_storage: total.storage,
            total_gpu: total.gpu,
            allocated_cpu: 0.0,
            allocated_memory: 0.0,
            allocated_storage: 0.0,
            allocated_gpu: 0.0,
            available_cpu: total.cpu,
            available_memory: total.memory,
            available_storage: total.storage,
            available_gpu: total.gpu,
            is_active: true,
            last_heartbeat: now.timestamp(),
            registered_at: now,
            updated_at: now,
            draining: false,
            labels,
            usage: None,
            token_sha256,
        }
    }

    pub fn total(&self) -> Resources {
        Resources::new(
            self.total_cpu,
            self.total_memory,
            self.total_storage,
            self.total_gpu,
        )
    }

    pub fn allocated(&self) -> Resources {
        Resources::new(
            self.allocated_cpu,
            self.allocated_memory,
            self.allocated_storage,
            self.allocated_gpu,
        )
    }

    pub fn available(&self) -> Resources {
        Resources::new(
            self.available_cpu,
            self.available_memory,
            self.available_storage,
            self.available_gpu,
        )
    }

    /// The accounting invariant, exact (no tolerance): for every resource
    /// `0 <= allocated <= total` and `available == total - allocated`.
    pub fn invariant_violations(&self) -> Vec<String> {
        let (t, a, v) = (self.total(), self.allocated(), self.available());
        let rows = [
            ("cpu", t.cpu, a.cpu, v.cpu),
            ("memory", t.memory, a.memory, v.memory),
            ("storage", t.storage, a.storage, v.storage),
            ("gpu", t.gpu, a.gpu, v.gpu),
        ];
        let mut out = Vec::new();
        for (name, total, allocated, available) in rows {
            if !(0.0..=total).contains(&allocated) {
                out.push(format!(
                    "{}: allocated_{name}={allocated} outside 0..={total}",
                    self.worker_id
                ));
            }
            if available != total - allocated {
                out.push(format!(
                    "{}: available_{name}={available} != total {total} - allocated {allocated}",
                    self.worker_id
                ));
            }
        }
        out
    }
}

/// An ASSIGNMENTS document: one placement of a task on a worker, holding its reservation
/// until released.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Assignment {
    // --- seed fields ---
    pub ass_id: String,
    pub task_id: String,
    pub worker_id: String,
    pub assigned_at: DateTime<Utc>,
    // --- additions ---
    /// The amounts reserved on the worker, returned by the release.
    pub req_cpu: f64,
    pub req_memory: f64,
    pub req_storage: f64,
    pub req_gpu: f64,
    /// Which attempt of the task this is (1-based).
    pub attempt: u32,
    /// Set exactly once, by the release that returned the reservation.
    pub released: bool,
    pub released_at: Option<DateTime<Utc>>,
    /// The claim of the placement that made this assignment (the task records it when that
    /// placement marks it running).
    #[serde(default)]
    pub placed_by: Option<String>,
    /// The worker's `accounting_epoch` read just before the placement reserved these amounts
    /// (stores whose placement is several writes; `None` elsewhere). An assignment released
    /// before its task ran returns its amounts only while the worker still has this epoch: a
    /// recount since may have left them out (docs/consistency.md). Internal: not in the API.
    #[serde(skip)]
    pub reserved_epoch: Option<i64>,
}

impl Assignment {
    /// A new assignment id.
    pub fn new_id() -> String {
        format!("ass-{}", uuid::Uuid::now_v7().simple())
    }

    /// The assignment of `task` on `worker_id` for its next attempt, by the placement `claim`.
    pub fn for_next_attempt(task: &Task, worker_id: &str, claim: &str, at: DateTime<Utc>) -> Self {
        let request = task.request();
        Assignment {
            ass_id: Self::new_id(),
            task_id: task.task_id.clone(),
            worker_id: worker_id.to_string(),
            assigned_at: at,
            req_cpu: request.cpu,
            req_memory: request.memory,
            req_storage: request.storage,
            req_gpu: request.gpu,
            attempt: task.attempts.saturating_add(1),
            released: false,
            released_at: None,
            placed_by: Some(claim.to_string()),
            reserved_epoch: None,
        }
    }

    /// True when this assignment is the one `task`'s current attempt was placed with: same
    /// attempt number, made by the placement that started it. A placement that died after
    /// inserting its assignment leaves one with the same attempt number behind, which a later
    /// placement of the task supersedes: that one is not the task's. (Records written before
    /// placements were recorded match on the attempt alone.)
    pub fn is_attempt_of(&self, task: &Task) -> bool {
        self.task_id == task.task_id
            && self.attempt == task.attempts
            && match (&self.placed_by, &task.placed_by) {
                (Some(ours), Some(theirs)) => ours == theirs,
                _ => true,
            }
    }

    /// True while `task` runs under this assignment: running, at this attempt.
    pub fn holds(&self, task: &Task) -> bool {
        task.status == TaskStatus::Running && self.is_attempt_of(task)
    }

    pub fn request(&self) -> Resources {
        Resources::new(
            self.req_cpu,
            self.req_memory,
            self.req_storage,
            self.req_gpu,
        )
    }
}

/// Outcome recorded in RESULTS.status (the seed's values).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum ResultStatus {
    Success,
    Failed,
    Cancelled,
}

impl ResultStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            ResultStatus::Success => "success",
            ResultStatus::Failed => "failed",
            ResultStatus::Cancelled => "cancelled",
        }
    }
}

impl FromStr for ResultStatus {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "success" => Ok(ResultStatus::Success),
            "failed" => Ok(ResultStatus::Failed),
            "cancelled" => Ok(ResultStatus::Cancelled),
            other => Err(format!("unknown result status '{other}'")),
        }
    }
}

/// A RESULTS document: at most one per task.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct TaskResult {
    // --- seed fields ---
    pub task_id: String,
    pub worker_id: String,
    pub status: ResultStatus,
    pub logs: String,
    pub completed_at: DateTime<Utc>,
    // --- additions ---
    pub exit_code: Option<i64>,
    pub error: Option<String>,
    /// True when `logs` was cut to the configured bound.
    pub logs_truncated: bool,
    /// The container's standard error (`logs` is its standard output), bounded the same way.
    #[serde(default)]
    pub stderr: String,
    #[serde(default)]
    pub stderr_truncated: bool,
    /// Killed by the kernel for going over its memory limit.
    #[serde(default)]
    pub oom_killed: bool,
    /// Which attempt of the task this is the result of (0: unknown, a result from before
    /// attempts were recorded).
    #[serde(default)]
    pub attempt: u32,
    /// Seconds from the container's start to its end, when the start was reported: what the
    /// runtime statistics that placement policies see are made of.
    #[serde(default)]
    pub runtime_s: Option<f64>,
    /// The task's type ([`Task::task_type`]), recorded for those statistics.
    #[serde(default)]
    pub task_type: Option<String>,
}

/// One successful run's duration, from RESULTS.
#[derive(Debug, Clone, PartialEq)]
pub struct RuntimeSample {
    pub worker_id: String,
    pub task_type: String,
    pub runtime_s: f64,
}

/// Which decision a policy component makes (docs/consistency.md, "Policies"): one active
/// version per kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum PolicyKind {
    /// Chooses a worker for each queued task.
    Placement,
    /// Accepts, rejects or defers each pending task.
    Admission,
}

impl PolicyKind {
    pub const ALL: [PolicyKind; 2] = [PolicyKind::Placement, PolicyKind::Admission];

    pub fn as_str(self) -> &'static str {
        match self {
            PolicyKind::Placement => "placement",
            PolicyKind::Admission => "admission",
        }
    }
}

impl fmt::Display for PolicyKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for PolicyKind {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        PolicyKind::ALL
            .into_iter()
            .find(|kind| kind.as_str() == s)
            .ok_or_else(|| format!("unknown policy kind '{s}' (expected placement or admission)"))
    }
}

/// One uploaded version of a policy component: its metadata. The component's bytes are
/// stored beside it (in chunks) and read with `Store::get_policy_bytes`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct PolicyVersion {
    pub name: String,
    pub version: String,
    pub kind: PolicyKind,
    /// SHA-256 (hex, lowercase) of the component's bytes.
    pub sha256: String,
    pub size_bytes: u64,
    /// The policy's configuration, JSON text, passed to its `configure` at load time.
    pub config: String,
    pub uploaded_at: DateTime<Utc>,
    pub uploaded_by: String,
    /// The version's own memory limit, in bytes; the host's default when absent.
    #[serde(default)]
    pub memory_bytes: Option<u64>,
    /// The version's own deadline per evaluation, in ms; the host's default when absent.
    #[serde(default)]
    pub deadline_ms: Option<u64>,
}

/// The version of a kind's policy that the hosts run now.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ActivePolicy {
    pub kind: PolicyKind,
    pub name: String,
    pub version: String,
    pub activated_at: DateTime<Utc>,
    pub activated_by: String,
    /// The (name, version) active before this one, for a rollback.
    pub previous: Option<(String, String)>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantized_amounts_add_and_subtract_exactly() {
        let a = quantize(0.1);
        let b = quantize(0.2);
        let total = quantize(7.3);
        let allocated = a + b;
        assert_eq!(allocated - b, a);
        assert_eq!((total - allocated) + allocated, total);
        // The unquantized decimals do not: this is why requests are quantized.
        assert_ne!(0.1 + 0.2, 0.3);
    }

    #[test]
    fn task_status_round_trips_through_its_name() {
        for status in TaskStatus::ALL {
            assert_eq!(status.as_str().parse::<TaskStatus>(), Ok(status));
        }
        assert!("done".parse::<TaskStatus>().is_err());
    }

    #[test]
    fn policy_kind_round_trips_through_its_name_and_serde() {
        for kind in PolicyKind::ALL {
            assert_eq!(kind.as_str().parse::<PolicyKind>(), Ok(kind));
            assert_eq!(
                serde_json::to_string(&kind).ok(),
                Some(format!("\"{}\"", kind.as_str()))
            );
        }
        assert!("Placement".parse::<PolicyKind>().is_err());
    }

    #[test]
    fn invariant_reports_drift() {
        let mut w = Worker::new(
            "w".into(),
            "127.0.0.1:1".into(),
            Resources::new(4.0, 8.0, 10.0, 0.0),
            BTreeMap::new(),
            String::new(),
        );
        assert!(w.invariant_violations().is_empty());
        w.allocated_cpu = 1.0;
        assert_eq!(w.invariant_violations().len(), 1);
        w.available_cpu = 3.0;
        assert!(w.invariant_violations().is_empty());
        w.allocated_cpu = 5.0;
        w.available_cpu = -1.0;
        assert_eq!(w.invariant_violations().len(), 1);
    }
}
