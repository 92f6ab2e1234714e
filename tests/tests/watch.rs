//! Watches of real `dhrtd` processes over HTTP: SSE and NDJSON, across
//! nodes, resumed across a compaction and a restart, snapshots, deletes and
//! drops, impossible resumes, and a slow watcher that must not slow writers.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::cluster::{all_healthy, eventually, start_joined, stats};
use crate::dhrtd::Dhrtd;

/// One event of a stream: its SSE id and event name (empty for NDJSON),
/// and its data.
#[derive(Debug, Clone)]
pub(crate) struct Event {
    pub(crate) id: Option<String>,
    pub(crate) event: String,
    pub(crate) data: Value,
}

impl Event {
    pub(crate) fn kind(&self) -> &str {
        self.data["Kind"].as_str().unwrap_or(&self.event)
    }

    pub(crate) fn key(&self) -> &str {
        self.data["Key"].as_str().unwrap_or("")
    }
}

/// A watch over HTTP, read from a raw socket (the body is chunked).
pub(crate) struct Stream {
    sock: TcpStream,
    /// Undecoded bytes of the chunked body.
    raw: Vec<u8>,
    /// Decoded body not yet parsed into events.
    body: Vec<u8>,
    /// How much of `body` is known to hold no event separator (a large
    /// event arrives in many chunks: it is not searched again for each).
    scanned: usize,
    sse: bool,
    pub(crate) status: u16,
    pub(crate) head: String,
    /// The error body of a refused watch.
    pub(crate) refusal: String,
    ended: bool,
}

impl Stream {
    /// `GET path` with `accept`, and `extra` header lines.
    pub(crate) fn open(addr: SocketAddr, path: &str, accept: &str, extra: &str) -> Stream {
        let mut sock = TcpStream::connect(addr).unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let req =
            format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: {accept}\r\n{extra}\r\n");
        sock.write_all(req.as_bytes()).unwrap();
        let mut s = Stream {
            sock,
            raw: Vec::new(),
            body: Vec::new(),
            scanned: 0,
            sse: accept == "text/event-stream",
            status: 0,
            head: String::new(),
            refusal: String::new(),
            ended: false,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        let split = loop {
            if let Some(p) = s.raw.windows(4).position(|w| w == b"\r\n\r\n") {
                break p;
            }
            assert!(Instant::now() < deadline, "no response head for {path}");
            s.fill();
        };
        s.head = String::from_utf8_lossy(&s.raw[..split]).to_ascii_lowercase();
        s.status = s.head[9..12].parse().unwrap();
        s.raw.drain(..split + 4);
        if s.status != 200 {
            // A whole (not chunked) error body.
            let len: usize = s
                .head
                .lines()
                .find_map(|l| l.strip_prefix("content-length: "))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
            while s.raw.len() < len && Instant::now() < deadline {
                s.fill();
            }
            s.refusal = String::from_utf8_lossy(&s.raw).into_owned();
        }
        s
    }

    /// The client's end of the connection: its port.
    pub(crate) fn local_port(&self) -> u16 {
        self.sock.local_addr().unwrap().port()
    }

    /// Reads what the socket has (up to 200 ms).
    fn fill(&mut self) {
        let mut buf = [0u8; 65536];
        match self.sock.read(&mut buf) {
            Ok(0) => self.ended = true,
            Ok(n) => self.raw.extend_from_slice(&buf[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => self.ended = true,
        }
    }

    /// Moves whole chunks from `raw` to `body`.
    fn dechunk(&mut self) {
        loop {
            let Some(eol) = self.raw.windows(2).position(|w| w == b"\r\n") else {
                return;
            };
            let size =
                usize::from_str_radix(std::str::from_utf8(&self.raw[..eol]).unwrap().trim(), 16)
                    .unwrap();
            if size == 0 {
                self.ended = true;
                self.raw.clear();
                return;
            }
            if self.raw.len() < eol + 2 + size + 2 {
                return;
            }
            self.body
                .extend_from_slice(&self.raw[eol + 2..eol + 2 + size]);
            self.raw.drain(..eol + 2 + size + 2);
        }
    }

    /// The next whole event in `body`, if any.
    fn parse(&mut self) -> Option<Event> {
        loop {
            let sep: &[u8] = if self.sse { b"\n\n" } else { b"\n" };
            let from = self.scanned.saturating_sub(sep.len() - 1);
            let Some(at) = self.body[from..].windows(sep.len()).position(|w| w == sep) else {
                self.scanned = self.body.len();
                return None;
            };
            let end = from + at;
            self.scanned = 0;
            let block = String::from_utf8(self.body[..end].to_vec()).unwrap();
            self.body.drain(..end + sep.len());
            if !self.sse {
                let data: Value = serde_json::from_str(&block).unwrap();
                return Some(Event {
                    id: data["Token"].as_str().map(str::to_string),
                    event: String::new(),
                    data,
                });
            }
            let (mut id, mut event, mut data) = (None, String::new(), None);
            for line in block.lines() {
                if let Some(v) = line.strip_prefix("id: ") {
                    id = Some(v.to_string());
                } else if let Some(v) = line.strip_prefix("event: ") {
                    event = v.to_string();
                } else if let Some(v) = line.strip_prefix("data: ") {
                    data = Some(serde_json::from_str(v).unwrap());
                }
            }
            // `retry:` and comment-only blocks carry no event.
            if let Some(data) = data {
                return Some(Event { id, event, data });
            }
        }
    }

    /// The next event within `within`, or `None` (the stream ended or
    /// nothing came).
    pub(crate) fn next(&mut self, within: Duration) -> Option<Event> {
        let deadline = Instant::now() + within;
        loop {
            self.dechunk();
            if let Some(e) = self.parse() {
                return Some(e);
            }
            if self.ended || Instant::now() >= deadline {
                return None;
            }
            self.fill();
        }
    }

    /// Events until one satisfies `stop` (included), failing after
    /// `within`.
    pub(crate) fn until(
        &mut self,
        within: Duration,
        mut stop: impl FnMut(&Event) -> bool,
    ) -> Vec<Event> {
        let deadline = Instant::now() + within;
        let mut out = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let e = self
                .next(left)
                .unwrap_or_else(|| panic!("no event satisfied the wait; got {out:?}"));
            let done = stop(&e);
            out.push(e);
            if done {
                return out;
            }
        }
    }

    /// Whether the server ended the stream.
    pub(crate) fn ended(&mut self) -> bool {
        self.dechunk();
        self.ended
    }
}

fn sse(node: &Dhrtd, path: &str) -> Stream {
    let s = Stream::open(node.addr, path, "text/event-stream", "");
    assert_eq!(s.status, 200, "{path}: {}", s.refusal);
    assert!(
        s.head.contains("content-type: text/event-stream"),
        "{}",
        s.head
    );
    s
}

fn set(node: &Dhrtd, c: &str, k: &str, v: &str) {
    let (status, body) = node.http("PUT", &format!("/{c}/{k}"), v.as_bytes());
    assert_eq!(status, 200, "{body}");
}

fn changes(events: &[Event]) -> Vec<(String, String, String)> {
    events
        .iter()
        .filter(|e| e.kind() != "progress")
        .map(|e| {
            (
                e.kind().to_string(),
                e.key().to_string(),
                e.data["Value"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect()
}

#[test]
fn a_write_on_one_node_reaches_a_watcher_on_another_with_deletes_and_drops() {
    let dirs: Vec<_> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    let a = Dhrtd::start(dirs[0].path(), &[]);
    let b = start_joined(dirs[1].path(), &a, &[]);
    eventually("two healthy members", Duration::from_secs(15), || {
        all_healthy(&[&a, &b], 2)
    });
    // The collection does not exist yet: a browser's EventSource may
    // subscribe first.
    let mut on_b = sse(&b, "/fruit");
    let mut ndjson = Stream::open(b.addr, "/fruit", "application/x-ndjson", "");
    assert_eq!(ndjson.status, 200);
    let open = ndjson.next(Duration::from_secs(5)).unwrap();
    assert_eq!(open.kind(), "progress", "a first token at once");
    assert_eq!(open.data["Token"].as_str().unwrap().len(), 32);
    set(&a, "fruit", "apple", "red");
    set(&a, "fruit", "pear", "green");
    // Both watchers see the sets before apple is deleted: a set already
    // superseded when a watcher reads is skipped for the newer change.
    let mut got = on_b.until(Duration::from_secs(10), |e| e.key() == "pear");
    let mut nd = ndjson.until(Duration::from_secs(10), |e| e.key() == "pear");
    assert_eq!(a.http("DELETE", "/fruit/apple", b"").0, 200);
    got.extend(on_b.until(Duration::from_secs(10), |e| e.kind() == "delete"));
    assert_eq!(
        changes(&got),
        [
            ("set", "apple", "red"),
            ("set", "pear", "green"),
            ("delete", "apple", "")
        ]
        .map(|(k, key, v)| (k.to_string(), key.to_string(), v.to_string()))
    );
    // The NDJSON watcher too sees the delete before the drop: a watcher
    // reads the log on idle-class threads, and one that reads only after
    // the drop skips the delete it superseded (as documented).
    nd.extend(ndjson.until(Duration::from_secs(10), |e| e.kind() == "delete"));
    for e in got.iter().filter(|e| e.kind() != "progress") {
        assert_eq!(e.data["Collection"], "fruit");
        assert_eq!(
            e.id.as_deref(),
            e.data["Token"].as_str(),
            "the SSE id is the token"
        );
        assert_eq!(e.data["Version"].as_str().unwrap().len(), 32);
    }
    assert_eq!(
        a.http("DELETE", "/fruit", b"").0,
        200,
        "drop the collection"
    );
    let dropped = on_b.until(Duration::from_secs(10), |e| e.kind() == "drop");
    assert_eq!(dropped.last().unwrap().event, "drop");
    nd.extend(ndjson.until(Duration::from_secs(10), |e| e.kind() == "drop"));
    assert_eq!(
        changes(&nd)
            .iter()
            .map(|c| c.0.as_str())
            .collect::<Vec<_>>(),
        ["set", "set", "delete", "drop"]
    );
    // The stats and metrics count the watchers and what they were sent.
    let s = stats(&b);
    assert_eq!(s["watch"]["watchers"], 2, "{s}");
    assert!(s["watch"]["events_sent"].as_u64().unwrap() >= 8, "{s}");
    let (_, metrics) = b.http("GET", "/metrics", b"");
    assert!(metrics.contains("dhrt_watchers 2"), "{metrics}");
    drop(on_b);
    drop(ndjson);
    eventually("closed watches are let go", Duration::from_secs(15), || {
        // A watcher waiting for a change notices its client left at the
        // next change.
        set(&a, "fruit", "tick", "x");
        stats(&b)["watch"]["watchers"] == 0
    });
}

#[test]
fn a_watcher_resumes_with_its_token_across_a_compaction_and_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let node = Dhrtd::start(dir.path(), &[]);
    let mut w = sse(&node, "/docs");
    for i in 0..5 {
        set(&node, "docs", &format!("k{i}"), "v0");
    }
    let seen = w.until(Duration::from_secs(10), |e| e.key() == "k4");
    let last = seen.last().unwrap().id.clone().unwrap();
    drop(w);
    // While it is away: overwrites big enough to compact, deletes, new keys.
    let big = "x".repeat(256 * 1024);
    for round in 0..40 {
        set(&node, "docs", "k0", &format!("{round}{big}"));
    }
    assert_eq!(node.http("DELETE", "/docs/k1", b"").0, 200);
    set(&node, "docs", "k2", "v1");
    set(&node, "docs", "k9", "new");
    let bytes = || {
        stats(&node)["collections"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == "docs")
            .map(|c| c["bytes"].as_u64().unwrap())
            .unwrap()
    };
    eventually("a background compaction", Duration::from_secs(30), || {
        bytes() < 2 << 20
    });
    let expect = |events: &[Event]| {
        let mut got: Vec<(String, String)> = changes(events)
            .into_iter()
            .map(|(kind, key, value)| (kind, format!("{key}={}", &value[..value.len().min(3)])))
            .collect();
        got.sort();
        let mut want: Vec<(String, String)> = [
            ("delete", "k1="),
            ("set", "k0=39x"),
            ("set", "k2=v1"),
            ("set", "k9=new"),
        ]
        .iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect();
        want.sort();
        assert_eq!(
            got, want,
            "every change since the token, only the latest of each key"
        );
    };
    // Resumed with the SSE reconnect header.
    let mut w = Stream::open(
        node.addr,
        "/docs",
        "text/event-stream",
        &format!("Last-Event-ID: {last}\r\n"),
    );
    assert_eq!(w.status, 200, "{}", w.refusal);
    let got = w.until(Duration::from_secs(10), |e| e.key() == "k9");
    expect(&got);
    let after_all = got.last().unwrap().id.clone().unwrap();
    drop(w);
    // A restart of the node: the same token resumes the same way.
    let addr = node.addr;
    node.stop("KILL");
    let node = Dhrtd::start_on(Some(addr), dir.path(), &[]);
    let mut w = sse(&node, &format!("/docs?since={last}"));
    let got = w.until(Duration::from_secs(10), |e| e.key() == "k9");
    expect(&got);
    // And the latest token misses nothing written after the restart.
    drop(w);
    set(&node, "docs", "after", "restart");
    let mut w = sse(&node, &format!("/docs?since={after_all}"));
    let got = w.until(Duration::from_secs(10), |e| e.key() == "after");
    assert_eq!(
        changes(&got),
        [("set".into(), "after".into(), "restart".into())]
    );
}

/// A member stopped with SIGTERM keeps its copies of the collections it
/// hosts on every member, though another member pins its own collections
/// (then the leave hands copies over): started again, it resumes its
/// watchers' tokens exactly, with what was written while it was away.
/// Before, it released every copy as it left, and the token got 410.
#[test]
fn a_member_restarted_with_sigterm_beside_a_pinned_one_resumes_its_watchers() {
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let a = Dhrtd::start(dirs[0].path(), &[]);
    let b = start_joined(dirs[1].path(), &a, &[]);
    let _pinned = start_joined(dirs[2].path(), &a, &["--collections", "other"]);
    eventually("three healthy members", Duration::from_secs(20), || {
        all_healthy(&[&a, &b, &_pinned], 3)
    });
    set(&b, "tt", "k0", "v0");
    let mut w = sse(&b, "/tt");
    set(&a, "tt", "k1", "v1");
    let seen = w.until(Duration::from_secs(10), |e| e.key() == "k1");
    let token = seen.last().unwrap().id.clone().unwrap();
    drop(w);
    let b_addr = b.addr;
    assert!(b.stop("TERM").success());
    eventually("b has left", Duration::from_secs(10), || {
        crate::cluster::state_of(&a, &b_addr.to_string()).as_deref() == Some("left")
    });
    set(&a, "tt", "k2", "v2");
    // Started again on its data directory, without --node: it rejoins
    // through the members it remembers.
    let b = Dhrtd::start_on(Some(b_addr), dirs[1].path(), &[]);
    let mut w = sse(&b, &format!("/tt?since={token}"));
    let got = w.until(Duration::from_secs(30), |e| e.key() == "k2");
    assert_eq!(changes(&got), [("set".into(), "k2".into(), "v2".into())]);
}

#[test]
fn a_snapshot_holds_every_key_once_then_every_later_change() {
    let dir = tempfile::tempdir().unwrap();
    let node = Dhrtd::start(dir.path(), &[]);
    for i in 0..300 {
        set(&node, "snap", &format!("k{i:03}"), "v0");
    }
    assert_eq!(node.http("DELETE", "/snap/k000", b"").0, 200);
    let mut w = Stream::open(node.addr, "/snap?snapshot=true", "application/x-ndjson", "");
    assert_eq!(w.status, 200, "{}", w.refusal);
    let initial = w.until(Duration::from_secs(10), |e| e.kind() == "synced");
    let mut keys: Vec<&str> = initial
        .iter()
        .filter(|e| e.kind() == "initial")
        .map(Event::key)
        .collect();
    assert!(
        initial
            .iter()
            .all(|e| ["progress", "initial", "synced"].contains(&e.kind()))
    );
    let listed = keys.len();
    keys.sort();
    keys.dedup();
    assert_eq!((listed, keys.len()), (299, 299), "every live key once");
    assert!(!keys.contains(&"k000"));
    set(&node, "snap", "k001", "v1");
    set(&node, "snap", "new", "n");
    let after = w.until(Duration::from_secs(10), |e| e.key() == "new");
    assert_eq!(
        changes(&after),
        [
            ("set".into(), "k001".into(), "v1".into()),
            ("set".into(), "new".into(), "n".into())
        ]
    );
    // A prefix filters the snapshot and the changes alike. Over SSE, no
    // event before the end of the snapshot has an id: an EventSource that
    // reconnects halfway starts the snapshot again instead of skipping it.
    let mut w = sse(&node, "/snap?snapshot=true&prefix=k29");
    let got = w.until(Duration::from_secs(10), |e| e.kind() == "synced");
    let (last, before) = got.split_last().unwrap();
    assert!(before.iter().all(|e| e.id.is_none()), "{before:?}");
    assert!(last.id.is_some());
    let keys: Vec<&str> = got
        .iter()
        .filter(|e| e.kind() == "initial")
        .map(Event::key)
        .collect();
    assert_eq!(keys.len(), 10, "{keys:?}");
    set(&node, "snap", "other", "x");
    set(&node, "snap", "k299", "y");
    let got = w.until(Duration::from_secs(10), |e| e.kind() == "set");
    assert_eq!(got.last().unwrap().key(), "k299");
}

#[test]
fn a_resume_that_cannot_be_honoured_gets_410_and_bad_tokens_400() {
    let dirs: Vec<_> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    let a = Dhrtd::start(dirs[0].path(), &[]);
    let b = Dhrtd::start(dirs[1].path(), &[]);
    set(&a, "c", "k", "v");
    set(&b, "c", "k", "v");
    let mut on_a = sse(&a, "/c?snapshot=true");
    let token = on_a
        .until(Duration::from_secs(10), |e| e.kind() == "synced")
        .last()
        .unwrap()
        .id
        .clone()
        .unwrap();
    // The same token on another node: its history is not this node's.
    let other = Stream::open(
        b.addr,
        &format!("/c?since={token}"),
        "text/event-stream",
        "",
    );
    assert_eq!(other.status, 410, "{}", other.refusal);
    assert!(
        other.refusal.contains("take a snapshot"),
        "{}",
        other.refusal
    );
    // A token ahead of the log.
    let ahead = format!("{}ffffffffffffffff", &token[..16]);
    let s = Stream::open(
        a.addr,
        &format!("/c?since={ahead}"),
        "text/event-stream",
        "",
    );
    assert_eq!(s.status, 410, "{}", s.refusal);
    for bad in ["nonsense", "c:zz"] {
        let s = Stream::open(a.addr, &format!("/c?since={bad}"), "text/event-stream", "");
        assert_eq!(s.status, 400, "{bad}: {}", s.refusal);
    }
    let s = Stream::open(a.addr, "/bad%2Fname", "text/event-stream", "");
    assert_eq!(s.status, 400);
    // The stats count refused resumes.
    let (_, metrics) = a.http("GET", "/metrics", b"");
    assert!(
        metrics.contains("dhrt_watch_closed_total{reason=\"gone\"} 1"),
        "{metrics}"
    );
}

#[test]
fn one_stream_follows_several_collections_and_resumes_them_all() {
    let dir = tempfile::tempdir().unwrap();
    let node = Dhrtd::start(dir.path(), &[]);
    let mut w = sse(&node, "/?watch=users,orders");
    set(&node, "users", "ada", "1");
    set(&node, "orders", "o1", "2");
    // Each collection's events come in its order; across collections, in
    // whichever order they are read.
    let mut seen = 0;
    let got: Vec<Event> = w
        .until(Duration::from_secs(10), |e| {
            seen += usize::from(e.kind() == "set");
            seen == 2
        })
        .into_iter()
        .filter(|e| e.kind() != "progress")
        .collect();
    for e in &got {
        let want = if e.key() == "ada" { "users" } else { "orders" };
        assert_eq!(e.data["Collection"], want, "{e:?}");
    }
    let token = got.last().unwrap().id.clone().unwrap();
    assert!(
        token.starts_with("users:") && token.contains(",orders:"),
        "{token}"
    );
    drop(w);
    set(&node, "orders", "o2", "3");
    set(&node, "users", "bob", "4");
    let mut w = Stream::open(
        node.addr,
        "/?watch=users,orders",
        "text/event-stream",
        &format!("Last-Event-ID: {token}\r\n"),
    );
    assert_eq!(w.status, 200, "{}", w.refusal);
    let mut keys: Vec<String> = Vec::new();
    while keys.len() < 2 {
        let e = w.next(Duration::from_secs(10)).expect("an event");
        if e.kind() == "set" {
            keys.push(e.key().to_string());
        }
    }
    keys.sort();
    assert_eq!(keys, ["bob", "o2"]);
}

/// A lag limit of 1 MB and a grace of 1 s, for the slow-watcher tests.
const LAG_LIMITED: &[&str] = &[
    "--watch-max-lag-bytes",
    "1000000",
    "--watch-lag-grace-secs",
    "1",
];

#[test]
fn a_slow_watcher_does_not_hold_writers_back_and_is_closed_with_a_reason() {
    let dir = tempfile::tempdir().unwrap();
    let node = Dhrtd::start(dir.path(), LAG_LIMITED);
    // A client that subscribes, then reads nothing while 32 MB are written.
    let mut stalled = sse(&node, "/load");
    let value = vec![b'v'; 16 * 1024];
    for i in 0..2000 {
        let (status, body) = node.http("PUT", &format!("/load/k{i}"), &value);
        assert_eq!(status, 200, "{body}");
    }
    // Every write was answered: the watcher holds no queue the writes must
    // fill or wait on. Now writes go on while the client reads a little
    // now and then, slower than they come: it falls further behind, and
    // after the grace it is closed with the reason, which it reads last.
    let addr = node.addr;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = std::thread::spawn({
        let stop = stop.clone();
        move || {
            let mut i = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let path = format!("/load/w{}", i % 5000);
                crate::dhrtd::http_at(addr, "PUT", &path, "", &value).unwrap();
                i += 1;
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut last = None;
    loop {
        assert!(Instant::now() < deadline, "never closed; last {last:?}");
        std::thread::sleep(Duration::from_millis(50));
        match stalled.next(Duration::from_millis(10)) {
            Some(e) => last = Some(e),
            None if stalled.ended() => break,
            None => {}
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    writer.join().unwrap();
    let last = last.expect("some events");
    assert_eq!(last.event, "error", "{last:?}");
    let reason = last.data["Error"].as_str().unwrap();
    assert!(reason.contains("fell too far behind"), "{reason}");
    let (_, metrics) = node.http("GET", "/metrics", b"");
    assert!(
        metrics.contains("dhrt_watch_closed_total{reason=\"lagging\"} 1"),
        "{metrics}"
    );
    // One that reads as fast as it can catches up from far behind.
    let mut quick = sse(&node, "/load?snapshot=true");
    let done = quick.until(Duration::from_secs(60), |e| e.kind() == "synced");
    assert!(done.len() > 5000);
}

/// A client that subscribes and then reads nothing at all: its connection
/// is stuck writing and never asks for the next batch, yet the lag rule
/// closes the watch (it would otherwise keep its place in the log, and the
/// file a compaction replaced, open until the connection's idle timeout).
/// When the client reads at last, the reason comes after what was sent.
#[test]
fn a_watcher_that_reads_nothing_is_closed_by_the_lag_rule() {
    let dir = tempfile::tempdir().unwrap();
    let node = Dhrtd::start(dir.path(), LAG_LIMITED);
    let mut stalled = sse(&node, "/load");
    write_until_closed_for_lag(&node, 1);
    let mut last = None;
    while let Some(e) = stalled.next(Duration::from_secs(10)) {
        last = Some(e);
    }
    assert!(stalled.ended());
    let last = last.expect("some events");
    assert_eq!(last.event, "error", "{last:?}");
    let reason = last.data["Error"].as_str().unwrap();
    assert!(reason.contains("fell too far behind"), "{reason}");
}

/// Writes of 16 KiB to `/load`, over 2,000 keys (compactions run
/// meanwhile), until the metrics count `n` watches closed for lagging.
fn write_until_closed_for_lag(node: &Dhrtd, n: u32) {
    let value = vec![b'v'; 16 * 1024];
    let closed = format!("dhrt_watch_closed_total{{reason=\"lagging\"}} {n}");
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut i = 0u64;
    loop {
        for _ in 0..200 {
            let (status, body) = node.http("PUT", &format!("/load/k{}", i % 2000), &value);
            assert_eq!(status, 200, "{body}");
            i += 1;
        }
        let (_, metrics) = node.http("GET", "/metrics", b"");
        if metrics.contains(&closed) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "not closed after {i} writes: {metrics}"
        );
    }
}

/// The kernel's state of the node's end of a loopback TCP connection
/// (`/proc/net/tcp`: 1 is established), if it has one.
fn server_side_state(node: &Dhrtd, client_port: u16) -> Option<u8> {
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap();
    let (local, remote) = (
        format!(":{:04X}", node.addr.port()),
        format!(":{client_port:04X}"),
    );
    table.lines().skip(1).find_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        (f[1].ends_with(&local) && f[2].ends_with(&remote))
            .then(|| u8::from_str_radix(f[3], 16).unwrap())
    })
}

/// A watch closed for lag whose client reads nothing at all cannot be
/// told why; its connection (and what waits in it, a batch or two) is not
/// kept until the idle timeout (300 s) for that: the node closes it, HTTP
/// and binary alike.
#[test]
fn a_watch_closed_for_lag_whose_client_reads_nothing_loses_its_connection() {
    use dhrt_proto::{Op, Request, encode_frame, preamble};
    const ESTABLISHED: u8 = 1;
    let dir = tempfile::tempdir().unwrap();
    let node = Dhrtd::start(dir.path(), LAG_LIMITED);
    let stalled = sse(&node, "/load");
    let mut binary = TcpStream::connect(node.addr).unwrap();
    let mut wire = preamble().to_vec();
    let watch = Request {
        id: 1,
        op: Op::Watch(dhrt_proto::WatchRequest {
            collection: "load".into(),
            start: dhrt_proto::WatchStart::Now,
            prefix: None,
        }),
    };
    encode_frame(&watch, &mut wire, 1 << 20).unwrap();
    binary.write_all(&wire).unwrap();
    let ports = [stalled.local_port(), binary.local_addr().unwrap().port()];
    eventually("both watches open", Duration::from_secs(10), || {
        let (_, metrics) = node.http("GET", "/metrics", b"");
        metrics.contains("dhrt_watchers 2")
    });
    for port in ports {
        assert_eq!(server_side_state(&node, port), Some(ESTABLISHED));
    }
    write_until_closed_for_lag(&node, 2);
    // Well within the idle timeout (300 s), with room for a loaded machine
    // (10 s of nothing sent after the close, once what the node still had
    // to hand its sockets is handed).
    let closed = || {
        ports
            .iter()
            .all(|p| server_side_state(&node, *p) != Some(ESTABLISHED))
    };
    let deadline = Instant::now() + Duration::from_secs(90);
    while !closed() {
        assert!(
            Instant::now() < deadline,
            "still established (HTTP, binary): {:?}",
            ports.map(|p| server_side_state(&node, p) == Some(ESTABLISHED))
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // Others go on watching.
    let mut fresh = sse(&node, "/load");
    let (status, _) = node.http("PUT", "/load/after", b"v");
    assert_eq!(status, 200);
    let seen = fresh.until(Duration::from_secs(10), |e| e.key() == "after");
    assert_eq!(seen.last().map(|e| e.kind()), Some("set"));
    drop((stalled, binary));
}

/// Log files a compaction replaced that the node still holds open
/// (mapped or as a descriptor).
fn replaced_logs_held(node: &Dhrtd) -> usize {
    let pid = node.pid();
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
    let mapped = maps
        .lines()
        .filter(|l| l.contains(".dhrt") && l.ends_with("(deleted)"))
        .count();
    let open = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter(|t| {
            let t = t.to_string_lossy();
            t.contains(".dhrt") && t.ends_with("(deleted)")
        })
        .count();
    mapped + open
}

/// A watcher that reads nothing while the same few keys are overwritten
/// is not far behind in bytes (each compaction leaves one value a key),
/// so the lag rule rightly leaves it open; but it must not hold on to
/// every file a compaction replaced meanwhile (the first one it was
/// reading, and the batches waiting for it, kept theirs until the
/// connection's idle timeout: tens of GB of deleted files on a large
/// collection).
#[test]
fn a_watcher_that_reads_nothing_holds_no_file_a_compaction_replaced() {
    let dir = tempfile::tempdir().unwrap();
    let node = Dhrtd::start(dir.path(), &[]);
    let stalled = sse(&node, "/hot");
    let value = vec![b'v'; 64 * 1024];
    // 25 MiB over 16 keys: compactions every few MiB (4 MiB at least,
    // half of it garbage).
    for i in 0..400 {
        let (status, body) = node.http("PUT", &format!("/hot/k{}", i % 16), &value);
        assert_eq!(status, 200, "{body}");
    }
    let hot_bytes = || {
        stats(&node)["collections"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == "hot")
            .map(|c| c["bytes"].as_u64().unwrap())
            .unwrap()
    };
    eventually("a background compaction", Duration::from_secs(30), || {
        hot_bytes() < 8 << 20
    });
    let (_, metrics) = node.http("GET", "/metrics", b"");
    eventually(
        "no replaced log is held open",
        Duration::from_secs(10),
        || replaced_logs_held(&node) == 0,
    );
    assert!(
        metrics.contains("dhrt_watch_closed_total{reason=\"lagging\"} 0"),
        "{metrics}"
    );
    drop(stalled);
}

#[test]
fn a_revoked_token_ends_the_watches_it_opened() {
    let dir = tempfile::tempdir().unwrap();
    let (reader, read_line) = crate::security::make_token("read");
    let (writer, write_line) = crate::security::make_token("write");
    let auth = dir.path().join("auth");
    std::fs::write(&auth, format!("{read_line}\n{write_line}\n")).unwrap();
    let node = Dhrtd::start(
        &dir.path().join("data"),
        &["--auth-file", auth.to_str().unwrap()],
    );
    let put = |key: &str| {
        let header = format!("Authorization: Bearer {writer}\r\n");
        let (status, body) =
            crate::dhrtd::http_at(node.addr, "PUT", &format!("/c/{key}"), &header, b"v").unwrap();
        assert_eq!(status, 200, "{body}");
    };
    let none = Stream::open(node.addr, "/c", "text/event-stream", "");
    assert_eq!(none.status, 401, "no token, no watch");
    let mut sse_watch = Stream::open(
        node.addr,
        "/c",
        "text/event-stream",
        &format!("Authorization: Bearer {reader}\r\n"),
    );
    assert_eq!(sse_watch.status, 200, "{}", sse_watch.refusal);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut binary = dhrt_client::Client::builder(node.addr.to_string())
        .token(reader.clone())
        .watch("c", dhrt_client::WatchStart::Now);
    // The binary watch connects when first polled: its first item is the
    // progress event that opens it.
    let opened = rt
        .block_on(async { tokio::time::timeout(Duration::from_secs(20), binary.next()).await })
        .expect("in time")
        .unwrap();
    assert!(
        matches!(opened, dhrt_client::WatchItem::Event(ref e) if e.kind == dhrt_client::EventKind::Progress),
        "{opened:?}"
    );
    put("before");
    sse_watch.until(Duration::from_secs(10), |e| e.key() == "before");
    let next_change = |w: &mut dhrt_client::Watch| {
        rt.block_on(async {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
            loop {
                match tokio::time::timeout_at(deadline, w.next()).await {
                    Ok(Ok(dhrt_client::WatchItem::Event(e)))
                        if e.kind == dhrt_client::EventKind::Progress => {}
                    other => return other.expect("in time"),
                }
            }
        })
    };
    let first = next_change(&mut binary).unwrap();
    assert!(matches!(first, dhrt_client::WatchItem::Event(ref e) if &e.key[..] == b"before"));
    // The read token is removed and the node told.
    std::fs::write(&auth, format!("{write_line}\n")).unwrap();
    node.signal("HUP");
    std::thread::sleep(Duration::from_millis(500));
    put("after");
    let got = sse_watch.until(Duration::from_secs(10), |e| e.event == "error");
    assert!(got.iter().all(|e| e.key() != "after"), "{got:?}");
    assert!(sse_watch.next(Duration::from_secs(10)).is_none());
    assert!(sse_watch.ended(), "the stream ends after its error");
    match next_change(&mut binary) {
        Err(dhrt_client::Error::Unauthenticated(_)) => {}
        other => panic!("expected the revoked token to end the watch, got {other:?}"),
    }
}

/// A watch never ends by itself: a stopping node ends it at once with an
/// error event that says why (it held the stop for the whole grace period,
/// then was cut without a word).
#[test]
fn a_stopping_node_ends_its_watches_with_a_reason() {
    let dir = tempfile::tempdir().unwrap();
    let node = Dhrtd::start(dir.path(), &[]);
    let mut sse_watch = sse(&node, "/c");
    let mut ndjson = Stream::open(node.addr, "/c", "application/x-ndjson", "");
    assert_eq!(ndjson.status, 200, "{}", ndjson.refusal);
    let rt = tokio::runtime::Runtime::new().unwrap();
    // It reconnects by itself; what broke each connection goes to its hook.
    let told = Arc::new(Mutex::new(Vec::<String>::new()));
    let hook = told.clone();
    let mut binary = dhrt_client::Client::builder(node.addr.to_string())
        .watch("c", dhrt_client::WatchStart::Now)
        .on_retry(move |e| hook.lock().unwrap().push(e.to_string()));
    // It connects when first polled: its first item is the progress event
    // that opens it.
    let opened = rt
        .block_on(async { tokio::time::timeout(Duration::from_secs(20), binary.next()).await })
        .expect("in time")
        .unwrap();
    assert!(
        matches!(opened, dhrt_client::WatchItem::Event(ref e) if e.kind == dhrt_client::EventKind::Progress),
        "{opened:?}"
    );
    // The next item that is not progress, within 30 s.
    let next = |w: &mut dhrt_client::Watch| {
        rt.block_on(async {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
            loop {
                match tokio::time::timeout_at(deadline, w.next())
                    .await
                    .expect("in time")
                {
                    Ok(dhrt_client::WatchItem::Event(e))
                        if e.kind == dhrt_client::EventKind::Progress => {}
                    other => return other,
                }
            }
        })
    };
    set(&node, "c", "k", "v");
    sse_watch.until(Duration::from_secs(10), |e| e.key() == "k");
    ndjson.until(Duration::from_secs(10), |e| e.key() == "k");
    let first = next(&mut binary).unwrap();
    assert!(matches!(first, dhrt_client::WatchItem::Event(ref e) if &e.key[..] == b"k"));
    assert!(node.stop("TERM").success());
    // The binary protocol says it too (before, the connection just closed).
    let _ =
        rt.block_on(async { tokio::time::timeout(Duration::from_secs(3), binary.next()).await });
    let told = told.lock().unwrap();
    assert!(
        told.first().is_some_and(|e| e.contains("shutting down")),
        "{told:?}"
    );
    for w in [&mut sse_watch, &mut ndjson] {
        let got = w.until(Duration::from_secs(10), |e| {
            e.data["Error"]
                .as_str()
                .is_some_and(|m| m.contains("shutting down"))
        });
        assert!(!got.is_empty());
        assert!(w.next(Duration::from_secs(10)).is_none());
        assert!(w.ended(), "the stream ends after its error");
    }
}

#[test]
fn a_node_caps_its_watches() {
    let dir = tempfile::tempdir().unwrap();
    let node = Dhrtd::start(dir.path(), &["--max-watchers", "2"]);
    let _a = sse(&node, "/a");
    let _b = sse(&node, "/b");
    let c = Stream::open(node.addr, "/c", "text/event-stream", "");
    assert_eq!(c.status, 503, "{}", c.refusal);
    assert!(c.refusal.contains("watches open"), "{}", c.refusal);
}

/// `dhrt-cli watch` of an address where no node answers says so and
/// exits 2 at once, as `get` does (it used to retry in silence for ever).
#[test]
fn the_cli_watch_of_an_address_nobody_answers_fails_at_once() {
    let addr = crate::dhrtd::free_addr();
    let started = Instant::now();
    let out = std::process::Command::new(crate::cli::cli_binary())
        .args(["--addr", &addr.to_string(), "watch", "users"])
        .output()
        .unwrap();
    assert!(started.elapsed() < Duration::from_secs(10));
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains(&addr.to_string()), "{stderr}");
}

#[test]
fn the_cli_prints_each_change_and_stops_on_ctrl_c() {
    use std::io::BufRead;
    let dir = tempfile::tempdir().unwrap();
    let node = Dhrtd::start(dir.path(), &[]);
    set(&node, "users", "before", "x");
    let mut child = std::process::Command::new(crate::cli::cli_binary())
        .args([
            "--addr",
            &node.addr.to_string(),
            "watch",
            "users",
            "--snapshot",
        ])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines() {
            if tx.send(line.unwrap()).is_err() {
                return;
            }
        }
    });
    let line = |what: &str| {
        rx.recv_timeout(Duration::from_secs(10))
            .unwrap_or_else(|_| panic!("no line for {what}"))
    };
    let initial = line("the snapshot");
    assert!(initial.starts_with("initial\tbefore\tx\t"), "{initial:?}");
    let synced = line("the end of the snapshot");
    assert!(synced.starts_with("synced\t"), "{synced:?}");
    set(&node, "users", "ada", "lovelace");
    // Seen before it is deleted (a set superseded before the watch reads
    // it is skipped for the delete: only winners are sent).
    let first = line("a set");
    let fields: Vec<&str> = first.split('\t').collect();
    assert_eq!(&fields[..3], ["set", "ada", "lovelace"], "{first:?}");
    assert_eq!(fields[3].len(), 32, "the resume token");
    assert_eq!(node.http("DELETE", "/users/ada", b"").0, 200);
    assert!(line("a delete").starts_with("delete\tada\t\t"));
    // A value with tabs and newlines stays on its line: escaped, it cannot
    // forge another event's.
    let (status, _) = node.http("PUT", "/users/evil", b"a\tb\\\nset\tforged\tx\r\x1b[2J");
    assert_eq!(status, 200);
    let evil = line("a value with tabs and newlines");
    let fields_of_evil: Vec<&str> = evil.split('\t').collect();
    assert_eq!(fields_of_evil.len(), 4, "{evil:?}");
    assert_eq!(
        &fields_of_evil[..3],
        ["set", "evil", "a\\tb\\\\\\nset\\tforged\\tx\\r\\x1b[2J"],
        "{evil:?}"
    );
    // Ctrl-C ends it cleanly.
    std::process::Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    let status = child.wait().unwrap();
    assert!(status.success(), "{status:?}");
    // --since resumes after a line's token, --json gives the API's shape.
    let out = std::process::Command::new(crate::cli::cli_binary())
        .args([
            "--addr",
            &node.addr.to_string(),
            "--json",
            "watch",
            "users",
            "--since",
            fields[3],
        ])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let pid = out.id();
    std::thread::sleep(Duration::from_millis(500));
    std::process::Command::new("kill")
        .args(["-INT", &pid.to_string()])
        .status()
        .unwrap();
    let output = out.wait_with_output().unwrap();
    let lines: Vec<Value> = String::from_utf8(output.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let kinds: Vec<&str> = lines.iter().map(|l| l["Kind"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["progress", "delete", "set"], "{lines:?}");
    assert_eq!(lines[1]["Key"], "ada");
    assert_eq!(lines[2]["Value"], "a\tb\\\nset\tforged\tx\r\x1b[2J");
}

#[test]
fn the_client_stream_resumes_by_itself_across_a_node_restart() {
    use dhrt_client::{Client, EventKind, WatchItem, WatchStart};
    let dir = tempfile::tempdir().unwrap();
    let node = Dhrtd::start(dir.path(), &[]);
    let addr = node.addr;
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut w = Client::builder(addr.to_string()).watch("jobs", WatchStart::Now);
    let next_change = |w: &mut dhrt_client::Watch| {
        rt.block_on(async {
            loop {
                let item = tokio::time::timeout(Duration::from_secs(20), w.next())
                    .await
                    .expect("an item in time")
                    .unwrap();
                match item {
                    WatchItem::Event(e) if e.kind == EventKind::Progress => continue,
                    other => return other,
                }
            }
        })
    };
    // The first poll connects; a write then arrives.
    let writer = std::thread::spawn({
        let node_addr = addr;
        move || {
            std::thread::sleep(Duration::from_millis(300));
            crate::dhrtd::http_at(node_addr, "PUT", "/jobs/j1", "", b"one").unwrap()
        }
    });
    let WatchItem::Event(e) = next_change(&mut w) else {
        panic!("an event")
    };
    assert_eq!((e.kind, &e.key[..]), (EventKind::Set, &b"j1"[..]));
    assert_eq!(writer.join().unwrap().0, 200);
    // The node goes down; writes happen while it restarts.
    node.stop("KILL");
    let node = Dhrtd::start_on(Some(addr), dir.path(), &[]);
    set(&node, "jobs", "j2", "two");
    assert_eq!(node.http("DELETE", "/jobs/j1", b"").0, 200);
    let mut got = Vec::new();
    while got.len() < 2 {
        match next_change(&mut w) {
            WatchItem::Event(e) => got.push((e.kind, String::from_utf8_lossy(&e.key).into_owned())),
            WatchItem::Resync(why) => panic!("the same node resumes exactly: {why}"),
        }
    }
    assert_eq!(
        got,
        [
            (EventKind::Set, "j2".into()),
            (EventKind::Delete, "j1".into())
        ]
    );
    assert!(w.reconnects() >= 1);
    // A node whose history it does not know: it resyncs with a snapshot.
    let other_dir = tempfile::tempdir().unwrap();
    let other = Dhrtd::start(other_dir.path(), &[]);
    set(&other, "jobs", "elsewhere", "x");
    let token = w.token().unwrap();
    let mut moved = Client::builder(other.addr.to_string()).watch("jobs", WatchStart::After(token));
    match next_change(&mut moved) {
        WatchItem::Resync(why) => assert!(why.contains("take a snapshot"), "{why}"),
        other => panic!("expected a resync, got {other:?}"),
    }
    let WatchItem::Event(e) = next_change(&mut moved) else {
        panic!("the snapshot")
    };
    assert_eq!(
        (e.kind, &e.key[..]),
        (EventKind::Initial, &b"elsewhere"[..])
    );
    let WatchItem::Event(e) = next_change(&mut moved) else {
        panic!("its end")
    };
    assert_eq!(e.kind, EventKind::Synced);
}
