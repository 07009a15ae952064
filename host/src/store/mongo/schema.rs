//! The schema at start-up: the seed's collections and every index it lists, plus ours.

use mongodb::bson::{Document, doc};
use mongodb::options::IndexOptions;
use mongodb::{Collection, IndexModel};

use super::{
    ACTIVE_POLICIES, ASSIGNMENTS, COUNTERS, EVENTS, IDEMPOTENCY_KEYS, LEASES, MongoStore,
    NAMESPACE_EXISTS, POLICIES, POLICY_CHUNKS, RESULTS, ServerKind, TASK_LOGS, TASK_OUTPUT_CHUNKS,
    TASK_OUTPUTS, TASKS, WORKER_REGISTRY, compat, error_code,
};
use crate::store::{Result, StoreError};

impl MongoStore {
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

    use super::super::testing::{connect_native_logged_test_store, connect_test_store};
    use super::super::{MongoStore, TASKS, is_duplicate_key};
    use crate::store::Store;

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
        assert!(creates.contains(&format!("{TASKS}:8")), "{creates:?}");
        let names = store.tasks.list_index_names().await.unwrap();
        assert_eq!(names.len(), 9, "8 and _id: {names:?}");
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
