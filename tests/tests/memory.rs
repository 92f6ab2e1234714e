//! What one connection can make a real `dhrtd` hold: pipelined reads of a
//! large value and a listing of large values escaped into JSON stay within
//! a few tens of MiB of peak memory, read from the node's own
//! `/proc/PID/status`; idle connections are closed; a client flood does not
//! lock peers out.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use bytes::Bytes;
use dhrt_proto::{Decoded, Op, Reply, Request, Response, decode_frame, encode_frame, preamble};

use crate::cluster::{all_healthy, eventually};
use crate::dhrtd::Dhrtd;

const MIB: u64 = 1 << 20;

/// A field of `/proc/PID/status`, in bytes.
fn status_bytes(pid: u32, field: &str) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = text
        .lines()
        .find(|l| l.starts_with(field))
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"));
    let kb: u64 = line
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap();
    kb * 1024
}

/// The largest anonymous RSS of process `pid` sampled over `span`.
fn most_anon(pid: u32, span: Duration) -> u64 {
    let mut most = 0;
    let until = Instant::now() + span;
    while Instant::now() < until {
        most = most.max(status_bytes(pid, "RssAnon:"));
        std::thread::sleep(Duration::from_millis(100));
    }
    most
}

/// Resets the node's peak RSS to its current RSS; returns that.
fn reset_peak(pid: u32) -> u64 {
    std::fs::write(format!("/proc/{pid}/clear_refs"), "5").unwrap();
    status_bytes(pid, "VmRSS:")
}

fn put(node: &Dhrtd, path: &str, value: &[u8]) {
    let (status, body) = node.http("PUT", path, value);
    assert_eq!(status, 200, "PUT {path}: {body}");
}

/// `n` gets of one key, ids 0 to n - 1.
fn gets(collection: &str, key: &str, n: u64) -> Vec<Request> {
    (0..n)
        .map(|id| Request {
            id,
            op: Op::Get {
                collection: collection.into(),
                key: Bytes::copy_from_slice(key.as_bytes()),
            },
        })
        .collect()
}

/// Sends `requests` in one write and reads every answer, counting their
/// bytes without keeping them.
fn pipeline(node: &Dhrtd, requests: &[Request]) -> (usize, u64) {
    let mut s = TcpStream::connect(node.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let mut wire = preamble().to_vec();
    for r in requests {
        encode_frame(r, &mut wire, 64 << 20).unwrap();
    }
    s.write_all(&wire).unwrap();
    let (mut buf, mut answers, mut bytes) = (Vec::new(), 0, 0u64);
    let mut chunk = vec![0u8; 1 << 20];
    while answers < requests.len() {
        let n = s.read(&mut chunk).unwrap();
        assert!(n > 0, "closed after {answers} answers");
        buf.extend_from_slice(&chunk[..n]);
        while let Decoded::Complete { msg, len } = decode_frame::<Response>(&buf, 64 << 20).unwrap()
        {
            match msg.result {
                Ok(Reply::Value(Some(v))) => bytes += v.len() as u64,
                other => panic!("{other:?}"),
            }
            answers += 1;
            buf.drain(..len);
        }
    }
    (answers, bytes)
}

#[test]
fn pipelined_gets_of_a_large_value_and_a_listing_of_escaped_values_hold_little_memory() {
    let dir = tempfile::tempdir().unwrap();
    let node = Dhrtd::start(dir.path(), &["--sync", "never"]);
    let pid = node.pid();

    // 1,000 pipelined gets of one 1 MiB value: 13.5 KB of requests.
    let value: Vec<u8> = (0..MIB).map(|i| (i % 251) as u8).collect();
    put(&node, "/big/one", &value);
    assert_eq!(node.get_raw("/big/one").1.len() as u64, MIB); // pages warm
    let gets = gets("big", "one", 1000);
    let base = reset_peak(pid);
    let (answers, bytes) = pipeline(&node, &gets);
    assert_eq!((answers, bytes), (1000, 1000 * MIB));
    let grew = status_bytes(pid, "VmHWM:").saturating_sub(base);
    eprintln!(
        "1,000 pipelined gets of 1 MiB: peak RSS +{} MiB",
        grew / MIB
    );
    assert!(grew < 48 * MIB, "peak RSS grew by {} MiB", grew / MIB);

    // 100 values of 1 MiB of control bytes: six bytes each in JSON.
    let control = vec![1u8; MIB as usize];
    for i in 0..100 {
        put(&node, &format!("/ctl/k{i:03}"), &control);
    }
    for i in 0..100 {
        assert_eq!(node.get_raw(&format!("/ctl/k{i:03}")).1.len() as u64, MIB);
    }
    let base = reset_peak(pid);
    let (status, body) = node.http("GET", "/ctl", b"");
    assert_eq!(status, 200);
    let listed: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(listed.as_array().unwrap().len(), 100);
    drop((body, listed));
    let grew = status_bytes(pid, "VmHWM:").saturating_sub(base);
    eprintln!(
        "an HTTP listing of 100 x 1 MiB of control bytes: peak RSS +{} MiB",
        grew / MIB
    );
    assert!(grew < 48 * MIB, "peak RSS grew by {} MiB", grew / MIB);

    // A binary listing asking for everything gets a page capped by bytes.
    let mut s = TcpStream::connect(node.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut wire = preamble().to_vec();
    let list = Op::List {
        collection: "ctl".into(),
        after: None,
        limit: u32::MAX,
    };
    encode_frame(&Request { id: 1, op: list }, &mut wire, 1 << 20).unwrap();
    s.write_all(&wire).unwrap();
    let mut buf = Vec::new();
    let page = loop {
        let mut chunk = vec![0u8; 1 << 20];
        let n = s.read(&mut chunk).unwrap();
        assert!(n > 0);
        buf.extend_from_slice(&chunk[..n]);
        if let Decoded::Complete { msg, .. } = decode_frame::<Response>(&buf, 64 << 20).unwrap() {
            break msg;
        }
    };
    let Ok(Reply::Page(page)) = page.result else {
        panic!("{page:?}")
    };
    assert_eq!(
        page.entries.len(),
        1,
        "a page carries at most 1 MiB (or one entry)"
    );
    assert!(page.next.is_some());
}

#[test]
fn idle_connections_are_closed_and_clients_at_the_cap_leave_room_for_peers() {
    let dirs: Vec<_> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    let a = Dhrtd::start(
        dirs[0].path(),
        &["--idle-timeout-secs", "1", "--max-connections", "3"],
    );
    // Three clients take every client slot: an idle binary one, an idle
    // HTTP keep-alive one, and one that has not finished its request.
    let mut binary = TcpStream::connect(a.addr).unwrap();
    binary.write_all(&preamble()).unwrap();
    let mut http = TcpStream::connect(a.addr).unwrap();
    http.write_all(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        .unwrap();
    let mut answer = [0u8; 8192];
    assert!(http.read(&mut answer).unwrap() > 0);
    let mut half = TcpStream::connect(a.addr).unwrap();
    half.write_all(b"GET / HTTP/1.1\r\n").unwrap();
    std::thread::sleep(Duration::from_millis(200));
    // A fourth client is refused...
    assert!(a.try_http("GET", "/", b"").map(|r| r.0).unwrap_or(0) != 200);
    // ...a peer is not: another node joins through it.
    let b = Dhrtd::start(dirs[1].path(), &["--node", &a.addr.to_string()]);
    // (Asked of the joining node: the first may have no client slot free.)
    eventually(
        "the peer could not join: {stats}",
        Duration::from_secs(20),
        || all_healthy(&[&b], 2),
    );
    // The idle clients are closed after about a second of silence.
    for (name, s) in [("binary", &mut binary), ("http", &mut http)] {
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let started = Instant::now();
        let mut rest = Vec::new();
        let closed = s.read_to_end(&mut rest).is_ok();
        assert!(closed, "the idle {name} connection is still open after 5 s");
        assert!(started.elapsed() < Duration::from_secs(4), "{name}");
    }
    // And their slots serve others again.
    let deadline = Instant::now() + Duration::from_secs(15);
    while a.try_http("GET", "/", b"").map(|r| r.0).unwrap_or(0) != 200 {
        assert!(Instant::now() < deadline, "slots not given back");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_stranger_can_neither_park_a_large_frame_nor_take_the_peer_slots() {
    const SECRET: &str = "a cluster secret of more than thirty-two bytes";
    let dirs: Vec<_> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    let auth = dirs[0].path().join("auth");
    let token = dhrt_proto::auth::new_token();
    let line = dhrt_proto::auth::auth_line(dhrt_proto::Role::Write, &token, "");
    std::fs::write(&auth, line).unwrap();
    let a = Dhrtd::start(
        &dirs[0].path().join("data"),
        &[
            "--auth-file",
            auth.to_str().unwrap(),
            "--idle-timeout-secs",
            "2",
            "--max-peer-connections",
            "2",
            // A node with an auth file takes peers only with a secret.
            "--cluster-secret",
            SECRET,
        ],
    );
    // Before a token: a frame announced at 16 MiB closes the connection
    // at once, nothing buffered.
    let mut s = TcpStream::connect(a.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut wire = preamble().to_vec();
    wire.extend_from_slice(&(16u32 << 20).to_le_bytes());
    wire.extend_from_slice(&[0u8; 64 * 1024]);
    let _ = s.write_all(&wire);
    let mut rest = Vec::new();
    let started = Instant::now();
    let _ = s.read_to_end(&mut rest);
    assert!(started.elapsed() < Duration::from_secs(2), "still open");
    // Bytes trickled into a frame that never completes do not keep a
    // connection: closed at the idle timeout.
    let mut s = TcpStream::connect(a.addr).unwrap();
    s.write_all(&preamble()).unwrap();
    s.write_all(&100u32.to_le_bytes()).unwrap();
    let started = Instant::now();
    let mut closed = false;
    for _ in 0..8 {
        std::thread::sleep(Duration::from_millis(500));
        if s.write_all(b"x").is_err() {
            closed = true;
            break;
        }
    }
    let _ = s.set_read_timeout(Some(Duration::from_secs(3)));
    let mut rest = Vec::new();
    closed |= s.read_to_end(&mut rest).is_ok();
    assert!(closed, "a trickle kept the connection open");
    assert!(started.elapsed() < Duration::from_secs(6));

    // Strangers that say "peer" and prove nothing hold no peer slot: six
    // of them, reconnecting whenever the node drops one, the whole time.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let strangers = {
        let (stop, at) = (stop.clone(), a.addr);
        std::thread::spawn(move || {
            let mut open: Vec<TcpStream> = Vec::new();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                open.retain(|s| {
                    let _ = s.set_nonblocking(true);
                    let mut b = [0u8; 1];
                    !matches!((&*s).read(&mut b), Ok(0))
                });
                while open.len() < 6 {
                    let Ok(mut s) = TcpStream::connect(at) else {
                        break;
                    };
                    let peer = dhrt_proto::channel_preamble(dhrt_proto::Channel::Peer);
                    let _ = s.write_all(&peer);
                    open.push(s);
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        })
    };
    std::thread::sleep(Duration::from_millis(300));
    let b = Dhrtd::start(
        &dirs[1].path().join("data"),
        &["--node", &a.addr.to_string(), "--cluster-secret", SECRET],
    );
    // (Asked of the joining node: the first may have no client slot free.)
    eventually(
        "strangers kept the peer out: {stats}",
        Duration::from_secs(20),
        || all_healthy(&[&b], 2),
    );
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    strangers.join().unwrap();
}

#[test]
fn a_client_reading_a_long_answer_slowly_is_not_idle() {
    let dir = tempfile::tempdir().unwrap();
    let node = Dhrtd::start(dir.path(), &["--idle-timeout-secs", "1", "--sync", "never"]);
    let value: Vec<u8> = (0..256 * 1024).map(|i| (i % 200) as u8 + 32).collect();
    put(&node, "/slow/v", &value);
    // 40 pipelined gets of 256 KiB (10 MiB of answers), read at about
    // 2.5 MiB/s: four seconds of answers, four idle timeouts.
    let mut s = TcpStream::connect(node.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut wire = preamble().to_vec();
    for id in 0..40 {
        let op = Op::Get {
            collection: "slow".into(),
            key: Bytes::from_static(b"v"),
        };
        encode_frame(&Request { id, op }, &mut wire, 1 << 20).unwrap();
    }
    s.write_all(&wire).unwrap();
    let mut got = 0usize;
    let mut chunk = vec![0u8; 64 * 1024];
    let want = 40 * 256 * 1024;
    let started = Instant::now();
    while got < want {
        let n = s.read(&mut chunk).expect("the answers were cut");
        assert!(n > 0, "closed after {got} bytes, {:?}", started.elapsed());
        got += n;
        std::thread::sleep(Duration::from_millis(25));
    }
    assert!(
        started.elapsed() > Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
}

/// Many clients that start large uploads and stop (or trickle) cannot
/// take the node's memory all together: past `--max-inflight-mib` of
/// request bytes held at once, HTTP and binary alike, a large request is
/// refused at once with a sentence, and once the others finish it is
/// taken again.
#[test]
fn large_requests_arriving_at_once_share_a_node_wide_budget() {
    let dir = tempfile::tempdir().unwrap();
    let node = Dhrtd::start(dir.path(), &["--max-inflight-mib", "20"]);
    // Two uploads of 12 MiB hold 8 MiB each, and stop there.
    let head = |key: &str| {
        format!(
            "PUT /up/{key} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {}\r\n\r\n",
            12 * MIB
        )
    };
    let mut holders = Vec::new();
    for key in ["a", "b"] {
        let mut s = TcpStream::connect(node.addr).unwrap();
        s.write_all(head(key).as_bytes()).unwrap();
        s.write_all(&vec![b'h'; 8 * MIB as usize]).unwrap();
        holders.push(s);
    }
    // Read by the node (not only taken by the kernel's buffers) before the
    // third comes: otherwise the third may take the budget first.
    let held = || {
        let (_, metrics) = node.http("GET", "/metrics", b"");
        metrics
            .lines()
            .find_map(|l| l.strip_prefix("dhrt_inflight_bytes "))
            .map_or(0, |v| v.trim().parse::<u64>().unwrap())
    };
    crate::cluster::eventually(
        "the node holds both uploads",
        Duration::from_secs(10),
        || held() >= 2 * (8 * MIB - (64 << 10)),
    );
    // A third is refused before its 8 MiB are in: 503, with why. The rest
    // of its body is read and thrown away, so its client writes it all and
    // then reads the answer, rather than meeting a reset mid-write.
    let mut third = TcpStream::connect(node.addr).unwrap();
    third.write_all(head("c").as_bytes()).unwrap();
    third
        .write_all(&vec![b'h'; 8 * MIB as usize])
        .expect("the refused body is read, not reset");
    let mut answer = Vec::new();
    let _ = third.read_to_end(&mut answer);
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    assert!(answer.contains("--max-inflight-mib"), "{answer}");
    // So is a binary frame of 12 MiB: answered Unavailable, then closed.
    let mut bin = TcpStream::connect(node.addr).unwrap();
    let mut wire = preamble().to_vec();
    encode_frame(
        &Request {
            id: 9,
            op: Op::Set {
                collection: "up".into(),
                key: Bytes::from_static(b"d"),
                value: Bytes::from(vec![b'b'; 12 * MIB as usize]),
            },
        },
        &mut wire,
        dhrt_proto::DEFAULT_MAX_FRAME,
    )
    .unwrap();
    bin.write_all(&wire)
        .expect("the refused frame is read, not reset");
    let mut answer = Vec::new();
    let _ = bin.read_to_end(&mut answer);
    let Ok(Decoded::Complete { msg, .. }) = decode_frame::<Response>(&answer, 1 << 20) else {
        panic!("no answer to the refused frame: {} bytes", answer.len());
    };
    assert_eq!(msg.id, 9);
    let e = msg.result.unwrap_err();
    assert_eq!(e.kind, dhrt_proto::ErrorKind::Unavailable, "{e}");
    // The first two finish; then large requests are taken again.
    for mut s in holders {
        s.write_all(&vec![b'h'; 4 * MIB as usize]).unwrap();
        let mut status = [0u8; 12];
        s.read_exact(&mut status).unwrap();
        assert_eq!(&status, b"HTTP/1.1 200");
    }
    put(&node, "/up/c", &vec![b'c'; 12 * MIB as usize]);
    assert_eq!(node.get_raw("/up/c").1.len(), 12 * MIB as usize);
    // Every byte of the budget is given back.
    crate::cluster::eventually("an empty budget", Duration::from_secs(5), || held() == 0);
}

/// A binary connection that wrote one large value and stays open does not
/// keep that value's buffer: the node's budget counts values only while
/// they arrive, so connections that each wrote one, one after another,
/// held 16 MiB apiece for as long as they lived (a node of 4 GB died at
/// 95 of them).
#[test]
fn connections_that_wrote_a_large_value_do_not_keep_its_buffer() {
    let dir = tempfile::tempdir().unwrap();
    let node = Dhrtd::start(dir.path(), &["--sync", "never", "--max-inflight-mib", "64"]);
    let pid = node.pid();
    let base = status_bytes(pid, "RssAnon:");
    let mut open = Vec::new();
    for i in 0..12u64 {
        let mut s = TcpStream::connect(node.addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let mut wire = preamble().to_vec();
        let set = Request {
            id: i,
            op: Op::Set {
                collection: "big".into(),
                key: Bytes::from(format!("k{}", i % 3)),
                value: Bytes::from(vec![i as u8; 15 * MIB as usize]),
            },
        };
        encode_frame(&set, &mut wire, dhrt_proto::DEFAULT_MAX_FRAME).unwrap();
        s.write_all(&wire).unwrap();
        let mut answer = Vec::new();
        let mut chunk = [0u8; 4096];
        let msg = loop {
            let n = s.read(&mut chunk).unwrap();
            assert!(n > 0, "closed before answering");
            answer.extend_from_slice(&chunk[..n]);
            if let Decoded::Complete { msg, .. } =
                decode_frame::<Response>(&answer, 1 << 20).unwrap()
            {
                break msg;
            }
        };
        assert!(msg.result.is_ok(), "{:?}", msg.result);
        open.push(s);
    }
    // Twelve buffers of 15 MiB would be 180 MiB; what the node holds once
    // its allocator has taken back the freed ones is far less.
    let mut grew = u64::MAX;
    let until = Instant::now() + Duration::from_secs(15);
    while Instant::now() < until && grew > 48 * MIB {
        std::thread::sleep(Duration::from_millis(200));
        grew = status_bytes(pid, "RssAnon:").saturating_sub(base);
    }
    assert!(
        grew <= 48 * MIB,
        "12 idle connections that each wrote 15 MiB: anonymous RSS +{} MiB",
        grew / MIB
    );
    drop(open);
}

/// `dhrt_watchers` from the node's metrics.
fn watchers(node: &Dhrtd) -> u64 {
    let (_, m) = node.http("GET", "/metrics", b"");
    m.lines()
        .find_map(|l| l.strip_prefix("dhrt_watchers "))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no dhrt_watchers in {m}"))
}

#[test]
fn clients_that_stop_reading_large_values_cost_the_node_a_bounded_memory() {
    let dir = tempfile::tempdir().unwrap();
    let node = Dhrtd::start(dir.path(), &["--sync", "never"]);
    let pid = node.pid();
    let value: Vec<u8> = (0..15 * MIB).map(|i| (i % 251) as u8).collect();
    for key in ["a", "b"] {
        put(&node, &format!("/big/{key}"), &value);
        assert_eq!(node.get_raw(&format!("/big/{key}")).1, value); // pages warm
    }
    let base = status_bytes(pid, "RssAnon:");

    // Each reads nothing: 16 binary watches and 8 HTTP watches from a
    // snapshot (both values), 16 connections of 4 pipelined gets and 8
    // HTTP gets.
    let mut stalled = Vec::new();
    for i in 0..48u64 {
        let mut s = TcpStream::connect(node.addr).unwrap();
        let wire = match i {
            0..16 => {
                let mut w = preamble().to_vec();
                let watch = dhrt_proto::WatchRequest {
                    collection: "big".into(),
                    start: dhrt_proto::WatchStart::Snapshot,
                    prefix: None,
                };
                let r = Request {
                    id: 1,
                    op: Op::Watch(watch),
                };
                encode_frame(&r, &mut w, 1 << 20).unwrap();
                w
            }
            16..24 => b"GET /big?snapshot=true HTTP/1.1\r\nHost: 127.0.0.1\r\n\
                        Accept: application/x-ndjson\r\n\r\n"
                .to_vec(),
            40.. => b"GET /big/a HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".to_vec(),
            _ => {
                let mut w = preamble().to_vec();
                for r in gets("big", "a", 4) {
                    encode_frame(&r, &mut w, 1 << 20).unwrap();
                }
                w
            }
        };
        s.write_all(&wire).unwrap();
        stalled.push(s);
    }
    eventually("24 watches open", Duration::from_secs(30), || {
        watchers(&node) == 24
    });
    // Every writer has filled its socket and waits; the node's memory is
    // sampled for a while, its largest reading kept.
    let grew = most_anon(pid, Duration::from_secs(4)).saturating_sub(base);
    eprintln!(
        "48 stalled readers of two 15 MiB values: anonymous RSS +{} MiB",
        grew / MIB
    );
    // Watchers copy large values within a node-wide budget (64 MiB) and
    // share them beyond it. Copies of everything waiting were 984 MiB.
    assert!(grew < 96 * MIB, "anonymous RSS grew by {} MiB", grew / MIB);

    // The node serves meanwhile, and once they go, more of the same works.
    assert_eq!(node.get_raw("/big/b").1, value);
    drop(stalled);
    eventually("the watches closed", Duration::from_secs(30), || {
        watchers(&node) == 0
    });
    let gets = gets("big", "b", 8);
    assert_eq!(pipeline(&node, &gets), (8, 8 * 15 * MIB));
}

/// Watchers that read nothing each hold at most the batch the node renders
/// for them and the one read ahead, not a queue of batches: a hundred of
/// them behind 48 MB of changes held 74-78 MiB in all, now 15-25.
#[test]
fn watchers_that_read_nothing_hold_two_batches_at_most() {
    let dir = tempfile::tempdir().unwrap();
    let node = Dhrtd::start(dir.path(), &["--sync", "never"]);
    let pid = node.pid();
    put(&node, "/w/k", b"v");
    let base = status_bytes(pid, "RssAnon:");
    let mut stalled = Vec::new();
    for _ in 0..100 {
        let mut s = TcpStream::connect(node.addr).unwrap();
        s.write_all(b"GET /w HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: application/x-ndjson\r\n\r\n")
            .unwrap();
        stalled.push(s);
    }
    eventually("100 watches open", Duration::from_secs(30), || {
        watchers(&node) == 100
    });
    let value = vec![b'v'; 4000];
    for i in 0..12_000 {
        put(&node, &format!("/w/k{}", i % 500), &value);
    }
    let grew = most_anon(pid, Duration::from_secs(4)).saturating_sub(base);
    eprintln!(
        "100 watchers reading nothing: anonymous RSS +{} MiB",
        grew / MIB
    );
    assert!(
        grew < 48 * MIB,
        "100 watchers reading nothing: anonymous RSS +{} MiB",
        grew / MIB
    );
    drop(stalled);
}

/// `dhrt_inflight_bytes` from the node's metrics.
/// Whether `node` holds keys of `collection`.
fn keys_on(node: &Dhrtd, collection: &str) -> bool {
    crate::cluster::stats(node)["collections"]
        .as_array()
        .unwrap()
        .iter()
        .any(|c| c["name"] == collection && c["keys"].as_u64() > Some(0))
}

fn inflight_bytes(node: &Dhrtd) -> u64 {
    let (_, metrics) = node.http("GET", "/metrics", b"");
    metrics
        .lines()
        .find_map(|l| l.strip_prefix("dhrt_inflight_bytes "))
        .map_or(0, |v| v.trim().parse::<u64>().unwrap())
}

/// A node that does not store a collection relays its values from an
/// owner: each lives in its memory until the client has read it. Clients
/// that ask for a large value through it and stop reading hold it against
/// the node-wide budget of large values in flight; past it, a read is
/// refused (503, `Unavailable`) with a sentence saying why, and the node's
/// memory stays bounded. Reads of the owner's own values (its log's pages)
/// are not counted. Listings and watches relayed the same way share it.
#[test]
fn values_relayed_to_clients_that_stop_reading_share_the_node_wide_budget() {
    let dirs: Vec<_> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    let flags = ["--replicas", "1", "--max-inflight-mib", "40"];
    let a = Dhrtd::start(dirs[0].path(), &flags);
    let b = crate::cluster::start_joined(dirs[1].path(), &a, &flags);
    eventually("a and b are healthy", Duration::from_secs(15), || {
        all_healthy(&[&a, &b], 2)
    });
    // Node ids are random, so each collection's owner is a coin toss: with
    // 24 of them, all fall to b one time in 16 million.
    for c in 0..24 {
        put(&a, &format!("/c{c}/small"), b"1");
    }
    let mut on_a = None;
    eventually(
        "a collection only a stores",
        Duration::from_secs(15),
        || {
            on_a = (0..24)
                .map(|c| format!("c{c}"))
                .find(|n| keys_on(&a, n) && !keys_on(&b, n));
            on_a.is_some()
        },
    );
    let on_a = on_a.unwrap();
    let value: Vec<u8> = (0..15 * MIB).map(|i| (i % 251) as u8).collect();
    put(&a, &format!("/{on_a}/big"), &value);
    assert_eq!(a.http("DELETE", &format!("/{on_a}/small"), b"").0, 200);
    assert_eq!(b.get_raw(&format!("/{on_a}/big")).1, value);
    assert_eq!(inflight_bytes(&b), 0, "given back once read");
    let pid = b.pid();
    let base = status_bytes(pid, "RssAnon:");

    let stall = |node: &Dhrtd| {
        let mut s = TcpStream::connect(node.addr).unwrap();
        s.write_all(
            format!(
                "GET /{on_a}/big HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: application/octet-stream\r\n\r\n"
            )
            .as_bytes(),
        )
        .unwrap();
        s
    };
    // Two fit in 40 MiB, and are held while their clients read nothing.
    let mut stalled = Vec::new();
    for n in 1..=2 {
        stalled.push(stall(&b));
        eventually("the relayed value is held", Duration::from_secs(10), || {
            inflight_bytes(&b) >= n * 15 * MIB
        });
    }
    // The next ones are refused at once, over HTTP and the binary protocol.
    for _ in 0..14 {
        let mut s = stall(&b);
        let mut head = [0u8; 12];
        s.read_exact(&mut head).unwrap();
        assert_eq!(&head, b"HTTP/1.1 503");
        stalled.push(s);
    }
    let mut refused = stall(&b);
    let mut answer = vec![0u8; 2048];
    let n = refused.read(&mut answer).unwrap();
    let answer = String::from_utf8_lossy(&answer[..n]);
    assert!(
        answer.starts_with("HTTP/1.1 503") && answer.contains("--max-inflight-mib"),
        "{answer}"
    );
    // A listing of it too (a page of the owner's, held while it is sent).
    let (status, body) = b.http("GET", &format!("/{on_a}?limit=1"), b"");
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("--max-inflight-mib"), "{body}");
    let mut bin = TcpStream::connect(b.addr).unwrap();
    let mut wire = preamble().to_vec();
    encode_frame(&gets(&on_a, "big", 1)[0], &mut wire, 1 << 20).unwrap();
    bin.write_all(&wire).unwrap();
    let mut answer = Vec::new();
    let e = loop {
        let mut chunk = [0u8; 4096];
        let n = bin.read(&mut chunk).unwrap();
        assert!(n > 0, "closed without an answer");
        answer.extend_from_slice(&chunk[..n]);
        if let Ok(Decoded::Complete { msg, .. }) = decode_frame::<Response>(&answer, 1 << 20) {
            break msg.result.unwrap_err();
        }
    };
    assert_eq!(e.kind, dhrt_proto::ErrorKind::Unavailable, "{e}");
    assert!(e.message.contains("--max-inflight-mib"), "{e}");
    // And a watch of it through b: its snapshot's batch is refused, and
    // the watch ends saying why.
    let mut watch = TcpStream::connect(b.addr).unwrap();
    watch
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    watch
        .write_all(
            format!(
                "GET /{on_a}?snapshot=true HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: application/x-ndjson\r\n\r\n"
            )
            .as_bytes(),
        )
        .unwrap();
    let mut told = Vec::new();
    while !String::from_utf8_lossy(&told).contains("--max-inflight-mib") {
        let mut chunk = [0u8; 4096];
        let n = watch.read(&mut chunk).unwrap();
        assert!(n > 0, "{}", String::from_utf8_lossy(&told));
        told.extend_from_slice(&chunk[..n]);
    }
    let grew = status_bytes(pid, "RssAnon:").saturating_sub(base);
    eprintln!(
        "16 stalled relayed reads of a 15 MiB value: anonymous RSS +{} MiB",
        grew / MIB
    );
    assert!(grew < 100 * MIB, "anonymous RSS grew by {} MiB", grew / MIB);
    // The owner's own values are not counted: its stalled readers hold
    // nothing of its budget.
    let on_owner: Vec<_> = (0..4).map(|_| stall(&a)).collect();
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(inflight_bytes(&a), 0);
    assert_eq!(a.get_raw(&format!("/{on_a}/big")).1, value);
    drop(on_owner);
    // Once the stalled clients go, their share comes back.
    drop(stalled);
    drop(refused);
    eventually("an empty budget", Duration::from_secs(10), || {
        inflight_bytes(&b) == 0
    });
    assert_eq!(b.get_raw(&format!("/{on_a}/big")).1, value);
    let (status, body) = b.http("GET", &format!("/{on_a}?limit=1"), b"");
    assert_eq!(status, 200);
    assert!(body.starts_with("[{\"Key\":\"big\"") && body.len() > 15 * MIB as usize);
    assert_eq!(inflight_bytes(&b), 0);
}

/// Bytes of the answers a node sent to its peers' requests, from its
/// `/metrics`.
fn answered(node: &Dhrtd) -> u64 {
    let (_, metrics) = node.http("GET", "/metrics", b"");
    metrics
        .lines()
        .find_map(|l| l.strip_prefix("dhrt_peer_answered_bytes_total "))
        .map(|v| v.trim().parse::<u64>().unwrap())
        .expect("dhrt_peer_answered_bytes_total in /metrics")
}

/// A large value read through a node that does not store its collection
/// crosses the network once, from one of its owners, not once per owner;
/// and a read the node has no room for is refused before the value is
/// asked for: its owners send nothing for it. Counted in the bytes the
/// owners answered to their peers.
#[test]
fn a_large_value_relayed_to_a_client_crosses_the_network_once_and_only_with_room_for_it() {
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let flags = ["--replicas", "2", "--max-inflight-mib", "40"];
    let a = Dhrtd::start(dirs[0].path(), &flags);
    let b = crate::cluster::start_joined(dirs[1].path(), &a, &flags);
    let c = crate::cluster::start_joined(dirs[2].path(), &a, &flags);
    eventually("three healthy members", Duration::from_secs(15), || {
        all_healthy(&[&a, &b, &c], 3)
    });
    // Enough collections that one falls on a and b alone (8 missed it one
    // time in 26).
    for n in 0..32 {
        put(&a, &format!("/c{n}/small"), b"1");
    }
    let mut name = None;
    eventually(
        "a collection a and b store, and c does not",
        Duration::from_secs(15),
        || {
            name = (0..32)
                .map(|n| format!("c{n}"))
                .find(|n| keys_on(&a, n) && keys_on(&b, n) && !keys_on(&c, n));
            name.is_some()
        },
    );
    let name = name.unwrap();
    let value: Vec<u8> = (0..15 * MIB).map(|i| (i % 253) as u8).collect();
    put(&a, &format!("/{name}/big"), &value);
    assert_eq!(
        b.get_raw(&format!("/{name}/big")).1,
        value,
        "on both owners"
    );
    let owners_wrote = || answered(&a) + answered(&b);

    let before = owners_wrote();
    assert_eq!(c.get_raw(&format!("/{name}/big")).1, value);
    let sent = owners_wrote() - before;
    assert!(
        (15 * MIB..20 * MIB).contains(&sent),
        "the owners wrote {} KiB to relay a 15 MiB value once",
        sent >> 10
    );

    // Two clients that stop reading hold 30 of c's 40 MiB; the next read
    // is refused before anything is fetched.
    let stall = || {
        let mut s = TcpStream::connect(c.addr).unwrap();
        s.write_all(
            format!(
                "GET /{name}/big HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: application/octet-stream\r\n\r\n"
            )
            .as_bytes(),
        )
        .unwrap();
        s
    };
    let mut stalled = Vec::new();
    let base = owners_wrote();
    for n in 1..=2 {
        stalled.push(stall());
        // Room is taken before the value is asked for: held, then sent.
        eventually("the relayed value is held", Duration::from_secs(10), || {
            inflight_bytes(&c) >= n * 15 * MIB
        });
        eventually("the value is sent", Duration::from_secs(10), || {
            owners_wrote() - base >= n * 15 * MIB
        });
    }
    let before = owners_wrote();
    for _ in 0..4 {
        let (status, body) = c.http("GET", &format!("/{name}/big"), b"");
        assert_eq!(status, 503, "{body}");
        assert!(body.contains("--max-inflight-mib"), "{body}");
    }
    let sent = owners_wrote() - before;
    assert!(
        sent < MIB,
        "the owners wrote {} KiB for four reads refused for want of room",
        sent >> 10
    );
    // A delete through c learns whether the key exists without fetching
    // its value.
    drop(stalled);
    eventually("an empty budget", Duration::from_secs(10), || {
        inflight_bytes(&c) == 0
    });
    let before = owners_wrote();
    assert_eq!(c.http("DELETE", &format!("/{name}/big"), b"").0, 200);
    let sent = owners_wrote() - before;
    assert!(
        sent < MIB,
        "the owners wrote {} KiB for a delete",
        sent >> 10
    );
    assert_eq!(a.http("GET", &format!("/{name}/big"), b"").0, 404);
}
