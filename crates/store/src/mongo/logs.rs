//! TASK_LOGS: the live output of running tasks, one document per chunk.

use futures::TryStreamExt;
use mongodb::bson::{Document, doc};

use super::codec::{Reader, u64_to_bson};
use super::{MongoStore, TASK_LOGS, is_duplicate_key};
use crate::{Result, StoreError, TaskLogChunk};

impl MongoStore {
    pub(super) async fn insert_log_chunk_impl(&self, chunk: &TaskLogChunk) -> Result<bool> {
        let written = self
            .task_logs
            .insert_one(doc! {
                "task_id": &chunk.task_id,
                "attempt": i64::from(chunk.attempt),
                "seq": u64_to_bson(chunk.seq, "seq")?,
                "stream": &chunk.stream,
                "text": &chunk.text,
            })
            .await;
        match written {
            Ok(_) => Ok(true),
            Err(e) if is_duplicate_key(&e) => Ok(false),
            Err(e) => Err(StoreError::backend(
                format!("storing a log chunk of '{}'", chunk.task_id),
                e,
            )),
        }
    }

    pub(super) async fn list_log_chunks_impl(
        &self,
        task_id: &str,
        after: Option<(u32, u64)>,
        limit: u32,
    ) -> Result<Vec<TaskLogChunk>> {
        let filter = match after {
            Some((attempt, seq)) => doc! {
                "task_id": task_id,
                "$or": [
                    { "attempt": { "$gt": i64::from(attempt) } },
                    { "attempt": i64::from(attempt), "seq": { "$gt": u64_to_bson(seq, "seq")? } },
                ],
            },
            None => doc! { "task_id": task_id },
        };
        let what = || format!("listing the log chunks of '{task_id}'");
        let documents: Vec<Document> = self
            .task_logs
            .find(filter)
            .sort(doc! { "attempt": 1, "seq": 1 })
            .limit(i64::from(limit))
            .await
            .map_err(|e| StoreError::backend(what(), e))?
            .try_collect()
            .await
            .map_err(|e| StoreError::backend(what(), e))?;
        documents
            .iter()
            .map(|d| {
                let r = Reader::new(d, TASK_LOGS);
                Ok(TaskLogChunk {
                    task_id: r.string("task_id")?,
                    attempt: r.int("attempt")?,
                    seq: r.int("seq")?,
                    stream: r.string("stream")?,
                    text: r.string("text")?,
                })
            })
            .collect()
    }
}
