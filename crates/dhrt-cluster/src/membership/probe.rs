//! The protocol's exchanges: answering messages, the periodic tick (probe,
//! indirect probe, suspicion timeout, push-pull sync), and what each
//! message carries (piggybacked news, the sender's own word).

use dhrt_proto::{Gossip, GossipKind, Liveness, MemberUpdate};
use rand::RngExt;
use rand::seq::{IndexedRandom, SliceRandom};

use super::{Membership, Output, Probe};

/// The most periods a probe is given beyond its two because this node ran
/// late.
const MAX_PROBE_GRACE: u32 = 2;

impl Membership {
    /// Members this node exchanges messages with: alive and suspect ones,
    /// plus dead ones when `with_dead`.
    pub(super) fn reachable(&self, with_dead: bool) -> Vec<u64> {
        self.members
            .values()
            .filter(|k| match k.update.liveness {
                Liveness::Alive | Liveness::Suspect => true,
                Liveness::Dead => with_dead,
                Liveness::Left => false,
            })
            .map(|k| k.update.id)
            .collect()
    }

    pub(super) fn send(&mut self, to: u64, kind: GossipKind) {
        let mut updates = self.piggyback();
        // A member must hear what is said about it to refute it, even when
        // that news has long stopped spreading.
        if let Some(k) = self.members.get(&to)
            && k.update.liveness != Liveness::Alive
            && !updates.iter().any(|u| u.id == to)
        {
            updates.push(k.update.clone());
        }
        // Every message carries the sender's word on itself.
        if !updates.iter().any(|u| u.id == self.me.id) {
            updates.push(self.me.clone());
        }
        let gossip = Gossip {
            from: self.me.id,
            sent_ms: 0,
            max_offset_ms: 0,
            kind,
            updates,
        };
        self.out.push(Output::Send { to, gossip });
    }

    pub(super) fn piggyback(&mut self) -> Vec<MemberUpdate> {
        let n = self.members.len() as u32 + 1;
        let limit = self.config.retransmit * (32 - n.leading_zeros()).max(1);
        self.news.sort_by_key(|n| n.sent);
        let mut out = Vec::new();
        for n in self.news.iter_mut().take(self.config.max_piggyback) {
            n.sent += 1;
            out.push(n.update.clone());
        }
        self.news.retain(|n| n.sent < limit);
        out
    }

    /// Handles a message from another member.
    pub fn handle(&mut self, now_ms: u64, gossip: Gossip) {
        let Gossip {
            from,
            kind,
            updates,
            ..
        } = gossip;
        self.alive_evidence(from);
        for u in updates {
            if u.id == from {
                self.merge_own_word(now_ms, u);
            } else {
                self.merge_hearsay(now_ms, u);
            }
        }
        match kind {
            GossipKind::Ping { seq, relay } => {
                let to = from;
                self.send(
                    to,
                    GossipKind::Ack {
                        seq,
                        about: self.me.id,
                        relay,
                    },
                );
            }
            GossipKind::Ack {
                seq,
                about,
                relay: Some(origin),
            } => {
                self.send(
                    origin,
                    GossipKind::Ack {
                        seq,
                        about,
                        relay: None,
                    },
                );
            }
            GossipKind::Ack {
                seq,
                about,
                relay: None,
            } => {
                if let Some(p) = &mut self.probe
                    && p.seq == seq
                    && p.target == about
                {
                    p.acked = true;
                }
            }
            GossipKind::PingReq { seq, target } => {
                if self.members.contains_key(&target) {
                    self.send(
                        target,
                        GossipKind::Ping {
                            seq,
                            relay: Some(from),
                        },
                    );
                }
            }
            GossipKind::Sync { reply } => {
                if reply {
                    let gossip = Gossip {
                        from: self.me.id,
                        sent_ms: 0,
                        max_offset_ms: 0,
                        kind: GossipKind::Sync { reply: false },
                        updates: self.sync_table(),
                    };
                    self.out.push(Output::Send { to: from, gossip });
                }
            }
        }
    }

    /// Any message from `from`, or an answered request to it, shows it
    /// alive now: the probe of it under way needs no other answer (a member
    /// busy with a burst of large values may answer a ping late, its
    /// replication acknowledgements and its own pings on time).
    pub(super) fn alive_evidence(&mut self, from: u64) {
        if let Some(p) = &mut self.probe
            && p.target == from
        {
            p.acked = true;
        }
    }

    /// Advances the protocol by one period.
    ///
    /// A tick that comes over half a period late says this node itself was
    /// starved (its process paused, or its threads got no CPU): the answer
    /// to its probe may be waiting unread in a socket. The probe under way
    /// is then given one more period rather than judged, at most twice
    /// (Lifeguard's local-health awareness, in its simplest form): an
    /// overloaded node does not mark healthy peers unhealthy, and still
    /// suspects a dead one within a few periods.
    pub fn tick(&mut self, now_ms: u64) {
        self.ticks += 1;
        let late = self
            .last_tick_ms
            .is_some_and(|t| now_ms.saturating_sub(t) > self.config.period_ms * 3 / 2);
        self.last_tick_ms = Some(now_ms);
        if self.me.liveness == Liveness::Left {
            return;
        }
        if late
            && let Some(p) = &mut self.probe
            && !p.acked
            && p.grace < MAX_PROBE_GRACE
        {
            p.grace += 1;
        } else {
            self.finish_probe(now_ms);
        }
        self.expire_suspicions(now_ms);
        self.forget_left(now_ms);
        if self.probe.is_none() {
            self.start_probe();
        }
        if self.ticks.is_multiple_of(self.config.sync_every) {
            let candidates = self.reachable(true);
            if let Some(&to) = candidates.choose(&mut self.rng) {
                let gossip = Gossip {
                    from: self.me.id,
                    sent_ms: 0,
                    max_offset_ms: 0,
                    kind: GossipKind::Sync { reply: true },
                    updates: self.sync_table(),
                };
                self.out.push(Output::Send { to, gossip });
            }
        }
    }

    pub(super) fn finish_probe(&mut self, now_ms: u64) {
        let Some(p) = self.probe.clone() else {
            return;
        };
        if p.acked {
            self.probe = None;
            return;
        }
        if !p.indirect_sent {
            self.out.push(Output::Unanswered { member: p.target });
        }
        let target_liveness = self.members.get(&p.target).map(|k| k.update.liveness);
        if !matches!(
            target_liveness,
            Some(Liveness::Alive) | Some(Liveness::Suspect)
        ) {
            // Dead, left or forgotten meanwhile: no verdict needed.
            self.probe = None;
            return;
        }
        if !p.indirect_sent {
            let mut helpers: Vec<u64> = self
                .members
                .values()
                .filter(|k| k.update.liveness == Liveness::Alive && k.update.id != p.target)
                .map(|k| k.update.id)
                .collect();
            helpers.shuffle(&mut self.rng);
            helpers.truncate(self.config.indirect_probes);
            for h in helpers {
                self.send(
                    h,
                    GossipKind::PingReq {
                        seq: p.seq,
                        target: p.target,
                    },
                );
            }
            if let Some(p) = &mut self.probe {
                p.indirect_sent = true;
            }
            return;
        }
        self.probe = None;
        self.suspect(now_ms, p.target);
    }

    pub(super) fn expire_suspicions(&mut self, now_ms: u64) {
        let expired: Vec<MemberUpdate> = self
            .members
            .values()
            .filter(|k| {
                k.update.liveness == Liveness::Suspect
                    && now_ms >= k.since_ms + self.config.suspicion_ms
            })
            .map(|k| MemberUpdate {
                liveness: Liveness::Dead,
                ..k.update.clone()
            })
            .collect();
        for u in expired {
            self.merge_one(now_ms, u, false);
        }
    }

    pub(super) fn start_probe(&mut self) {
        let target = if self.ticks.is_multiple_of(self.config.dead_probe_every) {
            let dead: Vec<u64> = self
                .members
                .values()
                .filter(|k| k.update.liveness == Liveness::Dead)
                .map(|k| k.update.id)
                .collect();
            dead.choose(&mut self.rng).copied()
        } else {
            None
        };
        let target = match target {
            Some(t) => {
                // A dead member is pinged for news only: no verdict.
                self.seq += 1;
                let seq = self.seq;
                self.send(t, GossipKind::Ping { seq, relay: None });
                return;
            }
            None => self.next_target(),
        };
        if let Some(target) = target {
            self.seq += 1;
            let seq = self.seq;
            self.probe = Some(Probe {
                target,
                seq,
                indirect_sent: false,
                acked: false,
                grace: 0,
            });
            self.send(target, GossipKind::Ping { seq, relay: None });
        }
    }

    /// Round-robin over a shuffled list of live members, reshuffled each
    /// round (SWIM's bounded time to first detection).
    pub(super) fn next_target(&mut self) -> Option<u64> {
        loop {
            if self.order.is_empty() {
                self.order = self.reachable(false);
                if self.order.is_empty() {
                    return None;
                }
                self.order.shuffle(&mut self.rng);
            }
            let id = self.order.pop()?;
            if self
                .members
                .get(&id)
                .is_some_and(|k| matches!(k.update.liveness, Liveness::Alive | Liveness::Suspect))
            {
                return Some(id);
            }
        }
    }

    /// A random number for the driver's own choices (e.g. which peer to
    /// compare digests with), from the same seeded source.
    pub fn random_index(&mut self, len: usize) -> usize {
        self.rng.random_range(0..len.max(1))
    }
}
