#!/usr/bin/env bash
# The remote backend against real Redis: one server and a 3-node Redis
# Cluster on loopback ports, no persistence; runs `cargo test --features
# remote` with their addresses in the environment, then stops every server
# it started by PID (also on failure).
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v redis-server >/dev/null || ! command -v redis-cli >/dev/null; then
  apt-get update -qq && apt-get install -y -qq redis-server redis-tools >/dev/null
fi

DIR=$(mktemp -d)
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
  rm -rf "$DIR"
}
trap cleanup EXIT

# A free loopback port, different for every call.
BASE=$((20000 + RANDOM % 20000))
start() { # port, extra args...
  local port=$1; shift
  mkdir -p "$DIR/$port"
  redis-server --port "$port" --bind 127.0.0.1 --save "" --appendonly no \
    --dir "$DIR/$port" --daemonize no --logfile "$DIR/$port/log" "$@" &
  PIDS+=($!)
  for _ in $(seq 100); do
    redis-cli -p "$port" ping >/dev/null 2>&1 && return 0
    sleep 0.1
  done
  echo "redis-server on port $port did not start:"; cat "$DIR/$port/log"; exit 1
}

SINGLE=$BASE
start "$SINGLE"
NODES=()
for i in 1 2 3; do
  p=$((BASE + i))
  start "$p" --cluster-enabled yes --cluster-config-file "$DIR/$p/nodes.conf"
  NODES+=("127.0.0.1:$p")
done
redis-cli --cluster create "${NODES[@]}" --cluster-replicas 0 --cluster-yes >/dev/null
for _ in $(seq 100); do
  redis-cli -p "$((BASE + 1))" cluster info | grep -q cluster_state:ok && break
  sleep 0.1
done
redis-cli -p "$((BASE + 1))" cluster info | grep -q cluster_state:ok

export TENSORPOOL_REDIS_URL="redis://127.0.0.1:$SINGLE/"
export TENSORPOOL_REDIS_CLUSTER_URLS
TENSORPOOL_REDIS_CLUSTER_URLS=$(printf 'redis://%s/,' "${NODES[@]}")
TENSORPOOL_REDIS_CLUSTER_URLS=${TENSORPOOL_REDIS_CLUSTER_URLS%,}
cargo test --features remote --test remote_ids --test remote_memory --test remote_redis --test remote_rss --test remote_conformance
cargo clippy --features remote --all-targets -- -D warnings
