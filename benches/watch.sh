#!/usr/bin/env bash
# Watch benchmark: write-to-event latency on one node and across two,
# 1,000 watchers of one collection under 1,000 writes/s, the write
# throughput with those watchers attached against none, and the memory a
# watcher costs the node. Figures go to docs/benchmarks.md.
#
#   benches/watch.sh            # SECONDS_PER_RUN=10 by default
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${SECONDS_PER_RUN:-10}
cargo build --release -q -p dhrtd -p dhrt-bench
bin=target/release
dir=$(mktemp -d)
a=127.0.0.1:7801
b=127.0.0.1:7802
cleanup() { kill "$pa" "$pb" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$dir"; }
trap cleanup EXIT
"$bin/dhrtd" --listen $a --data-dir "$dir/a" >"$dir/a.log" 2>&1 & pa=$!
sleep 0.5
"$bin/dhrtd" --listen $b --data-dir "$dir/b" --node $a >"$dir/b.log" 2>&1 & pb=$!
for _ in $(seq 100); do
    curl -sf "http://$b/" | grep -q '"state":"healthy".*"state":"healthy"' && break
    sleep 0.1
done
rss() { awk '/VmRSS/ {print $2}' "/proc/$1/status"; }
wb() { "$bin/dhrt-watch-bench" --seconds "$secs" "$@"; }

echo "== machine: $(nproc) cores, $(uname -r); dhrt $(git rev-parse --short HEAD)"
echo "== 1 watcher, 1,000 writes/s, same node"
wb --write $a --watch $a --watchers 1 --rate 1000 --collection lat1
echo "== 1 watcher, 1,000 writes/s, written on one node, watched on the other"
wb --write $a --watch $b --watchers 1 --rate 1000 --collection lat2
echo "== 1,000 watchers, 1,000 writes/s, same node"
before=$(rss $pa)
wb --write $a --watch $a --watchers 1000 --rate 1000 --collection fan &
sleep 3
during=$(rss $pa)
wait $!
echo "node RSS: ${before} KiB before, ${during} KiB with 1,000 watchers open: $(( (during - before) / 1000 )) KiB a watcher"
echo "== write throughput, 8 connections x 16 in flight, no watchers"
"$bin/dhrt-watch-bench" --seconds 5 --write $a --watchers 0 --max-writes --collection tput
echo "== write throughput, 8 connections x 16 in flight, 1,000 watchers attached"
"$bin/dhrt-watch-bench" --seconds 5 --write $a --watch $a --watchers 1000 --max-writes --collection tput
echo "== the same, the watchers' readers at nice 19 (as if on other machines)"
"$bin/dhrt-watch-bench" --seconds 5 --write $a --watch $a --watchers 1000 --max-writes --collection tput --readers-nice 19
