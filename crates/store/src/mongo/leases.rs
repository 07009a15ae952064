//! LEASES between host replicas (the reconciler's): one conditional update renews or takes
//! over a lease, an insert on the unique `_id` creates it.

use chrono::{DateTime, Utc};
use mongodb::bson::doc;

use super::codec::to_bson_date;
use super::compat::lock_key;
use super::{LEASES, MongoStore, is_duplicate_key};
use crate::{Result, StoreError};

impl MongoStore {
    pub(super) async fn acquire_lease_impl(
        &self,
        name: &str,
        holder: &str,
        until: DateTime<Utc>,
        now: DateTime<Utc>,
    ) -> Result<bool> {
        // Renew ours or take an expired one: ONE conditional update.
        let taken = self
            .atomic(
                lock_key(LEASES, name),
                self.leases.update_one(
                    doc! {
                        "_id": name,
                        "$or": [
                            { "holder": holder },
                            { "expires_at": { "$lt": to_bson_date(now) } },
                        ],
                    },
                    doc! { "$set": { "holder": holder, "expires_at": to_bson_date(until) } },
                ),
            )
            .await
            .map_err(|e| StoreError::backend(format!("taking lease '{name}'"), e))?;
        if taken.matched_count == 1 {
            return Ok(true);
        }
        // No lease document yet: the unique `_id` lets exactly one creator win.
        match self
            .leases
            .insert_one(doc! { "_id": name, "holder": holder, "expires_at": to_bson_date(until) })
            .await
        {
            Ok(_) => Ok(true),
            Err(e) if is_duplicate_key(&e) => Ok(false),
            Err(e) => Err(StoreError::backend(format!("creating lease '{name}'"), e)),
        }
    }

    pub(super) async fn release_lease_impl(&self, name: &str, holder: &str) -> Result<bool> {
        let deleted = self
            .atomic(
                lock_key(LEASES, name),
                self.leases
                    .delete_one(doc! { "_id": name, "holder": holder }),
            )
            .await
            .map_err(|e| StoreError::backend(format!("giving up lease '{name}'"), e))?;
        Ok(deleted.deleted_count == 1)
    }
}
