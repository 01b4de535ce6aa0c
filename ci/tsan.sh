#!/usr/bin/env bash
# ThreadSanitizer over the host pool's concurrent paths: cross-thread frees,
# trim and growth racing owns/usable_size/manages (span records), thread
# caches of dropped pools, the cached counter. Needs nightly with rust-src
# (std is rebuilt instrumented, so its atomics and locks are seen too).
# Not part of .ci/run: the instrumented std build takes minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
export RUSTFLAGS="-Zsanitizer=thread"
export RUSTDOCFLAGS="$RUSTFLAGS"
export TSAN_OPTIONS="${TSAN_OPTIONS:-halt_on_error=1 second_deadlock_stack=1}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-target}/tsan"
cargo +nightly test -Zbuild-std --target x86_64-unknown-linux-gnu --lib -- \
  --test-threads=4 \
  host::tests::item4_owns_races_trim_and_growth \
  host::tests::item4_owns_then_trim_releases_the_record \
  host::tests::item14_cached_never_wraps \
  host::tests::cross_thread_frees_flow_back \
  host::tests::thread_exit_hands_the_cache_back \
  host::tests_xthread::producers_and_consumers_lose_and_duplicate_no_block \
  host::tests::item2_double_free_is_detected_in_cache_central_and_huge \
  host::large::tests::steals_race_lock_free_readers_and_cross_thread_frees \
  host::large::tests::spans_freed_on_another_thread_are_reused_too
cargo +nightly test -Zbuild-std --target x86_64-unknown-linux-gnu --test host_pool_rss -- \
  item6_worker_cache_does_not_keep_dropped_pools_mapped
