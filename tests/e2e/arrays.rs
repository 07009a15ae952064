//! Task arrays end to end, on the embedded store and on the MongoDB-protocol test server: a
//! real `cloudai serve`, the real CLI, and (for the run) the local worker on the real Docker
//! engine. Without Docker the run test is skipped with a message (a failure under `CI`).

use std::time::Duration;

use reqwest::Method;
use serde_json::{Value, json};

use crate::execution::{IMAGE, docker_ready};
use crate::harness::{ALICE_TOKEN, BOB_TOKEN, StoreKind, TestHost, mongo_uri};

/// A host with its local worker, once the worker has joined.
async fn host_with_worker(store: StoreKind) -> TestHost {
    let host = TestHost::start_with(store, &["--stop-grace-s", "1"]).expect("host starts");
    let admin = host.admin_token.clone();
    host.eventually("the local worker to join", Duration::from_secs(60))
        .every(Duration::from_millis(100))
        .until(async || {
            let (_, body) = host
                .call(Method::GET, "/v1/workers", Some(&admin), None, &[])
                .await;
            match body["workers"].as_array().map(Vec::as_slice) {
                Some([worker]) if worker["is_active"] == true => Ok(()),
                _ => Err(body.to_string()),
            }
        })
        .await;
    host
}

fn stdout(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `cloudai submit --count 4`: one request, four containers, each with its own index;
/// `cloudai array show --wait` exits 0 once all completed; `cloudai tasks --array` lists them.
async fn an_array_runs_every_index_once_in_containers(store: StoreKind) {
    if docker_ready().await.is_none() {
        return;
    }
    let host = host_with_worker(store).await;
    let out = host.cli(
        ALICE_TOKEN,
        &[
            "submit",
            "--count",
            "4",
            "--cpu",
            "0.25",
            "--memory",
            "0.25",
            IMAGE,
            "--",
            "sh",
            "-c",
            "echo index=$CLOUDAI_ARRAY_INDEX of $CLOUDAI_ARRAY_COUNT in $CLOUDAI_ARRAY_ID",
        ],
    );
    assert_eq!(out.status.code(), Some(0), "{out:?}\n{}", host.log());
    let array_id = stdout(&out).trim().to_string();
    assert!(array_id.starts_with("array-"), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("4 tasks: 4 queued"),
        "{out:?}"
    );

    let out = host.cli_within(
        Duration::from_secs(200),
        ALICE_TOKEN,
        &["array", "show", &array_id, "--wait=180s"],
    );
    assert_eq!(out.status.code(), Some(0), "{out:?}\n{}", host.log());
    assert!(stdout(&out).contains("4 completed"), "{out:?}");

    let out = host.cli(ALICE_TOKEN, &["tasks", "--array", &array_id, "-o", "json"]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let page: Value = serde_json::from_slice(&out.stdout).unwrap();
    let tasks = page["tasks"].as_array().unwrap();
    assert_eq!(tasks.len(), 4, "{page}");
    let mut seen = Vec::new();
    for task in tasks {
        let task_id = task["task_id"].as_str().unwrap();
        let index = task["array_index"].as_u64().unwrap();
        let (status, result) = host
            .call(
                Method::GET,
                &format!("/v1/tasks/{task_id}/result"),
                Some(ALICE_TOKEN),
                None,
                &[],
            )
            .await;
        assert_eq!(status, 200, "{result}");
        assert_eq!(
            result["logs"],
            format!("index={index} of 4 in {array_id}\n"),
            "{result}"
        );
        seen.push(index);
    }
    seen.sort_unstable();
    assert_eq!(seen, vec![0, 1, 2, 3]);
    // Another user sees neither the array nor its tasks.
    let (status, _) = host
        .call(
            Method::GET,
            &format!("/v1/arrays/{array_id}"),
            Some(BOB_TOKEN),
            None,
            &[],
        )
        .await;
    assert_eq!(status, 403);
    let (_, bobs) = host
        .call(
            Method::GET,
            &format!("/v1/tasks?array_id={array_id}"),
            Some(BOB_TOKEN),
            None,
            &[],
        )
        .await;
    assert_eq!(bobs["tasks"], json!([]), "{bobs}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_array_runs_every_index_once_in_containers_on_the_embedded_store() {
    an_array_runs_every_index_once_in_containers(StoreKind::Embedded).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_array_runs_every_index_once_in_containers_on_mongodb() {
    let Some(uri) = mongo_uri() else { return };
    an_array_runs_every_index_once_in_containers(StoreKind::Mongo(uri)).await;
}

/// A large array on a cluster without workers: stored and admitted in one request, replayed
/// by its key, kept across a restart, cancelled in one request; `array show --wait` then
/// exits 1 (tasks cancelled).
/// `count` is smaller on FerretDB 1.x, whose compatibility path writes task by task.
async fn a_large_array_is_replayed_kept_and_cancelled_at_once(
    store: impl Fn() -> StoreKind,
    count: u64,
) {
    let host = TestHost::start_with(store(), &["--no-local-worker"]).expect("host starts");
    let body = json!({"count": count, "task": {"docker_image": IMAGE, "req_cpu": 0.5}}).to_string();
    let submit = async |host: &TestHost| {
        host.call_within(
            Duration::from_secs(120),
            Method::POST,
            "/v1/arrays",
            Some(ALICE_TOKEN),
            Some(&body),
            &[("Idempotency-Key", "sweep-1")],
        )
        .await
    };
    let started = std::time::Instant::now();
    let (status, array) = submit(&host).await;
    eprintln!("{count}-task array submitted in {:?}", started.elapsed());
    assert_eq!(status, 201, "{array}\n{}", host.log_tail(50));
    assert_eq!(array["count"], count);
    assert_eq!(array["tasks_by_state"]["queued"], count, "{array}");
    let array_id = array["array_id"].as_str().unwrap().to_string();

    let (status, replay) = submit(&host).await;
    assert_eq!(status, 200, "{replay}");
    assert_eq!(replay["array_id"], array_id.as_str());
    assert_eq!(replay["count"], count, "no task added by the replay");

    // A restart keeps it (MongoDB: the same database; SQLite: the same data directory).
    let host = host
        .restart(store(), &["--no-local-worker"])
        .expect("host restarts");
    let out = host.cli(ALICE_TOKEN, &["array", "show", &array_id, "-o", "json"]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let shown: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(shown["tasks_by_state"]["queued"], count, "{shown}");

    let out = host.cli(ALICE_TOKEN, &["array", "cancel", &array_id]);
    assert_eq!(out.status.code(), Some(0), "{out:?}\n{}", host.log_tail(50));
    assert!(
        stdout(&out).contains(&format!("{count} cancelled, 0 running asked to stop")),
        "{out:?}"
    );
    let out = host.cli(ALICE_TOKEN, &["array", "show", &array_id, "--wait=5s"]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "cancelled tasks: exit 1: {out:?}"
    );
    assert!(
        stdout(&out).contains(&format!("{count} cancelled")),
        "{out:?}"
    );
    // Nothing is left for a scheduler: the queue is empty.
    let (_, overview) = host
        .call(
            Method::GET,
            "/v1/overview",
            Some(&host.admin_token),
            None,
            &[],
        )
        .await;
    assert_eq!(overview["tasks_by_state"]["queued"], 0, "{overview}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_array_is_replayed_kept_and_cancelled_at_once_on_the_embedded_store() {
    a_large_array_is_replayed_kept_and_cancelled_at_once(|| StoreKind::Embedded, 2_000).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_array_is_replayed_kept_and_cancelled_at_once_on_mongodb() {
    let Some(uri) = mongo_uri() else { return };
    let database = crate::harness::unique_database("arrays");
    a_large_array_is_replayed_kept_and_cancelled_at_once(
        || StoreKind::MongoDatabase {
            uri: uri.clone(),
            database: database.clone(),
        },
        300,
    )
    .await;
}
