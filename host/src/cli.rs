//! The `cloudai` command line: `serve` runs the host; the other commands are clients of its
//! HTTP API (`--host`, `--token`, also read from `CLOUDAI_HOST` / `CLOUDAI_TOKEN`).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, CommandFactory, Parser, Subcommand, ValueEnum};
use comfy_table::Table;
use serde::Deserialize as _;
use serde_json::{Map, Value, json};

use crate::api::Limits;
use crate::api::arrays::{ArrayCancelled, TaskArray};
use crate::api::auth;
use crate::api::error::ErrorBody;
use crate::api::policies::{
    DecisionView, DryRunReport, PolicyList, UploadProgress, UploadedPolicy,
};
use crate::api::task_io::{EndEvent, LogEvent, OutputList, TaskLogs, TaskWithResult};
use crate::api::tasks::TaskList;
use crate::api::workers::WorkerList;
use crate::client::Client;
use crate::model::{ActivePolicy, PolicyKind, Task, TaskStatus};
use crate::output::{Output, default_data_dir, human_bytes, new_table};
use crate::policy::ClusterSnapshot;
use crate::reconciler::ReconcilerConfig;
use crate::scheduler::SchedulerConfig;
use crate::serve::{self, ServeConfig};
use crate::telemetry::{self, TelemetryConfig};
use crate::tooling;
use crate::worker::cli::{ClientTlsArgs, ExecutorArgs, WorkerArgs, parse_key_value};

#[derive(Debug, Parser)]
#[command(
    name = "cloudai",
    version,
    about = "CloudAI: a container task scheduler with WebAssembly policies"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
    /// Log output format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text, env = "CLOUDAI_LOG_FORMAT")]
    pub log_format: LogFormat,
    /// Export tracing spans to this OpenTelemetry collector (OTLP/HTTP base URL, e.g.
    /// http://127.0.0.1:4318). Needs a build with the `otlp` feature.
    #[arg(long, global = true, env = "CLOUDAI_OTLP_ENDPOINT", value_name = "URL")]
    pub otlp_endpoint: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the host: HTTP API and store (embedded SQLite unless --mongodb-uri is given).
    Serve(ServeArgs),
    /// API tokens.
    #[command(subcommand)]
    Token(TokenCommand),
    /// Submit a task: `cloudai submit IMAGE [-- COMMAND ARGS...]`.
    Submit(SubmitArgs),
    /// List tasks, newest first.
    Tasks(TasksArgs),
    /// Show one task.
    Task(TaskIdArgs),
    /// Task arrays (`cloudai submit --count N`): show one, wait for it, cancel it.
    #[command(subcommand)]
    Array(ArrayCommand),
    /// Cancel a task (at once when pending or queued; running tasks are stopped by their worker).
    Cancel(TaskIdArgs),
    /// Print a task's logs (so far, while it runs); `-f` follows them until it ends.
    Logs(LogsArgs),
    /// List a task's output files, or download one: `cloudai outputs TASK [PATH] [-o FILE]`.
    Outputs(OutputsArgs),
    /// List workers (admin).
    Workers(ClientArgs),
    /// Policy components: upload, list, activate, roll back, delete, dry-run (admin).
    #[command(subcommand)]
    Policy(PolicyCommand),
    /// Run a worker agent: join a host, offer this machine's resources, heartbeat.
    Worker(WorkerArgs),
    /// Back up the store while the host runs: the embedded store to one file, a MongoDB
    /// database to a directory (mongodump's layout).
    Backup(crate::backup::BackupArgs),
    /// Restore a backup into a stopped host's data directory, or into an empty MongoDB database.
    Restore(crate::backup::RestoreArgs),
    /// Print a completion script for SHELL: `cloudai completions bash >
    /// /etc/bash_completion.d/cloudai` (zsh, fish, elvish, powershell too).
    Completions(CompletionsArgs),
    /// Print the man page (roff): `cloudai man > /usr/local/share/man/man1/cloudai.1`, or
    /// `cloudai man | man -l -`.
    Man,
}

#[derive(Debug, Args)]
pub struct CompletionsArgs {
    /// The shell the script is for.
    pub shell: clap_complete::Shell,
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Address to listen on. An address other machines reach needs --tls-cert/--tls-key, or
    /// --allow-plain-http.
    #[arg(long, env = "CLOUDAI_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// Serve HTTPS with this certificate (PEM; the server's certificate first, then any
    /// intermediates). Read at start-up and again on SIGHUP (a renewed certificate).
    #[arg(long, env = "CLOUDAI_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM: PKCS#8, PKCS#1 or SEC1).
    #[arg(long, env = "CLOUDAI_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Require every client (users and workers) to present a certificate issued by one of the
    /// CAs in this PEM file (mutual TLS), besides its token.
    #[arg(long, env = "CLOUDAI_TLS_CLIENT_CA", requires = "tls_cert")]
    pub tls_client_ca: Option<PathBuf>,
    /// Serve plain HTTP on an address other machines reach (when a TLS-terminating proxy on a
    /// private network is in front of this host). Without TLS, only loopback is served
    /// otherwise.
    #[arg(long, env = "CLOUDAI_ALLOW_PLAIN_HTTP", conflicts_with = "tls_cert")]
    pub allow_plain_http: bool,
    /// Directory for the embedded store and generated tokens.
    #[arg(long, env = "CLOUDAI_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// MongoDB connection string; the embedded store is used when absent. Defaults to
    /// w:majority, retryable writes and readConcern majority unless the URI says otherwise.
    #[arg(long, env = "CLOUDAI_MONGODB_URI")]
    pub mongodb_uri: Option<String>,
    /// MongoDB database name.
    #[arg(long, env = "CLOUDAI_MONGODB_DATABASE", default_value = "cloudai")]
    pub mongodb_database: String,
    /// JSON file of user and admin tokens (see README, "Configuration").
    #[arg(long, env = "CLOUDAI_TOKENS_FILE")]
    pub tokens_file: Option<PathBuf>,
    /// An admin token (plain text); generated into DATA_DIR/admin.token when no admin is configured.
    #[arg(long, env = "CLOUDAI_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,
    /// The token workers present to join; generated into DATA_DIR/join.token when absent.
    #[arg(long, env = "CLOUDAI_JOIN_TOKEN", hide_env_values = true)]
    pub join_token: Option<String>,
    /// Largest CPU request accepted, in cores.
    #[arg(long, env = "CLOUDAI_MAX_CPU")]
    pub max_cpu: Option<f64>,
    /// Largest memory request accepted, in GB.
    #[arg(long, env = "CLOUDAI_MAX_MEMORY")]
    pub max_memory: Option<f64>,
    /// Largest storage request accepted, in GB.
    #[arg(long, env = "CLOUDAI_MAX_STORAGE")]
    pub max_storage: Option<f64>,
    /// Largest GPU request accepted, in devices.
    #[arg(long, env = "CLOUDAI_MAX_GPU")]
    pub max_gpu: Option<f64>,
    /// Most tasks one array (`POST /v1/arrays`, `cloudai submit --count`) may have.
    #[arg(long, env = "CLOUDAI_MAX_ARRAY_TASKS", default_value_t = 100_000,
        value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub max_array_tasks: u32,
    /// How often this replica compares its policies with the store's, in ms: a newly
    /// activated version runs here within this interval (plus a store round trip).
    #[arg(long, env = "CLOUDAI_POLICY_SYNC_INTERVAL_MS", default_value_t = 250,
        value_parser = clap::value_parser!(u64).range(10..=60_000))]
    pub policy_sync_interval_ms: u64,
    /// Most tasks per placement round (one policy call) and per admission pass.
    #[arg(long, env = "CLOUDAI_SCHEDULER_BATCH", default_value_t = 100,
        value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub scheduler_batch: u32,
    /// Milliseconds between placement rounds when nothing wakes the scheduler.
    #[arg(long, env = "CLOUDAI_SCHEDULER_INTERVAL_MS", default_value_t = 1000,
        value_parser = clap::value_parser!(u64).range(1..=3_600_000))]
    pub scheduler_interval_ms: u64,
    /// Seconds a placement claim on a task holds (another replica takes over after).
    #[arg(long, env = "CLOUDAI_CLAIM_LEASE_S", default_value_t = 30,
        value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub claim_lease_s: u64,
    /// Seconds after which a worker without a heartbeat is no longer a placement candidate.
    #[arg(long, env = "CLOUDAI_HEARTBEAT_STALENESS_S", default_value_t = 15,
        value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub heartbeat_staleness_s: u64,
    /// Do not run the local worker (by default the host also runs tasks on this machine's
    /// Docker engine, as a worker like any other).
    #[arg(long, env = "CLOUDAI_NO_LOCAL_WORKER")]
    pub no_local_worker: bool,
    #[command(flatten)]
    pub executor: ExecutorArgs,
    /// Milliseconds before a task deferred by admission is checked again.
    #[arg(long, env = "CLOUDAI_ADMISSION_BACKOFF_MS", default_value_t = 2000,
        value_parser = clap::value_parser!(u64).range(0..=3_600_000))]
    pub admission_backoff_ms: u64,
    /// Milliseconds between reconciler passes (lost workers, timeouts, expired claims,
    /// accounting drift), on the replica that holds the reconciler lease.
    #[arg(long, env = "CLOUDAI_RECONCILE_INTERVAL_MS", default_value_t = 1000,
        value_parser = clap::value_parser!(u64).range(10..=3_600_000))]
    pub reconcile_interval_ms: u64,
    /// Seconds the reconciler lease holds without renewal: another replica takes over within
    /// this when the holder dies.
    #[arg(long, env = "CLOUDAI_LEASE_TTL_S", default_value_t = 5,
        value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub lease_ttl_s: u64,
    /// Seconds an orphaned assignment must exist, and an accounting drift stay unchanged
    /// beyond the claim lease, before the reconciler repairs it: a placement in flight is
    /// never repaired away.
    #[arg(long, env = "CLOUDAI_RECONCILE_SETTLE_S", default_value_t = 5,
        value_parser = clap::value_parser!(u64).range(0..=3600))]
    pub reconcile_settle_s: u64,
    /// How long events stay available to `GET /v1/events` clients that resume (with
    /// `Last-Event-ID`): a whole number with a unit, `s`, `m`, `h` or `d` (e.g. `90s`, `1h`).
    #[arg(long, env = "CLOUDAI_EVENT_RETENTION", default_value = "1h",
        value_parser = parse_retention)]
    pub event_retention: Duration,
}

/// `<n><unit>` with unit `s`, `m`, `h` or `d`; between 1 s and 30 days.
fn parse_retention(raw: &str) -> Result<Duration, String> {
    let raw = raw.trim();
    let split = raw
        .find(|c: char| !c.is_ascii_digit())
        .ok_or_else(|| format!("'{raw}' needs a unit: s, m, h or d (e.g. 1h)"))?;
    let (number, unit) = raw.split_at(split);
    let n: u64 = number
        .parse()
        .map_err(|_| format!("'{raw}' must be a whole number with a unit (e.g. 90s, 1h)"))?;
    let seconds = match unit {
        "s" => Some(n),
        "m" => n.checked_mul(60),
        "h" => n.checked_mul(3600),
        "d" => n.checked_mul(86_400),
        _ => {
            return Err(format!(
                "unknown unit '{unit}' in '{raw}' (expected s, m, h or d)"
            ));
        }
    };
    match seconds {
        Some(s) if (1..=30 * 86_400).contains(&s) => Ok(Duration::from_secs(s)),
        _ => Err(format!("'{raw}' must be between 1s and 30d")),
    }
}

#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Create a token and print the tokens-file entry that grants it.
    New(TokenArgs),
}

#[derive(Debug, Args)]
pub struct TokenArgs {
    /// The user the token authenticates.
    #[arg(long)]
    pub user: String,
    /// Grant the admin role.
    #[arg(long)]
    pub admin: bool,
}

#[derive(Debug, Args)]
pub struct ClientArgs {
    /// URL of the CloudAI host.
    #[arg(long, env = "CLOUDAI_HOST", default_value = "http://127.0.0.1:8080")]
    pub host: String,
    /// API token.
    #[arg(long, env = "CLOUDAI_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    #[command(flatten)]
    pub tls: ClientTlsArgs,
    /// Output format.
    #[arg(long, short = 'o', value_enum, default_value_t = Output::Table)]
    pub output: Output,
}

#[derive(Debug, Args)]
pub struct SubmitArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    /// Docker image, e.g. `busybox:1.36` or `registry.example.com/team/app@sha256:...`.
    pub image: String,
    /// Command and arguments (after `--`); the image's entrypoint when absent.
    #[arg(last = true)]
    pub command: Vec<String>,
    /// CPU cores.
    #[arg(long)]
    pub cpu: Option<f64>,
    /// Memory in GB.
    #[arg(long)]
    pub memory: Option<f64>,
    /// Storage in GB.
    #[arg(long)]
    pub storage: Option<f64>,
    /// GPU devices.
    #[arg(long)]
    pub gpu: Option<f64>,
    /// Higher runs first (-1000..=1000).
    #[arg(long, allow_negative_numbers = true)]
    pub priority: Option<i32>,
    /// Wall-clock limit in seconds.
    #[arg(long)]
    pub timeout: Option<u64>,
    /// Attempts in all when a worker is lost (1 = never re-run).
    #[arg(long)]
    pub max_attempts: Option<u32>,
    /// Never stop this task to make room for a task of a higher priority (a preempting
    /// placement policy leaves it running).
    #[arg(long)]
    pub not_preemptible: bool,
    /// Environment variable KEY=VALUE (repeatable).
    #[arg(long = "env", short = 'e', value_parser = parse_key_value)]
    pub env: Vec<(String, String)>,
    /// Label KEY=VALUE (repeatable).
    #[arg(long = "label", short = 'l', value_parser = parse_key_value)]
    pub labels: Vec<(String, String)>,
    /// Makes a retried submission return the first task instead of creating another.
    #[arg(long)]
    pub idempotency_key: Option<String>,
    /// Run after this task or array (`array-...`) of yours has completed; `ID:finished` runs
    /// after it ended however (repeatable). The task waits `pending` until then, and fails
    /// if a dependency to complete fails or is cancelled.
    #[arg(long = "after", value_name = "ID[:completed|:finished]", value_parser = parse_dependency)]
    pub after: Vec<Value>,
    /// Submit an array of N tasks of this spec (one request); task i finds
    /// CLOUDAI_ARRAY_INDEX=i in its environment. Prints the array's id.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub count: Option<u32>,
    /// Wait for the task to finish (`--wait` is 30 s; `--wait=90s`, `--wait=500ms`, at most
    /// 300 s): print its stdout (stderr to stderr) and exit with its exit code; exit 124 when
    /// it is still running after the wait.
    #[arg(long, value_name = "DURATION", num_args = 0..=1, require_equals = true,
        default_missing_value = "30s")]
    pub wait: Option<String>,
}

#[derive(Debug, Args)]
pub struct LogsArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    pub task_id: String,
    /// Print the output as it is printed, until the task ends; exit with its exit code.
    #[arg(long, short = 'f')]
    pub follow: bool,
}

#[derive(Debug, Args)]
pub struct OutputsArgs {
    /// URL of the CloudAI host.
    #[arg(long, env = "CLOUDAI_HOST", default_value = "http://127.0.0.1:8080")]
    pub host: String,
    /// API token.
    #[arg(long, env = "CLOUDAI_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    #[command(flatten)]
    pub tls: ClientTlsArgs,
    pub task_id: String,
    /// The file to download (its path under /output); lists the files when absent.
    pub path: Option<String>,
    /// Where to write the download (default: standard output).
    #[arg(long = "out", short = 'o', value_name = "FILE")]
    pub out: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct TasksArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    /// Only tasks in this state.
    #[arg(long)]
    pub status: Option<String>,
    /// Only this user's tasks (admin).
    #[arg(long)]
    pub user: Option<String>,
    /// Page size.
    #[arg(long)]
    pub limit: Option<u32>,
    /// Continue after this cursor (printed after a full page).
    #[arg(long)]
    pub cursor: Option<String>,
    /// Only the tasks of this array.
    #[arg(long = "array", value_name = "ARRAY_ID")]
    pub array_id: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum ArrayCommand {
    /// An array's tasks by state; `--wait` waits until every task ended (exit 0 when all
    /// completed, 1 when some failed or were cancelled, 124 when the wait ran out).
    Show(ArrayShowArgs),
    /// Cancel every task of an array that has not ended.
    Cancel(ArrayIdArgs),
}

#[derive(Debug, Args)]
pub struct ArrayShowArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    pub array_id: String,
    /// Wait until every task ended (`--wait` is 30 s; `--wait=90s`, at most 300 s).
    #[arg(long, value_name = "DURATION", num_args = 0..=1, require_equals = true,
        default_missing_value = "30s")]
    pub wait: Option<String>,
}

#[derive(Debug, Args)]
pub struct ArrayIdArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    pub array_id: String,
}

#[derive(Debug, Args)]
pub struct TaskIdArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    pub task_id: String,
}

#[derive(Debug, Subcommand)]
pub enum PolicyCommand {
    /// Upload a component; the host compiles and checks it before storing it.
    Upload(PolicyUploadArgs),
    /// List every stored version, what is active, and this host's view of each.
    List(ClientArgs),
    /// Activate a version (every host runs it within a second).
    Activate(PolicyVersionArgs),
    /// Activate again the version that was active before the current one of a kind.
    Rollback(PolicyRollbackArgs),
    /// Delete an inactive version.
    Delete(PolicyVersionArgs),
    /// Run a version against the current cluster beside the active policy, applying nothing.
    DryRun(PolicyDryRunArgs),
    /// Write the cluster snapshot (`GET /v1/cluster/snapshot`) for `cloudai policy test`.
    Snapshot(PolicySnapshotArgs),
    /// Run a policy offline against a cluster snapshot; print its decisions and timing.
    Test(tooling::TestArgs),
    /// Per-round latency of a policy on synthetic clusters, next to the native best-fit.
    Bench(tooling::BenchArgs),
}

#[derive(Debug, Args)]
pub struct PolicyUploadArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    /// The component (`.wasm`).
    pub file: PathBuf,
    /// Policy name, `[a-z0-9][a-z0-9._-]{0,62}`.
    #[arg(long)]
    pub name: String,
    /// Version, `[A-Za-z0-9][A-Za-z0-9._+-]{0,63}` (immutable once uploaded).
    #[arg(long)]
    pub version: String,
    /// `placement` or `admission`: refused unless it is the component's world.
    #[arg(long)]
    pub kind: Option<String>,
    /// Configuration, JSON text, passed to the policy's `configure`.
    #[arg(long, conflicts_with = "config_file")]
    pub config: Option<String>,
    /// Configuration read from a file.
    #[arg(long)]
    pub config_file: Option<PathBuf>,
    /// This version's memory limit, MiB (Python and JavaScript guests need more).
    #[arg(long)]
    pub memory_mb: Option<u64>,
    /// This version's deadline per evaluation, ms.
    #[arg(long)]
    pub deadline_ms: Option<u64>,
    /// Activate it once uploaded.
    #[arg(long)]
    pub activate: bool,
}

#[derive(Debug, Args)]
pub struct PolicyVersionArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    pub name: String,
    pub version: String,
}

#[derive(Debug, Args)]
pub struct PolicyRollbackArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    /// `placement` or `admission`.
    pub kind: String,
}

#[derive(Debug, Args)]
pub struct PolicyDryRunArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    pub name: String,
    /// The version to try; the newest uploaded when absent.
    #[arg(long)]
    pub version: Option<String>,
    /// Most tasks to decide (1..=1000).
    #[arg(long)]
    pub limit: Option<u32>,
}

#[derive(Debug, Args)]
pub struct PolicySnapshotArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    /// Write it here instead of standard output.
    #[arg(long, short = 'f')]
    pub file: Option<PathBuf>,
    /// Most queued and most pending tasks.
    #[arg(long)]
    pub limit: Option<u32>,
}

/// The whole `cloudai` program: parses the command line, sets up logging, runs the command on
/// a Tokio runtime and turns an error into a message and a failing exit status.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let telemetry = match telemetry::init(&TelemetryConfig {
        json: cli.log_format == LogFormat::Json,
        otlp_endpoint: cli.otlp_endpoint.clone(),
    }) {
        Ok(telemetry) => telemetry,
        Err(error) => {
            eprintln!("error: {error:#}");
            return ExitCode::FAILURE;
        }
    };
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    let outcome = runtime.block_on(run(cli));
    // Outside the runtime: the span exporter blocks on its last export.
    drop(runtime);
    telemetry.shutdown();
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) if error.downcast_ref::<ExitWith>().is_some() => {
            ExitCode::from(error.downcast_ref::<ExitWith>().map_or(1, |e| e.0))
        }
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// Runs the parsed command.
pub async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve(args) => serve::run(serve_config(args)?).await,
        Command::Token(TokenCommand::New(args)) => {
            let token = auth::generate_token(if args.admin { "cai_a_" } else { "cai_u_" });
            let entry = json!({
                "user_id": args.user,
                "role": if args.admin { "admin" } else { "user" },
                "token_sha256": auth::token_sha256_hex(&token),
            });
            println!("token: {token}");
            println!(
                "add this entry to the \"tokens\" list of your tokens file (only the hash is kept):"
            );
            println!("{}", serde_json::to_string(&entry)?);
            Ok(())
        }
        Command::Submit(args) => submit(args).await,
        Command::Tasks(args) => tasks(args).await,
        Command::Task(args) => {
            let client = client(&args.client)?;
            let task = client.get(&format!("/v1/tasks/{}", args.task_id)).await?;
            print_one(args.client.output, &task, print_task_detail)
        }
        Command::Array(ArrayCommand::Show(args)) => {
            let client = client(&args.client)?;
            show_array(&client, args.client.output, &args.array_id, args.wait).await
        }
        Command::Array(ArrayCommand::Cancel(args)) => {
            let client = client(&args.client)?;
            let answer = client
                .post(&format!("/v1/arrays/{}/cancel", args.array_id), &json!({}))
                .await?;
            print_typed(
                args.client.output,
                &answer,
                "array cancellation",
                |a: &ArrayCancelled| {
                    println!(
                        "{}: {} cancelled, {} running asked to stop; now {}",
                        args.array_id,
                        a.cancelled,
                        a.stopping,
                        array_states(&a.array)
                    );
                },
            )
        }
        Command::Cancel(args) => {
            let client = client(&args.client)?;
            let task = client
                .post(&format!("/v1/tasks/{}/cancel", args.task_id), &json!({}))
                .await?;
            print_typed(args.client.output, &task, "task", |t: &Task| {
                if t.status == TaskStatus::Running {
                    println!("{}: cancellation requested; its worker stops it", t.task_id);
                } else {
                    println!("{}: {}", t.task_id, t.status);
                }
            })
        }
        Command::Logs(args) if args.follow => follow_logs(args).await,
        Command::Outputs(args) => outputs(args).await,
        Command::Logs(args) => {
            let client = client(&args.client)?;
            let logs = client
                .get(&format!("/v1/tasks/{}/logs", args.task_id))
                .await?;
            print_typed(args.client.output, &logs, "task's logs", |l: &TaskLogs| {
                print!("{}", l.logs);
                eprint!("{}", l.stderr);
                if l.truncated {
                    eprintln!("(logs were truncated to the host's limit)");
                }
            })
        }
        Command::Workers(args) => {
            let client = client(&args)?;
            let answer = client.get("/v1/workers").await?;
            print_typed(args.output, &answer, "worker list", print_workers)
        }
        Command::Policy(command) => policy(command).await,
        Command::Worker(args) => worker(args).await,
        Command::Backup(args) => crate::backup::backup(args).await,
        Command::Restore(args) => crate::backup::restore(args).await,
        Command::Completions(args) => {
            print!("{}", completions(args.shell));
            Ok(())
        }
        Command::Man => {
            std::io::Write::write_all(&mut std::io::stdout(), &man_page()?)?;
            Ok(())
        }
    }
}

/// The completion script of `shell` for this CLI.
fn completions(shell: clap_complete::Shell) -> String {
    let mut script = Vec::new();
    clap_complete::generate(shell, &mut Cli::command(), "cloudai", &mut script);
    String::from_utf8_lossy(&script).into_owned()
}

/// The man page of this CLI, in roff.
fn man_page() -> anyhow::Result<Vec<u8>> {
    let mut page = Vec::new();
    clap_mangen::Man::new(Cli::command())
        .render(&mut page)
        .context("rendering the man page")?;
    Ok(page)
}

async fn worker(args: WorkerArgs) -> anyhow::Result<()> {
    crate::executor::observe_container_starts(crate::metrics::container_started);
    crate::worker::cli::run(args, serve::shutdown_signal()).await
}

fn serve_config(args: ServeArgs) -> anyhow::Result<ServeConfig> {
    let mut limits = Limits::default();
    for (flag, value, slot) in [
        ("--max-cpu", args.max_cpu, &mut limits.max_task_cpu),
        ("--max-memory", args.max_memory, &mut limits.max_task_memory),
        (
            "--max-storage",
            args.max_storage,
            &mut limits.max_task_storage,
        ),
        ("--max-gpu", args.max_gpu, &mut limits.max_task_gpu),
    ] {
        if let Some(value) = value {
            if !value.is_finite() || value <= 0.0 {
                bail!("{flag} must be a positive number, got {value}");
            }
            *slot = value;
        }
    }
    limits.max_array_tasks = args.max_array_tasks;
    limits.max_log_bytes = args.executor.max_log_bytes as usize;
    limits.max_output_bytes = args.executor.max_output_bytes as usize;
    let local_worker = (!args.no_local_worker).then(|| serve::LocalWorker {
        executor: args.executor.config(),
    });
    Ok(ServeConfig {
        listen: args.listen,
        data_dir: args.data_dir.unwrap_or_else(default_data_dir),
        mongodb_uri: args.mongodb_uri,
        mongodb_database: args.mongodb_database,
        tokens_file: args.tokens_file,
        admin_token: args.admin_token,
        join_token: args.join_token,
        limits,
        policy_sync_interval: std::time::Duration::from_millis(args.policy_sync_interval_ms),
        scheduler: SchedulerConfig {
            batch_size: args.scheduler_batch,
            round_interval: Duration::from_millis(args.scheduler_interval_ms),
            claim_lease: Duration::from_secs(args.claim_lease_s),
            heartbeat_staleness: Duration::from_secs(args.heartbeat_staleness_s),
            admission_backoff: Duration::from_millis(args.admission_backoff_ms),
        },
        reconciler: ReconcilerConfig {
            interval: Duration::from_millis(args.reconcile_interval_ms),
            lease_ttl: Duration::from_secs(args.lease_ttl_s),
            settle: Duration::from_secs(args.reconcile_settle_s),
        },
        local_worker,
        event_retention: args.event_retention,
        tls: args
            .tls_cert
            .zip(args.tls_key)
            .map(|(cert, key)| crate::tls::ServerTls {
                cert,
                key,
                client_ca: args.tls_client_ca,
            }),
        allow_plain_http: args.allow_plain_http,
    })
}

fn client(args: &ClientArgs) -> anyhow::Result<Client> {
    if args.token.is_none() {
        bail!(
            "no API token: pass --token or set CLOUDAI_TOKEN (an admin's is in the host's DATA_DIR/admin.token)"
        );
    }
    Ok(Client::new(
        &args.host,
        &args.tls.load()?,
        args.token.clone(),
    )?)
}

async fn submit(args: SubmitArgs) -> anyhow::Result<()> {
    let client = client(&args.client)?;
    let mut body = Map::new();
    body.insert("docker_image".into(), json!(args.image));
    if !args.command.is_empty() {
        body.insert("command".into(), json!(shell_words::join(&args.command)));
    }
    let numbers = [
        ("req_cpu", args.cpu),
        ("req_memory", args.memory),
        ("req_storage", args.storage),
        ("req_gpu", args.gpu),
    ];
    for (name, value) in numbers {
        if let Some(value) = value {
            body.insert(name.into(), json!(value));
        }
    }
    if let Some(priority) = args.priority {
        body.insert("priority".into(), json!(priority));
    }
    if let Some(timeout) = args.timeout {
        body.insert("timeout_s".into(), json!(timeout));
    }
    if let Some(max_attempts) = args.max_attempts {
        body.insert("max_attempts".into(), json!(max_attempts));
    }
    if args.not_preemptible {
        body.insert("preemptible".into(), json!(false));
    }
    if !args.env.is_empty() {
        body.insert(
            "env".into(),
            json!(args.env.into_iter().collect::<BTreeMap<_, _>>()),
        );
    }
    if !args.labels.is_empty() {
        body.insert(
            "labels".into(),
            json!(args.labels.into_iter().collect::<BTreeMap<_, _>>()),
        );
    }
    if !args.after.is_empty() {
        body.insert("after".into(), Value::Array(args.after));
    }
    let headers: Vec<(&str, String)> = args
        .idempotency_key
        .map(|key| vec![("Idempotency-Key", key)])
        .unwrap_or_default();
    if let Some(count) = args.count {
        let body = json!({ "count": count, "task": Value::Object(body) });
        let array = client
            .post_with_headers("/v1/arrays", &body, &headers)
            .await
            .context("submitting the array")?;
        if let Some(wait) = args.wait {
            let submitted =
                TaskArray::deserialize(&array).context("the host's answer is not a task array")?;
            let array_id = submitted.array_id;
            return show_array(&client, args.client.output, &array_id, Some(wait)).await;
        }
        return print_typed(args.client.output, &array, "task array", |a: &TaskArray| {
            println!("{}", a.array_id);
            eprintln!(
                "{}; list them with `cloudai tasks --array {}`",
                array_states(a),
                a.array_id
            );
        });
    }
    if let Some(wait) = args.wait {
        return submit_and_wait(
            &client,
            args.client.output,
            Value::Object(body),
            &headers,
            wait,
        )
        .await;
    }
    let task = client
        .post_with_headers("/v1/tasks", &Value::Object(body), &headers)
        .await
        .context("submitting the task")?;
    print_typed(args.client.output, &task, "task", |t: &Task| {
        println!("{}", t.task_id)
    })
}

async fn tasks(args: TasksArgs) -> anyhow::Result<()> {
    let client = client(&args.client)?;
    let mut query = Vec::new();
    if let Some(status) = args.status {
        query.push(("status", status));
    }
    if let Some(user) = args.user {
        query.push(("user_id", user));
    }
    if let Some(limit) = args.limit {
        query.push(("limit", limit.to_string()));
    }
    if let Some(cursor) = args.cursor {
        query.push(("cursor", cursor));
    }
    if let Some(array_id) = args.array_id {
        query.push(("array_id", array_id));
    }
    let page = client.get_query("/v1/tasks", &query).await?;
    print_typed(args.client.output, &page, "task list", |page: &TaskList| {
        if page.tasks.is_empty() {
            println!("no tasks");
            return;
        }
        println!("{}", tasks_table(page));
        if let Some(next) = &page.next_cursor {
            println!("more: cloudai tasks --cursor {next}");
        }
    })
}

/// A page of `GET /v1/tasks` as people read it: amounts rounded (the JSON output keeps them
/// exact).
fn tasks_table(page: &TaskList) -> Table {
    let mut table = new_table(&[
        "TASK", "USER", "STATUS", "IMAGE", "CPU", "MEM GB", "GPU", "CREATED",
    ]);
    for task in &page.tasks {
        table.add_row(vec![
            task.task_id.clone(),
            task.user_id.clone(),
            task.status.to_string(),
            task.docker_image.clone(),
            amount(task.req_cpu),
            amount(task.req_memory),
            amount(task.req_gpu),
            as_json_text(&task.created_at),
        ]);
    }
    table
}

async fn policy(command: PolicyCommand) -> anyhow::Result<()> {
    match command {
        PolicyCommand::Test(args) => tooling::test(args).await,
        PolicyCommand::Bench(args) => tooling::bench(args).await,
        PolicyCommand::Upload(args) => policy_upload(args).await,
        PolicyCommand::List(args) => {
            let answer = client(&args)?.get("/v1/policies").await?;
            print_typed(args.output, &answer, "policy list", print_policies)
        }
        PolicyCommand::Activate(args) => {
            let answer = client(&args.client)?
                .post(
                    &format!("/v1/policies/{}/activate", args.name),
                    &json!({ "version": args.version }),
                )
                .await
                .with_context(|| format!("activating {} {}", args.name, args.version))?;
            print_typed(
                args.client.output,
                &answer,
                "policy activation",
                print_activation,
            )
        }
        PolicyCommand::Rollback(args) => {
            let answer = client(&args.client)?
                .post("/v1/policies/rollback", &json!({ "kind": args.kind }))
                .await
                .with_context(|| format!("rolling back the {} policy", args.kind))?;
            print_typed(
                args.client.output,
                &answer,
                "policy activation",
                print_activation,
            )
        }
        PolicyCommand::Delete(args) => {
            client(&args.client)?
                .delete(&format!(
                    "/v1/policies/{}/versions/{}",
                    args.name, args.version
                ))
                .await
                .with_context(|| format!("deleting {} {}", args.name, args.version))?;
            let done = json!({ "deleted": { "name": args.name, "version": args.version } });
            print_one(args.client.output, &done, |_| {
                println!("deleted {} {}", args.name, args.version)
            })
        }
        PolicyCommand::DryRun(args) => {
            let mut body = Map::new();
            if let Some(version) = &args.version {
                body.insert("version".into(), json!(version));
            }
            if let Some(limit) = args.limit {
                body.insert("limit".into(), json!(limit));
            }
            let answer = client(&args.client)?
                .post(
                    &format!("/v1/policies/{}/dry-run", args.name),
                    &Value::Object(body),
                )
                .await
                .with_context(|| format!("dry-running {}", args.name))?;
            print_typed(args.client.output, &answer, "dry run report", print_dry_run)
        }
        PolicyCommand::Snapshot(args) => {
            let query: Vec<(&str, String)> = args
                .limit
                .map(|l| vec![("limit", l.to_string())])
                .unwrap_or_default();
            let snapshot = client(&args.client)?
                .get_query("/v1/cluster/snapshot", &query)
                .await?;
            let text = serde_json::to_string_pretty(&snapshot)?;
            match &args.file {
                Some(path) => {
                    std::fs::write(path, format!("{text}\n"))
                        .with_context(|| format!("writing {}", path.display()))?;
                    let cluster = ClusterSnapshot::deserialize(&snapshot)
                        .context("the host's answer is not a cluster snapshot")?;
                    eprintln!(
                        "wrote {}: {} workers, {} queued and {} pending tasks",
                        path.display(),
                        cluster.workers.len(),
                        cluster.queued.len(),
                        cluster.pending.len()
                    );
                }
                None => println!("{text}"),
            }
            Ok(())
        }
    }
}

async fn policy_upload(args: PolicyUploadArgs) -> anyhow::Result<()> {
    let client = client(&args.client)?;
    let bytes =
        std::fs::read(&args.file).with_context(|| format!("reading {}", args.file.display()))?;
    let config = match (&args.config, &args.config_file) {
        (Some(text), _) => Some(text.clone()),
        (None, Some(path)) => Some(
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?,
        ),
        (None, None) => None,
    };
    let mut query = vec![
        ("name", args.name.clone()),
        ("version", args.version.clone()),
    ];
    let optional = [
        ("kind", args.kind.clone()),
        ("config", config),
        ("memory_mb", args.memory_mb.map(|m| m.to_string())),
        ("deadline_ms", args.deadline_ms.map(|d| d.to_string())),
    ];
    query.extend(optional.into_iter().filter_map(|(k, v)| v.map(|v| (k, v))));
    let label = format!(
        "{} {} ({})",
        args.name,
        args.version,
        human_bytes(bytes.len() as u64)
    );
    let context = || {
        format!(
            "uploading {} as {} {}",
            args.file.display(),
            args.name,
            args.version
        )
    };
    let started = std::time::Instant::now();
    let response = client
        .post_bytes_streaming(
            "/v1/policies",
            &query,
            "application/wasm",
            bytes,
            std::time::Duration::from_secs(600),
        )
        .await
        .with_context(context)?;
    let uploaded = upload_progress(response, &label, started)
        .await
        .with_context(context)?;
    let activated = if args.activate {
        Some(
            client
                .post(
                    &format!("/v1/policies/{}/activate", args.name),
                    &json!({ "version": args.version }),
                )
                .await
                .with_context(|| format!("activating {} {}", args.name, args.version))?,
        )
    } else {
        None
    };
    let answer = json!({ "upload": uploaded, "activation": activated });
    print_typed(
        args.client.output,
        &answer,
        "policy upload",
        |a: &UploadAnswer| {
            let (up, policy) = (&a.upload, &a.upload.policy);
            let mut table = new_table(&["FIELD", "VALUE"]);
            table.add_row(vec![
                "policy".to_string(),
                format!("{} {}", policy.name, policy.version),
            ]);
            table.add_row(vec!["kind".to_string(), up.kind.to_string()]);
            table.add_row(vec!["size".to_string(), human_bytes(policy.size_bytes)]);
            table.add_row(vec!["sha256".to_string(), policy.sha256.clone()]);
            table.add_row(vec![
                "compile".to_string(),
                format!("{:.1} ms", up.compile_ms),
            ]);
            table.add_row(vec![
                "validate".to_string(),
                format!("{:.1} ms", up.validate_ms),
            ]);
            println!("{table}");
            if let Some(active) = &a.activation {
                print_activation(active);
            }
        },
    )
}

/// What `cloudai policy upload` prints: the stored version and, with `--activate`, the
/// activation.
#[derive(serde::Deserialize)]
struct UploadAnswer {
    upload: UploadedPolicy,
    activation: Option<ActivePolicy>,
}

fn print_activation(active: &ActivePolicy) {
    let previous = match &active.previous {
        Some((name, version)) => format!(" (was {name} {version})"),
        None => String::new(),
    };
    println!(
        "active {} policy: {} {}{previous}",
        active.kind, active.name, active.version
    );
}

fn print_policies(answer: &PolicyList) {
    let active_of = |kind: PolicyKind| match kind {
        PolicyKind::Placement => answer.active.placement.as_ref(),
        PolicyKind::Admission => answer.active.admission.as_ref(),
    };
    if answer.versions.is_empty() {
        println!("no policies uploaded (cloudai policy upload FILE --name N --version V)");
    } else {
        let mut table = new_table(&[
            "NAME", "VERSION", "KIND", "SIZE", "ACTIVE", "HERE", "FAILURES", "UPLOADED",
        ]);
        for v in &answer.versions {
            let p = &v.policy;
            let active =
                active_of(p.kind).is_some_and(|a| a.name == p.name && a.version == p.version);
            let here = if v.deactivated {
                "deactivated".to_string()
            } else if v.active {
                "running".to_string()
            } else if v.loaded {
                "loaded".to_string()
            } else if let Some(error) = &v.load_error {
                format!("load failed: {error}")
            } else {
                "not loaded".to_string()
            };
            table.add_row(vec![
                p.name.clone(),
                p.version.clone(),
                p.kind.to_string(),
                human_bytes(p.size_bytes),
                if active { "yes" } else { "" }.to_string(),
                here,
                format!(
                    "{} in a row, {} in all",
                    v.consecutive_failures, v.total_failures
                ),
                as_json_text(&p.uploaded_at),
            ]);
        }
        println!("{table}");
    }
    for kind in [PolicyKind::Placement, PolicyKind::Admission] {
        if active_of(kind).is_none() {
            let fallback = match kind {
                PolicyKind::Placement => "native best-fit",
                PolicyKind::Admission => "accept all",
            };
            println!("{kind}: none active ({fallback})");
        }
    }
}

fn print_dry_run(report: &DryRunReport) {
    let shown = |d: &DecisionView| match (&d.worker_id, &d.reason) {
        (Some(worker), _) if !d.victims.is_empty() => {
            format!("{} {worker}: stops {}", d.decision, d.victims.join(", "))
        }
        (Some(worker), _) => format!("{} {worker}", d.decision),
        (None, Some(reason)) => format!("{}: {reason}", d.decision),
        (None, None) => d.decision.clone(),
    };
    let candidate = format!("{} {}", report.name, report.version);
    let active = &report.compared_with;
    if report.tasks.is_empty() {
        println!("no tasks to decide (the {} queue is empty)", report.kind);
    } else {
        let mut table = new_table(&["TASK", &candidate, active, "DIFFERS"]);
        for t in &report.tasks {
            table.add_row(vec![
                t.task_id.clone(),
                shown(&t.candidate),
                shown(&t.active),
                if t.differs { "yes" } else { "" }.to_string(),
            ]);
        }
        println!("{table}");
    }
    println!(
        "{} of {} decisions differ; {candidate} took {:.2} ms, {active} {:.2} ms",
        report.differing,
        report.tasks.len(),
        report.candidate_ms,
        report.active_ms,
    );
    if let Some(why) = &report.active_failed {
        println!("note: the active policy failed ({why}); its column shows the native fallback");
    }
}

/// Prints the host's answer: as received with `-o json` (every field, exact), else as a table
/// from its typed form (`what` names it in the error when the answer is not one).
fn print_typed<T: serde::de::DeserializeOwned>(
    output: Output,
    value: &Value,
    what: &str,
    table: impl FnOnce(&T),
) -> anyhow::Result<()> {
    match output {
        Output::Json => println!("{}", serde_json::to_string_pretty(value)?),
        Output::Table => {
            let typed = T::deserialize(value)
                .with_context(|| format!("the host's answer is not a {what}"))?;
            table(&typed);
        }
    }
    Ok(())
}

/// A value as its JSON text shows it (a time as the API writes it).
fn as_json_text<T: serde::Serialize>(value: &T) -> String {
    match serde_json::to_value(value) {
        Ok(Value::String(s)) => s,
        Ok(other) => other.to_string(),
        Err(_) => String::new(),
    }
}

fn print_one(output: Output, value: &Value, table: impl FnOnce(&Value)) -> anyhow::Result<()> {
    match output {
        Output::Json => println!("{}", serde_json::to_string_pretty(value)?),
        Output::Table => table(value),
    }
    Ok(())
}

fn print_task_detail(task: &Value) {
    let mut table = new_table(&["FIELD", "VALUE"]);
    if let Some(fields) = task.as_object() {
        for (name, value) in fields {
            let shown = match value {
                Value::Null => continue,
                Value::String(s) => s.clone(),
                Value::Object(map) if map.is_empty() => continue,
                other => other.to_string(),
            };
            table.add_row(vec![name.clone(), shown]);
        }
    }
    println!("{table}");
}

fn print_workers(answer: &WorkerList) {
    if answer.workers.is_empty() {
        println!("no workers registered (a worker joins with the host's join token)");
        return;
    }
    println!("{}", workers_table(answer, chrono::Utc::now().timestamp()));
}

/// `GET /v1/workers` as people read it at `now` (Unix seconds): amounts rounded.
fn workers_table(answer: &WorkerList, now: i64) -> Table {
    let mut table = new_table(&[
        "WORKER",
        "ADDRESS",
        "STATE",
        "CPU alloc/total",
        "MEM GB alloc/total",
        "GPU alloc/total",
        "HEARTBEAT",
    ]);
    for worker in &answer.workers {
        let state = match (worker.is_active, worker.draining) {
            (true, true) => "draining",
            (true, false) => "active",
            (false, _) => "inactive",
        };
        let pair = |allocated: f64, total: f64| format!("{}/{}", amount(allocated), amount(total));
        table.add_row(vec![
            worker.worker_id.clone(),
            worker.worker_ip.clone(),
            state.to_string(),
            pair(worker.allocated_cpu, worker.total_cpu),
            pair(worker.allocated_memory, worker.total_memory),
            pair(worker.allocated_gpu, worker.total_gpu),
            format!("{}s ago", now - worker.last_heartbeat),
        ]);
    }
    table
}

/// An amount (cores, GB, devices) as people read it: at most two decimals, no trailing zeros
/// (a request of 0.1 GB is stored as 0.099609375: 102 MiB), and "<0.01" for a positive amount
/// that would read as 0.
fn amount(n: f64) -> String {
    if !n.is_finite() {
        return n.to_string();
    }
    if n > 0.0 && n < 0.005 {
        return "<0.01".to_string();
    }
    let text = format!("{:.2}", (n * 100.0).round() / 100.0);
    let text = text.trim_end_matches('0').trim_end_matches('.');
    if text == "-0" { "0" } else { text }.to_string()
}

/// How a command that speaks for a task ends: the process exits with this code (nothing
/// more is printed).
#[derive(Debug)]
pub struct ExitWith(pub u8);

impl std::fmt::Display for ExitWith {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "exit code {}", self.0)
    }
}

impl std::error::Error for ExitWith {}

/// Exit code 124: still running after the wait (as `timeout` does).
const STILL_RUNNING: u8 = 124;

/// The process exit code for a finished task: its own exit code (cut to 1..=255 when it
/// failed), 1 for a failure without one.
fn task_exit(status: &str, exit_code: Option<i64>) -> anyhow::Result<()> {
    let code = match (status, exit_code) {
        ("completed", _) => return Ok(()),
        (_, Some(code)) if code & 0xff != 0 => (code & 0xff) as u8,
        _ => 1,
    };
    Err(ExitWith(code).into())
}

/// `--after ID[:completed|:finished]`: a task id, or an array id (`array-...`).
fn parse_dependency(raw: &str) -> Result<Value, String> {
    let (id, condition) = match raw.rsplit_once(':') {
        Some((id, condition @ ("completed" | "finished"))) => (id, condition),
        Some((_, other)) => {
            return Err(format!(
                "'{other}' is not a condition: use ID, ID:completed or ID:finished"
            ));
        }
        None => (raw, "completed"),
    };
    if id.is_empty() {
        return Err("the dependency's id is empty".to_string());
    }
    let field = if id.starts_with("array-") {
        "array_id"
    } else {
        "task_id"
    };
    Ok(json!({ field: id, "condition": condition }))
}

/// Shows an array; with `wait`, waits until every task ended and exits as `cloudai array
/// show --wait` says.
async fn show_array(
    client: &Client,
    output: Output,
    array_id: &str,
    wait: Option<String>,
) -> anyhow::Result<()> {
    let path = format!("/v1/arrays/{array_id}");
    let array = match &wait {
        Some(wait) => {
            let limit = crate::api::task_io::parse_wait(wait).map_err(anyhow::Error::msg)?;
            client
                .get_query_timeout(
                    &path,
                    &[("wait", wait.clone())],
                    limit + Duration::from_secs(30),
                )
                .await?
        }
        None => client.get(&path).await?,
    };
    print_typed(output, &array, "task array", |a: &TaskArray| {
        let mut table = new_table(&["ARRAY", "USER", "IMAGE", "TASKS", "STATES", "CREATED"]);
        table.add_row(vec![
            a.array_id.clone(),
            a.user_id.clone(),
            a.docker_image.clone(),
            a.count.to_string(),
            array_states(a),
            as_json_text(&a.created_at),
        ]);
        println!("{table}");
    })?;
    if wait.is_none() {
        return Ok(());
    }
    let array = TaskArray::deserialize(&array).context("the host's answer is not a task array")?;
    if !array.finished {
        eprintln!(
            "array {array_id} has not finished: {}",
            array_states(&array)
        );
        return Err(ExitWith(STILL_RUNNING).into());
    }
    if array.tasks_by_state.failed + array.tasks_by_state.cancelled > 0 {
        return Err(ExitWith(1).into());
    }
    Ok(())
}

/// An array's tasks by state, as people read it: "10 tasks: 7 completed, 3 running".
fn array_states(array: &TaskArray) -> String {
    let by = &array.tasks_by_state;
    let parts: Vec<String> = [
        (by.pending, "pending"),
        (by.queued, "queued"),
        (by.running, "running"),
        (by.completed, "completed"),
        (by.failed, "failed"),
        (by.cancelled, "cancelled"),
    ]
    .iter()
    .filter(|(n, _)| *n > 0)
    .map(|(n, state)| format!("{n} {state}"))
    .collect();
    format!("{} tasks: {}", array.count, parts.join(", "))
}

async fn submit_and_wait(
    client: &Client,
    output: Output,
    body: Value,
    headers: &[(&str, String)],
    wait: String,
) -> anyhow::Result<()> {
    let limit = crate::api::task_io::parse_wait(&wait).map_err(anyhow::Error::msg)?;
    let query = [("wait", wait)];
    let mut builder_headers = reqwest::header::HeaderMap::new();
    for (name, value) in headers {
        builder_headers.insert(
            reqwest::header::HeaderName::from_bytes(name.as_bytes())?,
            reqwest::header::HeaderValue::from_str(value)?,
        );
    }
    let response = client
        .post_query_headers_timeout(
            "/v1/tasks",
            &query,
            builder_headers,
            &body,
            limit + Duration::from_secs(30),
        )
        .await
        .context("submitting the task")?;
    let finished = response.status() == reqwest::StatusCode::OK;
    let answer: Value = response
        .json()
        .await
        .context("reading the answer to the submission")?;
    if output == Output::Json {
        println!("{}", serde_json::to_string_pretty(&answer)?);
    }
    // Not finished in time, or the replay of an earlier submission: the task as it is, with
    // no `result` field.
    if !finished || answer.get("result").is_none() {
        let task = Task::deserialize(&answer).context("the host's answer is not a task")?;
        eprintln!(
            "task {id} is still {} after {}: follow it with `cloudai logs -f {id}`",
            task.status,
            humanize(limit),
            id = task.task_id
        );
        return Err(ExitWith(STILL_RUNNING).into());
    }
    let done = TaskWithResult::deserialize(&answer)
        .context("the host's answer is not a finished task with its result")?;
    let (task, status) = (&done.task, done.task.status.to_string());
    if output == Output::Table {
        use std::io::Write as _;
        // No result: the task ended without running (cancelled while queued).
        if let Some(result) = &done.result {
            print!("{}", result.logs);
            eprint!("{}", result.stderr);
            let _ = std::io::stdout().flush();
        }
        if task.status != TaskStatus::Completed {
            let why = match task.error.as_deref() {
                Some(why) if !why.is_empty() => format!(": {why}"),
                _ => String::new(),
            };
            eprintln!("task {} {status}{why}", task.task_id);
        }
    }
    task_exit(&status, task.exit_code)
}

fn humanize(d: Duration) -> String {
    if d.subsec_millis() == 0 {
        format!("{}s", d.as_secs())
    } else {
        format!("{}ms", d.as_millis())
    }
}

/// One Server-Sent Event: its name and data.
fn parse_sse_event(block: &str) -> Option<(String, String)> {
    let mut name = String::from("message");
    let mut data: Vec<&str> = Vec::new();
    for line in block.lines() {
        if let Some(value) = line.strip_prefix("event:") {
            name = value.trim_start().to_string();
        } else if let Some(value) = line.strip_prefix("data:") {
            data.push(value.strip_prefix(' ').unwrap_or(value));
        }
    }
    (!data.is_empty()).then(|| (name, data.join("\n")))
}

/// Follows an upload's event stream to its end: its stages on stderr (one updating line on a
/// terminal, a line per stage otherwise), then the stored version, or the host's refusal.
async fn upload_progress(
    response: reqwest::Response,
    label: &str,
    started: std::time::Instant,
) -> anyhow::Result<Value> {
    use std::io::{IsTerminal, Write as _};
    let is_json = response
        .headers()
        .get(reqwest::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if is_json {
        // A host that does not stream uploads answered when it was done.
        return response.json().await.context("reading the stored version");
    }
    let terminal = std::io::stderr().is_terminal();
    let clear = || {
        if terminal {
            eprint!("\r\x1b[2K");
        }
    };
    let mut events = SseReader::new(response);
    let mut shown = String::new();
    loop {
        let Some((name, data)) = events
            .next()
            .await
            .context("reading the upload's progress")?
        else {
            clear();
            bail!(
                "the host ended the upload's stream before it was stored or refused \
                 (`cloudai policy list` tells whether it was stored)"
            );
        };
        match name.as_str() {
            "progress" => {
                let progress: UploadProgress = serde_json::from_str(&data).with_context(|| {
                    format!("the host sent a progress event that is not one: {data}")
                })?;
                let stage = as_json_text(&progress.stage);
                let elapsed = progress.elapsed_ms as f64 / 1000.0;
                let line = format!("{stage} {label}\u{2026} {elapsed:.1} s");
                if terminal {
                    eprint!("\r\x1b[2K{line}");
                    let _ = std::io::stderr().flush();
                } else if stage != shown {
                    eprintln!("{line}");
                    shown = stage;
                }
            }
            "stored" => {
                clear();
                let elapsed = started.elapsed().as_secs_f64();
                eprintln!("stored {label} in {elapsed:.1} s");
                return serde_json::from_str(&data)
                    .with_context(|| format!("the host's stored version is not JSON: {data}"));
            }
            "failed" => {
                clear();
                let refusal: ErrorBody = serde_json::from_str(&data).with_context(|| {
                    format!("the host sent a refusal that is not an error: {data}")
                })?;
                bail!("{} (code {})", refusal.error.message, refusal.error.code);
            }
            _ => {} // a newer host's event
        }
    }
}

/// Server-Sent Events read from a streamed answer.
struct SseReader {
    response: reqwest::Response,
    buffer: Vec<u8>,
}

impl SseReader {
    fn new(response: reqwest::Response) -> Self {
        SseReader {
            response,
            buffer: Vec::new(),
        }
    }

    /// The next event's name and data; `None` when the stream ends.
    async fn next(&mut self) -> anyhow::Result<Option<(String, String)>> {
        loop {
            // Events end with a blank line.
            while let Some(end) = self.buffer.windows(2).position(|w| w == b"\n\n") {
                let block: Vec<u8> = self.buffer.drain(..end + 2).collect();
                if let Some(event) = parse_sse_event(&String::from_utf8_lossy(&block)) {
                    return Ok(Some(event));
                } // else a keep-alive comment
            }
            match self.response.chunk().await? {
                Some(bytes) => self.buffer.extend_from_slice(&bytes),
                None => return Ok(None),
            }
        }
    }
}

async fn follow_logs(args: LogsArgs) -> anyhow::Result<()> {
    use std::io::Write as _;
    let client = client(&args.client)?;
    let response = client
        .get_streaming(
            &format!("/v1/tasks/{}/logs", args.task_id),
            &[("follow", "true".to_string())],
        )
        .await?;
    let mut events = SseReader::new(response);
    loop {
        let Some((name, data)) = events
            .next()
            .await
            .context("reading the task's log stream")?
        else {
            bail!("the host ended the log stream before the task ended");
        };
        match name.as_str() {
            "log" if args.client.output == Output::Json => println!("{}", compact(&data)),
            "log" => {
                let event: LogEvent = serde_json::from_str(&data).with_context(|| {
                    format!("the host sent a log event that is not one: {data}")
                })?;
                if event.stream == "stderr" {
                    eprint!("{}", event.text);
                } else {
                    print!("{}", event.text);
                    let _ = std::io::stdout().flush();
                }
            }
            "end" => {
                if args.client.output == Output::Json {
                    println!("{}", compact(&data));
                }
                let end: EndEvent = serde_json::from_str(&data).with_context(|| {
                    format!("the host sent an end event that is not one: {data}")
                })?;
                let status = end.status.to_string();
                if status != "completed" {
                    eprintln!("task {} {status}", args.task_id);
                }
                return task_exit(&status, end.exit_code);
            }
            _ => bail!("following the logs failed: {}", compact(&data)),
        }
    }
}

/// An event's data as one line of JSON (keys sorted, as `-o json` prints every answer), or as
/// sent when it is not JSON.
fn compact(data: &str) -> String {
    serde_json::from_str::<Value>(data).map_or_else(|_| data.to_string(), |v| v.to_string())
}

async fn outputs(args: OutputsArgs) -> anyhow::Result<()> {
    let client = client(&ClientArgs {
        host: args.host,
        token: args.token,
        tls: args.tls,
        output: Output::Table,
    })?;
    let Some(path) = args.path else {
        let list = client
            .get(&format!("/v1/tasks/{}/outputs", args.task_id))
            .await?;
        let list =
            OutputList::deserialize(&list).context("the host's answer is not an output list")?;
        let mut table = new_table(&["PATH", "SIZE (BYTES)"]);
        for file in &list.files {
            table.add_row(vec![file.path.clone(), file.size_bytes.to_string()]);
        }
        println!("{table}");
        return Ok(());
    };
    let encoded: Vec<String> = path
        .split('/')
        .map(|segment| {
            segment
                .bytes()
                .map(|b| {
                    if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                        (b as char).to_string()
                    } else {
                        format!("%{b:02X}")
                    }
                })
                .collect()
        })
        .collect();
    let mut response = client
        .get_streaming(
            &format!("/v1/tasks/{}/outputs/{}", args.task_id, encoded.join("/")),
            &[],
        )
        .await?;
    let mut sink: Box<dyn std::io::Write> = match &args.out {
        Some(file) => Box::new(
            std::fs::File::create(file).with_context(|| format!("creating {}", file.display()))?,
        ),
        None => Box::new(std::io::stdout()),
    };
    while let Some(bytes) = response.chunk().await.context("downloading the file")? {
        sink.write_all(&bytes).context("writing the download")?;
    }
    sink.flush().context("writing the download")?;
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    #[test]
    fn completions_and_the_man_page_come_from_the_cli_definition() {
        let bash = completions(clap_complete::Shell::Bash);
        for expected in ["_cloudai()", "submit", "--mongodb-uri", "completions"] {
            assert!(bash.contains(expected), "{expected} in the bash script");
        }
        assert!(completions(clap_complete::Shell::Zsh).contains("#compdef cloudai"));
        let man = String::from_utf8(man_page().unwrap()).unwrap();
        assert!(man.contains(".TH cloudai"));
        assert!(man.contains("serve"));
    }

    #[test]
    fn amounts_read_as_people_write_them() {
        for (stored, shown) in [
            (0.099609375, "0.1"),
            (23.5400390625, "23.54"),
            (4.0, "4"),
            (0.0, "0"),
            (-0.0001, "0"),
            (0.5, "0.5"),
            (1.005, "1"),
            (0.004, "<0.01"),
            (1234.567, "1234.57"),
        ] {
            assert_eq!(amount(stored), shown, "{stored}");
        }
    }

    #[test]
    fn the_tables_show_amounts_rounded_and_the_json_keeps_them_exact() {
        let mut task = crate::store::conformance::sample_task("t1", "u");
        task.status = crate::model::TaskStatus::Queued;
        (task.req_cpu, task.req_memory, task.req_gpu) = (0.5, 0.099609375, 0.0);
        let page = TaskList {
            tasks: vec![task],
            next_cursor: None,
        };
        let table = tasks_table(&page).to_string();
        assert!(table.contains(" 0.1 "), "{table}");
        assert!(!table.contains("0.0996"), "{table}");
        assert!(table.contains("queued"), "{table}");
        let mut worker = crate::store::conformance::sample_worker(
            "w1",
            crate::model::Resources::new(8.0, 23.5400390625, 10.0, 1.0),
        );
        (worker.allocated_cpu, worker.allocated_memory) = (1.0, 0.099609375);
        (worker.is_active, worker.draining, worker.last_heartbeat) = (true, false, 100);
        let workers = WorkerList {
            workers: vec![worker],
        };
        let table = workers_table(&workers, 103).to_string();
        for shown in ["1/8", "0.1/23.54", "0/1", "3s ago", "active"] {
            assert!(table.contains(shown), "{shown} in {table}");
        }
    }

    #[test]
    fn event_retention_takes_a_number_and_a_unit() {
        assert_eq!(parse_retention("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_retention("30m"), Ok(Duration::from_secs(1800)));
        assert_eq!(parse_retention("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_retention("2d"), Ok(Duration::from_secs(172_800)));
        for bad in [
            "",
            "60",
            "1x",
            "h",
            "0s",
            "31d",
            "-1h",
            "99999999999999999999d",
        ] {
            assert!(parse_retention(bad).is_err(), "{bad}");
        }
    }
    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn submit_takes_the_command_after_double_dash() {
        let cli = Cli::try_parse_from([
            "cloudai",
            "submit",
            "--token",
            "t",
            "--cpu",
            "0.5",
            "-e",
            "A=b=c",
            "busybox:1.36",
            "--",
            "sh",
            "-c",
            "echo hi",
        ])
        .map_err(|e| e.to_string());
        let Ok(Cli {
            command: Command::Submit(args),
            ..
        }) = cli
        else {
            panic!("unexpected parse: {cli:?}");
        };
        assert_eq!(args.image, "busybox:1.36");
        assert_eq!(args.command, ["sh", "-c", "echo hi"]);
        assert_eq!(args.cpu, Some(0.5));
        assert_eq!(args.env, [("A".to_string(), "b=c".to_string())]);
        assert_eq!(shell_words::join(&args.command), "sh -c 'echo hi'");
    }

    #[test]
    fn server_sent_events_and_task_exit_codes_are_read_as_the_host_sends_them() {
        assert_eq!(
            parse_sse_event("event: log\ndata: {\"text\":\"a\"}\n\n"),
            Some(("log".into(), "{\"text\":\"a\"}".into()))
        );
        assert_eq!(parse_sse_event(":keep-alive\n\n"), None);
        assert_eq!(
            parse_sse_event("data:x\ndata: y\n"),
            Some(("message".into(), "x\ny".into()))
        );
        assert!(task_exit("completed", Some(0)).is_ok());
        let code = |status: &str, exit: Option<i64>| {
            task_exit(status, exit)
                .err()
                .and_then(|e| e.downcast_ref::<ExitWith>().map(|e| e.0))
        };
        assert_eq!(code("failed", Some(3)), Some(3));
        assert_eq!(code("failed", Some(256)), Some(1));
        assert_eq!(code("failed", None), Some(1));
        assert_eq!(code("cancelled", Some(137)), Some(137));
    }

    #[test]
    fn serve_rejects_non_positive_caps() {
        let cli = Cli::try_parse_from(["cloudai", "serve", "--max-cpu", "0"]);
        let Ok(Cli {
            command: Command::Serve(args),
            ..
        }) = cli
        else {
            panic!("serve did not parse");
        };
        assert!(serve_config(args).is_err());
    }
}
