//! The embedded store: [`SqliteStore`], SQLite in the data directory, the default backend.
//!
//! Tables are named like the seed's collections and columns like the model's fields. Dates
//! are ISO-8601 UTC text with milliseconds (which sorts chronologically), maps and usage are
//! JSON text, booleans 0/1.
//!
//! rusqlite is blocking, so one dedicated writer thread owns the connection and the async
//! methods send it closures over a channel (group commit): the thread drains the queued
//! requests (up to [`MAX_BATCH`]) and runs them inside ONE `BEGIN IMMEDIATE ... COMMIT`, each
//! in its own `SAVEPOINT`, so that a failing (or panicking) request is rolled back alone while
//! the others of its batch still commit. Replies are sent only after the commit succeeded; a
//! failed commit fails every request of the batch. Every state change is one conditional
//! statement (or several inside the request's savepoint, which makes them atomic), and the
//! batch holds SQLite's write lock from its first statement, so the guarantees also hold when
//! several processes open the same file.

use std::collections::BTreeMap;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, mpsc};
use std::thread::JoinHandle;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use rusqlite::types::Value;
use rusqlite::{Connection, ErrorCode, OptionalExtension, Row, params, params_from_iter};
use tokio::sync::oneshot;

use super::{
    ArraySummary, AssignmentFilter, AssignmentStore, BlobStore, EventBounds, EventStore,
    IdempotencyKey, LeaseStore, NewEvent, OutputFileInfo, POLICY_CHUNK_BYTES, Result,
    RuntimeSample, Store, StoreError, StoredEvent, SubmitOutcome, TaskCounts, TaskLogChunk,
    TaskPage, TaskQuery, TaskStore, TaskUpdate, WorkerStore, active_label, policy_label,
    sha256_hex, verify_output_bytes, verify_policy_bytes,
};
use crate::model::Usage;
use crate::model::{
    ActivePolicy, Assignment, Dependency, PolicyKind, PolicyVersion, Resources, Task, TaskResult,
    TaskStatus, Worker, WorkerUsage, now,
};

mod checkpoint;
mod events;
mod placement;

/// File name of the database inside the data directory.
pub const DB_FILE_NAME: &str = "cloudai.db";

/// The most memory SQLite's page cache holds, in KiB.
const PAGE_CACHE_KIB: i64 = 64 * 1024;

/// How long a statement waits for another process's write lock before failing.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// Recorded in `PRAGMA user_version`, so that a later release can migrate and an older one
/// refuses a database it does not understand.
pub(crate) const SCHEMA_VERSION: i64 = 1;

/// The most requests one transaction commits together: bounds how long the write lock is held
/// and how long the first request of a batch waits for the last one.
const MAX_BATCH: usize = 256;

const SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS TASKS (
    task_id          TEXT NOT NULL,
    user_id          TEXT NOT NULL,
    docker_image     TEXT NOT NULL,
    command          TEXT,
    req_cpu          REAL NOT NULL,
    req_memory       REAL NOT NULL,
    req_storage      REAL NOT NULL,
    req_gpu          REAL NOT NULL,
    status           TEXT NOT NULL,
    created_at       TEXT NOT NULL,
    started_at       TEXT,
    completed_at     TEXT,
    priority         INTEGER NOT NULL,
    labels           TEXT NOT NULL,
    env              TEXT NOT NULL,
    timeout_s        INTEGER,
    max_attempts     INTEGER NOT NULL,
    attempts         INTEGER NOT NULL,
    exit_code        INTEGER,
    error            TEXT,
    status_reason    TEXT,
    cancel_requested INTEGER NOT NULL,
    owner            TEXT,
    lease_expires_at TEXT,
    idempotency_key  TEXT,
    updated_at       TEXT NOT NULL
);
CREATE UNIQUE INDEX IF NOT EXISTS TASKS_task_id ON TASKS (task_id);
-- The seed's status index, with the listing's order after it: a listing by status (the
-- reconciler reads the running tasks every second) is a range of it rather than a walk of every
-- task by date. (It replaced a plain status index, which it serves too.)
CREATE INDEX IF NOT EXISTS TASKS_status_created ON TASKS (status, created_at DESC, task_id DESC);
DROP INDEX IF EXISTS TASKS_status;
-- The seed's created_at index, with task_id so that the newest-first listing and its
-- cursor are served by the index alone.
CREATE INDEX IF NOT EXISTS TASKS_created_at ON TASKS (created_at DESC, task_id DESC);
CREATE INDEX IF NOT EXISTS TASKS_user_id ON TASKS (user_id, created_at DESC, task_id DESC);
-- The scheduler's: a user's usage, the admission batch, the placement queue.
CREATE INDEX IF NOT EXISTS TASKS_user_status ON TASKS (user_id, status);
-- Partial: only the tasks in the state each serves (the placement queue; the admission
-- batch's is with the added columns), so that placing and finishing a task maintains neither.
CREATE INDEX IF NOT EXISTS TASKS_queued ON TASKS (priority DESC, created_at, task_id)
    WHERE status = 'queued';
-- The same queue per user: which users have tasks queued (one seek each) and each one's head,
-- so that a batch that leaves out a user with thousands of queued tasks does not walk them.
CREATE INDEX IF NOT EXISTS TASKS_queued_by_user
    ON TASKS (user_id, priority DESC, created_at, task_id) WHERE status = 'queued';
DROP INDEX IF EXISTS TASKS_status_updated;
DROP INDEX IF EXISTS TASKS_queue;
-- The reconciler's expired claims, every second: only claimed tasks are in it (without it,
-- each pass read every queued task).
CREATE INDEX IF NOT EXISTS TASKS_claims ON TASKS (lease_expires_at, task_id)
    WHERE owner IS NOT NULL;
-- How many tasks each user has running, kept by the triggers below in the transaction that
-- moves a task: a placement round reads the counts of its batch's users by key, not by walking
-- every running task of theirs (USER_RUNNING_REBUILD recounts it at open).
CREATE TABLE IF NOT EXISTS USER_RUNNING (
    user_id TEXT PRIMARY KEY,
    running INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TRIGGER IF NOT EXISTS TASKS_running_insert AFTER INSERT ON TASKS
    WHEN new.status = 'running'
BEGIN
    INSERT INTO USER_RUNNING (user_id, running) VALUES (new.user_id, 1)
        ON CONFLICT (user_id) DO UPDATE SET running = running + 1;
END;
CREATE TRIGGER IF NOT EXISTS TASKS_running_enter AFTER UPDATE OF status ON TASKS
    WHEN new.status = 'running' AND old.status <> 'running'
BEGIN
    INSERT INTO USER_RUNNING (user_id, running) VALUES (new.user_id, 1)
        ON CONFLICT (user_id) DO UPDATE SET running = running + 1;
END;
CREATE TRIGGER IF NOT EXISTS TASKS_running_leave AFTER UPDATE OF status ON TASKS
    WHEN old.status = 'running' AND new.status <> 'running'
BEGIN
    UPDATE USER_RUNNING SET running = running - 1 WHERE user_id = old.user_id;
END;
CREATE TRIGGER IF NOT EXISTS TASKS_running_delete AFTER DELETE ON TASKS
    WHEN old.status = 'running'
BEGIN
    UPDATE USER_RUNNING SET running = running - 1 WHERE user_id = old.user_id;
END;

CREATE TABLE IF NOT EXISTS WORKER_REGISTRY (
    worker_id         TEXT NOT NULL,
    worker_ip         TEXT NOT NULL,
    total_cpu         REAL NOT NULL,
    total_memory      REAL NOT NULL,
    total_storage     REAL NOT NULL,
    total_gpu         REAL NOT NULL,
    allocated_cpu     REAL NOT NULL,
    allocated_memory  REAL NOT NULL,
    allocated_storage REAL NOT NULL,
    allocated_gpu     REAL NOT NULL,
    available_cpu     REAL NOT NULL,
    available_memory  REAL NOT NULL,
    available_storage REAL NOT NULL,
    available_gpu     REAL NOT NULL,
    is_active         INTEGER NOT NULL,
    last_heartbeat    INTEGER NOT NULL,
    registered_at     TEXT NOT NULL,
    updated_at        TEXT NOT NULL,
    draining          INTEGER NOT NULL,
    labels            TEXT NOT NULL,
    usage             TEXT,
    token_sha256      TEXT NOT NULL
);
CREATE UNIQUE INDEX IF NOT EXISTS WORKER_REGISTRY_worker_id ON WORKER_REGISTRY (worker_id);
CREATE INDEX IF NOT EXISTS WORKER_REGISTRY_is_active ON WORKER_REGISTRY (is_active);
CREATE INDEX IF NOT EXISTS WORKER_REGISTRY_last_heartbeat ON WORKER_REGISTRY (last_heartbeat DESC);

CREATE TABLE IF NOT EXISTS ASSIGNMENTS (
    ass_id      TEXT NOT NULL,
    task_id     TEXT NOT NULL,
    worker_id   TEXT NOT NULL,
    assigned_at TEXT NOT NULL,
    req_cpu     REAL NOT NULL,
    req_memory  REAL NOT NULL,
    req_storage REAL NOT NULL,
    req_gpu     REAL NOT NULL,
    attempt     INTEGER NOT NULL,
    released    INTEGER NOT NULL,
    released_at TEXT
);
CREATE UNIQUE INDEX IF NOT EXISTS ASSIGNMENTS_ass_id ON ASSIGNMENTS (ass_id);
CREATE INDEX IF NOT EXISTS ASSIGNMENTS_task_id ON ASSIGNMENTS (task_id);
CREATE INDEX IF NOT EXISTS ASSIGNMENTS_worker_id ON ASSIGNMENTS (worker_id);
-- The active assignments only (a release takes its assignment out).
CREATE INDEX IF NOT EXISTS ASSIGNMENTS_active_by_worker ON ASSIGNMENTS (worker_id)
    WHERE released = 0;
DROP INDEX IF EXISTS ASSIGNMENTS_active;
-- The overview's placements of the last minute.
CREATE INDEX IF NOT EXISTS ASSIGNMENTS_assigned_at ON ASSIGNMENTS (assigned_at);

CREATE TABLE IF NOT EXISTS RESULTS (
    task_id        TEXT NOT NULL,
    worker_id      TEXT NOT NULL,
    status         TEXT NOT NULL,
    logs           TEXT NOT NULL,
    completed_at   TEXT NOT NULL,
    exit_code      INTEGER,
    error          TEXT,
    logs_truncated INTEGER NOT NULL
);
CREATE UNIQUE INDEX IF NOT EXISTS RESULTS_task_id ON RESULTS (task_id);
CREATE INDEX IF NOT EXISTS RESULTS_worker_id ON RESULTS (worker_id);
CREATE INDEX IF NOT EXISTS RESULTS_completed_at ON RESULTS (completed_at);

CREATE TABLE IF NOT EXISTS IDEMPOTENCY_KEYS (
    user_id         TEXT NOT NULL,
    idempotency_key TEXT NOT NULL,
    request_sha256  TEXT NOT NULL,
    task_id         TEXT NOT NULL,
    created_at      TEXT NOT NULL
);
CREATE UNIQUE INDEX IF NOT EXISTS IDEMPOTENCY_KEYS_user_key
    ON IDEMPOTENCY_KEYS (user_id, idempotency_key);

CREATE TABLE IF NOT EXISTS POLICIES (
    name        TEXT NOT NULL,
    version     TEXT NOT NULL,
    kind        TEXT NOT NULL,
    sha256      TEXT NOT NULL,
    size_bytes  INTEGER NOT NULL,
    config      TEXT NOT NULL,
    uploaded_at TEXT NOT NULL,
    uploaded_by TEXT NOT NULL,
    memory_bytes INTEGER,
    deadline_ms  INTEGER
);
CREATE UNIQUE INDEX IF NOT EXISTS POLICIES_name_version ON POLICIES (name, version);

-- A component's bytes in chunks of POLICY_CHUNK_BYTES, numbered from 0.
CREATE TABLE IF NOT EXISTS POLICY_CHUNKS (
    name    TEXT NOT NULL,
    version TEXT NOT NULL,
    n       INTEGER NOT NULL,
    data    BLOB NOT NULL
);
CREATE UNIQUE INDEX IF NOT EXISTS POLICY_CHUNKS_name_version_n
    ON POLICY_CHUNKS (name, version, n);

-- One row per policy kind: the version the hosts run.
CREATE TABLE IF NOT EXISTS ACTIVE_POLICIES (
    kind             TEXT NOT NULL,
    name             TEXT NOT NULL,
    version          TEXT NOT NULL,
    activated_at     TEXT NOT NULL,
    activated_by     TEXT NOT NULL,
    previous_name    TEXT,
    previous_version TEXT
);
CREATE UNIQUE INDEX IF NOT EXISTS ACTIVE_POLICIES_kind ON ACTIVE_POLICIES (kind);

-- Leases between host replicas (the reconciler's): one row per lease name.
CREATE TABLE IF NOT EXISTS LEASES (
    name       TEXT NOT NULL PRIMARY KEY,
    holder     TEXT NOT NULL,
    expires_at TEXT NOT NULL
);

-- Live output of running tasks, as their workers send it: one row per chunk.
CREATE TABLE IF NOT EXISTS TASK_LOGS (
    task_id TEXT NOT NULL,
    attempt INTEGER NOT NULL,
    seq     INTEGER NOT NULL,
    stream  TEXT NOT NULL,
    text    TEXT NOT NULL
);
CREATE UNIQUE INDEX IF NOT EXISTS TASK_LOGS_task_attempt_seq ON TASK_LOGS (task_id, attempt, seq);

-- Files tasks left under /output: one row per file, its bytes in chunks of POLICY_CHUNK_BYTES.
CREATE TABLE IF NOT EXISTS TASK_OUTPUTS (
    task_id    TEXT NOT NULL,
    path       TEXT NOT NULL,
    attempt    INTEGER NOT NULL,
    size_bytes INTEGER NOT NULL,
    sha256     TEXT NOT NULL
);
CREATE UNIQUE INDEX IF NOT EXISTS TASK_OUTPUTS_task_path ON TASK_OUTPUTS (task_id, path);
CREATE TABLE IF NOT EXISTS TASK_OUTPUT_CHUNKS (
    task_id TEXT NOT NULL,
    path    TEXT NOT NULL,
    n       INTEGER NOT NULL,
    data    BLOB NOT NULL
);
CREATE UNIQUE INDEX IF NOT EXISTS TASK_OUTPUT_CHUNKS_task_path_n
    ON TASK_OUTPUT_CHUNKS (task_id, path, n);
"#;

/// Recounts USER_RUNNING from TASKS (at open, in a transaction of its own): a database written
/// before the table existed (or changed by hand) starts with the right counts; the triggers keep
/// them in every transaction after that.
const USER_RUNNING_REBUILD: &str = "BEGIN IMMEDIATE; \
    DELETE FROM USER_RUNNING; \
    INSERT INTO USER_RUNNING (user_id, running) \
        SELECT user_id, COUNT(*) FROM TASKS WHERE status = 'running' GROUP BY user_id; \
    COMMIT;";

const TASK_COLUMNS: &str = "task_id, user_id, docker_image, command, req_cpu, req_memory, \
    req_storage, req_gpu, status, created_at, started_at, completed_at, priority, labels, env, \
    timeout_s, max_attempts, attempts, exit_code, error, status_reason, cancel_requested, owner, \
    lease_expires_at, idempotency_key, updated_at, placed_by, array_id, array_index, after, \
    awaiting_dependencies, preemptible, preempted_by";

const WORKER_COLUMNS: &str = "worker_id, worker_ip, total_cpu, total_memory, total_storage, \
    total_gpu, allocated_cpu, allocated_memory, allocated_storage, allocated_gpu, available_cpu, \
    available_memory, available_storage, available_gpu, is_active, last_heartbeat, \
    registered_at, updated_at, draining, labels, usage, token_sha256";

const ASSIGNMENT_COLUMNS: &str = "ass_id, task_id, worker_id, assigned_at, req_cpu, req_memory, \
    req_storage, req_gpu, attempt, released, released_at, placed_by";

const POLICY_COLUMNS: &str = "name, version, kind, sha256, size_bytes, config, uploaded_at, \
    uploaded_by, memory_bytes, deadline_ms";

/// Columns added to existing tables after schema version 1 shipped, with their types: added
/// at open when absent (a database written before they existed reads them as NULL).
const ADDED_COLUMNS: &[(&str, &str, &str)] = &[
    ("POLICIES", "memory_bytes", "INTEGER"),
    ("POLICIES", "deadline_ms", "INTEGER"),
    ("RESULTS", "stderr", "TEXT NOT NULL DEFAULT ''"),
    ("RESULTS", "stderr_truncated", "INTEGER NOT NULL DEFAULT 0"),
    ("RESULTS", "oom_killed", "INTEGER NOT NULL DEFAULT 0"),
    ("RESULTS", "attempt", "INTEGER NOT NULL DEFAULT 0"),
    ("RESULTS", "runtime_s", "REAL"),
    ("RESULTS", "task_type", "TEXT"),
    ("TASKS", "placed_by", "TEXT"),
    ("ASSIGNMENTS", "placed_by", "TEXT"),
    ("TASKS", "array_id", "TEXT"),
    ("TASKS", "array_index", "INTEGER"),
    ("TASKS", "after", "TEXT"),
    (
        "TASKS",
        "awaiting_dependencies",
        "INTEGER NOT NULL DEFAULT 0",
    ),
    ("TASKS", "preemptible", "INTEGER NOT NULL DEFAULT 1"),
    ("TASKS", "preempted_by", "TEXT"),
];

/// Indexes on [`ADDED_COLUMNS`], created once the columns exist.
const ADDED_INDEXES: &str = "
-- An array's tasks in index order: its summary, listing and cancellation.
CREATE INDEX IF NOT EXISTS TASKS_array ON TASKS (array_id, array_index)
    WHERE array_id IS NOT NULL;
-- The admission batch: pending tasks free to be admitted (not awaiting dependencies), so that
-- a backlog of waiting tasks is never walked.
CREATE INDEX IF NOT EXISTS TASKS_admissible ON TASKS (updated_at, task_id)
    WHERE status = 'pending' AND awaiting_dependencies = 0;
-- The dependency pass: the tasks awaiting their dependencies, grouped by what they await
-- (the distinct lists are read from the index alone).
DROP INDEX IF EXISTS TASKS_awaiting;
CREATE INDEX IF NOT EXISTS TASKS_awaiting_by_after ON TASKS (after, task_id)
    WHERE status = 'pending' AND awaiting_dependencies = 1;
DROP INDEX IF EXISTS TASKS_pending;
-- The preemptions under way (running tasks being stopped for another): a handful at most.
CREATE INDEX IF NOT EXISTS TASKS_preempted ON TASKS (preempted_by)
    WHERE preempted_by IS NOT NULL;
";

/// Adds the [`ADDED_COLUMNS`] a database lacks.
fn add_missing_columns(conn: &Connection) -> rusqlite::Result<()> {
    for (table, column, sql_type) in ADDED_COLUMNS {
        let present: bool = conn.query_row(
            "SELECT COUNT(*) > 0 FROM pragma_table_info(?1) WHERE name = ?2",
            [table, column],
            |row| row.get(0),
        )?;
        if !present {
            conn.execute_batch(&format!(
                "ALTER TABLE {table} ADD COLUMN {column} {sql_type}"
            ))?;
        }
    }
    Ok(())
}

const ACTIVE_POLICY_COLUMNS: &str =
    "kind, name, version, activated_at, activated_by, previous_name, previous_version";

const RESULT_COLUMNS: &str = "task_id, worker_id, status, logs, completed_at, exit_code, error, \
     logs_truncated, stderr, stderr_truncated, oom_killed, attempt, runtime_s, task_type";

/// The embedded SQLite store. Cheap to clone; clones share the writer thread and its
/// connection, which close when the last clone is dropped.
#[derive(Clone)]
pub struct SqliteStore {
    inner: Arc<Inner>,
}

struct Inner {
    /// `None` only while dropping: closing the channel is what ends the writer thread.
    requests: Option<mpsc::Sender<Box<dyn Request>>>,
    writer: Option<JoinHandle<()>>,
    /// Ends after the writer (which holds its stop handle).
    checkpointer: Option<JoinHandle<()>>,
    path: PathBuf,
    /// Transactions the writer thread committed (what a placement round costs, in the
    /// scheduler bench).
    transactions: Arc<AtomicU64>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        drop(self.requests.take());
        if let Some(writer) = self.writer.take() {
            // Joining from the writer itself (a request that held the last handle) would
            // deadlock; it ends on its own once it returns to the closed channel.
            if writer.thread().id() != std::thread::current().id() && writer.join().is_err() {
                tracing::error!(path = %self.path.display(), "the SQLite writer thread panicked");
            }
        }
        if let Some(checkpointer) = self.checkpointer.take()
            && checkpointer.thread().id() != std::thread::current().id()
            && checkpointer.join().is_err()
        {
            tracing::error!(path = %self.path.display(), "the SQLite checkpoint thread panicked");
        }
    }
}

/// One queued operation, type-erased so that requests of any result type share a batch.
trait Request: Send {
    /// Runs the operation; `true` when it succeeded (and its writes may be kept).
    fn run(&mut self, conn: &Connection) -> bool;
    /// Sends the outcome of `run`, or `failure` instead when the batch did not commit.
    fn reply(self: Box<Self>, failure: Option<&str>);
}

struct Pending<T, F> {
    what: &'static str,
    op: Option<F>,
    outcome: Option<Result<T>>,
    reply: oneshot::Sender<Result<T>>,
}

impl<T, F> Request for Pending<T, F>
where
    T: Send + 'static,
    F: FnOnce(&Connection) -> Result<T> + Send + 'static,
{
    fn run(&mut self, conn: &Connection) -> bool {
        let outcome = match self.op.take() {
            // A panic must neither kill the writer nor leave half a request behind: it
            // becomes this request's error and its savepoint is rolled back.
            Some(op) => catch_unwind(AssertUnwindSafe(|| op(conn))).unwrap_or_else(|panic| {
                let message = panic
                    .downcast_ref::<&str>()
                    .map(|m| m.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "unknown panic".to_string());
                Err(StoreError::backend(
                    self.what,
                    format!("the SQLite operation panicked: {message}"),
                ))
            }),
            None => Err(StoreError::backend(self.what, "the request ran twice")),
        };
        let ok = outcome.is_ok();
        self.outcome = Some(outcome);
        ok
    }

    fn reply(self: Box<Self>, failure: Option<&str>) {
        let outcome = match (failure, self.outcome) {
            (Some(failure), _) => Err(StoreError::backend(self.what, failure.to_string())),
            (None, Some(outcome)) => outcome,
            (None, None) => Err(StoreError::backend(self.what, "the request did not run")),
        };
        // The caller may have gone away (its future was dropped): nobody to tell.
        let _ = self.reply.send(outcome);
    }
}

/// The writer thread: batches until every handle (and so the channel) is gone.
fn writer_loop(
    conn: Connection,
    requests: mpsc::Receiver<Box<dyn Request>>,
    transactions: Arc<AtomicU64>,
) {
    let mut batch: Vec<Box<dyn Request>> = Vec::with_capacity(MAX_BATCH);
    while let Ok(first) = requests.recv() {
        batch.push(first);
        while batch.len() < MAX_BATCH {
            match requests.try_recv() {
                Ok(next) => batch.push(next),
                Err(_) => break,
            }
        }
        let failure = run_batch(&conn, &mut batch).err();
        transactions.fetch_add(1, Ordering::Relaxed);
        for request in batch.drain(..) {
            request.reply(failure.as_deref());
        }
    }
}

/// Runs `batch` in one transaction, each request in its own savepoint. `Err` (a description)
/// when the transaction did not commit: then nothing of the batch was kept.
fn run_batch(conn: &Connection, batch: &mut [Box<dyn Request>]) -> std::result::Result<(), String> {
    // IMMEDIATE: take the write lock up front, so that reads and the writes that depend on
    // them cannot be separated by another process.
    exec(conn, "BEGIN IMMEDIATE").map_err(|e| format!("starting a transaction: {e}"))?;
    if let [only] = batch {
        // Alone in its batch (the common case without concurrency), a request needs no
        // savepoint: the transaction is its own.
        if !only.run(conn) {
            rollback(conn);
            return Ok(());
        }
    } else {
        for request in batch.iter_mut() {
            let step = exec(conn, "SAVEPOINT request")
                .and_then(|()| {
                    if !request.run(conn) {
                        exec(conn, "ROLLBACK TO request")?;
                    }
                    exec(conn, "RELEASE request")
                })
                .map_err(|e| format!("delimiting a request with a savepoint: {e}"));
            if let Err(e) = step {
                // The transaction's state is unknown: give up the whole batch.
                rollback(conn);
                return Err(e);
            }
        }
    }
    if let Err(e) = exec(conn, "COMMIT") {
        rollback(conn);
        return Err(format!("committing a transaction: {e}"));
    }
    Ok(())
}

/// Runs one statement without arguments, prepared once per connection.
fn exec(conn: &Connection, sql: &str) -> rusqlite::Result<()> {
    conn.prepare_cached(sql)?.execute([]).map(drop)
}

/// Leaves the connection outside any transaction, whatever state it is in.
fn rollback(conn: &Connection) {
    if !conn.is_autocommit()
        && let Err(e) = conn.execute_batch("ROLLBACK")
    {
        tracing::error!(error = %e, "rolling back a failed SQLite batch");
    }
}

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteStore")
            .field("path", &self.inner.path)
            .finish()
    }
}

impl SqliteStore {
    /// Opens (creating when absent) the database at `path`, with its parent directory and
    /// schema. Idempotent: opening an existing database keeps its data.
    pub fn open(path: &Path) -> Result<Self> {
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(|e| {
                StoreError::backend(
                    format!("creating the data directory {}", parent.display()),
                    e,
                )
            })?;
        }
        let what = |step: &str| format!("{step} of the SQLite database {}", path.display());
        let conn = Connection::open(path).map_err(|e| StoreError::backend(what("opening"), e))?;
        conn.busy_timeout(BUSY_TIMEOUT)
            .map_err(|e| StoreError::backend(what("setting the busy timeout"), e))?;
        let mode: String = conn
            .query_row("PRAGMA journal_mode = WAL", [], |row| row.get(0))
            .map_err(|e| StoreError::backend(what("enabling WAL"), e))?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(StoreError::backend(
                what("enabling WAL"),
                format!("journal_mode is '{mode}', not 'wal'"),
            ));
        }
        // NORMAL in WAL mode: a power loss may lose the last commits but never corrupts.
        conn.pragma_update(None, "synchronous", "NORMAL")
            .map_err(|e| StoreError::backend(what("setting synchronous"), e))?;
        // SQLite's default page cache is 2 MB: a store of 50,000 tasks then reads its hot
        // index pages from the OS on every statement. Pages are cached as they are used,
        // up to this.
        conn.pragma_update(None, "cache_size", -PAGE_CACHE_KIB)
            .map_err(|e| StoreError::backend(what("setting the page cache size"), e))?;
        // Every request of a batch runs in a savepoint, whose undo pages SQLite keeps in a
        // statement journal: a temporary file by default, one write call per page (16% of the
        // host's CPU in the HTTP bench's allocation phase). In memory it is a copy; it holds at most the pages
        // one transaction changes.
        conn.pragma_update(None, "temp_store", "MEMORY")
            .map_err(|e| StoreError::backend(what("keeping temporary data in memory"), e))?;
        let version: i64 = conn
            .query_row("PRAGMA user_version", [], |row| row.get(0))
            .map_err(|e| StoreError::backend(what("reading the schema version"), e))?;
        if version > SCHEMA_VERSION {
            return Err(StoreError::backend(
                what("checking the schema version"),
                format!(
                    "schema version {version} was written by a newer cloudai (this one knows {SCHEMA_VERSION})"
                ),
            ));
        }
        conn.execute_batch(SCHEMA)
            .map_err(|e| StoreError::backend(what("creating the schema"), e))?;
        add_missing_columns(&conn)
            .map_err(|e| StoreError::backend(what("adding new columns to the schema"), e))?;
        conn.execute_batch(ADDED_INDEXES)
            .map_err(|e| StoreError::backend(what("indexing the new columns"), e))?;
        events::create_schema(&conn)
            .map_err(|e| StoreError::backend(what("creating the events table"), e))?;
        conn.execute_batch(USER_RUNNING_REBUILD)
            .map_err(|e| StoreError::backend(what("counting the users' running tasks"), e))?;
        conn.pragma_update(None, "user_version", SCHEMA_VERSION)
            .map_err(|e| StoreError::backend(what("recording the schema version"), e))?;
        conn.set_prepared_statement_cache_capacity(64);
        // Checkpoints run on a thread of their own (checkpoint.rs), never inside a commit.
        conn.pragma_update(None, "wal_autocheckpoint", 0)
            .map_err(|e| StoreError::backend(what("turning automatic checkpoints off"), e))?;
        let (checkpoints, checkpointer) = checkpoint::start(path)
            .map_err(|e| StoreError::backend(what("starting the checkpoint thread"), e))?;
        let (requests, queue) = mpsc::channel();
        let transactions = Arc::new(AtomicU64::new(0));
        let counted = transactions.clone();
        let writer = std::thread::Builder::new()
            .name("cloudai-sqlite".to_string())
            .spawn(move || {
                writer_loop(conn, queue, counted);
                drop(checkpoints);
            })
            .map_err(|e| StoreError::backend(what("starting the writer thread"), e))?;
        Ok(SqliteStore {
            inner: Arc::new(Inner {
                requests: Some(requests),
                writer: Some(writer),
                checkpointer: Some(checkpointer),
                path: path.to_path_buf(),
                transactions,
            }),
        })
    }

    /// Opens `data_dir/cloudai.db`.
    pub fn open_in_dir(data_dir: &Path) -> Result<Self> {
        SqliteStore::open(&data_dir.join(DB_FILE_NAME))
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// How many transactions this store has run so far (each answers one or more requests:
    /// the writer commits the requests queued at the same time together).
    pub fn transactions(&self) -> u64 {
        self.inner.transactions.load(Ordering::Relaxed)
    }

    /// Runs `f` on the writer thread, inside its batch's transaction and its own savepoint:
    /// when `f` fails (or panics) its writes are rolled back. Answers once the batch committed.
    async fn call<T, F>(&self, what: &'static str, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T> + Send + 'static,
    {
        let (reply, answer) = oneshot::channel();
        let request = Box::new(Pending {
            what,
            op: Some(f),
            outcome: None,
            reply,
        });
        self.inner
            .requests
            .as_ref()
            .ok_or_else(|| StoreError::backend(what, "the SQLite store is closing"))?
            .send(request)
            .map_err(|_| StoreError::backend(what, "the SQLite writer thread has stopped"))?;
        answer.await.map_err(|_| {
            StoreError::backend(what, "the SQLite writer thread dropped the request")
        })?
    }
}

// ------------------------------------------------------------------------------------------
// Conversions
// ------------------------------------------------------------------------------------------

fn sql_err(what: &'static str) -> impl FnOnce(rusqlite::Error) -> StoreError {
    move |e| StoreError::backend(what, e)
}

fn is_unique_violation(e: &rusqlite::Error) -> bool {
    matches!(e, rusqlite::Error::SqliteFailure(f, _)
        if f.code == ErrorCode::ConstraintViolation
            && (f.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_UNIQUE
                || f.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_PRIMARYKEY))
}

/// Maps a unique-index violation to `AlreadyExists`, anything else to `Backend`.
fn insert_err(
    kind: &'static str,
    id: &str,
    what: &'static str,
) -> impl FnOnce(rusqlite::Error) -> StoreError {
    let id = id.to_string();
    move |e| {
        if is_unique_violation(&e) {
            StoreError::AlreadyExists { kind, id }
        } else {
            StoreError::backend(what, e)
        }
    }
}

fn date_text(at: &DateTime<Utc>) -> String {
    at.format("%Y-%m-%dT%H:%M:%S%.3fZ").to_string()
}

fn opt_date_text(at: &Option<DateTime<Utc>>) -> Option<String> {
    at.as_ref().map(date_text)
}

/// A decoding failure inside a row mapper.
fn conversion(
    idx: usize,
    e: impl Into<Box<dyn std::error::Error + Send + Sync>>,
) -> rusqlite::Error {
    rusqlite::Error::FromSqlConversionFailure(idx, rusqlite::types::Type::Text, e.into())
}

fn get_date(row: &Row<'_>, idx: usize) -> rusqlite::Result<DateTime<Utc>> {
    let text: String = row.get(idx)?;
    DateTime::parse_from_rfc3339(&text)
        .map(|d| d.with_timezone(&Utc))
        .map_err(|e| conversion(idx, e))
}

fn get_opt_date(row: &Row<'_>, idx: usize) -> rusqlite::Result<Option<DateTime<Utc>>> {
    let text: Option<String> = row.get(idx)?;
    text.map(|t| {
        DateTime::parse_from_rfc3339(&t)
            .map(|d| d.with_timezone(&Utc))
            .map_err(|e| conversion(idx, e))
    })
    .transpose()
}

fn get_json<T: serde::de::DeserializeOwned>(row: &Row<'_>, idx: usize) -> rusqlite::Result<T> {
    let text: String = row.get(idx)?;
    serde_json::from_str(&text).map_err(|e| conversion(idx, e))
}

fn get_opt_json<T: serde::de::DeserializeOwned>(
    row: &Row<'_>,
    idx: usize,
) -> rusqlite::Result<Option<T>> {
    let text: Option<String> = row.get(idx)?;
    text.map(|t| serde_json::from_str(&t).map_err(|e| conversion(idx, e)))
        .transpose()
}

fn get_parsed<T: std::str::FromStr<Err = String>>(
    row: &Row<'_>,
    idx: usize,
) -> rusqlite::Result<T> {
    let text: String = row.get(idx)?;
    text.parse().map_err(|e: String| conversion(idx, e))
}

fn get_u32(row: &Row<'_>, idx: usize) -> rusqlite::Result<u32> {
    let n: i64 = row.get(idx)?;
    u32::try_from(n).map_err(|e| conversion(idx, e))
}

fn to_json<T: serde::Serialize>(value: &T, what: &'static str) -> Result<String> {
    serde_json::to_string(value).map_err(|e| StoreError::backend(what, e))
}

fn task_from_row(row: &Row<'_>) -> rusqlite::Result<Task> {
    task_at(row, 0)
}

/// A task from the columns [`TASK_COLUMNS`] starting at column `at` of `row`.
fn task_at(row: &Row<'_>, at: usize) -> rusqlite::Result<Task> {
    let timeout_s: Option<i64> = row.get(at + 15)?;
    Ok(Task {
        task_id: row.get(at)?,
        user_id: row.get(at + 1)?,
        docker_image: row.get(at + 2)?,
        command: row.get(at + 3)?,
        req_cpu: row.get(at + 4)?,
        req_memory: row.get(at + 5)?,
        req_storage: row.get(at + 6)?,
        req_gpu: row.get(at + 7)?,
        status: get_parsed(row, at + 8)?,
        created_at: get_date(row, at + 9)?,
        started_at: get_opt_date(row, at + 10)?,
        completed_at: get_opt_date(row, at + 11)?,
        priority: row.get(at + 12)?,
        labels: get_json(row, at + 13)?,
        env: get_json(row, at + 14)?,
        timeout_s: timeout_s
            .map(|t| u64::try_from(t).map_err(|e| conversion(at + 15, e)))
            .transpose()?,
        max_attempts: get_u32(row, at + 16)?,
        attempts: get_u32(row, at + 17)?,
        exit_code: row.get(at + 18)?,
        error: row.get(at + 19)?,
        status_reason: row.get(at + 20)?,
        cancel_requested: row.get(at + 21)?,
        owner: row.get(at + 22)?,
        lease_expires_at: get_opt_date(row, at + 23)?,
        idempotency_key: row.get(at + 24)?,
        updated_at: get_date(row, at + 25)?,
        placed_by: row.get(at + 26)?,
        array_id: row.get(at + 27)?,
        array_index: row
            .get::<_, Option<i64>>(at + 28)?
            .map(|i| u32::try_from(i).map_err(|e| conversion(at + 28, e)))
            .transpose()?,
        after: row
            .get::<_, Option<String>>(at + 29)?
            .map(|text| serde_json::from_str(&text).map_err(|e| conversion(at + 29, e)))
            .transpose()?
            .unwrap_or_default(),
        awaiting_dependencies: row.get(at + 30)?,
        preemptible: row.get(at + 31)?,
        preempted_by: row.get(at + 32)?,
    })
}

fn worker_from_row(row: &Row<'_>) -> rusqlite::Result<Worker> {
    Ok(Worker {
        worker_id: row.get(0)?,
        worker_ip: row.get(1)?,
        total_cpu: row.get(2)?,
        total_memory: row.get(3)?,
        total_storage: row.get(4)?,
        total_gpu: row.get(5)?,
        allocated_cpu: row.get(6)?,
        allocated_memory: row.get(7)?,
        allocated_storage: row.get(8)?,
        allocated_gpu: row.get(9)?,
        available_cpu: row.get(10)?,
        available_memory: row.get(11)?,
        available_storage: row.get(12)?,
        available_gpu: row.get(13)?,
        is_active: row.get(14)?,
        last_heartbeat: row.get(15)?,
        registered_at: get_date(row, 16)?,
        updated_at: get_date(row, 17)?,
        draining: row.get(18)?,
        labels: get_json(row, 19)?,
        usage: get_opt_json(row, 20)?,
        token_sha256: row.get(21)?,
    })
}

fn assignment_from_row(row: &Row<'_>) -> rusqlite::Result<Assignment> {
    assignment_at(row, 0)
}

/// An assignment from the columns [`ASSIGNMENT_COLUMNS`] starting at column `at` of `row`.
fn assignment_at(row: &Row<'_>, at: usize) -> rusqlite::Result<Assignment> {
    Ok(Assignment {
        ass_id: row.get(at)?,
        task_id: row.get(at + 1)?,
        worker_id: row.get(at + 2)?,
        assigned_at: get_date(row, at + 3)?,
        req_cpu: row.get(at + 4)?,
        req_memory: row.get(at + 5)?,
        req_storage: row.get(at + 6)?,
        req_gpu: row.get(at + 7)?,
        attempt: get_u32(row, at + 8)?,
        released: row.get(at + 9)?,
        released_at: get_opt_date(row, at + 10)?,
        placed_by: row.get(at + 11)?,
        // Placement is one transaction here: no recount can fall inside one.
        reserved_epoch: None,
    })
}

fn result_from_row(row: &Row<'_>) -> rusqlite::Result<TaskResult> {
    Ok(TaskResult {
        task_id: row.get(0)?,
        worker_id: row.get(1)?,
        status: get_parsed(row, 2)?,
        logs: row.get(3)?,
        completed_at: get_date(row, 4)?,
        exit_code: row.get(5)?,
        error: row.get(6)?,
        logs_truncated: row.get(7)?,
        stderr: row.get(8)?,
        stderr_truncated: row.get(9)?,
        oom_killed: row.get(10)?,
        attempt: row.get(11)?,
        runtime_s: row.get(12)?,
        task_type: row.get(13)?,
    })
}

// ------------------------------------------------------------------------------------------
// Synchronous operations on the writer thread's connection. Each runs inside its own
// savepoint of an IMMEDIATE transaction (see `run_batch`): returning `Err` undoes its writes.
// ------------------------------------------------------------------------------------------

fn select_task(conn: &Connection, task_id: &str) -> Result<Option<Task>> {
    conn.prepare_cached(&format!(
        "SELECT {TASK_COLUMNS} FROM TASKS WHERE task_id = ?1"
    ))
    .and_then(|mut stmt| stmt.query_row([task_id], task_from_row).optional())
    .map_err(sql_err("reading a task"))
}

fn require_task(conn: &Connection, task_id: &str) -> Result<Task> {
    select_task(conn, task_id)?.ok_or_else(|| StoreError::NotFound {
        kind: "task",
        id: task_id.to_string(),
    })
}

fn task_status(conn: &Connection, task_id: &str) -> Result<Option<String>> {
    conn.prepare_cached("SELECT status FROM TASKS WHERE task_id = ?1")
        .and_then(|mut stmt| stmt.query_row([task_id], |row| row.get(0)).optional())
        .map_err(sql_err("reading a task's status"))
}

/// After a conditional task update that applied to no row: `NotFound` or `Conflict`.
fn task_not_applied(conn: &Connection, task_id: &str, expected: String) -> StoreError {
    match task_status(conn, task_id) {
        Ok(None) => StoreError::NotFound {
            kind: "task",
            id: task_id.to_string(),
        },
        Ok(Some(actual)) => StoreError::Conflict {
            kind: "task",
            id: task_id.to_string(),
            expected,
            actual,
        },
        Err(e) => e,
    }
}

fn select_worker(conn: &Connection, worker_id: &str) -> Result<Worker> {
    conn.prepare_cached(&format!(
        "SELECT {WORKER_COLUMNS} FROM WORKER_REGISTRY WHERE worker_id = ?1"
    ))
    .and_then(|mut stmt| stmt.query_row([worker_id], worker_from_row).optional())
    .map_err(sql_err("reading a worker"))?
    .ok_or_else(|| StoreError::NotFound {
        kind: "worker",
        id: worker_id.to_string(),
    })
}

fn worker_exists(conn: &Connection, worker_id: &str) -> Result<bool> {
    conn.prepare_cached("SELECT 1 FROM WORKER_REGISTRY WHERE worker_id = ?1")
        .and_then(|mut stmt| stmt.exists([worker_id]))
        .map_err(sql_err("checking that a worker exists"))
}

fn insert_task_row(conn: &Connection, task: &Task) -> Result<()> {
    let labels = to_json(&task.labels, "encoding task labels")?;
    let after = if task.after.is_empty() {
        None
    } else {
        Some(to_json(&task.after, "encoding task dependencies")?)
    };
    let env = to_json(&task.env, "encoding task env")?;
    let timeout_s = task
        .timeout_s
        .map(i64::try_from)
        .transpose()
        .map_err(|e| StoreError::backend("encoding timeout_s", e))?;
    conn.prepare_cached(&format!(
        "INSERT INTO TASKS ({TASK_COLUMNS}) VALUES \
         (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18, ?19, \
          ?20, ?21, ?22, ?23, ?24, ?25, ?26, ?27, ?28, ?29, ?30, ?31, ?32, ?33)"
    ))
    .and_then(|mut stmt| {
        stmt.execute(params![
            task.task_id,
            task.user_id,
            task.docker_image,
            task.command,
            task.req_cpu,
            task.req_memory,
            task.req_storage,
            task.req_gpu,
            task.status.as_str(),
            date_text(&task.created_at),
            opt_date_text(&task.started_at),
            opt_date_text(&task.completed_at),
            task.priority,
            labels,
            env,
            timeout_s,
            task.max_attempts,
            task.attempts,
            task.exit_code,
            task.error,
            task.status_reason,
            task.cancel_requested,
            task.owner,
            opt_date_text(&task.lease_expires_at),
            task.idempotency_key,
            date_text(&task.updated_at),
            task.placed_by,
            task.array_id,
            task.array_index,
            after,
            task.awaiting_dependencies,
            task.preemptible,
            task.preempted_by,
        ])
    })
    .map(drop)
    .map_err(insert_err("task", &task.task_id, "inserting a task"))
}

fn insert_task_sync(
    conn: &Connection,
    task: &Task,
    idempotency: Option<&IdempotencyKey>,
) -> Result<SubmitOutcome> {
    let Some(key) = idempotency else {
        insert_task_row(conn, task)?;
        return Ok(SubmitOutcome {
            task: require_task(conn, &task.task_id)?,
            created: true,
        });
    };
    // The batch's IMMEDIATE transaction holds the write lock since before the lookup, so no
    // other process can record the same key between our lookup and our insert; our savepoint
    // drops the task row again when recording the key fails.
    let previous: Option<(String, String)> = conn
        .prepare_cached(
            "SELECT request_sha256, task_id FROM IDEMPOTENCY_KEYS \
             WHERE user_id = ?1 AND idempotency_key = ?2",
        )
        .and_then(|mut stmt| {
            stmt.query_row([&task.user_id, &key.key], |row| {
                Ok((row.get(0)?, row.get(1)?))
            })
            .optional()
        })
        .map_err(sql_err("looking up an idempotency key"))?;
    if let Some((digest, task_id)) = previous {
        if digest != key.request_sha256 {
            return Err(StoreError::IdempotencyMismatch {
                key: key.key.clone(),
                task_id,
            });
        }
        return Ok(SubmitOutcome {
            task: require_task(conn, &task_id)?,
            created: false,
        });
    }
    insert_task_row(conn, task)?;
    conn.prepare_cached(
        "INSERT INTO IDEMPOTENCY_KEYS (user_id, idempotency_key, request_sha256, task_id, created_at) \
         VALUES (?1, ?2, ?3, ?4, ?5)",
    )
    .and_then(|mut stmt| {
        stmt.execute(params![
            task.user_id,
            key.key,
            key.request_sha256,
            task.task_id,
            date_text(&now()),
        ])
    })
    .map_err(sql_err("recording an idempotency key"))?;
    let stored = require_task(conn, &task.task_id)?;
    Ok(SubmitOutcome {
        task: stored,
        created: true,
    })
}

/// The tasks of one array, in the caller's transaction (see [`Store::insert_tasks`]).
fn insert_tasks_sync(
    conn: &Connection,
    tasks: &[Task],
    idempotency: Option<&IdempotencyKey>,
) -> Result<SubmitOutcome> {
    let Some((first, rest)) = tasks.split_first() else {
        return Err(StoreError::backend(
            "inserting an array's tasks",
            "an array has at least one task",
        ));
    };
    // The first task carries the key (its lookup, its record); the savepoint of this call
    // drops every row again when one insert fails.
    let outcome = insert_task_sync(conn, first, idempotency)?;
    if !outcome.created {
        return Ok(outcome);
    }
    for task in rest {
        insert_task_row(conn, task)?;
    }
    Ok(outcome)
}

/// `(status, count)` rows of a `GROUP BY status` as counts.
fn counts_from_rows(rows: Vec<(String, i64)>, what: &str) -> Result<TaskCounts> {
    let mut counts = TaskCounts::default();
    for (status, n) in rows {
        let status = status
            .parse::<TaskStatus>()
            .map_err(|e| StoreError::backend(what.to_string(), e))?;
        counts.add(status, u64::try_from(n).unwrap_or(0));
    }
    Ok(counts)
}

fn array_summary_sync(conn: &Connection, array_id: &str) -> Result<ArraySummary> {
    let first = conn
        .prepare_cached(&format!(
            "SELECT {TASK_COLUMNS} FROM TASKS INDEXED BY TASKS_array \
             WHERE array_id = ?1 ORDER BY array_index LIMIT 1"
        ))
        .and_then(|mut stmt| stmt.query_row([array_id], task_from_row).optional())
        .map_err(sql_err("reading an array's first task"))?
        .ok_or_else(|| StoreError::NotFound {
            kind: "array",
            id: array_id.to_string(),
        })?;
    let rows: Vec<(String, i64)> = conn
        .prepare_cached(
            "SELECT status, COUNT(*) FROM TASKS INDEXED BY TASKS_array \
             WHERE array_id = ?1 GROUP BY status",
        )
        .and_then(|mut stmt| {
            stmt.query_map([array_id], |row| Ok((row.get(0)?, row.get(1)?)))?
                .collect()
        })
        .map_err(sql_err("counting an array's tasks by status"))?;
    let counts = counts_from_rows(rows, "counting an array's tasks by status")?;
    Ok(ArraySummary {
        array_id: array_id.to_string(),
        user_id: first.user_id,
        created_at: first.created_at,
        docker_image: first.docker_image,
        counts,
    })
}

fn list_tasks_sync(conn: &Connection, query: &TaskQuery) -> Result<TaskPage> {
    let mut sql = format!("SELECT {TASK_COLUMNS} FROM TASKS WHERE 1 = 1");
    let mut args: Vec<Value> = Vec::new();
    if let Some(status) = query.status {
        args.push(Value::Text(status.as_str().to_string()));
        sql.push_str(&format!(" AND status = ?{}", args.len()));
    }
    if let Some(user_id) = &query.user_id {
        args.push(Value::Text(user_id.clone()));
        sql.push_str(&format!(" AND user_id = ?{}", args.len()));
    }
    if let Some(array_id) = &query.array_id {
        args.push(Value::Text(array_id.clone()));
        sql.push_str(&format!(" AND array_id = ?{}", args.len()));
    }
    if let Some(after) = &query.after {
        args.push(Value::Text(date_text(&after.created_at)));
        let c = args.len();
        args.push(Value::Text(after.task_id.clone()));
        let t = args.len();
        sql.push_str(&format!(
            " AND (created_at < ?{c} OR (created_at = ?{c} AND task_id < ?{t}))"
        ));
    }
    // One extra row tells whether another page follows.
    args.push(Value::Integer(i64::from(query.limit) + 1));
    sql.push_str(&format!(
        " ORDER BY created_at DESC, task_id DESC LIMIT ?{}",
        args.len()
    ));
    let tasks = conn
        .prepare_cached(&sql)
        .and_then(|mut stmt| {
            stmt.query_map(params_from_iter(args), task_from_row)?
                .collect::<rusqlite::Result<Vec<_>>>()
        })
        .map_err(sql_err("listing tasks"))?;
    Ok(TaskPage::from_overfetched(tasks, query.limit))
}

fn transition_task_sync(
    conn: &Connection,
    task_id: &str,
    from: &[TaskStatus],
    to: TaskStatus,
    update: &TaskUpdate,
) -> Result<Task> {
    transition_sync(conn, task_id, None, from, to, update)
}

/// A conditional transition; with `attempt`, only while `attempts` equals it.
fn transition_sync(
    conn: &Connection,
    task_id: &str,
    attempt: Option<u32>,
    from: &[TaskStatus],
    to: TaskStatus,
    update: &TaskUpdate,
) -> Result<Task> {
    let expected = from
        .iter()
        .map(|s| s.as_str())
        .collect::<Vec<_>>()
        .join(" or ");
    if from.is_empty() {
        return Err(task_not_applied(conn, task_id, "(no state)".to_string()));
    }
    let placeholders = (0..from.len())
        .map(|i| format!("?{}", 12 + i))
        .collect::<Vec<_>>()
        .join(", ");
    // `None` leaves a column alone: COALESCE keeps the stored value.
    let sql = format!(
        "UPDATE TASKS SET status = ?1, updated_at = ?2, \
             started_at = COALESCE(?3, started_at), \
             completed_at = COALESCE(?4, completed_at), \
             exit_code = COALESCE(?5, exit_code), \
             error = COALESCE(?6, error), \
             status_reason = CASE WHEN ?7 THEN ?8 ELSE status_reason END, \
             attempts = attempts + ?9, \
             owner = CASE WHEN ?10 THEN NULL ELSE owner END, \
             lease_expires_at = CASE WHEN ?10 THEN NULL ELSE lease_expires_at END, \
             cancel_requested = CASE WHEN ?11 THEN 0 ELSE cancel_requested END, \
             preempted_by = CASE WHEN ?11 THEN NULL ELSE preempted_by END \
         WHERE task_id = ?{} AND status IN ({placeholders}) \
           AND (?{} IS NULL OR attempts = ?{})",
        12 + from.len(),
        13 + from.len(),
        13 + from.len()
    );
    let mut args: Vec<Value> = vec![
        Value::Text(to.as_str().to_string()),
        Value::Text(date_text(&now())),
        opt_date_text(&update.started_at).map_or(Value::Null, Value::Text),
        opt_date_text(&update.completed_at).map_or(Value::Null, Value::Text),
        update.exit_code.map_or(Value::Null, Value::Integer),
        update.error.clone().map_or(Value::Null, Value::Text),
        Value::Integer(i64::from(update.status_reason.is_some())),
        update
            .status_reason
            .clone()
            .flatten()
            .map_or(Value::Null, Value::Text),
        Value::Integer(i64::from(update.increment_attempts)),
        Value::Integer(i64::from(update.clear_claim)),
        Value::Integer(i64::from(update.clear_preemption)),
    ];
    args.extend(from.iter().map(|s| Value::Text(s.as_str().to_string())));
    args.push(Value::Text(task_id.to_string()));
    args.push(attempt.map_or(Value::Null, |n| Value::Integer(i64::from(n))));
    let changed = conn
        .prepare_cached(&sql)
        .and_then(|mut stmt| stmt.execute(params_from_iter(args)))
        .map_err(sql_err("transitioning a task"))?;
    if changed == 0 {
        let Some(attempt) = attempt else {
            return Err(task_not_applied(conn, task_id, expected));
        };
        let task = require_task(conn, task_id)?;
        return Err(StoreError::Conflict {
            kind: "task",
            id: task_id.to_string(),
            expected: format!("{expected} at attempt {attempt}"),
            actual: format!("{} at attempt {}", task.status, task.attempts),
        });
    }
    require_task(conn, task_id)
}

fn claim_task_sync(
    conn: &Connection,
    task_id: &str,
    owner: &str,
    lease_until: &DateTime<Utc>,
    at: &DateTime<Utc>,
) -> Result<Task> {
    let changed = conn
        .prepare_cached(
            "UPDATE TASKS SET owner = ?1, lease_expires_at = ?2, updated_at = ?3 \
             WHERE task_id = ?4 AND status = 'queued' \
               AND (owner IS NULL OR owner = ?1 OR lease_expires_at IS NULL \
                    OR lease_expires_at < ?5)",
        )
        .and_then(|mut stmt| {
            stmt.execute(params![
                owner,
                date_text(lease_until),
                date_text(&now()),
                task_id,
                date_text(at),
            ])
        })
        .map_err(sql_err("claiming a task"))?;
    if changed == 1 {
        return require_task(conn, task_id);
    }
    let task = require_task(conn, task_id)?;
    let actual = if task.status == TaskStatus::Queued {
        format!(
            "claimed by {} until {}",
            task.owner.as_deref().unwrap_or("nobody"),
            opt_date_text(&task.lease_expires_at).unwrap_or_default()
        )
    } else {
        task.status.as_str().to_string()
    };
    Err(StoreError::Conflict {
        kind: "task",
        id: task_id.to_string(),
        expected: "queued and unclaimed, claimed by the same owner, or with an expired lease"
            .to_string(),
        actual,
    })
}

fn request_cancel_sync(conn: &Connection, task_id: &str) -> Result<Task> {
    let changed = conn
        .prepare_cached(
            "UPDATE TASKS SET cancel_requested = 1, preempted_by = NULL, updated_at = ?1 \
             WHERE task_id = ?2 AND status = 'running'",
        )
        .and_then(|mut stmt| stmt.execute(params![date_text(&now()), task_id]))
        .map_err(sql_err("requesting a task's cancellation"))?;
    if changed == 0 {
        return Err(task_not_applied(conn, task_id, "running".to_string()));
    }
    require_task(conn, task_id)
}

fn request_preemption_sync(
    conn: &Connection,
    victims: &[(String, u32)],
    by: &str,
    reason: &str,
) -> Result<Vec<String>> {
    let at = date_text(&now());
    let mut marked = Vec::with_capacity(victims.len());
    for (task_id, attempt) in victims {
        let changed = conn
            .prepare_cached(
                "UPDATE TASKS SET cancel_requested = 1, preempted_by = ?1, status_reason = ?2, \
                     updated_at = ?3 \
                 WHERE task_id = ?4 AND status = 'running' AND attempts = ?5 \
                   AND max_attempts > ?5 AND preemptible = 1 AND cancel_requested = 0",
            )
            .and_then(|mut stmt| stmt.execute(params![by, reason, at, task_id, attempt]))
            .map_err(sql_err("asking a task to stop for a preemption"))?;
        if changed == 1 {
            marked.push(task_id.clone());
        }
    }
    Ok(marked)
}

/// The running tasks a preemption may name, each with the assignment it runs under, in ONE
/// query (the running tasks are few next to the rest; the assignment by its task's index).
fn preemptible_running_sync(
    conn: &Connection,
    below_priority: i32,
    limit: u32,
) -> Result<Vec<(Task, Assignment)>> {
    let prefixed = |columns: &str, table: &str| {
        columns
            .split(',')
            .map(|c| format!("{table}.{}", c.trim()))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let sql = format!(
        "SELECT {}, {} FROM TASKS t JOIN ASSIGNMENTS a ON a.task_id = t.task_id \
         WHERE t.status = 'running' AND t.priority < ?1 AND t.preemptible = 1 \
           AND t.cancel_requested = 0 AND t.attempts < t.max_attempts \
           AND a.released = 0 AND a.attempt = t.attempts \
         ORDER BY t.priority, a.assigned_at DESC, t.task_id LIMIT ?2",
        prefixed(TASK_COLUMNS, "t"),
        prefixed(ASSIGNMENT_COLUMNS, "a"),
    );
    let task_columns = TASK_COLUMNS.split(',').count();
    let rows: Vec<(Task, Assignment)> = conn
        .prepare_cached(&sql)
        .and_then(|mut stmt| {
            stmt.query_map(params![below_priority, limit], |row| {
                Ok((task_at(row, 0)?, assignment_at(row, task_columns)?))
            })?
            .collect()
        })
        .map_err(sql_err("reading the tasks a preemption may stop"))?;
    Ok(rows.into_iter().filter(|(t, a)| a.holds(t)).collect())
}

fn preemptions_in_progress_sync(conn: &Connection) -> Result<BTreeMap<String, u32>> {
    conn.prepare_cached(
        "SELECT preempted_by, COUNT(*) FROM TASKS INDEXED BY TASKS_preempted \
         WHERE preempted_by IS NOT NULL AND status = 'running' GROUP BY preempted_by",
    )
    .and_then(|mut stmt| {
        stmt.query_map([], |row| Ok((row.get::<_, String>(0)?, get_u32(row, 1)?)))?
            .collect()
    })
    .map_err(sql_err("reading the preemptions in progress"))
}

fn insert_worker_sync(conn: &Connection, w: &Worker) -> Result<()> {
    let labels = to_json(&w.labels, "encoding worker labels")?;
    let usage = w
        .usage
        .as_ref()
        .map(|u| to_json(u, "encoding worker usage"))
        .transpose()?;
    conn.prepare_cached(&format!(
        "INSERT INTO WORKER_REGISTRY ({WORKER_COLUMNS}) VALUES \
         (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18, ?19, \
          ?20, ?21, ?22)"
    ))
    .and_then(|mut stmt| {
        stmt.execute(params![
            w.worker_id,
            w.worker_ip,
            w.total_cpu,
            w.total_memory,
            w.total_storage,
            w.total_gpu,
            w.allocated_cpu,
            w.allocated_memory,
            w.allocated_storage,
            w.allocated_gpu,
            w.available_cpu,
            w.available_memory,
            w.available_storage,
            w.available_gpu,
            w.is_active,
            w.last_heartbeat,
            date_text(&w.registered_at),
            date_text(&w.updated_at),
            w.draining,
            labels,
            usage,
            w.token_sha256,
        ])
    })
    .map(drop)
    .map_err(insert_err("worker", &w.worker_id, "inserting a worker"))
}

/// Runs a one-row worker update (`?1` is the worker id), then reads the worker back.
fn update_worker(
    conn: &Connection,
    worker_id: &str,
    sql: &str,
    extra: &[&dyn rusqlite::ToSql],
    what: &'static str,
) -> Result<Worker> {
    let mut args: Vec<&dyn rusqlite::ToSql> = vec![&worker_id];
    args.extend_from_slice(extra);
    let changed = conn
        .prepare_cached(sql)
        .and_then(|mut stmt| stmt.execute(args.as_slice()))
        .map_err(sql_err(what))?;
    if changed == 0 {
        return Err(StoreError::NotFound {
            kind: "worker",
            id: worker_id.to_string(),
        });
    }
    select_worker(conn, worker_id)
}

fn reserve_sync(conn: &Connection, worker_id: &str, r: &Resources) -> Result<bool> {
    // ONE conditional update: the check and the move cannot be separated by another writer.
    let changed = conn
        .prepare_cached(
            "UPDATE WORKER_REGISTRY SET \
                 allocated_cpu = allocated_cpu + ?2, available_cpu = available_cpu - ?2, \
                 allocated_memory = allocated_memory + ?3, available_memory = available_memory - ?3, \
                 allocated_storage = allocated_storage + ?4, available_storage = available_storage - ?4, \
                 allocated_gpu = allocated_gpu + ?5, available_gpu = available_gpu - ?5, \
                 updated_at = ?6 \
             WHERE worker_id = ?1 AND is_active = 1 AND draining = 0 \
               AND available_cpu >= ?2 AND available_memory >= ?3 \
               AND available_storage >= ?4 AND available_gpu >= ?5",
        )
        .and_then(|mut stmt| {
            stmt.execute(params![
                worker_id,
                r.cpu,
                r.memory,
                r.storage,
                r.gpu,
                date_text(&now()),
            ])
        })
        .map_err(sql_err("reserving resources on a worker"))?;
    if changed == 1 {
        return Ok(true);
    }
    if worker_exists(conn, worker_id)? {
        Ok(false)
    } else {
        Err(StoreError::NotFound {
            kind: "worker",
            id: worker_id.to_string(),
        })
    }
}

fn delete_worker_sync(conn: &Connection, worker_id: &str) -> Result<()> {
    // One statement: no assignment can slip in between the check and the delete.
    let changed = conn
        .prepare_cached(
            "DELETE FROM WORKER_REGISTRY WHERE worker_id = ?1 AND NOT EXISTS \
             (SELECT 1 FROM ASSIGNMENTS WHERE worker_id = ?1 AND released = 0)",
        )
        .and_then(|mut stmt| stmt.execute([worker_id]))
        .map_err(sql_err("deleting a worker"))?;
    if changed == 1 {
        return Ok(());
    }
    if !worker_exists(conn, worker_id)? {
        return Err(StoreError::NotFound {
            kind: "worker",
            id: worker_id.to_string(),
        });
    }
    let active: i64 = conn
        .prepare_cached("SELECT COUNT(*) FROM ASSIGNMENTS WHERE worker_id = ?1 AND released = 0")
        .and_then(|mut stmt| stmt.query_row([worker_id], |row| row.get(0)))
        .map_err(sql_err("counting a worker's active assignments"))?;
    Err(StoreError::Conflict {
        kind: "worker",
        id: worker_id.to_string(),
        expected: "without active assignments".to_string(),
        actual: format!("holding {active} active assignment(s)"),
    })
}

fn insert_assignment_sync(conn: &Connection, a: &Assignment) -> Result<()> {
    conn.prepare_cached(&format!(
        "INSERT INTO ASSIGNMENTS ({ASSIGNMENT_COLUMNS}) VALUES \
         (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)"
    ))
    .and_then(|mut stmt| {
        stmt.execute(params![
            a.ass_id,
            a.task_id,
            a.worker_id,
            date_text(&a.assigned_at),
            a.req_cpu,
            a.req_memory,
            a.req_storage,
            a.req_gpu,
            a.attempt,
            a.released,
            opt_date_text(&a.released_at),
            a.placed_by,
        ])
    })
    .map(drop)
    .map_err(insert_err(
        "assignment",
        &a.ass_id,
        "inserting an assignment",
    ))
}

/// A worker's active assignments that hold their running task, with the task, in ONE query.
fn worker_work_sync(conn: &Connection, worker_id: &str) -> Result<Vec<(Assignment, Task)>> {
    let prefixed = |columns: &str, table: &str| {
        columns
            .split(',')
            .map(|c| format!("{table}.{}", c.trim()))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let sql = format!(
        "SELECT {}, {} FROM ASSIGNMENTS a JOIN TASKS t ON t.task_id = a.task_id \
         WHERE a.released = 0 AND a.worker_id = ?1 AND t.status = 'running' \
           AND t.attempts = a.attempt \
         ORDER BY a.ass_id",
        prefixed(ASSIGNMENT_COLUMNS, "a"),
        prefixed(TASK_COLUMNS, "t"),
    );
    let assignment_columns = ASSIGNMENT_COLUMNS.split(',').count();
    let rows: Vec<(Assignment, Task)> = conn
        .prepare_cached(&sql)
        .and_then(|mut stmt| {
            stmt.query_map([worker_id], |row| {
                Ok((assignment_at(row, 0)?, task_at(row, assignment_columns)?))
            })?
            .collect()
        })
        .map_err(sql_err("reading a worker's work"))?;
    Ok(rows.into_iter().filter(|(a, t)| a.holds(t)).collect())
}

fn list_assignments_sync(conn: &Connection, filter: &AssignmentFilter) -> Result<Vec<Assignment>> {
    // Every active assignment (the reconciler's, every second): from the partial index of
    // active ones, not a walk of every assignment ever made.
    let index = if filter.active_only && filter.task_id.is_none() {
        " INDEXED BY ASSIGNMENTS_active_by_worker"
    } else {
        ""
    };
    let mut sql = format!("SELECT {ASSIGNMENT_COLUMNS} FROM ASSIGNMENTS{index} WHERE 1 = 1");
    let mut args: Vec<Value> = Vec::new();
    if let Some(task_id) = &filter.task_id {
        args.push(Value::Text(task_id.clone()));
        sql.push_str(&format!(" AND task_id = ?{}", args.len()));
    }
    if let Some(worker_id) = &filter.worker_id {
        args.push(Value::Text(worker_id.clone()));
        sql.push_str(&format!(" AND worker_id = ?{}", args.len()));
    }
    if filter.active_only {
        sql.push_str(" AND released = 0");
    }
    sql.push_str(" ORDER BY assigned_at, ass_id");
    conn.prepare_cached(&sql)
        .and_then(|mut stmt| {
            stmt.query_map(params_from_iter(args), assignment_from_row)?
                .collect()
        })
        .map_err(sql_err("listing assignments"))
}

fn release_sync(conn: &Connection, ass_id: &str) -> Result<bool> {
    // Inside the request's savepoint: marking the assignment released and returning its
    // amounts happen together or not at all.
    let released: Option<(String, f64, f64, f64, f64)> = conn
        .prepare_cached(
            "UPDATE ASSIGNMENTS SET released = 1, released_at = ?2 \
             WHERE ass_id = ?1 AND released = 0 \
             RETURNING worker_id, req_cpu, req_memory, req_storage, req_gpu",
        )
        .and_then(|mut stmt| {
            stmt.query_row(params![ass_id, date_text(&now())], |row| {
                Ok((
                    row.get(0)?,
                    row.get(1)?,
                    row.get(2)?,
                    row.get(3)?,
                    row.get(4)?,
                ))
            })
            .optional()
        })
        .map_err(sql_err("marking an assignment released"))?;
    let Some((worker_id, cpu, memory, storage, gpu)) = released else {
        let exists = conn
            .prepare_cached("SELECT 1 FROM ASSIGNMENTS WHERE ass_id = ?1")
            .and_then(|mut stmt| stmt.exists([ass_id]))
            .map_err(sql_err("checking that an assignment exists"))?;
        return if exists {
            Ok(false)
        } else {
            Err(StoreError::NotFound {
                kind: "assignment",
                id: ass_id.to_string(),
            })
        };
    };
    // A worker that is gone has nothing to give back to: updating no row is fine.
    conn.prepare_cached(
        "UPDATE WORKER_REGISTRY SET \
             allocated_cpu = allocated_cpu - ?2, available_cpu = available_cpu + ?2, \
             allocated_memory = allocated_memory - ?3, available_memory = available_memory + ?3, \
             allocated_storage = allocated_storage - ?4, available_storage = available_storage + ?4, \
             allocated_gpu = allocated_gpu - ?5, available_gpu = available_gpu + ?5, \
             updated_at = ?6 \
         WHERE worker_id = ?1",
    )
    .and_then(|mut stmt| {
        stmt.execute(params![
            worker_id,
            cpu,
            memory,
            storage,
            gpu,
            date_text(&now())
        ])
    })
    .map_err(sql_err("returning a reservation to its worker"))?;
    Ok(true)
}

fn insert_result_sync(conn: &Connection, r: &TaskResult) -> Result<()> {
    conn.prepare_cached(&format!(
        "INSERT INTO RESULTS ({RESULT_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14)"
    ))
    .and_then(|mut stmt| {
        stmt.execute(params![
            r.task_id,
            r.worker_id,
            r.status.as_str(),
            r.logs,
            date_text(&r.completed_at),
            r.exit_code,
            r.error,
            r.logs_truncated,
            r.stderr,
            r.stderr_truncated,
            r.oom_killed,
            r.attempt,
            r.runtime_s,
            r.task_type,
        ])
    })
    .map(drop)
    .map_err(insert_err("result", &r.task_id, "inserting a result"))
}

fn user_usage_sync(conn: &Connection, user_id: &str) -> Result<Usage> {
    let rows: Vec<(String, u32, Resources)> = conn
        .prepare_cached(
            "SELECT status, COUNT(*), TOTAL(req_cpu), TOTAL(req_memory), TOTAL(req_storage), \
                    TOTAL(req_gpu) \
             FROM TASKS WHERE user_id = ?1 AND status IN ('pending', 'queued', 'running') \
             GROUP BY status",
        )
        .and_then(|mut stmt| {
            stmt.query_map([user_id], |row| {
                Ok((
                    row.get(0)?,
                    get_u32(row, 1)?,
                    Resources::new(row.get(2)?, row.get(3)?, row.get(4)?, row.get(5)?),
                ))
            })?
            .collect()
        })
        .map_err(sql_err("reading a user's usage"))?;
    let mut usage = Usage::default();
    for (status, count, sum) in rows {
        match status.as_str() {
            "pending" => usage.pending_tasks = count,
            "queued" => usage.queued_tasks = count,
            _ => {
                usage.running_tasks = count;
                usage.reserved = sum;
            }
        }
    }
    Ok(usage)
}

/// Most users, other than the ones left out, whose heads of queue a batch reads one by one;
/// with more, the queue is walked instead (other users' tasks are then dense in it).
const MAX_USERS_READ_BY_HEAD: usize = 16;

/// The first `limit` claimable queued tasks in queue order, leaving out `exclude_users`.
fn claimable_tasks_sync(
    conn: &Connection,
    limit: u32,
    at: &DateTime<Utc>,
    exclude_users: &[String],
) -> Result<Vec<Task>> {
    if exclude_users.is_empty() {
        return claimable_in_queue_order(conn, limit, at, exclude_users);
    }
    // Left-out users hold the head of the queue (they had their share of the batch's first
    // read): walking the queue past their tasks costs the length of their backlog, every round.
    // Instead: the other users with tasks queued, then the head of each one's queue.
    let Some(others) = other_queued_users(conn, exclude_users)? else {
        return claimable_in_queue_order(conn, limit, at, exclude_users);
    };
    let mut tasks = Vec::new();
    for user in others {
        tasks.extend(claimable_of_user(conn, &user, limit, at)?);
    }
    tasks.sort_by(crate::model::queue_order);
    tasks.truncate(limit as usize);
    Ok(tasks)
}

/// The users with tasks queued other than `exclude_users` (one index seek per user), or
/// `None` when there are more than [`MAX_USERS_READ_BY_HEAD`].
fn other_queued_users(conn: &Connection, exclude_users: &[String]) -> Result<Option<Vec<String>>> {
    let what = "listing the users with queued tasks";
    let first: Option<String> = conn
        .prepare_cached(
            "SELECT user_id FROM TASKS INDEXED BY TASKS_queued_by_user \
             WHERE status = 'queued' ORDER BY user_id LIMIT 1",
        )
        .and_then(|mut stmt| stmt.query_row([], |row| row.get(0)).optional())
        .map_err(sql_err(what))?;
    let mut next = conn
        .prepare_cached(
            "SELECT user_id FROM TASKS INDEXED BY TASKS_queued_by_user \
             WHERE status = 'queued' AND user_id > ?1 ORDER BY user_id LIMIT 1",
        )
        .map_err(sql_err(what))?;
    let mut users = Vec::new();
    let mut user = first;
    while let Some(found) = user {
        if !exclude_users.contains(&found) {
            if users.len() == MAX_USERS_READ_BY_HEAD {
                return Ok(None);
            }
            users.push(found.clone());
        }
        user = next
            .query_row([&found], |row| row.get(0))
            .optional()
            .map_err(sql_err(what))?;
    }
    Ok(Some(users))
}

/// The first `limit` claimable queued tasks of `user`, in queue order.
fn claimable_of_user(
    conn: &Connection,
    user: &str,
    limit: u32,
    at: &DateTime<Utc>,
) -> Result<Vec<Task>> {
    conn.prepare_cached(&format!(
        "SELECT {TASK_COLUMNS} FROM TASKS INDEXED BY TASKS_queued_by_user \
         WHERE status = 'queued' AND user_id = ?1 \
           AND (owner IS NULL OR lease_expires_at IS NULL OR lease_expires_at < ?2) \
         ORDER BY priority DESC, created_at, task_id LIMIT ?3"
    ))
    .and_then(|mut stmt| {
        stmt.query_map(params![user, date_text(at), limit], task_from_row)?
            .collect()
    })
    .map_err(sql_err("reading a user's queue"))
}

/// The first `limit` claimable queued tasks in queue order, walking the whole queue.
fn claimable_in_queue_order(
    conn: &Connection,
    limit: u32,
    at: &DateTime<Utc>,
    exclude_users: &[String],
) -> Result<Vec<Task>> {
    let mut args: Vec<Value> = vec![Value::Text(date_text(at)), Value::Integer(i64::from(limit))];
    let excluded = exclude_users
        .iter()
        .map(|user| {
            args.push(Value::Text(user.clone()));
            format!("?{}", args.len())
        })
        .collect::<Vec<_>>()
        .join(", ");
    let sql = format!(
        "SELECT {TASK_COLUMNS} FROM TASKS INDEXED BY TASKS_queued WHERE status = 'queued' \
           AND (owner IS NULL OR lease_expires_at IS NULL OR lease_expires_at < ?1) \
           AND user_id NOT IN ({excluded}) \
         ORDER BY priority DESC, created_at, task_id LIMIT ?2"
    );
    conn.prepare_cached(&sql)
        .and_then(|mut stmt| {
            stmt.query_map(params_from_iter(args), task_from_row)?
                .collect()
        })
        .map_err(sql_err("reading the placement queue"))
}

fn list_workers_sync(conn: &Connection) -> Result<Vec<Worker>> {
    conn.prepare_cached(&format!(
        "SELECT {WORKER_COLUMNS} FROM WORKER_REGISTRY ORDER BY worker_id"
    ))
    .and_then(|mut stmt| stmt.query_map([], worker_from_row)?.collect())
    .map_err(sql_err("listing workers"))
}

fn active_assignment_counts_sync(conn: &Connection) -> Result<BTreeMap<String, u32>> {
    conn.prepare_cached(
        "SELECT worker_id, COUNT(*) FROM ASSIGNMENTS WHERE released = 0 GROUP BY worker_id",
    )
    .and_then(|mut stmt| {
        stmt.query_map([], |row| Ok((row.get(0)?, get_u32(row, 1)?)))?
            .collect()
    })
    .map_err(sql_err("counting active assignments"))
}

fn running_counts_sync(conn: &Connection, users: &[String]) -> Result<BTreeMap<String, u32>> {
    if users.is_empty() {
        return Ok(BTreeMap::new());
    }
    let marks = vec!["?"; users.len()].join(", ");
    let sql = format!(
        "SELECT user_id, running FROM USER_RUNNING WHERE running > 0 AND user_id IN ({marks})"
    );
    let mut stmt = conn
        .prepare(&sql)
        .map_err(sql_err("counting users' running tasks"))?;
    stmt.query_map(rusqlite::params_from_iter(users.iter()), |row| {
        Ok((row.get::<_, String>(0)?, get_u32(row, 1)?))
    })
    .and_then(|rows| rows.collect::<rusqlite::Result<BTreeMap<_, _>>>())
    .map_err(sql_err("counting users' running tasks"))
}

fn mark_running_sync(conn: &Connection, task_id: &str, owner: &str, attempts: u32) -> Result<Task> {
    let changed = conn
        .prepare_cached(
            "UPDATE TASKS SET status = 'running', attempts = ?3, owner = NULL, \
                 lease_expires_at = NULL, status_reason = NULL, updated_at = ?4, placed_by = ?2 \
             WHERE task_id = ?1 AND status = 'queued' AND owner = ?2",
        )
        .and_then(|mut stmt| stmt.execute(params![task_id, owner, attempts, date_text(&now())]))
        .map_err(sql_err("marking a task running"))?;
    if changed == 1 {
        return require_task(conn, task_id);
    }
    let task = require_task(conn, task_id)?;
    Err(StoreError::Conflict {
        kind: "task",
        id: task_id.to_string(),
        expected: format!("queued and claimed by {owner}"),
        actual: format!(
            "{} and claimed by {}",
            task.status,
            task.owner.as_deref().unwrap_or("nobody")
        ),
    })
}

fn unreserve_sync(conn: &Connection, worker_id: &str, r: &Resources) -> Result<bool> {
    let changed = conn
        .prepare_cached(
            "UPDATE WORKER_REGISTRY SET \
                 allocated_cpu = allocated_cpu - ?2, available_cpu = available_cpu + ?2, \
                 allocated_memory = allocated_memory - ?3, available_memory = available_memory + ?3, \
                 allocated_storage = allocated_storage - ?4, available_storage = available_storage + ?4, \
                 allocated_gpu = allocated_gpu - ?5, available_gpu = available_gpu + ?5, \
                 updated_at = ?6 \
             WHERE worker_id = ?1 AND allocated_cpu >= ?2 AND allocated_memory >= ?3 \
               AND allocated_storage >= ?4 AND allocated_gpu >= ?5",
        )
        .and_then(|mut stmt| {
            stmt.execute(params![
                worker_id,
                r.cpu,
                r.memory,
                r.storage,
                r.gpu,
                date_text(&now()),
            ])
        })
        .map_err(sql_err("returning an unassigned reservation"))?;
    if changed == 1 {
        return Ok(true);
    }
    if worker_exists(conn, worker_id)? {
        Ok(false)
    } else {
        Err(StoreError::NotFound {
            kind: "worker",
            id: worker_id.to_string(),
        })
    }
}

fn acquire_lease_sync(
    conn: &Connection,
    name: &str,
    holder: &str,
    until: &DateTime<Utc>,
    at: &DateTime<Utc>,
) -> Result<bool> {
    // ONE statement: insert when absent, else take over only when ours or expired.
    conn.prepare_cached(
        "INSERT INTO LEASES (name, holder, expires_at) VALUES (?1, ?2, ?3) \
         ON CONFLICT (name) DO UPDATE SET holder = excluded.holder, \
             expires_at = excluded.expires_at \
         WHERE LEASES.holder = excluded.holder OR LEASES.expires_at < ?4",
    )
    .and_then(|mut stmt| stmt.execute(params![name, holder, date_text(until), date_text(at)]))
    .map(|changed| changed == 1)
    .map_err(sql_err("taking a lease"))
}

fn clear_expired_claims_sync(
    conn: &Connection,
    at: &DateTime<Utc>,
    limit: u32,
) -> Result<Vec<Task>> {
    let expired: Vec<Task> = conn
        .prepare_cached(&format!(
            "SELECT {TASK_COLUMNS} FROM TASKS INDEXED BY TASKS_claims \
             WHERE owner IS NOT NULL AND lease_expires_at < ?1 AND status = 'queued' \
             ORDER BY lease_expires_at, task_id LIMIT ?2"
        ))
        .and_then(|mut stmt| {
            stmt.query_map(params![date_text(at), limit], task_from_row)?
                .collect()
        })
        .map_err(sql_err("reading expired claims"))?;
    let mut cleared = Vec::with_capacity(expired.len());
    for task in expired {
        let changed = conn
            .prepare_cached(
                "UPDATE TASKS SET owner = NULL, lease_expires_at = NULL, updated_at = ?3 \
                 WHERE task_id = ?1 AND status = 'queued' AND lease_expires_at < ?2",
            )
            .and_then(|mut stmt| {
                stmt.execute(params![task.task_id, date_text(at), date_text(&now())])
            })
            .map_err(sql_err("clearing an expired claim"))?;
        if changed == 1 {
            cleared.push(task);
        }
    }
    Ok(cleared)
}

fn repair_allocation_sync(
    conn: &Connection,
    observed: &Worker,
    allocated: &Resources,
) -> Result<bool> {
    let (t, a, v) = (observed.total(), observed.allocated(), observed.available());
    let changed = conn
        .prepare_cached(
            "UPDATE WORKER_REGISTRY SET \
                 allocated_cpu = ?2, allocated_memory = ?3, allocated_storage = ?4, \
                 allocated_gpu = ?5, \
                 available_cpu = total_cpu - ?2, available_memory = total_memory - ?3, \
                 available_storage = total_storage - ?4, available_gpu = total_gpu - ?5, \
                 updated_at = ?6 \
             WHERE worker_id = ?1 \
               AND total_cpu = ?7 AND total_memory = ?8 AND total_storage = ?9 AND total_gpu = ?10 \
               AND allocated_cpu = ?11 AND allocated_memory = ?12 \
               AND allocated_storage = ?13 AND allocated_gpu = ?14 \
               AND available_cpu = ?15 AND available_memory = ?16 \
               AND available_storage = ?17 AND available_gpu = ?18",
        )
        .and_then(|mut stmt| {
            stmt.execute(params![
                observed.worker_id,
                allocated.cpu,
                allocated.memory,
                allocated.storage,
                allocated.gpu,
                date_text(&now()),
                t.cpu,
                t.memory,
                t.storage,
                t.gpu,
                a.cpu,
                a.memory,
                a.storage,
                a.gpu,
                v.cpu,
                v.memory,
                v.storage,
                v.gpu,
            ])
        })
        .map_err(sql_err("repairing a worker's allocation"))?;
    if changed == 1 {
        return Ok(true);
    }
    if worker_exists(conn, &observed.worker_id)? {
        Ok(false)
    } else {
        Err(StoreError::NotFound {
            kind: "worker",
            id: observed.worker_id.clone(),
        })
    }
}

// ------------------------------------------------------------------------------------------
// The Store implementation: each method moves its arguments onto the writer thread.
// ------------------------------------------------------------------------------------------

fn policy_from_row(row: &Row<'_>) -> rusqlite::Result<PolicyVersion> {
    let size: i64 = row.get(4)?;
    Ok(PolicyVersion {
        name: row.get(0)?,
        version: row.get(1)?,
        kind: get_parsed(row, 2)?,
        sha256: row.get(3)?,
        size_bytes: u64::try_from(size).map_err(|e| conversion(4, e))?,
        config: row.get(5)?,
        uploaded_at: get_date(row, 6)?,
        uploaded_by: row.get(7)?,
        memory_bytes: get_opt_u64(row, 8)?,
        deadline_ms: get_opt_u64(row, 9)?,
    })
}

fn get_opt_u64(row: &Row<'_>, index: usize) -> rusqlite::Result<Option<u64>> {
    let value: Option<i64> = row.get(index)?;
    value
        .map(|v| u64::try_from(v).map_err(|e| conversion(index, e)))
        .transpose()
}

fn active_policy_from_row(row: &Row<'_>) -> rusqlite::Result<ActivePolicy> {
    let previous_name: Option<String> = row.get(5)?;
    let previous_version: Option<String> = row.get(6)?;
    Ok(ActivePolicy {
        kind: get_parsed(row, 0)?,
        name: row.get(1)?,
        version: row.get(2)?,
        activated_at: get_date(row, 3)?,
        activated_by: row.get(4)?,
        previous: previous_name.zip(previous_version),
    })
}

fn select_policy(conn: &Connection, name: &str, version: &str) -> Result<PolicyVersion> {
    conn.prepare_cached(&format!(
        "SELECT {POLICY_COLUMNS} FROM POLICIES WHERE name = ?1 AND version = ?2"
    ))
    .and_then(|mut stmt| stmt.query_row([name, version], policy_from_row).optional())
    .map_err(sql_err("reading a policy version"))?
    .ok_or_else(|| StoreError::NotFound {
        kind: "policy version",
        id: policy_label(name, version),
    })
}

fn select_active_policy(conn: &Connection, kind: PolicyKind) -> Result<Option<ActivePolicy>> {
    conn.prepare_cached(&format!(
        "SELECT {ACTIVE_POLICY_COLUMNS} FROM ACTIVE_POLICIES WHERE kind = ?1"
    ))
    .and_then(|mut stmt| {
        stmt.query_row([kind.as_str()], active_policy_from_row)
            .optional()
    })
    .map_err(sql_err("reading the active policy"))
}

fn opt_i64(value: Option<u64>, field: &str) -> rusqlite::Result<Option<i64>> {
    value
        .map(|v| {
            i64::try_from(v).map_err(|e| {
                rusqlite::Error::ToSqlConversionFailure(format!("{field}: {e}").into())
            })
        })
        .transpose()
}

fn insert_policy_sync(conn: &Connection, v: &PolicyVersion, bytes: &[u8]) -> Result<()> {
    let size = i64::try_from(v.size_bytes)
        .map_err(|e| StoreError::backend("encoding a policy's size_bytes", e))?;
    conn.prepare_cached(&format!(
        "INSERT INTO POLICIES ({POLICY_COLUMNS}) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)"
    ))
    .and_then(|mut stmt| {
        stmt.execute(params![
            v.name,
            v.version,
            v.kind.as_str(),
            v.sha256,
            size,
            v.config,
            date_text(&v.uploaded_at),
            v.uploaded_by,
            opt_i64(v.memory_bytes, "memory_bytes")?,
            opt_i64(v.deadline_ms, "deadline_ms")?,
        ])
    })
    .map_err(insert_err(
        "policy version",
        &policy_label(&v.name, &v.version),
        "inserting a policy version",
    ))?;
    // The row and its chunks are in this request's savepoint: they commit together or not at
    // all. Stray chunks (written by hand, say) must not be mistaken for this version's.
    conn.prepare_cached("DELETE FROM POLICY_CHUNKS WHERE name = ?1 AND version = ?2")
        .and_then(|mut stmt| stmt.execute([&v.name, &v.version]))
        .map_err(sql_err("clearing stray chunks of a policy version"))?;
    let mut stmt = conn
        .prepare_cached(
            "INSERT INTO POLICY_CHUNKS (name, version, n, data) VALUES (?1, ?2, ?3, ?4)",
        )
        .map_err(sql_err("storing a policy's bytes"))?;
    for (n, chunk) in bytes.chunks(POLICY_CHUNK_BYTES).enumerate() {
        let n = i64::try_from(n).map_err(|e| StoreError::backend("numbering a chunk", e))?;
        stmt.execute(params![v.name, v.version, n, chunk])
            .map_err(sql_err("storing a policy's bytes"))?;
    }
    Ok(())
}

fn policy_bytes_sync(conn: &Connection, name: &str, version: &str) -> Result<Vec<u8>> {
    let v = select_policy(conn, name, version)?;
    let chunks: Vec<Vec<u8>> = conn
        .prepare_cached(
            "SELECT data FROM POLICY_CHUNKS WHERE name = ?1 AND version = ?2 ORDER BY n",
        )
        .and_then(|mut stmt| stmt.query_map([name, version], |row| row.get(0))?.collect())
        .map_err(sql_err("reading a policy's bytes"))?;
    let bytes = chunks.concat();
    verify_policy_bytes(&v, &bytes)?;
    Ok(bytes)
}

fn put_output_sync(
    conn: &Connection,
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
        sha256: sha256_hex(bytes),
    };
    let size = i64::try_from(info.size_bytes)
        .map_err(|e| StoreError::backend("encoding an output's size", e))?;
    // The row and its chunks are replaced inside this request's savepoint: together or not.
    for sql in [
        "DELETE FROM TASK_OUTPUTS WHERE task_id = ?1 AND path = ?2",
        "DELETE FROM TASK_OUTPUT_CHUNKS WHERE task_id = ?1 AND path = ?2",
    ] {
        conn.prepare_cached(sql)
            .and_then(|mut stmt| stmt.execute([task_id, path]))
            .map_err(sql_err("replacing an output file"))?;
    }
    conn.prepare_cached(
        "INSERT INTO TASK_OUTPUTS (task_id, path, attempt, size_bytes, sha256) \
         VALUES (?1, ?2, ?3, ?4, ?5)",
    )
    .and_then(|mut stmt| stmt.execute(params![task_id, path, attempt, size, info.sha256]))
    .map_err(sql_err("storing an output file"))?;
    let mut stmt = conn
        .prepare_cached(
            "INSERT INTO TASK_OUTPUT_CHUNKS (task_id, path, n, data) VALUES (?1, ?2, ?3, ?4)",
        )
        .map_err(sql_err("storing an output file's bytes"))?;
    for (n, chunk) in bytes.chunks(POLICY_CHUNK_BYTES).enumerate() {
        let n = i64::try_from(n).map_err(|e| StoreError::backend("numbering a chunk", e))?;
        stmt.execute(params![task_id, path, n, chunk])
            .map_err(sql_err("storing an output file's bytes"))?;
    }
    Ok(info)
}

fn output_from_row(row: &Row<'_>) -> rusqlite::Result<OutputFileInfo> {
    let size: i64 = row.get(3)?;
    Ok(OutputFileInfo {
        task_id: row.get(0)?,
        path: row.get(1)?,
        attempt: get_u32(row, 2)?,
        size_bytes: u64::try_from(size).map_err(|e| conversion(3, e))?,
        sha256: row.get(4)?,
    })
}

fn get_output_sync(
    conn: &Connection,
    task_id: &str,
    path: &str,
) -> Result<(OutputFileInfo, Vec<u8>)> {
    let info = conn
        .prepare_cached(
            "SELECT task_id, path, attempt, size_bytes, sha256 FROM TASK_OUTPUTS \
             WHERE task_id = ?1 AND path = ?2",
        )
        .and_then(|mut stmt| stmt.query_row([task_id, path], output_from_row).optional())
        .map_err(sql_err("reading an output file"))?
        .ok_or_else(|| StoreError::NotFound {
            kind: "output file",
            id: format!("{task_id}/{path}"),
        })?;
    let chunks: Vec<Vec<u8>> = conn
        .prepare_cached(
            "SELECT data FROM TASK_OUTPUT_CHUNKS WHERE task_id = ?1 AND path = ?2 ORDER BY n",
        )
        .and_then(|mut stmt| stmt.query_map([task_id, path], |row| row.get(0))?.collect())
        .map_err(sql_err("reading an output file's bytes"))?;
    let bytes = chunks.concat();
    verify_output_bytes(&info, &bytes)?;
    Ok((info, bytes))
}

fn delete_policy_sync(conn: &Connection, name: &str, version: &str) -> Result<()> {
    // One statement: the version cannot be activated between the check and the delete.
    let changed = conn
        .prepare_cached(
            "DELETE FROM POLICIES WHERE name = ?1 AND version = ?2 AND NOT EXISTS \
             (SELECT 1 FROM ACTIVE_POLICIES WHERE name = ?1 AND version = ?2)",
        )
        .and_then(|mut stmt| stmt.execute([name, version]))
        .map_err(sql_err("deleting a policy version"))?;
    if changed == 0 {
        let v = select_policy(conn, name, version)?;
        return Err(StoreError::Conflict {
            kind: "policy version",
            id: policy_label(name, version),
            expected: "inactive".to_string(),
            actual: format!("the active {} policy", v.kind),
        });
    }
    conn.prepare_cached("DELETE FROM POLICY_CHUNKS WHERE name = ?1 AND version = ?2")
        .and_then(|mut stmt| stmt.execute([name, version]))
        .map_err(sql_err("deleting a policy's bytes"))?;
    Ok(())
}

fn activate_policy_sync(
    conn: &Connection,
    kind: PolicyKind,
    name: &str,
    version: &str,
    by: &str,
    expected: Option<&(String, String)>,
) -> Result<ActivePolicy> {
    let v = select_policy(conn, name, version)?;
    if v.kind != kind {
        return Err(StoreError::Conflict {
            kind: "policy version",
            id: policy_label(name, version),
            expected: format!("a {kind} policy"),
            actual: format!("a {} policy", v.kind),
        });
    }
    let active = ActivePolicy {
        kind,
        name: name.to_string(),
        version: version.to_string(),
        activated_at: now(),
        activated_by: by.to_string(),
        previous: expected.cloned(),
    };
    let (prev_name, prev_version) = (
        expected.map(|(n, _)| n.as_str()),
        expected.map(|(_, v)| v.as_str()),
    );
    // The compare-and-swap is one conditional statement: the INSERT fails on the unique kind
    // when something is active already, the UPDATE matches only the expected version.
    let applied = match expected {
        None => conn
            .prepare_cached(&format!(
                "INSERT INTO ACTIVE_POLICIES ({ACTIVE_POLICY_COLUMNS}) \
                 VALUES (?1, ?2, ?3, ?4, ?5, NULL, NULL)"
            ))
            .and_then(|mut stmt| {
                stmt.execute(params![
                    kind.as_str(),
                    name,
                    version,
                    date_text(&active.activated_at),
                    by
                ])
            })
            .map(|_| true)
            .or_else(|e| {
                if is_unique_violation(&e) {
                    Ok(false)
                } else {
                    Err(e)
                }
            }),
        Some(_) => conn
            .prepare_cached(
                "UPDATE ACTIVE_POLICIES SET name = ?2, version = ?3, activated_at = ?4, \
                 activated_by = ?5, previous_name = ?6, previous_version = ?7 \
                 WHERE kind = ?1 AND name = ?6 AND version = ?7",
            )
            .and_then(|mut stmt| {
                stmt.execute(params![
                    kind.as_str(),
                    name,
                    version,
                    date_text(&active.activated_at),
                    by,
                    prev_name,
                    prev_version
                ])
            })
            .map(|changed| changed == 1),
    }
    .map_err(sql_err("activating a policy"))?;
    if applied {
        return Ok(active);
    }
    let actual = select_active_policy(conn, kind)?.map(|a| (a.name, a.version));
    Err(StoreError::Conflict {
        kind: "active policy",
        id: kind.to_string(),
        expected: active_label(expected),
        actual: active_label(actual.as_ref()),
    })
}

fn clear_active_policy_sync(
    conn: &Connection,
    kind: PolicyKind,
    expected: &(String, String),
) -> Result<()> {
    let changed = conn
        .prepare_cached(
            "DELETE FROM ACTIVE_POLICIES WHERE kind = ?1 AND name = ?2 AND version = ?3",
        )
        .and_then(|mut stmt| stmt.execute(params![kind.as_str(), expected.0, expected.1]))
        .map_err(sql_err("clearing the active policy"))?;
    if changed == 1 {
        return Ok(());
    }
    let actual = select_active_policy(conn, kind)?.map(|a| (a.name, a.version));
    Err(StoreError::Conflict {
        kind: "active policy",
        id: kind.to_string(),
        expected: active_label(Some(expected)),
        actual: active_label(actual.as_ref()),
    })
}

#[async_trait]
impl Store for SqliteStore {
    fn backend_name(&self) -> &'static str {
        "sqlite"
    }

    async fn ping(&self) -> Result<()> {
        self.call("pinging SQLite", |conn| {
            conn.query_row("SELECT 1", [], |_| Ok(()))
                .map_err(sql_err("pinging SQLite"))
        })
        .await
    }

    async fn round_reads(&self, plan: &super::RoundReadPlan) -> Result<super::RoundReads> {
        let plan = *plan;
        // One call on the one connection: a round waits once behind the requests queued
        // before it, and reads one snapshot.
        self.call("reading a placement round", move |conn| {
            let mut reads = super::round_reads::QueueReads::new(plan.limit);
            while let Some(exclude) = reads.next_query() {
                let page = claimable_tasks_sync(conn, plan.limit, &plan.now, exclude)?;
                reads.add(page);
            }
            let (tasks, users) = reads.finish();
            let running = running_counts_sync(conn, &users)?;
            let workers = if plan.workers && !tasks.is_empty() {
                Some(super::WorkerReads {
                    workers: list_workers_sync(conn)?,
                    active_assignments: active_assignment_counts_sync(conn)?,
                })
            } else {
                None
            };
            Ok(super::RoundReads {
                tasks,
                running,
                workers,
            })
        })
        .await
    }

    async fn place_round(&self, plan: &super::RoundPlan) -> Result<super::RoundOutcome> {
        self.place_round_impl(plan).await
    }

    async fn end_attempt(
        &self,
        task_id: &str,
        attempt: u32,
        result: Option<&TaskResult>,
        to: TaskStatus,
        update: &TaskUpdate,
    ) -> Result<super::EndedAttempt> {
        let (task_id, result, update) = (task_id.to_string(), result.cloned(), update.clone());
        // One transaction: a conflict leaves no result behind either.
        self.call("ending an attempt", move |conn| {
            if let Some(result) = &result {
                match insert_result_sync(conn, result) {
                    Ok(()) | Err(StoreError::AlreadyExists { .. }) => {}
                    Err(error) => return Err(error),
                }
            }
            let task = transition_sync(
                conn,
                &task_id,
                Some(attempt),
                &[TaskStatus::Running],
                to,
                &update,
            )?;
            let active = list_assignments_sync(
                conn,
                &AssignmentFilter {
                    task_id: Some(task_id.clone()),
                    active_only: true,
                    ..AssignmentFilter::default()
                },
            )?;
            let mut released = Vec::with_capacity(active.len());
            for assignment in active {
                if release_sync(conn, &assignment.ass_id)? {
                    released.push(assignment);
                }
            }
            Ok(super::EndedAttempt { task, released })
        })
        .await
    }

    async fn worker_work(&self, worker_id: &str) -> Result<Vec<(Assignment, Task)>> {
        let worker_id = worker_id.to_string();
        self.call("reading a worker's work", move |conn| {
            worker_work_sync(conn, &worker_id)
        })
        .await
    }
}

#[async_trait]
impl TaskStore for SqliteStore {
    async fn insert_task(
        &self,
        task: &Task,
        idempotency: Option<&IdempotencyKey>,
    ) -> Result<SubmitOutcome> {
        let task = task.clone();
        let idempotency = idempotency.cloned();
        self.call("inserting a task", move |conn| {
            insert_task_sync(conn, &task, idempotency.as_ref())
        })
        .await
    }

    async fn get_task(&self, task_id: &str) -> Result<Task> {
        let task_id = task_id.to_string();
        self.call("reading a task", move |conn| require_task(conn, &task_id))
            .await
    }

    async fn list_tasks(&self, query: &TaskQuery) -> Result<TaskPage> {
        let query = query.clone();
        self.call("listing tasks", move |conn| list_tasks_sync(conn, &query))
            .await
    }

    async fn awaiting_dependency_sets(&self, limit: u32) -> Result<Vec<Vec<Dependency>>> {
        self.call("reading what waiting tasks await", move |conn| {
            let texts: Vec<String> = conn
                .prepare_cached(
                    "SELECT DISTINCT after FROM TASKS INDEXED BY TASKS_awaiting_by_after \
                     WHERE status = 'pending' AND awaiting_dependencies = 1 \
                     AND after IS NOT NULL LIMIT ?1",
                )
                .and_then(|mut stmt| stmt.query_map([limit], |row| row.get(0))?.collect())
                .map_err(sql_err("reading what waiting tasks await"))?;
            texts
                .iter()
                .map(|text| {
                    serde_json::from_str(text)
                        .map_err(|e| StoreError::backend("decoding a task's dependencies", e))
                })
                .collect()
        })
        .await
    }

    async fn awaiting_tasks(
        &self,
        dependencies: &[Dependency],
        limit: u32,
        after: Option<&str>,
    ) -> Result<Vec<Task>> {
        let key = to_json(&dependencies, "encoding task dependencies")?;
        let after = after.unwrap_or_default().to_string();
        self.call("reading the tasks awaiting dependencies", move |conn| {
            conn.prepare_cached(&format!(
                "SELECT {TASK_COLUMNS} FROM TASKS INDEXED BY TASKS_awaiting_by_after \
                 WHERE status = 'pending' AND awaiting_dependencies = 1 AND after = ?1 \
                 AND task_id > ?2 ORDER BY task_id LIMIT ?3"
            ))
            .and_then(|mut stmt| {
                stmt.query_map(params![key, after, limit], task_from_row)?
                    .collect()
            })
            .map_err(sql_err("reading the tasks awaiting dependencies"))
        })
        .await
    }

    async fn release_tasks(&self, task_ids: &[String]) -> Result<Vec<Task>> {
        let task_ids = task_ids.to_vec();
        self.call("releasing tasks to admission", move |conn| {
            let mut released = Vec::with_capacity(task_ids.len());
            for task_id in &task_ids {
                let changed = conn
                    .prepare_cached(
                        "UPDATE TASKS SET awaiting_dependencies = 0, status_reason = NULL, \
                         updated_at = ?2 \
                         WHERE task_id = ?1 AND status = 'pending' AND awaiting_dependencies = 1",
                    )
                    .and_then(|mut stmt| stmt.execute(params![task_id, date_text(&now())]))
                    .map_err(sql_err("releasing a task to admission"))?;
                if changed > 0 {
                    released.push(require_task(conn, task_id)?);
                }
            }
            Ok(released)
        })
        .await
    }

    async fn insert_tasks(
        &self,
        tasks: &[Task],
        idempotency: Option<&IdempotencyKey>,
    ) -> Result<SubmitOutcome> {
        let (tasks, idempotency) = (tasks.to_vec(), idempotency.cloned());
        self.call("inserting an array's tasks", move |conn| {
            insert_tasks_sync(conn, &tasks, idempotency.as_ref())
        })
        .await
    }

    async fn array_summary(&self, array_id: &str) -> Result<ArraySummary> {
        let array_id = array_id.to_string();
        self.call("reading an array", move |conn| {
            array_summary_sync(conn, &array_id)
        })
        .await
    }

    async fn transition_tasks(
        &self,
        task_ids: &[String],
        from: &[TaskStatus],
        to: TaskStatus,
        update: &TaskUpdate,
    ) -> Result<Vec<Task>> {
        let (task_ids, from, update) = (task_ids.to_vec(), from.to_vec(), update.clone());
        // One transaction for the batch; a task no longer in `from` changed nothing.
        self.call("transitioning tasks", move |conn| {
            let mut moved = Vec::with_capacity(task_ids.len());
            for task_id in &task_ids {
                match transition_task_sync(conn, task_id, &from, to, &update) {
                    Ok(task) => moved.push(task),
                    Err(StoreError::Conflict { .. } | StoreError::NotFound { .. }) => {}
                    Err(other) => return Err(other),
                }
            }
            Ok(moved)
        })
        .await
    }

    async fn transition_task(
        &self,
        task_id: &str,
        from: &[TaskStatus],
        to: TaskStatus,
        update: &TaskUpdate,
    ) -> Result<Task> {
        let (task_id, from, update) = (task_id.to_string(), from.to_vec(), update.clone());
        self.call("transitioning a task", move |conn| {
            transition_task_sync(conn, &task_id, &from, to, &update)
        })
        .await
    }

    async fn claim_task(
        &self,
        task_id: &str,
        owner: &str,
        lease_until: DateTime<Utc>,
        now: DateTime<Utc>,
    ) -> Result<Task> {
        let (task_id, owner) = (task_id.to_string(), owner.to_string());
        self.call("claiming a task", move |conn| {
            claim_task_sync(conn, &task_id, &owner, &lease_until, &now)
        })
        .await
    }

    async fn request_cancel(&self, task_id: &str) -> Result<Task> {
        let task_id = task_id.to_string();
        self.call("requesting a task's cancellation", move |conn| {
            request_cancel_sync(conn, &task_id)
        })
        .await
    }

    async fn request_preemption(
        &self,
        victims: &[(String, u32)],
        by: &str,
        reason: &str,
    ) -> Result<Vec<String>> {
        let (victims, by, reason) = (victims.to_vec(), by.to_string(), reason.to_string());
        self.call("asking tasks to stop for a preemption", move |conn| {
            request_preemption_sync(conn, &victims, &by, &reason)
        })
        .await
    }

    async fn preemptible_running(
        &self,
        below_priority: i32,
        limit: u32,
    ) -> Result<Vec<(Task, Assignment)>> {
        self.call("reading the tasks a preemption may stop", move |conn| {
            preemptible_running_sync(conn, below_priority, limit)
        })
        .await
    }

    async fn preemptions_in_progress(&self) -> Result<BTreeMap<String, u32>> {
        self.call(
            "reading the preemptions in progress",
            preemptions_in_progress_sync,
        )
        .await
    }

    async fn user_usage(&self, user_id: &str) -> Result<Usage> {
        let user_id = user_id.to_string();
        self.call("reading a user's usage", move |conn| {
            user_usage_sync(conn, &user_id)
        })
        .await
    }

    async fn running_counts(&self, users: &[String]) -> Result<BTreeMap<String, u32>> {
        if users.is_empty() {
            return Ok(BTreeMap::new());
        }
        let users = users.to_vec();
        self.call("counting users' running tasks", move |conn| {
            running_counts_sync(conn, &users)
        })
        .await
    }

    async fn admission_batch(&self, limit: u32, due_before: DateTime<Utc>) -> Result<Vec<Task>> {
        self.call("reading the admission batch", move |conn| {
            conn.prepare_cached(&format!(
                "SELECT {TASK_COLUMNS} FROM TASKS INDEXED BY TASKS_admissible \
                 WHERE status = 'pending' AND awaiting_dependencies = 0 AND updated_at <= ?1 \
                 ORDER BY updated_at, task_id LIMIT ?2"
            ))
            .and_then(|mut stmt| {
                stmt.query_map(params![date_text(&due_before), limit], task_from_row)?
                    .collect()
            })
            .map_err(sql_err("reading the admission batch"))
        })
        .await
    }

    async fn claimable_tasks(
        &self,
        limit: u32,
        now: DateTime<Utc>,
        exclude_users: &[String],
    ) -> Result<Vec<Task>> {
        let exclude_users = exclude_users.to_vec();
        self.call("reading the placement queue", move |conn| {
            claimable_tasks_sync(conn, limit, &now, &exclude_users)
        })
        .await
    }

    async fn mark_running(&self, task_id: &str, owner: &str, attempts: u32) -> Result<Task> {
        let (task_id, owner) = (task_id.to_string(), owner.to_string());
        self.call("marking a task running", move |conn| {
            mark_running_sync(conn, &task_id, &owner, attempts)
        })
        .await
    }

    async fn unclaim_task(&self, task_id: &str, owner: &str) -> Result<bool> {
        let (task_id, owner) = (task_id.to_string(), owner.to_string());
        self.call("giving up a claim", move |conn| {
            conn.prepare_cached(
                "UPDATE TASKS SET owner = NULL, lease_expires_at = NULL, updated_at = ?3 \
                 WHERE task_id = ?1 AND status = 'queued' AND owner = ?2",
            )
            .and_then(|mut stmt| stmt.execute(params![task_id, owner, date_text(&now())]))
            .map(|changed| changed == 1)
            .map_err(sql_err("giving up a claim"))
        })
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
        let (task_id, from, update) = (task_id.to_string(), from.to_vec(), update.clone());
        self.call("transitioning a task's attempt", move |conn| {
            transition_sync(conn, &task_id, Some(attempt), &from, to, &update)
        })
        .await
    }

    async fn clear_expired_claims(&self, now: DateTime<Utc>, limit: u32) -> Result<Vec<Task>> {
        self.call("clearing expired claims", move |conn| {
            clear_expired_claims_sync(conn, &now, limit)
        })
        .await
    }

    async fn task_counts(&self) -> Result<TaskCounts> {
        self.call("counting tasks by status", |conn| {
            let rows: Vec<(String, i64)> = conn
                .prepare_cached("SELECT status, COUNT(*) FROM TASKS GROUP BY status")
                .and_then(|mut stmt| {
                    stmt.query_map([], |row| Ok((row.get(0)?, row.get(1)?)))?
                        .collect()
                })
                .map_err(sql_err("counting tasks by status"))?;
            counts_from_rows(rows, "counting tasks by status")
        })
        .await
    }
}

#[async_trait]
impl WorkerStore for SqliteStore {
    async fn insert_worker(&self, worker: &Worker) -> Result<()> {
        let worker = worker.clone();
        self.call("inserting a worker", move |conn| {
            insert_worker_sync(conn, &worker)
        })
        .await
    }

    async fn get_worker(&self, worker_id: &str) -> Result<Worker> {
        let worker_id = worker_id.to_string();
        self.call("reading a worker", move |conn| {
            select_worker(conn, &worker_id)
        })
        .await
    }

    async fn list_workers(&self) -> Result<Vec<Worker>> {
        self.call("listing workers", list_workers_sync).await
    }

    async fn heartbeat(
        &self,
        worker_id: &str,
        at_unix: i64,
        usage: Option<&WorkerUsage>,
    ) -> Result<Worker> {
        let worker_id = worker_id.to_string();
        let usage = usage
            .map(|u| to_json(u, "encoding worker usage"))
            .transpose()?;
        self.call("recording a heartbeat", move |conn| {
            update_worker(
                conn,
                &worker_id,
                "UPDATE WORKER_REGISTRY SET last_heartbeat = ?2, updated_at = ?3, \
                 usage = COALESCE(?4, usage) WHERE worker_id = ?1",
                &[&at_unix, &date_text(&now()), &usage],
                "recording a heartbeat",
            )
        })
        .await
    }

    async fn set_draining(&self, worker_id: &str, draining: bool) -> Result<Worker> {
        let worker_id = worker_id.to_string();
        self.call("setting a worker's draining flag", move |conn| {
            update_worker(
                conn,
                &worker_id,
                "UPDATE WORKER_REGISTRY SET draining = ?2, updated_at = ?3 WHERE worker_id = ?1",
                &[&draining, &date_text(&now())],
                "setting a worker's draining flag",
            )
        })
        .await
    }

    async fn set_worker_active(&self, worker_id: &str, active: bool) -> Result<Worker> {
        let worker_id = worker_id.to_string();
        self.call("setting a worker's active flag", move |conn| {
            update_worker(
                conn,
                &worker_id,
                "UPDATE WORKER_REGISTRY SET is_active = ?2, updated_at = ?3 WHERE worker_id = ?1",
                &[&active, &date_text(&now())],
                "setting a worker's active flag",
            )
        })
        .await
    }

    async fn delete_worker(&self, worker_id: &str) -> Result<()> {
        let worker_id = worker_id.to_string();
        self.call("deleting a worker", move |conn| {
            delete_worker_sync(conn, &worker_id)
        })
        .await
    }

    async fn reserve(&self, worker_id: &str, request: &Resources) -> Result<bool> {
        let (worker_id, request) = (worker_id.to_string(), *request);
        self.call("reserving resources on a worker", move |conn| {
            reserve_sync(conn, &worker_id, &request)
        })
        .await
    }

    async fn unreserve(
        &self,
        worker_id: &str,
        request: &Resources,
        // No epochs here: a round is one transaction, so no recount falls inside one.
        _epoch: Option<i64>,
    ) -> Result<bool> {
        let (worker_id, request) = (worker_id.to_string(), *request);
        self.call("returning an unassigned reservation", move |conn| {
            unreserve_sync(conn, &worker_id, &request)
        })
        .await
    }

    async fn mark_worker_lost(&self, worker_id: &str, heartbeat_before: i64) -> Result<bool> {
        let worker_id = worker_id.to_string();
        self.call("marking a worker lost", move |conn| {
            let changed = conn
                .prepare_cached(
                    "UPDATE WORKER_REGISTRY SET is_active = 0, updated_at = ?3 \
                     WHERE worker_id = ?1 AND is_active = 1 AND last_heartbeat < ?2",
                )
                .and_then(|mut stmt| {
                    stmt.execute(params![worker_id, heartbeat_before, date_text(&now())])
                })
                .map_err(sql_err("marking a worker lost"))?;
            if changed == 1 {
                Ok(true)
            } else if worker_exists(conn, &worker_id)? {
                Ok(false)
            } else {
                Err(StoreError::NotFound {
                    kind: "worker",
                    id: worker_id.clone(),
                })
            }
        })
        .await
    }

    async fn repair_allocation(&self, observed: &Worker, allocated: &Resources) -> Result<bool> {
        let (observed, allocated) = (observed.clone(), *allocated);
        self.call("repairing a worker's allocation", move |conn| {
            repair_allocation_sync(conn, &observed, &allocated)
        })
        .await
    }
}

#[async_trait]
impl AssignmentStore for SqliteStore {
    async fn insert_assignment(&self, assignment: &Assignment) -> Result<()> {
        let assignment = assignment.clone();
        self.call("inserting an assignment", move |conn| {
            insert_assignment_sync(conn, &assignment)
        })
        .await
    }

    async fn get_assignment(&self, ass_id: &str) -> Result<Assignment> {
        let ass_id = ass_id.to_string();
        self.call("reading an assignment", move |conn| {
            conn.prepare_cached(&format!(
                "SELECT {ASSIGNMENT_COLUMNS} FROM ASSIGNMENTS WHERE ass_id = ?1"
            ))
            .and_then(|mut stmt| stmt.query_row([&ass_id], assignment_from_row).optional())
            .map_err(sql_err("reading an assignment"))?
            .ok_or(StoreError::NotFound {
                kind: "assignment",
                id: ass_id,
            })
        })
        .await
    }

    async fn list_assignments(&self, filter: &AssignmentFilter) -> Result<Vec<Assignment>> {
        let filter = filter.clone();
        self.call("listing assignments", move |conn| {
            list_assignments_sync(conn, &filter)
        })
        .await
    }

    async fn release(&self, ass_id: &str) -> Result<bool> {
        let ass_id = ass_id.to_string();
        self.call("releasing an assignment", move |conn| {
            release_sync(conn, &ass_id)
        })
        .await
    }

    async fn insert_result(&self, result: &TaskResult) -> Result<()> {
        let result = result.clone();
        self.call("inserting a result", move |conn| {
            insert_result_sync(conn, &result)
        })
        .await
    }

    async fn get_result(&self, task_id: &str) -> Result<TaskResult> {
        let task_id = task_id.to_string();
        self.call("reading a result", move |conn| {
            conn.prepare_cached(&format!(
                "SELECT {RESULT_COLUMNS} FROM RESULTS WHERE task_id = ?1"
            ))
            .and_then(|mut stmt| stmt.query_row([&task_id], result_from_row).optional())
            .map_err(sql_err("reading a result"))?
            .ok_or(StoreError::NotFound {
                kind: "result",
                id: task_id,
            })
        })
        .await
    }

    async fn recent_runtimes(&self, limit: u32) -> Result<Vec<RuntimeSample>> {
        self.call("reading recent runtimes", move |conn| {
            conn.prepare_cached(
                "SELECT worker_id, task_type, runtime_s FROM RESULTS \
                 WHERE status = 'success' AND runtime_s IS NOT NULL AND task_type IS NOT NULL \
                 ORDER BY completed_at DESC, task_id DESC LIMIT ?1",
            )
            .and_then(|mut stmt| {
                stmt.query_map([limit], |row| {
                    Ok(RuntimeSample {
                        worker_id: row.get(0)?,
                        task_type: row.get(1)?,
                        runtime_s: row.get(2)?,
                    })
                })?
                .collect::<rusqlite::Result<Vec<_>>>()
            })
            .map_err(sql_err("reading recent runtimes"))
        })
        .await
    }

    async fn active_assignment_counts(&self) -> Result<BTreeMap<String, u32>> {
        self.call("counting active assignments", active_assignment_counts_sync)
            .await
    }

    async fn count_assignments_since(&self, since: DateTime<Utc>) -> Result<u64> {
        self.call("counting recent assignments", move |conn| {
            conn.prepare_cached("SELECT COUNT(*) FROM ASSIGNMENTS WHERE assigned_at >= ?1")
                .and_then(|mut stmt| {
                    stmt.query_row([date_text(&since)], |row| row.get::<_, i64>(0))
                })
                .map(|n| u64::try_from(n).unwrap_or(0))
                .map_err(sql_err("counting recent assignments"))
        })
        .await
    }
}

#[async_trait]
impl BlobStore for SqliteStore {
    async fn insert_policy_version(&self, version: &PolicyVersion, bytes: &[u8]) -> Result<()> {
        let (version, bytes) = (version.clone(), bytes.to_vec());
        self.call("inserting a policy version", move |conn| {
            insert_policy_sync(conn, &version, &bytes)
        })
        .await
    }

    async fn get_policy_version(&self, name: &str, version: &str) -> Result<PolicyVersion> {
        let (name, version) = (name.to_string(), version.to_string());
        self.call("reading a policy version", move |conn| {
            select_policy(conn, &name, &version)
        })
        .await
    }

    async fn get_policy_bytes(&self, name: &str, version: &str) -> Result<Vec<u8>> {
        let (name, version) = (name.to_string(), version.to_string());
        self.call("reading a policy's bytes", move |conn| {
            policy_bytes_sync(conn, &name, &version)
        })
        .await
    }

    async fn list_policy_versions(&self, name: Option<&str>) -> Result<Vec<PolicyVersion>> {
        let name = name.map(str::to_string);
        self.call("listing policy versions", move |conn| {
            conn.prepare_cached(&format!(
                "SELECT {POLICY_COLUMNS} FROM POLICIES WHERE ?1 IS NULL OR name = ?1 \
                 ORDER BY name, uploaded_at, version"
            ))
            .and_then(|mut stmt| stmt.query_map([&name], policy_from_row)?.collect())
            .map_err(sql_err("listing policy versions"))
        })
        .await
    }

    async fn delete_policy_version(&self, name: &str, version: &str) -> Result<()> {
        let (name, version) = (name.to_string(), version.to_string());
        self.call("deleting a policy version", move |conn| {
            delete_policy_sync(conn, &name, &version)
        })
        .await
    }

    async fn get_active_policy(&self, kind: PolicyKind) -> Result<Option<ActivePolicy>> {
        self.call("reading the active policy", move |conn| {
            select_active_policy(conn, kind)
        })
        .await
    }

    async fn activate_policy(
        &self,
        kind: PolicyKind,
        name: &str,
        version: &str,
        activated_by: &str,
        expected_current: Option<(String, String)>,
    ) -> Result<ActivePolicy> {
        let (name, version, by) = (
            name.to_string(),
            version.to_string(),
            activated_by.to_string(),
        );
        self.call("activating a policy", move |conn| {
            activate_policy_sync(conn, kind, &name, &version, &by, expected_current.as_ref())
        })
        .await
    }

    async fn clear_active_policy(
        &self,
        kind: PolicyKind,
        expected_current: (String, String),
    ) -> Result<()> {
        self.call("clearing the active policy", move |conn| {
            clear_active_policy_sync(conn, kind, &expected_current)
        })
        .await
    }

    async fn insert_log_chunk(&self, chunk: &TaskLogChunk) -> Result<bool> {
        let c = chunk.clone();
        self.call("storing a log chunk", move |conn| {
            let seq = i64::try_from(c.seq)
                .map_err(|e| StoreError::backend("encoding a log chunk's seq", e))?;
            let inserted = conn
                .prepare_cached(
                    "INSERT INTO TASK_LOGS (task_id, attempt, seq, stream, text) \
                     VALUES (?1, ?2, ?3, ?4, ?5) ON CONFLICT DO NOTHING",
                )
                .and_then(|mut stmt| {
                    stmt.execute(params![c.task_id, c.attempt, seq, c.stream, c.text])
                })
                .map_err(sql_err("storing a log chunk"))?;
            Ok(inserted == 1)
        })
        .await
    }

    async fn list_log_chunks(
        &self,
        task_id: &str,
        after: Option<(u32, u64)>,
        limit: u32,
    ) -> Result<Vec<TaskLogChunk>> {
        let task_id = task_id.to_string();
        self.call("listing log chunks", move |conn| {
            let (attempt, seq) = match after {
                Some((a, s)) => (
                    i64::from(a),
                    i64::try_from(s).map_err(|e| StoreError::backend("encoding a seq", e))?,
                ),
                None => (-1, -1),
            };
            conn.prepare_cached(
                "SELECT task_id, attempt, seq, stream, text FROM TASK_LOGS \
                 WHERE task_id = ?1 AND (attempt > ?2 OR (attempt = ?2 AND seq > ?3)) \
                 ORDER BY attempt, seq LIMIT ?4",
            )
            .and_then(|mut stmt| {
                stmt.query_map(params![task_id, attempt, seq, limit], |row| {
                    let seq: i64 = row.get(2)?;
                    Ok(TaskLogChunk {
                        task_id: row.get(0)?,
                        attempt: get_u32(row, 1)?,
                        seq: u64::try_from(seq).map_err(|e| conversion(2, e))?,
                        stream: row.get(3)?,
                        text: row.get(4)?,
                    })
                })?
                .collect()
            })
            .map_err(sql_err("listing log chunks"))
        })
        .await
    }

    async fn put_output_file(
        &self,
        task_id: &str,
        attempt: u32,
        path: &str,
        bytes: &[u8],
    ) -> Result<OutputFileInfo> {
        let (task_id, path, bytes) = (task_id.to_string(), path.to_string(), bytes.to_vec());
        self.call("storing an output file", move |conn| {
            put_output_sync(conn, &task_id, attempt, &path, &bytes)
        })
        .await
    }

    async fn list_output_files(&self, task_id: &str) -> Result<Vec<OutputFileInfo>> {
        let task_id = task_id.to_string();
        self.call("listing output files", move |conn| {
            conn.prepare_cached(
                "SELECT task_id, path, attempt, size_bytes, sha256 FROM TASK_OUTPUTS \
                 WHERE task_id = ?1 ORDER BY path",
            )
            .and_then(|mut stmt| stmt.query_map([&task_id], output_from_row)?.collect())
            .map_err(sql_err("listing output files"))
        })
        .await
    }

    async fn get_output_file(
        &self,
        task_id: &str,
        path: &str,
    ) -> Result<(OutputFileInfo, Vec<u8>)> {
        let (task_id, path) = (task_id.to_string(), path.to_string());
        self.call("reading an output file", move |conn| {
            get_output_sync(conn, &task_id, &path)
        })
        .await
    }
}

#[async_trait]
impl EventStore for SqliteStore {
    async fn append_events(&self, events: &[NewEvent]) -> Result<Vec<u64>> {
        let events = events.to_vec();
        self.call("recording events", move |conn| {
            events::append(conn, &events)
        })
        .await
    }

    async fn events_after(&self, after: u64, limit: u32) -> Result<Vec<StoredEvent>> {
        self.call("reading events", move |conn| {
            events::after(conn, after, limit)
        })
        .await
    }

    async fn event_bounds(&self) -> Result<EventBounds> {
        self.call("reading the event bounds", events::bounds).await
    }

    async fn prune_events(&self, before: DateTime<Utc>) -> Result<u64> {
        self.call("pruning events", move |conn| events::prune(conn, before))
            .await
    }
}

#[async_trait]
impl LeaseStore for SqliteStore {
    async fn acquire_lease(
        &self,
        name: &str,
        holder: &str,
        until: DateTime<Utc>,
        now: DateTime<Utc>,
    ) -> Result<bool> {
        let (name, holder) = (name.to_string(), holder.to_string());
        self.call("taking a lease", move |conn| {
            acquire_lease_sync(conn, &name, &holder, &until, &now)
        })
        .await
    }

    async fn release_lease(&self, name: &str, holder: &str) -> Result<bool> {
        let (name, holder) = (name.to_string(), holder.to_string());
        self.call("giving up a lease", move |conn| {
            conn.prepare_cached("DELETE FROM LEASES WHERE name = ?1 AND holder = ?2")
                .and_then(|mut stmt| stmt.execute(params![name, holder]))
                .map(|changed| changed == 1)
                .map_err(sql_err("giving up a lease"))
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use crate::conformance::{TestStore, sample_worker, unique_id};

    async fn fresh() -> TestStore {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open_in_dir(dir.path()).unwrap();
        TestStore::new(store).with_guard(dir)
    }

    crate::store_conformance_tests!(fresh());

    #[tokio::test]
    async fn reopening_keeps_the_data() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nested").join("deeper").join("cloudai.db");
        let worker = sample_worker(&unique_id("w"), Resources::new(4.0, 8.0, 10.0, 0.0));
        {
            let store = SqliteStore::open(&path).unwrap();
            store.insert_worker(&worker).await.unwrap();
            assert!(
                store
                    .reserve(&worker.worker_id, &Resources::new(1.0, 1.0, 1.0, 0.0))
                    .await
                    .unwrap()
            );
        }
        let store = SqliteStore::open(&path).unwrap();
        let again = store.get_worker(&worker.worker_id).await.unwrap();
        assert_eq!(again.allocated(), Resources::new(1.0, 1.0, 1.0, 0.0));
        assert!(again.invariant_violations().is_empty());
    }

    #[tokio::test]
    async fn two_stores_on_one_file_see_each_other() {
        let dir = tempfile::tempdir().unwrap();
        let a = SqliteStore::open_in_dir(dir.path()).unwrap();
        let b = SqliteStore::open_in_dir(dir.path()).unwrap();
        assert_eq!(a.path(), b.path());
        let worker = sample_worker(&unique_id("w"), Resources::new(2.0, 2.0, 2.0, 0.0));
        a.insert_worker(&worker).await.unwrap();
        let request = Resources::new(1.0, 1.0, 1.0, 0.0);
        assert!(b.reserve(&worker.worker_id, &request).await.unwrap());
        assert!(a.reserve(&worker.worker_id, &request).await.unwrap());
        assert!(
            !b.reserve(&worker.worker_id, &request).await.unwrap(),
            "full"
        );
        let seen = a.get_worker(&worker.worker_id).await.unwrap();
        assert_eq!(seen.allocated(), Resources::new(2.0, 2.0, 2.0, 0.0));
        assert!(seen.invariant_violations().is_empty());
    }

    #[tokio::test]
    async fn a_database_from_before_the_policy_limit_columns_gains_them_at_open() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(DB_FILE_NAME);
        drop(SqliteStore::open(&path).unwrap());
        let conn = Connection::open(&path).unwrap();
        conn.execute_batch(
            "ALTER TABLE POLICIES DROP COLUMN memory_bytes; \
             ALTER TABLE POLICIES DROP COLUMN deadline_ms; \
             INSERT INTO POLICIES (name, version, kind, sha256, size_bytes, config, \
             uploaded_at, uploaded_by) VALUES ('old', '1', 'placement', 'x', 0, '{}', \
             '2025-11-16T10:30:00.000Z', 'admin');",
        )
        .unwrap();
        drop(conn);
        let store = SqliteStore::open(&path).unwrap();
        let old = store.get_policy_version("old", "1").await.unwrap();
        assert_eq!((old.memory_bytes, old.deadline_ms), (None, None));
    }

    type PerUser = Vec<(String, i64)>;

    /// USER_RUNNING as the triggers keep it, against a count of the tasks themselves.
    fn counted_and_kept(path: &Path) -> (PerUser, PerUser) {
        let conn = Connection::open(path).unwrap();
        let read = |sql: &str| -> PerUser {
            let mut stmt = conn.prepare(sql).unwrap();
            stmt.query_map([], |row| Ok((row.get(0)?, row.get(1)?)))
                .unwrap()
                .collect::<rusqlite::Result<_>>()
                .unwrap()
        };
        (
            read(
                "SELECT user_id, COUNT(*) FROM TASKS WHERE status = 'running' \
                 GROUP BY user_id ORDER BY user_id",
            ),
            read("SELECT user_id, running FROM USER_RUNNING WHERE running > 0 ORDER BY user_id"),
        )
    }

    #[tokio::test]
    async fn the_running_counts_follow_every_move_of_a_task_and_are_recounted_at_open() {
        use crate::conformance::sample_task_at;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(DB_FILE_NAME);
        let store = SqliteStore::open(&path).unwrap();
        let (alice, bob) = (unique_id("alice"), unique_id("bob"));
        let mut ids = Vec::new();
        for (user, status) in [
            (&alice, TaskStatus::Running),
            (&alice, TaskStatus::Queued),
            (&alice, TaskStatus::Queued),
            (&bob, TaskStatus::Queued),
            (&bob, TaskStatus::Completed),
        ] {
            let task = sample_task_at(&unique_id("task"), user, status, now());
            store.insert_task(&task, None).await.unwrap();
            ids.push(task.task_id);
        }
        let moves = [
            (1, TaskStatus::Queued, TaskStatus::Running),
            (2, TaskStatus::Queued, TaskStatus::Running),
            (3, TaskStatus::Queued, TaskStatus::Running),
            // Running to running (a field update) counts nothing.
            (3, TaskStatus::Running, TaskStatus::Running),
            (0, TaskStatus::Running, TaskStatus::Completed),
            (1, TaskStatus::Running, TaskStatus::Queued),
            (3, TaskStatus::Running, TaskStatus::Failed),
        ];
        let mut expected = vec![
            vec![(alice.clone(), 2)],
            vec![(alice.clone(), 3)],
            vec![(alice.clone(), 3), (bob.clone(), 1)],
            vec![(alice.clone(), 3), (bob.clone(), 1)],
            vec![(alice.clone(), 2), (bob.clone(), 1)],
            vec![(alice.clone(), 1), (bob.clone(), 1)],
            vec![(alice.clone(), 1)],
        ]
        .into_iter();
        let (counted, kept) = counted_and_kept(&path);
        assert_eq!(counted, vec![(alice.clone(), 1)]);
        assert_eq!(kept, counted, "a task inserted running is counted");
        for (i, from, to) in moves {
            store
                .transition_task(&ids[i], &[from], to, &TaskUpdate::default())
                .await
                .unwrap();
            let (counted, kept) = counted_and_kept(&path);
            let mut want = expected.next().unwrap();
            want.sort();
            assert_eq!(counted, want, "after moving task {i} from {from} to {to}");
            assert_eq!(kept, counted, "after moving task {i} from {from} to {to}");
            let asked = store
                .running_counts(&[alice.clone(), bob.clone()])
                .await
                .unwrap();
            assert_eq!(
                asked,
                want.iter().map(|(u, n)| (u.clone(), *n as u32)).collect(),
                "after moving task {i} from {from} to {to}"
            );
        }
        drop(store);
        // Counts an older version (or a hand) left wrong are recounted at open.
        Connection::open(&path)
            .unwrap()
            .execute_batch(
                "DELETE FROM USER_RUNNING; \
                 INSERT INTO USER_RUNNING VALUES ('nobody', 7);",
            )
            .unwrap();
        let store = SqliteStore::open(&path).unwrap();
        let (counted, kept) = counted_and_kept(&path);
        assert_eq!(kept, counted);
        assert_eq!(counted, vec![(alice.clone(), 1)]);
        assert!(
            store
                .running_counts(&["nobody".to_string()])
                .await
                .unwrap()
                .is_empty()
        );
    }

    /// A queue where `bulk` holds the head with `backlog` tasks and `others` users each have a
    /// few tasks behind it (various priorities and ages, one of them claimed).
    async fn queue_behind_a_backlog(store: &SqliteStore, others: usize, backlog: usize) -> String {
        use crate::conformance::sample_task_at;
        let bulk = unique_id("bulk");
        let start = now() - chrono::Duration::hours(1);
        for i in 0..backlog {
            let mut task = sample_task_at(
                &unique_id("task"),
                &bulk,
                TaskStatus::Queued,
                start + chrono::Duration::milliseconds(i as i64),
            );
            task.priority = 5;
            store.insert_task(&task, None).await.unwrap();
        }
        for u in 0..others {
            let user = format!("{}-{u:02}", unique_id("other"));
            for t in 0..3 {
                let mut task = sample_task_at(
                    &unique_id("task"),
                    &user,
                    TaskStatus::Queued,
                    start + chrono::Duration::seconds((7 * u + 3 * t) as i64 % 11),
                );
                task.priority = [0, 5, 9][(u + t) % 3];
                store.insert_task(&task, None).await.unwrap();
                if u == 1 && t == 0 {
                    let until = now() + chrono::Duration::minutes(5);
                    store
                        .claim_task(&task.task_id, "someone/else", until, now())
                        .await
                        .unwrap();
                }
            }
        }
        bulk
    }

    #[tokio::test]
    async fn a_batch_without_the_user_holding_the_queue_reads_the_other_users_heads_as_a_walk_would()
     {
        // Few other users: their heads are read one by one; many: the queue is walked. Both
        // give what walking the queue gives.
        for others in [0, 1, 3, MAX_USERS_READ_BY_HEAD, MAX_USERS_READ_BY_HEAD + 1] {
            let dir = tempfile::tempdir().unwrap();
            let store = SqliteStore::open_in_dir(dir.path()).unwrap();
            let bulk = queue_behind_a_backlog(&store, others, 300).await;
            for limit in [1, 5, 100] {
                let exclude = vec![bulk.clone()];
                let (read, walked) = store
                    .call("reading the queue both ways", move |conn| {
                        let at = now();
                        Ok((
                            claimable_tasks_sync(conn, limit, &at, &exclude)?,
                            claimable_in_queue_order(conn, limit, &at, &exclude)?,
                        ))
                    })
                    .await
                    .unwrap();
                let ids =
                    |tasks: &[Task]| tasks.iter().map(|t| t.task_id.clone()).collect::<Vec<_>>();
                assert_eq!(
                    ids(&read),
                    ids(&walked),
                    "{others} other users, limit {limit}"
                );
                let expected = (others * 3).saturating_sub(usize::from(others > 1));
                assert_eq!(
                    read.len(),
                    expected.min(limit as usize),
                    "{others} other users, limit {limit}"
                );
                assert!(read.iter().all(|t| t.user_id != bulk));
            }
        }
    }

    #[tokio::test]
    async fn a_newer_schema_version_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(DB_FILE_NAME);
        drop(SqliteStore::open(&path).unwrap());
        Connection::open(&path)
            .unwrap()
            .pragma_update(None, "user_version", SCHEMA_VERSION + 1)
            .unwrap();
        match SqliteStore::open(&path) {
            Err(StoreError::Backend { .. }) => {}
            other => panic!("expected a Backend error, got {other:?}"),
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_panicking_request_is_a_backend_error_and_rolled_back_alone() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open_in_dir(dir.path()).unwrap();
        let panicked: Result<()> = store
            .call("panicking on purpose", |conn| {
                insert_task_row(conn, &crate::conformance::sample_task("t-panic", "u"))?;
                panic!("boom")
            })
            .await;
        match panicked {
            Err(e @ StoreError::Backend { .. }) => {
                let text = format!("{e} / {e:?}");
                assert!(text.contains("panicking on purpose"), "{text}");
                assert!(text.contains("boom"), "{text}");
            }
            other => panic!("expected a Backend error, got {other:?}"),
        }
        // The writer survived, and the panicking request's insert was rolled back.
        store.ping().await.unwrap();
        assert!(matches!(
            store.get_task("t-panic").await,
            Err(StoreError::NotFound { .. })
        ));
        let task = crate::conformance::sample_task("t-after", "u");
        store.insert_task(&task, None).await.unwrap();
        assert_eq!(store.get_task("t-after").await.unwrap(), task);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failing_request_does_not_affect_the_others_of_its_batch() {
        use crate::conformance::sample_task;
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open_in_dir(dir.path()).unwrap();
        for i in (0..100).step_by(4) {
            store
                .insert_task(&sample_task(&format!("t-{i}"), "u"), None)
                .await
                .unwrap();
        }
        // Hold the writer until every request below is queued, so that they share a batch.
        let (open_gate, gate) = std::sync::mpsc::channel::<()>();
        let mut held = Box::pin(store.call("holding the writer", move |_conn| {
            gate.recv()
                .map_err(|e| StoreError::backend("waiting at the gate", e))
        }));
        assert!(futures::poll!(&mut held).is_pending());
        let tasks: Vec<Task> = (0..100)
            .map(|i| sample_task(&format!("t-{i}"), "u"))
            .collect();
        let mut inserts = Vec::new();
        for task in &tasks {
            let mut insert = Box::pin(store.insert_task(task, None));
            assert!(futures::poll!(&mut insert).is_pending());
            inserts.push(insert);
        }
        // A request that writes, then fails: its write must be undone, and only its own.
        let mut half_done = Box::pin(store.call("failing after a write", |conn| {
            insert_task_row(conn, &sample_task("t-half-done", "u"))?;
            Err::<(), _>(StoreError::backend("failing on purpose", "after a write"))
        }));
        assert!(futures::poll!(&mut half_done).is_pending());
        let (task, key) = (
            sample_task("t-idempotent", "u"),
            IdempotencyKey {
                key: "k".into(),
                request_sha256: "d".into(),
            },
        );
        let mut idempotent = Box::pin(store.insert_task(&task, Some(&key)));
        assert!(futures::poll!(&mut idempotent).is_pending());
        open_gate.send(()).unwrap();
        held.await.unwrap();
        for (i, insert) in inserts.into_iter().enumerate() {
            match insert.await {
                Ok(outcome) if i % 4 != 0 => {
                    assert!(outcome.created);
                    assert_eq!(outcome.task.task_id, format!("t-{i}"));
                }
                Err(StoreError::AlreadyExists { kind: "task", id }) if i % 4 == 0 => {
                    assert_eq!(id, format!("t-{i}"));
                }
                other => panic!("t-{i}: unexpected {other:?}"),
            }
        }
        assert!(matches!(half_done.await, Err(StoreError::Backend { .. })));
        assert!(idempotent.await.unwrap().created);
        // What the batch committed is what a fresh connection sees.
        let conn = Connection::open(store.path()).unwrap();
        let count = |sql: &str| -> i64 { conn.query_row(sql, [], |r| r.get(0)).unwrap() };
        assert_eq!(
            count("SELECT COUNT(*) FROM TASKS WHERE task_id LIKE 't-%'"),
            101
        );
        assert_eq!(
            count("SELECT COUNT(*) FROM TASKS WHERE task_id = 't-half-done'"),
            0
        );
        assert_eq!(count("SELECT COUNT(*) FROM IDEMPOTENCY_KEYS"), 1);
    }

    #[tokio::test]
    async fn dropping_the_last_handle_stops_the_writer_and_closes_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open_in_dir(dir.path()).unwrap();
        let clone = store.clone();
        store.ping().await.unwrap();
        drop(store);
        clone.ping().await.unwrap();
        let path = clone.path().to_path_buf();
        drop(clone);
        // The writer's connection is closed: the last close checkpoints and removes the WAL.
        assert!(path.exists());
        assert!(!path.with_extension("db-wal").exists());
    }

    #[tokio::test]
    async fn a_corrupt_row_is_a_backend_error_with_context() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open_in_dir(dir.path()).unwrap();
        let task = crate::conformance::sample_task("task-corrupt", "user");
        store.insert_task(&task, None).await.unwrap();
        Connection::open(store.path())
            .unwrap()
            .execute(
                "UPDATE TASKS SET status = 'done' WHERE task_id = 'task-corrupt'",
                [],
            )
            .unwrap();
        match store.get_task("task-corrupt").await {
            Err(e @ StoreError::Backend { .. }) => {
                let text = format!("{e} / {:?}", e);
                assert!(text.contains("reading a task"), "{text}");
            }
            other => panic!("expected a Backend error, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn dates_are_stored_as_sortable_millisecond_text() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open_in_dir(dir.path()).unwrap();
        let task = crate::conformance::sample_task_at(
            "task-dates",
            "user",
            TaskStatus::Pending,
            crate::conformance::at_ms(7),
        );
        store.insert_task(&task, None).await.unwrap();
        let conn = Connection::open(store.path()).unwrap();
        let text: String = conn
            .query_row(
                "SELECT created_at FROM TASKS WHERE task_id = 'task-dates'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(text, "2025-11-16T10:30:00.007Z");
        let mode: String = conn
            .query_row("PRAGMA journal_mode", [], |r| r.get(0))
            .unwrap();
        assert_eq!(mode, "wal");
    }
}
