//! Which members own a collection, as this node knows the members: the
//! placement rules (`placement.rs`) applied to the membership table and the
//! collection's replication factor. Every question of "who stores this"
//! (replication targets, fan-out reads, watch hosts, handoff, anti-entropy)
//! is answered here.

use dhrt_proto::{CollectionInfo, Liveness};

use super::Cluster;
use crate::membership::Membership;
use crate::placement::{self, Replicas, hosts};

impl Cluster {
    /// The replication factor of `collection`. System collections (names
    /// starting with `_`) live on every member.
    pub(crate) fn replicas_of(&self, collection: &str) -> Replicas {
        if collection.starts_with('_') {
            return Replicas::All;
        }
        self.options.replicas
    }

    /// Whether every member owns every collection (no pins, no replication
    /// factor below `all`): the common case, answered without a lock.
    pub(crate) fn everyone_owns_everything(&self) -> bool {
        self.options.collections.is_none() && self.options.replicas == Replicas::All
    }

    /// The owners of `collection` among the members `m` knows (this node
    /// included): the members that have not left and whose pins allow it,
    /// ranked by placement score, as many as its replication factor asks.
    pub(crate) fn owners_in(&self, m: &Membership, collection: &str) -> Vec<u64> {
        let eligible = std::iter::once(m.me())
            .chain(m.members())
            .filter(|u| u.liveness != Liveness::Left && hosts(u, collection))
            .map(|u| u.id);
        placement::owners(collection, eligible, self.replicas_of(collection))
    }

    /// The owners of `collection` now, as this node knows the members: ids,
    /// best placement score first.
    pub fn owners(&self, collection: &str) -> Vec<u64> {
        self.owners_in(&self.membership.lock().unwrap(), collection)
    }
}

impl Cluster {
    /// What `GET /` says of a collection this node holds: its size and
    /// digest here, its replication factor and owners.
    pub(crate) fn collection_info(&self, c: dhrt_storage::CollectionStats) -> CollectionInfo {
        let replicas = self.replicas_of(&c.name);
        let owners = self.owners(&c.name);
        CollectionInfo {
            digest: self
                .store
                .digest(&c.name)
                .map(|d| format!("{:016x}", d.summary()))
                .unwrap_or_default(),
            under_replicated: matches!(replicas, Replicas::N(n) if owners.len() < usize::from(n)),
            replicas: replicas.to_string(),
            owners: owners.iter().map(|id| format!("{id:016x}")).collect(),
            name: c.name,
            keys: c.keys,
            bytes: c.bytes,
        }
    }
}
