#!/usr/bin/env bash
# Regenerates tests/data/python.tpt.gz and tests/data/python-malloc.tpt.gz:
# a Python program (a list of 100,000 dicts built, sorted and sent through
# a JSON round trip) run on libtensorpool.so (LD_PRELOAD) with
# TENSORPOOL_TRACE, so every malloc/free/realloc that reaches the C ABI is
# recorded. python.tpt.gz: Python's default allocator (pymalloc serves
# objects up to 512 B from its own arenas, so the trace holds the larger
# blocks: list storage, dict tables, strings, JSON buffers).
# python-malloc.tpt.gz: PYTHONMALLOC=malloc (every object through malloc;
# 3,000 dicts, to stay under 2 MiB compressed).
set -euo pipefail
cd "$(dirname "$0")/../.."
cargo build --release -p tensorpool-capi
lib="$PWD/target/release/libtensorpool.so"
prog='
import json, random, sys
random.seed(7)
n = int(sys.argv[1])
rows = [{"id": i, "name": "item-%d" % i, "score": random.random(), "tags": ["t%d" % (i % 7), "u%d" % (i % 11)]} for i in range(n)]
rows.sort(key=lambda r: (r["score"], r["name"]))
text = json.dumps(rows)
back = json.loads(text)
assert back == rows
print(n, len(text))
'
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
TENSORPOOL_TRACE="$tmp/python.tpt" LD_PRELOAD="$lib" python3 -c "$prog" 100000
PYTHONMALLOC=malloc TENSORPOOL_TRACE="$tmp/python-malloc.tpt" LD_PRELOAD="$lib" python3 -c "$prog" 3000
for t in python python-malloc; do
    gzip -9 -n -c "$tmp/$t.tpt" >"tests/data/$t.tpt.gz"
    echo "tests/data/$t.tpt.gz: $(wc -c <"tests/data/$t.tpt.gz") bytes ($(wc -c <"$tmp/$t.tpt") uncompressed)"
done
