//! Moves: a collection held by a member that no longer owns it (a member
//! joined and took its place, a replication factor shrank, the member is
//! leaving) goes to its owners. The holder pushes what the owners lack or
//! hold older, and once a round finds nothing left to push and nothing
//! written here since it began, releases its copy (`Store::release`): an
//! old copy is deleted only after every owner holds all of it, and a write
//! that raced the check keeps it for another round. A holder never pulls
//! from the owners, so it never brings back what they deleted.
//!
//! Health never moves data: owners are computed over every member that has
//! not left, so a dead owner keeps its place, and a copy whose owners are
//! not all reachable is kept until they are.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use dhrt_proto::{Liveness, Mutation, PeerOp, PeerReply};
use dhrt_storage::Digest;

use super::anti_entropy::{BUCKETS_PER_REQUEST, buckets_to_exchange};
use super::apply::local_error;
use super::{BATCH_BYTES, BATCH_ITEMS, Cluster, stamp, version};
use crate::batch::mutation_bytes;
use crate::link::LinkError;
use crate::placement;

/// How often a member looks for copies to hand over.
const MOVE_EVERY: Duration = Duration::from_secs(1);

/// What one handover round of a collection did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Handover {
    /// Every owner held everything already: the copy was released.
    Released,
    /// Records were pushed (or the copy changed meanwhile): another round.
    Pushed(usize),
    /// An owner could not be reached, or there is none: the copy stays.
    Kept,
}

impl Cluster {
    pub(super) async fn moves_loop(self: Arc<Self>) {
        while self.running.load(Ordering::Acquire) {
            tokio::time::sleep(MOVE_EVERY).await;
            // A leaving node hands over in `leave`, not here; a node
            // re-syncing (after being away) first learns what was deleted.
            if !self.running.load(Ordering::Acquire)
                || self.everyone_owns_everything()
                || !self.options.repair
                || self.full_resync.load(Ordering::Acquire)
                || self.sync.running.load(Ordering::Acquire)
            {
                continue;
            }
            self.hand_over_all(false).await;
        }
    }

    /// One handover round of every collection this node holds and does not
    /// own (with `leaving`, of every collection: its owners are computed
    /// without this node). Returns the records pushed, and how many copies
    /// are still held.
    pub(crate) async fn hand_over_all(self: &Arc<Self>, leaving: bool) -> (usize, usize) {
        let (mut pushed, mut held) = (0, 0);
        for c in self.store.all_collections() {
            if c.starts_with('_') {
                continue;
            }
            // Held since before members could lack a copy: named in the
            // registry before it may leave this node.
            self.register(&c);
            let owners = {
                let m = self.membership.lock().unwrap();
                let me = m.me().id;
                let owners = if leaving {
                    let eligible = m
                        .members()
                        .filter(|u| u.liveness != Liveness::Left && placement::hosts(u, &c))
                        .map(|u| u.id);
                    placement::owners(&c, eligible, self.replicas_of(&c))
                } else {
                    self.owners_in(&m, &c)
                };
                if owners.contains(&me) {
                    continue;
                }
                let reachable = owners.iter().all(|id| {
                    m.get(*id)
                        .is_some_and(|u| matches!(u.liveness, Liveness::Alive | Liveness::Suspect))
                });
                (reachable && !owners.is_empty()).then_some(owners)
            };
            let outcome = match owners {
                None => Ok(Handover::Kept),
                Some(owners) => self.hand_over(&c, &owners).await,
            };
            match outcome {
                Ok(Handover::Released) => {
                    tracing::info!(collection = %c, "handed over to its owners; this copy is released");
                }
                Ok(Handover::Pushed(n)) => {
                    pushed += n;
                    held += 1;
                }
                Ok(Handover::Kept) => held += 1,
                Err(e) => {
                    tracing::debug!(collection = %c, "handover: {e}");
                    held += 1;
                }
            }
        }
        (pushed, held)
    }

    /// Pushes `collection` to each of its `owners`; releases this copy if
    /// none of them lacked anything and nothing was written here meanwhile.
    async fn hand_over(
        self: &Arc<Self>,
        collection: &str,
        owners: &[u64],
    ) -> Result<Handover, LinkError> {
        let before = self.store.digest(collection).map_err(local_error)?;
        let mut pushed = 0;
        for &id in owners {
            pushed += self.push_collection(id, collection, &before).await?;
        }
        if pushed > 0 {
            return Ok(Handover::Pushed(pushed));
        }
        if self
            .store
            .release(collection, &before)
            .map_err(local_error)?
        {
            Ok(Handover::Released)
        } else {
            Ok(Handover::Pushed(0))
        }
    }

    /// Sends peer `id` what this node holds of `collection` (as of digest
    /// `local`) and the peer lacks or holds older; pulls nothing. Returns
    /// how many records were sent.
    async fn push_collection(
        self: &Arc<Self>,
        id: u64,
        collection: &str,
        local: &Digest,
    ) -> Result<usize, LinkError> {
        let Some(peer) = self.peer(id) else {
            return Err(LinkError::Refused {
                addr: format!("{id:016x}"),
                reason: "unknown member".into(),
            });
        };
        let long = self.options.timeout.max(Duration::from_secs(10));
        let remote = match peer
            .link
            .request(PeerOp::Digests(vec![collection.to_string()]), long)
            .await?
        {
            PeerReply::Digests(d) => d
                .into_iter()
                .find(|d| d.collection == collection)
                .map(|d| Digest {
                    buckets: d.buckets,
                    dropped_at: d.dropped_at.map(version),
                })
                .unwrap_or_else(Digest::empty),
            _ => Digest::empty(),
        };
        let mut push = Vec::new();
        if local.dropped_at > remote.dropped_at
            && let Some(d) = local.dropped_at
        {
            push.push(Mutation::Drop {
                collection: collection.to_string(),
                version: stamp(d),
            });
        }
        let mut sent = 0;
        for chunk in buckets_to_exchange(local, &remote).chunks(BUCKETS_PER_REQUEST) {
            let theirs = self
                .read_buckets(&peer, collection, chunk, long, false)
                .await?;
            self.worth_sending(collection, chunk, &theirs, &mut push)?;
            let pending: usize = push.iter().map(mutation_bytes).sum();
            if push.len() >= BATCH_ITEMS || pending >= BATCH_BYTES {
                sent += push.len();
                self.push_to(&peer, std::mem::take(&mut push), long).await?;
            }
        }
        sent += push.len();
        self.push_to(&peer, push, long).await?;
        Ok(sent)
    }
}
