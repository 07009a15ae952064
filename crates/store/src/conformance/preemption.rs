//! Conformance of preemption: [`Store::request_preemption`], [`Store::preemptible_running`],
//! [`Store::preemptions_in_progress`] and the end of a preempted attempt.

use super::work::{place, place_task};
use super::{insert, sample_task, unique_id, worker_with};
use crate::model::{Assignment, Resources, Task, TaskStatus};
use crate::{Store, TaskUpdate};

pub async fn preemption_asks_only_running_preemptible_tasks_to_stop_once(store: &dyn Store) {
    let w = worker_with(store, "w", Resources::new(16.0, 64.0, 10.0, 0.0)).await;
    let user = unique_id("user");
    let (low, a_low) = place_with(store, &w.worker_id, &user, 1, true).await;
    let (opted_out, a_opted_out) = place_with(store, &w.worker_id, &user, 1, false).await;
    place_with(store, &w.worker_id, &user, 9, true).await;
    let (cancelling, a_cancelling) = place_with(store, &w.worker_id, &user, 1, true).await;
    store.request_cancel(&cancelling.task_id).await.unwrap();
    let mut queued = sample_task(&unique_id("task"), &user);
    queued.status = TaskStatus::Queued;
    let queued = insert(store, &queued).await;
    let ours = |tasks: Vec<(Task, Assignment)>| {
        let mut ids: Vec<(String, String)> = tasks
            .into_iter()
            .filter(|(t, _)| t.user_id == user)
            .map(|(t, a)| (t.task_id, a.ass_id))
            .collect();
        ids.sort();
        ids
    };
    // Below priority 5: only the low one (the high one is above, the opted-out one and the
    // one being cancelled are not offered), with the assignment it runs under.
    assert_eq!(
        ours(store.preemptible_running(5, 10_000).await.unwrap()),
        vec![(low.task_id.clone(), a_low.ass_id.clone())]
    );
    // Below its own priority, nothing of priority 1.
    assert!(ours(store.preemptible_running(1, 10_000).await.unwrap()).is_empty());

    let preemptor = unique_id("task-preemptor");
    let reason = format!("preempted by {preemptor}");
    let marked = store
        .request_preemption(
            &[
                (low.task_id.clone(), a_low.attempt),
                (opted_out.task_id.clone(), a_opted_out.attempt),
                (cancelling.task_id.clone(), a_cancelling.attempt),
                (queued.task_id.clone(), 0),
                (unique_id("task-unknown"), 1),
            ],
            &preemptor,
            &reason,
        )
        .await
        .unwrap();
    assert_eq!(marked, vec![low.task_id.clone()]);
    let stopping = store.get_task(&low.task_id).await.unwrap();
    assert_eq!(stopping.status, TaskStatus::Running, "its worker stops it");
    assert!(stopping.cancel_requested);
    assert_eq!(stopping.preempted_by.as_deref(), Some(preemptor.as_str()));
    assert_eq!(stopping.status_reason.as_deref(), Some(reason.as_str()));
    let untouched = store.get_task(&opted_out.task_id).await.unwrap();
    assert!(!untouched.cancel_requested && untouched.preempted_by.is_none());
    assert_eq!(
        store.get_task(&queued.task_id).await.unwrap().status,
        TaskStatus::Queued
    );
    let cancelling = store.get_task(&cancelling.task_id).await.unwrap();
    assert!(
        cancelling.preempted_by.is_none(),
        "a cancellation stays one"
    );

    // Asked once: not again, and no longer offered.
    let again = store
        .request_preemption(&[(low.task_id.clone(), a_low.attempt)], "another-task", "x")
        .await
        .unwrap();
    assert!(again.is_empty());
    assert_eq!(
        store
            .get_task(&low.task_id)
            .await
            .unwrap()
            .preempted_by
            .as_deref(),
        Some(preemptor.as_str())
    );
    assert!(ours(store.preemptible_running(5, 10_000).await.unwrap()).is_empty());
    // On its last attempt (it could not run again): neither offered nor marked.
    let (last, a_last) = place(store, &w.worker_id, &user).await;
    assert_eq!((last.max_attempts, a_last.attempt), (1, 1));
    assert!(
        !ours(store.preemptible_running(5, 10_000).await.unwrap())
            .iter()
            .any(|(id, _)| *id == last.task_id)
    );
    let none = store
        .request_preemption(&[(last.task_id.clone(), a_last.attempt)], "x", "x")
        .await
        .unwrap();
    assert!(none.is_empty());
    // At another attempt: nothing.
    let (other, a_other) = place_with(store, &w.worker_id, &user, 1, true).await;
    let stale = store
        .request_preemption(&[(other.task_id.clone(), a_other.attempt + 1)], "x", "x")
        .await
        .unwrap();
    assert!(stale.is_empty());

    let in_progress = store.preemptions_in_progress().await.unwrap();
    assert_eq!(in_progress.get(&preemptor), Some(&1));

    // The owner's cancel wins over the preemption under way: the stop ends the task.
    let cancelled = store.request_cancel(&low.task_id).await.unwrap();
    assert!(cancelled.cancel_requested && cancelled.preempted_by.is_none());
    assert!(
        !store
            .preemptions_in_progress()
            .await
            .unwrap()
            .contains_key(&preemptor)
    );
}

pub async fn a_preempted_task_ends_its_attempt_queued_again_and_released_once(store: &dyn Store) {
    let w = worker_with(store, "w", Resources::new(4.0, 8.0, 10.0, 0.0)).await;
    let user = unique_id("user");
    let (victim, a_victim) = place_with(store, &w.worker_id, &user, 0, true).await;
    let preemptor = unique_id("task-preemptor");
    let marked = store
        .request_preemption(
            &[(victim.task_id.clone(), a_victim.attempt)],
            &preemptor,
            "preempted",
        )
        .await
        .unwrap();
    assert_eq!(marked.len(), 1);
    let update = TaskUpdate {
        status_reason: Some(Some(format!("preempted by {preemptor}; queued again"))),
        clear_preemption: true,
        clear_claim: true,
        ..TaskUpdate::default()
    };
    let ended = store
        .end_attempt(
            &victim.task_id,
            a_victim.attempt,
            None,
            TaskStatus::Queued,
            &update,
        )
        .await
        .unwrap();
    assert_eq!(ended.task.status, TaskStatus::Queued);
    assert_eq!(ended.task.attempts, 1, "the attempt is counted");
    assert!(!ended.task.cancel_requested, "it runs normally next time");
    assert!(ended.task.preempted_by.is_none());
    assert!(ended.task.completed_at.is_none());
    assert_eq!(ended.released.len(), 1);
    let worker = store.get_worker(&w.worker_id).await.unwrap();
    assert_eq!((worker.allocated_cpu, worker.available_cpu), (0.0, 4.0));
    assert!(
        !store
            .preemptions_in_progress()
            .await
            .unwrap()
            .contains_key(&preemptor)
    );
    // The same stop reported again: refused, nothing released twice.
    let again = store
        .end_attempt(
            &victim.task_id,
            a_victim.attempt,
            None,
            TaskStatus::Queued,
            &update,
        )
        .await;
    assert!(
        matches!(again, Err(crate::StoreError::Conflict { .. })),
        "{again:?}"
    );
    let worker = store.get_worker(&w.worker_id).await.unwrap();
    assert_eq!((worker.allocated_cpu, worker.available_cpu), (0.0, 4.0));
    // No result: the task's result is that of the attempt that ends it.
    assert!(store.get_result(&victim.task_id).await.is_err());
}

/// A running task of `user` on `worker_id` (placed by a round), with `priority` and the
/// opt-out `preemptible`.
async fn place_with(
    store: &dyn Store,
    worker_id: &str,
    user: &str,
    priority: i32,
    preemptible: bool,
) -> (Task, Assignment) {
    let mut task = sample_task(&unique_id("task"), user);
    task.status = TaskStatus::Queued;
    task.priority = priority;
    task.preemptible = preemptible;
    task.max_attempts = 3;
    (task.req_cpu, task.req_memory, task.req_storage) = (1.0, 1.0, 0.0);
    place_task(store, worker_id, &task).await
}
