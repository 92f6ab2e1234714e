//! The cluster: the tokio layer around the membership state machine, one
//! replication queue per peer (batched, bounded hints while it is away),
//! write concerns, fan-out reads, anti-entropy over digests, join handoff and
//! re-sync, and leave. The node facade (`node.rs`) calls into it; the peer
//! server (`peer_server.rs`) feeds it what peers send.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use dhrt_proto::{Liveness, MemberInfo, MemberUpdate, Mutation, Stamp, SyncInfo};
use dhrt_storage::{Store, Version};
use tokio::sync::Notify;

use crate::damaged::Damaged;
use crate::link::{Connector, Dialer, TcpConnector};
use crate::membership::{Membership, MembershipConfig, member_state};
use crate::placement::{Replicas, WriteAck};
use crate::skew::{Guard, Offsets, Verdict};
use crate::state::{self};

mod anti_entropy;
mod apply;
mod clock;
mod contact;
mod digests;
mod driver;
#[cfg(test)]
mod drop_report_tests;
mod factors;
mod first;
mod moves;
mod owners;
mod peer;
mod read;
mod render;
mod replicate;
mod sync;
mod tombstones;

use contact::away_too_long;
use peer::Peer;
pub(crate) use read::list_local;

/// Who this node is.
#[derive(Debug, Clone)]
pub struct Identity {
    /// The node id, stamped into versions.
    pub id: u64,
    /// Human name.
    pub name: String,
    /// The address peers and clients use.
    pub addr: String,
}

/// Cluster settings.
#[derive(Debug, Clone)]
pub struct ClusterOptions {
    /// The write concern.
    pub write_ack: WriteAck,
    /// Per-peer request timeout.
    pub timeout: Duration,
    /// The shared secret peers must prove they know (`None`: empty secret).
    pub secret: Option<String>,
    /// The collections this node may own, or `None` for all.
    pub collections: Option<Vec<String>>,
    /// How many members own each collection (`--replicas`).
    pub replicas: Replicas,
    /// Members to join through.
    pub seeds: Vec<String>,
    /// Membership protocol timing.
    pub membership: MembershipConfig,
    /// How often digests are compared with a random peer.
    pub anti_entropy_every: Duration,
    /// Writes kept per peer while it is away; beyond this, anti-entropy
    /// repairs it when it returns.
    pub max_hints: usize,
    /// The bytes of those writes kept per peer (keys, values and a fixed
    /// allowance per write); beyond this too, the oldest are dropped and
    /// anti-entropy repairs the peer when it returns.
    pub max_hint_bytes: usize,
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
    /// Hints (writes kept for a peer that is away) and anti-entropy. Only
    /// the simulation's negative control switches them off, to show that
    /// its checker catches what they repair.
    pub repair: bool,
    /// Whether this node talks to peers at all: not with an auth file and
    /// no cluster secret (it refuses them, and joins no cluster).
    pub takes_peers: bool,
    /// Bytes per second this node sends to move collections (handovers,
    /// the streamed handoff of a newcomer); 0 for no limit. Live writes
    /// are never paced.
    pub move_rate: u64,
}

impl Default for ClusterOptions {
    fn default() -> Self {
        ClusterOptions {
            write_ack: WriteAck::All,
            timeout: Duration::from_millis(500),
            secret: None,
            collections: None,
            replicas: Replicas::All,
            seeds: Vec::new(),
            membership: MembershipConfig::default(),
            anti_entropy_every: Duration::from_secs(2),
            max_hints: 1_000_000,
            max_hint_bytes: 256 << 20,
            max_clock_ahead: Duration::from_secs(60),
            max_frame: dhrt_proto::DEFAULT_MAX_FRAME,
            connector: Arc::new(TcpConnector),
            rng_seed: None,
            state_file: None,
            repair: true,
            takes_peers: true,
            move_rate: DEFAULT_MOVE_RATE,
        }
    }
}

/// Mutations per `Apply` frame, and their bytes: a batch is cut before a
/// mutation would take it past `BATCH_BYTES`; a larger mutation travels
/// alone (the frame limit leaves room for the largest value).
pub(crate) const BATCH_ITEMS: usize = dhrt_proto::MAX_APPLY;
/// The default of [`ClusterOptions::move_rate`]: 64 MiB/s.
pub const DEFAULT_MOVE_RATE: u64 = 64 << 20;

pub(crate) const BATCH_BYTES: usize = 4 << 20;

fn collection_of(m: &Mutation) -> &str {
    match m {
        Mutation::Put { collection, .. } | Mutation::Drop { collection, .. } => collection,
    }
}

/// The key a mutation writes (none for a collection drop).
pub(super) fn key_of(m: &Mutation) -> bytes::Bytes {
    match m {
        Mutation::Put { key, .. } => key.clone(),
        Mutation::Drop { .. } => bytes::Bytes::new(),
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

#[derive(Debug, Default)]
struct SyncProgress {
    running: AtomicBool,
    /// The collections a newcomer's handoff brings, named before they
    /// arrive (`GET /x` there is the collection, not a key of `default`).
    expected: Mutex<std::collections::HashSet<String>>,
    received: AtomicU64,
    total: AtomicU64,
    started: Mutex<Option<Instant>>,
}

/// The cluster side of a node.
pub struct Cluster {
    store: Store,
    identity: Identity,
    options: ClusterOptions,
    dialer: Dialer,
    membership: Mutex<Membership>,
    epoch: Instant,
    peers: Mutex<HashMap<u64, Arc<Peer>>>,
    acks: Notify,
    sync: SyncProgress,
    running: AtomicBool,
    /// Wall-clock ms when this node last had a live, non-syncing peer (or
    /// started, with no history), by its peers' clocks once compared: how
    /// long it was away is measured from it.
    last_contact: AtomicU64,
    /// This node's own clock then, a version timestamp
    /// (`contact::stamp_now`): its records stamped at or before it are the ones the cluster may have deleted
    /// and forgotten while it was away; those after it, it wrote since (a
    /// clock behind its peers' stamps them before `last_contact`).
    contact_stamp: AtomicU64,
    /// When the data this node holds was last in touch with the cluster
    /// (`last_contact` as of its last sync or contact while not syncing;
    /// at start, the `fresh` line of `cluster.state`, 0 if it says
    /// nothing);
    /// `u64::MAX` while it holds none from an earlier life and has not
    /// synced in this one: [`dhrt_proto::PeerReply::Contact`].
    data_contact: AtomicU64,
    /// The last error writing the state file, and when it was logged: a
    /// lasting one (a full disk, a directory in its place) is logged once
    /// a minute, not at every save.
    state_save_error: Mutex<Option<(String, std::time::Instant)>>,
    /// Set while this node's own data cannot be trusted: it was away
    /// longer than the tombstone grace period, so keys deleted meanwhile
    /// may still be here. Reads ask the others; a full re-sync prunes.
    full_resync: AtomicBool,
    /// Whether the absence before this start was judged (`contact.rs`):
    /// until then nothing of this node's own data travels.
    absence_judged: AtomicBool,
    /// The ms (of this node's clock, as `contact_stamp`) up to
    /// which this node's own records may have been deleted elsewhere while it was away longer than the tombstone grace
    /// (0: never away that long in this life). A record at or before it
    /// that a peer lacks is never pushed to that peer (`moves.rs`).
    stale_before: AtomicU64,
    /// `u64::MAX`, or the stamp from which this node was out of touch
    /// before it went on with its own data ([`dhrt_proto::PeerReply::Horizon`]),
    /// until every member has had an anti-entropy round with it since
    /// (`horizon_since`, wall ms).
    horizon: AtomicU64,
    horizon_since: AtomicU64,
    /// The members `cluster.state` named at start (left ones aside): a
    /// horizon stays until each of them is heard from again.
    remembered: Vec<String>,
    /// Whether any other member (left ones aside) is known: kept by
    /// `with_membership`, read on every write without the lock.
    peers_known: AtomicBool,
    /// Whether any other member (left ones aside) pins the collections it
    /// hosts (`--collections`): kept by `with_membership`, so that
    /// [`Cluster::everyone_owns_everything`] needs no lock.
    members_pinned: AtomicBool,
    /// Whether any other member was known at some point in this life (or
    /// there is none to wait for: its only seeds were itself).
    heard_peers: AtomicBool,
    /// Whether every seed it was given turned out to be itself: it runs
    /// as a node started alone.
    seeds_are_itself: AtomicBool,
    /// Whether it knows the members (no seeds, or a join's table merged).
    members_learned: AtomicBool,
    /// How many members it was started with that count as replicas until
    /// one is heard from (`--node`, or those in `cluster.state` that had
    /// not left).
    awaited: usize,
    /// Anti-entropy exchanges completed, when each member's last started
    /// (`tombstones.rs`), and records pulled and pushed.
    ae_rounds: AtomicU64,
    synced: tombstones::Synced,
    ae_pulled: AtomicU64,
    ae_pushed: AtomicU64,
    /// Records from peers refused by the clock guard.
    refused_future: AtomicU64,
    /// Peer connections refused: a failed handshake, a broken frame, no
    /// peer slot left.
    refused_peers: AtomicU64,
    /// Bytes of the answers sent to peers' requests.
    answered: Arc<AtomicU64>,
    /// Keys quarantined here as damaged and not given back yet (shared
    /// with the node, which answers for them).
    damaged: Arc<Damaged>,
    /// The peers' clock offsets, and what they say of this node's clock.
    offsets: Mutex<Offsets>,
    verdict: Mutex<Verdict>,
    /// `verdict.skewed`, read on every client write without the lock.
    skewed: AtomicBool,
    /// The cluster's time as an offset from this node's wall clock, ms
    /// (`skew::cluster_offset`), as last judged.
    cluster_offset: AtomicI64,
    /// The peers' alone, the lower and the upper middle: contact recorded
    /// by the lower, absence by the upper (`contact.rs`).
    peers_offset_low: AtomicI64,
    peers_offset_high: AtomicI64,
    /// Wall minus monotonic clock when the verdict was drawn: a change
    /// since means the wall clock jumped.
    judged_wall_minus_mono: AtomicI64,
    /// Cleared to write: compared with enough peers (`judge_clock`).
    clock_measured: AtomicBool,
    /// Compared with enough peers that the rest could not change the
    /// verdict, whatever it is: their clocks then tell how long this node
    /// was away, its own clock skewed or not.
    peers_compared: AtomicBool,
    /// Whether it said it takes writes with a clock nobody checked.
    unchecked_said: AtomicBool,
    /// Woken each time the clock is judged.
    clock_judged: Notify,
    /// When (ms on the monotonic clock) this node last went from no peer
    /// to some: its clock is unchecked from then until compared.
    peers_since_ms: AtomicU64,
    /// The strictest allowed offset heard, ms (as last judged).
    strictest_offset_ms: AtomicU64,
    /// Replication factors set through the API, as last read, and whether
    /// they changed since (`owners.rs`).
    settings: arc_swap::ArcSwap<owners::Settings>,
    settings_stale: AtomicBool,
    /// Collections this node knows are in the registry (`owners.rs`).
    registered: arc_swap::ArcSwap<std::collections::HashSet<String>>,
    /// Copies being handed over, their progress, and the pace (`moves.rs`).
    moves: moves::Moves,
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
    pub fn new(store: Store, identity: Identity, options: ClusterOptions) -> Arc<Self> {
        let Identity { id, name, addr } = identity.clone();
        let mut options = options;
        let saved = options.state_file.as_deref().and_then(|p| {
            // A file that does not read is as damaged as one without its
            // `seen` line: the node cannot tell how long it was away.
            state::load(p)
                .inspect_err(|e| tracing::warn!("{} is damaged: {e}", p.display()))
                .unwrap_or(Some(state::SavedState::default()))
        });
        let wall_at_start = store.clock().wall_ms();
        let options_max_offset = options.max_clock_ahead.as_millis() as u64;
        let move_rate = options.move_rate;
        let mut last_contact = wall_at_start;
        let mut contact_stamp = contact::stamp_now(store.clock());
        // Data without a state file beside it cannot say how fresh it is.
        let mut data_contact = if store.all_collections().is_empty() {
            u64::MAX
        } else {
            0
        };
        let mut full_resync = false;
        let mut absence_judged = true;
        if saved.is_none()
            && options.state_file.is_some()
            && !options.seeds.is_empty()
            && !store.all_collections().is_empty()
        {
            tracing::warn!(
                "no cluster.state beside this node's data: it cannot tell how long it was away, and takes itself to have been in touch until now (if it was away longer than the tombstone grace period, keys deleted meanwhile come back)"
            );
        }
        // The members this node waits for as replicas until it hears from
        // one: those it was given, or those it remembers that had not left.
        let mut awaited = options.seeds.len();
        let mut horizon = u64::MAX;
        let mut remembered = Vec::new();
        let mut known = Vec::new();
        if let Some(mut saved) = saved {
            known = std::mem::take(&mut saved.known);
            horizon = saved.horizon.unwrap_or(u64::MAX);
            let members: Vec<String> = saved.members.into_iter().filter(|m| *m != addr).collect();
            remembered = members.clone();
            let left: Vec<String> = saved.left.into_iter().filter(|m| *m != addr).collect();
            if options.seeds.is_empty() && !(members.is_empty() && left.is_empty()) {
                tracing::info!(
                    "rejoining through the {} members remembered in cluster.state ({} of them had left)",
                    members.len() + left.len(),
                    left.len()
                );
                awaited = members.len();
                options.seeds = members.into_iter().chain(left).collect();
            }
            last_contact = saved.seen_ms;
            // `seen` goes on while a node syncs: a file of an older version
            // (no `fresh` line) has nothing better to say.
            if data_contact != u64::MAX {
                data_contact = match saved.fresh {
                    Some(fresh) => fresh.unwrap_or(u64::MAX),
                    None => saved.seen_ms,
                };
            }
            // A file of an older version: its peers' time is all it says.
            // A damaged one (no `seen`): nothing it holds is trusted.
            contact_stamp = match (saved.stamp_ms, saved.seen_ms) {
                (_, 0) => store.clock().last(),
                (Some(stamp), _) => stamp,
                (None, ms) => ((ms + 1) << dhrt_storage::LOGICAL_BITS) - 1,
            };
            // What it stamps from now on comes after it, even with its
            // clock behind its peers' (records are stamped by the newest
            // seen when the wall clock is behind it); not if that was ahead
            // of the wall clock by more than the allowed offset (its clock
            // was set back since): it would refuse writes until then.
            if (contact_stamp >> dhrt_storage::LOGICAL_BITS)
                <= wall_at_start.saturating_add(options_max_offset)
            {
                store.clock().observe(contact_stamp);
            }
            if let Some(away) = away_too_long(&store, wall_at_start, saved.seen_ms)
                && !options.seeds.is_empty()
            {
                if saved.seen_ms == 0 {
                    tracing::warn!(
                        "cluster.state says nothing of when this node was last in touch (no `seen` line: damaged, or emptied by a power loss): a full re-sync runs before this node trusts its own data"
                    );
                } else {
                    tracing::warn!(
                        "away from the cluster for {} s, longer than the tombstone grace period ({} s): a full re-sync runs before this node trusts its own data",
                        away / 1000,
                        store.options().tombstone_grace.as_secs()
                    );
                }
                full_resync = true;
            } else if !options.seeds.is_empty() && !store.all_collections().is_empty() {
                // Its clock may have been set back while it was down:
                // judged again once compared with its peers'.
                absence_judged = false;
            }
        }
        let update = MemberUpdate {
            id,
            name,
            addr,
            // Above its earlier lives' while the wall clock moves forward.
            incarnation: store.clock().wall_ms(),
            liveness: Liveness::Alive,
            syncing: !options.seeds.is_empty(),
            collections: options.collections.clone(),
        };
        let members_learned = AtomicBool::new(options.seeds.is_empty());
        if options.repair && !options.seeds.is_empty() {
            store.hold_tombstones_from(0); // Until `tombstones.rs` knows more.
        }
        let seed = options.rng_seed.unwrap_or(id ^ dhrt_storage::wall_ms());
        let mut membership = Membership::new(update, options.membership.clone(), seed);
        // Known again at once, as dead until they answer: their
        // collections stay placed on them (a read of one is unavailable,
        // not "not found") when the whole cluster restarts without one.
        membership.remember(0, known);
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
            identity,
            options,
            membership: Mutex::new(membership),
            epoch: Instant::now(),
            peers: Mutex::new(HashMap::new()),
            acks: Notify::new(),
            sync: SyncProgress::default(),
            running: AtomicBool::new(true),
            last_contact: AtomicU64::new(last_contact),
            contact_stamp: AtomicU64::new(contact_stamp),
            data_contact: AtomicU64::new(data_contact),
            state_save_error: Mutex::new(None),
            full_resync: AtomicBool::new(full_resync),
            absence_judged: AtomicBool::new(absence_judged),
            stale_before: AtomicU64::new(if full_resync { contact_stamp } else { 0 }),
            horizon: AtomicU64::new(horizon),
            horizon_since: AtomicU64::new(wall_at_start),
            remembered,
            peers_known: AtomicBool::new(false),
            members_pinned: AtomicBool::new(false),
            heard_peers: AtomicBool::new(false),
            seeds_are_itself: AtomicBool::new(false),
            members_learned,
            awaited,
            ae_rounds: AtomicU64::new(0),
            synced: Default::default(),
            ae_pulled: AtomicU64::new(0),
            ae_pushed: AtomicU64::new(0),
            refused_future: AtomicU64::new(0),
            refused_peers: AtomicU64::new(0),
            answered: Arc::default(),
            damaged: Arc::default(),
            offsets: Mutex::new(Offsets::default()),
            verdict: Mutex::new(Verdict::default()),
            skewed: AtomicBool::new(false),
            cluster_offset: AtomicI64::new(0),
            peers_offset_low: AtomicI64::new(0),
            peers_offset_high: AtomicI64::new(0),
            judged_wall_minus_mono: AtomicI64::new(wall_at_start as i64),
            clock_measured: AtomicBool::new(false),
            peers_compared: AtomicBool::new(false),
            unchecked_said: AtomicBool::new(false),
            clock_judged: Notify::new(),
            peers_since_ms: AtomicU64::new(0),
            strictest_offset_ms: AtomicU64::new(options_max_offset),
            settings: arc_swap::ArcSwap::from_pointee(owners::Settings::unread()),
            settings_stale: AtomicBool::new(true),
            registered: arc_swap::ArcSwap::from_pointee(std::collections::HashSet::new()),
            moves: moves::Moves::new(move_rate),
        })
    }

    /// A cluster of one: no seeds, no peers until someone joins.
    pub fn single(store: Store, identity: Identity) -> Arc<Self> {
        Cluster::new(store, identity, ClusterOptions::default())
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// This node's wall clock (the store's, which tests may offset).
    fn wall_ms(&self) -> u64 {
        self.store.clock().wall_ms()
    }

    fn guard(&self) -> Guard {
        // The strictest setting heard, as the verdict judges by.
        let max_offset_ms = self.strictest_offset_ms.load(Ordering::Acquire);
        Guard { max_offset_ms }
    }

    /// Who this node is.
    pub fn identity(&self) -> &Identity {
        &self.identity
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

    pub(crate) fn damaged(&self) -> &Arc<Damaged> {
        &self.damaged
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
        let me = self.clone();
        tokio::spawn(async move { me.moves_loop().await });
        let me = self.clone();
        tokio::spawn(async move { me.judge_absence().await });
        if !self.options.seeds.is_empty() {
            let me = self.clone();
            tokio::spawn(async move { me.join().await });
        }
    }

    // ---- membership -------------------------------------------------------

    /// Whether any other member is known (left ones aside).
    pub fn has_peers(&self) -> bool {
        self.peers_known.load(Ordering::Acquire)
    }

    /// Every member, this node included, for stats.
    pub fn members(&self) -> Vec<MemberInfo> {
        let table = self.membership.lock().unwrap().table();
        let offsets = self.offsets.lock().unwrap();
        let (wall, mono) = (self.wall_ms(), self.now_ms());
        table
            .iter()
            .map(|u| MemberInfo {
                id: format!("{:016x}", u.id),
                name: u.name.clone(),
                addr: u.addr.clone(),
                state: member_state(u),
                clock_offset_ms: offsets.of(u.id, wall, mono),
            })
            .collect()
    }

    /// The count of bytes answered to peers (for `/metrics`).
    pub(crate) fn answered(&self) -> Arc<AtomicU64> {
        self.answered.clone()
    }

    /// Counts a refused peer connection (for `/metrics`).
    pub(crate) fn count_refused_peer(&self) {
        self.refused_peers.fetch_add(1, Ordering::Relaxed);
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

    // ---- writes -----------------------------------------------------------

    // ---- reads ------------------------------------------------------------

    // ---- applying what peers send ----------------------------------------

    // ---- handoff, re-sync, anti-entropy ------------------------------------
}
