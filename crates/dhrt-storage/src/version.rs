//! Versions and the hybrid logical clock that stamps them.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// Bits of a timestamp that hold the logical counter; the rest hold
/// milliseconds since the Unix epoch.
pub const LOGICAL_BITS: u32 = 16;

/// The version of a write: a hybrid-logical-clock timestamp and the id of the
/// node that accepted the write. Versions order by `(ts, node)`; the greater
/// one wins (last-writer-wins), for sets, deletes and collection drops alike.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Version {
    /// Milliseconds since the Unix epoch shifted left by [`LOGICAL_BITS`],
    /// plus a logical counter in the low bits.
    pub ts: u64,
    /// The node that accepted the write.
    pub node: u64,
}

impl Version {
    /// The smallest version; every real write is greater.
    pub const ZERO: Version = Version { ts: 0, node: 0 };

    /// A version from its parts.
    pub const fn new(ts: u64, node: u64) -> Self {
        Version { ts, node }
    }

    /// The wall-clock part of the timestamp, in ms since the Unix epoch.
    pub const fn physical_ms(&self) -> u64 {
        self.ts >> LOGICAL_BITS
    }
}

/// Milliseconds since the Unix epoch by the wall clock.
pub fn wall_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// A hybrid logical clock (Kulkarni et al.): timestamps follow the wall clock
/// but never go backwards and always exceed every timestamp observed, so a
/// local write is newer than anything this node has seen.
#[derive(Debug)]
pub struct Clock {
    last: AtomicU64,
    node: u64,
    /// Added to the system's wall clock: zero in production; tests and
    /// simulations set it to give one node a clock that is off.
    offset_ms: i64,
    /// How far ahead of [`wall_ms`](Self::wall_ms) versions are stamped:
    /// the lead of the latest clock among the node's peers (within the
    /// offset they allow), set by the cluster. A node whose clock is behind
    /// then stamps a write after one a peer made earlier, though no peer
    /// is there to tell it (the owners down).
    lead_ms: AtomicU64,
    /// When the lead was last set, on the monotonic clock, and the time it
    /// stamped by then (wall plus lead, ms): what it reached, carried
    /// forward on a clock the wall clock's steps do not move.
    lead_set: std::sync::Mutex<Option<(std::time::Instant, u64)>>,
}

impl Clock {
    /// A clock for node `node`.
    pub fn new(node: u64) -> Self {
        Clock::with_offset(node, 0)
    }

    /// A clock for node `node` whose wall clock reads `offset_ms` away from
    /// the system's (fault injection: a node with a clock ahead or behind).
    pub fn with_offset(node: u64, offset_ms: i64) -> Self {
        Clock {
            last: AtomicU64::new(0),
            node,
            offset_ms,
            lead_ms: AtomicU64::new(0),
            lead_set: std::sync::Mutex::new(None),
        }
    }

    /// Stamps versions `lead_ms` ahead of this clock's wall time from now
    /// on (0: by its wall time). Versions never go below the time the lead
    /// reached: a smaller lead (the peer ahead gone) only lets the wall
    /// clock catch up, so a write made after one that peer stamped still
    /// comes after it.
    ///
    /// The time reached is carried forward from when the lead was last
    /// set on the monotonic clock, not read off the wall clock: a wall
    /// clock stepped forward (which the next lead makes up for) must not
    /// add the step to it. It is kept up to `limit_ms` (ms since the
    /// epoch) at most: the latest time this node admits now (a clock it no
    /// longer admits, e.g. one fixed after running hours ahead, must not
    /// leave this node holding a clock beyond its own limits).
    pub fn set_lead(&self, lead_ms: u64, limit_ms: u64) {
        let mut set = self.lead_set.lock().unwrap_or_else(|e| e.into_inner());
        let now = std::time::Instant::now();
        let before = self.lead_ms.load(Ordering::Relaxed);
        if lead_ms < before
            && let Some((at, reached)) = *set
        {
            let elapsed = now.duration_since(at).as_millis() as u64;
            // Raised before the smaller lead is stored: no version in
            // between is stamped below it.
            self.observe((reached + elapsed).min(limit_ms) << LOGICAL_BITS);
        }
        self.lead_ms.store(lead_ms, Ordering::Relaxed);
        *set = Some((now, self.wall_ms() + lead_ms));
    }

    /// This clock's wall time, in ms since the Unix epoch: the system's,
    /// shifted by the offset it was made with.
    pub fn wall_ms(&self) -> u64 {
        wall_ms().saturating_add_signed(self.offset_ms)
    }

    /// The greatest timestamp this clock produced or observed.
    pub fn last(&self) -> u64 {
        self.last.load(Ordering::Acquire)
    }

    /// The node id stamped into versions.
    pub fn node(&self) -> u64 {
        self.node
    }

    /// A fresh version, greater than every version this clock produced or
    /// observed.
    pub fn now(&self) -> Version {
        let physical = (self.wall_ms() + self.lead_ms.load(Ordering::Relaxed)) << LOGICAL_BITS;
        let mut last = self.last.load(Ordering::Relaxed);
        loop {
            let next = physical.max(last + 1);
            match self
                .last
                .compare_exchange_weak(last, next, Ordering::AcqRel, Ordering::Relaxed)
            {
                Ok(_) => return Version::new(next, self.node),
                Err(seen) => last = seen,
            }
        }
    }

    /// Merges a timestamp seen elsewhere (a replicated write, a recovered
    /// record) so later local versions are greater. Checking that `ts` is not
    /// too far in the future is the caller's job.
    pub fn observe(&self, ts: u64) {
        self.last.fetch_max(ts, Ordering::AcqRel);
    }

    /// How far `ts` lies ahead of this clock's wall time, in ms (0 if
    /// behind).
    pub fn ahead_ms(&self, ts: u64) -> u64 {
        (ts >> LOGICAL_BITS).saturating_sub(self.wall_ms())
    }
}

/// One write stamped elsewhere, for [`Store::apply_many`](crate::Store::apply_many):
/// the key, the value (`None` for a delete) and its version.
pub type Replicated<'a> = (&'a [u8], Option<&'a [u8]>, Version);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lead_stamps_ahead_of_the_wall_clock_and_never_goes_back() {
        let behind = Clock::with_offset(3, -5_000);
        let before = behind.now().ts >> LOGICAL_BITS;
        assert!(before + 4_000 < wall_ms(), "stamped by its own clock");
        behind.set_lead(5_000, u64::MAX);
        let led = behind.now();
        assert!(
            (led.ts >> LOGICAL_BITS) + 100 >= wall_ms(),
            "stamped by the lead"
        );
        behind.set_lead(0, u64::MAX);
        let after = behind.now();
        assert!(after > led, "a smaller lead never goes back");
        assert!(
            behind.ahead_ms(after.ts) >= 4_900,
            "nor below the time it reached"
        );
        // A lead of an hour, dropped with a limit of the wall clock plus a
        // minute: kept up to the limit only.
        let clock = Clock::new(4);
        clock.set_lead(3_600_000, u64::MAX);
        clock.set_lead(0, clock.wall_ms() + 60_000);
        let ahead = clock.ahead_ms(clock.now().ts);
        assert!((59_000..=60_000).contains(&ahead), "{ahead}");
        assert!(
            behind.ahead_ms(led.ts) >= 4_900,
            "{}",
            behind.ahead_ms(led.ts)
        );
    }

    #[test]
    fn now_is_strictly_increasing_and_passes_observed() {
        let clock = Clock::new(7);
        let a = clock.now();
        let b = clock.now();
        assert!(b > a);
        let future = (wall_ms() + 60_000) << LOGICAL_BITS;
        clock.observe(future);
        let c = clock.now();
        assert!(c.ts > future);
        assert_eq!(c.node, 7);
        assert!(clock.ahead_ms(future) > 50_000);
    }

    #[test]
    fn an_offset_clock_stamps_by_its_own_wall_time() {
        let ahead = Clock::with_offset(1, 3_600_000);
        let v = ahead.now();
        assert!(v.physical_ms() >= wall_ms() + 3_599_000);
        assert!(ahead.wall_ms() >= wall_ms() + 3_599_000);
        let behind = Clock::with_offset(2, -3_600_000);
        assert!(behind.now().physical_ms() + 3_599_000 <= wall_ms());
        assert_eq!(behind.ahead_ms(v.ts) / 1000 / 60, 120);
    }

    #[test]
    fn versions_order_by_ts_then_node() {
        assert!(Version::new(2, 0) > Version::new(1, 9));
        assert!(Version::new(1, 2) > Version::new(1, 1));
    }
}
