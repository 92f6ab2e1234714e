#!/usr/bin/env bash
# Join handoff: a node holding N records of D bytes, then a second node
# joins it; prints how long until the newcomer is healthy with every record.
# Usage: bash benches/handoff.sh [N] [D]   (release builds of dhrtd and
# dhrt-bench; ports 7471-7472; data under a temporary directory)
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-1000000}
D=${2:-100}
cargo build --release -q -p dhrtd -p dhrt-bench
dir=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null; wait 2>/dev/null; rm -rf "$dir"' EXIT
export DHRT_LOG=${DHRT_LOG:-warn}
./target/release/dhrtd --listen 127.0.0.1:7471 --data-dir "$dir/a" &
sleep 0.5
./target/release/dhrt-bench --addr 127.0.0.1:7471 -t set -n "$N" -r "$N" --sequential \
  -d "$D" -c 8 -P 64 --csv >/dev/null
keys() {
  curl -s "127.0.0.1:$1/" | python3 -c '
import json, sys
d = json.load(sys.stdin)
print(sum(c["keys"] for c in d["collections"] if c["name"] == "bench"),
      all(m["state"] == "healthy" for m in d["members"]) and len(d["members"]) == 2)'
}
echo "source: $(keys 7471 | cut -d' ' -f1) records of $D bytes"
start=$(date +%s.%N)
./target/release/dhrtd --listen 127.0.0.1:7472 --data-dir "$dir/b" --node 127.0.0.1:7471 &
while true; do
  read -r n healthy < <(keys 7472 2>/dev/null || echo "0 False")
  if [ "$n" = "$N" ] && [ "$healthy" = "True" ]; then break; fi
  sleep 0.05
done
end=$(date +%s.%N)
python3 -c "print(f'handoff: {$N} records in {$end - $start:.2f} s, {$N / ($end - $start):,.0f} records/s')"
