//! The runtime history placement policies see (mean runtime per task type and worker), read
//! from RESULTS: the newest [`RUNTIME_HISTORY_WINDOW`] successful runs, read again at most every [`REFRESH`],
//! and only while a placement policy is active (the built-in best-fit does not use it), so a
//! round costs no extra query most of the time.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::Mutex;

use crate::policy::{RUNTIME_HISTORY_WINDOW, RuntimeHistory};
use crate::store::AssignmentStore;

/// How stale the statistics may get: a run ends in seconds at the earliest.
pub const REFRESH: Duration = Duration::from_secs(5);

#[derive(Default)]
pub(super) struct RuntimeHistoryCache {
    /// When it was read, and what.
    current: Mutex<Option<(Instant, Arc<RuntimeHistory>)>>,
}

impl RuntimeHistoryCache {
    /// The history, read again when older than [`REFRESH`]. A failed read keeps the last one
    /// (or none) until the next refresh: the statistics are advice, and placement goes on
    /// without them.
    pub(super) async fn get(&self, store: &dyn AssignmentStore) -> Arc<RuntimeHistory> {
        let mut current = self.current.lock().await;
        if let Some((at, history)) = current.as_ref()
            && at.elapsed() < REFRESH
        {
            return Arc::clone(history);
        }
        match store.recent_runtimes(RUNTIME_HISTORY_WINDOW).await {
            Ok(samples) => {
                let history = Arc::new(RuntimeHistory::from_samples(&samples));
                *current = Some((Instant::now(), Arc::clone(&history)));
                history
            }
            Err(error) => {
                tracing::warn!(%error, "reading the runtime history; placing without a fresh one");
                let kept = current
                    .as_ref()
                    .map(|(_, history)| Arc::clone(history))
                    .unwrap_or_default();
                *current = Some((Instant::now(), Arc::clone(&kept)));
                kept
            }
        }
    }
}
