//! The real `dhrt-bench` against a real `dhrtd`: its CSV has
//! redis-benchmark's columns, its requests reach the node, and a refused
//! request makes it fail instead of counting it.

use std::path::PathBuf;
use std::process::{Command, Output};

use crate::dhrtd::{Dhrtd, workspace_binary};

fn bench_binary() -> PathBuf {
    workspace_binary(
        "dhrt-bench",
        // Not src/bin: that is the bare-hyper binary.
        &[
            "benches/dhrt-bench/src/main.rs",
            "benches/dhrt-bench/src/load.rs",
            "benches/dhrt-bench/src/stats.rs",
            "crates/dhrt-proto/src",
        ],
    )
}

fn bench(node: &Dhrtd, args: &[&str]) -> Output {
    Command::new(bench_binary())
        .arg("--addr")
        .arg(node.addr.to_string())
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn dhrt_bench_loads_a_node_and_reports_like_redis_benchmark() {
    let dir = tempfile::tempdir().unwrap();
    let node = Dhrtd::start(dir.path(), &[]);
    // 3,000 sequential sets over a keyspace of 1,000: every key once, three
    // times over, through 7 connections with 16 requests in flight each.
    let o = bench(
        &node,
        &[
            "-t",
            "set,get",
            "-n",
            "3000",
            "-c",
            "7",
            "-d",
            "40",
            "-r",
            "1000",
            "-P",
            "16",
            "--sequential",
            "--csv",
        ],
    );
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert_eq!(
        o.status.code(),
        Some(0),
        "{stdout}{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(
        lines[0],
        r#""test","rps","avg_latency_ms","min_latency_ms","p50_latency_ms","p95_latency_ms","p99_latency_ms","max_latency_ms""#
    );
    assert_eq!(lines.len(), 3, "{stdout}");
    for (line, test) in lines[1..].iter().zip(["SET", "GET"]) {
        let fields: Vec<&str> = line.split(',').map(|f| f.trim_matches('"')).collect();
        assert_eq!(fields.len(), 8, "{line}");
        assert_eq!(fields[0], test);
        let numbers: Vec<f64> = fields[1..].iter().map(|f| f.parse().unwrap()).collect();
        assert!(numbers[0] > 0.0, "{line}");
        // min <= p50 <= p95 <= p99 <= max
        assert!(numbers[2..].windows(2).all(|w| w[0] <= w[1]), "{line}");
    }
    // Exactly the keyspace arrived, with values of the given size.
    let (status, body) = node.http("GET", "/bench?limit=10000", b"");
    assert_eq!(status, 200);
    let listing: serde_json::Value = serde_json::from_str(&body).unwrap();
    let entries = listing.as_array().unwrap();
    assert_eq!(entries.len(), 1000);
    let (status, value) = node.http("GET", "/bench/key:000000000999", b"");
    assert_eq!(status, 200);
    assert!(value.contains(&"x".repeat(40)), "{value}");
    assert_eq!(node.http("GET", "/bench/key:000000001000", b"").0, 404);

    // A value one byte over the node's 16 MiB limit is refused, and the run
    // fails with it.
    let over = (16 << 20) + 1;
    let o = bench(
        &node,
        &[
            "-t",
            "set",
            "-n",
            "1",
            "-c",
            "1",
            "-d",
            &over.to_string(),
            "--csv",
        ],
    );
    assert_eq!(o.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("refused"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
}
