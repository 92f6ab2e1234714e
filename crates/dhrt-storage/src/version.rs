//! Versions and the hybrid logical clock that stamps them.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

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
///
/// In a cluster the wall clock is read once a verdict (every 250 ms, by
/// [`set_lead`](Self::set_lead)), and stamps between two verdicts follow
/// the monotonic clock from there: a wall clock stepped in between (NTP,
/// a VM resumed) moves no stamp until the next verdict has measured the
/// step against the peers' clocks and set the lead to make up for it.
#[derive(Debug)]
pub struct Clock {
    last: AtomicU64,
    node: u64,
    /// Added to the system's wall clock: zero in production; tests and
    /// simulations set it to give one node a clock that is off.
    offset_ms: AtomicI64,
    /// How far ahead of [`wall_ms`](Self::wall_ms) versions are stamped:
    /// the lead of the latest clock among the node's peers (within the
    /// offset they allow), set by the cluster. A node whose clock is behind
    /// then stamps a write after one a peer made earlier, though no peer
    /// is there to tell it (the owners down).
    lead_ms: AtomicU64,
    /// The time stamps follow (wall plus lead, ms) minus the monotonic
    /// clock's ms since `base`, as of the last [`set_lead`](Self::set_lead);
    /// [`NO_LEAD`] before the first (an embedded store: the wall clock).
    projection: AtomicI64,
    /// Origin of the monotonic ms in `projection`.
    base: Instant,
    /// Serializes [`set_lead`](Self::set_lead).
    lead_set: std::sync::Mutex<()>,
}

/// `Clock::projection` before any lead is set.
const NO_LEAD: i64 = i64::MIN;

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
            offset_ms: AtomicI64::new(offset_ms),
            lead_ms: AtomicU64::new(0),
            projection: AtomicI64::new(NO_LEAD),
            base: Instant::now(),
            lead_set: std::sync::Mutex::new(()),
        }
    }

    /// Stamps versions `lead_ms` ahead of this clock's wall time from now
    /// on (0: by its wall time), carried forward on the monotonic clock
    /// until the next call. Versions never go below the time the lead
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
        let _set = self.lead_set.lock().unwrap_or_else(|e| e.into_inner());
        let mono = self.mono_ms();
        let before = self.lead_ms.load(Ordering::Relaxed);
        let projection = self.projection.load(Ordering::Acquire);
        if lead_ms < before && projection != NO_LEAD {
            let reached = mono.saturating_add(projection).max(0) as u64;
            // Raised before the smaller lead is stored: no version in
            // between is stamped below it.
            self.observe(reached.min(limit_ms) << LOGICAL_BITS);
        }
        self.lead_ms.store(lead_ms, Ordering::Relaxed);
        let target = self.wall_ms().saturating_add(lead_ms) as i64;
        self.projection
            .store(target.saturating_sub(mono), Ordering::Release);
    }

    /// Milliseconds on the monotonic clock since this clock was made.
    fn mono_ms(&self) -> i64 {
        self.base.elapsed().as_millis() as i64
    }

    /// Moves this clock's wall time by `ms` (fault injection: a wall
    /// clock stepped while the node runs).
    #[doc(hidden)]
    pub fn step_wall(&self, ms: i64) {
        self.offset_ms.fetch_add(ms, Ordering::Relaxed);
    }

    /// This clock's wall time, in ms since the Unix epoch: the system's,
    /// shifted by the offset it was made with.
    pub fn wall_ms(&self) -> u64 {
        wall_ms().saturating_add_signed(self.offset_ms.load(Ordering::Relaxed))
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
        let physical = match self.projection.load(Ordering::Acquire) {
            NO_LEAD => self.wall_ms(),
            p => self.mono_ms().saturating_add(p).max(0) as u64,
        } << LOGICAL_BITS;
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
    fn a_wall_clock_stepped_between_leads_moves_no_stamp() {
        // A node 20 s behind its peers, led by 20 s: it stamps by their
        // time.
        let clock = Clock::with_offset(5, -20_000);
        clock.set_lead(20_000, u64::MAX);
        let first = clock.now().physical_ms();
        assert!(first.abs_diff(wall_ms()) < 1_000, "{first}");
        // NTP sets its clock right (20 s forward) before the next verdict:
        // stamps go on by the time they followed, not 20 s ahead of it.
        clock.step_wall(20_000);
        let stepped = clock.now().physical_ms();
        assert!(
            stepped.abs_diff(wall_ms()) < 1_000,
            "stamped {} ms ahead by the lead of the clock before the step",
            stepped as i64 - wall_ms() as i64
        );
        // The next verdict finds it level with its peers: no lead, and the
        // stamps stay with the wall clock.
        clock.set_lead(0, wall_ms() + 60_000);
        let next = clock.now();
        assert!(next.physical_ms().abs_diff(wall_ms()) < 1_000);
        // Stepped 30 s forward again, alone (no peers: the next verdict
        // sets no lead), it stamps by its own clock once that verdict came.
        clock.step_wall(30_000);
        assert!(clock.now().physical_ms().abs_diff(wall_ms()) < 1_000);
        clock.set_lead(0, u64::MAX);
        let alone = clock.now();
        assert!(alone > next);
        assert!(alone.physical_ms().abs_diff(wall_ms() + 30_000) < 1_000);
        // An embedded store (no lead ever set) stamps by the wall clock,
        // steps included.
        let embedded = Clock::new(6);
        embedded.step_wall(45_000);
        assert!(embedded.now().physical_ms().abs_diff(wall_ms() + 45_000) < 1_000);
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
