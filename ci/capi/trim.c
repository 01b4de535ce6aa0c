/* Frees eight buffers of 70-300 MiB (every page touched) and calls
 * malloc_trim(0): resident memory must fall by nearly all of it.
 *
 *   trim           prints "ok" or "FAIL ..." (exit 1)
 *   trim no-trim   same check without calling malloc_trim (for the
 *                  TENSORPOOL_RETAIN_LIMIT / TENSORPOOL_RETURN_ABOVE runs)
 */
#include <malloc.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static long rss_mib(void) {
    long pages = 0, resident = 0;
    FILE *f = fopen("/proc/self/statm", "r");
    if (!f || fscanf(f, "%ld %ld", &pages, &resident) != 2) return -1;
    fclose(f);
    return resident * sysconf(_SC_PAGESIZE) >> 20;
}

int main(int argc, char **argv) {
    int trim = !(argc > 1 && !strcmp(argv[1], "no-trim"));
    static const size_t mib[8] = {70, 300, 120, 90, 250, 75, 180, 100};
    char *b[8];
    size_t total = 0;
    long before = rss_mib();
    for (int i = 0; i < 8; i++) {
        b[i] = malloc(mib[i] << 20);
        if (!b[i]) { printf("FAIL malloc\n"); return 1; }
        memset(b[i], i + 1, mib[i] << 20);
        total += mib[i];
    }
    long peak = rss_mib();
    for (int i = 0; i < 8; i++) free(b[i]);
    if (trim) malloc_trim(0);
    long after = rss_mib();
    /* At most 64 MiB of the 1185 MiB may stay resident. */
    if (peak - before < (long)total - 16 || after > before + 64) {
        printf("FAIL rss %ld MiB before, %ld MiB at peak (%zu MiB allocated), %ld MiB after free%s\n",
               before, peak, total, after, trim ? " and malloc_trim(0)" : "");
        return 1;
    }
    printf("ok\n");
    return 0;
}
