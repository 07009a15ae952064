//! Store throughput: submit (insert_task), reserve+assign (reserve + insert_assignment) and
//! release, on the embedded SQLite store and on MongoDB (when `CLOUDAI_BENCH_MONGODB_URI` or
//! `CLOUDAI_TEST_MONGODB_URI` is set), with several concurrent clients. Prints every run and
//! the median of the runs.
//!
//! Run with: `cargo bench -p cloudai --bench store`
//! Options (env): BENCH_RUNS (default 5), BENCH_OPS (operations per run; default 4000 SQLite,
//! 2000 MongoDB), BENCH_CONCURRENCY (default 8).

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "common/figures.rs"]
#[allow(dead_code)] // each bench uses some of it
mod figures;
use figures::{env_usize, median};

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Instant;

use cloudai::model::{self, Assignment, Resources, Task, Worker};
use cloudai::store::Store;
use cloudai::store::mongo::MongoStore;
use cloudai::store::sqlite::SqliteStore;

fn task(task_id: String) -> Task {
    Task {
        command: Some("true".into()),
        ..Task::new_pending(
            task_id,
            "bench".into(),
            "busybox:1.36".into(),
            Resources::new(1.0, 1.0, 0.0, 0.0),
        )
    }
}

fn assignment(ass_id: String, task_id: String, worker_id: &str, req: &Resources) -> Assignment {
    Assignment {
        ass_id,
        task_id,
        worker_id: worker_id.to_string(),
        assigned_at: model::now(),
        req_cpu: req.cpu,
        req_memory: req.memory,
        req_storage: req.storage,
        req_gpu: req.gpu,
        attempt: 1,
        released: false,
        released_at: None,
        placed_by: None,
        reserved_epoch: None,
    }
}

/// Runs `ops` operations split over `concurrency` clients; returns operations per second.
async fn timed<F, Fut>(ops: usize, concurrency: usize, op: F) -> f64
where
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send,
{
    let op = Arc::new(op);
    let start = Instant::now();
    let mut clients = Vec::new();
    for client in 0..concurrency {
        let op = op.clone();
        clients.push(tokio::spawn(async move {
            let mut i = client;
            while i < ops {
                op(i).await;
                i += concurrency;
            }
        }));
    }
    for client in clients {
        client.await.expect("bench client panicked");
    }
    ops as f64 / start.elapsed().as_secs_f64()
}

async fn bench_store(
    name: &str,
    store: Arc<dyn Store>,
    runs: usize,
    ops: usize,
    concurrency: usize,
) {
    let request = Resources::new(1.0, 1.0, 0.0, 0.0);
    let (mut submit, mut reserve, mut release) = (Vec::new(), Vec::new(), Vec::new());
    println!("{name}: {runs} runs x {ops} operations, {concurrency} concurrent clients");
    for run in 0..runs {
        let worker_id = format!("bench-worker-{run}-{}", uuid::Uuid::now_v7().simple());
        let big = 1_000_000.0;
        let worker = Worker::new(
            worker_id.clone(),
            "127.0.0.1:1".into(),
            Resources::new(big, big, big, 0.0),
            BTreeMap::new(),
            String::new(),
        );
        store.insert_worker(&worker).await.expect("insert worker");
        let prefix = format!("{run}-{}", uuid::Uuid::now_v7().simple());

        let (s, p) = (store.clone(), prefix.clone());
        let rate = timed(ops, concurrency, move |i| {
            let (s, p) = (s.clone(), p.clone());
            async move {
                s.insert_task(&task(format!("task-{p}-{i}")), None)
                    .await
                    .expect("insert task");
            }
        })
        .await;
        submit.push(rate);

        let (s, p, w) = (store.clone(), prefix.clone(), worker_id.clone());
        let rate = timed(ops, concurrency, move |i| {
            let (s, p, w) = (s.clone(), p.clone(), w.clone());
            async move {
                assert!(
                    s.reserve(&w, &request).await.expect("reserve"),
                    "reserve refused"
                );
                let a = assignment(
                    format!("ass-{p}-{i}"),
                    format!("task-{p}-{i}"),
                    &w,
                    &request,
                );
                s.insert_assignment(&a).await.expect("insert assignment");
            }
        })
        .await;
        reserve.push(rate);

        let (s, p) = (store.clone(), prefix.clone());
        let rate = timed(ops, concurrency, move |i| {
            let (s, p) = (s.clone(), p.clone());
            async move {
                assert!(
                    s.release(&format!("ass-{p}-{i}")).await.expect("release"),
                    "double release"
                );
            }
        })
        .await;
        release.push(rate);

        let after = store.get_worker(&worker_id).await.expect("get worker");
        assert!(
            after.invariant_violations().is_empty(),
            "{:?}",
            after.invariant_violations()
        );
        assert_eq!(
            after.allocated_cpu, 0.0,
            "release did not restore the worker exactly"
        );
        println!(
            "  run {}: submit {:>8.0}/s  reserve+assign {:>8.0}/s  release {:>8.0}/s",
            run + 1,
            submit[run],
            reserve[run],
            release[run]
        );
    }
    println!(
        "{name} median: submit {:.0}/s, reserve+assign {:.0}/s, release {:.0}/s",
        median(submit),
        median(reserve),
        median(release)
    );
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let runs = env_usize("BENCH_RUNS", 5).max(1);
    let concurrency = env_usize("BENCH_CONCURRENCY", 8).max(1);

    let dir = tempfile::tempdir().expect("temp dir");
    let sqlite = SqliteStore::open_in_dir(dir.path()).expect("open sqlite");
    bench_store(
        "sqlite",
        Arc::new(sqlite),
        runs,
        env_usize("BENCH_OPS", 4000),
        concurrency,
    )
    .await;

    let uri = std::env::var("CLOUDAI_BENCH_MONGODB_URI")
        .or_else(|_| std::env::var("CLOUDAI_TEST_MONGODB_URI"))
        .ok()
        .filter(|u| !u.is_empty());
    match uri {
        Some(uri) => {
            let database = format!("cloudai_bench_{}", uuid::Uuid::now_v7().simple());
            let mongo = MongoStore::connect(&uri, &database)
                .await
                .expect("connect to MongoDB");
            bench_store(
                "mongodb",
                Arc::new(mongo),
                runs,
                env_usize("BENCH_OPS", 2000),
                concurrency,
            )
            .await;
        }
        None => {
            println!("mongodb: skipped (set CLOUDAI_BENCH_MONGODB_URI or CLOUDAI_TEST_MONGODB_URI)")
        }
    }
}
