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
//! room and its count of requests served share one word (`lp`), so the
//! pop's single add also counts the request; a pop of a fresh block (key
//! word zero, see `guard`) also counts a miss, on a branch the hot loop
//! never takes. The counts are added to the pool's counters at refill,
//! flush, thread exit and `HostPool::stats`. The same word makes the cap
//! test of a push the carry of its add (see `ClassCache::lp`), so a class's
//! record is two words and its cap is read only off the hot path.
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
//! Invariant per class: the length `ClassCache::len(cap)` equals the length
//! of the list at `head` and is `≤ cap ≤ cache_cap(c)` between calls, with
//! `cap` the class's entry in `caps`; every block on the list of a class
//! `c > 0` carries its pool's key in word 1; a mark with a non-null `last`
//! was set, with the request count of `lp` then, since the last refill of
//! the class, publish of the cache and park or unpark of the class's list,
//! when `last` was the `at >> REQ_BITS`-th and last node of the list.
//!
//! [`HostPool`]: super::HostPool

use super::guard::{has_key, key_of, set_key};
use super::pool::PoolShared;
use super::size_class::{
    NUM_CLASSES, SPARE_CLASSES, batch_at, cache_cap, cap_after_refill, initial_cap, keep_at,
    next_cap,
};
use super::transfer::{Chain, FreeBlock, nth, prefetch};
use core::cell::UnsafeCell;
use core::ptr::null_mut;
use std::sync::Arc;

#[derive(Debug, Clone, Copy)]
#[repr(C)]
struct ClassCache {
    head: *mut FreeBlock,
    /// The list's *room* (top [`ROOM_BITS`] bits: `len + ROOM_MAX - cap`,
    /// so it is [`ROOM_MAX`] exactly when the list is full) and the
    /// requests served since the last publish (the bits below). A push adds
    /// [`PUSH`]: the add carries out of the word exactly when the list was
    /// full, so the cap test is the add's own carry flag.
    lp: u64,
}

/// The size of one class's record (two words; held by a test).
#[cfg(test)]
pub(crate) const CLASS_RECORD_BYTES: usize = core::mem::size_of::<ClassCache>();

const ROOM_BITS: u32 = 16;
const REQ_BITS: u32 = 64 - ROOM_BITS;
const REQ_MASK: u64 = (1 << REQ_BITS) - 1;
const ROOM_MAX: u64 = (1 << ROOM_BITS) - 1;
/// Added by a push: one block more.
const PUSH: u64 = 1 << REQ_BITS;
/// Added by a pop: one more request, one block fewer. The room field never
/// borrows: it is at least `ROOM_MAX - cap > 0` while the list is non-empty.
const POP: u64 = 1u64.wrapping_sub(PUSH);

// Every cap (≤ 512) leaves the room field well above zero.
const _: () = {
    let mut c = 0;
    while c < NUM_CLASSES {
        assert!((cache_cap(c) as u64) < ROOM_MAX / 2);
        c += 1;
    }
};

impl ClassCache {
    /// The word for a list of `len ≤ cap` blocks and `requests` uncounted.
    #[inline(always)]
    const fn word(len: u64, cap: u64, requests: u64) -> u64 {
        debug_assert!(len <= cap && cap < ROOM_MAX && requests <= REQ_MASK);
        ((len + ROOM_MAX - cap) << REQ_BITS) | requests
    }
    #[inline(always)]
    fn len(&self, cap: u64) -> u64 {
        (self.lp >> REQ_BITS) + cap - ROOM_MAX
    }
    /// Sets the length and cap, keeping the request count.
    #[inline]
    fn set(&mut self, len: u64, cap: u64) {
        self.lp = Self::word(len, cap, self.lp & REQ_MASK);
    }
    /// Takes the request count, keeping the length.
    #[inline]
    fn take_requests(&mut self) -> u64 {
        let r = self.lp & REQ_MASK;
        self.lp &= !REQ_MASK;
        r
    }
}

/// Where a class's list ended at its last hand-back (see the module docs).
#[derive(Debug, Clone, Copy)]
struct Mark {
    /// The list's last node then, or null (no mark).
    last: *mut FreeBlock,
    /// The list's length then (the bits from [`REQ_BITS`] up) and the
    /// request count of `lp` then (the bits below), as [`Mark::at`] packs them.
    at: u64,
}

impl Mark {
    /// Packs a list length and a request count.
    #[inline]
    const fn at(len: usize, requests: u64) -> u64 {
        ((len as u64) << REQ_BITS) | (requests & REQ_MASK)
    }
}

const NO_MARK: Mark = Mark {
    last: null_mut(),
    at: 0,
};

/// One thread's cache for one pool.
#[derive(Debug)]
pub(crate) struct ThreadCache {
    classes: [ClassCache; NUM_CLASSES],
    /// Each class's cap: starts at [`initial_cap`] and grows with each refill
    /// or overflow up to [`cache_cap`] (slow start). Read off the hot path
    /// only: the room field of `lp` carries it there.
    caps: [u16; NUM_CLASSES],
    /// Per small class, a whole list parked by an overflow (see
    /// `SPARE_MAX_SIZE`): null, or a chain of `len ≤ cap` free blocks of
    /// the class (keyed like the list's).
    spares: [Spare; SPARE_CLASSES],
    /// Requests served by a fresh block, not yet published.
    fresh: u64,
    /// Per class, the list's last node if known (cold: hand-backs only).
    marks: [Mark; NUM_CLASSES],
}

#[derive(Debug, Clone, Copy)]
struct Spare {
    head: *mut FreeBlock,
    len: usize,
}

impl Spare {
    const EMPTY: Spare = Spare {
        head: null_mut(),
        len: 0,
    };
}

const fn initial_caps() -> [u16; NUM_CLASSES] {
    let mut a = [0u16; NUM_CLASSES];
    let mut c = 0;
    while c < NUM_CLASSES {
        a[c] = initial_cap(c) as u16;
        c += 1;
    }
    a
}

const fn empty_classes() -> [ClassCache; NUM_CLASSES] {
    let mut a = [ClassCache {
        head: null_mut(),
        lp: 0,
    }; NUM_CLASSES];
    let mut c = 0;
    while c < NUM_CLASSES {
        a[c].lp = ClassCache::word(0, initial_cap(c) as u64, 0);
        c += 1;
    }
    a
}

impl ThreadCache {
    pub(crate) const fn new() -> Self {
        ThreadCache {
            classes: empty_classes(),
            caps: initial_caps(),
            spares: [Spare::EMPTY; SPARE_CLASSES],
            fresh: 0,
            marks: [NO_MARK; NUM_CLASSES],
        }
    }

    /// The cap of class `c`.
    #[inline]
    fn cap(&self, c: usize) -> u64 {
        u64::from(self.caps[c])
    }

    /// The length of class `c`'s list.
    #[inline]
    fn len(&self, c: usize) -> usize {
        self.classes[c].len(self.cap(c)) as usize
    }

    /// Sets the length and the cap of class `c`'s list.
    #[inline]
    fn set_len_cap(&mut self, c: usize, len: usize, cap: u32) {
        self.caps[c] = cap as u16;
        self.classes[c].set(len as u64, u64::from(cap));
    }

    /// A block of class `c < NUM_CLASSES`, or null if the OS refused memory.
    #[inline(always)]
    pub(crate) fn alloc(&mut self, pool: &PoolShared, c: usize) -> *mut u8 {
        let cc = &mut self.classes[c];
        let h = cc.head;
        if !h.is_null() {
            // SAFETY: `h` is a free block on our list; its first word is the link.
            cc.head = unsafe { (*h).next };
            prefetch(cc.head);
            cc.lp = cc.lp.wrapping_add(POP);
            if has_key(c) {
                // SAFETY: `h` is ours now, of class `c > 0`: it has a key word.
                if unsafe { key_of(h) } == 0 {
                    // A tail call: nothing stays live across it (so the
                    // hot path saves no registers).
                    return self.fresh_out(h);
                }
                // SAFETY: as above.
                unsafe { set_key(h, 0) };
            }
            return h.cast();
        }
        self.refill(pool, c).0
    }

    /// `alloc`'s pop of a fresh block (key word zero, so nothing to clear):
    /// counts the miss and returns the block.
    #[cold]
    #[inline(never)]
    fn fresh_out(&mut self, h: *mut FreeBlock) -> *mut u8 {
        self.count_fresh();
        h.cast()
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
        if self.unpark(c) {
            // The parked list is ours and not empty: `alloc` pops it (the
            // block is reported not fresh, which is always safe).
            return (self.alloc(pool, c), false);
        }
        let cap = self.cap(c) as u32;
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
                at: Mark::at(n - 1, 0),
            }
        } else {
            NO_MARK
        };
        // SAFETY: `refill` gave us a well-formed chain of `n ≥ 1` free blocks.
        self.classes[c].head = unsafe { (*head).next };
        // The list was empty; the head is handed out now (one request).
        let requests = self.classes[c].take_requests() + 1;
        // `n - 1 ≤ cache_cap`: the rest fits the cap `cap_after_refill` sets.
        self.set_len_cap(c, n - 1, cap_after_refill(c, cap, n - 1));
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

    /// Makes the spare list of class `c`, if it has one, the class's list,
    /// whose list must be empty. Says whether it did (the list then holds
    /// `len ≥ 1` blocks).
    #[inline]
    fn unpark(&mut self, c: usize) -> bool {
        debug_assert!(self.classes[c].head.is_null());
        let Some(spare) = self.spares.get_mut(c) else {
            return false;
        };
        if spare.head.is_null() {
            return false;
        }
        let s = core::mem::replace(spare, Spare::EMPTY);
        self.classes[c].head = s.head;
        // The spare's last node is not known.
        self.marks[c] = NO_MARK;
        // `s.len ≤` the cap when parked, and caps only grow.
        let cap = self.caps[c];
        self.set_len_cap(c, s.len, u32::from(cap));
        true
    }

    /// Whether the block `b` of class `c` is on this cache's lists (the
    /// class's and its spare) or the central list: the slow half of
    /// double-free detection, run only when `b` carries the key.
    #[cold]
    #[inline(never)]
    fn is_free(&self, pool: &PoolShared, c: usize, b: *mut FreeBlock) -> bool {
        let spare = self.spares.get(c).map_or(null_mut(), |s| s.head);
        for mut cur in [self.classes[c].head, spare] {
            while !cur.is_null() {
                if cur == b {
                    return true;
                }
                // SAFETY: well-formed nodes on our lists.
                cur = unsafe { (*cur).next };
            }
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
        let cc = &mut self.classes[c];
        let (lp, full) = cc.lp.overflowing_add(PUSH);
        // The slow cases (a block carrying the key, maybe a double free; a
        // full list) are one tail call: nothing stays live across it.
        if has_key(c) {
            let key = pool.key();
            // SAFETY: a block of class `c > 0` has a second word (caller).
            if unsafe { key_of(b) } == key || full {
                // SAFETY: forwarded from the caller.
                return unsafe { self.free_slow(pool, c, b) };
            }
            // SAFETY: as above; the block is being freed by the caller.
            unsafe { set_key(b, key) };
        } else if full {
            // SAFETY: forwarded from the caller.
            return unsafe { self.free_slow(pool, c, b) };
        }
        // SAFETY: the caller hands us the block; its first word becomes the link.
        unsafe { (*b).next = cc.head };
        cc.head = b;
        cc.lp = lp;
        true
    }

    /// [`free`](Self::free) of a block that carries the key (the slow half
    /// of double-free detection) or onto a full list (make room first).
    ///
    /// # Safety
    /// - As for [`free`](Self::free), with `p` as `b`.
    #[cold]
    #[inline(never)]
    #[must_use]
    unsafe fn free_slow(&mut self, pool: &PoolShared, c: usize, b: *mut FreeBlock) -> bool {
        if has_key(c) {
            let key = pool.key();
            // SAFETY: a block of class `c > 0` has a second word (caller).
            if unsafe { key_of(b) } == key && self.is_free(pool, c, b) {
                return false;
            }
            // SAFETY: as above; the block is being freed by the caller.
            unsafe { set_key(b, key) };
        }
        if self.len(c) as u64 >= self.cap(c) {
            self.overflow(pool, c);
        }
        let len = self.len(c);
        let cap = self.caps[c];
        let cc = &mut self.classes[c];
        // SAFETY: the caller hands us the block; its first word becomes the link.
        unsafe { (*b).next = cc.head };
        cc.head = b;
        self.set_len_cap(c, len + 1, u32::from(cap));
        true
    }

    /// A full list: parks it whole as the class's spare if the class has an
    /// empty one (no walk, nothing leaves the thread), else keeps its newest
    /// [`keep_at`] blocks and hands the rest back; either way the cap grows.
    #[cold]
    #[inline(never)]
    fn overflow(&mut self, pool: &PoolShared, c: usize) {
        let cap = self.cap(c) as u32;
        if let Some(spare) = self.spares.get_mut(c)
            && spare.head.is_null()
        {
            // Park the whole list: O(1), and it stays in this thread.
            let len = self.classes[c].len(u64::from(cap)) as usize;
            *spare = Spare {
                head: core::mem::replace(&mut self.classes[c].head, null_mut()),
                len,
            };
            self.marks[c] = NO_MARK;
            self.set_len_cap(c, 0, next_cap(c, cap));
            return;
        }
        self.hand_back_after(pool, c, keep_at(cap) as usize);
        let len = self.len(c);
        self.set_len_cap(c, len, next_cap(c, cap));
    }

    /// The last node of class `c`'s list if its mark still names it, else
    /// null.
    fn known_last(&self, c: usize) -> *mut FreeBlock {
        let m = self.marks[c];
        let (len, req) = (m.at >> REQ_BITS, m.at & REQ_MASK);
        let now = self.classes[c].lp & REQ_MASK;
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
        let len = self.len(c);
        debug_assert!(keep < len);
        let n = len - keep;
        let cap = self.caps[c];
        let cc = &mut self.classes[c];
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
        self.set_len_cap(c, keep, u32::from(cap));
        self.marks[c] = Mark {
            last: kept,
            at: Mark::at(keep, self.classes[c].lp & REQ_MASK),
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
            if self.len(c) > 0 {
                self.hand_back_after(pool, c, 0);
            }
        }
    }

    /// Hands every cached block back to the pool (and publishes the counts).
    pub(crate) fn flush_all(&mut self, pool: &PoolShared) {
        for c in 0..NUM_CLASSES {
            if self.len(c) > 0 {
                self.hand_back_after(pool, c, 0);
            }
            if self.unpark(c) {
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
    /// `global` may be used: the exit hook is registered (`life` is
    /// `Live`) and so are the global pool's fork handlers.
    global_ready: bool,
    /// `global_ready`, and the global allocator found tracing off (which,
    /// once off, stays off): its quiet path may skip the trace checks.
    global_quiet: bool,
}

thread_local! {
    static CACHES: UnsafeCell<ThreadCaches> = const {
        UnsafeCell::new(ThreadCaches {
            life: Life::Fresh,
            next_victim: 0,
            pools: [const { PoolSlot { pool: null_mut::<PoolShared>() as *const _, cache: ThreadCache::new() } }; POOL_SLOTS],
            global: ThreadCache::new(),
            global_ready: false,
            global_quiet: false,
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

/// This thread's cache for `pool` (a reference to its shared state is taken
/// on first use), or null once the thread is exiting. The caller holds a
/// handle of `pool`, makes at most one `&mut` from the pointer at a time and
/// drops it before this thread next enters any pool's cache.
///
/// A pointer, not a closure: a closure's body is one function that every
/// inlined copy of `allocate`/`deallocate` calls, and a caller with many
/// copies (a benchmark's big `match`) got it out of line, its captures and
/// result passed through the stack.
#[inline(always)]
pub(crate) fn pool_cache(pool: &Arc<PoolShared>) -> *mut ThreadCache {
    let tc = caches();
    // SAFETY: the cell is this thread's; only addresses are formed here.
    unsafe {
        if (*tc).pools[0].pool == Arc::as_ptr(pool) {
            &raw mut (*tc).pools[0].cache
        } else {
            pool_cache_slow(tc, pool)
        }
    }
}

/// Runs `f` with this thread's cache for `pool` (see [`pool_cache`]), or
/// with `None` once the thread is exiting. For the cold entry points; the
/// hot ones use [`pool_cache`] directly.
///
/// `f` must not re-enter the same pool's cache on this thread (the pool's own
/// code never does: it maps memory directly from the OS).
#[inline]
pub(crate) fn with_pool_cache<R>(
    pool: &Arc<PoolShared>,
    f: impl FnOnce(Option<&mut ThreadCache>) -> R,
) -> R {
    // SAFETY: the only `&mut` made from the pointer is the one handed to
    // `f`, and the pool's code does not re-enter it (see above).
    f(unsafe { pool_cache(pool).as_mut() })
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

/// This thread's cache for the process-wide global pool, or null while the
/// exit hook registers or after thread exit. Its first call on a thread
/// also makes sure the fork handlers exist (`global::ensure_atfork`), so
/// the hot path is one load and compare of a per-thread flag. The caller
/// makes at most one `&mut` from the pointer at a time; the global pool's
/// code never re-enters it (it maps from the OS and takes no allocating
/// locks).
#[inline(always)]
pub(crate) fn global_cache() -> *mut ThreadCache {
    let tc = caches();
    // SAFETY: this thread's cell; only addresses are formed here.
    unsafe {
        if (*tc).global_ready {
            &raw mut (*tc).global
        } else {
            global_cache_slow(tc)
        }
    }
}

/// This thread's cache for the global pool if the global allocator marked
/// the thread quiet ([`mark_global_quiet`]), else null. Same contract as
/// [`global_cache`].
#[inline(always)]
pub(crate) fn quiet_global_cache() -> *mut ThreadCache {
    let tc = caches();
    // SAFETY: this thread's cell; only addresses are formed here.
    unsafe {
        if (*tc).global_quiet {
            &raw mut (*tc).global
        } else {
            null_mut()
        }
    }
}

/// Marks this thread quiet if its global cache is ready: the global
/// allocator calls it once it has seen tracing off (for good).
pub(crate) fn mark_global_quiet() {
    let tc = caches();
    // SAFETY: this thread's cell; no reference into it is live.
    unsafe { (*tc).global_quiet = (*tc).global_ready };
}

/// [`global_cache`] on a thread's first use of the global pool, while its
/// exit hook registers, and after its exit.
///
/// # Safety
/// - `tc` is this thread's `CACHES` cell and no reference into it is live.
#[cold]
#[inline(never)]
unsafe fn global_cache_slow(tc: *mut ThreadCaches) -> *mut ThreadCache {
    crate::global::ensure_atfork();
    // SAFETY: the caller's contract.
    unsafe {
        if ensure_exit_hook(tc) {
            (*tc).global_ready = true;
            &raw mut (*tc).global
        } else {
            null_mut()
        }
    }
}

/// Runs `f` with this thread's cache for the process-wide global pool (see
/// [`global_cache`]), or with `None` while the exit hook registers or after
/// thread exit. For the cold entry points.
#[inline]
pub(crate) fn with_global_cache<R>(f: impl FnOnce(Option<&mut ThreadCache>) -> R) -> R {
    // SAFETY: the only `&mut` made from the pointer is the one handed to `f`.
    f(unsafe { global_cache().as_mut() })
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
            (*tc).global_ready = false;
            (*tc).global_quiet = false;
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
        while tc.len(c) > 0 {
            live.push(tc.alloc(&sh, c));
        }
        assert!(tc.known_last(c).is_null(), "a mark outlived its node");
        // Frees alone: the first overflow walks the list, later ones cut
        // after the kept blocks and hand the rest back up to the mark.
        let mut overflows = 0;
        for &p in &live {
            let before = tc.len(c);
            // SAFETY: allocated above from this pool, class `c`, freed once.
            assert!(unsafe { tc.free(&sh, c, p) });
            if tc.len(c) <= before {
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

    /// A class with a spare list: parking a list drops its mark, so a
    /// later hand-back never trusts a node that moved to the spare.
    #[test]
    fn a_parked_list_takes_no_mark_with_it() {
        use std::collections::HashSet;
        let pool = HostPool::new();
        let sh = pool.shared().clone();
        let c = class_of(64);
        assert!(c < SPARE_CLASSES);
        let mut tc = ThreadCache::new();
        for round in 0..3 {
            let live: Vec<*mut u8> = (0..3000).map(|_| tc.alloc(&sh, c)).collect();
            let distinct: HashSet<_> = live.iter().collect();
            assert_eq!(
                distinct.len(),
                live.len(),
                "round {round}: a block handed out twice"
            );
            for &p in &live {
                // SAFETY: allocated above from this pool, class `c`, freed once.
                assert!(unsafe { tc.free(&sh, c, p) });
                let m = tc.known_last(c);
                if !m.is_null() {
                    // The mark names the last node of the class's own list.
                    let mut cur = tc.classes[c].head;
                    let mut last = null_mut();
                    while !cur.is_null() {
                        last = cur;
                        // SAFETY: well-formed nodes on our list.
                        cur = unsafe { (*cur).next };
                    }
                    assert_eq!(m, last, "round {round}: a mark names a node off the list");
                }
            }
        }
        tc.flush_all(&sh);
        pool.trim();
        assert_eq!(
            pool.stats().reserved_bytes,
            0,
            "a block lost or listed twice"
        );
    }
}
