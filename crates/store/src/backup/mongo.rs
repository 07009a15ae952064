//! Backup and restore of a MongoDB store, in `mongodump`'s layout (which `mongorestore` reads):
//! `<collection>.bson`, the collection's documents as the server sent them (raw BSON, one after
//! another, never decoded and re-encoded), and `<collection>.metadata.json`, its indexes and
//! options in canonical extended JSON.
//!
//! Collections are read one after another, each in `_id` order: every document is read once,
//! but the copy is not a point-in-time snapshot across collections (a task finished during the
//! backup may be in TASKS as running and in RESULTS as done). A host started on the restored
//! database repairs such drift as it repairs a crash (the reconciler). `mongodump --oplog` on a
//! replica set is the point-in-time alternative.

use std::collections::BTreeSet;
use std::io::{BufReader, BufWriter, ErrorKind, Read, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use bson::{Bson, Document, RawDocumentBuf, doc};
use futures::TryStreamExt;
use mongodb::options::ClientOptions;
use mongodb::{Client, Database};

use super::{Cleanup, extjson, sibling, sync_dir};
use crate::mongo::{LOCK_COLLECTION, META, SCHEMA_VERSION, TASKS};

/// The largest document a dump may hold: MongoDB's 16 MiB, with room for what a server adds.
const MAX_DOCUMENT_BYTES: usize = 16 * 1024 * 1024 + 16 * 1024;

/// The most documents, and bytes, one `insert` of a restore carries.
const INSERT_BATCH_DOCUMENTS: usize = 1000;
const INSERT_BATCH_BYTES: usize = 8 * 1024 * 1024;

/// The suffixes of a dump's files.
const DATA_SUFFIX: &str = ".bson";
const METADATA_SUFFIX: &str = ".metadata.json";

/// What a backup wrote or a restore inserted.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Summary {
    pub collections: usize,
    pub documents: u64,
    /// Bytes of documents.
    pub bytes: u64,
    /// Indexes created (restore; `_id` not counted).
    pub indexes: usize,
}

/// Connects with the host's defaults (majority reads and writes unless the URI says
/// otherwise, a short server-selection timeout) and checks that the server answers.
async fn connect(uri: &str, database: &str) -> anyhow::Result<Database> {
    let mut options = ClientOptions::parse(uri)
        .await
        .context("parsing the MongoDB URI")?;
    crate::mongo::apply_production_defaults(&mut options);
    options.app_name = Some("cloudai-backup".to_owned());
    let hosts = options
        .hosts
        .iter()
        .map(|h| h.to_string())
        .collect::<Vec<_>>()
        .join(",");
    let client = Client::with_options(options).context("creating the MongoDB client")?;
    let db = client.database(database);
    db.run_command(doc! { "ping": 1 }).await.with_context(|| {
        format!("reaching MongoDB at {hosts} (is the server running and reachable?)")
    })?;
    Ok(db)
}

/// The collections of `db` that a backup copies: not views, not `system.*`, not the FerretDB
/// 1.x write locks (transient), in name order, each with its options.
async fn collections(db: &Database) -> anyhow::Result<Vec<(String, Document)>> {
    let mut cursor = db
        .run_cursor_command(doc! { "listCollections": 1 })
        .await
        .context("listing the collections")?;
    let mut found = Vec::new();
    while let Some(spec) = cursor.try_next().await.context("listing the collections")? {
        let name = spec.get_str("name").unwrap_or_default().to_owned();
        let kind = spec.get_str("type").unwrap_or("collection");
        if name.is_empty()
            || kind != "collection"
            || name.starts_with("system.")
            || name == LOCK_COLLECTION
        {
            continue;
        }
        let options = spec.get_document("options").cloned().unwrap_or_default();
        found.push((name, options));
    }
    found.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(found)
}

/// Writes every collection of `database` into the directory `out` (created; an existing one
/// only with `force`, and only when it holds nothing but a dump's files).
pub async fn backup(uri: &str, database: &str, out: &Path, force: bool) -> anyhow::Result<Summary> {
    if out.exists() {
        if !out.is_dir() {
            bail!(
                "{} exists and is not a directory (a MongoDB backup is a directory)",
                out.display()
            );
        }
        let entries = dump_entries(out)?;
        if !entries.others.is_empty() {
            bail!(
                "{} holds files other than a backup's ({}): choose another --out",
                out.display(),
                entries.others.join(", ")
            );
        }
        if !force && !entries.names.is_empty() {
            bail!(
                "{} already holds a backup: pass --force to replace it",
                out.display()
            );
        }
    }
    let db = connect(uri, database).await?;
    let collections = collections(&db).await?;
    if !collections.iter().any(|(name, _)| name == TASKS) {
        let names: Vec<&str> = collections.iter().map(|(n, _)| n.as_str()).collect();
        bail!(
            "MongoDB database '{database}' holds no CloudAI data (no {TASKS} collection; it has \
             {}): check --mongodb-database",
            if names.is_empty() {
                "none".to_string()
            } else {
                names.join(", ")
            }
        );
    }

    let partial = sibling(out, ".", &format!(".partial-{}", std::process::id()))?;
    let cleanup = Cleanup::new(vec![partial.clone()]);
    if partial.exists() {
        std::fs::remove_dir_all(&partial)
            .with_context(|| format!("removing {}", partial.display()))?;
    }
    std::fs::create_dir_all(&partial).with_context(|| format!("creating {}", partial.display()))?;
    let mut summary = Summary::default();
    for (name, options) in &collections {
        let (documents, bytes) = dump_collection(&db, name, options, &partial)
            .await
            .with_context(|| format!("backing up collection {name}"))?;
        println!("{name}: {documents} documents");
        summary.collections += 1;
        summary.documents += documents;
        summary.bytes += bytes;
    }
    sync_dir(&partial)?;
    if out.exists() {
        // Checked above: nothing but an older backup's files.
        std::fs::remove_dir_all(out)
            .with_context(|| format!("removing the older backup {}", out.display()))?;
    }
    std::fs::rename(&partial, out)
        .with_context(|| format!("renaming {} to {}", partial.display(), out.display()))?;
    cleanup.keep();
    sync_dir(out.parent().unwrap_or(Path::new(".")))?;
    Ok(summary)
}

/// Writes `name`'s documents and metadata into `dir`: (documents, bytes).
async fn dump_collection(
    db: &Database,
    name: &str,
    options: &Document,
    dir: &Path,
) -> anyhow::Result<(u64, u64)> {
    let mut indexes = Vec::new();
    let mut cursor = db
        .run_cursor_command(doc! { "listIndexes": name })
        .await
        .context("listing its indexes")?;
    while let Some(index) = cursor.try_next().await.context("listing its indexes")? {
        indexes.push(Bson::Document(index));
    }
    let metadata = doc! {
        "indexes": indexes,
        "collectionName": name,
        "type": "collection",
        "options": options.clone(),
    };
    let metadata_path = dir.join(format!("{name}{METADATA_SUFFIX}"));
    std::fs::write(&metadata_path, extjson::to_string(&metadata))
        .with_context(|| format!("writing {}", metadata_path.display()))?;

    let data_path = dir.join(format!("{name}{DATA_SUFFIX}"));
    let file = std::fs::File::create(&data_path)
        .with_context(|| format!("creating {}", data_path.display()))?;
    let mut writer = BufWriter::new(file);
    // In `_id` order: a document that moves on disk while the cursor runs is still read once.
    let mut documents = db
        .collection::<RawDocumentBuf>(name)
        .find(doc! {})
        .sort(doc! { "_id": 1 })
        .await
        .context("reading its documents")?;
    let (mut count, mut bytes) = (0u64, 0u64);
    while let Some(document) = documents
        .try_next()
        .await
        .context("reading its documents")?
    {
        let raw = document.as_bytes();
        writer
            .write_all(raw)
            .with_context(|| format!("writing {}", data_path.display()))?;
        count += 1;
        bytes += raw.len() as u64;
        if count.is_multiple_of(100_000) {
            println!("{name}: {count} documents so far");
        }
    }
    let file = writer
        .into_inner()
        .map_err(|e| e.into_error())
        .with_context(|| format!("writing {}", data_path.display()))?;
    file.sync_all()
        .with_context(|| format!("syncing {}", data_path.display()))?;
    Ok((count, bytes))
}

/// The files of a dump directory: the collections it names, and any other entries.
struct DumpEntries {
    names: BTreeSet<String>,
    others: Vec<String>,
}

fn dump_entries(dir: &Path) -> anyhow::Result<DumpEntries> {
    let mut entries = DumpEntries {
        names: BTreeSet::new(),
        others: Vec::new(),
    };
    for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let entry = entry.with_context(|| format!("reading {}", dir.display()))?;
        let file_name = entry.file_name().to_string_lossy().into_owned();
        let is_file = entry.file_type().map(|t| t.is_file()).unwrap_or(false);
        let name = file_name
            .strip_suffix(METADATA_SUFFIX)
            .or_else(|| file_name.strip_suffix(DATA_SUFFIX));
        match name {
            Some(name) if is_file && !name.is_empty() => {
                entries.names.insert(name.to_owned());
            }
            _ => entries.others.push(file_name),
        }
    }
    entries.others.sort();
    Ok(entries)
}

/// Inserts the dump in `from` into `database`, which must hold no collection yet, then
/// creates the indexes its metadata lists.
pub async fn restore(from: &Path, uri: &str, database: &str) -> anyhow::Result<Summary> {
    let entries = dump_entries(from)?;
    if !entries.names.contains(TASKS) {
        bail!(
            "{} holds no CloudAI backup (no {TASKS}{DATA_SUFFIX} nor {TASKS}{METADATA_SUFFIX})",
            from.display()
        );
    }
    let meta = from.join(format!("{META}{DATA_SUFFIX}"));
    if let Some(version) = dumped_schema_version(&meta)?
        && version > SCHEMA_VERSION
    {
        bail!(
            "the backup's schema version {version} was written by a newer cloudai (this one \
             knows {SCHEMA_VERSION}): restore it with that release"
        );
    }
    let db = connect(uri, database).await?;
    let existing = collections(&db).await?;
    if !existing.is_empty() {
        let names: Vec<&str> = existing.iter().map(|(n, _)| n.as_str()).collect();
        bail!(
            "MongoDB database '{database}' is not empty (it holds {}): restore into an empty \
             database (a new --mongodb-database, or drop this one first)",
            names.join(", ")
        );
    }
    let mut summary = Summary::default();
    for name in &entries.names {
        let (documents, bytes, indexes) = restore_collection(&db, name, from)
            .await
            .with_context(|| format!("restoring collection {name}"))?;
        println!("{name}: {documents} documents, {indexes} indexes");
        summary.collections += 1;
        summary.documents += documents;
        summary.bytes += bytes;
        summary.indexes += indexes;
    }
    Ok(summary)
}

/// The version of `META`'s schema document in a dump's `META.bson`, when there is one.
fn dumped_schema_version(path: &Path) -> anyhow::Result<Option<i64>> {
    if !path.exists() {
        return Ok(None);
    }
    let mut reader = DumpReader::open(path)?;
    while let Some(raw) = reader.next()? {
        let document = Document::try_from(&raw)
            .with_context(|| format!("decoding a document of {}", path.display()))?;
        if document.get_str("_id").ok() == Some("schema") {
            let version = match document.get("version").cloned() {
                Some(Bson::Int32(v)) => i64::from(v),
                Some(Bson::Int64(v)) => v,
                Some(Bson::Double(v)) => v as i64,
                other => bail!("{}: the schema version is {other:?}", path.display()),
            };
            return Ok(Some(version));
        }
    }
    Ok(None)
}

/// Creates `name` with its dumped options, inserts its documents in ordered batches, then
/// creates its indexes one by one: (documents, bytes, indexes).
async fn restore_collection(
    db: &Database,
    name: &str,
    from: &Path,
) -> anyhow::Result<(u64, u64, usize)> {
    let metadata_path = from.join(format!("{name}{METADATA_SUFFIX}"));
    let (options, indexes) = if metadata_path.exists() {
        read_metadata(&metadata_path)?
    } else {
        (Document::new(), Vec::new())
    };
    let mut create = doc! { "create": name };
    create.extend(options);
    db.run_command(create)
        .await
        .context("creating the collection")?;

    let collection = db.collection::<RawDocumentBuf>(name);
    let (mut count, mut bytes) = (0u64, 0u64);
    let data_path = from.join(format!("{name}{DATA_SUFFIX}"));
    if data_path.exists() {
        let mut reader = DumpReader::open(&data_path)?;
        let mut batch = Vec::new();
        let mut batch_bytes = 0usize;
        loop {
            let next = reader.next()?;
            let full = batch.len() >= INSERT_BATCH_DOCUMENTS || batch_bytes >= INSERT_BATCH_BYTES;
            if (next.is_none() || full) && !batch.is_empty() {
                collection
                    .insert_many(&batch)
                    .ordered(true)
                    .await
                    .with_context(|| {
                        format!(
                            "inserting documents {} to {}",
                            count + 1,
                            count + batch.len() as u64
                        )
                    })?;
                count += batch.len() as u64;
                batch.clear();
                batch_bytes = 0;
                if count.is_multiple_of(100_000) {
                    println!("{name}: {count} documents so far");
                }
            }
            let Some(document) = next else { break };
            bytes += document.as_bytes().len() as u64;
            batch_bytes += document.as_bytes().len();
            batch.push(document);
        }
    }

    let mut created = 0;
    for mut index in indexes {
        if index.get_str("name").ok() == Some("_id_") {
            continue;
        }
        // The server fills in its own index version; `ns` is from older servers.
        index.remove("v");
        index.remove("ns");
        let index_name = index.get_str("name").unwrap_or("(unnamed)").to_owned();
        // One index per command: FerretDB 1.x fails on a `createIndexes` naming several that
        // exist (the store's own start-up does the same).
        db.run_command(doc! { "createIndexes": name, "indexes": [index] })
            .await
            .with_context(|| format!("creating index {index_name}"))?;
        created += 1;
    }
    Ok((count, bytes, created))
}

/// A collection's options and index specifications from its `.metadata.json`.
fn read_metadata(path: &Path) -> anyhow::Result<(Document, Vec<Document>)> {
    let text = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let metadata =
        extjson::from_slice(&text).with_context(|| format!("parsing {}", path.display()))?;
    let options = match metadata.get("options") {
        Some(Bson::Document(options)) => options.clone(),
        None | Some(Bson::Null) => Document::new(),
        Some(other) => bail!("{}: options is not a document: {other}", path.display()),
    };
    let mut indexes = Vec::new();
    match metadata.get("indexes") {
        Some(Bson::Array(list)) => {
            for index in list {
                let Bson::Document(index) = index else {
                    bail!("{}: an index is not a document: {index}", path.display());
                };
                indexes.push(index.clone());
            }
        }
        None => {}
        Some(other) => bail!("{}: indexes is not a list: {other}", path.display()),
    }
    Ok((options, indexes))
}

/// Reads a `.bson` dump: documents one after another, each starting with its length.
struct DumpReader {
    path: PathBuf,
    reader: BufReader<std::fs::File>,
    offset: u64,
}

impl DumpReader {
    fn open(path: &Path) -> anyhow::Result<DumpReader> {
        let file =
            std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
        Ok(DumpReader {
            path: path.to_path_buf(),
            reader: BufReader::new(file),
            offset: 0,
        })
    }

    /// The next document, `None` at the end of the file.
    fn next(&mut self) -> anyhow::Result<Option<RawDocumentBuf>> {
        let mut length = [0u8; 4];
        let mut read = 0;
        while read < length.len() {
            match self.reader.read(&mut length[read..]) {
                Ok(0) if read == 0 => return Ok(None),
                Ok(0) => bail!(
                    "{} ends inside a document's length (at byte {}): truncated?",
                    self.path.display(),
                    self.offset
                ),
                Ok(n) => read += n,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => {
                    return Err(e).with_context(|| format!("reading {}", self.path.display()));
                }
            }
        }
        let declared = i32::from_le_bytes(length);
        let size = usize::try_from(declared).unwrap_or(0);
        if !(5..=MAX_DOCUMENT_BYTES).contains(&size) {
            bail!(
                "{}: the document at byte {} declares {declared} bytes: not a BSON dump",
                self.path.display(),
                self.offset
            );
        }
        let mut bytes = vec![0u8; size];
        bytes[..4].copy_from_slice(&length);
        self.reader.read_exact(&mut bytes[4..]).with_context(|| {
            format!(
                "{}: the document at byte {} is cut short: truncated?",
                self.path.display(),
                self.offset
            )
        })?;
        let document = RawDocumentBuf::from_bytes(bytes).with_context(|| {
            format!(
                "{}: the document at byte {} is not BSON",
                self.path.display(),
                self.offset
            )
        })?;
        self.offset += size as u64;
        Ok(Some(document))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use crate::TaskStore;
    use crate::WorkerStore;

    #[test]
    fn a_dump_file_reads_back_document_by_document_and_a_cut_one_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("T.bson");
        let docs = [doc! { "_id": 1, "a": "x" }, doc! { "_id": 2, "b": [1, 2] }];
        let mut bytes = Vec::new();
        for d in &docs {
            bytes.extend_from_slice(RawDocumentBuf::try_from(d).unwrap().as_bytes());
        }
        std::fs::write(&path, &bytes).unwrap();
        let mut reader = DumpReader::open(&path).unwrap();
        for d in &docs {
            assert_eq!(
                &Document::try_from(&reader.next().unwrap().unwrap()).unwrap(),
                d
            );
        }
        assert!(reader.next().unwrap().is_none());

        std::fs::write(&path, &bytes[..bytes.len() - 3]).unwrap();
        let mut reader = DumpReader::open(&path).unwrap();
        reader.next().unwrap();
        let error = reader.next().unwrap_err();
        assert!(format!("{error:#}").contains("cut short"), "{error:#}");

        std::fs::write(&path, b"{\"not\": \"bson\"}").unwrap();
        let error = DumpReader::open(&path).unwrap().next().unwrap_err();
        assert!(
            format!("{error:#}").contains("not a BSON dump"),
            "{error:#}"
        );
    }

    #[test]
    fn metadata_keeps_the_types_of_index_specifications() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("T.metadata.json");
        // Out of alphabetical order: a compound index's key is its fields' order.
        let index = doc! {
            "v": 2, "key": { "b": 1, "a": -1i64 }, "name": "b_1_a_-1", "unique": true,
            "partialFilterExpression": { "status": { "$eq": "queued" } },
        };
        let metadata = doc! {
            "indexes": [index.clone()], "collectionName": "T", "type": "collection", "options": {},
        };
        std::fs::write(&path, extjson::to_string(&metadata)).unwrap();
        let (options, indexes) = read_metadata(&path).unwrap();
        assert!(options.is_empty());
        assert_eq!(indexes, std::slice::from_ref(&index));
        let fields: Vec<&String> = indexes[0].get_document("key").unwrap().keys().collect();
        assert_eq!(fields, ["b", "a"]);
    }

    #[tokio::test]
    async fn a_backup_restores_into_an_empty_database_with_the_same_documents_and_indexes() {
        use crate::model::Resources;
        use crate::mongo::MongoStore;
        use crate::mongo::testing::{DropDatabase, connect_test_store};

        let Some((store, guard)) = connect_test_store().await else {
            return;
        };
        let uri = guard.uri.clone();
        let tasks: Vec<_> = ["t1", "t2"]
            .map(|id| crate::conformance::sample_task(id, "alice"))
            .into();
        for task in &tasks {
            store.insert_task(task, None).await.unwrap();
        }
        let worker = crate::conformance::sample_worker("w1", Resources::new(4.0, 8.0, 100.0, 0.0));
        store.insert_worker(&worker).await.unwrap();

        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("dump");
        let summary = backup(&uri, &guard.database, &out, false).await.unwrap();
        assert_eq!(
            summary.documents, 4,
            "two tasks, a worker, META's schema: {summary:?}"
        );
        let error = backup(&uri, &guard.database, &out, false)
            .await
            .unwrap_err();
        assert!(format!("{error:#}").contains("pass --force"), "{error:#}");

        let restored = DropDatabase {
            uri: uri.clone(),
            database: format!("cloudai_test_{}", uuid::Uuid::now_v7().simple()),
        };
        let summary = restore(&out, &uri, &restored.database).await.unwrap();
        assert_eq!(summary.documents, 4, "{summary:?}");
        assert!(summary.indexes > 10, "{summary:?}");
        // Into a database that is not empty: refused, naming what it holds.
        let error = restore(&out, &uri, &restored.database).await.unwrap_err();
        let message = format!("{error:#}");
        assert!(
            message.contains("is not empty") && message.contains("TASKS"),
            "{message}"
        );

        let db = connect(&uri, &restored.database).await.unwrap();
        let names = |db: Database| async move {
            let mut names = db.list_collection_names().await.unwrap();
            // FerretDB 1.x's write locks are not backed up.
            names.retain(|n| n != LOCK_COLLECTION);
            names.sort();
            names
        };
        assert_eq!(
            names(db.clone()).await,
            names(store.database().clone()).await
        );
        // Each index with its key, fields in order.
        let index_names = |db: Database| async move {
            let mut cursor = db
                .run_cursor_command(doc! { "listIndexes": TASKS })
                .await
                .unwrap();
            let mut names = Vec::new();
            while let Some(index) = cursor.try_next().await.unwrap() {
                let key = index.get_document("key").unwrap().to_string();
                names.push((index.get_str("name").unwrap().to_owned(), key));
            }
            names.sort();
            names
        };
        assert_eq!(
            index_names(db).await,
            index_names(store.database().clone()).await
        );
        let reopened = MongoStore::connect(&uri, &restored.database).await.unwrap();
        for task in &tasks {
            assert_eq!(&reopened.get_task(&task.task_id).await.unwrap(), task);
        }
        assert_eq!(reopened.get_worker("w1").await.unwrap(), worker);
    }

    #[test]
    fn dump_entries_tell_a_dump_from_other_files() {
        let dir = tempfile::tempdir().unwrap();
        for name in [
            "TASKS.bson",
            "TASKS.metadata.json",
            "META.bson",
            "notes.txt",
        ] {
            std::fs::write(dir.path().join(name), b"").unwrap();
        }
        let entries = dump_entries(dir.path()).unwrap();
        assert_eq!(
            entries.names.into_iter().collect::<Vec<_>>(),
            ["META", "TASKS"]
        );
        assert_eq!(entries.others, ["notes.txt"]);
    }
}
