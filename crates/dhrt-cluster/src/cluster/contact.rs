//! Contact with the cluster: when a live peer was last seen, remembered in
//! `cluster.state` with the members, and the full re-sync it sets off when
//! the node was away longer than the tombstone grace period.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use dhrt_proto::Liveness;
use dhrt_storage::Store;

use super::Cluster;
use super::clock::UNVERIFIED_GRACE;
use crate::state::{self, SavedState};

/// How often a lasting error writing the state file is logged again.
const STATE_ERROR_EVERY: Duration = Duration::from_secs(60);

/// How long this node was out of touch (ms) as of `now_ms`, if that is
/// longer than the tombstone grace period and it holds data that deletes
/// made meanwhile may have been forgotten for: then it must re-sync fully.
pub(super) fn away_too_long(store: &Store, now_ms: u64, last_contact_ms: u64) -> Option<u64> {
    let away = now_ms.saturating_sub(last_contact_ms);
    (away > store.options().tombstone_grace.as_millis() as u64
        && !store.all_collections().is_empty())
    .then_some(away)
}

/// A clock's time as a version timestamp: every version it stamped or saw
/// so far is at or before it, every one it stamps later after it.
pub(super) fn stamp_now(clock: &dhrt_storage::Clock) -> u64 {
    clock
        .last()
        .max(clock.wall_ms() << dhrt_storage::LOGICAL_BITS)
}

impl Cluster {
    /// Every second: remember when a live peer was last seen, and the
    /// members, in the state file. Contact regained after longer than the
    /// tombstone grace period starts a full re-sync.
    pub(super) async fn contact_loop(self: Arc<Self>) {
        let mut had_contact = false;
        let mut written: Option<SavedState> = None;
        while self.running.load(Ordering::Acquire) {
            tokio::time::sleep(Duration::from_secs(1)).await;
            self.hold_tombstones();
            // Until the absence before this start is judged, the contact it
            // was measured from stays as it was.
            if !self.absence_judged.load(Ordering::Acquire) {
                continue;
            }
            let contact = !self.sources().is_empty();
            let now = self.contact_now();
            if contact
                && !had_contact
                && let Some(away) = away_too_long(
                    &self.store,
                    self.absence_now(),
                    self.last_contact.load(Ordering::Acquire),
                )
                && !self.full_resync.swap(true, Ordering::AcqRel)
            {
                tracing::warn!(
                    "out of touch with the cluster for {} s, longer than the tombstone grace period: re-syncing fully",
                    away / 1000
                );
                let me = self.clone();
                tokio::spawn(async move { me.resync().await });
            }
            had_contact = contact;
            if contact && !self.full_resync.load(Ordering::Acquire) {
                self.touched(now);
            }
            // Rewrite on news, and every second while in touch (a few
            // bytes and an fsync, off the runtime's threads).
            let saved = self.saved_state();
            let stale = written.as_ref().is_none_or(|w| {
                w.members != saved.members
                    || w.left != saved.left
                    || w.known != saved.known
                    || w.horizon != saved.horizon
                    || w.fresh != saved.fresh
                    || saved.seen_ms > w.seen_ms
            });
            if stale {
                let me = self.clone();
                let to_save = saved.clone();
                let saved_ok = tokio::task::spawn_blocking(move || me.save_state(&to_save))
                    .await
                    .unwrap_or(false);
                if saved_ok {
                    written = Some(saved);
                }
            }
        }
    }

    /// The time an absence is measured by: the later of this node's wall
    /// clock and its peers' (the middle of their offsets), once compared.
    /// A clock set back while the node was down must not hide how long it
    /// was away.
    pub(super) fn absence_now(&self) -> u64 {
        let wall = self.wall_ms();
        if self.peers_compared.load(Ordering::Acquire) {
            wall.saturating_add_signed(self.peers_offset_high.load(Ordering::Acquire).max(0))
        } else {
            wall
        }
    }

    /// The time contact is recorded at: the peers' (the middle of their
    /// clocks) once compared, so that a clock running ahead does not make a
    /// later absence look shorter, nor one running behind make every
    /// absence look longer by its offset.
    pub(super) fn contact_now(&self) -> u64 {
        let wall = self.wall_ms();
        let low = self.peers_offset_low.load(Ordering::Acquire);
        if self.clock_measured.load(Ordering::Acquire) {
            wall.saturating_add_signed(low)
        } else if self.peers_compared.load(Ordering::Acquire) {
            // Skewed: its peers may be the ones that are wrong; never
            // later than its own clock (a contact noted in the future
            // would shorten the next absence).
            wall.saturating_add_signed(low.min(0))
        } else {
            wall
        }
    }

    /// Records contact with the cluster at `now` ([`Self::contact_now`]).
    pub(super) fn touched(&self, now: u64) {
        // Its own clock first: read without the other, the pair may only
        // err towards keeping this node's records.
        self.contact_stamp
            .store(stamp_now(self.store.clock()), Ordering::Release);
        self.last_contact.store(now, Ordering::Release);
        // A node syncing may be in touch with data that is not yet the
        // cluster's (a newcomer's, or an old copy's).
        let syncing = self.membership.lock().unwrap().me().syncing;
        if !syncing && !self.sync.running.load(Ordering::Acquire) {
            self.data_contact.store(now, Ordering::Release);
        }
    }

    /// How fresh this node's data is: [`dhrt_proto::PeerReply::Contact`].
    pub(crate) fn data_contact(&self) -> Option<u64> {
        let at = self.data_contact.load(Ordering::Acquire);
        (at != u64::MAX).then_some(at)
    }

    /// Judges, once per life and before any of this node's data travels
    /// (its first handoff or re-sync; anti-entropy and moves wait for it),
    /// whether it was away longer than the tombstone grace period: by
    /// [`absence_now`](Self::absence_now) once its clock has been compared
    /// with its peers' (it waits for a peer; one known for 10 s and never
    /// compared leaves it to its own clock), unless that reads before the contact it
    /// recorded (set back while it was down): then nothing tells how long
    /// it was away, and it re-syncs fully.
    pub(super) async fn judge_absence(&self) {
        if self.absence_judged.load(Ordering::Acquire) {
            return;
        }
        // Until a peer answers nothing travels anyway: no judging by an
        // unchecked clock meanwhile (it may have been set back by less
        // than the allowed offset). Peers known for `UNVERIFIED_GRACE`
        // without a comparison: judged by this node's clock after all.
        loop {
            if self.peers_compared.load(Ordering::Acquire) {
                break;
            }
            let since = Duration::from_millis(self.peers_since_ms.load(Ordering::Acquire));
            if self.has_peers() && self.epoch.elapsed().saturating_sub(since) > UNVERIFIED_GRACE {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let seen = self.last_contact.load(Ordering::Acquire);
        let wall = self.wall_ms();
        let measured = self.peers_compared.load(Ordering::Acquire);
        let set_back = !measured
            && wall.saturating_add(self.options.max_clock_ahead.as_millis() as u64) < seen
            && !self.store.all_collections().is_empty();
        let away = away_too_long(&self.store, self.absence_now(), seen);
        if (away.is_some() || set_back) && !self.full_resync.swap(true, Ordering::AcqRel) {
            match away {
                Some(away) => tracing::warn!(
                    "away from the cluster for {} s by its clock{}, longer than the tombstone grace period ({} s): a full re-sync runs before this node trusts its own data",
                    away / 1000,
                    if measured && wall < self.absence_now() {
                        "s' (this node's own clock is behind them)"
                    } else {
                        ""
                    },
                    self.store.options().tombstone_grace.as_secs()
                ),
                None => tracing::warn!(
                    "this node's clock reads {} s before its last contact with the cluster (set back while it was down), and no peer could be compared with it: it cannot tell how long it was away, so a full re-sync runs before it trusts its own data",
                    seen.saturating_sub(wall) / 1000
                ),
            }
            self.stale_before
                .fetch_max(self.contact_stamp.load(Ordering::Acquire), Ordering::AcqRel);
        }
        self.absence_judged.store(true, Ordering::Release);
    }

    /// What the state file should say now.
    pub(super) fn saved_state(&self) -> SavedState {
        let m = self.membership.lock().unwrap();
        let members: Vec<String> = m
            .members()
            .filter(|u| u.liveness != Liveness::Left)
            .map(|u| u.addr.clone())
            .collect();
        let mut left: Vec<String> = m
            .members()
            .filter(|u| u.liveness == Liveness::Left && !members.contains(&u.addr))
            .map(|u| u.addr.clone())
            .collect();
        left.dedup();
        let known = m
            .members()
            .chain(m.replaced())
            .map(crate::state::remembered)
            .collect();
        SavedState {
            seen_ms: self.last_contact.load(Ordering::Acquire),
            stamp_ms: Some(self.contact_stamp.load(Ordering::Acquire)),
            members,
            left,
            horizon: self.horizon(),
            fresh: Some(self.data_contact()),
            known,
        }
    }

    /// Writes the state file (if there is one and there are members to
    /// remember, left ones included); whether it was written.
    pub(super) fn save_state(&self, saved: &SavedState) -> bool {
        let Some(path) = &self.options.state_file else {
            return false;
        };
        if saved.members.is_empty() && saved.left.is_empty() {
            return false;
        }
        let result = state::save(path, saved);
        let mut last = self.state_save_error.lock().unwrap();
        match result {
            Ok(()) => {
                if last.take().is_some() {
                    tracing::info!("{} is written again", path.display());
                }
                true
            }
            Err(e) => {
                let e = e.to_string();
                let again = last
                    .as_ref()
                    .is_some_and(|(was, at)| *was == e && at.elapsed() < STATE_ERROR_EVERY);
                if !again {
                    tracing::warn!(
                        "writing {}: {e}; until it is written, a restart judges this node's \
                         absence from the last state saved",
                        path.display()
                    );
                    *last = Some((e, std::time::Instant::now()));
                }
                false
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use dhrt_storage::{Options, Store};

    use crate::cluster::{Cluster, ClusterOptions, Identity};
    use crate::state::SavedState;

    /// A state file that cannot be written (here a directory in its
    /// place) is reported at the first save, not at every one after; its
    /// return is noted, and a new error is reported again.
    #[test]
    fn a_lasting_error_writing_the_state_file_is_not_reported_at_every_save() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cluster.state");
        std::fs::create_dir(&path).unwrap();
        let cluster = Cluster::new(
            Store::memory(Options::default()),
            Identity {
                id: 1,
                name: "n1".into(),
                addr: "127.0.0.1:7453".into(),
            },
            ClusterOptions {
                state_file: Some(path.clone()),
                ..ClusterOptions::default()
            },
        );
        let saved = SavedState {
            seen_ms: 1,
            stamp_ms: Some(1 << 16),
            members: vec!["127.0.0.1:7454".into()],
            left: Vec::new(),
            horizon: None,
            fresh: None,
            known: Vec::new(),
        };
        let reported = || cluster.state_save_error.lock().unwrap().clone();
        assert!(!cluster.save_state(&saved));
        let first = reported().expect("reported");
        assert!(!cluster.save_state(&saved));
        assert_eq!(reported(), Some(first.clone()), "reported again");
        std::fs::remove_dir(&path).unwrap();
        assert!(cluster.save_state(&saved));
        assert_eq!(reported(), None);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
        std::fs::remove_file(&path).unwrap();
        std::fs::create_dir(&path).unwrap();
        assert!(!cluster.save_state(&saved));
        assert!(reported().is_some_and(|(_, at)| at > first.1));
    }
}
