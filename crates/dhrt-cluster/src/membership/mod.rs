//! Membership and failure detection as a sans-I/O state machine (SWIM with
//! suspicion, indirect probes, piggybacked gossip and a periodic push-pull
//! sync). It takes messages, timer ticks, the current time and a seeded
//! random generator, and returns what to send and which members changed; a
//! thin tokio task (the driver, `cluster/driver.rs`) does the I/O. So a seeded test can run many
//! nodes through partitions and crashes in milliseconds.
//!
//! Rules (DESIGN §5 "Health"):
//! - News about a member carries its incarnation; a higher incarnation
//!   overrides a lower one, and at equal incarnation `Alive < Suspect < Dead
//!   < Left`, so old news never overrides new.
//! - Only a member itself raises its incarnation: to refute suspicion, or to
//!   announce a change (syncing, collections). A member that hears it was
//!   declared dead refutes *as syncing*: it is a healthy replica again only
//!   after it has re-synced and says so ([`Membership::set_syncing`]).
//! - So news from a third party cannot raise a member's incarnation with
//!   bad news: `Suspect` and `Dead` are taken only at an incarnation the
//!   member itself has announced (or for a member not known yet), and
//!   `Left` only from the member itself, or, for a member known dead, from
//!   an operator's removal ([`Membership::remove`]). What a member says of itself on
//!   a message it sends (each one carries its own entry) is its word: it
//!   replaces anything claimed of it at a higher incarnation. Refutations
//!   add one to the member's own incarnation and saturate, so no message,
//!   however forged, makes a live member permanently dead or left: the
//!   next message it sends puts it right.
//! - An address belongs to one member. A member announcing itself at the
//!   address of another that is dead or left (or, in its own word, of any
//!   other) replaces it: the old one is forgotten, and no longer counts as
//!   a replica. News of an unknown member at a live member's address is
//!   stale and ignored, and so is news of another member at this node's
//!   own address (an earlier life of it).
//! - A missed probe (direct, then through other members) or a failed request
//!   makes a member suspect (`unhealthy`); suspicion that is not refuted
//!   within the suspicion timeout makes it dead. Any word from the probed
//!   member meanwhile answers its probe, and a node whose own ticks run
//!   late gives the probe up to two more periods (`probe.rs`, `tick`).
//! - A node declares a member it knows dead only on its own timeout: another
//!   node's "dead" is taken as "suspect" (as memberlist does with a dead
//!   entry in a push-pull sync). A node cut off from the rest declares them
//!   all dead; when it comes back, its verdicts make the others suspect,
//!   and the members they name refute, instead of being declared dead
//!   where they never stopped answering.
//! - Dead members are still probed now and then, and the push-pull sync
//!   includes them, so the two sides of a healed partition find each other.

use std::collections::BTreeMap;

use dhrt_proto::{Gossip, GossipKind, Liveness, MemberState, MemberUpdate};
use rand::{SeedableRng, rngs::SmallRng};

mod probe;
mod remembered;

pub(crate) use remembered::remembered_only;

/// Timing and fan-out of the protocol.
#[derive(Debug, Clone)]
pub struct MembershipConfig {
    /// One probe per period; ticks come this often.
    pub period_ms: u64,
    /// How long a suspect member has to refute before it is declared dead.
    pub suspicion_ms: u64,
    /// Members asked to probe indirectly when a direct probe goes unanswered.
    pub indirect_probes: usize,
    /// A push-pull sync of the whole member table every this many ticks.
    pub sync_every: u64,
    /// A dead member is probed every this many ticks.
    pub dead_probe_every: u64,
    /// Each piece of news is piggybacked about `retransmit * log2(n)` times.
    pub retransmit: u32,
    /// Most news items on one message.
    pub max_piggyback: usize,
    /// A member that has left (or was removed) is forgotten this long
    /// after this node heard so: a cluster whose members come and go at new
    /// addresses does not carry every one of them in its syncs for ever.
    pub forget_left_ms: u64,
}

impl Default for MembershipConfig {
    fn default() -> Self {
        MembershipConfig {
            period_ms: 250,
            suspicion_ms: 3000,
            indirect_probes: 3,
            sync_every: 8,
            dead_probe_every: 4,
            retransmit: 4,
            max_piggyback: 8,
            forget_left_ms: 24 * 3600 * 1000,
        }
    }
}

/// What the state machine asks its driver to do or know.
#[derive(Debug, Clone, PartialEq)]
pub enum Output {
    /// Send this message to member `to`.
    Send {
        /// The receiver's node id.
        to: u64,
        /// The message.
        gossip: Gossip,
    },
    /// What is known of a member changed (a new member, a liveness, syncing
    /// or placement change).
    Changed {
        /// The member as now known.
        member: MemberUpdate,
        /// Its liveness before, if it was known.
        before: Option<Liveness>,
    },
    /// This node was declared dead while it was away: it must re-sync
    /// before it reports itself healthy again.
    MustResync,
    /// A member was replaced by another at its address (a node restarted
    /// with a new identity): it is gone for good.
    Forgotten {
        /// The forgotten member's id.
        id: u64,
    },
    /// Member `id` announces itself at two addresses in turn: two
    /// processes share its node id (a copied data directory).
    SharedId {
        /// The member's id.
        id: u64,
        /// Its two addresses.
        addrs: [String; 2],
    },
    /// A direct probe of `member` went unanswered: whatever carries
    /// messages to it is suspect too (a TCP connection that lost segments
    /// in a partition waits out its retransmission backoff long after the
    /// network heals), and the next message takes a fresh one.
    Unanswered {
        /// The probed member's id.
        member: u64,
    },
    /// A member that left was forgotten, `forget_left_ms` after it left.
    /// Only its own word brings it back: news from others that it left is
    /// not taken of a member unknown here.
    LeftForgotten {
        /// The forgotten member's id.
        id: u64,
    },
}

/// The state a member shows in stats.
pub fn member_state(m: &MemberUpdate) -> MemberState {
    match m.liveness {
        Liveness::Alive if m.syncing => MemberState::Syncing,
        Liveness::Alive => MemberState::Healthy,
        Liveness::Suspect => MemberState::Unhealthy,
        Liveness::Dead => MemberState::Dead,
        Liveness::Left => MemberState::Left,
    }
}

#[derive(Debug, Clone)]
struct Known {
    update: MemberUpdate,
    /// When its liveness last changed here (ms on the driver's clock).
    since_ms: u64,
    /// When its address last changed here, in its own word (ms), and when
    /// that last made it `Output::SharedId`.
    moved_ms: Option<u64>,
    flagged_ms: Option<u64>,
}

#[derive(Debug, Clone)]
struct Probe {
    target: u64,
    seq: u64,
    indirect_sent: bool,
    acked: bool,
    /// Ticks this probe was given beyond its two because this node itself
    /// ran late (see [`Membership::tick`]).
    grace: u32,
}

#[derive(Debug, Clone)]
struct News {
    update: MemberUpdate,
    sent: u32,
}

/// One node's view of the cluster.
#[derive(Debug)]
pub struct Membership {
    me: MemberUpdate,
    members: BTreeMap<u64, Known>,
    news: Vec<News>,
    probe: Option<Probe>,
    seq: u64,
    order: Vec<u64>,
    ticks: u64,
    /// When the last tick ran (ms on the driver's clock).
    last_tick_ms: Option<u64>,
    /// Members replaced by another at their address (a node restarted
    /// with a new identity), as left at incarnation 0, newest last: kept
    /// in `cluster.state` and sent with table exchanges, so that a node
    /// that missed the replacement and remembers the old one (as dead at
    /// incarnation 0) takes it as left and the new one in its place.
    replaced: Vec<MemberUpdate>,
    config: MembershipConfig,
    rng: SmallRng,
    out: Vec<Output>,
}

/// The most members (left ones included, until forgotten) a node keeps in
/// its table: with the default 1,024 peer slots it serves clusters of up to
/// about 500 (docs/operations.md).
pub(crate) const MAX_MEMBERS: usize = 1024;

/// Incarnations start at the wall clock in ms (about 2^41) and grow by one
/// per refutation: a claim above this is a lie, never adopted.
const PLAUSIBLE_INCARNATION: u64 = 1 << 60;

fn rank(u: &MemberUpdate) -> (u64, Liveness) {
    (u.incarnation, u.liveness)
}

impl Membership {
    /// A node that knows only itself. `me.incarnation` should exceed any
    /// incarnation of this node's earlier lives (the driver derives it from
    /// the wall clock); `seed` drives every random choice.
    pub fn new(me: MemberUpdate, config: MembershipConfig, seed: u64) -> Self {
        Membership {
            me,
            members: BTreeMap::new(),
            news: Vec::new(),
            probe: None,
            seq: 0,
            order: Vec::new(),
            ticks: 0,
            last_tick_ms: None,
            replaced: Vec::new(),
            config,
            rng: SmallRng::seed_from_u64(seed),
            out: Vec::new(),
        }
    }

    /// This node as it announces itself.
    pub fn me(&self) -> &MemberUpdate {
        &self.me
    }

    /// Every other member known, in id order.
    pub fn members(&self) -> impl Iterator<Item = &MemberUpdate> {
        self.members.values().map(|k| &k.update)
    }

    /// A member by id (this node included).
    pub fn get(&self, id: u64) -> Option<&MemberUpdate> {
        if id == self.me.id {
            return Some(&self.me);
        }
        self.members.get(&id).map(|k| &k.update)
    }

    /// This node and every member it knows: what a joining node is given.
    pub fn table(&self) -> Vec<MemberUpdate> {
        std::iter::once(self.me.clone())
            .chain(self.members().cloned())
            .collect()
    }

    /// Takes what the driver must do.
    pub fn drain(&mut self) -> Vec<Output> {
        std::mem::take(&mut self.out)
    }

    /// Merges news heard from a third party (a join reply, a member
    /// table): every update is what someone says of someone else.
    pub fn merge(&mut self, now_ms: u64, updates: impl IntoIterator<Item = MemberUpdate>) {
        for u in updates {
            self.merge_hearsay(now_ms, u);
        }
    }

    /// Merges what member `from` says of itself: its word on its own
    /// incarnation (a joining node's request, its entry on a message).
    pub fn merge_own_word(&mut self, now_ms: u64, u: MemberUpdate) {
        self.merge_one(now_ms, u, true);
    }

    /// Whether `u` is news: ranked above what is known (with the rules on
    /// who may say what, see the module doc).
    fn is_news(&self, u: &MemberUpdate, own_word: bool) -> bool {
        if u.addr == self.me.addr {
            // This node is the process at its address: another member
            // there is an earlier life of it (or a misconfiguration).
            return false;
        }
        let Some(known) = self.members.get(&u.id).map(|k| &k.update) else {
            // Replaced at its address by another: only its own word brings
            // it back (another node's stale memory of it does not).
            if !own_word && self.replaced.iter().any(|r| r.id == u.id) {
                return false;
            }
            let addr_taken = self.members.values().any(|k| {
                k.update.addr == u.addr
                    && matches!(k.update.liveness, Liveness::Alive | Liveness::Suspect)
            });
            if addr_taken && !own_word {
                return false;
            }
            // Remembered from an earlier life by another node: it does
            // not replace another member known at its address (whichever
            // of two stale files is newer cannot be told), only a word of
            // this life does.
            if remembered_only(u)
                && !own_word
                && self
                    .members
                    .values()
                    .any(|k| k.update.addr == u.addr && k.update.liveness != Liveness::Left)
            {
                return false;
            }
            // A table this size is no cluster this node can serve (each
            // member holds two peer connections, a queue, hints): what
            // would take it past is a peer's lie or a mistake, not news.
            // (One that takes the place of a member at its address is.)
            if self.members.len() >= MAX_MEMBERS
                && !self.members.values().any(|k| k.update.addr == u.addr)
            {
                static FULL: crate::LogThrottle =
                    crate::LogThrottle::new(std::time::Duration::from_secs(10));
                if let Some(left_out) = FULL.allow() {
                    tracing::warn!(
                        addr = %u.addr,
                        left_out,
                        "{MAX_MEMBERS} members known already: a new one is not taken"
                    );
                }
                return false;
            }
            // A member not known yet: learn it, unless a third party says
            // it left (only the member itself announces that).
            return own_word || u.liveness != Liveness::Left;
        };
        if own_word {
            // Its word beats anything claimed of it at a higher
            // incarnation; at the same incarnation suspicion stands until
            // it refutes.
            return rank(u) > rank(known)
                || (u.incarnation < known.incarnation
                    && (u.liveness, &u.addr, u.syncing)
                        != (known.liveness, &known.addr, known.syncing));
        }
        match u.liveness {
            // A third party says a member left only when an operator
            // removed it, which is done only to a dead member: taken over
            // dead, never over alive or suspect (and refuted like any
            // claim if the member is alive after all).
            Liveness::Left => {
                known.liveness == Liveness::Dead && u.incarnation >= known.incarnation
            }
            Liveness::Suspect | Liveness::Dead if u.incarnation > known.incarnation => false,
            _ => rank(u) > rank(known),
        }
    }

    /// Merges what another node says of a member (not this node's own
    /// verdict). Its "dead" of a member known here is only suspicion: this
    /// node declares a member it knows dead on its own timeout, which the
    /// member can refute. A node cut off from the rest declares them all
    /// dead, and taking its word when it returns would kill members that
    /// never stopped answering here.
    fn merge_hearsay(&mut self, now_ms: u64, mut u: MemberUpdate) {
        if u.liveness == Liveness::Dead && self.members.contains_key(&u.id) {
            u.liveness = Liveness::Suspect;
        }
        self.merge_one(now_ms, u, false);
    }

    fn merge_one(&mut self, now_ms: u64, u: MemberUpdate, own_word: bool) {
        if let Err(why) = u.check() {
            // Debug, not warn: the sender repeats it with every message.
            tracing::debug!(id = %format_args!("{:016x}", u.id), "member record refused: {why}");
            return;
        }
        if u.id == self.me.id {
            self.about_me(u);
            return;
        }
        if !self.is_news(&u, own_word) {
            return;
        }
        let before = self.members.get(&u.id).map(|k| k.update.clone());
        if u.liveness != Liveness::Left {
            self.forget_others_at(&u, own_word);
        }
        let liveness_changed = before.as_ref().is_none_or(|b| b.liveness != u.liveness);
        let visible = before.as_ref().is_none_or(|b| {
            b.liveness != u.liveness
                || b.syncing != u.syncing
                || b.addr != u.addr
                || b.collections != u.collections
        });
        let since_ms = match (&before, liveness_changed) {
            (Some(_), false) => self.members[&u.id].since_ms,
            _ => now_ms,
        };
        let (mut moved_ms, mut flagged_ms) = self
            .members
            .get(&u.id)
            .map_or((None, None), |k| (k.moved_ms, k.flagged_ms));
        if let Some(b) = &before
            && b.addr != u.addr
        {
            // Back and forth within a minute: two processes speak as one
            // member, each at its own address. Said once a minute.
            let recent = |at: Option<u64>| at.is_some_and(|at| now_ms.saturating_sub(at) < 60_000);
            if recent(moved_ms) && !recent(flagged_ms) {
                self.out.push(Output::SharedId {
                    id: u.id,
                    addrs: [b.addr.clone(), u.addr.clone()],
                });
                flagged_ms = Some(now_ms);
            }
            moved_ms = Some(now_ms);
        }
        self.members.insert(
            u.id,
            Known {
                update: u.clone(),
                since_ms,
                moved_ms,
                flagged_ms,
            },
        );
        self.spread(u.clone());
        if visible {
            self.out.push(Output::Changed {
                member: u,
                before: before.map(|b| b.liveness),
            });
        }
    }

    /// Forgets members other than `u` at `u`'s address: dead or left ones,
    /// or any when `u` says so itself (one address, one process).
    fn forget_others_at(&mut self, u: &MemberUpdate, own_word: bool) {
        let replaced: Vec<u64> = self
            .members
            .values()
            .filter(|k| {
                k.update.id != u.id
                    && k.update.addr == u.addr
                    && (own_word || matches!(k.update.liveness, Liveness::Dead | Liveness::Left))
            })
            .map(|k| k.update.id)
            .collect();
        for id in replaced {
            if let Some(old) = self.members.get(&id).map(|k| k.update.clone()) {
                self.note_replaced(&old);
            }
            self.forget(id);
            self.out.push(Output::Forgotten { id });
        }
    }

    fn forget(&mut self, id: u64) {
        self.members.remove(&id);
        self.news.retain(|n| n.update.id != id);
        self.order.retain(|o| *o != id);
        if self.probe.as_ref().is_some_and(|p| p.target == id) {
            self.probe = None;
        }
    }

    /// Forgets the members that left `forget_left_ms` ago or more.
    pub(super) fn forget_left(&mut self, now_ms: u64) {
        let gone: Vec<u64> = self
            .members
            .values()
            .filter(|k| {
                k.update.liveness == Liveness::Left
                    && now_ms.saturating_sub(k.since_ms) >= self.config.forget_left_ms
            })
            .map(|k| k.update.id)
            .collect();
        for id in gone {
            self.forget(id);
            self.out.push(Output::LeftForgotten { id });
        }
    }

    /// News about this node: refute anything but "alive" that is not older
    /// than what it says of itself.
    fn about_me(&mut self, u: MemberUpdate) {
        if u.liveness == Liveness::Alive && u.incarnation <= self.me.incarnation {
            return;
        }
        if u.liveness != Liveness::Alive && u.incarnation < self.me.incarnation {
            return;
        }
        if self.me.liveness == Liveness::Left {
            return; // leaving: nothing to refute
        }
        // Above the claim when it is plausible (a restart with a clock set
        // back leaves the old life's incarnation above the new one), else
        // one above its own: its own word beats a claim it never made.
        // Never wraps.
        self.me.incarnation = if u.incarnation < PLAUSIBLE_INCARNATION {
            self.me.incarnation.max(u.incarnation).saturating_add(1)
        } else {
            self.me.incarnation.saturating_add(1)
        };
        if matches!(u.liveness, Liveness::Dead | Liveness::Left) && !self.me.syncing {
            self.me.syncing = true;
            self.out.push(Output::MustResync);
        }
        self.spread(self.me.clone());
    }

    fn spread(&mut self, update: MemberUpdate) {
        self.news.retain(|n| n.update.id != update.id);
        self.news.push(News { update, sent: 0 });
    }

    /// Announces a change of this node's syncing flag (a new incarnation).
    pub fn set_syncing(&mut self, syncing: bool) {
        if self.me.syncing != syncing {
            self.me.syncing = syncing;
            self.me.incarnation = self.me.incarnation.saturating_add(1);
            self.spread(self.me.clone());
        }
    }

    /// Leaves: this node is `Left` from now on and tells every member.
    pub fn leave(&mut self) {
        self.me.liveness = Liveness::Left;
        self.me.incarnation = self.me.incarnation.saturating_add(1);
        let targets: Vec<u64> = self.reachable(true);
        for to in targets {
            let gossip = Gossip {
                from: self.me.id,
                sent_ms: 0,
                max_offset_ms: 0,
                kind: GossipKind::Sync { reply: false },
                updates: vec![self.me.clone()],
            };
            self.out.push(Output::Send { to, gossip });
        }
    }

    /// An operator's word that dead member `id` will not come back: it is
    /// `Left` from now on, owns nothing, and the news spreads (a member
    /// that knows it as dead takes it). Refused for a member that is not
    /// dead here. One that was alive after all puts it right with its
    /// next message (its own word, at a higher incarnation) and re-syncs.
    pub fn remove(&mut self, now_ms: u64, id: u64) -> Result<MemberUpdate, String> {
        let Some(k) = self.members.get(&id) else {
            return Err(format!("no member {id:016x} is known here"));
        };
        if k.update.liveness != Liveness::Dead {
            return Err(format!(
                "member {id:016x} ({}) is {} here, not dead: only a dead member can be removed (a live one leaves with SIGTERM)",
                k.update.addr,
                member_state(&k.update).as_str()
            ));
        }
        let mut u = k.update.clone();
        u.liveness = Liveness::Left;
        self.merge_one(now_ms, u.clone(), false);
        Ok(u)
    }

    /// Evidence from a failed or timed-out request: `id` becomes suspect.
    pub fn suspect(&mut self, now_ms: u64, id: u64) {
        if let Some(k) = self.members.get(&id)
            && k.update.liveness == Liveness::Alive
        {
            let mut u = k.update.clone();
            u.liveness = Liveness::Suspect;
            self.merge_one(now_ms, u, false);
        }
    }

    /// Evidence of life from a successful request: it answers the probe
    /// of `id` under way, if any. A suspect member is sent a probe at once,
    /// carrying the suspicion, so that it refutes it.
    pub fn heard_from(&mut self, id: u64) {
        self.alive_evidence(id);
        if self
            .members
            .get(&id)
            .is_some_and(|k| k.update.liveness == Liveness::Suspect)
        {
            self.seq += 1;
            let seq = self.seq;
            self.send(id, GossipKind::Ping { seq, relay: None });
        }
    }
}
