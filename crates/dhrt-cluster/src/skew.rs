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
//!   per peer it knows (dead ones too: the last word stands), samples of
//!   the peer's clock against its own *monotonic* clock ([`Offsets`]), so
//!   a jump of its own wall clock shows at once, and extrapolates them to
//!   now; of the last few samples the least delayed counts (delay only
//!   makes a sender look behind).
//! - The cluster's time is the median of this node's wall clock and its
//!   peers' estimated clocks. On a tie, the upper middle when it is ahead
//!   of this node's clock by at most the allowed offset and no clock is
//!   further than that ahead of the lower middle, else the lower (so a
//!   node ahead of its pair shows ahead of the cluster). A pair
//!   whose clocks agree then both admit by the later one: a node left with
//!   one peer once the top of a chain of clocks leaves admits, and judges
//!   the stamps it took from that top by, what its peer does. A pair that
//!   disagrees refuses each other's future. The guard admits
//!   stamps up to the allowed offset past the later of this node's wall
//!   clock and the cluster's time: a node whose clock is behind takes its
//!   peers' writes (its clock then follows theirs), a node ahead of the
//!   others is refused by them.
//! - A node is *skewed* ([`verdict`]) when as many of its measured peers
//!   are beyond the allowed offset from it as within it, or more (itself
//!   counted as within): on a tie, with two nodes, nobody can tell whose
//!   clock is wrong, and both refuse writes. A node in a cluster whose own
//!   clock has been pushed beyond wall time plus the allowed offset (its
//!   log holds writes stamped in the future) is skewed too. A skewed node refuses
//!   client writes until the cause is gone; reads go on.
//! - Until a node that has (or expects) peers has measured enough of them
//!   that the rest could not overturn its verdict ([`decided`]), and when
//!   its wall clock jumped against its monotonic clock since it last
//!   judged, it refuses client writes too: no write is stamped by a clock
//!   nobody checked.

use std::collections::{BTreeMap, VecDeque};

use dhrt_storage::LOGICAL_BITS;

/// Offset samples kept per peer.
const SAMPLES: usize = 4;

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

    /// Whether a stamp `ts` from a peer may be stored when the local wall
    /// clock reads `wall_ms`.
    pub(crate) fn admits(&self, ts: u64, wall_ms: u64) -> bool {
        ts <= self.limit(wall_ms)
    }

    /// The wall time to admit stamps by: the later of this node's wall
    /// clock and the cluster's (`cluster_offset_ms` from it).
    pub(crate) fn reference(wall_ms: u64, cluster_offset_ms: i64) -> u64 {
        wall_ms.max(wall_ms.saturating_add_signed(cluster_offset_ms))
    }

    /// How far `ts` lies ahead of `wall_ms`, in whole seconds.
    pub(crate) fn ahead_s(ts: u64, wall_ms: u64) -> u64 {
        (ts >> LOGICAL_BITS).saturating_sub(wall_ms) / 1000
    }
}

/// Samples of peers' clocks: `(peer's wall clock at sending, this node's
/// monotonic clock at arrival)`, ms; and the largest offset each peer
/// allows.
#[derive(Debug, Default)]
pub(crate) struct Offsets {
    samples: BTreeMap<u64, VecDeque<(u64, u64)>>,
    settings: BTreeMap<u64, u64>,
}

impl Offsets {
    /// `peer` allows clocks `max_offset_ms` apart (0: not said).
    pub(crate) fn record_setting(&mut self, peer: u64, max_offset_ms: u64) {
        if max_offset_ms > 0 {
            self.settings.insert(peer, max_offset_ms);
        }
    }

    /// The strictest allowed offset among `own` and the peers' settings:
    /// a lenient node judges its clock by the strictest in the cluster.
    pub(crate) fn strictest(&self, own: u64) -> u64 {
        self.settings.values().copied().fold(own, u64::min)
    }

    /// A message from `peer`, sent at `sent_ms` by its clock, arrived at
    /// `mono_ms` by this node's monotonic clock.
    pub(crate) fn record(&mut self, peer: u64, sent_ms: u64, mono_ms: u64) {
        if sent_ms == 0 {
            return; // not stamped
        }
        let s = self.samples.entry(peer).or_default();
        if s.len() == SAMPLES {
            s.pop_front();
        }
        s.push_back((sent_ms, mono_ms));
    }

    /// How far `peer`'s clock is ahead of this node's wall clock (`wall_ms`
    /// now, `mono_ms` on the monotonic clock now), if measured: its least
    /// delayed recent sample, carried forward on the monotonic clock.
    pub(crate) fn of(&self, peer: u64, wall_ms: u64, mono_ms: u64) -> Option<i64> {
        let base = self
            .samples
            .get(&peer)?
            .iter()
            .map(|&(sent, at)| sent as i64 - at as i64)
            .max()?;
        Some(base + mono_ms as i64 - wall_ms as i64)
    }

    /// Forgets peers for which `keep` is false (left, or forgotten).
    pub(crate) fn retain(&mut self, keep: impl Fn(u64) -> bool) {
        self.samples.retain(|id, _| keep(*id));
        self.settings.retain(|id, _| keep(*id));
    }
}

/// The cluster's time as an offset from this node's wall clock: the median
/// of 0 (this node) and the peers' offsets. On a tie, the upper middle if
/// it is ahead of this node by at most `max_offset_ms` and no clock is
/// more than `max_offset_ms` ahead of the lower middle; else the lower.
///
/// Both nodes of a pair whose clocks agree then admit stamps by the later
/// clock, and judge the stamps they hold by it: with clocks at 0, +40 s
/// and +80 s (allowed 60 s), the node at 0 takes the +80 s node's writes
/// by the middle clock; once that node leaves, the same reference (its
/// remaining peer's) must stand, or the node at 0 would hold stamps beyond
/// what it admits, judge itself skewed, and refuse its peer's next writes.
/// But a clock too far ahead of the lower middle keeps the lower: with
/// clocks at 0, 0, +50 s and +110 s, the upper middle would admit the
/// stamps of the node at +110 s, which most clocks find skewed.
pub(crate) fn cluster_offset(offsets: &[i64], max_offset_ms: u64) -> i64 {
    let mut v: Vec<i64> = offsets.to_vec();
    v.push(0);
    v.sort_unstable();
    let (lower, upper) = (v[(v.len() - 1) / 2], v[v.len() / 2]);
    let top = v[v.len() - 1];
    let max = max_offset_ms as i64;
    if upper > 0 && upper <= max && top <= lower.saturating_add(max) {
        upper
    } else {
        lower
    }
}

/// How far ahead of this node's wall clock it stamps writes: the lead of
/// the latest clock in the cluster that is not skewed, that is within the
/// allowed offset of the cluster's middle clock (as this node measures
/// it), 0 if none is ahead of this one. Every node then stamps by about
/// the same clock, the latest the cluster agrees on, and every node admits
/// it (the guard admits up to the allowed offset past the middle clock).
/// A write made after another (by real time) follows it whatever the
/// clocks of the two nodes say, even with no replica there to tell the
/// second node it holds a newer version (the owners down, a partition). A
/// clock further ahead is skewed: it refuses writes, its stamps are
/// refused, and it is not followed. The estimate errs low (a message's
/// delay makes its sender look behind), so no node stamps further ahead
/// than the clock it follows. At most twice the allowed offset.
pub(crate) fn lead(offsets: &[i64], max_offset_ms: u64) -> u64 {
    let max = i64::try_from(max_offset_ms).unwrap_or(i64::MAX);
    let middle = cluster_offset(offsets, max_offset_ms).min(max);
    let latest = offsets
        .iter()
        .copied()
        .filter(|&o| o > 0 && o <= middle.saturating_add(max))
        .max()
        .unwrap_or(0);
    u64::try_from(latest).unwrap_or(0)
}

/// The peers' time as an offset from this node's wall clock: the middle
/// of their offsets, 0 with none; on a tie, the `(lower, upper)` middle.
/// Unlike [`cluster_offset`], this node's own clock has no vote: with one
/// peer, the peer's.
pub(crate) fn peers_offset(offsets: &[i64]) -> (i64, i64) {
    let mut v: Vec<i64> = offsets.to_vec();
    v.sort_unstable();
    match v.len() {
        0 => (0, 0),
        n => (v[(n - 1) / 2], v[n / 2]),
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
    /// Skewed for the stamps in its log, not for its peers' clocks.
    pub(crate) by_stamps: bool,
    /// Drawn from too few peers to decide it ([`unsettled`]), or before
    /// the node was first cleared to write: it stands until enough are
    /// heard, then the peers' verdict replaces it whole, with no margin to
    /// clear (a node that first heard from the one peer its clock is far
    /// from would otherwise be held by the margin).
    pub(crate) provisional: bool,
}

/// The verdict from the offsets of the measured peers (`peer − me`, ms;
/// every member not left, dead ones by their last word), the
/// largest allowed offset, and how far this node's own clock (its greatest
/// stamp) lies ahead of its wall time (`clock_ahead_ms`).
pub(crate) fn verdict(offsets: &[i64], max_offset_ms: u64, clock_ahead_ms: u64) -> Verdict {
    let ahead_ms = -cluster_offset(offsets, max_offset_ms);
    let (off, within) = split(offsets, max_offset_ms);
    if off > 0 && off >= within {
        let (secs, which) = worst(offsets);
        return Verdict {
            skewed: true,
            ahead_ms,
            reason: format!(
                "this node's clock is {secs} s off from the clocks of {off} of its {} peers ({which}), more than the {} s allowed: writes are refused until the clocks agree (reads go on)",
                offsets.len(),
                seconds(max_offset_ms)
            ),
            by_stamps: false,
            provisional: false,
        };
    }
    if clock_ahead_ms > max_offset_ms {
        return Verdict {
            skewed: true,
            ahead_ms,
            reason: format!(
                "this node holds writes stamped {} s ahead of its wall clock (or of its peers' middle, if later), more than the {} s allowed (its clock ran ahead once, or was set back since): writes are refused until its clock comes within the allowed offset of them (reads go on)",
                seconds(clock_ahead_ms),
                seconds(max_offset_ms)
            ),
            by_stamps: true,
            provisional: false,
        };
    }
    Verdict {
        skewed: false,
        ahead_ms,
        reason: String::new(),
        by_stamps: false,
        provisional: false,
    }
}

/// A skewed node's next verdict (`fresh`, from `offsets`, `max_offset_ms`
/// and `clock_ahead_ms`): it takes writes again only once what made it
/// skewed (its peers' clocks, or the stamps in its log) is within the
/// allowed offset by a twentieth of it. A clock at the limit, measured a
/// few milliseconds either side of it from round to round, would
/// otherwise refuse and take writes by turns, logging each turn.
pub(crate) fn settle(
    current: &Verdict,
    fresh: Verdict,
    offsets: &[i64],
    max_offset_ms: u64,
    clock_ahead_ms: u64,
) -> Verdict {
    if !current.skewed || fresh.skewed || current.provisional {
        return fresh;
    }
    let clearly = max_offset_ms - max_offset_ms / 20;
    let still = match current.by_stamps {
        true => clock_ahead_ms > clearly,
        false => verdict(offsets, clearly, 0).skewed,
    };
    if !still {
        return fresh;
    }
    let mut kept = current.clone();
    kept.ahead_ms = fresh.ahead_ms;
    // Told with the clocks as they are now, not as when it was judged.
    let now = if current.by_stamps {
        format!(
            "this node holds writes stamped {} s ahead of its wall clock (or of its peers' middle, if later), more than the {} s allowed when it was judged skewed, or within it by less than a twentieth: writes are refused until its clock comes within the allowed offset of them (reads go on)",
            seconds(clock_ahead_ms),
            seconds(max_offset_ms)
        )
    } else {
        let (off, _) = split(offsets, clearly);
        let (secs, which) = worst(offsets);
        format!(
            "this node's clock is {secs} s off from the clocks of {off} of its {} peers ({which}), more than the {} s allowed when it was judged skewed, or within it by less than a twentieth: writes are refused until the clocks agree (reads go on)",
            offsets.len(),
            seconds(max_offset_ms)
        )
    };
    kept.reason = format!(
        "{now} (it takes writes again once within {} s)",
        seconds(clearly)
    );
    kept
}

/// Whether the peers' clocks decide this node's verdict whatever the
/// clocks of `unmeasured` more known peers turn out to be: a node that
/// has measured only some of its peers (one that just joined) must not
/// take writes on a verdict the others could overturn.
pub(crate) fn decided(offsets: &[i64], unmeasured: usize, max_offset_ms: u64) -> bool {
    let (off, within) = split(offsets, max_offset_ms);
    let skewed = |off: usize, within: usize| off > 0 && off >= within;
    skewed(off + unmeasured, within) == skewed(off, within + unmeasured)
}

/// For a node not cleared to write yet whose measured peers do not decide
/// its verdict ([`decided`]): skewed if its clock is beyond the allowed
/// offset from any peer it has heard, since the peers not heard from yet
/// could side with that one.
pub(crate) fn unsettled(offsets: &[i64], unmeasured: usize, max_offset_ms: u64) -> Option<Verdict> {
    let (off, _) = split(offsets, max_offset_ms);
    let (secs, which) = worst(offsets);
    (off > 0).then(|| Verdict {
        skewed: true,
        ahead_ms: -cluster_offset(offsets, max_offset_ms),
        reason: format!(
            "this node's clock is {secs} s off from the clocks of {off} of the {} peers it has heard from ({which}), more than the {} s allowed, with {unmeasured} more not heard from yet: writes are refused until enough peers are heard to tell whose clock is wrong (reads go on)",
            offsets.len(),
            seconds(max_offset_ms)
        ),
        by_stamps: false,
        provisional: true,
    })
}

/// How many peers are beyond the allowed offset, and how many clocks
/// within it (this node's own counted).
fn split(offsets: &[i64], max_offset_ms: u64) -> (usize, usize) {
    let off = offsets
        .iter()
        .filter(|o| o.unsigned_abs() > max_offset_ms)
        .count();
    (off, offsets.len() - off + 1)
}

/// `ms` in seconds for a sentence: whole from 10 s, to the millisecond
/// below (a limit of 1 s and an offset of 1.003 s are not "1 s" both).
fn seconds(ms: u64) -> String {
    if ms >= 10_000 {
        (ms / 1000).to_string()
    } else {
        format!("{}", ms as f64 / 1000.0)
    }
}

/// The offset of largest size, in seconds, and which way it goes.
fn worst(offsets: &[i64]) -> (String, &'static str) {
    let worst = offsets
        .iter()
        .copied()
        .max_by_key(|o| o.unsigned_abs())
        .unwrap_or(0);
    let which = if worst < 0 {
        "this node is ahead"
    } else {
        "this node is behind"
    };
    (seconds(worst.unsigned_abs()), which)
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOUR: i64 = 3_600_000;
    const MAX: u64 = 60_000;

    #[test]
    fn the_lead_is_the_latest_clock_the_cluster_does_not_find_skewed() {
        assert_eq!(lead(&[], MAX), 0);
        assert_eq!(lead(&[-5_000, -1], MAX), 0);
        assert_eq!(lead(&[-5_000, 5_000, 2_000], MAX), 5_000);
        // A clock beyond the allowed offset is skewed: not followed.
        assert_eq!(lead(&[2 * HOUR, 5_000], MAX), 5_000);
        assert_eq!(lead(&[MAX as i64], MAX), MAX);
        // This node at -15 s, peers at 0 and +50 s: the middle is 0, the
        // +50 s clock within the offset of it, followed (65 s from here);
        // from the node at 0, the same clock (+50 s).
        assert_eq!(lead(&[15_000, 65_000], MAX), 65_000);
        assert_eq!(lead(&[-15_000, 50_000], MAX), 50_000);
        // A chain 0, +40 s, +80 s: the middle +40 s, every clock within
        // the offset of it; all follow +80 s.
        assert_eq!(lead(&[40_000, 80_000], MAX), 80_000);
        assert_eq!(lead(&[-40_000, 40_000], MAX), 40_000);
        // Clocks 0, 0, +5 s and +65 s, from the one at +5 s: the +65 s
        // clock is within the offset of this one but beyond it from the
        // middle (0): skewed, not followed. From a node at 0: +5 s.
        assert_eq!(lead(&[-5_000, -5_000, 60_000], MAX), 0);
        assert_eq!(lead(&[0, 5_000, 65_000], MAX), 5_000);
        assert_eq!(lead(&[-2 * HOUR, 30_000], MAX), 30_000);
        // Two peers hours ahead agree with each other: this node is the
        // one off (skewed), and the lead stays within twice the offset.
        assert!(lead(&[2 * HOUR, 2 * HOUR], MAX) <= 2 * MAX);
    }

    #[test]
    fn sentences_give_seconds_to_the_millisecond_below_ten() {
        assert_eq!(seconds(60_000), "60");
        assert_eq!(seconds(86_399_999), "86399");
        assert_eq!(seconds(1_000), "1");
        assert_eq!(seconds(1_003), "1.003");
        let v = verdict(&[-1_003], 1_000, 0);
        assert!(v.skewed);
        assert!(
            v.reason.contains("1.003 s off") && v.reason.contains("the 1 s allowed"),
            "{}",
            v.reason
        );
    }

    #[test]
    fn the_peers_time_is_their_middle_and_a_tie_gives_both() {
        assert_eq!(peers_offset(&[]), (0, 0));
        assert_eq!(peers_offset(&[40_000]), (40_000, 40_000));
        // One of two peers two hours ahead: contact is recorded by the
        // other, absence measured by it.
        assert_eq!(peers_offset(&[2 * HOUR, 40_000]), (40_000, 2 * HOUR));
        assert_eq!(peers_offset(&[5, -3, 2 * HOUR]), (5, 5));
    }

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
        assert!(v.reason.contains("7200 s off"), "{}", v.reason);
        assert!(v.reason.contains("this node is ahead"), "{}", v.reason);
        // Each healthy node sees one peer two hours ahead, one in step,
        // and says it is in step with the cluster.
        let v = verdict(&[2 * HOUR, 15], MAX, 0);
        assert!(!v.skewed, "{v:?}");
        assert!(v.ahead_ms.abs() < 1000, "{v:?}");
        // A node behind the others is skewed as well.
        let v = verdict(&[HOUR, HOUR], MAX, 0);
        assert!(
            v.skewed && v.reason.contains("this node is behind"),
            "{v:?}"
        );
    }

    #[test]
    fn in_a_pair_that_disagrees_both_refuse_writes() {
        // Nobody can tell whose clock is wrong.
        assert!(verdict(&[-HOUR], MAX, 0).skewed);
        assert!(verdict(&[HOUR], MAX, 0).skewed);
        assert!(!verdict(&[MAX as i64], MAX, 0).skewed);
        // Two against two: everyone refuses.
        assert!(verdict(&[HOUR, HOUR, 0], MAX, 0).skewed);
    }

    #[test]
    fn a_skewed_node_takes_writes_again_only_clearly_within_the_limit() {
        let max = MAX as i64;
        let fine = Verdict::default();
        let skewed = verdict(&[max + 3], MAX, 0);
        assert!(skewed.skewed);
        // Into skew at once, as before.
        assert!(settle(&fine, skewed.clone(), &[max + 3], MAX, 0).skewed);
        // Measured just within the limit next round: still refusing.
        let fresh = verdict(&[max - 2], MAX, 0);
        assert!(!fresh.skewed);
        let kept = settle(&skewed, fresh, &[max - 2], MAX, 0);
        assert!(
            kept.skewed
                && kept
                    .reason
                    .contains("59 s off from the clocks of 1 of its 1 peers"),
            "{kept:?}"
        );
        // Within by more than a twentieth: writes again.
        let clear = max - max / 20 - 1;
        assert!(!settle(&skewed, verdict(&[clear], MAX, 0), &[clear], MAX, 0).skewed);
        // The same for stamps ahead of the clock in its log.
        let ahead = verdict(&[], MAX, MAX + 1);
        assert!(ahead.skewed);
        assert!(settle(&ahead, verdict(&[], MAX, MAX - 1), &[], MAX, MAX - 1).skewed);
        assert!(!settle(&ahead, verdict(&[], MAX, 1_000), &[], MAX, 1_000).skewed);
        // Skewed for its stamps, it is not held for a peer that sits
        // within the limit but inside the margin: only the stamps are
        // judged more strictly.
        let peer = [max - 2];
        let ahead = verdict(&peer, MAX, MAX + 1);
        assert!(ahead.skewed && ahead.by_stamps);
        assert!(!settle(&ahead, verdict(&peer, MAX, 1_000), &peer, MAX, 1_000).skewed);
        // And what it says while held says when it lets go.
        let held = settle(&skewed, verdict(&[max - 2], MAX, 0), &[max - 2], MAX, 0);
        assert!(held.reason.contains("once within 57 s"), "{}", held.reason);
    }

    #[test]
    fn a_verdict_drawn_from_too_few_peers_gives_way_to_theirs_whole() {
        // Clocks 0, +30 s, +59 s and +61 s: the node at 0 first hears from
        // the +61 s one, and is skewed until it has heard enough.
        let first = unsettled(&[61_000], 2, MAX).unwrap();
        assert!(first.skewed && first.provisional);
        let all = [30_000, 59_000, 61_000];
        let fresh = verdict(&all, MAX, 0);
        assert!(!fresh.skewed, "{fresh:?}");
        // Three clocks of four within 60 s of it, but two of four within
        // 57 s: held by the margin, it would refuse writes for good.
        assert!(!settle(&first, fresh.clone(), &all, MAX, 0).skewed);
        // A verdict drawn from the peers keeps its margin.
        let judged = verdict(&[61_000, 61_000, 30_000], MAX, 0);
        assert!(judged.skewed && !judged.provisional);
        assert!(settle(&judged, fresh, &all, MAX, 0).skewed);
    }

    #[test]
    fn the_cluster_time_is_the_median_and_the_guard_follows_the_later_clock() {
        assert_eq!(cluster_offset(&[], MAX), 0);
        // Ahead of two peers in step: the cluster is two hours behind.
        assert_eq!(cluster_offset(&[-2 * HOUR, -2 * HOUR], MAX), -2 * HOUR);
        // In step with one of two: the cluster is here.
        assert_eq!(cluster_offset(&[2 * HOUR, 0], MAX), 0);
        // Behind both: the cluster is ahead, and the guard admits its
        // stamps.
        let behind = cluster_offset(&[2 * HOUR, 2 * HOUR], MAX);
        assert_eq!(behind, 2 * HOUR);
        let g = Guard { max_offset_ms: MAX };
        let wall = 1_800_000_000_000u64;
        let their_stamp = (wall + 2 * HOUR as u64) << LOGICAL_BITS;
        assert!(!g.admits(their_stamp, wall));
        assert!(g.admits(their_stamp, Guard::reference(wall, behind)));
        // A node ahead keeps its own clock as the reference.
        assert_eq!(Guard::reference(wall, -2 * HOUR), wall);
        // A tie beyond the allowed offset takes the lower middle: a pair
        // that disagrees refuses each other's future.
        assert_eq!(cluster_offset(&[2 * HOUR], MAX), 0);
        assert_eq!(cluster_offset(&[-2 * HOUR], MAX), -2 * HOUR);
        assert_eq!(cluster_offset(&[0, 2 * HOUR, 2 * HOUR], MAX), 0);
    }

    #[test]
    fn a_pair_in_step_admits_by_the_later_clock_on_both_sides() {
        let g = Guard { max_offset_ms: MAX };
        let wall = 1_800_000_000_000u64;
        // A chain at 0, +40 s, +80 s: the node at 0 admits by the middle.
        assert_eq!(cluster_offset(&[40_000, 80_000], MAX), 40_000);
        // The top leaves: the node at 0 keeps its peer's clock as its
        // reference, and judges the top's stamps it took by it.
        let low = cluster_offset(&[40_000], MAX);
        assert_eq!(low, 40_000);
        let top_stamp = (wall + 80_000) << LOGICAL_BITS;
        assert!(g.admits(top_stamp, Guard::reference(wall, low)));
        // Its peer (at +40 s) admits by its own clock: the same limit.
        let high = cluster_offset(&[-40_000], MAX);
        let peer_wall = wall + 40_000;
        assert_eq!(
            Guard::reference(peer_wall, high),
            Guard::reference(wall, low)
        );
        let v = verdict(&[40_000], MAX, 80_000 - 40_000);
        assert!(!v.skewed, "{v:?}");
        assert_eq!(v.ahead_ms, -40_000);
        // Clocks at 0, 0, +50 s and +110 s: the one at +110 s is more than
        // the allowed offset ahead of the lower middle, so the node at 0
        // keeps its own clock and refuses that node's stamps (the upper
        // middle would admit them), and has nothing to judge itself by
        // when it leaves.
        assert_eq!(cluster_offset(&[0, 50_000, 110_000], MAX), 0);
        let skewed_stamp = (wall + 110_000) << LOGICAL_BITS;
        assert!(!g.admits(skewed_stamp, Guard::reference(wall, 0)));
        // The same four from the node at +50 s: its own clock.
        assert_eq!(cluster_offset(&[-50_000, -50_000, 60_000], MAX), -50_000);
        // Every clock within the allowed offset of the lower middle.
        assert_eq!(cluster_offset(&[0, 55_000, 55_000], MAX), 55_000);
    }

    #[test]
    fn a_verdict_the_unmeasured_peers_could_overturn_is_not_decided() {
        // Joined a cluster at 0, 0 and +50 s with a clock at +110 s, and
        // measured the +50 s node and one at 0: one within, one off, one
        // not measured, whose clock decides.
        assert!(!verdict(&[-60_000, -110_000], MAX, 0).skewed);
        assert!(!decided(&[-60_000, -110_000], 1, MAX));
        assert!(decided(&[-60_000, -110_000, -110_000], 0, MAX));
        // Most peers within: decided whatever the rest says.
        assert!(decided(&[5, -3], 1, MAX));
        assert!(decided(&[5, -3, 40_000], 2, MAX));
        assert!(!decided(&[5], 2, MAX));
        // Most peers off: skewed whatever the rest says.
        assert!(decided(&[HOUR, HOUR, HOUR], 1, MAX));
        assert!(!decided(&[HOUR], 1, MAX));
        assert!(decided(&[], 0, MAX));
        // Not decided, one peer heard beyond the allowed offset: skewed
        // until enough are heard.
        let v = unsettled(&[-60_000, -110_000], 1, MAX).unwrap();
        assert!(
            v.skewed && v.reason.contains("with 1 more not heard from yet"),
            "{v:?}"
        );
        assert!(unsettled(&[5, -3], 2, MAX).is_none());
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
    fn an_offset_is_the_least_delayed_recent_sample_carried_on_the_monotonic_clock() {
        let mut o = Offsets::default();
        // Peer 7's clock reads 1_000_000 when this node's monotonic clock
        // reads 10 (10 ms in flight) and later 2_000_000 at 1_000_002.
        o.record(7, 1_000_000, 10);
        o.record(7, 2_000_000, 1_000_002);
        // Now: monotonic 1_000_002, this node's wall 5_000_000.
        assert_eq!(o.of(7, 5_000_000, 1_000_002), Some(2_000_000 - 5_000_000));
        assert_eq!(o.of(8, 0, 0), None);
        o.record(8, 0, 5); // unstamped: ignored
        assert_eq!(o.of(8, 0, 0), None);
        // This node's wall clock jumps an hour ahead; its monotonic clock
        // does not: the peer shows an hour behind at once, no new sample.
        let later = 1_000_102;
        let before = o.of(7, 5_000_100, later).unwrap();
        let after = o.of(7, 5_000_100 + HOUR as u64, later).unwrap();
        assert_eq!(before - after, HOUR);
        // The peer's own clock jumps: its new samples roll the old out.
        for i in 0..SAMPLES as u64 {
            o.record(7, 10_000_000 + i - HOUR as u64, later + i);
        }
        assert_eq!(o.of(7, 10_000_000, later), Some(-HOUR));
        o.retain(|id| id != 7);
        assert_eq!(o.of(7, 0, 0), None);
    }

    #[test]
    fn the_strictest_allowed_offset_in_the_cluster_judges() {
        let mut o = Offsets::default();
        assert_eq!(o.strictest(200_000), 200_000);
        o.record_setting(1, 60_000);
        o.record_setting(2, 0); // not said
        o.record_setting(3, 90_000);
        assert_eq!(o.strictest(200_000), 60_000);
        assert_eq!(o.strictest(1_000), 1_000);
        o.retain(|id| id != 1);
        assert_eq!(o.strictest(200_000), 90_000);
    }
}
