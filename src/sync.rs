//! The one door for concurrency primitives.
//!
//! Every atomic, `UnsafeCell` and spin/yield hint the crate uses comes from
//! here. Under `--cfg tensorpool_loom` the loom versions are re-exported so
//! the lock-free structures ([`crate::host::transfer::TransferStack`],
//! [`crate::meta::id::IdIssuer`], [`RawLock`]) can be model-checked
//! (`ci/loom.sh`). Nothing in this module allocates, so all of it is usable
//! inside `GlobalAlloc`.

#[cfg(not(tensorpool_loom))]
pub(crate) use std::sync::atomic::{
    AtomicBool, AtomicPtr, AtomicU16, AtomicU32, AtomicU64, AtomicUsize, Ordering, fence,
};

#[cfg(tensorpool_loom)]
#[allow(unused_imports)]
// AtomicU32 serves only the metadata table, which loom builds leave out.
pub(crate) use loom::sync::atomic::{
    AtomicBool, AtomicPtr, AtomicU16, AtomicU32, AtomicU64, AtomicUsize, Ordering, fence,
};

/// Orders the `SeqCst` accesses on either side of it for loom.
///
/// Store-load patterns made only of `SeqCst` accesses (count a pin, then
/// re-read the epoch) are ordered by the C++/Rust memory model itself, but
/// loom models `SeqCst` loads and stores as acquire/release only
/// (tokio-rs/loom#180) and would report executions the model forbids. Under
/// loom this is `fence(SeqCst)`, which loom does model, so a model checks
/// the same argument; elsewhere only a compiler fence (an `mfence` would
/// cost a metadata-table pin a third more for nothing). Use it only between
/// `SeqCst` accesses.
#[inline(always)]
pub(crate) fn seqcst_fence_for_loom() {
    #[cfg(tensorpool_loom)]
    fence(Ordering::SeqCst);
    #[cfg(not(tensorpool_loom))]
    core::sync::atomic::compiler_fence(Ordering::SeqCst);
}

/// Tells the CPU (or loom) that we are spinning.
#[inline]
pub(crate) fn spin_hint() {
    #[cfg(not(tensorpool_loom))]
    std::hint::spin_loop();
    #[cfg(tensorpool_loom)]
    loom::hint::spin_loop();
}

/// Gives the rest of the time slice away. `sched_yield` does not allocate.
#[inline]
pub(crate) fn yield_now() {
    #[cfg(not(tensorpool_loom))]
    std::thread::yield_now();
    #[cfg(tensorpool_loom)]
    loom::thread::yield_now();
}

/// An `UnsafeCell` with loom's closure API, so code reads the same under both.
#[cfg(not(tensorpool_loom))]
#[derive(Debug)]
pub(crate) struct UnsafeCell<T>(std::cell::UnsafeCell<T>);

#[cfg(not(tensorpool_loom))]
impl<T> UnsafeCell<T> {
    pub(crate) const fn new(v: T) -> Self {
        Self(std::cell::UnsafeCell::new(v))
    }
    #[inline]
    pub(crate) fn with_mut<R>(&self, f: impl FnOnce(*mut T) -> R) -> R {
        f(self.0.get())
    }
}

#[cfg(tensorpool_loom)]
#[allow(unused_imports)]
pub(crate) use loom::cell::UnsafeCell;

/// A test-and-test-and-set spin lock that yields to the scheduler when held.
///
/// Used only on slow paths (central refill, growth, trim, huge cache), never
/// per allocation. Unlike `parking_lot` and `std::sync::Mutex` it has a raw
/// `lock`/`unlock` pair, so `pthread_atfork` handlers can hold it across
/// `fork()`, and it never allocates.
///
/// Invariant: `locked == true` exactly while one holder is between `lock`
/// (or a successful `try_lock`) and `unlock`.
#[derive(Debug)]
pub struct RawLock {
    locked: AtomicBool,
}

impl RawLock {
    /// An unlocked lock.
    #[cfg(not(tensorpool_loom))]
    pub const fn new() -> Self {
        Self {
            locked: AtomicBool::new(false),
        }
    }
    /// An unlocked lock.
    #[cfg(tensorpool_loom)]
    pub fn new() -> Self {
        Self {
            locked: AtomicBool::new(false),
        }
    }

    /// Takes the lock, spinning briefly and then yielding.
    #[inline]
    pub fn lock(&self) {
        if self.try_lock() {
            return;
        }
        self.lock_slow();
    }

    #[cold]
    fn lock_slow(&self) {
        let mut spins = 0u32;
        loop {
            while self.locked.load(Ordering::Relaxed) {
                if spins < 64 {
                    spins += 1;
                    spin_hint();
                } else {
                    yield_now();
                }
            }
            if self.try_lock() {
                return;
            }
        }
    }

    /// Takes the lock if it is free.
    #[inline]
    pub fn try_lock(&self) -> bool {
        self.locked
            .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
            .is_ok()
    }

    /// Releases the lock.
    ///
    /// # Safety
    /// - The caller holds the lock (took it with `lock` or a successful
    ///   `try_lock` and has not released it since).
    #[inline]
    pub unsafe fn unlock(&self) {
        debug_assert!(self.locked.load(Ordering::Relaxed));
        self.locked.store(false, Ordering::Release);
    }

    /// Runs `f` with the lock held.
    #[inline]
    pub fn with<R>(&self, f: impl FnOnce() -> R) -> R {
        struct Unlock<'a>(&'a RawLock);
        impl Drop for Unlock<'_> {
            fn drop(&mut self) {
                // SAFETY: constructed only right after `lock()` below, so this
                // guard's owner holds the lock.
                unsafe { self.0.unlock() }
            }
        }
        self.lock();
        let _g = Unlock(self);
        f()
    }
}

/// Pads and aligns a value to the destructive-interference size, so that two
/// of them never share a cache line: crossbeam-utils' (128 B on x86-64 and
/// aarch64, 64 B or less elsewhere; `new` is `const`).
#[cfg_attr(tensorpool_loom, allow(unused_imports))]
pub(crate) use crossbeam_utils::CachePadded;

/// This thread's number: 1, 2, … in the order threads first ask (trace
/// records carry it). A const-initialised thread-local `Cell` without a
/// destructor, so asking never allocates (usable inside `GlobalAlloc`).
#[cfg(not(tensorpool_loom))]
#[inline]
pub(crate) fn thread_number() -> u32 {
    static NEXT: AtomicU32 = AtomicU32::new(1);
    std::thread_local! {
        static NUMBER: core::cell::Cell<u32> = const { core::cell::Cell::new(0) };
    }
    NUMBER
        .try_with(|n| {
            let mut v = n.get();
            if v == 0 {
                v = NEXT.fetch_add(1, Ordering::Relaxed);
                n.set(v);
            }
            v
        })
        .unwrap_or(0)
}

#[cfg(all(test, not(tensorpool_loom)))]
mod tests {
    use super::*;

    #[test]
    fn cache_padded_spacing() {
        let a = [CachePadded::new(0u8), CachePadded::new(1u8)];
        let d = (&a[1] as *const _ as usize) - (&a[0] as *const _ as usize);
        assert!(d >= 64 && d.is_power_of_two(), "spacing {d}");
        assert_eq!(core::mem::align_of::<CachePadded<u8>>(), d);
    }

    #[test]
    fn raw_lock_excludes() {
        let l = RawLock::new();
        assert!(l.try_lock());
        assert!(!l.try_lock());
        // SAFETY: taken just above.
        unsafe { l.unlock() };
        assert_eq!(l.with(|| 7), 7);
        assert!(l.try_lock());
        // SAFETY: taken just above.
        unsafe { l.unlock() };
    }
}
