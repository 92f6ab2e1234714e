//! Contact with the cluster: when a live peer was last seen, remembered in
//! `cluster.state` with the members, and the full re-sync it sets off when
//! the node was away longer than the tombstone grace period.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use dhrt_proto::Liveness;
use dhrt_storage::Store;

use super::Cluster;
use crate::state::{self, SavedState};

/// How long this node was out of touch (ms), if that is longer than the
/// tombstone grace period and it holds data that deletes made meanwhile may
/// have been forgotten for: then it must re-sync fully.
pub(super) fn away_too_long(store: &Store, last_contact_ms: u64) -> Option<u64> {
    let away = store.clock().wall_ms().saturating_sub(last_contact_ms);
    (away > store.options().tombstone_grace.as_millis() as u64
        && !store.all_collections().is_empty())
    .then_some(away)
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
            let contact = !self.sources().is_empty();
            let now = self.wall_ms();
            if contact
                && !had_contact
                && let Some(away) =
                    away_too_long(&self.store, self.last_contact.load(Ordering::Acquire))
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
                self.last_contact.store(now, Ordering::Release);
            }
            // Rewrite on news, and every second while in touch (a few
            // bytes, no fsync: losing the last write only makes a restart
            // look a little longer away).
            let saved = self.saved_state();
            let stale = written
                .as_ref()
                .is_none_or(|w| w.members != saved.members || saved.seen_ms > w.seen_ms);
            if stale && self.save_state(&saved) {
                written = Some(saved);
            }
        }
    }

    /// What the state file should say now.
    pub(super) fn saved_state(&self) -> SavedState {
        let m = self.membership.lock().unwrap();
        SavedState {
            seen_ms: self.last_contact.load(Ordering::Acquire),
            members: m
                .members()
                .filter(|u| u.liveness != Liveness::Left)
                .map(|u| u.addr.clone())
                .collect(),
        }
    }

    /// Writes the state file (if there is one and there are members to
    /// remember); whether it was written.
    pub(super) fn save_state(&self, saved: &SavedState) -> bool {
        let Some(path) = &self.options.state_file else {
            return false;
        };
        if saved.members.is_empty() {
            return false;
        }
        match state::save(path, saved) {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!("writing {}: {e}", path.display());
                false
            }
        }
    }
}
