//! Compaction racing concurrent writers and readers loses nothing and never
//! shows a wrong value.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};

use dhrt_storage::{Options, Store};

use crate::quiet_options;

fn value_for(key: &[u8], round: u32) -> Vec<u8> {
    let mut v = key.to_vec();
    v.extend_from_slice(b"=");
    v.extend_from_slice(round.to_string().as_bytes());
    v.resize(v.len() + (round % 50) as usize, b'.');
    v
}

fn run(store: &Store) -> Vec<HashMap<Vec<u8>, Option<Vec<u8>>>> {
    let stop = AtomicBool::new(false);
    let mut compactions = 0;
    let finals = std::thread::scope(|s| {
        let writers: Vec<_> = (0..2u32)
            .map(|t| {
                let store = store.clone();
                s.spawn(move || {
                    let mut last = HashMap::new();
                    for round in 0..4000u32 {
                        let key = format!("t{t}-k{}", round % 97).into_bytes();
                        if round % 7 == 3 {
                            store.delete("c", &key).unwrap();
                            last.insert(key, None);
                        } else {
                            let value = value_for(&key, round);
                            store.set("c", &key, &value).unwrap();
                            last.insert(key, Some(value));
                        }
                    }
                    last
                })
            })
            .collect();
        let reader = s.spawn(|| {
            let mut reads = 0u64;
            while !stop.load(Ordering::Relaxed) {
                for i in 0..97 {
                    let key = format!("t0-k{i}").into_bytes();
                    if let Some(v) = store.get("c", &key).unwrap() {
                        assert!(
                            v.starts_with(&key) && v[key.len()] == b'=',
                            "wrong value {v:?}"
                        );
                        reads += 1;
                    }
                }
            }
            reads
        });
        while !writers.iter().all(|w| w.is_finished()) {
            store.compact("c").unwrap();
            compactions += 1;
        }
        let finals = writers.into_iter().map(|w| w.join().unwrap()).collect();
        stop.store(true, Ordering::Relaxed);
        assert!(reader.join().unwrap() > 0);
        finals
    });
    assert!(compactions > 1, "compaction never overlapped the writers");
    finals
}

fn check(store: &Store, finals: &[HashMap<Vec<u8>, Option<Vec<u8>>>]) {
    for last in finals {
        for (key, value) in last {
            assert_eq!(store.get("c", key).unwrap().map(|b| b.to_vec()), *value);
        }
    }
    let live = finals
        .iter()
        .flat_map(|m| m.values())
        .filter(|v| v.is_some())
        .count();
    assert_eq!(store.scan("c").unwrap().count(), live);
    assert_eq!(store.stats().collections[0].keys, live as u64);
}

#[test]
fn compaction_racing_writers_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let options = Options {
        min_index_shards: 8,
        ..quiet_options()
    };
    let store = Store::open(dir.path(), options.clone()).unwrap();
    let finals = run(&store);
    check(&store, &finals);
    store.compact("c").unwrap();
    check(&store, &finals);
    let garbage = store.stats().collections[0].garbage_bytes;
    assert_eq!(garbage, 0);
    drop(store);
    let store = Store::open(dir.path(), options).unwrap();
    check(&store, &finals);
}

#[test]
fn compaction_in_memory_mode_too() {
    let store = Store::memory(Options {
        min_index_shards: 8,
        ..quiet_options()
    });
    let finals = run(&store);
    check(&store, &finals);
    let before = store.stats().collections[0].clone();
    store.compact("c").unwrap();
    let after = store.stats().collections[0].clone();
    assert_eq!(after.garbage_bytes, 0);
    assert_eq!(after.bytes, before.bytes - before.garbage_bytes);
    check(&store, &finals);
}

/// Waits up to 10 s for the background thread to reshard the store's only
/// collection to at least `shards` shards; `seen` goes in the failure.
fn wait_for_shards(store: &Store, shards: usize, seen: &str) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while store.stats().collections[0].index_shards < shards {
        assert!(
            std::time::Instant::now() < deadline,
            "never resharded: {seen}"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

#[test]
fn the_index_reshards_under_load_without_losing_a_key() {
    let dir = tempfile::tempdir().unwrap();
    let options = Options {
        min_index_shards: 1,
        keys_per_shard: 2,
        ..quiet_options()
    };
    let store = Store::open(dir.path(), options.clone()).unwrap();
    let shards_seen = std::thread::scope(|s| {
        let writer = s.spawn(|| {
            for i in 0..30_000u32 {
                store.set("r", &i.to_be_bytes(), &i.to_le_bytes()).unwrap();
                if i % 3 == 0 {
                    // Early keys must stay readable while the index is rebuilt.
                    let j = i / 2;
                    assert_eq!(
                        store.get("r", &j.to_be_bytes()).unwrap().as_deref(),
                        Some(&j.to_le_bytes()[..])
                    );
                }
            }
        });
        let mut seen = std::collections::BTreeSet::new();
        while !writer.is_finished() {
            if let Some(c) = store.stats().collections.first() {
                seen.insert(c.index_shards);
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        writer.join().unwrap();
        seen
    });
    wait_for_shards(&store, 8192, &format!("{shards_seen:?}"));
    for i in 0..30_000u32 {
        assert_eq!(
            store.get("r", &i.to_be_bytes()).unwrap().as_deref(),
            Some(&i.to_le_bytes()[..])
        );
    }
    assert_eq!(store.scan("r").unwrap().count(), 30_000);
    assert_eq!(store.stats().collections[0].keys, 30_000);
    drop(store);
    // Recovery sizes the index from the log straight away.
    let store = Store::open(dir.path(), options).unwrap();
    assert!(store.stats().collections[0].index_shards >= 16384);
    assert_eq!(store.scan("r").unwrap().count(), 30_000);
}

/// A reshard copies the index without reading the log and takes the live
/// index's digest at the swap: the digest after reshards that raced sets,
/// overwrites and deletes is the one recovery computes from the log.
#[test]
fn reshards_racing_writers_keep_the_digest_recovery_computes() {
    let dir = tempfile::tempdir().unwrap();
    let options = Options {
        min_index_shards: 1,
        keys_per_shard: 2,
        ..quiet_options()
    };
    let store = Store::open(dir.path(), options.clone()).unwrap();
    for i in 0..20_000u32 {
        store.set("d", &i.to_be_bytes(), &i.to_le_bytes()).unwrap();
        if i % 5 == 0 {
            store.delete("d", &(i / 3).to_be_bytes()).unwrap();
        }
        if i % 7 == 0 {
            store.set("d", &(i / 4).to_be_bytes(), b"again").unwrap();
        }
    }
    wait_for_shards(&store, 8192, "");
    let kept = store.digest("d").unwrap();
    drop(store);
    let store = Store::open(dir.path(), options).unwrap();
    assert_eq!(store.digest("d").unwrap(), kept);
}

#[test]
fn a_scan_survives_a_compaction_that_empties_shards() {
    let options = Options {
        min_index_shards: 64,
        keys_per_shard: 1024,
        tombstone_grace: std::time::Duration::ZERO,
        ..quiet_options()
    };
    let dir = tempfile::tempdir().unwrap();
    for store in [
        Store::memory(options.clone()),
        Store::open(dir.path(), options).unwrap(),
    ] {
        for i in 0..200u32 {
            store.set("s", format!("k{i:03}").as_bytes(), b"v").unwrap();
        }
        let mut scan = store.scan("s").unwrap();
        assert_eq!(scan.next().unwrap().0, b"k000");
        // Delete all but a few keys and purge the tombstones: most shards of
        // the new index are empty.
        for i in 1..200u32 {
            if i % 50 != 0 {
                store.delete("s", format!("k{i:03}").as_bytes()).unwrap();
            }
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
        store.compact("s").unwrap();
        let rest: Vec<Vec<u8>> = scan.map(|(k, _)| k).collect();
        assert_eq!(
            rest,
            vec![b"k050".to_vec(), b"k100".to_vec(), b"k150".to_vec()]
        );
    }
}

/// Writers race compactions and index rebuilds of a large collection: each
/// rebuild catches up with their records outside the writer lock, and no
/// hold of the lock replays more than `LOCKED_CATCH_UP_BYTES` of them (plus
/// the record that crosses it). Counted in records, not timed.
#[test]
fn writers_racing_rebuilds_wait_for_a_bounded_replay_only() {
    // Every record here: a 40-byte header, an 8-byte key, a 16-byte value.
    const RECORD: u64 = 40 + 8 + 16;
    const BOUND: u64 = dhrt_storage::LOCKED_CATCH_UP_BYTES / RECORD + 1;
    let dir = tempfile::tempdir().unwrap();
    let options = Options {
        min_index_shards: 1,
        keys_per_shard: 8,
        // Steps that stop gaining on the writers would grow: not here,
        // where the bound is the point.
        rebuild_step_max: dhrt_storage::LOCKED_CATCH_UP_BYTES,
        ..quiet_options()
    };
    let store = Store::open(dir.path(), options).unwrap();
    let value = [7u8; 16];
    // Loaded while the index reshards again and again under the load.
    for i in 0..200_000u64 {
        store.set("c", &i.to_be_bytes(), &value).unwrap();
    }
    let stop = AtomicBool::new(false);
    let (caught_up, compactions) = std::thread::scope(|s| {
        for w in 0..2u64 {
            let (store, stop) = (&store, &stop);
            s.spawn(move || {
                let mut i = w;
                while !stop.load(Ordering::Relaxed) {
                    // Overwrites (garbage to compact) and new keys (more
                    // reshards).
                    let key = if i % 4 == 0 {
                        1_000_000 + i
                    } else {
                        i % 200_000
                    };
                    store.set("c", &key.to_be_bytes(), &value).unwrap();
                    i += 2;
                }
            });
        }
        let (mut caught_up, mut compactions) = (0, 0);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
        // Until the rebuilds have caught up with many times what one hold
        // of the lock may replay.
        while caught_up < 8 * BOUND && std::time::Instant::now() < deadline {
            let report = store.compact("c").unwrap();
            assert!(
                report.locked_records <= BOUND,
                "a compaction replayed {} records under the writer lock (bound {BOUND}); {report:?}",
                report.locked_records
            );
            caught_up += report.caught_up;
            compactions += 1;
        }
        stop.store(true, Ordering::Relaxed);
        (caught_up, compactions)
    });
    assert!(
        caught_up >= 8 * BOUND,
        "{compactions} compactions caught up only {caught_up} racing records"
    );
    let stats = &store.stats().collections[0];
    assert!(stats.index_shards >= 16_384, "resharded: {stats:?}");
    assert!(
        stats.rebuild_locked_records_max <= BOUND,
        "reshards and compactions held the lock for at most {BOUND} records: {stats:?}"
    );
    for i in 0..200_000u64 {
        assert!(store.get("c", &i.to_be_bytes()).unwrap().is_some(), "{i}");
    }
}

/// A collection held in one shard of 60,000 keys (as keys crafted to share
/// a hash prefix would make one): the live index moves it to a skiplist,
/// compaction and recovery (on two threads, one of which gets no shard)
/// build it without copying the shard for every key, and every key keeps
/// its newest value through them.
#[test]
fn one_oversized_shard_survives_writes_compaction_and_recovery() {
    const KEYS: u32 = 60_000;
    let options = Options {
        min_index_shards: 1,
        keys_per_shard: 1 << 20,
        ..quiet_options()
    };
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), options.clone()).unwrap();
    for i in 0..KEYS {
        store
            .set("one", format!("k{i:06}").as_bytes(), &i.to_le_bytes())
            .unwrap();
    }
    for i in (0..KEYS).step_by(3) {
        store
            .set("one", format!("k{i:06}").as_bytes(), &(i + 1).to_le_bytes())
            .unwrap();
    }
    for i in (1..KEYS).step_by(7) {
        store.delete("one", format!("k{i:06}").as_bytes()).unwrap();
    }
    let expect = |i: u32| -> Option<Vec<u8>> {
        if i % 7 == 1 {
            None
        } else if i.is_multiple_of(3) {
            Some((i + 1).to_le_bytes().to_vec())
        } else {
            Some(i.to_le_bytes().to_vec())
        }
    };
    let check = |store: &Store, when: &str| {
        assert_eq!(store.stats().collections[0].index_shards, 1, "{when}");
        for i in 0..KEYS {
            let got = store.get("one", format!("k{i:06}").as_bytes()).unwrap();
            assert_eq!(got.as_deref(), expect(i).as_deref(), "k{i:06} {when}");
        }
        let live = (0..KEYS).filter(|&i| expect(i).is_some()).count();
        assert_eq!(store.scan("one").unwrap().count(), live, "{when}");
    };
    check(&store, "after the writes");
    drop(store);
    // Recovery replays 60,000 + 20,000 + 8,572 records into one shard.
    let store = Store::open(dir.path(), options.clone()).unwrap();
    check(&store, "after a reopen");
    store.compact("one").unwrap();
    check(&store, "after a compaction");
    drop(store);
    let store = Store::open(dir.path(), options).unwrap();
    check(&store, "after a compaction and a reopen");
}
