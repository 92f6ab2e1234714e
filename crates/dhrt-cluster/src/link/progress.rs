//! Time for a large value to cross a slow link, apart from the time a peer
//! has to answer: a request carrying many MiB is allowed the time its frame
//! takes at [`FLOOR_RATE`] on top of its timeout; and bytes moving on a
//! connection, either way, tell a slow transfer from a peer that does not
//! answer: while the connection carries at least [`MIN_MOVED`] bytes per
//! timeout, the wait goes on, up to [`MOST_EXTRA`] beyond it.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The slowest link a frame is given time for: 1 MiB/s (16 s for a value at
/// the 16 MiB limit).
pub(crate) const FLOOR_RATE: u64 = 1 << 20;

/// How long a frame of `len` bytes takes at [`FLOOR_RATE`].
pub(crate) fn transfer_time(len: usize) -> Duration {
    Duration::from_millis(len as u64 * 1000 / FLOOR_RATE)
}

/// Bytes that must move on a connection within one timeout for a request
/// on it to be waited for longer: far above what gossip and small answers
/// carry, far below any link that moves a large value.
pub(crate) const MIN_MOVED: u64 = 32 << 10;

/// The longest a request is waited for beyond its timeout while its
/// connection moves bytes: 16 MiB at about 56 KiB/s.
pub(crate) const MOST_EXTRA: Duration = Duration::from_secs(300);

/// Bytes moved on one connection so far, both ways.
#[derive(Debug, Default)]
pub(crate) struct Moved(AtomicU64);

impl Moved {
    pub(crate) fn total(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }

    fn add(&self, n: usize) {
        self.0.fetch_add(n as u64, Ordering::Relaxed);
    }
}

/// A half of a connection that counts the bytes it moves.
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

impl<S: AsyncWrite + Unpin> AsyncWrite for Counting<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = r {
            this.moved.add(n);
        }
        r
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}
