//! The README's five-minute tour, step by step: start the host, register a worker with curl,
//! submit, list, cancel, and get clear JSON errors for bad input, a wrong token and another
//! user's task.

use reqwest::Method;
use serde_json::{Value, json};

use crate::harness::{ALICE_TOKEN, BOB_TOKEN, StoreKind, TestHost, mongo_uri};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readme_tour_on_the_embedded_store() {
    let host = TestHost::start(StoreKind::Embedded).expect("host starts");
    tour(&host).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readme_tour_on_mongodb() {
    let Some(uri) = mongo_uri() else { return };
    let host = TestHost::start(StoreKind::Mongo(uri)).expect("host starts");
    tour(&host).await;
}

fn assert_error(status: u16, body: &Value, want_status: u16, want_code: &str) {
    assert_eq!(status, want_status, "unexpected status, body: {body}");
    assert_eq!(body["error"]["code"], want_code, "unexpected error: {body}");
    let message = body["error"]["message"].as_str().unwrap_or_default();
    assert!(!message.is_empty(), "error without a message: {body}");
}

async fn tour(host: &TestHost) {
    // Health and readiness, no token needed.
    let (status, body) = host.call(Method::GET, "/healthz", None, None, &[]).await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = host.call(Method::GET, "/readyz", None, None, &[]).await;
    assert_eq!(status, 200, "{body}");

    // Register a worker with the join token, as `curl -X POST .../v1/workers` would.
    let worker = json!({
        "worker_id": "worker-1", "worker_ip": "127.0.0.1:50052",
        "total_cpu": 8.0, "total_memory": 16.0, "total_storage": 100.0, "total_gpu": 0.0
    });
    let (status, body) = host
        .call(
            Method::POST,
            "/v1/workers",
            Some(&host.join_token),
            Some(&worker.to_string()),
            &[],
        )
        .await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["worker"]["worker_id"], "worker-1");
    assert_eq!(body["worker"]["available_cpu"], 8.0);
    let worker_token = body["token"].as_str().expect("worker token").to_string();
    assert!(
        body["worker"].get("token_sha256").is_none(),
        "hash leaked: {body}"
    );
    let (status, body) = host
        .call(
            Method::POST,
            "/v1/workers/worker-1/heartbeat",
            Some(&worker_token),
            Some(r#"{"usage": {"cpu_percent": 12.5, "memory_percent": 40.0, "running_tasks": 0}}"#),
            &[],
        )
        .await;
    assert_eq!(status, 200, "{body}");
    // Drained, so that the scheduler leaves the tour's tasks queued (placement has its own
    // tests): they can then be cancelled at once and the worker deregistered at the end.
    let (status, body) = host
        .call(
            Method::POST,
            "/v1/workers/worker-1/drain",
            Some(&host.admin_token),
            Some("{}"),
            &[],
        )
        .await;
    assert_eq!(status, 200, "{body}");

    // The admin sees the worker; the CLI shows it too.
    let (status, body) = host
        .call(
            Method::GET,
            "/v1/workers",
            Some(&host.admin_token),
            None,
            &[],
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["workers"].as_array().map(Vec::len), Some(1));
    let out = host.cli(&host.admin_token, &["workers"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("worker-1"));

    // Alice submits a task over HTTP, with an idempotency key: a retry returns the same task.
    let spec = r#"{"docker_image": "busybox:1.36", "command": "echo hello", "req_cpu": 0.5, "req_memory": 0.25}"#;
    let (status, first) = host
        .call(
            Method::POST,
            "/v1/tasks",
            Some(ALICE_TOKEN),
            Some(spec),
            &[("Idempotency-Key", "tour-1")],
        )
        .await;
    assert_eq!(status, 201, "{first}");
    // Admitted inline (no admission policy is active): queued.
    assert_eq!(first["status"], "queued");
    assert_eq!(first["user_id"], "alice");
    let task_id = first["task_id"].as_str().expect("task id").to_string();
    let (status, again) = host
        .call(
            Method::POST,
            "/v1/tasks",
            Some(ALICE_TOKEN),
            Some(spec),
            &[("Idempotency-Key", "tour-1")],
        )
        .await;
    assert_eq!(status, 200, "{again}");
    assert_eq!(again["task_id"], task_id.as_str());

    // ...and one through the CLI.
    let out = host.cli(
        ALICE_TOKEN,
        &[
            "submit",
            "--cpu",
            "1",
            "--memory",
            "0.5",
            "busybox:1.36",
            "--",
            "sh",
            "-c",
            "echo hi",
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let cli_task = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert!(cli_task.starts_with("task-"), "{cli_task}");

    // Listing: newest first, only alice's own.
    let (status, list) = host
        .call(Method::GET, "/v1/tasks", Some(ALICE_TOKEN), None, &[])
        .await;
    assert_eq!(status, 200, "{list}");
    let ids: Vec<&str> = list["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|t| t["task_id"].as_str())
        .collect();
    assert_eq!(ids, [cli_task.as_str(), task_id.as_str()]);
    let out = host.cli(ALICE_TOKEN, &["tasks", "--output", "json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let cli_list: Value = serde_json::from_slice(&out.stdout).expect("json output");
    assert_eq!(cli_list["tasks"].as_array().map(Vec::len), Some(2));

    // Bob cannot see, list or cancel alice's task.
    let path = format!("/v1/tasks/{task_id}");
    let (status, body) = host
        .call(Method::GET, &path, Some(BOB_TOKEN), None, &[])
        .await;
    assert_error(status, &body, 403, "forbidden");
    let (status, body) = host
        .call(
            Method::POST,
            &format!("{path}/cancel"),
            Some(BOB_TOKEN),
            Some("{}"),
            &[],
        )
        .await;
    assert_error(status, &body, 403, "forbidden");
    let (status, list) = host
        .call(Method::GET, "/v1/tasks", Some(BOB_TOKEN), None, &[])
        .await;
    assert_eq!(status, 200);
    assert_eq!(list["tasks"].as_array().map(Vec::len), Some(0), "{list}");

    // Wrong or missing token.
    let (status, body) = host
        .call(Method::GET, &path, Some("cai_u_nope"), None, &[])
        .await;
    assert_error(status, &body, 401, "unauthorized");
    let (status, body) = host.call(Method::GET, &path, None, None, &[]).await;
    assert_error(status, &body, 401, "unauthorized");
    let out = host.cli("cai_u_nope", &["tasks"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("unauthorized"));

    // Bad input: clear errors, nothing stored.
    let bad = [
        (
            r#"{"docker_image": "busybox", "req_cpu": -1}"#,
            422,
            "validation_failed",
        ),
        (
            r#"{"docker_image": "busybox", "req_cpu": 0}"#,
            422,
            "validation_failed",
        ),
        (
            r#"{"docker_image": "busybox", "req_memory": 1e400}"#,
            422,
            "invalid_field",
        ),
        (
            r#"{"docker_image": "Not An Image!"}"#,
            422,
            "validation_failed",
        ),
        (
            r#"{"docker_image": "busybox", "user_id": "bob"}"#,
            422,
            "unknown_field",
        ),
        (
            r#"{"docker_image": "busybox", "req_gpu": "two"}"#,
            422,
            "invalid_field",
        ),
        (r#"{"docker_image": "busybox""#, 400, "invalid_json"),
    ];
    for (body, want_status, want_code) in bad {
        let (status, answer) = host
            .call(
                Method::POST,
                "/v1/tasks",
                Some(ALICE_TOKEN),
                Some(body),
                &[],
            )
            .await;
        assert_error(status, &answer, want_status, want_code);
    }
    let (_, list) = host
        .call(Method::GET, "/v1/tasks", Some(ALICE_TOKEN), None, &[])
        .await;
    assert_eq!(
        list["tasks"].as_array().map(Vec::len),
        Some(2),
        "a rejected request stored something: {list}"
    );

    // No result yet: a clear 404, not a crash.
    let (status, body) = host
        .call(
            Method::GET,
            &format!("{path}/result"),
            Some(ALICE_TOKEN),
            None,
            &[],
        )
        .await;
    assert_error(status, &body, 404, "result_not_found");

    // Alice cancels her queued task: cancelled at once; cancelling again is a conflict.
    let out = host.cli(ALICE_TOKEN, &["cancel", &task_id]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (status, task) = host
        .call(Method::GET, &path, Some(ALICE_TOKEN), None, &[])
        .await;
    assert_eq!(status, 200);
    assert_eq!(task["status"], "cancelled", "{task}");
    let (status, body) = host
        .call(
            Method::POST,
            &format!("{path}/cancel"),
            Some(ALICE_TOKEN),
            Some("{}"),
            &[],
        )
        .await;
    assert_error(status, &body, 409, "task_finished");

    // The admin sees everyone's tasks and can filter by state.
    let (status, list) = host
        .call(
            Method::GET,
            "/v1/tasks?status=cancelled",
            Some(&host.admin_token),
            None,
            &[],
        )
        .await;
    assert_eq!(status, 200, "{list}");
    let ids: Vec<&str> = list["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|t| t["task_id"].as_str())
        .collect();
    assert_eq!(ids, [task_id.as_str()]);
    // Her other task too, so that nothing is left to place once the worker is undrained.
    let (status, body) = host
        .call(
            Method::POST,
            &format!("/v1/tasks/{cli_task}/cancel"),
            Some(ALICE_TOKEN),
            Some("{}"),
            &[],
        )
        .await;
    assert_eq!(
        (status, body["status"].as_str()),
        (200, Some("cancelled")),
        "{body}"
    );

    // Drain, undrain and deregister the worker.
    for action in ["drain", "undrain"] {
        let (status, body) = host
            .call(
                Method::POST,
                &format!("/v1/workers/worker-1/{action}"),
                Some(&host.admin_token),
                Some("{}"),
                &[],
            )
            .await;
        assert_eq!(status, 200, "{action}: {body}");
        assert_eq!(body["draining"], action == "drain", "{body}");
    }
    let (status, body) = host
        .call(
            Method::DELETE,
            "/v1/workers/worker-1",
            Some(&host.admin_token),
            None,
            &[],
        )
        .await;
    assert_eq!(status, 204, "{body}");
    let (status, body) = host
        .call(
            Method::GET,
            "/v1/workers/worker-1",
            Some(&host.admin_token),
            None,
            &[],
        )
        .await;
    assert_error(status, &body, 404, "worker_not_found");

    // The OpenAPI document is served and describes the task routes.
    let (status, doc) = host
        .call(Method::GET, "/v1/openapi.json", None, None, &[])
        .await;
    assert_eq!(status, 200);
    assert!(doc["paths"]["/v1/tasks"].is_object(), "{doc}");
}
