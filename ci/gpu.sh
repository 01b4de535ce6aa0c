#!/usr/bin/env bash
# The CUDA pool on a real GPU (H100/H200), in at most 8 minutes, with
# results as JSON and markdown. The GPU machine needs no Rust and no
# network: build the binaries where Rust is, carry them, run them there.
#
#   bash ci/gpu.sh --build DIR        # here: build and copy the binaries to DIR
#   bash ci/gpu.sh --bin DIR [--out OUT]   # on the GPU machine
#   bash ci/gpu.sh --dry-run [--bin DIR]   # anywhere: the non-GPU parts
#
# DIR holds cuda_gpu (the #[ignore]d GPU tests), cuda_memset and cuda_bench,
# and traces/: the committed traces (tests/data/*.tpt.gz) exported to the
# text format both replayers read (`a ID SIZE` / `f ID`, documented in
# examples/cuda_bench.rs). Every *.trace there is replayed beside the
# synthetic ones, on the pool and on PyTorch's caching allocator.
# Every GPU step has a timeout; together they bound the run at 8 minutes
# (120 + 30 + 200 + 30 + 100 s).
# OUT (default gpu-results/) gets info.json, tests.log, memset.log,
# bench.json, torch.json, predict.json and the merged results.json/.md.
set -uo pipefail
cd "$(dirname "$0")/.."

mode=run bin="" out="gpu-results"
# The committed traces replayed on the GPU (about 470,000 ops in all).
committed="tests/data/candle.tpt.gz tests/data/python.tpt.gz tests/data/python-malloc.tpt.gz"
while [ $# -gt 0 ]; do
  case "$1" in
    --build) mode=build; bin="${2:?--build DIR}"; shift 2 ;;
    --bin) bin="${2:?--bin DIR}"; shift 2 ;;
    --out) out="${2:?--out DIR}"; shift 2 ;;
    --dry-run) mode=dry; shift ;;
    *) echo "gpu.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done

if [ "$mode" = build ]; then
  set -e
  mkdir -p "$bin"
  cargo build --release --features cuda --example cuda_bench --example cuda_memset
  cp target/release/examples/cuda_bench target/release/examples/cuda_memset "$bin"/
  test_bin=$(cargo test --release --features cuda,testkit --test cuda_gpu --no-run --message-format=json 2>/dev/null \
    | python3 -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == "cuda_gpu" and m.get("executable"):
        print(m["executable"])')
  cp "$test_bin" "$bin/cuda_gpu"
  "$bin/cuda_bench" export "$bin/traces" $committed
  echo "built into $bin: $(ls "$bin" | tr '\n' ' ')"
  exit 0
fi

mkdir -p "$out"
missing=0
for f in cuda_gpu cuda_memset cuda_bench; do
  if [ -n "$bin" ] && [ ! -x "$bin/$f" ]; then echo "missing binary: $bin/$f" >&2; missing=1; fi
done
for f in ci/cuda/torch_replay.py ci/cuda/report.py; do
  [ -f "$f" ] || { echo "missing script: $f" >&2; missing=1; }
done
command -v python3 >/dev/null || { echo "python3 not found" >&2; missing=1; }
python3 -m py_compile ci/cuda/torch_replay.py ci/cuda/report.py || missing=1
[ "$missing" = 0 ] || exit 1

gpu=""
if command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; then
  gpu=$(nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | head -1)
  driver=$(nvidia-smi --query-gpu=driver_version --format=csv,noheader | head -1)
fi
printf '{"gpu": "%s", "driver": "%s", "date": "%s"}\n' "${gpu:-none}" "${driver:-none}" \
  "$(date -u +%Y-%m-%dT%H:%M:%SZ)" > "$out/info.json"

bench="${bin:+$bin/cuda_bench}"
if [ -z "$bench" ] && [ -x target/release/examples/cuda_bench ]; then bench=target/release/examples/cuda_bench; fi
if [ -z "$bench" ] && [ -x target/debug/examples/cuda_bench ]; then bench=target/debug/examples/cuda_bench; fi

# The committed traces: carried in DIR/traces, or exported here.
mkdir -p "$out/traces"
if [ -n "$bin" ] && ls "$bin"/traces/*.trace >/dev/null 2>&1; then
  cp "$bin"/traces/*.trace "$out/traces/"
elif [ -n "$bench" ] && [ -f tests/data/candle.tpt.gz ]; then
  # shellcheck disable=SC2086 # a list of paths without spaces
  timeout 60 "$bench" export "$out/traces" $committed || echo "trace export failed" >&2
else
  echo "no committed traces to replay (build with: bash ci/gpu.sh --build DIR)" >&2
fi

if [ "$mode" = dry ] || [ -z "$gpu" ]; then
  echo "no GPU: running the non-GPU parts only"
  if [ -n "$bench" ]; then
    timeout 120 "$bench" predict "$out/traces" | tail -1 > "$out/predict.json"
    timeout 60 python3 ci/cuda/torch_replay.py --check "$out/traces"
  else
    echo "no cuda_bench binary (build with: bash ci/gpu.sh --build DIR)"
  fi
  python3 ci/cuda/report.py "$out"
  echo "no GPU"
  exit 0
fi

[ -n "$bin" ] || { echo "gpu.sh: --bin DIR is required on the GPU machine" >&2; exit 2; }
echo "== device: $gpu, driver $driver"
echo "== GPU tests"
timeout 120 "$bin/cuda_gpu" --ignored --test-threads=1 2>&1 | tee "$out/tests.log"
echo "== cudarc memset example"
timeout 30 "$bin/cuda_memset" 2>&1 | tee "$out/memset.log"
echo "== bench (host-side costs, replay)"
timeout 200 "$bin/cuda_bench" gpu "$out/traces" "$out/bench.json"
timeout 30 "$bin/cuda_bench" predict "$out/traces" | tail -1 > "$out/predict.json"
echo "== PyTorch's caching allocator on the same traces"
timeout 100 python3 ci/cuda/torch_replay.py "$out/traces" "$out/torch.json"
python3 ci/cuda/report.py "$out"
cat "$out/results.md"
