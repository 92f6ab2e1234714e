//! Ordered iteration over a collection: a k-way merge of the index shards,
//! refilled in batches so no iterator pins a generation for long.

use std::cmp::Ordering;
use std::collections::{BinaryHeap, VecDeque};
use std::sync::Arc;

use bytes::Bytes;

use crate::collection::{self, Collection};
use crate::index::{Cursor, Index};
use crate::version::Version;

const BATCH: usize = 512;

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

/// A shard cursor in the merge heap, ordered so the smallest key pops first.
struct Head<'a, 'g>(Cursor<'a, 'g>);

impl PartialEq for Head<'_, '_> {
    fn eq(&self, other: &Self) -> bool {
        self.0.key() == other.0.key()
    }
}
impl Eq for Head<'_, '_> {}
impl PartialOrd for Head<'_, '_> {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Head<'_, '_> {
    fn cmp(&self, other: &Self) -> Ordering {
        other.0.key().cmp(self.0.key())
    }
}

/// Iterator over a collection's records in key order, tombstones included.
/// Not a snapshot: it sees writes made while it runs, each key at most once.
#[derive(Debug)]
pub struct Records {
    collection: Option<Arc<Collection>>,
    after: Option<Vec<u8>>,
    buffered: VecDeque<Record>,
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
            after: after.map(<[u8]>::to_vec),
            buffered: VecDeque::new(),
            live_only,
        }
    }

    fn fill(&mut self) {
        let Some(coll) = self.collection.clone() else {
            return;
        };
        let generation = coll.current.load();
        let map = generation.log.map();
        let guard = &crossbeam_epoch::pin();
        let mut heap: BinaryHeap<Head<'_, '_>> = generation
            .index
            .shards()
            .filter_map(|shard| Index::seek(shard, self.after.as_deref(), guard))
            .map(Head)
            .collect();
        let mut emitted = 0;
        while emitted < BATCH {
            let Some(Head(entry)) = heap.pop() else {
                self.collection = None;
                break;
            };
            let slot = *entry.value();
            if !(self.live_only && slot.is_tombstone()) {
                self.buffered.push_back(Record {
                    key: entry.key().as_bytes().to_vec(),
                    value: (!slot.is_tombstone()).then(|| collection::value_at(&map, &slot)),
                    version: slot.version(),
                });
                emitted += 1;
            }
            if let Some(next) = entry.next() {
                heap.push(Head(next));
            }
            if emitted == BATCH || heap.is_empty() {
                self.after = Some(entry.key().as_bytes().to_vec());
            }
        }
    }
}

impl Iterator for Records {
    type Item = Record;

    fn next(&mut self) -> Option<Record> {
        if self.buffered.is_empty() {
            self.fill();
        }
        self.buffered.pop_front()
    }
}

/// Iterator over a collection's live keys and values in key order.
#[derive(Debug)]
pub struct Scan(pub(crate) Records);

impl Iterator for Scan {
    type Item = (Vec<u8>, Bytes);

    fn next(&mut self) -> Option<(Vec<u8>, Bytes)> {
        let r = self.0.next()?;
        Some((r.key, r.value.expect("live_only scans skip tombstones")))
    }
}
