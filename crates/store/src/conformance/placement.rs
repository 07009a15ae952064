//! Conformance of [`Store::place_round`]: a round's decisions written together.

use std::collections::HashMap;
use std::sync::Arc;

use chrono::Duration;

use super::{assert_allocated_matches_assignments, insert, sample_task, unique_id, worker_with};
use crate::model::{Resources, Task, TaskStatus, now};
use crate::{AssignmentFilter, PlannedPlacement, RoundPlan, RoundReadPlan, Store, TaskUpdate};

/// A queued task of `user` asking for `cpu` cores and 1 GB.
async fn queued_task(store: &dyn Store, user: &str, cpu: f64) -> Task {
    let mut task = sample_task(&unique_id("task"), user);
    task.status = TaskStatus::Queued;
    (
        task.req_cpu,
        task.req_memory,
        task.req_storage,
        task.req_gpu,
    ) = (cpu, 1.0, 0.0, 0.0);
    insert(store, &task).await
}

fn plan(placements: Vec<(&Task, &str)>) -> RoundPlan {
    let at = now();
    RoundPlan {
        claim: unique_id("host-test/round"),
        lease_until: at + Duration::seconds(30),
        now: at,
        placements: placements
            .into_iter()
            .map(|(task, worker_id)| PlannedPlacement {
                task: task.clone(),
                worker_id: worker_id.to_string(),
            })
            .collect(),
    }
}

async fn active_of_task(store: &dyn Store, task_id: &str) -> Vec<crate::model::Assignment> {
    store
        .list_assignments(&AssignmentFilter {
            task_id: Some(task_id.to_string()),
            active_only: true,
            ..AssignmentFilter::default()
        })
        .await
        .unwrap()
}

pub async fn place_round_places_every_task_with_its_assignment_and_reservation(store: &dyn Store) {
    let w1 = worker_with(store, "w", Resources::new(4.0, 8.0, 10.0, 0.0)).await;
    let w2 = worker_with(store, "w", Resources::new(4.0, 8.0, 10.0, 0.0)).await;
    let user = unique_id("user");
    let mut tasks = Vec::new();
    for cpu in [1.0, 0.5, 2.0, 1.5, 0.25, 0.125] {
        tasks.push(queued_task(store, &user, cpu).await);
    }
    let plan = plan(
        tasks
            .iter()
            .enumerate()
            .map(|(i, t)| {
                (
                    t,
                    if i < 3 {
                        &*w1.worker_id
                    } else {
                        &*w2.worker_id
                    },
                )
            })
            .collect(),
    );
    let outcome = store.place_round(&plan).await.unwrap();
    assert!(outcome.lost.is_empty(), "lost: {:?}", outcome.lost);
    assert!(outcome.failed.is_empty(), "failed: {:?}", outcome.failed);
    assert_eq!(outcome.placed.len(), 6);
    for (i, task) in tasks.iter().enumerate() {
        let (placed, assignment) = outcome
            .placed
            .iter()
            .find(|(t, _)| t.task_id == task.task_id)
            .unwrap();
        let stored = store.get_task(&task.task_id).await.unwrap();
        assert_eq!(stored.status, TaskStatus::Running);
        assert_eq!(stored.attempts, 1);
        assert_eq!(
            (stored.owner.clone(), stored.lease_expires_at),
            (None, None)
        );
        assert_eq!(stored.status_reason, None);
        // The outcome's copy is the task as stored.
        assert_eq!(
            (placed.status, placed.attempts, &placed.owner),
            (stored.status, stored.attempts, &stored.owner)
        );
        let active = active_of_task(store, &task.task_id).await;
        assert_eq!(active.len(), 1, "{}: {active:?}", task.task_id);
        assert_eq!(&active[0], assignment);
        assert_eq!(assignment.attempt, 1);
        assert_eq!(assignment.request(), task.request());
        let expected_worker = if i < 3 { &w1.worker_id } else { &w2.worker_id };
        assert_eq!(&assignment.worker_id, expected_worker);
    }
    for (worker, cpu) in [(&w1, 3.5), (&w2, 1.875)] {
        let stored = store.get_worker(&worker.worker_id).await.unwrap();
        assert_eq!(stored.allocated_cpu, cpu);
        assert_allocated_matches_assignments(store, &worker.worker_id, "after a round").await;
    }
}

pub async fn place_round_loses_tasks_claimed_moved_or_stale_and_leaves_them_as_they_were(
    store: &dyn Store,
) {
    let w = worker_with(store, "w", Resources::new(8.0, 16.0, 10.0, 0.0)).await;
    let user = unique_id("user");
    let fine = queued_task(store, &user, 1.0).await;
    let claimed = queued_task(store, &user, 1.0).await;
    let at = now();
    store
        .claim_task(
            &claimed.task_id,
            "host-other/claim",
            at + Duration::seconds(30),
            at,
        )
        .await
        .unwrap();
    let cancelled = queued_task(store, &user, 1.0).await;
    store
        .transition_task(
            &cancelled.task_id,
            &[TaskStatus::Queued],
            TaskStatus::Cancelled,
            &TaskUpdate::default(),
        )
        .await
        .unwrap();
    // Read by the round at attempt 0, queued again at attempt 1 since.
    let stale = queued_task(store, &user, 1.0).await;
    store
        .transition_task(
            &stale.task_id,
            &[TaskStatus::Queued],
            TaskStatus::Queued,
            &TaskUpdate {
                increment_attempts: true,
                ..TaskUpdate::default()
            },
        )
        .await
        .unwrap();
    let plan = plan(vec![
        (&fine, &w.worker_id),
        (&claimed, &w.worker_id),
        (&cancelled, &w.worker_id),
        (&stale, &w.worker_id),
    ]);
    let outcome = store.place_round(&plan).await.unwrap();
    let placed: Vec<&str> = outcome
        .placed
        .iter()
        .map(|(t, _)| t.task_id.as_str())
        .collect();
    assert_eq!(placed, vec![fine.task_id.as_str()]);
    let mut lost = outcome.lost.clone();
    lost.sort();
    let mut expected = vec![
        claimed.task_id.clone(),
        cancelled.task_id.clone(),
        stale.task_id.clone(),
    ];
    expected.sort();
    assert_eq!(lost, expected);
    assert!(outcome.failed.is_empty(), "{:?}", outcome.failed);
    let other = store.get_task(&claimed.task_id).await.unwrap();
    assert_eq!(
        (other.status, other.owner.as_deref()),
        (TaskStatus::Queued, Some("host-other/claim")),
        "another replica's claim is kept"
    );
    assert_eq!(
        store.get_task(&cancelled.task_id).await.unwrap().status,
        TaskStatus::Cancelled
    );
    let stale_now = store.get_task(&stale.task_id).await.unwrap();
    assert_eq!(
        (stale_now.status, stale_now.attempts, stale_now.owner),
        (TaskStatus::Queued, 1, None),
        "a stale copy is neither placed nor left claimed"
    );
    for task in [&claimed, &cancelled, &stale] {
        assert!(active_of_task(store, &task.task_id).await.is_empty());
    }
    let stored = store.get_worker(&w.worker_id).await.unwrap();
    assert_eq!(
        stored.allocated_cpu, 1.0,
        "only the placed task is reserved"
    );
    assert_allocated_matches_assignments(store, &w.worker_id, "after a round with losses").await;
}

pub async fn place_round_reserves_task_by_task_when_a_worker_refuses_the_sum(store: &dyn Store) {
    let small = worker_with(store, "w", Resources::new(3.0, 8.0, 10.0, 0.0)).await;
    let roomy = worker_with(store, "w", Resources::new(8.0, 16.0, 10.0, 0.0)).await;
    let user = unique_id("user");
    let mut on_small = Vec::new();
    for _ in 0..4 {
        on_small.push(queued_task(store, &user, 1.0).await);
    }
    let elsewhere = queued_task(store, &user, 2.0).await;
    let mut placements: Vec<(&Task, &str)> =
        on_small.iter().map(|t| (t, &*small.worker_id)).collect();
    placements.push((&elsewhere, &roomy.worker_id));
    let outcome = store.place_round(&plan(placements)).await.unwrap();
    assert_eq!(
        outcome.placed.len(),
        4,
        "3 fit the small worker, 1 the roomy one"
    );
    assert_eq!(
        outcome.lost.len(),
        1,
        "the 4th 1-core task does not fit 3 cores"
    );
    let lost = store.get_task(&outcome.lost[0]).await.unwrap();
    assert_eq!(
        (lost.status, lost.owner, lost.attempts),
        (TaskStatus::Queued, None, 0),
        "the task that did not fit is claimable again at once"
    );
    let stored = store.get_worker(&small.worker_id).await.unwrap();
    assert_eq!((stored.allocated_cpu, stored.available_cpu), (3.0, 0.0));
    assert_allocated_matches_assignments(store, &small.worker_id, "after the fallback").await;
    assert_allocated_matches_assignments(store, &roomy.worker_id, "after the fallback").await;
}

pub async fn place_round_loses_the_tasks_of_a_draining_inactive_or_unknown_worker(
    store: &dyn Store,
) {
    let draining = worker_with(store, "w", Resources::new(8.0, 16.0, 10.0, 0.0)).await;
    store.set_draining(&draining.worker_id, true).await.unwrap();
    let inactive = worker_with(store, "w", Resources::new(8.0, 16.0, 10.0, 0.0)).await;
    store
        .set_worker_active(&inactive.worker_id, false)
        .await
        .unwrap();
    let user = unique_id("user");
    let a = queued_task(store, &user, 1.0).await;
    let b = queued_task(store, &user, 1.0).await;
    let c = queued_task(store, &user, 1.0).await;
    let d = queued_task(store, &user, 1.0).await;
    let unknown = unique_id("w-gone");
    let outcome = store
        .place_round(&plan(vec![
            (&a, &draining.worker_id),
            (&b, &draining.worker_id),
            (&c, &inactive.worker_id),
            (&d, &unknown),
        ]))
        .await
        .unwrap();
    assert!(outcome.placed.is_empty());
    assert!(outcome.failed.is_empty(), "{:?}", outcome.failed);
    assert_eq!(outcome.lost.len(), 4);
    for task in [&a, &b, &c, &d] {
        let stored = store.get_task(&task.task_id).await.unwrap();
        assert_eq!((stored.status, stored.owner), (TaskStatus::Queued, None));
    }
    for w in [&draining, &inactive] {
        assert_eq!(
            store.get_worker(&w.worker_id).await.unwrap().allocated_cpu,
            0.0
        );
    }
}

pub async fn place_round_of_nothing_does_nothing(store: &dyn Store) {
    let outcome = store.place_round(&plan(Vec::new())).await.unwrap();
    assert!(outcome.placed.is_empty() && outcome.lost.is_empty() && outcome.failed.is_empty());
}

/// Two replicas' rounds planned on the same stale view: both want every task on the same two
/// workers, which have room for fewer tasks than either round asked. Their grouped reserves
/// race; a refused one falls back to task by task. No worker is overcommitted and no task is
/// placed twice.
pub async fn concurrent_rounds_on_the_same_workers_never_overcommit_or_place_twice(
    store: Arc<dyn Store>,
) {
    let w1 = worker_with(&*store, "w", Resources::new(5.0, 64.0, 10.0, 0.0)).await;
    let w2 = worker_with(&*store, "w", Resources::new(5.0, 64.0, 10.0, 0.0)).await;
    let user = unique_id("user");
    let mut shared = Vec::new();
    for _ in 0..8 {
        shared.push(queued_task(&*store, &user, 1.0).await);
    }
    let mut own_a = Vec::new();
    let mut own_b = Vec::new();
    // Each round's own tasks alone ask 4 cores of each worker: whichever round wins which
    // shared task, both workers are asked for more than they hold.
    for _ in 0..8 {
        own_a.push(queued_task(&*store, &user, 1.0).await);
        own_b.push(queued_task(&*store, &user, 1.0).await);
    }
    let round = |own: &[Task], reverse: bool| {
        let mut tasks: Vec<&Task> = shared.iter().chain(own.iter()).collect();
        if reverse {
            tasks.reverse();
        }
        plan(
            tasks
                .into_iter()
                .enumerate()
                .map(|(i, t)| {
                    (
                        t,
                        if i % 2 == 0 {
                            &*w1.worker_id
                        } else {
                            &*w2.worker_id
                        },
                    )
                })
                .collect(),
        )
    };
    let (plan_a, plan_b) = (round(&own_a, false), round(&own_b, true));
    let (sa, sb) = (store.clone(), store.clone());
    let (a, b) = tokio::join!(
        tokio::spawn(async move { sa.place_round(&plan_a).await.unwrap() }),
        tokio::spawn(async move { sb.place_round(&plan_b).await.unwrap() }),
    );
    let (a, b) = (a.unwrap(), b.unwrap());
    assert!(a.failed.is_empty() && b.failed.is_empty(), "{a:?} {b:?}");
    let mut placed: HashMap<String, usize> = HashMap::new();
    for (task, _) in a.placed.iter().chain(b.placed.iter()) {
        *placed.entry(task.task_id.clone()).or_default() += 1;
    }
    assert!(placed.values().all(|&n| n == 1), "placed twice: {placed:?}");
    assert_eq!(
        placed.len(),
        10,
        "two workers of 5 cores hold ten 1-core tasks"
    );
    for w in [&w1, &w2] {
        assert_allocated_matches_assignments(&*store, &w.worker_id, "after racing rounds").await;
    }
    for task in shared.iter().chain(own_a.iter()).chain(own_b.iter()) {
        let stored = store.get_task(&task.task_id).await.unwrap();
        let active = active_of_task(&*store, &task.task_id).await;
        if placed.contains_key(&task.task_id) {
            assert_eq!(stored.status, TaskStatus::Running);
            assert_eq!(active.len(), 1);
        } else {
            assert_eq!((stored.status, stored.owner), (TaskStatus::Queued, None));
            assert!(active.is_empty());
        }
    }
}

pub async fn round_reads_take_the_fair_batch_and_the_workers_only_when_there_is_work(
    store: &dyn Store,
) {
    let read = |workers: bool| async move {
        let plan = RoundReadPlan {
            limit: 4,
            now: now(),
            workers,
        };
        store.round_reads(&plan).await
    };
    let w1 = worker_with(store, "w", Resources::new(8.0, 8.0, 8.0, 0.0)).await;
    let w2 = worker_with(store, "w", Resources::new(8.0, 8.0, 8.0, 0.0)).await;
    // Nothing queued: no tasks, and no workers read even when asked.
    let empty = read(true).await.unwrap();
    assert!(empty.tasks.is_empty());
    assert!(empty.workers.is_none(), "an empty batch reads no workers");

    let (alice, bob) = (unique_id("alice"), unique_id("bob"));
    let queued_at = |user: &str, at: i64| {
        let mut task = sample_task(&unique_id("task"), user);
        task.status = TaskStatus::Queued;
        task.created_at = super::at_ms(at);
        task
    };
    let mut alices = Vec::new();
    for at in 0..5 {
        alices.push(insert(store, &queued_at(&alice, at)).await);
    }
    let bobs = insert(store, &queued_at(&bob, 10)).await;
    let mut running = sample_task(&unique_id("task"), &alice);
    running.status = TaskStatus::Running;
    insert(store, &running).await;
    let req = Resources::new(1.0, 1.0, 0.0, 0.0);
    assert!(store.reserve(&w1.worker_id, &req).await.unwrap());
    let a = super::sample_assignment(&unique_id("ass"), &running.task_id, &w1.worker_id, req);
    store.insert_assignment(&a).await.unwrap();

    let reads = read(false).await.unwrap();
    // The head (alice's four oldest: she filled more than her share of a batch of 4), then
    // the queue without alice (bob's one task).
    let got: Vec<&str> = reads.tasks.iter().map(|t| t.task_id.as_str()).collect();
    let mut want: Vec<&str> = alices[..4].iter().map(|t| t.task_id.as_str()).collect();
    want.push(&bobs.task_id);
    assert_eq!(got, want);
    assert_eq!(reads.running.get(&alice), Some(&1));
    assert_eq!(reads.running.get(&bob), None);
    assert!(reads.workers.is_none(), "not asked for");

    let reads = read(true).await.unwrap();
    assert_eq!(reads.tasks.len(), 5);
    let workers = reads.workers.expect("asked for, with work");
    let mut ids = vec![w1.worker_id.clone(), w2.worker_id.clone()];
    ids.sort();
    let listed: Vec<String> = workers
        .workers
        .iter()
        .map(|w| w.worker_id.clone())
        .collect();
    assert_eq!(listed, ids, "every worker, by worker_id");
    let w1_read = workers
        .workers
        .iter()
        .find(|w| w.worker_id == w1.worker_id)
        .unwrap();
    assert_eq!(w1_read.allocated_cpu, 1.0);
    assert_eq!(
        workers.active_assignments,
        [(w1.worker_id.clone(), 1)].into_iter().collect()
    );
}
