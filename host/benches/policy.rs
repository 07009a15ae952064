//! Policy engine cost: compile time, compile time on a disk cache hit (a restarted host),
//! load time with the compiled component cached in memory,
//! instantiation time, and per-round latency of the Wasm best-fit against the native best-fit
//! (same algorithm) for 1 and 100 tasks against 10, 100 and 1,000 workers. Prints medians.
//!
//! Run with: `scripts/build-policies.sh && cargo bench -p cloudai --bench policy`
//! Options (env): CLOUDAI_POLICY_WASM_DIR (default `$CARGO_TARGET_DIR/policies`), BENCH_RUNS
//! (runs of each measurement, default 7), BENCH_ROUNDS (rounds per run, default 200).

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "common/figures.rs"]
#[allow(dead_code)] // each bench uses some of it
mod figures;
use figures::env_usize;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use cloudai::policy::{
    EngineSettings, PlacementInput, PolicyEngine, PolicyRuntime, PolicySource, RuntimeSettings,
    native,
};

fn median(mut xs: Vec<Duration>) -> Duration {
    xs.sort();
    xs[xs.len() / 2]
}

fn fmt(d: Duration) -> String {
    let us = d.as_secs_f64() * 1e6;
    if us >= 1000.0 {
        format!("{:.2} ms", us / 1000.0)
    } else {
        format!("{us:.1} µs")
    }
}

/// A cluster with some load, and a batch of tasks most of which fit (the generator that
/// `cloudai policy bench` uses).
fn cluster(seed: u64, workers: usize, tasks: usize) -> PlacementInput {
    cloudai::tooling::synthetic_snapshot(seed, workers, tasks).placement_input()
}

fn main() {
    let runs = env_usize("BENCH_RUNS", 7).max(1);
    let rounds = env_usize("BENCH_ROUNDS", 200).max(1);
    let dir = std::env::var_os("CLOUDAI_POLICY_WASM_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let target = std::env::var_os("CARGO_TARGET_DIR").unwrap_or_else(|| "target".into());
            PathBuf::from(target).join("policies")
        });
    let path = dir.join("best-fit.wasm");
    let bytes = std::fs::read(&path).unwrap_or_else(|e| {
        panic!(
            "reading {}: {e} (build the guests with scripts/build-policies.sh, or set CLOUDAI_POLICY_WASM_DIR)",
            path.display()
        )
    });
    println!(
        "policy bench: best-fit.wasm ({} bytes), median of {runs} runs",
        bytes.len()
    );

    // Compile: a fresh engine each run, so nothing is cached.
    let compile = median(
        (0..runs)
            .map(|_| {
                let engine = PolicyEngine::new(EngineSettings::default()).unwrap();
                let started = Instant::now();
                engine.compile(&bytes).unwrap();
                started.elapsed()
            })
            .collect(),
    );

    // Compile on a restarted host: a fresh engine each run, whose disk cache (wasmtime's, in
    // DATA_DIR/policy-cache in `cloudai serve`) already holds the artifact.
    let cache = tempfile::tempdir().unwrap();
    let cached_engine = || {
        PolicyEngine::new(EngineSettings {
            cache_dir: Some(cache.path().to_path_buf()),
            ..EngineSettings::default()
        })
        .unwrap()
    };
    cached_engine().compile(&bytes).unwrap();
    let disk_cached = median(
        (0..runs)
            .map(|_| {
                let engine = cached_engine();
                let started = Instant::now();
                engine.compile(&bytes).unwrap();
                let took = started.elapsed();
                assert_eq!(engine.disk_cache_stats(), Some((1, 0)), "a disk cache hit");
                took
            })
            .collect(),
    );

    let rt = PolicyRuntime::new(
        PolicyEngine::new(EngineSettings::default()).unwrap(),
        RuntimeSettings::default(),
    );
    rt.load("best-fit", "0", &bytes, "{}").unwrap();
    // Load of bytes already compiled: link, configure and smoke decision only.
    let cached_load = median(
        (1..=runs)
            .map(|v| {
                let started = Instant::now();
                rt.load("best-fit", &v.to_string(), &bytes, "{}").unwrap();
                started.elapsed()
            })
            .collect(),
    );
    let instantiate = median(
        (0..runs * 20)
            .map(|_| rt.time_instantiate("best-fit", "0").unwrap())
            .collect(),
    );
    rt.activate("best-fit", "0").unwrap();
    println!("  compile (Cranelift)              {:>10}", fmt(compile));
    println!(
        "  compile, hit in the disk cache   {:>10}  (a restarted host)",
        fmt(disk_cached)
    );
    println!(
        "  load, component already compiled {:>10}  (link + configure + smoke round)",
        fmt(cached_load)
    );
    println!(
        "  instantiate (InstancePre, pool)  {:>10}",
        fmt(instantiate)
    );
    println!();
    println!(
        "  {:>5} x {:>5}  {:>10}  {:>10}  {:>7}  {:>16}",
        "tasks", "workers", "wasm", "native", "ratio", "wasm, 0 tasks"
    );
    for tasks in [1usize, 100] {
        for workers in [10usize, 100, 1000] {
            let input = cluster((tasks * 7919 + workers) as u64, workers, tasks);
            let empty = cluster((tasks * 7919 + workers) as u64, workers, 0);
            // Same algorithm, same answers.
            let outcome = rt.place(&input);
            assert!(
                matches!(outcome.source, PolicySource::Wasm { .. }),
                "{:?}",
                outcome.source
            );
            let native_decisions = native::best_fit(&input);
            for (w, n) in outcome.decisions.iter().zip(&native_decisions) {
                assert_eq!(std::mem::discriminant(w), std::mem::discriminant(n));
            }
            let mut wasm_runs = Vec::new();
            let mut native_runs = Vec::new();
            let mut empty_runs = Vec::new();
            for _ in 0..runs {
                let started = Instant::now();
                for _ in 0..rounds {
                    std::hint::black_box(rt.place(std::hint::black_box(&input)));
                }
                wasm_runs.push(started.elapsed() / rounds as u32);
                let started = Instant::now();
                for _ in 0..rounds {
                    std::hint::black_box(native::best_fit(std::hint::black_box(&input)));
                }
                native_runs.push(started.elapsed() / rounds as u32);
                let started = Instant::now();
                for _ in 0..rounds {
                    std::hint::black_box(rt.place(std::hint::black_box(&empty)));
                }
                empty_runs.push(started.elapsed() / rounds as u32);
            }
            let (wasm, native, empty) =
                (median(wasm_runs), median(native_runs), median(empty_runs));
            println!(
                "  {:>5} x {:>5}  {:>10}  {:>10}  {:>6.1}x  {:>16}",
                tasks,
                workers,
                fmt(wasm),
                fmt(native),
                wasm.as_secs_f64() / native.as_secs_f64().max(1e-12),
                fmt(empty)
            );
        }
    }
}
