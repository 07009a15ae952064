//! The store conformance suite: one set of behaviour tests that every [`Store`] backend
//! must pass, run against SQLite and MongoDB alike through [`store_conformance_tests!`].
//!
//! Each test is a public async function named after the behaviour it checks. Most take
//! `&dyn Store`; the concurrency tests take `Arc<dyn Store>` because they spawn tokio tasks
//! that must own a handle to the store. Every test works on a fresh, empty store and does
//! not depend on any other test; ids are unique per test (and listings are filtered by a
//! per-test user), so the tests also pass when several share one database.
//!
//! The suite is test support behind the `test-support` feature (not only `cfg(test)`), so
//! that the integration-test crate and the benches can use it and its sample builders; the
//! product is built without it.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::sync::Arc;

use chrono::{DateTime, Utc};

use super::{
    AssignmentFilter, EventBounds, IdempotencyKey, NewEvent, POLICY_CHUNK_BYTES, Result,
    RuntimeSample, Store, StoreError, TaskCounts, TaskCursor, TaskLogChunk, TaskQuery, TaskUpdate,
    sha256_hex,
};
use crate::model::{
    Assignment, PolicyKind, PolicyVersion, RESOURCE_QUANTUM, Resources, ResultStatus, Task,
    TaskResult, TaskStatus, Worker, WorkerUsage, now, quantize,
};

mod placement;
mod preemption;
mod work;
pub use placement::*;
pub use preemption::*;
pub use work::*;

// ------------------------------------------------------------------------------------------
// Harness
// ------------------------------------------------------------------------------------------

/// A store under test, shared, plus whatever must stay alive while it is used (a `TempDir`,
/// a server process guard, ...). The guard is dropped after the store.
pub struct TestStore {
    store: Arc<dyn Store>,
    _guard: Option<Box<dyn std::any::Any + Send + Sync>>,
}

impl TestStore {
    pub fn new(store: impl Store) -> Self {
        TestStore::from_arc(Arc::new(store))
    }

    pub fn from_arc(store: Arc<dyn Store>) -> Self {
        TestStore {
            store,
            _guard: None,
        }
    }

    /// Keeps `guard` alive as long as this store (e.g. the `TempDir` holding its files).
    pub fn with_guard(mut self, guard: impl std::any::Any + Send + Sync) -> Self {
        self._guard = Some(Box::new(guard));
        self
    }

    pub fn store(&self) -> &dyn Store {
        &*self.store
    }

    pub fn shared(&self) -> Arc<dyn Store> {
        Arc::clone(&self.store)
    }
}

/// What the `$make` future of [`store_conformance_tests!`](crate::store_conformance_tests) may yield. `None` skips the test
/// (e.g. no MongoDB address configured).
pub trait IntoTestStore {
    fn into_test_store(self) -> Option<TestStore>;
}

impl IntoTestStore for TestStore {
    fn into_test_store(self) -> Option<TestStore> {
        Some(self)
    }
}

impl IntoTestStore for Arc<dyn Store> {
    fn into_test_store(self) -> Option<TestStore> {
        Some(TestStore::from_arc(self))
    }
}

impl IntoTestStore for Box<dyn Store> {
    fn into_test_store(self) -> Option<TestStore> {
        Some(TestStore::from_arc(Arc::from(self)))
    }
}

/// A store and the guard that must outlive it, e.g. `(MongoStore, DropDatabase)`.
impl<S: Store, G: std::any::Any + Send + Sync> IntoTestStore for (S, G) {
    fn into_test_store(self) -> Option<TestStore> {
        Some(TestStore::new(self.0).with_guard(self.1))
    }
}

impl<T: IntoTestStore> IntoTestStore for Option<T> {
    fn into_test_store(self) -> Option<TestStore> {
        self.and_then(IntoTestStore::into_test_store)
    }
}

/// Expands, inside the caller's test module, to one
/// `#[tokio::test(flavor = "multi_thread", worker_threads = 4)]` per conformance test.
///
/// Contract: `$make` is an expression that evaluates to a *future*; it is evaluated afresh
/// for every test and must yield a fresh, empty store as one of:
/// - a [`TestStore`](crate::conformance::TestStore) (use
///   `TestStore::new(store).with_guard(temp_dir)` to keep files alive during the test),
/// - an `Arc<dyn Store>` or a `Box<dyn Store>`,
/// - a tuple `(store, guard)`: any concrete `Store` and a value kept alive until the test
///   ends (dropped after the store),
/// - an `Option` of any of these: `None` skips the test (prints a line to stderr), which is
///   how a backend without a configured server opts out locally.
///
/// The generated test functions are named like the suite's functions, so the calling module
/// must not define or import items with those names. The caller needs `tokio` (with the
/// `macros` and `rt-multi-thread` features) as a dependency.
///
/// ```ignore
/// #[cfg(test)]
/// mod tests {
///     use crate::conformance::TestStore;
///     crate::store_conformance_tests!(async {
///         let dir = tempfile::tempdir().unwrap();
///         let store = SqliteStore::open_in_dir(dir.path()).unwrap();
///         TestStore::new(store).with_guard(dir)
///     });
/// }
/// ```
#[macro_export]
macro_rules! store_conformance_tests {
    ($make:expr) => {
        $crate::store_conformance_tests!(@borrowed $make;
            ping_answers,
            insert_and_get_task_round_trips_every_field,
            get_task_unknown_is_not_found,
            insert_task_with_taken_id_is_already_exists,
            insert_tasks_stores_an_array_counted_listed_and_replayed_by_its_key,
            transition_tasks_moves_only_the_tasks_in_the_states_given,
            tasks_awaiting_dependencies_are_kept_from_admission_until_released,
            list_tasks_is_newest_first_with_task_id_tie_break,
            list_tasks_filters_by_status_and_user,
            list_tasks_pages_visit_every_task_exactly_once,
            list_tasks_pages_with_status_filter_visit_every_match_once,
            idempotent_insert_with_same_digest_returns_first_task,
            idempotent_insert_with_other_digest_is_mismatch,
            idempotency_keys_are_independent_per_user,
            idempotent_insert_with_taken_task_id_records_no_key,
            task_lifecycle_pending_queued_running_completed,
            task_lifecycle_running_to_failed,
            pending_and_queued_tasks_can_be_cancelled,
            transition_from_wrong_state_is_conflict_and_not_applied,
            transition_unknown_task_is_not_found,
            transition_applies_task_update_fields,
            claim_task_follows_owner_and_lease_rules,
            request_cancel_applies_only_to_running_tasks,
            insert_get_list_workers,
            heartbeat_records_time_and_usage_without_reactivating,
            set_draining_and_set_worker_active,
            delete_worker_refused_while_an_assignment_is_active,
            reserve_moves_allocated_and_available_together,
            reserve_refuses_when_any_resource_is_short,
            reserve_refuses_inactive_and_draining_workers,
            reserve_unknown_worker_is_not_found,
            reserve_and_release_of_inexact_decimals_restore_exact_values,
            release_applies_exactly_once,
            insert_get_list_assignments,
            insert_and_get_results_one_per_task,
            recent_runtimes_are_successful_runs_newest_first,
            policy_bytes_round_trip_in_chunks_and_empty,
            policy_bytes_with_wrong_sha256_are_refused,
            insert_policy_version_with_taken_name_and_version_is_already_exists,
            list_policy_versions_by_name_then_upload_time,
            activate_policy_is_a_compare_and_swap,
            activate_policy_refuses_a_version_of_another_kind_or_unknown,
            delete_policy_version_refused_while_active,
            policy_version_limits_round_trip_and_default_to_none,
            clear_active_policy_is_a_compare_and_swap,
            user_usage_counts_open_tasks_and_sums_running_requests,
            running_counts_count_only_running_tasks_of_the_users_asked,
            admission_batch_is_due_pending_tasks_least_recently_updated_first,
            claimable_tasks_are_in_queue_order_without_claimed_or_excluded_users,
            active_assignment_counts_count_unreleased_assignments_per_worker,
            mark_running_requires_the_owners_claim,
            unclaim_task_gives_up_only_the_owners_claim,
            unreserve_returns_an_unassigned_reservation_and_never_goes_below_zero,
            lease_is_renewed_by_its_holder_and_taken_by_another_only_after_expiry,
            mark_worker_lost_applies_only_to_an_active_worker_with_a_stale_heartbeat,
            transition_attempt_applies_only_at_that_attempt,
            clear_expired_claims_clears_only_expired_claims_of_queued_tasks,
            repair_allocation_applies_only_to_the_observed_values,
            log_chunks_are_stored_once_and_listed_in_order_after_a_position,
            output_files_round_trip_in_chunks_and_are_replaced_by_path,
            events_get_increasing_ids_and_read_back_in_order,
            events_read_except_known_ids_covers_the_rest,
            pruning_removes_old_events_as_a_prefix,
            task_counts_count_every_status_and_follow_transitions,
            count_assignments_since_counts_only_assignments_at_or_after_the_instant,
            place_round_places_every_task_with_its_assignment_and_reservation,
            place_round_loses_tasks_claimed_moved_or_stale_and_leaves_them_as_they_were,
            place_round_reserves_task_by_task_when_a_worker_refuses_the_sum,
            place_round_loses_the_tasks_of_a_draining_inactive_or_unknown_worker,
            place_round_of_nothing_does_nothing,
            round_reads_take_the_fair_batch_and_the_workers_only_when_there_is_work,
            worker_work_lists_the_assignments_that_hold_their_running_task,
            end_attempt_records_the_result_ends_the_task_and_releases_once,
            preemption_asks_only_running_preemptible_tasks_to_stop_once,
            a_preempted_task_ends_its_attempt_queued_again_and_released_once,
        );
        $crate::store_conformance_tests!(@shared $make;
            reserve_race_50_requests_for_room_for_7,
            concurrent_releases_each_apply_exactly_once,
            concurrent_transitions_have_exactly_one_winner,
            concurrent_claims_have_exactly_one_winner,
            concurrent_activations_have_exactly_one_winner,
            concurrent_lease_takers_have_exactly_one_winner,
            concurrent_event_appends_get_distinct_ids,
            concurrent_rounds_on_the_same_workers_never_overcommit_or_place_twice,
        );
    };
    (@borrowed $make:expr; $($name:ident),* $(,)?) => {
        $(
            #[::tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn $name() {
                let Some(harness) =
                    $crate::conformance::IntoTestStore::into_test_store($make.await)
                else {
                    eprintln!("skipped {}: no store configured", stringify!($name));
                    return;
                };
                $crate::conformance::$name(harness.store()).await;
            }
        )*
    };
    (@shared $make:expr; $($name:ident),* $(,)?) => {
        $(
            #[::tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn $name() {
                let Some(harness) =
                    $crate::conformance::IntoTestStore::into_test_store($make.await)
                else {
                    eprintln!("skipped {}: no store configured", stringify!($name));
                    return;
                };
                $crate::conformance::$name(harness.shared()).await;
            }
        )*
    };
}

// ------------------------------------------------------------------------------------------
// Sample data
// ------------------------------------------------------------------------------------------

/// A fresh id with `prefix`, unique across tests and runs.
pub fn unique_id(prefix: &str) -> String {
    format!("{prefix}-{}", uuid::Uuid::now_v7().simple())
}

/// A fixed instant plus `offset_ms`, for tests that need controlled timestamps.
pub fn at_ms(offset_ms: i64) -> DateTime<Utc> {
    // 2025-11-16T10:30:00Z, the seed's example date.
    DateTime::from_timestamp_millis(1_763_289_000_000 + offset_ms).unwrap()
}

/// A pending task with every optional field empty.
pub fn sample_task(task_id: &str, user_id: &str) -> Task {
    Task {
        command: Some("echo hello world".to_string()),
        max_attempts: 1,
        ..Task::new_pending(
            task_id.to_string(),
            user_id.to_string(),
            "docker.io/library/alpine:3.20".to_string(),
            Resources::new(1.0, 2.0, 1.0, 0.0),
        )
    }
}

/// A task in `status`, created at `created_at`.
pub fn sample_task_at(
    task_id: &str,
    user_id: &str,
    status: TaskStatus,
    created_at: DateTime<Utc>,
) -> Task {
    Task {
        status,
        created_at,
        updated_at: created_at,
        ..sample_task(task_id, user_id)
    }
}

/// An active worker with `total` capacity and nothing allocated.
pub fn sample_worker(worker_id: &str, total: Resources) -> Worker {
    Worker::new(
        worker_id.to_string(),
        "127.0.0.1:50052".to_string(),
        total,
        BTreeMap::from([("zone".to_string(), "local".to_string())]),
        "0".repeat(64),
    )
}

/// An unreleased assignment holding `request`.
pub fn sample_assignment(
    ass_id: &str,
    task_id: &str,
    worker_id: &str,
    request: Resources,
) -> Assignment {
    Assignment {
        ass_id: ass_id.to_string(),
        task_id: task_id.to_string(),
        worker_id: worker_id.to_string(),
        assigned_at: now(),
        req_cpu: request.cpu,
        req_memory: request.memory,
        req_storage: request.storage,
        req_gpu: request.gpu,
        attempt: 1,
        released: false,
        released_at: None,
        placed_by: None,
        reserved_epoch: None,
    }
}

/// A successful result.
pub fn sample_result(task_id: &str, worker_id: &str) -> TaskResult {
    TaskResult {
        task_id: task_id.to_string(),
        worker_id: worker_id.to_string(),
        status: ResultStatus::Success,
        logs: "Hello World\nTask completed successfully\n".to_string(),
        completed_at: now(),
        exit_code: Some(0),
        error: None,
        logs_truncated: false,
        stderr: "a warning\n".to_string(),
        stderr_truncated: false,
        oom_killed: false,
        attempt: 1,
        runtime_s: Some(2.5),
        task_type: Some("busybox:latest".to_string()),
    }
}

/// A policy version of `kind` for `bytes`, uploaded at `uploaded_at`, with its digest.
pub fn sample_policy(
    name: &str,
    version: &str,
    kind: PolicyKind,
    bytes: &[u8],
    uploaded_at: DateTime<Utc>,
) -> PolicyVersion {
    PolicyVersion {
        name: name.to_string(),
        version: version.to_string(),
        kind,
        sha256: sha256_hex(bytes),
        size_bytes: bytes.len() as u64,
        config: r#"{"threshold":0.8}"#.to_string(),
        uploaded_at,
        uploaded_by: "admin".to_string(),
        memory_bytes: None,
        deadline_ms: None,
    }
}

/// `len` bytes that differ from chunk to chunk, so that a reordered or repeated chunk shows.
pub fn sample_policy_bytes(len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i % 251) as u8 ^ (i >> 20) as u8)
        .collect()
}

// ------------------------------------------------------------------------------------------
// Assertion helpers
// ------------------------------------------------------------------------------------------

fn expect_not_found<T: Debug>(result: Result<T>, what: &str) {
    match result {
        Err(StoreError::NotFound { .. }) => {}
        other => panic!("{what}: expected NotFound, got {other:?}"),
    }
}

fn expect_already_exists<T: Debug>(result: Result<T>, what: &str) {
    match result {
        Err(StoreError::AlreadyExists { .. }) => {}
        other => panic!("{what}: expected AlreadyExists, got {other:?}"),
    }
}

/// Returns the `actual` of a Conflict.
fn expect_conflict<T: Debug>(result: Result<T>, what: &str) -> String {
    match result {
        Err(StoreError::Conflict { actual, .. }) => actual,
        other => panic!("{what}: expected Conflict, got {other:?}"),
    }
}

fn assert_invariant(worker: &Worker, when: &str) {
    let violations = worker.invariant_violations();
    assert!(
        violations.is_empty(),
        "accounting invariant broken {when}: {violations:?}"
    );
}

/// The invariant (docs/consistency.md): a worker's `allocated_*` equals the sum of its active assignments' requests
/// (exactly: quantized amounts add exactly in any order).
async fn assert_allocated_matches_assignments(store: &dyn Store, worker_id: &str, when: &str) {
    let worker = store.get_worker(worker_id).await.unwrap();
    assert_invariant(&worker, when);
    let active = store
        .list_assignments(&AssignmentFilter {
            worker_id: Some(worker_id.to_string()),
            active_only: true,
            ..AssignmentFilter::default()
        })
        .await
        .unwrap();
    let mut sum = Resources::default();
    for a in &active {
        sum.cpu += a.req_cpu;
        sum.memory += a.req_memory;
        sum.storage += a.req_storage;
        sum.gpu += a.req_gpu;
    }
    assert_eq!(
        worker.allocated(),
        sum,
        "allocated != sum of {} active assignment(s) {when}",
        active.len()
    );
}

async fn worker_with(store: &dyn Store, prefix: &str, total: Resources) -> Worker {
    let worker = sample_worker(&unique_id(prefix), total);
    store.insert_worker(&worker).await.unwrap();
    worker
}

async fn insert(store: &dyn Store, task: &Task) -> Task {
    let outcome = store.insert_task(task, None).await.unwrap();
    assert!(outcome.created, "a new task must be reported as created");
    outcome.task
}

fn query(user_id: &str, status: Option<TaskStatus>, limit: u32) -> TaskQuery {
    TaskQuery {
        status,
        user_id: Some(user_id.to_string()),
        limit,
        after: None,
        array_id: None,
    }
}

fn ids(tasks: &[Task]) -> Vec<String> {
    tasks.iter().map(|t| t.task_id.clone()).collect()
}

/// Follows `next` cursors from `query` to the end; checks every page's size.
async fn all_pages(store: &dyn Store, mut query: TaskQuery) -> Vec<Task> {
    let mut out = Vec::new();
    for _ in 0..1000 {
        let page = store.list_tasks(&query).await.unwrap();
        assert!(
            page.tasks.len() <= query.limit as usize,
            "a page holds at most `limit` tasks: got {} for limit {}",
            page.tasks.len(),
            query.limit
        );
        out.extend(page.tasks);
        match page.next {
            Some(cursor) => query.after = Some(cursor),
            None => return out,
        }
    }
    panic!("pagination did not terminate after 1000 pages");
}

/// Newest first: created_at desc, then task_id desc.
fn newest_first(tasks: &[Task]) -> Vec<String> {
    let mut sorted: Vec<&Task> = tasks.iter().collect();
    sorted.sort_by(|a, b| {
        b.created_at
            .cmp(&a.created_at)
            .then_with(|| b.task_id.cmp(&a.task_id))
    });
    sorted.iter().map(|t| t.task_id.clone()).collect()
}

// ------------------------------------------------------------------------------------------
// Tasks
// ------------------------------------------------------------------------------------------

pub async fn ping_answers(store: &dyn Store) {
    store.ping().await.unwrap();
    assert!(!store.backend_name().is_empty());
}

pub async fn insert_and_get_task_round_trips_every_field(store: &dyn Store) {
    let mut task = sample_task(&unique_id("task"), &unique_id("user"));
    task.command = None;
    task.req_cpu = quantize(0.1);
    task.req_memory = 1.5;
    task.req_storage = 10.0;
    task.req_gpu = 1.0;
    task.status = TaskStatus::Running;
    task.created_at = at_ms(123);
    task.started_at = Some(at_ms(5_456));
    task.completed_at = Some(at_ms(9_999));
    task.priority = -7;
    task.labels = BTreeMap::from([
        ("team".to_string(), "ml".to_string()),
        ("quote".to_string(), "a \"b\" 'c' ü".to_string()),
    ]);
    task.env = BTreeMap::from([("PATH".to_string(), "/usr/bin:/bin".to_string())]);
    task.timeout_s = Some(3_600);
    task.max_attempts = 3;
    task.attempts = 2;
    task.exit_code = Some(-9);
    task.error = Some("killed".to_string());
    task.status_reason = Some("because".to_string());
    task.cancel_requested = true;
    task.owner = Some("host-a".to_string());
    task.lease_expires_at = Some(at_ms(60_000));
    task.idempotency_key = Some("key-1".to_string());
    task.updated_at = at_ms(10_001);
    task.preemptible = false;
    task.preempted_by = Some("task-preemptor".to_string());

    let outcome = store.insert_task(&task, None).await.unwrap();
    assert!(outcome.created);
    assert_eq!(outcome.task, task, "insert_task returns the stored task");
    assert_eq!(store.get_task(&task.task_id).await.unwrap(), task);

    // And the minimal shape: every option empty.
    let plain = sample_task(&unique_id("task"), &task.user_id);
    insert(store, &plain).await;
    assert_eq!(store.get_task(&plain.task_id).await.unwrap(), plain);
}

pub async fn get_task_unknown_is_not_found(store: &dyn Store) {
    expect_not_found(store.get_task(&unique_id("nope")).await, "get_task unknown");
}

pub async fn insert_task_with_taken_id_is_already_exists(store: &dyn Store) {
    let user = unique_id("user");
    let task = sample_task(&unique_id("task"), &user);
    insert(store, &task).await;
    let mut other = sample_task(&task.task_id, &unique_id("user"));
    other.docker_image = "other:latest".to_string();
    expect_already_exists(
        store.insert_task(&other, None).await,
        "insert_task with a taken task_id",
    );
    assert_eq!(
        store.get_task(&task.task_id).await.unwrap(),
        task,
        "the first task is unchanged"
    );
}

/// An array of `count` pending tasks of `user`.
fn sample_array(user: &str, count: u32) -> Vec<Task> {
    let template = sample_task(&unique_id("task"), user);
    let array_id = crate::model::new_array_id();
    (0..count)
        .map(|i| crate::model::array_task(&template, &array_id, i, count))
        .collect()
}

pub async fn insert_tasks_stores_an_array_counted_listed_and_replayed_by_its_key(
    store: &dyn Store,
) {
    let user = unique_id("user");
    let tasks = sample_array(&user, 12);
    let array_id = tasks[0].array_id.clone().unwrap();
    let key = IdempotencyKey {
        key: unique_id("key"),
        request_sha256: "a".repeat(64),
    };
    let outcome = store.insert_tasks(&tasks, Some(&key)).await.unwrap();
    assert!(outcome.created);
    assert_eq!(
        outcome.task, tasks[0],
        "the outcome is the array's first task"
    );
    for task in &tasks {
        assert_eq!(&store.get_task(&task.task_id).await.unwrap(), task);
    }
    // Index order is id order (zero-padded), and the env says the index.
    assert_eq!(tasks[3].env["CLOUDAI_ARRAY_INDEX"], "3");
    assert!(
        tasks[2].task_id < tasks[10].task_id,
        "{} < {}",
        tasks[2].task_id,
        tasks[10].task_id
    );

    let summary = store.array_summary(&array_id).await.unwrap();
    assert_eq!(summary.user_id, user);
    assert_eq!(summary.docker_image, tasks[0].docker_image);
    assert_eq!(summary.counts.pending, 12);
    assert_eq!(summary.counts.queue_depth(), 12);

    let page = store
        .list_tasks(&TaskQuery {
            array_id: Some(array_id.clone()),
            limit: 5,
            ..TaskQuery::default()
        })
        .await
        .unwrap();
    assert_eq!(page.tasks.len(), 5);
    assert!(page.next.is_some());
    assert!(
        page.tasks
            .iter()
            .all(|t| t.array_id.as_deref() == Some(array_id.as_str()))
    );
    // Another user's tasks and another array are not in the listing.
    let other = sample_array(&user, 2);
    store.insert_tasks(&other, None).await.unwrap();
    let all = store
        .list_tasks(&TaskQuery {
            array_id: Some(array_id.clone()),
            limit: 100,
            ..TaskQuery::default()
        })
        .await
        .unwrap();
    assert_eq!(all.tasks.len(), 12);

    // The same key and digest: the first array, nothing new.
    let retry = sample_array(&user, 12);
    let replay = store.insert_tasks(&retry, Some(&key)).await.unwrap();
    assert!(!replay.created);
    assert_eq!(replay.task.task_id, tasks[0].task_id);
    expect_not_found(
        store
            .array_summary(retry[0].array_id.as_deref().unwrap())
            .await,
        "the retry's array was not created",
    );
    // The same key with another digest is refused.
    let other_digest = IdempotencyKey {
        request_sha256: "b".repeat(64),
        ..key.clone()
    };
    assert!(matches!(
        store
            .insert_tasks(&sample_array(&user, 3), Some(&other_digest))
            .await,
        Err(StoreError::IdempotencyMismatch { .. })
    ));
    expect_not_found(store.array_summary("array-none").await, "an unknown array");

    // All or none: an array with a taken id stores nothing.
    let mut clashing = sample_array(&user, 4);
    clashing[2].task_id = tasks[5].task_id.clone();
    expect_already_exists(
        store.insert_tasks(&clashing, None).await,
        "an array with a taken task id",
    );
    if store.backend_name() == "sqlite" {
        expect_not_found(
            store
                .array_summary(clashing[0].array_id.as_deref().unwrap())
                .await,
            "nothing of a refused array",
        );
    }
    assert_eq!(store.get_task(&tasks[5].task_id).await.unwrap(), tasks[5]);
}

pub async fn transition_tasks_moves_only_the_tasks_in_the_states_given(store: &dyn Store) {
    let user = unique_id("user");
    let tasks = sample_array(&user, 6);
    let array_id = tasks[0].array_id.clone().unwrap();
    store.insert_tasks(&tasks, None).await.unwrap();
    // Task 0 is queued already, task 1 cancelled: only the pending ones move.
    store
        .transition_task(
            &tasks[0].task_id,
            &[TaskStatus::Pending],
            TaskStatus::Queued,
            &TaskUpdate::default(),
        )
        .await
        .unwrap();
    store
        .transition_task(
            &tasks[1].task_id,
            &[TaskStatus::Pending],
            TaskStatus::Cancelled,
            &TaskUpdate::default(),
        )
        .await
        .unwrap();
    let mut ids: Vec<String> = tasks.iter().map(|t| t.task_id.clone()).collect();
    ids.push(unique_id("absent"));
    let update = TaskUpdate {
        status_reason: Some(Some("admitted together".to_string())),
        ..TaskUpdate::default()
    };
    let moved = store
        .transition_tasks(&ids, &[TaskStatus::Pending], TaskStatus::Queued, &update)
        .await
        .unwrap();
    let mut moved_ids: Vec<&str> = moved.iter().map(|t| t.task_id.as_str()).collect();
    moved_ids.sort_unstable();
    let expected: Vec<&str> = tasks[2..].iter().map(|t| t.task_id.as_str()).collect();
    assert_eq!(moved_ids, expected);
    for task in &moved {
        assert_eq!(task.status, TaskStatus::Queued);
        assert_eq!(task.status_reason.as_deref(), Some("admitted together"));
        assert_eq!(store.get_task(&task.task_id).await.unwrap(), *task);
    }
    let counts = store.array_summary(&array_id).await.unwrap().counts;
    assert_eq!((counts.pending, counts.queued, counts.cancelled), (0, 5, 1));
    assert_eq!(
        store
            .get_task(&tasks[0].task_id)
            .await
            .unwrap()
            .status_reason,
        None,
        "a task not in `from` is left alone"
    );
}

pub async fn tasks_awaiting_dependencies_are_kept_from_admission_until_released(store: &dyn Store) {
    let user = unique_id("user");
    let first = insert(store, &sample_task(&unique_id("task"), &user)).await;
    let dependency = crate::model::Dependency {
        task_id: Some(first.task_id.clone()),
        array_id: None,
        condition: crate::model::DependencyCondition::Finished,
    };
    let mut waiting = Vec::new();
    for _ in 0..3 {
        let mut task = sample_task(&unique_id("task"), &user);
        task.after = vec![dependency.clone()];
        task.awaiting_dependencies = true;
        task.status_reason = Some("waiting for the first".to_string());
        waiting.push(insert(store, &task).await);
    }
    assert_eq!(
        store.get_task(&waiting[0].task_id).await.unwrap(),
        waiting[0],
        "after and awaiting round-trip"
    );
    waiting.sort_by(|a, b| a.task_id.cmp(&b.task_id));
    let due = store
        .admission_batch(100, now() + chrono::Duration::seconds(60))
        .await
        .unwrap();
    let due: Vec<&str> = due
        .iter()
        .filter(|t| t.user_id == user)
        .map(|t| t.task_id.as_str())
        .collect();
    assert_eq!(
        due,
        vec![first.task_id.as_str()],
        "only the free task is due for admission"
    );

    // Another list of dependencies, awaited by one task.
    let two = vec![
        dependency.clone(),
        crate::model::Dependency {
            task_id: None,
            array_id: Some("array-x".to_string()),
            condition: crate::model::DependencyCondition::Completed,
        },
    ];
    let mut other = sample_task(&unique_id("task"), &user);
    other.after = two.clone();
    other.awaiting_dependencies = true;
    let other = insert(store, &other).await;
    let sets = store.awaiting_dependency_sets(1_000).await.unwrap();
    assert!(sets.contains(&vec![dependency.clone()]), "{sets:?}");
    assert!(sets.contains(&two), "{sets:?}");
    assert_eq!(
        sets.iter().filter(|s| **s == two).count(),
        1,
        "distinct: {sets:?}"
    );

    // The tasks of one list, paged by task id.
    let mut seen = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let page = store
            .awaiting_tasks(std::slice::from_ref(&dependency), 2, after.as_deref())
            .await
            .unwrap();
        let Some(last) = page.last() else { break };
        after = Some(last.task_id.clone());
        seen.extend(page.into_iter().map(|t| t.task_id));
    }
    let expected: Vec<String> = waiting.iter().map(|t| t.task_id.clone()).collect();
    assert_eq!(seen, expected);
    let of_two = store.awaiting_tasks(&two, 10, None).await.unwrap();
    assert_eq!(of_two, vec![other.clone()]);

    let ids = vec![
        waiting[0].task_id.clone(),
        waiting[1].task_id.clone(),
        first.task_id.clone(),
    ];
    let released = store.release_tasks(&ids).await.unwrap();
    let released_ids: Vec<&str> = released.iter().map(|t| t.task_id.as_str()).collect();
    assert_eq!(
        released_ids,
        vec![waiting[0].task_id.as_str(), waiting[1].task_id.as_str()],
        "the free task is not released again"
    );
    for task in &released {
        assert!(!task.awaiting_dependencies);
        assert_eq!(task.status_reason, None);
        assert_eq!(task.status, TaskStatus::Pending);
        assert_eq!(
            task.after,
            vec![dependency.clone()],
            "the dependencies stay visible"
        );
    }
    assert!(
        store.release_tasks(&ids[..1]).await.unwrap().is_empty(),
        "released once"
    );
    let due = store
        .admission_batch(100, now() + chrono::Duration::seconds(60))
        .await
        .unwrap();
    assert_eq!(due.iter().filter(|t| t.user_id == user).count(), 3);
    let left = store
        .awaiting_tasks(std::slice::from_ref(&dependency), 100, None)
        .await
        .unwrap();
    let left: Vec<&str> = left.iter().map(|t| t.task_id.as_str()).collect();
    assert_eq!(left, vec![waiting[2].task_id.as_str()]);
}

pub async fn list_tasks_is_newest_first_with_task_id_tie_break(store: &dyn Store) {
    let user = unique_id("user");
    let base = unique_id("task");
    // Inserted out of order; two pairs share created_at.
    let tasks = vec![
        sample_task_at(
            &format!("{base}-b"),
            &user,
            TaskStatus::Pending,
            at_ms(2_000),
        ),
        sample_task_at(
            &format!("{base}-a"),
            &user,
            TaskStatus::Queued,
            at_ms(3_000),
        ),
        sample_task_at(
            &format!("{base}-c"),
            &user,
            TaskStatus::Running,
            at_ms(1_000),
        ),
        sample_task_at(
            &format!("{base}-d"),
            &user,
            TaskStatus::Pending,
            at_ms(3_000),
        ),
        sample_task_at(
            &format!("{base}-e"),
            &user,
            TaskStatus::Failed,
            at_ms(1_000),
        ),
    ];
    for task in &tasks {
        insert(store, task).await;
    }
    let page = store.list_tasks(&query(&user, None, 100)).await.unwrap();
    assert_eq!(
        ids(&page.tasks),
        vec![
            format!("{base}-d"),
            format!("{base}-a"),
            format!("{base}-b"),
            format!("{base}-e"),
            format!("{base}-c"),
        ],
        "newest first, then task_id descending"
    );
    assert_eq!(page.tasks[0], tasks[3], "listed tasks are complete");
    assert!(page.next.is_none(), "a short page has no next cursor");
}

pub async fn list_tasks_filters_by_status_and_user(store: &dyn Store) {
    let alice = unique_id("alice");
    let bob = unique_id("bob");
    let mut expected_alice_queued = Vec::new();
    for (i, status) in [
        TaskStatus::Pending,
        TaskStatus::Queued,
        TaskStatus::Running,
        TaskStatus::Queued,
        TaskStatus::Completed,
    ]
    .into_iter()
    .enumerate()
    {
        let task = sample_task_at(&unique_id("task"), &alice, status, at_ms(i as i64));
        insert(store, &task).await;
        if status == TaskStatus::Queued {
            expected_alice_queued.push(task);
        }
    }
    let bob_queued = sample_task_at(&unique_id("task"), &bob, TaskStatus::Queued, at_ms(10));
    insert(store, &bob_queued).await;

    let page = store
        .list_tasks(&query(&alice, Some(TaskStatus::Queued), 100))
        .await
        .unwrap();
    assert_eq!(
        ids(&page.tasks),
        newest_first(&expected_alice_queued),
        "status and user filters combine"
    );

    let page = store.list_tasks(&query(&alice, None, 100)).await.unwrap();
    assert_eq!(page.tasks.len(), 5);
    assert!(page.tasks.iter().all(|t| t.user_id == alice));

    let page = store.list_tasks(&query(&bob, None, 100)).await.unwrap();
    assert_eq!(ids(&page.tasks), vec![bob_queued.task_id.clone()]);

    let page = store
        .list_tasks(&query(&bob, Some(TaskStatus::Running), 100))
        .await
        .unwrap();
    assert!(page.tasks.is_empty() && page.next.is_none());

    // Status filter alone (the store may hold other tests' tasks: only check what we know).
    let completed = all_pages(
        store,
        TaskQuery {
            status: Some(TaskStatus::Completed),
            user_id: None,
            limit: 500,
            after: None,
            array_id: None,
        },
    )
    .await;
    assert!(completed.iter().all(|t| t.status == TaskStatus::Completed));
    assert!(completed.iter().any(|t| t.user_id == alice));
}

pub async fn list_tasks_pages_visit_every_task_exactly_once(store: &dyn Store) {
    let user = unique_id("user");
    let mut tasks = Vec::new();
    // 13 tasks in 4 groups of identical created_at, ids not in created order.
    for i in 0..13_i64 {
        let created = at_ms((i % 4) * 1_000);
        let id = format!("task-{:02}-{}", (i * 7) % 13, unique_id("p"));
        tasks.push(sample_task_at(&id, &user, TaskStatus::Pending, created));
    }
    for task in &tasks {
        insert(store, task).await;
    }
    let expected = newest_first(&tasks);
    for limit in [1, 3, 4, 13, 50] {
        let seen = all_pages(store, query(&user, None, limit)).await;
        assert_eq!(
            ids(&seen),
            expected,
            "pages of {limit} visit every task exactly once, newest first"
        );
    }

    // A cursor can also be built by hand from any listed task.
    let cursor_task = tasks.iter().find(|t| t.task_id == expected[5]).unwrap();
    let mut q = query(&user, None, 100);
    q.after = Some(TaskCursor {
        created_at: cursor_task.created_at,
        task_id: cursor_task.task_id.clone(),
    });
    let rest = store.list_tasks(&q).await.unwrap();
    assert_eq!(ids(&rest.tasks), expected[6..].to_vec());
}

pub async fn list_tasks_pages_with_status_filter_visit_every_match_once(store: &dyn Store) {
    let user = unique_id("user");
    let mut queued = Vec::new();
    for i in 0..12_i64 {
        let status = if i % 3 == 0 {
            TaskStatus::Running
        } else {
            TaskStatus::Queued
        };
        let task = sample_task_at(&unique_id("task"), &user, status, at_ms((i % 2) * 500));
        insert(store, &task).await;
        if status == TaskStatus::Queued {
            queued.push(task);
        }
    }
    let seen = all_pages(store, query(&user, Some(TaskStatus::Queued), 3)).await;
    assert_eq!(ids(&seen), newest_first(&queued));
}

fn key(key: &str, digest: &str) -> IdempotencyKey {
    IdempotencyKey {
        key: key.to_string(),
        request_sha256: digest.to_string(),
    }
}

pub async fn idempotent_insert_with_same_digest_returns_first_task(store: &dyn Store) {
    let user = unique_id("user");
    let k = key(&unique_id("key"), &"a".repeat(64));
    let mut first = sample_task(&unique_id("task"), &user);
    first.idempotency_key = Some(k.key.clone());
    let outcome = store.insert_task(&first, Some(&k)).await.unwrap();
    assert!(outcome.created);
    assert_eq!(outcome.task, first);

    let mut retry = sample_task(&unique_id("task"), &user);
    retry.idempotency_key = Some(k.key.clone());
    let outcome = store.insert_task(&retry, Some(&k)).await.unwrap();
    assert!(!outcome.created, "a retry is not a new task");
    assert_eq!(outcome.task, first, "a retry returns the first task");
    expect_not_found(
        store.get_task(&retry.task_id).await,
        "the retry's task must not be stored",
    );
    let page = store.list_tasks(&query(&user, None, 100)).await.unwrap();
    assert_eq!(ids(&page.tasks), vec![first.task_id.clone()]);
}

pub async fn idempotent_insert_with_other_digest_is_mismatch(store: &dyn Store) {
    let user = unique_id("user");
    let k = key(&unique_id("key"), &"a".repeat(64));
    let first = sample_task(&unique_id("task"), &user);
    store.insert_task(&first, Some(&k)).await.unwrap();

    let other = sample_task(&unique_id("task"), &user);
    match store
        .insert_task(&other, Some(&key(&k.key, &"b".repeat(64))))
        .await
    {
        Err(StoreError::IdempotencyMismatch { key, task_id }) => {
            assert_eq!(key, k.key);
            assert_eq!(task_id, first.task_id, "the mismatch names the first task");
        }
        other => panic!("expected IdempotencyMismatch, got {other:?}"),
    }
    expect_not_found(store.get_task(&other.task_id).await, "mismatched task");
    assert_eq!(store.get_task(&first.task_id).await.unwrap(), first);
}

pub async fn idempotency_keys_are_independent_per_user(store: &dyn Store) {
    let k = key(&unique_id("key"), &"a".repeat(64));
    let alice = sample_task(&unique_id("task"), &unique_id("alice"));
    let bob = sample_task(&unique_id("task"), &unique_id("bob"));
    assert!(store.insert_task(&alice, Some(&k)).await.unwrap().created);
    let outcome = store.insert_task(&bob, Some(&k)).await.unwrap();
    assert!(
        outcome.created,
        "another user's identical key is independent"
    );
    assert_eq!(outcome.task, bob);
    // Even with another digest.
    let carol = sample_task(&unique_id("task"), &unique_id("carol"));
    assert!(
        store
            .insert_task(&carol, Some(&key(&k.key, &"c".repeat(64))))
            .await
            .unwrap()
            .created
    );
}

pub async fn idempotent_insert_with_taken_task_id_records_no_key(store: &dyn Store) {
    let user = unique_id("user");
    let existing = sample_task(&unique_id("task"), &user);
    insert(store, &existing).await;
    let k = key(&unique_id("key"), &"a".repeat(64));
    let clash = sample_task(&existing.task_id, &user);
    expect_already_exists(
        store.insert_task(&clash, Some(&k)).await,
        "idempotent insert with a taken task_id",
    );
    // The failed insert must not have recorded the key.
    let fresh = sample_task(&unique_id("task"), &user);
    let outcome = store.insert_task(&fresh, Some(&k)).await.unwrap();
    assert!(
        outcome.created,
        "the key was not consumed by the failed insert"
    );
    assert_eq!(outcome.task, fresh);
}

async fn step(store: &dyn Store, task_id: &str, from: TaskStatus, to: TaskStatus) -> Task {
    let task = store
        .transition_task(task_id, &[from], to, &TaskUpdate::default())
        .await
        .unwrap_or_else(|e| panic!("{from} -> {to} must apply: {e}"));
    assert_eq!(task.status, to);
    assert_eq!(store.get_task(task_id).await.unwrap().status, to);
    task
}

pub async fn task_lifecycle_pending_queued_running_completed(store: &dyn Store) {
    let task = sample_task_at(
        &unique_id("task"),
        &unique_id("user"),
        TaskStatus::Pending,
        at_ms(0),
    );
    insert(store, &task).await;
    step(
        store,
        &task.task_id,
        TaskStatus::Pending,
        TaskStatus::Queued,
    )
    .await;
    step(
        store,
        &task.task_id,
        TaskStatus::Queued,
        TaskStatus::Running,
    )
    .await;
    let done = step(
        store,
        &task.task_id,
        TaskStatus::Running,
        TaskStatus::Completed,
    )
    .await;
    assert!(
        done.updated_at > task.updated_at,
        "transitions set updated_at"
    );
    assert_eq!(done.created_at, task.created_at);
    assert_eq!(done.docker_image, task.docker_image);
}

pub async fn task_lifecycle_running_to_failed(store: &dyn Store) {
    let task = sample_task(&unique_id("task"), &unique_id("user"));
    insert(store, &task).await;
    step(
        store,
        &task.task_id,
        TaskStatus::Pending,
        TaskStatus::Queued,
    )
    .await;
    step(
        store,
        &task.task_id,
        TaskStatus::Queued,
        TaskStatus::Running,
    )
    .await;
    step(
        store,
        &task.task_id,
        TaskStatus::Running,
        TaskStatus::Failed,
    )
    .await;
}

pub async fn pending_and_queued_tasks_can_be_cancelled(store: &dyn Store) {
    let user = unique_id("user");
    let pending = sample_task(&unique_id("task"), &user);
    insert(store, &pending).await;
    step(
        store,
        &pending.task_id,
        TaskStatus::Pending,
        TaskStatus::Cancelled,
    )
    .await;

    let queued = sample_task(&unique_id("task"), &user);
    insert(store, &queued).await;
    step(
        store,
        &queued.task_id,
        TaskStatus::Pending,
        TaskStatus::Queued,
    )
    .await;
    // Several allowed sources in one conditional update.
    let task = store
        .transition_task(
            &queued.task_id,
            &[TaskStatus::Pending, TaskStatus::Queued],
            TaskStatus::Cancelled,
            &TaskUpdate::default(),
        )
        .await
        .unwrap();
    assert_eq!(task.status, TaskStatus::Cancelled);
}

pub async fn transition_from_wrong_state_is_conflict_and_not_applied(store: &dyn Store) {
    let user = unique_id("user");
    let update = TaskUpdate {
        started_at: Some(at_ms(1)),
        completed_at: Some(at_ms(2)),
        exit_code: Some(3),
        error: Some("must not be applied".to_string()),
        status_reason: Some(Some("must not be applied".to_string())),
        increment_attempts: true,
        clear_claim: true,
        clear_preemption: true,
    };

    let task = sample_task(&unique_id("task"), &user);
    insert(store, &task).await;
    // pending -> running skips queued: refused.
    let actual = expect_conflict(
        store
            .transition_task(
                &task.task_id,
                &[TaskStatus::Queued],
                TaskStatus::Running,
                &update,
            )
            .await,
        "queued -> running on a pending task",
    );
    assert_eq!(actual, "pending", "Conflict carries the actual status");
    assert_eq!(
        store.get_task(&task.task_id).await.unwrap(),
        task,
        "a refused transition changes nothing"
    );

    // A terminal task never moves again.
    let done = sample_task_at(&unique_id("task"), &user, TaskStatus::Completed, at_ms(0));
    insert(store, &done).await;
    for (from, to) in [
        (vec![TaskStatus::Running], TaskStatus::Failed),
        (
            vec![TaskStatus::Pending, TaskStatus::Queued],
            TaskStatus::Cancelled,
        ),
        (vec![TaskStatus::Queued], TaskStatus::Queued),
    ] {
        let actual = expect_conflict(
            store
                .transition_task(&done.task_id, &from, to, &update)
                .await,
            "transition of a completed task",
        );
        assert_eq!(actual, "completed");
        assert_eq!(store.get_task(&done.task_id).await.unwrap(), done);
    }

    // Running cannot be cancelled by the pending/queued path.
    let running = sample_task_at(&unique_id("task"), &user, TaskStatus::Running, at_ms(0));
    insert(store, &running).await;
    let actual = expect_conflict(
        store
            .transition_task(
                &running.task_id,
                &[TaskStatus::Pending, TaskStatus::Queued],
                TaskStatus::Cancelled,
                &update,
            )
            .await,
        "cancel of a running task via pending/queued",
    );
    assert_eq!(actual, "running");
    assert_eq!(store.get_task(&running.task_id).await.unwrap(), running);

    // The same transition twice: the second one is refused.
    step(
        store,
        &task.task_id,
        TaskStatus::Pending,
        TaskStatus::Queued,
    )
    .await;
    let actual = expect_conflict(
        store
            .transition_task(
                &task.task_id,
                &[TaskStatus::Pending],
                TaskStatus::Queued,
                &TaskUpdate::default(),
            )
            .await,
        "second pending -> queued",
    );
    assert_eq!(actual, "queued");
}

pub async fn transition_unknown_task_is_not_found(store: &dyn Store) {
    expect_not_found(
        store
            .transition_task(
                &unique_id("nope"),
                &[TaskStatus::Pending],
                TaskStatus::Queued,
                &TaskUpdate::default(),
            )
            .await,
        "transition of an unknown task",
    );
}

pub async fn transition_applies_task_update_fields(store: &dyn Store) {
    let task = sample_task(&unique_id("task"), &unique_id("user"));
    insert(store, &task).await;
    let id = task.task_id.as_str();

    let t = store
        .transition_task(
            id,
            &[TaskStatus::Pending],
            TaskStatus::Queued,
            &TaskUpdate {
                status_reason: Some(Some("waiting for capacity".to_string())),
                ..TaskUpdate::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(t.status_reason.as_deref(), Some("waiting for capacity"));

    store
        .claim_task(id, "host-a", at_ms(60_000), at_ms(0))
        .await
        .unwrap();
    let t = store
        .transition_task(
            id,
            &[TaskStatus::Queued],
            TaskStatus::Running,
            &TaskUpdate {
                started_at: Some(at_ms(1_000)),
                increment_attempts: true,
                clear_claim: true,
                ..TaskUpdate::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(t.started_at, Some(at_ms(1_000)));
    assert_eq!(t.attempts, task.attempts + 1, "increment_attempts adds one");
    assert_eq!(t.owner, None, "clear_claim clears the owner");
    assert_eq!(t.lease_expires_at, None, "clear_claim clears the lease");
    assert_eq!(
        t.status_reason.as_deref(),
        Some("waiting for capacity"),
        "None leaves status_reason alone"
    );
    assert_eq!(t.completed_at, None);
    assert_eq!(t.exit_code, None);
    assert_eq!(t.error, None);

    let t = store
        .transition_task(
            id,
            &[TaskStatus::Running],
            TaskStatus::Failed,
            &TaskUpdate {
                completed_at: Some(at_ms(2_000)),
                exit_code: Some(137),
                error: Some("out of memory".to_string()),
                status_reason: Some(None),
                ..TaskUpdate::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(t.completed_at, Some(at_ms(2_000)));
    assert_eq!(t.exit_code, Some(137));
    assert_eq!(t.error.as_deref(), Some("out of memory"));
    assert_eq!(t.status_reason, None, "Some(None) clears status_reason");
    assert_eq!(
        t.started_at,
        Some(at_ms(1_000)),
        "None leaves started_at alone"
    );
    assert_eq!(
        t.attempts,
        task.attempts + 1,
        "attempts only move when asked"
    );
    assert_eq!(
        store.get_task(id).await.unwrap(),
        t,
        "the returned task is stored"
    );
}

pub async fn claim_task_follows_owner_and_lease_rules(store: &dyn Store) {
    let user = unique_id("user");
    let task = sample_task_at(&unique_id("task"), &user, TaskStatus::Queued, at_ms(0));
    insert(store, &task).await;
    let id = task.task_id.as_str();

    // Unclaimed: ok.
    let t = store
        .claim_task(id, "host-a", at_ms(30_000), at_ms(0))
        .await
        .unwrap();
    assert_eq!(t.owner.as_deref(), Some("host-a"));
    assert_eq!(t.lease_expires_at, Some(at_ms(30_000)));
    assert_eq!(
        t.status,
        TaskStatus::Queued,
        "a claim does not change the status"
    );

    // Same owner: renews.
    let t = store
        .claim_task(id, "host-a", at_ms(40_000), at_ms(10_000))
        .await
        .unwrap();
    assert_eq!(t.lease_expires_at, Some(at_ms(40_000)));

    // Another owner while the lease is valid: refused, nothing changes.
    let before = store.get_task(id).await.unwrap();
    expect_conflict(
        store
            .claim_task(id, "host-b", at_ms(90_000), at_ms(39_999))
            .await,
        "claim by another owner during a valid lease",
    );
    assert_eq!(store.get_task(id).await.unwrap(), before);

    // After expiry: taken over.
    let t = store
        .claim_task(id, "host-b", at_ms(90_000), at_ms(40_001))
        .await
        .unwrap();
    assert_eq!(t.owner.as_deref(), Some("host-b"));
    assert_eq!(t.lease_expires_at, Some(at_ms(90_000)));

    // Cleared claim: anyone may claim.
    store
        .transition_task(
            id,
            &[TaskStatus::Queued],
            TaskStatus::Queued,
            &TaskUpdate {
                clear_claim: true,
                ..TaskUpdate::default()
            },
        )
        .await
        .unwrap();
    let t = store
        .claim_task(id, "host-c", at_ms(95_000), at_ms(50_000))
        .await
        .unwrap();
    assert_eq!(t.owner.as_deref(), Some("host-c"));

    // Not queued: refused with the actual status.
    for status in [
        TaskStatus::Pending,
        TaskStatus::Running,
        TaskStatus::Completed,
    ] {
        let other = sample_task_at(&unique_id("task"), &user, status, at_ms(0));
        insert(store, &other).await;
        let actual = expect_conflict(
            store
                .claim_task(&other.task_id, "host-a", at_ms(30_000), at_ms(0))
                .await,
            "claim of a task that is not queued",
        );
        assert_eq!(actual, status.as_str());
        assert_eq!(store.get_task(&other.task_id).await.unwrap(), other);
    }

    expect_not_found(
        store
            .claim_task(&unique_id("nope"), "host-a", at_ms(30_000), at_ms(0))
            .await,
        "claim of an unknown task",
    );
}

pub async fn request_cancel_applies_only_to_running_tasks(store: &dyn Store) {
    let user = unique_id("user");
    for status in [
        TaskStatus::Pending,
        TaskStatus::Queued,
        TaskStatus::Completed,
        TaskStatus::Failed,
        TaskStatus::Cancelled,
    ] {
        let task = sample_task_at(&unique_id("task"), &user, status, at_ms(0));
        insert(store, &task).await;
        let actual = expect_conflict(
            store.request_cancel(&task.task_id).await,
            "request_cancel of a task that is not running",
        );
        assert_eq!(actual, status.as_str());
        assert_eq!(store.get_task(&task.task_id).await.unwrap(), task);
    }

    let running = sample_task_at(&unique_id("task"), &user, TaskStatus::Running, at_ms(0));
    insert(store, &running).await;
    let t = store.request_cancel(&running.task_id).await.unwrap();
    assert!(t.cancel_requested);
    assert_eq!(
        t.status,
        TaskStatus::Running,
        "the worker stops it, not the store"
    );
    assert!(
        store
            .get_task(&running.task_id)
            .await
            .unwrap()
            .cancel_requested
    );
    // Asking twice is harmless.
    assert!(
        store
            .request_cancel(&running.task_id)
            .await
            .unwrap()
            .cancel_requested
    );

    expect_not_found(
        store.request_cancel(&unique_id("nope")).await,
        "request_cancel of an unknown task",
    );
}

// ------------------------------------------------------------------------------------------
// Workers and reservations
// ------------------------------------------------------------------------------------------

pub async fn insert_get_list_workers(store: &dyn Store) {
    let prefix = unique_id("w");
    let mut b = sample_worker(
        &format!("{prefix}-b"),
        Resources::new(8.0, 16.0, 100.0, 2.0),
    );
    b.usage = Some(WorkerUsage {
        cpu_percent: 12.5,
        memory_percent: 40.25,
        running_tasks: 3,
    });
    b.draining = true;
    b.last_heartbeat = 1_731_753_000;
    b.registered_at = at_ms(1);
    b.updated_at = at_ms(2);
    b.token_sha256 = "f".repeat(64);
    let a = sample_worker(&format!("{prefix}-a"), Resources::new(1.0, 2.0, 3.0, 0.0));
    store.insert_worker(&b).await.unwrap();
    store.insert_worker(&a).await.unwrap();

    assert_eq!(store.get_worker(&b.worker_id).await.unwrap(), b);
    assert_eq!(store.get_worker(&a.worker_id).await.unwrap(), a);

    let listed: Vec<Worker> = store
        .list_workers()
        .await
        .unwrap()
        .into_iter()
        .filter(|w| w.worker_id.starts_with(&prefix))
        .collect();
    assert_eq!(listed, vec![a.clone(), b.clone()], "listed by worker_id");

    expect_already_exists(store.insert_worker(&a).await, "insert_worker twice");
    expect_not_found(
        store.get_worker(&unique_id("nope")).await,
        "get_worker unknown",
    );
}

pub async fn heartbeat_records_time_and_usage_without_reactivating(store: &dyn Store) {
    let w = worker_with(store, "w", Resources::new(4.0, 8.0, 10.0, 0.0)).await;
    store.set_worker_active(&w.worker_id, false).await.unwrap();
    let usage = WorkerUsage {
        cpu_percent: 55.5,
        memory_percent: 10.0,
        running_tasks: 2,
    };
    let before = now();
    let hb = store
        .heartbeat(&w.worker_id, 1_800_000_000, Some(&usage))
        .await
        .unwrap();
    assert_eq!(hb.last_heartbeat, 1_800_000_000);
    assert_eq!(hb.usage, Some(usage));
    assert!(hb.updated_at >= before, "heartbeat sets updated_at");
    assert!(!hb.is_active, "a heartbeat does not re-activate a worker");
    assert_eq!(store.get_worker(&w.worker_id).await.unwrap(), hb);

    // Without usage: the last reported usage stays.
    let hb = store
        .heartbeat(&w.worker_id, 1_800_000_010, None)
        .await
        .unwrap();
    assert_eq!(hb.last_heartbeat, 1_800_000_010);
    assert_eq!(hb.usage, Some(usage));
    assert_eq!(hb.allocated(), w.allocated());
    assert_invariant(&hb, "after heartbeats");

    expect_not_found(
        store.heartbeat(&unique_id("nope"), 1, None).await,
        "heartbeat of an unknown worker",
    );
}

pub async fn set_draining_and_set_worker_active(store: &dyn Store) {
    let w = worker_with(store, "w", Resources::new(4.0, 8.0, 10.0, 0.0)).await;
    let id = w.worker_id.as_str();
    assert!(store.set_draining(id, true).await.unwrap().draining);
    assert!(store.get_worker(id).await.unwrap().draining);
    assert!(!store.set_draining(id, false).await.unwrap().draining);
    assert!(!store.get_worker(id).await.unwrap().draining);

    assert!(!store.set_worker_active(id, false).await.unwrap().is_active);
    assert!(!store.get_worker(id).await.unwrap().is_active);
    assert!(store.set_worker_active(id, true).await.unwrap().is_active);
    let after = store.get_worker(id).await.unwrap();
    assert!(after.is_active);
    assert_eq!(after.total(), w.total());
    assert_eq!(after.available(), w.available());
    assert_invariant(&after, "after flag changes");

    expect_not_found(
        store.set_draining(&unique_id("nope"), true).await,
        "set_draining",
    );
    expect_not_found(
        store.set_worker_active(&unique_id("nope"), true).await,
        "set_worker_active",
    );
}

pub async fn delete_worker_refused_while_an_assignment_is_active(store: &dyn Store) {
    let w = worker_with(store, "w", Resources::new(4.0, 8.0, 10.0, 0.0)).await;
    let request = Resources::new(1.0, 2.0, 1.0, 0.0);
    assert!(store.reserve(&w.worker_id, &request).await.unwrap());
    let a = sample_assignment(&unique_id("ass"), &unique_id("task"), &w.worker_id, request);
    store.insert_assignment(&a).await.unwrap();

    let actual = expect_conflict(
        store.delete_worker(&w.worker_id).await,
        "delete_worker with an active assignment",
    );
    assert!(!actual.is_empty());
    let held = store.get_worker(&w.worker_id).await.unwrap();
    assert_eq!(
        held.allocated(),
        request,
        "a refused delete changes nothing"
    );
    assert_invariant(&held, "after a refused delete");

    assert!(store.release(&a.ass_id).await.unwrap());
    assert_invariant(
        &store.get_worker(&w.worker_id).await.unwrap(),
        "after release",
    );
    store.delete_worker(&w.worker_id).await.unwrap();
    expect_not_found(store.get_worker(&w.worker_id).await, "deleted worker");
    expect_not_found(
        store.delete_worker(&w.worker_id).await,
        "delete_worker twice",
    );
    // The released assignment is history and stays.
    assert!(store.get_assignment(&a.ass_id).await.unwrap().released);
}

pub async fn reserve_moves_allocated_and_available_together(store: &dyn Store) {
    let w = worker_with(store, "w", Resources::new(8.0, 16.0, 100.0, 2.0)).await;
    let request = Resources::new(2.0, 4.0, 10.0, 1.0);
    assert!(store.reserve(&w.worker_id, &request).await.unwrap());
    let after = store.get_worker(&w.worker_id).await.unwrap();
    assert_eq!(after.allocated(), request);
    assert_eq!(after.available(), Resources::new(6.0, 12.0, 90.0, 1.0));
    assert_eq!(after.total(), w.total());
    assert_invariant(&after, "after one reserve");

    assert!(store.reserve(&w.worker_id, &request).await.unwrap());
    let after = store.get_worker(&w.worker_id).await.unwrap();
    assert_eq!(after.allocated(), Resources::new(4.0, 8.0, 20.0, 2.0));
    assert_eq!(after.available(), Resources::new(4.0, 8.0, 80.0, 0.0));
    assert_invariant(&after, "after two reserves");

    // Exactly what is left fits (>=, not >); then nothing more does.
    let rest = Resources::new(4.0, 8.0, 80.0, 0.0);
    assert!(store.reserve(&w.worker_id, &rest).await.unwrap());
    let full = store.get_worker(&w.worker_id).await.unwrap();
    assert_eq!(full.available(), Resources::default());
    assert_eq!(full.allocated(), full.total());
    assert_invariant(&full, "when full");
    let tiny = Resources::new(RESOURCE_QUANTUM, 0.0, 0.0, 0.0);
    assert!(!store.reserve(&w.worker_id, &tiny).await.unwrap());
    assert_eq!(store.get_worker(&w.worker_id).await.unwrap(), full);
}

pub async fn reserve_refuses_when_any_resource_is_short(store: &dyn Store) {
    let total = Resources::new(4.0, 8.0, 20.0, 1.0);
    let over = |which: usize| {
        let mut r = total;
        match which {
            0 => r.cpu += RESOURCE_QUANTUM,
            1 => r.memory += RESOURCE_QUANTUM,
            2 => r.storage += RESOURCE_QUANTUM,
            _ => r.gpu += RESOURCE_QUANTUM,
        }
        r
    };
    for (which, name) in ["cpu", "memory", "storage", "gpu"].into_iter().enumerate() {
        let w = worker_with(store, name, total).await;
        assert!(
            !store.reserve(&w.worker_id, &over(which)).await.unwrap(),
            "reserve must refuse when only {name} is short"
        );
        let after = store.get_worker(&w.worker_id).await.unwrap();
        assert_eq!(after, w, "a refused reserve ({name} short) changes nothing");
        // Everything else was fine: the exact total fits.
        assert!(store.reserve(&w.worker_id, &total).await.unwrap());
        let after = store.get_worker(&w.worker_id).await.unwrap();
        assert_eq!(after.allocated(), total);
        assert_invariant(&after, "after reserving the whole worker");
    }

    // The common case: a GPU request on a worker without GPUs.
    let cpu_only = worker_with(store, "cpu-only", Resources::new(64.0, 256.0, 1000.0, 0.0)).await;
    assert!(
        !store
            .reserve(&cpu_only.worker_id, &Resources::new(1.0, 1.0, 1.0, 1.0))
            .await
            .unwrap()
    );
    assert_eq!(
        store.get_worker(&cpu_only.worker_id).await.unwrap(),
        cpu_only
    );
}

pub async fn reserve_refuses_inactive_and_draining_workers(store: &dyn Store) {
    let request = Resources::new(1.0, 1.0, 1.0, 0.0);
    let w = worker_with(store, "w", Resources::new(4.0, 8.0, 20.0, 0.0)).await;
    let id = w.worker_id.as_str();

    let inactive = store.set_worker_active(id, false).await.unwrap();
    assert!(
        !store.reserve(id, &request).await.unwrap(),
        "inactive worker"
    );
    assert_eq!(store.get_worker(id).await.unwrap(), inactive);
    store.set_worker_active(id, true).await.unwrap();

    let draining = store.set_draining(id, true).await.unwrap();
    assert!(
        !store.reserve(id, &request).await.unwrap(),
        "draining worker"
    );
    assert_eq!(store.get_worker(id).await.unwrap(), draining);
    store.set_draining(id, false).await.unwrap();

    assert!(store.reserve(id, &request).await.unwrap(), "active again");
    let after = store.get_worker(id).await.unwrap();
    assert_eq!(after.allocated(), request);
    assert_invariant(&after, "after reserve");
}

pub async fn reserve_unknown_worker_is_not_found(store: &dyn Store) {
    expect_not_found(
        store
            .reserve(&unique_id("nope"), &Resources::new(1.0, 1.0, 1.0, 0.0))
            .await,
        "reserve on an unknown worker",
    );
}

pub async fn reserve_and_release_of_inexact_decimals_restore_exact_values(store: &dyn Store) {
    let w = worker_with(store, "w", Resources::new(7.3, 15.7, 33.3, 3.0)).await;
    let start = store.get_worker(&w.worker_id).await.unwrap();
    let requests = [
        Resources::new(0.1, 0.2, 0.3, 0.1).quantized(),
        Resources::new(0.2, 0.7, 1.1, 0.0).quantized(),
        Resources::new(0.3, 0.1, 0.01, 0.3).quantized(),
    ];
    let mut assignments = Vec::new();
    for round in 0..4 {
        for (i, request) in requests.iter().enumerate() {
            assert!(
                store.reserve(&w.worker_id, request).await.unwrap(),
                "reserve {round}/{i} fits"
            );
            let a = sample_assignment(
                &unique_id("ass"),
                &unique_id("task"),
                &w.worker_id,
                *request,
            );
            store.insert_assignment(&a).await.unwrap();
            assignments.push(a);
            assert_allocated_matches_assignments(store, &w.worker_id, "after an inexact reserve")
                .await;
        }
    }
    // Release in another order than reserved.
    assignments.reverse();
    assignments.rotate_left(5);
    for a in &assignments {
        assert!(store.release(&a.ass_id).await.unwrap());
        assert_allocated_matches_assignments(store, &w.worker_id, "after an inexact release").await;
    }
    let end = store.get_worker(&w.worker_id).await.unwrap();
    assert_eq!(
        end.allocated(),
        Resources::default(),
        "exactly zero allocated"
    );
    assert_eq!(
        end.available(),
        start.available(),
        "exactly the start values"
    );
    assert_eq!(end.total(), start.total());
}

pub async fn release_applies_exactly_once(store: &dyn Store) {
    let w = worker_with(store, "w", Resources::new(4.0, 8.0, 20.0, 1.0)).await;
    let request = Resources::new(1.5, 2.0, 3.0, 1.0);
    assert!(store.reserve(&w.worker_id, &request).await.unwrap());
    let a = sample_assignment(&unique_id("ass"), &unique_id("task"), &w.worker_id, request);
    store.insert_assignment(&a).await.unwrap();

    assert!(
        store.release(&a.ass_id).await.unwrap(),
        "first release applies"
    );
    let after = store.get_worker(&w.worker_id).await.unwrap();
    assert_eq!(after.allocated(), Resources::default());
    assert_eq!(after.available(), w.available());
    assert_invariant(&after, "after release");
    let released = store.get_assignment(&a.ass_id).await.unwrap();
    assert!(released.released);
    assert!(released.released_at.is_some());

    assert!(
        !store.release(&a.ass_id).await.unwrap(),
        "second release does nothing"
    );
    assert_eq!(
        store.get_worker(&w.worker_id).await.unwrap(),
        after,
        "the second release leaves the worker unchanged"
    );
    assert_eq!(store.get_assignment(&a.ass_id).await.unwrap(), released);

    expect_not_found(store.release(&unique_id("nope")).await, "release unknown");
}

// ------------------------------------------------------------------------------------------
// Assignments and results
// ------------------------------------------------------------------------------------------

pub async fn insert_get_list_assignments(store: &dyn Store) {
    // Workers that are not registered: listing and release must not depend on them.
    let (t1, t2) = (unique_id("task"), unique_id("task"));
    let (w1, w2) = (unique_id("w"), unique_id("w"));
    let r = Resources::new(0.5, 1.0, 2.0, 0.0);
    let mut a1 = sample_assignment(&unique_id("ass"), &t1, &w1, r);
    a1.assigned_at = at_ms(1_000);
    let mut a2 = sample_assignment(&unique_id("ass"), &t1, &w2, r);
    a2.assigned_at = at_ms(2_000);
    a2.attempt = 2;
    let mut a3 = sample_assignment(&unique_id("ass"), &t2, &w1, r);
    a3.assigned_at = at_ms(3_000);
    for a in [&a3, &a1, &a2] {
        store.insert_assignment(a).await.unwrap();
    }
    assert_eq!(store.get_assignment(&a2.ass_id).await.unwrap(), a2);
    expect_already_exists(
        store.insert_assignment(&a1).await,
        "insert_assignment twice",
    );
    expect_not_found(
        store.get_assignment(&unique_id("nope")).await,
        "get_assignment",
    );

    let list = |task_id: Option<&str>, worker_id: Option<&str>, active_only: bool| {
        let filter = AssignmentFilter {
            task_id: task_id.map(str::to_string),
            worker_id: worker_id.map(str::to_string),
            active_only,
        };
        async move {
            store
                .list_assignments(&filter)
                .await
                .unwrap()
                .into_iter()
                .map(|a| a.ass_id)
                .collect::<Vec<_>>()
        }
    };
    assert_eq!(
        list(Some(&t1), None, false).await,
        vec![a1.ass_id.clone(), a2.ass_id.clone()]
    );
    assert_eq!(
        list(None, Some(&w1), false).await,
        vec![a1.ass_id.clone(), a3.ass_id.clone()]
    );
    assert_eq!(
        list(Some(&t1), Some(&w1), false).await,
        vec![a1.ass_id.clone()]
    );
    assert!(list(Some(&t2), Some(&w2), false).await.is_empty());

    assert!(
        store.release(&a1.ass_id).await.unwrap(),
        "release without a worker"
    );
    assert_eq!(list(None, Some(&w1), true).await, vec![a3.ass_id.clone()]);
    assert_eq!(list(Some(&t1), None, true).await, vec![a2.ass_id.clone()]);
    assert_eq!(
        list(None, Some(&w1), false).await,
        vec![a1.ass_id.clone(), a3.ass_id.clone()],
        "released assignments are still listed without active_only"
    );
    let all_active = store
        .list_assignments(&AssignmentFilter {
            active_only: true,
            ..AssignmentFilter::default()
        })
        .await
        .unwrap();
    assert!(all_active.iter().all(|a| !a.released));
    assert!(all_active.iter().any(|a| a.ass_id == a2.ass_id));
    assert!(!all_active.iter().any(|a| a.ass_id == a1.ass_id));
}

pub async fn insert_and_get_results_one_per_task(store: &dyn Store) {
    let task_id = unique_id("task");
    let mut result = sample_result(&task_id, &unique_id("w"));
    result.status = ResultStatus::Failed;
    result.logs = "line 1\nünïcödé \"quoted\" 'single'\n\ttabbed\n".to_string();
    result.exit_code = Some(2);
    result.error = Some("exit status 2".to_string());
    result.logs_truncated = true;
    store.insert_result(&result).await.unwrap();
    assert_eq!(store.get_result(&task_id).await.unwrap(), result);

    let second = sample_result(&task_id, &unique_id("w"));
    expect_already_exists(store.insert_result(&second).await, "a second result");
    assert_eq!(
        store.get_result(&task_id).await.unwrap(),
        result,
        "first kept"
    );

    let plain = sample_result(&unique_id("task"), &unique_id("w"));
    store.insert_result(&plain).await.unwrap();
    assert_eq!(store.get_result(&plain.task_id).await.unwrap(), plain);

    expect_not_found(store.get_result(&unique_id("nope")).await, "get_result");
}

pub async fn recent_runtimes_are_successful_runs_newest_first(store: &dyn Store) {
    let kind = unique_id("type");
    let base = now() - chrono::Duration::seconds(60);
    let result = |seconds: i64, runtime: Option<f64>, status: ResultStatus| {
        let mut r = sample_result(&unique_id("task"), &format!("w-{seconds}"));
        r.completed_at = base + chrono::Duration::seconds(seconds);
        r.runtime_s = runtime;
        r.status = status;
        r.task_type = Some(kind.clone());
        r
    };
    let mut untyped = result(5, Some(9.0), ResultStatus::Success);
    untyped.task_type = None;
    for r in [
        result(1, Some(1.5), ResultStatus::Success),
        result(2, Some(7.0), ResultStatus::Failed),
        result(3, None, ResultStatus::Success),
        result(4, Some(0.25), ResultStatus::Success),
        result(6, Some(3.0), ResultStatus::Cancelled),
        untyped,
    ] {
        store.insert_result(&r).await.unwrap();
    }
    let sample = |worker: &str, runtime_s: f64| RuntimeSample {
        worker_id: worker.to_string(),
        task_type: kind.clone(),
        runtime_s,
    };
    assert_eq!(
        store.recent_runtimes(10).await.unwrap(),
        vec![sample("w-4", 0.25), sample("w-1", 1.5)],
        "successes with a runtime and a type, newest first"
    );
    assert_eq!(
        store.recent_runtimes(1).await.unwrap(),
        vec![sample("w-4", 0.25)]
    );
}

// ------------------------------------------------------------------------------------------
// Policies
// ------------------------------------------------------------------------------------------

/// Inserts a version of `kind` with `bytes`.
async fn policy_with(
    store: &dyn Store,
    name: &str,
    version: &str,
    kind: PolicyKind,
    bytes: &[u8],
) -> PolicyVersion {
    let v = sample_policy(name, version, kind, bytes, now());
    store.insert_policy_version(&v, bytes).await.unwrap();
    v
}

/// The active version of `kind`, as `activate_policy`'s `expected_current` takes it.
async fn active_pair(store: &dyn Store, kind: PolicyKind) -> Option<(String, String)> {
    store
        .get_active_policy(kind)
        .await
        .unwrap()
        .map(|a| (a.name, a.version))
}

/// 20.5 MiB (the size of a Python guest) spans many chunks and ends in a partial one; 0 bytes
/// is no chunk at all.
pub async fn policy_bytes_round_trip_in_chunks_and_empty(store: &dyn Store) {
    let name = unique_id("pol");
    let big = sample_policy_bytes(POLICY_CHUNK_BYTES * 41 / 2);
    let v1 = policy_with(store, &name, "1.0.0", PolicyKind::Placement, &big).await;
    assert_eq!(store.get_policy_version(&name, "1.0.0").await.unwrap(), v1);
    let back = store.get_policy_bytes(&name, "1.0.0").await.unwrap();
    assert_eq!(back.len(), big.len());
    assert!(
        back == big,
        "the reassembled bytes differ from the uploaded ones"
    );
    assert_eq!(sha256_hex(&back), v1.sha256);

    let empty = policy_with(store, &name, "2.0.0", PolicyKind::Placement, &[]).await;
    assert_eq!(empty.size_bytes, 0);
    assert!(
        store
            .get_policy_bytes(&name, "2.0.0")
            .await
            .unwrap()
            .is_empty()
    );

    expect_not_found(
        store.get_policy_version(&name, "9.9.9").await,
        "unknown version",
    );
    expect_not_found(
        store.get_policy_bytes(&name, "9.9.9").await,
        "bytes of unknown version",
    );
}

/// A version whose recorded digest does not match its bytes is stored as given, but reading
/// its bytes is a Backend error naming the version.
pub async fn policy_bytes_with_wrong_sha256_are_refused(store: &dyn Store) {
    let name = unique_id("pol");
    let bytes = sample_policy_bytes(1000);
    let mut v = sample_policy(&name, "1", PolicyKind::Admission, &bytes, now());
    v.sha256 = sha256_hex(b"something else");
    store.insert_policy_version(&v, &bytes).await.unwrap();
    match store.get_policy_bytes(&name, "1").await {
        Err(e @ StoreError::Backend { .. }) => {
            let text = e.to_string();
            assert!(text.contains(&format!("{name}@1")), "{text}");
        }
        other => panic!("expected a Backend error for a digest mismatch, got {other:?}"),
    }
}

pub async fn insert_policy_version_with_taken_name_and_version_is_already_exists(
    store: &dyn Store,
) {
    let name = unique_id("pol");
    let first = policy_with(store, &name, "1", PolicyKind::Placement, b"first").await;
    let again = sample_policy(&name, "1", PolicyKind::Admission, b"second", now());
    expect_already_exists(
        store.insert_policy_version(&again, b"second").await,
        "same name and version",
    );
    assert_eq!(store.get_policy_version(&name, "1").await.unwrap(), first);
    assert_eq!(store.get_policy_bytes(&name, "1").await.unwrap(), b"first");
}

pub async fn list_policy_versions_by_name_then_upload_time(store: &dyn Store) {
    let (a, b) = (unique_id("pol-a"), unique_id("pol-b"));
    // Inserted out of order; version strings that do not sort like their upload times.
    for (name, version, at) in [(&b, "x", 5), (&a, "z", 10), (&a, "y", 20), (&b, "w", 1)] {
        let v = sample_policy(name, version, PolicyKind::Placement, b"wasm", at_ms(at));
        store.insert_policy_version(&v, b"wasm").await.unwrap();
    }
    let pairs = |list: Vec<PolicyVersion>| -> Vec<(String, String)> {
        list.into_iter()
            .filter(|v| v.name == a || v.name == b)
            .map(|v| (v.name, v.version))
            .collect()
    };
    let p = |n: &String, v: &str| (n.clone(), v.to_string());
    assert_eq!(
        pairs(store.list_policy_versions(None).await.unwrap()),
        vec![p(&a, "z"), p(&a, "y"), p(&b, "w"), p(&b, "x")]
    );
    assert_eq!(
        pairs(store.list_policy_versions(Some(&b)).await.unwrap()),
        vec![p(&b, "w"), p(&b, "x")]
    );
    assert!(
        store
            .list_policy_versions(Some(&unique_id("none")))
            .await
            .unwrap()
            .is_empty()
    );
}

/// First activation, a swap with the right expected version, a refused swap with a stale one
/// (nothing changes), and `previous` recorded along the way.
pub async fn activate_policy_is_a_compare_and_swap(store: &dyn Store) {
    let kind = PolicyKind::Placement;
    let name = unique_id("pol");
    for version in ["1", "2", "3"] {
        policy_with(store, &name, version, kind, version.as_bytes()).await;
    }
    // A fresh store has nothing active; a shared one may: start from whatever is.
    let start = active_pair(store, kind).await;
    let pair = |v: &str| (name.clone(), v.to_string());

    let first = store
        .activate_policy(kind, &name, "1", "alice", start.clone())
        .await
        .unwrap();
    assert_eq!(
        (first.kind, first.name.as_str(), first.version.as_str()),
        (kind, name.as_str(), "1")
    );
    assert_eq!(first.activated_by, "alice");
    assert_eq!(first.previous, start);
    assert_eq!(
        store.get_active_policy(kind).await.unwrap(),
        Some(first.clone())
    );

    let second = store
        .activate_policy(kind, &name, "2", "bob", Some(pair("1")))
        .await
        .unwrap();
    assert_eq!(second.previous, Some(pair("1")));
    assert_eq!(
        store.get_active_policy(kind).await.unwrap(),
        Some(second.clone())
    );

    // Stale: "1" is no longer active.
    let actual = expect_conflict(
        store
            .activate_policy(kind, &name, "3", "carol", Some(pair("1")))
            .await,
        "activation with a stale expected version",
    );
    assert!(
        actual.contains(&format!("{name}@2")),
        "actual names the active one: {actual}"
    );
    // "Nothing active" is stale too once something is.
    expect_conflict(
        store.activate_policy(kind, &name, "3", "carol", None).await,
        "first activation when one is active",
    );
    assert_eq!(store.get_active_policy(kind).await.unwrap(), Some(second));

    // The other kind is independent.
    let other = active_pair(store, PolicyKind::Admission).await;
    assert!(other.as_ref().is_none_or(|(n, _)| n != &name));
}

pub async fn activate_policy_refuses_a_version_of_another_kind_or_unknown(store: &dyn Store) {
    let name = unique_id("pol");
    policy_with(store, &name, "1", PolicyKind::Admission, b"admit").await;
    let before = store
        .get_active_policy(PolicyKind::Placement)
        .await
        .unwrap();
    let expected = before.as_ref().map(|a| (a.name.clone(), a.version.clone()));
    expect_conflict(
        store
            .activate_policy(PolicyKind::Placement, &name, "1", "alice", expected.clone())
            .await,
        "activating an admission policy as placement",
    );
    expect_not_found(
        store
            .activate_policy(PolicyKind::Placement, &name, "404", "alice", expected)
            .await,
        "activating an unknown version",
    );
    assert_eq!(
        store
            .get_active_policy(PolicyKind::Placement)
            .await
            .unwrap(),
        before
    );
}

pub async fn delete_policy_version_refused_while_active(store: &dyn Store) {
    let kind = PolicyKind::Admission;
    let name = unique_id("pol");
    let bytes = sample_policy_bytes(POLICY_CHUNK_BYTES + 17);
    policy_with(store, &name, "1", kind, &bytes).await;
    policy_with(store, &name, "2", kind, &bytes).await;
    let start = active_pair(store, kind).await;
    store
        .activate_policy(kind, &name, "1", "alice", start)
        .await
        .unwrap();

    expect_conflict(
        store.delete_policy_version(&name, "1").await,
        "deleting the active version",
    );
    assert_eq!(store.get_policy_bytes(&name, "1").await.unwrap(), bytes);
    // A refused deletion leaves the version activatable.
    store
        .activate_policy(
            kind,
            &name,
            "2",
            "alice",
            Some((name.clone(), "1".to_string())),
        )
        .await
        .unwrap();
    store
        .activate_policy(
            kind,
            &name,
            "1",
            "alice",
            Some((name.clone(), "2".to_string())),
        )
        .await
        .unwrap();

    store.delete_policy_version(&name, "2").await.unwrap();
    expect_not_found(
        store.get_policy_version(&name, "2").await,
        "deleted version",
    );
    expect_not_found(
        store.get_policy_bytes(&name, "2").await,
        "bytes of a deleted version",
    );
    expect_not_found(
        store.delete_policy_version(&name, "2").await,
        "deleting twice",
    );
    let left: Vec<String> = store
        .list_policy_versions(Some(&name))
        .await
        .unwrap()
        .into_iter()
        .map(|v| v.version)
        .collect();
    assert_eq!(left, vec!["1".to_string()]);
    // The name and version can be uploaded again, with other bytes.
    policy_with(store, &name, "2", kind, b"new").await;
    assert_eq!(store.get_policy_bytes(&name, "2").await.unwrap(), b"new");
}

/// A version's own limits are stored and read back; a version without them reads `None`.
pub async fn policy_version_limits_round_trip_and_default_to_none(store: &dyn Store) {
    let name = unique_id("pol");
    let mut limited = sample_policy(&name, "1", PolicyKind::Placement, b"wasm", now());
    limited.memory_bytes = Some(256 << 20);
    limited.deadline_ms = Some(250);
    store
        .insert_policy_version(&limited, b"wasm")
        .await
        .unwrap();
    let plain = policy_with(store, &name, "2", PolicyKind::Placement, b"wasm").await;
    assert_eq!(store.get_policy_version(&name, "1").await.unwrap(), limited);
    let listed = store.list_policy_versions(Some(&name)).await.unwrap();
    assert_eq!(listed, vec![limited, plain.clone()]);
    assert_eq!((plain.memory_bytes, plain.deadline_ms), (None, None));
}

/// Clearing applies only while the expected version is active; a stale expectation changes
/// nothing and names the actual one; after a clear, a first activation (`None`) applies.
pub async fn clear_active_policy_is_a_compare_and_swap(store: &dyn Store) {
    let kind = PolicyKind::Admission;
    let name = unique_id("pol");
    for version in ["1", "2"] {
        policy_with(store, &name, version, kind, version.as_bytes()).await;
    }
    let pair = |v: &str| (name.clone(), v.to_string());
    let start = active_pair(store, kind).await;
    store
        .activate_policy(kind, &name, "1", "alice", start)
        .await
        .unwrap();
    store
        .activate_policy(kind, &name, "2", "alice", Some(pair("1")))
        .await
        .unwrap();

    let actual = expect_conflict(
        store.clear_active_policy(kind, pair("1")).await,
        "clearing with a stale expected version",
    );
    assert!(actual.contains(&format!("{name}@2")), "{actual}");
    assert_eq!(active_pair(store, kind).await, Some(pair("2")));

    store.clear_active_policy(kind, pair("2")).await.unwrap();
    assert_eq!(store.get_active_policy(kind).await.unwrap(), None);
    let actual = expect_conflict(
        store.clear_active_policy(kind, pair("2")).await,
        "clearing twice",
    );
    assert!(actual.contains("none active"), "{actual}");
    // A cleared kind is activated again as a first activation; its versions can be deleted.
    store.delete_policy_version(&name, "2").await.unwrap();
    let again = store
        .activate_policy(kind, &name, "1", "alice", None)
        .await
        .unwrap();
    assert_eq!(again.previous, None);
}

// ------------------------------------------------------------------------------------------
// Concurrency
// ------------------------------------------------------------------------------------------

/// 50 concurrent reserves, each its own tokio task, on a worker with room for exactly 7:
/// exactly 7 succeed and the accounting is exact afterwards.
pub async fn reserve_race_50_requests_for_room_for_7(store: Arc<dyn Store>) {
    let w = worker_with(&*store, "race", Resources::new(7.0, 14.0, 7.0, 0.0)).await;
    let request = Resources::new(1.0, 2.0, 1.0, 0.0);
    let barrier = Arc::new(tokio::sync::Barrier::new(50));
    let handles: Vec<_> = (0..50)
        .map(|_| {
            let store = Arc::clone(&store);
            let worker_id = w.worker_id.clone();
            let barrier = Arc::clone(&barrier);
            tokio::spawn(async move {
                barrier.wait().await;
                store.reserve(&worker_id, &request).await
            })
        })
        .collect();
    let mut granted = 0;
    for handle in handles {
        if handle.await.unwrap().unwrap() {
            granted += 1;
        }
    }
    let after = store.get_worker(&w.worker_id).await.unwrap();
    assert_eq!(granted, 7, "exactly 7 of 50 racing reserves may succeed");
    assert_invariant(&after, "after the reserve race");
    assert_eq!(after.allocated(), Resources::new(7.0, 14.0, 7.0, 0.0));
    assert_eq!(after.available(), Resources::default());
}

/// Every assignment released by two racing callers: each released exactly once, and the
/// worker is back exactly at its start values.
pub async fn concurrent_releases_each_apply_exactly_once(store: Arc<dyn Store>) {
    let w = worker_with(&*store, "rel", Resources::new(16.0, 32.0, 64.0, 4.0)).await;
    let request = Resources::new(0.1, 0.3, 1.7, 0.2).quantized();
    let mut ass_ids = Vec::new();
    for _ in 0..12 {
        assert!(store.reserve(&w.worker_id, &request).await.unwrap());
        let a = sample_assignment(&unique_id("ass"), &unique_id("task"), &w.worker_id, request);
        store.insert_assignment(&a).await.unwrap();
        ass_ids.push(a.ass_id);
    }
    assert_allocated_matches_assignments(&*store, &w.worker_id, "before racing releases").await;
    let barrier = Arc::new(tokio::sync::Barrier::new(ass_ids.len() * 2));
    let handles: Vec<_> = ass_ids
        .iter()
        .flat_map(|id| [id.clone(), id.clone()])
        .map(|ass_id| {
            let store = Arc::clone(&store);
            let barrier = Arc::clone(&barrier);
            tokio::spawn(async move {
                barrier.wait().await;
                let released = store.release(&ass_id).await.unwrap();
                (ass_id, released)
            })
        })
        .collect();
    let mut wins: BTreeMap<String, u32> = BTreeMap::new();
    for handle in handles {
        let (ass_id, released) = handle.await.unwrap();
        *wins.entry(ass_id).or_default() += u32::from(released);
    }
    for (ass_id, n) in &wins {
        assert_eq!(*n, 1, "assignment {ass_id} released {n} times");
    }
    assert_allocated_matches_assignments(&*store, &w.worker_id, "after racing releases").await;
    let end = store.get_worker(&w.worker_id).await.unwrap();
    assert_eq!(end.allocated(), Resources::default());
    assert_eq!(end.available(), w.available());
}

/// Ten racing `queued -> running` transitions of one task: exactly one applies, the others
/// get a Conflict naming `running`.
pub async fn concurrent_transitions_have_exactly_one_winner(store: Arc<dyn Store>) {
    let task = sample_task_at(
        &unique_id("task"),
        &unique_id("user"),
        TaskStatus::Queued,
        at_ms(0),
    );
    insert(&*store, &task).await;
    let handles: Vec<_> = (0..10)
        .map(|_| {
            let store = Arc::clone(&store);
            let task_id = task.task_id.clone();
            tokio::spawn(async move {
                store
                    .transition_task(
                        &task_id,
                        &[TaskStatus::Queued],
                        TaskStatus::Running,
                        &TaskUpdate {
                            increment_attempts: true,
                            ..TaskUpdate::default()
                        },
                    )
                    .await
            })
        })
        .collect();
    let mut winners = 0;
    for handle in handles {
        match handle.await.unwrap() {
            Ok(_) => winners += 1,
            Err(StoreError::Conflict { actual, .. }) => assert_eq!(actual, "running"),
            Err(other) => panic!("unexpected error in a racing transition: {other}"),
        }
    }
    assert_eq!(winners, 1, "exactly one racing transition applies");
    assert_eq!(store.get_task(&task.task_id).await.unwrap().attempts, 1);
}

/// Ten hosts racing to claim one queued task: exactly one owns it.
pub async fn concurrent_claims_have_exactly_one_winner(store: Arc<dyn Store>) {
    let task = sample_task_at(
        &unique_id("task"),
        &unique_id("user"),
        TaskStatus::Queued,
        at_ms(0),
    );
    insert(&*store, &task).await;
    let handles: Vec<_> = (0..10)
        .map(|i| {
            let store = Arc::clone(&store);
            let task_id = task.task_id.clone();
            tokio::spawn(async move {
                let owner = format!("host-{i}");
                let result = store
                    .claim_task(&task_id, &owner, at_ms(30_000), at_ms(0))
                    .await;
                (owner, result)
            })
        })
        .collect();
    let mut winners = Vec::new();
    for handle in handles {
        match handle.await.unwrap() {
            (owner, Ok(_)) => winners.push(owner),
            (_, Err(StoreError::Conflict { .. })) => {}
            (_, Err(other)) => panic!("unexpected error in a racing claim: {other}"),
        }
    }
    assert_eq!(
        winners.len(),
        1,
        "exactly one host wins the claim: {winners:?}"
    );
    let stored = store.get_task(&task.task_id).await.unwrap();
    assert_eq!(stored.owner.as_deref(), Some(winners[0].as_str()));
}

/// Ten admins racing to activate ten versions, all expecting the same current one: exactly
/// one applies, the others get a Conflict, and the active version is the winner's.
pub async fn concurrent_activations_have_exactly_one_winner(store: Arc<dyn Store>) {
    let kind = PolicyKind::Placement;
    let name = unique_id("pol");
    for i in 0..10 {
        policy_with(&*store, &name, &i.to_string(), kind, b"wasm").await;
    }
    let expected = active_pair(&*store, kind).await;
    let barrier = Arc::new(tokio::sync::Barrier::new(10));
    let handles: Vec<_> = (0..10)
        .map(|i| {
            let (store, barrier) = (Arc::clone(&store), Arc::clone(&barrier));
            let (name, expected) = (name.clone(), expected.clone());
            tokio::spawn(async move {
                barrier.wait().await;
                let result = store
                    .activate_policy(kind, &name, &i.to_string(), "admin", expected)
                    .await;
                (i.to_string(), result)
            })
        })
        .collect();
    let mut winners = Vec::new();
    for handle in handles {
        match handle.await.unwrap() {
            (version, Ok(active)) => {
                assert_eq!(active.version, version);
                winners.push(version);
            }
            (_, Err(StoreError::Conflict { .. })) => {}
            (_, Err(other)) => panic!("unexpected error in a racing activation: {other}"),
        }
    }
    assert_eq!(
        winners.len(),
        1,
        "exactly one activation applies: {winners:?}"
    );
    let active = store.get_active_policy(kind).await.unwrap().unwrap();
    assert_eq!((active.name, active.version), (name, winners[0].clone()));
    assert_eq!(active.previous, expected);
}

// ------------------------------------------------------------------------------------------
// Scheduling
// ------------------------------------------------------------------------------------------

/// Far before any other test's timestamps and above any other test's priority, so that these
/// tests see their own tasks first even in a database shared with other tests.
fn long_ago(offset_ms: i64) -> DateTime<Utc> {
    at_ms(-400_000_000_000 + offset_ms)
}

pub async fn user_usage_counts_open_tasks_and_sums_running_requests(store: &dyn Store) {
    let user = unique_id("user");
    let other = unique_id("user");
    assert_eq!(
        store.user_usage(&user).await.unwrap(),
        crate::model::Usage::default()
    );
    for (status, request) in [
        (TaskStatus::Pending, Resources::new(1.0, 1.0, 0.0, 0.0)),
        (TaskStatus::Queued, Resources::new(2.0, 2.0, 0.0, 0.0)),
        (TaskStatus::Queued, Resources::new(2.0, 2.0, 0.0, 0.0)),
        (TaskStatus::Running, Resources::new(0.5, 3.0, 1.0, 1.0)),
        (
            TaskStatus::Running,
            Resources::new(quantize(0.1), 1.0, 0.0, 0.0),
        ),
        (TaskStatus::Completed, Resources::new(8.0, 8.0, 8.0, 8.0)),
        (TaskStatus::Failed, Resources::new(8.0, 8.0, 8.0, 8.0)),
    ] {
        let mut task = sample_task_at(&unique_id("task"), &user, status, now());
        (
            task.req_cpu,
            task.req_memory,
            task.req_storage,
            task.req_gpu,
        ) = (request.cpu, request.memory, request.storage, request.gpu);
        insert(store, &task).await;
    }
    insert(
        store,
        &sample_task_at(&unique_id("task"), &other, TaskStatus::Running, now()),
    )
    .await;
    let usage = store.user_usage(&user).await.unwrap();
    assert_eq!(
        (usage.pending_tasks, usage.queued_tasks, usage.running_tasks),
        (1, 2, 2)
    );
    assert_eq!(
        usage.reserved,
        Resources::new(0.5 + quantize(0.1), 4.0, 1.0, 1.0)
    );
}

pub async fn running_counts_count_only_running_tasks_of_the_users_asked(store: &dyn Store) {
    let (alice, bob, carol, dave) = (
        unique_id("user"),
        unique_id("user"),
        unique_id("user"),
        unique_id("user"),
    );
    for (user, status) in [
        (&alice, TaskStatus::Running),
        (&alice, TaskStatus::Running),
        (&alice, TaskStatus::Queued),
        (&alice, TaskStatus::Completed),
        (&bob, TaskStatus::Running),
        (&carol, TaskStatus::Queued),
        (&dave, TaskStatus::Running),
    ] {
        insert(
            store,
            &sample_task_at(&unique_id("task"), user, status, now()),
        )
        .await;
    }
    let counts = store
        .running_counts(&[alice.clone(), bob.clone(), carol.clone()])
        .await
        .unwrap();
    assert_eq!(
        counts,
        BTreeMap::from([(alice, 2), (bob, 1)]),
        "dave was not asked"
    );
    assert!(store.running_counts(&[]).await.unwrap().is_empty());
}

pub async fn admission_batch_is_due_pending_tasks_least_recently_updated_first(store: &dyn Store) {
    let user = unique_id("user");
    let mut expected = Vec::new();
    for offset in [20, 0, 10] {
        let task = sample_task_at(
            &unique_id("task"),
            &user,
            TaskStatus::Pending,
            long_ago(offset),
        );
        insert(store, &task).await;
        expected.push((offset, task.task_id));
    }
    // Not due (updated after `due_before`), or not pending.
    insert(
        store,
        &sample_task_at(&unique_id("task"), &user, TaskStatus::Pending, long_ago(30)),
    )
    .await;
    insert(
        store,
        &sample_task_at(&unique_id("task"), &user, TaskStatus::Queued, long_ago(1)),
    )
    .await;
    expected.sort();
    let expected: Vec<String> = expected.into_iter().map(|(_, id)| id).collect();
    let batch = store.admission_batch(10, long_ago(20)).await.unwrap();
    assert_eq!(ids(&batch), expected);
    let batch = store.admission_batch(2, long_ago(20)).await.unwrap();
    assert_eq!(ids(&batch), expected[..2]);
    assert!(
        store
            .admission_batch(0, long_ago(20))
            .await
            .unwrap()
            .is_empty()
    );
}

pub async fn claimable_tasks_are_in_queue_order_without_claimed_or_excluded_users(
    store: &dyn Store,
) {
    let (alice, bob) = (unique_id("alice"), unique_id("bob"));
    let top = 2_000_000_000;
    let queued = |user: &str, priority: i32, offset: i64| {
        let mut task = sample_task_at(
            &unique_id("task"),
            user,
            TaskStatus::Queued,
            long_ago(offset),
        );
        task.priority = priority;
        task
    };
    let a_old = queued(&alice, top, 0);
    let a_high = queued(&alice, top + 1, 50);
    let b_mid = queued(&bob, top, 10);
    let a_new = queued(&alice, top, 20);
    let claimed = queued(&bob, top + 2, 0);
    let expired = queued(&bob, top, 30);
    let pending = Task {
        status: TaskStatus::Pending,
        ..queued(&alice, top + 3, 0)
    };
    for task in [
        &a_old, &a_high, &b_mid, &a_new, &claimed, &expired, &pending,
    ] {
        insert(store, task).await;
    }
    let now = now();
    store
        .claim_task(
            &claimed.task_id,
            "host-a",
            now + chrono::Duration::seconds(30),
            now,
        )
        .await
        .unwrap();
    store
        .claim_task(
            &expired.task_id,
            "host-a",
            now - chrono::Duration::seconds(1),
            now,
        )
        .await
        .unwrap();

    let batch = store.claimable_tasks(5, now, &[]).await.unwrap();
    assert_eq!(
        ids(&batch),
        ids(&[
            a_high.clone(),
            a_old.clone(),
            b_mid.clone(),
            a_new.clone(),
            expired.clone()
        ])
    );
    let batch = store.claimable_tasks(2, now, &[]).await.unwrap();
    assert_eq!(ids(&batch), ids(&[a_high.clone(), a_old.clone()]));
    let batch = store
        .claimable_tasks(3, now, std::slice::from_ref(&alice))
        .await
        .unwrap();
    assert_eq!(ids(&batch[..2]), ids(&[b_mid, expired]));
    assert!(batch.iter().all(|t| t.user_id != alice));
    assert!(store.claimable_tasks(0, now, &[]).await.unwrap().is_empty());
}

pub async fn active_assignment_counts_count_unreleased_assignments_per_worker(store: &dyn Store) {
    let w1 = worker_with(store, "w", Resources::new(8.0, 8.0, 8.0, 0.0)).await;
    let w2 = worker_with(store, "w", Resources::new(8.0, 8.0, 8.0, 0.0)).await;
    let req = Resources::new(1.0, 1.0, 0.0, 0.0);
    let mut released = None;
    for worker in [&w1, &w1, &w1, &w2] {
        assert!(store.reserve(&worker.worker_id, &req).await.unwrap());
        let a = sample_assignment(
            &unique_id("ass"),
            &unique_id("task"),
            &worker.worker_id,
            req,
        );
        store.insert_assignment(&a).await.unwrap();
        released = Some(a.ass_id);
    }
    assert!(store.release(&released.unwrap()).await.unwrap());
    let counts = store.active_assignment_counts().await.unwrap();
    assert_eq!(counts.get(&w1.worker_id), Some(&3));
    assert_eq!(
        counts.get(&w2.worker_id),
        None,
        "its only assignment was released"
    );
}

pub async fn mark_running_requires_the_owners_claim(store: &dyn Store) {
    let user = unique_id("user");
    let mut task = sample_task_at(&unique_id("task"), &user, TaskStatus::Queued, at_ms(0));
    task.status_reason = Some("waiting for capacity".into());
    insert(store, &task).await;
    let id = task.task_id.as_str();

    // Unclaimed: refused.
    expect_conflict(store.mark_running(id, "host-a", 1).await, "unclaimed");
    let now = now();
    store
        .claim_task(id, "host-a", now + chrono::Duration::seconds(30), now)
        .await
        .unwrap();
    let before = store.get_task(id).await.unwrap();
    expect_conflict(store.mark_running(id, "host-b", 1).await, "another owner");
    assert_eq!(store.get_task(id).await.unwrap(), before);

    let t = store.mark_running(id, "host-a", 1).await.unwrap();
    assert_eq!(t.status, TaskStatus::Running);
    assert_eq!(t.attempts, 1);
    assert_eq!((t.owner, t.lease_expires_at), (None, None));
    assert_eq!(t.status_reason, None);
    assert_eq!(t.started_at, None, "the worker sets started_at");
    let actual = expect_conflict(store.mark_running(id, "host-a", 2).await, "twice");
    assert!(actual.starts_with("running"), "{actual}");
    expect_not_found(
        store.mark_running(&unique_id("nope"), "host-a", 1).await,
        "unknown task",
    );
}

pub async fn unclaim_task_gives_up_only_the_owners_claim(store: &dyn Store) {
    let user = unique_id("user");
    let task = sample_task_at(&unique_id("task"), &user, TaskStatus::Queued, at_ms(0));
    insert(store, &task).await;
    let id = task.task_id.as_str();
    let now = now();
    store
        .claim_task(id, "host-a", now + chrono::Duration::seconds(30), now)
        .await
        .unwrap();
    assert!(!store.unclaim_task(id, "host-b").await.unwrap());
    assert_eq!(
        store.get_task(id).await.unwrap().owner.as_deref(),
        Some("host-a")
    );
    assert!(store.unclaim_task(id, "host-a").await.unwrap());
    let t = store.get_task(id).await.unwrap();
    assert_eq!((t.owner, t.lease_expires_at), (None, None));
    assert!(!store.unclaim_task(id, "host-a").await.unwrap());
    // Anyone may claim it now.
    store
        .claim_task(id, "host-b", now + chrono::Duration::seconds(30), now)
        .await
        .unwrap();
}

pub async fn unreserve_returns_an_unassigned_reservation_and_never_goes_below_zero(
    store: &dyn Store,
) {
    let w = worker_with(store, "w", Resources::new(4.0, 8.0, 10.0, 1.0)).await;
    let req = Resources::new(quantize(1.3), quantize(2.7), 1.0, 1.0);
    assert!(store.reserve(&w.worker_id, &req).await.unwrap());
    assert!(store.unreserve(&w.worker_id, &req, None).await.unwrap());
    let after = store.get_worker(&w.worker_id).await.unwrap();
    assert_invariant(&after, "after unreserve");
    assert_eq!(after.allocated(), Resources::default());
    assert_eq!(after.available(), w.total());
    assert!(
        !store.unreserve(&w.worker_id, &req, None).await.unwrap(),
        "nothing is allocated any more"
    );
    assert_eq!(
        store.get_worker(&w.worker_id).await.unwrap().allocated(),
        Resources::default()
    );
    expect_not_found(
        store.unreserve(&unique_id("nope"), &req, None).await,
        "unknown worker",
    );
}

// ------------------------------------------------------------------------------------------
// Reconciliation
// ------------------------------------------------------------------------------------------

pub async fn lease_is_renewed_by_its_holder_and_taken_by_another_only_after_expiry(
    store: &dyn Store,
) {
    let name = unique_id("lease");
    let secs = |s: i64| at_ms(s * 1000);
    assert!(
        store
            .acquire_lease(&name, "a", secs(5), secs(0))
            .await
            .unwrap()
    );
    assert!(
        !store
            .acquire_lease(&name, "b", secs(6), secs(1))
            .await
            .unwrap(),
        "held by a until 5"
    );
    assert!(
        store
            .acquire_lease(&name, "a", secs(9), secs(4))
            .await
            .unwrap(),
        "the holder renews"
    );
    assert!(
        !store
            .acquire_lease(&name, "b", secs(12), secs(6))
            .await
            .unwrap(),
        "renewed until 9"
    );
    assert!(
        store
            .acquire_lease(&name, "b", secs(15), secs(10))
            .await
            .unwrap(),
        "expired at 9: b takes it"
    );
    assert!(
        !store
            .acquire_lease(&name, "a", secs(16), secs(11))
            .await
            .unwrap(),
        "a lost it"
    );
    assert!(!store.release_lease(&name, "a").await.unwrap(), "not a's");
    assert!(store.release_lease(&name, "b").await.unwrap());
    assert!(
        store
            .acquire_lease(&name, "a", secs(17), secs(12))
            .await
            .unwrap(),
        "given up: anyone takes it at once"
    );
    // Leases are independent by name.
    let other = unique_id("lease");
    assert!(
        store
            .acquire_lease(&other, "b", secs(17), secs(12))
            .await
            .unwrap()
    );
}

/// Ten replicas racing for a free lease, then for an expired one: exactly one wins each time.
pub async fn concurrent_lease_takers_have_exactly_one_winner(store: Arc<dyn Store>) {
    let name = unique_id("lease");
    for (round, now) in [(0, at_ms(0)), (1, at_ms(60_000))] {
        let handles: Vec<_> = (0..10)
            .map(|i| {
                let (store, name) = (Arc::clone(&store), name.clone());
                tokio::spawn(async move {
                    let holder = format!("replica-{round}-{i}");
                    let until = now + chrono::Duration::seconds(5);
                    let won = store.acquire_lease(&name, &holder, until, now).await;
                    (holder, won)
                })
            })
            .collect();
        let mut winners = Vec::new();
        for handle in handles {
            let (holder, won) = handle.await.unwrap();
            if won.unwrap() {
                winners.push(holder);
            }
        }
        assert_eq!(winners.len(), 1, "round {round}: {winners:?}");
        // The winner holds it: it renews, nobody else can take it.
        let until = now + chrono::Duration::seconds(6);
        assert!(
            store
                .acquire_lease(&name, &winners[0], until, now)
                .await
                .unwrap()
        );
        assert!(
            !store
                .acquire_lease(&name, "late", until, now)
                .await
                .unwrap()
        );
    }
}

pub async fn mark_worker_lost_applies_only_to_an_active_worker_with_a_stale_heartbeat(
    store: &dyn Store,
) {
    let w = worker_with(store, "w", Resources::new(4.0, 8.0, 10.0, 0.0)).await;
    let id = w.worker_id.as_str();
    store.heartbeat(id, 1_000, None).await.unwrap();
    assert!(
        !store.mark_worker_lost(id, 1_000).await.unwrap(),
        "a heartbeat at the limit is not stale"
    );
    assert!(store.get_worker(id).await.unwrap().is_active);
    assert!(store.mark_worker_lost(id, 1_001).await.unwrap());
    let lost = store.get_worker(id).await.unwrap();
    assert!(!lost.is_active);
    assert_eq!(lost.last_heartbeat, 1_000);
    assert!(
        !store.mark_worker_lost(id, 1_001).await.unwrap(),
        "inactive already"
    );
    expect_not_found(
        store.mark_worker_lost(&unique_id("nope"), 1).await,
        "unknown worker",
    );
}

pub async fn transition_attempt_applies_only_at_that_attempt(store: &dyn Store) {
    let user = unique_id("user");
    let task = sample_task_at(&unique_id("task"), &user, TaskStatus::Queued, at_ms(0));
    insert(store, &task).await;
    let id = task.task_id.as_str();
    let now = now();
    store
        .claim_task(id, "host-a", now + chrono::Duration::seconds(30), now)
        .await
        .unwrap();
    store.mark_running(id, "host-a", 2).await.unwrap();
    let update = TaskUpdate {
        status_reason: Some(Some("requeued".into())),
        ..TaskUpdate::default()
    };
    let actual = expect_conflict(
        store
            .transition_attempt(id, 1, &[TaskStatus::Running], TaskStatus::Queued, &update)
            .await,
        "an earlier attempt",
    );
    assert!(actual.contains("attempt 2"), "{actual}");
    let unchanged = store.get_task(id).await.unwrap();
    assert_eq!(
        (unchanged.status, unchanged.status_reason),
        (TaskStatus::Running, None)
    );
    let moved = store
        .transition_attempt(id, 2, &[TaskStatus::Running], TaskStatus::Queued, &update)
        .await
        .unwrap();
    assert_eq!(moved.status, TaskStatus::Queued);
    assert_eq!(moved.attempts, 2, "attempts kept");
    assert_eq!(moved.status_reason.as_deref(), Some("requeued"));
    expect_conflict(
        store
            .transition_attempt(id, 2, &[TaskStatus::Running], TaskStatus::Failed, &update)
            .await,
        "not running any more",
    );
    expect_not_found(
        store
            .transition_attempt(
                &unique_id("nope"),
                1,
                &[TaskStatus::Running],
                TaskStatus::Failed,
                &update,
            )
            .await,
        "unknown task",
    );
}

pub async fn clear_expired_claims_clears_only_expired_claims_of_queued_tasks(store: &dyn Store) {
    // Far in the past, so that no other test's claim is expired by these instants.
    let base = long_ago(-50_000_000);
    let user = unique_id("user");
    let queued = |n: i64| {
        sample_task_at(
            &unique_id("task"),
            &user,
            TaskStatus::Queued,
            base + chrono::Duration::milliseconds(n),
        )
    };
    let (expired, live, unclaimed) = (queued(0), queued(1), queued(2));
    for t in [&expired, &live, &unclaimed] {
        insert(store, t).await;
    }
    let secs = |s: i64| base + chrono::Duration::seconds(s);
    store
        .claim_task(&expired.task_id, "host-a", secs(10), secs(0))
        .await
        .unwrap();
    store
        .claim_task(&live.task_id, "host-b", secs(100), secs(0))
        .await
        .unwrap();
    let cleared = store.clear_expired_claims(secs(20), 1000).await.unwrap();
    let cleared_ids = ids(&cleared);
    assert!(cleared_ids.contains(&expired.task_id), "{cleared_ids:?}");
    assert!(!cleared_ids.contains(&live.task_id));
    assert!(!cleared_ids.contains(&unclaimed.task_id));
    let mine = cleared
        .iter()
        .find(|t| t.task_id == expired.task_id)
        .unwrap();
    assert_eq!(mine.owner.as_deref(), Some("host-a"), "returned as before");
    let after = store.get_task(&expired.task_id).await.unwrap();
    assert_eq!(
        (after.status, after.owner, after.lease_expires_at),
        (TaskStatus::Queued, None, None)
    );
    let kept = store.get_task(&live.task_id).await.unwrap();
    assert_eq!(kept.owner.as_deref(), Some("host-b"));
    let again = store.clear_expired_claims(secs(20), 1000).await.unwrap();
    assert!(!ids(&again).contains(&expired.task_id), "cleared once");
}

pub async fn repair_allocation_applies_only_to_the_observed_values(store: &dyn Store) {
    let w = worker_with(store, "w", Resources::new(4.0, 8.0, 10.0, 1.0)).await;
    let id = w.worker_id.as_str();
    assert!(
        store
            .reserve(id, &Resources::new(1.0, 2.0, 0.0, 0.0))
            .await
            .unwrap()
    );
    let observed = store.get_worker(id).await.unwrap();
    // A reserve after the observation: the repair must not apply (it would lose it).
    assert!(
        store
            .reserve(id, &Resources::new(1.0, 1.0, 0.0, 0.0))
            .await
            .unwrap()
    );
    let expected = Resources::new(0.5, 1.0, 0.0, 0.0);
    assert!(!store.repair_allocation(&observed, &expected).await.unwrap());
    let unchanged = store.get_worker(id).await.unwrap();
    assert_eq!(unchanged.allocated(), Resources::new(2.0, 3.0, 0.0, 0.0));
    assert!(
        store
            .repair_allocation(&unchanged, &expected)
            .await
            .unwrap()
    );
    let repaired = store.get_worker(id).await.unwrap();
    assert_invariant(&repaired, "after a repair");
    assert_eq!(repaired.allocated(), expected);
    assert_eq!(repaired.available(), Resources::new(3.5, 7.0, 10.0, 1.0));
    let mut ghost = repaired.clone();
    ghost.worker_id = unique_id("nope");
    expect_not_found(
        store.repair_allocation(&ghost, &expected).await,
        "unknown worker",
    );
}

// ------------------------------------------------------------------------------------------
// Live logs and output files
// ------------------------------------------------------------------------------------------

pub async fn log_chunks_are_stored_once_and_listed_in_order_after_a_position(store: &dyn Store) {
    let task_id = unique_id("task");
    let chunk = |attempt: u32, seq: u64, stream: &str, text: &str| TaskLogChunk {
        task_id: task_id.clone(),
        attempt,
        seq,
        stream: stream.to_string(),
        text: text.to_string(),
    };
    // Written out of order, across two attempts; another task's chunk must not show.
    for c in [
        chunk(2, 0, "stdout", "second attempt\n"),
        chunk(1, 1, "stderr", "ünïcödé err\n"),
        chunk(1, 0, "stdout", "a\n"),
        chunk(1, 2, "stdout", "b\n"),
    ] {
        assert!(store.insert_log_chunk(&c).await.unwrap(), "{c:?}");
    }
    let mut other = chunk(1, 0, "stdout", "other task");
    other.task_id = unique_id("task");
    assert!(store.insert_log_chunk(&other).await.unwrap());

    // A retried send keeps the first chunk.
    assert!(
        !store
            .insert_log_chunk(&chunk(1, 0, "stdout", "retry"))
            .await
            .unwrap()
    );

    let all = store.list_log_chunks(&task_id, None, 100).await.unwrap();
    let order: Vec<(u32, u64, &str)> = all
        .iter()
        .map(|c| (c.attempt, c.seq, c.text.as_str()))
        .collect();
    assert_eq!(
        order,
        vec![
            (1, 0, "a\n"),
            (1, 1, "ünïcödé err\n"),
            (1, 2, "b\n"),
            (2, 0, "second attempt\n"),
        ]
    );
    assert_eq!(all[1], chunk(1, 1, "stderr", "ünïcödé err\n"));

    let after = store
        .list_log_chunks(&task_id, Some((1, 1)), 100)
        .await
        .unwrap();
    assert_eq!(
        after.iter().map(|c| (c.attempt, c.seq)).collect::<Vec<_>>(),
        vec![(1, 2), (2, 0)]
    );
    let limited = store.list_log_chunks(&task_id, None, 2).await.unwrap();
    assert_eq!(limited.len(), 2);
    assert!(
        store
            .list_log_chunks(&task_id, Some((2, 0)), 100)
            .await
            .unwrap()
            .is_empty()
    );
}

pub async fn output_files_round_trip_in_chunks_and_are_replaced_by_path(store: &dyn Store) {
    let task_id = unique_id("task");
    // Larger than one chunk, so that reassembly is exercised.
    let big: Vec<u8> = (0..POLICY_CHUNK_BYTES + 1234)
        .map(|i| (i % 251) as u8)
        .collect();
    let info = store
        .put_output_file(&task_id, 1, "d/big.bin", &big)
        .await
        .unwrap();
    assert_eq!(info.size_bytes, big.len() as u64);
    assert_eq!(info.sha256, sha256_hex(&big));
    store
        .put_output_file(&task_id, 1, "a.txt", b"first")
        .await
        .unwrap();
    store
        .put_output_file(&unique_id("task"), 1, "a.txt", b"other task")
        .await
        .unwrap();

    let listed = store.list_output_files(&task_id).await.unwrap();
    assert_eq!(
        listed
            .iter()
            .map(|f| (f.path.as_str(), f.size_bytes))
            .collect::<Vec<_>>(),
        vec![("a.txt", 5), ("d/big.bin", big.len() as u64)]
    );
    let (got_info, got) = store.get_output_file(&task_id, "d/big.bin").await.unwrap();
    assert_eq!(got_info, info);
    assert_eq!(got, big);

    // A later upload of the same path (a retry, a later attempt) replaces it.
    store
        .put_output_file(&task_id, 2, "a.txt", b"second")
        .await
        .unwrap();
    let (info, bytes) = store.get_output_file(&task_id, "a.txt").await.unwrap();
    assert_eq!((info.attempt, bytes.as_slice()), (2, b"second".as_slice()));
    assert_eq!(store.list_output_files(&task_id).await.unwrap().len(), 2);

    // An empty file is a file.
    store
        .put_output_file(&task_id, 2, "empty", b"")
        .await
        .unwrap();
    assert!(
        store
            .get_output_file(&task_id, "empty")
            .await
            .unwrap()
            .1
            .is_empty()
    );

    expect_not_found(
        store.get_output_file(&task_id, "missing").await,
        "an absent output file",
    );
    assert!(
        store
            .list_output_files(&unique_id("task"))
            .await
            .unwrap()
            .is_empty()
    );
}

// ------------------------------------------------------------------------------------------
// Events
// ------------------------------------------------------------------------------------------

fn sample_event(kind: &str, at: DateTime<Utc>, n: u32) -> NewEvent {
    NewEvent {
        topic: "task".into(),
        kind: kind.into(),
        at,
        task_id: Some(format!("task-{n}")),
        worker_id: n.is_multiple_of(2).then(|| "w-1".to_string()),
        user_id: Some("alice".into()),
        data: serde_json::json!({"n": n, "status": "queued", "reason": null}),
    }
}

pub async fn events_get_increasing_ids_and_read_back_in_order(store: &dyn Store) {
    assert_eq!(
        store.event_bounds().await.unwrap(),
        EventBounds { oldest: 1, head: 0 }
    );
    assert!(store.append_events(&[]).await.unwrap().is_empty());
    let at = now();
    let first: Vec<NewEvent> = (0..3).map(|n| sample_event("state", at, n)).collect();
    let second: Vec<NewEvent> = (3..5).map(|n| sample_event("submitted", at, n)).collect();
    let mut ids = store.append_events(&first).await.unwrap();
    ids.extend(store.append_events(&second).await.unwrap());
    assert_eq!(ids.len(), 5);
    assert!(
        ids.windows(2).all(|w| w[0] < w[1]),
        "ids not increasing: {ids:?}"
    );
    assert!(ids[0] >= 1);

    let all = store.events_after(0, 100).await.unwrap();
    assert_eq!(all.iter().map(|e| e.id).collect::<Vec<_>>(), ids);
    let sent: Vec<NewEvent> = first.into_iter().chain(second).collect();
    for (stored, sent) in all.iter().zip(&sent) {
        assert_eq!(&stored.event, sent, "event {} round trip", stored.id);
    }
    let page = store.events_after(ids[2], 2).await.unwrap();
    assert_eq!(page.iter().map(|e| e.id).collect::<Vec<_>>(), ids[3..5]);
    let one = store.events_after(ids[1], 1).await.unwrap();
    assert_eq!(one.iter().map(|e| e.id).collect::<Vec<_>>(), [ids[2]]);
    assert!(store.events_after(ids[4], 10).await.unwrap().is_empty());

    let bounds = store.event_bounds().await.unwrap();
    assert_eq!(bounds.head, ids[4]);
    assert!(bounds.oldest <= ids[0], "{bounds:?}");
}

/// A read that leaves out ids the reader holds: none of them comes back, every other id up to
/// where the read says it went does, in order.
pub async fn events_read_except_known_ids_covers_the_rest(store: &dyn Store) {
    let at = now();
    let batch: Vec<NewEvent> = (0..10).map(|n| sample_event("state", at, n)).collect();
    let ids = store.append_events(&batch).await.unwrap();
    let known: std::collections::BTreeSet<u64> = [ids[1], ids[2], ids[4], ids[9]].into();
    let check = |read: &crate::EventRead, after: u64| {
        let got: Vec<u64> = read.events.iter().map(|e| e.id).collect();
        let upto = read.covered_to.unwrap_or(u64::MAX);
        let want: Vec<u64> = ids
            .iter()
            .copied()
            .filter(|id| *id > after && *id <= upto && !known.contains(id))
            .collect();
        assert_eq!(got, want, "covered to {:?}", read.covered_to);
    };
    let all = store.events_after_except(0, 100, &known).await.unwrap();
    assert_eq!(all.covered_to, None, "everything was read");
    check(&all, 0);
    // A limit stops the read somewhere; it says where, and nothing before it is missing.
    let mut after = 0;
    let mut seen = Vec::new();
    for _ in 0..20 {
        let read = store.events_after_except(after, 2, &known).await.unwrap();
        check(&read, after);
        seen.extend(read.events.iter().map(|e| e.id));
        match read.covered_to {
            Some(to) => {
                assert!(to > after, "the read made no progress");
                after = to;
            }
            None => break,
        }
    }
    let others: Vec<u64> = ids
        .iter()
        .copied()
        .filter(|id| !known.contains(id))
        .collect();
    assert_eq!(seen, others);
}

pub async fn pruning_removes_old_events_as_a_prefix(store: &dyn Store) {
    let recent = now();
    let old = recent - chrono::Duration::hours(2);
    let batch = [
        sample_event("state", old, 0),
        sample_event("state", old, 1),
        sample_event("state", old, 2),
        sample_event("state", recent, 3),
        sample_event("state", recent, 4),
        // Older than its predecessors (another replica's clock): kept with them.
        sample_event("state", old, 5),
    ];
    let ids = store.append_events(&batch).await.unwrap();
    let cutoff = recent - chrono::Duration::hours(1);
    assert_eq!(store.prune_events(cutoff).await.unwrap(), 3);
    let left = store.events_after(0, 100).await.unwrap();
    assert_eq!(left.iter().map(|e| e.id).collect::<Vec<_>>(), ids[3..]);
    let bounds = store.event_bounds().await.unwrap();
    assert_eq!(bounds.oldest, ids[3], "{bounds:?}");
    assert_eq!(bounds.head, ids[5]);
    // Reading from before the floor starts at the floor.
    assert_eq!(store.events_after(ids[0], 1).await.unwrap()[0].id, ids[3]);
    assert_eq!(store.prune_events(cutoff).await.unwrap(), 0);

    assert_eq!(
        store
            .prune_events(recent + chrono::Duration::minutes(1))
            .await
            .unwrap(),
        3
    );
    assert!(store.events_after(0, 100).await.unwrap().is_empty());
    assert_eq!(
        store.event_bounds().await.unwrap(),
        EventBounds {
            oldest: ids[5] + 1,
            head: ids[5]
        }
    );
    let next = store
        .append_events(&[sample_event("state", recent, 6)])
        .await
        .unwrap();
    assert!(
        next[0] > ids[5],
        "an id was given twice: {next:?} after {ids:?}"
    );
}

pub async fn concurrent_event_appends_get_distinct_ids(store: Arc<dyn Store>) {
    let at = now();
    let writers = (0..8u32).map(|w| {
        let store = store.clone();
        tokio::spawn(async move {
            let mut ids = Vec::new();
            for b in 0..4u32 {
                let batch: Vec<NewEvent> = (0..3)
                    .map(|n| sample_event("state", at, w * 100 + b * 10 + n))
                    .collect();
                let got = store.append_events(&batch).await.unwrap();
                assert!(got.windows(2).all(|p| p[0] < p[1]), "{got:?}");
                ids.extend(got);
            }
            ids
        })
    });
    let mut ids: Vec<u64> = Vec::new();
    for writer in writers {
        ids.extend(writer.await.unwrap());
    }
    let mut distinct = ids.clone();
    distinct.sort_unstable();
    distinct.dedup();
    assert_eq!(distinct.len(), 96, "ids given twice");
    let mut read = Vec::new();
    let mut after = 0;
    loop {
        let page = store.events_after(after, 40).await.unwrap();
        let Some(last) = page.last() else { break };
        after = last.id;
        read.extend(page.into_iter().map(|e| e.id));
    }
    assert_eq!(read, distinct);
}

pub async fn task_counts_count_every_status_and_follow_transitions(store: &dyn Store) {
    // Deltas from what the store held before, so that the test holds in a shared database.
    let before = store.task_counts().await.unwrap();
    let user = unique_id("user");
    let wanted = [
        (TaskStatus::Pending, 3),
        (TaskStatus::Queued, 2),
        (TaskStatus::Running, 4),
        (TaskStatus::Completed, 5),
        (TaskStatus::Failed, 1),
        (TaskStatus::Cancelled, 0),
    ];
    for (status, n) in wanted {
        for _ in 0..n {
            let task = sample_task_at(&unique_id("task"), &user, status, now());
            store.insert_task(&task, None).await.unwrap();
        }
    }
    let after = store.task_counts().await.unwrap();
    for (status, n) in wanted {
        assert_eq!(
            after.get(status) - before.get(status),
            n,
            "{status:?}: before {before:?}, after {after:?}"
        );
    }
    assert_eq!(after.queue_depth() - before.queue_depth(), 5);

    // A transition moves one task from one count to the other.
    let task = sample_task(&unique_id("task"), &user);
    store.insert_task(&task, None).await.unwrap();
    store
        .transition_task(
            &task.task_id,
            &[TaskStatus::Pending],
            TaskStatus::Cancelled,
            &TaskUpdate::default(),
        )
        .await
        .unwrap();
    let moved = store.task_counts().await.unwrap();
    let mut expected = after;
    expected.add(TaskStatus::Cancelled, 1);
    assert_eq!(moved, expected);
    assert_eq!(
        TaskStatus::ALL.iter().map(|s| moved.get(*s)).sum::<u64>(),
        TaskStatus::ALL.iter().map(|s| before.get(*s)).sum::<u64>() + 16
    );
    assert_ne!(moved, TaskCounts::default());
}

pub async fn count_assignments_since_counts_only_assignments_at_or_after_the_instant(
    store: &dyn Store,
) {
    // Far in the future, so that no other assignment of a shared database counts.
    let base = now() + chrono::Duration::days(365 * 100);
    let worker = worker_with(store, "w", Resources::new(8.0, 8.0, 8.0, 0.0)).await;
    let req = Resources::new(1.0, 1.0, 0.0, 0.0);
    let mut released = None;
    for offset_ms in [-60_000, -1, 0, 1, 30_000] {
        let a = Assignment {
            assigned_at: base + chrono::Duration::milliseconds(offset_ms),
            ..sample_assignment(
                &unique_id("ass"),
                &unique_id("task"),
                &worker.worker_id,
                req,
            )
        };
        assert!(store.reserve(&worker.worker_id, &req).await.unwrap());
        store.insert_assignment(&a).await.unwrap();
        released = Some(a.ass_id);
    }
    assert_eq!(store.count_assignments_since(base).await.unwrap(), 3);
    // A released assignment was still a placement.
    assert!(store.release(&released.unwrap()).await.unwrap());
    assert_eq!(store.count_assignments_since(base).await.unwrap(), 3);
    assert_eq!(
        store
            .count_assignments_since(base - chrono::Duration::minutes(1))
            .await
            .unwrap(),
        5
    );
    assert_eq!(
        store
            .count_assignments_since(base + chrono::Duration::minutes(1))
            .await
            .unwrap(),
        0
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sqlite::SqliteStore;

    #[tokio::test]
    async fn into_test_store_accepts_every_documented_shape() {
        let dir = tempfile::tempdir().unwrap();
        let open = || SqliteStore::open_in_dir(dir.path()).unwrap();
        let shapes: Vec<Option<TestStore>> = vec![
            TestStore::new(open()).into_test_store(),
            (Arc::new(open()) as Arc<dyn Store>).into_test_store(),
            (Box::new(open()) as Box<dyn Store>).into_test_store(),
            (open(), "a guard").into_test_store(),
            Some((open(), 7_u8)).into_test_store(),
        ];
        for shape in shapes {
            let harness = shape.expect("a store was given");
            harness.store().ping().await.unwrap();
            harness.shared().ping().await.unwrap();
        }
        assert!(None::<TestStore>.into_test_store().is_none(), "None skips");
    }
}
