//! A collection's in-memory index: key → where its newest record lives, split
//! by key hash into many shallow skiplists.
//!
//! One skiplist of a million keys is about twenty levels deep, and every
//! level is a cache miss; a few thousand skiplists of a few hundred keys each
//! are a handful of levels, and the top of each stays in cache. Ordered scans
//! merge the shards (see `scan.rs`). Shards are allocated on first insert.
//!
//! Never call `SkipMap::range`: crossbeam-skiplist 0.1.3 leaks every node it
//! visits once that node is overwritten. Walk with `lower_bound` and
//! `Entry::next` instead.

use std::ops::Bound;
use std::sync::OnceLock;

use crossbeam_skiplist::SkipMap;
use crossbeam_skiplist::map::Entry;

use crate::key::Key;
use crate::version::Version;

const TOMBSTONE_BIT: u64 = 1 << 63;

/// Where a key's newest record lives, and its version. 24 bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Slot {
    /// Offset of the record in the log, with [`TOMBSTONE_BIT`] for deletes.
    pos: u64,
    pub(crate) version: Version,
}

impl Slot {
    pub(crate) fn new(offset: u64, tombstone: bool, version: Version) -> Self {
        let pos = if tombstone {
            offset | TOMBSTONE_BIT
        } else {
            offset
        };
        Slot { pos, version }
    }

    #[inline]
    pub(crate) fn offset(&self) -> u64 {
        self.pos & !TOMBSTONE_BIT
    }

    #[inline]
    pub(crate) fn is_tombstone(&self) -> bool {
        self.pos & TOMBSTONE_BIT != 0
    }
}

pub(crate) type Shard = SkipMap<Key, Slot>;

/// The sharded index of one collection generation.
pub(crate) struct Index {
    shards: Box<[OnceLock<Box<Shard>>]>,
    /// log2 of the number of shards.
    bits: u32,
}

impl std::fmt::Debug for Index {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Index")
            .field("shards", &self.shards.len())
            .finish()
    }
}

impl Index {
    /// An empty index of `shards` skiplists (rounded up to a power of two).
    pub(crate) fn new(shards: usize) -> Self {
        let n = shards.clamp(1, 1 << 20).next_power_of_two();
        Index {
            shards: (0..n).map(|_| OnceLock::new()).collect(),
            bits: n.trailing_zeros(),
        }
    }

    #[inline]
    fn shard_index(&self, key: &[u8]) -> usize {
        if self.bits == 0 {
            0
        } else {
            (xxhash_rust::xxh3::xxh3_64(key) >> (64 - self.bits)) as usize
        }
    }

    #[inline]
    fn shard(&self, key: &[u8]) -> Option<&Shard> {
        self.shards[self.shard_index(key)].get().map(|b| &**b)
    }

    fn shard_or_create(&self, key: &[u8]) -> &Shard {
        self.shards[self.shard_index(key)].get_or_init(|| Box::new(SkipMap::new()))
    }

    #[inline]
    pub(crate) fn get(&self, key: &[u8]) -> Option<Slot> {
        self.shard(key)?.get(key).map(|e| *e.value())
    }

    /// Inserts or replaces. Callers serialize writes to one index.
    pub(crate) fn insert(&self, key: &[u8], slot: Slot) {
        self.shard_or_create(key).insert(Key::new(key), slot);
    }

    pub(crate) fn remove(&self, key: &[u8]) {
        if let Some(shard) = self.shard(key) {
            shard.remove(key);
        }
    }

    /// The allocated shards, in shard order.
    pub(crate) fn shards(&self) -> impl Iterator<Item = &Shard> {
        self.shards.iter().filter_map(|s| s.get().map(|b| &**b))
    }

    /// The first entry of `shard` after `after` (or its first entry).
    pub(crate) fn seek<'a>(shard: &'a Shard, after: Option<&[u8]>) -> Option<Entry<'a, Key, Slot>> {
        match after {
            Some(k) => shard.lower_bound(Bound::Excluded(k)),
            None => shard.front(),
        }
    }

    /// Calls `f` for every entry, shard by shard (not in key order).
    pub(crate) fn for_each(&self, mut f: impl FnMut(&Key, &Slot)) {
        for shard in self.shards() {
            let mut cursor = shard.front();
            while let Some(e) = cursor {
                f(e.key(), e.value());
                cursor = e.next();
            }
        }
    }
}
