#!/usr/bin/env bash
# Write-to-event latency of watchers while a write load takes every core:
# dhrt-bench (32 connections x 64 SETs in flight, 2 client threads) against
# one node, and, 4 s in, dhrt-watch-bench writing 200 SETs/s to another
# collection with W watchers of it (W=1 by default) for 12 s. Prints the
# watchers' latency and the load's CSV row (rps, then latencies in ms).
#
#   W=100 benches/watch-under-load.sh
set -euo pipefail
cd "$(dirname "$0")/.."
W=${W:-1}
cargo build --release -q -p dhrtd -p dhrt-bench
bin=target/release
dir=$(mktemp -d)
port=${PORT:-27601}
"$bin/dhrtd" --listen 127.0.0.1:$port --data-dir "$dir/d" >"$dir/node.log" 2>&1 &
node=$!
trap 'kill $node 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$dir"' EXIT
sleep 1
"$bin/dhrt-bench" --addr 127.0.0.1:$port -t set -n 20000000 -r 400000 -c 32 -P 64 -d 100 \
    --threads 2 --csv >"$dir/load.csv" 2>&1 &
load=$!
sleep 4
"$bin/dhrt-watch-bench" --write 127.0.0.1:$port --watch 127.0.0.1:$port --watchers "$W" \
    --rate 200 --seconds 12 --collection lat | grep -E '^(watchers|write-to-event)'
wait $load
tail -1 "$dir/load.csv"
