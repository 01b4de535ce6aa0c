//! Per-thread caches: the hot path.
//!
//! A [`ThreadCache`] holds, per class, an intrusive singly linked list of free
//! blocks and its length. Allocation pops, free pushes: no lock, no atomic
//! read-modify-write. An empty list refills a batch from the central list; a
//! full one hands a batch back (lock-free). Caps are small (about 512 KiB of
//! blocks per class, one block for classes of 1 MiB and up), so memory never
//! piles up in a thread that only frees: it flows back to the central lists,
//! where the allocating thread picks it up.
//!
//! Threads keep their caches in one `thread_local` without a destructor
//! (so first use never registers a TLS destructor, which would allocate);
//! thread exit is observed through a `pthread` key whose destructor flushes
//! every cache and releases the pools it references.
//!
//! Invariant per class: `len` equals the length of the list at `head` and
//! `len ≤ cap` between calls.

use super::pool::PoolShared;
use super::size_class::{NUM_CLASSES, batch_at, initial_cap, next_cap};
use super::transfer::FreeBlock;
use core::cell::UnsafeCell;
use core::ptr::null_mut;
use std::sync::Arc;

#[derive(Debug, Clone, Copy)]
#[repr(C)]
struct ClassCache {
    head: *mut FreeBlock,
    len: u32,
    cap: u32,
}

/// One thread's cache for one pool.
#[derive(Debug)]
pub(crate) struct ThreadCache {
    classes: [ClassCache; NUM_CLASSES],
}

const fn empty_classes() -> [ClassCache; NUM_CLASSES] {
    let mut a = [ClassCache {
        head: null_mut(),
        len: 0,
        cap: 0,
    }; NUM_CLASSES];
    let mut c = 0;
    while c < NUM_CLASSES {
        a[c].cap = initial_cap(c);
        c += 1;
    }
    a
}

impl ThreadCache {
    pub(crate) const fn new() -> Self {
        ThreadCache {
            classes: empty_classes(),
        }
    }

    /// A block of class `c`, or null if the OS refused memory.
    #[inline(always)]
    pub(crate) fn alloc(&mut self, pool: &PoolShared, c: usize) -> *mut u8 {
        let cc = &mut self.classes[c];
        let h = cc.head;
        if !h.is_null() {
            // SAFETY: `h` is a free block on our list; its first word is the link.
            cc.head = unsafe { (*h).next };
            cc.len -= 1;
            return h.cast();
        }
        self.refill(pool, c).0
    }

    /// Like [`alloc`](Self::alloc), and says whether the block is fresh
    /// (never handed out: every byte but the first word reads zero).
    #[inline]
    pub(crate) fn alloc_fresh(&mut self, pool: &PoolShared, c: usize) -> (*mut u8, bool) {
        if self.classes[c].head.is_null() {
            self.refill(pool, c)
        } else {
            (self.alloc(pool, c), false)
        }
    }

    #[cold]
    #[inline(never)]
    fn refill(&mut self, pool: &PoolShared, c: usize) -> (*mut u8, bool) {
        let want = batch_at(self.classes[c].cap) as usize;
        let (head, n, fresh) = pool
            .central(c)
            .refill(pool, c, want, || self.flush_big(pool));
        if head.is_null() {
            return (null_mut(), false);
        }
        let cc = &mut self.classes[c];
        cc.cap = next_cap(c, cc.cap);
        // SAFETY: `refill` gave us a well-formed chain of `n ≥ 1` free blocks.
        cc.head = unsafe { (*head).next };
        cc.len = (n - 1) as u32;
        (head.cast(), fresh)
    }

    /// Frees a block of class `c`.
    ///
    /// # Safety
    /// - `p` is a block of class `c` of `pool`, not in use and on no list.
    #[inline(always)]
    pub(crate) unsafe fn free(&mut self, pool: &PoolShared, c: usize, p: *mut u8) {
        let cc = &mut self.classes[c];
        if cc.len >= cc.cap {
            self.overflow(pool, c);
        }
        let cc = &mut self.classes[c];
        let b = p.cast::<FreeBlock>();
        // SAFETY: the caller hands us the block; its first word becomes the link.
        unsafe { (*b).next = cc.head };
        cc.head = b;
        cc.len += 1;
    }

    /// A full list: hands half of it back and lets the cap grow.
    #[cold]
    #[inline(never)]
    fn overflow(&mut self, pool: &PoolShared, c: usize) {
        let cap = self.classes[c].cap;
        self.flush(pool, c, batch_at(cap) as usize);
        self.classes[c].cap = next_cap(c, cap);
    }

    /// Hands up to `n` blocks of class `c` back to the pool.
    #[cold]
    #[inline(never)]
    fn flush(&mut self, pool: &PoolShared, c: usize, n: usize) {
        let cc = &mut self.classes[c];
        let n = n.min(cc.len as usize);
        if n == 0 {
            return;
        }
        let head = cc.head;
        let mut tail = head;
        for _ in 1..n {
            // SAFETY: the list has `len ≥ n` nodes.
            tail = unsafe { (*tail).next };
        }
        // SAFETY: `tail` is the n-th node; cut the chain after it.
        unsafe {
            cc.head = (*tail).next;
            (*tail).next = null_mut();
        }
        cc.len -= n as u32;
        // SAFETY: the chain is `n` free blocks of class `c` of `pool`, ours.
        unsafe { pool.central(c).give_back(pool, c, head, tail, n) };
    }

    /// Hands back the idle blocks of one-block classes (at most one per
    /// class), so that a class about to map may reuse their spans
    /// (`large::steal`). A miss path: ~56 loads.
    #[cold]
    fn flush_big(&mut self, pool: &PoolShared) {
        for c in super::large::FIRST..NUM_CLASSES {
            let len = self.classes[c].len as usize;
            if len > 0 {
                self.flush(pool, c, len);
            }
        }
    }

    /// Hands every cached block back to the pool.
    pub(crate) fn flush_all(&mut self, pool: &PoolShared) {
        for c in 0..NUM_CLASSES {
            let len = self.classes[c].len as usize;
            if len > 0 {
                self.flush(pool, c, len);
            }
        }
    }
}

/// Allocates one block straight from the central list (no thread cache):
/// used after the thread's caches were torn down. Also says whether the
/// block is fresh, as [`ThreadCache::alloc_fresh`] does.
pub(crate) fn central_alloc(pool: &PoolShared, c: usize) -> (*mut u8, bool) {
    let (h, n, fresh) = pool.central(c).refill(pool, c, 1, || ());
    debug_assert!(h.is_null() || n == 1);
    (h.cast(), fresh)
}

/// Frees one block straight to the central list.
///
/// # Safety
/// - As for [`ThreadCache::free`].
pub(crate) unsafe fn central_free(pool: &PoolShared, c: usize, p: *mut u8) {
    let b = p.cast::<FreeBlock>();
    // SAFETY: the caller hands us the block.
    unsafe {
        (*b).next = null_mut();
        pool.central(c).give_back(pool, c, b, b, 1);
    }
}

/// How many pools one thread caches at once; a fifth evicts the oldest.
const POOL_SLOTS: usize = 4;

struct PoolSlot {
    /// An `Arc::into_raw` strong reference, or null.
    pool: *const PoolShared,
    cache: ThreadCache,
}

/// Thread-exit state.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Life {
    /// No cache used yet; exit hook not registered.
    Fresh,
    /// Registering the exit hook (re-entrant calls bypass the cache).
    Registering,
    /// Exit hook registered.
    Live,
    /// Caches flushed at thread exit; go straight to the central lists.
    Dead,
}

pub(crate) struct ThreadCaches {
    life: Life,
    next_victim: usize,
    pools: [PoolSlot; POOL_SLOTS],
    /// The cache for the process-wide global pool.
    pub(crate) global: ThreadCache,
}

thread_local! {
    static CACHES: UnsafeCell<ThreadCaches> = const {
        UnsafeCell::new(ThreadCaches {
            life: Life::Fresh,
            next_victim: 0,
            pools: [const { PoolSlot { pool: null_mut::<PoolShared>() as *const _, cache: ThreadCache::new() } }; POOL_SLOTS],
            global: ThreadCache::new(),
        })
    };
}

/// This thread's caches. The cell has no destructor, so the address stays
/// valid for the whole life of the thread; only the address leaves the tiny
/// `try_with` closure, which always inlines.
#[inline(always)]
fn caches() -> *mut ThreadCaches {
    match CACHES.try_with(|cell| cell.get()) {
        Ok(tc) => tc,
        Err(_) => unreachable_tls(),
    }
}

/// Runs `f` with this thread's cache for `pool` (a strong reference to it
/// is taken on first use), or with `None` once the thread is exiting.
///
/// `f` must not re-enter the same pool's cache on this thread (the pool's own
/// code never does: it maps memory directly from the OS).
#[inline(always)]
pub(crate) fn with_pool_cache<R>(
    pool: &Arc<PoolShared>,
    f: impl FnOnce(Option<&mut ThreadCache>) -> R,
) -> R {
    let tc = caches();
    // SAFETY: the cell is this thread's; the only `&mut` made from it is the
    // one handed to `f`, and the pool's code does not re-enter it (see above).
    unsafe {
        let cache = if (*tc).pools[0].pool == Arc::as_ptr(pool) {
            &raw mut (*tc).pools[0].cache
        } else {
            pool_cache_slow(tc, pool)
        };
        f(cache.as_mut())
    }
}

/// The cache of `pool` in slots 1.., installing it (and evicting the oldest
/// slot) if absent; null once the thread is exiting.
///
/// # Safety
/// - `tc` is this thread's `CACHES` cell and no reference into it is live.
#[cold]
#[inline(never)]
unsafe fn pool_cache_slow(tc: *mut ThreadCaches, pool: &Arc<PoolShared>) -> *mut ThreadCache {
    let target = Arc::as_ptr(pool);
    // SAFETY: the caller's contract; no reference into the cell outlives a
    // statement here.
    unsafe {
        if !ensure_exit_hook(tc) {
            return null_mut();
        }
        for i in 1..POOL_SLOTS {
            if (*tc).pools[i].pool == target {
                return &raw mut (*tc).pools[i].cache;
            }
        }
        // Take a free slot, or evict the oldest.
        let i = match (0..POOL_SLOTS).find(|&i| (*tc).pools[i].pool.is_null()) {
            Some(i) => i,
            None => {
                let v = (*tc).next_victim;
                (*tc).next_victim = (v + 1) % POOL_SLOTS;
                let old = (*tc).pools[v].pool;
                (*tc).pools[v].cache.flush_all(&*old);
                (*tc).pools[v].pool = null_mut::<PoolShared>();
                // Released last: dropping the pool may free through the global allocator.
                drop(Arc::from_raw(old));
                v
            }
        };
        // Empty lists (flushed above or never used), and caps back to the
        // slow start: a new pool starts like a new thread.
        (*tc).pools[i].cache = ThreadCache::new();
        (*tc).pools[i].pool = Arc::into_raw(pool.clone());
        &raw mut (*tc).pools[i].cache
    }
}

/// Flushes and forgets this thread's cache of `pool`, if it has one.
pub(crate) fn release_pool_cache(pool: &PoolShared) {
    let target = pool as *const PoolShared;
    let _ = CACHES.try_with(|cell| {
        let tc = cell.get();
        for i in 0..POOL_SLOTS {
            // SAFETY: this thread's cell; no other reference is live.
            let held = unsafe {
                let slot = &mut (*tc).pools[i];
                if slot.pool != target {
                    continue;
                }
                slot.cache.flush_all(pool);
                core::mem::replace(&mut slot.pool, null_mut::<PoolShared>())
            };
            // SAFETY: `held` is the strong reference this slot took.
            drop(unsafe { Arc::from_raw(held) });
        }
    });
}

/// Runs `f` with this thread's cache for the process-wide global pool, or
/// with `None` while the exit hook registers or after thread exit.
#[inline(always)]
pub(crate) fn with_global_cache<R>(f: impl FnOnce(Option<&mut ThreadCache>) -> R) -> R {
    // Only the address leaves `try_with` (a tiny closure always inlines): the
    // cell has no destructor, so it lives as long as the thread.
    let tc = match CACHES.try_with(|cell| cell.get()) {
        Ok(tc) => tc,
        Err(_) => unreachable_tls(),
    };
    // One call site of `f`, so the whole fast path inlines.
    // SAFETY: this thread's cell; the global pool's code never re-enters
    // it (it maps from the OS and takes no allocating locks).
    let cache = unsafe {
        if (*tc).life == Life::Live || ensure_exit_hook(tc) {
            Some(&mut (*tc).global)
        } else {
            None
        }
    };
    f(cache)
}

#[cold]
fn unreachable_tls() -> ! {
    // A `thread_local` without destructor is never torn down, so `try_with`
    // cannot fail; abort rather than panic inside an allocator.
    std::process::abort()
}

static EXIT_KEY: crate::sync::AtomicUsize = crate::sync::AtomicUsize::new(0);

/// Makes sure thread exit will flush this thread's caches. Returns whether
/// the caches may be used now.
///
/// # Safety
/// - `tc` is this thread's `CACHES` cell.
#[cold]
unsafe fn ensure_exit_hook(tc: *mut ThreadCaches) -> bool {
    // SAFETY: this thread's cell (caller).
    unsafe {
        match (*tc).life {
            Life::Live => return true,
            Life::Registering | Life::Dead => return false,
            Life::Fresh => {}
        }
        (*tc).life = Life::Registering;
        let key = exit_key();
        // pthread_setspecific may allocate (keys past the first 32); a
        // re-entrant allocation sees `Registering` and bypasses the cache.
        let ok = key.is_some_and(|k| {
            libc::pthread_setspecific(k, core::ptr::dangling::<libc::c_void>()) == 0
        });
        (*tc).life = if ok { Life::Live } else { Life::Dead };
        ok
    }
}

fn exit_key() -> Option<libc::pthread_key_t> {
    use crate::sync::Ordering;
    let k = EXIT_KEY.load(Ordering::Acquire);
    if k != 0 {
        return Some((k - 1) as libc::pthread_key_t);
    }
    let mut key: libc::pthread_key_t = 0;
    // SAFETY: `key` is a valid out-pointer; the destructor is an
    // `extern "C" fn(*mut c_void)`.
    if unsafe { libc::pthread_key_create(&mut key, Some(on_thread_exit)) } != 0 {
        return None;
    }
    match EXIT_KEY.compare_exchange(0, key as usize + 1, Ordering::AcqRel, Ordering::Acquire) {
        Ok(_) => Some(key),
        Err(winner) => {
            // SAFETY: our key was never handed out.
            unsafe { libc::pthread_key_delete(key) };
            Some((winner - 1) as libc::pthread_key_t)
        }
    }
}

extern "C" fn on_thread_exit(_: *mut libc::c_void) {
    let _ = CACHES.try_with(|cell| {
        let tc = cell.get();
        let mut held = [null_mut::<PoolShared>() as *const PoolShared; POOL_SLOTS];
        // SAFETY: this thread's cell at thread exit; nothing else uses it now.
        unsafe {
            (*tc).life = Life::Dead;
            for (i, h) in held.iter_mut().enumerate() {
                let slot = &mut (*tc).pools[i];
                if !slot.pool.is_null() {
                    slot.cache.flush_all(&*slot.pool);
                    *h = core::mem::replace(&mut slot.pool, null_mut::<PoolShared>());
                }
            }
            (*tc).global.flush_all(super::pool::global_pool());
        }
        for h in held.into_iter().filter(|h| !h.is_null()) {
            // SAFETY: each is the strong reference its slot took.
            drop(unsafe { Arc::from_raw(h) });
        }
    });
}
