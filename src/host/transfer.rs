//! The cross-thread free list: a lock-free stack of block chains.
//!
//! Threads hand whole chains of free blocks to a size class's central list
//! with one CAS (`push_chain`); the refilling thread takes everything at once
//! with one swap (`take_all`). There is no single-element pop, so there is no
//! ABA problem: a node is never read by a popper that might see it recycled.
//!
//! Invariant: every node reachable from `head` was pushed by exactly one
//! `push_chain` and has not been returned by a `take_all` since.
//! Loom-modelled in `tests/loom.rs`.

use crate::sync::{AtomicPtr, Ordering};

/// A free block's link word. Free blocks are at least 8 bytes and 8-aligned.
#[repr(C)]
#[derive(Debug)]
pub struct FreeBlock {
    /// The next free block, or null.
    pub next: *mut FreeBlock,
}

/// A chain of free blocks `head → … → tail`, `n` long (both null when
/// `n == 0`), whose first `fresh` blocks were carved from a span's
/// never-used tail.
#[derive(Debug, Clone, Copy)]
pub struct Chain {
    /// The first block.
    pub head: *mut FreeBlock,
    /// The last block (its link is null).
    pub tail: *mut FreeBlock,
    /// How many blocks.
    pub n: usize,
    /// How many of the first blocks are fresh.
    pub fresh: usize,
}

impl Chain {
    /// No block.
    pub const EMPTY: Chain = Chain {
        head: core::ptr::null_mut(),
        tail: core::ptr::null_mut(),
        n: 0,
        fresh: 0,
    };
}

/// The `n`-th node (`n ≥ 1`; the first is `node`) of a chain: walking it
/// reads `n - 1` link words.
///
/// # Safety
/// - `node` starts a well-formed chain of at least `n` nodes that the caller
///   may read.
#[inline]
pub unsafe fn nth(mut node: *mut FreeBlock, n: usize) -> *mut FreeBlock {
    debug_assert!(n >= 1);
    for _ in 1..n {
        // SAFETY: the caller's chain has at least `n` well-formed nodes.
        node = unsafe { (*node).next };
    }
    node
}

/// Asks the CPU to bring `b`'s first cache line in (a hint: null or any
/// address is fine, nothing is read). A thread cache prefetches the block
/// its next allocation of the class will pop: when another thread freed it
/// (wrote its link), the line moves over meanwhile instead of stalling that
/// pop (tcmalloc's free-list pop does the same).
#[inline(always)]
pub fn prefetch(b: *mut FreeBlock) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: a prefetch never faults and changes no architectural state.
    unsafe {
        core::arch::x86_64::_mm_prefetch::<{ core::arch::x86_64::_MM_HINT_T0 }>(b as *const i8)
    };
    #[cfg(not(target_arch = "x86_64"))]
    let _ = b;
}

/// A multi-producer stack of chains with a take-all consumer.
#[derive(Debug)]
pub struct TransferStack {
    head: AtomicPtr<FreeBlock>,
}

// SAFETY: the stack only moves raw block addresses between threads through an
// atomic pointer; nodes are published with Release and taken with Acquire, so
// the link words written by the pusher are visible to the taker.
unsafe impl Send for TransferStack {}
// SAFETY: as above; all shared mutation goes through the atomic `head`.
unsafe impl Sync for TransferStack {}

impl TransferStack {
    /// An empty stack.
    #[cfg(not(tensorpool_loom))]
    pub const fn new() -> Self {
        Self {
            head: AtomicPtr::new(core::ptr::null_mut()),
        }
    }
    /// An empty stack.
    #[cfg(tensorpool_loom)]
    pub fn new() -> Self {
        Self {
            head: AtomicPtr::new(core::ptr::null_mut()),
        }
    }

    /// Pushes the chain `head → … → tail` (linked through `next`).
    ///
    /// # Safety
    /// - `head` and `tail` are non-null, `tail` is reachable from `head`
    ///   through `next`, and the caller owns every node of the chain
    ///   exclusively (no other thread reads or writes them until they are
    ///   taken back with [`take_all`](Self::take_all)).
    #[inline]
    pub unsafe fn push_chain(&self, head: *mut FreeBlock, tail: *mut FreeBlock) {
        debug_assert!(!head.is_null() && !tail.is_null());
        let mut cur = self.head.load(Ordering::Relaxed);
        loop {
            // SAFETY: the caller owns `tail`; it is not yet visible to others.
            unsafe { (*tail).next = cur };
            match self
                .head
                .compare_exchange_weak(cur, head, Ordering::Release, Ordering::Relaxed)
            {
                Ok(_) => return,
                Err(actual) => cur = actual,
            }
        }
    }

    /// Takes every node; returns the first (null if empty). The caller owns
    /// the returned chain.
    #[inline]
    pub fn take_all(&self) -> *mut FreeBlock {
        if self.head.load(Ordering::Relaxed).is_null() {
            return core::ptr::null_mut();
        }
        self.head.swap(core::ptr::null_mut(), Ordering::Acquire)
    }

    /// Whether the stack looked empty (a racy hint).
    #[inline]
    pub fn is_empty(&self) -> bool {
        self.head.load(Ordering::Relaxed).is_null()
    }
}

#[cfg(not(tensorpool_loom))]
impl Default for TransferStack {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(all(test, not(tensorpool_loom)))]
mod tests {
    use super::*;

    #[test]
    fn chains_come_back_whole() {
        let mut nodes: Vec<FreeBlock> = (0..6)
            .map(|_| FreeBlock {
                next: core::ptr::null_mut(),
            })
            .collect();
        let p: Vec<*mut FreeBlock> = nodes.iter_mut().map(|n| n as *mut _).collect();
        let (p0, p1, p2, p3, p4, p5) = (p[0], p[1], p[2], p[3], p[4], p[5]);
        let s = TransferStack::new();
        assert!(s.take_all().is_null());
        // SAFETY: the nodes are ours; chains are linked before pushing.
        unsafe {
            (*p0).next = p1;
            (*p1).next = p2;
            s.push_chain(p0, p2);
            (*p3).next = p4;
            s.push_chain(p3, p4);
            s.push_chain(p5, p5);
        }
        let mut n = 0;
        let mut cur = s.take_all();
        while !cur.is_null() {
            n += 1;
            // SAFETY: taken chain is ours and well formed.
            cur = unsafe { (*cur).next };
        }
        assert_eq!(n, 6);
        assert!(s.is_empty());
    }
}
