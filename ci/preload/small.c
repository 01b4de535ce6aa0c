/* Small objects through malloc/free: "pairs SIZE" (malloc+free of one size,
 * ns per pair) or "fifo" (1,000 x 64 B allocated, then freed in order; ns per
 * block). */
#include "common.h"

int main(int argc, char **argv) {
    const char *mode = argc > 1 ? argv[1] : "pairs";
    size_t size = argc > 2 ? (size_t)atol(argv[2]) : 64;
    void *volatile sink;
    if (strcmp(mode, "fifo") == 0) {
        static void *blocks[1000];
        const int rounds = 20000;
        double t0 = now_ns();
        for (int r = 0; r < rounds; r++) {
            for (int i = 0; i < 1000; i++) blocks[i] = malloc(64);
            for (int i = 0; i < 1000; i++) free(blocks[i]);
        }
        report("ns_per_block", (now_ns() - t0) / (rounds * 1000.0), "ns");
        return 0;
    }
    const long n = 50 * 1000 * 1000;
    double t0 = now_ns();
    for (long i = 0; i < n; i++) {
        void *p = malloc(size);
        sink = p;
        free(p);
    }
    (void)sink;
    report("ns_per_pair", (now_ns() - t0) / (double)n, "ns");
    return 0;
}
