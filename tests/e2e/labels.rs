//! Labels whose keys hold `.` and `/` (`app.kubernetes.io/name`) and whose values hold spaces
//! and any Unicode, end to end on both stores (the MongoDB store keeps labels as arrays of
//! `{k, v}`, so that every MongoDB-protocol server takes any key: FerretDB 1.x refused a `.`
//! in a field name):
//!
//! - the OpenAPI document states the label rules, and they are the rules the API enforces;
//! - a task and a worker keep their labels through the API, the CLI and the store, and the
//!   labels reach the input a placement policy is given (no shipped policy reads labels, so
//!   the test decodes that input: the one `cloudai policy snapshot` exports and a round builds);
//! - `cloudai serve --mongodb-uri` with its local worker (label `cloudai.local`) registers the
//!   worker and runs a real task on Docker.

use std::collections::BTreeMap;
use std::time::Duration;

use regex_automata::dfa::regex::Regex;
use reqwest::Method;
use serde_json::{Value, json};

use crate::execution::{IMAGE, docker_ready};
use crate::harness::{
    ALICE_TOKEN, StoreKind, TestHost, keep_beating, mongo_uri, submit_task, wait_until_running,
};

const KEY: &str = "app.kubernetes.io/name";
const WORKER_VALUE: &str = "Grafana Loki · zone ünïcødé 東京 🚀";
const TASK_VALUE: &str = "nightly ETL — ünïcødé 日本";

// ------------------------------------------------------------------------------------------
// The OpenAPI document states what the API enforces
// ------------------------------------------------------------------------------------------

/// The label rules of one request type, read from the served OpenAPI document.
struct LabelRules {
    max_labels: usize,
    key: Regex,
    key_lengths: (usize, usize),
    value: Regex,
    value_max: usize,
}

fn number(schema: &Value, field: &str, at: &str) -> usize {
    schema[field]
        .as_u64()
        .unwrap_or_else(|| panic!("{at} states no {field}: {schema}")) as usize
}

fn pattern(schema: &Value, at: &str) -> Regex {
    let pattern = schema["pattern"]
        .as_str()
        .unwrap_or_else(|| panic!("{at} states no pattern: {schema}"));
    Regex::new(pattern).unwrap_or_else(|e| panic!("{at}: pattern {pattern:?}: {e}"))
}

impl LabelRules {
    /// `components.schemas.SCHEMA.properties.labels` of the document.
    fn of(doc: &Value, schema: &str) -> LabelRules {
        let at = format!("{schema}.labels");
        let labels = &doc["components"]["schemas"][schema]["properties"]["labels"];
        assert_eq!(labels["type"], "object", "{at}: {labels}");
        let keys = &labels["propertyNames"];
        let values = &labels["additionalProperties"];
        assert_eq!(keys["type"], "string", "{at}.propertyNames: {labels}");
        assert_eq!(
            values["type"], "string",
            "{at}.additionalProperties: {labels}"
        );
        LabelRules {
            max_labels: number(labels, "maxProperties", &at),
            key: pattern(keys, &format!("{at}.propertyNames")),
            key_lengths: (
                number(keys, "minLength", &at),
                number(keys, "maxLength", &at),
            ),
            value: pattern(values, &format!("{at}.additionalProperties")),
            value_max: number(values, "maxLength", &at),
        }
    }

    /// Whether a client that follows the document would send these labels (JSON Schema
    /// lengths count characters).
    fn allow(&self, labels: &BTreeMap<String, String>) -> bool {
        let (min, max) = self.key_lengths;
        labels.len() <= self.max_labels
            && labels.iter().all(|(k, v)| {
                let key_chars = k.chars().count();
                self.key.is_match(k.as_str())
                    && (min..=max).contains(&key_chars)
                    && self.value.is_match(v.as_str())
                    && v.chars().count() <= self.value_max
            })
    }
}

/// Label sets on both sides of each rule, named for the failure message.
fn cases() -> Vec<(String, BTreeMap<String, String>)> {
    let one = |k: &str, v: &str| BTreeMap::from([(k.to_string(), v.to_string())]);
    let mut cases = Vec::new();
    for key in [
        KEY,
        "a",
        "team_1.x-y/z",
        "cloudai.local",
        &"k".repeat(128),
        &"k".repeat(129),
        "",
        "a b",
        "a$b",
        "a:b",
        "ключ",
        "tab\there",
    ] {
        cases.push((format!("key {key:?}"), one(key, "v")));
    }
    for value in [
        WORKER_VALUE,
        TASK_VALUE,
        "",
        "with spaces",
        &"v".repeat(256),
        &"v".repeat(257),
        &"é".repeat(256),
        &"é".repeat(257),
        "bell \u{7}",
        "new\nline",
        "delete \u{7f}",
        "next line \u{85}",
        "no-break\u{a0}space",
    ] {
        cases.push((format!("value {value:?}"), one("k", value)));
    }
    for count in [64, 65] {
        let many = (0..count)
            .map(|i| (format!("key-{i}"), format!("value {i}")))
            .collect();
        cases.push((format!("{count} labels"), many));
    }
    cases
}

/// The API's verdict on `labels` for a task and for a worker: accepted (201, the labels given
/// back unchanged) or refused (422 `validation_failed`).
async fn api_accepts(host: &TestHost, n: usize, labels: &BTreeMap<String, String>) -> (bool, bool) {
    let verdict = |what: &str, status: u16, body: &Value, stored: &Value| match status {
        201 => {
            assert_eq!(
                stored,
                &json!(labels),
                "{what}: labels changed on the way: {body}"
            );
            true
        }
        422 => {
            assert_eq!(body["error"]["code"], "validation_failed", "{what}: {body}");
            false
        }
        other => panic!("{what}: {other} {body}\nhost log:\n{}", host.log()),
    };
    let task = json!({"docker_image": "busybox", "req_cpu": 0.25, "labels": labels});
    let (status, body) = host
        .call(
            Method::POST,
            "/v1/tasks",
            Some(ALICE_TOKEN),
            Some(&task.to_string()),
            &[],
        )
        .await;
    let task = verdict("a task", status, &body, &body["labels"]);
    let worker = json!({
        "worker_id": format!("w-rule-{n}"), "worker_ip": "127.0.0.1:50052",
        "total_cpu": 1.0, "total_memory": 1.0, "total_storage": 1.0, "total_gpu": 0.0,
        "labels": labels,
    });
    let (status, body) = host
        .call(
            Method::POST,
            "/v1/workers",
            Some(&host.join_token),
            Some(&worker.to_string()),
            &[],
        )
        .await;
    let worker = verdict("a worker", status, &body, &body["worker"]["labels"]);
    (task, worker)
}

async fn the_document_states_the_label_rules_the_api_enforces(store: StoreKind) {
    let host = TestHost::start(store).expect("host starts");
    let (status, doc) = host
        .call(Method::GET, "/v1/openapi.json", None, None, &[])
        .await;
    assert_eq!(status, 200, "{doc}");
    // `propertyNames` is JSON Schema 2020-12, which OpenAPI 3.1 uses.
    let version = doc["openapi"].as_str().unwrap_or_default();
    assert!(version.starts_with("3.1"), "OpenAPI {version}");
    let tasks = LabelRules::of(&doc, "TaskSpec");
    let workers = LabelRules::of(&doc, "RegisterWorker");

    let mut mismatches = Vec::new();
    let mut verdicts = BTreeMap::new();
    for (n, (name, labels)) in cases().into_iter().enumerate() {
        let (task, worker) = api_accepts(&host, n, &labels).await;
        for (what, documented, enforced) in [
            ("task", tasks.allow(&labels), task),
            ("worker", workers.allow(&labels), worker),
        ] {
            if documented != enforced {
                mismatches.push(format!(
                    "{what} labels with {name}: the document says {}, the API {}",
                    if documented { "valid" } else { "invalid" },
                    if enforced {
                        "accepts them"
                    } else {
                        "refuses them"
                    },
                ));
            }
        }
        verdicts.insert(name, task);
    }
    assert!(mismatches.is_empty(), "{mismatches:#?}");
    // Both sides of the rules were tried: the rules themselves.
    for (case, accepted) in [
        (format!("key {KEY:?}"), true),
        ("key \"cloudai.local\"".to_string(), true),
        (format!("key {:?}", "k".repeat(128)), true),
        (format!("key {:?}", "k".repeat(129)), false),
        ("key \"\"".to_string(), false),
        ("key \"a b\"".to_string(), false),
        ("key \"ключ\"".to_string(), false),
        (format!("value {WORKER_VALUE:?}"), true),
        (format!("value {:?}", "é".repeat(256)), true),
        (format!("value {:?}", "é".repeat(257)), false),
        ("value \"next line \\u{85}\"".to_string(), false),
        ("value \"new\\nline\"".to_string(), false),
        ("64 labels".to_string(), true),
        ("65 labels".to_string(), false),
    ] {
        assert_eq!(
            verdicts.get(&case),
            Some(&accepted),
            "{case}: {verdicts:#?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_openapi_document_states_the_label_rules_the_api_enforces() {
    the_document_states_the_label_rules_the_api_enforces(StoreKind::Embedded).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mongo_openapi_document_states_the_label_rules_the_api_enforces() {
    let Some(uri) = mongo_uri() else { return };
    the_document_states_the_label_rules_the_api_enforces(StoreKind::Mongo(uri)).await;
}

// ------------------------------------------------------------------------------------------
// A task's and a worker's labels, through every path
// ------------------------------------------------------------------------------------------

fn map(value: &Value) -> BTreeMap<String, String> {
    serde_json::from_value(value.clone()).unwrap_or_else(|e| panic!("labels {value}: {e}"))
}

/// The labels of entity `i` in a policy input's label index, decoded from its strings.
fn decoded(
    strings: &[String],
    offsets: &[u32],
    pairs: &[(u32, u32)],
    i: usize,
) -> BTreeMap<String, String> {
    let (start, end) = (offsets[i] as usize, offsets[i + 1] as usize);
    pairs[start..end]
        .iter()
        .map(|(k, v)| (strings[*k as usize].clone(), strings[*v as usize].clone()))
        .collect()
}

fn stdout(host: &TestHost, out: &std::process::Output, what: &str) -> String {
    assert!(
        out.status.success(),
        "{what}: {:?}\n{}\nhost log:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr),
        host.log()
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

async fn labels_are_stored_listed_read_back_and_reach_the_policy_input(store: StoreKind) {
    let host = TestHost::start(store).expect("host starts");
    let admin = host.admin_token.clone();
    let worker_labels = json!({KEY: WORKER_VALUE, "topology.kubernetes.io/zone": "eu west 1"});
    let task_labels = json!({KEY: TASK_VALUE, "team": "data platform"});

    // A worker with the labels (through the API, as an agent registers).
    let registration = json!({
        "worker_id": "w-labelled", "worker_ip": "127.0.0.1:50052",
        "total_cpu": 2.0, "total_memory": 4.0, "total_storage": 100.0, "total_gpu": 0.0,
        "labels": worker_labels,
    });
    let (status, answer) = host
        .call(
            Method::POST,
            "/v1/workers",
            Some(&host.join_token),
            Some(&registration.to_string()),
            &[],
        )
        .await;
    assert_eq!(status, 201, "{answer}");
    assert_eq!(answer["worker"]["labels"], worker_labels, "{answer}");
    let token = answer["token"].as_str().unwrap().to_string();
    // It stays a placement candidate (an active, undrained worker) however slow the test.
    let beating = keep_beating(
        &host,
        vec![("w-labelled".to_string(), token)],
        Duration::from_secs(1),
    );

    // A filler takes both its cores, so that the labelled task waits in the queue: a round's
    // input holds the queued tasks and the candidate workers.
    let filler = submit_task(
        &host,
        ALICE_TOKEN,
        &json!({"docker_image": "busybox", "req_cpu": 2, "req_memory": 1}),
    )
    .await;
    wait_until_running(&host, &filler).await;
    // The labelled task, through the CLI.
    let out = host.cli(
        ALICE_TOKEN,
        &[
            "submit",
            "--cpu",
            "1",
            "--memory",
            "1",
            "--label",
            &format!("{KEY}={TASK_VALUE}"),
            "--label",
            "team=data platform",
            "busybox:1.36",
            "--",
            "true",
        ],
    );
    let task_id = stdout(&host, &out, "cloudai submit --label")
        .trim()
        .to_string();
    assert!(task_id.starts_with("task-"), "{task_id}");

    // Read back unchanged: one task, the list, one worker, the list.
    let (status, task) = host
        .call(
            Method::GET,
            &format!("/v1/tasks/{task_id}"),
            Some(ALICE_TOKEN),
            None,
            &[],
        )
        .await;
    assert_eq!(status, 200, "{task}");
    assert_eq!(task["labels"], task_labels, "{task}");
    assert_eq!(
        task["status"], "queued",
        "it waits for the filler's cores: {task}"
    );
    let (_, list) = host
        .call(Method::GET, "/v1/tasks", Some(ALICE_TOKEN), None, &[])
        .await;
    let listed = list["tasks"]
        .as_array()
        .and_then(|tasks| tasks.iter().find(|t| t["task_id"] == task_id.as_str()))
        .unwrap_or_else(|| panic!("{task_id} not in GET /v1/tasks: {list}"));
    assert_eq!(listed["labels"], task_labels, "{listed}");
    let (_, worker) = host
        .call(
            Method::GET,
            "/v1/workers/w-labelled",
            Some(&admin),
            None,
            &[],
        )
        .await;
    assert_eq!(worker["labels"], worker_labels, "{worker}");
    let (_, list) = host
        .call(Method::GET, "/v1/workers", Some(&admin), None, &[])
        .await;
    assert_eq!(list["workers"][0]["labels"], worker_labels, "{list}");

    // The CLI shows them (its tables do not show labels, but one task's fields and the JSON
    // output do).
    let tasks: Value = serde_json::from_str(&stdout(
        &host,
        &host.cli(ALICE_TOKEN, &["tasks", "-o", "json"]),
        "cloudai tasks -o json",
    ))
    .expect("JSON");
    let listed = tasks["tasks"]
        .as_array()
        .and_then(|tasks| tasks.iter().find(|t| t["task_id"] == task_id.as_str()))
        .unwrap_or_else(|| panic!("{task_id} not in `cloudai tasks -o json`: {tasks}"));
    assert_eq!(listed["labels"], task_labels, "{listed}");
    let shown = stdout(
        &host,
        &host.cli(ALICE_TOKEN, &["task", &task_id]),
        "cloudai task",
    );
    for part in [KEY, TASK_VALUE, "data platform"] {
        assert!(
            shown.contains(part),
            "`cloudai task` lacks {part:?}:\n{shown}"
        );
    }
    let workers: Value = serde_json::from_str(&stdout(
        &host,
        &host.cli(&admin, &["workers", "-o", "json"]),
        "cloudai workers -o json",
    ))
    .expect("JSON");
    assert_eq!(workers["workers"][0]["labels"], worker_labels, "{workers}");

    // The input a placement policy is given: the snapshot a round sees, built into the
    // contract's columns exactly as a round builds them, with the labels interned.
    let file = tempfile::NamedTempFile::new().unwrap();
    let path = file.path().to_str().unwrap();
    stdout(
        &host,
        &host.cli(&admin, &["policy", "snapshot", "-f", path]),
        "cloudai policy snapshot",
    );
    let text = std::fs::read_to_string(path).unwrap();
    let snapshot = cloudai::policy::ClusterSnapshot::from_json(&text)
        .unwrap_or_else(|e| panic!("the exported snapshot: {e}\n{text}"));
    let queued = snapshot
        .queued
        .iter()
        .find(|t| t.task_id == task_id)
        .unwrap_or_else(|| panic!("{task_id} not queued in the snapshot:\n{text}"));
    assert_eq!(queued.labels, map(&task_labels));
    let input = snapshot.placement_input();
    let columns = input.columns();
    let w = (0..input.worker_count())
        .find(|i| input.worker_id(*i as u32) == Some("w-labelled"))
        .unwrap_or_else(|| panic!("w-labelled is no candidate in the policy input:\n{text}"));
    let t = (0..input.task_count())
        .find(|i| input.task_id(*i) == Some(task_id.as_str()))
        .unwrap_or_else(|| panic!("{task_id} is not in the policy input:\n{text}"));
    let strings = &columns.strings;
    let workers = &columns.workers.labels;
    let tasks = &columns.tasks.labels;
    assert_eq!(
        decoded(strings, &workers.offsets, &workers.pairs, w),
        map(&worker_labels),
        "the worker's labels as the policy gets them"
    );
    assert_eq!(
        decoded(strings, &tasks.offsets, &tasks.pairs, t),
        map(&task_labels),
        "the task's labels as the policy gets them"
    );

    // A shipped policy decides on that input (the task waits: the filler holds the cores).
    if let Some(dir) = std::env::var_os("CLOUDAI_POLICY_WASM_DIR") {
        let wasm = std::path::PathBuf::from(dir).join("best-fit.wasm");
        let report: Value = serde_json::from_str(&stdout(
            &host,
            &host.cli(
                &admin,
                &[
                    "policy",
                    "test",
                    wasm.to_str().unwrap(),
                    "--snapshot",
                    path,
                    "-o",
                    "json",
                ],
            ),
            "cloudai policy test best-fit.wasm --snapshot",
        ))
        .expect("JSON");
        let decision = report["decisions"]
            .as_array()
            .and_then(|d| d.iter().find(|d| d["task_id"] == task_id.as_str()))
            .unwrap_or_else(|| panic!("no decision for {task_id}: {report}"));
        assert_eq!(decision["decision"], "wait", "{decision}");
    }
    beating.stop(Duration::from_secs(10)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_labels_are_stored_listed_read_back_and_reach_the_policy_input() {
    labels_are_stored_listed_read_back_and_reach_the_policy_input(StoreKind::Embedded).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mongo_labels_are_stored_listed_read_back_and_reach_the_policy_input() {
    let Some(uri) = mongo_uri() else { return };
    labels_are_stored_listed_read_back_and_reach_the_policy_input(StoreKind::Mongo(uri)).await;
}

// ------------------------------------------------------------------------------------------
// `serve` on MongoDB with its local worker
// ------------------------------------------------------------------------------------------

/// The local worker registers with the label `cloudai.local` (which FerretDB 1.x refused
/// while labels were stored as sub-documents) and runs a real container.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_on_mongodb_with_its_local_worker_runs_a_task_on_docker() {
    let Some(uri) = mongo_uri() else { return };
    if docker_ready().await.is_none() {
        return;
    }
    // No --no-local-worker: the default local worker, on the local Docker engine.
    let host =
        TestHost::start_with(StoreKind::Mongo(uri), &["--stop-grace-s", "1"]).expect("host starts");
    let admin = host.admin_token.clone();
    let worker = host
        .eventually("the local worker to register", Duration::from_secs(60))
        .every(Duration::from_millis(100))
        .until(async || {
            let (_, body) = host
                .call(Method::GET, "/v1/workers", Some(&admin), None, &[])
                .await;
            match body["workers"].as_array().map(Vec::as_slice) {
                Some([worker]) if worker["is_active"] == true => Ok(worker.clone()),
                _ => Err(body.to_string()),
            }
        })
        .await;
    assert_eq!(worker["labels"]["cloudai.local"], "true", "{worker}");

    let task_id = submit_task(
        &host,
        ALICE_TOKEN,
        &json!({"docker_image": IMAGE, "command": "sh -c 'echo hello from the local worker'",
            "req_cpu": 0.25, "req_memory": 0.25}),
    )
    .await;
    let path = format!("/v1/tasks/{task_id}");
    let task = host
        .eventually(
            format!("task {task_id} to finish on the local worker"),
            Duration::from_secs(120),
        )
        .until(async || {
            let (_, task) = host
                .call(Method::GET, &path, Some(ALICE_TOKEN), None, &[])
                .await;
            match task["status"].as_str() {
                Some("completed" | "failed" | "cancelled") => Ok(task),
                _ => Err(task.to_string()),
            }
        })
        .await;
    assert_eq!(
        (&task["status"], &task["exit_code"]),
        (&json!("completed"), &json!(0)),
        "{task}\nhost log:\n{}",
        host.log()
    );
    let (status, result) = host
        .call(
            Method::GET,
            &format!("{path}/result"),
            Some(ALICE_TOKEN),
            None,
            &[],
        )
        .await;
    assert_eq!(status, 200, "{result}");
    assert_eq!(result["logs"], "hello from the local worker\n", "{result}");
    assert_eq!(result["exit_code"], 0, "{result}");
    assert_eq!(result["worker_id"], worker["worker_id"], "{result}");
}
