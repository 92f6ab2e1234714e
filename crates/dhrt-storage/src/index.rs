//! A collection's in-memory index: key → where its newest record lives, split
//! by key hash into many small shards.
//!
//! Each shard is a sorted array of a handful of entries (see `shard.rs`):
//! a lookup hashes the key, loads one pointer and binary-searches adjacent
//! cache lines. The shards' pointers sit in one array (8 bytes per shard);
//! since a collection's shard count follows its key count, nearly every
//! shard is in use. Ordered scans merge the shards (see `scan.rs`).
//!
//! A fresh index (recovery, compaction, resharding) is filled through a
//! [`Builder`], which owns its shards' entries outright and grows them in
//! place; only the live index pays a copy per key added.

use std::cell::Cell;
use std::collections::HashMap;
use std::ops::{Bound, Range};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering, fence};

use crossbeam_epoch::{self as epoch, Guard};

use crate::key::{Key, compare};
pub(crate) use crate::shard::{Cursor, ShardRef};
use crate::shard::{Entry, Shard, Spill};
use crate::version::Version;

/// Offsets are below 2^46 (64 TiB); bit 46 marks a slot being rewritten in
/// place (see [`AtomicSlot`]); bit 47 marks a tombstone; the top 16 bits
/// hold the writer's node id, interned (see [`node_index`]).
pub(crate) const OFFSET_BITS: u32 = 46;
const OFFSET_MASK: u64 = (1 << OFFSET_BITS) - 1;
const BUSY_BIT: u64 = 1 << OFFSET_BITS;
const TOMBSTONE_BIT: u64 = 1 << 47;
const NODE_SHIFT: u32 = 48;

/// The node ids this process has seen, in order of first sight: a slot keeps
/// a 16-bit index into this table instead of the 64-bit id, which keeps
/// slots at 24 bytes. Append-only; reads take no lock.
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

/// How many node ids this process has interned.
#[cfg(test)]
pub(crate) fn interned_nodes() -> usize {
    NODE_INTERN.lock().unwrap().as_ref().map_or(0, HashMap::len)
}

/// Where a key's newest record lives, its version, and the record's CRC
/// and value length. 24 bytes.
///
/// The CRC and length are what an overwrite needs of the record it
/// replaces (the digest XORs the old entry out, the garbage count adds its
/// length): kept here, an overwrite never reads the log. Read from the log,
/// they cost a random read of an old record under the writer lock, which
/// on a large log, parts of it no longer cached, was a disk read: the first
/// batches of a 10M-key random load took 25-44 ms, 102 major faults in its
/// first million SETs; with these 8 bytes, none and 9 ms
/// (docs/benchmarks.md, session 16).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Slot {
    ts: u64,
    /// Offset, tombstone bit and interned node id.
    pos: u64,
    /// The record's CRC (high 32 bits) and value length (low 32 bits).
    meta: u64,
}

impl Slot {
    pub(crate) fn new(
        offset: u64,
        tombstone: bool,
        version: Version,
        crc: u32,
        value_len: u32,
    ) -> Self {
        debug_assert!(offset <= OFFSET_MASK);
        let mut pos = offset | (u64::from(node_index(version.node)) << NODE_SHIFT);
        if tombstone {
            pos |= TOMBSTONE_BIT;
        }
        Slot {
            ts: version.ts,
            pos,
            meta: u64::from(crc) << 32 | u64::from(value_len),
        }
    }

    /// The CRC of the record, as stored in its first 4 bytes.
    #[inline]
    pub(crate) fn crc(&self) -> u32 {
        (self.meta >> 32) as u32
    }

    /// The length of the record's value (0 for a tombstone).
    #[inline]
    pub(crate) fn value_len(&self) -> u32 {
        self.meta as u32
    }

    /// The length of the whole record, whose key is `key_len` bytes.
    #[inline]
    pub(crate) fn record_len(&self, key_len: usize) -> u64 {
        (crate::record::RECORD_HEADER_LEN + key_len) as u64 + u64::from(self.value_len())
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

const _: () = assert!(std::mem::size_of::<Slot>() == 24);

/// A [`Slot`] that a writer rewrites in place while readers read it, so
/// overwriting a key changes 24 bytes in its index entry instead of
/// publishing a new entry and retiring the old one (an allocation, a free
/// and epoch bookkeeping per write).
///
/// A seqlock whose sequence is the position word: a writer first sets
/// [`BUSY_BIT`] in the old position, then stores the timestamp and the
/// CRC and length, then the new position. A reader retries while the bit is set or the position changed
/// under it. Positions never repeat (every record has its own offset in an
/// append-only log), so an unchanged position means an untorn slot. Writers
/// of one index are serialized by its callers.
pub(crate) struct AtomicSlot {
    ts: AtomicU64,
    pos: AtomicU64,
    meta: AtomicU64,
}

const _: () = assert!(std::mem::size_of::<AtomicSlot>() == 24);

impl AtomicSlot {
    pub(crate) fn new(slot: Slot) -> Self {
        AtomicSlot {
            ts: AtomicU64::new(slot.ts),
            pos: AtomicU64::new(slot.pos),
            meta: AtomicU64::new(slot.meta),
        }
    }

    /// The slot, never torn.
    #[inline]
    pub(crate) fn load(&self) -> Slot {
        loop {
            let pos = self.pos.load(Ordering::Acquire);
            if pos & BUSY_BIT == 0 {
                let ts = self.ts.load(Ordering::Relaxed);
                let meta = self.meta.load(Ordering::Relaxed);
                fence(Ordering::Acquire);
                if self.pos.load(Ordering::Relaxed) == pos {
                    return Slot { ts, pos, meta };
                }
            }
            std::hint::spin_loop();
        }
    }

    /// Replaces the slot. Only one writer at a time.
    pub(crate) fn store(&self, slot: Slot) {
        let old = self.pos.load(Ordering::Relaxed);
        debug_assert_ne!(old, slot.pos, "positions never repeat");
        self.pos.store(old | BUSY_BIT, Ordering::Relaxed);
        fence(Ordering::Release);
        self.ts.store(slot.ts, Ordering::Relaxed);
        self.meta.store(slot.meta, Ordering::Relaxed);
        self.pos.store(slot.pos, Ordering::Release);
    }
}

impl std::fmt::Debug for AtomicSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.load().fmt(f)
    }
}

/// Bits of the key hash that order hash-ordered listings; shard numbers are
/// prefixes of it, so the order does not change when the index reshards.
pub(crate) const ORDER_BITS: u32 = 20;

/// The top 20 bits (`ORDER_BITS`) of the key's xxh3 hash: listings are in order
/// of `(order_hash(key), key)`, so pages from several stores merge.
#[inline]
pub fn order_hash(key: &[u8]) -> u64 {
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
    digest_bucket_of(order_hash(key))
}

/// [`digest_bucket`] of a key whose order hash is known.
#[inline]
fn digest_bucket_of(order_hash: u64) -> usize {
    (order_hash >> (ORDER_BITS - DIGEST_BITS)) as usize
}

/// What one entry contributes to its bucket's digest: a hash of the key, its
/// version, whether it is a tombstone, and its record's CRC, which covers
/// the value (so replicas holding different bytes under one version
/// differ). Buckets XOR these, so the digest of a set of entries does not
/// depend on the order they arrived in.
#[inline]
fn entry_hash(key: &[u8], slot: &Slot) -> u64 {
    let v = slot.version();
    let crc = slot.crc();
    let seed = v.ts.wrapping_mul(0x9E37_79B9_7F4A_7C15)
        ^ v.node.rotate_left(32)
        ^ u64::from(slot.is_tombstone())
        ^ (u64::from(crc) << 1).wrapping_mul(0xC2B2_AE3D_27D4_EB4F);
    xxhash_rust::xxh3::xxh3_64_with_seed(key, seed)
}

/// Whether a record with version `new` and CRC `new_crc` wins over one
/// with `old` and `old_crc`: the greater version, and at equal versions the
/// greater CRC (equal CRCs: the same record). Deterministic, so replicas
/// that got different bytes under one version converge.
#[inline]
pub(crate) fn wins(
    new: Version,
    new_crc: u32,
    old: Version,
    old_crc: impl FnOnce() -> u32,
) -> bool {
    new > old || (new == old && new_crc > old_crc())
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
    /// One pointer per shard: a lookup goes from the hash to the shard's
    /// array through it.
    shards: Box<[Shard]>,
    /// Per shard, where its entries go if it outgrows an array (cold).
    spills: Box<[Spill]>,
    /// log2 of the number of shards.
    bits: u32,
    /// Keys a shard holds in one array before it becomes a skiplist.
    array_max: usize,
    /// Per digest bucket, the XOR of [`entry_hash`] over the entries in it.
    /// Atomic for readers of the digest; writers are serialized.
    digest: Box<[AtomicU64]>,
}

impl std::fmt::Debug for Index {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Index")
            .field("shards", &self.shards.len())
            .finish()
    }
}

/// `shards` rounded to the power of two an index has.
pub(crate) fn shard_bits(shards: usize) -> u32 {
    shards
        .clamp(1, 1 << ORDER_BITS)
        .next_power_of_two()
        .trailing_zeros()
}

impl Index {
    /// An empty index of `shards` shards (rounded up to a power of two)
    /// whose shards hold up to `array_max` keys in one array.
    pub(crate) fn new(shards: usize, array_max: usize) -> Self {
        Builder::new(shards, array_max).finish()
    }

    /// Frees the index shard by shard, pausing after every few thousand
    /// entries (see `collection::retire`).
    pub(crate) fn free_gradually(self) {
        const ENTRIES_BETWEEN_PAUSES: usize = 4096;
        let mut freed = 0;
        for (hot, cold) in self
            .shards
            .into_vec()
            .into_iter()
            .zip(self.spills.into_vec())
        {
            freed += ShardRef {
                hot: &hot,
                cold: &cold,
            }
            .len();
            drop((hot, cold));
            if freed >= ENTRIES_BETWEEN_PAUSES {
                freed = 0;
                std::thread::sleep(std::time::Duration::from_micros(100));
            }
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

    /// Sets this index's digest to `other`'s. For a reshard's swap, under
    /// the writer lock, once this index holds exactly `other`'s entries.
    pub(crate) fn take_digest_of(&self, other: &Index) {
        for (mine, theirs) in self.digest.iter().zip(&other.digest) {
            mine.store(theirs.load(Ordering::Relaxed), Ordering::Relaxed);
        }
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
    pub(crate) fn shard_at(&self, i: usize) -> Option<ShardRef<'_>> {
        Some(ShardRef {
            hot: self.shards.get(i)?,
            cold: &self.spills[i],
        })
    }

    #[inline(always)]
    fn shard(&self, key: &[u8]) -> ShardRef<'_> {
        let i = shard_of(order_hash(key), self.bits);
        ShardRef {
            hot: &self.shards[i],
            cold: &self.spills[i],
        }
    }

    #[inline(always)]
    pub(crate) fn get(&self, key: &[u8]) -> Option<Slot> {
        self.shard(key).get(key, &epoch::pin())
    }

    /// Reads the memory an upsert of each of `keys` reads first (its
    /// shard's word and the middle of its array), without a search.
    pub(crate) fn touch<'k>(&self, keys: impl Iterator<Item = &'k [u8]>) {
        let guard = &epoch::pin();
        for key in keys {
            self.shard(key).touch(guard);
        }
    }

    /// Inserts `slot` unless the key holds a record that [`wins`] over it.
    /// An existing key is updated in place (no allocation); a new one gives
    /// its shard a new array. Reads nothing of the log. Callers serialize
    /// writes to one index.
    pub(crate) fn upsert(&self, key: &[u8], slot: Slot) -> Upsert {
        let upsert = self.shard(key).upsert(
            key,
            slot,
            |old| matches!(decide(Some(old), slot), Upsert::Replaced(_)),
            self.array_max,
            &epoch::pin(),
        );
        account(upsert, slot, |s| self.toggle(key, s));
        upsert
    }

    /// Removes `key`.
    pub(crate) fn remove(&self, key: &[u8]) {
        if let Some(slot) = self.shard(key).remove(key, &epoch::pin()) {
            self.toggle(key, &slot);
        }
    }

    /// Removes `key`, whose record may be damaged, and recomputes the
    /// digest of its bucket from the remaining entries (a damaged index, not
    /// only a damaged record, is not trusted to XOR it out). Callers
    /// serialize writes to one index.
    pub(crate) fn remove_damaged(&self, key: &[u8]) {
        let guard = &epoch::pin();
        self.shard(key).remove(key, guard);
        let bucket = digest_bucket(key);
        let shift = ORDER_BITS - DIGEST_BITS;
        let first = shard_of((bucket as u64) << shift, self.bits);
        let last = shard_of((((bucket as u64) + 1) << shift) - 1, self.bits);
        let mut hash = 0;
        for shard in (first..=last).filter_map(|i| self.shard_at(i)) {
            let mut cursor = shard.front(guard);
            while let Some(e) = cursor {
                let k = e.key().as_bytes();
                if digest_bucket(k) == bucket {
                    let slot = e.value().load();
                    hash ^= entry_hash(k, &slot);
                }
                cursor = e.next();
            }
        }
        self.digest[bucket].store(hash, Ordering::Relaxed);
    }

    /// The shards, in shard order.
    pub(crate) fn shards(&self) -> impl Iterator<Item = ShardRef<'_>> {
        self.shards
            .iter()
            .zip(self.spills.iter())
            .map(|(hot, cold)| ShardRef { hot, cold })
    }

    /// The first entry of `shard` after `after` (or its first entry).
    pub(crate) fn seek<'a: 'g, 'g>(
        shard: ShardRef<'a>,
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
                f(e.key(), &e.value().load());
                cursor = e.next();
            }
        }
    }
}

/// Fills a fresh index, or a range of its shards, before anyone reads it:
/// it owns the entries outright and grows each shard's array in place.
/// [`Builder::finish`] (or [`Index::from_parts`] for several builders of
/// disjoint ranges) turns it into an [`Index`].
pub(crate) struct Builder {
    bits: u32,
    array_max: usize,
    /// The shards this builder fills.
    range: Range<usize>,
    shards: Vec<Vec<Entry>>,
    /// XOR per digest bucket, as [`Index`] keeps it.
    digest: Vec<u64>,
}

impl Builder {
    /// A builder of a whole index of `shards` shards (rounded up to a
    /// power of two) whose shards hold up to `array_max` keys in one array.
    pub(crate) fn new(shards: usize, array_max: usize) -> Self {
        let bits = shard_bits(shards);
        Builder::part(bits, 0..1 << bits, array_max)
    }

    /// A builder of shards `range` of an index of `1 << bits` shards.
    pub(crate) fn part(bits: u32, range: Range<usize>, array_max: usize) -> Self {
        Builder {
            bits,
            array_max,
            shards: range.clone().map(|_| Vec::new()).collect(),
            range,
            digest: vec![0; DIGEST_BUCKETS],
        }
    }

    #[inline]
    fn toggle(&mut self, key: &[u8], slot: &Slot) {
        self.digest[digest_bucket(key)] ^= entry_hash(key, slot);
    }

    #[inline]
    fn shard(&mut self, key: &[u8]) -> &mut Vec<Entry> {
        let i = shard_of(order_hash(key), self.bits);
        assert!(
            self.range.contains(&i),
            "a key of shard {i} given to the builder of {:?}",
            self.range
        );
        &mut self.shards[i - self.range.start]
    }

    /// Inserts a key that is not in the index yet.
    ///
    /// Pushed, not inserted in place: [`Builder::seal`] sorts each shard
    /// (already sorted when keys arrive in order, as a reshard's do), so
    /// filling a shard of n keys costs n log n, never n² (compaction's keys
    /// arrive in log order, and a shard may hold many).
    pub(crate) fn insert(&mut self, key: &[u8], slot: Slot) {
        self.insert_undigested(key, slot);
        self.toggle(key, &slot);
    }

    /// [`insert`](Self::insert) without the digest: for a reshard, which
    /// takes the live index's digest at its swap (the two indexes then hold
    /// the same entries) instead of reading every record's CRC back from
    /// the log, a random read of the whole log (1,188 ms instead of
    /// 2.5 s for 8M keys).
    pub(crate) fn insert_undigested(&mut self, key: &[u8], slot: Slot) {
        self.shard(key).push(Entry {
            key: Key::new(key),
            slot: AtomicSlot::new(slot),
        });
    }

    /// The shards built, ready to read (each array exactly as long as its
    /// entries, or a skiplist).
    pub(crate) fn seal(self) -> Part {
        let mut shards = Vec::with_capacity(self.shards.len());
        let mut spills = Vec::with_capacity(self.shards.len());
        for mut entries in self.shards {
            entries.sort_unstable_by(|a, b| compare(a.key.as_bytes(), b.key.as_bytes()));
            assert!(
                entries
                    .windows(2)
                    .all(|w| w[0].key.as_bytes() != w[1].key.as_bytes()),
                "Builder::insert of a key already there"
            );
            let (hot, cold) = crate::shard::from_sorted(&mut entries, self.array_max);
            shards.push(hot);
            spills.push(cold);
        }
        Part {
            bits: self.bits,
            range: self.range,
            array_max: self.array_max,
            shards,
            spills,
            digest: self.digest,
        }
    }

    /// The index.
    pub(crate) fn finish(self) -> Index {
        Index::from_parts(vec![self.seal()])
    }
}

/// What an upsert of `slot` does to a key holding `old`: the one rule the
/// live index and its builders follow.
fn decide(old: Option<Slot>, slot: Slot) -> Upsert {
    match old {
        None => Upsert::Inserted,
        Some(old) if wins(slot.version(), slot.crc(), old.version(), || old.crc()) => {
            Upsert::Replaced(old)
        }
        Some(old) => Upsert::Kept(old),
    }
}

/// Keeps a digest in step with `upsert` of `slot`: `toggle` XORs one
/// entry's hash into its bucket.
fn account(upsert: Upsert, slot: Slot, mut toggle: impl FnMut(&Slot)) {
    match upsert {
        Upsert::Inserted => toggle(&slot),
        Upsert::Replaced(old) => {
            toggle(&old);
            toggle(&slot);
        }
        Upsert::Kept(_) => {}
    }
}

/// Fills a range of shards one after the other from each key's final entry,
/// as recovery's replay hands them over: in shard order, and within a shard
/// in key order (the replay has settled which of a key's records wins). The
/// shard being filled is one scratch array, reused, sealed into its exact
/// array when a key of a later shard comes.
pub(crate) struct InOrder {
    bits: u32,
    array_max: usize,
    range: Range<usize>,
    /// The shard the scratch array holds.
    current: usize,
    scratch: Vec<Entry>,
    shards: Vec<Shard>,
    spills: Vec<Spill>,
    digest: Vec<u64>,
}

impl InOrder {
    /// Fills shards `range` of an index of `1 << bits` shards.
    pub(crate) fn new(bits: u32, range: Range<usize>, array_max: usize) -> Self {
        InOrder {
            bits,
            array_max,
            current: range.start,
            scratch: Vec::new(),
            shards: Vec::with_capacity(range.len()),
            spills: Vec::with_capacity(range.len()),
            range,
            digest: vec![0; DIGEST_BUCKETS],
        }
    }

    /// Seals the shards before `shard`.
    fn seal_to(&mut self, shard: usize) {
        while self.current < shard {
            let (hot, cold) = crate::shard::from_sorted(&mut self.scratch, self.array_max);
            self.shards.push(hot);
            self.spills.push(cold);
            self.current += 1;
        }
    }

    /// Adds `key`, whose order hash is `hash`, with its final `slot`: in a
    /// later shard than the last key added, or in the same one and greater.
    pub(crate) fn push(&mut self, hash: u64, key: Key, slot: Slot) {
        debug_assert_eq!(hash, order_hash(key.as_bytes()));
        let i = shard_of(hash, self.bits);
        assert!(
            i >= self.current && i < self.range.end,
            "a key of shard {i} given to the in-order builder at {} of {:?}",
            self.current,
            self.range
        );
        self.seal_to(i);
        assert!(
            self.scratch
                .last()
                .is_none_or(|e| compare(e.key.as_bytes(), key.as_bytes()).is_lt()),
            "keys given to the in-order builder out of order"
        );
        self.digest[digest_bucket_of(hash)] ^= entry_hash(key.as_bytes(), &slot);
        self.scratch.push(Entry {
            key,
            slot: AtomicSlot::new(slot),
        });
    }

    /// The shards built.
    pub(crate) fn seal(mut self) -> Part {
        self.seal_to(self.range.end);
        Part {
            bits: self.bits,
            range: self.range,
            array_max: self.array_max,
            shards: self.shards,
            spills: self.spills,
            digest: self.digest,
        }
    }
}

/// Shards built by one [`Builder`] or [`InOrder`], sealed.
pub(crate) struct Part {
    bits: u32,
    range: Range<usize>,
    array_max: usize,
    shards: Vec<Shard>,
    spills: Vec<Spill>,
    digest: Vec<u64>,
}

impl Index {
    /// The index made of `parts`, of disjoint ranges of shards that
    /// together cover it.
    pub(crate) fn from_parts(mut parts: Vec<Part>) -> Index {
        parts.retain(|p| !p.range.is_empty());
        parts.sort_by_key(|p| p.range.start);
        let bits = parts.first().map_or(0, |p| p.bits);
        let array_max = parts.first().map_or(usize::MAX, |p| p.array_max);
        let mut digest = vec![0u64; DIGEST_BUCKETS];
        let mut shards = Vec::with_capacity(1 << bits);
        let mut spills = Vec::with_capacity(1 << bits);
        for part in parts {
            assert_eq!(part.bits, bits, "parts of one index");
            assert_eq!(part.range.start, shards.len(), "parts cover the index");
            for (d, p) in digest.iter_mut().zip(&part.digest) {
                *d ^= p;
            }
            shards.extend(part.shards);
            spills.extend(part.spills);
        }
        assert_eq!(shards.len(), 1 << bits, "parts cover the index");
        Index {
            shards: shards.into_boxed_slice(),
            spills: spills.into_boxed_slice(),
            bits,
            array_max,
            digest: digest.into_iter().map(AtomicU64::new).collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn version(ts: u64) -> Version {
        Version::new(ts, 7)
    }

    #[test]
    fn a_slot_rewritten_in_place_is_never_read_torn() {
        // One writer moves the slot through offsets 1, 2, 3, ... with the
        // timestamp 3 × offset, the CRC 7 × offset and the length the offset;
        // readers on other threads must only ever see words that belong
        // together.
        const WRITES: u64 = 200_000;
        let at = |offset: u64| {
            Slot::new(
                offset,
                offset.is_multiple_of(2),
                version(3 * offset),
                7 * offset as u32,
                offset as u32,
            )
        };
        let slot = AtomicSlot::new(at(1));
        let done = std::sync::atomic::AtomicBool::new(false);
        std::thread::scope(|s| {
            let readers: Vec<_> = (0..3)
                .map(|_| {
                    s.spawn(|| {
                        let mut reads = 0u64;
                        let mut last = 0;
                        while !done.load(Ordering::Relaxed) {
                            let seen = slot.load();
                            assert_eq!(seen.version().ts, 3 * seen.offset(), "torn: {seen:?}");
                            assert_eq!(seen.crc(), 7 * seen.offset() as u32, "torn: {seen:?}");
                            assert_eq!(
                                u64::from(seen.value_len()),
                                seen.offset(),
                                "torn: {seen:?}"
                            );
                            assert!(seen.offset() >= last, "went back: {seen:?}");
                            assert_eq!(seen.is_tombstone(), seen.offset().is_multiple_of(2));
                            last = seen.offset();
                            reads += 1;
                        }
                        reads
                    })
                })
                .collect();
            for offset in 2..=WRITES {
                slot.store(at(offset));
            }
            done.store(true, Ordering::Relaxed);
            for r in readers {
                assert!(r.join().unwrap() > 0);
            }
        });
        assert_eq!(slot.load().offset(), WRITES);
    }

    #[test]
    fn upsert_updates_in_place_and_keeps_newer_versions() {
        let index = Index::new(4, 16);
        let first = Slot::new(10, false, version(5), 100, 1);
        assert_eq!(index.upsert(b"k", first), Upsert::Inserted);
        let second = Slot::new(20, true, version(6), 200, 0);
        assert_eq!(index.upsert(b"k", second), Upsert::Replaced(first));
        assert_eq!(index.get(b"k"), Some(second));
        // At an equal version the greater CRC wins...
        let smaller = Slot::new(30, false, version(6), 150, 1);
        assert_eq!(index.upsert(b"k", smaller), Upsert::Kept(second));
        let greater = Slot::new(40, false, version(6), 250, 1);
        assert_eq!(index.upsert(b"k", greater), Upsert::Replaced(second));
        // ...and an older version never does.
        let stale = Slot::new(30, false, version(5), 300, 1);
        assert_eq!(index.upsert(b"k", stale), Upsert::Kept(greater));
        assert_eq!(index.get(b"k"), Some(greater));
        // The digest is that of the winning entry alone, its CRC included.
        let mut only = Builder::new(4, 16);
        only.insert(b"k", greater);
        assert_eq!(index.digest(), only.finish().digest());
        let mut other_bytes = Builder::new(4, 16);
        other_bytes.insert(b"k", Slot::new(40, false, version(6), 251, 1));
        assert_ne!(index.digest(), other_bytes.finish().digest());
        let mut seen = Vec::new();
        index.for_each(|k, s| seen.push((k.as_bytes().to_vec(), *s)));
        assert_eq!(seen, vec![(b"k".to_vec(), greater)]);
    }
}
