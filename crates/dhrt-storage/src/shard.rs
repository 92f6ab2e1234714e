//! One shard of a collection's index: its entries in key order, read
//! without a lock.
//!
//! A shard holds a handful of keys (the index aims for 16), so it is one
//! sorted array rather than a tree or skiplist: a lookup is one pointer and
//! a binary search over adjacent cache lines, and the shard costs 16 bytes
//! beside its array (a skiplist's header is 512 bytes, which at 10 keys per
//! shard cost more memory than the keys). Writers are serialized by the
//! index's callers (the collection's writer lock, or one builder thread per
//! shard); readers take no lock:
//!
//! - Overwriting a key rewrites its [`AtomicSlot`] in place (a seqlock, see
//!   `index.rs`): no allocation.
//! - Adding or removing a key builds a new array, publishes it with one
//!   atomic store, and retires the old one through the epoch
//!   (`crossbeam-epoch`): a reader that loaded it before the store reads it
//!   to the end, and it is freed once no reader can hold it.
//! - A shard that outgrows `array_max` keys (a collection past 2^20 × 16
//!   keys, or keys crafted to share a hash prefix) becomes a crossbeam
//!   skiplist for good, so adding a key never copies more than `array_max`
//!   entries. The skiplist is published before the array is cleared, and a
//!   reader that finds no array looks for the skiplist: it sees one or the
//!   other. Never call `SkipList::range` (crossbeam-skiplist 0.1.3 leaks the
//!   nodes it visits once they are overwritten); walk with `lower_bound`,
//!   `front` and `Entry::next`.
//!
//! # Safety
//!
//! An array is published only once every element in it is initialized, and
//! never written after that except through the [`AtomicSlot`]s' atomics. A
//! new array is a bitwise copy of the old one's entries (plus or minus
//! one): ownership of the copied entries (their keys' heap bytes) moves to
//! the new array, and the old one is destroyed without dropping its
//! elements (`[MaybeUninit<Entry>]` drops none). A removed entry is dropped
//! only after the epoch says no reader can still see the old array. Keys
//! on the heap are raw pointers (`key::HeapBytes`), so a bitwise copy read
//! alongside the original claims nothing a `Box` would. Keys moved into a
//! skiplist when a shard outgrows its array are likewise moved bitwise; the
//! skiplist frees a key only through the same epoch.

use std::mem::MaybeUninit;
use std::ops::Bound;
use std::ptr;
use std::sync::atomic::Ordering;

use crossbeam_epoch::{self as epoch, Atomic, Guard, Owned, Shared};
use crossbeam_skiplist::base::{self, SkipList};

use crate::index::{AtomicSlot, Slot, Upsert};
use crate::key::{Key, KeyRef, compare};

/// One key of the index and where its newest record is. 48 bytes.
pub(crate) struct Entry {
    pub(crate) key: Key,
    pub(crate) slot: AtomicSlot,
}

const _: () = assert!(std::mem::size_of::<Entry>() == 48);

type Run = [MaybeUninit<Entry>];

/// A shard too large for one array.
type Big = SkipList<Key, AtomicSlot>;

/// A shard's array of entries, replaced whole when a key comes or goes: the
/// one word a lookup reads. Tagged [`BIG`] (and null) once the shard
/// outgrew an array and its entries are in its [`Spill`].
pub(crate) struct Shard {
    run: Atomic<Run>,
}

/// The tag of a shard's word once its entries are in a skiplist.
const BIG: usize = 1;

/// Where a shard's entries go once they outgrow an array: a skiplist, set
/// once and never unset. Kept apart from [`Shard`] so that lookups, which
/// nearly never need it, do not carry it through the cache.
pub(crate) struct Spill {
    big: Atomic<Big>,
}

impl Default for Shard {
    fn default() -> Self {
        Shard {
            run: Atomic::null(),
        }
    }
}

impl Default for Spill {
    fn default() -> Self {
        Spill {
            big: Atomic::null(),
        }
    }
}

/// One shard: its array word and its spill.
#[derive(Clone, Copy)]
pub(crate) struct ShardRef<'a> {
    pub(crate) hot: &'a Shard,
    pub(crate) cold: &'a Spill,
}

/// Views an initialized run as entries.
fn entries_of<'g>(shared: Shared<'g, Run>) -> &'g [Entry] {
    // SAFETY: a published run stays allocated while the guard `'g` is
    // pinned (it is retired through the epoch), and every element of a
    // published run is initialized (module documentation).
    match unsafe { shared.as_ref() } {
        None => &[],
        Some(run) => unsafe { &*(run as *const Run as *const [Entry]) },
    }
}

/// Where `key` is (`Ok`) or would go (`Err`) in `entries`.
#[inline]
fn search(entries: &[Entry], key: &[u8]) -> Result<usize, usize> {
    entries.binary_search_by(|e| compare(e.key.as_bytes(), key))
}

/// What a reader finds in a shard.
enum View<'a, 'g> {
    Array(&'g [Entry]),
    Big(&'a Big),
}

/// A shard of `entries` (taken, leaving it empty with its capacity), which
/// must be in strictly ascending key order: one array, or a skiplist if
/// there are more than `array_max`.
pub(crate) fn from_sorted(entries: &mut Vec<Entry>, array_max: usize) -> (Shard, Spill) {
    debug_assert!(
        entries
            .windows(2)
            .all(|w| compare(w[0].key.as_bytes(), w[1].key.as_bytes()).is_lt())
    );
    if entries.is_empty() {
        return (Shard::default(), Spill::default());
    }
    if entries.len() > array_max {
        let big = Big::new(epoch::default_collector().clone());
        let guard = &epoch::pin();
        for e in entries.drain(..) {
            big.insert(e.key, e.slot, guard).release(guard);
        }
        return (
            Shard {
                run: Atomic::from(Shared::null().with_tag(BIG)),
            },
            Spill {
                big: Atomic::new(big),
            },
        );
    }
    let mut run = Owned::<Run>::init(entries.len());
    for (slot, entry) in run.iter_mut().zip(entries.drain(..)) {
        slot.write(entry);
    }
    (
        Shard {
            run: Atomic::from(run),
        },
        Spill::default(),
    )
}

impl<'a> ShardRef<'a> {
    #[inline(always)]
    fn view<'g>(&self, guard: &'g Guard) -> View<'a, 'g> {
        let run = self.hot.run.load(Ordering::Acquire, guard);
        if run.tag() != BIG {
            return View::Array(entries_of(run));
        }
        // The writer stored the skiplist before the tag (both with
        // release): having seen the tag, this load sees the skiplist.
        // SAFETY: `big` is set once and freed only with the spill, which
        // outlives `'a`.
        match unsafe {
            self.cold
                .big
                .load(Ordering::Acquire, guard)
                .as_raw()
                .as_ref()
        } {
            Some(big) => View::Big(big),
            None => unreachable!("a shard tagged big has its skiplist"),
        }
    }

    /// Whether the shard is a skiplist (it outgrew an array).
    #[cfg(test)]
    pub(crate) fn is_big(&self) -> bool {
        matches!(self.view(&epoch::pin()), View::Big(_))
    }

    /// Number of entries.
    pub(crate) fn len(&self) -> usize {
        match self.view(&epoch::pin()) {
            View::Array(entries) => entries.len(),
            View::Big(big) => big.len(),
        }
    }

    /// The slot of `key`, if it is here.
    #[inline(always)]
    pub(crate) fn get(&self, key: &[u8], guard: &Guard) -> Option<Slot> {
        match self.view(guard) {
            View::Array(entries) => search(entries, key).ok().map(|i| entries[i].slot.load()),
            View::Big(big) => get_big(big, key, guard),
        }
    }

    /// Reads the entry a search for a key looks at first (the middle of
    /// the array), so that the search that follows finds its memory
    /// resident and cached.
    #[inline]
    pub(crate) fn touch(&self, guard: &Guard) {
        if let View::Array(entries) = self.view(guard)
            && let Some(middle) = entries.get(entries.len() / 2)
        {
            std::hint::black_box(middle.slot.load());
        }
    }

    /// The first entry.
    pub(crate) fn front<'g>(&self, guard: &'g Guard) -> Option<Cursor<'a, 'g>>
    where
        'a: 'g,
    {
        self.lower_bound(Bound::Unbounded, guard)
    }

    /// The first entry at or after (`Included`) or after (`Excluded`) a key.
    pub(crate) fn lower_bound<'g>(
        &self,
        bound: Bound<&[u8]>,
        guard: &'g Guard,
    ) -> Option<Cursor<'a, 'g>>
    where
        'a: 'g,
    {
        match self.view(guard) {
            View::Array(entries) => {
                let i = match bound {
                    Bound::Unbounded => 0,
                    Bound::Included(k) => search(entries, k).unwrap_or_else(|i| i),
                    Bound::Excluded(k) => match search(entries, k) {
                        Ok(i) => i + 1,
                        Err(i) => i,
                    },
                };
                Cursor::at(entries, i)
            }
            View::Big(big) => {
                let bound = match bound {
                    Bound::Unbounded => return big.front(guard).map(Cursor::Big),
                    Bound::Included(k) => Bound::Included(KeyRef::new(k)),
                    Bound::Excluded(k) => Bound::Excluded(KeyRef::new(k)),
                };
                big.lower_bound(bound, guard).map(Cursor::Big)
            }
        }
    }

    /// Puts `slot` under `key`: inserted if the key is absent; if present,
    /// written in place when `replace(old)` says so. A shard of
    /// `array_max` keys given one more becomes a skiplist. Callers
    /// serialize writes to a shard.
    pub(crate) fn upsert(
        &self,
        key: &[u8],
        slot: Slot,
        replace: impl FnOnce(Slot) -> bool,
        array_max: usize,
        guard: &Guard,
    ) -> Upsert {
        let entries = match self.view(guard) {
            View::Array(entries) => entries,
            View::Big(big) => return upsert_big(big, key, slot, replace, guard),
        };
        match search(entries, key) {
            Ok(at) => {
                let old = entries[at].slot.load();
                if !replace(old) {
                    return Upsert::Kept(old);
                }
                entries[at].slot.store(slot);
                Upsert::Replaced(old)
            }
            Err(at) => {
                let entry = Entry {
                    key: Key::new(key),
                    slot: AtomicSlot::new(slot),
                };
                if entries.len() >= array_max.max(1) {
                    self.grow_big(entries, entry, guard);
                } else {
                    self.insert_at(at, entry, guard);
                }
                Upsert::Inserted
            }
        }
    }

    /// Adds `entry` at position `at` of the current array.
    fn insert_at(&self, at: usize, entry: Entry, guard: &Guard) {
        let old = self.hot.run.load(Ordering::Acquire, guard);
        let entries = entries_of(old);
        debug_assert!(at <= entries.len());
        let mut run = Owned::<Run>::init(entries.len() + 1);
        let dst = run.as_mut_ptr().cast::<Entry>();
        // SAFETY: `run` has room for `entries.len() + 1` entries; the
        // copies move ownership of the old entries into it (the old run is
        // destroyed without dropping them), and every element is written.
        unsafe {
            ptr::copy_nonoverlapping(entries.as_ptr(), dst, at);
            dst.add(at).write(entry);
            ptr::copy_nonoverlapping(
                entries.as_ptr().add(at),
                dst.add(at + 1),
                entries.len() - at,
            );
        }
        self.hot.run.store(run, Ordering::Release);
        if !old.is_null() {
            // SAFETY: unreachable from the shard after the store above;
            // readers that loaded it are protected by their pins.
            unsafe { guard.defer_destroy(old) };
        }
    }

    /// Moves the array's entries and `entry` into a skiplist, publishes it,
    /// then clears the array.
    fn grow_big(&self, entries: &[Entry], entry: Entry, guard: &Guard) {
        let old = self.hot.run.load(Ordering::Acquire, guard);
        let big = Big::new(epoch::default_collector().clone());
        for e in entries {
            // SAFETY: ownership of the key moves into the skiplist; the old
            // run is destroyed without dropping its elements, and readers
            // still reading it are protected by their pins (the skiplist
            // frees a key only through the same epoch).
            let key = unsafe { ptr::read(&e.key) };
            big.insert(key, AtomicSlot::new(e.slot.load()), guard)
                .release(guard);
        }
        big.insert(entry.key, entry.slot, guard).release(guard);
        self.cold.big.store(Owned::new(big), Ordering::Release);
        self.hot
            .run
            .store(Shared::null().with_tag(BIG), Ordering::Release);
        // SAFETY: unreachable from the shard after the store above.
        unsafe { guard.defer_destroy(old) };
    }

    /// Removes `key`; returns its slot if it was here. Callers serialize
    /// writes to a shard.
    pub(crate) fn remove(&self, key: &[u8], guard: &Guard) -> Option<Slot> {
        let entries = match self.view(guard) {
            View::Array(entries) => entries,
            View::Big(big) => {
                let e = big.remove(KeyRef::new(key), guard)?;
                let slot = e.value().load();
                e.release(guard);
                return Some(slot);
            }
        };
        let at = search(entries, key).ok()?;
        let slot = entries[at].slot.load();
        let old = self.hot.run.load(Ordering::Acquire, guard);
        // SAFETY: ownership of entry `at` moves out of the old run, which
        // is destroyed without dropping its elements; the entry itself is
        // dropped only after the epoch has passed every reader of it.
        let removed = unsafe { ptr::read(&entries[at]) };
        if entries.len() == 1 {
            self.hot.run.store(Shared::null(), Ordering::Release);
        } else {
            let mut run = Owned::<Run>::init(entries.len() - 1);
            let dst = run.as_mut_ptr().cast::<Entry>();
            // SAFETY: as in `insert_at`, with one entry fewer.
            unsafe {
                ptr::copy_nonoverlapping(entries.as_ptr(), dst, at);
                ptr::copy_nonoverlapping(
                    entries.as_ptr().add(at + 1),
                    dst.add(at),
                    entries.len() - at - 1,
                );
            }
            self.hot.run.store(run, Ordering::Release);
        }
        // SAFETY: unreachable from the shard after the stores above.
        unsafe { guard.defer_destroy(old) };
        guard.defer(move || drop(removed));
        Some(slot)
    }
}

/// [`ShardRef::get`] in a skiplist: out of line, so the array path, which
/// nearly every lookup takes, stays small enough to inline.
#[cold]
#[inline(never)]
fn get_big(big: &Big, key: &[u8], guard: &Guard) -> Option<Slot> {
    big.get(KeyRef::new(key), guard).map(|e| e.value().load())
}

/// [`ShardRef::upsert`] in a skiplist.
#[cold]
#[inline(never)]
fn upsert_big(
    big: &Big,
    key: &[u8],
    slot: Slot,
    replace: impl FnOnce(Slot) -> bool,
    guard: &Guard,
) -> Upsert {
    // One search either way: inserts if the key is absent, else hands back
    // the existing entry untouched.
    let entry = big.compare_insert(Key::new(key), AtomicSlot::new(slot), |_| false, guard);
    let old = entry.value().load();
    let upsert = if old == slot {
        // Positions never repeat: an equal slot is the new one.
        Upsert::Inserted
    } else if replace(old) {
        entry.value().store(slot);
        Upsert::Replaced(old)
    } else {
        Upsert::Kept(old)
    };
    entry.release(guard);
    upsert
}

impl Drop for Shard {
    fn drop(&mut self) {
        // SAFETY: `&mut self`: no reader can reach this shard any more
        // (an index is dropped once the last generation holding it is), so
        // the current run and its entries are this shard's alone.
        unsafe {
            let run = self.run.load(Ordering::Relaxed, epoch::unprotected());
            if run.is_null() {
                return;
            }
            let mut run = run.into_owned();
            for entry in run.iter_mut() {
                entry.assume_init_drop();
            }
        }
    }
}

impl Drop for Spill {
    fn drop(&mut self) {
        // SAFETY: as for `Shard`: the skiplist is this spill's alone.
        unsafe {
            let big = self.big.load(Ordering::Relaxed, epoch::unprotected());
            if !big.is_null() {
                drop(big.into_owned());
            }
        }
    }
}

/// A position in one shard; valid while the guard it was found under is
/// pinned, and never beyond the shard (`'a: 'g`): a dropped shard frees its
/// array at once, not through the epoch. In an array it is a position in the array as loaded then, so
/// later changes to the shard are not seen (except slot rewrites):
/// callers that walk long re-seek by key.
pub(crate) enum Cursor<'a: 'g, 'g> {
    Array { entries: &'g [Entry], at: usize },
    Big(base::Entry<'a, 'g, Key, AtomicSlot>),
}

impl<'a: 'g, 'g> Cursor<'a, 'g> {
    fn at(entries: &'g [Entry], at: usize) -> Option<Self> {
        (at < entries.len()).then_some(Cursor::Array { entries, at })
    }

    #[inline]
    pub(crate) fn key(&self) -> &Key {
        match self {
            Cursor::Array { entries, at } => &entries[*at].key,
            Cursor::Big(e) => e.key(),
        }
    }

    #[inline]
    pub(crate) fn value(&self) -> &AtomicSlot {
        match self {
            Cursor::Array { entries, at } => &entries[*at].slot,
            Cursor::Big(e) => e.value(),
        }
    }

    /// The entry after this one.
    #[inline]
    pub(crate) fn next(&self) -> Option<Self> {
        match self {
            Cursor::Array { entries, at } => Cursor::at(entries, at + 1),
            Cursor::Big(e) => e.next().map(Cursor::Big),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::version::Version;

    fn slot(offset: u64) -> Slot {
        Slot::new(offset, false, Version::new(offset, 1), offset as u32, 1)
    }

    /// A shard and its spill, owned.
    #[derive(Default)]
    struct Owned2(Shard, Spill);

    impl Owned2 {
        fn r(&self) -> ShardRef<'_> {
            ShardRef {
                hot: &self.0,
                cold: &self.1,
            }
        }
    }

    fn keys(shard: ShardRef<'_>) -> Vec<Vec<u8>> {
        let guard = &epoch::pin();
        let mut out = Vec::new();
        let mut cursor = shard.front(guard);
        while let Some(c) = cursor {
            out.push(c.key().as_bytes().to_vec());
            cursor = c.next();
        }
        out
    }

    /// Inserts, overwrites, seeks and removes give the same answers in an
    /// array and in a skiplist (array_max 3 makes one of five keys).
    #[test]
    fn an_array_and_a_skiplist_answer_alike() {
        for array_max in [usize::MAX, 3] {
            let owned = Owned2::default();
            let shard = owned.r();
            let long = vec![b'z'; 40];
            let all: [&[u8]; 5] = [b"m", b"c", &long, b"a", b"x"];
            for (i, k) in all.into_iter().enumerate() {
                let guard = &epoch::pin();
                let got = shard.upsert(k, slot(i as u64 + 1), |_| true, array_max, guard);
                assert_eq!(got, Upsert::Inserted);
            }
            assert_eq!(shard.is_big(), array_max == 3);
            assert_eq!(shard.len(), 5);
            assert_eq!(
                keys(shard),
                vec![
                    b"a".to_vec(),
                    b"c".to_vec(),
                    b"m".to_vec(),
                    b"x".to_vec(),
                    long.clone()
                ]
            );
            let guard = &epoch::pin();
            assert_eq!(shard.get(&long, guard).unwrap().offset(), 3);
            assert!(shard.get(b"b", guard).is_none());
            // Overwrites: kept or replaced as `replace` says.
            assert_eq!(
                shard.upsert(b"c", slot(10), |_| false, array_max, guard),
                Upsert::Kept(slot(2))
            );
            assert_eq!(
                shard.upsert(b"c", slot(11), |old| old == slot(2), array_max, guard),
                Upsert::Replaced(slot(2))
            );
            assert_eq!(shard.get(b"c", guard), Some(slot(11)));
            let after_c = shard.lower_bound(Bound::Excluded(b"c"), guard).unwrap();
            assert_eq!(after_c.key().as_bytes(), b"m");
            assert_eq!(after_c.next().unwrap().key().as_bytes(), b"x");
            let at_b = shard.lower_bound(Bound::Included(b"b"), guard).unwrap();
            assert_eq!(at_b.key().as_bytes(), b"c");
            assert_eq!(at_b.value().load(), slot(11));
            assert!(shard.lower_bound(Bound::Excluded(&long), guard).is_none());
            assert_eq!(shard.remove(b"nope", guard), None);
            for k in [&b"c"[..], &long, b"a", b"x", b"m"] {
                assert!(shard.remove(k, guard).is_some());
            }
            assert!(keys(shard).is_empty());
            assert!(shard.front(guard).is_none());
        }
    }

    #[test]
    fn from_sorted_makes_an_array_or_a_skiplist() {
        let entries = |n: u64| -> Vec<Entry> {
            (0..n)
                .map(|i| Entry {
                    key: Key::new(format!("k{i:03}").as_bytes()),
                    slot: AtomicSlot::new(slot(i + 1)),
                })
                .collect()
        };
        let (hot, cold) = from_sorted(&mut entries(4), 4);
        let small = Owned2(hot, cold);
        let small = small.r();
        let (hot, cold) = from_sorted(&mut entries(5), 4);
        let big = Owned2(hot, cold);
        let big = big.r();
        assert!(!small.is_big() && big.is_big());
        assert_eq!(keys(big).len(), 5);
        let guard = &epoch::pin();
        assert_eq!(big.get(b"k004", guard), Some(slot(5)));
        assert_eq!(small.get(b"k003", guard), Some(slot(4)));
    }

    /// A writer adds and removes keys around a fixed set, and the shard
    /// turns into a skiplist on the way; readers on other threads must find
    /// every fixed key at its offset and walk the shard in order, whatever
    /// they race.
    #[test]
    fn readers_see_every_key_while_others_come_and_go() {
        let owned = Owned2::default();
        let shard = owned.r();
        let array_max = 24;
        let fixed: Vec<Vec<u8>> = (0..16u32)
            .map(|i| format!("f{i:02}").into_bytes())
            .collect();
        {
            let guard = &epoch::pin();
            for (i, k) in fixed.iter().enumerate() {
                shard.upsert(k, slot(i as u64 + 1), |_| true, array_max, guard);
            }
        }
        let done = std::sync::atomic::AtomicBool::new(false);
        std::thread::scope(|s| {
            for _ in 0..2 {
                s.spawn(|| {
                    while !done.load(Ordering::Relaxed) {
                        let guard = &epoch::pin();
                        for (i, k) in fixed.iter().enumerate() {
                            assert_eq!(shard.get(k, guard), Some(slot(i as u64 + 1)), "{k:?}");
                        }
                        let mut last: Option<Vec<u8>> = None;
                        let mut cursor = shard.front(guard);
                        while let Some(c) = cursor {
                            let k = c.key().as_bytes().to_vec();
                            assert!(last.as_ref().is_none_or(|l| *l < k));
                            last = Some(k);
                            cursor = c.next();
                        }
                    }
                });
            }
            let rounds = if cfg!(miri) { 300 } else { 20_000u64 };
            for round in 0..rounds {
                let k = format!("f{:02}-{}", round % 16, "x".repeat((round % 30) as usize));
                let guard = &epoch::pin();
                if shard.remove(k.as_bytes(), guard).is_none() {
                    shard.upsert(k.as_bytes(), slot(100 + round), |_| true, array_max, guard);
                }
            }
            done.store(true, Ordering::Relaxed);
        });
        assert!(shard.is_big(), "the shard outgrew its array");
        assert!(keys(shard).len() >= 16);
    }
}
