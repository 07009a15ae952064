//! Backup and restore of the embedded store.
//!
//! [`backup`] copies the database with SQLite's online backup API in one step, that is inside
//! one read transaction of the source: in WAL mode that never blocks the host's writer, and the
//! copy is the database as of one commit, whatever the host writes meanwhile. The copy is
//! written beside its destination, switched to the rollback journal (one self-contained file,
//! no `-wal`), synced, then renamed into place.
//!
//! [`restore`] copies the backup beside the data directory's database, checks the copy (SQLite's
//! `integrity_check`, CloudAI's tables, a schema version this binary knows), and only then
//! renames it into place. It refuses to replace a database without `force`, and a database that
//! a process (a running host) has open in any case.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use rusqlite::backup::{Backup, StepResult};
use rusqlite::{Connection, ErrorCode, OpenFlags, OptionalExtension};

use super::{Cleanup, sibling, sync_dir};
use crate::sqlite::{DB_FILE_NAME, SCHEMA_VERSION};

/// How long the copy waits for the source while it is locked (WAL recovery by another
/// connection; a writer never blocks it).
const BUSY_FOR: Duration = Duration::from_secs(30);

/// What a backup or restore copied, for people.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Summary {
    /// Size of the database file written.
    pub bytes: u64,
    /// Its `PRAGMA user_version`.
    pub schema_version: i64,
    pub tasks: i64,
    pub workers: i64,
    pub policy_versions: i64,
    pub active_policies: i64,
}

/// Copies the database at `source` (a data directory's `cloudai.db`, its host running or not)
/// to the file `out`; refuses to replace an existing `out` unless `force`.
pub fn backup(source: &Path, out: &Path, force: bool) -> anyhow::Result<Summary> {
    if !source.is_file() {
        bail!(
            "there is no CloudAI database at {} (is --data-dir the host's data directory?)",
            source.display()
        );
    }
    if out.is_dir() {
        bail!(
            "{} is a directory: name the file to write, e.g. {}",
            out.display(),
            out.join("cloudai-backup.db").display()
        );
    }
    if out.exists() && !force {
        bail!(
            "{} already exists: pass --force to replace it",
            out.display()
        );
    }
    let what = || format!("backing up {} to {}", source.display(), out.display());
    // Read-write (never created): a reader of a WAL database takes part in its shared-memory
    // index, which needs write access to `-shm`.
    let from = Connection::open_with_flags(
        source,
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .with_context(|| format!("opening {}", source.display()))?;
    from.busy_timeout(BUSY_FOR)
        .with_context(|| format!("setting the busy timeout of {}", source.display()))?;
    let version = schema_version(&from)
        .with_context(|| format!("reading the schema of {}", source.display()))?;
    if version == 0 && !has_table(&from, "TASKS")? {
        bail!(
            "{} is not a CloudAI database (no TASKS table)",
            source.display()
        );
    }

    let partial = sibling(out, ".", &format!(".partial-{}", std::process::id()))?;
    let mut leftovers = vec![partial.clone()];
    for suffix in ["-journal", "-wal", "-shm"] {
        leftovers.push(sibling(&partial, "", suffix)?);
    }
    let cleanup = Cleanup::new(leftovers);
    if let Some(parent) = out.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("creating the directory {}", parent.display()))?;
    }
    let _ = std::fs::remove_file(&partial);
    let mut to = Connection::open(&partial)
        .with_context(|| format!("creating {}", partial.display()))
        .with_context(what)?;
    copy(&from, &mut to).with_context(what)?;
    drop(from);
    // One self-contained file: the rollback journal rather than WAL (the copy took the
    // source's mode); a host that opens it switches it back to WAL.
    let mode: String = to
        .query_row("PRAGMA journal_mode = DELETE", [], |row| row.get(0))
        .with_context(|| format!("switching {} to the rollback journal", partial.display()))?;
    if !mode.eq_ignore_ascii_case("delete") {
        bail!(
            "{} stayed in journal mode '{mode}' (expected 'delete')",
            partial.display()
        );
    }
    let mut summary = summarize(&to).with_context(|| format!("reading {}", partial.display()))?;
    to.close()
        .map_err(|(_, e)| e)
        .with_context(|| format!("closing {}", partial.display()))?;
    std::fs::File::open(&partial)
        .and_then(|f| f.sync_all())
        .with_context(|| format!("syncing {}", partial.display()))?;
    std::fs::rename(&partial, out)
        .with_context(|| format!("renaming {} to {}", partial.display(), out.display()))?;
    cleanup.keep();
    sync_dir(out.parent().unwrap_or(Path::new(".")))?;
    summary.bytes = std::fs::metadata(out)
        .with_context(|| format!("reading the size of {}", out.display()))?
        .len();
    Ok(summary)
}

/// Copies every page of `from` into `to` in one step: one read transaction of `from`, so the
/// copy is consistent even while another process writes.
fn copy(from: &Connection, to: &mut Connection) -> anyhow::Result<()> {
    let backup = Backup::new(from, to).context("starting SQLite's backup")?;
    let started = Instant::now();
    loop {
        match backup.step(-1).context("copying the database's pages")? {
            StepResult::Done => return Ok(()),
            // A negative step copies everything at once; More would mean it did not.
            StepResult::More => {}
            StepResult::Busy | StepResult::Locked => {
                if started.elapsed() >= BUSY_FOR {
                    bail!("the database stayed locked for {} s", BUSY_FOR.as_secs());
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            _ => {}
        }
    }
}

/// Puts the backup `from` in place as `data_dir`'s database, after checking it. Refuses when
/// the data directory already holds a database, unless `force`; with `force`, refuses while a
/// process (a host) has that database open, and removes its `-wal` and `-shm` with it.
pub fn restore(from: &Path, data_dir: &Path, force: bool) -> anyhow::Result<Summary> {
    if !from.is_file() {
        bail!("there is no backup file at {}", from.display());
    }
    let from_wal = sibling(from, "", "-wal")?;
    if std::fs::metadata(&from_wal).is_ok_and(|m| m.len() > 0) {
        bail!(
            "{} exists: {} is open in a process or was not closed cleanly, so the file alone \
             is not the whole database. Restore a file written by `cloudai backup`",
            from_wal.display(),
            from.display()
        );
    }
    let target = data_dir.join(DB_FILE_NAME);
    let replacing = target.exists();
    if replacing && !force {
        bail!(
            "{} already holds a CloudAI database ({}): stop its host and pass --force to \
             replace it, or restore into another --data-dir",
            data_dir.display(),
            target.display()
        );
    }
    std::fs::create_dir_all(data_dir)
        .with_context(|| format!("creating the data directory {}", data_dir.display()))?;

    let restoring = data_dir.join(format!(".{DB_FILE_NAME}.restore-{}", std::process::id()));
    let mut leftovers = vec![restoring.clone()];
    for suffix in ["-journal", "-wal", "-shm"] {
        leftovers.push(sibling(&restoring, "", suffix)?);
    }
    let cleanup = Cleanup::new(leftovers);
    std::fs::copy(from, &restoring)
        .with_context(|| format!("copying {} to {}", from.display(), restoring.display()))?;
    let mut summary = check(&restoring).with_context(|| format!("checking {}", from.display()))?;
    std::fs::File::open(&restoring)
        .and_then(|f| f.sync_all())
        .with_context(|| format!("syncing {}", restoring.display()))?;

    if replacing {
        if in_use(&target)? {
            bail!(
                "{} is open in another process: a host is running on {}. Stop it first",
                target.display(),
                data_dir.display()
            );
        }
        // The old database's log and index would be read as the new one's.
        for suffix in ["-wal", "-shm"] {
            let side = sibling(&target, "", suffix)?;
            match std::fs::remove_file(&side) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    return Err(e).with_context(|| format!("removing {}", side.display()));
                }
            }
        }
    }
    std::fs::rename(&restoring, &target)
        .with_context(|| format!("renaming {} to {}", restoring.display(), target.display()))?;
    cleanup.keep();
    sync_dir(data_dir)?;
    summary.bytes = std::fs::metadata(&target)
        .with_context(|| format!("reading the size of {}", target.display()))?
        .len();
    Ok(summary)
}

/// Checks that the file at `path` is a whole CloudAI database this binary can open: SQLite's
/// `integrity_check`, the TASKS table, a schema version not newer than [`SCHEMA_VERSION`].
fn check(path: &Path) -> anyhow::Result<Summary> {
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .context("opening it")?;
    let problems: Vec<String> =
        match conn
            .prepare("PRAGMA integrity_check(20)")
            .and_then(|mut s| {
                s.query_map([], |row| row.get::<_, String>(0))?
                    .collect::<rusqlite::Result<Vec<String>>>()
            }) {
            Ok(rows) => rows,
            Err(e) if e.sqlite_error_code() == Some(ErrorCode::NotADatabase) => {
                bail!("it is not a SQLite database")
            }
            Err(e) => return Err(e).context("running SQLite's integrity_check"),
        };
    if problems != ["ok"] {
        bail!(
            "SQLite's integrity_check found it damaged:\n  {}",
            problems.join("\n  ")
        );
    }
    let version = schema_version(&conn)?;
    if !has_table(&conn, "TASKS")? {
        bail!("it is not a CloudAI database (no TASKS table)");
    }
    if version > SCHEMA_VERSION {
        bail!(
            "its schema version {version} was written by a newer cloudai (this one knows \
             {SCHEMA_VERSION}): restore it with that release"
        );
    }
    let summary = summarize(&conn)?;
    conn.close().map_err(|(_, e)| e).context("closing it")?;
    Ok(summary)
}

/// Whether another connection (of any process) has the database at `path` open: a host holds
/// a shared lock on its WAL database for as long as it runs, so taking an exclusive lock,
/// without waiting, fails while one does.
pub fn in_use(path: &Path) -> anyhow::Result<bool> {
    let what = || format!("checking whether a process has {} open", path.display());
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .with_context(what)?;
    conn.busy_timeout(Duration::ZERO).with_context(what)?;
    conn.pragma_update(None, "locking_mode", "EXCLUSIVE")
        .with_context(what)?;
    let busy = |e: &rusqlite::Error| {
        matches!(
            e.sqlite_error_code(),
            Some(ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked)
        )
    };
    let outcome = match conn.execute_batch("BEGIN EXCLUSIVE; COMMIT;") {
        Ok(()) => false,
        Err(e) if busy(&e) => true,
        Err(e) => return Err(e).with_context(what),
    };
    drop(conn);
    Ok(outcome)
}

fn schema_version(conn: &Connection) -> anyhow::Result<i64> {
    conn.query_row("PRAGMA user_version", [], |row| row.get(0))
        .context("reading PRAGMA user_version")
}

fn has_table(conn: &Connection, name: &str) -> anyhow::Result<bool> {
    Ok(conn
        .query_row(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?1",
            [name],
            |_| Ok(()),
        )
        .optional()
        .with_context(|| format!("looking for the {name} table"))?
        .is_some())
}

fn summarize(conn: &Connection) -> anyhow::Result<Summary> {
    let count = |table: &str| -> anyhow::Result<i64> {
        if !has_table(conn, table)? {
            return Ok(0);
        }
        conn.query_row(&format!("SELECT count(*) FROM {table}"), [], |row| {
            row.get(0)
        })
        .with_context(|| format!("counting the rows of {table}"))
    };
    Ok(Summary {
        bytes: 0,
        schema_version: schema_version(conn)?,
        tasks: count("TASKS")?,
        workers: count("WORKER_REGISTRY")?,
        policy_versions: count("POLICIES")?,
        active_policies: count("ACTIVE_POLICIES")?,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use crate::TaskStore;
    use crate::sqlite::SqliteStore;

    fn task(id: &str) -> crate::model::Task {
        crate::conformance::sample_task(id, "alice")
    }

    #[tokio::test]
    async fn a_backup_taken_while_the_store_is_open_restores_the_same_tasks() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        let store = SqliteStore::open_in_dir(&data).unwrap();
        let tasks: Vec<_> = ["t1", "t2", "t3", "t4"].map(task).into();
        for task in &tasks[..3] {
            store.insert_task(task, None).await.unwrap();
        }
        let out = dir.path().join("backups").join("one.db");
        let summary = backup(&data.join(DB_FILE_NAME), &out, false).unwrap();
        assert_eq!((summary.tasks, summary.workers), (3, 0), "{summary:?}");
        assert_eq!(summary.schema_version, SCHEMA_VERSION);
        assert!(summary.bytes > 0);
        // One self-contained file: nothing beside it.
        let names: Vec<_> = std::fs::read_dir(out.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, ["one.db"]);

        // Not over an existing file unless forced.
        let error = backup(&data.join(DB_FILE_NAME), &out, false).unwrap_err();
        assert!(
            format!("{error:#}").contains("already exists: pass --force"),
            "{error:#}"
        );
        store.insert_task(&tasks[3], None).await.unwrap();
        let summary = backup(&data.join(DB_FILE_NAME), &out, true).unwrap();
        assert_eq!(summary.tasks, 4);

        // Into a data directory whose database is open: refused, even when forced.
        let error = restore(&out, &data, false).unwrap_err();
        assert!(format!("{error:#}").contains("pass --force"), "{error:#}");
        let error = restore(&out, &data, true).unwrap_err();
        assert!(
            format!("{error:#}").contains("a host is running on"),
            "{error:#}"
        );
        drop(store);

        let fresh = dir.path().join("fresh");
        let summary = restore(&out, &fresh, false).unwrap();
        assert_eq!(summary.tasks, 4);
        let restored = SqliteStore::open_in_dir(&fresh).unwrap();
        for task in &tasks {
            assert_eq!(&restored.get_task(&task.task_id).await.unwrap(), task);
        }
        drop(restored);

        // Over a stopped host's database when forced: its log goes with it.
        assert!(!in_use(&data.join(DB_FILE_NAME)).unwrap());
        let summary = restore(&out, &data, true).unwrap();
        assert_eq!(summary.tasks, 4);
        assert!(!data.join("cloudai.db-wal").exists());
        let names: Vec<_> = std::fs::read_dir(&data)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, ["cloudai.db"], "no temporary file is left");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn backups_taken_while_the_store_writes_are_whole_databases() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        let store = SqliteStore::open_in_dir(&data).unwrap();
        let writer = {
            let store = store.clone();
            tokio::spawn(async move {
                for i in 0..1500 {
                    store
                        .insert_task(&task(&format!("t{i}")), None)
                        .await
                        .unwrap();
                }
            })
        };
        let mut counts = Vec::new();
        for n in 0..4 {
            let (source, out) = (data.join(DB_FILE_NAME), dir.path().join(format!("{n}.db")));
            let checked = out.clone();
            let summary = tokio::task::spawn_blocking(move || backup(&source, &out, false))
                .await
                .unwrap()
                .unwrap();
            // Each copy is a whole database, as of one commit.
            assert_eq!(check(&checked).unwrap().tasks, summary.tasks);
            counts.push(summary.tasks);
        }
        writer.await.unwrap();
        assert!(counts.is_sorted(), "{counts:?}");
        let last = backup(&data.join(DB_FILE_NAME), &dir.path().join("last.db"), false).unwrap();
        assert_eq!(last.tasks, 1500);
    }

    #[test]
    fn in_use_sees_an_idle_open_store() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open_in_dir(dir.path()).unwrap();
        let path = dir.path().join(DB_FILE_NAME);
        assert!(in_use(&path).unwrap());
        drop(store);
        assert!(!in_use(&path).unwrap());
    }

    #[test]
    fn restore_refuses_what_is_not_a_cloudai_database_and_leaves_nothing_behind() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        let junk = dir.path().join("junk.db");
        std::fs::write(&junk, vec![7u8; 8192]).unwrap();
        let error = restore(&junk, &data, false).unwrap_err();
        assert!(
            format!("{error:#}").contains("not a SQLite database"),
            "{error:#}"
        );
        let other = dir.path().join("other.db");
        Connection::open(&other)
            .unwrap()
            .execute_batch("CREATE TABLE t (x)")
            .unwrap();
        let error = restore(&other, &data, false).unwrap_err();
        assert!(
            format!("{error:#}").contains("not a CloudAI database"),
            "{error:#}"
        );
        let newer = dir.path().join("newer.db");
        let conn = Connection::open(&newer).unwrap();
        conn.execute_batch("CREATE TABLE TASKS (task_id TEXT)")
            .unwrap();
        conn.pragma_update(None, "user_version", SCHEMA_VERSION + 1)
            .unwrap();
        drop(conn);
        let error = restore(&newer, &data, false).unwrap_err();
        assert!(
            format!("{error:#}").contains("written by a newer cloudai"),
            "{error:#}"
        );
        assert_eq!(std::fs::read_dir(&data).unwrap().count(), 0);
        let error = backup(&data.join(DB_FILE_NAME), &dir.path().join("b.db"), false).unwrap_err();
        assert!(
            format!("{error:#}").contains("there is no CloudAI database"),
            "{error:#}"
        );
    }
}
