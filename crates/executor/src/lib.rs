//! The container executor: runs one task as one Docker container through bollard and hands
//! back its result. A library with no store or HTTP in it: the worker
//! agent calls [`Executor::run`] for each assignment and [`Executor::reconcile`] on restart.
//!
//! One run: pull the image when absent (bounded in time), create a labelled, limited and
//! hardened container, make `/output`, start it, stream stdout and stderr (each bounded, with a
//! truncation marker) live to the caller while waiting for the exit, stop it on cancel or
//! timeout (grace period, then kill), collect `/output`, and remove the container. The
//! container is removed on every path, including errors and a dropped `run` future.
//!
//! Units are the task's (docs/consistency.md, "Units"): cpu in cores, memory and storage in GB, where a
//! GB is 2^30 bytes so that the quantized requests (multiples of 1/1024) are whole MiB.

use std::collections::{BTreeMap, HashMap};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bollard::Docker;
use bollard::container::LogOutput;
use bollard::errors::Error as DockerError;
use bollard::models::{
    ContainerCreateBody, ContainerInspectResponse, ContainerStateStatusEnum,
    ContainerSummaryStateEnum, DeviceRequest, HostConfig,
};
use bollard::query_parameters::{
    CreateContainerOptions, CreateImageOptions, DownloadFromContainerOptions, KillContainerOptions,
    ListContainersOptionsBuilder, LogsOptions, RemoveContainerOptions, StopContainerOptions,
    UploadToContainerOptions,
};
use chrono::{DateTime, Utc};
use futures::StreamExt;
use tokio::sync::mpsc::UnboundedSender;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::model::Task;
use cloudai_model as model;

mod capture;
#[cfg(test)]
mod test_registry;
/// The test image the tests build locally: test support (the `test-support` feature).
#[cfg(any(test, feature = "test-support"))]
pub mod testimage;
#[cfg(test)]
mod tests;

pub use capture::truncation_marker;
use capture::{Capture, extract_outputs};

/// Label carrying the task id on every container the executor creates.
pub const LABEL_TASK_ID: &str = "cloudai.task_id";
/// Label carrying the worker id on every container the executor creates.
pub const LABEL_WORKER_ID: &str = "cloudai.worker_id";
/// Directory whose regular files are collected after the task exits.
pub const OUTPUT_DIR: &str = "/output";

/// Bytes in one GB of the task model.
const GB: f64 = (1u64 << 30) as f64;
/// bollard's request timeout (2 minutes by default) bounds the wait for response headers.
/// The engine sends those at once for logs and wait, but a stop answers only after the grace
/// period: calls that wait for a container go through a client without that bound (the
/// task's timeout and the grace period bound them instead).
const LONG_REQUEST_TIMEOUT: Duration = Duration::from_secs(365 * 24 * 3600);
/// The exit code of a process killed by SIGKILL (128 + 9): what the kernel's OOM killer leaves.
const SIGKILL_EXIT: i64 = 137;
/// Second looks (100 ms apart) for an OOM kill the engine records after the exit. 2 s: on a
/// loaded machine the engine recorded one later than 500 ms (a CI run reported such a kill as
/// a plain exit 137); only a SIGKILL we did not send and the engine did not mark waits this.
const OOM_RECHECKS: u32 = 20;

/// Told each container's create-to-start time, when set (the host's metrics set it; the
/// executor does not depend on them).
static START_OBSERVER: OnceLock<fn(Duration)> = OnceLock::new();

/// Has `observer` told each container's create-to-start time, process-wide (the first
/// observer set stays).
pub fn observe_container_starts(observer: fn(Duration)) {
    let _ = START_OBSERVER.set(observer);
}

/// The operator's settings. A task can narrow nothing here and relax nothing.
#[derive(Debug, Clone, PartialEq)]
pub struct ExecutorConfig {
    /// Docker network mode of task containers (default `none`: no network at all).
    pub network_mode: String,
    /// Most processes in one container (default 512).
    pub pids_limit: i64,
    /// Most bytes kept of each of stdout and stderr (default 1 MiB); the rest is dropped
    /// behind a truncation marker.
    pub log_limit_bytes: usize,
    /// Most bytes of files collected from `/output` (default 64 MiB).
    pub output_limit_bytes: u64,
    /// Longest an image pull may take (default 10 min).
    pub pull_timeout: Duration,
    /// Time between the stop signal and the kill on cancel or timeout (default 10 s).
    pub stop_grace: Duration,
    /// Operator switch: run containers without dropping capabilities and without
    /// `no-new-privileges` (default false). Containers are never privileged either way.
    pub relax_hardening: bool,
}

impl Default for ExecutorConfig {
    fn default() -> Self {
        Self {
            network_mode: "none".into(),
            pids_limit: 512,
            log_limit_bytes: 1 << 20,
            output_limit_bytes: 64 << 20,
            pull_timeout: Duration::from_secs(600),
            stop_grace: Duration::from_secs(10),
            relax_hardening: false,
        }
    }
}

/// GPUs for one run.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum GpuRequest {
    #[default]
    None,
    /// Any `n` GPUs.
    Count(u32),
    /// Exactly these devices (ids or UUIDs, as the worker assigned them).
    DeviceIds(Vec<String>),
}

/// What to run.
#[derive(Debug, Clone, PartialEq)]
pub struct RunSpec {
    pub task_id: String,
    pub worker_id: String,
    pub image: String,
    /// Split like a POSIX shell does (no shell runs it); replaces the image's CMD and keeps
    /// its ENTRYPOINT, as `docker run IMAGE COMMAND` does. `None`: the image's own.
    pub command: Option<String>,
    pub env: BTreeMap<String, String>,
    /// Cores; 0 = no limit.
    pub cpu: f64,
    /// GB (2^30 bytes); 0 = no limit.
    pub memory: f64,
    /// GB (2^30 bytes); 0 = no limit. Enforced only where [`Executor::storage_enforced`].
    pub storage: f64,
    pub gpu: GpuRequest,
    /// Wall-clock limit of the container's run (not counting the pull).
    pub timeout: Option<Duration>,
}

impl RunSpec {
    /// The spec of `task` on `worker_id`: its request as limits, `req_gpu` rounded up to whole
    /// devices (use [`GpuRequest::DeviceIds`] instead when the worker picked the devices).
    pub fn from_task(task: &Task, worker_id: &str) -> Self {
        let gpus = task.req_gpu.max(0.0).ceil();
        Self {
            task_id: task.task_id.clone(),
            worker_id: worker_id.to_owned(),
            image: task.docker_image.clone(),
            command: task.command.clone(),
            env: task.env.clone(),
            cpu: task.req_cpu,
            memory: task.req_memory,
            storage: task.req_storage,
            gpu: if gpus >= 1.0 {
                GpuRequest::Count(gpus.min(f64::from(u32::MAX)) as u32)
            } else {
                GpuRequest::None
            },
            timeout: task.timeout_s.map(Duration::from_secs),
        }
    }
}

/// Which output stream a log chunk came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogStream {
    Stdout,
    Stderr,
}

/// Bytes a running container wrote, as they arrive (already bounded: after the truncation
/// marker of a stream nothing more of it is sent).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogChunk {
    pub stream: LogStream,
    pub bytes: Vec<u8>,
}

/// A regular file the task left under `/output`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutputFile {
    /// Relative to `/output`, `/`-separated, never `..` or absolute.
    pub path: String,
    pub bytes: Vec<u8>,
}

/// How a run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunStatus {
    /// Exit code 0.
    Completed,
    /// A non-zero exit code.
    Failed { exit_code: i64 },
    /// The kernel killed it for going over its memory limit.
    OomKilled,
    /// Stopped at the spec's timeout.
    TimedOut,
    /// Stopped because the caller cancelled.
    Cancelled,
}

impl RunStatus {
    /// Stable code for results and API errors.
    pub fn code(&self) -> &'static str {
        match self {
            RunStatus::Completed => "completed",
            RunStatus::Failed { .. } => "failed",
            RunStatus::OomKilled => "oom_killed",
            RunStatus::TimedOut => "timeout",
            RunStatus::Cancelled => "cancelled",
        }
    }
}

/// The result of a run.
#[derive(Debug, Clone, PartialEq)]
pub struct RunOutcome {
    /// `None` when the run was cancelled before a container existed (during the pull).
    pub container_id: Option<String>,
    pub status: RunStatus,
    /// The container's exit code (also for OOM, timeout and cancel, when it ran).
    pub exit_code: Option<i64>,
    pub stdout: String,
    pub stderr: String,
    pub stdout_truncated: bool,
    pub stderr_truncated: bool,
    pub outputs: Vec<OutputFile>,
    /// Some files of `/output` were left out to keep within the output limit.
    pub outputs_truncated: bool,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
}

/// Why a run could not produce a [`RunOutcome`].
#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    #[error("cannot pull image {image}: {message}")]
    ImagePull { image: String, message: String },
    #[error("invalid run spec: {0}")]
    InvalidSpec(String),
    #[error("container {0} has not finished (it is running, or it never started)")]
    NotFinished(String),
    #[error("{context}: {source}")]
    Docker {
        context: String,
        #[source]
        source: DockerError,
    },
}

impl ExecError {
    /// Stable code for results and API errors.
    pub fn code(&self) -> &'static str {
        match self {
            ExecError::ImagePull { .. } => "image_pull_failed",
            ExecError::InvalidSpec(_) => "invalid_spec",
            ExecError::NotFinished(_) => "container_not_finished",
            ExecError::Docker { .. } => "docker_error",
        }
    }

    fn docker(context: impl Into<String>, source: DockerError) -> Self {
        ExecError::Docker {
            context: context.into(),
            source,
        }
    }
}

/// State of a container found by [`Executor::reconcile`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ManagedState {
    /// Created, never started (the worker died between create and start): nothing ran, so
    /// there is nothing to collect; [`Executor::stop_and_remove`] it.
    Created,
    /// Running (or paused / restarting): stop it or adopt it.
    Running,
    /// Exited: [`Executor::collect`] its result.
    Exited,
    /// Anything else Docker reports (`removing`, ...).
    Other(String),
}

/// A container carrying a worker's labels.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManagedContainer {
    pub container_id: String,
    pub task_id: String,
    pub state: ManagedState,
    /// Set when it exited.
    pub exit_code: Option<i64>,
}

/// Connects to the Docker engine named by `DOCKER_HOST` (the local unix socket when unset) and
/// settles on an API version both sides speak; fails when the engine does not answer.
pub async fn connect() -> Result<Docker, ExecError> {
    let docker = Docker::connect_with_defaults()
        .map_err(|e| ExecError::docker("connect to the Docker engine", e))?;
    docker
        .negotiate_version()
        .await
        .map_err(|e| ExecError::docker("negotiate the Docker API version", e))
}

/// Runs tasks as containers on one Docker engine. Cheap to share (`&self` everywhere).
pub struct Executor {
    docker: Docker,
    /// The same connection without the request timeout, for calls that last as long as a task.
    long: Docker,
    config: ExecutorConfig,
    storage_supported: AtomicBool,
    data_root: Option<std::path::PathBuf>,
}

/// How a run was ended from outside.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ending {
    Cancelled,
    TimedOut,
}

impl Executor {
    /// An executor on `docker` (see [`connect`]). Asks the engine once whether its storage
    /// driver can limit a container's writable layer (`--storage-opt size`).
    pub async fn new(docker: Docker, config: ExecutorConfig) -> Result<Self, ExecError> {
        let docker = docker
            .negotiate_version()
            .await
            .map_err(|e| ExecError::docker("negotiate the Docker API version", e))?;
        let info = docker
            .info()
            .await
            .map_err(|e| ExecError::docker("read docker info", e))?;
        let data_root = info.docker_root_dir.clone().map(std::path::PathBuf::from);
        let driver = info.driver.unwrap_or_default();
        let backing = info
            .driver_status
            .unwrap_or_default()
            .into_iter()
            .find(|kv| kv.first().is_some_and(|k| k == "Backing Filesystem"))
            .and_then(|kv| kv.get(1).cloned())
            .unwrap_or_default();
        let storage = storage_opt_supported(&driver, &backing);
        tracing::info!(
            driver,
            backing,
            storage_enforced = storage,
            "docker storage driver"
        );
        let long = docker.clone().with_timeout(LONG_REQUEST_TIMEOUT);
        Ok(Self {
            docker,
            long,
            config,
            storage_supported: AtomicBool::new(storage),
            data_root,
        })
    }

    /// The engine's data root (`DockerRootDir`): where containers' files live.
    pub fn data_root(&self) -> Option<&std::path::Path> {
        self.data_root.as_deref()
    }

    /// Whether a task's storage request limits its container's writable layer. When false,
    /// storage is a reservation only (the scheduler counts it; nothing enforces it).
    pub fn storage_enforced(&self) -> bool {
        self.storage_supported.load(Ordering::Relaxed)
    }

    pub fn config(&self) -> &ExecutorConfig {
        &self.config
    }

    /// Runs `spec` to the end. Live output goes to `events` (when given; a closed receiver is
    /// ignored). `cancel` stops the run (grace period, then kill) with status `Cancelled`.
    /// An error means no outcome: the image could not be pulled, the spec is invalid, or the
    /// engine failed; the container, if one was made, is removed all the same.
    pub async fn run(
        &self,
        spec: RunSpec,
        events: Option<UnboundedSender<LogChunk>>,
        cancel: CancellationToken,
    ) -> Result<RunOutcome, ExecError> {
        self.run_inner(spec, events, cancel, None).await
    }

    /// [`Self::run`], sending the time the container started on `started` as soon as it has
    /// (not sent when it never starts): what the worker reports as the task's `started_at`.
    pub async fn run_reporting_start(
        &self,
        spec: RunSpec,
        events: Option<UnboundedSender<LogChunk>>,
        cancel: CancellationToken,
        started: tokio::sync::oneshot::Sender<DateTime<Utc>>,
    ) -> Result<RunOutcome, ExecError> {
        self.run_inner(spec, events, cancel, Some(started)).await
    }

    async fn run_inner(
        &self,
        spec: RunSpec,
        events: Option<UnboundedSender<LogChunk>>,
        cancel: CancellationToken,
        started: Option<tokio::sync::oneshot::Sender<DateTime<Utc>>>,
    ) -> Result<RunOutcome, ExecError> {
        let cmd = match &spec.command {
            Some(command) => Some(
                shell_words::split(command)
                    .map_err(|e| ExecError::InvalidSpec(format!("command cannot be split: {e}")))?,
            ),
            None => None,
        };
        if let Some(key) = spec.env.keys().find(|k| k.is_empty() || k.contains('=')) {
            return Err(ExecError::InvalidSpec(format!(
                "environment variable name {key:?} is empty or contains '='"
            )));
        }
        tokio::select! {
            biased;
            () = cancel.cancelled() => return Ok(RunOutcome::cancelled_before_start()),
            pulled = self
                .ensure_image(&spec)
                .instrument(tracing::info_span!("pull", image = %spec.image)) => pulled?,
        }

        let name = container_name(&spec.task_id);
        let mut guard = RemoveOnDrop {
            docker: self.docker.clone(),
            name: name.clone(),
            armed: true,
        };
        let result = self
            .run_container(&spec, cmd, &name, events, cancel, started)
            .await;
        let removed = self.remove(&name).await;
        guard.armed = false;
        let outcome = result?;
        removed?;
        Ok(outcome)
    }

    async fn run_container(
        &self,
        spec: &RunSpec,
        cmd: Option<Vec<String>>,
        name: &str,
        events: Option<UnboundedSender<LogChunk>>,
        cancel: CancellationToken,
        started: Option<tokio::sync::oneshot::Sender<DateTime<Utc>>>,
    ) -> Result<RunOutcome, ExecError> {
        let created = Instant::now();
        let id = async {
            let (id, output_in_layer) = self.create(spec, cmd, name).await?;
            if output_in_layer {
                self.make_output_dir(&id).await?;
            }
            self.docker
                .start_container(&id, None)
                .await
                .map_err(|e| ExecError::docker(format!("start container {id}"), e))?;
            Ok::<_, ExecError>(id)
        }
        .instrument(tracing::info_span!("start"))
        .await?;
        if let Some(started) = started {
            let _ = started.send(Utc::now());
        }
        if let Some(observe) = START_OBSERVER.get() {
            observe(created.elapsed());
        }
        tracing::info!(
            task_id = %spec.task_id,
            worker_id = %spec.worker_id,
            container_id = %id,
            image = %spec.image,
            start_ms = created.elapsed().as_millis() as u64,
            "container started"
        );
        let (ending, exit_code, stdout, stderr) = self
            .follow(&id, spec.timeout, events, cancel)
            .instrument(tracing::info_span!("run", container_id = %id))
            .await;
        let outcome = self.finish(&id, ending, exit_code, stdout, stderr).await?;
        tracing::info!(
            task_id = %spec.task_id,
            worker_id = %spec.worker_id,
            container_id = %id,
            status = outcome.status.code(),
            exit_code = outcome.exit_code,
            "container finished"
        );
        Ok(outcome)
    }

    /// Inspects the image and pulls it when absent, within the pull timeout.
    async fn ensure_image(&self, spec: &RunSpec) -> Result<(), ExecError> {
        let image = spec.image.as_str();
        match self.docker.inspect_image(image).await {
            Ok(_) => return Ok(()),
            Err(DockerError::DockerResponseServerError {
                status_code: 404, ..
            }) => {}
            Err(e) => return Err(ExecError::docker(format!("inspect image {image}"), e)),
        }
        let started = Instant::now();
        tracing::info!(task_id = %spec.task_id, image, "pulling image");
        let (from_image, tag) = split_reference(image);
        let options = CreateImageOptions {
            from_image: Some(from_image),
            tag,
            ..Default::default()
        };
        let pull = async {
            let mut progress = self.docker.create_image(Some(options), None, None);
            // Per layer, only status changes are logged, not every progress tick.
            let mut last: HashMap<String, String> = HashMap::new();
            while let Some(item) = progress.next().await {
                let info = item.map_err(|e| ExecError::ImagePull {
                    image: image.to_owned(),
                    message: docker_message(e),
                })?;
                if let Some(status) = info.status {
                    let layer = info.id.unwrap_or_default();
                    if last.get(&layer) != Some(&status) {
                        tracing::info!(task_id = %spec.task_id, image, layer, status, "pull");
                        last.insert(layer, status);
                    }
                }
            }
            Ok(())
        };
        let result = match tokio::time::timeout(self.config.pull_timeout, pull).await {
            Ok(result) => result,
            Err(_) => Err(ExecError::ImagePull {
                image: image.to_owned(),
                message: format!("timed out after {:?}", self.config.pull_timeout),
            }),
        };
        match &result {
            Ok(()) => tracing::info!(
                task_id = %spec.task_id,
                image,
                pull_ms = started.elapsed().as_millis() as u64,
                "image pulled"
            ),
            Err(e) => tracing::warn!(
                task_id = %spec.task_id,
                image,
                pull_ms = started.elapsed().as_millis() as u64,
                error = %e,
                "image pull failed"
            ),
        }
        result
    }

    /// Creates the container; true when `/output` is to be made in its writable layer (see
    /// [`output_volume`]).
    async fn create(
        &self,
        spec: &RunSpec,
        cmd: Option<Vec<String>>,
        name: &str,
    ) -> Result<(String, bool), ExecError> {
        let mut host = HostConfig {
            privileged: Some(false),
            pids_limit: Some(self.config.pids_limit),
            network_mode: Some(self.config.network_mode.clone()),
            ..Default::default()
        };
        if !self.config.relax_hardening {
            host.cap_drop = Some(vec!["ALL".into()]);
            host.security_opt = Some(vec!["no-new-privileges".into()]);
        }
        if spec.cpu > 0.0 {
            host.nano_cpus = Some((spec.cpu * 1e9).round() as i64);
        }
        if spec.memory > 0.0 {
            let bytes = (spec.memory * GB).round() as i64;
            host.memory = Some(bytes);
            // Equal to Memory: no swap on top, so going over the limit is an OOM kill.
            host.memory_swap = Some(bytes);
        }
        host.device_requests = match &spec.gpu {
            GpuRequest::None | GpuRequest::Count(0) => None,
            GpuRequest::Count(n) => Some(vec![gpu_request(Some(i64::from(*n)), None)]),
            GpuRequest::DeviceIds(ids) if ids.is_empty() => None,
            GpuRequest::DeviceIds(ids) => Some(vec![gpu_request(None, Some(ids.clone()))]),
        };
        let storage = spec.storage > 0.0 && self.storage_enforced();
        if storage {
            let bytes = (spec.storage * GB).round() as u64;
            host.storage_opt = Some(HashMap::from([("size".into(), bytes.to_string())]));
        }
        let body = ContainerCreateBody {
            image: Some(spec.image.clone()),
            cmd,
            env: Some(spec.env.iter().map(|(k, v)| format!("{k}={v}")).collect()),
            labels: Some(HashMap::from([
                (LABEL_TASK_ID.into(), spec.task_id.clone()),
                (LABEL_WORKER_ID.into(), spec.worker_id.clone()),
            ])),
            volumes: output_volume(storage),
            host_config: Some(host.clone()),
            ..Default::default()
        };
        let options = || CreateContainerOptions {
            name: Some(name.to_owned()),
            ..Default::default()
        };
        match self
            .docker
            .create_container(Some(options()), body.clone())
            .await
        {
            Ok(created) => Ok((created.id, storage)),
            // The driver looked able to limit storage but is not (e.g. xfs without pquota):
            // remember, say so, and run with the reservation only.
            Err(DockerError::DockerResponseServerError { message, .. })
                if storage && message.contains("storage-opt") =>
            {
                self.storage_supported.store(false, Ordering::Relaxed);
                tracing::warn!(
                    task_id = %spec.task_id,
                    %message,
                    "the storage driver cannot limit container storage; storage is reservation-only"
                );
                host.storage_opt = None;
                let body = ContainerCreateBody {
                    volumes: output_volume(false),
                    host_config: Some(host),
                    ..body
                };
                self.docker
                    .create_container(Some(options()), body)
                    .await
                    .map(|created| (created.id, false))
                    .map_err(|e| ExecError::docker(format!("create container {name}"), e))
            }
            // The engine refused the spec itself (no command in the spec nor the image, ...).
            Err(DockerError::DockerResponseServerError {
                status_code: 400,
                message,
            }) => Err(ExecError::InvalidSpec(format!(
                "the engine refused the container: {message}"
            ))),
            Err(e) => Err(ExecError::docker(format!("create container {name}"), e)),
        }
    }

    /// Creates `/output` in the container's writable layer (world-writable, so that any user
    /// of the image can write there).
    async fn make_output_dir(&self, id: &str) -> Result<(), ExecError> {
        let mut tar = tar::Builder::new(Vec::new());
        let mut header = tar::Header::new_gnu();
        header.set_entry_type(tar::EntryType::Directory);
        header.set_mode(0o777);
        header.set_size(0);
        let archive = tar
            .append_data(&mut header, "output/", std::io::empty())
            .and_then(|()| tar.into_inner())
            .map_err(|e| ExecError::InvalidSpec(format!("build the /output archive: {e}")))?;
        let options = UploadToContainerOptions {
            path: "/".into(),
            ..Default::default()
        };
        self.docker
            .upload_to_container(id, Some(options), bollard::body_full(archive.into()))
            .await
            .map_err(|e| ExecError::docker(format!("create {OUTPUT_DIR} in container {id}"), e))
    }

    /// Streams the logs until the container has exited and its log stream ended; stops it on
    /// cancel or timeout. Returns how it was ended, the exit code from `wait` (non-zero
    /// codes come back from bollard as `DockerContainerWaitError`) and the two captures.
    async fn follow(
        &self,
        id: &str,
        timeout: Option<Duration>,
        events: Option<UnboundedSender<LogChunk>>,
        cancel: CancellationToken,
    ) -> (Option<Ending>, Option<i64>, Capture, Capture) {
        let mut stdout = Capture::new(self.config.log_limit_bytes);
        let mut stderr = Capture::new(self.config.log_limit_bytes);
        let mut logs = self.long.logs(
            id,
            Some(LogsOptions {
                follow: true,
                stdout: true,
                stderr: true,
                ..Default::default()
            }),
        );
        let mut wait = self.long.wait_container(id, None);
        let deadline = async {
            match timeout {
                Some(t) => tokio::time::sleep(t).await,
                None => std::future::pending().await,
            }
        };
        tokio::pin!(deadline);
        let mut ending = None;
        let mut exit_code = None;
        let (mut logs_done, mut waited) = (false, false);
        while !(logs_done && waited) {
            tokio::select! {
                chunk = logs.next(), if !logs_done => match chunk {
                    Some(Ok(output)) => {
                        deliver(output, &mut stdout, &mut stderr, events.as_ref());
                    }
                    Some(Err(e)) => {
                        tracing::warn!(container_id = id, error = %e, "log stream failed");
                        logs_done = true;
                    }
                    None => logs_done = true,
                },
                exited = wait.next(), if !waited => {
                    waited = true;
                    exit_code = match exited {
                        Some(Ok(response)) => Some(response.status_code),
                        Some(Err(DockerError::DockerContainerWaitError { code, .. })) => Some(code),
                        Some(Err(e)) => {
                            tracing::warn!(container_id = id, error = %e, "wait failed");
                            None
                        }
                        None => None,
                    };
                }
                () = cancel.cancelled(), if ending.is_none() => {
                    ending = Some(Ending::Cancelled);
                    self.stop(id).await;
                }
                () = &mut deadline, if ending.is_none() => {
                    ending = Some(Ending::TimedOut);
                    self.stop(id).await;
                }
            }
        }
        (ending, exit_code, stdout, stderr)
    }

    /// Stop signal, the grace period, then kill (Docker's stop does both); a kill when stop
    /// itself failed.
    async fn stop(&self, id: &str) {
        let options = StopContainerOptions {
            t: Some(i32::try_from(self.config.stop_grace.as_secs()).unwrap_or(i32::MAX)),
            ..Default::default()
        };
        match self.long.stop_container(id, Some(options)).await {
            Ok(())
            | Err(DockerError::DockerResponseServerError {
                status_code: 304, ..
            }) => {}
            Err(e) => {
                tracing::warn!(container_id = id, error = %e, "stop failed; killing");
                let kill = KillContainerOptions {
                    signal: "SIGKILL".into(),
                };
                if let Err(e) = self.docker.kill_container(id, Some(kill)).await {
                    tracing::warn!(container_id = id, error = %e, "kill failed");
                }
            }
        }
    }

    /// Whether the engine records an OOM kill for a container that exited killed without it
    /// in the first inspection: the engine learns of an OOM kill from an event that can land
    /// just after the exit event, so a SIGKILL we did not send gets a second look, for at most
    /// [`OOM_RECHECKS`] × 100 ms.
    async fn oom_recorded_late(&self, id: &str) -> bool {
        for _ in 0..OOM_RECHECKS {
            tokio::time::sleep(Duration::from_millis(100)).await;
            match self.inspect(id).await {
                Ok(inspected) => {
                    if inspected.state.and_then(|s| s.oom_killed) == Some(true) {
                        return true;
                    }
                }
                Err(e) => {
                    tracing::debug!(container_id = id, error = %e, "inspecting for a late OOM record");
                    return false;
                }
            }
        }
        false
    }

    /// Everything after the exit: state (OOM, exit code, times) and `/output`.
    async fn finish(
        &self,
        id: &str,
        ending: Option<Ending>,
        exit_code: Option<i64>,
        stdout: Capture,
        stderr: Capture,
    ) -> Result<RunOutcome, ExecError> {
        let inspected = self.inspect(id).await?;
        let outputs_empty = output_volume_is_empty(&inspected);
        let state = inspected.state.unwrap_or_default();
        // Only when both the wait and the log stream broke off early: no result to make up.
        if state.running == Some(true) {
            return Err(ExecError::NotFinished(id.to_owned()));
        }
        let exit_code = exit_code.or(state.exit_code);
        let mut oom_killed = state.oom_killed == Some(true);
        if ending.is_none() && !oom_killed && exit_code == Some(SIGKILL_EXIT) {
            oom_killed = self.oom_recorded_late(id).await;
        }
        let status = match (ending, oom_killed, exit_code) {
            (Some(Ending::Cancelled), ..) => RunStatus::Cancelled,
            (Some(Ending::TimedOut), ..) => RunStatus::TimedOut,
            (None, true, _) => RunStatus::OomKilled,
            (None, false, Some(0)) => RunStatus::Completed,
            (None, false, Some(code)) => RunStatus::Failed { exit_code: code },
            (None, false, None) => {
                return Err(ExecError::InvalidSpec(format!(
                    "container {id} has no exit code"
                )));
            }
        };
        let (outputs, outputs_truncated) = if outputs_empty {
            // The archive call mounts the container's filesystem (~50 ms): skipped when the
            // engine's /output volume is visible here and holds nothing.
            (Vec::new(), false)
        } else {
            self.collect_outputs(id).await
        };
        Ok(RunOutcome {
            container_id: Some(id.to_owned()),
            status,
            exit_code,
            stdout_truncated: stdout.truncated(),
            stderr_truncated: stderr.truncated(),
            stdout: stdout.into_string(),
            stderr: stderr.into_string(),
            outputs,
            outputs_truncated,
            started_at: state.started_at.as_deref().and_then(docker_time),
            finished_at: state.finished_at.as_deref().and_then(docker_time),
        })
    }

    async fn inspect(&self, id: &str) -> Result<ContainerInspectResponse, ExecError> {
        self.docker
            .inspect_container(id, None)
            .await
            .map_err(|e| ExecError::docker(format!("inspect container {id}"), e))
    }

    /// The files under `/output`; reading the archive stops a little past the limit (tar
    /// headers and padding), so a huge output costs no more than that.
    async fn collect_outputs(&self, id: &str) -> (Vec<OutputFile>, bool) {
        let limit = self.config.output_limit_bytes;
        let read_bound = limit.saturating_add(limit / 8).saturating_add(1 << 20);
        let mut download = self.long.download_from_container(
            id,
            Some(DownloadFromContainerOptions {
                path: OUTPUT_DIR.into(),
            }),
        );
        let mut archive = Vec::new();
        let mut cut = false;
        while let Some(chunk) = download.next().await {
            match chunk {
                Ok(bytes) => {
                    archive.extend_from_slice(&bytes);
                    if archive.len() as u64 > read_bound {
                        cut = true;
                        break;
                    }
                }
                Err(DockerError::DockerResponseServerError {
                    status_code: 404, ..
                }) => return (Vec::new(), false),
                Err(e) => {
                    tracing::warn!(container_id = id, error = %e, "cannot download /output");
                    return (Vec::new(), true);
                }
            }
        }
        let (files, truncated) = extract_outputs(&archive, limit);
        (files, truncated || cut)
    }

    async fn remove(&self, name_or_id: &str) -> Result<(), ExecError> {
        remove_container(&self.docker, name_or_id)
            .await
            .map_err(|e| ExecError::docker(format!("remove container {name_or_id}"), e))
    }

    /// The containers carrying `cloudai.worker_id=<worker_id>`, running or not, with the exit
    /// code of those that exited. For a worker agent that restarts.
    pub async fn reconcile(&self, worker_id: &str) -> Result<Vec<ManagedContainer>, ExecError> {
        let filters = HashMap::from([("label", vec![format!("{LABEL_WORKER_ID}={worker_id}")])]);
        let options = ListContainersOptionsBuilder::new()
            .all(true)
            .filters(&filters)
            .build();
        let listed = self
            .docker
            .list_containers(Some(options))
            .await
            .map_err(|e| ExecError::docker("list containers", e))?;
        let mut found = Vec::new();
        for summary in listed {
            let Some(container_id) = summary.id else {
                continue;
            };
            let task_id = summary
                .labels
                .and_then(|mut labels| labels.remove(LABEL_TASK_ID))
                .unwrap_or_default();
            let state = match summary.state {
                Some(ContainerSummaryStateEnum::CREATED) => ManagedState::Created,
                Some(
                    ContainerSummaryStateEnum::RUNNING
                    | ContainerSummaryStateEnum::PAUSED
                    | ContainerSummaryStateEnum::RESTARTING,
                ) => ManagedState::Running,
                Some(ContainerSummaryStateEnum::EXITED | ContainerSummaryStateEnum::DEAD) => {
                    ManagedState::Exited
                }
                other => ManagedState::Other(
                    other
                        .map(|s| s.to_string())
                        .unwrap_or_else(|| "unknown".into()),
                ),
            };
            let exit_code = if state == ManagedState::Exited {
                self.inspect(&container_id)
                    .await?
                    .state
                    .and_then(|s| s.exit_code)
            } else {
                None
            };
            found.push(ManagedContainer {
                container_id,
                task_id,
                state,
                exit_code,
            });
        }
        Ok(found)
    }

    /// The result of a container that exited while nobody followed it (see [`Self::reconcile`]):
    /// logs, exit code, OOM and `/output`, as [`Self::run`] would have returned them; then the
    /// container is removed. One that is running or never started is left alone
    /// (`container_not_finished`).
    pub async fn collect(&self, container_id: &str) -> Result<RunOutcome, ExecError> {
        let state = self.inspect(container_id).await?.state.unwrap_or_default();
        if state.running == Some(true) || state.status == Some(ContainerStateStatusEnum::CREATED) {
            return Err(ExecError::NotFinished(container_id.to_owned()));
        }
        let mut stdout = Capture::new(self.config.log_limit_bytes);
        let mut stderr = Capture::new(self.config.log_limit_bytes);
        let mut logs = self.long.logs(
            container_id,
            Some(LogsOptions {
                stdout: true,
                stderr: true,
                ..Default::default()
            }),
        );
        while let Some(output) = logs.next().await {
            let output =
                output.map_err(|e| ExecError::docker(format!("read logs of {container_id}"), e))?;
            deliver(output, &mut stdout, &mut stderr, None);
        }
        let outcome = self
            .finish(container_id, None, None, stdout, stderr)
            .await?;
        self.remove(container_id).await?;
        Ok(outcome)
    }

    /// Stops a container (grace period, then kill) and removes it; one that is gone already
    /// is fine.
    pub async fn stop_and_remove(&self, container_id: &str) -> Result<(), ExecError> {
        self.stop(container_id).await;
        self.remove(container_id).await
    }
}

/// True when the container's `/output` is a volume whose directory this process can read
/// (a local engine) and it is empty. False whenever that cannot be told: the archive decides.
fn output_volume_is_empty(inspected: &ContainerInspectResponse) -> bool {
    let Some(source) = inspected.mounts.iter().flatten().find_map(|m| {
        (m.destination.as_deref() == Some(OUTPUT_DIR))
            .then(|| m.source.clone())
            .flatten()
    }) else {
        return false;
    };
    std::fs::read_dir(&source).is_ok_and(|mut entries| entries.next().is_none())
}

impl RunOutcome {
    fn cancelled_before_start() -> Self {
        Self {
            container_id: None,
            status: RunStatus::Cancelled,
            exit_code: None,
            stdout: String::new(),
            stderr: String::new(),
            stdout_truncated: false,
            stderr_truncated: false,
            outputs: Vec::new(),
            outputs_truncated: false,
            started_at: None,
            finished_at: None,
        }
    }
}

/// Removes the container when the run future is dropped half-way (the caller gave up on it):
/// no container outlives its run. When the runtime itself is shutting down nothing can be
/// spawned: the container stays, labelled, for [`Executor::reconcile`] after the restart.
struct RemoveOnDrop {
    docker: Docker,
    name: String,
    armed: bool,
}

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let docker = self.docker.clone();
            let name = std::mem::take(&mut self.name);
            runtime.spawn(async move {
                if let Err(e) = remove_container(&docker, &name).await {
                    tracing::warn!(container = name, error = %e, "cannot remove an abandoned container");
                }
            });
        }
    }
}

/// Force-removes a container with its anonymous volumes; one that does not exist is fine.
async fn remove_container(docker: &Docker, name_or_id: &str) -> Result<(), DockerError> {
    let options = RemoveContainerOptions {
        force: true,
        v: true,
        ..Default::default()
    };
    match docker.remove_container(name_or_id, Some(options)).await {
        Ok(())
        | Err(DockerError::DockerResponseServerError {
            status_code: 404, ..
        }) => Ok(()),
        Err(e) => Err(e),
    }
}

fn deliver(
    output: LogOutput,
    stdout: &mut Capture,
    stderr: &mut Capture,
    events: Option<&UnboundedSender<LogChunk>>,
) {
    let (stream, kept) = match output {
        LogOutput::StdOut { message } => (LogStream::Stdout, stdout.push(&message)),
        LogOutput::StdErr { message } => (LogStream::Stderr, stderr.push(&message)),
        LogOutput::StdIn { .. } | LogOutput::Console { .. } => return,
    };
    if let Some(events) = events
        && !kept.is_empty()
    {
        // A receiver that went away only stops the live view; the capture goes on.
        let _ = events.send(LogChunk {
            stream,
            bytes: kept,
        });
    }
}

/// `/output` is an anonymous volume (made at create; removed with the container) unless the
/// container's storage is limited: files in a volume would escape that limit, so then it is a
/// directory in the writable layer, made by an archive upload before start (one more call,
/// tens of ms). A volume takes the image's `/output` with its owner and mode when there is
/// one, else it is root's: an image that runs as another user brings its own `/output`.
fn output_volume(storage_limited: bool) -> Option<Vec<String>> {
    (!storage_limited).then(|| vec![OUTPUT_DIR.to_owned()])
}

fn gpu_request(count: Option<i64>, device_ids: Option<Vec<String>>) -> DeviceRequest {
    DeviceRequest {
        count,
        device_ids,
        capabilities: Some(vec![vec!["gpu".into()]]),
        ..Default::default()
    }
}

/// Storage drivers that implement `--storage-opt size`: overlay2 only on xfs (which must also
/// be mounted with `pquota`; a create that fails for lack of it turns the limit off).
fn storage_opt_supported(driver: &str, backing_fs: &str) -> bool {
    match driver {
        "overlay2" => backing_fs == "xfs",
        "devicemapper" | "btrfs" | "zfs" | "windowsfilter" => true,
        _ => false,
    }
}

/// A unique, valid container name that says which task it runs.
fn container_name(task_id: &str) -> String {
    let task: String = task_id
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == '.' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .take(64)
        .collect();
    let unique = uuid::Uuid::now_v7().simple().to_string();
    // The tail of a v7 UUID is random; the head is the clock.
    format!("cloudai-{task}-{}", &unique[unique.len() - 12..])
}

/// `repo[:tag]` or `repo@digest` -> (fromImage, tag). Without a tag Docker would pull every
/// tag of the repository, so `latest` is made explicit.
fn split_reference(image: &str) -> (String, Option<String>) {
    if image.contains('@') {
        return (image.to_owned(), None);
    }
    let last = image.rsplit('/').next().unwrap_or(image);
    match last.rfind(':') {
        Some(i) => {
            let cut = image.len() - last.len() + i;
            (image[..cut].to_owned(), Some(image[cut + 1..].to_owned()))
        }
        None => (image.to_owned(), Some("latest".into())),
    }
}

/// The message of an engine error without bollard's wrapping.
fn docker_message(e: DockerError) -> String {
    match e {
        DockerError::DockerResponseServerError { message, .. } => message,
        DockerError::DockerStreamError { error } => error,
        other => other.to_string(),
    }
}

/// Docker's RFC 3339 times; its zero time (never started) is `None`.
fn docker_time(s: &str) -> Option<DateTime<Utc>> {
    let t = DateTime::parse_from_rfc3339(s).ok()?.with_timezone(&Utc);
    (t.timestamp() > 0).then_some(t)
}
