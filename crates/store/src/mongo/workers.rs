//! Workers: registration, heartbeats, draining and activity, deletion, and the reconciler's
//! conditional repairs of a worker's document.

use futures::TryStreamExt;
use mongodb::bson::{Document, doc};
use mongodb::options::ReturnDocument;

use super::codec::{to_bson_date, usage_to_document, worker_from_document, worker_to_document};
use super::compat::lock_key;
use super::{LISTING_BATCH, MongoStore, WORKER_REGISTRY, insert_error, not_found};
use crate::WorkerStore;
use crate::model::{self, Resources, Worker, WorkerUsage};
use crate::{Result, StoreError};

impl MongoStore {
    pub(super) async fn find_worker(&self, worker_id: &str) -> Result<Option<Worker>> {
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

    pub(super) async fn insert_worker_impl(&self, worker: &Worker) -> Result<()> {
        self.workers
            .insert_one(worker_to_document(worker))
            .await
            .map_err(|e| insert_error(e, "worker", &worker.worker_id))?;
        Ok(())
    }

    pub(super) async fn get_worker_impl(&self, worker_id: &str) -> Result<Worker> {
        self.find_worker(worker_id)
            .await?
            .ok_or_else(|| not_found("worker", worker_id))
    }

    pub(super) async fn list_workers_impl(&self) -> Result<Vec<Worker>> {
        let documents: Vec<Document> = self
            .workers
            .find(doc! {})
            .sort(doc! { "worker_id": 1 })
            // The whole registry in one reply (up to the server's 16 MiB per batch): the
            // scheduler reads it every round.
            .batch_size(LISTING_BATCH)
            .await
            .map_err(|e| StoreError::backend("listing workers", e))?
            .try_collect()
            .await
            .map_err(|e| StoreError::backend("reading the worker listing", e))?;
        documents.iter().map(worker_from_document).collect()
    }

    pub(super) async fn heartbeat_impl(
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

    pub(super) async fn set_draining_impl(
        &self,
        worker_id: &str,
        draining: bool,
    ) -> Result<Worker> {
        let update = doc! { "$set": {
            "draining": draining,
            "updated_at": to_bson_date(model::now()),
        } };
        self.update_worker(worker_id, update, "setting draining")
            .await
    }

    pub(super) async fn set_worker_active_impl(
        &self,
        worker_id: &str,
        active: bool,
    ) -> Result<Worker> {
        let update = doc! { "$set": {
            "is_active": active,
            "updated_at": to_bson_date(model::now()),
        } };
        self.update_worker(worker_id, update, "setting is_active")
            .await
    }

    pub(super) async fn delete_worker_impl(&self, worker_id: &str) -> Result<()> {
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

    pub(super) async fn mark_worker_lost_impl(
        &self,
        worker_id: &str,
        heartbeat_before: i64,
    ) -> Result<bool> {
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

    pub(super) async fn repair_allocation_impl(
        &self,
        observed: &Worker,
        allocated: &Resources,
    ) -> Result<bool> {
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
        }, "$inc": { "accounting_epoch": 1_i64 } };
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
}
