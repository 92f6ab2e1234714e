//! DESIGN §8 against a real node: hostile binary frames, idle and half-open
//! connections by the thousand. Each gets an error or a closed connection,
//! and the node keeps serving.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use dhrt_proto::{Decoded, ErrorKind, Response, decode_frame, preamble};

use crate::dhrtd::{Dhrtd, assert_closed};

/// Sends `bytes` on a fresh connection; returns what came back before the
/// node closed it (or the read timed out).
fn poke(node: &Dhrtd, bytes: &[u8]) -> (Vec<u8>, bool) {
    let mut s = TcpStream::connect(node.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(bytes).unwrap();
    let mut out = Vec::new();
    let closed = s.read_to_end(&mut out).is_ok();
    (out, closed)
}

#[test]
fn hostile_binary_frames_are_refused_and_the_node_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    let node = Dhrtd::start(dir.path(), &["--memory"]);
    let with_preamble = |rest: &[u8]| [&preamble()[..], rest].concat();
    // A length prefix of 4 GiB: closed at once.
    let (_, closed) = poke(&node, &with_preamble(&u32::MAX.to_le_bytes()));
    assert!(closed);
    // A 20-byte frame claiming a string of 2^64-1 bytes: the node does not
    // try to allocate it; the request's id is readable, so it answers that
    // request with an error.
    let mut hostile = vec![0, 0, 0, 0, 1, 2, 253];
    hostile.extend_from_slice(&u64::MAX.to_le_bytes());
    hostile.push(0);
    hostile[0] = (hostile.len() - 4) as u8;
    let mut s = TcpStream::connect(node.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(&with_preamble(&hostile)).unwrap();
    let mut buf = Vec::new();
    let response = loop {
        let mut chunk = [0u8; 1024];
        let n = s.read(&mut chunk).unwrap();
        assert!(n > 0, "closed without an answer");
        buf.extend_from_slice(&chunk[..n]);
        if let Decoded::Complete { msg, .. } = decode_frame::<Response>(&buf, 1 << 20).unwrap() {
            break msg;
        }
    };
    assert_eq!(response.id, 1);
    assert_eq!(response.result.unwrap_err().kind, ErrorKind::InvalidInput);
    // An empty frame, a future protocol version, a truncated preamble.
    assert!(poke(&node, &with_preamble(&[0, 0, 0, 0])).1);
    let mut future = preamble();
    future[4] = 99;
    assert!(poke(&node, &future).1);
    // The node still answers.
    assert_eq!(node.http("POST", "/k/v", b"").0, 200);
}

#[test]
fn thousands_of_idle_and_half_open_connections_do_not_stop_the_node() {
    let dir = tempfile::tempdir().unwrap();
    let node = Dhrtd::start(dir.path(), &["--memory"]);
    let mut idle = Vec::new();
    for i in 0..1500 {
        let mut s = TcpStream::connect(node.addr).unwrap();
        match i % 3 {
            0 => {}                                                  // says nothing
            1 => s.write_all(b"GET / HTTP/1.1\r\nHost: x").unwrap(), // never ends its head
            _ => s.write_all(&preamble()[..5]).unwrap(),             // half a preamble
        }
        idle.push(s);
    }
    for i in 0..20 {
        assert_eq!(node.http("POST", &format!("/busy/k{i}/v"), b"").0, 200);
    }
    drop(idle);
    assert!(node.stop("TERM").success());
}

#[test]
fn connections_over_the_cap_are_refused_and_the_slots_come_back() {
    let dir = tempfile::tempdir().unwrap();
    let node = Dhrtd::start(dir.path(), &["--memory", "--max-connections", "4"]);
    assert_eq!(node.http("GET", "/", b"").0, 200);
    // Four keep-alive connections, each proven to hold a slot by an answer.
    // The slot of the request above is given back once the node has seen
    // that connection close, which may come after the fourth connects: a
    // connection refused then is tried again.
    let answered = |mut s: TcpStream| -> std::io::Result<TcpStream> {
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        s.write_all(b"GET /a/b/c HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")?;
        let mut got = Vec::new();
        while !got.ends_with(b"\"}") {
            let mut chunk = [0u8; 512];
            let n = s.read(&mut chunk)?;
            if n == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            got.extend_from_slice(&chunk[..n]);
        }
        Ok(s)
    };
    let held: Vec<TcpStream> = (0..4)
        .map(|i| {
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            loop {
                match answered(TcpStream::connect(node.addr).unwrap()) {
                    Ok(s) => return s,
                    Err(e) => assert!(
                        std::time::Instant::now() < deadline,
                        "connection {i} of 4 never held a slot: {e}"
                    ),
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        })
        .collect();
    // The fifth is accepted and closed at once: end of stream or a reset,
    // never an answer, never a hang.
    let mut s = TcpStream::connect(node.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let _ = s.write_all(b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n");
    let mut out = Vec::new();
    match s.read_to_end(&mut out) {
        Ok(_) => assert!(out.is_empty(), "{}", String::from_utf8_lossy(&out)),
        Err(e) => assert!(
            !matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ),
            "the refused connection hung: {e}"
        ),
    }
    drop(held);
    // Slots free up as connections close.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while node
        .try_http("GET", "/", b"")
        .map(|(status, _)| status)
        .unwrap_or(0)
        != 200
    {
        assert!(
            std::time::Instant::now() < deadline,
            "slots never came back"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn binary_connections_stalled_in_a_frame_give_their_slots_back_after_the_grace() {
    let dir = tempfile::tempdir().unwrap();
    let node = Dhrtd::start(dir.path(), &["--memory", "--max-connections", "4"]);
    // Four binary connections each send the preamble and 5 bytes of a frame
    // announcing 100, then nothing: before, they held every client slot for
    // the idle timeout (300 s).
    let stalled: Vec<TcpStream> = (0..4)
        .map(|_| {
            let mut s = TcpStream::connect(node.addr).unwrap();
            let mut wire = preamble().to_vec();
            wire.extend_from_slice(&100u32.to_le_bytes());
            wire.push(0);
            s.write_all(&wire).unwrap();
            s
        })
        .collect();
    let started = std::time::Instant::now();
    // Full meanwhile: an HTTP request is refused (closed without an answer).
    std::thread::sleep(Duration::from_millis(500));
    let served = || {
        let mut s = TcpStream::connect(node.addr).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
        s.write_all(b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n")
            .ok()?;
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out);
        out.starts_with(b"HTTP/1.1 200").then_some(())
    };
    assert!(
        served().is_none(),
        "a fifth connection was served beside four stalled ones"
    );
    // Within the 10 s grace and a little more, the node closes them and
    // serves again.
    loop {
        if served().is_some() {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "still full {:?} after the stalled frames began",
            started.elapsed()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_secs(9),
        "closed before the grace: {waited:?}"
    );
    for s in stalled {
        assert_closed(
            s,
            Duration::from_secs(5),
            "a stalled connection was not closed",
        );
    }
    assert!(node.stop("TERM").success());
}

/// A client with the write role cannot make the node create more
/// collections than it can keep open (two files each): past the cap a
/// write to a new one is refused with 503 and a sentence, nothing is left
/// on disk for it, the others are served, and the node starts again.
#[test]
fn a_client_cannot_create_more_collections_than_the_node_can_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let args = ["--max-collections", "3"];
    let node = Dhrtd::start(dir.path(), &args);
    for i in 0..3 {
        let (status, body) = node.http("PUT", &format!("/c{i}/k"), b"v");
        assert_eq!(status, 200, "{body}");
    }
    let (status, body) = node.http("PUT", "/c3/k", b"v");
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("as many as it can keep open"), "{body}");
    assert!(!dir.path().join("c3.dhrt").exists());
    let (status, body) = node.http("PUT", "/c0/k2", b"v2");
    assert_eq!(status, 200, "{body}");
    assert!(node.stop("TERM").success());
    let node = Dhrtd::start(dir.path(), &args);
    let (status, body) = node.http("GET", "/c2/k", b"");
    assert_eq!(status, 200, "{body}");
    let (status, _) = node.http("PUT", "/c4/k", b"v");
    assert_eq!(status, 503);
}
