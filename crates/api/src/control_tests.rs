//! The control plane (admission, placement, the reconciler) through the HTTP API: what a
//! request sees while the scheduler's passes and the reconciler run beside it.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{Method, Request, StatusCode, header};
use cloudai_control::testing::{
    Guard, active_of, add_worker, assert_accounting, config, go_silent, held_tick, lifecycle,
    policies, reconciler, scheduler_config, sqlite,
};
use http_body_util::BodyExt;
use serde_json::{Value, json};
use tower::ServiceExt;

use super::auth::{Authenticator, Role, TokenEntry, token_sha256_hex};
use super::{AppState, Limits};
use crate::lifecycle::{Admitted, Cause, Finish};
use crate::model::{Resources, TaskStatus};
use crate::policy::testing::{guest, wasm_dir};
use crate::policy::{AdmissionDecision, PolicyRuntime};
use crate::scheduler::{Scheduler, SchedulerConfig, Wakeup, WorkSignal};
use crate::store::Store;
use crate::store::conformance::{sample_task, unique_id};

const ALICE: &str = "cai_u_alice_0123456789abcdef";

struct Api {
    app: axum::Router,
    store: Arc<dyn Store>,
    policies: Arc<PolicyRuntime>,
    wakeup: Wakeup,
    _guard: Guard,
}

fn api() -> Api {
    let (store, guard) = sqlite();
    let policies = policies();
    let wakeup = Wakeup::new();
    let state = AppState {
        store: store.clone(),
        lifecycle: lifecycle(&store, &wakeup),
        auth: Arc::new(Authenticator::new(
            vec![TokenEntry {
                user_id: "alice".into(),
                role: Role::User,
                token_sha256: token_sha256_hex(ALICE),
            }],
            None,
        )),
        limits: Arc::new(Limits::default()),
        policies: policies.clone(),
        work: WorkSignal::new(),
    };
    Api {
        app: super::router(state),
        store,
        policies,
        wakeup,
        _guard: guard,
    }
}

impl Api {
    async fn submit(&self, spec: Value) -> (StatusCode, Value) {
        let request = Request::builder()
            .method(Method::POST)
            .uri("/v1/tasks")
            .header(header::AUTHORIZATION, format!("Bearer {ALICE}"))
            .header(header::CONTENT_TYPE, "application/json")
            .body(Body::from(spec.to_string()))
            .unwrap();
        let response = self.app.clone().oneshot(request).await.unwrap();
        let status = response.status();
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        (status, serde_json::from_slice(&bytes).unwrap())
    }

    fn scheduler(&self) -> Scheduler {
        Scheduler::new(
            self.store.clone(),
            self.policies.clone(),
            self.wakeup.clone(),
            config(100),
        )
    }
}

/// Submissions while admission passes run back to back (no back-off: every fresh task is
/// due to the pass at once): whichever admits a task first, each answer is a documented one,
/// 201 with the task queued or further along (the inline check that lost the race answers
/// with the task as the pass left it), never a 202 with an admitted task or a warning's
/// fallback.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn submissions_racing_the_admission_pass_get_the_documented_answers() {
    const CLIENTS: usize = 8;
    const EACH: usize = 40;
    let api = Arc::new(api());
    let scheduler = api.scheduler();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let passes = tokio::spawn({
        let stop = stop.clone();
        async move {
            let mut admitted_by_pass = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                admitted_by_pass += scheduler.admission_pass().await.unwrap().queued;
                tokio::task::yield_now().await;
            }
            admitted_by_pass
        }
    });
    let clients: Vec<_> = (0..CLIENTS)
        .map(|_| {
            let api = api.clone();
            tokio::spawn(async move {
                let mut answers = Vec::new();
                for _ in 0..EACH {
                    let (status, body) = api.submit(json!({"docker_image": "busybox"})).await;
                    answers.push((status, body["status"].as_str().unwrap_or("").to_string()));
                }
                answers
            })
        })
        .collect();
    let mut answers = Vec::new();
    for client in clients {
        answers.extend(client.await.unwrap());
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let admitted_by_pass = passes.await.unwrap();
    assert_eq!(answers.len(), CLIENTS * EACH);
    for (status, task_status) in &answers {
        assert_eq!(
            (*status, task_status.as_str()),
            (StatusCode::CREATED, "queued"),
            "no admission policy is active: every task is admitted, by its submission or a pass"
        );
    }
    // Each task admitted once: every one is queued, none counted twice by the passes.
    let counts = api.store.task_counts().await.unwrap();
    assert_eq!(
        (counts.pending, counts.queued),
        (0, (CLIENTS * EACH) as u64)
    );
    assert!(
        admitted_by_pass > 0,
        "the passes never admitted a task first: the race was not exercised"
    );
    println!(
        "the admission passes admitted {admitted_by_pass} of {} tasks first",
        CLIENTS * EACH
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_submitted_task_is_placed_on_the_wakeup_not_the_timer() {
    let api = api();
    add_worker(&*api.store, Resources::new(4.0, 8.0, 10.0, 0.0)).await;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(api.scheduler().run(async {
        let _ = stopped.await;
    }));
    // Let the first (empty) cycle pass: from now on only a wake-up starts a round.
    tokio::time::sleep(Duration::from_millis(200)).await;

    let (status, body) = api.submit(json!({"docker_image": "busybox"})).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    assert_eq!(body["status"], "queued", "admitted inline: {body}");
    let id = body["task_id"].as_str().unwrap().to_string();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        if api.store.get_task(&id).await.unwrap().status == TaskStatus::Running {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "not placed within 5 s of its wake-up"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    stop.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(5), running)
        .await
        .expect("the scheduler stops on shutdown")
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn request_caps_rejects_an_over_cap_submission_with_403_and_admits_the_rest() {
    let Some(dir) = wasm_dir() else { return };
    let api = api();
    let bytes = guest(&dir, "request-caps");
    api.policies
        .load("request-caps", "1", &bytes, r#"{"max_cpu": 2}"#)
        .unwrap();
    api.policies.activate("request-caps", "1").unwrap();
    add_worker(&*api.store, Resources::new(8.0, 8.0, 10.0, 0.0)).await;

    let (status, body) = api
        .submit(json!({"docker_image": "busybox", "req_cpu": 4}))
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    assert_eq!(body["error"]["code"], "admission_rejected");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.contains("cpu"), "{message}");
    let rejected_id = message
        .split_whitespace()
        .find(|w| w.starts_with("task-"))
        .expect("the message names the task");
    let rejected = api.store.get_task(rejected_id).await.unwrap();
    assert_eq!(rejected.status, TaskStatus::Failed);
    assert!(
        rejected
            .error
            .as_deref()
            .is_some_and(|e| message.contains(e)),
        "{rejected:?}"
    );

    let (status, body) = api
        .submit(json!({"docker_image": "busybox", "req_cpu": 2}))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    assert_eq!(body["status"], "queued");
    api.scheduler().cycle().await;
    let id = body["task_id"].as_str().unwrap();
    assert_eq!(
        api.store.get_task(id).await.unwrap().status,
        TaskStatus::Running
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_deferred_task_stays_pending_with_its_reason_until_the_backoff_then_is_checked_again() {
    let (store, _guard) = sqlite();
    let mut task = sample_task(&unique_id("task"), "alice");
    task.updated_at -= chrono::Duration::seconds(10);
    let task = store.insert_task(&task, None).await.unwrap().task;
    let deferred = lifecycle(&store, &Wakeup::new())
        .admit(&task, AdmissionDecision::Defer("quota full".into()))
        .await
        .unwrap();
    let Admitted::Deferred { task: after, .. } = deferred else {
        panic!("expected a deferral: {deferred:?}")
    };
    assert_eq!(after.status, TaskStatus::Pending);
    assert_eq!(after.status_reason.as_deref(), Some("quota full"));

    // Within the back-off: not checked again.
    let patient = Scheduler::new(
        store.clone(),
        policies(),
        Wakeup::new(),
        SchedulerConfig {
            admission_backoff: Duration::from_secs(3600),
            ..config(100)
        },
    );
    assert_eq!(patient.admission_pass().await.unwrap().checked, 0);
    // After it: checked again, and accepted (no admission policy is active).
    let stats = Scheduler::new(store.clone(), policies(), Wakeup::new(), config(100))
        .admission_pass()
        .await
        .unwrap();
    assert_eq!((stats.checked, stats.queued), (1, 1));
    let queued = store.get_task(&task.task_id).await.unwrap();
    assert_eq!(queued.status, TaskStatus::Queued);
    assert_eq!(queued.status_reason, None);
}

/// When a user's usage goes down, the pass checks that user's deferred tasks at once, but not
/// the ones never checked: those are their submissions' to admit inline (deciding them here
/// too raced the submission's answer).
#[tokio::test]
async fn a_usage_change_brings_deferred_tasks_forward_not_the_ones_being_submitted() {
    let (store, _guard) = sqlite();
    let fresh = store
        .insert_task(&sample_task(&unique_id("task"), "alice"), None)
        .await
        .unwrap()
        .task;
    let deferred = store
        .insert_task(&sample_task(&unique_id("task"), "alice"), None)
        .await
        .unwrap()
        .task;
    lifecycle(&store, &Wakeup::new())
        .admit(&deferred, AdmissionDecision::Defer("quota full".into()))
        .await
        .unwrap();
    let wakeup = Wakeup::new();
    let patient = Scheduler::new(
        store.clone(),
        policies(),
        wakeup.clone(),
        SchedulerConfig {
            admission_backoff: Duration::from_secs(3600),
            ..config(100)
        },
    );
    wakeup.usage_changed("alice");
    let stats = patient.admission_pass().await.unwrap();
    assert_eq!((stats.checked, stats.queued), (1, 1), "{stats:?}");
    let status = |id: String| {
        let store = store.clone();
        async move { store.get_task(&id).await.unwrap().status }
    };
    assert_eq!(status(deferred.task_id.clone()).await, TaskStatus::Queued);
    assert_eq!(status(fresh.task_id.clone()).await, TaskStatus::Pending);
}

/// A deferral lasts until the back-off, unless one of the user's tasks ends first: then the
/// deferred task is checked again in the next pass.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_deferred_task_is_checked_again_as_soon_as_its_users_usage_goes_down() {
    let Some(dir) = wasm_dir() else { return };
    let (store, _guard) = sqlite();
    add_worker(&*store, Resources::new(8.0, 16.0, 100.0, 0.0)).await;
    let policies = policies();
    let quota = r#"{"default": {"max_running_tasks": 1, "max_queued_and_running_tasks": 1}}"#;
    policies
        .load("quota", "1", &guest(&dir, "quota"), quota)
        .unwrap();
    policies.activate("quota", "1").unwrap();
    let wakeup = Wakeup::new();
    let s = Scheduler::new(
        store.clone(),
        policies,
        wakeup.clone(),
        SchedulerConfig {
            admission_backoff: Duration::from_secs(3600),
            ..config(100)
        },
    );
    // Submitted long ago, never checked: due whatever the back-off (the API admits inline).
    let submitted = || {
        let mut task = sample_task(&unique_id("task"), "alice");
        task.updated_at -= chrono::Duration::hours(2);
        task
    };
    let first = store.insert_task(&submitted(), None).await.unwrap().task;
    s.cycle().await;
    assert_eq!(
        store.get_task(&first.task_id).await.unwrap().status,
        TaskStatus::Running
    );
    let second = store.insert_task(&submitted(), None).await.unwrap().task;
    s.cycle().await;
    let deferred = store.get_task(&second.task_id).await.unwrap();
    assert_eq!(
        deferred.status,
        TaskStatus::Pending,
        "deferred by the quota"
    );
    assert!(deferred.status_reason.is_some());
    s.cycle().await;
    assert_eq!(
        store.get_task(&second.task_id).await.unwrap().status,
        TaskStatus::Pending,
        "within its back-off, nothing changed: not checked again"
    );

    lifecycle(&store, &wakeup)
        .finish_task(
            &first.task_id,
            Finish::Completed { exit_code: 0 },
            Cause::Worker,
        )
        .await
        .unwrap();
    s.cycle().await;
    assert_eq!(
        store.get_task(&second.task_id).await.unwrap().status,
        TaskStatus::Running,
        "admitted and placed right after the first task ended, an hour before its back-off"
    );
}

// ------------------------------------------------------------------------------------------
// The reconciler beside the API.

/// Through the HTTP API: a worker declared lost heartbeats again and its heartbeat answer
/// already shows it active (one store write on the usual path, no read before it).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_lost_worker_heartbeating_through_the_api_is_active_again() {
    const JOIN: &str = "cai_j_reconciler_test_join_token";
    let (store, _guard) = sqlite();
    let wakeup = Wakeup::new();
    let app = super::router(AppState {
        store: store.clone(),
        lifecycle: crate::lifecycle::Lifecycle::new(store.clone(), wakeup.clone()),
        auth: Arc::new(Authenticator::new(Vec::new(), Some(token_sha256_hex(JOIN)))),
        limits: Arc::new(Limits::default()),
        policies: policies(),
        work: crate::scheduler::WorkSignal::new(),
    });
    let call = |uri: String, token: String, body: serde_json::Value| {
        let app = app.clone();
        async move {
            let request = Request::builder()
                .method(Method::POST)
                .uri(uri)
                .header(header::AUTHORIZATION, format!("Bearer {token}"))
                .header(header::CONTENT_TYPE, "application/json")
                .body(Body::from(body.to_string()))
                .unwrap();
            let response = app.oneshot(request).await.unwrap();
            let status = response.status();
            let bytes = response.into_body().collect().await.unwrap().to_bytes();
            (
                status,
                serde_json::from_slice::<serde_json::Value>(&bytes).unwrap(),
            )
        }
    };
    let (status, body) = call(
        "/v1/workers".into(),
        JOIN.into(),
        serde_json::json!({"worker_id": "w1", "worker_ip": "127.0.0.1:7070",
            "total_cpu": 4, "total_memory": 8, "total_storage": 10, "total_gpu": 0}),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let token = body["token"].as_str().unwrap().to_string();
    let task = {
        let mut task = sample_task(&unique_id("task"), "alice");
        task.status = TaskStatus::Queued;
        (task.req_cpu, task.req_memory, task.req_storage) = (4.0, 1.0, 0.0);
        task.max_attempts = 3;
        store.insert_task(&task, None).await.unwrap().task
    };
    Scheduler::new(
        store.clone(),
        policies(),
        wakeup.clone(),
        scheduler_config(),
    )
    .cycle()
    .await;

    go_silent(&*store, "w1").await;
    let mut r = reconciler(&store, &wakeup, Duration::from_secs(5));
    let repairs = held_tick(&mut r).await;
    assert_eq!((repairs.workers_lost, repairs.tasks_requeued), (1, 1));
    let _ = tokio::time::timeout(Duration::from_millis(10), wakeup.woken()).await;

    let (status, body) = call(
        "/v1/workers/w1/heartbeat".into(),
        token,
        serde_json::json!({}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["worker"]["is_active"], true, "{body}");
    assert_eq!(body["worker"]["allocated_cpu"], 0.0, "{body}");
    tokio::time::timeout(Duration::from_secs(1), wakeup.woken())
        .await
        .expect("a returning worker wakes the scheduler");
    // And it gets the re-queued task again, as a second attempt.
    Scheduler::new(
        store.clone(),
        policies(),
        wakeup.clone(),
        scheduler_config(),
    )
    .cycle()
    .await;
    let again = active_of(&*store, &task.task_id).await;
    assert_eq!((again.worker_id.as_str(), again.attempt), ("w1", 2));
    assert_accounting(&*store).await;
}
