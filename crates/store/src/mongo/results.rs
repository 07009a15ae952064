//! RESULTS: one result per task, and the recent runtimes the placement policies learn from.

use futures::TryStreamExt;
use mongodb::bson::{Document, doc};

use super::codec::{Reader, result_from_document, result_to_document};
use super::{MongoStore, RESULTS, insert_error, not_found};
use crate::model::{ResultStatus, TaskResult};
use crate::{Result, RuntimeSample, StoreError};

impl MongoStore {
    pub(super) async fn insert_result_impl(&self, result: &TaskResult) -> Result<()> {
        self.results
            .insert_one(result_to_document(result))
            .await
            .map_err(|e| insert_error(e, "result", &result.task_id))?;
        Ok(())
    }

    pub(super) async fn get_result_impl(&self, task_id: &str) -> Result<TaskResult> {
        self.results
            .find_one(doc! { "task_id": task_id })
            .await
            .map_err(|e| StoreError::backend(format!("reading the result of '{task_id}'"), e))?
            .map(|d| result_from_document(&d))
            .transpose()?
            .ok_or_else(|| not_found("result", task_id))
    }

    pub(super) async fn recent_runtimes_impl(&self, limit: u32) -> Result<Vec<RuntimeSample>> {
        let what = "reading recent runtimes";
        let documents: Vec<Document> = self
            .results
            .find(doc! {
                "status": ResultStatus::Success.as_str(),
                "runtime_s": { "$exists": true },
                "task_type": { "$exists": true },
            })
            .sort(doc! { "completed_at": -1, "task_id": -1 })
            .limit(i64::from(limit))
            .projection(doc! { "worker_id": 1, "task_type": 1, "runtime_s": 1 })
            .await
            .map_err(|e| StoreError::backend(what, e))?
            .try_collect()
            .await
            .map_err(|e| StoreError::backend(what, e))?;
        documents
            .iter()
            .map(|d| {
                let r = Reader::new(d, RESULTS);
                Ok(RuntimeSample {
                    worker_id: r.string("worker_id")?,
                    task_type: r.string("task_type")?,
                    runtime_s: r.f64("runtime_s")?,
                })
            })
            .collect()
    }
}
