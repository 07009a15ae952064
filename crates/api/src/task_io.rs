//! A task's output as its owner sees it: its logs (as JSON, or followed as Server-Sent Events
//! until the task ends), the files it left under `/output`, and waiting for a task to finish
//! (`POST /v1/tasks?wait=30s`, see [`wait_for_finish`]).
//!
//! Live output is stored by the worker's batches (`POST .../assignments/{ass}/logs`), so any
//! replica serves it; followers poll the store. The chunks are kept after the result is stored
//! (they are bounded like the result's logs), so following a finished task replays them.

use std::convert::Infallible;
use std::time::Duration;

use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderValue, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::AppState;
use super::agent::{OutputEntry, validate_output_path};
use super::auth::Principal;
use super::auth::visible_task;
use super::error::{ApiError, ApiResult, ErrorBody};
use super::extract::{IdPath, truncate_for_message, validate_id};
use crate::model::{Task, TaskResult};
use crate::store::{StoreError, TaskLogChunk};

/// A task's captured output.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct TaskLogs {
    pub task_id: String,
    /// stdout and stderr, bounded by the worker.
    pub logs: String,
    /// True when the logs were cut to the bound.
    pub truncated: bool,
    /// Standard error (`logs` is standard output).
    #[serde(default)]
    pub stderr: String,
    #[serde(default)]
    pub stderr_truncated: bool,
}

/// How often a follower or a waiting submission re-reads the store.
const FOLLOW_POLL: Duration = Duration::from_millis(200);
const WAIT_POLL: Duration = Duration::from_millis(50);
/// Longest `wait` a submission may ask for.
pub const MAX_WAIT: Duration = Duration::from_secs(300);
/// Chunks read from the store at once.
const CHUNK_PAGE: u32 = 500;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/v1/tasks/{task_id}/logs", get(get_logs))
        .route("/v1/tasks/{task_id}/outputs", get(list_outputs))
        .route("/v1/tasks/{task_id}/outputs/{*path}", get(get_output))
}

/// What [`parse_wait`] accepts, as the OpenAPI document states it: seconds (no leading
/// zero, up to 3 decimals, an optional `s`) or whole milliseconds with `ms`, at most 300 s.
pub const WAIT_PATTERN: &str = "^(?:(?:(?:[0-9]|[1-9][0-9]|[12][0-9]{2})(?:\\.[0-9]{1,3})?|300(?:\\.0{1,3})?)s?|(?:[0-9]|[1-9][0-9]{1,4}|[12][0-9]{5}|300000)ms)$";

/// A submission's `wait`: `30s`, `500ms`, or a bare number of seconds (`2`, `0.5`), at most
/// [`MAX_WAIT`] ([`WAIT_PATTERN`]).
pub fn parse_wait(raw: &str) -> Result<Duration, String> {
    let bad = || {
        format!(
            "wait '{}' must be a duration like 30s, 500ms or 2 (seconds, up to 3 decimals), at most {} s",
            truncate_for_message(raw),
            MAX_WAIT.as_secs()
        )
    };
    let whole = |digits: &str| {
        !digits.is_empty()
            && digits.len() <= 6
            && digits.bytes().all(|b| b.is_ascii_digit())
            && (digits == "0" || !digits.starts_with('0'))
    };
    let duration = if let Some(ms) = raw.strip_suffix("ms") {
        if !whole(ms) {
            return Err(bad());
        }
        Duration::from_millis(ms.parse().map_err(|_| bad())?)
    } else {
        let number = raw.strip_suffix('s').unwrap_or(raw);
        let (int, fraction) = number.split_once('.').unwrap_or((number, ""));
        if !whole(int)
            || (number.contains('.')
                && (fraction.is_empty()
                    || fraction.len() > 3
                    || !fraction.bytes().all(|b| b.is_ascii_digit())))
        {
            return Err(bad());
        }
        let millis: u64 = format!("{int}{fraction:0<3}").parse().map_err(|_| bad())?;
        Duration::from_millis(millis)
    };
    if duration > MAX_WAIT {
        return Err(bad());
    }
    Ok(duration)
}

/// Waits up to `wait` for a task to reach a final state; returns it as last read. The task
/// is stored already, so a store error ends the wait (the caller answers 202) instead of
/// failing the request. Dropped with the request when the client goes away.
pub async fn wait_for_finish(state: &AppState, mut task: Task, wait: Duration) -> Task {
    let deadline = tokio::time::Instant::now() + wait;
    while !task.status.is_terminal() && tokio::time::Instant::now() < deadline {
        tokio::time::sleep_until((tokio::time::Instant::now() + WAIT_POLL).min(deadline)).await;
        match state.store.get_task(&task.task_id).await {
            Ok(read) => task = read,
            Err(error) => {
                tracing::warn!(task_id = %task.task_id, %error, "waiting for a task: reading it failed");
                break;
            }
        }
    }
    task
}

/// A finished task with its result inline (`POST /v1/tasks?wait=...` when it finished in
/// time).
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct TaskWithResult {
    #[serde(flatten)]
    pub task: Task,
    /// `null` for a task that ended without running (cancelled while queued).
    pub result: Option<TaskResult>,
}

/// The result of a finished task, when it has one.
pub async fn result_if_any(state: &AppState, task_id: &str) -> ApiResult<Option<TaskResult>> {
    match state.store.get_result(task_id).await {
        Ok(result) => Ok(Some(result)),
        Err(StoreError::NotFound { .. }) => Ok(None),
        Err(other) => Err(other.into()),
    }
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct LogsQuery {
    /// Stream the output as Server-Sent Events until the task ends.
    #[serde(default)]
    pub follow: bool,
}

/// One `log` event of a followed task.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct LogEvent {
    /// `stdout` or `stderr`.
    pub stream: String,
    pub text: String,
    pub attempt: u32,
}

/// The last event of a followed task (`end`).
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct EndEvent {
    pub status: crate::model::TaskStatus,
    pub exit_code: Option<i64>,
    pub error: Option<String>,
}

/// Every chunk of `task_id` after `after`, page by page.
async fn chunks_after(
    state: &AppState,
    task_id: &str,
    mut after: Option<(u32, u64)>,
) -> ApiResult<Vec<TaskLogChunk>> {
    let mut all = Vec::new();
    loop {
        let page = state
            .store
            .list_log_chunks(task_id, after, CHUNK_PAGE)
            .await?;
        let full = page.len() == CHUNK_PAGE as usize;
        after = page.last().map(|c| (c.attempt, c.seq)).or(after);
        all.extend(page);
        if !full {
            return Ok(all);
        }
    }
}

/// Reads a task's logs: its result's stdout (`logs`) and stderr once it has one, the output
/// its worker sent so far while it runs. With `follow=true`, a Server-Sent Events stream from
/// the start: a `log` event per chunk (`{stream, text, attempt}`), then one `end` event
/// (`{status, exit_code, error}`) when the task reaches a final state, and the stream ends.
#[utoipa::path(get, path = "/v1/tasks/{task_id}/logs", tag = "tasks",
    security(("bearer" = [])),
    params(("task_id" = String, Path, description = "Task id"), LogsQuery),
    responses(
        (status = 200, description = "The logs (JSON), or with `follow=true` an event stream (`text/event-stream`: `log` events with a LogEvent, then an `end` event with an EndEvent)", body = TaskLogs),
        (status = 400, description = "Bad query (`invalid_query`)", body = ErrorBody),
        (status = 401, description = "No valid token", body = ErrorBody),
        (status = 403, description = "Another user's task", body = ErrorBody),
        (status = 404, description = "No such task", body = ErrorBody),
    ))]
pub async fn get_logs(
    State(state): State<AppState>,
    principal: Principal,
    IdPath(task_id): IdPath,
    query: Result<Query<LogsQuery>, QueryRejection>,
) -> ApiResult<Response> {
    let Query(query) = query.map_err(|e| ApiError::bad_request("invalid_query", e.body_text()))?;
    let task = visible_task(&state, &principal, &task_id).await?;
    if query.follow {
        return Ok(follow(state, task_id).into_response());
    }
    if let Some(result) = result_if_any(&state, &task_id).await? {
        return Ok(Json(TaskLogs {
            task_id: result.task_id,
            logs: result.logs,
            truncated: result.logs_truncated,
            stderr: result.stderr,
            stderr_truncated: result.stderr_truncated,
        })
        .into_response());
    }
    // Still running: what the current attempt printed so far.
    let mut logs = TaskLogs {
        task_id: task.task_id.clone(),
        logs: String::new(),
        truncated: false,
        stderr: String::new(),
        stderr_truncated: false,
    };
    for chunk in chunks_after(&state, &task_id, None).await? {
        if chunk.attempt != task.attempts {
            continue;
        }
        match chunk.stream.as_str() {
            "stderr" => logs.stderr.push_str(&chunk.text),
            _ => logs.logs.push_str(&chunk.text),
        }
    }
    Ok(Json(logs).into_response())
}

pub(super) fn event(name: &str, payload: &impl Serialize) -> Event {
    match serde_json::to_string(payload) {
        Ok(data) => Event::default().event(name).data(data),
        Err(error) => event_error(&error.to_string()),
    }
}

/// An `error` event: an [`ErrorBody`] as data, as every JSON error of the API.
fn event_error(message: &str) -> Event {
    let body = serde_json::json!({"error": {"code": "internal", "message": message}});
    Event::default().event("error").data(body.to_string())
}

fn log_event(stream: &str, text: String, attempt: u32) -> Event {
    event(
        "log",
        &LogEvent {
            stream: stream.to_string(),
            text,
            attempt,
        },
    )
}

/// Where a follower is.
struct Follower {
    state: AppState,
    task_id: String,
    after: Option<(u32, u64)>,
    sent_any: bool,
    done: bool,
}

impl Follower {
    /// The next events: new chunks, or (once the task is final and every chunk was sent) the
    /// `end` event. Polls the store until one of them is there.
    async fn next_events(&mut self) -> ApiResult<Vec<Event>> {
        loop {
            let chunks = chunks_after(&self.state, &self.task_id, self.after).await?;
            if let Some(last) = chunks.last() {
                self.after = Some((last.attempt, last.seq));
                self.sent_any = true;
                return Ok(chunks
                    .into_iter()
                    .map(|c| log_event(&c.stream, c.text, c.attempt))
                    .collect());
            }
            let task = self.state.store.get_task(&self.task_id).await?;
            if task.status.is_terminal() {
                // Chunks stored between the read above and the task's end.
                let late = chunks_after(&self.state, &self.task_id, self.after).await?;
                if !late.is_empty() {
                    continue;
                }
                let mut events = Vec::new();
                let result = result_if_any(&self.state, &self.task_id).await?;
                if let Some(result) = result.as_ref().filter(|_| !self.sent_any) {
                    // Finished without live output stored (an older worker): its result's.
                    for (stream, text) in [("stdout", &result.logs), ("stderr", &result.stderr)] {
                        if !text.is_empty() {
                            events.push(log_event(stream, text.clone(), result.attempt));
                        }
                    }
                }
                events.push(event(
                    "end",
                    &EndEvent {
                        status: task.status,
                        exit_code: task.exit_code,
                        error: task.error,
                    },
                ));
                self.done = true;
                return Ok(events);
            }
            tokio::time::sleep(FOLLOW_POLL).await;
        }
    }
}

/// The event stream of a task, ending after its `end` event (or an `error` event when the
/// store fails). Dropped, with its polling, when the client goes away.
fn follow(
    state: AppState,
    task_id: String,
) -> Sse<impl futures::Stream<Item = Result<Event, Infallible>>> {
    let follower = Follower {
        state,
        task_id,
        after: None,
        sent_any: false,
        done: false,
    };
    let stream = futures::stream::unfold(follower, |mut f| async move {
        if f.done {
            return None;
        }
        let events = match f.next_events().await {
            Ok(events) => events,
            Err(error) => {
                tracing::warn!(task_id = %f.task_id, code = error.code, "following a task's logs failed");
                f.done = true;
                vec![event(
                    "error",
                    &serde_json::json!({"error": {"code": error.code, "message": error.message}}),
                )]
            }
        };
        Some((futures::stream::iter(events), f))
    })
    .flatten()
    .map(Ok::<Event, Infallible>);
    Sse::new(stream).keep_alive(KeepAlive::default())
}

/// A task's output files.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct OutputList {
    pub task_id: String,
    /// By path.
    pub files: Vec<OutputEntry>,
}

/// Lists the files a task left under `/output`.
#[utoipa::path(get, path = "/v1/tasks/{task_id}/outputs", tag = "tasks",
    security(("bearer" = [])),
    params(("task_id" = String, Path, description = "Task id")),
    responses(
        (status = 200, description = "The files", body = OutputList),
        (status = 401, description = "No valid token", body = ErrorBody),
        (status = 403, description = "Another user's task", body = ErrorBody),
        (status = 404, description = "No such task", body = ErrorBody),
    ))]
pub async fn list_outputs(
    State(state): State<AppState>,
    principal: Principal,
    IdPath(task_id): IdPath,
) -> ApiResult<Json<OutputList>> {
    visible_task(&state, &principal, &task_id).await?;
    let files = state.store.list_output_files(&task_id).await?;
    Ok(Json(OutputList {
        task_id,
        files: files.into_iter().map(OutputEntry::from).collect(),
    }))
}

/// Downloads one output file (its bytes, `application/octet-stream`).
#[utoipa::path(get, path = "/v1/tasks/{task_id}/outputs/{path}", tag = "tasks",
    security(("bearer" = [])),
    params(
        ("task_id" = String, Path, description = "Task id"),
        ("path" = String, Path, description = "The file's path under /output, e.g. d/f.txt"),
    ),
    responses(
        (status = 200, description = "The file's bytes", body = Vec<u8>, content_type = "application/octet-stream"),
        (status = 400, description = "Bad id or path (`invalid_id`, `invalid_path`)", body = ErrorBody),
        (status = 401, description = "No valid token", body = ErrorBody),
        (status = 403, description = "Another user's task", body = ErrorBody),
        (status = 404, description = "No such task or file (`task_not_found`, `output_not_found`)", body = ErrorBody),
    ))]
pub async fn get_output(
    State(state): State<AppState>,
    principal: Principal,
    Path((task_id, path)): Path<(String, String)>,
) -> ApiResult<Response> {
    validate_id(&task_id)
        .map_err(|why| ApiError::bad_request("invalid_id", format!("invalid id: {why}")))?;
    validate_output_path(&path).map_err(|why| {
        ApiError::bad_request(
            "invalid_path",
            format!("output path '{}' {why}", truncate_for_message(&path)),
        )
    })?;
    visible_task(&state, &principal, &task_id).await?;
    let (_, bytes) = match state.store.get_output_file(&task_id, &path).await {
        Ok(file) => file,
        Err(StoreError::NotFound { .. }) => {
            return Err(ApiError::not_found(
                "output_not_found",
                format!(
                    "task {task_id} has no output file '{}'",
                    truncate_for_message(&path)
                ),
            ));
        }
        Err(other) => return Err(other.into()),
    };
    let name: String = path
        .rsplit('/')
        .next()
        .unwrap_or("output")
        .chars()
        .filter(|c| c.is_ascii_graphic() && *c != '"' && *c != '\\')
        .collect();
    let disposition = HeaderValue::from_str(&format!("attachment; filename=\"{name}\""))
        .unwrap_or(HeaderValue::from_static("attachment"));
    Ok((
        [
            (
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/octet-stream"),
            ),
            (header::CONTENT_DISPOSITION, disposition),
        ],
        bytes,
    )
        .into_response())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    #[test]
    fn waits_take_seconds_and_milliseconds_up_to_the_bound() {
        assert_eq!(parse_wait("30s").unwrap(), Duration::from_secs(30));
        assert_eq!(parse_wait("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_wait("2").unwrap(), Duration::from_secs(2));
        assert_eq!(parse_wait("0.5").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_wait("300").unwrap(), MAX_WAIT);
        assert_eq!(parse_wait("0.125s").unwrap(), Duration::from_millis(125));
        assert_eq!(parse_wait("300000ms").unwrap(), MAX_WAIT);
        assert_eq!(parse_wait("0").unwrap(), Duration::ZERO);
        for bad in [
            "", "s", "301s", "-1", "1h", "abc", "1e3", "NaN", "1..2", "300.001", "300001ms", "05",
            "1.", ".5", "0.1234", "1.5ms", "+1",
        ] {
            let why = parse_wait(bad).unwrap_err();
            assert!(why.contains("must be a duration"), "{bad}: {why}");
        }
    }
}
