/* malloc+free pairs through whatever malloc is loaded: best of 5 runs of
 * 20M pairs, in ns per pair. Used by ci/capi.sh to measure the cost of the
 * cdylib's TLS model. */
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1e9 + t.tv_nsec;
}

int main(int argc, char **argv) {
    size_t size = argc > 1 ? (size_t)atol(argv[1]) : 64;
    const long n = 20000000;
    double best = 1e18;
    for (int r = 0; r < 5; r++) {
        double t0 = now();
        for (long i = 0; i < n; i++) {
            void *volatile p = malloc(size);
            free(p);
        }
        double d = (now() - t0) / n;
        if (d < best) best = d;
    }
    printf("%.2f\n", best);
    return 0;
}
