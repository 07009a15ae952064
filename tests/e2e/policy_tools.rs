//! `cloudai policy test`, the real binary, offline: a shipped policy replayed against the
//! example snapshot, and the failures a policy author meets (a bad snapshot file, a hostile
//! component) reported with a non-zero exit and the reason.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

use crate::harness::{CLI_TIMEOUT, binary, run_within};

/// The built guests (`scripts/build-policies.sh DIR`), from `CLOUDAI_POLICY_WASM_DIR`. Unset:
/// skipped locally, a failure under CI.
fn wasm_dir() -> Option<PathBuf> {
    crate::harness::policy_wasm_dir("skipping the policy tool tests")
}

pub(crate) fn repo_file(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(path)
}

fn policy_test(args: &[&std::ffi::OsStr]) -> Output {
    run_within(
        &format!("cloudai policy test {args:?}"),
        Command::new(binary())
            .args(["policy", "test"])
            .args(args)
            .env("RUST_LOG", "warn"),
        CLI_TIMEOUT,
    )
    .unwrap_or_else(|e| panic!("{e}"))
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// The table row of one task.
fn row<'a>(stdout: &'a str, task: &str) -> &'a str {
    stdout
        .lines()
        .find(|l| l.split_whitespace().nth(1) == Some(task))
        .unwrap_or_else(|| panic!("no row for {task} in:\n{stdout}"))
}

#[test]
fn policy_test_prints_the_decisions_of_best_fit_on_the_example_snapshot() {
    let Some(dir) = wasm_dir() else { return };
    let best_fit = dir.join("best-fit.wasm");
    let snapshot = repo_file("examples/snapshots/small-cluster.json");
    let out = policy_test(&[
        best_fit.as_os_str(),
        "--snapshot".as_ref(),
        snapshot.as_os_str(),
    ]);
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", text(&out.stderr));
    assert!(
        stdout.starts_with(
            "best-fit.wasm (placement) on small-cluster.json: 6 tasks, 3 candidate workers"
        ),
        "{stdout}"
    );
    for (task, decision, worker) in [
        ("train-gpu", "assign", "gpu-1"),
        ("etl-1", "assign", "cpu-small-1"),
        ("etl-2", "assign", "gpu-1"),
        ("lint", "assign", "cpu-large-1"),
    ] {
        let r = row(&stdout, task);
        assert!(r.contains(decision) && r.contains(worker), "{r}");
    }
    let huge = row(&stdout, "huge-mem");
    assert!(
        huge.contains("unschedulable") && huge.contains("no worker has 64 CPU in total"),
        "{huge}"
    );
    assert!(row(&stdout, "render").contains("wait"));
    assert!(
        stdout.contains("summary: 4 assigned, 1 waiting, 1 unschedulable"),
        "{stdout}"
    );
    assert!(stdout.contains("timing: compile+validate "), "{stdout}");

    // The same as JSON, and an admission policy with its example configuration.
    let out = policy_test(&[
        best_fit.as_os_str(),
        "--snapshot".as_ref(),
        snapshot.as_os_str(),
        "-o".as_ref(),
        "json".as_ref(),
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let report: Value = serde_json::from_slice(&out.stdout).expect("JSON output");
    assert_eq!(report["kind"], "placement");
    assert_eq!(report["decisions"][0]["task_id"], "train-gpu");
    assert_eq!(report["decisions"][0]["worker_id"], "gpu-1");
    assert_eq!(report["summary"]["unschedulable"], 1);
    assert!(report["timings_ms"]["round"].as_f64().is_some());

    let quota = dir.join("quota.wasm");
    let config = repo_file("examples/policies/quota.json");
    let out = policy_test(&[
        quota.as_os_str(),
        "--snapshot".as_ref(),
        snapshot.as_os_str(),
        "--config-file".as_ref(),
        config.as_os_str(),
    ]);
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", text(&out.stderr));
    assert!(row(&stdout, "p-alice-gpu").contains("accept"));
    assert!(row(&stdout, "p-bob").contains("defer"));
    assert!(row(&stdout, "p-carol-big").contains("reject"));
    assert!(
        stdout.contains("summary: 2 accepted, 1 rejected, 1 deferred"),
        "{stdout}"
    );
}

#[test]
fn policy_test_fails_with_the_reason_on_a_bad_snapshot_or_a_hostile_policy() {
    let Some(dir) = wasm_dir() else { return };
    let best_fit = dir.join("best-fit.wasm");
    let scratch = tempfile::tempdir().unwrap();
    let broken = scratch.path().join("broken.json");
    std::fs::write(&broken, r#"{"format": 1, "workers": [], "extra": true}"#).unwrap();
    let out = policy_test(&[
        best_fit.as_os_str(),
        "--snapshot".as_ref(),
        broken.as_os_str(),
    ]);
    let stderr = text(&out.stderr);
    assert!(!out.status.success());
    assert!(out.stdout.is_empty(), "{}", text(&out.stdout));
    assert!(
        stderr.contains("broken.json is not a valid cluster snapshot"),
        "{stderr}"
    );

    let snapshot = repo_file("examples/snapshots/small-cluster.json");
    let hostile = dir.join("fixture-bad-index.wasm");
    let out = policy_test(&[
        hostile.as_os_str(),
        "--snapshot".as_ref(),
        snapshot.as_os_str(),
    ]);
    let stderr = text(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("loading") && stderr.contains("fixture-bad-index.wasm"),
        "{stderr}"
    );
    assert!(stderr.contains("invalid answer"), "{stderr}");

    let out = policy_test(&[
        dir.join("image-allowlist.wasm").as_os_str(),
        "--snapshot".as_ref(),
        snapshot.as_os_str(),
        "--config".as_ref(),
        r#"{"allow": []}"#.as_ref(),
    ]);
    let stderr = text(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("configuration rejected") && stderr.contains("`allow` lists no rule"),
        "{stderr}"
    );
}

#[test]
fn the_conformance_kit_passes_a_shipped_policy_and_fails_with_a_non_zero_exit_otherwise() {
    let Some(dir) = wasm_dir() else { return };
    // The kit's 10,000-worker case must finish within the policy's deadline: this binary is a
    // debug build on a shared machine, so the deadline is a generous one (as the kit's own
    // unit test gives it), not production's 50 ms.
    let out = policy_test(&[
        dir.join("best-fit.wasm").as_os_str(),
        "--conformance".as_ref(),
        "--deadline-ms".as_ref(),
        "1000".as_ref(),
        "-o".as_ref(),
        "json".as_ref(),
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["failed"], 0, "{report}");
    assert!(report["passed"].as_u64().unwrap() >= 9, "{report}");
    assert_eq!(report["kind"], "placement");

    let out = policy_test(&[
        dir.join("quota.wasm").as_os_str(),
        "--conformance".as_ref(),
        "--config-file".as_ref(),
        repo_file("examples/policies/quota.json").as_os_str(),
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("4 of 4 conformance cases passed"),
        "{}",
        text(&out.stdout)
    );

    // A guest that never answers fails, with a non-zero exit (at its bounded smoke check).
    let out = policy_test(&[
        dir.join("fixture-infinite-loop.wasm").as_os_str(),
        "--conformance".as_ref(),
    ]);
    assert!(!out.status.success());
}
