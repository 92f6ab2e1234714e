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
    /// broken connection) without an answer since, the bytes the link had
    /// moved then, and when it last failed.
    pub(super) unreachable: Mutex<Option<Failing>>,
}

/// A peer's link failing: see [`Peer::unreachable`].
#[derive(Debug, Clone, Copy)]
pub(super) struct Failing {
    since: Instant,
    moved: u64,
    last: Instant,
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
    /// answered is kept (anew if bytes moved since: a retry got through,
    /// then failed), and this one as the last.
    pub(super) fn failed(&self) {
        let (now, moved) = (Instant::now(), self.link.moved());
        let mut unreachable = self.unreachable.lock().unwrap();
        match &mut *unreachable {
            Some(f) if moved.saturating_sub(f.moved) < MIN_MOVED => f.last = now,
            other => {
                *other = Some(Failing {
                    since: now,
                    moved,
                    last: now,
                });
            }
        }
    }

    /// It answered.
    pub(super) fn answered(&self) {
        *self.unreachable.lock().unwrap() = None;
    }

    /// When a write sent at `started` stops waiting for it: `timeout` after
    /// its link began to fail (or after `started`, if later), once an
    /// attempt made since `started` failed too (one from before may be
    /// followed by a peer back up), unless the link moved bytes since (a
    /// dial that got through, a large value on its way). `None` while it
    /// is not failing: the write waits its whole time (a large value's
    /// transfer time included), as for a peer that is slow, not gone.
    pub(super) fn given_up_at(&self, started: Instant, timeout: Duration) -> Option<Instant> {
        let f = (*self.unreachable.lock().unwrap())?;
        (f.last >= started && self.link.moved().saturating_sub(f.moved) < MIN_MOVED)
            .then(|| f.since.max(started) + timeout)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use tokio::time::{Instant, advance};

    use super::Peer;
    use crate::link::{Dialer, Link, TcpConnector};

    /// A write stops waiting for a peer whose link fails a timeout after
    /// the failure (or after the write, if later), but only once an
    /// attempt made since the write failed: one from before may be
    /// followed by the peer back up. An answer ends it.
    #[tokio::test(start_paused = true)]
    async fn a_failing_peer_is_given_up_a_timeout_after_a_failure_since_the_write() {
        let dialer = Dialer {
            me: 1,
            secret: b"secret"[..].into(),
            max_frame: 1 << 20,
            connector: Arc::new(TcpConnector),
        };
        let link = || Link::new("127.0.0.1:9".into(), dialer.clone());
        let peer = Peer::new(2, link(), link());
        let (timeout, ms) = (Duration::from_millis(500), Duration::from_millis);
        let started = Instant::now();
        assert_eq!(peer.given_up_at(started, timeout), None);
        advance(ms(100)).await;
        peer.failed();
        assert_eq!(peer.given_up_at(started, timeout), Some(started + ms(600)));
        advance(ms(100)).await;
        let later = Instant::now();
        assert_eq!(peer.given_up_at(later, timeout), None);
        advance(ms(100)).await;
        peer.failed();
        // Counted from the later write, the first failure being older.
        assert_eq!(peer.given_up_at(later, timeout), Some(later + timeout));
        assert_eq!(peer.given_up_at(started, timeout), Some(started + ms(600)));
        peer.answered();
        assert_eq!(peer.given_up_at(later, timeout), None);
    }
}
