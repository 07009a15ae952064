//! `/v1/policies` (admin): upload a policy component (validated before it is stored: it
//! compiles, implements a world, accepts its configuration, and decides a synthetic round
//! within its limits), list versions with this replica's view of them, activate (a
//! compare-and-swap in the store, then a pointer swap here; the other replicas follow through
//! their policy sync), roll back, delete, and dry-run a version against the current cluster.
//! Also `GET /v1/cluster/snapshot`, the document `cloudai policy test --snapshot` replays.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Instant;

use axum::extract::rejection::QueryRejection;
use axum::extract::{
    DefaultBodyLimit, FromRequest, FromRequestParts, Multipart, Path, Query, Request, State,
};
use axum::http::{StatusCode, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use serde::{Deserialize, Deserializer, Serialize};
use utoipa::ToSchema;

use super::AppState;
use super::Limits;
use super::auth::Principal;
use super::error::{ApiError, ApiResult, ErrorBody, ErrorDetail};
use super::extract::{ValidJson, Validate, truncate_for_message};
use super::task_io::event as sse_event;
use crate::event_log::{self as events, PolicyChange};
use crate::model::{self, ActivePolicy, PolicyKind, PolicyVersion};
use crate::policy::AdmissionDecision;
use crate::policy::snapshot::ClusterSnapshot;
use crate::policy::sync::{LoadFromStoreError, load_from_store};
use crate::policy::{Decision, LoadOptions, PolicyError, PolicyRuntime, native};
use crate::store::{StoreError, sha256_hex};

/// Largest `config` of a policy, in bytes.
const MAX_CONFIG_BYTES: usize = 64 * 1024;
/// Default and largest batch of a dry run.
const DRY_RUN_DEFAULT_LIMIT: u32 = 100;
const DRY_RUN_MAX_LIMIT: u32 = 1000;
/// Default and largest number of tasks (queued, and pending) in an exported snapshot.
const SNAPSHOT_DEFAULT_LIMIT: usize = 1000;
const SNAPSHOT_MAX_LIMIT: usize = 10_000;

pub fn router(max_policy_bytes: usize) -> Router<AppState> {
    Router::new()
        .route(
            "/v1/policies",
            // Components are large (a Python guest is ~20 MB): this route alone takes them.
            post(upload_policy)
                .layer(DefaultBodyLimit::max(max_policy_bytes))
                .get(list_policies),
        )
        .route("/v1/policies/rollback", post(rollback_policy))
        .route("/v1/policies/{name}", get(get_policy))
        .route("/v1/policies/{name}/activate", post(activate_policy))
        .route("/v1/policies/{name}/dry-run", post(dry_run_policy))
        .route(
            "/v1/policies/{name}/versions/{version}",
            delete(delete_policy_version),
        )
        .route("/v1/cluster/snapshot", get(cluster_snapshot))
}

/// The calling admin's user id; 403 `forbidden` for anyone else, before the body is read
/// (a user learns nothing about what a policy request would have done).
pub struct Admin(pub String);

impl FromRequestParts<AppState> for Admin {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        let principal = Principal::from_request_parts(parts, state).await?;
        Ok(Admin(principal.require_admin()?.to_string()))
    }
}

// ------------------------------------------------------------------------------------------
// Names, versions and errors
// ------------------------------------------------------------------------------------------

/// `[a-z0-9][a-z0-9._-]{0,62}`.
pub fn check_name(name: &str) -> Result<(), String> {
    let ok = (1..=63).contains(&name.len())
        && name
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        && name.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'_' | b'-')
        });
    if ok {
        Ok(())
    } else {
        Err(format!(
            "policy name '{}' must match [a-z0-9][a-z0-9._-]{{0,62}}",
            truncate_for_message(name)
        ))
    }
}

/// `[A-Za-z0-9][A-Za-z0-9._+-]{0,63}`.
pub fn check_version(version: &str) -> Result<(), String> {
    let ok = (1..=64).contains(&version.len())
        && version
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_alphanumeric())
        && version
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'+' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "policy version '{}' must match [A-Za-z0-9][A-Za-z0-9._+-]{{0,63}}",
            truncate_for_message(version)
        ))
    }
}

fn name_in_path(name: &str) -> ApiResult<()> {
    check_name(name).map_err(|why| ApiError::bad_request("invalid_id", why))
}

fn invalid(reason: impl std::fmt::Display) -> ApiError {
    ApiError::new(
        StatusCode::UNPROCESSABLE_ENTITY,
        "policy_invalid",
        reason.to_string(),
    )
}

fn not_found(name: &str, version: Option<&str>) -> ApiError {
    let what = match version {
        Some(v) => format!("policy {name} has no version {v}"),
        None => format!("no policy named {name}"),
    };
    ApiError::not_found("policy_not_found", what)
}

/// A version this host could not load, as an answer.
fn load_failed(name: &str, version: &str, err: LoadFromStoreError) -> ApiError {
    match err {
        LoadFromStoreError::Store(StoreError::NotFound { .. }) => not_found(name, Some(version)),
        LoadFromStoreError::Store(e) => e.into(),
        LoadFromStoreError::Policy(e) => invalid(format!(
            "policy {name} version {version} cannot be loaded on this host: {e}"
        )),
    }
}

fn pair(name: &str, version: &str) -> (String, String) {
    (name.to_string(), version.to_string())
}

// ------------------------------------------------------------------------------------------
// Upload
// ------------------------------------------------------------------------------------------

/// A stored version, as uploaded.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct UploadedPolicy {
    pub policy: PolicyVersion,
    /// The world the component implements.
    pub kind: PolicyKind,
    /// Time to compile the component, ms (a cached compilation: ~0).
    pub compile_ms: f64,
    /// Time to check it (world, `configure`, smoke decision), ms.
    pub validate_ms: f64,
}

/// The fields of an upload, from the query string or multipart parts.
#[derive(Debug, Default)]
struct UploadFields {
    name: Option<String>,
    version: Option<String>,
    kind: Option<String>,
    config: Option<String>,
    memory_mb: Option<String>,
    deadline_ms: Option<String>,
}

impl UploadFields {
    fn set(&mut self, field: &str, value: String) -> ApiResult<()> {
        let slot = match field {
            "name" => &mut self.name,
            "version" => &mut self.version,
            "kind" => &mut self.kind,
            "config" => &mut self.config,
            "memory_mb" => &mut self.memory_mb,
            "deadline_ms" => &mut self.deadline_ms,
            other => {
                return Err(ApiError::bad_request(
                    "invalid_query",
                    format!(
                        "unknown field '{}' (expected name, version, kind, config, memory_mb, \
                         deadline_ms, and the component)",
                        truncate_for_message(other)
                    ),
                ));
            }
        };
        if slot.is_some() {
            return Err(ApiError::validation(format!("{field} is given twice")));
        }
        *slot = Some(value);
        Ok(())
    }
}

fn parse_number(field: &str, value: Option<&str>) -> ApiResult<Option<u64>> {
    value
        .map(|v| {
            v.parse::<u64>().map_err(|_| {
                ApiError::validation(format!(
                    "{field} must be a positive whole number, got '{}'",
                    truncate_for_message(v)
                ))
            })
        })
        .transpose()
}

/// Uploads a policy version (admin). The component is the raw body
/// (`Content-Type: application/wasm` or `application/octet-stream`, fields in the query
/// string) or the `component` part of a `multipart/form-data` body (fields as parts or in
/// the query string). It is compiled and checked before anything is stored.
///
/// With `Accept: text/event-stream` the answer comes once the fields, the size and the
/// name/version are checked: 200 and a Server-Sent Events stream of `progress` events
/// (an [`UploadProgress`] as each stage starts and every ~500 ms while it lasts), then one
/// `stored` event (the [`UploadedPolicy`] a 201 carries) or one `failed` event (an
/// `ErrorBody` with the code a 409 or 422 would carry). Either way the upload runs in its own
/// task: a client that goes away cancels nothing, and the version ends up stored (and loaded
/// here) or not stored at all; `GET /v1/policies` tells which.
#[utoipa::path(post, path = "/v1/policies", tag = "policies",
    security(("bearer" = [])),
    params(
        ("name" = String, Query, description = "The policy's name",
            min_length = 1, max_length = 63, pattern = "^[a-z0-9][a-z0-9._-]{0,62}$"),
        ("version" = String, Query, description = "The version; versions are immutable",
            min_length = 1, max_length = 64, pattern = "^[A-Za-z0-9][A-Za-z0-9._+-]{0,63}$"),
        ("kind" = Option<crate::model::PolicyKind>, Query, description = "Must be the component's world (default: the component's)"),
        ("config" = Option<String>, Query, description = "JSON text passed to the policy's `configure` (`{}` when absent)"),
        ("memory_mb" = Option<u64>, Query, description = "The version's memory limit, MiB (within the host's cap)"),
        ("deadline_ms" = Option<u64>, Query, description = "The version's deadline per evaluation, ms (within the host's cap)"),
        ("Accept" = Option<String>, Header, description = "`text/event-stream`: answer at once with the upload's progress as Server-Sent Events"),
    ),
    request_body(content = Vec<u8>, description = "The component (raw, or the `component` part of multipart/form-data)", content_type = "application/wasm"),
    responses(
        (status = 201, description = "Validated and stored", body = UploadedPolicy),
        (status = 200, description = "With `Accept: text/event-stream`: `progress` events (UploadProgress), then `stored` (UploadedPolicy) or `failed` (ErrorBody: `policy_invalid`, `policy_exists`, `internal`); nothing is stored on `failed`", body = UploadProgress, content_type = "text/event-stream"),
        (status = 401, description = "No valid token", body = ErrorBody),
        (status = 403, description = "Not an admin", body = ErrorBody),
        (status = 409, description = "The name and version are taken (`policy_exists`)", body = ErrorBody),
        (status = 413, description = "Larger than the host's limit for components", body = ErrorBody),
        (status = 415, description = "Neither a raw component nor multipart/form-data", body = ErrorBody),
        (status = 422, description = "Invalid fields, or the component failed validation (`policy_invalid`, with the reason); nothing was stored", body = ErrorBody),
    ))]
pub async fn upload_policy(
    State(state): State<AppState>,
    Admin(admin): Admin,
    query: Result<Query<BTreeMap<String, String>>, QueryRejection>,
    request: Request,
) -> ApiResult<Response> {
    let started = Instant::now();
    let streaming = wants_event_stream(request.headers());
    let upload = check_upload(&state, admin, query, request).await?;
    let size_bytes = upload.bytes.len() as u64;
    let (progress, events) = tokio::sync::mpsc::unbounded_channel();
    let _ = progress.send(UploadEvent::Stage(UploadStage::Received));
    // Its own task: a client that disconnects does not cancel it halfway (see above).
    let work = tokio::spawn(async move {
        let outcome = run_upload(&state, upload, &progress).await;
        let _ = progress.send(UploadEvent::Done(outcome));
    });
    if streaming {
        return Ok(upload_events(events, started, size_bytes).into_response());
    }
    drop(work);
    let mut events = events;
    while let Some(event) = events.recv().await {
        if let UploadEvent::Done(outcome) = event {
            return outcome.map(|answer| (StatusCode::CREATED, Json(answer)).into_response());
        }
    }
    tracing::error!("the policy upload task ended without an outcome");
    Err(ApiError::internal())
}

/// Whether the client asked for the upload's progress as Server-Sent Events.
fn wants_event_stream(headers: &axum::http::HeaderMap) -> bool {
    headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|v| {
            v.split(';')
                .next()
                .unwrap_or_default()
                .trim()
                .eq_ignore_ascii_case("text/event-stream")
        })
}

/// An upload that passed the cheap checks (fields, size, name and version free).
struct CheckedUpload {
    name: String,
    version: String,
    kind: Option<PolicyKind>,
    config: String,
    memory_bytes: Option<u64>,
    deadline_ms: Option<u64>,
    limits: Option<crate::policy::PolicyLimits>,
    bytes: Vec<u8>,
    admin: String,
}

async fn check_upload(
    state: &AppState,
    admin: String,
    query: Result<Query<BTreeMap<String, String>>, QueryRejection>,
    request: Request,
) -> ApiResult<CheckedUpload> {
    let Query(params) = query.map_err(|e| ApiError::bad_request("invalid_query", e.body_text()))?;
    let mut fields = UploadFields::default();
    for (key, value) in params {
        fields.set(&key, value)?;
    }
    let bytes = read_component(state, request, &mut fields).await?;

    let name = fields
        .name
        .ok_or_else(|| ApiError::validation("name is required"))?;
    check_name(&name).map_err(ApiError::validation)?;
    let version = fields
        .version
        .ok_or_else(|| ApiError::validation("version is required"))?;
    check_version(&version).map_err(ApiError::validation)?;
    let kind: Option<PolicyKind> = fields
        .kind
        .as_deref()
        .map(|k| k.parse().map_err(ApiError::validation))
        .transpose()?;
    let config = fields.config.unwrap_or_default();
    let config = if config.trim().is_empty() {
        "{}".to_string()
    } else {
        config
    };
    if config.len() > MAX_CONFIG_BYTES {
        return Err(ApiError::validation(format!(
            "config must be at most {MAX_CONFIG_BYTES} bytes"
        )));
    }
    if let Err(e) = serde_json::from_str::<serde_json::Value>(&config) {
        return Err(ApiError::validation(format!("config is not JSON: {e}")));
    }
    let memory_bytes = parse_number("memory_mb", fields.memory_mb.as_deref())?
        .map(|mb| mb.saturating_mul(1 << 20));
    let deadline_ms = parse_number("deadline_ms", fields.deadline_ms.as_deref())?;
    let limits = state
        .policies
        .limits_for(memory_bytes, deadline_ms)
        .map_err(ApiError::validation)?;
    if bytes.is_empty() {
        return Err(invalid("the component is empty"));
    }

    // Checked before compiling: a large guest takes seconds to compile.
    match state.store.get_policy_version(&name, &version).await {
        Ok(_) => return Err(exists(&name, &version)),
        Err(StoreError::NotFound { .. }) => {}
        Err(e) => return Err(e.into()),
    }
    Ok(CheckedUpload {
        name,
        version,
        kind,
        config,
        memory_bytes,
        deadline_ms,
        limits,
        bytes,
        admin,
    })
}

/// A stage of an upload, as its `progress` events name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum UploadStage {
    /// The component is read and the fields are checked.
    Received,
    Compiling,
    /// `configure` and a smoke decision within the version's limits.
    Validating,
    Storing,
}

/// One `progress` event of a streamed upload.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct UploadProgress {
    pub stage: UploadStage,
    /// Since the request arrived, ms.
    pub elapsed_ms: u64,
    /// The component's size.
    pub bytes: u64,
}

enum UploadEvent {
    Stage(UploadStage),
    Done(ApiResult<UploadedPolicy>),
}

type Progress = tokio::sync::mpsc::UnboundedSender<UploadEvent>;

/// Compiles, checks and stores a checked upload, telling `progress` as each stage starts.
/// Refused or failed, it leaves nothing stored and nothing loaded.
async fn run_upload(
    state: &AppState,
    upload: CheckedUpload,
    progress: &Progress,
) -> ApiResult<UploadedPolicy> {
    let CheckedUpload {
        name,
        version,
        kind,
        config,
        memory_bytes,
        deadline_ms,
        limits,
        bytes,
        admin,
    } = upload;
    let stage = |s| {
        // A client that went away no longer listens; the upload goes on.
        let _ = progress.send(UploadEvent::Stage(s));
    };
    let runtime = state.policies.clone();
    let (n, v, c) = (name.clone(), version.clone(), config.clone());
    let component = bytes.clone();
    let validating = progress.clone();
    stage(UploadStage::Compiling);
    let checked = tokio::task::spawn_blocking(move || {
        let started = Instant::now();
        runtime.engine().compile(&component)?;
        let compiled = started.elapsed();
        let _ = validating.send(UploadEvent::Stage(UploadStage::Validating));
        let started = Instant::now();
        let kind = runtime.load_with(
            &n,
            &v,
            &component,
            &c,
            LoadOptions {
                limits,
                smoke_check: true,
            },
        )?;
        Ok::<_, PolicyError>((kind, compiled, started.elapsed()))
    })
    .await
    .map_err(|e| {
        tracing::error!(error = %e, "the policy validation thread failed");
        ApiError::internal()
    })?;
    let (loaded_kind, compiled, validated) = match checked {
        Ok(done) => done,
        Err(PolicyError::AlreadyLoaded { .. }) => return Err(exists(&name, &version)),
        Err(e) => {
            tracing::info!(policy_name = %name, policy_version = %version, error = %e, "policy upload refused");
            return Err(invalid(e));
        }
    };
    if let Some(wanted) = kind
        && wanted != loaded_kind
    {
        let _ = state.policies.unload(&name, &version);
        return Err(invalid(format!(
            "the component implements the {loaded_kind} world, not {wanted}"
        )));
    }

    stage(UploadStage::Storing);
    let stored = PolicyVersion {
        name: name.clone(),
        version: version.clone(),
        kind: loaded_kind,
        sha256: sha256_hex(&bytes),
        size_bytes: bytes.len() as u64,
        config,
        uploaded_at: model::now(),
        uploaded_by: admin.clone(),
        memory_bytes,
        deadline_ms,
    };
    if let Err(e) = state.store.insert_policy_version(&stored, &bytes).await {
        // Nothing stored: nothing kept loaded either.
        let _ = state.policies.unload(&name, &version);
        return Err(match e {
            StoreError::AlreadyExists { .. } => exists(&name, &version),
            other => other.into(),
        });
    }
    state.lifecycle.events().publish(events::policy(
        PolicyChange::Uploaded,
        &name,
        &version,
        loaded_kind,
    ));
    tracing::info!(
        policy_name = %name, policy_version = %version, kind = loaded_kind.as_str(),
        size_bytes = stored.size_bytes, by = %admin, "policy uploaded"
    );
    Ok(UploadedPolicy {
        policy: stored,
        kind: loaded_kind,
        compile_ms: compiled.as_secs_f64() * 1000.0,
        validate_ms: validated.as_secs_f64() * 1000.0,
    })
}

/// How often a streamed upload repeats its current stage.
const PROGRESS_EVERY: std::time::Duration = std::time::Duration::from_millis(500);

/// The event stream of an upload: its stages as they start (repeated every
/// [`PROGRESS_EVERY`] while one lasts), then `stored` or `failed`, and the stream ends.
fn upload_events(
    events: tokio::sync::mpsc::UnboundedReceiver<UploadEvent>,
    started: Instant,
    size_bytes: u64,
) -> Sse<impl futures::Stream<Item = Result<Event, Infallible>>> {
    struct Upload {
        events: tokio::sync::mpsc::UnboundedReceiver<UploadEvent>,
        stage: UploadStage,
        done: bool,
    }
    let progress = move |stage| {
        let elapsed_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
        sse_event(
            "progress",
            &UploadProgress {
                stage,
                elapsed_ms,
                bytes: size_bytes,
            },
        )
    };
    let upload = Upload {
        events,
        stage: UploadStage::Received,
        done: false,
    };
    let stream = futures::stream::unfold(upload, move |mut u| async move {
        if u.done {
            return None;
        }
        let event = match tokio::time::timeout(PROGRESS_EVERY, u.events.recv()).await {
            Err(_) => progress(u.stage),
            Ok(Some(UploadEvent::Stage(stage))) => {
                u.stage = stage;
                progress(stage)
            }
            Ok(Some(UploadEvent::Done(Ok(answer)))) => {
                u.done = true;
                sse_event("stored", &answer)
            }
            Ok(Some(UploadEvent::Done(Err(error)))) => {
                u.done = true;
                sse_event("failed", &error_body(error))
            }
            Ok(None) => {
                tracing::error!("the policy upload task ended without an outcome");
                u.done = true;
                sse_event("failed", &error_body(ApiError::internal()))
            }
        };
        Some((Ok::<Event, Infallible>(event), u))
    });
    Sse::new(stream).keep_alive(KeepAlive::default())
}

fn error_body(error: ApiError) -> ErrorBody {
    ErrorBody {
        error: ErrorDetail {
            code: error.code.to_string(),
            message: error.message,
        },
    }
}

fn exists(name: &str, version: &str) -> ApiError {
    ApiError::conflict(
        "policy_exists",
        format!("policy {name} version {version} exists already (versions are immutable)"),
    )
}

/// The component's bytes: the raw body, or the `component` part of a multipart body (whose
/// other parts are fields).
async fn read_component(
    state: &AppState,
    request: Request,
    fields: &mut UploadFields,
) -> ApiResult<Vec<u8>> {
    let limit = state.limits.max_policy_bytes;
    let too_large = || {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            format!("the component is larger than this host's limit of {limit} bytes"),
        )
    };
    let declared = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|len| len > limit as u64) {
        return Err(too_large());
    }
    let content_type = request
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase();
    match content_type.as_str() {
        "application/wasm" | "application/octet-stream" => {
            let bytes = axum::body::Bytes::from_request(request, state)
                .await
                .map_err(|rejection| {
                    if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
                        too_large()
                    } else {
                        ApiError::bad_request(
                            "invalid_body",
                            format!("could not read the request body: {rejection}"),
                        )
                    }
                })?;
            Ok(bytes.to_vec())
        }
        "multipart/form-data" => {
            let mut multipart = Multipart::from_request(request, state)
                .await
                .map_err(|e| ApiError::bad_request("invalid_body", e.body_text()))?;
            let mut component = None;
            let part_error = |e: axum::extract::multipart::MultipartError| {
                if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
                    too_large()
                } else {
                    ApiError::bad_request("invalid_body", e.body_text())
                }
            };
            while let Some(field) = multipart.next_field().await.map_err(part_error)? {
                let name = field.name().unwrap_or_default().to_string();
                if name == "component" {
                    if component.is_some() {
                        return Err(ApiError::validation("component is given twice"));
                    }
                    component = Some(field.bytes().await.map_err(part_error)?.to_vec());
                } else {
                    let text = field.text().await.map_err(part_error)?;
                    fields.set(&name, text)?;
                }
            }
            component
                .ok_or_else(|| ApiError::validation("the multipart body has no `component` part"))
        }
        _ => Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "expected the component as the body (Content-Type: application/wasm or \
             application/octet-stream) or as the `component` part of multipart/form-data",
        )),
    }
}

// ------------------------------------------------------------------------------------------
// Listing
// ------------------------------------------------------------------------------------------

/// A stored version, and what this replica makes of it.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct PolicyStatus {
    #[serde(flatten)]
    pub policy: PolicyVersion,
    /// Compiled and loaded on this replica.
    pub loaded: bool,
    /// The version this replica runs for its kind.
    pub active: bool,
    /// Deactivated on this replica after repeated failures.
    pub deactivated: bool,
    pub consecutive_failures: u32,
    pub total_failures: u64,
    /// Rounds or checks it decided on this replica.
    pub evaluations: u64,
    /// Why it could not be loaded on this replica, if it could not.
    pub load_error: Option<String>,
    /// The version of the `cloudai:policy` contract it was built against (`0.1.0`, or
    /// `0.2.0`: a placement policy that may preempt), when loaded on this replica.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub contract: Option<String>,
}

/// The store's active record of each kind (`None`: the native policy / accept all).
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ActiveRecords {
    pub placement: Option<ActivePolicy>,
    pub admission: Option<ActivePolicy>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct PolicyList {
    /// By name, then upload time.
    pub versions: Vec<PolicyStatus>,
    pub active: ActiveRecords,
}

async fn policy_list(state: &AppState, name: Option<&str>) -> ApiResult<PolicyList> {
    let stored = state.store.list_policy_versions(name).await?;
    let local: BTreeMap<(String, String), crate::policy::PolicyVersionInfo> = state
        .policies
        .versions()
        .into_iter()
        .map(|info| ((info.name.clone(), info.version.clone()), info))
        .collect();
    let versions = stored
        .into_iter()
        .map(|policy| {
            let info = local.get(&(policy.name.clone(), policy.version.clone()));
            let load_error = state.policies.load_error(&policy.name, &policy.version);
            PolicyStatus {
                loaded: info.is_some(),
                active: info.is_some_and(|i| i.active),
                deactivated: info.is_some_and(|i| i.deactivated),
                consecutive_failures: info.map_or(0, |i| i.consecutive_failures),
                total_failures: info.map_or(0, |i| i.total_failures),
                evaluations: info.map_or(0, |i| i.evaluations),
                load_error,
                contract: info.map(|i| i.contract.to_string()),
                policy,
            }
        })
        .collect();
    Ok(PolicyList {
        versions,
        active: ActiveRecords {
            placement: state.store.get_active_policy(PolicyKind::Placement).await?,
            admission: state.store.get_active_policy(PolicyKind::Admission).await?,
        },
    })
}

/// Lists every stored version with this replica's view of it, and the active records.
#[utoipa::path(get, path = "/v1/policies", tag = "policies",
    security(("bearer" = [])),
    responses(
        (status = 200, description = "Every version and the active record per kind", body = PolicyList),
        (status = 401, description = "No valid token", body = ErrorBody),
        (status = 403, description = "Not an admin", body = ErrorBody),
    ))]
pub async fn list_policies(
    State(state): State<AppState>,
    Admin(_): Admin,
) -> ApiResult<Json<PolicyList>> {
    Ok(Json(policy_list(&state, None).await?))
}

/// Lists the versions of one policy.
#[utoipa::path(get, path = "/v1/policies/{name}", tag = "policies",
    security(("bearer" = [])),
    params(("name" = String, Path, description = "Policy name")),
    responses(
        (status = 200, description = "Its versions and the active records", body = PolicyList),
        (status = 401, description = "No valid token", body = ErrorBody),
        (status = 403, description = "Not an admin", body = ErrorBody),
        (status = 404, description = "No version of that name (`policy_not_found`)", body = ErrorBody),
    ))]
pub async fn get_policy(
    State(state): State<AppState>,
    Admin(_): Admin,
    Path(name): Path<String>,
) -> ApiResult<Json<PolicyList>> {
    name_in_path(&name)?;
    let list = policy_list(&state, Some(&name)).await?;
    if list.versions.is_empty() {
        return Err(not_found(&name, None));
    }
    Ok(Json(list))
}

// ------------------------------------------------------------------------------------------
// Activation, rollback, deletion
// ------------------------------------------------------------------------------------------

/// A policy version.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PolicyRef {
    #[schema(
        min_length = 1,
        max_length = 63,
        pattern = "^[a-z0-9][a-z0-9._-]{0,62}$"
    )]
    pub name: String,
    #[schema(
        min_length = 1,
        max_length = 64,
        pattern = "^[A-Za-z0-9][A-Za-z0-9._+-]{0,63}$"
    )]
    pub version: String,
}

/// Absent and `null` told apart: `Some(None)` is an explicit `null`.
fn explicit_null<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<Option<PolicyRef>>, D::Error> {
    Option::<PolicyRef>::deserialize(deserializer).map(Some)
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ActivateRequest {
    #[schema(
        min_length = 1,
        max_length = 64,
        pattern = "^[A-Za-z0-9][A-Za-z0-9._+-]{0,63}$"
    )]
    pub version: String,
    /// The version expected to be active now (`null`: none); absent: whatever is active when
    /// the request is handled. The activation applies only if it still is.
    #[serde(default, deserialize_with = "explicit_null")]
    #[schema(value_type = Option<PolicyRef>)]
    pub expected_current: Option<Option<PolicyRef>>,
}

impl Validate for ActivateRequest {
    fn validate(&self, _limits: &Limits) -> Result<(), ApiError> {
        check_version(&self.version).map_err(ApiError::validation)?;
        if let Some(Some(expected)) = &self.expected_current {
            check_name(&expected.name)
                .map_err(|why| ApiError::validation(format!("expected_current: {why}")))?;
            check_version(&expected.version)
                .map_err(|why| ApiError::validation(format!("expected_current: {why}")))?;
        }
        Ok(())
    }
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RollbackRequest {
    pub kind: PolicyKind,
}

impl Validate for RollbackRequest {
    fn validate(&self, _limits: &Limits) -> Result<(), ApiError> {
        Ok(())
    }
}

/// Activates `target` of its kind: loads it here first (so that a version this host cannot
/// run is refused before the store changes), swaps the store's record (compare-and-swap
/// from `expected`, or from what is active now), then swaps locally. A swap in the store is
/// published as `change` (an activation or an operator's rollback).
async fn activate_version(
    state: &AppState,
    admin: &str,
    target: &PolicyVersion,
    expected: Option<Option<(String, String)>>,
    change: PolicyChange,
) -> ApiResult<ActivePolicy> {
    let (name, version) = (&target.name, &target.version);
    if let Err(e) = load_from_store(state.store.as_ref(), &state.policies, target).await {
        if let LoadFromStoreError::Policy(p) = &e {
            state
                .policies
                .record_load_error(name, version, p.to_string());
        }
        return Err(load_failed(name, version, e));
    }
    let runtime = state.policies.clone();
    let _guard = runtime.activation_lock().lock().await;
    let current = state.store.get_active_policy(target.kind).await?;
    let current_pair = current.as_ref().map(|a| pair(&a.name, &a.version));
    let expected = expected.unwrap_or_else(|| current_pair.clone());
    let record = match &current {
        // Already the active one, as expected: nothing to swap in the store.
        Some(active)
            if current_pair == expected && active.name == *name && active.version == *version =>
        {
            active.clone()
        }
        _ => state
            .store
            .activate_policy(target.kind, name, version, admin, expected.clone())
            .await
            .inspect(|_| {
                let event = events::policy(change, name, version, target.kind);
                state.lifecycle.events().publish(event);
            })
            .map_err(|e| match e {
                StoreError::Conflict {
                    kind: "active policy",
                    actual,
                    ..
                } => ApiError::conflict(
                    "policy_conflict",
                    format!(
                        "the active {} policy is {actual}, not {} as expected: nothing changed",
                        target.kind,
                        expected
                            .as_ref()
                            .map_or_else(|| "none".to_string(), |(n, v)| format!("{n}@{v}"))
                    ),
                ),
                StoreError::NotFound { .. } => not_found(name, Some(version)),
                StoreError::Conflict { actual, .. } => ApiError::conflict(
                    "policy_conflict",
                    format!("policy {name} version {version} is {actual}"),
                ),
                other => other.into(),
            })?,
    };
    // An operator's activation overrides this replica's automatic deactivation.
    let _ = runtime.clear_deactivation(name, version);
    if let Err(error) = runtime.activate(name, version) {
        // The store says it is active; the policy sync retries the local swap.
        tracing::error!(policy_name = %name, policy_version = %version, %error, "activated in the store but not here yet");
    }
    tracing::info!(
        policy_name = %name, policy_version = %version, kind = target.kind.as_str(), by = admin,
        "policy activated"
    );
    Ok(record)
}

/// Activates a version (admin): a compare-and-swap of the store's active record, then at once
/// on this replica; the others follow within a second.
#[utoipa::path(post, path = "/v1/policies/{name}/activate", tag = "policies",
    security(("bearer" = [])),
    params(("name" = String, Path, description = "Policy name")),
    request_body = ActivateRequest,
    responses(
        (status = 200, description = "Active", body = ActivePolicy),
        (status = 401, description = "No valid token", body = ErrorBody),
        (status = 403, description = "Not an admin", body = ErrorBody),
        (status = 404, description = "No such version (`policy_not_found`)", body = ErrorBody),
        (status = 409, description = "Another version is active than expected (`policy_conflict`, naming it)", body = ErrorBody),
        (status = 422, description = "The version cannot be loaded on this host (`policy_invalid`)", body = ErrorBody),
    ))]
pub async fn activate_policy(
    State(state): State<AppState>,
    Admin(admin): Admin,
    Path(name): Path<String>,
    ValidJson(body): ValidJson<ActivateRequest>,
) -> ApiResult<Json<ActivePolicy>> {
    name_in_path(&name)?;
    let target = match state.store.get_policy_version(&name, &body.version).await {
        Ok(v) => v,
        Err(StoreError::NotFound { .. }) => return Err(not_found(&name, Some(&body.version))),
        Err(e) => return Err(e.into()),
    };
    let expected = body
        .expected_current
        .map(|e| e.map(|p| (p.name, p.version)));
    Ok(Json(
        activate_version(&state, &admin, &target, expected, PolicyChange::Activated).await?,
    ))
}

/// Activates the version that was active before the current one of a kind (admin).
#[utoipa::path(post, path = "/v1/policies/rollback", tag = "policies",
    security(("bearer" = [])),
    request_body = RollbackRequest,
    responses(
        (status = 200, description = "The previous version is active again", body = ActivePolicy),
        (status = 401, description = "No valid token", body = ErrorBody),
        (status = 403, description = "Not an admin", body = ErrorBody),
        (status = 409, description = "No previous version (`no_previous_version`), or the active one changed meanwhile (`policy_conflict`)", body = ErrorBody),
        (status = 422, description = "The previous version cannot be loaded on this host", body = ErrorBody),
    ))]
pub async fn rollback_policy(
    State(state): State<AppState>,
    Admin(admin): Admin,
    ValidJson(body): ValidJson<RollbackRequest>,
) -> ApiResult<Json<ActivePolicy>> {
    let kind = body.kind;
    let no_previous = |why: String| ApiError::conflict("no_previous_version", why);
    let Some(current) = state.store.get_active_policy(kind).await? else {
        return Err(no_previous(format!("no {kind} policy is active")));
    };
    let Some((name, version)) = current.previous.clone() else {
        return Err(no_previous(format!(
            "the active {kind} policy {}@{} has no previous version",
            current.name, current.version
        )));
    };
    let target = match state.store.get_policy_version(&name, &version).await {
        Ok(v) => v,
        Err(StoreError::NotFound { .. }) => {
            return Err(no_previous(format!(
                "the previous {kind} policy {name}@{version} was deleted"
            )));
        }
        Err(e) => return Err(e.into()),
    };
    let expected = Some((current.name, current.version));
    let change = PolicyChange::RolledBack;
    let activated = activate_version(&state, &admin, &target, Some(expected), change).await?;
    Ok(Json(activated))
}

/// Deletes an inactive version (admin) and unloads it here; the other replicas unload it at
/// their next sync.
#[utoipa::path(delete, path = "/v1/policies/{name}/versions/{version}", tag = "policies",
    security(("bearer" = [])),
    params(
        ("name" = String, Path, description = "Policy name"),
        ("version" = String, Path, description = "Version"),
    ),
    responses(
        (status = 204, description = "Deleted"),
        (status = 401, description = "No valid token", body = ErrorBody),
        (status = 403, description = "Not an admin", body = ErrorBody),
        (status = 404, description = "No such version (`policy_not_found`)", body = ErrorBody),
        (status = 409, description = "It is the active version of its kind (`policy_active`)", body = ErrorBody),
    ))]
pub async fn delete_policy_version(
    State(state): State<AppState>,
    Admin(admin): Admin,
    Path((name, version)): Path<(String, String)>,
) -> ApiResult<StatusCode> {
    name_in_path(&name)?;
    check_version(&version).map_err(|why| ApiError::bad_request("invalid_id", why))?;
    match state.store.delete_policy_version(&name, &version).await {
        Ok(()) => {}
        Err(StoreError::NotFound { .. }) => return Err(not_found(&name, Some(&version))),
        Err(StoreError::Conflict { actual, .. }) => {
            return Err(ApiError::conflict(
                "policy_active",
                format!(
                    "policy {name} version {version} is {actual}: activate another version first"
                ),
            ));
        }
        Err(e) => return Err(e.into()),
    }
    let _ = state.policies.unload(&name, &version);
    state.policies.clear_load_error(&name, &version);
    tracing::info!(policy_name = %name, policy_version = %version, by = admin, "policy version deleted");
    Ok(StatusCode::NO_CONTENT)
}

// ------------------------------------------------------------------------------------------
// Dry run and snapshot
// ------------------------------------------------------------------------------------------

#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DryRunRequest {
    /// The version to try; the newest uploaded when absent.
    #[serde(default)]
    #[schema(
        min_length = 1,
        max_length = 64,
        pattern = "^[A-Za-z0-9][A-Za-z0-9._+-]{0,63}$"
    )]
    pub version: Option<String>,
    /// Most tasks to decide (default 100).
    #[serde(default)]
    #[schema(minimum = 1, maximum = 1000)]
    pub limit: Option<u32>,
}

impl Validate for DryRunRequest {
    fn validate(&self, _limits: &Limits) -> Result<(), ApiError> {
        if let Some(v) = &self.version {
            check_version(v).map_err(ApiError::validation)?;
        }
        if let Some(limit) = self.limit
            && !(1..=DRY_RUN_MAX_LIMIT).contains(&limit)
        {
            return Err(ApiError::validation(format!(
                "limit must be in 1..={DRY_RUN_MAX_LIMIT}, got {limit}"
            )));
        }
        Ok(())
    }
}

/// One decision, as shown by a dry run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct DecisionView {
    /// `assign`, `wait`, `unschedulable`, `preempt` (placement); `accept`, `reject`, `defer`
    /// (admission).
    pub decision: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub worker_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// `preempt`: the running tasks it would stop on `worker_id`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub victims: Vec<String>,
}

impl DecisionView {
    fn placement(decision: &Decision, input: &crate::policy::PlacementInput) -> Self {
        match decision {
            Decision::Assign { worker } => DecisionView {
                decision: "assign".into(),
                worker_id: input.worker_id(*worker).map(str::to_string),
                reason: None,
                victims: Vec::new(),
            },
            Decision::Wait { reason } => DecisionView {
                decision: "wait".into(),
                worker_id: None,
                reason: Some(reason.clone()),
                victims: Vec::new(),
            },
            Decision::Unschedulable { reason } => DecisionView {
                decision: "unschedulable".into(),
                worker_id: None,
                reason: Some(reason.clone()),
                victims: Vec::new(),
            },
            Decision::Preempt { worker, victims } => DecisionView {
                decision: "preempt".into(),
                worker_id: input.worker_id(*worker).map(str::to_string),
                reason: None,
                victims: input.victim_ids(victims),
            },
        }
    }

    fn admission(decision: &AdmissionDecision) -> Self {
        let (decision, reason) = match decision {
            AdmissionDecision::Accept => ("accept", None),
            AdmissionDecision::Reject(r) => ("reject", Some(r.clone())),
            AdmissionDecision::Defer(r) => ("defer", Some(r.clone())),
        };
        DecisionView {
            decision: decision.into(),
            worker_id: None,
            reason,
            victims: Vec::new(),
        }
    }

    /// Same decision (and worker); reasons are worded freely.
    fn same_as(&self, other: &DecisionView) -> bool {
        self.decision == other.decision
            && self.worker_id == other.worker_id
            && self.victims == other.victims
    }
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct DryRunTask {
    pub task_id: String,
    /// The tried version's decision.
    pub candidate: DecisionView,
    /// The decision of what runs now (the active policy, or the native one).
    pub active: DecisionView,
    pub differs: bool,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct DryRunReport {
    pub name: String,
    pub version: String,
    pub kind: PolicyKind,
    /// What the candidate was compared with: `name@version` of the active policy, or
    /// `native best-fit` / `accept all` when none is active.
    pub compared_with: String,
    /// Why the active policy's decisions are the native fallback's, when it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub active_failed: Option<String>,
    pub candidate_ms: f64,
    pub active_ms: f64,
    pub elapsed_ms: f64,
    pub differing: usize,
    pub tasks: Vec<DryRunTask>,
}

/// Runs a version against the current queue (placement) or pending tasks (admission) and
/// the current workers, beside what runs now, without applying anything (admin). Its
/// failures are reported, not counted against it.
#[utoipa::path(post, path = "/v1/policies/{name}/dry-run", tag = "policies",
    security(("bearer" = [])),
    params(("name" = String, Path, description = "Policy name")),
    request_body = DryRunRequest,
    responses(
        (status = 200, description = "Both policies' decisions, task by task", body = DryRunReport),
        (status = 401, description = "No valid token", body = ErrorBody),
        (status = 403, description = "Not an admin", body = ErrorBody),
        (status = 404, description = "No such policy or version (`policy_not_found`)", body = ErrorBody),
        (status = 422, description = "The version failed on this input, or cannot be loaded (`policy_invalid`)", body = ErrorBody),
    ))]
pub async fn dry_run_policy(
    State(state): State<AppState>,
    Admin(_): Admin,
    Path(name): Path<String>,
    ValidJson(body): ValidJson<DryRunRequest>,
) -> ApiResult<Json<DryRunReport>> {
    name_in_path(&name)?;
    let versions = state.store.list_policy_versions(Some(&name)).await?;
    let target = match &body.version {
        Some(v) => versions.iter().find(|s| s.version == *v),
        // Listed by upload time: the newest is last.
        None => versions.last(),
    }
    .cloned()
    .ok_or_else(|| not_found(&name, body.version.as_deref()))?;
    if let Err(e) = load_from_store(state.store.as_ref(), &state.policies, &target).await {
        return Err(load_failed(&target.name, &target.version, e));
    }
    let limit = body.limit.unwrap_or(DRY_RUN_DEFAULT_LIMIT) as usize;
    let snapshot = ClusterSnapshot::capture(state.store.as_ref(), model::now(), limit).await?;
    let runtime = state.policies.clone();
    let kind = target.kind;
    let (n, v) = (target.name.clone(), target.version.clone());
    let report = tokio::task::spawn_blocking(move || match kind {
        PolicyKind::Placement => dry_run_placement(&runtime, &n, &v, &snapshot),
        PolicyKind::Admission => dry_run_admission(&runtime, &n, &v, &snapshot),
    })
    .await
    .map_err(|e| {
        tracing::error!(error = %e, "the dry-run thread failed");
        ApiError::internal()
    })?
    .map_err(|e| {
        invalid(format!(
            "policy {} version {} failed on the current cluster: {e}",
            target.name, target.version
        ))
    })?;
    Ok(Json(report))
}

fn ms(started: Instant) -> f64 {
    started.elapsed().as_secs_f64() * 1000.0
}

fn dry_run_placement(
    runtime: &Arc<PolicyRuntime>,
    name: &str,
    version: &str,
    snapshot: &ClusterSnapshot,
) -> Result<DryRunReport, PolicyError> {
    let all = Instant::now();
    let input = snapshot.placement_input();
    let started = Instant::now();
    let candidate = runtime.place_with(name, version, &input)?;
    let candidate_ms = ms(started);
    let started = Instant::now();
    let (compared_with, active, active_failed) =
        match runtime.active(crate::policy::PolicyKind::Placement) {
            Some((an, av)) => match runtime.place_with(&an, &av, &input) {
                Ok(d) => (format!("{an}@{av}"), d, None),
                Err(e) => (
                    format!("{an}@{av}"),
                    native::best_fit(&input),
                    Some(e.to_string()),
                ),
            },
            None => (
                "native best-fit".to_string(),
                native::best_fit(&input),
                None,
            ),
        };
    let active_ms = ms(started);
    let tasks: Vec<DryRunTask> = candidate
        .iter()
        .zip(&active)
        .enumerate()
        .map(|(i, (c, a))| {
            let (c, a) = (
                DecisionView::placement(c, &input),
                DecisionView::placement(a, &input),
            );
            DryRunTask {
                task_id: input.task_id(i).unwrap_or_default().to_string(),
                differs: !c.same_as(&a),
                candidate: c,
                active: a,
            }
        })
        .collect();
    Ok(DryRunReport {
        name: name.to_string(),
        version: version.to_string(),
        kind: PolicyKind::Placement,
        compared_with,
        active_failed,
        candidate_ms,
        active_ms,
        elapsed_ms: ms(all),
        differing: tasks.iter().filter(|t| t.differs).count(),
        tasks,
    })
}

fn dry_run_admission(
    runtime: &Arc<PolicyRuntime>,
    name: &str,
    version: &str,
    snapshot: &ClusterSnapshot,
) -> Result<DryRunReport, PolicyError> {
    let all = Instant::now();
    let checks = snapshot.admission_inputs();
    let started = Instant::now();
    let candidate = checks
        .iter()
        .map(|(task, usage)| runtime.admit_with(name, version, task, usage))
        .collect::<Result<Vec<_>, _>>()?;
    let candidate_ms = ms(started);
    let started = Instant::now();
    let active_version = runtime.active(crate::policy::PolicyKind::Admission);
    let mut active_failed = None;
    let active: Vec<AdmissionDecision> = checks
        .iter()
        .map(|(task, usage)| match &active_version {
            Some((an, av)) => runtime.admit_with(an, av, task, usage).unwrap_or_else(|e| {
                active_failed.get_or_insert(e.to_string());
                AdmissionDecision::Accept
            }),
            None => AdmissionDecision::Accept,
        })
        .collect();
    let active_ms = ms(started);
    let compared_with =
        active_version.map_or_else(|| "accept all".to_string(), |(n, v)| format!("{n}@{v}"));
    let tasks: Vec<DryRunTask> = checks
        .iter()
        .zip(candidate.iter().zip(&active))
        .map(|((task, _), (c, a))| {
            let (c, a) = (DecisionView::admission(c), DecisionView::admission(a));
            DryRunTask {
                task_id: task.id.clone(),
                differs: !c.same_as(&a),
                candidate: c,
                active: a,
            }
        })
        .collect();
    Ok(DryRunReport {
        name: name.to_string(),
        version: version.to_string(),
        kind: PolicyKind::Admission,
        compared_with,
        active_failed,
        candidate_ms,
        active_ms,
        elapsed_ms: ms(all),
        differing: tasks.iter().filter(|t| t.differs).count(),
        tasks,
    })
}

/// Exports the cluster as a snapshot document (admin): what `cloudai policy test --snapshot`
/// replays offline.
#[utoipa::path(get, path = "/v1/cluster/snapshot", tag = "policies",
    security(("bearer" = [])),
    params(("limit" = Option<usize>, Query, description = "Most queued and most pending tasks (default 1000)", minimum = 1, maximum = 10000)),
    responses(
        (status = 200, description = "The snapshot", body = ClusterSnapshot),
        (status = 400, description = "Invalid query", body = ErrorBody),
        (status = 401, description = "No valid token", body = ErrorBody),
        (status = 403, description = "Not an admin", body = ErrorBody),
    ))]
pub async fn cluster_snapshot(
    State(state): State<AppState>,
    Admin(_): Admin,
    query: Result<Query<BTreeMap<String, String>>, QueryRejection>,
) -> ApiResult<Json<ClusterSnapshot>> {
    let Query(params) = query.map_err(|e| ApiError::bad_request("invalid_query", e.body_text()))?;
    let mut limit = SNAPSHOT_DEFAULT_LIMIT;
    for (key, value) in params {
        if key != "limit" {
            return Err(ApiError::bad_request(
                "invalid_query",
                format!(
                    "unknown query parameter '{}' (expected limit)",
                    truncate_for_message(&key)
                ),
            ));
        }
        limit = value
            .parse::<usize>()
            .ok()
            .filter(|l| (1..=SNAPSHOT_MAX_LIMIT).contains(l))
            .ok_or_else(|| {
                ApiError::bad_request(
                    "invalid_query",
                    format!("limit must be in 1..={SNAPSHOT_MAX_LIMIT}"),
                )
            })?;
    }
    Ok(Json(
        ClusterSnapshot::capture(state.store.as_ref(), model::now(), limit).await?,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_versions_follow_their_patterns() {
        for ok in ["best-fit", "a", "0.x_y-z", &"a".repeat(63)] {
            assert!(check_name(ok).is_ok(), "{ok}");
        }
        for bad in ["", "Best", "-a", ".a", "a/b", "a b", &"a".repeat(64)] {
            assert!(check_name(bad).is_err(), "{bad}");
        }
        for ok in ["1", "1.0.0", "2.0.0-rc.1+build.5", "V_1", &"1".repeat(64)] {
            assert!(check_version(ok).is_ok(), "{ok}");
        }
        for bad in ["", "-1", "+1", "1/2", "1 2", &"1".repeat(65)] {
            assert!(check_version(bad).is_err(), "{bad}");
        }
    }
}

#[cfg(test)]
#[path = "policies_tests.rs"]
mod api_tests;
