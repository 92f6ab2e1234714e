//! Replication over a slow link: a relay that passes one direction at a
//! fixed rate stands between two nodes, so that what a node writes sits in
//! the kernel's and the relay's buffers long after its side has handed it
//! over.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::cluster::{eventually, local_keys, state_of};
use crate::dhrtd::{Dhrtd, free_addr};

/// One direction of a link: bytes pass at `rate` a second, whichever
/// connections carry them.
struct Way {
    rate: u64,
    started: Instant,
    passed: Mutex<u64>,
}

impl Way {
    fn new(rate: u64) -> Arc<Way> {
        Arc::new(Way {
            rate,
            started: Instant::now(),
            passed: Mutex::new(0),
        })
    }

    /// Copies `from` to `to` at the way's pace, then closes `to`'s side.
    fn carry(self: &Arc<Self>, mut from: TcpStream, mut to: TcpStream) {
        let way = self.clone();
        std::thread::spawn(move || {
            let mut chunk = [0u8; 4096];
            loop {
                let n = match from.read(&mut chunk) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                let due = {
                    let mut passed = way.passed.lock().unwrap();
                    *passed += n as u64;
                    way.started + Duration::from_micros(*passed * 1_000_000 / way.rate)
                };
                if let Some(wait) = due.checked_duration_since(Instant::now()) {
                    std::thread::sleep(wait);
                }
                if to.write_all(&chunk[..n]).is_err() {
                    break;
                }
            }
            let _ = to.shutdown(Shutdown::Write);
        });
    }
}

/// Accepts on a free loopback port and relays each connection to `to`:
/// what goes to `to` takes way `inward`, what comes back `outward`.
/// Returns the relay's address.
fn relay(to: SocketAddr, inward: Arc<Way>, outward: Arc<Way>) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let at = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for dialer in listener.incoming() {
            let Ok(dialer) = dialer else { continue };
            let Ok(target) = TcpStream::connect(to) else {
                continue;
            };
            inward.carry(dialer.try_clone().unwrap(), target.try_clone().unwrap());
            outward.carry(target, dialer);
        }
    });
    at
}

/// Two nodes in `dirs`, each advertising a relay in front of it, so that
/// whatever they say to each other crosses one link of `rate` bytes a
/// second each way; `b` joins `a` through it. Also the two relays.
fn relayed_pair(
    dirs: &[tempfile::TempDir],
    rate: u64,
    a_flags: &[&str],
    b_flags: &[&str],
) -> (Dhrtd, Dhrtd, SocketAddr, SocketAddr) {
    let (a_addr, b_addr) = (free_addr(), free_addr());
    let (to_a, to_b) = (Way::new(rate), Way::new(rate));
    let a_relay = relay(a_addr, to_a.clone(), to_b.clone());
    let b_relay = relay(b_addr, to_b, to_a);
    let (a_at, b_at) = (a_relay.to_string(), b_relay.to_string());
    let a_args: Vec<&str> = a_flags
        .iter()
        .copied()
        .chain(["--advertise", &a_at])
        .collect();
    let a = Dhrtd::start_on(Some(a_addr), dirs[0].path(), &a_args);
    let b_args: Vec<&str> = b_flags
        .iter()
        .copied()
        .chain(["--node", &a_at, "--advertise", &b_at])
        .collect();
    let b = Dhrtd::start_on(Some(b_addr), dirs[1].path(), &b_args);
    eventually("b joined", Duration::from_secs(20), || {
        state_of(&a, &b_at).as_deref() == Some("healthy")
    });
    (a, b, a_relay, b_relay)
}

/// A value far larger than the link passes in a timeout reaches the peer,
/// the writes queued behind it follow, and the two nodes go on seeing each
/// other alive. Before the listener said how much it had read, the dialer
/// saw nothing move once the frame sat in the buffers, timed out, dropped
/// the connection and sent it all again; and the probes queued behind it
/// made each node declare the other dead within seconds.
#[test]
fn a_large_value_on_a_slow_link_replicates_and_the_writes_behind_it_follow() {
    let dirs: Vec<_> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    // Whatever the nodes say to each other crosses one link of 96 KiB/s
    // each way.
    let (a, b, a_relay, b_relay) = relayed_pair(&dirs, 96 << 10, &["--write-ack", "local"], &[]);
    // 1.5 MiB: 16 s on this link, 2 s allowed for its frame by its size.
    let big: Vec<u8> = (0..3 << 19).map(|i| (i % 251) as u8).collect();
    assert_eq!(a.http("PUT", "/slow/big", &big).0, 200);
    for i in 0..20 {
        let (status, body) = a.http("PUT", &format!("/slow/k{i}"), b"small");
        assert_eq!(status, 200, "{body}");
    }
    // 16 s on the link alone, 32 s with anti-entropy pulling it too.
    // Neither judges the other dead meanwhile: membership has its own
    // connection, which does not wait behind the value.
    let started = Instant::now();
    while local_keys(&b, "slow") != 21 {
        let views = [
            state_of(&a, &b_relay.to_string()),
            state_of(&b, &a_relay.to_string()),
        ];
        assert!(
            views.iter().all(|v| v.as_deref() != Some("dead")),
            "after {:?}: b at a, a at b: {views:?}",
            started.elapsed()
        );
        assert!(
            started.elapsed() < Duration::from_secs(75),
            "b holds {} of the 21 keys after 75 s",
            local_keys(&b, "slow")
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let (status, got) = b.get_raw("/slow/big");
    assert_eq!(status, 200);
    assert!(got == big, "b holds {} bytes, not the value", got.len());
}

/// Large values written at once, each answered within `--timeout-ms` or
/// not: the peers working through them (acknowledging the earlier ones,
/// taking the bytes of the next) are late, not unhealthy. Before, every
/// write whose concern timed out marked the replicas it still waited for
/// unhealthy, and a burst of large values made healthy peers flap.
#[test]
fn peers_taking_a_burst_of_large_values_are_not_marked_unhealthy() {
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let (a, b, c) = crate::cluster::three_joined(&dirs, &[]);
    let peers = [b.addr.to_string(), c.addr.to_string()];
    let a = Arc::new(a);
    let writing = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let writers: Vec<_> = (0..8)
        .map(|t| {
            let (a, writing) = (a.clone(), writing.clone());
            std::thread::spawn(move || {
                let value = vec![b'a' + t as u8; 12 << 20];
                let mut late = 0;
                for i in 0.. {
                    if !writing.load(std::sync::atomic::Ordering::Relaxed) {
                        break;
                    }
                    let (status, body) = a.http("PUT", &format!("/big/t{t}-{}", i % 4), &value);
                    match status {
                        200 => {}
                        // Saved, and late on a replica: said so.
                        504 => late += 1,
                        _ => panic!("{status}: {body}"),
                    }
                }
                late
            })
        })
        .collect();
    let started = Instant::now();
    let mut seen = Vec::new();
    while started.elapsed() < Duration::from_secs(6) {
        for p in &peers {
            let state = state_of(&a, p);
            if state.as_deref() != Some("healthy") {
                seen.push((started.elapsed(), p.clone(), state));
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    writing.store(false, std::sync::atomic::Ordering::Relaxed);
    let late: usize = writers.into_iter().map(|w| w.join().unwrap()).sum();
    eprintln!("{late} writes answered 504 (late on a replica)");
    assert!(seen.is_empty(), "peers not healthy at a: {seen:?}");
    for n in [&b, &c] {
        eventually("every value replicated", Duration::from_secs(30), || {
            local_keys(n, "big") == 32
        });
    }
}

/// A write's concern waits `--timeout-ms` plus its bytes' time at the
/// slowest rate a link is allowed (1 MiB/s), as its replication request
/// does: a value of 1.5 MiB over a link of 4 MiB/s is answered 200 once the
/// replica has it. Before, it had `--timeout-ms` alone, and was answered
/// 504 (saved, and late) for taking longer than that to cross.
#[test]
fn a_large_value_is_given_its_bytes_time_for_its_write_concern() {
    let dirs: Vec<_> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    let flags = ["--write-ack", "all", "--timeout-ms", "100"];
    let (a, b, ..) = relayed_pair(&dirs, 4 << 20, &flags, &flags);
    let big: Vec<u8> = (0..3 << 19).map(|i| (i % 251) as u8).collect();
    for i in 0..3 {
        let (status, body) = a.http("PUT", &format!("/slow/big{i}"), &big);
        assert_eq!(status, 200, "value {i}: {body}");
    }
    assert_eq!(b.get_raw("/slow/big2").1, big);
}
