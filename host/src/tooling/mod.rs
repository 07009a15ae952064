//! Offline tools for policy authors, no host needed: `cloudai policy test` runs a component
//! against a recorded cluster snapshot and prints its decisions and timing; `cloudai policy
//! bench` measures its per-round latency next to the native best-fit on synthetic clusters.
//!
//! Both load the component as the host does ([`PolicyRuntime::load_with`]: compiled, world
//! checked, configured, smoke-tested), and neither falls back: a policy that traps, runs past
//! its deadline or answers invalidly makes the command fail with the reason.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Args;

use rand::{Rng, SeedableRng, rngs::StdRng};
use serde::Serialize;
use serde_json::json;

pub mod conformance;

use crate::model::Usage;
use crate::model::{Resources, Task, TaskStatus, Worker};
use crate::output::{Output, new_table};
use crate::policy::AdmissionDecision;
use crate::policy::bindings::types::{AdmissionTask, UserUsage};
use crate::policy::snapshot::SNAPSHOT_FORMAT;
use crate::policy::{
    ClusterSnapshot, Decision, EngineSettings, LoadOptions, PlacementInput, PolicyEngine,
    PolicyKind, PolicyLimits, PolicyRuntime, PolicySource, RuntimeSettings, native,
};

/// The version a component is loaded under by these tools.
const LOCAL_VERSION: &str = "local";

/// The policy's configuration: inline or from a file.
#[derive(Debug, Clone, Args)]
pub struct ConfigArgs {
    /// The policy's configuration, JSON (`{}` when absent).
    #[arg(long, conflicts_with = "config_file")]
    pub config: Option<String>,
    /// A file holding the policy's configuration, JSON.
    #[arg(long, value_name = "FILE")]
    pub config_file: Option<PathBuf>,
}

/// The limits of every evaluation, as the host would set them.
#[derive(Debug, Clone, Args)]
pub struct LimitArgs {
    /// Linear memory the policy may grow to, in MiB (default 64).
    #[arg(long, value_name = "M", value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub memory_mb: Option<u32>,
    /// Wall-clock budget of one evaluation, in milliseconds (default 50).
    #[arg(long, value_name = "D", value_parser = clap::value_parser!(u32).range(1..=60_000))]
    pub deadline_ms: Option<u32>,
}

/// `cloudai policy test`.
#[derive(Debug, Clone, Args)]
pub struct TestArgs {
    /// The policy component (.wasm), placement or admission.
    pub file: PathBuf,
    /// A cluster snapshot (JSON, as `GET /v1/cluster/snapshot` exports it).
    #[arg(long, value_name = "FILE", required_unless_present = "conformance")]
    pub snapshot: Option<PathBuf>,
    /// Run the conformance kit instead: snapshots with properties every policy must have
    /// (exit status 1 when a case fails).
    #[arg(long, conflicts_with = "snapshot")]
    pub conformance: bool,
    #[command(flatten)]
    pub config: ConfigArgs,
    #[command(flatten)]
    pub limits: LimitArgs,
    /// Output format.
    #[arg(long, short = 'o', value_enum, default_value_t = Output::Table)]
    pub output: Output,
}

/// `cloudai policy bench`.
#[derive(Debug, Clone, Args)]
pub struct BenchArgs {
    /// The policy component (.wasm), placement or admission.
    pub file: PathBuf,
    /// Worker counts of the synthetic clusters, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "10,100,1000",
          value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub workers: Vec<u32>,
    /// Tasks per round, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,100",
          value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub tasks: Vec<u32>,
    /// Rounds measured per size.
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub rounds: u32,
    #[command(flatten)]
    pub config: ConfigArgs,
    #[command(flatten)]
    pub limits: LimitArgs,
    /// Output format.
    #[arg(long, short = 'o', value_enum, default_value_t = Output::Table)]
    pub output: Output,
}

impl ConfigArgs {
    fn read(&self) -> anyhow::Result<String> {
        match (&self.config, &self.config_file) {
            (Some(inline), _) => Ok(inline.clone()),
            (None, Some(path)) => std::fs::read_to_string(path)
                .with_context(|| format!("reading the configuration file {}", path.display())),
            (None, None) => Ok("{}".to_string()),
        }
    }
}

impl LimitArgs {
    fn limits(&self) -> PolicyLimits {
        let default = PolicyLimits::default();
        PolicyLimits {
            deadline: self
                .deadline_ms
                .map_or(default.deadline, |ms| Duration::from_millis(ms.into())),
            memory_bytes: self
                .memory_mb
                .map_or(default.memory_bytes, |mb| (mb as usize) << 20),
        }
    }
}

/// A component loaded by a tool, with how long loading took.
struct Loaded {
    runtime: PolicyRuntime,
    name: String,
    kind: PolicyKind,
    /// Compilation alone (Cranelift), then the rest of the load (link, configure, smoke).
    compile: Duration,
    load: Duration,
}

/// Reads, compiles and checks a component as the host does at upload.
fn load(file: &Path, config: &ConfigArgs, limits: &LimitArgs) -> anyhow::Result<Loaded> {
    let bytes = std::fs::read(file).with_context(|| format!("reading {}", file.display()))?;
    let config = config.read()?;
    let limits = limits.limits();
    let engine = PolicyEngine::new(EngineSettings {
        max_memory_bytes: EngineSettings::default()
            .max_memory_bytes
            .max(limits.memory_bytes),
        ..EngineSettings::default()
    })
    .context("starting the policy engine")?;
    let runtime = PolicyRuntime::new(
        engine,
        RuntimeSettings {
            default_limits: limits,
            ..RuntimeSettings::default()
        },
    );
    let name = file
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "policy".to_string());
    let started = Instant::now();
    // Compiled once: `load_with` finds it in the engine's cache.
    runtime
        .engine()
        .compile(&bytes)
        .with_context(|| format!("loading {}", file.display()))?;
    let compile = started.elapsed();
    let kind = runtime
        .load_with(
            &name,
            LOCAL_VERSION,
            &bytes,
            &config,
            LoadOptions {
                limits: Some(limits),
                smoke_check: true,
            },
        )
        .with_context(|| format!("loading {}", file.display()))?;
    let load = started.elapsed() - compile;
    Ok(Loaded {
        runtime,
        name,
        kind,
        compile,
        load,
    })
}

/// One task's decision, as printed.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TaskDecision {
    pub task_id: String,
    /// `assign`, `wait`, `unschedulable`; `accept`, `reject`, `defer`.
    pub decision: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub worker_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// What `cloudai policy test` prints.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TestReport {
    pub policy: String,
    pub kind: &'static str,
    pub snapshot: String,
    /// Candidate workers of the round (placement).
    pub candidate_workers: usize,
    pub decisions: Vec<TaskDecision>,
    /// Decisions per kind, in a fixed order (assigned/waiting/unschedulable, or
    /// accepted/rejected/deferred).
    pub summary: Vec<(&'static str, usize)>,
    /// Load (compile, link, configure, smoke decision) and the round (or every admission
    /// check together), in milliseconds.
    pub compile_and_validate_ms: f64,
    pub round_ms: f64,
}

impl TestReport {
    pub fn to_json(&self) -> serde_json::Value {
        let summary: serde_json::Map<String, serde_json::Value> = self
            .summary
            .iter()
            .map(|(k, v)| ((*k).to_string(), json!(v)))
            .collect();
        json!({
            "policy": self.policy,
            "kind": self.kind,
            "snapshot": self.snapshot,
            "candidate_workers": self.candidate_workers,
            "decisions": self.decisions,
            "summary": summary,
            "timings_ms": {
                "compile_and_validate": self.compile_and_validate_ms,
                "round": self.round_ms,
            },
        })
    }

    /// The decisions as a table, then the summary and the timings.
    pub fn to_text(&self) -> String {
        let mut out = match self.kind {
            "placement" => format!(
                "{} ({}) on {}: {} tasks, {} candidate workers\n",
                self.policy,
                self.kind,
                self.snapshot,
                self.decisions.len(),
                self.candidate_workers
            ),
            _ => format!(
                "{} ({}) on {}: {} pending tasks\n",
                self.policy,
                self.kind,
                self.snapshot,
                self.decisions.len()
            ),
        };
        if self.decisions.is_empty() {
            out.push_str("no tasks to decide\n");
        } else {
            let mut table = new_table(&["TASK", "DECISION", "WORKER", "REASON"]);
            for d in &self.decisions {
                table.add_row(vec![
                    d.task_id.clone(),
                    d.decision.to_string(),
                    d.worker_id.clone().unwrap_or_default(),
                    d.reason.clone().unwrap_or_default(),
                ]);
            }
            out.push_str(&format!("{table}\n"));
        }
        let summary: Vec<String> = self
            .summary
            .iter()
            .map(|(k, v)| format!("{v} {k}"))
            .collect();
        out.push_str(&format!("summary: {}\n", summary.join(", ")));
        out.push_str(&format!(
            "timing: compile+validate {}, {} {}\n",
            fmt_ms(self.compile_and_validate_ms),
            if self.kind == "placement" {
                "round"
            } else {
                "admission checks"
            },
            fmt_ms(self.round_ms)
        ));
        out
    }
}

fn fmt_ms(ms: f64) -> String {
    if ms >= 1.0 {
        format!("{ms:.2} ms")
    } else {
        format!("{:.1} µs", ms * 1000.0)
    }
}

fn millis(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// `cloudai policy test`: blocking work, run off the async runtime.
pub async fn test(args: TestArgs) -> anyhow::Result<()> {
    let output = args.output;
    if args.conformance {
        let report = tokio::task::spawn_blocking(move || run_conformance(&args))
            .await
            .context("the conformance run stopped")??;
        match output {
            Output::Json => print_out(&format!(
                "{}\n",
                serde_json::to_string_pretty(&report.to_json())?
            ))?,
            Output::Table => print_out(&report.to_text())?,
        }
        let failed = report.failed();
        if failed > 0 {
            bail!(
                "{failed} of {} conformance cases failed",
                report.cases.len()
            );
        }
        return Ok(());
    }
    let report = tokio::task::spawn_blocking(move || run_test(&args))
        .await
        .context("the policy test stopped")??;
    match output {
        Output::Json => print_out(&format!(
            "{}\n",
            serde_json::to_string_pretty(&report.to_json())?
        )),
        Output::Table => print_out(&report.to_text()),
    }
}

/// Writes to stdout, an error (not a panic) when it is closed, as by `| head`.
fn print_out(text: &str) -> anyhow::Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes())
        .and_then(|()| out.flush())
        .context("writing to stdout")
}

/// Loads the component, replays the snapshot through it and reports its decisions; fails
/// when the policy fails.
pub fn run_test(args: &TestArgs) -> anyhow::Result<TestReport> {
    let Some(snapshot_path) = &args.snapshot else {
        bail!("--snapshot FILE is needed (or --conformance)");
    };
    let text = std::fs::read_to_string(snapshot_path)
        .with_context(|| format!("reading the snapshot {}", snapshot_path.display()))?;
    let snapshot = ClusterSnapshot::from_json(&text).map_err(|e| {
        anyhow::anyhow!(
            "{} is not a valid cluster snapshot: {e}",
            snapshot_path.display()
        )
    })?;
    let loaded = load(&args.file, &args.config, &args.limits)?;
    let (name, rt) = (&loaded.name, &loaded.runtime);
    let started = Instant::now();
    let (decisions, candidate_workers, summary) = match loaded.kind {
        PolicyKind::Placement => {
            let input = snapshot.placement_input();
            let decisions = rt
                .place_with(name, LOCAL_VERSION, &input)
                .with_context(|| format!("{} failed on the snapshot's round", name))?;
            let rows = placement_rows(&input, &decisions);
            let summary = count(&rows, ["assign", "wait", "unschedulable"])
                .zip(["assigned", "waiting", "unschedulable"])
                .map(|(n, label)| (label, n))
                .collect();
            (rows, input.worker_count(), summary)
        }
        PolicyKind::Admission => {
            rt.activate(name, LOCAL_VERSION)?;
            let mut rows = Vec::new();
            for (task, usage) in snapshot.admission_inputs() {
                rows.push(admission_row(rt, &task, &usage)?);
            }
            let summary = count(&rows, ["accept", "reject", "defer"])
                .zip(["accepted", "rejected", "deferred"])
                .map(|(n, label)| (label, n))
                .collect();
            (rows, 0, summary)
        }
    };
    let round = started.elapsed();
    Ok(TestReport {
        policy: file_name(&args.file),
        kind: loaded.kind.as_str(),
        snapshot: file_name(snapshot_path),
        candidate_workers,
        decisions,
        summary,
        compile_and_validate_ms: millis(loaded.compile + loaded.load),
        round_ms: millis(round),
    })
}

/// What `cloudai policy test --conformance` found.
#[derive(Debug, Clone)]
pub struct ConformanceReport {
    pub policy: String,
    pub kind: &'static str,
    pub cases: Vec<conformance::CaseOutcome>,
}

impl ConformanceReport {
    pub fn failed(&self) -> usize {
        self.cases.iter().filter(|c| c.failure.is_some()).count()
    }

    pub fn to_json(&self) -> serde_json::Value {
        json!({
            "policy": self.policy,
            "kind": self.kind,
            "passed": self.cases.len() - self.failed(),
            "failed": self.failed(),
            "cases": self.cases.iter().map(|c| json!({
                "case": c.case,
                "property": c.property,
                "passed": c.failure.is_none(),
                "failure": c.failure,
                "ms": millis(c.elapsed),
            })).collect::<Vec<_>>(),
        })
    }

    pub fn to_text(&self) -> String {
        let mut table = new_table(&["case", "result", "ms", "property"]);
        for c in &self.cases {
            let result = match &c.failure {
                None => "pass".to_string(),
                Some(why) => format!("FAIL: {why}"),
            };
            table.add_row([
                c.case.to_string(),
                result,
                format!("{:.1}", millis(c.elapsed)),
                c.property.to_string(),
            ]);
        }
        format!(
            "{} ({} policy): {} of {} conformance cases passed\n{table}\n",
            self.policy,
            self.kind,
            self.cases.len() - self.failed(),
            self.cases.len()
        )
    }
}

/// Loads the component and runs the conformance kit of its kind against it.
pub fn run_conformance(args: &TestArgs) -> anyhow::Result<ConformanceReport> {
    let loaded = load(&args.file, &args.config, &args.limits)?;
    let cases = conformance::run(&loaded.runtime, &loaded.name, LOCAL_VERSION, loaded.kind);
    Ok(ConformanceReport {
        policy: file_name(&args.file),
        kind: loaded.kind.as_str(),
        cases,
    })
}

fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| path.display().to_string())
}

fn count<const N: usize>(rows: &[TaskDecision], kinds: [&str; N]) -> impl Iterator<Item = usize> {
    kinds
        .map(|k| rows.iter().filter(|r| r.decision == k).count())
        .into_iter()
}

/// The checked decisions of a round, by task and worker id.
fn placement_rows(input: &PlacementInput, decisions: &[Decision]) -> Vec<TaskDecision> {
    decisions
        .iter()
        .enumerate()
        .map(|(j, d)| {
            let task_id = input.task_id(j).unwrap_or("?").to_string();
            match d {
                Decision::Assign { worker } => TaskDecision {
                    task_id,
                    decision: "assign",
                    worker_id: Some(input.worker_id(*worker).unwrap_or("?").to_string()),
                    reason: None,
                },
                Decision::Wait { reason } => TaskDecision {
                    task_id,
                    decision: "wait",
                    worker_id: None,
                    reason: Some(reason.clone()),
                },
                Decision::Unschedulable { reason } => TaskDecision {
                    task_id,
                    decision: "unschedulable",
                    worker_id: None,
                    reason: Some(reason.clone()),
                },
                Decision::Preempt { worker, victims } => TaskDecision {
                    task_id,
                    decision: "preempt",
                    worker_id: Some(input.worker_id(*worker).unwrap_or("?").to_string()),
                    reason: Some(format!("stops {}", input.victim_ids(victims).join(", "))),
                },
            }
        })
        .collect()
}

/// One admission check through the active (just loaded) version; its failure is an error,
/// not the runtime's fallback.
fn admission_row(
    rt: &PolicyRuntime,
    task: &AdmissionTask,
    usage: &UserUsage,
) -> anyhow::Result<TaskDecision> {
    let outcome = rt.admit(task, usage);
    if let PolicySource::Fallback { name, reason, .. } = &outcome.source {
        bail!("{name} failed on task {}: {reason}", task.id);
    }
    let (decision, reason) = match outcome.decision {
        AdmissionDecision::Accept => ("accept", None),
        AdmissionDecision::Reject(r) => ("reject", Some(r)),
        AdmissionDecision::Defer(r) => ("defer", Some(r)),
    };
    Ok(TaskDecision {
        task_id: task.id.clone(),
        decision,
        worker_id: None,
        reason,
    })
}

/// A synthetic cluster of `workers` workers under some load (a fifth with GPUs, three zones)
/// and `tasks` tasks of seven users, most of which fit, each both queued (for a placement
/// round) and pending (for admission). Deterministic in `seed`. Used by `cloudai policy
/// bench` and the policy benches.
pub fn synthetic_snapshot(seed: u64, workers: usize, tasks: usize) -> ClusterSnapshot {
    let mut rng = StdRng::seed_from_u64(seed);
    // One fixed instant for every timestamp: the same seed gives the same
    // snapshot, to the millisecond (ages are taken relative to `taken_at`).
    let now = chrono::DateTime::from_timestamp(1_767_225_600, 0).unwrap_or_default();
    let workers: Vec<Worker> = (0..workers)
        .map(|i| {
            let total = Resources::new(
                f64::from(rng.random_range(4..=64)),
                f64::from(rng.random_range(8..=256)),
                f64::from(rng.random_range(100..=2000)),
                if rng.random_bool(0.2) {
                    f64::from(rng.random_range(1..=8))
                } else {
                    0.0
                },
            );
            let mut w = Worker::new(
                format!("worker-{i:04}"),
                "127.0.0.1".into(),
                total,
                BTreeMap::from([("zone".into(), format!("z{}", i % 3))]),
                String::new(),
            );
            w.last_heartbeat = now.timestamp();
            w.registered_at = now;
            w.updated_at = now;
            let used = f64::from(rng.random_range(0..=3)) / 4.0;
            w.allocated_cpu = (w.total_cpu * used).floor();
            w.available_cpu = w.total_cpu - w.allocated_cpu;
            w.allocated_memory = (w.total_memory * used).floor();
            w.available_memory = w.total_memory - w.allocated_memory;
            w
        })
        .collect();
    let pending: Vec<Task> = (0..tasks)
        .map(|j| {
            let req = Resources::new(
                f64::from(rng.random_range(1..=8)) / 2.0,
                f64::from(rng.random_range(1..=32)) / 2.0,
                f64::from(rng.random_range(0..=50)),
                if rng.random_bool(0.1) { 1.0 } else { 0.0 },
            );
            let mut t = Task::new_pending(
                format!("task-{j:04}"),
                format!("user-{}", j % 7),
                "busybox:1.36".into(),
                req,
            );
            t.created_at = now;
            t.updated_at = now;
            t
        })
        .collect();
    let queued: Vec<Task> = pending
        .iter()
        .cloned()
        .map(|mut t| {
            t.status = TaskStatus::Queued;
            t
        })
        .collect();
    let usage = (0..7)
        .map(|u| {
            let usage = Usage {
                running_tasks: u,
                queued_tasks: u / 2,
                pending_tasks: 1,
                reserved: Resources::new(f64::from(u), f64::from(2 * u), 0.0, 0.0),
            };
            (format!("user-{u}"), usage)
        })
        .collect();
    ClusterSnapshot {
        format: SNAPSHOT_FORMAT,
        taken_at: now,
        workers,
        queued,
        pending,
        running_tasks: BTreeMap::new(),
        usage,
        runtime_history: Vec::new(),
        preemptible: Vec::new(),
    }
}

/// The latencies of one size of `cloudai policy bench`.
#[derive(Debug, Clone, Serialize)]
pub struct BenchRow {
    pub tasks: u32,
    /// 0 for an admission policy.
    pub workers: u32,
    pub wasm_median_us: f64,
    pub wasm_p90_us: f64,
    /// The native best-fit on the same rounds (placement only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub native_median_us: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub native_p90_us: Option<f64>,
    /// Wasm median over native median.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ratio: Option<f64>,
}

/// What `cloudai policy bench` prints.
#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    pub policy: String,
    pub kind: &'static str,
    pub rounds: u32,
    pub compile_ms: f64,
    /// Link, configure and smoke decision of the compiled component.
    pub load_ms: f64,
    /// Median instantiation from `InstancePre` (no configure, no decision).
    pub instantiate_us: f64,
    pub sizes: Vec<BenchRow>,
}

impl BenchReport {
    pub fn to_text(&self) -> String {
        let mut out = format!(
            "{} ({}): {} rounds per size\n  compile {}, load (link + configure + smoke) {}, instantiate {}\n",
            self.policy,
            self.kind,
            self.rounds,
            fmt_ms(self.compile_ms),
            fmt_ms(self.load_ms),
            fmt_ms(self.instantiate_us / 1000.0)
        );
        let mut table = new_table(&[
            "TASKS",
            "WORKERS",
            "WASM MEDIAN",
            "WASM P90",
            "NATIVE MEDIAN",
            "NATIVE P90",
            "RATIO",
        ]);
        let us = |x: f64| fmt_ms(x / 1000.0);
        for r in &self.sizes {
            table.add_row(vec![
                r.tasks.to_string(),
                if self.kind == "placement" {
                    r.workers.to_string()
                } else {
                    "-".into()
                },
                us(r.wasm_median_us),
                us(r.wasm_p90_us),
                r.native_median_us.map(us).unwrap_or_else(|| "-".into()),
                r.native_p90_us.map(us).unwrap_or_else(|| "-".into()),
                r.ratio
                    .map(|x| format!("{x:.1}x"))
                    .unwrap_or_else(|| "-".into()),
            ]);
        }
        out.push_str(&format!("{table}\n"));
        if self.kind == "admission" {
            out.push_str("an admission round is one check per task; there is no native baseline\n");
        }
        out
    }
}

/// The median and the 90th percentile (nearest rank) of some durations, in microseconds.
pub fn median_p90(mut xs: Vec<Duration>) -> (f64, f64) {
    if xs.is_empty() {
        return (0.0, 0.0);
    }
    xs.sort();
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    let p90 = (xs.len() * 9).div_ceil(10).max(1) - 1;
    (us(xs[xs.len() / 2]), us(xs[p90]))
}

/// `cloudai policy bench`: blocking work, run off the async runtime.
pub async fn bench(args: BenchArgs) -> anyhow::Result<()> {
    let output = args.output;
    let report = tokio::task::spawn_blocking(move || run_bench(&args))
        .await
        .context("the policy bench stopped")??;
    match output {
        Output::Json => print_out(&format!("{}\n", serde_json::to_string_pretty(&report)?)),
        Output::Table => print_out(&report.to_text()),
    }
}

/// Loads the component and times its rounds on synthetic clusters of each size, with the
/// native best-fit on the same rounds; progress goes to stderr.
pub fn run_bench(args: &BenchArgs) -> anyhow::Result<BenchReport> {
    let loaded = load(&args.file, &args.config, &args.limits)?;
    let (name, rt) = (&loaded.name, &loaded.runtime);
    let instantiate = (0..20)
        .map(|_| rt.time_instantiate(name, LOCAL_VERSION))
        .collect::<Result<Vec<_>, _>>()
        .context("instantiating the policy")?;
    let (instantiate_us, _) = median_p90(instantiate);
    if loaded.kind == PolicyKind::Admission {
        rt.activate(name, LOCAL_VERSION)?;
    }
    let mut sizes = Vec::new();
    // An admission round does not depend on the workers: one size per task count.
    let workers: &[u32] = match loaded.kind {
        PolicyKind::Placement => &args.workers,
        PolicyKind::Admission => &[0],
    };
    for &tasks in &args.tasks {
        for &workers in workers {
            match loaded.kind {
                PolicyKind::Placement => eprintln!(
                    "bench: {tasks} tasks x {workers} workers, {} rounds...",
                    args.rounds
                ),
                PolicyKind::Admission => {
                    eprintln!("bench: {tasks} admission checks, {} rounds...", args.rounds)
                }
            }
            let seed = u64::from(tasks) * 7919 + u64::from(workers);
            let snapshot = synthetic_snapshot(seed, workers as usize, tasks as usize);
            sizes.push(match loaded.kind {
                PolicyKind::Placement => {
                    bench_placement(rt, name, &snapshot.placement_input(), args.rounds)?
                }
                PolicyKind::Admission => {
                    bench_admission(rt, &snapshot.admission_inputs(), args.rounds)?
                }
            });
        }
    }
    Ok(BenchReport {
        policy: file_name(&args.file),
        kind: loaded.kind.as_str(),
        rounds: args.rounds,
        compile_ms: millis(loaded.compile),
        load_ms: millis(loaded.load),
        instantiate_us,
        sizes,
    })
}

fn bench_placement(
    rt: &PolicyRuntime,
    name: &str,
    input: &PlacementInput,
    rounds: u32,
) -> anyhow::Result<BenchRow> {
    let failed = || {
        format!(
            "{name} failed on a round of {} tasks x {} workers",
            input.task_count(),
            input.worker_count()
        )
    };
    // One unmeasured round: warms up, and a failing policy fails here.
    rt.place_with(name, LOCAL_VERSION, input)
        .with_context(failed)?;
    let mut wasm = Vec::with_capacity(rounds as usize);
    let mut native_runs = Vec::with_capacity(rounds as usize);
    for _ in 0..rounds {
        let started = Instant::now();
        let decisions = rt.place_with(name, LOCAL_VERSION, std::hint::black_box(input));
        wasm.push(started.elapsed());
        decisions.with_context(failed)?;
        let started = Instant::now();
        std::hint::black_box(native::best_fit(std::hint::black_box(input)));
        native_runs.push(started.elapsed());
    }
    let (wasm_median_us, wasm_p90_us) = median_p90(wasm);
    let (native_median_us, native_p90_us) = median_p90(native_runs);
    Ok(BenchRow {
        tasks: input.task_count() as u32,
        workers: input.worker_count() as u32,
        wasm_median_us,
        wasm_p90_us,
        native_median_us: Some(native_median_us),
        native_p90_us: Some(native_p90_us),
        ratio: Some(wasm_median_us / native_median_us.max(1e-6)),
    })
}

fn bench_admission(
    rt: &PolicyRuntime,
    checks: &[(AdmissionTask, UserUsage)],
    rounds: u32,
) -> anyhow::Result<BenchRow> {
    let mut wasm = Vec::with_capacity(rounds as usize);
    for _ in 0..rounds {
        let started = Instant::now();
        for (task, usage) in checks {
            let outcome = rt.admit(task, usage);
            if let PolicySource::Fallback { name, reason, .. } = &outcome.source {
                bail!("{name} failed on task {}: {reason}", task.id);
            }
        }
        wasm.push(started.elapsed());
    }
    let (wasm_median_us, wasm_p90_us) = median_p90(wasm);
    Ok(BenchRow {
        tasks: checks.len() as u32,
        workers: 0,
        wasm_median_us,
        wasm_p90_us,
        native_median_us: None,
        native_p90_us: None,
        ratio: None,
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::cli::{Cli, Command, PolicyCommand};
    use clap::Parser;

    const EXAMPLE_SNAPSHOT: &str = include_str!("../../../examples/snapshots/small-cluster.json");

    fn parse(args: &[&str]) -> Result<PolicyCommand, String> {
        let mut argv = vec!["cloudai", "policy"];
        argv.extend_from_slice(args);
        match Cli::try_parse_from(argv)
            .map_err(|e| e.to_string())?
            .command
        {
            Command::Policy(command) => Ok(command),
            other => Err(format!("parsed as {other:?}")),
        }
    }

    #[test]
    fn test_takes_a_snapshot_a_configuration_and_limits() {
        let Ok(PolicyCommand::Test(args)) = parse(&[
            "test",
            "quota.wasm",
            "--snapshot",
            "cluster.json",
            "--config",
            r#"{"default": {}}"#,
            "--memory-mb",
            "128",
            "--deadline-ms",
            "20",
            "-o",
            "json",
        ]) else {
            panic!("did not parse");
        };
        assert_eq!(args.file, PathBuf::from("quota.wasm"));
        assert_eq!(args.snapshot, Some(PathBuf::from("cluster.json")));
        assert_eq!(args.config.read().unwrap(), r#"{"default": {}}"#);
        assert_eq!(
            args.limits.limits(),
            PolicyLimits {
                deadline: Duration::from_millis(20),
                memory_bytes: 128 << 20
            }
        );
        assert_eq!(args.output, Output::Json);

        let Ok(PolicyCommand::Test(args)) = parse(&["test", "p.wasm", "--snapshot", "s.json"])
        else {
            panic!("did not parse");
        };
        assert_eq!(args.config.read().unwrap(), "{}");
        assert_eq!(args.limits.limits(), PolicyLimits::default());
        assert_eq!(args.output, Output::Table);
    }

    #[test]
    fn test_refuses_two_configurations_a_missing_snapshot_and_zero_limits() {
        let both = parse(&[
            "test",
            "p.wasm",
            "--snapshot",
            "s.json",
            "--config",
            "{}",
            "--config-file",
            "c.json",
        ])
        .unwrap_err();
        assert!(both.contains("cannot be used with"), "{both}");
        let missing = parse(&["test", "p.wasm"]).unwrap_err();
        assert!(missing.contains("--snapshot"), "{missing}");
        for flag in ["--memory-mb", "--deadline-ms"] {
            let zero = parse(&["test", "p.wasm", "--snapshot", "s.json", flag, "0"]).unwrap_err();
            assert!(zero.contains("0 is not in"), "{flag}: {zero}");
        }
        let Ok(PolicyCommand::Test(args)) = parse(&[
            "test",
            "p.wasm",
            "--snapshot",
            "s.json",
            "--config-file",
            "/nonexistent/quota.json",
        ]) else {
            panic!("did not parse");
        };
        let err = format!("{:#}", args.config.read().unwrap_err());
        assert!(err.contains("/nonexistent/quota.json"), "{err}");
    }

    #[test]
    fn bench_takes_comma_separated_sizes_and_refuses_zero() {
        let Ok(PolicyCommand::Bench(args)) = parse(&[
            "bench",
            "best-fit.wasm",
            "--workers",
            "5,50",
            "--tasks",
            "3",
            "--rounds",
            "4",
        ]) else {
            panic!("did not parse");
        };
        assert_eq!(
            (args.workers, args.tasks, args.rounds),
            (vec![5, 50], vec![3], 4)
        );
        let Ok(PolicyCommand::Bench(args)) = parse(&["bench", "best-fit.wasm"]) else {
            panic!("did not parse");
        };
        assert_eq!(
            (args.workers, args.tasks, args.rounds),
            (vec![10, 100, 1000], vec![1, 100], 30)
        );
        assert!(parse(&["bench", "p.wasm", "--rounds", "0"]).is_err());
        assert!(parse(&["bench", "p.wasm", "--workers", "10,0"]).is_err());
        assert!(parse(&["bench", "p.wasm", "--tasks", "ten"]).is_err());
    }

    #[test]
    fn a_bad_snapshot_file_is_named_in_the_error() {
        let dir = tempfile::tempdir().unwrap();
        let bad = dir.path().join("broken.json");
        std::fs::write(&bad, r#"{"format": 1, "workers": []}"#).unwrap();
        let args = TestArgs {
            file: dir.path().join("never-read.wasm"),
            snapshot: Some(bad),
            conformance: false,
            config: ConfigArgs {
                config: None,
                config_file: None,
            },
            limits: LimitArgs {
                memory_mb: None,
                deadline_ms: None,
            },
            output: Output::Table,
        };
        let err = format!("{:#}", run_test(&args).unwrap_err());
        assert!(
            err.contains("broken.json is not a valid cluster snapshot") && err.contains("taken_at"),
            "{err}"
        );
        let args = TestArgs {
            snapshot: Some(dir.path().join("absent.json")),
            ..args
        };
        let err = format!("{:#}", run_test(&args).unwrap_err());
        assert!(
            err.contains("reading the snapshot") && err.contains("absent.json"),
            "{err}"
        );
    }

    #[test]
    fn the_example_snapshot_parses_and_holds_every_case_it_documents() {
        let snapshot = ClusterSnapshot::from_json(EXAMPLE_SNAPSHOT).unwrap();
        let workers = &snapshot.workers;
        assert!(workers.iter().any(|w| w.draining));
        assert!(workers.iter().any(|w| !w.is_active));
        assert!(workers.iter().any(|w| w.total_gpu > 0.0));
        // Draining and inactive workers are no candidates.
        let input = snapshot.placement_input();
        let candidates = workers
            .iter()
            .filter(|w| w.is_active && !w.draining)
            .count();
        assert_eq!(input.worker_count(), candidates);
        assert_eq!(input.task_count(), snapshot.queued.len());
        assert!(snapshot.queued.iter().any(|t| t.req_gpu > 0.0));
        assert!(
            snapshot
                .queued
                .iter()
                .all(|t| t.status == TaskStatus::Queued)
        );
        assert!(
            snapshot
                .pending
                .iter()
                .all(|t| t.status == TaskStatus::Pending)
        );
        // The native best-fit places some, and one task fits no worker at all.
        let decisions = native::best_fit(&input);
        assert!(
            decisions
                .iter()
                .any(|d| matches!(d, Decision::Assign { .. }))
        );
        assert!(
            decisions
                .iter()
                .any(|d| matches!(d, Decision::Unschedulable { .. }))
        );
        for w in workers {
            assert_eq!(
                w.available_cpu,
                w.total_cpu - w.allocated_cpu,
                "{}",
                w.worker_id
            );
            assert_eq!(w.available_memory, w.total_memory - w.allocated_memory);
            assert_eq!(w.available_gpu, w.total_gpu - w.allocated_gpu);
        }
        assert!(!snapshot.admission_inputs().is_empty());
        assert!(!snapshot.usage.is_empty());
    }

    #[test]
    fn the_report_prints_each_decision_the_summary_and_the_timings() {
        let report = TestReport {
            policy: "best-fit.wasm".into(),
            kind: "placement",
            snapshot: "small-cluster.json".into(),
            candidate_workers: 2,
            decisions: vec![
                TaskDecision {
                    task_id: "t1".into(),
                    decision: "assign",
                    worker_id: Some("w1".into()),
                    reason: None,
                },
                TaskDecision {
                    task_id: "t2".into(),
                    decision: "unschedulable",
                    worker_id: None,
                    reason: Some("too big".into()),
                },
            ],
            summary: vec![("assigned", 1), ("waiting", 0), ("unschedulable", 1)],
            compile_and_validate_ms: 52.25,
            round_ms: 0.25,
        };
        let text = report.to_text();
        assert!(
            text.starts_with(
                "best-fit.wasm (placement) on small-cluster.json: 2 tasks, 2 candidate workers\n"
            ),
            "{text}"
        );
        assert!(
            text.contains("summary: 1 assigned, 0 waiting, 1 unschedulable\n"),
            "{text}"
        );
        assert!(
            text.contains("timing: compile+validate 52.25 ms, round 250.0 µs\n"),
            "{text}"
        );
        let row = text.lines().find(|l| l.contains("t2")).unwrap();
        assert!(
            row.contains("unschedulable") && row.contains("too big"),
            "{row}"
        );
        let json = report.to_json();
        assert_eq!(json["summary"]["unschedulable"], 1);
        assert_eq!(json["decisions"][0]["worker_id"], "w1");
        assert!(json["decisions"][0].get("reason").is_none());
        assert_eq!(json["timings_ms"]["round"], 0.25);
    }

    #[test]
    fn percentiles_are_nearest_rank() {
        let ms = |xs: &[u64]| xs.iter().map(|&x| Duration::from_micros(x)).collect();
        assert_eq!(median_p90(ms(&[5])), (5.0, 5.0));
        assert_eq!(median_p90(ms(&[10, 1, 9, 2, 8, 3, 7, 4, 6, 5])), (6.0, 9.0));
        assert_eq!(median_p90(Vec::new()), (0.0, 0.0));
    }

    #[test]
    fn the_synthetic_snapshot_is_deterministic_and_well_formed() {
        let a = synthetic_snapshot(3, 50, 20);
        let b = synthetic_snapshot(3, 50, 20);
        let input = a.placement_input();
        assert_eq!(input.columns(), b.placement_input().columns());
        assert_eq!((input.worker_count(), input.task_count()), (50, 20));
        assert_eq!(a.admission_inputs().len(), 20);
        let w = &input.columns().workers;
        for i in 0..50 {
            assert_eq!(w.available_cpu[i], w.total_cpu[i] - w.allocated_cpu[i]);
            assert_eq!(
                w.available_memory[i],
                w.total_memory[i] - w.allocated_memory[i]
            );
        }
        // Most tasks fit: a round has work to do.
        let assigned = native::best_fit(&input)
            .iter()
            .filter(|d| matches!(d, Decision::Assign { .. }))
            .count();
        assert!(assigned >= 10, "{assigned} of 20 assigned");
    }

    /// The whole tool on real components, when they are built.
    #[test]
    fn policy_test_replays_the_example_snapshot_through_placement_and_admission_guests() {
        let Some(dir) = std::env::var_os("CLOUDAI_POLICY_WASM_DIR").map(PathBuf::from) else {
            eprintln!("skipping: CLOUDAI_POLICY_WASM_DIR is not set");
            return;
        };
        let dir_files = tempfile::tempdir().unwrap();
        let snapshot = dir_files.path().join("small-cluster.json");
        std::fs::write(&snapshot, EXAMPLE_SNAPSHOT).unwrap();
        let args = |file: &str, config: Option<&str>| TestArgs {
            file: dir.join(file),
            snapshot: Some(snapshot.clone()),
            conformance: false,
            config: ConfigArgs {
                config: config.map(str::to_string),
                config_file: None,
            },
            limits: LimitArgs {
                memory_mb: None,
                deadline_ms: None,
            },
            output: Output::Table,
        };
        let parsed = ClusterSnapshot::from_json(EXAMPLE_SNAPSHOT).unwrap();
        let input = parsed.placement_input();
        let report = run_test(&args("best-fit.wasm", None)).unwrap();
        assert_eq!(report.kind, "placement");
        // The guest best-fit and the native one choose alike.
        let native = placement_rows(&input, &native::best_fit(&input));
        let choice = |r: &TaskDecision| (r.task_id.clone(), r.decision, r.worker_id.clone());
        assert_eq!(
            report.decisions.iter().map(choice).collect::<Vec<_>>(),
            native.iter().map(choice).collect::<Vec<_>>()
        );

        let report = run_test(&args(
            "quota.wasm",
            Some(r#"{"default": {"max_running_tasks": 2, "max_cpu": 8}}"#),
        ))
        .unwrap();
        assert_eq!(report.kind, "admission");
        assert_eq!(report.decisions.len(), parsed.pending.len());

        // A hostile guest fails loading with the reason; bad configuration likewise.
        let err = format!(
            "{:#}",
            run_test(&args("fixture-bad-index.wasm", None)).unwrap_err()
        );
        assert!(err.contains("invalid answer"), "{err}");
        let err = format!(
            "{:#}",
            run_test(&args("image-allowlist.wasm", Some(r#"{"allow": []}"#))).unwrap_err()
        );
        assert!(err.contains("`allow` lists no rule"), "{err}");
    }
}
