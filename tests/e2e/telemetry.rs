//! `--log-format json`: every line is one JSON object, and the lines a task's life writes
//! carry its lifecycle spans with the task's and the worker's ids and the deciding policy.

use reqwest::Method;
use serde_json::Value;

use crate::harness::{ALICE_TOKEN, StoreKind, TestHost, register_worker, wait_until_running};

#[tokio::test]
async fn json_logs_carry_the_task_lifecycle_spans() {
    let host = TestHost::start_with(
        StoreKind::Embedded,
        &["--no-local-worker", "--log-format", "json"],
    )
    .unwrap();
    register_worker(&host, "w-json", 4.0, 8.0).await;
    let (status, task) = host
        .call(
            Method::POST,
            "/v1/tasks",
            Some(ALICE_TOKEN),
            Some(r#"{"docker_image": "busybox", "req_cpu": 1, "req_memory": 1}"#),
            &[],
        )
        .await;
    assert_eq!(status, 201, "{task}");
    let task_id = task["task_id"].as_str().unwrap();
    wait_until_running(&host, task_id).await;

    let log = host.log();
    let lines: Vec<Value> = log
        .lines()
        .map(|line| {
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not a JSON line ({e}): {line}"))
        })
        .collect();
    let line_of = |message: &str| {
        lines
            .iter()
            .find(|l| l["fields"]["message"] == message && l["span"]["task_id"] == task_id)
            .unwrap_or_else(|| panic!("no {message:?} line inside a span of {task_id}:\n{log}"))
    };

    let submitted = line_of("task submitted");
    assert_eq!(submitted["span"]["name"], "submit", "{submitted}");
    assert_eq!(submitted["span"]["user_id"], "alice", "{submitted}");
    let names: Vec<&str> = submitted["spans"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|s| s["name"].as_str())
        .collect();
    assert_eq!(
        names,
        ["http", "submit"],
        "the API call is the parent: {submitted}"
    );

    let admitted = line_of("task admitted");
    assert_eq!(admitted["span"]["name"], "admit", "{admitted}");

    let placed = line_of("task placed");
    assert_eq!(placed["span"]["name"], "place", "{placed}");
    assert_eq!(placed["span"]["worker_id"], "w-json", "{placed}");
    assert!(
        placed["span"]["policy"]
            .as_str()
            .is_some_and(|p| !p.is_empty()),
        "the span names the deciding policy: {placed}"
    );
}
