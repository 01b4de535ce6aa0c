#!/usr/bin/env bash
# Model-checks the lock-free structures with loom (tests/loom.rs).
# Separate target dir: the cfg changes every crate's build.
set -euo pipefail
cd "$(dirname "$0")/.."
export RUSTFLAGS="--cfg tensorpool_loom"
export LOOM_MAX_PREEMPTIONS="${LOOM_MAX_PREEMPTIONS:-2}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-target}/loom"
cargo test --release --test loom -- --test-threads=1
