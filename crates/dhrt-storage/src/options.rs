//! Engine settings: durability, tombstone grace, limits, compaction policy.

use std::time::Duration;

/// When a write reaches stable storage. In every persisted mode a write is
/// in the kernel's page cache (`pwrite`n into the file) before it is
/// acknowledged, so killing the process never loses
/// an acknowledged write; the modes differ in what a power loss or kernel
/// crash can take.
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
    /// Keys per index shard the index aims for. A collection's index is
    /// split by key hash into many small sorted arrays, so each lookup
    /// searches a short one; when a collection averages more than twice
    /// this many keys per shard, a background rebuild gives it more shards.
    /// Fewer keys per shard: faster writes of new keys, more memory.
    /// Default: 16.
    pub keys_per_shard: usize,
    /// The fewest shards an index has (a power of two). Default: 16.
    pub min_index_shards: usize,
    /// Keys an index shard keeps in one sorted array. A shard given more
    /// becomes a skiplist for good: lookups take a few more cache misses,
    /// and adding a key no longer copies the shard. Only a collection past
    /// about 2^20 × this many keys, or keys crafted to share a hash prefix,
    /// reach it. Default: 256.
    pub shard_array_max: usize,
    /// The most a compaction's bounded step under the writer lock may
    /// catch up once its steps of `LOCKED_CATCH_UP_BYTES` stopped gaining
    /// on writers that outrun them (see `compact::Steps`): the longest a
    /// writer waits then. Default: 16 MiB.
    pub rebuild_step_max: u64,
    /// Shifts this store's wall clock by this many ms (fault injection: a
    /// node whose clock is ahead or behind). Default: 0.
    pub clock_offset_ms: i64,
    /// The most collections this store creates (names starting with `_`,
    /// the node's own, are not counted). Each one keeps two files open, so
    /// a store that created more than its process's open-files limit
    /// allows could not be opened again. Default: no limit.
    pub max_collections: usize,
    /// Bytes of the data directory's disk kept in reserve (a file,
    /// `RESERVE`) and given up when the disk fills, so that deletes, drops
    /// and compaction still have room: see [`crate::Error::DiskFull`].
    /// `None`: 1% of the file system, at least 1 MiB, at most 64 MiB.
    /// `Some(0)`: no reserve (a full disk then refuses every write, deletes
    /// included, until space is freed by other means). Default: `None`.
    pub disk_reserve: Option<u64>,
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
            keys_per_shard: 16,
            min_index_shards: 16,
            shard_array_max: 256,
            rebuild_step_max: 16 << 20,
            clock_offset_ms: 0,
            max_collections: usize::MAX,
            disk_reserve: None,
        }
    }
}

impl Options {
    /// The shard count for an index expected to hold `keys` keys.
    pub(crate) fn shards_for(&self, keys: u64) -> usize {
        let per = self.keys_per_shard.max(1) as u64;
        ((keys / per) as usize)
            .max(self.min_index_shards)
            .clamp(1, 1 << 20)
            .next_power_of_two()
    }
}
