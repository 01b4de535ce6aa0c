//! Span records: one 64-byte, cache-line-aligned record per mapping, kept
//! out of band so that blocks carry no headers and large blocks start on a
//! granule boundary.
//!
//! Records come from a process-wide arena of 1 MiB chunks mapped from the OS
//! (never from the global allocator) and are recycled through a free list;
//! chunks are never unmapped, so a stale pagemap read still lands in a record.

use crate::sync::{AtomicU16, AtomicU32, AtomicUsize, Ordering, RawLock};
use core::ptr::null_mut;

/// The `class` of a huge (> 64 MiB) span.
pub(crate) const HUGE_CLASS: u16 = u16::MAX;

/// One mapped span.
///
/// Invariants: `base % GRANULE == 0`, `len % GRANULE == 0`,
/// `nblocks * block ≤ len`; `owner` is the pool whose lists hold its blocks;
/// `prev`/`next` link the owner class's span list (guarded by that class's
/// lock, or the huge cache's), or the arena free list when the record is unused.
///
/// The fields a lock-free reader looks at (`PoolShared::block_info`, reached
/// from `owns`/`usable_size`/size-less free on any thread while another
/// thread's trim or growth rewrites the record) are atomics: `base`, `len`,
/// `block`, `owner`, `nblocks`, `class`. Relaxed is enough: a record is
/// published through the pagemap (Release store, Acquire load), and a
/// reader racing with a record's reuse gets an answer about *some* span,
/// which the owner and block-start checks reject or which is a correct
/// answer for a pointer that is not live anyway. `prev`, `next` and
/// `free_seen` are touched only under a lock.
#[repr(C, align(64))]
#[derive(Debug)]
pub(crate) struct SpanMeta {
    pub base: AtomicUsize,
    pub len: AtomicUsize,
    pub block: AtomicUsize,
    pub owner: AtomicUsize,
    pub next: *mut SpanMeta,
    pub prev: *mut SpanMeta,
    pub nblocks: AtomicU32,
    /// Scratch for trim: free blocks counted in this span.
    pub free_seen: u32,
    pub class: AtomicU16,
}

const _: () = assert!(core::mem::size_of::<SpanMeta>() == 64);
const _: () = assert!(core::mem::align_of::<SpanMeta>() == 64);

impl SpanMeta {
    /// Whether `p` is the start of one of this span's blocks. No division:
    /// a class span's `block` is its class size, tested with
    /// [`is_multiple_of_class`](super::size_class::is_multiple_of_class).
    #[inline]
    pub fn is_block_start(&self, p: usize) -> bool {
        let Some(off) = p.checked_sub(self.base()) else {
            return false;
        };
        let class = self.class();
        if class == HUGE_CLASS {
            return off == 0;
        }
        off < (self.nblocks() as usize).wrapping_mul(self.block())
            && super::size_class::is_multiple_of_class(off, class as usize)
    }

    /// Whether `p` lies inside the span's mapping (any byte of it).
    #[inline]
    pub fn contains(&self, p: usize) -> bool {
        p.wrapping_sub(self.base()) < self.len()
    }

    /// First byte of the mapping.
    #[inline(always)]
    pub fn base(&self) -> usize {
        self.base.load(Ordering::Relaxed)
    }
    /// Bytes mapped.
    #[inline(always)]
    pub fn len(&self) -> usize {
        self.len.load(Ordering::Relaxed)
    }
    /// Bytes per block.
    #[inline(always)]
    pub fn block(&self) -> usize {
        self.block.load(Ordering::Relaxed)
    }
    /// The owner pool's address.
    #[inline(always)]
    pub fn owner(&self) -> usize {
        self.owner.load(Ordering::Relaxed)
    }
    /// Blocks in the span.
    #[inline(always)]
    pub fn nblocks(&self) -> u32 {
        self.nblocks.load(Ordering::Relaxed)
    }
    /// Size class (`HUGE_CLASS` for a huge block).
    #[inline(always)]
    pub fn class(&self) -> u16 {
        self.class.load(Ordering::Relaxed)
    }

    /// Describes a freshly allocated (unpublished) record.
    pub fn init(
        &self,
        base: usize,
        len: usize,
        block: usize,
        nblocks: u32,
        class: u16,
        owner: usize,
    ) {
        self.base.store(base, Ordering::Relaxed);
        self.len.store(len, Ordering::Relaxed);
        self.block.store(block, Ordering::Relaxed);
        self.nblocks.store(nblocks, Ordering::Relaxed);
        self.class.store(class, Ordering::Relaxed);
        self.owner.store(owner, Ordering::Relaxed);
    }

    /// Sets the mapped length (a huge block that shrank or grew in place).
    pub fn set_len(&self, len: usize) {
        self.len.store(len, Ordering::Relaxed);
        self.block.store(len, Ordering::Relaxed);
    }
}

/// Puts `s` at the front of the span list at `*head`.
///
/// # Safety
/// - `s` is a live record on no list; the list's lock is held.
pub(crate) unsafe fn push_front(head: &mut *mut SpanMeta, s: *mut SpanMeta) {
    // SAFETY: per the contract; the list's records are ours under its lock.
    unsafe {
        (*s).prev = null_mut();
        (*s).next = *head;
        if !head.is_null() {
            (**head).prev = s;
        }
    }
    *head = s;
}

/// Takes `s` off the span list at `*head`.
///
/// # Safety
/// - `s` is on that list; the list's lock is held.
pub(crate) unsafe fn unlink(head: &mut *mut SpanMeta, s: *mut SpanMeta) {
    // SAFETY: per the contract.
    unsafe {
        let (prev, next) = ((*s).prev, (*s).next);
        if prev.is_null() {
            *head = next;
        } else {
            (*prev).next = next;
        }
        if !next.is_null() {
            (*next).prev = prev;
        }
    }
}

struct Arena {
    lock: RawLock,
    state: crate::sync::UnsafeCell<ArenaState>,
}

struct ArenaState {
    free: *mut SpanMeta,
    bump: usize,
    end: usize,
}

// SAFETY: `state` is only touched with `lock` held.
unsafe impl Sync for Arena {}

static ARENA: Arena = Arena {
    lock: RawLock::new(),
    state: crate::sync::UnsafeCell::new(ArenaState {
        free: null_mut(),
        bump: 0,
        end: 0,
    }),
};

const CHUNK: usize = 1 << 20;

/// A zeroed record, or null if the OS has no memory.
pub(crate) fn alloc_record() -> *mut SpanMeta {
    ARENA.lock.with(|| {
        ARENA.state.with_mut(|st| {
            // SAFETY: the arena lock is held, so we have the state exclusively.
            let st = unsafe { &mut *st };
            if !st.free.is_null() {
                let r = st.free;
                // SAFETY: records on the free list are valid, unused records.
                unsafe {
                    st.free = (*r).next;
                    // Field by field: a stale lock-free reader may be
                    // looking at the atomics right now.
                    SpanMeta::reset(r);
                }
                return r;
            }
            if st.bump == st.end {
                let Some(chunk) = crate::os::map_aligned(CHUNK, crate::os::PAGE, false) else {
                    return null_mut();
                };
                st.bump = chunk.as_ptr() as usize;
                st.end = st.bump + CHUNK;
            }
            let r = st.bump as *mut SpanMeta;
            st.bump += core::mem::size_of::<SpanMeta>();
            // SAFETY: `r` is 64-byte aligned (chunk is page aligned, records
            // are 64 B) and inside our chunk, unused until now.
            unsafe { r.write(SpanMeta::zeroed()) };
            r
        })
    })
}

/// Takes the record arena's lock and keeps it (`pthread_atfork` prepare).
pub(crate) fn lock_for_fork() {
    ARENA.lock.lock();
}

/// Releases the lock taken by [`lock_for_fork`].
///
/// # Safety
/// - This thread (or, in a forked child, its parent thread) took the lock
///   with `lock_for_fork` and has not released it since.
pub(crate) unsafe fn unlock_after_fork() {
    // SAFETY: forwarded from the caller: the lock is held by us.
    unsafe { ARENA.lock.unlock() };
}

/// Returns a record to the arena.
///
/// # Safety
/// - `r` came from [`alloc_record`], is not on any list and nothing else
///   will use it (its span is unregistered from the pagemap).
pub(crate) unsafe fn free_record(r: *mut SpanMeta) {
    ARENA.lock.with(|| {
        ARENA.state.with_mut(|st| {
            // SAFETY: lock held; `r` is ours per the caller.
            unsafe {
                (*r).next = (*st).free;
                (*r).nblocks.store(0, Ordering::Relaxed);
                (*r).owner.store(0, Ordering::Relaxed);
                (*st).free = r;
            }
        })
    })
}

impl SpanMeta {
    const fn zeroed() -> Self {
        SpanMeta {
            base: AtomicUsize::new(0),
            len: AtomicUsize::new(0),
            block: AtomicUsize::new(0),
            owner: AtomicUsize::new(0),
            next: null_mut(),
            prev: null_mut(),
            nblocks: AtomicU32::new(0),
            free_seen: 0,
            class: AtomicU16::new(0),
        }
    }

    /// Zeroes a recycled record.
    ///
    /// # Safety
    /// - `r` is an unused record of the arena and the arena lock is held: no
    ///   other thread writes it (lock-free readers only load its atomics).
    unsafe fn reset(r: *mut SpanMeta) {
        // SAFETY: per the contract; the plain fields are written through the
        // raw pointer, the atomics through shared references.
        unsafe {
            (*r).init(0, 0, 0, 0, 0, 0);
            (*r).next = null_mut();
            (*r).prev = null_mut();
            (*r).free_seen = 0;
        }
    }
}
