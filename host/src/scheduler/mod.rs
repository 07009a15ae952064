//! The scheduler: admission (pending -> queued | failed) and placement rounds (queued ->
//! running) over the store and the policy runtime, following DESIGN.md section 4.

use std::sync::Arc;

use tokio::sync::Notify;

/// Wakes the scheduler when something it waits for happened (a task submitted, capacity
/// freed, a worker joined), so that an idle cluster places a new task in milliseconds rather
/// than at the next timer tick. Cheap to clone; waking with nobody waiting is remembered once.
#[derive(Clone, Default)]
pub struct Wakeup(Arc<Notify>);

impl Wakeup {
    pub fn new() -> Self {
        Self::default()
    }

    /// Asks for a round soon.
    pub fn wake(&self) {
        self.0.notify_one();
    }

    /// Resolves at the next [`Self::wake`] (or at once if one came since the last wait).
    pub async fn woken(&self) {
        self.0.notified().await;
    }
}
