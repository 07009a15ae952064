//! Scheduler tests on real stores: SQLite in a tempdir, and MongoDB (FerretDB here) when
//! `CLOUDAI_TEST_MONGODB_URI` is set (skipped with a message otherwise, a failure under `CI`).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use super::*;
use crate::lifecycle::{Cause, Finish};
use crate::model::{Resources, Task, TaskStatus};
use crate::store::conformance::{sample_task, unique_id};
use crate::store::sqlite::SqliteStore;
use crate::store::{AssignmentFilter, StoreError, TaskUpdate};

mod policies;

pub(crate) use crate::testing::{
    active_assignments, add_worker, assert_accounting, config, lifecycle, mongo, policies, sqlite,
};

pub(crate) fn scheduler(store: &Arc<dyn Store>, batch_size: u32) -> Scheduler {
    Scheduler::new(store.clone(), policies(), Wakeup::new(), config(batch_size))
}

/// A queued task of `user` asking for `cpu` cores and 1 GB, `age_ms` old.
pub(crate) async fn queued(
    store: &dyn Store,
    user: &str,
    cpu: f64,
    priority: i32,
    age_ms: i64,
) -> Task {
    let mut task = sample_task(&unique_id("task"), user);
    task.status = TaskStatus::Queued;
    (task.req_cpu, task.req_memory, task.req_storage) = (cpu, 1.0, 0.0);
    task.priority = priority;
    task.created_at -= chrono::Duration::milliseconds(age_ms);
    store.insert_task(&task, None).await.unwrap().task
}

// ------------------------------------------------------------------------------------------

async fn placed_tasks_get_an_assignment_with_the_reserved_amounts(store: Arc<dyn Store>) {
    let w1 = add_worker(&*store, Resources::new(4.0, 16.0, 100.0, 0.0)).await;
    let w2 = add_worker(&*store, Resources::new(2.0, 4.0, 100.0, 0.0)).await;
    let mut tasks = Vec::new();
    for cpu in [1.0, 2.0, 0.5, 2.0] {
        tasks.push(queued(&*store, "alice", cpu, 0, 0).await);
    }
    scheduler(&store, 100).cycle().await;

    for task in &tasks {
        let after = store.get_task(&task.task_id).await.unwrap();
        assert_eq!(after.status, TaskStatus::Running, "{}", task.task_id);
        assert_eq!(after.attempts, 1);
        assert_eq!((after.owner, after.started_at), (None, None));
        let active = active_assignments(
            &*store,
            AssignmentFilter {
                task_id: Some(task.task_id.clone()),
                ..AssignmentFilter::default()
            },
        )
        .await;
        assert_eq!(active.len(), 1, "one assignment per task");
        assert_eq!(active[0].request(), task.request());
        assert_eq!(active[0].attempt, 1);
        assert!([&w1.worker_id, &w2.worker_id].contains(&&active[0].worker_id));
    }
    assert_accounting(&*store).await;
    let total: f64 = store
        .list_workers()
        .await
        .unwrap()
        .iter()
        .map(|w| w.allocated_cpu)
        .sum();
    assert_eq!(total, 5.5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sqlite_placed_tasks_get_an_assignment_with_the_reserved_amounts() {
    let (store, _guard) = sqlite();
    placed_tasks_get_an_assignment_with_the_reserved_amounts(store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn mongo_placed_tasks_get_an_assignment_with_the_reserved_amounts() {
    let Some((store, _guard)) = mongo().await else {
        return;
    };
    placed_tasks_get_an_assignment_with_the_reserved_amounts(store).await;
}

/// Two replicas (two schedulers with their own owner ids) on one store, 200 tasks on three
/// workers with room for 12: every worker within capacity, no task placed twice, the rest
/// queued with a wait reason.
async fn two_replicas_never_overcommit_or_place_a_task_twice(store: Arc<dyn Store>) {
    for _ in 0..3 {
        add_worker(&*store, Resources::new(4.0, 8.0, 10.0, 0.0)).await;
    }
    let mut ids = Vec::new();
    for i in 0..200 {
        let user = ["alice", "bob", "carol"][i % 3];
        ids.push(queued(&*store, user, 1.0, 0, 0).await.task_id);
    }
    let a = scheduler(&store, 256);
    let b = scheduler(&store, 256);
    assert_ne!(a.owner(), b.owner());
    let run = |s: Scheduler| {
        tokio::spawn(async move {
            for _ in 0..3 {
                s.cycle().await;
            }
        })
    };
    let (ra, rb) = tokio::join!(run(a), run(b));
    ra.unwrap();
    rb.unwrap();
    // Races lost on a slow store may leave room for the next round: one more, alone.
    scheduler(&store, 256).cycle().await;

    assert_accounting(&*store).await;
    let mut per_task: HashMap<String, usize> = HashMap::new();
    for a in active_assignments(&*store, AssignmentFilter::default()).await {
        *per_task.entry(a.task_id).or_default() += 1;
    }
    assert!(
        per_task.values().all(|&n| n == 1),
        "a task placed twice: {per_task:?}"
    );
    assert_eq!(per_task.len(), 12, "the three workers have room for 12");
    for id in &ids {
        let task = store.get_task(id).await.unwrap();
        if per_task.contains_key(id) {
            assert_eq!(task.status, TaskStatus::Running);
        } else {
            assert_eq!(task.status, TaskStatus::Queued);
            assert!(task.status_reason.is_some(), "{id} has no wait reason");
            assert_eq!(task.owner, None, "{id} kept a claim");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sqlite_two_replicas_never_overcommit_or_place_a_task_twice() {
    let (store, _guard) = sqlite();
    two_replicas_never_overcommit_or_place_a_task_twice(store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn mongo_two_replicas_never_overcommit_or_place_a_task_twice() {
    let Some((store, _guard)) = mongo().await else {
        return;
    };
    two_replicas_never_overcommit_or_place_a_task_twice(store).await;
}

#[test]
fn fair_order_is_priority_then_users_in_turn_then_age() {
    let task = |id: &str, user: &str, priority: i32, age_s: i64| {
        let mut t = sample_task(id, user);
        t.priority = priority;
        t.created_at -= chrono::Duration::seconds(age_s);
        t
    };
    let tasks = vec![
        task("a1", "alice", 0, 50),
        task("a2", "alice", 0, 40),
        task("a3", "alice", 0, 30),
        task("b1", "bob", 0, 10),
        task("c1", "carol", 5, 1),
        task("b2", "bob", 0, 5),
    ];
    let none = BTreeMap::new();
    let order = placement::fair_order(tasks.clone(), 10, &none);
    let ids: Vec<&str> = order.iter().map(|t| t.task_id.as_str()).collect();
    assert_eq!(ids, ["c1", "a1", "b1", "a2", "b2", "a3"]);
    let ids: Vec<String> = placement::fair_order(tasks.clone(), 3, &none)
        .into_iter()
        .map(|t| t.task_id)
        .collect();
    assert_eq!(ids, ["c1", "a1", "b1"]);
    // Alice already runs two tasks: bob's two come before her next one, though younger.
    let running = BTreeMap::from([("alice".to_string(), 2)]);
    let ids: Vec<String> = placement::fair_order(tasks, 10, &running)
        .into_iter()
        .map(|t| t.task_id)
        .collect();
    assert_eq!(ids, ["c1", "b1", "b2", "a1", "a2", "a3"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_users_many_tasks_do_not_keep_another_users_task_out_of_the_batch() {
    let (store, _guard) = sqlite();
    let mut alice = Vec::new();
    for i in 0..50 {
        alice.push(queued(&*store, "alice", 1.0, 0, 100_000 - i).await);
    }
    let bob = queued(&*store, "bob", 1.0, 0, 0).await;
    let urgent = queued(&*store, "carol", 1.0, 9, 0).await;
    let s = scheduler(&store, 10);
    let batch = s.fair_batch(crate::model::now()).await.unwrap();
    assert_eq!(batch.len(), 10);
    let ids: Vec<&str> = batch.iter().map(|t| t.task_id.as_str()).collect();
    assert_eq!(
        &ids[..4],
        [
            &urgent.task_id,
            &alice[0].task_id,
            &bob.task_id,
            &alice[1].task_id
        ]
    );

    // Observable in placement: room for three tasks goes to carol, alice's oldest and bob.
    add_worker(&*store, Resources::new(3.0, 8.0, 10.0, 0.0)).await;
    s.cycle().await;
    let running: Vec<String> = store
        .list_tasks(&crate::store::TaskQuery {
            status: Some(TaskStatus::Running),
            limit: 100,
            ..Default::default()
        })
        .await
        .unwrap()
        .tasks
        .into_iter()
        .map(|t| t.task_id)
        .collect();
    let mut expected = vec![urgent.task_id, alice[0].task_id.clone(), bob.task_id];
    let mut running_sorted = running.clone();
    running_sorted.sort();
    expected.sort();
    assert_eq!(running_sorted, expected);
}

async fn wait_reason_is_visible_and_an_unschedulable_request_fails(store: Arc<dyn Store>) {
    add_worker(&*store, Resources::new(4.0, 8.0, 10.0, 0.0)).await;
    let first = queued(&*store, "alice", 3.0, 0, 2000).await;
    let second = queued(&*store, "alice", 3.0, 0, 1000).await;
    let huge = queued(&*store, "alice", 64.0, 0, 0).await;
    let s = scheduler(&store, 100);
    s.cycle().await;

    assert_eq!(
        store.get_task(&first.task_id).await.unwrap().status,
        TaskStatus::Running
    );
    let waiting = store.get_task(&second.task_id).await.unwrap();
    assert_eq!(waiting.status, TaskStatus::Queued);
    let reason = waiting.status_reason.clone().expect("a wait reason");
    assert!(!reason.is_empty());
    let failed = store.get_task(&huge.task_id).await.unwrap();
    assert_eq!(failed.status, TaskStatus::Failed);
    assert!(
        failed.error.as_deref().is_some_and(|e| !e.is_empty()),
        "{failed:?}"
    );
    assert_eq!(failed.status_reason, failed.error);

    // Another round with the same reason does not write the task again.
    s.cycle().await;
    assert_eq!(store.get_task(&second.task_id).await.unwrap(), waiting);
    assert_accounting(&*store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sqlite_wait_reason_is_visible_and_an_unschedulable_request_fails() {
    let (store, _guard) = sqlite();
    wait_reason_is_visible_and_an_unschedulable_request_fails(store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn mongo_wait_reason_is_visible_and_an_unschedulable_request_fails() {
    let Some((store, _guard)) = mongo().await else {
        return;
    };
    wait_reason_is_visible_and_an_unschedulable_request_fails(store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn stale_workers_are_not_candidates_and_their_tasks_wait() {
    let (store, _guard) = sqlite();
    let worker = add_worker(&*store, Resources::new(4.0, 8.0, 10.0, 0.0)).await;
    let old = crate::model::now().timestamp() - 60;
    store.heartbeat(&worker.worker_id, old, None).await.unwrap();
    let task = queued(&*store, "alice", 1.0, 0, 0).await;
    let s = scheduler(&store, 100);
    s.cycle().await;
    let after = store.get_task(&task.task_id).await.unwrap();
    assert_eq!(
        after.status,
        TaskStatus::Queued,
        "a stale worker must not get tasks"
    );
    assert!(after.status_reason.is_some());
    store
        .heartbeat(&worker.worker_id, crate::model::now().timestamp(), None)
        .await
        .unwrap();
    s.cycle().await;
    assert_eq!(
        store.get_task(&task.task_id).await.unwrap().status,
        TaskStatus::Running
    );
}

// ------------------------------------------------------------------------------------------
// Release.

async fn finishing_returns_the_reservation_once_and_places_a_waiting_task(store: Arc<dyn Store>) {
    let worker = add_worker(&*store, Resources::new(4.0, 8.0, 10.0, 0.0)).await;
    let first = queued(&*store, "alice", 4.0, 0, 1000).await;
    let second = queued(&*store, "bob", 4.0, 0, 0).await;
    let wakeup = Wakeup::new();
    let s = Scheduler::new(store.clone(), policies(), wakeup.clone(), config(100));
    s.cycle().await;
    assert_eq!(
        store.get_task(&first.task_id).await.unwrap().status,
        TaskStatus::Running
    );
    assert_eq!(
        store.get_task(&second.task_id).await.unwrap().status,
        TaskStatus::Queued
    );

    let done = lifecycle(&store, &wakeup)
        .finish_task(
            &first.task_id,
            Finish::Completed { exit_code: 0 },
            Cause::Worker,
        )
        .await
        .unwrap();
    assert_eq!(done.status, TaskStatus::Completed);
    assert_eq!(done.exit_code, Some(0));
    assert!(done.completed_at.is_some());
    tokio::time::timeout(Duration::from_secs(1), wakeup.woken())
        .await
        .expect("finishing wakes the scheduler");
    assert_eq!(
        store
            .get_worker(&worker.worker_id)
            .await
            .unwrap()
            .allocated(),
        Resources::default()
    );
    // A duplicate report releases nothing more.
    let again = lifecycle(&store, &wakeup)
        .finish_task(
            &first.task_id,
            Finish::Failed {
                error: "late".into(),
                exit_code: Some(1),
            },
            Cause::Worker,
        )
        .await;
    assert!(
        matches!(again, Err(StoreError::Conflict { .. })),
        "{again:?}"
    );
    assert_eq!(
        store.get_task(&first.task_id).await.unwrap().status,
        TaskStatus::Completed
    );
    assert_accounting(&*store).await;

    // The freed capacity goes to the waiting task.
    s.cycle().await;
    assert_eq!(
        store.get_task(&second.task_id).await.unwrap().status,
        TaskStatus::Running
    );
    assert_accounting(&*store).await;

    // Cancelling a running task returns its reservation too.
    let cancelled = lifecycle(&store, &wakeup)
        .finish_task(
            &second.task_id,
            Finish::Cancelled {
                reason: "cancelled by alice".into(),
            },
            Cause::Worker,
        )
        .await
        .unwrap();
    assert_eq!(cancelled.status, TaskStatus::Cancelled);
    assert_eq!(
        store
            .get_worker(&worker.worker_id)
            .await
            .unwrap()
            .allocated(),
        Resources::default()
    );
    assert_accounting(&*store).await;
    // Not running: refused, nothing released.
    let pending = queued(&*store, "carol", 1.0, 0, 0).await;
    let refused = lifecycle(&store, &wakeup)
        .finish_task(
            &pending.task_id,
            Finish::Completed { exit_code: 0 },
            Cause::Worker,
        )
        .await;
    assert!(
        matches!(refused, Err(StoreError::Conflict { .. })),
        "{refused:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sqlite_finishing_returns_the_reservation_once_and_places_a_waiting_task() {
    let (store, _guard) = sqlite();
    finishing_returns_the_reservation_once_and_places_a_waiting_task(store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn mongo_finishing_returns_the_reservation_once_and_places_a_waiting_task() {
    let Some((store, _guard)) = mongo().await else {
        return;
    };
    finishing_returns_the_reservation_once_and_places_a_waiting_task(store).await;
}

#[test]
fn config_defaults_are_the_documented_ones() {
    let c = SchedulerConfig::default();
    assert_eq!(c.batch_size, 100);
    assert_eq!(c.round_interval, Duration::from_secs(1));
    assert_eq!(c.claim_lease, Duration::from_secs(30));
    assert_eq!(c.heartbeat_staleness, Duration::from_secs(15));
}

/// Back-to-back rounds plan on the scheduler's view of the workers, which its own placements
/// keep current: a worker filled by the first round is not planned on again.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_rounds_view_of_the_workers_includes_its_own_placements() {
    let (store, _guard) = sqlite();
    let w = add_worker(&*store, Resources::new(4.0, 8.0, 10.0, 0.0)).await;
    for _ in 0..3 {
        queued(&*store, "alice", 1.0, 0, 0).await;
    }
    let s = scheduler(&store, 100);
    let first = s.placement_round().await.unwrap();
    assert_eq!((first.placed, first.lost), (3, 0));
    for _ in 0..2 {
        queued(&*store, "alice", 1.0, 0, 0).await;
    }
    let second = s.placement_round().await.unwrap();
    assert_eq!(
        (second.placed, second.waited, second.lost),
        (1, 1, 0),
        "planned on the 1 core left, not on a view from before the first round: {second:?}"
    );
    assert_eq!(
        store.get_worker(&w.worker_id).await.unwrap().available_cpu,
        0.0
    );
    assert_accounting(&*store).await;
}

/// A view that another replica made stale costs one lost race, never an overcommit: the
/// round that lost reads the workers again, and the next one plans on what is there.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_view_made_stale_by_another_replica_is_read_again_after_a_lost_race() {
    let (store, _guard) = sqlite();
    add_worker(&*store, Resources::new(4.0, 8.0, 10.0, 0.0)).await;
    queued(&*store, "alice", 1.0, 0, 0).await;
    let a = scheduler(&store, 100);
    assert_eq!(a.placement_round().await.unwrap().placed, 1);
    // Another replica fills the worker meanwhile.
    for _ in 0..3 {
        queued(&*store, "bob", 1.0, 0, 0).await;
    }
    let b = scheduler(&store, 100);
    assert_eq!(b.placement_round().await.unwrap().placed, 3);
    queued(&*store, "carol", 1.0, 0, 0).await;
    let stale = a.placement_round().await.unwrap();
    assert_eq!(
        (stale.placed, stale.lost),
        (0, 1),
        "planned on the stale view, refused by the store: {stale:?}"
    );
    let fresh = a.placement_round().await.unwrap();
    assert_eq!(
        (fresh.placed, fresh.waited, fresh.lost),
        (0, 1, 0),
        "the view was read again: {fresh:?}"
    );
    assert_accounting(&*store).await;
}

/// The dependency pass on a real store: waiting tasks are released and admitted once their
/// dependencies are met, failed with the reason once one can no longer be, and otherwise left
/// waiting with a reason that says what they still wait for.
async fn the_dependency_pass_releases_fails_and_keeps_waiting(store: Arc<dyn Store>) {
    use crate::model::{Dependency, DependencyCondition};
    let sched = scheduler(&store, 100);
    let user = unique_id("user");
    let add = async |after: Vec<Dependency>| {
        let mut task = sample_task(&unique_id("task"), &user);
        task.awaiting_dependencies = !after.is_empty();
        task.after = after;
        store.insert_task(&task, None).await.unwrap().task
    };
    let on = |task: &Task, condition| Dependency {
        task_id: Some(task.task_id.clone()),
        array_id: None,
        condition,
    };
    let a = add(vec![]).await;
    let e = add(vec![]).await;
    let b = add(vec![on(&a, DependencyCondition::Completed)]).await;
    let f = add(vec![on(&e, DependencyCondition::Completed)]).await;
    let g = add(vec![on(&e, DependencyCondition::Finished)]).await;
    let h = add(vec![
        on(&a, DependencyCondition::Completed),
        on(&e, DependencyCondition::Finished),
    ])
    .await;

    // Nothing met yet: everything waits, with a reason, whatever else the scheduler does
    // (a user whose usage changed has their deferred tasks checked again: not these).
    sched.lifecycle.wakeup().usage_changed(&user);
    sched.cycle().await;
    sched.dependency_pass().await.unwrap();
    for t in [&b, &f, &g, &h] {
        let now = store.get_task(&t.task_id).await.unwrap();
        assert!(now.awaiting_dependencies, "{now:?}");
        assert!(now.status_reason.unwrap().starts_with("waiting for task"));
    }

    for (task, to) in [(&a, TaskStatus::Completed), (&e, TaskStatus::Failed)] {
        store
            .transition_task(
                &task.task_id,
                &[TaskStatus::Pending, TaskStatus::Queued],
                to,
                &TaskUpdate::default(),
            )
            .await
            .unwrap();
    }
    let stats = sched.dependency_pass().await.unwrap();
    assert_eq!((stats.released, stats.failed), (3, 1), "{stats:?}");
    for t in [&b, &g, &h] {
        let now = store.get_task(&t.task_id).await.unwrap();
        assert_eq!(
            now.status,
            TaskStatus::Queued,
            "released and admitted at once: {now:?}"
        );
        assert!(!now.awaiting_dependencies);
    }
    let failed = store.get_task(&f.task_id).await.unwrap();
    assert_eq!(failed.status, TaskStatus::Failed);
    assert_eq!(
        failed.error.as_deref(),
        Some(
            format!(
                "dependency task {} is failed: it can no longer complete",
                e.task_id
            )
            .as_str()
        )
    );
    // A second pass finds nothing to do.
    let stats = sched.dependency_pass().await.unwrap();
    assert_eq!((stats.released, stats.failed), (0, 0));
}

#[tokio::test]
async fn the_dependency_pass_releases_fails_and_keeps_waiting_on_sqlite() {
    let (store, _guard) = sqlite();
    the_dependency_pass_releases_fails_and_keeps_waiting(store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dependency_pass_releases_fails_and_keeps_waiting_on_mongodb() {
    let Some((store, _guard)) = mongo().await else {
        return;
    };
    the_dependency_pass_releases_fails_and_keeps_waiting(store).await;
}

/// Thousands of tasks waiting for one task are one list to the dependency pass: while it
/// runs, a pass writes none of them (their reason stands) and a task waiting for something
/// else is released as soon as that is met; once it completes, one pass releases them all.
#[tokio::test]
async fn many_tasks_waiting_for_one_are_one_list_and_starve_nobody() {
    use crate::model::{Dependency, DependencyCondition, array_task, new_array_id};
    let dir = tempfile::tempdir().unwrap();
    let sqlite = SqliteStore::open_in_dir(dir.path()).unwrap();
    let store: Arc<dyn Store> = Arc::new(sqlite.clone());
    let sched = scheduler(&store, 100);
    let user = unique_id("user");
    let train = sample_task(&unique_id("task"), &user);
    let other = sample_task(&unique_id("task"), &user);
    for t in [&train, &other] {
        store.insert_task(t, None).await.unwrap();
    }
    let on = |task: &Task| Dependency {
        task_id: Some(task.task_id.clone()),
        array_id: None,
        condition: DependencyCondition::Completed,
    };
    let mut template = sample_task("template", &user);
    template.after = vec![on(&train)];
    template.awaiting_dependencies = true;
    template.status_reason = Some(format!("waiting for task {} to complete", train.task_id));
    let array_id = new_array_id();
    let waiting: Vec<Task> = (0..2_500)
        .map(|i| array_task(&template, &array_id, i, 2_500))
        .collect();
    store.insert_tasks(&waiting, None).await.unwrap();
    let mut last = sample_task(&unique_id("task"), &user);
    last.after = vec![on(&other)];
    last.awaiting_dependencies = true;
    store.insert_task(&last, None).await.unwrap();

    for (task, to) in [
        (&train, TaskStatus::Running),
        (&other, TaskStatus::Completed),
    ] {
        store
            .transition_task(
                &task.task_id,
                &[TaskStatus::Pending],
                to,
                &TaskUpdate::default(),
            )
            .await
            .unwrap();
    }
    let before = sqlite.transactions();
    let stats = sched.dependency_pass().await.unwrap();
    assert_eq!((stats.checked, stats.released), (2, 1), "{stats:?}");
    assert_eq!(
        store.get_task(&last.task_id).await.unwrap().status,
        TaskStatus::Queued
    );
    let untouched = store.get_task(&waiting[1_234].task_id).await.unwrap();
    assert_eq!(untouched, waiting[1_234], "a waiting task is not written");
    let spent = sqlite.transactions() - before;
    assert!(spent < 20, "{spent} transactions for one pass");

    store
        .transition_task(
            &train.task_id,
            &[TaskStatus::Running],
            TaskStatus::Completed,
            &TaskUpdate::default(),
        )
        .await
        .unwrap();
    let stats = sched.dependency_pass().await.unwrap();
    assert_eq!(stats.released, 2_500, "{stats:?}");
    let counts = store.array_summary(&array_id).await.unwrap().counts;
    assert_eq!(counts.queued, 2_500, "{counts:?}");
}
