//! Queue order through a real host: priority first, then users in turn (counting the tasks
//! they already run), then age, observed in the order in which a two-slot simulated worker
//! (the worker API, no containers) is given the queued tasks as it finishes them one by one.

use std::collections::{HashSet, VecDeque};
use std::time::Duration;

use serde_json::json;

use crate::harness::{ALICE_TOKEN, BOB_TOKEN, StoreKind, TestHost, mongo_uri, register_worker};

/// Submits a task of one core as `token` with `priority`; returns its id.
async fn submit(host: &TestHost, token: &str, priority: i64) -> String {
    let spec = json!({
        "docker_image": "busybox", "command": "true",
        "req_cpu": 1, "req_memory": 1, "priority": priority,
    });
    crate::harness::submit_task(host, token, &spec).await
}

/// The next assignment the worker has not seen yet: (assignment id, task id).
async fn next_work(
    host: &TestHost,
    id: &str,
    token: &str,
    seen: &mut HashSet<String>,
) -> (String, String) {
    host.eventually(format!("new work for {id}"), Duration::from_secs(20))
        // Each check long-polls the work list.
        .every(Duration::ZERO)
        .until(async || {
            crate::harness::heartbeat(host, id, token).await;
            let work = crate::harness::work_list(host, id, token, 500).await;
            assert!(work.len() <= 2, "a two-core worker got {work:?}");
            match work.iter().find(|(ass, _)| !seen.contains(ass)) {
                Some(new) => {
                    seen.insert(new.0.clone());
                    Ok(new.clone())
                }
                None => Err(format!("only work it has seen: {work:?}")),
            }
        })
        .await
}

/// Reports the assignment started and completed, which frees the worker's one core.
async fn complete(host: &TestHost, id: &str, token: &str, ass_id: &str) {
    crate::harness::report_completed(host, id, token, ass_id, "").await;
}

async fn priority_then_users_in_turn_then_age(store: StoreKind) {
    let host = TestHost::start_with(store, &["--no-local-worker"]).unwrap();
    let token = register_worker(&host, "two-slots", 2.0, 4.0).await;
    let id = "two-slots";
    let mut seen = HashSet::new();

    // Alice's first two tasks take both cores; the rest queue behind them in this order.
    let mut in_flight = VecDeque::new();
    for _ in 0..2 {
        let task = submit(&host, ALICE_TOKEN, 0).await;
        let (ass, placed) = next_work(&host, id, &token, &mut seen).await;
        assert_eq!(placed, task);
        in_flight.push_back(ass);
    }
    let mut alice = Vec::new();
    for _ in 0..4 {
        alice.push(submit(&host, ALICE_TOKEN, 0).await);
    }
    let bob = submit(&host, BOB_TOKEN, 0).await;
    let urgent = submit(&host, ALICE_TOKEN, 10).await;
    let expected = vec![
        urgent.clone(), // priority first, though submitted last
        // Then, at equal priority, the user with fewer running tasks: alice runs one (urgent),
        // bob none, so bob's task goes before all of alice's older ones.
        bob.clone(),
        alice[0].clone(),
        alice[1].clone(),
        alice[2].clone(),
        alice[3].clone(),
    ];

    // Finish the oldest running task, one at a time: each frees one core for one task.
    let mut order = Vec::new();
    while order.len() < expected.len() {
        let done = in_flight.pop_front().unwrap();
        complete(&host, id, &token, &done).await;
        let (ass, task) = next_work(&host, id, &token, &mut seen).await;
        order.push(task);
        in_flight.push_back(ass);
    }
    for done in in_flight {
        complete(&host, id, &token, &done).await;
    }
    let labels = ["urgent", "bob", "alice-1", "alice-2", "alice-3", "alice-4"];
    let named = |ids: &[String]| -> Vec<String> {
        ids.iter()
            .map(|id| match expected.iter().position(|e| e == id) {
                Some(i) => labels[i].to_string(),
                None => id.clone(),
            })
            .collect()
    };
    assert_eq!(named(&order), named(&expected));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_queue_order_is_priority_then_users_in_turn_then_age() {
    priority_then_users_in_turn_then_age(StoreKind::Embedded).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mongo_queue_order_is_priority_then_users_in_turn_then_age() {
    let Some(uri) = mongo_uri() else { return };
    priority_then_users_in_turn_then_age(StoreKind::Mongo(uri)).await;
}
