//! A connection's work and its guard (a timeout, the shutdown signal) in one
//! task, with the guard polled only when something woke it. Both servers
//! (HTTP and binary) run their connections this way.
//!
//! `tokio::select!` polls every branch each time its task wakes, and a
//! connection's task wakes for every request: polling the guard each time
//! re-registers its timer and takes the shutdown signal's lock, per request,
//! for nothing. Here the guard gets a waker of its own that marks it woken
//! before waking the task; the work is polled on every wake, the guard only
//! after its waker fired (and once at the start). Runtime-agnostic: std and
//! an `AtomicWaker`.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, Wake, Waker};

/// Which of the two completed: the work (`Left`) or the guard (`Right`).
pub use futures_util::future::Either;
use futures_util::task::AtomicWaker;

/// The guard's waker: marks it woken, then wakes the task.
#[derive(Debug, Default)]
struct GuardWake {
    woken: AtomicBool,
    task: AtomicWaker,
}

impl Wake for GuardWake {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, Ordering::Release);
        self.task.wake();
    }
}

/// A guard, kept across many pieces of work: [`run`](Self::run) polls a
/// piece of work until it completes or the guard does. Once the guard has
/// completed, the caller is done with it (it is not polled again).
pub struct Beside<G> {
    guard: G,
    wake: Arc<GuardWake>,
    guard_waker: Waker,
}

impl<G> std::fmt::Debug for Beside<G> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Beside").finish_non_exhaustive()
    }
}

impl<G: Future + Unpin> Beside<G> {
    /// A guard to run work beside (pin it first if it is not `Unpin`).
    pub fn new(guard: G) -> Self {
        let wake = Arc::new(GuardWake {
            // The guard has never been polled: it has to be once.
            woken: AtomicBool::new(true),
            task: AtomicWaker::new(),
        });
        let guard_waker = Waker::from(wake.clone());
        Beside {
            guard,
            wake,
            guard_waker,
        }
    }

    /// Polls `main` until it completes (`Left`) or the guard does
    /// (`Right`).
    pub fn run<M: Future + Unpin>(&mut self, main: M) -> Run<'_, G, M> {
        Run { beside: self, main }
    }
}

/// The future of [`Beside::run`].
#[derive(Debug)]
pub struct Run<'a, G, M> {
    beside: &'a mut Beside<G>,
    main: M,
}

impl<G: Future + Unpin, M: Future + Unpin> Future for Run<'_, G, M> {
    type Output = Either<M::Output, G::Output>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = &mut *self;
        let beside = &mut *this.beside;
        // Registered before the flag is read: a wake in between is not lost.
        beside.wake.task.register(cx.waker());
        if beside.wake.woken.swap(false, Ordering::Acquire) {
            let mut guard_cx = Context::from_waker(&beside.guard_waker);
            if let Poll::Ready(out) = Pin::new(&mut beside.guard).poll(&mut guard_cx) {
                return Poll::Ready(Either::Right(out));
            }
        }
        Pin::new(&mut this.main).poll(cx).map(Either::Left)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;
    use std::time::Duration;

    use super::*;

    /// A future that counts its polls, wakes its task on the first 1000,
    /// and never completes.
    struct Counted<'a>(&'a AtomicUsize);

    impl Future for Counted<'_> {
        type Output = ();
        fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
            if self.0.fetch_add(1, Ordering::Relaxed) < 1000 {
                cx.waker().wake_by_ref();
            }
            Poll::Pending
        }
    }

    #[tokio::test(start_paused = true)]
    async fn the_guard_is_polled_only_when_woken_and_still_fires() {
        let (main_polls, guard_polls) = (AtomicUsize::new(0), AtomicUsize::new(0));
        let guard = async {
            guard_polls.fetch_add(1, Ordering::Relaxed);
            tokio::time::sleep(Duration::from_secs(1)).await;
            guard_polls.fetch_add(1, Ordering::Relaxed);
            "guard"
        };
        tokio::pin!(guard);
        let out = Beside::new(guard.as_mut()).run(Counted(&main_polls)).await;
        assert!(matches!(out, Either::Right("guard")));
        // The main future was polled on every wake (it woke the task 1000
        // times); the guard once at the start and once when its timer fired.
        assert_eq!(main_polls.load(Ordering::Relaxed), 1001);
        assert_eq!(guard_polls.load(Ordering::Relaxed), 2);
    }

    #[tokio::test]
    async fn the_main_future_completing_ends_it() {
        let guard = std::future::pending::<()>();
        tokio::pin!(guard);
        let main = Box::pin(async {
            tokio::task::yield_now().await;
            7
        });
        let mut beside = Beside::new(guard.as_mut());
        assert!(matches!(beside.run(main).await, Either::Left(7)));
        // The same guard goes on watching the next piece of work.
        let next = Box::pin(async { 8 });
        assert!(matches!(beside.run(next).await, Either::Left(8)));
    }
}
