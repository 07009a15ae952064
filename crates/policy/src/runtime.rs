//! `PolicyRuntime`: the loaded policy versions, the active one per kind (swapped as a
//! pointer), and the protected calls: a placement round or an admission check that falls back
//! to the native policy when the guest fails, counts the failure and, after too many in a row,
//! deactivates the version and restores the previous good one.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock};
use std::time::{Duration, Instant};

use super::bindings::types::{self as guest, AdmissionTask, Resources, UserUsage};
use super::engine::{PolicyEngine, PolicyLabel, PolicyLimits, Prepared};
use super::error::{PolicyError, Result};
use super::input::AdmissionDecision;
use super::input::{Decision, PlacementInput};
use super::native;
use super::validate::{validate_placement, validate_placement_v2};

/// Instantiates `$pre` into `$store`, configures it with `$config`, then evaluates `$call` with
/// the instance bound to `$instance`: `Ok(Err(reason))` when the configuration is refused. The
/// worlds of both contract versions are distinct generated types: one macro, not four copies.
macro_rules! configured_call {
    ($pre:expr, $store:ident, $config:expr, |$instance:ident| $call:expr) => {{
        let $instance = $pre.instantiate(&mut *$store)?;
        match $instance
            .cloudai_policy_config()
            .call_configure(&mut *$store, $config)?
        {
            Err(reason) => Ok(Err(reason)),
            Ok(()) => Ok(Ok($call)),
        }
    }};
}

/// The world a policy implements: the model's kind (one name per concept).
pub use crate::model::PolicyKind;

/// Told of a runtime's failures, for whoever counts them (the host's metrics, which the
/// runtime does not depend on). Set with [`PolicyRuntime::with_observer`]; by default no one
/// is told.
pub trait RuntimeObserver: Send + Sync {
    /// A failed evaluation of the active version `name`/`version`, by the kind of error
    /// ([`PolicyError::metric_label`]).
    fn failed(&self, kind: PolicyKind, name: &str, version: &str, error: &'static str);
    /// The version `name`/`version` deactivated after repeated failures.
    fn deactivated(&self, kind: PolicyKind, name: &str, version: &str);
}

/// The observer of a runtime nobody watches.
struct Unobserved;

impl RuntimeObserver for Unobserved {
    fn failed(&self, _: PolicyKind, _: &str, _: &str, _: &'static str) {}
    fn deactivated(&self, _: PolicyKind, _: &str, _: &str) {}
}

/// The index of `kind`'s active slot.
fn slot(kind: PolicyKind) -> usize {
    match kind {
        PolicyKind::Placement => 0,
        PolicyKind::Admission => 1,
    }
}

/// What an admission check does when the active policy fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AdmissionFallback {
    /// Fail open: the task is accepted.
    Accept,
    /// Fail closed: the task stays pending and is checked again later.
    Defer,
}

/// Settings of the runtime.
#[derive(Debug, Clone)]
pub struct RuntimeSettings {
    /// Consecutive failed evaluations after which a version is deactivated.
    pub failure_threshold: u32,
    /// Limits of a policy loaded without its own.
    pub default_limits: PolicyLimits,
    pub admission_fallback: AdmissionFallback,
}

impl Default for RuntimeSettings {
    fn default() -> Self {
        RuntimeSettings {
            failure_threshold: 3,
            default_limits: PolicyLimits::default(),
            admission_fallback: AdmissionFallback::Accept,
        }
    }
}

/// How [`PolicyRuntime::load_with`] loads a version.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LoadOptions {
    /// The version's own limits; `None` for [`RuntimeSettings::default_limits`].
    pub limits: Option<PolicyLimits>,
    /// Run the smoke decision on a synthetic cluster (always, except to load the hostile
    /// test fixtures, which fail it by design).
    pub smoke_check: bool,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            limits: None,
            smoke_check: true,
        }
    }
}

/// Who decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PolicySource {
    /// The active WebAssembly policy.
    Wasm { name: String, version: String },
    /// The native policy, because no policy of this kind is active.
    Native,
    /// The native policy (or the admission fallback), because the active policy failed.
    Fallback {
        name: String,
        version: String,
        reason: String,
    },
}

impl PolicySource {
    /// The policy name and version that decided, as the metrics label a call (`native` and
    /// `builtin` for the built-in policy), and whether it decided as a fallback.
    pub fn metric_labels(&self) -> (&str, &str, bool) {
        match self {
            PolicySource::Native => ("native", "builtin", false),
            PolicySource::Wasm { name, version } => (name.as_str(), version.as_str(), false),
            PolicySource::Fallback { name, version, .. } => (name.as_str(), version.as_str(), true),
        }
    }
}

/// The decisions of one placement round.
#[derive(Debug, Clone, PartialEq)]
pub struct PlacementOutcome {
    /// One per task, in the order of the input's tasks, checked.
    pub decisions: Vec<Decision>,
    pub source: PolicySource,
    /// Wall-clock time of the round, fallback included.
    pub elapsed: Duration,
}

/// The decision of one admission check.
#[derive(Debug, Clone, PartialEq)]
pub struct AdmissionOutcome {
    pub decision: AdmissionDecision,
    pub source: PolicySource,
    pub elapsed: Duration,
}

/// A loaded version, as listed.
#[derive(Debug, Clone, PartialEq)]
pub struct PolicyVersionInfo {
    pub name: String,
    pub version: String,
    pub kind: PolicyKind,
    /// sha256 of the component's bytes, hex.
    pub sha256: String,
    pub limits: PolicyLimits,
    pub active: bool,
    /// Deactivated after repeated failures.
    pub deactivated: bool,
    pub consecutive_failures: u32,
    pub total_failures: u64,
    /// Rounds (placement) or checks (admission) this version decided on this replica, its
    /// failures not included.
    pub evaluations: u64,
    /// The `cloudai:policy` contract version it was built against (`0.1.0` or `0.2.0`).
    pub contract: &'static str,
}

/// A version this runtime deactivated after repeated failures, and what it restored: what
/// the policy sync writes to the store so that the other replicas follow.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Deactivation {
    pub kind: PolicyKind,
    pub name: String,
    pub version: String,
    /// The (name, version) restored, or `None` when the native policy took over.
    pub restored: Option<(String, String)>,
}

struct Loaded {
    label: PolicyLabel,
    kind: PolicyKind,
    sha256: [u8; 32],
    config: String,
    limits: PolicyLimits,
    prepared: Prepared,
    consecutive_failures: AtomicU32,
    total_failures: AtomicU64,
    evaluations: AtomicU64,
    deactivated: AtomicBool,
}

impl Loaded {
    fn record_success(&self) {
        self.consecutive_failures.store(0, Ordering::SeqCst);
        self.evaluations.fetch_add(1, Ordering::Relaxed);
    }
}

type Key = (String, String);

#[derive(Default)]
struct Registry {
    versions: BTreeMap<Key, Arc<Loaded>>,
    /// Why a version stored elsewhere could not be loaded here (see [`PolicyRuntime::record_load_error`]).
    load_errors: BTreeMap<Key, String>,
    /// Deactivations not yet taken by [`PolicyRuntime::take_deactivations`].
    deactivations: Vec<Deactivation>,
    /// Per kind, the versions that were active before the current one, most recent last.
    history: [Vec<Arc<Loaded>>; 2],
}

/// The policy engine's front door. Share it as `Arc<PolicyRuntime>`; every method takes
/// `&self`. `place` and `admit` block for up to the policy's deadline: call them from
/// `spawn_blocking` in async code.
pub struct PolicyRuntime {
    engine: PolicyEngine,
    settings: RuntimeSettings,
    /// Written only with `registry` held, so that swaps and restores are consistent.
    registry: Mutex<Registry>,
    /// The active version per kind. Readers clone the `Arc` and drop the lock at once: a round
    /// in flight keeps the version it started with whatever is activated meanwhile.
    active: [RwLock<Option<Arc<Loaded>>>; 2],
    /// Signalled when a version is deactivated after repeated failures.
    deactivated: tokio::sync::Notify,
    /// Held by whoever makes this replica follow (or change) the store's active versions, so
    /// that an API activation and the policy sync never undo each other's local swap.
    activation: tokio::sync::Mutex<()>,
    observer: Arc<dyn RuntimeObserver>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl PolicyRuntime {
    pub fn new(engine: PolicyEngine, settings: RuntimeSettings) -> Self {
        PolicyRuntime {
            engine,
            settings,
            registry: Mutex::new(Registry::default()),
            active: [RwLock::new(None), RwLock::new(None)],
            deactivated: tokio::sync::Notify::new(),
            activation: tokio::sync::Mutex::new(()),
            observer: Arc::new(Unobserved),
        }
    }

    /// This runtime, telling `observer` of its failures and deactivations.
    pub fn with_observer(mut self, observer: Arc<dyn RuntimeObserver>) -> Self {
        self.observer = observer;
        self
    }

    pub fn engine(&self) -> &PolicyEngine {
        &self.engine
    }

    pub fn settings(&self) -> &RuntimeSettings {
        &self.settings
    }

    /// The largest memory limit (MiB) and deadline (ms) a version may ask for.
    pub fn limit_caps(&self) -> (u64, u64) {
        let caps = self.engine.settings();
        (
            (caps.max_memory_bytes as u64) >> 20,
            u64::try_from(caps.max_deadline.as_millis()).unwrap_or(u64::MAX),
        )
    }

    /// A version's own limits from its stored fields (`None`: the defaults), each unset one
    /// taken from [`RuntimeSettings::default_limits`]; `Err` names a limit over the engine's
    /// caps ([`EngineSettings::max_memory_bytes`](super::EngineSettings), `max_deadline`).
    pub fn limits_for(
        &self,
        memory_bytes: Option<u64>,
        deadline_ms: Option<u64>,
    ) -> std::result::Result<Option<PolicyLimits>, String> {
        if memory_bytes.is_none() && deadline_ms.is_none() {
            return Ok(None);
        }
        let caps = self.engine.settings();
        let mut limits = self.settings.default_limits;
        if let Some(memory) = memory_bytes {
            let max = caps.max_memory_bytes as u64;
            if memory == 0 || memory > max {
                return Err(format!(
                    "the memory limit must be between 1 MiB and {} MiB, got {} bytes",
                    max >> 20,
                    memory
                ));
            }
            limits.memory_bytes = usize::try_from(memory).unwrap_or(usize::MAX);
        }
        if let Some(deadline) = deadline_ms {
            let max = caps.max_deadline.as_millis();
            if deadline == 0 || u128::from(deadline) > max {
                return Err(format!(
                    "the deadline must be between 1 and {max} ms, got {deadline} ms"
                ));
            }
            limits.deadline = Duration::from_millis(deadline);
        }
        Ok(Some(limits))
    }

    /// The lock that orders changes of the active versions between the API and the policy
    /// sync (hold it across "read or write the store's active record, then swap locally").
    pub fn activation_lock(&self) -> &tokio::sync::Mutex<()> {
        &self.activation
    }

    /// Resolves when a version is deactivated after repeated failures (then call
    /// [`Self::take_deactivations`]).
    pub async fn deactivation_signalled(&self) {
        self.deactivated.notified().await;
    }

    /// The deactivations since the last call, oldest first.
    pub fn take_deactivations(&self) -> Vec<Deactivation> {
        std::mem::take(&mut lock(&self.registry).deactivations)
    }

    /// Clears the deactivation mark of a loaded version and its failure count: an operator
    /// activates it again knowingly.
    pub fn clear_deactivation(&self, name: &str, version: &str) -> Result<()> {
        let policy = self.get(name, version)?;
        policy.deactivated.store(false, Ordering::SeqCst);
        policy.consecutive_failures.store(0, Ordering::SeqCst);
        Ok(())
    }

    /// Remembers why a stored version could not be loaded here (shown by the API, and so that
    /// the sync does not compile a broken version again every tick).
    pub fn record_load_error(&self, name: &str, version: &str, error: String) {
        lock(&self.registry)
            .load_errors
            .insert((name.to_string(), version.to_string()), error);
    }

    /// Forgets a recorded load error (the version was deleted, or loaded since).
    pub fn clear_load_error(&self, name: &str, version: &str) {
        lock(&self.registry)
            .load_errors
            .remove(&(name.to_string(), version.to_string()));
    }

    /// Why `name`/`version` could not be loaded here, if it could not.
    pub fn load_error(&self, name: &str, version: &str) -> Option<String> {
        lock(&self.registry)
            .load_errors
            .get(&(name.to_string(), version.to_string()))
            .cloned()
    }

    /// Whether `name`/`version` is loaded here, and its kind.
    pub fn loaded_kind(&self, name: &str, version: &str) -> Option<PolicyKind> {
        self.get(name, version).ok().map(|p| p.kind)
    }

    /// Loads a version with the default limits and every check; see [`Self::load_with`].
    pub fn load(
        &self,
        name: &str,
        version: &str,
        bytes: &[u8],
        config: &str,
    ) -> Result<PolicyKind> {
        self.load_with(name, version, bytes, config, LoadOptions::default())
    }

    /// Compiles and checks a component before keeping it: it must compile, import nothing
    /// but WASI and the contract's `host`, export the `placement` or `admission` world,
    /// accept `config` (JSON, `{}` when empty), and decide a synthetic round within its
    /// limits. Returns the world it implements. Nothing is kept when a check fails.
    pub fn load_with(
        &self,
        name: &str,
        version: &str,
        bytes: &[u8],
        config: &str,
        options: LoadOptions,
    ) -> Result<PolicyKind> {
        let key = (name.to_string(), version.to_string());
        if lock(&self.registry).versions.contains_key(&key) {
            return Err(PolicyError::AlreadyLoaded {
                name: key.0,
                version: key.1,
            });
        }
        let config = if config.trim().is_empty() {
            "{}"
        } else {
            config
        };
        serde_json::from_str::<serde_json::Value>(config)
            .map_err(|e| PolicyError::ConfigRejected(format!("not JSON: {e}")))?;
        let (component, sha256) = self.engine.compile(bytes)?;
        let loaded = match self.check(name, version, &component, sha256, config, options) {
            Ok(loaded) => loaded,
            Err(e) => {
                // Keep no compiled code for a refused upload, unless a loaded version shares it.
                let registry = lock(&self.registry);
                if !registry.versions.values().any(|v| v.sha256 == sha256) {
                    self.engine.evict(&sha256);
                }
                return Err(e);
            }
        };
        let kind = loaded.kind;
        let mut registry = lock(&self.registry);
        if registry.versions.contains_key(&key) {
            return Err(PolicyError::AlreadyLoaded {
                name: key.0,
                version: key.1,
            });
        }
        registry.load_errors.remove(&key);
        registry.versions.insert(key, loaded);
        tracing::info!(
            policy_name = name,
            policy_version = version,
            kind = kind.as_str(),
            "policy loaded"
        );
        Ok(kind)
    }

    /// Links, configures and smoke-tests a compiled component.
    fn check(
        &self,
        name: &str,
        version: &str,
        component: &wasmtime::component::Component,
        sha256: [u8; 32],
        config: &str,
        options: LoadOptions,
    ) -> Result<Arc<Loaded>> {
        let prepared = self.engine.prepare(component)?;
        let kind = match prepared {
            Prepared::Placement(_) | Prepared::PlacementV2(_) => PolicyKind::Placement,
            Prepared::Admission(_) | Prepared::AdmissionV2(_) => PolicyKind::Admission,
        };
        let loaded = Arc::new(Loaded {
            label: PolicyLabel {
                name: name.into(),
                version: version.into(),
            },
            kind,
            sha256,
            config: config.to_string(),
            limits: options.limits.unwrap_or(self.settings.default_limits),
            prepared,
            consecutive_failures: AtomicU32::new(0),
            total_failures: AtomicU64::new(0),
            evaluations: AtomicU64::new(0),
            deactivated: AtomicBool::new(false),
        });
        if options.smoke_check {
            self.smoke(&loaded).map_err(|e| match e {
                PolicyError::ConfigRejected(_) => e,
                other => PolicyError::SmokeFailed(Box::new(other)),
            })?;
        }
        Ok(loaded)
    }

    fn smoke(&self, policy: &Loaded) -> Result<()> {
        match policy.kind {
            PolicyKind::Placement => {
                self.run_place(policy, &PlacementInput::synthetic())?;
            }
            PolicyKind::Admission => {
                let task = AdmissionTask {
                    id: "smoke-t0".into(),
                    user: "smoke".into(),
                    image: "busybox".into(),
                    request: Resources {
                        cpu: 1.0,
                        memory: 1.0,
                        storage: 1.0,
                        gpu: 0.0,
                    },
                    priority: 0,
                    labels: vec![("zone".into(), "a".into())],
                    attempts: 0,
                    age_s: 0.0,
                };
                let usage = UserUsage {
                    running_tasks: 1,
                    queued_tasks: 0,
                    pending_tasks: 1,
                    reserved: Resources {
                        cpu: 1.0,
                        memory: 1.0,
                        storage: 1.0,
                        gpu: 0.0,
                    },
                };
                self.run_admit(policy, &task, &usage)?;
            }
        }
        Ok(())
    }

    /// Makes a loaded version the active one of its kind. The version it replaces is
    /// remembered as the one to restore if the new one keeps failing.
    pub fn activate(&self, name: &str, version: &str) -> Result<()> {
        let mut registry = lock(&self.registry);
        let key = (name.to_string(), version.to_string());
        let Some(policy) = registry.versions.get(&key).cloned() else {
            return Err(PolicyError::NotFound {
                name: key.0,
                version: key.1,
            });
        };
        if policy.deactivated.load(Ordering::SeqCst) {
            return Err(PolicyError::Deactivated {
                name: key.0,
                version: key.1,
            });
        }
        policy.consecutive_failures.store(0, Ordering::SeqCst);
        let slot = slot(policy.kind);
        let previous = self.swap_active(policy.kind, Some(policy.clone()));
        if let Some(previous) = previous
            && !Arc::ptr_eq(&previous, &policy)
        {
            registry.history[slot].push(previous);
        }
        tracing::info!(
            policy_name = name,
            policy_version = version,
            kind = policy.kind.as_str(),
            "policy activated"
        );
        Ok(())
    }

    /// Leaves `kind` to the native policy (placement) or the fallback (admission).
    pub fn deactivate(&self, kind: PolicyKind) {
        let mut registry = lock(&self.registry);
        if let Some(previous) = self.swap_active(kind, None) {
            registry.history[slot(kind)].push(previous);
        }
    }

    /// Forgets an inactive version.
    pub fn unload(&self, name: &str, version: &str) -> Result<()> {
        let mut registry = lock(&self.registry);
        let key = (name.to_string(), version.to_string());
        let Some(policy) = registry.versions.get(&key).cloned() else {
            return Err(PolicyError::NotFound {
                name: key.0,
                version: key.1,
            });
        };
        if self
            .current(policy.kind)
            .is_some_and(|a| Arc::ptr_eq(&a, &policy))
        {
            return Err(PolicyError::Host(format!(
                "policy {name} version {version} is active: activate another first"
            )));
        }
        registry.versions.remove(&key);
        for history in &mut registry.history {
            history.retain(|p| !Arc::ptr_eq(p, &policy));
        }
        Ok(())
    }

    /// The active (name, version) of `kind`, if any.
    pub fn active(&self, kind: PolicyKind) -> Option<(String, String)> {
        self.current(kind)
            .map(|p| (p.label.name.to_string(), p.label.version.to_string()))
    }

    /// Every loaded version, by name then version.
    pub fn versions(&self) -> Vec<PolicyVersionInfo> {
        let registry = lock(&self.registry);
        registry
            .versions
            .values()
            .map(|p| PolicyVersionInfo {
                name: p.label.name.to_string(),
                version: p.label.version.to_string(),
                kind: p.kind,
                sha256: hex::encode(p.sha256),
                limits: p.limits,
                active: self.current(p.kind).is_some_and(|a| Arc::ptr_eq(&a, p)),
                deactivated: p.deactivated.load(Ordering::SeqCst),
                consecutive_failures: p.consecutive_failures.load(Ordering::SeqCst),
                total_failures: p.total_failures.load(Ordering::SeqCst),
                evaluations: p.evaluations.load(Ordering::SeqCst),
                contract: p.prepared.contract(),
            })
            .collect()
    }

    fn current(&self, kind: PolicyKind) -> Option<Arc<Loaded>> {
        self.active[slot(kind)]
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn swap_active(&self, kind: PolicyKind, new: Option<Arc<Loaded>>) -> Option<Arc<Loaded>> {
        let mut slot = self.active[slot(kind)]
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        std::mem::replace(&mut *slot, new)
    }

    /// Whether a version of `kind` is active (else the built-in default decides).
    pub fn has_active(&self, kind: PolicyKind) -> bool {
        self.current(kind).is_some()
    }

    /// Whether the active placement policy speaks `cloudai:policy@0.2.0`: a round then offers
    /// it the running tasks it may preempt ([`PlacementInput::with_preemptible`]).
    pub fn active_may_preempt(&self) -> bool {
        self.current(PolicyKind::Placement)
            .is_some_and(|p| matches!(p.prepared, Prepared::PlacementV2(_)))
    }

    /// Decides a placement round: with the active placement policy, its answer checked; with
    /// the native best-fit when none is active or when it fails (the failure counted and
    /// logged). Never fails, never panics.
    pub fn place(&self, input: &PlacementInput) -> PlacementOutcome {
        let started = Instant::now();
        let Some(policy) = self.current(PolicyKind::Placement) else {
            return PlacementOutcome {
                decisions: native::best_fit(input),
                source: PolicySource::Native,
                elapsed: started.elapsed(),
            };
        };
        match self.run_place(&policy, input) {
            Ok(decisions) => {
                policy.record_success();
                PlacementOutcome {
                    decisions,
                    source: wasm_source(&policy),
                    elapsed: started.elapsed(),
                }
            }
            Err(err) => {
                self.record_failure(&policy, &err);
                PlacementOutcome {
                    decisions: native::best_fit(input),
                    source: fallback_source(&policy, &err),
                    elapsed: started.elapsed(),
                }
            }
        }
    }

    /// Runs a loaded version (active or not) on a round without acting on it or counting its
    /// failures: the dry run.
    pub fn place_with(
        &self,
        name: &str,
        version: &str,
        input: &PlacementInput,
    ) -> Result<Vec<Decision>> {
        let policy = self.get(name, version)?;
        self.run_place(&policy, input)
    }

    /// Runs a loaded admission version (active or not) on one check without acting on it or
    /// counting its failures: the dry run.
    pub fn admit_with(
        &self,
        name: &str,
        version: &str,
        task: &AdmissionTask,
        usage: &UserUsage,
    ) -> Result<AdmissionDecision> {
        let policy = self.get(name, version)?;
        self.run_admit(&policy, task, usage)
    }

    /// Decides an admission check with the active admission policy; accepts when none is
    /// active; applies [`RuntimeSettings::admission_fallback`] when it fails.
    pub fn admit(&self, task: &AdmissionTask, usage: &UserUsage) -> AdmissionOutcome {
        let started = Instant::now();
        let Some(policy) = self.current(PolicyKind::Admission) else {
            return accepted_natively(started);
        };
        self.admit_active(&policy, task, usage, started)
    }

    /// Like [`PolicyRuntime::admit`], with the user's usage read only when an admission policy
    /// is active (`None` from `usage`: not read yet; the check is not decided and `None` is
    /// returned). The built-in default accepts without looking at usage, and reading usage
    /// costs the store a query per user, so callers skip it while no policy is active.
    pub fn admit_lazily(
        &self,
        task: &AdmissionTask,
        usage: Option<&UserUsage>,
    ) -> Option<AdmissionOutcome> {
        let started = Instant::now();
        let Some(policy) = self.current(PolicyKind::Admission) else {
            return Some(accepted_natively(started));
        };
        Some(self.admit_active(&policy, task, usage?, started))
    }

    fn admit_active(
        &self,
        policy: &Arc<Loaded>,
        task: &AdmissionTask,
        usage: &UserUsage,
        started: Instant,
    ) -> AdmissionOutcome {
        match self.run_admit(policy, task, usage) {
            Ok(decision) => {
                policy.record_success();
                AdmissionOutcome {
                    decision,
                    source: wasm_source(policy),
                    elapsed: started.elapsed(),
                }
            }
            Err(err) => {
                self.record_failure(policy, &err);
                let decision = match self.settings.admission_fallback {
                    AdmissionFallback::Accept => AdmissionDecision::Accept,
                    AdmissionFallback::Defer => AdmissionDecision::Defer(format!(
                        "admission policy {} {} failed; the task will be checked again",
                        policy.label.name, policy.label.version
                    )),
                };
                AdmissionOutcome {
                    decision,
                    source: fallback_source(policy, &err),
                    elapsed: started.elapsed(),
                }
            }
        }
    }

    /// Time to instantiate a loaded version from its `InstancePre` into a fresh store, alone
    /// (no `configure`, no decision): for benchmarks and diagnostics.
    pub fn time_instantiate(&self, name: &str, version: &str) -> Result<Duration> {
        let policy = self.get(name, version)?;
        self.engine.evaluate(&policy.label, policy.limits, |store| {
            let started = Instant::now();
            match &policy.prepared {
                Prepared::Placement(pre) => {
                    pre.instantiate(&mut *store)?;
                }
                Prepared::Admission(pre) => {
                    pre.instantiate(&mut *store)?;
                }
                Prepared::PlacementV2(pre) => {
                    pre.instantiate(&mut *store)?;
                }
                Prepared::AdmissionV2(pre) => {
                    pre.instantiate(&mut *store)?;
                }
            }
            Ok(started.elapsed())
        })
    }

    fn get(&self, name: &str, version: &str) -> Result<Arc<Loaded>> {
        lock(&self.registry)
            .versions
            .get(&(name.to_string(), version.to_string()))
            .cloned()
            .ok_or_else(|| PolicyError::NotFound {
                name: name.to_string(),
                version: version.to_string(),
            })
    }

    fn run_place(&self, policy: &Loaded, input: &PlacementInput) -> Result<Vec<Decision>> {
        match &policy.prepared {
            Prepared::Placement(pre) => {
                let answer = self
                    .engine
                    .evaluate(&policy.label, policy.limits, |store| {
                        configured_call!(pre, store, &policy.config, |instance| instance
                            .call_place(&mut *store, input.columns())?)
                    })?;
                let answer = answer.map_err(PolicyError::ConfigRejected)?;
                validate_placement(input, answer)
            }
            Prepared::PlacementV2(pre) => {
                let columns = input.columns_v2();
                let answer = self
                    .engine
                    .evaluate(&policy.label, policy.limits, |store| {
                        configured_call!(pre, store, &policy.config, |instance| instance
                            .call_place(&mut *store, &columns)?)
                    })?;
                let answer = answer.map_err(PolicyError::ConfigRejected)?;
                validate_placement_v2(input, answer)
            }
            Prepared::Admission(_) | Prepared::AdmissionV2(_) => {
                Err(PolicyError::WrongWorld(format!(
                    "{} {} is an admission policy",
                    policy.label.name, policy.label.version
                )))
            }
        }
    }

    fn run_admit(
        &self,
        policy: &Loaded,
        task: &AdmissionTask,
        usage: &UserUsage,
    ) -> Result<AdmissionDecision> {
        let answer = match &policy.prepared {
            Prepared::Admission(pre) => {
                self.engine
                    .evaluate(&policy.label, policy.limits, |store| {
                        configured_call!(pre, store, &policy.config, |instance| instance
                            .call_admit(&mut *store, task, *usage)?)
                    })?
            }
            Prepared::AdmissionV2(pre) => {
                let (task, usage) = super::contract_v2::admission_v2(task, usage);
                self.engine
                    .evaluate(&policy.label, policy.limits, |store| {
                        configured_call!(pre, store, &policy.config, |instance| {
                            let decision = instance.call_admit(&mut *store, &task, usage)?;
                            super::contract_v2::admission_decision_v1(decision)
                        })
                    })?
            }
            Prepared::Placement(_) | Prepared::PlacementV2(_) => {
                return Err(PolicyError::WrongWorld(format!(
                    "{} {} is a placement policy",
                    policy.label.name, policy.label.version
                )));
            }
        };
        let decision = answer.map_err(PolicyError::ConfigRejected)?;
        Ok(match decision {
            guest::AdmissionDecision::Reject(r) => AdmissionDecision::Reject(cut(r)),
            guest::AdmissionDecision::Defer(r) => AdmissionDecision::Defer(cut(r)),
            guest::AdmissionDecision::Accept => AdmissionDecision::Accept,
        })
    }

    /// Counts a failed evaluation and deactivates the version once it has failed
    /// `failure_threshold` times in a row.
    fn record_failure(&self, policy: &Arc<Loaded>, err: &PolicyError) {
        let (name, version) = (&*policy.label.name, &*policy.label.version);
        self.observer
            .failed(policy.kind, name, version, err.metric_label());
        if !err.is_evaluation_failure() {
            tracing::error!(policy_name = name, policy_version = version, error = %err, "policy could not be evaluated; fallback used");
            return;
        }
        let failures = policy.consecutive_failures.fetch_add(1, Ordering::SeqCst) + 1;
        policy.total_failures.fetch_add(1, Ordering::SeqCst);
        tracing::warn!(
            policy_name = name,
            policy_version = version,
            kind = policy.kind.as_str(),
            consecutive_failures = failures,
            error = %err,
            "policy failed; fallback used for this decision"
        );
        if failures >= self.settings.failure_threshold.max(1) {
            self.deactivate_failed(policy);
        }
    }

    fn deactivate_failed(&self, policy: &Arc<Loaded>) {
        let mut registry = lock(&self.registry);
        policy.deactivated.store(true, Ordering::SeqCst);
        let kind = policy.kind;
        // Another round may have done this already, or the version may have been swapped out.
        if !self.current(kind).is_some_and(|a| Arc::ptr_eq(&a, policy)) {
            return;
        }
        let history = &mut registry.history[slot(kind)];
        let mut restored = None;
        while let Some(candidate) = history.pop() {
            if !candidate.deactivated.load(Ordering::SeqCst) {
                restored = Some(candidate);
                break;
            }
        }
        if let Some(r) = &restored {
            r.consecutive_failures.store(0, Ordering::SeqCst);
        }
        let restored_label = restored
            .as_ref()
            .map(|r| format!("{} {}", r.label.name, r.label.version))
            .unwrap_or_else(|| "the native policy".to_string());
        registry.deactivations.push(Deactivation {
            kind,
            name: policy.label.name.to_string(),
            version: policy.label.version.to_string(),
            restored: restored
                .as_ref()
                .map(|r| (r.label.name.to_string(), r.label.version.to_string())),
        });
        self.swap_active(kind, restored);
        self.observer
            .deactivated(kind, &policy.label.name, &policy.label.version);
        self.deactivated.notify_one();
        tracing::error!(
            policy_name = &*policy.label.name,
            policy_version = &*policy.label.version,
            kind = kind.as_str(),
            restored = %restored_label,
            "policy deactivated after repeated failures"
        );
    }
}

fn cut(reason: String) -> String {
    super::engine::truncate(&reason, super::validate::MAX_REASON_BYTES).to_string()
}

/// The built-in default admission: accept.
fn accepted_natively(started: Instant) -> AdmissionOutcome {
    AdmissionOutcome {
        decision: AdmissionDecision::Accept,
        source: PolicySource::Native,
        elapsed: started.elapsed(),
    }
}

fn wasm_source(policy: &Loaded) -> PolicySource {
    PolicySource::Wasm {
        name: policy.label.name.to_string(),
        version: policy.label.version.to_string(),
    }
}

fn fallback_source(policy: &Loaded, err: &PolicyError) -> PolicySource {
    PolicySource::Fallback {
        name: policy.label.name.to_string(),
        version: policy.label.version.to_string(),
        reason: err.to_string(),
    }
}
