//! Task arrays: one request creates `count` tasks of one spec (Slurm's `sbatch --array`,
//! Kubernetes' indexed Jobs). The tasks are stored together ([`Lifecycle::submit_array`]: one
//! transaction on SQLite, one `insertMany` on MongoDB), admitted together
//! ([`scheduler::admit_tasks`]), and then live as ordinary tasks: each is listed, read,
//! cancelled and run like any other, and knows its place from `CLOUDAI_ARRAY_INDEX`. The
//! array itself is not a stored record: its summary is counted from its tasks, so it can never
//! disagree with them.
//!
//! [`Lifecycle::submit_array`]: crate::lifecycle::Lifecycle::submit_array

use std::time::Duration;

use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::AppState;
use super::Limits;
use super::auth::Principal;
use super::error::{ApiError, ApiResult, ErrorBody};
use super::extract::{IdPath, ValidJson, Validate};
use super::overview::TasksByState;
use super::task_io;
use super::tasks::{
    IDEMPOTENCY_REPLAYED, MAX_ENV_ENTRIES, TaskSpec, idempotency_key, idempotency_of,
    resolve_after, task_from_spec,
};
use crate::model::{self, ARRAY_COUNT_ENV, ARRAY_ID_ENV, ARRAY_INDEX_ENV, TaskStatus};
use crate::scheduler;
use crate::store::{ArraySummary, StoreError, TaskQuery};

/// How often `GET /v1/arrays/{array_id}?wait=...` counts the array again.
const WAIT_POLL: Duration = Duration::from_millis(250);

/// Tasks read per page when an array is cancelled.
const CANCEL_PAGE: u32 = 1_000;

/// `count` tasks of one spec.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ArraySpec {
    /// How many tasks: 1 up to the host's `--max-array-tasks` (default 100,000).
    #[schema(minimum = 1, example = 100)]
    pub count: u32,
    /// What every task of the array runs. Each task also finds `CLOUDAI_ARRAY_ID`,
    /// `CLOUDAI_ARRAY_INDEX` (`0..count`) and `CLOUDAI_ARRAY_COUNT` in its environment, so
    /// the spec's `env` may not set them and has room for 253 entries of its own.
    pub task: TaskSpec,
}

impl Validate for ArraySpec {
    fn validate(&self, limits: &Limits) -> Result<(), ApiError> {
        let max = limits.max_array_tasks;
        if !(1..=max).contains(&self.count) {
            return Err(ApiError::validation(format!(
                "count must be in 1..={max} (the host's --max-array-tasks), got {}",
                self.count
            )));
        }
        for key in [ARRAY_ID_ENV, ARRAY_INDEX_ENV, ARRAY_COUNT_ENV] {
            if self.task.env.contains_key(key) {
                return Err(ApiError::validation(format!(
                    "task.env must not set {key}: the host sets it for every task of an array"
                )));
            }
        }
        if self.task.env.len() > MAX_ENV_ENTRIES - 3 {
            return Err(ApiError::validation(format!(
                "task.env of an array must have at most {} entries (the host adds 3), got {}",
                MAX_ENV_ENTRIES - 3,
                self.task.env.len()
            )));
        }
        self.task.validate(limits).map_err(|mut e| {
            // The spec's rules name its fields; here they are under `task`.
            e.message = format!("task.{}", e.message);
            e
        })
    }
}

/// An array as its tasks stand.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct TaskArray {
    pub array_id: String,
    pub user_id: String,
    pub docker_image: String,
    pub created_at: DateTime<Utc>,
    /// How many tasks it has.
    pub count: u64,
    /// Its tasks by state.
    pub tasks_by_state: TasksByState,
    /// Every task ended (completed, failed or cancelled).
    pub finished: bool,
    /// Its tasks, in the task listing: `/v1/tasks?array_id=...`.
    pub tasks_url: String,
}

impl From<ArraySummary> for TaskArray {
    fn from(summary: ArraySummary) -> Self {
        let c = summary.counts;
        let count = c.pending + c.queued + c.running + c.completed + c.failed + c.cancelled;
        TaskArray {
            tasks_url: format!("/v1/tasks?array_id={}", summary.array_id),
            array_id: summary.array_id,
            user_id: summary.user_id,
            docker_image: summary.docker_image,
            created_at: summary.created_at,
            count,
            finished: c.pending + c.queued + c.running == 0,
            tasks_by_state: TasksByState::from(c),
        }
    }
}

/// What `POST /v1/arrays/{array_id}/cancel` did.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ArrayCancelled {
    /// Tasks that had not started and are now `cancelled`.
    pub cancelled: u64,
    /// Running tasks whose workers were asked to stop them.
    pub stopping: u64,
    /// The array afterwards.
    pub array: TaskArray,
}

/// Query of `GET /v1/arrays/{array_id}`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ArrayQuery {
    /// How long to wait for every task to end (see [`task_io::parse_wait`]).
    pub wait: Option<String>,
}

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/v1/arrays", post(submit_array))
        .route("/v1/arrays/{array_id}", get(get_array))
        .route("/v1/arrays/{array_id}/cancel", post(cancel_array))
}

/// Submits an array: `count` tasks of one spec, stored together and admitted together.
///
/// Task `i` has the id `task-<the array's uuid>-<i>` (the index zero-padded, so that the ids
/// sort in index order, which is also the order they queue in) and `CLOUDAI_ARRAY_INDEX=i`
/// in its environment. With an `Idempotency-Key`, a retry with the same key and the same body
/// returns the first array (200, `Idempotency-Replayed: true`); the same key with another
/// body is refused (409 `idempotency_key_reused`). Keys are per user, shared with
/// `POST /v1/tasks`.
#[utoipa::path(post, path = "/v1/arrays", tag = "tasks",
    security(("bearer" = [])),
    params(("Idempotency-Key" = Option<String>, Header,
        description = "1..=255 printable ASCII characters (inner spaces allowed); makes the submission idempotent",
        min_length = 1, max_length = 255, pattern = "^[\\x21-\\x7E](?:[\\x20-\\x7E]*[\\x21-\\x7E])?$")),
    request_body = ArraySpec,
    responses(
        (status = 201, description = "Created, and every task admitted (queued, or already further along)", body = TaskArray,
            headers(("Location" = String, description = "The new array's path, `/v1/arrays/<array_id>`"))),
        (status = 202, description = "Created; some tasks are not admitted yet (admission deferred them, or will check them shortly) or were rejected: `tasks_by_state` says how many of each", body = TaskArray,
            headers(("Location" = String, description = "The new array's path, `/v1/arrays/<array_id>`"))),
        (status = 200, description = "Replay of an earlier submission with the same key", body = TaskArray,
            headers(("Idempotency-Replayed" = String, description = "true on a replay"))),
        (status = 400, description = "Malformed JSON or idempotency key", body = ErrorBody),
        (status = 401, description = "No valid token", body = ErrorBody),
        (status = 403, description = "Not a user token, or every task rejected by the admission policy (`admission_rejected`: the tasks are stored as failed with the reason)", body = ErrorBody),
        (status = 409, description = "Idempotency key reused with another body", body = ErrorBody),
        (status = 413, description = "Body too large", body = ErrorBody),
        (status = 415, description = "Not JSON", body = ErrorBody),
        (status = 422, description = "Invalid spec or count", body = ErrorBody),
    ))]
#[tracing::instrument(name = "submit_array", skip_all, fields(user_id, array_id, count = spec.count))]
pub async fn submit_array(
    State(state): State<AppState>,
    principal: Principal,
    headers: HeaderMap,
    ValidJson(spec): ValidJson<ArraySpec>,
) -> ApiResult<Response> {
    let (user_id, _) = principal.require_user()?;
    let span = tracing::Span::current();
    span.record("user_id", user_id);
    let key = idempotency_key(&headers)?;
    let idempotency = idempotency_of(key.as_deref(), &spec)?;
    let count = spec.count;
    let gate = resolve_after(&state, &principal, &spec.task.after).await?;
    let template = task_from_spec(spec.task, user_id, key, &gate);
    let array_id = model::new_array_id();
    let tasks: Vec<_> = (0..count)
        .map(|index| model::array_task(&template, &array_id, index, count))
        .collect();
    let outcome = state
        .lifecycle
        .submit_array(&tasks, idempotency.as_ref())
        .await?;
    // On a replay, the first submission's array.
    let array_id = outcome.task.array_id.clone().ok_or_else(|| {
        ApiError::conflict(
            "idempotency_key_reused",
            format!(
                "idempotency key was already used for task {}, which is not an array",
                outcome.task.task_id
            ),
        )
    })?;
    span.record("array_id", array_id.as_str());
    let location = HeaderValue::from_str(&format!("/v1/arrays/{array_id}"))
        .map_err(|_| ApiError::internal())?;
    if !outcome.created {
        let array = TaskArray::from(state.store.array_summary(&array_id).await?);
        let mut response = (StatusCode::OK, Json(array)).into_response();
        response
            .headers_mut()
            .insert(IDEMPOTENCY_REPLAYED, HeaderValue::from_static("true"));
        response.headers_mut().insert(header::LOCATION, location);
        return Ok(response);
    }
    tracing::info!(%array_id, user_id, count, "array submitted");
    if template.awaiting_dependencies {
        // Admitted once its dependencies are met (the scheduler's dependency pass).
        let array = TaskArray::from(state.store.array_summary(&array_id).await?);
        let mut response = (StatusCode::ACCEPTED, Json(array)).into_response();
        response.headers_mut().insert(header::LOCATION, location);
        return Ok(response);
    }
    // Admitted here, as one submission's tasks are, so that the answer says what became of
    // them; what this cannot finish (store trouble) the scheduler's admission pass picks up.
    match scheduler::admit_tasks(&state.lifecycle, &state.policies, &tasks).await {
        Ok(stats) => {
            tracing::info!(
                %array_id,
                queued = stats.queued,
                deferred = stats.deferred,
                rejected = stats.rejected,
                "array admitted"
            );
            if stats.rejected == tasks.len() {
                let reason = state
                    .store
                    .get_task(&outcome.task.task_id)
                    .await
                    .ok()
                    .and_then(|t| t.error)
                    .unwrap_or_default();
                return Err(ApiError::new(
                    StatusCode::FORBIDDEN,
                    "admission_rejected",
                    format!(
                        "every task of array {array_id} was rejected by the admission policy \
                         and is stored as failed: {reason}"
                    ),
                ));
            }
        }
        Err(error) => {
            tracing::warn!(%array_id, %error, "admitting an array did not finish; the scheduler will check its tasks");
        }
    }
    state.lifecycle.wakeup().wake();
    let array = TaskArray::from(state.store.array_summary(&array_id).await?);
    let waiting = array.tasks_by_state.pending > 0 || array.tasks_by_state.failed > 0;
    let status = if waiting {
        StatusCode::ACCEPTED
    } else {
        StatusCode::CREATED
    };
    let mut response = (status, Json(array)).into_response();
    response.headers_mut().insert(header::LOCATION, location);
    Ok(response)
}

/// Reads an array the caller may see: 404 when absent, 403 when another user's.
async fn visible_array(
    state: &AppState,
    principal: &Principal,
    array_id: &str,
) -> ApiResult<ArraySummary> {
    let (caller, is_admin) = principal.require_user()?;
    let summary = match state.store.array_summary(array_id).await {
        Ok(summary) => summary,
        Err(StoreError::NotFound { .. }) => {
            return Err(ApiError::not_found(
                "array_not_found",
                format!("no array {array_id}"),
            ));
        }
        Err(other) => return Err(other.into()),
    };
    if !is_admin && summary.user_id != caller {
        return Err(ApiError::forbidden(format!(
            "array {array_id} belongs to another user"
        )));
    }
    Ok(summary)
}

/// Reads an array: its tasks counted by state. With `wait`, answers once every task ended or
/// when the wait is over, whichever comes first (`finished` says which).
#[utoipa::path(get, path = "/v1/arrays/{array_id}", tag = "tasks",
    security(("bearer" = [])),
    params(("array_id" = String, Path, description = "Array id"),
        ("wait" = Option<String>, Query,
        description = "Wait for every task to end: `30s`, `500ms` or seconds (up to 3 decimals), at most 300 s",
        pattern = "^(?:(?:(?:[0-9]|[1-9][0-9]|[12][0-9]{2})(?:\\.[0-9]{1,3})?|300(?:\\.0{1,3})?)s?|(?:[0-9]|[1-9][0-9]{1,4}|[12][0-9]{5}|300000)ms)$")),
    responses(
        (status = 200, description = "The array", body = TaskArray),
        (status = 400, description = "Bad id or query", body = ErrorBody),
        (status = 401, description = "No valid token", body = ErrorBody),
        (status = 403, description = "Another user's array", body = ErrorBody),
        (status = 404, description = "No such array", body = ErrorBody),
        (status = 422, description = "A bad `wait`", body = ErrorBody),
    ))]
pub async fn get_array(
    State(state): State<AppState>,
    principal: Principal,
    IdPath(array_id): IdPath,
    query: Result<Query<ArrayQuery>, QueryRejection>,
) -> ApiResult<Json<TaskArray>> {
    let Query(query) = query.map_err(|e| ApiError::bad_request("invalid_query", e.body_text()))?;
    let wait = query
        .wait
        .as_deref()
        .map(task_io::parse_wait)
        .transpose()
        .map_err(ApiError::validation)?;
    let mut array = TaskArray::from(visible_array(&state, &principal, &array_id).await?);
    if let Some(wait) = wait {
        let deadline = tokio::time::Instant::now() + wait;
        while !array.finished && tokio::time::Instant::now() < deadline {
            tokio::time::sleep_until((tokio::time::Instant::now() + WAIT_POLL).min(deadline)).await;
            array = TaskArray::from(state.store.array_summary(&array_id).await?);
        }
    }
    Ok(Json(array))
}

/// Cancels every task of an array that has not ended: those not started become `cancelled`
/// at once, the workers of the running ones are asked to stop them. Tasks that ended stay as
/// they are.
#[utoipa::path(post, path = "/v1/arrays/{array_id}/cancel", tag = "tasks",
    security(("bearer" = [])),
    params(("array_id" = String, Path, description = "Array id")),
    responses(
        (status = 200, description = "What was cancelled, and the array afterwards", body = ArrayCancelled),
        (status = 400, description = "Bad id", body = ErrorBody),
        (status = 401, description = "No valid token", body = ErrorBody),
        (status = 403, description = "Another user's array", body = ErrorBody),
        (status = 404, description = "No such array", body = ErrorBody),
        (status = 409, description = "Every task had already ended (`array_finished`)", body = ErrorBody),
    ))]
#[tracing::instrument(name = "cancel_array", skip_all, fields(array_id = %array_id))]
pub async fn cancel_array(
    State(state): State<AppState>,
    principal: Principal,
    IdPath(array_id): IdPath,
) -> ApiResult<Json<ArrayCancelled>> {
    let summary = visible_array(&state, &principal, &array_id).await?;
    let (caller, _) = principal.require_user()?;
    let before = TaskArray::from(summary);
    if before.finished {
        return Err(ApiError::conflict(
            "array_finished",
            format!(
                "every task of array {array_id} already ended ({} completed, {} failed, {} cancelled)",
                before.tasks_by_state.completed,
                before.tasks_by_state.failed,
                before.tasks_by_state.cancelled
            ),
        ));
    }
    let by = format!("{caller} (array {array_id})");
    let waiting = [TaskStatus::Pending, TaskStatus::Queued];
    let mut cancelled = 0u64;
    for status in waiting {
        // Each page's tasks leave the state it lists (cancelled, or moved on meanwhile), so
        // the next read starts from the top; bounded by the array's size in pages.
        for _ in 0..=before.count / u64::from(CANCEL_PAGE) + 1 {
            let page = state
                .store
                .list_tasks(&TaskQuery {
                    status: Some(status),
                    array_id: Some(array_id.clone()),
                    limit: CANCEL_PAGE,
                    ..TaskQuery::default()
                })
                .await?;
            if page.tasks.is_empty() {
                break;
            }
            let ids: Vec<String> = page.tasks.into_iter().map(|t| t.task_id).collect();
            let moved = state.lifecycle.cancel_many(&ids, &by).await?;
            cancelled += moved.len() as u64;
        }
    }
    // Running tasks, including those that started while the others were cancelled.
    let mut stopping = 0u64;
    let mut after = None;
    loop {
        let page = state
            .store
            .list_tasks(&TaskQuery {
                status: Some(TaskStatus::Running),
                array_id: Some(array_id.clone()),
                limit: CANCEL_PAGE,
                after,
                ..TaskQuery::default()
            })
            .await?;
        for task in &page.tasks {
            match state.lifecycle.request_cancel(&task.task_id).await {
                Ok(_) => stopping += 1,
                // It ended meanwhile.
                Err(StoreError::Conflict { .. }) => {}
                Err(other) => return Err(other.into()),
            }
        }
        match page.next {
            Some(next) => after = Some(next),
            None => break,
        }
    }
    if stopping > 0 {
        state.work.notify();
    }
    tracing::info!(%array_id, by = caller, cancelled, stopping, "array cancelled");
    let array = TaskArray::from(state.store.array_summary(&array_id).await?);
    Ok(Json(ArrayCancelled {
        cancelled,
        stopping,
        array,
    }))
}
