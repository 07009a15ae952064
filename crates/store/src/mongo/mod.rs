//! The MongoDB store: the seed's collections and indexes, written only through single-document
//! atomic operations (no multi-document transactions, no change streams), so that several
//! host replicas can share one replica set.
//!
//! This file connects and holds the one `impl Store for MongoStore`, which delegates to the
//! modules by concern:
//! - [`schema`]: collections, indexes and the schema version at start-up;
//! - [`codec`]: documents <-> model types, and the [`codec::Reader`] of stored fields;
//! - [`tasks`], [`workers`], [`assignments`] (reserve and release), [`results`], [`leases`],
//!   [`logs`], [`blobs`] (policy versions and output files), [`events`];
//! - [`compat`]: what exists only for FerretDB 1.x, the test server, taken where
//!   [`ServerKind`] says so.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use mongodb::bson::{Document, doc};
use mongodb::error::{ErrorKind, WriteFailure};
use mongodb::event::EventHandler;
use mongodb::event::command::CommandEvent;
use mongodb::options::{
    Acknowledgment, ClientOptions, ReadConcern, ReadPreference, SelectionCriteria,
};
use mongodb::{Client, Collection, Database};

use super::{
    ArraySummary, AssignmentFilter, AssignmentStore, BlobStore, EventBounds, EventStore,
    IdempotencyKey, LeaseStore, NewEvent, OutputFileInfo, Result, RuntimeSample, Store, StoreError,
    StoredEvent, SubmitOutcome, TaskCounts, TaskLogChunk, TaskPage, TaskQuery, TaskStore,
    TaskUpdate, WorkerStore,
};
use crate::model::Usage;
use crate::model::{
    ActivePolicy, Assignment, Dependency, PolicyKind, PolicyVersion, Resources, Task, TaskResult,
    TaskStatus, Worker, WorkerUsage,
};

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

/// The batch size of the reads every placement round makes over whole collections (the
/// worker registry, the active assignments per worker): one reply instead of a `getMore` per
/// 101 documents; the server still caps a reply at 16 MiB.
const LISTING_BATCH: u32 = 100_000;

mod assignments;
mod blobs;
mod codec;
mod compat;
mod events;
mod leases;
mod logs;
mod placement;
mod preemption;
mod results;
mod schema;
mod tasks;
#[cfg(any(test, feature = "test-support"))]
pub mod testing;
mod workers;

pub use compat::LOCK_COLLECTION;
pub use events::{COUNTERS, EVENTS};
pub use schema::{META, SCHEMA_VERSION};

/// MongoDB's duplicate-key error code.
pub(super) const DUPLICATE_KEY: i32 = 11000;
/// `NamespaceExists`: a collection created concurrently by another replica.
const NAMESPACE_EXISTS: i32 = 48;

/// Which server a [`MongoStore`] talks to, read from `buildInfo` once at connect: the one switch
/// between the native path, written for MongoDB, and the workarounds FerretDB 1.x needs, which
/// live in [`compat`]. Every place that behaves differently matches on it, and the native path
/// never changes for FerretDB's sake.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ServerKind {
    /// MongoDB 7.0+, or FerretDB 2.x (whose updates are atomic): the native path.
    MongoDb,
    /// FerretDB 1.x, the test server: the native path with the overrides in [`compat`].
    FerretDb1 { version: String },
}

/// [`Store`] on MongoDB 7.0+ (tested against FerretDB 1.24, which speaks the same protocol:
/// see [`ServerKind`]).
///
/// Cheap to clone: the driver's [`Client`] is one shared connection pool.
#[derive(Clone, Debug)]
pub struct MongoStore {
    db: Database,
    /// Commands this store's client has sent (the driver's command monitoring): what the
    /// scheduler bench reports per placement.
    commands: Arc<AtomicU64>,
    /// The path this store takes: see [`ServerKind`].
    server: ServerKind,
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
    /// Connects to `uri`, uses `database`, tells MongoDB from FerretDB 1.x (see
    /// [`ServerKind`]), refuses a database whose [`SCHEMA_VERSION`] is newer than this code's,
    /// creates the collections and indexes that are missing, and converts what an older
    /// release wrote (all idempotent: safe to run on every start-up, by several replicas at
    /// once).
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
        Self::open(uri, database, None, |_| {}).await
    }

    /// [`Self::connect`], taking the path of `server` whatever `buildInfo` says. For
    /// measurements: the scheduler bench counts the commands of the MongoDB path on FerretDB
    /// 1.x, the only MongoDB-protocol server installable where it was built. Never run
    /// [`ServerKind::MongoDb`]'s path against FerretDB 1.x with more than one writer: its
    /// updates are not atomic there (see [`compat`]).
    pub async fn connect_as_server(
        uri: &str,
        database: &str,
        server: ServerKind,
    ) -> Result<Self, StoreError> {
        Self::open(uri, database, Some(server), |_| {}).await
    }

    /// [`Self::connect`], taking the path of `server` whatever `buildInfo` says, with the
    /// client's options adjusted by `configure` (e.g. a command monitor). For tests only: the
    /// native path on FerretDB 1.x is not atomic (see [`compat`]), so only tests that run one
    /// write at a time may use it, each on a fresh database (FerretDB 1.24 cannot repeat the
    /// native `createIndexes` on existing indexes).
    #[cfg(any(test, feature = "test-support"))]
    pub(crate) async fn connect_as(
        uri: &str,
        database: &str,
        server: ServerKind,
        configure: impl FnOnce(&mut ClientOptions),
    ) -> Result<Self, StoreError> {
        Self::open(uri, database, Some(server), configure).await
    }

    async fn open(
        uri: &str,
        database: &str,
        forced: Option<ServerKind>,
        configure: impl FnOnce(&mut ClientOptions),
    ) -> Result<Self, StoreError> {
        let mut options = ClientOptions::parse(uri)
            .await
            .map_err(|e| StoreError::backend("parsing the MongoDB URI", e))?;
        apply_production_defaults(&mut options);
        let commands = Arc::new(AtomicU64::new(0));
        let counted = commands.clone();
        options.command_event_handler = Some(EventHandler::callback(move |event| {
            if matches!(event, CommandEvent::Started(_)) {
                counted.fetch_add(1, Ordering::Relaxed);
            }
        }));
        configure(&mut options);
        let hosts = options
            .hosts
            .iter()
            .map(|h| h.to_string())
            .collect::<Vec<_>>()
            .join(",");
        let unreachable = |e: StoreError| match e {
            StoreError::Backend { context, source } => StoreError::Backend {
                context: format!(
                    "{context} (MongoDB at {hosts}, database '{database}': is the server running and reachable?)"
                ),
                source,
            },
            other => other,
        };
        let client = Client::with_options(options)
            .map_err(|e| StoreError::backend("creating the MongoDB client", e))?;
        let db = client.database(database);
        // First, because the schema itself is created differently on FerretDB 1.x.
        let server = match forced {
            Some(server) => server,
            None => compat::detect(&db).await.map_err(unreachable)?,
        };
        if let ServerKind::FerretDb1 { version } = &server {
            tracing::warn!(
                ferretdb_version = %version,
                "the MongoDB server is FerretDB 1.x, whose updates are not atomic: every \
                 conditional write takes a lock on its document (slower; meant for tests). Use \
                 MongoDB 7+ in production"
            );
        }
        let store = MongoStore {
            commands,
            server,
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
        let found = store.stored_schema_version().await.map_err(unreachable)?;
        schema::check_schema_version(found, database)?;
        store.ensure_schema().await.map_err(unreachable)?;
        if found < SCHEMA_VERSION {
            store.migrate_from(found).await?;
        }
        Ok(store)
    }

    /// The server this store talks to, as detected at connect.
    pub fn server_kind(&self) -> &ServerKind {
        &self.server
    }

    /// The database this store uses.
    pub fn database(&self) -> &Database {
        &self.db
    }

    /// How many commands this store has sent to the server so far (every `find`, `getMore`,
    /// `update`, ... of its client, including those of its FerretDB write locks).
    pub fn commands_started(&self) -> u64 {
        self.commands.load(Ordering::Relaxed)
    }
}

/// Fills in the production defaults the URI left unset (see [`MongoStore::connect`]).
pub(crate) fn apply_production_defaults(options: &mut ClientOptions) {
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

    async fn worker_work(&self, worker_id: &str) -> Result<Vec<(Assignment, Task)>> {
        self.worker_work_impl(worker_id).await
    }

    async fn place_round(&self, plan: &crate::RoundPlan) -> Result<crate::RoundOutcome> {
        self.place_round_impl(plan).await
    }
}

#[async_trait]
impl TaskStore for MongoStore {
    async fn insert_task(
        &self,
        task: &Task,
        idempotency: Option<&IdempotencyKey>,
    ) -> Result<SubmitOutcome> {
        self.insert_task_impl(task, idempotency).await
    }

    async fn insert_tasks(
        &self,
        tasks: &[Task],
        idempotency: Option<&IdempotencyKey>,
    ) -> Result<SubmitOutcome> {
        self.insert_tasks_impl(tasks, idempotency).await
    }

    async fn array_summary(&self, array_id: &str) -> Result<ArraySummary> {
        self.array_summary_impl(array_id).await
    }

    async fn awaiting_dependency_sets(&self, limit: u32) -> Result<Vec<Vec<Dependency>>> {
        self.awaiting_dependency_sets_impl(limit).await
    }

    async fn awaiting_tasks(
        &self,
        dependencies: &[Dependency],
        limit: u32,
        after: Option<&str>,
    ) -> Result<Vec<Task>> {
        self.awaiting_tasks_impl(dependencies, limit, after).await
    }

    async fn transition_tasks(
        &self,
        task_ids: &[String],
        from: &[TaskStatus],
        to: TaskStatus,
        update: &TaskUpdate,
    ) -> Result<Vec<Task>> {
        self.transition_tasks_impl(task_ids, from, to, update).await
    }

    async fn release_tasks(&self, task_ids: &[String]) -> Result<Vec<Task>> {
        self.release_tasks_impl(task_ids).await
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

    async fn request_preemption(
        &self,
        victims: &[(String, u32)],
        by: &str,
        reason: &str,
    ) -> Result<Vec<String>> {
        self.request_preemption_impl(victims, by, reason).await
    }

    async fn preemptible_running(
        &self,
        below_priority: i32,
        limit: u32,
    ) -> Result<Vec<(Task, Assignment)>> {
        self.preemptible_running_impl(below_priority, limit).await
    }

    async fn preemptions_in_progress(&self) -> Result<BTreeMap<String, u32>> {
        self.preemptions_in_progress_impl().await
    }

    async fn user_usage(&self, user_id: &str) -> Result<Usage> {
        match self.server {
            ServerKind::MongoDb => self.user_usage_impl(user_id).await,
            ServerKind::FerretDb1 { .. } => self.user_usage_ferretdb1(user_id).await,
        }
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

    async fn running_counts(&self, users: &[String]) -> Result<BTreeMap<String, u32>> {
        self.running_counts_impl(users).await
    }

    async fn mark_running(&self, task_id: &str, owner: &str, attempts: u32) -> Result<Task> {
        self.mark_running_impl(task_id, owner, attempts).await
    }

    async fn unclaim_task(&self, task_id: &str, owner: &str) -> Result<bool> {
        self.unclaim_task_impl(task_id, owner).await
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

    async fn task_counts(&self) -> Result<TaskCounts> {
        self.task_counts_impl().await
    }
}

#[async_trait]
impl WorkerStore for MongoStore {
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

    async fn accounting_epochs(&self, worker_ids: &[&str]) -> Result<HashMap<String, i64>> {
        self.accounting_epochs_impl(worker_ids).await
    }

    async fn unreserve(
        &self,
        worker_id: &str,
        request: &Resources,
        epoch: Option<i64>,
    ) -> Result<bool> {
        self.unreserve_impl(worker_id, request, epoch).await
    }

    async fn mark_worker_lost(&self, worker_id: &str, heartbeat_before: i64) -> Result<bool> {
        self.mark_worker_lost_impl(worker_id, heartbeat_before)
            .await
    }

    async fn repair_allocation(&self, observed: &Worker, allocated: &Resources) -> Result<bool> {
        self.repair_allocation_impl(observed, allocated).await
    }
}

#[async_trait]
impl AssignmentStore for MongoStore {
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
        self.release_impl(ass_id, false).await
    }

    async fn release_unstarted(&self, ass_id: &str) -> Result<bool> {
        self.release_impl(ass_id, true).await
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

    async fn active_assignment_counts(&self) -> Result<BTreeMap<String, u32>> {
        self.active_assignment_counts_impl().await
    }

    async fn count_assignments_since(&self, since: DateTime<Utc>) -> Result<u64> {
        self.count_assignments_since_impl(since).await
    }
}

#[async_trait]
impl BlobStore for MongoStore {
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
}

#[async_trait]
impl EventStore for MongoStore {
    async fn append_events(&self, events: &[NewEvent]) -> Result<Vec<u64>> {
        self.append_events_impl(events).await
    }

    async fn events_after(&self, after: u64, limit: u32) -> Result<Vec<StoredEvent>> {
        match self.server {
            ServerKind::MongoDb => self.events_after_impl(after, limit).await,
            ServerKind::FerretDb1 { .. } => self.events_after_ferretdb1(after, limit).await,
        }
    }

    async fn events_after_except(
        &self,
        after: u64,
        limit: u32,
        known: &std::collections::BTreeSet<u64>,
    ) -> Result<crate::EventRead> {
        match self.server {
            ServerKind::MongoDb => self.events_after_except_impl(after, limit, known).await,
            ServerKind::FerretDb1 { .. } => {
                self.events_after_except_ferretdb1(after, limit, known)
                    .await
            }
        }
    }

    async fn event_bounds(&self) -> Result<EventBounds> {
        self.event_bounds_impl().await
    }

    async fn prune_events(&self, before: DateTime<Utc>) -> Result<u64> {
        match self.server {
            ServerKind::MongoDb => self.prune_events_impl(before).await,
            ServerKind::FerretDb1 { .. } => self.prune_events_ferretdb1(before).await,
        }
    }
}

#[async_trait]
impl LeaseStore for MongoStore {
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

/// The error of inserting the `kind` record `id`: `AlreadyExists` when its unique key is
/// taken, else a backend error saying what was inserted.
pub(super) fn insert_error(e: mongodb::error::Error, kind: &'static str, id: &str) -> StoreError {
    if is_duplicate_key(&e) {
        StoreError::AlreadyExists {
            kind,
            id: id.to_string(),
        }
    } else {
        StoreError::backend(format!("inserting {kind} '{id}'"), e)
    }
}

/// The shared store conformance suite, on a fresh database per test, on the path the server
/// calls for (on FerretDB 1.x, with the overrides of [`compat`]).
#[cfg(test)]
mod conformance {
    crate::store_conformance_tests!(super::testing::connect_test_store());
}

/// Runs the conformance cases that write one at a time on the native path whatever the server
/// is ([`testing::connect_native_test_store`]): against FerretDB 1.x, that is how the code
/// written for MongoDB is tested here. `CASES` lists them for the check below.
#[cfg(test)]
macro_rules! native_conformance_cases {
    ($($name:ident),* $(,)?) => {
        mod conformance_native {
            crate::store_conformance_tests!(@borrowed super::testing::connect_native_test_store(); $($name),*);
            pub(super) const CASES: &[&str] = &[$(stringify!($name)),*];
        }
    };
}

#[cfg(test)]
native_conformance_cases!(
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
    end_attempt_records_the_result_ends_the_task_and_releases_once,
    preemption_asks_only_running_preemptible_tasks_to_stop_once,
    a_preempted_task_ends_its_attempt_queued_again_and_released_once,
);

/// The suite's serial cases that [`native_conformance_cases`] leaves out, and why.
#[cfg(test)]
const NOT_NATIVE_ON_FERRETDB: &[(&str, &str)] = &[
    (
        "user_usage_counts_open_tasks_and_sums_running_requests",
        "FerretDB 1.24 answers 0 for every accumulator of a $group but the first (see \
         compat::MongoStore::user_usage_ferretdb1); the native decoding is tested in tasks.rs",
    ),
    (
        "worker_work_lists_the_assignments_that_hold_their_running_task",
        "FerretDB 1.24 has no $lookup (see compat::MongoStore::worker_work_ferretdb1); the \
         native decoding of the joined documents is tested in assignments.rs",
    ),
];

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    /// Every serial case of the suite runs on the native path too, or is listed with a reason:
    /// a case added to the suite and not here fails this test.
    #[test]
    fn every_serial_conformance_case_runs_natively_or_says_why_not() {
        let suite = include_str!("../conformance.rs");
        let macro_at = suite
            .find("macro_rules! store_conformance_tests")
            .expect("conformance.rs defines store_conformance_tests!");
        let list_at = macro_at
            + suite[macro_at..].find("(@borrowed $make;").expect(
                "store_conformance_tests! lists its serial cases after `(@borrowed $make;`",
            )
            + "(@borrowed $make;".len();
        let list_end = list_at
            + suite[list_at..]
                .find(");")
                .expect("the list ends with `);`");
        let serial: Vec<&str> = suite[list_at..list_end]
            .split(',')
            .map(str::trim)
            .filter(|name| !name.is_empty())
            .collect();
        assert!(serial.len() > 50, "parsed {serial:?}");
        let missing: Vec<&&str> = serial
            .iter()
            .filter(|name| {
                !conformance_native::CASES.contains(name)
                    && !NOT_NATIVE_ON_FERRETDB.iter().any(|(n, _)| n == *name)
            })
            .collect();
        assert!(
            missing.is_empty(),
            "add these conformance cases to native_conformance_cases! in store/mongo/mod.rs \
             (or to NOT_NATIVE_ON_FERRETDB, with the reason): {missing:?}"
        );
        for name in conformance_native::CASES {
            assert!(
                serial.contains(name),
                "{name} is not a serial case of the suite"
            );
        }
    }

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
