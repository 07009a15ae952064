//! The event stream (`GET /v1/events`) through a real host: a client sees a task's whole life
//! in order, resumes after a disconnect with `Last-Event-ID` without losing or repeating an
//! event, sees only what it may see, and (on MongoDB) sees events caused through another
//! replica.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use reqwest::Method;
use serde_json::{Value, json};

use crate::harness::{
    ALICE_TOKEN, BOB_TOKEN, REQUEST_TIMEOUT, StoreKind, TestHost, mongo_uri, register_worker,
    unique_database, within,
};

/// One frame of the stream.
#[derive(Debug, Clone)]
pub(crate) struct Frame {
    pub(crate) id: Option<u64>,
    pub(crate) event: String,
    pub(crate) data: Value,
}

/// A streaming client that parses frames as they come.
pub(crate) struct Stream {
    response: reqwest::Response,
    buffer: String,
}

pub(crate) async fn open(
    url: &str,
    token: &str,
    query: &str,
    last_event_id: Option<u64>,
) -> Stream {
    // The stream stays open: only its opening is bounded here, each read by `Stream::next`.
    let mut request = crate::harness::stream_client()
        .get(format!("{url}/v1/events?{query}"))
        .bearer_auth(token);
    if let Some(id) = last_event_id {
        request = request.header("Last-Event-ID", id.to_string());
    }
    let what = format!("the answer to GET /v1/events?{query}");
    let response = within(&what, REQUEST_TIMEOUT, request.send())
        .await
        .unwrap_or_else(|e| panic!("GET /v1/events?{query}: {e}"));
    assert_eq!(response.status(), 200, "GET /v1/events?{query}");
    let content_type = response.headers()["content-type"].to_str().unwrap();
    assert!(
        content_type.starts_with("text/event-stream"),
        "{content_type}"
    );
    Stream {
        response,
        buffer: String::new(),
    }
}

impl Stream {
    /// The next event frame (comments skipped), or `None` when none came within `wait`.
    async fn next(&mut self, wait: Duration) -> Option<Frame> {
        let deadline = Instant::now() + wait;
        loop {
            while let Some(end) = self.buffer.find("\n\n") {
                let block: String = self.buffer.drain(..end + 2).collect();
                if let Some(frame) = parse(&block) {
                    return Some(frame);
                }
            }
            let left = deadline.checked_duration_since(Instant::now())?;
            match tokio::time::timeout(left, self.response.chunk()).await {
                Ok(Ok(Some(bytes))) => self.buffer.push_str(&String::from_utf8_lossy(&bytes)),
                Ok(Ok(None)) => panic!("the event stream ended"),
                Ok(Err(e)) => panic!("reading the event stream: {e}"),
                Err(_) => return None,
            }
        }
    }

    /// The next event frame; fails naming `what` it waited for when none came within `wait`.
    async fn expect_next(&mut self, what: &str, wait: Duration) -> Frame {
        self.next(wait)
            .await
            .unwrap_or_else(|| panic!("gave up waiting for {what}: no event frame within {wait:?}"))
    }

    /// Frames until one satisfies `done` (included); panics after `wait`.
    pub(crate) async fn until(
        &mut self,
        wait: Duration,
        done: impl Fn(&Frame) -> bool,
    ) -> Vec<Frame> {
        let deadline = Instant::now() + wait;
        let mut frames = Vec::new();
        loop {
            let left = deadline
                .checked_duration_since(Instant::now())
                .unwrap_or_default();
            let Some(frame) = self.next(left).await else {
                panic!("no matching frame within {wait:?}; got {frames:#?}");
            };
            let last = done(&frame);
            frames.push(frame);
            if last {
                return frames;
            }
        }
    }
}

fn parse(block: &str) -> Option<Frame> {
    let (mut id, mut event, mut data) = (None, None, String::new());
    for line in block.lines() {
        if let Some(v) = line.strip_prefix("id:") {
            id = Some(v.trim().parse::<u64>().expect("numeric id"));
        } else if let Some(v) = line.strip_prefix("event:") {
            event = Some(v.trim().to_string());
        } else if let Some(v) = line.strip_prefix("data:") {
            data.push_str(v.trim_start());
        }
    }
    let event = event?;
    let data = serde_json::from_str(&data).expect("JSON data");
    Some(Frame { id, event, data })
}

fn is_state(frame: &Frame, status: &str) -> bool {
    frame.event == "task.state" && frame.data["data"]["status"] == status
}

async fn submit(url: &str, token: &str) -> String {
    let spec = json!({"docker_image": "busybox", "command": "true", "req_cpu": 1, "req_memory": 1});
    let response = crate::harness::client()
        .post(format!("{url}/v1/tasks"))
        .bearer_auth(token)
        .json(&spec)
        .send()
        .await
        .unwrap_or_else(|e| panic!("POST {url}/v1/tasks: {e}"));
    assert_eq!(response.status(), 201);
    let body: Value = response.json().await.unwrap();
    body["task_id"].as_str().unwrap().to_string()
}

/// Plays a one-task worker: waits for the task's assignment, reports it started and completed.
async fn run_task(host: &TestHost, worker: &str, token: &str, task_id: &str) {
    let ass_id = host
        .eventually(
            format!("task {task_id} to be assigned to {worker}"),
            Duration::from_secs(20),
        )
        // Each check long-polls the work list.
        .every(Duration::ZERO)
        .until(async || {
            crate::harness::heartbeat(host, worker, token).await;
            let work = crate::harness::work_list(host, worker, token, 500).await;
            match work.iter().find(|(_, task)| task == task_id) {
                Some((ass_id, _)) => Ok(ass_id.clone()),
                None => Err(format!("its work list: {work:?}")),
            }
        })
        .await;
    crate::harness::report_completed(host, worker, token, &ass_id, "").await;
}

const WAIT: Duration = Duration::from_secs(20);

/// The kinds (with the status of task.state) of a task's frames.
fn life(frames: &[Frame]) -> Vec<String> {
    frames
        .iter()
        .map(|f| match f.event.as_str() {
            "task.state" => format!("state:{}", f.data["data"]["status"].as_str().unwrap()),
            other => other.to_string(),
        })
        .collect()
}

fn assert_increasing(frames: &[Frame]) {
    let ids: Vec<u64> = frames.iter().map(|f| f.id.unwrap()).collect();
    assert!(
        ids.windows(2).all(|w| w[0] < w[1]),
        "ids not increasing: {ids:?}"
    );
    for f in frames {
        assert_eq!(f.data["id"], f.id.unwrap().to_string(), "{f:?}");
    }
}

async fn task_life_and_resume(store: StoreKind) {
    let host = TestHost::start(store).unwrap();
    let token = register_worker(&host, "w-events", 4.0, 8.0).await;
    let expected = [
        "task.submitted",
        "state:queued",
        "state:running",
        "state:completed",
    ];

    // 1. One task's whole life, in order: the backlog from id 0, then live.
    let task = submit(&host.url, ALICE_TOKEN).await;
    let mut stream = open(
        &host.url,
        ALICE_TOKEN,
        &format!("task_id={task}&after=0"),
        None,
    )
    .await;
    run_task(&host, "w-events", &token, &task).await;
    let frames = stream.until(WAIT, |f| is_state(f, "completed")).await;
    assert_eq!(life(&frames), expected, "{frames:#?}");
    assert_increasing(&frames);
    for f in &frames {
        assert_eq!(f.data["task_id"], task.as_str());
        assert_eq!(f.data["user_id"], "alice");
        assert_eq!(f.data["topic"], "task");
    }
    assert_eq!(frames[0].data["data"]["status"], "pending");
    assert_eq!(frames[0].data["data"]["docker_image"], "busybox");
    assert_eq!(frames[2].data["data"]["worker_id"], "w-events");
    assert_eq!(frames[2].data["data"]["attempts"], 1);

    // 2. A client that disconnects after the first frame resumes with Last-Event-ID and gets
    // the rest, each once.
    let task = submit(&host.url, ALICE_TOKEN).await;
    let mut stream = open(
        &host.url,
        ALICE_TOKEN,
        &format!("task_id={task}&after=0"),
        None,
    )
    .await;
    let first = stream.expect_next("the first frame", WAIT).await;
    assert_eq!(first.event, "task.submitted");
    drop(stream);
    run_task(&host, "w-events", &token, &task).await;
    let mut resumed = open(&host.url, ALICE_TOKEN, &format!("task_id={task}"), first.id).await;
    let rest = resumed.until(WAIT, |f| is_state(f, "completed")).await;
    let mut all = vec![first];
    all.extend(rest);
    assert_eq!(life(&all), expected, "{all:#?}");
    assert_increasing(&all);
    // Nothing more for this task (no duplicate after the end).
    assert!(resumed.next(Duration::from_millis(500)).await.is_none());

    // 3. Visibility: bob sees worker events, and of the task events only his own.
    let mut bob = open(&host.url, BOB_TOKEN, "after=0", None).await;
    let joined = bob.expect_next("bob's worker.joined", WAIT).await;
    assert_eq!(joined.event, "worker.joined", "{joined:?}");
    assert_eq!(joined.data["worker_id"], "w-events");
    let bobs = submit(&host.url, BOB_TOKEN).await;
    let next = bob.expect_next("bob's task.submitted", WAIT).await;
    assert_eq!(next.event, "task.submitted", "{next:?}");
    assert_eq!(
        next.data["task_id"],
        bobs.as_str(),
        "bob saw another user's task: {next:?}"
    );
    // The admin sees alice's too.
    let mut admin = open(&host.url, &host.admin_token, "topics=task&after=0", None).await;
    let first = admin
        .expect_next("the admin's first task event", WAIT)
        .await;
    assert_eq!(first.data["user_id"], "alice", "{first:?}");

    // 4. Validation: 422 `validation_failed`, nothing streamed.
    for query in [
        "topics=task,bogus",
        "colour=blue",
        "after=minus-one",
        "task_id=a%20b",
    ] {
        let (status, body) = host
            .call(
                Method::GET,
                &format!("/v1/events?{query}"),
                Some(ALICE_TOKEN),
                None,
                &[],
            )
            .await;
        assert_eq!(status, 422, "{query}: {body}");
        assert_eq!(
            body["error"]["code"], "validation_failed",
            "{query}: {body}"
        );
    }
    let (status, _) = host.call(Method::GET, "/v1/events", None, None, &[]).await;
    assert_eq!(status, 401);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn embedded_event_stream_follows_a_task_and_resumes_without_loss() {
    task_life_and_resume(StoreKind::Embedded).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn mongo_event_stream_follows_a_task_and_resumes_without_loss() {
    let Some(uri) = mongo_uri() else { return };
    task_life_and_resume(StoreKind::Mongo(uri)).await;
}

/// Two replicas on one database: what happens through A reaches a client of B.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_event_caused_through_one_replica_reaches_a_client_of_another() {
    let Some(uri) = mongo_uri() else { return };
    let database = unique_database("cloudai_e2e_events");
    let store = || StoreKind::MongoDatabase {
        uri: uri.clone(),
        database: database.clone(),
    };
    let a = TestHost::start(store()).unwrap();
    let b = TestHost::start(store()).unwrap();
    // Live only (no position): what happens from now on.
    let mut on_b = open(&b.url, &b.admin_token, "topics=worker,task", None).await;
    register_worker(&a, "w-replica-a", 2.0, 4.0).await;
    let task = submit(&a.url, ALICE_TOKEN).await;
    let frames = on_b
        .until(WAIT, |f| {
            f.event == "task.submitted" && f.data["task_id"] == task.as_str()
        })
        .await;
    assert!(
        frames
            .iter()
            .any(|f| f.event == "worker.joined" && f.data["worker_id"] == "w-replica-a"),
        "{frames:#?}"
    );
    assert_increasing(&frames);
    let ids: HashSet<u64> = frames.iter().map(|f| f.id.unwrap()).collect();
    assert_eq!(ids.len(), frames.len());
}

/// A position older than the retention window: one `reset` frame, then the oldest retained.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_position_older_than_the_retention_window_gets_a_reset_first() {
    let host = TestHost::start_with(
        StoreKind::Embedded,
        &["--no-local-worker", "--event-retention", "2s"],
    )
    .unwrap();
    register_worker(&host, "w-expired", 1.0, 1.0).await;
    // Pruned within retention + its half.
    tokio::time::sleep(Duration::from_millis(3500)).await;
    register_worker(&host, "w-kept", 1.0, 1.0).await;
    let mut stream = open(&host.url, &host.admin_token, "after=0", None).await;
    let reset = stream.expect_next("the reset frame", WAIT).await;
    assert_eq!(reset.event, "reset", "{reset:?}");
    assert!(reset.id.is_none());
    assert!(reset.data["reason"].is_string(), "{reset:?}");
    let next = stream
        .expect_next("the worker.joined of w-kept", WAIT)
        .await;
    assert_eq!(next.event, "worker.joined", "{next:?}");
    assert_eq!(next.data["worker_id"], "w-kept");
    // A position still retained gets no reset.
    let mut stream = open(&host.url, &host.admin_token, "", next.id.map(|id| id - 1)).await;
    assert_eq!(
        stream
            .expect_next("the retained frame after the position", WAIT)
            .await
            .id,
        next.id
    );
}

/// A worker that falls silent: `worker.lost` and the reconciler's repairs (the worker, its
/// re-queued task) reach a client of the worker and reconciler topics; then a policy upload
/// and activation reach it on the policy topic, and a client of other topics sees none of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_lost_worker_its_repairs_and_a_policy_change_reach_a_client() {
    let host = TestHost::start_with(
        StoreKind::Embedded,
        &[
            "--no-local-worker",
            "--heartbeat-staleness-s=2",
            "--reconcile-settle-s=0",
        ],
    )
    .unwrap();
    let mut stream = open(
        &host.url,
        &host.admin_token,
        "topics=worker,reconciler,policy",
        None,
    )
    .await;
    let mut tasks_only = open(&host.url, &host.admin_token, "topics=task", None).await;
    let token = register_worker(&host, "w-silent", 2.0, 4.0).await;
    let task_id = submit(&host.url, ALICE_TOKEN).await;
    crate::harness::wait_until_running(&host, &task_id).await;
    drop(token);

    // No more heartbeats: lost after 2 s, its task re-queued (no other worker to take it).
    let frames = stream
        .until(Duration::from_secs(30), |f| {
            f.event == "reconciler.repair" && f.data["data"]["repair"] == "task_requeued"
        })
        .await;
    let kinds: Vec<&str> = frames.iter().map(|f| f.event.as_str()).collect();
    let position = |kind: &str| kinds.iter().position(|k| *k == kind);
    let joined = position("worker.joined").unwrap_or_else(|| panic!("{frames:#?}"));
    let lost = position("worker.lost").unwrap_or_else(|| panic!("{frames:#?}"));
    assert!(joined < lost, "{frames:#?}");
    assert_eq!(frames[lost].data["worker_id"], "w-silent", "{frames:#?}");
    assert!(
        frames.iter().any(|f| f.event == "reconciler.repair"
            && f.data["data"]["repair"] == "worker_lost"
            && f.data["worker_id"] == "w-silent"),
        "{frames:#?}"
    );
    let requeued = frames.last().unwrap();
    assert_eq!(requeued.data["task_id"], task_id.as_str(), "{requeued:?}");
    assert_eq!(
        requeued.data["data"]["worker_id"], "w-silent",
        "{requeued:?}"
    );
    assert!(
        frames.iter().all(|f| !f.event.starts_with("task.")),
        "{frames:#?}"
    );
    assert_increasing(&frames);
    let (_, task) = host
        .call(
            Method::GET,
            &format!("/v1/tasks/{task_id}"),
            Some(&host.admin_token),
            None,
            &[],
        )
        .await;
    assert_eq!(task["status"], "queued", "{task}");

    // The task topic saw the task's life, and nothing of the other topics.
    let frames = tasks_only
        .until(WAIT, |f| {
            is_state(f, "queued") && f.data["data"]["attempts"] == 1
        })
        .await;
    assert!(
        frames.iter().all(|f| f.event.starts_with("task.")),
        "{frames:#?}"
    );
    assert!(frames.iter().any(|f| is_state(f, "running")), "{frames:#?}");

    let Some(dir) = std::env::var_os("CLOUDAI_POLICY_WASM_DIR") else {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI must set CLOUDAI_POLICY_WASM_DIR (scripts/build-policies.sh DIR)"
        );
        eprintln!("CLOUDAI_POLICY_WASM_DIR is not set: skipping the policy events");
        return;
    };
    let file = std::path::PathBuf::from(dir).join("first-fit.wasm");
    let output = host.cli(
        &host.admin_token,
        &[
            "policy",
            "upload",
            file.to_str().unwrap(),
            "--name",
            "ff",
            "--version",
            "1",
            "--kind",
            "placement",
            "--activate",
        ],
    );
    assert!(output.status.success(), "{output:?}\n{}", host.log());
    let frames = stream.until(WAIT, |f| f.event == "policy.activated").await;
    let uploaded = frames
        .iter()
        .find(|f| f.event == "policy.uploaded")
        .unwrap_or_else(|| panic!("{frames:#?}"));
    for frame in [uploaded, frames.last().unwrap()] {
        assert_eq!(frame.data["data"]["name"], "ff", "{frame:?}");
        assert_eq!(frame.data["data"]["version"], "1", "{frame:?}");
        assert_eq!(frame.data["data"]["kind"], "placement", "{frame:?}");
    }
}
