#!/bin/bash
# How fast a raised replication factor fills its new owners.
# usage: bash benches/raise-replicas.sh BINDIR BASEPORT [MOVE_RATE_MIB]
# Four nodes on BASEPORT+1..+4 (default --move-rate-mib 64); collection
# `conc` at `replicas=1` gets 20 values of 16 MiB, then `replicas=3`.
# Prints, every quarter second while it changes, how many keys of `conc`
# each node holds, then each node's anti-entropy and move counters.
set -eu
B=$1; BASE=$2; RATE=${3:-64}; D=$(mktemp -d)
S=--cluster-secret=bench-secret-bench-secret-bench-secret
PIDS=()
trap 'kill "${PIDS[@]}" 2>/dev/null; wait 2>/dev/null; rm -rf "$D"' EXIT
for i in 1 2 3 4; do
  join=(); [ "$i" -gt 1 ] && join=(--node "127.0.0.1:$((BASE + 1))")
  "$B/dhrtd" --listen "127.0.0.1:$((BASE + i))" --data-dir "$D/d$i" "$S" \
    --move-rate-mib "$RATE" "${join[@]}" > "$D/log$i" 2>&1 &
  PIDS+=($!)
  sleep 1
done
sleep 2
head -c 16777216 /dev/urandom > "$D/v"
A=127.0.0.1:$((BASE + 1))
curl -s -X PUT -o /dev/null "$A/conc?replicas=1"
for k in $(seq 1 20); do curl -s -X PUT --data-binary "@$D/v" -o /dev/null "$A/conc/k$k"; done
sleep 5
curl -s -X PUT -o /dev/null "$A/conc?replicas=3"
T0=$(date +%s.%N); last=""
for _ in $(seq 1 80); do
  sleep 0.25
  now=""
  for i in 1 2 3 4; do
    now+="$(curl -s -m 1 "127.0.0.1:$((BASE + i))/" | python3 -c 'import sys,json; print(sum(c["keys"] for c in json.load(sys.stdin)["collections"] if c["name"] == "conc"))') "
  done
  [ "$now" != "$last" ] && echo "$(echo "$(date +%s.%N) - $T0" | bc | cut -c1-5) s: keys of conc on each node: $now"
  last=$now
done
for i in 1 2 3 4; do
  echo "node $i: $(curl -s "127.0.0.1:$((BASE + i))/metrics" | grep -E '^dhrt_(anti_entropy_records_total|moved_bytes_total)' | tr '\n' ' ')"
done
