//! Serverless invoke, live logs and output files end to end: `cloudai serve` with its local
//! worker on the real Docker engine (the locally built busybox test image), driven over HTTP
//! and through the real CLI. Needs Docker: skipped with a message without it, a failure
//! under `CI`.

use std::time::{Duration, Instant};

use reqwest::Method;
use serde_json::{Value, json};

use crate::execution::{IMAGE, docker_ready};
use crate::harness::{ALICE_TOKEN, BOB_TOKEN, REQUEST_TIMEOUT, StoreKind, TestHost, within};

/// A host with its local worker, once the worker has joined.
async fn host_with_worker() -> TestHost {
    let host =
        TestHost::start_with(StoreKind::Embedded, &["--stop-grace-s", "1"]).expect("host starts");
    host.eventually("the local worker to join", Duration::from_secs(30))
        .every(Duration::from_millis(50))
        .until(async || {
            let (_, body) = host
                .call(
                    Method::GET,
                    "/v1/workers",
                    Some(&host.admin_token),
                    None,
                    &[],
                )
                .await;
            if body["workers"].as_array().is_some_and(|w| w.len() == 1) {
                Ok(())
            } else {
                Err(body.to_string())
            }
        })
        .await;
    host
}

/// A request that waits up to 60 s on purpose (`?wait=60s`) may take that long, and a little.
const WAITING_CALL: Duration = Duration::from_secs(90);

fn small(command: &str) -> Value {
    json!({"docker_image": IMAGE, "command": command, "req_cpu": 0.25, "req_memory": 0.25})
}

async fn submit(host: &TestHost, spec: Value) -> String {
    crate::harness::submit_task(host, ALICE_TOKEN, &spec).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submit_wait_returns_the_result_in_one_call_with_the_tasks_exit_code() {
    if docker_ready().await.is_none() {
        return;
    }
    let host = host_with_worker().await;
    let flags = ["--cpu", "0.25", "--memory", "0.25", "--wait=60s"];

    let started = Instant::now();
    let out = host.cli(
        ALICE_TOKEN,
        &[&["submit"][..], &flags, &[IMAGE, "--", "echo", "hello"]].concat(),
    );
    let elapsed = started.elapsed();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        host.log()
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "hello\n");
    eprintln!("submit --wait of echo hello took {elapsed:?}");

    let out = host.cli(
        ALICE_TOKEN,
        &[
            &["submit"][..],
            &flags,
            &[IMAGE, "--", "sh", "-c", "echo oops >&2; exit 3"],
        ]
        .concat(),
    );
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("oops"), "{stderr}");
    assert!(stderr.contains("failed"), "{stderr}");

    // Over HTTP: 200 with the result inline.
    let (status, body) = host
        .call_within(
            WAITING_CALL,
            Method::POST,
            "/v1/tasks?wait=60s",
            Some(ALICE_TOKEN),
            Some(&small("echo hello").to_string()),
            &[],
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["status"], "completed", "{body}");
    assert_eq!(body["result"]["logs"], "hello\n", "{body}");
    assert_eq!(body["result"]["exit_code"], 0, "{body}");

    // Still running after the wait: 202, and the CLI says so with exit code 124.
    let (status, body) = host
        .call(
            Method::POST,
            "/v1/tasks?wait=200ms",
            Some(ALICE_TOKEN),
            Some(&small("sleep 5").to_string()),
            &[],
        )
        .await;
    assert_eq!(status, 202, "{body}");
    assert!(body.get("result").is_none(), "{body}");
    let out = host.cli(
        ALICE_TOKEN,
        &[
            "submit",
            "--cpu",
            "0.25",
            "--memory",
            "0.25",
            "--wait=300ms",
            IMAGE,
            "--",
            "sleep",
            "5",
        ],
    );
    assert_eq!(out.status.code(), Some(124), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("logs -f"));

    // The two sleepers are cancelled, so that the host stopped at the end of the test leaves
    // no container behind.
    let (_, running) = host
        .call(
            Method::GET,
            "/v1/tasks?status=running",
            Some(ALICE_TOKEN),
            None,
            &[],
        )
        .await;
    let (_, queued) = host
        .call(
            Method::GET,
            "/v1/tasks?status=queued",
            Some(ALICE_TOKEN),
            None,
            &[],
        )
        .await;
    for task in [&running, &queued]
        .into_iter()
        .flat_map(|list| list["tasks"].as_array().into_iter().flatten())
    {
        let id = task["task_id"].as_str().unwrap();
        host.call(
            Method::POST,
            &format!("/v1/tasks/{id}/cancel"),
            Some(ALICE_TOKEN),
            None,
            &[],
        )
        .await;
        host.eventually(
            format!("the container of {id} to be removed"),
            Duration::from_secs(30),
        )
        .until(async || {
            let left = crate::execution::containers_of(id);
            if left.is_empty() {
                Ok(())
            } else {
                Err(format!("containers {left:?}"))
            }
        })
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn following_logs_shows_each_line_while_the_task_runs_then_ends() {
    if docker_ready().await.is_none() {
        return;
    }
    let host = host_with_worker().await;
    let task_id = submit(&host, small("sh -c 'echo a; sleep 3; echo b'")).await;

    // The stream stays open while the task runs: its opening and the whole follow are bounded.
    let request = crate::harness::stream_client()
        .get(format!("{}/v1/tasks/{task_id}/logs?follow=true", host.url))
        .bearer_auth(ALICE_TOKEN)
        .send();
    let response = within("the answer to logs?follow=true", REQUEST_TIMEOUT, request)
        .await
        .unwrap_or_else(|e| panic!("GET logs?follow=true: {e}\n{}", host.log()));
    assert_eq!(response.status(), 200);
    let mut response = response;
    let started = Instant::now();
    // The task runs ~3 s once its container starts; the stream ends with it.
    let deadline = started + Duration::from_secs(60);
    let mut text = String::new();
    let mut status_when_a = None;
    let mut a_at = None;
    let mut b_at = None;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let chunk = tokio::time::timeout(left, response.chunk())
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "gave up waiting for the followed logs to end: not within 60 s; so far:\n{text}\nhost log:\n{}",
                    host.log()
                )
            })
            .unwrap_or_else(|e| panic!("reading the followed logs: {e}; so far:\n{text}"));
        let Some(chunk) = chunk else { break };
        text.push_str(&String::from_utf8_lossy(&chunk));
        if a_at.is_none() && text.contains(r#""text":"a\n""#) {
            a_at = Some(started.elapsed());
            let (_, task) = host
                .call(
                    Method::GET,
                    &format!("/v1/tasks/{task_id}"),
                    Some(ALICE_TOKEN),
                    None,
                    &[],
                )
                .await;
            status_when_a = task["status"].as_str().map(str::to_string);
        }
        if b_at.is_none() && text.contains(r#""text":"b\n""#) {
            b_at = Some(started.elapsed());
        }
    }
    let (a_at, b_at) = (a_at.expect(&text), b_at.expect(&text));
    assert_eq!(status_when_a.as_deref(), Some("running"), "{text}");
    assert!(
        b_at >= a_at + Duration::from_secs(2),
        "a at {a_at:?}, b at {b_at:?}"
    );
    let end = text.find("event: end").expect(&text);
    assert!(text.find(r#""text":"b\n""#).unwrap() < end, "{text}");
    assert!(text.contains(r#""status":"completed""#), "{text}");
    eprintln!("follow: a after {a_at:?}, b after {b_at:?} (the task sleeps 3 s between)");

    // The CLI replays a finished task's output and exits with its code.
    let out = host.cli(ALICE_TOKEN, &["logs", "-f", &task_id]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "a\nb\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn output_files_are_listed_and_downloaded_by_their_owner_only() {
    if docker_ready().await.is_none() {
        return;
    }
    let host = host_with_worker().await;
    let (status, body) = host
        .call_within(
            WAITING_CALL,
            Method::POST,
            "/v1/tasks?wait=60s",
            Some(ALICE_TOKEN),
            Some(&small("sh -c 'mkdir -p /output/d && echo data > /output/d/f.txt'").to_string()),
            &[],
        )
        .await;
    assert_eq!(status, 200, "{body}\n{}", host.log());
    assert_eq!(body["status"], "completed", "{body}");
    let task_id = body["task_id"].as_str().unwrap().to_string();

    let (status, list) = host
        .call(
            Method::GET,
            &format!("/v1/tasks/{task_id}/outputs"),
            Some(ALICE_TOKEN),
            None,
            &[],
        )
        .await;
    assert_eq!(status, 200, "{list}");
    assert_eq!(list["files"][0]["path"], "d/f.txt", "{list}");
    assert_eq!(list["files"][0]["size_bytes"], 5, "{list}");
    let out = host.cli(ALICE_TOKEN, &["outputs", &task_id]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("d/f.txt"),
        "{out:?}"
    );

    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("f.txt");
    let out = host.cli(
        ALICE_TOKEN,
        &["outputs", &task_id, "d/f.txt", "-o", file.to_str().unwrap()],
    );
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "data\n");

    let (status, body) = host
        .call(
            Method::GET,
            &format!("/v1/tasks/{task_id}/outputs/d/f.txt"),
            Some(BOB_TOKEN),
            None,
            &[],
        )
        .await;
    assert_eq!(status, 403, "{body}");
    let out = host.cli(BOB_TOKEN, &["outputs", &task_id, "d/f.txt"]);
    assert_ne!(out.status.code(), Some(0));
}
