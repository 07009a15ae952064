//! `/v1/workers`: registration (join or admin token; returns the worker's own token once),
//! heartbeats and deregistration by the worker itself, and the admin's listing, drain and
//! undrain.

use std::collections::BTreeMap;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::auth::{self, Principal};
use super::error::{ApiError, ApiResult, ErrorBody};
use super::extract::{
    IdPath, OptionalJson, ValidJson, Validate, truncate_for_message, validate_id,
};
use super::tasks::{check_amount, check_labels, labels_schema};
use super::{AppState, Limits};
use crate::model::{self, Resources, Worker, WorkerUsage};
use crate::protocol::route;
use crate::reconciler;
use crate::store::StoreError;

const MAX_WORKER_IP_LEN: usize = 255;

/// A worker's registration.
#[derive(Debug, Clone, PartialEq, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RegisterWorker {
    /// `worker-<uuid v7>` when absent.
    #[serde(default)]
    #[schema(min_length = 1, max_length = 128, pattern = "^[A-Za-z0-9._-]{1,128}$")]
    pub worker_id: Option<String>,
    /// Where people find the machine, e.g. `host:port`: recorded and shown, never connected
    /// to (the agent polls the host). At most 255 characters, no control characters; empty
    /// when absent.
    #[serde(default)]
    #[schema(
        example = "10.0.0.7:7070",
        max_length = 255,
        pattern = "^[^\\u0000-\\u001F\\u007F-\\u009F]*$"
    )]
    pub worker_ip: String,
    /// Cores, at least 1/1024.
    #[schema(minimum = 0.0009765625, maximum = 4096.0)]
    pub total_cpu: f64,
    /// GB, at least 1/1024.
    #[schema(minimum = 0.0009765625, maximum = 65536.0)]
    pub total_memory: f64,
    /// GB.
    #[schema(minimum = 0.0, maximum = 1048576.0)]
    pub total_storage: f64,
    /// Whole devices.
    #[schema(minimum = 0.0, maximum = 1024.0, multiple_of = 1.0)]
    pub total_gpu: f64,
    /// Key/value labels placement policies read (e.g. a zone, a GPU model).
    #[serde(default)]
    #[schema(schema_with = labels_schema)]
    pub labels: BTreeMap<String, String>,
}

impl Validate for RegisterWorker {
    fn validate(&self, limits: &Limits) -> Result<(), ApiError> {
        if let Some(id) = &self.worker_id {
            validate_id(id).map_err(|why| ApiError::validation(format!("worker_id {why}")))?;
        }
        check_worker_ip(&self.worker_ip)?;
        check_amount("total_cpu", self.total_cpu, true, limits.max_worker_cpu)?;
        check_amount(
            "total_memory",
            self.total_memory,
            true,
            limits.max_worker_memory,
        )?;
        check_amount(
            "total_storage",
            self.total_storage,
            false,
            limits.max_worker_storage,
        )?;
        check_amount("total_gpu", self.total_gpu, false, limits.max_worker_gpu)?;
        if self.total_gpu.fract() != 0.0 {
            return Err(ApiError::validation(format!(
                "total_gpu must be a whole number of devices, got {}",
                self.total_gpu
            )));
        }
        check_labels(&self.labels)
    }
}

/// `host:port` where host is an IPv4 address, a `[IPv6]` address or a DNS name.
fn check_worker_ip(addr: &str) -> Result<(), ApiError> {
    if addr.chars().count() > MAX_WORKER_IP_LEN || addr.chars().any(char::is_control) {
        return Err(ApiError::validation(format!(
            "worker_ip '{}' must be at most {MAX_WORKER_IP_LEN} characters without control characters",
            truncate_for_message(addr)
        )));
    }
    Ok(())
}

/// Usage reported with a heartbeat.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct HeartbeatUsage {
    /// Percent of one core, summed over cores (so up to 100 × cores).
    #[schema(minimum = 0.0)]
    pub cpu_percent: f64,
    #[schema(minimum = 0.0, maximum = 100.0)]
    pub memory_percent: f64,
    pub running_tasks: u32,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Heartbeat {
    #[serde(default)]
    pub usage: Option<HeartbeatUsage>,
}

impl Validate for Heartbeat {
    fn validate(&self, _limits: &Limits) -> Result<(), ApiError> {
        if let Some(usage) = &self.usage {
            if !usage.cpu_percent.is_finite() || usage.cpu_percent < 0.0 {
                return Err(ApiError::validation(
                    "usage.cpu_percent must be finite and at least 0",
                ));
            }
            if !(0.0..=100.0).contains(&usage.memory_percent) {
                return Err(ApiError::validation(
                    "usage.memory_percent must be in 0..=100",
                ));
            }
        }
        Ok(())
    }
}

/// A registered worker and its token.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Registered {
    pub worker: Worker,
    /// The worker's own bearer token, `cai_w_<worker_id>.<secret>`. Shown once: the host
    /// keeps only its hash.
    pub token: String,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct HeartbeatAck {
    pub worker: Worker,
    /// The host's clock, Unix seconds.
    pub server_time: i64,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct WorkerList {
    pub workers: Vec<Worker>,
}

pub fn router() -> Router<AppState> {
    Router::new()
        .route(route::REGISTER, post(register_worker).get(list_workers))
        .route(
            "/v1/workers/{worker_id}",
            get(get_worker).delete(delete_worker),
        )
        .route(route::HEARTBEAT, post(heartbeat))
        .route("/v1/workers/{worker_id}/drain", post(drain_worker))
        .route("/v1/workers/{worker_id}/undrain", post(undrain_worker))
}

/// Registers a worker (join token or admin token).
#[utoipa::path(post, path = "/v1/workers", tag = "workers",
    security(("bearer" = [])),
    request_body = RegisterWorker,
    responses(
        (status = 201, description = "Registered; the token is shown only now", body = Registered),
        (status = 401, description = "No valid token", body = ErrorBody),
        (status = 403, description = "Neither the join token nor an admin token", body = ErrorBody),
        (status = 409, description = "The worker id is taken (`worker_exists`)", body = ErrorBody),
        (status = 422, description = "Invalid registration", body = ErrorBody),
    ))]
pub async fn register_worker(
    State(state): State<AppState>,
    principal: Principal,
    ValidJson(body): ValidJson<RegisterWorker>,
) -> ApiResult<Response> {
    if !(principal == Principal::Join || principal.is_admin()) {
        return Err(ApiError::forbidden(
            "registering a worker needs the join token or an admin token",
        ));
    }
    let worker_id = body
        .worker_id
        .unwrap_or_else(|| format!("worker-{}", uuid::Uuid::now_v7().simple()));
    let token = auth::generate_worker_token(&worker_id);
    let worker = Worker::new(
        worker_id,
        body.worker_ip,
        Resources::new(
            body.total_cpu,
            body.total_memory,
            body.total_storage,
            body.total_gpu,
        ),
        body.labels,
        auth::token_sha256_hex(&token),
    );
    state.lifecycle.worker_joined(&worker).await?;
    state.lifecycle.wakeup().capacity_changed();
    tracing::info!(worker_id = %worker.worker_id, worker_ip = %worker.worker_ip, "worker registered");
    Ok((StatusCode::CREATED, Json(Registered { worker, token })).into_response())
}

/// Only the worker itself.
fn require_self(principal: &Principal, worker_id: &str) -> ApiResult<()> {
    match principal {
        Principal::Worker { worker_id: me } if me == worker_id => Ok(()),
        Principal::Worker { .. } => Err(ApiError::forbidden(format!(
            "a worker token may act only for its own worker, not {worker_id}"
        ))),
        _ => Err(ApiError::forbidden(
            "this endpoint needs the worker's own token",
        )),
    }
}

/// Records a heartbeat (the worker's own token).
#[utoipa::path(post, path = "/v1/workers/{worker_id}/heartbeat", tag = "workers",
    security(("bearer" = [])),
    params(("worker_id" = String, Path, description = "Worker id")),
    request_body(content = Option<Heartbeat>, description = "Optional usage report"),
    responses(
        (status = 200, description = "Recorded", body = HeartbeatAck),
        (status = 401, description = "No valid token", body = ErrorBody),
        (status = 403, description = "Not this worker's token", body = ErrorBody),
        (status = 404, description = "No such worker", body = ErrorBody),
        (status = 422, description = "Invalid usage", body = ErrorBody),
    ))]
pub async fn heartbeat(
    State(state): State<AppState>,
    principal: Principal,
    IdPath(worker_id): IdPath,
    OptionalJson(body): OptionalJson<Heartbeat>,
) -> ApiResult<Json<HeartbeatAck>> {
    require_self(&principal, &worker_id)?;
    let usage = body.usage.map(|u| WorkerUsage {
        cpu_percent: u.cpu_percent,
        memory_percent: u.memory_percent,
        running_tasks: u.running_tasks,
    });
    let now = model::now().timestamp();
    let mut worker = state
        .store
        .heartbeat(&worker_id, now, usage.as_ref())
        .await?;
    // Declared lost by the reconciler and back now: active again (its old assignments were
    // or are now handled as lost), and the scheduler woken to place on it.
    if !worker.is_active {
        worker = reconciler::worker_returned(&state.lifecycle, &worker_id).await?;
    }
    Ok(Json(HeartbeatAck {
        worker,
        server_time: now,
    }))
}

/// Lists workers (admin).
#[utoipa::path(get, path = "/v1/workers", tag = "workers",
    security(("bearer" = [])),
    responses(
        (status = 200, description = "All workers, by id", body = WorkerList),
        (status = 401, description = "No valid token", body = ErrorBody),
        (status = 403, description = "Not an admin", body = ErrorBody),
    ))]
pub async fn list_workers(
    State(state): State<AppState>,
    principal: Principal,
) -> ApiResult<Json<WorkerList>> {
    principal.require_admin()?;
    Ok(Json(WorkerList {
        workers: state.store.list_workers().await?,
    }))
}

/// Reads one worker (admin).
#[utoipa::path(get, path = "/v1/workers/{worker_id}", tag = "workers",
    security(("bearer" = [])),
    params(("worker_id" = String, Path, description = "Worker id")),
    responses(
        (status = 200, description = "The worker", body = Worker),
        (status = 401, description = "No valid token", body = ErrorBody),
        (status = 403, description = "Not an admin", body = ErrorBody),
        (status = 404, description = "No such worker (`worker_not_found`)", body = ErrorBody),
    ))]
pub async fn get_worker(
    State(state): State<AppState>,
    principal: Principal,
    IdPath(worker_id): IdPath,
) -> ApiResult<Json<Worker>> {
    principal.require_admin()?;
    Ok(Json(state.store.get_worker(&worker_id).await?))
}

/// Stops placing new tasks on a worker; its running tasks go on (admin).
#[utoipa::path(post, path = "/v1/workers/{worker_id}/drain", tag = "workers",
    security(("bearer" = [])),
    params(("worker_id" = String, Path, description = "Worker id")),
    responses(
        (status = 200, description = "Draining", body = Worker),
        (status = 401, description = "No valid token", body = ErrorBody),
        (status = 403, description = "Not an admin", body = ErrorBody),
        (status = 404, description = "No such worker", body = ErrorBody),
    ))]
pub async fn drain_worker(
    State(state): State<AppState>,
    principal: Principal,
    IdPath(worker_id): IdPath,
) -> ApiResult<Json<Worker>> {
    let admin = principal.require_admin()?;
    let worker = state.lifecycle.set_draining(&worker_id, true).await?;
    tracing::info!(worker_id, by = admin, "worker draining");
    Ok(Json(worker))
}

/// Places tasks on a drained worker again (admin).
#[utoipa::path(post, path = "/v1/workers/{worker_id}/undrain", tag = "workers",
    security(("bearer" = [])),
    params(("worker_id" = String, Path, description = "Worker id")),
    responses(
        (status = 200, description = "Not draining", body = Worker),
        (status = 401, description = "No valid token", body = ErrorBody),
        (status = 403, description = "Not an admin", body = ErrorBody),
        (status = 404, description = "No such worker", body = ErrorBody),
    ))]
pub async fn undrain_worker(
    State(state): State<AppState>,
    principal: Principal,
    IdPath(worker_id): IdPath,
) -> ApiResult<Json<Worker>> {
    let admin = principal.require_admin()?;
    let worker = state.lifecycle.set_draining(&worker_id, false).await?;
    state.lifecycle.wakeup().capacity_changed();
    tracing::info!(worker_id, by = admin, "worker undrained");
    Ok(Json(worker))
}

/// Deregisters a worker (admin, or the worker itself). Refused while it holds active
/// assignments: drain it and let its tasks finish first.
#[utoipa::path(delete, path = "/v1/workers/{worker_id}", tag = "workers",
    security(("bearer" = [])),
    params(("worker_id" = String, Path, description = "Worker id")),
    responses(
        (status = 204, description = "Deregistered"),
        (status = 401, description = "No valid token", body = ErrorBody),
        (status = 403, description = "Neither an admin nor the worker itself", body = ErrorBody),
        (status = 404, description = "No such worker", body = ErrorBody),
        (status = 409, description = "It still runs tasks (`worker_busy`)", body = ErrorBody),
    ))]
pub async fn delete_worker(
    State(state): State<AppState>,
    principal: Principal,
    IdPath(worker_id): IdPath,
) -> ApiResult<StatusCode> {
    if !principal.is_admin() {
        require_self(&principal, &worker_id)?;
    }
    match state.lifecycle.remove_worker(&worker_id).await {
        Ok(()) => {
            tracing::info!(worker_id, "worker deregistered");
            Ok(StatusCode::NO_CONTENT)
        }
        Err(StoreError::Conflict { .. }) => Err(ApiError::conflict(
            "worker_busy",
            format!("worker {worker_id} still holds active assignments; drain it and wait"),
        )),
        Err(other) => Err(other.into()),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn a_worker_address_is_any_text_people_can_read() {
        for ok in [
            "127.0.0.1:7070",
            "[::1]:80",
            "node-1.cluster.local:65535",
            "",
            "rack 4, slot 2",
        ] {
            assert!(check_worker_ip(ok).is_ok(), "{ok}");
        }
        let long = "a".repeat(MAX_WORKER_IP_LEN + 1);
        for bad in ["a\nb", "tab\there", "\u{85}", long.as_str()] {
            assert!(check_worker_ip(bad).is_err(), "{bad:?}");
        }
    }
}
