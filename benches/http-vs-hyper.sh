#!/usr/bin/env bash
# dhrtd's HTTP GET /:key (a 100-byte value) against a bare hyper 1.x server
# answering the same JSON body, with wrk -t1 -c50, alternating runs.
# Needs wrk (apt-get install wrk). Prints "server run requests/sec".
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${RUNS:-3}
DURATION=${DURATION:-10s}
cargo build -q --release -p dhrtd -p dhrt-bench
tmp=$(mktemp -d)
trap 'kill $dhrt $bare 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$tmp"' EXIT
./target/release/dhrtd --listen 127.0.0.1:17453 --data-dir "$tmp/dhrt" --sync interval 2>"$tmp/dhrtd.log" &
dhrt=$!
./target/release/bare-hyper 127.0.0.1:17454 &
bare=$!
value=$(printf 'x%.0s' $(seq 100))
for _ in $(seq 100); do
  if curl -sf -X PUT --data "$value" http://127.0.0.1:17453/key >/dev/null &&
     curl -sf http://127.0.0.1:17454/key >/dev/null; then break; fi
  sleep 0.1
done
# Same body from both.
diff <(curl -s http://127.0.0.1:17453/key) <(curl -s http://127.0.0.1:17454/key)
for run in $(seq "$RUNS"); do
  for target in dhrt:17453 bare-hyper:17454; do
    rps=$(wrk -t1 -c50 -d"$DURATION" "http://127.0.0.1:${target#*:}/key" | awk '/Requests\/sec/ {print $2}')
    echo "${target%%:*} $run $rps"
  done
done
