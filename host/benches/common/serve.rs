//! A real `cloudai serve` process for the benches that go through the HTTP API.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

pub struct Host {
    child: std::process::Child,
    pub url: String,
    pub token: String,
    pub join_token: String,
    pub http: reqwest::Client,
    _dir: tempfile::TempDir,
}

impl Drop for Host {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let _ = self.child.wait();
    }
}

impl Host {
    /// `cloudai serve` on a loopback port and a fresh data dir, with `extra` flags.
    pub fn start(extra: &[&str]) -> Host {
        let dir = tempfile::tempdir().unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_cloudai"))
            .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(dir.path())
            .args(extra)
            // BENCH_HOST_LOG: the host's RUST_LOG, its log appended to BENCH_HOST_LOG_FILE.
            .env(
                "RUST_LOG",
                std::env::var("BENCH_HOST_LOG")
                    .unwrap_or_else(|_| "warn,cloudai::serve=info".into()),
            )
            .env_remove("CLOUDAI_ADMIN_TOKEN")
            .env_remove("CLOUDAI_JOIN_TOKEN")
            .env_remove("CLOUDAI_MONGODB_URI")
            .stderr(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .expect("starting cloudai serve");
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let mut keep = std::env::var_os("BENCH_HOST_LOG_FILE").and_then(|path| {
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .ok()
        });
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(file) = keep.as_mut() {
                    use std::io::Write;
                    let _ = writeln!(file, "{line}");
                }
                if let Some(rest) = line.split("listening on http://").nth(1) {
                    let address: String = rest.chars().take_while(|c| !c.is_whitespace()).collect();
                    let _ = tx.send(address);
                }
            }
        });
        let address = rx
            .recv_timeout(Duration::from_secs(60))
            .expect("the host listens");
        let secret = |name: &str| {
            std::fs::read_to_string(dir.path().join(name))
                .unwrap()
                .trim()
                .to_string()
        };
        Host {
            child,
            url: format!("http://{address}"),
            token: secret("admin.token"),
            join_token: secret("join.token"),
            http: reqwest::Client::new(),
            _dir: dir,
        }
    }

    /// CPU seconds (user + system) the host process has used so far.
    pub fn cpu_seconds(&self) -> f64 {
        cpu_seconds(&format!("/proc/{}/stat", self.child.id()))
    }

    /// The host's Prometheus text exposition (`/metrics`).
    pub async fn metrics(&self) -> String {
        self.http
            .get(format!("{}/metrics", self.url))
            .bearer_auth(&self.token)
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    pub async fn get(&self, path: &str) -> Value {
        self.http
            .get(format!("{}{path}", self.url))
            .bearer_auth(&self.token)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    /// POSTs `body` with `token`; returns the answer, which must be a success.
    pub async fn post(&self, path: &str, token: &str, body: &Value) -> Value {
        let response = self
            .http
            .post(format!("{}{path}", self.url))
            .bearer_auth(token)
            .json(body)
            .send()
            .await
            .unwrap();
        let status = response.status();
        let body: Value = response.json().await.unwrap();
        assert!(status.is_success(), "POST {path}: {status} {body}");
        body
    }

    /// Submits `spec` as the admin; returns the task id.
    pub async fn submit(&self, spec: &Value) -> String {
        let body = self.post("/v1/tasks", &self.token.clone(), spec).await;
        body["task_id"]
            .as_str()
            .unwrap_or_else(|| panic!("submit: {body}"))
            .to_string()
    }

    /// Polls (every `every`) until `done` holds for the task; returns it.
    pub async fn wait_for(
        &self,
        id: &str,
        every: Duration,
        done: impl Fn(&Value) -> bool,
    ) -> Value {
        let started = Instant::now();
        loop {
            let task = self.get(&format!("/v1/tasks/{id}")).await;
            if done(&task) {
                return task;
            }
            assert!(
                started.elapsed() < Duration::from_secs(120),
                "stuck: {task}"
            );
            tokio::time::sleep(every).await;
        }
    }
}

/// CPU seconds (user + system) of the process whose `/proc/PID/stat` is at `path` (0 when it
/// cannot be read).
pub fn cpu_seconds(path: &str) -> f64 {
    let stat = std::fs::read_to_string(path).unwrap_or_default();
    // The fields after the command name, which is in parentheses and may hold spaces.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    // utime and stime are fields 14 and 15 of the whole line: 12 and 13 after the name.
    let ticks: f64 = [11, 12]
        .iter()
        .filter_map(|&i| fields.get(i).and_then(|v| v.parse::<f64>().ok()))
        .sum();
    ticks / 100.0
}

/// The value of the sample `name` (a full sample name, labels included) in a Prometheus text
/// exposition, 0 when absent.
pub fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| {
            let (sample, value) = l.rsplit_once(' ')?;
            (sample == name).then(|| value.parse().ok()).flatten()
        })
        .unwrap_or(0.0)
}
