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

/// Resets the node's peak RSS to its current RSS; returns that.
fn reset_peak(pid: u32) -> u64 {
    std::fs::write(format!("/proc/{pid}/clear_refs"), "5").unwrap();
    status_bytes(pid, "VmRSS:")
}

fn put(node: &Dhrtd, path: &str, value: &[u8]) {
    let (status, body) = node.http("PUT", path, value);
    assert_eq!(status, 200, "PUT {path}: {body}");
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
    let gets: Vec<Request> = (0..1000)
        .map(|id| Request {
            id,
            op: Op::Get {
                collection: "big".into(),
                key: Bytes::from_static(b"one"),
            },
        })
        .collect();
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
    http.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
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
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (_, stats) = b.http("GET", "/", b"");
        let stats: serde_json::Value = serde_json::from_str(&stats).unwrap();
        let healthy = stats["members"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|m| m["state"] == "healthy")
            .count();
        if healthy == 2 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the peer could not join: {stats}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
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
