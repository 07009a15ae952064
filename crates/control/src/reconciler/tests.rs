//! Reconciler tests on real stores (SQLite in a tempdir; MongoDB, FerretDB here, when
//! `CLOUDAI_TEST_MONGODB_URI` is set), with simulated workers: store-level registration and
//! heartbeats, no containers.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use super::*;
use crate::lifecycle::{Cause, Finish};
use crate::model::{Assignment, Resources, Task, TaskStatus};
use crate::scheduler::tests::lifecycle;
use crate::scheduler::tests::{active_assignments, add_worker, assert_accounting, policies};
use crate::scheduler::{Scheduler, Wakeup};
use crate::store::conformance::{sample_assignment, sample_task, unique_id};
use crate::store::{AssignmentFilter, Store, StoreError};
use crate::testing::{
    GRACE, active_of, go_silent, held_tick, reconciler, reconciler_with_claim_lease,
    scheduler_config,
};

/// Generates `NAME::sqlite` and `NAME::mongo` (skipped without a MongoDB server) from the
/// async function `NAME(store)`.
macro_rules! on_both_stores {
    ($($name:ident),* $(,)?) => {
        $(
            mod $name {
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn sqlite() {
                    let (store, _guard) = crate::scheduler::tests::sqlite();
                    super::$name(store).await;
                }

                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn mongo() {
                    let Some((store, _guard)) = crate::scheduler::tests::mongo().await else {
                        return;
                    };
                    super::$name(store).await;
                }
            }
        )*
    };
}

on_both_stores!(
    a_lost_workers_tasks_are_requeued_and_placed_on_another_worker_within_grace,
    a_lost_task_with_no_attempt_left_fails_with_worker_lost,
    a_returning_worker_is_reactivated_and_its_late_finish_is_rejected,
    an_expired_claim_is_cleared_and_the_task_placed,
    drift_is_repaired_once_it_has_settled_and_counted,
    a_drift_is_not_repaired_within_a_claim_lease,
    an_in_flight_reservation_is_not_repaired_away,
    a_stalled_placement_keeps_its_assignment_while_claimed_and_loses_it_with_its_claim,
    a_running_task_past_its_timeout_fails_and_is_released_once,
    a_running_task_left_without_its_assignment_is_queued_again,
    two_reconcilers_on_one_store_only_the_lease_holder_acts,
    the_lease_moves_to_another_replica_when_its_holder_stops_or_dies,
);

fn scheduler(store: &Arc<dyn Store>, wakeup: &Wakeup) -> Scheduler {
    Scheduler::new(
        store.clone(),
        policies(),
        wakeup.clone(),
        scheduler_config(),
    )
}

/// A queued task asking for `cpu` cores and 1 GB, with `max_attempts` and `timeout_s`.
async fn queued(store: &dyn Store, cpu: f64, max_attempts: u32, timeout_s: Option<u64>) -> Task {
    let mut task = sample_task(&unique_id("task"), "alice");
    task.status = TaskStatus::Queued;
    (task.req_cpu, task.req_memory, task.req_storage) = (cpu, 1.0, 0.0);
    task.max_attempts = max_attempts;
    task.timeout_s = timeout_s;
    store.insert_task(&task, None).await.unwrap().task
}

async fn assignments_of(store: &dyn Store, task_id: &str) -> Vec<Assignment> {
    store
        .list_assignments(&AssignmentFilter {
            task_id: Some(task_id.to_string()),
            ..AssignmentFilter::default()
        })
        .await
        .unwrap()
}

/// A simulated worker agent's heartbeat, as the API records it.
async fn beat(store: &Arc<dyn Store>, wakeup: &Wakeup, worker_id: &str) -> crate::model::Worker {
    let worker = store
        .heartbeat(worker_id, model::now().timestamp(), None)
        .await
        .unwrap();
    if worker.is_active {
        worker
    } else {
        worker_returned(&lifecycle(store, wakeup), worker_id)
            .await
            .unwrap()
    }
}

/// Heartbeats every 200 ms until the flag is cleared.
fn keep_beating(store: &Arc<dyn Store>, wakeup: &Wakeup, worker_id: &str) -> Arc<AtomicBool> {
    let alive = Arc::new(AtomicBool::new(true));
    let (store, wakeup, worker_id, flag) = (
        store.clone(),
        wakeup.clone(),
        worker_id.to_string(),
        alive.clone(),
    );
    tokio::spawn(async move {
        while flag.load(Ordering::Relaxed) {
            beat(&store, &wakeup, &worker_id).await;
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });
    alive
}

// ------------------------------------------------------------------------------------------

async fn a_lost_workers_tasks_are_requeued_and_placed_on_another_worker_within_grace(
    store: Arc<dyn Store>,
) {
    let wakeup = Wakeup::new();
    let w1 = add_worker(&*store, Resources::new(4.0, 8.0, 10.0, 0.0)).await;
    let a = queued(&*store, 2.0, 3, None).await;
    let b = queued(&*store, 2.0, 3, None).await;
    scheduler(&store, &wakeup).cycle().await;
    let old_a = active_of(&*store, &a.task_id).await;
    let old_b = active_of(&*store, &b.task_id).await;
    assert_eq!(
        (old_a.worker_id.as_str(), old_b.worker_id.as_str()),
        (w1.worker_id.as_str(), w1.worker_id.as_str())
    );
    let w2 = add_worker(&*store, Resources::new(4.0, 8.0, 10.0, 0.0)).await;
    let w2_alive = keep_beating(&store, &wakeup, &w2.worker_id);
    // w1 never heartbeats again: its last heartbeat is now.
    let silent_since = Instant::now();

    let (stop, stopped) = tokio::sync::watch::channel(false);
    let until_stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let r = reconciler(&store, &wakeup, Duration::from_secs(5));
    let counters = r.counters();
    let reconciling = tokio::spawn(r.run(until_stopped(stopped.clone())));
    let scheduling = tokio::spawn(scheduler(&store, &wakeup).run(until_stopped(stopped)));

    let deadline = GRACE + Duration::from_secs(5);
    loop {
        let placed = [&a, &b]
            .iter()
            .map(|t| t.task_id.clone())
            .collect::<Vec<_>>();
        let mut on_w2 = 0;
        for id in &placed {
            let task = store.get_task(id).await.unwrap();
            let active = active_assignments(
                &*store,
                AssignmentFilter {
                    task_id: Some(id.clone()),
                    ..AssignmentFilter::default()
                },
            )
            .await;
            if task.status == TaskStatus::Running
                && active.len() == 1
                && active[0].worker_id == w2.worker_id
            {
                on_w2 += 1;
            }
        }
        if on_w2 == 2 {
            break;
        }
        assert!(
            silent_since.elapsed() < deadline,
            "not re-placed within grace + 5 s ({deadline:?}); counters {:?}",
            counters.repairs()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    eprintln!(
        "{}: re-placed on another worker {:?} after the last heartbeat (grace {GRACE:?})",
        store.backend_name(),
        silent_since.elapsed()
    );
    stop.send(true).unwrap();
    reconciling.await.unwrap();
    scheduling.await.unwrap();
    w2_alive.store(false, Ordering::Relaxed);

    let lost = store.get_worker(&w1.worker_id).await.unwrap();
    assert!(!lost.is_active);
    assert_eq!(
        lost.allocated(),
        Resources::default(),
        "w1's reservations returned"
    );
    for (task, old) in [(&a, &old_a), (&b, &old_b)] {
        let after = store.get_task(&task.task_id).await.unwrap();
        assert_eq!(after.attempts, 2, "the second attempt");
        let old = store.get_assignment(&old.ass_id).await.unwrap();
        assert!(old.released, "the lost assignment is released");
        assert_eq!(assignments_of(&*store, &task.task_id).await.len(), 2);
    }
    assert_accounting(&*store).await;
    let repairs = counters.repairs();
    assert_eq!(repairs.workers_lost, 1, "{repairs:?}");
    assert_eq!(repairs.tasks_requeued, 2, "{repairs:?}");
    assert_eq!(repairs.reservations_released, 2, "{repairs:?}");
    assert_eq!(repairs.drift_repaired, 0, "{repairs:?}");
}

async fn a_lost_task_with_no_attempt_left_fails_with_worker_lost(store: Arc<dyn Store>) {
    let wakeup = Wakeup::new();
    let w = add_worker(&*store, Resources::new(4.0, 8.0, 10.0, 0.0)).await;
    let once = queued(&*store, 1.0, 1, None).await;
    let twice = queued(&*store, 1.0, 2, None).await;
    scheduler(&store, &wakeup).cycle().await;
    go_silent(&*store, &w.worker_id).await;
    let mut r = reconciler(&store, &wakeup, Duration::from_secs(5));
    let repairs = held_tick(&mut r).await;
    assert_eq!(
        (
            repairs.workers_lost,
            repairs.tasks_failed_lost,
            repairs.tasks_requeued,
            repairs.reservations_released
        ),
        (1, 1, 1, 2),
        "{repairs:?}"
    );
    let failed = store.get_task(&once.task_id).await.unwrap();
    assert_eq!(failed.status, TaskStatus::Failed);
    assert_eq!(failed.error.as_deref(), Some(WORKER_LOST));
    assert!(failed.completed_at.is_some());
    let requeued = store.get_task(&twice.task_id).await.unwrap();
    assert_eq!(
        (requeued.status, requeued.attempts),
        (TaskStatus::Queued, 1)
    );
    assert!(requeued.status_reason.unwrap().contains(&w.worker_id));
    assert_eq!(
        store.get_worker(&w.worker_id).await.unwrap().allocated(),
        Resources::default()
    );
    assert_accounting(&*store).await;
    // Nothing more to do: a second pass repairs nothing.
    assert_eq!(held_tick(&mut r).await, Repairs::default());
}

async fn a_returning_worker_is_reactivated_and_its_late_finish_is_rejected(store: Arc<dyn Store>) {
    let wakeup = Wakeup::new();
    let w1 = add_worker(&*store, Resources::new(4.0, 8.0, 10.0, 0.0)).await;
    let task = queued(&*store, 4.0, 3, None).await;
    let s = scheduler(&store, &wakeup);
    s.cycle().await;
    let lost = active_of(&*store, &task.task_id).await;
    assert_eq!(lost.worker_id, w1.worker_id);

    go_silent(&*store, &w1.worker_id).await;
    let w2 = add_worker(&*store, Resources::new(4.0, 8.0, 10.0, 0.0)).await;
    let mut r = reconciler(&store, &wakeup, Duration::from_secs(5));
    assert_eq!(held_tick(&mut r).await.tasks_requeued, 1);
    s.cycle().await;
    let current = active_of(&*store, &task.task_id).await;
    assert_eq!(
        (current.worker_id.as_str(), current.attempt),
        (w2.worker_id.as_str(), 2)
    );

    // w1 comes back: active again, nothing assigned, the scheduler woken.
    let _ = tokio::time::timeout(Duration::from_millis(10), wakeup.woken()).await;
    let back = beat(&store, &wakeup, &w1.worker_id).await;
    assert!(back.is_active);
    assert_eq!(back.allocated(), Resources::default());
    tokio::time::timeout(Duration::from_secs(1), wakeup.woken())
        .await
        .expect("a returning worker wakes the scheduler");

    // Its late report for the lost attempt is refused and changes nothing.
    let before = store.get_task(&task.task_id).await.unwrap();
    let late = lifecycle(&store, &wakeup)
        .finish_attempt(
            &lost.ass_id,
            Finish::Completed { exit_code: 0 },
            Cause::Worker,
        )
        .await;
    assert!(matches!(late, Err(StoreError::Conflict { .. })), "{late:?}");
    assert_eq!(store.get_task(&task.task_id).await.unwrap(), before);
    assert!(
        !store
            .get_assignment(&current.ass_id)
            .await
            .unwrap()
            .released
    );
    assert_accounting(&*store).await;

    // The current attempt's report applies, once.
    let done = lifecycle(&store, &wakeup)
        .finish_attempt(
            &current.ass_id,
            Finish::Completed { exit_code: 0 },
            Cause::Worker,
        )
        .await
        .unwrap();
    assert_eq!((done.status, done.attempts), (TaskStatus::Completed, 2));
    let again = lifecycle(&store, &wakeup)
        .finish_attempt(
            &current.ass_id,
            Finish::Completed { exit_code: 0 },
            Cause::Worker,
        )
        .await;
    assert!(
        matches!(again, Err(StoreError::Conflict { .. })),
        "{again:?}"
    );
    assert_accounting(&*store).await;
    for w in [&w1, &w2] {
        assert_eq!(
            store.get_worker(&w.worker_id).await.unwrap().allocated(),
            Resources::default()
        );
    }
}

async fn an_expired_claim_is_cleared_and_the_task_placed(store: Arc<dyn Store>) {
    let wakeup = Wakeup::new();
    add_worker(&*store, Resources::new(4.0, 8.0, 10.0, 0.0)).await;
    let task = queued(&*store, 1.0, 3, None).await;
    // A replica claimed it and died before placing it.
    let now = model::now();
    store
        .claim_task(
            &task.task_id,
            "host-dead",
            now - chrono::Duration::seconds(1),
            now,
        )
        .await
        .unwrap();
    let mut r = reconciler(&store, &wakeup, Duration::from_secs(5));
    assert_eq!(held_tick(&mut r).await.claims_cleared, 1);
    let cleared = store.get_task(&task.task_id).await.unwrap();
    assert_eq!(
        (cleared.status, cleared.owner, cleared.lease_expires_at),
        (TaskStatus::Queued, None, None)
    );
    assert_eq!(held_tick(&mut r).await.claims_cleared, 0, "cleared once");
    scheduler(&store, &wakeup).cycle().await;
    assert_eq!(
        store.get_task(&task.task_id).await.unwrap().status,
        TaskStatus::Running
    );
    assert_accounting(&*store).await;
}

async fn drift_is_repaired_once_it_has_settled_and_counted(store: Arc<dyn Store>) {
    let wakeup = Wakeup::new();
    let settle = Duration::from_millis(300);
    let leaky = add_worker(&*store, Resources::new(4.0, 8.0, 10.0, 0.0)).await;
    queued(&*store, 2.0, 3, None).await;
    scheduler(&store, &wakeup).cycle().await;
    let short = add_worker(&*store, Resources::new(4.0, 8.0, 10.0, 0.0)).await;
    queued(&*store, 1.0, 3, None).await;
    store.set_draining(&leaky.worker_id, true).await.unwrap();
    scheduler(&store, &wakeup).cycle().await;
    store.set_draining(&leaky.worker_id, false).await.unwrap();
    assert_accounting(&*store).await;
    // A reservation that never got its assignment (a crash between the two writes), and one
    // returned without its assignment being released.
    let leak = Resources::new(1.0, 1.0, 0.0, 0.0);
    assert!(store.reserve(&leaky.worker_id, &leak).await.unwrap());
    let held = store
        .get_worker(&short.worker_id)
        .await
        .unwrap()
        .allocated();
    assert!(
        store
            .unreserve(&short.worker_id, &held, None)
            .await
            .unwrap()
    );

    let mut r = reconciler(&store, &wakeup, settle);
    assert_eq!(held_tick(&mut r).await.drift_repaired, 0, "not settled yet");
    tokio::time::sleep(settle + Duration::from_millis(100)).await;
    assert_eq!(held_tick(&mut r).await.drift_repaired, 2);
    assert_accounting(&*store).await;
    assert_eq!(
        store
            .get_worker(&leaky.worker_id)
            .await
            .unwrap()
            .allocated(),
        Resources::new(2.0, 1.0, 0.0, 0.0)
    );
    assert_eq!(
        store
            .get_worker(&short.worker_id)
            .await
            .unwrap()
            .allocated(),
        held
    );
    tokio::time::sleep(settle + Duration::from_millis(100)).await;
    assert_eq!(held_tick(&mut r).await.drift_repaired, 0);
    assert_eq!(r.counters().repairs().drift_repaired, 2);
}

/// A reservation may wait for its assignment as long as the placement's claim holds: a
/// drift is left alone for the claim lease on top of `settle`.
async fn a_drift_is_not_repaired_within_a_claim_lease(store: Arc<dyn Store>) {
    let wakeup = Wakeup::new();
    let settle = Duration::from_millis(100);
    let claim_lease = Duration::from_millis(1200);
    let w = add_worker(&*store, Resources::new(4.0, 8.0, 10.0, 0.0)).await;
    assert!(
        store
            .reserve(&w.worker_id, &Resources::new(1.0, 1.0, 0.0, 0.0))
            .await
            .unwrap()
    );
    let mut r = reconciler_with_claim_lease(&store, &wakeup, settle, claim_lease);
    assert_eq!(held_tick(&mut r).await.drift_repaired, 0);
    tokio::time::sleep(settle * 4).await;
    assert_eq!(
        held_tick(&mut r).await.drift_repaired,
        0,
        "past settle but within the claim lease"
    );
    tokio::time::sleep(claim_lease).await;
    assert_eq!(held_tick(&mut r).await.drift_repaired, 1);
    assert_accounting(&*store).await;
}

async fn an_in_flight_reservation_is_not_repaired_away(store: Arc<dyn Store>) {
    let wakeup = Wakeup::new();
    // Long enough that two passes 100 ms apart stay within it on a loaded machine (each pass
    // reads every worker and assignment: slow on FerretDB under load).
    let settle = Duration::from_millis(1500);
    let w = add_worker(&*store, Resources::new(4.0, 8.0, 10.0, 0.0)).await;
    let task = queued(&*store, 2.0, 3, None).await;
    let mut r = reconciler(&store, &wakeup, settle);
    // A placement by hand, with reconciler passes between its writes.
    let now = model::now();
    store
        .claim_task(
            &task.task_id,
            "host-a",
            now + chrono::Duration::seconds(30),
            now,
        )
        .await
        .unwrap();
    assert!(store.reserve(&w.worker_id, &task.request()).await.unwrap());
    assert_eq!(held_tick(&mut r).await, Repairs::default());
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(held_tick(&mut r).await, Repairs::default());
    let assignment = sample_assignment(
        &unique_id("ass"),
        &task.task_id,
        &w.worker_id,
        task.request(),
    );
    store.insert_assignment(&assignment).await.unwrap();
    assert_eq!(held_tick(&mut r).await, Repairs::default());
    store
        .mark_running(&task.task_id, "host-a", 1)
        .await
        .unwrap();
    tokio::time::sleep(settle + Duration::from_millis(100)).await;
    beat(&store, &wakeup, &w.worker_id).await;
    assert_eq!(held_tick(&mut r).await, Repairs::default());
    assert_eq!(
        store.get_worker(&w.worker_id).await.unwrap().allocated(),
        task.request()
    );
    assert!(
        !store
            .get_assignment(&assignment.ass_id)
            .await
            .unwrap()
            .released
    );
    assert_accounting(&*store).await;
}

/// A placement that stalls between its assignment and `mark_running` for longer than
/// `settle` (a loaded store) keeps its assignment while its claim holds; once the claim's lease
/// expires the claim is cleared, the assignment released once, and the stalled placement can
/// no longer mark the task running.
async fn a_stalled_placement_keeps_its_assignment_while_claimed_and_loses_it_with_its_claim(
    store: Arc<dyn Store>,
) {
    let wakeup = Wakeup::new();
    let settle = Duration::from_millis(200);
    let w = add_worker(&*store, Resources::new(4.0, 8.0, 10.0, 0.0)).await;
    let task = queued(&*store, 2.0, 3, None).await;
    let mut r = reconciler(&store, &wakeup, settle);
    let now = model::now();
    let lease = chrono::Duration::milliseconds(1500);
    store
        .claim_task(&task.task_id, "host-a/1", now + lease, now)
        .await
        .unwrap();
    assert!(store.reserve(&w.worker_id, &task.request()).await.unwrap());
    let assignment = sample_assignment(
        &unique_id("ass"),
        &task.task_id,
        &w.worker_id,
        task.request(),
    );
    store.insert_assignment(&assignment).await.unwrap();
    tokio::time::sleep(settle + Duration::from_millis(200)).await;
    beat(&store, &wakeup, &w.worker_id).await;
    assert_eq!(
        held_tick(&mut r).await,
        Repairs::default(),
        "claimed: still in flight"
    );
    assert!(
        !store
            .get_assignment(&assignment.ass_id)
            .await
            .unwrap()
            .released
    );

    tokio::time::sleep(Duration::from_millis(500)).await;
    beat(&store, &wakeup, &w.worker_id).await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    beat(&store, &wakeup, &w.worker_id).await;
    let mut repairs = held_tick(&mut r).await;
    beat(&store, &wakeup, &w.worker_id).await;
    repairs.add(&held_tick(&mut r).await);
    assert_eq!(
        (repairs.claims_cleared, repairs.orphans_released),
        (1, 1),
        "{repairs:?}"
    );
    assert!(
        store
            .get_assignment(&assignment.ass_id)
            .await
            .unwrap()
            .released
    );
    assert!(
        store
            .mark_running(&task.task_id, "host-a/1", 1)
            .await
            .is_err(),
        "the stalled placement's claim is gone"
    );
    assert_eq!(
        store.get_worker(&w.worker_id).await.unwrap().allocated(),
        Resources::default()
    );
    assert_accounting(&*store).await;
}

async fn a_running_task_past_its_timeout_fails_and_is_released_once(store: Arc<dyn Store>) {
    let wakeup = Wakeup::new();
    let w = add_worker(&*store, Resources::new(4.0, 8.0, 10.0, 0.0)).await;
    let slow = queued(&*store, 1.0, 3, Some(1)).await;
    let patient = queued(&*store, 1.0, 3, Some(3600)).await;
    scheduler(&store, &wakeup).cycle().await;
    // Failed `settle` after its timeout: the worker's own report comes first as a rule.
    let mut r = reconciler(&store, &wakeup, Duration::from_millis(300));
    assert_eq!(
        held_tick(&mut r).await.tasks_timed_out,
        0,
        "within its timeout"
    );
    tokio::time::sleep(Duration::from_millis(1000)).await;
    beat(&store, &wakeup, &w.worker_id).await;
    assert_eq!(
        held_tick(&mut r).await,
        Repairs::default(),
        "within its timeout and the settle time"
    );
    tokio::time::sleep(Duration::from_millis(600)).await;
    // Keep the worker fresh: only the timeout applies.
    beat(&store, &wakeup, &w.worker_id).await;
    let repairs = held_tick(&mut r).await;
    assert_eq!(repairs.tasks_timed_out, 1, "{repairs:?}");
    let failed = store.get_task(&slow.task_id).await.unwrap();
    assert_eq!(failed.status, TaskStatus::Failed);
    assert_eq!(failed.error.as_deref(), Some(TIMEOUT));
    assert!(
        store
            .get_assignment(&assignments_of(&*store, &slow.task_id).await[0].ass_id)
            .await
            .unwrap()
            .released
    );
    assert_eq!(
        store.get_task(&patient.task_id).await.unwrap().status,
        TaskStatus::Running
    );
    assert_eq!(
        store.get_worker(&w.worker_id).await.unwrap().allocated(),
        patient.request(),
        "released once: only the patient task's reservation is left"
    );
    assert_eq!(held_tick(&mut r).await, Repairs::default());
    assert_accounting(&*store).await;
}

async fn a_running_task_left_without_its_assignment_is_queued_again(store: Arc<dyn Store>) {
    let wakeup = Wakeup::new();
    let settle = Duration::from_millis(300);
    add_worker(&*store, Resources::new(4.0, 8.0, 10.0, 0.0)).await;
    let task = queued(&*store, 1.0, 3, None).await;
    scheduler(&store, &wakeup).cycle().await;
    // Its reservation returned while it runs (an orphan release racing a stalled placement).
    let assignment = active_of(&*store, &task.task_id).await;
    assert!(store.release(&assignment.ass_id).await.unwrap());
    let mut r = reconciler(&store, &wakeup, settle);
    assert_eq!(
        held_tick(&mut r).await.tasks_requeued,
        0,
        "young: left alone"
    );
    tokio::time::sleep(settle + Duration::from_millis(100)).await;
    assert_eq!(held_tick(&mut r).await.tasks_requeued, 1);
    let after = store.get_task(&task.task_id).await.unwrap();
    assert_eq!((after.status, after.attempts), (TaskStatus::Queued, 1));
    scheduler(&store, &wakeup).cycle().await;
    assert_eq!(active_of(&*store, &task.task_id).await.attempt, 2);
    assert_eq!(held_tick(&mut r).await, Repairs::default());
    assert_accounting(&*store).await;
}

async fn two_reconcilers_on_one_store_only_the_lease_holder_acts(store: Arc<dyn Store>) {
    let wakeup = Wakeup::new();
    let w = add_worker(&*store, Resources::new(4.0, 8.0, 10.0, 0.0)).await;
    let mut a = reconciler(&store, &wakeup, Duration::from_secs(5));
    let mut b = reconciler(&store, &wakeup, Duration::from_secs(5));
    assert!(
        a.tick().await.unwrap().is_some(),
        "the first takes the lease"
    );
    go_silent(&*store, &w.worker_id).await;
    assert_eq!(b.tick().await.unwrap(), None, "the other does not act");
    assert!(store.get_worker(&w.worker_id).await.unwrap().is_active);
    assert_eq!(a.tick().await.unwrap().unwrap().workers_lost, 1);
    assert_eq!(b.counters().passes(), 0);
    assert_eq!(
        (
            a.counters().leases_acquired(),
            b.counters().leases_acquired()
        ),
        (1, 0)
    );
}

async fn the_lease_moves_to_another_replica_when_its_holder_stops_or_dies(store: Arc<dyn Store>) {
    let wakeup = Wakeup::new();
    let ttl = Duration::from_secs(1);
    let spawn = |r: Reconciler| {
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let counters = r.counters();
        let handle = tokio::spawn(r.run(async {
            let _ = stopped.await;
        }));
        (stop, handle, counters)
    };
    let wait_for_holder = |candidates: Vec<Arc<ReconcilerCounters>>| async move {
        let started = Instant::now();
        loop {
            if let Some(i) = candidates.iter().position(|c| c.holds_lease()) {
                return (i, started.elapsed());
            }
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "nobody took the lease"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };

    // Clean stop: the holder gives the lease up, the other takes it at its next renewal.
    let (stop_a, run_a, a) = spawn(reconciler(&store, &wakeup, Duration::from_secs(5)));
    wait_for_holder(vec![a.clone()]).await;
    let (stop_b, run_b, b) = spawn(reconciler(&store, &wakeup, Duration::from_secs(5)));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(a.holds_lease() && !b.holds_lease(), "one holder at a time");
    stop_a.send(()).unwrap();
    run_a.await.unwrap();
    let (_, took) = wait_for_holder(vec![b.clone()]).await;
    eprintln!(
        "{}: lease taken over {took:?} after a clean stop",
        store.backend_name()
    );
    assert!(
        took < ttl,
        "given up: no need to wait for the TTL ({took:?})"
    );

    // Death: the holder stops renewing without giving the lease up.
    let (_stop_c, run_c, c) = spawn(reconciler(&store, &wakeup, Duration::from_secs(5)));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(b.holds_lease() && !c.holds_lease());
    run_b.abort();
    let _ = run_b.await;
    drop(stop_b);
    let (_, took) = wait_for_holder(vec![c.clone()]).await;
    eprintln!(
        "{}: lease taken over {took:?} after the holder died (TTL {ttl:?})",
        store.backend_name()
    );
    // TTL, plus one renewal tick (ttl / 3 or the interval), plus slack for a slow machine.
    assert!(took < ttl + Duration::from_secs(2), "{took:?}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(c.passes() > 0, "the new holder reconciles");
    run_c.abort();
}

// ------------------------------------------------------------------------------------------
// A replica that dies in the middle of writing a placement round (the crash points listed in
// store/placement.rs): the store is left exactly as that crash leaves it, by running the
// round's steps by hand up to the crash; then the survivors (a reconciler and a scheduler)
// must place every task exactly once, with the accounting exact.

/// Where the dead replica's round stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Crash {
    /// Its tasks claimed, nothing reserved.
    AfterClaims,
    /// Claimed and reserved on the workers, no assignment.
    AfterReserves,
    /// Assignments inserted, the tasks still queued and claimed.
    AfterAssignments,
    /// Half of the tasks marked running.
    DuringMarks,
}

macro_rules! on_both_stores_with_steps {
    ($($name:ident: $crash:ident),* $(,)?) => {
        $(
            mod $name {
                use std::sync::Arc;
                use crate::store::placement::PlacementSteps;
                use crate::store::Store;

                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn sqlite() {
                    let dir = tempfile::tempdir().unwrap();
                    let store = crate::store::sqlite::SqliteStore::open_in_dir(dir.path()).unwrap();
                    let steps: Arc<dyn PlacementSteps> = Arc::new(store.clone());
                    super::survivors_repair_a_round_that_crashed(Arc::new(store), steps, super::Crash::$crash)
                        .await;
                }

                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn mongo() {
                    let Some((store, _guard)) =
                        crate::store::mongo::testing::connect_test_store().await
                    else {
                        return;
                    };
                    // The MongoDB path's own steps (run one at a time here, which FerretDB
                    // 1.x applies as MongoDB does).
                    let steps: Arc<dyn PlacementSteps> = Arc::new(store.clone());
                    let store: Arc<dyn Store> = Arc::new(store);
                    super::survivors_repair_a_round_that_crashed(store, steps, super::Crash::$crash).await;
                }
            }
        )*
    };
}

on_both_stores_with_steps!(
    a_round_that_crashed_after_its_claims_is_repaired: AfterClaims,
    a_round_that_crashed_after_its_reserves_is_repaired: AfterReserves,
    a_round_that_crashed_after_its_assignments_is_repaired: AfterAssignments,
    a_round_that_crashed_while_marking_its_tasks_running_is_repaired: DuringMarks,
);

async fn survivors_repair_a_round_that_crashed(
    store: Arc<dyn Store>,
    steps: Arc<dyn crate::store::placement::PlacementSteps>,
    crash: Crash,
) {
    use crate::model::Assignment;

    let wakeup = Wakeup::new();
    let w1 = add_worker(&*store, Resources::new(4.0, 8.0, 10.0, 0.0)).await;
    let w2 = add_worker(&*store, Resources::new(4.0, 8.0, 10.0, 0.0)).await;
    let beating = [
        keep_beating(&store, &wakeup, &w1.worker_id),
        keep_beating(&store, &wakeup, &w2.worker_id),
    ];
    let mut tasks = Vec::new();
    for _ in 0..6 {
        tasks.push(queued(&*store, 1.0, 3, None).await);
    }
    let worker_of = |i: usize| if i < 3 { &w1.worker_id } else { &w2.worker_id };

    // The dead replica's round, up to its crash. Its claims last `lease`.
    let lease = Duration::from_millis(800);
    let claim = "host-dead/round-1";
    let now = model::now();
    let ids: Vec<(String, u32)> = tasks.iter().map(|t| (t.task_id.clone(), 0)).collect();
    let claimed = steps
        .claim_tasks(&ids, claim, now + chrono_duration(lease), now)
        .await
        .unwrap();
    assert_eq!(claimed.len(), 6);
    let assignments: Vec<Assignment> = tasks
        .iter()
        .enumerate()
        .map(|(i, t)| Assignment::for_next_attempt(t, worker_of(i), claim, now))
        .collect();
    if crash != Crash::AfterClaims {
        let three = Resources::new(3.0, 3.0, 0.0, 0.0);
        assert!(store.reserve(&w1.worker_id, &three).await.unwrap());
        assert!(store.reserve(&w2.worker_id, &three).await.unwrap());
    }
    if matches!(crash, Crash::AfterAssignments | Crash::DuringMarks) {
        steps.insert_assignments(&assignments).await.unwrap();
    }
    let mut marked = std::collections::BTreeSet::new();
    if crash == Crash::DuringMarks {
        marked = steps
            .mark_claimed_running(claim, &assignments[..3], model::now())
            .await
            .unwrap();
        assert_eq!(marked.len(), 3);
    }

    // The survivors: the reconciler (drift repaired after `settle` + the claim lease) and a
    // scheduler placing what it can, until every task runs under exactly one assignment.
    let settle = Duration::from_millis(300);
    let mut r = reconciler_with_claim_lease(&store, &wakeup, settle, lease);
    let s = scheduler(&store, &wakeup);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        r.tick().await.unwrap();
        s.cycle().await;
        let mut settled = true;
        let mut state = Vec::new();
        for task in &tasks {
            let now = store.get_task(&task.task_id).await.unwrap();
            let active = active_assignments(
                &*store,
                AssignmentFilter {
                    task_id: Some(task.task_id.clone()),
                    ..AssignmentFilter::default()
                },
            )
            .await;
            let held = active.len() == 1 && active[0].holds(&now);
            settled &= held;
            state.push(format!(
                "{} {} at attempt {} with {} active assignment(s)",
                task.task_id,
                now.status,
                now.attempts,
                active.len()
            ));
        }
        let workers = store.list_workers().await.unwrap();
        let workers_exact = workers.iter().all(|w| w.invariant_violations().is_empty())
            && workers.iter().map(|w| w.allocated_cpu).sum::<f64>() == 6.0;
        if settled && workers_exact {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{crash:?}: not repaired within 30 s: {state:#?}, workers {:#?}",
            store.list_workers().await.unwrap()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_accounting(&*store).await;
    for (i, task) in tasks.iter().enumerate() {
        let now = store.get_task(&task.task_id).await.unwrap();
        assert_eq!(now.status, TaskStatus::Running);
        if marked.contains(&task.task_id) {
            // Placed by the dead replica before it died: kept as it was.
            assert_eq!(now.placed_by.as_deref(), Some(claim));
            assert_eq!(active_of(&*store, &task.task_id).await, {
                let mut a = assignments[i].clone();
                a.released = false;
                a
            });
        } else {
            assert_ne!(now.placed_by.as_deref(), Some(claim), "{crash:?}");
            // Whatever the dead round inserted for it was released, exactly once.
            for a in assignments_of(&*store, &task.task_id).await {
                if a.placed_by.as_deref() == Some(claim) {
                    assert!(a.released, "{crash:?}: {a:?}");
                }
            }
        }
    }
    for flag in beating {
        flag.store(false, Ordering::Relaxed);
    }
}

// ------------------------------------------------------------------------------------------
// A round whose inserts land after its lease, past a recount of its worker (a store that
// stalls the insert longer than the claim lease plus the settle time): the recount counted
// the worker without the round's reservation. Only a store whose round is several writes can
// be left this way (the MongoDB path, run here against the test server); the embedded store
// writes a round in one transaction.

mod a_round_recounted_before_its_late_insert {
    use super::*;
    use crate::store::placement::{PlacementSteps, PlannedPlacement, RoundPlan, place_in_steps};

    /// The round's own steps, with the insert held until the lease has passed and the worker
    /// recounted meanwhile, as the reconciler's drift repair does (the sum of its active
    /// assignments, conditional on the worker as read).
    struct LateInsert {
        inner: Arc<dyn PlacementSteps>,
        store: Arc<dyn Store>,
        lease_until: chrono::DateTime<chrono::Utc>,
        worker_id: String,
        /// Stop here: the replica dies right after its late insert.
        crash_after_insert: bool,
    }

    #[async_trait::async_trait]
    impl PlacementSteps for LateInsert {
        async fn claim_tasks(
            &self,
            tasks: &[(String, u32)],
            owner: &str,
            lease_until: chrono::DateTime<chrono::Utc>,
            now: chrono::DateTime<chrono::Utc>,
        ) -> crate::store::Result<std::collections::BTreeSet<String>> {
            self.inner.claim_tasks(tasks, owner, lease_until, now).await
        }

        async fn insert_assignments(&self, assignments: &[Assignment]) -> crate::store::Result<()> {
            while model::now() < self.lease_until + chrono::Duration::milliseconds(100) {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            let observed = self.store.get_worker(&self.worker_id).await.unwrap();
            let expected = active_assignments(
                &*self.store,
                AssignmentFilter {
                    worker_id: Some(self.worker_id.clone()),
                    ..AssignmentFilter::default()
                },
            )
            .await
            .iter()
            .fold(Resources::default(), |sum, a| {
                Resources::new(
                    sum.cpu + a.req_cpu,
                    sum.memory + a.req_memory,
                    sum.storage + a.req_storage,
                    sum.gpu + a.req_gpu,
                )
            });
            assert_ne!(observed.allocated(), expected, "the reservation is in");
            assert!(
                self.store
                    .repair_allocation(&observed, &expected)
                    .await
                    .unwrap(),
                "the recount applies"
            );
            self.inner.insert_assignments(assignments).await?;
            if self.crash_after_insert {
                return Err(crate::store::StoreError::backend(
                    "inserting",
                    "the replica died here",
                ));
            }
            Ok(())
        }

        async fn mark_claimed_running(
            &self,
            owner: &str,
            assignments: &[Assignment],
            at: chrono::DateTime<chrono::Utc>,
        ) -> crate::store::Result<std::collections::BTreeSet<String>> {
            assert!(
                !self.crash_after_insert,
                "a dead replica marks nothing running"
            );
            self.inner
                .mark_claimed_running(owner, assignments, at)
                .await
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn starts_none_of_its_tasks_and_the_accounting_stays_exact() {
        late_round(false).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn that_dies_after_the_insert_leaves_orphans_released_without_returning_twice() {
        late_round(true).await;
    }

    async fn late_round(crash_after_insert: bool) {
        let Some((store, _guard)) = crate::store::mongo::testing::connect_test_store().await else {
            return;
        };
        let inner: Arc<dyn PlacementSteps> = Arc::new(store.clone());
        let store: Arc<dyn Store> = Arc::new(store);
        let wakeup = Wakeup::new();
        let w = add_worker(&*store, Resources::new(4.0, 8.0, 10.0, 0.0)).await;
        let beating = keep_beating(&store, &wakeup, &w.worker_id);
        let mut tasks = Vec::new();
        for _ in 0..3 {
            tasks.push(queued(&*store, 1.0, 3, None).await);
        }
        let lease = Duration::from_millis(400);
        let now = model::now();
        let plan = RoundPlan {
            claim: "host-slow/round-1".to_string(),
            lease_until: now + chrono_duration(lease),
            now,
            placements: tasks
                .iter()
                .map(|t| PlannedPlacement {
                    task: t.clone(),
                    worker_id: w.worker_id.clone(),
                })
                .collect(),
        };
        let steps = LateInsert {
            inner,
            store: store.clone(),
            lease_until: plan.lease_until,
            worker_id: w.worker_id.clone(),
            crash_after_insert,
        };
        let outcome = place_in_steps(&*store, &steps, &plan).await.unwrap();
        assert!(outcome.placed.is_empty(), "{outcome:?}");
        assert_eq!(outcome.failed.len(), 3, "{outcome:?}");

        let worker = store.get_worker(&w.worker_id).await.unwrap();
        assert!(worker.invariant_violations().is_empty(), "{worker:?}");
        if !crash_after_insert {
            // The round gave up at once: nothing runs, nothing is held, nothing is claimed.
            assert_eq!(worker.allocated(), Resources::default(), "{worker:?}");
            for task in &tasks {
                let now = store.get_task(&task.task_id).await.unwrap();
                assert_eq!(
                    (now.status, now.owner.as_deref()),
                    (TaskStatus::Queued, None)
                );
                for a in assignments_of(&*store, &task.task_id).await {
                    assert!(a.released, "{a:?}");
                }
            }
            assert_accounting(&*store).await;
        }

        // The survivors: the reconciler releases what the dead round left (its claims expire,
        // its assignments are orphans), a scheduler places every task exactly once, and the
        // worker never holds less than its active assignments.
        let mut r = reconciler_with_claim_lease(&store, &wakeup, Duration::from_millis(300), lease);
        let s = scheduler(&store, &wakeup);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            r.tick().await.unwrap();
            let worker = store.get_worker(&w.worker_id).await.unwrap();
            assert!(worker.invariant_violations().is_empty(), "{worker:?}");
            // What runs is counted (the dead round's orphans may be, for a while, either way).
            let mut running_cpu = 0.0;
            for a in active_assignments(
                &*store,
                AssignmentFilter {
                    worker_id: Some(w.worker_id.clone()),
                    ..AssignmentFilter::default()
                },
            )
            .await
            {
                if a.holds(&store.get_task(&a.task_id).await.unwrap()) {
                    running_cpu += a.req_cpu;
                }
            }
            let worker = store.get_worker(&w.worker_id).await.unwrap();
            assert!(
                worker.allocated_cpu >= running_cpu,
                "running tasks counted out: {running_cpu} cores run, {worker:?}"
            );
            s.cycle().await;
            let mut running = 0;
            for task in &tasks {
                let now = store.get_task(&task.task_id).await.unwrap();
                let mine: Vec<Assignment> = active_assignments(
                    &*store,
                    AssignmentFilter {
                        task_id: Some(task.task_id.clone()),
                        ..AssignmentFilter::default()
                    },
                )
                .await;
                if now.status == TaskStatus::Running && mine.len() == 1 && mine[0].holds(&now) {
                    assert_ne!(now.placed_by.as_deref(), Some(plan.claim.as_str()));
                    running += 1;
                }
            }
            let worker = store.get_worker(&w.worker_id).await.unwrap();
            if running == 3 && worker.allocated_cpu == 3.0 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "not placed exactly within 30 s: {running} running, {worker:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_accounting(&*store).await;
        beating.store(false, Ordering::Relaxed);
    }
}
