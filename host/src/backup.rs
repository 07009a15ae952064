//! `cloudai backup` and `cloudai restore`: a copy of a store that a fresh host starts on with the
//! same tasks, workers, results and policies ([`crate::store::backup`] makes and restores it).
//!
//! Which store: `--mongodb-uri` (or `CLOUDAI_MONGODB_URI`) says MongoDB, as for `cloudai
//! serve`; without it, the embedded store in `--data-dir`.

use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::Args;

use crate::store::backup::{mongo, sqlite};

#[derive(Debug, Args)]
pub struct BackupArgs {
    /// Where to write the backup: a file for the embedded store, a directory for MongoDB.
    #[arg(long, value_name = "PATH")]
    pub out: PathBuf,
    /// Replace an existing backup at --out.
    #[arg(long)]
    pub force: bool,
    #[command(flatten)]
    pub store: StoreArgs,
}

#[derive(Debug, Args)]
pub struct RestoreArgs {
    /// The backup: a file written by `cloudai backup` from the embedded store, or the
    /// directory it wrote from MongoDB.
    #[arg(long, value_name = "PATH")]
    pub from: PathBuf,
    /// Embedded store: replace the data directory's database (its host must be stopped).
    /// MongoDB always needs an empty database.
    #[arg(long)]
    pub force: bool,
    #[command(flatten)]
    pub store: StoreArgs,
}

/// The store, named as `cloudai serve` names it.
#[derive(Debug, Args)]
pub struct StoreArgs {
    /// The host's data directory (the embedded store is its `cloudai.db`).
    #[arg(long, env = "CLOUDAI_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// MongoDB connection string: the store is this server's database, not the data directory.
    #[arg(long, env = "CLOUDAI_MONGODB_URI")]
    pub mongodb_uri: Option<String>,
    /// MongoDB database name.
    #[arg(long, env = "CLOUDAI_MONGODB_DATABASE", default_value = "cloudai")]
    pub mongodb_database: String,
}

impl StoreArgs {
    fn data_dir(&self) -> PathBuf {
        self.data_dir
            .clone()
            .unwrap_or_else(crate::output::default_data_dir)
    }
}

/// `cloudai backup`.
pub async fn backup(args: BackupArgs) -> anyhow::Result<()> {
    match &args.store.mongodb_uri {
        Some(uri) => {
            let summary =
                mongo::backup(uri, &args.store.mongodb_database, &args.out, args.force).await?;
            println!(
                "backed up MongoDB database '{}' to {}: {} collections, {} documents, {}",
                args.store.mongodb_database,
                args.out.display(),
                summary.collections,
                summary.documents,
                crate::output::human_bytes(summary.bytes)
            );
            println!(
                "collections were read one after another: not a point-in-time snapshot across \
                 them (see docs/production.md, \"Backup and restore\")"
            );
        }
        None => {
            let data_dir = args.store.data_dir();
            let (out, force) = (args.out.clone(), args.force);
            let source = data_dir.join(crate::store::sqlite::DB_FILE_NAME);
            let summary = tokio::task::spawn_blocking(move || sqlite::backup(&source, &out, force))
                .await
                .context("the backup thread failed")??;
            println!(
                "backed up {} to {}: {}",
                data_dir.join(crate::store::sqlite::DB_FILE_NAME).display(),
                args.out.display(),
                describe(&summary)
            );
        }
    }
    Ok(())
}

/// `cloudai restore`.
pub async fn restore(args: RestoreArgs) -> anyhow::Result<()> {
    match &args.store.mongodb_uri {
        Some(uri) => {
            if !args.from.is_dir() {
                bail!(
                    "{} is not a directory: a MongoDB backup is the directory `cloudai backup \
                     --mongodb-uri ...` wrote (an embedded store's backup, a file, is restored \
                     without --mongodb-uri, into --data-dir)",
                    args.from.display()
                );
            }
            let summary = mongo::restore(&args.from, uri, &args.store.mongodb_database).await?;
            println!(
                "restored {} into MongoDB database '{}': {} collections, {} documents, {} indexes; \
                 start the hosts on it",
                args.from.display(),
                args.store.mongodb_database,
                summary.collections,
                summary.documents,
                summary.indexes
            );
        }
        None => {
            if args.from.is_dir() {
                bail!(
                    "{} is a directory: a backup of the embedded store is one file (a MongoDB \
                     backup, a directory, is restored with --mongodb-uri)",
                    args.from.display()
                );
            }
            let data_dir = args.store.data_dir();
            let (from, dir, force) = (args.from.clone(), data_dir.clone(), args.force);
            let summary = tokio::task::spawn_blocking(move || sqlite::restore(&from, &dir, force))
                .await
                .context("the restore thread failed")??;
            println!(
                "restored {} into {}: {}; start the host on {}",
                args.from.display(),
                data_dir.join(crate::store::sqlite::DB_FILE_NAME).display(),
                describe(&summary),
                data_dir.display()
            );
        }
    }
    Ok(())
}

/// One line: size, schema version and what it holds.
fn describe(summary: &sqlite::Summary) -> String {
    let plural = |n: i64, one: &str, many: &str| format!("{n} {}", if n == 1 { one } else { many });
    format!(
        "{} (schema version {}): {}, {}, {} ({} active)",
        crate::output::human_bytes(summary.bytes),
        summary.schema_version,
        plural(summary.tasks, "task", "tasks"),
        plural(summary.workers, "worker", "workers"),
        plural(summary.policy_versions, "policy version", "policy versions"),
        summary.active_policies
    )
}
