//! Reservations and assignments: the conditional `$inc` that reserves capacity on a worker
//! (and its mirror), the ASSIGNMENTS collection, and the once-only release.

use std::collections::{BTreeMap, HashMap};

use chrono::{DateTime, Utc};
use futures::TryStreamExt;
use mongodb::bson::{Document, doc};
use mongodb::options::ReturnDocument;

use super::codec::{
    Reader, assignment_from_document, assignment_to_document, task_from_document, to_bson_date,
};
use super::compat::lock_key;
use super::{ASSIGNMENTS, MongoStore, ServerKind, TASKS, WORKER_REGISTRY, insert_error, not_found};
use crate::AssignmentStore;
use crate::model::{self, Assignment, Resources, Task, TaskStatus};
use crate::{AssignmentFilter, Result, StoreError};

impl MongoStore {
    /// [`Store::release`]'s two steps: the once-only guard on the assignment, then the
    /// amounts back to the worker while its accounting epoch is the one the release counts
    /// on. For a release, the epoch read before the guard: a repair since then may already
    /// have counted this release (see [`Self::accounting_epoch`]). For an `unstarted` one
    /// ([`Store::release_unstarted`]), the epoch the placement read before its reserve, when
    /// the assignment has one: a recount since may have left the amounts out.
    async fn release_in_two_steps(&self, ass_id: &str, unstarted: bool) -> Result<bool> {
        let current = self.get_assignment_impl(ass_id).await?;
        if current.released {
            return Ok(false);
        }
        let epoch = match current.reserved_epoch.filter(|_| unstarted) {
            Some(reserved) => Some(reserved),
            None => self.accounting_epoch(&current.worker_id).await?,
        };
        let Some(assignment) = self.release_guard(ass_id).await? else {
            return Ok(false);
        };
        self.return_reservation(&assignment, epoch).await?;
        Ok(true)
    }

    pub(super) async fn accounting_epochs_impl(
        &self,
        worker_ids: &[&str],
    ) -> Result<HashMap<String, i64>> {
        if worker_ids.is_empty() {
            return Ok(HashMap::new());
        }
        let what = || {
            format!(
                "reading the accounting epochs of {} workers",
                worker_ids.len()
            )
        };
        let documents: Vec<Document> = self
            .workers
            .find(doc! { "worker_id": { "$in": worker_ids.to_vec() } })
            .projection(doc! { "worker_id": 1, "accounting_epoch": 1, "_id": 0 })
            .batch_size(u32::try_from(worker_ids.len()).unwrap_or(u32::MAX))
            .await
            .map_err(|e| StoreError::backend(what(), e))?
            .try_collect()
            .await
            .map_err(|e| StoreError::backend(what(), e))?;
        documents
            .iter()
            .map(|d| {
                let r = Reader::new(d, WORKER_REGISTRY);
                Ok((
                    r.string("worker_id")?,
                    r.opt_int("accounting_epoch")?.unwrap_or(0),
                ))
            })
            .collect()
    }

    /// The worker's accounting epoch: how many times the reconciler has repaired its
    /// `allocated_*` (0 before the first repair; `None` for no such worker). A release reads it
    /// before its guard and returns the amounts only while it is unchanged: a repair that
    /// lands between the guard and the return may already have counted this release (its
    /// recount saw the assignment released), and returning the amounts again would take
    /// `allocated_*` below what the active assignments hold. Skipping the return instead
    /// errs on the safe side: at worst the capacity stays held (a drift the next repair
    /// recounts), never handed out twice.
    async fn accounting_epoch(&self, worker_id: &str) -> Result<Option<i64>> {
        let document = self
            .workers
            .find_one(doc! { "worker_id": worker_id })
            .projection(doc! { "accounting_epoch": 1 })
            .await
            .map_err(|e| {
                StoreError::backend(format!("reading the accounting of worker '{worker_id}'"), e)
            })?;
        Ok(document.map(|d| match d.get("accounting_epoch") {
            Some(mongodb::bson::Bson::Int64(n)) => *n,
            Some(mongodb::bson::Bson::Int32(n)) => i64::from(*n),
            _ => 0,
        }))
    }

    /// Step 1, the once-only guard: exactly one caller flips `released`; the assignment as it
    /// was, for that caller (`None` for the others).
    async fn release_guard(&self, ass_id: &str) -> Result<Option<Assignment>> {
        let guard = self
            .assignments
            .find_one_and_update(
                doc! { "ass_id": ass_id, "released": { "$ne": true } },
                doc! { "$set": { "released": true, "released_at": to_bson_date(model::now()) } },
            )
            .return_document(ReturnDocument::Before);
        let before = self
            .atomic(lock_key(ASSIGNMENTS, ass_id), guard)
            .await
            .map_err(|e| StoreError::backend(format!("releasing assignment '{ass_id}'"), e))?;
        match before {
            Some(before) => Ok(Some(assignment_from_document(&before)?)),
            None => {
                // Already released, or no such assignment.
                self.get_assignment(ass_id).await?;
                Ok(None)
            }
        }
    }

    /// Step 2: the amounts back to the worker, while its accounting epoch is still `epoch`. A
    /// crash between the two steps leaves the capacity held (under-used, never
    /// overcommitted); the reconciler recomputes `allocated_*` from the active assignments and
    /// repairs that drift.
    async fn return_reservation(&self, assignment: &Assignment, epoch: Option<i64>) -> Result<()> {
        let ass_id = assignment.ass_id.as_str();
        let amount = assignment.request();
        let mut filter = doc! { "worker_id": &assignment.worker_id };
        at_epoch(&mut filter, epoch.unwrap_or(0));
        let outcome = self
            .atomic(
                lock_key(WORKER_REGISTRY, &assignment.worker_id),
                self.workers.update_one(
                    filter,
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
            match self.find_worker(&assignment.worker_id).await? {
                None => tracing::warn!(
                    ass_id,
                    worker_id = %assignment.worker_id,
                    "released an assignment whose worker no longer exists"
                ),
                Some(_) => tracing::warn!(
                    ass_id,
                    worker_id = %assignment.worker_id,
                    "the reconciler repaired this worker's accounting while the assignment was \
                     being released: its amounts are left to that repair (or the next)"
                ),
            }
        }
        Ok(())
    }

    pub(super) async fn reserve_impl(&self, worker_id: &str, request: &Resources) -> Result<bool> {
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

    pub(super) async fn insert_assignment_impl(&self, assignment: &Assignment) -> Result<()> {
        self.assignments
            .insert_one(assignment_to_document(assignment))
            .await
            .map_err(|e| insert_error(e, "assignment", &assignment.ass_id))?;
        Ok(())
    }

    pub(super) async fn get_assignment_impl(&self, ass_id: &str) -> Result<Assignment> {
        self.assignments
            .find_one(doc! { "ass_id": ass_id })
            .await
            .map_err(|e| StoreError::backend(format!("reading assignment '{ass_id}'"), e))?
            .map(|d| assignment_from_document(&d))
            .transpose()?
            .ok_or_else(|| not_found("assignment", ass_id))
    }

    pub(super) async fn list_assignments_impl(
        &self,
        filter: &AssignmentFilter,
    ) -> Result<Vec<Assignment>> {
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

    /// [`Store::worker_work`]: one aggregation, the worker's active assignments joined with
    /// their tasks by `task_id` (served by the unique `task_id` index). FerretDB 1.x has no
    /// `$lookup`: [`Self::worker_work_ferretdb1`].
    pub(super) async fn worker_work_impl(
        &self,
        worker_id: &str,
    ) -> Result<Vec<(Assignment, Task)>> {
        if let ServerKind::FerretDb1 { .. } = self.server {
            return self.worker_work_ferretdb1(worker_id).await;
        }
        let what = || format!("reading the work of worker '{worker_id}'");
        let pipeline = vec![
            doc! { "$match": { "worker_id": worker_id, "released": { "$ne": true } } },
            doc! { "$lookup": {
                "from": TASKS,
                "localField": "task_id",
                "foreignField": "task_id",
                "as": "task",
            } },
            doc! { "$unwind": "$task" },
            doc! { "$match": { "task.status": TaskStatus::Running.as_str() } },
            doc! { "$sort": { "ass_id": 1 } },
        ];
        let documents: Vec<Document> = self
            .assignments
            .aggregate(pipeline)
            .batch_size(super::LISTING_BATCH)
            .await
            .map_err(|e| StoreError::backend(what(), e))?
            .try_collect()
            .await
            .map_err(|e| StoreError::backend(what(), e))?;
        documents
            .iter()
            .map(work_from_joined)
            .collect::<Result<Vec<_>>>()
            .map(|work| work.into_iter().filter(|(a, t)| a.holds(t)).collect())
    }

    pub(super) async fn release_impl(&self, ass_id: &str, unstarted: bool) -> Result<bool> {
        // The two steps run in a task of their own: a caller dropped between them (an HTTP
        // handler whose client gave up) must not leave the reservation held with the
        // assignment already released, which no retry would then return.
        let store = self.clone();
        let ass_id = ass_id.to_owned();
        tokio::spawn(async move { store.release_in_two_steps(&ass_id, unstarted).await })
            .await
            .map_err(|e| StoreError::backend("releasing an assignment", e.to_string()))?
    }

    pub(super) async fn active_assignment_counts_impl(&self) -> Result<BTreeMap<String, u32>> {
        let pipeline = vec![
            doc! { "$match": { "released": { "$ne": true } } },
            doc! { "$group": { "_id": "$worker_id", "count": { "$sum": 1_i64 } } },
        ];
        let groups: Vec<Document> = self
            .assignments
            .aggregate(pipeline)
            .batch_size(super::LISTING_BATCH)
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

    pub(super) async fn unreserve_impl(
        &self,
        worker_id: &str,
        request: &Resources,
        epoch: Option<i64>,
    ) -> Result<bool> {
        // The mirror of `reserve`: one conditional update, which never takes `allocated_*`
        // below zero.
        let mut filter = doc! {
            "worker_id": worker_id,
            "allocated_cpu": { "$gte": request.cpu },
            "allocated_memory": { "$gte": request.memory },
            "allocated_storage": { "$gte": request.storage },
            "allocated_gpu": { "$gte": request.gpu },
        };
        if let Some(epoch) = epoch {
            at_epoch(&mut filter, epoch);
        }
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

    pub(super) async fn count_assignments_since_impl(&self, since: DateTime<Utc>) -> Result<u64> {
        self.assignments
            .count_documents(doc! { "assigned_at": { "$gte": to_bson_date(since) } })
            .await
            .map_err(|e| StoreError::backend("counting recent assignments", e))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::sync::Arc;

    use crate::{AssignmentStore, WorkerStore};

    use super::super::testing::{assignment, connect_test_store, worker};
    use crate::StoreError;
    use crate::model::Resources;

    /// The reconciler's recount landing between a release's guard and its return (the return
    /// delayed, as a loaded FerretDB 1.x can delay it past the drift's settle time) must not
    /// make the return count twice: allocated never goes below what the active assignments
    /// hold. Without a recount in between, a release returns the amounts as ever.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_release_never_returns_what_a_recount_in_between_already_counted() {
        let Some((store, _db)) = connect_test_store().await else {
            return;
        };
        let one = Resources::new(1.0, 1.0, 0.0, 0.0);
        store
            .insert_worker(&worker("w-epoch", Resources::new(2.0, 2.0, 10.0, 0.0)))
            .await
            .unwrap();
        for ass_id in ["a-epoch", "b-epoch"] {
            assert!(store.reserve("w-epoch", &one).await.unwrap());
            store
                .insert_assignment(&assignment(ass_id, "w-epoch", one))
                .await
                .unwrap();
        }
        // The release of A begins: its epoch, then its guard.
        let epoch = store.accounting_epoch("w-epoch").await.unwrap();
        assert_eq!(epoch, Some(0));
        let a = store.release_guard("a-epoch").await.unwrap().unwrap();
        // The recount sees A released and B active: 1 cpu held.
        let observed = store.get_worker("w-epoch").await.unwrap();
        assert_eq!(observed.allocated_cpu, 2.0);
        assert!(store.repair_allocation(&observed, &one).await.unwrap());
        // A's return arrives late: it is left to the recount that already counted it.
        store.return_reservation(&a, epoch).await.unwrap();
        let after = store.get_worker("w-epoch").await.unwrap();
        assert_eq!((after.allocated_cpu, after.available_cpu), (1.0, 1.0));
        assert!(after.invariant_violations().is_empty(), "{after:?}");
        // B's release, with no recount in between, returns its amounts.
        assert!(store.release("b-epoch").await.unwrap());
        let after = store.get_worker("w-epoch").await.unwrap();
        assert_eq!((after.allocated_cpu, after.available_cpu), (0.0, 2.0));
        assert!(!store.release("b-epoch").await.unwrap(), "once");
        assert_eq!(
            store.get_worker("w-epoch").await.unwrap().allocated_cpu,
            0.0
        );
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
}

/// An assignment and its task from one document of [`MongoStore::worker_work_impl`]'s join:
/// the assignment's fields with the task's under `task`.
pub(super) fn work_from_joined(d: &Document) -> Result<(Assignment, Task)> {
    let task = d.get_document("task").map_err(|e| {
        StoreError::backend("reading a worker's work", format!("no joined task: {e}"))
    })?;
    Ok((assignment_from_document(d)?, task_from_document(task)?))
}

#[cfg(test)]
mod work_tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use crate::conformance::{sample_assignment, sample_task};

    /// What MongoDB's `$lookup` + `$unwind` answers for one assignment (FerretDB 1.x, the test
    /// server, has no `$lookup`): the assignment's fields, its task under `task`.
    #[test]
    fn a_joined_work_document_decodes_to_the_assignment_and_its_task() {
        let mut task = sample_task("task-j", "alice");
        task.status = crate::model::TaskStatus::Running;
        task.attempts = 1;
        let assignment =
            sample_assignment("ass-j", "task-j", "w-j", Resources::new(1.0, 2.0, 0.0, 0.0));
        let mut joined = assignment_to_document(&assignment);
        joined.insert("_id", mongodb::bson::oid::ObjectId::new());
        joined.insert(
            "task",
            super::super::codec::task_to_document(&task).unwrap(),
        );
        let (a, t) = work_from_joined(&joined).unwrap();
        assert_eq!((a, t), (assignment, task));
        joined.remove("task");
        assert!(
            work_from_joined(&joined).is_err(),
            "a document without its task is refused"
        );
    }
}

/// Narrows a worker filter to the accounting epoch `epoch` (a worker never recounted has no
/// `accounting_epoch` field: epoch 0).
fn at_epoch(filter: &mut Document, epoch: i64) {
    match epoch {
        0 => filter.insert(
            "$or",
            vec![
                doc! { "accounting_epoch": 0_i64 },
                doc! { "accounting_epoch": { "$exists": false } },
            ],
        ),
        n => filter.insert("accounting_epoch", n),
    };
}
