//! The worker builds without the control plane: none of the host's heavy dependencies (the
//! policy runtime, the stores' drivers, the HTTP server) is in its dependency tree or in the
//! data model's, which it shares with the host.

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

fn host_only_in(tree: &[String]) -> Vec<&'static str> {
    HOST_ONLY
        .into_iter()
        .filter(|name| tree.iter().any(|p| p == name))
        .collect()
}

#[test]
fn the_worker_and_the_model_build_without_the_policy_runtime_the_stores_or_the_http_server() {
    // The check sees them where they are: the host links all four.
    assert_eq!(
        host_only_in(&dependency_tree("cloudai")),
        HOST_ONLY.to_vec()
    );
    for package in ["cloudai-worker", "cloudai-model"] {
        let tree = dependency_tree(package);
        assert!(tree.iter().any(|p| p == package), "{package}: {tree:?}");
        assert_eq!(
            host_only_in(&tree),
            Vec::<&str>::new(),
            "{package} depends on host-only crates"
        );
    }
}
