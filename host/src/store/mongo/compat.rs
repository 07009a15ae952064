//! What exists only for FerretDB 1.x, the server the tests run against: detecting it, and the
//! per-document write lock that makes its conditional writes as atomic as MongoDB makes them.
//! MongoDB never takes these paths.
//!
//! FerretDB 1.x applies an update as read, change, write back by `_id`, without re-checking the
//! filter, so two conditional updates that run at the same time can both apply (see
//! [`MongoStore::serializes_writes`]). Inserts, on the other hand, are atomic: its backend
//! enforces the unique `_id`. The lock of a document is built on that one atomic operation:
//! holding it means having inserted the document whose `_id` names it (collection and natural
//! key, see [`lock_key`]) in [`LOCK_COLLECTION`]; releasing it means deleting that document (by
//! `_id` and the holder's token). Every conditional write of every host replica runs under the
//! lock of the document it changes ([`MongoStore::atomic`]), which gives each of them the
//! atomicity that MongoDB gives a single-document write, and nothing more.
//!
//! A holder that dies keeps the lock until [`LOCK_TTL`] has passed; then a waiter removes it.
//! That removal is itself not atomic on FerretDB (a slow holder and a remover can race), which
//! is acceptable for what this is: a way to run several replicas against the test server.

use std::time::Duration;

use chrono::Utc;
use mongodb::Collection;
use mongodb::bson::{self, Bson, Document, doc};
use rand::Rng;

use super::{MongoStore, is_duplicate_key};
use crate::store::{Result, StoreError};

/// Our addition, used only on FerretDB 1.x: one document per lock held.
pub const LOCK_COLLECTION: &str = "FERRETDB_WRITE_LOCK";

/// How long a lock is honoured without being released. Writes take milliseconds; this only
/// bounds how long a replica that died holding the lock stalls the others.
const LOCK_TTL: Duration = Duration::from_secs(5);

/// The longest pause between two attempts to take a held lock.
const MAX_BACKOFF: Duration = Duration::from_millis(8);

/// The lock, taken: released by [`Held::release`], or in the background if dropped (a caller
/// whose future was cancelled mid-write must not leave the others waiting out the TTL).
pub struct Held {
    collection: Collection<Document>,
    key: String,
    token: String,
    released: bool,
}

/// Takes the lock named `key`, waiting while another writer (of any process) holds it.
pub async fn acquire(
    collection: &Collection<Document>,
    key: String,
) -> mongodb::error::Result<Held> {
    let token = uuid::Uuid::now_v7().simple().to_string();
    let mut backoff = Duration::from_micros(500);
    loop {
        let ttl_ms = i64::try_from(LOCK_TTL.as_millis()).unwrap_or(i64::MAX);
        let expires_at = Utc::now().timestamp_millis().saturating_add(ttl_ms);
        let attempt = collection
            .insert_one(doc! {
                "_id": &key,
                "holder": &token,
                "expires_at": bson::DateTime::from_millis(expires_at),
            })
            .await;
        match attempt {
            Ok(_) => {
                return Ok(Held {
                    collection: collection.clone(),
                    key,
                    token,
                    released: false,
                });
            }
            Err(e) if is_duplicate_key(&e) => {
                remove_if_expired(collection, &key).await?;
                let jitter = rand::rng().random_range(0.5..1.5);
                tokio::time::sleep(backoff.mul_f64(jitter)).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
            Err(e) => return Err(e),
        }
    }
}

/// Removes a lock whose holder has not released it within its TTL (the holder died).
async fn remove_if_expired(
    collection: &Collection<Document>,
    key: &str,
) -> mongodb::error::Result<()> {
    let now = bson::DateTime::from_millis(Utc::now().timestamp_millis());
    let Some(lock) = collection.find_one(doc! { "_id": key }).await? else {
        return Ok(());
    };
    let expired = lock
        .get_datetime("expires_at")
        .map(|at| *at < now)
        .unwrap_or(true);
    if expired {
        let holder = lock.get_str("holder").unwrap_or_default().to_owned();
        tracing::warn!(
            key,
            holder = %holder,
            "removing a FerretDB write lock that was held past its TTL (its holder died?)"
        );
        collection
            .delete_one(doc! { "_id": key, "holder": holder })
            .await?;
    }
    Ok(())
}

impl Held {
    /// Releases the lock now.
    pub async fn release(mut self) -> mongodb::error::Result<()> {
        self.released = true;
        self.collection
            .delete_one(doc! { "_id": &self.key, "holder": &self.token })
            .await
            .map(|_| ())
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        if self.released {
            return;
        }
        let collection = self.collection.clone();
        let token = std::mem::take(&mut self.token);
        let key = std::mem::take(&mut self.key);
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                if let Err(e) = collection
                    .delete_one(doc! { "_id": &key, "holder": &token })
                    .await
                {
                    tracing::warn!(error = %e, "releasing an abandoned FerretDB write lock");
                }
            });
        }
    }
}

/// The name of one document for [`MongoStore::atomic`]: its collection and natural key.
pub(super) fn lock_key(collection: &str, id: &str) -> String {
    format!("{collection}/{id}")
}

impl MongoStore {
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
    pub(super) async fn detect_ferretdb(&self) -> Result<Option<String>> {
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
    /// On FerretDB 1.x it runs under that document's store-wide lock (see [`acquire`]), shared by
    /// every replica, which makes it as atomic as MongoDB makes it; writes to different
    /// documents still run side by side.
    pub(super) async fn atomic<T, F>(&self, key: String, write: F) -> mongodb::error::Result<T>
    where
        F: IntoFuture<Output = mongodb::error::Result<T>>,
    {
        if self.ferretdb_version.is_none() {
            return write.await;
        }
        let held = acquire(&self.write_lock, key).await?;
        let outcome = write.await;
        if let Err(e) = held.release().await {
            // The write itself is done; the lock expires on its own.
            tracing::warn!(error = %e, "releasing a FerretDB write lock");
        }
        outcome
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::time::Duration;

    use mongodb::bson::{Bson, doc};

    use super::super::WORKER_REGISTRY;
    use super::super::codec::to_bson_date;
    use super::super::testing::{connect_test_store, worker};
    use super::*;
    use crate::model::{self, Resources};
    use crate::store::Store;

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
}
