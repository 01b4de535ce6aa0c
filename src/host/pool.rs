//! The pool: per-class central lists, the huge cache, and the public
//! [`HostPool`] handle.
//!
//! A `HostPool` is a cheap, clonable handle (`Arc`) to a [`PoolShared`],
//! which counts its handles. Dropping the last handle tears the pool down:
//! every span and huge block is unmapped and unregistered, whatever other
//! threads still cache (they forget those blocks untouched). Threads that
//! used the pool keep a reference to the shared state in their cache slot,
//! which keeps only its address (a few dozen KiB, no pool memory) until they
//! evict the slot or exit. Dropping a handle that is not the last does
//! nothing else.

use super::central::Central;
use super::guard;
use super::huge::HugeCache;
use super::large::{self, FreeHint};
use super::pagemap;
use super::prewarm::Prewarm;
use super::size_class::{
    MAX_ALIGN, MAX_CLASS_SIZE, NUM_CLASSES, class_for, counts_against_limit, huge_size,
};
use super::span::HUGE_CLASS;
use super::thread_cache::{self, ThreadCache};
use crate::allocator::Device;
use crate::error::{AllocError, LayoutProblem};
use crate::stats::{AtomicStat, Stat};
use crate::sync::{AtomicBool, AtomicU64, AtomicUsize, CachePadded, Ordering};
use core::alloc::Layout;
use core::ptr::NonNull;
use std::sync::Arc;

/// The shared state of one pool.
///
/// Invariants: `reserved` is the sum of the lengths of this pool's live
/// spans; `segments` their count; `cached` the bytes of blocks on central
/// lists, uncarved span tails and the huge cache, and `retained` the part
/// of it in classes of 1 MiB and up and the huge cache (what the retain
/// limit bounds). Both are raised before blocks are listed and lowered
/// after they are taken, so they may run ahead of the lists but never
/// below them (never below zero). `handles == 0` exactly when the pool was
/// torn down (it never rises again from zero).
#[derive(Debug)]
pub(crate) struct PoolShared {
    /// The double-free key (see `guard`).
    key: AtomicUsize,
    /// Live `HostPool` handles (1 for the static global pool, never dropped).
    handles: AtomicUsize,
    centrals: [CachePadded<Central>; NUM_CLASSES],
    pub(crate) huge: HugeCache,
    /// One-block classes that may have a free span (cross-class reuse).
    pub(crate) large_free: FreeHint,
    pub(crate) reserved: AtomicStat,
    pub(crate) segments: AtomicStat,
    pub(crate) grows: AtomicUsize,
    pub(crate) cached: AtomicUsize,
    pub(crate) retained: AtomicUsize,
    pub(crate) retain_limit: AtomicUsize,
    /// The most bytes in use seen by a big request (`large::over_budget`).
    pub(crate) peak_used: AtomicUsize,
    /// Requests served / those served by a fresh block (published by
    /// thread caches in batches).
    requests: AtomicU64,
    misses: AtomicU64,
    /// Map spans of 2 MiB and up 2 MiB-aligned with `MADV_HUGEPAGE`.
    pub(crate) huge_pages: AtomicBool,
}

/// Requests above this can never be mapped: the pagemap covers 47-bit
/// addresses (the user half of x86-64 and of aarch64 with 48-bit VAs).
pub(crate) const ADDRESS_SPACE: usize = 1 << 47;

static GLOBAL: PoolShared = PoolShared::new();

/// The process-wide pool behind the global allocator and the C ABI.
#[inline(always)]
pub(crate) fn global_pool() -> &'static PoolShared {
    &GLOBAL
}

impl PoolShared {
    pub(crate) const fn new() -> Self {
        PoolShared {
            // Replaced by a fresh key before use (`HostPool::with_config`,
            // `rekey` for the global pool); any nonzero value is correct.
            key: AtomicUsize::new(0x9E37_79B9_7F4A_7C15_u64 as usize),
            handles: AtomicUsize::new(1),
            centrals: [const { CachePadded::new(Central::new()) }; NUM_CLASSES],
            huge: HugeCache::new(),
            large_free: FreeHint::new(),
            reserved: AtomicStat::new(),
            segments: AtomicStat::new(),
            grows: AtomicUsize::new(0),
            cached: AtomicUsize::new(0),
            retained: AtomicUsize::new(0),
            retain_limit: AtomicUsize::new(usize::MAX),
            peak_used: AtomicUsize::new(0),
            requests: AtomicU64::new(0),
            misses: AtomicU64::new(0),
            huge_pages: AtomicBool::new(true),
        }
    }

    /// The double-free key (one relaxed load: a plain `mov` on x86-64).
    #[inline(always)]
    pub(crate) fn key(&self) -> usize {
        self.key.load(Ordering::Relaxed)
    }

    /// Draws a fresh key. Blocks freed under the old key keep it, which only
    /// means their double free goes undetected; nothing is refused wrongly.
    pub(crate) fn rekey(&self) {
        self.key.store(
            guard::fresh_key(self as *const Self as usize),
            Ordering::Relaxed,
        );
    }

    /// Counts `bytes` of free blocks of class `c` about to be listed; returns
    /// the retained bytes after (0 if the class does not count).
    #[inline]
    pub(crate) fn cache(&self, c: usize, bytes: usize) -> usize {
        self.cached.fetch_add(bytes, Ordering::Relaxed);
        if counts_against_limit(c) {
            self.retained.fetch_add(bytes, Ordering::Relaxed) + bytes
        } else {
            0
        }
    }

    /// Uncounts `bytes` of free blocks of class `c` just taken off the lists.
    #[inline]
    pub(crate) fn uncache(&self, c: usize, bytes: usize) {
        self.cached.fetch_sub(bytes, Ordering::Relaxed);
        if counts_against_limit(c) {
            self.retained.fetch_sub(bytes, Ordering::Relaxed);
        }
    }

    /// Counts a huge block about to be cached.
    pub(crate) fn cache_huge(&self, len: usize) {
        self.cached.fetch_add(len, Ordering::Relaxed);
        self.retained.fetch_add(len, Ordering::Relaxed);
    }

    /// Uncounts huge blocks just taken out of the cache.
    pub(crate) fn uncache_huge(&self, len: usize) {
        self.cached.fetch_sub(len, Ordering::Relaxed);
        self.retained.fetch_sub(len, Ordering::Relaxed);
    }

    /// Adds served requests (`misses` of them served by fresh blocks) to the
    /// cache statistics.
    #[inline]
    pub(crate) fn count_requests(&self, requests: u64, misses: u64) {
        if requests > 0 {
            self.requests.fetch_add(requests, Ordering::Relaxed);
        }
        if misses > 0 {
            self.misses.fetch_add(misses, Ordering::Relaxed);
        }
    }

    /// Whether the pool is still alive (a handle exists).
    #[inline]
    pub(crate) fn is_alive(&self) -> bool {
        self.handles.load(Ordering::Acquire) != 0
    }

    /// Takes a handle if the pool is alive, so that it cannot be torn down
    /// until [`release_handle`](Self::release_handle): for a thread that
    /// hands blocks back from a cache slot without holding a `HostPool`.
    pub(crate) fn acquire_handle(&self) -> bool {
        let mut n = self.handles.load(Ordering::Relaxed);
        while n != 0 {
            match self
                .handles
                .compare_exchange_weak(n, n + 1, Ordering::Acquire, Ordering::Relaxed)
            {
                Ok(_) => return true,
                Err(m) => n = m,
            }
        }
        false
    }

    /// Drops a handle; the last one tears the pool down (and says so).
    pub(crate) fn release_handle(&self) -> bool {
        // AcqRel: everything every other handle holder did happens before
        // the teardown (a load, not a fence, so ThreadSanitizer follows it).
        if self.handles.fetch_sub(1, Ordering::AcqRel) != 1 {
            return false;
        }
        // SAFETY: no handle is left, so no thread can reach the pool's
        // blocks through its API any more; thread caches forget theirs
        // untouched (`thread_cache::retire_slot`).
        unsafe { self.teardown() };
        true
    }

    /// Unmaps and unregisters every span and huge block.
    ///
    /// # Safety
    /// - No handle is left and nothing touches a block of the pool after.
    unsafe fn teardown(&self) {
        // SAFETY: forwarded from the caller.
        unsafe {
            self.huge.release_all(self);
            for c in 0..NUM_CLASSES {
                self.central(c).release_all(self);
            }
        }
        self.cached.store(0, Ordering::Relaxed);
        self.retained.store(0, Ordering::Relaxed);
    }

    #[inline(always)]
    pub(crate) fn central(&self, c: usize) -> &Central {
        &self.centrals[c]
    }

    /// A block for `layout` (size > 0), or null; [`alloc_error`](Self::alloc_error)
    /// says why. The hot path: no `Result` (48 bytes) crosses the thread-cache
    /// closure.
    #[inline(always)]
    pub(crate) fn alloc_raw(&self, cache: Option<&mut ThreadCache>, layout: Layout) -> *mut u8 {
        if let Some(c) = class_for(layout.size(), layout.align()) {
            return match cache {
                Some(tc) => tc.alloc(self, c),
                None => thread_cache::central_alloc(self, c).0,
            };
        }
        self.alloc_huge_raw(layout)
    }

    /// [`alloc_huge`](Self::alloc_huge) as a pointer (null on failure), out
    /// of line: its `Result` lives in this frame, not in the hot path's.
    #[cold]
    #[inline(never)]
    fn alloc_huge_raw(&self, layout: Layout) -> *mut u8 {
        self.alloc_huge(layout)
            .map_or(core::ptr::null_mut(), |(p, _)| p.as_ptr())
    }

    /// Why `alloc_raw(layout)` returned null.
    #[cold]
    pub(crate) fn alloc_error(&self, layout: Layout) -> AllocError {
        match huge_check(layout) {
            Err(e) => e,
            Ok(_) => self.oom(layout.size()),
        }
    }

    /// A zeroed block for `layout` (size > 0). The memset is skipped for a
    /// fresh block (a span's never-used tail or a new huge mapping), whose
    /// bytes the OS already zeroed. Never panics or allocates.
    pub(crate) fn alloc_zeroed(
        &self,
        cache: Option<&mut ThreadCache>,
        layout: Layout,
    ) -> Result<NonNull<u8>, AllocError> {
        let (p, fresh) = match class_for(layout.size(), layout.align()) {
            Some(c) => {
                let (p, fresh) = match cache {
                    Some(tc) => tc.alloc_fresh(self, c),
                    None => thread_cache::central_alloc(self, c),
                };
                (
                    NonNull::new(p).ok_or_else(|| self.oom(layout.size()))?,
                    fresh,
                )
            }
            None => self.alloc_huge(layout)?,
        };
        // A fresh class block's first word held the free-list link; a block
        // (class or huge) is at least 8 bytes and 8-aligned.
        let dirty = if fresh {
            layout.size().min(core::mem::size_of::<usize>())
        } else {
            layout.size()
        };
        // SAFETY: `p` is valid for `layout.size() ≥ dirty` bytes of writes.
        unsafe { p.as_ptr().write_bytes(0, dirty) };
        Ok(p)
    }

    #[cold]
    fn alloc_huge(&self, layout: Layout) -> Result<(NonNull<u8>, bool), AllocError> {
        let need = huge_check(layout)?;
        self.huge
            .alloc(self, need)
            .ok_or_else(|| self.oom(layout.size()))
    }

    /// Whether the block `p` of class `class` (`HUGE_CLASS` for a huge block)
    /// can hold `new_size` bytes at `align` where it is, such that freeing
    /// it later with a `new_size`/`align` layout finds the same class. A
    /// huge block keeps its address when the new size is still huge and fits
    /// its mapping; a tail wasting more than 1/8 of the new size is unmapped.
    ///
    /// # Safety
    /// - `p` is a live block of class `class` of this pool, owned by the caller.
    pub(crate) unsafe fn resize_in_place(
        &self,
        p: NonNull<u8>,
        class: u16,
        new_size: usize,
        align: usize,
    ) -> bool {
        if class != HUGE_CLASS {
            return class_for(new_size, align) == Some(class as usize);
        }
        if new_size <= MAX_CLASS_SIZE {
            return false;
        }
        let Some(need) = huge_size(new_size) else {
            return false;
        };
        let rec = pagemap::lookup(p.as_ptr() as usize);
        debug_assert!(!rec.is_null());
        // SAFETY: a live huge block of ours (caller), so its record is live.
        let len = unsafe { (*rec).len() };
        if need > len {
            return false;
        }
        if len - need > need / 8 {
            // SAFETY: the caller owns the block; bytes past `need ≥ new_size`
            // are not part of the resized block.
            unsafe { self.huge.shrink(self, p, need) };
        }
        true
    }

    /// Moves the live block `p` of class `class` down into the class of
    /// `new_size`/`align` where it is, without copying, when both are
    /// one-block classes and the new one is smaller (`large::shrink_in_place`):
    /// the block's address, or `None` (nothing changed) otherwise.
    ///
    /// # Safety
    /// - `p` is a live block of class `class` of this pool, owned by the
    ///   caller.
    pub(crate) unsafe fn resize_big(
        &self,
        p: NonNull<u8>,
        class: u16,
        new_size: usize,
        align: usize,
    ) -> Option<NonNull<u8>> {
        let c = class as usize;
        let to = class_for(new_size, align)?;
        if class == HUGE_CLASS || !large::is_one_block(to) || to >= c {
            return None;
        }
        // SAFETY: forwarded from the caller; `to < c`, both one-block
        // (`c` above the one-block `to`).
        unsafe { large::shrink_in_place(self, c, p, to) };
        Some(p)
    }

    #[cold]
    fn oom(&self, requested: usize) -> AllocError {
        let reserved = self.reserved.current() as usize;
        AllocError::OutOfMemory {
            device: Device::Host,
            requested,
            allocated: reserved.saturating_sub(self.cached.load(Ordering::Relaxed)),
            reserved,
            hint: Some("the OS refused a mapping; free memory or call trim()"),
        }
    }

    /// Frees a block allocated with `layout`. Returns `false`, with
    /// nothing changed, for a detected double free (see `guard`).
    ///
    /// # Safety
    /// - `p` was returned by `alloc` of this pool with this `layout` and is
    ///   not used again; freeing it twice is detected where `guard` says.
    #[inline(always)]
    #[must_use]
    pub(crate) unsafe fn free(
        &self,
        cache: Option<&mut ThreadCache>,
        p: NonNull<u8>,
        layout: Layout,
    ) -> bool {
        if let Some(c) = class_for(layout.size(), layout.align()) {
            // SAFETY: forwarded from the caller: a block of class `c` of ours.
            return unsafe {
                match cache {
                    Some(tc) => tc.free(self, c, p.as_ptr()),
                    None => thread_cache::central_free(self, c, p.as_ptr()),
                }
            };
        }
        // SAFETY: forwarded: a huge block of ours.
        unsafe { self.free_huge(p) }
    }

    #[cold]
    #[must_use]
    unsafe fn free_huge(&self, p: NonNull<u8>) -> bool {
        let rec = pagemap::lookup(p.as_ptr() as usize);
        debug_assert!(!rec.is_null());
        // SAFETY: a huge block of ours (caller), so its record is live.
        let len = unsafe { (*rec).len() };
        // SAFETY: forwarded from the caller.
        unsafe { self.huge.free(self, p, len) }
    }

    /// The block `p` starts, if it is one of this pool's: `(class, usable size)`
    /// (`class == HUGE_CLASS` for huge blocks).
    #[inline]
    pub(crate) fn block_info(&self, p: usize) -> Option<(u16, usize)> {
        let rec = pagemap::lookup(p);
        if rec.is_null() {
            return None;
        }
        // SAFETY: records are never unmapped; a stale read yields a record
        // whose owner check fails or whose fields describe another span.
        let r = unsafe { &*rec };
        if r.owner() != self as *const PoolShared as usize || !r.is_block_start(p) {
            return None;
        }
        Some((r.class(), r.block()))
    }

    /// Whether `p` is any address inside memory this pool has mapped for
    /// blocks (a block start, an interior pointer, a free block, padding).
    #[inline]
    pub(crate) fn manages(&self, p: usize) -> bool {
        let rec = pagemap::lookup(p);
        if rec.is_null() {
            return false;
        }
        // SAFETY: as in `block_info`.
        let r = unsafe { &*rec };
        r.owner() == self as *const PoolShared as usize && r.contains(p)
    }

    /// Frees a block without its size (C `free`): `ForeignPointer` if `p`
    /// does not start a block of this pool, `DoubleFree` if the block is
    /// free already (see `guard` for what is detected); either way nothing
    /// changes.
    ///
    /// # Safety
    /// - If `p` is a block of this pool, it is not in use any more.
    pub(crate) unsafe fn free_unsized(
        &self,
        cache: Option<&mut ThreadCache>,
        p: NonNull<u8>,
    ) -> Result<(), AllocError> {
        let addr = p.as_ptr() as usize;
        let (class, _) = self
            .block_info(addr)
            .ok_or(AllocError::ForeignPointer { addr })?;
        // SAFETY: the pagemap says `p` starts a block of class `class` of ours.
        let freed = unsafe {
            if class == HUGE_CLASS {
                self.free_huge(p)
            } else {
                let c = class as usize;
                match cache {
                    Some(tc) => tc.free(self, c, p.as_ptr()),
                    None => thread_cache::central_free(self, c, p.as_ptr()),
                }
            }
        };
        if freed {
            Ok(())
        } else {
            Err(AllocError::DoubleFree { addr })
        }
    }

    /// Grows a huge block to hold `new_size > MAX_CLASS_SIZE` bytes without
    /// copying (see [`HugeCache::grow`]); `None`, the block unchanged, if the
    /// OS refused. Used by `realloc` after [`resize_in_place`](Self::resize_in_place)
    /// said no.
    ///
    /// # Safety
    /// - `p` is a live huge block of this pool, owned by the caller, whose
    ///   mapping is smaller than `new_size` rounded to the granule.
    pub(crate) unsafe fn grow_huge(&self, p: NonNull<u8>, new_size: usize) -> Option<NonNull<u8>> {
        debug_assert!(new_size > MAX_CLASS_SIZE);
        // SAFETY: forwarded from the caller.
        unsafe { self.huge.grow(self, p, huge_size(new_size)?, true) }
    }

    /// Takes every lock of this pool (each class lock in class order, then
    /// the huge cache's) and the span arena's, and keeps them: the
    /// `pthread_atfork` prepare handler, so that no lock is held mid-update
    /// by a thread that does not exist in the child. Every other path takes
    /// at most a class or the huge lock and then the arena's, never two class
    /// locks, so this order cannot deadlock against them.
    pub(crate) fn lock_for_fork(&self) {
        for c in 0..NUM_CLASSES {
            self.central(c).lock_for_fork();
        }
        self.huge.lock_for_fork();
        super::span::lock_for_fork();
    }

    /// Releases what [`lock_for_fork`](Self::lock_for_fork) took (the
    /// parent and child `pthread_atfork` handlers).
    ///
    /// # Safety
    /// - `lock_for_fork` ran on this thread (or, in a forked child, on the
    ///   parent thread that forked) and nothing released its locks since.
    pub(crate) unsafe fn unlock_after_fork(&self) {
        // SAFETY: forwarded from the caller: each of these locks is held by
        // the `lock_for_fork` call.
        unsafe {
            super::span::unlock_after_fork();
            self.huge.unlock_after_fork();
            for c in (0..NUM_CLASSES).rev() {
                self.central(c).unlock_after_fork();
            }
        }
    }

    /// A statistics snapshot: a few relaxed loads, no lock, no allocation.
    pub(crate) fn stats(&self) -> PoolStats {
        PoolStats {
            reserved_bytes: self.reserved.current() as usize,
            segments: self.segments.current() as usize,
            cached_bytes: self.cached.load(Ordering::Relaxed),
            retained_bytes: self.retained.load(Ordering::Relaxed),
            os_maps: self.grows.load(Ordering::Relaxed),
            cache_misses: self.misses.load(Ordering::Relaxed),
            // Misses may be published a batch ahead of their requests.
            cache_hits: self
                .requests
                .load(Ordering::Relaxed)
                .saturating_sub(self.misses.load(Ordering::Relaxed)),
            reserved: self.reserved.get(),
            segment: self.segments.get(),
        }
    }

    /// Trims every class and the huge cache. Returns bytes given back.
    pub(crate) fn trim(&self) -> usize {
        let mut bytes = self.huge.trim(self);
        // One batch across classes: spans of neighbouring classes are often
        // neighbours in memory too, and are unmapped together.
        let mut unmaps = crate::os::UnmapBatch::new();
        for c in 0..NUM_CLASSES {
            bytes += self.central(c).trim(self, c, true, &mut unmaps);
        }
        unmaps.flush();
        bytes
    }

    pub(crate) fn prewarm(&self, plan: &Prewarm) -> Result<usize, AllocError> {
        let mut mapped = 0;
        for &(size, count) in plan.entries() {
            let got = match class_for(size, 8) {
                Some(c) => self.central(c).prewarm(self, c, count),
                None => {
                    let need = huge_size(size).ok_or(AllocError::InvalidLayout {
                        size,
                        align: 8,
                        problem: LayoutProblem::SizeOverflow,
                    })?;
                    self.huge.prewarm(self, need, count)
                }
            };
            mapped += got.ok_or_else(|| self.oom(size))?;
        }
        Ok(mapped)
    }
}

/// The huge mapping a layout that no size class serves needs, or why it
/// can never be served (not retryable: no amount of freeing helps).
fn huge_check(layout: Layout) -> Result<usize, AllocError> {
    let (size, align) = (layout.size(), layout.align());
    if align > MAX_ALIGN {
        return Err(AllocError::InvalidLayout {
            size,
            align,
            problem: LayoutProblem::AlignTooLarge { max: MAX_ALIGN },
        });
    }
    let need = huge_size(size).ok_or(AllocError::InvalidLayout {
        size,
        align,
        problem: LayoutProblem::SizeOverflow,
    })?;
    if need > ADDRESS_SPACE {
        return Err(AllocError::NeverFits {
            device: Device::Host,
            requested: need,
            limit: ADDRESS_SPACE,
        });
    }
    Ok(need)
}

/// Configuration of a [`HostPool`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct HostPoolConfig {
    /// Bytes of free memory the pool may keep cached (huge blocks and blocks
    /// of 1 MiB and up); beyond it, freed big blocks go back to the OS at
    /// once. `None`: no limit (memory goes back on [`HostPool::trim`]).
    pub retain_limit: Option<usize>,
    /// Do not advise transparent huge pages. By default spans of 2 MiB and
    /// up are mapped 2 MiB-aligned with `MADV_HUGEPAGE`: fresh tensor buffers
    /// fault in 512× fewer times and use fewer TLB entries, at the price that
    /// a big block touched sparsely may become resident in 2 MiB units. Has no
    /// effect where THP is `never`.
    pub no_huge_pages: bool,
}

/// Statistics of a pool (cheap to read: a few relaxed loads).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PoolStats {
    /// Bytes mapped from the OS.
    pub reserved_bytes: usize,
    /// Number of mappings.
    pub segments: usize,
    /// Free bytes held centrally (not counting thread caches), approximate.
    pub cached_bytes: usize,
    /// The part of `cached_bytes` the retain limit bounds: free blocks of
    /// 1 MiB and up, and cached huge blocks.
    pub retained_bytes: usize,
    /// Mappings ever made.
    pub os_maps: usize,
    /// Requests served by a block that was handed out before (counted per
    /// request; each thread's counts are added when it refills, flushes,
    /// exits or reads these statistics).
    pub cache_hits: u64,
    /// Requests served by a fresh block: a never-used part of a span or a
    /// new huge mapping (memory the OS has to provide).
    pub cache_misses: u64,
    /// Reserved bytes: current, peak, total mapped, total unmapped.
    pub reserved: Stat,
    /// Mappings: current, peak, total made, total unmapped.
    pub segment: Stat,
}

/// A host memory pool: size classes, per-thread caches, prewarm and trim.
///
/// ```
/// use tensorpool::host::HostPool;
/// use core::alloc::Layout;
/// let pool = HostPool::new();
/// let l = Layout::from_size_align(600 << 10, 64).unwrap();
/// let p = pool.allocate(l).unwrap();
/// assert!(pool.usable_size(p.as_ptr()).unwrap() >= 600 << 10);
/// // SAFETY: allocated just above with `l`, not used afterwards.
/// unsafe { pool.deallocate(p, l) };
/// ```
///
/// Every block of 4 KiB or more is at least 64-byte aligned, and page aligned
/// from 32 KiB up, whatever alignment was asked. Dropping the last handle
/// unmaps all of the pool's memory, huge blocks included, even while other
/// threads still cache blocks of it: pointers still handed out dangle (the
/// backends keep the pool alive for as long as any of their allocations is
/// live). Dropping any other handle changes nothing.
///
/// A block freed twice (size-less [`free`](Self::free) or sized
/// [`deallocate`](Self::deallocate)) is detected when the first free left
/// it in this thread's cache, the pool's central list or its huge cache;
/// the second free then changes nothing. Blocks of 8 bytes are not checked.
#[derive(Debug)]
pub struct HostPool {
    shared: Arc<PoolShared>,
}

impl Clone for HostPool {
    fn clone(&self) -> Self {
        self.shared.handles.fetch_add(1, Ordering::Relaxed);
        HostPool {
            shared: self.shared.clone(),
        }
    }
}

impl Default for HostPool {
    fn default() -> Self {
        Self::new()
    }
}

impl HostPool {
    /// A pool with the default configuration. Maps nothing.
    pub fn new() -> Self {
        Self::with_config(HostPoolConfig::default())
    }

    /// A pool with `config`. Maps nothing.
    pub fn with_config(config: HostPoolConfig) -> Self {
        let shared = Arc::new(PoolShared::new());
        shared.rekey();
        shared
            .retain_limit
            .store(config.retain_limit.unwrap_or(usize::MAX), Ordering::Relaxed);
        shared
            .huge_pages
            .store(!config.no_huge_pages, Ordering::Relaxed);
        HostPool { shared }
    }

    /// Allocates a block for `layout`. Size 0 gives a dangling, aligned
    /// pointer that owns no memory.
    #[inline(always)] // thin: a non-inlined call returns the 48-byte Result through memory
    pub fn allocate(&self, layout: Layout) -> Result<NonNull<u8>, AllocError> {
        if layout.size() == 0 {
            return Ok(dangling(layout));
        }
        // SAFETY: this thread's cache, the only reference made from it, gone
        // before the next call that enters a cache.
        let tc = unsafe { thread_cache::pool_cache(&self.shared).as_mut() };
        let p = self.shared.alloc_raw(tc, layout);
        NonNull::new(p).ok_or_else(|| self.shared.alloc_error(layout))
    }

    /// Allocates a zeroed block for `layout`.
    pub fn allocate_zeroed(&self, layout: Layout) -> Result<NonNull<u8>, AllocError> {
        if layout.size() == 0 {
            return Ok(dangling(layout));
        }
        // The pool's own zeroing: no memset on fresh pages (the OS zeroed them).
        thread_cache::with_pool_cache(&self.shared, |tc| self.shared.alloc_zeroed(tc, layout))
    }

    /// Frees a block. A detected double free (see the type docs) changes
    /// nothing; [`free`](Self::free) reports it as an error.
    ///
    /// # Safety
    /// - `ptr` was returned by [`allocate`](Self::allocate) (or
    ///   `allocate_zeroed`) of this pool (any clone) with this `layout`, and
    ///   is not used afterwards.
    #[inline(always)]
    pub unsafe fn deallocate(&self, ptr: NonNull<u8>, layout: Layout) {
        if layout.size() == 0 {
            return;
        }
        // SAFETY: this thread's cache, as in `allocate`; the block is
        // forwarded from the caller.
        let _freed = unsafe {
            let tc = thread_cache::pool_cache(&self.shared).as_mut();
            self.shared.free(tc, ptr, layout)
        };
    }

    /// Frees a block without its layout. Errors, with nothing changed:
    /// [`AllocError::ForeignPointer`] for a pointer that does not start a
    /// block of this pool (another allocator's, an interior pointer, a
    /// block already unmapped), [`AllocError::DoubleFree`] for a block that
    /// is free already (see the type docs for what is detected).
    ///
    /// # Safety
    /// - If `ptr` is a live block of this pool, it is not used afterwards.
    pub unsafe fn free(&self, ptr: NonNull<u8>) -> Result<(), AllocError> {
        // SAFETY: forwarded from the caller.
        thread_cache::with_pool_cache(&self.shared, |tc| unsafe {
            self.shared.free_unsized(tc, ptr)
        })
    }

    /// The usable size of the block starting at `ptr`, if this pool owns it.
    pub fn usable_size(&self, ptr: *const u8) -> Option<usize> {
        self.shared.block_info(ptr as usize).map(|(_, s)| s)
    }

    /// Whether `ptr` starts a block of this pool.
    pub fn owns(&self, ptr: *const u8) -> bool {
        self.shared.block_info(ptr as usize).is_some()
    }

    /// Whether `ptr` points anywhere into memory this pool has mapped for
    /// blocks: a block start, a pointer into a block (interior), a free or
    /// cached block. Such a pointer must never be handed to another
    /// allocator. Lock-free: one pagemap lookup.
    pub fn manages(&self, ptr: *const u8) -> bool {
        self.shared.manages(ptr as usize)
    }

    /// Maps (and faults in) the blocks of `plan`. Returns the bytes mapped.
    pub fn prewarm(&self, plan: &Prewarm) -> Result<usize, AllocError> {
        self.shared.prewarm(plan)
    }

    /// Gives cached memory back to the OS: this thread's cache is flushed,
    /// wholly free spans and cached huge blocks are unmapped, and the pages
    /// of other free blocks of 8 KiB and up are discarded. Other threads'
    /// caches (at most ~512 KiB per class each) are left alone. Returns the
    /// bytes given back.
    pub fn trim(&self) -> usize {
        self.flush_thread_cache();
        self.shared.trim()
    }

    /// Hands this thread's cached blocks back to the pool's central lists.
    pub fn flush_thread_cache(&self) {
        thread_cache::with_pool_cache(&self.shared, |tc| {
            if let Some(tc) = tc {
                tc.flush_all(&self.shared)
            }
        })
    }

    /// Sets (or clears) the retained-bytes limit.
    pub fn set_retain_limit(&self, limit: Option<usize>) {
        self.shared
            .retain_limit
            .store(limit.unwrap_or(usize::MAX), Ordering::Relaxed);
    }

    /// A statistics snapshot (this thread's request counts included).
    pub fn stats(&self) -> PoolStats {
        thread_cache::publish_counts(&self.shared);
        self.shared.stats()
    }

    /// The usable size a request would be served with (class rounding).
    pub fn rounded_size(layout: Layout) -> Option<usize> {
        super::size_class::usable_size_for(layout.size(), layout.align())
    }

    /// Moves a big block (1 MiB and up) down into a smaller big class where
    /// it is, without copying (see `PoolShared::resize_big`): `None`,
    /// nothing changed, unless both layouts have one alignment and are of
    /// such classes, the new one smaller.
    ///
    /// # Safety
    /// - `ptr` is a live block of this pool allocated with `old`, owned by
    ///   the caller.
    pub(crate) unsafe fn realloc_big(
        &self,
        ptr: NonNull<u8>,
        old: Layout,
        new: Layout,
    ) -> Option<NonNull<u8>> {
        if old.align() != new.align() {
            return None;
        }
        let c = class_for(old.size(), old.align())?;
        // SAFETY: forwarded: `ptr` is live with `old`, so a block of class
        // `c`, the class the pool serves `old` from.
        unsafe {
            self.shared
                .resize_big(ptr, c as u16, new.size(), new.align())
        }
    }

    /// The shared state (tests).
    #[cfg(test)]
    pub(crate) fn shared(&self) -> &Arc<PoolShared> {
        &self.shared
    }

    /// Blocks of class `c` held centrally (tests).
    #[cfg(test)]
    pub(crate) fn central_available(&self, size: usize) -> usize {
        let c = super::size_class::class_of(size);
        self.shared.central(c).available()
    }
}

impl Drop for HostPool {
    fn drop(&mut self) {
        if self.shared.release_handle() {
            // The pool is torn down: forget this thread's cache of it now
            // (other threads forget theirs when they next look).
            thread_cache::discard_pool_cache(&self.shared);
        }
    }
}

#[inline]
fn dangling(layout: Layout) -> NonNull<u8> {
    // An address equal to the alignment is non-null and aligned; it owns nothing.
    NonNull::new(core::ptr::without_provenance_mut(layout.align())).unwrap_or(NonNull::dangling())
}
