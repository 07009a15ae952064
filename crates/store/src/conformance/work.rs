//! Conformance of [`Store::worker_work`]: what a worker's long poll answers.

use chrono::Duration;

use super::{insert, sample_task, unique_id, worker_with};
use crate::model::{Resources, Task, TaskStatus, now};
use crate::{PlannedPlacement, RoundPlan, Store, TaskUpdate};

pub(super) async fn place(
    store: &dyn Store,
    worker_id: &str,
    user: &str,
) -> (Task, crate::model::Assignment) {
    let mut task = sample_task(&unique_id("task"), user);
    task.status = TaskStatus::Queued;
    (
        task.req_cpu,
        task.req_memory,
        task.req_storage,
        task.req_gpu,
    ) = (1.0, 1.0, 0.0, 0.0);
    place_task(store, worker_id, &task).await
}

/// Inserts `task` (queued) and places it on `worker_id` with one round; returns it running,
/// with its assignment.
pub(super) async fn place_task(
    store: &dyn Store,
    worker_id: &str,
    task: &Task,
) -> (Task, crate::model::Assignment) {
    let task = insert(store, task).await;
    let at = now();
    let plan = RoundPlan {
        claim: unique_id("host-test/round"),
        lease_until: at + Duration::seconds(30),
        now: at,
        placements: vec![PlannedPlacement {
            task,
            worker_id: worker_id.to_string(),
        }],
    };
    let mut outcome = store.place_round(&plan).await.unwrap();
    assert_eq!(outcome.placed.len(), 1, "{outcome:?}");
    outcome.placed.remove(0)
}

pub async fn worker_work_lists_the_assignments_that_hold_their_running_task(store: &dyn Store) {
    let w = worker_with(store, "w", Resources::new(16.0, 64.0, 10.0, 0.0)).await;
    let other = worker_with(store, "w", Resources::new(16.0, 64.0, 10.0, 0.0)).await;
    let user = unique_id("user");
    let (running, a_running) = place(store, &w.worker_id, &user).await;
    let (cancelling, a_cancelling) = place(store, &w.worker_id, &user).await;
    store.request_cancel(&cancelling.task_id).await.unwrap();
    let (finished, a_finished) = place(store, &w.worker_id, &user).await;
    // Finished, its assignment not yet released (a finish in flight).
    store
        .transition_task(
            &finished.task_id,
            &[TaskStatus::Running],
            TaskStatus::Completed,
            &TaskUpdate::default(),
        )
        .await
        .unwrap();
    let (released, a_released) = place(store, &w.worker_id, &user).await;
    assert!(store.release(&a_released.ass_id).await.unwrap());
    // Another placement's assignment left behind at the same attempt (its placement died
    // after inserting it): not the task's.
    let mut stale = a_running.clone();
    stale.ass_id = unique_id("ass-stale");
    stale.placed_by = Some("host-dead/round".into());
    store.insert_assignment(&stale).await.unwrap();
    place(store, &other.worker_id, &user).await;

    let work = store.worker_work(&w.worker_id).await.unwrap();
    let mut expected = vec![a_running.ass_id.clone(), a_cancelling.ass_id.clone()];
    expected.sort();
    let listed: Vec<String> = work.iter().map(|(a, _)| a.ass_id.clone()).collect();
    assert_eq!(
        listed, expected,
        "by ass_id, only the work that holds its task"
    );
    for (a, task) in &work {
        assert_eq!(a.task_id, task.task_id);
        assert!(a.holds(task));
        assert_eq!(a.worker_id, w.worker_id);
    }
    let (_, cancel) = work
        .iter()
        .find(|(a, _)| a.ass_id == a_cancelling.ass_id)
        .unwrap();
    assert!(cancel.cancel_requested, "the cancellation is in the work");
    let (_, run) = work
        .iter()
        .find(|(a, _)| a.ass_id == a_running.ass_id)
        .unwrap();
    assert_eq!((run.status, run.attempts), (TaskStatus::Running, 1));
    assert_eq!(run.task_id, running.task_id);
    for absent in [&a_finished, &a_released] {
        assert!(!listed.contains(&absent.ass_id));
    }
    assert!(
        store
            .worker_work(&unique_id("w-nobody"))
            .await
            .unwrap()
            .is_empty()
    );
    let _ = (finished, released);
}

pub async fn end_attempt_records_the_result_ends_the_task_and_releases_once(store: &dyn Store) {
    let w = worker_with(store, "w", Resources::new(4.0, 8.0, 10.0, 0.0)).await;
    let user = unique_id("user");
    let (task, assignment) = place(store, &w.worker_id, &user).await;
    assert_eq!(
        store.get_worker(&w.worker_id).await.unwrap().allocated_cpu,
        1.0
    );
    let mut result = super::sample_result(&task.task_id, &w.worker_id);
    result.attempt = 1;
    let update = TaskUpdate {
        exit_code: Some(0),
        completed_at: Some(now()),
        ..TaskUpdate::default()
    };
    let end_at = |attempt: u32| {
        store.end_attempt(
            &task.task_id,
            attempt,
            Some(&result),
            TaskStatus::Completed,
            &update,
        )
    };
    // At another attempt: nothing changes.
    let wrong = end_at(2).await;
    assert!(
        matches!(wrong, Err(crate::StoreError::Conflict { .. })),
        "{wrong:?}"
    );
    assert_eq!(
        store.get_task(&task.task_id).await.unwrap().status,
        TaskStatus::Running
    );
    assert_eq!(
        store.get_worker(&w.worker_id).await.unwrap().allocated_cpu,
        1.0
    );

    let ended = end_at(1).await.unwrap();
    assert_eq!(ended.task.status, TaskStatus::Completed);
    assert_eq!(ended.task.exit_code, Some(0));
    assert_eq!(ended.released.len(), 1);
    assert_eq!(ended.released[0].ass_id, assignment.ass_id);
    let stored = store.get_task(&task.task_id).await.unwrap();
    assert_eq!(
        (stored.status, stored.exit_code),
        (TaskStatus::Completed, Some(0))
    );
    assert_eq!(store.get_result(&task.task_id).await.unwrap(), result);
    assert!(
        store
            .get_assignment(&assignment.ass_id)
            .await
            .unwrap()
            .released
    );
    let worker = store.get_worker(&w.worker_id).await.unwrap();
    assert_eq!((worker.allocated_cpu, worker.available_cpu), (0.0, 4.0));

    // Again (a report retried): refused, nothing released twice, the result kept.
    let again = end_at(1).await;
    assert!(
        matches!(again, Err(crate::StoreError::Conflict { .. })),
        "{again:?}"
    );
    let worker = store.get_worker(&w.worker_id).await.unwrap();
    assert_eq!((worker.allocated_cpu, worker.available_cpu), (0.0, 4.0));
    assert_eq!(store.get_result(&task.task_id).await.unwrap(), result);

    // Without a result (the reconciler's timeout).
    let (other, _) = place(store, &w.worker_id, &user).await;
    let failed = store
        .end_attempt(
            &other.task_id,
            1,
            None,
            TaskStatus::Failed,
            &TaskUpdate {
                error: Some("timeout".into()),
                ..TaskUpdate::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(
        (failed.task.status, failed.task.error.as_deref()),
        (TaskStatus::Failed, Some("timeout"))
    );
    assert_eq!(failed.released.len(), 1);
    assert!(matches!(
        store.get_result(&other.task_id).await,
        Err(crate::StoreError::NotFound { .. })
    ));
    assert_eq!(
        store.get_worker(&w.worker_id).await.unwrap().allocated_cpu,
        0.0
    );
}
