#!/usr/bin/env bash
# How long a large write waits for a replica that has just died.
#
#   bash benches/dead-replica-write.sh BINDIR BASEPORT
#
# Starts three dhrtd (default write concern `all`) on 127.0.0.1:BASEPORT+1..3
# with data under a fresh temporary directory, writes 16 MB, SIGKILLs the
# third, and at once times a 16 MB PUT and a 1-byte PUT through the first
# (both answer 504: saved on 2 of 3 replicas), then another 16 MB PUT.
set -euo pipefail
BIN=${1:?BINDIR}; BASE=${2:?BASEPORT}
W=$(mktemp -d /tmp/dhrt-dead-replica.XXXXXX)
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill -9 "$p" 2>/dev/null || true; done; rm -rf "$W"; }
trap cleanup EXIT
head -c 16000000 /dev/urandom > "$W/big"
for i in 1 2 3; do
  mkdir -m 700 "$W/d$i"
  join=(); [ "$i" != 1 ] && join=(--node "127.0.0.1:$((BASE + 1))")
  "$BIN/dhrtd" --listen "127.0.0.1:$((BASE + i))" --data-dir "$W/d$i" "${join[@]}" 2>/dev/null &
  PIDS+=($!)
done
sleep 4
A=127.0.0.1:$((BASE + 1))
curl -s -o /dev/null -w 'before the kill: 16 MB PUT %{http_code} in %{time_total} s\n' -XPUT --data-binary @"$W/big" "$A/c/warm"
kill -9 "${PIDS[2]}"
curl -s -o /dev/null -w 'just after: 16 MB PUT %{http_code} in %{time_total} s\n' -XPUT --data-binary @"$W/big" "$A/c/k1" &
BIG=$!
sleep 0.05
curl -s -o /dev/null -w 'just after: 1-byte PUT %{http_code} in %{time_total} s\n' -XPUT --data-binary x "$A/c/k2"
wait "$BIG"
curl -s -o /dev/null -w 'then: 16 MB PUT %{http_code} in %{time_total} s\n' -XPUT --data-binary @"$W/big" "$A/c/k3"
