//! Labels whose keys hold `.` and `/` (`app.kubernetes.io/name`) and whose values hold spaces
//! and any Unicode, end to end on both stores: the OpenAPI document states the label rules,
//! and they are the rules the API enforces.

use std::collections::BTreeMap;

use regex_automata::dfa::regex::Regex;
use reqwest::Method;
use serde_json::{Value, json};

use crate::harness::{ALICE_TOKEN, StoreKind, TestHost, mongo_uri};

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
