//! Several `cloudai serve` replicas on one MongoDB-protocol database, driven by simulated
//! workers (tokio tasks speaking the worker API; no containers): every task completes exactly
//! once and no worker is ever overcommitted (docs/consistency.md), also while replicas are SIGKILLed.
//!
//! Sizes (CI runs the small defaults): `CLOUDAI_E2E_REPLICA_TASKS` (default 200) tasks on
//! `CLOUDAI_E2E_REPLICA_WORKERS` (default 30) workers; the full run is
//! `CLOUDAI_E2E_REPLICA_TASKS=10000 CLOUDAI_E2E_REPLICA_WORKERS=50`. The SIGKILL test runs
//! `CLOUDAI_E2E_KILL_TRIALS` (default 1) trials of `CLOUDAI_E2E_KILL_TASKS` (default 120).
//!
//! On FerretDB 1.x these runs depend on the store's per-document write locks (its updates
//! are not atomic), and on FerretDB's PostgreSQL backend for speed (scripts/services.sh).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use cloudai::model::TaskStatus;
use cloudai::store::mongo::MongoStore;
use cloudai::store::{AssignmentFilter, AssignmentStore, TaskStore, WorkerStore};
use reqwest::Method;
use serde_json::{Value, json};
use tokio::sync::Mutex;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::harness::{
    ALICE_TOKEN, BOB_TOKEN, Background, StoreKind, TestHost, eventually, mongo_uri, stop_all,
    unique_database, within,
};

const EPS: f64 = 1e-6;

/// One request to one replica gives up after this.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long one logical request keeps trying replicas: a killed replica refuses at once and
/// the others answer within milliseconds, so a request no replica answered within this is a
/// failure, reported with what the last attempt saw.
const CALL_BUDGET: Duration = Duration::from_secs(30);
/// How long the simulated workers (and the sampler) get to end once told to stop: a long
/// poll (2 s) and the reports in flight.
const STOP_WITHIN: Duration = Duration::from_secs(30);

fn env_count(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A small xorshift: the tests crate has no `rand`, and the delays need no quality.
fn random(seed: &AtomicU64) -> u64 {
    let mut x = seed.fetch_add(0x9E37_79B9_7F4A_7C15, Ordering::Relaxed) | 1;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    x
}

static SEED: AtomicU64 = AtomicU64::new(0x2545_F491_4F6C_DD1D);

/// The replicas' URLs and join tokens, swapped as replicas are killed and replaced.
#[derive(Clone, Default)]
struct Urls(Arc<std::sync::Mutex<Vec<(String, String)>>>);

impl Urls {
    fn pick(&self, n: usize) -> (String, String) {
        let urls = self.0.lock().unwrap();
        urls[n % urls.len()].clone()
    }
    fn set(&self, hosts: &[TestHost]) {
        *self.0.lock().unwrap() = hosts
            .iter()
            .map(|h| (h.url.clone(), h.join_token.clone()))
            .collect();
    }
}

/// An HTTP client whose requests give up after [`ATTEMPT_TIMEOUT`].
fn attempt_client() -> reqwest::Client {
    reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(5))
        .timeout(ATTEMPT_TIMEOUT)
        .build()
        .unwrap()
}

/// One request to one replica; `Err` says why it got no answer (killed: try another one).
async fn send(
    client: &reqwest::Client,
    method: Method,
    url: &str,
    token: &str,
    body: Option<Value>,
    key: Option<&str>,
) -> Result<(u16, Value), String> {
    let mut request = client.request(method, url).bearer_auth(token);
    if let Some(body) = body {
        request = request.json(&body);
    }
    if let Some(key) = key {
        request = request.header("Idempotency-Key", key);
    }
    let response = request.send().await.map_err(|e| e.to_string())?;
    let status = response.status().as_u16();
    let text = response.text().await.map_err(|e| e.to_string())?;
    let value = serde_json::from_str(&text).unwrap_or(Value::String(text));
    Ok((status, value))
}

/// Calls replicas in turn until one answers below 500 (a killed one does not, and is
/// replaced), for at most [`CALL_BUDGET`]; `Err` names the request, the attempts and what the
/// last one saw.
async fn call(
    client: &reqwest::Client,
    urls: &Urls,
    method: Method,
    path: &str,
    token: &str,
    body: Option<Value>,
    key: Option<&str>,
) -> Result<(u16, Value), String> {
    let start = random(&SEED) as usize;
    let began = Instant::now();
    let mut last = String::new();
    let mut attempts = 0;
    while began.elapsed() < CALL_BUDGET {
        let (url, _) = urls.pick(start + attempts);
        attempts += 1;
        let url = format!("{url}{path}");
        match send(client, method.clone(), &url, token, body.clone(), key).await {
            Ok(answer) if answer.0 < 500 => return Ok(answer),
            Ok((status, answer)) => last = format!("{url}: {status} {answer}"),
            Err(e) => last = format!("{url}: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Err(format!(
        "no replica answered {method} {path} within {CALL_BUDGET:?} ({attempts} attempts); \
         the last: {last}"
    ))
}

/// What the simulated workers saw: accepted `completed` reports per task.
#[derive(Default)]
struct Ledger {
    accepted: Mutex<HashMap<String, u32>>,
    done: AtomicUsize,
}

/// The first problem a background part of a run met (an invariant sample that failed, a
/// simulated worker that got an answer it cannot go on from): recorded where it happens, and
/// [`finish`] fails with it at once (a panic in a spawned task would only be seen when it is
/// joined, after the whole run).
#[derive(Clone, Default)]
struct Violation(Arc<std::sync::Mutex<Option<String>>>);

impl Violation {
    fn record(&self, problem: String) {
        self.0.lock().unwrap().get_or_insert(problem);
    }

    fn check(&self) {
        if let Some(violation) = self.0.lock().unwrap().as_ref() {
            panic!("during the run: {violation}");
        }
    }
}

/// Registers a simulated worker through any replica (each with its own join token), within
/// a minute; the id it got and its token. An attempt whose answer was lost (a replica killed
/// mid-request, a timeout) may still have registered the worker, and the token it was given
/// is then lost with the answer: when a later attempt is told the id is taken
/// (`worker_exists`), the worker registers again as `ID.N` (the lost registration stays a
/// worker that never heartbeats, which the reconciler marks lost like any dead machine).
async fn register(
    client: &reqwest::Client,
    urls: &Urls,
    n: usize,
    body: &Value,
) -> Result<(String, String), String> {
    let began = Instant::now();
    let mut body = body.clone();
    let id = body["worker_id"].as_str().unwrap_or_default().to_string();
    let mut last = String::new();
    let mut attempt = 0;
    let mut unanswered = false;
    while began.elapsed() < Duration::from_secs(60) {
        let (url, join) = urls.pick(n + attempt);
        attempt += 1;
        let url = format!("{url}/v1/workers");
        match send(client, Method::POST, &url, &join, Some(body.clone()), None).await {
            Ok((201, answer)) => {
                let token = answer["token"]
                    .as_str()
                    .ok_or_else(|| format!("no token in the registration's answer {answer}"))?;
                let registered = body["worker_id"].as_str().unwrap_or_default();
                return Ok((registered.to_string(), token.to_string()));
            }
            Ok((409, answer)) if unanswered && answer["error"]["code"] == "worker_exists" => {
                last = format!("{url}: 409 {answer} (an unanswered attempt registered it)");
                body["worker_id"] = json!(format!("{id}.{attempt}"));
                unanswered = false;
                continue;
            }
            Ok((status, answer)) if status < 500 => {
                return Err(format!("registration refused: {status} {answer}"));
            }
            Ok((status, answer)) => last = format!("{url}: {status} {answer}"),
            Err(e) => last = format!("{url}: {e}"),
        }
        unanswered = true;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Err(format!(
        "not registered within 60 s ({attempt} attempts); the last: {last}"
    ))
}

/// Plays one assignment: reports it started, then completed after a short random delay
/// (unless the worker fell silent meanwhile). A refused `started` means it was superseded.
async fn run_assignment(
    client: reqwest::Client,
    urls: Urls,
    base: String,
    token: String,
    task: String,
    ledger: Arc<Ledger>,
    silent: Arc<AtomicBool>,
) -> Result<(), String> {
    let (status, _) = call(
        &client,
        &urls,
        Method::POST,
        &format!("{base}/started"),
        &token,
        Some(json!({})),
        None,
    )
    .await?;
    if status != 200 {
        return Ok(()); // superseded: the task went elsewhere
    }
    tokio::time::sleep(Duration::from_millis(20 + random(&SEED) % 200)).await;
    if silent.load(Ordering::Relaxed) {
        return Ok(());
    }
    let report = json!({"outcome": "completed", "exit_code": 0});
    let (status, answer) = call(
        &client,
        &urls,
        Method::POST,
        &format!("{base}/result"),
        &token,
        Some(report),
        None,
    )
    .await?;
    if status == 200 && answer["status"] == "completed" {
        *ledger.accepted.lock().await.entry(task).or_default() += 1;
        ledger.done.fetch_add(1, Ordering::Relaxed);
    }
    Ok(())
}

/// A simulated worker: registers, heartbeats every ~2 s, long-polls its work and plays each
/// new assignment ([`run_assignment`]). It ends when `stop` is cancelled, or when `silent` is
/// set (as a machine that died: no more heartbeats or reports). `Err`: what it could not go
/// on from.
async fn worker(
    id: String,
    urls: Urls,
    ledger: Arc<Ledger>,
    stop: CancellationToken,
    silent: Arc<AtomicBool>,
) -> Result<(), String> {
    let client = attempt_client();
    let n = random(&SEED) as usize;
    let cpu = [2.0, 4.0, 8.0][n % 3];
    let body = json!({
        "worker_id": id, "worker_ip": "127.0.0.1:50052",
        "total_cpu": cpu, "total_memory": cpu * 2.0, "total_storage": 100.0, "total_gpu": 0.0
    });
    let (id, token) = tokio::select! {
        _ = stop.cancelled() => return Ok(()),
        registered = register(&client, &urls, n, &body) => registered?,
    };
    let alive = || !stop.is_cancelled() && !silent.load(Ordering::Relaxed);
    let heartbeats = async {
        let path = format!("/v1/workers/{id}/heartbeat");
        while alive() {
            tokio::select! {
                _ = stop.cancelled() => break,
                answer = call(&client, &urls, Method::POST, &path, &token, Some(json!({})), None) => {
                    answer?;
                }
            }
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = tokio::time::sleep(Duration::from_millis(1800 + random(&SEED) % 400)) => {}
            }
        }
        Ok::<(), String>(())
    };
    let work = async {
        let mut reports = JoinSet::new();
        let mut known = String::new();
        let mut seen = HashSet::new();
        while alive() {
            let path = if known.is_empty() {
                format!("/v1/workers/{id}/work?wait_ms=2000")
            } else {
                format!("/v1/workers/{id}/work?wait_ms=2000&known={known}")
            };
            let (status, list) = tokio::select! {
                _ = stop.cancelled() => break,
                answer = call(&client, &urls, Method::GET, &path, &token, None, None) => answer?,
            };
            if status != 200 {
                return Err(format!("GET {path}: {status} {list}"));
            }
            known = list["version"]
                .as_str()
                .ok_or_else(|| format!("no version in the work list {list}"))?
                .to_string();
            for work in list["work"].as_array().into_iter().flatten() {
                let field = |name: &str| {
                    work[name]
                        .as_str()
                        .map(str::to_string)
                        .ok_or_else(|| format!("no {name} in the work {work}"))
                };
                let ass = field("ass_id")?;
                if work["cancel"] == true || !seen.insert(ass.clone()) {
                    continue;
                }
                reports.spawn(run_assignment(
                    client.clone(),
                    urls.clone(),
                    format!("/v1/workers/{id}/assignments/{ass}"),
                    token.clone(),
                    field("task_id")?,
                    ledger.clone(),
                    silent.clone(),
                ));
            }
            // Reports that ended: one that failed stops this worker.
            while let Some(ended) = reports.try_join_next() {
                ended.map_err(|e| format!("an assignment's reports: {e}"))??;
            }
        }
        // Reports still in flight (once every task completed, only superseded assignments'
        // `started`, answered at once) end within seconds.
        within(
            &format!("the reports in flight of {id} once it stopped"),
            Duration::from_secs(20),
            async {
                while let Some(ended) = reports.join_next().await {
                    ended.map_err(|e| format!("an assignment's reports: {e}"))??;
                }
                Ok::<(), String>(())
            },
        )
        .await
    };
    tokio::try_join!(heartbeats, work)?;
    Ok(())
}

/// The invariant of docs/consistency.md on every worker: allocated == sum of active assignments, available == total −
/// allocated, 0 ≤ allocated ≤ total. The first violation, if any.
async fn invariant_violation(store: &MongoStore) -> Option<String> {
    for w in store.list_workers().await.unwrap() {
        let active = store
            .list_assignments(&AssignmentFilter {
                worker_id: Some(w.worker_id.clone()),
                active_only: true,
                ..Default::default()
            })
            .await
            .unwrap();
        let sum = |f: fn(&cloudai::model::Assignment) -> f64| active.iter().map(f).sum::<f64>();
        for (name, total, allocated, available, used) in [
            (
                "cpu",
                w.total_cpu,
                w.allocated_cpu,
                w.available_cpu,
                sum(|a| a.req_cpu),
            ),
            (
                "memory",
                w.total_memory,
                w.allocated_memory,
                w.available_memory,
                sum(|a| a.req_memory),
            ),
            (
                "storage",
                w.total_storage,
                w.allocated_storage,
                w.available_storage,
                sum(|a| a.req_storage),
            ),
            (
                "gpu",
                w.total_gpu,
                w.allocated_gpu,
                w.available_gpu,
                sum(|a| a.req_gpu),
            ),
        ] {
            let who = format!("{} {name}", w.worker_id);
            if (allocated - used).abs() >= EPS {
                return Some(format!(
                    "{who}: allocated {allocated} != assignments {used}"
                ));
            }
            if (available - (total - allocated)).abs() >= EPS {
                return Some(format!(
                    "{who}: available {available}, total {total}, allocated {allocated}"
                ));
            }
            if allocated <= -EPS || allocated >= total + EPS {
                return Some(format!("{who}: allocated {allocated} of {total}"));
            }
        }
    }
    None
}

/// Samples every worker now and then during a run: never overcommitted, nothing negative,
/// `available == total - allocated` (both change in one update). A violation (or a store that
/// cannot be read) is recorded in `violation`; `samples` counts the samples taken.
fn sample_invariant(
    store: MongoStore,
    violation: Violation,
    samples: Arc<AtomicUsize>,
) -> Background {
    Background::spawn("the invariant sampler", move |stop| async move {
        while !stop.is_cancelled() {
            let workers = tokio::select! {
                _ = stop.cancelled() => return,
                workers = store.list_workers() => workers,
            };
            let workers = match workers {
                Ok(workers) => workers,
                Err(e) => {
                    violation.record(format!("the sampler could not list the workers: {e}"));
                    return;
                }
            };
            for w in workers {
                for (name, total, allocated, available) in [
                    ("cpu", w.total_cpu, w.allocated_cpu, w.available_cpu),
                    (
                        "memory",
                        w.total_memory,
                        w.allocated_memory,
                        w.available_memory,
                    ),
                    (
                        "storage",
                        w.total_storage,
                        w.allocated_storage,
                        w.available_storage,
                    ),
                    ("gpu", w.total_gpu, w.allocated_gpu, w.available_gpu),
                ] {
                    let fine = allocated > -EPS
                        && allocated < total + EPS
                        && (available - (total - allocated)).abs() < EPS;
                    if !fine {
                        violation.record(format!(
                            "invariant violated: {} {name}: allocated {allocated}, available {available}, total {total} (sample {})",
                            w.worker_id,
                            samples.load(Ordering::Relaxed)
                        ));
                        return;
                    }
                }
            }
            samples.fetch_add(1, Ordering::Relaxed);
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_millis(50 + random(&SEED) % 300)) => {}
            }
        }
    })
}

/// How long submitting `count` tasks may take (32 clients; FerretDB takes tens per second).
fn submit_limit(count: usize) -> Duration {
    Duration::from_secs(120) + Duration::from_millis(50) * count as u32
}

/// Submits `count` tasks of mixed sizes through the replicas, from 32 concurrent clients,
/// as alice and bob with some priorities; returns their ids. Fails when a submission is
/// refused or no replica answers it, or when it all takes longer than [`submit_limit`].
async fn submit_all(urls: &Urls, count: usize, prefix: &str) -> Vec<String> {
    let next = Arc::new(AtomicUsize::new(0));
    let ids = Arc::new(Mutex::new(Vec::with_capacity(count)));
    let mut clients = JoinSet::new();
    for _ in 0..32 {
        let (next, ids, urls, prefix) =
            (next.clone(), ids.clone(), urls.clone(), prefix.to_string());
        clients.spawn(async move {
            let client = attempt_client();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= count {
                    return Ok(());
                }
                let token = if i % 3 == 0 { BOB_TOKEN } else { ALICE_TOKEN };
                let cpu = [0.25, 0.5, 1.0, 2.0][i % 4];
                let memory = [0.25, 0.5, 1.0, 3.0][(i % 4) ^ ((i / 4) % 2)];
                let priority = [0, 0, 5, -5, 100][i % 5];
                let spec = json!({
                    "docker_image": "busybox:1.36", "command": "true",
                    "req_cpu": cpu, "req_memory": memory, "priority": priority,
                });
                // The key makes a retry on another replica return the same task.
                let key = format!("{prefix}-{i}");
                let (status, task) = call(
                    &client,
                    &urls,
                    Method::POST,
                    "/v1/tasks",
                    token,
                    Some(spec),
                    Some(&key),
                )
                .await
                .map_err(|e| format!("submit {i}: {e}"))?;
                if status != 201 && status != 200 {
                    return Err(format!("submit {i}: {status} {task}"));
                }
                let id = task["task_id"]
                    .as_str()
                    .ok_or_else(|| format!("submit {i}: no task_id in {task}"))?;
                ids.lock().await.push(id.to_string());
            }
        });
    }
    let limit = submit_limit(count);
    within(&format!("submitting {count} tasks"), limit, async {
        while let Some(client) = clients.join_next().await {
            if let Err(e) = client.unwrap() {
                panic!("{e}");
            }
        }
    })
    .await;
    std::mem::take(&mut *ids.lock().await)
}

/// Waits until every task got its accepted `completed` report (failing at once on a problem
/// recorded in `violation`, and after `deadline` with the tasks still missing and the
/// replicas' latest log lines), then checks each exactly once, every task `completed` in the
/// store, and the invariant: at once, or, after a replica was killed (a reservation it made
/// just before dying has no assignment), once the reconciler has had `restore` to repair it.
async fn finish(
    store: &MongoStore,
    hosts: &[TestHost],
    ledger: &Ledger,
    ids: &[String],
    deadline: Duration,
    violation: &Violation,
    restore: Duration,
) {
    let started = Instant::now();
    while ledger.done.load(Ordering::Relaxed) < ids.len() {
        violation.check();
        if started.elapsed() >= deadline {
            let accepted = ledger.accepted.lock().await;
            let mut missing = Vec::new();
            for id in ids.iter().filter(|id| !accepted.contains_key(*id)).take(10) {
                let status = within(
                    &format!("reading task {id}"),
                    Duration::from_secs(10),
                    store.get_task(id),
                )
                .await
                .map_or_else(
                    |e| format!("unreadable: {e}"),
                    |t| format!("{:?}", t.status),
                );
                missing.push(format!("{id}: {status}"));
            }
            let logs: Vec<String> = hosts
                .iter()
                .map(|h| {
                    format!(
                        "--- replica {} (last 40 lines) ---\n{}",
                        h.url,
                        h.log_tail(40)
                    )
                })
                .collect();
            panic!(
                "only {} of {} tasks completed within {deadline:?}; some without a completed report \
                 (and their state in the store): {missing:#?}\n{}",
                ledger.done.load(Ordering::Relaxed),
                ids.len(),
                logs.join("\n")
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let accepted = ledger.accepted.lock().await;
    let unique: HashSet<&String> = ids.iter().collect();
    assert_eq!(unique.len(), ids.len(), "a submission made two tasks");
    // One read per task: 200 reads take a second or two, 10,000 a few minutes.
    let reading = Duration::from_secs(60) + Duration::from_millis(50) * ids.len() as u32;
    within("reading every task back from the store", reading, async {
        for id in ids {
            assert_eq!(
                accepted.get(id),
                Some(&1),
                "task {id}: accepted completed reports"
            );
            let task = store.get_task(id).await.unwrap();
            assert_eq!(task.status, TaskStatus::Completed, "task {id}");
        }
    })
    .await;
    assert_eq!(
        accepted.len(),
        ids.len(),
        "reports for tasks nobody submitted"
    );
    eventually(
        format!("the invariant on every worker (the reconciler has {restore:?} to restore it)"),
        restore,
    )
    .every(Duration::from_millis(250))
    .until(async || match invariant_violation(store).await {
        None => Ok(()),
        Some(broken) => Err(broken),
    })
    .await;
}

/// Starts `count` simulated workers `sim-0`...; a worker that cannot go on records why in
/// `violation`. Returns them, and the flag that makes each fall silent.
fn start_workers(
    count: usize,
    urls: &Urls,
    ledger: &Arc<Ledger>,
    violation: &Violation,
) -> (Vec<Background>, Vec<Arc<AtomicBool>>) {
    let mut workers = Vec::new();
    let mut silences = Vec::new();
    for w in 0..count {
        let silent = Arc::new(AtomicBool::new(false));
        silences.push(silent.clone());
        let id = format!("sim-{w}");
        let (urls, ledger, violation) = (urls.clone(), ledger.clone(), violation.clone());
        workers.push(Background::spawn(
            format!("simulated worker {id}"),
            move |stop| async move {
                if let Err(e) = worker(id.clone(), urls, ledger, stop, silent).await {
                    violation.record(format!("simulated worker {id}: {e}"));
                }
            },
        ));
    }
    (workers, silences)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_replicas_complete_every_task_exactly_once_without_overcommitting_a_worker() {
    let Some(uri) = mongo_uri() else { return };
    let tasks = env_count("CLOUDAI_E2E_REPLICA_TASKS", 200);
    let workers = env_count("CLOUDAI_E2E_REPLICA_WORKERS", 30);
    let database = unique_database("cloudai_e2e_replicas");
    let hosts: Vec<TestHost> = (0..3)
        .map(|_| {
            TestHost::start(StoreKind::MongoDatabase {
                uri: uri.clone(),
                database: database.clone(),
            })
            .unwrap()
        })
        .collect();
    let urls = Urls::default();
    urls.set(&hosts);
    let store = within(
        "a connection to the test database",
        Duration::from_secs(30),
        MongoStore::connect(&uri, &database),
    )
    .await
    .unwrap();
    let ledger = Arc::new(Ledger::default());
    let violation = Violation::default();
    let samples = Arc::new(AtomicUsize::new(0));
    let sampler = sample_invariant(store.clone(), violation.clone(), samples.clone());
    let (simulated, _) = start_workers(workers, &urls, &ledger, &violation);

    let began = Instant::now();
    let ids = submit_all(&urls, tasks, "replicas").await;
    // FerretDB, the test server, completes a few tasks per second through three replicas.
    let deadline = Duration::from_secs((tasks as u64 / 2).max(600));
    finish(
        &store,
        &hosts,
        &ledger,
        &ids,
        deadline,
        &violation,
        Duration::ZERO,
    )
    .await;
    eprintln!(
        "{tasks} tasks on {workers} workers through 3 replicas: {:?}",
        began.elapsed()
    );
    stop_all(simulated.into_iter().chain([sampler]), STOP_WITHIN).await;
    violation.check();
    assert!(
        samples.load(Ordering::Relaxed) > 0,
        "the invariant was never sampled"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_sigkilled_replica_loses_no_task_and_the_reconciler_lease_moves_on() {
    let Some(uri) = mongo_uri() else { return };
    let tasks = env_count("CLOUDAI_E2E_KILL_TASKS", 120);
    let trials = env_count("CLOUDAI_E2E_KILL_TRIALS", 1).clamp(1, 20);
    let flags = [
        "--no-local-worker",
        "--claim-lease-s=2",
        "--heartbeat-staleness-s=4",
        "--lease-ttl-s=2",
        "--reconcile-settle-s=1",
    ];
    for trial in 0..trials {
        let database = unique_database(&format!("cloudai_e2e_kill{trial}"));
        let store_kind = || StoreKind::MongoDatabase {
            uri: uri.clone(),
            database: database.clone(),
        };
        let mut hosts: Vec<TestHost> = (0..3)
            .map(|_| TestHost::start_with(store_kind(), &flags).unwrap())
            .collect();
        let urls = Urls::default();
        urls.set(&hosts);
        let store = within(
            "a connection to the test database",
            Duration::from_secs(30),
            MongoStore::connect(&uri, &database),
        )
        .await
        .unwrap();
        let ledger = Arc::new(Ledger::default());
        let violation = Violation::default();
        let samples = Arc::new(AtomicUsize::new(0));
        let sampler = sample_invariant(store.clone(), violation.clone(), samples.clone());
        let (simulated, silences) = start_workers(20, &urls, &ledger, &violation);

        let submit = {
            let urls = urls.clone();
            let prefix = format!("kill{trial}");
            tokio::spawn(async move { submit_all(&urls, tasks, &prefix).await })
        };
        // Kill one replica at a random moment of the run, as SIGKILL (`Child::kill`) would,
        // and one worker dies with it: its tasks must come back through whichever replica
        // holds the reconciler lease now.
        tokio::time::sleep(Duration::from_millis(200 + random(&SEED) % 2000)).await;
        let victim = (random(&SEED) % 3) as usize;
        drop(hosts.remove(victim));
        silences[trial].store(true, Ordering::Relaxed);
        urls.set(&hosts);
        // submit_all bounds itself; this bound only covers its task.
        let ids = within(
            "the submissions",
            submit_limit(tasks) + Duration::from_secs(5),
            submit,
        )
        .await
        .unwrap();
        // The hosts run with --claim-lease-s=2 --reconcile-settle-s=1: a drift is repaired
        // once it has lasted 3 s.
        let restore = Duration::from_secs(30);
        finish(
            &store,
            &hosts,
            &ledger,
            &ids,
            Duration::from_secs(300),
            &violation,
            restore,
        )
        .await;
        // The silent worker is marked lost (its heartbeat stopped 4 s ago at most by now,
        // unless every task finished sooner: then give the reconciler the time it needs).
        // (`sim-N`, and `sim-N.M` if a registration of it lost its answer: see `register`.)
        let dead = format!("sim-{trial}");
        eventually(
            format!("the silent worker {dead} to be marked lost"),
            Duration::from_secs(20),
        )
        .every(Duration::from_millis(200))
        .until(async || {
            let workers = store.list_workers().await.map_err(|e| e.to_string())?;
            let registrations: Vec<_> = workers
                .iter()
                .filter(|w| w.worker_id == dead || w.worker_id.starts_with(&format!("{dead}.")))
                .collect();
            if !registrations.is_empty() && registrations.iter().all(|w| !w.is_active) {
                Ok(())
            } else {
                Err(format!("its registrations: {registrations:?}"))
            }
        })
        .await;
        stop_all(simulated.into_iter().chain([sampler]), STOP_WITHIN).await;
        violation.check();
        assert!(
            samples.load(Ordering::Relaxed) > 0,
            "the invariant was never sampled"
        );
        eprintln!("trial {trial}: killed replica {victim}, {tasks} tasks each completed once");
    }
}
