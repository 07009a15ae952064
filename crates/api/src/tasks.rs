//! `/v1/tasks`: submit (idempotent with `Idempotency-Key`), read, list (newest first, cursor
//! pagination), cancel, and read a task's result (its logs and output files are in
//! [`super::task_io`]). Users see only their own tasks; admins see all.

use std::collections::BTreeMap;

use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use chrono::DateTime;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use utoipa::ToSchema;
use utoipa::openapi::schema::{Object, ObjectBuilder, Type};

use super::AppState;
use super::Limits;
use super::auth::{Principal, visible_task};
use super::error::{ApiError, ApiResult, ErrorBody};
use super::extract::{IdPath, ValidJson, Validate, truncate_for_message, validate_id};
use super::image_ref;
use super::task_io::{self, TaskWithResult};
use crate::lifecycle::Admitted;
use crate::model::{self, Dependency, RESOURCE_QUANTUM, Resources, Task, TaskResult, TaskStatus};
use crate::scheduler;
use crate::scheduler::dependencies::{self, Gate};
use crate::store::{AssignmentFilter, IdempotencyKey, StoreError, TaskCursor, TaskQuery};

/// Header naming a submission's idempotency key.
pub const IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("idempotency-key");
/// Header set to `true` on a response that returns an earlier submission.
pub const IDEMPOTENCY_REPLAYED: HeaderName = HeaderName::from_static("idempotency-replayed");

const MAX_COMMAND_CHARS: usize = 16 * 1024;
pub(crate) const MAX_ENV_ENTRIES: usize = 256;
const MAX_ENV_KEY_LEN: usize = 256;
const MAX_ENV_TOTAL_BYTES: usize = 64 * 1024;
const MAX_LABELS: usize = 64;
const MAX_LABEL_KEY_LEN: usize = 128;
const MAX_LABEL_VALUE_LEN: usize = 256;
const PRIORITY_RANGE: std::ops::RangeInclusive<i32> = -1000..=1000;
const TIMEOUT_RANGE: std::ops::RangeInclusive<u64> = 1..=604_800;
const MAX_ATTEMPTS_RANGE: std::ops::RangeInclusive<u32> = 1..=20;
const MAX_IDEMPOTENCY_KEY_LEN: usize = 255;

/// What a client submits. The submitting user comes from the token, never from the body.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TaskSpec {
    /// Docker reference: `[registry[:port]/]name[:tag][@sha256:<64 hex>]`, at most 255
    /// characters.
    /// The pattern is [`image_ref::REFERENCE_PATTERN`], set by the document's `Contract`.
    #[schema(example = "busybox:1.36", min_length = 1, max_length = 255)]
    pub docker_image: String,
    /// Shell command run in the container (`sh -c`); the image's default when absent. At most
    /// 16384 characters, no NUL.
    #[serde(default)]
    #[schema(max_length = 16384, pattern = "^[^\\u0000]*$")]
    pub command: Option<String>,
    /// Cores (default 1), at least 1/1024, at most the host's `--max-cpu`.
    #[serde(default = "one")]
    #[schema(default = 1.0, minimum = 0.0009765625)]
    pub req_cpu: f64,
    /// GB (default 1), at least 1/1024, at most the host's `--max-memory`.
    #[serde(default = "one")]
    #[schema(default = 1.0, minimum = 0.0009765625)]
    pub req_memory: f64,
    /// GB (default 0), at most the host's `--max-storage`.
    #[serde(default)]
    #[schema(minimum = 0.0)]
    pub req_storage: f64,
    /// Whole devices (default 0), at most the host's `--max-gpu`.
    #[serde(default)]
    #[schema(minimum = 0.0, multiple_of = 1.0)]
    pub req_gpu: f64,
    /// Higher runs first (default 0).
    #[serde(default)]
    #[schema(minimum = -1000, maximum = 1000)]
    pub priority: i32,
    /// Key/value labels, for placement policies and people (stored and returned as given).
    #[serde(default)]
    #[schema(schema_with = labels_schema)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    #[schema(schema_with = env_schema)]
    pub env: BTreeMap<String, String>,
    /// Wall-clock limit of one attempt, in seconds (at most 7 days).
    #[serde(default)]
    #[schema(minimum = 1, maximum = 604800)]
    pub timeout_s: Option<u64>,
    /// Attempts (default 3). Execution is at-least-once: a task whose worker is lost is run
    /// again, up to this many attempts; `1` never re-runs.
    #[serde(default = "three")]
    #[schema(default = 3, minimum = 1, maximum = 20)]
    pub max_attempts: u32,
    /// Tasks or arrays of the same user, submitted before, that this task runs after (at most
    /// 32): it stays `pending` (`awaiting_dependencies`, with the reason) until every one is
    /// met, and fails when one can no longer be (a `completed` dependency failed or was
    /// cancelled). An unknown id, or one that can already never be met, is refused.
    #[serde(default)]
    #[schema(max_items = 32)]
    pub after: Vec<Dependency>,
    /// Whether a preempting placement policy may stop this task (it is then queued again,
    /// the attempt counted) to make room for a task of a higher priority (default true).
    /// `false` opts out.
    #[serde(default = "yes", skip_serializing_if = "is_true")]
    #[schema(default = true)]
    pub preemptible: bool,
}

fn one() -> f64 {
    1.0
}

fn yes() -> bool {
    true
}

// Left out of the serialized spec when true (the default): the idempotency digest of a spec
// that does not opt out stays what it was before the field existed.
fn is_true(value: &bool) -> bool {
    *value
}

fn three() -> u32 {
    3
}

impl Validate for TaskSpec {
    fn validate(&self, limits: &Limits) -> Result<(), ApiError> {
        image_ref::parse(&self.docker_image).map_err(|why| {
            ApiError::validation(format!(
                "docker_image '{}' {why}",
                truncate_for_message(&self.docker_image)
            ))
        })?;
        if let Some(command) = &self.command {
            if command.chars().count() > MAX_COMMAND_CHARS {
                return Err(ApiError::validation(format!(
                    "command must be at most {MAX_COMMAND_CHARS} characters"
                )));
            }
            if command.contains('\0') {
                return Err(ApiError::validation("command must not contain NUL"));
            }
        }
        check_amount("req_cpu", self.req_cpu, true, limits.max_task_cpu)?;
        check_amount("req_memory", self.req_memory, true, limits.max_task_memory)?;
        check_amount(
            "req_storage",
            self.req_storage,
            false,
            limits.max_task_storage,
        )?;
        check_amount("req_gpu", self.req_gpu, false, limits.max_task_gpu)?;
        if self.req_gpu.fract() != 0.0 {
            return Err(ApiError::validation(format!(
                "req_gpu must be a whole number of devices, got {}",
                self.req_gpu
            )));
        }
        check_env(&self.env)?;
        check_labels(&self.labels)?;
        if !PRIORITY_RANGE.contains(&self.priority) {
            return Err(ApiError::validation(format!(
                "priority must be in -1000..=1000, got {}",
                self.priority
            )));
        }
        if let Some(timeout) = self.timeout_s
            && !TIMEOUT_RANGE.contains(&timeout)
        {
            return Err(ApiError::validation(format!(
                "timeout_s must be in 1..=604800 (7 days), got {timeout}"
            )));
        }
        if !MAX_ATTEMPTS_RANGE.contains(&self.max_attempts) {
            return Err(ApiError::validation(format!(
                "max_attempts must be in 1..=20, got {}",
                self.max_attempts
            )));
        }
        check_after(&self.after)
    }
}

/// Most dependencies of one task.
const MAX_DEPENDENCIES: usize = 32;

/// The shape of `after` (whether its ids exist is [`resolve_after`]'s).
fn check_after(after: &[Dependency]) -> Result<(), ApiError> {
    if after.len() > MAX_DEPENDENCIES {
        return Err(ApiError::validation(format!(
            "after must have at most {MAX_DEPENDENCIES} dependencies, got {}",
            after.len()
        )));
    }
    for (i, dep) in after.iter().enumerate() {
        let id = match (&dep.task_id, &dep.array_id) {
            (Some(id), None) | (None, Some(id)) => id,
            _ => {
                return Err(ApiError::validation(format!(
                    "after[{i}] must name exactly one of task_id and array_id"
                )));
            }
        };
        validate_id(id).map_err(|why| ApiError::validation(format!("after[{i}]: id {why}")))?;
    }
    Ok(())
}

/// Looks up what `after` names, as `caller` may see it: 422 for an id that is not one of the
/// caller's tasks or arrays (admins: anyone's), and for a dependency that can already never
/// be met; else whether the new task may go on at once or must wait.
pub(crate) async fn resolve_after(
    state: &AppState,
    principal: &Principal,
    after: &[Dependency],
) -> ApiResult<Gate> {
    let (caller, is_admin) = principal.require_user()?;
    let mut states = Vec::with_capacity(after.len());
    for (i, dep) in after.iter().enumerate() {
        let (target, owner) = dependencies::target_state(&*state.store, dep).await?;
        let visible = owner.is_some_and(|owner| is_admin || owner == caller);
        if !visible {
            return Err(ApiError::validation(format!(
                "after[{i}]: there is no {dep} (a dependency is a task or array of yours, submitted before)"
            )));
        }
        states.push((dep.to_string(), target));
    }
    let gate = dependencies::gate_all(after, |dep| {
        let key = dep.to_string();
        states
            .iter()
            .find(|(k, _)| *k == key)
            .map_or(dependencies::TargetState::Missing, |(_, s)| *s)
    });
    if let Gate::Broken(why) = &gate {
        return Err(ApiError::validation(format!(
            "after: {why}, so this task could never start"
        )));
    }
    Ok(gate)
}

/// A resource amount: finite, `> 0` when `positive` (else `>= 0`), at most `cap`, and (when
/// positive) still at least one quantum after quantization.
pub(crate) fn check_amount(
    field: &str,
    value: f64,
    positive: bool,
    cap: f64,
) -> Result<(), ApiError> {
    if !value.is_finite() {
        return Err(ApiError::validation(format!("{field} must be finite")));
    }
    // Amounts are kept in 1/1024ths: a positive one below that would round to nothing.
    if positive && value < RESOURCE_QUANTUM {
        return Err(ApiError::validation(format!(
            "{field} must be at least 1/1024 (0.0009765625), got {value}"
        )));
    }
    if value < 0.0 {
        return Err(ApiError::validation(format!(
            "{field} must be at least 0, got {value}"
        )));
    }
    if value > cap {
        return Err(ApiError::validation(format!(
            "{field} must be at most {cap}, got {value}"
        )));
    }
    Ok(())
}

fn check_env(env: &BTreeMap<String, String>) -> Result<(), ApiError> {
    if env.len() > MAX_ENV_ENTRIES {
        return Err(ApiError::validation(format!(
            "env must have at most {MAX_ENV_ENTRIES} entries, got {}",
            env.len()
        )));
    }
    let mut total = 0usize;
    for (key, value) in env {
        let mut chars = key.chars();
        let key_ok = key.len() <= MAX_ENV_KEY_LEN
            && chars
                .next()
                .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
            && chars.all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !key_ok {
            return Err(ApiError::validation(format!(
                "env key '{}' must match [A-Za-z_][A-Za-z0-9_]* and be at most {MAX_ENV_KEY_LEN} characters",
                truncate_for_message(key)
            )));
        }
        if value.contains('\0') {
            return Err(ApiError::validation(format!(
                "env value of '{key}' must not contain NUL"
            )));
        }
        total += key.len() + value.len();
    }
    if total > MAX_ENV_TOTAL_BYTES {
        return Err(ApiError::validation(format!(
            "env must total at most {MAX_ENV_TOTAL_BYTES} bytes of keys and values, got {total}"
        )));
    }
    Ok(())
}

/// The environment of a task as the OpenAPI document states it ([`check_env`]); the total
/// size of keys and values (64 KiB) is stated in words.
pub(crate) fn env_schema() -> Object {
    let key = ObjectBuilder::new()
        .schema_type(Type::String)
        .min_length(Some(1))
        .max_length(Some(MAX_ENV_KEY_LEN))
        .pattern(Some("^[A-Za-z_][A-Za-z0-9_]*$"));
    let value = ObjectBuilder::new()
        .schema_type(Type::String)
        .pattern(Some(r"^[^\u0000]*$"));
    ObjectBuilder::new()
        .schema_type(Type::Object)
        .description(Some(format!(
            "Environment variables: at most {MAX_ENV_ENTRIES}; a name matches \
             `[A-Za-z_][A-Za-z0-9_]*` (at most {MAX_ENV_KEY_LEN} characters); values have no \
             NUL; names and values total at most {MAX_ENV_TOTAL_BYTES} bytes."
        )))
        .max_properties(Some(MAX_ENV_ENTRIES))
        .property_names(Some(key))
        .additional_properties(Some(value))
        .build()
}

/// The characters of a label key ([`check_labels`]), as a regular-expression class.
const LABEL_KEY_CLASS: &str = "A-Za-z0-9._/-";

/// The labels of a task or a worker as the OpenAPI document states them: the rules
/// [`check_labels`] enforces (a key pattern, lengths, a count), so that a client generated
/// from the document knows them. The value pattern refuses the control characters (Unicode
/// category Cc, what `char::is_control` is true of). `e2e/labels.rs` checks the served
/// document against what the API accepts.
pub(crate) fn labels_schema() -> Object {
    let key = ObjectBuilder::new()
        .schema_type(Type::String)
        .min_length(Some(1))
        .max_length(Some(MAX_LABEL_KEY_LEN))
        .pattern(Some(format!(
            "^[{LABEL_KEY_CLASS}]{{1,{MAX_LABEL_KEY_LEN}}}$"
        )));
    let value = ObjectBuilder::new()
        .schema_type(Type::String)
        .max_length(Some(MAX_LABEL_VALUE_LEN))
        .pattern(Some(r"^[^\u0000-\u001F\u007F-\u009F]*$"));
    ObjectBuilder::new()
        .schema_type(Type::Object)
        .description(Some(format!(
            "At most {MAX_LABELS} labels. A key is 1..={MAX_LABEL_KEY_LEN} characters of \
             A-Z a-z 0-9 . _ / - (`app.kubernetes.io/name` is one); a value is at most \
             {MAX_LABEL_VALUE_LEN} characters, any but control characters."
        )))
        .max_properties(Some(MAX_LABELS))
        .property_names(Some(key))
        .additional_properties(Some(value))
        .build()
}

/// Labels: at most 64; keys 1..=128 of `[A-Za-z0-9._/-]`; values at most 256 characters
/// without control characters. The OpenAPI document states the same ([`labels_schema`]).
pub(crate) fn check_labels(labels: &BTreeMap<String, String>) -> Result<(), ApiError> {
    if labels.len() > MAX_LABELS {
        return Err(ApiError::validation(format!(
            "labels must have at most {MAX_LABELS} entries, got {}",
            labels.len()
        )));
    }
    for (key, value) in labels {
        let key_ok = !key.is_empty()
            && key.len() <= MAX_LABEL_KEY_LEN
            && key
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '/' | '-'));
        if !key_ok {
            return Err(ApiError::validation(format!(
                "label key '{}' must be 1..={MAX_LABEL_KEY_LEN} characters of A-Z a-z 0-9 . _ / -",
                truncate_for_message(key)
            )));
        }
        if value.chars().count() > MAX_LABEL_VALUE_LEN || value.chars().any(char::is_control) {
            return Err(ApiError::validation(format!(
                "label '{key}' value must be at most {MAX_LABEL_VALUE_LEN} characters without control characters"
            )));
        }
    }
    Ok(())
}

/// One page of tasks, newest first.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct TaskList {
    pub tasks: Vec<Task>,
    /// Pass as `cursor` to get the next page; `null` on the last page.
    pub next_cursor: Option<String>,
}

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/v1/tasks", post(submit_task).get(list_tasks))
        .route("/v1/tasks/{task_id}", get(get_task))
        .route("/v1/tasks/{task_id}/cancel", post(cancel_task))
        .route("/v1/tasks/{task_id}/result", get(get_result))
        .route(
            "/v1/tasks/{task_id}/assignments",
            get(list_task_assignments),
        )
}

/// Submits a task.
///
/// With an `Idempotency-Key` header, a retry with the same key and the same spec returns the
/// first task (200, `Idempotency-Replayed: true`); the same key with another spec is refused
/// (409 `idempotency_key_reused`). Keys are per user.
#[utoipa::path(post, path = "/v1/tasks", tag = "tasks",
    security(("bearer" = [])),
    params(("Idempotency-Key" = Option<String>, Header,
        description = "1..=255 printable ASCII characters (inner spaces allowed); makes the submission idempotent",
        min_length = 1, max_length = 255, pattern = "^[\\x21-\\x7E](?:[\\x20-\\x7E]*[\\x21-\\x7E])?$"),
        ("wait" = Option<String>, Query,
        description = "Wait for the task to finish: `30s`, `500ms` or seconds (up to 3 decimals), at most 300 s. 200 with the result inline when it finished in time, else 202",
        pattern = "^(?:(?:(?:[0-9]|[1-9][0-9]|[12][0-9]{2})(?:\\.[0-9]{1,3})?|300(?:\\.0{1,3})?)s?|(?:[0-9]|[1-9][0-9]{1,4}|[12][0-9]{5}|300000)ms)$")),
    request_body = TaskSpec,
    responses(
        (status = 201, description = "Created and admitted: the task is queued (or already further along, when an admission pass admitted it first)", body = Task,
            headers(("Location" = String, description = "The new task's path, `/v1/tasks/<task_id>`"))),
        (status = 202, description = "Created, not admitted yet: admission deferred it (the reason is in `status_reason`) or will check it shortly; or, rarely, it was decided elsewhere before this request's check applied (cancelled by its owner, or failed by an admission pass): the body is the task as it is", body = Task,
            headers(("Location" = String, description = "The new task's path, `/v1/tasks/<task_id>`"))),
        (status = 200, description = "Replay of an earlier submission with the same key (a Task); with `wait`, the task finished in time (a TaskWithResult)", body = TaskWithResult,
            headers(("Idempotency-Replayed" = String, description = "true on a replay"))),
        (status = 400, description = "Malformed JSON or idempotency key", body = ErrorBody),
        (status = 401, description = "No valid token", body = ErrorBody),
        (status = 403, description = "Not a user token, or rejected by the admission policy (`admission_rejected`: the task is stored as failed with the reason)", body = ErrorBody),
        (status = 409, description = "Idempotency key reused with another spec", body = ErrorBody),
        (status = 413, description = "Body too large", body = ErrorBody),
        (status = 415, description = "Not JSON", body = ErrorBody),
        (status = 422, description = "Invalid spec, or a bad `wait`", body = ErrorBody),
    ))]
#[tracing::instrument(name = "submit", skip_all, fields(user_id, task_id))]
pub async fn submit_task(
    State(state): State<AppState>,
    principal: Principal,
    headers: HeaderMap,
    query: Result<Query<SubmitQuery>, QueryRejection>,
    ValidJson(spec): ValidJson<TaskSpec>,
) -> ApiResult<Response> {
    let (user_id, _) = principal.require_user()?;
    let span = tracing::Span::current();
    span.record("user_id", user_id);
    let Query(query) = query.map_err(|e| ApiError::bad_request("invalid_query", e.body_text()))?;
    let wait = query
        .wait
        .as_deref()
        .map(task_io::parse_wait)
        .transpose()
        .map_err(ApiError::validation)?;
    let key = idempotency_key(&headers)?;
    let idempotency = idempotency_of(key.as_deref(), &spec)?;
    let gate = resolve_after(&state, &principal, &spec.after).await?;
    let task = task_from_spec(spec, user_id, key, &gate);
    let outcome = state.lifecycle.submit(&task, idempotency.as_ref()).await?;
    span.record("task_id", outcome.task.task_id.as_str());
    let location = HeaderValue::from_str(&format!("/v1/tasks/{}", outcome.task.task_id))
        .map_err(|_| ApiError::internal())?;
    let (status, task) = if outcome.created && outcome.task.awaiting_dependencies {
        // Admitted once its dependencies are met (the scheduler's dependency pass).
        tracing::info!(task_id = %outcome.task.task_id, user_id, reason = ?outcome.task.status_reason, "task submitted; it waits for its dependencies");
        (StatusCode::ACCEPTED, outcome.task)
    } else if outcome.created {
        tracing::info!(task_id = %outcome.task.task_id, user_id, "task submitted");
        // Admission inline, so that the answer tells what became of the task. When it cannot
        // finish (store trouble) the task stays pending and the scheduler's admission pass
        // checks it later: a submitted task is never lost.
        match scheduler::admit_task(&state.lifecycle, &state.policies, &outcome.task).await {
            Ok(Admitted::Queued(task)) => {
                state.lifecycle.wakeup().wake();
                (StatusCode::CREATED, task)
            }
            Ok(Admitted::Rejected { task, reason }) => {
                return Err(admission_rejected(&task, &reason));
            }
            Ok(Admitted::Deferred { task, .. }) => (StatusCode::ACCEPTED, task),
            // Moved on before this check could apply: an admission pass took it (only after
            // the back-off, so when this check was slow), or its owner cancelled it. The
            // answer is the task as it is: 201 once admitted, 202 otherwise (the body says).
            Err(StoreError::Conflict { .. }) => {
                let task = state.store.get_task(&outcome.task.task_id).await?;
                tracing::debug!(task_id = %task.task_id, status = %task.status, "the task was decided before its inline admission applied");
                (answer_for_decided(&task), task)
            }
            Err(error) => {
                tracing::warn!(task_id = %outcome.task.task_id, %error, "inline admission did not finish; the scheduler will check the task");
                state.lifecycle.wakeup().wake();
                let task = state
                    .store
                    .get_task(&outcome.task.task_id)
                    .await
                    .unwrap_or(outcome.task);
                (StatusCode::ACCEPTED, task)
            }
        }
    } else {
        (StatusCode::OK, outcome.task)
    };
    let mut response = match wait {
        Some(wait) => {
            // Serverless invoke: the answer carries the result when the task ends in time.
            let task = task_io::wait_for_finish(&state, task, wait).await;
            let result = if task.status.is_terminal() {
                task_io::result_if_any(&state, &task.task_id).await
            } else {
                Ok(None)
            };
            match result {
                Ok(result) if task.status.is_terminal() => {
                    (StatusCode::OK, Json(TaskWithResult { task, result })).into_response()
                }
                _ => (StatusCode::ACCEPTED, Json(task)).into_response(),
            }
        }
        None => (status, Json(task)).into_response(),
    };
    if !outcome.created {
        response
            .headers_mut()
            .insert(IDEMPOTENCY_REPLAYED, HeaderValue::from_static("true"));
    }
    response.headers_mut().insert(header::LOCATION, location);
    Ok(response)
}

/// A new pending task of `user_id` from `spec`, with a fresh id; awaiting its dependencies
/// (with the reason) when `gate` says they are not met yet.
pub(crate) fn task_from_spec(
    spec: TaskSpec,
    user_id: &str,
    key: Option<String>,
    gate: &Gate,
) -> Task {
    let (awaiting_dependencies, status_reason) = match gate {
        Gate::Waiting(why) => (true, Some(why.clone())),
        Gate::Met | Gate::Broken(_) => (false, None),
    };
    let request = Resources::new(
        spec.req_cpu,
        spec.req_memory,
        spec.req_storage,
        spec.req_gpu,
    );
    Task {
        command: spec.command,
        priority: spec.priority,
        labels: spec.labels,
        env: spec.env,
        timeout_s: spec.timeout_s,
        max_attempts: spec.max_attempts,
        idempotency_key: key,
        after: spec.after,
        awaiting_dependencies,
        status_reason,
        preemptible: spec.preemptible,
        ..Task::new_pending(
            format!("task-{}", uuid::Uuid::now_v7().simple()),
            user_id.to_string(),
            spec.docker_image,
            request,
        )
    }
}

/// The stored form of a request's `Idempotency-Key`: the key with a digest of the parsed
/// request (defaults filled, fields in declaration order, maps sorted), so that whitespace and
/// field order in the body do not matter.
pub(crate) fn idempotency_of(
    key: Option<&str>,
    request: &impl Serialize,
) -> ApiResult<Option<IdempotencyKey>> {
    let Some(key) = key else {
        return Ok(None);
    };
    let canonical = serde_json::to_vec(request).map_err(|e| {
        tracing::error!(error = %e, "serializing a request for its idempotency digest");
        ApiError::internal()
    })?;
    Ok(Some(IdempotencyKey {
        key: key.to_string(),
        request_sha256: hex::encode(Sha256::digest(&canonical)),
    }))
}

/// Query of `POST /v1/tasks`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SubmitQuery {
    /// How long to wait for the task to finish (see [`task_io::parse_wait`]).
    pub wait: Option<String>,
}

pub(crate) fn idempotency_key(headers: &HeaderMap) -> ApiResult<Option<String>> {
    let Some(value) = headers.get(&IDEMPOTENCY_KEY) else {
        return Ok(None);
    };
    let bad = || {
        ApiError::bad_request(
            "invalid_idempotency_key",
            format!(
                "Idempotency-Key must be 1..={MAX_IDEMPOTENCY_KEY_LEN} printable ASCII characters"
            ),
        )
    };
    let bytes = value.as_bytes();
    if bytes.is_empty()
        || bytes.len() > MAX_IDEMPOTENCY_KEY_LEN
        || !bytes.iter().all(|b| (0x20..=0x7e).contains(b))
    {
        return Err(bad());
    }
    let key = value.to_str().map_err(|_| bad())?;
    Ok(Some(key.to_string()))
}

/// The submission's answer for a task decided before its inline admission applied: 201 once
/// admitted (queued, or further along), 202 otherwise (the body says what became of it).
fn answer_for_decided(task: &Task) -> StatusCode {
    match task.status {
        TaskStatus::Queued | TaskStatus::Running | TaskStatus::Completed => StatusCode::CREATED,
        TaskStatus::Pending | TaskStatus::Failed | TaskStatus::Cancelled => StatusCode::ACCEPTED,
    }
}

fn admission_rejected(task: &Task, reason: &str) -> ApiError {
    ApiError::new(
        StatusCode::FORBIDDEN,
        "admission_rejected",
        format!(
            "task {} was rejected by the admission policy and is stored as failed: {reason}",
            task.task_id
        ),
    )
}

/// Reads one task.
#[utoipa::path(get, path = "/v1/tasks/{task_id}", tag = "tasks",
    security(("bearer" = [])),
    params(("task_id" = String, Path, description = "Task id")),
    responses(
        (status = 200, description = "The task", body = Task),
        (status = 400, description = "Malformed id (`invalid_id`)", body = ErrorBody),
        (status = 401, description = "No valid token", body = ErrorBody),
        (status = 403, description = "Another user's task", body = ErrorBody),
        (status = 404, description = "No such task (`task_not_found`)", body = ErrorBody),
    ))]
pub async fn get_task(
    State(state): State<AppState>,
    principal: Principal,
    IdPath(task_id): IdPath,
) -> ApiResult<Json<Task>> {
    Ok(Json(visible_task(&state, &principal, &task_id).await?))
}

/// Lists tasks, newest first. Users see their own; admins all, or one user's with `user_id`.
#[utoipa::path(get, path = "/v1/tasks", tag = "tasks",
    security(("bearer" = [])),
    params(
        ("status" = Option<TaskStatus>, Query, description = "Only tasks in this state"),
        ("user_id" = Option<String>, Query, description = "Only this user's tasks (users may only name themselves)",
            min_length = 1, max_length = 128, pattern = "^[A-Za-z0-9._-]{1,128}$"),
        ("array_id" = Option<String>, Query, description = "Only the tasks of this array (`POST /v1/arrays`)",
            min_length = 1, max_length = 128, pattern = "^[A-Za-z0-9._-]{1,128}$"),
        ("limit" = Option<u32>, Query, description = "Page size (default 50)", minimum = 1, maximum = 500),
        ("cursor" = Option<String>, Query, description = "`next_cursor` of the previous page: `<ms>.<task_id>`",
            pattern = "^-?[0-9]{1,15}\\.[A-Za-z0-9._-]{1,128}$"),
    ),
    responses(
        (status = 200, description = "One page", body = TaskList),
        (status = 400, description = "Bad status, limit or cursor", body = ErrorBody),
        (status = 401, description = "No valid token", body = ErrorBody),
        (status = 403, description = "Another user's listing", body = ErrorBody),
    ))]
pub async fn list_tasks(
    State(state): State<AppState>,
    principal: Principal,
    query: Result<Query<BTreeMap<String, String>>, QueryRejection>,
) -> ApiResult<Json<TaskList>> {
    let (caller, is_admin) = principal.require_user()?;
    let Query(params) = query.map_err(|e| ApiError::bad_request("invalid_query", e.body_text()))?;
    if let Some(unknown) = params.keys().find(|k| {
        !matches!(
            k.as_str(),
            "status" | "user_id" | "array_id" | "limit" | "cursor"
        )
    }) {
        return Err(ApiError::bad_request(
            "invalid_query",
            format!(
                "unknown query parameter '{}' (expected status, user_id, array_id, limit, cursor)",
                truncate_for_message(unknown)
            ),
        ));
    }
    let status = params
        .get("status")
        .map(|s| s.parse::<TaskStatus>())
        .transpose()
        .map_err(|why| ApiError::bad_request("invalid_status", why))?;
    let user_id = match params.get("user_id") {
        Some(user) => {
            validate_id(user)
                .map_err(|why| ApiError::bad_request("invalid_id", format!("user_id {why}")))?;
            if !is_admin && user != caller {
                return Err(ApiError::forbidden("users may list only their own tasks"));
            }
            Some(user.clone())
        }
        None if is_admin => None,
        None => Some(caller.to_string()),
    };
    let array_id = params
        .get("array_id")
        .map(|id| {
            validate_id(id)
                .map(|()| id.clone())
                .map_err(|why| ApiError::bad_request("invalid_id", format!("array_id {why}")))
        })
        .transpose()?;
    let max = state.limits.max_page_size;
    let limit = match params.get("limit") {
        Some(raw) => raw
            .parse::<u32>()
            .ok()
            .filter(|n| (1..=max).contains(n))
            .ok_or_else(|| {
                ApiError::bad_request(
                    "invalid_limit",
                    format!("limit must be a whole number in 1..={max}"),
                )
            })?,
        None => state.limits.default_page_size.clamp(1, max.max(1)),
    };
    let after = params.get("cursor").map(|c| decode_cursor(c)).transpose()?;
    let page = state
        .store
        .list_tasks(&TaskQuery {
            status,
            user_id,
            limit,
            after,
            array_id,
        })
        .await?;
    Ok(Json(TaskList {
        tasks: page.tasks,
        next_cursor: page.next.as_ref().map(encode_cursor),
    }))
}

/// The cursor: `<created_at ms>.<task_id>` (15 digits at most stay in chrono's range). Every string of that form is
/// a position in the listing (a page starts after it), so a cursor the document allows is
/// never refused.
pub fn encode_cursor(cursor: &TaskCursor) -> String {
    format!(
        "{}.{}",
        cursor.created_at.timestamp_millis(),
        cursor.task_id
    )
}

pub fn decode_cursor(raw: &str) -> ApiResult<TaskCursor> {
    let bad = || {
        ApiError::bad_request(
            "invalid_cursor",
            "cursor is not one this API returned (`<ms>.<task_id>`)",
        )
    };
    let (millis, task_id) = raw.split_once('.').ok_or_else(bad)?;
    let digits = millis.strip_prefix('-').unwrap_or(millis);
    if digits.is_empty() || digits.len() > 15 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    let millis: i64 = millis.parse().map_err(|_| bad())?;
    let created_at = DateTime::from_timestamp_millis(millis).ok_or_else(bad)?;
    validate_id(task_id).map_err(|_| bad())?;
    Ok(TaskCursor {
        created_at,
        task_id: task_id.to_string(),
    })
}

/// Cancels a task. A pending or queued task is cancelled at once (200); a running one is
/// asked to stop (202, `cancel_requested`) and its worker stops it; a finished one answers
/// 409 `task_finished`.
#[utoipa::path(post, path = "/v1/tasks/{task_id}/cancel", tag = "tasks",
    security(("bearer" = [])),
    params(("task_id" = String, Path, description = "Task id")),
    responses(
        (status = 200, description = "Cancelled", body = Task),
        (status = 202, description = "Running: the worker was asked to stop it", body = Task),
        (status = 401, description = "No valid token", body = ErrorBody),
        (status = 403, description = "Another user's task", body = ErrorBody),
        (status = 404, description = "No such task", body = ErrorBody),
        (status = 409, description = "Already finished (`task_finished`)", body = ErrorBody),
    ))]
pub async fn cancel_task(
    State(state): State<AppState>,
    principal: Principal,
    IdPath(task_id): IdPath,
) -> ApiResult<Response> {
    let task = visible_task(&state, &principal, &task_id).await?;
    let (caller, _) = principal.require_user()?;
    let mut status = task.status;
    // At most two rounds: a lost race (pending/queued -> running) falls back to asking the
    // worker to stop the task.
    for _ in 0..2 {
        match status {
            TaskStatus::Pending | TaskStatus::Queued => {
                match state.lifecycle.cancel(&task_id, caller).await {
                    Ok(task) => {
                        tracing::info!(task_id, by = caller, "task cancelled");
                        return Ok((StatusCode::OK, Json(task)).into_response());
                    }
                    Err(StoreError::Conflict { .. }) => {
                        status = state.store.get_task(&task_id).await?.status;
                    }
                    Err(other) => return Err(other.into()),
                }
            }
            TaskStatus::Running => match state.lifecycle.request_cancel(&task_id).await {
                Ok(task) => {
                    // Its worker's long poll answers now, and the worker stops it.
                    state.work.notify();
                    tracing::info!(
                        task_id,
                        by = caller,
                        "cancellation of a running task requested"
                    );
                    return Ok((StatusCode::ACCEPTED, Json(task)).into_response());
                }
                Err(StoreError::Conflict { .. }) => {
                    status = state.store.get_task(&task_id).await?.status;
                }
                Err(other) => return Err(other.into()),
            },
            finished => return Err(task_finished(&task_id, finished)),
        }
    }
    if status.is_terminal() {
        return Err(task_finished(&task_id, status));
    }
    Err(ApiError::conflict(
        "conflict",
        format!("task {task_id} changed state while being cancelled; try again"),
    ))
}

fn task_finished(task_id: &str, status: TaskStatus) -> ApiError {
    ApiError::conflict(
        "task_finished",
        format!("task {task_id} already finished: it is {status}"),
    )
}

async fn result_of(
    state: &AppState,
    principal: &Principal,
    task_id: &str,
) -> ApiResult<TaskResult> {
    let task = visible_task(state, principal, task_id).await?;
    match state.store.get_result(task_id).await {
        Ok(result) => Ok(result),
        Err(StoreError::NotFound { .. }) => Err(ApiError::not_found(
            "result_not_found",
            format!("task {task_id} has no result yet: it is {}", task.status),
        )),
        Err(other) => Err(other.into()),
    }
}

/// Reads a task's result.
#[utoipa::path(get, path = "/v1/tasks/{task_id}/result", tag = "tasks",
    security(("bearer" = [])),
    params(("task_id" = String, Path, description = "Task id")),
    responses(
        (status = 200, description = "The result", body = TaskResult),
        (status = 401, description = "No valid token", body = ErrorBody),
        (status = 403, description = "Another user's task", body = ErrorBody),
        (status = 404, description = "No such task, or no result yet (`result_not_found`)", body = ErrorBody),
    ))]
pub async fn get_result(
    State(state): State<AppState>,
    principal: Principal,
    IdPath(task_id): IdPath,
) -> ApiResult<Json<TaskResult>> {
    Ok(Json(result_of(&state, &principal, &task_id).await?))
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct AssignmentList {
    /// Oldest first: one per placement of the task (a re-run after a lost worker adds one).
    pub assignments: Vec<model::Assignment>,
}

/// Where a task was placed, attempt by attempt (the dashboard's task page shows them).
#[utoipa::path(get, path = "/v1/tasks/{task_id}/assignments", tag = "tasks",
    security(("bearer" = [])),
    params(("task_id" = String, Path, description = "Task id")),
    responses(
        (status = 200, description = "The task's assignments, oldest first", body = AssignmentList),
        (status = 400, description = "Malformed id (`invalid_id`)", body = ErrorBody),
        (status = 401, description = "No valid token", body = ErrorBody),
        (status = 403, description = "Another user's task", body = ErrorBody),
        (status = 404, description = "No such task (`task_not_found`)", body = ErrorBody),
    ))]
pub async fn list_task_assignments(
    State(state): State<AppState>,
    principal: Principal,
    IdPath(task_id): IdPath,
) -> ApiResult<Json<AssignmentList>> {
    visible_task(&state, &principal, &task_id).await?;
    let mut assignments = state
        .store
        .list_assignments(&AssignmentFilter {
            task_id: Some(task_id),
            ..AssignmentFilter::default()
        })
        .await?;
    assignments.sort_by_key(|a| (a.attempt, a.assigned_at));
    Ok(Json(AssignmentList { assignments }))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn spec() -> TaskSpec {
        serde_json::from_str(r#"{"docker_image":"busybox"}"#).unwrap()
    }

    #[test]
    fn spec_defaults_are_the_seeds() {
        let s = spec();
        assert_eq!(
            (s.req_cpu, s.req_memory, s.req_storage, s.req_gpu),
            (1.0, 1.0, 0.0, 0.0)
        );
        assert_eq!((s.priority, s.max_attempts, s.timeout_s), (0, 3, None));
        assert!(s.validate(&Limits::default()).is_ok());
    }

    #[test]
    fn spec_rules_name_the_field() {
        let limits = Limits::default();
        type Mutation = Box<dyn Fn(&mut TaskSpec)>;
        let cases: Vec<(&str, Mutation)> = vec![
            ("req_cpu", Box::new(|s| s.req_cpu = f64::NAN)),
            ("req_cpu", Box::new(|s| s.req_cpu = 0.0)),
            ("req_cpu", Box::new(|s| s.req_cpu = 0.0001)),
            ("req_memory", Box::new(|s| s.req_memory = f64::INFINITY)),
            ("req_storage", Box::new(|s| s.req_storage = -1.0)),
            ("req_gpu", Box::new(|s| s.req_gpu = 0.5)),
            ("req_gpu", Box::new(|s| s.req_gpu = 65.0)),
            ("req_cpu", Box::new(|s| s.req_cpu = 257.0)),
            (
                "docker_image",
                Box::new(|s| s.docker_image = "Bad Image".into()),
            ),
            ("command", Box::new(|s| s.command = Some("a\0b".into()))),
            (
                "command",
                Box::new(|s| s.command = Some("x".repeat(16 * 1024 + 1))),
            ),
            (
                "env key",
                Box::new(|s| {
                    s.env.insert("1BAD".into(), "v".into());
                }),
            ),
            (
                "label key",
                Box::new(|s| {
                    s.labels.insert("bad key".into(), "v".into());
                }),
            ),
            ("priority", Box::new(|s| s.priority = 1001)),
            ("timeout_s", Box::new(|s| s.timeout_s = Some(0))),
            ("max_attempts", Box::new(|s| s.max_attempts = 21)),
        ];
        for (field, mutate) in cases {
            let mut s = spec();
            mutate(&mut s);
            let err = s.validate(&limits).unwrap_err();
            assert_eq!(err.code, "validation_failed");
            assert!(err.message.contains(field), "{field}: {}", err.message);
        }
    }

    /// A task decided before its submission's check applied is answered by what it became:
    /// 201 only once admitted, never the undocumented "202 with a queued task".
    #[test]
    fn a_task_decided_elsewhere_is_answered_by_its_state() {
        for status in TaskStatus::ALL {
            let mut task = Task::new_pending(
                "t".into(),
                "alice".into(),
                "busybox".into(),
                Resources::new(1.0, 1.0, 0.0, 0.0),
            );
            task.status = status;
            let expected = match status {
                TaskStatus::Queued | TaskStatus::Running | TaskStatus::Completed => {
                    StatusCode::CREATED
                }
                _ => StatusCode::ACCEPTED,
            };
            assert_eq!(answer_for_decided(&task), expected, "{status}");
        }
    }

    #[test]
    fn cursor_round_trips_and_refuses_garbage() {
        let cursor = TaskCursor {
            created_at: DateTime::from_timestamp_millis(1_700_000_000_123).unwrap(),
            task_id: "task-abc".into(),
        };
        assert_eq!(decode_cursor(&encode_cursor(&cursor)).unwrap(), cursor);
        // Task ids may contain dots: the first one ends the milliseconds.
        let dotted = TaskCursor {
            created_at: DateTime::from_timestamp_millis(-5).unwrap(),
            task_id: "a.b.c".into(),
        };
        assert_eq!(decode_cursor(&encode_cursor(&dotted)).unwrap(), dotted);
        for bad in [
            "",
            "!!!",
            "bm90LWEtY3Vyc29y",
            "12.bad id",
            "+12.t",
            "1234567890123456.t",
            "12.",
            ".t",
        ] {
            assert_eq!(
                decode_cursor(bad).unwrap_err().code,
                "invalid_cursor",
                "{bad}"
            );
        }
    }
}
