//! Log lines that strangers can cause, throttled: a refused peer or a full
//! connection limit is worth a warning, not one per attempt (a flood would
//! write gigabytes of log a day).

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// At most one line per interval from one call site; the lines left out
/// are counted and reported with the next.
#[derive(Debug)]
pub struct LogThrottle {
    /// Milliseconds since [`epoch`] before which no line is written.
    next_ms: AtomicU64,
    suppressed: AtomicU64,
    interval: Duration,
}

fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

impl LogThrottle {
    /// One line per `interval` at most.
    pub const fn new(interval: Duration) -> Self {
        LogThrottle {
            next_ms: AtomicU64::new(0),
            suppressed: AtomicU64::new(0),
            interval,
        }
    }

    /// `Some(n)` when a line may be written now, `n` being how many were
    /// left out since the last; `None` when this one is left out.
    pub fn allow(&self) -> Option<u64> {
        let now = epoch().elapsed().as_millis() as u64;
        let next = self.next_ms.load(Ordering::Relaxed);
        let later = now + self.interval.as_millis() as u64;
        if now >= next
            && self
                .next_ms
                .compare_exchange(next, later, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            return Some(self.suppressed.swap(0, Ordering::Relaxed));
        }
        self.suppressed.fetch_add(1, Ordering::Relaxed);
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_per_interval_and_the_rest_counted() {
        let t = LogThrottle::new(Duration::from_millis(200));
        assert_eq!(t.allow(), Some(0));
        for _ in 0..1000 {
            assert_eq!(t.allow(), None);
        }
        std::thread::sleep(Duration::from_millis(250));
        assert_eq!(t.allow(), Some(1000));
        assert_eq!(t.allow(), None);
    }
}
