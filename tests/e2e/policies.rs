//! Policy lifecycle through the real binary: `cloudai policy upload|list|activate|dry-run|
//! rollback|delete` against a host, a bad upload failing with its reason, and two hosts on one
//! MongoDB database where an activation through one runs on the other within a second.
//! Guests come from `$CLOUDAI_POLICY_WASM_DIR` (built by `scripts/build-policies.sh`).
//! The JavaScript and Python examples, placing and admitting tasks on a running host, come from
//! `$CLOUDAI_EXAMPLE_POLICY_WASM_DIR` (built by `scripts/build-example-policies.sh`).

use std::path::PathBuf;
use std::process::Output;
use std::time::{Duration, Instant};

use reqwest::Method;
use serde_json::{Value, json};

use crate::harness::{
    StoreKind, TestHost, mongo_uri, register_worker, unique_database, wait_until_running,
};

/// The longest a CLI upload (which compiles the component) may take.
const UPLOAD_TIMEOUT: Duration = Duration::from_secs(300);

/// The guests' directory; `None` skips locally, CI must set it.
fn wasm_dir() -> Option<PathBuf> {
    crate::harness::policy_wasm_dir("skipping the policy e2e tests")
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
    ok_within(host, crate::harness::CLI_TIMEOUT, args)
}

/// [`ok`] for a command that may take up to `within`.
fn ok_within(host: &TestHost, within: Duration, args: &[&str]) -> String {
    let output = host.cli_within(within, &host.admin_token, args);
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
    // The host compiles the component before it answers: seconds for a Rust guest, more for
    // the Python and JavaScript ones on a loaded machine.
    ok_within(host, UPLOAD_TIMEOUT, &args)
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
    b.eventually("B to load the uploads", Duration::from_secs(20))
        .every(Duration::from_millis(50))
        .until(async || {
            let body = policies_on_b().await;
            if state(&body, "best-fit") == (true, true) && state(&body, "spread").0 {
                Ok(())
            } else {
                Err(body.to_string())
            }
        })
        .await;

    activate_over_http(&a, "spread", "1").await;
    let switched = Instant::now();
    b.eventually(
        "B to run spread within 1 s of its activation through A",
        Duration::from_secs(1),
    )
    .every(Duration::from_millis(20))
    .until(async || {
        let body = policies_on_b().await;
        if state(&body, "spread") == (true, true)
            && state(&body, "best-fit") == (true, false)
            && body["active"]["placement"]["name"] == "spread"
        {
            Ok(())
        } else {
            Err(body.to_string())
        }
    })
    .await;
    eprintln!(
        "B reported spread active {:?} after the activation through A",
        switched.elapsed()
    );
}

/// Submits a 1-core, 1 GB task as alice, waits until it is placed, and says on which worker
/// the reservation landed (the one whose allocation grew by its request).
/// `POST /v1/policies/{name}/activate` as the admin; asserts it applied.
async fn activate_over_http(host: &TestHost, name: &str, version: &str) {
    let (status, body) = host
        .call(
            Method::POST,
            &format!("/v1/policies/{name}/activate"),
            Some(&host.admin_token),
            Some(&json!({ "version": version }).to_string()),
            &[],
        )
        .await;
    assert_eq!(status, 200, "{body}");
}

async fn place_one(host: &TestHost, workers: &[(&str, &str)]) -> String {
    let allocated = |body: &Value| body["worker"]["allocated_cpu"].as_f64().unwrap_or(-1.0);
    let mut before = Vec::new();
    for (id, token) in workers {
        // A heartbeat keeps the worker a candidate, however slow the machine.
        let body = crate::harness::heartbeat(host, id, token).await;
        before.push(allocated(&body));
    }
    let spec = r#"{"docker_image": "busybox", "req_cpu": 1, "req_memory": 1}"#;
    let (status, body) = host
        .call(
            Method::POST,
            "/v1/tasks",
            Some(crate::harness::ALICE_TOKEN),
            Some(spec),
            &[],
        )
        .await;
    assert_eq!(status, 201, "{body}");
    wait_until_running(host, body["task_id"].as_str().unwrap()).await;
    let mut grew = Vec::new();
    for ((id, _), before) in workers.iter().zip(before) {
        let (_, body) = host
            .call(
                Method::GET,
                &format!("/v1/workers/{id}"),
                Some(&host.admin_token),
                None,
                &[],
            )
            .await;
        let after = body["allocated_cpu"].as_f64().unwrap();
        if after != before {
            assert_eq!(after - before, 1.0, "{id}: {body}");
            grew.push(id.to_string());
        }
    }
    assert_eq!(
        grew.len(),
        1,
        "exactly one worker reserved the task: {grew:?}"
    );
    grew.remove(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn swapping_best_fit_for_spread_on_a_running_host_changes_where_the_next_tasks_go() {
    let Some(dir) = wasm_dir() else { return };
    let host = TestHost::start(StoreKind::Embedded).expect("host starts");
    let small = register_worker(&host, "small", 4.0, 8.0).await;
    let big = register_worker(&host, "big", 16.0, 32.0).await;
    let workers = [("small", small.as_str()), ("big", big.as_str())];
    upload(&host, &dir, "best-fit", &["--activate"]);
    upload(&host, &dir, "spread", &[]);

    // Best-fit packs: the worker left with the least room, the small one.
    assert_eq!(place_one(&host, &workers).await, "small");
    ok(&host, &["policy", "activate", "spread", "1"]);
    // Spread: the least loaded worker after placement, the big one (1/16 against 2/4).
    assert_eq!(place_one(&host, &workers).await, "big");
    assert_eq!(place_one(&host, &workers).await, "big");
    ok(&host, &["policy", "activate", "best-fit", "1"]);
    assert_eq!(place_one(&host, &workers).await, "small");

    // One process all along, and both versions decided rounds in it.
    let list: Value = serde_json::from_str(&ok(&host, &["policy", "list", "-o", "json"])).unwrap();
    for version in list["versions"].as_array().unwrap() {
        assert!(version["evaluations"].as_u64().unwrap() >= 1, "{version}");
    }
}

/// The example policies in JavaScript and Python (`scripts/build-example-policies.sh DIR`),
/// from `$CLOUDAI_EXAMPLE_POLICY_WASM_DIR`; `None` skips locally, CI must set it.
fn example_wasm_dir() -> Option<PathBuf> {
    match std::env::var_os("CLOUDAI_EXAMPLE_POLICY_WASM_DIR") {
        Some(dir) => Some(PathBuf::from(dir)),
        None => {
            assert!(
                std::env::var_os("CI").is_none(),
                "CI must set CLOUDAI_EXAMPLE_POLICY_WASM_DIR (scripts/build-example-policies.sh DIR)"
            );
            eprintln!(
                "CLOUDAI_EXAMPLE_POLICY_WASM_DIR is not set: skipping the JavaScript and Python \
                 policies on a running host"
            );
            None
        }
    }
}

/// Submits a task as bob; the HTTP status and the answer.
async fn submit_as_bob(host: &TestHost, spec: &str) -> (u16, Value) {
    host.call(
        Method::POST,
        "/v1/tasks",
        Some(crate::harness::BOB_TOKEN),
        Some(spec),
        &[],
    )
    .await
}

/// With the quota of examples/policies/quota.json active: bob's over-cap task (a GPU; his cap
/// is 0) is rejected with the policy's reason, and a task beyond his 4 running ones deferred.
async fn assert_quota_decides(host: &TestHost, policy: &str) {
    let (status, body) = submit_as_bob(
        host,
        r#"{"docker_image": "busybox", "req_cpu": 1, "req_memory": 1, "req_gpu": 1}"#,
    )
    .await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (403, Some("admission_rejected")),
        "{policy}: {body}"
    );
    let message = body["error"]["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("exceeds the quota max_gpu of 0 GPU for user bob"),
        "{policy}: {message}"
    );
    let (status, task) = submit_as_bob(
        host,
        r#"{"docker_image": "busybox", "req_cpu": 1, "req_memory": 1}"#,
    )
    .await;
    assert_eq!(
        (status, task["status"].as_str()),
        (202, Some("pending")),
        "{policy}: {task}"
    );
    let reason = task["status_reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("max_running_tasks") && reason.contains("admitted once usage drops"),
        "{policy}: {task}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn javascript_and_python_policies_uploaded_to_a_running_host_place_and_admit_its_tasks() {
    let Some(dir) = example_wasm_dir() else {
        return;
    };
    let host = TestHost::start(StoreKind::Embedded).expect("host starts");
    let small = register_worker(&host, "small", 4.0, 8.0).await;
    let big = register_worker(&host, "big", 16.0, 32.0).await;
    let workers = [("small", small.as_str()), ("big", big.as_str())];
    // A debug build of the host, on a machine shared with builds: a generous deadline (the
    // guests' own READMEs give the production figures).
    let limits = ["--deadline-ms", "1000"];
    let quota_config = crate::policy_tools::repo_file("examples/policies/quota.json");
    let quota_config = quota_config.to_str().unwrap();
    upload(&host, &dir, "js-spread", &limits);
    upload(&host, &dir, "py-spread", &limits);
    for guest in ["js-quota", "py-quota"] {
        let mut extra = vec!["--config-file", quota_config];
        extra.extend_from_slice(&limits);
        upload(&host, &dir, guest, &extra);
    }

    // Placement: nothing active, so the native best-fit packs onto the small worker; spread,
    // in JavaScript and then in Python, takes the emptier big one (best-fit would still pick
    // the small one: it is left with the least room).
    assert_eq!(place_one(&host, &workers).await, "small");
    let out = ok(&host, &["policy", "activate", "js-spread", "1"]);
    assert!(
        out.contains("active placement policy: js-spread 1"),
        "{out}"
    );
    assert_eq!(place_one(&host, &workers).await, "big");
    let out = ok(&host, &["policy", "activate", "py-spread", "1"]);
    assert!(
        out.contains("active placement policy: py-spread 1 (was js-spread 1)"),
        "{out}"
    );
    assert_eq!(place_one(&host, &workers).await, "big");

    // Admission: bob runs 4 tasks (his max_running_tasks), placed by py-spread.
    let out = ok(&host, &["policy", "activate", "js-quota", "1"]);
    assert!(out.contains("active admission policy: js-quota 1"), "{out}");
    for _ in 0..4 {
        let (status, task) = submit_as_bob(
            &host,
            r#"{"docker_image": "busybox", "req_cpu": 1, "req_memory": 1}"#,
        )
        .await;
        assert_eq!(
            (status, task["status"].as_str()),
            (201, Some("queued")),
            "{task}"
        );
        wait_until_running(&host, task["task_id"].as_str().unwrap()).await;
    }
    assert_quota_decides(&host, "js-quota").await;
    let out = ok(&host, &["policy", "activate", "py-quota", "1"]);
    assert!(
        out.contains("active admission policy: py-quota 1 (was js-quota 1)"),
        "{out}"
    );
    assert_quota_decides(&host, "py-quota").await;

    let list: Value = serde_json::from_str(&ok(&host, &["policy", "list", "-o", "json"])).unwrap();
    for name in ["js-spread", "py-spread", "js-quota", "py-quota"] {
        let version = list["versions"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["name"] == name)
            .unwrap_or_else(|| panic!("no {name} in {list}"));
        assert!(version["evaluations"].as_u64().unwrap() >= 1, "{version}");
        assert_eq!(version["total_failures"], 0, "{version}");
    }
}

/// A Python guest (~18 MB, seconds to compile) uploaded through the CLI: each stage the host
/// streams (a line per stage when stderr is not a terminal), in order, then the stored version.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uploading_a_python_policy_through_the_cli_shows_each_stage_then_the_stored_version() {
    let Some(dir) = example_wasm_dir() else {
        return;
    };
    let host = TestHost::start(StoreKind::Embedded).expect("host starts");
    let file = dir.join("py-spread.wasm");
    let size = std::fs::metadata(&file).expect("py-spread.wasm").len();
    let started = Instant::now();
    let output = host.cli_within(
        UPLOAD_TIMEOUT,
        &host.admin_token,
        &[
            "policy",
            "upload",
            file.to_str().expect("utf-8 path"),
            "--name",
            "py-spread",
            "--version",
            "2",
            "--deadline-ms",
            "1000",
            "-o",
            "json",
        ],
    );
    let wall = started.elapsed();
    assert!(output.status.success(), "{}", text(&output));
    let stderr = String::from_utf8_lossy(&output.stderr);
    let label = format!("py-spread 2 ({:.1} MB)", size as f64 / 1e6);
    let mut at = 0;
    for stage in ["received", "compiling", "validating", "storing", "stored"] {
        let line = format!("{stage} {label}");
        let found = stderr[at..]
            .find(&line)
            .unwrap_or_else(|| panic!("no {line:?} after the stage before:\n{}", text(&output)));
        at += found + line.len();
    }
    let answer: Value = serde_json::from_slice(&output.stdout).expect("the upload as JSON");
    let upload = &answer["upload"];
    assert_eq!(upload["policy"]["name"], "py-spread", "{answer}");
    assert_eq!(upload["policy"]["size_bytes"], size, "{answer}");
    assert_eq!(upload["kind"], "placement", "{answer}");

    let list: Value = serde_json::from_str(&ok(&host, &["policy", "list", "-o", "json"])).unwrap();
    let stored = list["versions"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|v| v["name"] == "py-spread" && v["version"] == "2")
        .unwrap_or_else(|| panic!("py-spread 2 is not stored: {list}"));
    assert_eq!(stored["loaded"], true, "{stored}");
    eprintln!(
        "py-spread ({label}) uploaded through the CLI in {wall:.1?}: compile {:.0} ms, \
         validate {:.0} ms; its progress:\n{stderr}",
        upload["compile_ms"].as_f64().unwrap_or_default(),
        upload["validate_ms"].as_f64().unwrap_or_default()
    );
}

/// `elapsed_ms` of the last "policy sync: loaded a stored version" line of `policy` in a host's
/// log: reading it from the store, compiling it (or loading the cached compilation), checking it.
fn sync_load_ms(log: &str, policy: &str) -> Option<u64> {
    log.lines()
        .filter(|l| l.contains("policy sync: loaded a stored version") && l.contains(policy))
        .filter_map(|l| {
            // Without its colour codes (`ESC [ ... m`).
            let mut plain = String::new();
            let mut chars = l.chars();
            while let Some(c) = chars.next() {
                if c == '\u{1b}' {
                    chars.by_ref().find(|c| *c == 'm');
                } else {
                    plain.push(c);
                }
            }
            let rest = &plain[plain.find("elapsed_ms=")? + "elapsed_ms=".len()..];
            let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
            digits.parse().ok()
        })
        .next_back()
}

/// Two replicas on one database: a Python guest uploaded through A is compiled by B in the
/// background, so that its activation through A runs on B within a second (plus B's sync
/// interval); B restarted loads it from its compiled-policy cache instead of compiling again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_python_policy_uploaded_on_one_replica_activates_on_the_other_within_a_second_and_a_restart_loads_it_compiled()
 {
    let Some(dir) = example_wasm_dir() else {
        return;
    };
    let Some(uri) = mongo_uri() else { return };
    let database = unique_database("cloudai_e2e_large_upload");
    let shared = || StoreKind::MongoDatabase {
        uri: uri.clone(),
        database: database.clone(),
    };
    let a = TestHost::start(shared()).expect("host A starts");
    let b = TestHost::start(shared()).expect("host B starts");
    let py_spread_on = |host: &TestHost| {
        let host_url = host.url.clone();
        let token = host.admin_token.clone();
        async move {
            let body: Value = crate::harness::client()
                .get(format!("{host_url}/v1/policies"))
                .bearer_auth(token)
                .send()
                .await
                .expect("GET /v1/policies")
                .json()
                .await
                .expect("a policy list");
            let version = body["versions"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|v| v["name"] == "py-spread")
                .cloned()
                .unwrap_or(Value::Null);
            let active_record = body["active"]["placement"]["name"] == "py-spread";
            (
                version["loaded"] == true,
                version["active"] == true && active_record,
                body,
            )
        }
    };

    let uploaded = Instant::now();
    upload(&a, &dir, "py-spread", &["--deadline-ms", "1000"]);
    let upload_took = uploaded.elapsed();
    b.eventually("B to load py-spread", Duration::from_secs(300))
        .until(async || match py_spread_on(&b).await {
            (true, _, _) => Ok(()),
            (_, _, body) => Err(body.to_string()),
        })
        .await;
    let compiled_on_b = sync_load_ms(&b.log(), "py-spread").expect("B logged its load");

    activate_over_http(&a, "py-spread", "1").await;
    let switched = Instant::now();
    // B's policy sync interval (`--policy-sync-interval-ms`, 250 by default).
    let limit = Duration::from_secs(1) + Duration::from_millis(250);
    b.eventually(
        format!("B to run py-spread within {limit:?} of its activation through A"),
        limit,
    )
    .every(Duration::from_millis(20))
    .until(async || match py_spread_on(&b).await {
        (_, true, _) => Ok(()),
        (_, _, body) => Err(body.to_string()),
    })
    .await;
    let activation = switched.elapsed();

    let b = b
        .restart(shared(), &["--no-local-worker"])
        .expect("host B restarts");
    let restarted = Instant::now();
    b.eventually("B restarted to run py-spread", Duration::from_secs(120))
        .every(Duration::from_millis(20))
        .until(async || match py_spread_on(&b).await {
            (true, true, _) => Ok(()),
            (_, _, body) => Err(body.to_string()),
        })
        .await;
    let running_again = restarted.elapsed();
    let reloaded = sync_load_ms(&b.log(), "py-spread").expect("B logged its load");
    assert!(
        reloaded * 3 < compiled_on_b,
        "B restarted took {reloaded} ms to load py-spread, compiling it took {compiled_on_b} ms: \
         not from the cache?\nB's log:\n{}",
        b.log()
    );
    eprintln!(
        "py-spread: uploaded through A in {upload_took:.1?}; B compiled and loaded it in the \
         background in {compiled_on_b} ms; B ran it {activation:.0?} after its activation \
         through A; B restarted loaded it in {reloaded} ms (from its cache) and ran it \
         {running_again:.0?} after the restart"
    );
}
