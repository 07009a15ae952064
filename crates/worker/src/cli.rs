//! The worker's command line: the flags of `cloudai worker` and of the `cloudai-worker`
//! binary (the same), and running a worker from them until a shutdown signal.

use std::future::Future;
use std::path::PathBuf;
use std::time::Duration;

use clap::Args;

use crate::client::ClientTls;
use crate::executor::ExecutorConfig;
use crate::{AgentConfig, DEFAULT_MAX_CONCURRENT, Overrides};

/// How task containers run (a task can relax none of it).
#[derive(Debug, Args)]
pub struct ExecutorArgs {
    /// Docker network mode of task containers (`none`: no network at all).
    #[arg(long, env = "CLOUDAI_TASK_NETWORK", default_value = "none")]
    pub task_network: String,
    /// Most processes in one task container.
    #[arg(long, env = "CLOUDAI_TASK_PIDS_LIMIT", default_value_t = 512,
        value_parser = clap::value_parser!(i64).range(16..=1_000_000))]
    pub task_pids_limit: i64,
    /// Most bytes kept of a task's stdout, and of its stderr; the rest is cut with a marker.
    #[arg(long, env = "CLOUDAI_MAX_LOG_BYTES", default_value_t = 1 << 20,
        value_parser = clap::value_parser!(u64).range(1024..=(64 << 20)))]
    pub max_log_bytes: u64,
    /// Most bytes of files a task leaves under /output that are kept (all files together).
    #[arg(long, env = "CLOUDAI_MAX_OUTPUT_BYTES", default_value_t = 64 << 20,
        value_parser = clap::value_parser!(u64).range(0..=(1 << 30)))]
    pub max_output_bytes: u64,
    /// Seconds a cancelled or timed-out container gets to exit before it is killed.
    #[arg(long, env = "CLOUDAI_STOP_GRACE_S", default_value_t = 10,
        value_parser = clap::value_parser!(u64).range(0..=3600))]
    pub stop_grace_s: u64,
    /// Seconds an image pull may take.
    #[arg(long, env = "CLOUDAI_PULL_TIMEOUT_S", default_value_t = 600,
        value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pub pull_timeout_s: u64,
    /// Keep the containers' capabilities and allow privilege gain (they are never privileged).
    #[arg(long, env = "CLOUDAI_RELAX_HARDENING")]
    pub relax_hardening: bool,
}

impl ExecutorArgs {
    /// The executor's settings these flags give.
    pub fn config(&self) -> ExecutorConfig {
        ExecutorConfig {
            network_mode: self.task_network.clone(),
            pids_limit: self.task_pids_limit,
            log_limit_bytes: self.max_log_bytes as usize,
            output_limit_bytes: self.max_output_bytes,
            pull_timeout: Duration::from_secs(self.pull_timeout_s),
            stop_grace: Duration::from_secs(self.stop_grace_s),
            relax_hardening: self.relax_hardening,
        }
    }
}

#[derive(Debug, Args)]
pub struct WorkerArgs {
    /// The host's URL.
    #[arg(long, env = "CLOUDAI_HOST")]
    pub host: String,
    /// The cluster's join token (the host's DATA_DIR/join.token).
    #[arg(long, env = "CLOUDAI_JOIN_TOKEN", hide_env_values = true)]
    pub join_token: String,
    #[command(flatten)]
    pub tls: ClientTlsArgs,
    /// The id to register under (the host generates one when absent; kept across restarts).
    #[arg(long, env = "CLOUDAI_WORKER_ID")]
    pub worker_id: Option<String>,
    /// The `host:port` recorded as this worker's address (default: the local address of the
    /// route to the host, port 0).
    #[arg(long, env = "CLOUDAI_WORKER_ADVERTISE")]
    pub advertise: Option<String>,
    /// Label KEY=VALUE for placement policies (repeatable).
    #[arg(long = "label", short = 'l', value_parser = parse_key_value)]
    pub labels: Vec<(String, String)>,
    /// Cores to offer (default: the cores this process may use).
    #[arg(long, env = "CLOUDAI_WORKER_CPU")]
    pub cpu: Option<f64>,
    /// Memory to offer, GB (default: the machine's memory).
    #[arg(long, env = "CLOUDAI_WORKER_MEMORY_GB")]
    pub memory_gb: Option<f64>,
    /// Storage to offer, GB (default: free space on the filesystem of --storage-path).
    #[arg(long, env = "CLOUDAI_WORKER_STORAGE_GB")]
    pub storage_gb: Option<f64>,
    /// GPUs to offer (default: the devices nvidia-smi lists, 0 without it).
    #[arg(long, env = "CLOUDAI_WORKER_GPUS")]
    pub gpus: Option<f64>,
    /// The directory whose filesystem's free space is offered as storage (default: Docker's
    /// data root, as the engine reports it).
    #[arg(long, env = "CLOUDAI_WORKER_STORAGE_PATH")]
    pub storage_path: Option<PathBuf>,
    /// Where the worker keeps its identity across restarts.
    #[arg(
        long,
        env = "CLOUDAI_WORKER_STATE_DIR",
        default_value = "/var/lib/cloudai-worker"
    )]
    pub state_dir: PathBuf,
    /// Seconds between heartbeats (keep it well under the host's staleness, 15 s by default).
    #[arg(long, env = "CLOUDAI_HEARTBEAT_INTERVAL_S", default_value_t = 5,
        value_parser = clap::value_parser!(u64).range(1..=600))]
    pub heartbeat_interval_s: u64,
    /// Most task containers at once.
    #[arg(long, env = "CLOUDAI_WORKER_MAX_CONCURRENT", default_value_t = DEFAULT_MAX_CONCURRENT)]
    pub max_concurrent: usize,
    #[command(flatten)]
    pub executor: ExecutorArgs,
}

/// What a client of the host trusts and presents over HTTPS.
#[derive(Debug, Clone, Args)]
pub struct ClientTlsArgs {
    /// Trust the CAs in this PEM file for an https:// host (besides the public web PKI's
    /// roots): a cluster's private CA.
    #[arg(long, env = "CLOUDAI_CA_CERT")]
    pub ca_cert: Option<PathBuf>,
    /// Present this certificate (PEM) to a host that requires client certificates.
    #[arg(long, env = "CLOUDAI_CLIENT_CERT", requires = "client_key")]
    pub client_cert: Option<PathBuf>,
    /// The private key of --client-cert (PEM).
    #[arg(long, env = "CLOUDAI_CLIENT_KEY", requires = "client_cert")]
    pub client_key: Option<PathBuf>,
}

impl ClientTlsArgs {
    /// Reads the files these flags name.
    pub fn load(&self) -> anyhow::Result<ClientTls> {
        ClientTls::load(
            self.ca_cert.as_deref(),
            self.client_cert.as_deref(),
            self.client_key.as_deref(),
        )
    }
}

/// Parses `KEY=VALUE` (a flag's value).
pub fn parse_key_value(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| format!("expected KEY=VALUE, got '{s}'"))
}

/// Runs a worker with the flags `args` until `shutdown` resolves.
pub async fn run(args: WorkerArgs, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    let config = AgentConfig {
        tls: args.tls.load()?,
        host: args.host,
        join_token: args.join_token,
        worker_id: args.worker_id,
        advertise: args.advertise,
        labels: args.labels.into_iter().collect(),
        overrides: Overrides {
            cpu: args.cpu,
            memory: args.memory_gb,
            storage: args.storage_gb,
            gpu: args.gpus,
        },
        storage_path: args.storage_path,
        state_dir: args.state_dir,
        heartbeat_interval: Duration::from_secs(args.heartbeat_interval_s),
    };
    crate::run(
        config,
        args.executor.config(),
        args.max_concurrent,
        shutdown,
    )
    .await?;
    tracing::info!("worker agent stopped");
    Ok(())
}

/// Resolves on Ctrl-C or SIGTERM (a service manager's stop).
pub async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(error) = tokio::signal::ctrl_c().await {
            tracing::error!(%error, "cannot listen for Ctrl-C");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(error) => {
                tracing::error!(%error, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = terminate => {}
    }
    tracing::info!("shutdown signal received");
}
