//! Deterministic simulation of the whole data path: real `Cluster`s and
//! `Node`s (replication queues, write concern, hints, fan-out reads,
//! anti-entropy, handoff, re-sync, leave) over turmoil's simulated network,
//! in simulated time, one seed per run.
//!
//! The story, with its timing and victims drawn from the seed: four nodes
//! write concurrently through flaky links (now and then a value of several
//! MB, and one of 15 MB), one of them with its clock two hours ahead or
//! behind the others (it must refuse writes, and harm nothing), then a
//! two-way partition during
//! which a fifth node joins, a one-way partition, a crash and a restart on
//! the same store, and a graceful leave. Then the network heals and the
//! checks run on every node still in the cluster:
//!
//! - every digest is equal;
//! - every acknowledged write is there, or was overwritten by a newer
//!   version (no lost write, no undone delete);
//! - every value present was written by someone (no phantom), and a version
//!   seen is bound to the value written with it;
//! - every member sees every other as `healthy`, and the leaver as `left`;
//! - the node with the wrong clock, and only it, says it is skewed.
//!
//! A negative control runs the same stories with hints and anti-entropy
//! switched off: the checker must catch what they would have repaired.
//!
//! Reads run along the writes (local, or fanned out on a miss) and must
//! never return a value nobody wrote.
//!
//! A failing run prints its seed; `DHRT_SIM_SEED=<seed>` reruns it alone,
//! `DHRT_SIM_SEEDS=<n>` runs more of them. Versions come from the real wall
//! clock (the hybrid logical clock), so a rerun replays the same faults,
//! writes and schedule, while the version numbers themselves differ.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, Ipv4Addr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use dhrt_cluster::{
    BinaryLimits, Cluster, ClusterOptions, ConnectFuture, Connector, Identity, Node, PeerStream,
    serve_binary,
};
use dhrt_proto::{MemberState, Operations};
use dhrt_storage::{Options, Store, Version};
use rand::rngs::{SmallRng, StdRng};
use rand::{RngExt, SeedableRng};
use tokio::sync::Notify;

pub(crate) const PORT: u16 = 7453;
const COLLECTION: &str = "sim";
const KEYS: u32 = 4096;

/// Dials over turmoil's network.
#[derive(Debug)]
pub(crate) struct SimConnector;

impl Connector for SimConnector {
    fn connect<'a>(&'a self, addr: &'a str) -> ConnectFuture<'a> {
        Box::pin(async move {
            let s = turmoil::net::TcpStream::connect(addr).await?;
            Ok(Box::new(s) as Box<dyn PeerStream>)
        })
    }
}

/// One write a node acknowledged.
#[derive(Debug, Clone)]
struct Acked {
    node: String,
    key: u32,
    value: Option<Bytes>,
    version: Version,
}

/// What the story shares with the simulated hosts: their stores (the
/// "disks", which survive a crash), the current life of each node, the
/// writes, and the switches.
#[derive(Clone, Default)]
struct World {
    stores: Arc<Mutex<HashMap<String, Store>>>,
    nodes: Arc<Mutex<HashMap<String, Arc<Node>>>>,
    /// Every value ever attempted, per key (acknowledged or not).
    attempted: Arc<Mutex<HashMap<u32, Vec<Bytes>>>>,
    acked: Arc<Mutex<Vec<Acked>>>,
    /// Reads that returned a value nobody wrote.
    phantoms: Arc<Mutex<Vec<String>>>,
    writing: Arc<AtomicBool>,
    leave: Arc<Mutex<HashMap<String, Arc<Notify>>>>,
}

fn name(i: u64) -> String {
    format!("n{i}")
}

fn addr(i: u64) -> String {
    format!("n{i}:{PORT}")
}

/// One life of node `i`: listen, build the cluster over the node's store,
/// serve peers, and write while the story says so.
async fn run_node(
    world: World,
    i: u64,
    seeds: Vec<String>,
    seed: u64,
    repair: bool,
) -> turmoil::Result {
    let listener =
        turmoil::net::TcpListener::bind((IpAddr::V4(Ipv4Addr::UNSPECIFIED), PORT)).await?;
    let store = world.stores.lock().unwrap()[&name(i)].clone();
    let options = ClusterOptions {
        seeds,
        connector: Arc::new(SimConnector),
        rng_seed: Some(seed ^ i.wrapping_mul(0x9e37_79b9_7f4a_7c15)),
        repair,
        ..ClusterOptions::default()
    };
    let identity = Identity {
        id: i,
        name: name(i),
        addr: addr(i),
    };
    let cluster = Cluster::new(store, identity, options);
    let node = Arc::new(Node::new(cluster.clone()));
    cluster.start();
    world.nodes.lock().unwrap().insert(name(i), node.clone());
    let leave = world.leave.lock().unwrap()[&name(i)].clone();
    let stop = Arc::new(AtomicBool::new(false));
    tokio::spawn(workload(world.clone(), node.clone(), i, seed, stop.clone()));
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, remote) = accepted?;
                let node = node.clone();
                tokio::spawn(async move {
                    let _ = serve_binary(stream, remote, node, BinaryLimits::default(), std::future::pending(), dhrt_proto::Proven::ignored()).await;
                });
            }
            () = leave.notified() => {
                stop.store(true, Ordering::Release);
                cluster.leave().await;
                return Ok(());
            }
        }
    }
}

/// Sets and deletes random keys through the node, as a client would, and
/// records what was acknowledged with which version.
async fn workload(world: World, node: Arc<Node>, i: u64, seed: u64, stop: Arc<AtomicBool>) {
    let mut rng = SmallRng::seed_from_u64(seed ^ (i << 32) ^ turmoil::elapsed().as_millis() as u64);
    let mut n = 0u64;
    loop {
        tokio::time::sleep(Duration::from_millis(rng.random_range(20..120))).await;
        if stop.load(Ordering::Acquire) {
            return;
        }
        if !world.writing.load(Ordering::Acquire) {
            continue;
        }
        let key = rng.random_range(0..KEYS);
        let k = key.to_be_bytes();
        n += 1;
        if rng.random_bool(0.2) {
            // A key someone wrote, so that some reads miss locally (the
            // write has not arrived yet) and fan out.
            let key = {
                let attempted = world.attempted.lock().unwrap();
                let mut keys: Vec<u32> = attempted.keys().copied().collect();
                keys.sort_unstable();
                if keys.is_empty() {
                    continue;
                }
                keys[rng.random_range(0..keys.len())]
            };
            let k = key.to_be_bytes();
            if let Ok(Some(v)) = node.get(COLLECTION, &k).await {
                let known = world
                    .attempted
                    .lock()
                    .unwrap()
                    .get(&key)
                    .is_some_and(|vs| vs.contains(&v));
                if !known {
                    world
                        .phantoms
                        .lock()
                        .unwrap()
                        .push(format!("n{i} read {v:?} for key {key}"));
                }
            }
        } else if rng.random_bool(0.8) {
            let mut value = format!("n{i}@{}#{n}", turmoil::elapsed().as_millis()).into_bytes();
            // Now and then a value of several MB, and once one of 15 MB:
            // they must travel every path (frames are cut by bytes).
            let large = if i == 1 && n == 1 {
                15 << 20
            } else if rng.random_bool(0.005) {
                rng.random_range(1..6) << 20
            } else {
                0
            };
            value.resize(value.len() + large, b'.');
            let value = Bytes::from(value);
            world
                .attempted
                .lock()
                .unwrap()
                .entry(key)
                .or_default()
                .push(value.clone());
            if let Ok(version) = node.set_stamped(COLLECTION, &k, value.clone()).await {
                world.acked.lock().unwrap().push(Acked {
                    node: name(i),
                    key,
                    value: Some(value),
                    version,
                });
            }
        } else if let Ok((_, Some(version))) = node.delete_stamped(COLLECTION, &k).await {
            world.acked.lock().unwrap().push(Acked {
                node: name(i),
                key,
                value: None,
                version,
            });
        }
    }
}

/// Runs the simulation until `until` (simulated time).
fn run_until(sim: &mut turmoil::Sim<'_>, until: Duration) {
    while sim.elapsed() < until {
        sim.step().expect("a simulated host failed");
    }
}

fn secs(s: f64) -> Duration {
    Duration::from_secs_f64(s)
}

/// One seeded story; returns what went wrong, if anything. `repair: false`
/// switches hints and anti-entropy off (the negative control).
fn story(seed: u64, repair: bool) -> Result<(), String> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut sim = turmoil::Builder::new()
        .rng_seed(seed)
        .simulation_duration(Duration::from_secs(120))
        .tick_duration(Duration::from_millis(5))
        .min_message_latency(Duration::from_micros(200))
        .max_message_latency(Duration::from_millis(3))
        .build();
    let world = World::default();
    // One node's clock is two hours off, ahead or behind.
    let skewed = rng.random_range(2..=4u64);
    let skew_ms: i64 = if rng.random_bool(0.5) { 1 } else { -1 } * 7_200_000;
    for i in 1..=5 {
        let options = Options {
            node_id: i,
            clock_offset_ms: if i == skewed { skew_ms } else { 0 },
            ..Options::default()
        };
        world
            .stores
            .lock()
            .unwrap()
            .insert(name(i), Store::memory(options));
        world
            .leave
            .lock()
            .unwrap()
            .insert(name(i), Arc::new(Notify::new()));
    }
    // A node's first life joins through `seeds`; a restart lists every
    // other node, as a `dhrtd --node` configuration would.
    let host = |sim: &mut turmoil::Sim<'_>, i: u64, seeds: Vec<String>| {
        let world = world.clone();
        let lives = Arc::new(AtomicU64::new(0));
        sim.host(name(i), move || {
            let life = lives.fetch_add(1, Ordering::Relaxed);
            let seeds = if life == 0 {
                seeds.clone()
            } else {
                (1..=5).filter(|&j| j != i).map(addr).collect()
            };
            run_node(world.clone(), i, seeds, seed.wrapping_add(life), repair)
        });
    };

    // Four nodes: n1 first, the others join through it.
    host(&mut sim, 1, Vec::new());
    run_until(&mut sim, secs(0.2));
    for i in 2..=4 {
        host(&mut sim, i, vec![addr(1)]);
    }
    run_until(&mut sim, secs(1.5));
    world.writing.store(true, Ordering::Release);

    // Flaky links: random short outages on every link.
    sim.set_fail_rate(0.01);
    run_until(&mut sim, secs(4.0 + rng.random_range(0.0..1.0)));
    sim.set_fail_rate(0.0);
    for a in 1..=4 {
        for b in 1..=4 {
            if a < b {
                sim.repair(name(a), name(b));
            }
        }
    }

    // A two-way partition: one node alone against the other three, long
    // enough to be declared dead; a fifth node joins the majority meanwhile.
    let alone = rng.random_range(1..=4u64);
    let others: Vec<u64> = (1..=4).filter(|&i| i != alone).collect();
    for &o in &others {
        sim.partition(name(alone), name(o));
    }
    let t = sim.elapsed().as_secs_f64();
    run_until(&mut sim, secs(t + 2.0));
    let through = others[rng.random_range(0..others.len())];
    host(&mut sim, 5, vec![addr(through)]);
    sim.partition(name(alone), name(5));
    run_until(&mut sim, secs(t + 6.0 + rng.random_range(0.0..3.0)));
    for i in (1..=5).filter(|&i| i != alone) {
        expect_state(&world, i, alone, MemberState::Dead, "across a partition")?;
    }
    for i in (1..=5).filter(|&i| i != alone) {
        sim.repair(name(alone), name(i));
    }

    // A one-way partition between two nodes.
    let t = sim.elapsed().as_secs_f64();
    run_until(&mut sim, secs(t + 2.0));
    let from = rng.random_range(1..=5u64);
    let to = (from % 5) + 1;
    sim.partition_oneway(name(from), name(to));
    run_until(&mut sim, secs(t + 6.0 + rng.random_range(0.0..2.0)));
    sim.repair(name(from), name(to));

    // A crash (the store survives, as a disk would) and a restart.
    let t = sim.elapsed().as_secs_f64();
    run_until(&mut sim, secs(t + 2.0));
    let crashed = rng.random_range(2..=5u64);
    sim.crash(name(crashed));
    world.nodes.lock().unwrap().remove(&name(crashed));
    run_until(&mut sim, secs(t + 6.0 + rng.random_range(0.0..2.0)));
    for i in (1..=5).filter(|&i| i != crashed) {
        expect_state(&world, i, crashed, MemberState::Dead, "after a crash")?;
    }
    sim.bounce(name(crashed));

    // A graceful leave of another node.
    let t = sim.elapsed().as_secs_f64();
    run_until(&mut sim, secs(t + 3.0));
    let leaver = loop {
        let l = rng.random_range(1..=5u64);
        if l != crashed {
            break l;
        }
    };
    world.leave.lock().unwrap()[&name(leaver)].notify_one();
    run_until(&mut sim, secs(t + 5.0));
    world.writing.store(false, Ordering::Release);

    // Quiet: healing, hints, anti-entropy.
    let t = sim.elapsed().as_secs_f64();
    run_until(&mut sim, secs(t + 12.0));

    let story = format!(
        "skewed {skewed} by {} h, alone {alone}, joined through {through}, one-way {from}->{to}, crashed {crashed}, left {leaver}",
        skew_ms / 3_600_000
    );
    let r = check(&world, leaver, skewed).map_err(|e| format!("{story}: {e}"));
    eprintln!(
        "seed {seed}: {story}; {} writes acknowledged; {}",
        world.acked.lock().unwrap().len(),
        if r.is_ok() { "converged" } else { "FAILED" }
    );
    r
}

/// What node `observer` thinks of node `about`.
fn expect_state(
    world: &World,
    observer: u64,
    about: u64,
    want: MemberState,
    when: &str,
) -> Result<(), String> {
    let node = world.nodes.lock().unwrap()[&name(observer)].clone();
    let state = node
        .cluster()
        .members()
        .into_iter()
        .find(|m| m.name == name(about))
        .map(|m| m.state);
    if state != Some(want) {
        return Err(format!(
            "{when}: n{observer} sees n{about} as {:?}, not {}",
            state.map(|s| s.as_str()),
            want.as_str()
        ));
    }
    Ok(())
}

fn check(world: &World, leaver: u64, skewed: u64) -> Result<(), String> {
    let nodes = world.nodes.lock().unwrap().clone();
    let live: BTreeMap<String, Arc<Node>> = nodes
        .into_iter()
        .filter(|(n, _)| *n != name(leaver))
        .collect();
    if live.len() != 4 {
        return Err(format!("expected 4 live nodes, found {:?}", live.keys()));
    }

    if let Some(p) = world.phantoms.lock().unwrap().first() {
        return Err(format!("a read returned a value never written: {p}"));
    }

    // Health: everyone sees everyone healthy, and the leaver as left.
    for (n, node) in &live {
        for m in node.cluster().members() {
            let want = if m.name == name(leaver) {
                MemberState::Left
            } else {
                MemberState::Healthy
            };
            if m.state != want {
                return Err(format!(
                    "{n} sees {} as {}, not {}",
                    m.name,
                    m.state.as_str(),
                    want.as_str()
                ));
            }
        }
    }

    // The node with the wrong clock says so, and only it.
    for (n, node) in &live {
        let clock = node.cluster().clock_info();
        if clock.skewed != (*n == name(skewed)) {
            return Err(format!(
                "{n} says skewed = {}: {}",
                clock.skewed, clock.reason
            ));
        }
    }
    if world
        .acked
        .lock()
        .unwrap()
        .iter()
        .any(|w| w.node == name(skewed))
    {
        return Err(format!("the skewed n{skewed} acknowledged a write"));
    }

    // Equal digests.
    let mut digests = live
        .iter()
        .map(|(n, node)| (n, node.store().digest(COLLECTION).unwrap().buckets));
    let (first, reference) = digests.next().unwrap();
    for (n, d) in digests {
        if d != reference {
            let diff = (0..d.len()).filter(|&b| d[b] != reference[b]).count();
            return Err(format!("{n} and {first} differ in {diff} digest buckets"));
        }
    }

    // Acknowledged writes: none lost, no delete undone, no phantom.
    let acked = world.acked.lock().unwrap().clone();
    let attempted = world.attempted.lock().unwrap().clone();
    if acked.len() < 100 {
        return Err(format!("only {} writes acknowledged", acked.len()));
    }
    for (n, node) in &live {
        for key in 0..KEYS {
            let found = node.store().lookup(COLLECTION, &key.to_be_bytes()).unwrap();
            for w in acked.iter().filter(|w| w.key == key) {
                let Some(r) = &found else {
                    return Err(format!("{n} lost key {key}, written by {}", w.node));
                };
                if r.version < w.version {
                    return Err(format!(
                        "{n} holds key {key} at {:?}, older than the acknowledged {} by {} at {:?}",
                        r.version,
                        if w.value.is_some() { "set" } else { "delete" },
                        w.node,
                        w.version
                    ));
                }
                if r.version == w.version && r.value != w.value {
                    return Err(format!(
                        "{n} holds key {key} at {:?} with {:?}, written as {:?}",
                        r.version, r.value, w.value
                    ));
                }
            }
            if let Some(Some(v)) = found.as_ref().map(|r| &r.value)
                && !attempted.get(&key).is_some_and(|vs| vs.contains(v))
            {
                return Err(format!("{n} holds {v:?} for key {key}, never written"));
            }
        }
    }
    Ok(())
}

fn seeds() -> Vec<u64> {
    if let Ok(s) = std::env::var("DHRT_SIM_SEED") {
        return vec![s.parse().expect("DHRT_SIM_SEED is a number")];
    }
    let n = std::env::var("DHRT_SIM_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(50);
    // And seeds that once found a bug, kept while their story still
    // reaches it: 193 restarted the skewed node into a join whose member
    // table outran its clock measurements, and it took writes stamped
    // two hours ahead.
    let mut seeds: Vec<u64> = (1..=n).collect();
    for regression in [193] {
        if !seeds.contains(&regression) {
            seeds.push(regression);
        }
    }
    seeds
}

#[test]
fn data_path_survives_partitions_crashes_joins_and_leaves() {
    // Each simulation is single-threaded: run the seeds on two threads.
    let seeds = seeds();
    let failed: Vec<u64> = std::thread::scope(|scope| {
        let workers: Vec<_> = [0, 1]
            .into_iter()
            .map(|half| {
                let seeds = &seeds;
                scope.spawn(move || {
                    let mut failed = Vec::new();
                    for &seed in seeds.iter().skip(half).step_by(2) {
                        if let Err(e) = story(seed, true) {
                            eprintln!(
                                "seed {seed} failed: {e}\n  rerun: DHRT_SIM_SEED={seed} cargo test -p dhrt-cluster --test cluster sim::"
                            );
                            failed.push(seed);
                        }
                    }
                    failed
                })
            })
            .collect();
        workers
            .into_iter()
            .flat_map(|w| w.join().expect("a simulation thread panicked"))
            .collect()
    });
    assert!(failed.is_empty(), "failing seeds: {failed:?}");
}

#[test]
fn without_hints_and_anti_entropy_the_checker_fails() {
    // The negative control: the same stories, nothing repairs what a
    // partition or a crash made a node miss. A checker that passed these
    // would catch nothing.
    let passed: Vec<u64> = (1..=3).filter(|&seed| story(seed, false).is_ok()).collect();
    assert!(
        passed.is_empty(),
        "the checker passed seeds {passed:?} without hints and anti-entropy"
    );
}
