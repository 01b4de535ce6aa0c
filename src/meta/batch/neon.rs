//! NEON versions of the batch scans (aarch64, where NEON is baseline; see
//! [`super`] for the contract). Results equal [`super::scalar`]'s exactly;
//! `ci/aarch64.sh` runs `tests/meta_props.rs` under qemu-user to check it.
//!
//! **Loads of atomic columns**: as in the x86 module, the columns are read
//! with vector loads (`ld1`) while other threads update them with atomics.
//! Each naturally aligned 4- or 8-byte lane of an `ld1` is single-copy
//! atomic on Armv8 (Arm ARM B2.2.1), so every lane sees a value a relaxed
//! load could have returned; aarch64 may reorder these loads with each
//! other, which at worst pairs a live tag with the previous tenant's column
//! value during a concurrent insert -- the same answer a scan racing that
//! insert could give anyway. Nothing is written through vector stores.

use super::{CAT_MASK, CAT_SHIFT, LIVE, scalar};
use crate::host::size_class::Category;
use crate::stats::CategoryUsage;
use crate::sync::{AtomicU32, AtomicU64, Ordering};
use core::arch::aarch64::*;

/// Lanes handled per loop iteration.
const STEP: usize = 4;

/// NEON `select_le`; see [`super::scalar::select_le`].
#[target_feature(enable = "neon")]
pub(crate) fn select_le<F: FnMut(usize, u64) -> u64>(
    tag: &[AtomicU32],
    last: &[AtomicU64],
    mask: u32,
    want: u32,
    mut thr: u64,
    mut f: F,
) -> u64 {
    let n = tag.len().min(last.len());
    let tp = tag.as_ptr().cast::<u32>();
    let lp = last.as_ptr().cast::<u64>();
    let vmask = vdupq_n_u32(mask);
    let vwant = vdupq_n_u32(want);
    let mut i = 0;
    while i + STEP <= n {
        // SAFETY: 1. `i + 4 <= n`: the 16 bytes of tags and 32 bytes of
        // `last` read are inside the slices; 2. `ld1` needs only element
        // alignment, which the atomics have; 3. atomics have their integer's
        // layout; 4. racing writes as in the module docs.
        let (t, l0, l1) = unsafe {
            (
                vld1q_u32(tp.add(i)),
                vld1q_u64(lp.add(i)),
                vld1q_u64(lp.add(i + 2)),
            )
        };
        // All-ones lanes where the tag matches, sign-extended to 64 bits.
        let tok = vreinterpretq_s32_u32(vceqq_u32(vandq_u32(t, vmask), vwant));
        let tok0 = vreinterpretq_u64_s64(vmovl_s32(vget_low_s32(tok)));
        let tok1 = vreinterpretq_u64_s64(vmovl_high_s32(tok));
        let vthr = vdupq_n_u64(thr);
        let ok0 = vandq_u64(vcleq_u64(l0, vthr), tok0);
        let ok1 = vandq_u64(vcleq_u64(l1, vthr), tok1);
        if vmaxvq_u32(vreinterpretq_u32_u64(vorrq_u64(ok0, ok1))) != 0 {
            let ok = [
                vgetq_lane_u64::<0>(ok0),
                vgetq_lane_u64::<1>(ok0),
                vgetq_lane_u64::<0>(ok1),
                vgetq_lane_u64::<1>(ok1),
            ];
            let v = [
                vgetq_lane_u64::<0>(l0),
                vgetq_lane_u64::<1>(l0),
                vgetq_lane_u64::<0>(l1),
                vgetq_lane_u64::<1>(l1),
            ];
            for j in 0..STEP {
                // `f` may have lowered the threshold for the later lanes.
                if ok[j] != 0 && v[j] <= thr {
                    thr = f(i + j, v[j]);
                }
            }
        }
        i += STEP;
    }
    scalar::select_le(&tag[i..n], &last[i..n], mask, want, thr, |j, l| f(i + j, l))
}

/// NEON `usage`; see [`super::scalar::usage`].
#[target_feature(enable = "neon")]
pub(crate) fn usage(
    tag: &[AtomicU32],
    size: &[AtomicU64],
    acc: &mut [CategoryUsage; Category::COUNT],
) {
    let n = tag.len().min(size.len());
    let tp = tag.as_ptr().cast::<u32>();
    let sp = size.as_ptr().cast::<u64>();
    let key = vdupq_n_u32(LIVE | CAT_MASK);
    let want: [uint32x4_t; Category::COUNT] =
        core::array::from_fn(|c| vdupq_n_u32(LIVE | (c as u32) << CAT_SHIFT));
    let mut bytes = [vdupq_n_u64(0); Category::COUNT];
    // 32-bit counts: at most n / 4 per lane per call, flushed at the end.
    let mut cnt = [vdupq_n_u32(0); Category::COUNT];
    let mut i = 0;
    while i + STEP <= n {
        // SAFETY: 1. `i + 4 <= n` bounds the 16 B of tags and 32 B of sizes
        // inside the slices; 2. element alignment holds; 3. atomics have
        // their integer's layout; 4. races as in the module docs.
        let (t, s0, s1) = unsafe {
            (
                vld1q_u32(tp.add(i)),
                vld1q_u64(sp.add(i)),
                vld1q_u64(sp.add(i + 2)),
            )
        };
        let t = vandq_u32(t, key);
        for c in 0..Category::COUNT {
            let m = vceqq_u32(t, want[c]);
            let ms = vreinterpretq_s32_u32(m);
            let m0 = vreinterpretq_u64_s64(vmovl_s32(vget_low_s32(ms)));
            let m1 = vreinterpretq_u64_s64(vmovl_high_s32(ms));
            bytes[c] = vaddq_u64(bytes[c], vaddq_u64(vandq_u64(s0, m0), vandq_u64(s1, m1)));
            cnt[c] = vsubq_u32(cnt[c], m);
        }
        i += STEP;
    }
    for c in 0..Category::COUNT {
        acc[c].bytes = acc[c].bytes.wrapping_add(vaddvq_u64(bytes[c]));
        acc[c].count += u64::from(vaddvq_u32(cnt[c]));
    }
    scalar::usage(&tag[i..n], &size[i..n], acc);
}

/// NEON `decay`; see [`super::scalar::decay`].
#[target_feature(enable = "neon")]
pub(crate) fn decay(count: &[AtomicU64], shift: u32) {
    let n = count.len();
    let p = count.as_ptr().cast::<u64>();
    // `ushl` by -64 (a right shift of 64) gives 0, as `super::shr` does.
    let sh = vdupq_n_s64(-i64::from(shift.min(64)));
    let mut i = 0;
    while i + STEP <= n {
        // SAFETY: 1. `i + 4 <= n`: the 32 bytes read are inside `count`;
        // 2. element alignment holds; 3. `AtomicU64` has `u64`'s layout;
        // 4. races as in the module docs (the writes below are atomic).
        let (v0, v1) = unsafe { (vld1q_u64(p.add(i)), vld1q_u64(p.add(i + 2))) };
        let d0 = vsubq_u64(v0, vshlq_u64(v0, sh));
        let d1 = vsubq_u64(v1, vshlq_u64(v1, sh));
        if vmaxvq_u32(vreinterpretq_u32_u64(vorrq_u64(d0, d1))) != 0 {
            let d = [
                vgetq_lane_u64::<0>(d0),
                vgetq_lane_u64::<1>(d0),
                vgetq_lane_u64::<0>(d1),
                vgetq_lane_u64::<1>(d1),
            ];
            for (j, &dj) in d.iter().enumerate() {
                if dj != 0 {
                    count[i + j].fetch_sub(dj, Ordering::Relaxed);
                }
            }
        }
        i += STEP;
    }
    scalar::decay(&count[i..], shift);
}
