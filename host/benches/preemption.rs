//! Placement with preemption on a full cluster, against plain placement: how many urgent tasks
//! per second get placed when every one must first make a lower-priority task stop, and what a
//! placement round costs when the active policy may preempt.
//!
//! Each run builds a fresh store (the embedded SQLite store; also MongoDB when
//! `CLOUDAI_BENCH_MONGODB_URI` is set) with BENCH_WORKERS (100) simulated workers, each running
//! 8 one-core tasks of priority 0, then queues BENCH_URGENT (800, at most 8 per worker: every
//! running task may have to make way) one-core tasks of priority 10 and runs the scheduler
//! until every urgent task is running. Two ways, alternated run by
//! run:
//! - **plain**: the workers have room for the urgent tasks besides what they run (8 + urgent /
//!   workers cores each); the active policy is `best-fit` (contract 0.1.0);
//! - **preempting**: the workers are full (8 cores); the active policy is `best-fit-preempt`
//!   (contract 0.2.0): every urgent task preempts a running one. The bench plays the workers'
//!   part: after each scheduler cycle, every task asked to stop is reported stopped
//!   (`Lifecycle::finish_attempt` with `Finish::Preempted`, what a worker's `cancelled` report does).
//!
//! Figures: urgent tasks placed per second (end to end, the simulated stops included), victims
//! stopped per second, the mean scheduler cycle, and the ratio preempting / plain.
//!
//! Run with: `scripts/build-policies.sh && cargo bench -p cloudai --bench preemption`
//! Options (env): BENCH_RUNS (3), BENCH_WORKERS (100), BENCH_URGENT (800; on MongoDB
//! BENCH_MONGO_URGENT, 200), CLOUDAI_POLICY_WASM_DIR (default `$CARGO_TARGET_DIR/policies`).

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "common/figures.rs"]
#[allow(dead_code)] // each bench uses some of it
mod figures;
use figures::{env_usize, median};

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cloudai::lifecycle::{Cause, Finish, Lifecycle};
use cloudai::model::{Resources, Task, TaskStatus, Worker};
use cloudai::policy::{EngineSettings, PolicyEngine, PolicyRuntime, RuntimeSettings};
use cloudai::scheduler::{Scheduler, SchedulerConfig, Wakeup};
use cloudai::store::mongo::MongoStore;
use cloudai::store::sqlite::SqliteStore;
use cloudai::store::{AssignmentFilter, Store, TaskQuery};

/// How long nothing may move before the bench gives up and reports what it saw.
const STALL: Duration = Duration::from_secs(60);
const URGENT_USER: &str = "urgent-user";

#[derive(Clone, Copy, PartialEq)]
enum Way {
    Plain,
    Preempting,
}

impl Way {
    fn name(self) -> &'static str {
        match self {
            Way::Plain => "plain (best-fit 0.1.0, room left)",
            Way::Preempting => "preempting (best-fit-preempt 0.2.0, full cluster)",
        }
    }
}

struct Outcome {
    placed_per_second: f64,
    victims_per_second: f64,
    victims: usize,
    cycles: usize,
    mean_cycle_ms: f64,
    stalled: Option<String>,
}

fn wasm_dir() -> PathBuf {
    std::env::var_os("CLOUDAI_POLICY_WASM_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(
                std::env::var("CARGO_TARGET_DIR").unwrap_or_else(|_| "target".to_string()),
            )
            .join("policies")
        })
}

fn runtime(guest: &str) -> Arc<PolicyRuntime> {
    let path = wasm_dir().join(format!("{guest}.wasm"));
    let bytes = std::fs::read(&path).unwrap_or_else(|e| {
        panic!(
            "reading {}: {e} (build the guests with scripts/build-policies.sh)",
            path.display()
        )
    });
    let rt = PolicyRuntime::new(
        PolicyEngine::new(EngineSettings::default()).unwrap(),
        RuntimeSettings::default(),
    );
    rt.load(guest, "1", &bytes, "{}").unwrap();
    rt.activate(guest, "1").unwrap();
    Arc::new(rt)
}

fn config() -> SchedulerConfig {
    SchedulerConfig {
        round_interval: Duration::from_secs(3600),
        // The simulated workers never heartbeat: fresh for an hour.
        heartbeat_staleness: Duration::from_secs(3600),
        ..SchedulerConfig::default()
    }
}

fn task(id: String, user: &str, priority: i32) -> Task {
    let mut task = Task::new_pending(
        id,
        user.to_string(),
        "busybox:1.36".into(),
        Resources::new(1.0, 1.0, 0.0, 0.0),
    );
    task.status = TaskStatus::Queued;
    task.priority = priority;
    task
}

/// `workers` workers of `cores` cores, each running 8 one-core tasks of priority 0 (placed by
/// a scheduler with the native best-fit).
async fn fill(store: &Arc<dyn Store>, workers: usize, cores: f64) {
    for w in 0..workers {
        let worker = Worker::new(
            format!("worker-{w:04}"),
            "127.0.0.1:0".into(),
            Resources::new(cores, cores * 4.0, 100.0, 0.0),
            BTreeMap::new(),
            String::new(),
        );
        store.insert_worker(&worker).await.unwrap();
    }
    for i in 0..workers * 8 {
        let low = task(format!("low-{i:06}"), &format!("user-{}", i % 10), 0);
        store.insert_task(&low, None).await.unwrap();
    }
    let native = Arc::new(PolicyRuntime::new(
        PolicyEngine::new(EngineSettings::default()).unwrap(),
        RuntimeSettings::default(),
    ));
    let scheduler = Scheduler::new(store.clone(), native, Wakeup::new(), config());
    while store.task_counts().await.unwrap().queued > 0 {
        scheduler.cycle().await;
    }
}

/// Every running task asked to stop, reported stopped as its worker would; returns how many.
async fn stop_victims(lifecycle: &Lifecycle) -> usize {
    let store = lifecycle.store();
    let mut stopped = 0;
    let mut after = None;
    loop {
        let page = store
            .list_tasks(&TaskQuery {
                status: Some(TaskStatus::Running),
                limit: 1000,
                after,
                ..TaskQuery::default()
            })
            .await
            .unwrap();
        for victim in page.tasks.iter().filter(|t| t.cancel_requested) {
            let Some(by) = victim.preempted_by.clone() else {
                continue;
            };
            let assignments = store
                .list_assignments(&AssignmentFilter {
                    task_id: Some(victim.task_id.clone()),
                    active_only: true,
                    ..AssignmentFilter::default()
                })
                .await
                .unwrap();
            for a in assignments {
                if lifecycle
                    .finish_attempt(
                        &a.ass_id,
                        Finish::Preempted { by: by.clone() },
                        Cause::Worker,
                    )
                    .await
                    .is_ok()
                {
                    stopped += 1;
                }
            }
        }
        match page.next {
            Some(next) => after = Some(next),
            None => return stopped,
        }
    }
}

async fn urgent_running(store: &dyn Store) -> usize {
    store
        .running_counts(&[URGENT_USER.to_string()])
        .await
        .unwrap()
        .get(URGENT_USER)
        .copied()
        .unwrap_or(0) as usize
}

async fn run(store: Arc<dyn Store>, way: Way, workers: usize, urgent: usize) -> Outcome {
    let cores = match way {
        Way::Plain => 8.0 + (urgent as f64 / workers as f64).ceil(),
        Way::Preempting => 8.0,
    };
    fill(&store, workers, cores).await;
    let policies = match way {
        Way::Plain => runtime("best-fit"),
        Way::Preempting => runtime("best-fit-preempt"),
    };
    for i in 0..urgent {
        let t = task(format!("urgent-{i:06}"), URGENT_USER, 10);
        store.insert_task(&t, None).await.unwrap();
    }
    let wakeup = Wakeup::new();
    let scheduler = Scheduler::new(store.clone(), policies, wakeup.clone(), config());
    let lifecycle = Lifecycle::new(store.clone(), wakeup);
    let started = Instant::now();
    let (mut cycles, mut cycle_time, mut victims) = (0, Duration::ZERO, 0);
    let (mut last, mut last_change, mut stalled) = (0, Instant::now(), None);
    loop {
        let cycle = Instant::now();
        scheduler.cycle().await;
        cycle_time += cycle.elapsed();
        cycles += 1;
        victims += stop_victims(&lifecycle).await;
        let running = urgent_running(&*store).await;
        if running >= urgent {
            break;
        }
        if running != last {
            (last, last_change) = (running, Instant::now());
        }
        if last_change.elapsed() >= STALL {
            stalled = Some(format!(
                "{running} of {urgent} urgent tasks running after {} s without progress; {victims} victims stopped",
                STALL.as_secs()
            ));
            break;
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    let placed = urgent_running(&*store).await;
    Outcome {
        placed_per_second: placed as f64 / elapsed,
        victims_per_second: victims as f64 / elapsed,
        victims,
        cycles,
        mean_cycle_ms: cycle_time.as_secs_f64() * 1000.0 / cycles.max(1) as f64,
        stalled,
    }
}

async fn sqlite() -> (Arc<dyn Store>, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open_in_dir(dir.path()).unwrap();
    (Arc::new(store), dir)
}

async fn mongodb(uri: &str) -> Arc<dyn Store> {
    let database = format!("cloudai_bench_preempt_{}", uuid::Uuid::now_v7().simple());
    Arc::new(MongoStore::connect(uri, &database).await.unwrap())
}

fn report(label: &str, way: Way, outcomes: &[Outcome]) -> f64 {
    let placed = median(outcomes.iter().map(|o| o.placed_per_second).collect());
    let victims = median(outcomes.iter().map(|o| o.victims_per_second).collect());
    let cycle = median(outcomes.iter().map(|o| o.mean_cycle_ms).collect());
    let cycles = median(outcomes.iter().map(|o| o.cycles as f64).collect());
    let stopped = median(outcomes.iter().map(|o| o.victims as f64).collect());
    println!(
        "{label:<8} {:<52} {placed:>10.0} {victims:>12.0} {stopped:>9.0} {cycles:>7.0} {cycle:>10.1}",
        way.name()
    );
    for o in outcomes {
        if let Some(stalled) = &o.stalled {
            println!("         STALLED: {stalled}");
        }
    }
    placed
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let runs = env_usize("BENCH_RUNS", 3).max(1);
    let workers = env_usize("BENCH_WORKERS", 100).max(1);
    // A full cluster holds 8 tasks per worker: more urgent ones could never all run.
    let urgent = env_usize("BENCH_URGENT", 800).clamp(1, workers * 8);
    println!(
        "Preemption on a full cluster: {workers} workers running 8 one-core tasks of priority 0 \
         each, {urgent} one-core tasks of priority 10 queued; median of {runs} runs, alternated"
    );
    println!(
        "{:<8} {:<52} {:>10} {:>12} {:>9} {:>7} {:>10}",
        "store", "way", "placed/s", "stopped/s", "victims", "cycles", "cycle ms"
    );
    let mut stores: Vec<(&str, Option<String>, usize)> = vec![("sqlite", None, urgent)];
    if let Ok(uri) = std::env::var("CLOUDAI_BENCH_MONGODB_URI") {
        stores.push((
            "mongodb",
            Some(uri),
            env_usize("BENCH_MONGO_URGENT", 200).clamp(1, workers * 8),
        ));
    }
    for (label, uri, urgent) in stores {
        let mut plain = Vec::new();
        let mut preempting = Vec::new();
        for r in 0..runs {
            // Alternated, and the order swapped every run: the machine is shared and noisy.
            let order = if r % 2 == 0 {
                [Way::Plain, Way::Preempting]
            } else {
                [Way::Preempting, Way::Plain]
            };
            for way in order {
                let (store, _dir) = match &uri {
                    None => {
                        let (store, dir) = sqlite().await;
                        (store, Some(dir))
                    }
                    Some(uri) => (mongodb(uri).await, None),
                };
                let outcome = run(store, way, workers, urgent).await;
                match way {
                    Way::Plain => plain.push(outcome),
                    Way::Preempting => preempting.push(outcome),
                }
            }
        }
        let p = report(label, Way::Plain, &plain);
        let q = report(label, Way::Preempting, &preempting);
        println!(
            "{label:<8} preempting / plain: {:.2}x the placement rate",
            q / p.max(f64::MIN_POSITIVE)
        );
    }
}
