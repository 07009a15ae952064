//! Scheduler tests on real stores: SQLite in a tempdir, and MongoDB (FerretDB here) when
//! `CLOUDAI_TEST_MONGODB_URI` is set (skipped with a message otherwise, a failure under `CI`).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{Method, Request, StatusCode, header};
use http_body_util::BodyExt;
use serde_json::{Value, json};
use tower::ServiceExt;

use super::*;
use crate::api::auth::{Authenticator, Role, TokenEntry, token_sha256_hex};
use crate::api::{AppState, Limits};
use crate::lifecycle::{Admitted, Cause, Finish, Lifecycle};
use crate::model::{Resources, Task, TaskStatus, Worker};
use crate::policy::AdmissionDecision;
use crate::policy::{EngineSettings, PolicyEngine, RuntimeSettings};
use crate::store::conformance::{sample_task, sample_worker, unique_id};
use crate::store::sqlite::SqliteStore;
use crate::store::{AssignmentFilter, StoreError, TaskUpdate};

mod policies;

const ALICE: &str = "cai_u_alice_0123456789abcdef";

pub(crate) type Guard = Box<dyn std::any::Any + Send + Sync>;

/// The lifecycle over `store` that wakes `wakeup`, publishing nothing.
pub(crate) fn lifecycle(store: &Arc<dyn Store>, wakeup: &Wakeup) -> Lifecycle {
    Lifecycle::new(store.clone(), wakeup.clone())
}

pub(crate) fn sqlite() -> (Arc<dyn Store>, Guard) {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open_in_dir(dir.path()).unwrap();
    (Arc::new(store), Box::new(dir))
}

pub(crate) async fn mongo() -> Option<(Arc<dyn Store>, Guard)> {
    let (store, guard) = crate::store::mongo::testing::connect_test_store().await?;
    Some((Arc::new(store), Box::new(guard)))
}

pub(crate) fn policies() -> Arc<PolicyRuntime> {
    Arc::new(PolicyRuntime::new(
        PolicyEngine::new(EngineSettings::default()).unwrap(),
        RuntimeSettings::default(),
    ))
}

/// A config for tests: no timer to speak of (rounds run when the test says so), no back-off,
/// and workers fresh for 50 s after their last heartbeat (the simulated workers never beat
/// again; a test on a loaded FerretDB can outlast the default 15 s). A heartbeat a minute old
/// is still stale.
pub(crate) fn config(batch_size: u32) -> SchedulerConfig {
    SchedulerConfig {
        batch_size,
        round_interval: Duration::from_secs(3600),
        admission_backoff: Duration::ZERO,
        heartbeat_staleness: Duration::from_secs(50),
        ..SchedulerConfig::default()
    }
}

pub(crate) fn scheduler(store: &Arc<dyn Store>, batch_size: u32) -> Scheduler {
    Scheduler::new(store.clone(), policies(), Wakeup::new(), config(batch_size))
}

pub(crate) async fn add_worker(store: &dyn Store, total: Resources) -> Worker {
    let worker = sample_worker(&unique_id("w"), total);
    store.insert_worker(&worker).await.unwrap();
    worker
}

/// A queued task of `user` asking for `cpu` cores and 1 GB, `age_ms` old.
pub(crate) async fn queued(
    store: &dyn Store,
    user: &str,
    cpu: f64,
    priority: i32,
    age_ms: i64,
) -> Task {
    let mut task = sample_task(&unique_id("task"), user);
    task.status = TaskStatus::Queued;
    (task.req_cpu, task.req_memory, task.req_storage) = (cpu, 1.0, 0.0);
    task.priority = priority;
    task.created_at -= chrono::Duration::milliseconds(age_ms);
    store.insert_task(&task, None).await.unwrap().task
}

pub(crate) async fn active_assignments(
    store: &dyn Store,
    filter: AssignmentFilter,
) -> Vec<crate::model::Assignment> {
    store
        .list_assignments(&AssignmentFilter {
            active_only: true,
            ..filter
        })
        .await
        .unwrap()
}

/// The invariant of docs/consistency.md on every worker, exactly: `0 <= allocated <= total`,
/// `available = total - allocated`, `allocated` = the sum of its active assignments.
pub(crate) async fn assert_accounting(store: &dyn Store) {
    for worker in store.list_workers().await.unwrap() {
        assert_eq!(worker.invariant_violations(), Vec::<String>::new());
        let mut sum = Resources::default();
        for a in active_assignments(
            store,
            AssignmentFilter {
                worker_id: Some(worker.worker_id.clone()),
                ..AssignmentFilter::default()
            },
        )
        .await
        {
            sum.cpu += a.req_cpu;
            sum.memory += a.req_memory;
            sum.storage += a.req_storage;
            sum.gpu += a.req_gpu;
        }
        assert_eq!(worker.allocated(), sum, "worker {}", worker.worker_id);
    }
}

// ------------------------------------------------------------------------------------------

async fn placed_tasks_get_an_assignment_with_the_reserved_amounts(store: Arc<dyn Store>) {
    let w1 = add_worker(&*store, Resources::new(4.0, 16.0, 100.0, 0.0)).await;
    let w2 = add_worker(&*store, Resources::new(2.0, 4.0, 100.0, 0.0)).await;
    let mut tasks = Vec::new();
    for cpu in [1.0, 2.0, 0.5, 2.0] {
        tasks.push(queued(&*store, "alice", cpu, 0, 0).await);
    }
    scheduler(&store, 100).cycle().await;

    for task in &tasks {
        let after = store.get_task(&task.task_id).await.unwrap();
        assert_eq!(after.status, TaskStatus::Running, "{}", task.task_id);
        assert_eq!(after.attempts, 1);
        assert_eq!((after.owner, after.started_at), (None, None));
        let active = active_assignments(
            &*store,
            AssignmentFilter {
                task_id: Some(task.task_id.clone()),
                ..AssignmentFilter::default()
            },
        )
        .await;
        assert_eq!(active.len(), 1, "one assignment per task");
        assert_eq!(active[0].request(), task.request());
        assert_eq!(active[0].attempt, 1);
        assert!([&w1.worker_id, &w2.worker_id].contains(&&active[0].worker_id));
    }
    assert_accounting(&*store).await;
    let total: f64 = store
        .list_workers()
        .await
        .unwrap()
        .iter()
        .map(|w| w.allocated_cpu)
        .sum();
    assert_eq!(total, 5.5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sqlite_placed_tasks_get_an_assignment_with_the_reserved_amounts() {
    let (store, _guard) = sqlite();
    placed_tasks_get_an_assignment_with_the_reserved_amounts(store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn mongo_placed_tasks_get_an_assignment_with_the_reserved_amounts() {
    let Some((store, _guard)) = mongo().await else {
        return;
    };
    placed_tasks_get_an_assignment_with_the_reserved_amounts(store).await;
}

/// Two replicas (two schedulers with their own owner ids) on one store, 200 tasks on three
/// workers with room for 12: every worker within capacity, no task placed twice, the rest
/// queued with a wait reason.
async fn two_replicas_never_overcommit_or_place_a_task_twice(store: Arc<dyn Store>) {
    for _ in 0..3 {
        add_worker(&*store, Resources::new(4.0, 8.0, 10.0, 0.0)).await;
    }
    let mut ids = Vec::new();
    for i in 0..200 {
        let user = ["alice", "bob", "carol"][i % 3];
        ids.push(queued(&*store, user, 1.0, 0, 0).await.task_id);
    }
    let a = scheduler(&store, 256);
    let b = scheduler(&store, 256);
    assert_ne!(a.owner(), b.owner());
    let run = |s: Scheduler| {
        tokio::spawn(async move {
            for _ in 0..3 {
                s.cycle().await;
            }
        })
    };
    let (ra, rb) = tokio::join!(run(a), run(b));
    ra.unwrap();
    rb.unwrap();
    // Races lost on a slow store may leave room for the next round: one more, alone.
    scheduler(&store, 256).cycle().await;

    assert_accounting(&*store).await;
    let mut per_task: HashMap<String, usize> = HashMap::new();
    for a in active_assignments(&*store, AssignmentFilter::default()).await {
        *per_task.entry(a.task_id).or_default() += 1;
    }
    assert!(
        per_task.values().all(|&n| n == 1),
        "a task placed twice: {per_task:?}"
    );
    assert_eq!(per_task.len(), 12, "the three workers have room for 12");
    for id in &ids {
        let task = store.get_task(id).await.unwrap();
        if per_task.contains_key(id) {
            assert_eq!(task.status, TaskStatus::Running);
        } else {
            assert_eq!(task.status, TaskStatus::Queued);
            assert!(task.status_reason.is_some(), "{id} has no wait reason");
            assert_eq!(task.owner, None, "{id} kept a claim");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sqlite_two_replicas_never_overcommit_or_place_a_task_twice() {
    let (store, _guard) = sqlite();
    two_replicas_never_overcommit_or_place_a_task_twice(store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn mongo_two_replicas_never_overcommit_or_place_a_task_twice() {
    let Some((store, _guard)) = mongo().await else {
        return;
    };
    two_replicas_never_overcommit_or_place_a_task_twice(store).await;
}

#[test]
fn fair_order_is_priority_then_users_in_turn_then_age() {
    let task = |id: &str, user: &str, priority: i32, age_s: i64| {
        let mut t = sample_task(id, user);
        t.priority = priority;
        t.created_at -= chrono::Duration::seconds(age_s);
        t
    };
    let tasks = vec![
        task("a1", "alice", 0, 50),
        task("a2", "alice", 0, 40),
        task("a3", "alice", 0, 30),
        task("b1", "bob", 0, 10),
        task("c1", "carol", 5, 1),
        task("b2", "bob", 0, 5),
    ];
    let none = BTreeMap::new();
    let order = placement::fair_order(tasks.clone(), 10, &none);
    let ids: Vec<&str> = order.iter().map(|t| t.task_id.as_str()).collect();
    assert_eq!(ids, ["c1", "a1", "b1", "a2", "b2", "a3"]);
    let ids: Vec<String> = placement::fair_order(tasks.clone(), 3, &none)
        .into_iter()
        .map(|t| t.task_id)
        .collect();
    assert_eq!(ids, ["c1", "a1", "b1"]);
    // Alice already runs two tasks: bob's two come before her next one, though younger.
    let running = BTreeMap::from([("alice".to_string(), 2)]);
    let ids: Vec<String> = placement::fair_order(tasks, 10, &running)
        .into_iter()
        .map(|t| t.task_id)
        .collect();
    assert_eq!(ids, ["c1", "b1", "b2", "a1", "a2", "a3"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_users_many_tasks_do_not_keep_another_users_task_out_of_the_batch() {
    let (store, _guard) = sqlite();
    let mut alice = Vec::new();
    for i in 0..50 {
        alice.push(queued(&*store, "alice", 1.0, 0, 100_000 - i).await);
    }
    let bob = queued(&*store, "bob", 1.0, 0, 0).await;
    let urgent = queued(&*store, "carol", 1.0, 9, 0).await;
    let s = scheduler(&store, 10);
    let batch = s.fair_batch(crate::model::now()).await.unwrap();
    assert_eq!(batch.len(), 10);
    let ids: Vec<&str> = batch.iter().map(|t| t.task_id.as_str()).collect();
    assert_eq!(
        &ids[..4],
        [
            &urgent.task_id,
            &alice[0].task_id,
            &bob.task_id,
            &alice[1].task_id
        ]
    );

    // Observable in placement: room for three tasks goes to carol, alice's oldest and bob.
    add_worker(&*store, Resources::new(3.0, 8.0, 10.0, 0.0)).await;
    s.cycle().await;
    let running: Vec<String> = store
        .list_tasks(&crate::store::TaskQuery {
            status: Some(TaskStatus::Running),
            limit: 100,
            ..Default::default()
        })
        .await
        .unwrap()
        .tasks
        .into_iter()
        .map(|t| t.task_id)
        .collect();
    let mut expected = vec![urgent.task_id, alice[0].task_id.clone(), bob.task_id];
    let mut running_sorted = running.clone();
    running_sorted.sort();
    expected.sort();
    assert_eq!(running_sorted, expected);
}

async fn wait_reason_is_visible_and_an_unschedulable_request_fails(store: Arc<dyn Store>) {
    add_worker(&*store, Resources::new(4.0, 8.0, 10.0, 0.0)).await;
    let first = queued(&*store, "alice", 3.0, 0, 2000).await;
    let second = queued(&*store, "alice", 3.0, 0, 1000).await;
    let huge = queued(&*store, "alice", 64.0, 0, 0).await;
    let s = scheduler(&store, 100);
    s.cycle().await;

    assert_eq!(
        store.get_task(&first.task_id).await.unwrap().status,
        TaskStatus::Running
    );
    let waiting = store.get_task(&second.task_id).await.unwrap();
    assert_eq!(waiting.status, TaskStatus::Queued);
    let reason = waiting.status_reason.clone().expect("a wait reason");
    assert!(!reason.is_empty());
    let failed = store.get_task(&huge.task_id).await.unwrap();
    assert_eq!(failed.status, TaskStatus::Failed);
    assert!(
        failed.error.as_deref().is_some_and(|e| !e.is_empty()),
        "{failed:?}"
    );
    assert_eq!(failed.status_reason, failed.error);

    // Another round with the same reason does not write the task again.
    s.cycle().await;
    assert_eq!(store.get_task(&second.task_id).await.unwrap(), waiting);
    assert_accounting(&*store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sqlite_wait_reason_is_visible_and_an_unschedulable_request_fails() {
    let (store, _guard) = sqlite();
    wait_reason_is_visible_and_an_unschedulable_request_fails(store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn mongo_wait_reason_is_visible_and_an_unschedulable_request_fails() {
    let Some((store, _guard)) = mongo().await else {
        return;
    };
    wait_reason_is_visible_and_an_unschedulable_request_fails(store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn stale_workers_are_not_candidates_and_their_tasks_wait() {
    let (store, _guard) = sqlite();
    let worker = add_worker(&*store, Resources::new(4.0, 8.0, 10.0, 0.0)).await;
    let old = crate::model::now().timestamp() - 60;
    store.heartbeat(&worker.worker_id, old, None).await.unwrap();
    let task = queued(&*store, "alice", 1.0, 0, 0).await;
    let s = scheduler(&store, 100);
    s.cycle().await;
    let after = store.get_task(&task.task_id).await.unwrap();
    assert_eq!(
        after.status,
        TaskStatus::Queued,
        "a stale worker must not get tasks"
    );
    assert!(after.status_reason.is_some());
    store
        .heartbeat(&worker.worker_id, crate::model::now().timestamp(), None)
        .await
        .unwrap();
    s.cycle().await;
    assert_eq!(
        store.get_task(&task.task_id).await.unwrap().status,
        TaskStatus::Running
    );
}

// ------------------------------------------------------------------------------------------
// Through the API: inline admission and wake-ups.

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
        app: crate::api::router(state),
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

fn wasm_dir() -> Option<std::path::PathBuf> {
    match std::env::var_os("CLOUDAI_POLICY_WASM_DIR") {
        Some(dir) => Some(dir.into()),
        None if std::env::var_os("CI").is_some() => panic!("CI must set CLOUDAI_POLICY_WASM_DIR"),
        None => {
            eprintln!("skipping: CLOUDAI_POLICY_WASM_DIR is not set");
            None
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn request_caps_rejects_an_over_cap_submission_with_403_and_admits_the_rest() {
    let Some(dir) = wasm_dir() else { return };
    let api = api();
    let bytes = std::fs::read(dir.join("request-caps.wasm")).unwrap();
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
    let stats = scheduler(&store, 100).admission_pass().await.unwrap();
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
        .load(
            "quota",
            "1",
            &crate::policy::testing::guest(&dir, "quota"),
            quota,
        )
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
// Release.

async fn finishing_returns_the_reservation_once_and_places_a_waiting_task(store: Arc<dyn Store>) {
    let worker = add_worker(&*store, Resources::new(4.0, 8.0, 10.0, 0.0)).await;
    let first = queued(&*store, "alice", 4.0, 0, 1000).await;
    let second = queued(&*store, "bob", 4.0, 0, 0).await;
    let wakeup = Wakeup::new();
    let s = Scheduler::new(store.clone(), policies(), wakeup.clone(), config(100));
    s.cycle().await;
    assert_eq!(
        store.get_task(&first.task_id).await.unwrap().status,
        TaskStatus::Running
    );
    assert_eq!(
        store.get_task(&second.task_id).await.unwrap().status,
        TaskStatus::Queued
    );

    let done = lifecycle(&store, &wakeup)
        .finish_task(
            &first.task_id,
            Finish::Completed { exit_code: 0 },
            Cause::Worker,
        )
        .await
        .unwrap();
    assert_eq!(done.status, TaskStatus::Completed);
    assert_eq!(done.exit_code, Some(0));
    assert!(done.completed_at.is_some());
    tokio::time::timeout(Duration::from_secs(1), wakeup.woken())
        .await
        .expect("finishing wakes the scheduler");
    assert_eq!(
        store
            .get_worker(&worker.worker_id)
            .await
            .unwrap()
            .allocated(),
        Resources::default()
    );
    // A duplicate report releases nothing more.
    let again = lifecycle(&store, &wakeup)
        .finish_task(
            &first.task_id,
            Finish::Failed {
                error: "late".into(),
                exit_code: Some(1),
            },
            Cause::Worker,
        )
        .await;
    assert!(
        matches!(again, Err(StoreError::Conflict { .. })),
        "{again:?}"
    );
    assert_eq!(
        store.get_task(&first.task_id).await.unwrap().status,
        TaskStatus::Completed
    );
    assert_accounting(&*store).await;

    // The freed capacity goes to the waiting task.
    s.cycle().await;
    assert_eq!(
        store.get_task(&second.task_id).await.unwrap().status,
        TaskStatus::Running
    );
    assert_accounting(&*store).await;

    // Cancelling a running task returns its reservation too.
    let cancelled = lifecycle(&store, &wakeup)
        .finish_task(
            &second.task_id,
            Finish::Cancelled {
                reason: "cancelled by alice".into(),
            },
            Cause::Worker,
        )
        .await
        .unwrap();
    assert_eq!(cancelled.status, TaskStatus::Cancelled);
    assert_eq!(
        store
            .get_worker(&worker.worker_id)
            .await
            .unwrap()
            .allocated(),
        Resources::default()
    );
    assert_accounting(&*store).await;
    // Not running: refused, nothing released.
    let pending = queued(&*store, "carol", 1.0, 0, 0).await;
    let refused = lifecycle(&store, &wakeup)
        .finish_task(
            &pending.task_id,
            Finish::Completed { exit_code: 0 },
            Cause::Worker,
        )
        .await;
    assert!(
        matches!(refused, Err(StoreError::Conflict { .. })),
        "{refused:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sqlite_finishing_returns_the_reservation_once_and_places_a_waiting_task() {
    let (store, _guard) = sqlite();
    finishing_returns_the_reservation_once_and_places_a_waiting_task(store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn mongo_finishing_returns_the_reservation_once_and_places_a_waiting_task() {
    let Some((store, _guard)) = mongo().await else {
        return;
    };
    finishing_returns_the_reservation_once_and_places_a_waiting_task(store).await;
}

#[test]
fn config_defaults_are_the_documented_ones() {
    let c = SchedulerConfig::default();
    assert_eq!(c.batch_size, 100);
    assert_eq!(c.round_interval, Duration::from_secs(1));
    assert_eq!(c.claim_lease, Duration::from_secs(30));
    assert_eq!(c.heartbeat_staleness, Duration::from_secs(15));
}

/// Back-to-back rounds plan on the scheduler's view of the workers, which its own placements
/// keep current: a worker filled by the first round is not planned on again.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_rounds_view_of_the_workers_includes_its_own_placements() {
    let (store, _guard) = sqlite();
    let w = add_worker(&*store, Resources::new(4.0, 8.0, 10.0, 0.0)).await;
    for _ in 0..3 {
        queued(&*store, "alice", 1.0, 0, 0).await;
    }
    let s = scheduler(&store, 100);
    let first = s.placement_round().await.unwrap();
    assert_eq!((first.placed, first.lost), (3, 0));
    for _ in 0..2 {
        queued(&*store, "alice", 1.0, 0, 0).await;
    }
    let second = s.placement_round().await.unwrap();
    assert_eq!(
        (second.placed, second.waited, second.lost),
        (1, 1, 0),
        "planned on the 1 core left, not on a view from before the first round: {second:?}"
    );
    assert_eq!(
        store.get_worker(&w.worker_id).await.unwrap().available_cpu,
        0.0
    );
    assert_accounting(&*store).await;
}

/// A view that another replica made stale costs one lost race, never an overcommit: the
/// round that lost reads the workers again, and the next one plans on what is there.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_view_made_stale_by_another_replica_is_read_again_after_a_lost_race() {
    let (store, _guard) = sqlite();
    add_worker(&*store, Resources::new(4.0, 8.0, 10.0, 0.0)).await;
    queued(&*store, "alice", 1.0, 0, 0).await;
    let a = scheduler(&store, 100);
    assert_eq!(a.placement_round().await.unwrap().placed, 1);
    // Another replica fills the worker meanwhile.
    for _ in 0..3 {
        queued(&*store, "bob", 1.0, 0, 0).await;
    }
    let b = scheduler(&store, 100);
    assert_eq!(b.placement_round().await.unwrap().placed, 3);
    queued(&*store, "carol", 1.0, 0, 0).await;
    let stale = a.placement_round().await.unwrap();
    assert_eq!(
        (stale.placed, stale.lost),
        (0, 1),
        "planned on the stale view, refused by the store: {stale:?}"
    );
    let fresh = a.placement_round().await.unwrap();
    assert_eq!(
        (fresh.placed, fresh.waited, fresh.lost),
        (0, 1, 0),
        "the view was read again: {fresh:?}"
    );
    assert_accounting(&*store).await;
}

/// The dependency pass on a real store: waiting tasks are released and admitted once their
/// dependencies are met, failed with the reason once one can no longer be, and otherwise left
/// waiting with a reason that says what they still wait for.
async fn the_dependency_pass_releases_fails_and_keeps_waiting(store: Arc<dyn Store>) {
    use crate::model::{Dependency, DependencyCondition};
    let sched = scheduler(&store, 100);
    let user = unique_id("user");
    let add = async |after: Vec<Dependency>| {
        let mut task = sample_task(&unique_id("task"), &user);
        task.awaiting_dependencies = !after.is_empty();
        task.after = after;
        store.insert_task(&task, None).await.unwrap().task
    };
    let on = |task: &Task, condition| Dependency {
        task_id: Some(task.task_id.clone()),
        array_id: None,
        condition,
    };
    let a = add(vec![]).await;
    let e = add(vec![]).await;
    let b = add(vec![on(&a, DependencyCondition::Completed)]).await;
    let f = add(vec![on(&e, DependencyCondition::Completed)]).await;
    let g = add(vec![on(&e, DependencyCondition::Finished)]).await;
    let h = add(vec![
        on(&a, DependencyCondition::Completed),
        on(&e, DependencyCondition::Finished),
    ])
    .await;

    // Nothing met yet: everything waits, with a reason, whatever else the scheduler does
    // (a user whose usage changed has their deferred tasks checked again: not these).
    sched.lifecycle.wakeup().usage_changed(&user);
    sched.cycle().await;
    sched.dependency_pass().await.unwrap();
    for t in [&b, &f, &g, &h] {
        let now = store.get_task(&t.task_id).await.unwrap();
        assert!(now.awaiting_dependencies, "{now:?}");
        assert!(now.status_reason.unwrap().starts_with("waiting for task"));
    }

    for (task, to) in [(&a, TaskStatus::Completed), (&e, TaskStatus::Failed)] {
        store
            .transition_task(
                &task.task_id,
                &[TaskStatus::Pending, TaskStatus::Queued],
                to,
                &TaskUpdate::default(),
            )
            .await
            .unwrap();
    }
    let stats = sched.dependency_pass().await.unwrap();
    assert_eq!((stats.released, stats.failed), (3, 1), "{stats:?}");
    for t in [&b, &g, &h] {
        let now = store.get_task(&t.task_id).await.unwrap();
        assert_eq!(
            now.status,
            TaskStatus::Queued,
            "released and admitted at once: {now:?}"
        );
        assert!(!now.awaiting_dependencies);
    }
    let failed = store.get_task(&f.task_id).await.unwrap();
    assert_eq!(failed.status, TaskStatus::Failed);
    assert_eq!(
        failed.error.as_deref(),
        Some(
            format!(
                "dependency task {} is failed: it can no longer complete",
                e.task_id
            )
            .as_str()
        )
    );
    // A second pass finds nothing to do.
    let stats = sched.dependency_pass().await.unwrap();
    assert_eq!((stats.released, stats.failed), (0, 0));
}

#[tokio::test]
async fn the_dependency_pass_releases_fails_and_keeps_waiting_on_sqlite() {
    let (store, _guard) = sqlite();
    the_dependency_pass_releases_fails_and_keeps_waiting(store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dependency_pass_releases_fails_and_keeps_waiting_on_mongodb() {
    let Some((store, _guard)) = mongo().await else {
        return;
    };
    the_dependency_pass_releases_fails_and_keeps_waiting(store).await;
}

/// Thousands of tasks waiting for one task are one list to the dependency pass: while it
/// runs, a pass writes none of them (their reason stands) and a task waiting for something
/// else is released as soon as that is met; once it completes, one pass releases them all.
#[tokio::test]
async fn many_tasks_waiting_for_one_are_one_list_and_starve_nobody() {
    use crate::model::{Dependency, DependencyCondition, array_task, new_array_id};
    let dir = tempfile::tempdir().unwrap();
    let sqlite = SqliteStore::open_in_dir(dir.path()).unwrap();
    let store: Arc<dyn Store> = Arc::new(sqlite.clone());
    let sched = scheduler(&store, 100);
    let user = unique_id("user");
    let train = sample_task(&unique_id("task"), &user);
    let other = sample_task(&unique_id("task"), &user);
    for t in [&train, &other] {
        store.insert_task(t, None).await.unwrap();
    }
    let on = |task: &Task| Dependency {
        task_id: Some(task.task_id.clone()),
        array_id: None,
        condition: DependencyCondition::Completed,
    };
    let mut template = sample_task("template", &user);
    template.after = vec![on(&train)];
    template.awaiting_dependencies = true;
    template.status_reason = Some(format!("waiting for task {} to complete", train.task_id));
    let array_id = new_array_id();
    let waiting: Vec<Task> = (0..2_500)
        .map(|i| array_task(&template, &array_id, i, 2_500))
        .collect();
    store.insert_tasks(&waiting, None).await.unwrap();
    let mut last = sample_task(&unique_id("task"), &user);
    last.after = vec![on(&other)];
    last.awaiting_dependencies = true;
    store.insert_task(&last, None).await.unwrap();

    for (task, to) in [
        (&train, TaskStatus::Running),
        (&other, TaskStatus::Completed),
    ] {
        store
            .transition_task(
                &task.task_id,
                &[TaskStatus::Pending],
                to,
                &TaskUpdate::default(),
            )
            .await
            .unwrap();
    }
    let before = sqlite.transactions();
    let stats = sched.dependency_pass().await.unwrap();
    assert_eq!((stats.checked, stats.released), (2, 1), "{stats:?}");
    assert_eq!(
        store.get_task(&last.task_id).await.unwrap().status,
        TaskStatus::Queued
    );
    let untouched = store.get_task(&waiting[1_234].task_id).await.unwrap();
    assert_eq!(untouched, waiting[1_234], "a waiting task is not written");
    let spent = sqlite.transactions() - before;
    assert!(spent < 20, "{spent} transactions for one pass");

    store
        .transition_task(
            &train.task_id,
            &[TaskStatus::Running],
            TaskStatus::Completed,
            &TaskUpdate::default(),
        )
        .await
        .unwrap();
    let stats = sched.dependency_pass().await.unwrap();
    assert_eq!(stats.released, 2_500, "{stats:?}");
    let counts = store.array_summary(&array_id).await.unwrap().counts;
    assert_eq!(counts.queued, 2_500, "{counts:?}");
}
