//! [`Wakeup`]: how a change tells this replica's scheduler that it has work.

use std::collections::HashSet;
use std::sync::Arc;

use tokio::sync::Notify;

/// Wakes the scheduler when something it waits for happened (a task submitted, capacity
/// freed, a worker joined), so that an idle cluster places a new task in milliseconds rather
/// than at the next timer tick. Cheap to clone; waking with nobody waiting is remembered once.
#[derive(Clone, Default)]
pub struct Wakeup {
    notify: Arc<Notify>,
    /// Users whose usage went down since the last admission pass: their deferred tasks are
    /// checked again at once rather than after the back-off.
    usage_changed: Arc<std::sync::Mutex<HashSet<String>>>,
    /// Capacity was freed or added since the last round: its view of the workers is stale.
    capacity_changed: Arc<std::sync::atomic::AtomicBool>,
}

impl Wakeup {
    pub fn new() -> Self {
        Self::default()
    }

    /// Asks for a round soon.
    pub fn wake(&self) {
        self.notify.notify_one();
    }

    /// A task of `user_id` ended: wakes the scheduler, whose next admission pass checks that
    /// user's deferred tasks again whatever their back-off. (Usage changed through another
    /// replica is noticed at the back-off.)
    pub fn usage_changed(&self, user_id: &str) {
        self.usage_changed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(user_id.to_string());
        self.wake();
    }

    /// Capacity was freed (a reservation returned) or added (a worker joined, returned or was
    /// undrained): wakes the scheduler, whose next round reads the workers afresh.
    pub fn capacity_changed(&self) {
        self.capacity_changed
            .store(true, std::sync::atomic::Ordering::Release);
        self.wake();
    }

    /// Whether capacity changed since the last call.
    pub(crate) fn take_capacity_changed(&self) -> bool {
        self.capacity_changed
            .swap(false, std::sync::atomic::Ordering::AcqRel)
    }

    /// The users whose usage changed since the last call.
    pub(crate) fn take_usage_changed(&self) -> HashSet<String> {
        std::mem::take(&mut *self.usage_changed.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Resolves at the next [`Self::wake`] (or at once if one came since the last wait).
    pub async fn woken(&self) {
        self.notify.notified().await;
    }
}
