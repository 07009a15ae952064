//! Deadline misses of the risk-aware policy (`rts`) against best-fit and spread, in a
//! simulation that runs the real policy components through the host's `PolicyRuntime` and
//! `PlacementInput` (runtime history included, as the scheduler feeds it).
//!
//! The cluster: 12 workers of three speeds — 4 slow (a run takes 3x its base time; 16 CPU),
//! 4 medium (1.6x; 8 CPU), 4 fast (1x; 16 CPU) — listed slow first, so a speed-blind policy
//! breaks ties towards slow workers. Tasks: three types, equally likely, labelled
//! `task-type`: `short` (1 CPU, 2 s base), `medium` (2 CPU, 10 s), `long` (4 CPU, 30 s),
//! arriving as a Poisson stream at about 70% of the cluster's capacity. A run lasts
//! `base * speed * (1 + 0.5 * cpu load of its worker after placement) * noise` (noise
//! log-normal, 10%). A task's deadline is `2 * base * 1.6` after submission (twice its run
//! time on a medium worker). Rounds every 0.5 simulated seconds place up to 100 queued tasks
//! in arrival order; the history the policies see is the newest 5,000 runs, refreshed every
//! 5 simulated seconds (as the scheduler does). Every policy sees the same arrivals per seed.
//!
//! Run with: `scripts/build-policies.sh && cargo bench -p cloudai --bench rts`
//! Options (env): CLOUDAI_POLICY_WASM_DIR (default `$CARGO_TARGET_DIR/policies`), BENCH_RUNS
//! (seeds, default 5), BENCH_TASKS (tasks per run, default 2000).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, VecDeque};
use std::path::PathBuf;
use std::time::Duration;

use chrono::{DateTime, Duration as ChronoDuration, Utc};
use cloudai::model::{Resources, RuntimeSample, TASK_TYPE_LABEL, Task, Worker};
use cloudai::policy::{
    Decision, EngineSettings, LoadOptions, PlacementInput, PolicyEngine, PolicyLimits,
    PolicyRuntime, PolicySource, RuntimeHistory, RuntimeSettings,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const ROUND_S: f64 = 0.5;
const HISTORY_REFRESH_S: f64 = 5.0;
const HISTORY_WINDOW: usize = 5_000;
const CONTENTION: f64 = 0.5;
const NOISE_CV: f64 = 0.1;
const SLA_K: f64 = 2.0;
const REFERENCE_SPEED: f64 = 1.6;
const LOAD: f64 = 0.7;

struct TaskType {
    name: &'static str,
    cpu: f64,
    memory: f64,
    base_s: f64,
}

const TYPES: [TaskType; 3] = [
    TaskType {
        name: "short",
        cpu: 1.0,
        memory: 2.0,
        base_s: 2.0,
    },
    TaskType {
        name: "medium",
        cpu: 2.0,
        memory: 4.0,
        base_s: 10.0,
    },
    TaskType {
        name: "long",
        cpu: 4.0,
        memory: 8.0,
        base_s: 30.0,
    },
];

/// (speed factor, CPU, memory GB), slow first.
const WORKERS: [(f64, f64, f64); 12] = [
    (3.0, 16.0, 64.0),
    (3.0, 16.0, 64.0),
    (3.0, 16.0, 64.0),
    (3.0, 16.0, 64.0),
    (1.6, 8.0, 32.0),
    (1.6, 8.0, 32.0),
    (1.6, 8.0, 32.0),
    (1.6, 8.0, 32.0),
    (1.0, 16.0, 64.0),
    (1.0, 16.0, 64.0),
    (1.0, 16.0, 64.0),
    (1.0, 16.0, 64.0),
];

#[derive(Clone, Copy)]
struct Arrival {
    at_s: f64,
    kind: usize,
    /// A standard normal draw for the run's noise, fixed per task so that every policy sees
    /// the same luck.
    noise: f64,
}

fn arrivals(seed: u64, count: usize) -> Vec<Arrival> {
    let mut rng = StdRng::seed_from_u64(seed);
    // Mean CPU-seconds a task holds, with runs spread over the speeds.
    let mean_speed =
        WORKERS.iter().map(|w| w.0 * w.1).sum::<f64>() / WORKERS.iter().map(|w| w.1).sum::<f64>();
    let cpu_seconds = TYPES
        .iter()
        .map(|t| t.cpu * t.base_s * mean_speed * (1.0 + CONTENTION * LOAD))
        .sum::<f64>()
        / TYPES.len() as f64;
    let capacity: f64 = WORKERS.iter().map(|w| w.1).sum();
    let rate = LOAD * capacity / cpu_seconds;
    let mut at_s = 0.0;
    (0..count)
        .map(|_| {
            at_s += -(1.0 - rng.random::<f64>()).ln() / rate;
            // Box-Muller.
            let (u1, u2): (f64, f64) = (1.0 - rng.random::<f64>(), rng.random());
            Arrival {
                at_s,
                kind: rng.random_range(0..TYPES.len()),
                noise: (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos(),
            }
        })
        .collect()
}

#[derive(Default)]
struct Outcome {
    missed: usize,
    done: usize,
    response_s: Vec<f64>,
    /// Runs per worker speed.
    runs_by_speed: BTreeMap<String, usize>,
    /// Rounds decided by the native fallback (the policy failed or ran late).
    fallbacks: usize,
}

fn simulate(rt: &PolicyRuntime, arrivals: &[Arrival], label: &str) -> Outcome {
    let epoch: DateTime<Utc> = DateTime::from_timestamp(1_800_000_000, 0).unwrap();
    let at = |s: f64| epoch + ChronoDuration::milliseconds((s * 1000.0) as i64);
    let mut workers: Vec<Worker> = WORKERS
        .iter()
        .enumerate()
        .map(|(i, (_, cpu, memory))| {
            Worker::new(
                format!("w{i:02}"),
                "127.0.0.1".into(),
                Resources::new(*cpu, *memory, 100.0, 0.0),
                BTreeMap::new(),
                String::new(),
            )
        })
        .collect();
    let tasks: Vec<Task> = arrivals
        .iter()
        .enumerate()
        .map(|(i, a)| {
            let kind = &TYPES[a.kind];
            let mut t = Task::new_pending(
                format!("t{i:05}"),
                "bench".into(),
                format!("bench/{}:1", kind.name),
                Resources::new(kind.cpu, kind.memory, 1.0, 0.0),
            );
            t.created_at = at(a.at_s);
            t.labels.insert(TASK_TYPE_LABEL.into(), kind.name.into());
            t
        })
        .collect();

    let mut outcome = Outcome::default();
    let mut queue: VecDeque<usize> = VecDeque::new();
    // (end time, worker, task, runtime)
    let mut running: Vec<(f64, usize, usize, f64)> = Vec::new();
    let mut samples: VecDeque<RuntimeSample> = VecDeque::new();
    let mut history = RuntimeHistory::default();
    let mut next_arrival = 0;
    let mut last_refresh = f64::NEG_INFINITY;
    let mut now_s = 0.0;
    while outcome.done < tasks.len() {
        now_s += ROUND_S;
        // Runs that ended.
        let mut i = 0;
        while i < running.len() {
            let (end, w, t, runtime) = running[i];
            if end > now_s {
                i += 1;
                continue;
            }
            running.swap_remove(i);
            let kind = &TYPES[arrivals[t].kind];
            let worker = &mut workers[w];
            account(worker, kind, -1.0);
            let response = end - arrivals[t].at_s;
            if response > SLA_K * kind.base_s * REFERENCE_SPEED {
                outcome.missed += 1;
            }
            outcome.response_s.push(response);
            outcome.done += 1;
            samples.push_back(RuntimeSample {
                worker_id: worker.worker_id.clone(),
                task_type: kind.name.into(),
                runtime_s: runtime,
            });
            if samples.len() > HISTORY_WINDOW {
                samples.pop_front();
            }
        }
        while next_arrival < arrivals.len() && arrivals[next_arrival].at_s <= now_s {
            queue.push_back(next_arrival);
            next_arrival += 1;
        }
        if now_s - last_refresh >= HISTORY_REFRESH_S {
            history = RuntimeHistory::from_samples(samples.make_contiguous());
            last_refresh = now_s;
        }
        if queue.is_empty() {
            continue;
        }
        let batch: Vec<usize> = queue.iter().take(100).copied().collect();
        let batch_tasks: Vec<Task> = batch.iter().map(|t| tasks[*t].clone()).collect();
        let input = PlacementInput::build(&batch_tasks, &workers, at(now_s))
            .with_runtime_history(batch_tasks.iter().map(Task::task_type), &history);
        let placed = rt.place(&input);
        if !matches!(placed.source, PolicySource::Wasm { .. }) {
            eprintln!("{label}: a round fell back: {:?}", placed.source);
            outcome.fallbacks += 1;
        }
        for (t, decision) in batch.iter().zip(placed.decisions) {
            let Decision::Assign { worker: w } = decision else {
                continue;
            };
            let w = w as usize;
            let kind = &TYPES[arrivals[*t].kind];
            let worker = &mut workers[w];
            assert!(
                worker.available_cpu >= kind.cpu && worker.available_memory >= kind.memory,
                "{label}: overcommitted {}",
                worker.worker_id
            );
            account(worker, kind, 1.0);
            let load = worker.allocated_cpu / worker.total_cpu;
            let speed = WORKERS[w].0;
            let noise = (NOISE_CV * arrivals[*t].noise).exp();
            let runtime = kind.base_s * speed * (1.0 + CONTENTION * load) * noise;
            running.push((now_s + runtime, w, *t, runtime));
            *outcome
                .runs_by_speed
                .entry(format!("{speed}x"))
                .or_default() += 1;
            queue.retain(|q| q != t);
        }
    }
    outcome
}

/// Moves a task's request into (`sign` 1) or out of (-1) the worker's allocation.
fn account(worker: &mut Worker, kind: &TaskType, sign: f64) {
    for (allocated, available, amount) in [
        (
            &mut worker.allocated_cpu,
            &mut worker.available_cpu,
            kind.cpu,
        ),
        (
            &mut worker.allocated_memory,
            &mut worker.available_memory,
            kind.memory,
        ),
        (
            &mut worker.allocated_storage,
            &mut worker.available_storage,
            1.0,
        ),
    ] {
        *allocated += sign * amount;
        *available -= sign * amount;
    }
}

fn percentile(xs: &mut [f64], p: f64) -> f64 {
    xs.sort_by(|a, b| a.total_cmp(b));
    xs[((xs.len() - 1) as f64 * p).round() as usize]
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(|a, b| a.total_cmp(b));
    xs[xs.len() / 2]
}

fn main() {
    let runs = std::env::var("BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5usize)
        .max(1);
    let count = std::env::var("BENCH_TASKS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2000usize)
        .max(10);
    let dir = std::env::var_os("CLOUDAI_POLICY_WASM_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let target = std::env::var_os("CARGO_TARGET_DIR").unwrap_or_else(|| "target".into());
            PathBuf::from(target).join("policies")
        });
    println!(
        "rts bench: {count} tasks per run, {runs} seeds; deadline = {SLA_K} x base x {REFERENCE_SPEED}"
    );
    println!(
        "{:<10} {:>6} {:>10} {:>10} {:>10} {:>10}   runs on slow / medium / fast workers",
        "policy", "seed", "missed", "p50 resp", "p95 resp", "fallbacks"
    );
    let mut summary: Vec<(&str, Vec<f64>)> = Vec::new();
    let mut runtimes: Vec<(&str, PolicyRuntime)> = Vec::new();
    for name in ["best-fit", "spread", "rts"] {
        let path = dir.join(format!("{name}.wasm"));
        let bytes = std::fs::read(&path).unwrap_or_else(|e| {
            panic!(
                "reading {}: {e} (build the guests with scripts/build-policies.sh, or set CLOUDAI_POLICY_WASM_DIR)",
                path.display()
            )
        });
        let rt = PolicyRuntime::new(
            PolicyEngine::new(EngineSettings::default()).unwrap(),
            RuntimeSettings::default(),
        );
        // Decisions are measured here, not latency (the policy bench does that): a deadline
        // that a preempted round on a shared machine cannot miss.
        let options = LoadOptions {
            limits: Some(PolicyLimits {
                deadline: Duration::from_secs(2),
                ..PolicyLimits::default()
            }),
            smoke_check: true,
        };
        rt.load_with(name, "1", &bytes, "{}", options).unwrap();
        rt.activate(name, "1").unwrap();
        let mut rates = Vec::new();
        for seed in 0..runs as u64 {
            let mut o = simulate(&rt, &arrivals(seed, count), name);
            let rate = o.missed as f64 / o.done as f64;
            rates.push(rate);
            let by = |s: &str| o.runs_by_speed.get(s).copied().unwrap_or(0);
            println!(
                "{name:<10} {seed:>6} {:>9.1}% {:>9.1}s {:>9.1}s {:>10}   {} / {} / {}",
                rate * 100.0,
                percentile(&mut o.response_s, 0.5),
                percentile(&mut o.response_s, 0.95),
                o.fallbacks,
                by("3x"),
                by("1.6x"),
                by("1x"),
            );
        }
        summary.push((name, rates));
        runtimes.push((name, rt));
    }
    println!();
    let best_fit = median(summary[0].1.clone());
    for (name, rates) in &summary {
        let m = median(rates.clone());
        println!(
            "{name:<10} median deadline misses {:>5.1}%  ({:.2}x best-fit's)",
            m * 100.0,
            if best_fit > 0.0 {
                m / best_fit
            } else {
                f64::NAN
            }
        );
    }
    round_latency(&runtimes);
}

/// Per-round latency at 100 tasks x 1,000 workers with a runtime history for every task's
/// type on most workers (the risk model's full path), next to the native best-fit.
fn round_latency(runtimes: &[(&str, PolicyRuntime)]) {
    let snapshot = cloudai::tooling::synthetic_snapshot(3, 1000, 100);
    let input = snapshot.placement_input();
    let types: Vec<&str> = snapshot.queued.iter().map(Task::task_type).collect();
    let mut samples = Vec::new();
    for w in 0..input.worker_count() as u32 {
        for (k, task_type) in types.iter().enumerate() {
            if !(w as usize + k).is_multiple_of(4) {
                samples.push(RuntimeSample {
                    worker_id: input.worker_id(w).unwrap().to_string(),
                    task_type: (*task_type).to_string(),
                    runtime_s: 1.0 + ((w as usize * 7 + k) % 50) as f64,
                });
            }
        }
    }
    let input = input.with_runtime_history(types, &RuntimeHistory::from_samples(&samples));
    let time = |f: &dyn Fn()| {
        let xs: Vec<f64> = (0..31)
            .map(|_| {
                let started = std::time::Instant::now();
                f();
                started.elapsed().as_secs_f64() * 1000.0
            })
            .collect();
        median(xs)
    };
    println!();
    println!("per round, 100 tasks x 1,000 workers with runtime history (median of 31):");
    println!(
        "  native best-fit {:.2} ms",
        time(&|| {
            cloudai::policy::native::best_fit(&input);
        })
    );
    for (name, rt) in runtimes {
        println!(
            "  {name} (Wasm) {:.2} ms",
            time(&|| {
                let placed = rt.place(&input);
                assert!(matches!(placed.source, PolicySource::Wasm { .. }));
            })
        );
    }
}
