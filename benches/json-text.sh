#!/bin/bash
# What reading a large text value as JSON costs the node in CPU.
# usage: bash benches/json-text.sh BINDIR PORT   (BINDIR: a release dhrtd)
# Stores one 16 MiB value of non-ASCII text ('é', two bytes each) and one
# of ASCII, reads each three times as JSON (the default) and once raw, and
# prints the node's CPU time (user + system, from /proc) per read; checks
# that the JSON decodes to the value.
set -eu
B=$1; P=$2; D=$(mktemp -d)
"$B/dhrtd" --listen "127.0.0.1:$P" --data-dir "$D/data" > "$D/log" 2>&1 &
PID=$!
trap 'kill $PID 2>/dev/null; wait $PID 2>/dev/null; rm -rf "$D"' EXIT
for _ in $(seq 50); do curl -s -o /dev/null "127.0.0.1:$P/" && break; sleep 0.2; done
python3 -c "import sys; open(sys.argv[1],'w').write('a' + '\u00e9' * 8388607)" "$D/text"
python3 -c "import sys; open(sys.argv[1],'w').write('a' * 16777216)" "$D/ascii"
cpu_ms() { awk '{print ($14 + $15) * 10}' "/proc/$PID/stat"; }
for v in text ascii; do
  curl -s -X PUT --data-binary "@$D/$v" -o /dev/null "127.0.0.1:$P/json/$v"
  for i in 1 2 3; do
    a=$(cpu_ms); curl -s -o "$D/out" "127.0.0.1:$P/json/$v"; b=$(cpu_ms)
    ok=$(python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['Value'] == open(sys.argv[2]).read())" "$D/out" "$D/$v")
    echo "$B $v json read $i: node cpu $((b - a)) ms, decodes to the value: $ok"
  done
  a=$(cpu_ms); curl -s -H 'Accept: application/octet-stream' -o /dev/null "127.0.0.1:$P/json/$v"; b=$(cpu_ms)
  echo "$B $v raw read: node cpu $((b - a)) ms"
done
