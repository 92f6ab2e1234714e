//! Node and cluster statistics: what `GET /` returns as JSON and
//! `dhrt-cli stats` prints. Field names are part of the product (scripts
//! rely on them); see DESIGN §7.

use serde::{Deserialize, Serialize};

/// Statistics of a node and of the cluster as it sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeStats {
    /// This node.
    pub node: NodeInfo,
    /// Each collection this node holds.
    pub collections: Vec<CollectionInfo>,
    /// Every node this node knows, itself included.
    pub members: Vec<MemberInfo>,
    /// Progress of this node's join handoff or re-sync, while it runs.
    pub sync: Option<SyncInfo>,
    /// How this node's clock compares with its peers'.
    pub clock: ClockInfo,
    /// The watches open on this node.
    #[serde(default)]
    pub watch: WatchInfo,
    /// The data directory's disk; `None` for a node in memory.
    #[serde(default)]
    pub disk: Option<DiskInfo>,
}

/// The disk holding a node's data directory.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskInfo {
    /// The disk is full: the node gave up its reserve and refuses new
    /// values (sets, batches, replicated values) until it has room again;
    /// reads, deletes and drops go on.
    pub full: bool,
    /// Bytes free on the disk at the node's last look (every 100 ms).
    pub free_bytes: u64,
}

/// The watches of a node.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WatchInfo {
    /// Watches open now.
    pub watchers: u64,
    /// Events sent since the node started (progress events not counted).
    pub events_sent: u64,
    /// How long the slowest watcher has been behind, in ms (0: every
    /// watcher is caught up).
    pub slowest_lag_ms: u64,
    /// Bytes of log the slowest watcher had left to read at its last read.
    pub slowest_lag_bytes: u64,
}

/// This node's clock against its peers' (measured from their gossip).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClockInfo {
    /// This node's clock is off from its peers' by more than the allowed
    /// offset (or its log holds writes stamped beyond it): it refuses
    /// client writes until that is fixed. Reads go on.
    pub skewed: bool,
    /// How far this node's wall clock is ahead of the cluster's time (the
    /// median of its own and its measured peers' clocks), in ms (negative:
    /// behind); 0 with no peer measured.
    pub ahead_ms: i64,
    /// The largest offset allowed between two nodes' clocks, in ms: the
    /// strictest `--max-clock-offset-ms` among the members.
    pub max_offset_ms: u64,
    /// Why the node is skewed, in a sentence; empty when it is not.
    pub reason: String,
}

/// Progress of a join handoff or re-sync.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncInfo {
    /// Records received so far.
    pub received: u64,
    /// Records expected (what the peers reported when it started).
    pub total: u64,
    /// `received` as a percentage of `total`, 0 to 100.
    pub percent: u64,
    /// Records received per second since it started.
    pub keys_per_s: u64,
}

/// This node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeInfo {
    /// The node id, 16 hex digits.
    pub id: String,
    /// Human name.
    pub name: String,
    /// The address peers and clients use.
    pub addr: String,
    /// The dhrt version.
    pub version: String,
    /// `persisted` or `memory`.
    pub mode: String,
    /// The data directory (empty in memory mode).
    pub data_dir: String,
    /// Seconds since the node started.
    pub uptime_s: u64,
}

/// One collection on this node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CollectionInfo {
    /// Name.
    pub name: String,
    /// Live keys.
    pub keys: u64,
    /// Bytes on disk (or in memory).
    pub bytes: u64,
    /// The anti-entropy digest in one number, 16 hex digits: equal on two
    /// nodes that hold the same entries of this collection (deletes
    /// included), so replicas can be compared at a glance.
    pub digest: String,
    /// Its replication factor: `all`, or how many members own it.
    #[serde(default)]
    pub replicas: String,
    /// The members that own it (node ids, 16 hex digits), best placement
    /// score first; this node's copy may be one being handed over.
    #[serde(default)]
    pub owners: Vec<String>,
    /// Fewer members can own it than its replication factor asks, or an
    /// owner is dead (until it returns or is removed).
    #[serde(default)]
    pub under_replicated: bool,
    /// This node holds a copy it does not own and is handing it over to
    /// the owners (`null` otherwise).
    #[serde(default)]
    pub moving: Option<MoveInfo>,
}

/// A copy on its way to the collection's owners.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MoveInfo {
    /// The owners it goes to (node ids, 16 hex digits).
    pub to: Vec<String>,
    /// Records sent to them so far.
    pub records_sent: u64,
    /// Bytes of those records (keys, values and a fixed allowance each).
    pub bytes_sent: u64,
    /// Seconds since this node began handing it over.
    pub for_s: u64,
    /// Why the handover cannot finish now (an owner down, no owner), if it
    /// cannot.
    pub waiting: Option<String>,
}

/// A member of the cluster as this node sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberInfo {
    /// Node id, 16 hex digits.
    pub id: String,
    /// Human name.
    pub name: String,
    /// Address.
    pub addr: String,
    /// Health.
    pub state: MemberState,
    /// How far this member's clock is ahead of this node's, in ms
    /// (negative: behind), as last measured; `None` for this node itself
    /// and for members not heard from yet.
    pub clock_offset_ms: Option<i64>,
}

/// The health of a member.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MemberState {
    /// Answering.
    Healthy,
    /// A request or probe failed; it may come back.
    Unhealthy,
    /// Failed repeatedly; must re-sync before it serves again.
    Dead,
    /// Left the cluster gracefully.
    Left,
    /// Receiving its handoff.
    Syncing,
}

impl MemberState {
    /// The name used in JSON and logs.
    pub fn as_str(&self) -> &'static str {
        match self {
            MemberState::Healthy => "healthy",
            MemberState::Unhealthy => "unhealthy",
            MemberState::Dead => "dead",
            MemberState::Left => "left",
            MemberState::Syncing => "syncing",
        }
    }
}
