//! The scheduler with WebAssembly policies: a hot swap under load (the active placement policy
//! switched back and forth in the store while two replicas place a stream of tasks: nothing
//! dropped, placed twice or overcommitted, no round failing over), and hostile policies that
//! never stall placement.

use super::*;
use crate::model::PolicyKind;
use crate::policy::sync::PolicySync;
use crate::policy::testing::{guest, wasm_dir};
use crate::policy::{LoadOptions, PolicyLimits};
use crate::store::conformance::sample_policy;

const BURST: usize = 8;

async fn store_version(store: &dyn Store, name: &str, bytes: &[u8]) {
    let meta = crate::model::PolicyVersion {
        config: "{}".into(),
        ..sample_policy(name, "1", PolicyKind::Placement, bytes, crate::model::now())
    };
    store.insert_policy_version(&meta, bytes).await.unwrap();
}

/// The store's compare-and-swap, as `POST /v1/policies/{name}/activate` makes it.
async fn activate(store: &dyn Store, name: &str) {
    let current = store
        .get_active_policy(PolicyKind::Placement)
        .await
        .unwrap()
        .map(|a| (a.name, a.version));
    store
        .activate_policy(PolicyKind::Placement, name, "1", "ops", current)
        .await
        .unwrap();
}

struct Replica {
    policies: Arc<PolicyRuntime>,
    wakeup: Wakeup,
    _sync: crate::policy::sync::PolicySyncHandle,
}

async fn swapping_under_load_places_every_task_exactly_once(store: Arc<dyn Store>, tasks: usize) {
    let Some(dir) = wasm_dir() else { return };
    // Room for every task (about 280 cores asked in all): only the policy decides where.
    for _ in 0..6 {
        add_worker(&*store, Resources::new(64.0, 256.0, 100.0, 0.0)).await;
    }
    store_version(&*store, "best-fit", &guest(&dir, "best-fit")).await;
    store_version(&*store, "spread", &guest(&dir, "spread")).await;
    activate(&*store, "best-fit").await;

    let (stop, stopped) = tokio::sync::watch::channel(false);
    let mut replicas = Vec::new();
    let mut running = Vec::new();
    for _ in 0..2 {
        let policies = policies();
        let sync = PolicySync::new(store.clone(), policies.clone(), Duration::from_millis(20));
        let wakeup = Wakeup::new();
        let scheduler = Scheduler::new(
            store.clone(),
            policies.clone(),
            wakeup.clone(),
            SchedulerConfig {
                batch_size: 16,
                round_interval: Duration::from_millis(50),
                admission_backoff: Duration::ZERO,
                // The simulated workers never heartbeat: keep them candidates however long
                // the run takes on a slow store.
                heartbeat_staleness: Duration::from_secs(3600),
                ..SchedulerConfig::default()
            },
        );
        let mut stopped = stopped.clone();
        running.push(tokio::spawn(scheduler.run(async move {
            let _ = stopped.wait_for(|s| *s).await;
        })));
        replicas.push(Replica {
            policies,
            wakeup,
            _sync: sync.spawn(),
        });
    }
    let follows = |name: &str| {
        replicas.iter().all(|r| {
            r.policies.active(crate::policy::PolicyKind::Placement)
                == Some((name.into(), "1".into()))
        })
    };
    // Both versions compiled on both replicas before the swaps start (a version the store
    // activates before it is compiled here is followed once it is: not what is tested here).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !(follows("best-fit")
        && replicas
            .iter()
            .all(|r| r.policies.loaded_kind("spread", "1").is_some()))
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "replicas never loaded best-fit"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    // Submit in bursts while another task swaps the active version every 30 ms.
    let submitting = {
        let store = store.clone();
        let wakeups: Vec<Wakeup> = replicas.iter().map(|r| r.wakeup.clone()).collect();
        tokio::spawn(async move {
            let mut ids = Vec::new();
            for burst in 0..tasks / BURST {
                for i in 0..BURST {
                    let cpu = [0.5, 1.0, 2.0][(burst + i) % 3];
                    ids.push(
                        queued(&*store, &format!("user-{i}"), cpu, 0, 0)
                            .await
                            .task_id,
                    );
                }
                wakeups.iter().for_each(Wakeup::wake);
                tokio::time::sleep(Duration::from_millis(15)).await;
            }
            ids
        })
    };
    // Swaps go on until every task is placed, so that rounds run under both versions even
    // when the store is slower than the submissions.
    let (swapping_done, mut swapping_stop) = tokio::sync::watch::channel(false);
    let swapping = {
        let store = store.clone();
        tokio::spawn(async move {
            let mut swaps = 0;
            let mut current = "best-fit";
            while !*swapping_stop.borrow() {
                let _ =
                    tokio::time::timeout(Duration::from_millis(30), swapping_stop.wait_for(|s| *s))
                        .await;
                current = if current == "best-fit" {
                    "spread"
                } else {
                    "best-fit"
                };
                activate(&*store, current).await;
                swaps += 1;
            }
            swaps
        })
    };
    let mut ids = submitting.await.unwrap();
    let decided = |name: &str| {
        replicas.iter().any(|r| {
            r.policies
                .versions()
                .iter()
                .any(|info| info.name == name && info.evaluations > 0)
        })
    };

    // Every task ends up running, exactly once; while one version has not decided a round yet
    // (the placements outran the swaps), another burst is submitted under the swaps.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let page = store
            .list_tasks(&crate::store::TaskQuery {
                status: Some(TaskStatus::Running),
                limit: 1000,
                ..crate::store::TaskQuery::default()
            })
            .await
            .unwrap();
        let placed = page.tasks.len();
        assert!(
            tokio::time::Instant::now() < deadline,
            "{placed} of {} placed; best-fit decided a round: {}, spread: {}",
            ids.len(),
            decided("best-fit"),
            decided("spread")
        );
        if placed == ids.len() {
            if decided("best-fit") && decided("spread") {
                break;
            }
            for i in 0..BURST {
                ids.push(
                    queued(&*store, &format!("user-{i}"), 1.0, 0, 0)
                        .await
                        .task_id,
                );
            }
        }
        replicas.iter().for_each(|r| r.wakeup.wake());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let tasks = ids.len();
    swapping_done.send(true).unwrap();
    let swaps = swapping.await.unwrap();
    assert!(swaps >= 4, "only {swaps} swaps during the run");
    stop.send(true).unwrap();
    for handle in running {
        tokio::time::timeout(Duration::from_secs(10), handle)
            .await
            .expect("the scheduler stops")
            .unwrap();
    }

    let mut per_task: HashMap<String, usize> = HashMap::new();
    for a in store
        .list_assignments(&AssignmentFilter::default())
        .await
        .unwrap()
    {
        assert!(!a.released, "nothing finished, nothing released: {a:?}");
        *per_task.entry(a.task_id).or_default() += 1;
    }
    assert_eq!(per_task.len(), tasks, "one assignment per task, no strays");
    for id in &ids {
        assert_eq!(per_task.get(id), Some(&1), "task {id} placed exactly once");
        assert_eq!(store.get_task(id).await.unwrap().attempts, 1, "task {id}");
    }
    assert_accounting(&*store).await;

    // Both versions decided rounds, and no round fell back because of a swap.
    let mut evaluations: HashMap<String, u64> = HashMap::new();
    for replica in &replicas {
        for info in replica.policies.versions() {
            assert_eq!(info.total_failures, 0, "{} failed during a swap", info.name);
            *evaluations.entry(info.name).or_default() += info.evaluations;
        }
    }
    eprintln!("{swaps} swaps; rounds decided per version: {evaluations:?}");
    for name in ["best-fit", "spread"] {
        assert!(
            evaluations.get(name).copied().unwrap_or(0) > 0,
            "{name} never decided a round: {evaluations:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sqlite_swapping_the_placement_policy_under_load_places_every_task_exactly_once() {
    let (store, _guard) = sqlite();
    swapping_under_load_places_every_task_exactly_once(store, 240).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn mongo_swapping_the_placement_policy_under_load_places_every_task_exactly_once() {
    let Some((store, _guard)) = mongo().await else {
        return;
    };
    // FerretDB takes ~50 ms per placement here: fewer tasks, the same swaps.
    swapping_under_load_places_every_task_exactly_once(store, 96).await;
}

/// A guest that loops forever, one that allocates without bound and one that answers an
/// out-of-range worker index: each round is cut off, decided by the native best-fit instead,
/// and every task is still placed.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_hostile_placement_policy_never_stalls_placement() {
    let Some(dir) = wasm_dir() else { return };
    for fixture in [
        "fixture-infinite-loop",
        "fixture-unbounded-alloc",
        "fixture-bad-index",
    ] {
        let (store, _guard) = sqlite();
        add_worker(&*store, Resources::new(8.0, 16.0, 100.0, 0.0)).await;
        let policies = policies();
        let options = LoadOptions {
            limits: Some(PolicyLimits {
                deadline: Duration::from_millis(50),
                memory_bytes: 16 << 20,
            }),
            smoke_check: false,
        };
        policies
            .load_with(fixture, "1", &guest(&dir, fixture), "{}", options)
            .unwrap();
        policies.activate(fixture, "1").unwrap();
        let mut tasks = Vec::new();
        for _ in 0..4 {
            tasks.push(queued(&*store, "alice", 1.0, 0, 0).await);
        }
        let scheduler = Scheduler::new(store.clone(), policies.clone(), Wakeup::new(), config(2));
        tokio::time::timeout(Duration::from_secs(30), scheduler.cycle())
            .await
            .unwrap_or_else(|_| panic!("{fixture}: the cycle stalled"));
        for task in &tasks {
            assert_eq!(
                store.get_task(&task.task_id).await.unwrap().status,
                TaskStatus::Running,
                "{fixture}: placed by the fallback"
            );
        }
        assert_accounting(&*store).await;
        let info = policies
            .versions()
            .into_iter()
            .find(|v| v.name == fixture)
            .unwrap();
        // Batches of 2: two rounds, each failed over to the native best-fit.
        assert_eq!((info.total_failures, info.evaluations), (2, 0), "{fixture}");
    }
}

/// The risk-aware policy through the scheduler: the host feeds it the runtimes recorded in
/// RESULTS. Worker `slow` is the tighter fit (best-fit's choice) but ran "train" tasks 4x
/// slower than `fast`: a "train" task goes to `fast`; an "etl" task, with no history, is
/// placed by best-fit onto `slow`.
async fn risk_aware_placement_uses_the_runtimes_in_results(store: Arc<dyn Store>) {
    let Some(dir) = wasm_dir() else { return };
    let slow = add_worker(&*store, Resources::new(4.0, 8.0, 100.0, 0.0)).await;
    let fast = add_worker(&*store, Resources::new(16.0, 64.0, 100.0, 0.0)).await;
    for (worker, runtime_s) in [(&slow, 40.0), (&fast, 10.0)] {
        for _ in 0..5 {
            let mut result = crate::store::conformance::sample_result(
                &crate::store::conformance::unique_id("done"),
                &worker.worker_id,
            );
            result.task_type = Some("train".into());
            result.runtime_s = Some(runtime_s);
            store.insert_result(&result).await.unwrap();
        }
    }
    let policies = policies();
    policies
        .load_with(
            "rts",
            "1",
            &guest(&dir, "rts"),
            "{}",
            LoadOptions::default(),
        )
        .unwrap();
    policies.activate("rts", "1").unwrap();
    let mut typed = Vec::new();
    for kind in ["train", "etl"] {
        let mut task = crate::store::conformance::sample_task(
            &crate::store::conformance::unique_id("task"),
            "alice",
        );
        task.status = TaskStatus::Queued;
        (task.req_cpu, task.req_memory, task.req_storage) = (1.0, 1.0, 0.0);
        task.labels
            .insert(crate::model::TASK_TYPE_LABEL.into(), kind.into());
        typed.push(store.insert_task(&task, None).await.unwrap().task);
    }
    let (train, etl) = (&typed[0], &typed[1]);
    let scheduler = Scheduler::new(store.clone(), policies.clone(), Wakeup::new(), config(10));
    scheduler.cycle().await;
    let on = |task: &Task| {
        let store = store.clone();
        let task_id = task.task_id.clone();
        async move {
            active_assignments(
                &*store,
                AssignmentFilter {
                    task_id: Some(task_id),
                    ..AssignmentFilter::default()
                },
            )
            .await[0]
                .worker_id
                .clone()
        }
    };
    assert_eq!(on(train).await, fast.worker_id, "train: the fast worker");
    assert_eq!(on(etl).await, slow.worker_id, "etl: best-fit, no history");
    assert_accounting(&*store).await;
}

#[tokio::test]
async fn sqlite_risk_aware_placement_uses_the_runtimes_in_results() {
    let (store, _guard) = sqlite();
    risk_aware_placement_uses_the_runtimes_in_results(store).await;
}

#[tokio::test]
async fn mongo_risk_aware_placement_uses_the_runtimes_in_results() {
    let Some((store, _guard)) = mongo().await else {
        return;
    };
    risk_aware_placement_uses_the_runtimes_in_results(store).await;
}
