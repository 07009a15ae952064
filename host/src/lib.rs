//! CloudAI host library: the data model, the stores, the HTTP API and the CLI behind the
//! `cloudai` binary. Start with [`model`] (what is stored) and [`store`] (how).

pub mod api;
pub mod model;
pub mod store;
