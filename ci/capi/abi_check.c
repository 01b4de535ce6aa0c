/* Exercises the C allocation ABI: every exported function, edge cases,
 * threads with cross-thread frees, and fork. Prints only deterministic
 * lines, so its output must be identical with and without LD_PRELOAD.
 * Exits non-zero on the first failed check. */
#define _GNU_SOURCE
#include <errno.h>
#include <malloc.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#define CHECK(c) do { if (!(c)) { fprintf(stderr, "abi_check: FAILED %s (line %d)\n", #c, __LINE__); exit(1); } } while (0)

static uint64_t rng = 88172645463325252ull;
static uint64_t next(void) { rng ^= rng << 13; rng ^= rng >> 7; rng ^= rng << 17; return rng; }

static void basics(void) {
    for (size_t n = 1; n < (1u << 27); n = n * 3 + 1) {
        unsigned char *p = malloc(n);
        CHECK(p && (n < 16 || (uintptr_t)p % 16 == 0));
        CHECK(malloc_usable_size(p) >= n);
        memset(p, 0xAB, n);
        unsigned char *q = realloc(p, n * 2);
        CHECK(q && q[0] == 0xAB && q[n - 1] == 0xAB);
        q = realloc(q, n / 2 + 1);
        CHECK(q && q[n / 2] == 0xAB);
        free(q);
        unsigned char *z = calloc(n, 1);
        CHECK(z);
        for (size_t i = 0; i < n; i += 4093) CHECK(z[i] == 0);
        CHECK(z[n - 1] == 0);
        free(z);
    }
    for (size_t a = 1; a <= (1u << 20); a <<= 1) {
        void *p = NULL;
        if (a >= sizeof(void *)) {
            CHECK(posix_memalign(&p, a, 100) == 0 && (uintptr_t)p % a == 0);
            free(p);
        }
        p = aligned_alloc(a, 3 * a);
        CHECK(p && (uintptr_t)p % a == 0);
        memset(p, 1, 3 * a);
        p = realloc(p, 5 * a);
        CHECK(p && ((unsigned char *)p)[3 * a - 1] == 1);
        free(p);
        p = memalign(a, 10);
        CHECK(p && (uintptr_t)p % a == 0 && malloc_usable_size(p) >= 10);
        free(p);
    }
    void *p = valloc(100);
    CHECK(p && (uintptr_t)p % 4096 == 0);
    free(p);
    p = pvalloc(5000);
    CHECK(p && (uintptr_t)p % 4096 == 0 && malloc_usable_size(p) >= 8192);
    free(p);
    void *dummy = (void *)1;
    CHECK(posix_memalign(&dummy, 3, 10) == EINVAL && dummy == (void *)1);
    errno = 0;
    CHECK(calloc(SIZE_MAX / 2, 3) == NULL && errno == ENOMEM);
    errno = 0;
    CHECK(malloc(SIZE_MAX - 4096) == NULL && errno == ENOMEM);
    p = malloc(10);
    errno = 0;
    CHECK(realloc(p, SIZE_MAX - 4096) == NULL && errno == ENOMEM);
    free(p);
    CHECK(malloc_usable_size(NULL) == 0);
    free(NULL);
    p = malloc(0);
    CHECK(p != NULL);
    free(p);
    p = reallocarray(NULL, 10, 10);
    CHECK(p);
    p = reallocarray(p, 1000, 10);
    CHECK(p);
    free(p);
    puts("basics ok");
}

#define THREADS 4
#define SLOTS 4096
static void *volatile shared[SLOTS];

static void *worker(void *arg) {
    uint64_t s = (uintptr_t)arg * 0x9E3779B97F4A7C15ull + 1;
    for (int i = 0; i < 400000; i++) {
        s ^= s << 13; s ^= s >> 7; s ^= s << 17;
        size_t slot = s % SLOTS;
        size_t n = 1 + (s >> 20) % ((s & 1) ? 256 : 70000);
        unsigned char *p = malloc(n);
        CHECK(p);
        p[0] = (unsigned char)n; p[n - 1] = (unsigned char)n;
        void *old = __atomic_exchange_n(&shared[slot], p, __ATOMIC_ACQ_REL);
        free(old); /* often another thread's block */
    }
    return NULL;
}

static void threads(void) {
    pthread_t t[THREADS];
    for (long i = 0; i < THREADS; i++) CHECK(pthread_create(&t[i], NULL, worker, (void *)i) == 0);
    for (int i = 0; i < THREADS; i++) CHECK(pthread_join(t[i], NULL) == 0);
    for (int i = 0; i < SLOTS; i++) free(shared[i]);
    puts("threads ok");
}

static void forked(void) {
    pid_t pid = fork();
    CHECK(pid >= 0);
    if (pid == 0) {
        for (int i = 0; i < 1000; i++) {
            char *p = malloc(1 + next() % 100000);
            CHECK(p);
            free(p);
        }
        _exit(0);
    }
    int st = 0;
    CHECK(waitpid(pid, &st, 0) == pid && WIFEXITED(st) && WEXITSTATUS(st) == 0);
    puts("fork ok");
}

int main(void) {
    basics();
    threads();
    forked();
    return 0;
}
