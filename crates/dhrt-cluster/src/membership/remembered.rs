//! Members remembered from this node's earlier life (`cluster.state`'s
//! `known` lines), taken back at incarnation 0, and members replaced by
//! another at their address, kept so that a node that missed the
//! replacement learns it.

use dhrt_proto::{Liveness, MemberUpdate};

use super::{Known, MAX_MEMBERS, Membership, Output};

/// Whether `m` is only remembered from this node's earlier life (or heard
/// of from another node that remembers it so): nobody has heard from it in
/// this life. Incarnations are wall-clock milliseconds; a remembered
/// member's is 0.
pub(crate) fn remembered_only(m: &MemberUpdate) -> bool {
    m.incarnation == 0
}

/// The most members replaced at their address a node remembers.
const MAX_REPLACED: usize = 64;

impl Membership {
    /// The members replaced by another at their address, as left at
    /// incarnation 0 (see `replaced` on [`Membership`]).
    pub fn replaced(&self) -> &[MemberUpdate] {
        &self.replaced
    }

    /// What a table exchange carries: the table, and the members replaced
    /// at their address.
    pub fn sync_table(&self) -> Vec<MemberUpdate> {
        let mut t = self.table();
        t.extend(
            self.replaced
                .iter()
                .filter(|r| !self.members.contains_key(&r.id))
                .cloned(),
        );
        t
    }

    pub(super) fn note_replaced(&mut self, old: &MemberUpdate) {
        self.replaced.retain(|r| r.id != old.id);
        if self.replaced.len() >= MAX_REPLACED {
            self.replaced.remove(0);
        }
        self.replaced.push(MemberUpdate {
            incarnation: 0,
            liveness: Liveness::Left,
            syncing: false,
            ..old.clone()
        });
    }

    /// Takes the members remembered from this node's earlier life (each
    /// dead at incarnation 0, see `state::remembered`) that it does not
    /// know yet: as if another node had said they are dead. Anything they
    /// say of themselves, and any news of them from a live member, is
    /// newer.
    ///
    /// Taken quietly (not spread as news; table exchanges carry them): a
    /// left one too, so that a node that missed the leave, and remembers
    /// the member as dead, learns it. Of two remembered at one address (a
    /// stale file), the first stands here.
    pub fn remember(&mut self, now_ms: u64, remembered: impl IntoIterator<Item = MemberUpdate>) {
        // Members first: a left one at the address of a member is one it
        // replaced.
        let (mut left, members): (Vec<_>, Vec<_>) = remembered
            .into_iter()
            .partition(|u| u.liveness == Liveness::Left);
        left.retain(|u| {
            let replaced = members.iter().any(|m| m.addr == u.addr && m.id != u.id);
            if replaced && u.id != self.me.id && u.check().is_ok() {
                self.note_replaced(u);
            }
            !replaced
        });
        for u in members.into_iter().chain(left) {
            if u.id == self.me.id
                || u.addr == self.me.addr
                || u.check().is_err()
                || self.members.contains_key(&u.id)
                || self.members.values().any(|k| k.update.addr == u.addr)
            {
                continue;
            }
            if self.members.len() >= MAX_MEMBERS {
                break;
            }
            self.members.insert(
                u.id,
                Known {
                    update: u.clone(),
                    since_ms: now_ms,
                    moved_ms: None,
                    flagged_ms: None,
                },
            );
            if u.liveness != Liveness::Left {
                self.out.push(Output::Changed {
                    member: u,
                    before: None,
                });
            }
        }
    }
}
