//! The header-read and idle timeouts, kept per connection instead of per
//! request.
//!
//! hyper's own `header_read_timeout` arms a fresh timer for every request
//! (an allocation and two timer-wheel updates each). Here the connection's
//! reads note when a request's first bytes arrived, the service notes when
//! its head was complete and when it was answered, and one timer per
//! connection, re-armed lazily, closes the connection when a head has been
//! arriving for longer than the header limit (a client that trickles its
//! headers), or when no request has come for longer than the idle limit (a
//! keep-alive connection nobody uses).
//!
//! The same reads count the bytes of the head under way, before anyone
//! could have shown a token: past [`FREE_HEAD`] bytes a head draws on one
//! budget shared by every connection ([`HEAD_BUDGET`]), and a connection
//! whose head finds it spent is closed. Without it, every connection could
//! hold hyper's whole read buffer of unfinished headers (about 400 KiB:
//! 4.4 GB held by a stranger's 9,800 connections, each sending headers and
//! never ending them). (Capping hyper's buffer instead, `max_buf_size`,
//! caps its write buffer too, and a watch whose client reads nothing then
//! held a stopping node for good.)

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;

/// Bytes of a head a connection may hold without drawing on the shared
/// [`HEAD_BUDGET`] (a request's headers are rarely 2 KiB).
pub(crate) const FREE_HEAD: u64 = 8 << 10;

/// Bytes past [`FREE_HEAD`] that unfinished heads may hold, all connections
/// together: room for about 650 heads at once that carry the longest keys.
pub(crate) const HEAD_BUDGET: u64 = 64 << 20;

/// Bytes of unfinished heads drawn on [`HEAD_BUDGET`] now.
static HEAD_DRAWN: AtomicU64 = AtomicU64::new(0);

/// No request under way: waiting for one.
const IDLE: u64 = 0;
/// A request's head is complete; it is being answered.
const ANSWERING: u64 = u64::MAX;

/// What the connection is doing, shared by its reads, its service and its
/// timer.
#[derive(Debug)]
pub(crate) struct HeadWatch {
    epoch: Instant,
    /// [`IDLE`], [`ANSWERING`], or 1 + the nanoseconds since `epoch` at
    /// which the first bytes of a head arrived.
    state: AtomicU64,
    /// Nanoseconds since `epoch` at which the last request was answered.
    idle_since: AtomicU64,
    /// Bytes of the head under way so far (read only by the connection's
    /// reads, reset when a head starts).
    head_bytes: AtomicU64,
    /// Of those, the bytes drawn on [`HEAD_BUDGET`].
    drawn: AtomicU64,
}

/// Which limit a connection passed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Expired {
    /// A head took longer than the header limit.
    Head,
    /// No request came within the idle limit.
    Idle,
}

impl HeadWatch {
    pub(crate) fn new() -> Arc<Self> {
        Arc::new(HeadWatch {
            epoch: Instant::now(),
            state: AtomicU64::new(IDLE),
            idle_since: AtomicU64::new(0),
            head_bytes: AtomicU64::new(0),
            drawn: AtomicU64::new(0),
        })
    }

    /// `n` bytes arrived: if no request was under way, a head starts now.
    /// Returns `false` when they belong to a head that finds the shared
    /// budget of unfinished heads spent: the connection is to be closed.
    fn arrived(&self, n: u64) -> bool {
        match self.state.load(Ordering::Relaxed) {
            IDLE => {
                let since = self.epoch.elapsed().as_nanos() as u64 + 1;
                self.state.store(since, Ordering::Relaxed);
                self.head_bytes.store(0, Ordering::Relaxed);
            }
            // A body, or the next request sent early (hyper's read
            // buffer, about 400 KiB, bounds that).
            ANSWERING => return true,
            _ => {}
        }
        let bytes = self.head_bytes.fetch_add(n, Ordering::Relaxed) + n;
        let want = bytes.saturating_sub(FREE_HEAD);
        let more = want.saturating_sub(self.drawn.load(Ordering::Relaxed));
        if more == 0 {
            return true;
        }
        if HEAD_DRAWN.fetch_add(more, Ordering::AcqRel) + more > HEAD_BUDGET {
            HEAD_DRAWN.fetch_sub(more, Ordering::AcqRel);
            return false;
        }
        self.drawn.fetch_add(more, Ordering::Relaxed);
        true
    }

    /// Gives back what the head under way drew on the shared budget.
    fn give_back(&self) {
        let drawn = self.drawn.swap(0, Ordering::Relaxed);
        if drawn > 0 {
            HEAD_DRAWN.fetch_sub(drawn, Ordering::AcqRel);
        }
    }

    /// A request's head is complete (the service was called).
    pub(crate) fn head_complete(&self) {
        self.state.store(ANSWERING, Ordering::Relaxed);
        self.give_back();
    }

    /// Bytes of an answer went out: a client reading a long answer (a
    /// listing streamed for minutes) is not idle. Only a connection on
    /// which nothing moves either way is.
    fn wrote(&self) {
        if self.state.load(Ordering::Relaxed) == IDLE {
            let now = self.epoch.elapsed().as_nanos() as u64;
            self.idle_since.store(now, Ordering::Relaxed);
        }
    }

    /// The request was answered; waiting for the next.
    pub(crate) fn answered(&self) {
        let now = self.epoch.elapsed().as_nanos() as u64;
        self.idle_since.store(now, Ordering::Relaxed);
        self.state.store(IDLE, Ordering::Relaxed);
    }

    /// Completes once a head has been arriving for longer than `head`, or
    /// the connection has waited for a request for longer than `idle`.
    /// (A request being answered, however long it takes, is neither.)
    pub(crate) async fn expired(&self, head: Duration, idle: Duration) -> Expired {
        let sleep = tokio::time::sleep(head.min(idle));
        tokio::pin!(sleep);
        loop {
            sleep.as_mut().await;
            let now = Instant::now();
            let deadline = match self.state.load(Ordering::Relaxed) {
                IDLE => {
                    let since = Duration::from_nanos(self.idle_since.load(Ordering::Relaxed));
                    // Woken at least every `head`, so that a head which
                    // starts meanwhile is timed from its first bytes.
                    match (self.epoch + since).checked_add(idle) {
                        Some(deadline) if now >= deadline => return Expired::Idle,
                        Some(deadline) => deadline.min(now + head),
                        None => now + head,
                    }
                }
                ANSWERING => now + head,
                started => {
                    let deadline = self.epoch + Duration::from_nanos(started - 1) + head;
                    if now >= deadline {
                        return Expired::Head;
                    }
                    deadline
                }
            };
            sleep.as_mut().reset(deadline);
        }
    }
}

/// A connection whose reads tell a [`HeadWatch`] when bytes arrive.
pub(crate) struct Watched<I> {
    pub(crate) inner: I,
    pub(crate) watch: Arc<HeadWatch>,
}

impl<I: AsyncRead + Unpin> AsyncRead for Watched<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        let n = (buf.filled().len() - before) as u64;
        if n > 0 && !self.watch.arrived(n) {
            // Once a second at most.
            static WARNED_AT: AtomicU64 = AtomicU64::new(0);
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            if WARNED_AT.swap(now, Ordering::Relaxed) != now {
                tracing::warn!(
                    "closing a connection whose request head passed {} KiB while unfinished heads of all connections hold {} MiB, the most allowed",
                    FREE_HEAD >> 10,
                    HEAD_BUDGET >> 20
                );
            }
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::OutOfMemory,
                "unfinished request heads hold all the memory allowed them",
            )));
        }
        polled
    }
}

impl<I> Drop for Watched<I> {
    fn drop(&mut self) {
        self.watch.give_back();
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for Watched<I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = polled
            && n > 0
        {
            self.watch.wrote();
        }
        polled
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = polled
            && n > 0
        {
            self.watch.wrote();
        }
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Heads past their free bytes draw on one budget: once it is spent,
    /// the next head that needs more is refused (its connection closed),
    /// and a head that completes gives its share back. Bodies draw nothing.
    #[test]
    fn heads_past_their_free_bytes_share_one_budget() {
        let mib = 1 << 20;
        let heads: Vec<_> = (0..HEAD_BUDGET / mib).map(|_| HeadWatch::new()).collect();
        for h in &heads {
            assert!(h.arrived(FREE_HEAD), "free bytes are free");
            assert!(h.arrived(mib));
        }
        let late = HeadWatch::new();
        assert!(late.arrived(FREE_HEAD), "free bytes are free");
        assert!(!late.arrived(mib), "the budget is spent");
        heads[0].head_complete();
        let next = HeadWatch::new();
        assert!(next.arrived(FREE_HEAD + mib), "a completed head gave back");
        assert!(heads[0].arrived(16 * mib), "a body draws nothing");
        for h in heads.iter().chain([&late, &next]) {
            h.head_complete();
        }
        assert_eq!(HEAD_DRAWN.load(Ordering::Acquire), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_idle_for_too_long_expires_and_one_answering_does_not() {
        let (head, idle) = (Duration::from_millis(300), Duration::from_secs(2));
        let watch = HeadWatch::new();
        let expired = {
            let watch = watch.clone();
            tokio::spawn(async move { watch.expired(head, idle).await })
        };
        // Requests, each answered slowly (longer than either limit).
        for _ in 0..5 {
            tokio::time::sleep(Duration::from_millis(1500)).await;
            assert!(watch.arrived(1));
            watch.head_complete();
            tokio::time::sleep(Duration::from_secs(10)).await;
            watch.answered();
        }
        assert!(!expired.is_finished());
        // A long answer being read: bytes going out keep it.
        for _ in 0..10 {
            tokio::time::sleep(Duration::from_secs(1)).await;
            watch.wrote();
        }
        assert!(!expired.is_finished());
        let started = Instant::now();
        assert_eq!(expired.await.unwrap(), Expired::Idle);
        let took = started.elapsed();
        assert!(
            took >= idle && took <= idle + Duration::from_millis(20),
            "{took:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn only_a_head_arriving_for_too_long_expires() {
        let limit = Duration::from_millis(300);
        let watch = HeadWatch::new();
        let expired = {
            let watch = watch.clone();
            tokio::spawn(async move { watch.expired(limit, Duration::from_secs(3600)).await })
        };
        // Idle for a long time: not expired.
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert!(!expired.is_finished());
        // Requests whose heads complete in time, some answered slowly.
        for _ in 0..10 {
            assert!(watch.arrived(1));
            tokio::time::sleep(Duration::from_millis(200)).await;
            watch.head_complete();
            assert!(watch.arrived(1)); // a body arriving while answering
            tokio::time::sleep(Duration::from_millis(500)).await;
            watch.answered();
        }
        assert!(!expired.is_finished());
        // A head that keeps arriving: expired 300 ms after its first bytes.
        let started = Instant::now();
        assert!(watch.arrived(1));
        while !expired.is_finished() {
            tokio::time::sleep(Duration::from_millis(10)).await;
            assert!(watch.arrived(1));
        }
        assert_eq!(expired.await.unwrap(), Expired::Head);
        let took = started.elapsed();
        assert!(
            took >= limit && took <= limit + Duration::from_millis(20),
            "{took:?}"
        );
    }
}
