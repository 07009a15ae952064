//! The web dashboard in a real browser: `tests/browser/dashboard.mjs` drives Debian's headless
//! Chromium (through `playwright-core`, no browser download) against a real `cloudai serve`
//! with its local worker on the real Docker engine. It logs in, submits tasks from the form
//! and watches them run live, follows logs, cancels, drains a worker, uploads and activates a
//! policy; screenshots of each page land in `tests/browser/artifacts/`.
//!
//! Needs Docker, Node.js and Chromium: skipped with a message without them, a failure under
//! `CI`.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::execution::{Cluster, IMAGE, docker_ready};
use crate::harness::{ALICE_TOKEN, run_within};

const SCRIPT_TIMEOUT: Duration = Duration::from_secs(300);

fn browser_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("browser")
}

fn chromium() -> PathBuf {
    std::env::var_os("CLOUDAI_CHROMIUM")
        .map_or_else(|| PathBuf::from("/usr/bin/chromium"), PathBuf::from)
}

/// Node.js, Chromium and the policy components are here; `false` (skip) outside CI.
fn tools_ready() -> bool {
    let node = run_within(
        "node --version",
        Command::new("node").arg("--version"),
        Duration::from_secs(60),
    )
    .is_ok_and(|o| o.status.success());
    let missing: Vec<String> = [
        (!node).then(|| "node".to_string()),
        (!chromium().exists()).then(|| chromium().display().to_string()),
        std::env::var_os("CLOUDAI_POLICY_WASM_DIR")
            .is_none()
            .then(|| "CLOUDAI_POLICY_WASM_DIR".to_string()),
    ]
    .into_iter()
    .flatten()
    .collect();
    if missing.is_empty() {
        return true;
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "CI needs these for the browser tests: {missing:?} (.ci/run installs chromium and nodejs)"
    );
    eprintln!("missing {missing:?}: skipping the browser tests");
    false
}

/// `npm ci` when `node_modules` is absent (scripts/test.sh also runs it when the lock changed).
fn npm_ci_if_needed(dir: &Path) {
    if dir.join("node_modules/playwright-core").exists() {
        return;
    }
    let out = run_within(
        "npm ci",
        Command::new("npm")
            .args(["ci", "--no-audit", "--no-fund"])
            .current_dir(dir),
        Duration::from_secs(600),
    )
    .unwrap_or_else(|e| panic!("in {}: {e}", dir.display()));
    assert!(
        out.status.success(),
        "npm ci in {}: {}\n{}",
        dir.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Runs the Node test scripts to their end (killed after `SCRIPT_TIMEOUT`); `(success, its output)`.
fn run_scripts(dir: &Path, scripts: &[&str], env: &[(&str, String)]) -> (bool, String) {
    let log = tempfile::NamedTempFile::new().expect("a log file");
    let mut child = Command::new("node")
        .args(["--test", "--test-reporter=spec"])
        .args(scripts)
        .current_dir(dir)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdout(log.reopen().expect("log file"))
        .stderr(log.reopen().expect("log file"))
        .stdin(Stdio::null())
        .spawn()
        .expect("starting node");
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("waiting for node") {
            break Some(status);
        }
        if started.elapsed() > SCRIPT_TIMEOUT {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let output = std::fs::read_to_string(log.path()).unwrap_or_default();
    match status {
        Some(status) => (status.success(), output),
        None => (
            false,
            format!("{output}\n(killed after {SCRIPT_TIMEOUT:?})"),
        ),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn dashboard_in_a_real_browser_against_a_real_host_and_worker() {
    if !tools_ready() || docker_ready().await.is_none() {
        return;
    }
    let dir = browser_dir();
    npm_ci_if_needed(&dir);
    let cluster = Cluster::start().await;
    let host = &cluster.host;
    let wasm_dir = PathBuf::from(std::env::var_os("CLOUDAI_POLICY_WASM_DIR").unwrap_or_default());
    let env = [
        ("CLOUDAI_URL", host.url.clone()),
        ("CLOUDAI_ADMIN_TOKEN", host.admin_token.clone()),
        ("CLOUDAI_USER_TOKEN", ALICE_TOKEN.to_string()),
        ("CLOUDAI_TEST_IMAGE", IMAGE.to_string()),
        (
            "CLOUDAI_POLICY_WASM",
            wasm_dir.join("first-fit.wasm").display().to_string(),
        ),
        ("CLOUDAI_CHROMIUM", chromium().display().to_string()),
    ];
    let (ok, output) = tokio::task::spawn_blocking(move || {
        run_scripts(&dir, &["sse.test.mjs", "dashboard.mjs"], &env)
    })
    .await
    .expect("the script's thread");
    assert!(
        ok,
        "the browser test failed:\n{output}\n--- host log ---\n{}",
        host.log()
    );
    eprintln!("{output}");
}
