//! Cluster-wide read-outs for operators: `GET /v1/overview` (JSON for dashboards, any user)
//! and `GET /metrics` (Prometheus text, admin). Both are served from one store sample kept
//! for 250 ms ([`SampleCache`]), so neither lists tasks: the store counts them.

use std::collections::BTreeMap;

use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Extension, Json, Router};
use chrono::{DateTime, Utc};
use serde::Serialize;
use utoipa::ToSchema;

use super::AppState;
use super::auth::Principal;
use super::error::{ApiError, ApiResult, ErrorBody};
use super::extract::truncate_for_message;
use crate::metrics::{self, ClusterSample, SampleCache};
use crate::model::Resources;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/v1/overview", get(overview))
        .route("/metrics", get(prometheus_metrics))
        .layer(Extension(SampleCache::default()))
}

/// Tasks by state.
#[derive(Debug, Serialize, serde::Deserialize, ToSchema)]
pub struct TasksByState {
    pub pending: u64,
    pub queued: u64,
    pub running: u64,
    pub completed: u64,
    pub failed: u64,
    pub cancelled: u64,
}

impl From<crate::store::TaskCounts> for TasksByState {
    fn from(c: crate::store::TaskCounts) -> Self {
        TasksByState {
            pending: c.pending,
            queued: c.queued,
            running: c.running,
            completed: c.completed,
            failed: c.failed,
            cancelled: c.cancelled,
        }
    }
}

/// Registered workers by state; `active + draining + lost = total`.
#[derive(Debug, Serialize, ToSchema)]
pub struct WorkersByState {
    pub total: u64,
    /// Taking new tasks.
    pub active: u64,
    /// Keeping their running tasks, taking no new ones.
    pub draining: u64,
    /// Marked inactive for want of a heartbeat.
    pub lost: u64,
}

/// An active policy version.
#[derive(Debug, Serialize, ToSchema)]
pub struct ActivePolicyRef {
    pub name: String,
    pub version: String,
}

/// The active version of each kind; `null` while the built-in default decides.
#[derive(Debug, Serialize, ToSchema)]
pub struct ActivePolicies {
    pub placement: Option<ActivePolicyRef>,
    pub admission: Option<ActivePolicyRef>,
}

/// The cluster at a glance. Counts are at most 250 ms old (one store sample shared with
/// `/metrics`).
#[derive(Debug, Serialize, ToSchema)]
pub struct Overview {
    pub tasks_by_state: TasksByState,
    /// Tasks waiting to run: pending + queued.
    pub queue_depth: u64,
    pub workers: WorkersByState,
    /// Sum of `total_*` over the active workers (cores, GB, GB, devices).
    pub capacity: Resources,
    /// Sum of `allocated_*` over the active workers.
    pub allocated: Resources,
    /// Assignments made in the last 60 s, by any replica.
    pub placements_last_minute: u64,
    pub active_policies: ActivePolicies,
    /// When the store was read.
    pub generated_at: DateTime<Utc>,
}

impl From<&ClusterSample> for Overview {
    fn from(s: &ClusterSample) -> Self {
        let policy = |p: &Option<(String, String)>| {
            p.as_ref().map(|(name, version)| ActivePolicyRef {
                name: name.clone(),
                version: version.clone(),
            })
        };
        Overview {
            tasks_by_state: TasksByState::from(s.tasks),
            queue_depth: s.tasks.queue_depth(),
            workers: WorkersByState {
                total: s.workers.total,
                active: s.workers.active,
                draining: s.workers.draining,
                lost: s.workers.lost,
            },
            capacity: s.capacity,
            allocated: s.allocated,
            placements_last_minute: s.placements_last_minute,
            active_policies: ActivePolicies {
                placement: policy(&s.placement_policy),
                admission: policy(&s.admission_policy),
            },
            generated_at: s.generated_at,
        }
    }
}

/// Neither route takes a query parameter: any is refused, as elsewhere.
fn no_query(query: Result<Query<BTreeMap<String, String>>, QueryRejection>) -> ApiResult<()> {
    let Query(params) = query.map_err(|e| ApiError::bad_request("invalid_query", e.body_text()))?;
    match params.keys().next() {
        Some(unknown) => Err(ApiError::bad_request(
            "invalid_query",
            format!(
                "unknown query parameter '{}' (this route takes none)",
                truncate_for_message(unknown)
            ),
        )),
        None => Ok(()),
    }
}

/// The cluster at a glance: tasks by state, workers by state, capacity and allocation of
/// the active workers, recent placements, active policies (any user).
#[utoipa::path(get, path = "/v1/overview", tag = "overview",
    security(("bearer" = [])),
    responses(
        (status = 200, description = "The cluster at a glance, at most 250 ms old", body = Overview),
        (status = 400, description = "A query parameter was given (`invalid_query`)", body = ErrorBody),
        (status = 401, description = "No valid token", body = ErrorBody),
        (status = 403, description = "A worker or join token", body = ErrorBody),
    ))]
pub async fn overview(
    State(state): State<AppState>,
    Extension(cache): Extension<SampleCache>,
    principal: Principal,
    query: Result<Query<BTreeMap<String, String>>, QueryRejection>,
) -> ApiResult<Json<Overview>> {
    principal.require_user()?;
    no_query(query)?;
    let sample = cache.get(&*state.store).await?;
    Ok(Json(Overview::from(&*sample)))
}

/// Prometheus metrics in the text exposition format 0.0.4 (admin); see docs/monitoring.md
/// for the list.
#[utoipa::path(get, path = "/metrics", tag = "overview",
    security(("bearer" = [])),
    responses(
        (status = 200, description = "The metrics of this replica and the cluster gauges", content_type = "text/plain; version=0.0.4"),
        (status = 400, description = "A query parameter was given (`invalid_query`)", body = ErrorBody),
        (status = 401, description = "No valid token", body = ErrorBody),
        (status = 403, description = "Not an admin", body = ErrorBody),
    ))]
pub async fn prometheus_metrics(
    State(state): State<AppState>,
    Extension(cache): Extension<SampleCache>,
    principal: Principal,
    query: Result<Query<BTreeMap<String, String>>, QueryRejection>,
) -> ApiResult<impl IntoResponse> {
    principal.require_admin()?;
    no_query(query)?;
    let sample = cache.get(&*state.store).await?;
    let body = metrics::encode(&sample).map_err(|e| {
        tracing::error!(error = %e, "encoding the metrics failed");
        ApiError::internal()
    })?;
    Ok(([(header::CONTENT_TYPE, metrics::CONTENT_TYPE)], body))
}
