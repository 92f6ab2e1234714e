#!/usr/bin/env bash
# Growth: dhrtd (--sync interval) against Redis 7 (appendonly yes,
# appendfsync everysec) in the same run, both loaded by dhrt-bench (the same
# client and load; --redis speaks RESP):
#   1. N distinct keys in order:  -t set -n N -r N --sequential -c 8 -P 64 -d 100
#   2. N random SETs over them:   -t set -n N -r N -c 50 -P 16 -d 100
#   3. after the restarts below, N more random SETs, the same way, during
#      which dhrt compacts its log (half of it is garbage)
# Each prints redis-benchmark's CSV (p50, p99 and max write latency). Then
# the resident memory of each server per key, and both are stopped (SIGTERM)
# and started again: the time until each answers (dhrt replaying its logs,
# three times, and their median; Redis loading its AOF).
#
#   benches/scale.sh                 # N=10000000
#   N=1000000 benches/scale.sh       # the 1M point, to compare
# Needs redis-server (apt-get install redis-server). With cyclictest
# (apt-get install rt-tests), each load is followed by the machine's own
# longest stall during it: how late a SCHED_FIFO 99 thread per CPU woke
# from a 1 ms timer. Nothing in the machine can delay that thread but the
# kernel with interrupts off or the hypervisor not running the vCPU, so it
# is the floor under any maximum latency measured here.
set -euo pipefail
cd "$(dirname "$0")/.."
N=${N:-10000000}
command -v redis-server >/dev/null || { echo "scale.sh: needs redis-server (apt-get install redis-server)" >&2; exit 1; }
cargo build -q --release -p dhrtd -p dhrt-bench
bin=target/release
tmp=$(mktemp -d)
dport=17463
rport=16389
dhrt="" redis=""
export DHRT_LOG=${DHRT_LOG:-info}
cleanup() { kill $dhrt $redis 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$tmp"; }
trap cleanup EXIT

start_dhrt() {
  "$bin/dhrtd" --listen 127.0.0.1:$dport --data-dir "$tmp/dhrt" --sync interval 2>>"$tmp/dhrtd.log" &
  dhrt=$!
}
start_redis() {
  redis-server --port $rport --appendonly yes --appendfsync everysec --save '' --dir "$tmp" >>"$tmp/redis.log" &
  redis=$!
}
dhrt_up() { "$bin/dhrt-bench" --addr 127.0.0.1:$dport -t get -n 1 -c 1 --csv >/dev/null 2>&1; }
redis_up() { [ "$(redis-cli -p $rport ping 2>/dev/null)" = PONG ]; }
# Milliseconds until `$1` succeeds. The port is polled every 5 ms with a
# bare connect (a shell redirection: no client process started while the
# server loads, which on two cores would take CPU from the load it times),
# then `$1` every 5 ms (dhrtd binds its port once its logs are replayed;
# Redis binds first and answers LOADING until its AOF is in).
until_up() {
  local t0 t1 port=$2
  t0=$(date +%s%N)
  until (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; do sleep 0.005; done
  until "$1"; do sleep 0.005; done
  t1=$(date +%s%N)
  echo $(((t1 - t0) / 1000000))
}
rss_kib() { awk -v f="$2" '$1 == f":" {print $2}' "/proc/$1/status"; }
bench() {
  local who=$1 label=$2 jitter=""
  shift 2
  local flags=(--addr 127.0.0.1:$dport)
  [ "$who" = redis ] && flags=(--addr 127.0.0.1:$rport --redis)
  if command -v cyclictest >/dev/null; then
    cyclictest -t "$(nproc)" -a -p 99 -i 1000 -q >"$tmp/jitter" 2>&1 &
    jitter=$!
  fi
  "$bin/dhrt-bench" "${flags[@]}" "$@" --csv --report-slow-ms "${SLOW_MS:-50}" | tail -n +2 | sed "s/^/\"$who\",\"$label\",/"
  if [ -n "$jitter" ]; then
    kill -INT $jitter
    wait $jitter || true
    echo "# machine stall during it (cyclictest max, per CPU): $(grep -o 'Max: *[0-9]*' "$tmp/jitter" | awk '{printf "%s%.1f ms", sep, $2 / 1000; sep = ", "}')"
  fi
}

echo "== machine: $(nproc) cores, $(awk '/MemTotal/ {print $2}' /proc/meminfo) KiB; dhrt $(git rev-parse --short HEAD); $(redis-server --version | cut -d' ' -f3)"
echo "== N=$N keys of 100 bytes"
start_dhrt
start_redis
until_up dhrt_up $dport >/dev/null
until_up redis_up $rport >/dev/null
echo '"server","load","test","rps","avg_latency_ms","min_latency_ms","p50_latency_ms","p95_latency_ms","p99_latency_ms","max_latency_ms"'
for who in dhrt redis; do
  bench $who sequential -t set -n "$N" -r "$N" --sequential -c 8 -P 64 -d 100
done
for who in dhrt redis; do
  bench $who random -t set -n "$N" -r "$N" -c 50 -P 16 -d 100
done
echo "== resident memory after the loads"
for who in dhrt redis; do
  pid=${!who}
  rss=$(rss_kib "$pid" VmRSS)
  anon=$(rss_kib "$pid" RssAnon)
  echo "$who: RSS $rss KiB ($((rss * 1024 / N)) bytes a key), of which anonymous (heap) $anon KiB ($((anon * 1024 / N)) bytes a key; the rest is the page cache of mapped files)"
done
grep -h "resharded\|compacted" "$tmp/dhrtd.log" | tail -5 || true
echo "== stop (SIGTERM) and start again: ms until each answers (files: ${CACHE:-warm})"
kill -TERM $dhrt $redis
wait $dhrt $redis 2>/dev/null || true
du -sh "$tmp/dhrt" "$tmp/appendonlydir" 2>/dev/null || true
sync
# What is timed is the reopen, not the page cache's state, which the VM's
# proactive reclaim (DAMON) leaves anywhere from all to none of the files
# cached after the minutes of the loads. warm (the default): each server's
# files are read into the page cache just before it starts, as after a
# restart of a running machine. cold: the page cache is dropped before
# each start, as after a boot (needs root). asis: as the loads left it.
cache() {
  case "${CACHE:-warm}" in
    warm) cat "$@" >/dev/null ;;
    cold) sync && echo 3 >/proc/sys/vm/drop_caches ;;
  esac
}
# Three restarts, each timed (the machine's noise moves one by 10-20 %);
# the median is the figure to compare.
times=()
for round in 1 2 3; do
  if [ "$round" -gt 1 ]; then
    kill -TERM $dhrt
    wait $dhrt 2>/dev/null || true
  fi
  cache "$tmp"/dhrt/*
  start_dhrt
  times+=("$(until_up dhrt_up $dport)")
  echo "dhrt reopen $round: ${times[-1]} ms"
done
echo "dhrt reopen (median of 3): $(printf '%s\n' "${times[@]}" | sort -n | sed -n 2p) ms"
anon=$(rss_kib "$dhrt" RssAnon)
echo "dhrt heap once reopened: $anon KiB ($((anon * 1024 / N)) bytes a key)"
sleep 5
anon=$(rss_kib "$dhrt" RssAnon)
echo "dhrt heap 5 s later: $anon KiB ($((anon * 1024 / N)) bytes a key)"
grep -h "recovered the index\|compact" "$tmp/dhrtd.log" | tail -3 | cut -c1-240 || true
cache "$tmp"/appendonlydir/*
start_redis
echo "redis AOF load: $(until_up redis_up $rport) ms"
echo "keys after reopen: dhrt $(curl -s http://127.0.0.1:$dport/ | grep -o '"keys":[0-9]*' | head -1), redis $(redis-cli -p $rport dbsize)"
# Half of dhrt's log is garbage: the reopened node compacts it, during this
# load (the reopens were timed first, so that 1M and 10M compare the same
# logs: two records a key). On a VM with free page reporting
# (virtio-balloon), the gigabytes the restarts just freed are handed to the
# host in batches every 2 s, each stalling the whole VM's memory accesses
# for up to hundreds of ms: see docs/benchmarks.md, session 17.
echo "== after the restart: N random SETs while dhrt compacts"
for who in dhrt redis; do
  bench $who compacting -t set -n "$N" -r "$N" -c 50 -P 16 -d 100
done
grep -h "compacted" "$tmp/dhrtd.log" | tail -1 | cut -c1-240 || true
