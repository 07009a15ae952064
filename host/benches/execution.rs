//! Execution overhead: a real `cloudai serve` with its local worker on the local Docker
//! engine. Prints, over BENCH_RUNS runs of `true` one after the other, the submit-to-started
//! and submit-to-completed latency next to a bare `docker run --rm` of the same image measured
//! in the same run (interleaved), and the throughput of short tasks kept 20 at a time.
//!
//! Run with: `cargo bench -p cloudai --bench execution` (Docker needed; busybox-static for the
//! test image). Options (env): BENCH_RUNS (default 100), BENCH_TASKS (throughput tasks,
//! default 200), BENCH_CONCURRENCY (default 20).

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "common/figures.rs"]
#[allow(dead_code)] // each bench uses some of it
mod figures;
use figures::{env_usize, percentile};

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use serde_json::{Value, json};

const IMAGE: &str = "cloudai-test/busybox:1";

/// What the executor gives a task of 1 core and 256 MB (besides /output).
const LIMITS: [&str; 10] = [
    "--cpus",
    "1",
    "-m",
    "256m",
    "--memory-swap",
    "256m",
    "--cap-drop",
    "ALL",
    "--pids-limit",
    "512",
];

fn ms(from: &Value, to: &Value) -> f64 {
    let at = |v: &Value| v.as_str().unwrap().parse::<DateTime<Utc>>().unwrap();
    (at(to) - at(from)).num_microseconds().unwrap() as f64 / 1000.0
}

#[path = "common/serve.rs"]
#[allow(dead_code)] // shared with the scheduler bench, which uses all of it
mod serve;
use serve::Host;

/// `true` asking for `cpu` cores and 256 MB.
fn spec(cpu: f64) -> Value {
    json!({"docker_image": IMAGE, "command": "true", "req_cpu": cpu, "req_memory": 0.25})
}

/// Polls until the task is final; it must have completed.
async fn finished(host: &Host, id: &str) -> Value {
    let task = host
        .wait_for(id, Duration::from_millis(2), |task| {
            ["completed", "failed", "cancelled"].contains(&task["status"].as_str().unwrap_or(""))
        })
        .await;
    assert_eq!(task["status"], "completed", "{task}");
    task
}

#[tokio::main]
async fn main() {
    let runs = env_usize("BENCH_RUNS", 100).max(1);
    let tasks = env_usize("BENCH_TASKS", 200).max(1);
    let concurrency = env_usize("BENCH_CONCURRENCY", 20).max(1);
    let docker = cloudai::executor::connect().await.expect("a Docker engine");
    cloudai::executor::testimage::ensure_busybox_image(&docker, IMAGE)
        .await
        .expect("building the test image");
    let host = Host::start(&[]);
    let joined = Instant::now();
    while host.get("/v1/workers").await["workers"]
        .as_array()
        .is_none_or(Vec::is_empty)
    {
        assert!(
            joined.elapsed() < Duration::from_secs(30),
            "no local worker"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for _ in 0..3 {
        let id = host.submit(&spec(1.0)).await;
        finished(&host, &id).await; // warm-up
    }

    println!("execution bench: `true` in {IMAGE}, {runs} runs, interleaved with bare docker run");
    let (mut to_started, mut to_completed, mut client_seen, mut bare, mut bare_limited) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for i in 0..runs {
        let submitted = Instant::now();
        let id = host.submit(&spec(1.0)).await;
        let task = finished(&host, &id).await;
        client_seen.push(submitted.elapsed().as_secs_f64() * 1000.0);
        to_started.push(ms(&task["created_at"], &task["started_at"]));
        to_completed.push(ms(&task["created_at"], &task["completed_at"]));

        // The same image bare, then with the limits and hardening the task container gets.
        for (limits, times) in [(&[][..], &mut bare), (&LIMITS[..], &mut bare_limited)] {
            let started = Instant::now();
            let status = Command::new("docker")
                .args(["run", "--rm", "--network", "none"])
                .args(limits)
                .args([IMAGE, "true"])
                .stdout(Stdio::null())
                .status()
                .unwrap();
            assert!(status.success());
            times.push(started.elapsed().as_secs_f64() * 1000.0);
        }
        if (i + 1) % 20 == 0 {
            eprintln!("  {}/{runs}", i + 1);
        }
    }
    let row = |name: &str, xs: &Vec<f64>| {
        println!(
            "  {name:<42} p50 {:>7.1} ms   p90 {:>7.1} ms",
            percentile(xs.clone(), 0.5),
            percentile(xs.clone(), 0.9)
        );
    };
    row("submit -> started (host timestamps)", &to_started);
    row("submit -> completed (host timestamps)", &to_completed);
    row("submit -> completed seen by the client", &client_seen);
    row("bare `docker run --rm --network none`", &bare);
    row("the same with the task's limits", &bare_limited);
    println!(
        "  overhead at p50 (client-seen completion - bare docker run): {:+.1} ms",
        percentile(client_seen, 0.5) - percentile(bare, 0.5)
    );

    // Throughput: `concurrency` tasks in flight until `tasks` have completed.
    let started = Instant::now();
    let mut in_flight = Vec::new();
    let (mut submitted, mut done) = (0, 0);
    while done < tasks {
        while in_flight.len() < concurrency && submitted < tasks {
            in_flight.push(host.submit(&spec(0.05)).await);
            submitted += 1;
        }
        let mut still = Vec::new();
        for id in in_flight {
            let task = host.get(&format!("/v1/tasks/{id}")).await;
            match task["status"].as_str() {
                Some("completed") => done += 1,
                Some("failed" | "cancelled") => panic!("{task}"),
                _ => still.push(id),
            }
        }
        in_flight = still;
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let elapsed = started.elapsed().as_secs_f64();
    println!(
        "  throughput, {concurrency} in flight: {tasks} tasks in {elapsed:.1} s = {:.0} tasks/min",
        tasks as f64 / elapsed * 60.0
    );
}
