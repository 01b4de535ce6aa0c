//! Size classes, their span geometry and the five policy categories.
//!
//! Classes: 8 B steps up to 64 B, then eight classes per power of two
//! (`2^k · (1 + i/8)`), up to [`MAX_CLASS_SIZE`] = 64 MiB: 168 classes. A
//! request of `s` bytes gets the smallest class `≥ s`, so rounding waste is
//! below 1/9 ≈ 11.1 % from 64 B up (below 64 B the 8 B alignment step rules).
//! Requests above 64 MiB are *huge*: rounded to [`GRANULE`] and cached by size.
//!
//! Invariants (checked by tests):
//! - `class_size` is strictly increasing; `class_of(class_size(c)) == c`;
//!   `class_of(s)` is the smallest class with `class_size ≥ s`.
//! - every class ≥ 4 KiB is a multiple of 512 B (so ≥ 64 B aligned), every
//!   class ≥ [`PAGE_ALIGNED_FROM`] is a multiple of 4 KiB (so page aligned,
//!   spans being [`GRANULE`]-aligned).
//! - a span of class `c` holds `blocks_per_span(c) ≥ 1` blocks and is a
//!   multiple of [`GRANULE`].

/// Number of size classes.
pub const NUM_CLASSES: usize = 168;
/// The largest class; bigger requests are huge blocks.
pub const MAX_CLASS_SIZE: usize = 64 << 20;
/// Spans are aligned to and sized in multiples of this (the pagemap granule).
pub const GRANULE: usize = 64 << 10;
/// The largest alignment the pool serves (spans are granule aligned).
pub const MAX_ALIGN: usize = GRANULE;
/// From this class size up every block is page (4 KiB) aligned at no cost:
/// classes are `2^k·(1+i/8)` and for `k ≥ 15` the step `2^(k-3)` is a whole
/// page. Below it, blocks of 4 KiB or more are still ≥ 512 B aligned.
pub const PAGE_ALIGNED_FROM: usize = 32 << 10;

const fn compute_sizes() -> [usize; NUM_CLASSES] {
    let mut t = [0usize; NUM_CLASSES];
    let mut i = 0;
    while i < 8 {
        t[i] = (i + 1) * 8;
        i += 1;
    }
    let mut k = 6;
    while i < NUM_CLASSES {
        let mut m = 1;
        while m <= 8 && i < NUM_CLASSES {
            t[i] = (1usize << k) + m * (1usize << (k - 3));
            m += 1;
            i += 1;
        }
        k += 1;
    }
    t
}

/// Class sizes in bytes, indexed by class.
pub const CLASS_SIZES: [usize; NUM_CLASSES] = compute_sizes();

/// The smallest class that holds `size` bytes (`size ≤ MAX_CLASS_SIZE`; size 0
/// maps to class 0).
#[inline(always)]
pub fn class_of(size: usize) -> usize {
    debug_assert!(size <= MAX_CLASS_SIZE);
    if size <= SMALL_LOOKUP_MAX {
        // One byte load instead of a branch and a bit scan.
        return SMALL_CLASS[(size + 7) >> 3] as usize;
    }
    class_of_computed(size)
}

/// Sizes up to this are classed by [`SMALL_CLASS`].
const SMALL_LOOKUP_MAX: usize = 1024;

/// `SMALL_CLASS[(size + 7) / 8]` is the class of `size` for `size ≤ 1 KiB`
/// (every class boundary up to 1 KiB is a multiple of 8).
const SMALL_CLASS: [u8; SMALL_LOOKUP_MAX / 8 + 1] = {
    let mut t = [0u8; SMALL_LOOKUP_MAX / 8 + 1];
    let mut i = 1;
    while i < t.len() {
        t[i] = class_of_computed(i * 8) as u8;
        i += 1;
    }
    t
};

/// `class_of` by arithmetic (any `size ≤ MAX_CLASS_SIZE`).
#[inline(always)]
const fn class_of_computed(size: usize) -> usize {
    if size <= 64 {
        return size.saturating_sub(1) >> 3;
    }
    let t = size - 1;
    let k = (usize::BITS - 1 - t.leading_zeros()) as usize; // 2^k ≤ t < 2^(k+1), k ≥ 6
    // 8 + (k - 6)·8 + m, with m the three bits below the leading one.
    (k << 3) + ((t >> (k - 3)) & 7) - 40
}

/// Blocks up to this size have a *spare* list in each thread cache: an
/// overflowing list is parked whole there (no walk, no trip to the central
/// list) and taken back whole when the list runs empty, so a burst of up to
/// twice the cap stays in the thread (a FIFO of 1,000 × 64 B frees). Bounds
/// what a thread may hold beyond its caps: 512 blocks per class, about
/// 1.4 MiB over all these classes at worst.
pub const SPARE_MAX_SIZE: usize = 256;

/// The classes with a spare list: `0..SPARE_CLASSES`.
pub const SPARE_CLASSES: usize = {
    let mut c = 0;
    while CLASS_SIZES[c] <= SPARE_MAX_SIZE {
        c += 1;
    }
    c
};

/// Bytes in a block of class `c`.
#[inline(always)]
pub const fn class_size(c: usize) -> usize {
    CLASS_SIZES[c]
}

/// Per class `(s, inv, limit)` with `class_size = odd · 2^s`, `inv` the
/// inverse of `odd` modulo 2^64 and `limit = u64::MAX / odd`, so that
/// [`is_multiple_of_class`] needs no division (Granlund–Montgomery).
const DIVISIBILITY: [(u32, u64, u64); NUM_CLASSES] = {
    let mut t = [(0u32, 0u64, 0u64); NUM_CLASSES];
    let mut c = 0;
    while c < NUM_CLASSES {
        let s = CLASS_SIZES[c].trailing_zeros();
        let odd = (CLASS_SIZES[c] >> s) as u64;
        // Newton's iteration doubles the correct low bits: 3 → 6 → … → 96 ≥ 64.
        let mut inv = odd;
        let mut i = 0;
        while i < 5 {
            inv = inv.wrapping_mul(2u64.wrapping_sub(odd.wrapping_mul(inv)));
            i += 1;
        }
        t[c] = (s, inv, u64::MAX / odd);
        c += 1;
    }
    t
};

/// Whether `n` is a multiple of `class_size(c)` (false for `c` out of
/// range), with a multiply instead of a division: the size-less free path
/// checks every pointer with it.
#[inline(always)]
pub fn is_multiple_of_class(n: usize, c: usize) -> bool {
    let Some(&(s, inv, limit)) = DIVISIBILITY.get(c) else {
        return false;
    };
    let n = n as u64;
    n & ((1u64 << s) - 1) == 0 && (n >> s).wrapping_mul(inv) <= limit
}

#[cfg(test)]
mod divisibility_tests {
    use super::*;

    #[test]
    fn matches_the_remainder() {
        for c in 0..NUM_CLASSES {
            let d = class_size(c);
            for k in [0usize, 1, 2, 3, 7, 100, 1 << 20] {
                for delta in [0usize, 1, 8, d / 2, d - 1] {
                    let n = k * d + delta;
                    assert_eq!(
                        is_multiple_of_class(n, c),
                        n.is_multiple_of(d),
                        "n {n} class size {d}"
                    );
                }
            }
        }
        assert!(!is_multiple_of_class(0, NUM_CLASSES));
    }
}

const fn natural_align(s: usize) -> usize {
    let low = s & s.wrapping_neg();
    if low > MAX_ALIGN { MAX_ALIGN } else { low }
}

const fn compute_aligns() -> [u32; NUM_CLASSES] {
    let mut t = [0u32; NUM_CLASSES];
    let mut c = 0;
    while c < NUM_CLASSES {
        t[c] = natural_align(CLASS_SIZES[c]) as u32;
        c += 1;
    }
    t
}

/// The alignment every block of each class has (blocks sit at multiples of
/// the class size from a granule-aligned span base).
const CLASS_ALIGNS: [u32; NUM_CLASSES] = compute_aligns();

/// log2 of [`MAX_ALIGN`].
const MAX_ALIGN_SHIFT: usize = MAX_ALIGN.trailing_zeros() as usize;

/// `ALIGNED[log2(align)][c]`: the first class `≥ c` whose blocks are aligned
/// to `align`, or `u8::MAX` if none. Makes over-aligned requests O(1).
const ALIGNED: [[u8; NUM_CLASSES]; MAX_ALIGN_SHIFT + 1] = {
    let mut t = [[u8::MAX; NUM_CLASSES]; MAX_ALIGN_SHIFT + 1];
    let mut a = 0;
    while a <= MAX_ALIGN_SHIFT {
        let mut c = NUM_CLASSES;
        let mut best = u8::MAX;
        while c > 0 {
            c -= 1;
            if CLASS_ALIGNS[c] as usize >= 1 << a {
                best = c as u8;
            }
            t[a][c] = best;
        }
        a += 1;
    }
    t
};

/// The alignment every block of class `c` has.
#[inline(always)]
pub fn class_align(c: usize) -> usize {
    CLASS_ALIGNS[c] as usize
}

/// The class for a `size`/`align` request: the smallest class that holds
/// `size` and whose blocks are aligned to `align`. `None` if `size` is huge
/// or `align` is above [`MAX_ALIGN`]. `align` must be a power of two.
///
/// A returned class is below [`NUM_CLASSES`], and the optimiser is told so:
/// the thread cache indexes its arrays with it unchecked.
#[inline(always)]
pub fn class_for(size: usize, align: usize) -> Option<usize> {
    debug_assert!(align.is_power_of_two());
    // The table first: one compare for the common small request.
    let c = if size <= SMALL_LOOKUP_MAX {
        SMALL_CLASS[(size + 7) >> 3] as usize
    } else if size <= MAX_CLASS_SIZE {
        class_of_computed(size)
    } else {
        return None;
    };
    // SAFETY: `size ≤ MAX_CLASS_SIZE`, so `c` is a class (`CLASSES_IN_RANGE`).
    unsafe { core::hint::assert_unchecked(c < NUM_CLASSES) };
    // Every block is 8-aligned: most requests skip the table.
    let c = if align <= 8 || align <= CLASS_ALIGNS[c] as usize {
        c
    } else {
        class_for_aligned(c, align)?
    };
    // SAFETY: `class_for_aligned` returns classes only (`CLASSES_IN_RANGE`).
    unsafe { core::hint::assert_unchecked(c < NUM_CLASSES) };
    Some(c)
}

/// Checked at compile time: the small table, the arithmetic up to
/// [`MAX_CLASS_SIZE`] (monotone in `size`) and the alignment table give
/// classes below [`NUM_CLASSES`] only — what `class_for` tells the optimiser.
const CLASSES_IN_RANGE: () = {
    let mut i = 0;
    while i < SMALL_CLASS.len() {
        assert!((SMALL_CLASS[i] as usize) < NUM_CLASSES);
        i += 1;
    }
    assert!(class_of_computed(MAX_CLASS_SIZE) == NUM_CLASSES - 1);
    let mut a = 0;
    while a < ALIGNED.len() {
        let mut c = 0;
        while c < NUM_CLASSES {
            assert!(ALIGNED[a][c] == u8::MAX || (ALIGNED[a][c] as usize) < NUM_CLASSES);
            c += 1;
        }
        a += 1;
    }
};
const _: () = CLASSES_IN_RANGE;

#[cold]
fn class_for_aligned(c: usize, align: usize) -> Option<usize> {
    let a = align.trailing_zeros() as usize;
    if a > MAX_ALIGN_SHIFT {
        return None;
    }
    match ALIGNED[a][c] {
        u8::MAX => None,
        c => Some(c as usize),
    }
}

/// Bytes a huge (`> MAX_CLASS_SIZE`) request maps: rounded to the granule.
/// `None` on overflow.
#[inline]
pub fn huge_size(size: usize) -> Option<usize> {
    size.checked_add(GRANULE - 1).map(|s| s & !(GRANULE - 1))
}

/// The usable size a `size`/`align` request is served with (its class size,
/// or the huge rounding). `None` if it cannot be served (overflow, or an
/// alignment above [`MAX_ALIGN`]).
#[inline]
pub fn usable_size_for(size: usize, align: usize) -> Option<usize> {
    if align > MAX_ALIGN {
        return None;
    }
    match class_for(size, align) {
        Some(c) => Some(class_size(c)),
        None => huge_size(size),
    }
}

/// How many blocks one span of class `c` holds.
#[inline]
pub fn blocks_per_span(c: usize) -> usize {
    let s = class_size(c);
    if s <= 8 << 10 {
        GRANULE / s
    } else if s < 1 << 20 {
        ((1 << 20) / s).max(1)
    } else {
        1
    }
}

/// Whether free blocks of class `c` count against a pool's retained-bytes
/// limit: blocks of 1 MiB and up (one block a span, so a free one can be
/// unmapped alone). Huge blocks count too; smaller classes never do.
#[inline(always)]
pub const fn counts_against_limit(c: usize) -> bool {
    class_size(c) >= 1 << 20
}

/// The transparent huge page size (x86-64 and aarch64 with 4 KiB pages):
/// big spans are whole multiples of it. Defined here, not in `os`, because
/// the size classes are also built for the loom models, which leave `os` out.
pub(crate) const HUGE_PAGE: usize = 2 << 20;

/// Bytes one span of class `c` maps (a multiple of [`GRANULE`]; of 2 MiB
/// from 2 MiB up, so that big spans cut, grown and moved by `large` stay in
/// whole transparent huge pages: a cut or a move off a 2 MiB boundary splits
/// them, and the pages faulted after it are 4 KiB ones).
#[inline]
pub fn span_bytes(c: usize) -> usize {
    let raw = blocks_per_span(c) * class_size(c);
    let unit = if raw >= HUGE_PAGE { HUGE_PAGE } else { GRANULE };
    (raw + unit - 1) & !(unit - 1)
}

/// Blocks a thread moves to or from the central lists at once: about
/// 256 KiB of blocks, at least 1, at most [`MAX_BATCH`].
#[inline(always)]
pub const fn batch_len(c: usize) -> u32 {
    let n = (256 << 10) / class_size(c);
    if n < 1 {
        1
    } else if n > MAX_BATCH {
        MAX_BATCH as u32
    } else {
        n as u32
    }
}

/// The most blocks in one batch. 256 lets a thread cache hold a burst of
/// 512 small blocks (32 KiB of 64 B blocks) between trips to the central
/// lists; at 64 a burst of 1,000 × 64 B made ~30 trips (compare `fifo`).
pub const MAX_BATCH: usize = 256;

/// Blocks a thread cache may hold for class `c` before it hands a batch back.
/// For classes of 1 MiB and up that is one block: a free-then-alloc pair still
/// hits, but a thread never sits on more than one idle big block per class.
#[inline(always)]
pub const fn cache_cap(c: usize) -> u32 {
    let b = batch_len(c);
    if b == 1 { 1 } else { 2 * b }
}

/// The cap a thread's cache starts with for class `c`: at most
/// [`SLOW_START_CAP`]; each refill or overflow doubles it, up to
/// [`cache_cap`] (tcmalloc's slow start). A short-lived thread that uses a
/// class a few times moves a few blocks, not a batch of 256 it walks, carves
/// and hands back at exit.
#[inline(always)]
pub const fn initial_cap(c: usize) -> u32 {
    let cap = cache_cap(c);
    if cap < SLOW_START_CAP {
        cap
    } else {
        SLOW_START_CAP
    }
}

/// See [`initial_cap`].
pub const SLOW_START_CAP: u32 = 16;

/// The next cap after a refill or an overflow at `cap`.
#[inline(always)]
pub const fn next_cap(c: usize, cap: u32) -> u32 {
    let max = cache_cap(c);
    if cap >= max / 2 { max } else { cap * 2 }
}

/// The cap after a refill at `cap` that left `held` (≤ [`cache_cap`]) blocks
/// on the list: [`next_cap`], grown on until it holds them (a whole batch
/// another thread handed back skips the slow start ahead).
pub const fn cap_after_refill(c: usize, cap: u32, held: usize) -> u32 {
    let mut next = next_cap(c, cap);
    while (next as usize) < held {
        next = next_cap(c, next);
    }
    next
}

/// Blocks a full thread cache at `cap` keeps when it hands the rest back:
/// a quarter (none for caps under 4, e.g. the one-block classes). The kept
/// blocks are the newest and are walked to cut the list, so few of them;
/// the rest, three quarters of the cap, go back as one chain whose end is
/// known (`thread_cache`'s marks).
#[inline(always)]
pub const fn keep_at(cap: u32) -> u32 {
    cap / 4
}

/// Blocks a thread cache at `cap` moves to or from the central list at once:
/// half its cap (so [`batch_len`] once the cap is full), at least one.
#[inline(always)]
pub const fn batch_at(cap: u32) -> u32 {
    if cap < 2 { 1 } else { cap / 2 }
}

/// The five policy categories (by usable block size).
#[repr(u8)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Category {
    /// ≤ 4 KiB
    VerySmall = 0,
    /// ≤ 64 KiB
    Small = 1,
    /// ≤ 1 MiB
    Medium = 2,
    /// ≤ 16 MiB
    Large = 3,
    /// > 16 MiB
    VeryLarge = 4,
}

impl Category {
    /// Number of categories.
    pub const COUNT: usize = 5;
    /// All categories, smallest first.
    pub const ALL: [Category; 5] = [
        Category::VerySmall,
        Category::Small,
        Category::Medium,
        Category::Large,
        Category::VeryLarge,
    ];
    /// Upper bound of each category (the last one is unbounded).
    pub const UPPER: [usize; 4] = [4 << 10, 64 << 10, 1 << 20, 16 << 20];

    /// The category of a block of `bytes` bytes.
    #[inline]
    pub fn of_size(bytes: usize) -> Category {
        match bytes {
            0..=4096 => Category::VerySmall,
            4097..=65536 => Category::Small,
            65537..=1048576 => Category::Medium,
            1048577..=16777216 => Category::Large,
            _ => Category::VeryLarge,
        }
    }

    /// Index 0..5.
    #[inline]
    pub fn index(self) -> usize {
        self as usize
    }

    /// Lower-case name, for tables and logs.
    pub fn name(self) -> &'static str {
        ["very_small", "small", "medium", "large", "very_large"][self as usize]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_shape() {
        assert_eq!(class_size(0), 8);
        assert_eq!(class_size(7), 64);
        assert_eq!(class_size(8), 72);
        assert_eq!(class_size(NUM_CLASSES - 1), MAX_CLASS_SIZE);
        for c in 1..NUM_CLASSES {
            assert!(class_size(c) > class_size(c - 1));
        }
    }

    #[test]
    fn class_of_is_smallest_fitting() {
        for c in 0..NUM_CLASSES {
            let s = class_size(c);
            assert_eq!(class_of(s), c, "size {s}");
            if c > 0 {
                assert_eq!(class_of(class_size(c - 1) + 1), c);
            }
        }
        assert_eq!(class_of(0), 0);
        assert_eq!(class_of(1), 0);
        assert_eq!(class_of(600 << 10), class_of(600 << 10));
        assert!(class_size(class_of(600 << 10)) >= 600 << 10);
    }

    #[test]
    fn waste_bounded_from_64() {
        // Exhaustive up to 1 MiB, then every class boundary.
        let check = |s: usize| {
            let cs = class_size(class_of(s));
            assert!(cs >= s);
            assert!((cs - s) * 9 <= cs, "size {s} → {cs}");
        };
        for s in 65..=(1 << 20) {
            check(s);
        }
        for c in 8..NUM_CLASSES {
            check(class_size(c - 1) + 1);
        }
    }

    #[test]
    fn alignment_rules() {
        for c in 0..NUM_CLASSES {
            let s = class_size(c);
            if s >= 4096 {
                assert_eq!(s % 512, 0, "{s}");
                assert!(class_align(c) >= 64);
            }
            if s >= PAGE_ALIGNED_FROM || s == 4096 || s == 8192 || s == 16384 {
                assert_eq!(s % 4096, 0, "{s}");
                assert!(class_align(c) >= 4096);
            }
            assert_eq!(span_bytes(c) % GRANULE, 0);
            assert!(blocks_per_span(c) * s <= span_bytes(c));
            assert!(blocks_per_span(c) >= 1);
        }
        for shift in 0..=MAX_ALIGN_SHIFT {
            let align = 1 << shift;
            for s in [1usize, 24, 100, 5000, 70000, MAX_CLASS_SIZE - 1] {
                let c = class_for(s, align).unwrap();
                assert!(class_size(c) >= s && class_align(c) >= align);
                // The smallest such class: none below it qualifies.
                assert!(
                    (class_of(s)..c).all(|d| class_align(d) < align),
                    "size {s} align {align}"
                );
            }
        }
        assert_eq!(class_for(8, 1 << 17), None);
        assert_eq!(class_for(MAX_CLASS_SIZE + 1, 8), None);
    }

    #[test]
    fn categories() {
        assert_eq!(Category::of_size(4096), Category::VerySmall);
        assert_eq!(Category::of_size(4097), Category::Small);
        assert_eq!(Category::of_size(1 << 20), Category::Medium);
        assert_eq!(Category::of_size(16 << 20), Category::Large);
        assert_eq!(Category::of_size(64 << 20), Category::VeryLarge);
    }
}
