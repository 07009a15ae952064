//! What worker agents call with their own token: fetch their work (a long poll), say a task's
//! container started, and report its result. Every report is keyed by the assignment, so a
//! worker that lost a task (the reconciler re-queued it, maybe elsewhere) can never start or
//! finish a later attempt.

use std::collections::BTreeMap;
use std::time::Duration;

use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::routing::{get, post};
use axum::{Json, Router};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use utoipa::{IntoParams, ToSchema};

use super::auth::Principal;
use super::error::{ApiError, ApiResult, ErrorBody};
use super::extract::{ValidJson, Validate, validate_id};
use super::{AppState, Limits};
use crate::model::{self, Assignment, ResultStatus, Task, TaskResult, TaskStatus};
use crate::scheduler::{Finish, finish_attempt};
use crate::store::{AssignmentFilter, StoreError, TaskUpdate};

/// Longest long poll an agent may ask for.
const MAX_WAIT: Duration = Duration::from_secs(60);
/// How often a long poll re-reads the store: changes made through another replica (a
/// placement, a cancellation, the reconciler) reach the agent within this.
const STORE_RECHECK: Duration = Duration::from_millis(500);

pub fn router(limits: &Limits) -> Router<AppState> {
    Router::new()
        .route("/v1/workers/{worker_id}/work", get(get_work))
        .route(
            "/v1/workers/{worker_id}/assignments/{ass_id}/started",
            post(report_started),
        )
        .route(
            "/v1/workers/{worker_id}/assignments/{ass_id}/result",
            // Both streams at their bound, and room for the rest of the report.
            post(report_result).layer(DefaultBodyLimit::max(
                limits.max_log_bytes.saturating_mul(4) + 64 * 1024,
            )),
        )
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
    /// Changes whenever the list does: pass it back as `known` to wait for the next change.
    pub version: String,
    pub work: Vec<Work>,
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct WorkQuery {
    /// The `version` the agent has: the answer waits until the list differs from it.
    pub known: Option<String>,
    /// How long to wait for a change, ms (default 0: answer at once; at most 60000).
    pub wait_ms: Option<u64>,
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
    pub error: Option<String>,
    /// When the container stopped (default: when the report arrives).
    pub finished_at: Option<DateTime<Utc>>,
}

impl Validate for ResultReport {
    fn validate(&self, _limits: &Limits) -> Result<(), ApiError> {
        if self.outcome == Outcome::Failed && self.exit_code.is_none() {
            return Err(ApiError::validation("a failed outcome needs its exit_code"));
        }
        if self.outcome == Outcome::Error && self.error.as_deref().is_none_or(str::is_empty) {
            return Err(ApiError::validation("an error outcome needs its error"));
        }
        if self.error.as_ref().is_some_and(|e| e.len() > 4096) {
            return Err(ApiError::validation("error is longer than 4096 bytes"));
        }
        Ok(())
    }
}

/// What the host made of a report.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ReportAck {
    pub task_id: String,
    /// The task's status after the report.
    pub status: TaskStatus,
}

fn require_self(principal: &Principal, worker_id: &str) -> ApiResult<()> {
    match principal {
        Principal::Worker { worker_id: me } if me == worker_id => Ok(()),
        _ => Err(ApiError::forbidden(format!(
            "only worker {worker_id}'s own token may fetch or report its work"
        ))),
    }
}

fn ids(worker_id: &str, ass_id: &str) -> ApiResult<()> {
    for id in [worker_id, ass_id] {
        validate_id(id)
            .map_err(|why| ApiError::bad_request("invalid_id", format!("invalid id: {why}")))?;
    }
    Ok(())
}

/// The assignment, checked to be this worker's.
async fn own_assignment(state: &AppState, worker_id: &str, ass_id: &str) -> ApiResult<Assignment> {
    let assignment = state.store.get_assignment(ass_id).await?;
    if assignment.worker_id != worker_id {
        return Err(ApiError::not_found(
            "assignment_not_found",
            format!("assignment {ass_id} is not worker {worker_id}'s"),
        ));
    }
    Ok(assignment)
}

fn superseded(ass_id: &str, why: &str) -> ApiError {
    ApiError::conflict(
        "assignment_superseded",
        format!("assignment {ass_id} no longer holds its task ({why}): drop this report"),
    )
}

/// The work of one worker now: its unreleased assignments whose task runs at their attempt.
async fn work_of(state: &AppState, worker_id: &str) -> ApiResult<WorkList> {
    let assignments = state
        .store
        .list_assignments(&AssignmentFilter {
            worker_id: Some(worker_id.to_string()),
            active_only: true,
            ..AssignmentFilter::default()
        })
        .await?;
    let mut work = Vec::with_capacity(assignments.len());
    for a in assignments {
        let task = match state.store.get_task(&a.task_id).await {
            Ok(task) => task,
            Err(StoreError::NotFound { .. }) => continue,
            Err(other) => return Err(other.into()),
        };
        if task.status != TaskStatus::Running || task.attempts != a.attempt {
            continue; // finished, or re-queued: the reconciler returns the reservation
        }
        work.push(work_item(a, task));
    }
    work.sort_by(|x, y| x.ass_id.cmp(&y.ass_id));
    let mut digest = Sha256::new();
    for w in &work {
        digest.update(w.ass_id.as_bytes());
        digest.update([u8::from(w.cancel), u8::from(w.started_at.is_some())]);
    }
    Ok(WorkList {
        version: hex::encode(&digest.finalize()[..12]),
        work,
    })
}

fn work_item(a: Assignment, task: Task) -> Work {
    Work {
        ass_id: a.ass_id,
        task_id: task.task_id,
        attempt: a.attempt,
        docker_image: task.docker_image,
        command: task.command,
        env: task.env,
        req_cpu: a.req_cpu,
        req_memory: a.req_memory,
        req_storage: a.req_storage,
        req_gpu: a.req_gpu,
        timeout_s: task.timeout_s,
        assigned_at: a.assigned_at,
        started_at: task.started_at,
        cancel: task.cancel_requested,
    }
}

/// The tasks this worker should run (its own token). With `known` and `wait_ms`, waits until
/// the list changes: a placement on this replica answers at once, any other change within
/// half a second.
#[utoipa::path(get, path = "/v1/workers/{worker_id}/work", tag = "agents",
    security(("bearer" = [])),
    params(("worker_id" = String, Path, description = "Worker id"), WorkQuery),
    responses(
        (status = 200, description = "This worker's work", body = WorkList),
        (status = 401, description = "No valid token", body = ErrorBody),
        (status = 403, description = "Not this worker's token", body = ErrorBody),
    ))]
pub async fn get_work(
    State(state): State<AppState>,
    principal: Principal,
    Path(worker_id): Path<String>,
    Query(query): Query<WorkQuery>,
) -> ApiResult<Json<WorkList>> {
    require_self(&principal, &worker_id)?;
    let wait = Duration::from_millis(query.wait_ms.unwrap_or(0)).min(MAX_WAIT);
    let deadline = tokio::time::Instant::now() + wait;
    // Subscribed before the first read, so that a placement between the read and the wait
    // is not missed.
    let mut signal = state.work.subscribe();
    loop {
        let list = work_of(&state, &worker_id).await?;
        if query.known.as_deref() != Some(list.version.as_str())
            || tokio::time::Instant::now() >= deadline
        {
            return Ok(Json(list));
        }
        let recheck = (tokio::time::Instant::now() + STORE_RECHECK).min(deadline);
        tokio::select! {
            _ = signal.changed() => {}
            () = tokio::time::sleep_until(recheck) => {}
        }
    }
}

/// Records that the container of an assignment started (`started_at`).
#[utoipa::path(post, path = "/v1/workers/{worker_id}/assignments/{ass_id}/started", tag = "agents",
    security(("bearer" = [])),
    params(
        ("worker_id" = String, Path, description = "Worker id"),
        ("ass_id" = String, Path, description = "Assignment id"),
    ),
    responses(
        (status = 200, description = "Recorded", body = ReportAck),
        (status = 403, description = "Not this worker's token", body = ErrorBody),
        (status = 404, description = "No such assignment of this worker (`assignment_not_found`)", body = ErrorBody),
        (status = 409, description = "The assignment no longer holds its task (`assignment_superseded`): stop the container", body = ErrorBody),
    ))]
pub async fn report_started(
    State(state): State<AppState>,
    principal: Principal,
    Path((worker_id, ass_id)): Path<(String, String)>,
) -> ApiResult<Json<ReportAck>> {
    ids(&worker_id, &ass_id)?;
    require_self(&principal, &worker_id)?;
    let assignment = own_assignment(&state, &worker_id, &ass_id).await?;
    if assignment.released {
        return Err(superseded(&ass_id, "its reservation was returned"));
    }
    let task = state.store.get_task(&assignment.task_id).await?;
    if task
        .started_at
        .is_some_and(|at| at >= assignment.assigned_at)
    {
        // A repeated report: keep the first time.
        return Ok(Json(ReportAck {
            task_id: task.task_id,
            status: task.status,
        }));
    }
    let task = state
        .store
        .transition_attempt(
            &assignment.task_id,
            assignment.attempt,
            &[TaskStatus::Running],
            TaskStatus::Running,
            &TaskUpdate {
                started_at: Some(model::now()),
                ..TaskUpdate::default()
            },
        )
        .await
        .map_err(|e| match e {
            StoreError::Conflict { .. } => {
                superseded(&ass_id, "the task is no longer running this attempt")
            }
            other => other.into(),
        })?;
    tracing::info!(task_id = %task.task_id, worker_id, ass_id, "container started");
    Ok(Json(ReportAck {
        task_id: task.task_id,
        status: task.status,
    }))
}

/// Cuts `text` to at most `max` bytes on a character boundary, with a marker.
fn bound(mut text: String, max: usize, truncated: bool) -> (String, bool) {
    if text.len() <= max {
        return (text, truncated);
    }
    let mut cut = max;
    while !text.is_char_boundary(cut) {
        cut -= 1;
    }
    text.truncate(cut);
    text.push_str(&format!(
        "\n[cloudai: output truncated after {max} bytes]\n"
    ));
    (text, true)
}

/// Records the end of an attempt: the RESULT (stdout in `logs`, stderr apart), the task's final
/// state, and the reservation returned. A repeated report answers as the first did; a report
/// for an assignment that no longer holds its task is refused (409) and changes nothing.
#[utoipa::path(post, path = "/v1/workers/{worker_id}/assignments/{ass_id}/result", tag = "agents",
    security(("bearer" = [])),
    params(
        ("worker_id" = String, Path, description = "Worker id"),
        ("ass_id" = String, Path, description = "Assignment id"),
    ),
    request_body = ResultReport,
    responses(
        (status = 200, description = "Recorded (or already recorded)", body = ReportAck),
        (status = 403, description = "Not this worker's token", body = ErrorBody),
        (status = 404, description = "No such assignment of this worker (`assignment_not_found`)", body = ErrorBody),
        (status = 409, description = "The assignment no longer holds its task (`assignment_superseded`): drop the report", body = ErrorBody),
        (status = 422, description = "Invalid report", body = ErrorBody),
    ))]
pub async fn report_result(
    State(state): State<AppState>,
    principal: Principal,
    Path((worker_id, ass_id)): Path<(String, String)>,
    ValidJson(report): ValidJson<ResultReport>,
) -> ApiResult<Json<ReportAck>> {
    ids(&worker_id, &ass_id)?;
    require_self(&principal, &worker_id)?;
    let assignment = own_assignment(&state, &worker_id, &ass_id).await?;
    let task = state.store.get_task(&assignment.task_id).await?;
    let ours = task.attempts == assignment.attempt;
    if assignment.released || task.status != TaskStatus::Running || !ours {
        // Our own earlier report, retried after its answer was lost?
        if ours
            && task.status.is_terminal()
            && let Ok(result) = state.store.get_result(&task.task_id).await
            && result.attempt == assignment.attempt
            && result.worker_id == worker_id
        {
            return Ok(Json(ReportAck {
                task_id: task.task_id,
                status: task.status,
            }));
        }
        return Err(superseded(
            &ass_id,
            &format!("the task is {} at attempt {}", task.status, task.attempts),
        ));
    }

    let max = state.limits.max_log_bytes;
    let (logs, logs_truncated) = bound(report.stdout, max, report.stdout_truncated);
    let (stderr, stderr_truncated) = bound(report.stderr, max, report.stderr_truncated);
    let (status, finish) = match report.outcome {
        Outcome::Completed => (
            ResultStatus::Success,
            Finish::Completed {
                exit_code: report.exit_code.unwrap_or(0),
            },
        ),
        Outcome::Cancelled => (
            ResultStatus::Cancelled,
            Finish::Cancelled {
                reason: "cancelled by its owner".into(),
            },
        ),
        other => {
            let error = match other {
                Outcome::Failed => {
                    format!("exited with code {}", report.exit_code.unwrap_or_default())
                }
                Outcome::OomKilled => format!(
                    "oom_killed: went over its memory limit of {} GB",
                    assignment.req_memory
                ),
                Outcome::TimedOut => format!(
                    "timeout: still running after its timeout_s of {}",
                    task.timeout_s.unwrap_or_default()
                ),
                _ => report
                    .error
                    .clone()
                    .unwrap_or_else(|| "the worker could not run it".into()),
            };
            (
                ResultStatus::Failed,
                Finish::Failed {
                    error,
                    exit_code: report.exit_code,
                },
            )
        }
    };
    let error = match &finish {
        Finish::Failed { error, .. } => Some(error.clone()),
        _ => None,
    };
    let result = TaskResult {
        task_id: task.task_id.clone(),
        worker_id: worker_id.clone(),
        status,
        logs,
        completed_at: report.finished_at.unwrap_or_else(model::now),
        exit_code: report.exit_code,
        error,
        logs_truncated,
        stderr,
        stderr_truncated,
        oom_killed: report.outcome == Outcome::OomKilled,
        attempt: assignment.attempt,
    };
    match state.store.insert_result(&result).await {
        // Written by our own earlier try that failed before the transition.
        Ok(()) | Err(StoreError::AlreadyExists { .. }) => {}
        Err(other) => return Err(other.into()),
    }
    let task = finish_attempt(&*state.store, &state.wakeup, &ass_id, finish)
        .await
        .map_err(|e| match e {
            StoreError::Conflict { .. } => superseded(&ass_id, "it was finished meanwhile"),
            other => other.into(),
        })?;
    tracing::info!(
        task_id = %task.task_id, worker_id, ass_id, status = %task.status,
        exit_code = ?report.exit_code, "attempt finished"
    );
    Ok(Json(ReportAck {
        task_id: task.task_id,
        status: task.status,
    }))
}

#[cfg(test)]
mod tests {
    use super::bound;

    #[test]
    fn bound_cuts_on_a_character_boundary_with_a_marker() {
        assert_eq!(bound("abc".into(), 3, false), ("abc".into(), false));
        assert_eq!(bound("abc".into(), 3, true), ("abc".into(), true));
        let (text, cut) = bound("héllo".into(), 2, false);
        assert!(cut);
        assert!(
            text.starts_with("h\n[cloudai: output truncated after 2 bytes]"),
            "{text}"
        );
    }
}
