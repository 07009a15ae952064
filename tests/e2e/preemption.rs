//! Preemption end to end, on the embedded store and on the MongoDB-protocol test server, with
//! the shipped preempting policy (`best-fit-preempt`, contract `cloudai:policy@0.2.0`) active:
//!
//! - simulated workers: a task of a higher priority makes a lower-priority one stop, never
//!   one of equal priority nor one that opted out; its host is SIGKILLed between asking the
//!   victim to stop and placing the preemptor, and the host that takes over (a restart on the
//!   embedded store, another replica on MongoDB) finishes the job: the victim is queued again
//!   with its attempt counted, the preemptor placed, the victim runs again, nothing is lost and
//!   no worker is ever overcommitted;
//! - real Docker: the victim's container is stopped (graceful stop, then kill) by the local
//!   worker, the urgent task runs, and the victim runs again.

use std::path::PathBuf;
use std::time::Duration;

use reqwest::Method;
use serde_json::{Value, json};

use crate::execution::{IMAGE, docker_ready};
use crate::harness::{
    ALICE_TOKEN, BOB_TOKEN, CLI_TIMEOUT, StoreKind, TestHost, keep_beating, mongo_uri,
    policy_wasm_dir, register_worker, unique_database, wait_until_running,
};

const WORKER: &str = "w-preempt";

fn wasm_dir() -> Option<PathBuf> {
    policy_wasm_dir("skipping the preemption e2e tests")
}

/// Uploads and activates the preempting best-fit on `host` (through the CLI).
fn activate_preempting_policy(host: &TestHost, dir: &std::path::Path) {
    let file = dir.join("best-fit-preempt.wasm");
    let file = file.to_str().expect("utf-8 path");
    let out = host.cli_within(
        CLI_TIMEOUT,
        &host.admin_token,
        &[
            "policy",
            "upload",
            file,
            "--name",
            "best-fit-preempt",
            "--version",
            "1",
            "--activate",
        ],
    );
    assert!(
        out.status.success(),
        "upload: {out:?}\nhost log:\n{}",
        host.log()
    );
}

async fn task(host: &TestHost, id: &str) -> Value {
    let (status, task) = host
        .call(
            Method::GET,
            &format!("/v1/tasks/{id}"),
            Some(&host.admin_token),
            None,
            &[],
        )
        .await;
    assert_eq!(status, 200, "{task}");
    task
}

/// Submits a 1-cpu, 1-GB task; returns its id.
async fn submit(host: &TestHost, token: &str, priority: i32, preemptible: bool) -> String {
    let spec = json!({
        "docker_image": IMAGE, "command": "true", "req_cpu": 1, "req_memory": 1,
        "priority": priority, "preemptible": preemptible,
    });
    let (status, body) = host
        .call(
            Method::POST,
            "/v1/tasks",
            Some(token),
            Some(&spec.to_string()),
            &[],
        )
        .await;
    assert!(status == 201 || status == 202, "{status}: {body}");
    body["task_id"].as_str().expect("task id").to_string()
}

/// The simulated worker's work list now.
async fn work(host: &TestHost, token: &str) -> Vec<Value> {
    let (status, list) = host
        .call(
            Method::GET,
            &format!("/v1/workers/{WORKER}/work?wait_ms=0"),
            Some(token),
            None,
            &[],
        )
        .await;
    assert_eq!(status, 200, "{list}");
    list["work"].as_array().expect("a work list").clone()
}

/// The assignment of `task_id` in the worker's work list (waiting for it to appear).
async fn assignment_of(host: &TestHost, token: &str, task_id: &str) -> Value {
    host.eventually(
        format!("{task_id} in the work list of {WORKER}"),
        Duration::from_secs(30),
    )
    .every(Duration::from_millis(50))
    .until(async || {
        let list = work(host, token).await;
        list.iter()
            .find(|w| w["task_id"] == task_id)
            .cloned()
            .ok_or_else(|| Value::Array(list).to_string())
    })
    .await
}

/// Reports an assignment's start, or its end with `outcome`.
async fn report(host: &TestHost, token: &str, ass_id: &str, what: &str, body: Value) {
    let (status, answer) = host
        .call(
            Method::POST,
            &format!("/v1/workers/{WORKER}/assignments/{ass_id}/{what}"),
            Some(token),
            Some(&body.to_string()),
            &[],
        )
        .await;
    assert_eq!(status, 200, "{what} of {ass_id}: {answer}");
}

async fn start(host: &TestHost, token: &str, task_id: &str) -> String {
    let ass = assignment_of(host, token, task_id).await;
    let ass_id = ass["ass_id"].as_str().expect("ass_id").to_string();
    report(host, token, &ass_id, "started", json!({})).await;
    ass_id
}

async fn complete(host: &TestHost, token: &str, ass_id: &str) {
    report(
        host,
        token,
        ass_id,
        "result",
        json!({"outcome": "completed", "exit_code": 0}),
    )
    .await;
}

/// The worker's allocation, checked never to exceed its total; returns allocated cpu.
async fn allocated_cpu(host: &TestHost) -> f64 {
    let (status, worker) = host
        .call(
            Method::GET,
            &format!("/v1/workers/{WORKER}"),
            Some(&host.admin_token),
            None,
            &[],
        )
        .await;
    assert_eq!(status, 200, "{worker}");
    let f = |name: &str| worker[name].as_f64().unwrap_or_else(|| panic!("{worker}"));
    for r in ["cpu", "memory", "storage", "gpu"] {
        let (allocated, total) = (f(&format!("allocated_{r}")), f(&format!("total_{r}")));
        assert!(
            (0.0..=total).contains(&allocated),
            "{WORKER} overcommitted or negative in {r}: {worker}"
        );
        assert_eq!(f(&format!("available_{r}")), total - allocated, "{worker}");
    }
    f("allocated_cpu")
}

/// Waits until `task_id` is queued again after its preemption; returns it.
async fn requeued(host: &TestHost, task_id: &str) -> Value {
    host.eventually(format!("{task_id} queued again"), Duration::from_secs(30))
        .until(async || {
            let t = task(host, task_id).await;
            if t["status"] == "queued" {
                Ok(t)
            } else {
                Err(t.to_string())
            }
        })
        .await
}

/// The scenario on a host made by `make` (called again, for the host that takes over after a
/// SIGKILL: on the same data dir for the embedded store, another replica on MongoDB).
async fn a_preemption_survives_its_host_being_sigkilled(
    store: impl Fn() -> StoreKind,
    take_over: impl FnOnce(TestHost) -> TestHost,
) {
    let Some(dir) = wasm_dir() else { return };
    let host = TestHost::start(store()).expect("host starts");
    activate_preempting_policy(&host, &dir);
    let token = register_worker(&host, WORKER, 2.0, 4.0).await;
    let beats = keep_beating(
        &host,
        vec![(WORKER.to_string(), token.clone())],
        Duration::from_millis(500),
    );

    // Alice fills the worker: one task that may be preempted, one that opted out.
    let low = submit(&host, ALICE_TOKEN, 0, true).await;
    let kept = submit(&host, ALICE_TOKEN, 0, false).await;
    wait_until_running(&host, &low).await;
    wait_until_running(&host, &kept).await;
    let low_ass = start(&host, &token, &low).await;
    let kept_ass = start(&host, &token, &kept).await;

    // A task of the same priority waits: it never preempts.
    let peer = submit(&host, BOB_TOKEN, 0, true).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(task(&host, &peer).await["status"], "queued");
    for id in [&low, &kept] {
        let t = task(&host, id).await;
        assert_eq!(t["cancel_requested"], false, "{t}");
    }

    // An urgent task preempts the one that may be preempted, and waits for it to stop.
    let urgent = submit(&host, BOB_TOKEN, 10, true).await;
    let victim = host
        .eventually(
            format!("{low} preempted by {urgent}"),
            Duration::from_secs(30),
        )
        .until(async || {
            let t = task(&host, &low).await;
            if t["preempted_by"] == urgent.as_str() && t["cancel_requested"] == true {
                Ok(t)
            } else {
                Err(t.to_string())
            }
        })
        .await;
    assert_eq!(victim["status"], "running", "its worker stops it: {victim}");
    let kept_now = task(&host, &kept).await;
    assert_eq!(kept_now["cancel_requested"], false, "{kept_now}");
    let waiting = task(&host, &urgent).await;
    assert_eq!(waiting["status"], "queued", "{waiting}");
    assert_eq!(
        allocated_cpu(&host).await,
        2.0,
        "the victim holds its capacity until it stopped"
    );
    let item = assignment_of(&host, &token, &low).await;
    assert_eq!(item["cancel"], true, "{item}");

    // The host dies between asking the victim to stop and placing the preemptor.
    beats.stop(Duration::from_secs(5)).await;
    let host = take_over(host);
    let beats = keep_beating(
        &host,
        vec![(WORKER.to_string(), token.clone())],
        Duration::from_millis(500),
    );
    // The worker still sees the stop (the store has it) and reports the container stopped.
    let item = assignment_of(&host, &token, &low).await;
    assert_eq!(item["cancel"], true, "{item}");
    report(
        &host,
        &token,
        &low_ass,
        "result",
        json!({"outcome": "cancelled"}),
    )
    .await;

    let again = requeued(&host, &low).await;
    // Its owner's event stream tells the story: preempted (by whom), then queued again (its
    // reason then, which the next round may replace with why it waits).
    let mut stream = crate::events::open(
        &host.url,
        ALICE_TOKEN,
        &format!("topics=task&task_id={low}&after=0"),
        None,
    )
    .await;
    let frames = stream
        .until(Duration::from_secs(30), |f| {
            f.event == "task.state"
                && f.data["data"]["status"] == "queued"
                && f.data["data"]["reason"]
                    .as_str()
                    .is_some_and(|r| r.starts_with("preempted by"))
        })
        .await;
    let preempted = frames
        .iter()
        .find(|f| f.event == "task.preempted")
        .unwrap_or_else(|| panic!("no task.preempted event: {frames:#?}"));
    assert_eq!(
        preempted.data["data"]["preempted_by"],
        urgent.as_str(),
        "{frames:#?}"
    );
    let queued_again = frames.last().expect("the frame waited for");
    assert_eq!(
        queued_again.data["data"]["reason"],
        format!("preempted by {urgent} during attempt 1; queued again"),
        "{frames:#?}"
    );
    assert_eq!(queued_again.data["data"]["attempts"], 1, "{frames:#?}");
    assert_eq!(again["attempts"], 1, "the attempt is counted: {again}");
    assert_eq!(again["cancel_requested"], false, "{again}");
    assert!(again["preempted_by"].is_null(), "{again}");
    assert!(again["completed_at"].is_null(), "{again}");

    // The preemptor takes the freed capacity (not the victim, nor the peer of its priority).
    wait_until_running(&host, &urgent).await;
    assert_eq!(allocated_cpu(&host).await, 2.0);
    assert_eq!(task(&host, &low).await["status"], "queued");
    assert_eq!(task(&host, &peer).await["status"], "queued");
    let urgent_ass = start(&host, &token, &urgent).await;
    complete(&host, &token, &urgent_ass).await;

    // Then the two of priority 0 run in turn; the victim runs again, at its next attempt.
    for _ in 0..2 {
        let next = host
            .eventually("a waiting task placed", Duration::from_secs(30))
            .until(async || {
                for id in [&low, &peer] {
                    if task(&host, id).await["status"] == "running" {
                        return Ok(id.clone());
                    }
                }
                Err(format!(
                    "{} {}",
                    task(&host, &low).await,
                    task(&host, &peer).await
                ))
            })
            .await;
        assert_eq!(allocated_cpu(&host).await, 2.0);
        let ass = start(&host, &token, &next).await;
        complete(&host, &token, &ass).await;
    }
    let low = task(&host, &low).await;
    assert_eq!(
        (low["status"].as_str(), low["attempts"].as_u64()),
        (Some("completed"), Some(2)),
        "{low}"
    );
    complete(&host, &token, &kept_ass).await;
    host.eventually(
        "the worker's reservations all returned",
        Duration::from_secs(10),
    )
    .until(async || {
        let cpu = allocated_cpu(&host).await;
        if cpu == 0.0 {
            Ok(())
        } else {
            Err(format!("allocated cpu {cpu}"))
        }
    })
    .await;
    for id in [&urgent, &peer, &kept] {
        assert_eq!(task(&host, id).await["status"], "completed", "{id}");
    }
    beats.stop(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_preemption_survives_its_host_being_sigkilled_on_the_embedded_store() {
    a_preemption_survives_its_host_being_sigkilled(
        || StoreKind::Embedded,
        |host| {
            // `restart` kills the process (SIGKILL) and starts it again on the same data.
            host.restart(StoreKind::Embedded, &["--no-local-worker"])
                .expect("host restarts")
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_preemption_survives_its_replica_being_sigkilled_on_mongodb() {
    let Some(uri) = mongo_uri() else { return };
    let database = unique_database("preempt");
    let store = || StoreKind::MongoDatabase {
        uri: uri.clone(),
        database: database.clone(),
    };
    a_preemption_survives_its_host_being_sigkilled(store, |host| {
        // SIGKILL (dropping a TestHost kills its process), then another replica.
        drop(host);
        TestHost::start(store()).expect("another replica starts")
    })
    .await;
}

/// With the local worker and real containers: the victim's container is stopped (graceful
/// stop, then kill after 1 s: `sleep` as PID 1 ignores SIGTERM), the urgent task runs in its
/// place, and the victim runs again.
async fn a_preempted_container_is_stopped_and_runs_again(store: StoreKind) {
    let Some(dir) = wasm_dir() else { return };
    if docker_ready().await.is_none() {
        return;
    }
    let host = TestHost::start_with(store, &["--stop-grace-s", "1"]).expect("host starts");
    activate_preempting_policy(&host, &dir);
    let (status, workers) = host
        .call(
            Method::GET,
            "/v1/workers",
            Some(&host.admin_token),
            None,
            &[],
        )
        .await;
    assert_eq!(status, 200, "{workers}");
    let local = host
        .eventually("the local worker registered", Duration::from_secs(30))
        .until(async || {
            let (_, workers) = host
                .call(
                    Method::GET,
                    "/v1/workers",
                    Some(&host.admin_token),
                    None,
                    &[],
                )
                .await;
            workers["workers"]
                .as_array()
                .and_then(|w| w.first().cloned())
                .ok_or_else(|| workers.to_string())
        })
        .await;
    let cpu = local["total_cpu"].as_f64().expect("total_cpu");
    let submit = |priority: i32, script: &str| {
        json!({
            "docker_image": IMAGE, "command": script, "req_cpu": cpu, "req_memory": 0.25,
            "priority": priority,
        })
    };
    let (status, body) = host
        .call(
            Method::POST,
            "/v1/tasks",
            Some(ALICE_TOKEN),
            Some(&submit(0, "sleep 600").to_string()),
            &[],
        )
        .await;
    assert!(status == 201 || status == 202, "{body}");
    let low = body["task_id"].as_str().expect("id").to_string();
    // Its container runs.
    host.eventually(format!("{low} started"), Duration::from_secs(60))
        .until(async || {
            let t = task(&host, &low).await;
            if t["started_at"].is_string() {
                Ok(())
            } else {
                Err(t.to_string())
            }
        })
        .await;
    let (status, body) = host
        .call(
            Method::POST,
            "/v1/tasks",
            Some(BOB_TOKEN),
            Some(&submit(5, "echo urgent").to_string()),
            &[],
        )
        .await;
    assert!(status == 201 || status == 202, "{body}");
    let urgent = body["task_id"].as_str().expect("id").to_string();
    let done = host
        .eventually(format!("{urgent} completed"), Duration::from_secs(120))
        .every(Duration::from_millis(200))
        .until(async || {
            let t = task(&host, &urgent).await;
            match t["status"].as_str() {
                Some("completed") => Ok(t),
                Some("failed" | "cancelled") => panic!("{t}"),
                _ => Err(format!("{t}\n{}", task(&host, &low).await)),
            }
        })
        .await;
    assert_eq!(done["exit_code"], 0, "{done}");
    // It ran in the victim's place: the victim, holding the whole worker, was stopped.
    let log = host.log();
    assert!(
        log.lines()
            .any(|l| l.contains("task preempted") && l.contains(&low)),
        "{log}"
    );
    // The victim runs again, at its second attempt.
    let again = host
        .eventually(format!("{low} running again"), Duration::from_secs(60))
        .until(async || {
            let t = task(&host, &low).await;
            if t["status"] == "running" && t["attempts"] == 2 {
                Ok(t)
            } else {
                Err(t.to_string())
            }
        })
        .await;
    assert_eq!(again["cancel_requested"], false, "{again}");
    let (status, body) = host
        .call(
            Method::POST,
            &format!("/v1/tasks/{low}/cancel"),
            Some(ALICE_TOKEN),
            None,
            &[],
        )
        .await;
    assert!((200..300).contains(&status), "{body}");
    host.eventually(format!("{low} cancelled"), Duration::from_secs(60))
        .until(async || {
            let t = task(&host, &low).await;
            if t["status"] == "cancelled" {
                Ok(())
            } else {
                Err(t.to_string())
            }
        })
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_preempted_container_is_stopped_and_runs_again_on_the_embedded_store() {
    a_preempted_container_is_stopped_and_runs_again(StoreKind::Embedded).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_preempted_container_is_stopped_and_runs_again_on_mongodb() {
    let Some(uri) = mongo_uri() else { return };
    a_preempted_container_is_stopped_and_runs_again(StoreKind::Mongo(uri)).await;
}

/// What stops a user from giving every task the top priority: the `quota` admission policy's
/// per-user `max_priority`, checked at submission (403 with the reason), overridable per user.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_users_priority_is_capped_at_admission() {
    let Some(dir) = wasm_dir() else { return };
    let host = TestHost::start(StoreKind::Embedded).expect("host starts");
    let config = json!({
        "default": {"max_priority": 5},
        "users": {"bob": {"max_priority": 100}},
    })
    .to_string();
    let file = dir.join("quota.wasm");
    let out = host.cli_within(
        CLI_TIMEOUT,
        &host.admin_token,
        &[
            "policy",
            "upload",
            file.to_str().expect("utf-8 path"),
            "--name",
            "quota",
            "--version",
            "1",
            "--config",
            &config,
            "--activate",
        ],
    );
    assert!(out.status.success(), "{out:?}\n{}", host.log());
    let submit = async |token: &str, priority: i32| {
        let spec = json!({"docker_image": IMAGE, "priority": priority});
        host.call(
            Method::POST,
            "/v1/tasks",
            Some(token),
            Some(&spec.to_string()),
            &[],
        )
        .await
    };
    let (status, body) = submit(ALICE_TOKEN, 10).await;
    assert_eq!(status, 403, "{body}");
    assert_eq!(body["error"]["code"], "admission_rejected", "{body}");
    let message = body["error"]["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("priority 10 exceeds the quota max_priority of 5 for user alice"),
        "{body}"
    );
    let (status, body) = submit(ALICE_TOKEN, 5).await;
    assert!(status == 201 || status == 202, "{body}");
    let (status, body) = submit(BOB_TOKEN, 50).await;
    assert!(status == 201 || status == 202, "{body}");
}
