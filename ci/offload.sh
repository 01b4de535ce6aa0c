#!/usr/bin/env bash
# The offload backend's safetensors source, which sits behind the
# `offload-safetensors` feature (so the plain `cargo test` leaves it out):
# its tests and clippy on that feature.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo test --features offload-safetensors --test offload_safetensors
cargo clippy --features offload-safetensors --all-targets -- -D warnings
