//! Real `dhrtd` clusters under ordinary faults: a clock hours ahead, values
//! near the size limit, a replica down for a quorum write, a power loss
//! that leaves a zeroed page, and bit rot in a value on one node.

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::Value;

use crate::cluster::{
    all_healthy, digest_of, eventually, local_keys, start_joined, state_of, stats, three_joined,
    two_joined,
};
use crate::dhrtd::{Dhrtd, binary};

const TWO_HOURS_MS: &str = "7200000";

fn clock(node: &Dhrtd) -> Value {
    stats(node)["clock"].clone()
}

pub(crate) fn metric(node: &Dhrtd, name: &str) -> Option<f64> {
    let (_, m) = node.http("GET", "/metrics", b"");
    m.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

fn value(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| b'a' + ((i as u64 * 31 + u64::from(seed)) % 26) as u8)
        .collect()
}

#[test]
fn a_node_with_its_clock_hours_ahead_cannot_drop_or_overwrite_anything_elsewhere() {
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let a = Dhrtd::start(dirs[0].path(), &[]);
    let b = start_joined(dirs[1].path(), &a, &[]);
    for i in 0..50 {
        assert_eq!(a.http("POST", &format!("/t/k{i}/v{i}"), b"").0, 200);
    }
    assert_eq!(a.http("POST", "/keep/z/1", b"").0, 200);

    // c's clock is two hours ahead.
    let c = start_joined(dirs[2].path(), &a, &["--clock-offset-ms", TWO_HOURS_MS]);
    eventually(
        "c is skewed by its own verdict",
        Duration::from_secs(20),
        || clock(&c)["skewed"] == true,
    );
    let verdict = clock(&c);
    let ahead = verdict["ahead_ms"].as_i64().unwrap();
    assert!((7_100_000..7_300_000).contains(&ahead), "{verdict}");
    let reason = verdict["reason"].as_str().unwrap();
    assert!(
        (reason.contains("7199 s off") || reason.contains("7200 s off"))
            && reason.contains("this node is ahead"),
        "{verdict}"
    );
    assert_eq!(metric(&c, "dhrt_clock_skewed"), Some(1.0));
    // The healthy ones are not skewed, and see c's offset.
    let offset_of_c = |n: &Dhrtd| {
        stats(n)["members"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["addr"] == c.addr.to_string())
            .and_then(|m| m["clock_offset_ms"].as_i64())
    };
    for n in [&a, &b] {
        eventually("a and b measure c's clock", Duration::from_secs(10), || {
            offset_of_c(n).is_some()
        });
        assert_eq!(clock(n)["skewed"], false, "{}", clock(n));
        let offset = offset_of_c(n).unwrap();
        assert!((7_100_000..7_300_000).contains(&offset), "{offset}");
    }
    // c refuses client writes with a clear 503; reads go on.
    let (status, body) = c.http("DELETE", "/t", b"");
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("clock"), "{body}");
    let (status, body) = c.http("POST", "/keep/z/2", b"");
    assert_eq!(status, 503, "{body}");
    assert_eq!(c.get_raw("/keep/z").1, b"1");
    let c_addr = c.addr;
    c.stop("KILL");
    // Gone for good: removed, as an operator would (a dead member's last
    // word, two hours ahead, would keep counting in a and b's verdicts).
    eventually("the killed c is removed", Duration::from_secs(20), || {
        crate::cli::cli(&a, &["remove", &c_addr.to_string()])
            .status
            .success()
    });

    // A node that wrote with its clock two hours ahead while it ran alone
    // (nobody to compare with: it drops t and overwrites keep/z) then joins
    // the cluster, through `dhrt-cli join`. Its future stamps reach a and b
    // through anti-entropy, and are refused there record by record; a
    // tolerance of a day on c changes nothing (the strictest setting in the
    // cluster judges). It gets an address of its own: at the killed c's,
    // a and b's probes of their dead member could reach it and pull it in
    // before it wrote alone.
    let fresh = tempfile::tempdir().unwrap();
    let c = Dhrtd::start_on(
        None,
        fresh.path(),
        &[
            "--clock-offset-ms",
            TWO_HOURS_MS,
            "--max-clock-offset-ms",
            "86400000",
        ],
    );
    assert_eq!(c.http("POST", "/t/c-only/1", b"").0, 200);
    assert_eq!(c.http("DELETE", "/t", b"").0, 200);
    assert_eq!(c.http("POST", "/keep/z/from-the-future", b"").0, 200);
    let out = Command::new(cli())
        .args(["--addr", &c.addr.to_string(), "join", &a.addr.to_string()])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    // From the moment it joined, c takes no write: the first ones wait
    // until it has compared its clock, then it is skewed.
    for i in 0..20 {
        let (status, body) = c.http("POST", &format!("/k/key{i}/from-c"), b"");
        assert_eq!(status, 503, "{body}");
    }
    // (The removed c stays listed as `left`.)
    eventually("c is a healthy member", Duration::from_secs(20), || {
        let nodes = [&a, &b, &c];
        nodes.iter().all(|n| {
            nodes
                .iter()
                .filter(|m| m.addr != n.addr)
                .all(|m| state_of(n, &m.addr.to_string()).as_deref() == Some("healthy"))
        })
    });
    eventually("c judges itself skewed", Duration::from_secs(10), || {
        clock(&c)["skewed"] == true
    });
    let (status, body) = c.http("POST", "/keep/z/again", b"");
    assert_eq!(status, 503, "{body}");
    // Several anti-entropy rounds (every 2 s) pass: nothing changes on a
    // and b, who say they refused records from the future.
    std::thread::sleep(Duration::from_secs(7));
    for n in [&a, &b] {
        assert_eq!(local_keys(n, "t"), 50, "collection t on {}", n.addr);
        assert_eq!(n.get_raw("/keep/z").1, b"1");
    }
    let refused = metric(&a, "dhrt_refused_future_total").unwrap()
        + metric(&b, "dhrt_refused_future_total").unwrap();
    assert!(refused >= 2.0, "{refused} records refused");
    // A write through a to a key c holds from the future: c answers that
    // it holds a newer version, and a does not stamp the write again after
    // it (its clock would be dragged two hours ahead, out of bounds, and b
    // would refuse the write). a and b keep it for now, but c's version
    // wins once the clocks reach it: the write is not acknowledged, and
    // the answer says why. a stays writable.
    let (status, body) = a.http("POST", "/keep/z/2", b"");
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("would undo the write"), "{body}");
    for n in [&a, &b] {
        assert_eq!(n.get_raw("/keep/z").1, b"2", "keep/z on {}", n.addr);
    }
    // Several clock verdicts (one every 250 ms) pass.
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(clock(&a)["skewed"], false, "{}", clock(&a));
    let (status, body) = a.http("POST", "/keep/y/3", b"");
    assert_eq!(status, 200, "{body}");
    assert_eq!(b.get_raw("/keep/y").1, b"3");
    // a and b still replicate with each other, both ways: their clocks
    // were not dragged into the future.
    // (c takes their writes too: their stamps are behind its clock.)
    let (status, body) = a.http("POST", "/keep/from-a/1", b"");
    assert_eq!(status, 200, "{body}");
    assert_eq!(b.http("POST", "/keep/from-b/1", b"").0, 200);
    eventually(
        "a and b see each other's writes",
        Duration::from_secs(5),
        || a.get_raw("/keep/from-b").1 == b"1" && b.get_raw("/keep/from-a").1 == b"1",
    );
    assert_eq!(
        state_of(&a, &b.addr.to_string()).as_deref(),
        Some("healthy")
    );
    // With b down, a write to keep/z cannot meet `all`; c's version from
    // the future still undoes it, and that is what the answer says (it
    // said "saved on 2 of 3 replicas", counting c, which kept its own).
    // A write to another key is saved on a and c, and waits for b.
    b.stop("KILL");
    let (status, body) = a.http("POST", "/keep/z/4", b"");
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("would undo the write"), "{body}");
    let (status, body) = a.http("POST", "/keep/w/1", b"");
    assert_eq!(status, 504, "{body}");
    assert!(body.contains("saved on 2 of 3 replicas"), "{body}");
}

#[test]
fn a_15_mb_value_and_dozens_of_100_kb_values_reach_a_joining_node() {
    let dirs: Vec<_> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    let a = Dhrtd::start(dirs[0].path(), &[]);
    let big = value(15 << 20, 1);
    assert_eq!(a.http("PUT", "/big/huge", &big).0, 200);
    for i in 0..40 {
        assert_eq!(
            a.http("PUT", &format!("/big/v{i}"), &value(100_000, i)).0,
            200
        );
    }
    let b = start_joined(dirs[1].path(), &a, &[]);
    eventually("b joins and is healthy", Duration::from_secs(60), || {
        all_healthy(&[&a, &b], 2)
    });
    assert_eq!(local_keys(&b, "big"), 41);
    let (status, body) = b.get_raw("/big/huge");
    assert_eq!(status, 200);
    assert!(body == big, "the 15 MB value differs");
    assert_eq!(digest_of(&a, "big"), digest_of(&b, "big"));
}

#[test]
fn values_of_several_mb_missed_while_down_reach_a_node_through_anti_entropy() {
    // No hints at all: only anti-entropy can bring them.
    let args = [
        "--max-hints",
        "0",
        "--write-ack",
        "quorum",
        "--timeout-ms",
        "5000",
    ];
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let (a, b, c) = three_joined(&dirs, &args);
    // c holds the collection already: on its return only what differs
    // travels (anti-entropy), no handoff.
    assert_eq!(a.http("PUT", "/mb/before", b"small").0, 200);
    assert_eq!(local_keys(&c, "mb"), 1);
    let c_addr = c.addr;
    c.stop("KILL");
    let nine = [value(9 << 20, 7), value(9 << 20, 8)];
    for (i, v) in nine.iter().enumerate() {
        let (status, body) = a.http("PUT", &format!("/mb/k{i}"), v);
        assert_eq!(status, 200, "{body}");
    }
    for i in 0..20 {
        assert_eq!(
            b.http("PUT", &format!("/mb/s{i}"), &value(300_000, i)).0,
            200
        );
    }
    let mut restart = vec!["--node", "placeholder"];
    let a_addr = a.addr.to_string();
    restart[1] = &a_addr;
    restart.extend(args);
    let c = Dhrtd::start_on(Some(c_addr), dirs[2].path(), &restart);
    eventually("c is healthy everywhere", Duration::from_secs(60), || {
        all_healthy(&[&a, &b, &c], 3)
    });
    // c holds them itself (its own stats, not a fan-out read).
    eventually("c holds every value", Duration::from_secs(30), || {
        local_keys(&c, "mb") == 23
    });
    assert_eq!(digest_of(&a, "mb"), digest_of(&c, "mb"));
    // Through anti-entropy: c pulled them, or a and b pushed them to it
    // (only the last write of each may have waited as a hint).
    let moved = metric(&c, "dhrt_anti_entropy_records_total{direction=\"pulled\"}").unwrap()
        + metric(&a, "dhrt_anti_entropy_records_total{direction=\"pushed\"}").unwrap()
        + metric(&b, "dhrt_anti_entropy_records_total{direction=\"pushed\"}").unwrap();
    assert!(moved >= 20.0, "{moved} records moved by anti-entropy");
}

/// A replica that died a moment ago refuses connections: a large write
/// through another node is answered as soon as that is known (the plain
/// timeout after the first refusal), not after the time its bytes are
/// given to cross the slowest link, and it reaches the replica once back.
#[test]
fn a_large_write_to_a_replica_that_just_died_is_answered_without_its_transfer_time() {
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    // write-ack all: every replica is waited for.
    let (a, b, c) = three_joined(&dirs, &[]);
    let big = value(8 << 20, 5);
    assert_eq!(a.http("PUT", "/big/before", &big).0, 200);
    let c_addr = c.addr;
    c.stop("KILL");
    let (status, body) = a.http("PUT", "/big/after", &big);
    assert_eq!(status, 504, "{body}");
    // Not "not met within 8500 ms": c was given up on before that.
    assert!(body.contains("too few replicas are up"), "{body}");
    assert!(body.contains("saved on 2 of 3 replicas"), "{body}");
    let a_addr = a.addr.to_string();
    let c = Dhrtd::start_on(Some(c_addr), dirs[2].path(), &["--node", &a_addr]);
    eventually("c is healthy everywhere", Duration::from_secs(60), || {
        all_healthy(&[&a, &b, &c], 3)
    });
    eventually("c holds the write", Duration::from_secs(60), || {
        local_keys(&c, "big") == 2
    });
    let (status, got) = c.get_raw("/big/after");
    assert_eq!(status, 200);
    assert!(got == big, "the value c holds differs");
}

#[test]
fn quorum_with_two_of_three_replicas_down_says_on_how_many_the_write_is() {
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let (a, b, c) = three_joined(&dirs, &["--write-ack", "quorum"]);
    // One replica down: a majority (2 of 3) still answers.
    let c_name = c.addr.to_string();
    c.stop("KILL");
    let (status, body) = a.http("POST", "/q/one-down/1", b"");
    assert_eq!(status, 200, "{body}");
    let b_name = b.addr.to_string();
    b.stop("KILL");
    eventually("b and c are dead", Duration::from_secs(20), || {
        state_of(&a, &b_name).as_deref() == Some("dead")
            && state_of(&a, &c_name).as_deref() == Some("dead")
    });
    let (status, body) = a.http("POST", "/q/two-down/1", b"");
    assert_eq!(status, 504, "{body}");
    let error: Value = serde_json::from_str(&body).unwrap();
    let message = error["Error"].as_str().unwrap();
    assert!(
        message.contains("saved on 1 of 3 replicas (2 needed)"),
        "{message}"
    );
    // Saved all the same.
    assert_eq!(a.get_raw("/q/two-down").1, b"1");
    // The binary protocol says the same, as its own error kind: dhrt-cli
    // exits 3 with the sentence.
    let out = Command::new(cli())
        .args(["--addr", &a.addr.to_string(), "set", "q", "cli", "1"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("saved on 1 of 3 replicas"), "{stderr}");
}

/// The log file of `collection` in `dir`.
fn log_of(dir: &Path, collection: &str) -> std::path::PathBuf {
    dir.join(format!("{collection}.dhrt"))
}

/// Starts `dhrtd` on `dir` expecting it to exit; returns its code and log.
pub(crate) fn start_expecting_exit(dir: &Path) -> (Option<i32>, String) {
    let mut child = Command::new(binary())
        .args(["--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir)
        .env("DHRT_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut err = String::new();
        std::io::Read::read_to_string(&mut stderr, &mut err).unwrap();
        err
    });
    // A node that starts instead of refusing would run for good: the test
    // fails, it does not hang.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if std::time::Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the node did not exit within 60 s: it started");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    (status.code(), reader.join().unwrap())
}

/// Writes 2,000 records of 1 KB to `pw`, then kills the node.
fn fill_and_kill(dir: &Path, sync: &str) -> u64 {
    let node = Dhrtd::start(dir, &["--sync", sync]);
    for i in 0..2000 {
        let (status, _) = node.http("PUT", &format!("/pw/k{i:05}"), &value(1000, i as u8));
        assert_eq!(status, 200);
    }
    // Long enough for the watermark to follow the last fsync.
    std::thread::sleep(Duration::from_millis(2500));
    node.stop("KILL");
    std::fs::metadata(log_of(dir, "pw")).unwrap().len()
}

/// Flips bits `mask` of byte `at` of `value` where it lies in the log at
/// `path` (a running node's map sees the change at once).
fn flip_byte_of(path: &Path, value: &[u8], at: usize, mask: u8) {
    let bytes = std::fs::read(path).unwrap();
    let start = bytes
        .windows(value.len())
        .position(|w| w == value)
        .expect("the value is in the log");
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(&[value[at] ^ mask], (start + at) as u64)
        .unwrap();
}

/// The `dhrt-cli` binary.
fn cli() -> std::path::PathBuf {
    crate::dhrtd::workspace_binary("dhrt-cli", &["bins/dhrt-cli/src"])
}

fn zero_page_at(path: &Path, offset: u64) {
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(&[0u8; 4096], offset).unwrap();
    f.sync_all().unwrap();
}

#[test]
fn a_zeroed_page_past_the_durable_watermark_is_cut_and_one_below_is_refused() {
    // Under `never` nothing past the header was ever fsynced: a zeroed page
    // in the middle is what out-of-order writeback leaves after a power
    // loss. The node cuts the log there, warns, and starts.
    let never = tempfile::tempdir().unwrap();
    fill_and_kill(never.path(), "never");
    zero_page_at(&log_of(never.path(), "pw"), 1 << 20);
    let node = Dhrtd::start(never.path(), &[]);
    let kept = local_keys(&node, "pw");
    assert!((900..1100).contains(&kept), "kept {kept} of 2000 keys");
    assert_eq!(node.http("GET", "/pw/k00000", b"").0, 200);
    drop(node);

    // Under `always` every record was durable: the same page zeroed is
    // damage to acknowledged data, and the node refuses to start, saying
    // where.
    let always = tempfile::tempdir().unwrap();
    fill_and_kill(always.path(), "always");
    zero_page_at(&log_of(always.path(), "pw"), 1 << 20);
    let (code, log) = start_expecting_exit(always.path());
    assert_ne!(code, Some(0), "{log}");
    assert!(log.contains("pw.dhrt"), "{log}");
}

#[test]
fn a_value_rotted_on_disk_is_detected_on_read_and_repaired_from_a_peer() {
    let dirs: Vec<_> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    let (a, b) = two_joined(&dirs, &[]);
    let good = value(4000, 3);
    assert_eq!(a.http("PUT", "/rot/victim", &good).0, 200);
    assert_eq!(a.http("PUT", "/rot/bystander", b"fine").0, 200);
    assert_eq!(local_keys(&b, "rot"), 2);
    // One byte of the value changes in b's file (its map sees it at once).
    let path = log_of(dirs[1].path(), "rot");
    flip_byte_of(&path, &good, 100, 0x20);
    // b notices on read and answers with a's copy, never the rotted one.
    let (status, body) = b.get_raw("/rot/victim");
    assert_eq!(status, 200);
    assert!(body == good, "b served a rotted value");
    // And repairs itself: with a gone, b still answers, from its own copy.
    eventually("b holds the key again", Duration::from_secs(10), || {
        local_keys(&b, "rot") == 2
    });
    a.stop("KILL");
    let (status, body) = b.get_raw("/rot/victim");
    assert_eq!(status, 200);
    assert!(body == good);
    assert_eq!(b.get_raw("/rot/bystander").1, b"fine");
    // The damaged bytes leave b's file (a compaction), so a restart meets
    // no damage.
    let mut rotted = good.clone();
    rotted[100] ^= 0x20;
    eventually(
        "the rotted record leaves b's file",
        Duration::from_secs(10),
        || {
            let bytes = std::fs::read(&path).unwrap();
            !bytes.windows(rotted.len()).any(|w| w == rotted.as_slice())
        },
    );
    let b_addr = b.addr;
    b.stop("KILL");
    let b = Dhrtd::start_on(Some(b_addr), dirs[1].path(), &[]);
    assert!(b.get_raw("/rot/victim").1 == good);
}

#[test]
fn a_skewed_node_takes_no_write_from_its_first_moment_nor_once_its_peers_are_gone() {
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let a = Dhrtd::start(dirs[0].path(), &[]);
    let b = start_joined(dirs[1].path(), &a, &[]);
    assert_eq!(a.http("POST", "/keep/z/1", b"").0, 200);
    // From the moment it answers, c (two hours ahead) takes no write: the
    // first ones wait until it has compared its clock with its peers',
    // then every one is refused for the skew.
    let c = start_joined(dirs[2].path(), &a, &["--clock-offset-ms", TWO_HOURS_MS]);
    let started = std::time::Instant::now();
    let mut tries = 0;
    while started.elapsed() < Duration::from_secs(3) {
        let (status, body) = c.http("POST", "/keep/z/from-the-future", b"");
        assert_eq!(status, 503, "{body}");
        assert!(body.contains(" s off from the clocks"), "{body}");
        tries += 1;
    }
    assert!(tries > 10);
    // Its peers go away; c still knows its clock is off and still refuses.
    a.stop("KILL");
    b.stop("KILL");
    std::thread::sleep(Duration::from_secs(5));
    let (status, body) = c.http("DELETE", "/keep", b"");
    assert_eq!(status, 503, "{body}");
    assert_eq!(c.get_raw("/keep/z").1, b"1");
}

#[test]
fn a_node_behind_the_others_still_reads_and_holds_their_data() {
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let a = Dhrtd::start(dirs[0].path(), &[]);
    let b = start_joined(dirs[1].path(), &a, &[]);
    for i in 0..30 {
        assert_eq!(a.http("POST", &format!("/t/k{i}/v{i}"), b"").0, 200);
    }
    let c = start_joined(
        dirs[2].path(),
        &a,
        &["--clock-offset-ms", "-7200000", "--write-ack", "quorum"],
    );
    eventually("c judges itself skewed", Duration::from_secs(20), || {
        clock(&c)["skewed"] == true
    });
    assert!(clock(&c)["reason"].as_str().unwrap().contains("behind"));
    // Its peers' stamps are admitted (the cluster's time is theirs): it
    // holds their data and answers reads with it.
    eventually("c holds every key", Duration::from_secs(30), || {
        local_keys(&c, "t") == 30
    });
    assert_eq!(c.get_raw("/t/k3").1, b"v3");
    assert_eq!(a.http("POST", "/t/late/1", b"").0, 200);
    eventually("c sees a later write", Duration::from_secs(10), || {
        c.get_raw("/t/late").1 == b"1"
    });
    assert_eq!(c.http("POST", "/t/from-c/1", b"").0, 503);
    for n in [&a, &b] {
        assert_eq!(clock(n)["skewed"], false);
    }
    // Restarted, its first read of a key it missed is asked of the others,
    // whose stamps are two hours ahead of its clock: it is answered once
    // the clocks are compared, never "not found".
    eventually("c remembers its peers", Duration::from_secs(10), || {
        std::fs::read_to_string(dirs[2].path().join("cluster.state"))
            .is_ok_and(|s| s.contains(&format!("member {}", a.addr)))
    });
    let c_addr = c.addr;
    c.stop("KILL");
    // Saved on a and b; c, down, counts under `all`.
    let (status, body) = a.http("POST", "/t/missed/1", b"");
    assert_eq!(status, 504, "{body}");
    assert!(body.contains("saved on 2 of 3"), "{body}");
    let c = Dhrtd::start_on(
        Some(c_addr),
        dirs[2].path(),
        &["--clock-offset-ms", "-7200000", "--write-ack", "quorum"],
    );
    let (status, body) = c.http("GET", "/t/missed", b"");
    assert_eq!(status, 200, "{body}");
}

#[test]
fn two_nodes_whose_clocks_disagree_both_refuse_writes() {
    let dirs: Vec<_> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    let a = Dhrtd::start(dirs[0].path(), &[]);
    assert_eq!(a.http("POST", "/t/k1/v1", b"").0, 200);
    let b = start_joined(dirs[1].path(), &a, &["--clock-offset-ms", "-7200000"]);
    for n in [&a, &b] {
        eventually("both see the disagreement", Duration::from_secs(20), || {
            clock(n)["skewed"] == true
        });
        let (status, body) = n.http("POST", "/t/k1/overwritten", b"");
        assert_eq!(status, 503, "{body}");
    }
    assert_eq!(a.get_raw("/t/k1").1, b"v1");
}

#[test]
fn a_node_whose_clock_was_ahead_writes_again_as_soon_as_it_is_fixed() {
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let (a, _b, c) = three_joined(&dirs, &[]);
    for collection in ["x", "y", "z"] {
        assert_eq!(a.http("POST", &format!("/{collection}/k/1"), b"").0, 200);
    }
    eventually("c holds all three", Duration::from_secs(20), || {
        ["x", "y", "z"].iter().all(|n| local_keys(&c, n) == 1)
    });
    let c_addr = c.addr;
    c.stop("KILL");
    // Restarted two hours ahead and pinned to x: it holds y and z, which it
    // no longer hosts, and would hand them over, naming them in the
    // registry first. A registry entry stamped now would be two hours
    // ahead, refused by its peers and kept here.
    let join = a.addr.to_string();
    let c = Dhrtd::start_on(
        Some(c_addr),
        dirs[2].path(),
        &[
            "--node",
            &join,
            "--clock-offset-ms",
            TWO_HOURS_MS,
            "--collections",
            "x",
        ],
    );
    eventually(
        "c is skewed by its own verdict",
        Duration::from_secs(20),
        || clock(&c)["skewed"] == true,
    );
    // A few rounds of its moves loop (one a second): it may hand over
    // what its peers named in the registry already (records keep their
    // stamps), but names nothing itself.
    std::thread::sleep(Duration::from_secs(4));
    c.stop("KILL");
    // Its clock is fixed: it holds no stamp from the future, so it takes
    // writes again as soon as it has compared its clock with its peers'.
    let c = Dhrtd::start_on(Some(c_addr), dirs[2].path(), &["--node", &join]);
    let (status, body) = c.http("POST", "/x/after/1", b"");
    assert_eq!(status, 200, "{body}");
    assert_eq!(clock(&c)["skewed"], false);
}

/// The clocks 0, +50 s and +100 s all take writes (each within the 60 s
/// allowed of the middle one), stamped by the latest, +100 s (40 s past
/// what a node at 0 admits: time for it to join). A node at 0
/// joins: the middle moves back, the +100 s one is skewed, and the stamps the
/// cluster took lawfully are now beyond what the newcomer admits. A write
/// or delete through it that loses to them would be undone everywhere
/// within seconds: it must not be answered 200 (nor a delete 404: the key
/// exists).
#[test]
fn a_write_that_loses_everywhere_to_stamps_from_before_a_join_is_not_answered_200() {
    let dirs: Vec<_> = (0..4).map(|_| tempfile::tempdir().unwrap()).collect();
    let first = Dhrtd::start(dirs[0].path(), &[]);
    let ahead: Vec<Dhrtd> = ["50000", "100000"]
        .iter()
        .zip(&dirs[1..3])
        .map(|(o, d)| start_joined(d.path(), &first, &["--clock-offset-ms", o]))
        .collect();
    let three = [&first, &ahead[0], &ahead[1]];
    eventually("three healthy members", Duration::from_secs(15), || {
        all_healthy(&three, 3)
    });
    // Every verdict drawn from all three clocks: none is skewed, and the
    // +50 s node stamps by the +100 s clock.
    eventually("three clocks measured", Duration::from_secs(15), || {
        three.iter().all(|n| {
            let members = stats(n)["members"].as_array().unwrap().clone();
            clock(n)["skewed"] == false
                && members
                    .iter()
                    .filter(|m| m["clock_offset_ms"].is_i64())
                    .count()
                    == 2
        })
    });
    std::thread::sleep(Duration::from_millis(600));
    for key in ["k", "g"] {
        eventually(
            "a write through the +50 s node",
            Duration::from_secs(10),
            || ahead[0].http("POST", &format!("/t/{key}/old"), b"").0 == 200,
        );
    }
    eventually("every node holds both", Duration::from_secs(5), || {
        three
            .iter()
            .all(|n| n.get_raw("/t/g") == (200, b"old".to_vec()))
    });
    let joiner = start_joined(dirs[3].path(), &first, &[]);
    let four = [&first, &ahead[0], &ahead[1], &joiner];
    eventually("four healthy members", Duration::from_secs(15), || {
        all_healthy(&four, 4)
    });
    eventually("the +100 s node is skewed", Duration::from_secs(15), || {
        clock(&ahead[1])["skewed"] == true
    });
    // The newcomer has measured every clock (until then it refuses writes
    // for not having heard enough peers, which is not what is tested).
    eventually(
        "the newcomer measured three clocks",
        Duration::from_secs(15),
        || {
            let members = stats(&joiner)["members"].as_array().unwrap().clone();
            members
                .iter()
                .filter(|m| m["clock_offset_ms"].is_i64())
                .count()
                == 3
        },
    );
    std::thread::sleep(Duration::from_millis(600));
    // Either the newcomer took those stamps while it joined (it had heard
    // from too few peers to refuse them) and refuses every write, or it
    // did not and refuses these keys.
    let refused =
        |body: &str| body.contains("would undo the write") || body.contains("holds writes stamped");
    let (status, body) = joiner.http("POST", "/t/k/new", b"");
    assert_eq!(status, 503, "{body}");
    assert!(refused(&body), "{body}");
    let (status, body) = joiner.http("DELETE", "/t/g", b"");
    assert_eq!(status, 503, "{body}");
    assert!(refused(&body), "{body}");
    // What the answers said: the old values stay, on every node.
    eventually(
        "every node holds the old values",
        Duration::from_secs(70),
        || {
            four.iter().all(|n| {
                n.get_raw("/t/k") == (200, b"old".to_vec())
                    && n.get_raw("/t/g") == (200, b"old".to_vec())
            })
        },
    );
}

#[test]
fn a_node_wiped_and_restarted_at_its_address_replaces_its_old_self() {
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let (a, b, c) = three_joined(&dirs, &[]);
    let c_addr = c.addr;
    let c_name = c_addr.to_string();
    c.stop("KILL");
    eventually("c is dead", Duration::from_secs(20), || {
        state_of(&a, &c_name).as_deref() == Some("dead")
    });
    let wiped = tempfile::tempdir().unwrap();
    let c = Dhrtd::start_on(Some(c_addr), wiped.path(), &["--node", &a.addr.to_string()]);
    eventually(
        "three healthy members, no ghost",
        Duration::from_secs(30),
        || all_healthy(&[&a, &b, &c], 3),
    );
    let (status, body) = a.http("POST", "/after/k/1", b"");
    assert_eq!(status, 200, "{body}");
}

#[test]
fn a_node_alone_goes_on_writing_after_its_clock_is_set_back() {
    let dir = tempfile::tempdir().unwrap();
    let ahead = Dhrtd::start(dir.path(), &["--clock-offset-ms", TWO_HOURS_MS]);
    assert_eq!(ahead.http("POST", "/t/k/future", b"").0, 200);
    ahead.stop("TERM");
    // The clock is fixed; the log holds a stamp two hours ahead. Alone,
    // the node goes on from it: later writes still win.
    let fixed = Dhrtd::start(dir.path(), &[]);
    // Several clock verdicts (one every 250 ms) pass: every one of them
    // lets the node write.
    let started = std::time::Instant::now();
    let mut n = 0;
    while started.elapsed() < Duration::from_millis(1500) {
        let (status, body) = fixed.http("POST", &format!("/t/k/now{n}"), b"");
        assert_eq!(status, 200, "{body}");
        assert_eq!(fixed.get_raw("/t/k").1, format!("now{n}").as_bytes());
        n += 1;
    }
    assert_eq!(clock(&fixed)["skewed"], false);
}

#[test]
fn a_rotted_value_no_replica_can_give_back_is_damaged_not_missing() {
    let dirs: Vec<_> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    let (a, b) = two_joined(&dirs, &[]);
    let good = value(4000, 5);
    assert_eq!(a.http("PUT", "/rot/lonely", &good).0, 200);
    a.stop("KILL");
    flip_byte_of(&log_of(dirs[1].path(), "rot"), &good, 7, 1);
    // A listing meets the damage first (and leaves the key out); reads of
    // the key, over HTTP and the binary protocol, every time: damaged, not
    // missing.
    let (status, listing) = b.http("GET", "/rot", b"");
    assert_eq!(status, 200, "{listing}");
    for _ in 0..3 {
        let (status, body) = b.http("GET", "/rot/lonely", b"");
        assert_eq!(status, 503, "{body}");
        assert!(body.contains("damaged, not missing"), "{body}");
    }
    // And /metrics says so: one damaged record, one key answering so.
    assert_eq!(
        metric(
            &b,
            r#"dhrt_collection_damaged_records_total{collection="rot"}"#
        ),
        Some(1.0)
    );
    assert_eq!(metric(&b, "dhrt_damaged_keys"), Some(1.0));
    let out = Command::new(cli())
        .args(["--addr", &b.addr.to_string(), "get", "rot", "lonely"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{out:?}");
}

/// Deleting a key whose value rotted on disk deletes it: the answer is not
/// "not found" (it existed), a tombstone is written, and the key reads as
/// missing from then on, across a restart too.
#[test]
fn deleting_a_rotted_value_deletes_it() {
    let dir = tempfile::tempdir().unwrap();
    let a = Dhrtd::start(dir.path(), &[]);
    let good = value(4000, 9);
    assert_eq!(a.http("PUT", "/rot/gone", &good).0, 200);
    assert_eq!(a.http("PUT", "/rot/kept", b"fine").0, 200);
    flip_byte_of(&log_of(dir.path(), "rot"), &good, 11, 1);
    let (status, body) = a.http("GET", "/rot/gone", b"");
    assert_eq!(status, 503, "{body}");
    let (status, body) = a.http("DELETE", "/rot/gone", b"");
    assert_eq!(status, 200, "deleting a damaged key: {body}");
    assert_eq!(metric(&a, "dhrt_damaged_keys"), Some(0.0));
    for _ in 0..2 {
        let (status, body) = a.http("GET", "/rot/gone", b"");
        assert_eq!(status, 404, "{body}");
    }
    assert!(a.stop("TERM").success());
    let a = Dhrtd::start(dir.path(), &[]);
    let (status, body) = a.http("GET", "/rot/gone", b"");
    assert_eq!(status, 404, "after a restart: {body}");
    assert_eq!(a.get_raw("/rot/kept").1, b"fine");
    assert!(a.stop("TERM").success());
}

#[test]
fn files_emptied_by_a_power_loss_or_an_operator_are_told_apart() {
    // `node.id` empty: the machine lost power right after the first start,
    // before anything was acknowledged. The node takes a new id and starts.
    let dir = tempfile::tempdir().unwrap();
    drop(Dhrtd::start(dir.path(), &[]));
    std::fs::write(dir.path().join("node.id"), b"").unwrap();
    let node = Dhrtd::start(dir.path(), &[]);
    let (status, _) = node.http("PUT", "/c/k", b"v");
    assert_eq!(status, 200);
    let id = std::fs::read_to_string(dir.path().join("node.id")).unwrap();
    assert_eq!(id.trim().len(), 16, "{id:?}");
    drop(node);
    // The log of `c` emptied (or cut inside its header) while its
    // watermark says records were durable: the start is refused, and the
    // file left as it is.
    for len in [0, 11, 31] {
        let log = log_of(dir.path(), "c");
        let bytes = std::fs::read(&log).unwrap();
        std::fs::write(&log, &bytes[..len]).unwrap();
        let (code, out) = start_expecting_exit(dir.path());
        assert_ne!(code, Some(0), "{out}");
        assert!(out.contains("before its durable watermark"), "{out}");
        assert_eq!(std::fs::metadata(&log).unwrap().len(), len as u64);
        std::fs::write(&log, &bytes).unwrap();
    }
    // The log deleted beside its watermark: refused too.
    let log = log_of(dir.path(), "c");
    let bytes = std::fs::read(&log).unwrap();
    std::fs::remove_file(&log).unwrap();
    let (code, out) = start_expecting_exit(dir.path());
    assert_ne!(code, Some(0), "{out}");
    assert!(out.contains("the log is missing"), "{out}");
    std::fs::write(&log, &bytes).unwrap();
    let node = Dhrtd::start(dir.path(), &[]);
    assert_eq!(node.http("GET", "/c/k", b"").0, 200);
}

/// A page of a log the node cannot read (a failing sector; here the file
/// shortened under the running node) used to kill it with SIGBUS. The
/// records on it are damage like any other now: 503 for a key no replica
/// can give back, and the node goes on serving everything else.
#[test]
fn a_page_of_a_log_that_cannot_be_read_does_not_kill_the_node() {
    let dir = tempfile::tempdir().unwrap();
    let mut a = Dhrtd::start(dir.path(), &["--sync", "always"]);
    for i in 0..300 {
        let status = a
            .http("PUT", &format!("/cut/k{i:03}"), &value(8192, i as u8))
            .0;
        assert_eq!(status, 200);
    }
    std::fs::OpenOptions::new()
        .write(true)
        .open(log_of(dir.path(), "cut"))
        .unwrap()
        .set_len(100_000)
        .unwrap();
    let (status, body) = a.http("GET", "/cut/k250", b"");
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("damaged, not missing"), "{body}");
    assert!(a.running(), "the node died");
    // A key wholly below the cut is served as it was; listings and writes
    // go on.
    assert_eq!(a.get_raw("/cut/k001").1, value(8192, 1));
    assert_eq!(a.http("GET", "/cut?limit=1000", b"").0, 200);
    assert_eq!(a.http("PUT", "/other/k", b"v").0, 200);
    assert_eq!(a.get_raw("/other/k").1, b"v");
    assert!(a.running(), "the node died");
}

/// Clocks in a chain, at 0, +40 s and +80 s, with 60 s allowed: no node is
/// off from most of its peers, so every node takes writes. The node at 0
/// admits the +80 s node's stamps (within 60 s of the cluster's middle,
/// +40 s), and must not then judge itself skewed for holding them: that
/// locked the one node with the right time out of writes.
#[test]
fn a_chain_of_clocks_within_the_allowed_offset_locks_no_node_out() {
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let a = Dhrtd::start(dirs[0].path(), &[]);
    let b = start_joined(dirs[1].path(), &a, &["--clock-offset-ms", "40000"]);
    let c = start_joined(dirs[2].path(), &a, &["--clock-offset-ms", "80000"]);
    let measured = |n: &Dhrtd| {
        stats(n)["members"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|m| m["clock_offset_ms"].is_i64())
            .count()
            == 2
    };
    eventually(
        "every node measures both peers",
        Duration::from_secs(20),
        || [&a, &b, &c].iter().all(|n| measured(n)),
    );
    for n in [&a, &b, &c] {
        assert_eq!(clock(n)["skewed"], false, "{}", clock(n));
    }
    for i in 0..5 {
        let (status, body) = c.http("POST", &format!("/chain/c{i}/v"), b"");
        assert_eq!(status, 200, "{body}");
    }
    eventually("a holds c's writes", Duration::from_secs(10), || {
        a.http("GET", "/chain/c4", b"").0 == 200
    });
    // A few of a's verdicts later, it still takes writes.
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(clock(&a)["skewed"], false, "{}", clock(&a));
    for i in 0..5 {
        let (status, body) = a.http("POST", &format!("/chain/a{i}/v"), b"");
        assert_eq!(status, 200, "{body}");
    }
    // c leaves. a still holds c's stamps, 80 s past its own wall clock but
    // only 40 s past b's, the one peer it has left: it keeps taking writes
    // (it used to refuse them until its wall clock came within the allowed
    // offset of c's stamps, about 20 s), and a and b take each other's
    // writes, stamped by a clock that follows c's: a record refused by
    // either would be on one node only.
    let c_addr = c.addr.to_string();
    // c's last write, just before it leaves: a holds a stamp 80 s past its
    // own clock for the next 20 s.
    let (status, body) = c.http("POST", "/chain/c-last/v", b"");
    assert_eq!(status, 200, "{body}");
    assert!(c.stop("TERM").success());
    eventually("a and b see c leave", Duration::from_secs(20), || {
        [&a, &b]
            .iter()
            .all(|n| state_of(n, &c_addr).as_deref() == Some("left"))
    });
    std::thread::sleep(Duration::from_secs(1));
    for n in [&a, &b] {
        assert_eq!(clock(n)["skewed"], false, "{}", clock(n));
    }
    for i in 0..5 {
        for (n, name) in [(&a, "a"), (&b, "b")] {
            let (status, body) = n.http("POST", &format!("/chain/after-{name}{i}/v"), b"");
            assert_eq!(status, 200, "{body}");
        }
    }
    eventually(
        "a and b hold each other's writes",
        Duration::from_secs(10),
        || [&a, &b].iter().all(|n| local_keys(n, "chain") == 21),
    );
    for n in [&a, &b] {
        assert_eq!(metric(n, "dhrt_refused_future_total"), Some(0.0));
    }
}

/// Writes to `collection` through `node`, one each `every`, for `span`:
/// every one refused for the node's clock (503), which it then says is
/// skewed.
fn refuses_every_write(node: &Dhrtd, collection: &str, span: Duration, every: Duration) {
    let until = std::time::Instant::now() + span;
    let mut tries = 0;
    while std::time::Instant::now() < until {
        let (status, body) = node.http("PUT", &format!("/{collection}/k{tries}"), b"v");
        assert_eq!(status, 503, "write {tries} through {}: {body}", node.addr);
        tries += 1;
        std::thread::sleep(every);
    }
    assert_eq!(clock(node)["skewed"], true, "{}", clock(node));
}

/// A node joins with its clock 100 s ahead, through the one member whose
/// clock is within the allowed offset of it (+50 s; the two others at 0):
/// it must not take a write on the word of the first peers it hears from
/// (it did, about one start in four: stored on the member it joined
/// through, and later on the others), only on a verdict its unmeasured
/// peers cannot overturn, which is skewed here.
#[test]
fn a_node_joining_with_its_clock_ahead_takes_no_write_before_it_has_heard_enough_peers() {
    let dirs: Vec<_> = (0..4).map(|_| tempfile::tempdir().unwrap()).collect();
    let a = Dhrtd::start(dirs[0].path(), &[]);
    let b = start_joined(dirs[1].path(), &a, &[]);
    let c = start_joined(dirs[2].path(), &a, &["--clock-offset-ms", "50000"]);
    eventually("three healthy members", Duration::from_secs(15), || {
        all_healthy(&[&a, &b, &c], 3)
    });
    for n in [&a, &b, &c] {
        assert_eq!(clock(n)["skewed"], false, "{}", clock(n));
    }
    let d = start_joined(dirs[3].path(), &c, &["--clock-offset-ms", "100000"]);
    refuses_every_write(
        &d,
        "early",
        Duration::from_secs(3),
        Duration::from_millis(50),
    );
    for n in [&a, &b, &c, &d] {
        assert_eq!(local_keys(n, "early"), 0, "{}", n.addr);
    }
}

/// A node joins a pair whose other member is dead, with its clock two
/// hours ahead: it has heard one peer of two, which is off, and the dead
/// one could side with either. It refuses writes, also past the 10 s in
/// which a node whose peers never answer takes them after all (it used to
/// take them then, 200 under `local`: stamped two hours ahead, kept on it
/// alone, refused by the live member).
#[test]
fn a_node_joining_with_its_clock_ahead_while_half_its_peers_are_dead_takes_no_write() {
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let a = Dhrtd::start(dirs[0].path(), &[]);
    let b = start_joined(dirs[1].path(), &a, &[]);
    eventually("a pair", Duration::from_secs(15), || {
        all_healthy(&[&a, &b], 2)
    });
    let b_addr = b.addr.to_string();
    b.signal("KILL");
    drop(b);
    eventually("b is dead", Duration::from_secs(20), || {
        state_of(&a, &b_addr).as_deref() == Some("dead")
    });
    let d = start_joined(
        dirs[2].path(),
        &a,
        &["--clock-offset-ms", "7200000", "--write-ack", "local"],
    );
    refuses_every_write(
        &d,
        "ahead",
        Duration::from_secs(12),
        Duration::from_millis(500),
    );
    assert_eq!(local_keys(&d, "ahead"), 0);
    assert_eq!(local_keys(&a, "ahead"), 0);
}

/// A node allowing clocks a day apart, in a cluster whose other member
/// allows 60 s, admits peers' stamps by the strictest setting, as it
/// judges its own clock: records written 90 s ahead by a third, lenient
/// node before it joined are refused on both (the lenient one used to
/// store them, then judge itself skewed for holding them, refusing writes
/// for 30 s).
#[test]
fn a_lenient_node_admits_stamps_by_the_strictest_allowed_offset() {
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let lenient = ["--max-clock-offset-ms", "86400000"];
    let a = Dhrtd::start(dirs[0].path(), &[]);
    let b = start_joined(dirs[1].path(), &a, &lenient);
    eventually("a pair", Duration::from_secs(15), || {
        all_healthy(&[&a, &b], 2)
    });
    let c = Dhrtd::start(
        dirs[2].path(),
        &["--clock-offset-ms", "90000", lenient[0], lenient[1]],
    );
    for i in 0..3 {
        assert_eq!(c.http("PUT", &format!("/lenient/k{i}"), b"v").0, 200);
    }
    let out = Command::new(cli())
        .args(["--addr", &c.addr.to_string(), "join", &a.addr.to_string()])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    eventually(
        "a and b refuse c's records",
        Duration::from_secs(20),
        || {
            [&a, &b]
                .iter()
                .all(|n| metric(n, "dhrt_refused_future_total").unwrap_or(0.0) > 0.0)
        },
    );
    // A few anti-entropy rounds (every 2 s) later.
    std::thread::sleep(Duration::from_secs(5));
    for n in [&a, &b] {
        assert_eq!(local_keys(n, "lenient"), 0, "{}", n.addr);
        assert_eq!(clock(n)["skewed"], false, "{}: {}", n.addr, clock(n));
        // The bound in force, the strictest, not b's own setting.
        assert_eq!(clock(n)["max_offset_ms"], 60_000, "{}", n.addr);
        assert_eq!(n.http("PUT", "/other/k", b"v").0, 200, "{}", n.addr);
    }
}

/// A byte of a collection file's header rots while the node is down: the
/// node starts (rather than refusing the file, whose only remedy was to
/// move it away and lose the collection on a node alone), rebuilds the
/// header, and serves every key; a later restart is clean. (What becomes
/// of watch positions is the storage tests'.)
#[test]
fn a_node_whose_collection_header_rotted_starts_with_every_key() {
    let dir = tempfile::tempdir().unwrap();
    let a = Dhrtd::start(dir.path(), &["--sync", "always"]);
    for i in 0..50 {
        assert_eq!(
            a.http("PUT", &format!("/hd/k{i}"), format!("v{i}").as_bytes())
                .0,
            200
        );
    }
    a.signal("KILL");
    drop(a);
    let path = log_of(dir.path(), "hd");
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[13] ^= 0x01; // inside the collection's history
    std::fs::write(&path, &bytes).unwrap();
    let a = Dhrtd::start(dir.path(), &[]);
    for i in 0..50 {
        assert_eq!(
            a.get_raw(&format!("/hd/k{i}")).1,
            format!("v{i}").as_bytes()
        );
    }
    assert_eq!(a.http("PUT", "/hd/after", b"x").0, 200);
    assert!(a.stop("TERM").success());
    let a = Dhrtd::start(dir.path(), &[]);
    assert_eq!(a.get_raw("/hd/k7").1, b"v7");
    assert_eq!(a.get_raw("/hd/after").1, b"x");
    assert!(a.stop("TERM").success());
}

/// Two nodes whose clocks ran 8 s ahead (allowed: 5 s) wrote, then both
/// stopped; one is started again with its clock right, alone. It holds
/// stamps from the future and refuses writes until its wall clock has
/// passed them, then takes writes again, with its peer still down (before,
/// it refused them until a peer came back).
#[test]
fn a_node_restarted_alone_over_stamps_from_the_future_writes_once_past_them() {
    let dirs: Vec<_> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    let ahead = ["--clock-offset-ms", "8000", "--max-clock-offset-ms", "5000"];
    let a = Dhrtd::start(dirs[0].path(), &ahead);
    let b = start_joined(dirs[1].path(), &a, &ahead);
    eventually("a and b are healthy", Duration::from_secs(15), || {
        all_healthy(&[&a, &b], 2)
    });
    for i in 0..8 {
        assert_eq!(a.http("POST", &format!("/t/k{i}/ahead"), b"").0, 200);
    }
    eventually("a remembers b", Duration::from_secs(10), || {
        std::fs::read_to_string(dirs[0].path().join("cluster.state"))
            .is_ok_and(|s| s.contains(&format!("member {}", b.addr)))
    });
    let a_addr = a.addr;
    b.stop("KILL");
    a.stop("KILL");
    let started = std::time::Instant::now();
    let a = Dhrtd::start_on(
        Some(a_addr),
        dirs[0].path(),
        &["--max-clock-offset-ms", "5000", "--write-ack", "local"],
    );
    eventually(
        "a takes writes again, alone",
        Duration::from_secs(30),
        || a.http("POST", "/t/after/now", b"").0 == 200,
    );
    // Not before its stamps were within the allowed offset: 3 s at least.
    assert!(
        started.elapsed() >= Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(a.get_raw("/t/after"), (200, b"now".to_vec()));
}
