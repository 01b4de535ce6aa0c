/* Baseline footprint: a program that allocates little. Keeps 100 blocks of
 * 24 B - 1 KiB, replaces them 10,000 times; with an argument N > 0, N threads
 * do 1,000 malloc/free pairs each as well. Reports VmHWM. */
#include "common.h"
#include <pthread.h>

static void *worker(void *arg) {
    uint64_t s = (uint64_t)(uintptr_t)arg * 7919 + 1;
    for (int i = 0; i < 1000; i++) {
        char *p = malloc(log_uniform(&s, 16, 512));
        p[0] = 1;
        free(p);
    }
    return NULL;
}

int main(int argc, char **argv) {
    int threads = argc > 1 ? atoi(argv[1]) : 0;
    uint64_t s = 42;
    char *live[100] = {0};
    double t0 = now_ns();
    for (int i = 0; i < 10000; i++) {
        int k = (int)(rng_next(&s) % 100);
        free(live[k]);
        size_t sz = log_uniform(&s, 24, 1024);
        live[k] = malloc(sz);
        memset(live[k], 1, sz);
    }
    pthread_t t[64];
    if (threads > 64) threads = 64;
    for (int i = 0; i < threads; i++) pthread_create(&t[i], NULL, worker, (void *)(uintptr_t)(i + 1));
    for (int i = 0; i < threads; i++) pthread_join(t[i], NULL);
    for (int k = 0; k < 100; k++) free(live[k]);
    report("time_us", (now_ns() - t0) / 1e3, "us");
    return 0;
}
