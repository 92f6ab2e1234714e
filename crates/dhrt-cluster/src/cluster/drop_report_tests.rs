//! Tests of what a replica tells of a collection drop it applies
//! (`apply.rs`): the newest live key it kept, so the writer stamps the
//! drop again after it.

use bytes::Bytes;
use dhrt_proto::{Mutation, Stamp};
use dhrt_storage::{Options, Store};

use crate::cluster::{Cluster, Identity};

/// A node alone in memory, and a time to stamp from (now).
fn single() -> (Store, std::sync::Arc<Cluster>, u64) {
    let store = Store::memory(Options::default());
    let cluster = Cluster::single(
        store.clone(),
        Identity {
            id: 0xabc,
            name: "n1".into(),
            addr: "127.0.0.1:7453".into(),
        },
    );
    (store, cluster, (dhrt_storage::wall_ms() << 16) | 1)
}

/// A version at `ts` by another node.
fn at(ts: u64) -> Stamp {
    Stamp { ts, node: 0xdef }
}

/// A put of `k` in collection `c` at `ts`.
fn put(k: &'static str, ts: u64) -> Mutation {
    Mutation::Put {
        collection: "c".into(),
        key: Bytes::from_static(k.as_bytes()),
        value: Some(Bytes::from_static(b"v")),
        version: at(ts),
    }
}

/// A drop that leaves a live key stamped at or after it (written
/// through a node whose clock was ahead of the drop's) says so, with
/// the newest such version: the node it went through stamps it again.
#[test]
fn a_drop_tells_the_newest_key_it_left() {
    let (store, cluster, ts) = single();
    let drop = |ts: u64| Mutation::Drop {
        collection: "c".into(),
        version: at(ts),
    };
    cluster
        .apply(
            &[
                put("old", ts - 9),
                put("later", ts + 5),
                put("last", ts + 7),
            ],
            true,
        )
        .unwrap();
    let applied = cluster.apply(&[put("x", ts), drop(ts + 1)], true).unwrap();
    assert_eq!(applied.newer, [(1, at(ts + 7))]);
    assert!(store.get("c", b"old").unwrap().is_none());
    assert!(store.get("c", b"x").unwrap().is_none());
    // Behind a newer drop it is not written, and still tells, when asked
    // to (that walks the index): a writer's drop, not anti-entropy's.
    cluster.apply(&[drop(ts + 6)], true).unwrap();
    assert!(store.get("c", b"later").unwrap().is_none());
    assert_eq!(
        cluster.apply(&[drop(ts + 2)], true).unwrap().newer,
        [(0, at(ts + 7))]
    );
    assert!(
        cluster
            .apply(&[drop(ts + 2)], false)
            .unwrap()
            .newer
            .is_empty()
    );
    // A drop after every live key (a tombstone left is no key) says
    // nothing.
    let mut delete = put("gone", ts + 20);
    if let Mutation::Put { value, .. } = &mut delete {
        *value = None;
    }
    cluster.apply(&[put("gone", ts + 9), delete], true).unwrap();
    assert!(
        cluster
            .apply(&[drop(ts + 10)], true)
            .unwrap()
            .newer
            .is_empty()
    );
    assert!(store.get("c", b"last").unwrap().is_none());
}

/// Asked for a key a drop removed (or one it never held before the drop),
/// a node answers a deletion at the drop's version, not "no entry": a copy
/// stamped before the drop, kept by a member the drop did not reach, then
/// loses wherever answers are merged. A key written after the drop answers
/// as itself.
#[test]
fn a_key_a_drop_removed_is_answered_deleted_at_the_drop() {
    use dhrt_proto::{PeerReply, Versioned};
    let (_, cluster, ts) = single();
    let entry = |k: &[u8]| cluster.entry("c", k, u32::MAX).unwrap();
    assert_eq!(entry(b"k"), PeerReply::Entry(None), "no drop, no entry");
    let drop = Mutation::Drop {
        collection: "c".into(),
        version: at(ts + 1),
    };
    cluster.apply(&[put("k", ts), drop], false).unwrap();
    cluster.apply(&[put("after", ts + 2)], false).unwrap();
    let deleted = PeerReply::Entry(Some(Versioned {
        value: None,
        version: at(ts + 1),
    }));
    assert_eq!(entry(b"k"), deleted);
    assert_eq!(entry(b"never"), deleted);
    assert_eq!(
        entry(b"after"),
        PeerReply::Entry(Some(Versioned {
            value: Some(Bytes::from_static(b"v")),
            version: at(ts + 2),
        }))
    );
}
