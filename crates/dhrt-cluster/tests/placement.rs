//! A replication factor below `all`, in process over loopback TCP: each
//! collection is stored on exactly its owners, and reads and writes work
//! through every member, owner or not.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use dhrt_cluster::{BinaryLimits, Cluster, ClusterOptions, Identity, Node, Replicas, serve_binary};
use dhrt_proto::{MemberState, Operations};
use dhrt_storage::{Options, Store};

/// Starts a member on a loopback port, joined through `seeds`.
async fn member(i: u64, seeds: Vec<String>, replicas: Replicas) -> (Arc<Node>, String) {
    member_with(
        i,
        ClusterOptions {
            seeds,
            replicas,
            ..ClusterOptions::default()
        },
    )
    .await
}

/// Starts a member on a loopback port with these options.
async fn member_with(i: u64, options: ClusterOptions) -> (Arc<Node>, String) {
    member_on(i, Store::memory(Options::default()), options).await
}

/// Starts a member over `store` on a loopback port with these options.
pub(crate) async fn member_on(
    i: u64,
    store: Store,
    options: ClusterOptions,
) -> (Arc<Node>, String) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let cluster = Cluster::new(
        store,
        Identity {
            id: 0x1000 + i,
            name: format!("n{i}"),
            addr: addr.clone(),
        },
        options,
    );
    let node = Arc::new(Node::new(cluster.clone()));
    cluster.start();
    let serving = node.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, remote)) = listener.accept().await else {
                return;
            };
            let node = serving.clone();
            tokio::spawn(async move {
                let _ = serve_binary(
                    stream,
                    remote,
                    node,
                    BinaryLimits::default(),
                    std::future::pending(),
                    dhrt_proto::Proven::ignored(),
                )
                .await;
            });
        }
    });
    (node, addr)
}

pub(crate) async fn all_healthy(nodes: &[Arc<Node>]) {
    for _ in 0..200 {
        let settled = nodes.iter().all(|n| {
            let members = n.cluster().members();
            members.len() == nodes.len() && members.iter().all(|m| m.state == MemberState::Healthy)
        });
        if settled {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("the members never all saw each other healthy");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_collection_lives_on_its_owners_and_answers_through_every_member() {
    let replicas = Replicas::N(2);
    let (first, seed) = member(0, Vec::new(), replicas).await;
    let mut nodes = vec![first];
    for i in 1..5 {
        nodes.push(member(i, vec![seed.clone()], replicas).await.0);
    }
    all_healthy(&nodes).await;

    let collections: Vec<String> = (0..24).map(|c| format!("c{c}")).collect();
    for (c, name) in collections.iter().enumerate() {
        for k in 0..5 {
            // Through every member in turn, owners or not.
            let node = &nodes[(c + k) % nodes.len()];
            node.set(
                name,
                format!("k{k}").as_bytes(),
                Bytes::from(format!("{name}/{k}")),
            )
            .await
            .unwrap();
        }
    }
    let mut stored_on = vec![0usize; nodes.len()];
    for name in &collections {
        let holders: BTreeSet<usize> = (0..nodes.len())
            .filter(|&i| nodes[i].store().has_keys(name))
            .collect();
        assert_eq!(holders.len(), 2, "{name} is on {holders:?}");
        for &i in &holders {
            stored_on[i] += 1;
            assert_eq!(
                nodes[i]
                    .store()
                    .stats()
                    .collections
                    .iter()
                    .find(|s| &s.name == name)
                    .unwrap()
                    .keys,
                5
            );
        }
        for (i, node) in nodes.iter().enumerate() {
            for k in 0..5 {
                let got = node.get(name, format!("k{k}").as_bytes()).await.unwrap();
                assert_eq!(
                    got.as_deref(),
                    Some(format!("{name}/{k}").as_bytes()),
                    "{name}/k{k} through n{i}"
                );
            }
        }
        // A member that does not own it lists an owner's copy.
        let outsider = (0..nodes.len()).find(|i| !holders.contains(i)).unwrap();
        let page = nodes[outsider].list(name, None, 100).await.unwrap();
        let keys: Vec<&[u8]> = page.entries.iter().map(|e| &e.key[..]).collect();
        assert_eq!(keys.len(), 5, "{name} listed through n{outsider}");
        // A delete through a member that does not own it reaches the
        // owners, and leaves no copy on that member: it is no replica.
        assert!(nodes[outsider].delete(name, b"k0").await.unwrap());
        for &i in &holders {
            assert_eq!(
                nodes[i].store().get(name, b"k0").unwrap(),
                None,
                "{name} on n{i}"
            );
        }
        assert!(
            !nodes[outsider].store().all_collections().contains(name),
            "{name} on n{outsider}"
        );
    }
    // 24 collections on 2 of 5 members each: every member holds some.
    assert!(stored_on.iter().all(|&n| n > 0), "{stored_on:?}");
    assert_eq!(stored_on.iter().sum::<usize>(), 48);
}

/// A collection no member hosts is kept by the members its writes went
/// through, and read and listed through every member: a read that misses
/// asks every live member, and a listing with no owner to ask merges
/// every member's pages.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_collection_no_member_hosts_is_read_and_listed_through_every_member() {
    let only_a = |seeds: Vec<String>| ClusterOptions {
        seeds,
        collections: Some(vec!["a".to_string()]),
        ..ClusterOptions::default()
    };
    let (n0, seed) = member_with(0, only_a(Vec::new())).await;
    let (n1, _) = member_with(1, only_a(vec![seed])).await;
    let nodes = [n0, n1];
    all_healthy(&nodes).await;
    // Keys b/k0..k9 through n1, b/k10..k19 through n0.
    for i in 0..20 {
        let through = &nodes[usize::from(i < 10)];
        through
            .set(
                "b",
                format!("k{i}").as_bytes(),
                Bytes::from(format!("v{i}")),
            )
            .await
            .unwrap();
    }
    assert!(nodes[1].store().has_keys("b") && nodes[0].store().has_keys("b"));
    for (n, node) in nodes.iter().enumerate() {
        for i in 0..20 {
            let got = node.get("b", format!("k{i}").as_bytes()).await.unwrap();
            assert_eq!(
                got.as_deref(),
                Some(format!("v{i}").as_bytes()),
                "k{i} through n{n}"
            );
        }
        assert_eq!(node.get("b", b"missing").await.unwrap(), None);
        for limit in [3, 100] {
            let mut keys = Vec::new();
            let mut after: Option<Bytes> = None;
            loop {
                let page = node.list("b", after.as_deref(), limit).await.unwrap();
                keys.extend(page.entries.iter().map(|e| e.key.clone()));
                match page.next {
                    Some(next) => after = Some(next),
                    None => break,
                }
            }
            let mut sorted = keys.clone();
            sorted.sort();
            sorted.dedup();
            assert_eq!(sorted.len(), 20, "through n{n}, limit {limit}: {keys:?}");
            assert_eq!(keys.len(), 20, "each key once, through n{n}");
        }
    }
    // k0 and k1 were written through n1; n0 deletes one and overwrites the
    // other. A listing through either shows what a get does, and a page
    // whose keys were all deleted is skipped, never answered empty (which
    // ends a listing).
    assert!(nodes[0].delete("b", b"k0").await.unwrap());
    nodes[0]
        .set("b", b"k1", Bytes::from_static(b"newer"))
        .await
        .unwrap();
    for (n, node) in nodes.iter().enumerate() {
        assert_eq!(node.get("b", b"k0").await.unwrap(), None, "through n{n}");
        for limit in [1, 3, 100] {
            let mut listed = Vec::new();
            let mut after: Option<Bytes> = None;
            loop {
                let page = node.list("b", after.as_deref(), limit).await.unwrap();
                assert!(
                    !page.entries.is_empty() || page.next.is_none(),
                    "an empty page before the end, through n{n}"
                );
                listed.extend(
                    page.entries
                        .iter()
                        .map(|e| (e.key.clone(), e.value.clone())),
                );
                match page.next {
                    Some(next) => after = Some(next),
                    None => break,
                }
            }
            assert_eq!(listed.len(), 19, "through n{n}, limit {limit}: {listed:?}");
            assert!(listed.iter().all(|(k, _)| &k[..] != b"k0"));
            let k1 = listed.iter().find(|(k, _)| &k[..] == b"k1").unwrap();
            assert_eq!(&k1.1[..], b"newer", "through n{n}");
        }
    }
}

/// Which members hold a copy of `name`.
fn holders(nodes: &[Arc<Node>], name: &str) -> BTreeSet<u64> {
    nodes
        .iter()
        .filter(|n| n.store().has_keys(name))
        .map(|n| n.cluster().id())
        .collect()
}

/// Waits until every collection is held by exactly the owners every member
/// agrees on, then checks every key through every member.
async fn settled(nodes: &[Arc<Node>], collections: &[String], keys: usize) {
    let mut last = String::new();
    for _ in 0..300 {
        let wrong: Vec<String> = collections
            .iter()
            .filter_map(|name| {
                let owners: BTreeSet<u64> = nodes[0].cluster().owners(name).into_iter().collect();
                let agreed = nodes.iter().all(|n| {
                    n.cluster()
                        .owners(name)
                        .into_iter()
                        .collect::<BTreeSet<u64>>()
                        == owners
                });
                let held = holders(nodes, name);
                (!agreed || held != owners)
                    .then(|| format!("{name}: held by {held:x?}, owners {owners:x?}"))
            })
            .collect();
        if wrong.is_empty() {
            for (i, node) in nodes.iter().enumerate() {
                for name in collections {
                    for k in 0..keys {
                        let got = node.get(name, format!("k{k}").as_bytes()).await.unwrap();
                        assert_eq!(
                            got.as_deref(),
                            Some(format!("{name}/{k}").as_bytes()),
                            "{name}/k{k} through member {i}"
                        );
                    }
                }
            }
            return;
        }
        last = wrong.join("; ");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("copies never settled on their owners: {last}");
}

async fn write_all(nodes: &[Arc<Node>], collections: &[String], keys: usize) {
    for (c, name) in collections.iter().enumerate() {
        for k in 0..keys {
            let node = &nodes[(c + k) % nodes.len()];
            node.set(
                name,
                format!("k{k}").as_bytes(),
                Bytes::from(format!("{name}/{k}")),
            )
            .await
            .unwrap();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_joining_member_takes_only_the_collections_it_now_owns() {
    for replicas in [Replicas::N(2), Replicas::N(1)] {
        let (first, seed) = member(0, Vec::new(), replicas).await;
        let mut nodes = vec![first];
        for i in 1..4 {
            nodes.push(member(i, vec![seed.clone()], replicas).await.0);
        }
        all_healthy(&nodes).await;
        let collections: Vec<String> = (0..24).map(|c| format!("c{c}")).collect();
        write_all(&nodes, &collections, 5).await;
        settled(&nodes, &collections, 5).await;
        let before: Vec<BTreeSet<u64>> = collections.iter().map(|c| holders(&nodes, c)).collect();

        nodes.push(member(4, vec![seed.clone()], replicas).await.0);
        all_healthy(&nodes).await;
        let newcomer = nodes[4].cluster().id();
        settled(&nodes, &collections, 5).await;
        let mut moved = 0;
        for (c, name) in collections.iter().enumerate() {
            let after = holders(&nodes, name);
            if after.contains(&newcomer) {
                moved += 1;
                // The newcomer took one owner's place, no more.
                assert_eq!(after.difference(&before[c]).count(), 1, "{name}");
            } else {
                assert_eq!(after, before[c], "{name} moved without the newcomer");
            }
        }
        assert!(moved > 0, "{replicas}: the newcomer owns nothing");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leaving_member_hands_its_collections_over_first() {
    let replicas = Replicas::N(1);
    let (first, seed) = member(0, Vec::new(), replicas).await;
    let mut nodes = vec![first];
    for i in 1..4 {
        nodes.push(member(i, vec![seed.clone()], replicas).await.0);
    }
    all_healthy(&nodes).await;
    let collections: Vec<String> = (0..24).map(|c| format!("c{c}")).collect();
    write_all(&nodes, &collections, 5).await;
    settled(&nodes, &collections, 5).await;
    let leaver = nodes.pop().unwrap();
    let had = collections
        .iter()
        .filter(|c| leaver.store().has_keys(c))
        .count();
    assert!(had > 0, "the leaver owned nothing");
    leaver.cluster().leave().await;
    // With one replica, what the leaver held lived nowhere else: it is on
    // the others now, or the leave lost it.
    settled(&nodes, &collections, 5).await;
}
