//! The schema at start-up: the seed's collections and every index it lists, plus ours, and the
//! version of the stored documents' shape (refused when newer than this code, converted when
//! older).

use futures::TryStreamExt;
use mongodb::bson::{Bson, Document, doc};
use mongodb::options::IndexOptions;
use mongodb::{Collection, IndexModel};

use super::codec::{Reader, map_to_pairs};
use super::compat::lock_key;

use super::{
    ACTIVE_POLICIES, ASSIGNMENTS, COUNTERS, EVENTS, IDEMPOTENCY_KEYS, LEASES, MongoStore,
    NAMESPACE_EXISTS, POLICIES, POLICY_CHUNKS, RESULTS, ServerKind, TASK_LOGS, TASK_OUTPUT_CHUNKS,
    TASK_OUTPUTS, TASKS, WORKER_REGISTRY, compat, error_code, is_duplicate_key,
};
use crate::{Result, StoreError};

/// The shape of the stored documents that this code reads and writes, recorded in [`META`] as
/// `{_id: "schema", version}`; a database without that record is at version 1.
/// - 1: labels and env as sub-documents keyed by their keys;
/// - 2: labels and env as arrays of `{k, v}` (see [`map_to_pairs`]).
///
/// A database recorded at a newer version is refused at connect; one at an older version is
/// converted at connect, then recorded at this one.
pub const SCHEMA_VERSION: i64 = 2;

/// Our addition: facts about the database itself, such as its schema version.
pub const META: &str = "META";

/// The `_id` of the schema version's document in [`META`].
const SCHEMA_DOC: &str = "schema";

/// Refuses a database recorded at a version newer than [`SCHEMA_VERSION`]: this code would
/// misread what a newer release wrote, or write what it cannot read.
pub(super) fn check_schema_version(found: i64, database: &str) -> Result<()> {
    if found > SCHEMA_VERSION {
        return Err(StoreError::backend(
            format!("opening MongoDB database '{database}'"),
            format!(
                "schema version {found} was written by a newer cloudai (this one knows \
                 {SCHEMA_VERSION}): upgrade cloudai, or use another database"
            ),
        ));
    }
    Ok(())
}

impl MongoStore {
    /// The schema version recorded in the database (1 when none is).
    pub(super) async fn stored_schema_version(&self) -> Result<i64> {
        let found = self
            .db
            .collection::<Document>(META)
            .find_one(doc! { "_id": SCHEMA_DOC })
            .await
            .map_err(|e| StoreError::backend("reading the schema version", e))?;
        match found {
            Some(d) => Reader::new(&d, META).int("version"),
            None => Ok(1),
        }
    }

    /// Converts what a release at schema version `found` wrote to [`SCHEMA_VERSION`], then
    /// records that version. Idempotent and safe while other replicas start too: each
    /// conversion is a conditional update of one field that no longer matches once done, and
    /// documents already in the new shape are never touched.
    pub(super) async fn migrate_from(&self, found: i64) -> Result<()> {
        if found < 2 {
            let tasks = self
                .convert_maps(&self.tasks, TASKS, "task_id", &["labels", "env"])
                .await?;
            let workers = self
                .convert_maps(&self.workers, WORKER_REGISTRY, "worker_id", &["labels"])
                .await?;
            if tasks + workers > 0 {
                tracing::info!(
                    tasks,
                    workers,
                    "converted labels and env to {{k, v}} pairs (schema version 2)"
                );
            }
        }
        self.record_schema_version().await
    }

    /// Rewrites each of `fields` (string maps) that a document of `collection` still holds as
    /// a sub-document (schema version 1) as `{k, v}` pairs: one conditional update per field,
    /// under the document's write lock (see [`MongoStore::atomic`]) since tasks and workers
    /// are written meanwhile. Returns how many fields it rewrote.
    async fn convert_maps(
        &self,
        collection: &Collection<Document>,
        name: &'static str,
        key: &str,
        fields: &[&str],
    ) -> Result<u64> {
        // A sub-document, not an array of them (`$type` also matches an array's elements).
        let old_shape = doc! { "$type": "object", "$not": { "$type": "array" } };
        let filter = doc! {
            "$or": fields
                .iter()
                .map(|field| doc! { *field: old_shape.clone() })
                .collect::<Vec<_>>(),
        };
        let mut projection = doc! { "_id": 1, key: 1 };
        for field in fields {
            projection.insert(*field, 1);
        }
        let what = || format!("converting the string maps of {name} to schema version 2");
        let mut old = collection
            .find(filter)
            .projection(projection)
            .await
            .map_err(|e| StoreError::backend(what(), e))?;
        let mut converted = 0;
        while let Some(d) = old
            .try_next()
            .await
            .map_err(|e| StoreError::backend(what(), e))?
        {
            let r = Reader::new(&d, name);
            let id = d.get("_id").cloned().unwrap_or(Bson::Null);
            let natural = r.opt_string(key)?.unwrap_or_else(|| id.to_string());
            for field in fields {
                if !matches!(d.get(*field), Some(Bson::Document(_))) {
                    continue;
                }
                let pairs = map_to_pairs(&r.map(field)?);
                let outcome = self
                    .atomic(
                        lock_key(name, &natural),
                        collection.update_one(
                            doc! { "_id": id.clone(), *field: old_shape.clone() },
                            doc! { "$set": { *field: pairs } },
                        ),
                    )
                    .await
                    .map_err(|e| StoreError::backend(what(), e))?;
                converted += outcome.modified_count;
            }
        }
        Ok(converted)
    }

    /// Records [`SCHEMA_VERSION`] (never lowering a recorded version).
    async fn record_schema_version(&self) -> Result<()> {
        let meta = self.db.collection::<Document>(META);
        let mut retried = false;
        loop {
            let recorded = self
                .atomic(
                    lock_key(META, SCHEMA_DOC),
                    meta.update_one(
                        doc! { "_id": SCHEMA_DOC },
                        doc! { "$max": { "version": SCHEMA_VERSION } },
                    )
                    .upsert(true),
                )
                .await;
            match recorded {
                Ok(_) => return Ok(()),
                // Another replica inserted it first: now it exists, and this is an update.
                Err(e) if is_duplicate_key(&e) && !retried => retried = true,
                Err(e) => return Err(StoreError::backend("recording the schema version", e)),
            }
        }
    }

    /// Creates the seed's collections and every index it lists, plus ours. Creating an index
    /// whose specification already exists is a no-op on the server, so this is idempotent.
    pub(super) async fn ensure_schema(&self) -> Result<()> {
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
            META,
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
                    // Label queries (`labels: {$elemMatch: {k, v}}`), any key.
                    plain(doc! { "labels.k": 1, "labels.v": 1 }),
                    // An array's tasks in index order.
                    plain(doc! { "array_id": 1, "array_index": 1 }),
                    // The dependency pass: the tasks awaiting dependencies.
                    plain(
                        doc! { "awaiting_dependencies": 1, "status": 1, "after": 1, "task_id": 1 },
                    ),
                    // The preemptions under way, read every round while a preempting policy is
                    // active: the few tasks being stopped, not every running task.
                    plain(doc! { "preempted_by": 1, "status": 1 }),
                ],
            ),
            (
                &self.workers,
                WORKER_REGISTRY,
                vec![
                    unique(doc! { "worker_id": 1 }),
                    plain(doc! { "is_active": 1 }),
                    plain(doc! { "last_heartbeat": -1 }),
                    plain(doc! { "labels.k": 1, "labels.v": 1 }),
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
            // One command per collection; already existing indexes are left as they are.
            let created = match self.server {
                ServerKind::MongoDb => collection.create_indexes(models).await.map(drop),
                ServerKind::FerretDb1 { .. } => {
                    compat::create_indexes_one_by_one(collection, models).await
                }
            };
            created
                .map_err(|e| StoreError::backend(format!("creating the indexes of {name}"), e))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use mongodb::bson::doc;

    use std::collections::BTreeMap;

    use mongodb::bson::{Bson, Document};

    use super::super::codec::{task_to_document, worker_to_document};
    use super::super::testing::{
        connect_native_logged_test_store, connect_test_store, task, test_uri, worker,
    };
    use super::super::{MongoStore, TASKS, is_duplicate_key};
    use super::*;
    use crate::TaskStore;
    use crate::WorkerStore;
    use crate::model::Resources;
    use crate::{Store, StoreError};

    fn map(entries: &[(&str, &str)]) -> BTreeMap<String, String> {
        entries
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    async fn raw(collection: &Collection<Document>, key: &str, id: &str) -> Document {
        collection
            .find_one(doc! { key: id })
            .await
            .unwrap()
            .unwrap()
    }

    /// A database written at schema version 1 (labels and env as sub-documents, no version
    /// record) is converted by the replicas that start on it, all at once; its maps read the
    /// same before (a half-done conversion never fails a read) and after, documents in the new
    /// shape are left alone, and a later start converts nothing.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn a_version_1_database_is_converted_at_connect_and_reads_the_same() {
        let Some((store, db)) = connect_test_store().await else {
            return;
        };
        assert_eq!(store.stored_schema_version().await.unwrap(), SCHEMA_VERSION);
        let labels = map(&[("team", "ml"), ("app_name", "web")]);
        let env = map(&[("A", "1"), ("B", "")]);
        let old_map = |m: &BTreeMap<String, String>| -> Document {
            m.iter()
                .map(|(k, v)| (k.clone(), Bson::String(v.clone())))
                .collect()
        };
        let mut old_task = task_to_document(&task("t-old", "u1")).unwrap();
        old_task.insert("labels", old_map(&labels));
        old_task.insert("env", old_map(&env));
        store.tasks.insert_one(old_task).await.unwrap();
        let mut half = task_to_document(&task("t-half", "u1")).unwrap();
        half.insert("env", Document::new());
        store.tasks.insert_one(half).await.unwrap();
        let mut old_worker =
            worker_to_document(&worker("w-old", Resources::new(1.0, 1.0, 1.0, 0.0)));
        old_worker.insert("labels", old_map(&map(&[("zone", "eu"), ("gpu", "a100")])));
        store.workers.insert_one(old_worker).await.unwrap();
        let mut new_task = task("t-new", "u1");
        new_task.labels = map(&[("app.kubernetes.io/name", "web")]);
        store.insert_task(&new_task, None).await.unwrap();
        let new_before = raw(&store.tasks, "task_id", "t-new").await;
        store
            .db
            .collection::<Document>(META)
            .delete_many(doc! {})
            .await
            .unwrap();
        assert_eq!(store.stored_schema_version().await.unwrap(), 1);

        let read = store.get_task("t-old").await.unwrap();
        assert_eq!((&read.labels, &read.env), (&labels, &env));

        let uri = test_uri().unwrap();
        let (first, second) = tokio::join!(
            MongoStore::connect(&uri, &db.database),
            MongoStore::connect(&uri, &db.database)
        );
        let (first, _second) = (first.unwrap(), second.unwrap());
        assert_eq!(first.stored_schema_version().await.unwrap(), SCHEMA_VERSION);
        let converted = raw(&first.tasks, "task_id", "t-old").await;
        assert!(
            matches!(converted.get("labels"), Some(Bson::Array(_))),
            "{converted}"
        );
        assert!(
            matches!(converted.get("env"), Some(Bson::Array(_))),
            "{converted}"
        );
        let read = first.get_task("t-old").await.unwrap();
        assert_eq!((&read.labels, &read.env), (&labels, &env));
        let half = raw(&first.tasks, "task_id", "t-half").await;
        assert_eq!(half.get("env"), Some(&Bson::Array(Vec::new())), "{half}");
        let w = first.get_worker("w-old").await.unwrap();
        assert_eq!(w.labels, map(&[("gpu", "a100"), ("zone", "eu")]));
        assert!(matches!(
            raw(&first.workers, "worker_id", "w-old")
                .await
                .get("labels"),
            Some(Bson::Array(_))
        ));
        assert_eq!(raw(&first.tasks, "task_id", "t-new").await, new_before);

        let everything = |store: &MongoStore| {
            let (tasks, workers) = (store.tasks.clone(), store.workers.clone());
            async move {
                let mut all: Vec<Document> = tasks
                    .find(doc! {})
                    .await
                    .unwrap()
                    .try_collect()
                    .await
                    .unwrap();
                all.extend(
                    workers
                        .find(doc! {})
                        .await
                        .unwrap()
                        .try_collect::<Vec<_>>()
                        .await
                        .unwrap(),
                );
                all
            }
        };
        let before = everything(&first).await;
        let third = MongoStore::connect(&uri, &db.database).await.unwrap();
        assert_eq!(everything(&third).await, before);
    }

    #[tokio::test]
    async fn a_newer_schema_version_is_refused() {
        let Some((store, db)) = connect_test_store().await else {
            return;
        };
        store
            .db
            .collection::<Document>(META)
            .update_one(
                doc! { "_id": SCHEMA_DOC },
                doc! { "$set": { "version": SCHEMA_VERSION + 1 } },
            )
            .upsert(true)
            .await
            .unwrap();
        let uri = test_uri().unwrap();
        match MongoStore::connect(&uri, &db.database).await {
            Err(StoreError::Backend { context, source }) => {
                let message = format!("{context}: {source}");
                assert!(
                    message.contains(&format!("schema version {}", SCHEMA_VERSION + 1))
                        && message.contains("newer cloudai"),
                    "{message}"
                );
            }
            other => panic!("expected a Backend error, got {other:?}"),
        }
    }

    #[test]
    fn only_a_newer_schema_version_is_refused() {
        assert!(check_schema_version(1, "db").is_ok());
        assert!(check_schema_version(SCHEMA_VERSION, "db").is_ok());
        let message = check_schema_version(SCHEMA_VERSION + 1, "db")
            .unwrap_err()
            .to_string();
        assert!(message.contains("'db'"), "{message}");
    }

    /// On MongoDB each collection's indexes are created by one `createIndexes` command. Run on
    /// the native path against FerretDB, which accepts it on a fresh database (not a second
    /// time: see `compat::create_indexes_one_by_one`).
    #[tokio::test]
    async fn native_schema_is_one_create_indexes_per_collection() {
        let Some((store, log, _db)) = connect_native_logged_test_store().await else {
            return;
        };
        let creates: Vec<String> = log
            .take()
            .iter()
            .filter_map(|command| {
                let indexes = command.get_array("indexes").ok()?;
                let collection = command.get_str("createIndexes").ok()?;
                Some(format!("{collection}:{}", indexes.len()))
            })
            .collect();
        assert_eq!(creates.len(), 9, "one command per collection: {creates:?}");
        assert!(creates.contains(&format!("{TASKS}:12")), "{creates:?}");
        let names = store.tasks.list_index_names().await.unwrap();
        assert_eq!(names.len(), 13, "12 and _id: {names:?}");
    }

    #[tokio::test]
    async fn connect_is_idempotent_and_creates_the_seed_indexes() {
        let Some((store, db)) = connect_test_store().await else {
            return;
        };
        let uri = super::super::testing::test_uri().unwrap();
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
}
