/* Shared helpers for the LD_PRELOAD comparison programs (ci/preload.sh). */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static inline uint64_t rng_next(uint64_t *s) {
    /* xorshift64*: deterministic, no allocation. */
    uint64_t x = *s;
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    *s = x;
    return x * 0x2545F4914F6CDD1DULL;
}

/* A size log-uniform in [lo, hi]. */
static inline size_t log_uniform(uint64_t *s, size_t lo, size_t hi) {
    int lo_bits = 63 - __builtin_clzll(lo), hi_bits = 63 - __builtin_clzll(hi);
    int b = lo_bits + (int)(rng_next(s) % (uint64_t)(hi_bits - lo_bits + 1));
    size_t base = (size_t)1 << b;
    size_t sz = base + (size_t)(rng_next(s) % base);
    return sz < lo ? lo : sz > hi ? hi : sz;
}

static inline double now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec * 1e9 + (double)t.tv_nsec;
}

/* VmHWM in KiB, read without stdio buffers of the allocator under test. */
static inline long vm_hwm_kib(void) {
    char buf[4096];
    int fd = open("/proc/self/status", O_RDONLY);
    if (fd < 0) return -1;
    ssize_t n = read(fd, buf, sizeof buf - 1);
    close(fd);
    if (n <= 0) return -1;
    buf[n] = 0;
    char *p = strstr(buf, "VmHWM:");
    return p ? strtol(p + 6, NULL, 10) : -1;
}

static inline void report(const char *what, double value, const char *unit) {
    printf("%s %.3f %s\n", what, value, unit);
    printf("peak_rss_kib %ld\n", vm_hwm_kib());
}
