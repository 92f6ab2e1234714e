# The everyday commands. `just --list` shows them.

# Build everything in release mode.
build:
    cargo build --workspace --release

# Run a node on 127.0.0.1:7453, persisting to ./dhrt-data.
run *args:
    cargo run --release -p dhrtd -- {{args}}

# Three joined local nodes on 127.0.0.1:7453-7455 (data in /tmp/dhrt-cluster-N); Ctrl-C stops them.
cluster:
    #!/usr/bin/env bash
    set -euo pipefail
    cargo build --release -p dhrtd
    trap 'kill $(jobs -p) 2>/dev/null; wait' EXIT INT TERM
    ./target/release/dhrtd --listen 127.0.0.1:7453 --data-dir /tmp/dhrt-cluster-1 --name n1 &
    sleep 0.5
    ./target/release/dhrtd --listen 127.0.0.1:7454 --data-dir /tmp/dhrt-cluster-2 --name n2 --node 127.0.0.1:7453 &
    ./target/release/dhrtd --listen 127.0.0.1:7455 --data-dir /tmp/dhrt-cluster-3 --name n3 --node 127.0.0.1:7453 &
    echo "cluster of three on 127.0.0.1:7453-7455; try: curl -s 127.0.0.1:7455/"
    wait

# The test suite (the same command CI and the README use).
test:
    cargo test --workspace

# Formatting, lints, docs and tests: what CI runs.
ci:
    bash .ci/run

# Format the code.
fmt:
    cargo fmt --all

# Storage benchmark against redb, fjall and sled (see docs/benchmarks.md).
bench-storage n="1000000":
    cargo run --release -p dhrt-storage-bench -- --n {{n}}

# Criterion micro-benchmarks of the storage engine.
bench-criterion:
    cargo bench -p dhrt-storage-bench

# The command line (e.g. `just cli get users ada`); no arguments: the REPL.
cli *args:
    cargo run -q --release -p dhrt-cli -- {{args}}

# Load a running node like redis-benchmark (e.g. `just load -P 16`).
load *args:
    cargo run -q --release -p dhrt-bench -- -t set,get -n 100000 -c 50 -d 100 -r 100000 {{args}}

# dhrtd against Redis 7, side by side (needs redis-server, redis-tools).
bench-redis:
    bash benches/node-vs-redis.sh

# A 3-node cluster's SET throughput under each write concern vs one node.
bench-cluster:
    bash benches/cluster-write-ack.sh

# Join handoff of n records of 100 bytes.
bench-handoff n="1000000":
    bash benches/handoff.sh {{n}} 100

# dhrtd's HTTP against a bare hyper server (needs wrk).
bench-http:
    bash benches/http-vs-hyper.sh

# Fuzz the protocol decoder for a minute (needs nightly and cargo-fuzz).
fuzz seconds="60":
    cd fuzz && cargo +nightly fuzz run decode_frame -- -max_total_time={{seconds}}
