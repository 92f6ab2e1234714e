//! Anti-entropy: digests compared with a random peer every few seconds,
//! differing buckets pulled in pages (each record through the clock guard)
//! and what the peer lacks pushed back in frames cut by bytes.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use dhrt_proto::{
    BucketCursor, CollectionDigest, MemberUpdate, Mutation, PeerOp, PeerReply, Stamp,
};
use dhrt_storage::{DIGEST_BUCKETS, Digest};

use super::apply::local_error;
use super::{BATCH_BYTES, BATCH_ITEMS, Cluster, Peer, stamp, version};
use crate::batch::mutation_bytes;
use crate::link::LinkError;

/// The buckets two digests should exchange: those that differ, or all of
/// them when the peer's digest has another shape.
pub(super) fn buckets_to_exchange(local: &Digest, remote: &Digest) -> Vec<usize> {
    if remote.buckets.len() == DIGEST_BUCKETS {
        local.differing(remote)
    } else {
        (0..DIGEST_BUCKETS).collect()
    }
}

/// A peer's digests being read a page at a time
/// ([`Cluster::next_shared`]).
pub(super) struct SharedDigests {
    /// The peer.
    pub(super) peer: Arc<Peer>,
    /// This node's id and the peer's: the collections both own are shared.
    me: u64,
    them: u64,
    /// The last name of the page before; `None` before the first.
    after: Option<String>,
    /// Every page is read.
    done: bool,
}

/// Buckets asked for per anti-entropy request.
pub(super) const BUCKETS_PER_REQUEST: usize = 32;

/// Whether anti-entropy sends this node's record (version `mine`) to a
/// peer holding `theirs` for the key: only what the peer lacks or holds
/// older.
pub(super) fn worth_pushing(theirs: Option<&Stamp>, mine: Stamp) -> bool {
    theirs.is_none_or(|v| *v < mine)
}

impl Cluster {
    pub(super) async fn anti_entropy_loop(self: Arc<Self>) {
        let every = self.options.anti_entropy_every;
        while self.running.load(Ordering::Acquire) {
            tokio::time::sleep(every).await;
            // A syncing peer may hold what the cluster deleted long ago:
            // it pulls, nobody pulls from it.
            let peers: Vec<MemberUpdate> = self.sources();
            // While this node syncs, the sync itself is its anti-entropy.
            if peers.is_empty()
                || !self.absence_judged.load(Ordering::Acquire)
                || self.full_resync.load(Ordering::Acquire)
                || self.sync.running.load(Ordering::Acquire)
            {
                continue;
            }
            let i = self.membership.lock().unwrap().random_index(peers.len());
            let target = peers[i].clone();
            if let Err(e) = self.anti_entropy_with(target.id).await {
                tracing::debug!("anti-entropy with {}: {e}", target.addr);
            }
        }
    }

    /// Pulls the peer's records of some buckets of `collection`, page by
    /// page, applying each page as it arrives (each record through the
    /// clock guard). Returns the version of every key the peer holds there.
    pub(super) async fn pull_buckets(
        self: &Arc<Self>,
        peer: &Peer,
        collection: &str,
        buckets: &[usize],
        timeout: Duration,
    ) -> Result<HashMap<Bytes, Stamp>, LinkError> {
        self.read_buckets(peer, collection, buckets, timeout, true)
            .await
    }

    /// The version of every key the peer holds in some buckets of
    /// `collection`, read page by page; with `apply`, each page is applied
    /// here too (each record through the clock guard).
    pub(super) async fn read_buckets(
        self: &Arc<Self>,
        peer: &Peer,
        collection: &str,
        buckets: &[usize],
        timeout: Duration,
        apply: bool,
    ) -> Result<HashMap<Bytes, Stamp>, LinkError> {
        let buckets: Vec<u32> = buckets.iter().map(|&b| b as u32).collect();
        let mut theirs = HashMap::new();
        let mut from = None;
        loop {
            let op = PeerOp::Buckets {
                collection: collection.to_string(),
                buckets: buckets.clone(),
                from,
            };
            let (records, next) = match peer.link.request(op, timeout).await? {
                PeerReply::Records { records, next } => (records, next),
                other => {
                    return Err(LinkError::Refused {
                        addr: peer.link.addr().to_string(),
                        reason: format!("unexpected answer to a bucket request: {other:?}"),
                    });
                }
            };
            for m in &records {
                if let Mutation::Put { key, version, .. } = m {
                    theirs.insert(key.clone(), *version);
                }
            }
            if apply {
                self.ae_pulled
                    .fetch_add(records.len() as u64, Ordering::Relaxed);
                let bytes = records.iter().map(crate::batch::mutation_bytes).sum();
                self.apply_async(records, false)
                    .await
                    .map_err(LinkError::Local)?;
                // At the pace of moves: what a repair brings can be a
                // whole collection (a raised replication factor).
                self.moves.pace_repair(bytes).await;
            }
            // Pages go forward through the buckets asked for: a cursor that
            // goes back, stays, or leaves them is refused (a lying peer
            // cannot keep this loop, and every repair behind it, going for
            // ever), not taken for the end: a prune would take the records
            // of the pages never read for ones the peer lacks.
            let key = |c: &BucketCursor| (c.bucket, c.skip);
            match next {
                None => return Ok(theirs),
                Some(n)
                    if from.as_ref().is_none_or(|f| key(&n) > key(f))
                        && buckets.iter().any(|&b| b >= n.bucket) =>
                {
                    from = Some(n)
                }
                Some(n) => {
                    return Err(LinkError::Refused {
                        addr: peer.link.addr().to_string(),
                        reason: format!(
                            "a bucket listing cursor that does not go forward: {n:?} after {from:?}"
                        ),
                    });
                }
            }
        }
    }

    /// Appends to `push` this node's records of `buckets` of `collection`
    /// that a peer holding `theirs` (key -> version) lacks or holds older.
    /// Back from longer than the tombstone grace, an old record the peer
    /// lacks is left out: the cluster may have deleted it and forgotten.
    pub(super) fn worth_sending(
        &self,
        collection: &str,
        buckets: &[usize],
        theirs: &HashMap<Bytes, Stamp>,
        push: &mut Vec<Mutation>,
    ) -> Result<(), LinkError> {
        let stale_before = self.stale_before.load(Ordering::Acquire);
        for b in buckets {
            let mine = self.store.bucket(collection, *b).map_err(local_error)?;
            push.extend(
                mine.filter(|r| {
                    let held = theirs.get(&r.key[..]);
                    worth_pushing(held, stamp(r.version))
                        && !(stale_before > 0
                            && super::sync::forgotten_by_prune(
                                r.value.is_some(),
                                held.is_some(),
                                r.version,
                                stale_before,
                            ))
                })
                .map(|r| Mutation::Put {
                    collection: collection.to_string(),
                    key: r.key.into(),
                    value: r.value,
                    version: stamp(r.version),
                }),
            );
        }
        Ok(())
    }

    /// Sends `mutations` to the peer in `Apply` frames cut by bytes, a
    /// `repair` at the pace of moves ([`super::moves::Moves::pace_repair`];
    /// a handover is paced by its caller). What the peer refuses (this node's clock is ahead of its own, a
    /// collection past its cap) is logged, not retried.
    pub(super) async fn push_to(
        &self,
        peer: &Peer,
        mutations: Vec<Mutation>,
        timeout: Duration,
        repair: bool,
    ) -> Result<(), LinkError> {
        let mut batcher = crate::batch::Batcher::new(BATCH_BYTES, BATCH_ITEMS);
        let mut batches = Vec::new();
        for m in mutations {
            batches.extend(batcher.push(m));
        }
        batches.extend(batcher.finish());
        for batch in batches {
            if repair {
                self.moves
                    .pace_repair(batch.iter().map(crate::batch::mutation_bytes).sum())
                    .await;
            }
            self.ae_pushed
                .fetch_add(batch.len() as u64, Ordering::Relaxed);
            if let PeerReply::Applied { refused, .. } =
                peer.link.request(PeerOp::Apply(batch), timeout).await?
                && !refused.is_empty()
            {
                // Records a peer refuses for good come back every round:
                // one line a minute says so.
                static REFUSED: crate::throttle::LogThrottle =
                    crate::throttle::LogThrottle::new(Duration::from_secs(60));
                if let Some(left_out) = REFUSED.allow() {
                    tracing::warn!(
                        left_out,
                        "peer {} refused {} records (stamped too far ahead of its clock, or of a collection it cannot create or take: see its log)",
                        peer.link.addr(),
                        refused.len()
                    );
                }
            }
        }
        Ok(())
    }

    /// The digests of peer `id`, to be read a page at a time with
    /// [`Cluster::next_shared`]; `None` for an unknown peer.
    pub(super) fn shared_digests(self: &Arc<Self>, id: u64) -> Option<SharedDigests> {
        let peer = self.peer(id)?;
        let m = self.membership.lock().unwrap();
        let them = m.get(id)?.id;
        Some(SharedDigests {
            peer,
            me: m.me().id,
            them,
            after: None,
            done: false,
        })
    }

    /// The next page of a peer's digests of the collections both nodes
    /// host: those named after the page before's last, up to the last name
    /// of the peer's page (to the end, once the peer has no more), with the
    /// empty digest where the peer has none. `None` once every page is
    /// read. A node holding any number of collections is compared this
    /// way, some hundred at a time, never in one frame.
    pub(super) async fn next_shared(
        self: &Arc<Self>,
        pages: &mut SharedDigests,
    ) -> Result<Option<Vec<(String, Digest)>>, LinkError> {
        if pages.done {
            return Ok(None);
        }
        let long = self.options.timeout.max(Duration::from_secs(10));
        let page = self
            .digest_page(&pages.peer, pages.after.clone(), long)
            .await?;
        let end = page.last().map(|d| d.collection.clone());
        let in_range = |c: &String| {
            pages.after.as_ref().is_none_or(|a| c > a) && end.as_ref().is_none_or(|e| c <= e)
        };
        let mut names: BTreeSet<String> = self
            .store
            .all_collections()
            .into_iter()
            .filter(in_range)
            .collect();
        names.extend(page.iter().map(|d| d.collection.clone()));
        {
            let m = self.membership.lock().unwrap();
            names.retain(|c| {
                let owners = self.owners_in(&m, c);
                owners.contains(&pages.me) && owners.contains(&pages.them)
            });
        }
        let mut theirs: HashMap<String, CollectionDigest> = page
            .into_iter()
            .map(|d| (d.collection.clone(), d))
            .collect();
        let shared = names
            .into_iter()
            .map(|c| {
                let remote = theirs
                    .remove(&c)
                    .map(|d| Digest {
                        buckets: d.buckets,
                        dropped_at: d.dropped_at.map(version),
                    })
                    .unwrap_or_else(Digest::empty);
                (c, remote)
            })
            .collect();
        match end {
            Some(e) => pages.after = Some(e),
            None => pages.done = true,
        }
        Ok(Some(shared))
    }

    /// A page of the peer's digests of every collection it has, in name
    /// order, after `after`: empty once past its last. Names that do not
    /// go forward are refused (a lying peer cannot keep a comparison going
    /// round).
    pub(super) async fn digest_page(
        &self,
        peer: &Peer,
        after: Option<String>,
        timeout: Duration,
    ) -> Result<Vec<CollectionDigest>, LinkError> {
        let op = PeerOp::DigestsAfter {
            after: after.clone(),
        };
        let page = match peer.link.request(op, timeout).await? {
            PeerReply::Digests(d) => d,
            other => {
                return Err(LinkError::Refused {
                    addr: peer.link.addr().to_string(),
                    reason: format!("unexpected answer to a digest request: {other:?}"),
                });
            }
        };
        let mut last = after;
        for d in &page {
            if last.as_ref().is_some_and(|l| d.collection <= *l) {
                return Err(LinkError::Refused {
                    addr: peer.link.addr().to_string(),
                    reason: format!(
                        "digests out of name order: {:?} after {last:?}",
                        d.collection
                    ),
                });
            }
            last = Some(d.collection.clone());
        }
        Ok(page)
    }

    /// Applies a drop a peer's digest reports, through the clock guard.
    pub(super) async fn apply_remote_drop(
        self: &Arc<Self>,
        collection: &str,
        local: &Digest,
        remote: &Digest,
    ) -> Result<(), LinkError> {
        if remote.dropped_at > local.dropped_at
            && let Some(d) = remote.dropped_at
        {
            let drop = Mutation::Drop {
                collection: collection.to_string(),
                version: stamp(d),
            };
            self.apply_async(vec![drop], false)
                .await
                .map_err(LinkError::Local)?;
        }
        Ok(())
    }

    /// Compares digests of every collection both nodes host with peer `id`
    /// and exchanges the differing buckets, both ways. Every record pulled
    /// passes the clock guard on its own; an error says whose it was.
    pub(crate) async fn anti_entropy_with(self: &Arc<Self>, id: u64) -> Result<(), LinkError> {
        if !self.options.repair {
            return Ok(());
        }
        let started = self.wall_ms();
        let Some(mut pages) = self.shared_digests(id) else {
            return Ok(());
        };
        let long = self.options.timeout.max(Duration::from_secs(10));
        while let Some(shared) = self.next_shared(&mut pages).await? {
            for (c, remote) in shared {
                self.exchange(&pages.peer, &c, &remote, long).await?;
            }
        }
        self.ae_rounds.fetch_add(1, Ordering::Relaxed);
        self.note_synced(id, started);
        Ok(())
    }

    /// Exchanges with a peer holding `remote` of collection `c` the
    /// differing buckets, both ways.
    async fn exchange(
        self: &Arc<Self>,
        peer: &Peer,
        c: &str,
        remote: &Digest,
        long: Duration,
    ) -> Result<(), LinkError> {
        let local = self.store.digest(c).map_err(local_error)?;
        self.apply_remote_drop(c, &local, remote).await?;
        let local = self.store.digest(c).map_err(local_error)?;
        let mut push = Vec::new();
        if local.dropped_at > remote.dropped_at
            && let Some(d) = local.dropped_at
        {
            push.push(Mutation::Drop {
                collection: c.to_string(),
                version: stamp(d),
            });
        }
        for chunk in buckets_to_exchange(&local, remote).chunks(BUCKETS_PER_REQUEST) {
            let theirs = self.pull_buckets(peer, c, chunk, long).await?;
            // Only what is newer takes effect; send back only what the
            // peer lacks or holds older.
            self.worth_sending(c, chunk, &theirs, &mut push)?;
            let pending: usize = push.iter().map(mutation_bytes).sum();
            if push.len() >= BATCH_ITEMS || pending >= BATCH_BYTES {
                self.push_to(peer, std::mem::take(&mut push), long, true)
                    .await?;
            }
        }
        self.push_to(peer, push, long, true).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn st(ts: u64, node: u64) -> Stamp {
        Stamp { ts, node }
    }

    #[test]
    fn only_what_the_peer_lacks_or_holds_older_is_pushed() {
        assert!(worth_pushing(None, st(5, 1)));
        assert!(worth_pushing(Some(&st(4, 9)), st(5, 1)));
        assert!(
            worth_pushing(Some(&st(5, 0)), st(5, 1)),
            "same ts, node breaks the tie"
        );
        assert!(!worth_pushing(Some(&st(5, 1)), st(5, 1)));
        assert!(!worth_pushing(Some(&st(6, 0)), st(5, 1)));
    }

    #[test]
    fn every_bucket_is_exchanged_with_a_digest_of_another_shape() {
        let local = Digest::empty();
        let odd = Digest {
            buckets: vec![0; 3],
            dropped_at: None,
        };
        assert_eq!(buckets_to_exchange(&local, &odd).len(), DIGEST_BUCKETS);
        let mut same = Digest::empty();
        assert!(buckets_to_exchange(&local, &same).is_empty());
        same.buckets[7] ^= 1;
        assert_eq!(buckets_to_exchange(&local, &same), vec![7]);
    }
}
