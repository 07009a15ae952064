//! `PolicySync`: keeps this replica's [`PolicyRuntime`] in step with the store, so that every
//! host runs the version the store says is active within a second of a switch.
//!
//! Every tick (`--policy-sync-interval-ms`, 250 ms by default) it
//! 1. writes to the store the rollbacks this replica's runtime made on its own (a version
//!    deactivated after repeated failures), as a compare-and-swap from the failed version to
//!    the restored one, or a clear when the native policy took over, so that the other
//!    replicas follow and the API tells what really runs;
//! 2. unloads the versions deleted from the store;
//! 3. activates locally what the store says is active (nothing: the native policy), unless
//!    this replica deactivated that version itself and no operator activated it since;
//! 4. compiles and loads, in the background and one at a time, the stored versions it has not
//!    loaded yet (the active one first), so that an activation is only a pointer swap. A
//!    version that fails to load is remembered (with its digest) and not tried again.
//!
//! A round in flight keeps the version it started with: the runtime swaps an `Arc`.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::task::JoinHandle;

use super::PolicyError;
use super::{Deactivation, LoadOptions, PolicyKind, PolicyRuntime};
use crate::events::{self, EventSink, PolicyChange};
use crate::model::{self, PolicyVersion};
use crate::store::{BlobStore, StoreError};

/// Who the store records as the author of an automatic rollback.
pub const AUTO_ROLLBACK_BY: &str = "cloudai:auto-rollback";

/// Default interval between two ticks.
pub const DEFAULT_INTERVAL: Duration = Duration::from_millis(250);

/// Why a stored version could not be loaded here.
#[derive(Debug, thiserror::Error)]
pub enum LoadFromStoreError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Policy(#[from] PolicyError),
}

/// Reads a stored version's bytes and loads it into `runtime` (compile, world, configure,
/// smoke decision) on a blocking thread, with the version's own limits. Loaded already: `Ok`.
/// A component whose world is not the stored kind is refused (and not kept).
pub async fn load_from_store(
    store: &dyn BlobStore,
    runtime: &Arc<PolicyRuntime>,
    version: &PolicyVersion,
) -> Result<PolicyKind, LoadFromStoreError> {
    if let Some(kind) = runtime.loaded_kind(&version.name, &version.version) {
        return Ok(kind);
    }
    let bytes = store
        .get_policy_bytes(&version.name, &version.version)
        .await?;
    let limits = runtime
        .limits_for(version.memory_bytes, version.deadline_ms)
        .map_err(PolicyError::ConfigRejected)?;
    let (rt, meta) = (runtime.clone(), version.clone());
    let loaded = tokio::task::spawn_blocking(move || {
        rt.load_with(
            &meta.name,
            &meta.version,
            &bytes,
            &meta.config,
            LoadOptions {
                limits,
                smoke_check: true,
            },
        )
    })
    .await
    .map_err(|e| PolicyError::Host(format!("the loading thread failed: {e}")))?;
    let kind = match loaded {
        Ok(kind) => kind,
        Err(PolicyError::AlreadyLoaded { .. }) => runtime
            .loaded_kind(&version.name, &version.version)
            .ok_or_else(|| {
                PolicyError::Host("the version was unloaded while it loaded".to_string())
            })?,
        Err(e) => return Err(e.into()),
    };
    let stored = version.kind;
    if kind != stored {
        // Never kept under a kind the store does not say: activation goes by the store's.
        let _ = runtime.unload(&version.name, &version.version);
        return Err(PolicyError::WrongWorld(format!(
            "it implements the {} world, but is stored as a {} policy",
            kind.as_str(),
            stored.as_str()
        ))
        .into());
    }
    Ok(kind)
}

type Key = (String, String);

/// The result of one background load: the version, its digest, and why it failed (and
/// whether for good: a store that cannot be read now is tried again).
type LoadResult = (Key, String, Result<(), (String, bool)>);

/// Stops the sync's task when dropped.
pub struct PolicySyncHandle {
    task: JoinHandle<()>,
}

impl Drop for PolicySyncHandle {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The sync loop of one replica; see the module documentation.
pub struct PolicySync {
    store: Arc<dyn BlobStore>,
    /// Where the automatic rollbacks it writes are published.
    events: EventSink,
    runtime: Arc<PolicyRuntime>,
    interval: Duration,
    /// The versions listed by the store at the last tick (only these are unloaded when they
    /// disappear, so that a version being uploaded through this replica is left alone).
    seen: BTreeSet<Key>,
    /// Versions that failed to load here, with the digest they had.
    failed: BTreeMap<Key, String>,
    /// Versions this replica deactivated after repeated failures, and when.
    deactivated_at: BTreeMap<Key, DateTime<Utc>>,
    /// Automatic rollbacks not yet written to the store.
    pending: Vec<Deactivation>,
    loading: Option<(Key, JoinHandle<LoadResult>)>,
}

impl PolicySync {
    pub fn new(store: Arc<dyn BlobStore>, runtime: Arc<PolicyRuntime>, interval: Duration) -> Self {
        PolicySync {
            store,
            events: EventSink::off(),
            runtime,
            interval: interval.max(Duration::from_millis(10)),
            seen: BTreeSet::new(),
            failed: BTreeMap::new(),
            deactivated_at: BTreeMap::new(),
            pending: Vec::new(),
            loading: None,
        }
    }

    /// Publishes the automatic rollbacks it writes on `events`.
    pub fn with_events(mut self, events: EventSink) -> Self {
        self.events = events;
        self
    }

    /// Runs the loop on the current Tokio runtime until the handle is dropped.
    pub fn spawn(mut self) -> PolicySyncHandle {
        let task = tokio::spawn(async move {
            loop {
                self.tick().await;
                let runtime = self.runtime.clone();
                tokio::select! {
                    () = tokio::time::sleep(self.interval) => {}
                    // A deactivation reaches the store at once, not a tick later.
                    () = runtime.deactivation_signalled() => {}
                }
            }
        });
        PolicySyncHandle { task }
    }

    /// One pass; never fails (errors are logged and retried at the next tick).
    pub async fn tick(&mut self) {
        self.collect_load().await;
        self.write_rollbacks().await;
        let versions = match self.store.list_policy_versions(None).await {
            Ok(versions) => versions,
            Err(error) => {
                tracing::warn!(%error, "policy sync: cannot list the stored versions");
                return;
            }
        };
        self.forget_deleted(&versions);
        let wanted = self.follow_active(&versions).await;
        self.start_load(&versions, wanted);
    }

    /// Takes a finished background load's outcome.
    async fn collect_load(&mut self) {
        let finished = self
            .loading
            .as_ref()
            .is_some_and(|(_, task)| task.is_finished());
        if !finished {
            return;
        }
        let Some((key, task)) = self.loading.take() else {
            return;
        };
        match task.await {
            Ok((_, _, Ok(()))) => {}
            Ok((key, sha256, Err((error, permanent)))) => {
                self.runtime.record_load_error(&key.0, &key.1, error);
                if permanent {
                    self.failed.insert(key, sha256);
                }
            }
            Err(error) => {
                tracing::error!(policy_name = %key.0, policy_version = %key.1, %error, "policy sync: the load task failed");
            }
        }
    }

    async fn write_rollbacks(&mut self) {
        for deactivation in self.runtime.take_deactivations() {
            self.deactivated_at.insert(
                (deactivation.name.clone(), deactivation.version.clone()),
                model::now(),
            );
            self.pending.push(deactivation);
        }
        let mut still = Vec::new();
        for d in std::mem::take(&mut self.pending) {
            let failed = (d.name.clone(), d.version.clone());
            let kind = d.kind;
            let written = match &d.restored {
                Some((name, version)) => self
                    .store
                    .activate_policy(kind, name, version, AUTO_ROLLBACK_BY, Some(failed))
                    .await
                    .map(|_| {
                        let why = format!("failed repeatedly: rolled back to {name}@{version}");
                        self.events.publish(events::policy_deactivated(
                            &d.name, &d.version, kind, &why,
                        ));
                        let restored = events::policy(PolicyChange::RolledBack, name, version, kind);
                        self.events.publish(restored);
                    }),
                None => self.store.clear_active_policy(kind, failed).await.map(|()| {
                    let why = "failed repeatedly with no earlier version to restore: the native policy runs";
                    self.events.publish(events::policy_deactivated(
                        &d.name, &d.version, kind, why,
                    ));
                }),
            };
            let restored = d.restored.as_ref().map_or_else(
                || "the native policy".to_string(),
                |(n, v)| format!("{n} {v}"),
            );
            match written {
                Ok(()) => tracing::warn!(
                    policy_name = %d.name, policy_version = %d.version, kind = d.kind.as_str(),
                    %restored, "policy sync: automatic rollback written to the store"
                ),
                Err(StoreError::Conflict { actual, .. }) => tracing::info!(
                    policy_name = %d.name, policy_version = %d.version, kind = d.kind.as_str(),
                    %actual, "policy sync: the store moved on already; automatic rollback not written"
                ),
                Err(StoreError::NotFound { .. }) => tracing::warn!(
                    policy_name = %d.name, policy_version = %d.version, kind = d.kind.as_str(),
                    %restored, "policy sync: the restored version is no longer stored; rollback not written"
                ),
                Err(error) => {
                    tracing::warn!(
                        policy_name = %d.name, policy_version = %d.version, %error,
                        "policy sync: cannot write the automatic rollback; retrying"
                    );
                    still.push(d);
                }
            }
        }
        self.pending = still;
    }

    fn forget_deleted(&mut self, versions: &[PolicyVersion]) {
        let current: BTreeSet<Key> = versions
            .iter()
            .map(|v| (v.name.clone(), v.version.clone()))
            .collect();
        let gone: Vec<Key> = self.seen.difference(&current).cloned().collect();
        for key in &gone {
            self.failed.remove(key);
            self.deactivated_at.remove(key);
            self.runtime.clear_load_error(&key.0, &key.1);
            if self.runtime.loaded_kind(&key.0, &key.1).is_some() {
                match self.runtime.unload(&key.0, &key.1) {
                    Ok(()) => tracing::info!(
                        policy_name = %key.0, policy_version = %key.1,
                        "policy sync: deleted from the store; unloaded"
                    ),
                    // Active here still: the next tick follows the store's new active version
                    // first. Keep it as seen so that it is unloaded then.
                    Err(error) => tracing::debug!(%error, "policy sync: unload deferred"),
                }
            }
        }
        // A re-uploaded version (same name and version, other bytes) is tried again.
        for v in versions {
            let key = (v.name.clone(), v.version.clone());
            if self.failed.get(&key).is_some_and(|sha| *sha != v.sha256) {
                self.failed.remove(&key);
                self.runtime.clear_load_error(&key.0, &key.1);
            }
        }
        let still_loaded: BTreeSet<Key> = gone
            .into_iter()
            .filter(|k| self.runtime.loaded_kind(&k.0, &k.1).is_some())
            .collect();
        self.seen = current.union(&still_loaded).cloned().collect();
    }

    /// Makes the local active versions the store's. Returns a version the store says is
    /// active that is not loaded here yet (to load first).
    async fn follow_active(&mut self, versions: &[PolicyVersion]) -> Option<Key> {
        let runtime = self.runtime.clone();
        let _guard = runtime.activation_lock().lock().await;
        let loaded: BTreeMap<Key, bool> = runtime
            .versions()
            .into_iter()
            .map(|v| ((v.name, v.version), v.deactivated))
            .collect();
        let mut wanted = None;
        for kind in model::PolicyKind::ALL {
            let record = match self.store.get_active_policy(kind).await {
                Ok(record) => record,
                Err(error) => {
                    tracing::warn!(%error, kind = kind.as_str(), "policy sync: cannot read the active policy");
                    continue;
                }
            };
            let Some(record) = record else {
                if runtime.active(kind).is_some() {
                    runtime.deactivate(kind);
                    tracing::info!(
                        kind = kind.as_str(),
                        "policy sync: no version active in the store; the native policy decides"
                    );
                }
                continue;
            };
            let key = (record.name.clone(), record.version.clone());
            if runtime.active(kind).as_ref() == Some(&key) {
                continue;
            }
            if self
                .pending
                .iter()
                .any(|d| d.name == key.0 && d.version == key.1)
            {
                continue; // our rollback of it is being written
            }
            match loaded.get(&key) {
                None => {
                    if !self.failed.contains_key(&key)
                        && versions
                            .iter()
                            .any(|v| v.name == key.0 && v.version == key.1)
                    {
                        wanted = Some(key);
                    }
                    continue;
                }
                Some(true) => {
                    // Deactivated here: only an operator's activation after that brings it back.
                    let ours = self.deactivated_at.get(&key);
                    let operator_since = record.activated_by != AUTO_ROLLBACK_BY
                        && ours.is_some_and(|at| record.activated_at > *at);
                    if !operator_since {
                        continue;
                    }
                    let _ = runtime.clear_deactivation(&key.0, &key.1);
                    self.deactivated_at.remove(&key);
                }
                Some(false) => {}
            }
            match runtime.activate(&key.0, &key.1) {
                Ok(()) => tracing::info!(
                    policy_name = %key.0, policy_version = %key.1, kind = kind.as_str(),
                    "policy sync: now running the store's active version"
                ),
                Err(error) => tracing::warn!(
                    policy_name = %key.0, policy_version = %key.1, %error,
                    "policy sync: cannot activate the store's active version"
                ),
            }
        }
        wanted
    }

    /// Starts loading one version in the background, `first` when given, else any stored
    /// version not loaded here and not known to fail.
    fn start_load(&mut self, versions: &[PolicyVersion], first: Option<Key>) {
        if self.loading.is_some() {
            return;
        }
        let not_loaded = |v: &&PolicyVersion| {
            let key = (v.name.clone(), v.version.clone());
            !self.failed.contains_key(&key)
                && self.runtime.loaded_kind(&v.name, &v.version).is_none()
        };
        let next = first
            .and_then(|key| {
                versions
                    .iter()
                    .find(|v| v.name == key.0 && v.version == key.1)
            })
            .filter(not_loaded)
            .or_else(|| versions.iter().find(not_loaded));
        let Some(version) = next.cloned() else {
            return;
        };
        let key = (version.name.clone(), version.version.clone());
        let (store, runtime) = (self.store.clone(), self.runtime.clone());
        let task = tokio::spawn(async move {
            let key = (version.name.clone(), version.version.clone());
            let started = std::time::Instant::now();
            let outcome = load_from_store(store.as_ref(), &runtime, &version).await;
            let outcome = match outcome {
                Ok(kind) => {
                    tracing::info!(
                        policy_name = %key.0, policy_version = %key.1, kind = kind.as_str(),
                        elapsed_ms = started.elapsed().as_millis() as u64,
                        "policy sync: loaded a stored version"
                    );
                    Ok(())
                }
                Err(LoadFromStoreError::Store(error))
                    if !matches!(error, StoreError::NotFound { .. }) =>
                {
                    tracing::warn!(
                        policy_name = %key.0, policy_version = %key.1, %error,
                        "policy sync: cannot read a stored version; retrying"
                    );
                    Err((error.to_string(), false))
                }
                Err(error) => {
                    tracing::error!(
                        policy_name = %key.0, policy_version = %key.1, %error,
                        "policy sync: a stored version cannot be loaded here; not retried"
                    );
                    Err((error.to_string(), true))
                }
            };
            (key, version.sha256, outcome)
        });
        self.loading = Some((key, task));
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::time::Instant;

    use super::*;
    use crate::policy::testing::{guest, wasm_dir};
    use crate::policy::{EngineSettings, PlacementInput, PolicyEngine, RuntimeSettings};
    use crate::store::Store;
    use crate::store::conformance::sample_policy;
    use crate::store::mongo::testing::connect_test_store;
    use crate::store::sqlite::SqliteStore;

    const PLACEMENT: PolicyKind = PolicyKind::Placement;

    fn runtime() -> Arc<PolicyRuntime> {
        Arc::new(PolicyRuntime::new(
            PolicyEngine::new(EngineSettings::default()).unwrap(),
            RuntimeSettings::default(),
        ))
    }

    fn pair(n: &str, v: &str) -> Option<(String, String)> {
        Some((n.to_string(), v.to_string()))
    }

    /// Stores a version as the upload route would after loading it on replica `via`.
    async fn upload(store: &dyn Store, via: &PolicyRuntime, name: &str, bytes: &[u8]) {
        via.load(name, "1", bytes, "{}").unwrap();
        store_only(store, name, bytes).await;
    }

    async fn store_only(store: &dyn Store, name: &str, bytes: &[u8]) {
        let meta = PolicyVersion {
            config: "{}".into(),
            ..sample_policy(name, "1", model::PolicyKind::Placement, bytes, model::now())
        };
        store.insert_policy_version(&meta, bytes).await.unwrap();
    }

    /// Activates as the API does: the store's compare-and-swap, then at once on `via`.
    async fn activate(store: &dyn Store, via: &PolicyRuntime, name: &str) {
        let _guard = via.activation_lock().lock().await;
        let current = store
            .get_active_policy(model::PolicyKind::Placement)
            .await
            .unwrap()
            .map(|a| (a.name, a.version));
        store
            .activate_policy(model::PolicyKind::Placement, name, "1", "ops", current)
            .await
            .unwrap();
        via.clear_deactivation(name, "1").unwrap();
        via.activate(name, "1").unwrap();
    }

    /// Polls `done` every 10 ms; fails unless it holds within `bound`. Returns the time taken.
    async fn within(bound: Duration, what: &str, done: impl Fn() -> bool) -> Duration {
        let started = Instant::now();
        while !done() {
            assert!(started.elapsed() <= bound, "{what}: not within {bound:?}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        started.elapsed()
    }

    async fn store_active(store: &dyn Store) -> Option<model::ActivePolicy> {
        store
            .get_active_policy(model::PolicyKind::Placement)
            .await
            .unwrap()
    }

    async fn two_replicas_follow_one_store(store: Arc<dyn Store>) {
        let Some(dir) = wasm_dir() else { return };
        let (a, b) = (runtime(), runtime());
        let _sync_a = PolicySync::new(store.clone(), a.clone(), DEFAULT_INTERVAL).spawn();
        let _sync_b = PolicySync::new(store.clone(), b.clone(), DEFAULT_INTERVAL).spawn();

        // Uploaded through A: B compiles both before anything is activated.
        upload(store.as_ref(), &a, "best-fit", &guest(&dir, "best-fit")).await;
        upload(store.as_ref(), &a, "spread", &guest(&dir, "spread")).await;
        within(Duration::from_secs(10), "B loads the uploads", || {
            b.loaded_kind("best-fit", "1").is_some() && b.loaded_kind("spread", "1").is_some()
        })
        .await;
        assert_eq!(b.active(PLACEMENT), None);

        // Every switch made through A runs on B within a second.
        for name in ["best-fit", "spread"] {
            activate(store.as_ref(), &a, name).await;
            let took = within(Duration::from_secs(1), "B follows an activation", || {
                b.active(PLACEMENT) == pair(name, "1")
            })
            .await;
            eprintln!("B ran {name} {took:?} after its activation through A");
        }

        // A deleted version is unloaded by both.
        store.delete_policy_version("best-fit", "1").await.unwrap();
        within(
            Duration::from_secs(1),
            "both unload a deleted version",
            || a.loaded_kind("best-fit", "1").is_none() && b.loaded_kind("best-fit", "1").is_none(),
        )
        .await;

        // The trap fixture fails the smoke check: loaded on both by hand before it is stored.
        let trap = guest(&dir, "fixture-trap");
        for replica in [&a, &b] {
            replica
                .load_with(
                    "trap",
                    "1",
                    &trap,
                    "{}",
                    LoadOptions {
                        limits: None,
                        smoke_check: false,
                    },
                )
                .unwrap();
        }
        store_only(store.as_ref(), "trap", &trap).await;
        activate(store.as_ref(), &a, "trap").await;
        within(Duration::from_secs(1), "B runs the trap", || {
            b.active(PLACEMENT) == pair("trap", "1")
        })
        .await;

        // It fails on A until A deactivates it: the rollback reaches the store and B.
        let input = PlacementInput::synthetic();
        for _ in 0..RuntimeSettings::default().failure_threshold {
            a.place(&input);
        }
        assert_eq!(a.active(PLACEMENT), pair("spread", "1"), "restored on A");
        let started = Instant::now();
        loop {
            let record = store_active(store.as_ref()).await.unwrap();
            if record.name == "spread" {
                assert_eq!(record.activated_by, AUTO_ROLLBACK_BY);
                assert_eq!(record.previous, pair("trap", "1"));
                break;
            }
            assert!(
                started.elapsed() <= Duration::from_secs(1),
                "rollback not written"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        within(Duration::from_secs(1), "B follows the rollback", || {
            b.active(PLACEMENT) == pair("spread", "1")
        })
        .await;
        // A does not take the failed version back on its own.
        tokio::time::sleep(DEFAULT_INTERVAL * 3).await;
        assert_eq!(a.active(PLACEMENT), pair("spread", "1"));

        // An operator activating it again (through B) is obeyed by A too.
        activate(store.as_ref(), &b, "trap").await;
        within(
            Duration::from_secs(1),
            "A follows an operator's re-activation",
            || a.active(PLACEMENT) == pair("trap", "1"),
        )
        .await;
    }

    /// With nothing to restore, the native policy takes over and the store's record is cleared.
    async fn a_failing_first_version_is_cleared_from_the_store(store: Arc<dyn Store>) {
        let Some(dir) = wasm_dir() else { return };
        let (a, b) = (runtime(), runtime());
        let trap = guest(&dir, "fixture-trap");
        for replica in [&a, &b] {
            replica
                .load_with(
                    "trap",
                    "1",
                    &trap,
                    "{}",
                    LoadOptions {
                        limits: None,
                        smoke_check: false,
                    },
                )
                .unwrap();
        }
        store_only(store.as_ref(), "trap", &trap).await;
        let _sync_a = PolicySync::new(store.clone(), a.clone(), DEFAULT_INTERVAL).spawn();
        let _sync_b = PolicySync::new(store.clone(), b.clone(), DEFAULT_INTERVAL).spawn();
        activate(store.as_ref(), &a, "trap").await;
        within(Duration::from_secs(1), "B runs the trap", || {
            b.active(PLACEMENT) == pair("trap", "1")
        })
        .await;
        let input = PlacementInput::synthetic();
        for _ in 0..RuntimeSettings::default().failure_threshold {
            a.place(&input);
        }
        assert_eq!(a.active(PLACEMENT), None);
        within(Duration::from_secs(1), "B falls back to native", || {
            b.active(PLACEMENT).is_none()
        })
        .await;
        assert_eq!(store_active(store.as_ref()).await, None);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn two_replicas_on_sqlite_follow_activations_deletions_and_rollbacks() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(SqliteStore::open_in_dir(dir.path()).unwrap());
        two_replicas_follow_one_store(store).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn two_replicas_on_mongodb_follow_activations_deletions_and_rollbacks() {
        let Some((store, _drop)) = connect_test_store().await else {
            return;
        };
        two_replicas_follow_one_store(Arc::new(store)).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn a_failing_version_with_nothing_to_restore_is_cleared_on_sqlite() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(SqliteStore::open_in_dir(dir.path()).unwrap());
        a_failing_first_version_is_cleared_from_the_store(store).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn a_failing_version_with_nothing_to_restore_is_cleared_on_mongodb() {
        let Some((store, _drop)) = connect_test_store().await else {
            return;
        };
        a_failing_first_version_is_cleared_from_the_store(Arc::new(store)).await;
    }
}
