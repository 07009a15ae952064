//! Per-document write locks for FerretDB 1.x, shared by every process on one database.
//!
//! FerretDB 1.x applies an update as read, change, write back by `_id`, without re-checking the
//! filter, so two conditional updates that run at the same time can both apply (see
//! [`super::MongoStore::serializes_writes`]). Inserts, on the other hand, are atomic: its
//! backend enforces the unique `_id`. The lock of a document is built on that one atomic
//! operation: holding it means having inserted the document whose `_id` names it (collection
//! and natural key) in [`LOCK_COLLECTION`]; releasing it means deleting that document (by `_id`
//! and the holder's token). Every conditional write of every host replica runs under the lock
//! of the document it changes, which gives each of them the atomicity that MongoDB gives a
//! single-document write, and nothing more.
//!
//! A holder that dies keeps the lock until [`LOCK_TTL`] has passed; then a waiter removes it.
//! That removal is itself not atomic on FerretDB (a slow holder and a remover can race), which
//! is acceptable for what this is: a way to run several replicas against the test server.
//! MongoDB never takes this path.

use std::time::Duration;

use chrono::Utc;
use mongodb::Collection;
use mongodb::bson::{self, Document, doc};
use rand::Rng;

use super::is_duplicate_key;

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
