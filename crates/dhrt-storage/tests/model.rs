//! A property test of the store against a `BTreeMap` model: sets, deletes,
//! replicated applies and drops, compactions, clean reopens, crashes that
//! cut every file back to its last synced length and append garbage, and
//! crashes that leave the unsynced tail with a zeroed page at its start.

use std::collections::BTreeMap;
use std::path::Path;

use dhrt_storage::{Options, Store, Version};
use proptest::prelude::*;

use crate::quiet_options;

const COLLECTIONS: [&str; 2] = ["alpha", "beta"];

#[derive(Clone, Debug)]
enum Op {
    Set(usize, u8, Vec<u8>),
    Delete(usize, u8),
    Apply(usize, u8, Option<Vec<u8>>, i64, u8),
    Drop(usize, i64),
    Compact(usize),
    Sync,
    Reopen,
    Crash(Vec<u8>),
    /// A crash whose unsynced tail was written back except its first page
    /// (out-of-order writeback): valid records follow the hole.
    Hole,
}

fn op() -> impl Strategy<Value = Op> {
    let coll = 0..COLLECTIONS.len();
    let key = 0u8..12;
    let value = prop::collection::vec(any::<u8>(), 0..40);
    prop_oneof![
        6 => (coll.clone(), key.clone(), value.clone()).prop_map(|(c, k, v)| Op::Set(c, k, v)),
        2 => (coll.clone(), key.clone()).prop_map(|(c, k)| Op::Delete(c, k)),
        4 => (coll.clone(), key, prop::option::of(value), -3000i64..3000, 0u8..3)
            .prop_map(|(c, k, v, t, n)| Op::Apply(c, k, v, t, n)),
        1 => (coll.clone(), -3000i64..3000).prop_map(|(c, t)| Op::Drop(c, t)),
        1 => coll.prop_map(Op::Compact),
        2 => Just(Op::Sync),
        1 => Just(Op::Reopen),
        2 => prop::collection::vec(any::<u8>(), 0..80).prop_map(Op::Crash),
        1 => Just(Op::Hole),
    ]
}

/// One collection as the model sees it.
type Entry = (Option<Vec<u8>>, Version);

#[derive(Clone, Debug, Default, PartialEq)]
struct Model {
    entries: BTreeMap<Vec<u8>, Entry>,
    dropped_at: Option<Version>,
}

impl Model {
    fn apply(&mut self, key: &[u8], value: Option<Vec<u8>>, version: Version) -> bool {
        if self.dropped_at.is_some_and(|d| version <= d) {
            return false;
        }
        if self.entries.get(key).is_some_and(|(_, v)| *v >= version) {
            return false;
        }
        self.entries.insert(key.to_vec(), (value, version));
        true
    }

    fn drop_older(&mut self, version: Version) -> Option<Vec<Vec<u8>>> {
        if self.dropped_at.is_some_and(|d| d >= version) {
            return None;
        }
        self.dropped_at = Some(version);
        let mut removed = Vec::new();
        self.entries.retain(|k, (v, ver)| {
            let keep = *ver >= version;
            if !keep && v.is_some() {
                removed.push(k.clone());
            }
            keep
        });
        Some(removed)
    }
}

fn key(k: u8) -> Vec<u8> {
    format!("key-{k}").into_bytes()
}

fn check(store: &Store, models: &[Model], context: &str) {
    for (c, model) in models.iter().enumerate() {
        let records: Vec<(Vec<u8>, Entry)> = store
            .records(COLLECTIONS[c], None)
            .unwrap()
            .map(|r| (r.key, (r.value.map(|b| b.to_vec()), r.version)))
            .collect();
        let expected: Vec<_> = model.entries.clone().into_iter().collect();
        assert_eq!(
            records, expected,
            "{context}: collection {}",
            COLLECTIONS[c]
        );
    }
}

fn file_len(dir: &Path, c: usize) -> u64 {
    std::fs::metadata(dir.join(format!("{}.dhrt", COLLECTIONS[c])))
        .map(|m| m.len())
        .unwrap_or(0)
}

/// The length of a collection's log: its file may run longer, by space
/// reserved ahead of the tail.
fn log_len(store: &Store, c: usize) -> u64 {
    store
        .stats()
        .collections
        .iter()
        .find(|s| s.name == COLLECTIONS[c])
        .map_or(0, |s| s.bytes)
}

fn watermark_path(dir: &Path, c: usize) -> std::path::PathBuf {
    dir.join(format!("{}.dhrt.durable", COLLECTIONS[c]))
}

/// The watermark files as they are now (what a crash would leave of them,
/// right after a sync: they are rewritten after each sync).
fn watermarks(dir: &Path) -> Vec<Option<Vec<u8>>> {
    (0..COLLECTIONS.len())
        .map(|c| std::fs::read(watermark_path(dir, c)).ok())
        .collect()
}

/// Puts back the watermark files saved at the last sync: a clean close
/// advanced them, a crash would not have.
fn restore_watermarks(dir: &Path, saved: &[Option<Vec<u8>>]) {
    for (c, w) in saved.iter().enumerate() {
        if let Some(w) = w {
            std::fs::write(watermark_path(dir, c), w).unwrap();
        }
    }
}

fn run(ops: Vec<Op>, options: Options) {
    // Local writes are stamped with this node id, which no applied version
    // uses: a local write and an applied one never have equal versions (a
    // local write landing on the very millisecond of an applied version,
    // both node 0, once made the model disagree in CI: at equal versions
    // the store keeps the greater CRC).
    let options = Options {
        node_id: 100,
        ..options
    };
    let dir = tempfile::tempdir().unwrap();
    let base_ts = dhrt_storage::wall_ms() << 16;
    let mut store = Some(Store::open(dir.path(), options.clone()).unwrap());
    let mut models = vec![Model::default(); COLLECTIONS.len()];
    // What each collection held, and its file length, at its last fsync.
    let mut durable = models.clone();
    let mut synced_len = vec![0u64; COLLECTIONS.len()];
    // The watermark files at the last sync of each collection.
    let mut saved_watermarks = watermarks(dir.path());

    for (step, op) in ops.into_iter().enumerate() {
        let s = store.as_ref().unwrap();
        let context = format!("step {step}: {op:?}");
        let was_new = |c: usize| file_len(dir.path(), c) == 0;
        match op {
            Op::Set(c, k, v) => {
                let new = was_new(c);
                let version = s.set_versioned(COLLECTIONS[c], &key(k), &v).unwrap();
                assert!(models[c].apply(&key(k), Some(v), version), "{context}");
                if new {
                    // A new file's header is made durable when it is created.
                    synced_len[c] = 32;
                    saved_watermarks[c] = watermarks(dir.path())[c].clone();
                }
            }
            Op::Delete(c, k) => {
                let existed = s.delete(COLLECTIONS[c], &key(k)).unwrap();
                let live = models[c]
                    .entries
                    .get(&key(k))
                    .is_some_and(|(v, _)| v.is_some());
                assert_eq!(existed, live, "{context}");
                if existed {
                    let version = s.lookup(COLLECTIONS[c], &key(k)).unwrap().unwrap().version;
                    assert!(models[c].apply(&key(k), None, version));
                }
            }
            Op::Apply(c, k, v, t, n) => {
                let new = was_new(c);
                let version = Version::new((base_ts as i64 + (t << 16)) as u64, n as u64);
                let applied = s
                    .apply(COLLECTIONS[c], &key(k), v.as_deref(), version)
                    .unwrap();
                let model = &mut models[c];
                let tie = model
                    .entries
                    .get(&key(k))
                    .is_some_and(|(_, e)| *e == version)
                    && model.dropped_at.is_none_or(|d| version > d);
                if tie {
                    // Two applies with one version: the store keeps the
                    // record with the greater CRC, which the model does not
                    // compute; it follows the store.
                    if applied {
                        model.entries.insert(key(k), (v, version));
                    }
                } else {
                    assert_eq!(applied, model.apply(&key(k), v, version), "{context}");
                }
                if new {
                    synced_len[c] = 32;
                    saved_watermarks[c] = watermarks(dir.path())[c].clone();
                }
            }
            Op::Drop(c, t) => {
                let new = was_new(c);
                let version = Version::new((base_ts as i64 + (t << 16)) as u64, 1);
                let removed = s.apply_drop(COLLECTIONS[c], version).unwrap();
                assert_eq!(
                    removed.map(|k| k.to_vec()),
                    models[c].drop_older(version),
                    "{context}"
                );
                if new {
                    synced_len[c] = 32;
                    saved_watermarks[c] = watermarks(dir.path())[c].clone();
                }
            }
            Op::Compact(c) => {
                s.compact(COLLECTIONS[c]).unwrap();
                if file_len(dir.path(), c) > 0 {
                    durable[c] = models[c].clone();
                    synced_len[c] = log_len(s, c);
                    saved_watermarks[c] = watermarks(dir.path())[c].clone();
                }
            }
            Op::Sync => {
                s.sync().unwrap();
                durable = models.clone();
                for (c, len) in synced_len.iter_mut().enumerate() {
                    *len = log_len(s, c);
                }
                saved_watermarks = watermarks(dir.path());
            }
            Op::Reopen => {
                drop(store.take());
                store = Some(Store::open(dir.path(), options.clone()).unwrap());
                durable = models.clone();
                for (c, len) in synced_len.iter_mut().enumerate() {
                    *len = log_len(store.as_ref().unwrap(), c);
                }
                saved_watermarks = watermarks(dir.path());
                check(store.as_ref().unwrap(), &models, &context);
            }
            Op::Crash(garbage) => {
                drop(store.take());
                restore_watermarks(dir.path(), &saved_watermarks);
                for (c, &len) in synced_len.iter().enumerate() {
                    let path = dir.path().join(format!("{}.dhrt", COLLECTIONS[c]));
                    if len == 0 {
                        continue;
                    }
                    let mut bytes = std::fs::read(&path).unwrap();
                    assert!(
                        bytes.len() as u64 >= len,
                        "{context}: file shorter than synced"
                    );
                    bytes.truncate(len as usize);
                    bytes.extend_from_slice(&garbage);
                    std::fs::write(&path, bytes).unwrap();
                }
                let reopened = Store::open(dir.path(), options.clone()).unwrap();
                // Zeros after the last record read as reserved space, given
                // back; anything else as a torn tail, cut.
                let zeros = garbage.iter().all(|&b| b == 0);
                for r in reopened.recovery() {
                    let (torn, reserved) = if zeros {
                        (0, garbage.len() as u64)
                    } else {
                        (garbage.len() as u64, 0)
                    };
                    assert_eq!(r.truncated_bytes, torn, "{context}");
                    assert_eq!(r.reserved_bytes, reserved, "{context}");
                }
                models = durable.clone();
                check(&reopened, &models, &context);
                store = Some(reopened);
            }
            Op::Hole => {
                drop(store.take());
                restore_watermarks(dir.path(), &saved_watermarks);
                let mut tails = Vec::new();
                for (c, &len) in synced_len.iter().enumerate() {
                    let path = dir.path().join(format!("{}.dhrt", COLLECTIONS[c]));
                    if len == 0 {
                        tails.push(0);
                        continue;
                    }
                    let mut bytes = std::fs::read(&path).unwrap();
                    let hole_end = bytes.len().min(len as usize + 4096);
                    bytes[len as usize..hole_end].fill(0);
                    tails.push(bytes.len() as u64 - len);
                    std::fs::write(&path, bytes).unwrap();
                }
                let reopened = Store::open(dir.path(), options.clone()).unwrap();
                for r in reopened.recovery() {
                    let c = COLLECTIONS.iter().position(|n| *n == r.collection).unwrap();
                    // All zeros after the hole's start read as reserved
                    // space; anything else is cut past the watermark.
                    assert_eq!(r.truncated_bytes + r.reserved_bytes, tails[c], "{context}");
                }
                models = durable.clone();
                saved_watermarks = watermarks(dir.path());
                check(&reopened, &models, &context);
                store = Some(reopened);
            }
        }
    }
    let s = store.take().unwrap();
    check(&s, &models, "end");
    drop(s);
    let s = Store::open(dir.path(), options.clone()).unwrap();
    check(&s, &models, "final reopen");
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    #[test]
    fn store_matches_a_btreemap_model(ops in prop::collection::vec(op(), 1..60)) {
        run(ops, quiet_options());
    }

    /// The same with few shards that outgrow their arrays at two keys: the
    /// index's skiplist shards, and the move from array to skiplist.
    #[test]
    fn store_with_skiplist_shards_matches_a_btreemap_model(
        ops in prop::collection::vec(op(), 1..60)
    ) {
        run(ops, Options {
            min_index_shards: 1,
            keys_per_shard: 64,
            shard_array_max: 2,
            ..quiet_options()
        });
    }
}
