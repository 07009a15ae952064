//! What worker agents call with their own token: fetch their work (a long poll), say a task's
//! container started, and report its result. Every report is keyed by the assignment, so a
//! worker that lost a task (the reconciler re-queued it, maybe elsewhere) can never start or
//! finish a later attempt.

use std::time::Duration;

use axum::body::Bytes;
use axum::extract::rejection::QueryRejection;
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};
use chrono::{DateTime, Utc};
use futures::StreamExt;
use serde::Deserialize;
use sha2::{Digest, Sha256};
use utoipa::IntoParams;

use super::auth::Principal;
use super::error::{ApiError, ApiResult, ErrorBody};
use super::extract::{IdPath, ValidJson, Validate, truncate_for_message, validate_id};
use super::{AppState, Limits};
use crate::lifecycle::{Cause, Finish};
use crate::model::{self, Assignment, ResultStatus, Task, TaskResult, TaskStatus};
use crate::protocol::route;
pub use crate::protocol::{
    LiveChunk, LiveLogs, LiveLogsAck, Outcome, OutputEntry, ReportAck, ReportBatch, ReportBatchAck,
    ReportError, ResultReport, StreamName, Work, WorkList, WorkReport, WorkReportAck,
};
use crate::store::{StoreError, TaskLogChunk};

/// Longest long poll an agent may ask for.
const MAX_WAIT: Duration = Duration::from_secs(60);
/// How often a long poll re-reads the store: changes made through another replica (a
/// placement, a cancellation, the reconciler) reach the agent within this.
const STORE_RECHECK: Duration = Duration::from_millis(500);

pub fn router(limits: &Limits) -> Router<AppState> {
    Router::new()
        .route(route::WORK, get(get_work))
        .route(route::STARTED, post(report_started))
        .route(
            route::RESULT,
            // Both streams at their bound, and room for the rest of the report.
            post(report_result).layer(DefaultBodyLimit::max(
                limits.max_log_bytes.saturating_mul(4) + 64 * 1024,
            )),
        )
        .route(
            route::REPORTS,
            post(report_batch).layer(DefaultBodyLimit::max(MAX_REPORT_BATCH_BODY)),
        )
        .route(
            route::LOGS,
            // A worker's batch holds at most 128 KiB of text, JSON-escaped.
            post(report_logs).layer(DefaultBodyLimit::max(MAX_LOG_BATCH_BODY)),
        )
        .route(
            route::OUTPUTS,
            post(upload_output).layer(DefaultBodyLimit::max(limits.max_output_bytes)),
        )
}

/// Most reports in one batch (`POST /v1/workers/{id}/reports`).
pub const MAX_BATCH_REPORTS: usize = 1000;
/// Largest body of a batch of reports: results with large logs go one by one.
const MAX_REPORT_BATCH_BODY: usize = 8 << 20;
/// Reports of one batch applied at the same time (their store writes share commits).
const REPORTS_IN_FLIGHT: usize = 32;

/// Largest body of a batch of live output.
const MAX_LOG_BATCH_BODY: usize = 2 << 20;
/// Most chunks in one batch.
const MAX_LOG_BATCH_CHUNKS: usize = 4096;
/// Longest output file path, in bytes.
pub(crate) const MAX_OUTPUT_PATH: usize = 1024;

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct WorkQuery {
    /// The `version` of the previous answer this agent holds: the answer waits (up to
    /// `wait_ms`) until the work list differs from that one. Absent: answer at once.
    pub known: Option<String>,
    /// How long to wait for a change, ms (default 0: answer at once).
    #[param(minimum = 0, maximum = 60000)]
    pub wait_ms: Option<u64>,
}

/// Longest `error` of a result report.
const MAX_ERROR_CHARS: usize = 4096;

impl Validate for ResultReport {
    fn validate(&self, _limits: &Limits) -> Result<(), ApiError> {
        // A failed outcome without its exit code, or an error without its reason, is still
        // the end of the attempt: the task's error then says what is known.
        if self
            .error
            .as_ref()
            .is_some_and(|e| e.chars().count() > MAX_ERROR_CHARS)
        {
            return Err(ApiError::validation(format!(
                "error is longer than {MAX_ERROR_CHARS} characters"
            )));
        }
        Ok(())
    }
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

/// The work of one worker now: its unreleased assignments whose task runs under them (one
/// store query). The version changes only when the host changes this work: an assignment
/// added or gone, a cancellation asked; not when the worker itself reports a start.
async fn work_of(state: &AppState, worker_id: &str) -> ApiResult<WorkList> {
    let work: Vec<Work> = state
        .store
        .worker_work(worker_id)
        .await?
        .into_iter()
        .map(|(a, task)| work_item(a, task))
        .collect();
    let mut digest = Sha256::new();
    for w in &work {
        digest.update(w.ass_id.as_bytes());
        digest.update([u8::from(w.cancel)]);
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
    query: Result<Query<WorkQuery>, QueryRejection>,
) -> ApiResult<Json<WorkList>> {
    let Query(query) = query.map_err(|e| ApiError::bad_request("invalid_query", e.body_text()))?;
    require_self(&principal, &worker_id)?;
    let wait = Duration::from_millis(query.wait_ms.unwrap_or(0));
    if wait > MAX_WAIT {
        return Err(ApiError::bad_request(
            "invalid_query",
            format!("wait_ms must be at most {}", MAX_WAIT.as_millis()),
        ));
    }
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
    record_started(&state, &worker_id, &ass_id).await.map(Json)
}

/// A start report of this worker's (checked to be its own).
async fn record_started(state: &AppState, worker_id: &str, ass_id: &str) -> ApiResult<ReportAck> {
    let assignment = own_assignment(state, worker_id, ass_id).await?;
    if assignment.released {
        return Err(superseded(ass_id, "its reservation was returned"));
    }
    let task = state.store.get_task(&assignment.task_id).await?;
    if task
        .started_at
        .is_some_and(|at| at >= assignment.assigned_at)
    {
        // A repeated report: keep the first time.
        return Ok(ReportAck {
            task_id: task.task_id,
            status: task.status,
        });
    }
    let task = state
        .lifecycle
        .started(&assignment, model::now())
        .await
        .map_err(|e| match e {
            StoreError::Conflict { .. } => {
                superseded(ass_id, "the task is no longer running this attempt")
            }
            other => other.into(),
        })?;
    tracing::info!(task_id = %task.task_id, worker_id, ass_id, "container started");
    Ok(ReportAck {
        task_id: task.task_id,
        status: task.status,
    })
}

impl Validate for ReportBatch {
    fn validate(&self, limits: &Limits) -> Result<(), ApiError> {
        if self.reports.is_empty() || self.reports.len() > MAX_BATCH_REPORTS {
            return Err(ApiError::validation(format!(
                "reports must hold 1..={MAX_BATCH_REPORTS} reports, got {}",
                self.reports.len()
            )));
        }
        let mut seen = std::collections::HashSet::new();
        for (i, report) in self.reports.iter().enumerate() {
            validate_id(&report.ass_id)
                .map_err(|why| ApiError::validation(format!("reports[{i}].ass_id: {why}")))?;
            if !seen.insert(report.ass_id.as_str()) {
                return Err(ApiError::validation(format!(
                    "reports[{i}]: assignment {} appears twice; give its start and its result in one report",
                    report.ass_id
                )));
            }
            match &report.result {
                Some(result) => result.validate(limits).map_err(|e| {
                    ApiError::validation(format!("reports[{i}].result: {}", e.message))
                })?,
                None if !report.started => {
                    return Err(ApiError::validation(format!(
                        "reports[{i}] says nothing: give started, a result, or both"
                    )));
                }
                None => {}
            }
        }
        Ok(())
    }
}

/// Several start and result reports of this worker at once (its own token), each applied as
/// the one-report endpoints apply it; one refused report does not stop the others. What a
/// worker running many short tasks sends instead of two requests per task.
#[utoipa::path(post, path = "/v1/workers/{worker_id}/reports", tag = "agents",
    security(("bearer" = [])),
    params(("worker_id" = String, Path, description = "Worker id")),
    request_body = ReportBatch,
    responses(
        (status = 200, description = "Each report's outcome, in order", body = ReportBatchAck),
        (status = 400, description = "Invalid id or JSON", body = ErrorBody),
        (status = 401, description = "No valid token", body = ErrorBody),
        (status = 403, description = "Not this worker's token", body = ErrorBody),
        (status = 413, description = "Body over 8 MiB: send large results one by one", body = ErrorBody),
        (status = 415, description = "Not application/json", body = ErrorBody),
        (status = 422, description = "Invalid batch (empty, over 1000, an assignment twice, an invalid report)", body = ErrorBody),
    ))]
pub async fn report_batch(
    State(state): State<AppState>,
    principal: Principal,
    IdPath(worker_id): IdPath,
    ValidJson(batch): ValidJson<ReportBatch>,
) -> ApiResult<Json<ReportBatchAck>> {
    require_self(&principal, &worker_id)?;
    let mut pending = Vec::with_capacity(batch.reports.len());
    for report in batch.reports {
        pending.push(apply_report(&state, &worker_id, report));
    }
    let acks = futures::stream::iter(pending)
        .buffered(REPORTS_IN_FLIGHT)
        .collect()
        .await;
    Ok(Json(ReportBatchAck { acks }))
}

async fn apply_report(state: &AppState, worker_id: &str, report: WorkReport) -> WorkReportAck {
    let ass_id = report.ass_id;
    let outcome = match report.result {
        // The start goes with the result, in the same writes.
        Some(result) => record_result(state, worker_id, &ass_id, result, report.started).await,
        None if report.started => record_started(state, worker_id, &ass_id).await,
        None => Err(ApiError::validation("an empty report")),
    };
    match outcome {
        Ok(ack) => WorkReportAck {
            ass_id,
            task_id: Some(ack.task_id),
            status: Some(ack.status),
            error: None,
        },
        Err(error) => WorkReportAck {
            ass_id,
            task_id: None,
            status: None,
            error: Some(ReportError {
                code: error.code.to_string(),
                message: error.message,
            }),
        },
    }
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
    record_result(&state, &worker_id, &ass_id, report, false)
        .await
        .map(Json)
}

/// The end of an attempt of this worker's (checked to be its own). With `started`, the
/// container's start is recorded with it (when it was not already): one write for a task that
/// started and ended before the worker reported either.
async fn record_result(
    state: &AppState,
    worker_id: &str,
    ass_id: &str,
    report: ResultReport,
    started: bool,
) -> ApiResult<ReportAck> {
    let assignment = own_assignment(state, worker_id, ass_id).await?;
    let task = state.store.get_task(&assignment.task_id).await?;
    let ours = assignment.is_attempt_of(&task);
    if assignment.released || task.status != TaskStatus::Running || !ours {
        // Our own earlier report, retried after its answer was lost?
        if ours
            && task.status.is_terminal()
            && let Ok(result) = state.store.get_result(&task.task_id).await
            && result.attempt == assignment.attempt
            && result.worker_id == worker_id
        {
            return Ok(ReportAck {
                task_id: task.task_id,
                status: task.status,
            });
        }
        return Err(superseded(
            ass_id,
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
        // Stopped for a preemption: queued again (below, without a result: the task's
        // result is that of the attempt that ends it).
        Outcome::Cancelled if task.preempted_by.is_some() => (
            ResultStatus::Cancelled,
            Finish::Preempted {
                by: task.preempted_by.clone().unwrap_or_default(),
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
                Outcome::Failed => match report.exit_code {
                    Some(code) => format!("exited with code {code}"),
                    None => "exited with a non-zero code the worker did not report".into(),
                },
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
    let completed_at = report.finished_at.unwrap_or_else(model::now);
    // A start older than the assignment is an earlier attempt's.
    let reported_start = task.started_at.filter(|at| *at >= assignment.assigned_at);
    let new_start = (started && reported_start.is_none()).then(|| completed_at.min(model::now()));
    // This attempt's run time: by the worker's clock when it reported both ends, else from
    // the host's record of the start.
    let seconds = |from: DateTime<Utc>, to: DateTime<Utc>| {
        (to - from).num_milliseconds().max(0) as f64 / 1000.0
    };
    let runtime_s = match (report.started_at, report.finished_at) {
        (Some(from), Some(to)) => Some(seconds(from, to)),
        _ => reported_start
            .or(new_start)
            .map(|at| seconds(at, completed_at)),
    };
    let result = TaskResult {
        task_id: task.task_id.clone(),
        worker_id: worker_id.to_string(),
        status,
        logs,
        completed_at,
        exit_code: report.exit_code,
        error,
        logs_truncated,
        stderr,
        stderr_truncated,
        oom_killed: report.outcome == Outcome::OomKilled,
        attempt: assignment.attempt,
        runtime_s,
        task_type: Some(task.task_type().to_string()),
    };
    let preempted = matches!(finish, Finish::Preempted { .. });
    let stored_bytes = if preempted {
        0
    } else {
        result.logs.len() + result.stderr.len()
    };
    let task = state
        .lifecycle
        .finish_assignment(
            &assignment,
            finish,
            new_start,
            (!preempted).then_some(result),
            Cause::Worker,
        )
        .await
        .map_err(|e| match e {
            StoreError::Conflict { .. } => superseded(ass_id, "it was finished meanwhile"),
            other => other.into(),
        })?;
    crate::metrics::result_log_stored(stored_bytes);
    tracing::info!(
        task_id = %task.task_id, worker_id, ass_id, status = %task.status,
        exit_code = ?report.exit_code, "attempt finished"
    );
    Ok(ReportAck {
        task_id: task.task_id,
        status: task.status,
    })
}

impl Validate for LiveLogs {
    fn validate(&self, _limits: &Limits) -> Result<(), ApiError> {
        if self.chunks.len() > MAX_LOG_BATCH_CHUNKS {
            return Err(ApiError::validation(format!(
                "a batch has at most {MAX_LOG_BATCH_CHUNKS} chunks, got {}",
                self.chunks.len()
            )));
        }
        if self.chunks.iter().any(|c| c.seq > i64::MAX as u64) {
            return Err(ApiError::validation("seq must be at most 2^63-1"));
        }
        Ok(())
    }
}

/// The assignment, checked to be this worker's and to still hold its running task.
async fn live_assignment(
    state: &AppState,
    worker_id: &str,
    ass_id: &str,
) -> ApiResult<(Assignment, Task)> {
    let assignment = own_assignment(state, worker_id, ass_id).await?;
    let task = state.store.get_task(&assignment.task_id).await?;
    if assignment.released || !assignment.holds(&task) {
        return Err(superseded(
            ass_id,
            &format!("the task is {} at attempt {}", task.status, task.attempts),
        ));
    }
    Ok((assignment, task))
}

/// A live chunk cut to the per-stream bound `max`: `None` once the stream is past it; the
/// chunk that crosses it ends with a marker.
fn bound_live(chunk: LiveChunk, max: u64) -> Option<String> {
    if chunk.offset >= max {
        return None;
    }
    let room = usize::try_from(max - chunk.offset).unwrap_or(usize::MAX);
    Some(bound(chunk.text, room, false).0)
}

/// Stores a batch of a running task's output, so that any replica can stream it
/// (`GET /v1/tasks/{id}/logs?follow=true`). Each stream is kept up to `max_log_bytes`; past
/// it chunks are dropped (the one that crosses it ends with a marker).
#[utoipa::path(post, path = "/v1/workers/{worker_id}/assignments/{ass_id}/logs", tag = "agents",
    security(("bearer" = [])),
    params(
        ("worker_id" = String, Path, description = "Worker id"),
        ("ass_id" = String, Path, description = "Assignment id"),
    ),
    request_body = LiveLogs,
    responses(
        (status = 200, description = "Stored", body = LiveLogsAck),
        (status = 403, description = "Not this worker's token", body = ErrorBody),
        (status = 404, description = "No such assignment of this worker (`assignment_not_found`)", body = ErrorBody),
        (status = 409, description = "The assignment no longer holds a running task (`assignment_superseded`)", body = ErrorBody),
        (status = 413, description = "Batch too large", body = ErrorBody),
        (status = 422, description = "Invalid batch", body = ErrorBody),
    ))]
pub async fn report_logs(
    State(state): State<AppState>,
    principal: Principal,
    Path((worker_id, ass_id)): Path<(String, String)>,
    ValidJson(batch): ValidJson<LiveLogs>,
) -> ApiResult<Json<LiveLogsAck>> {
    ids(&worker_id, &ass_id)?;
    require_self(&principal, &worker_id)?;
    let (assignment, task) = live_assignment(&state, &worker_id, &ass_id).await?;
    let max = state.limits.max_log_bytes as u64;
    let mut ack = LiveLogsAck {
        stored: 0,
        stdout_full: false,
        stderr_full: false,
    };
    for chunk in batch.chunks {
        let (seq, stream) = (chunk.seq, chunk.stream);
        let full = chunk.offset.saturating_add(chunk.text.len() as u64) >= max;
        match stream {
            StreamName::Stdout => ack.stdout_full |= full,
            StreamName::Stderr => ack.stderr_full |= full,
        }
        let Some(text) = bound_live(chunk, max) else {
            continue;
        };
        let bytes = text.len();
        let stored = state
            .store
            .insert_log_chunk(&TaskLogChunk {
                task_id: task.task_id.clone(),
                attempt: assignment.attempt,
                seq,
                stream: stream.as_str().to_string(),
                text,
            })
            .await?;
        if stored {
            crate::metrics::live_log_stored(bytes);
        }
        ack.stored += u32::from(stored);
    }
    Ok(Json(ack))
}

/// Where an output file is named: relative to `/output`, `/`-separated, no empty, `.` or
/// `..` segment, no control characters, at most 1024 characters.
pub fn validate_output_path(path: &str) -> Result<(), String> {
    if path.is_empty() || path.chars().count() > MAX_OUTPUT_PATH {
        return Err(format!("must be 1..={MAX_OUTPUT_PATH} characters"));
    }
    if path.chars().any(|c| c.is_control() || c == '\\') {
        return Err("must not contain control characters or backslashes".into());
    }
    if path
        .split('/')
        .any(|segment| segment.is_empty() || segment == "." || segment == "..")
    {
        return Err("must be relative, without empty, '.' or '..' segments".into());
    }
    Ok(())
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct OutputQuery {
    /// The file's path under `/output`, e.g. `d/f.txt`.
    pub path: String,
}

/// Uploads one file the task left under `/output` (the body is its bytes), before the
/// result is reported. A file uploaded again replaces the first; all of a task's files
/// together are bounded by `max_output_bytes` (413 `outputs_too_large` beyond).
#[utoipa::path(post, path = "/v1/workers/{worker_id}/assignments/{ass_id}/outputs", tag = "agents",
    security(("bearer" = [])),
    params(
        ("worker_id" = String, Path, description = "Worker id"),
        ("ass_id" = String, Path, description = "Assignment id"),
        OutputQuery,
    ),
    request_body(content = Vec<u8>, content_type = "application/octet-stream"),
    responses(
        (status = 200, description = "Stored", body = OutputEntry),
        (status = 400, description = "Bad or missing path (`invalid_path`, `invalid_query`)", body = ErrorBody),
        (status = 403, description = "Not this worker's token", body = ErrorBody),
        (status = 404, description = "No such assignment of this worker (`assignment_not_found`)", body = ErrorBody),
        (status = 409, description = "The assignment no longer holds a running task (`assignment_superseded`)", body = ErrorBody),
        (status = 413, description = "Over the task's output bound (`outputs_too_large`)", body = ErrorBody),
    ))]
pub async fn upload_output(
    State(state): State<AppState>,
    principal: Principal,
    Path((worker_id, ass_id)): Path<(String, String)>,
    query: Result<Query<OutputQuery>, QueryRejection>,
    body: Bytes,
) -> ApiResult<Json<OutputEntry>> {
    ids(&worker_id, &ass_id)?;
    require_self(&principal, &worker_id)?;
    let Query(query) = query.map_err(|e| ApiError::bad_request("invalid_query", e.body_text()))?;
    validate_output_path(&query.path).map_err(|why| {
        ApiError::bad_request(
            "invalid_path",
            format!("output path '{}' {why}", truncate_for_message(&query.path)),
        )
    })?;
    let (assignment, task) = live_assignment(&state, &worker_id, &ass_id).await?;
    let others: u64 = state
        .store
        .list_output_files(&task.task_id)
        .await?
        .iter()
        .filter(|f| f.path != query.path)
        .map(|f| f.size_bytes)
        .sum();
    let max = state.limits.max_output_bytes as u64;
    if others.saturating_add(body.len() as u64) > max {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "outputs_too_large",
            format!(
                "task {}'s output files would total more than {max} bytes",
                task.task_id
            ),
        ));
    }
    let info = state
        .store
        .put_output_file(&task.task_id, assignment.attempt, &query.path, &body)
        .await?;
    crate::metrics::output_file_stored(info.size_bytes);
    tracing::info!(task_id = %task.task_id, worker_id, path = %info.path, size_bytes = info.size_bytes, "output file stored");
    Ok(Json(info.into()))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::{LiveChunk, StreamName, bound, bound_live, validate_output_path};

    #[test]
    fn live_chunks_are_cut_at_the_stream_bound() {
        let chunk = |offset: u64, text: &str| LiveChunk {
            seq: 0,
            stream: StreamName::Stdout,
            offset,
            text: text.into(),
        };
        assert_eq!(bound_live(chunk(0, "abc"), 10).as_deref(), Some("abc"));
        let cut = bound_live(chunk(8, "abcdef"), 10).unwrap();
        assert!(cut.starts_with("ab\n[cloudai: output truncated"), "{cut}");
        assert_eq!(bound_live(chunk(10, "x"), 10), None);
    }

    #[test]
    fn output_paths_stay_under_output() {
        for good in ["f.txt", "d/f.txt", "a b/ü.bin", "..x/y"] {
            assert!(validate_output_path(good).is_ok(), "{good}");
        }
        for bad in [
            "",
            "/etc/passwd",
            "../x",
            "d/../x",
            "d//x",
            "./x",
            "d/",
            "a\\b",
            "a\nb",
        ] {
            assert!(validate_output_path(bad).is_err(), "{bad:?}");
        }
        assert!(validate_output_path(&"x".repeat(1025)).is_err());
    }

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
