//! Checkpoints of the write-ahead log on a thread of their own, so that the writer thread never
//! waits for one.
//!
//! In WAL mode with `synchronous = NORMAL` a commit appends to the log and syncs nothing; the
//! only syncs are the checkpoints' (the log, then the database file). SQLite runs a checkpoint
//! inside the commit that grows the log past 1,000 pages, so one request in every few dozen
//! waited for two `fsync`s and for the copy of the pages, with every request queued behind it.
//! Here the writer's connection has automatic checkpoints off and this thread, with a
//! connection of its own, runs a PASSIVE checkpoint (which never blocks the writer nor waits
//! for it) every [`EVERY`]; one that finds nothing new in the log syncs nothing.

use std::path::Path;
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::thread::JoinHandle;
use std::time::Duration;

use rusqlite::Connection;

/// How often the log is checkpointed: at the writer's fastest (about 40 MB of log a second
/// on the scheduler bench) the log stays within a few MB.
const EVERY: Duration = Duration::from_millis(100);

/// Held by the writer thread: dropping it ends the checkpointer, after one last checkpoint.
pub(super) struct Checkpointer {
    _stop: Sender<()>,
}

/// Starts the checkpointer of the database at `path`, with a connection of its own.
pub(super) fn start(path: &Path) -> std::io::Result<(Checkpointer, JoinHandle<()>)> {
    let (stop, stopped) = std::sync::mpsc::channel();
    let path = path.to_path_buf();
    let thread = std::thread::Builder::new()
        .name("cloudai-sqlite-checkpoint".to_string())
        .spawn(move || run(&path, stopped))?;
    Ok((Checkpointer { _stop: stop }, thread))
}

fn connect(path: &Path) -> rusqlite::Result<Connection> {
    let conn = Connection::open(path)?;
    conn.busy_timeout(super::BUSY_TIMEOUT)?;
    // The checkpoint syncs as this connection says: the log before copying it, the database
    // file after (what SQLite's automatic checkpoint does under NORMAL).
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    Ok(conn)
}

fn run(path: &Path, stopped: Receiver<()>) {
    let conn = match connect(path) {
        Ok(conn) => conn,
        Err(error) => {
            // The log then grows until the last connection closes (which checkpoints it):
            // correct, only larger.
            tracing::error!(path = %path.display(), %error, "cannot open a connection for WAL checkpoints");
            return;
        }
    };
    loop {
        let stop = matches!(
            stopped.recv_timeout(EVERY),
            Ok(()) | Err(RecvTimeoutError::Disconnected)
        );
        checkpoint(&conn, path);
        if stop {
            return;
        }
    }
}

/// One PASSIVE checkpoint: copies what it can of the log without waiting for anyone. The
/// writer starts the log over once a checkpoint copied all of it.
fn checkpoint(conn: &Connection, path: &Path) {
    let result = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |row| {
        Ok((row.get::<_, i64>(1)?, row.get::<_, i64>(2)?))
    });
    match result {
        Ok((log, copied)) => {
            tracing::trace!(path = %path.display(), log, copied, "WAL checkpoint");
        }
        Err(error) => {
            tracing::warn!(path = %path.display(), %error, "WAL checkpoint failed; the next one retries");
        }
    }
}
