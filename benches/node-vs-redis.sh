#!/usr/bin/env bash
# dhrtd (--sync interval) against Redis 7 (appendonly yes, appendfsync
# everysec) on the same machine, same load, alternating runs:
#   dhrt-bench / redis-benchmark -t set,get -n $N -c 50 -d 100 -r 100000 -P {1,16} --csv
# Needs redis-server and redis-benchmark (apt-get install redis-server redis-tools).
# With DHRTD_BASE=/path/to/an/older/dhrtd, that build runs too, in the same
# rounds ("dhrt-base" rows): an A/B of two builds beside the same Redis.
# Prints CSV rows prefixed with server,pipeline,run.
set -euo pipefail
cd "$(dirname "$0")/.."
N=${N:-100000}
RUNS=${RUNS:-3}
cargo build -q --release -p dhrtd -p dhrt-bench
tmp=$(mktemp -d)
base=""
trap 'kill $dhrt $redis $base 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$tmp"' EXIT
./target/release/dhrtd --listen 127.0.0.1:17453 --data-dir "$tmp/dhrt" --sync interval 2>"$tmp/dhrtd.log" &
dhrt=$!
redis-server --port 16379 --appendonly yes --appendfsync everysec --save '' --dir "$tmp" >"$tmp/redis.log" &
redis=$!
if [ -n "${DHRTD_BASE:-}" ]; then
  "$DHRTD_BASE" --listen 127.0.0.1:17454 --data-dir "$tmp/base" --sync interval 2>"$tmp/base.log" &
  base=$!
fi
for _ in $(seq 100); do
  if ./target/release/dhrt-bench --addr 127.0.0.1:17453 -t get -n 1 -c 1 --csv >/dev/null 2>&1 &&
     redis-cli -p 16379 ping >/dev/null 2>&1; then break; fi
  sleep 0.1
done
echo '"server","pipeline","run","test","rps","avg_latency_ms","min_latency_ms","p50_latency_ms","p95_latency_ms","p99_latency_ms","max_latency_ms"'
for run in $(seq "$RUNS"); do
  for p in 1 16; do
    ./target/release/dhrt-bench --addr 127.0.0.1:17453 -t set,get -n "$N" -c 50 -d 100 -r 100000 -P "$p" --csv |
      tail -n +2 | sed "s/^/\"dhrt\",\"$p\",\"$run\",/"
    redis-benchmark -p 16379 -t set,get -n "$N" -c 50 -d 100 -r 100000 -P "$p" --csv |
      tail -n +2 | sed "s/^/\"redis\",\"$p\",\"$run\",/"
    if [ -n "$base" ]; then
      ./target/release/dhrt-bench --addr 127.0.0.1:17454 -t set,get -n "$N" -c 50 -d 100 -r 100000 -P "$p" --csv |
        tail -n +2 | sed "s/^/\"dhrt-base\",\"$p\",\"$run\",/"
    fi
  done
done
