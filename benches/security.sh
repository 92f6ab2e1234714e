#!/usr/bin/env bash
# What authentication and TLS cost, measured side by side on one machine:
# three dhrtd at once -- plain (loopback, no auth file), with an auth file
# (every connection presents a write token), and with TLS (no auth file) --
# and Redis 7 with requirepass, under the same load, alternating runs:
#   binary: dhrt-bench / redis-benchmark -t set,get -n $N -c 50 -d 100 -r 100000 -P {1,16}
#   HTTP:   wrk -t1 -c50 -d$DURATION GET /key (100-byte value), plain, with a
#           Bearer token, and over TLS (https)
# Needs redis-server, redis-tools, wrk and openssl (apt-get install
# redis-server redis-tools wrk openssl). Prints CSV rows:
#   server,proto,pipeline,run,test,rps,avg_ms,min_ms,p50_ms,p95_ms,p99_ms,max_ms
# (HTTP rows carry rps only).
set -euo pipefail
cd "$(dirname "$0")/.."
N=${N:-100000}
RUNS=${RUNS:-3}
DURATION=${DURATION:-5s}
cargo build -q --release -p dhrtd -p dhrt-bench -p dhrt-cli
tmp=$(mktemp -d)
pids=()
trap 'kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$tmp"' EXIT

# A CA and a certificate for 127.0.0.1 it signed.
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 \
  -subj /CN=bench-ca -keyout "$tmp/ca.key" -out "$tmp/ca.pem" 2>/dev/null
openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj /CN=127.0.0.1 \
  -keyout "$tmp/node.key" -out "$tmp/node.csr" 2>/dev/null
printf 'subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n' >"$tmp/ext"
openssl x509 -req -in "$tmp/node.csr" -CA "$tmp/ca.pem" -CAkey "$tmp/ca.key" -CAcreateserial \
  -days 2 -extfile "$tmp/ext" -out "$tmp/node.pem" 2>/dev/null
# A write token and its auth file.
./target/release/dhrt-cli token --role write --name bench >"$tmp/token"
token=$(head -1 "$tmp/token")
tail -1 "$tmp/token" >"$tmp/auth"

dhrtd() { ./target/release/dhrtd --sync interval "$@" & pids+=($!); }
dhrtd --listen 127.0.0.1:17461 --data-dir "$tmp/plain" 2>"$tmp/plain.log"
dhrtd --listen 127.0.0.1:17462 --data-dir "$tmp/auth-data" --auth-file "$tmp/auth" 2>"$tmp/auth.log"
dhrtd --listen 127.0.0.1:17463 --data-dir "$tmp/tls" --tls-cert "$tmp/node.pem" --tls-key "$tmp/node.key" 2>"$tmp/tls.log"
redis-server --port 16379 --appendonly yes --appendfsync everysec --save '' --dir "$tmp" \
  --requirepass benchpass >"$tmp/redis.log" & pids+=($!)

value=$(printf 'x%.0s' $(seq 100))
for _ in $(seq 100); do
  if curl -sf -X PUT --data "$value" http://127.0.0.1:17461/key >/dev/null &&
     curl -sf -X PUT --data "$value" -H "Authorization: Bearer $token" http://127.0.0.1:17462/key >/dev/null &&
     curl -sf -X PUT --data "$value" --cacert "$tmp/ca.pem" https://127.0.0.1:17463/key >/dev/null &&
     redis-cli -p 16379 -a benchpass --no-auth-warning ping >/dev/null 2>&1; then break; fi
  sleep 0.1
done

bench() { # name port extra-args...
  local name=$1 port=$2; shift 2
  for p in 1 16; do
    ./target/release/dhrt-bench --addr "127.0.0.1:$port" -t set,get -n "$N" -c 50 -d 100 -r 100000 -P "$p" --csv "$@" |
      tail -n +2 | sed "s/^/\"$name\",\"binary\",\"$p\",\"$run\",/"
  done
}
http() { # name url curl-free wrk args...
  local name=$1; shift
  rps=$(wrk -t1 -c50 -d"$DURATION" "$@" | awk '/Requests\/sec/ {print $2}')
  echo "\"$name\",\"http\",\"1\",\"$run\",\"GET\",\"$rps\""
}
echo '"server","proto","pipeline","run","test","rps","avg_latency_ms","min_latency_ms","p50_latency_ms","p95_latency_ms","p99_latency_ms","max_latency_ms"'
for run in $(seq "$RUNS"); do
  bench dhrt-plain 17461
  bench dhrt-auth 17462 --token "$token"
  bench dhrt-tls 17463 --tls-ca "$tmp/ca.pem"
  for p in 1 16; do
    redis-benchmark -p 16379 -a benchpass -t set,get -n "$N" -c 50 -d 100 -r 100000 -P "$p" --csv 2>/dev/null |
      tail -n +2 | sed "s/^/\"redis-auth\",\"binary\",\"$p\",\"$run\",/"
  done
  http dhrt-plain http://127.0.0.1:17461/key
  http dhrt-auth -H "Authorization: Bearer $token" http://127.0.0.1:17462/key
  http dhrt-tls https://127.0.0.1:17463/key
done
