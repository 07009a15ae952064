//! The MongoDB store: the seed's collections and indexes, written only through single-document
//! atomic operations (no multi-document transactions, no change streams), so that several
//! host replicas can share one replica set.
//!
//! Every stored document is built and read by the explicit `*_to_document` / `*_from_document`
//! functions below rather than by serde, so the stored shape is exactly the seed's (field names,
//! BSON types: dates as BSON dates, `last_heartbeat` as Int64 Unix seconds, resources as
//! doubles) with this project's additions beside it, and a malformed stored document is
//! reported with the field that is wrong.

use std::collections::BTreeMap;
use std::future::IntoFuture;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use futures::TryStreamExt;
use mongodb::bson::{self, Bson, Document, doc};
use mongodb::error::{ErrorKind, WriteFailure};
use mongodb::options::{
    Acknowledgment, ClientOptions, IndexOptions, ReadConcern, ReadPreference, ReturnDocument,
    SelectionCriteria,
};
use mongodb::{Client, Collection, Database, IndexModel};

use super::{
    AssignmentFilter, EventBounds, IdempotencyKey, NewEvent, OutputFileInfo, POLICY_CHUNK_BYTES,
    Result, RuntimeSample, Store, StoreError, StoredEvent, SubmitOutcome, TaskCounts, TaskLogChunk,
    TaskPage, TaskQuery, TaskUpdate, active_label, policy_label, policy_sha256,
    verify_output_bytes, verify_policy_bytes,
};
use crate::model::{
    self, ActivePolicy, Assignment, PolicyKind, PolicyVersion, Resources, ResultStatus, Task,
    TaskResult, TaskStatus, Worker, WorkerUsage,
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

mod events;
mod ferretdb_lock;

pub use events::{COUNTERS, EVENTS};

/// MongoDB's duplicate-key error code.
const DUPLICATE_KEY: i32 = 11000;
/// `NamespaceExists`: a collection created concurrently by another replica.
const NAMESPACE_EXISTS: i32 = 48;

/// The name of one document for [`MongoStore::atomic`]: its collection and natural key.
fn lock_key(collection: &str, id: &str) -> String {
    format!("{collection}/{id}")
}

/// [`Store`] on MongoDB 7.0+ (tested against FerretDB, which speaks the same protocol).
///
/// Cheap to clone: the driver's [`Client`] is one shared connection pool.
#[derive(Clone, Debug)]
pub struct MongoStore {
    db: Database,
    /// The server is FerretDB 1.x: see [`MongoStore::serializes_writes`].
    ferretdb_version: Option<String>,
    /// The FerretDB 1.x write lock shared by every replica: see [`ferretdb_lock`].
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
            write_lock: db.collection(ferretdb_lock::LOCK_COLLECTION),
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

    /// True when the server is FerretDB 1.x, whose `update` and `findAndModify` are not atomic:
    /// they read the matching document, apply the change in FerretDB's own process, and write
    /// the whole document back by `_id` without re-checking the filter (FerretDB issue #3040,
    /// "SQLite handler also does not handle update in a transaction"). Two concurrent
    /// conditional updates can then both apply and an `$inc` can be lost: 50 concurrent
    /// reservations for room for 7 had 29 to 49 winners in our measurements.
    ///
    /// Against FerretDB this store therefore runs each conditional single-document write under
    /// a lock on that document, shared by every replica: a lock document in the database, taken
    /// by inserting it (inserts are atomic on FerretDB, whose backend enforces unique indexes).
    /// That is exactly the guarantee MongoDB gives every single-document write, no more (a
    /// sequence of writes is never made atomic this way), at the cost of two more round trips
    /// per write. Inserts are not locked.
    pub fn serializes_writes(&self) -> bool {
        self.ferretdb_version.is_some()
    }

    /// The version of FerretDB 1.x (or older), from the `ferretdbVersion` field its `buildInfo`
    /// adds; `None` for MongoDB and for FerretDB 2, which runs on PostgreSQL with DocumentDB
    /// and whose updates are atomic.
    async fn detect_ferretdb(&self) -> Result<Option<String>> {
        let info = self
            .db
            .run_command(doc! { "buildInfo": 1 })
            .await
            .map_err(|e| StoreError::backend("reading the server's buildInfo", e))?;
        Ok(match info.get("ferretdbVersion") {
            Some(Bson::String(version))
                if version.trim_start_matches('v').starts_with("1.")
                    || version.trim_start_matches('v').starts_with("0.") =>
            {
                Some(version.clone())
            }
            _ => None,
        })
    }

    /// Runs one single-document write on the document that `key` names (see [`lock_key`]).
    /// On FerretDB 1.x it runs under that document's store-wide [`ferretdb_lock`], shared by
    /// every replica, which makes it as atomic as MongoDB makes it; writes to different
    /// documents still run side by side.
    async fn atomic<T, F>(&self, key: String, write: F) -> mongodb::error::Result<T>
    where
        F: IntoFuture<Output = mongodb::error::Result<T>>,
    {
        if self.ferretdb_version.is_none() {
            return write.await;
        }
        let held = ferretdb_lock::acquire(&self.write_lock, key).await?;
        let outcome = write.await;
        if let Err(e) = held.release().await {
            // The write itself is done; the lock expires on its own.
            tracing::warn!(error = %e, "releasing a FerretDB write lock");
        }
        outcome
    }

    /// [`Store::release`]'s two steps: the once-only guard on the assignment, then the
    /// amounts back to the worker.
    async fn release_in_two_steps(&self, ass_id: &str) -> Result<bool> {
        // Step 1, the once-only guard: exactly one caller flips `released`.
        let before = self.atomic(lock_key(ASSIGNMENTS, ass_id), self.assignments.find_one_and_update(
                doc! { "ass_id": ass_id, "released": { "$ne": true } },
                doc! { "$set": { "released": true, "released_at": to_bson_date(model::now()) } },
            )
            .return_document(ReturnDocument::Before))
.await
            .map_err(|e| StoreError::backend(format!("releasing assignment '{ass_id}'"), e))?;
        let Some(before) = before else {
            // Already released, or no such assignment.
            self.get_assignment(ass_id).await?;
            return Ok(false);
        };
        let assignment = assignment_from_document(&before)?;
        let amount = assignment.request();
        // Step 2: give the amounts back. A crash between the two steps leaves the capacity
        // held (under-used, never overcommitted); the reconciler recomputes `allocated_*` from
        // the active assignments and repairs that drift.
        let outcome = self
            .atomic(
                lock_key(WORKER_REGISTRY, &assignment.worker_id),
                self.workers.update_one(
                    doc! { "worker_id": &assignment.worker_id },
                    doc! {
                        "$inc": {
                            "allocated_cpu": -amount.cpu,
                            "allocated_memory": -amount.memory,
                            "allocated_storage": -amount.storage,
                            "allocated_gpu": -amount.gpu,
                            "available_cpu": amount.cpu,
                            "available_memory": amount.memory,
                            "available_storage": amount.storage,
                            "available_gpu": amount.gpu,
                        },
                        "$set": { "updated_at": to_bson_date(model::now()) },
                    },
                ),
            )
            .await
            .map_err(|e| {
                StoreError::backend(
                    format!(
                        "returning the reservation of assignment '{ass_id}' to worker '{}'",
                        assignment.worker_id
                    ),
                    e,
                )
            })?;
        if outcome.matched_count == 0 {
            tracing::warn!(
                ass_id,
                worker_id = %assignment.worker_id,
                "released an assignment whose worker no longer exists"
            );
        }
        Ok(true)
    }

    /// The database this store uses.
    pub fn database(&self) -> &Database {
        &self.db
    }

    /// Creates the seed's collections and every index it lists, plus ours. Creating an index
    /// whose specification already exists is a no-op on the server, so this is idempotent.
    async fn ensure_schema(&self) -> Result<()> {
        let existing = self
            .db
            .list_collection_names()
            .await
            .map_err(|e| StoreError::backend("listing collections", e))?;
        for name in [
            TASKS,
            WORKER_REGISTRY,
            ASSIGNMENTS,
            RESULTS,
            IDEMPOTENCY_KEYS,
            POLICIES,
            POLICY_CHUNKS,
            ACTIVE_POLICIES,
            LEASES,
            TASK_LOGS,
            TASK_OUTPUTS,
            TASK_OUTPUT_CHUNKS,
            EVENTS,
            COUNTERS,
        ] {
            if existing.iter().any(|n| n == name) {
                continue;
            }
            if let Err(e) = self.db.create_collection(name).await
                && error_code(&e) != Some(NAMESPACE_EXISTS)
            {
                return Err(StoreError::backend(
                    format!("creating collection {name}"),
                    e,
                ));
            }
        }

        let unique = |keys: Document| {
            IndexModel::builder()
                .keys(keys)
                .options(IndexOptions::builder().unique(true).build())
                .build()
        };
        let plain = |keys: Document| IndexModel::builder().keys(keys).build();
        let indexes: [(&Collection<Document>, &str, Vec<IndexModel>); 9] = [
            (
                &self.tasks,
                TASKS,
                vec![
                    // The seed's.
                    unique(doc! { "task_id": 1 }),
                    plain(doc! { "status": 1 }),
                    plain(doc! { "created_at": -1 }),
                    // Ours: the newest-first listings, per user and per status.
                    plain(doc! { "user_id": 1, "created_at": -1, "task_id": -1 }),
                    plain(doc! { "status": 1, "created_at": -1, "task_id": -1 }),
                    // The scheduler's: a user's usage, the admission batch, the queue.
                    plain(doc! { "user_id": 1, "status": 1 }),
                    plain(doc! { "status": 1, "updated_at": 1, "task_id": 1 }),
                    plain(doc! { "status": 1, "priority": -1, "created_at": 1, "task_id": 1 }),
                ],
            ),
            (
                &self.workers,
                WORKER_REGISTRY,
                vec![
                    unique(doc! { "worker_id": 1 }),
                    plain(doc! { "is_active": 1 }),
                    plain(doc! { "last_heartbeat": -1 }),
                ],
            ),
            (
                &self.assignments,
                ASSIGNMENTS,
                vec![
                    unique(doc! { "ass_id": 1 }),
                    plain(doc! { "task_id": 1 }),
                    plain(doc! { "worker_id": 1 }),
                    plain(doc! { "released": 1, "worker_id": 1 }),
                    // The overview's placements of the last minute.
                    plain(doc! { "assigned_at": 1 }),
                ],
            ),
            (
                &self.results,
                RESULTS,
                vec![
                    unique(doc! { "task_id": 1 }),
                    plain(doc! { "worker_id": 1 }),
                    plain(doc! { "completed_at": -1 }),
                ],
            ),
            (
                &self.policies,
                POLICIES,
                vec![
                    unique(doc! { "name": 1, "version": 1 }),
                    plain(doc! { "name": 1, "uploaded_at": 1 }),
                ],
            ),
            (
                &self.policy_chunks,
                POLICY_CHUNKS,
                vec![unique(doc! { "upload_id": 1, "n": 1 })],
            ),
            (
                &self.task_logs,
                TASK_LOGS,
                vec![unique(doc! { "task_id": 1, "attempt": 1, "seq": 1 })],
            ),
            (
                &self.task_outputs,
                TASK_OUTPUTS,
                vec![unique(doc! { "task_id": 1, "path": 1 })],
            ),
            (
                &self.task_output_chunks,
                TASK_OUTPUT_CHUNKS,
                vec![unique(doc! { "upload_id": 1, "n": 1 })],
            ),
        ];
        for (collection, name, models) in indexes {
            // One index per command: FerretDB 1.24 panics (and drops the connection) when one
            // `createIndexes` names two or more indexes that already exist (its
            // `validateIndexesForCreation` deletes from a shrinking slice by the original
            // position). One at a time is equally idempotent on MongoDB, and runs only at
            // start-up.
            for model in models {
                collection.create_index(model).await.map_err(|e| {
                    StoreError::backend(format!("creating the indexes of {name}"), e)
                })?;
            }
        }
        Ok(())
    }

    async fn find_policy(&self, name: &str, version: &str) -> Result<Option<Document>> {
        self.policies
            .find_one(doc! { "name": name, "version": version })
            .await
            .map_err(|e| {
                StoreError::backend(
                    format!("reading policy version {}", policy_label(name, version)),
                    e,
                )
            })
    }

    async fn require_policy(&self, name: &str, version: &str) -> Result<Document> {
        self.find_policy(name, version)
            .await?
            .ok_or_else(|| not_found("policy version", &policy_label(name, version)))
    }

    async fn find_active_policy(&self, kind: PolicyKind) -> Result<Option<ActivePolicy>> {
        self.active_policies
            .find_one(doc! { "_id": kind.as_str() })
            .await
            .map_err(|e| StoreError::backend(format!("reading the active {kind} policy"), e))?
            .map(|d| active_policy_from_document(&d))
            .transpose()
    }

    /// Removes the chunks of one output upload (best effort: unreferenced either way).
    async fn delete_output_chunks(&self, upload_id: &str) {
        if let Err(error) = self
            .atomic(
                lock_key(TASK_OUTPUT_CHUNKS, upload_id),
                self.task_output_chunks
                    .delete_many(doc! { "upload_id": upload_id }),
            )
            .await
        {
            tracing::warn!(upload_id, %error, "deleting the chunks of an output upload");
        }
    }

    /// Removes the chunks of one upload (after its version's document is gone, or when that
    /// document was never written).
    async fn delete_chunks(&self, upload_id: &str) -> Result<()> {
        self.atomic(
            lock_key(POLICY_CHUNKS, upload_id),
            self.policy_chunks
                .delete_many(doc! { "upload_id": upload_id }),
        )
        .await
        .map_err(|e| {
            StoreError::backend(format!("deleting the chunks of upload {upload_id}"), e)
        })?;
        Ok(())
    }

    /// Undoes an activation that raced with the deletion of its version: puts back the
    /// document it replaced (or removes it, for a first activation), only while it is still
    /// exactly the one this activation wrote.
    async fn revert_activation(&self, ours: &ActivePolicy, before: Option<Document>) -> Result<()> {
        let filter = doc! {
            "_id": ours.kind.as_str(),
            "name": &ours.name,
            "version": &ours.version,
            "activated_at": to_bson_date(ours.activated_at),
            "activated_by": &ours.activated_by,
        };
        let outcome = match before {
            Some(before) => self
                .atomic(
                    lock_key(ACTIVE_POLICIES, ours.kind.as_str()),
                    self.active_policies.replace_one(filter, before),
                )
                .await
                .map(drop),
            None => self
                .atomic(
                    lock_key(ACTIVE_POLICIES, ours.kind.as_str()),
                    self.active_policies.delete_one(filter),
                )
                .await
                .map(drop),
        };
        outcome.map_err(|e| {
            StoreError::backend(
                format!(
                    "reverting the activation of {}",
                    policy_label(&ours.name, &ours.version)
                ),
                e,
            )
        })
    }

    async fn find_task(&self, task_id: &str) -> Result<Option<Task>> {
        self.tasks
            .find_one(doc! { "task_id": task_id })
            .await
            .map_err(|e| StoreError::backend(format!("reading task '{task_id}'"), e))?
            .map(|d| task_from_document(&d))
            .transpose()
    }

    async fn find_worker(&self, worker_id: &str) -> Result<Option<Worker>> {
        self.workers
            .find_one(doc! { "worker_id": worker_id })
            .await
            .map_err(|e| StoreError::backend(format!("reading worker '{worker_id}'"), e))?
            .map(|d| worker_from_document(&d))
            .transpose()
    }

    /// Applies `update` to the worker and returns it after; `NotFound` when there is none.
    async fn update_worker(&self, worker_id: &str, update: Document, what: &str) -> Result<Worker> {
        let after = self
            .atomic(
                lock_key(WORKER_REGISTRY, worker_id),
                self.workers
                    .find_one_and_update(doc! { "worker_id": worker_id }, update)
                    .return_document(ReturnDocument::After),
            )
            .await
            .map_err(|e| StoreError::backend(format!("{what} of worker '{worker_id}'"), e))?;
        match after {
            Some(d) => worker_from_document(&d),
            None => Err(not_found("worker", worker_id)),
        }
    }

    /// A conditional transition (see [`Store::transition_task`]); with `attempt`, only while
    /// the task's `attempts` equals it.
    async fn transition(
        &self,
        task_id: &str,
        attempt: Option<u32>,
        from: &[TaskStatus],
        to: TaskStatus,
        update: &TaskUpdate,
    ) -> Result<Task> {
        let from_names: Vec<&str> = from.iter().map(|s| s.as_str()).collect();
        let mut filter = doc! { "task_id": task_id, "status": { "$in": from_names.clone() } };
        if let Some(attempt) = attempt {
            filter.insert("attempts", i64::from(attempt));
        }
        let mut set = doc! { "status": to.as_str(), "updated_at": to_bson_date(model::now()) };
        let mut unset = Document::new();
        if let Some(at) = update.started_at {
            set.insert("started_at", to_bson_date(at));
        }
        if let Some(at) = update.completed_at {
            set.insert("completed_at", to_bson_date(at));
        }
        if let Some(code) = update.exit_code {
            set.insert("exit_code", code);
        }
        if let Some(error) = &update.error {
            set.insert("error", error.as_str());
        }
        match &update.status_reason {
            Some(Some(reason)) => {
                set.insert("status_reason", reason.as_str());
            }
            Some(None) => {
                unset.insert("status_reason", "");
            }
            None => {}
        }
        if update.clear_claim {
            unset.insert("owner", "");
            unset.insert("lease_expires_at", "");
        }
        let mut changes = doc! { "$set": set };
        if !unset.is_empty() {
            changes.insert("$unset", unset);
        }
        if update.increment_attempts {
            changes.insert("$inc", doc! { "attempts": 1_i64 });
        }

        let mut expected = if from.is_empty() {
            "(no state)".to_owned()
        } else {
            from_names.join(" or ")
        };
        if let Some(attempt) = attempt {
            expected = format!("{expected} at attempt {attempt}");
        }
        let mut actual = String::new();
        // The re-read after a miss can find the task back in an expected state (it moved away
        // and back in between): then the update is simply tried again.
        for _ in 0..3 {
            let after = self
                .atomic(
                    lock_key(TASKS, task_id),
                    self.tasks
                        .find_one_and_update(filter.clone(), changes.clone())
                        .return_document(ReturnDocument::After),
                )
                .await
                .map_err(|e| StoreError::backend(format!("moving task '{task_id}' to {to}"), e))?;
            if let Some(d) = after {
                return task_from_document(&d);
            }
            let task = self.get_task(task_id).await?;
            let status = task.status;
            actual = status.as_str().to_owned();
            if let Some(attempt) = attempt {
                actual = format!("{actual} at attempt {}", task.attempts);
                if task.attempts != attempt {
                    break;
                }
            }
            if !from.contains(&status) {
                break;
            }
        }
        Err(StoreError::Conflict {
            kind: "task",
            id: task_id.to_owned(),
            expected,
            actual,
        })
    }

    /// Inserts `task`; `AlreadyExists` on a duplicate `task_id`.
    async fn insert_task_document(&self, task: &Task) -> Result<()> {
        let document = task_to_document(task)?;
        self.tasks.insert_one(document).await.map_err(|e| {
            if is_duplicate_key(&e) {
                StoreError::AlreadyExists {
                    kind: "task",
                    id: task.task_id.clone(),
                }
            } else {
                StoreError::backend(format!("inserting task '{}'", task.task_id), e)
            }
        })?;
        Ok(())
    }

    /// The idempotent submission: the key document is inserted first and is the once-only
    /// guard; the task follows. See [`Store::insert_task`].
    async fn insert_task_idempotent(
        &self,
        task: &Task,
        idem: &IdempotencyKey,
    ) -> Result<SubmitOutcome> {
        let key_id = format!("{}/{}", task.user_id, idem.key);
        let key_doc = doc! {
            "_id": &key_id,
            "user_id": &task.user_id,
            "key": &idem.key,
            "task_id": &task.task_id,
            "request_sha256": &idem.request_sha256,
            "created_at": to_bson_date(task.created_at),
        };
        match self.idempotency.insert_one(key_doc).await {
            Ok(_) => match self.insert_task_document(task).await {
                Ok(()) => Ok(SubmitOutcome {
                    task: task.clone(),
                    created: true,
                }),
                Err(StoreError::AlreadyExists { kind, id }) => {
                    // Either a concurrent retry with the same key recovered this task first
                    // (see below), or the task id belongs to another task: then the key must
                    // not keep pointing at it.
                    if let Some(existing) = self.find_task(&task.task_id).await?
                        && existing.user_id == task.user_id
                        && existing.idempotency_key.as_deref() == Some(idem.key.as_str())
                    {
                        return Ok(SubmitOutcome {
                            task: existing,
                            created: false,
                        });
                    }
                    self.atomic(
                        lock_key(IDEMPOTENCY_KEYS, &key_id),
                        self.idempotency
                            .delete_one(doc! { "_id": &key_id, "task_id": &task.task_id }),
                    )
                    .await
                    .map_err(|e| {
                        StoreError::backend(format!("removing idempotency key '{key_id}'"), e)
                    })?;
                    Err(StoreError::AlreadyExists { kind, id })
                }
                Err(other) => Err(other),
            },
            Err(e) if is_duplicate_key(&e) => {
                let stored = self
                    .idempotency
                    .find_one(doc! { "_id": &key_id })
                    .await
                    .map_err(|e| {
                        StoreError::backend(format!("reading idempotency key '{key_id}'"), e)
                    })?
                    .ok_or_else(|| {
                        StoreError::backend(
                            format!("reading idempotency key '{key_id}'"),
                            "the key was reported as a duplicate but cannot be found",
                        )
                    })?;
                let r = Reader::new(&stored, IDEMPOTENCY_KEYS);
                let first_task_id = r.string("task_id")?;
                if r.string("request_sha256")? != idem.request_sha256 {
                    return Err(StoreError::IdempotencyMismatch {
                        key: idem.key.clone(),
                        task_id: first_task_id,
                    });
                }
                if let Some(existing) = self.find_task(&first_task_id).await? {
                    return Ok(SubmitOutcome {
                        task: existing,
                        created: false,
                    });
                }
                // The first submission crashed between inserting the key and the task: finish
                // it now, under the id the key promised.
                let mut recovered = task.clone();
                recovered.task_id = first_task_id.clone();
                match self.insert_task_document(&recovered).await {
                    Ok(()) => Ok(SubmitOutcome {
                        task: recovered,
                        created: true,
                    }),
                    // Another retry recovered it at the same moment.
                    Err(StoreError::AlreadyExists { .. }) => Ok(SubmitOutcome {
                        task: self
                            .find_task(&first_task_id)
                            .await?
                            .ok_or_else(|| not_found("task", &first_task_id))?,
                        created: false,
                    }),
                    Err(other) => Err(other),
                }
            }
            Err(e) => Err(StoreError::backend(
                format!("inserting idempotency key '{key_id}'"),
                e,
            )),
        }
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

    // ----- tasks -----

    async fn insert_task(
        &self,
        task: &Task,
        idempotency: Option<&IdempotencyKey>,
    ) -> Result<SubmitOutcome> {
        match idempotency {
            Some(idem) => self.insert_task_idempotent(task, idem).await,
            None => {
                self.insert_task_document(task).await?;
                Ok(SubmitOutcome {
                    task: task.clone(),
                    created: true,
                })
            }
        }
    }

    async fn get_task(&self, task_id: &str) -> Result<Task> {
        self.find_task(task_id)
            .await?
            .ok_or_else(|| not_found("task", task_id))
    }

    async fn list_tasks(&self, query: &TaskQuery) -> Result<TaskPage> {
        if query.limit == 0 {
            return Ok(TaskPage {
                tasks: Vec::new(),
                next: None,
            });
        }
        let mut filter = Document::new();
        if let Some(status) = query.status {
            filter.insert("status", status.as_str());
        }
        if let Some(user_id) = &query.user_id {
            filter.insert("user_id", user_id.as_str());
        }
        if let Some(after) = &query.after {
            let at = to_bson_date(after.created_at);
            filter.insert(
                "$or",
                vec![
                    Bson::Document(doc! { "created_at": { "$lt": at } }),
                    Bson::Document(
                        doc! { "created_at": at, "task_id": { "$lt": after.task_id.as_str() } },
                    ),
                ],
            );
        }
        let limit = i64::from(query.limit);
        let documents: Vec<Document> = self
            .tasks
            .find(filter)
            .sort(doc! { "created_at": -1, "task_id": -1 })
            // One more than asked, to know whether a next page exists.
            .limit(limit + 1)
            .await
            .map_err(|e| StoreError::backend("listing tasks", e))?
            .try_collect()
            .await
            .map_err(|e| StoreError::backend("reading the task listing", e))?;
        let tasks = documents
            .iter()
            .map(task_from_document)
            .collect::<Result<Vec<_>>>()?;
        Ok(TaskPage::from_overfetched(tasks, query.limit))
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
        let filter = doc! {
            "task_id": task_id,
            "status": TaskStatus::Queued.as_str(),
            "$or": [
                // `null` matches a missing field as well as an explicit null.
                { "owner": Bson::Null },
                { "owner": owner },
                { "lease_expires_at": { "$lt": to_bson_date(now) } },
            ],
        };
        let changes = doc! { "$set": {
            "owner": owner,
            "lease_expires_at": to_bson_date(lease_until),
            "updated_at": to_bson_date(model::now()),
        } };
        let after = self
            .atomic(
                lock_key(TASKS, task_id),
                self.tasks
                    .find_one_and_update(filter, changes)
                    .return_document(ReturnDocument::After),
            )
            .await
            .map_err(|e| StoreError::backend(format!("claiming task '{task_id}'"), e))?;
        match after {
            Some(d) => task_from_document(&d),
            None => {
                let actual = self.get_task(task_id).await?;
                let actual = if actual.status == TaskStatus::Queued {
                    format!(
                        "claimed by {} until {}",
                        actual.owner.as_deref().unwrap_or("nobody"),
                        actual
                            .lease_expires_at
                            .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
                            .unwrap_or_default()
                    )
                } else {
                    actual.status.as_str().to_owned()
                };
                Err(StoreError::Conflict {
                    kind: "task",
                    id: task_id.to_owned(),
                    expected: "queued and unclaimed, claimed by the same owner, or with an \
                               expired lease"
                        .to_owned(),
                    actual,
                })
            }
        }
    }

    async fn request_cancel(&self, task_id: &str) -> Result<Task> {
        let after = self
            .atomic(
                lock_key(TASKS, task_id),
                self.tasks
                    .find_one_and_update(
                        doc! { "task_id": task_id, "status": TaskStatus::Running.as_str() },
                        doc! { "$set": {
                            "cancel_requested": true,
                            "updated_at": to_bson_date(model::now()),
                        } },
                    )
                    .return_document(ReturnDocument::After),
            )
            .await
            .map_err(|e| {
                StoreError::backend(format!("requesting cancellation of task '{task_id}'"), e)
            })?;
        match after {
            Some(d) => task_from_document(&d),
            None => {
                let actual = self.get_task(task_id).await?;
                Err(StoreError::Conflict {
                    kind: "task",
                    id: task_id.to_owned(),
                    expected: TaskStatus::Running.as_str().to_owned(),
                    actual: actual.status.as_str().to_owned(),
                })
            }
        }
    }

    // ----- workers -----

    async fn insert_worker(&self, worker: &Worker) -> Result<()> {
        self.workers
            .insert_one(worker_to_document(worker))
            .await
            .map_err(|e| {
                if is_duplicate_key(&e) {
                    StoreError::AlreadyExists {
                        kind: "worker",
                        id: worker.worker_id.clone(),
                    }
                } else {
                    StoreError::backend(format!("inserting worker '{}'", worker.worker_id), e)
                }
            })?;
        Ok(())
    }

    async fn get_worker(&self, worker_id: &str) -> Result<Worker> {
        self.find_worker(worker_id)
            .await?
            .ok_or_else(|| not_found("worker", worker_id))
    }

    async fn list_workers(&self) -> Result<Vec<Worker>> {
        let documents: Vec<Document> = self
            .workers
            .find(doc! {})
            .sort(doc! { "worker_id": 1 })
            .await
            .map_err(|e| StoreError::backend("listing workers", e))?
            .try_collect()
            .await
            .map_err(|e| StoreError::backend("reading the worker listing", e))?;
        documents.iter().map(worker_from_document).collect()
    }

    async fn heartbeat(
        &self,
        worker_id: &str,
        at_unix: i64,
        usage: Option<&WorkerUsage>,
    ) -> Result<Worker> {
        let mut set = doc! {
            "last_heartbeat": at_unix,
            "updated_at": to_bson_date(model::now()),
        };
        if let Some(usage) = usage {
            set.insert("usage", usage_to_document(usage));
        }
        self.update_worker(worker_id, doc! { "$set": set }, "recording the heartbeat")
            .await
    }

    async fn set_draining(&self, worker_id: &str, draining: bool) -> Result<Worker> {
        let update = doc! { "$set": {
            "draining": draining,
            "updated_at": to_bson_date(model::now()),
        } };
        self.update_worker(worker_id, update, "setting draining")
            .await
    }

    async fn set_worker_active(&self, worker_id: &str, active: bool) -> Result<Worker> {
        let update = doc! { "$set": {
            "is_active": active,
            "updated_at": to_bson_date(model::now()),
        } };
        self.update_worker(worker_id, update, "setting is_active")
            .await
    }

    async fn delete_worker(&self, worker_id: &str) -> Result<()> {
        let active = self
            .assignments
            .count_documents(doc! { "worker_id": worker_id, "released": { "$ne": true } })
            .await
            .map_err(|e| {
                StoreError::backend(
                    format!("counting the active assignments of worker '{worker_id}'"),
                    e,
                )
            })?;
        if active > 0 {
            return Err(StoreError::Conflict {
                kind: "worker",
                id: worker_id.to_owned(),
                expected: "without active assignments".to_owned(),
                actual: format!("holding {active} active assignment(s)"),
            });
        }
        // Without transactions the check above and the delete are two operations: a
        // reservation made in between (reserve precedes insert_assignment) would be lost with
        // the worker. So the delete itself also requires that nothing is allocated; a reserve
        // that comes after the delete finds no worker.
        let deleted = self
            .atomic(
                lock_key(WORKER_REGISTRY, worker_id),
                self.workers.delete_one(doc! {
                    "worker_id": worker_id,
                    "allocated_cpu": { "$lte": 0.0 },
                    "allocated_memory": { "$lte": 0.0 },
                    "allocated_storage": { "$lte": 0.0 },
                    "allocated_gpu": { "$lte": 0.0 },
                }),
            )
            .await
            .map_err(|e| StoreError::backend(format!("deleting worker '{worker_id}'"), e))?;
        if deleted.deleted_count == 1 {
            return Ok(());
        }
        let worker = self.get_worker(worker_id).await?;
        Err(StoreError::Conflict {
            kind: "worker",
            id: worker_id.to_owned(),
            expected: "nothing allocated".to_owned(),
            actual: format!(
                "allocated cpu={} memory={} storage={} gpu={}",
                worker.allocated_cpu,
                worker.allocated_memory,
                worker.allocated_storage,
                worker.allocated_gpu
            ),
        })
    }

    async fn reserve(&self, worker_id: &str, request: &Resources) -> Result<bool> {
        // The whole check-and-take is this one conditional update: the server evaluates the
        // filter and applies the `$inc` atomically on the one document, so concurrent
        // reservations (from any number of host replicas) can never overcommit.
        let filter = doc! {
            "worker_id": worker_id,
            "is_active": true,
            "draining": { "$ne": true },
            "available_cpu": { "$gte": request.cpu },
            "available_memory": { "$gte": request.memory },
            "available_storage": { "$gte": request.storage },
            "available_gpu": { "$gte": request.gpu },
        };
        let update = doc! {
            "$inc": {
                "allocated_cpu": request.cpu,
                "allocated_memory": request.memory,
                "allocated_storage": request.storage,
                "allocated_gpu": request.gpu,
                "available_cpu": -request.cpu,
                "available_memory": -request.memory,
                "available_storage": -request.storage,
                "available_gpu": -request.gpu,
            },
            "$set": { "updated_at": to_bson_date(model::now()) },
        };
        let outcome = self
            .atomic(
                lock_key(WORKER_REGISTRY, worker_id),
                self.workers.update_one(filter, update),
            )
            .await
            .map_err(|e| StoreError::backend(format!("reserving on worker '{worker_id}'"), e))?;
        if outcome.matched_count == 1 {
            return Ok(true);
        }
        let exists = self
            .workers
            .find_one(doc! { "worker_id": worker_id })
            .projection(doc! { "_id": 1 })
            .await
            .map_err(|e| StoreError::backend(format!("reading worker '{worker_id}'"), e))?;
        match exists {
            Some(_) => Ok(false),
            None => Err(not_found("worker", worker_id)),
        }
    }

    // ----- assignments -----

    async fn insert_assignment(&self, assignment: &Assignment) -> Result<()> {
        self.assignments
            .insert_one(assignment_to_document(assignment))
            .await
            .map_err(|e| {
                if is_duplicate_key(&e) {
                    StoreError::AlreadyExists {
                        kind: "assignment",
                        id: assignment.ass_id.clone(),
                    }
                } else {
                    StoreError::backend(format!("inserting assignment '{}'", assignment.ass_id), e)
                }
            })?;
        Ok(())
    }

    async fn get_assignment(&self, ass_id: &str) -> Result<Assignment> {
        self.assignments
            .find_one(doc! { "ass_id": ass_id })
            .await
            .map_err(|e| StoreError::backend(format!("reading assignment '{ass_id}'"), e))?
            .map(|d| assignment_from_document(&d))
            .transpose()?
            .ok_or_else(|| not_found("assignment", ass_id))
    }

    async fn list_assignments(&self, filter: &AssignmentFilter) -> Result<Vec<Assignment>> {
        let mut query = Document::new();
        if let Some(task_id) = &filter.task_id {
            query.insert("task_id", task_id.as_str());
        }
        if let Some(worker_id) = &filter.worker_id {
            query.insert("worker_id", worker_id.as_str());
        }
        if filter.active_only {
            query.insert("released", doc! { "$ne": true });
        }
        let documents: Vec<Document> = self
            .assignments
            .find(query)
            .sort(doc! { "assigned_at": 1, "ass_id": 1 })
            .await
            .map_err(|e| StoreError::backend("listing assignments", e))?
            .try_collect()
            .await
            .map_err(|e| StoreError::backend("reading the assignment listing", e))?;
        documents.iter().map(assignment_from_document).collect()
    }

    async fn release(&self, ass_id: &str) -> Result<bool> {
        // The two steps run in a task of their own: a caller dropped between them (an HTTP
        // handler whose client gave up) must not leave the reservation held with the
        // assignment already released, which no retry would then return.
        let store = self.clone();
        let ass_id = ass_id.to_owned();
        tokio::spawn(async move { store.release_in_two_steps(&ass_id).await })
            .await
            .map_err(|e| StoreError::backend("releasing an assignment", e.to_string()))?
    }

    // ----- results -----

    async fn insert_result(&self, result: &TaskResult) -> Result<()> {
        self.results
            .insert_one(result_to_document(result))
            .await
            .map_err(|e| {
                if is_duplicate_key(&e) {
                    StoreError::AlreadyExists {
                        kind: "result",
                        id: result.task_id.clone(),
                    }
                } else {
                    StoreError::backend(format!("inserting the result of '{}'", result.task_id), e)
                }
            })?;
        Ok(())
    }

    async fn get_result(&self, task_id: &str) -> Result<TaskResult> {
        self.results
            .find_one(doc! { "task_id": task_id })
            .await
            .map_err(|e| StoreError::backend(format!("reading the result of '{task_id}'"), e))?
            .map(|d| result_from_document(&d))
            .transpose()?
            .ok_or_else(|| not_found("result", task_id))
    }
    async fn recent_runtimes(&self, limit: u32) -> Result<Vec<RuntimeSample>> {
        let what = "reading recent runtimes";
        let documents: Vec<Document> = self
            .results
            .find(doc! {
                "status": ResultStatus::Success.as_str(),
                "runtime_s": { "$exists": true },
                "task_type": { "$exists": true },
            })
            .sort(doc! { "completed_at": -1, "task_id": -1 })
            .limit(i64::from(limit))
            .projection(doc! { "worker_id": 1, "task_type": 1, "runtime_s": 1 })
            .await
            .map_err(|e| StoreError::backend(what, e))?
            .try_collect()
            .await
            .map_err(|e| StoreError::backend(what, e))?;
        documents
            .iter()
            .map(|d| {
                let r = Reader::new(d, RESULTS);
                Ok(RuntimeSample {
                    worker_id: r.string("worker_id")?,
                    task_type: r.string("task_type")?,
                    runtime_s: r.f64("runtime_s")?,
                })
            })
            .collect()
    }

    async fn insert_policy_version(&self, version: &PolicyVersion, bytes: &[u8]) -> Result<()> {
        let label = policy_label(&version.name, &version.version);
        // A cheap early answer for the common duplicate; the unique index decides races.
        if self
            .find_policy(&version.name, &version.version)
            .await?
            .is_some()
        {
            return Err(StoreError::AlreadyExists {
                kind: "policy version",
                id: label,
            });
        }
        let upload_id = uuid::Uuid::now_v7().simple().to_string();
        // Chunks first: until the version's document exists they are unreferenced, so a crash
        // here leaves orphans, never a version without bytes.
        let mut chunks = 0_i64;
        for (n, chunk) in bytes.chunks(POLICY_CHUNK_BYTES).enumerate() {
            let n = i64::try_from(n).map_err(|e| StoreError::backend("numbering a chunk", e))?;
            let written = self
                .policy_chunks
                .insert_one(doc! {
                    "upload_id": &upload_id,
                    "n": n,
                    "name": &version.name,
                    "version": &version.version,
                    "data": bson::Binary {
                        subtype: bson::spec::BinarySubtype::Generic,
                        bytes: chunk.to_vec(),
                    },
                })
                .await;
            if let Err(e) = written {
                // Best effort: what was written is unreferenced either way.
                let _ = self.delete_chunks(&upload_id).await;
                return Err(StoreError::backend(
                    format!("storing chunk {n} of policy {label}"),
                    e,
                ));
            }
            chunks = n + 1;
        }
        let mut document = policy_to_document(version)?;
        document.insert("upload_id", &upload_id);
        document.insert("chunks", chunks);
        match self.policies.insert_one(document).await {
            Ok(_) => Ok(()),
            Err(e) => {
                let _ = self.delete_chunks(&upload_id).await;
                if is_duplicate_key(&e) {
                    Err(StoreError::AlreadyExists {
                        kind: "policy version",
                        id: label,
                    })
                } else {
                    Err(StoreError::backend(
                        format!("inserting policy version {label}"),
                        e,
                    ))
                }
            }
        }
    }

    async fn get_policy_version(&self, name: &str, version: &str) -> Result<PolicyVersion> {
        policy_from_document(&self.require_policy(name, version).await?)
    }

    async fn get_policy_bytes(&self, name: &str, version: &str) -> Result<Vec<u8>> {
        let document = self.require_policy(name, version).await?;
        let meta = policy_from_document(&document)?;
        let upload_id = Reader::new(&document, POLICIES).string("upload_id")?;
        let label = policy_label(name, version);
        let chunks: Vec<Document> = self
            .policy_chunks
            .find(doc! { "upload_id": &upload_id })
            .sort(doc! { "n": 1 })
            .await
            .map_err(|e| StoreError::backend(format!("reading the chunks of policy {label}"), e))?
            .try_collect()
            .await
            .map_err(|e| StoreError::backend(format!("reading the chunks of policy {label}"), e))?;
        let mut bytes = Vec::with_capacity(usize::try_from(meta.size_bytes).unwrap_or(0));
        for chunk in &chunks {
            match chunk.get("data") {
                Some(Bson::Binary(b)) => bytes.extend_from_slice(&b.bytes),
                other => {
                    return Err(StoreError::backend(
                        format!("reading the chunks of policy {label}"),
                        format!("a chunk's data is {other:?}, not binary"),
                    ));
                }
            }
        }
        verify_policy_bytes(&meta, &bytes)?;
        Ok(bytes)
    }

    async fn list_policy_versions(&self, name: Option<&str>) -> Result<Vec<PolicyVersion>> {
        let filter = match name {
            Some(name) => doc! { "name": name },
            None => doc! {},
        };
        let documents: Vec<Document> = self
            .policies
            .find(filter)
            .sort(doc! { "name": 1, "uploaded_at": 1, "version": 1 })
            .await
            .map_err(|e| StoreError::backend("listing policy versions", e))?
            .try_collect()
            .await
            .map_err(|e| StoreError::backend("listing policy versions", e))?;
        documents.iter().map(policy_from_document).collect()
    }

    async fn delete_policy_version(&self, name: &str, version: &str) -> Result<()> {
        let label = policy_label(name, version);
        // Mark first, then check the active version; `activate_policy` activates first, then
        // re-checks the mark. Whichever order the two run in, one of them sees the other and
        // backs off, so an active version is never deleted.
        let marked = self
            .atomic(
                lock_key(POLICIES, &format!("{name}@{version}")),
                self.policies
                    .find_one_and_update(
                        doc! { "name": name, "version": version },
                        doc! { "$set": { "deleting": true } },
                    )
                    .return_document(ReturnDocument::After),
            )
            .await
            .map_err(|e| StoreError::backend(format!("marking policy {label} for deletion"), e))?
            .ok_or_else(|| not_found("policy version", &label))?;
        let meta = policy_from_document(&marked)?;
        let upload_id = Reader::new(&marked, POLICIES).string("upload_id")?;
        if let Some(active) = self.find_active_policy(meta.kind).await?
            && active.name == name
            && active.version == version
        {
            self.atomic(
                lock_key(POLICIES, &format!("{name}@{version}")),
                self.policies.update_one(
                    doc! { "name": name, "version": version },
                    doc! { "$unset": { "deleting": "" } },
                ),
            )
            .await
            .map_err(|e| StoreError::backend(format!("unmarking policy {label}"), e))?;
            return Err(StoreError::Conflict {
                kind: "policy version",
                id: label,
                expected: "inactive".to_owned(),
                actual: format!("the active {} policy", meta.kind),
            });
        }
        // The version's document first: a crash after it leaves orphan chunks only.
        self.atomic(
            lock_key(POLICIES, &format!("{name}@{version}")),
            self.policies
                .delete_one(doc! { "name": name, "version": version, "upload_id": &upload_id }),
        )
        .await
        .map_err(|e| StoreError::backend(format!("deleting policy version {label}"), e))?;
        self.delete_chunks(&upload_id).await
    }

    async fn get_active_policy(&self, kind: PolicyKind) -> Result<Option<ActivePolicy>> {
        self.find_active_policy(kind).await
    }

    async fn activate_policy(
        &self,
        kind: PolicyKind,
        name: &str,
        version: &str,
        activated_by: &str,
        expected_current: Option<(String, String)>,
    ) -> Result<ActivePolicy> {
        let label = policy_label(name, version);
        let being_deleted = || StoreError::Conflict {
            kind: "policy version",
            id: label.clone(),
            expected: "present".to_owned(),
            actual: "being deleted".to_owned(),
        };
        let document = self.require_policy(name, version).await?;
        let meta = policy_from_document(&document)?;
        if meta.kind != kind {
            return Err(StoreError::Conflict {
                kind: "policy version",
                id: label,
                expected: format!("a {kind} policy"),
                actual: format!("a {} policy", meta.kind),
            });
        }
        if Reader::new(&document, POLICIES).opt_bool("deleting")? == Some(true) {
            return Err(being_deleted());
        }
        let active = ActivePolicy {
            kind,
            name: name.to_owned(),
            version: version.to_owned(),
            activated_at: model::now(),
            activated_by: activated_by.to_owned(),
            previous: expected_current.clone(),
        };
        let new_document = active_policy_to_document(&active);
        // The compare-and-swap, one single-document write: a first activation is an insert
        // (the unique `_id` = kind refuses a second one), a swap an update matching only the
        // expected version.
        let (applied, before) = match &expected_current {
            None => match self.active_policies.insert_one(new_document).await {
                Ok(_) => (true, None),
                Err(e) if is_duplicate_key(&e) => (false, None),
                Err(e) => {
                    return Err(StoreError::backend(format!("activating policy {label}"), e));
                }
            },
            Some((expected_name, expected_version)) => {
                let before = self
                    .atomic(
                        lock_key(ACTIVE_POLICIES, kind.as_str()),
                        self.active_policies
                            .find_one_and_replace(
                                doc! {
                                    "_id": kind.as_str(),
                                    "name": expected_name,
                                    "version": expected_version,
                                },
                                new_document,
                            )
                            .return_document(ReturnDocument::Before),
                    )
                    .await
                    .map_err(|e| StoreError::backend(format!("activating policy {label}"), e))?;
                (before.is_some(), before)
            }
        };
        if !applied {
            let actual = self
                .find_active_policy(kind)
                .await?
                .map(|a| (a.name, a.version));
            return Err(StoreError::Conflict {
                kind: "active policy",
                id: kind.to_string(),
                expected: active_label(expected_current.as_ref()),
                actual: active_label(actual.as_ref()),
            });
        }
        // See `delete_policy_version`: a deletion that began meanwhile wins.
        let still = self.find_policy(name, version).await?;
        let deleting = match &still {
            Some(d) => Reader::new(d, POLICIES).opt_bool("deleting")? == Some(true),
            None => true,
        };
        if deleting {
            self.revert_activation(&active, before).await?;
            return Err(being_deleted());
        }
        Ok(active)
    }

    async fn clear_active_policy(
        &self,
        kind: PolicyKind,
        expected_current: (String, String),
    ) -> Result<()> {
        let (name, version) = &expected_current;
        let deleted = self
            .atomic(
                lock_key(ACTIVE_POLICIES, kind.as_str()),
                self.active_policies.delete_one(doc! {
                    "_id": kind.as_str(),
                    "name": name,
                    "version": version,
                }),
            )
            .await
            .map_err(|e| {
                StoreError::backend(
                    format!(
                        "clearing the active {kind} policy {}",
                        policy_label(name, version)
                    ),
                    e,
                )
            })?;
        if deleted.deleted_count == 1 {
            return Ok(());
        }
        let actual = self
            .find_active_policy(kind)
            .await?
            .map(|a| (a.name, a.version));
        Err(StoreError::Conflict {
            kind: "active policy",
            id: kind.to_string(),
            expected: active_label(Some(&expected_current)),
            actual: active_label(actual.as_ref()),
        })
    }

    // ----- scheduling -----

    async fn user_usage(&self, user_id: &str) -> Result<Usage> {
        let pipeline = vec![
            doc! { "$match": {
                "user_id": user_id,
                "status": { "$in": ["pending", "queued", "running"] },
            } },
            doc! { "$group": { "_id": "$status", "count": { "$sum": 1_i64 } } },
        ];
        let what = || format!("reading the usage of user '{user_id}'");
        let groups: Vec<Document> = self
            .tasks
            .aggregate(pipeline)
            .await
            .map_err(|e| StoreError::backend(what(), e))?
            .try_collect()
            .await
            .map_err(|e| StoreError::backend(what(), e))?;
        let mut usage = Usage::default();
        for group in &groups {
            let r = Reader::new(group, TASKS);
            let count: u32 = r.int("count")?;
            match r.string("_id")?.as_str() {
                "pending" => usage.pending_tasks = count,
                "queued" => usage.queued_tasks = count,
                _ => usage.running_tasks = count,
            }
        }
        if usage.running_tasks > 0 {
            // Summed here rather than with `$sum` in the `$group`: FerretDB 1.x answers 0 for
            // a `$sum` of a field. A user's running tasks are bounded by the cluster's size.
            let mut running = self
                .tasks
                .find(doc! { "user_id": user_id, "status": TaskStatus::Running.as_str() })
                .projection(doc! { "req_cpu": 1, "req_memory": 1, "req_storage": 1, "req_gpu": 1 })
                .await
                .map_err(|e| StoreError::backend(what(), e))?;
            while let Some(d) = running
                .try_next()
                .await
                .map_err(|e| StoreError::backend(what(), e))?
            {
                let r = Reader::new(&d, TASKS);
                usage.reserved.cpu += r.f64("req_cpu")?;
                usage.reserved.memory += r.f64("req_memory")?;
                usage.reserved.storage += r.f64("req_storage")?;
                usage.reserved.gpu += r.f64("req_gpu")?;
            }
        }
        Ok(usage)
    }

    async fn admission_batch(&self, limit: u32, due_before: DateTime<Utc>) -> Result<Vec<Task>> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let documents: Vec<Document> = self
            .tasks
            .find(doc! {
                "status": TaskStatus::Pending.as_str(),
                "updated_at": { "$lte": to_bson_date(due_before) },
            })
            .sort(doc! { "updated_at": 1, "task_id": 1 })
            .limit(i64::from(limit))
            .await
            .map_err(|e| StoreError::backend("reading the admission batch", e))?
            .try_collect()
            .await
            .map_err(|e| StoreError::backend("reading the admission batch", e))?;
        documents.iter().map(task_from_document).collect()
    }

    async fn claimable_tasks(
        &self,
        limit: u32,
        now: DateTime<Utc>,
        exclude_users: &[String],
    ) -> Result<Vec<Task>> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let mut filter = doc! {
            "status": TaskStatus::Queued.as_str(),
            "$or": [
                { "owner": Bson::Null },
                { "lease_expires_at": Bson::Null },
                { "lease_expires_at": { "$lt": to_bson_date(now) } },
            ],
        };
        if !exclude_users.is_empty() {
            filter.insert("user_id", doc! { "$nin": exclude_users });
        }
        let documents: Vec<Document> = self
            .tasks
            .find(filter)
            .sort(doc! { "priority": -1, "created_at": 1, "task_id": 1 })
            .limit(i64::from(limit))
            .await
            .map_err(|e| StoreError::backend("reading the placement queue", e))?
            .try_collect()
            .await
            .map_err(|e| StoreError::backend("reading the placement queue", e))?;
        documents.iter().map(task_from_document).collect()
    }

    async fn active_assignment_counts(&self) -> Result<BTreeMap<String, u32>> {
        let pipeline = vec![
            doc! { "$match": { "released": { "$ne": true } } },
            doc! { "$group": { "_id": "$worker_id", "count": { "$sum": 1_i64 } } },
        ];
        let groups: Vec<Document> = self
            .assignments
            .aggregate(pipeline)
            .await
            .map_err(|e| StoreError::backend("counting active assignments", e))?
            .try_collect()
            .await
            .map_err(|e| StoreError::backend("counting active assignments", e))?;
        groups
            .iter()
            .map(|group| {
                let r = Reader::new(group, ASSIGNMENTS);
                Ok((r.string("_id")?, r.int("count")?))
            })
            .collect()
    }

    async fn running_counts(&self, users: &[String]) -> Result<BTreeMap<String, u32>> {
        if users.is_empty() {
            return Ok(BTreeMap::new());
        }
        let pipeline = vec![
            doc! { "$match": {
                "status": TaskStatus::Running.as_str(),
                "user_id": { "$in": users },
            } },
            doc! { "$group": { "_id": "$user_id", "count": { "$sum": 1_i64 } } },
        ];
        let groups: Vec<Document> = self
            .tasks
            .aggregate(pipeline)
            .await
            .map_err(|e| StoreError::backend("counting users' running tasks", e))?
            .try_collect()
            .await
            .map_err(|e| StoreError::backend("counting users' running tasks", e))?;
        groups
            .iter()
            .map(|group| {
                let r = Reader::new(group, TASKS);
                Ok((r.string("_id")?, r.int("count")?))
            })
            .collect()
    }

    async fn mark_running(&self, task_id: &str, owner: &str, attempts: u32) -> Result<Task> {
        let after = self
            .atomic(
                lock_key(TASKS, task_id),
                self.tasks
                    .find_one_and_update(
                        doc! {
                            "task_id": task_id,
                            "status": TaskStatus::Queued.as_str(),
                            "owner": owner,
                        },
                        doc! {
                            "$set": {
                                "status": TaskStatus::Running.as_str(),
                                "attempts": i64::from(attempts),
                                "updated_at": to_bson_date(model::now()),
                                "placed_by": owner,
                            },
                            "$unset": { "owner": "", "lease_expires_at": "", "status_reason": "" },
                        },
                    )
                    .return_document(ReturnDocument::After),
            )
            .await
            .map_err(|e| StoreError::backend(format!("marking task '{task_id}' running"), e))?;
        match after {
            Some(d) => task_from_document(&d),
            None => {
                let task = self.get_task(task_id).await?;
                Err(StoreError::Conflict {
                    kind: "task",
                    id: task_id.to_owned(),
                    expected: format!("queued and claimed by {owner}"),
                    actual: format!(
                        "{} and claimed by {}",
                        task.status,
                        task.owner.as_deref().unwrap_or("nobody")
                    ),
                })
            }
        }
    }

    async fn unclaim_task(&self, task_id: &str, owner: &str) -> Result<bool> {
        let outcome = self
            .atomic(
                lock_key(TASKS, task_id),
                self.tasks.update_one(
                    doc! {
                        "task_id": task_id,
                        "status": TaskStatus::Queued.as_str(),
                        "owner": owner,
                    },
                    doc! {
                        "$set": { "updated_at": to_bson_date(model::now()) },
                        "$unset": { "owner": "", "lease_expires_at": "" },
                    },
                ),
            )
            .await
            .map_err(|e| {
                StoreError::backend(format!("giving up the claim on task '{task_id}'"), e)
            })?;
        Ok(outcome.matched_count == 1)
    }

    async fn unreserve(&self, worker_id: &str, request: &Resources) -> Result<bool> {
        // The mirror of `reserve`: one conditional update, which never takes `allocated_*`
        // below zero.
        let filter = doc! {
            "worker_id": worker_id,
            "allocated_cpu": { "$gte": request.cpu },
            "allocated_memory": { "$gte": request.memory },
            "allocated_storage": { "$gte": request.storage },
            "allocated_gpu": { "$gte": request.gpu },
        };
        let update = doc! {
            "$inc": {
                "allocated_cpu": -request.cpu,
                "allocated_memory": -request.memory,
                "allocated_storage": -request.storage,
                "allocated_gpu": -request.gpu,
                "available_cpu": request.cpu,
                "available_memory": request.memory,
                "available_storage": request.storage,
                "available_gpu": request.gpu,
            },
            "$set": { "updated_at": to_bson_date(model::now()) },
        };
        let outcome = self
            .atomic(
                lock_key(WORKER_REGISTRY, worker_id),
                self.workers.update_one(filter, update),
            )
            .await
            .map_err(|e| {
                StoreError::backend(
                    format!("returning a reservation to worker '{worker_id}'"),
                    e,
                )
            })?;
        if outcome.matched_count == 1 {
            return Ok(true);
        }
        match self.find_worker(worker_id).await? {
            Some(_) => Ok(false),
            None => Err(not_found("worker", worker_id)),
        }
    }

    async fn acquire_lease(
        &self,
        name: &str,
        holder: &str,
        until: DateTime<Utc>,
        now: DateTime<Utc>,
    ) -> Result<bool> {
        // Renew ours or take an expired one: ONE conditional update.
        let taken = self
            .atomic(
                lock_key(LEASES, name),
                self.leases.update_one(
                    doc! {
                        "_id": name,
                        "$or": [
                            { "holder": holder },
                            { "expires_at": { "$lt": to_bson_date(now) } },
                        ],
                    },
                    doc! { "$set": { "holder": holder, "expires_at": to_bson_date(until) } },
                ),
            )
            .await
            .map_err(|e| StoreError::backend(format!("taking lease '{name}'"), e))?;
        if taken.matched_count == 1 {
            return Ok(true);
        }
        // No lease document yet: the unique `_id` lets exactly one creator win.
        match self
            .leases
            .insert_one(doc! { "_id": name, "holder": holder, "expires_at": to_bson_date(until) })
            .await
        {
            Ok(_) => Ok(true),
            Err(e) if is_duplicate_key(&e) => Ok(false),
            Err(e) => Err(StoreError::backend(format!("creating lease '{name}'"), e)),
        }
    }

    async fn release_lease(&self, name: &str, holder: &str) -> Result<bool> {
        let deleted = self
            .atomic(
                lock_key(LEASES, name),
                self.leases
                    .delete_one(doc! { "_id": name, "holder": holder }),
            )
            .await
            .map_err(|e| StoreError::backend(format!("giving up lease '{name}'"), e))?;
        Ok(deleted.deleted_count == 1)
    }

    async fn mark_worker_lost(&self, worker_id: &str, heartbeat_before: i64) -> Result<bool> {
        let outcome = self
            .atomic(
                lock_key(WORKER_REGISTRY, worker_id),
                self.workers.update_one(
                    doc! {
                        "worker_id": worker_id,
                        "is_active": true,
                        "last_heartbeat": { "$lt": heartbeat_before },
                    },
                    doc! { "$set": {
                        "is_active": false,
                        "updated_at": to_bson_date(model::now()),
                    } },
                ),
            )
            .await
            .map_err(|e| StoreError::backend(format!("marking worker '{worker_id}' lost"), e))?;
        if outcome.matched_count == 1 {
            return Ok(true);
        }
        match self.find_worker(worker_id).await? {
            Some(_) => Ok(false),
            None => Err(not_found("worker", worker_id)),
        }
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
        if limit == 0 {
            return Ok(Vec::new());
        }
        let expired = doc! {
            "status": TaskStatus::Queued.as_str(),
            "lease_expires_at": { "$lt": to_bson_date(now) },
        };
        let mut claimed = expired.clone();
        claimed.insert("owner", doc! { "$ne": Bson::Null });
        let documents: Vec<Document> = self
            .tasks
            .find(claimed)
            .sort(doc! { "lease_expires_at": 1, "task_id": 1 })
            .limit(i64::from(limit))
            .await
            .map_err(|e| StoreError::backend("reading expired claims", e))?
            .try_collect()
            .await
            .map_err(|e| StoreError::backend("reading expired claims", e))?;
        let mut cleared = Vec::with_capacity(documents.len());
        for document in &documents {
            let task = task_from_document(document)?;
            let mut filter = expired.clone();
            filter.insert("task_id", task.task_id.as_str());
            let outcome = self
                .atomic(
                    lock_key(TASKS, &task.task_id),
                    self.tasks.update_one(
                        filter,
                        doc! {
                            "$set": { "updated_at": to_bson_date(model::now()) },
                            "$unset": { "owner": "", "lease_expires_at": "" },
                        },
                    ),
                )
                .await
                .map_err(|e| {
                    StoreError::backend(
                        format!("clearing the expired claim on task '{}'", task.task_id),
                        e,
                    )
                })?;
            if outcome.matched_count == 1 {
                cleared.push(task);
            }
        }
        Ok(cleared)
    }

    async fn repair_allocation(&self, observed: &Worker, allocated: &Resources) -> Result<bool> {
        let (t, a, v) = (observed.total(), observed.allocated(), observed.available());
        let worker_id = observed.worker_id.as_str();
        let filter = doc! {
            "worker_id": worker_id,
            "total_cpu": t.cpu, "total_memory": t.memory,
            "total_storage": t.storage, "total_gpu": t.gpu,
            "allocated_cpu": a.cpu, "allocated_memory": a.memory,
            "allocated_storage": a.storage, "allocated_gpu": a.gpu,
            "available_cpu": v.cpu, "available_memory": v.memory,
            "available_storage": v.storage, "available_gpu": v.gpu,
        };
        let update = doc! { "$set": {
            "allocated_cpu": allocated.cpu,
            "allocated_memory": allocated.memory,
            "allocated_storage": allocated.storage,
            "allocated_gpu": allocated.gpu,
            "available_cpu": t.cpu - allocated.cpu,
            "available_memory": t.memory - allocated.memory,
            "available_storage": t.storage - allocated.storage,
            "available_gpu": t.gpu - allocated.gpu,
            "updated_at": to_bson_date(model::now()),
        } };
        let outcome = self
            .atomic(
                lock_key(WORKER_REGISTRY, worker_id),
                self.workers.update_one(filter, update),
            )
            .await
            .map_err(|e| {
                StoreError::backend(
                    format!("repairing the allocation of worker '{worker_id}'"),
                    e,
                )
            })?;
        if outcome.matched_count == 1 {
            return Ok(true);
        }
        match self.find_worker(worker_id).await? {
            Some(_) => Ok(false),
            None => Err(not_found("worker", worker_id)),
        }
    }

    async fn insert_log_chunk(&self, chunk: &TaskLogChunk) -> Result<bool> {
        let written = self
            .task_logs
            .insert_one(doc! {
                "task_id": &chunk.task_id,
                "attempt": i64::from(chunk.attempt),
                "seq": u64_to_bson(chunk.seq, "seq")?,
                "stream": &chunk.stream,
                "text": &chunk.text,
            })
            .await;
        match written {
            Ok(_) => Ok(true),
            Err(e) if is_duplicate_key(&e) => Ok(false),
            Err(e) => Err(StoreError::backend(
                format!("storing a log chunk of '{}'", chunk.task_id),
                e,
            )),
        }
    }

    async fn list_log_chunks(
        &self,
        task_id: &str,
        after: Option<(u32, u64)>,
        limit: u32,
    ) -> Result<Vec<TaskLogChunk>> {
        let filter = match after {
            Some((attempt, seq)) => doc! {
                "task_id": task_id,
                "$or": [
                    { "attempt": { "$gt": i64::from(attempt) } },
                    { "attempt": i64::from(attempt), "seq": { "$gt": u64_to_bson(seq, "seq")? } },
                ],
            },
            None => doc! { "task_id": task_id },
        };
        let what = || format!("listing the log chunks of '{task_id}'");
        let documents: Vec<Document> = self
            .task_logs
            .find(filter)
            .sort(doc! { "attempt": 1, "seq": 1 })
            .limit(i64::from(limit))
            .await
            .map_err(|e| StoreError::backend(what(), e))?
            .try_collect()
            .await
            .map_err(|e| StoreError::backend(what(), e))?;
        documents
            .iter()
            .map(|d| {
                let r = Reader::new(d, TASK_LOGS);
                Ok(TaskLogChunk {
                    task_id: r.string("task_id")?,
                    attempt: r.int("attempt")?,
                    seq: r.int("seq")?,
                    stream: r.string("stream")?,
                    text: r.string("text")?,
                })
            })
            .collect()
    }

    async fn put_output_file(
        &self,
        task_id: &str,
        attempt: u32,
        path: &str,
        bytes: &[u8],
    ) -> Result<OutputFileInfo> {
        let info = OutputFileInfo {
            task_id: task_id.to_string(),
            path: path.to_string(),
            attempt,
            size_bytes: bytes.len() as u64,
            sha256: policy_sha256(bytes),
        };
        let what = || format!("storing output {path} of '{task_id}'");
        let upload_id = uuid::Uuid::now_v7().simple().to_string();
        // Chunks first, under a fresh upload id: the file's document names them only once
        // they are all written.
        for (n, chunk) in bytes.chunks(POLICY_CHUNK_BYTES).enumerate() {
            let n = i64::try_from(n).map_err(|e| StoreError::backend("numbering a chunk", e))?;
            let written = self
                .task_output_chunks
                .insert_one(doc! {
                    "upload_id": &upload_id,
                    "n": n,
                    "data": bson::Binary {
                        subtype: bson::spec::BinarySubtype::Generic,
                        bytes: chunk.to_vec(),
                    },
                })
                .await;
            if let Err(e) = written {
                self.delete_output_chunks(&upload_id).await;
                return Err(StoreError::backend(what(), e));
            }
        }
        let before = self
            .atomic(
                lock_key(TASK_OUTPUTS, &format!("{task_id}/{path}")),
                self.task_outputs
                    .find_one_and_update(
                        doc! { "task_id": task_id, "path": path },
                        doc! { "$set": {
                            "task_id": task_id,
                            "path": path,
                            "attempt": i64::from(attempt),
                            "size_bytes": u64_to_bson(info.size_bytes, "size_bytes")?,
                            "sha256": &info.sha256,
                            "upload_id": &upload_id,
                        } },
                    )
                    .upsert(true)
                    .return_document(ReturnDocument::Before),
            )
            .await;
        match before {
            Ok(Some(old)) => {
                if let Ok(old_upload) = Reader::new(&old, TASK_OUTPUTS).string("upload_id") {
                    self.delete_output_chunks(&old_upload).await;
                }
            }
            Ok(None) => {}
            Err(e) => {
                self.delete_output_chunks(&upload_id).await;
                return Err(StoreError::backend(what(), e));
            }
        }
        Ok(info)
    }

    async fn list_output_files(&self, task_id: &str) -> Result<Vec<OutputFileInfo>> {
        let what = || format!("listing the output files of '{task_id}'");
        let documents: Vec<Document> = self
            .task_outputs
            .find(doc! { "task_id": task_id })
            .sort(doc! { "path": 1 })
            .await
            .map_err(|e| StoreError::backend(what(), e))?
            .try_collect()
            .await
            .map_err(|e| StoreError::backend(what(), e))?;
        documents.iter().map(output_from_document).collect()
    }

    async fn get_output_file(
        &self,
        task_id: &str,
        path: &str,
    ) -> Result<(OutputFileInfo, Vec<u8>)> {
        let what = || format!("reading output {path} of '{task_id}'");
        let document = self
            .task_outputs
            .find_one(doc! { "task_id": task_id, "path": path })
            .await
            .map_err(|e| StoreError::backend(what(), e))?
            .ok_or_else(|| not_found("output file", &format!("{task_id}/{path}")))?;
        let info = output_from_document(&document)?;
        let upload_id = Reader::new(&document, TASK_OUTPUTS).string("upload_id")?;
        let chunks: Vec<Document> = self
            .task_output_chunks
            .find(doc! { "upload_id": &upload_id })
            .sort(doc! { "n": 1 })
            .await
            .map_err(|e| StoreError::backend(what(), e))?
            .try_collect()
            .await
            .map_err(|e| StoreError::backend(what(), e))?;
        let mut bytes = Vec::with_capacity(usize::try_from(info.size_bytes).unwrap_or(0));
        for chunk in &chunks {
            match chunk.get("data") {
                Some(Bson::Binary(b)) => bytes.extend_from_slice(&b.bytes),
                other => {
                    return Err(StoreError::backend(
                        what(),
                        format!("a chunk's data is {other:?}, not binary"),
                    ));
                }
            }
        }
        verify_output_bytes(&info, &bytes)?;
        Ok((info, bytes))
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
        let what = "counting tasks by status";
        let pipeline = vec![doc! { "$group": { "_id": "$status", "count": { "$sum": 1_i64 } } }];
        let groups: Vec<Document> = self
            .tasks
            .aggregate(pipeline)
            .await
            .map_err(|e| StoreError::backend(what, e))?
            .try_collect()
            .await
            .map_err(|e| StoreError::backend(what, e))?;
        let mut counts = TaskCounts::default();
        for group in &groups {
            let r = Reader::new(group, TASKS);
            let status = r
                .string("_id")?
                .parse::<TaskStatus>()
                .map_err(|e| StoreError::backend(what, e))?;
            counts.add(status, r.int("count")?);
        }
        Ok(counts)
    }

    async fn count_assignments_since(&self, since: DateTime<Utc>) -> Result<u64> {
        self.assignments
            .count_documents(doc! { "assigned_at": { "$gte": to_bson_date(since) } })
            .await
            .map_err(|e| StoreError::backend("counting recent assignments", e))
    }
}

fn output_from_document(d: &Document) -> Result<OutputFileInfo> {
    let r = Reader::new(d, TASK_OUTPUTS);
    Ok(OutputFileInfo {
        task_id: r.string("task_id")?,
        path: r.string("path")?,
        attempt: r.int("attempt")?,
        size_bytes: r.int("size_bytes")?,
        sha256: r.string("sha256")?,
    })
}

// ----- errors -----

fn not_found(kind: &'static str, id: &str) -> StoreError {
    StoreError::NotFound {
        kind,
        id: id.to_owned(),
    }
}

/// The server's error code, wherever the driver put it.
fn error_code(e: &mongodb::error::Error) -> Option<i32> {
    match e.kind.as_ref() {
        ErrorKind::Command(c) => Some(c.code),
        ErrorKind::Write(WriteFailure::WriteError(w)) => Some(w.code),
        ErrorKind::Write(WriteFailure::WriteConcernError(w)) => Some(w.code),
        _ => None,
    }
}

fn is_duplicate_key(e: &mongodb::error::Error) -> bool {
    error_code(e) == Some(DUPLICATE_KEY)
}

// ----- documents -----

fn to_bson_date(at: DateTime<Utc>) -> bson::DateTime {
    bson::DateTime::from_millis(at.timestamp_millis())
}

fn map_to_document(map: &BTreeMap<String, String>) -> Document {
    map.iter()
        .map(|(k, v)| (k.clone(), Bson::String(v.clone())))
        .collect()
}

/// Stored as Int64: every u32 and every realistic u64 fits, and it reads back unchanged.
fn u64_to_bson(value: u64, field: &str) -> Result<Bson> {
    i64::try_from(value).map(Bson::Int64).map_err(|e| {
        StoreError::backend(format!("storing '{field}' = {value} (above i64::MAX)"), e)
    })
}

fn insert_opt<T: Into<Bson>>(document: &mut Document, key: &str, value: Option<T>) {
    if let Some(value) = value {
        document.insert(key, value);
    }
}

fn task_to_document(t: &Task) -> Result<Document> {
    let mut d = doc! {
        "task_id": &t.task_id,
        "user_id": &t.user_id,
        "docker_image": &t.docker_image,
    };
    insert_opt(&mut d, "command", t.command.as_deref());
    d.insert("req_cpu", t.req_cpu);
    d.insert("req_memory", t.req_memory);
    d.insert("req_storage", t.req_storage);
    d.insert("req_gpu", t.req_gpu);
    d.insert("status", t.status.as_str());
    d.insert("created_at", to_bson_date(t.created_at));
    insert_opt(&mut d, "started_at", t.started_at.map(to_bson_date));
    insert_opt(&mut d, "completed_at", t.completed_at.map(to_bson_date));
    d.insert("priority", t.priority);
    d.insert("labels", map_to_document(&t.labels));
    d.insert("env", map_to_document(&t.env));
    if let Some(timeout) = t.timeout_s {
        d.insert("timeout_s", u64_to_bson(timeout, "timeout_s")?);
    }
    d.insert("max_attempts", i64::from(t.max_attempts));
    d.insert("attempts", i64::from(t.attempts));
    insert_opt(&mut d, "exit_code", t.exit_code);
    insert_opt(&mut d, "error", t.error.as_deref());
    insert_opt(&mut d, "status_reason", t.status_reason.as_deref());
    d.insert("cancel_requested", t.cancel_requested);
    insert_opt(&mut d, "owner", t.owner.as_deref());
    insert_opt(
        &mut d,
        "lease_expires_at",
        t.lease_expires_at.map(to_bson_date),
    );
    insert_opt(&mut d, "idempotency_key", t.idempotency_key.as_deref());
    d.insert("updated_at", to_bson_date(t.updated_at));
    insert_opt(&mut d, "placed_by", t.placed_by.as_deref());
    Ok(d)
}

fn task_from_document(d: &Document) -> Result<Task> {
    let r = Reader::new(d, TASKS);
    let status = r.string("status")?;
    Ok(Task {
        task_id: r.string("task_id")?,
        user_id: r.string("user_id")?,
        docker_image: r.string("docker_image")?,
        command: r.opt_string("command")?,
        req_cpu: r.f64("req_cpu")?,
        req_memory: r.f64("req_memory")?,
        req_storage: r.f64("req_storage")?,
        req_gpu: r.f64("req_gpu")?,
        status: status.parse().map_err(|e: String| r.invalid("status", e))?,
        created_at: r.date("created_at")?,
        started_at: r.opt_date("started_at")?,
        completed_at: r.opt_date("completed_at")?,
        priority: r.opt_int::<i32>("priority")?.unwrap_or(0),
        labels: r.map("labels")?,
        env: r.map("env")?,
        timeout_s: r.opt_int("timeout_s")?,
        max_attempts: r.opt_int("max_attempts")?.unwrap_or(1),
        attempts: r.opt_int("attempts")?.unwrap_or(0),
        exit_code: r.opt_int("exit_code")?,
        error: r.opt_string("error")?,
        status_reason: r.opt_string("status_reason")?,
        cancel_requested: r.opt_bool("cancel_requested")?.unwrap_or(false),
        owner: r.opt_string("owner")?,
        lease_expires_at: r.opt_date("lease_expires_at")?,
        idempotency_key: r.opt_string("idempotency_key")?,
        placed_by: r.opt_string("placed_by")?,
        // Documents written by other tools may lack our addition: fall back to creation.
        updated_at: match r.opt_date("updated_at")? {
            Some(at) => at,
            None => r.date("created_at")?,
        },
    })
}

fn usage_to_document(u: &WorkerUsage) -> Document {
    doc! {
        "cpu_percent": u.cpu_percent,
        "memory_percent": u.memory_percent,
        "running_tasks": i64::from(u.running_tasks),
    }
}

fn worker_to_document(w: &Worker) -> Document {
    let mut d = doc! {
        "worker_id": &w.worker_id,
        "worker_ip": &w.worker_ip,
        "total_cpu": w.total_cpu,
        "total_memory": w.total_memory,
        "total_storage": w.total_storage,
        "total_gpu": w.total_gpu,
        "allocated_cpu": w.allocated_cpu,
        "allocated_memory": w.allocated_memory,
        "allocated_storage": w.allocated_storage,
        "allocated_gpu": w.allocated_gpu,
        "available_cpu": w.available_cpu,
        "available_memory": w.available_memory,
        "available_storage": w.available_storage,
        "available_gpu": w.available_gpu,
        "is_active": w.is_active,
        "last_heartbeat": w.last_heartbeat,
        "registered_at": to_bson_date(w.registered_at),
        "updated_at": to_bson_date(w.updated_at),
        "draining": w.draining,
        "labels": map_to_document(&w.labels),
        "token_sha256": &w.token_sha256,
    };
    insert_opt(&mut d, "usage", w.usage.as_ref().map(usage_to_document));
    d
}

fn worker_from_document(d: &Document) -> Result<Worker> {
    let r = Reader::new(d, WORKER_REGISTRY);
    let usage = match r.opt_document("usage")? {
        Some(u) => {
            let u = Reader::new(u, "WORKER_REGISTRY.usage");
            Some(WorkerUsage {
                cpu_percent: u.f64("cpu_percent")?,
                memory_percent: u.f64("memory_percent")?,
                running_tasks: u.opt_int("running_tasks")?.unwrap_or(0),
            })
        }
        None => None,
    };
    Ok(Worker {
        worker_id: r.string("worker_id")?,
        worker_ip: r.string("worker_ip")?,
        total_cpu: r.f64("total_cpu")?,
        total_memory: r.f64("total_memory")?,
        total_storage: r.f64("total_storage")?,
        total_gpu: r.f64("total_gpu")?,
        allocated_cpu: r.f64("allocated_cpu")?,
        allocated_memory: r.f64("allocated_memory")?,
        allocated_storage: r.f64("allocated_storage")?,
        allocated_gpu: r.f64("allocated_gpu")?,
        available_cpu: r.f64("available_cpu")?,
        available_memory: r.f64("available_memory")?,
        available_storage: r.f64("available_storage")?,
        available_gpu: r.f64("available_gpu")?,
        is_active: r.bool("is_active")?,
        last_heartbeat: r.int("last_heartbeat")?,
        registered_at: r.date("registered_at")?,
        updated_at: r.date("updated_at")?,
        draining: r.opt_bool("draining")?.unwrap_or(false),
        labels: r.map("labels")?,
        usage,
        token_sha256: r.opt_string("token_sha256")?.unwrap_or_default(),
    })
}

fn assignment_to_document(a: &Assignment) -> Document {
    let mut d = doc! {
        "ass_id": &a.ass_id,
        "task_id": &a.task_id,
        "worker_id": &a.worker_id,
        "assigned_at": to_bson_date(a.assigned_at),
        "req_cpu": a.req_cpu,
        "req_memory": a.req_memory,
        "req_storage": a.req_storage,
        "req_gpu": a.req_gpu,
        "attempt": i64::from(a.attempt),
        "released": a.released,
    };
    insert_opt(&mut d, "released_at", a.released_at.map(to_bson_date));
    insert_opt(&mut d, "placed_by", a.placed_by.as_deref());
    d
}

fn assignment_from_document(d: &Document) -> Result<Assignment> {
    let r = Reader::new(d, ASSIGNMENTS);
    Ok(Assignment {
        ass_id: r.string("ass_id")?,
        task_id: r.string("task_id")?,
        worker_id: r.string("worker_id")?,
        assigned_at: r.date("assigned_at")?,
        req_cpu: r.opt_f64("req_cpu")?.unwrap_or(0.0),
        req_memory: r.opt_f64("req_memory")?.unwrap_or(0.0),
        req_storage: r.opt_f64("req_storage")?.unwrap_or(0.0),
        req_gpu: r.opt_f64("req_gpu")?.unwrap_or(0.0),
        attempt: r.opt_int("attempt")?.unwrap_or(1),
        released: r.opt_bool("released")?.unwrap_or(false),
        released_at: r.opt_date("released_at")?,
        placed_by: r.opt_string("placed_by")?,
    })
}

fn result_to_document(t: &TaskResult) -> Document {
    let mut d = doc! {
        "task_id": &t.task_id,
        "worker_id": &t.worker_id,
        "status": t.status.as_str(),
        "logs": &t.logs,
        "completed_at": to_bson_date(t.completed_at),
    };
    insert_opt(&mut d, "exit_code", t.exit_code);
    insert_opt(&mut d, "error", t.error.as_deref());
    d.insert("logs_truncated", t.logs_truncated);
    d.insert("stderr", &t.stderr);
    d.insert("stderr_truncated", t.stderr_truncated);
    d.insert("oom_killed", t.oom_killed);
    d.insert("attempt", i64::from(t.attempt));
    insert_opt(&mut d, "runtime_s", t.runtime_s);
    insert_opt(&mut d, "task_type", t.task_type.as_deref());
    d
}

fn result_from_document(d: &Document) -> Result<TaskResult> {
    let r = Reader::new(d, RESULTS);
    let status: ResultStatus = r
        .string("status")?
        .parse()
        .map_err(|e: String| r.invalid("status", e))?;
    Ok(TaskResult {
        task_id: r.string("task_id")?,
        worker_id: r.string("worker_id")?,
        status,
        logs: r.opt_string("logs")?.unwrap_or_default(),
        completed_at: r.date("completed_at")?,
        exit_code: r.opt_int("exit_code")?,
        error: r.opt_string("error")?,
        logs_truncated: r.opt_bool("logs_truncated")?.unwrap_or(false),
        stderr: r.opt_string("stderr")?.unwrap_or_default(),
        stderr_truncated: r.opt_bool("stderr_truncated")?.unwrap_or(false),
        oom_killed: r.opt_bool("oom_killed")?.unwrap_or(false),
        attempt: r.opt_int("attempt")?.unwrap_or(0),
        runtime_s: r.opt_f64("runtime_s")?,
        task_type: r.opt_string("task_type")?,
    })
}

fn policy_to_document(v: &PolicyVersion) -> Result<Document> {
    Ok(doc! {
        "name": &v.name,
        "version": &v.version,
        "kind": v.kind.as_str(),
        "sha256": &v.sha256,
        "size_bytes": u64_to_bson(v.size_bytes, "size_bytes")?,
        "config": &v.config,
        "uploaded_at": to_bson_date(v.uploaded_at),
        "uploaded_by": &v.uploaded_by,
        "memory_bytes": v.memory_bytes.map(|m| u64_to_bson(m, "memory_bytes")).transpose()?,
        "deadline_ms": v.deadline_ms.map(|d| u64_to_bson(d, "deadline_ms")).transpose()?,
    })
}

fn policy_from_document(d: &Document) -> Result<PolicyVersion> {
    let r = Reader::new(d, POLICIES);
    Ok(PolicyVersion {
        name: r.string("name")?,
        version: r.string("version")?,
        kind: r
            .string("kind")?
            .parse()
            .map_err(|e: String| r.invalid("kind", e))?,
        sha256: r.string("sha256")?,
        size_bytes: r.int("size_bytes")?,
        config: r.opt_string("config")?.unwrap_or_default(),
        uploaded_at: r.date("uploaded_at")?,
        uploaded_by: r.opt_string("uploaded_by")?.unwrap_or_default(),
        memory_bytes: r.opt_int("memory_bytes")?,
        deadline_ms: r.opt_int("deadline_ms")?,
    })
}

fn active_policy_to_document(a: &ActivePolicy) -> Document {
    let mut d = doc! {
        "_id": a.kind.as_str(),
        "kind": a.kind.as_str(),
        "name": &a.name,
        "version": &a.version,
        "activated_at": to_bson_date(a.activated_at),
        "activated_by": &a.activated_by,
    };
    insert_opt(
        &mut d,
        "previous",
        a.previous
            .as_ref()
            .map(|(name, version)| doc! { "name": name, "version": version }),
    );
    d
}

fn active_policy_from_document(d: &Document) -> Result<ActivePolicy> {
    let r = Reader::new(d, ACTIVE_POLICIES);
    let previous = match r.opt_document("previous")? {
        Some(p) => {
            let p = Reader::new(p, "ACTIVE_POLICIES.previous");
            Some((p.string("name")?, p.string("version")?))
        }
        None => None,
    };
    Ok(ActivePolicy {
        kind: r
            .string("kind")?
            .parse()
            .map_err(|e: String| r.invalid("kind", e))?,
        name: r.string("name")?,
        version: r.string("version")?,
        activated_at: r.date("activated_at")?,
        activated_by: r.opt_string("activated_by")?.unwrap_or_default(),
        previous,
    })
}

/// Reads typed fields from a stored document; every error names the collection and field.
/// An absent field and an explicit `null` both read as `None` for optional fields.
struct Reader<'a> {
    doc: &'a Document,
    collection: &'static str,
}

impl<'a> Reader<'a> {
    fn new(doc: &'a Document, collection: &'static str) -> Self {
        Reader { doc, collection }
    }

    fn invalid(&self, key: &str, problem: impl Into<String>) -> StoreError {
        let id = self
            .doc
            .get("_id")
            .map(|id| id.to_string())
            .unwrap_or_else(|| "?".to_owned());
        StoreError::backend(
            format!(
                "reading field '{key}' of a {} document (_id {id})",
                self.collection
            ),
            problem.into(),
        )
    }

    fn present(&self, key: &str) -> Option<&'a Bson> {
        match self.doc.get(key) {
            None | Some(Bson::Null) => None,
            Some(value) => Some(value),
        }
    }

    fn wrong_type(&self, key: &str, expected: &str, got: &Bson) -> StoreError {
        self.invalid(
            key,
            format!("expected {expected}, found {:?}", got.element_type()),
        )
    }

    fn opt_string(&self, key: &str) -> Result<Option<String>> {
        match self.present(key) {
            None => Ok(None),
            Some(Bson::String(s)) => Ok(Some(s.clone())),
            Some(other) => Err(self.wrong_type(key, "a string", other)),
        }
    }

    fn string(&self, key: &str) -> Result<String> {
        self.opt_string(key)?
            .ok_or_else(|| self.invalid(key, "missing (required)"))
    }

    /// Doubles, and integers written by other tools (e.g. the mongo shell's `8` is a double,
    /// but a driver may write an Int32).
    fn opt_f64(&self, key: &str) -> Result<Option<f64>> {
        match self.present(key) {
            None => Ok(None),
            Some(Bson::Double(v)) => Ok(Some(*v)),
            Some(Bson::Int32(v)) => Ok(Some(f64::from(*v))),
            // Only small integers are meaningful here; the cast is exact for them.
            Some(Bson::Int64(v)) => Ok(Some(*v as f64)),
            Some(other) => Err(self.wrong_type(key, "a number", other)),
        }
    }

    fn f64(&self, key: &str) -> Result<f64> {
        self.opt_f64(key)?
            .ok_or_else(|| self.invalid(key, "missing (required)"))
    }

    /// Int32, Int64, or an integral double, converted to `T` without loss.
    fn opt_int<T: TryFrom<i64>>(&self, key: &str) -> Result<Option<T>> {
        let wide = match self.present(key) {
            None => return Ok(None),
            Some(Bson::Int32(v)) => i64::from(*v),
            Some(Bson::Int64(v)) => *v,
            Some(Bson::Double(v)) if v.fract() == 0.0 && v.abs() < 9.0e15 => *v as i64,
            Some(other) => return Err(self.wrong_type(key, "an integer", other)),
        };
        T::try_from(wide).map(Some).map_err(|_| {
            self.invalid(
                key,
                format!("{wide} is out of range for {}", std::any::type_name::<T>()),
            )
        })
    }

    fn int<T: TryFrom<i64>>(&self, key: &str) -> Result<T> {
        self.opt_int(key)?
            .ok_or_else(|| self.invalid(key, "missing (required)"))
    }

    fn opt_bool(&self, key: &str) -> Result<Option<bool>> {
        match self.present(key) {
            None => Ok(None),
            Some(Bson::Boolean(b)) => Ok(Some(*b)),
            Some(other) => Err(self.wrong_type(key, "a boolean", other)),
        }
    }

    fn bool(&self, key: &str) -> Result<bool> {
        self.opt_bool(key)?
            .ok_or_else(|| self.invalid(key, "missing (required)"))
    }

    fn opt_date(&self, key: &str) -> Result<Option<DateTime<Utc>>> {
        match self.present(key) {
            None => Ok(None),
            Some(Bson::DateTime(at)) => DateTime::from_timestamp_millis(at.timestamp_millis())
                .map(Some)
                .ok_or_else(|| self.invalid(key, "date out of range")),
            Some(other) => Err(self.wrong_type(key, "a date", other)),
        }
    }

    fn date(&self, key: &str) -> Result<DateTime<Utc>> {
        self.opt_date(key)?
            .ok_or_else(|| self.invalid(key, "missing (required)"))
    }

    fn opt_document(&self, key: &str) -> Result<Option<&'a Document>> {
        match self.present(key) {
            None => Ok(None),
            Some(Bson::Document(d)) => Ok(Some(d)),
            Some(other) => Err(self.wrong_type(key, "a document", other)),
        }
    }

    /// A string-to-string map; absent reads as empty.
    fn map(&self, key: &str) -> Result<BTreeMap<String, String>> {
        let Some(d) = self.opt_document(key)? else {
            return Ok(BTreeMap::new());
        };
        d.iter()
            .map(|(k, v)| match v {
                Bson::String(s) => Ok((k.clone(), s.clone())),
                other => Err(self.invalid(
                    key,
                    format!(
                        "entry '{k}': expected a string, found {:?}",
                        other.element_type()
                    ),
                )),
            })
            .collect()
    }
}

/// Test support: a [`MongoStore`] on a fresh database of the server named by
/// `CLOUDAI_TEST_MONGODB_URI`, and a guard that drops that database.
#[cfg(test)]
pub mod testing {
    use super::MongoStore;

    /// The environment variable naming the test server.
    pub const URI_VAR: &str = "CLOUDAI_TEST_MONGODB_URI";

    /// The configured test server, or `None` (skip) when none is configured locally.
    /// Panics under CI (env `CI` set) when none is configured: CI must run these tests.
    pub fn test_uri() -> Option<String> {
        match std::env::var(URI_VAR) {
            Ok(uri) if !uri.is_empty() => Some(uri),
            _ if std::env::var_os("CI").is_some() => {
                panic!("CI must set {URI_VAR} (e.g. mongodb://127.0.0.1:27017/)")
            }
            _ => {
                eprintln!("skipping MongoDB test: {URI_VAR} is not set");
                None
            }
        }
    }

    /// Drops its database when dropped. The drop runs on a client and runtime of its own, in
    /// a thread: the test's runtime may be blocked in this very drop.
    pub struct DropDatabase {
        pub(crate) uri: String,
        pub(crate) database: String,
    }

    impl Drop for DropDatabase {
        fn drop(&mut self) {
            let (uri, database) = (self.uri.clone(), self.database.clone());
            let dropped = std::thread::spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(|e| e.to_string())?;
                runtime.block_on(async {
                    let client = mongodb::Client::with_uri_str(&uri)
                        .await
                        .map_err(|e| e.to_string())?;
                    client
                        .database(&database)
                        .drop()
                        .await
                        .map_err(|e| e.to_string())
                })
            })
            .join();
            if let Ok(Err(e)) = dropped {
                eprintln!("could not drop test database {}: {e}", self.database);
            }
        }
    }

    /// A store on a fresh database `cloudai_test_<uuid>`; `None` when no server is configured.
    /// Panics (the test fails) when a server is configured but cannot be reached.
    pub async fn connect_test_store() -> Option<(MongoStore, DropDatabase)> {
        let uri = test_uri()?;
        let database = format!("cloudai_test_{}", uuid::Uuid::now_v7().simple());
        let store = match MongoStore::connect(&uri, &database).await {
            Ok(store) => store,
            // The URI is not printed: it may carry credentials.
            Err(e) => panic!("{URI_VAR} is set but the store cannot connect: {e}"),
        };
        Some((store, DropDatabase { uri, database }))
    }
}

/// The shared store conformance suite, on a fresh database per test.
#[cfg(test)]
mod conformance {
    crate::store_conformance_tests!(super::testing::connect_test_store());
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::sync::Arc;

    use super::testing::connect_test_store;
    use super::*;
    use crate::store::conformance::{sample_assignment, sample_worker as worker};

    fn task(task_id: &str, user_id: &str) -> Task {
        Task {
            command: Some("echo hello".to_owned()),
            priority: 3,
            labels: BTreeMap::from([("team".to_owned(), "ml".to_owned())]),
            timeout_s: Some(60),
            max_attempts: 2,
            ..Task::new_pending(
                task_id.to_owned(),
                user_id.to_owned(),
                "docker.io/library/alpine:3.20".to_owned(),
                Resources::new(1.0, 2.0, 1.0, 0.0),
            )
        }
    }

    /// An unreleased assignment of the task `task-of-<ass_id>`.
    fn assignment(ass_id: &str, worker_id: &str, request: Resources) -> Assignment {
        sample_assignment(ass_id, &format!("task-of-{ass_id}"), worker_id, request)
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

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn reserve_race_50_for_room_for_7_has_exactly_7_winners() {
        let Some((store, _db)) = connect_test_store().await else {
            return;
        };
        let store = Arc::new(store);
        let request = Resources::new(1.0, 2.0, 1.0, 0.0);
        store
            .insert_worker(&worker("w-race", Resources::new(7.5, 64.0, 64.0, 0.0)))
            .await
            .unwrap();
        // Spawn all before awaiting any (a lazy iterator would run them one after another).
        let attempts: Vec<_> = (0..50)
            .map(|_| {
                let store = Arc::clone(&store);
                tokio::spawn(async move { store.reserve("w-race", &request).await })
            })
            .collect();
        let mut wins = 0;
        for attempt in attempts {
            if attempt.await.unwrap().unwrap() {
                wins += 1;
            }
        }
        assert_eq!(wins, 7, "exactly 7 reservations fit");
        let after = store.get_worker("w-race").await.unwrap();
        assert_eq!(after.allocated_cpu, 7.0);
        assert_eq!(after.available_cpu, 0.5);
        assert_eq!(after.allocated_memory, 14.0);
        assert!(after.invariant_violations().is_empty());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn release_returns_the_reservation_exactly_once() {
        let Some((store, _db)) = connect_test_store().await else {
            return;
        };
        let store = Arc::new(store);
        let request = Resources::new(1.5, 2.0, 0.25, 1.0);
        let total = Resources::new(4.0, 8.0, 10.0, 1.0);
        store.insert_worker(&worker("w-rel", total)).await.unwrap();
        assert!(store.reserve("w-rel", &request).await.unwrap());
        store
            .insert_assignment(&assignment("a-rel", "w-rel", request))
            .await
            .unwrap();
        let releases: Vec<_> = (0..10)
            .map(|_| {
                let store = Arc::clone(&store);
                tokio::spawn(async move { store.release("a-rel").await })
            })
            .collect();
        let mut applied = 0;
        for release in releases {
            if release.await.unwrap().unwrap() {
                applied += 1;
            }
        }
        assert_eq!(applied, 1);
        let after = store.get_worker("w-rel").await.unwrap();
        assert_eq!(after.available(), total);
        assert_eq!(after.allocated(), Resources::default());
        let released = store.get_assignment("a-rel").await.unwrap();
        assert!(released.released && released.released_at.is_some());
        assert!(matches!(
            store.release("missing").await,
            Err(StoreError::NotFound { .. })
        ));
    }

    #[tokio::test]
    async fn documents_have_the_seed_field_types() {
        let Some((store, _db)) = connect_test_store().await else {
            return;
        };
        store
            .insert_task(&task("t-shape", "u1"), None)
            .await
            .unwrap();
        store
            .insert_worker(&worker("w-shape", Resources::new(8.0, 16.0, 100.0, 2.0)))
            .await
            .unwrap();
        store
            .insert_assignment(&assignment(
                "a-shape",
                "w-shape",
                Resources::new(1.0, 1.0, 1.0, 0.0),
            ))
            .await
            .unwrap();

        let t = store
            .tasks
            .find_one(doc! { "task_id": "t-shape" })
            .await
            .unwrap()
            .unwrap();
        assert!(matches!(t.get("_id"), Some(Bson::ObjectId(_))));
        assert!(matches!(t.get("created_at"), Some(Bson::DateTime(_))));
        assert!(matches!(t.get("req_cpu"), Some(Bson::Double(_))));
        assert_eq!(t.get_str("status").unwrap(), "pending");
        assert!(
            t.get("started_at").is_none(),
            "absent optional fields are not stored"
        );

        let w = store
            .workers
            .find_one(doc! { "worker_id": "w-shape" })
            .await
            .unwrap()
            .unwrap();
        assert!(matches!(w.get("last_heartbeat"), Some(Bson::Int64(_))));
        assert!(matches!(w.get("registered_at"), Some(Bson::DateTime(_))));
        assert!(matches!(w.get("total_cpu"), Some(Bson::Double(_))));
        assert!(matches!(w.get("is_active"), Some(Bson::Boolean(true))));

        let a = store
            .assignments
            .find_one(doc! { "ass_id": "a-shape" })
            .await
            .unwrap()
            .unwrap();
        assert!(matches!(a.get("assigned_at"), Some(Bson::DateTime(_))));
        assert!(matches!(a.get("released"), Some(Bson::Boolean(false))));
    }

    #[tokio::test]
    async fn connect_is_idempotent_and_creates_the_seed_indexes() {
        let Some((store, db)) = connect_test_store().await else {
            return;
        };
        let uri = super::testing::test_uri().unwrap();
        let again = MongoStore::connect(&uri, store.database().name())
            .await
            .unwrap();
        again.ping().await.unwrap();
        for (collection, expected) in [
            (
                &store.tasks,
                &["task_id_1", "status_1", "created_at_-1"][..],
            ),
            (
                &store.workers,
                &["worker_id_1", "is_active_1", "last_heartbeat_-1"][..],
            ),
            (
                &store.assignments,
                &["ass_id_1", "task_id_1", "worker_id_1"][..],
            ),
            (&store.results, &["task_id_1", "worker_id_1"][..]),
        ] {
            let names = collection.list_index_names().await.unwrap();
            for name in expected {
                assert!(names.iter().any(|n| n == name), "{name} missing: {names:?}");
            }
        }
        // The uniqueness is enforced by the index, not only by our code path.
        store
            .tasks
            .insert_one(doc! { "task_id": "dup" })
            .await
            .unwrap();
        let dup = store
            .tasks
            .insert_one(doc! { "task_id": "dup" })
            .await
            .unwrap_err();
        assert!(is_duplicate_key(&dup), "{dup:?}");
        drop(db);
    }

    #[tokio::test]
    async fn ferretdb_1_is_detected_and_its_writes_serialized() {
        let Some((store, _db)) = connect_test_store().await else {
            return;
        };
        let info = store.db.run_command(doc! { "buildInfo": 1 }).await.unwrap();
        let is_ferretdb_1 = matches!(
            info.get("ferretdbVersion"),
            Some(Bson::String(v)) if v.trim_start_matches('v').starts_with("1.")
        );
        assert_eq!(store.serializes_writes(), is_ferretdb_1, "{info:?}");
    }

    /// Two stores with their own connection pools (as two host replicas) race 40 reservations
    /// each for room for 30 on one worker: exactly 30 win and the worker's amounts add up,
    /// which on FerretDB 1.x only holds because of the shared per-document lock.
    #[tokio::test]
    async fn two_replicas_racing_on_one_worker_never_overcommit_it() {
        let Some((first, db)) = connect_test_store().await else {
            return;
        };
        let second = MongoStore::connect(&db.uri, &db.database).await.unwrap();
        first
            .insert_worker(&worker("w-race", Resources::new(30.0, 300.0, 300.0, 0.0)))
            .await
            .unwrap();
        let one = Resources::new(1.0, 1.0, 1.0, 0.0);
        let mut racers = tokio::task::JoinSet::new();
        for i in 0..80 {
            let store = if i % 2 == 0 {
                first.clone()
            } else {
                second.clone()
            };
            racers.spawn(async move { store.reserve("w-race", &one).await.unwrap() });
        }
        let won = racers.join_all().await.into_iter().filter(|w| *w).count();
        assert_eq!(won, 30);
        let w = second.get_worker("w-race").await.unwrap();
        assert_eq!((w.allocated_cpu, w.available_cpu), (30.0, 0.0));
        assert_eq!((w.allocated_memory, w.available_memory), (30.0, 270.0));
    }

    /// A lock left by a replica that died holding it is taken over once its TTL has passed,
    /// and the write goes through.
    #[tokio::test]
    async fn a_lock_left_by_a_dead_replica_expires() {
        let Some((store, _db)) = connect_test_store().await else {
            return;
        };
        if !store.serializes_writes() {
            return; // MongoDB takes no locks
        }
        store
            .insert_worker(&worker("w-lock", Resources::new(4.0, 4.0, 4.0, 0.0)))
            .await
            .unwrap();
        let expired = model::now() - chrono::Duration::seconds(1);
        store
            .write_lock
            .insert_one(doc! {
                "_id": lock_key(WORKER_REGISTRY, "w-lock"),
                "holder": "a-dead-replica",
                "expires_at": to_bson_date(expired),
            })
            .await
            .unwrap();
        let started = std::time::Instant::now();
        let one = Resources::new(1.0, 1.0, 1.0, 0.0);
        assert!(store.reserve("w-lock", &one).await.unwrap());
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "{:?}",
            started.elapsed()
        );
        let left = store.write_lock.count_documents(doc! {}).await.unwrap();
        assert_eq!(left, 0, "the write released its lock");
    }

    #[tokio::test]
    async fn malformed_documents_are_reported_with_their_field() {
        let Some((store, _db)) = connect_test_store().await else {
            return;
        };
        let mut d = task_to_document(&task("t-bad", "u1")).unwrap();
        d.insert("req_cpu", "two");
        store.tasks.insert_one(d).await.unwrap();
        let message = store.get_task("t-bad").await.unwrap_err().to_string();
        assert!(
            message.contains("'req_cpu'") && message.contains("TASKS"),
            "{message}"
        );
    }

    #[tokio::test]
    async fn idempotent_submit_finishes_a_submission_that_crashed_after_its_key() {
        let Some((store, _db)) = connect_test_store().await else {
            return;
        };
        // The state a crash between the two inserts leaves: a key, no task.
        store
            .idempotency
            .insert_one(doc! {
                "_id": "u1/k1", "user_id": "u1", "key": "k1",
                "task_id": "t-promised", "request_sha256": "abc",
            })
            .await
            .unwrap();
        let idem = IdempotencyKey {
            key: "k1".to_owned(),
            request_sha256: "abc".to_owned(),
        };
        let mut retry = task("t-retry", "u1");
        retry.idempotency_key = Some("k1".to_owned());
        let outcome = store.insert_task(&retry, Some(&idem)).await.unwrap();
        assert_eq!(outcome.task.task_id, "t-promised");
        assert!(store.get_task("t-promised").await.is_ok());
        assert!(matches!(
            store.get_task("t-retry").await,
            Err(StoreError::NotFound { .. })
        ));
        let again = store.insert_task(&retry, Some(&idem)).await.unwrap();
        assert!(!again.created);
        assert_eq!(again.task.task_id, "t-promised");
    }
}
