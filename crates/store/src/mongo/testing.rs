//! Test support: a [`MongoStore`] on a fresh database of the server named by
//! `CLOUDAI_TEST_MONGODB_URI`, a guard that drops that database, and sample documents.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use mongodb::bson::Document;
use mongodb::event::EventHandler;
use mongodb::event::command::CommandEvent;

use super::{MongoStore, ServerKind};
use crate::StoreError;
use crate::conformance::sample_assignment;
use crate::model::{Assignment, Resources, Task};

/// The environment variable naming the test server.
pub const URI_VAR: &str = "CLOUDAI_TEST_MONGODB_URI";

/// The configured test server, or `None` (skip) when none is configured locally.
/// Panics under CI (env `CI` set) when none is configured: CI must run these tests.
pub fn test_uri() -> Option<String> {
    match std::env::var(URI_VAR) {
        Ok(uri) if !uri.is_empty() => Some(uri),
        _ if std::env::var_os("CI").is_some() => {
            panic!("CI must set {URI_VAR} (e.g. mongodb://127.0.0.1:27017/)")
        }
        _ => {
            eprintln!("skipping MongoDB test: {URI_VAR} is not set");
            None
        }
    }
}

/// Drops its database when dropped. The drop runs on a client and runtime of its own, in
/// a thread: the test's runtime may be blocked in this very drop.
pub struct DropDatabase {
    pub(crate) uri: String,
    pub(crate) database: String,
}

impl Drop for DropDatabase {
    fn drop(&mut self) {
        let (uri, database) = (self.uri.clone(), self.database.clone());
        let dropped = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| e.to_string())?;
            runtime.block_on(async {
                let client = mongodb::Client::with_uri_str(&uri)
                    .await
                    .map_err(|e| e.to_string())?;
                client
                    .database(&database)
                    .drop()
                    .await
                    .map_err(|e| e.to_string())
            })
        })
        .join();
        if let Ok(Err(e)) = dropped {
            eprintln!("could not drop test database {}: {e}", self.database);
        }
    }
}

/// A store on a fresh database `cloudai_test_<uuid>`; `None` when no server is configured.
/// Panics (the test fails) when a server is configured but cannot be reached.
pub async fn connect_test_store() -> Option<(MongoStore, DropDatabase)> {
    let uri = test_uri()?;
    let database = fresh_database();
    let store = MongoStore::connect(&uri, &database).await;
    Some((connected(store), DropDatabase { uri, database }))
}

/// Like [`connect_test_store`], on the native path whatever the server is (see
/// [`MongoStore::connect_as`]): how the tests run the code written for MongoDB against
/// FerretDB 1.x. Only for tests that write one at a time: on FerretDB 1.x that path is not
/// atomic.
pub async fn connect_native_test_store() -> Option<(MongoStore, DropDatabase)> {
    connect_native_logged_test_store()
        .await
        .map(|(store, _, guard)| (store, guard))
}

/// [`connect_native_test_store`], with a log of the commands its client sends.
pub async fn connect_native_logged_test_store() -> Option<(MongoStore, CommandLog, DropDatabase)> {
    let uri = test_uri()?;
    let database = fresh_database();
    let log = CommandLog::default();
    let handler = log.handler();
    let store = MongoStore::connect_as(&uri, &database, ServerKind::MongoDb, |options| {
        options.command_event_handler = Some(handler);
    })
    .await;
    Some((connected(store), log, DropDatabase { uri, database }))
}

fn fresh_database() -> String {
    format!("cloudai_test_{}", uuid::Uuid::now_v7().simple())
}

fn connected(store: Result<MongoStore, StoreError>) -> MongoStore {
    match store {
        Ok(store) => store,
        // The URI is not printed: it may carry credentials.
        Err(e) => panic!("{URI_VAR} is set but the store cannot connect: {e}"),
    }
}

/// The commands a client sent, in order: how tests check what an operation costs.
#[derive(Clone, Debug, Default)]
pub struct CommandLog(Arc<Mutex<Vec<Document>>>);

impl CommandLog {
    fn handler(&self) -> EventHandler<CommandEvent> {
        let log = Arc::clone(&self.0);
        EventHandler::callback(move |event| {
            if let CommandEvent::Started(started) = event
                && let Ok(mut log) = log.lock()
            {
                log.push(started.command);
            }
        })
    }

    /// The commands sent since the last call, leaving out the driver's own (`hello`,
    /// `endSessions`, ...): those whose first field names a collection.
    pub fn take(&self) -> Vec<Document> {
        let taken = match self.0.lock() {
            Ok(mut log) => std::mem::take(&mut *log),
            Err(poisoned) => std::mem::take(&mut *poisoned.into_inner()),
        };
        taken
            .into_iter()
            .filter(|command| {
                command
                    .iter()
                    .next()
                    .is_some_and(|(_, target)| target.as_str().is_some())
            })
            .collect()
    }

    /// [`Self::take`], as `(command name, collection)`.
    pub fn take_names(&self) -> Vec<(String, String)> {
        self.take()
            .iter()
            .filter_map(|command| {
                let (name, target) = command.iter().next()?;
                Some((name.clone(), target.as_str()?.to_owned()))
            })
            .collect()
    }
}

pub use crate::conformance::sample_worker as worker;

/// A pending task with most optional fields set.
pub fn task(task_id: &str, user_id: &str) -> Task {
    Task {
        command: Some("echo hello".to_owned()),
        priority: 3,
        labels: BTreeMap::from([("team".to_owned(), "ml".to_owned())]),
        timeout_s: Some(60),
        max_attempts: 2,
        ..Task::new_pending(
            task_id.to_owned(),
            user_id.to_owned(),
            "docker.io/library/alpine:3.20".to_owned(),
            Resources::new(1.0, 2.0, 1.0, 0.0),
        )
    }
}

/// An unreleased assignment of the task `task-of-<ass_id>`.
pub fn assignment(ass_id: &str, worker_id: &str, request: Resources) -> Assignment {
    sample_assignment(ass_id, &format!("task-of-{ass_id}"), worker_id, request)
}
