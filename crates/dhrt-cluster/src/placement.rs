//! Placement and write-concern arithmetic: which members host a
//! collection, and how many acknowledgements a write needs. Pure rules.
//!
//! Rules:
//! - A member hosts a collection unless it pinned a list without it
//!   (`--collections`).
//! - The replicas of a write are every member hosting its collection that
//!   has not left — healthy, unhealthy, dead or syncing alike — plus this
//!   node when it stores the write itself. Members that are down count in
//!   the denominator: `quorum` with two of three replicas down is not met.
//! - `all` needs every replica, `quorum` a majority (`replicas / 2 + 1`),
//!   `local` this node alone. This node's own copy counts when it stores
//!   the write; a write it forwards without storing needs at least one
//!   other replica whatever the concern, or it would live nowhere.

use std::str::FromStr;

use dhrt_proto::MemberUpdate;

/// How many replicas acknowledge a write before the client hears "ok".
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WriteAck {
    /// Every replica hosting the collection, down ones included (so a write
    /// while a replica is down is answered "saved on N of M").
    #[default]
    All,
    /// A majority of the replicas hosting the collection, this node
    /// included.
    Quorum,
    /// This node alone; replication runs in the background.
    Local,
}

impl FromStr for WriteAck {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "all" => Ok(WriteAck::All),
            "quorum" => Ok(WriteAck::Quorum),
            "local" => Ok(WriteAck::Local),
            other => Err(format!(
                "unknown write ack {other:?} (expected all, quorum or local)"
            )),
        }
    }
}

impl WriteAck {
    /// The name used on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            WriteAck::All => "all",
            WriteAck::Quorum => "quorum",
            WriteAck::Local => "local",
        }
    }
}

/// Whether member `m` hosts `collection`.
pub(crate) fn hosts(m: &MemberUpdate, collection: &str) -> bool {
    m.collections
        .as_ref()
        .is_none_or(|c| c.iter().any(|x| x == collection))
}

/// What a write needs: replicas in all, and acknowledgements from other
/// replicas before it is answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Need {
    /// Replicas of the write, this node included when it stores it.
    pub(crate) replicas: usize,
    /// Replicas (this node's own copy included) that must hold it.
    pub(crate) copies: usize,
    /// Acknowledgements needed from other replicas.
    pub(crate) remote_acks: usize,
}

/// The arithmetic of a write concern: `others` is how many other members
/// host the collection (left ones excluded), `local` whether this node
/// stores the write.
pub(crate) fn need(concern: WriteAck, others: usize, local: bool) -> Need {
    let replicas = others + usize::from(local);
    let copies = match concern {
        WriteAck::All => replicas,
        WriteAck::Quorum => replicas / 2 + 1,
        WriteAck::Local => 1,
    }
    .min(replicas);
    let mut remote_acks = copies.saturating_sub(usize::from(local));
    if !local && others > 0 {
        // A forwarded write must reach at least one host.
        remote_acks = remote_acks.max(1);
    }
    Need {
        replicas,
        copies: copies.max(remote_acks + usize::from(local)),
        remote_acks,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dhrt_proto::Liveness;

    #[test]
    fn all_needs_every_replica() {
        assert_eq!(
            need(WriteAck::All, 2, true),
            Need {
                replicas: 3,
                copies: 3,
                remote_acks: 2
            }
        );
        assert_eq!(need(WriteAck::All, 0, true).remote_acks, 0);
    }

    #[test]
    fn quorum_is_a_majority_of_every_replica_down_ones_included() {
        for (others, acks) in [(0, 0), (1, 1), (2, 1), (3, 2), (4, 2), (5, 3), (6, 3)] {
            let n = need(WriteAck::Quorum, others, true);
            assert_eq!(n.remote_acks, acks, "{others} others");
            let replicas = others + 1;
            assert_eq!(n.copies, replicas / 2 + 1);
            // A majority: two quorums always share a replica.
            assert!(2 * n.copies > n.replicas);
        }
    }

    #[test]
    fn local_needs_no_other_replica() {
        assert_eq!(need(WriteAck::Local, 4, true).remote_acks, 0);
        assert_eq!(need(WriteAck::Local, 4, true).copies, 1);
    }

    #[test]
    fn a_forwarded_write_needs_at_least_one_host() {
        assert_eq!(need(WriteAck::Local, 2, false).remote_acks, 1);
        assert_eq!(need(WriteAck::Quorum, 2, false).remote_acks, 2);
        assert_eq!(need(WriteAck::Quorum, 3, false).remote_acks, 2);
        assert_eq!(need(WriteAck::All, 3, false).remote_acks, 3);
        let n = need(WriteAck::Local, 2, false);
        assert_eq!((n.replicas, n.copies), (2, 1));
    }

    #[test]
    fn names_round_trip() {
        for a in [WriteAck::All, WriteAck::Quorum, WriteAck::Local] {
            assert_eq!(a.as_str().parse::<WriteAck>(), Ok(a));
        }
        assert!("most".parse::<WriteAck>().is_err());
    }

    #[test]
    fn a_pinned_member_hosts_only_its_list() {
        let mut m = MemberUpdate {
            id: 1,
            name: "a".into(),
            addr: "a:1".into(),
            incarnation: 1,
            liveness: Liveness::Alive,
            syncing: false,
            collections: None,
        };
        assert!(hosts(&m, "anything"));
        m.collections = Some(vec!["users".into()]);
        assert!(hosts(&m, "users"));
        assert!(!hosts(&m, "orders"));
    }
}
