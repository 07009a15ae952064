//! Scheduler throughput and latency with simulated workers (store documents, no agents):
//! placements per second for a queue of tasks over 100 and 1,000 workers, on the embedded
//! SQLite store and on MongoDB (when `CLOUDAI_BENCH_MONGODB_URI` or `CLOUDAI_TEST_MONGODB_URI`
//! is set), with the native best-fit and with the Wasm best-fit (from
//! `CLOUDAI_POLICY_WASM_DIR`, default `$CARGO_TARGET_DIR/policies`); submit-to-assigned latency
//! on an idle cluster; and the process's peak RSS after a placement cycle over a store with
//! 100,000 tasks and 1,000 workers.
//!
//! Run with: `cargo bench -p cloudai --bench scheduler`
//! Options (env): BENCH_RUNS (default 3), BENCH_TASKS (default 10000), BENCH_MONGO_TASKS and
//! BENCH_MONGO_RUNS (default 2000 and 1: FerretDB, the test server, is far slower than
//! MongoDB), BENCH_RSS_TASKS (default 100000), BENCH_LATENCY_SAMPLES (default 200),
//! BENCH_STORES (the throughput rows to run, comma-separated among `sqlite`, `sqlite+events`,
//! `mongodb`, `mongodb+events`, `mongodb-path`; default all; empty: none, e.g. to measure the
//! peak RSS in a process that ran nothing else), BENCH_WORKERS (default `100,1000`), BENCH_LOG
//! (a tracing filter: `cloudai_control::scheduler::placement=info` prints every round's read,
//! policy and write times).
//!
//! `mongodb` is the store as it connects (on FerretDB 1.x: its compatibility path, task by
//! task under document locks); `mongodb-path` takes the MongoDB path whatever the server is,
//! which is how its commands per placement are counted on FerretDB 1.x (one scheduler, and no
//! heartbeats during the run: FerretDB 1.x's updates are not atomic). The cost column counts
//! the commands (MongoDB) or transactions (SQLite) of the scheduler's own store handle.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "common/figures.rs"]
#[allow(dead_code)] // each bench uses some of it
mod figures;
use figures::{env_usize, median, percentile};

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

#[path = "common/serve.rs"]
#[allow(dead_code)] // shared with the HTTP bench, which uses all of it
mod serve;

use cloudai::events::{EventHub, EventSink};
use cloudai::lifecycle::Lifecycle;
use cloudai::model::{Resources, Task, TaskStatus, Worker};
use cloudai::policy::{EngineSettings, PolicyEngine, PolicyRuntime, RuntimeSettings};
use cloudai::scheduler::{Scheduler, SchedulerConfig, Wakeup};
use cloudai::store::mongo::{MongoStore, ServerKind};
use cloudai::store::sqlite::SqliteStore;
use cloudai::store::{Store, TaskQuery};

/// A queued task of one of 20 users, 0.5–2 cores, 1–4 GB, some with priority.
fn queued_task(i: usize) -> Task {
    let cpu = [0.5, 1.0, 2.0][i % 3];
    let mut task = Task::new_pending(
        format!("task-{i:07}-{}", uuid::Uuid::now_v7().simple()),
        format!("user-{}", i % 20),
        "busybox:1.36".into(),
        Resources::new(cpu, 1.0 + (i % 4) as f64, 0.0, 0.0),
    );
    task.status = TaskStatus::Queued;
    task.priority = i32::from(i.is_multiple_of(10));
    task
}

/// `workers` workers with room for all of `tasks` (about 1.2 cores and 3 GB asked per task).
async fn fill(store: &dyn Store, workers: usize, tasks: usize) {
    fill_sized(store, workers, tasks, tasks).await
}

/// `workers` workers with room for `room_for` tasks (about 1.2 cores and 3 GB each), and
/// `tasks` queued tasks.
async fn fill_sized(store: &dyn Store, workers: usize, tasks: usize, room_for: usize) {
    let cpu = ((room_for as f64 * 1.3) / workers as f64).ceil() + 2.0;
    for w in 0..workers {
        let worker = Worker::new(
            format!("worker-{w:05}-{}", uuid::Uuid::now_v7().simple()),
            "127.0.0.1:0".into(),
            Resources::new(cpu, cpu * 4.0, 1000.0, 0.0),
            BTreeMap::from([("zone".into(), format!("z{}", w % 3))]),
            String::new(),
        );
        store.insert_worker(&worker).await.unwrap();
    }
    for i in 0..tasks {
        store.insert_task(&queued_task(i), None).await.unwrap();
    }
}

fn runtime(wasm: Option<&[u8]>) -> Arc<PolicyRuntime> {
    let rt = PolicyRuntime::new(
        PolicyEngine::new(EngineSettings::default()).unwrap(),
        RuntimeSettings::default(),
    );
    if let Some(bytes) = wasm {
        rt.load("best-fit", "1", bytes, "{}").unwrap();
        rt.activate("best-fit", "1").unwrap();
    }
    Arc::new(rt)
}

fn config() -> SchedulerConfig {
    SchedulerConfig {
        round_interval: Duration::from_secs(3600),
        ..SchedulerConfig::default()
    }
}

/// [`config`] for workers that never heartbeat: fresh for an hour.
fn config_without_heartbeats() -> SchedulerConfig {
    SchedulerConfig {
        heartbeat_staleness: Duration::from_secs(3600),
        ..config()
    }
}

async fn queued_count(store: &dyn Store) -> usize {
    store.task_counts().await.unwrap().queued as usize
}

/// Keeps every worker of `store` fresh, as agents would, one heartbeat each per 2 s.
fn heartbeats(store: Arc<dyn Store>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            let started = Instant::now();
            for w in store.list_workers().await.unwrap_or_default() {
                let _ = store
                    .heartbeat(&w.worker_id, chrono::Utc::now().timestamp(), None)
                    .await;
            }
            tokio::time::sleep(Duration::from_secs(2).saturating_sub(started.elapsed())).await;
        }
    })
}

/// What placing a queue measured.
struct Placed {
    per_second: f64,
    /// Store commands (MongoDB) or transactions (SQLite) of the scheduler's own handle per
    /// placement; `None` when the store does not count them.
    cost: Option<f64>,
    /// CPU milliseconds of this whole process (the scheduler, the policy and, on SQLite, the
    /// store's threads; the heartbeats and the progress reads too) per 1,000 placements:
    /// less sensitive than the rate to other tenants taking the machine's cores.
    cpu_ms_per_1000: Option<f64>,
    /// Set when nothing moved for [`STALL`]: what the bench saw then.
    stalled: Option<String>,
}

/// How long the queue may stay unchanged before the bench gives up and reports what it saw.
const STALL: Duration = Duration::from_secs(60);

/// Places the whole queue with the scheduler on `store` (its own handle, whose commands are
/// counted by `count`); `watch` is another handle on the same data, for progress and
/// heartbeats, so that neither is counted.
async fn place_all(
    store: Arc<dyn Store>,
    events: EventSink,
    count: &(dyn Fn() -> Option<u64> + Sync),
    watch: Arc<dyn Store>,
    policies: Arc<PolicyRuntime>,
    tasks: usize,
    beat: bool,
) -> Placed {
    let config = if beat {
        config()
    } else {
        config_without_heartbeats()
    };
    let scheduler =
        Scheduler::new(store.clone(), policies, Wakeup::new(), config).with_events(events);
    let beating = beat.then(|| heartbeats(watch.clone()));
    let started = Instant::now();
    let cpu_before = serve::cpu_seconds("/proc/self/stat");
    let before = count();
    let (mut last_queued, mut last_change, mut last_report) =
        (tasks, Instant::now(), Instant::now());
    let mut stalled = None;
    loop {
        scheduler.cycle().await;
        let queued = queued_count(&*watch).await;
        if queued == 0 {
            break;
        }
        if queued != last_queued {
            (last_queued, last_change) = (queued, Instant::now());
        }
        if last_report.elapsed() >= Duration::from_secs(10) {
            let placed = tasks - queued;
            eprintln!(
                "  ... {placed} of {tasks} placed in {:.0} s ({:.0}/s)",
                started.elapsed().as_secs_f64(),
                placed as f64 / started.elapsed().as_secs_f64()
            );
            last_report = Instant::now();
        }
        if last_change.elapsed() >= STALL {
            let workers = watch.list_workers().await.unwrap_or_default();
            let free_cpu: f64 = workers.iter().map(|w| w.available_cpu).sum();
            let fresh = workers
                .iter()
                .filter(|w| w.last_heartbeat >= chrono::Utc::now().timestamp() - 15)
                .count();
            let sample = watch
                .list_tasks(&TaskQuery {
                    status: Some(TaskStatus::Queued),
                    limit: 1,
                    ..TaskQuery::default()
                })
                .await
                .ok()
                .and_then(|p| p.tasks.into_iter().next())
                .and_then(|t| t.status_reason)
                .unwrap_or_default();
            stalled = Some(format!(
                "nothing placed for {} s with {queued} tasks queued; {} workers ({fresh} with a fresh heartbeat), {free_cpu:.1} cores free; a queued task says: {sample:?}",
                STALL.as_secs(),
                workers.len()
            ));
            break;
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    let cpu = serve::cpu_seconds("/proc/self/stat") - cpu_before;
    if let Some(beating) = beating {
        beating.abort();
    }
    let placed = tasks - queued_count(&*watch).await;
    let cost = match (before, count()) {
        (Some(b), Some(a)) if placed > 0 => Some((a - b) as f64 / placed as f64),
        _ => None,
    };
    Placed {
        per_second: placed as f64 / elapsed,
        cost,
        cpu_ms_per_1000: (placed > 0).then(|| cpu * 1_000_000.0 / placed as f64),
        stalled,
    }
}

async fn sqlite_store() -> (Arc<dyn Store>, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open_in_dir(dir.path()).unwrap();
    (Arc::new(store), dir)
}

/// A store under measurement: the scheduler's handle, how to read its command (or
/// transaction) count, and a second handle on the same data for filling, watching and
/// heartbeats (not counted).
struct Measured {
    store: Arc<dyn Store>,
    count: Box<dyn Fn() -> Option<u64> + Sync>,
    watch: Arc<dyn Store>,
    /// Whether the simulated workers heartbeat during the run (not on the MongoDB path forced
    /// onto FerretDB 1.x, whose updates race: its workers are kept fresh by a long staleness).
    heartbeats: bool,
    _dir: Option<tempfile::TempDir>,
}

async fn measured_sqlite() -> Measured {
    let dir = tempfile::tempdir().unwrap();
    let counted = SqliteStore::open_in_dir(dir.path()).unwrap();
    let watch = SqliteStore::open_in_dir(dir.path()).unwrap();
    Measured {
        store: Arc::new(counted.clone()),
        count: Box::new(move || Some(counted.transactions())),
        watch: Arc::new(watch),
        heartbeats: true,
        _dir: Some(dir),
    }
}

/// On MongoDB as detected; with `native`, the MongoDB path whatever the server is (on
/// FerretDB 1.x: how its commands per placement are counted here, one writer only).
async fn measured_mongo(uri: &str, native: bool) -> Measured {
    let database = format!("cloudai_bench_{}", uuid::Uuid::now_v7().simple());
    let connect = || async {
        if native {
            MongoStore::connect_as_server(uri, &database, ServerKind::MongoDb).await
        } else {
            MongoStore::connect(uri, &database).await
        }
    };
    let counted = connect().await.unwrap();
    // As detected, always: FerretDB 1.24 cannot repeat the MongoDB path's `createIndexes` on
    // the indexes the first connect created.
    let watch = MongoStore::connect(uri, &database).await.unwrap();
    let heartbeats = !(native && forced_on_ferretdb(&watch).await);
    Measured {
        store: Arc::new(counted.clone()),
        count: Box::new(move || Some(counted.commands_started())),
        watch: Arc::new(watch),
        heartbeats,
        _dir: None,
    }
}

/// Whether the server behind `store` is FerretDB 1.x (whatever path the store takes).
async fn forced_on_ferretdb(store: &MongoStore) -> bool {
    store
        .database()
        .run_command(mongodb::bson::doc! { "buildInfo": 1 })
        .await
        .map(|info| info.contains_key("ferretdbVersion"))
        .unwrap_or(false)
}

/// Events as `cloudai serve` records them: every state change the scheduler (and a
/// submission) makes also records an event (written in batches by the hub's writer, tailed
/// back by its tailer). Keep the hub alive.
async fn with_events(store: Arc<dyn Store>) -> (EventSink, Arc<EventHub>) {
    let (hub, sink) = EventHub::start(
        store,
        Duration::from_secs(3600),
        tokio_util::sync::CancellationToken::new(),
    )
    .await;
    (sink, hub)
}

fn peak_rss_mb() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

/// Milliseconds from each insert to its task running, one task at a time, with a running
/// scheduler woken as the API wakes it.
async fn idle_latencies(store: Arc<dyn Store>, events: EventSink, samples: usize) -> Vec<f64> {
    let wakeup = Wakeup::new();
    let scheduler = Scheduler::new(store.clone(), runtime(None), wakeup.clone(), config())
        .with_events(events.clone());
    let lifecycle = Lifecycle::new(store.clone(), wakeup.clone()).with_events(events);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(scheduler.run(async {
        let _ = stopped.await;
    }));
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut latencies = Vec::new();
    for i in 0..samples {
        let mut task = queued_task(i);
        // Tiny, so that the 10 workers hold every sample (none is ever released).
        (task.req_cpu, task.req_memory) = (0.001, 0.001);
        let submitted = Instant::now();
        let id = lifecycle.submit(&task, None).await.unwrap().task.task_id;
        wakeup.wake();
        while store.get_task(&id).await.unwrap().status != TaskStatus::Running {
            assert!(
                submitted.elapsed() < Duration::from_secs(10),
                "sample {i} not placed within 10 s"
            );
            tokio::task::yield_now().await;
        }
        latencies.push(submitted.elapsed().as_secs_f64() * 1000.0);
    }
    let _ = stop.send(());
    running.await.unwrap();
    latencies
}

/// Submit -> assigned through a real `cloudai serve` (embedded store, events on, no local
/// worker) and one simulated worker registered over HTTP: the host's own timestamps (the
/// task's `created_at` to its assignment's `assigned_at`, stored to the millisecond), and
/// what a client polling
/// `GET /v1/tasks/{id}` every millisecond sees from the start of its POST.
async fn api_latency(samples: usize) {
    let host = serve::Host::start(&["--no-local-worker"]);
    let worker = serde_json::json!({
        "worker_id": "bench-worker", "worker_ip": "127.0.0.1:50052",
        "total_cpu": 4096.0, "total_memory": 4096.0, "total_storage": 100.0, "total_gpu": 0.0
    });
    let join = host.join_token.clone();
    let registered = host.post("/v1/workers", &join, &worker).await;
    // Heartbeats keep the worker a candidate however many samples are asked for.
    let heartbeats = {
        let (http, url) = (host.http.clone(), host.url.clone());
        let token = registered["token"].as_str().unwrap().to_string();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(2)).await;
                let _ = http
                    .post(format!("{url}/v1/workers/bench-worker/heartbeat"))
                    .bearer_auth(&token)
                    .json(&serde_json::json!({}))
                    .send()
                    .await;
            }
        })
    };
    let spec = serde_json::json!({"docker_image": "busybox", "command": "true",
        "req_cpu": 1, "req_memory": 1});
    let (mut host_side, mut client_seen) = (Vec::new(), Vec::new());
    for i in 0..samples + 5 {
        let submitted = Instant::now();
        let id = host.submit(&spec).await;
        let task = host
            .wait_for(&id, Duration::from_millis(1), |t| t["status"] == "running")
            .await;
        let seen = submitted.elapsed().as_secs_f64() * 1000.0;
        let assignments = host.get(&format!("/v1/tasks/{id}/assignments")).await;
        let at = |v: &serde_json::Value| {
            v.as_str()
                .unwrap()
                .parse::<chrono::DateTime<chrono::Utc>>()
                .unwrap()
        };
        let assigned = at(&assignments["assignments"][0]["assigned_at"]);
        let micros = (assigned - at(&task["created_at"]))
            .num_microseconds()
            .unwrap();
        if i >= 5 {
            // The first few warm the connection and the host's caches.
            host_side.push(micros as f64 / 1000.0);
            client_seen.push(seen);
        }
    }
    heartbeats.abort();
    println!(
        "submit -> assigned through `cloudai serve` (HTTP, embedded store, events on, 1 simulated worker, {samples} tasks one at a time): host timestamps (1 ms resolution) p50 {:.0} ms, p99 {:.0} ms; seen by a client polling every 1 ms p50 {:.2} ms, p99 {:.2} ms",
        percentile(host_side.clone(), 0.5),
        percentile(host_side, 0.99),
        percentile(client_seen.clone(), 0.5),
        percentile(client_seen, 0.99)
    );
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    // The scheduler's own log, to see where a round's time goes (it costs the rates a little:
    // leave it off for the figures).
    if let Ok(filter) = std::env::var("BENCH_LOG") {
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
            .with_writer(std::io::stderr)
            .init();
    }
    let runs = env_usize("BENCH_RUNS", 3).max(1);
    let tasks = env_usize("BENCH_TASKS", 10_000).max(1);
    let mongo_tasks = env_usize("BENCH_MONGO_TASKS", 2_000).max(1);
    let mongo_runs = env_usize("BENCH_MONGO_RUNS", 1).max(1);
    let stores = std::env::var("BENCH_STORES")
        .unwrap_or_else(|_| "sqlite,sqlite+events,mongodb,mongodb+events,mongodb-path".into());
    let stores: Vec<&str> = stores.split(',').map(str::trim).collect();
    let worker_counts: Vec<usize> = std::env::var("BENCH_WORKERS")
        .unwrap_or_else(|_| "100,1000".into())
        .split(',')
        .map(|w| w.trim().parse().expect("BENCH_WORKERS: numbers"))
        .collect();
    let wasm_dir = std::env::var_os("CLOUDAI_POLICY_WASM_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let target = std::env::var_os("CARGO_TARGET_DIR").unwrap_or_else(|| "target".into());
            PathBuf::from(target).join("policies")
        });
    let wasm = std::fs::read(wasm_dir.join("best-fit.wasm")).ok();
    if wasm.is_none() {
        println!(
            "(no best-fit.wasm in {}: Wasm rows skipped)",
            wasm_dir.display()
        );
    }
    let mongo_uri = std::env::var("CLOUDAI_BENCH_MONGODB_URI")
        .or_else(|_| std::env::var("CLOUDAI_TEST_MONGODB_URI"))
        .ok()
        .filter(|u| !u.is_empty());

    println!(
        "scheduler bench: placements per second, median of {runs} runs ({mongo_runs} on MongoDB)"
    );
    println!(
        "  store            workers   tasks  policy          placements/s  cost/placement  CPU ms/1k   (runs of placements/s)"
    );
    println!("  (cost: the scheduler's MongoDB commands, or SQLite transactions, per placement;");
    println!("   CPU: this process's CPU per 1,000 placements, the MongoDB server's not included)");
    // `+events`: with the event stream on, as `cloudai serve` runs.
    for (store_name, count) in [
        ("sqlite", tasks),
        ("sqlite+events", tasks),
        ("mongodb", mongo_tasks),
        ("mongodb-path", mongo_tasks),
        ("mongodb+events", mongo_tasks),
    ] {
        if !stores.contains(&store_name) {
            continue;
        }
        let on_mongo = store_name.starts_with("mongodb");
        if on_mongo && mongo_uri.is_none() {
            if store_name.ends_with("events") {
                continue;
            }
            println!(
                "  mongodb: skipped (set CLOUDAI_BENCH_MONGODB_URI or CLOUDAI_TEST_MONGODB_URI)"
            );
            continue;
        }
        for &workers in &worker_counts {
            for (policy_name, bytes) in [
                ("native best-fit", None),
                ("wasm best-fit", wasm.as_deref()),
            ] {
                if policy_name.starts_with("wasm") && bytes.is_none() {
                    continue;
                }
                let (mut rates, mut costs, mut cpus) = (Vec::new(), Vec::new(), Vec::new());
                let runs = if on_mongo { mongo_runs } else { runs };
                for _ in 0..runs {
                    let measured = if on_mongo {
                        let native = store_name == "mongodb-path";
                        measured_mongo(mongo_uri.as_deref().unwrap(), native).await
                    } else {
                        measured_sqlite().await
                    };
                    // One cluster shape for every store (workers with room for BENCH_TASKS),
                    // whatever the queue's length: a MongoDB row places fewer tasks on the
                    // same cluster.
                    fill_sized(&*measured.watch, workers, count, tasks.max(count)).await;
                    let (events, _hub) = if store_name.ends_with("events") {
                        let (events, hub) = with_events(measured.store.clone()).await;
                        (events, Some(hub))
                    } else {
                        (EventSink::off(), None)
                    };
                    let placed = place_all(
                        measured.store.clone(),
                        events,
                        &*measured.count,
                        measured.watch.clone(),
                        runtime(bytes),
                        count,
                        measured.heartbeats,
                    )
                    .await;
                    if let Some(why) = &placed.stalled {
                        println!("  {store_name} {workers} workers {policy_name}: STALLED: {why}");
                    }
                    rates.push(placed.per_second);
                    costs.extend(placed.cost);
                    cpus.extend(placed.cpu_ms_per_1000);
                }
                let shown: Vec<String> = rates.iter().map(|r| format!("{r:.0}")).collect();
                let cost = if costs.is_empty() {
                    "-".to_string()
                } else {
                    format!("{:.3}", median(costs.clone()))
                };
                let cpu = if cpus.is_empty() {
                    "-".to_string()
                } else {
                    format!("{:.0}", median(cpus.clone()))
                };
                println!(
                    "  {store_name:<15} {workers:>8} {count:>7}  {policy_name:<15} {:>12.0}  {cost:>13}  {cpu:>10}   ({})",
                    median(rates.clone()),
                    shown.join(", ")
                );
            }
        }
    }

    // Submit-to-assigned on an idle cluster: a running scheduler, woken as the API wakes it.
    let samples = env_usize("BENCH_LATENCY_SAMPLES", 200).max(1);
    for events in [false, true] {
        let (plain, _dir) = sqlite_store().await;
        fill(&*plain, 10, 0).await;
        let (sink, _hub) = if events {
            let (sink, hub) = with_events(plain.clone()).await;
            (sink, Some(hub))
        } else {
            (EventSink::off(), None)
        };
        let latencies = idle_latencies(plain, sink, samples).await;
        println!(
            "submit -> assigned, idle cluster (sqlite{}, 10 workers, {samples} tasks one at a time): p50 {:.2} ms, p99 {:.2} ms",
            if events { "+events" } else { "" },
            percentile(latencies.clone(), 0.5),
            percentile(latencies, 0.99)
        );
    }

    api_latency(samples).await;

    // Peak RSS with a large store: 1,000 workers, 100,000 queued tasks, one placement cycle.
    let rss_tasks = env_usize("BENCH_RSS_TASKS", 100_000);
    let (store, _dir) = sqlite_store().await;
    eprintln!("filling a store with {rss_tasks} tasks and 1,000 workers ...");
    let before = peak_rss_mb();
    fill(&*store, 1000, rss_tasks).await;
    let scheduler = Scheduler::new(
        store.clone(),
        runtime(wasm.as_deref()),
        Wakeup::new(),
        config(),
    );
    scheduler.cycle().await;
    println!(
        "peak RSS of this process after one placement cycle over {rss_tasks} tasks and 1,000 workers (sqlite): {:.0} MB (before filling: {before:.0} MB)",
        peak_rss_mb()
    );
}
