#!/usr/bin/env bash
# Builds candle-bench once per global allocator and runs the three candle CPU
# workloads under each, interleaved (the allocator order rotates every round),
# then prints a markdown table: median steps/s over the rounds, the ratio to
# glibc, and the median peak RSS (VmHWM) of the workload's own process.
#
# Every run rebuilds the tensorpool variant from the path dependency (../..),
# so a rerun after a merge measures the merged pool. candle itself is compiled
# once and shared by all four variants (one target dir; only this crate and
# its allocator differ between them).
#
# Environment (defaults in brackets):
#   ROUNDS [5]      interleaved rounds (one process per workload × allocator each)
#   REPS [7]        timed repetitions per process (the process reports their median)
#   WARMUP [2]      untimed repetitions per process
#   THREADS [2]     RAYON_NUM_THREADS and CANDLE_NUM_THREADS for every run
#   ALLOCS ["glibc mimalloc jemalloc tensorpool"]
#   WORKLOADS ["mlp-infer transformer mlp-train"]
#   SKIP_BUILD [0]  1: reuse the binaries under target/variants/
#   JOBS [2]        cargo build -j
#   REPORT_ONLY [0] 1: no build, no runs; print the table of the last run again
set -euo pipefail
cd "$(dirname "$0")"

ROUNDS=${ROUNDS:-5}
REPS=${REPS:-7}
WARMUP=${WARMUP:-2}
THREADS=${THREADS:-2}
ALLOCS=${ALLOCS:-"glibc mimalloc jemalloc tensorpool"}
WORKLOADS=${WORKLOADS:-"mlp-infer transformer mlp-train"}
SKIP_BUILD=${SKIP_BUILD:-0}
JOBS=${JOBS:-2}
REPORT_ONLY=${REPORT_ONLY:-0}

read -r -a allocs <<<"$ALLOCS"
read -r -a workloads <<<"$WORKLOADS"
variants=target/variants
mkdir -p "$variants"

raw=target/results.txt
head=target/results.head
if [ "$REPORT_ONLY" = 1 ]; then
    SKIP_BUILD=1 ROUNDS=0
fi

if [ "$SKIP_BUILD" != 1 ]; then
    for a in "${allocs[@]}"; do
        echo "building the $a variant" >&2
        nice -n 10 cargo build --release -j "$JOBS" --features "$a" --quiet
        cp target/release/candle-bench "$variants/candle-bench-$a"
    done
fi
for a in "${allocs[@]}"; do
    if [ "$REPORT_ONLY" != 1 ] && [ ! -x "$variants/candle-bench-$a" ]; then
        echo "run.sh: $variants/candle-bench-$a is missing (run without SKIP_BUILD=1)" >&2
        exit 1
    fi
done

export RAYON_NUM_THREADS=$THREADS CANDLE_NUM_THREADS=$THREADS
load_before=$(cut -d' ' -f1-3 /proc/loadavg)
n=${#allocs[@]}
[ "$REPORT_ONLY" = 1 ] || : >"$raw"
for ((r = 0; r < ROUNDS; r++)); do
    for w in "${workloads[@]}"; do
        for ((i = 0; i < n; i++)); do
            a=${allocs[$(((i + r) % n))]}
            line=$("$variants/candle-bench-$a" --workload "$w" --reps "$REPS" --warmup "$WARMUP")
            echo "round=$r $line" | tee -a "$raw" >&2
        done
    done
done
load_after=$(cut -d' ' -f1-3 /proc/loadavg)
if [ "$REPORT_ONLY" != 1 ]; then
    echo "candle 0.11.1 CPU, $THREADS threads (RAYON_NUM_THREADS=CANDLE_NUM_THREADS=$THREADS)," \
        "$ROUNDS interleaved rounds × $REPS timed reps; load average $load_before before," \
        "$load_after after ($(nproc) CPUs)" >"$head"
fi
if [ ! -s "$raw" ] || [ ! -f "$head" ]; then
    echo "run.sh: no results in $raw to report" >&2
    exit 1
fi

echo
cat "$head"
echo
# Median over rounds of each process's median steps/s (and the range of those
# medians), CPU ms per step, minor faults per step and peak RSS.
awk -v workloads="$WORKLOADS" -v allocs="$ALLOCS" '
function median(list,    v, k, i, j, t) {
    k = split(list, v, " ")
    for (i = 2; i <= k; i++) {
        t = v[i] + 0
        for (j = i - 1; j >= 1 && v[j] + 0 > t; j--) v[j + 1] = v[j]
        v[j + 1] = t
    }
    return k % 2 ? v[(k + 1) / 2] : (v[k / 2] + v[k / 2 + 1]) / 2
}
{
    delete f
    for (i = 1; i <= NF; i++) { split($i, kv, "="); f[kv[1]] = kv[2] }
    key = f["workload"] SUBSEP f["alloc"]
    rate[key] = rate[key] " " f["steps_per_s"]
    rss[key] = rss[key] " " f["peak_rss_kib"]
    cpu[key] = cpu[key] " " f["cpu_ms_per_step"]
    if (f["cpu_ms_per_step"] == "") { print "run.sh: no cpu_ms_per_step in: " $0 > "/dev/stderr"; exit 1 }
    flt[key] = flt[key] " " f["minflt_per_step"]
    if (f["pool_unmapped_kib_per_step"] != "") {
        pmaps[f["workload"]] = pmaps[f["workload"]] " " f["pool_maps_per_step"]
        punmap[f["workload"]] = punmap[f["workload"]] " " f["pool_unmapped_kib_per_step"]
        pmiss[f["workload"]] = pmiss[f["workload"]] " " f["pool_misses_per_step"]
        pres[f["workload"]] = pres[f["workload"]] " " f["pool_reserved_kib"]
    }
    if (!(key in lo) || f["steps_per_s"] + 0 < lo[key]) lo[key] = f["steps_per_s"] + 0
    if (!(key in hi) || f["steps_per_s"] + 0 > hi[key]) hi[key] = f["steps_per_s"] + 0
}
END {
    print "| workload | allocator | median steps/s | ÷ glibc | steps/s range | CPU ms/step | ÷ glibc (CPU) | minor faults/step | peak RSS MiB |"
    print "|---|---|---:|---:|---:|---:|---:|---:|---:|"
    nw = split(workloads, W, " "); na = split(allocs, A, " ")
    for (i = 1; i <= nw; i++) {
        base = ((W[i] SUBSEP "glibc") in rate) ? median(rate[W[i], "glibc"]) : 0
        cbase = base > 0 ? median(cpu[W[i], "glibc"]) : 0
        for (j = 1; j <= na; j++) {
            key = W[i] SUBSEP A[j]
            if (!(key in rate)) continue
            m = median(rate[key])
            ratio = base > 0 ? sprintf("%.2f×", m / base) : "-"
            c = median(cpu[key])
            cratio = cbase > 0 && c > 0 ? sprintf("%.2f×", cbase / c) : "-"
            printf "| %s | %s | %.2f | %s | %.2f–%.2f | %.1f | %s | %.0f | %.1f |\n", W[i], A[j], m, ratio,
                lo[key], hi[key], c, cratio, median(flt[key]), median(rss[key]) / 1024
        }
    }
    header = 0
    for (i = 1; i <= nw; i++) {
        if (!(W[i] in punmap)) continue
        if (!header) {
            print ""
            print "tensorpool counters during the timed steps (medians over rounds):"
            print ""
            print "| workload | maps/step | unmapped KiB/step | fresh blocks/step | reserved MiB at end |"
            print "|---|---:|---:|---:|---:|"
            header = 1
        }
        printf "| %s | %.2f | %.0f | %.1f | %.1f |\n", W[i], median(pmaps[W[i]]),
            median(punmap[W[i]]), median(pmiss[W[i]]), median(pres[W[i]]) / 1024
    }
}' "$raw"
