//! Several `cloudai serve` replicas on one MongoDB-protocol database, driven by simulated
//! workers (tokio tasks speaking the worker API; no containers): every task completes exactly
//! once and no worker is ever overcommitted (DESIGN §4), also while replicas are SIGKILLed.
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
use cloudai::store::{AssignmentFilter, Store};
use reqwest::Method;
use serde_json::{Value, json};
use tokio::sync::Mutex;

use crate::harness::{ALICE_TOKEN, BOB_TOKEN, StoreKind, TestHost, mongo_uri, unique_database};

const EPS: f64 = 1e-6;

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

/// One request; `None` when the replica could not be reached (killed): try another one.
async fn send(
    client: &reqwest::Client,
    method: Method,
    url: &str,
    token: &str,
    body: Option<Value>,
    key: Option<&str>,
) -> Option<(u16, Value)> {
    let mut request = client.request(method, url).bearer_auth(token);
    if let Some(body) = body {
        request = request.json(&body);
    }
    if let Some(key) = key {
        request = request.header("Idempotency-Key", key);
    }
    let response = request.send().await.ok()?;
    let status = response.status().as_u16();
    let text = response.text().await.ok()?;
    let value = serde_json::from_str(&text).unwrap_or(Value::Null);
    Some((status, value))
}

/// Calls until a replica answers (a killed one does not, and is replaced).
async fn call(
    client: &reqwest::Client,
    urls: &Urls,
    method: Method,
    path: &str,
    token: &str,
    body: Option<Value>,
    key: Option<&str>,
) -> (u16, Value) {
    let start = random(&SEED) as usize;
    for attempt in 0..600 {
        let (url, _) = urls.pick(start + attempt);
        let url = format!("{url}{path}");
        if let Some(answer) = send(client, method.clone(), &url, token, body.clone(), key).await
            && answer.0 < 500
        {
            return answer;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("no replica answered {path}");
}

/// What the simulated workers saw: accepted `completed` reports per task.
#[derive(Default)]
struct Ledger {
    accepted: Mutex<HashMap<String, u32>>,
    done: AtomicUsize,
}

/// A simulated worker: registers, heartbeats every ~2 s, long-polls its work and reports
/// `started` then `completed` after a short random delay. `silent` makes it stop
/// heartbeating and reporting (as a machine that died) once set.
async fn worker(
    id: String,
    urls: Urls,
    ledger: Arc<Ledger>,
    stop: Arc<AtomicBool>,
    silent: Arc<AtomicBool>,
) {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let n = random(&SEED) as usize;
    let cpu = [2.0, 4.0, 8.0][n % 3];
    let body = json!({
        "worker_id": id, "worker_ip": "127.0.0.1:50052",
        "total_cpu": cpu, "total_memory": cpu * 2.0, "total_storage": 100.0, "total_gpu": 0.0
    });
    let token = loop {
        let (url, join) = urls.pick(n);
        if let Some((201, answer)) = send(
            &client,
            Method::POST,
            &format!("{url}/v1/workers"),
            &join,
            Some(body.clone()),
            None,
        )
        .await
        {
            break answer["token"].as_str().unwrap().to_string();
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let heartbeat = {
        let (client, urls, id, token, stop, silent) = (
            client.clone(),
            urls.clone(),
            id.clone(),
            token.clone(),
            stop.clone(),
            silent.clone(),
        );
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) && !silent.load(Ordering::Relaxed) {
                let path = format!("/v1/workers/{id}/heartbeat");
                call(
                    &client,
                    &urls,
                    Method::POST,
                    &path,
                    &token,
                    Some(json!({})),
                    None,
                )
                .await;
                tokio::time::sleep(Duration::from_millis(1800 + random(&SEED) % 400)).await;
            }
        })
    };
    let mut known = String::new();
    let mut seen = HashSet::new();
    while !stop.load(Ordering::Relaxed) && !silent.load(Ordering::Relaxed) {
        let path = if known.is_empty() {
            format!("/v1/workers/{id}/work?wait_ms=2000")
        } else {
            format!("/v1/workers/{id}/work?wait_ms=2000&known={known}")
        };
        let (status, list) = call(&client, &urls, Method::GET, &path, &token, None, None).await;
        assert_eq!(status, 200, "{list}");
        known = list["version"].as_str().unwrap().to_string();
        for work in list["work"].as_array().unwrap() {
            let ass = work["ass_id"].as_str().unwrap().to_string();
            if work["cancel"] == true || !seen.insert(ass.clone()) {
                continue;
            }
            let task = work["task_id"].as_str().unwrap().to_string();
            let (client, urls, id, token, ledger, silent) = (
                client.clone(),
                urls.clone(),
                id.clone(),
                token.clone(),
                ledger.clone(),
                silent.clone(),
            );
            tokio::spawn(async move {
                let base = format!("/v1/workers/{id}/assignments/{ass}");
                let (status, answer) = call(
                    &client,
                    &urls,
                    Method::POST,
                    &format!("{base}/started"),
                    &token,
                    Some(json!({})),
                    None,
                )
                .await;
                if status != 200 {
                    return; // superseded: the task went elsewhere
                }
                let _ = answer;
                tokio::time::sleep(Duration::from_millis(20 + random(&SEED) % 200)).await;
                if silent.load(Ordering::Relaxed) {
                    return;
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
                .await;
                if status == 200 && answer["status"] == "completed" {
                    *ledger.accepted.lock().await.entry(task).or_default() += 1;
                    ledger.done.fetch_add(1, Ordering::Relaxed);
                }
            });
        }
    }
    heartbeat.abort();
}

/// DESIGN §4 on every worker: allocated == sum of active assignments, available == total −
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

/// The first violation of the invariant the sampler saw, if any: the sampler records it and
/// stops, and [`finish`] fails with it at once (a panic in the sampler's own task would only
/// be seen when it is joined, after the whole run).
#[derive(Clone, Default)]
struct Violation(Arc<std::sync::Mutex<Option<String>>>);

impl Violation {
    fn check(&self) {
        if let Some(violation) = self.0.lock().unwrap().as_ref() {
            panic!("invariant violated during the run: {violation}");
        }
    }
}

/// Samples every worker now and then during a run: never overcommitted, nothing negative,
/// `available == total - allocated` (both change in one update). Returns the sample count.
fn sample_invariant(
    store: MongoStore,
    stop: Arc<AtomicBool>,
    violation: Violation,
) -> tokio::task::JoinHandle<usize> {
    tokio::spawn(async move {
        let mut samples = 0;
        while !stop.load(Ordering::Relaxed) {
            for w in store.list_workers().await.unwrap() {
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
                        *violation.0.lock().unwrap() = Some(format!(
                            "{} {name}: allocated {allocated}, available {available}, total {total} (sample {samples})",
                            w.worker_id
                        ));
                        return samples;
                    }
                }
            }
            samples += 1;
            tokio::time::sleep(Duration::from_millis(50 + random(&SEED) % 300)).await;
        }
        samples
    })
}

/// Submits `count` tasks of mixed sizes through the replicas, from 32 concurrent clients,
/// as alice and bob with some priorities; returns their ids.
async fn submit_all(urls: &Urls, count: usize, prefix: &str) -> Vec<String> {
    let next = Arc::new(AtomicUsize::new(0));
    let ids = Arc::new(Mutex::new(Vec::with_capacity(count)));
    let mut clients = Vec::new();
    for _ in 0..32 {
        let (next, ids, urls, prefix) =
            (next.clone(), ids.clone(), urls.clone(), prefix.to_string());
        clients.push(tokio::spawn(async move {
            let client = reqwest::Client::builder()
                .timeout(Duration::from_secs(30))
                .build()
                .unwrap();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= count {
                    break;
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
                .await;
                assert!(
                    status == 201 || status == 200,
                    "submit {i}: {status} {task}"
                );
                ids.lock()
                    .await
                    .push(task["task_id"].as_str().unwrap().to_string());
            }
        }));
    }
    for c in clients {
        c.await.unwrap();
    }
    std::mem::take(&mut *ids.lock().await)
}

/// Waits until every task got its accepted `completed` report, then checks each exactly once,
/// every task `completed` in the store, and the invariant: at once, or, after a replica was
/// killed (a reservation it made just before dying has no assignment), once the reconciler
/// has had `restore` to repair it.
async fn finish(
    store: &MongoStore,
    ledger: &Ledger,
    ids: &[String],
    deadline: Duration,
    violation: &Violation,
    restore: Duration,
) {
    let started = Instant::now();
    while ledger.done.load(Ordering::Relaxed) < ids.len() {
        violation.check();
        assert!(
            started.elapsed() < deadline,
            "only {} of {} tasks completed within {deadline:?}",
            ledger.done.load(Ordering::Relaxed),
            ids.len()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let accepted = ledger.accepted.lock().await;
    let unique: HashSet<&String> = ids.iter().collect();
    assert_eq!(unique.len(), ids.len(), "a submission made two tasks");
    for id in ids {
        assert_eq!(
            accepted.get(id),
            Some(&1),
            "task {id}: accepted completed reports"
        );
        let task = store.get_task(id).await.unwrap();
        assert_eq!(task.status, TaskStatus::Completed, "task {id}");
    }
    assert_eq!(
        accepted.len(),
        ids.len(),
        "reports for tasks nobody submitted"
    );
    let checking = Instant::now();
    loop {
        match invariant_violation(store).await {
            None => break,
            Some(broken) if checking.elapsed() >= restore => {
                panic!("invariant violated at the end (after {restore:?}): {broken}")
            }
            Some(_) => tokio::time::sleep(Duration::from_millis(250)).await,
        }
    }
}

fn start_workers(
    count: usize,
    urls: &Urls,
    ledger: &Arc<Ledger>,
    stop: &Arc<AtomicBool>,
) -> (Vec<tokio::task::JoinHandle<()>>, Vec<Arc<AtomicBool>>) {
    let mut handles = Vec::new();
    let mut silences = Vec::new();
    for w in 0..count {
        let silent = Arc::new(AtomicBool::new(false));
        silences.push(silent.clone());
        handles.push(tokio::spawn(worker(
            format!("sim-{w}"),
            urls.clone(),
            ledger.clone(),
            stop.clone(),
            silent,
        )));
    }
    (handles, silences)
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
    let store = MongoStore::connect(&uri, &database).await.unwrap();
    let ledger = Arc::new(Ledger::default());
    let stop = Arc::new(AtomicBool::new(false));
    let violation = Violation::default();
    let sampler = sample_invariant(store.clone(), stop.clone(), violation.clone());
    let (handles, _) = start_workers(workers, &urls, &ledger, &stop);

    let began = Instant::now();
    let ids = submit_all(&urls, tasks, "replicas").await;
    // FerretDB, the test server, completes a few tasks per second through three replicas.
    let deadline = Duration::from_secs((tasks as u64 / 2).max(600));
    finish(&store, &ledger, &ids, deadline, &violation, Duration::ZERO).await;
    eprintln!(
        "{tasks} tasks on {workers} workers through 3 replicas: {:?}",
        began.elapsed()
    );
    stop.store(true, Ordering::Relaxed);
    let samples = sampler.await.unwrap();
    violation.check();
    assert!(samples > 0, "the invariant was never sampled");
    for h in handles {
        let _ = h.await;
    }
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
        let store = MongoStore::connect(&uri, &database).await.unwrap();
        let ledger = Arc::new(Ledger::default());
        let stop = Arc::new(AtomicBool::new(false));
        let violation = Violation::default();
        let sampler = sample_invariant(store.clone(), stop.clone(), violation.clone());
        let (handles, silences) = start_workers(20, &urls, &ledger, &stop);

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
        let ids = submit.await.unwrap();
        // The hosts run with --claim-lease-s=2 --reconcile-settle-s=1: a drift is repaired
        // once it has lasted 3 s.
        let restore = Duration::from_secs(30);
        finish(
            &store,
            &ledger,
            &ids,
            Duration::from_secs(300),
            &violation,
            restore,
        )
        .await;
        // The silent worker is marked lost (its heartbeat stopped 4 s ago at most by now,
        // unless every task finished sooner: then give the reconciler the time it needs).
        let dead = format!("sim-{trial}");
        let waiting = Instant::now();
        while store.get_worker(&dead).await.unwrap().is_active {
            assert!(
                waiting.elapsed() < Duration::from_secs(20),
                "the silent worker {dead} is still active"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        stop.store(true, Ordering::Relaxed);
        assert!(sampler.await.unwrap() > 0);
        violation.check();
        for h in handles {
            let _ = h.await;
        }
        eprintln!("trial {trial}: killed replica {victim}, {tasks} tasks each completed once");
    }
}
