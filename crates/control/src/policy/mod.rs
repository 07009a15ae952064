//! The host's side of the policy runtime ([`cloudai_policy`], re-exported here): the cluster's
//! snapshot a placement round or an admission check reads from the store ([`snapshot`]), and
//! the sync that makes this replica follow the store's active versions ([`sync`]).

pub mod snapshot;
pub mod sync;

pub use cloudai_policy::*;
pub use snapshot::ClusterSnapshot;
