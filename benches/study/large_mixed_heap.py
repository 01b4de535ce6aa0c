#!/usr/bin/env python3
"""How often must an ideal heap move pages on `large-mixed-20x5-25MiB`?

The program of `examples/compare`'s workload (20 live blocks of 5-25 MiB,
100 random replacements per unit, splitmix64 seed 7: the same sequence as
`Program::replace` in `benches/common/workload.rs`), repeated, on an ideal
heap: address-ordered best fit over free ranges that are joined with their
free neighbours at once. When no free range fits, the heap maps a fresh
range while it is below `cap` x the peak live bytes, else it moves free
ranges (largest first) together into one block: a "gather" of one "move"
per range. Counts are per replacement over rounds 6-30 (the steady state).

    python3 benches/study/large_mixed_heap.py [classes|64k]

`classes` rounds sizes as the pool's one-block classes do (8 classes per
power of two, spans in whole 2 MiB pages); `64k` only to 64 KiB.
Used for the README's issue 8 round 7 section.
"""
import bisect
import sys

M = 1 << 20
MASK = (1 << 64) - 1


class SplitMix64:
    def __init__(self, seed):
        self.x = seed

    def next(self):
        self.x = (self.x + 0x9E3779B97F4A7C15) & MASK
        z = self.x
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK
        return z ^ (z >> 31)


def class_span(size):
    step = 1 << (size.bit_length() - 1 - 3)
    c = -(-size // step) * step
    return -(-c // (2 * M)) * 2 * M


def granule_span(size):
    return -(-size // (64 << 10)) * (64 << 10)


def program(live=20, steps=100, lo=5 * M, hi=25 * M, seed=7):
    r = SplitMix64(seed)
    size = lambda: lo + r.next() % (hi - lo + 1)
    ops = [("alloc", i, size()) for i in range(live)]
    held, n = list(range(live)), live
    for _ in range(steps):
        i = r.next() % live
        ops += [("free", held[i]), ("alloc", n, size())]
        held[i], n = n, n + 1
    return ops + [("free", s) for s in held]


def run(span, cap, rounds=30, warm=5):
    ops = program()
    free = []  # sorted (start, len)
    blocks, top, reserved, live, peak_live, peak_reserved = {}, 0, 0, 0, 0, 0
    count = dict(allocs=0, fit=0, gathers=0, moves=0, fresh=0)

    def release(a, n):
        i = bisect.bisect(free, (a, 0))
        if i > 0 and free[i - 1][0] + free[i - 1][1] == a:
            a, n = free[i - 1][0], free[i - 1][1] + n
            free.pop(i - 1)
            i -= 1
        if i < len(free) and a + n == free[i][0]:
            n += free.pop(i)[1]
        free.insert(i, (a, n))

    for rnd in range(rounds):
        if rnd == warm:
            count = dict.fromkeys(count, 0)
        for op in ops:
            if op[0] == "free":
                a, n = blocks.pop(op[1])
                live -= n
                release(a, n)
                continue
            need = span(op[2])
            count["allocs"] += 1
            live += need
            peak_live = max(peak_live, live)
            fits = [(n, a, i) for i, (a, n) in enumerate(free) if n >= need]
            if fits:
                n, a, i = min(fits)
                free.pop(i)
                if n > need:
                    release(a + need, n - need)
                blocks[op[1]] = (a, need)
                count["fit"] += 1
                continue
            a, top = top, top + need + 64 * M  # nothing of ours next to it
            blocks[op[1]] = (a, need)
            if reserved + need <= cap * peak_live or sum(n for _, n in free) < need:
                reserved += need
                peak_reserved = max(peak_reserved, reserved)
                count["fresh"] += 1
                continue
            count["gathers"] += 1
            free.sort(key=lambda r: -r[1])
            got = 0
            while got < need:
                fa, fn = free.pop(0)
                k = min(fn, need - got)
                got += k
                count["moves"] += 1
                if fn > k:
                    free.append((fa + k, fn - k))
            free.sort()
    per = {k: v / count["allocs"] for k, v in count.items() if k != "allocs"}
    return per, peak_reserved / peak_live, peak_live


def main():
    span = granule_span if sys.argv[1:] == ["64k"] else class_span
    print("cap | peak reserved / peak live | fit | gathers | moves | fresh (per replacement)")
    for cap in [1.0, 1.1, 1.2, 1.22, 1.23, 1.24, 1.25, 1.3, 1.35, 1.4, 1.5]:
        per, ratio, peak_live = run(span, cap)
        print(f"{cap:.2f} | {ratio:.3f} ({ratio * peak_live / M:.0f} MiB) | "
              f"{per['fit']:.3f} | {per['gathers']:.3f} | {per['moves']:.3f} | {per['fresh']:.3f}")
    print(f"peak live {peak_live / M:.1f} MiB")


if __name__ == "__main__":
    main()
