//! The public API's semantics, in persisted and memory mode.

use dhrt_storage::{Error, Options, Store, Version};

use crate::{both_modes, quiet_options};

#[test]
fn set_get_delete_overwrite() {
    let dir = tempfile::tempdir().unwrap();
    for store in both_modes(dir.path(), quiet_options()) {
        assert_eq!(store.get("c", b"k").unwrap(), None);
        store.set("c", b"k", b"one").unwrap();
        assert_eq!(store.get("c", b"k").unwrap().as_deref(), Some(&b"one"[..]));
        store.set("c", b"k", b"two").unwrap();
        assert_eq!(store.get("c", b"k").unwrap().as_deref(), Some(&b"two"[..]));
        assert!(store.delete("c", b"k").unwrap());
        assert!(!store.delete("c", b"k").unwrap());
        assert_eq!(store.get("c", b"k").unwrap(), None);
        let tomb = store.lookup("c", b"k").unwrap().unwrap();
        assert_eq!(tomb.value, None);
        // A long key (stored out of line in the index) and an empty value.
        let long = vec![b'x'; 1000];
        store.set("c", &long, b"").unwrap();
        assert_eq!(store.get("c", &long).unwrap().as_deref(), Some(&b""[..]));
        // Deleting in a collection that does not exist creates nothing.
        assert!(!store.delete("nothing", b"k").unwrap());
        assert!(
            store
                .stats()
                .collections
                .iter()
                .all(|c| c.name != "nothing")
        );
    }
}

#[test]
fn reopen_serves_the_same_data() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = Store::open(dir.path(), quiet_options()).unwrap();
        for i in 0..1000u32 {
            store
                .set("a", &i.to_be_bytes(), format!("v{i}").as_bytes())
                .unwrap();
        }
        for i in (0..1000u32).step_by(3) {
            store.delete("a", &i.to_be_bytes()).unwrap();
        }
        store.set("b", b"only", b"one").unwrap();
    }
    let store = Store::open(dir.path(), quiet_options()).unwrap();
    for i in 0..1000u32 {
        let got = store.get("a", &i.to_be_bytes()).unwrap();
        if i % 3 == 0 {
            assert_eq!(got, None);
        } else {
            assert_eq!(got.as_deref(), Some(format!("v{i}").as_bytes()));
        }
    }
    assert_eq!(
        store.get("b", b"only").unwrap().as_deref(),
        Some(&b"one"[..])
    );
    assert_eq!(store.collections(), vec!["a".to_string(), "b".to_string()]);
    assert!(store.has_keys("a") && store.has_keys("b"));
    assert!(!store.has_keys("c") && !store.has_keys("../a"));
    let a = store
        .stats()
        .collections
        .into_iter()
        .find(|c| c.name == "a")
        .unwrap();
    assert_eq!(a.keys, 666);
    assert_eq!(a.tombstones, 334);
    let report = store
        .recovery()
        .iter()
        .find(|r| r.collection == "a")
        .unwrap();
    assert_eq!(report.records, 1334);
    assert_eq!(report.truncated_bytes, 0);
}

#[test]
fn apply_keeps_the_greater_version_in_any_order() {
    let dir = tempfile::tempdir().unwrap();
    let writes = [
        (Some(&b"a"[..]), Version::new(10 << 16, 1)),
        (Some(&b"b"[..]), Version::new(10 << 16, 2)),
        (None, Version::new(11 << 16, 1)),
        (Some(&b"c"[..]), Version::new(9 << 16, 3)),
    ];
    // Every permutation, applied twice, ends in the same state.
    let orders = [[0, 1, 2, 3], [3, 2, 1, 0], [2, 0, 3, 1], [1, 3, 0, 2]];
    for (n, order) in orders.iter().enumerate() {
        let sub = dir.path().join(n.to_string());
        for store in both_modes(&sub, quiet_options()) {
            for &i in order.iter().chain(order.iter()) {
                let (v, version) = writes[i];
                store.apply("c", b"k", v, version).unwrap();
            }
            let r = store.lookup("c", b"k").unwrap().unwrap();
            assert_eq!(r.value, None, "order {order:?}");
            assert_eq!(r.version, Version::new(11 << 16, 1));
            assert!(
                !store
                    .apply("c", b"k", Some(b"old"), Version::new(11 << 16, 0))
                    .unwrap()
            );
            assert!(
                store
                    .apply("c", b"k", Some(b"new"), Version::new(11 << 16, 2))
                    .unwrap()
            );
            assert_eq!(store.get("c", b"k").unwrap().as_deref(), Some(&b"new"[..]));
        }
    }
}

#[test]
fn local_writes_win_over_observed_future_versions() {
    let store = Store::memory(quiet_options());
    let future = Version::new((dhrt_storage::wall_ms() + 3_600_000) << 16, 9);
    assert!(store.apply("c", b"k", Some(b"remote"), future).unwrap());
    let local = store.set_versioned("c", b"k", b"local").unwrap();
    assert!(local > future);
    assert_eq!(
        store.get("c", b"k").unwrap().as_deref(),
        Some(&b"local"[..])
    );
}

#[test]
fn drop_removes_older_keys_and_refuses_older_writes() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = Store::open(dir.path(), quiet_options()).unwrap();
        store
            .apply("c", b"old", Some(b"1"), Version::new(100, 1))
            .unwrap();
        store
            .apply("c", b"new", Some(b"2"), Version::new(300, 1))
            .unwrap();
        store
            .apply("c", b"gone", None, Version::new(50, 1))
            .unwrap();
        let removed = store
            .apply_drop("c", Version::new(200, 1))
            .unwrap()
            .unwrap();
        assert_eq!(removed.to_vec(), vec![b"old".to_vec()]);
        assert_eq!(store.get("c", b"old").unwrap(), None);
        assert_eq!(store.lookup("c", b"gone").unwrap(), None);
        assert_eq!(store.get("c", b"new").unwrap().as_deref(), Some(&b"2"[..]));
        // Older writes and older drops bounce off; a newer write lands.
        assert!(
            !store
                .apply("c", b"old", Some(b"stale"), Version::new(150, 1))
                .unwrap()
        );
        assert!(
            store
                .apply_drop("c", Version::new(190, 1))
                .unwrap()
                .is_none()
        );
        assert!(
            store
                .apply("c", b"later", Some(b"3"), Version::new(250, 1))
                .unwrap()
        );
    }
    let store = Store::open(dir.path(), quiet_options()).unwrap();
    assert_eq!(store.get("c", b"old").unwrap(), None);
    assert!(
        !store
            .apply("c", b"old", Some(b"stale"), Version::new(150, 1))
            .unwrap()
    );
    let keys: Vec<Vec<u8>> = store.scan("c").unwrap().map(|(k, _)| k).collect();
    assert_eq!(keys, vec![b"later".to_vec(), b"new".to_vec()]);
    // A local drop removes everything, and the collection leaves the listing.
    assert_eq!(
        store.drop_collection("c").unwrap().to_vec(),
        vec![b"later".to_vec(), b"new".to_vec()]
    );
    assert!(store.collections().is_empty());
    store.set("c", b"after", b"x").unwrap();
    assert_eq!(store.collections(), vec!["c".to_string()]);
}

#[test]
fn scan_is_ordered_and_resumable() {
    let dir = tempfile::tempdir().unwrap();
    for store in both_modes(
        dir.path(),
        Options {
            min_index_shards: 64,
            ..quiet_options()
        },
    ) {
        let mut keys: Vec<Vec<u8>> = (0..3000u32)
            .map(|i| format!("key{:05}", i * 7919 % 3000).into_bytes())
            .collect();
        for k in &keys {
            store.set("s", k, k).unwrap();
        }
        for k in keys.iter().step_by(10) {
            store.delete("s", k).unwrap();
        }
        let deleted: std::collections::HashSet<Vec<u8>> =
            keys.iter().step_by(10).cloned().collect();
        keys.retain(|k| !deleted.contains(k));
        keys.sort();
        let scanned: Vec<Vec<u8>> = store
            .scan("s")
            .unwrap()
            .map(|(k, v)| {
                assert_eq!(k, v.to_vec());
                k
            })
            .collect();
        assert_eq!(scanned, keys);
        // Page through with `after`.
        let mut paged = Vec::new();
        let mut after: Option<Vec<u8>> = None;
        loop {
            let page: Vec<Vec<u8>> = store
                .scan_after("s", after.as_deref())
                .unwrap()
                .take(77)
                .map(|(k, _)| k)
                .collect();
            if page.is_empty() {
                break;
            }
            after = page.last().cloned();
            paged.extend(page);
        }
        assert_eq!(paged, keys);
        // Records include the tombstones.
        assert_eq!(store.records("s", None).unwrap().count(), 3000);
        assert_eq!(store.scan("missing").unwrap().count(), 0);
    }
}

#[test]
fn bad_keys_and_values_are_refused() {
    let store = Store::memory(Options {
        max_value_len: 100,
        ..quiet_options()
    });
    assert!(matches!(
        store.set("c", b"", b"v"),
        Err(Error::InvalidKey { .. })
    ));
    let huge_key = vec![0u8; dhrt_storage::MAX_KEY_LEN + 1];
    assert!(matches!(
        store.set("c", &huge_key, b"v"),
        Err(Error::InvalidKey { .. })
    ));
    store.set("c", &huge_key[1..], b"v").unwrap();
    assert!(matches!(
        store.set("c", b"k", &[0; 101]),
        Err(Error::ValueTooLarge { len: 101, max: 100 })
    ));
    assert!(matches!(store.get("c", b""), Err(Error::InvalidKey { .. })));
    assert_eq!(store.get("c", b"k").unwrap(), None);
}

#[test]
fn a_directory_is_opened_by_one_store_at_a_time() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), quiet_options()).unwrap();
    assert!(matches!(
        Store::open(dir.path(), quiet_options()),
        Err(Error::Locked { .. })
    ));
    // `LOCK` deleted (a cleaner of old empty files): still one at a time.
    std::fs::remove_file(dir.path().join("LOCK")).unwrap();
    assert!(matches!(
        Store::open(dir.path(), quiet_options()),
        Err(Error::Locked { .. })
    ));
    drop(store);
    Store::open(dir.path(), quiet_options()).unwrap();
}

/// Tombstones and drops a cluster holds (not every member is known to
/// have them) outlive their grace period; once released, they are purged.
#[test]
fn tombstones_held_for_the_cluster_outlive_their_grace_period() {
    let dir = tempfile::tempdir().unwrap();
    let options = Options {
        tombstone_grace: std::time::Duration::ZERO,
        ..quiet_options()
    };
    let store = Store::open(dir.path(), options).unwrap();
    store.set("c", b"a", b"1").unwrap();
    store.set("c", b"b", b"2").unwrap();
    store.delete("c", b"a").unwrap();
    store.set("d", b"x", b"1").unwrap();
    store.drop_collection("d").unwrap();
    let tombstone = store
        .lookup("c", b"a")
        .unwrap()
        .expect("a tombstone")
        .version;
    std::thread::sleep(std::time::Duration::from_millis(5));

    // Held from just before the delete: kept, however often compacted.
    store.hold_tombstones_from(tombstone.physical_ms());
    for _ in 0..2 {
        let report = store.compact("c").unwrap();
        assert_eq!(report.purged_tombstones, 0, "{report:?}");
        assert_eq!(store.compact("d").unwrap().purged_tombstones, 0);
    }
    assert!(store.lookup("c", b"a").unwrap().is_some());
    assert!(store.digest("d").unwrap().dropped_at.is_some());

    // Held from after it: the grace period alone decides, and it is past.
    store.hold_tombstones_from(tombstone.physical_ms() + 1);
    assert_eq!(store.compact("c").unwrap().purged_tombstones, 1);
    assert_eq!(store.lookup("c", b"a").unwrap(), None);
    assert_eq!(store.get("c", b"b").unwrap().as_deref(), Some(&b"2"[..]));
}

#[test]
fn tombstones_are_purged_after_the_grace_period() {
    let dir = tempfile::tempdir().unwrap();
    let options = Options {
        tombstone_grace: std::time::Duration::ZERO,
        ..quiet_options()
    };
    let store = Store::open(dir.path(), options.clone()).unwrap();
    store.set("c", b"a", b"1").unwrap();
    store.set("c", b"b", b"2").unwrap();
    store.delete("c", b"a").unwrap();
    std::thread::sleep(std::time::Duration::from_millis(5));
    let report = store.compact("c").unwrap();
    assert_eq!(report.purged_tombstones, 1);
    assert_eq!(store.lookup("c", b"a").unwrap(), None);
    let stats = store
        .stats()
        .collections
        .into_iter()
        .find(|c| c.name == "c")
        .unwrap();
    assert_eq!(
        (stats.keys, stats.tombstones, stats.garbage_bytes),
        (1, 0, 0)
    );
    drop(store);
    let store = Store::open(dir.path(), options).unwrap();
    assert_eq!(store.lookup("c", b"a").unwrap(), None);
    assert_eq!(store.get("c", b"b").unwrap().as_deref(), Some(&b"2"[..]));
}

#[test]
fn background_thread_compacts_garbage() {
    let dir = tempfile::tempdir().unwrap();
    let options = Options {
        background_compaction: true,
        compaction_min_bytes: 64 * 1024,
        ..quiet_options()
    };
    let store = Store::open(dir.path(), options).unwrap();
    let value = vec![7u8; 1000];
    for round in 0..20 {
        for i in 0..100u32 {
            store
                .set("g", &i.to_be_bytes(), &value[..900 + round])
                .unwrap();
        }
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let bytes = store.stats().collections[0].bytes;
        if bytes < 200 * 1024 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "not compacted: {bytes} bytes"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert_eq!(
        store.get("g", &5u32.to_be_bytes()).unwrap().unwrap().len(),
        919
    );
}

#[test]
fn sync_always_writes_from_many_threads() {
    let dir = tempfile::tempdir().unwrap();
    let options = Options {
        sync: dhrt_storage::SyncMode::Always,
        ..quiet_options()
    };
    let store = Store::open(dir.path(), options.clone()).unwrap();
    std::thread::scope(|s| {
        for t in 0..4u32 {
            let store = &store;
            s.spawn(move || {
                for i in 0..50u32 {
                    store.set("c", format!("{t}-{i}").as_bytes(), b"v").unwrap();
                }
            });
        }
    });
    drop(store);
    let store = Store::open(dir.path(), options).unwrap();
    assert_eq!(store.scan("c").unwrap().count(), 200);
}

#[test]
fn hash_order_listing_pages_see_every_key_across_reshards() {
    let dir = tempfile::tempdir().unwrap();
    let options = Options {
        min_index_shards: 1,
        keys_per_shard: 1,
        ..quiet_options()
    };
    let store = Store::open(dir.path(), options).unwrap();
    let original: std::collections::BTreeSet<Vec<u8>> = (0..300u32)
        .map(|i| format!("orig{i}").into_bytes())
        .collect();
    for k in &original {
        store.set("l", k, b"v").unwrap();
    }
    store.delete("l", b"orig7").unwrap();
    let mut seen = Vec::new();
    let mut after: Option<Vec<u8>> = None;
    let mut page_no = 0u32;
    loop {
        let page: Vec<Vec<u8>> = store
            .list("l", after.as_deref(), true)
            .unwrap()
            .take(25)
            .map(|r| r.key)
            .collect();
        if page.is_empty() {
            break;
        }
        after = page.last().cloned();
        seen.extend(page);
        // Between the first pages the collection grows, so the index
        // reshards under the listing.
        if page_no < 4 {
            for j in 0..400u32 {
                store
                    .set("l", format!("new{page_no}-{j}").as_bytes(), b"v")
                    .unwrap();
            }
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
            while store.stats().collections[0].index_shards < 64 << page_no {
                assert!(std::time::Instant::now() < deadline, "no reshard");
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
        }
        page_no += 1;
    }
    let unique: std::collections::BTreeSet<Vec<u8>> = seen.iter().cloned().collect();
    assert_eq!(unique.len(), seen.len(), "a key was listed twice");
    for k in &original {
        assert_eq!(
            unique.contains(k),
            k != b"orig7",
            "{}",
            String::from_utf8_lossy(k)
        );
    }
    // A listing with tombstones includes the deleted key once.
    let with_tombstones: Vec<_> = store
        .list("l", None, false)
        .unwrap()
        .filter(|r| r.key == b"orig7")
        .collect();
    assert_eq!(with_tombstones.len(), 1);
    assert_eq!(with_tombstones[0].value, None);
    assert!(store.stats().collections[0].index_shards > 1);
    assert_eq!(store.list("missing", None, true).unwrap().count(), 0);
}

#[test]
fn set_many_writes_all_or_nothing() {
    let dir = tempfile::tempdir().unwrap();
    for store in both_modes(
        dir.path(),
        Options {
            max_value_len: 10,
            ..quiet_options()
        },
    ) {
        store.set("m", b"a", b"old").unwrap();
        let entries: Vec<(&[u8], &[u8])> = vec![(b"a", b"1"), (b"b", b"2"), (b"c", b"3")];
        store.set_many("m", &entries).unwrap();
        for (k, v) in &entries {
            assert_eq!(store.get("m", k).unwrap().as_deref(), Some(*v));
        }
        assert_eq!(
            store
                .stats()
                .collections
                .iter()
                .find(|c| c.name == "m")
                .unwrap()
                .keys,
            3
        );
        // One bad entry: nothing is written.
        let bad: Vec<(&[u8], &[u8])> = vec![(b"d", b"4"), (b"", b"5")];
        assert!(matches!(
            store.set_many("m", &bad),
            Err(Error::InvalidKey { .. })
        ));
        let big: Vec<(&[u8], &[u8])> = vec![(b"d", b"4"), (b"e", &[0; 11])];
        assert!(matches!(
            store.set_many("m", &big),
            Err(Error::ValueTooLarge { .. })
        ));
        assert_eq!(store.get("m", b"d").unwrap(), None);
        assert!(matches!(
            store.set_many("../m", &entries),
            Err(Error::InvalidCollection { .. })
        ));
    }
    // And it survives a reopen like any write.
    let store = Store::open(dir.path(), quiet_options()).unwrap();
    assert_eq!(store.get("m", b"c").unwrap().as_deref(), Some(&b"3"[..]));
}
