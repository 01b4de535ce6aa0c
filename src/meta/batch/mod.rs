//! Batch scans over the metadata table's columns, in three implementations
//! behind one interface (hashbrown's `control/group` layout):
//!
//! - `scalar`: the reference. Plain per-element relaxed atomic loads; runs
//!   everywhere and is the only one under `cfg(miri)`.
//! - `x86`: AVX2 (x86-64), called only after `is_x86_feature_detected!("avx2")`.
//! - `neon`: NEON (aarch64, where NEON is baseline).
//!
//! Each module exports the same three functions over column slices:
//!
//! - `select_le(tag, last, mask, want, thr, f)`: calls `f(i, last[i])` for
//!   every `i` (ascending) with `tag[i] & mask == want` and `last[i] <= thr`;
//!   `f` returns the threshold for the rest of the scan (it may only lower
//!   it for the results to stay exact). Serves `lru` and `touched_before`.
//! - `usage(tag, size, acc)`: live count and bytes per size category.
//! - `decay(count, shift)`: `count[i] >>= shift`, exactly, while other threads
//!   keep adding: each element is read, and the difference `v - (v >> shift)`
//!   is taken away with one atomic `fetch_sub` (only where it is non-zero).
//!   An increment that lands between the read and the subtraction survives,
//!   so the decay of that element linearizes at its read and no touch is
//!   lost. (Two decays at once would not compose; the table serializes them.)
//!
//! The per-device aggregate has no SIMD version: device codes are sparse
//! 16-bit values, so it is one shared scalar loop (`usage_by_device`).
//! Touch has no SIMD version either: its cost is the atomics (one per
//! distinct slot), see [`crate::meta::table`].
//!
//! [`MetaTable`](crate::meta::MetaTable) picks a [`BatchBackend`] once
//! ([`BatchBackend::detected`]); `TENSORPOOL_SIMD=scalar` in the environment
//! (read once, at the first detection) or
//! [`MetaTable::set_backend`](crate::meta::MetaTable::set_backend) forces
//! the scalar path.
//!
//! **Measured** (`cargo bench --bench meta_simd`, 2-core AMD EPYC with other
//! jobs running; medians, GB/s of the bytes each op must read; the floor
//! is a plain sequential read of as many bytes):
//!
//! | op (slots)              | scalar | AVX2   | AVX2 ÷ scalar | floor  |
//! |-------------------------|-------:|-------:|--------------:|-------:|
//! | touched_before (1 Ki)   |  22.5  |  61.9  | 2.8×          | 126.2  |
//! | touched_before (16 Ki)  |  22.3  |  94.4  | 4.2×          | 122.3  |
//! | touched_before (1 Mi)   |  17.0  |  45.1  | 2.7×          |  89.9  |
//! | lru(16) (1 Ki)          |  10.0  |   7.9  | 0.8×          | 126.2  |
//! | lru(16) (256 Ki)        |  30.2  |  69.1  | 2.3×          | 100.2  |
//! | lru(16) (1 Mi)          |  28.0  |  64.7  | 2.3×          |  89.9  |
//! | usage (16 Ki)           |  13.1  |  29.0  | 2.2×          | 122.3  |
//! | usage (1 Mi)            |  12.5  |  27.3  | 2.2×          |  89.9  |
//! | decay, none change (16 Ki) | 31.1 | 118.5 | 3.8×         | 126.8  |
//! | decay, none change (1 Mi)  | 29.9 |  79.3 | 2.7×         |  92.7  |
//! | decay, all change (1 Mi)   | 1.63 |  1.59 | 1.0×         |  92.7  |
//!
//! What the figures say: `lru` on a small table is bound by its heap
//! (about 80 candidate insertions for k = 16), not by the scan, and the
//! two backends are equal within the noise there (0.8–1.1× across runs);
//! `usage` is bound by its five masked accumulations per lane (3–6× off
//! the floor on either backend); a decay that changes every count is bound
//! by one atomic `fetch_sub` per element (≈5 ns, the same as a naive
//! `fetch_update` loop), so SIMD cannot help it. AVX2 is never reliably
//! slower, so it stays the default where the CPU has it.
//!
//! **Tag column** (one `u32` per slot): bit 0 live, bit 1 pinned, bits 2..5
//! the size [`Category`], bits 8..16 the `TensorFlags`, bits 16..32 the
//! device code.

use crate::host::size_class::Category;
use crate::stats::CategoryUsage;
use crate::sync::{AtomicU32, AtomicU64, Ordering};
use std::sync::OnceLock;

#[cfg(all(target_arch = "aarch64", target_feature = "neon", not(miri)))]
pub(crate) mod neon;
pub(crate) mod scalar;
#[cfg(all(target_arch = "x86_64", not(miri)))]
pub(crate) mod x86;

/// Tag bit: the slot holds a live tensor.
pub(crate) const LIVE: u32 = 1;
/// Tag bit: the tensor is pinned (never an eviction candidate).
pub(crate) const PINNED: u32 = 2;
/// Tag bits 2..5: the size category.
pub(crate) const CAT_SHIFT: u32 = 2;
/// Mask of the category bits.
pub(crate) const CAT_MASK: u32 = 7 << CAT_SHIFT;
const FLAGS_SHIFT: u32 = 8;
const DEVICE_SHIFT: u32 = 16;

/// The tag of a live tensor.
#[inline]
pub(crate) fn live_tag(flags: u8, cat: Category, device_code: u16) -> u32 {
    let pinned = if flags & crate::allocator::TensorFlags::PINNED != 0 {
        PINNED
    } else {
        0
    };
    LIVE | pinned
        | (cat.index() as u32) << CAT_SHIFT
        | u32::from(flags) << FLAGS_SHIFT
        | u32::from(device_code) << DEVICE_SHIFT
}

/// The size-category index (as [`Category::index`]) in a live tag.
#[inline]
pub(crate) fn tag_category(tag: u32) -> usize {
    ((tag & CAT_MASK) >> CAT_SHIFT) as usize
}

/// The device code in a live tag.
#[inline]
pub(crate) fn tag_device(tag: u32) -> u16 {
    (tag >> DEVICE_SHIFT) as u16
}

/// Which implementation of the batch scans a table runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum BatchBackend {
    /// Portable scalar code: the reference.
    Scalar,
    /// AVX2 (x86-64 only, when the CPU has it).
    Avx2,
    /// NEON (aarch64 only).
    Neon,
}

/// A backend this CPU or build cannot run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("batch backend {0:?} is not supported on this CPU or build")]
pub struct UnsupportedBackend(pub BatchBackend);

impl BatchBackend {
    /// Every backend, scalar first.
    pub const ALL: [BatchBackend; 3] =
        [BatchBackend::Scalar, BatchBackend::Avx2, BatchBackend::Neon];

    /// The fastest backend this CPU supports, decided once per process:
    /// NEON on aarch64, AVX2 on x86-64 CPUs that have it, scalar otherwise,
    /// under miri, or when `TENSORPOOL_SIMD=scalar` is set at the first call.
    pub fn detected() -> BatchBackend {
        static PICK: OnceLock<BatchBackend> = OnceLock::new();
        *PICK.get_or_init(|| {
            if std::env::var_os("TENSORPOOL_SIMD").is_some_and(|v| v == "scalar") {
                return BatchBackend::Scalar;
            }
            [BatchBackend::Avx2, BatchBackend::Neon]
                .into_iter()
                .find(|b| b.is_supported())
                .unwrap_or(BatchBackend::Scalar)
        })
    }

    /// Whether this backend can run here.
    pub fn is_supported(self) -> bool {
        match self {
            BatchBackend::Scalar => true,
            BatchBackend::Avx2 => avx2(),
            BatchBackend::Neon => cfg!(all(
                target_arch = "aarch64",
                target_feature = "neon",
                not(miri)
            )),
        }
    }

    /// Lower-case name, for tables and logs.
    pub fn name(self) -> &'static str {
        match self {
            BatchBackend::Scalar => "scalar",
            BatchBackend::Avx2 => "avx2",
            BatchBackend::Neon => "neon",
        }
    }

    pub(crate) fn to_code(self) -> usize {
        self as usize
    }

    pub(crate) fn from_code(c: usize) -> BatchBackend {
        BatchBackend::ALL
            .get(c)
            .copied()
            .unwrap_or(BatchBackend::Scalar)
    }
}

/// Whether AVX2 code may run (std caches the CPUID answer).
#[inline]
fn avx2() -> bool {
    #[cfg(all(target_arch = "x86_64", not(miri)))]
    {
        std::arch::is_x86_feature_detected!("avx2")
    }
    #[cfg(not(all(target_arch = "x86_64", not(miri))))]
    {
        false
    }
}

/// `select_le` on `b` (see the module docs); returns the final threshold.
#[inline]
pub(crate) fn select_le<F: FnMut(usize, u64) -> u64>(
    b: BatchBackend,
    tag: &[AtomicU32],
    last: &[AtomicU64],
    mask: u32,
    want: u32,
    thr: u64,
    f: F,
) -> u64 {
    match b {
        #[cfg(all(target_arch = "x86_64", not(miri)))]
        BatchBackend::Avx2 if avx2() => {
            // SAFETY: 1. the guard just checked that the CPU has AVX2, the
            // function's only requirement.
            unsafe { x86::select_le(tag, last, mask, want, thr, f) }
        }
        #[cfg(all(target_arch = "aarch64", target_feature = "neon", not(miri)))]
        BatchBackend::Neon => {
            // SAFETY: 1. this arm is compiled only where the target enables
            // NEON (`cfg(target_feature = "neon")`, the aarch64 baseline).
            unsafe { neon::select_le(tag, last, mask, want, thr, f) }
        }
        _ => scalar::select_le(tag, last, mask, want, thr, f),
    }
}

/// `usage` on `b` (see the module docs): adds into `acc`.
#[inline]
pub(crate) fn usage(
    b: BatchBackend,
    tag: &[AtomicU32],
    size: &[AtomicU64],
    acc: &mut [CategoryUsage; Category::COUNT],
) {
    match b {
        #[cfg(all(target_arch = "x86_64", not(miri)))]
        BatchBackend::Avx2 if avx2() => {
            // SAFETY: 1. the guard just checked that the CPU has AVX2.
            unsafe { x86::usage(tag, size, acc) }
        }
        #[cfg(all(target_arch = "aarch64", target_feature = "neon", not(miri)))]
        BatchBackend::Neon => {
            // SAFETY: 1. compiled only where the target enables NEON.
            unsafe { neon::usage(tag, size, acc) }
        }
        _ => scalar::usage(tag, size, acc),
    }
}

/// `decay` on `b` (see the module docs).
#[inline]
pub(crate) fn decay(b: BatchBackend, count: &[AtomicU64], shift: u32) {
    match b {
        #[cfg(all(target_arch = "x86_64", not(miri)))]
        BatchBackend::Avx2 if avx2() => {
            // SAFETY: 1. the guard just checked that the CPU has AVX2.
            unsafe { x86::decay(count, shift) }
        }
        #[cfg(all(target_arch = "aarch64", target_feature = "neon", not(miri)))]
        BatchBackend::Neon => {
            // SAFETY: 1. compiled only where the target enables NEON.
            unsafe { neon::decay(count, shift) }
        }
        _ => scalar::decay(count, shift),
    }
}

/// Live count and bytes per device code, added into `acc` (kept sorted by
/// code). One scalar loop for every backend: see the module docs.
pub(crate) fn usage_by_device(
    tag: &[AtomicU32],
    size: &[AtomicU64],
    acc: &mut Vec<(u16, CategoryUsage)>,
) {
    let mut at = 0usize;
    for (t, s) in tag.iter().zip(size) {
        let t = t.load(Ordering::Relaxed);
        if t & LIVE == 0 {
            continue;
        }
        let code = tag_device(t);
        if acc.get(at).is_none_or(|e| e.0 != code) {
            at = match acc.binary_search_by_key(&code, |e| e.0) {
                Ok(p) => p,
                Err(p) => {
                    acc.insert(p, (code, CategoryUsage::default()));
                    p
                }
            };
        }
        let e = &mut acc[at].1;
        e.count += 1;
        e.bytes = e.bytes.wrapping_add(s.load(Ordering::Relaxed));
    }
}

/// `v >> shift`, 0 for shifts of 64 or more (as the SIMD shifts do).
#[inline]
pub(crate) fn shr(v: u64, shift: u32) -> u64 {
    v.checked_shr(shift).unwrap_or(0)
}
