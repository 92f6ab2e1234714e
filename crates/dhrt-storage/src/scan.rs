//! Iteration over a collection, in two orders.
//!
//! * Key order ([`Scan`], [`Records`] from `Store::scan`/`Store::records`): a
//!   lazy k-way merge of the index shards. Starting costs one seek per shard;
//!   each item after that one seek in one shard.
//! * Hash order ([`Listing`]): shard by shard, and within a shard by
//!   (20-bit key hash, key). Shard numbers are prefixes of that hash, so the
//!   order does not change when the index reshards, and resuming after a key
//!   costs one shard's walk: this is what paginated listings use.
//!
//! Neither is a snapshot: each sees writes made while it runs, each key at
//! most once.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};
use std::ops::Bound;
use std::sync::Arc;

use bytes::Bytes;

use crate::collection::Collection;
use crate::index::{self, ORDER_BITS};
use crate::log::LogFile;
use crate::record::{self, Decoded};
use crate::verify;
use crate::version::Version;

/// One entry of a collection, with its version; `value` is `None` for a
/// tombstone.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    /// The key.
    pub key: Vec<u8>,
    /// The value, or `None` if the key was deleted.
    pub value: Option<Bytes>,
    /// The version of the write.
    pub version: Version,
}

/// Iterator over a collection's records in key order, tombstones included.
#[derive(Debug)]
pub struct Records {
    collection: Option<Arc<Collection>>,
    /// Per shard, its next key not yet emitted; smallest first.
    heap: BinaryHeap<Reverse<(Vec<u8>, usize)>>,
    /// Shard bits the heap was built for; a reshard rebuilds it.
    bits: Option<u32>,
    /// The last key emitted.
    after: Option<Vec<u8>>,
    live_only: bool,
}

impl Records {
    pub(crate) fn new(
        collection: Option<Arc<Collection>>,
        after: Option<&[u8]>,
        live_only: bool,
    ) -> Self {
        Records {
            collection,
            heap: BinaryHeap::new(),
            bits: None,
            after: after.map(<[u8]>::to_vec),
            live_only,
        }
    }

    fn prime(&mut self, index: &index::Index) {
        self.heap.clear();
        let guard = &crossbeam_epoch::pin();
        for i in 0..index.shard_count() {
            let Some(shard) = index.shard_at(i) else {
                continue;
            };
            if let Some(e) = index::Index::seek(shard, self.after.as_deref(), guard) {
                self.heap.push(Reverse((e.key().as_bytes().to_vec(), i)));
            }
        }
        self.bits = Some(index.bits());
    }
}

impl Iterator for Records {
    type Item = Record;

    fn next(&mut self) -> Option<Record> {
        let coll = self.collection.clone()?;
        let generation = coll.current.load();
        if self.bits != Some(generation.index.bits()) {
            self.prime(&generation.index);
        }
        let guard = &crossbeam_epoch::pin();
        loop {
            let Some(Reverse((key, i))) = self.heap.pop() else {
                self.collection = None;
                return None;
            };
            // A compaction may have swapped in an index (of the same shape)
            // where this shard holds nothing any more.
            let Some(shard) = generation.index.shard_at(i) else {
                continue;
            };
            let Some(entry) = shard.lower_bound(Bound::Included(&key[..]), guard) else {
                continue;
            };
            if let Some(next) = entry.next() {
                self.heap.push(Reverse((next.key().as_bytes().to_vec(), i)));
            }
            if entry.key().as_bytes() != key {
                // Removed since it was queued; what follows it was queued instead.
                self.heap
                    .push(Reverse((entry.key().as_bytes().to_vec(), i)));
                continue;
            }
            let slot = entry.value().load();
            self.after = Some(key.clone());
            if self.live_only && slot.is_tombstone() {
                continue;
            }
            let value = if slot.is_tombstone() {
                None
            } else {
                // Loaded after the slot: they cover its record.
                let tail = generation.log.tail();
                let map = generation.log.map();
                match verify::read_value(&map, tail, &slot) {
                    Some(value) => Some(value),
                    None => {
                        // Skipped, not yielded: a listing never serves
                        // damaged bytes.
                        coll.quarantine(&generation.log, &key, slot);
                        continue;
                    }
                }
            };
            return Some(Record {
                key,
                value,
                version: slot.version(),
            });
        }
    }
}

/// Iterator over a collection's live keys and values in key order.
#[derive(Debug)]
pub struct Scan(pub(crate) Records);

impl Iterator for Scan {
    type Item = (Vec<u8>, Bytes);

    fn next(&mut self) -> Option<(Vec<u8>, Bytes)> {
        let r = self.0.next()?;
        Some((r.key, r.value.expect("live-only scans skip tombstones")))
    }
}

/// Iterator over a collection's records in hash order (see the module
/// documentation), resumable after any key at the cost of one shard walk.
#[derive(Debug)]
pub struct Listing {
    collection: Option<Arc<Collection>>,
    /// (order hash, key) of the last record emitted.
    after: Option<(u64, Vec<u8>)>,
    /// Records with their seqs.
    buffered: VecDeque<(Record, u64)>,
    live_only: bool,
    /// Order hashes at or past this end the listing.
    end: u64,
}

impl Listing {
    pub(crate) fn new(
        collection: Option<Arc<Collection>>,
        after: Option<&[u8]>,
        live_only: bool,
    ) -> Self {
        Listing {
            collection,
            after: after.map(|k| (index::order_hash(k), k.to_vec())),
            buffered: VecDeque::new(),
            live_only,
            end: 1 << ORDER_BITS,
        }
    }

    /// Every record (tombstones included) of one digest bucket.
    pub(crate) fn bucket(collection: Option<Arc<Collection>>, bucket: usize) -> Self {
        let shift = ORDER_BITS - index::DIGEST_BITS;
        let start = (bucket as u64) << shift;
        Listing {
            collection,
            // Keys are never empty, so every key of the bucket sorts after
            // (start, []).
            after: Some((start, Vec::new())),
            buffered: VecDeque::new(),
            live_only: false,
            end: start + (1 << shift),
        }
    }

    /// Buffers the rest of the shard the cursor is in, or of the following
    /// shards until something is found.
    fn fill(&mut self) {
        let Some(coll) = self.collection.clone() else {
            return;
        };
        let generation = coll.current.load();
        let index = &generation.index;
        let mut shard_no = self
            .after
            .as_ref()
            .map_or(0, |(h, _)| index::shard_of(*h, index.bits()));
        let guard = &crossbeam_epoch::pin();
        while shard_no < index.shard_count()
            && ((shard_no as u64) << (ORDER_BITS - index.bits())) < self.end
        {
            if let Some(shard) = index.shard_at(shard_no) {
                let mut entries = Vec::new();
                let mut cursor = shard.front(guard);
                while let Some(e) = cursor {
                    let key = e.key().as_bytes();
                    let pos = (index::order_hash(key), key);
                    if pos.0 < self.end
                        && self.after.as_ref().is_none_or(|(h, k)| pos > (*h, &k[..]))
                    {
                        entries.push((pos.0, key.to_vec(), e.value().load()));
                    }
                    cursor = e.next();
                }
                entries.sort_unstable_by(|a, b| (a.0, &a.1).cmp(&(b.0, &b.1)));
                // Loaded after the slots: they cover their records.
                let tail = generation.log.tail();
                let map = generation.log.map();
                for (hash, key, slot) in entries {
                    self.after = Some((hash, key.clone()));
                    if self.live_only && slot.is_tombstone() {
                        continue;
                    }
                    let value = if slot.is_tombstone() {
                        None
                    } else {
                        match verify::read_value(&map, tail, &slot) {
                            Some(value) => Some(value),
                            None => {
                                coll.quarantine(&generation.log, &key, slot);
                                continue;
                            }
                        }
                    };
                    let seq = record::parse_header(&map[slot.offset() as usize..tail as usize])
                        .map_or(0, |h| h.seq);
                    self.buffered.push_back((
                        Record {
                            key,
                            value,
                            version: slot.version(),
                        },
                        seq,
                    ));
                }
            }
            shard_no += 1;
            // Move the cursor to the start of the next shard's hash range.
            let next_start = (shard_no as u64) << (ORDER_BITS - index.bits());
            if self.after.as_ref().is_none_or(|(h, _)| *h < next_start)
                && shard_no < index.shard_count()
            {
                self.after = Some((next_start, Vec::new()));
            }
            if !self.buffered.is_empty() {
                return;
            }
        }
        self.collection = None;
    }
}

impl Listing {
    /// The next record and its seq.
    pub(crate) fn next_with_seq(&mut self) -> Option<(Record, u64)> {
        if self.buffered.is_empty() {
            self.fill();
        }
        self.buffered.pop_front()
    }
}

impl Iterator for Listing {
    type Item = Record;

    fn next(&mut self) -> Option<Record> {
        self.next_with_seq().map(|(r, _)| r)
    }
}

/// Every record of a collection, tombstones included, the most recently
/// written first (newest position in the log first): what a join handoff
/// streams. It holds the log it started on (a compaction meanwhile does not
/// disturb it) and 8 bytes per record, never the records themselves. Writes
/// made after it started are not included.
#[derive(Debug)]
pub struct NewestFirst {
    /// The collection and the log the offsets point into, to quarantine a
    /// damaged record.
    source: Option<(Arc<Collection>, Arc<LogFile>)>,
    map: Bytes,
    /// The log's tail when the walk started: every offset is below it.
    tail: usize,
    /// Record offsets, newest last (popped from the end).
    offsets: Vec<u64>,
}

impl NewestFirst {
    pub(crate) fn new(collection: Option<Arc<Collection>>) -> Self {
        let Some(coll) = collection else {
            return NewestFirst {
                source: None,
                map: Bytes::new(),
                tail: 0,
                offsets: Vec::new(),
            };
        };
        let generation = coll.current.load_full();
        let mut offsets = Vec::new();
        generation
            .index
            .for_each(|_, slot| offsets.push(slot.offset()));
        offsets.sort_unstable();
        // Taken after the offsets: they cover every record they point at.
        let tail = generation.log.tail() as usize;
        let map = Bytes::clone(&generation.log.map());
        NewestFirst {
            source: Some((coll, generation.log.clone())),
            map,
            tail,
            offsets,
        }
    }

    /// How many records are left.
    pub fn remaining(&self) -> usize {
        self.offsets.len()
    }
}

impl Iterator for NewestFirst {
    type Item = Record;

    fn next(&mut self) -> Option<Record> {
        loop {
            let offset = self.offsets.pop()? as usize;
            let Decoded::Record { header, key, .. } = record::decode(&self.map[offset..self.tail])
            else {
                if let Some((coll, log)) = &self.source {
                    coll.quarantine_offset(log, offset as u64);
                }
                continue;
            };
            let value_start = offset + record::RECORD_HEADER_LEN + key.len();
            return Some(Record {
                key: key.to_vec(),
                value: (header.kind == record::Kind::Set).then(|| {
                    self.map
                        .slice(value_start..value_start + header.value_len as usize)
                }),
                version: header.version,
            });
        }
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        (self.offsets.len(), Some(self.offsets.len()))
    }
}
