//! The policy runtime: placement and admission decisions made by WebAssembly components
//! (the `cloudai:policy` WIT contract in `wit/`), sandboxed and bounded by wasmtime, with the
//! built-in native best-fit as the fallback. It reads no store and serves nothing: the host
//! builds its inputs (the cluster's snapshot) and follows the store's active versions.
//!
//! Where to start: [`PolicyRuntime`] (load, activate, `place`, `admit`, automatic
//! deactivation), [`PlacementInput`] (one scheduling round, columnar, built from
//! `cloudai_model` documents), [`native`] (the native best-fit) and [`engine`] (the wasmtime
//! engine: compilation cache, pooling allocator, epoch deadline, memory limit).
//!
//! Every call into a guest is blocking CPU work bounded by its deadline (tens of ms): async
//! callers run it on `tokio::task::spawn_blocking`, never on a runtime worker thread (the WASI
//! shims block on the current Tokio handle).

use cloudai_model as model;

pub mod bindings;
mod contract_v2;
pub mod engine;
mod error;
mod input;
pub mod native;
mod runtime;
mod validate;

#[cfg(any(test, feature = "test-support"))]
pub mod testing;

#[cfg(test)]
mod guest_tests;

pub use engine::{EngineSettings, PolicyEngine, PolicyLimits};
pub use error::{PolicyError, Result};
pub use input::{
    AdmissionDecision, Decision, PlacementInput, RUNTIME_HISTORY_WINDOW, RunningTask,
    RuntimeHistory, RuntimeStat,
};
pub use runtime::{
    AdmissionFallback, AdmissionOutcome, Deactivation, LoadOptions, PlacementOutcome, PolicyKind,
    PolicyRuntime, PolicySource, PolicyVersionInfo, RuntimeObserver, RuntimeSettings,
};
pub use validate::validate_placement;
