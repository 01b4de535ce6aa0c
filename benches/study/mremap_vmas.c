/*
 * What a page move costs the kernel, by the number of VMAs it covers.
 *
 * Builds a range of n VMAs of 2 MiB huge pages (each piece faulted
 * elsewhere, then moved next to the others: the kernel does not join
 * them, as it does not join the pieces the pool gathers into a span),
 * then moves it back and forth: into a free range, and onto a fresh
 * mapping (as the pool does, onto the range it reserved with
 * MAP_FIXED_NOREPLACE). Prints the mean time per move.
 *
 *   cc -O2 -D_GNU_SOURCE -o /tmp/mremap_vmas benches/study/mremap_vmas.c && /tmp/mremap_vmas
 *
 * Used for the README's issue 8 round 7 section (Linux 6.18).
 */
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>

#define MIB (1UL << 20)

static double now_ns(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec * 1e9 + t.tv_nsec;
}

static int vmas_in(char *a, size_t len) {
  FILE *f = fopen("/proc/self/maps", "r");
  char line[512];
  int n = 0;
  while (f && fgets(line, sizeof line, f)) {
    unsigned long s, e;
    if (sscanf(line, "%lx-%lx", &s, &e) == 2 && s < (unsigned long)a + len &&
        e > (unsigned long)a)
      n++;
  }
  if (f) fclose(f);
  return n;
}

int main(void) {
  /* A 2 MiB-aligned stretch of address space, then given back: ours to
     place fixed mappings in (a single-threaded program). */
  char *raw = mmap(0, 1024 * MIB, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (raw == MAP_FAILED) return 1;
  char *base = (char *)(((unsigned long)raw + 2 * MIB - 1) & ~(2 * MIB - 1));
  munmap(base, 900 * MIB);
  printf("VMAs | into a free range | onto a mapping\n");
  for (int n = 1; n <= 8; n *= 2) {
    char *a = base, *b = base + 300 * MIB, *scratch = base + 600 * MIB;
    size_t len = n * 2 * MIB;
    for (int i = 0; i < n; i++) {
      char *p = mmap(scratch, 2 * MIB, PROT_READ | PROT_WRITE,
                     MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0);
      madvise(p, 2 * MIB, MADV_HUGEPAGE);
      for (size_t o = 0; o < 2 * MIB; o += 4096) p[o] = 1;
      mremap(p, 2 * MIB, 2 * MIB, MREMAP_MAYMOVE | MREMAP_FIXED, a + i * 2 * MIB);
    }
    int vmas = vmas_in(a, len);
    double hole = 0, onto = 0;
    const int iters = 500;
    for (int i = 0; i < iters; i++) {
      double t = now_ns();
      if (mremap(a, len, len, MREMAP_MAYMOVE | MREMAP_FIXED, b) == MAP_FAILED) return 1;
      hole += now_ns() - t;
      mmap(a, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE, -1, 0);
      t = now_ns();
      if (mremap(b, len, len, MREMAP_MAYMOVE | MREMAP_FIXED, a) == MAP_FAILED) return 1;
      onto += now_ns() - t;
    }
    printf("%d | %.1f us | %.1f us\n", vmas, hole / iters / 1e3, onto / iters / 1e3);
    munmap(a, len);
  }
  return 0;
}
