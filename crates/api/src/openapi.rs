//! The OpenAPI 3 document, generated from the handlers' `#[utoipa::path]` annotations and
//! the body types' `ToSchema`, and served without auth at `/v1/openapi.json`.

use axum::routing::get;
use axum::{Json, Router};
use serde_json::json;
use utoipa::openapi::path::{Operation, ParameterIn};
use utoipa::openapi::schema::{ObjectBuilder, Type};
use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityScheme};
use utoipa::openapi::{ContentBuilder, Ref, RefOr, ResponseBuilder, Schema};
use utoipa::{Modify, OpenApi};

use super::AppState;
use super::{agent, arrays, events, health, overview, policies, task_io, tasks, workers};

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
        arrays::submit_array,
        arrays::get_array,
        arrays::cancel_array,
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
        crate::model::Dependency,
        crate::model::DependencyCondition,
        crate::model::TaskResult,
        crate::model::ResultStatus,
        crate::model::Worker,
        crate::model::WorkerUsage,
        tasks::TaskSpec,
        tasks::TaskList,
        task_io::TaskLogs,
        tasks::AssignmentList,
        arrays::ArraySpec,
        arrays::TaskArray,
        arrays::ArrayCancelled,
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
        events::EventFrame,
        events::ResetFrame,
        task_io::OutputList,
        health::Health,
        health::Ready,
        crate::model::PolicyKind,
        crate::model::PolicyVersion,
        crate::model::ActivePolicy,
        crate::policy::snapshot::ClusterSnapshot,
        crate::model::Usage,
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
    modifiers(&BearerAuth, &Contract),
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

/// What every operation shares, stated once rather than on each handler: the rules of the
/// path parameters (the same as the extractors' checks) and the error answers the extractors,
/// the authentication layer and the store can give any operation that has those parts.
struct Contract;

/// Ids of tasks, workers and assignments ([`super::extract::validate_id`]).
pub(crate) const ID_PATTERN: &str = "^[A-Za-z0-9._-]{1,128}$";
/// Policy names ([`super::policies::check_name`]).
pub(crate) const POLICY_NAME_PATTERN: &str = "^[a-z0-9][a-z0-9._-]{0,62}$";
/// Policy versions ([`super::policies::check_version`]).
pub(crate) const POLICY_VERSION_PATTERN: &str = "^[A-Za-z0-9][A-Za-z0-9._+-]{0,63}$";

/// An output file's path ([`super::agent::validate_output_path`]): `/`-separated segments of
/// any characters but `/`, `\\` and controls (Unicode Cc), none of them `.` or `..`.
pub(crate) fn output_path_pattern() -> String {
    let any = r"[^/\\\u0000-\u001F\u007F-\u009F]";
    let not_dot = r"[^/\\.\u0000-\u001F\u007F-\u009F]";
    let segment = format!(r"(?:{not_dot}{any}*|\.{not_dot}{any}*|\.\.{any}+)");
    format!("^{segment}(?:/{segment})*$")
}

fn string_schema(pattern: String, max_length: usize, description: &str) -> RefOr<Schema> {
    ObjectBuilder::new()
        .schema_type(Type::String)
        .min_length(Some(1))
        .max_length(Some(max_length))
        .pattern(Some(pattern))
        .description(Some(description))
        .into()
}

fn path_parameter_schema(name: &str) -> Option<RefOr<Schema>> {
    let id = |what: &str| {
        string_schema(
            ID_PATTERN.into(),
            super::extract::MAX_ID_LEN,
            &format!("{what}: 1..=128 characters of A-Z a-z 0-9 . _ -"),
        )
    };
    Some(match name {
        "task_id" => id("Task id"),
        "array_id" => id("Array id"),
        "worker_id" => id("Worker id"),
        "ass_id" => id("Assignment id"),
        "name" => string_schema(POLICY_NAME_PATTERN.into(), 63, "Policy name"),
        "version" => string_schema(POLICY_VERSION_PATTERN.into(), 64, "Policy version"),
        "path" => string_schema(
            output_path_pattern(),
            super::agent::MAX_OUTPUT_PATH,
            "The file's path under /output, e.g. d/f.txt: `/`-separated, no empty, `.` or `..` \
             segment, no control character or backslash",
        ),
        _ => return None,
    })
}

/// Raw bodies and downloads are bytes (`format: binary`), which client generators turn into
/// a byte stream; a component upload may also come as `application/octet-stream` or as the
/// `component` part of multipart/form-data, as the handler takes it.
fn binary_bodies(operation: &mut Operation) {
    let binary = || -> RefOr<Schema> {
        ObjectBuilder::new()
            .schema_type(Type::String)
            .format(Some(utoipa::openapi::SchemaFormat::KnownFormat(
                utoipa::openapi::KnownFormat::Binary,
            )))
            .into()
    };
    if let Some(body) = operation.request_body.as_mut() {
        if body.content.contains_key("application/wasm") {
            body.content.insert(
                "application/octet-stream".to_string(),
                ContentBuilder::new().schema(Some(binary())).build(),
            );
            let form = ObjectBuilder::new()
                .schema_type(Type::Object)
                .property("component", binary())
                .required("component");
            body.content.insert(
                "multipart/form-data".to_string(),
                ContentBuilder::new().schema(Some(form)).build(),
            );
        }
        for (media, content) in body.content.iter_mut() {
            if media == "application/wasm" || media == "application/octet-stream" {
                content.schema = Some(binary());
            }
        }
    }
    for response in operation.responses.responses.values_mut() {
        if let RefOr::T(response) = response
            && let Some(content) = response.content.get_mut("application/octet-stream")
        {
            content.schema = Some(binary());
        }
    }
}

/// The error answers an operation can give by its shape, added where its own annotation does
/// not already describe them.
fn shared_errors(operation: &Operation) -> Vec<(&'static str, &'static str)> {
    let parameters = operation.parameters.as_deref().unwrap_or_default();
    let has_path = parameters
        .iter()
        .any(|p| p.parameter_in == ParameterIn::Path);
    let has_query = parameters
        .iter()
        .any(|p| p.parameter_in == ParameterIn::Query);
    let json_body = operation.request_body.as_ref().is_some_and(|body| {
        body.content
            .keys()
            .any(|media| media.starts_with("application/json"))
    });
    let other_body = operation.request_body.is_some() && !json_body;
    let secured = operation
        .security
        .as_ref()
        .is_some_and(|requirements| !requirements.is_empty());
    let mut errors = Vec::new();
    if has_path || has_query || operation.request_body.is_some() {
        errors.push((
            "400",
            "A malformed request: an invalid id or path (`invalid_id`, `invalid_path`), query \
             (`invalid_query`, `invalid_limit`) or JSON syntax (`invalid_json`), or an unreadable body",
        ));
    }
    if secured {
        errors.push(("401", "No valid token (`unauthorized`)"));
        errors.push((
            "403",
            "The token's role or owner may not do this (`forbidden`)",
        ));
    }
    if operation.request_body.is_some() {
        errors.push((
            "413",
            "The body is larger than the host accepts (`payload_too_large`)",
        ));
        errors.push((
            "415",
            if other_body {
                "The body's Content-Type is not the one stated (`unsupported_media_type`)"
            } else {
                "The body is not `Content-Type: application/json` (`unsupported_media_type`)"
            },
        ));
    }
    if json_body || has_query {
        errors.push((
            "422",
            "The request is well-formed but breaks a rule: a field of the wrong type, unknown \
             or out of range (`invalid_field`, `unknown_field`, `validation_failed`)",
        ));
    }
    errors.push((
        "500",
        "The host failed (`internal`; the details are in its log); the request changed nothing",
    ));
    errors
}

impl Modify for Contract {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        for item in openapi.paths.paths.values_mut() {
            let operations = [
                &mut item.get,
                &mut item.put,
                &mut item.post,
                &mut item.delete,
                &mut item.patch,
            ];
            for operation in operations.into_iter().flatten() {
                for parameter in operation.parameters.iter_mut().flatten() {
                    // An output upload names its file in the query, with the rules of a path.
                    let named = parameter.parameter_in == ParameterIn::Path
                        || (parameter.parameter_in == ParameterIn::Query
                            && parameter.name == "path");
                    if named && let Some(schema) = path_parameter_schema(&parameter.name) {
                        parameter.schema = Some(schema);
                    }
                }
                binary_bodies(operation);
                for (status, description) in shared_errors(operation) {
                    operation
                        .responses
                        .responses
                        .entry(status.to_string())
                        .or_insert_with(|| {
                            ResponseBuilder::new()
                                .description(description)
                                .content(
                                    "application/json",
                                    ContentBuilder::new()
                                        .schema(Some(Ref::from_schema_name("ErrorBody")))
                                        .build(),
                                )
                                .into()
                        });
                }
            }
        }
    }
}

pub fn router() -> Router<AppState> {
    Router::new().route("/v1/openapi.json", get(openapi_json))
}

/// This document, with this host's limits on a task's request.
#[utoipa::path(get, path = "/v1/openapi.json", tag = "health",
    responses((status = 200, description = "The OpenAPI 3 document", content_type = "application/json")))]
pub async fn openapi_json(
    axum::extract::State(state): axum::extract::State<AppState>,
) -> Json<serde_json::Value> {
    Json(document(&state.limits, state.policies.limit_caps()))
}

/// The document as a host with these limits serves it.
pub fn document(
    limits: &super::Limits,
    (max_memory_mb, max_deadline_ms): (u64, u64),
) -> serde_json::Value {
    let mut openapi = ApiDoc::openapi();
    let task_spec = openapi
        .components
        .as_mut()
        .and_then(|components| components.schemas.get_mut("TaskSpec"));
    if let Some(RefOr::T(Schema::Object(spec))) = task_spec {
        for (field, cap) in [
            ("req_cpu", limits.max_task_cpu),
            ("req_memory", limits.max_task_memory),
            ("req_storage", limits.max_task_storage),
            ("req_gpu", limits.max_task_gpu),
        ] {
            if let Some(RefOr::T(Schema::Object(amount))) = spec.properties.get_mut(field) {
                amount.maximum = Some(utoipa::Number::Float(cap));
            }
        }
    }
    let mut document = match serde_json::to_value(&openapi) {
        Ok(document) => document,
        // Not reachable: the document is maps with string keys; said loudly if it ever is.
        Err(error) => {
            tracing::error!(%error, "serializing the OpenAPI document");
            return json!({"error": {"code": "internal", "message": "the OpenAPI document could not be built"}});
        }
    };
    patch_document(&mut document);
    // An array's task spec is a task spec whose env leaves room for (and may not set) the
    // three variables the host adds; its count is capped by the host's --max-array-tasks.
    let schemas = &mut document["components"]["schemas"];
    let mut array_task = schemas["TaskSpec"].clone();
    array_task["properties"]["env"]["maxProperties"] = json!(super::tasks::MAX_ENV_ENTRIES - 3);
    array_task["properties"]["env"]["propertyNames"]["not"] = json!({"enum": [
        crate::model::ARRAY_ID_ENV,
        crate::model::ARRAY_INDEX_ENV,
        crate::model::ARRAY_COUNT_ENV,
    ]});
    array_task["description"] = json!(
        "What every task of the array runs (a TaskSpec whose env may not set CLOUDAI_ARRAY_ID, \
         CLOUDAI_ARRAY_INDEX or CLOUDAI_ARRAY_COUNT, and has at most 253 entries)"
    );
    schemas["ArraySpec"]["properties"]["task"] = array_task;
    schemas["ArraySpec"]["properties"]["count"]["maximum"] = json!(limits.max_array_tasks);
    for parameter in document["paths"]["/v1/policies"]["post"]["parameters"]
        .as_array_mut()
        .into_iter()
        .flatten()
    {
        let cap = match parameter["name"].as_str() {
            Some("memory_mb") => max_memory_mb,
            Some("deadline_ms") => max_deadline_ms,
            _ => continue,
        };
        parameter["schema"]["minimum"] = json!(1);
        parameter["schema"]["maximum"] = json!(cap);
    }
    document
}

/// The operations a creation's answer feeds (OpenAPI links), from the `POST` on `path`.
struct Links {
    path: &'static str,
    statuses: &'static [&'static str],
    /// Path parameter and where in the answer it is.
    parameters: &'static [(&'static str, &'static str)],
    /// `operationId`s.
    operations: &'static [&'static str],
}

/// What the typed document cannot say: the shape of each Server-Sent Event, a pattern built
/// from the parser's grammar, and parameters that are absent rather than `null` on the wire.
fn patch_document(document: &mut serde_json::Value) {
    // A dependency names exactly one task or array, by an id of the usual shape.
    let dependency = &mut document["components"]["schemas"]["Dependency"];
    for field in ["task_id", "array_id"] {
        dependency["properties"][field]["pattern"] = json!(ID_PATTERN);
        dependency["properties"][field]["minLength"] = json!(1);
        dependency["properties"][field]["maxLength"] = json!(super::extract::MAX_ID_LEN);
    }
    dependency["oneOf"] = json!([{"required": ["task_id"]}, {"required": ["array_id"]}]);
    document["components"]["schemas"]["TaskSpec"]["properties"]["docker_image"]["pattern"] =
        json!(super::image_ref::REFERENCE_PATTERN);
    // A query or header parameter is text or absent: `Option` does not make it nullable.
    if let Some(paths) = document["paths"].as_object_mut() {
        for item in paths.values_mut() {
            // (`get_mut`: indexing a missing key would insert a `null`.)
            let parameters = item
                .as_object_mut()
                .into_iter()
                .flat_map(|o| o.values_mut())
                .filter_map(|operation| operation.get_mut("parameters"))
                .filter_map(serde_json::Value::as_array_mut)
                .flatten();
            for parameter in parameters {
                if let Some(schema) = parameter.get_mut("schema")
                    && let Some(types) = schema.get("type").and_then(|t| t.as_array())
                {
                    let types: Vec<_> = types.iter().filter(|t| *t != "null").cloned().collect();
                    schema["type"] = match types.as_slice() {
                        [one] => one.clone(),
                        _ => json!(types),
                    };
                }
            }
        }
    }
    // A report says something: that the container started, or how the attempt ended.
    let report = document["components"]["schemas"]["WorkReport"].take();
    document["components"]["schemas"]["WorkReport"] = json!({
        "allOf": [report, {"anyOf": [
            {"required": ["started"], "properties": {"started": {"const": true}}},
            {"required": ["result"], "properties": {"result": {"type": "object"}}},
        ]}],
    });
    // A component's configuration is JSON text: a client sends any JSON value.
    for parameter in document["paths"]["/v1/policies"]["post"]["parameters"]
        .as_array_mut()
        .into_iter()
        .flatten()
    {
        if parameter["name"] == "config"
            && let Some(fields) = parameter.as_object_mut()
        {
            fields.remove("schema");
            fields.insert(
                "content".into(),
                json!({"application/json": {"schema": {}}}),
            );
        }
    }
    // Links: what a creation answers feeds the operations on what it created (clients and
    // stateful testers follow them).
    let links = [
        Links {
            path: "/v1/tasks",
            statuses: &["201", "202"],
            parameters: &[("task_id", "$response.body#/task_id")],
            // Not the result: it exists only once the task has ended.
            operations: &[
                "get_task",
                "cancel_task",
                "list_task_assignments",
                "get_logs",
                "list_outputs",
            ],
        },
        Links {
            path: "/v1/arrays",
            statuses: &["201", "202", "200"],
            parameters: &[("array_id", "$response.body#/array_id")],
            operations: &["get_array", "cancel_array"],
        },
        Links {
            path: "/v1/workers",
            statuses: &["201"],
            parameters: &[("worker_id", "$response.body#/worker/worker_id")],
            operations: &[
                "get_worker",
                "drain_worker",
                "undrain_worker",
                "delete_worker",
            ],
        },
        Links {
            path: "/v1/policies",
            statuses: &["201"],
            parameters: &[
                ("name", "$response.body#/policy/name"),
                ("version", "$response.body#/policy/version"),
            ],
            operations: &["get_policy", "delete_policy_version"],
        },
    ];
    for link in links {
        for status in link.statuses {
            let Some(response) = document["paths"][link.path]["post"]["responses"].get_mut(*status)
            else {
                continue;
            };
            let mut map = serde_json::Map::new();
            for operation in link.operations {
                let wanted: serde_json::Map<_, _> = link
                    .parameters
                    .iter()
                    .filter(|(name, _)| *name != "version" || *operation == "delete_policy_version")
                    .map(|(name, from)| (name.to_string(), json!(from)))
                    .collect();
                map.insert(
                    operation.to_string(),
                    json!({"operationId": operation, "parameters": wanted}),
                );
            }
            response["links"] = serde_json::Value::Object(map);
        }
    }
    let schema = |name: &str| json!({"$ref": format!("#/components/schemas/{name}")});
    let streams = [
        (
            "/v1/events",
            "get",
            json!({"type": "string", "pattern": "^(?:reset|(?:task|worker|policy|reconciler)\\.[a-z_]+)$"}),
            vec![schema("EventFrame"), schema("ResetFrame")],
        ),
        (
            "/v1/tasks/{task_id}/logs",
            "get",
            json!({"type": "string", "enum": ["log", "end", "error"]}),
            vec![schema("LogEvent"), schema("EndEvent"), schema("ErrorBody")],
        ),
        (
            "/v1/policies",
            "post",
            json!({"type": "string", "enum": ["progress", "stored", "failed"]}),
            vec![
                schema("UploadProgress"),
                schema("UploadedPolicy"),
                schema("ErrorBody"),
            ],
        ),
    ];
    for (path, method, event, data) in streams {
        let frame = json!({
            "type": "object",
            "description": "One Server-Sent Event: its name, its id where the stream is resumable, and its data (JSON text)",
            "required": ["event", "data"],
            "properties": {
                "event": event,
                "id": {"type": "string", "pattern": "^[0-9]+$"},
                "retry": {"type": "integer", "minimum": 0},
                "data": {
                    "type": "string",
                    "contentMediaType": "application/json",
                    "contentSchema": {"anyOf": data},
                },
            },
        });
        document["paths"][path][method]["responses"]["200"]["content"]["text/event-stream"] =
            json!({"schema": frame});
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use regex_automata::dfa::regex::Regex;

    /// Strings over `alphabet` up to `max_len` long, from a fixed seed.
    fn samples(alphabet: &str, max_len: usize, count: usize) -> Vec<String> {
        let alphabet: Vec<char> = alphabet.chars().collect();
        let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        (0..count)
            .map(|_| {
                let len = (next() % (max_len as u64 + 1)) as usize;
                (0..len)
                    .map(|_| alphabet[(next() % alphabet.len() as u64) as usize])
                    .collect()
            })
            .collect()
    }

    /// Asserts the pattern matches exactly what `accepts` accepts, over `samples`.
    fn agree(pattern: &str, samples: &[String], accepts: impl Fn(&str) -> bool) {
        let regex = Regex::new(pattern).unwrap();
        let mut accepted = 0;
        for sample in samples {
            let ok = accepts(sample);
            accepted += usize::from(ok);
            assert_eq!(regex.is_match(sample), ok, "{sample:?} against {pattern}");
        }
        assert!(
            accepted > 0 && accepted < samples.len(),
            "{pattern}: one-sided samples"
        );
    }

    #[test]
    fn the_documented_patterns_are_the_validation() {
        let ids = samples("aZ9._-/ é", 6, 20_000);
        agree(ID_PATTERN, &ids, |s| {
            super::super::extract::validate_id(s).is_ok()
        });
        let names = samples("aZ9._-+", 5, 20_000);
        agree(POLICY_NAME_PATTERN, &names, |s| {
            super::super::policies::check_name(s).is_ok()
        });
        agree(POLICY_VERSION_PATTERN, &names, |s| {
            super::super::policies::check_version(s).is_ok()
        });
        let paths = samples("a./\\\u{1}\u{85}é", 7, 50_000);
        agree(&output_path_pattern(), &paths, |s| {
            super::super::agent::validate_output_path(s).is_ok()
        });
        let mut waits = samples("0123.ms", 7, 50_000);
        waits.extend(
            [
                "300", "300.0", "300.001", "299.999s", "300000ms", "300001ms",
            ]
            .map(String::from),
        );
        agree(super::super::task_io::WAIT_PATTERN, &waits, |s| {
            super::super::task_io::parse_wait(s).is_ok()
        });
        let cursors = samples("019.-a ", 8, 50_000);
        let cursor = "^-?[0-9]{1,15}\\.[A-Za-z0-9._-]{1,128}$";
        agree(cursor, &cursors, |s| {
            super::super::tasks::decode_cursor(s).is_ok()
        });
    }

    /// The constants the attributes repeat (a `#[utoipa::path]` takes literals only).
    #[test]
    fn the_documented_literals_are_the_code_constants() {
        let document = document(&crate::Limits::default(), (64, 1000));
        let text = document.to_string();
        for (what, pattern) in [
            ("the id pattern", ID_PATTERN),
            ("the policy name pattern", POLICY_NAME_PATTERN),
            ("the policy version pattern", POLICY_VERSION_PATTERN),
            ("the wait pattern", super::super::task_io::WAIT_PATTERN),
        ] {
            let quoted = serde_json::to_string(pattern).unwrap();
            assert!(text.contains(&quoted), "the document lost {what}");
        }
        let spec = &document["components"]["schemas"]["TaskSpec"]["properties"];
        assert_eq!(spec["req_cpu"]["maximum"].as_f64(), Some(256.0));
        let array = &document["components"]["schemas"]["ArraySpec"]["properties"];
        assert_eq!(array["count"]["maximum"], 100_000);
        assert_eq!(array["count"]["minimum"], 1);
        let task = &array["task"]["properties"];
        assert_eq!(task["req_cpu"]["maximum"].as_f64(), Some(256.0));
        assert_eq!(task["env"]["maxProperties"], 253);
        assert_eq!(
            task["env"]["propertyNames"]["not"]["enum"][1],
            "CLOUDAI_ARRAY_INDEX"
        );
        assert_eq!(
            spec["docker_image"]["pattern"],
            json!(super::super::image_ref::REFERENCE_PATTERN)
        );
    }

    /// Every operation documents the errors its shape can produce, each with the error body,
    /// and no query or header parameter is nullable.
    #[test]
    fn every_operation_states_its_shared_errors() {
        let document = document(&crate::Limits::default(), (64, 1000));
        let paths = document["paths"].as_object().unwrap();
        assert!(paths.len() > 20);
        for (path, item) in paths {
            for (method, operation) in item.as_object().unwrap() {
                let responses = &operation["responses"];
                assert!(responses["500"].is_object(), "{method} {path}: no 500");
                let secured = operation["security"]
                    .as_array()
                    .is_some_and(|s| !s.is_empty());
                if secured {
                    assert!(responses["401"].is_object(), "{method} {path}: no 401");
                }
                if operation["requestBody"].is_object() {
                    for status in ["413", "415"] {
                        assert!(
                            responses[status].is_object(),
                            "{method} {path}: no {status}"
                        );
                    }
                }
                for parameter in operation["parameters"].as_array().into_iter().flatten() {
                    assert!(
                        parameter["schema"]["type"] != json!(["string", "null"])
                            && parameter["schema"]["type"] != json!(["integer", "null"]),
                        "{method} {path}: {parameter}"
                    );
                    if parameter["in"] == "path" {
                        assert!(
                            parameter["schema"]["pattern"].is_string(),
                            "{method} {path}: path parameter without its rule: {parameter}"
                        );
                    }
                }
            }
        }
        let events = &document["paths"]["/v1/events"]["get"]["responses"]["200"]["content"]["text/event-stream"]
            ["schema"];
        assert_eq!(
            events["properties"]["data"]["contentMediaType"],
            "application/json"
        );
        let link = &document["paths"]["/v1/tasks"]["post"]["responses"]["201"]["links"]["get_task"];
        assert_eq!(
            link["parameters"]["task_id"], "$response.body#/task_id",
            "{link}"
        );
        let operations = || {
            paths
                .values()
                .flat_map(|item| item.as_object().unwrap().values())
        };
        let operation_ids: Vec<&str> = operations()
            .filter_map(|operation| operation["operationId"].as_str())
            .collect();
        let mut links = 0;
        for operation in operations() {
            for response in operation["responses"].as_object().unwrap().values() {
                for link in response["links"]
                    .as_object()
                    .into_iter()
                    .flat_map(|l| l.values())
                {
                    let target = link["operationId"].as_str().unwrap();
                    assert!(
                        operation_ids.contains(&target),
                        "a link to no operation: {target}"
                    );
                    links += 1;
                }
            }
        }
        assert!(links >= 12, "{links} links");
    }
}
