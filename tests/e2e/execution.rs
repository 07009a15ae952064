//! Execution end to end on the real Docker engine: `cloudai serve` with its local worker takes
//! tasks over HTTP and runs them as containers of a locally built busybox image (no registry
//! is reachable). Needs Docker: skipped with a message without it, a failure under `CI`.

use std::process::Command;
use std::time::{Duration, Instant};

use reqwest::Method;
use serde_json::{Value, json};

use crate::harness::{ALICE_TOKEN, StoreKind, TestHost};

pub(crate) const IMAGE: &str = "cloudai-test/busybox:1";

/// Builds the test image; `None` (skip) when no Docker engine answers outside CI.
pub(crate) async fn docker_ready() -> Option<()> {
    match cloudai::executor::connect().await {
        Ok(docker) => {
            cloudai::executor::testimage::ensure_busybox_image(&docker, IMAGE)
                .await
                .expect("building the busybox test image");
            Some(())
        }
        Err(error) => {
            assert!(
                std::env::var_os("CI").is_none(),
                "CI needs a Docker engine: {error}"
            );
            eprintln!("no Docker engine ({error}): skipping the execution e2e tests");
            None
        }
    }
}

/// `docker ps -a` of the containers of one task.
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

pub(crate) struct Cluster {
    pub(crate) host: TestHost,
}

impl Cluster {
    /// A host with its local worker, once the worker has joined.
    pub(crate) async fn start() -> Cluster {
        let host = TestHost::start_with(StoreKind::Embedded, &["--stop-grace-s", "1"])
            .expect("host starts");
        let started = Instant::now();
        loop {
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
                assert_eq!(body["workers"][0]["labels"]["cloudai.local"], "true");
                break;
            }
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "the local worker did not join: {body}\n{}",
                host.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Cluster { host }
    }

    async fn submit(&self, spec: Value) -> String {
        crate::harness::submit_task(&self.host, ALICE_TOKEN, &spec).await
    }

    async fn task(&self, id: &str) -> Value {
        self.host
            .call(
                Method::GET,
                &format!("/v1/tasks/{id}"),
                Some(ALICE_TOKEN),
                None,
                &[],
            )
            .await
            .1
    }

    /// Polls until the task is in a final state (or `until` holds); fails after `within`.
    async fn wait_for(&self, id: &str, within: Duration, until: impl Fn(&Value) -> bool) -> Value {
        let started = Instant::now();
        loop {
            let task = self.task(id).await;
            if until(&task) {
                return task;
            }
            assert!(
                started.elapsed() < within,
                "task {id} not there within {within:?}: {task}\nhost log:\n{}",
                self.host.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn finished(&self, id: &str, within: Duration) -> Value {
        self.wait_for(id, within, |t| {
            ["completed", "failed", "cancelled"].contains(&t["status"].as_str().unwrap_or(""))
        })
        .await
    }

    async fn result(&self, id: &str) -> Value {
        self.host
            .call(
                Method::GET,
                &format!("/v1/tasks/{id}/result"),
                Some(ALICE_TOKEN),
                None,
                &[],
            )
            .await
            .1
    }

    async fn allocated_cpu(&self) -> f64 {
        let (_, body) = self
            .host
            .call(
                Method::GET,
                "/v1/workers",
                Some(&self.host.admin_token),
                None,
                &[],
            )
            .await;
        body["workers"][0]["allocated_cpu"].as_f64().unwrap()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tasks_run_as_containers_on_the_local_worker() {
    if docker_ready().await.is_none() {
        return;
    }
    let c = Cluster::start().await;

    // Submitted and started by the same request path; stdout in the result, stderr apart.
    let echo = c
        .submit(
            json!({"docker_image": IMAGE, "command": "sh -c 'echo hello; echo oops >&2'",
            "req_cpu": 0.5, "req_memory": 0.25}),
        )
        .await;
    let exit3 = c
        .submit(
            json!({"docker_image": IMAGE, "command": "sh -c 'exit 3'", "req_cpu": 0.25,
            "req_memory": 0.25}),
        )
        .await;
    let task = c.finished(&echo, Duration::from_secs(60)).await;
    assert_eq!(task["status"], "completed", "{task}");
    assert!(task["started_at"].is_string(), "{task}");
    let result = c.result(&echo).await;
    assert_eq!(result["logs"], "hello\n", "{result}");
    assert_eq!(result["stderr"], "oops\n", "{result}");
    assert_eq!(result["exit_code"], 0);
    let task = c.finished(&exit3, Duration::from_secs(60)).await;
    assert_eq!(
        (&task["status"], &task["exit_code"]),
        (&json!("failed"), &json!(3)),
        "{task}"
    );
    assert_eq!(task["error"], "exited with code 3");

    // A memory hog over its request is OOM-killed and reported so.
    let hog = c
        .submit(
            json!({"docker_image": IMAGE, "command": "sh -c 'tail /dev/zero'",
            "req_cpu": 0.25, "req_memory": 0.015625}),
        )
        .await;
    let task = c.finished(&hog, Duration::from_secs(60)).await;
    assert_eq!(task["status"], "failed", "{task}");
    assert!(
        task["error"].as_str().unwrap().starts_with("oom_killed"),
        "{task}"
    );
    assert_eq!(c.result(&hog).await["oom_killed"], true);

    // A missing image fails fast with a clear error, and its reservation comes back.
    let missing = c
        .submit(json!({"docker_image": "cloudai-test/no-such-image:1", "req_cpu": 0.25}))
        .await;
    let task = c.finished(&missing, Duration::from_secs(60)).await;
    assert_eq!(task["status"], "failed", "{task}");
    assert!(
        task["error"]
            .as_str()
            .unwrap()
            .starts_with("image_pull_failed"),
        "{task}"
    );

    // The CPU limit is on the container; a cancel stops it within seconds and removes it.
    let sleeper = c
        .submit(
            json!({"docker_image": IMAGE, "command": "sleep 300", "req_cpu": 0.5,
            "req_memory": 0.25}),
        )
        .await;
    c.wait_for(&sleeper, Duration::from_secs(60), |t| {
        t["started_at"].is_string()
    })
    .await;
    let ids = containers_of(&sleeper);
    assert_eq!(ids.len(), 1, "{ids:?}");
    let inspect = Command::new("docker")
        .args([
            "inspect",
            "-f",
            "{{.HostConfig.NanoCpus}} {{.HostConfig.NetworkMode}}",
            &ids[0],
        ])
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&inspect.stdout).trim(),
        "500000000 none"
    );
    let cancelled_at = Instant::now();
    let (status, body) = c
        .host
        .call(
            Method::POST,
            &format!("/v1/tasks/{sleeper}/cancel"),
            Some(ALICE_TOKEN),
            None,
            &[],
        )
        .await;
    assert_eq!(status, 202, "{body}");
    let task = c.finished(&sleeper, Duration::from_secs(20)).await;
    assert_eq!(task["status"], "cancelled", "{task}");
    eprintln!(
        "cancel of a running sleep 300: {:?}",
        cancelled_at.elapsed()
    );
    assert!(
        containers_of(&sleeper).is_empty(),
        "the container is removed"
    );

    // A timeout of 2 s on sleep 60 fails it with `timeout`.
    let slow = c
        .submit(
            json!({"docker_image": IMAGE, "command": "sleep 60", "timeout_s": 2,
            "req_cpu": 0.25, "req_memory": 0.25}),
        )
        .await;
    let task = c.finished(&slow, Duration::from_secs(40)).await;
    assert_eq!(task["status"], "failed", "{task}");
    assert!(
        task["error"].as_str().unwrap().starts_with("timeout"),
        "{task}"
    );
    let started = Instant::now();
    while !containers_of(&slow).is_empty() {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the container is removed"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Every reservation came back.
    let started = Instant::now();
    while c.allocated_cpu().await != 0.0 {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "reservations not returned"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
