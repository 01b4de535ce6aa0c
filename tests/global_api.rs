//! `TensorGlobalAlloc`'s API contract, with the allocator installed:
//! - every alignment from 1 B to 1 MiB (past `MAX_ALIGN`) is honoured, at
//!   sizes from 1 B to huge, and the pool owns exactly the blocks aligned up
//!   to `MAX_ALIGN`;
//! - `usable_size` is the class size (or the huge mapping, at most 1/8 over
//!   the rounded request) and ≥ the request;
//! - `realloc` keeps the address within a class, for a huge block whose
//!   mapping fits and for a big block (1 MiB and up) shrunk into a smaller
//!   big class, unmaps a wasteful huge tail, moves otherwise, and always
//!   keeps the common prefix;
//! - `alloc_zeroed` returns zeros for reused (dirty) blocks and skips the
//!   memset for fresh mappings (no page is faulted in);
//! - `stats()` can be read from another thread while allocation goes on.

use std::alloc::{GlobalAlloc, Layout};
use tensorpool::TensorGlobalAlloc;

mod common;
use common::rss;
use tensorpool::host::HostPool;
use tensorpool::host::size_class::{MAX_ALIGN, MAX_CLASS_SIZE};

#[global_allocator]
static A: TensorGlobalAlloc = TensorGlobalAlloc::new();

/// Held by every test of this binary: they share the process-wide pool, and
/// one test's frees, trims and huge-cache evictions would otherwise move the
/// reserved bytes another is watching (the huge-growth test asserts that
/// reserved follows its own mapping).
static WHOLE_POOL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn whole_pool() -> std::sync::MutexGuard<'static, ()> {
    WHOLE_POOL.lock().unwrap_or_else(|e| e.into_inner())
}

const SIZES: [usize; 9] = [
    1,
    7,
    100,
    4096,
    70_000,
    1 << 20,
    5 << 20,
    MAX_CLASS_SIZE,
    MAX_CLASS_SIZE + 1,
];

fn fill(p: *mut u8, n: usize, seed: u8) {
    for i in (0..n).step_by(509).chain(n.saturating_sub(64)..n) {
        // SAFETY: `i < n`, inside the caller's block.
        unsafe { *p.add(i) = seed ^ (i as u8) };
    }
}

/// Checks what `fill(p, n, seed)` wrote, below `limit`.
fn check_prefix(p: *const u8, n: usize, seed: u8, limit: usize) {
    for i in (0..n)
        .step_by(509)
        .chain(n.saturating_sub(64)..n)
        .filter(|&i| i < limit)
    {
        // SAFETY: `i < n`, inside the caller's block.
        assert_eq!(unsafe { *p.add(i) }, seed ^ (i as u8), "byte {i} of {n}");
    }
}

fn check(p: *const u8, n: usize, seed: u8) {
    check_prefix(p, n, seed, n);
}

#[test]
fn every_alignment_up_to_and_past_max_align() {
    let _whole = whole_pool();
    for shift in 0..=20 {
        let align = 1usize << shift;
        for &size in &SIZES {
            let l = Layout::from_size_align(size, align).unwrap();
            // SAFETY: non-zero size; freed below with `l`.
            let p = unsafe { A.alloc(l) };
            assert!(!p.is_null(), "{l:?}");
            assert_eq!(p as usize % align, 0, "{l:?}");
            assert_eq!(A.owns(p), align <= MAX_ALIGN, "{l:?}");
            if size >= 4096 && align <= MAX_ALIGN {
                assert_eq!(
                    p as usize % 64,
                    0,
                    "blocks of 4 KiB and up are 64 B aligned: {l:?}"
                );
            }
            fill(p, size, shift as u8);
            check(p, size, shift as u8);
            // SAFETY: allocated above with `l`.
            unsafe { A.dealloc(p, l) };
        }
    }
}

#[test]
fn usable_size_is_the_class_size() {
    let _whole = whole_pool();
    for &size in &SIZES {
        for align in [8, 64, 4096, MAX_ALIGN] {
            let l = Layout::from_size_align(size, align).unwrap();
            // SAFETY: non-zero size; freed below.
            let p = unsafe { A.alloc(l) };
            let usable = A.usable_size(p).unwrap();
            assert!(usable >= size, "{l:?}");
            let rounded = HostPool::rounded_size(l).unwrap();
            if size <= MAX_CLASS_SIZE {
                assert_eq!(usable, rounded, "{l:?}");
            } else {
                // The huge cache may hand back a cached mapping up to 1/8 larger.
                assert!(
                    usable >= rounded && usable - rounded <= rounded / 8,
                    "{l:?}: {usable}"
                );
            }
            // SAFETY: allocated above with `l`.
            unsafe { A.dealloc(p, l) };
        }
    }
    let x = 5u64;
    assert_eq!(
        A.usable_size(&x as *const u64 as *const u8),
        None,
        "a stack address is not the pool's"
    );
}

#[test]
fn realloc_in_place_within_a_class_and_moves_across() {
    let _whole = whole_pool();
    let l = Layout::from_size_align(100, 8).unwrap();
    // SAFETY: non-zero sizes; every block is passed on or freed once.
    unsafe {
        let p = A.alloc(l);
        fill(p, 100, 1);
        let class = A.usable_size(p).unwrap();
        let q = A.realloc(p, l, class);
        assert_eq!(q, p, "same class: in place");
        let l2 = Layout::from_size_align(class, 8).unwrap();
        let r = A.realloc(q, l2, 5000);
        assert_ne!(r, q, "another class: moved");
        check(r, 100, 1);
        let l3 = Layout::from_size_align(5000, 8).unwrap();
        let s = A.realloc(r, l3, 60);
        check_prefix(s, 100, 1, 60);
        A.dealloc(s, Layout::from_size_align(60, 8).unwrap());
    }
}

#[test]
fn realloc_shrinks_a_big_block_in_place() {
    let _whole = whole_pool();
    let mib = 1usize << 20;
    let l = Layout::from_size_align(20 * mib, 64).unwrap();
    // SAFETY: non-zero sizes; every block is passed on or freed once.
    unsafe {
        let p = A.alloc(l);
        fill(p, 20 * mib, 3);
        let q = A.realloc(p, l, 12 * mib);
        assert_eq!(q, p, "a smaller big class: cut in place");
        assert_eq!(A.usable_size(q), Some(12 * mib));
        check_prefix(q, 20 * mib, 3, 12 * mib);
        // Growing copies into another block and frees this one.
        let l12 = Layout::from_size_align(12 * mib, 64).unwrap();
        let r = A.realloc(q, l12, 20 * mib);
        assert_ne!(r, q);
        check_prefix(r, 20 * mib, 3, 12 * mib);
        A.dealloc(r, l);
    }
}

#[test]
fn realloc_huge_in_place_shrinks_the_mapping() {
    let _whole = whole_pool();
    let mib = 1usize << 20;
    let l = Layout::from_size_align(200 * mib, 4096).unwrap();
    // SAFETY: non-zero sizes; every block is passed on or freed once.
    unsafe {
        let p = A.alloc(l);
        fill(p, 200 * mib, 2);
        assert_eq!(A.usable_size(p), Some(200 * mib));
        // Within 1/8: same address, mapping kept.
        let q = A.realloc(p, l, 190 * mib);
        assert_eq!(q, p);
        assert_eq!(A.usable_size(q), Some(200 * mib));
        // Much smaller but still huge: same address, tail unmapped.
        let l2 = Layout::from_size_align(190 * mib, 4096).unwrap();
        let r = A.realloc(q, l2, 100 * mib);
        assert_eq!(r, p);
        assert_eq!(A.usable_size(r), Some(100 * mib));
        check_prefix(r, 200 * mib, 2, 100 * mib);
        // Growing past the mapping remaps (in place or moved, never copied).
        let l3 = Layout::from_size_align(100 * mib, 4096).unwrap();
        let s = A.realloc(r, l3, 120 * mib);
        assert_eq!(A.usable_size(s), Some(120 * mib));
        assert_eq!(
            s as usize % MAX_ALIGN,
            0,
            "a remapped huge block stays granule aligned"
        );
        check_prefix(s, 200 * mib, 2, 100 * mib);
        if s != r {
            assert!(!A.owns(r), "the old address is no longer the pool's");
        }
        // Down into the classes moves too (the layout must find the class).
        let l4 = Layout::from_size_align(120 * mib, 4096).unwrap();
        let t = A.realloc(s, l4, 10 * mib);
        assert_ne!(t, s);
        check_prefix(t, 200 * mib, 2, 10 * mib);
        A.dealloc(t, Layout::from_size_align(10 * mib, 4096).unwrap());
    }
}

#[test]
fn realloc_huge_growth_remaps_without_copying() {
    let _whole = whole_pool();
    let mib = 1usize << 20;
    // A Vec-like doubling from 80 MiB to 1.25 GiB: each step keeps the data
    // and the pool's accounting follows the mapping.
    let mut size = 80 * mib;
    let mut l = Layout::from_size_align(size, 64).unwrap();
    // SAFETY: non-zero sizes; each block is passed on or freed once.
    unsafe {
        let mut p = A.alloc(l);
        fill(p, size, 9);
        let filled = size;
        // Something mapped right after the block, so the first growth cannot
        // happen in place and must move.
        let blocker_l = Layout::from_size_align(70 * mib, 64).unwrap();
        let blocker = A.alloc(blocker_l);
        for _ in 0..4 {
            let before = A.stats().reserved_bytes;
            let q = A.realloc(p, l, size * 2);
            assert!(!q.is_null());
            check_prefix(q, filled, 9, filled);
            assert_eq!(A.usable_size(q), Some(size * 2));
            assert!(
                A.stats().reserved_bytes >= before + size,
                "reserved follows the growth"
            );
            // The new tail is writable.
            *q.add(size * 2 - 1) = 1;
            p = q;
            size *= 2;
            l = Layout::from_size_align(size, 64).unwrap();
        }
        A.dealloc(p, l);
        A.dealloc(blocker, blocker_l);
    }
}

#[test]
fn realloc_huge_growth_in_place_when_the_range_above_is_free() {
    let _whole = whole_pool();
    let mib = 1usize << 20;
    let (la, lb) = (
        Layout::from_size_align(200 * mib, 64).unwrap(),
        Layout::from_size_align(100 * mib, 64).unwrap(),
    );
    // SAFETY: non-zero sizes; each block is passed on or freed once.
    unsafe {
        // Mappings go top-down, so `b` usually lands right below `a`; once
        // `a` is unmapped (freed, then trimmed out of the huge cache), the
        // range above `b` is free and `b` can grow where it is.
        let a = A.alloc(la);
        let b = A.alloc(lb);
        fill(b, 100 * mib, 4);
        A.dealloc(a, la);
        A.trim();
        let q = A.realloc(b, lb, 150 * mib);
        let adjacent = (a as usize).wrapping_sub(b as usize + 100 * mib) < MAX_ALIGN;
        eprintln!(
            "adjacent {adjacent}, grew {}",
            if q == b { "in place" } else { "by moving" }
        );
        check(q, 100 * mib, 4);
        assert_eq!(A.usable_size(q), Some(150 * mib));
        *q.add(150 * mib - 1) = 7;
        A.dealloc(q, Layout::from_size_align(150 * mib, 64).unwrap());
    }
}

#[test]
fn alloc_zeroed_after_reuse_reads_zero() {
    let _whole = whole_pool();
    for &size in &SIZES {
        let l = Layout::from_size_align(size, 8).unwrap();
        // SAFETY: non-zero size; each block freed once with `l`.
        unsafe {
            let p = A.alloc(l);
            p.write_bytes(0xFF, size);
            A.dealloc(p, l);
            // This thread's cache (or the huge cache) hands the dirty block back.
            let z = A.alloc_zeroed(l);
            assert!(
                std::slice::from_raw_parts(z, size).iter().all(|&b| b == 0),
                "size {size}"
            );
            A.dealloc(z, l);
        }
    }
}

#[test]
fn alloc_zeroed_skips_the_memset_on_fresh_mappings() {
    let _whole = whole_pool();
    // A size no other test uses, so the huge cache cannot hold one: the
    // block is freshly mapped and the memset would fault in 512 MiB.
    let size = (512 << 20) + 12_345;
    let l = Layout::from_size_align(size, 64).unwrap();
    let before = rss();
    // SAFETY: non-zero size; freed below.
    let p = unsafe { A.alloc_zeroed(l) };
    let grew = rss().saturating_sub(before);
    assert!(
        grew < 128 << 20,
        "alloc_zeroed of a fresh 512 MiB mapping faulted in {grew} B"
    );
    // SAFETY: `p` holds `size` bytes.
    unsafe {
        assert!((0..size).step_by(1 << 16).all(|i| *p.add(i) == 0));
        assert_eq!(*p.add(size - 1), 0);
        A.dealloc(p, l);
    }
    // The same for a class block carved from a freshly mapped span: the
    // 56 MiB class (one block per span), which no other test here uses.
    let size = (48 << 20) + 1;
    let l = Layout::from_size_align(size, 64).unwrap();
    let before = rss();
    // SAFETY: non-zero size; each block freed once with `l`.
    unsafe {
        let p = A.alloc_zeroed(l);
        let grew = rss().saturating_sub(before);
        assert!(
            grew < 24 << 20,
            "alloc_zeroed of a fresh 56 MiB span faulted in {grew} B"
        );
        assert!((0..size).step_by(4096).all(|i| *p.add(i) == 0) && *p == 0);
        p.write_bytes(0xEE, size);
        A.dealloc(p, l);
        // Reused from this thread's cache: dirty, so it is zeroed now.
        let q = A.alloc_zeroed(l);
        assert!((0..size).step_by(4093).all(|i| *q.add(i) == 0) && *q.add(size - 1) == 0);
        A.dealloc(q, l);
    }
}

#[test]
fn stats_readable_while_another_thread_allocates() {
    let _whole = whole_pool();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let s2 = stop.clone();
    let h = std::thread::spawn(move || {
        let mut n = 0usize;
        while !s2.load(std::sync::atomic::Ordering::Relaxed) {
            let v = vec![n as u8; 1 + n % (3 << 20)];
            n = n.wrapping_add(v.len() * 7 + 1);
        }
    });
    let mut last = A.stats();
    for _ in 0..10_000 {
        let s = A.stats();
        assert!(s.reserved_bytes > 0 && s.os_maps >= last.os_maps);
        last = s;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    h.join().unwrap();
}

/// Issue 7 item 2 (and what the C ABI needs for item 3): a size-less free
/// of a block that is free already is `DoubleFree`, not "not ours", and
/// changes nothing; `manages` covers interior pointers, `owns` only starts.
#[test]
fn size_less_double_free_is_reported_and_manages_covers_interiors() {
    let _whole = whole_pool();
    use tensorpool::AllocError;
    let l = Layout::from_size_align(4096, 16).unwrap();
    // SAFETY: a non-zero layout.
    let p = unsafe { A.alloc(l) };
    assert!(!p.is_null());
    // SAFETY: inside the 4 KiB block.
    let inner = unsafe { p.add(16) };
    assert!(A.manages(inner) && !A.owns(inner));
    let local = 0u64;
    assert!(!A.manages((&local as *const u64).cast()));
    // SAFETY: a live pool block, freed once here.
    unsafe { A.try_free_unsized(p) }.unwrap();
    // SAFETY: freed already: the pool must refuse it and change nothing.
    let e = unsafe { A.try_free_unsized(p) }.unwrap_err();
    assert_eq!(e, AllocError::DoubleFree { addr: p as usize });
    // SAFETY: not a block start: refused, nothing changes.
    let e = unsafe { A.try_free_unsized(inner) }.unwrap_err();
    assert!(matches!(e, AllocError::ForeignPointer { .. }), "{e}");
    // SAFETY: non-zero layouts; freed below.
    let (a, b) = unsafe { (A.alloc(l), A.alloc(l)) };
    assert_ne!(a, b, "one block handed out twice");
    // SAFETY: allocated just above with `l`.
    unsafe {
        A.dealloc(a, l);
        A.dealloc(b, l);
    }
}

/// Issue 7 item 2 through `#[global_allocator]`: a second `dealloc` of a
/// cached block aborts with glibc's message rather than corrupting the pool
/// (run in a child process: the abort is the point).
#[test]
fn double_dealloc_aborts_with_a_message() {
    let _whole = whole_pool();
    use std::os::unix::process::ExitStatusExt;
    const CHILD: &str = "TENSORPOOL_DOUBLE_FREE_CHILD";
    const NAME: &str = "double_dealloc_aborts_with_a_message";
    if std::env::var_os(CHILD).is_some() {
        let l = Layout::from_size_align(256, 8).unwrap();
        // SAFETY: freed twice on purpose; the second free must abort.
        unsafe {
            let p = A.alloc(l);
            A.dealloc(p, l);
            A.dealloc(p, l);
        }
        return;
    }
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", NAME, "--test-threads=1", "--nocapture"])
        .env(CHILD, "1")
        .output()
        .unwrap();
    assert_eq!(
        out.status.signal(),
        Some(6),
        "not SIGABRT: {:?}",
        out.status
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("double free detected"), "stderr: {err}");
}
