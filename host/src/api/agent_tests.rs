//! Handler tests of the agent routes (`/v1/workers/{id}/work`, `.../started`, `.../result`):
//! the real router and scheduler over a real SQLite store. A task goes from submission to a
//! worker's work list, is reported started and finished, and the reservation comes back once;
//! late, foreign and malformed reports change nothing.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::http::{Method, Request, StatusCode, header};
use http_body_util::BodyExt;
use serde_json::{Value, json};
use tower::ServiceExt;

use crate::api::auth::{Authenticator, Role, TokenEntry, sha256_hex};
use crate::api::{AppState, Limits, router};
use crate::model::TaskStatus;
use crate::policy::{EngineSettings, PolicyEngine, PolicyRuntime, RuntimeSettings};
use crate::scheduler::{Scheduler, SchedulerConfig, Wakeup, WorkSignal};
use crate::store::sqlite::SqliteStore;
use crate::store::{Store, TaskUpdate};

const ALICE: &str = "cai_u_alice_agent_0123456789";
const JOIN: &str = "cai_j_agent_tests_join_token";

struct Api {
    _dir: tempfile::TempDir,
    app: Router,
    store: Arc<dyn Store>,
    scheduler: Scheduler,
}

struct Reply {
    status: StatusCode,
    body: Value,
}

impl Reply {
    fn code(&self) -> &str {
        self.body["error"]["code"].as_str().unwrap_or("<no code>")
    }
}

impl Api {
    fn new(limits: Limits) -> Api {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(SqliteStore::open_in_dir(dir.path()).unwrap());
        let policies = Arc::new(PolicyRuntime::new(
            PolicyEngine::new(EngineSettings::default()).unwrap(),
            RuntimeSettings::default(),
        ));
        let (wakeup, work) = (Wakeup::new(), WorkSignal::new());
        let state = AppState {
            store: store.clone(),
            auth: Arc::new(Authenticator::new(
                vec![TokenEntry {
                    user_id: "alice".into(),
                    role: Role::User,
                    token_sha256: sha256_hex(ALICE),
                }],
                Some(sha256_hex(JOIN)),
            )),
            limits: Arc::new(limits),
            policies: policies.clone(),
            wakeup: wakeup.clone(),
            work: work.clone(),
        };
        let scheduler = Scheduler::new(
            store.clone(),
            policies,
            wakeup,
            SchedulerConfig {
                round_interval: Duration::from_secs(3600),
                ..SchedulerConfig::default()
            },
        )
        .with_work_signal(work);
        Api {
            _dir: dir,
            app: router(state),
            store,
            scheduler,
        }
    }

    async fn call(&self, method: Method, uri: &str, token: &str, body: Option<Value>) -> Reply {
        let mut builder = Request::builder()
            .method(method)
            .uri(uri)
            .header(header::AUTHORIZATION, format!("Bearer {token}"));
        let body = match body {
            Some(v) => {
                builder = builder.header(header::CONTENT_TYPE, "application/json");
                Body::from(v.to_string())
            }
            None => Body::empty(),
        };
        let response = self
            .app
            .clone()
            .oneshot(builder.body(body).unwrap())
            .await
            .unwrap();
        let status = response.status();
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        let body = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes).unwrap()
        };
        Reply { status, body }
    }

    /// Registers a worker through the API; returns its token.
    async fn register(&self, id: &str, cpu: f64) -> String {
        let reply = self
            .call(
                Method::POST,
                "/v1/workers",
                JOIN,
                Some(
                    json!({"worker_id": id, "worker_ip": "127.0.0.1:0", "total_cpu": cpu,
                    "total_memory": 8.0, "total_storage": 10.0, "total_gpu": 0.0}),
                ),
            )
            .await;
        assert_eq!(reply.status, StatusCode::CREATED, "{}", reply.body);
        reply.body["token"].as_str().unwrap().to_string()
    }

    /// Submits as alice and places it; returns the task id.
    async fn submit_and_place(&self, spec: Value) -> String {
        let reply = self
            .call(Method::POST, "/v1/tasks", ALICE, Some(spec))
            .await;
        assert_eq!(reply.status, StatusCode::CREATED, "{}", reply.body);
        self.scheduler.cycle().await;
        reply.body["task_id"].as_str().unwrap().to_string()
    }

    async fn work(&self, worker: &str, token: &str, query: &str) -> Reply {
        self.call(
            Method::GET,
            &format!("/v1/workers/{worker}/work{query}"),
            token,
            None,
        )
        .await
    }

    async fn report(&self, worker: &str, token: &str, ass: &str, what: &str, body: Value) -> Reply {
        self.call(
            Method::POST,
            &format!("/v1/workers/{worker}/assignments/{ass}/{what}"),
            token,
            Some(body),
        )
        .await
    }

    async fn allocated_cpu(&self, worker: &str) -> f64 {
        self.store.get_worker(worker).await.unwrap().allocated_cpu
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_placed_task_reaches_its_workers_long_poll_and_its_result_is_recorded_once() {
    let api = Arc::new(Api::new(Limits::default()));
    let token = api.register("w1", 4.0).await;
    let empty = api.work("w1", &token, "").await;
    assert_eq!(empty.status, StatusCode::OK, "{}", empty.body);
    assert_eq!(empty.body["work"], json!([]));
    let version = empty.body["version"].as_str().unwrap().to_string();

    // A long poll from the known (empty) version answers when the task is placed.
    let waiting = {
        let (api, token, version) = (api.clone(), token.clone(), version.clone());
        tokio::spawn(async move {
            let started = Instant::now();
            let reply = api
                .work("w1", &token, &format!("?known={version}&wait_ms=20000"))
                .await;
            (reply, started.elapsed())
        })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    let task_id = api
        .submit_and_place(json!({"docker_image": "busybox", "command": "echo hello",
            "req_cpu": 2, "req_memory": 1, "env": {"GREETING": "hi"}, "timeout_s": 60}))
        .await;
    let (reply, waited) = waiting.await.unwrap();
    assert!(waited < Duration::from_secs(5), "answered after {waited:?}");
    let work = &reply.body["work"][0];
    assert_eq!(work["task_id"], task_id.as_str(), "{}", reply.body);
    assert_eq!(work["docker_image"], "busybox");
    assert_eq!(work["command"], "echo hello");
    assert_eq!(work["env"]["GREETING"], "hi");
    assert_eq!(
        (work["req_cpu"].as_f64(), work["attempt"].as_u64()),
        (Some(2.0), Some(1))
    );
    assert_eq!(
        (work["timeout_s"].as_u64(), &work["cancel"]),
        (Some(60), &json!(false))
    );
    assert_ne!(reply.body["version"], version.as_str());
    let ass = work["ass_id"].as_str().unwrap().to_string();
    assert_eq!(api.allocated_cpu("w1").await, 2.0);

    // Started: recorded once.
    let started = api.report("w1", &token, &ass, "started", json!({})).await;
    assert_eq!(started.status, StatusCode::OK, "{}", started.body);
    let first = api
        .store
        .get_task(&task_id)
        .await
        .unwrap()
        .started_at
        .unwrap();
    api.report("w1", &token, &ass, "started", json!({})).await;
    assert_eq!(
        api.store.get_task(&task_id).await.unwrap().started_at,
        Some(first)
    );

    let report = json!({"outcome": "completed", "exit_code": 0, "stdout": "hello\n",
        "stderr": "a warning\n"});
    let done = api
        .report("w1", &token, &ass, "result", report.clone())
        .await;
    assert_eq!(done.status, StatusCode::OK, "{}", done.body);
    assert_eq!(done.body["status"], "completed");
    let result = api
        .call(
            Method::GET,
            &format!("/v1/tasks/{task_id}/result"),
            ALICE,
            None,
        )
        .await;
    assert_eq!(result.body["logs"], "hello\n", "{}", result.body);
    assert_eq!(result.body["stderr"], "a warning\n");
    assert_eq!(
        (result.body["exit_code"].as_i64(), &result.body["status"]),
        (Some(0), &json!("success"))
    );
    assert_eq!(result.body["worker_id"], "w1");
    assert_eq!(
        api.allocated_cpu("w1").await,
        0.0,
        "the reservation is returned"
    );

    // The same report again (its answer was lost): the same answer, nothing released twice.
    let again = api.report("w1", &token, &ass, "result", report).await;
    assert_eq!(
        (again.status, &again.body["status"]),
        (StatusCode::OK, &json!("completed"))
    );
    assert_eq!(api.allocated_cpu("w1").await, 0.0);
    assert_eq!(api.work("w1", &token, "").await.body["work"], json!([]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_oom_kills_timeouts_and_errors_fail_the_task_with_their_reason() {
    let api = Api::new(Limits::default());
    let token = api.register("w1", 8.0).await;
    let cases = [
        (
            json!({"outcome": "failed", "exit_code": 3}),
            "exited with code 3",
            Some(3),
            false,
        ),
        (
            json!({"outcome": "oom_killed", "exit_code": 137}),
            "oom_killed",
            Some(137),
            true,
        ),
        (json!({"outcome": "timed_out"}), "timeout", None, false),
        (
            json!({"outcome": "error", "error": "image_pull_failed: no registry"}),
            "image_pull_failed: no registry",
            None,
            false,
        ),
    ];
    for (report, reason, exit_code, oom) in cases {
        let task_id = api
            .submit_and_place(json!({"docker_image": "busybox"}))
            .await;
        let work = api.work("w1", &token, "").await;
        let ass = work.body["work"][0]["ass_id"].as_str().unwrap().to_string();
        let reply = api.report("w1", &token, &ass, "result", report).await;
        assert_eq!(reply.body["status"], "failed", "{}", reply.body);
        let task = api.store.get_task(&task_id).await.unwrap();
        assert!(
            task.error.as_deref().unwrap().starts_with(reason),
            "{task:?}"
        );
        assert_eq!(task.exit_code, exit_code);
        let result = api.store.get_result(&task_id).await.unwrap();
        assert_eq!((result.oom_killed, result.attempt), (oom, 1));
    }
    assert_eq!(api.allocated_cpu("w1").await, 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_task_is_flagged_in_the_work_list_and_ends_cancelled() {
    let api = Arc::new(Api::new(Limits::default()));
    let token = api.register("w1", 4.0).await;
    let task_id = api
        .submit_and_place(json!({"docker_image": "busybox"}))
        .await;
    let list = api.work("w1", &token, "").await;
    let version = list.body["version"].as_str().unwrap().to_string();
    let ass = list.body["work"][0]["ass_id"].as_str().unwrap().to_string();

    let waiting = {
        let (api, token) = (api.clone(), token.clone());
        tokio::spawn(async move {
            api.work("w1", &token, &format!("?known={version}&wait_ms=20000"))
                .await
        })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    let cancel = api
        .call(
            Method::POST,
            &format!("/v1/tasks/{task_id}/cancel"),
            ALICE,
            None,
        )
        .await;
    assert_eq!(cancel.status, StatusCode::ACCEPTED, "{}", cancel.body);
    let reply = tokio::time::timeout(Duration::from_secs(5), waiting)
        .await
        .expect("the long poll answers the cancellation")
        .unwrap();
    assert_eq!(reply.body["work"][0]["cancel"], true, "{}", reply.body);

    let done = api
        .report(
            "w1",
            &token,
            &ass,
            "result",
            json!({"outcome": "cancelled", "exit_code": 137}),
        )
        .await;
    assert_eq!(done.body["status"], "cancelled", "{}", done.body);
    assert_eq!(api.allocated_cpu("w1").await, 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn late_foreign_and_malformed_reports_change_nothing() {
    let api = Api::new(Limits {
        max_log_bytes: 16,
        ..Limits::default()
    });
    let token = api.register("w1", 4.0).await;
    let other = api.register("w2", 1.0).await;
    let task_id = api
        .submit_and_place(json!({"docker_image": "busybox", "req_cpu": 2}))
        .await;
    let ass = api.work("w1", &token, "").await.body["work"][0]["ass_id"]
        .as_str()
        .unwrap()
        .to_string();

    // Another worker's token, someone else's work list, an unknown assignment.
    let foreign = api
        .report(
            "w1",
            &other,
            &ass,
            "result",
            json!({"outcome": "completed", "exit_code": 0}),
        )
        .await;
    assert_eq!(foreign.status, StatusCode::FORBIDDEN);
    assert_eq!(
        api.work("w1", &other, "").await.status,
        StatusCode::FORBIDDEN
    );
    let unknown = api
        .report(
            "w2",
            &other,
            &ass,
            "result",
            json!({"outcome": "completed", "exit_code": 0}),
        )
        .await;
    assert_eq!(
        (unknown.status, unknown.code()),
        (StatusCode::NOT_FOUND, "assignment_not_found")
    );

    // Malformed: a failure without its exit code, an unknown field, an unknown outcome.
    for bad in [
        json!({"outcome": "failed"}),
        json!({"outcome": "completed", "exit_code": 0, "surprise": 1}),
        json!({"outcome": "exploded"}),
    ] {
        let reply = api.report("w1", &token, &ass, "result", bad.clone()).await;
        assert_eq!(
            reply.status,
            StatusCode::UNPROCESSABLE_ENTITY,
            "{bad}: {}",
            reply.body
        );
    }
    assert_eq!(
        api.store.get_task(&task_id).await.unwrap().status,
        TaskStatus::Running
    );

    // Output over the host's bound is cut with a marker.
    let long = "x".repeat(100);
    let done = api
        .report(
            "w1",
            &token,
            &ass,
            "result",
            json!({"outcome": "completed", "exit_code": 0, "stdout": long}),
        )
        .await;
    assert_eq!(done.status, StatusCode::OK, "{}", done.body);
    let result = api.store.get_result(&task_id).await.unwrap();
    assert!(
        result.logs_truncated
            && result
                .logs
                .contains("[cloudai: output truncated after 16 bytes]"),
        "{result:?}"
    );

    // The worker is lost and its task re-queued: its late report is refused.
    let task_id = api
        .submit_and_place(json!({"docker_image": "busybox", "req_cpu": 2}))
        .await;
    let ass = api.work("w1", &token, "").await.body["work"][0]["ass_id"]
        .as_str()
        .unwrap()
        .to_string();
    api.store
        .transition_attempt(
            &task_id,
            1,
            &[TaskStatus::Running],
            TaskStatus::Queued,
            &TaskUpdate::default(),
        )
        .await
        .unwrap();
    assert!(api.store.release(&ass).await.unwrap());
    let started = api.report("w1", &token, &ass, "started", json!({})).await;
    assert_eq!(
        (started.status, started.code()),
        (StatusCode::CONFLICT, "assignment_superseded")
    );
    let late = api
        .report(
            "w1",
            &token,
            &ass,
            "result",
            json!({"outcome": "completed", "exit_code": 0}),
        )
        .await;
    assert_eq!(
        (late.status, late.code()),
        (StatusCode::CONFLICT, "assignment_superseded")
    );
    assert_eq!(
        api.store.get_task(&task_id).await.unwrap().status,
        TaskStatus::Queued
    );
    assert!(
        api.store.get_result(&task_id).await.is_err(),
        "no result recorded"
    );
    assert_eq!(api.work("w1", &token, "").await.body["work"], json!([]));
}
