//! Prometheus metrics (`GET /metrics`): the process-wide instruments, the one-line recording
//! helpers the rest of the host calls, and the text exposition.
//!
//! Counters and histograms count what THIS process did (its API requests, its scheduler's
//! rounds, its policy calls, its reconciler's repairs, its local worker's container starts),
//! so each host replica is scraped on its own and Prometheus sums across them. The cluster
//! gauges (tasks and workers by state, capacity) are read from the store at scrape time
//! ([`cluster::ClusterSample`]), so every replica reports the same cluster. A remote
//! `cloudai worker` process serves no `/metrics`: only the local worker's container starts
//! are seen.
//!
//! Names follow Prometheus conventions: `cloudai_` prefix, base units (seconds, bytes),
//! `_total` on counters. Label values are bounded: routes are axum's templates, never raw
//! paths; policy labels are the stored (name, version) pairs.

use std::fmt::Write as _;
use std::sync::LazyLock;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};

use crate::model::{BYTES_PER_GB, PolicyKind, TaskStatus};

pub mod cluster;

pub use cluster::{ClusterSample, SampleCache, WorkerCounts};

/// The content type of [`encode`]'s output: the Prometheus text format 0.0.4.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    method: &'static str,
    route: String,
    status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabels {
    method: &'static str,
    route: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PolicyLabels {
    kind: &'static str,
    policy: String,
    version: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PolicyErrorLabels {
    kind: &'static str,
    policy: String,
    version: String,
    error: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabel {
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SourceLabel {
    source: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabel {
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabel {
    state: &'static str,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

fn latency_buckets() -> Histogram {
    // 1 ms .. ~33 s.
    Histogram::new(exponential_buckets(0.001, 2.0, 16))
}

fn policy_buckets() -> Histogram {
    // 50 µs .. ~1.6 s: a guest's deadline is tens of ms.
    Histogram::new(exponential_buckets(0.000_05, 2.0, 16))
}

/// The instruments of this process.
struct Instruments {
    registry: Registry,
    api_requests: Family<RequestLabels, Counter>,
    api_duration: HistogramFamily<RouteLabels>,
    round_duration: Histogram,
    round_batch: Histogram,
    placements: Counter,
    waits: Counter,
    unschedulable: Counter,
    lost_races: Counter,
    preemptions: Counter,
    policy_duration: HistogramFamily<PolicyLabels>,
    policy_fallbacks: Family<PolicyLabels, Counter>,
    policy_failures: Family<PolicyErrorLabels, Counter>,
    policy_deactivations: Family<PolicyLabels, Counter>,
    repairs: Family<KindLabel, Counter>,
    container_start: Histogram,
    log_bytes: Family<SourceLabel, Counter>,
    output_bytes: Counter,
    events: Family<OutcomeLabel, Counter>,
    event_client_lags: Counter,
}

static INSTRUMENTS: LazyLock<Instruments> = LazyLock::new(Instruments::new);

impl Instruments {
    fn new() -> Self {
        let i = Instruments {
            registry: Registry::with_prefix("cloudai"),
            api_requests: Family::default(),
            api_duration: Family::new_with_constructor(latency_buckets),
            round_duration: latency_buckets(),
            round_batch: Histogram::new(exponential_buckets(1.0, 2.0, 12)),
            placements: Counter::default(),
            waits: Counter::default(),
            unschedulable: Counter::default(),
            lost_races: Counter::default(),
            preemptions: Counter::default(),
            policy_duration: Family::new_with_constructor(policy_buckets),
            policy_fallbacks: Family::default(),
            policy_failures: Family::default(),
            policy_deactivations: Family::default(),
            repairs: Family::default(),
            // 10 ms .. ~82 s: creating and starting a container, the image already pulled.
            container_start: Histogram::new(exponential_buckets(0.01, 2.0, 14)),
            log_bytes: Family::default(),
            output_bytes: Counter::default(),
            events: Family::default(),
            event_client_lags: Counter::default(),
        };
        let mut r = i.registry;
        let seconds = || Unit::Seconds;
        r.register(
            "api_requests",
            "HTTP API requests by method, route template and status code",
            i.api_requests.clone(),
        );
        r.register_with_unit(
            "api_request_duration",
            "HTTP API request latency (to the response head) by method and route template",
            seconds(),
            i.api_duration.clone(),
        );
        r.register_with_unit(
            "scheduler_round_duration",
            "Latency of placement rounds that had tasks to place",
            seconds(),
            i.round_duration.clone(),
        );
        r.register(
            "scheduler_round_batch_size",
            "Tasks in the batch of each placement round that had tasks to place",
            i.round_batch.clone(),
        );
        r.register(
            "scheduler_placements",
            "Tasks placed on a worker (assignment written, task running)",
            i.placements.clone(),
        );
        r.register(
            "scheduler_waits",
            "Placement decisions that left a task queued with a reason",
            i.waits.clone(),
        );
        r.register(
            "scheduler_unschedulable",
            "Tasks failed as unschedulable (no registered worker could ever hold them)",
            i.unschedulable.clone(),
        );
        r.register(
            "scheduler_lost_races",
            "Placements given up because another replica or a change got there first (re-planned)",
            i.lost_races.clone(),
        );
        r.register(
            "scheduler_preemptions",
            "Running tasks asked to stop by a preempting placement policy, to make room for a task of a higher priority",
            i.preemptions.clone(),
        );
        r.register_with_unit(
            "policy_call_duration",
            "Latency of placement rounds and admission checks by the deciding policy (native: the built-in)",
            seconds(),
            i.policy_duration.clone(),
        );
        r.register(
            "policy_fallbacks",
            "Decisions taken by the fallback because the active policy failed",
            i.policy_fallbacks.clone(),
        );
        r.register(
            "policy_failures",
            "Failed evaluations of an active policy, by kind of error",
            i.policy_failures.clone(),
        );
        r.register(
            "policy_deactivations",
            "Policy versions deactivated after repeated failures",
            i.policy_deactivations.clone(),
        );
        r.register(
            "reconciler_repairs",
            "Repairs made by the reconciler, by kind",
            i.repairs.clone(),
        );
        r.register_with_unit(
            "container_start_duration",
            "Time to create and start a task's container on this process's local worker (image already pulled)",
            seconds(),
            i.container_start.clone(),
        );
        r.register_with_unit(
            "log_stored",
            "Bytes of task output logs stored by this replica (live chunks, and the final stdout + stderr of results)",
            Unit::Bytes,
            i.log_bytes.clone(),
        );
        r.register_with_unit(
            "output_files_stored",
            "Bytes of task output files stored by this replica",
            Unit::Bytes,
            i.output_bytes.clone(),
        );
        r.register(
            "events_recorded",
            "Events this replica wrote for the event stream, by outcome (lost: the write failed, the events never reach /v1/events)",
            i.events.clone(),
        );
        r.register(
            "event_stream_client_lags",
            "Times a /v1/events client of this replica fell behind the live fan-out and re-read what it missed from the store",
            i.event_client_lags.clone(),
        );
        Instruments { registry: r, ..i }
    }
}

fn method_label(method: &str) -> &'static str {
    // A fixed set: a client inventing methods cannot grow the label space.
    const KNOWN: [&str; 7] = ["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"];
    KNOWN
        .into_iter()
        .find(|known| *known == method)
        .unwrap_or("other")
}

/// One API request (`method` as sent: `GET`, `POST`, ...): `route` is the matched route template (`None`: no route matched).
pub fn api_request(method: &str, route: Option<&str>, status: u16, elapsed: Duration) {
    let i = &*INSTRUMENTS;
    let method = method_label(method);
    let route = route.unwrap_or("unmatched").to_string();
    i.api_duration
        .get_or_create(&RouteLabels {
            method,
            route: route.clone(),
        })
        .observe(elapsed.as_secs_f64());
    i.api_requests
        .get_or_create(&RequestLabels {
            method,
            route,
            status,
        })
        .inc();
}

/// What one placement round did, in numbers (the metrics take plain values: they depend on
/// no module whose work they count).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RoundFigures {
    /// Tasks in the batch.
    pub batch: usize,
    pub placed: usize,
    pub waited: usize,
    pub unschedulable: usize,
    /// Lost races, re-planned next round.
    pub lost: usize,
    /// Running tasks asked to stop to make room for a task of a higher priority.
    pub preempted: usize,
}

/// One placement round that had tasks to place.
pub fn scheduling_round(round: &RoundFigures, elapsed: Duration) {
    let i = &*INSTRUMENTS;
    i.round_duration.observe(elapsed.as_secs_f64());
    i.round_batch.observe(round.batch as f64);
    i.placements.inc_by(round.placed as u64);
    i.waits.inc_by(round.waited as u64);
    i.unschedulable.inc_by(round.unschedulable as u64);
    i.lost_races.inc_by(round.lost as u64);
    i.preemptions.inc_by(round.preempted as u64);
}

fn policy_labels(kind: &'static str, policy: &str, version: &str) -> PolicyLabels {
    PolicyLabels {
        kind,
        policy: policy.to_string(),
        version: version.to_string(),
    }
}

/// One protected policy call of `kind` (`placement`, `admission`), decided by the policy
/// `policy`/`version` (`native`/`builtin` for the built-in one); `fallback` when the active
/// policy failed and the built-in one decided instead.
pub fn policy_call(
    kind: &'static str,
    policy: &str,
    version: &str,
    fallback: bool,
    elapsed: Duration,
) {
    let i = &*INSTRUMENTS;
    let labels = policy_labels(kind, policy, version);
    if fallback {
        i.policy_fallbacks.get_or_create(&labels).inc();
    }
    i.policy_duration
        .get_or_create(&labels)
        .observe(elapsed.as_secs_f64());
}

/// A failed evaluation of the active version `name`/`version`, by the kind of `error`
/// (`trap`, `timeout`, `memory_limit`, `invalid_answer`, `config_rejected`, `host`).
pub fn policy_failure(kind: &'static str, name: &str, version: &str, error: &'static str) {
    INSTRUMENTS
        .policy_failures
        .get_or_create(&PolicyErrorLabels {
            kind,
            policy: name.to_string(),
            version: version.to_string(),
            error,
        })
        .inc();
}

/// A version deactivated after repeated failures.
pub fn policy_deactivated(kind: &'static str, name: &str, version: &str) {
    INSTRUMENTS
        .policy_deactivations
        .get_or_create(&policy_labels(kind, name, version))
        .inc();
}

/// The policy runtime's failures and deactivations, counted here
/// ([`PolicyRuntime::with_observer`](cloudai_policy::PolicyRuntime::with_observer): the runtime's
/// crate, not the host's `policy` module, which publishes events).
pub struct PolicyMetrics;

impl cloudai_policy::RuntimeObserver for PolicyMetrics {
    fn failed(&self, kind: PolicyKind, name: &str, version: &str, error: &'static str) {
        policy_failure(kind.as_str(), name, version, error);
    }

    fn deactivated(&self, kind: PolicyKind, name: &str, version: &str) {
        policy_deactivated(kind.as_str(), name, version);
    }
}

/// What one reconciler pass (or a returning worker's heartbeat) repaired: a count per kind
/// of repair, every kind named (at zero if need be).
pub fn reconciler_repairs(repairs: &[(&'static str, u64)]) {
    let family = &INSTRUMENTS.repairs;
    for &(kind, n) in repairs {
        // Every kind is created, at zero if need be, so that `rate()` sees it from the start.
        family.get_or_create(&KindLabel { kind }).inc_by(n);
    }
}

/// A task's container was created and started in `elapsed`.
pub fn container_started(elapsed: Duration) {
    INSTRUMENTS.container_start.observe(elapsed.as_secs_f64());
}

fn log_stored(source: &'static str, bytes: usize) {
    INSTRUMENTS
        .log_bytes
        .get_or_create(&SourceLabel { source })
        .inc_by(bytes as u64);
}

/// A chunk of live output stored.
pub fn live_log_stored(bytes: usize) {
    log_stored("live", bytes);
}

/// A result's final stdout and stderr stored.
pub fn result_log_stored(bytes: usize) {
    log_stored("result", bytes);
}

/// An output file stored.
pub fn output_file_stored(bytes: u64) {
    INSTRUMENTS.output_bytes.inc_by(bytes);
}

/// One write of `count` events for the event stream, `recorded` or lost (the write failed).
pub fn events_written(count: usize, recorded: bool) {
    let outcome = if recorded { "recorded" } else { "lost" };
    for series in ["recorded", "lost"] {
        // Both series exist from the first write, so that `rate()` sees a loss from its start.
        let n = if series == outcome { count as u64 } else { 0 };
        INSTRUMENTS
            .events
            .get_or_create(&OutcomeLabel { outcome: series })
            .inc_by(n);
    }
}

/// An event stream client fell behind the live fan-out (it reads the missed events from the
/// store: nothing is lost, but a client this slow is worth knowing about).
pub fn event_client_lagged() {
    INSTRUMENTS.event_client_lags.inc();
}

/// Lags counted so far in this process (test support: the host's tests of the event stream).
#[cfg(feature = "test-support")]
pub fn event_client_lags() -> u64 {
    INSTRUMENTS.event_client_lags.get()
}

/// The whole exposition: this process's instruments, then the cluster gauges of `cluster`.
pub fn encode(cluster: &ClusterSample) -> Result<String, std::fmt::Error> {
    let mut out = String::new();
    prometheus_client::encoding::prometheus_text::encode(&mut out, &INSTRUMENTS.registry)?;
    prometheus_client::encoding::prometheus_text::encode(&mut out, &cluster_registry(cluster))?;
    if !out.ends_with('\n') {
        out.write_char('\n')?;
    }
    Ok(out)
}

/// The cluster gauges, set from one store sample: a registry of its own per scrape, so that
/// two hosts of one process (tests) never mix their clusters.
fn cluster_registry(sample: &ClusterSample) -> Registry {
    let mut r = Registry::with_prefix("cloudai");
    let tasks = Family::<StateLabel, Gauge>::default();
    for status in TaskStatus::ALL {
        tasks
            .get_or_create(&StateLabel {
                state: status.as_str(),
            })
            .set(saturating_i64(sample.tasks.get(status)));
    }
    r.register("tasks", "Tasks in the store by state", tasks);
    let depth = Gauge::<i64>::default();
    depth.set(saturating_i64(sample.tasks.queue_depth()));
    r.register(
        "queue_depth",
        "Tasks waiting to run (pending + queued)",
        depth,
    );
    let workers = Family::<StateLabel, Gauge>::default();
    for (state, n) in [
        ("active", sample.workers.active),
        ("draining", sample.workers.draining),
        ("lost", sample.workers.lost),
    ] {
        workers
            .get_or_create(&StateLabel { state })
            .set(saturating_i64(n));
    }
    r.register(
        "workers",
        "Registered workers by state (active: taking tasks; draining; lost: no heartbeat)",
        workers,
    );
    for (prefix, what, amounts) in [
        ("capacity", "total", sample.capacity),
        (
            "allocated",
            "allocated (reserved by tasks)",
            sample.allocated,
        ),
    ] {
        for (unit, value) in [
            ("cpu_cores", amounts.cpu),
            ("memory_bytes", amounts.memory * BYTES_PER_GB),
            ("storage_bytes", amounts.storage * BYTES_PER_GB),
            ("gpus", amounts.gpu),
        ] {
            let gauge = Gauge::<f64, AtomicU64>::default();
            gauge.set(value);
            r.register(
                format!("{prefix}_{unit}"),
                format!("Sum of the active workers' {what} {unit}"),
                gauge,
            );
        }
    }
    let placements = Gauge::<i64>::default();
    placements.set(saturating_i64(sample.placements_last_minute));
    r.register(
        "placements_last_minute",
        "Assignments made by any replica in the last 60 s",
        placements,
    );
    r
}

fn saturating_i64(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::metrics::cluster::WorkerCounts;
    use crate::model::Resources;
    use crate::store::TaskCounts;

    fn sample() -> ClusterSample {
        ClusterSample {
            tasks: TaskCounts {
                pending: 2,
                queued: 3,
                running: 1,
                ..TaskCounts::default()
            },
            workers: WorkerCounts {
                total: 3,
                active: 1,
                draining: 1,
                lost: 1,
            },
            capacity: Resources::new(4.0, 2.0, 1.0, 1.0),
            allocated: Resources::new(1.0, 0.5, 0.0, 0.0),
            placements_last_minute: 7,
            placement_policy: None,
            admission_policy: None,
            generated_at: crate::model::now(),
        }
    }

    /// The value of the sample line `series` (name and labels, as printed).
    fn value(text: &str, series: &str) -> Option<f64> {
        text.lines()
            .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
            .map(|v| v.parse().unwrap())
    }

    #[test]
    fn a_failing_policy_is_counted_by_name_version_and_error() {
        // A name of its own: the instruments are process-wide and tests run side by side.
        let (name, version) = ("metrics-unit-trap", "2");
        let error = crate::policy::PolicyError::Trap("unreachable".into()).metric_label();
        let source = crate::policy::PolicySource::Fallback {
            name: name.into(),
            version: version.into(),
            reason: "trapped".into(),
        };
        // As the runtime tells its observer, and the scheduler counts a call.
        let observer: &dyn crate::policy::RuntimeObserver = &PolicyMetrics;
        for _ in 0..3 {
            observer.failed(PolicyKind::Placement, name, version, error);
            let (policy, policy_version, fallback) = source.metric_labels();
            policy_call(
                "placement",
                policy,
                policy_version,
                fallback,
                Duration::from_millis(2),
            );
        }
        observer.deactivated(PolicyKind::Placement, name, version);
        let text = encode(&sample()).unwrap();
        let labels = format!("{{kind=\"placement\",policy=\"{name}\",version=\"{version}\"}}");
        assert_eq!(
            value(&text, &format!("cloudai_policy_fallbacks_total{labels}")),
            Some(3.0),
            "{text}"
        );
        assert_eq!(
            value(
                &text,
                &format!(
                    "cloudai_policy_failures_total{{kind=\"placement\",policy=\"{name}\",version=\"{version}\",error=\"trap\"}}"
                )
            ),
            Some(3.0)
        );
        assert_eq!(
            value(
                &text,
                &format!("cloudai_policy_deactivations_total{labels}")
            ),
            Some(1.0)
        );
        assert_eq!(
            value(
                &text,
                &format!("cloudai_policy_call_duration_seconds_count{labels}")
            ),
            Some(3.0)
        );
    }

    #[test]
    fn cluster_gauges_are_in_base_units() {
        let text = encode(&sample()).unwrap();
        assert_eq!(value(&text, "cloudai_queue_depth"), Some(5.0));
        assert_eq!(value(&text, "cloudai_tasks{state=\"queued\"}"), Some(3.0));
        assert_eq!(value(&text, "cloudai_workers{state=\"lost\"}"), Some(1.0));
        assert_eq!(
            value(&text, "cloudai_capacity_memory_bytes"),
            Some(2.0 * BYTES_PER_GB)
        );
        assert_eq!(
            value(&text, "cloudai_allocated_memory_bytes"),
            Some(0.5 * BYTES_PER_GB)
        );
        assert_eq!(value(&text, "cloudai_placements_last_minute"), Some(7.0));
    }

    #[test]
    fn repairs_container_starts_and_lost_events_are_counted() {
        let before = encode(&sample()).unwrap();
        let series = "cloudai_reconciler_repairs_total{kind=\"drift_repaired\"}";
        let count = "cloudai_container_start_duration_seconds_count";
        let repairs = crate::reconciler::Repairs {
            drift_repaired: 2,
            ..crate::reconciler::Repairs::default()
        };
        reconciler_repairs(&repairs.by_kind());
        container_started(Duration::from_millis(300));
        events_written(3, false);
        let after = encode(&sample()).unwrap();
        let grew =
            |series: &str| value(&after, series).unwrap() - value(&before, series).unwrap_or(0.0);
        // At least: other tests of this process may count too.
        assert!(grew(series) >= 2.0, "{after}");
        assert!(grew(count) >= 1.0, "{after}");
        assert!(
            grew("cloudai_events_recorded_total{outcome=\"lost\"}") >= 3.0,
            "{after}"
        );
    }
}
