//! Unit tests of the host pool through its public API.

use super::size_class::{CLASS_SIZES, MAX_ALIGN, MAX_CLASS_SIZE, class_of};
use super::{HostPool, HostPoolConfig, Prewarm};
use crate::error::{AllocError, LayoutProblem};
use core::alloc::Layout;
use core::ptr::NonNull;

fn layout(size: usize, align: usize) -> Layout {
    Layout::from_size_align(size, align).unwrap()
}

/// Writes a pattern derived from `seed` over the whole block.
fn fill(p: NonNull<u8>, len: usize, seed: u8) {
    // SAFETY: tests only pass live blocks of at least `len` bytes.
    unsafe { core::slice::from_raw_parts_mut(p.as_ptr(), len) }
        .iter_mut()
        .enumerate()
        .for_each(|(i, b)| *b = seed ^ (i as u8));
}

fn check(p: NonNull<u8>, len: usize, seed: u8) {
    // SAFETY: as in `fill`.
    let s = unsafe { core::slice::from_raw_parts(p.as_ptr(), len) };
    assert!(
        s.iter().enumerate().all(|(i, &b)| b == seed ^ (i as u8)),
        "pattern broken at {:p}",
        p
    );
}

#[test]
fn every_class_boundary_allocates_and_is_owned() {
    let pool = HostPool::new();
    let mut sizes = vec![1usize, 7, 600 << 10];
    for &cs in &CLASS_SIZES {
        sizes.extend([cs, cs - 1]);
    }
    for s in sizes {
        let l = layout(s, 8);
        let p = pool.allocate(l).unwrap_or_else(|e| panic!("size {s}: {e}"));
        let us = pool.usable_size(p.as_ptr()).unwrap();
        assert!(us >= s && us == CLASS_SIZES[class_of(s)]);
        if s >= 4096 {
            assert_eq!(p.as_ptr() as usize % 64, 0, "size {s}");
        }
        if s > 32 << 10 {
            assert_eq!(p.as_ptr() as usize % 4096, 0, "size {s}");
        }
        // Touch first and last byte only (sizes go up to 64 MiB).
        // SAFETY: live block of `us ≥ s` bytes.
        unsafe {
            p.as_ptr().write(1);
            p.as_ptr().add(s - 1).write(2);
            pool.deallocate(p, l);
        }
    }
}

#[test]
fn every_size_up_to_1mib_and_sampled_to_64mib() {
    let pool = HostPool::new();
    let mut s = 1usize;
    while s <= MAX_CLASS_SIZE + (8 << 20) {
        let l = layout(s, 8);
        let p = pool.allocate(l).unwrap();
        assert!(pool.usable_size(p.as_ptr()).unwrap() >= s);
        // SAFETY: live block of ≥ s bytes.
        unsafe {
            p.as_ptr().add(s - 1).write(0xEE);
            pool.deallocate(p, l);
        }
        s += if s < 1 << 20 { 1 + s / 64 } else { 1 + s / 7 };
    }
}

#[test]
fn alignments_up_to_max_and_beyond() {
    let pool = HostPool::new();
    let mut align = 1;
    while align <= MAX_ALIGN {
        for s in [1usize, 24, 100, 4096, 5000, 70_000, 3 << 20] {
            let l = layout(s, align);
            let p = pool.allocate(l).unwrap();
            assert_eq!(p.as_ptr() as usize % align, 0, "size {s} align {align}");
            fill(p, s, 3);
            check(p, s, 3);
            // SAFETY: allocated above with `l`.
            unsafe { pool.deallocate(p, l) };
        }
        align *= 2;
    }
    let e = pool.allocate(layout(64, MAX_ALIGN * 2)).unwrap_err();
    assert!(
        matches!(
            e,
            AllocError::InvalidLayout {
                problem: LayoutProblem::AlignTooLarge { max: MAX_ALIGN },
                ..
            }
        ),
        "{e}"
    );
    let e = pool
        .allocate(layout(MAX_CLASS_SIZE * 2, MAX_ALIGN * 2))
        .unwrap_err();
    assert!(matches!(e, AllocError::InvalidLayout { .. }), "{e}");
}

/// Issue 7 item 11: a request that can never be mapped is not retryable.
#[test]
fn item11_unmappable_request_is_not_retryable() {
    let pool = HostPool::new();
    for size in [isize::MAX as usize - 10, 1 << 48, (1 << 47) + 1] {
        let l = layout(size, 1);
        let e = pool.allocate(l).unwrap_err();
        assert!(!e.is_retryable(), "size {size}: {e}");
        assert!(
            matches!(
                e,
                AllocError::InvalidLayout {
                    problem: LayoutProblem::SizeOverflow,
                    ..
                } | AllocError::NeverFits { .. }
            ),
            "size {size}: {e}"
        );
        let e = pool.allocate_zeroed(l).unwrap_err();
        assert!(!e.is_retryable(), "zeroed, size {size}: {e}");
    }
}

#[test]
fn zero_size_owns_nothing() {
    let pool = HostPool::new();
    let l = layout(0, 64);
    let p = pool.allocate(l).unwrap();
    assert_eq!(p.as_ptr() as usize % 64, 0);
    assert!(!pool.owns(p.as_ptr()));
    assert_eq!(pool.stats().reserved_bytes, 0);
    // SAFETY: size-0 deallocation is a no-op.
    unsafe { pool.deallocate(p, l) };
}

#[test]
fn construction_maps_nothing() {
    let pool = HostPool::new();
    let s = pool.stats();
    assert_eq!((s.reserved_bytes, s.segments, s.os_maps), (0, 0, 0));
}

#[test]
fn foreign_and_interior_pointers_are_refused() {
    let pool = HostPool::new();
    let other = HostPool::new();
    let mut x = 5u64;
    let stack = NonNull::from(&mut x).cast::<u8>();
    // SAFETY: `free` checks ownership first and changes nothing on error.
    let r = unsafe { pool.free(stack) };
    assert!(matches!(r, Err(AllocError::ForeignPointer { .. })));
    let l = layout(256, 8);
    let p = other.allocate(l).unwrap();
    assert!(!pool.owns(p.as_ptr()) && other.owns(p.as_ptr()));
    // SAFETY: as above — refused, nothing changes.
    assert!(unsafe { pool.free(p) }.is_err());
    // SAFETY: interior pointer of a live block: refused.
    assert!(unsafe { other.free(NonNull::new_unchecked(p.as_ptr().add(8))) }.is_err());
    // SAFETY: `p` is a live block of `other`.
    unsafe { other.free(p) }.unwrap();
}

#[test]
fn size_less_free_reuses_the_block() {
    let pool = HostPool::new();
    for s in [16usize, 4096, 600 << 10, 80 << 20] {
        let l = layout(s, 8);
        let p = pool.allocate(l).unwrap();
        // SAFETY: live block of ours.
        unsafe { pool.free(p) }.unwrap();
        let q = pool.allocate(l).unwrap();
        assert_eq!(p, q, "size {s}: LIFO reuse");
        // SAFETY: allocated with `l`.
        unsafe { pool.deallocate(q, l) };
    }
}

#[test]
fn trim_returns_memory_and_blocks_stay_usable() {
    let pool = HostPool::new();
    let sizes = [64usize, 4096, 100 << 10, 2 << 20, 80 << 20];
    let mut live = Vec::new();
    for (i, &s) in sizes.iter().cycle().take(60).enumerate() {
        let p = pool.allocate(layout(s, 8)).unwrap();
        fill(p, s.min(8192), i as u8);
        live.push((p, s, i as u8));
    }
    let reserved_full = pool.stats().reserved_bytes;
    // Free every other block, trim: wholly free spans go, the rest survive.
    let mut keep = Vec::new();
    for (k, (p, s, seed)) in live.into_iter().enumerate() {
        if k % 2 == 0 {
            // SAFETY: allocated above with this layout.
            unsafe { pool.deallocate(p, layout(s, 8)) };
        } else {
            keep.push((p, s, seed));
        }
    }
    let given = pool.trim();
    assert!(given > 0);
    assert!(pool.stats().reserved_bytes < reserved_full);
    for &(p, s, seed) in &keep {
        check(p, s.min(8192), seed);
    }
    for (p, s, _) in keep {
        // SAFETY: allocated above with this layout.
        unsafe { pool.deallocate(p, layout(s, 8)) };
    }
    pool.trim();
    let st = pool.stats();
    assert_eq!(st.reserved_bytes, 0, "{st:?}");
    assert_eq!(st.segments, 0);
}

#[test]
fn prewarm_is_explicit_and_serves_without_mapping() {
    let pool = HostPool::new();
    let mapped = pool
        .prewarm(
            &Prewarm::new()
                .blocks(4096, 256)
                .blocks(1 << 20, 4)
                .blocks(80 << 20, 1),
        )
        .unwrap();
    assert!(mapped >= 256 * 4096 + 4 * (1 << 20) + (80 << 20));
    let maps = pool.stats().os_maps;
    let mut v = Vec::new();
    for _ in 0..256 {
        v.push((pool.allocate(layout(4096, 64)).unwrap(), 4096));
    }
    for _ in 0..4 {
        v.push((pool.allocate(layout(1 << 20, 64)).unwrap(), 1 << 20));
    }
    v.push((pool.allocate(layout(80 << 20, 64)).unwrap(), 80 << 20));
    assert_eq!(
        pool.stats().os_maps,
        maps,
        "prewarmed blocks came from the OS again"
    );
    for (p, s) in v {
        // SAFETY: allocated above with this layout.
        unsafe { pool.deallocate(p, layout(s, 64)) };
    }
}

#[test]
fn retain_limit_bounds_cached_big_blocks() {
    let pool = HostPool::with_config(HostPoolConfig {
        retain_limit: Some(8 << 20),
        ..Default::default()
    });
    let l = layout(4 << 20, 64);
    let ps: Vec<_> = (0..8).map(|_| pool.allocate(l).unwrap()).collect();
    for p in ps {
        // SAFETY: allocated above with `l`.
        unsafe { pool.deallocate(p, l) };
    }
    pool.flush_thread_cache();
    let s = pool.stats();
    assert!(s.cached_bytes <= 8 << 20, "{s:?}");
    assert!(s.reserved_bytes <= 8 << 20, "{s:?}");
    // Huge blocks too.
    let h = layout(100 << 20, 64);
    let p = pool.allocate(h).unwrap();
    // SAFETY: allocated with `h`.
    unsafe { pool.deallocate(p, h) };
    assert!(pool.stats().cached_bytes <= 8 << 20);
}

#[test]
fn cross_thread_frees_flow_back() {
    let pool = HostPool::new();
    let l = layout(64 << 10, 64);
    // Producer allocates, consumer frees: memory must not pile up anywhere.
    for _round in 0..20 {
        let ps: Vec<usize> = (0..64)
            .map(|_| pool.allocate(l).unwrap().as_ptr() as usize)
            .collect();
        let p2 = pool.clone();
        std::thread::spawn(move || {
            for p in ps {
                // SAFETY: allocated by the producer with `l`, handed over whole.
                unsafe { p2.deallocate(NonNull::new(p as *mut u8).unwrap(), l) };
            }
        })
        .join()
        .unwrap();
    }
    // 20 rounds × 64 blocks of 64 KiB = 80 MiB allocated in total; with
    // cross-thread frees recycled, the pool holds about one round's worth.
    let reserved = pool.stats().reserved_bytes;
    assert!(reserved <= 16 << 20, "reserved {reserved}");
}

#[test]
fn thread_exit_hands_the_cache_back() {
    let pool = HostPool::new();
    let c = class_of(256);
    let p2 = pool.clone();
    std::thread::spawn(move || {
        let l = layout(256, 8);
        let ps: Vec<_> = (0..100).map(|_| p2.allocate(l).unwrap()).collect();
        for p in ps {
            // SAFETY: allocated above with `l`.
            unsafe { p2.deallocate(p, l) };
        }
    })
    .join()
    .unwrap();
    let _ = c;
    assert!(
        pool.central_available(256) >= 100,
        "blocks stuck in a dead thread's cache"
    );
}

#[test]
fn many_pools_on_one_thread_evict_cleanly() {
    let pools: Vec<HostPool> = (0..9).map(|_| HostPool::new()).collect();
    let l = layout(128, 8);
    for round in 0..3 {
        for (i, pool) in pools.iter().enumerate() {
            let p = pool.allocate(l).unwrap();
            fill(p, 128, (i + round) as u8);
            check(p, 128, (i + round) as u8);
            // SAFETY: allocated with `l`.
            unsafe { pool.deallocate(p, l) };
        }
    }
}

/// The model the meta backend uses predicts the real pool's reserved bytes
/// exactly for single-thread alloc/free sequences (and stays an upper bound
/// across trims).
#[test]
fn model_matches_pool() {
    use super::model::PoolModel;
    let mut rng = 0x5EEDu64;
    let mut next = || {
        rng = rng.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = rng;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z ^ (z >> 27)
    };
    for limit in [None, Some(24 << 20)] {
        let pool = HostPool::with_config(HostPoolConfig {
            retain_limit: limit,
            ..Default::default()
        });
        let mut model = PoolModel::new(limit);
        let mut live: Vec<(NonNull<u8>, Layout, usize)> = Vec::new();
        for step in 0..6000 {
            let x = next();
            if x % 5 < 3 || live.is_empty() {
                let size = match x % 7 {
                    0..=2 => 1 + (x >> 8) as usize % 2048,
                    3..=4 => 1 + (x >> 8) as usize % (600 << 10),
                    5 => 1 + (x >> 8) as usize % (20 << 20),
                    _ => (64 << 20) + (x >> 8) as usize % (40 << 20),
                };
                let l = layout(size, 1 << ((x >> 40) % 8));
                let p = pool.allocate(l).unwrap();
                let len = model.alloc(l.size(), l.align());
                live.push((p, l, len));
            } else {
                let (p, l, len) = live.swap_remove((x >> 8) as usize % live.len());
                // SAFETY: allocated above with `l`.
                unsafe { pool.deallocate(p, l) };
                model.free(l.size(), l.align(), len);
            }
            if step % 1500 == 1499 {
                pool.trim();
                model.trim();
                assert!(
                    model.reserved().current >= pool.stats().reserved.current,
                    "model below pool after trim"
                );
            } else {
                let (m, r) = (model.reserved(), pool.stats().reserved);
                if step < 1500 {
                    assert_eq!(
                        (m.current, m.peak),
                        (r.current, r.peak),
                        "step {step}, limit {limit:?}"
                    );
                } else {
                    assert!(
                        m.current >= r.current,
                        "step {step}: model {} below pool {}",
                        m.current,
                        r.current
                    );
                }
            }
        }
        for (p, l, _) in live {
            // SAFETY: allocated above with `l`.
            unsafe { pool.deallocate(p, l) };
        }
    }
}

/// Issue 7 item 2: a second size-less free of a block that is in this
/// thread's cache (4 KiB), the central list (1 MiB after a flush) or the huge
/// cache (100 MiB) is refused, and the next two allocations differ.
#[test]
fn item2_double_free_is_detected_in_cache_central_and_huge() {
    let pool = HostPool::new();
    for (size, flush) in [(4096usize, false), (1 << 20, true), (100 << 20, false)] {
        let l = layout(size, 64);
        let p = pool.allocate(l).unwrap();
        // SAFETY: a live block of ours.
        unsafe { pool.free(p) }.unwrap();
        if flush {
            pool.flush_thread_cache();
        }
        let cached = pool.stats().cached_bytes;
        // SAFETY: `p` is free: the pool must refuse it and change nothing.
        let e = unsafe { pool.free(p) }.unwrap_err();
        assert_eq!(
            e,
            AllocError::DoubleFree {
                addr: p.as_ptr() as usize
            },
            "size {size}"
        );
        assert!(!e.is_retryable());
        assert_eq!(pool.stats().cached_bytes, cached, "size {size}");
        let a = pool.allocate(l).unwrap();
        let b = pool.allocate(l).unwrap();
        assert_ne!(a, b, "size {size}: one block handed out twice");
        // SAFETY: allocated above with `l`.
        unsafe {
            pool.deallocate(a, l);
            pool.deallocate(b, l);
        }
    }
}

/// Issue 7 item 2, the sized path: a second `deallocate` of a cached block
/// changes nothing.
#[test]
fn item2_sized_double_deallocate_changes_nothing() {
    let pool = HostPool::new();
    for size in [64usize, 4096, 2 << 20] {
        let l = layout(size, 8);
        let p = pool.allocate(l).unwrap();
        // SAFETY: freed twice on purpose: the second is detected and ignored.
        unsafe {
            pool.deallocate(p, l);
            pool.deallocate(p, l);
        }
        let a = pool.allocate(l).unwrap();
        let b = pool.allocate(l).unwrap();
        assert_ne!(a, b, "size {size}");
        // SAFETY: allocated above with `l`.
        unsafe {
            pool.deallocate(a, l);
            pool.deallocate(b, l);
        }
    }
}

/// A block handed out again is not mistaken for a free one: the key word
/// is cleared on allocation, whatever the program leaves in it.
#[test]
fn reused_blocks_free_normally() {
    let pool = HostPool::new();
    let l = layout(256, 8);
    for _ in 0..1000 {
        let p = pool.allocate(l).unwrap();
        // SAFETY: a live block of ours.
        unsafe { pool.free(p) }.unwrap();
    }
    let a = pool.allocate(l).unwrap();
    fill(a, 256, 9);
    // SAFETY: a live block of ours.
    unsafe { pool.free(a) }.unwrap();
}

/// `manages` covers every byte of the pool's spans (interior pointers
/// included), and nothing of another pool's or the heap's.
#[test]
fn manages_covers_interior_pointers() {
    let pool = HostPool::new();
    let other = HostPool::new();
    for size in [24usize, 4096, 3 << 20, 70 << 20] {
        let l = layout(size, 8);
        let p = pool.allocate(l).unwrap();
        for off in [0, 8, size / 2, size - 1] {
            // SAFETY: inside the block.
            let q = unsafe { p.as_ptr().add(off) };
            assert!(pool.manages(q), "size {size} offset {off}");
            assert!(!other.manages(q));
            assert_eq!(pool.owns(q), off == 0);
        }
        // SAFETY: allocated above with `l`.
        unsafe { pool.deallocate(p, l) };
    }
    let heap = Box::new(5u64);
    assert!(!pool.manages((&*heap as *const u64).cast()));
    assert!(!pool.manages(core::ptr::null()));
}

/// Issue 7 item 4: `owns`/`usable_size`/`manages` on one thread while others
/// allocate, free across threads and trim, so that span records are
/// released and reused under the reader (the reader's progress is only a
/// relaxed counter: it orders nothing). Run under ThreadSanitizer by
/// `ci/tsan.sh`, which reported the race on the old plain fields.
#[test]
fn item4_owns_races_trim_and_growth() {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::{Arc, mpsc};
    use std::time::{Duration, Instant};
    let pool = HostPool::new();
    let seen: Arc<[AtomicUsize; 16]> = Arc::new([const { AtomicUsize::new(0) }; 16]);
    let sweeps = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let (tx, rx) = mpsc::channel::<(usize, usize)>();
    let freer = {
        let pool = pool.clone();
        std::thread::spawn(move || {
            for (p, size) in rx {
                // SAFETY: handed over whole by the allocating thread.
                unsafe { pool.deallocate(NonNull::new(p as *mut u8).unwrap(), layout(size, 8)) };
            }
        })
    };
    let reader = {
        let (pool, seen, sweeps, stop) = (pool.clone(), seen.clone(), sweeps.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut hits = 0usize;
            while !stop.load(Ordering::Relaxed) {
                for s in seen.iter() {
                    let p = s.load(Ordering::Relaxed) as *const u8;
                    hits += usize::from(pool.owns(p));
                    hits += pool.usable_size(p).unwrap_or(0) & 1;
                    hits += usize::from(pool.manages(p.wrapping_add(8)));
                }
                sweeps.fetch_add(1, Ordering::Relaxed);
            }
            hits
        })
    };
    // Waits (for progress, not for time) until the reader has swept twice.
    let wait_for_reader = || {
        let start = sweeps.load(Ordering::Relaxed);
        let t = Instant::now();
        while sweeps.load(Ordering::Relaxed) < start + 2 {
            assert!(
                t.elapsed() < Duration::from_secs(120),
                "the reader made no progress"
            );
            std::thread::yield_now();
        }
    };
    let sizes = [48usize, 4096, 70_000, 1 << 20, 3 << 20, 65 << 20];
    for round in 0..40 {
        let mut blocks = Vec::new();
        for (i, slot) in seen.iter().enumerate() {
            let size = sizes[(round + i) % sizes.len()];
            let p = pool.allocate(layout(size, 8)).unwrap();
            slot.store(p.as_ptr() as usize, Ordering::Relaxed);
            blocks.push((p, size));
        }
        wait_for_reader();
        for (i, (p, size)) in blocks.into_iter().enumerate() {
            if i % 3 == 0 {
                tx.send((p.as_ptr() as usize, size)).unwrap();
            } else {
                // SAFETY: allocated above with this layout.
                unsafe { pool.deallocate(p, layout(size, 8)) };
            }
        }
        // Span records are released (and reused by the next round's growth)
        // while the reader still looks at their blocks.
        pool.trim();
        wait_for_reader();
    }
    drop(tx);
    freer.join().unwrap();
    stop.store(true, Ordering::Relaxed);
    reader.join().unwrap();
    pool.trim();
    assert_eq!(pool.stats().reserved_bytes, 0, "{:?}", pool.stats());
}

/// Issue 7 item 4, the minimal case: one thread asks `owns`/`usable_size`
/// about a 1 MiB block, then (ordered only by a relaxed flag, so nothing
/// orders its reads before the writes) the owner frees it and trims, which
/// releases the span record. ThreadSanitizer (`ci/tsan.sh`) reported this
/// read/write pair on the old plain record fields.
#[test]
fn item4_owns_then_trim_releases_the_record() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    let pool = HostPool::new();
    let l = layout(1 << 20, 64);
    let p = pool.allocate(l).unwrap();
    let addr = p.as_ptr() as usize;
    let phase = Arc::new(AtomicUsize::new(0));
    let asker = {
        let (pool, phase) = (pool.clone(), phase.clone());
        std::thread::spawn(move || {
            let owned =
                pool.owns(addr as *const u8) && pool.usable_size(addr as *const u8).is_some();
            phase.store(1, Ordering::Relaxed);
            while phase.load(Ordering::Relaxed) != 2 {
                std::thread::yield_now();
            }
            owned
        })
    };
    while phase.load(Ordering::Relaxed) != 1 {
        std::thread::yield_now();
    }
    // SAFETY: allocated above with `l`; the other thread only asked about it.
    unsafe { pool.deallocate(p, l) };
    assert!(pool.trim() >= 1 << 20);
    phase.store(2, Ordering::Relaxed);
    assert!(asker.join().unwrap());
    assert!(!pool.owns(addr as *const u8));
}

/// Issue 7 item 5: when a moving `mremap` fails after the kernel unmapped its
/// destination and another thread mapped and registered that range, the
/// failure path leaves that thread's mapping and pagemap entries alone, and
/// the block stays whole where it was.
#[test]
fn item5_failed_moving_remap_leaves_a_foreign_range_alone() {
    let _hook = crate::os::REMAP_FAULT_LOCK
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    use super::pagemap;
    use super::span;
    use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
    static FOREIGN: AtomicUsize = AtomicUsize::new(0);
    static FOREIGN_REC: AtomicUsize = AtomicUsize::new(0);
    fn other_thread_takes(dst: usize, len: usize) {
        // SAFETY: `dst..dst+len` was just unmapped; it is taken only if it
        // is still free.
        let taken = unsafe { crate::os::map_fixed_noreplace(dst, len) };
        assert!(taken, "could not take the range");
        // SAFETY: our fresh mapping.
        unsafe { (dst as *mut u8).write(0xAB) };
        let rec = span::alloc_record();
        // SAFETY: a fresh record, ours.
        unsafe { (*rec).init(dst, len, len, 1, span::HUGE_CLASS, 1) };
        assert!(pagemap::register(dst, len, rec));
        FOREIGN.store(dst, SeqCst);
        FOREIGN_REC.store(rec as usize, SeqCst);
    }
    let pool = HostPool::new();
    let l = layout(80 << 20, 64);
    let p = pool.allocate(l).unwrap();
    fill(p, 4096, 5);
    // Block growth in place: map the range right after the block.
    let len = 80 << 20;
    let after = (p.as_ptr() as usize + len) as *mut libc::c_void;
    // SAFETY: NOREPLACE takes the range only if free; unmapped below.
    let fence_map = unsafe {
        libc::mmap(
            after,
            super::size_class::GRANULE,
            libc::PROT_NONE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED_NOREPLACE,
            -1,
            0,
        )
    };
    crate::os::REMAP_FAULT_HOOK.store(other_thread_takes as fn(usize, usize) as usize, SeqCst);
    crate::os::REMAP_FAULT_AT.store(p.as_ptr() as usize, SeqCst);
    // SAFETY: a live huge block of ours, mapping smaller than the request.
    let grown = unsafe { pool.shared().grow_huge(p, 200 << 20) };
    crate::os::REMAP_FAULT_AT.store(0, SeqCst);
    if fence_map != libc::MAP_FAILED {
        // SAFETY: our guard mapping.
        unsafe { libc::munmap(fence_map, super::size_class::GRANULE) };
    }
    assert!(grown.is_none(), "the injected failure did not happen");
    let dst = FOREIGN.load(SeqCst);
    assert_ne!(dst, 0, "the moving remap was not tried");
    let rec = FOREIGN_REC.load(SeqCst) as *mut span::SpanMeta;
    assert_eq!(
        pagemap::lookup(dst),
        rec,
        "another thread's pagemap entry was wiped"
    );
    let mut vec = [0u8; 1];
    // SAFETY: mincore only reports; ENOMEM if the page is unmapped.
    let mapped = unsafe { libc::mincore(dst as *mut libc::c_void, 4096, vec.as_mut_ptr()) } == 0;
    assert!(mapped, "another thread's mapping was unmapped");
    // SAFETY: still mapped (checked above), written by the hook.
    assert_eq!(unsafe { (dst as *const u8).read() }, 0xAB);
    assert!(pool.owns(p.as_ptr()));
    check(p, 4096, 5);
    // Clean up the foreign range.
    pagemap::unregister(dst, 200 << 20);
    // SAFETY: the hook's mapping and record, nobody else's.
    unsafe {
        span::free_record(rec);
        libc::munmap(dst as *mut libc::c_void, 200 << 20);
        pool.deallocate(p, l);
    }
}

/// Issue 7 item 7: a huge block still in use when the last handle drops is
/// unmapped with the pool and no pagemap entry names the dead pool.
#[test]
fn item7_live_huge_block_is_unmapped_with_its_pool() {
    use super::pagemap;
    let pool = HostPool::new();
    // Keep the shared state's address from being reused by another pool.
    let shared = pool.shared().clone();
    let owner = &*shared as *const _ as usize;
    let l = layout(100 << 20, 64);
    let p = pool.allocate(l).unwrap();
    let q = pool.allocate(layout(1 << 20, 64)).unwrap();
    fill(p, 4096, 1);
    assert!(pool.manages(p.as_ptr()));
    drop(pool);
    for a in [p.as_ptr() as usize, q.as_ptr() as usize] {
        let rec = pagemap::lookup(a);
        // SAFETY: records are never unmapped.
        let named = !rec.is_null() && unsafe { (*rec).owner() } == owner;
        assert!(!named, "{a:#x}: a pagemap entry names the dropped pool");
        assert!(!shared.manages(a));
    }
    assert_eq!(shared.reserved.current(), 0);
    assert_eq!(shared.segments.current(), 0);
}

/// Issue 7 item 9: the retain limit counts only blocks of 1 MiB and up and
/// huge blocks: 50 MiB of free 64 KiB blocks do not make every 1 MiB free
/// go back to the OS under a 32 MiB limit.
#[test]
fn item9_retain_limit_ignores_small_classes() {
    let pool = HostPool::with_config(HostPoolConfig {
        retain_limit: Some(32 << 20),
        ..Default::default()
    });
    let small = layout(64 << 10, 64);
    let ps: Vec<_> = (0..800).map(|_| pool.allocate(small).unwrap()).collect();
    for p in ps {
        // SAFETY: allocated above with `small`.
        unsafe { pool.deallocate(p, small) };
    }
    pool.flush_thread_cache();
    assert!(pool.stats().cached_bytes >= 50 << 20, "{:?}", pool.stats());
    let big = layout(1 << 20, 64);
    // Warm up: two 1 MiB blocks, one ends on the central list.
    for _ in 0..2 {
        let a = pool.allocate(big).unwrap();
        let b = pool.allocate(big).unwrap();
        // SAFETY: allocated above with `big`.
        unsafe {
            pool.deallocate(a, big);
            pool.deallocate(b, big);
        }
    }
    let maps = pool.stats().os_maps;
    for _ in 0..20 {
        let a = pool.allocate(big).unwrap();
        let b = pool.allocate(big).unwrap();
        // SAFETY: allocated above with `big`.
        unsafe {
            pool.deallocate(a, big);
            pool.deallocate(b, big);
        }
    }
    let s = pool.stats();
    assert_eq!(s.os_maps, maps, "1 MiB blocks went back to the OS: {s:?}");
    assert!(s.retained_bytes <= 32 << 20, "{s:?}");
}

/// Issue 7 item 12: cache hits and misses are counted per request: a first
/// pass of fresh blocks is all misses, a second pass over freed ones all hits.
#[test]
fn item12_cache_hits_and_misses_are_counted_per_request() {
    let pool = HostPool::new();
    for size in [256usize, 64 << 10, 2 << 20, 70 << 20] {
        let l = layout(size, 8);
        let n = if size > 1 << 20 { 3 } else { 100 };
        let before = pool.stats();
        let ps: Vec<_> = (0..n).map(|_| pool.allocate(l).unwrap()).collect();
        let first = pool.stats();
        assert_eq!(
            first.cache_misses - before.cache_misses,
            n as u64,
            "size {size}"
        );
        assert_eq!(first.cache_hits, before.cache_hits, "size {size}");
        for &p in &ps {
            // SAFETY: allocated above with `l`.
            unsafe { pool.deallocate(p, l) };
        }
        let ps: Vec<_> = (0..n).map(|_| pool.allocate(l).unwrap()).collect();
        let second = pool.stats();
        assert_eq!(
            second.cache_hits - first.cache_hits,
            n as u64,
            "size {size}"
        );
        assert_eq!(second.cache_misses, first.cache_misses, "size {size}");
        for p in ps {
            // SAFETY: allocated above with `l`.
            unsafe { pool.deallocate(p, l) };
        }
    }
}

/// Issue 7 item 12 through the backend: `HostBackend::stats` reports the
/// pool's per-request counts.
#[test]
fn item12_backend_reports_per_request_counts() {
    use crate::allocator::{AllocRequest, TensorAllocator};
    let b = crate::backend::HostBackend::new();
    let req = AllocRequest::bytes(4096);
    let a: Vec<_> = (0..10).map(|_| b.allocate(&req).unwrap()).collect();
    let s = b.stats();
    assert_eq!((s.cache_hits, s.cache_misses), (0, 10));
    for x in &a {
        // SAFETY: allocated above, not used afterwards.
        unsafe { b.deallocate(x) }.unwrap();
    }
    let a: Vec<_> = (0..10).map(|_| b.allocate(&req).unwrap()).collect();
    let s = b.stats();
    assert_eq!((s.cache_hits, s.cache_misses), (10, 10));
    for x in &a {
        // SAFETY: allocated above, not used afterwards.
        unsafe { b.deallocate(x) }.unwrap();
    }
}

/// Issue 7 item 14: the `cached` statistic never wraps below zero while
/// threads hand blocks back and refill from the same class.
#[test]
fn item14_cached_never_wraps() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    let pool = HostPool::new();
    let stop = Arc::new(AtomicBool::new(false));
    let watcher = {
        let (pool, stop) = (pool.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut samples = 0u64;
            while !stop.load(Ordering::Relaxed) || samples < 1000 {
                let s = pool.stats();
                assert!(s.cached_bytes <= 1 << 40, "cached wrapped: {s:?}");
                assert!(s.retained_bytes <= 1 << 40, "retained wrapped: {s:?}");
                samples += 1;
            }
        })
    };
    let l = layout(1 << 20, 64);
    let workers: Vec<_> = (0..2)
        .map(|_| {
            let pool = pool.clone();
            std::thread::spawn(move || {
                for _ in 0..2000 {
                    let a = pool.allocate(l).unwrap();
                    let b = pool.allocate(l).unwrap();
                    // SAFETY: allocated above with `l`.
                    unsafe {
                        pool.deallocate(a, l);
                        pool.deallocate(b, l);
                    }
                }
            })
        })
        .collect();
    for w in workers {
        w.join().unwrap();
    }
    stop.store(true, Ordering::Relaxed);
    watcher.join().unwrap();
}

/// Issue 7 item 15: dropping a clone leaves this thread's cache alone.
#[test]
fn item15_dropping_a_clone_keeps_the_thread_cache() {
    let pool = HostPool::new();
    let l = layout(256, 8);
    let p = pool.allocate(l).unwrap();
    // SAFETY: allocated above with `l`.
    unsafe { pool.deallocate(p, l) };
    let central = pool.central_available(256);
    for _ in 0..10 {
        let c = pool.clone();
        drop(c);
    }
    assert_eq!(
        pool.central_available(256),
        central,
        "dropping a clone flushed the cache"
    );
    assert_eq!(
        pool.allocate(l).unwrap(),
        p,
        "the cached block is still first"
    );
}

/// A burst of small frees that overflows the thread cache parks the list
/// whole as the class's spare (`SPARE_MAX_SIZE`): every block of the burst,
/// wherever it sits (list, spare, central list), is still refused when
/// freed twice; the next burst is served by hits, counted per request; and
/// `trim` hands the spare back with the rest, so once nothing is live every
/// span is unmapped.
#[test]
fn parked_blocks_are_guarded_counted_and_trimmed() {
    use super::size_class::SPARE_MAX_SIZE;
    let pool = HostPool::new();
    let l = layout(64, 8);
    assert!(l.size() <= SPARE_MAX_SIZE);
    let n = 1000;
    let ps: Vec<_> = (0..n).map(|_| pool.allocate(l).unwrap()).collect();
    for &p in &ps {
        // SAFETY: allocated above with `l`.
        unsafe { pool.deallocate(p, l) };
    }
    for &p in &ps {
        // SAFETY: `p` is free: the pool must refuse it and change nothing.
        let e = unsafe { pool.free(p) }.unwrap_err();
        assert_eq!(
            e,
            AllocError::DoubleFree {
                addr: p.as_ptr() as usize
            }
        );
    }
    let before = pool.stats();
    let qs: Vec<_> = (0..n).map(|_| pool.allocate(l).unwrap()).collect();
    let after = pool.stats();
    assert_eq!(after.cache_hits - before.cache_hits, n as u64);
    assert_eq!(after.cache_misses, before.cache_misses);
    let mut sorted = qs.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(sorted.len(), n, "a block handed out twice");
    for &q in &qs {
        // SAFETY: allocated above with `l`.
        unsafe { pool.deallocate(q, l) };
    }
    pool.trim();
    let st = pool.stats();
    assert_eq!((st.reserved_bytes, st.segments), (0, 0), "{st:?}");
}

/// The thread cache's per-class record stays two words (the `mixed-1000`
/// workload touches many classes; at three words it ran 12% slower).
#[test]
fn class_record_is_two_words() {
    assert_eq!(super::thread_cache::CLASS_RECORD_BYTES, 16);
}
