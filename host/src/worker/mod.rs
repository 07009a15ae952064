//! The worker agent (`cloudai worker`): detects what the machine offers, registers with the
//! host, and heartbeats with usage. Running the assigned tasks through the executor builds on
//! this.

mod agent;
mod identity;
pub mod resources;

pub use agent::{Agent, AgentConfig, DEFAULT_HEARTBEAT_INTERVAL};
pub use resources::Overrides;
