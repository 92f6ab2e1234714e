//! This node's clock against its peers': the verdict drawn every tick from
//! their gossip (`crate::skew`), the guard's reference time, and whether
//! client writes are refused for it (skewed; its wall clock jumped since
//! the last verdict; or, started to join a cluster, not compared yet).

use std::sync::atomic::Ordering;
use std::time::Duration;

use dhrt_proto::{ErrorKind, Liveness, OpError};

use super::Cluster;
use crate::skew;

/// How long a node that expects peers waits to measure one before it
/// accepts writes with a clock nobody checked (its peers may all be down).
pub(super) const UNVERIFIED_GRACE: Duration = Duration::from_secs(10);

impl Cluster {
    /// Re-judges this node's clock against its peers' (every member not
    /// left, the dead ones by their last word), logging when the verdict
    /// changes.
    pub(super) fn judge_clock(&self) {
        // Read before the members: a join merges its table, then says so.
        let learned = self.members_learned.load(Ordering::Acquire);
        let known: Vec<u64> = self
            .membership
            .lock()
            .unwrap()
            .members()
            .filter(|u| u.liveness != Liveness::Left)
            .map(|u| u.id)
            .collect();
        let (wall, mono) = (self.wall_ms(), self.now_ms());
        // Judged by the strictest allowed offset in the cluster.
        let (measured, max): (Vec<i64>, u64) = {
            let mut o = self.offsets.lock().unwrap();
            o.retain(|id| known.contains(&id));
            let measured = known
                .iter()
                .filter_map(|id| o.of(*id, wall, mono))
                .collect();
            (measured, o.strictest(self.max_offset_ms()))
        };
        // A log holding future stamps matters where peers would refuse
        // them; a node alone just goes on from its own clock. Measured
        // from the time peers' stamps are admitted by (the later of this
        // clock and the cluster's), not from this clock alone: a node
        // behind the cluster's middle but within the allowed offset admits
        // stamps up to that far ahead of the middle, and must not then
        // judge itself skewed for holding them (a chain of clocks at 0,
        // +40 s and +80 s would lock out the one at 0).
        let clock_ahead = if known.is_empty() {
            0
        } else {
            let reference = skew::Guard::reference(wall, skew::cluster_offset(&measured, max));
            (self.store.clock().last() >> dhrt_storage::LOGICAL_BITS).saturating_sub(reference)
        };
        // Judge by offsets only once most known peers are measured: a
        // first word from one peer is no majority.
        let enough = measured.len() * 2 > known.len();
        // Or once the peers not measured could not overturn the verdict
        // (one of two peers measured within the allowed offset, the other
        // dead since before this node started, decides it).
        let unmeasured = known.len().saturating_sub(measured.len());
        let decided = !measured.is_empty() && skew::decided(&measured, unmeasured, max);
        // Cleared to write once before (on a decided verdict): judged by
        // most peers, as ever, a dead one never measured since a restart
        // notwithstanding.
        let cleared = self.clock_measured.load(Ordering::Acquire);
        // Peers' clocks are followed only once they decide this node's
        // verdict: from the first few heard (a node just started, or that
        // just joined) the middle clock can be one most find skewed, and
        // stamps taken by it would hold every clock there.
        let judged = decided || (enough && cleared);
        let v = if judged || known.is_empty() {
            let mut fresh = skew::verdict(&measured, max, clock_ahead);
            // Before it is first cleared (just started or joined), a skew
            // drawn from the peers known so far is not held by the margin
            // once more are heard: one that joined through the one peer
            // its clock is far from must not stay refusing for good.
            fresh.provisional = fresh.skewed && !cleared && !known.is_empty();
            let current = self.verdict.lock().unwrap().clone();
            skew::settle(&current, fresh, &measured, max, clock_ahead)
        } else {
            // Too few measured to judge by offsets (a join just brought
            // members not heard from yet), or, not cleared yet, too few to
            // decide: the log's stamps still count, a clock off from a
            // peer heard is not trusted until enough are, and a verdict of
            // skew stands until the peers decide it.
            let mut fresh = skew::verdict(if enough { &measured } else { &[] }, max, clock_ahead);
            if !cleared && !fresh.skewed {
                fresh = skew::unsettled(&measured, unmeasured, max).unwrap_or(fresh);
            }
            let current = self.verdict.lock().unwrap().clone();
            // A verdict drawn from this node's own stamps ends when its
            // wall clock has passed them, peers or none (before, a node
            // restarted alone over stamps from a clock that ran ahead
            // refused writes until a peer came back).
            let stamps_passed = current.by_stamps && clock_ahead <= max - max / 20 && !fresh.skewed;
            if fresh.skewed || !current.skewed || stamps_passed {
                fresh
            } else {
                current
            }
        };
        let cluster_offset = skew::cluster_offset(&measured, max);
        self.cluster_offset.store(cluster_offset, Ordering::Release);
        let (low, high) = skew::peers_offset(&measured);
        self.peers_offset_low.store(low, Ordering::Release);
        self.peers_offset_high.store(high, Ordering::Release);
        self.strictest_offset_ms.store(max, Ordering::Release);
        // After the reference it is admitted by is published; a lead that
        // drops keeps the clock no further than this node admits now.
        let limit = skew::Guard::reference(wall, cluster_offset).saturating_add(max);
        let lead = if judged {
            skew::lead(&measured, max)
        } else {
            0
        };
        self.store.clock().set_lead(lead, limit);
        let mut current = self.verdict.lock().unwrap();
        if v.skewed != current.skewed {
            if v.skewed {
                tracing::error!("clock skew: {}", v.reason);
            } else {
                tracing::warn!(
                    offsets_ms = ?measured,
                    known = known.len(),
                    "clock skew resolved: this node's clock is within {} s of its peers'; writes are accepted again",
                    max / 1000
                );
            }
        }
        self.skewed.store(v.skewed, Ordering::Release);
        self.judged_wall_minus_mono
            .store(wall as i64 - mono as i64, Ordering::Release);
        // Cleared to write once the verdict is good whatever the peers not
        // measured yet say (a node that just joined, having heard from a
        // few, waits for the rest when they could overturn it), and only
        // once it knows who they are: a joining node may hear from the
        // member it joins through before that member's table arrives.
        if decided && !measured.is_empty() && learned {
            self.peers_compared.store(true, Ordering::Release);
            if !v.skewed {
                self.clock_measured.store(true, Ordering::Release);
            }
        }
        *current = v;
        drop(current);
        self.clock_judged.notify_waiters();
    }

    /// Waits until this node has compared its clock with most known
    /// peers' (skewed or not: the cluster's time is then known), or
    /// `UNVERIFIED_GRACE` has passed since its start.
    pub(super) async fn clock_compared(&self) {
        let deadline = self.epoch + UNVERIFIED_GRACE;
        while !self.peers_compared.load(Ordering::Acquire) && tokio::time::Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn max_offset_ms(&self) -> u64 {
        self.options.max_clock_ahead.as_millis() as u64
    }

    /// The wall time stamps from peers are admitted by: the later of this
    /// node's clock and the cluster's.
    pub(super) fn admission_wall(&self) -> u64 {
        skew::Guard::reference(self.wall_ms(), self.cluster_offset.load(Ordering::Acquire))
    }

    /// Whether this node may take a client write now: an error when its
    /// clock is off from its peers' or jumped since it last compared them.
    /// A node started to join a cluster first waits (a moment, at most
    /// `UNVERIFIED_GRACE` from its start) until it has compared its clock
    /// with a peer's, so that no write is stamped by a clock nobody checked.
    pub(crate) async fn clear_to_write(&self) -> Result<(), OpError> {
        loop {
            let judged = self.clock_judged.notified();
            tokio::pin!(judged);
            judged.as_mut().enable();
            if let Some(e) = self.write_refusal() {
                return Err(e);
            }
            // Started to join a cluster, or joined one since (`dhrt-cli
            // join`, a node joining this one): unchecked until compared.
            let expects_peers = (!self.options.seeds.is_empty()
                && !self.seeds_are_itself.load(Ordering::Acquire))
                || self.has_peers();
            if !expects_peers || self.clock_measured.load(Ordering::Acquire) {
                return Ok(());
            }
            // At most UNVERIFIED_GRACE from the start, or from the moment
            // it last got peers.
            let since = Duration::from_millis(self.peers_since_ms.load(Ordering::Acquire));
            let from_peers = self.epoch.elapsed().saturating_sub(since);
            let Some(left) = UNVERIFIED_GRACE
                .checked_sub(self.epoch.elapsed())
                .max(UNVERIFIED_GRACE.checked_sub(from_peers))
            else {
                if !self.unchecked_said.swap(true, Ordering::AcqRel) {
                    tracing::warn!(
                        "too few peers answered within {} s of starting to check this node's clock (none, or fewer than could decide it): taking writes with its clock unchecked",
                        UNVERIFIED_GRACE.as_secs()
                    );
                }
                return Ok(());
            };
            let _ = tokio::time::timeout(left, judged).await;
        }
    }

    /// Why client writes are refused on this node now, if they are: its
    /// clock is off from its peers', or jumped since it last compared them.
    fn write_refusal(&self) -> Option<OpError> {
        let refuse = |reason: String| Some(OpError::new(ErrorKind::Unavailable, reason));
        if self.skewed.load(Ordering::Acquire) {
            return refuse(self.verdict.lock().unwrap().reason.clone());
        }
        let drift = self.wall_ms() as i64
            - self.now_ms() as i64
            - self.judged_wall_minus_mono.load(Ordering::Acquire);
        if drift.unsigned_abs() > self.strictest_offset_ms.load(Ordering::Acquire) / 2 {
            return refuse(format!(
                "this node's wall clock jumped {} s since it last compared it with its peers': writes wait for the next comparison",
                drift / 1000
            ));
        }
        None
    }

    /// This node's clock against its peers', for stats.
    pub fn clock_info(&self) -> dhrt_proto::ClockInfo {
        let v = self.verdict.lock().unwrap().clone();
        dhrt_proto::ClockInfo {
            skewed: v.skewed,
            ahead_ms: v.ahead_ms,
            max_offset_ms: self.strictest_offset_ms.load(Ordering::Acquire),
            reason: v.reason,
        }
    }
}
