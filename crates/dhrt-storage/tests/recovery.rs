//! Recovery: a torn tail is cut at every possible byte, garbage after the last
//! record is cut, a corrupt middle record is refused without touching the file.

use std::path::Path;

use dhrt_storage::{Error, Store};

use crate::quiet_options;

const KEYS: [&[u8]; 3] = [b"first", b"second", b"third"];

/// Writes three records into collection `c` and returns the file's bytes and
/// the offset where each record starts.
fn three_records(dir: &Path) -> (Vec<u8>, Vec<usize>) {
    let store = Store::open(dir, quiet_options()).unwrap();
    let mut starts = Vec::new();
    for key in KEYS {
        starts.push(
            store
                .stats()
                .collections
                .first()
                .map_or(32, |c| c.bytes as usize),
        );
        store.set("c", key, &[key, b"-value"].concat()).unwrap();
    }
    drop(store);
    (std::fs::read(dir.join("c.dhrt")).unwrap(), starts)
}

fn open_with(bytes: &[u8]) -> (tempfile::TempDir, Result<Store, Error>) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("c.dhrt"), bytes).unwrap();
    let store = Store::open(dir.path(), quiet_options());
    (dir, store)
}

#[test]
fn torn_tail_is_cut_at_every_byte_offset() {
    let src = tempfile::tempdir().unwrap();
    let (bytes, starts) = three_records(src.path());
    let last = starts[2];
    for cut in last..bytes.len() {
        let (dir, store) = open_with(&bytes[..cut]);
        let store = store.unwrap_or_else(|e| panic!("cut at {cut}: {e}"));
        assert_eq!(
            store.get("c", KEYS[0]).unwrap().as_deref(),
            Some(&b"first-value"[..])
        );
        assert_eq!(
            store.get("c", KEYS[1]).unwrap().as_deref(),
            Some(&b"second-value"[..])
        );
        assert_eq!(store.get("c", KEYS[2]).unwrap(), None, "cut at {cut}");
        // A torn tail of zero bytes only (the record's CRC starts with
        // one, once in 256 runs, and the cut keeps just that) cannot be
        // told from space reserved ahead and never written: it is given
        // back as such, and either way the file ends at the last record.
        let report = &store.recovery()[0];
        if bytes[last..cut].iter().all(|&b| b == 0) {
            assert_eq!(
                (report.truncated_bytes, report.reserved_bytes),
                (0, (cut - last) as u64)
            );
        } else {
            assert_eq!(report.truncated_bytes, (cut - last) as u64);
        }
        assert_eq!(
            std::fs::metadata(dir.path().join("c.dhrt")).unwrap().len(),
            last as u64
        );
        // The log goes on cleanly after the cut.
        store.set("c", b"fourth", b"4").unwrap();
        drop(store);
        let store = Store::open(dir.path(), quiet_options()).unwrap();
        assert_eq!(
            store.get("c", b"fourth").unwrap().as_deref(),
            Some(&b"4"[..])
        );
        assert_eq!(store.recovery()[0].truncated_bytes, 0);
    }
    // The case above that a CRC starting with a zero byte makes: one zero
    // byte past the last record is reserved space, not a torn record.
    let (_dir, store) = open_with(&[&bytes[..last], &[0u8][..]].concat());
    let store = store.unwrap();
    let report = &store.recovery()[0];
    assert_eq!((report.truncated_bytes, report.reserved_bytes), (0, 1));
    assert_eq!(store.get("c", KEYS[2]).unwrap(), None);
}

#[test]
fn a_log_whose_creation_was_interrupted_is_removed_unless_its_watermark_says_otherwise() {
    let src = tempfile::tempdir().unwrap();
    let (bytes, _) = three_records(src.path());
    let watermark = std::fs::read(src.path().join("c.dhrt.durable")).unwrap();
    for cut in 0..32 {
        // No watermark: the header was never durable, no record was ever
        // in it. The file goes (no write needed, so a full disk cannot
        // stop the opening), and the name is free for a new collection.
        let (dir, store) = open_with(&bytes[..cut]);
        let store = store.unwrap_or_else(|e| panic!("cut at {cut}: {e}"));
        assert!(store.all_collections().is_empty(), "cut at {cut}");
        assert!(!dir.path().join("c.dhrt").exists(), "cut at {cut}");
        store.set("c", b"k", b"v").unwrap();
        drop(store);
        let store = Store::open(dir.path(), quiet_options()).unwrap();
        assert_eq!(store.get("c", b"k").unwrap().as_deref(), Some(&b"v"[..]));
        drop(store);
        // A watermark beside it: the header and records were durable, so
        // this is a log that lost its bytes. Refused, and left as it is.
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("c.dhrt"), &bytes[..cut]).unwrap();
        std::fs::write(dir.path().join("c.dhrt.durable"), &watermark).unwrap();
        let opened = Store::open(dir.path(), quiet_options());
        assert!(
            matches!(&opened, Err(Error::Corrupt { reason, .. }) if reason.contains("before its durable watermark")),
            "cut at {cut}: {:?}",
            opened.map(|_| ())
        );
        assert_eq!(
            std::fs::read(dir.path().join("c.dhrt")).unwrap(),
            &bytes[..cut]
        );
    }
    // Not a prefix of a header: not ours to remove.
    for len in [10, 32] {
        let mut bad = bytes[..len].to_vec();
        bad[0] = b'X';
        let (dir, opened) = open_with(&bad);
        assert!(matches!(opened, Err(Error::BadHeader { .. })), "{len}");
        assert!(dir.path().join("c.dhrt").exists());
    }
}

#[test]
fn a_log_missing_beside_its_watermark_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    three_records(dir.path());
    std::fs::remove_file(dir.path().join("c.dhrt")).unwrap();
    let opened = Store::open(dir.path(), quiet_options());
    assert!(
        matches!(&opened, Err(Error::Corrupt { reason, .. }) if reason.contains("the log is missing")),
        "{:?}",
        opened.map(|_| ())
    );
    // The operator accepts the loss by deleting the watermark.
    std::fs::remove_file(dir.path().join("c.dhrt.durable")).unwrap();
    let store = Store::open(dir.path(), quiet_options()).unwrap();
    assert!(store.all_collections().is_empty());
}

/// The watermark file is tied to its log (a tag of the collection's name
/// and the log's history): two collections whose files were swapped, in
/// pairs or the watermarks alone, are refused with a sentence rather than
/// served under each other's names, or judged by another log's watermark.
#[test]
fn files_swapped_between_collections_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = Store::open(dir.path(), quiet_options()).unwrap();
        for i in 0..20 {
            store.set("a", format!("k{i}").as_bytes(), b"of a").unwrap();
            store
                .set("b", format!("k{i}").as_bytes(), b"of b, longer")
                .unwrap();
        }
    }
    let file = |n: &str| dir.path().join(n);
    let swap = |x: &str, y: &str| {
        std::fs::rename(file(x), file("tmp")).unwrap();
        std::fs::rename(file(y), file(x)).unwrap();
        std::fs::rename(file("tmp"), file(y)).unwrap();
    };
    let refused = |what: &str| {
        let opened = Store::open(dir.path(), quiet_options());
        assert!(
            matches!(&opened, Err(Error::Corrupt { reason, .. }) if reason.contains("belongs to another log")),
            "{what}: {:?}",
            opened.map(|_| ())
        );
    };
    // Both pairs swapped: each log with its own watermark, under the other
    // collection's name.
    swap("a.dhrt", "b.dhrt");
    swap("a.dhrt.durable", "b.dhrt.durable");
    refused("pairs swapped");
    // The logs put back, the watermarks still swapped.
    swap("a.dhrt", "b.dhrt");
    refused("watermarks swapped");
    // Everything put back: as before.
    swap("a.dhrt.durable", "b.dhrt.durable");
    let store = Store::open(dir.path(), quiet_options()).unwrap();
    assert_eq!(
        store.get("a", b"k3").unwrap().as_deref(),
        Some(&b"of a"[..])
    );
    assert_eq!(
        store.get("b", b"k3").unwrap().as_deref(),
        Some(&b"of b, longer"[..])
    );
    drop(store);
    // An operator who means it moves the watermark aside: the log is
    // trusted whole under its new name.
    swap("a.dhrt", "b.dhrt");
    std::fs::remove_file(file("a.dhrt.durable")).unwrap();
    std::fs::remove_file(file("b.dhrt.durable")).unwrap();
    let store = Store::open(dir.path(), quiet_options()).unwrap();
    assert_eq!(
        store.get("a", b"k3").unwrap().as_deref(),
        Some(&b"of b, longer"[..])
    );
}

#[test]
fn garbage_after_the_last_record_is_cut() {
    let src = tempfile::tempdir().unwrap();
    let (bytes, _) = three_records(src.path());
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    for len in (1..300).step_by(7) {
        let mut garbage = Vec::new();
        for _ in 0..len {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            garbage.push(seed as u8);
        }
        let (_dir, store) = open_with(&[&bytes[..], &garbage].concat());
        let store = store.unwrap();
        assert_eq!(store.recovery()[0].truncated_bytes, len as u64);
        assert_eq!(store.scan("c").unwrap().count(), 3);
    }
    // Zeroes are space reserved ahead of the tail (or what a power loss
    // left of unwritten pages): given back, and said so, but no torn record.
    let (dir, store) = open_with(&[&bytes[..], &[0u8; 4096][..]].concat());
    let store = store.unwrap();
    assert_eq!(store.recovery()[0].truncated_bytes, 0);
    assert_eq!(store.recovery()[0].reserved_bytes, 4096);
    assert_eq!(store.scan("c").unwrap().count(), 3);
    drop(store);
    let file = std::fs::read_dir(dir.path())
        .unwrap()
        .flatten()
        .find(|e| e.path().extension().is_some_and(|x| x == "dhrt"))
        .unwrap();
    assert_eq!(file.metadata().unwrap().len(), bytes.len() as u64);
}

#[test]
fn a_flipped_bit_in_a_middle_record_is_refused_and_the_file_left_alone() {
    let src = tempfile::tempdir().unwrap();
    let (bytes, starts) = three_records(src.path());
    for bit in starts[1] * 8..starts[2] * 8 {
        let mut bad = bytes.clone();
        bad[bit / 8] ^= 1 << (bit % 8);
        let (dir, store) = open_with(&bad);
        match store {
            Err(Error::Corrupt { offset, path, .. }) => {
                assert_eq!(offset, starts[1] as u64, "bit {bit}");
                assert!(path.ends_with("c.dhrt"));
            }
            other => panic!("bit {bit}: expected Corrupt, got {other:?}"),
        }
        assert_eq!(
            std::fs::read(dir.path().join("c.dhrt")).unwrap(),
            bad,
            "file was touched"
        );
    }
}

#[test]
fn a_large_log_replays_on_several_threads_to_the_same_state() {
    use dhrt_storage::Version;
    let dir = tempfile::tempdir().unwrap();
    let options = dhrt_storage::Options {
        keys_per_shard: 16,
        min_index_shards: 16,
        ..quiet_options()
    };
    let before = {
        let store = Store::open(dir.path(), options.clone()).unwrap();
        for i in 0..60_000u32 {
            let key = format!("k{}", i % 40_000);
            if i % 11 == 0 {
                store.delete("big", key.as_bytes()).unwrap();
            } else {
                store.set("big", key.as_bytes(), &i.to_le_bytes()).unwrap();
            }
        }
        // A replicated drop that falls between local writes, and keys written
        // with versions on both sides of it.
        let now = store.clock().now();
        store
            .apply(
                "big",
                b"old-remote",
                Some(b"x"),
                Version::new(now.ts - 10, 5),
            )
            .unwrap();
        store.apply_drop("big", Version::new(now.ts, 5)).unwrap();
        store
            .apply(
                "big",
                b"new-remote",
                Some(b"y"),
                Version::new(now.ts + 1, 5),
            )
            .unwrap();
        store
            .apply_drop("big", Version::new(now.ts - 7, 5))
            .unwrap(); // older: ignored
        for i in 0..20_000u32 {
            store
                .set("big", format!("after{i}").as_bytes(), b"z")
                .unwrap();
        }
        let records: Vec<_> = store.records("big", None).unwrap().collect();
        (records, store.stats().collections)
    };
    let store = Store::open(dir.path(), options).unwrap();
    let records: Vec<_> = store.records("big", None).unwrap().collect();
    assert_eq!(records.len(), before.0.len());
    assert!(records == before.0, "replayed state differs");
    let stats = store.stats().collections;
    assert_eq!(
        (stats[0].keys, stats[0].tombstones),
        (before.1[0].keys, before.1[0].tombstones)
    );
    assert_eq!(stats[0].garbage_bytes, before.1[0].garbage_bytes);
    assert_eq!(stats[0].keys, 20_001);
    assert!(store.get("big", b"old-remote").unwrap().is_none());
    assert!(store.get("big", b"new-remote").unwrap().is_some());
    assert!(
        !store
            .apply("big", b"k1", Some(b"stale"), Version::new(1, 1))
            .unwrap()
    );
}

/// (start offset, key) of each record of a log.
type Records = Vec<(usize, Vec<u8>)>;

/// The offset the durable watermark of `c` in `dir` records.
fn watermark_of(dir: &Path) -> u64 {
    let bytes = std::fs::read(dir.join("c.dhrt.durable")).unwrap();
    u64::from_le_bytes(bytes[8..16].try_into().unwrap())
}

/// A log of `c` whose first 20 records were synced and whose next 200 were
/// not, as a crash would leave it: the log whole (the OS wrote the tail
/// back) and the watermark as of the sync. Returns the directory, the log's
/// bytes, the watermark and the (start, key) of every record.
fn synced_then_unsynced() -> (tempfile::TempDir, Vec<u8>, u64, Records) {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), quiet_options()).unwrap();
    let mut records = Vec::new();
    let mut watermark_file = Vec::new();
    for i in 0..220u32 {
        if i == 20 {
            store.sync().unwrap();
            watermark_file = std::fs::read(dir.path().join("c.dhrt.durable")).unwrap();
        }
        let start = store
            .stats()
            .collections
            .first()
            .map_or(32, |c| c.bytes as usize);
        let key = format!("key-{i:03}").into_bytes();
        store.set("c", &key, &[b'v'; 60]).unwrap();
        records.push((start, key));
    }
    drop(store);
    // The clean close synced everything; a crash would not have.
    std::fs::write(dir.path().join("c.dhrt.durable"), watermark_file).unwrap();
    let bytes = std::fs::read(dir.path().join("c.dhrt")).unwrap();
    let watermark = watermark_of(dir.path());
    assert_eq!(watermark as usize, records[20].0);
    (dir, bytes, watermark, records)
}

/// Zeroes the 4 KiB page at `page` (a multiple of 4096) of the log in
/// `dir`, and returns the start of the first record it damages.
fn zero_page(dir: &Path, bytes: &[u8], page: usize, records: &[(usize, Vec<u8>)]) -> usize {
    let mut bad = bytes.to_vec();
    bad[page..page + 4096].fill(0);
    std::fs::write(dir.join("c.dhrt"), bad).unwrap();
    let next = records.iter().position(|r| r.0 >= page).unwrap();
    records[next - 1].0
}

#[test]
fn a_zeroed_page_past_the_watermark_is_cut_even_with_valid_records_after_it() {
    let (dir, bytes, watermark, records) = synced_then_unsynced();
    let page = (watermark as usize).div_ceil(4096) * 4096 + 4096;
    assert!(
        page + 3 * 4096 < bytes.len(),
        "valid records follow the hole"
    );
    let cut_at = zero_page(dir.path(), &bytes, page, &records);
    let store = Store::open(dir.path(), quiet_options()).unwrap();
    let report = &store.recovery()[0];
    assert_eq!(report.durable_watermark, Some(watermark));
    assert_eq!(report.truncated_bytes, (bytes.len() - cut_at) as u64);
    for (start, key) in &records {
        let found = store.get("c", key).unwrap();
        assert_eq!(found.is_some(), *start < cut_at, "record at {start}");
    }
    assert_eq!(
        std::fs::metadata(dir.path().join("c.dhrt")).unwrap().len(),
        cut_at as u64
    );
    // Writes go on after the cut, and the log reopens cleanly.
    store.set("c", b"after", b"x").unwrap();
    drop(store);
    let store = Store::open(dir.path(), quiet_options()).unwrap();
    assert_eq!(store.recovery()[0].truncated_bytes, 0);
    assert!(store.get("c", b"after").unwrap().is_some());
}

#[test]
fn the_same_damage_below_the_watermark_is_refused_and_the_file_left_alone() {
    let (dir, bytes, _, records) = synced_then_unsynced();
    // The whole log was synced: say so, as the clean close did.
    std::fs::write(
        dir.path().join("c.dhrt.durable"),
        durable_file(bytes.len() as u64),
    )
    .unwrap();
    let page = 8192;
    let damaged = zero_page(dir.path(), &bytes, page, &records);
    let on_disk = std::fs::read(dir.path().join("c.dhrt")).unwrap();
    match Store::open(dir.path(), quiet_options()) {
        Err(Error::Corrupt { offset, .. }) => assert_eq!(offset, damaged as u64),
        other => panic!("expected Corrupt, got {other:?}"),
    }
    assert_eq!(std::fs::read(dir.path().join("c.dhrt")).unwrap(), on_disk);
    // A log cut short of its watermark lost durable bytes too.
    std::fs::write(dir.path().join("c.dhrt"), &bytes[..records[100].0]).unwrap();
    match Store::open(dir.path(), quiet_options()) {
        Err(Error::Corrupt { offset, .. }) => assert_eq!(offset, records[100].0 as u64),
        other => panic!("expected Corrupt, got {other:?}"),
    }
}

/// Records past the watermark that a crash left whole are served from the
/// next opening on, so that opening makes them durable and says so: damage
/// to them afterwards is refused like any other, never cut as a tail lost
/// in a crash (which dropped writes a client was answered for, without a
/// word, even after a clean stop, until a new write moved the watermark).
#[test]
fn records_that_survived_a_crash_are_made_durable_by_the_next_opening() {
    let (dir, bytes, watermark, records) = synced_then_unsynced();
    assert!((watermark as usize) < bytes.len());
    let store = Store::open(dir.path(), quiet_options()).unwrap();
    assert_eq!(store.recovery()[0].durable_watermark, Some(watermark));
    assert_eq!(store.recovery()[0].truncated_bytes, 0);
    assert_eq!(watermark_of(dir.path()), bytes.len() as u64);
    drop(store);
    // No write since: the watermark still covers every record.
    assert_eq!(watermark_of(dir.path()), bytes.len() as u64);
    let last = records.last().unwrap().0;
    let on_disk = {
        let mut b = bytes.clone();
        b[last + 45] ^= 0x10;
        b
    };
    std::fs::write(dir.path().join("c.dhrt"), &on_disk).unwrap();
    match Store::open(dir.path(), quiet_options()) {
        Err(Error::Corrupt { offset, .. }) => assert_eq!(offset, last as u64),
        other => panic!("expected Corrupt, got {other:?}"),
    }
    assert_eq!(std::fs::read(dir.path().join("c.dhrt")).unwrap(), on_disk);
}

/// The bytes of a watermark file recording `offset`.
fn durable_file(offset: u64) -> Vec<u8> {
    let mut b = b"DHRTDUR\0".to_vec();
    b.extend_from_slice(&offset.to_le_bytes());
    let crc = crc32c_of(&b);
    b.extend_from_slice(&crc.to_le_bytes());
    b.extend_from_slice(&[0; 4]);
    b
}

/// CRC32C (Castagnoli), bit by bit: tests do not depend on the crc crate.
fn crc32c_of(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in bytes {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0x82F6_3B78
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

#[test]
fn the_watermark_follows_syncs_compaction_and_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), quiet_options()).unwrap();
    store.set("c", b"k", b"v0").unwrap();
    // A new collection's watermark covers its header only.
    assert_eq!(watermark_of(dir.path()), 32);
    for i in 0..300u32 {
        store.set("c", b"k", &i.to_le_bytes()).unwrap();
        store
            .set("c", format!("other{i}").as_bytes(), b"x")
            .unwrap();
    }
    store.sync().unwrap();
    let before = store.stats().collections[0].bytes;
    assert_eq!(watermark_of(dir.path()), before);
    // Compaction shrinks the file below the old watermark; the watermark
    // follows it, so the reopen is not refused as "ends before its
    // watermark".
    let report = store.compact("c").unwrap();
    assert!(report.bytes_after < before);
    assert_eq!(watermark_of(dir.path()), report.bytes_after);
    // Syncs of the new file raise it again.
    store.set("c", b"k", b"last").unwrap();
    store.sync().unwrap();
    let len = store.stats().collections[0].bytes;
    assert_eq!(watermark_of(dir.path()), len);
    drop(store);
    let store = Store::open(dir.path(), quiet_options()).unwrap();
    assert_eq!(store.recovery()[0].durable_watermark, Some(len));
    assert_eq!(store.get("c", b"k").unwrap().as_deref(), Some(&b"last"[..]));
    assert_eq!(store.scan("c").unwrap().count(), 301);
}

#[test]
fn a_log_from_before_watermarks_is_trusted_whole_and_given_one() {
    let src = tempfile::tempdir().unwrap();
    let (bytes, starts) = three_records(src.path());
    // A corrupt middle with no watermark is refused, as before.
    let mut bad = bytes.clone();
    bad[starts[1] + 40] ^= 1;
    assert!(matches!(open_with(&bad).1, Err(Error::Corrupt { .. })));
    let (dir, store) = open_with(&bytes);
    let store = store.unwrap();
    assert_eq!(store.recovery()[0].durable_watermark, None);
    assert_eq!(watermark_of(dir.path()), bytes.len() as u64);
}

/// A byte of a log's header changed (bit rot, a stray write) while every
/// record after it is sound: the node opens, rebuilds the header from what
/// can be trusted, and keeps every record. A watch position from before
/// resumes exactly where the header's history and purge mark came through
/// intact, and is refused as gone (a snapshot is needed) where they could
/// not be confirmed: never resumed wrongly. The next opening is clean.
#[test]
fn a_damaged_header_over_a_sound_log_is_rebuilt_and_nothing_is_lost() {
    use dhrt_storage::{Position, WatchEvent, WatchFrom};
    let src = tempfile::tempdir().unwrap();
    let store = Store::open(src.path(), quiet_options()).unwrap();
    store.set("c", KEYS[0], b"first-value").unwrap();
    let at: Position = store.watch("c", WatchFrom::Now, None).unwrap().position();
    store.set("c", KEYS[1], b"second-value").unwrap();
    store.set("c", KEYS[2], b"third-value").unwrap();
    drop(store);
    let bytes = std::fs::read(src.path().join("c.dhrt")).unwrap();
    let watermark = std::fs::read(src.path().join("c.dhrt.durable")).unwrap();
    for byte in 0..32 {
        let dir = tempfile::tempdir().unwrap();
        let mut damaged = bytes.clone();
        damaged[byte] ^= 0x04;
        std::fs::write(dir.path().join("c.dhrt"), &damaged).unwrap();
        std::fs::write(dir.path().join("c.dhrt.durable"), &watermark).unwrap();
        let store = Store::open(dir.path(), quiet_options())
            .unwrap_or_else(|e| panic!("byte {byte} of the header: {e}"));
        let report = &store.recovery()[0];
        assert!(report.header_rebuilt.is_some(), "byte {byte}");
        assert_eq!(report.records, 3, "byte {byte}");
        for key in KEYS {
            assert_eq!(
                store.get("c", key).unwrap().as_deref(),
                Some(&[key, b"-value"].concat()[..]),
                "byte {byte}"
            );
        }
        match store.watch("c", WatchFrom::After(at), None) {
            Ok(mut w) => {
                // Only where nothing but the fixed bytes was damaged.
                assert!(byte < 12, "byte {byte}: resumed from an unconfirmed header");
                let keys: Vec<Vec<u8>> = w
                    .poll(1024)
                    .unwrap()
                    .into_iter()
                    .filter_map(|e| match e {
                        WatchEvent::Change(c) => Some(c.key.to_vec()),
                        _ => None,
                    })
                    .collect();
                assert_eq!(keys, vec![KEYS[1].to_vec(), KEYS[2].to_vec()]);
            }
            Err(e) => {
                assert!(matches!(e, Error::ResumeGone { .. }), "byte {byte}: {e}");
                assert!(byte >= 12, "byte {byte}: an exact header refused a resume");
            }
        }
        // Positions taken from now on resume, across a clean reopening.
        let now = store.watch("c", WatchFrom::Now, None).unwrap().position();
        store.set("c", b"later", b"x").unwrap();
        drop(store);
        let store = Store::open(dir.path(), quiet_options()).unwrap();
        assert_eq!(store.recovery()[0].header_rebuilt, None, "byte {byte}");
        let mut w = store.watch("c", WatchFrom::After(now), None).unwrap();
        assert_eq!(w.poll(1024).unwrap().len(), 1, "byte {byte}");
        assert_eq!(
            store.get("c", KEYS[0]).unwrap().as_deref(),
            Some(&b"first-value"[..])
        );
    }
    // Damage that reaches the first record too is not a header's alone:
    // refused, and the file left as it is.
    let mut damaged = bytes.clone();
    damaged[13] ^= 1;
    damaged[40] ^= 1;
    let (dir, opened) = open_with(&damaged);
    assert!(matches!(opened, Err(Error::BadHeader { .. })));
    assert_eq!(std::fs::read(dir.path().join("c.dhrt")).unwrap(), damaged);
}
