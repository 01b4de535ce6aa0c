//! A size class's central free list: where thread caches hand batches back
//! and refill from, and where spans are mapped, carved and released.
//!
//! The list protocol (lock-free frees in through a transfer stack, locked
//! refills out, counters raised before and lowered after) is
//! [`CentralList`], loom-modelled on its own; this file adds the spans:
//! growth, carving, trim, the retain limit. Accounting invariant, per class,
//! with the lock held and `incoming` drained:
//! `Σ span.nblocks == blocks in thread caches + blocks in use + free_len + bump_left`.

use super::central_list::{CentralList, Locked};
use super::large;
use super::pagemap;
use super::pool::PoolShared;
use super::size_class::{GRANULE, blocks_per_span, class_size, counts_against_limit, span_bytes};
use super::span::{self, SpanMeta};
use super::transfer::{Chain, FreeBlock};
use crate::os::UnmapBatch;
use crate::sync::Ordering;
use core::ptr::null_mut;

/// The span bookkeeping guarded by the class lock (beside the free list).
#[derive(Debug)]
struct Spans {
    /// Next uncarved block of the newest span and how many remain.
    bump: usize,
    bump_left: usize,
    bump_span: *mut SpanMeta,
    /// All spans of this class (doubly linked through `SpanMeta::{prev,next}`).
    spans: *mut SpanMeta,
}

// SAFETY: raw addresses of span records owned by the pool, touched only
// under the class lock.
unsafe impl Send for Spans {}

/// Everything the class lock guards.
type Inner = Locked<Spans>;

/// One class's central list.
#[derive(Debug)]
pub(crate) struct Central {
    list: CentralList<Spans>,
}

impl Central {
    pub(crate) const fn new() -> Self {
        Central {
            list: CentralList::new(Spans {
                bump: 0,
                bump_left: 0,
                bump_span: null_mut(),
                spans: null_mut(),
            }),
        }
    }

    /// Runs `f` with the lock held and the guarded state.
    #[inline]
    fn locked<R>(&self, f: impl FnOnce(&mut Inner) -> R) -> R {
        self.list.locked(f)
    }

    /// Runs `f` with the lock held and every free block (whole batches,
    /// `incoming`) moved onto the locked loose free list: for the code that
    /// walks or empties that list (trim, the retain limit, span takes,
    /// prewarm, teardown).
    fn gathered<R>(&self, f: impl FnOnce(&mut Inner) -> R) -> R {
        self.locked(|inner| {
            self.list.gather(inner);
            f(inner)
        })
    }

    /// Free blocks available without mapping (a racy hint when unlocked).
    #[cfg(test)]
    pub(crate) fn available(&self) -> usize {
        self.locked(|i| i.free_len + i.batched() + i.bump_left) + self.list.incoming_len()
    }

    /// Whether the block `b` is on this class's free list or incoming stack
    /// (takes the lock): the slow half of double-free detection.
    pub(crate) fn holds(&self, b: *mut FreeBlock) -> bool {
        self.list.holds(b)
    }

    /// Takes about `want` (≥ 1) blocks, at most `max` (≥ `want`: whole
    /// batches as other threads gave them back may bring more than `want`),
    /// mapping a new span if none is free. Returns the chain (empty only if
    /// the OS refused memory), whose `fresh` first blocks were carved from a
    /// span's never-used tail, so every byte of them but the link word reads
    /// zero.
    ///
    /// A one-block class with nothing free first runs `before_steal` (the
    /// caller's thread cache hands back its idle big blocks of other
    /// classes), then takes a neighbouring class's free span
    /// ([`large::steal`]; the block counts as not fresh, and its key word is
    /// cleared when it is handed out, as for any block off a free list), and
    /// maps only if neither has one.
    pub(crate) fn refill(
        &self,
        pool: &PoolShared,
        c: usize,
        want: usize,
        max: usize,
        before_steal: impl FnOnce(),
    ) -> Chain {
        if large::is_one_block(c) {
            let got = self.refill_with(pool, c, want, max, false);
            if got.n > 0 {
                return got;
            }
            before_steal();
            if let Some(b) = large::steal(pool, c) {
                // SAFETY: the span's one block, ours; its link word is ours to write.
                unsafe { (*b).next = null_mut() };
                return Chain {
                    head: b,
                    tail: b,
                    n: 1,
                    fresh: 0,
                };
            }
        }
        self.refill_with(pool, c, want, max, true)
    }

    /// [`refill`](Self::refill) from this class alone, mapping a span only if
    /// `may_grow`.
    fn refill_with(
        &self,
        pool: &PoolShared,
        c: usize,
        want: usize,
        max: usize,
        may_grow: bool,
    ) -> Chain {
        let size = class_size(c);
        // 1. From whole batches and the free list (`take`), then
        let more = |inner: &mut Inner, mut got: Chain| {
            // 2. from the newest span's uncarved tail, mapping one if needed.
            if got.n == 0
                && inner.bump_left == 0
                && !(may_grow && self.grow(pool, c, inner, false, None))
            {
                return Chain::EMPTY;
            }
            // Carved blocks go to the front of the chain.
            while got.n < want && inner.bump_left > 0 {
                let b = inner.bump as *mut FreeBlock;
                // SAFETY: `b` is an uncarved block inside our mapped span.
                unsafe { (*b).next = got.head };
                if got.n == 0 {
                    got.tail = b;
                }
                got.head = b;
                inner.bump += size;
                inner.bump_left -= 1;
                got.n += 1;
                got.fresh += 1;
            }
            got
        };
        // After the take: the blocks were counted before they were listed
        // (`give_back`, `grow`), so the counters never go below zero.
        self.list
            .take(want, max, more, |n| pool.uncache(c, n * size))
    }

    /// Hands a chain of `n` blocks back (lock-free).
    ///
    /// # Safety
    /// - `head → … → tail` is a chain of `n` free blocks of this class of
    ///   `pool`, owned by the caller.
    pub(crate) unsafe fn give_back(
        &self,
        pool: &PoolShared,
        c: usize,
        head: *mut FreeBlock,
        tail: *mut FreeBlock,
        n: usize,
    ) {
        // One-block classes through the incoming stack, which `has_incoming`
        // sees without the lock (`large::steal` keeps its hint right with it).
        let whole = !large::is_one_block(c);
        // SAFETY: forwarded from the caller.
        let retained = unsafe {
            self.list
                .give_back(head, tail, n, whole, || pool.cache(c, n * class_size(c)))
        };
        if !whole {
            pool.large_free.set(c);
        }
        if counts_against_limit(c) && retained > pool.retain_limit.load(Ordering::Relaxed) {
            self.enforce_limit(pool, c);
        }
    }

    /// Whether blocks wait on the lock-free incoming stack (a racy hint).
    pub(crate) fn has_incoming(&self) -> bool {
        self.list.incoming_len() > 0
    }

    /// Takes one free span of this one-block class off the class: its block
    /// off the free list (or the uncarved bump block), the span off the span
    /// list, its bytes off the cached (and retained) counters. `None` if the
    /// class has none free. The block keeps what its word 1 holds (the key,
    /// or zero if never handed out); the caller hands it out or lists it.
    pub(crate) fn take_span(&self, pool: &PoolShared, c: usize) -> Option<*mut SpanMeta> {
        debug_assert!(blocks_per_span(c) == 1);
        let s = self.gathered(|inner| {
            let b = if !inner.free.is_null() {
                let b = inner.free;
                // SAFETY: a well-formed free list of `free_len ≥ 1` nodes.
                inner.free = unsafe { (*b).next };
                inner.free_len -= 1;
                b as usize
            } else if inner.bump_left > 0 {
                inner.bump_left = 0;
                inner.bump_span = null_mut();
                inner.bump
            } else {
                return None;
            };
            let s = pagemap::lookup(b);
            debug_assert!(!s.is_null());
            // SAFETY: a live span of this class, on its list, under its lock;
            // one block, now off every list, so the span is wholly free.
            unsafe { span::unlink(&mut inner.spans, s) };
            Some(s)
        })?;
        // After the take, as in `refill`: counters never go below the lists.
        pool.uncache(c, class_size(c));
        Some(s)
    }

    /// Links a span (taken from another class and resized) into this
    /// class's span list and makes this pool its owner.
    ///
    /// # Safety
    /// - `s` is a live record of `pool` on no span list, describing one block
    ///   of class `c`.
    pub(crate) unsafe fn adopt_span(&self, pool: &PoolShared, c: usize, s: *mut SpanMeta) {
        debug_assert!(blocks_per_span(c) == 1);
        // SAFETY: the record is the caller's (contract); `owner` is an
        // atomic (lock-free readers), the links are edited under the lock.
        self.locked(|inner| unsafe {
            (*s).owner
                .store(pool as *const PoolShared as usize, Ordering::Relaxed);
            span::push_front(&mut inner.spans, s);
        })
    }

    /// Takes the span `s` of a live block of this (one-block) class off its
    /// span list, for `large::shrink_in_place`.
    pub(crate) fn disown_span(&self, s: *mut SpanMeta) {
        // SAFETY: `s` is on this class's span list (a live block's span
        // stays there), whose links are edited under the lock.
        self.locked(|inner| unsafe { span::unlink(&mut inner.spans, s) })
    }

    /// Maps one span and makes it the bump span. Lock held.
    ///
    /// With `premapped`, the span is that fresh, unpublished range of
    /// `span_bytes(c)` bytes (part of a bigger mapping, see
    /// [`prewarm`](Self::prewarm)) instead of a new mapping; it is unmapped
    /// if the span cannot be set up.
    fn grow(
        &self,
        pool: &PoolShared,
        c: usize,
        inner: &mut Inner,
        populate: bool,
        premapped: Option<usize>,
    ) -> bool {
        let len = span_bytes(c);
        let base = match premapped {
            Some(base) => base,
            None => match crate::os::map_span(
                len,
                GRANULE,
                populate,
                pool.huge_pages.load(Ordering::Relaxed),
            ) {
                Some(base) => base.as_ptr() as usize,
                None => return false,
            },
        };
        let rec = span::alloc_record();
        if rec.is_null() {
            // SAFETY: just mapped, unpublished.
            unsafe { crate::os::unmap(core::ptr::NonNull::new_unchecked(base as *mut u8), len) };
            return false;
        }
        let nblocks = blocks_per_span(c);
        // SAFETY: `rec` is a fresh zeroed record we own.
        unsafe {
            (*rec).init(
                base,
                len,
                class_size(c),
                nblocks as u32,
                c as u16,
                pool as *const PoolShared as usize,
            );
        }
        if !pagemap::register(base, len, rec) {
            // SAFETY: the record is on no list and the mapping was never
            // handed out.
            unsafe {
                span::free_record(rec);
                crate::os::unmap(core::ptr::NonNull::new_unchecked(base as *mut u8), len);
            }
            return false;
        }
        // SAFETY: a live record on no list; the class lock is held.
        unsafe { span::push_front(&mut inner.spans, rec) };
        // The previous bump span's leftover blocks become ordinary free blocks.
        self.retire_bump(c, inner);
        inner.bump = base;
        inner.bump_left = nblocks;
        inner.bump_span = rec;
        pool.cache(c, nblocks * class_size(c));
        pool.reserved.add(len as u64);
        pool.segments.add(1);
        pool.grows.fetch_add(1, Ordering::Relaxed);
        true
    }

    fn retire_bump(&self, c: usize, inner: &mut Inner) {
        let size = class_size(c);
        while inner.bump_left > 0 {
            let b = inner.bump as *mut FreeBlock;
            // SAFETY: an uncarved block of a live span of ours.
            unsafe { (*b).next = inner.free };
            inner.free = b;
            inner.free_len += 1;
            inner.bump += size;
            inner.bump_left -= 1;
        }
        inner.bump_span = null_mut();
    }

    /// Maps spans (pages populated) until at least `count` blocks are free.
    /// Returns bytes mapped, or `None` if the OS refused.
    pub(crate) fn prewarm(&self, pool: &PoolShared, c: usize, count: usize) -> Option<usize> {
        self.gathered(|inner| {
            let len = span_bytes(c);
            let short = count.saturating_sub(inner.free_len + inner.bump_left);
            let spans = short.div_ceil(blocks_per_span(c));
            // Several spans: one populated mapping (2 MiB pages where it is
            // big enough), cut into spans, instead of one mapping each.
            let region = (spans > 1)
                .then(|| {
                    crate::os::map_span(
                        spans * len,
                        GRANULE,
                        true,
                        pool.huge_pages.load(Ordering::Relaxed),
                    )
                })
                .flatten();
            let mut mapped = 0;
            if let Some(region) = region {
                let base = region.as_ptr() as usize;
                for i in 0..spans {
                    if !self.grow(pool, c, inner, true, Some(base + i * len)) {
                        let rest = base + (i + 1) * len;
                        if i + 1 < spans {
                            // SAFETY: the spans after the failed one were never
                            // published; the failed one was unmapped by `grow`.
                            unsafe {
                                crate::os::unmap(
                                    core::ptr::NonNull::new_unchecked(rest as *mut u8),
                                    (spans - i - 1) * len,
                                )
                            };
                        }
                        return None;
                    }
                    mapped += len;
                }
            }
            while inner.free_len + inner.bump_left < count {
                if !self.grow(pool, c, inner, true, None) {
                    return None;
                }
                mapped += len;
            }
            if large::is_one_block(c) && inner.free_len + inner.bump_left > 0 {
                pool.large_free.set(c);
            }
            Some(mapped)
        })
    }

    /// Unlinks, unregisters and unmaps a span. Lock held.
    ///
    /// # Safety
    /// - `s` is a span of this class with no block in use or on any list.
    unsafe fn release_span(
        &self,
        pool: &PoolShared,
        inner: &mut Inner,
        s: *mut SpanMeta,
        out: &mut UnmapBatch,
    ) -> usize {
        // SAFETY: `s` is a live record of this class (caller); list edits under the lock.
        unsafe {
            let (base, len) = ((*s).base(), (*s).len());
            span::unlink(&mut inner.spans, s);
            if inner.bump_span == s {
                inner.bump_span = null_mut();
                inner.bump_left = 0;
            }
            pagemap::unregister(base, len);
            span::free_record(s);
            out.push(base, len);
            pool.reserved.sub(len as u64);
            pool.segments.sub(1);
            len
        }
    }

    /// Releases every span whose blocks are all free; with `discard`, also
    /// drops the pages of free blocks of two pages or more (keeping the
    /// first page, which holds the link). Returns bytes given back.
    pub(crate) fn trim(
        &self,
        pool: &PoolShared,
        c: usize,
        discard: bool,
        out: &mut UnmapBatch,
    ) -> usize {
        let size = class_size(c);
        self.gathered(|inner| {
            // 1. Count free blocks per span.
            let mut b = inner.free;
            while !b.is_null() {
                let s = pagemap::lookup(b as usize);
                debug_assert!(!s.is_null());
                // SAFETY: free blocks lie in live spans of this class.
                unsafe {
                    (*s).free_seen += 1;
                    b = (*b).next;
                }
            }
            if !inner.bump_span.is_null() {
                // SAFETY: the bump span is a live record.
                unsafe { (*inner.bump_span).free_seen += inner.bump_left as u32 };
            }
            // 2. Rebuild the free list without blocks of wholly free spans.
            let mut keep: *mut FreeBlock = null_mut();
            let mut kept = 0usize;
            let mut dropped = 0usize;
            let mut discarded = 0usize;
            let mut b = inner.free;
            while !b.is_null() {
                // SAFETY: as above.
                let (s, next) = unsafe { (pagemap::lookup(b as usize), (*b).next) };
                // SAFETY: as above.
                if unsafe { (*s).free_seen == (*s).nblocks() } {
                    dropped += 1;
                } else {
                    if discard && size >= 2 * crate::os::PAGE {
                        // SAFETY: the block is free; its first word (the link)
                        // stays resident, the rest is not relied on.
                        discarded += unsafe {
                            crate::os::discard(
                                (b as *mut u8).add(crate::os::PAGE),
                                size - crate::os::PAGE,
                            )
                        };
                    }
                    // SAFETY: relinking our own free block.
                    unsafe { (*b).next = keep };
                    keep = b;
                    kept += 1;
                }
                b = next;
            }
            inner.free = keep;
            inner.free_len = kept;
            // 3. Release wholly free spans; reset the scratch counts.
            let mut released = 0usize;
            let bump_blocks_released = {
                let bs = inner.bump_span;
                // SAFETY: live record when non-null.
                if !bs.is_null() && unsafe { (*bs).free_seen == (*bs).nblocks() } {
                    inner.bump_left
                } else {
                    0
                }
            };
            let mut s = inner.spans;
            while !s.is_null() {
                // SAFETY: live records of this class, under the lock.
                let next = unsafe { (*s).next };
                // SAFETY: as above.
                if unsafe { (*s).free_seen == (*s).nblocks() } {
                    // SAFETY: all its blocks are free and no longer on any list.
                    released += unsafe { self.release_span(pool, inner, s, out) };
                } else {
                    // SAFETY: as above.
                    unsafe { (*s).free_seen = 0 };
                }
                s = next;
            }
            pool.uncache(c, (dropped + bump_blocks_released) * size);
            released + discarded
        })
    }

    /// Over the retained limit: release free one-block spans of this class
    /// until the pool is back under it.
    #[cold]
    fn enforce_limit(&self, pool: &PoolShared, c: usize) {
        let size = class_size(c);
        let mut unmaps = UnmapBatch::new();
        self.gathered(|inner| {
            while pool.retained.load(Ordering::Relaxed) > pool.retain_limit.load(Ordering::Relaxed)
                && !inner.free.is_null()
            {
                let b = inner.free;
                // SAFETY: a free block of ours; one-block spans, so its span is wholly free.
                unsafe {
                    inner.free = (*b).next;
                    inner.free_len -= 1;
                    let s = pagemap::lookup(b as usize);
                    self.release_span(pool, inner, s, &mut unmaps);
                }
                pool.uncache(c, size);
            }
        })
    }

    /// Takes the class lock and keeps it (`pthread_atfork` prepare).
    pub(crate) fn lock_for_fork(&self) {
        self.list.lock_for_fork();
    }

    /// Releases the lock taken by [`lock_for_fork`](Self::lock_for_fork).
    ///
    /// # Safety
    /// - This thread (or, in a forked child, its parent thread) took the lock
    ///   with `lock_for_fork` and has not released it since.
    pub(crate) unsafe fn unlock_after_fork(&self) {
        // SAFETY: forwarded from the caller.
        unsafe { self.list.unlock_after_fork() };
    }

    /// Unmaps every span (pool teardown), blocks in use and blocks in
    /// thread caches included.
    ///
    /// # Safety
    /// - Nothing touches a block of this class afterwards (the last handle
    ///   is gone: thread caches forget their blocks without touching them).
    pub(crate) unsafe fn release_all(&self, pool: &PoolShared) {
        let mut unmaps = UnmapBatch::new();
        self.gathered(|inner| {
            while !inner.spans.is_null() {
                // SAFETY: the caller guarantees nothing uses these blocks.
                unsafe { self.release_span(pool, inner, inner.spans, &mut unmaps) };
            }
            inner.free = null_mut();
            inner.free_len = 0;
        })
    }
}
