//! A leave whose handover meets an owner it cannot reach, in simulated
//! time: the owner is alive to everyone (it answers the others, so SWIM's
//! indirect probes vouch for it), but the link between it and the leaving
//! node holds every message. Each request to it then waits out its whole
//! timeout; a leave must still end within its bounded handover, keeping
//! what that owner did not take in its data directory, and handing it to
//! a live member standing in for that owner.

use std::net::{IpAddr, Ipv4Addr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use dhrt_cluster::{BinaryLimits, Cluster, ClusterOptions, Identity, Node, Replicas, serve_binary};
use dhrt_proto::Operations;
use dhrt_storage::{Options, Store};
use tokio::sync::Notify;

use crate::sim::{PORT, SimConnector};

const COLLECTIONS: usize = 60;
/// The most a leave may take: the handover's 30 s, the wait for queued
/// writes (2 s), the goodbye (1 s) and the last round after it (5 s).
const LEAVE_BOUND: Duration = Duration::from_secs(40);

#[derive(Clone, Default)]
struct World {
    stores: Arc<Mutex<Vec<Store>>>,
    leave: Arc<Notify>,
    /// How long n3's leave took, once it is over.
    left_after: Arc<Mutex<Option<Duration>>>,
    written: Arc<AtomicBool>,
}

fn addr(i: u64) -> String {
    format!("n{i}:{PORT}")
}

async fn run_node(world: World, i: u64, seeds: Vec<String>) -> turmoil::Result {
    let listener =
        turmoil::net::TcpListener::bind((IpAddr::V4(Ipv4Addr::UNSPECIFIED), PORT)).await?;
    let store = world.stores.lock().unwrap()[i as usize - 1].clone();
    let options = ClusterOptions {
        seeds,
        connector: Arc::new(SimConnector),
        rng_seed: Some(i),
        replicas: Replicas::N(1),
        ..ClusterOptions::default()
    };
    let identity = Identity {
        id: i,
        name: format!("n{i}"),
        addr: addr(i),
    };
    let cluster = Cluster::new(store, identity, options);
    let node = Arc::new(Node::new(cluster.clone()));
    cluster.start();
    if i == 3 {
        let (node, world) = (node.clone(), world.clone());
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(2)).await;
            for c in 0..COLLECTIONS {
                node.set(&format!("c{c}"), b"k", Bytes::from_static(b"v"))
                    .await
                    .expect("a write before the hold");
            }
            world.written.store(true, Ordering::Release);
        });
    }
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, remote) = accepted?;
                let node = node.clone();
                tokio::spawn(async move {
                    let _ = serve_binary(stream, remote, node, BinaryLimits::default(), std::future::pending(), dhrt_proto::Proven::ignored()).await;
                });
            }
            () = world.leave.notified(), if i == 3 => {
                let started = tokio::time::Instant::now();
                cluster.leave().await;
                *world.left_after.lock().unwrap() = Some(started.elapsed());
                return Ok(());
            }
        }
    }
}

#[test]
fn a_leave_ends_in_bounded_time_when_an_owner_never_answers_it() {
    let mut sim = turmoil::Builder::new()
        .rng_seed(7)
        .simulation_duration(Duration::from_secs(600))
        .tick_duration(Duration::from_millis(5))
        .build();
    let world = World::default();
    for i in 1..=3 {
        world.stores.lock().unwrap().push(Store::memory(Options {
            node_id: i,
            ..Options::default()
        }));
    }
    for i in 1..=3u64 {
        let world = world.clone();
        let seeds = if i == 1 { Vec::new() } else { vec![addr(1)] };
        sim.host(format!("n{i}"), move || {
            run_node(world.clone(), i, seeds.clone())
        });
    }
    while !world.written.load(Ordering::Acquire) {
        assert!(
            sim.elapsed() < Duration::from_secs(20),
            "the writes never ended"
        );
        sim.step().unwrap();
    }
    let n3 = world.stores.lock().unwrap()[2].clone();
    let before: Vec<String> = n3
        .all_collections()
        .into_iter()
        .filter(|c| !c.starts_with('_'))
        .collect();
    let held = before.len();
    assert!(
        held >= 10,
        "n3 owns only {held} collections: too few to test"
    );
    // n1 and n3 hear nothing from each other from now on; n2 still talks
    // to both, so each stays alive in the other's eyes.
    sim.hold("n1", "n3");
    let until = sim.elapsed() + Duration::from_secs(3);
    while sim.elapsed() < until {
        sim.step().unwrap();
    }
    world.leave.notify_one();
    let asked = sim.elapsed();
    while world.left_after.lock().unwrap().is_none() {
        assert!(
            sim.elapsed() - asked < Duration::from_secs(590),
            "the leave never ended"
        );
        sim.step().unwrap();
    }
    let took = world.left_after.lock().unwrap().unwrap();
    let kept = n3
        .all_collections()
        .into_iter()
        .filter(|c| !c.starts_with('_'))
        .count();
    eprintln!("the leave took {took:?} (simulated); n3 kept {kept} of its {held} collections");
    assert!(
        took <= LEAVE_BOUND,
        "the leave took {took:?} (simulated), past its bound of {LEAVE_BOUND:?}"
    );
    // What n2 took was released here; what n1 could not take stays, and
    // n2 holds it too, standing in for n1 (it hands it on to n1, which
    // it can reach).
    assert!(
        kept > 0 && kept < held,
        "n3 kept {kept} of its {held} collections after leaving"
    );
    let n1 = world.stores.lock().unwrap()[0].clone();
    let n2 = world.stores.lock().unwrap()[1].clone();
    let after = n3.all_collections();
    for c in &before {
        if after.contains(c) {
            // On n2, standing in, or already handed on by it to n1.
            let live = [&n2, &n1]
                .iter()
                .any(|n| n.get(c, b"k").unwrap().as_deref() == Some(&b"v"[..]));
            assert!(live, "{c} is kept, and on no live member");
        } else {
            assert_eq!(
                n2.get(c, b"k").unwrap().as_deref(),
                Some(&b"v"[..]),
                "{c} was released by n3 and is not on n2"
            );
        }
    }
}
