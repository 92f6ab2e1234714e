//! Fan-out reads: a key missing here (or distrusted) is asked of every live
//! peer owning its collection (every live peer, where a collection has
//! fewer owners than there are members: a move may be under way); the
//! newest answer the clock guard admits wins.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use bytes::Bytes;
use dhrt_proto::{Entry, Liveness, MAX_PAGE_BYTES, OpError, Page, PeerOp, PeerReply, Versioned};
use dhrt_storage::Store;

use super::Cluster;
use crate::link::{Dialer, LinkError};

impl Cluster {
    /// Asks every live peer hosting `collection` for `key` in parallel and
    /// returns the newest entry found (a tombstone included).
    pub(crate) async fn read_remote(
        self: &Arc<Self>,
        collection: &str,
        key: &[u8],
    ) -> Option<Versioned> {
        let targets: Vec<u64> = {
            let m = self.membership.lock().unwrap();
            // With fewer owners than members, a copy may still be on a
            // member that no longer owns it (a move in progress): ask
            // every member.
            let owners = match self.replicas_of(collection) {
                crate::placement::Replicas::All => Some(self.owners_in(&m, collection)),
                crate::placement::Replicas::N(_) => None,
            };
            m.members()
                .filter(|u| {
                    matches!(u.liveness, Liveness::Alive | Liveness::Suspect)
                        && owners.as_ref().is_none_or(|o| o.contains(&u.id))
                })
                .map(|u| u.id)
                .collect()
        };
        let mut asks = tokio::task::JoinSet::new();
        for id in targets {
            let Some(peer) = self.peer(id) else { continue };
            let op = PeerOp::Read {
                collection: collection.to_string(),
                key: Bytes::copy_from_slice(key),
            };
            let timeout = self.options.timeout;
            asks.spawn(async move { (id, peer.link.request(op, timeout).await) });
        }
        let mut best: Option<Versioned> = None;
        let guard = self.guard();
        while let Some(Ok((id, r))) = asks.join_next().await {
            match r {
                Ok(PeerReply::Entry(Some(v))) => {
                    if !guard.admits(v.version.ts, self.admission_wall()) {
                        // A skewed peer's entry is no answer here.
                        self.refused_future.fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                    if best.as_ref().is_none_or(|b| v.version > b.version) {
                        best = Some(v);
                    }
                }
                Ok(_) => {}
                Err(LinkError::Remote { .. }) => {}
                Err(_) => self.suspect(id),
            }
        }
        best
    }

    /// The other members that host `collection` and answer, with their
    /// addresses, best first: healthy before unhealthy, synced before
    /// re-syncing, then in id order (so every node prefers the same one).
    /// Where a watch of a collection this node does not store is followed.
    pub(crate) fn watch_hosts(&self, collection: &str) -> Vec<(u64, String)> {
        let m = self.membership.lock().unwrap();
        let me = self.dialer.me;
        let owners = self.owners_in(&m, collection);
        let mut hosts: Vec<(bool, Liveness, u64, String)> = m
            .members()
            .filter(|u| {
                u.id != me
                    && matches!(u.liveness, Liveness::Alive | Liveness::Suspect)
                    && owners.contains(&u.id)
            })
            .map(|u| (u.syncing, u.liveness, u.id, u.addr.clone()))
            .collect();
        hosts.sort();
        hosts
            .into_iter()
            .map(|(_, _, id, addr)| (id, addr))
            .collect()
    }

    /// Whether this node owns `collection`.
    pub(crate) fn hosts_here(&self, collection: &str) -> bool {
        self.everyone_owns_everything() || self.owners(collection).contains(&self.dialer.me)
    }

    /// A page of an owner's listing of `collection`: the owners are asked
    /// in `watch_hosts` order until one answers. `None` if none does.
    pub(crate) async fn list_remote(
        self: &Arc<Self>,
        collection: &str,
        after: Option<&[u8]>,
        limit: u32,
    ) -> Option<Page> {
        for (id, _) in self.watch_hosts(collection) {
            let Some(peer) = self.peer(id) else { continue };
            let op = PeerOp::List {
                collection: collection.to_string(),
                after: after.map(Bytes::copy_from_slice),
                limit,
            };
            match peer.link.request(op, self.options.timeout).await {
                Ok(PeerReply::Page(page)) => return Some(page),
                Ok(_) | Err(LinkError::Remote { .. }) => {}
                Err(_) => self.suspect(id),
            }
        }
        None
    }

    /// Who this node dials as, for links of its own (watch relays).
    pub(crate) fn dialer(&self) -> Dialer {
        self.dialer.clone()
    }

    /// How long a peer has to answer a request.
    pub(crate) fn peer_timeout(&self) -> std::time::Duration {
        self.options.timeout
    }
}

/// A page of this node's own listing of `collection`: live keys after
/// `after`, at most `limit` of them and about `MAX_PAGE_BYTES`.
pub(crate) fn list_local(
    store: &Store,
    collection: &str,
    after: Option<&[u8]>,
    limit: u32,
) -> Result<Page, OpError> {
    let mut entries: Vec<Entry> = Vec::new();
    let mut bytes = 0;
    let mut more = false;
    for r in store
        .list(collection, after, true)
        .map_err(crate::error::op_error)?
    {
        let value = r.value.unwrap_or_default();
        let size = r.key.len() + value.len();
        if entries.len() >= limit as usize || (!entries.is_empty() && bytes + size > MAX_PAGE_BYTES)
        {
            more = true;
            break;
        }
        bytes += size;
        entries.push(Entry {
            key: r.key.into(),
            value,
        });
    }
    let next = if more {
        entries.last().map(|e| e.key.clone())
    } else {
        None
    };
    Ok(Page { entries, next })
}
