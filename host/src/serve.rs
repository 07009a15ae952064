//! `cloudai serve`: opens the store, sets up authentication, and runs the HTTP API until a
//! shutdown signal arrives.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use tokio::net::TcpListener;

use crate::api::auth::{self, Authenticator, Role, TokenEntry};
use crate::api::{AppState, Limits};
use crate::events::EventHub;
use crate::executor::ExecutorConfig;
use crate::lifecycle::Lifecycle;
use crate::policy::{EngineSettings, PolicyEngine, PolicyRuntime, RuntimeSettings};
use crate::reconciler::{Reconciler, ReconcilerConfig};
use crate::scheduler::{Scheduler, SchedulerConfig, Wakeup, WorkSignal};
use crate::store::Store;
use crate::store::mongo::MongoStore;
use crate::store::sqlite::SqliteStore;
use crate::tls::{ServerTls, TlsListener};
use crate::worker::{AgentConfig, Overrides};
use tokio_util::sync::CancellationToken;

/// Everything `serve` needs, resolved from flags and environment by the CLI.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    pub mongodb_uri: Option<String>,
    pub mongodb_database: String,
    pub tokens_file: Option<PathBuf>,
    pub admin_token: Option<String>,
    pub join_token: Option<String>,
    pub limits: Limits,
    /// How often the policy sync compares this replica's policies with the store's.
    pub policy_sync_interval: std::time::Duration,
    pub scheduler: SchedulerConfig,
    /// The reconciler's settings (its grace period is `scheduler.heartbeat_staleness`).
    pub reconciler: ReconcilerConfig,
    /// The worker this host runs on its own machine, if any.
    pub local_worker: Option<LocalWorker>,
    /// How long events stay available to `GET /v1/events` resumptions.
    pub event_retention: std::time::Duration,
    /// HTTPS instead of plain HTTP.
    pub tls: Option<ServerTls>,
    /// Serve plain HTTP on an address other machines can reach (behind a TLS-terminating
    /// proxy on a private network); refused without it.
    pub allow_plain_http: bool,
}

/// The in-process worker of `cloudai serve`: a worker agent like `cloudai worker`, joined to
/// this host over loopback, running tasks on the local Docker engine.
#[derive(Debug, Clone)]
pub struct LocalWorker {
    pub executor: ExecutorConfig,
}

/// Opens the configured store: MongoDB when a URI is given, else the embedded SQLite file in
/// the data directory.
pub async fn open_store(config: &ServeConfig) -> anyhow::Result<Arc<dyn Store>> {
    match &config.mongodb_uri {
        Some(uri) => {
            let store = MongoStore::connect(uri, &config.mongodb_database)
                .await
                .with_context(|| {
                    format!(
                        "connecting to MongoDB database '{}'",
                        config.mongodb_database
                    )
                })?;
            Ok(Arc::new(store))
        }
        None => {
            let store = SqliteStore::open_in_dir(&config.data_dir).with_context(|| {
                format!(
                    "opening the embedded store in {}",
                    config.data_dir.display()
                )
            })?;
            Ok(Arc::new(store))
        }
    }
}

/// The policy runtime, its compiled components kept in `data_dir/policy-cache` so that a
/// restart does not compile them again.
pub fn policy_runtime(config: &ServeConfig) -> anyhow::Result<PolicyRuntime> {
    let engine = PolicyEngine::new(EngineSettings {
        cache_dir: Some(config.data_dir.join("policy-cache")),
        ..EngineSettings::default()
    })
    .context("starting the policy engine")?;
    Ok(PolicyRuntime::new(engine, RuntimeSettings::default())
        .with_observer(Arc::new(crate::metrics::PolicyMetrics)))
}

/// Builds the authenticator from the tokens file and environment. When no admin token is
/// configured at all, one is generated once and kept in `data_dir/admin.token` (mode 0600),
/// so that a fresh `cloudai serve` is usable without any setup; likewise the worker join token.
pub fn build_authenticator(config: &ServeConfig) -> anyhow::Result<Authenticator> {
    let mut tokens = match &config.tokens_file {
        Some(path) => auth::load_tokens_file(path)
            .with_context(|| format!("loading tokens file {}", path.display()))?,
        None => Vec::new(),
    };
    if let Some(token) = &config.admin_token {
        tokens.push(TokenEntry {
            user_id: "admin".to_string(),
            role: Role::Admin,
            token_sha256: auth::token_sha256_hex(token),
        });
    }
    if !tokens.iter().any(|t| t.role == Role::Admin) {
        let path = config.data_dir.join("admin.token");
        let token = read_or_create_secret(&path, "cai_a_")?;
        tracing::warn!(
            path = %path.display(),
            "no admin token configured: using the generated one; run `export CLOUDAI_TOKEN=$(cat {})` to use the CLI as admin",
            path.display()
        );
        tokens.push(TokenEntry {
            user_id: "admin".to_string(),
            role: Role::Admin,
            token_sha256: auth::token_sha256_hex(&token),
        });
    }
    let join_token = join_token(config)?;
    Ok(Authenticator::new(
        tokens,
        Some(auth::token_sha256_hex(&join_token)),
    ))
}

/// The workers' join token: the configured one, else the one kept in DATA_DIR/join.token
/// (generated on first use).
pub fn join_token(config: &ServeConfig) -> anyhow::Result<String> {
    match &config.join_token {
        Some(token) => Ok(token.clone()),
        None => {
            let path = config.data_dir.join("join.token");
            let token = read_or_create_secret(&path, "cai_j_")?;
            tracing::info!(path = %path.display(), "worker join token kept in this file");
            Ok(token)
        }
    }
}

/// Reads a secret kept in a file, creating it (readable by its owner only) when absent.
fn read_or_create_secret(path: &Path, prefix: &str) -> anyhow::Result<String> {
    if let Ok(existing) = std::fs::read_to_string(path) {
        let existing = existing.trim().to_string();
        if existing.is_empty() {
            bail!(
                "{} is empty: delete it to have a new token generated",
                path.display()
            );
        }
        return Ok(existing);
    }
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("creating {}", parent.display()))?;
    }
    let token = auth::generate_token(prefix);
    write_private(path, &token).with_context(|| format!("writing {}", path.display()))?;
    Ok(token)
}

#[cfg(unix)]
fn write_private(path: &Path, contents: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    file.write_all(contents.as_bytes())?;
    file.write_all(b"\n")
}

#[cfg(not(unix))]
fn write_private(path: &Path, contents: &str) -> std::io::Result<()> {
    std::fs::write(path, format!("{contents}\n"))
}

/// Runs the host until Ctrl-C or SIGTERM.
pub async fn run(config: ServeConfig) -> anyhow::Result<()> {
    // Checked before anything is opened: a refused start changes nothing.
    check_plain_http(&config)?;
    let (tls, certificate) = match &config.tls {
        Some(tls) => {
            let (server_config, certificate) = tls.server_config()?;
            (Some(server_config), Some(certificate))
        }
        None => (None, None),
    };
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("creating data dir {}", config.data_dir.display()))?;
    let store = open_store(&config).await?;
    // Every change through the lifecycle (and the policy changes) is published on the event
    // stream.
    let stop_events = CancellationToken::new();
    let (events, sink) =
        EventHub::start(store.clone(), config.event_retention, stop_events.clone()).await;
    let auth = build_authenticator(&config)?;
    let policies = Arc::new(policy_runtime(&config)?);
    // Dropped (stopped) when `run` returns.
    let _policy_sync = crate::policy::sync::PolicySync::new(
        store.clone(),
        policies.clone(),
        config.policy_sync_interval,
    )
    .with_events(sink.clone())
    .spawn();
    let wakeup = Wakeup::new();
    let work = WorkSignal::new();
    let state = AppState {
        store: store.clone(),
        lifecycle: Lifecycle::new(store.clone(), wakeup.clone()).with_events(sink.clone()),
        auth: Arc::new(auth),
        limits: Arc::new(config.limits.clone()),
        policies: policies.clone(),
        work: work.clone(),
    };
    // Every replica runs one; only the holder of the store's lease acts.
    let reconciler = Reconciler::new(
        store.clone(),
        wakeup.clone(),
        &config.scheduler,
        config.reconciler.clone(),
    )
    .with_events(sink.clone());
    let (stop_reconciler, reconciler_stopped) = tokio::sync::oneshot::channel::<()>();
    let reconciler = tokio::spawn(reconciler.run(async {
        let _ = reconciler_stopped.await;
    }));
    let scheduler = Scheduler::new(store.clone(), policies, wakeup, config.scheduler.clone())
        .with_work_signal(work)
        .with_events(sink);
    let (stop_scheduler, scheduler_stopped) = tokio::sync::oneshot::channel::<()>();
    let scheduler = tokio::spawn(scheduler.run(async {
        // A dropped sender stops it as well.
        let _ = scheduler_stopped.await;
    }));
    let app = crate::api::router(state).layer(axum::Extension(events));
    let listener = TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("binding {}", config.listen))?;
    let local = listener.local_addr().context("reading the bound address")?;
    reload_on_sighup(certificate);
    let stop_serving = CancellationToken::new();
    tokio::spawn({
        let stop_serving = stop_serving.clone();
        async move {
            shutdown_signal().await;
            stop_serving.cancel();
        }
    });
    let serve = |listener: TcpListener| {
        tokio::spawn(
            axum::serve(listener, app.clone())
                .with_graceful_shutdown(stop_serving.clone().cancelled_owned())
                .into_future(),
        )
    };
    // The local worker reaches this host at `local` unless TLS gives it a listener of its own.
    let mut local_worker_address = local;
    let mut internal = None;
    let public = match tls {
        Some(tls) => {
            tracing::info!(
                address = %local,
                store = store.backend_name(),
                client_certificates = config.tls.as_ref().is_some_and(|t| t.client_ca.is_some()),
                "cloudai host listening on https://{local}"
            );
            if config.local_worker.is_some() {
                // The local worker cannot count on the certificate naming this machine's
                // loopback address (nor hold a client certificate): it talks to this host
                // over a listener of its own, plain HTTP on loopback, with its token as any
                // worker.
                let loopback = TcpListener::bind(SocketAddr::new(loopback_of(local), 0))
                    .await
                    .context("binding the local worker's loopback listener")?;
                local_worker_address = loopback
                    .local_addr()
                    .context("reading the local worker's loopback address")?;
                internal = Some(serve(loopback));
            }
            let listener = TlsListener::new(listener, tls).context("starting TLS")?;
            tokio::spawn(
                axum::serve(listener, app)
                    .with_graceful_shutdown(stop_serving.clone().cancelled_owned())
                    .into_future(),
            )
        }
        None => {
            if local.ip().is_loopback() {
                tracing::info!(
                    address = %local,
                    store = store.backend_name(),
                    "cloudai host listening on http://{local} (plain HTTP on loopback: reachable from this machine only; --tls-cert/--tls-key serve HTTPS)"
                );
            } else {
                tracing::warn!(
                    address = %local,
                    store = store.backend_name(),
                    "cloudai host listening on http://{local} (plain HTTP on a reachable address, as --allow-plain-http asks: tokens travel unencrypted unless a TLS proxy is in front)"
                );
            }
            serve(listener)
        }
    };
    let local_worker = match &config.local_worker {
        Some(local_worker) => Some(spawn_local_worker(
            &config,
            local_worker,
            local_worker_address,
        )?),
        None => None,
    };
    let served = public.await.context("the HTTP server task failed")?;
    if let Some(internal) = internal {
        // Stopped by the same signal; it has nothing of its own to finish.
        internal.abort();
    }
    served.context("serving HTTP")?;
    if let Some((stop, worker)) = local_worker {
        stop.cancel();
        join_within(worker, LOCAL_WORKER_GRACE, "the local worker").await;
    }
    let _ = stop_scheduler.send(());
    join_within(scheduler, PART_GRACE, "the scheduler").await;
    // Gives its lease up, so that another replica reconciles at once.
    let _ = stop_reconciler.send(());
    join_within(reconciler, PART_GRACE, "the reconciler").await;
    stop_events.cancel();
    tracing::info!("cloudai host stopped");
    Ok(())
}

/// Reads the certificate and key files again on each SIGHUP (what `systemctl reload` and
/// certificate renewal hooks send): new connections get the renewed certificate; a file that
/// does not load leaves the current one, and says why. Without TLS a SIGHUP changes nothing
/// (rather than ending the process, its default).
fn reload_on_sighup(certificate: Option<Arc<crate::tls::ServerCertificate>>) {
    #[cfg(unix)]
    tokio::spawn(async move {
        use tokio::signal::unix::{SignalKind, signal};
        let mut hangups = match signal(SignalKind::hangup()) {
            Ok(hangups) => hangups,
            Err(error) => {
                tracing::error!(%error, "cannot listen for SIGHUP: the TLS certificate is read at start-up only");
                return;
            }
        };
        while hangups.recv().await.is_some() {
            let Some(certificate) = &certificate else {
                tracing::info!("SIGHUP: nothing to reload (no --tls-cert)");
                continue;
            };
            match certificate.reload() {
                Ok(()) => tracing::info!("SIGHUP: TLS certificate reloaded"),
                Err(error) => tracing::error!(
                    error = format!("{error:#}"),
                    "SIGHUP: the TLS certificate did not load; still serving the previous one"
                ),
            }
        }
    });
    #[cfg(not(unix))]
    drop(certificate);
}

/// Refuses plain HTTP on an address other machines reach unless the operator asked for it:
/// tokens and task data would cross the network unencrypted.
fn check_plain_http(config: &ServeConfig) -> anyhow::Result<()> {
    if config.tls.is_none() && !config.listen.ip().is_loopback() && !config.allow_plain_http {
        bail!(
            "refusing to serve plain HTTP on {}, which other machines can reach: give a certificate \
             (--tls-cert and --tls-key), or pass --allow-plain-http when a TLS-terminating proxy \
             on a private network is in front of this host",
            config.listen
        );
    }
    Ok(())
}

/// The loopback address of the family `address` is in.
fn loopback_of(address: SocketAddr) -> std::net::IpAddr {
    if address.is_ipv4() {
        std::net::Ipv4Addr::LOCALHOST.into()
    } else {
        std::net::Ipv6Addr::LOCALHOST.into()
    }
}

/// How long the local worker may take to stop after the shutdown signal: it stops the
/// containers it runs (each gets Docker's stop grace) and flushes their logs.
const LOCAL_WORKER_GRACE: Duration = Duration::from_secs(30);

/// How long the scheduler or the reconciler may take to finish its round after the shutdown
/// signal (a round in flight against a store that stopped answering is abandoned: its claims
/// expire and the next replica's reconciler repairs what it left).
const PART_GRACE: Duration = Duration::from_secs(10);

/// Waits for a part of the host to end, at most `grace`; then aborts it, so that a stopping
/// process ends in bounded time whatever state that part is in.
async fn join_within(mut part: tokio::task::JoinHandle<()>, grace: Duration, name: &str) {
    match tokio::time::timeout(grace, &mut part).await {
        Ok(Ok(())) => {}
        Ok(Err(error)) => tracing::error!(%error, "{name} ended abnormally"),
        Err(_) => {
            part.abort();
            tracing::error!(
                grace_s = grace.as_secs(),
                "{name} did not stop within its grace period after the shutdown signal; abandoned"
            );
        }
    }
}

/// Starts the local worker against this host's own address. A machine without a Docker engine
/// still serves: the local worker says why it stopped, and tasks go to other workers.
fn spawn_local_worker(
    config: &ServeConfig,
    local_worker: &LocalWorker,
    listening: SocketAddr,
) -> anyhow::Result<(CancellationToken, tokio::task::JoinHandle<()>)> {
    let ip = match listening.ip() {
        ip if ip.is_unspecified() && ip.is_ipv4() => std::net::Ipv4Addr::LOCALHOST.into(),
        ip if ip.is_unspecified() => std::net::Ipv6Addr::LOCALHOST.into(),
        ip => ip,
    };
    let host = format!("http://{}", SocketAddr::new(ip, listening.port()));
    let agent = AgentConfig {
        host,
        // Plain HTTP on loopback (see `run`).
        tls: crate::client::ClientTls::default(),
        join_token: join_token(config)?,
        worker_id: None,
        advertise: Some(SocketAddr::new(ip, 0).to_string()),
        labels: std::collections::BTreeMap::from([("cloudai.local".into(), "true".into())]),
        overrides: Overrides::default(),
        storage_path: None,
        // The host's identity for its local worker: the same worker after a restart.
        state_dir: config.data_dir.join("local-worker"),
        heartbeat_interval: crate::worker::DEFAULT_HEARTBEAT_INTERVAL,
    };
    let stop = CancellationToken::new();
    crate::executor::observe_container_starts(crate::metrics::container_started);
    let executor = local_worker.executor.clone();
    let stopped = stop.clone().cancelled_owned();
    let task = tokio::spawn(async move {
        if let Err(error) = crate::worker::run(
            agent,
            executor,
            crate::worker::DEFAULT_MAX_CONCURRENT,
            stopped,
        )
        .await
        {
            tracing::error!(
                error = format!("{error:#}"),
                "the local worker stopped; this host places tasks on other workers only (start with --no-local-worker to silence this)"
            );
        }
    });
    Ok((stop, task))
}

/// Resolves on Ctrl-C or SIGTERM: the worker's own, shared by the host.
pub use crate::worker::cli::shutdown_signal;

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    fn config(dir: &Path) -> ServeConfig {
        ServeConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            data_dir: dir.to_path_buf(),
            mongodb_uri: None,
            mongodb_database: "cloudai".into(),
            tokens_file: None,
            admin_token: None,
            join_token: None,
            limits: Limits::default(),
            policy_sync_interval: crate::policy::sync::DEFAULT_INTERVAL,
            scheduler: SchedulerConfig::default(),
            reconciler: ReconcilerConfig::default(),
            local_worker: None,
            event_retention: crate::events::DEFAULT_RETENTION,
            tls: None,
            allow_plain_http: false,
        }
    }

    #[test]
    fn plain_http_is_served_on_loopback_and_elsewhere_only_when_asked_for() {
        let dir = tempfile::tempdir().unwrap();
        let at = |listen: &str, allow: bool, tls: bool| {
            let mut config = config(dir.path());
            config.listen = listen.parse().unwrap();
            config.allow_plain_http = allow;
            config.tls = tls.then(|| ServerTls {
                cert: "cert.pem".into(),
                key: "key.pem".into(),
                client_ca: None,
            });
            check_plain_http(&config).map_err(|e| e.to_string())
        };
        assert_eq!(at("127.0.0.1:8080", false, false), Ok(()));
        assert_eq!(at("[::1]:8080", false, false), Ok(()));
        for reachable in ["0.0.0.0:8080", "10.0.0.11:8080", "[::]:8080"] {
            let refused = at(reachable, false, false).unwrap_err();
            assert!(
                refused.contains("refusing to serve plain HTTP")
                    && refused.contains("--allow-plain-http"),
                "{refused}"
            );
            assert_eq!(at(reachable, true, false), Ok(()));
            assert_eq!(at(reachable, false, true), Ok(()));
        }
    }

    #[test]
    fn generated_tokens_are_kept_across_restarts_and_private() {
        let dir = tempfile::tempdir().unwrap();
        build_authenticator(&config(dir.path())).unwrap();
        let admin = std::fs::read_to_string(dir.path().join("admin.token")).unwrap();
        let join = std::fs::read_to_string(dir.path().join("join.token")).unwrap();
        assert!(admin.trim().len() >= 32 && join.trim().len() >= 32);
        assert_ne!(admin, join);
        build_authenticator(&config(dir.path())).unwrap();
        assert_eq!(
            std::fs::read_to_string(dir.path().join("admin.token")).unwrap(),
            admin
        );
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(dir.path().join("admin.token"))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o077, 0, "admin token readable by others: {mode:o}");
        }
    }

    #[test]
    fn no_admin_token_is_generated_when_one_is_configured() {
        let dir = tempfile::tempdir().unwrap();
        let mut config = config(dir.path());
        config.admin_token = Some("cai_a_configured".into());
        config.join_token = Some("cai_j_configured".into());
        build_authenticator(&config).unwrap();
        assert!(!dir.path().join("admin.token").exists());
        assert!(!dir.path().join("join.token").exists());
    }

    #[test]
    fn an_empty_token_file_is_an_error_not_an_empty_token() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("admin.token"), "\n").unwrap();
        let Err(error) = build_authenticator(&config(dir.path())) else {
            panic!("an empty admin.token must be refused");
        };
        assert!(format!("{error:#}").contains("empty"), "{error:#}");
    }
}
