#!/usr/bin/env bash
# The pool under LD_PRELOAD against glibc, mimalloc, jemalloc and tcmalloc
# (Debian packages: libmimalloc2.0 libjemalloc2 libgoogle-perftools4): small C
# programs for the patterns of issue 8 that only a preloaded allocator sees —
# the baseline footprint of a program that allocates little (plain and with 4
# threads), small malloc/free pairs and a FIFO burst through the C ABI, and a
# server-style multi-threaded program with cross-thread frees. Each run is its
# own process (VmHWM is per process); allocators are interleaved, the order
# rotated each round; cells are medians over the rounds.
#
#   ci/preload.sh [ROUNDS]     # default 5; a manual measurement, not in CI
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
rounds=${1:-5}

cargo build --release -p tensorpool-capi >&2
lib="$root/target/release/libtensorpool.so"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
for p in footprint small server; do
    cc -O2 -pthread -o "$work/$p" "ci/preload/$p.c"
done

declare -A preload=([glibc]="" [tensorpool]="$lib")
libdir=/usr/lib/$(uname -m)-linux-gnu
for peer in mimalloc:libmimalloc.so.2 jemalloc:libjemalloc.so.2 tcmalloc:libtcmalloc_minimal.so.4; do
    name=${peer%%:*} so=$libdir/${peer#*:}
    if [[ -f $so ]]; then preload[$name]=$so; else echo "# $name: $so missing (apt-get install libmimalloc2.0 libjemalloc2 libgoogle-perftools4); skipped" >&2; fi
done
allocs=(glibc)
for a in mimalloc jemalloc tcmalloc tensorpool; do [[ -v preload[$a] ]] && allocs+=("$a"); done

programs=("footprint" "footprint 4" "small pairs 16" "small pairs 64" "small pairs 256" "small fifo" "server 4")
out="$work/results.tsv"
for ((r = 0; r < rounds; r++)); do
    n=${#allocs[@]}
    for ((i = 0; i < n; i++)); do
        a=${allocs[$(((i + r) % n))]}
        for prog in "${programs[@]}"; do
            # shellcheck disable=SC2086
            res=$(LD_PRELOAD="${preload[$a]}" "$work"/$prog)
            value=$(awk 'NR==1{print $2" "$3}' <<<"$res")
            rss=$(awk '/peak_rss_kib/{print $2}' <<<"$res")
            printf '%s\t%s\t%s\t%s\n' "$prog" "$a" "$value" "$rss" >>"$out"
        done
    done
done

python3 - "$out" "$(cat /proc/loadavg)" "${allocs[@]}" <<'PY'
import sys, statistics as st
path, load, allocs = sys.argv[1], sys.argv[2], sys.argv[3:]
rows = {}
for line in open(path):
    prog, alloc, value, rss = line.rstrip("\n").split("\t")
    v, unit = value.split()
    rows.setdefault(prog, {}).setdefault(alloc, []).append((float(v), int(rss), unit))
print(f"load average at the end: {load}\n")
print("| program | " + " | ".join(allocs) + " | best peer ÷ pool (time) | peak RSS MiB " + " / ".join(allocs) + " |")
print("|---|" + "---:|" * (len(allocs) + 2))
for prog, by in rows.items():
    med = {a: st.median(x[0] for x in by[a]) for a in allocs if a in by}
    rss = {a: st.median(x[1] for x in by[a]) / 1024 for a in allocs if a in by}
    unit = by[allocs[0]][0][2]
    peers = [med[a] for a in allocs if a != "tensorpool" and a in med]
    ratio = f"{min(peers) / med['tensorpool']:.2f}" if "tensorpool" in med and peers else ""
    print(f"| {prog} | " + " | ".join(f"{med[a]:.1f} {unit}" for a in allocs) + f" | {ratio} | " + " / ".join(f"{rss[a]:.2f}" for a in allocs) + " |")
PY
