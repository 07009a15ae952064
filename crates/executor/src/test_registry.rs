//! A minimal image registry for tests: no registry is reachable from CI, so the tests of a
//! successful and of a stalled pull serve an image made here, over the Registry HTTP API v2
//! in plain HTTP on 127.0.0.1 (Docker treats 127.0.0.0/8 registries as insecure by default,
//! so it pulls from them over HTTP; nothing leaves loopback).
//!
//! It serves what a pull of dockerd 20.10 reads: `GET /v2/`, one repository's manifest by
//! tag or digest (Docker image manifest v2, schema 2) and its blobs, uncompressed. It records
//! every request, and it can stall chosen blobs half-way (headers and half the body, then
//! nothing) for pull timeouts.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::http::{Method, StatusCode, Uri, header};
use axum::response::Response;
use bollard::Docker;
use futures::StreamExt;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

const MANIFEST_V2: &str = "application/vnd.docker.distribution.manifest.v2+json";
const CONFIG_V1: &str = "application/vnd.docker.container.image.v1+json";
/// Uncompressed layers: dockerd detects the compression from the bytes, so a tar is fine.
const LAYER_TAR: &str = "application/vnd.docker.image.rootfs.diff.tar";

/// One image as a registry holds it: a manifest and the blobs it names.
pub struct TestImage {
    pub name: String,
    pub tag: String,
    pub manifest_digest: String,
    pub config_digest: String,
    /// Bottom layer first.
    pub layer_digests: Vec<String>,
    manifest: Vec<u8>,
    blobs: HashMap<String, Vec<u8>>,
}

impl TestImage {
    /// The local image `base` (exported from the engine, as `docker save` would) with a file
    /// holding `marker` added to its top layer: the marker makes that layer and the image new
    /// to the engine, so that a pull really fetches them (dockerd remembers which blob
    /// digests it has and skips those, even after the image that had them is removed).
    pub async fn on_local(
        docker: &Docker,
        base: &str,
        name: &str,
        tag: &str,
        marker: &str,
    ) -> Self {
        let (config, mut layers) = export(docker, base).await;
        let top = layers.pop().expect("a layer");
        layers.push(with_marker(&top, marker));
        Self::assemble(name, tag, config, layers)
    }

    /// An image of `base`'s configuration and one layer holding `marker`, nothing to run: for
    /// pulls that are not to finish. It shares no blob with [`Self::on_local`] images, so a
    /// stalled download never holds up another test's pull (dockerd shares one download of a
    /// blob between the pulls that want it).
    pub async fn marker_only(
        docker: &Docker,
        base: &str,
        name: &str,
        tag: &str,
        marker: &str,
    ) -> Self {
        let (mut config, _) = export(docker, base).await;
        // The engine refuses a history with more non-empty entries than layers.
        config["history"] = json!([{"created_by": "cloudai pull test marker"}]);
        Self::assemble(name, tag, config, vec![marker_layer(marker)])
    }

    fn assemble(name: &str, tag: &str, mut config: Value, layers: Vec<Vec<u8>>) -> Self {
        let layer_digests: Vec<String> = layers.iter().map(|l| digest(l)).collect();
        config["rootfs"] = json!({"type": "layers", "diff_ids": layer_digests});
        let config = serde_json::to_vec(&config).unwrap();
        let config_digest = digest(&config);
        let manifest = serde_json::to_vec(&json!({
            "schemaVersion": 2,
            "mediaType": MANIFEST_V2,
            "config": {"mediaType": CONFIG_V1, "size": config.len(), "digest": config_digest},
            "layers": layers.iter().zip(&layer_digests).map(|(layer, digest)| {
                json!({"mediaType": LAYER_TAR, "size": layer.len(), "digest": digest})
            }).collect::<Vec<_>>(),
        }))
        .unwrap();
        let mut blobs: HashMap<String, Vec<u8>> =
            layer_digests.iter().cloned().zip(layers).collect();
        blobs.insert(config_digest.clone(), config);
        Self {
            name: name.to_owned(),
            tag: tag.to_owned(),
            manifest_digest: digest(&manifest),
            config_digest,
            layer_digests,
            manifest,
            blobs,
        }
    }
}

/// `sha256:<hex>` of `bytes`, as registries name content.
fn digest(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

/// The configuration (JSON) and layer tars of local image `image`, from the engine's export.
async fn export(docker: &Docker, image: &str) -> (Value, Vec<Vec<u8>>) {
    let mut archive = Vec::new();
    let mut stream = docker.export_image(image);
    while let Some(chunk) = stream.next().await {
        archive.extend_from_slice(&chunk.unwrap());
    }
    let mut files = HashMap::new();
    let mut tar = tar::Archive::new(archive.as_slice());
    for entry in tar.entries().unwrap() {
        let mut entry = entry.unwrap();
        let path = entry.path().unwrap().to_string_lossy().into_owned();
        let mut bytes = Vec::new();
        std::io::Read::read_to_end(&mut entry, &mut bytes).unwrap();
        files.insert(path, bytes);
    }
    let manifest: Value = serde_json::from_slice(&files["manifest.json"]).unwrap();
    let manifest = &manifest[0];
    let config: Value =
        serde_json::from_slice(&files[manifest["Config"].as_str().unwrap()]).unwrap();
    let layers: Vec<Vec<u8>> = manifest["Layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|path| files[path.as_str().unwrap()].clone())
        .collect();
    // The export's layers are the uncompressed tars the config names: their digests are the
    // diff ids, which is what lets them be served as they are.
    let exported: Vec<String> = layers.iter().map(|l| digest(l)).collect();
    assert_eq!(
        config["rootfs"]["diff_ids"],
        json!(exported),
        "the export of {image} does not match its diff ids"
    );
    (config, layers)
}

/// A layer tar with one file, `/cloudai-pull-test`, holding `marker`.
fn marker_layer(marker: &str) -> Vec<u8> {
    with_marker(&[], marker)
}

/// Layer tar `layer` (empty: none) with the file `/cloudai-pull-test` holding `marker` added.
fn with_marker(layer: &[u8], marker: &str) -> Vec<u8> {
    let mut tar = tar::Builder::new(Vec::new());
    if !layer.is_empty() {
        let mut source = tar::Archive::new(layer);
        for entry in source.entries().unwrap() {
            let entry = entry.unwrap();
            let path = entry.path().unwrap().into_owned();
            let mut header = entry.header().clone();
            tar.append_data(&mut header, path, entry).unwrap();
        }
    }
    let mut header = tar::Header::new_gnu();
    header.set_entry_type(tar::EntryType::Regular);
    header.set_size(marker.len() as u64);
    header.set_mode(0o644);
    tar.append_data(&mut header, "cloudai-pull-test", marker.as_bytes())
        .unwrap();
    tar.into_inner().unwrap()
}

struct Shared {
    image: TestImage,
    stalled: HashSet<String>,
    requests: Mutex<Vec<(Method, String)>>,
}

/// A registry serving one [`TestImage`] on 127.0.0.1 (an ephemeral port) until dropped.
pub struct TestRegistry {
    addr: SocketAddr,
    shared: Arc<Shared>,
    server: tokio::task::JoinHandle<()>,
}

impl TestRegistry {
    /// Serves `image`; a GET of a blob in `stalled` sends its headers and half its bytes and
    /// then nothing more, for as long as the registry lives.
    pub async fn start(image: TestImage, stalled: &[String]) -> Self {
        let shared = Arc::new(Shared {
            image,
            stalled: stalled.iter().cloned().collect(),
            requests: Mutex::new(Vec::new()),
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let app = Router::new().fallback(handle).with_state(shared.clone());
        let server = tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        Self {
            addr,
            shared,
            server,
        }
    }

    /// `127.0.0.1:PORT/NAME:TAG`: the reference that pulls the image from here.
    pub fn reference(&self) -> String {
        let image = &self.shared.image;
        format!("{}/{}:{}", self.addr, image.name, image.tag)
    }

    pub fn image(&self) -> &TestImage {
        &self.shared.image
    }

    /// How many `method` requests of `path` arrived.
    pub fn count(&self, method: &Method, path: &str) -> usize {
        let requests = self.shared.requests.lock().unwrap();
        requests
            .iter()
            .filter(|(m, p)| m == method && p == path)
            .count()
    }

    /// GETs of blob `digest`.
    pub fn blob_gets(&self, digest: &str) -> usize {
        let name = &self.shared.image.name;
        self.count(&Method::GET, &format!("/v2/{name}/blobs/{digest}"))
    }

    /// GETs of the manifest, by tag or by digest.
    pub fn manifest_gets(&self) -> usize {
        let image = &self.shared.image;
        [&image.tag, &image.manifest_digest]
            .iter()
            .map(|r| self.count(&Method::GET, &format!("/v2/{}/manifests/{r}", image.name)))
            .sum()
    }

    /// Every request so far, for failure messages.
    pub fn requests(&self) -> Vec<(Method, String)> {
        self.shared.requests.lock().unwrap().clone()
    }
}

impl Drop for TestRegistry {
    fn drop(&mut self) {
        self.server.abort();
    }
}

async fn handle(State(shared): State<Arc<Shared>>, method: Method, uri: Uri) -> Response {
    let path = uri.path();
    shared
        .requests
        .lock()
        .unwrap()
        .push((method.clone(), path.to_owned()));
    if path == "/v2/" || path == "/v2" {
        return Response::builder()
            .header("Docker-Distribution-API-Version", "registry/2.0")
            .header(header::CONTENT_TYPE, "application/json")
            .body(Body::from("{}"))
            .unwrap();
    }
    let image = &shared.image;
    // /v2/<name>/{manifests,blobs}/<reference>; the name may hold slashes.
    let mut parts = path.strip_prefix("/v2/").unwrap_or("").rsplitn(3, '/');
    let (reference, kind, name) = (parts.next(), parts.next(), parts.next());
    if name != Some(image.name.as_str()) {
        return error(StatusCode::NOT_FOUND, "NAME_UNKNOWN");
    }
    let (bytes, content_type, digest) = match (kind, reference) {
        (Some("manifests"), Some(r)) if r == image.tag || r == image.manifest_digest => {
            (&image.manifest, MANIFEST_V2, &image.manifest_digest)
        }
        (Some("manifests"), _) => return error(StatusCode::NOT_FOUND, "MANIFEST_UNKNOWN"),
        (Some("blobs"), Some(r)) => match image.blobs.get_key_value(r) {
            Some((digest, bytes)) => (bytes, "application/octet-stream", digest),
            None => return error(StatusCode::NOT_FOUND, "BLOB_UNKNOWN"),
        },
        _ => return error(StatusCode::NOT_FOUND, "UNSUPPORTED"),
    };
    let response = Response::builder()
        .header(header::CONTENT_TYPE, content_type)
        .header(header::CONTENT_LENGTH, bytes.len())
        .header("Docker-Content-Digest", digest.as_str());
    let body = if method == Method::HEAD {
        Body::empty()
    } else if shared.stalled.contains(digest) {
        let half = axum::body::Bytes::copy_from_slice(&bytes[..bytes.len() / 2]);
        Body::from_stream(
            futures::stream::once(async move { Ok::<_, std::io::Error>(half) })
                .chain(futures::stream::pending()),
        )
    } else {
        Body::from(bytes.clone())
    };
    response.body(body).unwrap()
}

/// A registry error body (`{"errors": [...]}`), as the distribution spec has it.
fn error(status: StatusCode, code: &str) -> Response {
    let body = json!({"errors": [{"code": code, "message": code, "detail": null}]});
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(body.to_string()))
        .unwrap()
}
