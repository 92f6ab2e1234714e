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
        index_shards: 8,
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
        index_shards: 8,
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
