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
}

impl Default for Synced {
    fn default() -> Self {
        Synced {
            rounds: Mutex::default(),
            oldest: AtomicU64::new(0),
        }
    }
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
            (
                hold_from(rounds(), 0),
                hold_from(rounds(), self.strictest_offset_ms.load(Ordering::Acquire)),
            )
        };
        self.synced.oldest.store(oldest, Ordering::Release);
        self.store.hold_tombstones_from(from);
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
}
