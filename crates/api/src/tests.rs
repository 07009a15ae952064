//! Handler tests: the real router over a real SQLite store in a tempdir, driven with
//! `tower::ServiceExt::oneshot`. Every refused request is also checked to have changed nothing.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::http::{HeaderMap, Method, Request, StatusCode, header};
use http_body_util::BodyExt;
use serde_json::{Value, json};
use tower::ServiceExt;

use super::auth::{Authenticator, Role, TokenEntry, token_sha256_hex};
use super::{AppState, Limits, router};
use crate::model::{self, Assignment, ResultStatus, TaskResult, TaskStatus};
use crate::store::AssignmentStore;
use crate::store::TaskStore;
use crate::store::TaskUpdate;
use crate::store::WorkerStore;
use crate::store::sqlite::SqliteStore;

const ALICE: &str = "cai_u_alice_0123456789abcdef";
const BOB: &str = "cai_u_bob_0123456789abcdef";
const ADMIN: &str = "cai_u_ops_0123456789abcdef";
const JOIN: &str = "cai_j_join_0123456789abcdef";

struct TestApi {
    _dir: tempfile::TempDir,
    app: Router,
    store: Arc<SqliteStore>,
}

struct Reply {
    status: StatusCode,
    headers: HeaderMap,
    body: Value,
}

impl Reply {
    fn code(&self) -> &str {
        self.body["error"]["code"]
            .as_str()
            .unwrap_or("<no error code>")
    }

    fn message(&self) -> &str {
        self.body["error"]["message"].as_str().unwrap_or_default()
    }
}

impl TestApi {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(SqliteStore::open_in_dir(dir.path()).unwrap());
        let tokens = vec![
            entry("alice", Role::User, ALICE),
            entry("bob", Role::User, BOB),
            entry("ops", Role::Admin, ADMIN),
        ];
        let wakeup = crate::scheduler::Wakeup::new();
        let state = AppState {
            store: store.clone(),
            lifecycle: crate::lifecycle::Lifecycle::new(store.clone(), wakeup.clone()),
            auth: Arc::new(Authenticator::new(tokens, Some(token_sha256_hex(JOIN)))),
            limits: Arc::new(Limits::default()),
            policies: Arc::new(crate::policy::PolicyRuntime::new(
                crate::policy::PolicyEngine::new(crate::policy::EngineSettings::default()).unwrap(),
                crate::policy::RuntimeSettings::default(),
            )),
            work: crate::scheduler::WorkSignal::new(),
        };
        TestApi {
            _dir: dir,
            app: router(state),
            store,
        }
    }

    async fn send(&self, request: Request<Body>) -> Reply {
        let response = self.app.clone().oneshot(request).await.unwrap();
        let status = response.status();
        let headers = response.headers().clone();
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        let body = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes)
                .unwrap_or_else(|e| panic!("non-JSON body ({e}): {bytes:?}"))
        };
        Reply {
            status,
            headers,
            body,
        }
    }

    async fn call(
        &self,
        method: Method,
        uri: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> Reply {
        let mut builder = Request::builder().method(method).uri(uri);
        if let Some(token) = token {
            builder = builder.header(header::AUTHORIZATION, format!("Bearer {token}"));
        }
        let body = match body {
            Some(value) => {
                builder = builder.header(header::CONTENT_TYPE, "application/json");
                Body::from(serde_json::to_vec(&value).unwrap())
            }
            None => Body::empty(),
        };
        self.send(builder.body(body).unwrap()).await
    }

    async fn raw_post(
        &self,
        uri: &str,
        token: &str,
        content_type: Option<&str>,
        body: impl Into<Body>,
    ) -> Reply {
        let mut builder = Request::builder()
            .method(Method::POST)
            .uri(uri)
            .header(header::AUTHORIZATION, format!("Bearer {token}"));
        if let Some(ct) = content_type {
            builder = builder.header(header::CONTENT_TYPE, ct);
        }
        self.send(builder.body(body.into()).unwrap()).await
    }

    async fn submit(&self, token: &str, spec: Value) -> Reply {
        self.call(Method::POST, "/v1/tasks", Some(token), Some(spec))
            .await
    }

    async fn submit_ok(&self, token: &str, spec: Value) -> String {
        let reply = self.submit(token, spec).await;
        assert_eq!(reply.status, StatusCode::CREATED, "{}", reply.body);
        reply.body["task_id"].as_str().unwrap().to_string()
    }

    /// Every task in the store, seen by the admin.
    async fn all_task_ids(&self) -> Vec<String> {
        let reply = self
            .call(Method::GET, "/v1/tasks?limit=500", Some(ADMIN), None)
            .await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
        ids(&reply.body["tasks"])
    }

    async fn register(&self, token: &str, body: Value) -> Reply {
        self.call(Method::POST, "/v1/workers", Some(token), Some(body))
            .await
    }
}

fn entry(user_id: &str, role: Role, token: &str) -> TokenEntry {
    TokenEntry {
        user_id: user_id.into(),
        role,
        token_sha256: token_sha256_hex(token),
    }
}

fn ids(tasks: &Value) -> Vec<String> {
    tasks
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["task_id"].as_str().unwrap().to_string())
        .collect()
}

fn worker_body(id: &str) -> Value {
    json!({"worker_id": id, "worker_ip": "127.0.0.1:7070", "total_cpu": 8, "total_memory": 16,
           "total_storage": 100, "total_gpu": 1, "labels": {"zone": "a"}})
}

#[tokio::test]
async fn submit_get_list_and_cancel_a_task() {
    let api = TestApi::new();
    let reply = api
        .submit(
            ALICE,
            json!({"docker_image": "busybox:1.36", "command": "echo hi", "req_cpu": 0.1,
                   "labels": {"team": "ml"}, "env": {"FOO": "bar"}, "timeout_s": 60}),
        )
        .await;
    assert_eq!(reply.status, StatusCode::CREATED, "{}", reply.body);
    let task = &reply.body;
    let task_id = task["task_id"].as_str().unwrap();
    assert!(task_id.starts_with("task-"), "{task_id}");
    assert_eq!(
        reply.headers[header::LOCATION].to_str().unwrap(),
        format!("/v1/tasks/{task_id}")
    );
    assert_eq!(task["user_id"], "alice");
    assert_eq!(task["status"], "queued"); // Admitted inline: no admission policy is active.
    assert_eq!(task["req_cpu"], model::quantize(0.1));
    assert_eq!(
        (task["req_memory"].as_f64(), task["max_attempts"].as_u64()),
        (Some(1.0), Some(3))
    );
    assert!(reply.headers.contains_key("x-request-id"));

    let got = api
        .call(
            Method::GET,
            &format!("/v1/tasks/{task_id}"),
            Some(ALICE),
            None,
        )
        .await;
    assert_eq!(got.status, StatusCode::OK);
    assert_eq!(&got.body, task);

    let listed = api.call(Method::GET, "/v1/tasks", Some(ALICE), None).await;
    assert_eq!(ids(&listed.body["tasks"]), vec![task_id.to_string()]);
    assert_eq!(listed.body["next_cursor"], Value::Null);

    let cancelled = api
        .call(
            Method::POST,
            &format!("/v1/tasks/{task_id}/cancel"),
            Some(ALICE),
            None,
        )
        .await;
    assert_eq!(cancelled.status, StatusCode::OK, "{}", cancelled.body);
    assert_eq!(cancelled.body["status"], "cancelled");
    assert_eq!(cancelled.body["status_reason"], "cancelled by alice");
    assert!(cancelled.body["completed_at"].is_string());

    let again = api
        .call(
            Method::POST,
            &format!("/v1/tasks/{task_id}/cancel"),
            Some(ALICE),
            None,
        )
        .await;
    assert_eq!(
        (again.status, again.code()),
        (StatusCode::CONFLICT, "task_finished")
    );
}

#[tokio::test]
async fn the_body_never_says_who_the_user_is() {
    let api = TestApi::new();
    let reply = api
        .submit(ALICE, json!({"docker_image": "busybox", "user_id": "bob"}))
        .await;
    assert_eq!(
        (reply.status, reply.code()),
        (StatusCode::UNPROCESSABLE_ENTITY, "unknown_field")
    );
    assert!(reply.message().contains("user_id"), "{}", reply.message());
    assert!(api.all_task_ids().await.is_empty());
}

#[tokio::test]
async fn cancelling_a_running_task_asks_the_worker_and_a_finished_one_is_refused() {
    let api = TestApi::new();
    let task_id = api
        .submit_ok(ALICE, json!({"docker_image": "busybox"}))
        .await;
    api.store
        .transition_task(
            &task_id,
            &[TaskStatus::Queued],
            TaskStatus::Running,
            &TaskUpdate::default(),
        )
        .await
        .unwrap();
    let reply = api
        .call(
            Method::POST,
            &format!("/v1/tasks/{task_id}/cancel"),
            Some(ALICE),
            None,
        )
        .await;
    assert_eq!(reply.status, StatusCode::ACCEPTED, "{}", reply.body);
    assert_eq!(reply.body["status"], "running");
    assert_eq!(reply.body["cancel_requested"], true);

    api.store
        .transition_task(
            &task_id,
            &[TaskStatus::Running],
            TaskStatus::Failed,
            &TaskUpdate::default(),
        )
        .await
        .unwrap();
    let reply = api
        .call(
            Method::POST,
            &format!("/v1/tasks/{task_id}/cancel"),
            Some(ADMIN),
            None,
        )
        .await;
    assert_eq!(
        (reply.status, reply.code()),
        (StatusCode::CONFLICT, "task_finished")
    );
    assert!(reply.message().contains("failed"), "{}", reply.message());
}

#[tokio::test]
async fn listing_filters_and_pages_newest_first() {
    let api = TestApi::new();
    let mut alice = Vec::new();
    for _ in 0..5 {
        alice.push(
            api.submit_ok(ALICE, json!({"docker_image": "busybox"}))
                .await,
        );
        // Distinct created_at (ms) so that newest-first is observable, not only tie-broken.
        tokio::time::sleep(std::time::Duration::from_millis(3)).await;
    }
    let bob = api.submit_ok(BOB, json!({"docker_image": "busybox"})).await;

    // Alice pages through her own tasks, two at a time.
    let mut seen = Vec::new();
    let mut uri = "/v1/tasks?limit=2".to_string();
    let mut pages = 0;
    loop {
        let page = api.call(Method::GET, &uri, Some(ALICE), None).await;
        assert_eq!(page.status, StatusCode::OK, "{}", page.body);
        seen.extend(ids(&page.body["tasks"]));
        pages += 1;
        match page.body["next_cursor"].as_str() {
            Some(cursor) => uri = format!("/v1/tasks?limit=2&cursor={cursor}"),
            None => break,
        }
        assert!(pages < 10, "pagination does not end");
    }
    let newest_first: Vec<String> = alice.iter().rev().cloned().collect();
    assert_eq!(seen, newest_first);
    assert!(pages >= 3);

    // The admin sees everyone, or one user.
    assert_eq!(api.all_task_ids().await.len(), 6);
    let only_bob = api
        .call(Method::GET, "/v1/tasks?user_id=bob", Some(ADMIN), None)
        .await;
    assert_eq!(ids(&only_bob.body["tasks"]), vec![bob.clone()]);

    // Status filter.
    api.call(
        Method::POST,
        &format!("/v1/tasks/{}/cancel", alice[1]),
        Some(ALICE),
        None,
    )
    .await;
    let cancelled = api
        .call(Method::GET, "/v1/tasks?status=cancelled", Some(ALICE), None)
        .await;
    assert_eq!(ids(&cancelled.body["tasks"]), vec![alice[1].clone()]);
    let queued = api
        .call(Method::GET, "/v1/tasks?status=queued", Some(ALICE), None)
        .await;
    assert_eq!(ids(&queued.body["tasks"]).len(), 4);

    // Refusals.
    let other = api
        .call(Method::GET, "/v1/tasks?user_id=bob", Some(ALICE), None)
        .await;
    assert_eq!(
        (other.status, other.code()),
        (StatusCode::FORBIDDEN, "forbidden")
    );
    let status = api
        .call(Method::GET, "/v1/tasks?status=done", Some(ALICE), None)
        .await;
    assert_eq!(status.status, StatusCode::BAD_REQUEST);
    assert!(
        status.message().contains("pending, queued, running"),
        "{}",
        status.message()
    );
    let cursor = api
        .call(
            Method::GET,
            "/v1/tasks?cursor=not-a-cursor",
            Some(ALICE),
            None,
        )
        .await;
    assert_eq!(
        (cursor.status, cursor.code()),
        (StatusCode::BAD_REQUEST, "invalid_cursor")
    );
    for limit in ["0", "501", "-1", "x"] {
        let reply = api
            .call(
                Method::GET,
                &format!("/v1/tasks?limit={limit}"),
                Some(ALICE),
                None,
            )
            .await;
        assert_eq!(
            (reply.status, reply.code()),
            (StatusCode::BAD_REQUEST, "invalid_limit"),
            "{limit}"
        );
    }
    let unknown = api
        .call(Method::GET, "/v1/tasks?owner=bob", Some(ALICE), None)
        .await;
    assert_eq!(
        (unknown.status, unknown.code()),
        (StatusCode::BAD_REQUEST, "invalid_query")
    );
}

#[tokio::test]
async fn idempotent_submission_replays_and_refuses_a_changed_body() {
    let api = TestApi::new();
    let post = |token: &'static str, key: &'static str, body: &'static str| {
        let request = Request::builder()
            .method(Method::POST)
            .uri("/v1/tasks")
            .header(header::AUTHORIZATION, format!("Bearer {token}"))
            .header(header::CONTENT_TYPE, "application/json")
            .header("Idempotency-Key", key)
            .body(Body::from(body))
            .unwrap();
        api.send(request)
    };
    let first = post(ALICE, "key-1", r#"{"docker_image":"busybox","req_cpu":2}"#).await;
    assert_eq!(first.status, StatusCode::CREATED, "{}", first.body);
    assert!(!first.headers.contains_key("idempotency-replayed"));
    assert_eq!(first.body["idempotency_key"], "key-1");

    // Same spec, other whitespace, field order and number spelling: a replay.
    let replay = post(
        ALICE,
        "key-1",
        "{ \"req_cpu\" : 2.0,\n \"docker_image\": \"busybox\" }",
    )
    .await;
    assert_eq!(replay.status, StatusCode::OK, "{}", replay.body);
    assert_eq!(replay.headers["idempotency-replayed"], "true");
    assert_eq!(replay.body["task_id"], first.body["task_id"]);

    let changed = post(ALICE, "key-1", r#"{"docker_image":"busybox","req_cpu":3}"#).await;
    assert_eq!(
        (changed.status, changed.code()),
        (StatusCode::CONFLICT, "idempotency_key_reused")
    );

    // Keys are per user.
    let bobs = post(BOB, "key-1", r#"{"docker_image":"busybox","req_cpu":3}"#).await;
    assert_eq!(bobs.status, StatusCode::CREATED, "{}", bobs.body);

    let long_key: &'static str = Box::leak("k".repeat(256).into_boxed_str());
    for bad in ["", long_key] {
        let reply = post(ALICE, bad, r#"{"docker_image":"busybox"}"#).await;
        assert_eq!(
            (reply.status, reply.code()),
            (StatusCode::BAD_REQUEST, "invalid_idempotency_key")
        );
    }
    assert_eq!(api.all_task_ids().await.len(), 2);
}

#[tokio::test]
async fn invalid_submissions_are_refused_and_change_nothing() {
    let api = TestApi::new();
    let json_cases: Vec<(&str, StatusCode, &str, &str)> = vec![
        (
            r#"{"docker_image":"busybox","req_cpu":1e400}"#,
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_field",
            "req_cpu",
        ),
        (
            r#"{"docker_image":"busybox","req_cpu":-1}"#,
            StatusCode::UNPROCESSABLE_ENTITY,
            "validation_failed",
            "req_cpu",
        ),
        (
            r#"{"docker_image":"busybox","req_cpu":0}"#,
            StatusCode::UNPROCESSABLE_ENTITY,
            "validation_failed",
            "req_cpu",
        ),
        (
            r#"{"docker_image":"busybox","req_memory":0.0001}"#,
            StatusCode::UNPROCESSABLE_ENTITY,
            "validation_failed",
            "req_memory",
        ),
        (
            r#"{"docker_image":"busybox","req_storage":-0.5}"#,
            StatusCode::UNPROCESSABLE_ENTITY,
            "validation_failed",
            "req_storage",
        ),
        (
            r#"{"docker_image":"busybox","req_gpu":0.5}"#,
            StatusCode::UNPROCESSABLE_ENTITY,
            "validation_failed",
            "req_gpu",
        ),
        (
            r#"{"docker_image":"busybox","req_cpu":100000}"#,
            StatusCode::UNPROCESSABLE_ENTITY,
            "validation_failed",
            "req_cpu",
        ),
        (
            r#"{"docker_image":"busybox","req_cpu":"1"}"#,
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_field",
            "req_cpu",
        ),
        (
            r#"{"docker_image":"busybox","cpu":1}"#,
            StatusCode::UNPROCESSABLE_ENTITY,
            "unknown_field",
            "cpu",
        ),
        (
            r#"{"command":"true"}"#,
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_field",
            "docker_image",
        ),
        (
            r#"{"docker_image":"BusyBox"}"#,
            StatusCode::UNPROCESSABLE_ENTITY,
            "validation_failed",
            "docker_image",
        ),
        (
            r#"{"docker_image":"busybox:"}"#,
            StatusCode::UNPROCESSABLE_ENTITY,
            "validation_failed",
            "docker_image",
        ),
        (
            r#"{"docker_image":"busybox@sha256:1234"}"#,
            StatusCode::UNPROCESSABLE_ENTITY,
            "validation_failed",
            "docker_image",
        ),
        (
            r#"{"docker_image":"a b"}"#,
            StatusCode::UNPROCESSABLE_ENTITY,
            "validation_failed",
            "docker_image",
        ),
        (
            r#"{"docker_image":"busybox","command":"a\u0000b"}"#,
            StatusCode::UNPROCESSABLE_ENTITY,
            "validation_failed",
            "command",
        ),
        (
            r#"{"docker_image":"busybox","env":{"1X":"y"}}"#,
            StatusCode::UNPROCESSABLE_ENTITY,
            "validation_failed",
            "env",
        ),
        (
            r#"{"docker_image":"busybox","labels":{"":"y"}}"#,
            StatusCode::UNPROCESSABLE_ENTITY,
            "validation_failed",
            "label",
        ),
        (
            r#"{"docker_image":"busybox","priority":5000}"#,
            StatusCode::UNPROCESSABLE_ENTITY,
            "validation_failed",
            "priority",
        ),
        (
            r#"{"docker_image":"busybox","timeout_s":0}"#,
            StatusCode::UNPROCESSABLE_ENTITY,
            "validation_failed",
            "timeout_s",
        ),
        (
            r#"{"docker_image":"busybox","timeout_s":-5}"#,
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_field",
            "timeout_s",
        ),
        (
            r#"{"docker_image":"busybox","max_attempts":0}"#,
            StatusCode::UNPROCESSABLE_ENTITY,
            "validation_failed",
            "max_attempts",
        ),
        (
            r#"{"docker_image":"busybox""#,
            StatusCode::BAD_REQUEST,
            "invalid_json",
            "",
        ),
        (
            r#"["busybox"]"#,
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_field",
            "",
        ),
        ("", StatusCode::BAD_REQUEST, "invalid_json", ""),
    ];
    for (body, status, code, names) in json_cases {
        let reply = api
            .raw_post("/v1/tasks", ALICE, Some("application/json"), body)
            .await;
        assert_eq!(
            (reply.status, reply.code()),
            (status, code),
            "{body}: {}",
            reply.body
        );
        assert!(
            reply.message().contains(names),
            "{body}: {}",
            reply.message()
        );
    }

    let many_labels: serde_json::Map<String, Value> =
        (0..65).map(|i| (format!("k{i}"), json!("v"))).collect();
    let reply = api
        .submit(
            ALICE,
            json!({"docker_image": "busybox", "labels": many_labels}),
        )
        .await;
    assert_eq!(reply.code(), "validation_failed");

    let big_env: serde_json::Map<String, Value> = (0..5)
        .map(|i| (format!("K{i}"), json!("x".repeat(20_000))))
        .collect();
    let reply = api
        .submit(ALICE, json!({"docker_image": "busybox", "env": big_env}))
        .await;
    assert_eq!(reply.code(), "validation_failed");
    assert!(reply.message().contains("env"), "{}", reply.message());

    let body = r#"{"docker_image":"busybox"}"#;
    let reply = api
        .raw_post("/v1/tasks", ALICE, Some("text/plain"), body)
        .await;
    assert_eq!(
        (reply.status, reply.code()),
        (StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type")
    );
    let reply = api.raw_post("/v1/tasks", ALICE, None, body).await;
    assert_eq!(reply.status, StatusCode::UNSUPPORTED_MEDIA_TYPE);

    let huge = format!(
        r#"{{"docker_image":"busybox","command":"{}"}}"#,
        "x".repeat(300 * 1024)
    );
    let reply = api
        .raw_post("/v1/tasks", ALICE, Some("application/json"), huge.clone())
        .await;
    assert_eq!(
        (reply.status, reply.code()),
        (StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large")
    );
    // Also without a declared length (streamed body): the body limit still applies.
    let stream = futures::stream::iter(vec![Ok::<_, std::io::Error>(huge.into_bytes())]);
    let request = Request::builder()
        .method(Method::POST)
        .uri("/v1/tasks")
        .header(header::AUTHORIZATION, format!("Bearer {ALICE}"))
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from_stream(stream))
        .unwrap();
    let reply = api.send(request).await;
    assert_eq!(
        (reply.status, reply.code()),
        (StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large")
    );

    assert!(
        api.all_task_ids().await.is_empty(),
        "a refused submission was stored"
    );
}

#[tokio::test]
async fn tokens_are_required_and_roles_enforced() {
    let api = TestApi::new();
    let task_id = api
        .submit_ok(ALICE, json!({"docker_image": "busybox"}))
        .await;

    let none = api.call(Method::GET, "/v1/tasks", None, None).await;
    assert_eq!(
        (none.status, none.code()),
        (StatusCode::UNAUTHORIZED, "unauthorized")
    );
    assert!(
        none.headers[header::WWW_AUTHENTICATE]
            .to_str()
            .unwrap()
            .starts_with("Bearer")
    );
    let wrong = api
        .call(Method::GET, "/v1/tasks", Some("cai_u_nope"), None)
        .await;
    assert_eq!(wrong.status, StatusCode::UNAUTHORIZED);
    let basic = api
        .send(
            Request::builder()
                .uri("/v1/tasks")
                .header(header::AUTHORIZATION, format!("Basic {ALICE}"))
                .body(Body::empty())
                .unwrap(),
        )
        .await;
    assert_eq!(basic.status, StatusCode::UNAUTHORIZED);
    // Unauthenticated submissions are refused before the body is looked at.
    let anon = api
        .raw_post(
            "/v1/tasks",
            "",
            Some("application/json"),
            r#"{"docker_image":"busybox"}"#,
        )
        .await;
    assert_eq!(anon.status, StatusCode::UNAUTHORIZED);

    // Another user's task.
    for (method, suffix) in [
        (Method::GET, ""),
        (Method::POST, "/cancel"),
        (Method::GET, "/result"),
        (Method::GET, "/logs"),
    ] {
        let reply = api
            .call(
                method,
                &format!("/v1/tasks/{task_id}{suffix}"),
                Some(BOB),
                None,
            )
            .await;
        assert_eq!(
            (reply.status, reply.code()),
            (StatusCode::FORBIDDEN, "forbidden"),
            "{suffix}"
        );
        assert!(
            reply.message().contains("another user"),
            "{}",
            reply.message()
        );
    }
    let still = api.store.get_task(&task_id).await.unwrap();
    assert_eq!(
        still.status,
        TaskStatus::Queued,
        "bob's refused cancel changed alice's task"
    );
    let bobs = api.call(Method::GET, "/v1/tasks", Some(BOB), None).await;
    assert!(ids(&bobs.body["tasks"]).is_empty());
    // The admin sees it.
    let admin = api
        .call(
            Method::GET,
            &format!("/v1/tasks/{task_id}"),
            Some(ADMIN),
            None,
        )
        .await;
    assert_eq!(admin.status, StatusCode::OK);

    // Users cannot call admin routes; the join token cannot submit.
    for (method, uri) in [
        (Method::GET, "/v1/workers"),
        (Method::GET, "/v1/workers/w1"),
        (Method::POST, "/v1/workers/w1/drain"),
        (Method::POST, "/v1/workers/w1/undrain"),
        (Method::DELETE, "/v1/workers/w1"),
    ] {
        let reply = api.call(method, uri, Some(ALICE), None).await;
        assert_eq!(
            (reply.status, reply.code()),
            (StatusCode::FORBIDDEN, "forbidden"),
            "{uri}"
        );
    }
    let join = api.submit(JOIN, json!({"docker_image": "busybox"})).await;
    assert_eq!(join.status, StatusCode::FORBIDDEN);
    let user_registers = api.register(ALICE, worker_body("w1")).await;
    assert_eq!(user_registers.status, StatusCode::FORBIDDEN);
    assert_eq!(api.all_task_ids().await.len(), 1);
}

#[tokio::test]
async fn worker_lifecycle_with_its_own_token() {
    let api = TestApi::new();
    let reply = api.register(JOIN, worker_body("w1")).await;
    assert_eq!(reply.status, StatusCode::CREATED, "{}", reply.body);
    let token = reply.body["token"].as_str().unwrap().to_string();
    assert!(token.starts_with("cai_w_w1."), "{token}");
    let worker = &reply.body["worker"];
    assert_eq!(
        (worker["worker_id"].as_str(), worker["total_cpu"].as_f64()),
        (Some("w1"), Some(8.0))
    );
    assert_eq!(worker["available_gpu"], 1.0);
    assert!(
        worker.get("token_sha256").is_none(),
        "the token hash leaked"
    );
    assert_eq!(
        api.store.get_worker("w1").await.unwrap().token_sha256,
        token_sha256_hex(&token)
    );

    let taken = api.register(ADMIN, worker_body("w1")).await;
    assert_eq!(
        (taken.status, taken.code()),
        (StatusCode::CONFLICT, "worker_exists")
    );
    let generated = api
        .register(
            ADMIN,
            json!({"worker_ip": "node-2.local:7070", "total_cpu": 2, "total_memory": 4,
                   "total_storage": 0, "total_gpu": 0}),
        )
        .await;
    assert_eq!(generated.status, StatusCode::CREATED, "{}", generated.body);
    let w2 = generated.body["worker"]["worker_id"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(w2.starts_with("worker-"), "{w2}");
    let w2_token = generated.body["token"].as_str().unwrap().to_string();

    // Heartbeats: its own token, with or without usage.
    let beat = api
        .call(
            Method::POST,
            "/v1/workers/w1/heartbeat",
            Some(&token),
            Some(json!({"usage": {"cpu_percent": 250.0, "memory_percent": 40.0, "running_tasks": 2}})),
        )
        .await;
    assert_eq!(beat.status, StatusCode::OK, "{}", beat.body);
    assert_eq!(beat.body["worker"]["usage"]["running_tasks"], 2);
    let server_time = beat.body["server_time"].as_i64().unwrap();
    assert!((server_time - chrono::Utc::now().timestamp()).abs() <= 5);
    let empty = api
        .call(Method::POST, "/v1/workers/w1/heartbeat", Some(&token), None)
        .await;
    assert_eq!(empty.status, StatusCode::OK, "{}", empty.body);
    let bad_usage = api
        .call(
            Method::POST,
            "/v1/workers/w1/heartbeat",
            Some(&token),
            Some(
                json!({"usage": {"cpu_percent": 1.0, "memory_percent": 150.0, "running_tasks": 0}}),
            ),
        )
        .await;
    assert_eq!(bad_usage.code(), "validation_failed");
    let foreign = api
        .call(
            Method::POST,
            "/v1/workers/w1/heartbeat",
            Some(&w2_token),
            None,
        )
        .await;
    assert_eq!(
        (foreign.status, foreign.code()),
        (StatusCode::FORBIDDEN, "forbidden")
    );
    let by_admin = api
        .call(Method::POST, "/v1/workers/w1/heartbeat", Some(ADMIN), None)
        .await;
    assert_eq!(by_admin.status, StatusCode::FORBIDDEN);
    // A forged secret for a real worker id is unknown.
    let forged = api
        .call(
            Method::POST,
            "/v1/workers/w1/heartbeat",
            Some("cai_w_w1.00ff"),
            None,
        )
        .await;
    assert_eq!(forged.status, StatusCode::UNAUTHORIZED);
    // A worker token is not a user token.
    let as_user = api.call(Method::GET, "/v1/tasks", Some(&token), None).await;
    assert_eq!(as_user.status, StatusCode::FORBIDDEN);
    let worker_lists = api
        .call(Method::GET, "/v1/workers", Some(&token), None)
        .await;
    assert_eq!(worker_lists.status, StatusCode::FORBIDDEN);

    // Drain and undrain.
    let drained = api
        .call(Method::POST, "/v1/workers/w1/drain", Some(ADMIN), None)
        .await;
    assert_eq!(
        (drained.status, &drained.body["draining"]),
        (StatusCode::OK, &json!(true))
    );
    assert!(api.store.get_worker("w1").await.unwrap().draining);
    let undrained = api
        .call(Method::POST, "/v1/workers/w1/undrain", Some(ADMIN), None)
        .await;
    assert_eq!(undrained.body["draining"], false);

    let listed = api
        .call(Method::GET, "/v1/workers", Some(ADMIN), None)
        .await;
    assert_eq!(listed.body["workers"].as_array().unwrap().len(), 2);
    let one = api
        .call(Method::GET, "/v1/workers/w1", Some(ADMIN), None)
        .await;
    assert_eq!(one.body["worker_ip"], "127.0.0.1:7070");

    // A worker holding an active assignment cannot leave.
    let task_id = api
        .submit_ok(ALICE, json!({"docker_image": "busybox"}))
        .await;
    api.store
        .insert_assignment(&Assignment {
            ass_id: "ass-1".into(),
            task_id,
            worker_id: "w1".into(),
            assigned_at: model::now(),
            req_cpu: 1.0,
            req_memory: 1.0,
            req_storage: 0.0,
            req_gpu: 0.0,
            attempt: 1,
            released: false,
            released_at: None,
            placed_by: None,
            reserved_epoch: None,
        })
        .await
        .unwrap();
    let busy = api
        .call(Method::DELETE, "/v1/workers/w1", Some(&token), None)
        .await;
    assert_eq!(
        (busy.status, busy.code()),
        (StatusCode::CONFLICT, "worker_busy")
    );
    api.store.release("ass-1").await.unwrap();

    // Deregistration: not by another worker; by itself; then its token is dead.
    let other = api
        .call(Method::DELETE, "/v1/workers/w1", Some(&w2_token), None)
        .await;
    assert_eq!(other.status, StatusCode::FORBIDDEN);
    let gone = api
        .call(Method::DELETE, "/v1/workers/w1", Some(&token), None)
        .await;
    assert_eq!(gone.status, StatusCode::NO_CONTENT);
    let dead = api
        .call(Method::POST, "/v1/workers/w1/heartbeat", Some(&token), None)
        .await;
    assert_eq!(dead.status, StatusCode::UNAUTHORIZED);
    let by_admin = api
        .call(
            Method::DELETE,
            &format!("/v1/workers/{w2}"),
            Some(ADMIN),
            None,
        )
        .await;
    assert_eq!(by_admin.status, StatusCode::NO_CONTENT);
    let missing = api
        .call(Method::GET, "/v1/workers/w1", Some(ADMIN), None)
        .await;
    assert_eq!(
        (missing.status, missing.code()),
        (StatusCode::NOT_FOUND, "worker_not_found")
    );
}

#[tokio::test]
async fn invalid_registrations_change_nothing() {
    let api = TestApi::new();
    let mut cases = Vec::new();
    for (field, value) in [
        ("total_cpu", json!(0)),
        ("total_memory", json!(-1)),
        ("total_gpu", json!(1.5)),
        ("total_cpu", json!(1e9)),
        ("worker_ip", json!("line\nbreak")),
        ("worker_ip", json!("x".repeat(300) + ":1")),
        ("worker_id", json!("bad id")),
    ] {
        let mut body = worker_body("w1");
        body[field] = value;
        cases.push((field, body, "validation_failed"));
    }
    let mut unknown = worker_body("w1");
    unknown["token_sha256"] = json!("00");
    cases.push(("token_sha256", unknown, "unknown_field"));
    for (field, body, code) in cases {
        let reply = api.register(JOIN, body).await;
        assert_eq!(reply.code(), code, "{field}: {}", reply.body);
        assert!(
            reply.message().contains(field),
            "{field}: {}",
            reply.message()
        );
    }
    let listed = api
        .call(Method::GET, "/v1/workers", Some(ADMIN), None)
        .await;
    assert_eq!(listed.body["workers"], json!([]));
}

/// `worker_ip` is what people read about the machine: optional, any text without controls.
#[tokio::test]
async fn a_registration_without_an_address_records_none() {
    let api = TestApi::new();
    let mut body = worker_body("w1");
    body.as_object_mut().unwrap().remove("worker_ip");
    let reply = api.register(JOIN, body).await;
    assert_eq!(reply.status, StatusCode::CREATED, "{}", reply.body);
    let mut body = worker_body("w2");
    body["worker_ip"] = json!("rack 4, slot 2");
    let reply = api.register(JOIN, body).await;
    assert_eq!(reply.status, StatusCode::CREATED, "{}", reply.body);
    let listed = api
        .call(Method::GET, "/v1/workers", Some(ADMIN), None)
        .await;
    let ips: Vec<&str> = listed.body["workers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["worker_ip"].as_str().unwrap())
        .collect();
    assert_eq!(ips, ["", "rack 4, slot 2"], "{}", listed.body);
}

#[tokio::test]
async fn result_answers_404_and_logs_the_output_so_far_until_there_is_a_result() {
    let api = TestApi::new();
    let task_id = api
        .submit_ok(ALICE, json!({"docker_image": "busybox"}))
        .await;
    let reply = api
        .call(
            Method::GET,
            &format!("/v1/tasks/{task_id}/result"),
            Some(ALICE),
            None,
        )
        .await;
    assert_eq!(
        (reply.status, reply.code()),
        (StatusCode::NOT_FOUND, "result_not_found")
    );
    assert_eq!(
        reply.message(),
        format!("task {task_id} has no result yet: it is queued")
    );
    // The logs so far: none yet.
    let logs = api
        .call(
            Method::GET,
            &format!("/v1/tasks/{task_id}/logs"),
            Some(ALICE),
            None,
        )
        .await;
    assert_eq!(logs.status, StatusCode::OK);
    assert_eq!(
        (&logs.body["logs"], &logs.body["stderr"]),
        (&json!(""), &json!(""))
    );
    api.store
        .insert_result(&TaskResult {
            task_id: task_id.clone(),
            worker_id: "w1".into(),
            status: ResultStatus::Success,
            logs: "hello\n".into(),
            completed_at: model::now(),
            exit_code: Some(0),
            error: None,
            logs_truncated: true,
            stderr: String::new(),
            stderr_truncated: false,
            oom_killed: false,
            attempt: 1,
            runtime_s: None,
            task_type: None,
        })
        .await
        .unwrap();
    let result = api
        .call(
            Method::GET,
            &format!("/v1/tasks/{task_id}/result"),
            Some(ALICE),
            None,
        )
        .await;
    assert_eq!(result.status, StatusCode::OK);
    assert_eq!(
        (&result.body["status"], &result.body["exit_code"]),
        (&json!("success"), &json!(0))
    );
    let logs = api
        .call(
            Method::GET,
            &format!("/v1/tasks/{task_id}/logs"),
            Some(ALICE),
            None,
        )
        .await;
    assert_eq!(
        logs.body,
        json!({"task_id": task_id, "logs": "hello\n", "truncated": true, "stderr": "",
            "stderr_truncated": false})
    );

    let missing = api
        .call(Method::GET, "/v1/tasks/task-nope/result", Some(ALICE), None)
        .await;
    assert_eq!(
        (missing.status, missing.code()),
        (StatusCode::NOT_FOUND, "task_not_found")
    );
    let bad_id = api
        .call(Method::GET, "/v1/tasks/bad%20id", Some(ALICE), None)
        .await;
    assert_eq!(
        (bad_id.status, bad_id.code()),
        (StatusCode::BAD_REQUEST, "invalid_id")
    );
}

#[tokio::test]
async fn probes_and_unknown_routes() {
    let api = TestApi::new();
    let health = api.call(Method::GET, "/healthz", None, None).await;
    assert_eq!(
        (health.status, health.body.clone()),
        (StatusCode::OK, json!({"status": "ok"}))
    );
    let ready = api.call(Method::GET, "/readyz", None, None).await;
    assert_eq!(
        (ready.status, ready.body.clone()),
        (
            StatusCode::OK,
            json!({"status": "ready", "store": "sqlite"})
        )
    );
    let nowhere = api
        .call(Method::GET, "/v1/nowhere", Some(ALICE), None)
        .await;
    assert_eq!(
        (nowhere.status, nowhere.code()),
        (StatusCode::NOT_FOUND, "route_not_found")
    );
    let method = api.call(Method::PUT, "/v1/tasks", Some(ALICE), None).await;
    assert_eq!(
        (method.status, method.code()),
        (StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed")
    );
}

#[tokio::test]
async fn openapi_lists_every_route_and_the_bearer_scheme() {
    let api = TestApi::new();
    let doc = api.call(Method::GET, "/v1/openapi.json", None, None).await;
    assert_eq!(doc.status, StatusCode::OK);
    assert!(doc.body["openapi"].as_str().unwrap().starts_with("3."));
    let routes = [
        ("get", "/healthz"),
        ("get", "/readyz"),
        ("get", "/v1/openapi.json"),
        ("post", "/v1/tasks"),
        ("get", "/v1/tasks"),
        ("get", "/v1/tasks/{task_id}"),
        ("post", "/v1/tasks/{task_id}/cancel"),
        ("get", "/v1/tasks/{task_id}/result"),
        ("get", "/v1/tasks/{task_id}/assignments"),
        ("post", "/v1/arrays"),
        ("get", "/v1/arrays/{array_id}"),
        ("post", "/v1/arrays/{array_id}/cancel"),
        ("get", "/v1/tasks/{task_id}/logs"),
        ("get", "/v1/tasks/{task_id}/outputs"),
        ("get", "/v1/tasks/{task_id}/outputs/{path}"),
        ("post", "/v1/workers"),
        ("get", "/v1/workers"),
        ("get", "/v1/workers/{worker_id}"),
        ("delete", "/v1/workers/{worker_id}"),
        ("post", "/v1/workers/{worker_id}/heartbeat"),
        ("post", "/v1/workers/{worker_id}/drain"),
        ("post", "/v1/workers/{worker_id}/undrain"),
        ("get", "/v1/workers/{worker_id}/work"),
        (
            "post",
            "/v1/workers/{worker_id}/assignments/{ass_id}/started",
        ),
        (
            "post",
            "/v1/workers/{worker_id}/assignments/{ass_id}/result",
        ),
        ("post", "/v1/workers/{worker_id}/assignments/{ass_id}/logs"),
        (
            "post",
            "/v1/workers/{worker_id}/assignments/{ass_id}/outputs",
        ),
        ("post", "/v1/workers/{worker_id}/reports"),
        ("post", "/v1/policies"),
        ("get", "/v1/policies"),
        ("get", "/v1/policies/{name}"),
        ("post", "/v1/policies/{name}/activate"),
        ("post", "/v1/policies/rollback"),
        ("delete", "/v1/policies/{name}/versions/{version}"),
        ("post", "/v1/policies/{name}/dry-run"),
        ("get", "/v1/cluster/snapshot"),
        ("get", "/v1/events"),
        ("get", "/v1/overview"),
        ("get", "/metrics"),
    ];
    for (method, path) in routes {
        assert!(
            doc.body["paths"][path][method].is_object(),
            "{method} {path} missing from the OpenAPI document"
        );
    }
    let documented: usize = doc.body["paths"]
        .as_object()
        .unwrap()
        .values()
        .map(|item| item.as_object().unwrap().len())
        .sum();
    assert_eq!(
        documented,
        routes.len(),
        "undocumented or unexpected operations"
    );
    assert_eq!(
        doc.body["components"]["securitySchemes"]["bearer"]["scheme"],
        "bearer"
    );
    assert!(doc.body["components"]["schemas"]["TaskSpec"].is_object());
}

#[tokio::test]
async fn a_tasks_assignments_are_listed_oldest_first_to_its_owner_and_admins_only() {
    let api = TestApi::new();
    let task_id = api
        .submit_ok(ALICE, json!({"docker_image": "busybox"}))
        .await;
    let path = format!("/v1/tasks/{task_id}/assignments");
    let none = api.call(Method::GET, &path, Some(ALICE), None).await;
    assert_eq!(
        (none.status, none.body.clone()),
        (StatusCode::OK, json!({"assignments": []}))
    );
    for (ass_id, worker_id, attempt) in [("ass-2", "w2", 2), ("ass-1", "w1", 1)] {
        api.store
            .insert_assignment(&Assignment {
                ass_id: ass_id.into(),
                task_id: task_id.clone(),
                worker_id: worker_id.into(),
                assigned_at: model::now(),
                req_cpu: 1.0,
                req_memory: 1.0,
                req_storage: 0.0,
                req_gpu: 0.0,
                attempt,
                released: attempt == 1,
                released_at: None,
                placed_by: None,
                reserved_epoch: None,
            })
            .await
            .unwrap();
    }
    for token in [ALICE, ADMIN] {
        let reply = api.call(Method::GET, &path, Some(token), None).await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
        let seen: Vec<(&str, u64)> = reply.body["assignments"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| {
                (
                    a["worker_id"].as_str().unwrap(),
                    a["attempt"].as_u64().unwrap(),
                )
            })
            .collect();
        assert_eq!(seen, [("w1", 1), ("w2", 2)]);
    }
    let bob = api.call(Method::GET, &path, Some(BOB), None).await;
    assert_eq!(
        (bob.status, bob.code()),
        (StatusCode::FORBIDDEN, "forbidden")
    );
    let missing = api
        .call(
            Method::GET,
            "/v1/tasks/task-nope/assignments",
            Some(ALICE),
            None,
        )
        .await;
    assert_eq!(missing.status, StatusCode::NOT_FOUND, "{}", missing.body);
}

#[tokio::test]
async fn the_dashboard_is_served_with_its_types_an_etag_and_a_strict_csp() {
    let api = TestApi::new();
    let get = |uri: &str, etag: Option<&str>| {
        let mut request = Request::builder().uri(uri);
        if let Some(etag) = etag {
            request = request.header(header::IF_NONE_MATCH, etag);
        }
        api.app
            .clone()
            .oneshot(request.body(Body::empty()).unwrap())
    };
    for (uri, content_type, needle) in [
        ("/ui", "text/html; charset=utf-8", "/ui/js/app.js"),
        ("/ui/", "text/html; charset=utf-8", "/ui/js/app.js"),
        ("/ui/js/app.js", "text/javascript; charset=utf-8", "import "),
        ("/ui/app.css", "text/css; charset=utf-8", "--accent"),
    ] {
        let response = get(uri, None).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK, "{uri}");
        let headers = response.headers().clone();
        assert_eq!(headers[header::CONTENT_TYPE], content_type, "{uri}");
        let csp = headers[header::CONTENT_SECURITY_POLICY].to_str().unwrap();
        assert!(csp.contains("script-src 'self'"), "{csp}");
        assert!(!csp.contains("unsafe-inline"), "{csp}");
        assert_eq!(headers[header::X_CONTENT_TYPE_OPTIONS], "nosniff");
        assert_eq!(headers[header::CACHE_CONTROL], "no-cache");
        let body = response.into_body().collect().await.unwrap().to_bytes();
        assert!(
            String::from_utf8_lossy(&body).contains(needle),
            "{uri} lacks {needle}"
        );
        // The same ETag back: 304 and no body.
        let etag = headers[header::ETAG].to_str().unwrap();
        let again = get(uri, Some(etag)).await.unwrap();
        assert_eq!(again.status(), StatusCode::NOT_MODIFIED, "{uri}");
        assert_eq!(again.headers()[header::ETAG], etag);
        let body = again.into_body().collect().await.unwrap().to_bytes();
        assert!(body.is_empty());
        let stale = get(uri, Some("\"0000\"")).await.unwrap();
        assert_eq!(stale.status(), StatusCode::OK, "{uri}");
    }
    let missing = api.call(Method::GET, "/ui/nope.js", None, None).await;
    assert_eq!(
        (missing.status, missing.code()),
        (StatusCode::NOT_FOUND, "asset_not_found")
    );
}

/// A client that stops reading while far more events happen than the live fan-out holds:
/// once it reads again it gets every event, in order, none twice (the missed ones from the
/// store), and the lag is counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_stream_client_that_falls_behind_loses_no_event() {
    use crate::event_log::{EventHub, event};
    const EVENTS: u64 = 6_000; // > the fan-out's 4,096 + the client's 256 frames

    let api = TestApi::new();
    let stop = tokio_util::sync::CancellationToken::new();
    let (hub, sink) = EventHub::start(
        api.store.clone(),
        std::time::Duration::from_secs(3600),
        stop.clone(),
    )
    .await;
    let app = api.app.clone().layer(axum::Extension(hub.clone()));
    let request = Request::get("/v1/events?topics=worker")
        .header(header::AUTHORIZATION, format!("Bearer {ADMIN}"))
        .body(Body::empty())
        .unwrap();
    let response = app.oneshot(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let lags_before = crate::metrics::event_client_lags();

    // Nobody reads the body meanwhile.
    for i in 0..EVENTS {
        let id = format!("w-{i}");
        sink.publish(event("worker", "joined", None, Some(&id), None, json!({})));
    }
    let waited = std::time::Instant::now();
    while hub.watermark() < EVENTS {
        assert!(
            waited.elapsed() < std::time::Duration::from_secs(60),
            "events not recorded: watermark {}",
            hub.watermark()
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }

    let mut body = response.into_body();
    let mut text = String::new();
    let mut ids: Vec<u64> = Vec::new();
    // One deadline for the whole read: keep-alive comments come every 15 s.
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
    while ids.len() < EVENTS as usize {
        let frame = tokio::time::timeout_at(deadline, body.frame())
            .await
            .unwrap_or_else(|_| panic!("only {} of {EVENTS} events within 30 s", ids.len()))
            .expect("the stream goes on")
            .unwrap();
        let Ok(data) = frame.into_data() else {
            continue;
        };
        text.push_str(std::str::from_utf8(&data).unwrap());
        while let Some(end) = text.find("\n\n") {
            let block: String = text.drain(..end + 2).collect();
            if let Some(id) = block.lines().find_map(|l| l.strip_prefix("id:")) {
                ids.push(id.trim().parse().unwrap());
            }
        }
    }
    let expected: Vec<u64> = (1..=EVENTS).collect();
    assert!(ids == expected, "ids out of order, missing or twice");
    // The producer meets the lag when it next reads the fan-out, after the last frame.
    let waited = std::time::Instant::now();
    while crate::metrics::event_client_lags() == lags_before {
        assert!(
            waited.elapsed() < std::time::Duration::from_secs(10),
            "the client never lagged: the test did not exercise the fan-out's overflow"
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    stop.cancel();
}

#[tokio::test]
async fn an_array_is_submitted_admitted_listed_read_and_cancelled() {
    let api = TestApi::new();
    let spec = json!({"count": 12, "task": {"docker_image": "busybox", "command": "echo $CLOUDAI_ARRAY_INDEX", "env": {"MODE": "fast"}}});
    let reply = api
        .call(Method::POST, "/v1/arrays", Some(ALICE), Some(spec))
        .await;
    assert_eq!(reply.status, StatusCode::CREATED, "{}", reply.body);
    let array_id = reply.body["array_id"].as_str().unwrap().to_string();
    assert_eq!(reply.headers["location"], format!("/v1/arrays/{array_id}"));
    assert_eq!(reply.body["count"], 12);
    assert_eq!(reply.body["user_id"], "alice");
    assert_eq!(
        reply.body["tasks_by_state"]["queued"], 12,
        "admitted together"
    );
    assert_eq!(reply.body["finished"], false);

    // Listed as tasks of the array, each with its index; ids sort in index order.
    let listed = api
        .call(
            Method::GET,
            &format!("/v1/tasks?array_id={array_id}&limit=100"),
            Some(ALICE),
            None,
        )
        .await;
    assert_eq!(listed.status, StatusCode::OK, "{}", listed.body);
    let tasks = listed.body["tasks"].as_array().unwrap();
    assert_eq!(tasks.len(), 12);
    let mut by_index: Vec<(u64, String)> = tasks
        .iter()
        .map(|t| {
            assert_eq!(t["array_id"], array_id.as_str());
            assert_eq!(t["env"]["MODE"], "fast");
            assert_eq!(t["env"]["CLOUDAI_ARRAY_ID"], array_id.as_str());
            assert_eq!(t["env"]["CLOUDAI_ARRAY_COUNT"], "12");
            let index = t["array_index"].as_u64().unwrap();
            assert_eq!(t["env"]["CLOUDAI_ARRAY_INDEX"], index.to_string());
            (index, t["task_id"].as_str().unwrap().to_string())
        })
        .collect();
    by_index.sort();
    assert_eq!(
        by_index.iter().map(|(i, _)| *i).collect::<Vec<_>>(),
        (0..12).collect::<Vec<_>>()
    );
    assert!(by_index.windows(2).all(|w| w[0].1 < w[1].1), "{by_index:?}");
    let first = &by_index[0].1;
    assert!(first.ends_with("-00"), "{first}");

    // Read by its owner and admins only.
    let read = api
        .call(
            Method::GET,
            &format!("/v1/arrays/{array_id}"),
            Some(ALICE),
            None,
        )
        .await;
    assert_eq!(read.status, StatusCode::OK, "{}", read.body);
    assert_eq!(
        read.body["tasks_url"],
        format!("/v1/tasks?array_id={array_id}")
    );
    let admin = api
        .call(
            Method::GET,
            &format!("/v1/arrays/{array_id}"),
            Some(ADMIN),
            None,
        )
        .await;
    assert_eq!(admin.status, StatusCode::OK);
    for (token, uri, status, code) in [
        (
            BOB,
            format!("/v1/arrays/{array_id}"),
            StatusCode::FORBIDDEN,
            "forbidden",
        ),
        (
            BOB,
            format!("/v1/arrays/{array_id}/cancel"),
            StatusCode::FORBIDDEN,
            "forbidden",
        ),
        (
            ALICE,
            "/v1/arrays/array-none".to_string(),
            StatusCode::NOT_FOUND,
            "array_not_found",
        ),
        (
            ALICE,
            "/v1/arrays/bad%20id".to_string(),
            StatusCode::BAD_REQUEST,
            "invalid_id",
        ),
        (
            ALICE,
            format!("/v1/arrays/{array_id}?wait=forever"),
            StatusCode::UNPROCESSABLE_ENTITY,
            "validation_failed",
        ),
        (
            ALICE,
            format!("/v1/arrays/{array_id}?nope=1"),
            StatusCode::BAD_REQUEST,
            "invalid_query",
        ),
    ] {
        let method = if uri.ends_with("/cancel") {
            Method::POST
        } else {
            Method::GET
        };
        let reply = api.call(method, &uri, Some(token), Some(json!({}))).await;
        assert_eq!(
            (reply.status, reply.code()),
            (status, code),
            "{uri}: {}",
            reply.body
        );
    }

    // One task runs: cancelling the array cancels the others and asks its worker to stop it.
    let running = &by_index[4].1;
    api.store
        .transition_task(
            running,
            &[TaskStatus::Queued],
            TaskStatus::Running,
            &TaskUpdate::default(),
        )
        .await
        .unwrap();
    let cancel = api
        .call(
            Method::POST,
            &format!("/v1/arrays/{array_id}/cancel"),
            Some(ALICE),
            Some(json!({})),
        )
        .await;
    assert_eq!(cancel.status, StatusCode::OK, "{}", cancel.body);
    assert_eq!(cancel.body["cancelled"], 11);
    assert_eq!(cancel.body["stopping"], 1);
    assert_eq!(cancel.body["array"]["tasks_by_state"]["cancelled"], 11);
    assert_eq!(cancel.body["array"]["tasks_by_state"]["running"], 1);
    assert!(api.store.get_task(running).await.unwrap().cancel_requested);
    let other = api.store.get_task(&by_index[0].1).await.unwrap();
    assert_eq!(other.status, TaskStatus::Cancelled);
    assert_eq!(
        other.status_reason.as_deref(),
        Some(format!("cancelled by alice (array {array_id})").as_str())
    );

    // A wait ends at its limit while a task runs, at once when every task ended.
    let started = std::time::Instant::now();
    let waited = api
        .call(
            Method::GET,
            &format!("/v1/arrays/{array_id}?wait=300ms"),
            Some(ALICE),
            None,
        )
        .await;
    assert!(started.elapsed() >= std::time::Duration::from_millis(300));
    assert_eq!(waited.body["finished"], false);
    api.store
        .transition_task(
            running,
            &[TaskStatus::Running],
            TaskStatus::Cancelled,
            &TaskUpdate::default(),
        )
        .await
        .unwrap();
    let waited = api
        .call(
            Method::GET,
            &format!("/v1/arrays/{array_id}?wait=30s"),
            Some(ALICE),
            None,
        )
        .await;
    assert_eq!(waited.body["finished"], true, "{}", waited.body);
    let again = api
        .call(
            Method::POST,
            &format!("/v1/arrays/{array_id}/cancel"),
            Some(ALICE),
            Some(json!({})),
        )
        .await;
    assert_eq!(
        (again.status, again.code()),
        (StatusCode::CONFLICT, "array_finished")
    );
}

#[tokio::test]
async fn array_submissions_are_validated_replayed_by_key_and_refused_without_a_trace() {
    let api = TestApi::new();
    let busybox = json!({"docker_image": "busybox"});
    let cases = [
        (
            json!({"count": 0, "task": busybox}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "count must be in 1..=100000",
        ),
        (
            json!({"count": 100_001, "task": busybox}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "count must be in 1..=100000",
        ),
        (
            json!({"count": -1, "task": busybox}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "count",
        ),
        (
            json!({"count": 2}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "task",
        ),
        (
            json!({"count": 2, "task": busybox, "extra": 1}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "extra",
        ),
        (
            json!({"count": 2, "task": {"docker_image": "busybox", "req_cpu": 0}}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "task.req_cpu",
        ),
        (
            json!({"count": 2, "task": {"docker_image": "busybox", "env": {"CLOUDAI_ARRAY_INDEX": "7"}}}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "must not set CLOUDAI_ARRAY_INDEX",
        ),
    ];
    for (body, status, message) in cases {
        let reply = api
            .call(Method::POST, "/v1/arrays", Some(ALICE), Some(body.clone()))
            .await;
        assert_eq!(reply.status, status, "{body}: {}", reply.body);
        assert!(reply.message().contains(message), "{body}: {}", reply.body);
    }
    let worker = api
        .call(
            Method::POST,
            "/v1/arrays",
            Some(JOIN),
            Some(json!({"count": 1, "task": busybox})),
        )
        .await;
    assert_eq!(worker.status, StatusCode::FORBIDDEN);
    assert!(
        api.all_task_ids().await.is_empty(),
        "a refused array stores nothing"
    );

    let post = |key: &'static str, body: Value| {
        let request = Request::builder()
            .method(Method::POST)
            .uri("/v1/arrays")
            .header(header::AUTHORIZATION, format!("Bearer {ALICE}"))
            .header(header::CONTENT_TYPE, "application/json")
            .header("Idempotency-Key", key)
            .body(Body::from(serde_json::to_vec(&body).unwrap()))
            .unwrap();
        api.send(request)
    };
    let first = post("nightly", json!({"count": 3, "task": busybox})).await;
    assert_eq!(first.status, StatusCode::CREATED, "{}", first.body);
    let replay = post(
        "nightly",
        json!({"task": {"docker_image": "busybox", "req_cpu": 1.0}, "count": 3}),
    )
    .await;
    assert_eq!(replay.status, StatusCode::OK, "{}", replay.body);
    assert_eq!(replay.headers["idempotency-replayed"], "true");
    assert_eq!(replay.body["array_id"], first.body["array_id"]);
    let changed = post("nightly", json!({"count": 4, "task": busybox})).await;
    assert_eq!(
        (changed.status, changed.code()),
        (StatusCode::CONFLICT, "idempotency_key_reused")
    );
    // A key of a single task is not the key of an array.
    let single = api
        .send(
            Request::builder()
                .method(Method::POST)
                .uri("/v1/tasks")
                .header(header::AUTHORIZATION, format!("Bearer {ALICE}"))
                .header(header::CONTENT_TYPE, "application/json")
                .header("Idempotency-Key", "once")
                .body(Body::from(r#"{"docker_image":"busybox"}"#))
                .unwrap(),
        )
        .await;
    assert_eq!(single.status, StatusCode::CREATED);
    let reused = post("once", json!({"count": 2, "task": busybox})).await;
    assert_eq!(
        (reused.status, reused.code()),
        (StatusCode::CONFLICT, "idempotency_key_reused")
    );
    assert_eq!(
        api.all_task_ids().await.len(),
        4,
        "3 of the array, 1 single"
    );
}

#[tokio::test]
async fn dependencies_are_checked_at_submit_and_a_waiting_task_is_not_admitted() {
    let api = TestApi::new();
    let first = api
        .submit_ok(ALICE, json!({"docker_image": "busybox"}))
        .await;
    let bobs = api.submit_ok(BOB, json!({"docker_image": "busybox"})).await;
    let after = |deps: Value| json!({"docker_image": "busybox", "after": deps});

    // Refused, and nothing stored: unknown ids, another user's task, a bad shape.
    let before = api.all_task_ids().await.len();
    let cases = [
        (
            json!([{"task_id": "task-nobody"}]),
            "after[0]: there is no task task-nobody",
        ),
        (
            json!([{"array_id": "array-nobody"}]),
            "there is no array array-nobody",
        ),
        (json!([{"task_id": bobs}]), "there is no task"),
        (json!([{}]), "exactly one of task_id and array_id"),
        (
            json!([{"task_id": first, "array_id": "array-x"}]),
            "exactly one of",
        ),
        (json!([{"task_id": "bad id"}]), "after[0]: id"),
        (
            json!([{"task_id": first, "condition": "sometime"}]),
            "condition",
        ),
        (
            json!(
                (0..33)
                    .map(|_| json!({"task_id": first}))
                    .collect::<Vec<_>>()
            ),
            "at most 32",
        ),
    ];
    for (deps, message) in cases {
        let reply = api.submit(ALICE, after(deps.clone())).await;
        assert_eq!(
            reply.status,
            StatusCode::UNPROCESSABLE_ENTITY,
            "{deps}: {}",
            reply.body
        );
        assert!(
            reply.message().contains(message),
            "{deps}: {}",
            reply.message()
        );
    }
    assert_eq!(api.all_task_ids().await.len(), before);

    // Waiting: 202, pending, not admitted, with the reason; the dependency is shown.
    let reply = api.submit(ALICE, after(json!([{"task_id": first}]))).await;
    assert_eq!(reply.status, StatusCode::ACCEPTED, "{}", reply.body);
    assert_eq!(reply.body["status"], "pending");
    assert_eq!(reply.body["awaiting_dependencies"], true);
    assert_eq!(
        reply.body["status_reason"],
        format!("waiting for task {first} to complete")
    );
    assert_eq!(
        reply.body["after"],
        json!([{"task_id": first, "condition": "completed"}])
    );
    // Admins may name anyone's task.
    let admins = api
        .submit(
            ADMIN,
            after(json!([{"task_id": bobs, "condition": "finished"}])),
        )
        .await;
    assert_eq!(admins.status, StatusCode::ACCEPTED, "{}", admins.body);

    // Met already (finished, however): admitted at once.
    api.store
        .transition_task(
            &first,
            &[TaskStatus::Queued],
            TaskStatus::Failed,
            &TaskUpdate::default(),
        )
        .await
        .unwrap();
    let met = api
        .submit(
            ALICE,
            after(json!([{"task_id": first, "condition": "finished"}])),
        )
        .await;
    assert_eq!(met.status, StatusCode::CREATED, "{}", met.body);
    assert_eq!(met.body["status"], "queued");
    assert_eq!(met.body["awaiting_dependencies"], false);
    // Never met any more: refused with the reason.
    let never = api.submit(ALICE, after(json!([{"task_id": first}]))).await;
    assert_eq!(
        never.status,
        StatusCode::UNPROCESSABLE_ENTITY,
        "{}",
        never.body
    );
    assert!(
        never
            .message()
            .contains("is failed: it can no longer complete, so this task could never start"),
        "{}",
        never.message()
    );

    // An array may wait too; every task of it does.
    let array = api
        .call(
            Method::POST,
            "/v1/arrays",
            Some(ALICE),
            Some(json!({"count": 3, "task": after(json!([{"task_id": reply.body["task_id"]}]))})),
        )
        .await;
    assert_eq!(array.status, StatusCode::ACCEPTED, "{}", array.body);
    assert_eq!(array.body["tasks_by_state"]["pending"], 3);
    // And a task may wait for an array.
    let on_array = api
        .submit(ALICE, after(json!([{"array_id": array.body["array_id"]}])))
        .await;
    assert_eq!(on_array.status, StatusCode::ACCEPTED, "{}", on_array.body);
    assert_eq!(
        on_array.body["status_reason"],
        format!(
            "waiting for array {} to complete",
            array.body["array_id"].as_str().unwrap()
        )
    );
}
