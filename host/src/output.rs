//! What the command line shows people, shared by `cli` and `tooling` (and the backup's
//! summary): the output format flag, tables, byte counts; and where a host keeps its files by
//! default. A leaf: it imports nothing of the crate.

use std::path::PathBuf;

use clap::ValueEnum;
use comfy_table::Table;
use comfy_table::presets::UTF8_BORDERS_ONLY;

/// How a command prints its answer (`-o table|json`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Table,
    Json,
}

/// A table with the CLI's border style and `header`.
pub fn new_table(header: &[&str]) -> Table {
    let mut table = Table::new();
    table
        .load_preset(UTF8_BORDERS_ONLY)
        .set_header(header.to_vec());
    table
}

/// A byte count as people read it: `512 B`, `1.5 KB`, `12.3 MB`.
pub fn human_bytes(n: u64) -> String {
    match n {
        0..1_000 => format!("{n} B"),
        1_000..1_000_000 => format!("{:.1} KB", n as f64 / 1e3),
        _ => format!("{:.1} MB", n as f64 / 1e6),
    }
}

/// `$XDG_DATA_HOME/cloudai`, else `~/.local/share/cloudai`, else `./cloudai-data`.
pub fn default_data_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("XDG_DATA_HOME").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir).join("cloudai");
    }
    if let Some(home) = std::env::var_os("HOME").filter(|d| !d.is_empty()) {
        return PathBuf::from(home).join(".local/share/cloudai");
    }
    PathBuf::from("cloudai-data")
}
