//! The protocol of a size class's central list, apart from spans: frees come
//! in lock-free through a [`TransferStack`] (one CAS per batch), refills take
//! the class lock, drain the stack into the locked free list and cut a chain
//! off it. Byte counters are raised *before* blocks become visible and
//! lowered *after* they are taken (`give_back`'s and `take`'s callbacks), so
//! a counter can run ahead of the lists but never below them.
//!
//! Generic over the rest of the locked state (`X`: the span bookkeeping of
//! `central::Central`), so that loom can model exactly this code
//! (`tests/loom.rs`, `central_list_*`).
//!
//! Invariant, with the lock held and `incoming` drained: `free_len` is the
//! length of the chain at `free`; `incoming_len` is, between operations, the
//! number of blocks pushed and not yet drained.

use super::transfer::{FreeBlock, TransferStack};
use crate::sync::{AtomicUsize, Ordering, RawLock, UnsafeCell};
use core::ptr::null_mut;

/// The state guarded by the class lock.
#[derive(Debug)]
pub struct Locked<X> {
    /// Free blocks, linked through their first word.
    pub free: *mut FreeBlock,
    /// Length of `free`.
    pub free_len: usize,
    /// The rest of the guarded state.
    pub x: X,
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

    /// Hands a chain of `n` blocks back, lock-free. `count` runs first
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
        count: impl FnOnce() -> R,
    ) -> R {
        // Before the push: a `take` that gets these blocks runs its
        // `uncount` only after taking them, so counters never wrap.
        let r = count();
        self.incoming_len.fetch_add(n, Ordering::Relaxed);
        // SAFETY: forwarded from the caller.
        unsafe { self.incoming.push_chain(head, tail) };
        r
    }

    /// Takes up to `want ≥ 1` blocks: drains the incoming stack if the free
    /// list is short, cuts up to `want` blocks off it, then lets `more` add
    /// blocks from elsewhere (`more(state, head, n)` returns the new head,
    /// length and how many it added), all under the lock; after unlocking,
    /// `uncount(n)` lowers the counters if anything was taken. Returns the
    /// chain (null if empty), its length and what `more` added.
    pub fn take(
        &self,
        want: usize,
        more: impl FnOnce(&mut Locked<X>, *mut FreeBlock, usize) -> (*mut FreeBlock, usize, usize),
        uncount: impl FnOnce(usize),
    ) -> (*mut FreeBlock, usize, usize) {
        let (head, n, added) = self.locked(|st| {
            if st.free_len < want {
                self.drain_incoming(st);
            }
            let mut head: *mut FreeBlock = null_mut();
            let k = want.min(st.free_len);
            if k > 0 {
                head = st.free;
                let mut last = head;
                for _ in 1..k {
                    // SAFETY: the free list has `free_len ≥ k` well-formed nodes.
                    last = unsafe { (*last).next };
                }
                // SAFETY: `last` is the k-th node.
                unsafe {
                    st.free = (*last).next;
                    (*last).next = null_mut();
                }
                st.free_len -= k;
            }
            more(st, head, k)
        });
        if n > 0 {
            uncount(n);
        }
        (head, n, added)
    }

    /// Whether `b` is on the free list or the incoming stack (takes the lock).
    pub fn holds(&self, b: *mut FreeBlock) -> bool {
        self.locked(|st| {
            self.drain_incoming(st);
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
