//! The node facade over a real store.

use bytes::Bytes;
use dhrt_cluster::{Cluster, Identity, Node};
use dhrt_proto::{ErrorKind, Operations};
use dhrt_storage::{Options, Store};

pub(crate) fn node() -> Node {
    Node::new(Cluster::single(
        Store::memory(Options::default()),
        Identity {
            id: 0xabc,
            name: "n1".into(),
            addr: "127.0.0.1:7453".into(),
        },
    ))
}

/// `--max-value-bytes`: a client's value over the node's maximum is
/// refused (TooLarge), alone or in a batch (then nothing of the batch is
/// written); a value replicated from a peer is stored up to the most any
/// node stores, so a member set lower than the others still holds every
/// write.
#[tokio::test]
async fn a_client_value_over_the_nodes_maximum_is_refused_a_peers_is_not() {
    let n = node().with_max_value(100);
    n.set("c", b"k", Bytes::from(vec![1u8; 100])).await.unwrap();
    let e = n
        .set("c", b"k", Bytes::from(vec![2u8; 101]))
        .await
        .unwrap_err();
    assert_eq!(e.kind, ErrorKind::TooLarge);
    assert!(e.message.contains("--max-value-bytes"), "{}", e.message);
    let e = n
        .set_many(
            "c",
            vec![
                (Bytes::from_static(b"a"), Bytes::from_static(b"small")),
                (Bytes::from_static(b"b"), Bytes::from(vec![3u8; 101])),
            ],
        )
        .await
        .unwrap_err();
    assert_eq!(e.kind, ErrorKind::TooLarge);
    assert_eq!(n.get("c", b"a").await.unwrap(), None);
    assert_eq!(n.get("c", b"k").await.unwrap().unwrap().len(), 100);
    let v = n.store().get_versioned("c", b"k").unwrap().unwrap().1;
    let newer = dhrt_storage::Version::new(v.ts + (1 << 20), v.node);
    assert!(
        n.store()
            .apply("c", b"k", Some(&[4u8; 5000]), newer)
            .unwrap()
    );
    assert_eq!(n.get("c", b"k").await.unwrap().unwrap().len(), 5000);
}

/// A write the node refuses registers nothing: not a name that is no
/// collection, not one with a bad key (whose registry entry would turn the
/// short route `/NAME` to the key NAME of `default` into an empty
/// collection's), not one past `--max-collections`. Before, each such
/// write added its name to `_collections`, replicated to every member,
/// without bound.
#[tokio::test]
async fn a_refused_write_registers_no_collection() {
    let store = Store::memory(Options {
        max_collections: 2,
        ..Options::default()
    });
    let options = dhrt_cluster::ClusterOptions {
        replicas: dhrt_cluster::Replicas::N(1),
        ..Default::default()
    };
    let identity = Identity {
        id: 0xabc,
        name: "n1".into(),
        addr: "127.0.0.1:7453".into(),
    };
    let n = Node::new(Cluster::new(store.clone(), identity, options));
    let v = || Bytes::from_static(b"v");
    n.set("default", b"report", v()).await.unwrap();
    for name in ["a/b", "..", "sp ace", "nul\0", &"x".repeat(65)] {
        let e = n.set(name, b"k", v()).await.unwrap_err();
        assert_eq!(e.kind, ErrorKind::InvalidInput, "{name:?}: {}", e.message);
        let e = n
            .set_many(name, vec![(Bytes::from_static(b"k"), v())])
            .await
            .unwrap_err();
        assert_eq!(e.kind, ErrorKind::InvalidInput, "{name:?}: {}", e.message);
    }
    let e = n.set("report", b"", v()).await.unwrap_err();
    assert_eq!(e.kind, ErrorKind::InvalidInput, "{}", e.message);
    assert!(!n.has_collection("report"), "the short route is hijacked");
    // `default` and one more: the limit.
    n.set("c1", b"k", v()).await.unwrap();
    assert!(n.has_collection("c1"));
    let e = n.set("c2", b"k", v()).await.unwrap_err();
    assert_eq!(e.kind, ErrorKind::Unavailable, "{}", e.message);
    assert!(!n.has_collection("c2"));
    let registered: Vec<String> = store
        .scan("_collections")
        .unwrap()
        .map(|(k, _)| String::from_utf8(k).unwrap())
        .collect();
    assert_eq!(registered, ["c1", "default"]);
}

#[tokio::test]
async fn operations_reach_the_store() {
    let n = node();
    n.set("c", b"k", Bytes::from_static(b"v")).await.unwrap();
    assert_eq!(n.get("c", b"k").await.unwrap().as_deref(), Some(&b"v"[..]));
    assert!(n.has_collection("c"));
    assert!(!n.has_collection("nope"));
    for i in 0..25u32 {
        n.set(
            "many",
            format!("k{i}").as_bytes(),
            Bytes::from(i.to_string()),
        )
        .await
        .unwrap();
    }
    let mut seen = Vec::new();
    let mut after: Option<Bytes> = None;
    loop {
        let page = n.list("many", after.as_deref(), 10).await.unwrap();
        seen.extend(page.entries.iter().map(|e| e.key.clone()));
        match page.next {
            Some(next) => after = Some(next),
            None => break,
        }
    }
    seen.sort();
    let mut want: Vec<Bytes> = (0..25).map(|i| Bytes::from(format!("k{i}"))).collect();
    want.sort();
    assert_eq!(seen, want);
    assert!(n.delete("c", b"k").await.unwrap());
    assert!(!n.delete("c", b"k").await.unwrap());
    let dropped = n.drop_collection("many").await.unwrap();
    assert_eq!(dropped.len(), 25);
    assert!(!n.has_collection("many"));
    let stats = n.stats().await;
    assert_eq!(stats.node.id, "0000000000000abc");
    assert_eq!(stats.node.mode, "memory");
    assert_eq!(stats.members.len(), 1);
}

#[tokio::test]
async fn bad_input_maps_to_the_right_error_kinds() {
    let n = node();
    let kind = |r: Result<(), dhrt_proto::OpError>| r.unwrap_err().kind;
    assert_eq!(
        kind(n.set("../x", b"k", Bytes::new()).await),
        ErrorKind::InvalidInput
    );
    assert_eq!(
        kind(n.set("_system", b"k", Bytes::new()).await),
        ErrorKind::InvalidInput
    );
    assert_eq!(
        kind(n.set("c", b"", Bytes::new()).await),
        ErrorKind::InvalidInput
    );
    assert_eq!(
        kind(
            n.set("c", b"k", Bytes::from(vec![0u8; (16 << 20) + 1]))
                .await
        ),
        ErrorKind::TooLarge
    );
    assert_eq!(
        n.get("a\0b", b"k").await.unwrap_err().kind,
        ErrorKind::InvalidInput
    );
    assert!(!n.has_collection("_system"));
}

/// A watch's place among the open ones goes with what `take_slot` hands
/// over (the connection): dropped, the watch no longer counts as open,
/// though its task, on a starved watch runtime, has not run since. Such
/// watches still read the log until it runs, so no more than twice
/// `max_watchers` of them, open or left, are let pile up in a churn.
#[tokio::test]
async fn watches_whose_clients_left_free_their_places_at_once_and_cannot_pile_up() {
    let starved = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let (hold, held) = std::sync::mpsc::channel::<()>();
    let (blocked_tx, blocked_rx) = std::sync::mpsc::channel::<()>();
    starved.spawn(async move {
        blocked_tx.send(()).unwrap();
        let _ = held.recv();
    });
    blocked_rx.recv().unwrap();
    let store = Store::memory(Options::default());
    store.set("c", b"k", b"v").unwrap();
    let hub = dhrt_cluster::WatchHub::new(
        store,
        dhrt_cluster::WatchOptions {
            max_watchers: 2,
            runtime: Some(starved.handle().clone()),
            ..Default::default()
        },
    );
    let request = dhrt_proto::WatchRequest {
        collection: "c".into(),
        prefix: None,
        start: dhrt_proto::WatchStart::Now,
    };
    let open = || hub.open(&request);
    // Two open: the limit.
    let mut a = open().unwrap();
    let mut b = open().unwrap();
    let e = open().err().unwrap();
    assert!(e.message.contains("2 watches open"), "{}", e.message);
    assert_eq!(hub.counts().watchers, 2);
    // Their clients leave: the places come back at once.
    drop((a.take_slot(), b.take_slot(), a, b));
    assert_eq!(hub.counts().watchers, 0);
    // Two more open and leave; then the starved tasks of four are too many.
    for _ in 0..2 {
        let mut w = open().unwrap();
        drop(w.take_slot());
    }
    let e = open().err().unwrap();
    assert_eq!(e.kind, ErrorKind::Unavailable);
    assert!(e.message.contains("still closing watches"), "{}", e.message);
    // Once the watch runtime runs, they end, and watches open again.
    drop(hold);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let w = loop {
        match open() {
            Ok(w) => break w,
            Err(e) => assert!(std::time::Instant::now() < deadline, "{}", e.message),
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    drop(w);
    starved.shutdown_background();
}

/// A watcher that fell behind and whose client left stops counting in the
/// stats' slowest lag at once, though its task, on a watch runtime that
/// does not run now, still holds its cursor (before, its lag was reported
/// until that task next ran: under a full CPU, for as long as the load).
#[test]
fn a_departed_watchers_lag_leaves_the_stats_with_its_client() {
    // A runtime that runs only while the test drives it.
    let watch_rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let store = Store::memory(Options::default());
    store.set("c", b"k", b"v").unwrap();
    let hub = dhrt_cluster::WatchHub::new(
        store.clone(),
        dhrt_cluster::WatchOptions {
            batch_bytes: 1024,
            runtime: Some(watch_rt.handle().clone()),
            ..Default::default()
        },
    );
    let request = dhrt_proto::WatchRequest {
        collection: "c".into(),
        prefix: None,
        start: dhrt_proto::WatchStart::Now,
    };
    let write = || {
        for i in 0..200 {
            store
                .set("c", format!("k{i}").as_bytes(), &[7; 100])
                .unwrap();
        }
    };
    let mut w = watch_rt.block_on(async { hub.open(&request) }).unwrap();
    write();
    // One batch read, and the next read ahead: the rest is left unread.
    let first = watch_rt.block_on(w.next_batch()).unwrap();
    assert!(!first.is_empty());
    watch_rt.block_on(async { tokio::time::sleep(std::time::Duration::from_millis(50)).await });
    let lag = hub.counts().slowest_lag_bytes;
    assert!(lag > 0, "a watcher behind shows its lag");
    assert_eq!(hub.counts().watchers, 1);
    // Its client leaves; the watch runtime does not run meanwhile.
    drop(w);
    let after = hub.counts();
    assert_eq!(after.watchers, 0);
    assert_eq!(after.slowest_lag_bytes, 0, "was {lag} bytes");
    assert_eq!(after.slowest_lag_ms, 0);
    // A new watcher's lag counts again.
    let mut again = watch_rt.block_on(async { hub.open(&request) }).unwrap();
    write();
    watch_rt.block_on(again.next_batch()).unwrap();
    watch_rt.block_on(async { tokio::time::sleep(std::time::Duration::from_millis(50)).await });
    assert!(hub.counts().slowest_lag_bytes > 0);
}

/// A watch opened through the node (the relay, the wrapper that ends it
/// once the collection moves away) still hands over its place among the
/// open watches, for its connection to hold: given back, the watch stops
/// counting, though it is not dropped yet.
#[tokio::test]
async fn a_watch_opened_through_the_node_hands_its_place_to_the_connection() {
    let n = node();
    n.set("c", b"k", Bytes::from_static(b"v")).await.unwrap();
    let mut w = n
        .watch(dhrt_proto::WatchRequest {
            collection: "c".into(),
            start: dhrt_proto::WatchStart::Now,
            prefix: None,
        })
        .await
        .unwrap();
    assert_eq!(n.stats().await.watch.watchers, 1);
    let slot = w.take_slot().expect("no place handed over");
    assert!(w.take_slot().is_none(), "handed over twice");
    drop(slot);
    assert_eq!(n.stats().await.watch.watchers, 0);
    drop(w);
}
