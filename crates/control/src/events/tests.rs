//! The hub on a real store, fed by the lifecycle: what is published, in which order, and what
//! it costs the operations that cause events.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use super::EventHub;
use crate::lifecycle::Lifecycle;
use crate::model::TaskStatus;
use crate::policy::AdmissionDecision;
use crate::scheduler::Wakeup;
use crate::store::Store;
use crate::store::conformance::{sample_task, unique_id};
use crate::store::sqlite::SqliteStore;

async fn sqlite() -> (Arc<dyn Store>, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    (Arc::new(SqliteStore::open_in_dir(dir.path()).unwrap()), dir)
}

/// One task submitted, queued, failed: what a live subscriber of the hub receives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_changes_are_published_once_each_and_reason_updates_not_at_all() {
    let (store, _dir) = sqlite().await;
    let (hub, sink) = EventHub::start(
        store.clone(),
        super::DEFAULT_RETENTION,
        CancellationToken::new(),
    )
    .await;
    let lifecycle = Lifecycle::new(store, Wakeup::new()).with_events(sink);
    let mut live = hub.subscribe();
    let task = sample_task(&unique_id("t"), "alice");
    lifecycle.submit(&task, None).await.unwrap();
    let id = &task.task_id;
    lifecycle
        .admit(&task, AdmissionDecision::Accept)
        .await
        .unwrap();
    // A reason update (queued -> queued) is not a status change.
    let ids = [id.clone()];
    let waiting = lifecycle
        .explain(&ids, TaskStatus::Queued, "waiting")
        .await
        .unwrap();
    assert_eq!(waiting.len(), 1);
    let failed = lifecycle
        .fail_unrun(
            &ids,
            TaskStatus::Queued,
            "no",
            crate::lifecycle::Cause::Placement,
        )
        .await
        .unwrap();
    assert_eq!(failed.len(), 1);
    let mut got = Vec::new();
    while got.len() < 3 {
        let e = tokio::time::timeout(Duration::from_secs(5), live.recv())
            .await
            .expect("an event within 5 s")
            .unwrap();
        got.push(e);
    }
    let kinds: Vec<String> = got
        .iter()
        .map(|e| format!("{}:{}", e.event.kind, e.event.data["status"]))
        .collect();
    assert_eq!(
        kinds,
        [
            "submitted:\"pending\"",
            "state:\"queued\"",
            "state:\"failed\""
        ]
    );
    assert_eq!(got[1].event.data["reason"], serde_json::Value::Null);
    assert_eq!(got[1].event.data["cause"], "admission");
    assert_eq!(got[2].event.data["reason"], "no");
    assert_eq!(got[2].event.data["cause"], "placement");
    assert!(got.windows(2).all(|w| w[0].id < w[1].id));
    assert_eq!(hub.watermark(), got[2].id);
    // Nothing else came (the reason update published nothing).
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert!(live.try_recv().is_err());
}

/// Run by hand: `cargo test -p cloudai --lib events_cost -- --ignored --nocapture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement, not a check"]
async fn events_cost_of_task_transitions() {
    let mongo = crate::store::mongo::testing::connect_test_store().await;
    let (sqlite_store, _dir) = sqlite().await;
    let mut stores: Vec<(&str, Arc<dyn Store>)> = vec![("sqlite", sqlite_store)];
    if let Some((store, _)) = &mongo {
        stores.push(("ferretdb", Arc::new(store.clone())));
    }
    for (name, store) in stores {
        for evented in [false, true] {
            // The hub lives through the run: its tailing is part of the cost.
            let mut hub: Option<Arc<EventHub>> = None;
            let mut lifecycle = Lifecycle::new(store.clone(), Wakeup::new());
            if evented {
                let (started_hub, sink) = EventHub::start(
                    store.clone(),
                    super::DEFAULT_RETENTION,
                    CancellationToken::new(),
                )
                .await;
                hub = Some(started_hub);
                lifecycle = lifecycle.with_events(sink);
            }
            let started = Instant::now();
            let clients = (0..8).map(|_| {
                let lifecycle = lifecycle.clone();
                tokio::spawn(async move {
                    for _ in 0..25 {
                        let task = sample_task(&unique_id("t"), "alice");
                        lifecycle.submit(&task, None).await.unwrap();
                        lifecycle
                            .admit(&task, AdmissionDecision::Accept)
                            .await
                            .unwrap();
                        let ids = [task.task_id.clone()];
                        lifecycle
                            .explain(&ids, TaskStatus::Queued, "waiting")
                            .await
                            .unwrap();
                        lifecycle.cancel(&task.task_id, "alice").await.unwrap();
                    }
                })
            });
            for client in clients {
                client.await.unwrap();
            }
            println!(
                "{name}, events {}: 200 tasks x 4 changes by 8 clients in {:?}",
                if evented { "on" } else { "off" },
                started.elapsed()
            );
            drop(hub);
        }
    }
}

/// Two replicas (two hubs on one store) write interleaved: a subscriber of each gets every
/// event of both, in id order, once — its own taken from memory, the other's read from the
/// store. On SQLite, and on MongoDB when a test server is set (where a replica reads only the
/// other's ids).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_replica_delivers_its_own_and_the_others_events_in_order_once() {
    let (sqlite_store, _dir) = sqlite().await;
    let mongo = crate::store::mongo::testing::connect_test_store().await;
    let mut stores: Vec<(&str, Arc<dyn Store>)> = vec![("sqlite", sqlite_store)];
    if let Some((store, _)) = &mongo {
        stores.push(("mongodb", Arc::new(store.clone())));
    }
    const PER_REPLICA: usize = 300;
    for (name, store) in stores {
        let stop = CancellationToken::new();
        let mut replicas = Vec::new();
        for _ in 0..2 {
            let (hub, sink) =
                EventHub::start(store.clone(), super::DEFAULT_RETENTION, stop.clone()).await;
            let live = hub.subscribe();
            replicas.push((hub, sink, live));
        }
        for i in 0..PER_REPLICA {
            for (r, (_, sink, _)) in replicas.iter().enumerate() {
                let worker = format!("r{r}-{i}");
                sink.publish(super::event(
                    "worker",
                    "joined",
                    None,
                    Some(&worker),
                    None,
                    serde_json::json!({}),
                ));
            }
            if i % 50 == 0 {
                // Several write batches, so that the replicas' ids interleave.
                tokio::time::sleep(Duration::from_millis(15)).await;
            }
        }
        for (r, (_, _, live)) in replicas.iter_mut().enumerate() {
            let mut ids = Vec::new();
            let mut workers = std::collections::HashSet::new();
            while ids.len() < 2 * PER_REPLICA {
                let e = tokio::time::timeout(Duration::from_secs(30), live.recv())
                    .await
                    .unwrap_or_else(|_| panic!("{name}: replica {r} got {} events", ids.len()))
                    .unwrap();
                ids.push(e.id);
                workers.insert(e.event.worker_id.clone().unwrap());
            }
            assert!(
                ids.windows(2).all(|w| w[0] + 1 == w[1]),
                "{name}: replica {r} got ids out of order, twice or with a gap: {ids:?}"
            );
            assert_eq!(workers.len(), 2 * PER_REPLICA, "{name}: replica {r}");
            assert!(workers.contains("r0-0") && workers.contains("r1-0"));
        }
        stop.cancel();
    }
}
