//! The OpenAPI 3 document, generated from the handlers' `#[utoipa::path]` annotations and
//! the body types' `ToSchema`, and served without auth at `/v1/openapi.json`.

use axum::routing::get;
use axum::{Json, Router};
use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityScheme};
use utoipa::{Modify, OpenApi};

use super::AppState;
use super::{agent, events, health, overview, policies, task_io, tasks, workers};

#[derive(OpenApi)]
#[openapi(
    info(
        title = "CloudAI",
        description = "Task scheduler API. Errors are `{\"error\":{\"code\",\"message\"}}`. \
            Execution is at-least-once: a task whose worker is lost is run again elsewhere, up \
            to `max_attempts`, and the lost worker's copy may have run too; `max_attempts: 1` \
            never re-runs."
    ),
    paths(
        health::healthz,
        health::readyz,
        openapi_json,
        tasks::submit_task,
        tasks::list_tasks,
        tasks::get_task,
        tasks::cancel_task,
        tasks::get_result,
        tasks::list_task_assignments,
        task_io::get_logs,
        task_io::list_outputs,
        task_io::get_output,
        workers::register_worker,
        workers::list_workers,
        workers::get_worker,
        workers::heartbeat,
        workers::drain_worker,
        workers::undrain_worker,
        workers::delete_worker,
        agent::get_work,
        agent::report_started,
        agent::report_result,
        agent::report_batch,
        agent::report_logs,
        agent::upload_output,
        policies::upload_policy,
        policies::list_policies,
        policies::get_policy,
        policies::activate_policy,
        policies::rollback_policy,
        policies::delete_policy_version,
        policies::dry_run_policy,
        policies::cluster_snapshot,
        events::stream_events,
        overview::overview,
        overview::prometheus_metrics,
    ),
    components(schemas(
        super::error::ErrorBody,
        super::error::ErrorDetail,
        crate::model::Task,
        crate::model::TaskStatus,
        crate::model::TaskResult,
        crate::model::ResultStatus,
        crate::model::Worker,
        crate::model::WorkerUsage,
        tasks::TaskSpec,
        tasks::TaskList,
        tasks::TaskLogs,
        tasks::AssignmentList,
        crate::model::Assignment,
        workers::RegisterWorker,
        workers::Heartbeat,
        workers::HeartbeatUsage,
        workers::Registered,
        workers::HeartbeatAck,
        workers::WorkerList,
        agent::Work,
        agent::WorkList,
        agent::Outcome,
        agent::ResultReport,
        agent::ReportAck,
        agent::WorkReport,
        agent::ReportBatch,
        agent::WorkReportAck,
        agent::ReportError,
        agent::ReportBatchAck,
        agent::StreamName,
        agent::LiveChunk,
        agent::LiveLogs,
        agent::LiveLogsAck,
        agent::OutputEntry,
        task_io::TaskWithResult,
        task_io::LogEvent,
        task_io::EndEvent,
        task_io::OutputList,
        health::Health,
        health::Ready,
        crate::model::PolicyKind,
        crate::model::PolicyVersion,
        crate::model::ActivePolicy,
        crate::policy::snapshot::ClusterSnapshot,
        crate::policy::snapshot::Usage,
        policies::UploadedPolicy,
        policies::UploadStage,
        policies::UploadProgress,
        policies::PolicyStatus,
        policies::ActiveRecords,
        policies::PolicyList,
        policies::PolicyRef,
        policies::ActivateRequest,
        policies::RollbackRequest,
        policies::DryRunRequest,
        policies::DecisionView,
        policies::DryRunTask,
        policies::DryRunReport,
        crate::model::Resources,
        overview::Overview,
        overview::TasksByState,
        overview::WorkersByState,
        overview::ActivePolicies,
        overview::ActivePolicyRef,
    )),
    modifiers(&BearerAuth),
    tags(
        (name = "tasks", description = "Submit, read, list and cancel tasks"),
        (name = "workers", description = "Worker registration, heartbeats and administration"),
        (name = "agents", description = "What worker agents call with their own token: fetch work, report starts and results"),
        (name = "health", description = "Probes"),
        (name = "policies", description = "Policy components: upload, activate, roll back, dry-run (admin)"),
        (name = "overview", description = "The cluster at a glance (JSON) and Prometheus metrics"),
    )
)]
pub struct ApiDoc;

/// Declares the `bearer` scheme the paths refer to.
struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(Http::new(HttpAuthScheme::Bearer)),
        );
    }
}

pub fn router() -> Router<AppState> {
    Router::new().route("/v1/openapi.json", get(openapi_json))
}

/// This document.
#[utoipa::path(get, path = "/v1/openapi.json", tag = "health",
    responses((status = 200, description = "The OpenAPI 3 document", content_type = "application/json")))]
pub async fn openapi_json() -> Json<utoipa::openapi::OpenApi> {
    Json(ApiDoc::openapi())
}
