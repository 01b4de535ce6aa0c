//! A free big span grown for a bigger class grows where it is when the
//! address range right after it, or else right before it, is free: no page
//! of it moves, and the pages of other free spans are gathered into the new
//! part. One test in its own process, so that no other test maps memory
//! into the ranges it arranges to be free.

use core::alloc::Layout;
use core::ptr::NonNull;
use tensorpool::host::HostPool;

const MIB: usize = 1 << 20;

fn layout(size: usize) -> Layout {
    Layout::from_size_align(size, 64).unwrap()
}

/// One byte per page, from `seed` and the page's index.
fn fill(p: NonNull<u8>, len: usize, seed: u8) {
    for o in (0..len).step_by(4096) {
        // SAFETY: inside the caller's live block of `len` bytes.
        unsafe { p.as_ptr().add(o).write(seed ^ (o >> 12) as u8) };
    }
}

/// Checks [`fill`]'s pattern of `len` bytes starting at `p + at`, past the
/// first page (a free block's first words hold its links).
fn check(p: NonNull<u8>, at: usize, len: usize, seed: u8, what: &str) {
    for o in (4096..len).step_by(4096) {
        // SAFETY: inside the caller's live block.
        let v = unsafe { p.as_ptr().add(at + o).read() };
        assert_eq!(v, seed ^ (o >> 12) as u8, "{what}: page at {o}");
    }
}

/// Maps `[at, at + len)` (no access) only if nothing is mapped there;
/// returns whether it did.
fn take(at: usize, len: usize) -> bool {
    // SAFETY: MAP_FIXED_NOREPLACE maps only where nothing is mapped.
    let q = unsafe {
        libc::mmap(
            at as *mut libc::c_void,
            len,
            libc::PROT_NONE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED_NOREPLACE,
            -1,
            0,
        )
    };
    if q == libc::MAP_FAILED {
        return false;
    }
    if q as usize != at {
        // SAFETY: the mapping just made elsewhere (an old kernel's hint).
        unsafe { libc::munmap(q, len) };
        return false;
    }
    true
}

/// Whether nothing is mapped in `[at, at + len)` (this process's only test
/// runs now, so the answer holds until the pool looks).
fn is_free(at: usize, len: usize) -> bool {
    let free = take(at, len);
    if free {
        // SAFETY: the probe just mapped by `take`.
        unsafe { libc::munmap(at as *mut libc::c_void, len) };
    }
    free
}

/// Frees `p` (a live block of `pool`).
fn free(pool: &HostPool, p: NonNull<u8>) {
    // SAFETY: the callers pass live blocks of `pool`, each freed once.
    unsafe { pool.free(p).unwrap() };
}

/// The process's mappings, for a failure message.
fn maps() -> String {
    std::fs::read_to_string("/proc/self/maps").unwrap_or_default()
}

#[test]
fn a_free_span_grows_into_the_free_range_next_to_it() {
    // Up: of two 10 MiB spans mapped back to back, the upper one is trimmed
    // away, leaving the range after the lower one (`x`) free; a 14 MiB
    // request grows `x` by 4 MiB into it, with a 4 MiB prefix of `y`'s
    // pages.
    let pool = HostPool::new();
    let y = pool.allocate(layout(6 * MIB)).unwrap();
    let mut held = vec![pool.allocate(layout(10 * MIB)).unwrap()];
    let (x, z) = loop {
        let lower = pool.allocate(layout(10 * MIB)).unwrap();
        let upper = *held.last().unwrap();
        held.push(lower);
        if lower.as_ptr() as usize + 10 * MIB == upper.as_ptr() as usize {
            break (lower, upper);
        }
        assert!(held.len() < 8, "no two spans back to back:\n{}", maps());
    };
    held.retain(|&h| h != x && h != z);
    fill(x, 10 * MIB, 1);
    fill(y, 6 * MIB, 2);
    free(&pool, z);
    pool.flush_thread_cache();
    assert_eq!(pool.trim(), 10 * MIB, "only z was free");
    let after = x.as_ptr() as usize + 10 * MIB;
    assert!(is_free(after, 4 * MIB), "{after:#x} is mapped:\n{}", maps());
    free(&pool, x);
    free(&pool, y);
    pool.flush_thread_cache();
    let os_maps = pool.stats().os_maps;
    let b = pool.allocate(layout(14 * MIB)).unwrap();
    assert_eq!(b, x, "grown where it was, upwards");
    assert_eq!(pool.stats().os_maps, os_maps, "no new span mapped");
    assert_eq!(pool.usable_size(b.as_ptr()), Some(14 * MIB));
    check(b, 0, 10 * MIB, 1, "x's own pages");
    check(b, 10 * MIB, 4 * MIB, 2, "y's pages gathered");
    // What is left of `y` (2 MiB past the prefix moved) is a free span.
    let rest = pool.allocate(layout(2 * MIB)).unwrap();
    assert_eq!(rest.as_ptr() as usize, y.as_ptr() as usize + 4 * MIB);
    for p in held.into_iter().chain([rest, b]) {
        free(&pool, p);
    }
    pool.flush_thread_cache();
    pool.trim();
    assert_eq!(pool.stats().reserved_bytes, 0);

    // Down: nothing free after `x` (a page of ours there if the kernel left
    // a gap) and the range below it free, as it is for the newest mapping:
    // an 18 MiB request grows `x` by 8 MiB downwards: `z`'s 6 MiB, then
    // 2 MiB fresh, then `x`'s own pages, which stay where they are.
    let pool = HostPool::new();
    let z = pool.allocate(layout(6 * MIB)).unwrap();
    let mut held = Vec::new();
    let x = loop {
        let x = pool.allocate(layout(10 * MIB)).unwrap();
        if is_free(x.as_ptr() as usize - 8 * MIB, 8 * MIB) {
            break x;
        }
        held.push(x);
        assert!(held.len() < 8, "nothing free below a new span:\n{}", maps());
    };
    fill(x, 10 * MIB, 3);
    fill(z, 6 * MIB, 4);
    let after = x.as_ptr() as usize + 10 * MIB;
    // Unmapped below.
    let plug = take(after, 4096);
    let below = x.as_ptr() as usize - 8 * MIB;
    free(&pool, x);
    free(&pool, z);
    pool.flush_thread_cache();
    let os_maps = pool.stats().os_maps;
    let b = pool.allocate(layout(18 * MIB)).unwrap();
    assert_eq!(b.as_ptr() as usize, below, "grown where it was, downwards");
    assert_eq!(pool.stats().os_maps, os_maps, "no new span mapped");
    assert_eq!(pool.usable_size(b.as_ptr()), Some(18 * MIB));
    assert!(pool.owns(b.as_ptr()) && !pool.owns(x.as_ptr()));
    check(b, 0, 6 * MIB, 4, "z's pages gathered");
    for o in (6 * MIB..8 * MIB).step_by(4096) {
        // SAFETY: inside the live block `b`.
        assert_eq!(unsafe { b.as_ptr().add(o).read() }, 0, "fresh at {o}");
    }
    check(b, 8 * MIB, 10 * MIB, 3, "x's own pages");
    assert_eq!(pool.stats().reserved_bytes, (18 + 10 * held.len()) * MIB);
    fill(b, 18 * MIB, 5);
    check(b, 0, 18 * MIB, 5, "the grown block");
    for p in held.into_iter().chain([b]) {
        free(&pool, p);
    }
    pool.flush_thread_cache();
    pool.trim();
    assert_eq!(pool.stats().reserved_bytes, 0);
    if plug {
        // SAFETY: our page, mapped above.
        unsafe { libc::munmap(after as *mut libc::c_void, 4096) };
    }
}
