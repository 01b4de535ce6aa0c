//! Cross-class reuse of one-block spans (classes above 512 KiB, whose span
//! is a single block): a class that has no free span takes a free span of a
//! neighbouring class and resizes it, instead of mapping a new one.
//!
//! Without it, a program whose big buffers vary in size (activations of
//! varying shapes) keeps a free span in every class it ever used, and maps
//! anew whenever the class at hand has none: 20 live blocks of random
//! 5–25 MiB sizes peaked at 2.9× what other allocators hold.
//!
//! The donor is the nearest class with a free span, bigger first (its tail
//! is unmapped), then smaller (grown with `mremap`, its pages kept, moved
//! without copying if the range after it is taken). Only classes within 2× of
//! the request donate: a 1 MiB buffer never chops a 64 MiB one, so tensor
//! programs whose sizes repeat keep their spans (and their speed), and a
//! span is never grown by more than its own size.
//!
//! [`donor`] is a pure function of the class and of which classes have a free
//! span, so the meta backend's model (`model.rs`) makes the same choice.
//! Per pool, [`FreeHint`] says which one-block classes may have a free span
//! centrally: set when a block is given back (or prewarmed), cleared when a
//! would-be donor turns out empty; a stale bit costs one lock.

use super::guard::set_key;
use super::pool::PoolShared;
use super::size_class::{NUM_CLASSES, blocks_per_span, class_size, span_bytes};
use super::transfer::FreeBlock;
use crate::sync::{AtomicU64, Ordering};
use core::ptr::NonNull;

/// The first class whose span is one block.
pub(crate) const FIRST: usize = {
    let mut c = 0;
    while c < NUM_CLASSES && blocks_per_span_const(c) != 1 {
        c += 1;
    }
    c
};

/// `blocks_per_span` in a const context (the same rule).
const fn blocks_per_span_const(c: usize) -> usize {
    let s = super::size_class::CLASS_SIZES[c];
    if s <= 8 << 10 {
        super::size_class::GRANULE / s
    } else if s < 1 << 20 {
        let n = (1 << 20) / s;
        if n < 1 { 1 } else { n }
    } else {
        1
    }
}

const _: () = assert!(NUM_CLASSES - FIRST <= 64, "one bit per one-block class");

/// Whether class `c` has one block per span (and takes part here).
#[inline(always)]
pub(crate) fn is_one_block(c: usize) -> bool {
    c >= FIRST
}

/// The class that lends its free span to class `c` (one-block), given which
/// classes have one: the smallest bigger class whose span is at most twice
/// `c`'s, else the biggest smaller class whose span is at least half of it.
pub fn donor(c: usize, has_free: impl Fn(usize) -> bool) -> Option<usize> {
    debug_assert!(is_one_block(c));
    let need = span_bytes(c);
    let bigger = (c + 1..NUM_CLASSES).take_while(|&d| span_bytes(d) <= 2 * need);
    let smaller = (FIRST..c).rev().take_while(|&d| 2 * span_bytes(d) >= need);
    bigger.chain(smaller).find(|&d| has_free(d))
}

/// Which one-block classes of a pool may have a free span on their central
/// list (bit `c - FIRST`). A hint: see the module docs.
#[derive(Debug)]
pub(crate) struct FreeHint(AtomicU64);

impl FreeHint {
    pub(crate) const fn new() -> Self {
        FreeHint(AtomicU64::new(0))
    }

    /// Class `c` (one-block) has a free span.
    #[inline]
    pub(crate) fn set(&self, c: usize) {
        debug_assert!(is_one_block(c) && blocks_per_span(c) == 1);
        self.0.fetch_or(1 << (c - FIRST), Ordering::Relaxed);
    }

    fn clear(&self, c: usize) {
        self.0.fetch_and(!(1 << (c - FIRST)), Ordering::Relaxed);
    }

    fn get(&self, c: usize) -> bool {
        self.0.load(Ordering::Relaxed) & (1 << (c - FIRST)) != 0
    }
}

/// A free span of another class, resized to be the one block of class `c`
/// (one-block) and adopted by `c`: `None` if no class within reach has one,
/// or if the OS refused to grow it (the span then goes back to its class,
/// free, and the caller maps as before).
pub(crate) fn steal(pool: &PoolShared, c: usize) -> Option<*mut FreeBlock> {
    let need = span_bytes(c);
    // Each failed try clears a bit, unless blocks keep arriving in that
    // class meanwhile: bounded, so a busy neighbour cannot keep us here.
    for _ in 0..2 * (NUM_CLASSES - FIRST) {
        let Some(d) = donor(c, |d| pool.large_free.get(d)) else {
            break;
        };
        let Some(rec) = pool.central(d).take_span(pool, d) else {
            pool.large_free.clear(d);
            // A block given back after `take_span` looked keeps its bit (its
            // own `set` may have run before our `clear`).
            if pool.central(d).has_incoming() {
                pool.large_free.set(d);
            }
            continue;
        };
        // SAFETY: `take_span` handed us the span: on no list, no block of it
        // in use, so its record and pages are ours until adopted.
        let (base, len) = unsafe { ((*rec).base(), (*rec).len()) };
        // SAFETY: base is a mapped span start, non-null.
        let p = unsafe { NonNull::new_unchecked(base as *mut u8) };
        let p = if len > need {
            // SAFETY: the span is ours and nothing refers to its tail.
            unsafe { pool.huge.shrink(pool, p, need) };
            p
        } else if len < need {
            // SAFETY: as above: a span of ours whose record describes it.
            match unsafe { pool.huge.grow(pool, p, need) } {
                Some(q) => q,
                None => {
                    // The OS refused: the span goes back to its class, its
                    // block free again (carrying the key, as every block on
                    // a free list does).
                    let b = base as *mut FreeBlock;
                    // SAFETY: ours, unchanged by the failed grow; its one
                    // block is free, of class `d > 0` (16 bytes and more).
                    unsafe {
                        pool.central(d).adopt_span(pool, d, rec);
                        set_key(b, pool.key());
                        (*b).next = core::ptr::null_mut();
                        pool.central(d).give_back(pool, d, b, b, 1);
                    }
                    return None;
                }
            }
        } else {
            p
        };
        // SAFETY: ours; the record now describes the one block of class `c`.
        // Atomic stores: a lock-free reader with a stale pointer (`owns`,
        // `usable_size`) may be looking at the record meanwhile.
        unsafe {
            (*rec).block.store(class_size(c), Ordering::Relaxed);
            (*rec).nblocks.store(1, Ordering::Relaxed);
            (*rec).class.store(c as u16, Ordering::Relaxed);
            pool.central(c).adopt_span(pool, c, rec);
        }
        return Some(p.as_ptr().cast());
    }
    None
}

#[cfg(test)]
mod tests {
    use super::{FIRST, donor};
    use crate::host::HostPool;
    use crate::host::size_class::{NUM_CLASSES, blocks_per_span, class_of, class_size, span_bytes};
    use core::alloc::Layout;
    use core::ptr::NonNull;

    const MIB: usize = 1 << 20;

    fn layout(size: usize) -> Layout {
        Layout::from_size_align(size, 64).unwrap()
    }

    /// Writes `seed ^ page` into the first byte of every page and the last byte.
    fn fill(p: NonNull<u8>, len: usize, seed: u8) {
        for o in (0..len).step_by(4096).chain([len - 1]) {
            // SAFETY: `o < len`, a live block of ≥ len bytes.
            unsafe { p.as_ptr().add(o).write(seed ^ (o >> 12) as u8) };
        }
    }

    fn check(p: NonNull<u8>, len: usize, seed: u8) {
        for o in (0..len).step_by(4096).chain([len - 1]) {
            // SAFETY: as in `fill`.
            let b = unsafe { p.as_ptr().add(o).read() };
            assert_eq!(b, seed ^ (o >> 12) as u8, "offset {o}");
        }
    }

    /// Allocates `first`, frees it (it stays in the thread cache), then
    /// allocates `second`; returns both addresses and the stats around the
    /// second allocation, after checking the second block is whole and
    /// freeing it.
    fn reuse(first: usize, second: usize) -> (NonNull<u8>, NonNull<u8>, usize, usize) {
        let pool = HostPool::new();
        let a = pool.allocate(layout(first)).unwrap();
        fill(a, first, 1);
        // SAFETY: allocated above with this layout.
        unsafe { pool.deallocate(a, layout(first)) };
        let maps = pool.stats().os_maps;
        let b = pool.allocate(layout(second)).unwrap();
        let reserved = pool.stats().reserved_bytes;
        assert_eq!(
            pool.usable_size(b.as_ptr()),
            Some(class_size(class_of(second)))
        );
        fill(b, second, 2);
        check(b, second, 2);
        let maps = pool.stats().os_maps - maps;
        // SAFETY: allocated above with this layout.
        unsafe { pool.deallocate(b, layout(second)) };
        // It comes back from its new class.
        let c = pool.allocate(layout(second)).unwrap();
        assert_eq!(c, b);
        // SAFETY: size-less free of a live block of ours.
        unsafe { pool.free(c).unwrap() };
        assert_eq!(pool.stats().os_maps, 1, "one mapping in all");
        assert!(pool.trim() > 0);
        assert_eq!(pool.stats().reserved_bytes, 0);
        (a, b, maps, reserved)
    }

    #[test]
    fn a_free_span_serves_a_smaller_class_in_place() {
        let (a, b, maps, reserved) = reuse(20 * MIB, 11 * MIB);
        assert_eq!(maps, 0);
        assert_eq!(a, b, "the span keeps its address, its tail unmapped");
        assert_eq!(reserved, span_bytes(class_of(11 * MIB)));
    }

    #[test]
    fn a_free_span_grows_to_serve_a_bigger_class() {
        let (_, _, maps, reserved) = reuse(9 * MIB, 15 * MIB);
        assert_eq!(maps, 0, "grown with mremap, not mapped anew");
        assert_eq!(reserved, span_bytes(class_of(15 * MIB)));
    }

    #[test]
    fn classes_more_than_twice_apart_keep_their_spans() {
        let pool = HostPool::new();
        let big = layout(40 * MIB);
        let a = pool.allocate(big).unwrap();
        // SAFETY: allocated above with `big`.
        unsafe { pool.deallocate(a, big) };
        let small = layout(MIB);
        let b = pool.allocate(small).unwrap();
        assert_eq!(pool.stats().os_maps, 2);
        assert_eq!(
            pool.stats().reserved_bytes,
            span_bytes(class_of(40 * MIB)) + span_bytes(class_of(MIB))
        );
        // SAFETY: allocated above with `small`.
        unsafe { pool.deallocate(b, small) };
        // The big span is still there for the next big request.
        let c = pool.allocate(big).unwrap();
        assert_eq!(c, a);
        // SAFETY: allocated above with `big`.
        unsafe { pool.deallocate(c, big) };
    }

    #[test]
    fn spans_freed_on_another_thread_are_reused_too() {
        let pool = HostPool::new();
        let l = layout(18 * MIB);
        let a = pool.allocate(l).unwrap();
        let addr = a.as_ptr() as usize;
        std::thread::scope(|s| {
            s.spawn(|| {
                // SAFETY: the block is handed to this thread, freed once.
                unsafe { pool.deallocate(NonNull::new(addr as *mut u8).unwrap(), l) };
                pool.flush_thread_cache();
            });
        });
        let b = pool.allocate(layout(13 * MIB)).unwrap();
        assert_eq!(b.as_ptr() as usize, addr);
        assert_eq!(pool.stats().os_maps, 1);
        // SAFETY: allocated above with this layout.
        unsafe { pool.deallocate(b, layout(13 * MIB)) };
    }

    #[test]
    fn live_set_of_varying_big_sizes_stays_near_its_peak() {
        // 8 live blocks of 5–25 MiB, each replaced 200 times at random.
        let pool = HostPool::new();
        let mut rng = 0x1234_5678u64;
        let mut next = |n: usize| {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            (rng % n as u64) as usize
        };
        let mut live: Vec<(NonNull<u8>, Layout)> = Vec::new();
        let (mut bytes, mut peak) = (0usize, 0usize);
        for step in 0..200 {
            if live.len() == 8 {
                let (p, l) = live.swap_remove(next(8));
                bytes -= l.size();
                // SAFETY: allocated below with `l`.
                unsafe { pool.deallocate(p, l) };
            }
            let l = layout(5 * MIB + next(20 * MIB));
            let p = pool.allocate(l).unwrap();
            fill(p, l.size(), step as u8);
            live.push((p, l));
            bytes += l.size();
            peak = peak.max(bytes);
        }
        let reserved = pool.stats().reserved.peak as usize;
        // Without reuse across classes this was several times the peak.
        assert!(
            reserved <= peak + peak / 2,
            "peak reserved {reserved} for a live peak of {peak}"
        );
        for (p, l) in live {
            // SAFETY: allocated above with `l`.
            unsafe { pool.deallocate(p, l) };
        }
    }

    /// Word 1 of a block (where a free block carries its pool's key).
    fn key_word(p: NonNull<u8>) -> usize {
        // SAFETY: a live block of ≥ 16 bytes, 8-aligned.
        unsafe { p.as_ptr().cast::<usize>().add(1).read() }
    }

    /// A span that moves to another class (shrunk or grown, its block taken
    /// off the donor's free list, key and all) is handed out with a clear
    /// key word, frees normally as a block of its new class however the
    /// program filled it, and a second free of it is still detected: no
    /// stale key makes a first free look like a double one, and the span is
    /// on its new class's lists only.
    #[test]
    fn an_adopted_span_frees_as_its_new_class_and_double_frees_are_caught() {
        // Down (tail unmapped), checked in the thread cache; up (grown with
        // mremap), checked on the central list.
        for (from, to, flush) in [(20 * MIB, 11 * MIB, false), (9 * MIB, 15 * MIB, true)] {
            let what = format!("{from} -> {to}");
            let pool = HostPool::new();
            let a = pool.allocate(layout(from)).unwrap();
            // SAFETY: a live block of ours: word 1 now carries the key.
            unsafe { pool.free(a).unwrap() };
            let l = layout(to);
            let b = pool.allocate(l).unwrap();
            assert_eq!(pool.stats().os_maps, 1, "{what}: the span was reused");
            assert_eq!(key_word(b), 0, "{what}: handed out with the key cleared");
            assert_eq!(pool.usable_size(b.as_ptr()), Some(class_size(class_of(to))));
            // The program fills all of it, word 1 included.
            // SAFETY: a live block of `to` bytes.
            unsafe { b.as_ptr().write_bytes(0xA5, to) };
            // SAFETY: a live block of ours, freed once.
            unsafe { pool.free(b) }.expect("a first free is not a double free");
            if flush {
                pool.flush_thread_cache();
            }
            // SAFETY: `b` is free: the pool must refuse it and change nothing.
            let e = unsafe { pool.free(b) }.unwrap_err();
            assert_eq!(
                e,
                crate::error::AllocError::DoubleFree {
                    addr: b.as_ptr() as usize
                },
                "{what}"
            );
            // The block is on its new class's lists once, on no other's.
            let c = pool.allocate(l).unwrap();
            let d = pool.allocate(l).unwrap();
            assert_eq!(c, b, "{what}");
            assert_ne!(c, d, "{what}: one block handed out twice");
            assert_eq!(pool.stats().os_maps, 2, "{what}");
            // SAFETY: allocated above with `l`.
            unsafe {
                pool.free(d).unwrap();
                pool.free(c).unwrap();
            }
            pool.flush_thread_cache();
            assert!(pool.trim() > 0);
            assert_eq!(pool.stats().reserved_bytes, 0, "{what}");
        }
    }

    /// Spans change class (shrunk, grown, moved by `mremap`) while another
    /// thread frees into the donor classes and a third reads span records
    /// lock-free (`owns`, `usable_size`, `manages` on addresses that were
    /// blocks a moment ago). Every block the allocating thread gets is whole
    /// and sized for its class; run under ThreadSanitizer by `ci/tsan.sh`
    /// (the records' fields are atomics).
    #[test]
    fn steals_race_lock_free_readers_and_cross_thread_frees() {
        use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
        use std::sync::{Arc, mpsc};
        use std::time::{Duration, Instant};
        let pool = HostPool::new();
        let seen: Arc<[AtomicUsize; 8]> = Arc::new([const { AtomicUsize::new(0) }; 8]);
        let sweeps = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, rx) = mpsc::channel::<(usize, usize)>();
        let freer = {
            let pool = pool.clone();
            std::thread::spawn(move || {
                for (p, size) in rx {
                    // SAFETY: handed over whole by the allocating thread.
                    unsafe { pool.deallocate(NonNull::new(p as *mut u8).unwrap(), layout(size)) };
                }
                pool.flush_thread_cache();
            })
        };
        let reader = {
            let (pool, seen, sweeps, stop) =
                (pool.clone(), seen.clone(), sweeps.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut hits = 0usize;
                while !stop.load(Ordering::Relaxed) {
                    for s in seen.iter() {
                        let p = s.load(Ordering::Relaxed) as *const u8;
                        hits += usize::from(pool.owns(p));
                        hits += pool.usable_size(p).unwrap_or(0) & 1;
                        hits += usize::from(pool.manages(p.wrapping_add(4096)));
                    }
                    sweeps.fetch_add(1, Ordering::Relaxed);
                }
                hits
            })
        };
        let mut rng = 0x9E37_79B9u64;
        let mut next = |n: usize| {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            (rng % n as u64) as usize
        };
        for round in 0..24 {
            let mut blocks = Vec::new();
            for slot in seen.iter() {
                let size = 5 * MIB + next(20 * MIB);
                let p = pool.allocate(layout(size)).unwrap();
                assert_eq!(
                    pool.usable_size(p.as_ptr()),
                    Some(class_size(class_of(size)))
                );
                // SAFETY: a live block of `size` bytes.
                unsafe {
                    p.as_ptr().write(round as u8);
                    p.as_ptr().add(size - 1).write(round as u8);
                }
                slot.store(p.as_ptr() as usize, Ordering::Relaxed);
                blocks.push((p, size));
            }
            for &(p, size) in &blocks {
                // SAFETY: live blocks written above; none overlaps another.
                unsafe {
                    assert_eq!(p.as_ptr().read(), round as u8);
                    assert_eq!(p.as_ptr().add(size - 1).read(), round as u8);
                }
            }
            // Waits for progress (the reader swept at least once), not time.
            let (start, t) = (sweeps.load(Ordering::Relaxed), Instant::now());
            while sweeps.load(Ordering::Relaxed) <= start {
                assert!(t.elapsed() < Duration::from_secs(120), "reader stuck");
                std::thread::yield_now();
            }
            for (i, (p, size)) in blocks.into_iter().enumerate() {
                if i % 2 == 0 {
                    tx.send((p.as_ptr() as usize, size)).unwrap();
                } else {
                    // SAFETY: allocated above with this layout.
                    unsafe { pool.deallocate(p, layout(size)) };
                }
            }
        }
        drop(tx);
        freer.join().unwrap();
        stop.store(true, Ordering::Relaxed);
        reader.join().unwrap();
        pool.flush_thread_cache();
        pool.trim();
        assert_eq!(pool.stats().reserved_bytes, 0, "every span accounted for");
    }

    #[test]
    fn donor_prefers_the_nearest_bigger_then_smaller_within_twice() {
        let c = class_of(12 * MIB);
        assert!(c >= FIRST && blocks_per_span(FIRST) == 1 && blocks_per_span(FIRST - 1) > 1);
        assert_eq!(donor(c, |_| false), None);
        assert_eq!(donor(c, |d| d == c + 1 || d == c + 3), Some(c + 1));
        assert_eq!(donor(c, |d| d == c - 1 || d == c + 3), Some(c + 3));
        assert_eq!(donor(c, |d| d == c - 1 || d == c - 4), Some(c - 1));
        // Never itself, never beyond 2× either way.
        assert_eq!(donor(c, |d| d == c), None);
        let far: Vec<usize> = (FIRST..NUM_CLASSES)
            .filter(|&d| span_bytes(d) > 2 * span_bytes(c) || 2 * span_bytes(d) < span_bytes(c))
            .collect();
        assert!(!far.is_empty());
        assert_eq!(donor(c, |d| far.contains(&d)), None);
        // Only one-block classes donate to the first one-block class.
        assert!(donor(FIRST, |d| d < FIRST).is_none());
    }
}
