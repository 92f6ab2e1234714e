//! A node holding more collections than one page of digests, in process
//! over loopback TCP: a newcomer's handoff takes every collection, and
//! anti-entropy repairs a difference in any page, both ways.

use std::time::Duration;

use dhrt_cluster::{ClusterOptions, Replicas};
use dhrt_proto::Operations;
use dhrt_storage::{Options, Store};

use crate::placement::{all_healthy, member_on};

/// Collections of one key each: about a KiB of digest each, so the
/// digests take three pages.
const COLLECTIONS: usize = 2200;

fn name(i: usize) -> String {
    format!("c{i:05}")
}

/// Waits until `store` holds `key` in `collection`.
async fn holds(store: &Store, collection: &str, key: &[u8]) -> bool {
    for _ in 0..300 {
        if store.get(collection, key).is_ok_and(|v| v.is_some()) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_page_of_digests_is_handed_off_and_repaired() {
    let options = |seeds: Vec<String>| ClusterOptions {
        seeds,
        replicas: Replicas::All,
        anti_entropy_every: Duration::from_millis(300),
        ..ClusterOptions::default()
    };
    // The first node holds every collection before it starts.
    let first = Store::memory(Options::default());
    for i in 0..COLLECTIONS {
        first.set(&name(i), b"k", b"v").unwrap();
    }
    let (a, addr) = member_on(1, first.clone(), options(Vec::new())).await;
    let second = Store::memory(Options::default());
    let (b, _) = member_on(2, second.clone(), options(vec![addr])).await;
    all_healthy(&[a.clone(), b.clone()]).await;

    // The handoff read every page.
    let last = name(COLLECTIONS - 1);
    assert!(holds(&second, &last, b"k").await, "{last} never arrived");
    assert_eq!(second.all_collections().len(), COLLECTIONS);

    // Written behind replication's back, in the first, middle and last
    // pages, on either side: anti-entropy finds each.
    for i in [3, COLLECTIONS / 2, COLLECTIONS - 2] {
        first.set(&name(i), b"only-first", b"1").unwrap();
        second.set(&name(i + 1), b"only-second", b"2").unwrap();
    }
    for i in [3, COLLECTIONS / 2, COLLECTIONS - 2] {
        assert!(holds(&second, &name(i), b"only-first").await, "{}", name(i));
        assert!(
            holds(&first, &name(i + 1), b"only-second").await,
            "{}",
            name(i + 1)
        );
    }
    // And through the nodes' own reads.
    let got = b.get(&name(COLLECTIONS - 2), b"only-first").await.unwrap();
    assert_eq!(got.as_deref(), Some(&b"1"[..]));
}
