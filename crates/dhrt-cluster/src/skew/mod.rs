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
        return Verdict {
            skewed: true,
            ahead_ms,
            reason: off_reason(
                offsets,
                off,
                &format!("the {} s allowed", seconds(max_offset_ms)),
            ),
            by_stamps: false,
            provisional: false,
        };
    }
    if clock_ahead_ms > max_offset_ms {
        return Verdict {
            skewed: true,
            ahead_ms,
            reason: stamps_reason(
                clock_ahead_ms,
                &format!(
                    "the {} s allowed (its clock ran ahead once, or was set back since)",
                    seconds(max_offset_ms)
                ),
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
    let limit = format!(
        "the {} s allowed when it was judged skewed, or within it by less than a twentieth",
        seconds(max_offset_ms)
    );
    let now = if current.by_stamps {
        stamps_reason(clock_ahead_ms, &limit)
    } else {
        off_reason(offsets, split(offsets, clearly).0, &limit)
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

/// Why a node is skewed for its peers' clocks: `off` of them are further
/// from it than `limit` says.
fn off_reason(offsets: &[i64], off: usize, limit: &str) -> String {
    let (secs, which) = worst(offsets);
    format!(
        "this node's clock is {secs} s off from the clocks of {off} of its {} peers ({which}), more than {limit}: writes are refused until the clocks agree (reads go on)",
        offsets.len()
    )
}

/// Why a node is skewed for the stamps in its log, `clock_ahead_ms` ahead,
/// further than `limit` says.
fn stamps_reason(clock_ahead_ms: u64, limit: &str) -> String {
    format!(
        "this node holds writes stamped {} s ahead of its wall clock (or of its peers' middle, if later), more than {limit}: writes are refused until its clock comes within the allowed offset of them (reads go on)",
        seconds(clock_ahead_ms)
    )
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
pub(crate) fn seconds(ms: u64) -> String {
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
mod tests;
