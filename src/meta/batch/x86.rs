//! AVX2 versions of the batch scans (see [`super`] for the contract; the
//! results equal [`super::scalar`]'s exactly, which `tests/meta_props.rs`
//! checks on random tables).
//!
//! **Loads of atomic columns.** The columns are `AtomicU32`/`AtomicU64`
//! arrays that other threads update (touch, insert, remove) while a scan
//! runs. Rust has no atomic vector load, so these functions read them with
//! `vmovdqu`. On x86-64 every naturally aligned 4- and 8-byte element of a
//! vector load is read single-copy atomically (Intel SDM vol. 3A §9.1.1;
//! AMD APM vol. 2 §7.3.2), and x86 does not reorder loads with loads, so
//! each lane observes a value some relaxed atomic load could have returned
//! -- the same argument crossbeam's `AtomicCell` makes for its seqlock
//! reads. Formally the Rust memory model calls a non-atomic read racing an
//! atomic write a data race; the scans never *write* through vector stores
//! (decay's writes are atomic `fetch_sub`s), and miri runs the scalar path.

use super::{CAT_MASK, CAT_SHIFT, LIVE, scalar};
use crate::host::size_class::Category;
use crate::stats::CategoryUsage;
use crate::sync::{AtomicU32, AtomicU64, Ordering};
use core::arch::x86_64::*;

/// Lanes handled per loop iteration.
const STEP: usize = 8;

/// The top bits of eight 64-bit lanes (`lo` holds lanes 0..4), as a bit mask.
#[inline]
#[target_feature(enable = "avx2")]
fn mask8(lo: __m256i, hi: __m256i) -> u32 {
    (_mm256_movemask_pd(_mm256_castsi256_pd(lo)) | _mm256_movemask_pd(_mm256_castsi256_pd(hi)) << 4)
        as u32
}

/// The eight 64-bit lanes of `lo` and `hi`, in order.
#[inline]
#[target_feature(enable = "avx2")]
fn lanes8(lo: __m256i, hi: __m256i) -> [u64; STEP] {
    let mut v = [0u64; STEP];
    // SAFETY: 1. `v` is 64 writable bytes; `storeu` needs no alignment.
    unsafe {
        _mm256_storeu_si256(v.as_mut_ptr().cast(), lo);
        _mm256_storeu_si256(v.as_mut_ptr().add(4).cast(), hi);
    }
    v
}

/// Calls `g(j)` for each set bit `j` of `bits`, lowest first.
#[inline]
fn for_each_bit(mut bits: u32, mut g: impl FnMut(usize)) {
    while bits != 0 {
        g(bits.trailing_zeros() as usize);
        bits &= bits - 1;
    }
}

/// AVX2 `select_le`; see [`super::scalar::select_le`].
///
/// # Safety
/// - The CPU supports AVX2.
#[target_feature(enable = "avx2")]
pub(crate) unsafe fn select_le<F: FnMut(usize, u64) -> u64>(
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
    let sign = _mm256_set1_epi64x(i64::MIN);
    let vmask = _mm256_set1_epi32(mask as i32);
    let vwant = _mm256_set1_epi32(want as i32);
    let mut i = 0;
    while i + STEP <= n {
        // SAFETY: 1. `i + 8 <= n` and `n` bounds both slices, so the 32 bytes
        // of tags and the 2 × 32 bytes of `last` read are inside them;
        // 2. `loadu` has no alignment requirement; 3. `AtomicU32`/`AtomicU64`
        // have the size and layout of `u32`/`u64`; 4. racing relaxed writes
        // are argued in the module docs.
        let (t, l0, l1) = unsafe {
            (
                _mm256_loadu_si256(tp.add(i).cast()),
                _mm256_loadu_si256(lp.add(i).cast()),
                _mm256_loadu_si256(lp.add(i + 4).cast()),
            )
        };
        let tok = _mm256_cmpeq_epi32(_mm256_and_si256(t, vmask), vwant);
        // Unsigned `l > thr` as a signed compare of both sides with the top bit flipped.
        let vthr = _mm256_set1_epi64x((thr ^ (1 << 63)) as i64);
        let gt0 = _mm256_cmpgt_epi64(_mm256_xor_si256(l0, sign), vthr);
        let gt1 = _mm256_cmpgt_epi64(_mm256_xor_si256(l1, sign), vthr);
        let ok0 = _mm256_andnot_si256(gt0, _mm256_cvtepi32_epi64(_mm256_castsi256_si128(tok)));
        let ok1 = _mm256_andnot_si256(
            gt1,
            _mm256_cvtepi32_epi64(_mm256_extracti128_si256::<1>(tok)),
        );
        let bits = mask8(ok0, ok1);
        if bits != 0 {
            let v = lanes8(l0, l1);
            for_each_bit(bits, |j| {
                // `f` may have lowered the threshold for the later lanes.
                if v[j] <= thr {
                    thr = f(i + j, v[j]);
                }
            });
        }
        i += STEP;
    }
    scalar::select_le(&tag[i..n], &last[i..n], mask, want, thr, |j, l| f(i + j, l))
}

/// AVX2 `usage`; see [`super::scalar::usage`].
///
/// # Safety
/// - The CPU supports AVX2.
#[target_feature(enable = "avx2")]
pub(crate) unsafe fn usage(
    tag: &[AtomicU32],
    size: &[AtomicU64],
    acc: &mut [CategoryUsage; Category::COUNT],
) {
    let n = tag.len().min(size.len());
    let tp = tag.as_ptr().cast::<u32>();
    let sp = size.as_ptr().cast::<u64>();
    let key = _mm256_set1_epi32((LIVE | CAT_MASK) as i32);
    let want: [__m256i; Category::COUNT] =
        core::array::from_fn(|c| _mm256_set1_epi32((LIVE | (c as u32) << CAT_SHIFT) as i32));
    let mut bytes = [_mm256_setzero_si256(); Category::COUNT];
    // Counts in 32-bit lanes: at most n / 8 per lane per call, far below 2^32
    // for the table's 4096-slot chunks (and flushed per call anyway).
    let mut cnt = [_mm256_setzero_si256(); Category::COUNT];
    let mut i = 0;
    while i + STEP <= n {
        // SAFETY: 1. `i + 8 <= n` bounds both reads (32 B of tags, 64 B of
        // sizes) inside the slices; 2. unaligned loads; 3. atomics have
        // their integer's layout; 4. races as in the module docs.
        let (t, s0, s1) = unsafe {
            (
                _mm256_loadu_si256(tp.add(i).cast()),
                _mm256_loadu_si256(sp.add(i).cast()),
                _mm256_loadu_si256(sp.add(i + 4).cast()),
            )
        };
        let t = _mm256_and_si256(t, key);
        for c in 0..Category::COUNT {
            let m = _mm256_cmpeq_epi32(t, want[c]);
            let m0 = _mm256_cvtepi32_epi64(_mm256_castsi256_si128(m));
            let m1 = _mm256_cvtepi32_epi64(_mm256_extracti128_si256::<1>(m));
            let b = _mm256_add_epi64(_mm256_and_si256(s0, m0), _mm256_and_si256(s1, m1));
            bytes[c] = _mm256_add_epi64(bytes[c], b);
            cnt[c] = _mm256_sub_epi32(cnt[c], m);
        }
        i += STEP;
    }
    for c in 0..Category::COUNT {
        let (mut b, mut k) = ([0u64; 4], [0u32; 8]);
        // SAFETY: 1. `b` and `k` are 32 writable bytes each; `storeu` needs
        // no alignment.
        unsafe {
            _mm256_storeu_si256(b.as_mut_ptr().cast(), bytes[c]);
            _mm256_storeu_si256(k.as_mut_ptr().cast(), cnt[c]);
        }
        acc[c].bytes = b.iter().fold(acc[c].bytes, |a, &x| a.wrapping_add(x));
        acc[c].count += k.iter().map(|&x| u64::from(x)).sum::<u64>();
    }
    scalar::usage(&tag[i..n], &size[i..n], acc);
}

/// AVX2 `decay`; see [`super::scalar::decay`].
///
/// # Safety
/// - The CPU supports AVX2.
#[target_feature(enable = "avx2")]
pub(crate) unsafe fn decay(count: &[AtomicU64], shift: u32) {
    let n = count.len();
    let p = count.as_ptr().cast::<u64>();
    // `srl` by 64 or more gives 0, as `super::shr` does.
    let sh = _mm_cvtsi64_si128(i64::from(shift.min(64)));
    let zero = _mm256_setzero_si256();
    let mut i = 0;
    while i + STEP <= n {
        // SAFETY: 1. `i + 8 <= n`: the 64 bytes read are inside `count`;
        // 2. unaligned loads; 3. `AtomicU64` has `u64`'s layout; 4. races as
        // in the module docs (the writes below are atomic).
        let (v0, v1) = unsafe {
            (
                _mm256_loadu_si256(p.add(i).cast()),
                _mm256_loadu_si256(p.add(i + 4).cast()),
            )
        };
        let d0 = _mm256_sub_epi64(v0, _mm256_srl_epi64(v0, sh));
        let d1 = _mm256_sub_epi64(v1, _mm256_srl_epi64(v1, sh));
        let bits = !mask8(_mm256_cmpeq_epi64(d0, zero), _mm256_cmpeq_epi64(d1, zero)) & 0xFF;
        if bits != 0 {
            let d = lanes8(d0, d1);
            for_each_bit(bits, |j| {
                count[i + j].fetch_sub(d[j], Ordering::Relaxed);
            });
        }
        i += STEP;
    }
    scalar::decay(&count[i..], shift);
}
