//! A change read from the log, as a watcher sends it, and what it holds
//! while it waits to be sent.
//!
//! An event read from the log is slices of the log file's map. Held by a
//! batch waiting for a client that reads slowly or not at all, a slice
//! keeps its file: once a compaction replaced it, its disk space stays
//! taken until the watch ends (the idle timeout, 300 s by default, or the
//! lag rule). A copy keeps no file, but costs the node memory of its own:
//! 48 clients stalled on 15 MiB values held 984 MiB of copies. So keys
//! and small values are copied always (what a stalled watcher holds of
//! them is a few batches of 256 KiB), and large values are copied while
//! the node's watchers hold fewer than [`Copies`]' budget of copies, and
//! shared (the map's pages) beyond it: memory stays bounded whatever the
//! clients do, and a file is kept only while that many bytes of large
//! values wait at once.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::Bytes;
use dhrt_proto::{EventKind, SHARE_AT_LEAST, Token, WatchEvent};
use dhrt_storage::{ChangeKind, Position, WatchEvent as StoreEvent};

use crate::cluster::stamp;

/// One of a count (a watch's place among the node's open watches, or its
/// running task), given back on drop.
#[derive(Debug)]
pub(crate) struct Tally(Arc<AtomicUsize>);

impl Tally {
    /// One more of `count`, and how many there were before.
    pub(crate) fn take(count: &Arc<AtomicUsize>) -> (Tally, usize) {
        (Tally(count.clone()), count.fetch_add(1, Ordering::AcqRel))
    }

    /// For [`dhrt_proto::EventSource::take_slot`].
    pub(crate) fn boxed(slot: &mut Option<Tally>) -> Option<Box<dyn Send + Sync>> {
        Some(Box::new(slot.take()?))
    }
}

impl Drop for Tally {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The node-wide budget of bytes of large values held as copies.
#[derive(Debug)]
pub(crate) struct Copies {
    held: AtomicUsize,
    budget: usize,
}

impl Copies {
    pub(crate) fn new(budget: usize) -> Arc<Copies> {
        Arc::new(Copies {
            held: AtomicUsize::new(0),
            budget,
        })
    }

    /// Bytes of copies held now.
    #[cfg(test)]
    pub(crate) fn held(&self) -> usize {
        self.held.load(Ordering::Acquire)
    }

    /// `b` as a watcher holds it: copied if it is small, or if the budget
    /// has room for it (the copy gives its share back when dropped);
    /// otherwise `b` itself.
    pub(crate) fn own(self: &Arc<Copies>, b: Bytes) -> Bytes {
        if b.len() < SHARE_AT_LEAST {
            return Bytes::copy_from_slice(&b);
        }
        let taken = self
            .held
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |held| {
                (held + b.len() <= self.budget).then_some(held + b.len())
            });
        if taken.is_err() {
            return b;
        }
        Bytes::from_owner(Counted {
            bytes: b.to_vec(),
            copies: self.clone(),
        })
    }
}

/// A large value's copy, counted in its budget while it lives.
struct Counted {
    bytes: Vec<u8>,
    copies: Arc<Copies>,
}

impl AsRef<[u8]> for Counted {
    fn as_ref(&self) -> &[u8] {
        &self.bytes
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.copies
            .held
            .fetch_sub(self.bytes.len(), Ordering::AcqRel);
    }
}

pub(crate) fn token(p: Position) -> Token {
    Token {
        history: p.history,
        seq: p.seq,
    }
}

/// The event as sent, its key and value held as [`Copies::own`] says.
pub(crate) fn event(e: StoreEvent, copies: &Arc<Copies>) -> WatchEvent {
    match e {
        StoreEvent::Initial {
            key,
            value,
            version,
        } => WatchEvent {
            kind: EventKind::Initial,
            key: copies.own(key),
            value: Some(copies.own(value)),
            version: Some(stamp(version)),
            token: None,
        },
        StoreEvent::InitialDone(p) => WatchEvent {
            kind: EventKind::Synced,
            key: Bytes::new(),
            value: None,
            version: None,
            token: Some(token(p)),
        },
        StoreEvent::Change(c) => WatchEvent {
            kind: match c.kind {
                ChangeKind::Set => EventKind::Set,
                ChangeKind::Delete => EventKind::Delete,
                ChangeKind::Drop => EventKind::Drop,
            },
            key: copies.own(c.key),
            value: c.value.map(|v| copies.own(v)),
            version: Some(stamp(c.version)),
            token: Some(token(c.position)),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn large_values_are_copied_within_the_budget_and_shared_beyond_it() {
        let copies = Copies::new(3 * SHARE_AT_LEAST);
        let large = Bytes::from(vec![7u8; 2 * SHARE_AT_LEAST]);
        let small = Bytes::from(vec![1u8; SHARE_AT_LEAST - 1]);
        let first = copies.own(large.clone());
        assert_eq!(first, large);
        assert_ne!(first.as_ptr(), large.as_ptr(), "a copy");
        assert_eq!(copies.held(), 2 * SHARE_AT_LEAST);
        let second = copies.own(large.clone());
        assert_eq!(second.as_ptr(), large.as_ptr(), "over the budget: shared");
        let tiny = copies.own(small.clone());
        assert_ne!(tiny.as_ptr(), small.as_ptr(), "small: always a copy");
        assert_eq!(
            copies.held(),
            2 * SHARE_AT_LEAST,
            "small copies are not counted"
        );
        // A slice of a copy still holds its share; the last one gives it back.
        let part = first.slice(10..20);
        drop(first);
        assert_eq!(copies.held(), 2 * SHARE_AT_LEAST);
        drop(part);
        assert_eq!(copies.held(), 0);
        let third = copies.own(large.clone());
        assert_ne!(third.as_ptr(), large.as_ptr(), "room again: a copy");
    }
}
