//! A separate `cloudai worker` process joined to a host: it runs tasks as containers; killed
//! mid-task (SIGKILL), its task is re-queued once the host declares it lost; restarted with
//! the same state directory it is the same worker, removes the container it left behind and
//! runs the task again. Needs Docker (skipped without it, a failure under `CI`).

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use reqwest::Method;
use serde_json::{Value, json};

use crate::harness::{ALICE_TOKEN, StoreKind, TestHost, binary};

const IMAGE: &str = "cloudai-test/busybox:1";

fn start_worker(host: &TestHost, state_dir: &std::path::Path) -> Child {
    Command::new(binary())
        .args([
            "worker",
            "--host",
            &host.url,
            "--state-dir",
            state_dir.to_str().unwrap(),
            "--storage-path",
            "/",
            "--heartbeat-interval-s",
            "1",
            "--stop-grace-s",
            "1",
            "--cpu",
            "2",
            "--memory-gb",
            "2",
        ])
        .env("CLOUDAI_JOIN_TOKEN", &host.join_token)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("starting cloudai worker")
}

fn containers_of(task_id: &str) -> Vec<String> {
    let out = Command::new("docker")
        .args([
            "ps",
            "-a",
            "-q",
            "--filter",
            &format!("label=cloudai.task_id={task_id}"),
        ])
        .output()
        .expect("running docker ps");
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .map(str::to_string)
        .collect()
}

async fn get(host: &TestHost, path: &str, token: &str) -> Value {
    host.call(Method::GET, path, Some(token), None, &[]).await.1
}

async fn eventually<T>(
    what: &str,
    within: Duration,
    host: &TestHost,
    mut probe: impl AsyncFnMut() -> Option<T>,
) -> T {
    let started = Instant::now();
    loop {
        if let Some(value) = probe().await {
            return value;
        }
        assert!(
            started.elapsed() < within,
            "{what}: not within {within:?}\nhost log:\n{}",
            host.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_process_runs_tasks_and_a_killed_one_gives_its_task_back() {
    match cloudai::executor::connect().await {
        Ok(docker) => cloudai::executor::testimage::ensure_busybox_image(&docker, IMAGE)
            .await
            .expect("building the test image"),
        Err(error) => {
            assert!(std::env::var_os("CI").is_none(), "CI needs Docker: {error}");
            eprintln!("no Docker engine ({error}): skipping");
            return;
        }
    }
    let host = TestHost::start_with(
        StoreKind::Embedded,
        &[
            "--no-local-worker",
            "--heartbeat-staleness-s",
            "3",
            "--reconcile-interval-ms",
            "200",
            "--reconcile-settle-s",
            "1",
        ],
    )
    .expect("host starts");
    let state = tempfile::tempdir().unwrap();
    let mut worker = start_worker(&host, state.path());
    let admin = host.admin_token.clone();
    let worker_id = eventually(
        "the worker joins",
        Duration::from_secs(30),
        &host,
        async || {
            let body = get(&host, "/v1/workers", &admin).await;
            body["workers"][0]["worker_id"].as_str().map(str::to_string)
        },
    )
    .await;

    // It runs a task.
    let submit = async |spec: Value| {
        let (status, body) = host
            .call(
                Method::POST,
                "/v1/tasks",
                Some(ALICE_TOKEN),
                Some(&spec.to_string()),
                &[],
            )
            .await;
        assert_eq!(status, 201, "{body}");
        body["task_id"].as_str().unwrap().to_string()
    };
    let echo = submit(
        json!({"docker_image": IMAGE, "command": "echo hello", "req_cpu": 0.5,
        "req_memory": 0.25}),
    )
    .await;
    let path = format!("/v1/tasks/{echo}/result");
    let result = eventually(
        "echo completes",
        Duration::from_secs(60),
        &host,
        async || {
            let body = get(&host, &path, ALICE_TOKEN).await;
            body["logs"].is_string().then_some(body)
        },
    )
    .await;
    assert_eq!(result["logs"], "hello\n", "{result}");
    assert_eq!(result["worker_id"], worker_id.as_str());

    // Killed mid-task: the task goes back to the queue once the worker is declared lost.
    let sleeper = submit(
        json!({"docker_image": IMAGE, "command": "sleep 300", "req_cpu": 0.5,
        "req_memory": 0.25, "max_attempts": 3}),
    )
    .await;
    let task_path = format!("/v1/tasks/{sleeper}");
    eventually(
        "the sleeper starts",
        Duration::from_secs(60),
        &host,
        async || {
            let task = get(&host, &task_path, ALICE_TOKEN).await;
            task["started_at"].is_string().then_some(())
        },
    )
    .await;
    worker.kill().unwrap();
    worker.wait().unwrap();
    let killed_at = Instant::now();
    assert_eq!(
        containers_of(&sleeper).len(),
        1,
        "its container outlives the agent"
    );
    let task = eventually(
        "the task is re-queued",
        Duration::from_secs(15),
        &host,
        async || {
            let task = get(&host, &task_path, ALICE_TOKEN).await;
            (task["status"] == "queued").then_some(task)
        },
    )
    .await;
    eprintln!("re-queued {:?} after the kill", killed_at.elapsed());
    assert_eq!(task["attempts"], 1, "{task}");

    // Back with the same identity: the old container is removed, the task runs again.
    let mut worker = start_worker(&host, state.path());
    let task = eventually(
        "attempt 2 starts",
        Duration::from_secs(60),
        &host,
        async || {
            let task = get(&host, &task_path, ALICE_TOKEN).await;
            (task["attempts"] == 2 && task["started_at"].is_string()).then_some(task)
        },
    )
    .await;
    assert_eq!(task["status"], "running", "{task}");
    let workers = get(&host, "/v1/workers", &admin).await;
    assert_eq!(
        workers["workers"].as_array().unwrap().len(),
        1,
        "the same worker"
    );
    assert_eq!(workers["workers"][0]["worker_id"], worker_id.as_str());
    assert_eq!(workers["workers"][0]["is_active"], true);
    eventually(
        "one container for the task",
        Duration::from_secs(20),
        &host,
        async || (containers_of(&sleeper).len() == 1).then_some(()),
    )
    .await;

    // Cancelled: stopped and removed; then the agent stops cleanly.
    let (status, body) = host
        .call(
            Method::POST,
            &format!("/v1/tasks/{sleeper}/cancel"),
            Some(ALICE_TOKEN),
            None,
            &[],
        )
        .await;
    assert_eq!(status, 202, "{body}");
    eventually("cancelled", Duration::from_secs(20), &host, async || {
        let task = get(&host, &task_path, ALICE_TOKEN).await;
        (task["status"] == "cancelled").then_some(())
    })
    .await;
    assert!(
        containers_of(&sleeper).is_empty(),
        "no container left behind"
    );
    let _ = Command::new("kill")
        .args(["-TERM", &worker.id().to_string()])
        .status();
    let stopped = Instant::now();
    loop {
        if worker.try_wait().unwrap().is_some() {
            break;
        }
        assert!(
            stopped.elapsed() < Duration::from_secs(15),
            "the worker stops on SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}
