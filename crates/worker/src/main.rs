//! `cloudai-worker`: the worker alone, for worker machines (the same flags as `cloudai
//! worker`, without the host's policy runtime, stores and HTTP server in the binary).

use std::process::ExitCode;

use clap::Parser;
use cloudai_worker::cli::{WorkerArgs, run, shutdown_signal};
use tracing_subscriber::EnvFilter;

/// Joins a CloudAI host and runs the tasks it assigns as containers.
#[derive(Debug, Parser)]
#[command(name = "cloudai-worker", version)]
struct Cli {
    #[command(flatten)]
    worker: WorkerArgs,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: starting the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli.worker, shutdown_signal())) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}
