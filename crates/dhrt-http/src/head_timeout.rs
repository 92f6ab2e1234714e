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

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;

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
        })
    }

    /// Bytes arrived: if no request was under way, a head starts now.
    fn arrived(&self) {
        if self.state.load(Ordering::Relaxed) == IDLE {
            let since = self.epoch.elapsed().as_nanos() as u64 + 1;
            self.state.store(since, Ordering::Relaxed);
        }
    }

    /// A request's head is complete (the service was called).
    pub(crate) fn head_complete(&self) {
        self.state.store(ANSWERING, Ordering::Relaxed);
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
        if buf.filled().len() > before {
            self.watch.arrived();
        }
        polled
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
            watch.arrived();
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
            watch.arrived();
            tokio::time::sleep(Duration::from_millis(200)).await;
            watch.head_complete();
            watch.arrived(); // a body arriving while answering
            tokio::time::sleep(Duration::from_millis(500)).await;
            watch.answered();
        }
        assert!(!expired.is_finished());
        // A head that keeps arriving: expired 300 ms after its first bytes.
        let started = Instant::now();
        watch.arrived();
        while !expired.is_finished() {
            tokio::time::sleep(Duration::from_millis(10)).await;
            watch.arrived();
        }
        assert_eq!(expired.await.unwrap(), Expired::Head);
        let took = started.elapsed();
        assert!(
            took >= limit && took <= limit + Duration::from_millis(20),
            "{took:?}"
        );
    }
}
