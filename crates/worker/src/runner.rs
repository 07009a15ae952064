//! The agent's work loop: long-poll the host for this worker's work, run each new assignment
//! through the executor (bounded concurrency), stop what the host no longer lists (cancelled,
//! timed out, given to another worker), and report starts and results. A result is written to
//! the spool before it is sent and removed only once the host answered it, so a host that is
//! down, or an agent that restarts, never loses a finished result.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use anyhow::Context;
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::gpus::GpuPool;
use crate::client::{Client, ClientError, ClientTls};
use crate::executor::{
    ExecError, Executor, LogChunk, LogStream, ManagedState, OutputFile, RunOutcome, RunSpec,
    RunStatus,
};
use crate::protocol::route;
use crate::protocol::{LiveChunk, LiveLogs, Outcome, ResultReport, StreamName, Work, WorkList};

/// How long one long poll waits for a change.
const POLL_WAIT: Duration = Duration::from_secs(25);

/// Live output is sent at least this often while a task prints ...
const LOG_FLUSH_EVERY: Duration = Duration::from_millis(200);
/// ... and as soon as this much waits.
const LOG_FLUSH_BYTES: usize = 64 * 1024;
/// Most text in one request, so that a batch stays far below the host's body limit on that
/// route even JSON-escaped (after an outage, more than this may be waiting).
const LOG_BATCH_BYTES: usize = 128 * 1024;
/// Longest text of one chunk.
const LOG_PIECE_BYTES: usize = 64 * 1024;
/// Most live output kept for a host that does not answer; the oldest is dropped beyond (the
/// result still carries the whole bounded logs).
const LOG_MAX_PENDING_BYTES: usize = 1 << 20;
/// How long one batch of live output may take to send.
const LOG_SEND_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the end of a run waits for its last live output to be sent.
const LOG_DRAIN_TIMEOUT: Duration = Duration::from_secs(10);
/// How long one output file may take to upload.
const OUTPUT_UPLOAD_TIMEOUT: Duration = Duration::from_secs(120);

/// How the runner reaches its host.
#[derive(Debug, Clone)]
pub struct RunnerConfig {
    pub host: String,
    pub tls: ClientTls,
    pub worker_id: String,
    pub token: String,
    /// Where unacknowledged results wait (`<state dir>/spool`).
    pub spool_dir: PathBuf,
    /// Most containers at once (the host's reservations bound it first).
    pub max_concurrent: usize,
    /// This machine's GPUs (device UUIDs) handed out to tasks one by one.
    pub gpus: Vec<String>,
}

/// A result not yet acknowledged by the host.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Spooled {
    ass_id: String,
    task_id: String,
    report: ResultReport,
}

pub struct Runner {
    config: RunnerConfig,
    client: Client,
    executor: Arc<Executor>,
    running_count: Arc<AtomicU32>,
    gpus: GpuPool,
}

/// What a finished run left: its assignment and its report.
type Finished = (String, Option<Spooled>);

impl Runner {
    pub fn new(
        config: RunnerConfig,
        executor: Arc<Executor>,
        running_count: Arc<AtomicU32>,
    ) -> anyhow::Result<Runner> {
        let client = Client::new(&config.host, &config.tls, Some(config.token.clone()))?;
        std::fs::create_dir_all(&config.spool_dir)
            .with_context(|| format!("creating the result spool {}", config.spool_dir.display()))?;
        Ok(Runner {
            gpus: GpuPool::new(config.gpus.clone()),
            config,
            client,
            executor,
            running_count,
        })
    }

    /// Runs until `shutdown` resolves; then stops the containers it runs (their tasks are
    /// re-queued by the host once this worker is declared lost, or run again when it returns).
    pub async fn run(self, shutdown: impl std::future::Future<Output = ()>) -> anyhow::Result<()> {
        tokio::pin!(shutdown);
        let worker_id = self.config.worker_id.clone();
        self.send_spooled().await;
        // Finished here (before a restart too) and reported, or about to be: never run again
        // while the host still lists them.
        let mut done_pending = self.recover().await;
        let mut running: HashMap<String, CancellationToken> = HashMap::new();
        let mut tasks: JoinSet<Finished> = JoinSet::new();
        // Parent of every run's token: cancelled on shutdown, when runs end unreported.
        let shutting_down = CancellationToken::new();
        let mut version: Option<String> = None;
        let mut failures = 0u32;
        loop {
            let poll = self.poll(version.as_deref());
            tokio::select! {
                () = &mut shutdown => break,
                Some(joined) = tasks.join_next() => {
                    self.reap(joined, &mut running, &mut done_pending).await;
                    continue;
                }
                answer = poll => match answer {
                    Ok(list) => {
                        failures = 0;
                        version = Some(list.version.clone());
                        self.apply(list, &shutting_down, &mut running, &mut done_pending, &mut tasks);
                    }
                    Err(error) => {
                        failures += 1;
                        let wait = Duration::from_millis(500 * u64::from(failures.min(60)));
                        tracing::warn!(%worker_id, %error, retry_in_ms = wait.as_millis() as u64, "fetching work failed");
                        tokio::select! {
                            () = &mut shutdown => break,
                            () = tokio::time::sleep(wait) => {}
                        }
                        self.send_spooled().await;
                    }
                },
            }
        }
        // The containers are stopped and nothing is reported: the host re-queues these tasks
        // when this worker is declared lost, or when it comes back.
        shutting_down.cancel();
        while let Some(joined) = tasks.join_next().await {
            self.reap(joined, &mut running, &mut done_pending).await;
        }
        Ok(())
    }

    async fn poll(&self, version: Option<&str>) -> Result<WorkList, ClientError> {
        let mut query = vec![("wait_ms", POLL_WAIT.as_millis().to_string())];
        if let Some(v) = version {
            query.push(("known", v.to_string()));
        }
        let value = self
            .client
            .get_query(&route::work(&self.config.worker_id), &query)
            .await?;
        serde_json::from_value(value)
            .map_err(|e| ClientError::Protocol(format!("decoding the work list: {e}")))
    }

    /// Starts the new work, stops what is no longer listed or was cancelled.
    fn apply(
        &self,
        list: WorkList,
        shutting_down: &CancellationToken,
        running: &mut HashMap<String, CancellationToken>,
        done_pending: &mut HashSet<String>,
        tasks: &mut JoinSet<Finished>,
    ) {
        let listed: HashSet<&str> = list.work.iter().map(|w| w.ass_id.as_str()).collect();
        for (ass_id, token) in running.iter() {
            if !listed.contains(ass_id.as_str()) {
                tracing::info!(worker_id = %self.config.worker_id, ass_id, "no longer ours: stopping its container");
                token.cancel();
            }
        }
        // Finished runs whose assignment the host dropped need no more memory of it.
        done_pending.retain(|a| listed.contains(a.as_str()));
        for work in list.work {
            if let Some(token) = running.get(&work.ass_id) {
                if work.cancel {
                    token.cancel();
                }
                continue;
            }
            if done_pending.contains(&work.ass_id) {
                continue; // finished here; its report is on its way
            }
            if running.len() >= self.config.max_concurrent {
                tracing::warn!(worker_id = %self.config.worker_id, ass_id = %work.ass_id, "at the concurrency bound: starting it later");
                continue;
            }
            let token = shutting_down.child_token();
            if work.cancel {
                token.cancel();
            }
            running.insert(work.ass_id.clone(), token.clone());
            self.running_count
                .store(running.len() as u32, Ordering::Relaxed);
            let run = RunOne {
                client: self.client.clone(),
                executor: self.executor.clone(),
                worker_id: self.config.worker_id.clone(),
                spool_dir: self.config.spool_dir.clone(),
                shutting_down: shutting_down.clone(),
                gpus: self.gpus.clone(),
            };
            let span = tracing::info_span!(
                "execute",
                task_id = %work.task_id,
                worker_id = %self.config.worker_id,
                ass_id = %work.ass_id,
            );
            tasks.spawn(run.run(work, token).instrument(span));
        }
    }

    async fn reap(
        &self,
        joined: Result<Finished, tokio::task::JoinError>,
        running: &mut HashMap<String, CancellationToken>,
        done_pending: &mut HashSet<String>,
    ) {
        match joined {
            Ok((ass_id, spooled)) => {
                running.remove(&ass_id);
                if spooled.is_some() {
                    done_pending.insert(ass_id);
                }
            }
            Err(error) => {
                tracing::error!(worker_id = %self.config.worker_id, %error, "a run panicked")
            }
        }
        self.running_count
            .store(running.len() as u32, Ordering::Relaxed);
        self.send_spooled().await;
    }

    /// On start: containers this worker left behind. An exited one whose assignment the host
    /// still lists is reported (its run counts); anything else is stopped and removed, and the
    /// host's list decides what runs again. Returns the assignments reported this way.
    async fn recover(&self) -> HashSet<String> {
        let mut reported = HashSet::new();
        let found = match self.executor.reconcile(&self.config.worker_id).await {
            Ok(found) => found,
            Err(error) => {
                tracing::warn!(worker_id = %self.config.worker_id, %error, "listing this worker's containers failed");
                return reported;
            }
        };
        if found.is_empty() {
            return reported;
        }
        let listed = match self.poll(None).await {
            Ok(list) => list.work,
            Err(error) => {
                tracing::warn!(worker_id = %self.config.worker_id, %error, "cannot read the work list: stopping the containers left behind");
                Vec::new()
            }
        };
        for container in found {
            let work = listed.iter().find(|w| w.task_id == container.task_id);
            match (&container.state, work) {
                (ManagedState::Exited, Some(work)) => {
                    match self.executor.collect(&container.container_id).await {
                        Ok(outcome) => {
                            tracing::info!(worker_id = %self.config.worker_id, task_id = %work.task_id, "reporting a container that finished while the agent was away");
                            let spooled = Spooled {
                                ass_id: work.ass_id.clone(),
                                task_id: work.task_id.clone(),
                                report: report_of(Ok(outcome)),
                            };
                            if spool_write(&self.config.spool_dir, &spooled).is_ok() {
                                reported.insert(work.ass_id.clone());
                            }
                        }
                        Err(error) => {
                            tracing::warn!(container_id = %container.container_id, %error, "collecting a finished container")
                        }
                    }
                }
                _ => {
                    tracing::info!(worker_id = %self.config.worker_id, task_id = %container.task_id, state = ?container.state, "removing a container left behind");
                    if let Err(error) = self.executor.stop_and_remove(&container.container_id).await
                    {
                        tracing::warn!(container_id = %container.container_id, %error, "removing a container left behind");
                    }
                }
            }
        }
        self.send_spooled().await;
        reported
    }

    /// Sends every spooled result; each one the host answered (accepted or refused for good)
    /// leaves the spool.
    async fn send_spooled(&self) {
        for spooled in spool_read(&self.config.spool_dir) {
            if deliver(
                &self.client,
                &self.config.worker_id,
                &self.config.spool_dir,
                &spooled,
            )
            .await
            {
                spool_remove(&self.config.spool_dir, &spooled.ass_id);
            }
        }
    }
}

/// One assignment's run.
struct RunOne {
    client: Client,
    executor: Arc<Executor>,
    worker_id: String,
    spool_dir: PathBuf,
    shutting_down: CancellationToken,
    gpus: GpuPool,
}

impl RunOne {
    async fn run(self, work: Work, cancel: CancellationToken) -> Finished {
        let ass_id = work.ass_id.clone();
        // Held until the run ends.
        let (gpu, _gpu_lease) = self.gpus.take(work.req_gpu);
        let spec = RunSpec {
            task_id: work.task_id.clone(),
            worker_id: self.worker_id.clone(),
            image: work.docker_image.clone(),
            command: work.command.clone(),
            env: work.env.clone(),
            cpu: work.req_cpu,
            memory: work.req_memory,
            storage: work.req_storage,
            gpu,
            timeout: work.timeout_s.map(Duration::from_secs),
        };
        let (started_tx, started_rx) = tokio::sync::oneshot::channel();
        let report_start = {
            let (client, worker_id, ass_id) =
                (self.client.clone(), self.worker_id.clone(), ass_id.clone());
            async move {
                if started_rx.await.is_ok() {
                    let path = route::started(&worker_id, &ass_id);
                    if let Err(error) = client.post(&path, &json!({})).await {
                        tracing::warn!(%worker_id, %ass_id, %error, "reporting the start failed");
                    }
                }
            }
        };
        let (events_tx, events_rx) = tokio::sync::mpsc::unbounded_channel();
        let forwarding = tokio::spawn(forward_logs(
            self.client.clone(),
            self.worker_id.clone(),
            ass_id.clone(),
            events_rx,
        ));
        let (outcome, ()) = tokio::join!(
            self.executor
                .run_reporting_start(spec, Some(events_tx), cancel, started_tx),
            report_start
        );
        // The executor dropped its sender: the forwarder sends what is left and ends. Its
        // output goes before the result, so that a follower sees all of it before the end.
        let abort = forwarding.abort_handle();
        if tokio::time::timeout(LOG_DRAIN_TIMEOUT, forwarding)
            .await
            .is_err()
        {
            abort.abort();
            tracing::warn!(worker_id = %self.worker_id, %ass_id, "the last live output was not sent in time");
        }
        if let Ok(o) = &outcome
            && !self.shutting_down.is_cancelled()
            && let Err(error) = spool_write_outputs(&self.spool_dir, &ass_id, &o.outputs)
        {
            tracing::error!(worker_id = %self.worker_id, %ass_id, error = format!("{error:#}"), "spooling output files failed; they are left out");
        }
        if self.shutting_down.is_cancelled()
            && matches!(&outcome, Ok(o) if o.status == RunStatus::Cancelled)
        {
            tracing::info!(worker_id = %self.worker_id, %ass_id, "stopped by the agent's shutdown; not reported");
            return (ass_id, None);
        }
        let spooled = Spooled {
            ass_id: ass_id.clone(),
            task_id: work.task_id.clone(),
            report: report_of(outcome),
        };
        if let Err(error) = spool_write(&self.spool_dir, &spooled) {
            tracing::error!(worker_id = %self.worker_id, %ass_id, %error, "spooling a result failed; sending it unspooled");
        }
        if deliver(&self.client, &self.worker_id, &self.spool_dir, &spooled)
            .instrument(tracing::info_span!("report"))
            .await
        {
            spool_remove(&self.spool_dir, &ass_id);
            (ass_id, None)
        } else {
            (ass_id, Some(spooled))
        }
    }
}

/// Turns a stream's bytes into text, keeping a character split between two chunks whole.
#[derive(Default)]
struct Utf8Tail {
    held: Vec<u8>,
}

impl Utf8Tail {
    fn push(&mut self, bytes: &[u8]) -> String {
        self.held.extend_from_slice(bytes);
        let keep = match std::str::from_utf8(&self.held) {
            Ok(_) => 0,
            // An incomplete character at the end: wait for the rest of it.
            Err(e) if e.error_len().is_none() => self.held.len() - e.valid_up_to(),
            Err(_) => 0,
        };
        let rest = self.held.split_off(self.held.len() - keep);
        let text = String::from_utf8_lossy(&self.held).into_owned();
        self.held = rest;
        text
    }

    fn finish(&mut self) -> String {
        let text = String::from_utf8_lossy(&self.held).into_owned();
        self.held.clear();
        text
    }
}

/// Batches of a run's live output on their way to the host.
struct LiveBatcher {
    decoders: [Utf8Tail; 2],
    offsets: [u64; 2],
    /// The host keeps no more of this stream.
    full: [bool; 2],
    seq: u64,
    pending: std::collections::VecDeque<LiveChunk>,
    pending_bytes: usize,
}

fn stream_index(stream: StreamName) -> usize {
    match stream {
        StreamName::Stdout => 0,
        StreamName::Stderr => 1,
    }
}

impl LiveBatcher {
    fn new() -> Self {
        LiveBatcher {
            decoders: [Utf8Tail::default(), Utf8Tail::default()],
            offsets: [0; 2],
            full: [false; 2],
            seq: 0,
            pending: std::collections::VecDeque::new(),
            pending_bytes: 0,
        }
    }

    fn add_text(&mut self, stream: StreamName, mut text: String) {
        let i = stream_index(stream);
        if text.is_empty() || self.full[i] {
            return;
        }
        while text.len() > LOG_PIECE_BYTES {
            let mut cut = LOG_PIECE_BYTES;
            while !text.is_char_boundary(cut) {
                cut -= 1;
            }
            let rest = text.split_off(cut);
            self.add_text(stream, text);
            text = rest;
        }
        let offset = self.offsets[i];
        self.offsets[i] += text.len() as u64;
        self.pending_bytes += text.len();
        self.pending.push_back(LiveChunk {
            seq: self.seq,
            stream,
            offset,
            text,
        });
        self.seq += 1;
        // A host that does not answer: drop the oldest rather than grow.
        while self.pending_bytes > LOG_MAX_PENDING_BYTES {
            match self.pending.pop_front() {
                Some(dropped) => self.pending_bytes -= dropped.text.len(),
                None => break,
            }
        }
    }

    fn add(&mut self, chunk: LogChunk) {
        let stream = match chunk.stream {
            LogStream::Stdout => StreamName::Stdout,
            LogStream::Stderr => StreamName::Stderr,
        };
        let text = self.decoders[stream_index(stream)].push(&chunk.bytes);
        self.add_text(stream, text);
    }

    fn finish(&mut self) {
        for stream in [StreamName::Stdout, StreamName::Stderr] {
            let text = self.decoders[stream_index(stream)].finish();
            self.add_text(stream, text);
        }
    }

    /// How many chunks from the front make the next request: at least one, at most
    /// [`LOG_BATCH_BYTES`] of text.
    fn next_batch_len(&self) -> usize {
        let mut bytes = 0;
        let mut count = 0;
        for chunk in &self.pending {
            if count > 0 && bytes + chunk.text.len() > LOG_BATCH_BYTES {
                break;
            }
            bytes += chunk.text.len();
            count += 1;
        }
        count
    }

    fn drop_front(&mut self, count: usize) {
        for chunk in self.pending.drain(..count.min(self.pending.len())) {
            self.pending_bytes -= chunk.text.len();
        }
    }

    fn clear(&mut self) {
        self.pending.clear();
        self.pending_bytes = 0;
    }
}

/// Sends a run's live output to the host in batches (every [`LOG_FLUSH_EVERY`] or
/// [`LOG_FLUSH_BYTES`]) until the executor closes `events`. Never holds up the container: the
/// channel is unbounded and drained all along; a host that does not answer loses live output
/// (bounded by [`LOG_MAX_PENDING_BYTES`]), never the result.
async fn forward_logs(
    client: Client,
    worker_id: String,
    ass_id: String,
    mut events: tokio::sync::mpsc::UnboundedReceiver<LogChunk>,
) {
    let path = route::logs(&worker_id, &ass_id);
    let mut batcher = LiveBatcher::new();
    let mut tick = tokio::time::interval(LOG_FLUSH_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut open = true;
    // The host refused for good (the assignment is gone): stop sending.
    let mut refused = false;
    let mut failures = 0u32;
    let mut retry_at = tokio::time::Instant::now();
    while open || !batcher.pending.is_empty() {
        let flush = tokio::select! {
            chunk = events.recv(), if open => match chunk {
                Some(chunk) => {
                    batcher.add(chunk);
                    batcher.pending_bytes >= LOG_FLUSH_BYTES
                }
                None => {
                    open = false;
                    batcher.finish();
                    true
                }
            },
            _ = tick.tick() => true,
        };
        if refused {
            batcher.clear();
            continue;
        }
        // After a failed send, wait out the back-off (except for the last send of a run).
        if !flush || batcher.pending.is_empty() || (open && tokio::time::Instant::now() < retry_at)
        {
            continue;
        }
        let count = batcher.next_batch_len();
        let batch = LiveLogs {
            chunks: batcher.pending.iter().take(count).cloned().collect(),
        };
        let body = match serde_json::to_value(&batch) {
            Ok(body) => body,
            Err(error) => {
                tracing::error!(%worker_id, %ass_id, %error, "encoding live output");
                batcher.clear();
                continue;
            }
        };
        match client.post_timeout(&path, &body, LOG_SEND_TIMEOUT).await {
            Ok(ack) => {
                failures = 0;
                batcher.drop_front(count);
                batcher.full[0] |= ack["stdout_full"].as_bool().unwrap_or(false);
                batcher.full[1] |= ack["stderr_full"].as_bool().unwrap_or(false);
            }
            Err(ClientError::Api { status: 413, .. }) => {
                tracing::warn!(%worker_id, %ass_id, "the host found a batch of live output too large; dropped");
                batcher.drop_front(count);
            }
            Err(ClientError::Api { status, code, .. }) if status < 500 && status != 429 => {
                tracing::info!(%worker_id, %ass_id, status, code, "the host takes no more live output of this run");
                refused = true;
                batcher.clear();
            }
            Err(error) => {
                tracing::debug!(%worker_id, %ass_id, %error, "sending live output failed");
                failures = failures.saturating_add(1);
                retry_at = tokio::time::Instant::now()
                    + (LOG_FLUSH_EVERY * 2u32.saturating_pow(failures.min(5)))
                        .min(LOG_SEND_TIMEOUT);
                if !open {
                    // The run is over and the host does not answer: the result carries it.
                    batcher.clear();
                }
            }
        }
    }
}

/// Sends a spooled result: first the output files spooled with it (each removed once the
/// host answered for it), then the result. True when the host answered for good; false when
/// it should be tried again later (nothing is lost meanwhile: all of it stays on disk).
async fn deliver(client: &Client, worker_id: &str, spool_dir: &Path, spooled: &Spooled) -> bool {
    upload_spooled_outputs(client, worker_id, spool_dir, &spooled.ass_id).await
        && send_result(client, worker_id, spooled).await
}

/// The directory of an assignment's spooled output files.
fn outputs_dir(spool_dir: &Path, ass_id: &str) -> PathBuf {
    spool_dir.join(format!("{ass_id}.outputs"))
}

/// Writes a run's output files to the spool, under their relative paths (checked by the
/// executor: no `..`, never absolute).
fn spool_write_outputs(
    spool_dir: &Path,
    ass_id: &str,
    outputs: &[OutputFile],
) -> anyhow::Result<()> {
    let dir = outputs_dir(spool_dir, ass_id);
    for file in outputs {
        let path = dir.join(&file.path);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("creating {}", parent.display()))?;
        }
        std::fs::write(&path, &file.bytes)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

/// The spooled output files of an assignment: (relative path, file on disk).
fn spooled_outputs(dir: &Path) -> Vec<(String, PathBuf)> {
    let mut found = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(current) = pending.pop() {
        let Ok(entries) = std::fs::read_dir(&current) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                pending.push(path);
            } else if let Ok(relative) = path.strip_prefix(dir) {
                let relative = relative
                    .components()
                    .map(|c| c.as_os_str().to_string_lossy().into_owned())
                    .collect::<Vec<_>>()
                    .join("/");
                found.push((relative, path));
            }
        }
    }
    found.sort();
    found
}

/// Uploads the spooled output files of an assignment, one request each. A file the host
/// refuses for good (too large, the assignment superseded) is logged and dropped; a host that
/// cannot be reached stops the upload, to be tried again with the result.
async fn upload_spooled_outputs(
    client: &Client,
    worker_id: &str,
    spool_dir: &Path,
    ass_id: &str,
) -> bool {
    let dir = outputs_dir(spool_dir, ass_id);
    if !dir.exists() {
        return true;
    }
    let path = route::outputs(worker_id, ass_id);
    for (relative, file) in spooled_outputs(&dir) {
        let bytes = match std::fs::read(&file) {
            Ok(bytes) => bytes,
            Err(error) => {
                tracing::error!(%worker_id, %ass_id, path = %file.display(), %error, "reading a spooled output file; left out");
                continue;
            }
        };
        let size = bytes.len();
        let sent = client
            .post_bytes(
                &path,
                &[("path", relative.clone())],
                "application/octet-stream",
                bytes,
                OUTPUT_UPLOAD_TIMEOUT,
            )
            .await;
        match sent {
            Ok(_) => {
                tracing::debug!(%worker_id, %ass_id, path = %relative, size, "output file uploaded")
            }
            Err(ClientError::Api {
                status,
                code,
                message,
            }) if status < 500 && status != 429 => {
                tracing::warn!(%worker_id, %ass_id, path = %relative, status, code, message, "the host refused an output file; left out")
            }
            Err(error) => {
                tracing::warn!(%worker_id, %ass_id, path = %relative, %error, "uploading an output file failed; kept in the spool");
                return false;
            }
        }
        let _ = std::fs::remove_file(&file);
    }
    if let Err(error) = std::fs::remove_dir_all(&dir) {
        tracing::warn!(path = %dir.display(), %error, "removing the spooled output files");
    }
    true
}

/// The report of a run: its outcome, or why it could not run.
fn report_of(outcome: Result<RunOutcome, ExecError>) -> ResultReport {
    match outcome {
        Ok(o) => ResultReport {
            outcome: match o.status {
                RunStatus::Completed => Outcome::Completed,
                RunStatus::Failed { .. } => Outcome::Failed,
                RunStatus::OomKilled => Outcome::OomKilled,
                RunStatus::TimedOut => Outcome::TimedOut,
                RunStatus::Cancelled => Outcome::Cancelled,
            },
            exit_code: match o.status {
                RunStatus::Failed { exit_code } => Some(exit_code),
                _ => o.exit_code,
            },
            stdout: o.stdout,
            stderr: o.stderr,
            stdout_truncated: o.stdout_truncated,
            stderr_truncated: o.stderr_truncated,
            error: None,
            finished_at: o.finished_at,
            started_at: o.started_at,
        },
        Err(error) => ResultReport {
            outcome: Outcome::Error,
            exit_code: None,
            stdout: String::new(),
            stderr: String::new(),
            stdout_truncated: false,
            stderr_truncated: false,
            error: Some(format!("{}: {error}", error.code())),
            finished_at: None,
            started_at: None,
        },
    }
}

/// True when the host answered for good: accepted, or refused (the assignment is gone or
/// superseded, the report malformed). False when it should be tried again.
async fn send_result(client: &Client, worker_id: &str, spooled: &Spooled) -> bool {
    let path = route::result(worker_id, &spooled.ass_id);
    let body = match serde_json::to_value(&spooled.report) {
        Ok(body) => body,
        Err(error) => {
            tracing::error!(%worker_id, ass_id = %spooled.ass_id, %error, "encoding a result");
            return true;
        }
    };
    match client.post(&path, &body).await {
        Ok(answer) => {
            tracing::info!(%worker_id, ass_id = %spooled.ass_id, task_id = %spooled.task_id, status = %answer["status"], "result reported");
            true
        }
        Err(ClientError::Api {
            status,
            code,
            message,
        }) if status < 500 && status != 429 => {
            tracing::warn!(%worker_id, ass_id = %spooled.ass_id, task_id = %spooled.task_id, status, code, message, "the host refused the result; dropping it");
            true
        }
        Err(error) => {
            tracing::warn!(%worker_id, ass_id = %spooled.ass_id, %error, "reporting a result failed; kept in the spool");
            false
        }
    }
}

fn spool_path(dir: &Path, ass_id: &str) -> PathBuf {
    dir.join(format!("{ass_id}.json"))
}

fn spool_write(dir: &Path, spooled: &Spooled) -> anyhow::Result<()> {
    let tmp = dir.join(format!(".{}.tmp", spooled.ass_id));
    std::fs::write(&tmp, serde_json::to_vec(spooled)?)
        .with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, spool_path(dir, &spooled.ass_id))
        .with_context(|| format!("spooling the result of {}", spooled.ass_id))
}

fn spool_remove(dir: &Path, ass_id: &str) {
    let path = spool_path(dir, ass_id);
    if let Err(error) = std::fs::remove_file(&path)
        && error.kind() != std::io::ErrorKind::NotFound
    {
        tracing::warn!(path = %path.display(), %error, "removing a sent result from the spool");
    }
}

fn spool_read(dir: &Path) -> Vec<Spooled> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut spooled = Vec::new();
    for entry in entries.flatten() {
        let path = entry.path();
        if path.extension().is_none_or(|e| e != "json") {
            continue;
        }
        match std::fs::read(&path)
            .map_err(anyhow::Error::from)
            .and_then(|bytes| Ok(serde_json::from_slice::<Spooled>(&bytes)?))
        {
            Ok(s) => spooled.push(s),
            Err(error) => {
                tracing::error!(path = %path.display(), %error, "an unreadable spooled result; moving it aside");
                let _ = std::fs::rename(&path, path.with_extension("corrupt"));
            }
        }
    }
    spooled
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    #[test]
    fn the_spool_keeps_results_across_restarts_and_sets_aside_corrupt_ones() {
        let dir = tempfile::tempdir().unwrap();
        let spooled = Spooled {
            ass_id: "ass-1".into(),
            task_id: "task-1".into(),
            report: report_of(Err(ExecError::InvalidSpec("bad".into()))),
        };
        spool_write(dir.path(), &spooled).unwrap();
        std::fs::write(dir.path().join("ass-2.json"), b"{broken").unwrap();
        let read = spool_read(dir.path());
        assert_eq!(read.len(), 1);
        assert_eq!(read[0].ass_id, "ass-1");
        assert_eq!(read[0].report.outcome, Outcome::Error);
        assert!(
            read[0]
                .report
                .error
                .as_deref()
                .unwrap()
                .starts_with("invalid_spec: ")
        );
        assert!(dir.path().join("ass-2.corrupt").exists());
        spool_remove(dir.path(), "ass-1");
        assert!(spool_read(dir.path()).is_empty());
    }

    #[test]
    fn output_files_are_spooled_under_their_paths_and_not_taken_for_results() {
        let dir = tempfile::tempdir().unwrap();
        let files = vec![
            OutputFile {
                path: "report.txt".into(),
                bytes: b"done\n".to_vec(),
            },
            OutputFile {
                path: "d/e/f.bin".into(),
                bytes: vec![0, 1, 2],
            },
        ];
        spool_write_outputs(dir.path(), "ass-9", &files).unwrap();
        let found = spooled_outputs(&outputs_dir(dir.path(), "ass-9"));
        let paths: Vec<&str> = found.iter().map(|(p, _)| p.as_str()).collect();
        assert_eq!(paths, ["d/e/f.bin", "report.txt"]);
        assert_eq!(std::fs::read(&found[0].1).unwrap(), vec![0, 1, 2]);
        assert!(
            spool_read(dir.path()).is_empty(),
            "an outputs folder is not a result"
        );
    }

    #[test]
    fn a_character_split_between_chunks_stays_whole() {
        let mut tail = Utf8Tail::default();
        let bytes = "hé!".as_bytes();
        assert_eq!(tail.push(&bytes[..2]), "h");
        assert_eq!(tail.push(&bytes[2..]), "é!");
        assert_eq!(tail.push(&[0xff, b'a']), "\u{fffd}a");
        assert_eq!(tail.push(&[0xc3]), "");
        assert_eq!(tail.finish(), "\u{fffd}");
    }

    #[test]
    fn live_output_numbers_chunks_and_drops_the_oldest_beyond_its_bound() {
        let mut batcher = LiveBatcher::new();
        batcher.add_text(StreamName::Stdout, "ab".into());
        batcher.add_text(StreamName::Stderr, "err".into());
        batcher.add_text(StreamName::Stdout, "cd".into());
        let seen: Vec<(u64, u64, &str)> = batcher
            .pending
            .iter()
            .map(|c| (c.seq, c.offset, c.text.as_str()))
            .collect();
        assert_eq!(seen, vec![(0, 0, "ab"), (1, 0, "err"), (2, 2, "cd")]);
        batcher.full[1] = true;
        batcher.add_text(StreamName::Stderr, "more".into());
        assert_eq!(batcher.pending.len(), 3, "a full stream is not sent");
        assert_eq!(batcher.next_batch_len(), 3);
        batcher.drop_front(2);
        assert_eq!((batcher.pending.len(), batcher.pending_bytes), (1, 2));
        // Long text is cut into pieces, requests take a bounded share of them, and past the
        // pending bound the oldest are dropped.
        let big = "é".repeat(LOG_MAX_PENDING_BYTES / 2);
        batcher.add_text(StreamName::Stdout, big);
        assert!(
            batcher
                .pending
                .iter()
                .all(|c| c.text.len() <= LOG_PIECE_BYTES)
        );
        assert_eq!(batcher.pending[0].offset, 4, "the oldest were dropped");
        assert_eq!(batcher.pending_bytes, LOG_MAX_PENDING_BYTES);
        assert_eq!(batcher.next_batch_len(), LOG_BATCH_BYTES / LOG_PIECE_BYTES);
    }

    #[tokio::test]
    async fn live_output_to_a_host_that_is_down_never_holds_up_the_end_of_a_run() {
        // Nothing listens on port 1: every send fails at once.
        let client = Client::new(
            "http://127.0.0.1:1",
            &ClientTls::default(),
            Some("t".into()),
        )
        .unwrap();
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let forwarding = tokio::spawn(forward_logs(client, "w".into(), "a".into(), rx));
        for _ in 0..1000 {
            // The sender never blocks, whatever the host does.
            tx.send(LogChunk {
                stream: LogStream::Stdout,
                bytes: vec![b'x'; 4096],
            })
            .unwrap();
        }
        drop(tx);
        tokio::time::timeout(Duration::from_secs(3), forwarding)
            .await
            .expect("the forwarder gives up once the run is over")
            .unwrap();
    }
}
