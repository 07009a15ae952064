//! A separate `cloudai worker` process joined to a host: it runs tasks as containers; killed
//! mid-task (SIGKILL), its task is re-queued once the host declares it lost; restarted with
//! the same state directory it is the same worker, removes the container it left behind and
//! runs the task again. Needs Docker (skipped without it, a failure under `CI`).

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use reqwest::Method;
use serde_json::{Value, json};

use crate::execution::{IMAGE, containers_of, docker_ready};
use crate::harness::{ALICE_TOKEN, StoreKind, TestHost, binary};

/// A `cloudai worker` process: its log goes to a file (shown by failure messages), and it is
/// killed when dropped, so that a failed test leaves no agent behind.
struct WorkerProcess {
    child: Child,
    log: tempfile::NamedTempFile,
}

impl WorkerProcess {
    fn start(host: &TestHost, state_dir: &std::path::Path) -> WorkerProcess {
        let log = tempfile::NamedTempFile::new().expect("a log file");
        let child = Command::new(binary())
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
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log.reopen().expect("the log file"))
            .spawn()
            .expect("starting cloudai worker");
        WorkerProcess { child, log }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.log.path()).unwrap_or_default()
    }

    /// SIGKILL, as a machine that dies.
    fn kill(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    /// SIGTERM; fails unless it exits within `within`.
    fn terminate(&mut self, within: Duration) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let stopped = Instant::now();
        while self.child.try_wait().unwrap().is_none() {
            assert!(
                stopped.elapsed() < within,
                "the worker did not stop within {within:?} of SIGTERM; its log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for WorkerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn get(host: &TestHost, path: &str, token: &str) -> Value {
    host.call(Method::GET, path, Some(token), None, &[]).await.1
}

/// [`crate::harness::eventually`] with the host's and the worker's logs.
async fn eventually<T>(
    what: &str,
    within: Duration,
    host: &TestHost,
    worker: &WorkerProcess,
    probe: impl AsyncFnMut() -> Result<T, String>,
) -> T {
    host.eventually(what, within)
        .log("worker log", || worker.log())
        .until(probe)
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_process_runs_tasks_and_a_killed_one_gives_its_task_back() {
    if docker_ready().await.is_none() {
        return;
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
    let mut worker = WorkerProcess::start(&host, state.path());
    let admin = host.admin_token.clone();
    let worker_id = eventually(
        "the worker joins",
        Duration::from_secs(30),
        &host,
        &worker,
        async || {
            let body = get(&host, "/v1/workers", &admin).await;
            body["workers"][0]["worker_id"]
                .as_str()
                .map(str::to_string)
                .ok_or_else(|| body.to_string())
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
        &worker,
        async || {
            let body = get(&host, &path, ALICE_TOKEN).await;
            if body["logs"].is_string() {
                Ok(body)
            } else {
                Err(body.to_string())
            }
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
    let task_is = async |done: &dyn Fn(&Value) -> bool| {
        let task = get(&host, &task_path, ALICE_TOKEN).await;
        if done(&task) {
            Ok(task)
        } else {
            Err(task.to_string())
        }
    };
    eventually(
        "the sleeper starts",
        Duration::from_secs(60),
        &host,
        &worker,
        async || task_is(&|t| t["started_at"].is_string()).await,
    )
    .await;
    worker.kill();
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
        &worker,
        async || task_is(&|t| t["status"] == "queued").await,
    )
    .await;
    eprintln!("re-queued {:?} after the kill", killed_at.elapsed());
    assert_eq!(task["attempts"], 1, "{task}");

    // Back with the same identity: the old container is removed, the task runs again.
    let mut worker = WorkerProcess::start(&host, state.path());
    let task = eventually(
        "attempt 2 starts",
        Duration::from_secs(60),
        &host,
        &worker,
        async || task_is(&|t| t["attempts"] == 2 && t["started_at"].is_string()).await,
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
        &worker,
        async || {
            let containers = containers_of(&sleeper);
            if containers.len() == 1 {
                Ok(())
            } else {
                Err(format!("containers {containers:?}"))
            }
        },
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
    eventually(
        "cancelled",
        Duration::from_secs(20),
        &host,
        &worker,
        async || task_is(&|t| t["status"] == "cancelled").await,
    )
    .await;
    assert!(
        containers_of(&sleeper).is_empty(),
        "no container left behind"
    );
    worker.terminate(Duration::from_secs(15));
}
