#!/usr/bin/env bash
# Builds libtensorpool.so (release) and runs real programs with and without
# LD_PRELOAD; their outputs must be identical. Checks that invalid frees of
# pool memory abort and that malloc_trim and the TENSORPOOL_RETAIN_LIMIT /
# TENSORPOOL_RETURN_ABOVE settings give memory back. Also proves the library was
# really used (the pool's statistics line, and malloc_usable_size answering
# with the pool's class size), and reports malloc+free cost.
#
#   ci/capi.sh            # build + checks
#   ci/capi.sh --tls      # also: nightly build with -Z tls-model=initial-exec,
#                         # to compare the cdylib's TLS cost (needs nightly)
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)

cargo build --release -p tensorpool-capi
lib="$root/target/release/libtensorpool.so"
test -f "$lib"

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
fail=0

# run NAME CMD...: runs CMD plain and preloaded in $work, compares stdout+status.
run() {
    local name=$1; shift
    local plain_rc=0 pre_rc=0
    (cd "$work" && "$@") >"$work/$name.plain" 2>"$work/$name.plain.err" || plain_rc=$?
    (cd "$work" && LD_PRELOAD="$lib" "$@") >"$work/$name.pre" 2>"$work/$name.pre.err" || pre_rc=$?
    if [[ $plain_rc -ne $pre_rc ]]; then
        echo "FAIL $name: exit $plain_rc without, $pre_rc with LD_PRELOAD"; sed 's/^/  /' "$work/$name.pre.err" | tail -5
        fail=1
    elif ! cmp -s "$work/$name.plain" "$work/$name.pre"; then
        echo "FAIL $name: output differs"; diff "$work/$name.plain" "$work/$name.pre" | head -10
        fail=1
    else
        echo "ok   $name ($(wc -c <"$work/$name.pre") bytes of identical output, exit $pre_rc)"
    fi
}

# 1. Python doing real work: sorting a million items, JSON round trips, hashing.
run python python3 -c '
import hashlib, json, random
random.seed(42)
xs = [random.random() for _ in range(1_000_000)]
xs.sort()
words = ["w%d" % random.randrange(50_000) for _ in range(300_000)]
counts = {}
for w in words:
    counts[w] = counts.get(w, 0) + 1
doc = {"sorted_head": xs[:5], "counts": sorted(counts.items())[:1000], "nested": [{"i": i, "s": str(i) * (i % 20)} for i in range(50_000)]}
for _ in range(3):
    doc = json.loads(json.dumps(doc))
big = bytearray(64 << 20)
big[::4096] = b"x" * len(big[::4096])
print(hashlib.sha256(json.dumps(doc).encode()).hexdigest(), len(counts), xs[0] <= xs[-1], sum(big) // 120)
'

# 2. sort(1) of a generated file (500,000 lines), numeric and plain.
awk 'BEGIN { srand(7); for (i = 0; i < 500000; i++) printf "%d line-%x %s\n", int(rand() * 1e9), i, substr("abcdefghijklmnopqrstuvwxyz", 1 + i % 26) }' >"$work/input.txt"
run sort sort -n "$work/input.txt"
run sort-k2 sort -k2,2 -S 64M "$work/input.txt"

# 3. git on a throw-away repository (fixed identities and dates: stable hashes).
export GIT_AUTHOR_NAME=ci GIT_AUTHOR_EMAIL=ci@example.com GIT_COMMITTER_NAME=ci GIT_COMMITTER_EMAIL=ci@example.com
export GIT_AUTHOR_DATE="2026-01-01T00:00:00Z" GIT_COMMITTER_DATE="2026-01-01T00:00:00Z"
git_work() {
    local d
    d=$(mktemp -d "$work/repo.XXXX")
    cd "$d"
    git init -q -b main .
    for i in $(seq 1 30); do
        seq "$i" 3000 >"file$((i % 7)).txt"
        git add -A && git commit -qm "commit $i"
    done
    git log --stat --format='%H %s' | head -200
    git gc -q && git fsck -q && git rev-list --count HEAD
    git diff HEAD~10 --stat | tail -3
    cd / && rm -rf "$d"
}
export -f git_work
run git bash -c git_work

# 4. gcc compiling a C program; then that program (the ABI checks) run both ways.
run gcc bash -c "gcc -O2 -Wno-alloc-size-larger-than -pthread -o cc.out '$root/ci/capi/abi_check.c' && sha256sum <cc.out && rm cc.out"
gcc -O2 -Wno-alloc-size-larger-than -pthread -o "$work/abi_check" "$root/ci/capi/abi_check.c"
run abi_check "$work/abi_check"

# 5. tar + xz round trip of the sources.
run tar bash -c "tar -cf - -C '$root' --sort=name --mtime=2026-01-01 --owner=0 --group=0 src capi ci | xz -T1 -6 | xz -d | sha256sum"

# The library was really used: the pool reports its mappings at exit, and
# malloc_usable_size(malloc(1000)) is the pool's class (1024), not glibc's 1000.
stats=$(LD_PRELOAD="$lib" TENSORPOOL_CAPI_STATS=1 python3 -c 'pass' 2>&1 >/dev/null | tail -1)
echo "     $stats"
if [[ ! $stats =~ reserved_bytes=[1-9] ]]; then echo "FAIL the pool was not used"; fail=1; fi
usable=$(LD_PRELOAD="$lib" python3 -c 'import ctypes; c = ctypes.CDLL(None); c.malloc.restype = ctypes.c_void_p; c.malloc_usable_size.argtypes = [ctypes.c_void_p]; print(c.malloc_usable_size(c.malloc(1000)))')
plain=$(python3 -c 'import ctypes; c = ctypes.CDLL(None); c.malloc.restype = ctypes.c_void_p; c.malloc_usable_size.argtypes = [ctypes.c_void_p]; print(c.malloc_usable_size(c.malloc(1000)))')
echo "     malloc_usable_size(malloc(1000)): $usable preloaded, $plain with glibc"
if [[ $usable != 1024 ]]; then echo "FAIL malloc is not the pool's"; fail=1; fi

# 6. A pointer inside pool memory that starts no live block never reaches the
# C library: SIGABRT with tensorpool's message, as glibc would abort.
gcc -O2 -Wno-free-nonheap-object -o "$work/invalid_free" "$root/ci/capi/invalid_free.c"
expect_abort() {
    local mode=$1 msg=$2 rc=0
    # An inner shell reports the abort (to /dev/null), not this one.
    bash -c 'LD_PRELOAD="$1" "$2" "$3" >/dev/null 2>"$4"; exit $?' _ \
        "$lib" "$work/invalid_free" "$mode" "$work/if.err" 2>/dev/null || rc=$?
    if [[ $rc -eq 134 ]] && grep -q "^tensorpool: $msg" "$work/if.err"; then
        echo "ok   $mode: SIGABRT, \"$(head -1 "$work/if.err")\""
    else
        echo "FAIL $mode: exit $rc, stderr: $(head -c 300 "$work/if.err")"; fail=1
    fi
}
LD_PRELOAD="$lib" "$work/invalid_free" ok >/dev/null || { echo "FAIL invalid_free ok"; fail=1; }
expect_abort interior 'free(): invalid pointer'
expect_abort interior-big 'free(): invalid pointer'
expect_abort interior-realloc 'realloc(): invalid pointer'
expect_abort interior-usable 'malloc_usable_size(): invalid pointer'
# Double-free detection is the pool's (AllocError::DoubleFree); once the
# pool has it, a C double free must abort with its message.
if grep -q 'DoubleFree' "$root/src/error.rs"; then
    expect_abort double 'free(): double free detected'
fi

# 7. Memory comes back: eight freed buffers of 70-300 MiB and malloc_trim(0),
# or the environment policies without it (RSS measured in the child).
gcc -O2 -o "$work/trim" "$root/ci/capi/trim.c"
run trim "$work/trim"
for env in TENSORPOOL_RETURN_ABOVE=64M TENSORPOOL_RETAIN_LIMIT=32M; do
    if out=$(env "$env" LD_PRELOAD="$lib" "$work/trim" no-trim); then
        echo "ok   trim, $env, no malloc_trim: $out"
    else
        echo "FAIL $env: $out"; fail=1
    fi
done
bad=$(TENSORPOOL_RETAIN_LIMIT=lots LD_PRELOAD="$lib" /bin/true 2>&1)
if [[ $bad != *"ignoring TENSORPOOL_RETAIN_LIMIT=lots"* ]]; then echo "FAIL bad setting not reported: $bad"; fail=1; fi

# malloc+free cost (information only, never a failure).
gcc -O2 -o "$work/bench" "$root/ci/capi/bench.c"
echo "     malloc+free 64 B: glibc $("$work/bench" 64) ns, libtensorpool.so $(LD_PRELOAD="$lib" "$work/bench" 64) ns"
if [[ ${1:-} == --tls ]]; then
    CARGO_TARGET_DIR="$root/target/tls-ie" RUSTFLAGS="-Z tls-model=initial-exec" cargo +nightly build --release -p tensorpool-capi
    echo "     malloc+free 64 B, initial-exec TLS (nightly): $(LD_PRELOAD="$root/target/tls-ie/release/libtensorpool.so" "$work/bench" 64) ns"
fi

if [[ $fail -ne 0 ]]; then echo "capi: FAILED"; exit 1; fi
echo "capi: all programs match"
