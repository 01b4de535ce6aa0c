#!/usr/bin/env bash
# The cuda feature on a machine without a GPU: the simulated-driver tests,
# clippy with the feature, the example's clean failure, ci/gpu.sh's dry run.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo test --features cuda --lib backend::cuda
cargo test --features cuda --test cuda_sim --test cuda_props --test cuda_gpu --test trace_replay
cargo clippy --all-targets --features cuda -- -D warnings
cargo build --features cuda --example cuda_bench --example cuda_memset
bash ci/gpu.sh --dry-run --out target/gpu-dry
if ./target/debug/examples/cuda_memset; then
  echo "cuda_memset ran on a GPU"
else
  echo "cuda_memset: no GPU here, exited non-zero with the error above (expected)"
fi
