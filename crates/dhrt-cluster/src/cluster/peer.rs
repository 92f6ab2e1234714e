//! One peer as replication sees it: its links, the writes queued for it,
//! and whether it can be reached now. Invariant: a peer is given up on by
//! a write waiting for it only while its link fails and moves nothing; a
//! write it was given up on stays queued for it (a hint).

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

use crate::link::{Link, MIN_MOVED};
use crate::queue::Queue;

/// One peer: its connection and the writes on their way to it.
#[derive(Debug)]
pub(super) struct Peer {
    pub(super) id: u64,
    pub(super) link: Link,
    /// Membership's own connection to the peer: a probe never waits behind
    /// a large value crossing a slow link on `link`, which would make a
    /// busy peer look dead.
    pub(super) gossip: Link,
    /// Cached: whether the peer's queue remembers refusals, so a waiter
    /// takes the queue's lock only when there are some.
    pub(super) any_refused: AtomicBool,
    /// Cached: whether the peer's queue remembers writes that lost to a
    /// newer version the peer holds.
    pub(super) any_superseded: AtomicBool,
    /// Why the peer last refused writes, for the client told that its
    /// write concern was not met.
    pub(super) refusal: Mutex<String>,
    pub(super) queue: Mutex<Queue>,
    pub(super) wake: Notify,
    /// Sequence number of the last mutation the peer acknowledged.
    pub(super) acked: AtomicU64,
    pub(super) gone: AtomicBool,
    /// Since when its link has failed to reach it (a refused dial, a
    /// broken connection) without an answer since, and the bytes the link
    /// had moved then.
    pub(super) unreachable: Mutex<Option<(Instant, u64)>>,
}

impl Peer {
    pub(super) fn new(id: u64, link: Link, gossip: Link) -> Peer {
        Peer {
            id,
            link,
            gossip,
            any_refused: AtomicBool::new(false),
            any_superseded: AtomicBool::new(false),
            refusal: Mutex::default(),
            queue: Mutex::new(Queue::default()),
            wake: Notify::new(),
            acked: AtomicU64::new(0),
            gone: AtomicBool::new(false),
            unreachable: Mutex::new(None),
        }
    }

    /// Its link failed to reach it: the first failure since it last
    /// answered is kept.
    pub(super) fn failed(&self) {
        let mut unreachable = self.unreachable.lock().unwrap();
        if unreachable.is_none() {
            *unreachable = Some((Instant::now(), self.link.moved()));
        }
    }

    /// It answered.
    pub(super) fn answered(&self) {
        *self.unreachable.lock().unwrap() = None;
    }

    /// When a write sent at `started` stops waiting for it: `timeout` after
    /// its link began to fail (or after `started`, if later), unless the
    /// link moved bytes since (a dial that got through, a large value on
    /// its way). `None` while it is not failing: the write waits its whole
    /// time (a large value's transfer time included), as for a peer that is
    /// slow rather than gone.
    pub(super) fn given_up_at(&self, started: Instant, timeout: Duration) -> Option<Instant> {
        let (since, moved) = (*self.unreachable.lock().unwrap())?;
        (self.link.moved().saturating_sub(moved) < MIN_MOVED).then(|| since.max(started) + timeout)
    }
}
