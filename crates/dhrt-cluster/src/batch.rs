//! Cutting streams of mutations into frames. Pure.
//!
//! Rule: a batch is cut *before* a mutation would take it past its byte
//! budget or its item count, so no batch is larger than the budget unless
//! it holds a single mutation larger than the budget, which then travels
//! alone. Every value the API accepts (16 MiB by default) fits a frame
//! alone: the frame limit leaves room for the largest value and its key.

use bytes::Bytes;
use dhrt_proto::Mutation;

/// The bytes `m` takes in a frame, near enough: its key, value and
/// collection name plus a fixed allowance for the rest.
pub(crate) fn mutation_bytes(m: &Mutation) -> usize {
    match m {
        Mutation::Put {
            collection,
            key,
            value,
            ..
        } => 48 + collection.len() + key.len() + value.as_ref().map_or(0, Bytes::len),
        Mutation::Drop { collection, .. } => 32 + collection.len(),
    }
}

/// Builds batches of mutations under a byte budget and an item count.
#[derive(Debug)]
pub(crate) struct Batcher {
    max_bytes: usize,
    max_items: usize,
    items: Vec<Mutation>,
    bytes: usize,
}

impl Batcher {
    /// An empty batcher.
    pub(crate) fn new(max_bytes: usize, max_items: usize) -> Self {
        Batcher {
            max_bytes,
            max_items: max_items.max(1),
            items: Vec::new(),
            bytes: 0,
        }
    }

    /// Adds `m`; returns the batch to send first, if `m` would not fit in
    /// the one being built.
    pub(crate) fn push(&mut self, m: Mutation) -> Option<Vec<Mutation>> {
        let size = mutation_bytes(&m);
        let full = !self.items.is_empty()
            && (self.bytes + size > self.max_bytes || self.items.len() >= self.max_items);
        let out = full.then(|| self.take());
        self.bytes += size;
        self.items.push(m);
        out
    }

    /// The batch being built, if it holds anything.
    pub(crate) fn finish(&mut self) -> Option<Vec<Mutation>> {
        (!self.items.is_empty()).then(|| self.take())
    }

    fn take(&mut self) -> Vec<Mutation> {
        self.bytes = 0;
        std::mem::take(&mut self.items)
    }
}

/// How many of `sizes` (in order) go in the next batch: at least one, and
/// then as many as fit `max_bytes` and `max_items`.
pub(crate) fn next_batch_len(
    sizes: impl IntoIterator<Item = usize>,
    max_bytes: usize,
    max_items: usize,
) -> usize {
    let mut bytes = 0;
    let mut n = 0;
    for size in sizes {
        if n > 0 && (bytes + size > max_bytes || n >= max_items) {
            break;
        }
        bytes += size;
        n += 1;
    }
    n
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use dhrt_proto::Stamp;
    use proptest::prelude::*;

    fn put(value_len: usize) -> Mutation {
        Mutation::Put {
            collection: "c".into(),
            key: Bytes::from_static(b"k"),
            value: Some(Bytes::from(vec![7u8; value_len])),
            version: Stamp { ts: 1, node: 1 },
        }
    }

    fn batches(sizes: &[usize], max_bytes: usize, max_items: usize) -> Vec<Vec<Mutation>> {
        let mut b = Batcher::new(max_bytes, max_items);
        let mut out = Vec::new();
        for &s in sizes {
            out.extend(b.push(put(s)));
        }
        out.extend(b.finish());
        out
    }

    #[test]
    fn a_large_value_travels_alone_and_is_not_joined_by_smaller_ones() {
        // The join that never finished: 40 values of 100 KB and one of 15 MB.
        let mut sizes = vec![100_000; 20];
        sizes.push(15_000_000);
        sizes.extend([100_000; 20]);
        let out = batches(&sizes, 4 << 20, 4096);
        let big: Vec<_> = out
            .iter()
            .filter(|b| b.iter().map(mutation_bytes).sum::<usize>() > 4 << 20)
            .collect();
        assert_eq!(big.len(), 1);
        assert_eq!(big[0].len(), 1, "the 15 MB value shares its frame");
        assert_eq!(out.iter().map(Vec::len).sum::<usize>(), 41);
    }

    #[test]
    fn next_batch_len_takes_at_least_one() {
        assert_eq!(next_batch_len([10, 10, 10], 25, 100), 2);
        assert_eq!(next_batch_len([100, 10], 25, 100), 1);
        assert_eq!(next_batch_len([1, 1, 1], 25, 2), 2);
        assert_eq!(next_batch_len(std::iter::empty(), 25, 2), 0);
    }

    proptest! {
        #[test]
        fn batches_keep_order_and_stay_under_budget_unless_alone(
            sizes in proptest::collection::vec(0usize..3000, 0..60),
            max_bytes in 100usize..5000,
            max_items in 1usize..8,
        ) {
            let out = batches(&sizes, max_bytes, max_items);
            let flat: Vec<usize> = out
                .iter()
                .flatten()
                .map(|m| match m {
                    Mutation::Put { value, .. } => value.as_ref().unwrap().len(),
                    Mutation::Drop { .. } => unreachable!(),
                })
                .collect();
            prop_assert_eq!(flat, sizes.clone());
            for b in &out {
                prop_assert!(!b.is_empty());
                prop_assert!(b.len() <= max_items);
                let bytes: usize = b.iter().map(mutation_bytes).sum();
                prop_assert!(b.len() == 1 || bytes <= max_bytes, "{} bytes in {}", bytes, b.len());
            }
            // The same cut as the queue's.
            let mut rest: Vec<usize> = sizes.iter().map(|&s| mutation_bytes(&put(s))).collect();
            for b in &out {
                prop_assert_eq!(next_batch_len(rest.iter().copied(), max_bytes, max_items), b.len());
                rest.drain(..b.len());
            }
        }
    }
}
