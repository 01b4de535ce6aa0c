/* Frees what must not be freed; run preloaded with libtensorpool.so, each
 * mode must end in SIGABRT with tensorpool's message on stderr, and never
 * hand the pointer to the C library (which would read and munmap pool
 * memory, so that a live, unrelated block faults later).
 *
 *   invalid_free interior|interior-realloc|interior-usable|interior-big|double|ok
 *
 * "ok" exits 0: it checks that the modes below are what aborts. */
#include <malloc.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int main(int argc, char **argv) {
    const char *mode = argc > 1 ? argv[1] : "ok";
    char *keep = malloc(4096); /* a live neighbour that must stay intact */
    char *p = malloc(100);
    char *big = malloc(8 << 20);
    memset(keep, 0x5a, 4096);
    memset(p, 0, 100);
    memset(big, 0, 8 << 20);
    if (!strcmp(mode, "interior")) {
        free(p + 16);
    } else if (!strcmp(mode, "interior-realloc")) {
        p = realloc(p + 16, 1000);
    } else if (!strcmp(mode, "interior-usable")) {
        printf("%zu\n", malloc_usable_size(p + 16));
    } else if (!strcmp(mode, "interior-big")) {
        free(big + 4096);
    } else if (!strcmp(mode, "double")) {
        free(p);
        free(p);
    } else if (strcmp(mode, "ok")) {
        fprintf(stderr, "unknown mode %s\n", mode);
        return 2;
    }
    for (int i = 0; i < 4096; i++)
        if (keep[i] != 0x5a) {
            printf("neighbour corrupted\n");
            return 1;
        }
    free(keep);
    free(big);
    if (strcmp(mode, "double")) free(p);
    printf("returned normally\n");
    return 0;
}
