//! Tasks: submission (idempotent or not), listings, the conditional state transitions and
//! claims, and the scheduler's reads of the queue and of users' usage.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use futures::TryStreamExt;
use mongodb::bson::{self, Bson, Document, doc};
use mongodb::options::ReturnDocument;

use super::codec::{Reader, add_open_count, task_from_document, task_to_document, to_bson_date};
use super::compat::lock_key;
use super::{IDEMPOTENCY_KEYS, MongoStore, TASKS, insert_error, is_duplicate_key, not_found};
use crate::TaskStore;
use crate::model::Usage;
use crate::model::{self, Dependency, Resources, Task, TaskStatus};
use crate::{
    ArraySummary, IdempotencyKey, Result, StoreError, SubmitOutcome, TaskCounts, TaskPage,
    TaskQuery, TaskUpdate,
};

impl MongoStore {
    async fn find_task(&self, task_id: &str) -> Result<Option<Task>> {
        self.tasks
            .find_one(doc! { "task_id": task_id })
            .await
            .map_err(|e| StoreError::backend(format!("reading task '{task_id}'"), e))?
            .map(|d| task_from_document(&d))
            .transpose()
    }

    /// A conditional transition (see [`Store::transition_task`]); with `attempt`, only while
    /// the task's `attempts` equals it.
    pub(super) async fn transition(
        &self,
        task_id: &str,
        attempt: Option<u32>,
        from: &[TaskStatus],
        to: TaskStatus,
        update: &TaskUpdate,
    ) -> Result<Task> {
        let from_names: Vec<&str> = from.iter().map(|s| s.as_str()).collect();
        let mut filter = doc! { "task_id": task_id, "status": { "$in": from_names.clone() } };
        if let Some(attempt) = attempt {
            filter.insert("attempts", i64::from(attempt));
        }
        let changes = transition_changes(to, update, model::now());

        let mut expected = if from.is_empty() {
            "(no state)".to_owned()
        } else {
            from_names.join(" or ")
        };
        if let Some(attempt) = attempt {
            expected = format!("{expected} at attempt {attempt}");
        }
        let mut actual = String::new();
        // The re-read after a miss can find the task back in an expected state (it moved away
        // and back in between): then the update is simply tried again.
        for _ in 0..3 {
            let after = self
                .atomic(
                    lock_key(TASKS, task_id),
                    self.tasks
                        .find_one_and_update(filter.clone(), changes.clone())
                        .return_document(ReturnDocument::After),
                )
                .await
                .map_err(|e| StoreError::backend(format!("moving task '{task_id}' to {to}"), e))?;
            if let Some(d) = after {
                return task_from_document(&d);
            }
            let task = self.get_task(task_id).await?;
            let status = task.status;
            actual = status.as_str().to_owned();
            if let Some(attempt) = attempt {
                actual = format!("{actual} at attempt {}", task.attempts);
                if task.attempts != attempt {
                    break;
                }
            }
            if !from.contains(&status) {
                break;
            }
        }
        Err(StoreError::Conflict {
            kind: "task",
            id: task_id.to_owned(),
            expected,
            actual,
        })
    }

    /// Inserts `tasks` (one, or the tasks of one new array): `AlreadyExists` when a `task_id`
    /// is taken. An array is one unordered `insertMany`; when it fails, the tasks it did
    /// insert are removed again (best effort: they are still pending, nothing ran).
    async fn insert_task_documents(&self, tasks: &[Task]) -> Result<()> {
        let [task] = tasks else {
            let documents = tasks
                .iter()
                .map(task_to_document)
                .collect::<Result<Vec<_>>>()?;
            let Some(first) = tasks.first() else {
                return Ok(());
            };
            let Err(e) = self.tasks.insert_many(documents).ordered(false).await else {
                return Ok(());
            };
            // The array's id is new: every task that has it is one this call inserted.
            if let Some(array_id) = &first.array_id {
                let removed = self
                    .tasks
                    .delete_many(doc! {
                        "array_id": array_id,
                        "status": TaskStatus::Pending.as_str(),
                    })
                    .await;
                if let Err(error) = removed {
                    tracing::warn!(%array_id, %error, "removing a partly inserted array");
                }
            }
            return Err(if only_duplicates(&e) {
                StoreError::AlreadyExists {
                    kind: "task",
                    id: first.task_id.clone(),
                }
            } else {
                StoreError::backend(
                    format!("inserting the {} tasks of an array", tasks.len()),
                    e,
                )
            });
        };
        let document = task_to_document(task)?;
        self.tasks
            .insert_one(document)
            .await
            .map_err(|e| insert_error(e, "task", &task.task_id))?;
        Ok(())
    }

    /// The idempotent submission of `tasks` (one, or one array's): the key document, naming
    /// the first task, is inserted first and is the once-only guard; the tasks follow. See
    /// [`Store::insert_task`].
    async fn insert_tasks_idempotent(
        &self,
        tasks: &[Task],
        idem: &IdempotencyKey,
    ) -> Result<SubmitOutcome> {
        let Some(task) = tasks.first() else {
            return Err(StoreError::backend(
                "inserting tasks",
                "at least one task is needed",
            ));
        };
        let key_id = format!("{}/{}", task.user_id, idem.key);
        let mut key_doc = doc! {
            "_id": &key_id,
            "user_id": &task.user_id,
            "key": &idem.key,
            "task_id": &task.task_id,
            "request_sha256": &idem.request_sha256,
            "created_at": to_bson_date(task.created_at),
        };
        if let Some(array_id) = &task.array_id {
            key_doc.insert("array_id", array_id);
        }
        match self.idempotency.insert_one(key_doc).await {
            Ok(_) => match self.insert_task_documents(tasks).await {
                Ok(()) => Ok(SubmitOutcome {
                    task: task.clone(),
                    created: true,
                }),
                Err(StoreError::AlreadyExists { kind, id }) => {
                    // Either a concurrent retry with the same key recovered this task first
                    // (see below), or the task id belongs to another task: then the key must
                    // not keep pointing at it.
                    if let Some(existing) = self.find_task(&task.task_id).await?
                        && existing.user_id == task.user_id
                        && existing.idempotency_key.as_deref() == Some(idem.key.as_str())
                    {
                        return Ok(SubmitOutcome {
                            task: existing,
                            created: false,
                        });
                    }
                    self.atomic(
                        lock_key(IDEMPOTENCY_KEYS, &key_id),
                        self.idempotency
                            .delete_one(doc! { "_id": &key_id, "task_id": &task.task_id }),
                    )
                    .await
                    .map_err(|e| {
                        StoreError::backend(format!("removing idempotency key '{key_id}'"), e)
                    })?;
                    Err(StoreError::AlreadyExists { kind, id })
                }
                Err(other) => Err(other),
            },
            Err(e) if is_duplicate_key(&e) => {
                let stored = self
                    .idempotency
                    .find_one(doc! { "_id": &key_id })
                    .await
                    .map_err(|e| {
                        StoreError::backend(format!("reading idempotency key '{key_id}'"), e)
                    })?
                    .ok_or_else(|| {
                        StoreError::backend(
                            format!("reading idempotency key '{key_id}'"),
                            "the key was reported as a duplicate but cannot be found",
                        )
                    })?;
                let r = Reader::new(&stored, IDEMPOTENCY_KEYS);
                let first_task_id = r.string("task_id")?;
                if r.string("request_sha256")? != idem.request_sha256 {
                    return Err(StoreError::IdempotencyMismatch {
                        key: idem.key.clone(),
                        task_id: first_task_id,
                    });
                }
                // The tasks under the ids the key promised.
                let recovered: Vec<Task> = match r.opt_string("array_id")? {
                    Some(array_id) => {
                        let count = u32::try_from(tasks.len()).unwrap_or(u32::MAX);
                        tasks
                            .iter()
                            .map(|t| {
                                model::array_task(t, &array_id, t.array_index.unwrap_or(0), count)
                            })
                            .collect()
                    }
                    None => {
                        let mut one = task.clone();
                        one.task_id = first_task_id.clone();
                        vec![one]
                    }
                };
                let existing = self.find_task(&first_task_id).await?;
                if recovered.len() > 1 {
                    // An array whose first submission ended part way (or before its tasks):
                    // the retry completes it; the tasks already there are left as they are.
                    self.complete_array(&recovered).await?;
                    let first = match existing {
                        Some(first) => first,
                        None => self
                            .find_task(&first_task_id)
                            .await?
                            .ok_or_else(|| not_found("task", &first_task_id))?,
                    };
                    return Ok(SubmitOutcome {
                        task: first,
                        created: false,
                    });
                }
                if let Some(existing) = existing {
                    return Ok(SubmitOutcome {
                        task: existing,
                        created: false,
                    });
                }
                // The first submission crashed between inserting the key and the task: finish
                // it now, under the id the key promised.
                match self.insert_task_documents(&recovered).await {
                    Ok(()) => Ok(SubmitOutcome {
                        task: recovered[0].clone(),
                        created: true,
                    }),
                    // Another retry recovered it at the same moment.
                    Err(StoreError::AlreadyExists { .. }) => Ok(SubmitOutcome {
                        task: self
                            .find_task(&first_task_id)
                            .await?
                            .ok_or_else(|| not_found("task", &first_task_id))?,
                        created: false,
                    }),
                    Err(other) => Err(other),
                }
            }
            Err(e) => Err(StoreError::backend(
                format!("inserting idempotency key '{key_id}'"),
                e,
            )),
        }
    }

    /// Inserts those of an array's `tasks` that are missing (the others are duplicates).
    async fn complete_array(&self, tasks: &[Task]) -> Result<()> {
        let documents = tasks
            .iter()
            .map(task_to_document)
            .collect::<Result<Vec<_>>>()?;
        match self.tasks.insert_many(documents).ordered(false).await {
            Ok(_) => Ok(()),
            Err(e) if only_duplicates(&e) => Ok(()),
            Err(e) => Err(StoreError::backend("completing an array's tasks", e)),
        }
    }

    pub(super) async fn insert_task_impl(
        &self,
        task: &Task,
        idempotency: Option<&IdempotencyKey>,
    ) -> Result<SubmitOutcome> {
        self.insert_tasks_impl(std::slice::from_ref(task), idempotency)
            .await
    }

    pub(super) async fn insert_tasks_impl(
        &self,
        tasks: &[Task],
        idempotency: Option<&IdempotencyKey>,
    ) -> Result<SubmitOutcome> {
        let Some(first) = tasks.first() else {
            return Err(StoreError::backend(
                "inserting tasks",
                "at least one task is needed",
            ));
        };
        match idempotency {
            Some(idem) => self.insert_tasks_idempotent(tasks, idem).await,
            None => {
                self.insert_task_documents(tasks).await?;
                Ok(SubmitOutcome {
                    task: first.clone(),
                    created: true,
                })
            }
        }
    }

    /// [`Store::transition_tasks`]: on MongoDB one `updateMany` per 1,000 tasks, stamped with
    /// one `updated_at`, then one read of the tasks that carry the new state and that stamp
    /// (the ones this call moved). On FerretDB 1.x, whose updates are not atomic, and for a
    /// transition to the state it starts from (no stamp tells it apart), one task at a time.
    pub(super) async fn transition_tasks_impl(
        &self,
        task_ids: &[String],
        from: &[TaskStatus],
        to: TaskStatus,
        update: &TaskUpdate,
    ) -> Result<Vec<Task>> {
        if self.serializes_writes() || from.contains(&to) {
            let mut moved = Vec::with_capacity(task_ids.len());
            for task_id in task_ids {
                match self.transition(task_id, None, from, to, update).await {
                    Ok(task) => moved.push(task),
                    Err(StoreError::Conflict { .. } | StoreError::NotFound { .. }) => {}
                    Err(other) => return Err(other),
                }
            }
            return Ok(moved);
        }
        let what = || format!("moving {} tasks to {to}", task_ids.len());
        let from_names: Vec<&str> = from.iter().map(|s| s.as_str()).collect();
        let stamp = model::now();
        let changes = transition_changes(to, update, stamp);
        let mut moved = Vec::with_capacity(task_ids.len());
        for chunk in task_ids.chunks(1_000) {
            self.tasks
                .update_many(
                    doc! { "task_id": { "$in": chunk }, "status": { "$in": from_names.clone() } },
                    changes.clone(),
                )
                .await
                .map_err(|e| StoreError::backend(what(), e))?;
            let documents: Vec<Document> = self
                .tasks
                .find(doc! {
                    "task_id": { "$in": chunk },
                    "status": to.as_str(),
                    "updated_at": to_bson_date(stamp),
                })
                .await
                .map_err(|e| StoreError::backend(what(), e))?
                .try_collect()
                .await
                .map_err(|e| StoreError::backend(what(), e))?;
            for document in &documents {
                moved.push(task_from_document(document)?);
            }
        }
        Ok(moved)
    }

    pub(super) async fn awaiting_dependency_sets_impl(
        &self,
        limit: u32,
    ) -> Result<Vec<Vec<Dependency>>> {
        let what = "reading what waiting tasks await";
        let pipeline = vec![
            doc! { "$match": {
                "status": TaskStatus::Pending.as_str(),
                "awaiting_dependencies": true,
            } },
            doc! { "$group": { "_id": "$after" } },
            doc! { "$limit": i64::from(limit) },
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
            .filter_map(|group| group.get("_id").cloned())
            .filter(|after| !matches!(after, Bson::Null))
            .map(|after| {
                bson::deserialize_from_bson(after)
                    .map_err(|e| StoreError::backend("decoding a task's dependencies", e))
            })
            .collect()
    }

    pub(super) async fn awaiting_tasks_impl(
        &self,
        dependencies: &[Dependency],
        limit: u32,
        after: Option<&str>,
    ) -> Result<Vec<Task>> {
        let what = "reading the tasks awaiting dependencies";
        let key = bson::serialize_to_bson(&dependencies)
            .map_err(|e| StoreError::backend("encoding task dependencies", e))?;
        let documents: Vec<Document> = self
            .tasks
            .find(doc! {
                "status": TaskStatus::Pending.as_str(),
                "awaiting_dependencies": true,
                "after": key,
                "task_id": { "$gt": after.unwrap_or_default() },
            })
            .sort(doc! { "task_id": 1 })
            .limit(i64::from(limit))
            .await
            .map_err(|e| StoreError::backend(what, e))?
            .try_collect()
            .await
            .map_err(|e| StoreError::backend(what, e))?;
        documents.iter().map(task_from_document).collect()
    }

    /// One conditional update per task (under FerretDB 1.x's per-document lock): a batch is
    /// as large as the tasks whose dependencies were just met.
    pub(super) async fn release_tasks_impl(&self, task_ids: &[String]) -> Result<Vec<Task>> {
        let mut released = Vec::with_capacity(task_ids.len());
        for task_id in task_ids {
            let update = self.tasks.find_one_and_update(
                doc! {
                    "task_id": task_id,
                    "status": TaskStatus::Pending.as_str(),
                    "awaiting_dependencies": true,
                },
                doc! {
                    "$set": { "awaiting_dependencies": false, "updated_at": to_bson_date(model::now()) },
                    "$unset": { "status_reason": "" },
                },
            );
            let document = self
                .atomic(
                    lock_key(TASKS, task_id),
                    update.return_document(ReturnDocument::After),
                )
                .await
                .map_err(|e| StoreError::backend(format!("releasing task '{task_id}'"), e))?;
            if let Some(document) = document {
                released.push(task_from_document(&document)?);
            }
        }
        Ok(released)
    }

    pub(super) async fn array_summary_impl(&self, array_id: &str) -> Result<ArraySummary> {
        let what = "reading an array";
        let first = self
            .tasks
            .find_one(doc! { "array_id": array_id })
            .sort(doc! { "array_id": 1, "array_index": 1 })
            .await
            .map_err(|e| StoreError::backend(what, e))?
            .map(|d| task_from_document(&d))
            .transpose()?
            .ok_or_else(|| not_found("array", array_id))?;
        let counts = self
            .count_by_status(Some(doc! { "array_id": array_id }), what)
            .await?;
        Ok(ArraySummary {
            array_id: array_id.to_string(),
            user_id: first.user_id,
            created_at: first.created_at,
            docker_image: first.docker_image,
            counts,
        })
    }

    pub(super) async fn get_task_impl(&self, task_id: &str) -> Result<Task> {
        self.find_task(task_id)
            .await?
            .ok_or_else(|| not_found("task", task_id))
    }

    pub(super) async fn list_tasks_impl(&self, query: &TaskQuery) -> Result<TaskPage> {
        if query.limit == 0 {
            return Ok(TaskPage {
                tasks: Vec::new(),
                next: None,
            });
        }
        let mut filter = Document::new();
        if let Some(status) = query.status {
            filter.insert("status", status.as_str());
        }
        if let Some(user_id) = &query.user_id {
            filter.insert("user_id", user_id.as_str());
        }
        if let Some(array_id) = &query.array_id {
            filter.insert("array_id", array_id.as_str());
        }
        if let Some(after) = &query.after {
            let at = to_bson_date(after.created_at);
            filter.insert(
                "$or",
                vec![
                    Bson::Document(doc! { "created_at": { "$lt": at } }),
                    Bson::Document(
                        doc! { "created_at": at, "task_id": { "$lt": after.task_id.as_str() } },
                    ),
                ],
            );
        }
        let limit = i64::from(query.limit);
        let documents: Vec<Document> = self
            .tasks
            .find(filter)
            .sort(doc! { "created_at": -1, "task_id": -1 })
            // One more than asked, to know whether a next page exists.
            .limit(limit + 1)
            .await
            .map_err(|e| StoreError::backend("listing tasks", e))?
            .try_collect()
            .await
            .map_err(|e| StoreError::backend("reading the task listing", e))?;
        let tasks = documents
            .iter()
            .map(task_from_document)
            .collect::<Result<Vec<_>>>()?;
        Ok(TaskPage::from_overfetched(tasks, query.limit))
    }

    pub(super) async fn claim_task_impl(
        &self,
        task_id: &str,
        owner: &str,
        lease_until: DateTime<Utc>,
        now: DateTime<Utc>,
    ) -> Result<Task> {
        let filter = doc! {
            "task_id": task_id,
            "status": TaskStatus::Queued.as_str(),
            "$or": [
                // `null` matches a missing field as well as an explicit null.
                { "owner": Bson::Null },
                { "owner": owner },
                { "lease_expires_at": { "$lt": to_bson_date(now) } },
            ],
        };
        let changes = doc! { "$set": {
            "owner": owner,
            "lease_expires_at": to_bson_date(lease_until),
            "updated_at": to_bson_date(model::now()),
        } };
        let after = self
            .atomic(
                lock_key(TASKS, task_id),
                self.tasks
                    .find_one_and_update(filter, changes)
                    .return_document(ReturnDocument::After),
            )
            .await
            .map_err(|e| StoreError::backend(format!("claiming task '{task_id}'"), e))?;
        match after {
            Some(d) => task_from_document(&d),
            None => {
                let actual = self.get_task(task_id).await?;
                let actual = if actual.status == TaskStatus::Queued {
                    format!(
                        "claimed by {} until {}",
                        actual.owner.as_deref().unwrap_or("nobody"),
                        actual
                            .lease_expires_at
                            .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
                            .unwrap_or_default()
                    )
                } else {
                    actual.status.as_str().to_owned()
                };
                Err(StoreError::Conflict {
                    kind: "task",
                    id: task_id.to_owned(),
                    expected: "queued and unclaimed, claimed by the same owner, or with an \
                               expired lease"
                        .to_owned(),
                    actual,
                })
            }
        }
    }

    pub(super) async fn request_cancel_impl(&self, task_id: &str) -> Result<Task> {
        let after = self
            .atomic(
                lock_key(TASKS, task_id),
                self.tasks
                    .find_one_and_update(
                        doc! { "task_id": task_id, "status": TaskStatus::Running.as_str() },
                        // The owner's cancel wins over a preemption under way: the stop
                        // ends the task rather than queueing it again.
                        doc! {
                            "$set": {
                                "cancel_requested": true,
                                "updated_at": to_bson_date(model::now()),
                            },
                            "$unset": { "preempted_by": "" },
                        },
                    )
                    .return_document(ReturnDocument::After),
            )
            .await
            .map_err(|e| {
                StoreError::backend(format!("requesting cancellation of task '{task_id}'"), e)
            })?;
        match after {
            Some(d) => task_from_document(&d),
            None => {
                let actual = self.get_task(task_id).await?;
                Err(StoreError::Conflict {
                    kind: "task",
                    id: task_id.to_owned(),
                    expected: TaskStatus::Running.as_str().to_owned(),
                    actual: actual.status.as_str().to_owned(),
                })
            }
        }
    }

    /// [`Store::user_usage`] in one aggregation: the user's open tasks grouped by status,
    /// counted, and the requests of each group summed by the server.
    pub(super) async fn user_usage_impl(&self, user_id: &str) -> Result<Usage> {
        let groups = self
            .open_task_groups(
                user_id,
                doc! {
                    "cpu": { "$sum": "$req_cpu" },
                    "memory": { "$sum": "$req_memory" },
                    "storage": { "$sum": "$req_storage" },
                    "gpu": { "$sum": "$req_gpu" },
                },
            )
            .await?;
        usage_from_groups(&groups)
    }

    /// The user's pending, queued and running tasks grouped by status (`_id`), each group with
    /// its `count` and the `accumulators` asked for.
    pub(super) async fn open_task_groups(
        &self,
        user_id: &str,
        accumulators: Document,
    ) -> Result<Vec<Document>> {
        let mut group = doc! { "_id": "$status", "count": { "$sum": 1_i64 } };
        group.extend(accumulators);
        let pipeline = vec![
            doc! { "$match": {
                "user_id": user_id,
                "status": { "$in": [
                    TaskStatus::Pending.as_str(),
                    TaskStatus::Queued.as_str(),
                    TaskStatus::Running.as_str(),
                ] },
            } },
            doc! { "$group": group },
        ];
        let what = || format!("reading the usage of user '{user_id}'");
        self.tasks
            .aggregate(pipeline)
            .await
            .map_err(|e| StoreError::backend(what(), e))?
            .try_collect()
            .await
            .map_err(|e| StoreError::backend(what(), e))
    }

    pub(super) async fn admission_batch_impl(
        &self,
        limit: u32,
        due_before: DateTime<Utc>,
    ) -> Result<Vec<Task>> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let documents: Vec<Document> = self
            .tasks
            .find(doc! {
                "status": TaskStatus::Pending.as_str(),
                "awaiting_dependencies": { "$ne": true },
                "updated_at": { "$lte": to_bson_date(due_before) },
            })
            .sort(doc! { "updated_at": 1, "task_id": 1 })
            .limit(i64::from(limit))
            .await
            .map_err(|e| StoreError::backend("reading the admission batch", e))?
            .try_collect()
            .await
            .map_err(|e| StoreError::backend("reading the admission batch", e))?;
        documents.iter().map(task_from_document).collect()
    }

    pub(super) async fn claimable_tasks_impl(
        &self,
        limit: u32,
        now: DateTime<Utc>,
        exclude_users: &[String],
    ) -> Result<Vec<Task>> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let mut filter = doc! {
            "status": TaskStatus::Queued.as_str(),
            "$or": [
                { "owner": Bson::Null },
                { "lease_expires_at": Bson::Null },
                { "lease_expires_at": { "$lt": to_bson_date(now) } },
            ],
        };
        if !exclude_users.is_empty() {
            filter.insert("user_id", doc! { "$nin": exclude_users });
        }
        let documents: Vec<Document> = self
            .tasks
            .find(filter)
            .sort(doc! { "priority": -1, "created_at": 1, "task_id": 1 })
            .limit(i64::from(limit))
            .await
            .map_err(|e| StoreError::backend("reading the placement queue", e))?
            .try_collect()
            .await
            .map_err(|e| StoreError::backend("reading the placement queue", e))?;
        documents.iter().map(task_from_document).collect()
    }

    pub(super) async fn running_counts_impl(
        &self,
        users: &[String],
    ) -> Result<BTreeMap<String, u32>> {
        if users.is_empty() {
            return Ok(BTreeMap::new());
        }
        let pipeline = vec![
            doc! { "$match": {
                "status": TaskStatus::Running.as_str(),
                "user_id": { "$in": users },
            } },
            doc! { "$group": { "_id": "$user_id", "count": { "$sum": 1_i64 } } },
        ];
        let groups: Vec<Document> = self
            .tasks
            .aggregate(pipeline)
            .await
            .map_err(|e| StoreError::backend("counting users' running tasks", e))?
            .try_collect()
            .await
            .map_err(|e| StoreError::backend("counting users' running tasks", e))?;
        groups
            .iter()
            .map(|group| {
                let r = Reader::new(group, TASKS);
                Ok((r.string("_id")?, r.int("count")?))
            })
            .collect()
    }

    pub(super) async fn mark_running_impl(
        &self,
        task_id: &str,
        owner: &str,
        attempts: u32,
    ) -> Result<Task> {
        let after = self
            .atomic(
                lock_key(TASKS, task_id),
                self.tasks
                    .find_one_and_update(
                        doc! {
                            "task_id": task_id,
                            "status": TaskStatus::Queued.as_str(),
                            "owner": owner,
                        },
                        doc! {
                            "$set": {
                                "status": TaskStatus::Running.as_str(),
                                "attempts": i64::from(attempts),
                                "updated_at": to_bson_date(model::now()),
                                "placed_by": owner,
                            },
                            "$unset": { "owner": "", "lease_expires_at": "", "status_reason": "" },
                        },
                    )
                    .return_document(ReturnDocument::After),
            )
            .await
            .map_err(|e| StoreError::backend(format!("marking task '{task_id}' running"), e))?;
        match after {
            Some(d) => task_from_document(&d),
            None => {
                let task = self.get_task(task_id).await?;
                Err(StoreError::Conflict {
                    kind: "task",
                    id: task_id.to_owned(),
                    expected: format!("queued and claimed by {owner}"),
                    actual: format!(
                        "{} and claimed by {}",
                        task.status,
                        task.owner.as_deref().unwrap_or("nobody")
                    ),
                })
            }
        }
    }

    pub(super) async fn unclaim_task_impl(&self, task_id: &str, owner: &str) -> Result<bool> {
        let outcome = self
            .atomic(
                lock_key(TASKS, task_id),
                self.tasks.update_one(
                    doc! {
                        "task_id": task_id,
                        "status": TaskStatus::Queued.as_str(),
                        "owner": owner,
                    },
                    doc! {
                        "$set": { "updated_at": to_bson_date(model::now()) },
                        "$unset": { "owner": "", "lease_expires_at": "" },
                    },
                ),
            )
            .await
            .map_err(|e| {
                StoreError::backend(format!("giving up the claim on task '{task_id}'"), e)
            })?;
        Ok(outcome.matched_count == 1)
    }

    pub(super) async fn clear_expired_claims_impl(
        &self,
        now: DateTime<Utc>,
        limit: u32,
    ) -> Result<Vec<Task>> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let expired = doc! {
            "status": TaskStatus::Queued.as_str(),
            "lease_expires_at": { "$lt": to_bson_date(now) },
        };
        let mut claimed = expired.clone();
        claimed.insert("owner", doc! { "$ne": Bson::Null });
        let documents: Vec<Document> = self
            .tasks
            .find(claimed)
            .sort(doc! { "lease_expires_at": 1, "task_id": 1 })
            .limit(i64::from(limit))
            .await
            .map_err(|e| StoreError::backend("reading expired claims", e))?
            .try_collect()
            .await
            .map_err(|e| StoreError::backend("reading expired claims", e))?;
        let mut cleared = Vec::with_capacity(documents.len());
        for document in &documents {
            let task = task_from_document(document)?;
            let mut filter = expired.clone();
            filter.insert("task_id", task.task_id.as_str());
            let outcome = self
                .atomic(
                    lock_key(TASKS, &task.task_id),
                    self.tasks.update_one(
                        filter,
                        doc! {
                            "$set": { "updated_at": to_bson_date(model::now()) },
                            "$unset": { "owner": "", "lease_expires_at": "" },
                        },
                    ),
                )
                .await
                .map_err(|e| {
                    StoreError::backend(
                        format!("clearing the expired claim on task '{}'", task.task_id),
                        e,
                    )
                })?;
            if outcome.matched_count == 1 {
                cleared.push(task);
            }
        }
        Ok(cleared)
    }

    pub(super) async fn task_counts_impl(&self) -> Result<TaskCounts> {
        self.count_by_status(None, "counting tasks by status").await
    }

    /// The tasks matching `filter` (all without one) counted by status, in one aggregation.
    async fn count_by_status(&self, filter: Option<Document>, what: &str) -> Result<TaskCounts> {
        let mut pipeline = Vec::new();
        if let Some(filter) = filter {
            pipeline.push(doc! { "$match": filter });
        }
        pipeline.push(doc! { "$group": { "_id": "$status", "count": { "$sum": 1_i64 } } });
        let groups: Vec<Document> = self
            .tasks
            .aggregate(pipeline)
            .await
            .map_err(|e| StoreError::backend(what, e))?
            .try_collect()
            .await
            .map_err(|e| StoreError::backend(what, e))?;
        let mut counts = TaskCounts::default();
        for group in &groups {
            let r = Reader::new(group, TASKS);
            let status = r
                .string("_id")?
                .parse::<TaskStatus>()
                .map_err(|e| StoreError::backend(what, e))?;
            counts.add(status, r.int("count")?);
        }
        Ok(counts)
    }
}

/// The usage that [`MongoStore::user_usage_impl`]'s groups add up to: their counts, and the
/// summed requests of the running group.
fn usage_from_groups(groups: &[Document]) -> Result<Usage> {
    let mut usage = Usage::default();
    for group in groups {
        if add_open_count(&mut usage, group)? == TaskStatus::Running {
            let r = Reader::new(group, TASKS);
            usage.reserved = Resources::new(
                r.f64("cpu")?,
                r.f64("memory")?,
                r.f64("storage")?,
                r.f64("gpu")?,
            );
        }
    }
    Ok(usage)
}

/// The update of a transition to `to` with `update`'s fields, stamped `at`.
fn transition_changes(to: TaskStatus, update: &TaskUpdate, at: DateTime<Utc>) -> Document {
    let mut set = doc! { "status": to.as_str(), "updated_at": to_bson_date(at) };
    let mut unset = Document::new();
    if let Some(at) = update.started_at {
        set.insert("started_at", to_bson_date(at));
    }
    if let Some(at) = update.completed_at {
        set.insert("completed_at", to_bson_date(at));
    }
    if let Some(code) = update.exit_code {
        set.insert("exit_code", code);
    }
    if let Some(error) = &update.error {
        set.insert("error", error.as_str());
    }
    match &update.status_reason {
        Some(Some(reason)) => {
            set.insert("status_reason", reason.as_str());
        }
        Some(None) => {
            unset.insert("status_reason", "");
        }
        None => {}
    }
    if update.clear_claim {
        unset.insert("owner", "");
        unset.insert("lease_expires_at", "");
    }
    if update.clear_preemption {
        set.insert("cancel_requested", false);
        unset.insert("preempted_by", "");
    }
    let mut changes = doc! { "$set": set };
    if !unset.is_empty() {
        changes.insert("$unset", unset);
    }
    if update.increment_attempts {
        changes.insert("$inc", doc! { "attempts": 1_i64 });
    }
    changes
}

/// True when every write error of an `insertMany` is a duplicate key (and nothing else failed).
fn only_duplicates(e: &mongodb::error::Error) -> bool {
    match e.kind.as_ref() {
        mongodb::error::ErrorKind::InsertMany(failure) => {
            failure.write_concern_error.is_none()
                && failure.write_errors.as_ref().is_some_and(|errors| {
                    !errors.is_empty() && errors.iter().all(|w| w.code == super::DUPLICATE_KEY)
                })
        }
        _ => is_duplicate_key(e),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use mongodb::bson::doc;

    use super::super::testing::{connect_test_store, task};
    use super::*;

    /// The answer MongoDB gives the native usage aggregation (one group per open status, the
    /// running group with its sums; FerretDB 1.24 cannot give it, see
    /// `compat::MongoStore::user_usage_ferretdb1`) reads back as the usage.
    #[test]
    fn usage_is_read_from_the_groups_of_one_aggregation() {
        let groups = [
            doc! { "_id": "queued", "count": 2_i64, "cpu": 4.0, "memory": 8.0, "storage": 0.0, "gpu": 0.0 },
            doc! { "_id": "running", "count": 3_i64, "cpu": 1.75, "memory": 6.5, "storage": 3_i32, "gpu": 1_i64 },
            doc! { "_id": "pending", "count": 1_i32, "cpu": 1.0, "memory": 1.0, "storage": 1.0, "gpu": 0.0 },
        ];
        let usage = usage_from_groups(&groups).unwrap();
        assert_eq!(
            (usage.pending_tasks, usage.queued_tasks, usage.running_tasks),
            (1, 2, 3)
        );
        assert_eq!(usage.reserved, Resources::new(1.75, 6.5, 3.0, 1.0));
        assert_eq!(
            usage_from_groups(&[]).unwrap().reserved,
            Resources::default()
        );
        let missing_sum = [doc! { "_id": "running", "count": 1_i64, "cpu": 1.0 }];
        let message = usage_from_groups(&missing_sum).unwrap_err().to_string();
        assert!(message.contains("'memory'"), "{message}");
        let closed = [doc! { "_id": "completed", "count": 1_i64 }];
        assert!(usage_from_groups(&closed).is_err());
    }

    #[tokio::test]
    async fn idempotent_submit_finishes_a_submission_that_crashed_after_its_key() {
        let Some((store, _db)) = connect_test_store().await else {
            return;
        };
        // The state a crash between the two inserts leaves: a key, no task.
        store
            .idempotency
            .insert_one(doc! {
                "_id": "u1/k1", "user_id": "u1", "key": "k1",
                "task_id": "t-promised", "request_sha256": "abc",
            })
            .await
            .unwrap();
        let idem = IdempotencyKey {
            key: "k1".to_owned(),
            request_sha256: "abc".to_owned(),
        };
        let mut retry = task("t-retry", "u1");
        retry.idempotency_key = Some("k1".to_owned());
        let outcome = store.insert_task(&retry, Some(&idem)).await.unwrap();
        assert_eq!(outcome.task.task_id, "t-promised");
        assert!(store.get_task("t-promised").await.is_ok());
        assert!(matches!(
            store.get_task("t-retry").await,
            Err(StoreError::NotFound { .. })
        ));
        let again = store.insert_task(&retry, Some(&idem)).await.unwrap();
        assert!(!again.created);
        assert_eq!(again.task.task_id, "t-promised");
    }
}
