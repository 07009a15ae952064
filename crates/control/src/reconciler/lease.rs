//! The reconciler lease: one store document (`LEASES`, name [`LEASE_NAME`]) that says which
//! replica reconciles, taken or renewed with one conditional write and given up on shutdown.
//!
//! Expiry times come from the holder's clock and are compared with the taker's: replicas'
//! clocks must agree to well within the TTL (NTP does), or a lease can be taken early. That
//! costs only duplicate work, never a wrong repair (see the module docs).

use std::sync::atomic::Ordering;

use super::{Reconciler, chrono_duration};
use crate::model;
use crate::store::StoreError;

/// The name of the reconciler's lease document.
pub const LEASE_NAME: &str = "reconciler";

impl Reconciler {
    /// Takes or renews the lease until now + TTL. True while this replica holds it.
    pub(super) async fn renew_lease(&mut self) -> Result<bool, StoreError> {
        let now = model::now();
        let until = now + chrono_duration(self.config.lease_ttl);
        let held = self
            .leases
            .acquire_lease(LEASE_NAME, &self.holder, until, now)
            .await?;
        let was = self.counters.holding.swap(held, Ordering::Relaxed);
        if held && !was {
            self.counters
                .leases_acquired
                .fetch_add(1, Ordering::Relaxed);
            tracing::info!(holder = %self.holder, "reconciler lease taken: this replica reconciles");
        } else if !held && was {
            // Another replica took over: what we observed about drift is stale.
            self.drift.forget();
            tracing::warn!(holder = %self.holder, "reconciler lease lost to another replica");
        }
        Ok(held)
    }

    /// Gives the lease up (on shutdown), so that another replica takes over at once.
    pub(super) async fn give_up_lease(&mut self) {
        if !self.counters.holding.swap(false, Ordering::Relaxed) {
            return;
        }
        match self.leases.release_lease(LEASE_NAME, &self.holder).await {
            Ok(_) => tracing::info!(holder = %self.holder, "reconciler lease given up"),
            Err(error) => {
                tracing::warn!(holder = %self.holder, %error, "giving up the reconciler lease failed; it expires with its TTL")
            }
        }
    }
}
