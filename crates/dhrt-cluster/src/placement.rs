//! Placement and write-concern arithmetic: which members own a
//! collection, and how many acknowledgements a write needs. Pure rules.
//!
//! Rules:
//! - A member may own a collection unless it pinned a list without it
//!   (`--collections`), or it left.
//! - A collection's owners are the members that may own it with the
//!   greatest placement scores (rendezvous hashing: a score is a hash of
//!   the collection's name and the member's id), as many as its replication
//!   factor asks, or all of them (`all`, the default). Every node computes
//!   the same owners from the same members; a member joining takes a
//!   collection's place only where it scores above one of its owners, and a
//!   member leaving changes only the collections it owned.
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

/// How many members own a collection: its replication factor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Replicas {
    /// Every member that may own it.
    #[default]
    All,
    /// This many (at least 1), or every member that may own it if fewer.
    N(u16),
}

impl FromStr for Replicas {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "all" => Ok(Replicas::All),
            n => match n.parse::<u16>() {
                Ok(n) if n >= 1 => Ok(Replicas::N(n)),
                _ => Err(format!(
                    "replicas must be all or a number from 1 to {}, not {n:?}",
                    u16::MAX
                )),
            },
        }
    }
}

impl std::fmt::Display for Replicas {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Replicas::All => f.write_str("all"),
            Replicas::N(n) => write!(f, "{n}"),
        }
    }
}

/// The placement score of member `id` for `collection`: stable across
/// builds and machines (xxh3 seeded with the id).
pub(crate) fn score(collection: &str, id: u64) -> u64 {
    xxhash_rust::xxh3::xxh3_64_with_seed(collection.as_bytes(), id)
}

/// The owners of `collection` among `eligible` (the ids of the members that
/// may own it, in any order, repeats ignored): the `replicas` with the
/// greatest scores, or every one with `All` or when there are fewer. Best
/// score first.
pub(crate) fn owners(
    collection: &str,
    eligible: impl IntoIterator<Item = u64>,
    replicas: Replicas,
) -> Vec<u64> {
    let mut ranked: Vec<(u64, u64)> = eligible
        .into_iter()
        .map(|id| (score(collection, id), id))
        .collect();
    ranked.sort_unstable_by(|a, b| b.cmp(a));
    ranked.dedup_by_key(|&mut (_, id)| id);
    if let Replicas::N(n) = replicas {
        ranked.truncate(usize::from(n));
    }
    ranked.into_iter().map(|(_, id)| id).collect()
}

/// Whether member `m` may own `collection` (its pins allow it).
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
    use proptest::prelude::*;
    use std::collections::{BTreeSet, HashMap};

    fn replicas() -> impl Strategy<Value = Replicas> {
        prop_oneof![Just(Replicas::All), (1u16..6).prop_map(Replicas::N)]
    }

    fn members() -> impl Strategy<Value = Vec<u64>> {
        proptest::collection::btree_set(any::<u64>(), 0..12).prop_map(|s| s.into_iter().collect())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(500))]

        /// Every node, whatever order it lists the members in, computes
        /// the same owners: exactly min(N, eligible) distinct eligible ones.
        #[test]
        fn the_same_owners_everywhere_and_as_many_as_asked(
            ids in members(),
            name in "[a-z_-]{1,20}",
            r in replicas(),
            shuffle in any::<u64>(),
        ) {
            let mine = owners(&name, ids.iter().copied(), r);
            let mut theirs_order = ids.clone();
            theirs_order.sort_by_key(|&id| id ^ shuffle);
            theirs_order.extend(ids.first().copied()); // a repeat changes nothing
            prop_assert_eq!(&owners(&name, theirs_order, r), &mine);
            let expected = match r {
                Replicas::All => ids.len(),
                Replicas::N(n) => ids.len().min(usize::from(n)),
            };
            prop_assert_eq!(mine.len(), expected);
            let distinct: BTreeSet<u64> = mine.iter().copied().collect();
            prop_assert_eq!(distinct.len(), mine.len());
            prop_assert!(mine.iter().all(|id| ids.contains(id)));
        }

        /// A join changes a collection's owners only by the new member
        /// taking one owner's place (or adding itself while there are too
        /// few); a leave changes only the collections the leaver owned, and
        /// only by one member taking its place.
        #[test]
        fn a_join_or_a_leave_moves_only_what_it_must(
            ids in members(),
            newcomer in any::<u64>(),
            name in "[a-z_-]{1,20}",
            r in replicas(),
        ) {
            prop_assume!(!ids.contains(&newcomer));
            let before: BTreeSet<u64> = owners(&name, ids.iter().copied(), r).into_iter().collect();
            let after: BTreeSet<u64> =
                owners(&name, ids.iter().copied().chain([newcomer]), r).into_iter().collect();
            let gained: Vec<u64> = after.difference(&before).copied().collect();
            let lost: Vec<u64> = before.difference(&after).copied().collect();
            prop_assert!(gained.is_empty() || gained == vec![newcomer], "{gained:?}");
            prop_assert!(lost.len() <= 1);
            prop_assert!(lost.is_empty() || gained == vec![newcomer]);

            // The newcomer leaves again: back to the owners before.
            if let Some(&leaver) = ids.first() {
                let without: BTreeSet<u64> = owners(&name, ids.iter().copied().skip(1), r)
                    .into_iter()
                    .collect();
                if !before.contains(&leaver) {
                    prop_assert_eq!(&without, &before);
                } else {
                    let kept: BTreeSet<u64> = before.iter().copied().filter(|&id| id != leaver).collect();
                    prop_assert!(kept.is_subset(&without));
                    prop_assert!(without.len() <= kept.len() + 1);
                }
            }
        }
    }

    /// Collections spread evenly: over 20,000 names, on 3 to 12 members
    /// with 2 or 3 replicas, the busiest member owns at most 10 % more than
    /// the average.
    #[test]
    fn collections_spread_evenly() {
        for nodes in [3u64, 6, 12] {
            for rf in [2u16, 3] {
                let ids: Vec<u64> = (0..nodes)
                    .map(|i| 0x9e37_79b9_7f4a_7c15u64.wrapping_mul(i + 1))
                    .collect();
                let mut count: HashMap<u64, u64> = HashMap::new();
                let names = 20_000;
                for c in 0..names {
                    for id in owners(&format!("c{c}"), ids.iter().copied(), Replicas::N(rf)) {
                        *count.entry(id).or_default() += 1;
                    }
                }
                let average = (names * u64::from(rf)) as f64 / nodes as f64;
                let busiest = *count.values().max().unwrap() as f64;
                assert!(
                    busiest / average <= 1.10,
                    "{nodes} nodes, rf {rf}: busiest {busiest} against an average of {average}"
                );
            }
        }
    }

    #[test]
    fn replicas_parse_and_print() {
        for (s, r) in [
            ("all", Replicas::All),
            ("1", Replicas::N(1)),
            ("3", Replicas::N(3)),
        ] {
            assert_eq!(s.parse::<Replicas>(), Ok(r));
            assert_eq!(r.to_string(), s);
        }
        for bad in ["0", "-1", "two", "", "70000"] {
            assert!(bad.parse::<Replicas>().is_err(), "{bad}");
        }
    }

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
