//! `cloudai backup` taken while a host runs, restored with `cloudai restore` into a fresh data
//! directory (embedded store) or a fresh database (MongoDB), and a new host started on it: the
//! same tasks (ids, statuses, results), workers (and their tokens) and policies (versions, the
//! active one, its component's bytes, which the new host compiles). And the refusals: a backup
//! over an existing one, a restore into a store that holds data, a restore under a running host.
//! Policy components come from `$CLOUDAI_POLICY_WASM_DIR` (built by `scripts/build-policies.sh`);
//! without it the policy part is left out locally (CI must set it).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use reqwest::Method;
use serde_json::{Value, json};

use crate::harness::{
    ALICE_TOKEN, StoreKind, TestHost, binary, heartbeat, mongo_uri, register_worker,
    report_completed, run_within, submit_task, unique_database, wait_until_running, work_list,
};

/// The longest a backup or restore of this small state may take on a loaded machine.
const TOOL_TIMEOUT: Duration = Duration::from_secs(120);

/// The longest a CLI upload (which compiles the component) may take.
const UPLOAD_TIMEOUT: Duration = Duration::from_secs(300);

/// The policy guests' directory; `None` leaves the policy part out locally, CI must set it.
fn wasm_dir() -> Option<PathBuf> {
    crate::harness::policy_wasm_dir("backing up no policies")
}

/// Where the store is, as `cloudai backup` and `cloudai restore` are told.
#[derive(Clone)]
enum Store {
    Embedded(PathBuf),
    Mongo { uri: String, database: String },
}

impl Store {
    fn args(&self) -> Vec<String> {
        match self {
            Store::Embedded(dir) => vec!["--data-dir".into(), dir.display().to_string()],
            Store::Mongo { uri, database } => vec![
                "--mongodb-uri".into(),
                uri.clone(),
                "--mongodb-database".into(),
                database.clone(),
            ],
        }
    }

    fn kind(&self) -> StoreKind {
        match self {
            Store::Embedded(_) => StoreKind::Embedded,
            Store::Mongo { uri, database } => StoreKind::MongoDatabase {
                uri: uri.clone(),
                database: database.clone(),
            },
        }
    }
}

/// Runs `cloudai ARGS...` (no host, no store settings from the environment).
fn tool(args: &[String]) -> Output {
    let mut command = Command::new(binary());
    command
        .args(args)
        .env_remove("CLOUDAI_MONGODB_URI")
        .env_remove("CLOUDAI_MONGODB_DATABASE")
        .env_remove("CLOUDAI_DATA_DIR");
    run_within(&format!("cloudai {args:?}"), &mut command, TOOL_TIMEOUT)
        .unwrap_or_else(|e| panic!("{e}"))
}

fn text(output: &Output) -> String {
    format!(
        "exit {:?}\nstdout:\n{}\nstderr:\n{}",
        output.status.code(),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// `cloudai backup|restore ...` that must succeed: its stdout.
fn tool_ok(host: Option<&TestHost>, args: &[String]) -> String {
    let output = tool(args);
    assert!(
        output.status.success(),
        "cloudai {args:?} failed: {}\nhost log:\n{}",
        text(&output),
        host.map(|h| h.log_tail(50)).unwrap_or_default()
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// `cloudai backup|restore ...` that must be refused, saying `why`.
fn tool_refused(args: &[String], why: &str) {
    let output = tool(args);
    assert!(
        !output.status.success(),
        "{args:?} was not refused: {}",
        text(&output)
    );
    assert!(
        String::from_utf8_lossy(&output.stderr).contains(why),
        "{args:?}: expected {why:?} in {}",
        text(&output)
    );
}

fn strings(args: &[&str]) -> Vec<String> {
    args.iter().map(|s| s.to_string()).collect()
}

async fn get(host: &TestHost, path: &str) -> Value {
    let (status, body) = host
        .call(Method::GET, path, Some(&host.admin_token), None, &[])
        .await;
    assert_eq!(status, 200, "GET {path}: {body}");
    body
}

/// Waits until the task's status is `status`.
async fn wait_for_status(host: &TestHost, task_id: &str, status: &str) {
    let path = format!("/v1/tasks/{task_id}");
    host.eventually(
        format!("task {task_id} to be {status}"),
        Duration::from_secs(30),
    )
    .until(async || {
        let task = get(host, &path).await;
        if task["status"] == status {
            Ok(())
        } else {
            Err(task.to_string())
        }
    })
    .await
}

/// What a restored host must show as the original did: the tasks (whole, as they no longer
/// change), the completed one's result, the workers' stored fields, and the policies' stored
/// versions and active records (not this replica's view of them: loaded, counters).
#[derive(Debug)]
struct State {
    tasks: Vec<Value>,
    result: Value,
    workers: Vec<Value>,
    policies: Vec<Value>,
    active: Value,
}

/// Fails naming each field that differs between `before` and `after`.
fn same(before: &State, after: &State) {
    let parts = |s: &State| -> Vec<(String, Value)> {
        let mut parts = vec![
            ("result".to_string(), s.result.clone()),
            ("active policies".to_string(), s.active.clone()),
        ];
        for (what, list) in [
            ("task", &s.tasks),
            ("worker", &s.workers),
            ("policy", &s.policies),
        ] {
            for (i, item) in list.iter().enumerate() {
                parts.push((format!("{what} {i}"), item.clone()));
            }
        }
        parts
    };
    let mut differences = Vec::new();
    let (b, a) = (parts(before), parts(after));
    if b.len() != a.len() {
        differences.push(format!("{} parts before, {} after", b.len(), a.len()));
    }
    for ((what, b), (_, a)) in b.iter().zip(&a) {
        match (b.as_object(), a.as_object()) {
            (Some(bo), Some(ao)) => {
                let keys: std::collections::BTreeSet<&String> =
                    bo.keys().chain(ao.keys()).collect();
                for key in keys {
                    if bo.get(key) != ao.get(key) {
                        differences.push(format!(
                            "{what}.{key}: {:?} before, {:?} after",
                            bo.get(key),
                            ao.get(key)
                        ));
                    }
                }
            }
            _ if b != a => differences.push(format!("{what}: {b} before, {a} after")),
            _ => {}
        }
    }
    assert!(
        differences.is_empty(),
        "the restored host differs:\n{}",
        differences.join("\n")
    );
}

async fn state(host: &TestHost, task_ids: &[String], completed: &str) -> State {
    let mut tasks = Vec::new();
    for id in task_ids {
        tasks.push(get(host, &format!("/v1/tasks/{id}")).await);
    }
    let listed = get(host, "/v1/tasks?limit=100").await;
    let mut listed_ids: Vec<String> = listed["tasks"]
        .as_array()
        .expect("a task list")
        .iter()
        .map(|t| t["task_id"].as_str().unwrap().to_string())
        .collect();
    listed_ids.sort();
    let mut expected_ids = task_ids.to_vec();
    expected_ids.sort();
    assert_eq!(listed_ids, expected_ids, "{listed}");
    let result = get(host, &format!("/v1/tasks/{completed}/result")).await;
    let workers = get(host, "/v1/workers").await["workers"]
        .as_array()
        .expect("a worker list")
        .iter()
        .map(|w| {
            let mut w = w.clone();
            // The reconciler's to change (a worker without heartbeats is lost after 15 s).
            for field in ["is_active", "updated_at"] {
                w.as_object_mut().unwrap().remove(field);
            }
            w
        })
        .collect();
    let listed = get(host, "/v1/policies").await;
    let policies = listed["versions"]
        .as_array()
        .expect("a version list")
        .iter()
        .map(|v| {
            let mut v = v.clone();
            for field in [
                "loaded",
                "active",
                "deactivated",
                "consecutive_failures",
                "total_failures",
                "evaluations",
                "load_error",
                // Known once loaded on this replica, like the fields above.
                "contract",
            ] {
                v.as_object_mut().unwrap().remove(field);
            }
            v
        })
        .collect();
    State {
        tasks,
        result,
        workers,
        policies,
        active: listed["active"].clone(),
    }
}

async fn backup_restored_into_a_fresh_host_shows_the_same_state(
    original: Store,
    host: TestHost,
    restored: Store,
    fresh_data_dir: tempfile::TempDir,
) {
    let wasm = wasm_dir();
    let scratch = tempfile::tempdir().unwrap();

    let spec = |cpu: u32| json!({"docker_image": "busybox", "command": "true", "req_cpu": cpu, "req_memory": 1});
    // A task cancelled while it waits for a worker (there is none yet).
    let cancelled = submit_task(&host, ALICE_TOKEN, &spec(1)).await;
    let (status, body) = host
        .call(
            Method::POST,
            &format!("/v1/tasks/{cancelled}/cancel"),
            Some(ALICE_TOKEN),
            Some("{}"),
            &[],
        )
        .await;
    assert_eq!(status, 200, "{body}");
    wait_for_status(&host, &cancelled, "cancelled").await;
    let mut task_ids = vec![cancelled.clone()];

    let worker_token = register_worker(&host, "w-backup", 4.0, 8.0).await;
    heartbeat(&host, "w-backup", &worker_token).await;

    // Policies: best-fit active, spread uploaded beside it.
    if let Some(dir) = &wasm {
        for (guest, extra) in [("best-fit", &["--activate"][..]), ("spread", &[][..])] {
            let file = dir.join(format!("{guest}.wasm"));
            let mut args = vec![
                "policy",
                "upload",
                file.to_str().unwrap(),
                "--name",
                guest,
                "--version",
                "1",
            ];
            args.extend_from_slice(extra);
            let output = host.cli_within(UPLOAD_TIMEOUT, &host.admin_token, &args);
            assert!(output.status.success(), "{}", text(&output));
        }
    }
    // A task no worker fits: failed as unschedulable.
    let unschedulable = submit_task(&host, ALICE_TOKEN, &spec(32)).await;
    wait_for_status(&host, &unschedulable, "failed").await;
    task_ids.push(unschedulable);

    // A task the worker completes.
    let done = submit_task(&host, ALICE_TOKEN, &spec(1)).await;
    wait_until_running(&host, &done).await;
    let work = work_list(&host, "w-backup", &worker_token, 500).await;
    let (ass_id, _) = work
        .iter()
        .find(|(_, task)| *task == done)
        .unwrap_or_else(|| panic!("{done} not in the work list {work:?}"));
    report_completed(&host, "w-backup", &worker_token, ass_id, "backed up\n").await;
    wait_for_status(&host, &done, "completed").await;
    task_ids.push(done.clone());

    let before = state(&host, &task_ids, &done).await;
    assert_eq!(
        before.result["logs"].as_str().map(str::trim_end),
        Some("backed up"),
        "{}",
        before.result
    );
    if wasm.is_some() {
        assert_eq!(before.policies.len(), 2, "{:?}", before.policies);
        assert_eq!(before.active["placement"]["name"], "best-fit");
    }

    // The backup, while the host runs.
    let out = match &original {
        Store::Embedded(_) => scratch.path().join("cloudai-backup.db"),
        Store::Mongo { .. } => scratch.path().join("cloudai-backup"),
    };
    let mut backup = strings(&["backup", "--out", out.to_str().unwrap()]);
    backup.extend(original.args());
    let printed = tool_ok(Some(&host), &backup);
    match &original {
        Store::Embedded(_) => {
            let counted = format!("{} tasks, 1 worker", task_ids.len());
            assert!(printed.contains(&counted), "{printed}");
        }
        Store::Mongo { .. } => {
            let counted = format!("TASKS: {} documents", task_ids.len());
            assert!(printed.contains(&counted), "{printed}");
            assert!(
                printed.contains("WORKER_REGISTRY: 1 documents"),
                "{printed}"
            );
        }
    }
    tool_refused(&backup, "already");
    if let Store::Embedded(dir) = &original {
        // Restoring under the running host: refused, even when forced.
        let mut restore = strings(&["restore", "--from", out.to_str().unwrap(), "--force"]);
        restore.extend(original.args());
        tool_refused(&restore, &format!("a host is running on {}", dir.display()));
    }
    drop(host);

    // Restored into a fresh store; a second restore into it is refused.
    let mut restore = strings(&["restore", "--from", out.to_str().unwrap()]);
    restore.extend(restored.args());
    let printed = tool_ok(None, &restore);
    assert!(printed.contains("restored"), "{printed}");
    match &restored {
        Store::Embedded(_) => tool_refused(&restore, "already holds a CloudAI database"),
        Store::Mongo { .. } => tool_refused(&restore, "is not empty"),
    }

    let host = TestHost::start_in(restored.kind(), &["--no-local-worker"], fresh_data_dir)
        .expect("a host starts on the restored store");
    let after = state(&host, &task_ids, &done).await;
    same(&before, &after);
    // The worker's token was restored with it.
    let beat = heartbeat(&host, "w-backup", &worker_token).await;
    assert_eq!(beat["worker"]["worker_id"], "w-backup", "{beat}");
    if wasm.is_some() {
        // The new host compiles the active version from the restored bytes.
        host.eventually(
            "the restored host to load the active best-fit",
            Duration::from_secs(120),
        )
        .every(Duration::from_millis(200))
        .until(async || {
            let listed = get(&host, "/v1/policies").await;
            let loaded = listed["versions"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|v| v["name"] == "best-fit" && v["loaded"] == true && v["active"] == true);
            if loaded {
                Ok(())
            } else {
                Err(listed.to_string())
            }
        })
        .await;
    }
}

/// A data directory for a host, and its path.
fn data_dir() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().expect("a data dir");
    let path = dir.path().to_path_buf();
    (dir, path)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_backup_taken_while_the_host_runs_restores_into_a_fresh_host() {
    let (original_dir, original) = data_dir();
    let host = TestHost::start_in(StoreKind::Embedded, &["--no-local-worker"], original_dir)
        .expect("host starts");
    let (fresh_dir, fresh) = data_dir();
    backup_restored_into_a_fresh_host_shows_the_same_state(
        Store::Embedded(original),
        host,
        Store::Embedded(fresh),
        fresh_dir,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mongo_backup_taken_while_the_host_runs_restores_into_a_fresh_database() {
    let Some(uri) = mongo_uri() else { return };
    let original = Store::Mongo {
        uri: uri.clone(),
        database: unique_database("cloudai_e2e_backup"),
    };
    let host = TestHost::start(original.kind()).expect("host starts");
    let restored = Store::Mongo {
        uri,
        database: unique_database("cloudai_e2e_restored"),
    };
    let (fresh_dir, _) = data_dir();
    backup_restored_into_a_fresh_host_shows_the_same_state(original, host, restored, fresh_dir)
        .await;
}

#[test]
fn backup_and_restore_refuse_what_is_not_a_store_of_theirs() {
    let scratch = tempfile::tempdir().unwrap();
    let path = |name: &str| scratch.path().join(name).display().to_string();
    // No database in the data directory (a typo in --data-dir).
    tool_refused(
        &strings(&[
            "backup",
            "--data-dir",
            &path("nothing"),
            "--out",
            &path("b.db"),
        ]),
        "there is no CloudAI database",
    );
    // A file that is not a backup.
    std::fs::write(scratch.path().join("junk.db"), vec![1u8; 4096]).unwrap();
    tool_refused(
        &strings(&[
            "restore",
            "--from",
            &path("junk.db"),
            "--data-dir",
            &path("d"),
        ]),
        "not a SQLite database",
    );
    assert!(!Path::new(&path("d")).join("cloudai.db").exists());
}
