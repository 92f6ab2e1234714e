//! A real partition: three `dhrtd` in their own network namespaces, joined
//! by a bridge, cut apart with blackhole routes while both sides take
//! writes, then healed. The cluster must converge: every write on every
//! node, deletes kept, conflicts resolved the same way everywhere.
//!
//! Needs root (network namespaces). Without it the test says so and
//! passes, unless `DHRT_REQUIRE_NETNS=1` (which `.ci/run` sets, as CI runs
//! as root) makes that a failure.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::cluster::{all_healthy, digest_of, eventually, state_of};
use crate::dhrtd::Dhrtd;
use crate::faults::metric;
use crate::watch::Stream;

/// `ip` with `args`; whether it succeeded.
fn ip(args: &[&str]) -> bool {
    Command::new("ip")
        .args(args)
        .output()
        .is_ok_and(|o| o.status.success())
}

fn ip_in(ns: &str, args: &[&str]) -> bool {
    let mut all = vec!["netns", "exec", ns, "ip"];
    all.extend_from_slice(args);
    ip(&all)
}

/// `n` network namespaces on one bridge, named after this process and the
/// test's turn in it so that parallel runs and tests do not collide;
/// removed on drop.
struct Net {
    prefix: String,
    subnet: String,
    n: usize,
}

impl Net {
    fn create(n: usize) -> Option<Net> {
        static TURN: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let turn = TURN.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % 20;
        let pid = std::process::id();
        let net = Net {
            prefix: format!("dh{}t{turn}", pid % 100_000),
            subnet: format!("10.{}.{}", 231 + turn, pid % 250),
            n,
        };
        let br = net.bridge();
        if !ip(&["link", "add", &br, "type", "bridge"]) {
            return None;
        }
        let gateway = format!("{}.1/24", net.subnet);
        assert!(ip(&["addr", "add", &gateway, "dev", &br]));
        assert!(ip(&["link", "set", &br, "up"]));
        for i in 1..=n {
            let (ns, veth) = (net.ns(i), format!("{}v{i}", net.prefix));
            let addr = format!("{}/24", net.ip(i));
            assert!(ip(&["netns", "add", &ns]), "ip netns add {ns}");
            assert!(ip(&[
                "link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns", &ns
            ]));
            assert!(ip(&["link", "set", &veth, "master", &br, "up"]));
            assert!(ip_in(&ns, &["addr", "add", &addr, "dev", "eth0"]));
            assert!(ip_in(&ns, &["link", "set", "eth0", "up"]));
            assert!(ip_in(&ns, &["link", "set", "lo", "up"]));
        }
        Some(net)
    }

    fn bridge(&self) -> String {
        format!("{}br", self.prefix)
    }

    fn ns(&self, i: usize) -> String {
        format!("{}n{i}", self.prefix)
    }

    fn ip(&self, i: usize) -> String {
        format!("{}.{}", self.subnet, 10 + i)
    }

    fn addr(&self, i: usize) -> SocketAddr {
        format!("{}:7453", self.ip(i)).parse().unwrap()
    }

    /// Blackholes (or restores) the traffic between nodes `a` and `b`,
    /// both ways.
    fn cut(&self, a: usize, b: usize, cut: bool) {
        let verb = if cut { "add" } else { "del" };
        for (from, to) in [(a, b), (b, a)] {
            let dst = format!("{}/32", self.ip(to));
            assert!(
                ip_in(&self.ns(from), &["route", verb, "blackhole", &dst]),
                "route {verb} blackhole {dst} in {}",
                self.ns(from)
            );
        }
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for i in 1..=self.n {
            ip(&["netns", "del", &self.ns(i)]);
        }
        ip(&["link", "del", &self.bridge()]);
    }
}

/// The live entries of `collection` on `node`.
fn listing(node: &Dhrtd, collection: &str) -> BTreeMap<String, String> {
    let (status, body) = node.http("GET", &format!("/{collection}?limit=1000000"), b"");
    assert_eq!(status, 200, "{body}");
    serde_json::from_str::<Vec<Value>>(&body)
        .unwrap()
        .into_iter()
        .map(|e| {
            (
                e["Key"].as_str().unwrap().to_string(),
                e["Value"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

fn set(node: &Dhrtd, key: &str, value: &str) {
    let (status, body) = node.http("PUT", &format!("/part/{key}"), value.as_bytes());
    assert_eq!(status, 200, "PUT {key}: {body}");
}

/// A write during the partition: saved, but `all` cannot be met, and the
/// client is told so (HTTP 504, "saved on N of 3 replicas").
fn set_cut_off(node: &Dhrtd, key: &str, value: &str) {
    let (status, body) = node.http("PUT", &format!("/part/{key}"), value.as_bytes());
    assert_eq!(status, 504, "PUT {key}: {body}");
    assert!(body.contains(" of 3 replicas"), "PUT {key}: {body}");
}

/// `n` namespaces, or `None` (the test passes, saying so) without root,
/// unless `DHRT_REQUIRE_NETNS=1`.
fn net_or_skip(n: usize) -> Option<Net> {
    let net = Net::create(n);
    if net.is_none() {
        let required = std::env::var("DHRT_REQUIRE_NETNS").is_ok_and(|v| v == "1");
        assert!(
            !required,
            "DHRT_REQUIRE_NETNS=1 but network namespaces cannot be created (run as root)"
        );
        eprintln!("skipped: creating network namespaces needs root");
    }
    net
}

/// Starts a node in each of `net`'s namespaces on `dirs`, with the
/// cluster secret, `--no-auth` (the test talks to them from the host, off
/// their loopback) and `extra`; nodes 2 and 3 join node 1. Waits until all
/// three see three healthy members.
fn three_in(net: &Net, dirs: &[tempfile::TempDir], extra: &[&str]) -> Vec<Dhrtd> {
    let seed = net.addr(1).to_string();
    let nodes: Vec<Dhrtd> = (1..=3)
        .map(|i| {
            let mut args = vec![
                "--cluster-secret",
                "partition test: a secret of at least 32 bytes",
                "--no-auth",
            ];
            args.extend_from_slice(extra);
            if i > 1 {
                args.extend(["--node", &seed]);
            }
            Dhrtd::start_in_netns(&net.ns(i), net.addr(i), dirs[i - 1].path(), &args)
        })
        .collect();
    let all: Vec<&Dhrtd> = nodes.iter().collect();
    eventually(
        "three healthy members everywhere",
        Duration::from_secs(20),
        || all_healthy(&all, 3),
    );
    nodes
}

#[test]
fn a_partition_made_with_blackhole_routes_heals_and_converges() {
    let Some(net) = net_or_skip(3) else {
        return;
    };
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    // One hint per peer: what the other side wrote reaches a node through
    // anti-entropy after the heal, not through hints.
    let nodes = three_in(&net, &dirs, &["--max-hints", "1"]);
    let all: Vec<&Dhrtd> = nodes.iter().collect();
    for i in 0..300 {
        set(&nodes[i % 3], &format!("before-{i}"), "old");
    }

    // A watcher of node 3, which stays connected through the partition.
    let mut watcher = Stream::open(net.addr(3), "/part", "application/x-ndjson", "");
    assert_eq!(watcher.status, 200, "{}", watcher.refusal);
    assert_eq!(
        watcher.next(Duration::from_secs(5)).unwrap().kind(),
        "progress"
    );

    // Cut node 3 off from 1 and 2; the test still reaches everyone over
    // the bridge.
    net.cut(3, 1, true);
    net.cut(3, 2, true);
    let cut_at = Instant::now();
    for i in 0..500 {
        set_cut_off(&nodes[0], &format!("majority-{i}"), &format!("m{i}"));
        set_cut_off(&nodes[2], &format!("minority-{i}"), &format!("n{i}"));
    }
    // Deletes and overwrites on the cut-off side, overwrites on the other.
    for i in 0..100 {
        let (status, body) = nodes[2].http("DELETE", &format!("/part/before-{i}"), b"");
        assert_eq!(status, 504, "{body}");
        set_cut_off(&nodes[2], &format!("before-{}", 100 + i), "minority");
        set_cut_off(&nodes[1], &format!("before-{}", 200 + i), "majority");
    }
    let (a3, a1) = (net.addr(3).to_string(), net.addr(1).to_string());
    eventually(
        "each side declares the other dead",
        Duration::from_secs(20),
        || {
            state_of(&nodes[0], &a3).as_deref() == Some("dead")
                && state_of(&nodes[2], &a1).as_deref() == Some("dead")
        },
    );
    // A 10-second partition, as the convergence target is stated.
    if let Some(rest) = Duration::from_secs(10).checked_sub(cut_at.elapsed()) {
        std::thread::sleep(rest);
    }

    net.cut(3, 1, false);
    net.cut(3, 2, false);
    let healed = Instant::now();
    let reference = {
        let mut want = BTreeMap::new();
        for i in 0..300 {
            want.insert(format!("before-{i}"), "old".to_string());
        }
        for i in 0..100 {
            want.remove(&format!("before-{i}"));
            want.insert(format!("before-{}", 100 + i), "minority".into());
            want.insert(format!("before-{}", 200 + i), "majority".into());
        }
        for i in 0..500 {
            want.insert(format!("majority-{i}"), format!("m{i}"));
            want.insert(format!("minority-{i}"), format!("n{i}"));
        }
        want
    };
    eventually(
        "every node holds every write after the heal",
        Duration::from_secs(60),
        || nodes.iter().all(|n| listing(n, "part") == reference),
    );
    let converged = healed.elapsed();
    // Node 3's watcher saw what reached node 3 only after the heal: the
    // other side's writes and overwrites.
    let mut from_others: BTreeMap<String, String> = (0..500)
        .map(|i| (format!("majority-{i}"), format!("m{i}")))
        .chain((0..100).map(|i| (format!("before-{}", 200 + i), "majority".to_string())))
        .collect();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !from_others.is_empty() {
        let left = deadline.saturating_duration_since(Instant::now());
        let e = watcher.next(left).unwrap_or_else(|| {
            panic!(
                "node 3's watcher missed {} changes, e.g. {:?}",
                from_others.len(),
                from_others.iter().next()
            )
        });
        if e.kind() == "set"
            && from_others.get(e.key()).map(String::as_str) == e.data["Value"].as_str()
        {
            from_others.remove(e.key());
        }
    }
    eventually("equal digests everywhere", Duration::from_secs(10), || {
        let d: Vec<String> = nodes.iter().map(|n| digest_of(n, "part")).collect();
        d.iter().all(|x| *x == d[0] && x.len() == 16)
    });
    eventually(
        "three healthy members everywhere after the heal",
        Duration::from_secs(30),
        || all_healthy(&all, 3),
    );
    eprintln!(
        "partition of {:.1} s: converged {:.2} s after the heal, all healthy after {:.2} s",
        healed.duration_since(cut_at).as_secs_f64(),
        converged.as_secs_f64(),
        healed.elapsed().as_secs_f64()
    );
}

/// A partition longer than the tombstone grace period: the deletes made on
/// either side are kept until every member has them, so none is undone at
/// the heal, neither a delete newer than the other side's write of the key
/// nor a delete of a key the other side left alone.
#[test]
fn a_partition_longer_than_the_tombstone_grace_loses_no_delete() {
    let Some(net) = net_or_skip(3) else {
        return;
    };
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let nodes = three_in(&net, &dirs, &["--tombstone-grace-secs", "1"]);
    for i in 0..60 {
        set(&nodes[0], &format!("k{i}"), "old");
    }
    // Every member has had an anti-entropy round with every other.
    eventually(
        "the deletes held are recent",
        Duration::from_secs(30),
        || {
            nodes
                .iter()
                .all(|n| metric(n, "dhrt_tombstones_held_seconds").is_some_and(|s| s < 5.0))
        },
    );

    net.cut(3, 1, true);
    net.cut(3, 2, true);
    // Node 3 writes k0..k19, then node 1 deletes them (newer); node 3
    // deletes k20..k39; node 1 deletes k40..k49.
    for i in 0..20 {
        set_cut_off(&nodes[2], &format!("k{i}"), "minority");
    }
    std::thread::sleep(Duration::from_millis(50));
    for i in (0..20).chain(40..50) {
        let (status, body) = nodes[0].http("DELETE", &format!("/part/k{i}"), b"");
        assert_eq!(status, 504, "{body}");
    }
    for i in 20..40 {
        let (status, body) = nodes[2].http("DELETE", &format!("/part/k{i}"), b"");
        assert_eq!(status, 504, "{body}");
    }
    // Well past the grace period, with compactions meanwhile: the
    // deletes are held, and the metric says for how long.
    std::thread::sleep(Duration::from_secs(8));
    for n in &nodes {
        let held = metric(n, "dhrt_tombstones_held_seconds").unwrap();
        assert!(held >= 8.0, "{held}");
    }

    net.cut(3, 1, false);
    net.cut(3, 2, false);
    let want: BTreeMap<String, String> = (50..60)
        .map(|i| (format!("k{i}"), "old".to_string()))
        .collect();
    eventually(
        "every node holds the deletes of both sides",
        Duration::from_secs(60),
        || nodes.iter().all(|n| listing(n, "part") == want),
    );
    // Still so once the members have synced and the deletes are let go.
    eventually("the deletes are let go", Duration::from_secs(60), || {
        nodes
            .iter()
            .all(|n| metric(n, "dhrt_tombstones_held_seconds").is_some_and(|s| s < 5.0))
    });
    std::thread::sleep(Duration::from_secs(3));
    for n in &nodes {
        assert_eq!(listing(n, "part"), want);
    }
}
