//! The `EVENTS` collection of the event stream, written by every replica.
//!
//! Ids come from one counter document (`COUNTERS/events`): a batch takes a block of ids with
//! one `$inc` (under the FerretDB write lock, as every conditional write), then inserts its
//! events with `_id` = id in one `insert_many`. So an id can be given before its event is
//! visible, and a failed insert leaves a gap: readers must expect both (see
//! [`crate::events`]). The counter also keeps `floor`, below which everything was pruned.
//!
//! Every read is by `_id` equality over a bounded range below the counter's head, never a scan
//! and never a server-side sort: FerretDB 1.x pushes down nothing else.

use std::collections::BTreeSet;

use chrono::{DateTime, Utc};
use futures::{StreamExt, TryStreamExt};
use mongodb::bson::{Document, doc};
use mongodb::options::ReturnDocument;

use super::MongoStore;
use super::codec::{Reader, insert_opt, to_bson_date, u64_to_bson};
use super::compat::lock_key;
use crate::store::{EventBounds, EventRead, NewEvent, Result, StoreError, StoredEvent};

pub const EVENTS: &str = "EVENTS";
pub const COUNTERS: &str = "COUNTERS";
const EVENTS_COUNTER: &str = "events";
/// Most ids one read asks for.
const RANGE: u64 = 256;
/// Most ranges one prune walks over (a minute's worth at ~270 events/s).
const MAX_PRUNE_RANGES: usize = 64;
/// Equality lookups one read keeps in flight.
const LOOKUPS_IN_FLIGHT: usize = 16;
/// Most ranges one call walks over (ids may be missing in whole ranges after failures).
const MAX_RANGES: usize = 16;

impl MongoStore {
    fn events_collection(&self) -> mongodb::Collection<Document> {
        self.db.collection(EVENTS)
    }

    fn counters(&self) -> mongodb::Collection<Document> {
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

    /// The events whose ids are in `from..=to`, by id: one `_id` equality lookup per id,
    /// [`LOOKUPS_IN_FLIGHT`] at a time. FerretDB 1.x pushes down only equality: `$in` and
    /// `$gt` on `_id` scan the whole collection (measured: 1.3 s for 10 events among 10,000,
    /// see the `timing` test), an equality lookup stays ~1 ms at any size.
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

    pub(super) async fn events_after_impl(
        &self,
        after: u64,
        limit: u32,
    ) -> Result<Vec<StoredEvent>> {
        Ok(self
            .events_after_except_impl(after, limit, &BTreeSet::new())
            .await?
            .events)
    }

    /// Walks the ids above `after` up to the counter's head, range by range, looking up only
    /// those not in `known`: a replica's own events cost it no read.
    pub(super) async fn events_after_except_impl(
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

    pub(super) async fn prune_events_impl(&self, before: DateTime<Utc>) -> Result<u64> {
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
        }
        Ok(removed)
    }
}

fn event_to_document(id: u64, e: &NewEvent) -> Result<Document> {
    let mut d = doc! {
        "_id": u64_to_bson(id, "_id")?,
        "topic": &e.topic,
        "kind": &e.kind,
        "at": to_bson_date(e.at),
        "data": e.data.to_string(),
    };
    insert_opt(&mut d, "task_id", e.task_id.clone());
    insert_opt(&mut d, "worker_id", e.worker_id.clone());
    insert_opt(&mut d, "user_id", e.user_id.clone());
    Ok(d)
}

fn event_from_document(d: &Document) -> Result<StoredEvent> {
    let r = Reader::new(d, EVENTS);
    let data = r.string("data")?;
    Ok(StoredEvent {
        id: r.int("_id")?,
        event: NewEvent {
            topic: r.string("topic")?,
            kind: r.string("kind")?,
            at: r.date("at")?,
            task_id: r.opt_string("task_id")?,
            worker_id: r.opt_string("worker_id")?,
            user_id: r.opt_string("user_id")?,
            data: serde_json::from_str(&data)
                .map_err(|e| r.invalid("data", format!("not JSON: {e}")))?,
        },
    })
}

/// How the tail reads scale with the size of the collection (run by hand:
/// `cargo test -p cloudai --lib tail_reads_stay_cheap -- --ignored --nocapture`).
#[cfg(test)]
mod timing {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::time::Instant;

    use futures::TryStreamExt;
    use mongodb::bson::{Document, doc};

    use crate::store::Store;
    use crate::store::conformance::unique_id;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[ignore = "a measurement, not a check"]
    async fn tail_reads_stay_cheap() {
        let Some((store, _drop)) = super::super::testing::connect_test_store().await else {
            return;
        };
        let batch: Vec<_> = (0..500)
            .map(|_| {
                crate::events::event(
                    "task",
                    "state",
                    Some(&unique_id("t")),
                    None,
                    None,
                    doc_data(),
                )
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
