//! `--replicas 2` on real `dhrtd` processes: each collection is stored on
//! exactly its two owners (as every node's `GET /` says), readable and
//! writable through every node; a member joining takes only the
//! collections it now owns, and the copies it replaces are released.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use crate::cluster::{all_healthy, eventually, local_keys, start_joined, stats};
use crate::dhrtd::Dhrtd;

/// Which nodes (by id) hold keys of each collection, and the owners each
/// holder names for it.
fn placement(nodes: &[&Dhrtd]) -> BTreeMap<String, (BTreeSet<String>, BTreeSet<String>)> {
    let mut out: BTreeMap<String, (BTreeSet<String>, BTreeSet<String>)> = BTreeMap::new();
    for n in nodes {
        let s = stats(n);
        let id = s["node"]["id"].as_str().unwrap().to_string();
        for c in s["collections"].as_array().unwrap() {
            let e = out
                .entry(c["name"].as_str().unwrap().to_string())
                .or_default();
            e.0.insert(id.clone());
            assert_eq!(c["replicas"], "2", "{c}");
            e.1.extend(
                c["owners"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|o| o.as_str().unwrap().to_string()),
            );
        }
    }
    out
}

/// Every collection is held by exactly its two owners, as all holders say.
fn on_owners(nodes: &[&Dhrtd], collections: usize) -> bool {
    let p = placement(nodes);
    p.len() == collections
        && p.values()
            .all(|(held, owners)| held.len() == 2 && held == owners)
}

fn readable_everywhere(nodes: &[&Dhrtd], collections: usize) {
    for (i, n) in nodes.iter().enumerate() {
        for c in 0..collections {
            // Listed through every node, owner or not.
            let (status, body) = n.http("GET", &format!("/c{c}"), b"");
            assert_eq!(status, 200, "c{c} through node {i}: {body}");
            let listed: serde_json::Value = serde_json::from_str(&body).unwrap();
            assert_eq!(
                listed.as_array().map(Vec::len),
                Some(3),
                "c{c} through node {i}: {body}"
            );
            for k in 0..3 {
                let (status, body) = n.http("GET", &format!("/c{c}/k{k}"), b"");
                assert_eq!(status, 200, "c{c}/k{k} through node {i}: {body}");
                assert!(body.contains(&format!("\"v{c}.{k}\"")), "{body}");
            }
        }
    }
}

#[test]
fn two_replicas_on_five_nodes_then_a_sixth_joins() {
    let dirs: Vec<_> = (0..6).map(|_| tempfile::tempdir().unwrap()).collect();
    let flags = ["--replicas", "2"];
    let a = Dhrtd::start(dirs[0].path(), &flags);
    let mut others = Vec::new();
    for d in &dirs[1..5] {
        others.push(start_joined(d.path(), &a, &flags));
    }
    let mut nodes: Vec<&Dhrtd> = std::iter::once(&a).chain(others.iter()).collect();
    eventually("five healthy members", Duration::from_secs(20), || {
        all_healthy(&nodes, 5)
    });
    let collections = 20;
    for c in 0..collections {
        for k in 0..3 {
            let n = nodes[(c + k) % nodes.len()];
            let (status, body) = n.http("POST", &format!("/c{c}/k{k}/v{c}.{k}"), b"");
            assert_eq!(status, 200, "{body}");
        }
    }
    eventually(
        "each collection on its two owners",
        Duration::from_secs(20),
        || on_owners(&nodes, collections),
    );
    readable_everywhere(&nodes, collections);
    let before = placement(&nodes);

    let f = start_joined(dirs[5].path(), &a, &flags);
    nodes.push(&f);
    eventually("six healthy members", Duration::from_secs(20), || {
        all_healthy(&nodes, 6)
    });
    let newcomer = stats(&f)["node"]["id"].as_str().unwrap().to_string();
    eventually(
        "each collection on its two owners, six members",
        Duration::from_secs(30),
        || on_owners(&nodes, collections),
    );
    readable_everywhere(&nodes, collections);
    let after = placement(&nodes);
    let mut moved = 0;
    for (c, (held, _)) in &after {
        let was = &before[c].0;
        if held.contains(&newcomer) {
            moved += 1;
            assert_eq!(held.difference(was).count(), 1, "{c}: {was:?} -> {held:?}");
        } else {
            assert_eq!(held, was, "{c} moved, and not to the newcomer");
        }
    }
    assert!(moved > 0, "the newcomer owns nothing");
    // The metrics count no under-replicated collection: six members can
    // own every one.
    let (_, metrics) = a.http("GET", "/metrics", b"");
    assert!(
        metrics.contains("dhrt_collections_under_replicated 0"),
        "{metrics}"
    );
}

/// The nodes holding keys of `collection`.
fn holders_of(nodes: &[&Dhrtd], collection: &str) -> usize {
    nodes
        .iter()
        .filter(|n| {
            stats(n)["collections"]
                .as_array()
                .unwrap()
                .iter()
                .any(|c| c["name"] == collection && c["keys"].as_u64() > Some(0))
        })
        .count()
}

#[test]
fn a_collection_replication_factor_set_through_the_api_round_trips() {
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let (a, b, c) = crate::cluster::three_joined(&dirs, &[]);
    let nodes = [&a, &b, &c];
    for k in 0..20 {
        assert_eq!(a.http("POST", &format!("/users/k{k}/v{k}"), b"").0, 200);
    }
    assert_eq!(holders_of(&nodes, "users"), 3);
    let (status, body) = b.http("GET", "/users?replicas", b"");
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        (v["Collection"].as_str(), v["Replicas"].as_str()),
        (Some("users"), Some("all"))
    );
    assert_eq!(v["Owners"].as_array().unwrap().len(), 3);

    // all -> 1 over HTTP on one node: every node agrees, the data ends on
    // the one owner, and nothing is lost.
    let (status, body) = a.http("PUT", "/users?replicas=1", b"");
    assert_eq!(status, 200, "{body}");
    eventually("every node says 1 replica", Duration::from_secs(10), || {
        nodes.iter().all(|n| {
            n.http("GET", "/users?replicas", b"")
                .1
                .contains("\"Replicas\":\"1\"")
        })
    });
    eventually("users on one node", Duration::from_secs(20), || {
        holders_of(&nodes, "users") == 1
    });
    for n in nodes {
        for k in 0..20 {
            let (status, body) = n.http("GET", &format!("/users/k{k}"), b"");
            assert_eq!(status, 200, "{body}");
            assert!(body.contains(&format!("\"v{k}\"")), "{body}");
        }
    }
    // 1 -> 2 with the CLI, then the cluster's default back to all and the
    // collection's own setting with it: on every node again.
    let o = crate::cli::cli(&c, &["replicas", "users", "2"]);
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(
        crate::cli::out(&o).starts_with("users: 2 replicas, owners "),
        "{}",
        crate::cli::out(&o)
    );
    eventually("users on two nodes", Duration::from_secs(20), || {
        holders_of(&nodes, "users") == 2
    });
    let o = crate::cli::cli(&c, &["replicas", "users", "all"]);
    assert_eq!(o.status.code(), Some(0));
    eventually("users on every node", Duration::from_secs(30), || {
        holders_of(&nodes, "users") == 3
    });
    for n in nodes {
        assert_eq!(crate::cluster::local_keys(n, "users"), 20);
    }
    // Bad input: a clear error, nothing changed.
    assert_eq!(a.http("PUT", "/users?replicas=0", b"").0, 400);
    assert_eq!(a.http("PUT", "/users?replicas=many", b"").0, 400);
    assert_eq!(a.http("PUT", "/_replicas?replicas=1", b"").0, 400);
    assert_eq!(
        a.http("GET", "/?replicas", b"").1,
        "{\"Collection\":\"*\",\"Owners\":[],\"Replicas\":\"all\",\"UnderReplicated\":false}"
    );
}

/// A member that left with SIGTERM, and returns (same data directory)
/// after the cluster deleted its keys and forgot the deletes, must not
/// bring them back: it handed its copies over and released them when it
/// left, and whatever stayed on its disk is not pushed as news.
#[test]
fn a_member_back_after_the_tombstone_grace_brings_nothing_deleted_back() {
    let flags = ["--replicas", "1", "--tombstone-grace-secs", "2"];
    let dirs: Vec<_> = (0..4).map(|_| tempfile::tempdir().unwrap()).collect();
    // Fixed node ids, so that the placement is too: with random ones `d`
    // owns none of the twelve collections one time in thirty ((3/4)^12),
    // and there is nothing to bring back.
    for (dir, id) in dirs.iter().zip([0xa1u64, 0xb2, 0xc3, 0xd4]) {
        std::fs::write(dir.path().join("node.id"), format!("{id:016x}\n")).unwrap();
    }
    let a = Dhrtd::start(dirs[0].path(), &flags);
    let b = start_joined(dirs[1].path(), &a, &flags);
    let c = start_joined(dirs[2].path(), &a, &flags);
    let d = start_joined(dirs[3].path(), &a, &flags);
    eventually("four healthy members", Duration::from_secs(20), || {
        all_healthy(&[&a, &b, &c, &d], 4)
    });
    for c_ in 0..12 {
        for k in 0..4 {
            let (status, body) = a.http("POST", &format!("/g{c_}/k{k}/v"), b"");
            assert_eq!(status, 200, "{body}");
        }
    }
    let d_addr = d.addr;
    let held: Vec<String> = stats(&d)["collections"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap().to_string())
        .collect();
    assert!(!held.is_empty(), "d owns nothing");
    assert!(d.stop("TERM").success());
    eventually("d has left", Duration::from_secs(10), || {
        crate::cluster::state_of(&a, &d_addr.to_string()).as_deref() == Some("left")
    });
    for c_ in 0..12 {
        for k in 0..4 {
            let (status, body) = b.http("DELETE", &format!("/g{c_}/k{k}"), b"");
            assert_eq!(status, 200, "g{c_}/k{k}: {body}");
        }
    }
    // Past the grace, compaction purges the tombstones.
    std::thread::sleep(Duration::from_secs(5));
    let d = Dhrtd::start_on(Some(d_addr), dirs[3].path(), &flags);
    let all = [&a, &b, &c, &d];
    eventually("d back and healthy", Duration::from_secs(30), || {
        all_healthy(&all, 4)
    });
    std::thread::sleep(Duration::from_secs(4));
    for n in all {
        for c_ in 0..12 {
            for k in 0..4 {
                let (status, body) = n.http("GET", &format!("/g{c_}/k{k}"), b"");
                assert_eq!(status, 404, "g{c_}/k{k} came back: {body}");
            }
        }
    }
}

/// Through a node that does not store a collection, a key whose owner does
/// not answer in time is not "not found", and a listing is not cut short
/// as if the owner's keys did not exist: both are 503, and both answer
/// again once the owner does.
#[test]
fn an_owner_that_does_not_answer_is_not_taken_for_a_missing_key() {
    let (_dirs, a, b, on_b) = one_owner_each();
    b.signal("STOP");
    let (status, body) = a.http("GET", &format!("/{on_b}/k"), b"");
    let (list_status, list_body) = a.http("GET", &format!("/{on_b}"), b"");
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("did not answer"), "{body}");
    assert_eq!(list_status, 503, "{list_body}");
    // Once b is judged dead it is no longer asked; still not "not found",
    // nor an empty listing.
    let b_addr = b.addr.to_string();
    eventually("a judges b dead", Duration::from_secs(20), || {
        crate::cluster::state_of(&a, &b_addr).as_deref() == Some("dead")
    });
    let (status, body) = a.http("GET", &format!("/{on_b}/k"), b"");
    assert_eq!(status, 503, "{body}");
    let (status, body) = a.http("GET", &format!("/{on_b}"), b"");
    assert_eq!(status, 503, "{body}");
    b.signal("CONT");
    eventually("b answers again", Duration::from_secs(20), || {
        a.http("GET", &format!("/{on_b}/k"), b"").0 == 200
    });
}

/// A write through a node that does not own its collection, that no owner
/// acknowledged, is not kept in that node's memory alone: it is saved in
/// its store (the 504 says so) and reaches the owner once the owner is
/// back, though the node was killed in between.
#[test]
fn a_forwarded_write_no_owner_took_survives_the_forwarding_node_crashing() {
    let (dirs, a, b, on_b) = one_owner_each();
    b.signal("STOP");
    let (status, body) = a.http("POST", &format!("/{on_b}/late/kept"), b"");
    assert_eq!(status, 504, "{body}");
    assert!(body.contains("kept on this node"), "{body}");
    assert!(
        body.contains("saved on 0 of 1 replicas (1 needed)"),
        "{body}"
    );
    // Once a takes b for down, it stores the next write itself, and that
    // copy is no replica either: the 504 does not count it as one.
    let b_addr = b.addr.to_string();
    eventually("a takes b for down", Duration::from_secs(15), || {
        stats(&a)["members"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m["addr"] == b_addr.as_str() && m["state"] != "healthy")
    });
    let (status, body) = a.http("POST", &format!("/{on_b}/later/kept"), b"");
    assert_eq!(status, 504, "{body}");
    assert!(
        body.contains("saved on 0 of 1 replicas (1 needed), kept on this node"),
        "{body}"
    );
    let a_addr = a.addr;
    assert!(a.stop("KILL").code().is_none());
    b.signal("CONT");
    let a = Dhrtd::start_on(Some(a_addr), dirs[0].path(), &ONE_OWNER);
    eventually("b has the write a kept", Duration::from_secs(30), || {
        b.http("GET", &format!("/{on_b}/late"), b"").0 == 200
    });
    assert_eq!(b.get_raw(&format!("/{on_b}/late")).1, b"kept");
    eventually(
        "b has the second write a kept",
        Duration::from_secs(30),
        || b.http("GET", &format!("/{on_b}/later"), b"").0 == 200,
    );
    drop(a);
}

/// How many collections the one-owner tests write: node ids are random,
/// so each collection's owner is a coin toss, and with 8 all fell to one
/// node once in CI (1 in 256). With 24, one in 16 million.
const COLLECTIONS: usize = 24;

/// One owner a collection, and a short timeout.
const ONE_OWNER: [&str; 4] = ["--replicas", "1", "--timeout-ms", "200"];

/// Two nodes started with [`ONE_OWNER`], collections c0..c23
/// written through the first; and a collection the second owns (and the
/// first does not store).
fn one_owner_each() -> (Vec<tempfile::TempDir>, Dhrtd, Dhrtd, String) {
    let dirs: Vec<_> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    let a = Dhrtd::start(dirs[0].path(), &ONE_OWNER);
    let b = start_joined(dirs[1].path(), &a, &ONE_OWNER);
    eventually("a and b are healthy", Duration::from_secs(15), || {
        all_healthy(&[&a, &b], 2)
    });
    for c in 0..COLLECTIONS {
        assert_eq!(a.http("POST", &format!("/c{c}/k/v{c}"), b"").0, 200);
    }
    let on_b = eventually_value(|| {
        let held: Vec<String> = stats(&b)["collections"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|c| c["keys"].as_u64() > Some(0))
            .map(|c| c["name"].as_str().unwrap().to_string())
            .filter(|n| n.starts_with('c'))
            .collect();
        held.into_iter().find(|n| holders_of(&[&a], n) == 0)
    });
    (dirs, a, b, on_b)
}

/// Waits (up to 15 s) for `f` to find something.
fn eventually_value<T>(mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(std::time::Instant::now() < deadline, "nothing found");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A node whose clock is behind, writing through to a collection it does
/// not own, has never seen the owner's versions: a write (or delete) it
/// forwards after one the owner acknowledged must still win, not be
/// acknowledged and then lose. The owner says it holds a newer version,
/// and the forwarding node stamps the write again, later.
#[test]
fn a_write_forwarded_by_a_node_whose_clock_is_behind_wins_over_the_one_before() {
    let behind = [&ONE_OWNER[..], &["--clock-offset-ms", "-2000"]].concat();
    let (_dirs, nodes, on_a) = owned_by_the_first(&[ONE_OWNER.to_vec(), behind]);
    let (a, b) = (&nodes[0], &nodes[1]);
    for i in 0..10 {
        let (status, body) = a.http("POST", &format!("/{on_a}/k{i}/first"), b"");
        assert_eq!(status, 200, "{body}");
        let (status, body) = b.http("POST", &format!("/{on_a}/k{i}/second"), b"");
        assert_eq!(status, 200, "{body}");
        for n in [&a, &b] {
            assert_eq!(
                n.get_raw(&format!("/{on_a}/k{i}")).1,
                b"second",
                "k{i} through {}",
                n.addr
            );
        }
        let (status, body) = a.http("POST", &format!("/{on_a}/d{i}/alive"), b"");
        assert_eq!(status, 200, "{body}");
        let (status, body) = b.http("DELETE", &format!("/{on_a}/d{i}"), b"");
        assert_eq!(status, 200, "{body}");
        for n in [&a, &b] {
            let (status, body) = n.http("GET", &format!("/{on_a}/d{i}"), b"");
            assert_eq!(status, 404, "d{i} through {}: {body}", n.addr);
        }
    }
}

/// The same with the owner down, so that no replica can tell the node
/// behind that it holds a newer version: the node stamps by its peers'
/// latest clock it admits (the owner's, measured before it went down), so
/// its write and its delete, made after the owner's write, still win once
/// the owner is back. Before, both were silently undone: the owner's older
/// write carried the later stamp.
#[test]
fn a_write_through_a_node_whose_clock_is_behind_wins_while_the_owner_is_down() {
    later_write_through_the_last_wins_with_the_owner_down(&["0", "-5000"]);
}

/// The same across a gap wider than the allowed offset (60 s): the owner
/// 50 s ahead, a third node at 0, the writer 15 s behind. The writer
/// admits the owner's stamps (by the cluster's middle clock), so it follows
/// the owner's clock too, not only the peers within 60 s of its own.
#[test]
fn a_write_through_a_node_far_behind_the_owner_wins_while_the_owner_is_down() {
    later_write_through_the_last_wins_with_the_owner_down(&["50000", "0", "-15000"]);
}

/// The same through the node in the middle (owner +50 s, writer 0, a node
/// 15 s behind), and along a chain of clocks 0, +40 s and +80 s (owner
/// +80 s, writer +40 s): every node follows the latest clock the cluster
/// does not find skewed (before, the writer followed a lower one, capped by
/// the slowest node's wall clock, and its write lost).
#[test]
fn a_later_write_wins_with_the_owner_down_in_other_clock_layouts() {
    later_write_through_the_last_wins_with_the_owner_down(&["50000", "-15000", "0"]);
    later_write_through_the_last_wins_with_the_owner_down(&["80000", "0", "40000"]);
}

/// Nodes with these clock offsets (ms), `--replicas 1`: a key set and one
/// to delete through the first (the owner), which is then killed; a set and
/// a delete through the last; the owner restarted. The later set and the
/// delete must win on every node.
fn later_write_through_the_last_wins_with_the_owner_down(offsets: &[&str]) {
    let flags: Vec<Vec<&str>> = offsets
        .iter()
        .map(|o| [&ONE_OWNER[..], &["--clock-offset-ms", o]].concat())
        .collect();
    let (dirs, mut nodes, on_a) = owned_by_the_first(&flags);
    for key in ["k", "gone"] {
        let (status, body) = nodes[0].http("POST", &format!("/{on_a}/{key}/old"), b"");
        assert_eq!(status, 200, "{body}");
    }
    std::thread::sleep(Duration::from_millis(500));
    let a = nodes.remove(0);
    let a_addr = a.addr;
    a.stop("KILL");
    let writer = nodes.last().unwrap();
    let (status, body) = writer.http("POST", &format!("/{on_a}/k/new"), b"");
    assert!(status == 200 || status == 504, "{status} {body}");
    let (status, body) = writer.http("DELETE", &format!("/{on_a}/gone"), b"");
    assert!(status == 200 || status == 504, "{status} {body}");
    nodes.push(Dhrtd::start_on(Some(a_addr), dirs[0].path(), &flags[0]));
    eventually(
        "the later write and delete win everywhere",
        Duration::from_secs(30),
        || {
            nodes.iter().all(|n| {
                n.get_raw(&format!("/{on_a}/k")) == (200, b"new".to_vec())
                    && n.http("GET", &format!("/{on_a}/gone"), b"").0 == 404
            })
        },
    );
}

/// Nodes started with these flags, joined through the first, every one
/// healthy, collections c0..c23 written through the first; and one of them
/// only the first holds.
fn owned_by_the_first(flags: &[Vec<&str>]) -> (Vec<tempfile::TempDir>, Vec<Dhrtd>, String) {
    let dirs: Vec<_> = flags.iter().map(|_| tempfile::tempdir().unwrap()).collect();
    let first = Dhrtd::start(dirs[0].path(), &flags[0]);
    let mut nodes = vec![];
    for (dir, f) in dirs.iter().zip(flags).skip(1) {
        nodes.push(start_joined(dir.path(), &first, f));
    }
    nodes.insert(0, first);
    let all: Vec<&Dhrtd> = nodes.iter().collect();
    eventually("every node healthy", Duration::from_secs(20), || {
        all_healthy(&all, all.len())
    });
    // Until every node has measured every clock, one far behind the first
    // may refuse its stamps for a moment.
    for c in 0..COLLECTIONS {
        eventually("a write through the first", Duration::from_secs(10), || {
            nodes[0].http("POST", &format!("/c{c}/k/v{c}"), b"").0 == 200
        });
    }
    let on_a = eventually_value(|| {
        (0..COLLECTIONS)
            .map(|c| format!("c{c}"))
            .find(|n| holders_of(&all[..1], n) == 1 && holders_of(&all[1..], n) == 0)
    });
    (dirs, nodes, on_a)
}

/// A delete through a node that does not own the collection, while its
/// owner is down, under `--write-ack local`: the node cannot tell whether
/// the key exists (a read says 503), so the delete, written and due to
/// reach the owner, is no 404 "not found" (before, it was, for a key the
/// owner held); and it takes effect once the owner is back.
#[test]
fn a_delete_no_owner_could_answer_for_is_no_404() {
    let local = [&ONE_OWNER[..], &["--write-ack", "local"]].concat();
    let (dirs, mut nodes, on_a) = owned_by_the_first(&[local.clone(), local.clone()]);
    let (b, a) = (nodes.pop().unwrap(), nodes.pop().unwrap());
    assert_eq!(a.http("POST", &format!("/{on_a}/gone/v"), b"").0, 200);
    // With the owner up, a key no one has is 404 through either node.
    for n in [&a, &b] {
        let (status, body) = n.http("DELETE", &format!("/{on_a}/nokey"), b"");
        assert_eq!(status, 404, "through {}: {body}", n.addr);
    }
    let a_addr = a.addr;
    a.stop("KILL");
    eventually("b takes a for down", Duration::from_secs(15), || {
        b.http("GET", &format!("/{on_a}/gone"), b"").0 == 503
    });
    let (status, body) = b.http("DELETE", &format!("/{on_a}/gone"), b"");
    assert_eq!(status, 200, "{body}");
    let a = Dhrtd::start_on(Some(a_addr), dirs[0].path(), &local);
    eventually(
        "the delete reaches the owner",
        Duration::from_secs(30),
        || {
            [&a, &b]
                .iter()
                .all(|n| n.http("GET", &format!("/{on_a}/gone"), b"").0 == 404)
        },
    );
}

/// A whole cluster killed at once and restarted without one member: the
/// others remember it (its id, from `cluster.state`) as a dead member that
/// still owns its collections. A key it holds is unavailable (503), not
/// "not found", and the member shows as dead; once it is back, the key is
/// read again. Before, the survivors did not know it, took its collections
/// over with no data, and answered 404.
#[test]
fn a_member_missing_from_a_whole_cluster_restart_still_owns_its_collections() {
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let (a, b, c) = three_with_a_key_in_each(&dirs);
    let on_c = eventually_value(|| {
        (0..COLLECTIONS)
            .map(|i| format!("c{i}"))
            .find(|n| holders_of(&[&c], n) == 1 && holders_of(&[&a, &b], n) == 0)
    });
    let value = format!("v{}", &on_c[1..]);
    // Every node has written its members down (once a second).
    std::thread::sleep(Duration::from_millis(1500));
    let addrs = [a.addr, b.addr, c.addr];
    for n in [a, b, c] {
        n.stop("KILL");
    }
    let a = Dhrtd::start_on(Some(addrs[0]), dirs[0].path(), &ONE_OWNER);
    // Alone, a holds a write to c's collection as no replica of it: said
    // so (before, it took itself for the owner of everything and said 200).
    let (status, body) = a.http("PUT", &format!("/{on_c}/k3"), b"alone");
    assert_eq!(status, 504, "{body}");
    let b = Dhrtd::start_on(Some(addrs[1]), dirs[1].path(), &ONE_OWNER);
    let c_addr = addrs[2].to_string();
    for n in [&a, &b] {
        eventually("c is known as dead", Duration::from_secs(20), || {
            crate::cluster::state_of(n, &c_addr).as_deref() == Some("dead")
        });
    }
    // Through the start (syncing, waiting for c) and after it, never 404.
    let started = std::time::Instant::now();
    while started.elapsed() < Duration::from_secs(45) {
        for n in [&a, &b] {
            let (status, body) = n.http("GET", &format!("/{on_c}/k"), b"");
            assert_ne!(status, 404, "{on_c}/k at {}: {body}", n.addr);
            assert_ne!(status, 200, "{on_c}/k at {}: {body}", n.addr);
        }
        if all_healthy_but(&[&a, &b], &c_addr) {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(all_healthy_but(&[&a, &b], &c_addr), "a and b never healthy");
    let (status, body) = a.http("GET", &format!("/{on_c}/k"), b"");
    assert_eq!(status, 503, "{body}");
    // A write meanwhile is saved, said to be late (no owner took it), and
    // reaches c once it is back.
    let (status, body) = b.http("PUT", &format!("/{on_c}/k2"), b"meanwhile");
    assert_eq!(status, 504, "{body}");
    let c = Dhrtd::start_on(Some(addrs[2]), dirs[2].path(), &ONE_OWNER);
    eventually("c's key is read again", Duration::from_secs(30), || {
        a.get_raw(&format!("/{on_c}/k")) == (200, value.clone().into_bytes())
    });
    eventually(
        "the writes made meanwhile are on c",
        Duration::from_secs(30),
        || {
            c.get_raw(&format!("/{on_c}/k2")) == (200, b"meanwhile".to_vec())
                && c.get_raw(&format!("/{on_c}/k3")) == (200, b"alone".to_vec())
                && local_keys(&c, &on_c) == 3
        },
    );
    eventually("all three healthy", Duration::from_secs(30), || {
        all_healthy(&[&a, &b, &c], 3)
    });
}

/// Every node sees the others healthy, and the member at `dead` dead.
fn all_healthy_but(nodes: &[&Dhrtd], dead: &str) -> bool {
    nodes.iter().all(|n| {
        let s = stats(n);
        let members = s["members"].as_array().unwrap();
        members.len() == nodes.len() + 1
            && members.iter().all(|m| {
                let want = if m["addr"] == dead { "dead" } else { "healthy" };
                m["state"] == want
            })
    })
}

/// A member that left while another was down is not brought back by that
/// one's memory of it: after a whole-cluster restart the two agree it
/// left (before `known` lines said whether a member had left, the one that
/// missed the leave remembered it as a dead member owning collections).
/// And what it held for the member that was down is not lost with it.
#[test]
fn a_member_that_left_while_another_was_down_stays_left_after_a_restart() {
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let (a, b, c) = three_with_a_key_in_each(&dirs);
    std::thread::sleep(Duration::from_millis(1500));
    let addrs = [a.addr, b.addr, c.addr];
    let c_addr = addrs[2].to_string();
    b.stop("KILL");
    assert!(c.stop("TERM").success());
    eventually("a saw c leave", Duration::from_secs(20), || {
        crate::cluster::state_of(&a, &c_addr).as_deref() == Some("left")
    });
    std::thread::sleep(Duration::from_millis(1500));
    a.stop("KILL");
    let a = Dhrtd::start_on(Some(addrs[0]), dirs[0].path(), &ONE_OWNER);
    let b = Dhrtd::start_on(Some(addrs[1]), dirs[1].path(), &ONE_OWNER);
    eventually(
        "a and b see each other healthy",
        Duration::from_secs(60),
        || {
            [&a, &b].iter().all(|n| {
                stats(n)["members"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .filter(|m| m["state"] == "healthy")
                    .count()
                    == 2
            })
        },
    );
    for n in [&a, &b] {
        eventually("c is left", Duration::from_secs(10), || {
            crate::cluster::state_of(n, &c_addr).as_deref() == Some("left")
        });
    }
    // And stays so: neither brings it back from its memory (before, b
    // did, and gossiped it to a).
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(
        crate::cluster::state_of(&a, &c_addr).as_deref(),
        Some("left")
    );
    assert_eq!(
        crate::cluster::state_of(&b, &c_addr).as_deref(),
        Some("left")
    );
    // Every key reads: c handed the collections whose new owner (b) was
    // down to a, standing in, which handed them to b once it was back.
    // Before, they stayed in c's data directory alone, and read 404.
    for i in 0..COLLECTIONS {
        for n in [&a, &b] {
            let path = format!("/c{i}/k");
            eventually("every key reads", Duration::from_secs(30), || {
                n.get_raw(&path) == (200, format!("v{i}").into_bytes())
            });
        }
    }
}

/// Three nodes joined with [`ONE_OWNER`], and key `k` = `v{i}` written in
/// each collection `c{i}` of c0..c23.
fn three_with_a_key_in_each(dirs: &[tempfile::TempDir]) -> (Dhrtd, Dhrtd, Dhrtd) {
    let (a, b, c) = crate::cluster::three_joined(dirs, &ONE_OWNER);
    for i in 0..COLLECTIONS {
        assert_eq!(a.http("POST", &format!("/c{i}/k/v{i}"), b"").0, 200);
    }
    (a, b, c)
}

/// A write every owner refuses, that the node it went through could not
/// keep either, is saved nowhere: 503 saying so, not a 504 "saved on 0 of
/// 1 replicas … will reach the others"; and its collection is not
/// registered (its name does not become an empty collection everywhere).
/// Here both nodes reach `--max-collections`.
#[test]
fn a_write_no_node_could_take_is_answered_not_saved_and_registers_nothing() {
    let dirs: Vec<_> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    let flags = [&ONE_OWNER[..], &["--max-collections", "4"]].concat();
    let a = Dhrtd::start(dirs[0].path(), &flags);
    let b = start_joined(dirs[1].path(), &a, &flags);
    eventually("a and b are healthy", Duration::from_secs(15), || {
        all_healthy(&[&a, &b], 2)
    });
    let (mut saved, mut not_saved) = (Vec::new(), Vec::new());
    for i in 0..40 {
        let (status, body) = a.http("POST", &format!("/x{i}/k/v"), b"");
        match status {
            200 | 504 => saved.push(i),
            503 => {
                if body.contains("the write is not saved: every replica refused it") {
                    not_saved.push(i);
                }
            }
            _ => panic!("x{i}: {status} {body}"),
        }
    }
    assert!(
        !saved.is_empty() && !not_saved.is_empty(),
        "{saved:?} {not_saved:?}"
    );
    for i in not_saved {
        for n in [&a, &b] {
            let (status, body) = n.http("GET", &format!("/x{i}?limit=1"), b"");
            assert_ne!(status, 200, "x{i} on {}: {body}", n.addr);
        }
    }
    for i in saved {
        let held = [&a, &b]
            .iter()
            .any(|n| n.http("GET", &format!("/x{i}/k"), b"").0 == 200);
        assert!(held, "x{i} was answered saved but reads nowhere");
    }
}

/// A member restarted with another `--replicas` than its peers computes
/// other owners: with 1, it owns about half of what it held under 2, and
/// would hand the rest to the one owner it computes and release it, while
/// its peers still count it as the second copy (one failure would then
/// lose those collections). It asks its peers their factor first, and
/// keeps every copy while they disagree, saying why.
#[test]
fn a_member_restarted_with_another_replication_factor_releases_nothing() {
    let args = ["--replicas", "2"];
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let a = Dhrtd::start(dirs[0].path(), &args);
    let b = start_joined(dirs[1].path(), &a, &args);
    let c = start_joined(dirs[2].path(), &a, &args);
    eventually("three healthy members", Duration::from_secs(15), || {
        all_healthy(&[&a, &b, &c], 3)
    });
    const COLLECTIONS: usize = 20;
    for i in 0..COLLECTIONS {
        for k in 0..3 {
            assert_eq!(a.http("PUT", &format!("/c{i}/k{k}"), b"v").0, 200);
        }
    }
    eventually("each on its two owners", Duration::from_secs(30), || {
        on_owners(&[&a, &b, &c], COLLECTIONS)
    });
    let held: Vec<String> = (0..COLLECTIONS)
        .map(|i| format!("c{i}"))
        .filter(|name| local_keys(&c, name) == 3)
        .collect();
    let addr = c.addr;
    c.stop("TERM");
    let c = Dhrtd::start_on(Some(addr), dirs[2].path(), &["--replicas", "1"]);
    eventually(
        "three healthy members again",
        Duration::from_secs(20),
        || all_healthy(&[&a, &b, &c], 3),
    );
    // Its own view: the collections it holds and no longer owns.
    let not_owned = |s: &serde_json::Value| -> Vec<String> {
        let me = s["node"]["id"].as_str().unwrap().to_string();
        s["collections"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|x| !x["owners"].as_array().unwrap().iter().any(|o| *o == me))
            .map(|x| x["name"].as_str().unwrap().to_string())
            .collect()
    };
    eventually(
        "it sees the collections it no longer owns",
        Duration::from_secs(10),
        || !not_owned(&stats(&c)).is_empty(),
    );
    // Settling rounds run every second: time for several.
    std::thread::sleep(Duration::from_secs(5));
    for name in &held {
        assert_eq!(local_keys(&c, name), 3, "{name} was released");
    }
    let s = stats(&c);
    let kept = not_owned(&s);
    let waiting = s["collections"]
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["name"] == kept[0].as_str())
        .map(|x| x["moving"]["waiting"].to_string())
        .unwrap();
    assert!(
        waiting.contains("replication factor of 2, this node with 1"),
        "{waiting}"
    );
}

/// A write through a member that does not own the collection, while its
/// owner is frozen, is kept there (504, `kept on this node`). The owner,
/// back, drops the collection: the drop goes to the owners only. The keys
/// it removed must stay removed through every node, and the copy kept
/// elsewhere is given up (before, every node read the kept values again,
/// and that member pushed its copy to the owner for good).
#[test]
fn a_drop_wins_over_a_copy_kept_by_a_member_it_did_not_reach() {
    let args = ["--replicas", "1", "--timeout-ms", "300"];
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let a = Dhrtd::start(dirs[0].path(), &args);
    let b = start_joined(dirs[1].path(), &a, &args);
    let c = start_joined(dirs[2].path(), &a, &args);
    let nodes = [&a, &b, &c];
    eventually("three healthy members", Duration::from_secs(15), || {
        all_healthy(&nodes, 3)
    });
    assert_eq!(a.http("PUT", "/c/seed", b"s").0, 200);
    // A node that forwarded the write keeps a copy until the owner has it.
    eventually("only the owner holds it", Duration::from_secs(20), || {
        nodes.iter().filter(|n| local_keys(n, "c") > 0).count() == 1
    });
    let owner = *nodes
        .iter()
        .find(|n| local_keys(n, "c") == 1)
        .expect("an owner holds it");
    let s = stats(owner);
    let c_owners = s["collections"]
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["name"] == "c")
        .map(|x| x["owners"].clone())
        .unwrap();
    assert_eq!(c_owners, serde_json::json!([s["node"]["id"]]));
    let other = *nodes.iter().find(|n| n.addr != owner.addr).unwrap();
    owner.signal("STOP");
    for i in 0..5 {
        let (status, body) = other.http("PUT", &format!("/c/k{i}"), b"old");
        assert_eq!(status, 504, "{body}");
    }
    assert_eq!(local_keys(other, "c"), 5, "kept where they went through");
    owner.signal("CONT");
    assert_eq!(owner.http("DELETE", "/c", b"").0, 200);
    eventually("the kept copy is given up", Duration::from_secs(20), || {
        local_keys(other, "c") == 0
    });
    for n in nodes {
        for i in 0..5 {
            let (status, body) = n.http("GET", &format!("/c/k{i}"), b"");
            assert_eq!(status, 404, "k{i} through {}: {body}", n.addr);
        }
    }
}
