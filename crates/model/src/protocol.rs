//! The worker protocol: the messages a worker agent and the host exchange over HTTP (its work
//! list, start and result reports, live output, stored outputs), shared by the host's
//! handlers (`api::agent`, which validates and applies them) and the worker (`worker`), so
//! that neither imports the other. A leaf: it needs only the model's types.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::TaskStatus;

/// The worker protocol's routes, from one place: each template is what the host's router
/// serves and its OpenAPI document names (axum's `{param}` syntax); each function is the path
/// the worker calls.
pub mod route {
    /// `POST`: a worker joins (with the join token) or registers again.
    pub const REGISTER: &str = "/v1/workers";
    /// `POST`: a worker's heartbeat.
    pub const HEARTBEAT: &str = "/v1/workers/{worker_id}/heartbeat";
    /// `GET`: the long poll for a worker's work list.
    pub const WORK: &str = "/v1/workers/{worker_id}/work";
    /// `POST`: an assignment's container started.
    pub const STARTED: &str = "/v1/workers/{worker_id}/assignments/{ass_id}/started";
    /// `POST`: an assignment's result.
    pub const RESULT: &str = "/v1/workers/{worker_id}/assignments/{ass_id}/result";
    /// `POST`: a batch of start and result reports.
    pub const REPORTS: &str = "/v1/workers/{worker_id}/reports";
    /// `POST`: a batch of an assignment's live output.
    pub const LOGS: &str = "/v1/workers/{worker_id}/assignments/{ass_id}/logs";
    /// `POST`: one of an assignment's output files.
    pub const OUTPUTS: &str = "/v1/workers/{worker_id}/assignments/{ass_id}/outputs";
    /// Every route of the protocol.
    pub const ALL: [&str; 8] = [
        REGISTER, HEARTBEAT, WORK, STARTED, RESULT, REPORTS, LOGS, OUTPUTS,
    ];

    /// `template` with its parameters filled in.
    fn fill(template: &str, worker_id: &str, ass_id: &str) -> String {
        template
            .replace("{worker_id}", worker_id)
            .replace("{ass_id}", ass_id)
    }

    pub fn heartbeat(worker_id: &str) -> String {
        fill(HEARTBEAT, worker_id, "")
    }

    pub fn work(worker_id: &str) -> String {
        fill(WORK, worker_id, "")
    }

    pub fn started(worker_id: &str, ass_id: &str) -> String {
        fill(STARTED, worker_id, ass_id)
    }

    pub fn result(worker_id: &str, ass_id: &str) -> String {
        fill(RESULT, worker_id, ass_id)
    }

    pub fn reports(worker_id: &str) -> String {
        fill(REPORTS, worker_id, "")
    }

    pub fn logs(worker_id: &str, ass_id: &str) -> String {
        fill(LOGS, worker_id, ass_id)
    }

    pub fn outputs(worker_id: &str, ass_id: &str) -> String {
        fill(OUTPUTS, worker_id, ass_id)
    }

    #[cfg(test)]
    mod tests {
        #[test]
        fn the_paths_fill_every_parameter_of_their_template() {
            let paths = [
                super::heartbeat("w1"),
                super::work("w1"),
                super::started("w1", "a1"),
                super::result("w1", "a1"),
                super::reports("w1"),
                super::logs("w1", "a1"),
                super::outputs("w1", "a1"),
            ];
            for path in &paths {
                assert!(
                    !path.contains('{') && path.starts_with("/v1/workers/w1/"),
                    "{path}"
                );
            }
            assert_eq!(
                super::result("w1", "a1"),
                "/v1/workers/w1/assignments/a1/result"
            );
        }
    }
}

/// One task this worker should be running.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Work {
    pub ass_id: String,
    pub task_id: String,
    /// Which attempt of the task (1-based).
    pub attempt: u32,
    pub docker_image: String,
    pub command: Option<String>,
    pub env: BTreeMap<String, String>,
    pub req_cpu: f64,
    pub req_memory: f64,
    pub req_storage: f64,
    pub req_gpu: f64,
    pub timeout_s: Option<u64>,
    pub assigned_at: DateTime<Utc>,
    /// Set once the agent reported the container started.
    pub started_at: Option<DateTime<Utc>>,
    /// The owner asked to stop it: stop the container and report `cancelled`.
    pub cancel: bool,
}

/// Everything this worker should be running now. A container the agent runs for an
/// assignment missing from the list must be stopped: the task was cancelled, timed out, or
/// given to another worker.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct WorkList {
    /// Changes whenever the host changes this worker's work (an assignment added or gone, a
    /// cancellation asked), not on the worker's own start reports: pass it back as `known` to
    /// wait for the next change.
    pub version: String,
    pub work: Vec<Work>,
}

/// How an attempt ended, as the worker saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// The container exited 0.
    Completed,
    /// It exited non-zero (`exit_code`).
    Failed,
    /// Killed for going over its memory limit.
    OomKilled,
    /// Stopped at its `timeout_s`.
    TimedOut,
    /// Stopped because its owner cancelled it.
    Cancelled,
    /// It could not run: the image could not be pulled, the container not created, ...
    /// (`error` says why).
    Error,
}

/// The end of an attempt.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ResultReport {
    pub outcome: Outcome,
    pub exit_code: Option<i64>,
    /// Standard output, as kept by the worker (the host cuts it to its own bound too).
    #[serde(default)]
    pub stdout: String,
    #[serde(default)]
    pub stderr: String,
    #[serde(default)]
    pub stdout_truncated: bool,
    #[serde(default)]
    pub stderr_truncated: bool,
    /// A stable code and message for `error` outcomes, e.g. `image_pull_failed: ...`.
    #[schema(max_length = 4096)]
    pub error: Option<String>,
    /// When the container stopped (default: when the report arrives).
    pub finished_at: Option<DateTime<Utc>>,
    /// When the container started, by the same (the worker's) clock as `finished_at`: with
    /// both, the attempt's run time is measured on one clock (else from the host's record of
    /// the start report, which a clock skew between host and worker would bend).
    #[serde(default)]
    pub started_at: Option<DateTime<Utc>>,
}

/// What the host made of a report.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ReportAck {
    pub task_id: String,
    /// The task's status after the report.
    pub status: TaskStatus,
}

/// One report of a batch: an assignment's container started, its attempt ended, or both (a
/// short task that started and ended before the worker sent anything).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct WorkReport {
    #[schema(min_length = 1, max_length = 128, pattern = "^[A-Za-z0-9._-]{1,128}$")]
    pub ass_id: String,
    /// The container started, as `POST .../assignments/{ass_id}/started` records it.
    #[serde(default)]
    pub started: bool,
    /// The attempt ended, as `POST .../assignments/{ass_id}/result` records it (after the
    /// start when both are given).
    pub result: Option<ResultReport>,
}

/// Several reports of one worker at once: one request for many tasks.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ReportBatch {
    /// 1 to 1000 reports, each of another assignment.
    #[schema(min_items = 1, max_items = 1000)]
    pub reports: Vec<WorkReport>,
}

/// What became of one report of a batch.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct WorkReportAck {
    pub ass_id: String,
    /// Applied: the task, and its status after the report.
    pub task_id: Option<String>,
    pub status: Option<TaskStatus>,
    /// Refused, with the code the one-report endpoints answer: `assignment_superseded` (stop
    /// the container, drop the report), `assignment_not_found`, or `internal` (send it again).
    pub error: Option<ReportError>,
}

/// Why a report of a batch was refused.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ReportError {
    pub code: String,
    pub message: String,
}

/// The answer to a batch: one acknowledgement per report, in the order of the request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ReportBatchAck {
    pub acks: Vec<WorkReportAck>,
}

/// Which stream a piece of output came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum StreamName {
    Stdout,
    Stderr,
}

impl StreamName {
    pub fn as_str(self) -> &'static str {
        match self {
            StreamName::Stdout => "stdout",
            StreamName::Stderr => "stderr",
        }
    }
}

/// A piece of a running task's output.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LiveChunk {
    /// Numbers the chunks of an attempt across both streams, from 0: a chunk sent again
    /// with the same `seq` is stored once.
    pub seq: u64,
    pub stream: StreamName,
    /// Where `text` starts in its stream, in bytes: what the host's bound applies to.
    pub offset: u64,
    /// UTF-8 (invalid bytes replaced).
    pub text: String,
}

/// A batch of live output.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LiveLogs {
    pub chunks: Vec<LiveChunk>,
}

/// What the host kept of a batch.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct LiveLogsAck {
    /// Chunks stored now (a chunk sent before is not counted again).
    pub stored: u32,
    /// The host keeps no more of standard output: stop sending it.
    pub stdout_full: bool,
    pub stderr_full: bool,
}

/// One stored output file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct OutputEntry {
    pub path: String,
    pub size_bytes: u64,
    pub sha256: String,
    /// The attempt that wrote it.
    pub attempt: u32,
}
