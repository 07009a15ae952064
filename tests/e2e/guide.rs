//! docs/writing-policies.md, run as written: its marked blocks are the test's script, so a
//! command edited in the guide is the command this test runs.
//!
//! Markers (an HTML comment on the line before a fenced block):
//! - `<!-- guide-test: run ID -->`: a shell block, run with bash in the directory the previous
//!   block left (a `cd` carries over, as in the reader's terminal);
//! - `<!-- guide-test: file PATH -->`: the block's text is written to PATH, relative to that
//!   directory;
//! - `<!-- guide-test: output ID -->`: what block ID prints; every line but the timing must
//!   appear in what it printed;
//! - `<!-- guide-test: workers -->`: the `cloudai worker` commands; the test registers
//!   simulated workers with their ids, labels and sizes (an agent would run the tasks).
//!
//! Each language's section runs against its own `cloudai serve` with a `cloudai` on PATH.
//! The toolchains' downloads (crates, npm, PyPI) and the Rust build are cached under the
//! target dir, so a rerun builds in seconds.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use reqwest::Method;
use serde_json::{Value, json};

use crate::harness::{Background, StoreKind, TestHost, binary, run_within};

const GUIDE: &str = "docs/writing-policies.md";

/// The longest one block of the guide may run: a first build of a guest (crates, npm or PyPI
/// packages from the caches, a Rust, JavaScript or Python toolchain on two shared cores) takes
/// minutes; a block still running after this is stuck.
const BLOCK_TIMEOUT: Duration = Duration::from_secs(20 * 60);

fn repo_root() -> PathBuf {
    crate::policy_tools::repo_file("")
        .canonicalize()
        .expect("the repository root")
}

#[derive(Debug, Clone, PartialEq)]
enum Mark {
    Run(String),
    File(String),
    Output(String),
    Workers,
}

#[derive(Debug, Clone)]
struct Block {
    mark: Mark,
    body: String,
}

/// The guide's marked blocks, in order.
fn parse_guide(text: &str) -> Vec<Block> {
    let mut blocks = Vec::new();
    let mut lines = text.lines();
    while let Some(line) = lines.next() {
        let Some(marker) = line
            .trim()
            .strip_prefix("<!-- guide-test:")
            .and_then(|m| m.strip_suffix("-->"))
        else {
            continue;
        };
        let mut words = marker.split_whitespace();
        let kind = words.next().unwrap_or_default();
        let arg = words.next().unwrap_or_default().to_string();
        let mark = match kind {
            "run" => Mark::Run(arg),
            "file" => Mark::File(arg),
            "output" => Mark::Output(arg),
            "workers" => Mark::Workers,
            other => panic!("{GUIDE}: unknown guide-test marker {other:?} in {line:?}"),
        };
        let fence = lines.next().unwrap_or_default();
        assert!(
            fence.starts_with("```"),
            "{GUIDE}: {line:?} is not followed by a fenced block but by {fence:?}"
        );
        let mut body = String::new();
        for line in lines.by_ref() {
            if line.starts_with("```") {
                break;
            }
            body.push_str(line);
            body.push('\n');
        }
        blocks.push(Block { mark, body });
    }
    let mut ids: Vec<&String> = blocks
        .iter()
        .filter_map(|b| match &b.mark {
            Mark::Run(id) => Some(id),
            _ => None,
        })
        .collect();
    let count = ids.len();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), count, "{GUIDE}: a run id is used twice");
    blocks
}

fn guide() -> Vec<Block> {
    let path = repo_root().join(GUIDE);
    parse_guide(&std::fs::read_to_string(&path).expect("reading the guide"))
}

/// The target dir of this build (`.../debug/cloudai-under-test` is in it): the caches live
/// there, so that they survive the test's temporary directories.
fn cache_dir() -> PathBuf {
    let dir = binary()
        .parent()
        .and_then(Path::parent)
        .expect("the target dir")
        .join("guide-cache");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Whether a language's toolchain is here; `false` skips its section locally, while under CI
/// a missing toolchain fails the test (.ci/run installs them).
fn toolchain(language: &str, present: bool, install: &str) -> bool {
    if present {
        return true;
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "CI must provide {install} for the {language} section of {GUIDE}"
    );
    eprintln!("{install} is missing: skipping the {language} section of {GUIDE}");
    false
}

fn succeeds(program: &str, args: &[&str]) -> bool {
    run_within(
        &format!("{program} {args:?}"),
        std::process::Command::new(program).args(args),
        Duration::from_secs(60),
    )
    .is_ok_and(|o| o.status.success())
}

/// A section of the guide being run against one host.
struct Session {
    host: TestHost,
    blocks: Vec<Block>,
    next: usize,
    /// The directory the last block left.
    cwd: PathBuf,
    bin: PathBuf,
    _scratch: tempfile::TempDir,
    /// The simulated workers, id and token.
    workers: Vec<(String, String)>,
    /// Their heartbeats, stopped when the session is dropped.
    _heartbeats: Background,
}

impl Session {
    /// A host with the guide's workers, positioned at the block `run FIRST`.
    async fn start(first: &str) -> Session {
        let blocks = guide();
        let host = TestHost::start(StoreKind::Embedded).expect("host starts");
        let workers_block = blocks
            .iter()
            .find(|b| b.mark == Mark::Workers)
            .expect("the guide's workers block");
        let mut workers = Vec::new();
        for (id, body) in worker_registrations(&workers_block.body) {
            let (status, answer) = host
                .call(
                    Method::POST,
                    "/v1/workers",
                    Some(&host.join_token),
                    Some(&body.to_string()),
                    &[],
                )
                .await;
            assert_eq!(status, 201, "registering {id}: {answer}");
            workers.push((id, answer["token"].as_str().unwrap().to_string()));
        }
        assert!(workers.len() >= 2, "the guide starts two workers");
        // Heartbeats keep the simulated workers candidates through minutes of compiling.
        let heartbeats =
            crate::harness::keep_beating(&host, workers.clone(), Duration::from_secs(2));
        let next = blocks
            .iter()
            .position(|b| b.mark == Mark::Run(first.to_string()))
            .unwrap_or_else(|| panic!("{GUIDE} has no block `run {first}`"));
        let scratch = tempfile::tempdir().unwrap();
        let bin = scratch.path().join("bin");
        std::fs::create_dir(&bin).unwrap();
        std::os::unix::fs::symlink(binary(), bin.join("cloudai")).unwrap();
        let cwd = scratch.path().join("work");
        std::fs::create_dir(&cwd).unwrap();
        Session {
            host,
            blocks,
            next,
            cwd,
            bin,
            _scratch: scratch,
            workers,
            _heartbeats: heartbeats,
        }
    }

    /// Runs the guide from where it stands up to and including the block `run ID` (writing
    /// the files of the blocks on the way), checks its output against the guide's `output ID`
    /// block when there is one, and returns its standard output.
    async fn step(&mut self, id: &str) -> String {
        loop {
            let block = self
                .blocks
                .get(self.next)
                .unwrap_or_else(|| panic!("{GUIDE} ended before `run {id}`"))
                .clone();
            self.next += 1;
            match &block.mark {
                Mark::File(path) => {
                    let path = self.cwd.join(path);
                    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
                    std::fs::write(&path, &block.body).unwrap();
                }
                Mark::Run(found) if found == id => {
                    let stdout = self.run(id, &block.body).await;
                    if let Some(Block {
                        mark: Mark::Output(of),
                        body,
                    }) = self.blocks.get(self.next)
                        && of == id
                    {
                        assert_prints(id, body, &stdout);
                        self.next += 1;
                    }
                    return stdout;
                }
                Mark::Run(found) => {
                    panic!("{GUIDE}: the test expects `run {id}` next, the guide has `run {found}`")
                }
                Mark::Output(of) => panic!("{GUIDE}: `output {of}` follows no `run {of}`"),
                Mark::Workers => {}
            }
        }
    }

    async fn run(&mut self, id: &str, body: &str) -> String {
        let cwd_file = self.bin.join("cwd");
        let script = format!(
            "set -euo pipefail\ncd '{}'\n{body}\npwd > '{}'\n",
            self.cwd.display(),
            cwd_file.display()
        );
        let cache = cache_dir();
        let path = format!(
            "{}:{}",
            self.bin.display(),
            std::env::var("PATH").unwrap_or_default()
        );
        let started = Instant::now();
        let child = tokio::process::Command::new("bash")
            .arg("-c")
            .arg(&script)
            .env("PATH", path)
            .env("CLOUDAI_SRC", repo_root())
            .env("CLOUDAI_HOST", &self.host.url)
            .env("CLOUDAI_TOKEN", &self.host.admin_token)
            .env("RUST_LOG", "warn")
            // The Rust guest builds offline, from the crates the workspace already fetched,
            // into the `target` the test links to its cache.
            .env_remove("CARGO_TARGET_DIR")
            .env("CARGO_NET_OFFLINE", "true")
            .env("npm_config_cache", cache.join("npm"))
            .env("npm_config_prefer_offline", "true")
            .env("PIP_CACHE_DIR", cache.join("pip"))
            .env("PIP_DISABLE_PIP_VERSION_CHECK", "1")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            // Its own process group, so that a block that runs too long is killed with every
            // process it started (cargo, npm, pip), not only bash.
            .process_group(0)
            .kill_on_drop(true)
            .spawn()
            .expect("starting bash");
        let group = child.id().expect("bash's pid");
        let output = match tokio::time::timeout(BLOCK_TIMEOUT, child.wait_with_output()).await {
            Ok(output) => output.expect("running bash"),
            Err(_) => {
                let _ = std::process::Command::new("kill")
                    .args(["-KILL", "--", &format!("-{group}")])
                    .status();
                panic!(
                    "guide block `{id}` did not finish within {BLOCK_TIMEOUT:?}: killed (with its \
                     process group).\n{body}\nhost log:\n{}",
                    self.host.log()
                );
            }
        };
        let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            output.status.success(),
            "guide block `{id}` failed ({:?}):\n{body}\nstdout:\n{stdout}\nstderr:\n{stderr}\nhost log:\n{}",
            output.status,
            self.host.log()
        );
        eprintln!("guide block `{id}`: {:.1?}", started.elapsed());
        self.cwd = PathBuf::from(std::fs::read_to_string(&cwd_file).unwrap().trim());
        stdout
    }

    /// [`Self::step`] for a block that submits tasks: says on which worker each landed.
    async fn step_placing(&mut self, id: &str) -> (String, Vec<String>) {
        let before = self.allocated().await;
        let stdout = self.step(id).await;
        let tasks: Vec<&str> = stdout
            .split_whitespace()
            .filter(|w| w.starts_with("task-"))
            .collect();
        assert_eq!(tasks.len(), 1, "`{id}` submits one task:\n{stdout}");
        let path = format!("/v1/tasks/{}", tasks[0]);
        let host = &self.host;
        host.eventually(
            format!("the task `{id}` submitted to be placed (running)"),
            Duration::from_secs(60),
        )
        .every(Duration::from_millis(50))
        .until(async || {
            let (_, task) = host
                .call(Method::GET, &path, Some(&host.admin_token), None, &[])
                .await;
            if task["status"] == "running" {
                Ok(())
            } else {
                Err(task.to_string())
            }
        })
        .await;
        let after = self.allocated().await;
        let grew = after
            .iter()
            .filter(|(id, cpu)| before.get(id.as_str()) != Some(*cpu))
            .map(|(id, _)| id.clone())
            .collect();
        (stdout, grew)
    }

    async fn allocated(&self) -> BTreeMap<String, f64> {
        let mut allocated = BTreeMap::new();
        for (id, _) in &self.workers {
            let (status, body) = self
                .host
                .call(
                    Method::GET,
                    &format!("/v1/workers/{id}"),
                    Some(&self.host.admin_token),
                    None,
                    &[],
                )
                .await;
            assert_eq!(status, 200, "{body}");
            allocated.insert(id.clone(), body["allocated_cpu"].as_f64().unwrap());
        }
        allocated
    }

    async fn policies(&self) -> Value {
        let (status, body) = self
            .host
            .call(
                Method::GET,
                "/v1/policies",
                Some(&self.host.admin_token),
                None,
                &[],
            )
            .await;
        assert_eq!(status, 200, "{body}");
        body
    }

    async fn assert_active(&self, name: &str, version: &str) {
        let body = self.policies().await;
        let active = &body["active"]["placement"];
        assert_eq!(
            (active["name"].as_str(), active["version"].as_str()),
            (Some(name), Some(version)),
            "{body}"
        );
        let running = body["versions"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["name"] == name && v["version"] == version)
            .unwrap_or_else(|| panic!("no {name} {version} in {body}"));
        assert_eq!(running["active"], true, "not running here: {running}");
    }
}

/// `(worker id, registration body)` of each `cloudai worker` command of the block.
fn worker_registrations(block: &str) -> Vec<(String, Value)> {
    block
        .replace("\\\n", " ")
        .lines()
        .filter(|l| l.trim_start().starts_with("cloudai worker"))
        .map(|command| {
            let words: Vec<&str> = command.split_whitespace().collect();
            let value = |flag: &str| {
                words
                    .iter()
                    .position(|w| *w == flag)
                    .and_then(|i| words.get(i + 1))
                    .copied()
            };
            let number = |flag: &str| {
                value(flag)
                    .unwrap_or_else(|| panic!("{command}: no {flag}"))
                    .parse::<f64>()
                    .unwrap()
            };
            let labels: BTreeMap<&str, &str> = words
                .windows(2)
                .filter(|w| w[0] == "--label")
                .map(|w| w[1].split_once('=').expect("--label KEY=VALUE"))
                .collect();
            let id = value("--worker-id").expect("--worker-id").to_string();
            let body = json!({
                "worker_id": id, "worker_ip": "127.0.0.1:50052",
                "total_cpu": number("--cpu"), "total_memory": number("--memory-gb"),
                "total_storage": 100.0, "total_gpu": 0.0, "labels": labels,
            });
            (id, body)
        })
        .collect()
}

/// Tables compared without their borders and padding; the timing line is left out.
fn assert_prints(id: &str, expected: &str, stdout: &str) {
    let normalize = |line: &str| {
        line.chars()
            .map(|c| {
                if "│┌┐└┘─╞╡═".contains(c) {
                    ' '
                } else {
                    c
                }
            })
            .collect::<String>()
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ")
    };
    let printed: Vec<String> = stdout.lines().map(normalize).collect();
    for line in expected.lines().map(normalize) {
        if line.is_empty() || line.starts_with("timing:") {
            continue;
        }
        assert!(
            printed.contains(&line),
            "`{id}` does not print what {GUIDE} says it prints: no line {line:?} in\n{stdout}"
        );
    }
}

fn assert_conformance_passed(stdout: &str) {
    let line = stdout
        .lines()
        .find(|l| l.contains("conformance cases passed"))
        .unwrap_or_else(|| panic!("no conformance summary in:\n{stdout}"));
    let counts: Vec<&str> = line
        .split(':')
        .nth(1)
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect();
    assert!(
        counts.len() == 3 && counts[1] == "of" && counts[0] == counts[2],
        "{line}"
    );
}

/// The whole section of one language: build, test offline, upload, activate, place, roll out
/// version 2, roll back.
async fn run_section(session: &mut Session, lang: &str, component: &str, name: &str) {
    session.step(&format!("{lang}-build")).await;
    let component = session.cwd.join(component);
    let size = std::fs::metadata(&component)
        .unwrap_or_else(|e| panic!("the build wrote no {}: {e}", component.display()))
        .len();
    assert!(size > 1000, "{}: {size} bytes", component.display());
    assert_conformance_passed(&session.step(&format!("{lang}-conformance")).await);
    session.step(&format!("{lang}-snapshot")).await;

    let out = session.step(&format!("{lang}-upload")).await;
    assert!(
        out.contains(&format!("active placement policy: {name} 1")),
        "{out}"
    );
    session.assert_active(name, "1").await;
    assert!(
        out.lines().any(|l| {
            let words: Vec<&str> = l
                .split(|c: char| c.is_whitespace() || c == '│')
                .filter(|w| !w.is_empty())
                .collect();
            words.starts_with(&[name, "1", "placement"])
                && words.contains(&"yes")
                && words.contains(&"running")
        }),
        "`cloudai policy list` shows {name} 1 active and running:\n{out}"
    );
    let (out, grew) = session.step_placing(&format!("{lang}-submit")).await;
    assert_eq!(grew, ["worker-b"], "{out}");
    assert!(
        out.contains("worker-b"),
        "`cloudai workers` lists it:\n{out}"
    );

    let (out, grew) = session.step_placing(&format!("{lang}-v2")).await;
    session.assert_active(name, "2").await;
    assert_eq!(grew, ["worker-a"], "version 2 prefers zone a:\n{out}");

    let (out, grew) = session.step_placing(&format!("{lang}-rollback")).await;
    assert!(
        out.contains(&format!("active placement policy: {name} 1 (was {name} 2)")),
        "{out}"
    );
    session.assert_active(name, "1").await;
    assert_eq!(grew, ["worker-b"], "version 1 again:\n{out}");

    // Every decision above was the policy's: no round fell back to the native best-fit.
    let body = session.policies().await;
    for version in body["versions"].as_array().unwrap() {
        assert!(version["evaluations"].as_u64().unwrap() >= 1, "{version}");
        assert_eq!(version["total_failures"], 0, "{version}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_guide_s_rust_policy_builds_tests_deploys_and_rolls_back_as_written() {
    let sysroot = run_within(
        "rustc --print sysroot",
        std::process::Command::new("rustc").args(["--print", "sysroot"]),
        Duration::from_secs(60),
    )
    .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    .unwrap_or_default();
    let present = Path::new(&sysroot)
        .join("lib/rustlib/wasm32-wasip2")
        .is_dir();
    if !toolchain("Rust", present, "the wasm32-wasip2 target") {
        return;
    }
    let mut session = Session::start("rust-setup").await;
    session.step("rust-setup").await;
    // The crate's first build takes minutes on 2 cores: its `target` is a cache, kept.
    let target = cache_dir().join("rust-target");
    std::fs::create_dir_all(&target).unwrap();
    std::os::unix::fs::symlink(&target, session.cwd.join("target")).unwrap();
    run_section(
        &mut session,
        "rust",
        "target/wasm32-wasip2/release/prefer_label.wasm",
        "prefer-label-rs",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_guide_s_javascript_policy_builds_tests_deploys_and_rolls_back_as_written() {
    let present = succeeds("node", &["--version"]) && succeeds("npm", &["--version"]);
    if !toolchain("JavaScript", present, "node and npm") {
        return;
    }
    let mut session = Session::start("js-setup").await;
    session.step("js-setup").await;
    run_section(&mut session, "js", "prefer-label.wasm", "prefer-label-js").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_guide_s_python_policy_builds_tests_deploys_and_rolls_back_as_written() {
    let present = succeeds("python3", &["-c", "import ensurepip, venv"]);
    if !toolchain("Python", present, "python3 with venv") {
        return;
    }
    let mut session = Session::start("py-setup").await;
    session.step("py-setup").await;
    run_section(&mut session, "py", "prefer-label.wasm", "prefer-label-py").await;
}

#[test]
fn the_guide_marks_every_step_of_every_language() {
    let blocks = guide();
    for lang in ["rust", "js", "py"] {
        for step in [
            "setup",
            "build",
            "conformance",
            "snapshot",
            "upload",
            "submit",
            "v2",
            "rollback",
        ] {
            let id = format!("{lang}-{step}");
            assert!(
                blocks.iter().any(|b| b.mark == Mark::Run(id.clone())),
                "{GUIDE} has no block `run {id}`"
            );
        }
        assert!(
            blocks
                .iter()
                .any(|b| b.mark == Mark::Output(format!("{lang}-snapshot"))),
            "{GUIDE} shows no output of {lang}-snapshot"
        );
    }
    let workers = worker_registrations(
        &blocks
            .iter()
            .find(|b| b.mark == Mark::Workers)
            .unwrap()
            .body,
    );
    let zones: Vec<(&str, &Value)> = workers
        .iter()
        .map(|(id, body)| (id.as_str(), &body["labels"]["zone"]))
        .collect();
    assert_eq!(
        zones,
        [("worker-a", &json!("a")), ("worker-b", &json!("b"))]
    );
}
