//! The executor against the real Docker engine (skipped with a message when none answers,
//! except under CI). Every test uses its own task and worker ids, so they run in parallel.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use bollard::Docker;
use bollard::errors::Error as DockerError;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::test_registry::{TestImage, TestRegistry};
use super::testimage::ensure_busybox_image;
use super::*;

/// The busybox test image (built locally; no registry is reachable).
const IMAGE: &str = "cloudai-test/busybox:1";

async fn setup(config: ExecutorConfig) -> Option<(Docker, Executor)> {
    let docker = match connect().await {
        Ok(docker) => docker,
        Err(e) if std::env::var_os("CI").is_some() => panic!("CI must run Docker: {e}"),
        Err(e) => {
            eprintln!("skipping: no Docker engine answers ({e})");
            return None;
        }
    };
    ensure_busybox_image(&docker, IMAGE).await.unwrap();
    let executor = Executor::new(docker.clone(), config).await.unwrap();
    Some((docker, executor))
}

/// A test config: a short grace period (busybox `sh` as PID 1 ignores SIGTERM, so a stop
/// always waits the whole grace period).
fn config() -> ExecutorConfig {
    ExecutorConfig {
        stop_grace: Duration::from_secs(1),
        ..Default::default()
    }
}

fn spec(name: &str, command: &str) -> RunSpec {
    let unique = uuid::Uuid::now_v7().simple().to_string();
    RunSpec {
        task_id: format!("t-{name}-{unique}"),
        worker_id: format!("w-{name}-{unique}"),
        image: IMAGE.into(),
        command: Some(command.into()),
        env: BTreeMap::new(),
        cpu: 0.5,
        memory: 0.0625,
        storage: 0.0,
        gpu: GpuRequest::None,
        timeout: None,
    }
}

async fn run(executor: &Executor, spec: RunSpec) -> RunOutcome {
    executor
        .run(spec, None, CancellationToken::new())
        .await
        .unwrap()
}

async fn assert_gone(docker: &Docker, container_id: &str) {
    match docker.inspect_container(container_id, None).await {
        Err(DockerError::DockerResponseServerError {
            status_code: 404, ..
        }) => {}
        other => panic!("container {container_id} is still there: {other:?}"),
    }
}

/// The containers of a task, any state.
async fn containers_of(docker: &Docker, task_id: &str) -> Vec<String> {
    let filters = HashMap::from([("label", vec![format!("{LABEL_TASK_ID}={task_id}")])]);
    let options = ListContainersOptionsBuilder::new()
        .all(true)
        .filters(&filters)
        .build();
    docker
        .list_containers(Some(options))
        .await
        .unwrap()
        .into_iter()
        .filter_map(|c| c.id)
        .collect()
}

/// Waits until the task's container runs; returns its id.
async fn running_container(
    docker: &Docker,
    task_id: &str,
    run: &mut tokio::task::JoinHandle<Result<RunOutcome, ExecError>>,
) -> String {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if run.is_finished() {
            panic!("the run ended before it was seen running: {:?}", run.await);
        }
        for id in containers_of(docker, task_id).await {
            // Gone since listed: the run's end shows at the next turn.
            let Ok(inspected) = docker.inspect_container(&id, None).await else {
                continue;
            };
            if inspected.state.and_then(|s| s.running) == Some(true) {
                return id;
            }
        }
        assert!(Instant::now() < deadline, "task {task_id} never ran");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn echo_completes_with_stdout_and_stderr_kept_apart_and_leaves_nothing() {
    let Some((docker, executor)) = setup(config()).await else {
        return;
    };
    let mut spec = spec("echo", "sh -c 'echo hello; echo \"$GREETING\" >&2'");
    spec.env.insert("GREETING".into(), "to stderr".into());
    let outcome = run(&executor, spec).await;
    assert_eq!(outcome.status, RunStatus::Completed);
    assert_eq!(outcome.exit_code, Some(0));
    assert_eq!(outcome.stdout, "hello\n");
    assert_eq!(outcome.stderr, "to stderr\n");
    assert!(!outcome.stdout_truncated && !outcome.stderr_truncated);
    // Both set; Docker may record a very short run's FinishedAt before its StartedAt.
    assert!(outcome.started_at.is_some() && outcome.finished_at.is_some());
    assert_gone(&docker, outcome.container_id.as_deref().unwrap()).await;
}

#[tokio::test]
async fn true_runs_from_create_to_removed() {
    let Some((_docker, executor)) = setup(config()).await else {
        return;
    };
    // Not a speed assertion (benches do that): the figure is printed for the record.
    let started = Instant::now();
    let outcome = run(&executor, spec("true", "true")).await;
    eprintln!(
        "`true` run, image present, create -> removed: {:?}",
        started.elapsed()
    );
    assert_eq!(outcome.status, RunStatus::Completed);
    assert_eq!(outcome.stdout, "");
}

/// Prints (asserts nothing) the p50 of `true` through the executor next to bare
/// `docker run --rm`, interleaved so that both see the same load:
/// `cargo test -p cloudai --lib executor::tests::true_latency -- --ignored --nocapture`.
#[tokio::test]
#[ignore = "a measurement, not a test"]
async fn true_latency_next_to_docker_run() {
    let Some((_docker, executor)) = setup(config()).await else {
        return;
    };
    let (mut ours, mut bare) = (Vec::new(), Vec::new());
    for _ in 0..15 {
        let started = Instant::now();
        run(&executor, spec("latency", "true")).await;
        ours.push(started.elapsed());
        let started = Instant::now();
        let status = tokio::process::Command::new("docker")
            .args(["run", "--rm", "--network", "none", IMAGE, "true"])
            .status()
            .await
            .unwrap();
        assert!(status.success());
        bare.push(started.elapsed());
    }
    ours.sort();
    bare.sort();
    eprintln!(
        "p50 `true`: executor {:?}, docker run --rm {:?}",
        ours[ours.len() / 2],
        bare[bare.len() / 2]
    );
}

#[tokio::test]
async fn a_run_outlasts_the_clients_request_timeout() {
    let Some((docker, _)) = setup(config()).await else {
        return;
    };
    // Logs and wait last as long as the task: they must not be cut at the client's request
    // timeout (bollard's default is 2 minutes; 5 s here, which the create and start requests
    // must fit in: on a loaded CI machine a create once took over 2 s). The engine answers the
    // streams' headers at once, so it is the streams that must run on.
    let executor = Executor::new(docker.with_timeout(Duration::from_secs(5)), config())
        .await
        .unwrap();
    let outcome = run(&executor, spec("outlast", "sh -c 'sleep 8; echo done'")).await;
    assert_eq!(outcome.status, RunStatus::Completed, "{outcome:?}");
    assert_eq!(outcome.stdout, "done\n");
}

#[tokio::test]
async fn non_zero_exit_fails_with_its_code() {
    let Some((_docker, executor)) = setup(config()).await else {
        return;
    };
    let outcome = run(&executor, spec("exit3", "sh -c 'exit 3'")).await;
    assert_eq!(outcome.status, RunStatus::Failed { exit_code: 3 });
    assert_eq!(outcome.exit_code, Some(3));
}

#[tokio::test]
async fn memory_hog_over_its_limit_is_oom_killed() {
    let Some((_docker, executor)) = setup(config()).await else {
        return;
    };
    let mut spec = spec("oom", "tail /dev/zero");
    // 16 MiB; `tail` keeps the whole newline-free stream in memory.
    spec.memory = 16.0 / 1024.0;
    let outcome = run(&executor, spec).await;
    assert_eq!(outcome.status, RunStatus::OomKilled, "{outcome:?}");
    assert_eq!(outcome.status.code(), "oom_killed");
    assert_eq!(outcome.exit_code, Some(137));
}

#[tokio::test]
async fn limits_labels_and_hardening_are_applied_to_the_container() {
    let Some((docker, executor)) = setup(config()).await else {
        return;
    };
    let executor = Arc::new(executor);
    let spec = spec("limits", "sleep 300");
    let (task_id, worker_id) = (spec.task_id.clone(), spec.worker_id.clone());
    let cancel = CancellationToken::new();
    let mut run = tokio::spawn({
        let (executor, cancel) = (executor.clone(), cancel.clone());
        async move { executor.run(spec, None, cancel).await }
    });
    let id = running_container(&docker, &task_id, &mut run).await;
    let inspected = docker.inspect_container(&id, None).await.unwrap();
    let host = inspected.host_config.unwrap();
    assert_eq!(host.nano_cpus, Some(500_000_000));
    assert_eq!(host.memory, Some(64 << 20));
    assert_eq!(host.memory_swap, Some(64 << 20));
    assert_eq!(host.pids_limit, Some(512));
    assert_eq!(host.network_mode.as_deref(), Some("none"));
    assert_eq!(host.privileged, Some(false));
    assert_eq!(host.cap_drop, Some(vec!["ALL".to_string()]));
    assert_eq!(
        host.security_opt,
        Some(vec!["no-new-privileges".to_string()])
    );
    assert_eq!(host.device_requests.unwrap_or_default(), vec![]);
    let labels = inspected.config.unwrap().labels.unwrap();
    assert_eq!(labels.get(LABEL_TASK_ID), Some(&task_id));
    assert_eq!(labels.get(LABEL_WORKER_ID), Some(&worker_id));

    cancel.cancel();
    let outcome = run.await.unwrap().unwrap();
    assert_eq!(outcome.status, RunStatus::Cancelled);
    assert_gone(&docker, &id).await;
}

#[tokio::test]
async fn relaxed_hardening_keeps_capabilities_but_never_privileges() {
    let Some((docker, executor)) = setup(ExecutorConfig {
        relax_hardening: true,
        network_mode: "none".into(),
        ..config()
    })
    .await
    else {
        return;
    };
    let spec = spec("relaxed", "true");
    let name = container_name(&spec.task_id);
    let (id, _) = executor
        .create(&spec, Some(vec!["true".into()]), &name)
        .await
        .unwrap();
    let host = docker
        .inspect_container(&id, None)
        .await
        .unwrap()
        .host_config;
    executor.remove(&id).await.unwrap();
    let host = host.unwrap();
    assert_eq!(host.privileged, Some(false));
    assert!(host.cap_drop.unwrap_or_default().is_empty());
    assert!(host.security_opt.unwrap_or_default().is_empty());
}

#[tokio::test]
async fn gpu_requests_become_device_requests() {
    let Some((docker, executor)) = setup(config()).await else {
        return;
    };
    // Created, never started: this engine has no GPU runtime.
    let mut by_count = spec("gpucount", "true");
    by_count.gpu = GpuRequest::Count(2);
    let mut by_ids = spec("gpuids", "true");
    by_ids.gpu = GpuRequest::DeviceIds(vec!["0".into(), "GPU-abc".into()]);
    let mut got = Vec::new();
    for spec in [by_count, by_ids] {
        let (id, _) = executor
            .create(
                &spec,
                Some(vec!["true".into()]),
                &container_name(&spec.task_id),
            )
            .await
            .unwrap();
        let host = docker
            .inspect_container(&id, None)
            .await
            .unwrap()
            .host_config;
        executor.remove(&id).await.unwrap();
        got.push(host.unwrap().device_requests.unwrap());
    }
    assert_eq!(got[0].len(), 1);
    assert_eq!(got[0][0].count, Some(2));
    assert_eq!(got[0][0].capabilities, Some(vec![vec!["gpu".to_string()]]));
    assert_eq!(
        got[1][0].device_ids,
        Some(vec!["0".to_string(), "GPU-abc".to_string()])
    );
}

#[tokio::test]
async fn cancel_stops_a_running_sleep_within_seconds_and_removes_it() {
    let Some((docker, executor)) = setup(config()).await else {
        return;
    };
    let executor = Arc::new(executor);
    let spec = spec("cancel", "sleep 300");
    let task_id = spec.task_id.clone();
    let cancel = CancellationToken::new();
    let mut run = tokio::spawn({
        let (executor, cancel) = (executor.clone(), cancel.clone());
        async move { executor.run(spec, None, cancel).await }
    });
    let id = running_container(&docker, &task_id, &mut run).await;
    let asked = Instant::now();
    cancel.cancel();
    let outcome = run.await.unwrap().unwrap();
    let took = asked.elapsed();
    eprintln!("cancel -> removed: {took:?} (grace 1 s)");
    assert!(took < Duration::from_secs(10), "cancel took {took:?}");
    assert_eq!(outcome.status, RunStatus::Cancelled);
    assert_eq!(outcome.status.code(), "cancelled");
    assert_gone(&docker, &id).await;
}

#[tokio::test]
async fn cancel_during_the_pull_needs_no_container() {
    let Some((docker, executor)) = setup(config()).await else {
        return;
    };
    let mut spec = spec("cancelpull", "true");
    spec.image = "cloudai-test/never-pulled:1".into();
    let task_id = spec.task_id.clone();
    let cancel = CancellationToken::new();
    cancel.cancel();
    let outcome = executor.run(spec, None, cancel).await.unwrap();
    assert_eq!(outcome.status, RunStatus::Cancelled);
    assert_eq!(outcome.container_id, None);
    assert!(containers_of(&docker, &task_id).await.is_empty());
}

#[tokio::test]
async fn timeout_stops_a_long_sleep_as_timed_out() {
    let Some((docker, executor)) = setup(config()).await else {
        return;
    };
    let mut spec = spec("timeout", "sleep 60");
    spec.timeout = Some(Duration::from_secs(2));
    let started = Instant::now();
    let outcome = run(&executor, spec).await;
    let took = started.elapsed();
    assert_eq!(outcome.status, RunStatus::TimedOut);
    assert_eq!(outcome.status.code(), "timeout");
    assert!(
        took >= Duration::from_secs(2) && took < Duration::from_secs(15),
        "{took:?}"
    );
    assert_gone(&docker, outcome.container_id.as_deref().unwrap()).await;
}

#[tokio::test]
async fn dropping_the_run_future_removes_its_container() {
    let Some((docker, executor)) = setup(config()).await else {
        return;
    };
    let executor = Arc::new(executor);
    let spec = spec("dropped", "sleep 300");
    let task_id = spec.task_id.clone();
    let mut run = tokio::spawn({
        let executor = executor.clone();
        async move { executor.run(spec, None, CancellationToken::new()).await }
    });
    running_container(&docker, &task_id, &mut run).await;
    run.abort();
    let deadline = Instant::now() + Duration::from_secs(15);
    while !containers_of(&docker, &task_id).await.is_empty() {
        assert!(
            Instant::now() < deadline,
            "the abandoned container was not removed"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn missing_image_fails_fast_with_image_pull_failed_and_leaves_nothing() {
    let Some((docker, executor)) = setup(config()).await else {
        return;
    };
    let mut spec = spec("noimage", "true");
    spec.image = "cloudai-test/no-such-image:1".into();
    let task_id = spec.task_id.clone();
    let started = Instant::now();
    let err = executor
        .run(spec, None, CancellationToken::new())
        .await
        .unwrap_err();
    eprintln!("failed pull took {:?}: {err}", started.elapsed());
    assert_eq!(err.code(), "image_pull_failed");
    assert!(
        err.to_string().contains("cloudai-test/no-such-image:1"),
        "{err}"
    );
    assert!(containers_of(&docker, &task_id).await.is_empty());
}

/// Every event logged while a future runs, as its fields (`message` included) in text: how
/// the tests see the pull progress the executor reports through `tracing`.
#[derive(Clone, Default)]
struct Recorded(Arc<std::sync::Mutex<Vec<BTreeMap<String, String>>>>);

impl Recorded {
    /// The fields of the events whose message is `message`, in order.
    fn events(&self, message: &str) -> Vec<BTreeMap<String, String>> {
        let events = self.0.lock().unwrap();
        events
            .iter()
            .filter(|e| e.get("message").map(String::as_str) == Some(message))
            .cloned()
            .collect()
    }
}

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for Recorded {
    fn on_event(&self, event: &tracing::Event<'_>, _: tracing_subscriber::layer::Context<'_, S>) {
        struct Fields(BTreeMap<String, String>);
        impl tracing::field::Visit for Fields {
            fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
                self.0.insert(field.name().into(), value.into());
            }
            fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
                self.0.insert(field.name().into(), format!("{value:?}"));
            }
        }
        let mut fields = Fields(BTreeMap::new());
        event.record(&mut fields);
        self.0.lock().unwrap().push(fields.0);
    }
}

/// Removes image `reference` (one that is not there is fine).
async fn remove_image(docker: &Docker, reference: &str) {
    let options = bollard::query_parameters::RemoveImageOptions {
        force: true,
        ..Default::default()
    };
    match docker.remove_image(reference, Some(options), None).await {
        Ok(_)
        | Err(DockerError::DockerResponseServerError {
            status_code: 404, ..
        }) => {}
        Err(e) => panic!("cannot remove image {reference}: {e}"),
    }
}

async fn assert_image_absent(docker: &Docker, reference: &str) {
    match docker.inspect_image(reference).await {
        Err(DockerError::DockerResponseServerError {
            status_code: 404, ..
        }) => {}
        other => panic!("image {reference} is there: {other:?}"),
    }
}

#[tokio::test]
async fn an_absent_image_is_pulled_from_a_registry_with_progress_per_layer_logged() {
    use tracing::instrument::WithSubscriber;
    use tracing_subscriber::layer::SubscriberExt;

    let Some((docker, executor)) = setup(config()).await else {
        return;
    };
    // A new tag and a new top layer each run: the engine has to fetch the image.
    let tag = uuid::Uuid::now_v7().simple().to_string();
    let image = TestImage::on_local(&docker, IMAGE, "cloudai-pull-test", &tag, &tag).await;
    let registry = TestRegistry::start(image, &[]).await;
    let reference = registry.reference();
    remove_image(&docker, &reference).await;
    assert_image_absent(&docker, &reference).await;

    let mut spec = spec("pull", "echo pulled");
    spec.image = reference.clone();
    let task_id = spec.task_id.clone();
    let recorded = Recorded::default();
    let started = Instant::now();
    let outcome = executor
        .run(spec, None, CancellationToken::new())
        .with_subscriber(tracing_subscriber::registry().with(recorded.clone()))
        .await;
    eprintln!("pull and run took {:?}", started.elapsed());
    remove_image(&docker, &reference).await;
    let outcome = outcome.unwrap();
    assert_eq!(outcome.status, RunStatus::Completed);
    assert_eq!(outcome.stdout, "pulled\n");
    assert_image_absent(&docker, &reference).await;

    // The engine read the manifest, the config and every layer from the registry.
    let image = registry.image();
    let requests = registry.requests();
    assert!(registry.manifest_gets() >= 1, "{requests:?}");
    assert!(
        registry.blob_gets(&image.config_digest) >= 1,
        "{requests:?}"
    );
    for layer in &image.layer_digests {
        assert!(registry.blob_gets(layer) >= 1, "{layer}: {requests:?}");
    }

    // Progress: per layer (Docker's short id: the first 12 hex digits of its digest), each
    // status once when it changes, though the engine repeats one ("Extracting", ...) as
    // bytes go through; every layer goes from "Pulling fs layer" through "Downloading" (the
    // busybox binary makes the top layer large enough for progress) to "Pull complete", and
    // the engine's digest of the manifest is the registry's.
    let pulls = recorded.events("pull");
    let mut per_layer: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for event in &pulls {
        assert_eq!(event["image"], reference, "{event:?}");
        assert_eq!(event["task_id"], task_id, "{event:?}");
        per_layer
            .entry(event["layer"].clone())
            .or_default()
            .push(event["status"].clone());
    }
    for (layer, statuses) in &per_layer {
        assert!(
            statuses.windows(2).all(|w| w[0] != w[1]),
            "layer {layer:?} logged a status twice in a row: {statuses:?}"
        );
    }
    for layer in &image.layer_digests {
        let short = &layer.strip_prefix("sha256:").unwrap()[..12];
        let statuses = per_layer
            .get(short)
            .unwrap_or_else(|| panic!("{per_layer:?}"));
        assert_eq!(
            statuses.first().unwrap(),
            "Pulling fs layer",
            "{statuses:?}"
        );
        assert!(statuses.iter().any(|s| s == "Downloading"), "{statuses:?}");
        assert_eq!(statuses.last().unwrap(), "Pull complete", "{statuses:?}");
    }
    let image_statuses = per_layer.get("").unwrap_or_else(|| panic!("{per_layer:?}"));
    assert!(
        image_statuses.contains(&format!("Digest: {}", image.manifest_digest)),
        "{image_statuses:?}"
    );
    let pulled = recorded.events("image pulled");
    assert_eq!(pulled.len(), 1, "{pulled:?}");
    assert_eq!(pulled[0]["image"], reference);
}

#[tokio::test]
async fn a_pull_that_stalls_fails_at_the_pull_timeout_and_leaves_nothing() {
    let pull_timeout = Duration::from_secs(2);
    let Some((docker, executor)) = setup(ExecutorConfig {
        pull_timeout,
        ..config()
    })
    .await
    else {
        return;
    };
    let tag = uuid::Uuid::now_v7().simple().to_string();
    let image = TestImage::marker_only(&docker, IMAGE, "cloudai-pull-test", &tag, &tag).await;
    let layer = image.layer_digests[0].clone();
    let registry = TestRegistry::start(image, std::slice::from_ref(&layer)).await;
    let reference = registry.reference();
    remove_image(&docker, &reference).await;

    let mut spec = spec("pullstall", "true");
    spec.image = reference.clone();
    let task_id = spec.task_id.clone();
    let started = Instant::now();
    let err = executor
        .run(spec, None, CancellationToken::new())
        .await
        .unwrap_err();
    let took = started.elapsed();
    eprintln!("stalled pull failed after {took:?}: {err}");
    assert_eq!(err.code(), "image_pull_failed");
    assert!(err.to_string().contains(&reference), "{err}");
    assert!(err.to_string().contains("timed out after 2s"), "{err}");
    assert!(
        took >= pull_timeout && took < pull_timeout + Duration::from_secs(8),
        "{took:?}"
    );
    // It was the layer download that stalled, not anything before it.
    assert!(registry.blob_gets(&layer) >= 1, "{:?}", registry.requests());
    assert!(containers_of(&docker, &task_id).await.is_empty());
    assert_image_absent(&docker, &reference).await;
}

#[tokio::test]
async fn an_unsplittable_command_is_an_invalid_spec() {
    let Some((_docker, executor)) = setup(config()).await else {
        return;
    };
    let err = executor
        .run(
            spec("badcmd", "sh -c 'unterminated"),
            None,
            CancellationToken::new(),
        )
        .await
        .unwrap_err();
    assert_eq!(err.code(), "invalid_spec");
}

#[tokio::test]
async fn an_env_name_with_equals_is_an_invalid_spec() {
    let Some((_docker, executor)) = setup(config()).await else {
        return;
    };
    let mut spec = spec("badenv", "true");
    spec.env.insert("A=B".into(), "c".into());
    let err = executor
        .run(spec, None, CancellationToken::new())
        .await
        .unwrap_err();
    assert_eq!(err.code(), "invalid_spec");
}

#[tokio::test]
async fn a_storage_limit_the_driver_refuses_falls_back_to_reservation_only() {
    let Some((docker, executor)) = setup(config()).await else {
        return;
    };
    if executor.storage_enforced() {
        eprintln!("skipping: this engine does limit storage");
        return;
    }
    // As if the driver looked able (overlay2 on xfs) but lacked pquota.
    executor.storage_supported.store(true, Ordering::Relaxed);
    let mut spec = spec("storagefallback", "sh -c 'echo kept > /output/f'");
    spec.storage = 1.0;
    let outcome = run(&executor, spec).await;
    assert_eq!(outcome.status, RunStatus::Completed, "{outcome:?}");
    assert!(!executor.storage_enforced());
    assert_eq!(outcome.outputs.len(), 1);
    assert_gone(&docker, outcome.container_id.as_deref().unwrap()).await;
}

#[tokio::test]
async fn output_dir_made_in_the_writable_layer_is_collected() {
    let Some((docker, executor)) = setup(config()).await else {
        return;
    };
    // The storage-limited path: no volume, `/output` uploaded before start.
    let body = ContainerCreateBody {
        image: Some(IMAGE.into()),
        cmd: Some(vec![
            "sh".into(),
            "-c".into(),
            "echo layer > /output/f".into(),
        ]),
        host_config: Some(HostConfig {
            network_mode: Some("none".into()),
            ..Default::default()
        }),
        ..Default::default()
    };
    let id = docker.create_container(None, body).await.unwrap().id;
    executor.make_output_dir(&id).await.unwrap();
    docker.start_container(&id, None).await.unwrap();
    let _ = docker.wait_container(&id, None).next().await;
    let (files, truncated) = executor.collect_outputs(&id).await;
    executor.remove(&id).await.unwrap();
    assert_eq!(
        files,
        vec![OutputFile {
            path: "f".into(),
            bytes: b"layer\n".to_vec()
        }]
    );
    assert!(!truncated);
}

#[tokio::test]
async fn an_image_without_a_command_needs_one() {
    let Some((docker, executor)) = setup(config()).await else {
        return;
    };
    let mut spec = spec("nocmd", "true");
    spec.command = None;
    let task_id = spec.task_id.clone();
    let err = executor
        .run(spec, None, CancellationToken::new())
        .await
        .unwrap_err();
    assert_eq!(err.code(), "invalid_spec", "{err}");
    assert!(containers_of(&docker, &task_id).await.is_empty());
}

#[tokio::test]
async fn logs_over_the_limit_end_with_the_truncation_marker() {
    let Some((_docker, executor)) = setup(ExecutorConfig {
        log_limit_bytes: 100,
        ..config()
    })
    .await
    else {
        return;
    };
    let outcome = run(
        &executor,
        spec("trunc", "sh -c 'yes | head -c 5000; echo short >&2'"),
    )
    .await;
    assert_eq!(outcome.status, RunStatus::Completed);
    assert_eq!(
        outcome.stdout,
        format!("{}{}", "y\n".repeat(50), truncation_marker(100))
    );
    assert!(outcome.stdout_truncated);
    assert_eq!(outcome.stderr, "short\n");
    assert!(!outcome.stderr_truncated);
}

#[tokio::test]
async fn live_chunks_arrive_before_the_run_returns() {
    let Some((_docker, executor)) = setup(config()).await else {
        return;
    };
    let executor = Arc::new(executor);
    let (tx, mut rx) = mpsc::unbounded_channel();
    let spec = spec("live", "sh -c 'echo a; sleep 1; echo b >&2'");
    let run = tokio::spawn({
        let executor = executor.clone();
        async move { executor.run(spec, Some(tx), CancellationToken::new()).await }
    });
    let first = rx.recv().await.unwrap();
    assert!(
        !run.is_finished(),
        "the first chunk came only after the run"
    );
    assert_eq!(
        first,
        LogChunk {
            stream: LogStream::Stdout,
            bytes: b"a\n".to_vec()
        }
    );
    let outcome = run.await.unwrap().unwrap();
    let mut rest = Vec::new();
    while let Some(chunk) = rx.recv().await {
        rest.push(chunk);
    }
    assert_eq!(
        rest,
        vec![LogChunk {
            stream: LogStream::Stderr,
            bytes: b"b\n".to_vec()
        }]
    );
    assert_eq!(
        (outcome.stdout.as_str(), outcome.stderr.as_str()),
        ("a\n", "b\n")
    );
}

#[tokio::test]
async fn output_files_are_collected_and_links_skipped() {
    let Some((_docker, executor)) = setup(config()).await else {
        return;
    };
    let command = "sh -c 'echo one > /output/a.txt; mkdir /output/sub; \
                   echo two > /output/sub/b.txt; ln -s /bin/busybox /output/link'";
    let outcome = run(&executor, spec("outputs", command)).await;
    assert_eq!(outcome.status, RunStatus::Completed, "{outcome:?}");
    let mut files: Vec<(String, Vec<u8>)> = outcome
        .outputs
        .into_iter()
        .map(|f| (f.path, f.bytes))
        .collect();
    files.sort();
    assert_eq!(
        files,
        vec![
            ("a.txt".to_string(), b"one\n".to_vec()),
            ("sub/b.txt".to_string(), b"two\n".to_vec())
        ]
    );
    assert!(!outcome.outputs_truncated);
}

#[tokio::test]
async fn output_files_over_the_limit_are_left_out() {
    let Some((_docker, executor)) = setup(ExecutorConfig {
        output_limit_bytes: 1000,
        ..config()
    })
    .await
    else {
        return;
    };
    let command = "sh -c 'head -c 200000 /dev/zero > /output/big; echo s > /output/small'";
    let outcome = run(&executor, spec("outlimit", command)).await;
    let paths: Vec<&str> = outcome.outputs.iter().map(|f| f.path.as_str()).collect();
    assert_eq!(paths, vec!["small"]);
    assert!(outcome.outputs_truncated);
}

#[tokio::test]
async fn reconcile_finds_labelled_containers_collects_finished_and_stops_running() {
    let Some((docker, executor)) = setup(config()).await else {
        return;
    };
    // Containers left by a worker that died: made as run would, then never followed.
    let finished = spec("recfin", "sh -c 'echo left behind; exit 7'");
    let worker_id = finished.worker_id.clone();
    let mut running = spec("recrun", "sleep 300");
    running.worker_id = worker_id.clone();
    let mut created = spec("reczcreated", "true");
    created.worker_id = worker_id.clone();
    let mut ids = Vec::new();
    for spec in [&finished, &running, &created] {
        let cmd = shell_words::split(spec.command.as_deref().unwrap()).unwrap();
        let (id, _) = executor
            .create(spec, Some(cmd), &container_name(&spec.task_id))
            .await
            .unwrap();
        if spec.task_id != created.task_id {
            docker.start_container(&id, None).await.unwrap();
        }
        ids.push(id);
    }
    let mut wait = docker.wait_container(&ids[0], None);
    assert!(matches!(
        wait.next().await,
        Some(Err(DockerError::DockerContainerWaitError { code: 7, .. }))
    ));

    let mut found = executor.reconcile(&worker_id).await.unwrap();
    found.sort_by(|a, b| a.task_id.cmp(&b.task_id));
    assert_eq!(
        found,
        vec![
            ManagedContainer {
                container_id: ids[0].clone(),
                task_id: finished.task_id.clone(),
                state: ManagedState::Exited,
                exit_code: Some(7),
            },
            ManagedContainer {
                container_id: ids[1].clone(),
                task_id: running.task_id.clone(),
                state: ManagedState::Running,
                exit_code: None,
            },
            ManagedContainer {
                container_id: ids[2].clone(),
                task_id: created.task_id.clone(),
                state: ManagedState::Created,
                exit_code: None,
            },
        ]
    );
    assert!(executor.reconcile("w-nobody").await.unwrap().is_empty());

    for unfinished in &ids[1..] {
        let err = executor.collect(unfinished).await.unwrap_err();
        assert_eq!(err.code(), "container_not_finished");
    }
    let outcome = executor.collect(&ids[0]).await.unwrap();
    assert_eq!(outcome.status, RunStatus::Failed { exit_code: 7 });
    assert_eq!(outcome.stdout, "left behind\n");
    executor.stop_and_remove(&ids[1]).await.unwrap();
    executor.stop_and_remove(&ids[2]).await.unwrap();
    assert!(executor.reconcile(&worker_id).await.unwrap().is_empty());
    // Stopping and removing twice is fine.
    executor.stop_and_remove(&ids[1]).await.unwrap();
}

#[tokio::test]
async fn storage_detection_follows_the_engine_driver() {
    let Some((docker, executor)) = setup(config()).await else {
        return;
    };
    let info = docker.info().await.unwrap();
    eprintln!(
        "storage driver {:?} ({:?}): storage enforced = {}",
        info.driver,
        info.driver_status,
        executor.storage_enforced()
    );
    if info.driver.as_deref() == Some("overlay2")
        && !format!("{:?}", info.driver_status).contains("xfs")
    {
        assert!(!executor.storage_enforced());
    }
    // A storage request runs either way (reservation-only where not enforced).
    let mut spec = spec("storage", "true");
    spec.storage = 1.0;
    assert_eq!(run(&executor, spec).await.status, RunStatus::Completed);
}

#[test]
fn references_get_an_explicit_tag() {
    assert_eq!(
        split_reference("busybox"),
        ("busybox".into(), Some("latest".into()))
    );
    assert_eq!(
        split_reference("a/b:1.2"),
        ("a/b".into(), Some("1.2".into()))
    );
    assert_eq!(
        split_reference("localhost:5000/a/b"),
        ("localhost:5000/a/b".into(), Some("latest".into()))
    );
    assert_eq!(
        split_reference("localhost:5000/a:v1"),
        ("localhost:5000/a".into(), Some("v1".into()))
    );
    assert_eq!(split_reference("a@sha256:00"), ("a@sha256:00".into(), None));
}

#[test]
fn storage_opt_needs_a_driver_with_quotas() {
    assert!(!storage_opt_supported("overlay2", "extfs"));
    assert!(storage_opt_supported("overlay2", "xfs"));
    assert!(storage_opt_supported("btrfs", ""));
    assert!(!storage_opt_supported("vfs", ""));
}

#[test]
fn container_names_are_valid_and_unique() {
    let a = container_name("task/1 é");
    let b = container_name("task/1 é");
    assert_ne!(a, b);
    assert!(a.starts_with("cloudai-task_1__-"), "{a}");
    assert!(
        a.chars()
            .all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c))
    );
}

#[test]
fn a_task_becomes_a_run_spec_in_the_same_units() {
    let mut task = crate::model::Task::new_pending(
        "t1".into(),
        "u1".into(),
        "img:1".into(),
        crate::model::Resources::new(1.5, 0.5, 2.0, 1.25),
    );
    task.command = Some("echo hi".into());
    task.env.insert("K".into(), "V".into());
    task.timeout_s = Some(30);
    let spec = RunSpec::from_task(&task, "w1");
    assert_eq!(
        (
            spec.task_id.as_str(),
            spec.worker_id.as_str(),
            spec.image.as_str()
        ),
        ("t1", "w1", "img:1")
    );
    assert_eq!(spec.command.as_deref(), Some("echo hi"));
    assert_eq!((spec.cpu, spec.memory, spec.storage), (1.5, 0.5, 2.0));
    // A fraction of a GPU still needs a whole device.
    assert_eq!(spec.gpu, GpuRequest::Count(2));
    assert_eq!(spec.timeout, Some(Duration::from_secs(30)));
    assert_eq!(spec.env, task.env);
    task.req_gpu = 0.0;
    assert_eq!(RunSpec::from_task(&task, "w1").gpu, GpuRequest::None);
}
