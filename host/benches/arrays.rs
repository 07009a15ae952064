//! Submission through task arrays against single submissions, through a real `cloudai serve`
//! (release build, embedded store, events on, no local worker, so nothing runs): how many
//! tasks per second a host accepts, each answer given once the tasks are stored and admitted
//! (queued).
//!
//! Three ways to submit BENCH_ARRAY_TASKS (default 10,000) one-core tasks, each on a fresh
//! host, alternated run by run:
//! - **single**: BENCH_HTTP_SUBMITTERS (8) clients, one `POST /v1/tasks` per task;
//! - **one array**: one `POST /v1/arrays` with `count` = all of them;
//! - **arrays of 1,000**: the same clients, one `POST /v1/arrays` of 1,000 tasks each.
//!
//! Then, once, the largest array a default host takes (100,000 tasks).
//!
//! Run with: `cargo bench -p cloudai --bench arrays`
//! Options (env): BENCH_ARRAY_TASKS, BENCH_HTTP_SUBMITTERS, BENCH_RUNS (3), BENCH_ARRAY_MAX
//! (100000; 0 skips that row).

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "common/figures.rs"]
#[allow(dead_code)] // each bench uses some of it
mod figures;
use figures::{env_usize, median};

#[path = "common/serve.rs"]
#[allow(dead_code)] // shared with the other HTTP benches
mod serve;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use serde_json::{Value, json};

fn spec() -> Value {
    json!({"docker_image": "busybox", "command": "true", "req_cpu": 1, "req_memory": 0.5})
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Way {
    Single,
    OneArray,
    ArraysOf1000,
}

/// Tasks accepted per second, and the host's CPU per task (ms), on a fresh host.
async fn run(way: Way, tasks: usize, submitters: usize) -> (f64, f64) {
    let host = Arc::new(serve::Host::start(&["--no-local-worker"]));
    let cpu_before = host.cpu_seconds();
    let started = Instant::now();
    match way {
        Way::OneArray => {
            let array = host
                .post(
                    "/v1/arrays",
                    &host.token.clone(),
                    &json!({"count": tasks, "task": spec()}),
                )
                .await;
            assert_eq!(array["tasks_by_state"]["queued"], tasks, "{array}");
        }
        Way::Single | Way::ArraysOf1000 => {
            let per_request = if way == Way::Single { 1 } else { 1_000 };
            let next = Arc::new(AtomicUsize::new(0));
            let mut clients = Vec::new();
            for _ in 0..submitters {
                let (host, next) = (host.clone(), next.clone());
                clients.push(tokio::spawn(async move {
                    loop {
                        let from = next.fetch_add(per_request, Ordering::Relaxed);
                        if from >= tasks {
                            break;
                        }
                        let n = per_request.min(tasks - from);
                        if way == Way::Single {
                            host.submit(&spec()).await;
                        } else {
                            let body = json!({"count": n, "task": spec()});
                            host.post("/v1/arrays", &host.token.clone(), &body).await;
                        }
                    }
                }));
            }
            for client in clients {
                client.await.unwrap();
            }
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    let cpu_ms = (host.cpu_seconds() - cpu_before) * 1000.0 / tasks as f64;
    // Every task is stored and queued (admitted), whichever way it came.
    let overview = host.get("/v1/overview").await;
    assert_eq!(
        overview["tasks_by_state"]["queued"].as_u64(),
        Some(tasks as u64),
        "{overview}"
    );
    (tasks as f64 / elapsed, cpu_ms)
}

#[tokio::main]
async fn main() {
    let tasks = env_usize("BENCH_ARRAY_TASKS", 10_000).max(1);
    let submitters = env_usize("BENCH_HTTP_SUBMITTERS", 8).max(1);
    let runs = env_usize("BENCH_RUNS", 3).max(1);
    let largest = env_usize("BENCH_ARRAY_MAX", 100_000);
    println!(
        "submission: {tasks} tasks, {submitters} clients for single submissions and arrays of \
         1,000, {runs} runs alternated, each on a fresh host"
    );
    let ways = [Way::Single, Way::OneArray, Way::ArraysOf1000];
    let mut rates: Vec<Vec<f64>> = vec![Vec::new(); ways.len()];
    let mut cpus: Vec<Vec<f64>> = vec![Vec::new(); ways.len()];
    for run_index in 0..runs {
        for (i, way) in ways.iter().enumerate() {
            let (rate, cpu) = run(*way, tasks, submitters).await;
            println!(
                "  run {}: {way:?}: {rate:.0} tasks/s accepted, host CPU {cpu:.3} ms per task",
                run_index + 1
            );
            rates[i].push(rate);
            cpus[i].push(cpu);
        }
    }
    let single = median(rates[0].clone());
    for (i, way) in ways.iter().enumerate() {
        let rate = median(rates[i].clone());
        println!(
            "{way:?}: median {rate:.0} tasks/s ({:?}), {:.1}x single submissions, host CPU {:.3} ms per task",
            rates[i].iter().map(|r| r.round()).collect::<Vec<_>>(),
            rate / single,
            median(cpus[i].clone()),
        );
    }
    if largest > 0 {
        let (rate, cpu) = run(Way::OneArray, largest, 1).await;
        println!(
            "one array of {largest}: accepted in {:.2} s ({rate:.0} tasks/s), host CPU {cpu:.3} ms per task",
            largest as f64 / rate
        );
    }
}
