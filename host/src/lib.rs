//! CloudAI host library: the data model, the stores, the HTTP API and the CLI behind the
//! `cloudai` binary.
//!
//! Where to start: [`model`] (what is stored, in the seed schema's names), [`store`] (the
//! `Store` trait and its SQLite and MongoDB backends), [`api`] (the `/v1` HTTP API),
//! [`serve`] (the host process), [`cli`] (the command line) and [`policy`] (WebAssembly
//! placement and admission policies).

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
