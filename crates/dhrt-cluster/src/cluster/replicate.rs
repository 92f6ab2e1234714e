//! Replication: one queue per peer, its sender task, and the
//! write-concern wait (`crate::placement::need`). Invariant: a write counts
//! as acknowledged by a peer only when the peer answered for it and did not
//! refuse it.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use dhrt_proto::{ErrorKind, Liveness, Mutation, OpError, PeerOp, PeerReply, Stamp};
use dhrt_storage::Version;

use super::{BATCH_BYTES, BATCH_ITEMS, Cluster, Peer, collection_of, stamp};

/// How many times a write that lost to newer versions on replicas is
/// stamped again before it is left as it is (each time, a replica held a
/// version written meanwhile).
pub(crate) const RESTAMPS: usize = 3;
use crate::link::LinkError;
use crate::placement;
use crate::queue::Room;

impl Cluster {
    /// Sends `mutations` (all of one collection) to every replica hosting
    /// it and waits as the write concern says, at most the timeout. The
    /// writes are saved (here when `stored_locally`, and queued for every
    /// replica) whatever the outcome: an error of kind
    /// [`ErrorKind::WriteConcern`] says on how many replicas they are, when
    /// that is fewer than the concern asks. A replica that refused them
    /// does not count; one that does not answer in time is marked
    /// unhealthy and gets them later.
    ///
    /// A replica that answers that a write lost to a newer version it
    /// holds (written through another node whose clock is ahead of this
    /// one's, or that this node, not an owner, never saw) makes this node
    /// stamp that write again, later than the replica's version, store it
    /// again here (when `stored_locally`) and replicate it again, up to
    /// [`RESTAMPS`] times: a write acknowledged to a client does not lose
    /// to one acknowledged before it was sent.
    pub(crate) async fn replicate(
        self: &Arc<Self>,
        mutations: Vec<Mutation>,
        stored_locally: bool,
    ) -> Result<(), OpError> {
        self.replicate_latest(mutations, stored_locally)
            .await
            .map(drop)
    }

    /// [`replicate`](Self::replicate) of one mutation: its version as
    /// finally written (later than the one given, if stamped again).
    pub(crate) async fn replicate_one(
        self: &Arc<Self>,
        m: Mutation,
        stored_locally: bool,
    ) -> Result<Version, OpError> {
        let latest = self.replicate_latest(vec![m], stored_locally).await?;
        Ok(super::version(latest[0]))
    }

    /// [`replicate`](Self::replicate), returning each mutation's version
    /// as finally written (later than the one given, if it was stamped
    /// again).
    pub(crate) async fn replicate_latest(
        self: &Arc<Self>,
        mut mutations: Vec<Mutation>,
        stored_locally: bool,
    ) -> Result<Vec<Stamp>, OpError> {
        let mut pending: Vec<usize> = (0..mutations.len()).collect();
        // Writes that lost to versions this node cannot stamp after: their
        // keys, and the newest such version's distance past the latest
        // time this node admits (ms).
        let mut unfollowed: (Vec<bytes::Bytes>, u64) = (Vec::new(), 0);
        // The write concern's error, as the last round that sent every
        // write of the batch told it, or else the first round that missed
        // it (a round that sends only the writes stamped again says nothing
        // of the others); and the deadline of the first round that missed
        // it, which later rounds keep to.
        let mut unmet: Option<OpError> = None;
        let mut cap: Option<tokio::time::Instant> = None;
        for round in 0..=RESTAMPS {
            let whole = pending.len() == mutations.len();
            let batch: Vec<Mutation> = pending.iter().map(|&i| mutations[i].clone()).collect();
            let (lost, missed) = self.replicate_once(batch, stored_locally, cap).await?;
            if let Some((_, deadline)) = &missed {
                cap.get_or_insert(*deadline);
            }
            if whole || unmet.is_none() {
                unmet = missed.map(|(e, _)| e);
            }
            let clock = self.store.clock();
            // A newer version stamped further ahead than this node admits
            // from peers (a replica's clock was ahead when it was written,
            // or the cluster's middle clock moved back since, or the
            // replica lies) is not followed: stamping after it would push
            // this node's clock out of bounds, and every peer would refuse
            // the write anyway.
            let (guard, wall) = (self.guard(), self.admission_wall());
            let (lost, beyond): (Vec<_>, Vec<_>) = lost
                .into_iter()
                .partition(|(_, newer)| guard.admits(newer.ts, wall));
            if let Some((_, v)) = beyond.iter().max_by_key(|(_, v)| v.ts) {
                tracing::warn!(
                    "{} writes lost to versions stamped up to {} s ahead of this node's clock (more than the {} s allowed), by node {:016x}: not stamped again; check the clocks",
                    beyond.len(),
                    crate::skew::Guard::ahead_s(v.ts, wall),
                    guard.max_offset_ms / 1000,
                    v.node
                );
                // A drop that left a key so far ahead undid all the rest
                // everywhere, and nothing will undo it: only that key stays.
                let puts = beyond
                    .iter()
                    .filter(|&&(at, _)| matches!(mutations[pending[at]], Mutation::Put { .. }));
                if let Some((_, v)) = puts.clone().max_by_key(|(_, v)| v.ts) {
                    let past = (v.ts >> dhrt_storage::LOGICAL_BITS)
                        .saturating_sub(wall.saturating_add(guard.max_offset_ms));
                    unfollowed.1 = unfollowed.1.max(past);
                    unfollowed
                        .0
                        .extend(puts.map(|&(at, _)| super::key_of(&mutations[pending[at]])));
                }
            }
            if lost.is_empty() || round == RESTAMPS {
                if !lost.is_empty() {
                    tracing::warn!(
                        "{} writes lost to newer versions on replicas {RESTAMPS} times in a row: left as they are",
                        lost.len()
                    );
                }
                break;
            }
            let mut again = Vec::with_capacity(lost.len());
            for (at, newer) in lost {
                let i = pending[at];
                clock.observe(newer.ts);
                let fresh = stamp(clock.now());
                let (Mutation::Put { version: v, .. } | Mutation::Drop { version: v, .. }) =
                    &mut mutations[i];
                *v = fresh;
                again.push(i);
            }
            if stored_locally {
                let restamped = again.iter().map(|&i| mutations[i].clone()).collect();
                self.apply_async(restamped, false).await?;
            }
            pending = again;
        }
        // A version that will undo the write is told first: the replicas
        // that lack the write get it later, and lose it to that version.
        if !unfollowed.0.is_empty() {
            return Err(crate::error::undone_later(
                &unfollowed.0,
                mutations.len(),
                unfollowed.1,
                self.guard().max_offset_ms,
            ));
        }
        if let Some(e) = unmet {
            return Err(e);
        }
        Ok(mutations
            .iter()
            .map(|m| match m {
                Mutation::Put { version, .. } | Mutation::Drop { version, .. } => *version,
            })
            .collect())
    }

    /// One round of [`replicate`](Self::replicate): the offsets (into
    /// `mutations`) of the writes an answering replica holds a newer
    /// version of, each with the newest such version; and, if the write
    /// concern was not met, its error with this round's deadline. A round
    /// waits until `cap` at the latest (the deadline of an earlier round
    /// that missed the concern: stamping writes again does not make the
    /// client wait a timeout more).
    async fn replicate_once(
        self: &Arc<Self>,
        mutations: Vec<Mutation>,
        stored_locally: bool,
        cap: Option<tokio::time::Instant>,
    ) -> Result<(Vec<(usize, Stamp)>, Option<(OpError, tokio::time::Instant)>), OpError> {
        if !self.has_peers() {
            return match mutations.first() {
                Some(m) => self
                    .unreached_concern(collection_of(m))
                    .map(|()| (Vec::new(), None)),
                None => Ok((Vec::new(), None)),
            };
        }
        let Some(collection) = mutations.first().map(|m| collection_of(m).to_string()) else {
            return Ok((Vec::new(), None));
        };
        let (targets, reachable, owner_here): (Vec<u64>, HashSet<u64>, bool) = {
            let m = self.membership.lock().unwrap();
            let owners = self.owners_in(&m, &collection);
            let owner_here = owners.contains(&m.me().id);
            let targets = m
                .members()
                .filter(|u| u.liveness != Liveness::Left && owners.contains(&u.id))
                .map(|u| u.id)
                .collect();
            let reachable = m
                .members()
                .filter(|u| {
                    matches!(u.liveness, Liveness::Alive | Liveness::Suspect)
                        && owners.contains(&u.id)
                })
                .map(|u| u.id)
                .collect();
            (targets, reachable, owner_here)
        };
        let need = placement::need(self.options.write_ack, targets.len(), stored_locally);
        let (mut waits, mut queued) = (Vec::new(), Vec::new());
        // Replicas the write is queued for that are down: it reaches them
        // when they are back.
        let mut held_for_later = 0;
        for id in targets {
            let Some(peer) = self.peer(id) else { continue };
            let (first, last, bytes) = self.enqueue(&peer, &mutations);
            if reachable.contains(&id) {
                waits.push((peer, first, last));
                queued.push(bytes);
            } else {
                held_for_later += 1;
            }
        }
        if need.remote_acks == 0 {
            return Ok((Vec::new(), None));
        }
        let local = usize::from(stored_locally);
        let started = tokio::time::Instant::now();
        // A large value is given the time its bytes take at the slowest
        // rate a link is allowed, as its replication request is: a write
        // of 16 MiB is not 504 for taking more than --timeout-ms to cross.
        let bytes: usize = mutations.iter().map(crate::batch::mutation_bytes).sum();
        let allowed = self.options.timeout + crate::link::transfer_time(bytes);
        // What each peer had acknowledged, and its link moved: a peer
        // working through a large value or a backlog does one or the
        // other, one that does not answer neither.
        // And the bytes queued for it, this write's included: a backlog of
        // large values takes its time to cross even a fast link, and to
        // be applied by a busy peer.
        let at_start: Vec<(u64, u64, usize)> = waits
            .iter()
            .zip(queued)
            .map(|((p, ..), queued)| (p.acked.load(Ordering::Acquire), p.link.moved(), queued))
            .collect();
        // A write this node only forwards, that no replica has yet, lives
        // in its memory (the queues) alone: it is kept in its store too,
        // like a copy of a collection it does not own, handed over to the
        // owners (`moves.rs`) even if this node stops or crashes first.
        let waited = &waits;
        let unmet = |acked: usize| async move {
            let when = if started.elapsed() >= allowed {
                format!("within {} ms", allowed.as_millis())
            } else {
                "(too few replicas are up or accept it)".to_string()
            };
            // A copy on a node that does not own the collection (kept
            // because no owner is up) is no replica: it is not counted.
            let stand_in = local == 1 && !owner_here;
            let kept =
                stand_in || (acked + local == 0 && self.keep_unacknowledged(&mutations).await);
            let (saved, replicas, copies) = if stand_in {
                (acked, need.replicas - 1, need.remote_acks)
            } else {
                (acked + local, need.replicas, need.copies)
            };
            let refused = |(p, first, last): &&(Arc<Peer>, u64, u64)| {
                let at = p.acked.load(Ordering::Acquire);
                at >= *last && !Self::acknowledged_at(p, at, *first, *last)
            };
            // A replica that answered and refused says why.
            let why = waited
                .iter()
                .find(refused)
                .map(|(p, ..)| (p.link.addr().to_string(), p.refusal.lock().unwrap().clone()))
                .filter(|(_, why)| !why.is_empty())
                .map_or(String::new(), |(addr, why)| {
                    format!(" (replica {addr} refused it: {why})")
                });
            // Every replica refused it, none is waited for later, and this
            // node could not keep it: it is nowhere, and says so.
            if saved == 0 && !kept && held_for_later == 0 && waited.iter().all(|w| refused(&w)) {
                let reason = if waited.is_empty() {
                    "no replica is known to this node now".to_string()
                } else {
                    format!("every replica refused it{why}")
                };
                return OpError::new(
                    ErrorKind::Unavailable,
                    format!("the write is not saved: {reason}, and this node could not keep it"),
                );
            }
            // Saved nowhere yet: it waits in this node's memory (the
            // queues) for replicas that are down.
            if saved == 0 && !kept {
                return OpError::new(
                    ErrorKind::WriteConcern,
                    format!(
                        "write concern {} not met {when}{why}: the write is saved on no replica yet (this node, not a replica, could not keep it): it waits in this node's memory for the replicas, and is lost if this node stops first",
                        self.options.write_ack.as_str(),
                    ),
                );
            }
            OpError::new(
                ErrorKind::WriteConcern,
                format!(
                    "write concern {} not met {when}{why}: the write is saved on {} of {} replicas ({} needed){} and will reach the others",
                    self.options.write_ack.as_str(),
                    saved,
                    replicas,
                    copies,
                    if kept {
                        ", kept on this node (not a replica) until one has it,"
                    } else {
                        ""
                    }
                ),
            )
        };
        let deadline = cap.map_or(started + allowed, |cap| cap.min(started + allowed));
        // One reading of each peer: how many answered, of those how many
        // acknowledged (answered and refused nothing), how many of the
        // others are given up on (their link fails: a refused dial, a
        // broken connection), and when the next of them will be.
        let tally = || {
            let (mut answered, mut done, mut gone, mut next) = (0, 0, 0, deadline);
            let now = tokio::time::Instant::now();
            for (p, first, last) in &waits {
                let acked = p.acked.load(Ordering::Acquire);
                if acked >= *last {
                    answered += 1;
                    done += usize::from(Self::acknowledged_at(p, acked, *first, *last));
                } else if let Some(at) = p.given_up_at(started, self.options.timeout) {
                    if at <= now {
                        gone += 1;
                    } else {
                        next = next.min(at);
                    }
                }
            }
            (answered, done, gone, next)
        };
        loop {
            let notified = self.acks.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let (answered, done, gone, next) = tally();
            if done >= need.remote_acks {
                return Ok((Self::superseded(&waits), None));
            }
            // Too few replicas are up, or some refused: once every one that
            // can answer has (or cannot be reached), the outcome is known.
            let refused = answered - done;
            if waits.len() - refused - gone < need.remote_acks && answered + gone == waits.len() {
                break;
            }
            if tokio::time::timeout_at(next, notified).await.is_err() && next >= deadline {
                for ((p, _, last), (acked, moved, queued)) in waits.iter().zip(&at_start) {
                    // Still taking what it was sent (a large value, or
                    // writes queued before this one): late, not unhealthy.
                    // Its sender gives up on it if that stops. With more
                    // than a MiB queued, not judged here at all: its
                    // link's requests, allowed their bytes' time at the
                    // slowest rate, time out if it stalls, and membership
                    // probes go on meanwhile.
                    let now_acked = p.acked.load(Ordering::Acquire);
                    let moving = now_acked > *acked
                        || p.link.moved().saturating_sub(*moved) >= crate::link::MIN_MOVED;
                    let backlog = crate::link::transfer_time(queued.saturating_sub(1 << 20));
                    if now_acked < *last && !moving && started.elapsed() >= allowed + backlog {
                        tracing::warn!(
                            "peer {} did not acknowledge a write within {} ms: unhealthy",
                            p.link.addr(),
                            allowed.as_millis()
                        );
                        self.suspect(p.id);
                    }
                }
                break;
            }
        }
        // The replicas that saved the writes: acknowledged them, and hold
        // no newer version of any (one that kept its own is no copy).
        let saved = waits
            .iter()
            .filter(|(p, first, last)| {
                let acked = p.acked.load(Ordering::Acquire);
                Self::acknowledged_at(p, acked, *first, *last)
                    && Self::superseded_by(p, *first, *last).is_empty()
            })
            .count();
        let missed = unmet(saved).await;
        Ok((Self::superseded(&waits), Some((missed, deadline))))
    }

    /// Of the writes each waited-for peer answered for, those it holds a
    /// newer version of: offsets with the newest version told.
    fn superseded(waits: &[(Arc<Peer>, u64, u64)]) -> Vec<(usize, Stamp)> {
        let mut lost: Vec<(usize, Stamp)> = Vec::new();
        for (p, first, last) in waits {
            lost.extend(Self::superseded_by(p, *first, *last));
        }
        lost.sort_unstable_by(|a, b| a.0.cmp(&b.0).then(b.1.cmp(&a.1)));
        lost.dedup_by_key(|(at, _)| *at);
        lost
    }

    /// Of the writes `first..=last`, those peer `p` answered for and holds
    /// a newer version of.
    fn superseded_by(p: &Peer, first: u64, last: u64) -> Vec<(usize, Stamp)> {
        if !p.any_superseded.load(Ordering::Acquire) || p.acked.load(Ordering::Acquire) < last {
            return Vec::new();
        }
        p.queue.lock().unwrap().superseded_in(first, last)
    }

    /// Whether peer `p`, having answered through `acked`, acknowledged the
    /// writes `first..=last` (answered, and refused none of them).
    pub(super) fn acknowledged_at(p: &Peer, acked: u64, first: u64, last: u64) -> bool {
        if acked < last {
            return false;
        }
        if !p.any_refused.load(Ordering::Acquire) {
            return true;
        }
        p.queue.lock().unwrap().acknowledged(acked, first, last)
    }

    /// Queues `mutations` for `peer`; returns the sequence numbers of the
    /// first and the last.
    /// Queues `mutations` for `peer`: their range in its queue, and the
    /// bytes it holds now, theirs included.
    pub(super) fn enqueue(&self, peer: &Peer, mutations: &[Mutation]) -> (u64, u64, usize) {
        let (first, last, queued) = {
            let mut queue = peer.queue.lock().unwrap();
            let room = Room {
                items: self.options.max_hints,
                bytes: self.options.max_hint_bytes,
            };
            let (first, last) = queue.push(mutations, room);
            (first, last, queue.bytes())
        };
        peer.wake.notify_one();
        (first, last, queued)
    }

    pub(super) async fn replication_loop(self: Arc<Self>, peer: Arc<Peer>) {
        let mut backoff = Duration::from_millis(100);
        loop {
            if peer.gone.load(Ordering::Acquire) {
                return;
            }
            let batch: Vec<(u64, Mutation)> = {
                peer.queue
                    .lock()
                    .unwrap()
                    .next_batch(BATCH_BYTES, BATCH_ITEMS)
            };
            if batch.is_empty() {
                let _ = tokio::time::timeout(Duration::from_secs(1), peer.wake.notified()).await;
                continue;
            }
            let liveness = self
                .membership
                .lock()
                .unwrap()
                .get(peer.id)
                .map(|u| u.liveness);
            if matches!(liveness, Some(Liveness::Dead)) && !self.options.repair {
                let last = batch.last().map_or(0, |(s, _)| *s);
                self.refuse(&peer, batch.iter().map(|(s, _)| *s));
                self.ack_through(&peer, last);
                continue;
            }
            if matches!(liveness, Some(Liveness::Dead)) {
                // Hold the hints until it is back (a probe will tell).
                let _ = tokio::time::timeout(Duration::from_secs(1), peer.wake.notified()).await;
                if !matches!(
                    self.membership
                        .lock()
                        .unwrap()
                        .get(peer.id)
                        .map(|u| u.liveness),
                    Some(Liveness::Alive)
                ) {
                    continue;
                }
            }
            let last = batch.last().map_or(0, |(s, _)| *s);
            let seqs: Vec<u64> = batch.iter().map(|(s, _)| *s).collect();
            let mutations: Vec<Mutation> = batch.into_iter().map(|(_, m)| m).collect();
            let timeout = self
                .options
                .timeout
                .max(Duration::from_millis((mutations.len() as u64 / 8).max(1)));
            let sent = peer
                .link
                .request(PeerOp::ApplyReporting(mutations), timeout)
                .await;
            match &sent {
                Err(LinkError::Unreachable { .. } | LinkError::Refused { .. }) => {
                    peer.failed();
                    // A write waiting for it need not wait its whole time.
                    self.acks.notify_waiters();
                }
                Err(LinkError::Timeout { .. } | LinkError::Local(_)) => {}
                Ok(_) | Err(LinkError::Remote { .. }) => peer.answered(),
            }
            match sent {
                Ok(PeerReply::Superseded { refused, newer, .. }) => {
                    self.refused_by(&peer, &seqs, &refused);
                    {
                        let mut q = peer.queue.lock().unwrap();
                        q.superseded(
                            newer
                                .iter()
                                .filter_map(|&(i, v)| seqs.get(i as usize).map(|&s| (s, v))),
                        );
                        peer.any_superseded
                            .store(q.any_superseded(), Ordering::Release);
                    }
                    self.ack_through(&peer, last);
                    self.heard_from(peer.id);
                    backoff = Duration::from_millis(100);
                }
                Ok(PeerReply::Applied { refused, .. }) => {
                    self.refused_by(&peer, &seqs, &refused);
                    self.ack_through(&peer, last);
                    self.heard_from(peer.id);
                    backoff = Duration::from_millis(100);
                }
                Ok(other) => {
                    tracing::error!(
                        "peer {} answered replicated writes with {other:?}",
                        peer.link.addr()
                    );
                    self.refuse(&peer, seqs.iter().copied());
                    self.ack_through(&peer, last);
                }
                Err(LinkError::Remote { error, .. }) => {
                    // Once a second at most: a peer whose disk is full
                    // refuses every batch.
                    peer.refusal.lock().unwrap().clone_from(&error.message);
                    static REFUSED: crate::throttle::LogThrottle =
                        crate::throttle::LogThrottle::new(Duration::from_secs(1));
                    if let Some(left_out) = REFUSED.allow() {
                        tracing::error!(
                            left_out,
                            "peer {} refused replicated writes: {}",
                            peer.link.addr(),
                            error.message
                        );
                    }
                    // Retrying cannot help: skip them, unacknowledged
                    // (anti-entropy will compare again later).
                    self.refuse(&peer, seqs.iter().copied());
                    self.ack_through(&peer, last);
                }
                Err(e) if !self.options.repair => {
                    // No hints: what did not go through is gone for it.
                    tracing::debug!("replication to {}: {e}; dropped", peer.link.addr());
                    self.suspect(peer.id);
                    self.refuse(&peer, seqs.iter().copied());
                    self.ack_through(&peer, last);
                }
                Err(e) => {
                    tracing::debug!("replication to {}: {e}", peer.link.addr());
                    self.suspect(peer.id);
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                }
            }
        }
    }

    /// Remembers the writes of a batch (`seqs`) that `peer` refused, by
    /// their indexes in it.
    fn refused_by(&self, peer: &Peer, seqs: &[u64], refused: &[u32]) {
        if refused.is_empty() {
            return;
        }
        *peer.refusal.lock().unwrap() =
            "stamped too far ahead of its clock, or to a collection it cannot create (see its log)"
                .to_string();
        static REFUSED: crate::throttle::LogThrottle =
            crate::throttle::LogThrottle::new(Duration::from_secs(1));
        if let Some(left_out) = REFUSED.allow() {
            tracing::error!(
                left_out,
                "peer {} refused {} replicated writes, stamped too far ahead of its clock or to collections it cannot create: see its log",
                peer.link.addr(),
                refused.len()
            );
        }
        self.refuse(
            peer,
            refused
                .iter()
                .filter_map(|&i| seqs.get(i as usize).copied()),
        );
    }

    /// Remembers writes `peer` refused: they leave its queue but are not
    /// acknowledged.
    pub(super) fn refuse(&self, peer: &Peer, seqs: impl Iterator<Item = u64>) {
        let mut q = peer.queue.lock().unwrap();
        q.refuse(seqs);
        peer.any_refused.store(q.any_refused(), Ordering::Release);
    }

    pub(super) fn ack_through(&self, peer: &Peer, last: u64) {
        peer.queue.lock().unwrap().ack_through(last);
        peer.acked.fetch_max(last, Ordering::AcqRel);
        self.acks.notify_waiters();
    }

    /// A fresh version for a write this node does not store itself.
    pub(crate) fn stamp_now(&self) -> Version {
        self.store.clock().now()
    }

    /// [`stamp_now`](Self::stamp_now), later than `seen` (what the owners
    /// told of the key), whatever this node's clock says.
    pub(crate) fn stamp_after(&self, seen: Option<dhrt_proto::Stamp>) -> Version {
        if let Some(s) = seen {
            self.store.clock().observe(s.ts);
        }
        self.stamp_now()
    }
}
