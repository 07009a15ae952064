//! Test support, never in the product (the `test-support` feature): the guest components
//! `scripts/build-policies.sh` built, for this crate's tests and the host's.

use std::path::PathBuf;

/// The directory `scripts/build-policies.sh` built the guests into
/// (`$CLOUDAI_POLICY_WASM_DIR`); `None`, with a message, when it is unset, and a panic when
/// `CI` is set too.
pub fn wasm_dir() -> Option<PathBuf> {
    match std::env::var_os("CLOUDAI_POLICY_WASM_DIR") {
        Some(dir) => Some(PathBuf::from(dir)),
        None if std::env::var_os("CI").is_some() => {
            panic!(
                "CI must set CLOUDAI_POLICY_WASM_DIR (build it with scripts/build-policies.sh DIR)"
            )
        }
        None => {
            eprintln!(
                "skipping: CLOUDAI_POLICY_WASM_DIR is not set (build the guests with \
                 scripts/build-policies.sh DIR and point it there)"
            );
            None
        }
    }
}

/// The bytes of the guest `name` in `dir`.
pub fn guest(dir: &std::path::Path, name: &str) -> Vec<u8> {
    let path = dir.join(format!("{name}.wasm"));
    std::fs::read(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}
