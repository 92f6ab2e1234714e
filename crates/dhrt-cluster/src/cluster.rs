//! The cluster: the tokio layer around the membership state machine, one
//! replication queue per peer (batched, bounded hints while it is away),
//! write concerns, fan-out reads, anti-entropy over digests, join handoff and
//! re-sync, and leave. The node facade (`node.rs`) calls into it; the peer
//! server (`peer_server.rs`) feeds it what peers send.

use std::collections::{HashMap, HashSet, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use bytes::Bytes;
use dhrt_proto::{
    BucketCursor, CollectionDigest, ErrorKind, Gossip, Liveness, MemberInfo, MemberUpdate,
    Mutation, OpError, PeerOp, PeerReply, Stamp, SyncInfo, Versioned,
};
use dhrt_storage::{DIGEST_BUCKETS, Digest, Replicated, Store, SyncMode, Version};
use tokio::sync::Notify;

use crate::link::{Connector, Dialer, Link, LinkError, TcpConnector};
use crate::membership::{Membership, MembershipConfig, Output, member_state};
use crate::placement::{self, WriteAck, hosts};
use crate::skew::{self, Guard, Offsets, Verdict};
use crate::state::{self, SavedState};

/// Cluster settings.
#[derive(Debug, Clone)]
pub struct ClusterOptions {
    /// The write concern.
    pub write_ack: WriteAck,
    /// Per-peer request timeout.
    pub timeout: Duration,
    /// The shared secret peers must prove they know (`None`: empty secret).
    pub secret: Option<String>,
    /// The collections this node hosts, or `None` for all.
    pub collections: Option<Vec<String>>,
    /// Members to join through.
    pub seeds: Vec<String>,
    /// Membership protocol timing.
    pub membership: MembershipConfig,
    /// How often digests are compared with a random peer.
    pub anti_entropy_every: Duration,
    /// Writes kept per peer while it is away; beyond this, anti-entropy
    /// repairs it when it returns.
    pub max_hints: usize,
    /// The largest offset allowed between two nodes' clocks: a stamp from a
    /// peer further than this ahead of this node's clock is refused, and a
    /// node whose clock is further than this from its peers' refuses
    /// client writes.
    pub max_clock_ahead: Duration,
    /// Largest frame on peer connections.
    pub max_frame: u32,
    /// How peers are dialed (TCP unless a test simulates the network).
    pub connector: Arc<dyn Connector>,
    /// Seeds the membership protocol's randomness (probe order, gossip
    /// targets); `None` picks one from the node id and the clock.
    pub rng_seed: Option<u64>,
    /// Where to remember the members and when the cluster was last in
    /// touch (`cluster.state` in the data directory); `None` in memory.
    pub state_file: Option<PathBuf>,
}

impl Default for ClusterOptions {
    fn default() -> Self {
        ClusterOptions {
            write_ack: WriteAck::All,
            timeout: Duration::from_millis(500),
            secret: None,
            collections: None,
            seeds: Vec::new(),
            membership: MembershipConfig::default(),
            anti_entropy_every: Duration::from_secs(2),
            max_hints: 1_000_000,
            max_clock_ahead: Duration::from_secs(60),
            max_frame: dhrt_proto::DEFAULT_MAX_FRAME,
            connector: Arc::new(TcpConnector),
            rng_seed: None,
            state_file: None,
        }
    }
}

/// Mutations per `Apply` frame, and their bytes: a batch is cut before a
/// mutation would take it past `BATCH_BYTES`; a larger mutation travels
/// alone (the frame limit leaves room for the largest value).
pub(crate) const BATCH_ITEMS: usize = 4096;
pub(crate) const BATCH_BYTES: usize = 4 << 20;
/// Handoff chunks in flight at once.
const HANDOFF_WINDOW: usize = 4;
/// Buckets asked for per anti-entropy request.
const BUCKETS_PER_REQUEST: usize = 32;

/// What applying replicated mutations did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Applied {
    /// How many took effect.
    pub(crate) applied: u64,
    /// Indexes of those refused by the clock guard, ascending.
    pub(crate) refused: Vec<u32>,
}

impl From<Applied> for PeerReply {
    fn from(a: Applied) -> Self {
        PeerReply::Applied {
            applied: a.applied,
            refused: a.refused,
        }
    }
}

/// The outcome of a spawned handoff chunk.
fn joined(r: Option<Result<Result<u64, OpError>, tokio::task::JoinError>>) -> Result<u64, OpError> {
    match r {
        Some(Ok(r)) => r,
        Some(Err(e)) => Err(OpError::new(ErrorKind::Internal, e.to_string())),
        None => Ok(0),
    }
}

/// The buckets two digests should exchange: those that differ, or all of
/// them when the peer's digest has another shape.
fn buckets_to_exchange(local: &Digest, remote: &Digest) -> Vec<usize> {
    if remote.buckets.len() == DIGEST_BUCKETS {
        local.differing(remote)
    } else {
        (0..DIGEST_BUCKETS).collect()
    }
}

/// How long this node was out of touch (ms), if that is longer than the
/// tombstone grace period and it holds data that deletes made meanwhile may
/// have been forgotten for: then it must re-sync fully.
fn away_too_long(store: &Store, last_contact_ms: u64) -> Option<u64> {
    let away = store.clock().wall_ms().saturating_sub(last_contact_ms);
    (away > store.options().tombstone_grace.as_millis() as u64
        && !store.all_collections().is_empty())
    .then_some(away)
}

pub(crate) fn mutation_bytes(m: &Mutation) -> usize {
    match m {
        Mutation::Put {
            collection,
            key,
            value,
            ..
        } => 48 + collection.len() + key.len() + value.as_ref().map_or(0, Bytes::len),
        Mutation::Drop { collection, .. } => 32 + collection.len(),
    }
}

fn collection_of(m: &Mutation) -> &str {
    match m {
        Mutation::Put { collection, .. } | Mutation::Drop { collection, .. } => collection,
    }
}

pub(crate) fn stamp(v: Version) -> Stamp {
    Stamp {
        ts: v.ts,
        node: v.node,
    }
}

pub(crate) fn version(s: Stamp) -> Version {
    Version::new(s.ts, s.node)
}

/// Refused sequence numbers remembered per peer: enough for every write
/// still waiting on its acknowledgement.
const REFUSED_KEPT: usize = 1 << 14;

#[derive(Debug, Default)]
struct Queue {
    /// Sequence number of the last mutation enqueued.
    last_seq: u64,
    items: VecDeque<(u64, Mutation)>,
    /// Writes were dropped for lack of room: anti-entropy must repair.
    overflowed: bool,
    /// Recent writes the peer refused (not stored there): they are out of
    /// the queue but not acknowledged.
    refused: VecDeque<u64>,
}

impl Queue {
    /// Whether the writes `first..=last` are all acknowledged: the peer
    /// answered through `last` and refused none of them.
    fn acknowledged(&self, acked: u64, first: u64, last: u64) -> bool {
        acked >= last && !self.refused.iter().any(|s| (first..=last).contains(s))
    }
}

/// One peer: its connection and the writes on their way to it.
#[derive(Debug)]
struct Peer {
    id: u64,
    link: Link,
    /// Cached: whether the peer's queue remembers refusals, so a waiter
    /// takes the queue's lock only when there are some.
    any_refused: AtomicBool,
    queue: Mutex<Queue>,
    wake: Notify,
    /// Sequence number of the last mutation the peer acknowledged.
    acked: AtomicU64,
    gone: AtomicBool,
}

#[derive(Debug, Default)]
struct SyncProgress {
    running: AtomicBool,
    received: AtomicU64,
    total: AtomicU64,
    started: Mutex<Option<Instant>>,
}

/// The cluster side of a node.
pub struct Cluster {
    store: Store,
    options: ClusterOptions,
    dialer: Dialer,
    membership: Mutex<Membership>,
    epoch: Instant,
    peers: Mutex<HashMap<u64, Arc<Peer>>>,
    acks: Notify,
    sync: SyncProgress,
    running: AtomicBool,
    /// Wall-clock ms when this node last had a live, non-syncing peer (or
    /// started, with no history).
    last_contact: AtomicU64,
    /// Set while this node's own data cannot be trusted: it was away
    /// longer than the tombstone grace period, so keys deleted meanwhile
    /// may still be here. Reads ask the others; a full re-sync prunes.
    full_resync: AtomicBool,
    /// Whether any other member (left ones aside) is known: kept by
    /// `with_membership`, read on every write without the lock.
    peers_known: AtomicBool,
    /// Anti-entropy exchanges completed, and records pulled and pushed.
    ae_rounds: AtomicU64,
    ae_pulled: AtomicU64,
    ae_pushed: AtomicU64,
    /// Records from peers refused by the clock guard.
    refused_future: AtomicU64,
    /// The peers' clock offsets, and what they say of this node's clock.
    offsets: Mutex<Offsets>,
    verdict: Mutex<Verdict>,
    /// `verdict.skewed`, read on every client write without the lock.
    skewed: AtomicBool,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("me", &self.dialer.me)
            .finish()
    }
}

impl Cluster {
    /// The cluster side of node `me` (its id, name and advertised address)
    /// over `store`. Nothing runs until [`start`](Self::start).
    pub fn new(store: Store, me: (u64, String, String), options: ClusterOptions) -> Arc<Self> {
        let (id, name, addr) = me;
        let mut options = options;
        let saved = options.state_file.as_deref().and_then(|p| {
            state::load(p)
                .inspect_err(|e| tracing::warn!("ignoring {}: {e}", p.display()))
                .ok()
                .flatten()
        });
        let mut last_contact = store.clock().wall_ms();
        let mut full_resync = false;
        if let Some(saved) = saved {
            let members: Vec<String> = saved.members.into_iter().filter(|m| *m != addr).collect();
            if options.seeds.is_empty() && !members.is_empty() {
                tracing::info!(
                    "rejoining through the {} members remembered in cluster.state",
                    members.len()
                );
                options.seeds = members;
            }
            last_contact = saved.seen_ms;
            if let Some(away) = away_too_long(&store, saved.seen_ms)
                && !options.seeds.is_empty()
            {
                tracing::warn!(
                    "away from the cluster for {} s, longer than the tombstone grace period ({} s): a full re-sync runs before this node trusts its own data",
                    away / 1000,
                    store.options().tombstone_grace.as_secs()
                );
                full_resync = true;
            }
        }
        let update = MemberUpdate {
            id,
            name,
            addr,
            // Above every incarnation of this node's earlier lives, as long
            // as the wall clock moves forward between restarts.
            incarnation: store.clock().wall_ms(),
            liveness: Liveness::Alive,
            syncing: !options.seeds.is_empty(),
            collections: options.collections.clone(),
        };
        let seed = options.rng_seed.unwrap_or(id ^ dhrt_storage::wall_ms());
        let membership = Membership::new(update, options.membership.clone(), seed);
        Arc::new(Cluster {
            dialer: Dialer {
                me: id,
                secret: options
                    .secret
                    .clone()
                    .unwrap_or_default()
                    .into_bytes()
                    .into(),
                max_frame: options.max_frame,
                connector: options.connector.clone(),
            },
            store,
            options,
            membership: Mutex::new(membership),
            epoch: Instant::now(),
            peers: Mutex::new(HashMap::new()),
            acks: Notify::new(),
            sync: SyncProgress::default(),
            running: AtomicBool::new(true),
            last_contact: AtomicU64::new(last_contact),
            full_resync: AtomicBool::new(full_resync),
            peers_known: AtomicBool::new(false),
            ae_rounds: AtomicU64::new(0),
            ae_pulled: AtomicU64::new(0),
            ae_pushed: AtomicU64::new(0),
            refused_future: AtomicU64::new(0),
            offsets: Mutex::new(Offsets::default()),
            verdict: Mutex::new(Verdict::default()),
            skewed: AtomicBool::new(false),
        })
    }

    /// A cluster of one: no seeds, no peers until someone joins.
    pub fn single(store: Store, me: (u64, String, String)) -> Arc<Self> {
        Cluster::new(store, me, ClusterOptions::default())
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// This node's wall clock (the store's, which tests may offset).
    fn wall_ms(&self) -> u64 {
        self.store.clock().wall_ms()
    }

    fn guard(&self) -> Guard {
        Guard {
            max_offset_ms: self.options.max_clock_ahead.as_millis() as u64,
        }
    }

    /// This node's id.
    pub fn id(&self) -> u64 {
        self.dialer.me
    }

    /// The settings.
    pub fn options(&self) -> &ClusterOptions {
        &self.options
    }

    pub(crate) fn secret(&self) -> &[u8] {
        &self.dialer.secret
    }

    pub(crate) fn store(&self) -> &Store {
        &self.store
    }

    /// Starts the membership protocol, anti-entropy and, with seeds, the
    /// join and its handoff. Call once, inside a tokio runtime.
    pub fn start(self: &Arc<Self>) {
        let me = self.clone();
        tokio::spawn(async move { me.membership_loop().await });
        let me = self.clone();
        tokio::spawn(async move { me.anti_entropy_loop().await });
        let me = self.clone();
        tokio::spawn(async move { me.contact_loop().await });
        if !self.options.seeds.is_empty() {
            let me = self.clone();
            tokio::spawn(async move { me.join().await });
        }
    }

    // ---- membership -------------------------------------------------------

    fn with_membership<T>(self: &Arc<Self>, f: impl FnOnce(&mut Membership, u64) -> T) -> T {
        let now = self.now_ms();
        let (value, outputs) = {
            let mut m = self.membership.lock().unwrap();
            let value = f(&mut m, now);
            self.peers_known.store(
                m.members().any(|u| u.liveness != Liveness::Left),
                Ordering::Release,
            );
            (value, m.drain())
        };
        self.perform(outputs);
        value
    }

    fn perform(self: &Arc<Self>, outputs: Vec<Output>) {
        for output in outputs {
            match output {
                Output::Send { to, mut gossip } => {
                    if let Some(peer) = self.peer(to) {
                        let timeout = self.options.timeout;
                        gossip.sent_ms = self.wall_ms();
                        tokio::spawn(async move {
                            let _ = peer.link.gossip(gossip, timeout).await;
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
            }
        }
    }

    fn member_changed(self: &Arc<Self>, member: MemberUpdate, before: Option<Liveness>) {
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
                q.items.clear();
                peer.acked.store(q.last_seq, Ordering::Release);
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
    fn peer(self: &Arc<Self>, id: u64) -> Option<Arc<Peer>> {
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
        let peer = Arc::new(Peer {
            id,
            link: Link::new(addr, self.dialer.clone()),
            any_refused: AtomicBool::new(false),
            queue: Mutex::new(Queue::default()),
            wake: Notify::new(),
            acked: AtomicU64::new(0),
            gone: AtomicBool::new(false),
        });
        peers.insert(id, peer.clone());
        let me = self.clone();
        let p = peer.clone();
        tokio::spawn(async move { me.replication_loop(p).await });
        Some(peer)
    }

    async fn membership_loop(self: Arc<Self>) {
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
        let wall = self.wall_ms();
        self.offsets
            .lock()
            .unwrap()
            .record(from, gossip.sent_ms, wall);
        self.with_membership(|m, now| m.handle(now, gossip));
    }

    /// A node asks to join through this one: learn it (its own word on
    /// itself), and hand it the table.
    pub(crate) fn on_join(self: &Arc<Self>, update: MemberUpdate) -> Vec<MemberUpdate> {
        self.with_membership(|m, now| {
            m.merge_own_word(now, update);
            m.table()
        })
    }

    /// Re-judges this node's clock against its live peers', logging when
    /// the verdict changes.
    fn judge_clock(&self) {
        let alive: Vec<u64> = self
            .membership
            .lock()
            .unwrap()
            .members()
            .filter(|u| matches!(u.liveness, Liveness::Alive | Liveness::Suspect))
            .map(|u| u.id)
            .collect();
        let measured: Vec<i64> = {
            let mut o = self.offsets.lock().unwrap();
            o.retain(|id| alive.contains(&id));
            alive.iter().filter_map(|id| o.of(*id)).collect()
        };
        let clock_ahead = self.store.clock().ahead_ms(self.store.clock().last());
        let v = skew::verdict(
            &measured,
            self.options.max_clock_ahead.as_millis() as u64,
            clock_ahead,
        );
        let mut current = self.verdict.lock().unwrap();
        if v.skewed != current.skewed {
            if v.skewed {
                tracing::error!("clock skew: {}", v.reason);
            } else {
                tracing::warn!(
                    "clock skew resolved: this node's clock is within {} s of its peers'; writes are accepted again",
                    self.options.max_clock_ahead.as_secs()
                );
            }
        }
        self.skewed.store(v.skewed, Ordering::Release);
        *current = v;
    }

    /// Why client writes are refused on this node now, if they are: its
    /// clock is off from its peers'.
    pub(crate) fn write_refusal(&self) -> Option<OpError> {
        if !self.skewed.load(Ordering::Acquire) {
            return None;
        }
        let reason = self.verdict.lock().unwrap().reason.clone();
        Some(OpError::new(ErrorKind::Unavailable, reason))
    }

    /// This node's clock against its peers', for stats.
    pub fn clock_info(&self) -> dhrt_proto::ClockInfo {
        let v = self.verdict.lock().unwrap().clone();
        dhrt_proto::ClockInfo {
            skewed: v.skewed,
            ahead_ms: v.ahead_ms,
            max_offset_ms: self.options.max_clock_ahead.as_millis() as u64,
            reason: v.reason,
        }
    }

    fn suspect(self: &Arc<Self>, id: u64) {
        self.with_membership(|m, now| m.suspect(now, id));
    }

    fn heard_from(self: &Arc<Self>, id: u64) {
        self.with_membership(|m, _| m.heard_from(id));
    }

    /// Joins through `addr` (or the configured seeds): learns the members,
    /// receives the handoff, and then reports itself healthy.
    async fn join(self: Arc<Self>) {
        let seeds = self.options.seeds.clone();
        let mut backoff = Duration::from_millis(200);
        loop {
            if !self.alive_peers().is_empty() {
                // Someone reached this node first: it is in.
                self.handoff().await;
                return;
            }
            for seed in &seeds {
                match self.join_through(seed).await {
                    Ok(()) => {
                        self.handoff().await;
                        return;
                    }
                    Err(e) => tracing::warn!("joining through {seed}: {e}"),
                }
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
        let me = self.membership.lock().unwrap().me().addr.clone();
        if addr.trim().is_empty() || addr == me {
            return Err(OpError::new(
                ErrorKind::InvalidInput,
                format!("cannot join through {addr:?}: give another member's address"),
            ));
        }
        self.with_membership(|m, _| m.set_syncing(true));
        if let Err(e) = self.join_through(addr).await {
            if !self.sync.running.load(Ordering::Acquire) {
                self.with_membership(|m, _| m.set_syncing(false));
            }
            return Err(OpError::new(
                ErrorKind::Unavailable,
                format!("joining: {e}"),
            ));
        }
        let me = self.clone();
        tokio::spawn(async move { me.handoff().await });
        Ok(self.membership.lock().unwrap().table().len() as u32)
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
    fn alive_peers(&self) -> Vec<MemberUpdate> {
        let m = self.membership.lock().unwrap();
        let mut peers: Vec<MemberUpdate> = m
            .members()
            .filter(|u| u.liveness == Liveness::Alive)
            .cloned()
            .collect();
        peers.sort_by_key(|u| u.syncing);
        peers
    }

    /// Whether any other member is known (left ones aside).
    pub fn has_peers(&self) -> bool {
        self.peers_known.load(Ordering::Acquire)
    }

    /// Every member, this node included, for stats.
    pub fn members(&self) -> Vec<MemberInfo> {
        let table = self.membership.lock().unwrap().table();
        let offsets = self.offsets.lock().unwrap();
        table
            .iter()
            .map(|u| MemberInfo {
                id: format!("{:016x}", u.id),
                name: u.name.clone(),
                addr: u.addr.clone(),
                state: member_state(u),
                clock_offset_ms: offsets.of(u.id),
            })
            .collect()
    }

    /// Cluster metrics in the Prometheus text format: members by state,
    /// per-peer replication queues and acknowledged writes, anti-entropy
    /// activity, and whether this node is syncing.
    pub fn render_metrics(&self, out: &mut String) {
        use std::fmt::Write;
        let table = self.membership.lock().unwrap().table();
        let _ = writeln!(
            out,
            "# HELP dhrt_cluster_members Members this node knows, itself included, by state.\n# TYPE dhrt_cluster_members gauge"
        );
        for state in ["healthy", "unhealthy", "dead", "left", "syncing"] {
            let n = table
                .iter()
                .filter(|u| member_state(u).as_str() == state)
                .count();
            let _ = writeln!(out, "dhrt_cluster_members{{state=\"{state}\"}} {n}");
        }
        let peers: Vec<Arc<Peer>> = self.peers.lock().unwrap().values().cloned().collect();
        let _ = writeln!(
            out,
            "# HELP dhrt_replication_queue Writes queued for a peer (in flight, or hints while it is away).\n# TYPE dhrt_replication_queue gauge"
        );
        for p in &peers {
            let queued = p.queue.lock().unwrap().items.len();
            let _ = writeln!(
                out,
                "dhrt_replication_queue{{peer=\"{}\"}} {queued}",
                p.link.addr()
            );
        }
        let _ = writeln!(
            out,
            "# HELP dhrt_replication_acked_total Writes a peer acknowledged since this node started.\n# TYPE dhrt_replication_acked_total counter"
        );
        for p in &peers {
            let _ = writeln!(
                out,
                "dhrt_replication_acked_total{{peer=\"{}\"}} {}",
                p.link.addr(),
                p.acked.load(Ordering::Relaxed)
            );
        }
        let _ = writeln!(
            out,
            "# HELP dhrt_anti_entropy_rounds_total Digest comparisons completed with a peer.\n# TYPE dhrt_anti_entropy_rounds_total counter\ndhrt_anti_entropy_rounds_total {}",
            self.ae_rounds.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "# HELP dhrt_anti_entropy_records_total Records exchanged by anti-entropy.\n# TYPE dhrt_anti_entropy_records_total counter\ndhrt_anti_entropy_records_total{{direction=\"pulled\"}} {}\ndhrt_anti_entropy_records_total{{direction=\"pushed\"}} {}",
            self.ae_pulled.load(Ordering::Relaxed),
            self.ae_pushed.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "# HELP dhrt_syncing Whether this node is receiving a handoff or re-syncing.\n# TYPE dhrt_syncing gauge\ndhrt_syncing {}",
            u8::from(self.sync.running.load(Ordering::Relaxed))
        );
        let clock = self.clock_info();
        let _ = writeln!(
            out,
            "# HELP dhrt_clock_skewed Whether this node's clock is off from its peers' by more than the allowed offset (client writes are refused).\n# TYPE dhrt_clock_skewed gauge\ndhrt_clock_skewed {}\n# HELP dhrt_clock_ahead_ms How far this node's clock is ahead of the median of its peers' (negative: behind).\n# TYPE dhrt_clock_ahead_ms gauge\ndhrt_clock_ahead_ms {}",
            u8::from(clock.skewed),
            clock.ahead_ms
        );
        let _ = writeln!(
            out,
            "# HELP dhrt_clock_offset_ms How far each peer's clock is ahead of this node's (negative: behind).\n# TYPE dhrt_clock_offset_ms gauge"
        );
        for m in self.members() {
            if let Some(o) = m.clock_offset_ms {
                let _ = writeln!(out, "dhrt_clock_offset_ms{{peer=\"{}\"}} {o}", m.addr);
            }
        }
        let _ = writeln!(
            out,
            "# HELP dhrt_refused_future_total Records from peers refused because they were stamped too far ahead of this node's clock.\n# TYPE dhrt_refused_future_total counter\ndhrt_refused_future_total {}",
            self.refused_future.load(Ordering::Relaxed)
        );
    }

    /// Progress of a running handoff or re-sync.
    pub fn sync_info(&self) -> Option<SyncInfo> {
        if !self.sync.running.load(Ordering::Acquire) {
            return None;
        }
        let received = self.sync.received.load(Ordering::Relaxed);
        let total = self.sync.total.load(Ordering::Relaxed).max(received);
        let secs = self
            .sync
            .started
            .lock()
            .unwrap()
            .map_or(0.0, |t| t.elapsed().as_secs_f64());
        Some(SyncInfo {
            received,
            total,
            percent: (received * 100).checked_div(total).unwrap_or(0),
            keys_per_s: if secs > 0.0 {
                (received as f64 / secs) as u64
            } else {
                0
            },
        })
    }

    /// Tells the cluster this node is leaving, waiting briefly for the news
    /// to go out.
    pub async fn leave(self: &Arc<Self>) {
        // Hand what is still queued to the peers that can take it, so that
        // a write this node acknowledged does not leave with it.
        let deadline = Instant::now() + self.options.timeout.max(Duration::from_secs(2));
        while Instant::now() < deadline && self.hints_for_live_peers() > 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.running.store(false, Ordering::Release);
        if !self.sources().is_empty() && !self.full_resync.load(Ordering::Acquire) {
            self.last_contact.store(self.wall_ms(), Ordering::Release);
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
                sends.spawn(async move { peer.link.gossip(gossip, timeout).await });
            }
        }
        let _ = tokio::time::timeout(Duration::from_secs(1), sends.join_all()).await;
        // Give the writer tasks a moment to flush the frames.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    /// Writes queued for peers that are alive.
    fn hints_for_live_peers(&self) -> usize {
        let alive: HashSet<u64> = self.alive_peers().iter().map(|u| u.id).collect();
        self.peers
            .lock()
            .unwrap()
            .values()
            .filter(|p| alive.contains(&p.id))
            .map(|p| p.queue.lock().unwrap().items.len())
            .sum()
    }

    // ---- writes -----------------------------------------------------------

    /// Whether this node stores `collection` itself: it hosts it, or nobody
    /// alive does (a write is never dropped for lack of a host).
    pub(crate) fn stores_locally(&self, collection: &str) -> bool {
        if self.options.collections.is_none() {
            // This node hosts every collection.
            return true;
        }
        let m = self.membership.lock().unwrap();
        hosts(m.me(), collection)
            || !m
                .members()
                .any(|u| u.liveness == Liveness::Alive && hosts(u, collection))
    }

    /// A fresh version for a write this node does not store itself.
    pub(crate) fn stamp_now(&self) -> Version {
        self.store.clock().now()
    }

    /// Sends `mutations` (all of one collection) to every replica hosting
    /// it and waits as the write concern says, at most the timeout. The
    /// writes are saved (here when `stored_locally`, and queued for every
    /// replica) whatever the outcome: an error of kind
    /// [`ErrorKind::WriteConcern`] says on how many replicas they are, when
    /// that is fewer than the concern asks. A replica that refused them
    /// does not count; one that does not answer in time is marked
    /// unhealthy and gets them later.
    pub(crate) async fn replicate(
        self: &Arc<Self>,
        mutations: Vec<Mutation>,
        stored_locally: bool,
    ) -> Result<(), OpError> {
        if !self.has_peers() {
            return Ok(());
        }
        let Some(collection) = mutations.first().map(|m| collection_of(m).to_string()) else {
            return Ok(());
        };
        let (targets, reachable): (Vec<u64>, HashSet<u64>) = {
            let m = self.membership.lock().unwrap();
            let targets = m
                .members()
                .filter(|u| u.liveness != Liveness::Left && hosts(u, &collection))
                .map(|u| u.id)
                .collect();
            let reachable = m
                .members()
                .filter(|u| {
                    matches!(u.liveness, Liveness::Alive | Liveness::Suspect)
                        && hosts(u, &collection)
                })
                .map(|u| u.id)
                .collect();
            (targets, reachable)
        };
        let need = placement::need(self.options.write_ack, targets.len(), stored_locally);
        let mut waits = Vec::new();
        for id in targets {
            let Some(peer) = self.peer(id) else { continue };
            let (first, last) = self.enqueue(&peer, &mutations);
            if reachable.contains(&id) {
                waits.push((peer, first, last));
            }
        }
        if need.remote_acks == 0 {
            return Ok(());
        }
        let local = usize::from(stored_locally);
        let unmet = |acked: usize| {
            OpError::new(
                ErrorKind::WriteConcern,
                format!(
                    "write concern {} not met within {} ms: the write is saved on {} of {} replicas ({} needed) and will reach the others",
                    self.options.write_ack.as_str(),
                    self.options.timeout.as_millis(),
                    acked + local,
                    need.replicas,
                    need.copies
                ),
            )
        };
        let deadline = tokio::time::Instant::now() + self.options.timeout;
        loop {
            let notified = self.acks.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            // One reading of each peer: answered, and of those, acknowledged.
            let (mut answered, mut done) = (0, 0);
            for (p, first, last) in &waits {
                let acked = p.acked.load(Ordering::Acquire);
                if acked >= *last {
                    answered += 1;
                    done += usize::from(Self::acknowledged_at(p, acked, *first, *last));
                }
            }
            if done >= need.remote_acks {
                return Ok(());
            }
            // Too few replicas are up, or some refused: once every one that
            // can answer has, the outcome is known.
            let refused = answered - done;
            if waits.len() - refused < need.remote_acks && answered == waits.len() {
                return Err(unmet(done));
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                for (p, _, last) in &waits {
                    if p.acked.load(Ordering::Acquire) < *last {
                        tracing::warn!(
                            "peer {} did not acknowledge a write within {} ms: unhealthy",
                            p.link.addr(),
                            self.options.timeout.as_millis()
                        );
                        self.suspect(p.id);
                    }
                }
                let done = waits
                    .iter()
                    .filter(|(p, first, last)| self.acknowledged(p, *first, *last))
                    .count();
                return Err(unmet(done));
            }
        }
    }

    /// Whether peer `p` acknowledged the writes `first..=last`.
    fn acknowledged(&self, p: &Peer, first: u64, last: u64) -> bool {
        Self::acknowledged_at(p, p.acked.load(Ordering::Acquire), first, last)
    }

    /// Whether peer `p`, having answered through `acked`, acknowledged the
    /// writes `first..=last` (answered, and refused none of them).
    fn acknowledged_at(p: &Peer, acked: u64, first: u64, last: u64) -> bool {
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
    fn enqueue(&self, peer: &Peer, mutations: &[Mutation]) -> (u64, u64) {
        let mut q = peer.queue.lock().unwrap();
        let first = q.last_seq + 1;
        for m in mutations {
            q.last_seq += 1;
            let seq = q.last_seq;
            q.items.push_back((seq, m.clone()));
        }
        // The writes just queued always stay: they are this write's.
        let room = self.options.max_hints.max(mutations.len());
        let over = q.items.len().saturating_sub(room);
        if over > 0 {
            // Keep the newest; anti-entropy repairs the rest.
            q.items.drain(..over);
            q.overflowed = true;
        }
        let seq = q.last_seq;
        drop(q);
        peer.wake.notify_one();
        (first, seq)
    }

    async fn replication_loop(self: Arc<Self>, peer: Arc<Peer>) {
        let mut backoff = Duration::from_millis(100);
        loop {
            if peer.gone.load(Ordering::Acquire) {
                return;
            }
            let batch: Vec<(u64, Mutation)> = {
                let q = peer.queue.lock().unwrap();
                let n = crate::batch::next_batch_len(
                    q.items.iter().map(|(_, m)| mutation_bytes(m)),
                    BATCH_BYTES,
                    BATCH_ITEMS,
                );
                q.items.iter().take(n).cloned().collect()
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
            match peer.link.request(PeerOp::Apply(mutations), timeout).await {
                Ok(PeerReply::Applied { refused, .. }) => {
                    if !refused.is_empty() {
                        tracing::error!(
                            "peer {} refused {} replicated writes stamped too far ahead of its clock: check the clocks",
                            peer.link.addr(),
                            refused.len()
                        );
                        let refused = refused
                            .iter()
                            .filter_map(|&i| seqs.get(i as usize).copied());
                        self.refuse(&peer, refused);
                    }
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
                    tracing::error!(
                        "peer {} refused replicated writes: {}",
                        peer.link.addr(),
                        error.message
                    );
                    // Retrying cannot help: skip them, unacknowledged
                    // (anti-entropy will compare again later).
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

    /// Remembers writes `peer` refused: they leave its queue but are not
    /// acknowledged.
    fn refuse(&self, peer: &Peer, seqs: impl Iterator<Item = u64>) {
        let mut q = peer.queue.lock().unwrap();
        for s in seqs {
            if q.refused.len() == REFUSED_KEPT {
                q.refused.pop_front();
            }
            q.refused.push_back(s);
        }
        peer.any_refused
            .store(!q.refused.is_empty(), Ordering::Release);
    }

    fn ack_through(&self, peer: &Peer, last: u64) {
        let mut q = peer.queue.lock().unwrap();
        while q.items.front().is_some_and(|(s, _)| *s <= last) {
            q.items.pop_front();
        }
        drop(q);
        peer.acked.fetch_max(last, Ordering::AcqRel);
        self.acks.notify_waiters();
    }

    // ---- reads ------------------------------------------------------------

    /// Asks every live peer hosting `collection` for `key` in parallel and
    /// returns the newest entry found (a tombstone included).
    pub(crate) async fn read_remote(
        self: &Arc<Self>,
        collection: &str,
        key: &[u8],
    ) -> Option<Versioned> {
        let targets: Vec<u64> = {
            let m = self.membership.lock().unwrap();
            m.members()
                .filter(|u| {
                    matches!(u.liveness, Liveness::Alive | Liveness::Suspect)
                        && hosts(u, collection)
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
                    if !guard.admits(v.version.ts, self.wall_ms()) {
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

    // ---- applying what peers send ----------------------------------------

    /// Applies replicated mutations. Each passes the clock guard on its
    /// own: one stamped too far ahead of this node's clock is refused (not
    /// stored, not observed by the clock) and listed in the outcome; the
    /// others apply. Runs of puts to one collection go to the store as one
    /// batch (one lock, one write). An error is this node's own (storage).
    pub(crate) fn apply(&self, mutations: &[Mutation]) -> Result<Applied, OpError> {
        let guard = self.guard();
        let wall = self.wall_ms();
        let mut refused = Vec::new();
        for (i, m) in mutations.iter().enumerate() {
            let (Mutation::Put { version: v, .. } | Mutation::Drop { version: v, .. }) = m;
            if !guard.admits(v.ts, wall) {
                refused.push(i as u32);
            }
        }
        if let Some(&first) = refused.first() {
            let (Mutation::Put { version: v, .. } | Mutation::Drop { version: v, .. }) =
                &mutations[first as usize];
            self.refused_future
                .fetch_add(refused.len() as u64, Ordering::Relaxed);
            tracing::error!(
                "refused {} records from node {:016x}, stamped up to {} s ahead of this node's clock (more than the {} s allowed): check the clocks",
                refused.len(),
                v.node,
                Guard::ahead_s(v.ts, wall),
                self.options.max_clock_ahead.as_secs()
            );
        }
        let admitted = |i: usize| refused.binary_search(&(i as u32)).is_err();
        let mut applied = 0;
        let mut i = 0;
        while i < mutations.len() {
            if !admitted(i) {
                i += 1;
                continue;
            }
            match &mutations[i] {
                Mutation::Drop {
                    collection,
                    version: v,
                } => {
                    let took = self
                        .store
                        .apply_drop(collection, version(*v))
                        .map_err(crate::node::op_error)?
                        .is_some();
                    applied += u64::from(took);
                    i += 1;
                }
                Mutation::Put { collection, .. } => {
                    let run = mutations[i..]
                        .iter()
                        .take_while(
                            |m| matches!(m, Mutation::Put { collection: c, .. } if c == collection),
                        )
                        .count();
                    let entries: Vec<Replicated<'_>> = mutations[i..i + run]
                        .iter()
                        .enumerate()
                        .filter(|(j, _)| admitted(i + j))
                        .filter_map(|(_, m)| match m {
                            Mutation::Put {
                                key,
                                value,
                                version: v,
                                ..
                            } => Some((&key[..], value.as_deref(), version(*v))),
                            Mutation::Drop { .. } => None,
                        })
                        .collect();
                    applied += self
                        .store
                        .apply_many(collection, &entries)
                        .map_err(crate::node::op_error)? as u64;
                    i += run;
                }
            }
        }
        if self.sync.running.load(Ordering::Relaxed) {
            self.sync
                .received
                .fetch_add(mutations.len() as u64, Ordering::Relaxed);
        }
        Ok(Applied { applied, refused })
    }

    /// Applies on the blocking pool when the store fsyncs every write.
    pub(crate) async fn apply_async(
        self: &Arc<Self>,
        mutations: Vec<Mutation>,
    ) -> Result<Applied, OpError> {
        if self.store.options().sync == SyncMode::Always {
            let me = self.clone();
            tokio::task::spawn_blocking(move || me.apply(&mutations))
                .await
                .map_err(|e| OpError::new(ErrorKind::Internal, e.to_string()))?
        } else {
            self.apply(&mutations)
        }
    }

    /// The digests of `names` (all collections when empty).
    pub(crate) fn digests(&self, names: Vec<String>) -> Result<Vec<CollectionDigest>, OpError> {
        let names = if names.is_empty() {
            self.store.all_collections()
        } else {
            names
        };
        let stats = self.store.stats();
        names
            .into_iter()
            .map(|c| {
                let d = self.store.digest(&c).map_err(crate::node::op_error)?;
                let entries = stats
                    .collections
                    .iter()
                    .find(|s| s.name == c)
                    .map_or(0, |s| s.keys + s.tombstones);
                Ok(CollectionDigest {
                    collection: c,
                    buckets: d.buckets,
                    dropped_at: d.dropped_at.map(stamp),
                    entries,
                })
            })
            .collect()
    }

    /// A page of the records of some buckets of a collection, as
    /// mutations, from `from` on: cut before it would pass `max_bytes`
    /// (a larger record goes alone). Also the cursor of the next page.
    pub(crate) fn bucket_records(
        &self,
        collection: &str,
        buckets: &[u32],
        from: Option<BucketCursor>,
        max_bytes: usize,
    ) -> Result<(Vec<Mutation>, Option<BucketCursor>), OpError> {
        let mut out = Vec::new();
        let mut bytes = 0;
        let start = match from {
            Some(c) => buckets.iter().position(|&b| b == c.bucket).ok_or_else(|| {
                OpError::new(
                    ErrorKind::InvalidInput,
                    "cursor outside the requested buckets",
                )
            })?,
            None => 0,
        };
        for (i, &b) in buckets.iter().enumerate().skip(start) {
            let skip = match from {
                Some(c) if i == start => c.skip,
                _ => 0,
            };
            let records = self
                .store
                .bucket(collection, b as usize)
                .map_err(crate::node::op_error)?;
            for (n, r) in records.enumerate().skip(skip as usize) {
                let m = Mutation::Put {
                    collection: collection.to_string(),
                    key: r.key.into(),
                    value: r.value,
                    version: stamp(r.version),
                };
                let size = mutation_bytes(&m);
                if !out.is_empty() && bytes + size > max_bytes {
                    let next = BucketCursor {
                        bucket: b,
                        skip: n as u64,
                    };
                    return Ok((out, Some(next)));
                }
                bytes += size;
                out.push(m);
            }
        }
        Ok((out, None))
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
            .map_err(crate::node::op_error)?;
        let mut sent = 0;
        let mut batcher = crate::batch::Batcher::new(BATCH_BYTES, BATCH_ITEMS);
        let timeout = self.options.timeout.max(Duration::from_secs(30));
        let drop = self
            .store
            .digest(collection)
            .map_err(crate::node::op_error)?
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
                send(&mut inflight, chunk);
            }
        }
        if let Some(chunk) = batcher.finish() {
            send(&mut inflight, chunk);
        }
        while let Some(r) = inflight.join_next().await {
            sent += joined(Some(r))?;
        }
        Ok(sent)
    }

    // ---- handoff, re-sync, anti-entropy ------------------------------------

    /// Marks a handoff or re-sync as running; false if one already is.
    fn begin_sync(&self) -> bool {
        if self.sync.running.swap(true, Ordering::AcqRel) {
            return false;
        }
        self.sync.received.store(0, Ordering::Relaxed);
        self.sync.total.store(0, Ordering::Relaxed);
        *self.sync.started.lock().unwrap() = Some(Instant::now());
        true
    }

    fn end_sync(self: &Arc<Self>) {
        self.full_resync.store(false, Ordering::Release);
        self.last_contact.store(self.wall_ms(), Ordering::Release);
        self.sync.running.store(false, Ordering::Release);
        self.with_membership(|m, _| m.set_syncing(false));
    }

    /// While a full re-sync is pending or running: records of this node
    /// stamped at or before this wall-clock ms may have been deleted
    /// elsewhere (and the deletes forgotten), so they are not an answer.
    pub(crate) fn distrusted_until(&self) -> Option<u64> {
        self.full_resync
            .load(Ordering::Acquire)
            .then(|| self.last_contact.load(Ordering::Acquire))
    }

    /// Waits for a member to sync from. `None` when this node's own data
    /// has to do: it is alone, or every live member is syncing too (the
    /// whole cluster is coming back at once) and, after a moment for a
    /// source to appear, this node has the lowest id among them, so it
    /// goes first and the others sync from it.
    async fn wait_for_source(&self) -> Option<MemberUpdate> {
        let started = Instant::now();
        loop {
            if let Some(source) = self.sources().into_iter().next() {
                return Some(source);
            }
            let peers = self.alive_peers();
            if peers.is_empty() {
                return None;
            }
            if started.elapsed() > Duration::from_secs(3)
                && peers.iter().all(|u| u.id > self.dialer.me)
            {
                tracing::warn!(
                    "every live member is syncing: this node goes first, with its own data"
                );
                return None;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Members this node can sync from: alive and not syncing themselves.
    fn sources(&self) -> Vec<MemberUpdate> {
        self.alive_peers()
            .into_iter()
            .filter(|u| !u.syncing)
            .collect()
    }

    /// Every second: remember when a live peer was last seen, and the
    /// members, in the state file. Contact regained after longer than the
    /// tombstone grace period starts a full re-sync.
    async fn contact_loop(self: Arc<Self>) {
        let mut had_contact = false;
        let mut written: Option<SavedState> = None;
        while self.running.load(Ordering::Acquire) {
            tokio::time::sleep(Duration::from_secs(1)).await;
            let contact = !self.sources().is_empty();
            let now = self.wall_ms();
            if contact
                && !had_contact
                && let Some(away) =
                    away_too_long(&self.store, self.last_contact.load(Ordering::Acquire))
                && !self.full_resync.swap(true, Ordering::AcqRel)
            {
                tracing::warn!(
                    "out of touch with the cluster for {} s, longer than the tombstone grace period: re-syncing fully",
                    away / 1000
                );
                let me = self.clone();
                tokio::spawn(async move { me.resync().await });
            }
            had_contact = contact;
            if contact && !self.full_resync.load(Ordering::Acquire) {
                self.last_contact.store(now, Ordering::Release);
            }
            // Rewrite on news, and every second while in touch (a few
            // bytes, no fsync: losing the last write only makes a restart
            // look a little longer away).
            let saved = self.saved_state();
            let stale = written
                .as_ref()
                .is_none_or(|w| w.members != saved.members || saved.seen_ms > w.seen_ms);
            if stale && self.save_state(&saved) {
                written = Some(saved);
            }
        }
    }

    /// What the state file should say now.
    fn saved_state(&self) -> SavedState {
        let m = self.membership.lock().unwrap();
        SavedState {
            seen_ms: self.last_contact.load(Ordering::Acquire),
            members: m
                .members()
                .filter(|u| u.liveness != Liveness::Left)
                .map(|u| u.addr.clone())
                .collect(),
        }
    }

    /// Writes the state file (if there is one and there are members to
    /// remember); whether it was written.
    fn save_state(&self, saved: &SavedState) -> bool {
        let Some(path) = &self.options.state_file else {
            return false;
        };
        if saved.members.is_empty() {
            return false;
        }
        match state::save(path, saved) {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!("writing {}: {e}", path.display());
                false
            }
        }
    }

    /// After joining: every collection this node hosts is streamed to it by
    /// a healthy member, newest first; then a digest comparison catches
    /// what raced the stream; then this node reports itself healthy.
    async fn handoff(self: Arc<Self>) {
        if !self.begin_sync() {
            return;
        }
        let started = Instant::now();
        while let Some(source) = self.wait_for_source().await {
            match self.handoff_from(&source).await {
                Ok(n) => {
                    tracing::info!(
                        "handoff from {} complete: {n} records in {:.1} s",
                        source.addr,
                        started.elapsed().as_secs_f64()
                    );
                    break;
                }
                Err(e) => {
                    tracing::warn!("handoff from {}: {e}; retrying", source.addr);
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        }
        self.end_sync();
    }

    async fn handoff_from(self: &Arc<Self>, source: &MemberUpdate) -> Result<u64, LinkError> {
        if let Some(seen) = self.distrusted_until() {
            // Away too long: the source's data is the truth.
            let n = self.prune_with(source.id, seen).await?;
            self.anti_entropy_with(source.id).await?;
            return Ok(n);
        }
        if !self.store.all_collections().is_empty() {
            // A returning node: only what differs travels.
            self.anti_entropy_with(source.id).await?;
            return Ok(0);
        }
        let peer = self.peer(source.id).ok_or_else(|| LinkError::Refused {
            addr: source.addr.clone(),
            reason: "unknown member".into(),
        })?;
        let long = self.options.timeout.max(Duration::from_secs(10));
        let digests = match peer.link.request(PeerOp::Digests(Vec::new()), long).await? {
            PeerReply::Digests(d) => d,
            _ => Vec::new(),
        };
        let me = self.membership.lock().unwrap().me().clone();
        let wanted: Vec<CollectionDigest> = digests
            .into_iter()
            .filter(|d| hosts(&me, &d.collection))
            .collect();
        self.sync
            .total
            .store(wanted.iter().map(|d| d.entries).sum(), Ordering::Relaxed);
        let mut total = 0;
        for d in &wanted {
            tracing::info!(
                "handoff of {:?} ({} records) from {}",
                d.collection,
                d.entries,
                source.addr
            );
            match peer
                .link
                .request(
                    PeerOp::Handoff {
                        collection: d.collection.clone(),
                    },
                    Duration::from_secs(3600),
                )
                .await?
            {
                PeerReply::HandoffDone(n) => total += n,
                other => tracing::warn!("unexpected handoff answer {other:?}"),
            }
        }
        // What was written while the stream ran reached this node live, or
        // is caught here.
        self.anti_entropy_with(source.id).await?;
        Ok(total)
    }

    /// After being declared dead: compare digests with every live member,
    /// then report healthy.
    async fn resync(self: Arc<Self>) {
        if !self.begin_sync() {
            return;
        }
        if away_too_long(&self.store, self.last_contact.load(Ordering::Acquire)).is_some() {
            self.full_resync.store(true, Ordering::Release);
        }
        if let Some(seen) = self.distrusted_until() {
            // Prune against one source before anything of ours travels.
            while let Some(source) = self.wait_for_source().await {
                match self.prune_with(source.id, seen).await {
                    Ok(n) => {
                        tracing::info!("full re-sync with {}: {n} records forgotten", source.addr);
                        break;
                    }
                    Err(e) => {
                        tracing::warn!("full re-sync with {}: {e}; retrying", source.addr);
                        tokio::time::sleep(Duration::from_millis(500)).await;
                    }
                }
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

    async fn anti_entropy_loop(self: Arc<Self>) {
        let every = self.options.anti_entropy_every;
        while self.running.load(Ordering::Acquire) {
            tokio::time::sleep(every).await;
            // A syncing peer may hold what the cluster deleted long ago:
            // it pulls, nobody pulls from it.
            let peers: Vec<MemberUpdate> = self.sources();
            // While this node syncs, the sync itself is its anti-entropy.
            if peers.is_empty()
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
    async fn pull_buckets(
        self: &Arc<Self>,
        peer: &Peer,
        collection: &str,
        buckets: &[usize],
        timeout: Duration,
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
            self.ae_pulled
                .fetch_add(records.len() as u64, Ordering::Relaxed);
            self.apply_async(records).await.map_err(LinkError::Local)?;
            match next {
                Some(n) if from != Some(n) => from = Some(n),
                _ => return Ok(theirs),
            }
        }
    }

    /// Sends `mutations` to the peer in `Apply` frames cut by bytes. What
    /// the peer refuses (this node's clock is ahead of its own) is counted,
    /// not retried.
    async fn push_to(
        &self,
        peer: &Peer,
        mutations: Vec<Mutation>,
        timeout: Duration,
    ) -> Result<(), LinkError> {
        let mut batcher = crate::batch::Batcher::new(BATCH_BYTES, BATCH_ITEMS);
        let mut batches = Vec::new();
        for m in mutations {
            batches.extend(batcher.push(m));
        }
        batches.extend(batcher.finish());
        for batch in batches {
            self.ae_pushed
                .fetch_add(batch.len() as u64, Ordering::Relaxed);
            if let PeerReply::Applied { refused, .. } =
                peer.link.request(PeerOp::Apply(batch), timeout).await?
                && !refused.is_empty()
            {
                tracing::warn!(
                    "peer {} refused {} records stamped ahead of its clock",
                    peer.link.addr(),
                    refused.len()
                );
            }
        }
        Ok(())
    }

    /// Peer `id`'s digest of every collection both nodes host (the empty
    /// digest where it has none), or `None` for an unknown peer.
    async fn shared_digests(
        self: &Arc<Self>,
        id: u64,
    ) -> Result<Option<(Arc<Peer>, Vec<(String, Digest)>)>, LinkError> {
        let Some(peer) = self.peer(id) else {
            return Ok(None);
        };
        let (me, them) = {
            let m = self.membership.lock().unwrap();
            (m.me().clone(), m.get(id).cloned())
        };
        let Some(them) = them else { return Ok(None) };
        let long = self.options.timeout.max(Duration::from_secs(10));
        let theirs = match peer.link.request(PeerOp::Digests(Vec::new()), long).await? {
            PeerReply::Digests(d) => d,
            _ => Vec::new(),
        };
        let mut names: Vec<String> = self.store.all_collections();
        for d in &theirs {
            if !names.contains(&d.collection) {
                names.push(d.collection.clone());
            }
        }
        names.retain(|c| hosts(&me, c) && hosts(&them, c));
        let shared = names
            .into_iter()
            .map(|c| {
                let remote = theirs
                    .iter()
                    .find(|d| d.collection == c)
                    .map(|d| Digest {
                        buckets: d.buckets.clone(),
                        dropped_at: d.dropped_at.map(version),
                    })
                    .unwrap_or_else(Digest::empty);
                (c, remote)
            })
            .collect();
        Ok(Some((peer, shared)))
    }

    /// Applies a drop a peer's digest reports, through the clock guard.
    async fn apply_remote_drop(
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
            self.apply_async(vec![drop])
                .await
                .map_err(LinkError::Local)?;
        }
        Ok(())
    }

    /// Compares digests of every collection both nodes host with peer `id`
    /// and exchanges the differing buckets, both ways. Every record pulled
    /// passes the clock guard on its own; an error says whose it was.
    pub(crate) async fn anti_entropy_with(self: &Arc<Self>, id: u64) -> Result<(), LinkError> {
        let Some((peer, shared)) = self.shared_digests(id).await? else {
            return Ok(());
        };
        let long = self.options.timeout.max(Duration::from_secs(10));
        for (c, remote) in shared {
            let local = self.store.digest(&c).map_err(local_error)?;
            self.apply_remote_drop(&c, &local, &remote).await?;
            let local = self.store.digest(&c).map_err(local_error)?;
            let mut push = Vec::new();
            if local.dropped_at > remote.dropped_at
                && let Some(d) = local.dropped_at
            {
                push.push(Mutation::Drop {
                    collection: c.clone(),
                    version: stamp(d),
                });
            }
            for chunk in buckets_to_exchange(&local, &remote).chunks(BUCKETS_PER_REQUEST) {
                let theirs = self.pull_buckets(&peer, &c, chunk, long).await?;
                // Only what is newer takes effect; send back only what the
                // peer lacks or holds older.
                for b in chunk {
                    let mine = self.store.bucket(&c, *b).map_err(local_error)?;
                    push.extend(
                        mine.filter(|r| {
                            theirs.get(&r.key[..]).is_none_or(|v| *v < stamp(r.version))
                        })
                        .map(|r| Mutation::Put {
                            collection: c.clone(),
                            key: r.key.into(),
                            value: r.value,
                            version: stamp(r.version),
                        }),
                    );
                }
                let pending: usize = push.iter().map(mutation_bytes).sum();
                if push.len() >= BATCH_ITEMS || pending >= BATCH_BYTES {
                    self.push_to(&peer, std::mem::take(&mut push), long).await?;
                }
            }
            self.push_to(&peer, push, long).await?;
        }
        self.ae_rounds.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// The full re-sync of a node away longer than the tombstone grace
    /// period, against peer `id`: for every collection both host, pulls
    /// the differing buckets, and forgets its own records the peer does not
    /// have that were stamped before it lost touch (`seen_ms`): the cluster
    /// deleted them and has since purged the tombstones. Nothing of this
    /// node's travels the other way. Returns how many records it forgot;
    /// fails (and the re-sync goes on) if anything could not be applied.
    async fn prune_with(self: &Arc<Self>, id: u64, seen_ms: u64) -> Result<u64, LinkError> {
        let Some((peer, shared)) = self.shared_digests(id).await? else {
            return Ok(0);
        };
        let long = self.options.timeout.max(Duration::from_secs(10));
        let mut forgotten = 0;
        for (c, remote) in shared {
            let local = self.store.digest(&c).map_err(local_error)?;
            self.apply_remote_drop(&c, &local, &remote).await?;
            let local = self.store.digest(&c).map_err(local_error)?;
            for chunk in buckets_to_exchange(&local, &remote).chunks(BUCKETS_PER_REQUEST) {
                let known = self.pull_buckets(&peer, &c, chunk, long).await?;
                // A tombstone just above the forgotten record's version: it
                // hides nothing newer, and is itself old enough to be purged
                // at the next compaction.
                let mut forget = Vec::new();
                for b in chunk {
                    let mine = self.store.bucket(&c, *b).map_err(local_error)?;
                    forget.extend(mine.filter_map(|r| {
                        (r.value.is_some()
                            && !known.contains_key(&r.key[..])
                            && r.version.physical_ms() <= seen_ms)
                            .then(|| Mutation::Put {
                                collection: c.clone(),
                                key: r.key.into(),
                                value: None,
                                version: Stamp {
                                    ts: r.version.ts + 1,
                                    node: r.version.node,
                                },
                            })
                    }));
                }
                forgotten += forget.len() as u64;
                let outcome = self.apply_async(forget).await.map_err(LinkError::Local)?;
                if !outcome.refused.is_empty() {
                    // Cannot happen (they are this node's own stamps + 1),
                    // but a prune that did not forget is no prune.
                    return Err(LinkError::Local(OpError::new(
                        ErrorKind::Internal,
                        "the prune's tombstones were refused",
                    )));
                }
            }
        }
        Ok(forgotten)
    }
}

/// A local storage error met during a sync with a peer.
fn local_error(e: dhrt_storage::Error) -> LinkError {
    LinkError::Local(crate::node::op_error(e))
}
