//! Span records: one 64-byte, cache-line-aligned record per mapping, kept
//! out of band so that blocks carry no headers and large blocks start on a
//! granule boundary.
//!
//! Records come from a process-wide arena of 1 MiB chunks mapped from the OS
//! (never from the global allocator) and are recycled through a free list;
//! chunks are never unmapped, so a stale pagemap read still lands in a record.

use crate::sync::RawLock;
use core::ptr::null_mut;

/// The `class` of a huge (> 64 MiB) span.
pub(crate) const HUGE_CLASS: u16 = u16::MAX;

/// One mapped span.
///
/// Invariants: `base % GRANULE == 0`, `len % GRANULE == 0`,
/// `nblocks * block ≤ len`; `owner` is the pool whose lists hold its blocks;
/// `prev`/`next` link the owner class's span list (guarded by that class's
/// lock), or the arena free list when the record is unused.
#[repr(C, align(64))]
#[derive(Debug)]
pub(crate) struct SpanMeta {
    pub base: usize,
    pub len: usize,
    pub block: usize,
    pub owner: usize,
    pub next: *mut SpanMeta,
    pub prev: *mut SpanMeta,
    pub nblocks: u32,
    /// Scratch for trim: free blocks counted in this span.
    pub free_seen: u32,
    pub class: u16,
}

const _: () = assert!(core::mem::size_of::<SpanMeta>() == 64);
const _: () = assert!(core::mem::align_of::<SpanMeta>() == 64);

impl SpanMeta {
    /// Whether `p` is the start of one of this span's blocks. No division:
    /// a class span's `block` is its class size, tested with
    /// [`is_multiple_of_class`](super::size_class::is_multiple_of_class).
    #[inline]
    pub fn is_block_start(&self, p: usize) -> bool {
        let Some(off) = p.checked_sub(self.base) else {
            return false;
        };
        if self.class == HUGE_CLASS {
            return off == 0;
        }
        off < (self.nblocks as usize).wrapping_mul(self.block)
            && super::size_class::is_multiple_of_class(off, self.class as usize)
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
                    r.write(SpanMeta::zeroed());
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
                (*r).nblocks = 0;
                (*st).free = r;
            }
        })
    })
}

impl SpanMeta {
    const fn zeroed() -> Self {
        SpanMeta {
            base: 0,
            len: 0,
            block: 0,
            owner: 0,
            next: null_mut(),
            prev: null_mut(),
            nblocks: 0,
            free_seen: 0,
            class: 0,
        }
    }
}
