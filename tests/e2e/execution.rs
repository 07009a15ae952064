//! Execution end to end on the real Docker engine: `cloudai serve` with its local worker takes
//! tasks over HTTP and runs them as containers of a locally built busybox image (no registry
//! is reachable). Needs Docker: skipped with a message without it, a failure under `CI`.

use std::process::Command;
use std::time::{Duration, Instant};

use reqwest::Method;
use serde_json::{Value, json};

use crate::harness::{ALICE_TOKEN, StoreKind, TestHost, run_within, within};

pub(crate) const IMAGE: &str = "cloudai-test/busybox:1";

/// Builds the test image; `None` (skip) when no Docker engine answers outside CI.
pub(crate) async fn docker_ready() -> Option<()> {
    let connected = within(
        "a connection to the Docker engine",
        Duration::from_secs(30),
        cloudai::executor::connect(),
    )
    .await;
    match connected {
        Ok(docker) => {
            within(
                "the busybox test image to be built",
                Duration::from_secs(120),
                cloudai::executor::testimage::ensure_busybox_image(&docker, IMAGE),
            )
            .await
            .expect("building the busybox test image");
            Some(())
        }
        Err(error) => {
            assert!(
                std::env::var_os("CI").is_none(),
                "CI needs a Docker engine: {error}"
            );
            eprintln!("no Docker engine ({error}): skipping this Docker test");
            None
        }
    }
}

/// Runs `docker ARGS...` (at most 30 s); its stdout.
pub(crate) fn docker(args: &[&str]) -> String {
    let out = run_within(
        &format!("docker {args:?}"),
        Command::new("docker").args(args),
        Duration::from_secs(30),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    assert!(
        out.status.success(),
        "docker {args:?}: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `docker ps -a` of the containers of one task.
pub(crate) fn containers_of(task_id: &str) -> Vec<String> {
    docker(&[
        "ps",
        "-a",
        "-q",
        "--filter",
        &format!("label=cloudai.task_id={task_id}"),
    ])
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
        let workers = host
            .eventually("the local worker to join", Duration::from_secs(30))
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
                    Ok(body)
                } else {
                    Err(body.to_string())
                }
            })
            .await;
        assert_eq!(workers["workers"][0]["labels"]["cloudai.local"], "true");
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

    /// Polls until `until` holds of the task; fails after `within`.
    async fn wait_for(&self, id: &str, within: Duration, until: impl Fn(&Value) -> bool) -> Value {
        self.host
            .eventually(format!("task {id}"), within)
            .every(Duration::from_millis(50))
            .until(async || {
                let task = self.task(id).await;
                if until(&task) {
                    Ok(task)
                } else {
                    Err(task.to_string())
                }
            })
            .await
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
    let inspect = docker(&[
        "inspect",
        "-f",
        "{{.HostConfig.NanoCpus}} {{.HostConfig.NetworkMode}}",
        &ids[0],
    ]);
    assert_eq!(inspect.trim(), "500000000 none");
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
    c.host
        .eventually(
            format!("the container of {slow} to be removed"),
            Duration::from_secs(10),
        )
        .until(async || {
            let left = containers_of(&slow);
            if left.is_empty() {
                Ok(())
            } else {
                Err(format!("containers {left:?}"))
            }
        })
        .await;

    // Every reservation came back.
    c.host
        .eventually("every reservation to come back", Duration::from_secs(10))
        .every(Duration::from_millis(50))
        .until(async || {
            let cpu = c.allocated_cpu().await;
            if cpu == 0.0 {
                Ok(())
            } else {
                Err(format!("allocated_cpu {cpu}"))
            }
        })
        .await;
}
