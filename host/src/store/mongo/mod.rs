//! The MongoDB store: the seed's collections and indexes, written only through single-document
//! atomic operations (no multi-document transactions, no change streams), so that several
//! host replicas can share one replica set.
//!
//! This file connects and holds the one `impl Store for MongoStore`, which delegates to the
//! modules by concern:
//! - [`schema`]: collections and indexes at start-up;
//! - [`codec`]: documents <-> model types, and the [`Reader`] of stored fields;
//! - [`tasks`], [`workers`], [`assignments`] (reserve and release), [`results`], [`leases`],
//!   [`logs`], [`blobs`] (policy versions and output files), [`events`];
//! - [`compat`]: what exists only for FerretDB 1.x, the test server.

use std::collections::BTreeMap;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use mongodb::bson::{Document, doc};
use mongodb::error::{ErrorKind, WriteFailure};
use mongodb::options::{
    Acknowledgment, ClientOptions, ReadConcern, ReadPreference, SelectionCriteria,
};
use mongodb::{Client, Collection, Database};

use super::{
    AssignmentFilter, EventBounds, IdempotencyKey, NewEvent, OutputFileInfo, Result, RuntimeSample,
    Store, StoreError, StoredEvent, SubmitOutcome, TaskCounts, TaskLogChunk, TaskPage, TaskQuery,
    TaskUpdate,
};
use crate::model::{
    ActivePolicy, Assignment, PolicyKind, PolicyVersion, Resources, Task, TaskResult, TaskStatus,
    Worker, WorkerUsage,
};
use crate::policy::snapshot::Usage;

/// The seed's collection names (a contract: never renamed).
pub const TASKS: &str = "TASKS";
pub const WORKER_REGISTRY: &str = "WORKER_REGISTRY";
pub const ASSIGNMENTS: &str = "ASSIGNMENTS";
pub const RESULTS: &str = "RESULTS";
/// Our addition: one document per (user, idempotency key), `_id` = `"<user_id>/<key>"`.
pub const IDEMPOTENCY_KEYS: &str = "IDEMPOTENCY_KEYS";
/// Our addition: one document per policy version (its metadata), unique on (name, version),
/// naming the `upload_id` of its chunks.
pub const POLICIES: &str = "POLICIES";
/// Our addition: a policy component's bytes, one document per chunk of
/// [`POLICY_CHUNK_BYTES`](super::POLICY_CHUNK_BYTES), unique on (upload_id, n). Chunks are
/// written before the version's document and keyed by a fresh upload id, so an interrupted
/// upload leaves only unreferenced chunks (never a version without bytes) and a retry of the
/// same version never collides with them.
pub const POLICY_CHUNKS: &str = "POLICY_CHUNKS";
/// Our addition: one document per policy kind, `_id` = the kind: the active version. The
/// unique `_id` makes the first activation of a kind race-safe.
pub const ACTIVE_POLICIES: &str = "ACTIVE_POLICIES";
/// Leases between host replicas (the reconciler's): `{_id: name, holder, expires_at}`.
pub const LEASES: &str = "LEASES";
/// Our addition: live output of running tasks, one document per chunk, unique on (task_id,
/// attempt, seq).
pub const TASK_LOGS: &str = "TASK_LOGS";
/// Our addition: one document per output file of a task, unique on (task_id, path), naming
/// the `upload_id` of its chunks (written first, as for policies).
pub const TASK_OUTPUTS: &str = "TASK_OUTPUTS";
/// Our addition: an output file's bytes in chunks, unique on (upload_id, n).
pub const TASK_OUTPUT_CHUNKS: &str = "TASK_OUTPUT_CHUNKS";

/// How long the driver looks for a usable server before an operation fails, unless the URI
/// sets `serverSelectionTimeoutMS`: short, so that a dead or unreachable server is reported
/// clearly at start-up instead of after the driver's 30 s default.
pub const DEFAULT_SERVER_SELECTION_TIMEOUT: Duration = Duration::from_secs(10);

mod assignments;
mod blobs;
mod codec;
mod compat;
mod events;
mod leases;
mod logs;
mod results;
mod schema;
mod tasks;
#[cfg(test)]
pub mod testing;
mod workers;

pub use events::{COUNTERS, EVENTS};

/// MongoDB's duplicate-key error code.
const DUPLICATE_KEY: i32 = 11000;
/// `NamespaceExists`: a collection created concurrently by another replica.
const NAMESPACE_EXISTS: i32 = 48;

/// [`Store`] on MongoDB 7.0+ (tested against FerretDB, which speaks the same protocol).
///
/// Cheap to clone: the driver's [`Client`] is one shared connection pool.
#[derive(Clone, Debug)]
pub struct MongoStore {
    db: Database,
    /// The server is FerretDB 1.x: see [`MongoStore::serializes_writes`].
    ferretdb_version: Option<String>,
    /// The FerretDB 1.x write lock shared by every replica: see [`compat`].
    write_lock: Collection<Document>,
    tasks: Collection<Document>,
    workers: Collection<Document>,
    assignments: Collection<Document>,
    results: Collection<Document>,
    idempotency: Collection<Document>,
    policies: Collection<Document>,
    policy_chunks: Collection<Document>,
    active_policies: Collection<Document>,
    leases: Collection<Document>,
    task_logs: Collection<Document>,
    task_outputs: Collection<Document>,
    task_output_chunks: Collection<Document>,
}

impl MongoStore {
    /// Connects to `uri`, uses `database`, and creates the collections and indexes that are
    /// missing (idempotent: safe to run on every start-up, by several replicas at once).
    ///
    /// Production defaults, each applied **only when the URI does not set it**:
    /// - write concern `majority` with journaling (`w=majority&journal=true`) and retryable
    ///   writes on;
    /// - read concern `majority`, reads from the primary (`readPreference=primary`).
    ///
    /// Why: a reservation is a conditional `$inc` on a worker document. With `w:1` the primary
    /// acknowledges it before any secondary has it; if that primary then fails over, the new
    /// primary never saw the write and it is rolled back, yet the host that got the
    /// acknowledgement has already started the task. Another host then reserves the same
    /// capacity and the worker is overcommitted. Majority-acknowledged writes survive a
    /// failover, and majority reads from the primary never plan on data that can still be
    /// rolled back. Retryable writes make a write interrupted by a failover apply once.
    ///
    /// The server-selection timeout defaults to [`DEFAULT_SERVER_SELECTION_TIMEOUT`]
    /// (`serverSelectionTimeoutMS` in the URI overrides it), so an unreachable server fails
    /// here with a clear error.
    pub async fn connect(uri: &str, database: &str) -> Result<Self, StoreError> {
        let mut options = ClientOptions::parse(uri)
            .await
            .map_err(|e| StoreError::backend("parsing the MongoDB URI", e))?;
        apply_production_defaults(&mut options);
        let hosts = options
            .hosts
            .iter()
            .map(|h| h.to_string())
            .collect::<Vec<_>>()
            .join(",");
        let client = Client::with_options(options)
            .map_err(|e| StoreError::backend("creating the MongoDB client", e))?;
        let db = client.database(database);
        let mut store = MongoStore {
            ferretdb_version: None,
            write_lock: db.collection(compat::LOCK_COLLECTION),
            tasks: db.collection(TASKS),
            workers: db.collection(WORKER_REGISTRY),
            assignments: db.collection(ASSIGNMENTS),
            results: db.collection(RESULTS),
            idempotency: db.collection(IDEMPOTENCY_KEYS),
            policies: db.collection(POLICIES),
            policy_chunks: db.collection(POLICY_CHUNKS),
            active_policies: db.collection(ACTIVE_POLICIES),
            leases: db.collection(LEASES),
            task_logs: db.collection(TASK_LOGS),
            task_outputs: db.collection(TASK_OUTPUTS),
            task_output_chunks: db.collection(TASK_OUTPUT_CHUNKS),
            db,
        };
        store
            .ensure_schema()
            .await
            .map_err(|e| match e {
                StoreError::Backend { context, source } => StoreError::Backend {
                    context: format!(
                        "{context} (MongoDB at {hosts}, database '{database}': is the server running and reachable?)"
                    ),
                    source,
                },
                other => other,
            })?;
        store.ferretdb_version = store.detect_ferretdb().await?;
        if let Some(version) = &store.ferretdb_version {
            tracing::warn!(
                ferretdb_version = %version,
                "the MongoDB server is FerretDB 1.x, whose updates are not atomic: every \
                 conditional write takes a lock on its document (slower; meant for tests). Use \
                 MongoDB 7+ in production"
            );
        }
        Ok(store)
    }

    /// The database this store uses.
    pub fn database(&self) -> &Database {
        &self.db
    }
}

/// Fills in the production defaults the URI left unset (see [`MongoStore::connect`]).
fn apply_production_defaults(options: &mut ClientOptions) {
    let mut write_concern = options.write_concern.take().unwrap_or_default();
    if write_concern.w.is_none() {
        write_concern.w = Some(Acknowledgment::Majority);
    }
    // `j: true` is invalid with an unacknowledged `w: 0`, which only an explicit URI can ask for.
    if write_concern.journal.is_none() && write_concern.w != Some(Acknowledgment::Nodes(0)) {
        write_concern.journal = Some(true);
    }
    options.write_concern = Some(write_concern);
    if options.retry_writes.is_none() {
        options.retry_writes = Some(true);
    }
    if options.read_concern.is_none() {
        options.read_concern = Some(ReadConcern::majority());
    }
    if options.selection_criteria.is_none() {
        options.selection_criteria =
            Some(SelectionCriteria::ReadPreference(ReadPreference::Primary));
    }
    if options.server_selection_timeout.is_none() {
        options.server_selection_timeout = Some(DEFAULT_SERVER_SELECTION_TIMEOUT);
    }
    if options.app_name.is_none() {
        options.app_name = Some("cloudai".to_owned());
    }
}

#[async_trait]
impl Store for MongoStore {
    fn backend_name(&self) -> &'static str {
        "mongodb"
    }

    async fn ping(&self) -> Result<()> {
        self.db
            .run_command(doc! { "ping": 1 })
            .await
            .map_err(|e| StoreError::backend("pinging MongoDB", e))?;
        Ok(())
    }

    async fn insert_task(
        &self,
        task: &Task,
        idempotency: Option<&IdempotencyKey>,
    ) -> Result<SubmitOutcome> {
        self.insert_task_impl(task, idempotency).await
    }

    async fn get_task(&self, task_id: &str) -> Result<Task> {
        self.get_task_impl(task_id).await
    }

    async fn list_tasks(&self, query: &TaskQuery) -> Result<TaskPage> {
        self.list_tasks_impl(query).await
    }

    async fn transition_task(
        &self,
        task_id: &str,
        from: &[TaskStatus],
        to: TaskStatus,
        update: &TaskUpdate,
    ) -> Result<Task> {
        self.transition(task_id, None, from, to, update).await
    }

    async fn claim_task(
        &self,
        task_id: &str,
        owner: &str,
        lease_until: DateTime<Utc>,
        now: DateTime<Utc>,
    ) -> Result<Task> {
        self.claim_task_impl(task_id, owner, lease_until, now).await
    }

    async fn request_cancel(&self, task_id: &str) -> Result<Task> {
        self.request_cancel_impl(task_id).await
    }

    async fn insert_worker(&self, worker: &Worker) -> Result<()> {
        self.insert_worker_impl(worker).await
    }

    async fn get_worker(&self, worker_id: &str) -> Result<Worker> {
        self.get_worker_impl(worker_id).await
    }

    async fn list_workers(&self) -> Result<Vec<Worker>> {
        self.list_workers_impl().await
    }

    async fn heartbeat(
        &self,
        worker_id: &str,
        at_unix: i64,
        usage: Option<&WorkerUsage>,
    ) -> Result<Worker> {
        self.heartbeat_impl(worker_id, at_unix, usage).await
    }

    async fn set_draining(&self, worker_id: &str, draining: bool) -> Result<Worker> {
        self.set_draining_impl(worker_id, draining).await
    }

    async fn set_worker_active(&self, worker_id: &str, active: bool) -> Result<Worker> {
        self.set_worker_active_impl(worker_id, active).await
    }

    async fn delete_worker(&self, worker_id: &str) -> Result<()> {
        self.delete_worker_impl(worker_id).await
    }

    async fn reserve(&self, worker_id: &str, request: &Resources) -> Result<bool> {
        self.reserve_impl(worker_id, request).await
    }

    async fn insert_assignment(&self, assignment: &Assignment) -> Result<()> {
        self.insert_assignment_impl(assignment).await
    }

    async fn get_assignment(&self, ass_id: &str) -> Result<Assignment> {
        self.get_assignment_impl(ass_id).await
    }

    async fn list_assignments(&self, filter: &AssignmentFilter) -> Result<Vec<Assignment>> {
        self.list_assignments_impl(filter).await
    }

    async fn release(&self, ass_id: &str) -> Result<bool> {
        self.release_impl(ass_id).await
    }

    async fn insert_result(&self, result: &TaskResult) -> Result<()> {
        self.insert_result_impl(result).await
    }

    async fn get_result(&self, task_id: &str) -> Result<TaskResult> {
        self.get_result_impl(task_id).await
    }

    async fn recent_runtimes(&self, limit: u32) -> Result<Vec<RuntimeSample>> {
        self.recent_runtimes_impl(limit).await
    }

    async fn insert_policy_version(&self, version: &PolicyVersion, bytes: &[u8]) -> Result<()> {
        self.insert_policy_version_impl(version, bytes).await
    }

    async fn get_policy_version(&self, name: &str, version: &str) -> Result<PolicyVersion> {
        self.get_policy_version_impl(name, version).await
    }

    async fn get_policy_bytes(&self, name: &str, version: &str) -> Result<Vec<u8>> {
        self.get_policy_bytes_impl(name, version).await
    }

    async fn list_policy_versions(&self, name: Option<&str>) -> Result<Vec<PolicyVersion>> {
        self.list_policy_versions_impl(name).await
    }

    async fn delete_policy_version(&self, name: &str, version: &str) -> Result<()> {
        self.delete_policy_version_impl(name, version).await
    }

    async fn get_active_policy(&self, kind: PolicyKind) -> Result<Option<ActivePolicy>> {
        self.get_active_policy_impl(kind).await
    }

    async fn activate_policy(
        &self,
        kind: PolicyKind,
        name: &str,
        version: &str,
        activated_by: &str,
        expected_current: Option<(String, String)>,
    ) -> Result<ActivePolicy> {
        self.activate_policy_impl(kind, name, version, activated_by, expected_current)
            .await
    }

    async fn clear_active_policy(
        &self,
        kind: PolicyKind,
        expected_current: (String, String),
    ) -> Result<()> {
        self.clear_active_policy_impl(kind, expected_current).await
    }

    async fn user_usage(&self, user_id: &str) -> Result<Usage> {
        self.user_usage_impl(user_id).await
    }

    async fn admission_batch(&self, limit: u32, due_before: DateTime<Utc>) -> Result<Vec<Task>> {
        self.admission_batch_impl(limit, due_before).await
    }

    async fn claimable_tasks(
        &self,
        limit: u32,
        now: DateTime<Utc>,
        exclude_users: &[String],
    ) -> Result<Vec<Task>> {
        self.claimable_tasks_impl(limit, now, exclude_users).await
    }

    async fn active_assignment_counts(&self) -> Result<BTreeMap<String, u32>> {
        self.active_assignment_counts_impl().await
    }

    async fn running_counts(&self, users: &[String]) -> Result<BTreeMap<String, u32>> {
        self.running_counts_impl(users).await
    }

    async fn mark_running(&self, task_id: &str, owner: &str, attempts: u32) -> Result<Task> {
        self.mark_running_impl(task_id, owner, attempts).await
    }

    async fn unclaim_task(&self, task_id: &str, owner: &str) -> Result<bool> {
        self.unclaim_task_impl(task_id, owner).await
    }

    async fn unreserve(&self, worker_id: &str, request: &Resources) -> Result<bool> {
        self.unreserve_impl(worker_id, request).await
    }

    async fn acquire_lease(
        &self,
        name: &str,
        holder: &str,
        until: DateTime<Utc>,
        now: DateTime<Utc>,
    ) -> Result<bool> {
        self.acquire_lease_impl(name, holder, until, now).await
    }

    async fn release_lease(&self, name: &str, holder: &str) -> Result<bool> {
        self.release_lease_impl(name, holder).await
    }

    async fn mark_worker_lost(&self, worker_id: &str, heartbeat_before: i64) -> Result<bool> {
        self.mark_worker_lost_impl(worker_id, heartbeat_before)
            .await
    }

    async fn transition_attempt(
        &self,
        task_id: &str,
        attempt: u32,
        from: &[TaskStatus],
        to: TaskStatus,
        update: &TaskUpdate,
    ) -> Result<Task> {
        self.transition(task_id, Some(attempt), from, to, update)
            .await
    }

    async fn clear_expired_claims(&self, now: DateTime<Utc>, limit: u32) -> Result<Vec<Task>> {
        self.clear_expired_claims_impl(now, limit).await
    }

    async fn repair_allocation(&self, observed: &Worker, allocated: &Resources) -> Result<bool> {
        self.repair_allocation_impl(observed, allocated).await
    }

    async fn insert_log_chunk(&self, chunk: &TaskLogChunk) -> Result<bool> {
        self.insert_log_chunk_impl(chunk).await
    }

    async fn list_log_chunks(
        &self,
        task_id: &str,
        after: Option<(u32, u64)>,
        limit: u32,
    ) -> Result<Vec<TaskLogChunk>> {
        self.list_log_chunks_impl(task_id, after, limit).await
    }

    async fn put_output_file(
        &self,
        task_id: &str,
        attempt: u32,
        path: &str,
        bytes: &[u8],
    ) -> Result<OutputFileInfo> {
        self.put_output_file_impl(task_id, attempt, path, bytes)
            .await
    }

    async fn list_output_files(&self, task_id: &str) -> Result<Vec<OutputFileInfo>> {
        self.list_output_files_impl(task_id).await
    }

    async fn get_output_file(
        &self,
        task_id: &str,
        path: &str,
    ) -> Result<(OutputFileInfo, Vec<u8>)> {
        self.get_output_file_impl(task_id, path).await
    }

    async fn append_events(&self, events: &[NewEvent]) -> Result<Vec<u64>> {
        self.append_events_impl(events).await
    }

    async fn events_after(&self, after: u64, limit: u32) -> Result<Vec<StoredEvent>> {
        self.events_after_impl(after, limit).await
    }

    async fn events_after_except(
        &self,
        after: u64,
        limit: u32,
        known: &std::collections::BTreeSet<u64>,
    ) -> Result<crate::store::EventRead> {
        self.events_after_except_impl(after, limit, known).await
    }

    async fn event_bounds(&self) -> Result<EventBounds> {
        self.event_bounds_impl().await
    }

    async fn prune_events(&self, before: DateTime<Utc>) -> Result<u64> {
        self.prune_events_impl(before).await
    }

    async fn task_counts(&self) -> Result<TaskCounts> {
        self.task_counts_impl().await
    }

    async fn count_assignments_since(&self, since: DateTime<Utc>) -> Result<u64> {
        self.count_assignments_since_impl(since).await
    }
}

// ----- errors -----

pub(super) fn not_found(kind: &'static str, id: &str) -> StoreError {
    StoreError::NotFound {
        kind,
        id: id.to_owned(),
    }
}

/// The server's error code, wherever the driver put it.
pub(super) fn error_code(e: &mongodb::error::Error) -> Option<i32> {
    match e.kind.as_ref() {
        ErrorKind::Command(c) => Some(c.code),
        ErrorKind::Write(WriteFailure::WriteError(w)) => Some(w.code),
        ErrorKind::Write(WriteFailure::WriteConcernError(w)) => Some(w.code),
        _ => None,
    }
}

pub(super) fn is_duplicate_key(e: &mongodb::error::Error) -> bool {
    error_code(e) == Some(DUPLICATE_KEY)
}

/// The shared store conformance suite, on a fresh database per test.
#[cfg(test)]
mod conformance {
    crate::store_conformance_tests!(super::testing::connect_test_store());
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    #[tokio::test]
    async fn production_defaults_fill_only_what_the_uri_left_unset() {
        let mut bare = ClientOptions::parse("mongodb://127.0.0.1:27017/")
            .await
            .unwrap();
        apply_production_defaults(&mut bare);
        let wc = bare.write_concern.unwrap();
        assert_eq!(wc.w, Some(Acknowledgment::Majority));
        assert_eq!(wc.journal, Some(true));
        assert_eq!(bare.retry_writes, Some(true));
        assert_eq!(bare.read_concern, Some(ReadConcern::majority()));
        assert!(matches!(
            bare.selection_criteria,
            Some(SelectionCriteria::ReadPreference(ReadPreference::Primary))
        ));
        assert_eq!(
            bare.server_selection_timeout,
            Some(DEFAULT_SERVER_SELECTION_TIMEOUT)
        );

        let mut explicit = ClientOptions::parse(
            "mongodb://127.0.0.1:27017/?w=1&journal=false&retryWrites=false\
             &readConcernLevel=local&readPreference=secondaryPreferred\
             &serverSelectionTimeoutMS=1500",
        )
        .await
        .unwrap();
        apply_production_defaults(&mut explicit);
        let wc = explicit.write_concern.unwrap();
        assert_eq!(wc.w, Some(Acknowledgment::Nodes(1)));
        assert_eq!(wc.journal, Some(false));
        assert_eq!(explicit.retry_writes, Some(false));
        assert_eq!(explicit.read_concern, Some(ReadConcern::local()));
        assert!(!matches!(
            explicit.selection_criteria,
            Some(SelectionCriteria::ReadPreference(ReadPreference::Primary))
        ));
        assert_eq!(
            explicit.server_selection_timeout,
            Some(Duration::from_millis(1500))
        );
    }

    #[tokio::test]
    async fn unreachable_server_fails_with_a_clear_error() {
        // Port 1 on loopback: nothing listens there.
        let started = std::time::Instant::now();
        let err = MongoStore::connect(
            "mongodb://127.0.0.1:1/?serverSelectionTimeoutMS=300",
            "cloudai_unreachable",
        )
        .await
        .unwrap_err();
        let message = err.to_string();
        assert!(message.contains("127.0.0.1:1"), "{message}");
        assert!(message.contains("reachable"), "{message}");
        assert!(started.elapsed() < Duration::from_secs(5));
    }
}
