//! Dependencies between tasks end to end, on the embedded store and on the MongoDB-protocol
//! test server: a pipeline of real containers on the local worker through the CLI (`--after`),
//! a failure that fails what needed it, an array as a dependency; and a waiting task that
//! outlives its host (restart on SQLite; another replica on MongoDB), released when a
//! simulated worker completes what it waits for.

use std::time::Duration;

use reqwest::Method;
use serde_json::{Value, json};

use crate::execution::{IMAGE, docker_ready};
use crate::harness::{
    ALICE_TOKEN, StoreKind, TestHost, keep_beating, mongo_uri, register_worker, report_completed,
    unique_database, work_list,
};

fn stdout(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

async fn task(host: &TestHost, id: &str) -> Value {
    let (status, task) = host
        .call(
            Method::GET,
            &format!("/v1/tasks/{id}"),
            Some(ALICE_TOKEN),
            None,
            &[],
        )
        .await;
    assert_eq!(status, 200, "{task}");
    task
}

/// Waits until the task ended; returns it.
async fn ended(host: &TestHost, id: &str) -> Value {
    host.eventually(format!("task {id} to end"), Duration::from_secs(180))
        .every(Duration::from_millis(200))
        .until(async || {
            let t = task(host, id).await;
            match t["status"].as_str() {
                Some("completed" | "failed" | "cancelled") => Ok(t),
                _ => Err(t.to_string()),
            }
        })
        .await
}

async fn a_pipeline_runs_in_order_and_a_failure_fails_what_needed_it(store: StoreKind) {
    if docker_ready().await.is_none() {
        return;
    }
    let host = TestHost::start_with(store, &["--stop-grace-s", "1"]).expect("host starts");
    let submit = |extra: &[&str], script: &str| {
        let mut args = vec!["submit", "--cpu", "0.25", "--memory", "0.25"];
        args.extend_from_slice(extra);
        args.extend_from_slice(&[IMAGE, "--", "sh", "-c", script]);
        let out = host.cli(ALICE_TOKEN, &args);
        assert_eq!(out.status.code(), Some(0), "{args:?}: {out:?}");
        stdout(&out)
    };
    let train = submit(&[], "sleep 2; echo trained");
    let evaluate = submit(&["--after", &train], "echo evaluated");
    let publish = submit(
        &["--after", &format!("{evaluate}:finished")],
        "echo published",
    );
    let broken = submit(&[], "exit 3");
    let never = submit(&["--after", &broken], "echo never");
    let anyway = submit(&["--after", &format!("{broken}:finished")], "echo anyway");
    let shards = submit(&["--count", "3"], "echo shard $CLOUDAI_ARRAY_INDEX");
    let merge = submit(&["--after", &shards], "echo merged");

    // While it waits, the task says what for.
    let waiting = task(&host, &evaluate).await;
    if waiting["status"] == "pending" {
        assert_eq!(waiting["awaiting_dependencies"], true, "{waiting}");
        assert_eq!(
            waiting["status_reason"],
            format!("waiting for task {train} to complete"),
            "{waiting}"
        );
    }

    for id in [&publish, &anyway, &merge, &never] {
        ended(&host, id).await;
    }
    let (train, evaluate, publish) = (
        task(&host, &train).await,
        task(&host, &evaluate).await,
        task(&host, &publish).await,
    );
    for t in [&train, &evaluate, &publish] {
        assert_eq!(t["status"], "completed", "{t}");
    }
    let at = |t: &Value, field: &str| {
        chrono::DateTime::parse_from_rfc3339(t[field].as_str().unwrap_or_else(|| panic!("{t}")))
            .unwrap()
    };
    assert!(
        at(&evaluate, "started_at") >= at(&train, "completed_at"),
        "evaluate started before train ended: {evaluate} {train}"
    );
    assert!(at(&publish, "started_at") >= at(&evaluate, "completed_at"));

    let never = task(&host, &never).await;
    assert_eq!(never["status"], "failed", "{never}");
    assert_eq!(
        never["error"],
        format!("dependency task {broken} is failed: it can no longer complete"),
        "{never}"
    );
    assert!(never["started_at"].is_null(), "it never ran: {never}");
    assert_eq!(task(&host, &anyway).await["status"], "completed");

    let merge = task(&host, &merge).await;
    assert_eq!(merge["status"], "completed", "{merge}");
    let (_, listed) = host
        .call(
            Method::GET,
            &format!("/v1/tasks?array_id={shards}"),
            Some(ALICE_TOKEN),
            None,
            &[],
        )
        .await;
    let shard_tasks = listed["tasks"].as_array().unwrap();
    assert_eq!(shard_tasks.len(), 3, "{listed}");
    for shard in shard_tasks {
        assert!(
            at(&merge, "started_at") >= at(shard, "completed_at"),
            "{merge} {shard}"
        );
    }
    // What a dependency names is refused at submit when unknown.
    let out = host.cli(
        ALICE_TOKEN,
        &["submit", "--after", "task-nobody", IMAGE, "--", "true"],
    );
    assert_ne!(out.status.code(), Some(0));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("there is no task task-nobody"),
        "{out:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pipeline_runs_in_order_and_a_failure_fails_what_needed_it_on_the_embedded_store() {
    a_pipeline_runs_in_order_and_a_failure_fails_what_needed_it(StoreKind::Embedded).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pipeline_runs_in_order_and_a_failure_fails_what_needed_it_on_mongodb() {
    let Some(uri) = mongo_uri() else { return };
    a_pipeline_runs_in_order_and_a_failure_fails_what_needed_it(StoreKind::Mongo(uri)).await;
}

/// Submits `first` and a task after it on `host` (no worker: both wait); returns their ids.
async fn first_and_after(host: &TestHost) -> (String, String) {
    let first = crate::harness::submit_task(
        host,
        ALICE_TOKEN,
        &json!({"docker_image": IMAGE, "req_cpu": 1}),
    )
    .await;
    let (status, after) = host
        .call(
            Method::POST,
            "/v1/tasks",
            Some(ALICE_TOKEN),
            Some(
                &json!({"docker_image": IMAGE, "req_cpu": 1, "after": [{"task_id": first}]})
                    .to_string(),
            ),
            &[],
        )
        .await;
    assert_eq!(status, 202, "{after}");
    assert_eq!(after["awaiting_dependencies"], true, "{after}");
    (first, after["task_id"].as_str().unwrap().to_string())
}

/// On `host` (which did not see the submissions): a simulated worker runs `first`; the task
/// after it is then released, admitted and placed on the same worker.
async fn a_worker_completes_first_and_the_other_follows(host: &TestHost, first: &str, then: &str) {
    let token = register_worker(host, "sim-deps", 4.0, 16.0).await;
    let beats = keep_beating(
        host,
        vec![("sim-deps".to_string(), token.clone())],
        Duration::from_secs(1),
    );
    let assigned = host
        .eventually(
            format!("task {first} on the simulated worker"),
            Duration::from_secs(30),
        )
        .until(async || {
            let work = work_list(host, "sim-deps", &token, 1_000).await;
            work.iter()
                .find(|(_, task_id)| task_id == first)
                .cloned()
                .ok_or_else(|| format!("{work:?}"))
        })
        .await;
    assert_eq!(task(host, then).await["status"], "pending");
    report_completed(host, "sim-deps", &token, &assigned.0, "done\n").await;
    host.eventually(
        format!("task {then} to be placed after {first} completed"),
        Duration::from_secs(30),
    )
    .until(async || {
        let work = work_list(host, "sim-deps", &token, 1_000).await;
        if work.iter().any(|(_, task_id)| task_id == then) {
            Ok(())
        } else {
            Err(format!("{work:?}"))
        }
    })
    .await;
    let released = task(host, then).await;
    assert_eq!(released["status"], "running", "{released}");
    assert_eq!(released["awaiting_dependencies"], false, "{released}");
    beats.stop(Duration::from_secs(10)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiting_task_survives_a_restart_of_its_host() {
    let host =
        TestHost::start_with(StoreKind::Embedded, &["--no-local-worker"]).expect("host starts");
    let (first, then) = first_and_after(&host).await;
    let host = host
        .restart(StoreKind::Embedded, &["--no-local-worker"])
        .expect("host restarts");
    a_worker_completes_first_and_the_other_follows(&host, &first, &then).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiting_task_is_released_by_another_replica() {
    let Some(uri) = mongo_uri() else { return };
    let database = unique_database("deps");
    let store = || StoreKind::MongoDatabase {
        uri: uri.clone(),
        database: database.clone(),
    };
    let submitter = TestHost::start_with(store(), &["--no-local-worker"]).expect("host starts");
    let (first, then) = first_and_after(&submitter).await;
    // The replica that took the submissions is gone; the other one does the rest.
    drop(submitter);
    let other = TestHost::start_with(store(), &["--no-local-worker"]).expect("replica starts");
    a_worker_completes_first_and_the_other_follows(&other, &first, &then).await;
}
