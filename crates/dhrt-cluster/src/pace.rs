//! The pace of moves, handoffs and repairs: bytes per second that one
//! node sends to others to move collections (a handover, the streamed
//! handoff of a newcomer), and, on a pacer of its own at the same rate,
//! that anti-entropy pushes or pulls (every catch-up: a returning node, a
//! healed partition, a re-sync, a raised replication factor). Client
//! traffic and replication of live writes are never paced; a join or a
//! change of replication factor cannot starve them.

use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// A virtual clock of sending: each batch takes its slot after the one
/// before it, and waits until its slot begins. A slot is `bytes / rate`
/// long; an idle pacer lets a burst of a tenth of a second through.
#[derive(Debug)]
pub(crate) struct Pacer {
    /// Bytes per second; 0 for no limit.
    rate: u64,
    next: Mutex<Option<Instant>>,
}

impl Pacer {
    pub(crate) fn new(rate: u64) -> Pacer {
        Pacer {
            rate,
            next: Mutex::new(None),
        }
    }

    /// How long a batch of `bytes` must wait before it is sent, its slot
    /// taken; zero when it may go now.
    pub(crate) fn reserve(&self, bytes: usize, now: Instant) -> Duration {
        if self.rate == 0 {
            return Duration::ZERO;
        }
        let burst = Duration::from_millis(100);
        let mut next = self.next.lock().unwrap();
        let earliest = now.checked_sub(burst).unwrap_or(now);
        let start = next.map_or(earliest, |n| n.max(earliest));
        let length = Duration::from_secs_f64(bytes as f64 / self.rate as f64);
        *next = Some(start + length);
        start.saturating_duration_since(now)
    }

    /// How large a batch to send at this pace: a tenth of a second's worth
    /// (at least 64 KiB, at most `most`), so a paced move flows instead of
    /// arriving in bursts seconds apart.
    pub(crate) fn batch_bytes(&self, most: usize) -> usize {
        if self.rate == 0 {
            return most;
        }
        usize::try_from(self.rate / 10)
            .unwrap_or(usize::MAX)
            .clamp(64 << 10, most.max(64 << 10))
    }

    /// Waits for the slot of a batch of `bytes`.
    pub(crate) async fn take(&self, bytes: usize) {
        let wait = self.reserve(bytes, Instant::now());
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_busy_pacer_spaces_batches_by_their_size_over_the_rate() {
        let p = Pacer::new(1 << 20); // 1 MiB/s
        let now = Instant::now();
        // The burst allowance: the first 100 ms worth go at once.
        assert_eq!(p.reserve(100 << 10, now), Duration::ZERO);
        // Then each 512 KiB waits half a second more than the one before.
        let _ = p.reserve(512 << 10, now);
        let b = p.reserve(512 << 10, now);
        let c = p.reserve(512 << 10, now);
        let d = p.reserve(512 << 10, now);
        for gap in [c - b, d - c] {
            assert!(gap >= Duration::from_millis(499) && gap <= Duration::from_millis(501));
        }
        let last = d;
        // 8 MiB in total over the next seconds cannot go faster than the rate.
        let mut last = last;
        for _ in 0..14 {
            last = p.reserve(512 << 10, now);
        }
        assert!(last >= Duration::from_millis(7_900), "{last:?}");
    }

    #[test]
    fn no_limit_never_waits_and_an_idle_pacer_starts_again_at_once() {
        let unlimited = Pacer::new(0);
        let now = Instant::now();
        for _ in 0..1000 {
            assert_eq!(unlimited.reserve(64 << 20, now), Duration::ZERO);
        }
        let p = Pacer::new(1 << 20);
        assert!(p.reserve(4 << 20, now) == Duration::ZERO);
        assert!(p.reserve(1, now) >= Duration::from_millis(3_900));
        // Long idle: the debt is in the past, nothing waits.
        assert_eq!(p.reserve(1, now + Duration::from_secs(10)), Duration::ZERO);
        // Batches of a tenth of a second, within bounds.
        assert_eq!(p.batch_bytes(4 << 20), 104_857);
        assert_eq!(Pacer::new(1000).batch_bytes(4 << 20), 64 << 10);
        assert_eq!(Pacer::new(1 << 40).batch_bytes(4 << 20), 4 << 20);
        assert_eq!(unlimited.batch_bytes(4 << 20), 4 << 20);
    }
}
