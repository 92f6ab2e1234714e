//! Real `dhrtd` clusters on loopback: replication of writes and deletes,
//! fan-out reads and forwarding for a node that hosts only some
//! collections, SIGKILL → unhealthy → dead → restart → re-sync → healthy,
//! SIGTERM → left, a join under write load, and the cluster secret.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::dhrtd::Dhrtd;

/// Polls `f` until it is true; fails with `what` after `within`.
pub(crate) fn eventually(what: &str, within: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

pub(crate) fn stats(node: &Dhrtd) -> Value {
    let (status, body) = node.http("GET", "/", b"");
    assert_eq!(status, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

/// The state `observer` reports for the member at `addr`.
pub(crate) fn state_of(observer: &Dhrtd, addr: &str) -> Option<String> {
    stats(observer)["members"]
        .as_array()?
        .iter()
        .find(|m| m["addr"] == addr)
        .map(|m| m["state"].as_str().unwrap_or("").to_string())
}

pub(crate) fn all_healthy(nodes: &[&Dhrtd], count: usize) -> bool {
    nodes.iter().all(|n| {
        let s = stats(n);
        let members = s["members"].as_array().unwrap();
        members.len() == count && members.iter().all(|m| m["state"] == "healthy")
    })
}

/// Live keys of `collection` held by the node itself.
pub(crate) fn local_keys(node: &Dhrtd, collection: &str) -> u64 {
    stats(node)["collections"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == collection)
        .map_or(0, |c| c["keys"].as_u64().unwrap())
}

/// The node's anti-entropy digest of `collection` (16 hex digits).
pub(crate) fn digest_of(node: &Dhrtd, collection: &str) -> String {
    stats(node)["collections"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == collection)
        .map(|c| c["digest"].as_str().unwrap().to_string())
        .unwrap_or_default()
}

fn get(node: &Dhrtd, path: &str) -> (u16, String) {
    node.http("GET", path, b"")
}

fn join_args(seed: &Dhrtd) -> Vec<String> {
    vec!["--node".into(), seed.addr.to_string()]
}

pub(crate) fn start_joined(dir: &std::path::Path, seed: &Dhrtd, extra: &[&str]) -> Dhrtd {
    let mut args = join_args(seed);
    args.extend(extra.iter().map(|s| s.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    Dhrtd::start(dir, &args)
}

/// Two members, the second joined through the first, both healthy.
pub(crate) fn two_joined(dirs: &[tempfile::TempDir], extra: &[&str]) -> (Dhrtd, Dhrtd) {
    let a = Dhrtd::start(dirs[0].path(), extra);
    let b = start_joined(dirs[1].path(), &a, extra);
    eventually("two healthy members", Duration::from_secs(15), || {
        all_healthy(&[&a, &b], 2)
    });
    (a, b)
}

/// Three nodes, b and c joined through a, once all are healthy.
pub(crate) fn three_joined(dirs: &[tempfile::TempDir], extra: &[&str]) -> (Dhrtd, Dhrtd, Dhrtd) {
    let a = Dhrtd::start(dirs[0].path(), extra);
    let b = start_joined(dirs[1].path(), &a, extra);
    let c = start_joined(dirs[2].path(), &a, extra);
    eventually("three healthy members", Duration::from_secs(15), || {
        all_healthy(&[&a, &b, &c], 3)
    });
    (a, b, c)
}

#[test]
fn writes_and_deletes_on_any_node_reach_every_node() {
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let a = Dhrtd::start(dirs[0].path(), &[]);
    let b = start_joined(dirs[1].path(), &a, &[]);
    let c = start_joined(dirs[2].path(), &b, &[]);
    let nodes = [&a, &b, &c];
    eventually(
        "three healthy members everywhere",
        Duration::from_secs(15),
        || all_healthy(&nodes, 3),
    );
    for (i, n) in nodes.iter().enumerate() {
        assert_eq!(n.http("POST", &format!("/fruit/k{i}/v{i}"), b"").0, 200);
    }
    // Acknowledged with write-ack all: every node holds every key already.
    for n in nodes {
        for i in 0..3 {
            let (status, body) = get(n, &format!("/fruit/k{i}"));
            assert_eq!(status, 200, "{body}");
            assert!(body.contains(&format!("\"v{i}\"")), "{body}");
        }
        assert_eq!(local_keys(n, "fruit"), 3);
    }
    assert_eq!(b.http("DELETE", "/fruit/k0", b"").0, 200);
    for n in nodes {
        assert_eq!(get(n, "/fruit/k0").0, 404);
    }
    // A dropped collection is dropped everywhere.
    assert_eq!(c.http("DELETE", "/fruit", b"").0, 200);
    for n in nodes {
        assert_eq!(local_keys(n, "fruit"), 0);
    }
}

#[test]
fn a_node_hosting_other_collections_forwards_writes_and_fans_out_reads() {
    let dirs: Vec<_> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    let a = Dhrtd::start(dirs[0].path(), &[]);
    // Written while every member owned everything.
    assert_eq!(a.http("POST", "/older/k/v", b"").0, 200);
    let b = start_joined(dirs[1].path(), &a, &["--collections", "only-here"]);
    eventually("two healthy members", Duration::from_secs(15), || {
        all_healthy(&[&a, &b], 2)
    });
    // b does not host `shared`: the write goes to a, and b keeps nothing.
    assert_eq!(b.http("POST", "/shared/k/v", b"").0, 200);
    assert_eq!(local_keys(&a, "shared"), 1);
    assert_eq!(local_keys(&b, "shared"), 0);
    // A read on b misses locally and is answered by a.
    let (status, body) = get(&b, "/shared/k");
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"v\""), "{body}");
    assert_eq!(get(&b, "/shared/missing").0, 404);
    // b knows both collections exist though it holds neither: `GET /name`
    // is their listing, not the key `name` of `default`.
    for c in ["shared", "older"] {
        eventually(
            "b lists a collection it does not host",
            Duration::from_secs(10),
            || {
                let (status, body) = get(&b, &format!("/{c}"));
                status == 200 && body.contains("\"Key\":\"k\"")
            },
        );
    }
    // `only-here` is hosted by both (a hosts everything).
    assert_eq!(a.http("POST", "/only-here/x/1", b"").0, 200);
    assert_eq!(local_keys(&b, "only-here"), 1);
}

#[test]
fn a_killed_node_is_declared_dead_and_returns_only_after_resyncing() {
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let (a, b, c) = three_joined(&dirs, &[]);
    let c_addr = c.addr;
    let c_name = c_addr.to_string();
    c.stop("KILL");
    // First suspected (unhealthy), then, unrefuted, dead.
    eventually(
        "the killed node is unhealthy",
        Duration::from_secs(10),
        || state_of(&a, &c_name).as_deref() == Some("unhealthy"),
    );
    for observer in [&a, &b] {
        eventually(
            "the killed node is dead on every peer",
            Duration::from_secs(20),
            || state_of(observer, &c_name).as_deref() == Some("dead"),
        );
    }
    // Writes while it is dead are saved by the living, and the client is
    // told that `all` was not met: on 2 of 3 replicas, at once (a dead
    // replica cannot answer, so nobody waits for it).
    let started = Instant::now();
    for i in 0..200 {
        let (status, body) = a.http("POST", &format!("/while/k{i}/v{i}"), b"");
        assert_eq!(status, 504, "{body}");
        assert!(body.contains("saved on 2 of 3 replicas"), "{body}");
    }
    assert!(started.elapsed() < Duration::from_secs(20));
    let (status, body) = b.http("DELETE", "/while/k0", b"");
    assert_eq!(status, 504, "{body}");
    // a holds them as hints for c, and says so in its metrics.
    let queued = || {
        let (_, m) = a.http("GET", "/metrics", b"");
        m.lines()
            .find(|l| l.starts_with(&format!("dhrt_replication_queue{{peer=\"{c_name}\"}}")))
            .and_then(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
    };
    assert_eq!(queued(), Some(200));
    // It restarts on its data directory and address, re-syncs, and is
    // healthy everywhere, holding every write it missed.
    let args = join_args(&b);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let c = Dhrtd::start_on(Some(c_addr), dirs[2].path(), &args);
    eventually(
        "the restarted node is healthy everywhere",
        Duration::from_secs(20),
        || all_healthy(&[&a, &b, &c], 3),
    );
    assert_eq!(local_keys(&c, "while"), 199);
    eventually("the hints drained", Duration::from_secs(10), || {
        queued() == Some(0)
    });
    assert_eq!(get(&c, "/while/k0").0, 404);
    assert_eq!(get(&c, "/while/k199").0, 200);
}

#[test]
fn a_node_away_longer_than_the_tombstone_grace_resyncs_fully() {
    // Deletes are remembered for 2 s only, so the cluster forgets them
    // while c is away; c must not bring the deleted keys back. With room
    // for 10 hints, only the last 10 deletes wait for c: the full re-sync
    // must find the other 90.
    let grace = [
        "--tombstone-grace-secs",
        "2",
        "--max-hints",
        "10",
        "--write-ack",
        "quorum",
    ];
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let (a, b, c) = three_joined(&dirs, &grace);
    for i in 0..200 {
        assert_eq!(a.http("POST", &format!("/old/k{i}/v{i}"), b"").0, 200);
    }
    eventually("c holds every key", Duration::from_secs(10), || {
        local_keys(&c, "old") == 200
    });
    // c notes, every second, that it is in touch: wait until that covers
    // the writes, so that they are from before it went away.
    noted_in_touch_from_now(dirs[2].path(), &b);
    let c_addr = c.addr;
    c.stop("KILL");
    for i in 0..100 {
        assert_eq!(a.http("DELETE", &format!("/old/k{i}"), b"").0, 200);
    }
    for i in 200..250 {
        assert_eq!(b.http("POST", &format!("/old/k{i}/v{i}"), b"").0, 200);
    }
    // Past the grace period, compaction purges the tombstones on a and b.
    std::thread::sleep(Duration::from_secs(5));
    // c restarts without --node: it rejoins through the members it
    // remembers in cluster.state.
    let c = return_to(c_addr, dirs[2].path(), &grace, [&a, &b]);
    // Anti-entropy ran a few rounds: nothing deleted comes back.
    for node in [&a, &b, &c] {
        assert_eq!(local_keys(node, "old"), 150, "on {}", node.addr);
        assert_eq!(get(node, "/old/k0").0, 404);
        assert_eq!(get(node, "/old/k99").0, 404);
        assert_eq!(get(node, "/old/k100").0, 200);
        assert_eq!(get(node, "/old/k249").0, 200);
    }
}

/// Deletes of keys that never existed, made while c is away longer than
/// the grace: c, back, does not take those tombstones (past their grace,
/// for keys it has no record of), so their buckets differ until a and b
/// purge them. Anti-entropy pulls those whole buckets, old tombstones all
/// three hold included: those are no arrivals, or they would hold every
/// tombstone from being purged, round after round, and the digests would
/// never agree.
#[test]
fn tombstones_a_returning_node_does_not_take_are_purged_and_digests_agree() {
    let args = [
        "--tombstone-grace-secs",
        "2",
        "--max-clock-offset-ms",
        "300",
        "--write-ack",
        "quorum",
    ];
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let (a, b, c) = three_joined(&dirs, &args);
    for i in 0..1000 {
        assert_eq!(a.http("POST", &format!("/t/base{i}/v"), b"").0, 200);
    }
    for i in 0..800 {
        assert_eq!(a.http("DELETE", &format!("/t/base{i}"), b"").0, 200);
    }
    eventually("c holds what a holds", Duration::from_secs(20), || {
        local_keys(&c, "t") == 200 && digest_of(&c, "t") == digest_of(&a, "t")
    });
    noted_in_touch_from_now(dirs[2].path(), &b);
    let c_addr = c.addr;
    c.stop("KILL");
    for i in 0..30 {
        // 404, and a tombstone all the same.
        assert_eq!(b.http("DELETE", &format!("/t/never{i}"), b"").0, 404);
    }
    std::thread::sleep(Duration::from_secs(4));
    let c = return_to(c_addr, dirs[2].path(), &args, [&a, &b]);
    eventually(
        "equal digests on every node",
        Duration::from_secs(60),
        || {
            let d = digest_of(&a, "t");
            d == digest_of(&b, "t") && d == digest_of(&c, "t")
        },
    );
    for node in [&a, &b, &c] {
        assert_eq!(local_keys(node, "t"), 200, "on {}", node.addr);
    }
}

/// Short tombstone grace, no hints, quorum writes: a node away for a few
/// seconds is away longer than the grace, and catches up by re-syncing.
const SHORT_GRACE_NO_HINTS: [&str; 6] = [
    "--tombstone-grace-secs",
    "2",
    "--max-hints",
    "0",
    "--write-ack",
    "quorum",
];

/// The wall clock, in ms since the Unix epoch.
fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// Whether the node whose data directory is `dir` remembers `member` in
/// its cluster.state, and noted contact with the cluster after `ms`.
fn in_touch_since(dir: &std::path::Path, member: &Dhrtd, ms: u64) -> bool {
    let state = std::fs::read_to_string(dir.join("cluster.state")).unwrap_or_default();
    let seen = state
        .lines()
        .find_map(|l| l.strip_prefix("seen "))
        .and_then(|v| v.parse::<u64>().ok());
    state.contains(&format!("member {}", member.addr)) && seen.is_some_and(|s| s > ms)
}

/// Waits until the node whose data directory is `dir` remembers `member`
/// in its cluster.state and has noted contact with the cluster since now
/// (it does every second while in touch): what was written before is from
/// before it goes away.
fn noted_in_touch_from_now(dir: &std::path::Path, member: &Dhrtd) {
    let now = now_ms();
    eventually(
        "contact noted in cluster.state",
        Duration::from_secs(10),
        || in_touch_since(dir, member, now),
    );
}

/// Starts every node of a cluster that was down at once, each at its
/// address on its data directory, and waits (up to `secs`) until every
/// one is healthy everywhere.
fn whole_cluster_back<'a>(
    dirs: impl IntoIterator<Item = &'a std::path::Path>,
    addrs: impl IntoIterator<Item = SocketAddr>,
    args: &[&str],
    secs: u64,
) -> Vec<Dhrtd> {
    let nodes: Vec<Dhrtd> = dirs
        .into_iter()
        .zip(addrs)
        .map(|(dir, addr)| Dhrtd::start_on(Some(addr), dir, args))
        .collect();
    let all: Vec<&Dhrtd> = nodes.iter().collect();
    eventually(
        "every member healthy after the restart",
        Duration::from_secs(secs),
        || all_healthy(&all, all.len()),
    );
    nodes
}

/// Restarts the third node of a cluster at `addr` on `dir`, waits until
/// every member is healthy, and lets anti-entropy run a few rounds.
fn return_to(addr: SocketAddr, dir: &std::path::Path, args: &[&str], [a, b]: [&Dhrtd; 2]) -> Dhrtd {
    let c = Dhrtd::start_on(Some(addr), dir, args);
    eventually(
        "the returning node is healthy everywhere",
        Duration::from_secs(30),
        || all_healthy(&[a, b, &c], 3),
    );
    std::thread::sleep(Duration::from_secs(3));
    c
}

/// A whole cluster down for longer than the tombstone grace comes back,
/// every member due a full re-sync, and one goes first with its own data.
/// The first that died (here the lowest id, which once decided) holds the
/// stalest: whichever goes first, nobody may take its lack of what the
/// others wrote after it died for deletes the cluster forgot. The writes
/// the other two acknowledged (quorum), and a delete, stay.
#[test]
fn a_whole_cluster_back_from_longer_than_the_grace_keeps_what_its_first_member_missed() {
    let args = ["--tombstone-grace-secs", "2", "--write-ack", "quorum"];
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let (a, b, c) = three_joined(&dirs, &args);
    // Lowest id first.
    let id = |n: &Dhrtd| stats(n)["node"]["id"].as_str().unwrap().to_string();
    let mut nodes: Vec<(Dhrtd, &tempfile::TempDir)> =
        vec![(a, &dirs[0]), (b, &dirs[1]), (c, &dirs[2])];
    nodes.sort_by_key(|(n, _)| u64::from_str_radix(&id(n), 16).unwrap());
    let [(first, first_dir), (second, second_dir), (third, third_dir)]: [_; 3] =
        nodes.try_into().ok().unwrap();
    assert_eq!(first.http("POST", "/late/base/v", b"").0, 200);
    for (dir, other) in [
        (first_dir, &second),
        (second_dir, &third),
        (third_dir, &first),
    ] {
        noted_in_touch_from_now(dir.path(), other);
    }
    let addrs = [first.addr, second.addr, third.addr];
    first.stop("KILL");
    for i in 0..20 {
        let (status, body) = second.http("POST", &format!("/late/k{i}/v{i}"), b"");
        assert_eq!(status, 200, "{body}");
    }
    assert_eq!(third.http("DELETE", "/late/base", b"").0, 200);
    for (dir, other) in [(second_dir, &third), (third_dir, &second)] {
        noted_in_touch_from_now(dir.path(), other);
    }
    second.stop("KILL");
    third.stop("KILL");
    std::thread::sleep(Duration::from_secs(4));
    let nodes = whole_cluster_back(
        [first_dir, second_dir, third_dir].map(|d| d.path()),
        addrs,
        &args,
        30,
    );
    eventually(
        "every write the cluster acknowledged, everywhere",
        Duration::from_secs(20),
        || nodes.iter().all(|n| local_keys(n, "late") == 20),
    );
    std::thread::sleep(Duration::from_secs(3));
    for node in &nodes {
        assert_eq!(local_keys(node, "late"), 20, "on {}", node.addr);
        assert_eq!(get(node, "/late/k19").0, 200);
        assert_eq!(get(node, "/late/base").0, 404, "the delete stays");
    }
}

/// A whole cluster back from longer than the tombstone grace, and a
/// newcomer joining it meanwhile with the lowest id there is: every member
/// is syncing, and one must go first with its own data. Not the newcomer:
/// the others would forget every record it lacks (all of them). The one
/// whose data was last in touch goes first.
#[test]
fn a_newcomer_joining_a_whole_cluster_back_from_longer_than_the_grace_never_goes_first() {
    let args = ["--tombstone-grace-secs", "2"];
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let (a, b) = two_joined(&dirs, &args);
    for i in 0..20 {
        assert_eq!(a.http("POST", &format!("/kept/k{i}/v{i}"), b"").0, 200);
    }
    eventually("b holds every key", Duration::from_secs(10), || {
        local_keys(&b, "kept") == 20
    });
    noted_in_touch_from_now(dirs[0].path(), &b);
    noted_in_touch_from_now(dirs[1].path(), &a);
    let addrs = [a.addr, b.addr];
    a.stop("KILL");
    b.stop("KILL");
    std::thread::sleep(Duration::from_secs(4));
    std::fs::write(dirs[2].path().join("node.id"), "0000000000000001\n").unwrap();
    let a = Dhrtd::start_on(Some(addrs[0]), dirs[0].path(), &args);
    let b = Dhrtd::start_on(Some(addrs[1]), dirs[1].path(), &args);
    let newcomer = start_joined(dirs[2].path(), &a, &args);
    assert_eq!(stats(&newcomer)["node"]["id"], "0000000000000001");
    let all = [&a, &b, &newcomer];
    eventually("three healthy members", Duration::from_secs(30), || {
        all_healthy(&all, 3)
    });
    eventually("every key, everywhere", Duration::from_secs(20), || {
        all.iter().all(|n| local_keys(n, "kept") == 20)
    });
    std::thread::sleep(Duration::from_secs(3));
    for node in all {
        assert_eq!(local_keys(node, "kept"), 20, "on {}", node.addr);
        assert!(get(node, "/kept/k19").1.contains("v19"), "on {}", node.addr);
    }
}

/// A newcomer stopped halfway through its handoff holds part of the data,
/// and its `cluster.state` says it was in touch until it stopped: it must
/// not pass for the freshest when the whole cluster comes back from longer
/// than the grace (here with the lowest id there is), or the others would
/// forget every record it had not received yet.
#[test]
fn a_newcomer_stopped_mid_handoff_never_goes_first_when_the_whole_cluster_returns() {
    let args = [
        "--tombstone-grace-secs",
        "2",
        "--move-rate-mib",
        "1",
        "--max-clock-offset-ms",
        "300",
    ];
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let (a, b) = two_joined(&dirs, &args);
    let value = vec![b'v'; 50_000];
    for i in 0..200 {
        assert_eq!(a.http("PUT", &format!("/big/k{i}"), &value).0, 200);
    }
    eventually("b holds every key", Duration::from_secs(20), || {
        local_keys(&b, "big") == 200
    });
    std::fs::write(dirs[2].path().join("node.id"), "0000000000000001\n").unwrap();
    let newcomer = start_joined(dirs[2].path(), &a, &args);
    eventually("the newcomer is halfway", Duration::from_secs(20), || {
        (1..150).contains(&local_keys(&newcomer, "big"))
    });
    noted_in_touch_from_now(dirs[0].path(), &b);
    noted_in_touch_from_now(dirs[1].path(), &a);
    noted_in_touch_from_now(dirs[2].path(), &a);
    let state = std::fs::read_to_string(dirs[2].path().join("cluster.state")).unwrap();
    assert!(state.contains("fresh none"), "{state}");
    let addrs = [a.addr, b.addr, newcomer.addr];
    a.stop("KILL");
    b.stop("KILL");
    newcomer.stop("KILL");
    std::thread::sleep(Duration::from_secs(4));
    let nodes = whole_cluster_back(dirs.iter().map(|d| d.path()), addrs, &args, 60);
    eventually("every key, everywhere", Duration::from_secs(30), || {
        nodes.iter().all(|n| local_keys(n, "big") == 200)
    });
}

/// A member that left (SIGTERM) before keys were deleted and their
/// tombstones purged, then a whole cluster back from longer than the grace
/// at once, the one that left among them with the lowest id there is. The
/// others' data was in touch last: one of them goes first, and the deleted
/// keys the one that left still holds do not come back.
#[test]
fn a_member_that_left_before_deletes_never_goes_first_when_the_whole_cluster_returns() {
    let args = [
        "--tombstone-grace-secs",
        "2",
        "--max-clock-offset-ms",
        "300",
    ];
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    std::fs::write(dirs[0].path().join("node.id"), "0000000000000001\n").unwrap();
    let (a, b, c) = three_joined(&dirs, &args);
    for i in 0..10 {
        assert_eq!(b.http("POST", &format!("/gone/k{i}/v{i}"), b"").0, 200);
    }
    assert_eq!(b.http("POST", "/kept/x/y", b"").0, 200);
    eventually("a holds every key", Duration::from_secs(10), || {
        local_keys(&a, "gone") == 10 && local_keys(&a, "kept") == 1
    });
    let addrs = [a.addr, b.addr, c.addr];
    let a_at = a.addr.to_string();
    assert!(a.stop("TERM").success());
    eventually("a has left", Duration::from_secs(10), || {
        [&b, &c]
            .iter()
            .all(|n| state_of(n, &a_at).as_deref() == Some("left"))
    });
    for i in 0..10 {
        assert_eq!(c.http("DELETE", &format!("/gone/k{i}"), b"").0, 200);
    }
    // Past the grace, and a few anti-entropy rounds between b and c: the
    // tombstones are purged (nothing holds them for a member that left).
    std::thread::sleep(Duration::from_secs(8));
    noted_in_touch_from_now(dirs[1].path(), &c);
    noted_in_touch_from_now(dirs[2].path(), &b);
    b.stop("KILL");
    c.stop("KILL");
    std::thread::sleep(Duration::from_secs(4));
    let nodes = whole_cluster_back(dirs.iter().map(|d| d.path()), addrs, &args, 40);
    std::thread::sleep(Duration::from_secs(3));
    for node in &nodes {
        assert_eq!(
            local_keys(node, "gone"),
            0,
            "deleted keys back on {}",
            node.addr
        );
        assert_eq!(get(node, "/gone/k3").0, 404, "on {}", node.addr);
        assert_eq!(local_keys(node, "kept"), 1, "on {}", node.addr);
    }
}

/// A node back after a short absence with its clock set back by more
/// than the allowed offset is skewed, but its peers' clocks, which agree,
/// still tell how long it was away: it catches up by anti-entropy, not a
/// full re-sync it has no need for.
#[test]
fn a_node_back_with_its_clock_set_far_back_judges_its_absence_by_its_peers() {
    use std::process::{Command, Stdio};
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let (a, b, c) = three_joined(&dirs, &[]);
    assert_eq!(a.http("POST", "/back/k/v", b"").0, 200);
    noted_in_touch_from_now(dirs[2].path(), &a);
    let c_addr = c.addr;
    c.stop("KILL");
    let c_at = c_addr.to_string();
    eventually("c is found dead", Duration::from_secs(30), || {
        state_of(&a, &c_at).as_deref() == Some("dead")
    });
    let log = dirs[2].path().join("restart.log");
    let mut child = Command::new(crate::dhrtd::binary())
        .arg("--listen")
        .arg(c_addr.to_string())
        .arg("--data-dir")
        .arg(dirs[2].path())
        .args(["--clock-offset-ms", "-90000"])
        .env("DHRT_LOG", "info")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    eventually(
        "the node is back and healthy",
        Duration::from_secs(30),
        || {
            [&a, &b]
                .iter()
                .all(|n| state_of(n, &c_at).as_deref() == Some("healthy"))
        },
    );
    // Past the 10 s a node waits for its clock to be compared before it
    // judges by its own.
    std::thread::sleep(Duration::from_secs(11));
    child.kill().unwrap();
    child.wait().unwrap();
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("clock skew"), "it is skewed: {text}");
    assert!(
        !text.contains("full re-sync"),
        "no full re-sync for an absence of seconds: {text}"
    );
}

#[test]
fn a_node_back_with_its_clock_set_back_still_resyncs_fully() {
    // As above, but c comes back with its clock 40 s behind (within the
    // allowed offset, so it is not skewed): by its own clock it was away
    // for no time at all. Compared with its peers', it was away longer
    // than the grace, and it must re-sync fully.
    let grace = SHORT_GRACE_NO_HINTS;
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let (a, b, c) = three_joined(&dirs, &grace);
    for i in 0..50 {
        assert_eq!(a.http("POST", &format!("/old/k{i}/v{i}"), b"").0, 200);
    }
    eventually("c holds every key", Duration::from_secs(10), || {
        local_keys(&c, "old") == 50
    });
    noted_in_touch_from_now(dirs[2].path(), &b);
    let c_addr = c.addr;
    c.stop("KILL");
    for i in 0..20 {
        assert_eq!(a.http("DELETE", &format!("/old/k{i}"), b"").0, 200);
    }
    std::thread::sleep(Duration::from_secs(5));
    let mut behind = grace.to_vec();
    behind.extend(["--clock-offset-ms", "-40000"]);
    let c = return_to(c_addr, dirs[2].path(), &behind, [&a, &b]);
    for node in [&a, &b, &c] {
        assert_eq!(local_keys(node, "old"), 30, "on {}", node.addr);
        assert_eq!(get(node, "/old/k0").0, 404);
        assert_eq!(get(node, "/old/k49").0, 200);
    }
}

#[test]
fn a_node_whose_clock_is_behind_keeps_what_it_took_while_cut_off() {
    // c's clock is 40 s behind its peers' (within the allowed offset). It
    // is cut off longer than the grace period, takes writes meanwhile, and
    // re-syncs fully on return: its writes were stamped before its last
    // contact by its peers' clocks, yet after it by its own, and they are
    // kept; a delete the cluster made meanwhile is not undone.
    let grace = SHORT_GRACE_NO_HINTS;
    let mut behind = grace.to_vec();
    behind.extend(["--clock-offset-ms", "-40000"]);
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let a = Dhrtd::start(dirs[0].path(), &grace);
    let b = start_joined(dirs[1].path(), &a, &grace);
    let c = start_joined(dirs[2].path(), &a, &behind);
    eventually("three healthy members", Duration::from_secs(20), || {
        all_healthy(&[&a, &b, &c], 3)
    });
    for i in 0..10 {
        assert_eq!(a.http("POST", &format!("/c/old{i}/v"), b"").0, 200);
    }
    eventually("c holds every key", Duration::from_secs(10), || {
        local_keys(&c, "c") == 10
    });
    noted_in_touch_from_now(dirs[2].path(), &b);
    // Cut off: c comes back knowing a cluster secret its peers do not, so
    // they refuse it and it them.
    let c_addr = c.addr;
    assert!(c.stop("TERM").success());
    let mut cut = behind.clone();
    cut.extend(["--cluster-secret", crate::security::SECRET]);
    let c = Dhrtd::start_on(Some(c_addr), dirs[2].path(), &cut);
    assert_eq!(a.http("DELETE", "/c/old0", b"").0, 200);
    // Its clock compared with nobody's for a while, it takes writes alone.
    eventually("c takes writes cut off", Duration::from_secs(30), || {
        let (status, body) = c.http("POST", "/c/new0/isolated", b"");
        status == 504 && body.contains("saved on 1 of 3")
    });
    for i in 1..3 {
        let (status, body) = c.http("POST", &format!("/c/new{i}/isolated"), b"");
        assert_eq!(status, 504, "{body}");
    }
    // Away longer than the grace period: it re-syncs fully on return (a
    // and b hold the delete for it, which has had no round since).
    std::thread::sleep(Duration::from_secs(5));
    assert!(c.stop("TERM").success());
    let c = return_to(c_addr, dirs[2].path(), &behind, [&a, &b]);
    for node in [&a, &b, &c] {
        for i in 0..3 {
            let (status, body) = get(node, &format!("/c/new{i}"));
            assert_eq!(status, 200, "new{i} on {}: {body}", node.addr);
        }
        assert_eq!(get(node, "/c/old0").0, 404, "on {}", node.addr);
        assert_eq!(get(node, "/c/old9").0, 200, "on {}", node.addr);
    }
}

#[test]
fn a_node_restarted_apart_from_the_members_it_remembers_does_not_claim_their_copies() {
    // b restarts while a is down: it knows a only by its address in
    // cluster.state. A write it holds alone is not on "every replica".
    let dirs: Vec<_> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    let (a, b) = two_joined(&dirs, &[]);
    assert_eq!(a.http("POST", "/c/old/v", b"").0, 200);
    eventually("b remembers a", Duration::from_secs(10), || {
        std::fs::read_to_string(dirs[1].path().join("cluster.state"))
            .is_ok_and(|s| s.contains(&format!("member {}", a.addr)))
    });
    let (a_addr, b_addr) = (a.addr, b.addr);
    assert!(b.stop("TERM").success());
    a.stop("KILL");
    let b = Dhrtd::start_on(Some(b_addr), dirs[1].path(), &["--timeout-ms", "300"]);
    // After its wait for a clock to compare with (10 s), it takes writes,
    // saved here only: 504, saying so, under the default concern `all`.
    let (status, body) = b.http("POST", "/c/new/v", b"");
    assert_eq!(status, 504, "{body}");
    assert!(body.contains("saved on 1 of 2 replicas"), "{body}");
    // A delete of a key it does not hold is written too, for a to get.
    let (status, body) = b.http("DELETE", "/c/old", b"");
    assert_eq!(status, 504, "{body}");
    let a = Dhrtd::start_on(Some(a_addr), dirs[0].path(), &[]);
    eventually("both healthy again", Duration::from_secs(30), || {
        all_healthy(&[&a, &b], 2)
    });
    eventually(
        "the write and the delete reach a",
        Duration::from_secs(30),
        || get(&a, "/c/new").0 == 200 && get(&a, "/c/old").0 == 404,
    );
    assert_eq!(b.http("POST", "/c/later/v", b"").0, 200);
}

#[test]
fn a_node_whose_cluster_state_is_damaged_refuses_to_start_alone_over_its_data() {
    let dirs: Vec<_> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    let (a, b) = two_joined(&dirs, &[]);
    assert_eq!(a.http("POST", "/c/k/v", b"").0, 200);
    let state = dirs[0].path().join("cluster.state");
    eventually("a remembers b", Duration::from_secs(10), || {
        std::fs::read_to_string(&state).is_ok_and(|s| s.contains(&format!("member {}", b.addr)))
    });
    let a_addr = a.addr;
    a.stop("KILL");
    // Emptied (a power loss on a filesystem that does not keep renames in
    // order), or overwritten: it no longer says who the members are.
    for damaged in [&b""[..], b"\xff\xfe garbage\n", b"seen 1796573197784\n"] {
        std::fs::write(&state, damaged).unwrap();
        let (code, log) = crate::faults::start_expecting_exit(dirs[0].path());
        assert_ne!(code, Some(0), "{log}");
        assert!(
            log.contains("cluster.state is damaged") && log.contains("--node ADDR"),
            "{log}"
        );
    }
    // Given a member, it starts, rejoins and keeps its data.
    let b_addr = b.addr.to_string();
    let a = Dhrtd::start_on(Some(a_addr), dirs[0].path(), &["--node", &b_addr]);
    eventually("both healthy again", Duration::from_secs(30), || {
        all_healthy(&[&a, &b], 2)
    });
    assert_eq!(get(&a, "/c/k").0, 200);
    eventually("a remembers b again", Duration::from_secs(10), || {
        std::fs::read_to_string(&state).is_ok_and(|s| s.contains(&format!("member {b_addr}")))
    });
}

#[test]
fn a_node_whose_peers_all_left_restarts_alone_and_takes_writes() {
    let dirs: Vec<_> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    let (a, b) = two_joined(&dirs, &[]);
    eventually("a remembers b", Duration::from_secs(10), || {
        std::fs::read_to_string(dirs[0].path().join("cluster.state"))
            .is_ok_and(|s| s.contains(&format!("member {}", b.addr)))
    });
    let b_addr = b.addr;
    assert!(b.stop("TERM").success());
    // a remembers that b left: a restart rejoins through it if it is
    // back, and does not wait for it as a replica.
    eventually("a remembers that b left", Duration::from_secs(10), || {
        std::fs::read_to_string(dirs[0].path().join("cluster.state")).is_ok_and(|s| {
            !s.contains(&format!("member {b_addr}")) && s.contains(&format!("left {b_addr}"))
        })
    });
    let a_addr = a.addr;
    assert!(a.stop("TERM").success());
    let a = Dhrtd::start_on(Some(a_addr), dirs[0].path(), &[]);
    let (status, body) = a.http("POST", "/c/k/v", b"");
    assert_eq!(status, 200, "{body}");
}

#[test]
fn a_seed_given_itself_as_node_runs_as_a_node_started_alone() {
    // One configuration for every node, the seed's included: the seed's
    // --node reaches the seed itself (under another name).
    let dirs: Vec<_> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    let addr = crate::dhrtd::free_addr();
    let itself = format!("localhost:{}", addr.port());
    let seed = Dhrtd::start_on(Some(addr), dirs[0].path(), &["--node", &itself]);
    assert_eq!(seed.http("POST", "/c/k/v", b"").0, 200);
    eventually(
        "the seed is healthy, not syncing",
        Duration::from_secs(10),
        || state_of(&seed, &seed.addr.to_string()).as_deref() == Some("healthy"),
    );
    // A node joining it gets its data.
    let other = start_joined(dirs[1].path(), &seed, &[]);
    eventually("both healthy", Duration::from_secs(20), || {
        all_healthy(&[&seed, &other], 2)
    });
    eventually(
        "the joiner holds the seed's key",
        Duration::from_secs(10),
        || local_keys(&other, "c") == 1,
    );
}

#[test]
fn a_restart_without_node_rejoins_the_members_it_remembers() {
    let dirs: Vec<_> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    let (a, b) = two_joined(&dirs, &[]);
    // The member list reaches cluster.state within a couple of seconds.
    eventually("b remembers a", Duration::from_secs(10), || {
        std::fs::read_to_string(dirs[1].path().join("cluster.state"))
            .is_ok_and(|s| s.contains(&format!("member {}", a.addr)))
    });
    let b_addr = b.addr;
    assert!(b.stop("TERM").success());
    assert_eq!(a.http("POST", "/after/k/v", b"").0, 200);
    let b = Dhrtd::start_on(Some(b_addr), dirs[1].path(), &[]);
    eventually("both healthy again", Duration::from_secs(20), || {
        all_healthy(&[&a, &b], 2)
    });
    eventually("b caught up", Duration::from_secs(10), || {
        get(&b, "/after/k").0 == 200
    });
}

#[test]
fn a_whole_cluster_restarts_without_node_flags() {
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let (a, b, c) = three_joined(&dirs, &[]);
    for i in 0..100 {
        assert_eq!(b.http("POST", &format!("/all/k{i}/v{i}"), b"").0, 200);
    }
    let addrs = [a.addr, b.addr, c.addr];
    for (dir, node) in dirs.iter().zip([&a, &b, &c]) {
        let others = addrs.iter().filter(|x| **x != node.addr).count();
        eventually(
            "the members are remembered",
            Duration::from_secs(10),
            || {
                let state =
                    std::fs::read_to_string(dir.path().join("cluster.state")).unwrap_or_default();
                state.matches("member ").count() == others
            },
        );
    }
    for node in [a, b, c] {
        assert!(node.stop("TERM").success());
    }
    // Everyone comes back at once, every one of them syncing: one goes
    // first with its own data, the others sync from it.
    let nodes = whole_cluster_back(dirs.iter().map(|d| d.path()), addrs, &[], 30);
    for node in &nodes {
        assert_eq!(local_keys(node, "all"), 100);
    }
    assert_eq!(nodes[2].http("POST", "/all/new/v", b"").0, 200);
    eventually(
        "a new write reaches everyone",
        Duration::from_secs(10),
        || nodes.iter().all(|n| local_keys(n, "all") == 101),
    );
}

#[test]
fn dhrt_cli_join_makes_two_running_nodes_one_cluster() {
    let dirs: Vec<_> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    let a = Dhrtd::start(dirs[0].path(), &[]);
    let b = Dhrtd::start(dirs[1].path(), &[]);
    for i in 0..50 {
        assert_eq!(a.http("POST", &format!("/joined/a{i}/v"), b"").0, 200);
        assert_eq!(b.http("POST", &format!("/joined/b{i}/v"), b"").0, 200);
    }
    let o = crate::cli::cli(&b, &["join", &a.addr.to_string()]);
    assert_eq!(o.status.code(), Some(0), "{o:?}");
    assert_eq!(
        crate::cli::out(&o),
        format!("OK: joined through {}, 2 members\n", a.addr)
    );
    eventually("both healthy", Duration::from_secs(15), || {
        all_healthy(&[&a, &b], 2)
    });
    eventually("both hold both halves", Duration::from_secs(15), || {
        local_keys(&a, "joined") == 100 && local_keys(&b, "joined") == 100
    });
    // Joining yourself, or nobody, is a readable error with exit code 2.
    let o = crate::cli::cli(&a, &["join", &a.addr.to_string()]);
    assert_eq!(o.status.code(), Some(2));
    let o = crate::cli::cli(&a, &["join", "127.0.0.1:1"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("unreachable"),
        "{o:?}"
    );
}

#[test]
fn sigterm_leaves_the_cluster() {
    let dirs: Vec<_> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    let (a, b) = two_joined(&dirs, &[]);
    let b_addr = b.addr.to_string();
    assert!(b.stop("TERM").success());
    eventually("the stopped node is left", Duration::from_secs(5), || {
        state_of(&a, &b_addr).as_deref() == Some("left")
    });
    // The one that stays keeps serving writes at once (nobody to wait for).
    let t = Instant::now();
    assert_eq!(a.http("POST", "/after/k/v", b"").0, 200);
    assert!(t.elapsed() < Duration::from_secs(5));
}

#[test]
fn a_node_joining_a_loaded_node_under_writes_ends_equal() {
    let dirs: Vec<_> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    let a = Dhrtd::start(dirs[0].path(), &[]);
    let addr = a.addr;
    let rt = tokio::runtime::Runtime::new().unwrap();
    let load = |from: u32, to: u32| {
        rt.block_on(async {
            let client = dhrt_client::Client::connect(addr).await.unwrap();
            let ops: Vec<dhrt_proto::Op> = (from..to)
                .map(|i| dhrt_proto::Op::Set {
                    collection: "load".into(),
                    key: format!("key-{i}").into(),
                    value: format!("value-{i}").into(),
                })
                .collect();
            for chunk in ops.chunks(1000) {
                for r in client.pipeline(chunk.to_vec()).await.unwrap() {
                    r.unwrap();
                }
            }
        })
    };
    load(0, 20_000);
    // Writes continue while b joins and receives its handoff.
    let b = std::thread::scope(|s| {
        let writer = s.spawn(|| load(20_000, 30_000));
        let b = start_joined(dirs[1].path(), &a, &[]);
        writer.join().unwrap();
        b
    });
    eventually(
        "both healthy after the handoff",
        Duration::from_secs(30),
        || all_healthy(&[&a, &b], 2),
    );
    eventually(
        "b holds everything a holds",
        Duration::from_secs(15),
        || local_keys(&b, "load") == 30_000,
    );
    assert_eq!(local_keys(&a, "load"), 30_000);
    eventually("equal digests", Duration::from_secs(10), || {
        digest_of(&a, "load") == digest_of(&b, "load")
    });
    assert_eq!(digest_of(&a, "load").len(), 16);
    let (_, listing_a) = get(&a, "/load");
    let (_, listing_b) = get(&b, "/load");
    let sorted = |s: &str| {
        let mut v: Vec<Value> = serde_json::from_str::<Vec<Value>>(s).unwrap();
        v.sort_by_key(|e| e["Key"].as_str().unwrap().to_string());
        v
    };
    assert_eq!(sorted(&listing_a), sorted(&listing_b));
}

#[test]
fn a_peer_without_the_secret_is_refused() {
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let a = Dhrtd::start(
        dirs[0].path(),
        &[
            "--cluster-secret",
            "correct horse battery staple, stapled twice",
        ],
    );
    let stranger = start_joined(
        dirs[1].path(),
        &a,
        &[
            "--cluster-secret",
            "a wrong secret of thirty-two bytes or more",
        ],
    );
    let anonymous = start_joined(dirs[2].path(), &a, &[]);
    std::thread::sleep(Duration::from_secs(2));
    for n in [&a, &stranger, &anonymous] {
        assert_eq!(stats(n)["members"].as_array().unwrap().len(), 1);
    }
    drop((stranger, anonymous));
    let dir = tempfile::tempdir().unwrap();
    let friend = start_joined(
        dir.path(),
        &a,
        &[
            "--cluster-secret",
            "correct horse battery staple, stapled twice",
        ],
    );
    eventually("the friend is in", Duration::from_secs(15), || {
        all_healthy(&[&a, &friend], 2)
    });
}

/// A newcomer still receiving its handoff holds part of each collection.
/// A listing through it is an owner's that does not sync, so it lists what
/// it has not received yet, also of a collection none of whose keys has
/// arrived (the handoff named it). And `DELETE /x` through it, which holds no key
/// of `x` yet: under `all` an owner usually asks no one (an acknowledged
/// collection write is on every owner), but a node that syncs holds
/// nothing that says so. It asks, and drops the collection, instead of
/// deleting a key `x` of `default` that is not there (a 404).
#[test]
fn a_newcomer_mid_handoff_lists_what_it_lacks_and_drops_a_collection_it_lacks() {
    let args = ["--move-rate-mib", "1", "--write-ack", "all"];
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let (a, b) = two_joined(&dirs, &args);
    let value = vec![b'v'; 50_000];
    for i in 0..200 {
        assert_eq!(a.http("PUT", &format!("/big/k{i}"), &value).0, 200);
    }
    for i in 0..20 {
        assert_eq!(a.http("PUT", &format!("/small/k{i}"), b"v").0, 200);
    }
    eventually("b holds every key", Duration::from_secs(20), || {
        local_keys(&b, "big") == 200 && local_keys(&b, "small") == 20
    });
    // The handoff goes in name order: `big` first, at 1 MiB/s.
    let newcomer = start_joined(dirs[2].path(), &a, &args);
    eventually(
        "the newcomer is receiving big",
        Duration::from_secs(20),
        || (1..150).contains(&local_keys(&newcomer, "big")),
    );
    assert_eq!(local_keys(&newcomer, "small"), 0, "small arrived first");
    let (status, body) = newcomer.http("GET", "/big", b"");
    assert_eq!(status, 200);
    let listed: Vec<Value> = serde_json::from_str(&body).unwrap();
    assert_eq!(listed.len(), 200, "listed from its partial copy");
    assert!(
        local_keys(&newcomer, "big") < 200,
        "the handoff ended first"
    );
    // `small` is named by the handoff before any key of it arrives: the
    // collection, not a key `small` of `default`.
    let (status, body) = newcomer.http("GET", "/small", b"");
    assert_eq!(status, 200, "{body}");
    let listed: Vec<Value> = serde_json::from_str(&body).unwrap();
    assert_eq!(listed.len(), 20, "{body}");
    let (status, body) = newcomer.http("DELETE", "/small", b"");
    assert_eq!(status, 200, "{body}");
    assert!(!body.contains("\"Key\""), "a key was deleted: {body}");
    eventually(
        "small is dropped everywhere",
        Duration::from_secs(30),
        || {
            [&a, &b, &newcomer]
                .iter()
                .all(|n| local_keys(n, "small") == 0 && get(n, "/small/k3").0 == 404)
        },
    );
}
