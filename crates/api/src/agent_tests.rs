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

use crate::auth::{Authenticator, Role, TokenEntry, token_sha256_hex};
use crate::model::TaskStatus;
use crate::policy::{EngineSettings, PolicyEngine, PolicyRuntime, RuntimeSettings};
use crate::scheduler::{Scheduler, SchedulerConfig, Wakeup, WorkSignal};
use crate::store::sqlite::SqliteStore;
use crate::store::{Store, TaskUpdate};
use crate::{AppState, Limits, router};

const ALICE: &str = "cai_u_alice_agent_0123456789";
const JOIN: &str = "cai_j_agent_tests_join_token";
const BOB: &str = "cai_u_bob_agent_0123456789ab";

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
            lifecycle: crate::lifecycle::Lifecycle::new(store.clone(), wakeup.clone()),
            auth: Arc::new(Authenticator::new(
                vec![
                    TokenEntry {
                        user_id: "alice".into(),
                        role: Role::User,
                        token_sha256: token_sha256_hex(ALICE),
                    },
                    TokenEntry {
                        user_id: "bob".into(),
                        role: Role::User,
                        token_sha256: token_sha256_hex(BOB),
                    },
                ],
                Some(token_sha256_hex(JOIN)),
            )),
            limits: Arc::new(limits),
            policies: policies.clone(),
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

    /// A request with a raw body; the answer's status, content type and bytes.
    async fn call_raw(
        &self,
        method: Method,
        uri: &str,
        token: &str,
        body: Vec<u8>,
    ) -> (StatusCode, String, Vec<u8>) {
        let request = Request::builder()
            .method(method)
            .uri(uri)
            .header(header::AUTHORIZATION, format!("Bearer {token}"))
            .header(header::CONTENT_TYPE, "application/octet-stream")
            .body(Body::from(body))
            .unwrap();
        let response = self.app.clone().oneshot(request).await.unwrap();
        let status = response.status();
        let content_type = response
            .headers()
            .get(header::CONTENT_TYPE)
            .map(|v| v.to_str().unwrap().to_string())
            .unwrap_or_default();
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        (status, content_type, bytes.to_vec())
    }

    /// Submits and places a task on a new worker `w1`; returns (task, worker token, ass_id).
    async fn running_task(&self, command: &str) -> (String, String, String) {
        let token = self.register("w1", 4.0).await;
        let task_id = self
            .submit_and_place(json!({"docker_image": "busybox", "command": command}))
            .await;
        let ass = self.work("w1", &token, "").await.body["work"][0]["ass_id"]
            .as_str()
            .unwrap()
            .to_string();
        (task_id, token, ass)
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

/// The run time a result records (and placement policies learn from) is measured on one
/// clock: the worker's, when it reports when the container started and stopped, however far
/// its clock is from the host's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_runs_time_is_the_workers_own_measure_of_its_container() {
    let api = Arc::new(Api::new(Limits::default()));
    let token = api.register("w1", 4.0).await;
    let task_id = api
        .submit_and_place(json!({"docker_image": "busybox", "req_cpu": 1}))
        .await;
    let work = api.work("w1", &token, "").await;
    let ass = work.body["work"][0]["ass_id"].as_str().unwrap().to_string();
    api.report("w1", &token, &ass, "started", json!({})).await;
    // The worker's clock is an hour behind the host's: only the difference counts.
    let report = json!({"outcome": "completed", "exit_code": 0,
        "started_at": "2026-01-01T10:00:00.000Z", "finished_at": "2026-01-01T10:00:02.500Z"});
    let done = api.report("w1", &token, &ass, "result", report).await;
    assert_eq!(done.status, StatusCode::OK, "{}", done.body);
    let result = api.store.get_result(&task_id).await.unwrap();
    assert_eq!(result.runtime_s, Some(2.5), "{result:?}");
    let samples = api.store.recent_runtimes(10).await.unwrap();
    assert!(samples.iter().any(|s| s.runtime_s == 2.5), "{samples:?}");
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

    // Malformed: an exit code that is not a number, an unknown field, an unknown outcome.
    for bad in [
        json!({"outcome": "failed", "exit_code": 1.5}),
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

fn live(seq: u64, stream: &str, offset: u64, text: &str) -> Value {
    json!({"seq": seq, "stream": stream, "offset": offset, "text": text})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_logs_are_stored_once_bounded_per_stream_and_served_until_the_result() {
    let api = Api::new(Limits {
        max_log_bytes: 8,
        ..Limits::default()
    });
    let (task_id, token, ass) = api.running_task("echo a").await;
    let batch = json!({"chunks": [live(0, "stdout", 0, "a\n"), live(1, "stderr", 0, "oops\n")]});
    let sent = api.report("w1", &token, &ass, "logs", batch.clone()).await;
    assert_eq!(sent.status, StatusCode::OK, "{}", sent.body);
    assert_eq!(
        sent.body,
        json!({"stored": 2, "stdout_full": false, "stderr_full": false})
    );
    // A retried batch stores nothing again.
    let again = api.report("w1", &token, &ass, "logs", batch).await;
    assert_eq!(again.body["stored"], 0);
    // Standard output crosses its bound of 8 bytes: cut with a marker, then dropped.
    let over = api
        .report(
            "w1",
            &token,
            &ass,
            "logs",
            json!({"chunks": [live(2, "stdout", 2, "bcdefghij"), live(3, "stdout", 11, "k")]}),
        )
        .await;
    assert_eq!(
        (over.body["stored"].as_u64(), &over.body["stdout_full"]),
        (Some(1), &json!(true))
    );

    let logs = api
        .call(
            Method::GET,
            &format!("/v1/tasks/{task_id}/logs"),
            ALICE,
            None,
        )
        .await;
    assert_eq!(logs.status, StatusCode::OK, "{}", logs.body);
    let stdout = logs.body["logs"].as_str().unwrap();
    assert!(
        stdout.starts_with("a\nbcdefg\n[cloudai: output truncated"),
        "{stdout}"
    );
    assert_eq!(logs.body["stderr"], "oops\n");
    assert_eq!(
        api.call(Method::GET, &format!("/v1/tasks/{task_id}/logs"), BOB, None)
            .await
            .status,
        StatusCode::FORBIDDEN
    );

    // Someone else's token, a malformed batch: refused.
    let other = api.register("w2", 1.0).await;
    let foreign = api
        .report("w1", &other, &ass, "logs", json!({"chunks": []}))
        .await;
    assert_eq!(foreign.status, StatusCode::FORBIDDEN);
    let bad = api
        .report(
            "w1",
            &token,
            &ass,
            "logs",
            json!({"chunks": [{"seq": 0, "stream": "stdin", "offset": 0, "text": ""}]}),
        )
        .await;
    assert_eq!(bad.status, StatusCode::UNPROCESSABLE_ENTITY, "{}", bad.body);

    // Once the result is in, GET answers the result's logs and live output is refused.
    let done = api
        .report(
            "w1",
            &token,
            &ass,
            "result",
            json!({"outcome": "completed", "exit_code": 0, "stdout": "a\n", "stderr": "oops\n"}),
        )
        .await;
    assert_eq!(done.status, StatusCode::OK, "{}", done.body);
    let logs = api
        .call(
            Method::GET,
            &format!("/v1/tasks/{task_id}/logs"),
            ALICE,
            None,
        )
        .await;
    assert_eq!(
        logs.body,
        json!({"task_id": task_id, "logs": "a\n", "truncated": false, "stderr": "oops\n",
            "stderr_truncated": false})
    );
    let late = api
        .report(
            "w1",
            &token,
            &ass,
            "logs",
            json!({"chunks": [live(9, "stdout", 0, "x")]}),
        )
        .await;
    assert_eq!(
        (late.status, late.code()),
        (StatusCode::CONFLICT, "assignment_superseded")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn following_logs_streams_chunks_as_they_come_then_an_end_event() {
    let api = Arc::new(Api::new(Limits::default()));
    let (task_id, token, ass) = api.running_task("echo a; sleep 1; echo b").await;
    api.report(
        "w1",
        &token,
        &ass,
        "logs",
        json!({"chunks": [live(0, "stdout", 0, "a\n")]}),
    )
    .await;
    let request = Request::builder()
        .uri(format!("/v1/tasks/{task_id}/logs?follow=true"))
        .header(header::AUTHORIZATION, format!("Bearer {ALICE}"))
        .body(Body::empty())
        .unwrap();
    let response = api.app.clone().oneshot(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(
        response.headers()[header::CONTENT_TYPE],
        "text/event-stream"
    );
    let mut body = response.into_body();
    // The first event comes while the task still runs.
    let first = tokio::time::timeout(Duration::from_secs(5), body.frame())
        .await
        .expect("an event while the task runs")
        .unwrap()
        .unwrap()
        .into_data()
        .unwrap();
    let first = String::from_utf8(first.to_vec()).unwrap();
    assert!(first.contains("event: log"), "{first}");
    assert!(first.contains(r#""text":"a\n""#), "{first}");

    api.report(
        "w1",
        &token,
        &ass,
        "logs",
        json!({"chunks": [live(1, "stdout", 2, "b\n")]}),
    )
    .await;
    api.report(
        "w1",
        &token,
        &ass,
        "result",
        json!({"outcome": "failed", "exit_code": 3, "stdout": "a\nb\n"}),
    )
    .await;
    let rest = tokio::time::timeout(Duration::from_secs(10), body.collect())
        .await
        .expect("the stream ends with the task")
        .unwrap()
        .to_bytes();
    let rest = String::from_utf8(rest.to_vec()).unwrap();
    let b = rest.find(r#""text":"b\n""#).expect(&rest);
    let end = rest.find("event: end").expect(&rest);
    assert!(b < end, "{rest}");
    assert!(rest.contains(r#""status":"failed""#), "{rest}");
    assert!(rest.contains(r#""exit_code":3"#), "{rest}");
    assert!(!rest.contains(r#""text":"a\n""#), "a is sent once: {rest}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn output_files_are_uploaded_listed_and_downloaded_by_their_owner_only() {
    let api = Api::new(Limits {
        max_output_bytes: 16,
        ..Limits::default()
    });
    let (task_id, token, ass) = api.running_task("true").await;
    let upload = |path: &str| format!("/v1/workers/w1/assignments/{ass}/outputs?path={path}");
    let (status, _, body) = api
        .call_raw(Method::POST, &upload("d/f.txt"), &token, b"data\n".to_vec())
        .await;
    assert_eq!(status, StatusCode::OK, "{}", String::from_utf8_lossy(&body));
    // Over the task's bound (16 bytes in all).
    let (status, _, body) = api
        .call_raw(Method::POST, &upload("big"), &token, vec![0; 12])
        .await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    assert!(String::from_utf8_lossy(&body).contains("outputs_too_large"));
    for bad in ["..%2Fx", "%2Fetc%2Fpasswd", "a%2F%2Fb"] {
        let (status, _, body) = api
            .call_raw(Method::POST, &upload(bad), &token, b"x".to_vec())
            .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{bad}");
        assert!(String::from_utf8_lossy(&body).contains("invalid_path"));
    }
    let (status, _, body) = api
        .call_raw(
            Method::POST,
            &format!("/v1/workers/w1/assignments/{ass}/outputs"),
            &token,
            b"x".to_vec(),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(String::from_utf8_lossy(&body).contains("invalid_query"));

    let list = api
        .call(
            Method::GET,
            &format!("/v1/tasks/{task_id}/outputs"),
            ALICE,
            None,
        )
        .await;
    assert_eq!(list.status, StatusCode::OK, "{}", list.body);
    assert_eq!(list.body["files"].as_array().unwrap().len(), 1);
    assert_eq!(list.body["files"][0]["path"], "d/f.txt");
    assert_eq!(list.body["files"][0]["size_bytes"], 5);

    let file = format!("/v1/tasks/{task_id}/outputs/d/f.txt");
    let (status, content_type, bytes) = api.call_raw(Method::GET, &file, ALICE, vec![]).await;
    assert_eq!(
        (status, content_type.as_str(), bytes.as_slice()),
        (
            StatusCode::OK,
            "application/octet-stream",
            b"data\n".as_slice()
        )
    );
    let (status, _, _) = api.call_raw(Method::GET, &file, BOB, vec![]).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, _, body) = api
        .call_raw(
            Method::GET,
            &format!("/v1/tasks/{task_id}/outputs/d/missing"),
            ALICE,
            vec![],
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(String::from_utf8_lossy(&body).contains("output_not_found"));

    // After the result, the assignment takes no more files.
    api.report(
        "w1",
        &token,
        &ass,
        "result",
        json!({"outcome": "completed", "exit_code": 0}),
    )
    .await;
    let (status, _, _) = api
        .call_raw(Method::POST, &upload("late"), &token, b"x".to_vec())
        .await;
    assert_eq!(status, StatusCode::CONFLICT);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiting_submission_answers_with_the_result_when_the_task_ends_in_time() {
    let api = Arc::new(Api::new(Limits::default()));
    let token = api.register("w1", 4.0).await;
    // The worker side: place the task once submitted, report it finished.
    let worker = {
        let (api, token) = (api.clone(), token.clone());
        tokio::spawn(async move {
            loop {
                api.scheduler.cycle().await;
                let work = api.work("w1", &token, "").await.body["work"].clone();
                if let Some(ass) = work[0]["ass_id"].as_str() {
                    let done = api
                        .report(
                            "w1",
                            &token,
                            ass,
                            "result",
                            json!({"outcome": "completed", "exit_code": 0, "stdout": "hello\n"}),
                        )
                        .await;
                    assert_eq!(done.status, StatusCode::OK, "{}", done.body);
                    return;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };
    let reply = api
        .call(
            Method::POST,
            "/v1/tasks?wait=10s",
            ALICE,
            Some(json!({"docker_image": "busybox", "command": "echo hello"})),
        )
        .await;
    worker.await.unwrap();
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
    assert_eq!(reply.body["status"], "completed");
    assert_eq!(reply.body["result"]["logs"], "hello\n");
    assert_eq!(reply.body["result"]["exit_code"], 0);

    // Nobody runs this one: 202 with the task after the wait.
    let started = Instant::now();
    let pending = api
        .call(
            Method::POST,
            "/v1/tasks?wait=300ms",
            ALICE,
            Some(json!({"docker_image": "busybox", "req_cpu": 64})),
        )
        .await;
    assert_eq!(pending.status, StatusCode::ACCEPTED, "{}", pending.body);
    assert!(started.elapsed() >= Duration::from_millis(300));
    assert!(pending.body["task_id"].is_string());
    assert!(pending.body.get("result").is_none());

    for bad in ["301s", "soon", "-1"] {
        let reply = api
            .call(
                Method::POST,
                &format!("/v1/tasks?wait={bad}"),
                ALICE,
                Some(json!({"docker_image": "busybox"})),
            )
            .await;
        assert_eq!(
            (reply.status, reply.code()),
            (StatusCode::UNPROCESSABLE_ENTITY, "validation_failed"),
            "{bad}"
        );
        assert!(
            reply.body["error"]["message"]
                .as_str()
                .unwrap()
                .contains("wait"),
            "{}",
            reply.body
        );
    }
}

/// The version of a worker's work list changes when the host changes its work, not when the
/// worker reports a start: a worker long-polling from the version it has is not woken by its
/// own report.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_work_version_changes_with_the_hosts_changes_not_with_the_workers_start_report() {
    let api = Api::new(Limits::default());
    let (task_id, token, ass) = api.running_task("true").await;
    let before = api.work("w1", &token, "").await.body["version"].clone();
    let started = api.report("w1", &token, &ass, "started", json!({})).await;
    assert_eq!(started.status, StatusCode::OK, "{}", started.body);
    let after_start = api.work("w1", &token, "").await.body;
    assert_eq!(
        after_start["version"], before,
        "a start report is the worker's own news"
    );
    assert!(after_start["work"][0]["started_at"].is_string());
    let cancel = api
        .call(
            Method::POST,
            &format!("/v1/tasks/{task_id}/cancel"),
            ALICE,
            None,
        )
        .await;
    assert!(cancel.status.is_success(), "{}", cancel.body);
    let after_cancel = api.work("w1", &token, "").await.body;
    assert_ne!(
        after_cancel["version"], before,
        "a cancellation is the host's"
    );
    assert_eq!(after_cancel["work"][0]["cancel"], true);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_of_reports_applies_each_as_the_one_report_endpoints_do() {
    let api = Api::new(Limits::default());
    let token = api.register("w1", 8.0).await;
    let mut tasks = Vec::new();
    for _ in 0..4 {
        tasks.push(
            api.submit_and_place(json!({"docker_image": "busybox", "command": "true"}))
                .await,
        );
    }
    let work = api.work("w1", &token, "").await.body["work"].clone();
    let ass: Vec<String> = work
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["ass_id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(ass.len(), 4, "{work}");
    let reports = json!({"reports": [
        // Started and ended in one report.
        {"ass_id": ass[0], "started": true,
         "result": {"outcome": "completed", "exit_code": 0, "stdout": "ok\n"}},
        // Started only.
        {"ass_id": ass[1], "started": true},
        // Ended with a failure, its start never reported.
        {"ass_id": ass[2], "result": {"outcome": "failed", "exit_code": 3}},
        // Not this worker's: refused alone.
        {"ass_id": "ass-nobody", "started": true},
    ]});
    let reply = api
        .call(
            Method::POST,
            "/v1/workers/w1/reports",
            &token,
            Some(reports.clone()),
        )
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
    let acks = reply.body["acks"].as_array().unwrap();
    assert_eq!(acks.len(), 4);
    let order: Vec<&str> = acks.iter().map(|a| a["ass_id"].as_str().unwrap()).collect();
    assert_eq!(
        order,
        vec![&*ass[0], &*ass[1], &*ass[2], "ass-nobody"],
        "in request order"
    );
    assert_eq!(acks[0]["status"], "completed");
    assert_eq!(acks[1]["status"], "running");
    assert_eq!(acks[2]["status"], "failed");
    assert_eq!(
        acks[3]["error"]["code"], "assignment_not_found",
        "{}",
        acks[3]
    );
    for ack in &acks[..3] {
        assert!(ack["error"].is_null(), "{ack}");
    }
    let first = api.store.get_task(&tasks[0]).await.unwrap();
    assert_eq!(first.status, TaskStatus::Completed);
    assert!(first.started_at.is_some());
    let result = api
        .call(
            Method::GET,
            &format!("/v1/tasks/{}/result", tasks[0]),
            ALICE,
            None,
        )
        .await;
    assert_eq!(result.body["logs"], "ok\n", "{}", result.body);
    let second = api.store.get_task(&tasks[1]).await.unwrap();
    assert_eq!(
        (second.status, second.started_at.is_some()),
        (TaskStatus::Running, true)
    );
    assert_eq!(
        api.store.get_task(&tasks[2]).await.unwrap().exit_code,
        Some(3)
    );
    // Two tasks still hold their reservation (started, and untouched).
    assert_eq!(api.allocated_cpu("w1").await, 2.0);

    // The same batch again (its answer was lost): the same outcomes, nothing released twice.
    let again = api
        .call(
            Method::POST,
            "/v1/workers/w1/reports",
            &token,
            Some(reports),
        )
        .await;
    assert_eq!(again.status, StatusCode::OK, "{}", again.body);
    assert_eq!(again.body["acks"][0]["status"], "completed");
    assert_eq!(again.body["acks"][2]["status"], "failed");
    assert_eq!(api.allocated_cpu("w1").await, 2.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_or_foreign_batch_of_reports_is_refused_whole() {
    let api = Api::new(Limits::default());
    let (task_id, token, ass) = api.running_task("true").await;
    let other = api.register("w2", 4.0).await;
    let post = |token: String, body: Value| {
        let api = &api;
        async move {
            api.call(Method::POST, "/v1/workers/w1/reports", &token, Some(body))
                .await
        }
    };
    let too_many: Vec<Value> = (0..1001)
        .map(|i| json!({"ass_id": format!("ass-{i}"), "started": true}))
        .collect();
    for (body, why) in [
        (json!({"reports": []}), "empty"),
        (json!({"reports": too_many}), "over 1000"),
        (
            json!({"reports": [{"ass_id": ass, "started": true}, {"ass_id": ass, "started": true}]}),
            "an assignment twice",
        ),
        (
            json!({"reports": [{"ass_id": ass}]}),
            "a report that says nothing",
        ),
        (
            json!({"reports": [{"ass_id": ass, "result": {"outcome": "failed", "exit_code": "x"}}]}),
            "a failed result with an exit code that is not a number",
        ),
        (
            json!({"reports": [{"ass_id": ass, "started": true, "extra": 1}]}),
            "an unknown field",
        ),
    ] {
        let reply = post(token.clone(), body).await;
        assert_eq!(
            reply.status,
            StatusCode::UNPROCESSABLE_ENTITY,
            "{why}: {}",
            reply.body
        );
    }
    let foreign = post(
        other,
        json!({"reports": [{"ass_id": ass, "started": true}]}),
    )
    .await;
    assert_eq!(foreign.status, StatusCode::FORBIDDEN, "{}", foreign.body);
    let task = api.store.get_task(&task_id).await.unwrap();
    assert_eq!(
        (task.status, task.started_at),
        (TaskStatus::Running, None),
        "nothing applied"
    );
}

/// A failure reported without its exit code, or an error without its reason, still ends the
/// attempt; the task's error says what is known.
#[tokio::test]
async fn an_ending_reported_without_its_details_still_ends_the_attempt() {
    for (report, error) in [
        (
            json!({"outcome": "failed"}),
            "exited with a non-zero code the worker did not report",
        ),
        (json!({"outcome": "error"}), "the worker could not run it"),
    ] {
        let api = Api::new(Limits::default());
        let (task_id, token, ass) = api.running_task("true").await;
        let reply = api
            .report("w1", &token, &ass, "result", report.clone())
            .await;
        assert_eq!(reply.status, StatusCode::OK, "{report}: {}", reply.body);
        let task = api
            .call(Method::GET, &format!("/v1/tasks/{task_id}"), ALICE, None)
            .await;
        assert_eq!(task.body["status"], "failed", "{report}: {}", task.body);
        assert_eq!(task.body["status_reason"], error, "{report}: {}", task.body);
    }
}

/// The worker protocol's routes, which the router serves and the worker calls from one place
/// (`protocol::route`), are the ones the OpenAPI document names.
#[test]
fn every_worker_protocol_route_is_in_the_openapi_document() {
    use utoipa::OpenApi as _;
    let doc = crate::openapi::ApiDoc::openapi();
    for template in crate::protocol::route::ALL {
        assert!(
            doc.paths.paths.contains_key(template),
            "{template} is not in the OpenAPI document"
        );
    }
}
