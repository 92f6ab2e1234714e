//! Watches of a collection on a node that does not store it
//! (`--collections`): followed on a node that does, with its guarantees and
//! its tokens, across a disconnect and a restart of that node.

use std::time::Duration;

use crate::cluster::{all_healthy, eventually, local_keys, start_joined, stats};
use crate::dhrtd::Dhrtd;
use crate::watch::{Event, Stream};

fn sse(node: &Dhrtd, path: &str) -> Stream {
    let s = Stream::open(node.addr, path, "text/event-stream", "");
    assert_eq!(s.status, 200, "{path}: {}", s.refusal);
    s
}

fn set(node: &Dhrtd, c: &str, k: &str, v: &str) {
    let (status, body) = node.http("PUT", &format!("/{c}/{k}"), v.as_bytes());
    assert_eq!(status, 200, "{body}");
}

/// (kind, key, value) of the changes among `events`, sorted (a stream has
/// no order across keys).
fn changes(events: &[Event]) -> Vec<(String, String, String)> {
    let mut out: Vec<_> = events
        .iter()
        .filter(|e| !matches!(e.kind(), "progress" | "synced"))
        .map(|e| {
            (
                e.kind().to_string(),
                e.key().to_string(),
                e.data["Value"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect();
    out.sort();
    out
}

fn owned(v: &[(&str, &str, &str)]) -> Vec<(String, String, String)> {
    let mut out: Vec<_> = v
        .iter()
        .map(|(a, b, c)| (a.to_string(), b.to_string(), c.to_string()))
        .collect();
    out.sort();
    out
}

fn watchers(node: &Dhrtd) -> u64 {
    stats(node)["watch"]["watchers"].as_u64().unwrap()
}

#[test]
fn a_watch_on_a_node_without_the_collection_follows_a_node_with_it() {
    let dirs: Vec<_> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    let a = Dhrtd::start(dirs[0].path(), &["--collections", "users"]);
    let b = start_joined(dirs[1].path(), &a, &["--collections", "other"]);
    eventually("two healthy members", Duration::from_secs(15), || {
        all_healthy(&[&a, &b], 2)
    });
    // Written before the watch: not an event of a watch from now.
    set(&a, "users", "old", "x");
    let mut w = sse(&b, "/users");
    assert_eq!(watchers(&a), 1, "the host holds the watch b follows");
    assert_eq!(watchers(&b), 1);
    // A write through b (forwarded to a) and one on a.
    set(&b, "users", "k1", "v1");
    set(&a, "users", "k2", "v2");
    let got = w.until(Duration::from_secs(10), |e| e.key() == "k2");
    assert_eq!(
        changes(&got),
        owned(&[("set", "k1", "v1"), ("set", "k2", "v2")])
    );
    assert_eq!(local_keys(&b, "users"), 0, "b stores nothing of users");
    let last = got.last().unwrap().id.clone().unwrap();
    drop(w);
    eventually("the follower let go", Duration::from_secs(10), || {
        watchers(&a) == 0 && watchers(&b) == 0
    });

    // Missed while away: resumed through b, and the same token on a itself
    // (it is a's token) gives the same changes.
    set(&a, "users", "k3", "v3");
    assert_eq!(b.http("DELETE", "/users/k1", b"").0, 200);
    let want = owned(&[("delete", "k1", ""), ("set", "k3", "v3")]);
    for node in [&b, &a] {
        let mut w = Stream::open(
            node.addr,
            "/users",
            "text/event-stream",
            &format!("Last-Event-ID: {last}\r\n"),
        );
        assert_eq!(w.status, 200, "{}", w.refusal);
        let got = w.until(Duration::from_secs(10), |e| e.kind() == "delete");
        let got: Vec<Event> = got
            .into_iter()
            .chain(std::iter::from_fn(|| w.next(Duration::from_millis(300))))
            .collect();
        assert_eq!(changes(&got), want, "resumed on {}", node.addr);
    }

    // A snapshot through b: every key once, the marker, then changes.
    let mut w = Stream::open(b.addr, "/users?snapshot=true", "application/x-ndjson", "");
    assert_eq!(w.status, 200, "{}", w.refusal);
    let snap = w.until(Duration::from_secs(10), |e| e.kind() == "synced");
    let before: Vec<&Event> = snap[..snap.len() - 1]
        .iter()
        .filter(|e| e.kind() != "progress")
        .collect();
    assert!(before.iter().all(|e| e.kind() == "initial"), "{snap:?}");
    assert!(
        snap[..snap.len() - 1].iter().all(|e| e.id.is_none()),
        "no token before synced: {snap:?}"
    );
    assert_eq!(
        changes(&snap),
        owned(&[
            ("initial", "k2", "v2"),
            ("initial", "k3", "v3"),
            ("initial", "old", "x"),
        ])
    );
    set(&b, "users", "k4", "v4");
    let got = w.until(Duration::from_secs(10), |e| e.key() == "k4");
    assert_eq!(changes(&got), owned(&[("set", "k4", "v4")]));
    let after_k4 = got.last().unwrap().id.clone().unwrap();
    drop(w);

    // The host restarts: its token still resumes through b.
    let a_addr = a.addr;
    a.stop("KILL");
    let a = Dhrtd::start_on(
        Some(a_addr),
        dirs[0].path(),
        &["--collections", "users", "--node", &b.addr.to_string()],
    );
    eventually("two healthy members again", Duration::from_secs(20), || {
        all_healthy(&[&a, &b], 2)
    });
    set(&a, "users", "k5", "v5");
    let mut w = sse(&b, &format!("/users?since={after_k4}"));
    let got = w.until(Duration::from_secs(10), |e| e.key() == "k5");
    assert_eq!(changes(&got), owned(&[("set", "k5", "v5")]));

    // The host dies under the watch: it ends with a reason, not silently.
    let a_addr = a.addr;
    a.stop("KILL");
    let end = w.until(Duration::from_secs(15), |e| e.event == "error");
    let last = end.last().unwrap();
    assert!(
        last.data["Error"].as_str().unwrap().contains("resume"),
        "{last:?}"
    );
    assert!(w.ended() || w.next(Duration::from_secs(2)).is_none());
    let _ = a_addr;
}

#[test]
fn a_follower_resumes_a_token_on_the_host_that_issued_it() {
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    // a and c hold every write's replicas, so a write waits for both: the
    // 16 MiB value at the end gets more than the default 500 ms to reach
    // the other one, which a loaded machine running debug builds can take.
    let slow_ok = ["--collections", "users", "--timeout-ms", "10000"];
    let a = Dhrtd::start(dirs[0].path(), &slow_ok);
    let b = start_joined(dirs[1].path(), &a, &["--collections", "other"]);
    let c = start_joined(dirs[2].path(), &a, &slow_ok);
    eventually("three healthy members", Duration::from_secs(15), || {
        all_healthy(&[&a, &b, &c], 3)
    });
    // Tokens from each host, resumed through b, which does not store the
    // collection: whichever host b follows first, the one that issued the
    // token takes it.
    for host in [&a, &c] {
        let mut w = sse(host, "/users?snapshot=true");
        let token = w
            .until(Duration::from_secs(10), |e| e.kind() == "synced")
            .last()
            .unwrap()
            .id
            .clone()
            .unwrap();
        drop(w);
        let key = format!("after-{}", host.addr.port());
        set(host, "users", &key, "v");
        let mut w = sse(&b, &format!("/users?since={token}"));
        let got = w.until(Duration::from_secs(10), |e| e.key() == key);
        assert!(
            got.iter().all(|e| e.kind() == "progress" || e.key() == key),
            "{got:?}"
        );
    }
    // A token no host issued: 410 through b too.
    let s = Stream::open(
        b.addr,
        "/users?since=0123456789abcdef0000000000000001",
        "text/event-stream",
        "",
    );
    assert_eq!(s.status, 410, "{}", s.refusal);
    assert!(s.refusal.contains("snapshot"), "{}", s.refusal);
    // A prefix watch through b sees only its keys.
    let mut w = sse(&b, "/users?prefix=p-");
    set(&a, "users", "q-1", "no");
    set(&c, "users", "p-1", "yes");
    let got = w.until(Duration::from_secs(10), |e| e.key() == "p-1");
    assert!(got.iter().all(|e| e.key() != "q-1"), "{got:?}");
    // A value at the size limit, behind a small change, reaches the
    // follower's watcher whole.
    set(&c, "users", "p-2", "small");
    let big = "b".repeat((16 << 20) - 64);
    set(&a, "users", "p-3", &big);
    let got = w.until(Duration::from_secs(30), |e| e.key() == "p-3");
    assert_eq!(got.last().unwrap().data["Value"].as_str().unwrap(), big);
    assert!(got.iter().any(|e| e.key() == "p-2"), "{got:?}");
}

#[test]
fn relayed_watches_leave_no_connections_or_sessions_behind() {
    let dirs: Vec<_> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    // Few peer connections on the host: a follower that kept one per
    // burst of watchers would be refused within a few bursts.
    let a = Dhrtd::start(dirs[0].path(), &["--max-peer-connections", "8"]);
    let b = start_joined(dirs[1].path(), &a, &["--collections", "other"]);
    eventually("two healthy members", Duration::from_secs(15), || {
        all_healthy(&[&a, &b], 2)
    });
    for burst in 0..6 {
        // 100 at once: three of the follower's poll links.
        let streams: Vec<Stream> = (0..100)
            .map(|i| {
                let s = Stream::open(b.addr, "/burst", "text/event-stream", "");
                assert_eq!(s.status, 200, "burst {burst}, watch {i}: {}", s.refusal);
                s
            })
            .collect();
        assert_eq!(watchers(&a), 100);
        drop(streams);
        eventually("the host let go", Duration::from_secs(10), || {
            watchers(&a) == 0 && watchers(&b) == 0
        });
    }
    // Clients that hang up before the host has answered leave no session
    // there either (well before the 30 s an unpolled session lives).
    for _ in 0..50 {
        let mut sock = std::net::TcpStream::connect(b.addr).unwrap();
        std::io::Write::write_all(
            &mut sock,
            b"GET /burst HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: text/event-stream\r\n\r\n",
        )
        .unwrap();
    }
    eventually(
        "no orphan session on the host",
        Duration::from_secs(10),
        || watchers(&a) == 0,
    );
    let mut w = sse(&b, "/burst");
    set(&a, "burst", "k", "v");
    let got = w.until(Duration::from_secs(10), |e| e.key() == "k");
    assert_eq!(changes(&got), owned(&[("set", "k", "v")]));
}

#[test]
fn a_watch_on_a_node_that_stops_storing_its_collection_ends_and_resumes_without_a_gap() {
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let a = Dhrtd::start(dirs[0].path(), &[]);
    let b = start_joined(dirs[1].path(), &a, &[]);
    let c = start_joined(dirs[2].path(), &a, &[]);
    let nodes = [&a, &b, &c];
    eventually("three healthy members", Duration::from_secs(15), || {
        all_healthy(&nodes, 3)
    });
    // Every member owns `feed` (replicas all): each watches its own log.
    set(&a, "feed", "k1", "v1");
    let mut watches: Vec<Stream> = nodes.iter().map(|n| sse(n, "/feed")).collect();
    set(&b, "feed", "k2", "v2");
    let mut last = Vec::new();
    for w in &mut watches {
        let got = w.until(Duration::from_secs(10), |e| e.key() == "k2");
        assert_eq!(changes(&got), owned(&[("set", "k2", "v2")]));
        last.push(got.last().unwrap().id.clone().unwrap());
    }

    // One owner from now on: the other two no longer store `feed`, and
    // writes no longer reach their logs. Their watches end with a reason;
    // the owner's goes on.
    let (status, body) = a.http("PUT", "/feed?replicas=1", b"");
    assert_eq!(status, 200, "{body}");
    let owner_id = serde_json::from_str::<serde_json::Value>(&body).unwrap()["Owners"][0]
        .as_str()
        .unwrap()
        .to_string();
    let owner = nodes
        .iter()
        .position(|n| stats(n)["node"]["id"] == owner_id.as_str())
        .unwrap();
    for n in nodes {
        eventually(
            "every node knows the one owner",
            Duration::from_secs(10),
            || {
                let (_, body) = n.http("GET", "/feed?replicas", b"");
                serde_json::from_str::<serde_json::Value>(&body).unwrap()["Owners"]
                    == serde_json::json!([owner_id.as_str()])
            },
        );
    }
    for (i, n) in nodes.iter().enumerate() {
        set(n, "feed", &format!("after-{i}"), "x");
    }
    for (i, w) in watches.iter_mut().enumerate() {
        if i == owner {
            let got = w.until(Duration::from_secs(10), |e| e.key() == "after-2");
            let keys: Vec<_> = changes(&got).into_iter().map(|c| c.1).collect();
            assert!(keys.contains(&"after-0".to_string()), "{keys:?}");
            assert!(keys.contains(&"after-1".to_string()), "{keys:?}");
            continue;
        }
        let end = w.until(Duration::from_secs(15), |e| e.event == "error");
        let reason = end.last().unwrap().data["Error"]
            .as_str()
            .unwrap()
            .to_string();
        assert!(
            reason.contains("no longer stores") && reason.contains("resume"),
            "{reason}"
        );
        // Its token, resumed through it, is another history's on the
        // owner: 410, never a silent gap; a snapshot through it has every
        // key, and a new watch through it follows the owner.
        let n = nodes[i];
        let s = Stream::open(
            n.addr,
            &format!("/feed?since={}", last[i]),
            "text/event-stream",
            "",
        );
        assert_eq!(s.status, 410, "{}", s.refusal);
        let mut snap = Stream::open(n.addr, "/feed?snapshot=true", "application/x-ndjson", "");
        assert_eq!(snap.status, 200, "{}", snap.refusal);
        let got = snap.until(Duration::from_secs(10), |e| e.kind() == "synced");
        let keys: Vec<_> = changes(&got).into_iter().map(|c| c.1).collect();
        let mut expected: Vec<String> = ["after-0", "after-1", "after-2", "k1", "k2"]
            .map(String::from)
            .into();
        // Keys written after an earlier loser's snapshot, through the owner.
        expected.extend((0..i).filter(|&j| j != owner).map(|j| format!("later-{j}")));
        expected.sort();
        assert_eq!(keys, expected);
        let key = format!("later-{i}");
        set(nodes[owner], "feed", &key, "y");
        let got = snap.until(Duration::from_secs(10), |e| e.key() == key);
        assert_eq!(changes(&got), owned(&[("set", &key, "y")]));
    }
}

/// The only owner of a collection is down: a token it issued, resumed
/// through another member, is "retry" (503), never 410 (which tells the
/// client to throw its state away and take a snapshot), also once that
/// member takes the collection's writes itself for want of a live owner.
/// Back, the owner resumes it exactly.
#[test]
fn a_token_of_an_owner_that_is_down_is_retried_not_gone() {
    let dirs: Vec<_> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    let a = Dhrtd::start(dirs[0].path(), &["--replicas", "1"]);
    let b = start_joined(dirs[1].path(), &a, &["--replicas", "1"]);
    eventually("two healthy members", Duration::from_secs(15), || {
        all_healthy(&[&a, &b], 2)
    });
    // A collection a owns.
    let name = (0..16)
        .map(|i| format!("rc{i}"))
        .find(|n| {
            let (_, body) = a.http("GET", &format!("/{n}?replicas"), b"");
            let v: serde_json::Value = serde_json::from_str(&body).unwrap();
            v["Owners"][0] == stats(&a)["node"]["id"]
        })
        .expect("a collection a owns");
    set(&a, &name, "k1", "v1");
    let mut w = sse(&b, &format!("/{name}"));
    set(&a, &name, "k2", "v2");
    let got = w.until(Duration::from_secs(10), |e| e.key() == "k2");
    let token = got.last().unwrap().id.clone().unwrap();
    drop(w);
    set(&a, &name, "k3", "v3");
    let a_addr = a.addr;
    a.stop("KILL");
    let resume = || {
        Stream::open(
            b.addr,
            &format!("/{name}?since={token}"),
            "text/event-stream",
            "",
        )
    };
    eventually("b takes a for dead", Duration::from_secs(20), || {
        let s = resume();
        assert_eq!(s.status, 503, "{}", s.refusal);
        stats(&b)["members"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m["state"] == "dead")
    });
    for _ in 0..3 {
        let s = resume();
        assert_eq!(s.status, 503, "{}", s.refusal);
        assert!(s.refusal.contains("retry"), "{}", s.refusal);
    }
    let a = Dhrtd::start_on(
        Some(a_addr),
        dirs[0].path(),
        &["--replicas", "1", "--node", &b.addr.to_string()],
    );
    eventually("two healthy members again", Duration::from_secs(20), || {
        all_healthy(&[&a, &b], 2)
    });
    let mut w = None;
    eventually(
        "the token resumes through b",
        Duration::from_secs(15),
        || {
            let s = resume();
            let ok = s.status == 200;
            w = ok.then_some(s);
            ok
        },
    );
    let got = w
        .unwrap()
        .until(Duration::from_secs(10), |e| e.key() == "k3");
    assert_eq!(changes(&got), owned(&[("set", "k3", "v3")]));
}
