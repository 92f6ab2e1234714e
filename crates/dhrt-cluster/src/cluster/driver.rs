//! The membership driver: the tokio side of the sans-I/O [`Membership`]
//! state machine (ticks, gossip in and out, member changes and what they
//! set off), joining and leaving, and the clock verdict drawn from the
//! peers' gossip (`crate::skew`).

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use dhrt_proto::{ErrorKind, Gossip, Liveness, MemberUpdate, OpError, PeerOp, PeerReply};
use tokio::time::Instant;

use super::moves::Round;
use super::{Cluster, Peer};
use crate::link::{Link, LinkError};
use crate::membership::Membership;
use crate::membership::{Output, member_state, remembered_only};

/// How long a leaving member's last anti-entropy round may take.
const LEAVE_ROUND: Duration = Duration::from_secs(5);

/// How long a leaving member hands its copies over before it goes.
const HANDOVER_ON_LEAVE: Duration = Duration::from_secs(30);
/// The least time the round after the goodbye gets.
const LAST_HANDOVER: Duration = Duration::from_secs(5);

/// A gossip connection younger than this is kept when a probe over it goes
/// unanswered: the first probe over a fresh one waits for the dial and
/// the handshake (four round trips) and may miss, which must not make the
/// next one dial again; past it, a stuck one is replaced at the first
/// probe it loses.
const GOSSIP_CONN_MIN_AGE: Duration = Duration::from_secs(2);

impl Cluster {
    pub(super) fn with_membership<T>(
        self: &Arc<Self>,
        f: impl FnOnce(&mut Membership, u64) -> T,
    ) -> T {
        let now = self.now_ms();
        let (value, outputs) = {
            let mut m = self.membership.lock().unwrap();
            let value = f(&mut m, now);
            // Remembered from an earlier life and not heard of since:
            // no peer yet.
            let known = m
                .members()
                .any(|u| u.liveness != Liveness::Left && !remembered_only(u));
            if known && !self.peers_known.swap(known, Ordering::AcqRel) {
                // Peers from now on: the clock is unchecked until compared.
                self.peers_since_ms.store(now.max(1), Ordering::Release);
            }
            self.peers_known.store(known, Ordering::Release);
            let pinned = m
                .members()
                .any(|u| u.liveness != Liveness::Left && u.collections.is_some());
            self.members_pinned.store(pinned, Ordering::Release);
            if known {
                self.heard_peers.store(true, Ordering::Release);
            }
            (value, m.drain())
        };
        self.perform(outputs);
        value
    }

    pub(super) fn perform(self: &Arc<Self>, outputs: Vec<Output>) {
        for output in outputs {
            match output {
                Output::Send { to, mut gossip } => {
                    if let Some(peer) = self.peer(to) {
                        let timeout = self.options.timeout;
                        gossip.sent_ms = self.wall_ms();
                        gossip.max_offset_ms = self.options.max_clock_ahead.as_millis() as u64;
                        tokio::spawn(async move {
                            let _ = peer.gossip.gossip(gossip, timeout).await;
                        });
                    }
                }
                Output::Changed { member, before } => self.member_changed(member, before),
                Output::MustResync => {
                    tracing::warn!(
                        "the cluster declared this node dead while it was away: re-syncing"
                    );
                    let me = self.clone();
                    tokio::spawn(async move { me.resync().await });
                }
                Output::Forgotten { id } => {
                    tracing::info!(
                        id = %format!("{id:016x}"),
                        "member replaced by a new one at its address: forgotten"
                    );
                    self.drop_peer(id);
                }
                Output::SharedId { id, addrs } => tracing::warn!(
                    "member {id:016x} announces itself at {} and at {} in turn: two processes share its node id (a copied data directory?); stop one, or start it on an empty data directory",
                    addrs[0],
                    addrs[1]
                ),
                Output::Unanswered { member } => {
                    // Not one just dialed: on a link of long round trips
                    // a fresh connection misses its first probes too.
                    if let Some(peer) = self.peers.lock().unwrap().get(&member) {
                        peer.gossip.abandon(GOSSIP_CONN_MIN_AGE);
                    }
                }
                Output::LeftForgotten { id } => {
                    tracing::info!(id = %format!("{id:016x}"), "member left long ago: forgotten");
                    self.drop_peer(id);
                }
            }
        }
    }

    /// Stops serving a forgotten member.
    fn drop_peer(&self, id: u64) {
        if let Some(old) = self.peers.lock().unwrap().remove(&id) {
            old.gone.store(true, Ordering::Release);
            old.wake.notify_one();
        }
    }

    pub(super) fn member_changed(self: &Arc<Self>, member: MemberUpdate, before: Option<Liveness>) {
        let state = member_state(&member);
        tracing::info!(
            peer = %member.name, addr = %member.addr, id = %format!("{:016x}", member.id),
            "member is {}", state.as_str()
        );
        let Some(peer) = self.peer(member.id) else {
            return;
        };
        match member.liveness {
            Liveness::Left => {
                // It said goodbye: what it would have received is its
                // problem on return (anti-entropy), not a growing queue here.
                let mut q = peer.queue.lock().unwrap();
                let last = q.clear();
                peer.acked.store(last, Ordering::Release);
                drop(q);
                self.acks.notify_waiters();
            }
            Liveness::Alive => {
                peer.wake.notify_one();
                let overflowed = std::mem::take(&mut peer.queue.lock().unwrap().overflowed);
                let returning = matches!(before, Some(Liveness::Dead) | Some(Liveness::Left));
                if (overflowed || returning) && !member.syncing {
                    let me = self.clone();
                    tokio::spawn(async move {
                        if let Err(e) = me.anti_entropy_with(member.id).await {
                            tracing::debug!("anti-entropy with a returning peer: {e}");
                        }
                    });
                }
            }
            _ => {}
        }
    }

    /// The peer with this id, created (with its replication task) on first
    /// use. `None` for this node and unknown ids.
    pub(super) fn peer(self: &Arc<Self>, id: u64) -> Option<Arc<Peer>> {
        if id == self.dialer.me {
            return None;
        }
        let addr = self.membership.lock().unwrap().get(id)?.addr.clone();
        let mut peers = self.peers.lock().unwrap();
        if let Some(p) = peers.get(&id)
            && p.link.addr() == addr
        {
            return Some(p.clone());
        }
        if let Some(old) = peers.remove(&id) {
            old.gone.store(true, Ordering::Release);
            old.wake.notify_one();
        }
        let peer = Arc::new(Peer::new(
            id,
            Link::to_member(addr.clone(), id, self.dialer.clone()),
            Link::to_member(addr, id, self.dialer.clone()),
        ));
        peers.insert(id, peer.clone());
        let me = self.clone();
        let p = peer.clone();
        tokio::spawn(async move { me.replication_loop(p).await });
        Some(peer)
    }

    pub(super) async fn membership_loop(self: Arc<Self>) {
        let mut ticker =
            tokio::time::interval(Duration::from_millis(self.options.membership.period_ms));
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        while self.running.load(Ordering::Acquire) {
            ticker.tick().await;
            self.with_membership(|m, now| m.tick(now));
            self.judge_clock();
        }
    }

    /// Membership news from peer `from` (authenticated by the handshake):
    /// gossip that claims another sender is dropped.
    pub(crate) fn on_gossip(self: &Arc<Self>, from: u64, gossip: Gossip) {
        if gossip.from != from {
            tracing::warn!(
                "dropped gossip from node {from:016x} claiming to come from {:016x}",
                gossip.from
            );
            return;
        }
        let mono = self.now_ms();
        {
            let mut offsets = self.offsets.lock().unwrap();
            offsets.record(from, gossip.sent_ms, mono);
            offsets.record_setting(from, gossip.max_offset_ms);
        }
        self.with_membership(|m, now| m.handle(now, gossip));
        if !self.clock_measured.load(Ordering::Acquire) {
            // Not judged on enough peers yet: judge at once, writes wait
            // on it.
            self.judge_clock();
        }
    }

    /// A node asks to join through this one: learn it (its own word on
    /// itself), and hand it the table.
    pub(crate) fn on_join(self: &Arc<Self>, update: MemberUpdate) -> Vec<MemberUpdate> {
        self.with_membership(|m, now| {
            m.merge_own_word(now, update);
            m.sync_table()
        })
    }

    pub(super) fn suspect(self: &Arc<Self>, id: u64) {
        self.with_membership(|m, now| m.suspect(now, id));
    }

    pub(super) fn heard_from(self: &Arc<Self>, id: u64) {
        self.with_membership(|m, _| m.heard_from(id));
    }

    /// Joins through `addr` (or the configured seeds): learns the members,
    /// receives the handoff, and then reports itself healthy.
    pub(super) async fn join(self: Arc<Self>) {
        let mut seeds = self.options.seeds.clone();
        let mut backoff = Duration::from_millis(200);
        loop {
            let alive = self.alive_peers();
            if !alive.is_empty() {
                // Someone reached this node first: it is in. Its gossip
                // brings news, not the whole table: ask for that (a failed
                // ask leaves the clock to be cleared after its grace).
                for peer in &alive {
                    if self.join_through(&peer.addr).await.is_ok() {
                        break;
                    }
                }
                self.handoff().await;
                return;
            }
            let mut itself = Vec::new();
            for seed in &seeds {
                match self.join_through(seed).await {
                    Ok(()) => {
                        self.handoff().await;
                        return;
                    }
                    Err(LinkError::Refused { reason, .. }) if reason == crate::link::ITSELF => {
                        tracing::error!(
                            "--node {seed} reaches this node itself: not a member to join through"
                        );
                        itself.push(seed.clone());
                    }
                    Err(e) => tracing::warn!("joining through {seed}: {e}"),
                }
            }
            seeds.retain(|s| !itself.contains(s));
            if seeds.is_empty() {
                // Given only itself: a node started alone (the seed of a
                // configuration every node shares). No member to wait for,
                // nothing to sync from, nobody to judge its clock by.
                self.heard_peers.store(true, Ordering::Release);
                self.seeds_are_itself.store(true, Ordering::Release);
                self.members_learned.store(true, Ordering::Release);
                self.absence_judged.store(true, Ordering::Release);
                self.with_membership(|m, _| m.set_syncing(false));
                return;
            }
            if !self.running.load(Ordering::Acquire) {
                return;
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
    }

    /// `dhrt-cli join ADDR`: a running node joins the cluster of the member
    /// at `addr`, then exchanges data with it (a handoff when this node is
    /// empty, anti-entropy otherwise) while reporting itself syncing.
    /// Returns how many members it knows.
    pub async fn join_running(self: &Arc<Self>, addr: &str) -> Result<u32, OpError> {
        if !self.options.takes_peers {
            return Err(OpError::new(
                ErrorKind::InvalidInput,
                "this node has an auth file and no cluster secret, so it takes no peers and joins no cluster: set --cluster-secret on every node to cluster",
            ));
        }
        let me = self.membership.lock().unwrap().me().addr.clone();
        if addr.trim().is_empty() || addr == me {
            return Err(OpError::new(
                ErrorKind::InvalidInput,
                format!("cannot join through {addr:?}: give another member's address"),
            ));
        }
        self.with_membership(|m, _| m.set_syncing(true));
        // Its clock is unchecked against the cluster it joins until it has
        // that cluster's table and has compared it with enough members.
        self.members_learned.store(false, Ordering::Release);
        self.clock_measured.store(false, Ordering::Release);
        self.peers_compared.store(false, Ordering::Release);
        if let Err(e) = self.join_through(addr).await {
            self.members_learned.store(true, Ordering::Release);
            if !self.sync.running.load(Ordering::Acquire) {
                self.with_membership(|m, _| m.set_syncing(false));
            }
            let kind = match &e {
                LinkError::Refused { reason, .. } if reason == crate::link::ITSELF => {
                    ErrorKind::InvalidInput
                }
                _ => ErrorKind::Unavailable,
            };
            return Err(OpError::new(kind, format!("joining: {e}")));
        }
        let me = self.clone();
        tokio::spawn(async move { me.handoff().await });
        Ok(self.membership.lock().unwrap().table().len() as u32)
    }

    /// `dhrt-cli remove MEMBER`: the dead member `who` (its id, 16 hex
    /// digits, or its address) will not come back. It is `Left` from now
    /// on, here and, as the news spreads, on every member that knows it
    /// dead: it owns nothing, its hints are dropped, and the collections it
    /// owned get new owners, which their other owners fill (anti-entropy).
    /// Returns its id.
    pub fn remove_member(self: &Arc<Self>, who: &str) -> Result<String, OpError> {
        let who = who.trim();
        let id = {
            let m = self.membership.lock().unwrap();
            m.members()
                .find(|u| {
                    format!("{:016x}", u.id) == who.to_ascii_lowercase()
                        || (u.addr == who && u.liveness != Liveness::Left)
                })
                .map(|u| u.id)
        };
        let Some(id) = id else {
            return Err(OpError::new(
                ErrorKind::NotFound,
                format!(
                    "no member {who:?} is known here (give its id, 16 hex digits, or its address)"
                ),
            ));
        };
        let removed = self
            .with_membership(|m, now| m.remove(now, id))
            .map_err(|e| OpError::new(ErrorKind::InvalidInput, e))?;
        tracing::warn!(
            id = %format!("{id:016x}"), addr = %removed.addr,
            "dead member removed by an operator: its collections go to new owners"
        );
        Ok(format!("{id:016x}"))
    }

    /// Asks the member at `addr` to let this node in.
    pub async fn join_through(self: &Arc<Self>, addr: &str) -> Result<(), LinkError> {
        let link = Link::new(addr.to_string(), self.dialer.clone());
        let me = self.membership.lock().unwrap().me().clone();
        match link
            .request(
                PeerOp::Join(me),
                self.options.timeout.max(Duration::from_secs(2)),
            )
            .await?
        {
            PeerReply::Members(table) => {
                tracing::info!("joined through {addr}: {} members", table.len());
                self.with_membership(|m, now| m.merge(now, table));
                self.members_learned.store(true, Ordering::Release);
                self.save_state(&self.saved_state());
                Ok(())
            }
            other => Err(LinkError::Refused {
                addr: addr.to_string(),
                reason: format!("unexpected answer to a join: {other:?}"),
            }),
        }
    }

    /// Live members other than this one, healthy first.
    pub(super) fn alive_peers(&self) -> Vec<MemberUpdate> {
        let m = self.membership.lock().unwrap();
        let mut peers: Vec<MemberUpdate> = m
            .members()
            .filter(|u| u.liveness == Liveness::Alive)
            .cloned()
            .collect();
        peers.sort_by_key(|u| u.syncing);
        peers
    }

    /// Tells the cluster this node is leaving, waiting briefly for the news
    /// to go out.
    ///
    /// Where collections have fewer owners than members, the collections
    /// this node holds are first handed to the owners that remain (for at
    /// most `HANDOVER_ON_LEAVE` in all, and `LAST_HANDOVER` after the
    /// goodbye).
    pub async fn leave(self: &Arc<Self>) {
        // Hand what is still queued to the peers that can take it, so that
        // a write this node acknowledged does not leave with it: while the
        // queues drain (a large value on a slow link takes its time), for
        // at most `HANDOVER_ON_LEAVE`.
        let latest = Instant::now() + HANDOVER_ON_LEAVE;
        let grace = self.options.timeout.max(Duration::from_secs(2));
        let (mut deadline, mut queued) = (Instant::now() + grace, self.hints_for_live_peers());
        while queued > 0 && Instant::now() < deadline.min(latest) {
            tokio::time::sleep(Duration::from_millis(20)).await;
            let now_queued = self.hints_for_live_peers();
            if now_queued < queued {
                deadline = Instant::now() + grace;
            }
            queued = now_queued;
        }
        if queued > 0 {
            tracing::warn!(
                writes = queued,
                "leaving with writes its live peers have not acknowledged: those of collections this node stores reach them through anti-entropy when it is back; those it only forwarded are lost"
            );
        }
        // Where collections have fewer owners than members, this node's
        // copies go to the owners it leaves them to, before it goes.
        let handing_over = !self.everyone_owns_everything() && self.options.repair;
        // One deadline for the whole handover, each round included: with
        // an owner that never answers, a round waits a request timeout for
        // each collection bound for it.
        let handover_deadline = Instant::now() + HANDOVER_ON_LEAVE;
        // Owners that did not answer: not asked again before this node goes.
        let mut failed = HashSet::new();
        if handing_over {
            // One round: what is written meanwhile goes after the goodbye.
            let _ = tokio::time::timeout_at(
                handover_deadline,
                self.hand_over_all(Round::PreCopy, &mut failed),
            )
            .await;
        }
        // The copies this node keeps (collections on every member, which it
        // owns again when back) must not lack a delete it was never sent:
        // once it has left, the others purge deletes past their grace
        // without waiting for it. One anti-entropy round with a live
        // member brings them here (and sends what it alone holds).
        if self.options.repair
            && self.absence_judged.load(Ordering::Acquire)
            && !self.full_resync.load(Ordering::Acquire)
            && let Some(source) = self.sources().first()
        {
            // Against a deadline: not at the pace of repairs.
            self.moves.unpace_repairs();
            let round = self.anti_entropy_with(source.id);
            match tokio::time::timeout(LEAVE_ROUND, round).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::warn!("a last anti-entropy round before leaving: {e}"),
                Err(_) => tracing::warn!(
                    "leaving before a last anti-entropy round with {} ended",
                    source.addr
                ),
            }
        }
        self.running.store(false, Ordering::Release);
        // Not before its absence was judged: a node stopping then would
        // note a contact that hides how long it had been away.
        if !self.sources().is_empty()
            && !self.full_resync.load(Ordering::Acquire)
            && self.absence_judged.load(Ordering::Acquire)
        {
            self.touched(self.contact_now());
        }
        self.save_state(&self.saved_state());
        let outputs = {
            let mut m = self.membership.lock().unwrap();
            m.leave();
            m.drain()
        };
        let mut sends = tokio::task::JoinSet::new();
        for o in outputs {
            if let Output::Send { to, mut gossip } = o
                && let Some(peer) = self.peer(to)
            {
                let timeout = self.options.timeout;
                gossip.sent_ms = self.wall_ms();
                gossip.max_offset_ms = self.options.max_clock_ahead.as_millis() as u64;
                sends.spawn(async move { peer.gossip.gossip(gossip, timeout).await });
            }
        }
        let _ = tokio::time::timeout(Duration::from_secs(1), sends.join_all()).await;
        if handing_over {
            // What was written here before the others heard of the leave,
            // then the copies themselves: a node that comes back must not
            // bring back what was deleted while it was gone.
            // A copy no owner can take now (every owner down or syncing)
            // stays in the data directory, to be handed over when this
            // node starts again: waiting here would not change that.
            // At least a short last round, should the first ones have used
            // up the time.
            let deadline = handover_deadline.max(Instant::now() + LAST_HANDOVER);
            loop {
                let Ok(round) = tokio::time::timeout_at(
                    deadline,
                    self.hand_over_all(Round::Leave, &mut failed),
                )
                .await
                else {
                    tracing::warn!(
                        "leaving before every copy was handed over (an owner did not answer in time): what was not handed over stays in this node's data directory"
                    );
                    break;
                };
                if round.held == round.kept || Instant::now() >= deadline {
                    if round.kept > 0 {
                        tracing::warn!(
                            collections = round.kept,
                            "leaving with copies no owner could take (owners down or not answering): they stay in this node's data directory, and with the live members standing in for those owners, if any"
                        );
                    }
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        // Give the writer tasks a moment to flush the frames.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    /// Writes queued for peers that are up (healthy, or unhealthy: a late
    /// answer to a large value marks a peer unhealthy that is taking it).
    pub(super) fn hints_for_live_peers(&self) -> usize {
        let alive: HashSet<u64> = self
            .membership
            .lock()
            .unwrap()
            .members()
            .filter(|u| matches!(u.liveness, Liveness::Alive | Liveness::Suspect))
            .map(|u| u.id)
            .collect();
        self.peers
            .lock()
            .unwrap()
            .values()
            .filter(|p| alive.contains(&p.id))
            .map(|p| p.queue.lock().unwrap().len())
            .sum()
    }
}
