//! Criterion micro-benchmarks of dhrt-storage's hot paths: a get that hits,
//! a set that overwrites, a set of a new key, and a 100-key ordered scan.
//! The side-by-side comparison with other engines is the `dhrt-storage-bench`
//! binary; these are for spotting regressions.

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use dhrt_storage::{Options, Store, SyncMode};

const KEYS: u64 = 100_000;

fn key(i: u64) -> [u8; 16] {
    let h = i.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    let mut k = [0u8; 16];
    k[..8].copy_from_slice(&h.to_be_bytes());
    k[8..].copy_from_slice(&i.to_be_bytes());
    k
}

fn loaded(dir: &std::path::Path) -> Store {
    let options = Options {
        sync: SyncMode::Never,
        ..Options::default()
    };
    let store = Store::open(dir, options).unwrap();
    for i in 0..KEYS {
        store.set("bench", &key(i), &[7u8; 100]).unwrap();
    }
    store
}

fn storage(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let store = loaded(dir.path());
    let mut i = 0u64;
    c.bench_function("get_hit_100k", |b| {
        b.iter(|| {
            i = (i + 7919) % KEYS;
            black_box(store.get("bench", &key(i)).unwrap().unwrap());
        })
    });
    c.bench_function("set_overwrite_100b", |b| {
        b.iter(|| {
            i = (i + 7919) % KEYS;
            store.set("bench", &key(i), &[9u8; 100]).unwrap();
        })
    });
    let mut n = KEYS;
    c.bench_function("set_new_key_100b", |b| {
        b.iter(|| {
            n += 1;
            store.set("bench", &key(n), &[9u8; 100]).unwrap();
        })
    });
    c.bench_function("scan_100_keys", |b| {
        b.iter(|| black_box(store.scan("bench").unwrap().take(100).count()))
    });
    let memory = Store::memory(Options::default());
    for i in 0..KEYS {
        memory.set("bench", &key(i), &[7u8; 100]).unwrap();
    }
    c.bench_function("memory_get_hit_100k", |b| {
        b.iter(|| {
            i = (i + 7919) % KEYS;
            black_box(memory.get("bench", &key(i)).unwrap().unwrap());
        })
    });
}

criterion_group!(benches, storage);
criterion_main!(benches);
