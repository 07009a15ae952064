//! The HTTP API: JSON under `/v1`, bearer-token auth, strict validation, OpenAPI.
//!
//! [`router`] merges one router per resource ([`tasks`], [`workers`], [`health`]) over one
//! [`AppState`]. Every error is `{"error":{"code","message"}}` ([`error::ApiError`]); every
//! body goes through a validating extractor ([`extract::ValidJson`]), so a rejected request
//! changes nothing. The OpenAPI document is generated from the handlers ([`openapi::ApiDoc`])
//! and served at `/v1/openapi.json`.
//!
//! Execution is at-least-once: a task whose worker is lost is run again elsewhere, up to its
//! `max_attempts`, and the lost worker's copy may have run too. `max_attempts: 1` never re-runs.
//!
//! It serves the control plane (`cloudai-control`) and holds no state of its own: the host
//! process (`cloudai serve`) builds the [`AppState`] and serves the [`router`].

// The module docs link the private modules they describe: valid for readers of the code
// (`cargo doc --document-private-items`), which is whom they are written for.
#![allow(rustdoc::private_intra_doc_links)]

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{DefaultBodyLimit, MatchedPath};
use axum::http::{HeaderName, Request, StatusCode};
use axum::response::Response;
use tower_http::request_id::{
    MakeRequestId, PropagateRequestIdLayer, RequestId, SetRequestIdLayer,
};
use tower_http::trace::TraceLayer;

// The crates below, under the module names the API's modules use for them.
use cloudai_control::{events as event_log, lifecycle, metrics, policy, reconciler, scheduler};
use cloudai_model as model;
use cloudai_model::protocol;
use cloudai_store as store;

use crate::policy::PolicyRuntime;
use crate::scheduler::WorkSignal;
use crate::store::Store;

pub mod agent;
#[cfg(test)]
mod agent_tests;
pub mod arrays;
pub mod auth;
#[cfg(test)]
mod control_tests;
pub mod error;
pub mod events;
pub mod extract;
pub mod health;
pub mod image_ref;
pub mod openapi;
pub mod overview;
pub mod policies;
pub mod task_io;
pub mod tasks;
pub mod ui;
pub mod workers;

#[cfg(test)]
mod tests;

use error::ApiError;

/// What every handler shares.
#[derive(Clone)]
pub struct AppState {
    /// For reads; every task and worker change goes through `lifecycle`.
    pub store: Arc<dyn Store>,
    /// The writer of task and worker changes, which publishes their events.
    pub lifecycle: crate::lifecycle::Lifecycle,
    pub auth: Arc<auth::Authenticator>,
    pub limits: Arc<Limits>,
    /// This replica's loaded policies (dry runs, uploads, activations).
    pub policies: Arc<PolicyRuntime>,
    /// Answers the worker agents' long polls after a change to their work.
    pub work: WorkSignal,
}

/// Caps on what a request may ask for. Everything over a cap is refused with 422
/// `validation_failed` (or 413 for the body size).
#[derive(Debug, Clone, PartialEq)]
pub struct Limits {
    /// Largest request body, in bytes (default 256 KiB).
    pub max_body_bytes: usize,
    /// Largest `req_cpu` of a task, in cores (default 256).
    pub max_task_cpu: f64,
    /// Largest `req_memory` of a task, in GB (default 4096).
    pub max_task_memory: f64,
    /// Largest `req_storage` of a task, in GB (default 65536).
    pub max_task_storage: f64,
    /// Largest `req_gpu` of a task, in devices (default 64).
    pub max_task_gpu: f64,
    /// Largest `total_cpu` a worker may declare, in cores (default 4096).
    pub max_worker_cpu: f64,
    /// Largest `total_memory` a worker may declare, in GB (default 65536).
    pub max_worker_memory: f64,
    /// Largest `total_storage` a worker may declare, in GB (default 1048576).
    pub max_worker_storage: f64,
    /// Largest `total_gpu` a worker may declare, in devices (default 1024).
    pub max_worker_gpu: f64,
    /// Page size of `GET /v1/tasks` when `limit` is not given (default 50).
    pub default_page_size: u32,
    /// Largest `limit` of `GET /v1/tasks` (default 500).
    pub max_page_size: u32,
    /// Most tasks of one array, `POST /v1/arrays` (default 100,000).
    pub max_array_tasks: u32,
    /// Largest policy component `POST /v1/policies` takes, in bytes (default 64 MiB); the
    /// other routes keep `max_body_bytes`.
    pub max_policy_bytes: usize,
    /// Most bytes of a task's standard output, and of its standard error, kept in its result
    /// (default 1 MiB each); the rest is cut with a marker.
    pub max_log_bytes: usize,
    /// Most bytes of output files (under `/output`) kept per task (default 64 MiB); the route
    /// that uploads them takes bodies this large, the others keep `max_body_bytes`.
    pub max_output_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_body_bytes: 256 * 1024,
            max_task_cpu: 256.0,
            max_task_memory: 4096.0,
            max_task_storage: 65536.0,
            max_task_gpu: 64.0,
            max_worker_cpu: 4096.0,
            max_worker_memory: 65536.0,
            max_worker_storage: 1_048_576.0,
            max_worker_gpu: 1024.0,
            default_page_size: 50,
            max_page_size: 500,
            max_array_tasks: 100_000,
            max_policy_bytes: 64 << 20,
            max_log_bytes: 1 << 20,
            max_output_bytes: 64 << 20,
        }
    }
}

const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// Request ids are UUID v7, so that they sort by time in logs.
#[derive(Clone, Copy)]
struct MakeRequestUuidV7;

impl MakeRequestId for MakeRequestUuidV7 {
    fn make_request_id<B>(&mut self, _request: &Request<B>) -> Option<RequestId> {
        let id = uuid::Uuid::now_v7().simple().to_string();
        axum::http::HeaderValue::from_str(&id)
            .ok()
            .map(RequestId::new)
    }
}

/// The whole API: `/healthz`, `/readyz`, `/v1/openapi.json` and `/v1/...`.
pub fn router(state: AppState) -> Router {
    let body_limit = state.limits.max_body_bytes;
    Router::new()
        .merge(health::router())
        .merge(openapi::router())
        .merge(tasks::router())
        .merge(arrays::router())
        .merge(workers::router())
        .merge(policies::router(state.limits.max_policy_bytes))
        .merge(agent::router(&state.limits))
        .merge(task_io::router())
        .merge(events::router())
        .merge(overview::router())
        .merge(ui::router())
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(body_limit))
        // Wraps each route (and the fallbacks), so the matched route is known.
        .layer(axum::middleware::from_fn(count_request))
        .layer(
            TraceLayer::new_for_http()
                .make_span_with(|request: &Request<_>| {
                    let request_id = request
                        .headers()
                        .get(&REQUEST_ID)
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or_default();
                    tracing::info_span!(
                        "http",
                        method = %request.method(),
                        path = %request.uri().path(),
                        request_id,
                    )
                })
                .on_failure(
                    // 5xx are logged by the handlers with their details; this is the summary.
                    |class, latency: Duration, _span: &tracing::Span| {
                        tracing::warn!(%class, ?latency, "request failed");
                    },
                ),
        )
        .layer(PropagateRequestIdLayer::new(REQUEST_ID))
        .layer(SetRequestIdLayer::new(REQUEST_ID, MakeRequestUuidV7))
        .with_state(state)
}

/// Counts a request in the metrics by its route template (bounded: never the raw path).
async fn count_request(request: axum::extract::Request, next: axum::middleware::Next) -> Response {
    let started = std::time::Instant::now();
    let method = request.method().clone();
    let route = request.extensions().get::<MatchedPath>().cloned();
    let response = next.run(request).await;
    crate::metrics::api_request(
        method.as_str(),
        route.as_ref().map(MatchedPath::as_str),
        response.status().as_u16(),
        started.elapsed(),
    );
    response
}

async fn not_found() -> ApiError {
    ApiError::not_found("route_not_found", "no such route")
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "this route does not accept this method",
    )
}
