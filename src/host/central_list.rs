//! The protocol of a size class's central list, apart from spans.
//!
//! Frees come in as whole batches (a chain with its tail and length): if
//! the class lock is free, the batch is stored as it is in one of
//! [`BATCH_SLOTS`] slots (tcmalloc's transfer cache), else it goes onto a
//! lock-free [`TransferStack`] (one CAS), so a free never waits for a
//! refill that holds the lock while it maps a span. Refills take the lock
//! and take whole batches first (O(1) each: no block is read), then cut
//! from the loose free list, draining the stack into it when it is short.
//! Byte counters are raised *before* blocks become visible and lowered
//! *after* they are taken (`give_back`'s and `take`'s callbacks), so a
//! counter can run ahead of the lists but never below them.
//!
//! Generic over the rest of the locked state (`X`: the span bookkeeping of
//! `central::Central`), so that loom can model exactly this code
//! (`tests/loom.rs`, `central_list_*`).
//!
//! Invariant, with the lock held: `free_len` is the length of the chain at
//! `free`; each of the first `nbatches` slots holds a chain of `n ≥ 1`
//! blocks ending at its `tail`; `incoming_len` is, between operations, the
//! number of blocks pushed onto `incoming` and not yet drained.

use super::transfer::{Chain, FreeBlock, TransferStack, nth};
use crate::sync::{AtomicUsize, Ordering, RawLock, UnsafeCell};
use core::ptr::null_mut;

/// How many batches a central list keeps whole; more go onto the loose
/// free list (linked in O(1) through their tails).
pub const BATCH_SLOTS: usize = 8;

/// A chain of `n` free blocks from `head` to `tail`.
#[derive(Debug, Clone, Copy)]
struct Batch {
    head: *mut FreeBlock,
    tail: *mut FreeBlock,
    n: usize,
}

const NO_BATCH: Batch = Batch {
    head: null_mut(),
    tail: null_mut(),
    n: 0,
};

/// The state guarded by the class lock.
#[derive(Debug)]
pub struct Locked<X> {
    /// Loose free blocks, linked through their first word.
    pub free: *mut FreeBlock,
    /// Length of `free`.
    pub free_len: usize,
    /// Whole batches as they were given back (the first `nbatches`).
    batches: [Batch; BATCH_SLOTS],
    nbatches: usize,
    /// The rest of the guarded state.
    pub x: X,
}

impl<X> Locked<X> {
    /// Blocks held in whole batches.
    pub fn batched(&self) -> usize {
        self.batches[..self.nbatches].iter().map(|b| b.n).sum()
    }

    /// Stores the chain `head → … → tail` of `n` blocks: whole in a free
    /// slot, else linked in front of the loose free list. O(1).
    ///
    /// # Safety
    /// - The chain is well formed, `n ≥ 1` blocks long and the caller's.
    unsafe fn put(&mut self, head: *mut FreeBlock, tail: *mut FreeBlock, n: usize) {
        if self.nbatches < BATCH_SLOTS {
            self.batches[self.nbatches] = Batch { head, tail, n };
            self.nbatches += 1;
        } else {
            // SAFETY: `tail` ends the caller's chain.
            unsafe { (*tail).next = self.free };
            self.free = head;
            self.free_len += n;
        }
    }

    /// Moves every whole batch onto the loose free list (O(1) each), so
    /// that `free` holds every listed block.
    pub fn unbatch(&mut self) {
        while self.nbatches > 0 {
            self.nbatches -= 1;
            let b = self.batches[self.nbatches];
            // SAFETY: a stored batch's chain ends at its tail; it is ours.
            unsafe { (*b.tail).next = self.free };
            self.free = b.head;
            self.free_len += b.n;
        }
    }

    /// Takes whole batches (O(1) each) until at least `want` blocks are
    /// taken or none is left; a batch that would bring the total over `max`
    /// gives only the blocks still wanted (walking them). Returns the chain
    /// (null if empty), its tail and length.
    fn take_batches(&mut self, want: usize, max: usize) -> (*mut FreeBlock, *mut FreeBlock, usize) {
        let (mut head, mut tail, mut k) =
            (null_mut::<FreeBlock>(), null_mut::<FreeBlock>(), 0usize);
        while k < want && self.nbatches > 0 {
            let top = &mut self.batches[self.nbatches - 1];
            let (first, last, n) = if k + top.n <= max {
                self.nbatches -= 1;
                (top.head, top.tail, top.n)
            } else {
                let n = want - k;
                // SAFETY: a stored batch's chain, `top.n > n` nodes long.
                let last = unsafe { nth(top.head, n) };
                let first = top.head;
                // SAFETY: `last` is the `n`-th node of a chain of
                // `top.n > max - k ≥ n` nodes: it has a successor.
                unsafe {
                    top.head = (*last).next;
                    (*last).next = null_mut();
                }
                top.n -= n;
                (first, last, n)
            };
            if k == 0 {
                head = first;
            } else {
                // SAFETY: `tail` ends the chain taken so far, ours.
                unsafe { (*tail).next = first };
            }
            tail = last;
            k += n;
        }
        (head, tail, k)
    }
}

impl<X> core::ops::Deref for Locked<X> {
    type Target = X;
    fn deref(&self) -> &X {
        &self.x
    }
}

impl<X> core::ops::DerefMut for Locked<X> {
    fn deref_mut(&mut self) -> &mut X {
        &mut self.x
    }
}

/// A central list.
#[derive(Debug)]
pub struct CentralList<X> {
    incoming: TransferStack,
    incoming_len: AtomicUsize,
    lock: RawLock,
    state: UnsafeCell<Locked<X>>,
}

// SAFETY: `state` is only touched with `lock` held; `incoming` is Sync by
// itself; the raw pointers are addresses of free blocks owned by the list,
// not thread-bound data. `X` travels between threads under the lock.
unsafe impl<X: Send> Sync for CentralList<X> {}
// SAFETY: as above.
unsafe impl<X: Send> Send for CentralList<X> {}

/// The one body of both `CentralList::new`s.
macro_rules! empty_list {
    ($x:expr) => {
        CentralList {
            incoming: TransferStack::new(),
            incoming_len: AtomicUsize::new(0),
            lock: RawLock::new(),
            state: UnsafeCell::new(Locked {
                free: null_mut(),
                free_len: 0,
                batches: [NO_BATCH; BATCH_SLOTS],
                nbatches: 0,
                x: $x,
            }),
        }
    };
}

impl<X> CentralList<X> {
    /// An empty list around `x` (`const` except under loom, whose
    /// primitives have no const constructors).
    #[cfg(not(tensorpool_loom))]
    pub const fn new(x: X) -> Self {
        empty_list!(x)
    }
    /// An empty list around `x`.
    #[cfg(tensorpool_loom)]
    pub fn new(x: X) -> Self {
        empty_list!(x)
    }

    /// Runs `f` with the lock held and the guarded state.
    #[inline]
    pub fn locked<R>(&self, f: impl FnOnce(&mut Locked<X>) -> R) -> R {
        // SAFETY: the lock is held for the whole closure, so the `&mut` is unique.
        self.lock
            .with(|| self.state.with_mut(|p| f(unsafe { &mut *p })))
    }

    /// Moves every free block onto the locked loose free list: the whole
    /// batches and the incoming stack.
    pub fn gather(&self, st: &mut Locked<X>) {
        st.unbatch();
        self.drain_incoming(st);
    }

    /// Moves everything from the incoming stack onto the locked free list.
    pub fn drain_incoming(&self, st: &mut Locked<X>) {
        let mut head = self.incoming.take_all();
        if head.is_null() {
            return;
        }
        let mut n = 0usize;
        let first = head;
        let mut tail = head;
        while !head.is_null() {
            n += 1;
            tail = head;
            // SAFETY: a taken chain is ours; every node is a free block.
            head = unsafe { (*head).next };
        }
        // SAFETY: `tail` is the last node of our chain.
        unsafe { (*tail).next = st.free };
        st.free = first;
        st.free_len += n;
        self.incoming_len.fetch_sub(n, Ordering::Relaxed);
    }

    /// Hands a chain of `n` blocks back without waiting: with `whole`,
    /// kept whole in a batch slot if the lock is free; else (or if the lock
    /// is busy) pushed onto the incoming stack, lock-free, where
    /// [`incoming_len`](Self::incoming_len) counts it. `count` runs first
    /// (raising the byte counters) and its result is returned.
    ///
    /// # Safety
    /// - `head → … → tail` is a chain of `n ≥ 1` free blocks of this list's
    ///   class, owned by the caller.
    pub unsafe fn give_back<R>(
        &self,
        head: *mut FreeBlock,
        tail: *mut FreeBlock,
        n: usize,
        whole: bool,
        count: impl FnOnce() -> R,
    ) -> R {
        // Before the blocks are listed: a `take` that gets them runs its
        // `uncount` only after taking them, so counters never wrap.
        let r = count();
        if whole && self.lock.try_lock() {
            // SAFETY: 1. the lock is ours, so the `&mut` is unique; 2. the
            // chain is the caller's (contract); 3. we took the lock above.
            unsafe {
                self.state.with_mut(|p| (*p).put(head, tail, n));
                self.lock.unlock();
            }
        } else {
            self.incoming_len.fetch_add(n, Ordering::Relaxed);
            // SAFETY: forwarded from the caller.
            unsafe { self.incoming.push_chain(head, tail) };
        }
        r
    }

    /// Takes at least one and up to about `want ≥ 1` blocks (at most `max ≥
    /// want`): whole batches first (so possibly more than `want`, never
    /// more than `max`), then blocks cut off the loose free list, draining
    /// the incoming stack into it if it is short; then `more` may add blocks
    /// from elsewhere (`more(state, chain)` returns the longer chain, its
    /// `fresh` saying how many it added), all under the lock. After
    /// unlocking, `uncount(n)` lowers the counters if anything was taken.
    /// Returns the chain.
    pub fn take(
        &self,
        want: usize,
        max: usize,
        more: impl FnOnce(&mut Locked<X>, Chain) -> Chain,
        uncount: impl FnOnce(usize),
    ) -> Chain {
        debug_assert!(1 <= want && want <= max);
        let got = self.locked(|st| {
            let (mut head, mut tail, mut k) = st.take_batches(want, max);
            if k < want {
                let need = want - k;
                if st.free_len < need {
                    self.drain_incoming(st);
                }
                let cut = need.min(st.free_len);
                if cut > 0 {
                    let first = st.free;
                    // SAFETY: the free list has `free_len ≥ cut` nodes.
                    let last = unsafe { nth(first, cut) };
                    // SAFETY: `last` is the `cut`-th node of the free list;
                    // `tail` ends the chain taken so far (when `k > 0`).
                    unsafe {
                        st.free = (*last).next;
                        (*last).next = null_mut();
                        if k == 0 {
                            head = first;
                        } else {
                            (*tail).next = first;
                        }
                    }
                    tail = last;
                    st.free_len -= cut;
                    k += cut;
                }
            }
            let chain = Chain {
                head,
                tail,
                n: k,
                fresh: 0,
            };
            more(st, chain)
        });
        if got.n > 0 {
            uncount(got.n);
        }
        got
    }

    /// Whether `b` is on the free list, in a batch or on the incoming stack
    /// (takes the lock).
    pub fn holds(&self, b: *mut FreeBlock) -> bool {
        self.locked(|st| {
            self.gather(st);
            let mut cur = st.free;
            while !cur.is_null() {
                if cur == b {
                    return true;
                }
                // SAFETY: the free list's nodes are well-formed free blocks.
                cur = unsafe { (*cur).next };
            }
            false
        })
    }

    /// Blocks pushed and not yet drained (a racy hint).
    pub fn incoming_len(&self) -> usize {
        self.incoming_len.load(Ordering::Relaxed)
    }

    /// Takes the lock and keeps it (`pthread_atfork` prepare).
    pub fn lock_for_fork(&self) {
        self.lock.lock();
    }

    /// Releases the lock taken by [`lock_for_fork`](Self::lock_for_fork).
    ///
    /// # Safety
    /// - This thread (or, in a forked child, its parent thread) took the lock
    ///   with `lock_for_fork` and has not released it since.
    pub unsafe fn unlock_after_fork(&self) {
        // SAFETY: forwarded from the caller: the lock is held by us.
        unsafe { self.lock.unlock() };
    }
}
