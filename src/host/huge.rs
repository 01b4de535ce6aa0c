//! Huge blocks (> 64 MiB): one mapping each, cached by size for reuse.
//!
//! A freed huge block is kept in a small table (at most [`HUGE_SLOTS`]
//! entries, under the pool's retained limit) and handed out again to a
//! request of the same mapped size, or one at most 1/8 smaller — the same
//! rounding bound as the size classes. The choice is the pure function
//! [`pick`], which the meta backend uses too so its predictions match.
//!
//! Every huge span of the pool, cached or in use, is on the cache's span
//! list (under its lock), so tearing the pool down unmaps blocks still in
//! use too and leaves no pagemap entry naming the dead pool.
//!
//! Invariant (lock held): `n ≤ HUGE_SLOTS`; each cached block is on the
//! span list and carries the pool's key in word 1; the pool's `cached` and
//! `retained` counters include every cached block's length.

use super::guard::{key_of, set_key};
use super::pagemap;
use super::pool::PoolShared;
use super::size_class::GRANULE;
use super::span::{self, HUGE_CLASS, SpanMeta};
use crate::sync::{Ordering, RawLock, UnsafeCell};
use core::ptr::{NonNull, null_mut};

/// Cached huge mappings per pool.
pub const HUGE_SLOTS: usize = 16;

/// Index of the best cached length for a request that maps `need` bytes:
/// the smallest `len` with `need ≤ len ≤ need + need/8`. Ties: the lowest index.
pub fn pick(lens: &[usize], need: usize) -> Option<usize> {
    let mut best: Option<usize> = None;
    for (i, &len) in lens.iter().enumerate() {
        if len >= need && len - need <= need / 8 && best.is_none_or(|b| len < lens[b]) {
            best = Some(i);
        }
    }
    best
}

/// Index of the cached length to resize for a request of `need` bytes when
/// [`pick`] finds none: the smallest `len` in `(need, 2·need]` (its tail is
/// unmapped), else the biggest in `[need/2, need)` (grown with `mremap`,
/// keeping its pages). Ties: the lowest index. Without it, huge blocks of
/// varying sizes fill the cache with blocks no request fits (a test with
/// realloc-grown blocks of 64–300 MiB held 16 of them).
pub fn pick_resize(lens: &[usize], need: usize) -> Option<usize> {
    let bigger = lens
        .iter()
        .enumerate()
        .filter(|&(_, &l)| l > need && l - need <= need)
        .min_by_key(|&(i, &l)| (l, i));
    let smaller = || {
        lens.iter()
            .enumerate()
            .filter(|&(_, &l)| l < need && need - l <= l)
            .max_by_key(|&(i, &l)| (l, core::cmp::Reverse(i)))
    };
    bigger.or_else(smaller).map(|(i, _)| i)
}

#[derive(Debug)]
struct Slots {
    ptr: [usize; HUGE_SLOTS],
    len: [usize; HUGE_SLOTS],
    n: usize,
    /// Every huge span of the pool (linked through `SpanMeta::{prev,next}`).
    spans: *mut SpanMeta,
}

/// The cache.
#[derive(Debug)]
pub(crate) struct HugeCache {
    lock: RawLock,
    slots: UnsafeCell<Slots>,
}

// SAFETY: `slots` is only touched with `lock` held.
unsafe impl Sync for HugeCache {}
// SAFETY: as above.
unsafe impl Send for HugeCache {}

impl HugeCache {
    pub(crate) const fn new() -> Self {
        HugeCache {
            lock: RawLock::new(),
            slots: UnsafeCell::new(Slots {
                ptr: [0; HUGE_SLOTS],
                len: [0; HUGE_SLOTS],
                n: 0,
                spans: null_mut(),
            }),
        }
    }

    fn locked<R>(&self, f: impl FnOnce(&mut Slots) -> R) -> R {
        // SAFETY: the lock is held for the closure, so the `&mut` is unique.
        self.lock
            .with(|| self.slots.with_mut(|p| f(unsafe { &mut *p })))
    }

    /// A block mapping `need` bytes (a granule multiple): cached, or freshly
    /// mapped (then the `bool` is true: every byte reads zero).
    pub(crate) fn alloc(&self, pool: &PoolShared, need: usize) -> Option<(NonNull<u8>, bool)> {
        let hit = self.locked(|s| {
            let i = pick(&s.len[..s.n], need).or_else(|| pick_resize(&s.len[..s.n], need))?;
            let (p, l) = (s.ptr[i], s.len[i]);
            s.n -= 1;
            s.ptr[i] = s.ptr[s.n];
            s.len[i] = s.len[s.n];
            Some((p, l))
        });
        if let Some((p, l)) = hit {
            pool.uncache_huge(l);
            // SAFETY: non-null: a cached block.
            let p = unsafe { NonNull::new_unchecked(p as *mut u8) };
            // SAFETY: a cached huge block, ours now: clear its key word
            // (before a resize, which keeps or moves the first page).
            unsafe { set_key(p.as_ptr().cast::<super::transfer::FreeBlock>(), 0) };
            if l - need.min(l) > need / 8 {
                // SAFETY: taken off the cache: ours, not in use.
                unsafe { self.shrink(pool, p, need) };
            } else if l < need {
                // SAFETY: as above.
                match unsafe { self.grow(pool, p, need, true) } {
                    Some(q) => {
                        pool.count_requests(1, 0);
                        return Some((q, false));
                    }
                    None => {
                        // SAFETY: as above, unchanged by the failed grow.
                        unsafe { self.unmap(pool, p) };
                        let p = self.map(pool, need, false)?;
                        pool.count_requests(1, 1);
                        return Some((p, true));
                    }
                }
            }
            pool.count_requests(1, 0);
            return Some((p, false));
        }
        let p = self.map(pool, need, false)?;
        pool.count_requests(1, 1);
        Some((p, true))
    }

    /// Whether the huge block `p` is in the cache (the slow half of
    /// double-free detection).
    fn holds(&self, p: usize) -> bool {
        self.locked(|s| s.ptr[..s.n].contains(&p))
    }

    /// Gives the tail of an in-use huge block back to the OS, so that it maps
    /// `new_len` bytes from now on (a granule multiple, `0 < new_len ≤` its
    /// current length).
    ///
    /// # Safety
    /// - `p` is a huge block of `pool`, in use by the caller, and nothing
    ///   refers to its bytes from `new_len` on.
    pub(crate) unsafe fn shrink(&self, pool: &PoolShared, p: NonNull<u8>, new_len: usize) {
        debug_assert!(new_len > 0 && new_len.is_multiple_of(GRANULE));
        let rec = pagemap::lookup(p.as_ptr() as usize);
        debug_assert!(!rec.is_null());
        // SAFETY: the block is the caller's, so its record is live and only
        // the caller's thread touches it; the tail is unregistered before it
        // is unmapped, so no lookup finds the record through it afterwards.
        unsafe {
            let len = (*rec).len();
            debug_assert!(new_len <= len);
            if new_len >= len {
                return;
            }
            let tail = p.as_ptr().add(new_len);
            pagemap::unregister(tail as usize, len - new_len);
            (*rec).set_len(new_len);
            crate::os::unmap(NonNull::new_unchecked(tail), len - new_len);
            pool.reserved.sub((len - new_len) as u64);
        }
    }

    /// Grows an in-use huge block to map `new_len` bytes (a granule
    /// multiple above its length): with `in_place`, in place if the address
    /// range after it is free; else (or without `in_place`, for a caller
    /// that knows that range is taken) by moving its pages, without copying
    /// them, to a fresh granule-aligned range. Returns the block's address,
    /// or `None` with the block unchanged if the OS refused.
    ///
    /// # Safety
    /// - `p` is a huge block of `pool`, in use by the caller.
    pub(crate) unsafe fn grow(
        &self,
        pool: &PoolShared,
        p: NonNull<u8>,
        new_len: usize,
        in_place: bool,
    ) -> Option<NonNull<u8>> {
        let rec = pagemap::lookup(p.as_ptr() as usize);
        debug_assert!(!rec.is_null() && new_len.is_multiple_of(GRANULE));
        // SAFETY: the block is the caller's, so its record is live and only
        // the caller's thread touches it; every range is registered before
        // the block can be found through it and unregistered only once its
        // pages are gone.
        unsafe {
            let len = (*rec).len();
            debug_assert!(new_len > len);
            if in_place && crate::os::remap(p, len, new_len, None) {
                let tail = p.as_ptr().add(len);
                if pagemap::register(tail as usize, new_len - len, rec) {
                    (*rec).set_len(new_len);
                    pool.reserved.add((new_len - len) as u64);
                    return Some(p);
                }
                // The tail cannot be described: give it back, keep the block.
                crate::os::unmap(NonNull::new_unchecked(tail), new_len - len);
                return None;
            }
            let dst = crate::os::map_span(
                new_len,
                GRANULE,
                false,
                pool.huge_pages.load(Ordering::Relaxed),
            )?;
            if !pagemap::register(dst.as_ptr() as usize, new_len, rec) {
                crate::os::unmap(dst, new_len);
                return None;
            }
            // Unregister the old range *before* the kernel frees it: once it is
            // unmapped another thread may map and register it, and a late
            // unregister here would wipe that thread's entries. Nobody else
            // looks this block up meanwhile: it is the caller's.
            pagemap::unregister(p.as_ptr() as usize, len);
            // The pages move onto the start of `dst` without a resize (the
            // rest of `dst` stays fresh): a span made of several kernel
            // mappings (pages gathered by `large::gather`) can be moved in
            // one call (Linux 6.17), but not resized.
            if !crate::os::remap(p, len, len, Some(dst)) {
                // With MREMAP_FIXED the kernel unmaps `dst`'s start first and
                // may still fail: that range may be free now, or mapped (and
                // registered) by another thread. Touch only what is ours:
                // pagemap entries that still name our record, the rest of
                // `dst`, and its start only if it can be taken back without
                // replacing anything.
                pagemap::unregister_if(dst.as_ptr() as usize, new_len, rec);
                crate::os::unmap(NonNull::new_unchecked(dst.as_ptr().add(len)), new_len - len);
                crate::os::release_failed_remap_target(dst, len);
                // The old range is still ours and mapped: nobody else could
                // have registered it.
                let back = pagemap::register(p.as_ptr() as usize, len, rec);
                debug_assert!(back, "leaves of a registered range are never unmapped");
                return None;
            }
            // The kernel moved the pages: the old range is unmapped.
            (*rec).base.store(dst.as_ptr() as usize, Ordering::Relaxed);
            (*rec).set_len(new_len);
            pool.reserved.add((new_len - len) as u64);
            Some(dst)
        }
    }

    /// Takes the cache lock and keeps it (`pthread_atfork` prepare).
    pub(crate) fn lock_for_fork(&self) {
        self.lock.lock();
    }

    /// Releases the lock taken by [`lock_for_fork`](Self::lock_for_fork).
    ///
    /// # Safety
    /// - This thread (or, in a forked child, its parent thread) took the lock
    ///   with `lock_for_fork` and has not released it since.
    pub(crate) unsafe fn unlock_after_fork(&self) {
        // SAFETY: forwarded from the caller: the lock is held by us.
        unsafe { self.lock.unlock() };
    }

    /// Takes a huge block back: cached if there is room under the limit,
    /// else unmapped. Returns `false`, with nothing changed, for a detected
    /// double free (the block is in the cache already).
    ///
    /// # Safety
    /// - `p` is a huge block of `pool`, not in use, and not freed since it
    ///   was handed out unless this is a double free of a cached block.
    #[must_use]
    pub(crate) unsafe fn free(&self, pool: &PoolShared, p: NonNull<u8>, len: usize) -> bool {
        let b = p.as_ptr().cast::<super::transfer::FreeBlock>();
        // SAFETY: a huge block of ours (caller): mapped, far more than 16 bytes.
        if unsafe { key_of(b) } == pool.key() && self.holds(p.as_ptr() as usize) {
            return false;
        }
        // SAFETY: forwarded from the caller.
        unsafe { self.cache_or_unmap(pool, p, len, true) };
        true
    }

    /// Caches the huge block `p` of `len` bytes if a slot is free (and, with
    /// `limited`, the pool stays under its retained limit); else unmaps it.
    /// Returns whether it was kept.
    ///
    /// # Safety
    /// - `p` is a huge block of `pool` of `len` bytes, not in use.
    unsafe fn cache_or_unmap(
        &self,
        pool: &PoolShared,
        p: NonNull<u8>,
        len: usize,
        limited: bool,
    ) -> bool {
        let limit = if limited {
            pool.retain_limit.load(Ordering::Relaxed)
        } else {
            usize::MAX
        };
        let kept = self.locked(|s| {
            if s.n == HUGE_SLOTS
                || pool.retained.load(Ordering::Relaxed).saturating_add(len) > limit
            {
                return false;
            }
            // Counted before it can be taken (see `PoolShared::cache`).
            pool.cache_huge(len);
            // SAFETY: the block is ours (caller) and mapped.
            unsafe { set_key(p.as_ptr().cast(), pool.key()) };
            s.ptr[s.n] = p.as_ptr() as usize;
            s.len[s.n] = len;
            s.n += 1;
            true
        });
        if !kept {
            // SAFETY: forwarded from the caller.
            unsafe { self.unmap(pool, p) };
        }
        kept
    }

    /// Caches `count` fresh, populated blocks of `need` bytes (as many as fit).
    pub(crate) fn prewarm(&self, pool: &PoolShared, need: usize, count: usize) -> Option<usize> {
        let have = self.locked(|s| s.len[..s.n].iter().filter(|&&l| l == need).count());
        let mut mapped = 0;
        for _ in have..count.min(HUGE_SLOTS) {
            let p = self.map(pool, need, true)?;
            mapped += need;
            // Prewarm is explicit: the retained limit does not apply.
            // SAFETY: just mapped, never handed out.
            if !unsafe { self.cache_or_unmap(pool, p, need, false) } {
                break;
            }
        }
        Some(mapped)
    }

    /// Unmaps every cached block; returns the bytes.
    pub(crate) fn trim(&self, pool: &PoolShared) -> usize {
        let taken = self.locked(|s| {
            let t = (s.ptr, s.n);
            s.n = 0;
            t
        });
        let mut bytes = 0;
        for &p in &taken.0[..taken.1] {
            let s = pagemap::lookup(p);
            // SAFETY: cached huge blocks are live spans of ours.
            let len = unsafe { (*s).len() };
            bytes += len;
            // SAFETY: cached, so not in use.
            unsafe { self.unmap(pool, NonNull::new_unchecked(p as *mut u8)) };
        }
        pool.uncache_huge(bytes);
        bytes
    }

    /// Unmaps every huge span of the pool, cached or in use (teardown).
    ///
    /// # Safety
    /// - Nothing touches a huge block of `pool` afterwards.
    pub(crate) unsafe fn release_all(&self, pool: &PoolShared) {
        let mut s = self.locked(|st| {
            st.n = 0;
            core::mem::replace(&mut st.spans, null_mut())
        });
        while !s.is_null() {
            // SAFETY: a live record of ours, now off every list; the caller
            // guarantees nothing uses its block.
            unsafe {
                let next = (*s).next;
                let (base, len) = ((*s).base(), (*s).len());
                pagemap::unregister(base, len);
                span::free_record(s);
                crate::os::unmap(NonNull::new_unchecked(base as *mut u8), len);
                pool.reserved.sub(len as u64);
                pool.segments.sub(1);
                s = next;
            }
        }
    }

    /// Maps a huge span of `len` bytes and lists it.
    fn map(&self, pool: &PoolShared, len: usize, populate: bool) -> Option<NonNull<u8>> {
        let p = map_huge(pool, len, populate)?;
        let rec = pagemap::lookup(p.as_ptr() as usize);
        // SAFETY: the fresh span's record, ours, on no list; under the lock.
        self.locked(|s| unsafe { span::push_front(&mut s.spans, rec) });
        Some(p)
    }

    /// Unlists and unmaps a huge block.
    ///
    /// # Safety
    /// - `p` is a huge block of `pool`, not in use and not cached.
    unsafe fn unmap(&self, pool: &PoolShared, p: NonNull<u8>) {
        let rec = pagemap::lookup(p.as_ptr() as usize);
        debug_assert!(!rec.is_null());
        // SAFETY: a listed record of ours; under the lock.
        self.locked(|s| unsafe { span::unlink(&mut s.spans, rec) });
        // SAFETY: forwarded from the caller.
        unsafe { unmap_huge(pool, p) };
    }
}

/// Maps a span of `len` bytes (a granule multiple) with a fresh record
/// (described as a huge block) registered for it, counted in the pool's
/// statistics; on no list.
pub(crate) fn map_huge(pool: &PoolShared, len: usize, populate: bool) -> Option<NonNull<u8>> {
    let p = crate::os::map_span(
        len,
        GRANULE,
        populate,
        pool.huge_pages.load(Ordering::Relaxed),
    )?;
    let rec = span::alloc_record();
    if rec.is_null() {
        // SAFETY: just mapped, unpublished.
        unsafe { crate::os::unmap(p, len) };
        return None;
    }
    // SAFETY: a fresh record we own.
    unsafe {
        (*rec).init(
            p.as_ptr() as usize,
            len,
            len,
            1,
            HUGE_CLASS,
            pool as *const PoolShared as usize,
        );
        (*rec).next = null_mut();
    }
    if !pagemap::register(p.as_ptr() as usize, len, rec) {
        // SAFETY: never published.
        unsafe {
            span::free_record(rec);
            crate::os::unmap(p, len);
        }
        return None;
    }
    pool.reserved.add(len as u64);
    pool.segments.add(1);
    pool.grows.fetch_add(1, Ordering::Relaxed);
    Some(p)
}

/// # Safety
/// - `p` is a huge block of `pool`, not in use and not cached.
unsafe fn unmap_huge(pool: &PoolShared, p: NonNull<u8>) {
    let rec = pagemap::lookup(p.as_ptr() as usize);
    debug_assert!(!rec.is_null());
    // SAFETY: `rec` is the block's live record (caller); after unregistering
    // nothing finds it, so it can be recycled and the mapping dropped.
    unsafe {
        let len = (*rec).len();
        pagemap::unregister(p.as_ptr() as usize, len);
        span::free_record(rec);
        crate::os::unmap(p, len);
        pool.reserved.sub(len as u64);
        pool.segments.sub(1);
    }
}

#[cfg(test)]
mod tests {
    use super::{pick, pick_resize};

    #[test]
    fn pick_best_fit_within_an_eighth() {
        assert_eq!(pick(&[], 100), None);
        assert_eq!(pick(&[99, 113, 112, 104], 100), Some(3));
        assert_eq!(pick(&[113], 100), None);
        assert_eq!(pick(&[100, 100], 100), Some(0));
    }

    #[test]
    fn pick_resize_prefers_the_smallest_bigger_then_the_biggest_smaller() {
        assert_eq!(pick_resize(&[], 100), None);
        assert_eq!(pick_resize(&[300, 150, 180, 60], 100), Some(1));
        assert_eq!(pick_resize(&[201, 49, 60, 90], 100), Some(3));
        assert_eq!(pick_resize(&[201, 49], 100), None);
        assert_eq!(pick_resize(&[200, 50], 100), Some(0));
        assert_eq!(pick_resize(&[50, 50], 100), Some(0));
    }
}
