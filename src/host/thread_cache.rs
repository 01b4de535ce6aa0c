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
//! A slot's reference to its pool keeps the pool's *shared state* (its
//! address) alive, not its memory: the last [`HostPool`] handle tears the
//! pool down (unmaps everything) whatever other threads cache. A thread that
//! finds a torn-down pool in a slot forgets the slot's blocks without
//! touching them; one that hands blocks back to a pool it holds no handle of
//! (eviction, thread exit) first takes a handle, so the pool cannot be torn
//! down under it (`PoolShared::acquire_handle`).
//!
//! Per-request cache statistics at no cost on the hot path: a class's list
//! length and its count of requests served share one word (`lp`), so the
//! pop's `len -= 1` also counts the request; a pop of a fresh block (key
//! word zero, see `guard`) also counts a miss, on a branch the hot loop
//! never takes. The counts are added to the pool's counters at refill,
//! flush, thread exit and `HostPool::stats`.
//!
//! Handing back without walking: a full list keeps its newest
//! [`keep_at`]`(cap)` blocks and hands the rest back as one chain. That
//! needs the list's last node, which a [`Mark`] remembers from the previous
//! hand-back (the node the list was cut after) with the list's length and
//! the request count then: pops only take from the front, so while fewer
//! pops than that length have happened since, the node is still the last.
//! A consumer thread that only frees a class thus walks `keep_at(cap)` hot
//! nodes per hand-back instead of the whole batch, and a thread's exit
//! hands each list back in O(1).
//!
//! Invariant per class: `lp & LEN_MASK` equals the length of the list at
//! `head` and is `≤ cap ≤ cache_cap(c)` between calls; every block on the
//! list of a class `c > 0` carries its pool's key in word 1; a mark with a
//! non-null `last` was set with the request count of `lp` since the last
//! refill of the class and publish of the cache, when `last` was the
//! `at & LEN_MASK`-th and last node of the list.
//!
//! [`HostPool`]: super::HostPool

use super::guard::{has_key, key_of, set_key};
use super::pool::PoolShared;
use super::size_class::{
    NUM_CLASSES, batch_at, cache_cap, cap_after_refill, initial_cap, keep_at, next_cap,
};
use super::transfer::{Chain, FreeBlock, nth, prefetch};
use core::cell::UnsafeCell;
use core::ptr::null_mut;
use std::sync::Arc;

#[derive(Debug, Clone, Copy)]
#[repr(C)]
struct ClassCache {
    head: *mut FreeBlock,
    /// The list's length (low [`LEN_BITS`] bits) and the requests served
    /// since the last publish (the bits above).
    lp: u64,
    /// The list's cap: starts at [`initial_cap`] and grows with each refill
    /// or overflow up to [`cache_cap`] (slow start).
    cap: u64,
}

const LEN_BITS: u32 = 16;
const LEN_MASK: u64 = (1 << LEN_BITS) - 1;
/// Added by a pop: one more request, one block fewer.
const POP: u64 = (1 << LEN_BITS) - 1;

// Every cap (≤ 512) fits the length bits.
const _: () = {
    let mut c = 0;
    while c < NUM_CLASSES {
        assert!((cache_cap(c) as u64) < LEN_MASK);
        c += 1;
    }
};

impl ClassCache {
    #[inline(always)]
    fn len(&self) -> u64 {
        self.lp & LEN_MASK
    }
    /// Takes the request count, keeping the length.
    #[inline]
    fn take_requests(&mut self) -> u64 {
        let r = self.lp >> LEN_BITS;
        self.lp &= LEN_MASK;
        r
    }
}

/// Where a class's list ended at its last hand-back (see the module docs).
#[derive(Debug, Clone, Copy)]
struct Mark {
    /// The list's last node then, or null (no mark).
    last: *mut FreeBlock,
    /// The list's length then (low [`LEN_BITS`] bits) and the request
    /// count of `lp` then (the bits above).
    at: u64,
}

const NO_MARK: Mark = Mark {
    last: null_mut(),
    at: 0,
};

/// One thread's cache for one pool.
#[derive(Debug)]
pub(crate) struct ThreadCache {
    classes: [ClassCache; NUM_CLASSES],
    /// Requests served by a fresh block, not yet published.
    fresh: u64,
    /// Per class, the list's last node if known (cold: hand-backs only).
    marks: [Mark; NUM_CLASSES],
}

const fn empty_classes() -> [ClassCache; NUM_CLASSES] {
    let mut a = [ClassCache {
        head: null_mut(),
        lp: 0,
        cap: 0,
    }; NUM_CLASSES];
    let mut c = 0;
    while c < NUM_CLASSES {
        a[c].cap = initial_cap(c) as u64;
        c += 1;
    }
    a
}

impl ThreadCache {
    pub(crate) const fn new() -> Self {
        ThreadCache {
            classes: empty_classes(),
            fresh: 0,
            marks: [NO_MARK; NUM_CLASSES],
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
            prefetch(cc.head);
            cc.lp = cc.lp.wrapping_add(POP);
            // SAFETY: `h` is ours now and of class `c`.
            unsafe { self.hand_out(c, h) };
            return h.cast();
        }
        self.refill(pool, c).0
    }

    /// Clears the key word of a block about to be handed out, counting a
    /// miss if the block is fresh (key word zero).
    ///
    /// # Safety
    /// - `h` is a block of class `c` taken off a free list, owned by us.
    #[inline(always)]
    unsafe fn hand_out(&mut self, c: usize, h: *mut FreeBlock) {
        if has_key(c) {
            // SAFETY: a block of class `c > 0` has a second word (caller).
            if unsafe { key_of(h) } == 0 {
                self.count_fresh();
            }
            // SAFETY: as above.
            unsafe { set_key(h, 0) };
        }
    }

    #[cold]
    #[inline(never)]
    fn count_fresh(&mut self) {
        self.fresh += 1;
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
        let cap = self.classes[c].cap as u32;
        let want = batch_at(cap) as usize;
        // The list is empty and one block is handed out: up to
        // `cache_cap + 1` keep it within the cap `cap_after_refill` sets, so
        // a whole batch another thread handed back is taken as it is (O(1))
        // however far the slow start is.
        let max = cache_cap(c) as usize + 1;
        let Chain {
            head,
            tail,
            n,
            fresh: carved,
        } = pool
            .central(c)
            .refill(pool, c, want, max, || self.flush_big(pool));
        if head.is_null() {
            return (null_mut(), false);
        }
        // The request count restarts at zero below; the list's last node is
        // the chain's (none if the chain is only the block handed out).
        self.marks[c] = if n > 1 {
            Mark {
                last: tail,
                at: (n - 1) as u64,
            }
        } else {
            NO_MARK
        };
        let cc = &mut self.classes[c];
        cc.cap = cap_after_refill(c, cap, n - 1) as u64;
        // SAFETY: `refill` gave us a well-formed chain of `n ≥ 1` free blocks.
        cc.head = unsafe { (*head).next };
        // The list was empty; the head is handed out now (one request).
        let requests = cc.take_requests() + 1;
        cc.lp = (n - 1) as u64;
        if has_key(c) {
            // SAFETY: the head is ours, of class `c`.
            unsafe { self.hand_out(c, head) };
        } else {
            // No key word: count fresh blocks as they enter the cache.
            self.fresh += carved as u64;
        }
        pool.count_requests(requests, core::mem::take(&mut self.fresh));
        // Carved blocks come first, so the head is fresh iff one was carved.
        (head.cast(), carved > 0)
    }

    /// Adds this cache's request counts (every class) to the pool's counters.
    pub(crate) fn publish(&mut self, pool: &PoolShared) {
        // The request counts restart: no mark may outlive its count.
        self.marks = [NO_MARK; NUM_CLASSES];
        let requests: u64 = self.classes.iter_mut().map(ClassCache::take_requests).sum();
        pool.count_requests(requests, core::mem::take(&mut self.fresh));
    }

    /// Whether the block `b` of class `c` is on this cache's list or the
    /// central list: the slow half of double-free detection, run only
    /// when `b` carries the key.
    #[cold]
    #[inline(never)]
    fn is_free(&self, pool: &PoolShared, c: usize, b: *mut FreeBlock) -> bool {
        let mut cur = self.classes[c].head;
        while !cur.is_null() {
            if cur == b {
                return true;
            }
            // SAFETY: `len` well-formed nodes on our list.
            cur = unsafe { (*cur).next };
        }
        pool.central(c).holds(b)
    }

    /// Frees a block of class `c`. Returns `false`, with nothing changed,
    /// for a detected double free (see `guard`).
    ///
    /// # Safety
    /// - `p` is a block of class `c` of `pool`, not in use, and on no list
    ///   unless this is a double free (which is then detected only if the
    ///   block is on this cache's or the central list).
    #[inline(always)]
    #[must_use]
    pub(crate) unsafe fn free(&mut self, pool: &PoolShared, c: usize, p: *mut u8) -> bool {
        let b = p.cast::<FreeBlock>();
        if has_key(c) {
            let key = pool.key();
            // SAFETY: a block of class `c > 0` has a second word (caller).
            if unsafe { key_of(b) } == key && self.is_free(pool, c, b) {
                return false;
            }
            // SAFETY: as above; the block is being freed by the caller.
            unsafe { set_key(b, key) };
        }
        let cc = &mut self.classes[c];
        if cc.len() >= cc.cap {
            self.overflow(pool, c);
        }
        let cc = &mut self.classes[c];
        // SAFETY: the caller hands us the block; its first word becomes the link.
        unsafe { (*b).next = cc.head };
        cc.head = b;
        cc.lp += 1;
        true
    }

    /// A full list: keeps its newest [`keep_at`] blocks, hands the rest
    /// back and lets the cap grow.
    #[cold]
    #[inline(never)]
    fn overflow(&mut self, pool: &PoolShared, c: usize) {
        let cap = self.classes[c].cap as u32;
        self.hand_back_after(pool, c, keep_at(cap) as usize);
        self.classes[c].cap = next_cap(c, cap) as u64;
    }

    /// The last node of class `c`'s list if its mark still names it, else
    /// null.
    fn known_last(&self, c: usize) -> *mut FreeBlock {
        let m = self.marks[c];
        let (len, req) = (m.at & LEN_MASK, m.at >> LEN_BITS);
        let now = self.classes[c].lp >> LEN_BITS;
        // Fewer pops since the mark than nodes were at or above `last`.
        if !m.last.is_null() && now >= req && now - req < len {
            m.last
        } else {
            null_mut()
        }
    }

    /// Keeps the first `keep` blocks of class `c`'s list (fewer than it
    /// holds) and hands the rest back as one chain, walking only the kept
    /// blocks when the list's last node is known (else the whole list).
    /// The cut node becomes the mark.
    fn hand_back_after(&mut self, pool: &PoolShared, c: usize, keep: usize) {
        let known = self.known_last(c);
        let cc = &mut self.classes[c];
        let len = cc.len() as usize;
        debug_assert!(keep < len);
        let n = len - keep;
        // SAFETY: the list has `len > keep` well-formed nodes; `kept`, its
        // `keep`-th, is followed by `n ≥ 1` more, the last of which is
        // `known` when that is non-null (the mark's argument above).
        let (first, last, kept) = unsafe {
            let kept = if keep == 0 {
                null_mut()
            } else {
                nth(cc.head, keep)
            };
            let first = if keep == 0 { cc.head } else { (*kept).next };
            let last = if known.is_null() {
                nth(first, n)
            } else {
                known
            };
            if keep == 0 {
                cc.head = null_mut();
            } else {
                (*kept).next = null_mut();
            }
            (first, last, kept)
        };
        cc.lp -= n as u64;
        self.marks[c] = Mark {
            last: kept,
            at: keep as u64 | (cc.lp >> LEN_BITS << LEN_BITS),
        };
        // SAFETY: the chain is `n` free blocks of class `c` of `pool`, ours.
        unsafe { pool.central(c).give_back(pool, c, first, last, n) };
    }

    /// Hands back the idle blocks of one-block classes (at most one per
    /// class), so that a class about to map may reuse their spans
    /// (`large::steal`). A miss path: ~56 loads.
    #[cold]
    fn flush_big(&mut self, pool: &PoolShared) {
        for c in super::large::FIRST..NUM_CLASSES {
            if self.classes[c].len() > 0 {
                self.hand_back_after(pool, c, 0);
            }
        }
    }

    /// Hands every cached block back to the pool (and publishes the counts).
    pub(crate) fn flush_all(&mut self, pool: &PoolShared) {
        for c in 0..NUM_CLASSES {
            if self.classes[c].len() > 0 {
                self.hand_back_after(pool, c, 0);
            }
        }
        self.publish(pool);
    }

    /// Forgets every cached block without touching it: the pool was torn
    /// down, its memory is gone.
    fn discard(&mut self) {
        *self = ThreadCache::new();
    }
}

/// Allocates one block straight from the central list (no thread cache):
/// used after the thread's caches were torn down. Also says whether the
/// block is fresh, as [`ThreadCache::alloc_fresh`] does.
pub(crate) fn central_alloc(pool: &PoolShared, c: usize) -> (*mut u8, bool) {
    let Chain {
        head: h,
        n,
        fresh: carved,
        ..
    } = pool.central(c).refill(pool, c, 1, 1, || ());
    debug_assert!(h.is_null() || n == 1);
    if h.is_null() {
        return (null_mut(), false);
    }
    let fresh = if has_key(c) {
        // SAFETY: the block is ours, of class `c > 0`: it has a key word.
        unsafe {
            let k = key_of(h);
            set_key(h, 0);
            k == 0
        }
    } else {
        carved > 0
    };
    pool.count_requests(1, u64::from(fresh));
    (h.cast(), carved > 0)
}

/// Frees one block straight to the central list. Returns `false`, with
/// nothing changed, for a detected double free.
///
/// # Safety
/// - As for [`ThreadCache::free`].
#[must_use]
pub(crate) unsafe fn central_free(pool: &PoolShared, c: usize, p: *mut u8) -> bool {
    let b = p.cast::<FreeBlock>();
    // SAFETY: the caller hands us the block, of class `c`.
    unsafe {
        if has_key(c) {
            let key = pool.key();
            if key_of(b) == key && pool.central(c).holds(b) {
                return false;
            }
            set_key(b, key);
        }
        (*b).next = null_mut();
        pool.central(c).give_back(pool, c, b, b, 1);
    }
    true
}

/// How many pools one thread caches at once; a fifth evicts the oldest.
const POOL_SLOTS: usize = 4;

struct PoolSlot {
    /// An `Arc::into_raw` strong reference, or null. It keeps the pool's
    /// shared state allocated (so no other pool can reuse its address while
    /// this slot names it), not its memory mapped.
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

/// Runs `f` with this thread's cache for `pool` (a reference to its shared
/// state is taken on first use), or with `None` once the thread is exiting.
/// The caller holds a handle of `pool`.
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
        // Take a free slot (one whose pool was torn down counts as free),
        // or evict the oldest.
        let free = (0..POOL_SLOTS).find(|&i| {
            let p = (*tc).pools[i].pool;
            p.is_null() || !(*p).is_alive()
        });
        let i = match free {
            Some(i) => i,
            None => {
                let v = (*tc).next_victim;
                (*tc).next_victim = (v + 1) % POOL_SLOTS;
                v
            }
        };
        retire_slot(&raw mut (*tc).pools[i]);
        // Empty lists (flushed or forgotten by `retire_slot`, or never
        // used), and caps back to the slow start: a new pool starts like a
        // new thread.
        (*tc).pools[i].cache = ThreadCache::new();
        (*tc).pools[i].pool = Arc::into_raw(pool.clone());
        &raw mut (*tc).pools[i].cache
    }
}

/// Empties a slot: its blocks go back to its pool if the pool is alive
/// (under a handle taken for the purpose, so that it cannot be torn down
/// meanwhile; if that was the last handle, this thread tears it down), or
/// are forgotten untouched if it was torn down. Then the slot's reference
/// is released.
///
/// # Safety
/// - `slot` is a slot of this thread's `CACHES` cell and no reference into
///   it is live.
unsafe fn retire_slot(slot: *mut PoolSlot) {
    // SAFETY: the caller's contract.
    unsafe {
        let old = core::mem::replace(&mut (*slot).pool, null_mut::<PoolShared>());
        if old.is_null() {
            return;
        }
        let pool = &*old;
        if pool.acquire_handle() {
            (*slot).cache.flush_all(pool);
            pool.release_handle();
        } else {
            (*slot).cache.discard();
        }
        // Released last: dropping the pool may free through the global allocator.
        drop(Arc::from_raw(old));
    }
}

/// Forgets this thread's cache of `pool`, if it has one, without touching
/// its blocks: the last handle is being dropped and the pool torn down.
pub(crate) fn discard_pool_cache(pool: &PoolShared) {
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
                slot.cache.discard();
                core::mem::replace(&mut slot.pool, null_mut::<PoolShared>())
            };
            // SAFETY: `held` is the strong reference this slot took.
            drop(unsafe { Arc::from_raw(held) });
        }
    });
}

/// Publishes this thread's request counts for `pool` (before a stats read).
pub(crate) fn publish_counts(pool: &PoolShared) {
    let target = pool as *const PoolShared;
    let _ = CACHES.try_with(|cell| {
        let tc = cell.get();
        for i in 0..POOL_SLOTS {
            // SAFETY: this thread's cell; no other reference is live.
            unsafe {
                if (*tc).pools[i].pool == target {
                    (*tc).pools[i].cache.publish(pool);
                }
            }
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
        // SAFETY: this thread's cell at thread exit; nothing else uses it now.
        unsafe {
            (*tc).life = Life::Dead;
            (*tc).global.flush_all(super::pool::global_pool());
            for i in 0..POOL_SLOTS {
                retire_slot(&raw mut (*tc).pools[i]);
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::HostPool;
    use crate::host::size_class::class_of;

    /// The mark rule: a list emptied by pops has no known last node (its
    /// mark's node was handed out), a list filled by frees alone has one
    /// after its first hand-back, and hand-backs with or without it keep
    /// every block exactly once (trim then releases every span).
    #[test]
    fn marks_name_the_last_node_only_while_it_is_listed() {
        let pool = HostPool::new();
        let sh = pool.shared().clone();
        let c = class_of(4096);
        let mut tc = ThreadCache::new();
        let mut live = Vec::new();
        for _ in 0..300 {
            live.push(tc.alloc(&sh, c));
        }
        // Pop until the list is empty: the marked node is handed out.
        while tc.classes[c].len() > 0 {
            live.push(tc.alloc(&sh, c));
        }
        assert!(tc.known_last(c).is_null(), "a mark outlived its node");
        // Frees alone: the first overflow walks the list, later ones cut
        // after the kept blocks and hand the rest back up to the mark.
        let mut overflows = 0;
        for &p in &live {
            let before = tc.classes[c].len();
            // SAFETY: allocated above from this pool, class `c`, freed once.
            assert!(unsafe { tc.free(&sh, c, p) });
            if tc.classes[c].len() <= before {
                overflows += 1;
                assert!(!tc.known_last(c).is_null(), "no mark after a hand-back");
            }
        }
        assert!(overflows >= 2);
        // A pop then pushes: the mark holds while fewer pops than kept nodes.
        let q = tc.alloc(&sh, c);
        // SAFETY: as above.
        assert!(unsafe { tc.free(&sh, c, q) });
        assert!(!tc.known_last(c).is_null());
        tc.flush_all(&sh);
        assert!(tc.known_last(c).is_null(), "publish keeps no mark");
        pool.trim();
        assert_eq!(
            pool.stats().reserved_bytes,
            0,
            "a block lost or listed twice"
        );
    }
}
