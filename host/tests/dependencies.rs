//! The crates below the host build without what they do not use: the worker (its executor, and
//! the data model it shares with the host) without any of the host's heavy dependencies (the policy
//! runtime, the stores' drivers, the HTTP server); the policy runtime without the stores, the
//! HTTP server or the Docker client; the control plane without the HTTP server or the Docker
//! client; the API without the Docker client.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;

/// What runs only in the host: the WebAssembly runtime, the MongoDB driver, SQLite, axum.
const HOST_ONLY: [&str; 4] = ["wasmtime", "mongodb", "rusqlite", "axum"];

/// The names of the packages `package` builds with (normal and build dependencies, as a
/// release build of it links them; dev-dependencies left out).
fn dependency_tree(package: &str) -> Vec<String> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_string());
    let output = Command::new(cargo)
        .args([
            "tree",
            "--package",
            package,
            "--edges",
            "normal,build",
            "--prefix",
            "none",
            "--format",
            "{p}",
            "--locked",
            "--offline",
        ])
        // Where cargo runs the test from, not where it was compiled (a build shared between
        // checkouts).
        .current_dir(
            std::env::var("CARGO_MANIFEST_DIR")
                .unwrap_or_else(|_| env!("CARGO_MANIFEST_DIR").to_string()),
        )
        .output()
        .expect("running cargo tree");
    assert!(
        output.status.success(),
        "cargo tree --package {package}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout)
        .unwrap()
        .lines()
        .filter_map(|line| line.split_whitespace().next())
        .map(str::to_string)
        .collect()
}

/// Which of `names` are in `tree`.
fn found_in(tree: &[String], names: &[&'static str]) -> Vec<&'static str> {
    names
        .iter()
        .copied()
        .filter(|name| tree.iter().any(|p| p == name))
        .collect()
}

#[test]
fn the_worker_and_the_model_build_without_the_policy_runtime_the_stores_or_the_http_server() {
    // The check sees them where they are: the host links all four.
    assert_eq!(
        found_in(&dependency_tree("cloudai"), &HOST_ONLY),
        HOST_ONLY.to_vec()
    );
    for package in ["cloudai-worker", "cloudai-executor", "cloudai-model"] {
        let tree = dependency_tree(package);
        assert!(tree.iter().any(|p| p == package), "{package}: {tree:?}");
        assert_eq!(
            found_in(&tree, &HOST_ONLY),
            Vec::<&str>::new(),
            "{package} depends on host-only crates"
        );
    }
}

#[test]
fn the_policy_runtime_builds_without_the_stores_the_http_server_or_the_docker_client() {
    const NOT_POLICY: [&str; 4] = ["mongodb", "rusqlite", "axum", "bollard"];
    assert_eq!(
        found_in(&dependency_tree("cloudai"), &NOT_POLICY),
        NOT_POLICY.to_vec()
    );
    let tree = dependency_tree("cloudai-policy");
    assert!(tree.iter().any(|p| p == "wasmtime"), "{tree:?}");
    assert_eq!(
        found_in(&tree, &NOT_POLICY),
        Vec::<&str>::new(),
        "cloudai-policy depends on crates it does not use"
    );
}

#[test]
fn the_api_builds_without_the_docker_client() {
    let tree = dependency_tree("cloudai-api");
    assert!(
        ["axum", "cloudai-control"]
            .iter()
            .all(|c| tree.iter().any(|p| p == c)),
        "{tree:?}"
    );
    assert_eq!(found_in(&tree, &["bollard"]), Vec::<&str>::new());
}

#[test]
fn the_control_plane_builds_without_the_http_server_or_the_docker_client() {
    const NOT_CONTROL: [&str; 2] = ["axum", "bollard"];
    assert_eq!(
        found_in(&dependency_tree("cloudai"), &NOT_CONTROL),
        NOT_CONTROL.to_vec()
    );
    let tree = dependency_tree("cloudai-control");
    assert!(
        ["cloudai-store", "cloudai-policy"]
            .iter()
            .all(|c| tree.iter().any(|p| p == c)),
        "{tree:?}"
    );
    assert_eq!(
        found_in(&tree, &NOT_CONTROL),
        Vec::<&str>::new(),
        "cloudai-control depends on crates it does not use"
    );
}
