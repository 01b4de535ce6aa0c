//! Tests of the general-purpose behaviour (issue 8): thread-cache slow start
//! and prewarm as one mapping. Cross-class span reuse is tested in `large`.

use super::size_class::{
    SLOW_START_CAP, batch_at, blocks_per_span, cache_cap, class_of, initial_cap, next_cap,
};
use super::{HostPool, Prewarm};
use core::alloc::Layout;

#[test]
fn caps_start_small_and_double_to_the_cache_cap() {
    for c in [
        class_of(8),
        class_of(64),
        class_of(4096),
        class_of(200 << 10),
        class_of(8 << 20),
    ] {
        let mut cap = initial_cap(c);
        assert!((1..=SLOW_START_CAP).contains(&cap));
        let mut steps = 0;
        while cap < cache_cap(c) {
            let next = next_cap(c, cap);
            assert!(next > cap && next <= cache_cap(c));
            cap = next;
            steps += 1;
        }
        assert!(steps <= 6, "class {c}: {steps} doublings");
        assert_eq!(next_cap(c, cap), cache_cap(c));
        assert_eq!(
            batch_at(cache_cap(c)) as usize,
            (cache_cap(c) as usize / 2).max(1)
        );
    }
}

#[test]
fn a_new_thread_moves_a_few_blocks_first() {
    let pool = HostPool::new();
    let l = Layout::from_size_align(64, 8).unwrap();
    let c = class_of(64);
    let per_span = blocks_per_span(c);
    std::thread::scope(|s| {
        s.spawn(|| {
            let first = pool.allocate(l).unwrap();
            let took = batch_at(initial_cap(c)) as usize;
            assert_eq!(pool.central_available(64), per_span - took);
            // The rest of the first batch comes from the thread cache, then
            // a refill takes a batch twice as big.
            let mut v: Vec<_> = (0..took).map(|_| pool.allocate(l).unwrap()).collect();
            let second = batch_at(next_cap(c, initial_cap(c))) as usize;
            assert_eq!(pool.central_available(64), per_span - took - second);
            v.push(first);
            for p in v {
                // SAFETY: allocated above with `l`.
                unsafe { pool.deallocate(p, l) };
            }
        });
    });
}

/// The spans of one prewarm call are cut from one mapping, so they are
/// contiguous (separate mappings usually are too, but need not be), serve
/// without mapping and are all given back by trim.
#[test]
fn prewarm_maps_the_spans_of_a_class_as_one_range() {
    let pool = HostPool::new();
    let (size, count) = (1 << 20, 16);
    pool.prewarm(&Prewarm::new().blocks(size, count)).unwrap();
    let maps = pool.stats().os_maps;
    let l = Layout::from_size_align(size, 64).unwrap();
    let mut v: Vec<_> = (0..count).map(|_| pool.allocate(l).unwrap()).collect();
    assert_eq!(
        pool.stats().os_maps,
        maps,
        "prewarmed blocks came from the OS again"
    );
    v.sort();
    for w in v.windows(2) {
        assert_eq!(w[1].as_ptr() as usize - w[0].as_ptr() as usize, size);
    }
    for p in v {
        // SAFETY: allocated above with `l`.
        unsafe { pool.deallocate(p, l) };
    }
    assert!(pool.trim() >= count * size);
    assert_eq!(pool.stats().reserved_bytes, 0);
}

/// A cached huge block resized for another request (`huge::pick_resize`:
/// grown, possibly moved by `mremap`, or shrunk) is handed out with its key
/// word clear: its first free is not taken for a double free, however the
/// program filled it, and a second free is still caught.
#[test]
fn a_resized_huge_block_frees_normally_and_double_frees_are_caught() {
    const MIB: usize = 1 << 20;
    let pool = HostPool::new();
    let first = Layout::from_size_align(100 * MIB, 64).unwrap();
    let p = pool.allocate(first).unwrap();
    // SAFETY: a live block of ours: cached, word 1 carries the key.
    unsafe { pool.free(p).unwrap() };
    // Grown (100 → 150 MiB), then shrunk (150 → 90 MiB).
    for size in [150 * MIB, 90 * MIB] {
        let l = Layout::from_size_align(size, 64).unwrap();
        let b = pool.allocate(l).unwrap();
        assert_eq!(pool.stats().os_maps, 1, "{size}: resized, not mapped");
        // SAFETY: a live block of ≥ 16 bytes.
        let key = unsafe { b.as_ptr().cast::<usize>().add(1).read() };
        assert_eq!(key, 0, "{size}: handed out with the key cleared");
        // SAFETY: a live block of `size` bytes.
        unsafe { b.as_ptr().write_bytes(0x5A, size) };
        // SAFETY: a live block of ours, freed once.
        unsafe { pool.free(b) }.expect("a first free is not a double free");
        // SAFETY: `b` is cached: the pool must refuse it.
        let e = unsafe { pool.free(b) }.unwrap_err();
        assert_eq!(
            e,
            crate::error::AllocError::DoubleFree {
                addr: b.as_ptr() as usize
            }
        );
    }
    assert_eq!(pool.trim(), 90 * MIB);
    assert_eq!(pool.stats().reserved_bytes, 0);
}
