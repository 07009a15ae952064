//! Handler tests of `/v1/policies` and `/v1/cluster/snapshot`: the real router over a real
//! SQLite store and a real policy runtime, with the guests built by
//! `scripts/build-policies.sh` (skipped without `$CLOUDAI_POLICY_WASM_DIR`, failed under CI).
//! Every refused upload is checked to have stored and kept nothing.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::http::{Method, Request, StatusCode, header};
use http_body_util::BodyExt;
use serde_json::{Value, json};
use tower::ServiceExt;

use crate::auth::{Authenticator, Role, TokenEntry, token_sha256_hex};
use crate::model::{Resources, TaskStatus};
use crate::policy::snapshot::ClusterSnapshot;
use crate::policy::testing::{guest, wasm_dir};
use crate::policy::{EngineSettings, PolicyEngine, PolicyRuntime, RuntimeSettings};
use crate::store::BlobStore;
use crate::store::Store;
use crate::store::TaskStore;
use crate::store::WorkerStore;
use crate::store::conformance::{sample_task_at, sample_worker, unique_id};
use crate::store::sqlite::SqliteStore;
use crate::{AppState, Limits, router};

const ADMIN: &str = "cai_u_ops_policies_0123456789";
const ALICE: &str = "cai_u_alice_policies_0123456789";

struct Api {
    _dir: tempfile::TempDir,
    app: Router,
    store: Arc<SqliteStore>,
    runtime: Arc<PolicyRuntime>,
    wasm: PathBuf,
}

struct Reply {
    status: StatusCode,
    body: Value,
}

impl Reply {
    fn code(&self) -> &str {
        self.body["error"]["code"].as_str().unwrap_or("<no code>")
    }
    fn message(&self) -> &str {
        self.body["error"]["message"].as_str().unwrap_or_default()
    }
}

impl Api {
    fn new() -> Option<Api> {
        Self::with_limits(Limits::default())
    }

    fn with_limits(limits: Limits) -> Option<Api> {
        let wasm = wasm_dir()?;
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(SqliteStore::open_in_dir(dir.path()).unwrap());
        let runtime = Arc::new(PolicyRuntime::new(
            PolicyEngine::new(EngineSettings::default()).unwrap(),
            RuntimeSettings::default(),
        ));
        let entry = |user: &str, role, token: &str| TokenEntry {
            user_id: user.into(),
            role,
            token_sha256: token_sha256_hex(token),
        };
        let wakeup = crate::scheduler::Wakeup::new();
        let state = AppState {
            store: store.clone(),
            lifecycle: crate::lifecycle::Lifecycle::new(store.clone(), wakeup.clone()),
            auth: Arc::new(Authenticator::new(
                vec![
                    entry("ops", Role::Admin, ADMIN),
                    entry("alice", Role::User, ALICE),
                ],
                None,
            )),
            limits: Arc::new(limits),
            policies: runtime.clone(),
            work: crate::scheduler::WorkSignal::new(),
        };
        Some(Api {
            _dir: dir,
            app: router(state),
            store,
            runtime,
            wasm,
        })
    }

    fn guest(&self, name: &str) -> Vec<u8> {
        guest(&self.wasm, name)
    }

    async fn send(&self, request: Request<Body>) -> Reply {
        let response = self.app.clone().oneshot(request).await.unwrap();
        let status = response.status();
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        let body = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes).unwrap_or_else(|e| panic!("non-JSON ({e}): {bytes:?}"))
        };
        Reply { status, body }
    }

    async fn json(&self, method: Method, uri: &str, token: &str, body: Option<Value>) -> Reply {
        let mut builder = Request::builder()
            .method(method)
            .uri(uri)
            .header(header::AUTHORIZATION, format!("Bearer {token}"));
        let body = match body {
            Some(v) => {
                builder = builder.header(header::CONTENT_TYPE, "application/json");
                Body::from(v.to_string())
            }
            None => Body::empty(),
        };
        self.send(builder.body(body).unwrap()).await
    }

    /// Raw upload: fields in the query string.
    async fn upload(&self, query: &str, bytes: Vec<u8>) -> Reply {
        let request = Request::builder()
            .method(Method::POST)
            .uri(format!("/v1/policies?{query}"))
            .header(header::AUTHORIZATION, format!("Bearer {ADMIN}"))
            .header(header::CONTENT_TYPE, "application/wasm")
            .body(Body::from(bytes))
            .unwrap();
        self.send(request).await
    }

    /// Raw upload asking for its progress as Server-Sent Events.
    async fn upload_streaming(&self, query: &str, bytes: Vec<u8>) -> axum::response::Response {
        let request = Request::builder()
            .method(Method::POST)
            .uri(format!("/v1/policies?{query}"))
            .header(header::AUTHORIZATION, format!("Bearer {ADMIN}"))
            .header(header::CONTENT_TYPE, "application/wasm")
            .header(header::ACCEPT, "text/event-stream")
            .body(Body::from(bytes))
            .unwrap();
        self.app.clone().oneshot(request).await.unwrap()
    }

    /// A streamed upload's events, `(name, data)`, read until the stream ends.
    async fn upload_events(&self, query: &str, bytes: Vec<u8>) -> Vec<(String, Value)> {
        let response = self.upload_streaming(query, bytes).await;
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(
            response.headers()[header::CONTENT_TYPE],
            "text/event-stream"
        );
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        sse_events(std::str::from_utf8(&bytes).unwrap())
    }

    async fn upload_ok(&self, guest: &str, name: &str, version: &str) -> Value {
        let reply = self
            .upload(&format!("name={name}&version={version}"), self.guest(guest))
            .await;
        assert_eq!(reply.status, StatusCode::CREATED, "{}", reply.body);
        reply.body
    }

    /// Multipart upload: every field a part.
    async fn upload_multipart(&self, fields: &[(&str, &str)], component: &[u8]) -> Reply {
        let boundary = "cloudai-test-boundary-7MA4YWxk";
        let mut body = Vec::new();
        for (name, value) in fields {
            body.extend_from_slice(
                format!(
                    "--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n{value}\r\n"
                )
                .as_bytes(),
            );
        }
        body.extend_from_slice(
            format!(
                "--{boundary}\r\nContent-Disposition: form-data; name=\"component\"; \
                 filename=\"p.wasm\"\r\nContent-Type: application/wasm\r\n\r\n"
            )
            .as_bytes(),
        );
        body.extend_from_slice(component);
        body.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
        let request = Request::builder()
            .method(Method::POST)
            .uri("/v1/policies")
            .header(header::AUTHORIZATION, format!("Bearer {ADMIN}"))
            .header(
                header::CONTENT_TYPE,
                format!("multipart/form-data; boundary={boundary}"),
            )
            .body(Body::from(body))
            .unwrap();
        self.send(request).await
    }

    async fn activate(&self, name: &str, body: Value) -> Reply {
        self.json(
            Method::POST,
            &format!("/v1/policies/{name}/activate"),
            ADMIN,
            Some(body),
        )
        .await
    }

    async fn assert_nothing_stored(&self, what: &str) {
        assert!(
            self.store
                .list_policy_versions(None)
                .await
                .unwrap()
                .is_empty(),
            "{what}: something was stored"
        );
        assert!(
            self.runtime.versions().is_empty(),
            "{what}: something was kept loaded"
        );
    }
}

fn active_here(api: &Api, kind: crate::policy::PolicyKind) -> Option<(String, String)> {
    api.runtime.active(kind)
}

fn pair(n: &str, v: &str) -> Option<(String, String)> {
    Some((n.to_string(), v.to_string()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uploads_raw_and_multipart_are_validated_stored_and_listed() {
    let Some(api) = Api::new() else { return };
    let raw = api.upload_ok("best-fit", "best-fit", "1.0.0").await;
    assert_eq!(raw["kind"], "placement");
    assert_eq!(raw["policy"]["name"], "best-fit");
    assert_eq!(raw["policy"]["uploaded_by"], "ops");
    assert_eq!(
        raw["policy"]["sha256"],
        crate::store::sha256_hex(&api.guest("best-fit"))
    );
    assert!(raw["compile_ms"].as_f64().unwrap() >= 0.0);
    assert!(raw["validate_ms"].as_f64().unwrap() > 0.0);

    let multipart = api
        .upload_multipart(
            &[
                ("name", "spread"),
                ("version", "2+b.1"),
                ("kind", "placement"),
                ("config", "{}"),
                ("memory_mb", "32"),
                ("deadline_ms", "40"),
            ],
            &api.guest("spread"),
        )
        .await;
    assert_eq!(multipart.status, StatusCode::CREATED, "{}", multipart.body);
    assert_eq!(multipart.body["policy"]["memory_bytes"], 32 << 20);
    assert_eq!(multipart.body["policy"]["deadline_ms"], 40);
    let stored = api
        .store
        .get_policy_version("spread", "2+b.1")
        .await
        .unwrap();
    assert_eq!(stored.memory_bytes, Some(32 << 20));

    let list = api.json(Method::GET, "/v1/policies", ADMIN, None).await;
    assert_eq!(list.status, StatusCode::OK, "{}", list.body);
    let versions = list.body["versions"].as_array().unwrap();
    assert_eq!(versions.len(), 2);
    for v in versions {
        assert_eq!(v["loaded"], true, "{v}");
        assert_eq!(v["active"], false, "{v}");
        assert!(v["load_error"].is_null(), "{v}");
    }
    assert!(list.body["active"]["placement"].is_null());
    let one = api
        .json(Method::GET, "/v1/policies/spread", ADMIN, None)
        .await;
    assert_eq!(one.body["versions"].as_array().unwrap().len(), 1);
    let none = api
        .json(Method::GET, "/v1/policies/nope", ADMIN, None)
        .await;
    assert_eq!(
        (none.status, none.code()),
        (StatusCode::NOT_FOUND, "policy_not_found")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_uploads_are_refused_with_a_reason_and_store_nothing() {
    let Some(api) = Api::new() else { return };
    // (query, bytes, what the reason must mention)
    let core_module = b"\0asm\x01\0\0\0".to_vec();
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "name=junk&version=1",
            b"hello, not wasm".to_vec(),
            "not a valid WebAssembly component",
        ),
        (
            "name=core&version=1",
            core_module,
            "not a valid WebAssembly component",
        ),
        (
            "name=best-fit&version=1&kind=admission",
            api.guest("best-fit"),
            "implements the placement world, not admission",
        ),
        (
            "name=caps&version=1&config=%7B%22max_cpu%22%3A%22lots%22%7D",
            api.guest("request-caps"),
            "configuration rejected",
        ),
        (
            "name=trap&version=1",
            api.guest("fixture-trap"),
            "smoke test",
        ),
    ];
    for (query, bytes, reason) in cases {
        let reply = api.upload(query, bytes).await;
        assert_eq!(
            (reply.status, reply.code()),
            (StatusCode::UNPROCESSABLE_ENTITY, "policy_invalid"),
            "{query}: {}",
            reply.body
        );
        assert!(
            reply.message().contains(reason),
            "{query}: {}",
            reply.message()
        );
        api.assert_nothing_stored(query).await;
    }
    // Fields are checked before anything is compiled.
    for (query, reason) in [
        ("version=1", "name is required"),
        ("name=Bad&version=1", "must match"),
        ("name=ok&version=-1", "must match"),
        ("name=ok&version=1&kind=both", "unknown policy kind"),
        ("name=ok&version=1&config=%7Bnot", "config is not JSON"),
        ("name=ok&version=1&memory_mb=100000", "memory limit"),
        ("name=ok&version=1&deadline_ms=0", "deadline"),
    ] {
        let reply = api.upload(query, api.guest("best-fit")).await;
        assert_eq!(
            reply.status,
            StatusCode::UNPROCESSABLE_ENTITY,
            "{query}: {}",
            reply.body
        );
        assert!(
            reply.message().contains(reason),
            "{query}: {}",
            reply.message()
        );
    }
    let unknown = api
        .upload("name=ok&version=1&colour=red", api.guest("best-fit"))
        .await;
    assert_eq!(unknown.status, StatusCode::BAD_REQUEST, "{}", unknown.body);
    let no_part = api
        .upload_multipart(&[("name", "x"), ("version", "1")], b"")
        .await;
    assert_eq!(
        no_part.status,
        StatusCode::UNPROCESSABLE_ENTITY,
        "{}",
        no_part.body
    );
    api.assert_nothing_stored("invalid fields").await;

    // Larger than the host's limit for components: 413, whatever else is wrong.
    let small = Api::with_limits(Limits {
        max_policy_bytes: 4096,
        ..Limits::default()
    })
    .unwrap();
    let reply = small.upload("name=big&version=1", vec![0u8; 8192]).await;
    assert_eq!(
        (reply.status, reply.code()),
        (StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large"),
        "{}",
        reply.body
    );
    let reply = small
        .upload_multipart(&[("name", "big"), ("version", "1")], &[0u8; 8192])
        .await;
    assert_eq!(
        reply.status,
        StatusCode::PAYLOAD_TOO_LARGE,
        "{}",
        reply.body
    );
    small.assert_nothing_stored("too large").await;
}

/// `(event, data)` of each Server-Sent Event in `text` (keep-alive comments skipped).
fn sse_events(text: &str) -> Vec<(String, Value)> {
    text.split("\n\n")
        .filter_map(|block| {
            let mut name = None;
            let mut data = None;
            for line in block.lines() {
                if let Some(v) = line.strip_prefix("event:") {
                    name = Some(v.trim().to_string());
                } else if let Some(v) = line.strip_prefix("data:") {
                    data = Some(serde_json::from_str(v.trim()).unwrap());
                }
            }
            Some((name?, data?))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_streamed_upload_reports_each_stage_in_order_then_stored() {
    let Some(api) = Api::new() else { return };
    let component = api.guest("best-fit");
    let size = component.len() as u64;
    let events = api
        .upload_events("name=best-fit&version=1", component)
        .await;
    let (last, progress) = events.split_last().unwrap();
    let mut stages: Vec<&str> = Vec::new();
    let mut elapsed = 0;
    for (name, data) in progress {
        assert_eq!(name, "progress", "{events:?}");
        assert_eq!(data["bytes"], size, "{data}");
        let ms = data["elapsed_ms"].as_u64().unwrap();
        assert!(ms >= elapsed, "{events:?}");
        elapsed = ms;
        let stage = data["stage"].as_str().unwrap();
        if stages.last() != Some(&stage) {
            stages.push(stage);
        }
    }
    assert_eq!(
        stages,
        ["received", "compiling", "validating", "storing"],
        "{events:?}"
    );
    assert_eq!(last.0, "stored", "{events:?}");
    // The same answer as a 201.
    assert_eq!(last.1["policy"]["name"], "best-fit");
    assert_eq!(last.1["kind"], "placement");
    assert!(last.1["validate_ms"].as_f64().unwrap() > 0.0);
    let stored = api.store.get_policy_version("best-fit", "1").await.unwrap();
    assert_eq!(stored.size_bytes, size);
    let list = api.json(Method::GET, "/v1/policies", ADMIN, None).await;
    assert_eq!(list.body["versions"][0]["loaded"], true, "{}", list.body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_streamed_bad_upload_fails_with_the_reason_and_a_taken_version_is_409_first() {
    let Some(api) = Api::new() else { return };
    let events = api
        .upload_events("name=trap&version=1", api.guest("fixture-trap"))
        .await;
    let (name, data) = events.last().unwrap();
    assert_eq!(name, "failed", "{events:?}");
    assert_eq!(data["error"]["code"], "policy_invalid", "{data}");
    assert!(
        data["error"]["message"]
            .as_str()
            .unwrap()
            .contains("smoke test"),
        "{data}"
    );
    assert!(
        events.iter().all(|(n, _)| n == "progress" || n == "failed"),
        "{events:?}"
    );
    api.assert_nothing_stored("a streamed trap").await;

    // Refused before any stream: a plain JSON error.
    let events = api
        .upload_events("name=best-fit&version=1", api.guest("best-fit"))
        .await;
    assert_eq!(events.last().unwrap().0, "stored", "{events:?}");
    let taken = api
        .upload_streaming("name=best-fit&version=1", api.guest("spread"))
        .await;
    assert_eq!(taken.status(), StatusCode::CONFLICT);
    let body = taken.into_body().collect().await.unwrap().to_bytes();
    let body: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(body["error"]["code"], "policy_exists", "{body}");
    let bad = api
        .upload_streaming("name=Bad&version=1", api.guest("spread"))
        .await;
    assert_eq!(bad.status(), StatusCode::UNPROCESSABLE_ENTITY);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_leaves_a_streamed_upload_does_not_cancel_it() {
    let Some(api) = Api::new() else { return };
    let response = api
        .upload_streaming("name=spread&version=1", api.guest("spread"))
        .await;
    assert_eq!(response.status(), StatusCode::OK);
    // Gone after the first event.
    let mut body = response.into_body();
    let first = body.frame().await.unwrap().unwrap();
    assert!(first.is_data());
    drop(body);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        if let Ok(stored) = api.store.get_policy_version("spread", "1").await {
            assert_eq!(stored.name, "spread");
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "never stored after the client left"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(api.runtime.versions().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_taken_version_is_409_and_users_get_403_everywhere() {
    let Some(api) = Api::new() else { return };
    api.upload_ok("best-fit", "best-fit", "1").await;
    let again = api
        .upload("name=best-fit&version=1", api.guest("spread"))
        .await;
    assert_eq!(
        (again.status, again.code()),
        (StatusCode::CONFLICT, "policy_exists"),
        "{}",
        again.body
    );
    let kept = api.store.get_policy_version("best-fit", "1").await.unwrap();
    assert_eq!(
        kept.sha256,
        crate::store::sha256_hex(&api.guest("best-fit"))
    );

    let routes = [
        (Method::POST, "/v1/policies?name=x&version=1"),
        (Method::GET, "/v1/policies"),
        (Method::GET, "/v1/policies/best-fit"),
        (Method::POST, "/v1/policies/best-fit/activate"),
        (Method::POST, "/v1/policies/rollback"),
        (Method::DELETE, "/v1/policies/best-fit/versions/1"),
        (Method::POST, "/v1/policies/best-fit/dry-run"),
        (Method::GET, "/v1/cluster/snapshot"),
    ];
    for (method, uri) in routes {
        let body = (method == Method::POST).then(|| json!({"version": "1", "kind": "placement"}));
        let reply = api.json(method.clone(), uri, ALICE, body).await;
        assert_eq!(
            (reply.status, reply.code()),
            (StatusCode::FORBIDDEN, "forbidden"),
            "{method} {uri}: {}",
            reply.body
        );
    }
    assert_eq!(api.store.list_policy_versions(None).await.unwrap().len(), 1);
    assert_eq!(
        api.store
            .get_active_policy(crate::model::PolicyKind::Placement)
            .await
            .unwrap(),
        None
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn activate_is_a_compare_and_swap_then_rollback_and_delete() {
    use crate::policy::PolicyKind::Placement;
    let Some(api) = Api::new() else { return };
    api.upload_ok("best-fit", "best-fit", "1").await;
    api.upload_ok("spread", "spread", "1").await;

    let first = api
        .activate(
            "best-fit",
            json!({"version": "1", "expected_current": null}),
        )
        .await;
    assert_eq!(first.status, StatusCode::OK, "{}", first.body);
    assert_eq!(first.body["name"], "best-fit");
    assert_eq!(active_here(&api, Placement), pair("best-fit", "1"));

    let stale = api
        .activate(
            "spread",
            json!({"version": "1", "expected_current": {"name": "first-fit", "version": "1"}}),
        )
        .await;
    assert_eq!(
        (stale.status, stale.code()),
        (StatusCode::CONFLICT, "policy_conflict"),
        "{}",
        stale.body
    );
    assert!(
        stale.message().contains("best-fit@1"),
        "{}",
        stale.message()
    );
    assert_eq!(active_here(&api, Placement), pair("best-fit", "1"));

    let swapped = api.activate("spread", json!({"version": "1"})).await;
    assert_eq!(swapped.status, StatusCode::OK, "{}", swapped.body);
    assert_eq!(swapped.body["previous"], json!(["best-fit", "1"]));
    assert_eq!(active_here(&api, Placement), pair("spread", "1"));
    let list = api.json(Method::GET, "/v1/policies", ADMIN, None).await;
    assert_eq!(list.body["active"]["placement"]["name"], "spread");

    let unknown = api.activate("spread", json!({"version": "9"})).await;
    assert_eq!(
        (unknown.status, unknown.code()),
        (StatusCode::NOT_FOUND, "policy_not_found")
    );

    let rollback = api
        .json(
            Method::POST,
            "/v1/policies/rollback",
            ADMIN,
            Some(json!({"kind": "placement"})),
        )
        .await;
    assert_eq!(rollback.status, StatusCode::OK, "{}", rollback.body);
    assert_eq!(rollback.body["name"], "best-fit");
    assert_eq!(active_here(&api, Placement), pair("best-fit", "1"));
    let none = api
        .json(
            Method::POST,
            "/v1/policies/rollback",
            ADMIN,
            Some(json!({"kind": "admission"})),
        )
        .await;
    assert_eq!(
        (none.status, none.code()),
        (StatusCode::CONFLICT, "no_previous_version")
    );

    let active = api
        .json(
            Method::DELETE,
            "/v1/policies/best-fit/versions/1",
            ADMIN,
            None,
        )
        .await;
    assert_eq!(
        (active.status, active.code()),
        (StatusCode::CONFLICT, "policy_active")
    );
    assert!(api.runtime.loaded_kind("best-fit", "1").is_some());
    let gone = api
        .json(
            Method::DELETE,
            "/v1/policies/spread/versions/1",
            ADMIN,
            None,
        )
        .await;
    assert_eq!(gone.status, StatusCode::NO_CONTENT, "{}", gone.body);
    assert!(
        api.runtime.loaded_kind("spread", "1").is_none(),
        "unloaded here"
    );
    let again = api
        .json(
            Method::DELETE,
            "/v1/policies/spread/versions/1",
            ADMIN,
            None,
        )
        .await;
    assert_eq!(again.status, StatusCode::NOT_FOUND);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_explicit_activation_clears_an_automatic_deactivation() {
    use crate::policy::PolicyKind::Placement;
    let Some(api) = Api::new() else { return };
    api.upload_ok("best-fit", "best-fit", "1").await;
    // The trap fixture fails the smoke check: stored and loaded the way an older host would
    // have, then activated and failed until deactivated.
    let trap = api.guest("fixture-trap");
    api.runtime
        .load_with(
            "trap",
            "1",
            &trap,
            "{}",
            crate::policy::LoadOptions {
                limits: None,
                smoke_check: false,
            },
        )
        .unwrap();
    let meta = crate::store::conformance::sample_policy(
        "trap",
        "1",
        crate::model::PolicyKind::Placement,
        &trap,
        crate::model::now(),
    );
    let meta = crate::model::PolicyVersion {
        config: "{}".into(),
        ..meta
    };
    api.store.insert_policy_version(&meta, &trap).await.unwrap();
    assert_eq!(
        api.activate("best-fit", json!({"version": "1"}))
            .await
            .status,
        StatusCode::OK
    );
    assert_eq!(
        api.activate("trap", json!({"version": "1"})).await.status,
        StatusCode::OK
    );
    let input = crate::policy::PlacementInput::synthetic();
    for _ in 0..RuntimeSettings::default().failure_threshold {
        api.runtime.place(&input);
    }
    assert_eq!(
        active_here(&api, Placement),
        pair("best-fit", "1"),
        "restored"
    );
    let list = api
        .json(Method::GET, "/v1/policies/trap", ADMIN, None)
        .await;
    assert_eq!(
        list.body["versions"][0]["deactivated"], true,
        "{}",
        list.body
    );

    let again = api.activate("trap", json!({"version": "1"})).await;
    assert_eq!(again.status, StatusCode::OK, "{}", again.body);
    assert_eq!(active_here(&api, Placement), pair("trap", "1"));
    let list = api
        .json(Method::GET, "/v1/policies/trap", ADMIN, None)
        .await;
    assert_eq!(
        list.body["versions"][0]["deactivated"], false,
        "{}",
        list.body
    );
}

/// A small worker half used and a big idle one: best-fit packs the small one, spread takes
/// the idle one.
async fn two_workers_and_queued_tasks(store: &dyn Store, tasks: usize) -> (String, String) {
    let small = sample_worker(&unique_id("small"), Resources::new(4.0, 8.0, 10.0, 0.0));
    let big = sample_worker(&unique_id("big"), Resources::new(16.0, 32.0, 100.0, 0.0));
    store.insert_worker(&small).await.unwrap();
    store.insert_worker(&big).await.unwrap();
    assert!(
        store
            .reserve(&small.worker_id, &Resources::new(2.0, 4.0, 1.0, 0.0))
            .await
            .unwrap()
    );
    for i in 0..tasks {
        let at = crate::model::now() - chrono::Duration::seconds(10 - i as i64);
        let task = sample_task_at(&unique_id("task"), "alice", TaskStatus::Queued, at);
        store.insert_task(&task, None).await.unwrap();
    }
    (small.worker_id, big.worker_id)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dry_run_shows_where_spread_and_best_fit_differ_and_applies_nothing() {
    let Some(api) = Api::new() else { return };
    let (small, big) = two_workers_and_queued_tasks(api.store.as_ref(), 1).await;
    api.upload_ok("best-fit", "best-fit", "1").await;
    api.upload_ok("spread", "spread", "1").await;
    assert_eq!(
        api.activate("best-fit", json!({"version": "1"}))
            .await
            .status,
        StatusCode::OK
    );
    let before = api.store.list_workers().await.unwrap();

    let report = api
        .json(
            Method::POST,
            "/v1/policies/spread/dry-run",
            ADMIN,
            Some(json!({})),
        )
        .await;
    assert_eq!(report.status, StatusCode::OK, "{}", report.body);
    let body = &report.body;
    assert_eq!(body["version"], "1");
    assert_eq!(body["compared_with"], "best-fit@1");
    let tasks = body["tasks"].as_array().unwrap();
    assert_eq!(tasks.len(), 1);
    assert_eq!(
        tasks[0]["candidate"],
        json!({"decision": "assign", "worker_id": big})
    );
    assert_eq!(
        tasks[0]["active"],
        json!({"decision": "assign", "worker_id": small})
    );
    assert_eq!(tasks[0]["differs"], true);
    assert_eq!(body["differing"], 1);
    assert!(body["elapsed_ms"].as_f64().unwrap() > 0.0);
    // Nothing applied.
    assert_eq!(api.store.list_workers().await.unwrap(), before);
    let queued = api
        .store
        .list_tasks(&crate::store::TaskQuery {
            status: Some(TaskStatus::Queued),
            limit: 10,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(queued.tasks.len(), 1);

    // The active one against itself: nothing differs; a bad batch size is refused.
    let same = api
        .json(
            Method::POST,
            "/v1/policies/best-fit/dry-run",
            ADMIN,
            Some(json!({"limit": 5})),
        )
        .await;
    assert_eq!(same.body["differing"], 0, "{}", same.body);
    let bad = api
        .json(
            Method::POST,
            "/v1/policies/spread/dry-run",
            ADMIN,
            Some(json!({"limit": 1001})),
        )
        .await;
    assert_eq!(bad.status, StatusCode::UNPROCESSABLE_ENTITY);
    let unknown = api
        .json(
            Method::POST,
            "/v1/policies/spread/dry-run",
            ADMIN,
            Some(json!({"version": "7"})),
        )
        .await;
    assert_eq!(unknown.status, StatusCode::NOT_FOUND);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cluster_snapshot_round_trips_through_its_reader() {
    let Some(api) = Api::new() else { return };
    let (small, big) = two_workers_and_queued_tasks(api.store.as_ref(), 3).await;
    let reply = api
        .json(Method::GET, "/v1/cluster/snapshot?limit=2", ADMIN, None)
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
    let snapshot = ClusterSnapshot::from_json(&reply.body.to_string()).unwrap();
    let ids: Vec<&str> = snapshot
        .workers
        .iter()
        .map(|w| w.worker_id.as_str())
        .collect();
    assert!(ids.contains(&small.as_str()) && ids.contains(&big.as_str()));
    assert_eq!(snapshot.queued.len(), 2, "limited");
    assert_eq!(snapshot.placement_input().task_count(), 2);
    let bad = api
        .json(Method::GET, "/v1/cluster/snapshot?limit=0", ADMIN, None)
        .await;
    assert_eq!(bad.status, StatusCode::BAD_REQUEST);
}
