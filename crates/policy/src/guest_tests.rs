//! Tests of the runtime against real guest components built by `scripts/build-policies.sh`
//! into `$CLOUDAI_POLICY_WASM_DIR` (skipped, with a message, when it is unset; a failure when
//! `CI` is set), plus the runtime's behaviour with no guest at all.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Duration;

use super::native::tests::{random_round, round};
use super::*;
use crate::AdmissionDecision;
use crate::bindings::types::{AdmissionTask, Resources, UserUsage};
use crate::testing::{guest, wasm_dir};

fn runtime() -> PolicyRuntime {
    PolicyRuntime::new(
        PolicyEngine::new(EngineSettings::default()).unwrap(),
        RuntimeSettings::default(),
    )
}

/// What a runtime told its observer, one line per call.
#[derive(Default)]
struct Told(std::sync::Mutex<Vec<String>>);

impl RuntimeObserver for Told {
    fn failed(&self, kind: PolicyKind, name: &str, version: &str, error: &'static str) {
        let line = format!("failed {} {name} {version} {error}", kind.as_str());
        self.0.lock().unwrap().push(line);
    }

    fn deactivated(&self, kind: PolicyKind, name: &str, version: &str) {
        let line = format!("deactivated {} {name} {version}", kind.as_str());
        self.0.lock().unwrap().push(line);
    }
}

/// Loads a hostile fixture: it fails the smoke check by design.
fn load_fixture(rt: &PolicyRuntime, dir: &std::path::Path, fixture: &str, limits: PolicyLimits) {
    rt.load_with(
        fixture,
        "1",
        &guest(dir, fixture),
        "{}",
        LoadOptions {
            limits: Some(limits),
            smoke_check: false,
        },
    )
    .unwrap();
    rt.activate(fixture, "1").unwrap();
}

/// Same kind of decision and, for assignments, the same worker (reasons are worded freely).
fn same_choice(a: &Decision, b: &Decision) -> bool {
    match (a, b) {
        (Decision::Assign { worker: x }, Decision::Assign { worker: y }) => x == y,
        (Decision::Wait { .. }, Decision::Wait { .. }) => true,
        (Decision::Unschedulable { .. }, Decision::Unschedulable { .. }) => true,
        _ => false,
    }
}

fn fallback_reason(outcome: &PlacementOutcome) -> &str {
    match &outcome.source {
        PolicySource::Fallback { reason, .. } => reason,
        other => panic!("expected a fallback, got {other:?}"),
    }
}

/// A big idle worker first, a small idle one second: first-fit takes the first, best-fit
/// the second.
fn first_fit_vs_best_fit() -> PlacementInput {
    round(
        &[
            ([16.0, 64.0, 100.0, 0.0], [16.0, 64.0, 100.0, 0.0]),
            ([2.0, 4.0, 100.0, 0.0], [2.0, 4.0, 100.0, 0.0]),
        ],
        &[[1.0, 1.0, 1.0, 0.0]],
    )
}

#[test]
fn with_no_policy_active_the_native_best_fit_decides_and_admission_accepts() {
    let rt = runtime();
    let input = random_round(3, 50, 20);
    let outcome = rt.place(&input);
    assert_eq!(outcome.source, PolicySource::Native);
    assert_eq!(outcome.decisions, native::best_fit(&input));
    let task = AdmissionTask {
        id: "t".into(),
        user: "u".into(),
        image: "i".into(),
        request: Resources {
            cpu: 1.0,
            memory: 1.0,
            storage: 1.0,
            gpu: 0.0,
        },
        priority: 0,
        labels: vec![],
        attempts: 0,
        age_s: 0.0,
    };
    let usage = UserUsage {
        running_tasks: 0,
        queued_tasks: 0,
        pending_tasks: 0,
        reserved: task.request,
    };
    let admitted = rt.admit(&task, &usage);
    assert_eq!(admitted.decision, AdmissionDecision::Accept);
    assert_eq!(admitted.source, PolicySource::Native);
    assert!(matches!(
        rt.activate("nope", "1"),
        Err(PolicyError::NotFound { .. })
    ));
}

#[test]
fn bad_uploads_are_refused_with_a_clear_reason_and_nothing_is_kept() {
    let rt = runtime();
    let err = rt.load("junk", "1", b"not wasm at all", "{}").unwrap_err();
    assert!(matches!(err, PolicyError::Compile(_)), "{err}");
    // A core module is not a component.
    let err = rt.load("core", "1", b"\0asm\x01\0\0\0", "{}").unwrap_err();
    assert!(matches!(err, PolicyError::Compile(_)), "{err}");
    // An empty component implements no world.
    let err = rt
        .load("empty", "1", b"\0asm\x0d\0\x01\0", "{}")
        .unwrap_err();
    assert!(matches!(err, PolicyError::WrongWorld(_)), "{err}");
    assert!(
        err.to_string().contains("neither `place` nor `admit`"),
        "{err}"
    );
    assert!(rt.versions().is_empty());

    let Some(dir) = wasm_dir() else { return };
    let best_fit = guest(&dir, "best-fit");
    let err = rt
        .load("best-fit", "1", &best_fit, "{not json")
        .unwrap_err();
    assert!(matches!(err, PolicyError::ConfigRejected(_)), "{err}");
    // A guest that never answers fails its smoke decision at the deadline.
    let err = rt
        .load("loop", "1", &guest(&dir, "fixture-infinite-loop"), "{}")
        .unwrap_err();
    assert!(
        matches!(&err, PolicyError::SmokeFailed(inner) if matches!(**inner, PolicyError::Timeout(_))),
        "{err}"
    );
    let err = rt
        .load("bad", "1", &guest(&dir, "fixture-bad-index"), "{}")
        .unwrap_err();
    assert!(
        matches!(&err, PolicyError::SmokeFailed(inner) if matches!(**inner, PolicyError::InvalidAnswer(_))),
        "{err}"
    );
    assert!(rt.versions().is_empty());

    assert_eq!(
        rt.load("best-fit", "1", &best_fit, "").unwrap(),
        PolicyKind::Placement
    );
    let err = rt.load("best-fit", "1", &best_fit, "{}").unwrap_err();
    assert!(matches!(err, PolicyError::AlreadyLoaded { .. }), "{err}");
    // Refused components are not kept compiled; the same bytes under another version are
    // compiled once.
    assert_eq!(rt.engine().cached_components(), 1);
    rt.load("best-fit", "2", &best_fit, "{}").unwrap();
    assert_eq!(rt.engine().cached_components(), 1);
    assert_eq!(rt.versions().len(), 2);
}

#[test]
fn best_fit_guest_decides_placement_like_the_native_best_fit() {
    let Some(dir) = wasm_dir() else { return };
    let rt = runtime();
    // A generous deadline: this compares decisions, and a round that overran 50 ms on a busy
    // machine would fall back to the native best-fit and fail the comparison of sources.
    let options = LoadOptions {
        limits: Some(PolicyLimits {
            deadline: Duration::from_secs(1),
            ..PolicyLimits::default()
        }),
        smoke_check: true,
    };
    rt.load_with("best-fit", "1.0.0", &guest(&dir, "best-fit"), "{}", options)
        .unwrap();
    rt.activate("best-fit", "1.0.0").unwrap();
    assert_eq!(
        rt.active(PolicyKind::Placement),
        Some(("best-fit".into(), "1.0.0".into()))
    );
    for seed in 0..30 {
        let (workers, tasks) = [(1, 1), (10, 5), (100, 40), (300, 100)][seed as usize % 4];
        let input = random_round(seed, workers, tasks);
        let outcome = rt.place(&input);
        assert_eq!(
            outcome.source,
            PolicySource::Wasm {
                name: "best-fit".into(),
                version: "1.0.0".into()
            }
        );
        let native = native::best_fit(&input);
        assert_eq!(outcome.decisions.len(), native.len());
        for (j, (w, n)) in outcome.decisions.iter().zip(&native).enumerate() {
            assert!(
                same_choice(w, n),
                "seed {seed}, task {j}: wasm {w:?}, native {n:?}"
            );
        }
    }
}

#[test]
fn swapping_the_active_policy_changes_decisions_with_no_restart() {
    let Some(dir) = wasm_dir() else { return };
    let rt = Arc::new(runtime());
    // A generous deadline: this is about swaps, and a round that overran 50 ms on a busy
    // machine would fall back and be reported as a mixed decision.
    for name in ["best-fit", "first-fit"] {
        let options = LoadOptions {
            limits: Some(PolicyLimits {
                deadline: Duration::from_secs(1),
                ..PolicyLimits::default()
            }),
            smoke_check: true,
        };
        rt.load_with(name, "1", &guest(&dir, name), "{}", options)
            .unwrap();
    }
    let input = first_fit_vs_best_fit();
    rt.activate("best-fit", "1").unwrap();
    assert_eq!(
        rt.place(&input).decisions,
        vec![Decision::Assign { worker: 1 }]
    );
    rt.activate("first-fit", "1").unwrap();
    assert_eq!(
        rt.place(&input).decisions,
        vec![Decision::Assign { worker: 0 }]
    );

    // Swap repeatedly while rounds run: every round is decided wholly by the version it
    // started with, never by a mix, and never falls back.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let swapper = {
        let (rt, stop) = (rt.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut n = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let name = if n % 2 == 0 { "best-fit" } else { "first-fit" };
                rt.activate(name, "1").unwrap();
                n += 1;
                std::thread::sleep(Duration::from_micros(200));
            }
            n
        })
    };
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..200 {
        let outcome = rt.place(&input);
        let PolicySource::Wasm { name, .. } = &outcome.source else {
            panic!("unexpected source {:?}", outcome.source)
        };
        let expected = if name == "best-fit" { 1 } else { 0 };
        assert_eq!(
            outcome.decisions,
            vec![Decision::Assign { worker: expected }],
            "{name}"
        );
        seen.insert(name.clone());
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let swaps = swapper.join().unwrap();
    assert!(swaps > 1);
    assert_eq!(seen.len(), 2, "both versions decided some rounds: {seen:?}");
}

#[test]
fn an_infinite_loop_is_cut_off_at_the_deadline_and_the_native_best_fit_decides() {
    let Some(dir) = wasm_dir() else { return };
    let rt = runtime();
    let deadline = Duration::from_millis(50);
    load_fixture(
        &rt,
        &dir,
        "fixture-infinite-loop",
        PolicyLimits {
            deadline,
            memory_bytes: 64 << 20,
        },
    );
    let input = random_round(11, 100, 10);
    let outcome = rt.place(&input);
    assert!(
        fallback_reason(&outcome).contains("deadline"),
        "{:?}",
        outcome.source
    );
    assert_eq!(outcome.decisions, native::best_fit(&input));
    // Generous margin: debug build, two busy cores; the point is "cut off", not "ran 10 s".
    assert!(
        outcome.elapsed < deadline + Duration::from_millis(150),
        "took {:?}",
        outcome.elapsed
    );
    assert!(
        outcome.elapsed >= deadline - Duration::from_millis(5),
        "took {:?}",
        outcome.elapsed
    );
}

#[test]
fn unbounded_allocation_is_stopped_by_the_memory_limit_and_the_native_best_fit_decides() {
    let Some(dir) = wasm_dir() else { return };
    let rt = runtime();
    load_fixture(
        &rt,
        &dir,
        "fixture-unbounded-alloc",
        PolicyLimits {
            deadline: Duration::from_secs(5),
            memory_bytes: 16 << 20,
        },
    );
    let input = random_round(12, 20, 5);
    let outcome = rt.place(&input);
    assert!(
        fallback_reason(&outcome).contains("memory limit of 16777216 bytes"),
        "{:?}",
        outcome.source
    );
    assert_eq!(outcome.decisions, native::best_fit(&input));
    assert!(
        outcome.elapsed < Duration::from_secs(2),
        "took {:?}",
        outcome.elapsed
    );
}

#[test]
fn an_out_of_range_worker_index_is_refused_and_the_native_best_fit_decides() {
    let Some(dir) = wasm_dir() else { return };
    let rt = runtime();
    load_fixture(&rt, &dir, "fixture-bad-index", PolicyLimits::default());
    let input = random_round(13, 10, 4);
    let outcome = rt.place(&input);
    let reason = fallback_reason(&outcome);
    assert!(
        reason.contains("invalid answer") && reason.contains("there are 10 workers"),
        "{reason}"
    );
    assert_eq!(outcome.decisions, native::best_fit(&input));
}

#[test]
fn a_trapping_policy_is_contained_and_the_native_best_fit_decides() {
    let Some(dir) = wasm_dir() else { return };
    let rt = runtime();
    load_fixture(&rt, &dir, "fixture-trap", PolicyLimits::default());
    let input = random_round(14, 10, 4);
    let outcome = rt.place(&input);
    assert!(
        fallback_reason(&outcome).contains("trapped"),
        "{:?}",
        outcome.source
    );
    assert_eq!(outcome.decisions, native::best_fit(&input));
    // The next round gets a fresh instance and the same treatment.
    assert!(fallback_reason(&rt.place(&input)).contains("trapped"));
}

#[test]
fn three_consecutive_failures_deactivate_the_version_and_restore_the_previous_good_one() {
    let Some(dir) = wasm_dir() else { return };
    let told = Arc::new(Told::default());
    let rt = runtime().with_observer(told.clone());
    rt.load("packer", "1", &guest(&dir, "best-fit"), "{}")
        .unwrap();
    rt.activate("packer", "1").unwrap();
    // Version 2 passes no smoke check: it traps on every round.
    rt.load_with(
        "packer",
        "2",
        &guest(&dir, "fixture-trap"),
        "{}",
        LoadOptions {
            limits: None,
            smoke_check: false,
        },
    )
    .unwrap();
    rt.activate("packer", "2").unwrap();
    let input = random_round(15, 10, 4);
    for round in 1..=2 {
        let outcome = rt.place(&input);
        assert!(
            matches!(outcome.source, PolicySource::Fallback { .. }),
            "round {round}"
        );
        assert_eq!(
            rt.active(PolicyKind::Placement),
            Some(("packer".into(), "2".into()))
        );
    }
    let third = rt.place(&input);
    assert!(matches!(third.source, PolicySource::Fallback { .. }));
    assert_eq!(
        rt.active(PolicyKind::Placement),
        Some(("packer".into(), "1".into()))
    );
    let after = rt.place(&input);
    assert_eq!(
        after.source,
        PolicySource::Wasm {
            name: "packer".into(),
            version: "1".into()
        }
    );
    let v2 = rt
        .versions()
        .into_iter()
        .find(|v| v.version == "2")
        .unwrap();
    assert!(v2.deactivated && !v2.active);
    assert_eq!(v2.total_failures, 3);
    // Its observer (the host's metrics) was told of each failure and of the deactivation.
    assert_eq!(
        *told.0.lock().unwrap(),
        [
            "failed placement packer 2 trap",
            "failed placement packer 2 trap",
            "failed placement packer 2 trap",
            "deactivated placement packer 2",
        ]
    );
    assert!(matches!(
        rt.activate("packer", "2"),
        Err(PolicyError::Deactivated { .. })
    ));

    // With no earlier version to restore, the native best-fit takes over.
    let rt = runtime();
    load_fixture(&rt, &dir, "fixture-trap", PolicyLimits::default());
    for _ in 0..3 {
        rt.place(&input);
    }
    assert_eq!(rt.active(PolicyKind::Placement), None);
    assert_eq!(rt.place(&input).source, PolicySource::Native);
}

#[test]
fn a_success_resets_the_failure_count_and_a_dry_run_counts_nothing() {
    let Some(dir) = wasm_dir() else { return };
    let rt = runtime();
    load_fixture(&rt, &dir, "fixture-bad-index", PolicyLimits::default());
    // A round with no tasks is answered validly even by this fixture.
    let empty = random_round(16, 10, 0);
    let input = random_round(16, 10, 3);
    for _ in 0..10 {
        assert!(matches!(
            rt.place(&input).source,
            PolicySource::Fallback { .. }
        ));
        assert!(matches!(
            rt.place(&input).source,
            PolicySource::Fallback { .. }
        ));
        assert!(matches!(rt.place(&empty).source, PolicySource::Wasm { .. }));
    }
    assert!(rt.active(PolicyKind::Placement).is_some());
    for _ in 0..5 {
        assert!(rt.place_with("fixture-bad-index", "1", &input).is_err());
    }
    assert!(rt.active(PolicyKind::Placement).is_some());
}

/// A guest's panic message goes to WASI stderr, whose synchronous shim blocks on the current
/// Tokio runtime: `place` must survive being called from async code of either runtime flavor.
async fn trap_inside_a_runtime() {
    let Some(dir) = wasm_dir() else { return };
    let rt = runtime();
    load_fixture(&rt, &dir, "fixture-trap", PolicyLimits::default());
    let input = random_round(17, 10, 4);
    let outcome = rt.place(&input);
    assert!(
        fallback_reason(&outcome).contains("trapped"),
        "{:?}",
        outcome.source
    );
    assert_eq!(outcome.decisions, native::best_fit(&input));
}

#[tokio::test(flavor = "current_thread")]
async fn place_is_safe_on_a_current_thread_runtime() {
    trap_inside_a_runtime().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn place_is_safe_on_a_multi_thread_runtime_worker() {
    trap_inside_a_runtime().await;
}

#[test]
fn a_restarted_engine_loads_the_compiled_policy_from_the_disk_cache() {
    let Some(dir) = wasm_dir() else { return };
    let cache = tempfile::tempdir().unwrap();
    let settings = EngineSettings {
        cache_dir: Some(cache.path().join("compiled")),
        ..EngineSettings::default()
    };
    let bytes = guest(&dir, "best-fit");
    let input = first_fit_vs_best_fit();

    let first = PolicyRuntime::new(
        PolicyEngine::new(settings.clone()).unwrap(),
        RuntimeSettings::default(),
    );
    first.load("best-fit", "1", &bytes, "{}").unwrap();
    assert_eq!(first.engine().disk_cache_stats(), Some((0, 1)));
    first.activate("best-fit", "1").unwrap();
    let expected = first.place(&input);
    drop(first);

    // A new engine (a restarted host) with the same directory: no compilation.
    let second = PolicyRuntime::new(
        PolicyEngine::new(settings).unwrap(),
        RuntimeSettings::default(),
    );
    second.load("best-fit", "1", &bytes, "{}").unwrap();
    assert_eq!(second.engine().disk_cache_stats(), Some((1, 0)));
    second.activate("best-fit", "1").unwrap();
    let outcome = second.place(&input);
    assert!(
        matches!(outcome.source, PolicySource::Wasm { .. }),
        "{outcome:?}"
    );
    assert_eq!(outcome.decisions, expected.decisions);

    // A different component is a miss, not a wrong hit.
    second
        .load("first-fit", "1", &guest(&dir, "first-fit"), "{}")
        .unwrap();
    assert_eq!(second.engine().disk_cache_stats(), Some((1, 1)));
}

// --- Every shipped policy, loaded as a component and deciding through the runtime ---

/// Loads a shipped policy with `config` (every check, smoke decision included), activates it
/// and returns the source its decisions must carry.
fn load_shipped(
    rt: &PolicyRuntime,
    dir: &std::path::Path,
    name: &str,
    config: &str,
) -> PolicySource {
    rt.load(name, "1", &guest(dir, name), config)
        .unwrap_or_else(|e| panic!("loading {name}: {e}"));
    rt.activate(name, "1").unwrap();
    PolicySource::Wasm {
        name: name.into(),
        version: "1".into(),
    }
}

/// A task of `user` running `image` with this request, for admission.
fn submission(user: &str, image: &str, request: [f64; 4]) -> AdmissionTask {
    AdmissionTask {
        id: format!("{user}-task"),
        user: user.into(),
        image: image.into(),
        request: Resources {
            cpu: request[0],
            memory: request[1],
            storage: request[2],
            gpu: request[3],
        },
        priority: 0,
        labels: vec![],
        attempts: 0,
        age_s: 1.0,
    }
}

fn user_usage(running: u32, queued: u32, reserved: [f64; 4]) -> UserUsage {
    UserUsage {
        running_tasks: running,
        queued_tasks: queued,
        pending_tasks: 1,
        reserved: Resources {
            cpu: reserved[0],
            memory: reserved[1],
            storage: reserved[2],
            gpu: reserved[3],
        },
    }
}

/// Admits through the active policy, asserting the Wasm policy decided (not a fallback).
fn admit_wasm(
    rt: &PolicyRuntime,
    source: &PolicySource,
    task: &AdmissionTask,
    usage: &UserUsage,
) -> AdmissionDecision {
    let outcome = rt.admit(task, usage);
    assert_eq!(&outcome.source, source, "{:?}", outcome.decision);
    outcome.decision
}

#[test]
fn spread_guest_picks_the_least_loaded_worker_where_best_fit_packs() {
    let Some(dir) = wasm_dir() else { return };
    let rt = runtime();
    // Same size; worker 0 half used, worker 1 idle: best-fit packs onto 0, spread takes 1.
    let input = round(
        &[
            ([8.0, 32.0, 100.0, 0.0], [4.0, 16.0, 100.0, 0.0]),
            ([8.0, 32.0, 100.0, 0.0], [8.0, 32.0, 100.0, 0.0]),
            ([8.0, 32.0, 100.0, 0.0], [2.0, 8.0, 100.0, 0.0]),
        ],
        &[[1.0, 2.0, 1.0, 0.0], [1.0, 2.0, 1.0, 0.0]],
    );
    let best_fit = load_shipped(&rt, &dir, "best-fit", "{}");
    let outcome = rt.place(&input);
    assert_eq!(outcome.source, best_fit);
    assert_eq!(
        outcome.decisions,
        vec![
            Decision::Assign { worker: 2 },
            Decision::Assign { worker: 2 }
        ]
    );

    let spread = load_shipped(&rt, &dir, "spread", "{}");
    let outcome = rt.place(&input);
    assert_eq!(outcome.source, spread);
    // Worker 1 is least loaded; after the first task (1/8 CPU used) it still is.
    assert_eq!(
        outcome.decisions,
        vec![
            Decision::Assign { worker: 1 },
            Decision::Assign { worker: 1 }
        ]
    );
    // With workers equal, a batch is spread over them.
    let equal = round(
        &[([4.0, 8.0, 10.0, 0.0], [4.0, 8.0, 10.0, 0.0]); 3],
        &[[1.0, 1.0, 1.0, 0.0]; 3],
    );
    assert_eq!(
        rt.place(&equal).decisions,
        vec![
            Decision::Assign { worker: 0 },
            Decision::Assign { worker: 1 },
            Decision::Assign { worker: 2 }
        ]
    );
}

#[test]
fn gpu_aware_guest_keeps_gpu_workers_for_gpu_tasks() {
    let Some(dir) = wasm_dir() else { return };
    let rt = runtime();
    // Worker 0 has GPUs and is the tighter fit for a CPU task; worker 1 has none.
    let input = round(
        &[
            ([16.0, 64.0, 100.0, 4.0], [4.0, 16.0, 100.0, 4.0]),
            ([16.0, 64.0, 100.0, 0.0], [16.0, 64.0, 100.0, 0.0]),
        ],
        &[
            [2.0, 4.0, 0.0, 0.0],
            [2.0, 4.0, 0.0, 1.0],
            [1.0, 1.0, 0.0, 8.0],
        ],
    );
    assert_eq!(native::best_fit(&input)[0], Decision::Assign { worker: 0 });
    let gpu_aware = load_shipped(&rt, &dir, "gpu-aware", "");
    let outcome = rt.place(&input);
    assert_eq!(outcome.source, gpu_aware);
    assert_eq!(outcome.decisions[0], Decision::Assign { worker: 1 });
    assert_eq!(outcome.decisions[1], Decision::Assign { worker: 0 });
    assert!(
        matches!(&outcome.decisions[2], Decision::Unschedulable { reason } if reason.contains("8 GPU")),
        "{:?}",
        outcome.decisions[2]
    );
}

#[test]
fn request_caps_guest_rejects_requests_over_their_cap() {
    let Some(dir) = wasm_dir() else { return };
    let rt = runtime();
    let caps = load_shipped(&rt, &dir, "request-caps", r#"{"max_cpu": 4, "max_gpu": 1}"#);
    let idle = user_usage(0, 0, [0.0; 4]);
    let small = submission("alice", "busybox", [4.0, 64.0, 10.0, 1.0]);
    assert_eq!(
        admit_wasm(&rt, &caps, &small, &idle),
        AdmissionDecision::Accept
    );
    let big = submission("alice", "busybox", [8.0, 1.0, 1.0, 2.0]);
    assert_eq!(
        admit_wasm(&rt, &caps, &big, &idle),
        AdmissionDecision::Reject(
            "cpu request of 8 CPU exceeds the cap of 4 CPU; gpu request of 2 GPU exceeds the cap of 1 GPU"
                .into()
        )
    );
    let err = rt
        .load(
            "request-caps",
            "2",
            &guest(&dir, "request-caps"),
            r#"{"max_cpus": 4}"#,
        )
        .unwrap_err();
    assert!(
        matches!(&err, PolicyError::ConfigRejected(r) if r.contains("unknown field `max_cpus`")),
        "{err}"
    );
}

#[test]
fn quota_guest_accepts_defers_with_the_usage_and_rejects_what_never_fits() {
    let Some(dir) = wasm_dir() else { return };
    let rt = runtime();
    let config = r#"{"default": {"max_running_tasks": 2, "max_cpu": 8},
                     "users": {"alice": {"max_cpu": 16}}}"#;
    let quota = load_shipped(&rt, &dir, "quota", config);
    let task = submission("bob", "busybox", [4.0, 1.0, 1.0, 0.0]);
    assert_eq!(
        admit_wasm(&rt, &quota, &task, &user_usage(1, 0, [4.0, 1.0, 1.0, 0.0])),
        AdmissionDecision::Accept
    );
    assert_eq!(
        admit_wasm(&rt, &quota, &task, &user_usage(1, 3, [6.0, 1.0, 1.0, 0.0])),
        AdmissionDecision::Defer(
            "quota max_cpu = 8 CPU for user bob: 6 CPU reserved by running tasks + 4 CPU \
             requested; admitted once usage drops"
                .into()
        )
    );
    let AdmissionDecision::Defer(reason) =
        admit_wasm(&rt, &quota, &task, &user_usage(2, 0, [2.0, 1.0, 1.0, 0.0]))
    else {
        panic!("expected a deferral")
    };
    assert!(
        reason.contains("max_running_tasks = 2 for user bob: 2 running"),
        "{reason}"
    );
    let huge = submission("bob", "busybox", [12.0, 1.0, 1.0, 0.0]);
    assert_eq!(
        admit_wasm(&rt, &quota, &huge, &user_usage(0, 0, [0.0; 4])),
        AdmissionDecision::Reject(
            "cpu request of 12 CPU exceeds the quota max_cpu of 8 CPU for user bob".into()
        )
    );
    // alice's override lets the same request in.
    let hers = submission("alice", "busybox", [12.0, 1.0, 1.0, 0.0]);
    assert_eq!(
        admit_wasm(&rt, &quota, &hers, &user_usage(0, 0, [0.0; 4])),
        AdmissionDecision::Accept
    );
}

#[test]
fn image_allowlist_guest_accepts_rejects_and_refuses_a_bad_config_at_load() {
    let Some(dir) = wasm_dir() else { return };
    let rt = runtime();
    let bytes = guest(&dir, "image-allowlist");
    for (config, expected) in [
        (r#"{"allow": []}"#, "`allow` lists no rule"),
        ("{}", "missing field `allow`"),
        (
            r#"{"allow": ["busybox:1.36"]}"#,
            "leave out the tag or digest",
        ),
    ] {
        let err = rt.load("image-allowlist", "0", &bytes, config).unwrap_err();
        assert!(
            matches!(&err, PolicyError::ConfigRejected(r) if r.contains(expected)),
            "{config}: {err}"
        );
    }
    assert!(rt.versions().is_empty());

    let config = r#"{"allow": ["docker.io/library/*", "ghcr.io/acme/**"],
                     "deny": ["ghcr.io/acme/experimental/**"]}"#;
    let allowlist = load_shipped(&rt, &dir, "image-allowlist", config);
    let idle = user_usage(0, 0, [0.0; 4]);
    let admit = |image: &str| {
        admit_wasm(
            &rt,
            &allowlist,
            &submission("alice", image, [1.0, 1.0, 1.0, 0.0]),
            &idle,
        )
    };
    assert_eq!(admit("busybox:1.36"), AdmissionDecision::Accept);
    assert_eq!(
        admit("ghcr.io/acme/team/app@sha256:0123"),
        AdmissionDecision::Accept
    );
    assert_eq!(
        admit("ghcr.io/evil/app:1"),
        AdmissionDecision::Reject(
            "image ghcr.io/evil/app:1 (ghcr.io/evil/app) matches no allowed pattern \
             (closest rule: ghcr.io/acme/**)"
                .into()
        )
    );
    assert!(
        matches!(admit("ghcr.io/acme/experimental/x"), AdmissionDecision::Reject(r) if r.contains("denied by the rule ghcr.io/acme/experimental/**"))
    );
}

/// A 0.2.0 guest (the preempting best-fit) sees the running tasks and preempts the fewest,
/// lowest-priority, youngest ones; the host checks and keeps the answer. The same round
/// through a 0.1.0 guest (best-fit) waits: both versions load side by side, each speaking its
/// own contract, and only the 0.2.0 one makes the scheduler offer running tasks.
#[test]
fn a_0_2_0_guest_preempts_and_a_0_1_0_guest_keeps_working_beside_it() {
    let Some(dir) = wasm_dir() else { return };
    let rt = runtime();
    assert_eq!(
        rt.load("bf-preempt", "1", &guest(&dir, "best-fit-preempt"), "{}")
            .unwrap(),
        PolicyKind::Placement
    );
    rt.load("bf", "1", &guest(&dir, "best-fit"), "{}").unwrap();
    let contracts: std::collections::BTreeMap<String, &str> = rt
        .versions()
        .into_iter()
        .map(|v| (v.name, v.contract))
        .collect();
    assert_eq!(contracts["bf-preempt"], "0.2.0");
    assert_eq!(contracts["bf"], "0.1.0");

    // Worker 0 full (0.5 cpu free) runs r0, r1 (priority 0) and r7; the batch: a 2-cpu task
    // of priority 5, then a 0.5-cpu task of priority 0.
    let input = super::validate::tests::full_worker();
    rt.activate("bf-preempt", "1").unwrap();
    assert!(rt.active_may_preempt());
    let outcome = rt.place(&input);
    assert!(
        matches!(outcome.source, PolicySource::Wasm { .. }),
        "{:?}",
        outcome.source
    );
    let Decision::Preempt { worker, victims } = &outcome.decisions[0] else {
        panic!("expected a preemption, got {:?}", outcome.decisions)
    };
    assert_eq!(*worker, 0);
    assert_eq!(
        input.victim_ids(victims).len(),
        2,
        "2 cpu short of 0.5 free: both 1-cpu tasks of priority 0, {:?}",
        input.victim_ids(victims)
    );
    assert!(!input.victim_ids(victims).contains(&"r7".to_string()));
    // The small task takes the 0.5 cpu still free: the victims' capacity is not free yet.
    assert_eq!(outcome.decisions[1], Decision::Assign { worker: 0 });

    rt.activate("bf", "1").unwrap();
    assert!(!rt.active_may_preempt());
    let outcome = rt.place(&input);
    assert!(
        matches!(outcome.decisions[0], Decision::Wait { .. }),
        "{:?}",
        outcome.decisions
    );
    assert_eq!(outcome.decisions[1], Decision::Assign { worker: 0 });
}
