//! Deletes held until every member has them.
//!
//! A tombstone past its grace period is purged by compaction. If a member
//! never got it (it was on the other side of a partition longer than the
//! grace period, or dead that long), its copy of the key, older or written
//! meanwhile, comes back on every node at the next anti-entropy: a delete
//! already applied everywhere else is undone, and watchers see the key go
//! back to an older version. So a node purges only tombstones stamped
//! before the last anti-entropy round it completed with *every* member
//! (left ones aside): after a round that started at `S`, the peer holds
//! what this node held at `S`, or something newer. Until a round with each
//! member completes in this life (after a start, a member that is down or
//! unreachable), nothing stamped since is purged; `dhrt-cli remove` of a
//! member that will not come back lets them go.
//!
//! A tombstone (or drop) that reaches this node from a peer arrives later
//! than it was stamped, possibly long after (relayed across a partition
//! that healed in pieces): a round that started before it *arrived* does
//! not cover it, whatever its stamp. Each such arrival is remembered (its
//! time and the oldest stamp it brought) and keeps its stamps held until
//! every member has had a round that started after it. A tombstone this
//! node already holds (at that version or newer) is no arrival: a bucket
//! that keeps differing brings it back every round.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use dhrt_proto::Liveness;

use super::Cluster;

/// When each member's last complete anti-entropy round with this node
/// started (wall ms), in this life; and the oldest of them, as last
/// reckoned (0: a member has none, `u64::MAX`: no member), for `/metrics`.
#[derive(Debug)]
pub(super) struct Synced {
    rounds: Mutex<HashMap<u64, u64>>,
    pub(super) oldest: AtomicU64,
    /// Tombstones and drops that arrived from peers: (when they arrived,
    /// the oldest physical ms stamped among them), oldest arrival first;
    /// forgotten once every member's last round started after the arrival.
    arrived: Mutex<Vec<(u64, u64)>>,
}

impl Default for Synced {
    fn default() -> Self {
        Synced {
            rounds: Mutex::default(),
            oldest: AtomicU64::new(0),
            arrived: Mutex::default(),
        }
    }
}

/// Arrivals remembered one by one; past this, later ones merge into the
/// newest (kept longer, never shorter).
const ARRIVALS_KEPT: usize = 4096;

/// Notes tombstones stamped from `stamp_ms` on that arrived at `now_ms`.
/// Arrivals within a second of the newest merge into it.
fn note_arrival(arrived: &mut Vec<(u64, u64)>, now_ms: u64, stamp_ms: u64) {
    let full = arrived.len() >= ARRIVALS_KEPT;
    match arrived.last_mut() {
        Some(last) if now_ms < last.0.saturating_add(1000) || full => {
            last.0 = last.0.max(now_ms);
            last.1 = last.1.min(stamp_ms);
        }
        _ => arrived.push((now_ms, stamp_ms)),
    }
}

/// Forgets the arrivals every member has had a round since (their rounds
/// started at or after `covered_ms`); the oldest stamp among the others
/// (`u64::MAX`: none).
fn arrivals_held(arrived: &mut Vec<(u64, u64)>, covered_ms: u64) -> u64 {
    arrived.retain(|&(at, _)| at >= covered_ms);
    arrived.iter().map(|&(_, s)| s).min().unwrap_or(u64::MAX)
}

/// The time from which tombstones are held: the oldest start among the
/// members' last complete rounds (`None` for a member without one in this
/// life), less `margin_ms` (a tombstone stamped by a clock behind this
/// one's by up to the allowed offset carries an earlier time than it
/// reached this node at). `u64::MAX` without members.
pub(super) fn hold_from(rounds: impl IntoIterator<Item = Option<u64>>, margin_ms: u64) -> u64 {
    rounds
        .into_iter()
        .map(|started| started.map_or(0, |s| s.saturating_sub(margin_ms)))
        .min()
        .unwrap_or(u64::MAX)
}

impl Cluster {
    /// Notes that an anti-entropy round with member `id` that started at
    /// `started_ms` (this node's wall clock) completed.
    pub(super) fn note_synced(&self, id: u64, started_ms: u64) {
        let mut synced = self.synced.rounds.lock().unwrap();
        let at = synced.entry(id).or_insert(started_ms);
        *at = (*at).max(started_ms);
    }

    /// Notes tombstones or drops from a peer, stamped from `stamp_ms` on,
    /// applied now, and holds them at once.
    pub(super) fn note_arrived_tombstones(&self, stamp_ms: u64) {
        let now = self.wall_ms();
        note_arrival(&mut self.synced.arrived.lock().unwrap(), now, stamp_ms);
        self.hold_tombstones();
    }

    /// Tells the store which tombstones it must keep past their grace
    /// period (see the module's comment). Run every second.
    pub(super) fn hold_tombstones(&self) {
        if !self.options.repair {
            // Nothing would ever release them.
            self.synced.oldest.store(u64::MAX, Ordering::Release);
            self.store.hold_tombstones_from(u64::MAX);
            return;
        }
        if !self.members_learned.load(Ordering::Acquire) {
            // Members it was given or remembers, not yet reached.
            self.synced.oldest.store(0, Ordering::Release);
            self.store.hold_tombstones_from(0);
            return;
        }
        let members: Vec<u64> = {
            let m = self.membership.lock().unwrap();
            m.members()
                .filter(|u| u.liveness != Liveness::Left)
                .map(|u| u.id)
                .collect()
        };
        let (oldest, from) = {
            let mut synced = self.synced.rounds.lock().unwrap();
            // Members gone (left, removed, forgotten) no longer count.
            synced.retain(|id, _| members.contains(id));
            let rounds = || members.iter().map(|id| synced.get(id).copied());
            let oldest = hold_from(rounds(), 0);
            let arrived = arrivals_held(&mut self.synced.arrived.lock().unwrap(), oldest);
            (
                oldest,
                hold_from(rounds(), self.strictest_offset_ms.load(Ordering::Acquire)).min(arrived),
            )
        };
        self.synced.oldest.store(oldest, Ordering::Release);
        self.store.hold_tombstones_from(from);
        self.review_horizon(oldest);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tombstones_are_held_from_the_oldest_round_less_the_offset() {
        assert_eq!(hold_from([], 60_000), u64::MAX);
        assert_eq!(hold_from([Some(1_000_000)], 60_000), 940_000);
        assert_eq!(
            hold_from([Some(1_000_000), Some(900_000), Some(2_000_000)], 0),
            900_000
        );
        // A member with no round in this life holds everything.
        assert_eq!(hold_from([Some(1_000_000), None], 60_000), 0);
        assert_eq!(hold_from([Some(10)], 60_000), 0);
    }

    #[test]
    fn a_late_arrival_is_held_by_its_stamp_until_every_round_covers_it() {
        let mut arrived = Vec::new();
        // Stamped at 1,000, arrived at 500,000; more within the second.
        note_arrival(&mut arrived, 500_000, 1_000);
        note_arrival(&mut arrived, 500_400, 7_000);
        note_arrival(&mut arrived, 500_600, 900);
        note_arrival(&mut arrived, 600_000, 50_000);
        assert_eq!(arrived, [(500_600, 900), (600_000, 50_000)]);
        // Rounds that started before the arrival do not cover it.
        assert_eq!(arrivals_held(&mut arrived, 400_000), 900);
        assert_eq!(arrivals_held(&mut arrived, 500_600), 900);
        assert_eq!(arrivals_held(&mut arrived, 500_601), 50_000);
        assert_eq!(arrivals_held(&mut arrived, 600_001), u64::MAX);
        assert!(arrived.is_empty());
        // Bounded: past the cap, arrivals merge into the newest.
        for i in 0..(ARRIVALS_KEPT as u64 + 10) {
            note_arrival(&mut arrived, i * 2_000, 100 + i);
        }
        assert_eq!(arrived.len(), ARRIVALS_KEPT);
        assert_eq!(
            *arrived.last().unwrap(),
            (
                (ARRIVALS_KEPT as u64 + 9) * 2_000,
                100 + ARRIVALS_KEPT as u64 - 1
            )
        );
    }
}
