//! [`TensorGlobalAlloc`]: the process-wide host pool as a `#[global_allocator]`.
//!
//! ```
//! use tensorpool::TensorGlobalAlloc;
//!
//! #[global_allocator]
//! static A: TensorGlobalAlloc = TensorGlobalAlloc::new();
//!
//! fn main() {
//!     let activations = vec![0f32; 1 << 20];
//!     assert!(A.owns(activations.as_ptr().cast()));
//!     assert!(A.stats().reserved_bytes >= 4 << 20);
//! }
//! ```
//!
//! # Routing
//! Every request with an alignment up to [`MAX_ALIGN`] (64 KiB) is served by
//! the process-wide pool, small ones included: tensor-sized blocks from its
//! classes and huge cache, small ones from its own 8 B … 4 KiB classes.
//! Requests aligned above `MAX_ALIGN` go to the inner allocator `A`.
//!
//! The small-request choice was measured (a scratch `Instant` loop, not a
//! committed test: 10^7 alloc+free pairs of one size after warm-up, best of
//! 5 to 7 runs, release build, 2-core AMD EPYC VM shared with other builds,
//! 2026-11-21). First version of the hot path:
//!
//! | size | pool classes | inner (`System`, glibc 2.36) |
//! |-----:|-------------:|-----------------------------:|
//! |  16 B | 2.5–3.1 ns  | 7.9–8.0 ns |
//! |  64 B | 3.1–3.6 ns  | 6.8–7.0 ns |
//! | 256 B | 3.1–7.5 ns  | 8.4–9.0 ns |
//!
//! and with the hot path as it is now (pool called directly / through
//! `#[global_allocator]`): 16 B 1.5 / 1.95 ns, 64 B 1.5 / 1.95 ns, 256 B
//! 1.8 / 2.2 ns, against 5.3–5.6 ns for glibc. So small requests stay in the
//! pool. The criterion medians (`cargo bench --bench global_alloc
//! --features peers`, same machine and day; `tensorpool-global` goes through
//! `#[global_allocator]`, the others are called as `GlobalAlloc` values):
//!
//! | workload | tensorpool | tensorpool-global | glibc | mimalloc | jemalloc |
//! |---|---:|---:|---:|---:|---:|
//! | small pair 16 B | 2.01 ns | 3.79 ns | 5.74 ns | 2.80 ns | 2.98 ns |
//! | small pair 64 B | 1.99 ns | 4.13 ns | 5.80 ns | 3.24 ns | 2.75 ns |
//! | small pair 256 B | 1.97 ns | 4.37 ns | 5.88 ns | 3.52 ns | 2.90 ns |
//! | pair 4 KiB | 2.64 ns | 4.59 ns | 73.9 ns | 13.8 ns | 11.6 ns |
//! | pair 64 KiB | 2.64 ns | 4.45 ns | 73.5 ns | 14.7 ns | 115 ns |
//! | pair 1 MiB | 2.60 ns | 4.53 ns | 72.5 ns | 262 ns | 116 ns |
//! | pair 16 MiB | 2.61 ns | 4.35 ns | 72.9 ns | 400 ns | 842 ns |
//! | pair 64 MiB | 2.62 ns | 4.45 ns | 9.92 µs | 998 ns | 1.09 µs |
//! | 16 MiB + touch every page (resident: 36.6 µs) | 37.0 µs | 37.2 µs | 36.7 µs | 39.6 µs | 6.30 ms |
//! | cross-thread 64 B (handoff alone: 56.0 ns) | 56.5 ns | 58.7 ns | 67.1 ns | 60.6 ns | 79.0 ns |
//! | cross-thread 64 KiB (handoff alone: 55.3 ns) | 68.8 ns | 72.4 ns | 87.6 ns | 130 ns | 301 ns |
//!
//! The cross-thread rows are a second run (the ring padded to one slot per
//! line); they include the handoff between the two threads, measured alone
//! as `ring-floor` (no allocator): what the allocator adds is the row minus
//! that, 0.5–2.7 ns at 64 B and 13–17 ns at 64 KiB for tensorpool. They
//! swing with the load of this shared 2-core machine (one quiet run gave
//! 20 ns / 60 ns for tensorpool, busy ones several times more for everyone).
//!
//! The route is a pure function of the layout's alignment, and `dealloc` and
//! `realloc` receive the same alignment `alloc` did, so a pointer always goes
//! back to whoever allocated it without a lookup on the hot path; in debug
//! builds `dealloc` confirms ownership against the pagemap (and aborts if
//! not). Out of memory is a null pointer from either side; the pool never falls back to the inner
//! allocator (that would make the route depend on history, not the layout).
//!
//! # What the allocation paths never do
//! Allocate, log, format, panic, or take a lock other than the pool's own
//! spin locks (`RawLock`: a flag, no heap, no
//! poisoning). Errors from the pool are built (a few integers) and dropped;
//! their `Display` is never called.
//!
//! # Zeroed memory, realloc
//! `alloc_zeroed` skips the memset for a fresh block: a span's never-used
//! tail or a newly mapped huge block (only the free-list link word is
//! cleared). `realloc` keeps the address when the new size falls in the same
//! class, or when a huge block's mapping still fits it (a tail wasting more
//! than 1/8 is unmapped); a huge block that must grow is extended in place
//! or has its pages moved by `mremap` (no copy); otherwise it allocates,
//! copies and frees.
//!
//! # Threads and fork
//! A thread's cache goes back to the central lists when the thread exits
//! (the pool's `pthread` key destructor). On the first allocation the
//! allocator registers `pthread_atfork` handlers (once, without allocating):
//! *prepare* takes every class lock of the global pool in class order, then
//! the huge-cache lock, then the span-record arena's; *parent* and *child*
//! release them. So the child of a `fork()` taken while other threads
//! allocate finds every lock free and every list consistent, and can
//! allocate and free. Blocks in other threads' caches are lost to the child
//! (those threads do not exist there), which is safe. Pools made with
//! [`HostPool::new`](crate::host::HostPool::new) are not covered.

use crate::AllocError;
use crate::adapt::format::TraceOp;
use crate::adapt::process as trace;
use crate::host::PoolStats;
use crate::host::size_class::{MAX_ALIGN, MAX_CLASS_SIZE, class_for};
use crate::host::span::HUGE_CLASS;
use crate::host::thread_cache::{
    ThreadCache, global_cache, mark_global_quiet, quiet_global_cache, with_global_cache,
};
use crate::host::{PoolShared, global_pool};
use crate::sync::{AtomicUsize, Ordering};
use core::alloc::{GlobalAlloc, Layout};
use core::ptr::{NonNull, null_mut};
use std::alloc::System;

/// A `#[global_allocator]` backed by the process-wide host pool.
///
/// Requests aligned up to [`MAX_ALIGN`] are served by the pool; the rest by
/// the inner allocator `A` (see the [module docs](self) for the routing and
/// its measurements).
///
/// Invariant: a block allocated with alignment `a` was allocated by the pool
/// iff `a ≤ MAX_ALIGN`, so `dealloc`/`realloc` route it by its layout alone.
pub struct TensorGlobalAlloc<A: GlobalAlloc = System> {
    inner: A,
}

impl TensorGlobalAlloc<System> {
    /// The allocator with `System` for over-aligned requests. Maps nothing.
    pub const fn new() -> Self {
        TensorGlobalAlloc { inner: System }
    }
}

impl Default for TensorGlobalAlloc<System> {
    fn default() -> Self {
        Self::new()
    }
}

impl<A: GlobalAlloc> TensorGlobalAlloc<A> {
    /// The allocator with `inner` for requests aligned above [`MAX_ALIGN`].
    pub const fn with_inner(inner: A) -> Self {
        TensorGlobalAlloc { inner }
    }

    /// The inner allocator.
    pub fn inner(&self) -> &A {
        &self.inner
    }

    /// Statistics of the process-wide pool: a few relaxed loads, callable at
    /// any time from any thread (also from inside a panic or signal handler:
    /// it neither locks nor allocates).
    pub fn stats(&self) -> PoolStats {
        pool().stats()
    }

    /// Returns cached memory to the OS: this thread's cache is flushed, then
    /// wholly free spans and cached huge blocks are unmapped and the pages
    /// of other free blocks of 8 KiB and up discarded. Returns the bytes
    /// given back.
    pub fn trim(&self) -> usize {
        with_global_cache(|tc| {
            if let Some(tc) = tc {
                tc.flush_all(pool());
            }
        });
        pool().trim()
    }

    /// The usable size of the pool block starting at `ptr`, or `None` if the
    /// pool did not allocate it (the inner allocator's blocks included).
    pub fn usable_size(&self, ptr: *const u8) -> Option<usize> {
        pool().block_info(ptr as usize).map(|(_, size)| size)
    }

    /// Whether `ptr` starts a live-or-cached block of the process-wide pool.
    pub fn owns(&self, ptr: *const u8) -> bool {
        pool().block_info(ptr as usize).is_some()
    }

    /// Whether `ptr` points anywhere into memory the process-wide pool has
    /// mapped for blocks (a block start, an interior pointer, a free block):
    /// such a pointer must never reach another allocator's `free`.
    pub fn manages(&self, ptr: *const u8) -> bool {
        pool().manages(ptr as usize)
    }

    /// Frees `ptr` without its layout (C `free`) if the pool owns it, found
    /// through the pagemap. Returns `false`, and does nothing, for a pointer
    /// that does not start a block of the pool (null, the inner allocator's,
    /// anybody else's, an interior pointer: see [`manages`](Self::manages)).
    /// A detected double free aborts with "double free detected" on stderr,
    /// as glibc does (it must not reach another allocator either);
    /// [`try_free_unsized`](Self::try_free_unsized) returns it as an error
    /// instead.
    ///
    /// # Safety
    /// - If `ptr` is a live block of the pool, it is not used afterwards.
    #[inline]
    pub unsafe fn free_unsized(&self, ptr: *mut u8) -> bool {
        // SAFETY: forwarded from the caller.
        match unsafe { self.try_free_unsized(ptr) } {
            Ok(()) => true,
            Err(AllocError::DoubleFree { .. }) => double_free_abort(),
            Err(_) => false,
        }
    }

    /// Frees `ptr` without its layout, saying why not where it does not:
    /// [`AllocError::ForeignPointer`] (null, not a block start of the pool;
    /// [`manages`](Self::manages) tells an interior pointer from another
    /// allocator's) or [`AllocError::DoubleFree`]. Nothing changes on error.
    /// Never allocates; the error's `Display` is not needed to branch on it.
    ///
    /// # Safety
    /// - If `ptr` is a live block of the pool, it is not used afterwards.
    #[inline(always)]
    pub unsafe fn try_free_unsized(&self, ptr: *mut u8) -> Result<(), AllocError> {
        // The quiet path (as in `dealloc`): a class block of the pool,
        // freed by a thread whose cache is ready while nothing is traced.
        // Inline, so that C's `free` builds no `Result` in memory.
        let tc = quiet_global_cache();
        if !tc.is_null()
            && let Some((class, _)) = pool().block_info(ptr as usize)
            && class != HUGE_CLASS
        {
            // SAFETY: this thread's cache, the only reference made from it;
            // the pagemap says `ptr` starts a block of `class` of the pool,
            // which the caller gives up.
            let freed = unsafe { (*tc).free(pool(), class as usize, ptr) };
            return if freed {
                Ok(())
            } else {
                Err(AllocError::DoubleFree { addr: ptr as usize })
            };
        }
        // SAFETY: forwarded from the caller.
        unsafe { self.try_free_unsized_routed(ptr) }
    }

    /// [`try_free_unsized`](Self::try_free_unsized) off the quiet path.
    ///
    /// # Safety
    /// - As for `try_free_unsized`.
    #[inline(never)]
    unsafe fn try_free_unsized_routed(&self, ptr: *mut u8) -> Result<(), AllocError> {
        let Some(p) = NonNull::new(ptr) else {
            return Err(AllocError::ForeignPointer { addr: 0 });
        };
        if trace::enabled() && self.owns(ptr) {
            // Before the free: the address cannot be handed out again
            // (and recorded) ahead of this record.
            trace::record(TraceOp::Free, ptr, 0, 1);
        }
        // SAFETY: forwarded from the caller; `free_unsized` checks ownership.
        with_global_cache(|tc| unsafe { pool().free_unsized(tc, p) })
    }

    /// Sets (or clears) the process-wide pool's retained-bytes limit (see
    /// [`HostPoolConfig::retain_limit`](crate::host::HostPoolConfig)).
    pub fn set_retain_limit(&self, limit: Option<usize>) {
        pool()
            .retain_limit
            .store(limit.unwrap_or(usize::MAX), Ordering::Relaxed);
    }

    /// Unmaps every huge block (above 64 MiB) the process-wide pool keeps
    /// cached, and nothing else; returns the bytes given back. Cheaper than
    /// [`trim`](Self::trim): one lock and the `munmap`s.
    pub fn trim_huge(&self) -> usize {
        pool().huge.trim(pool())
    }

    /// Resizes a pool block without its layout (C `realloc`): in place when
    /// `new_size` at `align` falls in the block's class (or fits its huge
    /// mapping), else a new pool block at `align` with the common prefix
    /// copied and the old block freed. Null (old block untouched) if out of
    /// memory.
    ///
    /// # Safety
    /// - `ptr` is a live block of the pool ([`owns`](Self::owns) is true),
    ///   owned by the caller; on success it is not used afterwards.
    /// - `new_size > 0`, `align` is a power of two ≤ [`MAX_ALIGN`], and
    ///   `new_size` rounded up to `align` does not overflow `isize`.
    pub unsafe fn realloc_unsized(&self, ptr: *mut u8, new_size: usize, align: usize) -> *mut u8 {
        let Some((class, usable)) = pool().block_info(ptr as usize) else {
            return null_mut();
        };
        // SAFETY: non-null (the pool owns it).
        let p = unsafe { NonNull::new_unchecked(ptr) };
        // SAFETY: a live block of `class` of the pool, the caller's.
        if let Some(q) = unsafe { resize_without_copy(p, class, new_size, align) } {
            trace_resized(ptr, 0, q.as_ptr(), new_size, align);
            return q.as_ptr();
        }
        // SAFETY: valid per the caller.
        let layout = unsafe { Layout::from_size_align_unchecked(new_size, align) };
        // SAFETY: `new_size > 0`.
        let new = unsafe { self.alloc(layout) };
        if !new.is_null() {
            // SAFETY: 1. `usable` bytes are readable at `ptr` and `new_size`
            // writable at `new`; 2. distinct live blocks do not overlap;
            // 3. the pool owns `ptr` and the caller gives it up.
            unsafe {
                core::ptr::copy_nonoverlapping(ptr, new, usable.min(new_size));
                self.free_unsized(ptr);
            }
        }
        new
    }
}

impl<A: GlobalAlloc> TensorGlobalAlloc<A> {
    /// `alloc` off the quiet path: over-aligned requests (the inner
    /// allocator's), tracing, a thread's first request and its last ones.
    /// Marks the thread quiet once its cache is ready and nothing is traced.
    ///
    /// # Safety
    /// - As for [`GlobalAlloc::alloc`].
    #[inline(never)]
    unsafe fn alloc_routed(&self, layout: Layout) -> *mut u8 {
        let p = if layout.align() > MAX_ALIGN {
            // SAFETY: forwarded from the caller (non-zero size).
            unsafe { self.inner.alloc(layout) }
        } else {
            pool_alloc(layout)
        };
        trace_alloc(p, layout);
        if trace::off_for_good() {
            mark_global_quiet();
        }
        p
    }

    /// `dealloc` off the quiet path.
    ///
    /// # Safety
    /// - As for [`GlobalAlloc::dealloc`].
    #[inline(never)]
    unsafe fn dealloc_routed(&self, ptr: *mut u8, layout: Layout) {
        if trace::enabled() {
            trace::record(TraceOp::Free, ptr, layout.size(), layout.align());
        }
        if layout.align() > MAX_ALIGN {
            // SAFETY: over-aligned blocks are the inner allocator's (type
            // invariant); the rest is forwarded from the caller.
            return unsafe { self.inner.dealloc(ptr, layout) };
        }
        if cfg!(debug_assertions) && !self.owns(ptr) {
            // A broken caller; abort rather than unwind out of an allocator.
            std::process::abort();
        }
        // SAFETY: `ptr` is a block of the pool allocated with `layout` (type
        // invariant and the caller).
        unsafe { pool_free(ptr, layout) }
    }
}

impl<A: GlobalAlloc> core::fmt::Debug for TensorGlobalAlloc<A> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("TensorGlobalAlloc")
            .field("pool", &self.stats())
            .finish_non_exhaustive()
    }
}

#[inline(always)]
fn pool() -> &'static PoolShared {
    global_pool()
}

/// Runs a pool allocation with this thread's cache (`with_global_cache`
/// makes sure the fork handlers exist first); an error becomes null (its
/// `Display` is never run).
#[inline(always)]
fn from_pool(
    f: impl FnOnce(Option<&mut ThreadCache>) -> Result<NonNull<u8>, AllocError>,
) -> *mut u8 {
    with_global_cache(f).map_or(null_mut(), NonNull::as_ptr)
}

/// The hot path of `alloc`: the pool's raw path (no `Result` to build; huge
/// blocks and refills are out of line inside it), null on failure.
#[inline(always)]
fn pool_alloc(layout: Layout) -> *mut u8 {
    // `global_cache` registers the fork handlers before it first returns
    // (a cache or null), so no pool lock is taken before they exist.
    let tc = global_cache();
    // SAFETY: this thread's cache, the only reference made from it.
    pool().alloc_raw(unsafe { tc.as_mut() }, layout)
}

/// The hot path of `dealloc`. A detected double free aborts, as glibc does.
///
/// # Safety
/// - `ptr` is a live pool block allocated with `layout`, not used afterwards.
#[inline(always)]
unsafe fn pool_free(ptr: *mut u8, layout: Layout) {
    // SAFETY: this thread's cache, the only reference made from it; the
    // block is forwarded from the caller, and a pool block is non-null.
    let freed = unsafe {
        let tc = global_cache().as_mut();
        pool().free(tc, NonNull::new_unchecked(ptr), layout)
    };
    if !freed {
        double_free_abort();
    }
}

/// Writes "double free detected" to stderr and aborts (no allocation, no
/// unwinding out of an allocator).
#[cold]
#[inline(never)]
pub(crate) fn double_free_abort() -> ! {
    const MSG: &[u8] = b"tensorpool: double free detected\n";
    // SAFETY: writing a static buffer to fd 2; the result does not matter.
    unsafe { libc::write(2, MSG.as_ptr().cast(), MSG.len()) };
    std::process::abort()
}

// SAFETY: the pool hands out blocks of at least `layout.size()` bytes at
// `layout.align()` (class or huge rounding, alignment ≤ MAX_ALIGN checked by
// `class_for`/`alloc_huge`), never hands out a block twice while live, and
// returns null on failure; every other request is the inner allocator's,
// which upholds the same contract. Each pointer goes back to its allocator
// (type invariant). No path unwinds: nothing here panics.
unsafe impl<A: GlobalAlloc> GlobalAlloc for TensorGlobalAlloc<A> {
    #[inline(always)]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // The quiet path: a thread whose cache is ready while nothing is
        // traced, and a pool request (one per-thread flag, one compare).
        let tc = quiet_global_cache();
        if !tc.is_null() && layout.align() <= MAX_ALIGN {
            // SAFETY: this thread's cache, the only reference made from it.
            return pool().alloc_raw(unsafe { tc.as_mut() }, layout);
        }
        // SAFETY: forwarded from the caller.
        unsafe { self.alloc_routed(layout) }
    }

    #[inline(always)]
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        let tc = quiet_global_cache();
        if !tc.is_null() && layout.align() <= MAX_ALIGN {
            if cfg!(debug_assertions) && !self.owns(ptr) {
                // A broken caller; abort rather than unwind out of an allocator.
                std::process::abort();
            }
            // SAFETY: this thread's cache, the only reference made from it;
            // `ptr` is a block of the pool allocated with `layout` (type
            // invariant and the caller), so non-null.
            let freed = unsafe { pool().free(tc.as_mut(), NonNull::new_unchecked(ptr), layout) };
            if !freed {
                double_free_abort();
            }
            return;
        }
        // SAFETY: forwarded from the caller.
        unsafe { self.dealloc_routed(ptr, layout) }
    }

    #[inline]
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let p = if layout.align() > MAX_ALIGN {
            // SAFETY: forwarded from the caller.
            unsafe { self.inner.alloc_zeroed(layout) }
        } else {
            from_pool(|tc| pool().alloc_zeroed(tc, layout))
        };
        trace_alloc(p, layout);
        p
    }

    #[inline]
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let align = layout.align();
        if align > MAX_ALIGN {
            if trace::enabled() {
                // SAFETY: an inner block (type invariant); the rest is forwarded.
                let q = unsafe { self.inner.realloc(ptr, layout, new_size) };
                if !q.is_null() {
                    trace_resized(ptr, layout.size(), q, new_size, align);
                }
                return q;
            }
            // SAFETY: an inner block (type invariant); the rest is forwarded.
            return unsafe { self.inner.realloc(ptr, layout, new_size) };
        }
        let class = class_for(layout.size(), align).map_or(HUGE_CLASS, |c| c as u16);
        // SAFETY: `ptr` is a live pool block of `class` (layout routing: the
        // pool serves `layout` from `class_for`, or as a huge block), owned
        // by the caller, so also non-null.
        let resized =
            unsafe { resize_without_copy(NonNull::new_unchecked(ptr), class, new_size, align) };
        if let Some(q) = resized {
            trace_resized(ptr, layout.size(), q.as_ptr(), new_size, align);
            return q.as_ptr();
        }
        // SAFETY: the caller guarantees `new_size`, rounded up to `align`,
        // does not overflow `isize`, so this is a valid layout.
        let new_layout = unsafe { Layout::from_size_align_unchecked(new_size, align) };
        // SAFETY: `new_size > 0` (caller).
        let new = unsafe { self.alloc(new_layout) };
        if !new.is_null() {
            // SAFETY: 1. both blocks are valid for the copied length (the
            // smaller of the two sizes); 2. they are distinct live blocks, so
            // they do not overlap; 3. `ptr` was allocated with `layout` and is
            // not used after this (the caller takes `new` instead).
            unsafe {
                core::ptr::copy_nonoverlapping(ptr, new, layout.size().min(new_size));
                self.dealloc(ptr, layout);
            }
        }
        new
    }
}

/// Records an allocation when recording (`TENSORPOOL_TRACE`), after it
/// succeeded.
#[inline(always)]
fn trace_alloc(p: *mut u8, layout: Layout) {
    if !p.is_null() && trace::enabled() {
        trace::record(TraceOp::Alloc, p, layout.size(), layout.align());
    }
}

/// Records a realloc done without the allocator's alloc/free (in place, or
/// pages moved) as a free of `old` and an alloc of `new`. Recorded after the
/// fact: `old`'s address is still this thread's if unchanged; if the pages
/// moved, another thread could in principle receive `old`'s address and
/// record it first (replay then reports a duplicate alloc).
#[inline(always)]
fn trace_resized(old: *mut u8, old_size: usize, new: *mut u8, new_size: usize, align: usize) {
    if trace::enabled() {
        trace::record(TraceOp::Free, old, old_size, align);
        trace::record(TraceOp::Alloc, new, new_size, align);
    }
}

/// `realloc` without a copy where possible: the same address (the same
/// class, or a huge mapping that still fits; see
/// `PoolShared::resize_in_place`), or a huge block grown by remapping its
/// pages. `None`: allocate, copy and free instead.
///
/// # Safety
/// - `p` is a live pool block of `class`, owned by the caller; if `Some` is
///   returned, `p` is not used afterwards (unless it is the result).
#[inline]
unsafe fn resize_without_copy(
    p: NonNull<u8>,
    class: u16,
    new_size: usize,
    align: usize,
) -> Option<NonNull<u8>> {
    // SAFETY: forwarded from the caller.
    if unsafe { pool().resize_in_place(p, class, new_size, align) } {
        return Some(p);
    }
    if class == HUGE_CLASS && new_size > MAX_CLASS_SIZE {
        // SAFETY: a live huge block of the caller's whose mapping is too
        // small for `new_size` (`resize_in_place` said no).
        return unsafe { pool().grow_huge(p, new_size) };
    }
    // SAFETY: forwarded from the caller.
    unsafe { pool().resize_big(p, class, new_size, align) }
}

/// `pthread_atfork` registration state: [`NOT_REGISTERED`], [`REGISTERING`]
/// (by the thread in [`ATFORK_OWNER`]) or [`REGISTERED`] (also after a
/// failed registration: nothing more can be done without allocating).
static ATFORK: AtomicUsize = AtomicUsize::new(NOT_REGISTERED);
static ATFORK_OWNER: AtomicUsize = AtomicUsize::new(0);
const NOT_REGISTERED: usize = 0;
const REGISTERING: usize = 1;
const REGISTERED: usize = 2;

/// Registers the fork handlers before this thread can first take a pool
/// lock. One relaxed load once registered.
#[inline(always)]
pub(crate) fn ensure_atfork() {
    if ATFORK.load(Ordering::Relaxed) != REGISTERED {
        register_atfork();
    }
}

#[cold]
#[inline(never)]
fn register_atfork() {
    // SAFETY: `pthread_self` has no preconditions and does not allocate.
    let me = unsafe { libc::pthread_self() } as usize;
    match ATFORK.compare_exchange(
        NOT_REGISTERED,
        REGISTERING,
        Ordering::Acquire,
        Ordering::Acquire,
    ) {
        Ok(_) => {
            ATFORK_OWNER.store(me, Ordering::Relaxed);
            // Once per process, before (nearly) any block is freed: a key no
            // program can know from the binary.
            pool().rekey();
            // SAFETY: the handlers are `extern "C" fn()` that stay valid for
            // the life of the process. glibc keeps the first handlers in a
            // static array; should it allocate, the re-entrant allocation sees
            // `REGISTERING` with us as owner and goes on without waiting.
            let _ = unsafe {
                libc::pthread_atfork(Some(fork_prepare), Some(fork_release), Some(fork_child))
            };
            ATFORK.store(REGISTERED, Ordering::Release);
        }
        Err(REGISTERING) if ATFORK_OWNER.load(Ordering::Relaxed) == me => {}
        Err(_) => {
            // Another thread is registering: wait (microseconds, once per
            // process) so that no lock is taken before the handlers exist.
            while ATFORK.load(Ordering::Acquire) != REGISTERED {
                crate::sync::yield_now();
            }
        }
    }
}

extern "C" fn fork_prepare() {
    pool().lock_for_fork();
}

extern "C" fn fork_release() {
    // SAFETY: glibc runs the parent and child handlers only after the
    // prepare handlers of the same `fork()`, in the forking thread (in the
    // child, its only thread, whose memory image holds the same lock words).
    unsafe { pool().unlock_after_fork() };
}

extern "C" fn fork_child() {
    fork_release();
    // SAFETY: the child handler runs in the child, which has one thread.
    unsafe { trace::after_fork_in_child() };
}

/// `v` in decimal ASCII, written at the end of `buf`; the digits' slice.
/// Allocation-free, for messages and file names built where nothing may
/// allocate (the C ABI's abort messages, the trace file of a forked child).
pub fn decimal(v: u64, buf: &mut [u8; 20]) -> &[u8] {
    let (mut v, mut i) = (v, buf.len());
    loop {
        i -= 1;
        buf[i] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            return &buf[i..];
        }
    }
}

/// A byte count as written in an environment variable: decimal digits,
/// optionally followed by `K`, `M`, `G` or `T` (powers of 1024, either
/// case, optionally followed by `iB` or `B`). `None` for anything else or
/// on overflow. Allocation-free, so the C ABI can read its settings with it
/// before `main` (`TENSORPOOL_RETAIN_LIMIT`, `TENSORPOOL_RETURN_ABOVE`).
pub fn parse_size(s: &[u8]) -> Option<usize> {
    let digits = s.iter().take_while(|b| b.is_ascii_digit()).count();
    if digits == 0 {
        return None;
    }
    let mut n: usize = 0;
    for &b in &s[..digits] {
        n = n.checked_mul(10)?.checked_add(usize::from(b - b'0'))?;
    }
    let (shift, rest) = match s[digits..].split_first() {
        None => return Some(n),
        Some((u, rest)) => match u.to_ascii_uppercase() {
            b'K' => (10, rest),
            b'M' => (20, rest),
            b'G' => (30, rest),
            b'T' => (40, rest),
            b'B' if rest.is_empty() => return Some(n),
            _ => return None,
        },
    };
    if !matches!(rest, b"" | b"B" | b"b" | b"iB" | b"ib") {
        return None;
    }
    n.checked_mul(1usize.checked_shl(shift)?)
}

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn decimal_digits() {
        let mut buf = [0u8; 20];
        for (v, s) in [
            (0u64, "0"),
            (7, "7"),
            (10, "10"),
            (4096, "4096"),
            (u64::MAX, "18446744073709551615"),
        ] {
            assert_eq!(super::decimal(v, &mut buf), s.as_bytes());
        }
    }

    #[test]
    fn sizes_with_suffixes_and_garbage() {
        let ok: [(&[u8], usize); 9] = [
            (b"0", 0),
            (b"4096", 4096),
            (b"64K", 64 << 10),
            (b"64k", 64 << 10),
            (b"512M", 512 << 20),
            (b"512MiB", 512 << 20),
            (b"2G", 2 << 30),
            (b"1TB", 1 << 40),
            (b"100B", 100),
        ];
        for (s, n) in ok {
            assert_eq!(parse_size(s), Some(n), "{}", String::from_utf8_lossy(s));
        }
        for s in [
            &b""[..],
            b"M",
            b"-1",
            b"1.5G",
            b"12Q",
            b"4 K",
            b"1KK",
            b"99999999999999999999",
            b"20000000000T",
        ] {
            assert_eq!(parse_size(s), None, "{}", String::from_utf8_lossy(s));
        }
    }
}
