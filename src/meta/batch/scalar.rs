//! The scalar reference for the batch scans (see [`super`] for the
//! contract). Every other backend must give exactly these results.

use super::{CAT_MASK, CAT_SHIFT, LIVE, shr};
use crate::host::size_class::Category;
use crate::stats::CategoryUsage;
use crate::sync::{AtomicU32, AtomicU64, Ordering};

/// Calls `f(i, last[i])` for each `i` with `tag[i] & mask == want` and
/// `last[i] <= thr`, ascending; `f` returns the new threshold. Returns the
/// final threshold.
#[inline]
pub(crate) fn select_le<F: FnMut(usize, u64) -> u64>(
    tag: &[AtomicU32],
    last: &[AtomicU64],
    mask: u32,
    want: u32,
    mut thr: u64,
    mut f: F,
) -> u64 {
    for (i, (t, l)) in tag.iter().zip(last).enumerate() {
        // Acquire pairs with the Release store of the tag in `insert`: a
        // live tag is seen with its slot's fresh columns.
        if t.load(Ordering::Acquire) & mask == want {
            let l = l.load(Ordering::Relaxed);
            if l <= thr {
                thr = f(i, l);
            }
        }
    }
    thr
}

/// Adds live count and bytes per category into `acc`.
#[inline]
pub(crate) fn usage(
    tag: &[AtomicU32],
    size: &[AtomicU64],
    acc: &mut [CategoryUsage; Category::COUNT],
) {
    for (t, s) in tag.iter().zip(size) {
        let t = t.load(Ordering::Acquire);
        if t & LIVE == 0 {
            continue;
        }
        if let Some(a) = acc.get_mut(((t & CAT_MASK) >> CAT_SHIFT) as usize) {
            a.count += 1;
            a.bytes = a.bytes.wrapping_add(s.load(Ordering::Relaxed));
        }
    }
}

/// `count[i] >>= shift` for every element, losing no concurrent increment.
#[inline]
pub(crate) fn decay(count: &[AtomicU64], shift: u32) {
    for c in count {
        let v = c.load(Ordering::Relaxed);
        let d = v - shr(v, shift);
        if d != 0 {
            c.fetch_sub(d, Ordering::Relaxed);
        }
    }
}
