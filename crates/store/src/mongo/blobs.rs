//! Stored bytes: policy versions (metadata, chunks, the active version per kind) and the output
//! files of tasks. Chunks are always written first under a fresh upload id, and a version or
//! file document names them only once they are all written.

use futures::TryStreamExt;
use mongodb::bson::{self, Bson, Document, doc};
use mongodb::options::ReturnDocument;

use super::codec::{
    Reader, active_policy_from_document, active_policy_to_document, output_from_document,
    policy_from_document, policy_to_document, to_bson_date, u64_to_bson,
};
use super::compat::lock_key;
use super::{
    ACTIVE_POLICIES, MongoStore, POLICIES, POLICY_CHUNKS, TASK_OUTPUT_CHUNKS, TASK_OUTPUTS,
    is_duplicate_key, not_found,
};
use crate::model::{self, ActivePolicy, PolicyKind, PolicyVersion};
use crate::{
    OutputFileInfo, POLICY_CHUNK_BYTES, Result, StoreError, active_label, policy_label, sha256_hex,
    verify_output_bytes, verify_policy_bytes,
};

impl MongoStore {
    async fn find_policy(&self, name: &str, version: &str) -> Result<Option<Document>> {
        self.policies
            .find_one(doc! { "name": name, "version": version })
            .await
            .map_err(|e| {
                StoreError::backend(
                    format!("reading policy version {}", policy_label(name, version)),
                    e,
                )
            })
    }

    async fn require_policy(&self, name: &str, version: &str) -> Result<Document> {
        self.find_policy(name, version)
            .await?
            .ok_or_else(|| not_found("policy version", &policy_label(name, version)))
    }

    async fn find_active_policy(&self, kind: PolicyKind) -> Result<Option<ActivePolicy>> {
        self.active_policies
            .find_one(doc! { "_id": kind.as_str() })
            .await
            .map_err(|e| StoreError::backend(format!("reading the active {kind} policy"), e))?
            .map(|d| active_policy_from_document(&d))
            .transpose()
    }

    /// Removes the chunks of one output upload (best effort: unreferenced either way).
    async fn delete_output_chunks(&self, upload_id: &str) {
        if let Err(error) = self
            .atomic(
                lock_key(TASK_OUTPUT_CHUNKS, upload_id),
                self.task_output_chunks
                    .delete_many(doc! { "upload_id": upload_id }),
            )
            .await
        {
            tracing::warn!(upload_id, %error, "deleting the chunks of an output upload");
        }
    }

    /// Removes the chunks of one upload (after its version's document is gone, or when that
    /// document was never written).
    async fn delete_chunks(&self, upload_id: &str) -> Result<()> {
        self.atomic(
            lock_key(POLICY_CHUNKS, upload_id),
            self.policy_chunks
                .delete_many(doc! { "upload_id": upload_id }),
        )
        .await
        .map_err(|e| {
            StoreError::backend(format!("deleting the chunks of upload {upload_id}"), e)
        })?;
        Ok(())
    }

    /// Undoes an activation that raced with the deletion of its version: puts back the
    /// document it replaced (or removes it, for a first activation), only while it is still
    /// exactly the one this activation wrote.
    async fn revert_activation(&self, ours: &ActivePolicy, before: Option<Document>) -> Result<()> {
        let filter = doc! {
            "_id": ours.kind.as_str(),
            "name": &ours.name,
            "version": &ours.version,
            "activated_at": to_bson_date(ours.activated_at),
            "activated_by": &ours.activated_by,
        };
        let outcome = match before {
            Some(before) => self
                .atomic(
                    lock_key(ACTIVE_POLICIES, ours.kind.as_str()),
                    self.active_policies.replace_one(filter, before),
                )
                .await
                .map(drop),
            None => self
                .atomic(
                    lock_key(ACTIVE_POLICIES, ours.kind.as_str()),
                    self.active_policies.delete_one(filter),
                )
                .await
                .map(drop),
        };
        outcome.map_err(|e| {
            StoreError::backend(
                format!(
                    "reverting the activation of {}",
                    policy_label(&ours.name, &ours.version)
                ),
                e,
            )
        })
    }

    pub(super) async fn insert_policy_version_impl(
        &self,
        version: &PolicyVersion,
        bytes: &[u8],
    ) -> Result<()> {
        let label = policy_label(&version.name, &version.version);
        // A cheap early answer for the common duplicate; the unique index decides races.
        if self
            .find_policy(&version.name, &version.version)
            .await?
            .is_some()
        {
            return Err(StoreError::AlreadyExists {
                kind: "policy version",
                id: label,
            });
        }
        let upload_id = uuid::Uuid::now_v7().simple().to_string();
        // Chunks first: until the version's document exists they are unreferenced, so a crash
        // here leaves orphans, never a version without bytes.
        let mut chunks = 0_i64;
        for (n, chunk) in bytes.chunks(POLICY_CHUNK_BYTES).enumerate() {
            let n = i64::try_from(n).map_err(|e| StoreError::backend("numbering a chunk", e))?;
            let written = self
                .policy_chunks
                .insert_one(doc! {
                    "upload_id": &upload_id,
                    "n": n,
                    "name": &version.name,
                    "version": &version.version,
                    "data": bson::Binary {
                        subtype: bson::spec::BinarySubtype::Generic,
                        bytes: chunk.to_vec(),
                    },
                })
                .await;
            if let Err(e) = written {
                // Best effort: what was written is unreferenced either way.
                let _ = self.delete_chunks(&upload_id).await;
                return Err(StoreError::backend(
                    format!("storing chunk {n} of policy {label}"),
                    e,
                ));
            }
            chunks = n + 1;
        }
        let mut document = policy_to_document(version)?;
        document.insert("upload_id", &upload_id);
        document.insert("chunks", chunks);
        match self.policies.insert_one(document).await {
            Ok(_) => Ok(()),
            Err(e) => {
                let _ = self.delete_chunks(&upload_id).await;
                if is_duplicate_key(&e) {
                    Err(StoreError::AlreadyExists {
                        kind: "policy version",
                        id: label,
                    })
                } else {
                    Err(StoreError::backend(
                        format!("inserting policy version {label}"),
                        e,
                    ))
                }
            }
        }
    }

    pub(super) async fn get_policy_version_impl(
        &self,
        name: &str,
        version: &str,
    ) -> Result<PolicyVersion> {
        policy_from_document(&self.require_policy(name, version).await?)
    }

    pub(super) async fn get_policy_bytes_impl(&self, name: &str, version: &str) -> Result<Vec<u8>> {
        let document = self.require_policy(name, version).await?;
        let meta = policy_from_document(&document)?;
        let upload_id = Reader::new(&document, POLICIES).string("upload_id")?;
        let label = policy_label(name, version);
        let chunks: Vec<Document> = self
            .policy_chunks
            .find(doc! { "upload_id": &upload_id })
            .sort(doc! { "n": 1 })
            .await
            .map_err(|e| StoreError::backend(format!("reading the chunks of policy {label}"), e))?
            .try_collect()
            .await
            .map_err(|e| StoreError::backend(format!("reading the chunks of policy {label}"), e))?;
        let mut bytes = Vec::with_capacity(usize::try_from(meta.size_bytes).unwrap_or(0));
        for chunk in &chunks {
            match chunk.get("data") {
                Some(Bson::Binary(b)) => bytes.extend_from_slice(&b.bytes),
                other => {
                    return Err(StoreError::backend(
                        format!("reading the chunks of policy {label}"),
                        format!("a chunk's data is {other:?}, not binary"),
                    ));
                }
            }
        }
        verify_policy_bytes(&meta, &bytes)?;
        Ok(bytes)
    }

    pub(super) async fn list_policy_versions_impl(
        &self,
        name: Option<&str>,
    ) -> Result<Vec<PolicyVersion>> {
        let filter = match name {
            Some(name) => doc! { "name": name },
            None => doc! {},
        };
        let documents: Vec<Document> = self
            .policies
            .find(filter)
            .sort(doc! { "name": 1, "uploaded_at": 1, "version": 1 })
            .await
            .map_err(|e| StoreError::backend("listing policy versions", e))?
            .try_collect()
            .await
            .map_err(|e| StoreError::backend("listing policy versions", e))?;
        documents.iter().map(policy_from_document).collect()
    }

    pub(super) async fn delete_policy_version_impl(&self, name: &str, version: &str) -> Result<()> {
        let label = policy_label(name, version);
        // Mark first, then check the active version; `activate_policy` activates first, then
        // re-checks the mark. Whichever order the two run in, one of them sees the other and
        // backs off, so an active version is never deleted.
        let marked = self
            .atomic(
                lock_key(POLICIES, &format!("{name}@{version}")),
                self.policies
                    .find_one_and_update(
                        doc! { "name": name, "version": version },
                        doc! { "$set": { "deleting": true } },
                    )
                    .return_document(ReturnDocument::After),
            )
            .await
            .map_err(|e| StoreError::backend(format!("marking policy {label} for deletion"), e))?
            .ok_or_else(|| not_found("policy version", &label))?;
        let meta = policy_from_document(&marked)?;
        let upload_id = Reader::new(&marked, POLICIES).string("upload_id")?;
        if let Some(active) = self.find_active_policy(meta.kind).await?
            && active.name == name
            && active.version == version
        {
            self.atomic(
                lock_key(POLICIES, &format!("{name}@{version}")),
                self.policies.update_one(
                    doc! { "name": name, "version": version },
                    doc! { "$unset": { "deleting": "" } },
                ),
            )
            .await
            .map_err(|e| StoreError::backend(format!("unmarking policy {label}"), e))?;
            return Err(StoreError::Conflict {
                kind: "policy version",
                id: label,
                expected: "inactive".to_owned(),
                actual: format!("the active {} policy", meta.kind),
            });
        }
        // The version's document first: a crash after it leaves orphan chunks only.
        self.atomic(
            lock_key(POLICIES, &format!("{name}@{version}")),
            self.policies
                .delete_one(doc! { "name": name, "version": version, "upload_id": &upload_id }),
        )
        .await
        .map_err(|e| StoreError::backend(format!("deleting policy version {label}"), e))?;
        self.delete_chunks(&upload_id).await
    }

    pub(super) async fn get_active_policy_impl(
        &self,
        kind: PolicyKind,
    ) -> Result<Option<ActivePolicy>> {
        self.find_active_policy(kind).await
    }

    pub(super) async fn activate_policy_impl(
        &self,
        kind: PolicyKind,
        name: &str,
        version: &str,
        activated_by: &str,
        expected_current: Option<(String, String)>,
    ) -> Result<ActivePolicy> {
        let label = policy_label(name, version);
        let being_deleted = || StoreError::Conflict {
            kind: "policy version",
            id: label.clone(),
            expected: "present".to_owned(),
            actual: "being deleted".to_owned(),
        };
        let document = self.require_policy(name, version).await?;
        let meta = policy_from_document(&document)?;
        if meta.kind != kind {
            return Err(StoreError::Conflict {
                kind: "policy version",
                id: label,
                expected: format!("a {kind} policy"),
                actual: format!("a {} policy", meta.kind),
            });
        }
        if Reader::new(&document, POLICIES).opt_bool("deleting")? == Some(true) {
            return Err(being_deleted());
        }
        let active = ActivePolicy {
            kind,
            name: name.to_owned(),
            version: version.to_owned(),
            activated_at: model::now(),
            activated_by: activated_by.to_owned(),
            previous: expected_current.clone(),
        };
        let new_document = active_policy_to_document(&active);
        // The compare-and-swap, one single-document write: a first activation is an insert
        // (the unique `_id` = kind refuses a second one), a swap an update matching only the
        // expected version.
        let (applied, before) = match &expected_current {
            None => match self.active_policies.insert_one(new_document).await {
                Ok(_) => (true, None),
                Err(e) if is_duplicate_key(&e) => (false, None),
                Err(e) => {
                    return Err(StoreError::backend(format!("activating policy {label}"), e));
                }
            },
            Some((expected_name, expected_version)) => {
                let before = self
                    .atomic(
                        lock_key(ACTIVE_POLICIES, kind.as_str()),
                        self.active_policies
                            .find_one_and_replace(
                                doc! {
                                    "_id": kind.as_str(),
                                    "name": expected_name,
                                    "version": expected_version,
                                },
                                new_document,
                            )
                            .return_document(ReturnDocument::Before),
                    )
                    .await
                    .map_err(|e| StoreError::backend(format!("activating policy {label}"), e))?;
                (before.is_some(), before)
            }
        };
        if !applied {
            let actual = self
                .find_active_policy(kind)
                .await?
                .map(|a| (a.name, a.version));
            return Err(StoreError::Conflict {
                kind: "active policy",
                id: kind.to_string(),
                expected: active_label(expected_current.as_ref()),
                actual: active_label(actual.as_ref()),
            });
        }
        // See `delete_policy_version`: a deletion that began meanwhile wins.
        let still = self.find_policy(name, version).await?;
        let deleting = match &still {
            Some(d) => Reader::new(d, POLICIES).opt_bool("deleting")? == Some(true),
            None => true,
        };
        if deleting {
            self.revert_activation(&active, before).await?;
            return Err(being_deleted());
        }
        Ok(active)
    }

    pub(super) async fn clear_active_policy_impl(
        &self,
        kind: PolicyKind,
        expected_current: (String, String),
    ) -> Result<()> {
        let (name, version) = &expected_current;
        let deleted = self
            .atomic(
                lock_key(ACTIVE_POLICIES, kind.as_str()),
                self.active_policies.delete_one(doc! {
                    "_id": kind.as_str(),
                    "name": name,
                    "version": version,
                }),
            )
            .await
            .map_err(|e| {
                StoreError::backend(
                    format!(
                        "clearing the active {kind} policy {}",
                        policy_label(name, version)
                    ),
                    e,
                )
            })?;
        if deleted.deleted_count == 1 {
            return Ok(());
        }
        let actual = self
            .find_active_policy(kind)
            .await?
            .map(|a| (a.name, a.version));
        Err(StoreError::Conflict {
            kind: "active policy",
            id: kind.to_string(),
            expected: active_label(Some(&expected_current)),
            actual: active_label(actual.as_ref()),
        })
    }

    pub(super) async fn put_output_file_impl(
        &self,
        task_id: &str,
        attempt: u32,
        path: &str,
        bytes: &[u8],
    ) -> Result<OutputFileInfo> {
        let info = OutputFileInfo {
            task_id: task_id.to_string(),
            path: path.to_string(),
            attempt,
            size_bytes: bytes.len() as u64,
            sha256: sha256_hex(bytes),
        };
        let what = || format!("storing output {path} of '{task_id}'");
        let upload_id = uuid::Uuid::now_v7().simple().to_string();
        // Chunks first, under a fresh upload id: the file's document names them only once
        // they are all written.
        for (n, chunk) in bytes.chunks(POLICY_CHUNK_BYTES).enumerate() {
            let n = i64::try_from(n).map_err(|e| StoreError::backend("numbering a chunk", e))?;
            let written = self
                .task_output_chunks
                .insert_one(doc! {
                    "upload_id": &upload_id,
                    "n": n,
                    "data": bson::Binary {
                        subtype: bson::spec::BinarySubtype::Generic,
                        bytes: chunk.to_vec(),
                    },
                })
                .await;
            if let Err(e) = written {
                self.delete_output_chunks(&upload_id).await;
                return Err(StoreError::backend(what(), e));
            }
        }
        let before = self
            .atomic(
                lock_key(TASK_OUTPUTS, &format!("{task_id}/{path}")),
                self.task_outputs
                    .find_one_and_update(
                        doc! { "task_id": task_id, "path": path },
                        doc! { "$set": {
                            "task_id": task_id,
                            "path": path,
                            "attempt": i64::from(attempt),
                            "size_bytes": u64_to_bson(info.size_bytes, "size_bytes")?,
                            "sha256": &info.sha256,
                            "upload_id": &upload_id,
                        } },
                    )
                    .upsert(true)
                    .return_document(ReturnDocument::Before),
            )
            .await;
        match before {
            Ok(Some(old)) => {
                if let Ok(old_upload) = Reader::new(&old, TASK_OUTPUTS).string("upload_id") {
                    self.delete_output_chunks(&old_upload).await;
                }
            }
            Ok(None) => {}
            Err(e) => {
                self.delete_output_chunks(&upload_id).await;
                return Err(StoreError::backend(what(), e));
            }
        }
        Ok(info)
    }

    pub(super) async fn list_output_files_impl(
        &self,
        task_id: &str,
    ) -> Result<Vec<OutputFileInfo>> {
        let what = || format!("listing the output files of '{task_id}'");
        let documents: Vec<Document> = self
            .task_outputs
            .find(doc! { "task_id": task_id })
            .sort(doc! { "path": 1 })
            .await
            .map_err(|e| StoreError::backend(what(), e))?
            .try_collect()
            .await
            .map_err(|e| StoreError::backend(what(), e))?;
        documents.iter().map(output_from_document).collect()
    }

    pub(super) async fn get_output_file_impl(
        &self,
        task_id: &str,
        path: &str,
    ) -> Result<(OutputFileInfo, Vec<u8>)> {
        let what = || format!("reading output {path} of '{task_id}'");
        let document = self
            .task_outputs
            .find_one(doc! { "task_id": task_id, "path": path })
            .await
            .map_err(|e| StoreError::backend(what(), e))?
            .ok_or_else(|| not_found("output file", &format!("{task_id}/{path}")))?;
        let info = output_from_document(&document)?;
        let upload_id = Reader::new(&document, TASK_OUTPUTS).string("upload_id")?;
        let chunks: Vec<Document> = self
            .task_output_chunks
            .find(doc! { "upload_id": &upload_id })
            .sort(doc! { "n": 1 })
            .await
            .map_err(|e| StoreError::backend(what(), e))?
            .try_collect()
            .await
            .map_err(|e| StoreError::backend(what(), e))?;
        let mut bytes = Vec::with_capacity(usize::try_from(info.size_bytes).unwrap_or(0));
        for chunk in &chunks {
            match chunk.get("data") {
                Some(Bson::Binary(b)) => bytes.extend_from_slice(&b.bytes),
                other => {
                    return Err(StoreError::backend(
                        what(),
                        format!("a chunk's data is {other:?}, not binary"),
                    ));
                }
            }
        }
        verify_output_bytes(&info, &bytes)?;
        Ok((info, bytes))
    }
}
