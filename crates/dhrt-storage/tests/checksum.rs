//! Checksums verified on read: a record damaged in the file of an open
//! store is never served; its key is quarantined (missing here, out of the
//! digest), compaction drops it from the file, and a replica's copy,
//! applied, restores it.

use std::os::unix::fs::FileExt;
use std::path::Path;

use dhrt_storage::{Error, Store, digest_bucket};

use crate::quiet_options;

fn key(i: u32) -> Vec<u8> {
    format!("key-{i:03}").into_bytes()
}

fn value(i: u32) -> Vec<u8> {
    format!("value of key {i}, long enough to damage").into_bytes()
}

/// A store with keys 0..60 in `c`, synced (so every record is below the
/// durable watermark), and the offset of each key's record.
fn loaded(dir: &Path) -> (Store, Vec<u64>) {
    let store = Store::open(dir, quiet_options()).unwrap();
    let mut offsets = Vec::new();
    for i in 0..60 {
        offsets.push(store.stats().collections.first().map_or(32, |c| c.bytes));
        store.set("c", &key(i), &value(i)).unwrap();
    }
    store.sync().unwrap();
    (store, offsets)
}

/// Asserts that every key of [`loaded`] but `missing` reads back its value.
fn assert_all_read_back_but(store: &Store, missing: u32) {
    for i in (0..60).filter(|&i| i != missing) {
        assert_eq!(store.get("c", &key(i)).unwrap(), Some(value(i).into()));
    }
}

/// Flips bytes of key `i`'s value in the file under the open store: the
/// shared map sees it at once.
fn damage(dir: &Path, offsets: &[u64], i: u32) {
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(dir.join("c.dhrt"))
        .unwrap();
    let at = offsets[i as usize] + 40 + key(i).len() as u64 + 3;
    file.write_all_at(b"XYZ", at).unwrap();
}

/// Writes key 12's record over key 11's, as a misdirected write would (the
/// two have records of the same length, side by side); returns key 11's
/// offset.
fn copy_record_12_over_11(dir: &Path, offsets: &[u64]) -> u64 {
    let (a, b) = (offsets[11], offsets[12]);
    assert_eq!(b - a, offsets[13] - b);
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(dir.join("c.dhrt"))
        .unwrap();
    let mut other = vec![0u8; (b - a) as usize];
    file.read_exact_at(&mut other, b).unwrap();
    file.write_all_at(&other, a).unwrap();
    a
}

#[test]
fn a_damaged_value_is_an_error_once_then_missing_and_a_replica_copy_restores_it() {
    let dir = tempfile::tempdir().unwrap();
    let (store, offsets) = loaded(dir.path());
    let (good, version) = store.get_versioned("c", &key(7)).unwrap().unwrap();
    let good = good.unwrap().to_vec();
    let before = store.digest("c").unwrap();
    damage(dir.path(), &offsets, 7);

    match store.get("c", &key(7)) {
        Err(Error::Checksum { collection, offset }) => {
            assert_eq!((collection.as_str(), offset), ("c", offsets[7]));
        }
        other => panic!("expected a checksum error, got {other:?}"),
    }
    // Quarantined: missing here, and its bucket differs from the replicas'.
    assert_eq!(store.get("c", &key(7)).unwrap(), None);
    assert_eq!(store.lookup("c", &key(7)).unwrap(), None);
    let after = store.digest("c").unwrap();
    assert_eq!(after.differing(&before), vec![digest_bucket(&key(7))]);
    assert_eq!(store.scan("c").unwrap().count(), 59);

    // Compaction drops the damaged bytes, so the reopen does not meet them
    // below the watermark (which would refuse to open).
    store.compact("c").unwrap();
    drop(store);
    let store = Store::open(dir.path(), quiet_options()).unwrap();
    assert_all_read_back_but(&store, 7);
    assert_eq!(store.get("c", &key(7)).unwrap(), None);
    assert_eq!(store.digest("c").unwrap(), after);

    // The replica's copy, applied the normal way, restores key and digest.
    assert!(store.apply("c", &key(7), Some(&good), version).unwrap());
    assert_eq!(store.get("c", &key(7)).unwrap().as_deref(), Some(&good[..]));
    assert_eq!(store.digest("c").unwrap(), before);
}

#[test]
fn listings_skip_damaged_records_and_quarantine_them() {
    let dir = tempfile::tempdir().unwrap();
    let (store, offsets) = loaded(dir.path());
    let before = store.digest("c").unwrap();
    let damaged = [3u32, 20, 41, 59];
    for &i in &damaged {
        damage(dir.path(), &offsets, i);
    }
    let healthy = |k: &[u8]| !damaged.iter().any(|&i| key(i) == k);
    // Each way of listing yields only healthy records, each with its value.
    let by_key: Vec<_> = store.records("c", None).unwrap().collect();
    let by_hash: Vec<_> = store.list("c", None, false).unwrap().collect();
    let newest: Vec<_> = store.newest_first("c").unwrap().collect();
    let buckets: Vec<_> = (0..dhrt_storage::DIGEST_BUCKETS)
        .flat_map(|b| store.bucket("c", b).unwrap())
        .collect();
    for (name, records) in [
        ("records", &by_key),
        ("list", &by_hash),
        ("newest_first", &newest),
        ("bucket", &buckets),
    ] {
        assert_eq!(records.len(), 56, "{name}");
        for r in records.iter() {
            assert!(healthy(&r.key), "{name} yielded a damaged record");
            let i: u32 = std::str::from_utf8(&r.key[4..]).unwrap().parse().unwrap();
            assert_eq!(r.value.as_deref(), Some(&value(i)[..]), "{name}");
        }
    }
    // The damaged keys were quarantined (or dropped by the compaction the
    // quarantine asked for): missing, and out of the digest.
    for &i in &damaged {
        assert_eq!(store.get("c", &key(i)).unwrap(), None);
    }
    let mut buckets: Vec<usize> = damaged.iter().map(|&i| digest_bucket(&key(i))).collect();
    buckets.sort();
    buckets.dedup();
    assert_eq!(store.digest("c").unwrap().differing(&before), buckets);
    store.compact("c").unwrap();
    drop(store);
    let store = Store::open(dir.path(), quiet_options()).unwrap();
    assert_eq!(store.scan("c").unwrap().count(), 56);
}

/// An overwrite takes what it needs of the record it replaces (its CRC for
/// the digest, its length for the garbage count) from the index, not from
/// the log: a replaced record whose header was damaged on disk leaves both
/// exact.
#[test]
fn an_overwrite_of_a_record_damaged_on_disk_keeps_the_digest_and_garbage_exact() {
    let dir = tempfile::tempdir().unwrap();
    let (store, offsets) = loaded(dir.path());
    let garbage_before = store.stats().collections[0].garbage_bytes;
    // The whole 40-byte header of key 7's record: CRC, kind, lengths.
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(dir.path().join("c.dhrt"))
        .unwrap();
    file.write_all_at(&[0xff; 40], offsets[7]).unwrap();

    store.set("c", &key(7), b"a new value").unwrap();
    let replaced = (40 + key(7).len() + value(7).len()) as u64;
    assert_eq!(
        store.stats().collections[0].garbage_bytes,
        garbage_before + replaced
    );
    // The live digest is the one a rebuild from the records computes.
    let live = store.digest("c").unwrap();
    store.compact("c").unwrap();
    assert_eq!(store.digest("c").unwrap(), live);
    assert_eq!(
        store.get("c", &key(7)).unwrap().as_deref(),
        Some(&b"a new value"[..])
    );
    drop(store);
    let store = Store::open(dir.path(), quiet_options()).unwrap();
    assert_eq!(store.digest("c").unwrap(), live);
    assert_all_read_back_but(&store, 7);
}

/// A record that checks out by itself but is not the one the index wrote
/// there (a misdirected write copied another key's record over it) is not
/// served as this key's value: the index keeps each record's CRC and value
/// length, and a read compares them.
#[test]
fn a_valid_record_of_another_key_written_over_a_value_is_not_served() {
    let dir = tempfile::tempdir().unwrap();
    let (store, offsets) = loaded(dir.path());
    let a = copy_record_12_over_11(dir.path(), &offsets);

    match store.get("c", &key(11)) {
        Err(Error::Checksum { offset, .. }) => assert_eq!(offset, a),
        other => panic!("key 11 read as {other:?}, not a checksum error"),
    }
    assert_eq!(store.get("c", &key(11)).unwrap(), None);
    assert_eq!(store.get("c", &key(12)).unwrap(), Some(value(12).into()));
    // A listing neither serves it.
    let listed: Vec<_> = store
        .scan("c")
        .unwrap()
        .filter(|(k, _)| k[..] == key(11)[..])
        .collect();
    assert!(listed.is_empty(), "{listed:?}");
}

/// The same misdirected write met first by an opening (nothing read it):
/// both records are whole and valid, so only their seqs, out of order,
/// show it, and the open is refused rather than rebuild the index from
/// whichever wins (key 11's lost record may be its current value, or a
/// delete).
#[test]
fn a_misdirected_write_met_by_an_opening_refuses_it() {
    for later_over_earlier in [true, false] {
        let dir = tempfile::tempdir().unwrap();
        let (store, offsets) = loaded(dir.path());
        drop(store);
        if later_over_earlier {
            copy_record_12_over_11(dir.path(), &offsets);
        } else {
            let file = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(dir.path().join("c.dhrt"))
                .unwrap();
            let mut record = vec![0u8; (offsets[12] - offsets[11]) as usize];
            file.read_exact_at(&mut record, offsets[11]).unwrap();
            file.write_all_at(&record, offsets[12]).unwrap();
        }
        let before = std::fs::read(dir.path().join("c.dhrt")).unwrap();
        match Store::open(dir.path(), quiet_options()) {
            Err(Error::Corrupt { offset, reason, .. }) => {
                assert_eq!(offset, offsets[12]);
                assert!(reason.contains("misdirected write"), "{reason}");
            }
            other => panic!("opened a log with records out of seq order: {other:?}"),
        }
        assert_eq!(std::fs::read(dir.path().join("c.dhrt")).unwrap(), before);
    }
}

/// A store closed right after a read found damage (before the background
/// thread's compaction) compacts the damaged record out as it closes: the
/// next open does not meet it below the durable watermark and refuse.
#[test]
fn a_store_closed_right_after_finding_damage_opens_again() {
    let dir = tempfile::tempdir().unwrap();
    let (store, offsets) = loaded(dir.path());
    damage(dir.path(), &offsets, 21);
    assert!(matches!(
        store.get("c", &key(21)),
        Err(Error::Checksum { .. })
    ));
    drop(store);
    let store = Store::open(dir.path(), quiet_options()).expect("reopened");
    assert_eq!(store.get("c", &key(21)).unwrap(), None);
    assert_all_read_back_but(&store, 21);
}

/// A compaction that meets such a record first (no read found it) drops it
/// as damage: it neither copies it in under the other key (which then
/// would be in the new index twice) nor fails.
#[test]
fn a_compaction_drops_a_valid_record_of_another_key_written_over_a_value() {
    let dir = tempfile::tempdir().unwrap();
    let (store, offsets) = loaded(dir.path());
    copy_record_12_over_11(dir.path(), &offsets);

    let report = store.compact("c").unwrap();
    assert_eq!(report.damaged, 1, "{report:?}");
    assert_eq!(store.get("c", &key(11)).unwrap(), None);
    // Its key is handed over as quarantined, as a read's would be: the
    // node reads it as damaged, not missing.
    assert_eq!(store.take_quarantined("c"), vec![key(11)]);
    assert_eq!(store.get("c", &key(12)).unwrap(), Some(value(12).into()));
    assert_eq!(store.scan("c").unwrap().count(), 59);
    drop(store);
    let store = Store::open(dir.path(), quiet_options()).unwrap();
    assert_eq!(store.get("c", &key(12)).unwrap(), Some(value(12).into()));
    assert_eq!(store.scan("c").unwrap().count(), 59);
}

#[test]
fn damage_a_compaction_meets_before_any_read_quarantines_the_keys() {
    let dir = tempfile::tempdir().unwrap();
    let (store, offsets) = loaded(dir.path());
    // Key 30 is written again after the damage: its new record is good.
    for i in [4, 30, 41] {
        damage(dir.path(), &offsets, i);
    }
    store.set("c", &key(30), b"again").unwrap();

    let report = store.compact("c").unwrap();
    assert_eq!(report.damaged, 2, "{report:?}");
    let mut keys = store.take_quarantined("c");
    keys.sort();
    assert_eq!(keys, vec![key(4), key(41)]);
    assert!(store.take_quarantined("c").is_empty());
    assert_eq!(store.get("c", &key(4)).unwrap(), None);
    assert_eq!(
        store.get("c", &key(30)).unwrap(),
        Some(b"again".to_vec().into())
    );
    assert_eq!(store.scan("c").unwrap().count(), 58);
}

/// XORs `mask` into the byte at `at` of `c`'s file (one damaged byte, as
/// bit rot leaves).
fn flip(dir: &Path, at: u64, mask: u8) {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(dir.join("c.dhrt"))
        .unwrap();
    let mut byte = [0u8];
    file.read_exact_at(&mut byte, at).unwrap();
    file.write_all_at(&[byte[0] ^ mask], at).unwrap();
}

/// The offset of the first byte of key `i`'s value in [`loaded`]'s file.
fn value_at(offsets: &[u64], i: u32) -> u64 {
    offsets[i as usize] + 40 + key(i).len() as u64
}

/// Asserts that opening `dir` is refused for damage at `offset`, and
/// leaves the file as it was.
fn assert_refused_at(dir: &Path, offset: u64) {
    let before = std::fs::read(dir.join("c.dhrt")).unwrap();
    match Store::open(dir, quiet_options()) {
        Err(Error::Corrupt {
            offset: at, reason, ..
        }) => {
            assert_eq!(at, offset);
            assert_eq!(reason, "bad record below the durable watermark");
        }
        other => panic!("expected Corrupt at {offset}, got {other:?}"),
    }
    assert_eq!(std::fs::read(dir.join("c.dhrt")).unwrap(), before);
}

/// A byte damaged on disk that nothing read, in a value then overwritten
/// or deleted, is garbage: a store closed cleanly then opens again,
/// stepping over it (the damaged byte is located from the CRC, so the key
/// and version are known as written, and a later record of the key beats
/// it), and compacts it out, so the open after that meets no damage.
#[test]
fn damage_nothing_read_that_a_later_write_superseded_does_not_stop_the_next_open() {
    let dir = tempfile::tempdir().unwrap();
    let (store, offsets) = loaded(dir.path());
    flip(dir.path(), value_at(&offsets, 7) + 5, 0x01);
    flip(dir.path(), value_at(&offsets, 9) + 2, 0xff);
    // Its stored CRC, and (by one bit) its key: undone, so the key is 8's.
    flip(dir.path(), offsets[8] + 1, 0x10);
    flip(dir.path(), offsets[10] + 40 + 6, 0x01);
    store
        .set("c", &key(7), b"written after the damage")
        .unwrap();
    store.delete("c", &key(9)).unwrap();
    store.set("c", &key(8), b"eight again").unwrap();
    store.set("c", &key(10), b"ten again").unwrap();
    store.sync().unwrap();
    drop(store);

    let store = Store::open(dir.path(), quiet_options()).expect("reopened");
    assert_eq!(store.recovery()[0].damaged_records_skipped, 4);
    assert_eq!(
        store.get("c", &key(7)).unwrap(),
        Some(b"written after the damage".to_vec().into())
    );
    assert_eq!(store.get("c", &key(9)).unwrap(), None);
    assert_eq!(
        store.get("c", &key(10)).unwrap(),
        Some(b"ten again".to_vec().into())
    );
    for i in (0..60).filter(|&i| !(7..=10).contains(&i)) {
        assert_eq!(store.get("c", &key(i)).unwrap(), Some(value(i).into()));
    }
    // The open asked for a compaction, which drops the damaged bytes.
    store.compact_damaged();
    drop(store);
    let store = Store::open(dir.path(), quiet_options()).expect("reopened");
    assert_eq!(store.recovery()[0].damaged_records_skipped, 0);
    assert_eq!(store.get("c", &key(9)).unwrap(), None);
}

/// A damaged record that may be its key's value refuses the open, and the
/// file is left alone: one nothing superseded (an older record of its key
/// would be served in its place), even when another key was written after
/// it; one whose key was damaged into the name of a key written later
/// (the damaged byte is undone: it is the key's only record); one damaged
/// in more than one byte, which cannot be located, even if superseded.
#[test]
fn damage_below_the_watermark_that_may_be_a_value_still_refuses_the_open() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = loaded(dir.path());
    store.set("c", &key(7), b"newer").unwrap();
    let newer = store.stats().collections[0].bytes - 40 - key(7).len() as u64 - 5;
    store
        .set("c", &key(8), b"a later write of another key")
        .unwrap();
    store.sync().unwrap();
    drop(store);
    flip(dir.path(), newer + 40 + key(7).len() as u64 + 1, 0x04);
    assert_refused_at(dir.path(), newer);

    // "key-008" -> "key-009", and 9 was written after 8.
    let dir = tempfile::tempdir().unwrap();
    let (store, offsets) = loaded(dir.path());
    drop(store);
    flip(dir.path(), offsets[8] + 40 + 6, 0x01);
    assert_refused_at(dir.path(), offsets[8]);

    let dir = tempfile::tempdir().unwrap();
    let (store, offsets) = loaded(dir.path());
    damage(dir.path(), &offsets, 7);
    store
        .set("c", &key(7), b"written after the damage")
        .unwrap();
    drop(store);
    assert_refused_at(dir.path(), offsets[7]);
}

/// A damaged length that makes a superseded record span the records after
/// it, up to a record's start, neither hides them (they hold acknowledged
/// writes) nor brings back what they replaced: the open is refused.
#[test]
fn a_damaged_length_that_swallows_the_next_records_refuses_the_open() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = loaded(dir.path());
    // Records of 128 bytes (40 + 7 + 81): a flip of bit 7 of a value
    // length of 81 makes it 209, one record more. 10, then 11, then 10
    // again: the first of these is superseded, 11's is not.
    let start = store.stats().collections[0].bytes;
    for (k, v) in [(10, b'a'), (11, b'b'), (10, b'c')] {
        store.set("c", &key(k), &[v; 81]).unwrap();
    }
    drop(store);
    flip(dir.path(), start + 20, 0x80);
    assert_refused_at(dir.path(), start);
}

/// One replicated batch that writes a key twice, the losing version after
/// the winning one, appends only the winner (a later record of a key
/// always beats the earlier ones). With that winner damaged, the open is
/// refused: nothing beats it.
#[test]
fn a_damaged_winner_followed_by_a_losing_record_of_its_key_refuses_the_open() {
    use dhrt_storage::Version;
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = loaded(dir.path());
    let now = store.set_versioned("c", b"other", b"x").unwrap();
    let start = store.stats().collections[0].bytes;
    let (high, low) = (Version::new(now.ts + 20, 2), Version::new(now.ts + 10, 3));
    let k = b"twice".as_slice();
    store
        .apply_many(
            "c",
            &[
                (k, Some(b"winner".as_slice()), high),
                (k, Some(b"loser".as_slice()), low),
            ],
        )
        .unwrap();
    assert_eq!(store.get("c", k).unwrap(), Some(b"winner".to_vec().into()));
    let one_record = 40 + k.len() as u64 + b"winner".len() as u64;
    assert_eq!(store.stats().collections[0].bytes, start + one_record);
    drop(store);
    flip(dir.path(), start + 40 + k.len() as u64 + 2, 0x01);
    assert_refused_at(dir.path(), start);
}

/// Stepping over needs the damage located for sure and the frame checked
/// apart from the CRC: a superseded record longer than 4 KiB (where
/// damage of several bytes passes for one byte too often), or one followed
/// by a record whose seq does not follow its own (here, the first record
/// after a restart), refuses the open even with one damaged byte.
#[test]
fn a_long_record_or_one_before_a_gap_in_seqs_is_not_stepped_over() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = loaded(dir.path());
    let long = store.stats().collections[0].bytes;
    store.set("c", &key(3), &[b'l'; 5000]).unwrap();
    store.set("c", &key(3), b"short").unwrap();
    drop(store);
    flip(dir.path(), long + 40 + 7 + 100, 0x01);
    assert_refused_at(dir.path(), long);

    let dir = tempfile::tempdir().unwrap();
    let (store, offsets) = loaded(dir.path());
    drop(store);
    // Key 59's record is the last before the restart.
    let store = Store::open(dir.path(), quiet_options()).unwrap();
    store.set("c", &key(59), b"after the restart").unwrap();
    store.set("c", &key(0), b"and another").unwrap();
    drop(store);
    flip(dir.path(), value_at(&offsets, 59) + 1, 0x01);
    assert_refused_at(dir.path(), offsets[59]);
}

/// A page of a log that cannot be read (a disk sector failing, or the file
/// shortened under the open store, as here) raises SIGBUS on the reading
/// thread. It must not kill the process: the page reads as zeros, the
/// records on it fail their checksums and are quarantined, and everything
/// else is served. (Without the SIGBUS guard this test binary dies.)
#[test]
fn a_page_that_cannot_be_read_is_damage_not_a_crash() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), quiet_options()).unwrap();
    let big = |i: u32| vec![b'a' + (i % 26) as u8; 8192];
    let mut offsets = Vec::new();
    for i in 0..300 {
        offsets.push(store.stats().collections.first().map_or(32, |c| c.bytes));
        store.set("c", &key(i), &big(i)).unwrap();
    }
    store.sync().unwrap();
    // Cut the file to 100,000 bytes under the open store: every page past
    // that is beyond its end, for the store's map.
    let cut = 100_000;
    std::fs::OpenOptions::new()
        .write(true)
        .open(dir.path().join("c.dhrt"))
        .unwrap()
        .set_len(cut)
        .unwrap();

    let lost = 200;
    assert!(offsets[lost as usize] > cut + 4096);
    match store.get("c", &key(lost)) {
        Err(Error::Checksum { collection, offset }) => {
            assert_eq!((collection.as_str(), offset), ("c", offsets[lost as usize]));
        }
        other => panic!("expected a checksum error, got {other:?}"),
    }
    assert_eq!(store.get("c", &key(lost)).unwrap(), None);
    // Records wholly below the cut are served as they were.
    for i in (0..300).filter(|&i| offsets[i as usize] + 8192 + 64 < cut) {
        assert_eq!(store.get("c", &key(i)).unwrap(), Some(big(i).into()));
    }
    // A listing steps over every record past the cut, and the store keeps
    // taking writes.
    let listed = store.scan("c").unwrap().count();
    assert!(listed < 20, "{listed} keys listed");
    store.set("c", b"after", b"the cut").unwrap();
    assert_eq!(
        store.get("c", b"after").unwrap(),
        Some((&b"the cut"[..]).into())
    );
}

/// A record copied from another collection's file over the record at the
/// same offset here, both collections written in step (same keys, values
/// of the same length): a misdirected write between files. Each
/// collection's seqs start at a random point of the epoch, so the copy is
/// out of seq order here and the open is refused. Before, both files held
/// the same seqs at the same offsets, and the node served the other
/// collection's value for the key.
#[test]
fn a_record_copied_from_another_collections_file_is_refused_on_opening() {
    for round in 0..8 {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), quiet_options()).unwrap();
        let mut offsets = Vec::new();
        for i in 0..5 {
            offsets.push(store.stats().collections.first().map_or(32, |c| c.bytes));
            store.set("a", &key(i), &value(i)).unwrap();
            store.set("b", &key(i), &value(i + 5)).unwrap();
        }
        store.sync().unwrap();
        drop(store);
        let read = |name: &str| std::fs::read(dir.path().join(format!("{name}.dhrt"))).unwrap();
        let (a, mut b) = (read("a"), read("b"));
        assert_eq!(a.len(), b.len());
        let (from, to) = (offsets[2] as usize, offsets[3] as usize);
        b[from..to].copy_from_slice(&a[from..to]);
        std::fs::write(dir.path().join("b.dhrt"), &b).unwrap();
        match Store::open(dir.path(), quiet_options()) {
            Err(Error::Corrupt { offset, reason, .. }) => {
                assert!(
                    [from, to].contains(&(offset as usize)),
                    "round {round}: {offset}"
                );
                assert!(reason.contains("misdirected write"), "{reason}");
            }
            Ok(store) => panic!(
                "round {round}: opened, b's key 2 reads {:?}",
                store.get("b", &key(2)).unwrap()
            ),
            Err(e) => panic!("round {round}: {e}"),
        }
    }
}
