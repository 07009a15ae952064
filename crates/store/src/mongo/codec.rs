//! Documents <-> model types: every stored document is built and read by the explicit
//! `*_to_document` / `*_from_document` functions here rather than by serde, so the stored
//! shape is exactly the seed's (field names, BSON types: dates as BSON dates,
//! `last_heartbeat` as Int64 Unix seconds, resources as doubles) with this project's additions
//! beside it, and a malformed stored document is reported by [`Reader`] with the field that is
//! wrong.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use mongodb::bson::{self, Bson, Document, doc};

use super::{
    ACTIVE_POLICIES, ASSIGNMENTS, EVENTS, POLICIES, RESULTS, TASK_OUTPUTS, TASKS, WORKER_REGISTRY,
};
use crate::model::{
    ActivePolicy, Assignment, PolicyVersion, ResultStatus, Task, TaskResult, TaskStatus, Usage,
    Worker, WorkerUsage,
};
use crate::{NewEvent, OutputFileInfo, Result, StoreError, StoredEvent};

pub(super) fn to_bson_date(at: DateTime<Utc>) -> bson::DateTime {
    bson::DateTime::from_millis(at.timestamp_millis())
}

/// A string-to-string map (labels, env), stored as an array of `{k, v}` documents sorted by
/// `k`: any key is then a value, which every MongoDB-protocol server accepts (FerretDB 1.x
/// refuses field names with a `.` or a leading `$`, and MongoDB cannot query such names by
/// path), and `labels.k` / `labels.v` can be indexed. Schema version 1 stored the map as a
/// sub-document keyed by its keys: [`Reader::map`] still reads that shape, and
/// [`super::schema`] converts it at start-up.
pub(super) fn map_to_pairs(map: &BTreeMap<String, String>) -> Bson {
    Bson::Array(
        map.iter()
            .map(|(k, v)| Bson::Document(doc! { "k": k, "v": v }))
            .collect(),
    )
}

/// Stored as Int64: every u32 and every realistic u64 fits, and it reads back unchanged.
pub(super) fn u64_to_bson(value: u64, field: &str) -> Result<Bson> {
    i64::try_from(value).map(Bson::Int64).map_err(|e| {
        StoreError::backend(format!("storing '{field}' = {value} (above i64::MAX)"), e)
    })
}

pub(super) fn insert_opt<T: Into<Bson>>(document: &mut Document, key: &str, value: Option<T>) {
    if let Some(value) = value {
        document.insert(key, value);
    }
}

pub(super) fn task_to_document(t: &Task) -> Result<Document> {
    let mut d = doc! {
        "task_id": &t.task_id,
        "user_id": &t.user_id,
        "docker_image": &t.docker_image,
    };
    insert_opt(&mut d, "command", t.command.as_deref());
    d.insert("req_cpu", t.req_cpu);
    d.insert("req_memory", t.req_memory);
    d.insert("req_storage", t.req_storage);
    d.insert("req_gpu", t.req_gpu);
    d.insert("status", t.status.as_str());
    d.insert("created_at", to_bson_date(t.created_at));
    insert_opt(&mut d, "started_at", t.started_at.map(to_bson_date));
    insert_opt(&mut d, "completed_at", t.completed_at.map(to_bson_date));
    d.insert("priority", t.priority);
    d.insert("labels", map_to_pairs(&t.labels));
    d.insert("env", map_to_pairs(&t.env));
    if let Some(timeout) = t.timeout_s {
        d.insert("timeout_s", u64_to_bson(timeout, "timeout_s")?);
    }
    d.insert("max_attempts", i64::from(t.max_attempts));
    d.insert("attempts", i64::from(t.attempts));
    insert_opt(&mut d, "exit_code", t.exit_code);
    insert_opt(&mut d, "error", t.error.as_deref());
    insert_opt(&mut d, "status_reason", t.status_reason.as_deref());
    d.insert("cancel_requested", t.cancel_requested);
    insert_opt(&mut d, "owner", t.owner.as_deref());
    insert_opt(
        &mut d,
        "lease_expires_at",
        t.lease_expires_at.map(to_bson_date),
    );
    insert_opt(&mut d, "idempotency_key", t.idempotency_key.as_deref());
    insert_opt(&mut d, "placed_by", t.placed_by.as_deref());
    d.insert("updated_at", to_bson_date(t.updated_at));
    insert_opt(&mut d, "array_id", t.array_id.as_deref());
    insert_opt(&mut d, "array_index", t.array_index.map(i64::from));
    if !t.after.is_empty() {
        let after = bson::serialize_to_bson(&t.after)
            .map_err(|e| StoreError::backend("encoding task dependencies", e))?;
        d.insert("after", after);
    }
    d.insert("awaiting_dependencies", t.awaiting_dependencies);
    d.insert("preemptible", t.preemptible);
    insert_opt(&mut d, "preempted_by", t.preempted_by.as_deref());
    Ok(d)
}

pub(super) fn task_from_document(d: &Document) -> Result<Task> {
    let r = Reader::new(d, TASKS);
    let status = r.string("status")?;
    Ok(Task {
        task_id: r.string("task_id")?,
        user_id: r.string("user_id")?,
        docker_image: r.string("docker_image")?,
        command: r.opt_string("command")?,
        req_cpu: r.f64("req_cpu")?,
        req_memory: r.f64("req_memory")?,
        req_storage: r.f64("req_storage")?,
        req_gpu: r.f64("req_gpu")?,
        status: status.parse().map_err(|e: String| r.invalid("status", e))?,
        created_at: r.date("created_at")?,
        started_at: r.opt_date("started_at")?,
        completed_at: r.opt_date("completed_at")?,
        priority: r.opt_int::<i32>("priority")?.unwrap_or(0),
        labels: r.map("labels")?,
        env: r.map("env")?,
        timeout_s: r.opt_int("timeout_s")?,
        max_attempts: r.opt_int("max_attempts")?.unwrap_or(1),
        attempts: r.opt_int("attempts")?.unwrap_or(0),
        exit_code: r.opt_int("exit_code")?,
        error: r.opt_string("error")?,
        status_reason: r.opt_string("status_reason")?,
        cancel_requested: r.opt_bool("cancel_requested")?.unwrap_or(false),
        owner: r.opt_string("owner")?,
        lease_expires_at: r.opt_date("lease_expires_at")?,
        idempotency_key: r.opt_string("idempotency_key")?,
        placed_by: r.opt_string("placed_by")?,
        array_id: r.opt_string("array_id")?,
        array_index: r.opt_int("array_index")?,
        after: match d.get("after") {
            None | Some(Bson::Null) => Vec::new(),
            Some(after) => bson::deserialize_from_bson(after.clone())
                .map_err(|e| r.invalid("after", e.to_string()))?,
        },
        awaiting_dependencies: r.opt_bool("awaiting_dependencies")?.unwrap_or(false),
        preemptible: r.opt_bool("preemptible")?.unwrap_or(true),
        preempted_by: r.opt_string("preempted_by")?,
        // Documents written by other tools may lack our addition: fall back to creation.
        updated_at: match r.opt_date("updated_at")? {
            Some(at) => at,
            None => r.date("created_at")?,
        },
    })
}

pub(super) fn usage_to_document(u: &WorkerUsage) -> Document {
    doc! {
        "cpu_percent": u.cpu_percent,
        "memory_percent": u.memory_percent,
        "running_tasks": i64::from(u.running_tasks),
    }
}

pub(super) fn worker_to_document(w: &Worker) -> Document {
    let mut d = doc! {
        "worker_id": &w.worker_id,
        "worker_ip": &w.worker_ip,
        "total_cpu": w.total_cpu,
        "total_memory": w.total_memory,
        "total_storage": w.total_storage,
        "total_gpu": w.total_gpu,
        "allocated_cpu": w.allocated_cpu,
        "allocated_memory": w.allocated_memory,
        "allocated_storage": w.allocated_storage,
        "allocated_gpu": w.allocated_gpu,
        "available_cpu": w.available_cpu,
        "available_memory": w.available_memory,
        "available_storage": w.available_storage,
        "available_gpu": w.available_gpu,
        "is_active": w.is_active,
        "last_heartbeat": w.last_heartbeat,
        "registered_at": to_bson_date(w.registered_at),
        "updated_at": to_bson_date(w.updated_at),
        "draining": w.draining,
        "labels": map_to_pairs(&w.labels),
        "token_sha256": &w.token_sha256,
    };
    insert_opt(&mut d, "usage", w.usage.as_ref().map(usage_to_document));
    d
}

pub(super) fn worker_from_document(d: &Document) -> Result<Worker> {
    let r = Reader::new(d, WORKER_REGISTRY);
    let usage = match r.opt_document("usage")? {
        Some(u) => {
            let u = Reader::new(u, "WORKER_REGISTRY.usage");
            Some(WorkerUsage {
                cpu_percent: u.f64("cpu_percent")?,
                memory_percent: u.f64("memory_percent")?,
                running_tasks: u.opt_int("running_tasks")?.unwrap_or(0),
            })
        }
        None => None,
    };
    Ok(Worker {
        worker_id: r.string("worker_id")?,
        worker_ip: r.string("worker_ip")?,
        total_cpu: r.f64("total_cpu")?,
        total_memory: r.f64("total_memory")?,
        total_storage: r.f64("total_storage")?,
        total_gpu: r.f64("total_gpu")?,
        allocated_cpu: r.f64("allocated_cpu")?,
        allocated_memory: r.f64("allocated_memory")?,
        allocated_storage: r.f64("allocated_storage")?,
        allocated_gpu: r.f64("allocated_gpu")?,
        available_cpu: r.f64("available_cpu")?,
        available_memory: r.f64("available_memory")?,
        available_storage: r.f64("available_storage")?,
        available_gpu: r.f64("available_gpu")?,
        is_active: r.bool("is_active")?,
        last_heartbeat: r.int("last_heartbeat")?,
        registered_at: r.date("registered_at")?,
        updated_at: r.date("updated_at")?,
        draining: r.opt_bool("draining")?.unwrap_or(false),
        labels: r.map("labels")?,
        usage,
        token_sha256: r.opt_string("token_sha256")?.unwrap_or_default(),
    })
}

pub(super) fn assignment_to_document(a: &Assignment) -> Document {
    let mut d = doc! {
        "ass_id": &a.ass_id,
        "task_id": &a.task_id,
        "worker_id": &a.worker_id,
        "assigned_at": to_bson_date(a.assigned_at),
        "req_cpu": a.req_cpu,
        "req_memory": a.req_memory,
        "req_storage": a.req_storage,
        "req_gpu": a.req_gpu,
        "attempt": i64::from(a.attempt),
        "released": a.released,
    };
    insert_opt(&mut d, "released_at", a.released_at.map(to_bson_date));
    insert_opt(&mut d, "placed_by", a.placed_by.as_deref());
    insert_opt(&mut d, "reserved_epoch", a.reserved_epoch);
    d
}

pub(super) fn assignment_from_document(d: &Document) -> Result<Assignment> {
    let r = Reader::new(d, ASSIGNMENTS);
    Ok(Assignment {
        ass_id: r.string("ass_id")?,
        task_id: r.string("task_id")?,
        worker_id: r.string("worker_id")?,
        assigned_at: r.date("assigned_at")?,
        req_cpu: r.opt_f64("req_cpu")?.unwrap_or(0.0),
        req_memory: r.opt_f64("req_memory")?.unwrap_or(0.0),
        req_storage: r.opt_f64("req_storage")?.unwrap_or(0.0),
        req_gpu: r.opt_f64("req_gpu")?.unwrap_or(0.0),
        attempt: r.opt_int("attempt")?.unwrap_or(1),
        released: r.opt_bool("released")?.unwrap_or(false),
        released_at: r.opt_date("released_at")?,
        placed_by: r.opt_string("placed_by")?,
        reserved_epoch: r.opt_int("reserved_epoch")?,
    })
}

pub(super) fn result_to_document(t: &TaskResult) -> Document {
    let mut d = doc! {
        "task_id": &t.task_id,
        "worker_id": &t.worker_id,
        "status": t.status.as_str(),
        "logs": &t.logs,
        "completed_at": to_bson_date(t.completed_at),
    };
    insert_opt(&mut d, "exit_code", t.exit_code);
    insert_opt(&mut d, "error", t.error.as_deref());
    d.insert("logs_truncated", t.logs_truncated);
    d.insert("stderr", &t.stderr);
    d.insert("stderr_truncated", t.stderr_truncated);
    d.insert("oom_killed", t.oom_killed);
    d.insert("attempt", i64::from(t.attempt));
    insert_opt(&mut d, "runtime_s", t.runtime_s);
    insert_opt(&mut d, "task_type", t.task_type.as_deref());
    d
}

pub(super) fn result_from_document(d: &Document) -> Result<TaskResult> {
    let r = Reader::new(d, RESULTS);
    let status: ResultStatus = r
        .string("status")?
        .parse()
        .map_err(|e: String| r.invalid("status", e))?;
    Ok(TaskResult {
        task_id: r.string("task_id")?,
        worker_id: r.string("worker_id")?,
        status,
        logs: r.opt_string("logs")?.unwrap_or_default(),
        completed_at: r.date("completed_at")?,
        exit_code: r.opt_int("exit_code")?,
        error: r.opt_string("error")?,
        logs_truncated: r.opt_bool("logs_truncated")?.unwrap_or(false),
        stderr: r.opt_string("stderr")?.unwrap_or_default(),
        stderr_truncated: r.opt_bool("stderr_truncated")?.unwrap_or(false),
        oom_killed: r.opt_bool("oom_killed")?.unwrap_or(false),
        attempt: r.opt_int("attempt")?.unwrap_or(0),
        runtime_s: r.opt_f64("runtime_s")?,
        task_type: r.opt_string("task_type")?,
    })
}

pub(super) fn policy_to_document(v: &PolicyVersion) -> Result<Document> {
    Ok(doc! {
        "name": &v.name,
        "version": &v.version,
        "kind": v.kind.as_str(),
        "sha256": &v.sha256,
        "size_bytes": u64_to_bson(v.size_bytes, "size_bytes")?,
        "config": &v.config,
        "uploaded_at": to_bson_date(v.uploaded_at),
        "uploaded_by": &v.uploaded_by,
        "memory_bytes": v.memory_bytes.map(|m| u64_to_bson(m, "memory_bytes")).transpose()?,
        "deadline_ms": v.deadline_ms.map(|d| u64_to_bson(d, "deadline_ms")).transpose()?,
    })
}

pub(super) fn policy_from_document(d: &Document) -> Result<PolicyVersion> {
    let r = Reader::new(d, POLICIES);
    Ok(PolicyVersion {
        name: r.string("name")?,
        version: r.string("version")?,
        kind: r
            .string("kind")?
            .parse()
            .map_err(|e: String| r.invalid("kind", e))?,
        sha256: r.string("sha256")?,
        size_bytes: r.int("size_bytes")?,
        config: r.opt_string("config")?.unwrap_or_default(),
        uploaded_at: r.date("uploaded_at")?,
        uploaded_by: r.opt_string("uploaded_by")?.unwrap_or_default(),
        memory_bytes: r.opt_int("memory_bytes")?,
        deadline_ms: r.opt_int("deadline_ms")?,
    })
}

pub(super) fn active_policy_to_document(a: &ActivePolicy) -> Document {
    let mut d = doc! {
        "_id": a.kind.as_str(),
        "kind": a.kind.as_str(),
        "name": &a.name,
        "version": &a.version,
        "activated_at": to_bson_date(a.activated_at),
        "activated_by": &a.activated_by,
    };
    insert_opt(
        &mut d,
        "previous",
        a.previous
            .as_ref()
            .map(|(name, version)| doc! { "name": name, "version": version }),
    );
    d
}

pub(super) fn active_policy_from_document(d: &Document) -> Result<ActivePolicy> {
    let r = Reader::new(d, ACTIVE_POLICIES);
    let previous = match r.opt_document("previous")? {
        Some(p) => {
            let p = Reader::new(p, "ACTIVE_POLICIES.previous");
            Some((p.string("name")?, p.string("version")?))
        }
        None => None,
    };
    Ok(ActivePolicy {
        kind: r
            .string("kind")?
            .parse()
            .map_err(|e: String| r.invalid("kind", e))?,
        name: r.string("name")?,
        version: r.string("version")?,
        activated_at: r.date("activated_at")?,
        activated_by: r.opt_string("activated_by")?.unwrap_or_default(),
        previous,
    })
}

pub(super) fn output_from_document(d: &Document) -> Result<OutputFileInfo> {
    let r = Reader::new(d, TASK_OUTPUTS);
    Ok(OutputFileInfo {
        task_id: r.string("task_id")?,
        path: r.string("path")?,
        attempt: r.int("attempt")?,
        size_bytes: r.int("size_bytes")?,
        sha256: r.string("sha256")?,
    })
}

/// Reads typed fields from a stored document; every error names the collection and field.
/// An absent field and an explicit `null` both read as `None` for optional fields.
pub(super) struct Reader<'a> {
    doc: &'a Document,
    collection: &'static str,
}

impl<'a> Reader<'a> {
    pub(super) fn new(doc: &'a Document, collection: &'static str) -> Self {
        Reader { doc, collection }
    }

    pub(super) fn invalid(&self, key: &str, problem: impl Into<String>) -> StoreError {
        let id = self
            .doc
            .get("_id")
            .map(|id| id.to_string())
            .unwrap_or_else(|| "?".to_owned());
        StoreError::backend(
            format!(
                "reading field '{key}' of a {} document (_id {id})",
                self.collection
            ),
            problem.into(),
        )
    }

    pub(super) fn present(&self, key: &str) -> Option<&'a Bson> {
        match self.doc.get(key) {
            None | Some(Bson::Null) => None,
            Some(value) => Some(value),
        }
    }

    pub(super) fn wrong_type(&self, key: &str, expected: &str, got: &Bson) -> StoreError {
        self.invalid(
            key,
            format!("expected {expected}, found {:?}", got.element_type()),
        )
    }

    pub(super) fn opt_string(&self, key: &str) -> Result<Option<String>> {
        match self.present(key) {
            None => Ok(None),
            Some(Bson::String(s)) => Ok(Some(s.clone())),
            Some(other) => Err(self.wrong_type(key, "a string", other)),
        }
    }

    pub(super) fn string(&self, key: &str) -> Result<String> {
        self.opt_string(key)?
            .ok_or_else(|| self.invalid(key, "missing (required)"))
    }

    /// Doubles, and integers written by other tools (e.g. the mongo shell's `8` is a double,
    /// but a driver may write an Int32).
    pub(super) fn opt_f64(&self, key: &str) -> Result<Option<f64>> {
        match self.present(key) {
            None => Ok(None),
            Some(Bson::Double(v)) => Ok(Some(*v)),
            Some(Bson::Int32(v)) => Ok(Some(f64::from(*v))),
            // Only small integers are meaningful here; the cast is exact for them.
            Some(Bson::Int64(v)) => Ok(Some(*v as f64)),
            Some(other) => Err(self.wrong_type(key, "a number", other)),
        }
    }

    pub(super) fn f64(&self, key: &str) -> Result<f64> {
        self.opt_f64(key)?
            .ok_or_else(|| self.invalid(key, "missing (required)"))
    }

    /// Int32, Int64, or an integral double, converted to `T` without loss.
    pub(super) fn opt_int<T: TryFrom<i64>>(&self, key: &str) -> Result<Option<T>> {
        let wide = match self.present(key) {
            None => return Ok(None),
            Some(Bson::Int32(v)) => i64::from(*v),
            Some(Bson::Int64(v)) => *v,
            Some(Bson::Double(v)) if v.fract() == 0.0 && v.abs() < 9.0e15 => *v as i64,
            Some(other) => return Err(self.wrong_type(key, "an integer", other)),
        };
        T::try_from(wide).map(Some).map_err(|_| {
            self.invalid(
                key,
                format!("{wide} is out of range for {}", std::any::type_name::<T>()),
            )
        })
    }

    pub(super) fn int<T: TryFrom<i64>>(&self, key: &str) -> Result<T> {
        self.opt_int(key)?
            .ok_or_else(|| self.invalid(key, "missing (required)"))
    }

    pub(super) fn opt_bool(&self, key: &str) -> Result<Option<bool>> {
        match self.present(key) {
            None => Ok(None),
            Some(Bson::Boolean(b)) => Ok(Some(*b)),
            Some(other) => Err(self.wrong_type(key, "a boolean", other)),
        }
    }

    pub(super) fn bool(&self, key: &str) -> Result<bool> {
        self.opt_bool(key)?
            .ok_or_else(|| self.invalid(key, "missing (required)"))
    }

    pub(super) fn opt_date(&self, key: &str) -> Result<Option<DateTime<Utc>>> {
        match self.present(key) {
            None => Ok(None),
            Some(Bson::DateTime(at)) => DateTime::from_timestamp_millis(at.timestamp_millis())
                .map(Some)
                .ok_or_else(|| self.invalid(key, "date out of range")),
            Some(other) => Err(self.wrong_type(key, "a date", other)),
        }
    }

    pub(super) fn date(&self, key: &str) -> Result<DateTime<Utc>> {
        self.opt_date(key)?
            .ok_or_else(|| self.invalid(key, "missing (required)"))
    }

    pub(super) fn opt_document(&self, key: &str) -> Result<Option<&'a Document>> {
        match self.present(key) {
            None => Ok(None),
            Some(Bson::Document(d)) => Ok(Some(d)),
            Some(other) => Err(self.wrong_type(key, "a document", other)),
        }
    }

    /// A string-to-string map (see [`map_to_pairs`]): an array of `{k, v}` documents, or a
    /// sub-document keyed by the map's keys as schema version 1 stored it (so that reads never
    /// fail while a start-up converts them); absent reads as empty.
    pub(super) fn map(&self, key: &str) -> Result<BTreeMap<String, String>> {
        match self.present(key) {
            None => Ok(BTreeMap::new()),
            Some(Bson::Array(pairs)) => {
                let mut map = BTreeMap::new();
                for pair in pairs {
                    let (k, v) = match pair {
                        Bson::Document(d) => match (d.get("k"), d.get("v")) {
                            (Some(Bson::String(k)), Some(Bson::String(v))) => (k, v),
                            _ => {
                                return Err(self.invalid(
                                    key,
                                    format!("entry {d}: expected {{k: string, v: string}}"),
                                ));
                            }
                        },
                        other => return Err(self.wrong_type(key, "{k, v} entries", other)),
                    };
                    if map.insert(k.clone(), v.clone()).is_some() {
                        return Err(self.invalid(key, format!("key '{k}' appears twice")));
                    }
                }
                Ok(map)
            }
            Some(Bson::Document(d)) => d
                .iter()
                .map(|(k, v)| match v {
                    Bson::String(s) => Ok((k.clone(), s.clone())),
                    other => Err(self.invalid(
                        key,
                        format!(
                            "entry '{k}': expected a string, found {:?}",
                            other.element_type()
                        ),
                    )),
                })
                .collect(),
            Some(other) => Err(self.wrong_type(key, "an array of {k, v}", other)),
        }
    }
}

// ----- events -----

pub(super) fn event_to_document(id: u64, e: &NewEvent) -> Result<Document> {
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

pub(super) fn event_from_document(d: &Document) -> Result<StoredEvent> {
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

/// Adds the `count` of one group of `MongoStore::open_task_groups` to `usage`; returns the
/// group's status.
pub(super) fn add_open_count(usage: &mut Usage, group: &Document) -> Result<TaskStatus> {
    let r = Reader::new(group, TASKS);
    let count: u32 = r.int("count")?;
    let status: TaskStatus = r
        .string("_id")?
        .parse()
        .map_err(|e: String| r.invalid("_id", e))?;
    match status {
        TaskStatus::Pending => usage.pending_tasks = count,
        TaskStatus::Queued => usage.queued_tasks = count,
        TaskStatus::Running => usage.running_tasks = count,
        other => return Err(r.invalid("_id", format!("{other} is not an open status"))),
    }
    Ok(status)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use mongodb::bson::{Bson, doc};

    use super::super::testing::{assignment, connect_test_store, task, worker};
    use super::*;
    use crate::AssignmentStore;
    use crate::TaskQuery;
    use crate::TaskStore;
    use crate::WorkerStore;
    use crate::model::Resources;

    fn map(entries: &[(&str, &str)]) -> BTreeMap<String, String> {
        entries
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    /// Keys FerretDB 1.x refuses as field names (a `.`, a leading `$`) and MongoDB cannot query
    /// by path are stored as values of `{k, v}` pairs, sorted by key, and read back unchanged.
    /// (The API allows `.` in label keys, `cloudai.local` is the local worker's; it allows
    /// neither in env keys, nor `$` anywhere: the store does not depend on that.)
    #[tokio::test]
    async fn labels_and_env_with_any_key_are_stored_as_pairs_and_read_back() {
        let Some((store, _db)) = connect_test_store().await else {
            return;
        };
        let labels = map(&[
            ("app.kubernetes.io/name", "web"),
            ("$dollar", "d"),
            ("team", "ml"),
            ("a.b.c", ""),
        ]);
        let env = map(&[("dotted.NAME", "1"), ("$X", "$Y"), ("PATH", "/bin")]);
        let mut t = task("t-keys", "u-keys");
        t.labels = labels.clone();
        t.env = env.clone();
        store.insert_task(&t, None).await.unwrap();
        let read = store.get_task("t-keys").await.unwrap();
        assert_eq!((&read.labels, &read.env), (&labels, &env));
        let listed = store
            .list_tasks(&TaskQuery {
                user_id: Some("u-keys".to_owned()),
                limit: 10,
                ..TaskQuery::default()
            })
            .await
            .unwrap();
        assert_eq!(listed.tasks, [read]);

        let mut w = worker("w-keys", Resources::new(4.0, 4.0, 4.0, 0.0));
        w.labels = map(&[
            ("cloudai.local", "true"),
            ("app.kubernetes.io/name", "web"),
            ("$x", "y"),
        ]);
        store.insert_worker(&w).await.unwrap();
        assert_eq!(store.get_worker("w-keys").await.unwrap().labels, w.labels);
        let listed = store.list_workers().await.unwrap();
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].labels, w.labels);

        let raw = store
            .tasks
            .find_one(doc! { "task_id": "t-keys" })
            .await
            .unwrap()
            .unwrap();
        let keys: Vec<&str> = raw
            .get_array("labels")
            .unwrap()
            .iter()
            .map(|pair| pair.as_document().unwrap().get_str("k").unwrap())
            .collect();
        assert_eq!(keys, ["$dollar", "a.b.c", "app.kubernetes.io/name", "team"]);
    }

    #[test]
    fn maps_read_both_shapes_and_refuse_malformed_pairs() {
        let d = doc! {
            "pairs": [{ "k": "a.b", "v": "1" }, { "k": "c", "v": "2" }],
            "old": { "a": "1", "c": "2" },
            "bad_entry": [{ "k": "a" }],
            "twice": [{ "k": "a", "v": "1" }, { "k": "a", "v": "2" }],
            "number": 3,
        };
        let r = Reader::new(&d, TASKS);
        assert_eq!(r.map("pairs").unwrap(), map(&[("a.b", "1"), ("c", "2")]));
        assert_eq!(r.map("old").unwrap(), map(&[("a", "1"), ("c", "2")]));
        assert_eq!(r.map("absent").unwrap(), BTreeMap::new());
        for field in ["bad_entry", "twice", "number"] {
            let message = r.map(field).unwrap_err().to_string();
            assert!(message.contains(&format!("'{field}'")), "{message}");
        }
        assert_eq!(
            map_to_pairs(&map(&[("z", "1"), ("a", "2")])),
            Bson::Array(vec![
                doc! { "k": "a", "v": "2" }.into(),
                doc! { "k": "z", "v": "1" }.into(),
            ])
        );
    }

    #[tokio::test]
    async fn documents_have_the_seed_field_types() {
        let Some((store, _db)) = connect_test_store().await else {
            return;
        };
        store
            .insert_task(&task("t-shape", "u1"), None)
            .await
            .unwrap();
        store
            .insert_worker(&worker("w-shape", Resources::new(8.0, 16.0, 100.0, 2.0)))
            .await
            .unwrap();
        store
            .insert_assignment(&assignment(
                "a-shape",
                "w-shape",
                Resources::new(1.0, 1.0, 1.0, 0.0),
            ))
            .await
            .unwrap();

        let t = store
            .tasks
            .find_one(doc! { "task_id": "t-shape" })
            .await
            .unwrap()
            .unwrap();
        assert!(matches!(t.get("_id"), Some(Bson::ObjectId(_))));
        assert!(matches!(t.get("created_at"), Some(Bson::DateTime(_))));
        assert!(matches!(t.get("req_cpu"), Some(Bson::Double(_))));
        assert_eq!(t.get_str("status").unwrap(), "pending");
        assert!(
            t.get("started_at").is_none(),
            "absent optional fields are not stored"
        );
        assert_eq!(
            t.get("labels"),
            Some(&Bson::Array(vec![doc! { "k": "team", "v": "ml" }.into()]))
        );
        assert_eq!(t.get("env"), Some(&Bson::Array(Vec::new())));

        let w = store
            .workers
            .find_one(doc! { "worker_id": "w-shape" })
            .await
            .unwrap()
            .unwrap();
        assert!(matches!(w.get("last_heartbeat"), Some(Bson::Int64(_))));
        assert!(matches!(w.get("registered_at"), Some(Bson::DateTime(_))));
        assert!(matches!(w.get("total_cpu"), Some(Bson::Double(_))));
        assert!(matches!(w.get("is_active"), Some(Bson::Boolean(true))));
        assert_eq!(
            w.get("labels"),
            Some(&Bson::Array(vec![
                doc! { "k": "zone", "v": "local" }.into()
            ]))
        );

        let a = store
            .assignments
            .find_one(doc! { "ass_id": "a-shape" })
            .await
            .unwrap()
            .unwrap();
        assert!(matches!(a.get("assigned_at"), Some(Bson::DateTime(_))));
        assert!(matches!(a.get("released"), Some(Bson::Boolean(false))));
    }

    #[tokio::test]
    async fn malformed_documents_are_reported_with_their_field() {
        let Some((store, _db)) = connect_test_store().await else {
            return;
        };
        let mut d = task_to_document(&task("t-bad", "u1")).unwrap();
        d.insert("req_cpu", "two");
        store.tasks.insert_one(d).await.unwrap();
        let message = store.get_task("t-bad").await.unwrap_err().to_string();
        assert!(
            message.contains("'req_cpu'") && message.contains("TASKS"),
            "{message}"
        );
    }
}
