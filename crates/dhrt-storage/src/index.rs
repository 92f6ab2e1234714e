//! A collection's in-memory index: key → where its newest record lives, split
//! by key hash into many shallow skiplists.
//!
//! One skiplist of a million keys is about twenty levels deep, and every
//! level is a cache miss; a few thousand skiplists of a few hundred keys each
//! are a handful of levels, and the top of each stays in cache. Ordered scans
//! merge the shards (see `scan.rs`). The shards' headers sit inline in one
//! array (no pointer to chase per lookup); since a collection's shard count
//! follows its key count, nearly every shard is in use.
//!
//! Never call `SkipMap::range`: crossbeam-skiplist 0.1.3 leaks every node it
//! visits once that node is overwritten. Walk with `lower_bound` and
//! `Entry::next` instead.

use std::cell::Cell;
use std::collections::HashMap;
use std::ops::Bound;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use crossbeam_epoch::{self as epoch, Guard};
use crossbeam_skiplist::base::{self, SkipList};

use crate::key::Key;
use crate::version::Version;

/// Offsets are below 2^47 (128 TiB); bit 47 marks a tombstone; the top 16
/// bits hold the writer's node id, interned (see [`node_index`]).
const OFFSET_BITS: u32 = 47;
const OFFSET_MASK: u64 = (1 << OFFSET_BITS) - 1;
const TOMBSTONE_BIT: u64 = 1 << OFFSET_BITS;
const NODE_SHIFT: u32 = 48;

/// The node ids this process has seen, in order of first sight: a slot keeps
/// a 16-bit index into this table instead of the 64-bit id, which keeps
/// slots at 16 bytes. Append-only; reads take no lock.
const MAX_NODES: usize = 1 << 16;
static NODE_IDS: [AtomicU64; MAX_NODES] = [const { AtomicU64::new(0) }; MAX_NODES];
static NODE_INTERN: Mutex<Option<HashMap<u64, u16>>> = Mutex::new(None);

thread_local! {
    static LAST_NODE: Cell<Option<(u64, u16)>> = const { Cell::new(None) };
}

/// The index of node id `node` in the process-wide table.
fn node_index(node: u64) -> u16 {
    if let Some((id, idx)) = LAST_NODE.get()
        && id == node
    {
        return idx;
    }
    let mut guard = NODE_INTERN.lock().unwrap();
    let map = guard.get_or_insert_with(HashMap::new);
    let next = map.len();
    let idx = *map.entry(node).or_insert_with(|| {
        assert!(
            next < MAX_NODES,
            "more than {MAX_NODES} distinct node ids in one process"
        );
        NODE_IDS[next].store(node, Ordering::Release);
        next as u16
    });
    LAST_NODE.set(Some((node, idx)));
    idx
}

/// Where a key's newest record lives, and its version. 16 bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Slot {
    ts: u64,
    /// Offset, tombstone bit and interned node id.
    pos: u64,
}

impl Slot {
    pub(crate) fn new(offset: u64, tombstone: bool, version: Version) -> Self {
        debug_assert!(offset <= OFFSET_MASK);
        let mut pos = offset | (u64::from(node_index(version.node)) << NODE_SHIFT);
        if tombstone {
            pos |= TOMBSTONE_BIT;
        }
        Slot {
            ts: version.ts,
            pos,
        }
    }

    #[inline]
    pub(crate) fn offset(&self) -> u64 {
        self.pos & OFFSET_MASK
    }

    #[inline]
    pub(crate) fn is_tombstone(&self) -> bool {
        self.pos & TOMBSTONE_BIT != 0
    }

    #[inline]
    pub(crate) fn version(&self) -> Version {
        let node = NODE_IDS[(self.pos >> NODE_SHIFT) as usize].load(Ordering::Acquire);
        Version::new(self.ts, node)
    }
}

const _: () = assert!(std::mem::size_of::<Slot>() == 16);

/// One skiplist of the index. The base API is used so that a lookup pins the
/// epoch once and takes no reference count on the node it finds.
pub(crate) type Shard = SkipList<Key, Slot>;

/// A cursor into a shard, valid while its guard is pinned.
pub(crate) type Cursor<'a, 'g> = base::Entry<'a, 'g, Key, Slot>;

/// Bits of the key hash that order hash-ordered listings; shard numbers are
/// prefixes of it, so the order does not change when the index reshards.
pub(crate) const ORDER_BITS: u32 = 20;

/// The top [`ORDER_BITS`] of the key's xxh3 hash.
#[inline]
pub(crate) fn order_hash(key: &[u8]) -> u64 {
    xxhash_rust::xxh3::xxh3_64(key) >> (64 - ORDER_BITS)
}

/// The shard, among `1 << bits`, of a key with this order hash.
#[inline]
pub(crate) fn shard_of(order_hash: u64, bits: u32) -> usize {
    (order_hash >> (ORDER_BITS - bits)) as usize
}

/// log2 of the number of anti-entropy digest buckets per collection.
pub const DIGEST_BITS: u32 = 10;
/// Number of anti-entropy digest buckets per collection.
pub const DIGEST_BUCKETS: usize = 1 << DIGEST_BITS;

/// The digest bucket of a key: a prefix of the hash that orders listings, so a bucket's
/// keys are one contiguous stretch of a hash-ordered listing.
#[inline]
pub fn digest_bucket(key: &[u8]) -> usize {
    (order_hash(key) >> (ORDER_BITS - DIGEST_BITS)) as usize
}

/// What one entry contributes to its bucket's digest: a hash of the key, its
/// version and whether it is a tombstone. Buckets XOR these, so the digest
/// of a set of entries does not depend on the order they arrived in.
#[inline]
fn entry_hash(key: &[u8], slot: &Slot) -> u64 {
    let v = slot.version();
    let seed = v.ts.wrapping_mul(0x9E37_79B9_7F4A_7C15)
        ^ v.node.rotate_left(32)
        ^ u64::from(slot.is_tombstone());
    xxhash_rust::xxh3::xxh3_64_with_seed(key, seed)
}

/// What [`Index::upsert`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Upsert {
    /// The key was not there.
    Inserted,
    /// The key was there with this older slot, now replaced.
    Replaced(Slot),
    /// The key is there with this slot, of an equal or newer version; kept.
    Kept(Slot),
}

/// The sharded index of one collection generation.
pub(crate) struct Index {
    /// Inline, not boxed: a lookup goes straight from the hash to the
    /// skiplist's header without another pointer to chase.
    shards: Box<[Shard]>,
    /// log2 of the number of shards.
    bits: u32,
    /// Per digest bucket, the XOR of [`entry_hash`] over the entries in it.
    /// Atomic because the parallel replay of recovery may update one bucket
    /// from two shards' threads; writers are otherwise serialized.
    digest: Box<[AtomicU64]>,
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
        let n = shards.clamp(1, 1 << ORDER_BITS).next_power_of_two();
        Index {
            shards: (0..n)
                .map(|_| SkipList::new(epoch::default_collector().clone()))
                .collect(),
            bits: n.trailing_zeros(),
            digest: (0..DIGEST_BUCKETS).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    /// The digest of every bucket.
    pub(crate) fn digest(&self) -> Vec<u64> {
        self.digest
            .iter()
            .map(|b| b.load(Ordering::Relaxed))
            .collect()
    }

    #[inline]
    fn toggle(&self, key: &[u8], slot: &Slot) {
        self.digest[digest_bucket(key)].fetch_xor(entry_hash(key, slot), Ordering::Relaxed);
    }

    /// Number of shards.
    pub(crate) fn shard_count(&self) -> usize {
        self.shards.len()
    }

    /// log2 of the number of shards.
    pub(crate) fn bits(&self) -> u32 {
        self.bits
    }

    /// Shard `i`, if there is one. Shard numbers are prefixes of the keys'
    /// [`order_hash`].
    pub(crate) fn shard_at(&self, i: usize) -> Option<&Shard> {
        self.shards.get(i)
    }

    #[inline]
    fn shard_index(&self, key: &[u8]) -> usize {
        shard_of(order_hash(key), self.bits)
    }

    #[inline]
    fn shard(&self, key: &[u8]) -> Option<&Shard> {
        Some(&self.shards[self.shard_index(key)])
    }

    fn shard_or_create(&self, key: &[u8]) -> &Shard {
        &self.shards[self.shard_index(key)]
    }

    #[inline]
    pub(crate) fn get(&self, key: &[u8]) -> Option<Slot> {
        let shard = self.shard(key)?;
        let guard = &epoch::pin();
        shard.get(key, guard).map(|e| *e.value())
    }

    /// Inserts a key that is not in the index (building a fresh index).
    /// Callers serialize writes to one index.
    pub(crate) fn insert(&self, key: &[u8], slot: Slot) {
        self.toggle(key, &slot);
        let guard = &epoch::pin();
        self.shard_or_create(key)
            .insert(Key::new(key), slot, guard)
            .release(guard);
    }

    /// Inserts `slot` unless the key holds an equal or newer version, in one
    /// search. Callers serialize writes to one index.
    pub(crate) fn upsert(&self, key: &[u8], slot: Slot) -> Upsert {
        let version = slot.version();
        let old = Cell::new(None);
        let guard = &epoch::pin();
        let entry = self.shard_or_create(key).compare_insert(
            Key::new(key),
            slot,
            |o| {
                old.set(Some(*o));
                o.version() < version
            },
            guard,
        );
        let now = *entry.value();
        entry.release(guard);
        match old.get() {
            None => {
                self.toggle(key, &slot);
                Upsert::Inserted
            }
            Some(o) if now == slot => {
                self.toggle(key, &o);
                self.toggle(key, &slot);
                Upsert::Replaced(o)
            }
            Some(_) => Upsert::Kept(now),
        }
    }

    pub(crate) fn remove(&self, key: &[u8]) {
        if let Some(shard) = self.shard(key) {
            let guard = &epoch::pin();
            if let Some(e) = shard.remove(key, guard) {
                self.toggle(key, e.value());
                e.release(guard);
            }
        }
    }

    /// The shards, in shard order.
    pub(crate) fn shards(&self) -> impl Iterator<Item = &Shard> {
        self.shards.iter()
    }

    /// The first entry of `shard` after `after` (or its first entry).
    pub(crate) fn seek<'a: 'g, 'g>(
        shard: &'a Shard,
        after: Option<&[u8]>,
        guard: &'g Guard,
    ) -> Option<Cursor<'a, 'g>> {
        match after {
            Some(k) => shard.lower_bound(Bound::Excluded(k), guard),
            None => shard.front(guard),
        }
    }

    /// Calls `f` for every entry, shard by shard (not in key order). The
    /// epoch is re-pinned between shards so a long walk does not hold back
    /// memory reclamation.
    pub(crate) fn for_each(&self, mut f: impl FnMut(&Key, &Slot)) {
        for shard in self.shards() {
            let guard = &epoch::pin();
            let mut cursor = shard.front(guard);
            while let Some(e) = cursor {
                f(e.key(), e.value());
                cursor = e.next();
            }
        }
    }
}
