//! The lifecycle on a real store: the event each change publishes, with its cause, and the
//! repair events that only the reconciler's changes add.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc::UnboundedReceiver;

use super::{Cause, Finish, Lifecycle};
use crate::events::EventSink;
use crate::model::{Resources, TaskStatus};
use crate::policy::AdmissionDecision;
use crate::reconciler::{Reconciler, ReconcilerConfig};
use crate::scheduler::tests::{add_worker, config, policies, sqlite};
use crate::scheduler::{Scheduler, SchedulerConfig, Wakeup};
use crate::store::conformance::{sample_task, unique_id};
use crate::store::{AssignmentFilter, NewEvent, Store};

/// Every event published so far, as `topic.kind` with the interesting fields.
fn drain(events: &mut UnboundedReceiver<NewEvent>) -> Vec<NewEvent> {
    let mut got = Vec::new();
    while let Ok(event) = events.try_recv() {
        got.push(event);
    }
    got
}

fn names(events: &[NewEvent]) -> Vec<String> {
    events
        .iter()
        .map(|e| match e.topic.as_str() {
            "task" if e.kind == "state" => {
                format!("task.state:{}:{}", e.data["status"], e.data["cause"])
            }
            "reconciler" => format!("reconciler.repair:{}", e.data["repair"]),
            _ => format!("{}.{}", e.topic, e.kind),
        })
        .collect()
}

/// A worker and a task placed on it, with the events of both captured from here on.
async fn placed(
    store: &Arc<dyn Store>,
    wakeup: &Wakeup,
    scheduler: SchedulerConfig,
    max_attempts: u32,
) -> (Lifecycle, UnboundedReceiver<NewEvent>, String, String) {
    let (sink, mut events) = EventSink::capture();
    let lifecycle = Lifecycle::new(store.clone(), wakeup.clone()).with_events(sink.clone());
    let worker = add_worker(&**store, Resources::new(4.0, 8.0, 10.0, 0.0)).await;
    let mut task = sample_task(&unique_id("task"), "alice");
    (task.req_cpu, task.req_memory, task.req_storage) = (1.0, 1.0, 0.0);
    task.max_attempts = max_attempts;
    lifecycle.submit(&task, None).await.unwrap();
    let admitted = lifecycle
        .admit(&task, AdmissionDecision::Accept)
        .await
        .unwrap();
    assert!(matches!(admitted, super::Admitted::Queued(_)));
    Scheduler::new(store.clone(), policies(), wakeup.clone(), scheduler)
        .with_events(sink)
        .cycle()
        .await;
    let got = drain(&mut events);
    assert_eq!(
        names(&got),
        [
            "task.submitted",
            "task.state:\"queued\":\"admission\"",
            "task.state:\"running\":\"placement\"",
        ]
    );
    // The placement's event names the worker the task now runs on.
    assert_eq!(got[2].worker_id.as_deref(), Some(worker.worker_id.as_str()));
    assert_eq!(got[2].data["worker_id"], worker.worker_id.as_str());
    (lifecycle, events, task.task_id, worker.worker_id)
}

async fn active_assignment(store: &dyn Store, task_id: &str) -> String {
    let active = store
        .list_assignments(&AssignmentFilter {
            task_id: Some(task_id.to_string()),
            active_only: true,
            ..AssignmentFilter::default()
        })
        .await
        .unwrap();
    assert_eq!(active.len(), 1, "{active:?}");
    active[0].ass_id.clone()
}

/// A worker's report ends the attempt: one state event caused by the worker, no repair.
#[tokio::test]
async fn a_reported_end_is_one_state_event_of_the_worker() {
    let (store, _guard) = sqlite();
    let wakeup = Wakeup::new();
    let (lifecycle, mut events, task_id, _) = placed(&store, &wakeup, config(10), 1).await;
    let ass_id = active_assignment(&*store, &task_id).await;
    let started = lifecycle
        .started(
            &store.get_assignment(&ass_id).await.unwrap(),
            crate::model::now(),
        )
        .await
        .unwrap();
    assert!(started.started_at.is_some());
    let finish = Finish::Completed { exit_code: 0 };
    let done = lifecycle
        .finish_attempt(&ass_id, finish.clone(), Cause::Worker)
        .await
        .unwrap();
    assert_eq!(done.status, TaskStatus::Completed);
    // A repeated report changes nothing and publishes nothing.
    assert!(
        lifecycle
            .finish_attempt(&ass_id, finish, Cause::Worker)
            .await
            .is_err()
    );
    // The start (not a status change) published nothing either.
    assert_eq!(
        names(&drain(&mut events)),
        ["task.state:\"completed\":\"worker\""]
    );
}

/// The reconciler's changes are repairs: a lost worker's task queued again, with the worker
/// named, and its reservation's release.
#[tokio::test]
async fn a_lost_workers_task_requeued_by_the_reconciler_is_a_repair() {
    let (store, _guard) = sqlite();
    let wakeup = Wakeup::new();
    let staleness = SchedulerConfig {
        heartbeat_staleness: Duration::from_secs(1),
        ..config(10)
    };
    let (lifecycle, mut events, task_id, worker_id) =
        placed(&store, &wakeup, staleness.clone(), 2).await;
    let old = crate::model::now().timestamp() - 60;
    store.heartbeat(&worker_id, old, None).await.unwrap();
    let mut reconciler = Reconciler::new(
        store.clone(),
        wakeup.clone(),
        &staleness,
        ReconcilerConfig::default(),
    )
    .with_events(lifecycle.events().clone());
    let repairs = reconciler.tick().await.unwrap().expect("the lease is free");
    assert_eq!((repairs.workers_lost, repairs.tasks_requeued), (1, 1));
    let got = drain(&mut events);
    assert_eq!(
        names(&got),
        [
            "worker.lost",
            "reconciler.repair:\"worker_lost\"",
            "task.state:\"queued\":\"repair\"",
            "reconciler.repair:\"task_requeued\"",
            "reconciler.repair:\"assignment_released\"",
        ]
    );
    // The requeue's repair names the lost worker.
    assert_eq!(got[3].worker_id.as_deref(), Some(worker_id.as_str()));
    assert_eq!(got[3].task_id.as_deref(), Some(task_id.as_str()));
}

/// The same loss seen through the worker's own heartbeat (it came back before a pass): the
/// task's change is caused by the returning worker, and nothing is published as a repair.
#[tokio::test]
async fn a_returning_workers_lost_task_is_not_a_repair() {
    let (store, _guard) = sqlite();
    let wakeup = Wakeup::new();
    let (lifecycle, mut events, _task_id, worker_id) = placed(&store, &wakeup, config(10), 2).await;
    // Lost by a reconciler pass that repaired nothing else yet.
    let stale_before = crate::model::now().timestamp() + 1;
    let repair = Cause::Repair {
        worker_id: Some(&worker_id),
    };
    assert!(
        lifecycle
            .lose_worker(&worker_id, stale_before, repair)
            .await
            .unwrap()
    );
    let back = crate::reconciler::worker_returned(&lifecycle, &worker_id)
        .await
        .unwrap();
    assert!(back.is_active);
    assert_eq!(
        names(&drain(&mut events)),
        [
            "worker.lost",
            "reconciler.repair:\"worker_lost\"",
            "task.state:\"queued\":\"worker_returned\"",
            "worker.reactivated",
        ]
    );
}

/// Cancelling waiting tasks: one event each, caused by the request; a task that moved on is
/// left alone and publishes nothing.
#[tokio::test]
async fn cancelling_waiting_tasks_publishes_one_event_per_cancelled_task() {
    let (store, _guard) = sqlite();
    let (sink, mut events) = EventSink::capture();
    let lifecycle = Lifecycle::new(store.clone(), Wakeup::new()).with_events(sink);
    let mut ids = Vec::new();
    for _ in 0..3 {
        let task = sample_task(&unique_id("task"), "alice");
        lifecycle.submit(&task, None).await.unwrap();
        ids.push(task.task_id);
    }
    let first = lifecycle.cancel(&ids[0], "alice").await.unwrap();
    assert_eq!(first.status_reason.as_deref(), Some("cancelled by alice"));
    let rest = lifecycle
        .cancel_many(&ids, "alice (array a)")
        .await
        .unwrap();
    assert_eq!(rest.len(), 2, "the first one was cancelled already");
    assert_eq!(
        names(&drain(&mut events)),
        [
            "task.submitted",
            "task.submitted",
            "task.submitted",
            "task.state:\"cancelled\":\"request\"",
            "task.state:\"cancelled\":\"request\"",
            "task.state:\"cancelled\":\"request\"",
        ]
    );
}
