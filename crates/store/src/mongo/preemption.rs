//! Preemption on MongoDB: victims asked to stop (one conditional update each: they are a few
//! per round), the tasks a preemption may stop (a range of the running tasks by priority, then
//! their assignments by task id) and the preemptions under way (an aggregation).

use std::collections::{BTreeMap, HashMap};

use futures::TryStreamExt;
use mongodb::bson::{Document, doc};

use super::codec::{Reader, assignment_from_document, task_from_document, to_bson_date};
use super::compat::lock_key;
use super::{MongoStore, TASKS};
use crate::model::{self, Assignment, Task, TaskStatus};
use crate::{Result, StoreError};

impl MongoStore {
    pub(super) async fn request_preemption_impl(
        &self,
        victims: &[(String, u32)],
        by: &str,
        reason: &str,
    ) -> Result<Vec<String>> {
        let mut marked = Vec::with_capacity(victims.len());
        for (task_id, attempt) in victims {
            let filter = doc! {
                "task_id": task_id.as_str(),
                "status": TaskStatus::Running.as_str(),
                "attempts": i64::from(*attempt),
                // An attempt left to run it again (`attempts < max_attempts`).
                "max_attempts": { "$gt": i64::from(*attempt) },
                "preemptible": { "$ne": false },
                "cancel_requested": { "$ne": true },
            };
            let update = doc! { "$set": {
                "cancel_requested": true,
                "preempted_by": by,
                "status_reason": reason,
                "updated_at": to_bson_date(model::now()),
            } };
            let outcome = self
                .atomic(
                    lock_key(TASKS, task_id),
                    self.tasks.update_one(filter, update),
                )
                .await
                .map_err(|e| {
                    StoreError::backend(
                        format!("asking task '{task_id}' to stop for a preemption"),
                        e,
                    )
                })?;
            if outcome.modified_count == 1 {
                marked.push(task_id.clone());
            }
        }
        Ok(marked)
    }

    pub(super) async fn preemptible_running_impl(
        &self,
        below_priority: i32,
        limit: u32,
    ) -> Result<Vec<(Task, Assignment)>> {
        let what = "reading the tasks a preemption may stop";
        let documents: Vec<Document> = self
            .tasks
            .find(doc! {
                "status": TaskStatus::Running.as_str(),
                "priority": { "$lt": below_priority },
                "preemptible": { "$ne": false },
                "cancel_requested": { "$ne": true },
            })
            .sort(doc! { "priority": 1, "task_id": 1 })
            .limit(i64::from(limit))
            .await
            .map_err(|e| StoreError::backend(what, e))?
            .try_collect()
            .await
            .map_err(|e| StoreError::backend(what, e))?;
        // Only those with an attempt left to run again (a comparison of two fields, which
        // FerretDB 1.x cannot filter on: done here).
        let tasks: Vec<Task> = documents
            .iter()
            .map(task_from_document)
            .collect::<Result<Vec<Task>>>()?
            .into_iter()
            .filter(|t| t.attempts < t.max_attempts)
            .collect();
        if tasks.is_empty() {
            return Ok(Vec::new());
        }
        let ids: Vec<&str> = tasks.iter().map(|t| t.task_id.as_str()).collect();
        let documents: Vec<Document> = self
            .assignments
            .find(doc! { "task_id": { "$in": ids }, "released": { "$ne": true } })
            .await
            .map_err(|e| StoreError::backend(what, e))?
            .try_collect()
            .await
            .map_err(|e| StoreError::backend(what, e))?;
        let mut by_task: HashMap<String, Vec<Assignment>> = HashMap::new();
        for d in &documents {
            let a = assignment_from_document(d)?;
            by_task.entry(a.task_id.clone()).or_default().push(a);
        }
        Ok(tasks
            .into_iter()
            .filter_map(|task| {
                let assignment = by_task
                    .remove(&task.task_id)?
                    .into_iter()
                    .find(|a| a.holds(&task))?;
                Some((task, assignment))
            })
            .collect())
    }

    pub(super) async fn preemptions_in_progress_impl(&self) -> Result<BTreeMap<String, u32>> {
        let what = "reading the preemptions in progress";
        let pipeline = vec![
            doc! { "$match": {
                "status": TaskStatus::Running.as_str(),
                "preempted_by": { "$type": "string" },
            } },
            doc! { "$group": { "_id": "$preempted_by", "count": { "$sum": 1_i64 } } },
        ];
        let groups: Vec<Document> = self
            .tasks
            .aggregate(pipeline)
            .await
            .map_err(|e| StoreError::backend(what, e))?
            .try_collect()
            .await
            .map_err(|e| StoreError::backend(what, e))?;
        groups
            .iter()
            .map(|d| {
                let r = Reader::new(d, TASKS);
                let by = r.string("_id")?;
                let count: i64 = r.opt_int("count")?.unwrap_or(0);
                Ok((by, u32::try_from(count).unwrap_or(u32::MAX)))
            })
            .collect()
    }
}
