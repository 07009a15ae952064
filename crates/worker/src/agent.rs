//! The worker agent's connection to its host: register once (the identity is kept in the state
//! directory), then heartbeat with usage. The host being unreachable is never fatal: calls are
//! retried with a jittered exponential back-off until it answers again.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use anyhow::{Context, bail};
use backon::{ExponentialBuilder, Retryable};
use serde_json::{Value, json};

use super::identity::{self, Identity};
use super::resources::{Detected, Overrides, UsageSampler};
use crate::client::{Client, ClientError, ClientTls};
use crate::model::Resources;
use crate::protocol::route;

/// How the agent joins its host.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// The host's base URL, e.g. `https://10.0.0.1:8080`.
    pub host: String,
    /// What this agent trusts and presents over HTTPS.
    pub tls: ClientTls,
    /// The cluster's join token (only used to register).
    pub join_token: String,
    /// The id to register under; the host picks `worker-<uuid>` when absent.
    pub worker_id: Option<String>,
    /// The `host:port` recorded as `worker_ip`; by default the local address this machine
    /// reaches the host from, port 0 (the agent listens on nothing: it polls the host).
    pub advertise: Option<String>,
    pub labels: BTreeMap<String, String>,
    pub overrides: Overrides,
    /// Where containers write: its free space is the storage offered (`None`: Docker's data
    /// root, as the engine reports it, else `/`).
    pub storage_path: Option<PathBuf>,
    /// Where the identity (and, later, unacknowledged results) are kept.
    pub state_dir: PathBuf,
    pub heartbeat_interval: Duration,
}

/// Default time between heartbeats: three fit in the host's default staleness (15 s).
pub const DEFAULT_HEARTBEAT_INTERVAL: Duration = Duration::from_secs(5);

/// A connected agent.
pub struct Agent {
    config: AgentConfig,
    identity: Identity,
    offer: Resources,
    /// The detected GPUs offered (UUIDs), at most as many as the offer says.
    gpu_devices: Vec<String>,
    /// Tasks running here now, reported with each heartbeat.
    running: Arc<AtomicU32>,
}

fn backoff() -> ExponentialBuilder {
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(500))
        .with_max_delay(Duration::from_secs(30))
        .with_jitter()
        .without_max_times()
}

/// Worth trying again: the host is unreachable or failing, not refusing.
fn transient(error: &ClientError) -> bool {
    match error {
        ClientError::Unreachable { .. } => true,
        ClientError::Api { status, .. } => *status >= 500 || *status == 429,
        ClientError::Protocol(_) => false,
    }
}

fn refused(error: &ClientError) -> bool {
    matches!(
        error,
        ClientError::Api {
            status: 401 | 403 | 404,
            ..
        }
    )
}

impl Agent {
    /// Detects the machine, then registers (or, with a saved identity, checks in with one
    /// heartbeat). Waits for an unreachable host; fails on a refusal it cannot repair.
    pub async fn connect(config: AgentConfig) -> anyhow::Result<Agent> {
        let storage_path = config
            .storage_path
            .clone()
            .unwrap_or_else(|| PathBuf::from("/"));
        let detected = Detected::probe(&storage_path);
        let offer = detected.offer(&config.overrides);
        tracing::info!(
            cpu = detected.cpu,
            memory_gb = detected.memory,
            storage_gb = ?detected.storage,
            storage_path = %storage_path.display(),
            gpus = detected.gpus.len(),
            gpu_note = detected.gpu_note.as_deref().unwrap_or(""),
            "detected this machine"
        );
        if offer.cpu <= 0.0 || offer.memory <= 0.0 {
            bail!(
                "this worker would offer {} cores and {} GB of memory: set --cpu and --memory-gb",
                offer.cpu,
                offer.memory
            );
        }
        let mut agent = Agent {
            identity: Identity {
                host: config.host.clone(),
                worker_id: String::new(),
                token: String::new(),
            },
            gpu_devices: detected
                .gpus
                .iter()
                .take(offer.gpu as usize)
                .map(|g| g.uuid.clone())
                .collect(),
            config,
            offer,
            running: Arc::new(AtomicU32::new(0)),
        };
        match identity::load(&agent.config.state_dir)? {
            Some(saved) if saved.host == agent.config.host => {
                agent.identity = saved;
                match agent.heartbeat(&mut UsageSampler::new()).await {
                    Ok(_) => {
                        tracing::info!(worker_id = %agent.identity.worker_id, "rejoined the host with the saved identity");
                        return Ok(agent);
                    }
                    Err(e) if refused(&e) => tracing::warn!(
                        worker_id = %agent.identity.worker_id, error = %e,
                        "the host no longer knows this worker's saved identity: registering again"
                    ),
                    Err(e) => return Err(e).context("checking in with the saved identity"),
                }
            }
            Some(saved) => tracing::info!(
                saved_host = %saved.host,
                "the saved identity is for another host: registering with this one"
            ),
            None => {}
        }
        agent.register().await?;
        Ok(agent)
    }

    pub fn worker_id(&self) -> &str {
        &self.identity.worker_id
    }

    /// The worker's own token (for the calls that fetch and report work).
    pub fn token(&self) -> &str {
        &self.identity.token
    }

    pub fn offer(&self) -> Resources {
        self.offer
    }

    /// The GPUs this worker hands out to its tasks by device id.
    pub fn gpu_devices(&self) -> Vec<String> {
        self.gpu_devices.clone()
    }

    /// The running-task count that heartbeats report; whoever runs tasks keeps it current.
    pub fn running_counter(&self) -> Arc<AtomicU32> {
        self.running.clone()
    }

    async fn register(&mut self) -> anyhow::Result<()> {
        let advertise = match &self.config.advertise {
            Some(address) => address.clone(),
            None => local_address_towards(&self.config.host).await?,
        };
        let body = json!({
            "worker_id": self.config.worker_id.clone().or_else(|| {
                (!self.identity.worker_id.is_empty()).then(|| self.identity.worker_id.clone())
            }),
            "worker_ip": advertise,
            "total_cpu": self.offer.cpu,
            "total_memory": self.offer.memory,
            "total_storage": self.offer.storage,
            "total_gpu": self.offer.gpu,
            "labels": self.config.labels,
        });
        let client = Client::new(
            &self.config.host,
            &self.config.tls,
            Some(self.config.join_token.clone()),
        )?;
        let answer: Value = (|| client.post(route::REGISTER, &body))
            .retry(backoff())
            .when(transient)
            .notify(|error, wait| {
                let why = match error {
                    ClientError::Unreachable { .. } => "host not reachable",
                    _ => "the host failed to take the registration",
                };
                tracing::warn!(%error, retry_in_ms = wait.as_millis() as u64, "registering: {why}; trying again");
            })
            .await
            .map_err(|e| match e {
                ClientError::Api { status: 409, .. } => anyhow::anyhow!(
                    "{e}: a worker with this id is registered and this agent has no valid token for it; \
                     remove it (DELETE /v1/workers/ID as admin) or start with another --worker-id"
                ),
                other => anyhow::Error::new(other).context("registering with the host"),
            })?;
        let worker_id = answer["worker"]["worker_id"]
            .as_str()
            .context("the registration answer has no worker id")?;
        let token = answer["token"]
            .as_str()
            .context("the registration answer has no token")?;
        self.identity = Identity {
            host: self.config.host.clone(),
            worker_id: worker_id.to_string(),
            token: token.to_string(),
        };
        identity::save(&self.config.state_dir, &self.identity)?;
        tracing::info!(
            worker_id,
            cpu = self.offer.cpu,
            memory_gb = self.offer.memory,
            storage_gb = self.offer.storage,
            gpu = self.offer.gpu,
            "registered with the host"
        );
        Ok(())
    }

    async fn heartbeat(&self, sampler: &mut UsageSampler) -> Result<Value, ClientError> {
        let usage = sampler.sample(self.running.load(Ordering::Relaxed));
        let client = Client::new(
            &self.config.host,
            &self.config.tls,
            Some(self.identity.token.clone()),
        )?;
        client
            .post(
                &route::heartbeat(&self.identity.worker_id),
                &json!({"usage": usage}),
            )
            .await
    }

    /// Heartbeats every interval until `shutdown` resolves. A host that cannot be reached is
    /// logged and tried again at the next beat; a host that forgot this worker (deleted by an
    /// admin) gets a new registration.
    pub async fn run_heartbeats(
        &mut self,
        shutdown: impl std::future::Future<Output = ()>,
    ) -> anyhow::Result<()> {
        tokio::pin!(shutdown);
        let mut sampler = UsageSampler::new();
        let mut failing_since: Option<tokio::time::Instant> = None;
        loop {
            tokio::select! {
                () = &mut shutdown => return Ok(()),
                () = tokio::time::sleep(self.config.heartbeat_interval) => {}
            }
            match self.heartbeat(&mut sampler).await {
                Ok(_) => {
                    if let Some(since) = failing_since.take() {
                        tracing::info!(
                            worker_id = %self.identity.worker_id,
                            down_s = since.elapsed().as_secs_f64(),
                            "the host answers heartbeats again"
                        );
                    }
                }
                Err(e) if refused(&e) => {
                    tracing::warn!(worker_id = %self.identity.worker_id, error = %e, "heartbeat refused: registering again");
                    tokio::select! {
                        registered = self.register() => registered?,
                        () = &mut shutdown => return Ok(()),
                    }
                }
                Err(e) => {
                    failing_since.get_or_insert_with(tokio::time::Instant::now);
                    tracing::warn!(worker_id = %self.identity.worker_id, error = %e, "heartbeat failed; trying again at the next beat");
                }
            }
        }
    }
}

/// The local address this machine reaches `host_url` from, as `ip:0`. A UDP "connect" only
/// picks the route: nothing is sent.
async fn local_address_towards(host_url: &str) -> anyhow::Result<String> {
    let url =
        reqwest::Url::parse(host_url).with_context(|| format!("parsing --host {host_url}"))?;
    let host = url
        .host_str()
        .with_context(|| format!("--host {host_url} has no host name"))?
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    let port = url.port_or_known_default().unwrap_or(80);
    let target = tokio::net::lookup_host((host.as_str(), port))
        .await
        .with_context(|| format!("resolving {host}"))?
        .next()
        .with_context(|| format!("{host} resolves to no address"))?;
    let bind: SocketAddr = if target.is_ipv4() {
        "0.0.0.0:0".parse()?
    } else {
        "[::]:0".parse()?
    };
    let socket = std::net::UdpSocket::bind(bind).context("opening a UDP socket")?;
    socket
        .connect(target)
        .with_context(|| format!("finding the route to {target}"))?;
    let local = socket.local_addr().context("reading the local address")?;
    Ok(SocketAddr::new(local.ip(), 0).to_string())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    #[tokio::test]
    async fn the_advertised_address_is_the_local_end_of_the_route_to_the_host() {
        assert_eq!(
            local_address_towards("http://127.0.0.1:8080")
                .await
                .unwrap(),
            "127.0.0.1:0"
        );
        let via_name = local_address_towards("http://localhost:9").await.unwrap();
        assert!(
            ["127.0.0.1:0", "[::1]:0"].contains(&via_name.as_str()),
            "{via_name}"
        );
        assert!(local_address_towards("not a url").await.is_err());
    }
}
