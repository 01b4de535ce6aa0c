#!/usr/bin/env python3
"""PyTorch's caching allocator on the same traces and sizes as cuda_bench.

    torch_replay.py TRACE_DIR OUT.json     # on a GPU, with PyTorch
    torch_replay.py --check TRACE_DIR      # parse the traces only (no torch)

Replays every `*.trace` in TRACE_DIR (`a ID SIZE` allocates with
torch.empty(SIZE, dtype=torch.uint8, device="cuda"), `f ID` deletes; the
text format is documented in examples/cuda_bench.rs, which also exports the
committed binary traces to it) and
reads torch.cuda.memory_stats(); then times torch.empty + del per size
(Python overhead included: this is what a PyTorch user pays per tensor).
"""
import json
import os
import sys
import time

SIZES = [512, 4 << 10, 64 << 10, 1 << 20, 16 << 20, 256 << 20, 1 << 30]


def load(path):
    ops = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            p = line.split()
            if len(p) == 3 and p[0] == "a":
                ops.append((True, int(p[1]), int(p[2])))
            elif len(p) == 2 and p[0] == "f":
                ops.append((False, int(p[1]), 0))
            else:
                raise ValueError(f"{path}:{n}: bad line {line!r}")
    return ops


def traces(d):
    names = sorted(f for f in os.listdir(d) if f.endswith(".trace"))
    if not names:
        raise SystemExit(f"no *.trace files in {d}")
    return {f[: -len(".trace")]: load(os.path.join(d, f)) for f in names}


def replay(torch, ops):
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    live = {}
    t0 = time.perf_counter_ns()
    for alloc, i, n in ops:
        if alloc:
            live[i] = torch.empty(n, dtype=torch.uint8, device="cuda")
        else:
            live.pop(i, None)
    dt = time.perf_counter_ns() - t0
    s = torch.cuda.memory_stats()
    live.clear()
    torch.cuda.empty_cache()
    return {
        "ops": len(ops),
        "ns_per_op": dt / len(ops),
        "peak_reserved": s["reserved_bytes.all.peak"],
        "peak_allocated": s["allocated_bytes.all.peak"],
        "num_alloc_retries": s["num_alloc_retries"],
    }


def costs(torch):
    rows = []
    for size in SIZES:
        n = 50 if size >= 256 << 20 else 2000
        x = torch.empty(size, dtype=torch.uint8, device="cuda")
        del x
        v = []
        for _ in range(n):
            t = time.perf_counter_ns()
            x = torch.empty(size, dtype=torch.uint8, device="cuda")
            del x
            v.append(time.perf_counter_ns() - t)
        v.sort()
        rows.append({"size": size, "torch_empty_del": [v[len(v) // 2], v[int(round((len(v) - 1) * 0.99))]]})
    return rows


def main():
    if len(sys.argv) == 3 and sys.argv[1] == "--check":
        t = traces(sys.argv[2])
        print(json.dumps({k: len(v) for k, v in t.items()}))
        return
    if len(sys.argv) != 3:
        raise SystemExit(__doc__)
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("torch_replay.py: torch.cuda.is_available() is False")
    out = {
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name(0),
        "replay": {k: replay(torch, v) for k, v in traces(sys.argv[1]).items()},
        "costs_ns_p50_p99": costs(torch),
    }
    with open(sys.argv[2], "w") as f:
        json.dump(out, f, indent=1)
    print(f"wrote {sys.argv[2]}")


if __name__ == "__main__":
    main()
