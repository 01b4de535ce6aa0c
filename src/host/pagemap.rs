//! The process-wide pagemap: address → span record, at [`GRANULE`] (64 KiB)
//! granularity, so a pointer alone names its owner pool and size class.
//!
//! Two levels: `L1[addr >> 32]` → a lazily mapped leaf of 2^16 entries for
//! that 4 GiB, each entry the span covering one granule. Leaves are mapped
//! `MAP_NORESERVE`, so only the pages of entries actually written become
//! resident (one 4 KiB page of entries covers 32 MiB of spans). Leaves are
//! never unmapped, so a racing lookup never reads freed memory.
//!
//! Invariant: an entry is non-null exactly while its granule lies inside a
//! mapped span registered by [`register`], and points to that span's record.

use super::size_class::GRANULE;
use super::span::SpanMeta;
use crate::sync::{AtomicPtr, Ordering};
use core::ptr::null_mut;

const ADDR_BITS: u32 = 47;
const L1_SHIFT: u32 = 32;
const L1_LEN: usize = 1 << (ADDR_BITS - L1_SHIFT);
const GRANULE_SHIFT: u32 = GRANULE.trailing_zeros();
const L2_LEN: usize = 1 << (L1_SHIFT - GRANULE_SHIFT);

type Leaf = [AtomicPtr<SpanMeta>; L2_LEN];

static L1: [AtomicPtr<Leaf>; L1_LEN] = [const { AtomicPtr::new(null_mut()) }; L1_LEN];

#[inline(always)]
fn split(addr: usize) -> Option<(usize, usize)> {
    let i1 = addr >> L1_SHIFT;
    if i1 >= L1_LEN {
        return None;
    }
    Some((i1, (addr >> GRANULE_SHIFT) & (L2_LEN - 1)))
}

/// The span record covering `addr`, or null if no pool owns it.
#[inline]
pub(crate) fn lookup(addr: usize) -> *mut SpanMeta {
    let Some((i1, i2)) = split(addr) else {
        return null_mut();
    };
    let leaf = L1[i1].load(Ordering::Acquire);
    if leaf.is_null() {
        return null_mut();
    }
    // SAFETY: non-null leaves are live `Leaf` mappings that are never unmapped.
    unsafe { (*leaf)[i2].load(Ordering::Acquire) }
}

fn leaf_for(i1: usize) -> Option<&'static Leaf> {
    let mut leaf = L1[i1].load(Ordering::Acquire);
    if leaf.is_null() {
        let bytes = core::mem::size_of::<Leaf>();
        let fresh = crate::os::map_aligned(bytes, crate::os::PAGE, false)?
            .as_ptr()
            .cast::<Leaf>();
        // Zeroed anonymous memory is a valid array of null AtomicPtrs.
        match L1[i1].compare_exchange(null_mut(), fresh, Ordering::AcqRel, Ordering::Acquire) {
            Ok(_) => leaf = fresh,
            Err(winner) => {
                // SAFETY: `fresh` was mapped above and never published.
                unsafe { crate::os::unmap(core::ptr::NonNull::new_unchecked(fresh.cast()), bytes) };
                leaf = winner;
            }
        }
    }
    // SAFETY: leaves are never unmapped once published.
    Some(unsafe { &*leaf })
}

/// Points every granule of `[base, base+len)` at `span`. `false` if a leaf
/// could not be mapped or the range is above the 47-bit address space (the
/// caller then gives the span back).
pub(crate) fn register(base: usize, len: usize, span: *mut SpanMeta) -> bool {
    debug_assert!(base.is_multiple_of(GRANULE) && len.is_multiple_of(GRANULE) && len > 0);
    let mut a = base;
    while a < base + len {
        let Some((i1, i2)) = split(a) else {
            unregister(base, a - base);
            return false;
        };
        let Some(leaf) = leaf_for(i1) else {
            unregister(base, a - base);
            return false;
        };
        leaf[i2].store(span, Ordering::Release);
        a += GRANULE;
    }
    true
}

/// Clears every granule of `[base, base+len)`.
pub(crate) fn unregister(base: usize, len: usize) {
    let mut a = base;
    while a < base + len {
        if let Some((i1, i2)) = split(a) {
            let leaf = L1[i1].load(Ordering::Acquire);
            if !leaf.is_null() {
                // SAFETY: non-null leaves are live and never unmapped.
                unsafe { (*leaf)[i2].store(null_mut(), Ordering::Release) };
            }
        }
        a += GRANULE;
    }
}

/// Clears the granules of `[base, base+len)` that still point at `span`,
/// leaving any entry another span has taken since: for a range that may
/// have changed hands behind our back (a failed `mremap` onto it).
pub(crate) fn unregister_if(base: usize, len: usize, span: *mut SpanMeta) {
    let mut a = base;
    while a < base + len {
        if let Some((i1, i2)) = split(a) {
            let leaf = L1[i1].load(Ordering::Acquire);
            if !leaf.is_null() {
                // SAFETY: non-null leaves are live and never unmapped.
                let _ = unsafe {
                    (*leaf)[i2].compare_exchange(
                        span,
                        null_mut(),
                        Ordering::AcqRel,
                        Ordering::Relaxed,
                    )
                };
            }
        }
        a += GRANULE;
    }
}
