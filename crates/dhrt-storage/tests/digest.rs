//! Anti-entropy digests: equal for equal contents whatever the order of
//! arrival, kept across reopen, compaction and resharding, and bucket
//! listings that partition a collection.

use std::collections::BTreeMap;

use dhrt_storage::{DIGEST_BUCKETS, Digest, Store, Version, digest_bucket};
use proptest::prelude::*;

use crate::quiet_options;

type Write = (u8, Option<u8>, u64, u64);

fn key(k: u8) -> Vec<u8> {
    format!("key-{k}").into_bytes()
}

fn apply_all(store: &Store, writes: &[Write]) {
    for &(k, v, ts, node) in writes {
        let value = v.map(|v| vec![v; 1 + v as usize % 7]);
        store
            .apply("c", &key(k), value.as_deref(), Version::new(ts, node))
            .unwrap();
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Two stores given the same replicated writes in different orders end
    /// with the same digest; a store missing one effective write differs in
    /// exactly that key's bucket.
    #[test]
    fn digest_is_order_independent(
        writes in prop::collection::vec((0u8..40, prop::option::of(any::<u8>()), 1u64..50, 1u64..4), 1..120),
        seed in any::<u64>(),
    ) {
        // A version names one write: keep the first write of each.
        let mut seen = std::collections::HashSet::new();
        let writes: Vec<Write> = writes.into_iter().filter(|w| seen.insert((w.2, w.3))).collect();
        let a = Store::memory(quiet_options());
        let b = Store::memory(quiet_options());
        apply_all(&a, &writes);
        let mut shuffled = writes.clone();
        // A cheap seeded shuffle.
        let mut x = seed | 1;
        for i in (1..shuffled.len()).rev() {
            x ^= x << 13; x ^= x >> 7; x ^= x << 17;
            shuffled.swap(i, (x % (i as u64 + 1)) as usize);
        }
        apply_all(&b, &shuffled);
        prop_assert_eq!(a.digest("c").unwrap(), b.digest("c").unwrap());

        // The winner of the last written key, withheld from a third store.
        let (k, ..) = *writes.last().unwrap();
        let winner = writes.iter().filter(|w| w.0 == k).max_by_key(|w| (w.2, w.3)).copied().unwrap();
        let c = Store::memory(quiet_options());
        apply_all(&c, &writes.iter().copied().filter(|w| *w != winner).collect::<Vec<_>>());
        let differing = a.digest("c").unwrap().differing(&c.digest("c").unwrap());
        prop_assert_eq!(differing, vec![digest_bucket(&key(k))]);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// `apply_many` in batches ends where `apply` one by one does: same
    /// entries, same versions, same digest, same count of writes that took
    /// effect; duplicates of a key inside one batch included.
    #[test]
    fn apply_many_equals_apply_one_by_one(
        writes in prop::collection::vec((0u8..30, prop::option::of(any::<u8>()), 1u64..60, 1u64..4), 1..150),
        batch in 1usize..40,
    ) {
        let mut seen = std::collections::HashSet::new();
        let writes: Vec<Write> = writes.into_iter().filter(|w| seen.insert((w.2, w.3))).collect();
        let one = Store::memory(quiet_options());
        let mut took_one = 0;
        for &(k, v, ts, node) in &writes {
            let value = v.map(|v| vec![v; 1 + v as usize % 7]);
            took_one += usize::from(one.apply("c", &key(k), value.as_deref(), Version::new(ts, node)).unwrap());
        }
        let many = Store::memory(quiet_options());
        let mut took_many = 0;
        for chunk in writes.chunks(batch) {
            let owned: Vec<(Vec<u8>, Option<Vec<u8>>, Version)> = chunk
                .iter()
                .map(|&(k, v, ts, node)| (key(k), v.map(|v| vec![v; 1 + v as usize % 7]), Version::new(ts, node)))
                .collect();
            let entries: Vec<dhrt_storage::Replicated<'_>> =
                owned.iter().map(|(k, v, ver)| (&k[..], v.as_deref(), *ver)).collect();
            took_many += many.apply_many("c", &entries).unwrap();
        }
        prop_assert_eq!(one.digest("c").unwrap(), many.digest("c").unwrap());
        let list = |s: &Store| -> Vec<_> {
            s.list("c", None, false).unwrap().map(|r| (r.key, r.value, r.version)).collect()
        };
        prop_assert_eq!(list(&one), list(&many));
        prop_assert_eq!(took_one, took_many);
    }
}

#[test]
fn empty_and_missing_collections_have_the_empty_digest() {
    let store = Store::memory(quiet_options());
    assert_eq!(store.digest("nothing").unwrap(), Digest::empty());
    store.set("c", b"k", b"v").unwrap();
    assert_ne!(store.digest("c").unwrap(), Digest::empty());
    // A local delete leaves a tombstone, which is part of the digest.
    let tombstoned = {
        store.delete("c", b"k").unwrap();
        store.digest("c").unwrap()
    };
    assert_ne!(tombstoned, Digest::empty());
    assert!(store.digest("../x").is_err());
}

#[test]
fn digest_survives_reopen_compaction_and_resharding() {
    let dir = tempfile::tempdir().unwrap();
    let before = {
        let store = Store::open(dir.path(), quiet_options()).unwrap();
        for i in 0..3000u32 {
            store.set("c", &i.to_le_bytes(), &[i as u8; 10]).unwrap();
        }
        for i in (0..3000u32).step_by(3) {
            store.delete("c", &i.to_le_bytes()).unwrap();
        }
        for i in (0..3000u32).step_by(5) {
            store.set("c", &i.to_le_bytes(), b"again").unwrap();
        }
        let d = store.digest("c").unwrap();
        store.compact("c").unwrap();
        assert_eq!(
            store.digest("c").unwrap(),
            d,
            "compaction (no purge) keeps the digest"
        );
        d
    };
    let store = Store::open(dir.path(), quiet_options()).unwrap();
    assert_eq!(
        store.digest("c").unwrap(),
        before,
        "reopen rebuilds the same digest"
    );
    // quiet_options keep 4 keys per shard: the reopened index has more
    // shards than the first one started with.
    assert!(store.stats().collections[0].index_shards > 1);
}

#[test]
fn drops_are_part_of_the_digest() {
    let a = Store::memory(quiet_options());
    let b = Store::memory(quiet_options());
    for s in [&a, &b] {
        s.apply("c", b"k", Some(b"v"), Version::new(10, 1)).unwrap();
    }
    a.apply_drop("c", Version::new(20, 1)).unwrap();
    let (da, db) = (a.digest("c").unwrap(), b.digest("c").unwrap());
    assert_eq!(da.dropped_at, Some(Version::new(20, 1)));
    assert_eq!(da.differing(&db), vec![digest_bucket(b"k")]);
    b.apply_drop("c", Version::new(20, 1)).unwrap();
    assert_eq!(a.digest("c").unwrap(), b.digest("c").unwrap());
}

#[test]
fn buckets_partition_the_collection() {
    let store = Store::memory(quiet_options());
    let mut model = BTreeMap::new();
    for i in 0..5000u32 {
        let k = format!("k{i}").into_bytes();
        if i % 4 == 0 {
            store.apply("c", &k, None, Version::new(5, 1)).unwrap();
            model.insert(k, None);
        } else {
            store.set("c", &k, &i.to_le_bytes()).unwrap();
            model.insert(k, Some(i.to_le_bytes().to_vec()));
        }
    }
    let mut seen = BTreeMap::new();
    for b in 0..DIGEST_BUCKETS {
        for r in store.bucket("c", b).unwrap() {
            assert_eq!(digest_bucket(&r.key), b);
            assert!(seen.insert(r.key, r.value.map(|v| v.to_vec())).is_none());
        }
    }
    assert_eq!(seen, model);
    assert!(store.bucket("c", DIGEST_BUCKETS).is_err());
    assert_eq!(store.bucket("none", 3).unwrap().count(), 0);
}

#[test]
fn delete_versioned_always_leaves_a_tombstone() {
    let store = Store::memory(quiet_options());
    let (v1, was_live) = store.delete_versioned("c", b"never-set").unwrap();
    assert!(!was_live);
    let r = store.lookup("c", b"never-set").unwrap().unwrap();
    assert_eq!((r.value, r.version), (None, v1));
    store.set("c", b"k", b"v").unwrap();
    let (v2, was_live) = store.delete_versioned("c", b"k").unwrap();
    assert!(was_live && v2 > v1);
    // A replicated write older than the tombstone does not resurrect it.
    assert!(
        !store
            .apply("c", b"k", Some(b"old"), Version::new(v2.ts - 1, 9))
            .unwrap()
    );
    assert_eq!(store.get("c", b"k").unwrap(), None);
}

#[test]
fn newest_first_walks_every_record_once_most_recent_first() {
    let store = Store::memory(quiet_options());
    for i in 0..1000 {
        store.set("c", format!("k{i}").as_bytes(), b"v").unwrap();
    }
    for i in 0..100 {
        store.set("c", format!("k{i}").as_bytes(), b"w").unwrap();
    }
    store.delete("c", b"k500").unwrap();
    let mut records = store.newest_first("c").unwrap();
    assert_eq!(records.remaining(), 1000);
    let first = records.next().unwrap();
    assert_eq!((first.key.as_slice(), &first.value), (&b"k500"[..], &None));
    let overwritten: Vec<_> = records.by_ref().take(100).collect();
    assert_eq!(overwritten[0].key, b"k99");
    assert_eq!(overwritten[99].key, b"k0");
    assert!(
        overwritten
            .iter()
            .all(|r| r.value.as_deref() == Some(&b"w"[..]))
    );
    // A compaction (and more writes) meanwhile do not disturb the walk.
    store.compact("c").unwrap();
    store.set("c", b"later", b"x").unwrap();
    let rest: Vec<_> = records.collect();
    assert_eq!(rest.len(), 899);
    assert!(rest.iter().all(|r| r.value.as_deref() == Some(&b"v"[..])));
    let mut all = vec![first];
    all.extend(overwritten);
    all.extend(rest);
    assert!(all.windows(2).all(|w| w[0].version > w[1].version));
    let keys: std::collections::HashSet<_> = all.iter().map(|r| r.key.clone()).collect();
    assert_eq!(keys.len(), 1000);
    assert_eq!(store.newest_first("missing").unwrap().count(), 0);
}

/// The records of `c` with their values.
fn contents(store: &Store) -> Vec<(Vec<u8>, Option<Vec<u8>>, Version)> {
    store
        .records("c", None)
        .unwrap()
        .map(|r| (r.key, r.value.map(|v| v.to_vec()), r.version))
        .collect()
}

#[test]
fn equal_versions_with_different_bytes_differ_and_converge_either_way() {
    let v = Version::new(1000 << 16, 3);
    let a = Store::memory(quiet_options());
    let b = Store::memory(quiet_options());
    a.apply("c", b"k", Some(b"one"), v).unwrap();
    b.apply("c", b"k", Some(b"two"), v).unwrap();
    // The digest covers the value: the replicas see that they differ.
    assert_eq!(
        a.digest("c").unwrap().differing(&b.digest("c").unwrap()),
        vec![digest_bucket(b"k")]
    );
    // Each applies the other's record; exactly one of them changes, and
    // both end with the same record whichever went first.
    let a_took = a.apply("c", b"k", Some(b"two"), v).unwrap();
    let b_took = b.apply("c", b"k", Some(b"one"), v).unwrap();
    assert!(a_took != b_took, "exactly one replica switches");
    assert_eq!(contents(&a), contents(&b));
    assert_eq!(a.digest("c").unwrap(), b.digest("c").unwrap());
    // The same record again is no change.
    let winner = a.get("c", b"k").unwrap().unwrap();
    assert!(!a.apply("c", b"k", Some(&winner), v).unwrap());
    // A tombstone under the same version takes part in the tie-break too,
    // and apply_many agrees with apply.
    let c = Store::memory(quiet_options());
    let d = Store::memory(quiet_options());
    c.apply("c", b"k", None, v).unwrap();
    c.apply("c", b"k", Some(b"one"), v).unwrap();
    c.apply("c", b"k", Some(b"two"), v).unwrap();
    d.apply_many(
        "c",
        &[
            (&b"k"[..], Some(&b"two"[..]), v),
            (&b"k"[..], Some(&b"one"[..]), v),
            (&b"k"[..], None, v),
        ],
    )
    .unwrap();
    assert_eq!(contents(&c), contents(&d));
    assert_eq!(c.digest("c").unwrap(), d.digest("c").unwrap());
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Replicas given the same writes in different orders, where one
    /// version may carry different values, end with the same records and
    /// digests, also after a reopen (the replay breaks ties the same way).
    #[test]
    fn equal_version_ties_converge_in_any_order(
        writes in prop::collection::vec((0u8..8, prop::option::of(any::<u8>()), 1u64..6, 1u64..3), 1..80),
        seed in any::<u64>(),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let a = Store::open(dir.path(), quiet_options()).unwrap();
        let b = Store::memory(quiet_options());
        apply_all(&a, &writes);
        let mut shuffled = writes.clone();
        let mut x = seed | 1;
        for i in (1..shuffled.len()).rev() {
            x ^= x << 13; x ^= x >> 7; x ^= x << 17;
            shuffled.swap(i, (x % (i as u64 + 1)) as usize);
        }
        apply_all(&b, &shuffled);
        prop_assert_eq!(contents(&a), contents(&b));
        prop_assert_eq!(a.digest("c").unwrap(), b.digest("c").unwrap());
        drop(a);
        let a = Store::open(dir.path(), quiet_options()).unwrap();
        prop_assert_eq!(contents(&a), contents(&b));
        prop_assert_eq!(a.digest("c").unwrap(), b.digest("c").unwrap());
    }
}

/// Keys, tombstones, garbage bytes and log bytes of `c`.
fn counts(store: &Store) -> (u64, u64, u64, u64) {
    let c = store
        .stats()
        .collections
        .into_iter()
        .find(|c| c.name == "c")
        .unwrap();
    (c.keys, c.tombstones, c.garbage_bytes, c.bytes)
}

/// Reopens the store in `dir` and checks that the replay rebuilt what the
/// live store kept: the same records, counts, garbage and digest.
fn reopen_rebuilds(dir: &std::path::Path, store: Store, options: dhrt_storage::Options) {
    let before = (contents(&store), counts(&store), store.digest("c").unwrap());
    drop(store);
    let store = Store::open(dir, options).unwrap();
    let after = (contents(&store), counts(&store), store.digest("c").unwrap());
    assert_eq!(before.1, after.1, "keys, tombstones, garbage, bytes");
    assert_eq!(before.2, after.2, "digest");
    assert!(before.0 == after.0, "records differ after the reopen");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Replicated writes of old and new versions, ties, deletes and a drop:
    /// a reopen rebuilds what the live store kept, counts and garbage
    /// included, in arrays and in shards past their array size.
    #[test]
    fn a_reopen_rebuilds_the_counts_garbage_and_digest_the_store_kept(
        writes in prop::collection::vec((0u8..24, prop::option::of(any::<u8>()), 1u64..8, 1u64..3), 1..120),
        drop_at in prop::option::of((0usize..120, 1u64..8)),
        array_max in prop_oneof![Just(2usize), Just(256)],
    ) {
        let dir = tempfile::tempdir().unwrap();
        let options = dhrt_storage::Options { shard_array_max: array_max, ..quiet_options() };
        let store = Store::open(dir.path(), options.clone()).unwrap();
        for (i, w) in writes.iter().enumerate() {
            if let Some((at, ts)) = drop_at && at == i {
                store.apply_drop("c", Version::new(ts, 9)).unwrap();
            }
            apply_all(&store, std::slice::from_ref(w));
        }
        reopen_rebuilds(dir.path(), store, options);
    }
}

/// The same on a log large enough for the replay to run on several
/// threads, with long keys (kept on the heap) beside short ones.
#[test]
fn a_reopen_of_a_large_log_rebuilds_what_the_store_kept() {
    let dir = tempfile::tempdir().unwrap();
    let options = quiet_options();
    let store = Store::open(dir.path(), options.clone()).unwrap();
    let key = |i: u64| {
        if i.is_multiple_of(3) {
            format!("a key long enough to live on the heap {i}").into_bytes()
        } else {
            format!("k{i}").into_bytes()
        }
    };
    let mut x = 0x9E37_79B9_7F4A_7C15_u64;
    for i in 0..120_000u64 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let k = key(x % 40_000);
        match i % 10 {
            // Deletes, and replicated writes older and newer than the
            // local ones.
            0 => {
                store.delete("c", &k).unwrap();
            }
            1 => {
                store
                    .apply("c", &k, Some(b"old"), Version::new(5, 2))
                    .unwrap();
            }
            2 => {
                store
                    .apply(
                        "c",
                        &k,
                        Some(&i.to_le_bytes()),
                        Version::new(u64::MAX >> 20, 2),
                    )
                    .unwrap();
            }
            _ => store.set("c", &k, &i.to_le_bytes()).unwrap(),
        }
    }
    let (keys, tombstones, garbage, _) = counts(&store);
    assert!(keys > 20_000 && tombstones > 1_000 && garbage > 0);
    reopen_rebuilds(dir.path(), store, options);
}
