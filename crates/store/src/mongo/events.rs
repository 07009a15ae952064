//! The `EVENTS` collection of the event stream, written by every replica.
//!
//! Ids come from one counter document (`COUNTERS/events`): a batch takes a block of ids with
//! one `$inc` (a conditional write, see [`MongoStore::atomic`]), then inserts its events with
//! `_id` = id in one `insert_many`. So an id can be given before its event is visible, and a
//! failed insert leaves a gap: readers must expect both (the host's `events` module does). The counter
//! also keeps `floor`, below which everything was pruned.
//!
//! On MongoDB a read is one `find` on an `_id` range and a prune one `deleteMany` below the
//! first event to keep; FerretDB 1.x, which cannot push either down, walks ids one by one
//! instead (see [`super::compat`]).

use std::collections::BTreeSet;

use chrono::{DateTime, Utc};
use futures::TryStreamExt;
use mongodb::bson::{Document, doc};
use mongodb::options::ReturnDocument;

use super::MongoStore;
use super::codec::{Reader, event_from_document, event_to_document, to_bson_date, u64_to_bson};
use super::compat::lock_key;
use crate::{EventBounds, EventRead, NewEvent, Result, StoreError, StoredEvent};

pub const EVENTS: &str = "EVENTS";
pub const COUNTERS: &str = "COUNTERS";
const EVENTS_COUNTER: &str = "events";
impl MongoStore {
    pub(super) fn events_collection(&self) -> mongodb::Collection<Document> {
        self.db.collection(EVENTS)
    }

    pub(super) fn counters(&self) -> mongodb::Collection<Document> {
        self.db.collection(COUNTERS)
    }

    pub(super) async fn append_events_impl(&self, events: &[NewEvent]) -> Result<Vec<u64>> {
        if events.is_empty() {
            return Ok(Vec::new());
        }
        let n = events.len() as u64;
        let counters = self.counters();
        let counter = self
            .atomic(
                lock_key(COUNTERS, EVENTS_COUNTER),
                counters
                    .find_one_and_update(
                        doc! { "_id": EVENTS_COUNTER },
                        doc! { "$inc": { "head": u64_to_bson(n, "head")? } },
                    )
                    .upsert(true)
                    .return_document(ReturnDocument::After),
            )
            .await
            .map_err(|e| StoreError::backend("allocating event ids", e))?
            .ok_or_else(|| StoreError::backend("allocating event ids", "no counter returned"))?;
        let head: u64 = Reader::new(&counter, COUNTERS).int("head")?;
        let first = head + 1 - n;
        let ids: Vec<u64> = (first..=head).collect();
        let documents = events
            .iter()
            .zip(&ids)
            .map(|(e, id)| event_to_document(*id, e))
            .collect::<Result<Vec<_>>>()?;
        self.events_collection()
            .insert_many(documents)
            .await
            .map_err(|e| StoreError::backend(format!("recording events {first}..={head}"), e))?;
        Ok(ids)
    }

    pub(super) async fn event_bounds_impl(&self) -> Result<EventBounds> {
        let counter = self
            .counters()
            .find_one(doc! { "_id": EVENTS_COUNTER })
            .await
            .map_err(|e| StoreError::backend("reading the event counter", e))?;
        let (head, floor) = match &counter {
            Some(d) => {
                let r = Reader::new(d, COUNTERS);
                (
                    r.opt_int("head")?.unwrap_or(0),
                    r.opt_int("floor")?.unwrap_or(1),
                )
            }
            None => (0, 1),
        };
        Ok(EventBounds {
            oldest: floor,
            head,
        })
    }

    /// [`Store::events_after`](crate::Store::events_after): one `find` on the `_id` range, sorted by `_id`, with a batch as
    /// large as the limit so that the first reply carries every event (no `getMore`).
    pub(super) async fn events_after_impl(
        &self,
        after: u64,
        limit: u32,
    ) -> Result<Vec<StoredEvent>> {
        if limit == 0 {
            // A `find` limit of 0 means no limit.
            return Ok(Vec::new());
        }
        // Ids never exceed i64::MAX (see `u64_to_bson`): beyond it there is nothing to read.
        let after = i64::try_from(after).unwrap_or(i64::MAX);
        let documents: Vec<Document> = self
            .events_collection()
            .find(doc! { "_id": { "$gt": after } })
            .sort(doc! { "_id": 1 })
            .limit(i64::from(limit))
            .batch_size(limit)
            .await
            .map_err(|e| StoreError::backend("reading events", e))?
            .try_collect()
            .await
            .map_err(|e| StoreError::backend("reading events", e))?;
        documents.iter().map(event_from_document).collect()
    }

    /// [`Store::events_after_except`](crate::Store::events_after_except): the range read, less the `known` ids (the trait's
    /// default, which an override cannot call): on MongoDB skipping them saves nothing.
    pub(super) async fn events_after_except_impl(
        &self,
        after: u64,
        limit: u32,
        known: &BTreeSet<u64>,
    ) -> Result<EventRead> {
        let page = self.events_after_impl(after, limit).await?;
        let covered_to = (page.len() >= limit as usize)
            .then(|| page.last().map(|e| e.id))
            .flatten();
        let events = page
            .into_iter()
            .filter(|e| !known.contains(&e.id))
            .collect();
        Ok(EventRead { events, covered_to })
    }

    /// [`Store::prune_events`](crate::Store::prune_events): finds the first event recorded at or after `before` (or, when
    /// there is none, the newest), then removes every older event below it with one
    /// `deleteMany`, and raises the counter's floor to it. An event below it that is recent
    /// (one whose insert was still in flight when the first was found) is left alone, so only
    /// events recorded before `before` are ever removed.
    pub(super) async fn prune_events_impl(&self, before: DateTime<Utc>) -> Result<u64> {
        let events = self.events_collection();
        let what = "pruning events";
        let first_kept = events
            .find_one(doc! { "at": { "$gte": to_bson_date(before) } })
            .sort(doc! { "_id": 1 })
            .projection(doc! { "_id": 1 })
            .await
            .map_err(|e| StoreError::backend(what, e))?;
        let floor: u64 = match first_kept {
            Some(d) => Reader::new(&d, EVENTS).int("_id")?,
            None => {
                let newest = events
                    .find_one(doc! {})
                    .sort(doc! { "_id": -1 })
                    .projection(doc! { "_id": 1 })
                    .await
                    .map_err(|e| StoreError::backend(what, e))?;
                match newest {
                    Some(d) => Reader::new(&d, EVENTS).int::<u64>("_id")? + 1,
                    None => return Ok(0),
                }
            }
        };
        let removed = events
            .delete_many(doc! {
                "_id": { "$lt": u64_to_bson(floor, "_id")? },
                "at": { "$lt": to_bson_date(before) },
            })
            .await
            .map_err(|e| StoreError::backend(what, e))?
            .deleted_count;
        // Raised even when nothing was removed: it repairs a floor that a prune interrupted
        // between its two writes left behind.
        self.raise_event_floor(floor).await?;
        Ok(removed)
    }

    /// Records that every event below `floor` is pruned (never lowering it).
    pub(super) async fn raise_event_floor(&self, floor: u64) -> Result<()> {
        let counters = self.counters();
        self.atomic(
            lock_key(COUNTERS, EVENTS_COUNTER),
            counters.update_one(
                doc! { "_id": EVENTS_COUNTER },
                doc! { "$max": { "floor": u64_to_bson(floor, "floor")? } },
            ),
        )
        .await
        .map_err(|e| StoreError::backend("recording the pruned event floor", e))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use mongodb::bson::Bson;

    use crate::EventStore;

    use super::super::testing::connect_native_logged_test_store;
    use crate::conformance::unique_id;

    /// On MongoDB a read is one `find` that asks for every event in its first batch (no
    /// `getMore`), and a prune one `deleteMany`. Run on the native path against FerretDB,
    /// which executes both correctly (slowly: see `compat`).
    #[tokio::test]
    async fn native_read_is_one_find_and_prune_is_one_delete_many() {
        let Some((store, log, _db)) = connect_native_logged_test_store().await else {
            return;
        };
        let recent = crate::model::now();
        let old = recent - chrono::Duration::hours(2);
        // More than the server's default first batch (101 documents).
        let batch: Vec<_> = (0..155)
            .map(|n| {
                let at = if n < 150 { old } else { recent };
                crate::NewEvent {
                    topic: "task".into(),
                    kind: "state".into(),
                    at,
                    task_id: Some(unique_id("t")),
                    worker_id: None,
                    user_id: None,
                    data: serde_json::json!({ "n": n }),
                }
            })
            .collect();
        let ids = store.append_events(&batch).await.unwrap();
        log.take();

        let page = store.events_after(ids[1], 150).await.unwrap();
        assert_eq!(
            page.iter().map(|e| e.id).collect::<Vec<_>>(),
            ids[2..152],
            "150 events after the second, by id"
        );
        let commands = log.take();
        assert_eq!(commands.len(), 1, "{commands:?}");
        assert_eq!(commands[0].get_str("find").ok(), Some(super::EVENTS));
        // The driver asks for one more than the limit, so that the cursor closes at once.
        let batch_size = match commands[0].get("batchSize") {
            Some(Bson::Int32(n)) => i64::from(*n),
            Some(Bson::Int64(n)) => *n,
            other => panic!("batchSize {other:?} in {commands:?}"),
        };
        assert!(batch_size >= 150, "{commands:?}");

        let known = [ids[3], ids[4]].into();
        let read = store.events_after_except(ids[1], 10, &known).await.unwrap();
        assert_eq!(read.events.len(), 8);
        assert_eq!(read.covered_to, Some(ids[11]));
        assert_eq!(
            log.take_names(),
            [("find".to_owned(), super::EVENTS.to_owned())]
        );
        assert!(store.events_after(ids[154], 10).await.unwrap().is_empty());
        assert!(store.events_after(0, 0).await.unwrap().is_empty());
        log.take();

        let removed = store
            .prune_events(recent - chrono::Duration::hours(1))
            .await
            .unwrap();
        assert_eq!(removed, 150);
        let deletes: Vec<_> = log
            .take_names()
            .into_iter()
            .filter(|(name, _)| name == "delete")
            .collect();
        assert_eq!(deletes, [("delete".to_owned(), super::EVENTS.to_owned())]);
        let bounds = store.event_bounds().await.unwrap();
        assert_eq!((bounds.oldest, bounds.head), (ids[150], ids[154]));
        let left = store.events_after(0, 500).await.unwrap();
        assert_eq!(left.iter().map(|e| e.id).collect::<Vec<_>>(), ids[150..]);
    }
}
