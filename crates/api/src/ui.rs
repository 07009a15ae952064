//! The web dashboard at `/ui`: static HTML, CSS and JavaScript modules compiled into the
//! binary from `crates/api/ui/` (no front-end build step, no Node toolchain for `cargo build`).
//!
//! The assets are public; everything they show comes from the `/v1` API with the bearer
//! token the user types in. Each answer carries a strict Content-Security-Policy (scripts
//! and styles from this origin only, nothing inline, calls to this origin only) and an ETag
//! of its content, so that browsers revalidate cheaply (`304 Not Modified`).

use std::sync::LazyLock;

use axum::Router;
use axum::extract::Path;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use sha2::{Digest, Sha256};

use super::AppState;
use super::error::ApiError;

/// No inline script or style, no plug-ins, no framing, no form posts: the dashboard talks to
/// its own origin through `fetch` only.
const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; \
     style-src 'self'; img-src 'self' data:; connect-src 'self'; base-uri 'none'; \
     form-action 'none'; frame-ancestors 'none'";

/// One embedded file: its path under `/ui/`, its media type and its bytes.
struct Asset {
    path: &'static str,
    content_type: &'static str,
    bytes: &'static [u8],
    /// Quoted SHA-256 of the bytes (a strong validator).
    etag: HeaderValue,
}

macro_rules! assets {
    ($(($path:literal, $type:expr)),* $(,)?) => {
        [$(($path, $type, include_bytes!(concat!("../ui/", $path)) as &'static [u8])),*]
    };
}

const JS: &str = "text/javascript; charset=utf-8";

static ASSETS: LazyLock<Vec<Asset>> = LazyLock::new(|| {
    assets![
        ("index.html", "text/html; charset=utf-8"),
        ("app.css", "text/css; charset=utf-8"),
        ("favicon.svg", "image/svg+xml"),
        ("js/app.js", JS),
        ("js/api.js", JS),
        ("js/dom.js", JS),
        ("js/format.js", JS),
        ("js/live.js", JS),
        ("js/sse.js", JS),
        ("js/pages/overview.js", JS),
        ("js/pages/policies.js", JS),
        ("js/pages/submit.js", JS),
        ("js/pages/task.js", JS),
        ("js/pages/tasks.js", JS),
        ("js/pages/workers.js", JS),
    ]
    .into_iter()
    .map(|(path, content_type, bytes)| {
        let digest = hex::encode(Sha256::digest(bytes));
        Asset {
            path,
            content_type,
            bytes,
            // Hex digits in quotes are always a valid header value.
            etag: HeaderValue::from_str(&format!("\"{}\"", &digest[..32]))
                .unwrap_or(HeaderValue::from_static("\"0\"")),
        }
    })
    .collect()
});

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/ui", get(index))
        .route("/ui/", get(index))
        .route("/ui/{*path}", get(asset))
}

async fn index(headers: HeaderMap) -> Response {
    serve("index.html", &headers)
}

async fn asset(Path(path): Path<String>, headers: HeaderMap) -> Response {
    serve(&path, &headers)
}

fn serve(path: &str, request: &HeaderMap) -> Response {
    let Some(asset) = ASSETS.iter().find(|a| a.path == path) else {
        return ApiError::not_found("asset_not_found", "no such file in the dashboard")
            .into_response();
    };
    let fresh = request
        .get_all(header::IF_NONE_MATCH)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|tag| {
            let tag = tag.trim();
            tag == "*" || tag.trim_start_matches("W/").as_bytes() == asset.etag.as_bytes()
        });
    let mut response = if fresh {
        StatusCode::NOT_MODIFIED.into_response()
    } else {
        let mut response = asset.bytes.into_response();
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static(asset.content_type),
        );
        response
    };
    let headers = response.headers_mut();
    headers.insert(header::ETAG, asset.etag.clone());
    // Revalidate every time: the file names carry no hash, a new binary may serve new files.
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CONTENT_SECURITY_POLICY),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    response
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    #[test]
    fn every_asset_is_embedded_once_with_its_own_etag() {
        let mut etags = std::collections::HashSet::new();
        let mut paths = std::collections::HashSet::new();
        for asset in ASSETS.iter() {
            assert!(!asset.bytes.is_empty(), "{} is empty", asset.path);
            assert!(paths.insert(asset.path), "{} twice", asset.path);
            assert!(
                etags.insert(asset.etag.clone()),
                "{} etag reused",
                asset.path
            );
        }
    }

    #[test]
    fn every_module_the_dashboard_imports_is_embedded() {
        // A module imported but not listed would load as a 404 only in the browser.
        let listed: Vec<&str> = ASSETS.iter().map(|a| a.path).collect();
        for asset in ASSETS.iter().filter(|a| a.path.ends_with(".js")) {
            let text = std::str::from_utf8(asset.bytes).unwrap();
            let dir = asset.path.rsplit_once('/').map_or("", |(d, _)| d);
            for line in text.lines().filter(|l| l.starts_with("import ")) {
                let target = line.split(['\'', '"']).nth(1).unwrap();
                let mut parts: Vec<&str> = dir.split('/').filter(|p| !p.is_empty()).collect();
                for piece in target.split('/') {
                    match piece {
                        "." => {}
                        ".." => {
                            parts.pop();
                        }
                        other => parts.push(other),
                    }
                }
                let resolved = parts.join("/");
                assert!(
                    listed.contains(&resolved.as_str()),
                    "{} imports {target} ({resolved}), which is not embedded",
                    asset.path
                );
            }
        }
    }

    #[test]
    fn every_file_the_page_links_is_embedded() {
        let index = ASSETS.iter().find(|a| a.path == "index.html").unwrap();
        let html = std::str::from_utf8(index.bytes).unwrap();
        let linked: Vec<&str> = html
            .split("\"/ui/")
            .skip(1)
            .filter_map(|rest| rest.split('"').next())
            .collect();
        assert!(linked.len() > 3, "{linked:?}");
        for path in linked {
            assert!(
                ASSETS.iter().any(|a| a.path == path),
                "index.html links /ui/{path}, which is not embedded"
            );
        }
    }

    #[test]
    fn the_page_loads_no_inline_script_or_style() {
        let index = ASSETS.iter().find(|a| a.path == "index.html").unwrap();
        let html = std::str::from_utf8(index.bytes).unwrap();
        assert!(!html.contains("<script>"), "inline script in index.html");
        assert!(!html.contains("<style"), "inline style in index.html");
        assert!(!html.contains(" style="), "style attribute in index.html");
        let handler = html.match_indices(" on").any(|(at, _)| {
            let rest = &html[at + 3..];
            let name_len = rest.bytes().take_while(u8::is_ascii_lowercase).count();
            name_len > 0 && rest[name_len..].starts_with('=')
        });
        assert!(!handler, "event handler attribute in index.html");
    }
}
