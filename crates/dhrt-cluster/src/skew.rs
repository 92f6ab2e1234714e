//! The clock guard: what a node does with the stamps and clocks of its
//! peers. Pure rules, no I/O; the cluster feeds them wall-clock readings.
//!
//! Rules (the anchor is CockroachDB's maximum clock offset):
//! - A stamp that arrives from a peer (a replicated write, a delete, a drop,
//!   a digest's drop, a handoff or anti-entropy record, a hint, a fan-out
//!   read) is refused when it lies more than the allowed offset ahead of
//!   this node's wall clock ([`Guard::admits`]). Refusal is per record, and
//!   a refused record is not stored, so it never moves the local clock:
//!   a remote stamp never pushes this node's clock beyond wall time plus
//!   the allowed offset.
//! - Every gossip message carries its sender's wall clock. A node keeps,
//!   per live peer, the offset between their clocks ([`Offsets`]; the
//!   largest of the last few samples, since network delay only makes a
//!   sender look behind).
//! - A node is *skewed* ([`verdict`]) when more of its measured peers are
//!   beyond the allowed offset from it than within it (itself counted as
//!   within); on a tie, the node whose clock is ahead is the skewed one
//!   (its stamps are the ones the others refuse). A node whose own clock
//!   has been pushed beyond wall time plus the allowed offset (its log
//!   holds writes stamped in the future) is skewed too. A skewed node
//!   refuses client writes until the cause is gone; reads go on.

use std::collections::{BTreeMap, VecDeque};

use dhrt_storage::LOGICAL_BITS;

/// Offset samples kept per peer.
const SAMPLES: usize = 8;

/// The per-record check on stamps from peers.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Guard {
    /// The largest allowed offset between two clocks, in ms.
    pub(crate) max_offset_ms: u64,
}

impl Guard {
    /// The greatest HLC timestamp admitted when the local wall clock reads
    /// `wall_ms`.
    pub(crate) fn limit(&self, wall_ms: u64) -> u64 {
        wall_ms.saturating_add(self.max_offset_ms) << LOGICAL_BITS
    }

    /// Whether a stamp `ts` from a peer may be stored at `wall_ms`.
    pub(crate) fn admits(&self, ts: u64, wall_ms: u64) -> bool {
        ts <= self.limit(wall_ms)
    }

    /// How far `ts` lies ahead of `wall_ms`, in whole seconds.
    pub(crate) fn ahead_s(ts: u64, wall_ms: u64) -> u64 {
        (ts >> LOGICAL_BITS).saturating_sub(wall_ms) / 1000
    }
}

/// Measured clock offsets of peers: `peer's clock − this node's clock`, ms.
#[derive(Debug, Default)]
pub(crate) struct Offsets {
    samples: BTreeMap<u64, VecDeque<i64>>,
}

impl Offsets {
    /// A message from `peer`, sent at `sent_ms` by its clock, arrived at
    /// `local_ms` by this node's.
    pub(crate) fn record(&mut self, peer: u64, sent_ms: u64, local_ms: u64) {
        if sent_ms == 0 {
            return; // not stamped (an older sender)
        }
        let offset = sent_ms as i64 - local_ms as i64;
        let s = self.samples.entry(peer).or_default();
        if s.len() == SAMPLES {
            s.pop_front();
        }
        s.push_back(offset);
    }

    /// The offset of `peer`, if measured: the largest recent sample (delay
    /// only ever lowers a sample).
    pub(crate) fn of(&self, peer: u64) -> Option<i64> {
        self.samples.get(&peer)?.iter().copied().max()
    }

    /// Forgets peers not in `keep` (gone, dead or left).
    pub(crate) fn retain(&mut self, keep: impl Fn(u64) -> bool) {
        self.samples.retain(|id, _| keep(*id));
    }
}

/// What a node concludes about its own clock.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(crate) struct Verdict {
    /// It must refuse client writes.
    pub(crate) skewed: bool,
    /// How far this node's clock is ahead of the median peer, ms.
    pub(crate) ahead_ms: i64,
    /// Why it is skewed (empty if not).
    pub(crate) reason: String,
}

/// The verdict from the offsets of live peers (`peer − me`, ms), the
/// largest allowed offset, and how far this node's own clock (its greatest
/// stamp) lies ahead of its wall time (`clock_ahead_ms`).
pub(crate) fn verdict(offsets: &[i64], max_offset_ms: u64, clock_ahead_ms: u64) -> Verdict {
    let ahead_ms = median(offsets).map_or(0, |m| -m);
    let max = max_offset_ms as i64;
    let off = offsets.iter().filter(|o| o.abs() > max).count();
    let within = offsets.len() - off + 1;
    let ahead_of_them = ahead_ms > 0;
    if off > within || (off == within && ahead_of_them) {
        return Verdict {
            skewed: true,
            ahead_ms,
            reason: format!(
                "this node's clock is {} s {} the clocks of {off} of its {} peers, more than the {} s allowed: writes are refused until it is fixed (reads go on)",
                ahead_ms.unsigned_abs() / 1000,
                if ahead_ms >= 0 { "ahead of" } else { "behind" },
                offsets.len(),
                max_offset_ms / 1000
            ),
        };
    }
    if clock_ahead_ms > max_offset_ms {
        return Verdict {
            skewed: true,
            ahead_ms,
            reason: format!(
                "this node holds writes stamped {} s ahead of its wall clock, more than the {} s allowed (it once ran with its clock ahead): writes are refused until its clock passes them (reads go on)",
                clock_ahead_ms / 1000,
                max_offset_ms / 1000
            ),
        };
    }
    Verdict {
        skewed: false,
        ahead_ms,
        reason: String::new(),
    }
}

fn median(xs: &[i64]) -> Option<i64> {
    if xs.is_empty() {
        return None;
    }
    let mut v = xs.to_vec();
    v.sort_unstable();
    Some(v[v.len() / 2])
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOUR: i64 = 3_600_000;
    const MAX: u64 = 60_000;

    #[test]
    fn the_guard_admits_up_to_the_allowed_offset_and_no_further() {
        let g = Guard { max_offset_ms: MAX };
        let wall = 1_800_000_000_000;
        assert!(g.admits(wall << LOGICAL_BITS, wall));
        assert!(g.admits((wall + MAX) << LOGICAL_BITS, wall));
        assert!(!g.admits(((wall + MAX) << LOGICAL_BITS) + 1, wall));
        assert!(!g.admits(u64::MAX, wall));
        assert_eq!(
            Guard::ahead_s((wall + 7_200_000) << LOGICAL_BITS, wall),
            7200
        );
    }

    #[test]
    fn one_node_ahead_of_two_is_skewed_and_they_are_not() {
        // The skewed node sees both peers two hours behind.
        let v = verdict(&[-2 * HOUR, -2 * HOUR], MAX, 0);
        assert!(v.skewed, "{v:?}");
        assert_eq!(v.ahead_ms, 2 * HOUR);
        assert!(v.reason.contains("7200 s ahead"), "{}", v.reason);
        // Each healthy node sees one peer two hours ahead, one in step.
        let v = verdict(&[2 * HOUR, 15], MAX, 0);
        assert!(!v.skewed, "{v:?}");
        // A node behind the others is skewed as well.
        assert!(verdict(&[HOUR, HOUR], MAX, 0).skewed);
    }

    #[test]
    fn in_a_pair_the_node_ahead_is_the_skewed_one() {
        assert!(verdict(&[-HOUR], MAX, 0).skewed);
        assert!(!verdict(&[HOUR], MAX, 0).skewed);
    }

    #[test]
    fn small_offsets_and_no_peers_are_fine() {
        assert!(!verdict(&[], MAX, 0).skewed);
        assert!(!verdict(&[59_000, -59_000, 0], MAX, 0).skewed);
        assert_eq!(verdict(&[], MAX, 0).ahead_ms, 0);
    }

    #[test]
    fn a_clock_pushed_ahead_by_its_own_log_is_skewed() {
        let v = verdict(&[0, 10], MAX, 2 * HOUR as u64);
        assert!(v.skewed);
        assert!(v.reason.contains("stamped 7200 s ahead"), "{}", v.reason);
        assert!(!verdict(&[0], MAX, MAX).skewed);
    }

    #[test]
    fn an_offset_is_the_least_delayed_recent_sample() {
        let mut o = Offsets::default();
        o.record(7, 1_000, 1_010); // 10 ms in flight
        o.record(7, 2_000, 2_002);
        assert_eq!(o.of(7), Some(-2));
        assert_eq!(o.of(8), None);
        o.record(8, 0, 5); // unstamped: ignored
        assert_eq!(o.of(8), None);
        for i in 0..SAMPLES as u64 {
            o.record(7, 10_000 + i, 10_000 + i + HOUR as u64);
        }
        // The old samples have rolled out: the clock jumped.
        assert_eq!(o.of(7), Some(-HOUR));
        o.retain(|id| id != 7);
        assert_eq!(o.of(7), None);
    }
}
