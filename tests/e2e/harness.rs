//! Starts a real `cloudai serve` process (the `cloudai-under-test` binary, which is the
//! `cloudai` program) on a free loopback port, with its own data dir, and runs CLI commands.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex, mpsc};
use std::time::Duration;

use anyhow::{Context, bail};
use cloudai::api::auth::sha256_hex;
use serde_json::{Value, json};
use tempfile::TempDir;

pub const ALICE_TOKEN: &str = "cai_u_alice_e2e_token";
pub const BOB_TOKEN: &str = "cai_u_bob_e2e_token";

pub fn binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_cloudai-under-test"))
}

/// Which store the host under test uses.
pub enum StoreKind {
    Embedded,
    /// A fresh database on the MongoDB-protocol server at this URI.
    Mongo(String),
    /// This database on the MongoDB-protocol server at this URI: several hosts given the same
    /// one are replicas of one cluster.
    MongoDatabase {
        uri: String,
        database: String,
    },
}

pub struct TestHost {
    child: Child,
    pub url: String,
    /// Kept so that the directory lives as long as the host.
    _data_dir: TempDir,
    pub admin_token: String,
    pub join_token: String,
    log: Arc<Mutex<String>>,
}

impl TestHost {
    /// Starts `cloudai serve` with users alice and bob in a tokens file, and no admin token
    /// configured: the host generates one into its data dir, as on a fresh machine.
    pub fn start(store: StoreKind) -> anyhow::Result<TestHost> {
        // No local worker: these tests register simulated workers and count on them alone.
        Self::start_with(store, &["--no-local-worker"])
    }

    /// [`Self::start`] with extra `serve` flags (the local worker runs unless
    /// `--no-local-worker` is among them).
    pub fn start_with(store: StoreKind, extra: &[&str]) -> anyhow::Result<TestHost> {
        let data_dir = tempfile::tempdir().context("creating the data dir")?;
        Self::start_in(store, extra, data_dir)
    }

    /// Stops this host and starts it again on the same data dir (its tokens, its
    /// compiled-policy cache) with this store and these flags.
    pub fn restart(mut self, store: StoreKind, extra: &[&str]) -> anyhow::Result<TestHost> {
        let fresh = tempfile::tempdir().context("creating a data dir")?;
        let data_dir = std::mem::replace(&mut self._data_dir, fresh);
        drop(self);
        Self::start_in(store, extra, data_dir)
    }

    /// [`Self::start_with`] on a data dir the test prepared.
    pub fn start_in(
        store: StoreKind,
        extra: &[&str],
        data_dir: TempDir,
    ) -> anyhow::Result<TestHost> {
        let tokens_file = data_dir.path().join("tokens.json");
        let tokens = json!({"tokens": [
            {"user_id": "alice", "role": "user", "token_sha256": sha256_hex(ALICE_TOKEN)},
            {"user_id": "bob", "role": "user", "token": BOB_TOKEN},
        ]});
        std::fs::write(&tokens_file, tokens.to_string())?;
        let mut command = Command::new(binary());
        command
            .arg("serve")
            .arg("--listen=127.0.0.1:0")
            .arg("--data-dir")
            .arg(data_dir.path())
            .arg("--tokens-file")
            .arg(&tokens_file)
            .env_remove("CLOUDAI_ADMIN_TOKEN")
            .env_remove("CLOUDAI_JOIN_TOKEN")
            .env_remove("CLOUDAI_MONGODB_URI")
            .args(extra)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        if let StoreKind::Mongo(uri) = &store {
            let database =
                format!("cloudai_e2e_{}", std::process::id()) + &format!("_{}", rand_suffix());
            command
                .arg("--mongodb-uri")
                .arg(uri)
                .arg("--mongodb-database")
                .arg(database);
        }
        if let StoreKind::MongoDatabase { uri, database } = &store {
            command
                .arg("--mongodb-uri")
                .arg(uri)
                .arg("--mongodb-database")
                .arg(database);
        }
        let mut child = command.spawn().context("starting cloudai serve")?;
        let stderr = child.stderr.take().context("no stderr pipe")?;
        let log = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = mpsc::channel();
        let log_writer = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(rest) = line.split("listening on http://").nth(1) {
                    // Text or JSON logs: the address ends at a space or at the closing quote.
                    let address: String = rest
                        .chars()
                        .take_while(|c| !c.is_whitespace() && *c != '"')
                        .collect();
                    let _ = tx.send(address);
                }
                if let Ok(mut log) = log_writer.lock() {
                    log.push_str(&line);
                    log.push('\n');
                }
            }
        });
        let address = match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(address) => address,
            Err(_) => {
                let _ = child.kill();
                let log = log.lock().map(|l| l.clone()).unwrap_or_default();
                bail!("cloudai serve did not start listening within 60 s; its log:\n{log}");
            }
        };
        let admin_token = read_secret(data_dir.path().join("admin.token"))?;
        let join_token = read_secret(data_dir.path().join("join.token"))?;
        Ok(TestHost {
            child,
            url: format!("http://{address}"),
            _data_dir: data_dir,
            admin_token,
            join_token,
            log,
        })
    }

    /// The host's log so far.
    pub fn log(&self) -> String {
        self.log.lock().map(|l| l.clone()).unwrap_or_default()
    }

    /// Waits until the host's log contains `needle`, at most `within`; fails with the log.
    pub async fn wait_for_log(&self, needle: &str, within: Duration) -> anyhow::Result<()> {
        let deadline = std::time::Instant::now() + within;
        while !self.log().contains(needle) {
            if std::time::Instant::now() >= deadline {
                bail!(
                    "the host did not log {needle:?} within {} s; its log:\n{}",
                    within.as_secs(),
                    self.log()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok(())
    }

    /// Sends SIGTERM (what a service manager's stop sends) and waits for the process to exit,
    /// at most `within`: its exit status and how long it took. A process still running then
    /// is killed and reported with its log.
    pub fn terminate(
        &mut self,
        within: Duration,
    ) -> anyhow::Result<(std::process::ExitStatus, Duration)> {
        let sent = std::time::Instant::now();
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .context("running kill -TERM")?;
        if !status.success() {
            bail!("kill -TERM {} failed: {status}", self.child.id());
        }
        loop {
            if let Some(exit) = self.child.try_wait().context("waiting for cloudai serve")? {
                return Ok((exit, sent.elapsed()));
            }
            if sent.elapsed() >= within {
                let _ = self.child.kill();
                let _ = self.child.wait();
                bail!(
                    "cloudai serve did not exit within {} s of SIGTERM; killed. Its log:\n{}",
                    within.as_secs(),
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Runs `cloudai ARGS...` as a client of this host with the given token.
    pub fn cli(&self, token: &str, args: &[&str]) -> Output {
        Command::new(binary())
            .args(args)
            .env("CLOUDAI_HOST", &self.url)
            .env("CLOUDAI_TOKEN", token)
            .output()
            .unwrap_or_else(|e| panic!("running cloudai {args:?}: {e}"))
    }

    /// A raw HTTP request like curl would send; returns the status and the decoded JSON body
    /// (Null when empty).
    pub async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        token: Option<&str>,
        body: Option<&str>,
        headers: &[(&str, &str)],
    ) -> (u16, Value) {
        let client = reqwest::Client::new();
        let mut request = client.request(method, format!("{}{}", self.url, path));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        if let Some(body) = body {
            request = request
                .header("content-type", "application/json")
                .body(body.to_string());
        }
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let response = request
            .send()
            .await
            .unwrap_or_else(|e| panic!("{path}: {e}\nhost log:\n{}", self.log()));
        let status = response.status().as_u16();
        let text = response.text().await.unwrap_or_default();
        let value = if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text)
                .unwrap_or_else(|e| panic!("{path}: answer is not JSON ({e}): {text}"))
        };
        (status, value)
    }
}

impl Drop for TestHost {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn read_secret(path: PathBuf) -> anyhow::Result<String> {
    Ok(std::fs::read_to_string(&path)
        .with_context(|| format!("reading {}", path.display()))?
        .trim()
        .to_string())
}

/// A database name no other test uses.
pub fn unique_database(prefix: &str) -> String {
    format!("{prefix}_{}_{}", std::process::id(), rand_suffix())
}

fn rand_suffix() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!("{nanos:x}")
}

/// The MongoDB-protocol server for tests, from `CLOUDAI_TEST_MONGODB_URI`. Unset: skipped
/// locally, a failure under CI (CI must always run the MongoDB tests).
pub fn mongo_uri() -> Option<String> {
    match std::env::var("CLOUDAI_TEST_MONGODB_URI") {
        Ok(uri) if !uri.is_empty() => Some(uri),
        _ => {
            assert!(
                std::env::var_os("CI").is_none(),
                "CI must set CLOUDAI_TEST_MONGODB_URI (scripts/test.sh does)"
            );
            eprintln!("CLOUDAI_TEST_MONGODB_URI is not set: skipping the MongoDB variant");
            None
        }
    }
}

/// Registers a worker through the API with the join token; returns its token.
pub async fn register_worker(host: &TestHost, id: &str, cpu: f64, memory: f64) -> String {
    let worker = json!({
        "worker_id": id, "worker_ip": "127.0.0.1:50052",
        "total_cpu": cpu, "total_memory": memory, "total_storage": 100.0, "total_gpu": 0.0
    });
    let (status, body) = host
        .call(
            reqwest::Method::POST,
            "/v1/workers",
            Some(&host.join_token),
            Some(&worker.to_string()),
            &[],
        )
        .await;
    assert_eq!(status, 201, "{body}");
    body["token"].as_str().expect("worker token").to_string()
}

/// Sends a simulated worker's heartbeat; returns the host's answer (which carries the worker).
pub async fn heartbeat(host: &TestHost, id: &str, token: &str) -> Value {
    let (status, body) = host
        .call(
            reqwest::Method::POST,
            &format!("/v1/workers/{id}/heartbeat"),
            Some(token),
            Some("{}"),
            &[],
        )
        .await;
    assert_eq!(status, 200, "{body}");
    body
}

/// Sends every `(worker id, token)`'s heartbeat every `every` until the handle is aborted, so
/// that simulated workers stay placement candidates however slow the test is.
pub fn keep_beating(
    host: &TestHost,
    workers: Vec<(String, String)>,
    every: Duration,
) -> tokio::task::JoinHandle<()> {
    let url = host.url.clone();
    tokio::spawn(async move {
        let client = reqwest::Client::new();
        loop {
            for (id, token) in &workers {
                let _ = client
                    .post(format!("{url}/v1/workers/{id}/heartbeat"))
                    .bearer_auth(token)
                    .header("content-type", "application/json")
                    .body("{}")
                    .send()
                    .await;
            }
            tokio::time::sleep(every).await;
        }
    })
}

/// A simulated worker's work list, long-polled for up to `wait_ms`: (assignment id, task id)
/// pairs in the host's order.
pub async fn work_list(
    host: &TestHost,
    id: &str,
    token: &str,
    wait_ms: u64,
) -> Vec<(String, String)> {
    let (status, list) = host
        .call(
            reqwest::Method::GET,
            &format!("/v1/workers/{id}/work?wait_ms={wait_ms}"),
            Some(token),
            None,
            &[],
        )
        .await;
    assert_eq!(status, 200, "{list}");
    let field = |w: &Value, name: &str| w[name].as_str().expect(name).to_string();
    list["work"]
        .as_array()
        .expect("a work list")
        .iter()
        .map(|w| (field(w, "ass_id"), field(w, "task_id")))
        .collect()
}

/// Waits until the task is `running` (placed), failing after 30 s with the host's log.
pub async fn wait_until_running(host: &TestHost, task_id: &str) {
    let started = std::time::Instant::now();
    loop {
        let (_, task) = host
            .call(
                reqwest::Method::GET,
                &format!("/v1/tasks/{task_id}"),
                Some(&host.admin_token),
                None,
                &[],
            )
            .await;
        if task["status"] == "running" {
            return;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "not placed within 30 s: {task}\nhost log:\n{}",
            host.log()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Submits a task with the token's user; returns its id (anything but 201 fails the test).
pub async fn submit_task(host: &TestHost, token: &str, spec: &Value) -> String {
    let (status, body) = host
        .call(
            reqwest::Method::POST,
            "/v1/tasks",
            Some(token),
            Some(&spec.to_string()),
            &[],
        )
        .await;
    assert_eq!(status, 201, "{body}");
    body["task_id"].as_str().expect("task id").to_string()
}

/// Plays a simulated worker's part of a run: reports the assignment started, then completed
/// with exit code 0 and `stdout`.
pub async fn report_completed(
    host: &TestHost,
    worker_id: &str,
    token: &str,
    ass_id: &str,
    stdout: &str,
) {
    let base = format!("/v1/workers/{worker_id}/assignments/{ass_id}");
    let (status, body) = host
        .call(
            reqwest::Method::POST,
            &format!("{base}/started"),
            Some(token),
            Some("{}"),
            &[],
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let report = json!({"outcome": "completed", "exit_code": 0, "stdout": stdout}).to_string();
    let (status, body) = host
        .call(
            reqwest::Method::POST,
            &format!("{base}/result"),
            Some(token),
            Some(&report),
            &[],
        )
        .await;
    assert_eq!(status, 200, "{body}");
}
