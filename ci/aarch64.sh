#!/usr/bin/env bash
# Cross-compiles the metadata tests for aarch64 and runs them under
# qemu-user, so the NEON batch backend is checked against the scalar
# reference (tests/meta_props.rs) on every CI run that has the tools.
#
# Installs what is missing when it can (apt-get, rustup); if it cannot, it
# says so and exits 0 (skip). Exits non-zero when a test fails.
#
# Only meta tests run: the lib filter `meta` keeps the host-pool unit tests
# (mmap, huge pages) out of the emulator, where they are slow and test
# nothing NEON-specific.
set -euo pipefail
cd "$(dirname "$0")/.."

TARGET=aarch64-unknown-linux-gnu
skip() {
    echo "ci/aarch64.sh: SKIP: $*" >&2
    exit 0
}

have_tools() {
    command -v aarch64-linux-gnu-gcc >/dev/null && command -v qemu-aarch64 >/dev/null
}

if ! have_tools; then
    if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
        echo "ci/aarch64.sh: installing gcc-aarch64-linux-gnu and qemu-user" >&2
        if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq gcc-aarch64-linux-gnu qemu-user >/dev/null; }; then
            skip "apt-get could not install gcc-aarch64-linux-gnu qemu-user"
        fi
    else
        skip "aarch64-linux-gnu-gcc or qemu-aarch64 missing, and no root apt-get to install them"
    fi
    have_tools || skip "tools still missing after apt-get"
fi

if ! rustup target list --installed 2>/dev/null | grep -qx "$TARGET"; then
    rustup target add "$TARGET" || skip "rustup could not add $TARGET"
fi

export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER="qemu-aarch64 -L /usr/aarch64-linux-gnu"

echo "ci/aarch64.sh: meta tests on $TARGET under qemu-user" >&2
cargo test --target "$TARGET" --test meta_props --test meta_concurrency
cargo test --target "$TARGET" --lib meta
echo "ci/aarch64.sh: OK" >&2
