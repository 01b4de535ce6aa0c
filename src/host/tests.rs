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

#[test]
fn size_overflow_when_rounded_is_an_error() {
    let pool = HostPool::new();
    let l = layout(isize::MAX as usize - 10, 1);
    let e = pool.allocate(l).unwrap_err();
    assert!(
        matches!(
            e,
            AllocError::InvalidLayout {
                problem: LayoutProblem::SizeOverflow,
                ..
            } | AllocError::OutOfMemory { .. }
        ),
        "{e}"
    );
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
fn dropping_pools_unmaps_them() {
    let before = crate::os::resident_bytes().unwrap();
    for _ in 0..20 {
        let pool = HostPool::new();
        let l = layout(8 << 20, 64);
        let p = pool.allocate(l).unwrap();
        // SAFETY: 8 MiB live block.
        unsafe {
            p.as_ptr().write_bytes(1, 8 << 20);
            pool.deallocate(p, l);
        }
    }
    let after = crate::os::resident_bytes().unwrap();
    assert!(
        after < before + (64 << 20),
        "RSS grew from {before} to {after}"
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
