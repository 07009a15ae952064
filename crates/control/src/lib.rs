//! The control plane: everything that decides and records what happens to tasks and workers,
//! over a store, without serving HTTP.
//!
//! Where to start: [`lifecycle`] (every change of a task's or a worker's state, with its cause
//! and its event), [`scheduler`] (admission, dependencies, placement rounds), [`reconciler`]
//! (repairs after crashes and lost workers, under a lease), [`events`] (the event log and its
//! hub), [`metrics`] (the Prometheus instruments) and [`policy`] (the policy runtime of
//! `cloudai-policy`, with the cluster's snapshot a round reads and the sync of the store's
//! active versions). The host's API and the `cloudai` binary sit on top (docs/architecture.md).

// The module docs link the private modules they describe: valid for readers of the code
// (`cargo doc --document-private-items`), which is whom they are written for.
#![allow(rustdoc::private_intra_doc_links)]

// The crates below, under the module names the control plane's modules use for them.
use cloudai_model as model;
use cloudai_store as store;

pub mod events;
pub mod lifecycle;
pub mod metrics;
pub mod policy;
pub mod reconciler;
pub mod scheduler;

#[cfg(any(test, feature = "test-support"))]
pub mod testing;
