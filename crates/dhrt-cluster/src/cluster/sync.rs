//! Catching up: the join handoff (streamed, newest first, frames cut by
//! bytes), the re-sync after being declared dead, and the full re-sync with
//! prune after being away longer than the tombstone grace period.
//! Invariant: a node leaves full re-sync only after a prune that applied
//! everything it meant to.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use dhrt_proto::{ErrorKind, MemberUpdate, Mutation, OpError, PeerOp, PeerReply, Stamp};
use dhrt_storage::{Digest, Version};
use tokio::time::Instant;

use super::anti_entropy::{BUCKETS_PER_REQUEST, buckets_to_exchange};
use super::apply::local_error;
use super::contact::away_too_long;
use super::{BATCH_BYTES, BATCH_ITEMS, Cluster, Peer, stamp};
use crate::link::LinkError;

/// The outcome of a spawned handoff chunk.
pub(super) fn joined(
    r: Option<Result<Result<u64, OpError>, tokio::task::JoinError>>,
) -> Result<u64, OpError> {
    match r {
        Some(Ok(r)) => r,
        Some(Err(e)) => Err(OpError::new(ErrorKind::Internal, e.to_string())),
        None => Ok(0),
    }
}

/// Handoff chunks in flight at once.
pub(super) const HANDOFF_WINDOW: usize = 4;

/// Whether a full re-sync forgets this node's record: a live value the
/// peer has no entry for (not even a tombstone), stamped at or before
/// `lost_touch` (its own clock when it lost touch, a version timestamp:
/// it stamped or saw every record it held then): the cluster deleted it
/// and has since purged the tombstone. What this node wrote after, while
/// away or since it returned, stays.
pub(super) fn forgotten_by_prune(
    live: bool,
    peer_has_key: bool,
    v: Version,
    lost_touch: u64,
) -> bool {
    live && !peer_has_key && v.ts <= lost_touch
}

impl Cluster {
    /// Marks a handoff or re-sync as running; false if one already is.
    pub(super) fn begin_sync(&self) -> bool {
        if self.sync.running.swap(true, Ordering::AcqRel) {
            return false;
        }
        self.sync.received.store(0, Ordering::Relaxed);
        self.sync.total.store(0, Ordering::Relaxed);
        *self.sync.started.lock().unwrap() = Some(Instant::now());
        true
    }

    pub(super) fn end_sync(self: &Arc<Self>) {
        self.full_resync.store(false, Ordering::Release);
        let now = self.contact_now();
        self.touched(now);
        self.data_contact.store(now, Ordering::Release);
        self.sync.running.store(false, Ordering::Release);
        self.sync.expected.lock().unwrap().clear();
        self.with_membership(|m, _| m.set_syncing(false));
    }

    /// Whether a handoff running now brings `collection`.
    pub(crate) fn expects(&self, collection: &str) -> bool {
        self.sync.running.load(Ordering::Acquire)
            && self.sync.expected.lock().unwrap().contains(collection)
    }

    /// While a full re-sync is pending or running: records of this node
    /// stamped at or before this timestamp (of its own clock when it lost
    /// touch, as versions have it) may have been deleted elsewhere (and the
    /// deletes forgotten), so they are not an answer.
    pub(crate) fn distrusted_until(&self) -> Option<u64> {
        self.full_resync
            .load(Ordering::Acquire)
            .then(|| self.contact_stamp.load(Ordering::Acquire))
    }

    /// After joining: every collection this node hosts is streamed to it by
    /// a healthy member, newest first; then a digest comparison catches
    /// what raced the stream; then this node reports itself healthy.
    pub(super) async fn handoff(self: Arc<Self>) {
        if !self.begin_sync() {
            return;
        }
        let started = Instant::now();
        let mut synced = false;
        while let Some(source) = self.wait_for_source().await {
            match self.handoff_from(&source).await {
                Ok(n) => {
                    let secs = started.elapsed().as_secs_f64();
                    match n {
                        Some(n) => tracing::info!(
                            "handoff from {} complete: {n} records in {secs:.1} s",
                            source.addr
                        ),
                        None => tracing::info!(
                            "re-sync with {} complete: what differed was exchanged, in {secs:.1} s",
                            source.addr
                        ),
                    }
                    synced = true;
                    break;
                }
                // The source has not heard of this node yet (a join's
                // news is on its way): not worth a warning.
                Err(LinkError::Remote { error, .. }) if error.kind == ErrorKind::Unavailable => {
                    tracing::debug!("handoff from {}: {error}; retrying", source.addr);
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                Err(e) => {
                    static RETRIES: crate::throttle::LogThrottle =
                        crate::throttle::LogThrottle::new(Duration::from_secs(10));
                    if let Some(left_out) = RETRIES.allow() {
                        tracing::warn!(left_out, "handoff from {}: {e}; retrying", source.addr);
                    }
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        }
        if !synced && let Some(lost_touch) = self.distrusted_until() {
            self.own_data(lost_touch);
        }
        self.end_sync();
    }

    /// Catches up from `source`: the records streamed or forgotten, or
    /// `None` for a returning node that exchanged only what differed.
    pub(super) async fn handoff_from(
        self: &Arc<Self>,
        source: &MemberUpdate,
    ) -> Result<Option<u64>, LinkError> {
        self.judge_absence().await;
        if let Some(seen) = self.distrusted_until() {
            // Away too long: the source's data is the truth.
            let (n, pruned) = self.prune_with(source.id, seen, None).await?;
            let n = n + self.prune_the_rest(seen, pruned).await;
            self.anti_entropy_with(source.id).await?;
            return Ok(Some(n));
        }
        if !self.store.all_collections().is_empty() {
            // A returning node: only what differs travels.
            self.anti_entropy_with(source.id).await?;
            return Ok(None);
        }
        let peer = self.peer(source.id).ok_or_else(|| LinkError::Refused {
            addr: source.addr.clone(),
            reason: "unknown member".into(),
        })?;
        let long = self.options.timeout.max(Duration::from_secs(10));
        // The collections this node owns, and how many records each holds.
        let mut wanted: Vec<(String, u64)> = Vec::new();
        // Named before their keys arrive: those holding entries and no
        // drop (one whose keys were all dropped is no collection to name).
        let mut named = std::collections::HashSet::new();
        let mut after = None;
        loop {
            let page = self.digest_page(&peer, after, long).await?;
            let Some(last) = page.last() else { break };
            after = Some(last.collection.clone());
            let m = self.membership.lock().unwrap();
            for d in page {
                if self.owners_in(&m, &d.collection).contains(&m.me().id) {
                    if d.entries > 0 && d.dropped_at.is_none() {
                        named.insert(d.collection.clone());
                    }
                    wanted.push((d.collection, d.entries));
                }
            }
        }
        self.sync
            .total
            .store(wanted.iter().map(|d| d.1).sum(), Ordering::Relaxed);
        *self.sync.expected.lock().unwrap() = named;
        let mut total = 0;
        for (collection, entries) in wanted {
            tracing::info!(
                "handoff of {collection:?} ({entries} records) from {}",
                source.addr
            );
            match peer
                .link
                .request(PeerOp::Handoff { collection }, Duration::from_secs(3600))
                .await?
            {
                PeerReply::HandoffDone(n) => total += n,
                other => tracing::warn!("unexpected handoff answer {other:?}"),
            }
        }
        // What was written while the stream ran reached this node live, or
        // is caught here.
        self.anti_entropy_with(source.id).await?;
        Ok(Some(total))
    }

    /// After being declared dead: compare digests with every live member,
    /// then report healthy.
    pub(super) async fn resync(self: Arc<Self>) {
        if !self.begin_sync() {
            return;
        }
        self.judge_absence().await;
        if away_too_long(
            &self.store,
            self.absence_now(),
            self.last_contact.load(Ordering::Acquire),
        )
        .is_some()
        {
            self.full_resync.store(true, Ordering::Release);
            self.stale_before
                .fetch_max(self.contact_stamp.load(Ordering::Acquire), Ordering::AcqRel);
        }
        if let Some(seen) = self.distrusted_until() {
            // Prune against one source before anything of ours travels.
            let mut pruned_once = false;
            while let Some(source) = self.wait_for_source().await {
                match self.prune_with(source.id, seen, None).await {
                    Ok((n, pruned)) => {
                        let n = n + self.prune_the_rest(seen, pruned).await;
                        tracing::info!("full re-sync with {}: {n} records forgotten", source.addr);
                        pruned_once = true;
                        break;
                    }
                    Err(e) => {
                        // Retried twice a second: one line in ten seconds.
                        static RETRIES: crate::throttle::LogThrottle =
                            crate::throttle::LogThrottle::new(Duration::from_secs(10));
                        if let Some(left_out) = RETRIES.allow() {
                            tracing::warn!(
                                left_out,
                                "full re-sync with {}: {e}; retrying",
                                source.addr
                            );
                        }
                        tokio::time::sleep(Duration::from_millis(500)).await;
                    }
                }
            }
            if !pruned_once {
                self.own_data(seen);
            }
        }
        for member in self.sources() {
            if let Err(e) = self.anti_entropy_with(member.id).await {
                tracing::warn!("re-sync with {}: {e}", member.addr);
            }
        }
        tracing::info!("re-sync complete");
        self.end_sync();
    }

    /// Streams `collection` to peer `to`, most recently written first
    /// (`Store::newest_first`: 8 bytes held per record, not the records),
    /// in `Apply` chunks, at most `HANDOFF_WINDOW` unanswered
    /// (back-pressure). Returns how many records went.
    pub(crate) async fn stream_collection(
        self: &Arc<Self>,
        to: u64,
        collection: &str,
    ) -> Result<u64, OpError> {
        let peer = self
            .peer(to)
            .ok_or_else(|| OpError::new(ErrorKind::Unavailable, "handoff to an unknown member"))?;
        let records = self
            .store
            .newest_first(collection)
            .map_err(crate::error::op_error)?;
        let mut sent = 0;
        let mut batcher =
            crate::batch::Batcher::new(self.moves.pacer.batch_bytes(BATCH_BYTES), BATCH_ITEMS);
        let timeout = self.options.timeout.max(Duration::from_secs(30));
        let drop = self
            .store
            .digest(collection)
            .map_err(crate::error::op_error)?
            .dropped_at;
        if let Some(d) = drop {
            batcher.push(Mutation::Drop {
                collection: collection.to_string(),
                version: stamp(d),
            });
        }
        // Up to HANDOFF_WINDOW chunks in flight: the receiver's apply and
        // the next chunk's encoding overlap, and the window bounds memory.
        let mut inflight = tokio::task::JoinSet::new();
        let send = |inflight: &mut tokio::task::JoinSet<_>, chunk: Vec<Mutation>| {
            let peer = peer.clone();
            let n = chunk.len() as u64;
            inflight.spawn(async move {
                peer.link
                    .request(PeerOp::Apply(chunk), timeout)
                    .await
                    .map(|_| n)
                    .map_err(|e| OpError::new(ErrorKind::Unavailable, e.to_string()))
            });
        };
        for r in records {
            let m = Mutation::Put {
                collection: collection.to_string(),
                key: r.key.into(),
                value: r.value,
                version: stamp(r.version),
            };
            if let Some(chunk) = batcher.push(m) {
                while inflight.len() >= HANDOFF_WINDOW {
                    sent += joined(inflight.join_next().await)?;
                }
                self.pace(&chunk).await;
                send(&mut inflight, chunk);
            }
        }
        if let Some(chunk) = batcher.finish() {
            self.pace(&chunk).await;
            send(&mut inflight, chunk);
        }
        while let Some(r) = inflight.join_next().await {
            sent += joined(Some(r))?;
        }
        Ok(sent)
    }

    /// Waits for the slot of a handoff chunk at the pace of moves.
    async fn pace(&self, chunk: &[Mutation]) {
        let bytes = chunk.iter().map(crate::batch::mutation_bytes).sum();
        self.moves.send(chunk.len(), bytes).await;
    }

    /// The full re-sync of a node away longer than the tombstone grace
    /// period, against peer `id`: for every collection both host, pulls
    /// the differing buckets, and forgets its own records the peer does not
    /// have that were stamped before it lost touch (`seen_ms`): the cluster
    /// deleted them and has since purged the tombstones. Nothing of this
    /// node's travels the other way. Returns how many records it forgot;
    /// fails (and the re-sync goes on) if anything could not be applied.
    ///
    /// With `only`, just those collections. Returns the records forgotten
    /// and the collections pruned.
    pub(super) async fn prune_with(
        self: &Arc<Self>,
        id: u64,
        seen_ms: u64,
        only: Option<&[String]>,
    ) -> Result<(u64, Vec<String>), LinkError> {
        // A peer that went on with its own data after an absence cannot
        // tell what was deleted after its horizon: a record stamped after
        // it that it lacks is one it never had. Pruned against it, this
        // node's data can judge no further either.
        let horizon = self.horizon_of(id).await?;
        let seen_ms = horizon.map_or(seen_ms, |h| h.min(seen_ms));
        let Some(mut pages) = self.shared_digests(id) else {
            return Ok((0, Vec::new()));
        };
        let long = self.options.timeout.max(Duration::from_secs(10));
        let mut forgotten = 0;
        let mut pruned = Vec::new();
        let only: Option<std::collections::HashSet<&str>> =
            only.map(|o| o.iter().map(String::as_str).collect());
        while let Some(mut shared) = self.next_shared(&mut pages).await? {
            if let Some(only) = &only {
                shared.retain(|(c, _)| only.contains(c.as_str()));
            }
            for (c, remote) in shared {
                forgotten += self
                    .prune_collection(&pages.peer, &c, &remote, seen_ms, long)
                    .await?;
                pruned.push(c);
            }
        }
        if let Some(h) = horizon {
            tracing::warn!(
                "the member this node re-synced from went on with its own data after an absence: only records stamped before it lost touch were judged by it"
            );
            self.take_horizon(h);
            self.stale_before.fetch_min(seen_ms, Ordering::AcqRel);
        }
        Ok((forgotten, pruned))
    }

    /// [`Cluster::prune_with`] of one collection, of which the peer holds
    /// `remote`. Returns how many records it forgot.
    async fn prune_collection(
        self: &Arc<Self>,
        peer: &Peer,
        c: &str,
        remote: &Digest,
        seen_ms: u64,
        long: Duration,
    ) -> Result<u64, LinkError> {
        let local = self.store.digest(c).map_err(local_error)?;
        self.apply_remote_drop(c, &local, remote).await?;
        let local = self.store.digest(c).map_err(local_error)?;
        let mut forgotten = 0;
        for chunk in buckets_to_exchange(&local, remote).chunks(BUCKETS_PER_REQUEST) {
            let known = self.pull_buckets(peer, c, chunk, long).await?;
            // A tombstone just above the forgotten record's version: it
            // hides nothing newer, and is itself old enough to be purged
            // at the next compaction.
            let mut forget = Vec::new();
            for b in chunk {
                let mine = self.store.bucket(c, *b).map_err(local_error)?;
                forget.extend(mine.filter_map(|r| {
                    let peer_has_key = known.contains_key(&r.key[..]);
                    forgotten_by_prune(r.value.is_some(), peer_has_key, r.version, seen_ms).then(
                        || Mutation::Put {
                            collection: c.to_string(),
                            key: r.key.into(),
                            value: None,
                            version: Stamp {
                                ts: r.version.ts + 1,
                                node: r.version.node,
                            },
                        },
                    )
                }));
            }
            forgotten += forget.len() as u64;
            let outcome = self
                .apply_async(forget, false)
                .await
                .map_err(LinkError::Local)?;
            if !outcome.refused.is_empty() {
                // Cannot happen (they are this node's own stamps + 1),
                // but a prune that did not forget is no prune.
                return Err(LinkError::Local(OpError::new(
                    ErrorKind::Internal,
                    "the prune's tombstones were refused",
                )));
            }
        }
        Ok(forgotten)
    }

    /// After a prune against one source: prunes every other collection
    /// this node holds against one live member that owns it too (with
    /// fewer owners than members, the first source shares only some).
    /// Returns the records forgotten.
    pub(super) async fn prune_the_rest(self: &Arc<Self>, seen_ms: u64, done: Vec<String>) -> u64 {
        let done: std::collections::HashSet<String> = done.into_iter().collect();
        let mut left: Vec<String> = self
            .store
            .all_collections()
            .into_iter()
            .filter(|c| !done.contains(c))
            .collect();
        let mut forgotten = 0;
        for source in self.sources() {
            if left.is_empty() {
                break;
            }
            match self.prune_with(source.id, seen_ms, Some(&left)).await {
                Ok((n, pruned)) => {
                    forgotten += n;
                    let pruned: std::collections::HashSet<String> = pruned.into_iter().collect();
                    left.retain(|c| !pruned.contains(c));
                }
                Err(e) => tracing::warn!("full re-sync with {}: {e}", source.addr),
            }
        }
        forgotten
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dhrt_storage::LOGICAL_BITS;

    #[test]
    fn a_prune_forgets_only_old_live_records_the_peer_never_heard_of() {
        // Lost touch at this clock's time, a few versions into a ms.
        let lost = (1_000_000 << LOGICAL_BITS) + 5;
        let before = Version::new(lost - 1, 1);
        assert!(forgotten_by_prune(true, false, before, lost));
        assert!(forgotten_by_prune(true, false, Version::new(lost, 1), lost));
        assert!(
            !forgotten_by_prune(true, true, before, lost),
            "the peer has it"
        );
        assert!(
            !forgotten_by_prune(false, false, before, lost),
            "a tombstone"
        );
        // Stamped after it in the same ms: a clock behind its peers' stamps
        // by the newest it saw, advancing only the logical part.
        assert!(
            !forgotten_by_prune(true, false, Version::new(lost + 1, 1), lost),
            "written since"
        );
    }
}
