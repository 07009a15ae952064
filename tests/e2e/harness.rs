//! Starts a real `cloudai serve` process (the `cloudai-under-test` binary, which is the
//! `cloudai` program) on a free loopback port, with its own data dir, and runs CLI commands.
//!
//! Every wait here is bounded, and a test that gives up says what it waited for and what it
//! saw: requests ([`TestHost::call`], [`REQUEST_TIMEOUT`]), CLI commands and other child
//! processes ([`TestHost::cli`], [`run_within`]), polls ([`eventually`]), futures
//! ([`within`]) and background tasks such as simulated workers ([`Background`], stopped and
//! joined within a bound by [`stop_all`]).

use std::future::Future;
use std::io::{BufRead, BufReader, Read};
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use cloudai::api::auth::token_sha256_hex;
use serde_json::{Value, json};
use tempfile::TempDir;
use tokio_util::sync::CancellationToken;

pub const ALICE_TOKEN: &str = "cai_u_alice_e2e_token";
pub const BOB_TOKEN: &str = "cai_u_bob_e2e_token";

pub fn binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_cloudai-under-test"))
}

/// The longest one ordinary request may take: a debug build on a shared two-core machine
/// answers in milliseconds, so a request unanswered after this is stuck. Requests that wait
/// on purpose (`?wait=`, long polls beyond this) use [`TestHost::call_within`].
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// The longest one CLI command may take unless its caller says otherwise
/// ([`TestHost::cli_within`]).
pub const CLI_TIMEOUT: Duration = Duration::from_secs(120);

/// How long a connection to a loopback host may take to open.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// An HTTP client whose every request gives up after [`REQUEST_TIMEOUT`].
pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .connect_timeout(CONNECT_TIMEOUT)
        .timeout(REQUEST_TIMEOUT)
        .build()
        .expect("an HTTP client")
}

/// An HTTP client for streams (Server-Sent Events) that stay open as long as the test reads
/// them: only connecting is bounded here, so each read must be bounded by its caller (e.g.
/// with [`within`] or `tokio::time::timeout`).
pub fn stream_client() -> reqwest::Client {
    reqwest::Client::builder()
        .connect_timeout(CONNECT_TIMEOUT)
        .build()
        .expect("an HTTP client")
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
    client: reqwest::Client,
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
            {"user_id": "alice", "role": "user", "token_sha256": token_sha256_hex(ALICE_TOKEN)},
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
                if let Some(rest) = line.split("listening on ").nth(1)
                    && (rest.starts_with("http://") || rest.starts_with("https://"))
                {
                    // Text or JSON logs: the URL ends at a space or at the closing quote.
                    let url: String = rest
                        .chars()
                        .take_while(|c| !c.is_whitespace() && *c != '"')
                        .collect();
                    let _ = tx.send(url);
                }
                if let Ok(mut log) = log_writer.lock() {
                    log.push_str(&line);
                    log.push('\n');
                }
            }
        });
        // Listening within 60 s, or the reason it is not: it exited, or it is stuck.
        let started = Instant::now();
        let url = loop {
            match rx.recv_timeout(Duration::from_millis(100)) {
                Ok(url) => break url,
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    // Its stderr closed: it exited (or is about to).
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
            let exited = child.try_wait().context("waiting for cloudai serve")?;
            if exited.is_some() || started.elapsed() >= Duration::from_secs(60) {
                let _ = child.kill();
                let _ = child.wait();
                // The log reader gets a moment to take the last lines.
                std::thread::sleep(Duration::from_millis(200));
                let log = log.lock().map(|l| l.clone()).unwrap_or_default();
                match exited {
                    Some(status) => {
                        bail!("cloudai serve exited ({status}) before it listened; its log:\n{log}")
                    }
                    None => {
                        bail!("cloudai serve did not start listening within 60 s; its log:\n{log}")
                    }
                }
            }
        };
        let admin_token = read_secret(data_dir.path().join("admin.token"))?;
        let join_token = read_secret(data_dir.path().join("join.token"))?;
        Ok(TestHost {
            child,
            url,
            _data_dir: data_dir,
            admin_token,
            join_token,
            log,
            client: client(),
        })
    }

    /// Sends this host's requests ([`Self::call`]) through `client` (one that trusts an
    /// HTTPS host's CA, say).
    pub fn use_client(&mut self, client: reqwest::Client) {
        self.client = client;
    }

    /// The host's log so far.
    pub fn log(&self) -> String {
        self.log.lock().map(|l| l.clone()).unwrap_or_default()
    }

    /// The last `lines` lines of the host's log (for failure messages of tests whose hosts
    /// log a lot).
    pub fn log_tail(&self, lines: usize) -> String {
        let log = self.log();
        let all: Vec<&str> = log.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// [`eventually`], failing with this host's log.
    pub fn eventually(&self, what: impl Into<String>, within: Duration) -> Eventually<'_> {
        eventually(what, within).host(self)
    }

    /// Waits until the host's log contains `needle`, at most `within`; fails with the log.
    pub async fn wait_for_log(&self, needle: &str, within: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + within;
        while !self.log().contains(needle) {
            if Instant::now() >= deadline {
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

    /// Sends `signal` (`HUP`, ...) to the host process.
    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.child.id().to_string())
            .status()
            .expect("running kill");
        assert!(
            status.success(),
            "kill -{signal} {} failed",
            self.child.id()
        );
    }

    /// Sends SIGTERM (what a service manager's stop sends) and waits for the process to exit,
    /// at most `within`: its exit status and how long it took. A process still running then
    /// is killed and reported with its log.
    pub fn terminate(
        &mut self,
        within: Duration,
    ) -> anyhow::Result<(std::process::ExitStatus, Duration)> {
        let sent = Instant::now();
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

    /// Runs `cloudai ARGS...` as a client of this host with the given token, at most
    /// [`CLI_TIMEOUT`].
    pub fn cli(&self, token: &str, args: &[&str]) -> Output {
        self.cli_within(CLI_TIMEOUT, token, args)
    }

    /// [`Self::cli`] for a command that may take up to `within`: killed then, and the test
    /// fails with what it printed so far and the host's log.
    pub fn cli_within(&self, within: Duration, token: &str, args: &[&str]) -> Output {
        let mut command = Command::new(binary());
        command
            .args(args)
            .env("CLOUDAI_HOST", &self.url)
            .env("CLOUDAI_TOKEN", token);
        run_within(&format!("cloudai {args:?}"), &mut command, within)
            .unwrap_or_else(|e| panic!("{e}\nhost log:\n{}", self.log()))
    }

    /// A raw HTTP request like curl would send, answered within [`REQUEST_TIMEOUT`]; returns
    /// the status and the decoded JSON body (Null when empty).
    pub async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        token: Option<&str>,
        body: Option<&str>,
        headers: &[(&str, &str)],
    ) -> (u16, Value) {
        self.call_within(REQUEST_TIMEOUT, method, path, token, body, headers)
            .await
    }

    /// [`Self::call`] for a request that may take up to `within` (one that waits on purpose,
    /// like `POST /v1/tasks?wait=60s`); the test fails with the host's log when it does not
    /// answer in time.
    pub async fn call_within(
        &self,
        within: Duration,
        method: reqwest::Method,
        path: &str,
        token: Option<&str>,
        body: Option<&str>,
        headers: &[(&str, &str)],
    ) -> (u16, Value) {
        let mut request = self
            .client
            .request(method.clone(), format!("{}{}", self.url, path))
            .timeout(within);
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
        let response = request.send().await.unwrap_or_else(|e| {
            let why = if e.is_timeout() {
                format!("no answer within {within:?}")
            } else {
                e.to_string()
            };
            panic!("{method} {path}: {why}\nhost log:\n{}", self.log())
        });
        let status = response.status().as_u16();
        let text = response.text().await.unwrap_or_else(|e| {
            panic!(
                "{method} {path}: reading the {status} answer: {e}\nhost log:\n{}",
                self.log()
            )
        });
        let value = if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text)
                .unwrap_or_else(|e| panic!("{method} {path}: answer is not JSON ({e}): {text}"))
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

/// Sends every `(worker id, token)`'s heartbeat every `every` until stopped (or dropped), so
/// that simulated workers stay placement candidates however slow the test is. Each heartbeat
/// is bounded by [`REQUEST_TIMEOUT`]; a failed one is retried at the next beat.
pub fn keep_beating(
    host: &TestHost,
    workers: Vec<(String, String)>,
    every: Duration,
) -> Background {
    let url = host.url.clone();
    let names: Vec<&str> = workers.iter().map(|(id, _)| id.as_str()).collect();
    let what = format!("the heartbeats of {names:?}");
    Background::spawn(what, move |stop| async move {
        let client = client();
        while !stop.is_cancelled() {
            for (id, token) in &workers {
                let beat = client
                    .post(format!("{url}/v1/workers/{id}/heartbeat"))
                    .bearer_auth(token)
                    .header("content-type", "application/json")
                    .body("{}")
                    .send();
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = beat => {}
                }
            }
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(every) => {}
            }
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
    let path = format!("/v1/tasks/{task_id}");
    host.eventually(
        format!("task {task_id} to be placed (running)"),
        Duration::from_secs(30),
    )
    .every(Duration::from_millis(20))
    .until(async || {
        let (_, task) = host
            .call(
                reqwest::Method::GET,
                &path,
                Some(&host.admin_token),
                None,
                &[],
            )
            .await;
        if task["status"] == "running" {
            Ok(())
        } else {
            Err(task.to_string())
        }
    })
    .await
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

// ------------------------------------------------------------------------------------------
// Bounded waits
// ------------------------------------------------------------------------------------------

/// A bounded poll: `eventually("task t1 to complete", Duration::from_secs(60)).until(probe)`
/// calls `probe` every 100 ms (see [`Eventually::every`]) until it returns `Ok`, and fails the
/// test once `within` has passed, naming what it waited for, what the probe saw last (its
/// `Err`) and, with [`Eventually::host`] (or [`TestHost::eventually`]), the host's log.
pub fn eventually(what: impl Into<String>, within: Duration) -> Eventually<'static> {
    Eventually {
        what: what.into(),
        within,
        every: Duration::from_millis(100),
        logs: Vec::new(),
    }
}

/// What a failure message shows besides what the probe saw: a named log, read at failure.
type LogSource<'a> = (String, Box<dyn Fn() -> String + Send + Sync + 'a>);

/// A poll being set up; see [`eventually`].
#[must_use = "a wait does nothing until `until` is awaited"]
pub struct Eventually<'a> {
    what: String,
    within: Duration,
    every: Duration,
    logs: Vec<LogSource<'a>>,
}

impl<'a> Eventually<'a> {
    /// The pause between two checks (100 ms by default; zero when the probe waits itself,
    /// e.g. a long poll).
    pub fn every(mut self, every: Duration) -> Self {
        self.every = every;
        self
    }

    /// Adds this host's log to the failure message.
    pub fn host(self, host: &'a TestHost) -> Self {
        self.log("host log", || host.log())
    }

    /// Adds a log (`read` at failure) to the failure message, under `name`.
    pub fn log(mut self, name: &str, read: impl Fn() -> String + Send + Sync + 'a) -> Self {
        self.logs.push((name.to_string(), Box::new(read)));
        self
    }

    /// Checks until `probe` returns `Ok(value)`: that value. `Err(seen)` says what the probe
    /// saw, for the failure message. A check still running at the deadline is cut short (at
    /// least 10 s after it began: a slow check is not a failed one).
    pub async fn until<T>(self, mut probe: impl AsyncFnMut() -> Result<T, String>) -> T {
        let started = Instant::now();
        let deadline = started + self.within;
        let mut seen = "nothing: no check finished".to_string();
        let mut checks = 0u32;
        loop {
            let left = deadline
                .saturating_duration_since(Instant::now())
                .max(Duration::from_secs(10));
            match tokio::time::timeout(left, probe()).await {
                Ok(Ok(value)) => return value,
                Ok(Err(now)) => {
                    seen = now;
                    checks += 1;
                }
                Err(_) => {
                    seen = format!("{seen}\n(and the check running at the deadline was cut short)");
                    self.fail(&seen, checks, started);
                }
            }
            let now = Instant::now();
            if now >= deadline {
                self.fail(&seen, checks, started);
            }
            tokio::time::sleep(self.every.min(deadline - now)).await;
        }
    }

    fn fail(&self, seen: &str, checks: u32, started: Instant) -> ! {
        let log: String = self
            .logs
            .iter()
            .map(|(name, read)| format!("\n{name}:\n{}", read()))
            .collect();
        panic!(
            "gave up waiting for {} after {:.1?} (limit {:?}, {checks} checks); last seen: {seen}{log}",
            self.what,
            started.elapsed(),
            self.within
        )
    }
}

/// Awaits `future` at most `limit`; the test fails naming `what` when it takes longer.
pub async fn within<T>(what: &str, limit: Duration, future: impl Future<Output = T>) -> T {
    match tokio::time::timeout(limit, future).await {
        Ok(value) => value,
        Err(_) => panic!("gave up waiting for {what}: not done within {limit:?}"),
    }
}

/// Runs `command` to its end with stdin closed and stdout and stderr captured, at most
/// `within`: killed then, and `Err` says what ran and what it had printed. `what` names the
/// command in messages.
pub fn run_within(what: &str, command: &mut Command, within: Duration) -> Result<Output, String> {
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("starting {what}: {e}"))?;
    let stdout = Captured::start(child.stdout.take());
    let stderr = Captured::start(child.stderr.take());
    let started = Instant::now();
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) => {}
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("waiting for {what}: {e}"));
            }
        }
        if started.elapsed() >= within {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!(
                "{what} did not finish within {within:?}: killed. Its stdout so far:\n{}\nits stderr so far:\n{}",
                String::from_utf8_lossy(&stdout.now()),
                String::from_utf8_lossy(&stderr.now())
            ));
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    // A grandchild that kept the pipes open must not hold the test: what came within 5 s.
    let rest = Duration::from_secs(5);
    Ok(Output {
        status,
        stdout: stdout.finish(rest),
        stderr: stderr.finish(rest),
    })
}

/// One output pipe of a child process, read by a thread into a buffer.
struct Captured {
    buffer: Arc<Mutex<Vec<u8>>>,
    done: mpsc::Receiver<()>,
}

impl Captured {
    fn start(pipe: Option<impl Read + Send + 'static>) -> Captured {
        let buffer = Arc::new(Mutex::new(Vec::new()));
        let (tx, done) = mpsc::channel();
        let writer = buffer.clone();
        std::thread::spawn(move || {
            if let Some(mut pipe) = pipe {
                let mut chunk = [0u8; 8192];
                while let Ok(n) = pipe.read(&mut chunk) {
                    if n == 0 {
                        break;
                    }
                    if let Ok(mut buffer) = writer.lock() {
                        buffer.extend_from_slice(&chunk[..n]);
                    }
                }
            }
            let _ = tx.send(());
        });
        Captured { buffer, done }
    }

    /// What was read so far.
    fn now(&self) -> Vec<u8> {
        self.buffer.lock().map(|b| b.clone()).unwrap_or_default()
    }

    /// Everything, once the pipe closed (at most `within` from now).
    fn finish(self, within: Duration) -> Vec<u8> {
        let _ = self.done.recv_timeout(within);
        self.now()
    }
}

/// A background task of a test (a simulated worker, a heartbeat loop). It is told to stop
/// through its [`CancellationToken`], and [`stop_all`] joins it within a bound; dropped (a test
/// that failed first), it is cancelled and aborted, so that nothing outlives its test.
pub struct Background {
    what: String,
    stop: CancellationToken,
    handle: Option<tokio::task::JoinHandle<()>>,
}

impl Background {
    /// Spawns `task(stop)`: it must return soon after `stop` is cancelled.
    pub fn spawn<F, Fut>(what: impl Into<String>, task: F) -> Background
    where
        F: FnOnce(CancellationToken) -> Fut,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let stop = CancellationToken::new();
        let handle = tokio::spawn(task(stop.clone()));
        Background {
            what: what.into(),
            stop,
            handle: Some(handle),
        }
    }

    /// Stops it and waits for it to end, at most `within`; see [`stop_all`].
    pub async fn stop(self, within: Duration) {
        stop_all(vec![self], within).await;
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        self.stop.cancel();
        if let Some(handle) = &self.handle {
            handle.abort();
        }
    }
}

/// Tells every task to stop, then joins them, all within `within`: the test fails naming each
/// task that panicked or was still running then (those are aborted).
pub async fn stop_all(tasks: impl IntoIterator<Item = Background>, within: Duration) {
    let tasks: Vec<Background> = tasks.into_iter().collect();
    for task in &tasks {
        task.stop.cancel();
    }
    let deadline = Instant::now() + within;
    let mut failures = Vec::new();
    for mut task in tasks {
        let Some(mut handle) = task.handle.take() else {
            continue;
        };
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, &mut handle).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) if e.is_panic() => {
                let panic = e.into_panic();
                let message = panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_else(|| "(no message)".to_string());
                failures.push(format!("{} panicked: {message}", task.what));
            }
            Ok(Err(e)) => failures.push(format!("{}: {e}", task.what)),
            Err(_) => {
                handle.abort();
                failures.push(format!(
                    "{} was still running {within:?} after it was told to stop",
                    task.what
                ));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

// ------------------------------------------------------------------------------------------
// The bounded waits themselves
// ------------------------------------------------------------------------------------------

/// Runs `test` on a runtime of its own in a thread of its own; the message it panicked with.
fn panic_message_of<F: Future<Output = ()>>(test: impl FnOnce() -> F + Send + 'static) -> String {
    let panic = std::thread::spawn(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(test())
    })
    .join()
    .expect_err("it should have failed");
    panic
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_default()
}

#[tokio::test]
async fn eventually_gives_up_in_time_naming_what_it_waited_for_and_what_it_saw() {
    let started = Instant::now();
    let message = panic_message_of(|| async {
        let mut n = 40;
        eventually("the answer to be 42", Duration::from_millis(300))
            .every(Duration::from_millis(10))
            .log("the oracle's log", || "thinking...".to_string())
            .until(async || {
                n = 41;
                if n == 42 {
                    Ok(())
                } else {
                    Err(format!("it is {n}"))
                }
            })
            .await
    });
    assert!(started.elapsed() < Duration::from_secs(2), "{message}");
    for part in [
        "gave up waiting for the answer to be 42",
        "last seen: it is 41",
        "the oracle's log:\nthinking...",
    ] {
        assert!(message.contains(part), "no {part:?} in {message:?}");
    }
    // And it returns the value as soon as the probe has it.
    let mut calls = 0;
    let value = eventually("the third call", Duration::from_secs(5))
        .every(Duration::ZERO)
        .until(async || {
            calls += 1;
            if calls == 3 {
                Ok(calls)
            } else {
                Err(String::new())
            }
        })
        .await;
    assert_eq!(value, 3);
}

#[test]
fn run_within_kills_a_command_that_runs_too_long_and_shows_what_it_printed() {
    let started = Instant::now();
    let error = run_within(
        "the sleeper",
        Command::new("sh").args(["-c", "echo started; exec sleep 60"]),
        Duration::from_millis(500),
    )
    .expect_err("it should have been killed");
    assert!(started.elapsed() < Duration::from_secs(5), "{error}");
    assert!(
        error.contains("the sleeper did not finish within 500ms: killed"),
        "{error}"
    );
    assert!(error.contains("started"), "{error}");
    let out = run_within(
        "echo",
        Command::new("sh").args(["-c", "echo out; echo err >&2; exit 3"]),
        Duration::from_secs(10),
    )
    .unwrap();
    assert_eq!(
        (out.status.code(), &out.stdout[..], &out.stderr[..]),
        (Some(3), &b"out\n"[..], &b"err\n"[..])
    );
}

#[test]
fn stop_all_names_the_tasks_that_ignore_their_stop_or_panic_and_joins_the_others() {
    let finished = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = finished.clone();
    let started = Instant::now();
    let message = panic_message_of(move || async move {
        let polite = Background::spawn("the polite one", move |stop| async move {
            stop.cancelled().await;
            flag.store(true, std::sync::atomic::Ordering::Relaxed);
        });
        let deaf = Background::spawn("the deaf one", |_stop| async {
            tokio::time::sleep(Duration::from_secs(3600)).await;
        });
        let broken = Background::spawn("the broken one", |_stop| async {
            panic!("it broke");
        });
        stop_all([polite, deaf, broken], Duration::from_millis(300)).await;
    });
    assert!(started.elapsed() < Duration::from_secs(2), "{message}");
    assert!(finished.load(std::sync::atomic::Ordering::Relaxed));
    assert!(
        message.contains("the deaf one was still running 300ms after it was told to stop"),
        "{message}"
    );
    assert!(
        message.contains("the broken one panicked: it broke"),
        "{message}"
    );
    assert!(!message.contains("polite"), "{message}");
}

/// `CLOUDAI_POLICY_WASM_DIR`, the built policy guests (scripts/build-policies.sh DIR); `None`
/// locally when it is not set (saying what is left out: `without`), a failure under CI.
pub fn policy_wasm_dir(without: &str) -> Option<PathBuf> {
    match std::env::var_os("CLOUDAI_POLICY_WASM_DIR") {
        Some(dir) => Some(PathBuf::from(dir)),
        None => {
            assert!(
                std::env::var_os("CI").is_none(),
                "CI must set CLOUDAI_POLICY_WASM_DIR (scripts/build-policies.sh DIR)"
            );
            eprintln!("CLOUDAI_POLICY_WASM_DIR is not set: {without}");
            None
        }
    }
}
