//! Who goes first when the whole cluster comes back at once (every live
//! member syncing, none to sync from): the member whose data was last in
//! touch, after a wait for the members it remembers; and the horizon of
//! one that went on with its own data after a long absence, which bounds
//! what a prune against it forgets.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use dhrt_proto::{Liveness, MemberUpdate, PeerOp, PeerReply};
use dhrt_storage::LOGICAL_BITS;
use tokio::time::Instant;

use super::Cluster;
use crate::link::LinkError;
use crate::membership::remembered_only;

/// How long a member back with the whole cluster waits for the members it
/// remembers before one of those back goes first with its own data: the
/// freshest data may be on one that is slower to start.
const AWAIT_REMEMBERED: Duration = Duration::from_secs(30);

/// Whether data last in touch at `a` (on member `a_id`) goes before data
/// last in touch at `b` (on `b_id`) when every member syncs at once: the
/// later contact first, then the lower id; no data last.
pub(super) fn first_of(a: Option<u64>, a_id: u64, b: Option<u64>, b_id: u64) -> bool {
    (a, std::cmp::Reverse(a_id)) > (b, std::cmp::Reverse(b_id))
}

impl Cluster {
    /// Waits for a member to sync from. `None` when this node's own data
    /// has to do: it is alone, or every live member is syncing too (the
    /// whole cluster is coming back at once) and, after a moment for a
    /// source to appear, this node's data is the freshest among them
    /// ([`Self::goes_first`]), so it goes first and the others sync from
    /// it.
    pub(super) async fn wait_for_source(self: &Arc<Self>) -> Option<MemberUpdate> {
        let started = Instant::now();
        let mut told = false;
        loop {
            if let Some(source) = self.sources().into_iter().next() {
                return Some(source);
            }
            let peers = self.alive_peers();
            let waited = started.elapsed();
            // The freshest may be one still on its way back.
            let missing = self.remembered_not_back();
            if peers.is_empty() {
                // Alone: with its own data, once no member it remembers
                // is still on its way (a peer it knew only just suspected,
                // or restarting, counts as on its way); with none from a
                // sync (a newcomer whose source went away), only after the
                // wait, so that it does not become the empty source the
                // others would prune against.
                if (missing == 0 && self.data_contact().is_some()) || waited > AWAIT_REMEMBERED {
                    return None;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
            if waited > Duration::from_secs(3) && missing > 0 && !told {
                told = true;
                tracing::info!(
                    "every live member is syncing: waiting up to {} s for the {missing} members remembered in cluster.state that are not back before one goes first",
                    AWAIT_REMEMBERED.as_secs()
                );
            }
            if waited > Duration::from_secs(3)
                && (missing == 0 || waited > AWAIT_REMEMBERED)
                && self.goes_first(&peers, waited > AWAIT_REMEMBERED).await
            {
                tracing::warn!(
                    "every live member is syncing: this node goes first, with its own data (the freshest among them)"
                );
                return None;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// How many members remembered in `cluster.state` at start are neither
    /// alive nor known to have left.
    fn remembered_not_back(&self) -> usize {
        let m = self.membership.lock().unwrap();
        self.remembered
            .iter()
            .filter(|addr| {
                !m.members().any(|u| {
                    u.addr == **addr && matches!(u.liveness, Liveness::Alive | Liveness::Left)
                })
            })
            .count()
    }

    /// Whether this node goes first among `peers`, all syncing: its data
    /// was in touch with the cluster last (ties: the lowest id). A member
    /// back long after it left, or away longest, would otherwise bring
    /// back what the cluster deleted since; a newcomer or a wiped node
    /// (no data from an earlier life) would make the others forget all
    /// they hold. A peer that cannot say (a lost answer, an earlier
    /// build that does not know the question) keeps this node from going
    /// first until it has waited `AWAIT_REMEMBERED` (`late`); then it is
    /// ranked as holding no data.
    async fn goes_first(self: &Arc<Self>, peers: &[MemberUpdate], late: bool) -> bool {
        let me = self.dialer.me;
        let mine = self.data_contact();
        for p in peers {
            let theirs = match self.contact_of(p.id).await {
                Ok(theirs) => theirs,
                Err(e) => {
                    tracing::debug!("asking {} how fresh its data is: {e}", p.addr);
                    if !late {
                        return false;
                    }
                    // Ranked as holding nothing: by id it could defer to a
                    // peer that defers to it, and none would ever go.
                    None
                }
            };
            if first_of(theirs, p.id, mine, me) {
                return false;
            }
        }
        true
    }

    /// How fresh peer `id`'s data is: [`dhrt_proto::PeerReply::Contact`].
    async fn contact_of(self: &Arc<Self>, id: u64) -> Result<Option<u64>, LinkError> {
        let Some(peer) = self.peer(id) else {
            return Err(LinkError::Refused {
                addr: id.to_string(),
                reason: "unknown member".into(),
            });
        };
        match peer
            .link
            .request(PeerOp::Contact, self.options.timeout)
            .await?
        {
            PeerReply::Contact(at) => Ok(at),
            other => Err(LinkError::Refused {
                addr: peer.link.addr().to_string(),
                reason: format!("unexpected answer to Contact: {other:?}"),
            }),
        }
    }

    /// Members this node can sync from: alive and not syncing themselves.
    pub(super) fn sources(&self) -> Vec<MemberUpdate> {
        self.alive_peers()
            .into_iter()
            .filter(|u| !u.syncing)
            .collect()
    }

    /// This node's horizon: see [`dhrt_proto::PeerReply::Horizon`].
    pub(crate) fn horizon(&self) -> Option<u64> {
        let h = self.horizon.load(Ordering::Acquire);
        (h != u64::MAX).then_some(h)
    }

    /// Back from a long absence with no member to re-sync from (it came
    /// back alone, or every member came back at once): it goes on with its
    /// own data, which cannot tell what the cluster deleted after it lost
    /// touch (`lost_touch`, a stamp) until every member has had an
    /// anti-entropy round with it.
    pub(super) fn own_data(&self, lost_touch: u64) {
        // Less the allowed offset: a write made just after, stamped by a
        // clock behind this one's, carries an earlier stamp.
        let margin = self.strictest_offset_ms.load(Ordering::Acquire) << LOGICAL_BITS;
        self.take_horizon(lost_touch.saturating_sub(margin));
    }

    /// This node's data judges nothing stamped after `h`, from now until
    /// every member has had a round with it.
    pub(super) fn take_horizon(&self, h: u64) {
        self.horizon.fetch_min(h, Ordering::AcqRel);
        self.horizon_since.store(self.wall_ms(), Ordering::Release);
    }

    /// Once every member has had a round with this node that started
    /// after it went on with its own data (`oldest`: the oldest start of
    /// the members' last rounds), its data is the cluster's again.
    pub(super) fn review_horizon(&self, oldest: u64) {
        if self.horizon.load(Ordering::Acquire) == u64::MAX
            || oldest == 0
            || oldest < self.horizon_since.load(Ordering::Acquire)
        {
            return;
        }
        // Members it remembers but has not heard from in this life are not
        // in the table yet: they count too.
        let all_back = {
            let m = self.membership.lock().unwrap();
            self.remembered
                .iter()
                .all(|addr| m.members().any(|u| u.addr == *addr && !remembered_only(u)))
        };
        if all_back {
            self.horizon.store(u64::MAX, Ordering::Release);
        }
    }

    /// The horizon of peer `id` (`None`: its data is the cluster's).
    pub(super) async fn horizon_of(self: &Arc<Self>, id: u64) -> Result<Option<u64>, LinkError> {
        let Some(peer) = self.peer(id) else {
            return Ok(None);
        };
        let long = self.options.timeout.max(Duration::from_secs(10));
        match peer.link.request(PeerOp::Horizon, long).await? {
            PeerReply::Horizon(h) => Ok(h),
            other => Err(LinkError::Refused {
                addr: peer.link.addr().to_string(),
                reason: format!("unexpected answer to Horizon: {other:?}"),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_freshest_data_goes_first_and_none_goes_last() {
        // Later contact first, whatever the ids.
        assert!(first_of(Some(2_000), 9, Some(1_000), 1));
        assert!(!first_of(Some(1_000), 1, Some(2_000), 9));
        // Equal contact: the lower id.
        assert!(first_of(Some(1_000), 1, Some(1_000), 9));
        assert!(!first_of(Some(1_000), 9, Some(1_000), 1));
        // No data from an earlier life never goes before data, even data
        // that cannot say how fresh it is (0).
        assert!(!first_of(None, 1, Some(0), 9));
        assert!(first_of(Some(0), 9, None, 1));
        assert!(first_of(None, 1, None, 9));
    }
}
