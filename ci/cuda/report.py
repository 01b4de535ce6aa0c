#!/usr/bin/env python3
"""Merges ci/gpu.sh's pieces into results.json and results.md.

    report.py OUT_DIR

Reads OUT_DIR/{info.json, tests.log, memset.log, bench.json, torch.json,
predict.json} (each optional) and writes OUT_DIR/results.json and
OUT_DIR/results.md, with the issue's goals marked met or missed.
"""
import json
import os
import re
import sys


def read(d, name, parse=json.loads):
    p = os.path.join(d, name)
    if not os.path.exists(p):
        return None
    with open(p) as f:
        text = f.read()
    try:
        return parse(text)
    except Exception as e:  # a broken piece is reported, not fatal
        return {"error": f"{name}: {e}", "text": text[-2000:]}


def mib(n):
    return f"{n / (1 << 20):.1f} MiB"


def size_name(n):
    for unit, s in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= s:
            return f"{n // s} {unit}"
    return f"{n} B"


def main():
    d = sys.argv[1]
    info = read(d, "info.json")
    tests = read(d, "tests.log", lambda t: t)
    memset = read(d, "memset.log", lambda t: t)
    bench = read(d, "bench.json")
    torch = read(d, "torch.json")
    predict = read(d, "predict.json")
    res = {"info": info, "bench": bench, "torch": torch, "predict": predict}
    md = ["# tensorpool CUDA pool on a GPU (ci/gpu.sh)", ""]
    if info:
        md += [f"- device: {info.get('gpu', 'none')}", f"- driver: {info.get('driver', '-')}", f"- date: {info.get('date', '-')}", ""]
    if tests is not None:
        m = re.findall(r"test result: (\w+)\. (\d+) passed; (\d+) failed", tests)
        res["tests"] = [{"result": r, "passed": int(p), "failed": int(f)} for r, p, f in m]
        md += ["## GPU tests", "", "```", *[l for l in tests.splitlines() if l.startswith("test ")], "```", ""]
    if memset is not None:
        md += ["## cudarc memset example", "", "```", memset.strip()[-500:], "```", ""]
    goals = []
    if bench and "costs_ns_p50_p99" in bench:
        tcost = {r["size"]: r["torch_empty_del"] for r in (torch or {}).get("costs_ns_p50_p99", [])}
        cols = ["pool_hit", "pool_miss", "cuMemAlloc", "cuMemAllocAsync_threshold0", "cuMemAllocAsync_thresholdMax", "cudarc_alloc"]
        md += ["## Host-side cost per alloc+free, ns (p50 / p99)", "",
               "| size | " + " | ".join(cols) + " | torch.empty+del (Python) |",
               "|---|" + "---|" * (len(cols) + 1)]
        for r in bench["costs_ns_p50_p99"]:
            t = tcost.get(r["size"])
            tc = f"{t[0]} / {t[1]}" if t else "-"
            cells = " | ".join(f"{r[c][0]} / {r[c][1]}" for c in cols)
            md.append(f"| {size_name(r['size'])} | {cells} | {tc} |")
        hits = [r["pool_hit"][0] for r in bench["costs_ns_p50_p99"]]
        ratio = min(r["cuMemAllocAsync_threshold0"][0] / max(r["pool_hit"][0], 1) for r in bench["costs_ns_p50_p99"])
        goals.append(("pool hit p50 ≤ 100 ns at every size", max(hits) <= 100, f"max p50 {max(hits)} ns"))
        goals.append(("pool hit ≥ 10× cuMemAllocAsync (threshold 0)", ratio >= 10, f"smallest ratio {ratio:.1f}×"))
        md.append("")
    if bench and "replay" in bench:
        md += ["## Trace replay: pool vs PyTorch's caching allocator", "",
               "| trace | ops | pool ns/op | torch ns/op (Python) | pool peak reserved | pool reserved ÷ allocated | torch peak reserved | torch reserved ÷ allocated | meta prediction = pool |",
               "|---|---|---|---|---|---|---|---|---|"]
        for name, r in bench["replay"].items():
            t = (torch or {}).get("replay", {}).get(name)
            pr = r["peak_reserved"] / max(r["peak_allocated"], 1)
            tr = t["peak_reserved"] / max(t["peak_allocated"], 1) if t else None
            tns = f"{t['ns_per_op']:.0f}" if t else "-"
            tres = mib(t["peak_reserved"]) if t else "-"
            trat = f"{tr:.3f}" if t else "-"
            same = "yes" if r["predicted_peak_reserved"] == r["peak_reserved"] else "no"
            md.append(f"| {name} | {r['ops']} | {r['ns_per_op']:.0f} | {tns} | {mib(r['peak_reserved'])} | {pr:.3f} | {tres} | {trat} | {same} |")
            if t:
                goals.append((f"{name}: fragmentation no worse than PyTorch", pr <= tr + 1e-9, f"{pr:.3f} vs {tr:.3f}"))
        md.append("")
    if predict:
        md += ["## Meta-model prediction (no GPU needed)", "", "```", json.dumps(predict), "```", ""]
    if goals:
        md += ["## Goals", "", "| goal | met | figures |", "|---|---|---|"]
        md += [f"| {g} | {'yes' if ok else 'no'} | {fig} |" for g, ok, fig in goals]
        res["goals"] = [{"goal": g, "met": ok, "figures": fig} for g, ok, fig in goals]
    with open(os.path.join(d, "results.json"), "w") as f:
        json.dump(res, f, indent=1)
    with open(os.path.join(d, "results.md"), "w") as f:
        f.write("\n".join(md) + "\n")
    print(f"wrote {d}/results.json and {d}/results.md")


if __name__ == "__main__":
    main()
