//! The wasmtime side of the policy engine: one `Engine` (component model, pooling allocator,
//! epoch interruption) with its epoch ticker, the in-memory cache of compiled components, the
//! linker (the contract's `host` import plus an empty WASI), and one bounded evaluation: a
//! fresh `Store` with a memory limit and an epoch deadline per call.
//!
//! Compiled components are cached twice: in memory, keyed by the sha256 of their bytes (the
//! engine configuration is fixed per process, so it needs no place in the key), and, when
//! [`EngineSettings::cache_dir`] is set, on disk through wasmtime's own compilation cache,
//! keyed by a hash of the bytes, the engine configuration and the wasmtime version. The disk
//! cache is what spares a restarted host (or a second replica on the same machine) the
//! seconds a large Python or JavaScript guest takes to compile; it is wasmtime's, not ours,
//! because loading a precompiled artifact is `unsafe` and wasmtime's cache does it behind a
//! safe API with its own integrity checks.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use wasmtime::component::{Component, HasSelf, Linker, ResourceTable};
use wasmtime::{
    Cache, CacheConfig, Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig,
    ResourceLimiter, Store, Trap,
};
use wasmtime_wasi::{HostMonotonicClock, HostWallClock, WasiCtx, WasiCtxView, WasiView};

use super::bindings::admission::AdmissionPre;
use super::bindings::admission_v2::AdmissionPre as AdmissionV2Pre;
use super::bindings::placement::{Placement, PlacementPre};
use super::bindings::placement_v2::{Placement as PlacementV2, PlacementPre as PlacementV2Pre};
use super::bindings::{host, host_v2, types, types_v2};
use super::error::{PolicyError, Result, describe};

/// Settings of the engine, shared by every policy.
#[derive(Debug, Clone)]
pub struct EngineSettings {
    /// How often the epoch advances: the resolution of every deadline. 1 ms keeps a 50 ms
    /// deadline within 2% and costs one wake-up per millisecond on one thread (negligible
    /// next to a scheduling round); a coarser tick would let a runaway guest overrun more.
    pub epoch_tick: Duration,
    /// Guest instances alive at once (the pooling allocator's slots); further evaluations
    /// wait for a slot instead of failing.
    pub max_concurrent_instances: u32,
    /// The largest linear memory any policy may have; per-policy limits are capped to it.
    pub max_memory_bytes: usize,
    /// Where compiled components are kept across restarts (created when absent); `None`
    /// keeps them in memory only.
    pub cache_dir: Option<PathBuf>,
    /// The longest deadline any policy may ask for: a round waits for it at worst.
    pub max_deadline: Duration,
}

impl Default for EngineSettings {
    fn default() -> Self {
        EngineSettings {
            epoch_tick: Duration::from_millis(1),
            max_concurrent_instances: 16,
            max_memory_bytes: 512 << 20,
            cache_dir: None,
            max_deadline: Duration::from_secs(1),
        }
    }
}

/// The bounds of one evaluation of one policy.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PolicyLimits {
    /// Wall-clock budget of one evaluation (instantiate, configure, decide).
    pub deadline: Duration,
    /// The most linear memory the guest may grow to, in bytes.
    pub memory_bytes: usize,
}

impl Default for PolicyLimits {
    fn default() -> Self {
        PolicyLimits {
            deadline: Duration::from_millis(50),
            memory_bytes: 64 << 20,
        }
    }
}

/// wasmtime's compilation cache in `dir` (made absolute: wasmtime requires it).
fn disk_cache(dir: &std::path::Path) -> Result<Cache> {
    let host = |what: &str, e: &dyn std::fmt::Display| {
        PolicyError::Host(format!(
            "{what} the compiled-policy cache in {}: {e}",
            dir.display()
        ))
    };
    std::fs::create_dir_all(dir).map_err(|e| host("creating", &e))?;
    let dir = std::path::absolute(dir).map_err(|e| host("resolving", &e))?;
    let mut config = CacheConfig::new();
    config.with_directory(&dir);
    Cache::new(config).map_err(|e| host("opening", &describe(&e)))
}

/// A policy version made ready to instantiate: the world it implements, pre-linked.
#[derive(Clone)]
pub(crate) enum Prepared {
    Placement(PlacementPre<GuestState>),
    Admission(AdmissionPre<GuestState>),
    /// A `cloudai:policy@0.2.0` placement policy: it sees the running tasks and may preempt.
    PlacementV2(PlacementV2Pre<GuestState>),
    AdmissionV2(AdmissionV2Pre<GuestState>),
}

impl Prepared {
    /// The contract version the component was built against.
    pub(crate) fn contract(&self) -> &'static str {
        match self {
            Prepared::Placement(_) | Prepared::Admission(_) => "0.1.0",
            Prepared::PlacementV2(_) | Prepared::AdmissionV2(_) => "0.2.0",
        }
    }
}

/// The wasmtime engine shared by every policy. Cheap to clone.
#[derive(Clone)]
pub struct PolicyEngine {
    inner: Arc<Inner>,
}

struct Inner {
    engine: Engine,
    linker: Linker<GuestState>,
    compiled: Mutex<HashMap<[u8; 32], Component>>,
    disk_cache: Option<Cache>,
    slots: Slots,
    settings: EngineSettings,
    // Declared last: stopped when the engine goes away.
    _ticker: EpochTicker,
}

impl PolicyEngine {
    /// An engine with the given settings, its epoch ticker started.
    pub fn new(settings: EngineSettings) -> Result<Self> {
        let instances = settings.max_concurrent_instances.max(1);
        let mut pool = PoolingAllocationConfig::new();
        // A Rust wasip2 component holds a few core instances (the module and the shims that
        // wit-component adds); larger guests hold more (a componentize-py guest: 38). The
        // total allows every slot its maximum, so concurrent large guests never exhaust it.
        // The same for memories: a componentize-qjs (JavaScript) guest has 3; with 2 per slot,
        // the 11th concurrent JavaScript evaluation would fail to instantiate. A memory slot
        // costs address space only (reserved, not committed).
        pool.total_component_instances(instances)
            .max_core_instances_per_component(64)
            .total_core_instances(instances * 64)
            .max_memories_per_component(4)
            .total_memories(instances * 4)
            .max_tables_per_component(8)
            .total_tables(instances * 8)
            .total_stacks(instances)
            .max_memory_size(settings.max_memory_bytes);

        let mut config = Config::new();
        config
            .wasm_component_model(true)
            .epoch_interruption(true)
            .allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
        let disk_cache = match &settings.cache_dir {
            Some(dir) => Some(disk_cache(dir)?),
            None => None,
        };
        config.cache(disk_cache.clone());
        let engine = Engine::new(&config).map_err(|e| {
            PolicyError::Host(format!("creating the wasmtime engine: {}", describe(&e)))
        })?;

        let mut linker = Linker::<GuestState>::new(&engine);
        wasmtime_wasi::p2::add_to_linker_sync(&mut linker)
            .map_err(|e| PolicyError::Host(format!("linking WASI: {}", describe(&e))))?;
        // The `admission` bindings share these interfaces (see bindings.rs), so one
        // registration per contract version serves both worlds.
        Placement::add_to_linker::<GuestState, HasSelf<GuestState>>(&mut linker, |s| s).map_err(
            |e| PolicyError::Host(format!("linking the host interface: {}", describe(&e))),
        )?;
        PlacementV2::add_to_linker::<GuestState, HasSelf<GuestState>>(&mut linker, |s| s).map_err(
            |e| {
                PolicyError::Host(format!(
                    "linking the host interface 0.2.0: {}",
                    describe(&e)
                ))
            },
        )?;

        let ticker = EpochTicker::start(engine.clone(), settings.epoch_tick)?;
        Ok(PolicyEngine {
            inner: Arc::new(Inner {
                engine,
                linker,
                compiled: Mutex::new(HashMap::new()),
                disk_cache,
                slots: Slots::new(instances),
                settings,
                _ticker: ticker,
            }),
        })
    }

    pub fn settings(&self) -> &EngineSettings {
        &self.inner.settings
    }

    /// Compiles a component, or returns the cached compilation of the same bytes.
    pub fn compile(&self, bytes: &[u8]) -> Result<(Component, [u8; 32])> {
        let sha: [u8; 32] = Sha256::digest(bytes).into();
        if let Some(component) = lock(&self.inner.compiled).get(&sha) {
            return Ok((component.clone(), sha));
        }
        // Compiled outside the lock: it takes tens of ms (seconds for large guests).
        let component = Component::new(&self.inner.engine, bytes)
            .map_err(|e| PolicyError::Compile(describe(&e)))?;
        lock(&self.inner.compiled).insert(sha, component.clone());
        Ok((component, sha))
    }

    /// Drops a compiled component from the cache (a refused upload).
    pub(crate) fn evict(&self, sha256: &[u8; 32]) {
        lock(&self.inner.compiled).remove(sha256);
    }

    /// Hits and misses of the disk cache since the engine started; `None` without one.
    pub fn disk_cache_stats(&self) -> Option<(usize, usize)> {
        self.inner
            .disk_cache
            .as_ref()
            .map(|c| (c.cache_hits(), c.cache_misses()))
    }

    /// Number of distinct components held compiled.
    pub fn cached_components(&self) -> usize {
        lock(&self.inner.compiled).len()
    }

    /// Links a compiled component and checks which world it implements.
    pub(crate) fn prepare(&self, component: &Component) -> Result<Prepared> {
        let pre = self.inner.linker.instantiate_pre(component).map_err(|e| {
            PolicyError::WrongWorld(format!(
                "it imports something the host does not provide: {}",
                describe(&e)
            ))
        })?;
        let exports: Vec<String> = component
            .component_type()
            .exports(&self.inner.engine)
            .map(|(name, _)| name.to_string())
            .collect();
        let has = |prefix: &str| exports.iter().any(|n| n.starts_with(prefix));
        // The version of the exported `config` interface says which contract the component
        // was built against; the errors below are those of that version's worlds.
        let (placement_err, admission_err) = if has("cloudai:policy/config@0.2.") {
            let placement_err = match PlacementV2Pre::new(pre.clone()) {
                Ok(p) => return Ok(Prepared::PlacementV2(p)),
                Err(e) => e,
            };
            match AdmissionV2Pre::new(pre) {
                Ok(a) => return Ok(Prepared::AdmissionV2(a)),
                Err(e) => (placement_err, e),
            }
        } else {
            let placement_err = match PlacementPre::new(pre.clone()) {
                Ok(p) => return Ok(Prepared::Placement(p)),
                Err(e) => e,
            };
            match AdmissionPre::new(pre) {
                Ok(a) => return Ok(Prepared::Admission(a)),
                Err(e) => (placement_err, e),
            }
        };
        if has("place") {
            Err(PolicyError::MissingExport(format!(
                "as a placement policy: {}",
                describe(&placement_err)
            )))
        } else if has("admit") {
            Err(PolicyError::MissingExport(format!(
                "as an admission policy: {}",
                describe(&admission_err)
            )))
        } else if has("cloudai:policy/config") {
            Err(PolicyError::MissingExport(
                "it exports `config` but neither `place` nor `admit`".to_string(),
            ))
        } else {
            Err(PolicyError::WrongWorld(format!(
                "it exports neither `place` nor `admit` of cloudai:policy@0.1.0 or @0.2.0 (its exports: [{}])",
                exports.join(", ")
            )))
        }
    }

    /// Runs `f` in a fresh store bounded by `limits`, on a pool slot, and classifies its
    /// failure. The store (and the instance, possibly trapped) is dropped on return. Safe to
    /// call from anywhere, even a Tokio worker thread (see [`off_async_context`]), and never
    /// panics: a panic inside is reported as [`PolicyError::Host`].
    pub(crate) fn evaluate<R: Send>(
        &self,
        policy: &PolicyLabel,
        limits: PolicyLimits,
        f: impl FnOnce(&mut Store<GuestState>) -> wasmtime::Result<R> + Send,
    ) -> Result<R> {
        off_async_context(|| {
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                self.evaluate_here(policy, limits, f)
            }))
            .unwrap_or_else(|_| {
                Err(PolicyError::Host(format!(
                    "evaluation of {} {} panicked",
                    policy.name, policy.version
                )))
            })
        })
    }

    fn evaluate_here<R>(
        &self,
        policy: &PolicyLabel,
        limits: PolicyLimits,
        f: impl FnOnce(&mut Store<GuestState>) -> wasmtime::Result<R>,
    ) -> Result<R> {
        let memory_bytes = limits
            .memory_bytes
            .min(self.inner.settings.max_memory_bytes);
        let _slot = self.inner.slots.acquire();
        let state = GuestState::new(policy.clone(), memory_bytes);
        let mut store = Store::new(&self.inner.engine, state);
        store.limiter(|s| &mut s.limiter);
        let tick = self
            .inner
            .settings
            .epoch_tick
            .max(Duration::from_micros(100));
        let ticks = (limits.deadline.as_nanos() / tick.as_nanos()).max(1);
        store.set_epoch_deadline(u64::try_from(ticks).unwrap_or(u64::MAX));
        store.epoch_deadline_trap();

        let started = Instant::now();
        match f(&mut store) {
            Ok(r) => Ok(r),
            Err(err) => {
                let interrupted = err
                    .downcast_ref::<Trap>()
                    .is_some_and(|t| *t == Trap::Interrupt);
                if interrupted || started.elapsed() >= limits.deadline && is_trap(&err) {
                    Err(PolicyError::Timeout(limits.deadline))
                } else if store.data().limiter.refused {
                    Err(PolicyError::MemoryLimit(memory_bytes))
                } else {
                    Err(PolicyError::Trap(describe(&err)))
                }
            }
        }
    }
}

/// Runs `f` where wasmtime-wasi's synchronous shims may block on Tokio. Those shims (stdio
/// writes, e.g. a guest's panic message) call `Handle::block_on` on the current runtime,
/// which panics on a runtime worker thread. Outside any runtime, or on a `spawn_blocking`
/// thread of a multi-thread runtime, `f` just runs; on a multi-thread worker it runs in
/// `block_in_place`; under a current-thread runtime (where `block_in_place` is refused) it
/// runs on a short-lived thread of its own.
fn off_async_context<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    use tokio::runtime::{Handle, RuntimeFlavor};
    match Handle::try_current().map(|h| h.runtime_flavor()) {
        Err(_) => f(),
        Ok(RuntimeFlavor::MultiThread) => tokio::task::block_in_place(f),
        Ok(_) => std::thread::scope(|scope| match scope.spawn(f).join() {
            Ok(r) => r,
            Err(panic) => std::panic::resume_unwind(panic),
        }),
    }
}

fn is_trap(err: &wasmtime::Error) -> bool {
    err.downcast_ref::<Trap>().is_some()
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic elsewhere cannot leave these maps half-updated: keep going.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Which policy a store runs, for logs.
#[derive(Debug, Clone)]
pub(crate) struct PolicyLabel {
    pub name: Arc<str>,
    pub version: Arc<str>,
}

/// Most log messages one evaluation may emit, and the longest one (bytes); the rest is cut.
const MAX_LOGS_PER_CALL: u32 = 32;
const MAX_LOG_BYTES: usize = 1024;

/// The data of one store: the (empty) WASI context, the memory limiter, the policy's label.
pub(crate) struct GuestState {
    wasi: WasiCtx,
    table: ResourceTable,
    limiter: MemoryLimiter,
    policy: PolicyLabel,
    logs_left: u32,
}

impl GuestState {
    fn new(policy: PolicyLabel, memory_bytes: usize) -> Self {
        // wasm32-wasip2's std imports some WASI interfaces, so they must be linked; the
        // context grants nothing: no preopens, env, args or network, stdio discarded, and
        // frozen clocks so that a decision cannot depend on the time of day.
        let wasi = WasiCtx::builder()
            .allow_tcp(false)
            .allow_udp(false)
            .allow_ip_name_lookup(false)
            .wall_clock(FrozenClock)
            .monotonic_clock(FrozenClock)
            .build();
        GuestState {
            wasi,
            table: ResourceTable::new(),
            limiter: MemoryLimiter {
                memory_bytes,
                refused: false,
            },
            policy,
            logs_left: MAX_LOGS_PER_CALL,
        }
    }
}

impl WasiView for GuestState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl types::Host for GuestState {}
impl types_v2::Host for GuestState {}

impl host_v2::Host for GuestState {
    fn log(&mut self, level: types_v2::LogLevel, message: String) {
        let level = match level {
            types_v2::LogLevel::Debug => types::LogLevel::Debug,
            types_v2::LogLevel::Info => types::LogLevel::Info,
            types_v2::LogLevel::Warn => types::LogLevel::Warn,
            types_v2::LogLevel::Error => types::LogLevel::Error,
        };
        host::Host::log(self, level, message);
    }
}

impl host::Host for GuestState {
    fn log(&mut self, level: types::LogLevel, message: String) {
        if self.logs_left == 0 {
            return;
        }
        self.logs_left -= 1;
        let message = truncate(&message, MAX_LOG_BYTES);
        let (name, version) = (&*self.policy.name, &*self.policy.version);
        match level {
            types::LogLevel::Debug => {
                tracing::debug!(target: "cloudai::policy::guest", policy_name = name, policy_version = version, "{message}")
            }
            types::LogLevel::Info => {
                tracing::info!(target: "cloudai::policy::guest", policy_name = name, policy_version = version, "{message}")
            }
            types::LogLevel::Warn => {
                tracing::warn!(target: "cloudai::policy::guest", policy_name = name, policy_version = version, "{message}")
            }
            types::LogLevel::Error => {
                tracing::error!(target: "cloudai::policy::guest", policy_name = name, policy_version = version, "{message}")
            }
        }
    }
}

/// The longest prefix of `s` of at most `max` bytes that ends on a character boundary.
pub(crate) fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// Caps linear memory growth and remembers a refusal, so that the trap which follows (a Rust
/// guest aborts when its allocator fails) is reported as what it is.
struct MemoryLimiter {
    memory_bytes: usize,
    refused: bool,
}

/// Table growth cap: a policy has no business with more function references than this.
const MAX_TABLE_ELEMENTS: usize = 100_000;

impl ResourceLimiter for MemoryLimiter {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        let ok = desired <= self.memory_bytes && maximum.is_none_or(|m| desired <= m);
        if !ok {
            self.refused = true;
        }
        Ok(ok)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= MAX_TABLE_ELEMENTS && maximum.is_none_or(|m| desired <= m))
    }
}

/// A clock that always reads zero.
struct FrozenClock;

impl HostWallClock for FrozenClock {
    fn resolution(&self) -> Duration {
        Duration::from_secs(1)
    }
    fn now(&self) -> Duration {
        Duration::ZERO
    }
}

impl HostMonotonicClock for FrozenClock {
    fn resolution(&self) -> u64 {
        1_000_000_000
    }
    fn now(&self) -> u64 {
        0
    }
}

/// Advances the engine's epoch every tick on its own thread, until dropped.
struct EpochTicker {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl EpochTicker {
    fn start(engine: Engine, tick: Duration) -> Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let tick = tick.max(Duration::from_micros(100));
        let thread = std::thread::Builder::new()
            .name("cloudai-epoch".to_string())
            .spawn(move || {
                while !flag.load(Ordering::Relaxed) {
                    std::thread::sleep(tick);
                    engine.increment_epoch();
                }
            })
            .map_err(|e| PolicyError::Host(format!("starting the epoch ticker: {e}")))?;
        Ok(EpochTicker {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for EpochTicker {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// A counting semaphore over the pool's instance slots.
struct Slots {
    free: Mutex<u32>,
    freed: Condvar,
}

struct SlotGuard<'a>(&'a Slots);

impl Slots {
    fn new(n: u32) -> Self {
        Slots {
            free: Mutex::new(n),
            freed: Condvar::new(),
        }
    }

    fn acquire(&self) -> SlotGuard<'_> {
        let mut free = lock(&self.free);
        while *free == 0 {
            free = self
                .freed
                .wait(free)
                .unwrap_or_else(PoisonError::into_inner);
        }
        *free -= 1;
        SlotGuard(self)
    }
}

impl Drop for SlotGuard<'_> {
    fn drop(&mut self) {
        *lock(&self.0.free) += 1;
        self.0.freed.notify_one();
    }
}
