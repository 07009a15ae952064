//! The worker agent (`cloudai worker`, and the local worker `cloudai serve` runs in-process):
//! detects what the machine offers, registers with the host, heartbeats with usage, and runs
//! its assigned tasks as containers through the executor, reporting starts and results.

mod agent;
pub mod cli;
pub mod client;
// The executor's crate, under the module name the worker's modules (and the host) use.
pub use cloudai_executor as executor;
mod gpus;
mod identity;
pub mod resources;
mod runner;

use std::future::Future;
use std::sync::Arc;

use anyhow::Context;

pub use agent::{Agent, AgentConfig, DEFAULT_HEARTBEAT_INTERVAL};
pub use resources::Overrides;
pub use runner::{Runner, RunnerConfig};

use crate::executor::{Executor, ExecutorConfig};

// The data model and the worker protocol, under the names the host uses for them.
use cloudai_model as model;
use cloudai_model::protocol;

/// Default bound on containers run at once by one worker (the host's reservations bound it
/// first; this only guards the machine against a host that overcommits it).
pub const DEFAULT_MAX_CONCURRENT: usize = 64;

/// Runs a whole worker until `shutdown` resolves: connects to Docker, joins the host (or
/// rejoins with the saved identity), then heartbeats and runs work side by side.
pub async fn run(
    mut config: AgentConfig,
    executor: ExecutorConfig,
    max_concurrent: usize,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let docker = crate::executor::connect()
        .await
        .context("connecting to the Docker engine (is dockerd running? DOCKER_HOST?)")?;
    let executor = Arc::new(
        Executor::new(docker, executor)
            .await
            .context("setting up the executor")?,
    );
    if !executor.storage_enforced() {
        tracing::info!(
            "storage requests are reserved on this worker but not enforced: Docker's storage driver here cannot limit a container's disk"
        );
    }
    if config.storage_path.is_none() {
        config.storage_path = executor.data_root().map(std::path::Path::to_path_buf);
    }
    let state_dir = config.state_dir.clone();
    let host = config.host.clone();
    let tls = config.tls.clone();
    tokio::pin!(shutdown);
    // Joining waits as long as the host cannot take the registration: the shutdown signal
    // must end that wait too (a host that refuses every registration must not keep a
    // stopping process alive).
    let mut agent = tokio::select! {
        agent = Agent::connect(config) => agent?,
        () = &mut shutdown => {
            tracing::info!("shutdown before this worker joined the host");
            return Ok(());
        }
    };
    let runner = Runner::new(
        RunnerConfig {
            host,
            tls,
            worker_id: agent.worker_id().to_string(),
            token: agent.token().to_string(),
            spool_dir: state_dir.join("spool"),
            max_concurrent: max_concurrent.max(1),
            gpus: agent.gpu_devices(),
        },
        executor,
        agent.running_counter(),
    )?;
    // Whichever ends first (the signal, or a part that cannot go on) stops the others.
    let stop = tokio_util::sync::CancellationToken::new();
    let heartbeats = {
        let stop = stop.clone();
        async move {
            let result = agent.run_heartbeats(stop.clone().cancelled_owned()).await;
            stop.cancel();
            result
        }
    };
    let work = {
        let stop = stop.clone();
        async move {
            let result = runner.run(stop.clone().cancelled_owned()).await;
            stop.cancel();
            result
        }
    };
    let signal = async {
        tokio::select! {
            () = &mut shutdown => stop.cancel(),
            () = stop.cancelled() => {}
        }
    };
    let (heartbeats, work, ()) = tokio::join!(heartbeats, work, signal);
    heartbeats?;
    work
}
