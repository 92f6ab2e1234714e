//! Engine settings: durability, tombstone grace, limits, compaction policy.

use std::time::Duration;

/// When a write reaches stable storage. In every persisted mode a write is
/// handed to the kernel (`pwrite`) before it is acknowledged, so killing the
/// process never loses an acknowledged write; the modes differ in what a
/// power loss or kernel crash can take.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SyncMode {
    /// `fdatasync` before acknowledging. Concurrent writers share one
    /// `fdatasync` (group commit). Survives power loss.
    Always,
    /// A background thread runs `fdatasync` at this interval (like Redis
    /// `appendfsync everysec`). A power loss takes at most the last interval.
    Interval(Duration),
    /// Never `fdatasync` on its own; the OS writes back when it likes.
    /// [`crate::Store::sync`] still works.
    Never,
}

impl Default for SyncMode {
    fn default() -> Self {
        SyncMode::Interval(Duration::from_secs(1))
    }
}

/// Settings for a [`crate::Store`].
#[derive(Clone, Debug)]
pub struct Options {
    /// Durability, see [`SyncMode`]. Default: `Interval(1 s)`.
    pub sync: SyncMode,
    /// How long a tombstone (of a key or of a whole collection) is kept
    /// before compaction may purge it. It must exceed the longest time a
    /// replica can be away and still catch up incrementally. Default: 24 h.
    pub tombstone_grace: Duration,
    /// The id of this node, stamped into the versions of local writes.
    /// Default: 0.
    pub node_id: u64,
    /// The largest value accepted, in bytes. Default: 16 MiB.
    pub max_value_len: usize,
    /// Compact a collection when superseded records make up more than this
    /// fraction of its file. Default: 0.5.
    pub compaction_garbage_ratio: f64,
    /// Never compact a file smaller than this, in bytes. Default: 4 MiB.
    pub compaction_min_bytes: u64,
    /// Whether a background thread compacts collections by itself.
    /// [`crate::Store::compact`] works either way. Default: true.
    pub background_compaction: bool,
    /// Number of skiplists each collection's index is split into, by key
    /// hash, rounded up to a power of two. More shards make each skiplist
    /// shallower (faster point lookups) and ordered scans dearer. Shards are
    /// allocated on first use. Default: 4096.
    pub index_shards: usize,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            sync: SyncMode::default(),
            tombstone_grace: Duration::from_secs(24 * 3600),
            node_id: 0,
            max_value_len: 16 << 20,
            compaction_garbage_ratio: 0.5,
            compaction_min_bytes: 4 << 20,
            background_compaction: true,
            index_shards: 4096,
        }
    }
}
