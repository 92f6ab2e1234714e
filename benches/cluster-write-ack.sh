#!/usr/bin/env bash
# SET throughput and latency of a 3-node loopback cluster under each write
# concern, against a single node, in one run: three rounds of each, medians.
# Usage: bash benches/cluster-write-ack.sh [REQUESTS]
# (release builds; ports 7491-7494; data under a temporary directory)
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-100000}
cargo build --release -q -p dhrtd -p dhrt-bench
dir=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null; wait 2>/dev/null; rm -rf "$dir"' EXIT
export DHRT_LOG=${DHRT_LOG:-warn}
D=./target/release/dhrtd
bench() {
  ./target/release/dhrt-bench --addr 127.0.0.1:7491 -t set -n "$N" -c 50 -d 100 -r 100000 --csv | tail -1
}
healthy() {
  curl -s 127.0.0.1:7491/ | python3 -c '
import json, sys
m = json.load(sys.stdin)["members"]
print(len(m) == 3 and all(x["state"] == "healthy" for x in m))'
}
results="$dir/results.csv"
for mode in single all quorum local; do
  for round in 1 2 3; do
    rm -rf "$dir"/n*
    if [ "$mode" = single ]; then
      $D --listen 127.0.0.1:7491 --data-dir "$dir/n1" &
      sleep 0.5
    else
      $D --listen 127.0.0.1:7491 --data-dir "$dir/n1" --write-ack "$mode" &
      sleep 0.3
      $D --listen 127.0.0.1:7492 --data-dir "$dir/n2" --node 127.0.0.1:7491 --write-ack "$mode" &
      $D --listen 127.0.0.1:7493 --data-dir "$dir/n3" --node 127.0.0.1:7491 --write-ack "$mode" &
      until [ "$(healthy 2>/dev/null)" = True ]; do sleep 0.1; done
    fi
    echo "$mode,$round,$(bench)" | tee -a "$results"
    kill $(jobs -p); wait 2>/dev/null || true
  done
done
python3 - "$results" <<'PY'
import csv, statistics, sys
rows = list(csv.reader(open(sys.argv[1])))
by = {}
for mode, _round, _test, rps, avg, mn, p50, p95, p99, mx in rows:
    by.setdefault(mode, []).append((float(rps), float(p50), float(p99)))
single = statistics.median(r[0] for r in by["single"])
print("| setup | SET/s (median of 3) | vs single node | p50 ms | p99 ms |")
print("|---|---:|---:|---:|---:|")
for mode in ["single", "all", "quorum", "local"]:
    rps = statistics.median(r[0] for r in by[mode])
    p50 = statistics.median(r[1] for r in by[mode])
    p99 = statistics.median(r[2] for r in by[mode])
    name = "1 node" if mode == "single" else f"3 nodes, --write-ack {mode}"
    print(f"| {name} | {rps:,.0f} | {rps / single:.2f}x | {p50:.2f} | {p99:.2f} |")
PY
