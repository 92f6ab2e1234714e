//! One shard of a collection's index: its entries in key order, in one
//! array that readers search without a lock.
//!
//! A shard holds a handful of keys (the index aims for 16), so it is one
//! sorted array rather than a tree or skiplist: a lookup is one pointer and
//! a binary search over adjacent cache lines, and the shard's header is a
//! single pointer (a skiplist's header is 512 bytes, which at 10 keys per
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
//! alongside the original claims nothing a `Box` would.

use std::mem::MaybeUninit;
use std::ops::Bound;
use std::ptr;
use std::sync::atomic::Ordering;

use crossbeam_epoch::{self as epoch, Atomic, Guard, Owned, Shared};

use crate::index::AtomicSlot;
use crate::key::{Key, compare};

/// One key of the index and where its newest record is. 40 bytes.
pub(crate) struct Entry {
    pub(crate) key: Key,
    pub(crate) slot: AtomicSlot,
}

const _: () = assert!(std::mem::size_of::<Entry>() == 40);

type Run = [MaybeUninit<Entry>];

/// A sorted array of entries, replaced whole when a key comes or goes.
pub(crate) struct Shard {
    /// Null while empty.
    run: Atomic<Run>,
}

impl Default for Shard {
    fn default() -> Self {
        Shard {
            run: Atomic::null(),
        }
    }
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

impl Shard {
    /// A shard of `entries`, which must be in strictly ascending key order.
    pub(crate) fn from_sorted(entries: Vec<Entry>) -> Self {
        debug_assert!(
            entries
                .windows(2)
                .all(|w| compare(w[0].key.as_bytes(), w[1].key.as_bytes()).is_lt())
        );
        if entries.is_empty() {
            return Shard::default();
        }
        let mut run = Owned::<Run>::init(entries.len());
        for (slot, entry) in run.iter_mut().zip(entries) {
            slot.write(entry);
        }
        Shard {
            run: Atomic::from(run),
        }
    }

    /// The entries, in key order, as of now; valid while `guard` is pinned.
    #[inline]
    pub(crate) fn entries<'g>(&self, guard: &'g Guard) -> &'g [Entry] {
        entries_of(self.run.load(Ordering::Acquire, guard))
    }

    /// Number of entries.
    pub(crate) fn len(&self) -> usize {
        self.entries(&epoch::pin()).len()
    }

    /// Where `key` is (`Ok`) or would go (`Err`) in `entries`.
    #[inline]
    pub(crate) fn search(entries: &[Entry], key: &[u8]) -> Result<usize, usize> {
        entries.binary_search_by(|e| compare(e.key.as_bytes(), key))
    }

    /// The entry of `key`, if any.
    #[inline]
    pub(crate) fn get<'g>(&self, key: &[u8], guard: &'g Guard) -> Option<&'g Entry> {
        let entries = self.entries(guard);
        Shard::search(entries, key).ok().map(|i| &entries[i])
    }

    /// The first entry.
    pub(crate) fn front<'g>(&self, guard: &'g Guard) -> Option<Cursor<'g>> {
        Cursor::at(self.entries(guard), 0)
    }

    /// The first entry at or after (`Included`) or after (`Excluded`) a key.
    pub(crate) fn lower_bound<'g>(
        &self,
        bound: Bound<&[u8]>,
        guard: &'g Guard,
    ) -> Option<Cursor<'g>> {
        let entries = self.entries(guard);
        let i = match bound {
            Bound::Unbounded => 0,
            Bound::Included(k) => Shard::search(entries, k).unwrap_or_else(|i| i),
            Bound::Excluded(k) => match Shard::search(entries, k) {
                Ok(i) => i + 1,
                Err(i) => i,
            },
        };
        Cursor::at(entries, i)
    }

    /// Adds `entry` at position `at` of the current entries (where
    /// [`Shard::search`] said it goes). Callers serialize writes to a shard.
    pub(crate) fn insert_at(&self, at: usize, entry: Entry, guard: &Guard) {
        let old = self.run.load(Ordering::Acquire, guard);
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
        self.run.store(run, Ordering::Release);
        if !old.is_null() {
            // SAFETY: unreachable from the shard after the store above;
            // readers that loaded it are protected by their pins.
            unsafe { guard.defer_destroy(old) };
        }
    }

    /// Removes the entry at position `at`; it is dropped once no reader can
    /// see it. Callers serialize writes to a shard.
    pub(crate) fn remove_at(&self, at: usize, guard: &Guard) {
        let old = self.run.load(Ordering::Acquire, guard);
        let entries = entries_of(old);
        assert!(at < entries.len());
        // SAFETY: ownership of entry `at` moves out of the old run, which
        // is destroyed without dropping its elements; the entry itself is
        // dropped only after the epoch has passed every reader of it.
        let removed = unsafe { ptr::read(&entries[at]) };
        if entries.len() == 1 {
            self.run.store(Shared::null(), Ordering::Release);
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
            self.run.store(run, Ordering::Release);
        }
        // SAFETY: unreachable from the shard after the stores above.
        unsafe { guard.defer_destroy(old) };
        guard.defer(move || drop(removed));
    }
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

/// A position in one shard's entries as loaded once; valid while the guard
/// it was loaded under is pinned. Later changes to the shard are not seen
/// (except slot rewrites): callers that walk long re-seek by key.
#[derive(Clone, Copy)]
pub(crate) struct Cursor<'g> {
    entries: &'g [Entry],
    at: usize,
}

impl<'g> Cursor<'g> {
    fn at(entries: &'g [Entry], at: usize) -> Option<Self> {
        (at < entries.len()).then_some(Cursor { entries, at })
    }

    #[inline]
    pub(crate) fn key(&self) -> &'g Key {
        &self.entries[self.at].key
    }

    #[inline]
    pub(crate) fn value(&self) -> &'g AtomicSlot {
        &self.entries[self.at].slot
    }

    /// The entry after this one.
    #[inline]
    pub(crate) fn next(&self) -> Option<Self> {
        Cursor::at(self.entries, self.at + 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::index::Slot;
    use crate::version::Version;

    fn entry(key: &[u8], offset: u64) -> Entry {
        Entry {
            key: Key::new(key),
            slot: AtomicSlot::new(Slot::new(offset, false, Version::new(offset, 1))),
        }
    }

    fn keys(shard: &Shard) -> Vec<Vec<u8>> {
        let guard = &epoch::pin();
        shard
            .entries(guard)
            .iter()
            .map(|e| e.key.as_bytes().to_vec())
            .collect()
    }

    #[test]
    fn inserts_and_removes_keep_key_order_and_entries() {
        let shard = Shard::default();
        let long = vec![b'z'; 40];
        for (i, k) in [&b"m"[..], b"c", &long, b"a", b"x"].into_iter().enumerate() {
            let guard = &epoch::pin();
            let at = Shard::search(shard.entries(guard), k).unwrap_err();
            shard.insert_at(at, entry(k, i as u64 + 1), guard);
        }
        assert_eq!(
            keys(&shard),
            vec![
                b"a".to_vec(),
                b"c".to_vec(),
                b"m".to_vec(),
                b"x".to_vec(),
                long.clone()
            ]
        );
        let guard = &epoch::pin();
        assert_eq!(shard.get(&long, guard).unwrap().slot.load().offset(), 3);
        assert!(shard.get(b"b", guard).is_none());
        let after_c = shard.lower_bound(Bound::Excluded(b"c"), guard).unwrap();
        assert_eq!(after_c.key().as_bytes(), b"m");
        assert_eq!(after_c.next().unwrap().key().as_bytes(), b"x");
        let at_b = shard.lower_bound(Bound::Included(b"b"), guard).unwrap();
        assert_eq!(at_b.key().as_bytes(), b"c");
        assert!(shard.lower_bound(Bound::Excluded(&long), guard).is_none());
        for k in [&b"c"[..], &long, b"a", b"x", b"m"] {
            let at = Shard::search(shard.entries(guard), k).unwrap();
            shard.remove_at(at, guard);
        }
        assert!(keys(&shard).is_empty());
        assert!(shard.front(guard).is_none());
    }

    #[test]
    fn readers_see_every_key_while_others_come_and_go() {
        // A writer adds and removes keys around a fixed set; readers on
        // other threads must find every fixed key at its offset, and see
        // each array in order, whatever they race.
        let shard = Shard::default();
        let fixed: Vec<Vec<u8>> = (0..16u32)
            .map(|i| format!("f{i:02}").into_bytes())
            .collect();
        {
            let guard = &epoch::pin();
            for (i, k) in fixed.iter().enumerate() {
                let at = Shard::search(shard.entries(guard), k).unwrap_err();
                shard.insert_at(at, entry(k, i as u64 + 1), guard);
            }
        }
        let done = std::sync::atomic::AtomicBool::new(false);
        std::thread::scope(|s| {
            for _ in 0..2 {
                s.spawn(|| {
                    while !done.load(Ordering::Relaxed) {
                        let guard = &epoch::pin();
                        for (i, k) in fixed.iter().enumerate() {
                            let e = shard.get(k, guard).expect("a fixed key");
                            assert_eq!(e.slot.load().offset(), i as u64 + 1);
                        }
                        let all = shard.entries(guard);
                        assert!(
                            all.windows(2)
                                .all(|w| w[0].key.as_bytes() < w[1].key.as_bytes())
                        );
                    }
                });
            }
            let rounds = if cfg!(miri) { 300 } else { 20_000u64 };
            for round in 0..rounds {
                let k = format!("f{:02}-{}", round % 16, "x".repeat((round % 30) as usize));
                let guard = &epoch::pin();
                match Shard::search(shard.entries(guard), k.as_bytes()) {
                    Ok(at) => shard.remove_at(at, guard),
                    Err(at) => shard.insert_at(at, entry(k.as_bytes(), 100 + round), guard),
                }
            }
            done.store(true, Ordering::Relaxed);
        });
        assert!(keys(&shard).len() >= 16);
    }
}
