//! Releasing a collection: the copy leaves the store (files and all) only
//! if nothing was written since its digest was taken, and no write racing
//! the release is lost.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use dhrt_storage::Store;

use crate::{both_modes, quiet_options};

#[test]
fn a_released_collection_leaves_no_trace_and_can_be_written_anew() {
    let dir = tempfile::tempdir().unwrap();
    for store in both_modes(dir.path(), quiet_options()) {
        store.set("moving", b"a", b"1").unwrap();
        store.set("staying", b"a", b"1").unwrap();
        let digest = store.digest("moving").unwrap();
        store.set("moving", b"b", b"2").unwrap();
        // Written since: kept.
        assert!(!store.release("moving", &digest).unwrap());
        assert_eq!(
            store.get("moving", b"a").unwrap().as_deref(),
            Some(&b"1"[..])
        );
        let digest = store.digest("moving").unwrap();
        assert!(store.release("moving", &digest).unwrap());
        assert!(!store.all_collections().contains(&"moving".to_string()));
        assert_eq!(store.get("moving", b"a").unwrap(), None);
        assert!(
            !store.release("moving", &digest).unwrap(),
            "nothing left to release"
        );
        assert_eq!(
            store.get("staying", b"a").unwrap().as_deref(),
            Some(&b"1"[..])
        );
        if store.dir().is_some() {
            assert!(!dir.path().join("moving.dhrt").exists());
            assert!(!dir.path().join("moving.dhrt.durable").exists());
        }
        // A write afterwards starts a new, empty copy.
        store.set("moving", b"c", b"3").unwrap();
        assert_eq!(store.get("moving", b"a").unwrap(), None);
        assert_eq!(
            store.get("moving", b"c").unwrap().as_deref(),
            Some(&b"3"[..])
        );
    }
    // Reopened: the released copy does not come back; the new one does.
    let store = Store::open(dir.path(), quiet_options()).unwrap();
    assert_eq!(store.get("moving", b"a").unwrap(), None);
    assert_eq!(
        store.get("moving", b"c").unwrap().as_deref(),
        Some(&b"3"[..])
    );
}

/// Writers race releases: every write a writer saw succeed is either in the
/// store afterwards or was in a copy whose digest the releaser had checked
/// (so the releaser knew of it). Here the releaser only releases a digest
/// it took, and records which writes that digest covered.
#[test]
fn a_write_racing_a_release_is_never_lost() {
    let dir = tempfile::tempdir().unwrap();
    for store in both_modes(dir.path(), quiet_options()) {
        let store = Arc::new(store);
        let done = Arc::new(AtomicBool::new(false));
        let written = Arc::new(AtomicU64::new(0));
        let released = Arc::new(AtomicBool::new(false));
        let writer = {
            let (store, done, written, released) = (
                store.clone(),
                done.clone(),
                written.clone(),
                released.clone(),
            );
            std::thread::spawn(move || {
                // 2,000 writes, and more until a release went through (on
                // a busy machine the first quiet moments may all be lost).
                let mut i = 0u64;
                while i < 2000 || (!released.load(Ordering::Acquire) && i < 200_000) {
                    store.set("c", format!("k{i}").as_bytes(), b"v").unwrap();
                    written.store(i + 1, Ordering::Release);
                    if i.is_multiple_of(50) {
                        // Quiet moments, in which a release can go through.
                        std::thread::sleep(std::time::Duration::from_millis(1));
                    }
                    i += 1;
                }
                done.store(true, Ordering::Release);
                i
            })
        };
        // The releaser: a digest, then the keys it covers read back, then a
        // release of that digest. Released keys are "handed over".
        let mut handed_over = std::collections::HashSet::new();
        let mut releases = 0;
        while !done.load(Ordering::Acquire) {
            let before = written.load(Ordering::Acquire);
            let digest = store.digest("c").unwrap();
            let held: Vec<u64> = (0..before + 64)
                .filter(|i| {
                    store
                        .get("c", format!("k{i}").as_bytes())
                        .unwrap()
                        .is_some()
                })
                .collect();
            if store.digest("c").unwrap() != digest {
                continue;
            }
            if store.release("c", &digest).unwrap() {
                releases += 1;
                released.store(true, Ordering::Release);
                handed_over.extend(held);
            }
        }
        let total = writer.join().unwrap();
        assert!(releases > 0, "no release went through");
        for i in 0..total {
            let here = store
                .get("c", format!("k{i}").as_bytes())
                .unwrap()
                .is_some();
            assert!(here || handed_over.contains(&i), "write k{i} was lost");
        }
    }
}
