//! End to end over HTTP: a real `cloudai serve` (release build, embedded store, events on, no
//! local worker) and simulated workers speaking the worker API as `cloudai worker` does
//! (register, heartbeat, long-poll their work, report each task started then completed; no
//! containers). The shape of a side-by-side run with Slurm on this machine: 100 workers of 10
//! cores, 10,000 one-core tasks submitted by 8 clients.
//!
//! Two phases, each timed on its own:
//! 1. **submission**: the 8 clients submit every task while no worker is registered (a
//!    backlog builds up);
//! 2. **from the backlog**: the workers register and run it all; allocations per second = tasks
//!    / (first registration -> last task handed to a worker), and the long polls per task.
//!
//! Run with: `cargo bench -p cloudai --bench http`
//! Options (env): BENCH_HTTP_TASKS (default 10000), BENCH_HTTP_WORKERS (100),
//! BENCH_HTTP_CPUS (10 per worker), BENCH_HTTP_SUBMITTERS (8), BENCH_RUNS (3),
//! BENCH_HTTP_REPORTS (`batch`, `single`, default both).

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "common/figures.rs"]
#[allow(dead_code)] // each bench uses some of it
mod figures;
use figures::{env_usize, median};

#[path = "common/serve.rs"]
#[allow(dead_code)] // shared with the scheduler bench, which uses all of it
mod serve;

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

/// How long nothing may move before a phase gives up and reports what it saw.
const STALL: Duration = Duration::from_secs(60);

/// Counters the simulated workers share.
#[derive(Default)]
struct Seen {
    /// Distinct assignments handed to workers.
    allocated: AtomicUsize,
    completed: AtomicUsize,
    polls: AtomicU64,
    /// Reports the host refused (they should not happen here).
    refused: AtomicU64,
    /// Microseconds since the phase started at the last allocation.
    last_allocation_us: AtomicU64,
}

async fn call(http: &reqwest::Client, url: String, token: &str, body: Option<&Value>) -> Value {
    let request = match body {
        Some(body) => http.post(url).json(body),
        None => http.get(url),
    };
    let response = match request
        .bearer_auth(token)
        .timeout(Duration::from_secs(30))
        .send()
        .await
    {
        Ok(response) => response,
        // The host is gone (the run ended) or did not answer in time.
        Err(error) => return json!({"refused": 0, "body": error.to_string()}),
    };
    let status = response.status();
    let body: Value = response.json().await.unwrap_or(Value::Null);
    if !status.is_success() {
        return json!({"refused": status.as_u16(), "body": body});
    }
    body
}

/// One simulated worker: long-polls its work and reports each new task started, then
/// completed, until `stop`: with `batched`, all the tasks of an answer in one request
/// (`POST /v1/workers/{id}/reports`); else two requests per task, as the one-report endpoints
/// take them.
async fn worker(
    batched: bool,
    host: Arc<serve::Host>,
    id: String,
    token: String,
    seen: Arc<Seen>,
    phase: Instant,
    stop: tokio_util::sync::CancellationToken,
) {
    let http = host.http.clone();
    let mut known = String::new();
    let mut handled: HashSet<String> = HashSet::new();
    while !stop.is_cancelled() {
        let url = format!(
            "{}/v1/workers/{id}/work?known={known}&wait_ms=2000",
            host.url
        );
        let list = tokio::select! {
            list = call(&http, url, &token, None) => list,
            () = stop.cancelled() => return,
        };
        seen.polls.fetch_add(1, Ordering::Relaxed);
        if list.get("refused").is_some() {
            seen.refused.fetch_add(1, Ordering::Relaxed);
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        }
        known = list["version"].as_str().unwrap_or_default().to_string();
        let mut fresh = Vec::new();
        for work in list["work"].as_array().into_iter().flatten() {
            let ass_id = work["ass_id"].as_str().unwrap_or_default().to_string();
            if handled.insert(ass_id.clone()) {
                seen.allocated.fetch_add(1, Ordering::Relaxed);
                seen.last_allocation_us
                    .fetch_max(phase.elapsed().as_micros() as u64, Ordering::Relaxed);
                fresh.push(ass_id);
            }
        }
        if fresh.is_empty() {
            continue;
        }
        if batched {
            // One request for every task of this answer: each started, then completed.
            let reports: Vec<Value> = fresh
                .iter()
                .map(|ass_id| {
                    json!({"ass_id": ass_id, "started": true,
                    "result": {"outcome": "completed", "exit_code": 0}})
                })
                .collect();
            let url = format!("{}/v1/workers/{id}/reports", host.url);
            let answer = call(&http, url, &token, Some(&json!({"reports": reports}))).await;
            for ack in answer["acks"].as_array().into_iter().flatten() {
                if ack["error"].is_null() {
                    seen.completed.fetch_add(1, Ordering::Relaxed);
                } else {
                    seen.refused.fetch_add(1, Ordering::Relaxed);
                }
            }
            if answer.get("refused").is_some() {
                seen.refused
                    .fetch_add(fresh.len() as u64, Ordering::Relaxed);
            }
            continue;
        }
        let mut reports = Vec::new();
        for ass_id in fresh {
            let (http, url, token, id, seen) = (
                http.clone(),
                host.url.clone(),
                token.clone(),
                id.clone(),
                seen.clone(),
            );
            reports.push(async move {
                let base = format!("{url}/v1/workers/{id}/assignments/{ass_id}");
                let started =
                    call(&http, format!("{base}/started"), &token, Some(&json!({}))).await;
                let done = call(
                    &http,
                    format!("{base}/result"),
                    &token,
                    Some(&json!({"outcome": "completed", "exit_code": 0})),
                )
                .await;
                if started.get("refused").is_some() || done.get("refused").is_some() {
                    seen.refused.fetch_add(1, Ordering::Relaxed);
                } else {
                    seen.completed.fetch_add(1, Ordering::Relaxed);
                }
            });
        }
        futures::future::join_all(reports).await;
    }
}

/// Heartbeats every worker every 2 s until `stop`.
async fn heartbeats(
    host: Arc<serve::Host>,
    workers: Vec<(String, String)>,
    stop: tokio_util::sync::CancellationToken,
) {
    while !stop.is_cancelled() {
        for (id, token) in &workers {
            let url = format!("{}/v1/workers/{id}/heartbeat", host.url);
            let _ = call(&host.http, url, token, Some(&json!({}))).await;
        }
        tokio::select! {
            () = tokio::time::sleep(Duration::from_secs(2)) => {}
            () = stop.cancelled() => return,
        }
    }
}

struct Run {
    /// Placements per placement round of the host's scheduler (all phases).
    placements_per_round: f64,
    /// CPU milliseconds per task of the host process, and of this process (the simulated
    /// clients and workers), in the backlog phase: what bounds the rate on a machine this
    /// small, whatever else it runs.
    host_cpu_ms: f64,
    bench_cpu_ms: f64,
    submitted_per_s: f64,
    allocated_per_s: f64,
    completed_per_s: f64,
    polls_per_task: f64,
    stalled: Option<String>,
}

async fn run(tasks: usize, workers: usize, cpus: f64, submitters: usize, batched: bool) -> Run {
    let host = Arc::new(serve::Host::start(&["--no-local-worker"]));

    // Phase 1: the backlog, with no worker registered.
    let spec =
        json!({"docker_image": "busybox", "command": "true", "req_cpu": 1, "req_memory": 0.5});
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut clients = Vec::new();
    for _ in 0..submitters {
        let (host, next, spec) = (host.clone(), next.clone(), spec.clone());
        clients.push(tokio::spawn(async move {
            while next.fetch_add(1, Ordering::Relaxed) < tasks {
                host.submit(&spec).await;
            }
        }));
    }
    for client in clients {
        client.await.unwrap();
    }
    let submitted_per_s = tasks as f64 / started.elapsed().as_secs_f64();

    // Phase 2: the workers join and work the backlog off.
    let seen = Arc::new(Seen::default());
    let stop = tokio_util::sync::CancellationToken::new();
    let (host_cpu, bench_cpu) = (host.cpu_seconds(), serve::cpu_seconds("/proc/self/stat"));
    let phase = Instant::now();
    let mut registered = Vec::new();
    for w in 0..workers {
        let id = format!("sim-{w:04}");
        let body = json!({
            "worker_id": id, "worker_ip": "127.0.0.1:50052",
            "total_cpu": cpus, "total_memory": cpus * 4.0, "total_storage": 100.0, "total_gpu": 0.0
        });
        let answer = host.post("/v1/workers", &host.join_token, &body).await;
        let token = answer["token"].as_str().unwrap().to_string();
        tokio::spawn(worker(
            batched,
            host.clone(),
            id.clone(),
            token.clone(),
            seen.clone(),
            phase,
            stop.clone(),
        ));
        registered.push((id, token));
    }
    tokio::spawn(heartbeats(host.clone(), registered, stop.clone()));
    let (mut last, mut last_change, mut last_report) = (0, Instant::now(), Instant::now());
    let mut stalled = None;
    loop {
        tokio::time::sleep(Duration::from_millis(20)).await;
        let completed = seen.completed.load(Ordering::Relaxed);
        if completed >= tasks {
            break;
        }
        if completed != last {
            (last, last_change) = (completed, Instant::now());
        }
        if last_report.elapsed() >= Duration::from_secs(10) {
            eprintln!(
                "  ... {completed} of {tasks} completed in {:.0} s",
                phase.elapsed().as_secs_f64()
            );
            last_report = Instant::now();
        }
        if last_change.elapsed() >= STALL {
            let overview = host.get("/v1/overview").await;
            stalled = Some(format!(
                "nothing completed for {} s: {completed} of {tasks} completed, {} handed to workers, {} reports refused; the host's overview: {overview}",
                STALL.as_secs(),
                seen.allocated.load(Ordering::Relaxed),
                seen.refused.load(Ordering::Relaxed),
            ));
            break;
        }
    }
    let completed_in = phase.elapsed().as_secs_f64();
    let host_cpu = host.cpu_seconds() - host_cpu;
    let bench_cpu = serve::cpu_seconds("/proc/self/stat") - bench_cpu;
    stop.cancel();
    let metrics = host.metrics().await;
    let rounds = serve::metric(&metrics, "cloudai_scheduler_round_batch_size_count");
    let placements = serve::metric(&metrics, "cloudai_scheduler_placements_total");
    let allocated = seen.allocated.load(Ordering::Relaxed);
    let allocated_in = seen.last_allocation_us.load(Ordering::Relaxed) as f64 / 1e6;
    let done = seen.completed.load(Ordering::Relaxed).max(1) as f64;
    Run {
        placements_per_round: placements / rounds.max(1.0),
        host_cpu_ms: host_cpu * 1000.0 / done,
        bench_cpu_ms: bench_cpu * 1000.0 / done,
        submitted_per_s,
        allocated_per_s: allocated as f64 / allocated_in.max(1e-9),
        completed_per_s: seen.completed.load(Ordering::Relaxed) as f64 / completed_in,
        polls_per_task: seen.polls.load(Ordering::Relaxed) as f64 / allocated.max(1) as f64,
        stalled,
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let tasks = env_usize("BENCH_HTTP_TASKS", 10_000).max(1);
    let workers = env_usize("BENCH_HTTP_WORKERS", 100).max(1);
    let cpus = env_usize("BENCH_HTTP_CPUS", 10).max(1) as f64;
    let submitters = env_usize("BENCH_HTTP_SUBMITTERS", 8).max(1);
    let runs = env_usize("BENCH_RUNS", 3).max(1);
    let modes: Vec<bool> = match std::env::var("BENCH_HTTP_REPORTS").as_deref() {
        Ok("batch") => vec![true],
        Ok("single") => vec![false],
        _ => vec![true, false],
    };
    println!(
        "end to end over HTTP: `cloudai serve` (embedded store, events on), {workers} simulated workers x {cpus} cores, {tasks} one-core tasks from {submitters} clients; median of {runs} runs"
    );
    for batched in modes {
        println!(
            "  reports {}:",
            if batched {
                "in batches (POST /v1/workers/{id}/reports, one per poll answer)"
            } else {
                "one request per start and per result"
            }
        );
        let mut results = Vec::new();
        for _ in 0..runs {
            let r = run(tasks, workers, cpus, submitters, batched).await;
            if let Some(why) = &r.stalled {
                println!("    STALLED: {why}");
            }
            results.push(r);
        }
        let row = |name: &str, unit: &str, f: &dyn Fn(&Run) -> f64| {
            let xs: Vec<f64> = results.iter().map(f).collect();
            let shown: Vec<String> = xs.iter().map(|x| format!("{x:.2}")).collect();
            println!(
                "    {name:<40} {:>10.2} {unit}   ({})",
                median(xs.clone()),
                shown.join(", ")
            );
        };
        row("submitted (no worker registered)", "tasks/s", &|r| {
            r.submitted_per_s
        });
        row("allocated from the backlog", "tasks/s", &|r| {
            r.allocated_per_s
        });
        row("completed from the backlog", "tasks/s", &|r| {
            r.completed_per_s
        });
        row("long polls per task", "", &|r| r.polls_per_task);
        row("placements per scheduler round", "", &|r| {
            r.placements_per_round
        });
        row("host CPU per task (backlog phase)", "ms", &|r| {
            r.host_cpu_ms
        });
        row("simulated workers' CPU per task", "ms", &|r| r.bench_cpu_ms);
    }
}
