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
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let cluster = Cluster::new(
        Store::memory(Options::default()),
        Identity {
            id: 0x1000 + i,
            name: format!("n{i}"),
            addr: addr.clone(),
        },
        ClusterOptions {
            seeds,
            replicas,
            ..ClusterOptions::default()
        },
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
                )
                .await;
            });
        }
    });
    (node, addr)
}

async fn all_healthy(nodes: &[Arc<Node>]) {
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
        // A delete through a member that does not own it reaches the owners.
        let outsider = (0..nodes.len()).find(|i| !holders.contains(i)).unwrap();
        assert!(nodes[outsider].delete(name, b"k0").await.unwrap());
        for &i in &holders {
            assert_eq!(
                nodes[i].store().get(name, b"k0").unwrap(),
                None,
                "{name} on n{i}"
            );
        }
    }
    // 24 collections on 2 of 5 members each: every member holds some.
    assert!(stored_on.iter().all(|&n| n > 0), "{stored_on:?}");
    assert_eq!(stored_on.iter().sum::<usize>(), 48);
}
