//! Reads: what this node can say about a key on its own, and what it asks
//! of its peers when it cannot (a key missing here, a copy it distrusts or
//! that is damaged), with read repair. A value relayed from a peer lives in
//! this node's memory until the client has read it: it is held against the
//! node's budget of large values in flight (`--max-inflight-mib`, shared
//! with requests still arriving), so that clients that ask for large values
//! through a node that does not store them and stop reading cannot take
//! its memory.

use bytes::Bytes;
use dhrt_proto::{Mutation, OpError};
use dhrt_storage::Error as StorageError;

use super::Node;
use crate::cluster::stamp;
use crate::error::{op_error, unrepaired, user_collection};

/// What a node can say about a key on its own (see `Node::local_read`).
pub(super) enum LocalRead {
    /// The answer: the key's record (or tombstone) is here, the node has
    /// no peer to ask, or the request is refused.
    Answer(Result<Option<Bytes>, OpError>),
    /// The node distrusts what it held stamped up to `seen` (a version
    /// timestamp): the others decide.
    Distrusted { seen: u64 },
    /// Not here; a peer may have it.
    Missing,
    /// Its record failed its checksum (and was quarantined): a replica
    /// must answer.
    Damaged,
}

impl Node {
    /// What this node can say about a key on its own, with one lookup.
    pub(super) fn local_read(&self, collection: &str, key: &[u8]) -> LocalRead {
        if let Err(e) = user_collection(collection) {
            return LocalRead::Answer(Err(e));
        }
        if let Some(seen) = self.cluster.distrusted_until() {
            return LocalRead::Distrusted { seen };
        }
        if !self.cluster.everyone_owns_everything()
            && self.cluster.has_peers()
            && !self.cluster.hosts_here(collection)
        {
            // Not an owner: a copy here is one being handed over (or a
            // stray write), no newer than the owners' for sure. Merge.
            return LocalRead::Distrusted { seen: 0 };
        }
        match self.store.get_versioned(collection, key) {
            // The record failed its checksum and was quarantined: a replica
            // answers, and its copy repairs this one (read repair). Until
            // then the key reads as damaged, not missing.
            Err(StorageError::Checksum { .. }) => {
                self.damaged.insert(collection, key);
                self.damaged_read(collection)
            }
            Err(e) => LocalRead::Answer(Err(op_error(e))),
            // A tombstone is an answer too. (A key given back since it
            // was damaged is no longer damaged.)
            Ok(Some((value, _))) => {
                self.damaged.remove(collection, key);
                LocalRead::Answer(Ok(value))
            }
            Ok(None) if self.is_damaged(collection, key) => self.damaged_read(collection),
            Ok(None) if !self.cluster.has_peers() && !self.cluster.unreached() => {
                LocalRead::Answer(Ok(None))
            }
            Ok(None) => LocalRead::Missing,
        }
    }

    /// Whether `key` was quarantined here (by this read path, or by a
    /// listing, anti-entropy or a handoff that met its damaged record) and
    /// not given back since.
    pub(super) fn is_damaged(&self, collection: &str, key: &[u8]) -> bool {
        self.damaged.holds(&self.store, collection, key)
    }

    /// A key whose record here failed its checksum: a replica must answer,
    /// or, with none to ask, the answer is that it is damaged.
    fn damaged_read(&self, collection: &str) -> LocalRead {
        if self.cluster.has_peers() {
            LocalRead::Damaged
        } else {
            LocalRead::Answer(Err(unrepaired(collection)))
        }
    }

    pub(super) async fn op_get(
        &self,
        collection: &str,
        key: &[u8],
    ) -> Result<Option<Bytes>, OpError> {
        match self.local_read(collection, key) {
            LocalRead::Answer(answer) => answer,
            LocalRead::Distrusted { seen } => {
                // Back after longer than the tombstone grace period: what this
                // node held before may have been deleted since. Ask the others;
                // only what it wrote since it returned is its own answer.
                let local = match self.store.get_versioned(collection, key) {
                    Err(StorageError::Checksum { .. }) => None,
                    other => other.map_err(op_error)?,
                };
                let (remote, silent) = self
                    .cluster
                    .read_remote_told(collection, key, Some(&self.inflight))
                    .await?;
                let fresh = local.filter(|(_, v)| v.ts > seen);
                let remote = remote.filter(|r| !self.dropped_since(collection, r.version));
                Ok(match (remote, fresh) {
                    (Some(r), Some((value, v))) if stamp(v) > r.version => value,
                    (Some(r), _) => r.value,
                    (None, Some((value, _))) => value,
                    (None, None) if silent && !self.cluster.hosts_here(collection) => {
                        return Err(crate::error::owner_silent(collection));
                    }
                    (None, None) => None,
                })
            }
            LocalRead::Missing => self.read_through(collection, key).await,
            LocalRead::Damaged => match self
                .cluster
                .read_remote(collection, key, Some(&self.inflight))
                .await?
            {
                // Not "not found": the key exists, damaged here, and no
                // replica answered for it.
                None => Err(unrepaired(collection)),
                found => {
                    let value = self.keep(collection, key, found).await;
                    self.damaged.remove(collection, key);
                    Ok(value)
                }
            },
        }
    }

    /// A key missing here, asked of the peers (and kept, if this node
    /// stores the collection).
    async fn read_through(&self, collection: &str, key: &[u8]) -> Result<Option<Bytes>, OpError> {
        // A value relayed from a peer is held against the node's budget
        // of large values in flight until the client has read it (room
        // for it is taken before it is fetched).
        let (found, owner_silent) = self
            .cluster
            .read_remote_told(collection, key, Some(&self.inflight))
            .await?;
        if found.is_none() && owner_silent && !self.cluster.hosts_here(collection) {
            // No owner said: not "not found".
            return Err(crate::error::owner_silent(collection));
        }
        Ok(self.keep(collection, key, found).await)
    }

    /// Whether a drop this node holds of `collection` came at or after
    /// `version`: it removed every key stamped so, and a copy from a member
    /// it did not reach is no answer.
    fn dropped_since(&self, collection: &str, version: dhrt_proto::Stamp) -> bool {
        matches!(self.store.dropped_at(collection), Ok(Some(d)) if version <= stamp(d))
    }

    /// What a replica answered for a key this node lacks, kept here (read
    /// repair) if this node stores the collection.
    async fn keep(
        &self,
        collection: &str,
        key: &[u8],
        found: Option<dhrt_proto::Versioned>,
    ) -> Option<Bytes> {
        match found {
            Some(v) if self.dropped_since(collection, v.version) => None,
            Some(v) => {
                if self.cluster.stores_locally(collection) {
                    // Read repair: keep what the others had.
                    let m = Mutation::Put {
                        collection: collection.to_string(),
                        key: Bytes::copy_from_slice(key),
                        value: v.value.clone(),
                        version: v.version,
                    };
                    if let Err(e) = self.cluster.apply_async(vec![m], false).await {
                        tracing::warn!("read repair of {collection:?}: {e}");
                    }
                }
                v.value
            }
            None => None,
        }
    }
}
