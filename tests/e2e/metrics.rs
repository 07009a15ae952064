//! `/metrics` and `/v1/overview` through a real host: the Prometheus counters move as tasks
//! run (a simulated worker agent takes and finishes them over the worker API), and the
//! overview reports the exact numbers of a cluster built to be known, on both stores.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Duration;

use reqwest::Method;
use serde_json::{Value, json};

use crate::harness::{ALICE_TOKEN, StoreKind, TestHost, mongo_uri, register_worker};

// ------------------------------------------------------------------------------------------
// The exposition format, parsed
// ------------------------------------------------------------------------------------------

/// One sample line: `name{label="value",...} value`.
#[derive(Debug, Clone, PartialEq)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

/// A parsed scrape: the samples and the `# TYPE` of each family.
#[derive(Debug, Default)]
struct Scrape {
    samples: Vec<Sample>,
    types: HashMap<String, String>,
}

impl Scrape {
    /// Parses the Prometheus text format 0.0.4; panics on a line it cannot read.
    fn parse(text: &str) -> Scrape {
        let mut scrape = Scrape::default();
        for line in text.lines() {
            if line.is_empty() {
                continue;
            }
            if let Some(comment) = line.strip_prefix('#') {
                let mut words = comment.split_whitespace();
                if words.next() == Some("TYPE") {
                    let name = words.next().expect("a TYPE line names its family");
                    let kind = words.next().expect("a TYPE line gives a type");
                    scrape.types.insert(name.to_string(), kind.to_string());
                }
                continue;
            }
            scrape.samples.push(parse_sample(line));
        }
        scrape
    }

    /// Sum of the samples named `name` whose labels include every pair of `labels`.
    fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.samples
            .iter()
            .filter(|s| s.name == name)
            .filter(|s| {
                labels
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
            })
            .map(|s| s.value)
            .sum()
    }

    /// The value of the one sample named `name` with exactly these labels (0 when absent, as a
    /// counter not yet created).
    fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let wanted: BTreeMap<String, String> = labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let found: Vec<&Sample> = self
            .samples
            .iter()
            .filter(|s| s.name == name && s.labels == wanted)
            .collect();
        assert!(
            found.len() <= 1,
            "{name}{labels:?} appears twice: {found:?}"
        );
        found.first().map_or(0.0, |s| s.value)
    }
}

fn parse_sample(line: &str) -> Sample {
    let name_end = line
        .find(['{', ' '])
        .unwrap_or_else(|| panic!("no value in {line:?}"));
    let name = line[..name_end].to_string();
    assert!(
        !name.is_empty()
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'),
        "bad metric name in {line:?}"
    );
    let mut labels = BTreeMap::new();
    let mut rest = &line[name_end..];
    if let Some(inner) = rest.strip_prefix('{') {
        let mut chars = inner.char_indices().peekable();
        let end: usize;
        loop {
            // label name
            let mut key = String::new();
            while let Some(&(_, c)) = chars.peek() {
                if c == '=' || c == '}' {
                    break;
                }
                key.push(c);
                chars.next();
            }
            match chars.next() {
                Some((i, '}')) => {
                    end = i;
                    break;
                }
                Some((_, '=')) => {}
                other => panic!("bad labels in {line:?} at {other:?}"),
            }
            assert_eq!(chars.next().map(|(_, c)| c), Some('"'), "in {line:?}");
            let mut value = String::new();
            loop {
                match chars.next().map(|(_, c)| c) {
                    Some('\\') => match chars.next().map(|(_, c)| c) {
                        Some('n') => value.push('\n'),
                        Some(c @ ('\\' | '"')) => value.push(c),
                        other => panic!("bad escape {other:?} in {line:?}"),
                    },
                    Some('"') => break,
                    Some(c) => value.push(c),
                    None => panic!("unterminated label value in {line:?}"),
                }
            }
            labels.insert(key.trim().to_string(), value);
            match chars.peek().map(|&(_, c)| c) {
                Some(',') => {
                    chars.next();
                }
                Some('}') => {}
                other => panic!("bad labels in {line:?} at {other:?}"),
            }
        }
        rest = &inner[end + 1..];
    }
    let value = rest.split_whitespace().next().expect("a value");
    let value = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        v => v
            .parse()
            .unwrap_or_else(|e| panic!("bad value {v:?} in {line:?}: {e}")),
    };
    Sample {
        name,
        labels,
        value,
    }
}

#[test]
fn the_parser_reads_labels_escapes_and_special_values() {
    let text = "# HELP a_total A.\n# TYPE a_total counter\n\
        a_total{route=\"/v1/x/{id}\",q=\"say \\\"hi\\\"\\\\\\n\"} 3\n\
        b 1.5\nc_bucket{le=\"+Inf\"} 7\n";
    let scrape = Scrape::parse(text);
    assert_eq!(scrape.types["a_total"], "counter");
    assert_eq!(
        scrape.samples[0].labels,
        BTreeMap::from([
            ("route".to_string(), "/v1/x/{id}".to_string()),
            ("q".to_string(), "say \"hi\"\\\n".to_string()),
        ])
    );
    assert_eq!(scrape.sum("a_total", &[("route", "/v1/x/{id}")]), 3.0);
    assert_eq!(scrape.value("b", &[]), 1.5);
    assert_eq!(scrape.value("c_bucket", &[("le", "+Inf")]), 7.0);
}

// ------------------------------------------------------------------------------------------
// Helpers
// ------------------------------------------------------------------------------------------

/// `GET /metrics` with `token`: the status, the content type and the body.
async fn get_metrics(host: &TestHost, token: Option<&str>) -> (u16, String, String) {
    let mut request = crate::harness::client().get(format!("{}/metrics", host.url));
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let response = request
        .send()
        .await
        .unwrap_or_else(|e| panic!("GET /metrics: {e}\nhost log:\n{}", host.log()));
    let status = response.status().as_u16();
    let content_type = response
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default();
    (status, content_type, response.text().await.unwrap())
}

async fn scrape(host: &TestHost) -> Scrape {
    let (status, content_type, body) = get_metrics(host, Some(&host.admin_token)).await;
    assert_eq!(status, 200, "{body}");
    assert!(
        content_type.starts_with("text/plain; version=0.0.4"),
        "{content_type}"
    );
    Scrape::parse(&body)
}

/// Scrapes until `done` holds (the cluster gauges are sampled at most once a second).
async fn scrape_until(host: &TestHost, what: &str, done: impl Fn(&Scrape) -> bool) -> Scrape {
    host.eventually(what, Duration::from_secs(30))
        .every(Duration::from_millis(200))
        .until(async || {
            let scrape = scrape(host).await;
            if done(&scrape) {
                Ok(scrape)
            } else {
                Err(format!("the last scrape: {:#?}", scrape.samples))
            }
        })
        .await
}

async fn submit(host: &TestHost, spec: Value) -> String {
    crate::harness::submit_task(host, ALICE_TOKEN, &spec).await
}

/// The worker's assignments not seen before: (assignment id, task id).
async fn new_work(
    host: &TestHost,
    id: &str,
    token: &str,
    seen: &mut HashSet<String>,
) -> Vec<(String, String)> {
    crate::harness::work_list(host, id, token, 300)
        .await
        .into_iter()
        .filter(|(ass_id, _)| seen.insert(ass_id.clone()))
        .collect()
}

/// Reports an assignment started and then completed with `stdout`.
async fn complete(host: &TestHost, id: &str, token: &str, ass_id: &str, stdout: &str) {
    crate::harness::report_completed(host, id, token, ass_id, stdout).await;
}

async fn task_status(host: &TestHost, task_id: &str) -> String {
    let (status, body) = host
        .call(
            Method::GET,
            &format!("/v1/tasks/{task_id}"),
            Some(ALICE_TOKEN),
            None,
            &[],
        )
        .await;
    assert_eq!(status, 200, "{body}");
    body["status"].as_str().unwrap().to_string()
}

async fn wait_for_status(host: &TestHost, task_id: &str, wanted: &str) {
    host.eventually(
        format!("task {task_id} to be {wanted}"),
        Duration::from_secs(30),
    )
    .until(async || {
        let status = task_status(host, task_id).await;
        if status == wanted {
            Ok(())
        } else {
            Err(format!("it is {status}"))
        }
    })
    .await
}

// ------------------------------------------------------------------------------------------
// /metrics
// ------------------------------------------------------------------------------------------

const SUBMIT: [(&str, &str); 3] = [
    ("method", "POST"),
    ("route", "/v1/tasks"),
    ("status", "201"),
];

async fn counters_move_as_tasks_run(store: StoreKind) {
    let host = TestHost::start(store).unwrap();

    // Admin only.
    let (status, _, body) = get_metrics(&host, None).await;
    assert_eq!(status, 401, "{body}");
    let (status, _, body) = get_metrics(&host, Some(ALICE_TOKEN)).await;
    assert_eq!(status, 403, "{body}");

    let before = scrape(&host).await;
    assert_eq!(before.value("cloudai_workers", &[("state", "active")]), 0.0);
    assert_eq!(before.sum("cloudai_tasks", &[]), 0.0);
    assert_eq!(before.value("cloudai_api_requests_total", &SUBMIT), 0.0);

    // A two-core worker, three one-core tasks, one that no worker could ever hold.
    let id = "metrics-w1";
    let token = register_worker(&host, id, 2.0, 4.0).await;
    let mut tasks = Vec::new();
    for _ in 0..3 {
        tasks.push(
            submit(
                &host,
                json!({"docker_image": "busybox", "req_cpu": 1, "req_memory": 1}),
            )
            .await,
        );
    }
    let huge = submit(
        &host,
        json!({"docker_image": "busybox", "req_cpu": 64, "req_memory": 1}),
    )
    .await;

    // The simulated agent runs them to completion, two at a time.
    let mut seen = HashSet::new();
    let mut done = 0;
    host.eventually(
        "the simulated agent to run the 3 tasks",
        Duration::from_secs(30),
    )
    // Each check long-polls the work list.
    .every(Duration::ZERO)
    .until(async || {
        crate::harness::heartbeat(&host, id, &token).await;
        for (ass, task) in new_work(&host, id, &token, &mut seen).await {
            assert!(tasks.contains(&task), "unexpected work {task}");
            complete(&host, id, &token, &ass, "hello metrics\n").await;
            done += 1;
        }
        if done >= tasks.len() {
            Ok(())
        } else {
            Err(format!("{done} of them done"))
        }
    })
    .await;
    wait_for_status(&host, &huge, "failed").await;

    let after = scrape_until(&host, "3 completed tasks and 1 failed", |s| {
        s.value("cloudai_tasks", &[("state", "completed")]) == 3.0
            && s.value("cloudai_tasks", &[("state", "failed")]) == 1.0
    })
    .await;

    // Every family, with its type (a family with no labelled sample yet is not printed: the
    // policy failure counters stay absent while no policy fails).
    for (name, kind) in [
        ("cloudai_api_requests_total", "counter"),
        ("cloudai_api_request_duration_seconds", "histogram"),
        ("cloudai_scheduler_round_duration_seconds", "histogram"),
        ("cloudai_scheduler_round_batch_size", "histogram"),
        ("cloudai_scheduler_placements_total", "counter"),
        ("cloudai_scheduler_waits_total", "counter"),
        ("cloudai_scheduler_unschedulable_total", "counter"),
        ("cloudai_policy_call_duration_seconds", "histogram"),
        ("cloudai_reconciler_repairs_total", "counter"),
        ("cloudai_container_start_duration_seconds", "histogram"),
        ("cloudai_log_stored_bytes_total", "counter"),
        ("cloudai_output_files_stored_bytes_total", "counter"),
        ("cloudai_events_recorded_total", "counter"),
        ("cloudai_event_stream_client_lags_total", "counter"),
        ("cloudai_tasks", "gauge"),
        ("cloudai_queue_depth", "gauge"),
        ("cloudai_workers", "gauge"),
        ("cloudai_capacity_cpu_cores", "gauge"),
        ("cloudai_allocated_memory_bytes", "gauge"),
        ("cloudai_placements_last_minute", "gauge"),
    ] {
        assert_eq!(
            after.types.get(name).map(String::as_str),
            Some(kind),
            "{name}: {:?}",
            after.types
        );
    }

    // API requests by route template and status, with their latencies.
    assert_eq!(after.value("cloudai_api_requests_total", &SUBMIT), 4.0);
    assert_eq!(
        after.value(
            "cloudai_api_request_duration_seconds_count",
            &[("method", "POST"), ("route", "/v1/tasks")]
        ),
        4.0
    );
    assert!(
        after.sum(
            "cloudai_api_requests_total",
            &[
                ("route", "/v1/workers/{worker_id}/heartbeat"),
                ("status", "200")
            ]
        ) >= 1.0
    );
    assert_eq!(
        after.value(
            "cloudai_api_requests_total",
            &[("method", "GET"), ("route", "/metrics"), ("status", "403")]
        ),
        1.0
    );
    // Bounded cardinality: no label carries an id.
    for sample in &after.samples {
        for value in sample.labels.values() {
            assert!(
                !value.contains(id) && !tasks.iter().any(|t| value.contains(t.as_str())),
                "a raw id in a label: {sample:?}"
            );
        }
    }

    // The scheduler's decisions.
    let delta = |name: &str| after.value(name, &[]) - before.value(name, &[]);
    assert_eq!(delta("cloudai_scheduler_placements_total"), 3.0);
    assert_eq!(delta("cloudai_scheduler_unschedulable_total"), 1.0);
    assert!(delta("cloudai_scheduler_round_duration_seconds_count") >= 1.0);
    assert!(delta("cloudai_scheduler_round_batch_size_sum") >= 4.0);
    assert!(
        after.value(
            "cloudai_policy_call_duration_seconds_count",
            &[
                ("kind", "placement"),
                ("policy", "native"),
                ("version", "builtin")
            ]
        ) >= 1.0
    );
    assert_eq!(
        after.value(
            "cloudai_policy_call_duration_seconds_count",
            &[
                ("kind", "admission"),
                ("policy", "native"),
                ("version", "builtin")
            ]
        ),
        4.0,
        "one admission check per task"
    );

    // The cluster gauges.
    assert_eq!(after.value("cloudai_tasks", &[("state", "running")]), 0.0);
    assert_eq!(after.value("cloudai_queue_depth", &[]), 0.0);
    assert_eq!(after.value("cloudai_workers", &[("state", "active")]), 1.0);
    assert_eq!(after.value("cloudai_capacity_cpu_cores", &[]), 2.0);
    assert_eq!(
        after.value("cloudai_capacity_memory_bytes", &[]),
        4.0 * 1_073_741_824.0
    );
    assert_eq!(after.value("cloudai_allocated_cpu_cores", &[]), 0.0);
    assert_eq!(after.value("cloudai_placements_last_minute", &[]), 3.0);

    // The results' logs were stored and counted.
    assert_eq!(
        after.value("cloudai_log_stored_bytes_total", &[("source", "result")]),
        3.0 * "hello metrics\n".len() as f64
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_metrics_counters_move_as_tasks_run() {
    counters_move_as_tasks_run(StoreKind::Embedded).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mongo_metrics_counters_move_as_tasks_run() {
    let Some(uri) = mongo_uri() else { return };
    counters_move_as_tasks_run(StoreKind::Mongo(uri)).await;
}

// ------------------------------------------------------------------------------------------
// /v1/overview
// ------------------------------------------------------------------------------------------

async fn overview(host: &TestHost) -> Value {
    let (status, body) = host
        .call(Method::GET, "/v1/overview", Some(ALICE_TOKEN), None, &[])
        .await;
    assert_eq!(status, 200, "{body}");
    body
}

async fn overview_reports_a_known_cluster(store: StoreKind) {
    // Workers without a heartbeat for 3 s are lost.
    let host =
        TestHost::start_with(store, &["--no-local-worker", "--heartbeat-staleness-s=3"]).unwrap();

    let (status, body) = host
        .call(Method::GET, "/v1/overview", None, None, &[])
        .await;
    assert_eq!(status, 401, "{body}");
    assert_eq!(body["error"]["code"], "unauthorized", "{body}");
    let (status, body) = host
        .call(
            Method::GET,
            "/v1/overview?verbose=1",
            Some(ALICE_TOKEN),
            None,
            &[],
        )
        .await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"]["code"], "invalid_query", "{body}");

    // Four workers: two active, one draining, one that never heartbeats (lost).
    let lost = register_worker(&host, "ov-lost", 16.0, 32.0).await;
    drop(lost);
    let mut live = Vec::new();
    for (id, cpu, memory) in [("ov-a", 4.0, 8.0), ("ov-b", 2.0, 4.0), ("ov-c", 8.0, 16.0)] {
        live.push((
            id.to_string(),
            register_worker(&host, id, cpu, memory).await,
        ));
    }
    let (status, body) = host
        .call(
            Method::POST,
            "/v1/workers/ov-c/drain",
            Some(&host.admin_token),
            None,
            &[],
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let beating = crate::harness::keep_beating(&host, live.clone(), Duration::from_millis(250));

    // The silent worker is lost before any task is submitted, so that none is placed on it.
    host.eventually("ov-lost to be marked lost", Duration::from_secs(30))
        .every(Duration::from_millis(200))
        .until(async || {
            let body = overview(&host).await;
            if body["workers"]["lost"] == 1 {
                Ok(())
            } else {
                Err(body.to_string())
            }
        })
        .await;

    // Tasks in known states: one completed, one running, one failed (no worker could ever
    // hold it), one queued (only the draining worker could), one cancelled.
    let small = |memory: f64| json!({"docker_image": "busybox", "req_cpu": 1, "req_memory": memory, "req_storage": 2});
    let first = submit(&host, small(1.0)).await;
    let second = submit(&host, small(2.0)).await;
    let failed = submit(&host, json!({"docker_image": "busybox", "req_cpu": 64})).await;
    let queued = submit(&host, json!({"docker_image": "busybox", "req_cpu": 6})).await;
    let cancelled = submit(&host, json!({"docker_image": "busybox", "req_cpu": 6})).await;
    wait_for_status(&host, &first, "running").await;
    wait_for_status(&host, &second, "running").await;
    wait_for_status(&host, &failed, "failed").await;
    let (status, body) = host
        .call(
            Method::POST,
            &format!("/v1/tasks/{cancelled}/cancel"),
            Some(ALICE_TOKEN),
            None,
            &[],
        )
        .await;
    assert_eq!(status, 200, "{body}");
    wait_for_status(&host, &cancelled, "cancelled").await;
    // The first task completes on whichever worker it was placed on.
    let mut seen = HashSet::new();
    host.eventually(format!("an assignment of {first}"), Duration::from_secs(30))
        // Each check long-polls the work lists.
        .every(Duration::ZERO)
        .until(async || {
            for (id, token) in &live {
                for (ass, task) in new_work(&host, id, token, &mut seen).await {
                    if task == first {
                        complete(&host, id, token, &ass, "").await;
                        return Ok(());
                    }
                }
            }
            Err(format!("assignments seen: {seen:?}"))
        })
        .await;
    wait_for_status(&host, &first, "completed").await;
    assert_eq!(task_status(&host, &queued).await, "queued");
    assert_eq!(task_status(&host, &second).await, "running");

    // The overview, once the lost worker is marked and the sample is fresh.
    let body = host
        .eventually("the overview to settle", Duration::from_secs(30))
        .every(Duration::from_millis(200))
        .until(async || {
            let body = overview(&host).await;
            if body["workers"]["lost"] == 1 && body["tasks_by_state"]["completed"] == 1 {
                Ok(body)
            } else {
                Err(body.to_string())
            }
        })
        .await;
    beating.stop(Duration::from_secs(10)).await;
    let generated_at = body["generated_at"].as_str().unwrap().to_string();
    assert!(
        chrono::DateTime::parse_from_rfc3339(&generated_at).is_ok(),
        "{generated_at}"
    );
    let mut body = body;
    body.as_object_mut().unwrap().remove("generated_at");
    assert_eq!(
        body,
        json!({
            "tasks_by_state": {"pending": 0, "queued": 1, "running": 1, "completed": 1, "failed": 1, "cancelled": 1},
            "queue_depth": 1,
            "workers": {"total": 4, "active": 2, "draining": 1, "lost": 1},
            "capacity": {"cpu": 6.0, "memory": 12.0, "storage": 200.0, "gpu": 0.0},
            "allocated": {"cpu": 1.0, "memory": 2.0, "storage": 2.0, "gpu": 0.0},
            "placements_last_minute": 2,
            "active_policies": {"placement": null, "admission": null},
        })
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_overview_reports_a_known_cluster() {
    overview_reports_a_known_cluster(StoreKind::Embedded).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mongo_overview_reports_a_known_cluster() {
    let Some(uri) = mongo_uri() else { return };
    overview_reports_a_known_cluster(StoreKind::Mongo(uri)).await;
}
