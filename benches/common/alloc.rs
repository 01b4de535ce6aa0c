//! The allocators under comparison, behind one small trait.
//!
//! Every allocator is a [`BenchAlloc`]; [`Runner`](super::Runner) is
//! implemented once for all of them, so a workload is monomorphised per
//! allocator and dynamic dispatch happens once per timed batch, never per
//! allocation. Any `GlobalAlloc` value joins through [`Global`], with the
//! allocator's own way of handing cached memory back to the OS as its trim.

use core::alloc::{GlobalAlloc, Layout};
use std::alloc::System;
use tensorpool::host::{HostPool, Prewarm};

/// An allocator as the workloads see it.
///
/// Implementors must be usable from several threads at once (the
/// cross-thread workload frees on another thread than it allocates).
pub trait BenchAlloc: Sync {
    /// The name shown in tables and criterion ids.
    fn name(&self) -> &'static str;

    /// A block for `l` (size > 0), or null if the allocator refused.
    fn alloc(&self, l: Layout) -> *mut u8;

    /// Frees a block.
    ///
    /// # Safety
    /// - `p` came from [`alloc`](Self::alloc) of this allocator with `l` and
    ///   is not used afterwards.
    unsafe fn dealloc(&self, p: *mut u8, l: Layout);

    /// Resizes a block from `l` to `new_size` bytes (same alignment): the
    /// allocator's own realloc where it has one, else allocate, copy, free.
    ///
    /// # Safety
    /// - `p` came from [`alloc`](Self::alloc) of this allocator with `l`;
    ///   unless null is returned, it is not used afterwards.
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new_size: usize) -> *mut u8 {
        let nl = Layout::from_size_align(new_size, l.align()).expect("realloc layout");
        let q = self.alloc(nl);
        if !q.is_null() {
            // SAFETY: distinct live blocks, each valid for the copied length;
            // `p` is given up (caller).
            unsafe {
                core::ptr::copy_nonoverlapping(p, q, l.size().min(new_size));
                self.dealloc(p, l);
            }
        }
        q
    }

    /// Gives cached memory back to the OS, as far as the allocator can.
    fn trim(&self) {}

    /// Makes `count` blocks of `size` bytes ready for use, for each entry of
    /// `plan`. Allocators without a prewarm call do what a user would: allocate
    /// the blocks, touch every page, free them.
    fn prewarm(&self, plan: &[(usize, usize)]) {
        let mut live = Vec::new();
        for &(size, count) in plan {
            let l = Layout::from_size_align(size, 64).expect("prewarm layout");
            for _ in 0..count {
                let p = checked(self.alloc(l), l);
                touch_pages(p, size);
                live.push((p, l));
            }
        }
        for (p, l) in live {
            // SAFETY: allocated above with `l`, freed once.
            unsafe { self.dealloc(p, l) };
        }
    }
}

/// Panics (with the layout) if an allocation failed.
#[inline(always)]
pub fn checked(p: *mut u8, l: Layout) -> *mut u8 {
    assert!(!p.is_null(), "allocation of {l:?} failed");
    p
}

/// The OS page size the touch loops step by.
pub const PAGE: usize = 4096;

/// Writes one byte in every page of `[p, p+len)`, so each page is faulted in
/// if it is not resident yet.
#[inline(always)]
pub fn touch_pages(p: *mut u8, len: usize) {
    let mut off = 0;
    while off < len {
        // SAFETY: `off < len` and the caller's block is `len` bytes long.
        unsafe { p.add(off).write_volatile(1) };
        off += PAGE;
    }
}

/// Any `GlobalAlloc` value, named, with its trim function.
#[derive(Debug)]
pub struct Global<A> {
    name: &'static str,
    inner: A,
    trim: fn(),
}

impl<A: GlobalAlloc> Global<A> {
    /// Wraps `inner`; `trim` hands its cached memory back to the OS.
    pub const fn new(name: &'static str, inner: A, trim: fn()) -> Self {
        Global { name, inner, trim }
    }
}

impl<A: GlobalAlloc + Sync> BenchAlloc for Global<A> {
    fn name(&self) -> &'static str {
        self.name
    }

    #[inline(always)]
    fn alloc(&self, l: Layout) -> *mut u8 {
        // SAFETY: the workloads never ask for size 0.
        unsafe { self.inner.alloc(l) }
    }

    #[inline(always)]
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        // SAFETY: forwarded from the caller: `p` came from `alloc` with `l`.
        unsafe { self.inner.dealloc(p, l) }
    }

    #[inline(always)]
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: forwarded from the caller (`new_size > 0`).
        unsafe { self.inner.realloc(p, l, new_size) }
    }

    fn trim(&self) {
        (self.trim)()
    }
}

/// The pool's name in tables: the reference the example's ratios divide by.
pub const POOL_NAME: &str = "tensorpool";

/// The pool, through its own API (`allocate` / `deallocate`, `prewarm`, `trim`).
#[derive(Debug, Default)]
pub struct Pool(pub HostPool);

impl BenchAlloc for Pool {
    fn name(&self) -> &'static str {
        POOL_NAME
    }

    #[inline(always)]
    fn alloc(&self, l: Layout) -> *mut u8 {
        self.0
            .allocate(l)
            .map_or(core::ptr::null_mut(), |p| p.as_ptr())
    }

    #[inline(always)]
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        if let Some(p) = core::ptr::NonNull::new(p) {
            // SAFETY: forwarded from the caller: a block of this pool with `l`.
            unsafe { self.0.deallocate(p, l) }
        }
    }

    unsafe fn realloc(&self, p: *mut u8, l: Layout, new_size: usize) -> *mut u8 {
        use allocator_api2::alloc::Allocator;
        let (Some(p), Ok(nl)) = (
            core::ptr::NonNull::new(p),
            Layout::from_size_align(new_size, l.align()),
        ) else {
            return core::ptr::null_mut();
        };
        // SAFETY: forwarded from the caller: a block of this pool with `l`;
        // the new layout has the same alignment and the matching direction.
        let r = unsafe {
            if new_size >= l.size() {
                self.0.grow(p, l, nl)
            } else {
                self.0.shrink(p, l, nl)
            }
        };
        r.map_or(core::ptr::null_mut(), |q| q.as_ptr().cast())
    }

    fn trim(&self) {
        self.0.trim();
    }

    fn prewarm(&self, plan: &[(usize, usize)]) {
        let plan = plan
            .iter()
            .fold(Prewarm::new(), |p, &(size, count)| p.blocks(size, count));
        self.0.prewarm(&plan).expect("pool prewarm");
    }
}

/// glibc: `malloc_trim(0)` returns free heap tops and free pages inside the
/// arenas.
fn trim_glibc() {
    // SAFETY: malloc_trim has no preconditions.
    unsafe { libc::malloc_trim(0) };
}

/// mimalloc: `mi_collect(true)` frees this thread's and abandoned segments.
#[cfg(feature = "peers")]
fn trim_mimalloc() {
    // SAFETY: mi_collect has no preconditions.
    unsafe { libmimalloc_sys::mi_collect(true) };
}

/// jemalloc: flush this thread's tcache, then purge every arena
/// (`arena.<MALLCTL_ARENAS_ALL>.purge`, a void mallctl).
#[cfg(feature = "peers")]
fn trim_jemalloc() {
    for name in [c"thread.tcache.flush", c"arena.4096.purge"] {
        // SAFETY: NUL-terminated names of void mallctls, called with no old
        // or new value, as they require.
        let r = unsafe {
            tikv_jemalloc_sys::mallctl(
                name.as_ptr(),
                core::ptr::null_mut(),
                core::ptr::null_mut(),
                core::ptr::null_mut(),
                0,
            )
        };
        debug_assert_eq!(r, 0, "mallctl {name:?}");
    }
}

/// The allocators compared, in a fixed order: glibc first, the pool last.
/// A new contender (e.g. a `GlobalAlloc` with a const constructor) is one
/// more `Global::new(...)` line here.
pub fn allocators() -> Vec<Box<dyn super::Runner>> {
    // snmalloc-rs is left out: without cmake its `build_cc` build defines
    // NDEBUG only for MSVC, so on Linux it is a debug (assertion-checked)
    // build, which would misrepresent it; cmake is not on the project's
    // machines.
    vec![
        Box::new(Global::new("glibc", System, trim_glibc)),
        #[cfg(feature = "peers")]
        Box::new(Global::new("mimalloc", mimalloc::MiMalloc, trim_mimalloc)),
        #[cfg(feature = "peers")]
        Box::new(Global::new(
            "jemalloc",
            tikv_jemallocator::Jemalloc,
            trim_jemalloc,
        )),
        Box::new(Pool::default()),
    ]
}
