//! Stopping a host: SIGTERM ends the process in bounded time, whatever its parts are doing.

use std::time::Duration;

use crate::harness::{StoreKind, TestHost};

/// The host's local worker cannot register (the store refuses every new worker, as FerretDB
/// 1.x once refused the local worker's label key): it retries, and the host still exits within
/// seconds of SIGTERM (a service manager's stop must not hang).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_ends_a_host_whose_local_worker_cannot_register() {
    let data_dir = tempfile::tempdir().unwrap();
    // The store, created as the host would create it, then made to refuse new workers.
    drop(cloudai::store::sqlite::SqliteStore::open_in_dir(data_dir.path()).unwrap());
    let db = rusqlite::Connection::open(data_dir.path().join(cloudai::store::sqlite::DB_FILE_NAME))
        .unwrap();
    db.execute_batch(
        "CREATE TRIGGER refuse_workers BEFORE INSERT ON WORKER_REGISTRY \
         BEGIN SELECT RAISE(ABORT, 'this store refuses new workers (test)'); END;",
    )
    .unwrap();
    drop(db);

    // The local worker is on (no --no-local-worker): it needs the Docker engine to start.
    let mut host = TestHost::start_in(StoreKind::Embedded, &[], data_dir).unwrap();
    host.wait_for_log("registering: the host failed", Duration::from_secs(60))
        .await
        .unwrap();
    // It keeps trying (the retry waits grow): let it be in the middle of a wait.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (status, took) = host.terminate(Duration::from_secs(20)).unwrap();
    assert!(
        status.success(),
        "exit status {status}; log:\n{}",
        host.log()
    );
    assert!(
        took < Duration::from_secs(10),
        "took {took:?} to exit after SIGTERM; log:\n{}",
        host.log()
    );
    let log = host.log();
    assert!(log.contains("cloudai host stopped"), "{log}");
    assert!(
        log.contains("shutdown before this worker joined the host"),
        "{log}"
    );
}
