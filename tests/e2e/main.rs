//! End-to-end tests: a real `cloudai serve` process, driven over real HTTP and through the CLI,
//! on the embedded store and on a MongoDB-protocol server.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod arrays;
mod backup;
mod dashboard;
mod dependencies;
mod events;
mod execution;
mod guide;
mod harness;
mod invoke;
mod labels;
mod metrics;
mod policies;
mod policy_tools;
mod preemption;
mod replicas;
mod scheduling;
mod shutdown;
mod telemetry;
mod tls;
mod tour;
mod worker_process;
