//! CloudAI host: the `cloudai` binary's library, the host process ([`serve`]), the command
//! line ([`cli`]) and the policy author's tools ([`tooling`]), over the crates below it, which
//! it re-exports under the module names it has always used.
//!
//! Where to start: [`model`] (what is stored, in the seed schema's names), [`store`] (the
//! `Store` contract and its SQLite and MongoDB backends), [`api`] (the `/v1` HTTP API),
//! [`lifecycle`], [`scheduler`] and [`reconciler`] (the control plane), [`policy`]
//! (WebAssembly placement and admission policies) and [`worker`] (the worker agent).
//! docs/architecture.md draws the crates and the life of a task across them.

pub mod backup;
pub mod cli;
pub mod output;
pub mod serve;
pub mod telemetry;
pub mod tls;
pub mod tooling;

// The crates below the host, under the module names the host has always used for them.
pub use cloudai_api as api;
pub use cloudai_control::{events, lifecycle, metrics, policy, reconciler, scheduler};
pub use cloudai_model as model;
pub use cloudai_model::protocol;
pub use cloudai_store as store;
pub use cloudai_worker as worker;
pub use cloudai_worker::{client, executor};
