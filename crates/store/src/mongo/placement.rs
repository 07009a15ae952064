//! A placement round on MongoDB: the batched steps of [`place_in_steps`] as multi-document
//! commands. Claiming the round is one `updateMany` (one per distinct attempt count, almost
//! always one), the assignments one unordered `insertMany`, marking them running one
//! `updateMany` guarded by the round's claim; each worker is reserved once with the
//! conditional `$inc` of [`Store::reserve`]. A shortfall (some task claimed or moved
//! elsewhere) costs one more `find` to learn which. Every document of a multi-document write is
//! updated atomically on its own, which is all the protocol needs: the crash points between the
//! steps are those of [`crate::placement`].
//!
//! FerretDB 1.x applies an update as read-then-replace, so a multi-document update racing
//! another is not conditional there: [`super::compat`] places task by task under its locks.
//!
//! [`place_in_steps`]: crate::placement::place_in_steps

use std::collections::{BTreeMap, BTreeSet};

use chrono::{DateTime, Utc};
use futures::TryStreamExt;
use mongodb::bson::{Bson, Document, doc};

use super::codec::{Reader, assignment_to_document, to_bson_date};
use super::{MongoStore, ServerKind, TASKS};
use crate::model::{Assignment, TaskStatus};
use crate::placement::{PlacementSteps, RoundOutcome, RoundPlan, place_in_steps};
use crate::{Result, StoreError};

impl MongoStore {
    pub(super) async fn place_round_impl(&self, plan: &RoundPlan) -> Result<RoundOutcome> {
        match self.server {
            ServerKind::MongoDb => place_in_steps(self, self, plan).await,
            ServerKind::FerretDb1 { .. } => self.place_round_ferretdb1(plan).await,
        }
    }

    /// The ids among `ids` whose document matches `filter` too (the read after a shortfall).
    async fn task_ids_where(
        &self,
        ids: &[&str],
        filter: Document,
        what: &str,
    ) -> Result<BTreeSet<String>> {
        let mut filter = filter;
        filter.insert("task_id", doc! { "$in": ids.to_vec() });
        let documents: Vec<Document> = self
            .tasks
            .find(filter)
            .projection(doc! { "task_id": 1, "_id": 0 })
            .batch_size(u32::try_from(ids.len()).unwrap_or(u32::MAX).max(1))
            .await
            .map_err(|e| StoreError::backend(what.to_string(), e))?
            .try_collect()
            .await
            .map_err(|e| StoreError::backend(what.to_string(), e))?;
        documents
            .iter()
            .map(|d| Reader::new(d, TASKS).string("task_id"))
            .collect()
    }
}

impl MongoStore {
    /// One `updateMany` per group of task ids (`update(n, ids)` gives its filter and change):
    /// the ids it applied to. All of a group when the update matched as many tasks as it
    /// names; else those that match `applied` afterwards (one `find`).
    async fn update_groups<F>(
        &self,
        groups: BTreeMap<u32, Vec<&str>>,
        update: F,
        applied: Document,
        what: &str,
    ) -> Result<BTreeSet<String>>
    where
        F: Fn(u32, Vec<&str>) -> (Document, Document) + Send + Sync,
    {
        let mut done = BTreeSet::new();
        for (n, ids) in groups {
            let (filter, change) = update(n, ids.clone());
            let outcome = self
                .tasks
                .update_many(filter, change)
                .await
                .map_err(|e| StoreError::backend(format!("{what} ({} tasks)", ids.len()), e))?;
            if outcome.matched_count == ids.len() as u64 {
                done.extend(ids.iter().map(|id| id.to_string()));
            } else {
                let read = format!("reading which tasks applied after {what}");
                done.extend(self.task_ids_where(&ids, applied.clone(), &read).await?);
            }
        }
        Ok(done)
    }
}

/// Groups `(task_id, n)` pairs by `n`.
fn by_count<'a>(pairs: impl IntoIterator<Item = (&'a str, u32)>) -> BTreeMap<u32, Vec<&'a str>> {
    let mut groups: BTreeMap<u32, Vec<&str>> = BTreeMap::new();
    for (id, n) in pairs {
        groups.entry(n).or_default().push(id);
    }
    groups
}

#[async_trait::async_trait]
impl PlacementSteps for MongoStore {
    async fn claim_tasks(
        &self,
        tasks: &[(String, u32)],
        owner: &str,
        lease_until: DateTime<Utc>,
        now: DateTime<Utc>,
    ) -> Result<BTreeSet<String>> {
        let groups = by_count(tasks.iter().map(|(id, n)| (id.as_str(), *n)));
        self.update_groups(
            groups,
            |attempts, ids| {
                (
                    doc! {
                        "task_id": { "$in": ids },
                        "status": TaskStatus::Queued.as_str(),
                        "attempts": i64::from(attempts),
                        "$or": [
                            // `null` matches a missing field as well as an explicit null.
                            { "owner": Bson::Null },
                            { "owner": owner },
                            { "lease_expires_at": { "$lt": to_bson_date(now) } },
                        ],
                    },
                    doc! { "$set": {
                        "owner": owner,
                        "lease_expires_at": to_bson_date(lease_until),
                        "updated_at": to_bson_date(now),
                    } },
                )
            },
            doc! { "owner": owner },
            "claiming a round's tasks",
        )
        .await
    }

    async fn insert_assignments(&self, assignments: &[Assignment]) -> Result<()> {
        if assignments.is_empty() {
            return Ok(());
        }
        self.assignments
            .insert_many(assignments.iter().map(assignment_to_document))
            .ordered(false)
            .await
            .map(drop)
            .map_err(|e| {
                StoreError::backend(
                    format!("inserting a round's {} assignments", assignments.len()),
                    e,
                )
            })
    }

    async fn mark_claimed_running(
        &self,
        owner: &str,
        assignments: &[Assignment],
        at: DateTime<Utc>,
    ) -> Result<BTreeSet<String>> {
        let groups = by_count(assignments.iter().map(|a| (a.task_id.as_str(), a.attempt)));
        self.update_groups(
            groups,
            |attempt, ids| {
                (
                    doc! {
                        "task_id": { "$in": ids },
                        "status": TaskStatus::Queued.as_str(),
                        "owner": owner,
                        "attempts": i64::from(attempt.saturating_sub(1)),
                    },
                    doc! {
                        "$set": {
                            "status": TaskStatus::Running.as_str(),
                            "attempts": i64::from(attempt),
                            "updated_at": to_bson_date(at),
                            "placed_by": owner,
                        },
                        "$unset": { "owner": "", "lease_expires_at": "", "status_reason": "" },
                    },
                )
            },
            // `placed_by` stays with the attempt, whatever happened to the task since.
            doc! { "placed_by": owner },
            "marking a round's tasks running",
        )
        .await
    }
}
