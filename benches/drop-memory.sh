#!/bin/bash
# What a drop of a large collection costs in memory.
# usage: bash benches/drop-memory.sh BINDIR PORT   (BINDIR: release dhrtd and dhrt-bench)
# Loads 2,000,000 keys of 14 bytes, then drops the collection over HTTP.
# Prints the node's RSS before, its peak RSS during the drop (VmHWM after
# resetting it through /proc/PID/clear_refs: needs root or the same user),
# the answer's status and size, and how long the drop took.
set -eu
B=$1; P=$2; D=$(mktemp -d)
"$B/dhrtd" --listen "127.0.0.1:$P" --data-dir "$D" > "$D/log" 2>&1 &
PID=$!
trap 'kill $PID 2>/dev/null; wait $PID 2>/dev/null; rm -rf "$D"' EXIT
for _ in $(seq 50); do curl -s -o /dev/null "127.0.0.1:$P/" && break; sleep 0.2; done
"$B/dhrt-bench" --addr "127.0.0.1:$P" -t set -n 2000000 -r 2000000 --sequential -c 8 -P 64 -d 20 > /dev/null 2>&1
sleep 2
RSS=$(awk '/VmRSS/ {print $2}' "/proc/$PID/status")
echo 5 > "/proc/$PID/clear_refs"
T0=$(date +%s.%N)
CODE=$(curl -s -X DELETE -o "$D/body" -w '%{http_code}' "127.0.0.1:$P/bench")
T1=$(date +%s.%N)
HWM=$(awk '/VmHWM/ {print $2}' "/proc/$PID/status")
KEYS=$(python3 -c "import json,sys; print(len(json.load(open(sys.argv[1]))))" "$D/body")
echo "$B rss_before_kb=$RSS peak_during_drop_kb=$HWM delta_mb=$(( (HWM - RSS) / 1024 )) code=$CODE body_bytes=$(stat -c %s "$D/body") keys=$KEYS secs=$(echo "$T1 - $T0" | bc)"
