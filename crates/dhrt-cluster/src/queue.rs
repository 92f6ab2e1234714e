//! The writes on their way to one peer: a sequence-numbered queue (pure;
//! the sender task and the write-concern wait live in `cluster/replicate`).
//!
//! Rules:
//! - Every queued mutation gets the next sequence number; a write is the
//!   range of numbers of its mutations.
//! - The queue holds at most `max_hints` mutations and `max_hint_bytes`
//!   bytes of them (`crate::batch::mutation_bytes`: key, value, collection
//!   and a fixed overhead), but never drops the ones being pushed. Room is
//!   made before they go in: the oldest go first, and the queue remembers
//!   it overflowed (anti-entropy must repair the peer).
//! - Batches are cut by bytes and count (`crate::batch`).
//! - An answer for a batch takes its mutations out of the queue; the ones
//!   the peer refused are remembered (the latest `REFUSED_KEPT`), so a
//!   write counts as acknowledged only when the peer answered for all of
//!   it and refused none of it. The ones that lost to a newer version the
//!   peer holds are remembered with it (as many), so their writer can
//!   stamp them again.

use std::collections::VecDeque;

use dhrt_proto::{Mutation, Stamp};

use crate::batch::{mutation_bytes, next_batch_len};

/// Refused sequence numbers remembered: enough for every write still
/// waiting on its acknowledgement.
pub(crate) const REFUSED_KEPT: usize = 1 << 14;

/// How much a queue may hold.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Room {
    /// Mutations.
    pub(crate) items: usize,
    /// Their bytes, by `mutation_bytes`.
    pub(crate) bytes: usize,
}

/// The queue of one peer.
#[derive(Debug, Default)]
pub(crate) struct Queue {
    /// Sequence number of the last mutation pushed.
    last_seq: u64,
    items: VecDeque<(u64, Mutation)>,
    /// `mutation_bytes` of `items`, summed.
    bytes: usize,
    /// Mutations were dropped for lack of room.
    pub(crate) overflowed: bool,
    /// Recent mutations the peer refused (not stored there).
    refused: VecDeque<u64>,
    /// Recent mutations that lost to a newer version the peer holds, with
    /// that version (the latest `REFUSED_KEPT`).
    newer: VecDeque<(u64, Stamp)>,
}

impl Queue {
    /// Queues `mutations` within `room` (dropping the oldest first, never
    /// these); returns their first and last sequence numbers.
    pub(crate) fn push(&mut self, mutations: &[Mutation], room: Room) -> (u64, u64) {
        let incoming: usize = mutations.iter().map(mutation_bytes).sum();
        // Keep the newest; anti-entropy repairs the rest.
        while let Some((_, oldest)) = self.items.front()
            && (self.items.len() + mutations.len() > room.items
                || self.bytes + incoming > room.bytes)
        {
            self.bytes -= mutation_bytes(oldest);
            self.items.pop_front();
            self.overflowed = true;
        }
        let first = self.last_seq + 1;
        for m in mutations {
            self.last_seq += 1;
            self.items.push_back((self.last_seq, m.clone()));
        }
        self.bytes += incoming;
        (first, self.last_seq)
    }

    /// The next batch to send: at least one mutation when there are any,
    /// then as many as fit `max_bytes` and `max_items`.
    pub(crate) fn next_batch(&self, max_bytes: usize, max_items: usize) -> Vec<(u64, Mutation)> {
        let n = next_batch_len(
            self.items.iter().map(|(_, m)| mutation_bytes(m)),
            max_bytes,
            max_items,
        );
        self.items.iter().take(n).cloned().collect()
    }

    /// The peer answered for everything through `last`.
    pub(crate) fn ack_through(&mut self, last: u64) {
        while let Some((s, m)) = self.items.front()
            && *s <= last
        {
            self.bytes -= mutation_bytes(m);
            self.items.pop_front();
        }
    }

    /// The peer refused these mutations.
    pub(crate) fn refuse(&mut self, seqs: impl IntoIterator<Item = u64>) {
        for s in seqs {
            if self.refused.len() == REFUSED_KEPT {
                self.refused.pop_front();
            }
            self.refused.push_back(s);
        }
    }

    /// These mutations lost to the newer versions the peer holds.
    pub(crate) fn superseded(&mut self, lost: impl IntoIterator<Item = (u64, Stamp)>) {
        for l in lost {
            if self.newer.len() == REFUSED_KEPT {
                self.newer.pop_front();
            }
            self.newer.push_back(l);
        }
    }

    /// Whether any mutation is remembered as superseded.
    pub(crate) fn any_superseded(&self) -> bool {
        !self.newer.is_empty()
    }

    /// The mutations of `first..=last` that lost to a newer version the
    /// peer holds: their offsets from `first`, each with that version.
    pub(crate) fn superseded_in(&self, first: u64, last: u64) -> Vec<(usize, Stamp)> {
        self.newer
            .iter()
            .filter(|(s, _)| (first..=last).contains(s))
            .map(|&(s, v)| ((s - first) as usize, v))
            .collect()
    }

    /// Whether any refusal is remembered.
    pub(crate) fn any_refused(&self) -> bool {
        !self.refused.is_empty()
    }

    /// Whether the writes `first..=last` are acknowledged, the peer having
    /// answered through `acked`: all answered, none refused.
    pub(crate) fn acknowledged(&self, acked: u64, first: u64, last: u64) -> bool {
        acked >= last && !self.refused.iter().any(|s| (first..=last).contains(s))
    }

    /// Mutations waiting.
    pub(crate) fn len(&self) -> usize {
        self.items.len()
    }

    /// Their bytes, by `mutation_bytes`.
    pub(crate) fn bytes(&self) -> usize {
        self.bytes
    }

    /// Forgets everything waiting (the peer left): returns the last
    /// sequence number, to count as answered.
    pub(crate) fn clear(&mut self) -> u64 {
        self.items.clear();
        self.bytes = 0;
        self.last_seq
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use dhrt_proto::Stamp;

    fn put(i: u64, len: usize) -> Mutation {
        Mutation::Put {
            collection: "c".into(),
            key: Bytes::from(i.to_string()),
            value: Some(Bytes::from(vec![0u8; len])),
            version: Stamp { ts: i, node: 1 },
        }
    }

    /// Room for `items` mutations, bytes no object.
    fn items(items: usize) -> Room {
        Room {
            items,
            bytes: usize::MAX,
        }
    }

    #[test]
    fn a_write_is_acknowledged_only_when_answered_and_not_refused() {
        let mut q = Queue::default();
        let a = q.push(&[put(1, 1), put(2, 1)], items(100));
        let b = q.push(&[put(3, 1)], items(100));
        assert_eq!((a, b), ((1, 2), (3, 3)));
        assert!(!q.acknowledged(0, a.0, a.1));
        let batch = q.next_batch(1 << 20, 100);
        assert_eq!(batch.len(), 3);
        // The peer answered for all three and refused the second.
        q.refuse([2]);
        q.ack_through(3);
        assert_eq!(q.len(), 0);
        assert!(!q.acknowledged(3, a.0, a.1), "refused inside the write");
        assert!(q.acknowledged(3, b.0, b.1));
        assert!(!q.acknowledged(2, b.0, b.1), "not answered yet");
    }

    #[test]
    fn the_newest_are_kept_and_the_push_itself_always_stays() {
        let mut q = Queue::default();
        for i in 0..10 {
            q.push(&[put(i, 1)], items(4));
        }
        assert_eq!(q.len(), 4);
        assert!(q.overflowed);
        // No room at all: the write itself still goes.
        let mut q = Queue::default();
        let (first, last) = q.push(&[put(1, 1), put(2, 1)], items(0));
        assert_eq!((first, last), (1, 2));
        assert_eq!(q.next_batch(1 << 20, 10).len(), 2);
    }

    #[test]
    fn batches_are_cut_by_bytes_and_a_large_one_goes_alone() {
        let mut q = Queue::default();
        q.push(
            &[put(1, 3_000_000), put(2, 3_000_000), put(3, 9_000_000)],
            items(100),
        );
        assert_eq!(q.next_batch(4 << 20, 4096).len(), 1);
        q.ack_through(1);
        assert_eq!(q.next_batch(4 << 20, 4096).len(), 1);
        q.ack_through(2);
        let alone = q.next_batch(4 << 20, 4096);
        assert_eq!(alone.len(), 1);
        assert_eq!(alone[0].0, 3);
    }

    #[test]
    fn the_queue_is_bounded_by_bytes_too_oldest_out_first() {
        let size = mutation_bytes(&put(0, 1000));
        let room = Room {
            items: 1000,
            bytes: 3 * size,
        };
        let mut q = Queue::default();
        q.push(&[put(1, 1000), put(2, 1000)], room);
        assert_eq!((q.len(), q.bytes()), (2, 2 * size));
        assert!(!q.overflowed);
        q.push(&[put(3, 1000)], room);
        assert_eq!((q.len(), q.bytes()), (3, 3 * size));
        assert!(!q.overflowed, "exactly full is not over");
        // One more byte's worth: the oldest goes, before the push.
        let (first, last) = q.push(&[put(4, 1000)], room);
        assert_eq!((first, last), (4, 4));
        assert!(q.overflowed);
        assert_eq!((q.len(), q.bytes()), (3, 3 * size));
        let seqs: Vec<u64> = q
            .next_batch(usize::MAX, 100)
            .iter()
            .map(|(s, _)| *s)
            .collect();
        assert_eq!(seqs, [2, 3, 4]);
        // A write larger than the whole room still goes, alone.
        q.push(&[put(5, 10_000)], room);
        assert_eq!(q.len(), 1);
        assert_eq!(q.bytes(), mutation_bytes(&put(5, 10_000)));
        // Answers and a clear give the bytes back.
        q.push(
            &[put(6, 1)],
            Room {
                items: 1000,
                bytes: usize::MAX,
            },
        );
        q.ack_through(5);
        assert_eq!(q.bytes(), mutation_bytes(&put(6, 1)));
        q.clear();
        assert_eq!((q.len(), q.bytes()), (0, 0));
    }

    #[test]
    fn superseded_writes_are_told_by_offset_within_their_range() {
        let mut q = Queue::default();
        let room = items(10);
        let a = q.push(&[put(1, 1), put(2, 1)], room);
        let b = q.push(&[put(3, 1), put(4, 1)], room);
        let v = Stamp { ts: 7, node: 1 };
        q.superseded([(a.1, v), (b.0 + 1, v)]);
        assert_eq!(q.superseded_in(a.0, a.1), vec![(1, v)]);
        assert_eq!(q.superseded_in(b.0, b.1), vec![(1, v)]);
        for i in 0..REFUSED_KEPT as u64 {
            q.superseded([(100 + i, v)]);
        }
        assert!(
            q.superseded_in(a.0, b.1).is_empty(),
            "bounded: the oldest go"
        );
    }

    #[test]
    fn refusals_are_remembered_up_to_a_bound() {
        let mut q = Queue::default();
        q.refuse(0..(REFUSED_KEPT as u64 + 10));
        assert!(q.any_refused());
        assert!(q.acknowledged(20, 0, 5), "the oldest were forgotten");
        assert!(!q.acknowledged(u64::MAX, REFUSED_KEPT as u64, REFUSED_KEPT as u64));
    }
}
