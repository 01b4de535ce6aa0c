//! Out-of-memory paths of `TensorGlobalAlloc`, with its own
//! `#[global_allocator]` and no test harness (as bumpalo's `try_alloc` test):
//! - the inner allocator fails on demand for the requests routed to it
//!   (alignment above `MAX_ALIGN`): `alloc`, `alloc_zeroed` and `realloc`
//!   return null and nothing panics;
//! - the pool fails when the OS refuses (`RLIMIT_AS` lowered): class spans,
//!   huge blocks, zeroed blocks and a `realloc` that must move all return
//!   null, the old block stays valid, and `try_reserve` reports the error;
//! - after the limit is lifted everything works again.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use tensorpool::TensorGlobalAlloc;
use tensorpool::host::size_class::MAX_ALIGN;

/// `System`, failing every request while `FAIL` is set.
struct Failing;

static FAIL: AtomicBool = AtomicBool::new(false);
static REFUSED: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards to `System` or returns null, which `GlobalAlloc` allows.
unsafe impl GlobalAlloc for Failing {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if FAIL.load(Ordering::Relaxed) {
            REFUSED.fetch_add(1, Ordering::Relaxed);
            return std::ptr::null_mut();
        }
        // SAFETY: forwarded from the caller.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded: `ptr` came from `System` with `layout`.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static A: TensorGlobalAlloc<Failing> = TensorGlobalAlloc::with_inner(Failing);

fn check(ok: bool, what: &str) {
    if ok {
        println!("ok: {what}");
    } else {
        eprintln!("FAILED: {what}");
        std::process::exit(1);
    }
}

fn inner_failures() {
    let l = Layout::from_size_align(1000, MAX_ALIGN * 2).unwrap();
    FAIL.store(true, Ordering::Relaxed);
    // SAFETY: non-zero sizes; nulls are not used.
    let (a, z) = unsafe { (A.alloc(l), A.alloc_zeroed(l)) };
    FAIL.store(false, Ordering::Relaxed);
    check(
        a.is_null() && z.is_null(),
        "over-aligned alloc/alloc_zeroed return null when the inner allocator fails",
    );
    check(
        REFUSED.load(Ordering::Relaxed) == 2,
        "both went to the inner allocator",
    );
    // SAFETY: non-zero size; the block is freed with its layout below.
    let p = unsafe { A.alloc(l) };
    check(
        !p.is_null() && (p as usize).is_multiple_of(l.align()) && !A.owns(p),
        "over-aligned alloc works again, from the inner allocator",
    );
    FAIL.store(true, Ordering::Relaxed);
    // SAFETY: `p` is live with layout `l`; the new size is valid.
    let q = unsafe { A.realloc(p, l, 1 << 20) };
    FAIL.store(false, Ordering::Relaxed);
    check(
        q.is_null(),
        "over-aligned realloc returns null when the inner allocator fails",
    );
    // SAFETY: a failed realloc leaves `p` live with layout `l`.
    unsafe { A.dealloc(p, l) };
    // Requests the pool serves never touch the inner allocator.
    FAIL.store(true, Ordering::Relaxed);
    let v: Vec<u64> = (0..100_000).collect();
    FAIL.store(false, Ordering::Relaxed);
    check(
        v.len() == 100_000 && REFUSED.load(Ordering::Relaxed) == 3,
        "pool requests succeed while the inner allocator fails",
    );
}

fn vm_bytes() -> usize {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap();
    statm
        .split_whitespace()
        .next()
        .unwrap()
        .parse::<usize>()
        .unwrap()
        * 4096
}

fn set_as_limit(bytes: u64) {
    let lim = libc::rlimit {
        rlim_cur: bytes,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: a valid rlimit struct.
    let r = unsafe { libc::setrlimit(libc::RLIMIT_AS, &lim) };
    check(r == 0, "setrlimit(RLIMIT_AS)");
}

fn pool_failures() {
    // Impossible sizes fail without asking the OS for anything sensible.
    let mut v: Vec<u8> = Vec::new();
    check(
        v.try_reserve(isize::MAX as usize - 4096).is_err(),
        "try_reserve(isize::MAX) is an error, not an abort",
    );
    // A small block to realloc later, taken before the limit.
    let small = Layout::from_size_align(100, 8).unwrap();
    // SAFETY: non-zero size.
    let p = unsafe { A.alloc(small) };
    check(!p.is_null(), "small alloc before the limit");
    // SAFETY: `p` has 100 bytes.
    unsafe { p.write_bytes(0x5A, 100) };
    // Let the address space grow by 16 MiB at most from here.
    let before = A.stats();
    set_as_limit((vm_bytes() + (16 << 20)) as u64);
    let class = Layout::from_size_align(40 << 20, 64).unwrap();
    let huge = Layout::from_size_align(300 << 20, 4096).unwrap();
    // SAFETY: non-zero sizes; nulls are not used.
    let (c, h, cz, hz) = unsafe {
        (
            A.alloc(class),
            A.alloc(huge),
            A.alloc_zeroed(class),
            A.alloc_zeroed(huge),
        )
    };
    check(
        c.is_null() && h.is_null(),
        "class and huge alloc return null when the OS refuses",
    );
    check(
        cz.is_null() && hz.is_null(),
        "alloc_zeroed returns null when the OS refuses",
    );
    // SAFETY: `p` is live with layout `small`; the new size is valid.
    let q = unsafe { A.realloc(p, small, 200 << 20) };
    check(
        q.is_null(),
        "realloc that must move returns null when the OS refuses",
    );
    // SAFETY: a failed realloc leaves `p` live and unchanged.
    let intact = (0..100).all(|i| unsafe { *p.add(i) } == 0x5A);
    check(intact, "the old block is intact after the failed realloc");
    let mut w: Vec<u8> = Vec::new();
    check(
        w.try_reserve(100 << 20).is_err(),
        "try_reserve reports the pool's out-of-memory",
    );
    let after = A.stats();
    check(
        after.reserved_bytes <= before.reserved_bytes + (16 << 20),
        "no mapping leaked by the failures",
    );
    set_as_limit(libc::RLIM_INFINITY);
    // SAFETY: non-zero sizes; each block is freed with its layout.
    unsafe {
        let (c, h) = (A.alloc(class), A.alloc_zeroed(huge));
        check(
            !c.is_null() && !h.is_null(),
            "allocation works again once the limit is lifted",
        );
        check(
            *h.add((300 << 20) - 1) == 0,
            "the huge zeroed block reads zero",
        );
        A.dealloc(c, class);
        A.dealloc(h, huge);
        A.dealloc(p, small);
    }
}

fn main() {
    inner_failures();
    pool_failures();
    println!("global_oom: all checks passed");
}
