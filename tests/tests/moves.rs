//! Moves on real `dhrtd` processes with a replication factor below `all`:
//! a join moves data at the configured pace and says so in `GET /`; an old
//! or a new owner SIGKILLed in the middle of a move, under writers, loses
//! no acknowledged write and brings no deleted key back, and every
//! collection ends on its owners; two members joining at once through
//! different members end with one placement; a raised replication factor
//! fills its new owner at the pace of moves.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::cluster::{all_healthy, eventually, local_keys, start_joined, stats};
use crate::dhrtd::{Dhrtd, http_at};

fn id_of(n: &Dhrtd) -> String {
    stats(n)["node"]["id"].as_str().unwrap().to_string()
}

/// The owners `n` names for `collection` (`GET /:c?replicas`).
fn owners_by(n: &Dhrtd, collection: &str) -> Vec<String> {
    let (status, body) = n.http("GET", &format!("/{collection}?replicas"), b"");
    assert_eq!(status, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    v["Owners"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o.as_str().unwrap().to_string())
        .collect()
}

/// A metric's value on `n`.
fn metric(n: &Dhrtd, name: &str) -> u64 {
    let (_, text) = n.http("GET", "/metrics", b"");
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no {name} in {text}"))
}

/// Every collection is held (keys or tombstones) by exactly its owners,
/// every node names the same owners for it, none is under-replicated and
/// no node is still handing a copy over.
fn settled(nodes: &[&Dhrtd], collections: &[String]) -> bool {
    let ids: Vec<String> = nodes.iter().map(|n| id_of(n)).collect();
    let mut held: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (n, id) in nodes.iter().zip(&ids) {
        for c in stats(n)["collections"].as_array().unwrap() {
            if !c["moving"].is_null() || c["under_replicated"] == true {
                return false;
            }
            let name = c["name"].as_str().unwrap().to_string();
            held.entry(name).or_default().insert(id.clone());
        }
    }
    collections.iter().all(|c| {
        let owners: BTreeSet<String> = owners_by(nodes[0], c).into_iter().collect();
        nodes
            .iter()
            .all(|n| owners_by(n, c).into_iter().collect::<BTreeSet<_>>() == owners)
            && held.get(c) == Some(&owners)
    })
}

/// What a writer tried on one key, in order: the value set (`None`: a
/// delete) and whether it was acknowledged.
type Attempts = Vec<(Option<String>, bool)>;

/// Writers setting and deleting two thirds of the keys through every node
/// until stopped, one key's operations in order (so the newest acknowledged one is the
/// one the cluster must keep, unless a later unacknowledged one landed).
struct Writers {
    stop: Arc<AtomicBool>,
    log: Arc<Mutex<BTreeMap<(String, u32), Attempts>>>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Writers {
    fn start(addrs: Vec<SocketAddr>, collections: &[String], keys: u32) -> Writers {
        let stop = Arc::new(AtomicBool::new(false));
        let log: Arc<Mutex<BTreeMap<(String, u32), Attempts>>> = Arc::default();
        let mut threads = Vec::new();
        for (t, mine) in collections
            .chunks(collections.len().div_ceil(2))
            .enumerate()
        {
            let (stop, log, addrs, mine) =
                (stop.clone(), log.clone(), addrs.clone(), mine.to_vec());
            threads.push(std::thread::spawn(move || {
                let mut round = 0u32;
                while !stop.load(Ordering::Acquire) {
                    for c in &mine {
                        // A third of the keys keep their preloaded values:
                        // only the move can carry them.
                        for k in (round % 4..keys).step_by(4).filter(|k| k % 3 != 0) {
                            let at = addrs[(k as usize + round as usize + t) % addrs.len()];
                            let delete = (k + round).is_multiple_of(5);
                            let (method, path, value) = if delete {
                                ("DELETE", format!("/{c}/k{k}"), None)
                            } else {
                                let v = format!("w{t}.{round}.{k}");
                                ("POST", format!("/{c}/k{k}/{v}"), Some(v))
                            };
                            let acked = match http_at(at, method, &path, "", b"") {
                                Ok((200, _)) => true,
                                Ok((404, _)) => delete,
                                _ => false,
                            };
                            log.lock()
                                .unwrap()
                                .entry((c.clone(), k))
                                .or_default()
                                .push((value, acked));
                        }
                    }
                    round += 1;
                }
            }));
        }
        Writers { stop, log, threads }
    }

    fn stop(self) -> BTreeMap<(String, u32), Attempts> {
        self.stop.store(true, Ordering::Release);
        for t in self.threads {
            t.join().unwrap();
        }
        Arc::try_unwrap(self.log).unwrap().into_inner().unwrap()
    }
}

/// The value each key may hold now: the newest acknowledged operation's,
/// or any later one's (a write saved but not acknowledged may land).
/// Keys never written by the writers keep their preloaded value.
fn check(
    nodes: &[&Dhrtd],
    collections: &[String],
    keys: u32,
    log: &BTreeMap<(String, u32), Attempts>,
) {
    let mut acked = 0;
    for c in collections {
        for k in 0..keys {
            let attempts = log.get(&(c.clone(), k)).cloned().unwrap_or_default();
            let last = attempts.iter().rposition(|(_, ok)| *ok);
            acked += usize::from(last.is_some());
            let mut allowed: Vec<Option<String>> = match last {
                Some(i) => attempts[i..].iter().map(|(v, _)| v.clone()).collect(),
                None => std::iter::once(Some(preloaded(k)))
                    .chain(attempts.iter().map(|(v, _)| v.clone()))
                    .collect(),
            };
            allowed.dedup();
            for (i, n) in nodes.iter().enumerate() {
                let (status, body) = n.http("GET", &format!("/{c}/k{k}"), b"");
                let got = match status {
                    200 => {
                        let v: Value = serde_json::from_str(&body).unwrap();
                        Some(v["Value"].as_str().unwrap().to_string())
                    }
                    404 => None,
                    _ => panic!("{c}/k{k} through node {i}: {status} {body}"),
                };
                assert!(
                    allowed.contains(&got),
                    "{c}/k{k} through node {i} reads {:?}; the newest acknowledged operation and those after it: {:?}",
                    got.map(|g| g.chars().take(24).collect::<String>()),
                    attempts[last.unwrap_or(0)..]
                        .iter()
                        .map(|(v, ok)| (v.clone(), *ok))
                        .collect::<Vec<_>>()
                );
            }
        }
    }
    assert!(acked > 100, "only {acked} keys had an acknowledged write");
}

fn preloaded(k: u32) -> String {
    format!("p{k}.{}", "x".repeat(16 * 1024))
}

fn preload(n: &Dhrtd, collections: &[String], keys: u32) {
    for c in collections {
        for k in 0..keys {
            let (status, body) = n.http("PUT", &format!("/{c}/k{k}"), preloaded(k).as_bytes());
            assert_eq!(status, 200, "{body}");
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Victim {
    OldOwner,
    NewOwner,
}

/// Three members with one replica each and a slow pace of moves; a fourth
/// joins, and while a collection moves to it (the newcomer holds some of
/// its keys, not all), `victim` is SIGKILLed, then started again on its
/// data directory. Writers run through it all.
fn killed_in_the_middle_of_a_move(victim: Victim) {
    let flags = ["--replicas", "1", "--move-rate-mib", "1"];
    let dirs: Vec<_> = (0..4).map(|_| tempfile::tempdir().unwrap()).collect();
    // Fixed node ids, so that the placement is too: with random ones the
    // newcomer owns none of the eight collections one time in ten
    // ((3/4)^8), and there is no move to catch. With these it owns two.
    for (dir, id) in dirs.iter().zip([0xa1u64, 0xb2, 0xc3, 0xd4]) {
        std::fs::write(dir.path().join("node.id"), format!("{id:016x}\n")).unwrap();
    }
    let a = Dhrtd::start(dirs[0].path(), &flags);
    let b = start_joined(dirs[1].path(), &a, &flags);
    let c = start_joined(dirs[2].path(), &a, &flags);
    let three = [&a, &b, &c];
    eventually("three healthy members", Duration::from_secs(20), || {
        all_healthy(&three, 3)
    });
    let collections: Vec<String> = (0..8).map(|i| format!("m{i}")).collect();
    let keys = 60;
    preload(&a, &collections, keys);
    let owner_before: BTreeMap<String, String> = collections
        .iter()
        .map(|c| (c.clone(), owners_by(&a, c)[0].clone()))
        .collect();
    let by_id: BTreeMap<String, usize> = three
        .iter()
        .enumerate()
        .map(|(i, n)| (id_of(n), i))
        .collect();

    let writers = Writers::start(vec![a.addr, b.addr, c.addr], &collections, keys);
    let mut nodes: Vec<Option<Dhrtd>> = vec![Some(a), Some(b), Some(c)];
    let d = start_joined(dirs[3].path(), nodes[0].as_ref().unwrap(), &flags);
    let d_id = id_of(&d);
    let d_owns = collections
        .iter()
        .filter(|c| owners_by(&d, c) == [d_id.clone()])
        .count();
    eprintln!(
        "the newcomer owns {d_owns} of {} collections",
        collections.len()
    );
    // A collection that moves to d, caught half way.
    let mut moving = None;
    eventually(
        "a collection half way to the newcomer",
        Duration::from_secs(60),
        || {
            for col in &collections {
                let held = local_keys(&d, col);
                if held > 0
                    && held < u64::from(keys) * 3 / 4
                    && owners_by(&d, col) == [d_id.clone()]
                {
                    moving = Some(col.clone());
                    return true;
                }
            }
            false
        },
    );
    let moving = moving.unwrap();
    let mut d = Some(d);
    match victim {
        Victim::OldOwner => {
            let i = by_id[&owner_before[&moving]];
            let n = nodes[i].take().unwrap();
            let addr = n.addr;
            assert!(!n.stop("KILL").success());
            std::thread::sleep(Duration::from_secs(2));
            nodes[i] = Some(Dhrtd::start_on(Some(addr), dirs[i].path(), &flags));
        }
        Victim::NewOwner => {
            let n = d.take().unwrap();
            let addr = n.addr;
            assert!(!n.stop("KILL").success());
            std::thread::sleep(Duration::from_secs(2));
            d = Some(Dhrtd::start_on(Some(addr), dirs[3].path(), &flags));
        }
    }
    let all: Vec<&Dhrtd> = nodes.iter().flatten().chain(d.iter()).collect();
    eventually(
        "four healthy members again",
        Duration::from_secs(60),
        || all_healthy(&all, 4),
    );
    std::thread::sleep(Duration::from_secs(2));
    let log = writers.stop();
    eventually(
        "every collection on its owner, no move left",
        Duration::from_secs(120),
        || settled(&all, &collections),
    );
    assert!(
        collections
            .iter()
            .any(|c| owners_by(all[0], c) == [d_id.clone()]),
        "the newcomer owns nothing"
    );
    check(&all, &collections, keys, &log);
}

#[test]
fn an_old_owner_killed_in_the_middle_of_a_move_loses_nothing() {
    killed_in_the_middle_of_a_move(Victim::OldOwner);
}

#[test]
fn a_new_owner_killed_in_the_middle_of_a_move_loses_nothing() {
    killed_in_the_middle_of_a_move(Victim::NewOwner);
}

/// One member with everything and one replica per collection; a second
/// joins with moves paced at 1 MiB/s: what moves takes at least its bytes
/// over the rate, the holder shows the move in `GET /` while it runs, and
/// releases its copies after.
#[test]
fn a_join_moves_data_at_the_configured_pace_and_shows_the_move() {
    let flags = ["--replicas", "1", "--move-rate-mib", "1"];
    let dirs: Vec<_> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    let a = Dhrtd::start(dirs[0].path(), &flags);
    let collections: Vec<String> = (0..12).map(|i| format!("p{i}")).collect();
    let keys = 48;
    preload(&a, &collections, keys);
    assert_eq!(metric(&a, "dhrt_moved_bytes_total"), 0);
    let started = Instant::now();
    let b = start_joined(dirs[1].path(), &a, &flags);
    let b_id = id_of(&b);
    let mut seen_moving = false;
    eventually("the join's moves done", Duration::from_secs(60), || {
        for c in stats(&a)["collections"].as_array().unwrap() {
            if let Some(to) = c["moving"]["to"].as_array() {
                assert_eq!(to, &[Value::from(b_id.clone())], "{c}");
                seen_moving = true;
            }
        }
        settled(&[&a, &b], &collections)
    });
    let took = started.elapsed();
    assert!(seen_moving, "GET / never showed a move");
    let moved = metric(&a, "dhrt_moved_bytes_total");
    let to_b: Vec<&String> = collections
        .iter()
        .filter(|c| owners_by(&a, c) == [b_id.clone()])
        .collect();
    assert!(!to_b.is_empty(), "b owns nothing");
    // At least the values of what b took went, and no faster than the pace
    // allows: a tenth of a second of burst, and the last batch (a tenth of
    // a second's worth) goes at the start of its slot.
    assert!(
        moved >= to_b.len() as u64 * u64::from(keys) * 16 * 1024,
        "{moved} bytes moved for {} collections",
        to_b.len()
    );
    let floor = Duration::from_secs_f64(moved as f64 / f64::from(1 << 20) - 0.2);
    assert!(took >= floor, "{moved} bytes moved in {took:?} at 1 MiB/s");
    for c in &to_b {
        assert_eq!(local_keys(&a, c), 0, "{c} not released by a");
        assert_eq!(local_keys(&b, c), u64::from(keys), "{c} not all on b");
    }
}

/// Two members join at once, through different members: every node ends
/// naming the same owners for every collection, each held by exactly them.
#[test]
fn two_members_joining_at_once_through_different_members_end_with_one_placement() {
    let flags = ["--replicas", "2"];
    let dirs: Vec<_> = (0..5).map(|_| tempfile::tempdir().unwrap()).collect();
    let (a, b, c) = crate::cluster::three_joined(&dirs[..3], &flags);
    let collections: Vec<String> = (0..16).map(|i| format!("j{i}")).collect();
    for (i, col) in collections.iter().enumerate() {
        for k in 0..4 {
            let n = [&a, &b, &c][(i + k) % 3];
            assert_eq!(n.http("POST", &format!("/{col}/k{k}/v{k}"), b"").0, 200);
        }
    }
    let (d, e) = std::thread::scope(|s| {
        let d = s.spawn(|| start_joined(dirs[3].path(), &a, &flags));
        let e = s.spawn(|| start_joined(dirs[4].path(), &b, &flags));
        (d.join().unwrap(), e.join().unwrap())
    });
    let all = [&a, &b, &c, &d, &e];
    eventually("five healthy members", Duration::from_secs(30), || {
        all_healthy(&all, 5)
    });
    eventually(
        "one placement, held by its owners",
        Duration::from_secs(60),
        || settled(&all, &collections),
    );
    let (d_id, e_id) = (id_of(&d), id_of(&e));
    let owned: BTreeSet<String> = collections
        .iter()
        .flat_map(|col| owners_by(&a, col))
        .collect();
    assert!(owned.contains(&d_id) && owned.contains(&e_id), "{owned:?}");
    for n in all {
        for col in &collections {
            for k in 0..4 {
                let (status, body) = n.http("GET", &format!("/{col}/k{k}"), b"");
                assert_eq!(status, 200, "{col}/k{k}: {body}");
            }
        }
    }
}

/// A member SIGKILLed for good: its collections count as under-replicated
/// while it is dead; an operator removes it (`dhrt-cli remove`), and every
/// collection is back on two live owners with nothing lost. A live member
/// cannot be removed.
#[test]
fn a_dead_member_removed_by_an_operator_gives_its_collections_new_owners() {
    let flags = ["--replicas", "2"];
    let dirs: Vec<_> = (0..4).map(|_| tempfile::tempdir().unwrap()).collect();
    let (a, b, c) = crate::cluster::three_joined(&dirs[..3], &flags);
    let d = start_joined(dirs[3].path(), &a, &flags);
    eventually("four healthy members", Duration::from_secs(20), || {
        all_healthy(&[&a, &b, &c, &d], 4)
    });
    let collections: Vec<String> = (0..12).map(|i| format!("r{i}")).collect();
    for col in &collections {
        for k in 0..5 {
            let (status, body) = b.http("POST", &format!("/{col}/k{k}/v{k}"), b"");
            assert_eq!(status, 200, "{body}");
        }
    }
    let (d_id, d_addr) = (id_of(&d), d.addr.to_string());
    let theirs: Vec<&String> = collections
        .iter()
        .filter(|col| owners_by(&a, col).contains(&d_id))
        .collect();
    assert!(!theirs.is_empty(), "d owns nothing");
    // A live member is not removed.
    let (status, body) = a.http("DELETE", &format!("/?member={d_id}"), b"");
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("not dead"), "{body}");
    assert!(!d.stop("KILL").success());
    let live = [&a, &b, &c];
    eventually("d dead everywhere", Duration::from_secs(30), || {
        live.iter()
            .all(|n| crate::cluster::state_of(n, &d_addr).as_deref() == Some("dead"))
    });
    // Its collections are under-replicated, and say so.
    eventually(
        "under-replicated while d is dead",
        Duration::from_secs(10),
        || metric(&a, "dhrt_collections_under_replicated") > 0,
    );
    let (_, body) = a.http("GET", &format!("/{}?replicas", theirs[0]), b"");
    assert!(body.contains("\"UnderReplicated\":true"), "{body}");
    let o = crate::cli::cli(&c, &["remove", &d_id]);
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(crate::cli::out(&o).starts_with(&format!("OK: removed {d_id}")));
    eventually("d left everywhere", Duration::from_secs(20), || {
        live.iter()
            .all(|n| crate::cluster::state_of(n, &d_addr).as_deref() == Some("left"))
    });
    eventually(
        "every collection on two live owners",
        Duration::from_secs(60),
        || settled(&live, &collections),
    );
    for col in &collections {
        assert_eq!(owners_by(&a, col).len(), 2);
        for n in live {
            for k in 0..5 {
                let (status, body) = n.http("GET", &format!("/{col}/k{k}"), b"");
                assert_eq!(status, 200, "{col}/k{k}: {body}");
            }
        }
    }
    assert_eq!(metric(&a, "dhrt_collections_under_replicated"), 0);
    // Unknown members: a clear error.
    let (status, body) = a.http("DELETE", "/?member=00000000deadbeef", b"");
    assert_eq!(status, 404, "{body}");
}

/// A raised replication factor fills the new owner by anti-entropy, at the
/// pace of moves too: what arrives after its first page takes at least its
/// bytes over the rate (here 1 MiB/s, from both ends of a round: pulled by
/// the new owner and pushed by the old one).
#[test]
fn a_raised_replication_factor_fills_the_new_owner_at_the_pace_of_moves() {
    let flags = ["--replicas", "1", "--move-rate-mib", "1"];
    let dirs: Vec<_> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    let a = Dhrtd::start(dirs[0].path(), &flags);
    let b = start_joined(dirs[1].path(), &a, &flags);
    eventually("two healthy members", Duration::from_secs(20), || {
        all_healthy(&[&a, &b], 2)
    });
    let c = "raised".to_string();
    let keys = 1000;
    preload(&a, std::slice::from_ref(&c), keys);
    eventually("one owner holds it", Duration::from_secs(30), || {
        settled(&[&a, &b], std::slice::from_ref(&c))
    });
    let (owner, other) = if local_keys(&a, &c) == u64::from(keys) {
        (&a, &b)
    } else {
        (&b, &a)
    };
    assert_eq!(local_keys(other, &c), 0);
    assert_eq!(owner.http("PUT", &format!("/{c}?replicas=2"), b"").0, 200);
    let mut first = None;
    eventually(
        "the new owner holds every key",
        Duration::from_secs(60),
        || {
            let held = local_keys(other, &c);
            if held > 0 && first.is_none() {
                first = Some((Instant::now(), held));
            }
            held == u64::from(keys)
        },
    );
    let (since, held_first) = first.unwrap();
    let took = since.elapsed();
    let bytes = (u64::from(keys) - held_first) * preloaded(0).len() as u64;
    // Two pacers (the pull's and the push's), each with a tenth of a
    // second of burst, and a page's slot waited for at its start.
    let floor = bytes as f64 / f64::from(2 << 20) * 0.8 - 0.5;
    assert!(
        took.as_secs_f64() >= floor,
        "{bytes} bytes after the first page in {took:?}, at 1 MiB/s from each end"
    );
}
