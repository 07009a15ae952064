//! What exists only for FerretDB 1.x, the server the tests run against. [`detect`] reads the
//! server's kind from `buildInfo` at connect; where it is [`ServerKind::FerretDb1`], the paths
//! here replace the native ones, each for a behaviour of FerretDB 1.24 named where it is:
//! - every conditional write runs under a per-document lock ([`MongoStore::atomic`]): its
//!   updates are not atomic;
//! - the event stream is read and pruned id by id ([`MongoStore::events_after_except_ferretdb1`],
//!   [`MongoStore::prune_events_ferretdb1`]): it pushes down only `_id` equality;
//! - a user's running requests are summed here ([`MongoStore::user_usage_ferretdb1`]): its
//!   `$group` feeds its first accumulator only;
//! - indexes are created one per command ([`create_indexes_one_by_one`]): it panics on a
//!   `createIndexes` naming two existing indexes;
//! - a worker's work is read with two queries ([`MongoStore::worker_work_ferretdb1`]): it
//!   has no `$lookup`;
//! - a placement round is written task by task, each write under its document's lock
//!   ([`MongoStore::place_round_ferretdb1`]): a multi-document update is as little conditional
//!   there as a single-document one.
//!
//! MongoDB never takes these paths, and they never change the native ones.
//!
//! ## The write lock
//!
//! FerretDB 1.x applies an update as read, change, write back by `_id`, without re-checking the
//! filter, so two conditional updates that run at the same time can both apply (see
//! [`MongoStore::serializes_writes`]). Inserts, on the other hand, are atomic: its backend
//! enforces the unique `_id`. The lock of a document is built on that one atomic operation:
//! holding it means having inserted the document whose `_id` names it (collection and natural
//! key, see [`lock_key`]) in [`LOCK_COLLECTION`]; releasing it means deleting that document (by
//! `_id` and the holder's token). Every conditional write of every host replica runs under the
//! lock of the document it changes, which gives each of them the atomicity that MongoDB gives a
//! single-document write, and nothing more.
//!
//! A holder that dies keeps the lock until [`LOCK_TTL`] has passed; then a waiter removes it.
//! That removal is itself not atomic on FerretDB (a slow holder and a remover can race), which
//! is acceptable for what this is: a way to run several replicas against the test server.

use std::collections::BTreeSet;
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures::{StreamExt, TryStreamExt};
use mongodb::bson::{self, Bson, Document, doc};
use mongodb::{Collection, Database, IndexModel};
use rand::Rng;

use super::codec::{Reader, add_open_count, event_from_document, u64_to_bson};
use super::{MongoStore, ServerKind, TASKS, is_duplicate_key};
use crate::model::TaskStatus;
use crate::model::Usage;
use crate::{EventRead, Result, StoreError, StoredEvent};

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

/// The server's kind, from `buildInfo`: FerretDB adds a `ferretdbVersion` field. FerretDB 1.x
/// (or older) takes the paths of this module; MongoDB and FerretDB 2, which runs on PostgreSQL
/// with DocumentDB and whose updates are atomic, take the native ones.
pub(super) async fn detect(db: &Database) -> Result<ServerKind> {
    let info = db
        .run_command(doc! { "buildInfo": 1 })
        .await
        .map_err(|e| StoreError::backend("reading the server's buildInfo", e))?;
    Ok(match info.get("ferretdbVersion") {
        Some(Bson::String(version))
            if version.trim_start_matches('v').starts_with("1.")
                || version.trim_start_matches('v').starts_with("0.") =>
        {
            ServerKind::FerretDb1 {
                version: version.clone(),
            }
        }
        _ => ServerKind::MongoDb,
    })
}

/// Creates `models` on `collection` one `createIndexes` command each: FerretDB 1.24 panics
/// (and drops the connection) when one `createIndexes` names two or more indexes that already
/// exist (its `validateIndexesForCreation` deletes from a shrinking slice by the original
/// position). Runs only at start-up.
pub(super) async fn create_indexes_one_by_one(
    collection: &Collection<Document>,
    models: Vec<IndexModel>,
) -> mongodb::error::Result<()> {
    for model in models {
        collection.create_index(model).await?;
    }
    Ok(())
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
        matches!(self.server, ServerKind::FerretDb1 { .. })
    }

    /// Runs one single-document write on the document that `key` names (see [`lock_key`]).
    /// On MongoDB that is the write itself. On FerretDB 1.x it runs under that document's
    /// store-wide lock (see [`acquire`]), shared by every replica, which makes it as atomic as
    /// MongoDB makes it; writes to different documents still run side by side.
    pub(super) async fn atomic<T, F>(&self, key: String, write: F) -> mongodb::error::Result<T>
    where
        F: IntoFuture<Output = mongodb::error::Result<T>>,
    {
        match self.server {
            ServerKind::MongoDb => write.await,
            ServerKind::FerretDb1 { .. } => {
                let held = acquire(&self.db.collection(LOCK_COLLECTION), key).await?;
                let outcome = write.await;
                if let Err(e) = held.release().await {
                    // The write itself is done; the lock expires on its own.
                    tracing::warn!(error = %e, "releasing a FerretDB write lock");
                }
                outcome
            }
        }
    }

    /// [`Store::user_usage`](crate::Store::user_usage) on FerretDB 1.x: the counts from the aggregation, the requests
    /// summed here. FerretDB 1.24 hands a group's documents to the first accumulator of a
    /// `$group` only (its `group.Process` shares one iterator between them), so every further
    /// accumulator, such as the `$sum` of a field beside the count, answers 0. A user's running
    /// tasks are bounded by the cluster's size.
    pub(super) async fn user_usage_ferretdb1(&self, user_id: &str) -> Result<Usage> {
        let mut usage = Usage::default();
        for group in &self.open_task_groups(user_id, Document::new()).await? {
            add_open_count(&mut usage, group)?;
        }
        if usage.running_tasks == 0 {
            return Ok(usage);
        }
        let what = || format!("reading the usage of user '{user_id}'");
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
        Ok(usage)
    }
}

// ----- events on FerretDB 1.x -----
//
// FerretDB 1.x pushes down only `_id` equality: `$in` and `$gt` on `_id` scan the whole
// collection (measured: 1.3 s for 10 events among 10,000, see the `timing` test), an equality
// lookup stays ~1 ms at any size. So every read here is by `_id` equality over a bounded range
// below the counter's head, never a scan and never a server-side sort, and a replica's own
// events (which it holds already) cost it no lookup at all.

/// Most ids one read asks for.
const RANGE: u64 = 256;
/// Most ranges one prune walks over (a minute's worth at ~270 events/s).
const MAX_PRUNE_RANGES: usize = 64;
/// Equality lookups one read keeps in flight.
const LOOKUPS_IN_FLIGHT: usize = 16;
/// Most ranges one call walks over (ids may be missing in whole ranges after failures).
const MAX_RANGES: usize = 16;

impl MongoStore {
    /// The events whose ids are in `from..=to`, by id: one `_id` equality lookup per id,
    /// [`LOOKUPS_IN_FLIGHT`] at a time.
    async fn events_in(&self, from: u64, to: u64) -> Result<Vec<StoredEvent>> {
        self.events_with_ids((from..=to).collect()).await
    }

    /// The events `ids` that exist, in the order of `ids` (see [`Self::events_in`]).
    async fn events_with_ids(&self, ids: Vec<u64>) -> Result<Vec<StoredEvent>> {
        let collection = self.events_collection();
        let lookups: Vec<_> = ids
            .into_iter()
            .map(|id| {
                let collection = collection.clone();
                async move {
                    let id = u64_to_bson(id, "_id")?;
                    collection
                        .find_one(doc! { "_id": id })
                        .await
                        .map_err(|e| StoreError::backend("reading events", e))
                }
            })
            .collect();
        let documents: Vec<Option<Document>> = futures::stream::iter(lookups)
            .buffered(LOOKUPS_IN_FLIGHT)
            .try_collect()
            .await?;
        documents
            .iter()
            .flatten()
            .map(event_from_document)
            .collect()
    }

    /// Deletes the events `ids`, by `_id` equality (see [`Self::events_in`]).
    async fn delete_events(&self, ids: &[u64]) -> Result<u64> {
        let collection = self.events_collection();
        let deletes: Vec<_> = ids
            .iter()
            .map(|id| {
                let collection = collection.clone();
                let id = *id;
                async move {
                    let id = u64_to_bson(id, "_id")?;
                    collection
                        .delete_one(doc! { "_id": id })
                        .await
                        .map(|outcome| outcome.deleted_count)
                        .map_err(|e| StoreError::backend("pruning events", e))
                }
            })
            .collect();
        let counts: Vec<u64> = futures::stream::iter(deletes)
            .buffered(LOOKUPS_IN_FLIGHT)
            .try_collect()
            .await?;
        Ok(counts.iter().sum())
    }

    /// [`Store::events_after`](crate::Store::events_after) on FerretDB 1.x: see [`Self::events_after_except_ferretdb1`].
    pub(super) async fn events_after_ferretdb1(
        &self,
        after: u64,
        limit: u32,
    ) -> Result<Vec<StoredEvent>> {
        Ok(self
            .events_after_except_ferretdb1(after, limit, &BTreeSet::new())
            .await?
            .events)
    }

    /// [`Store::events_after_except`](crate::Store::events_after_except) on FerretDB 1.x: walks the ids above `after` up to the
    /// counter's head, range by range, looking up only those not in `known`.
    pub(super) async fn events_after_except_ferretdb1(
        &self,
        after: u64,
        limit: u32,
        known: &BTreeSet<u64>,
    ) -> Result<EventRead> {
        let bounds = self.event_bounds_impl().await?;
        let limit = u64::from(limit);
        let mut from = after.max(bounds.oldest.saturating_sub(1));
        let mut events: Vec<StoredEvent> = Vec::new();
        for _ in 0..MAX_RANGES {
            let wanted = limit.saturating_sub(events.len() as u64);
            if from >= bounds.head || wanted == 0 {
                break;
            }
            let to = bounds.head.min(from + wanted.min(RANGE));
            let ids = (from + 1..=to).filter(|id| !known.contains(id)).collect();
            events.extend(self.events_with_ids(ids).await?);
            from = to;
        }
        let covered_to = (from < bounds.head).then_some(from);
        Ok(EventRead { events, covered_to })
    }

    /// [`Store::prune_events`](crate::Store::prune_events) on FerretDB 1.x: walks the ids from the floor range by range,
    /// deleting the old ones one by one up to the first recent one.
    pub(super) async fn prune_events_ferretdb1(&self, before: DateTime<Utc>) -> Result<u64> {
        let bounds = self.event_bounds_impl().await?;
        let mut floor = bounds.oldest;
        let mut removed = 0;
        for _ in 0..MAX_PRUNE_RANGES {
            if floor > bounds.head {
                break;
            }
            let to = bounds.head.min(floor + RANGE - 1);
            let events = self.events_in(floor, to).await?;
            let stop = events.iter().find(|e| e.event.at >= before).map(|e| e.id);
            let old: Vec<u64> = events
                .iter()
                .take_while(|e| Some(e.id) != stop)
                .map(|e| e.id)
                .collect();
            removed += self.delete_events(&old).await?;
            match (stop, events.last()) {
                (Some(id), _) => {
                    floor = id;
                    break;
                }
                // Ids missing at the end may be events still being written: not passed.
                (None, Some(last)) if to == bounds.head => {
                    floor = last.id + 1;
                    break;
                }
                (None, _) if to == bounds.head => break,
                (None, _) => floor = to + 1,
            }
        }
        if floor > bounds.oldest {
            self.raise_event_floor(floor).await?;
        }
        Ok(removed)
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
    use crate::WorkerStore;
    use crate::model::{self, Resources};

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
        match store.server_kind() {
            ServerKind::FerretDb1 { version } => {
                assert!(is_ferretdb_1);
                assert_eq!(info.get_str("ferretdbVersion").ok(), Some(version.as_str()));
            }
            ServerKind::MongoDb => assert!(!is_ferretdb_1, "{info:?}"),
        }
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
        let write_lock = store.db.collection::<Document>(LOCK_COLLECTION);
        write_lock
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
        let left = write_lock.count_documents(doc! {}).await.unwrap();
        assert_eq!(left, 0, "the write released its lock");
    }
}
/// How the tail reads scale with the size of the collection (run by hand:
/// `cargo test -p cloudai --lib tail_reads_stay_cheap -- --ignored --nocapture`).
#[cfg(test)]
mod timing {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::time::Instant;

    use futures::TryStreamExt;
    use mongodb::bson::{Document, doc};

    use crate::EventStore;
    use crate::conformance::unique_id;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[ignore = "a measurement, not a check"]
    async fn tail_reads_stay_cheap() {
        let Some((store, _drop)) = super::super::testing::connect_test_store().await else {
            return;
        };
        let batch: Vec<_> = (0..500)
            .map(|_| crate::NewEvent {
                topic: "task".into(),
                kind: "state".into(),
                at: crate::model::now(),
                task_id: Some(unique_id("t")),
                worker_id: None,
                user_id: None,
                data: doc_data(),
            })
            .collect();
        let started = Instant::now();
        for _ in 0..20 {
            store.append_events(&batch).await.unwrap();
        }
        println!(
            "10,000 events appended in batches of 500: {:?}",
            started.elapsed()
        );
        let head = store.event_bounds().await.unwrap().head;
        let started = Instant::now();
        let tail = store.events_after(head - 10, 512).await.unwrap();
        println!(
            "events_after(head - 10) -> {}: {:?}",
            tail.len(),
            started.elapsed()
        );
        let started = Instant::now();
        let page = store.events_after(head - 5000, 256).await.unwrap();
        println!(
            "events_after(head - 5000, 256) -> {}: {:?}",
            page.len(),
            started.elapsed()
        );
        for id in [head - 3, head - 2, head - 1] {
            let started = Instant::now();
            let found = store
                .events_collection()
                .find_one(doc! { "_id": i64::try_from(id).unwrap() })
                .await
                .unwrap();
            println!(
                "find_one _id = {id} -> {}: {:?}",
                found.is_some(),
                started.elapsed()
            );
        }
        let started = Instant::now();
        let found = store
            .counters()
            .find_one(doc! { "_id": "events" })
            .await
            .unwrap();
        println!("counter -> {}: {:?}", found.is_some(), started.elapsed());
        let started = Instant::now();
        let gt: Vec<Document> = store
            .events_collection()
            .find(doc! { "_id": { "$gt": i64::try_from(head - 10).unwrap() } })
            .await
            .unwrap()
            .try_collect()
            .await
            .unwrap();
        println!(
            "find _id $gt head - 10 -> {}: {:?}",
            gt.len(),
            started.elapsed()
        );
        let started = Instant::now();
        let one = store.append_events(&batch[..1]).await.unwrap();
        println!("append one event: {:?} ({one:?})", started.elapsed());
    }

    fn doc_data() -> serde_json::Value {
        serde_json::json!({"status": "queued", "reason": null, "attempts": 0, "worker_id": null})
    }
}

impl MongoStore {
    /// A placement round written task by task with the single-document writes (each under its
    /// document's lock): FerretDB 1.x's `updateMany` reads, changes and writes back each
    /// document without re-checking the filter, so the native round's claim could be won by
    /// two replicas at once.
    pub(super) async fn place_round_ferretdb1(
        &self,
        plan: &crate::RoundPlan,
    ) -> Result<crate::RoundOutcome> {
        use crate::placement::{TaskByTask, place_in_steps};
        place_in_steps(self, &TaskByTask(self), plan).await
    }
}

impl MongoStore {
    /// [`crate::Store::worker_work`] without `$lookup`, which FerretDB 1.x lacks: the
    /// worker's active assignments, then their tasks in one `$in` read.
    pub(super) async fn worker_work_ferretdb1(
        &self,
        worker_id: &str,
    ) -> Result<Vec<(crate::model::Assignment, crate::model::Task)>> {
        use super::codec::task_from_document;
        let assignments = self
            .list_assignments_impl(&crate::AssignmentFilter {
                worker_id: Some(worker_id.to_string()),
                active_only: true,
                ..crate::AssignmentFilter::default()
            })
            .await?;
        if assignments.is_empty() {
            return Ok(Vec::new());
        }
        let ids: Vec<&str> = assignments.iter().map(|a| a.task_id.as_str()).collect();
        let what = || format!("reading the tasks of worker '{worker_id}'");
        let documents: Vec<Document> = self
            .tasks
            .find(doc! { "task_id": { "$in": ids }, "status": TaskStatus::Running.as_str() })
            .await
            .map_err(|e| StoreError::backend(what(), e))?
            .try_collect()
            .await
            .map_err(|e| StoreError::backend(what(), e))?;
        let mut tasks = std::collections::HashMap::new();
        for d in &documents {
            let task = task_from_document(d)?;
            tasks.insert(task.task_id.clone(), task);
        }
        let mut work: Vec<_> = assignments
            .into_iter()
            .filter_map(|a| {
                let task = tasks.get(&a.task_id)?.clone();
                a.holds(&task).then_some((a, task))
            })
            .collect();
        work.sort_by(|(x, _), (y, _)| x.ass_id.cmp(&y.ass_id));
        Ok(work)
    }
}
