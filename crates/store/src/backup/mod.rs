//! Copies of a store that a fresh host starts on with the same tasks, workers, results and
//! policies (`cloudai backup` and `cloudai restore` drive these).
//!
//! - Embedded store ([`sqlite`]): one file, an online and consistent copy of the data
//!   directory's `cloudai.db` taken with SQLite's backup API while the host runs; restored into
//!   a data directory whose host is stopped.
//! - MongoDB ([`mongo`]): a directory in `mongodump`'s layout (`<collection>.bson`, the raw
//!   documents one after another, and `<collection>.metadata.json`, its indexes), read
//!   collection after collection; restored into an empty database.

use std::path::{Path, PathBuf};

use anyhow::Context;

mod extjson;
pub mod mongo;
pub mod sqlite;

/// `path`'s name with `prefix` and `suffix` around it, in the same directory: a temporary
/// file or directory that a rename then puts in place (same filesystem).
pub(crate) fn sibling(path: &Path, prefix: &str, suffix: &str) -> anyhow::Result<PathBuf> {
    let name = path
        .file_name()
        .with_context(|| format!("{} names no file", path.display()))?
        .to_string_lossy();
    Ok(path.with_file_name(format!("{prefix}{name}{suffix}")))
}

/// Flushes a directory's entries (a rename into it) to disk.
pub(crate) fn sync_dir(dir: &Path) -> anyhow::Result<()> {
    let dir = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("syncing the directory {}", dir.display()))
}

/// Removes a temporary file or directory when dropped, unless [`Cleanup::keep`] was called:
/// a failed backup or restore leaves nothing half-written behind.
pub(crate) struct Cleanup {
    paths: Vec<PathBuf>,
    armed: bool,
}

impl Cleanup {
    pub(crate) fn new(paths: Vec<PathBuf>) -> Cleanup {
        Cleanup { paths, armed: true }
    }

    pub(crate) fn keep(mut self) {
        self.armed = false;
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        for path in &self.paths {
            let _ = if path.is_dir() {
                std::fs::remove_dir_all(path)
            } else {
                std::fs::remove_file(path)
            };
        }
    }
}
