# The everyday commands. `just --list` shows them.

# Build everything in release mode.
build:
    cargo build --workspace --release

# Run a node on 127.0.0.1:7453, persisting to ./dhrt-data.
run *args:
    cargo run --release -p dhrtd -- {{args}}

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
