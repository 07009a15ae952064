//! Policy lifecycle through the real binary: `cloudai policy upload|list|activate|dry-run|
//! rollback|delete` against a host, a bad upload failing with its reason, and two hosts on one
//! MongoDB database where an activation through one runs on the other within a second.
//! Guests come from `$CLOUDAI_POLICY_WASM_DIR` (built by `scripts/build-policies.sh`).

use std::path::PathBuf;
use std::process::Output;
use std::time::{Duration, Instant};

use reqwest::Method;
use serde_json::{Value, json};

use crate::harness::{StoreKind, TestHost, mongo_uri, unique_database};

/// The guests' directory; `None` skips locally, CI must set it.
fn wasm_dir() -> Option<PathBuf> {
    match std::env::var_os("CLOUDAI_POLICY_WASM_DIR") {
        Some(dir) => Some(PathBuf::from(dir)),
        None => {
            assert!(
                std::env::var_os("CI").is_none(),
                "CI must set CLOUDAI_POLICY_WASM_DIR (scripts/build-policies.sh DIR)"
            );
            eprintln!("CLOUDAI_POLICY_WASM_DIR is not set: skipping the policy e2e tests");
            None
        }
    }
}

fn text(output: &Output) -> String {
    format!(
        "exit {:?}\nstdout:\n{}\nstderr:\n{}",
        output.status.code(),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

fn ok(host: &TestHost, args: &[&str]) -> String {
    let output = host.cli(&host.admin_token, args);
    assert!(
        output.status.success(),
        "cloudai {args:?} failed: {}\nhost log:\n{}",
        text(&output),
        host.log()
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn upload(host: &TestHost, dir: &std::path::Path, guest: &str, extra: &[&str]) -> String {
    let file = dir.join(format!("{guest}.wasm"));
    let file = file.to_str().expect("utf-8 path");
    let mut args = vec!["policy", "upload", file, "--name", guest, "--version", "1"];
    args.extend_from_slice(extra);
    ok(host, &args)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_cli_uploads_lists_activates_dry_runs_and_rolls_back() {
    let Some(dir) = wasm_dir() else { return };
    let host = TestHost::start(StoreKind::Embedded).expect("host starts");

    let out = upload(
        &host,
        &dir,
        "best-fit",
        &["--kind", "placement", "--activate"],
    );
    for want in [
        "best-fit 1",
        "placement",
        "sha256",
        "compile",
        "validate",
        "active placement policy: best-fit 1",
    ] {
        assert!(out.contains(want), "upload output lacks {want:?}:\n{out}");
    }
    let out = upload(&host, &dir, "spread", &["--config", "{}"]);
    assert!(out.contains("spread 1"), "{out}");

    let list = ok(&host, &["policy", "list"]);
    assert!(
        list.contains("best-fit") && list.contains("spread"),
        "{list}"
    );
    assert!(
        list.contains("running"),
        "the active one runs on this host:\n{list}"
    );
    let json_list: Value =
        serde_json::from_str(&ok(&host, &["policy", "list", "-o", "json"])).unwrap();
    assert_eq!(json_list["active"]["placement"]["name"], "best-fit");

    let out = ok(&host, &["policy", "activate", "spread", "1"]);
    assert!(
        out.contains("active placement policy: spread 1 (was best-fit 1)"),
        "{out}"
    );

    let out = ok(&host, &["policy", "dry-run", "best-fit"]);
    assert!(out.contains("decisions differ"), "{out}");
    let report: Value = serde_json::from_str(&ok(
        &host,
        &[
            "policy", "dry-run", "best-fit", "--limit", "5", "-o", "json",
        ],
    ))
    .unwrap();
    assert_eq!(report["compared_with"], "spread@1", "{report}");

    let out = ok(&host, &["policy", "rollback", "placement"]);
    assert!(out.contains("active placement policy: best-fit 1"), "{out}");

    // A bad upload fails with the host's reason and a non-zero exit; nothing is stored.
    let junk = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(junk.path(), b"this is not WebAssembly").unwrap();
    let output = host.cli(
        &host.admin_token,
        &[
            "policy",
            "upload",
            junk.path().to_str().unwrap(),
            "--name",
            "junk",
            "--version",
            "1",
        ],
    );
    assert!(!output.status.success(), "{}", text(&output));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("not a valid WebAssembly component"),
        "{}",
        text(&output)
    );
    assert!(stderr.contains("policy_invalid"), "{}", text(&output));
    assert!(!ok(&host, &["policy", "list"]).contains("junk"));

    let out = ok(&host, &["policy", "delete", "spread", "1"]);
    assert!(out.contains("deleted spread 1"), "{out}");
    let snapshot = tempfile::NamedTempFile::new().unwrap();
    ok(
        &host,
        &[
            "policy",
            "snapshot",
            "-f",
            snapshot.path().to_str().unwrap(),
        ],
    );
    let written = std::fs::read_to_string(snapshot.path()).unwrap();
    cloudai::policy::ClusterSnapshot::from_json(&written).expect("a snapshot the reader takes");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hosts_on_one_mongodb_database_switch_policies_within_a_second() {
    let Some(dir) = wasm_dir() else { return };
    let Some(uri) = mongo_uri() else { return };
    let database = unique_database("cloudai_e2e_replicas");
    let shared = || StoreKind::MongoDatabase {
        uri: uri.clone(),
        database: database.clone(),
    };
    let a = TestHost::start(shared()).expect("host A starts");
    let b = TestHost::start(shared()).expect("host B starts");

    upload(&a, &dir, "best-fit", &["--activate"]);
    upload(&a, &dir, "spread", &[]);
    // B compiles both in the background before anything else is activated.
    let policies_on_b = || async {
        let (status, body) = b
            .call(Method::GET, "/v1/policies", Some(&b.admin_token), None, &[])
            .await;
        assert_eq!(status, 200, "{body}");
        body
    };
    let state = |body: &Value, name: &str| -> (bool, bool) {
        let v = body["versions"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|v| v["name"] == name)
            .cloned()
            .unwrap_or(Value::Null);
        (v["loaded"] == true, v["active"] == true)
    };
    let started = Instant::now();
    loop {
        let body = policies_on_b().await;
        if state(&body, "best-fit") == (true, true) && state(&body, "spread").0 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "B did not load the uploads: {body}\nB's log:\n{}",
            b.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let (status, body) = a
        .call(
            Method::POST,
            "/v1/policies/spread/activate",
            Some(&a.admin_token),
            Some(&json!({"version": "1"}).to_string()),
            &[],
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let switched = Instant::now();
    loop {
        let body = policies_on_b().await;
        if state(&body, "spread") == (true, true)
            && state(&body, "best-fit") == (true, false)
            && body["active"]["placement"]["name"] == "spread"
        {
            break;
        }
        assert!(
            switched.elapsed() <= Duration::from_secs(1),
            "B does not run spread within 1 s of its activation through A: {body}\nB's log:\n{}",
            b.log()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    eprintln!(
        "B reported spread active {:?} after the activation through A",
        switched.elapsed()
    );
}
