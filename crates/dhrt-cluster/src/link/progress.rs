//! Time for a large value to cross a slow link, apart from the time a peer
//! has to answer: a request carrying many MiB is allowed the time its frame
//! takes at [`FLOOR_RATE`] on top of its timeout; and bytes arriving, either
//! way, tell a slow transfer from a peer that does not answer: while at
//! least [`MIN_MOVED`] of them arrive per [`WINDOW`] (or per timeout, when
//! longer), the wait goes on, up to [`MOST_EXTRA`] beyond it. Bytes that
//! arrive here are counted as they are read; bytes that arrive at the peer,
//! as its [`Received`](dhrt_proto::PeerMessage::Received) notes say. What
//! this side writes is not counted: the kernel's buffers, and a relay's,
//! take many MiB that move nowhere when the peer has stopped.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, ReadBuf};

/// The slowest link a frame is given time for: 1 MiB/s (16 s for a value at
/// the 16 MiB limit).
pub(crate) const FLOOR_RATE: u64 = 1 << 20;

/// How long a frame of `len` bytes takes at [`FLOOR_RATE`].
pub(crate) fn transfer_time(len: usize) -> Duration {
    Duration::from_millis(len as u64 * 1000 / FLOOR_RATE)
}

/// Bytes that must arrive on a connection, either way, within a
/// [`WINDOW`] for a request on it to be waited for longer: 16 KiB/s, far
/// below any link that moves a large value, far above what small answers
/// carry.
pub(crate) const MIN_MOVED: u64 = 16 << 10;

/// The stretch over which a connection must move [`MIN_MOVED`] bytes (or
/// the request's timeout, when longer).
pub(crate) const WINDOW: Duration = Duration::from_secs(1);

/// The longest a request is waited for beyond its timeout while its
/// connection moves bytes: 16 MiB at about 56 KiB/s.
pub(crate) const MOST_EXTRA: Duration = Duration::from_secs(300);

/// Bytes that arrived on one connection so far: read here, and read by
/// the peer as its notes say, never more than this side has sent (a
/// lying peer cannot make a dead connection look alive for good).
#[derive(Debug, Default)]
pub(crate) struct Moved {
    here: AtomicU64,
    there: AtomicU64,
    sent: AtomicU64,
    /// The same bytes counted for the link, over all its connections.
    link: Arc<AtomicU64>,
}

impl Moved {
    /// Counting for a connection of the link whose count is `link`.
    pub(crate) fn for_link(link: Arc<AtomicU64>) -> Self {
        Moved {
            link,
            ..Moved::default()
        }
    }

    pub(crate) fn total(&self) -> u64 {
        self.here
            .load(Ordering::Relaxed)
            .saturating_add(self.there.load(Ordering::Relaxed))
    }

    /// The peer says it has read `bytes` of the connection so far.
    pub(crate) fn received(&self, bytes: u64) {
        let sent = self.sent.load(Ordering::Relaxed);
        let new = bytes.min(sent);
        let old = self.there.fetch_max(new, Ordering::Relaxed);
        if new > old {
            self.link.fetch_add(new - old, Ordering::Relaxed);
        }
    }

    /// `n` more bytes are being written to the peer.
    pub(crate) fn sending(&self, n: usize) {
        self.sent.fetch_add(n as u64, Ordering::Relaxed);
    }

    fn add(&self, n: usize) {
        self.here.fetch_add(n as u64, Ordering::Relaxed);
        self.link.fetch_add(n as u64, Ordering::Relaxed);
    }
}

/// The reading half of a connection, counting the bytes it reads.
pub(crate) struct Counting<S> {
    inner: S,
    moved: Arc<Moved>,
}

impl<S> Counting<S> {
    pub(crate) fn new(inner: S, moved: Arc<Moved>) -> Self {
        Counting { inner, moved }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Counting<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let r = Pin::new(&mut this.inner).poll_read(cx, buf);
        this.moved.add(buf.filled().len() - before);
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_peer_is_believed_only_up_to_what_was_sent_to_it() {
        let link = Arc::new(AtomicU64::new(0));
        let moved = Moved::for_link(link.clone());
        moved.received(1 << 40);
        assert_eq!(moved.total(), 0, "nothing was sent");
        moved.sending(1000);
        moved.received(u64::MAX);
        assert_eq!(moved.total(), 1000);
        // An older note moves nothing back.
        moved.received(10);
        assert_eq!(moved.total(), 1000);
        moved.add(24);
        assert_eq!(moved.total(), 1024);
        // The link counts the same bytes, and goes on over its next
        // connection.
        assert_eq!(link.load(Ordering::Relaxed), 1024);
        let next = Moved::for_link(link.clone());
        next.add(1);
        assert_eq!(link.load(Ordering::Relaxed), 1025);
    }
}
