/* A server-style multi-threaded program: T threads (default 4) each keep a
 * table of 4,096 blocks (16 B - 16 KiB log-uniform, 1 in 256 of 64 KiB -
 * 1 MiB) and replace a random one per operation; one block in 8 is handed to
 * the next thread, which frees it (cross-thread frees). ns per operation and
 * VmHWM. */
#include "common.h"
#include <pthread.h>

#define SLOTS 4096
#define OPS 1000000
#define INBOX 1024

struct inbox {
    pthread_mutex_t lock;
    void *items[INBOX];
    int n;
};

static int nthreads = 4;
static struct inbox boxes[64];

static void drain(struct inbox *b) {
    void *local[INBOX];
    pthread_mutex_lock(&b->lock);
    int n = b->n;
    memcpy(local, b->items, (size_t)n * sizeof(void *));
    b->n = 0;
    pthread_mutex_unlock(&b->lock);
    for (int i = 0; i < n; i++) free(local[i]);
}

static void *worker(void *arg) {
    int id = (int)(uintptr_t)arg;
    uint64_t s = (uint64_t)id * 104729 + 7;
    void **slots = calloc(SLOTS, sizeof(void *));
    struct inbox *next = &boxes[(id + 1) % nthreads];
    for (long op = 0; op < OPS; op++) {
        int k = (int)(rng_next(&s) % SLOTS);
        void *old = slots[k];
        if (old) {
            int handed = 0;
            if (rng_next(&s) % 8 == 0) {
                pthread_mutex_lock(&next->lock);
                if (next->n < INBOX) {
                    next->items[next->n++] = old;
                    handed = 1;
                }
                pthread_mutex_unlock(&next->lock);
            }
            if (!handed) free(old);
        }
        size_t sz = rng_next(&s) % 256 == 0 ? log_uniform(&s, 64 << 10, 1 << 20) : log_uniform(&s, 16, 16 << 10);
        char *p = malloc(sz);
        p[0] = 1;
        p[sz - 1] = 1;
        slots[k] = p;
        if ((op & 63) == 0) drain(&boxes[id]);
    }
    for (int k = 0; k < SLOTS; k++) free(slots[k]);
    free(slots);
    return NULL;
}

int main(int argc, char **argv) {
    if (argc > 1) nthreads = atoi(argv[1]);
    if (nthreads < 1 || nthreads > 64) nthreads = 4;
    for (int i = 0; i < nthreads; i++) pthread_mutex_init(&boxes[i].lock, NULL);
    pthread_t t[64];
    double t0 = now_ns();
    for (int i = 0; i < nthreads; i++) pthread_create(&t[i], NULL, worker, (void *)(uintptr_t)i);
    for (int i = 0; i < nthreads; i++) pthread_join(t[i], NULL);
    for (int i = 0; i < nthreads; i++) drain(&boxes[i]);
    report("ns_per_op", (now_ns() - t0) / ((double)OPS * nthreads), "ns");
    return 0;
}
