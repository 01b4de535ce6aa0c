//! Cross-class reuse of one-block spans (classes above 512 KiB, whose span
//! is a single block): a class that has no free span takes a free span of a
//! neighbouring class and resizes it, instead of mapping a new one.
//!
//! Without it, a program whose big buffers vary in size (activations of
//! varying shapes) keeps a free span in every class it ever used, and maps
//! anew whenever the class at hand has none: 20 live blocks of random
//! 5–25 MiB sizes peaked at 2.9× what other allocators hold.
//!
//! The donor is the nearest class with a free span, bigger first (its tail
//! is kept as a free span or unmapped), then smaller (grown where it is
//! into a free address range right after or right before it, else moved
//! without copying; either way the pages of other free spans are moved into
//! its new part, [`gather`]). Only classes within 2× of
//! the request donate: a 1 MiB buffer never chops a 64 MiB one, so tensor
//! programs whose sizes repeat keep their spans (and their speed), and a
//! span is never grown by more than its own size.
//!
//! [`donor`] is a pure function of the class and of which classes have a free
//! span, so the meta backend's model (`model.rs`) makes the same choice.
//! Per pool, [`FreeHint`] says which one-block classes may have a free span
//! centrally: set when a block is given back (or prewarmed), cleared when a
//! would-be donor turns out empty; a stale bit costs one lock.

use super::guard::set_key;
use super::pagemap;
use super::pool::PoolShared;
use super::size_class::{NUM_CLASSES, blocks_per_span, class_size, span_bytes};
use super::span::{self, SpanMeta};
use super::transfer::FreeBlock;
use crate::sync::{AtomicU64, Ordering};
use core::ptr::NonNull;

/// The first class whose span is one block.
pub(crate) const FIRST: usize = {
    let mut c = 0;
    while c < NUM_CLASSES && blocks_per_span_const(c) != 1 {
        c += 1;
    }
    c
};

/// `blocks_per_span` in a const context (the same rule).
const fn blocks_per_span_const(c: usize) -> usize {
    let s = super::size_class::CLASS_SIZES[c];
    if s <= 8 << 10 {
        super::size_class::GRANULE / s
    } else if s < 1 << 20 {
        let n = (1 << 20) / s;
        if n < 1 { 1 } else { n }
    } else {
        1
    }
}

const _: () = assert!(NUM_CLASSES - FIRST <= 64, "one bit per one-block class");

/// Whether class `c` has one block per span (and takes part here).
#[inline(always)]
pub(crate) fn is_one_block(c: usize) -> bool {
    c >= FIRST
}

/// The class that lends its free span to class `c` (one-block), given which
/// classes have one: the smallest bigger class whose span is at most twice
/// `c`'s, else the biggest smaller class whose span is at least half of it.
pub fn donor(c: usize, has_free: impl Fn(usize) -> bool) -> Option<usize> {
    debug_assert!(is_one_block(c));
    let need = span_bytes(c);
    let bigger = (c + 1..NUM_CLASSES).take_while(|&d| span_bytes(d) <= 2 * need);
    let smaller = (FIRST..c).rev().take_while(|&d| 2 * span_bytes(d) >= need);
    bigger.chain(smaller).find(|&d| has_free(d))
}

/// The biggest one-block class whose span fits in `len` bytes, if any.
pub fn fitting_class(len: usize) -> Option<usize> {
    (FIRST..NUM_CLASSES)
        .take_while(|&t| span_bytes(t) <= len)
        .last()
}

/// The class whose span the tail of a span cut down keeps, for a tail of
/// `tail` bytes, when the pool holds `retained` free bytes (classes of
/// 1 MiB and up), has `reserved` bytes mapped and had at most `peak_used`
/// in use: the [`fitting_class`] of the tail, as long as the pool is within
/// its budget ([`over_budget`]) or the retained bytes stay within
/// [`TAIL_BOUND`] or an eighth of the reserved ones (else the tail is
/// unmapped). A kept tail is free and resident: a later request moves its
/// pages into its block ([`gather_from`]) instead of faulting fresh ones.
pub fn keep_tail(tail: usize, retained: usize, reserved: usize, peak_used: usize) -> Option<usize> {
    let t = fitting_class(tail)?;
    (retained + span_bytes(t) <= TAIL_BOUND.max(reserved / 8)
        || !over_budget(reserved, 0, peak_used))
    .then_some(t)
}

/// Whether `need` more bytes mapped would take a pool holding `reserved`
/// bytes over its budget: a quarter above `peak_used`, the most it has had
/// in use (reserved plus the request, minus the free bytes held centrally,
/// sampled by [`note_used`] at every big request no free span of its class
/// serves).
///
/// Within budget a pool keeps the tails it cuts (a later request moves
/// their pages instead of faulting fresh ones) and a request no class
/// within 2× serves maps a fresh span, so a program whose sizes repeat
/// keeps a span per class; over it, such a request takes the pages of any
/// free span, cutting far bigger ones too ([`gather_from`] with `cut`), so
/// that free spans are used before the pool grows.
pub fn over_budget(reserved: usize, need: usize, peak_used: usize) -> bool {
    reserved + need > peak_used + peak_used / 4
}

/// The new peak of bytes in use, given the old one, the pool's reserved
/// bytes with the request and the free bytes it holds centrally (see
/// [`over_budget`]).
pub fn note_used(peak_used: usize, reserved: usize, free: usize) -> usize {
    peak_used.max(reserved.saturating_sub(free))
}

/// See [`keep_tail`].
pub const TAIL_BOUND: usize = 32 << 20;

/// The class whose free span gives its pages to a block still `gap` bytes
/// short: the biggest class whose span fits in the gap (moved whole), else,
/// with `cut`, the smallest bigger one (a prefix of it moves; the rest stays
/// a free span of its [`fitting_class`], or is unmapped).
///
/// A span grown from a donor (`cut`) takes from any free span; a span
/// mapped fresh because no class within 2× had one takes whole smaller
/// spans only, so that a program whose sizes repeat (each class ends a
/// round with the spans it needs) settles instead of chopping the spans of
/// its next requests round after round.
pub fn gather_from(gap: usize, cut: bool, has_free: impl Fn(usize) -> bool) -> Option<usize> {
    let fits = (FIRST..NUM_CLASSES)
        .rev()
        .find(|&e| span_bytes(e) <= gap && has_free(e));
    fits.or_else(|| {
        (FIRST..NUM_CLASSES)
            .filter(|_| cut)
            .find(|&e| span_bytes(e) > gap && has_free(e))
    })
}

/// Which one-block classes of a pool may have a free span on their central
/// list (bit `c - FIRST`). A hint: see the module docs.
#[derive(Debug)]
pub(crate) struct FreeHint(AtomicU64);

impl FreeHint {
    pub(crate) const fn new() -> Self {
        FreeHint(AtomicU64::new(0))
    }

    /// Class `c` (one-block) has a free span.
    #[inline]
    pub(crate) fn set(&self, c: usize) {
        debug_assert!(is_one_block(c) && blocks_per_span(c) == 1);
        self.0.fetch_or(1 << (c - FIRST), Ordering::Relaxed);
    }

    fn clear(&self, c: usize) {
        self.0.fetch_and(!(1 << (c - FIRST)), Ordering::Relaxed);
    }

    fn get(&self, c: usize) -> bool {
        self.0.load(Ordering::Relaxed) & (1 << (c - FIRST)) != 0
    }
}

/// A free span of another class, resized to be the one block of class `c`
/// (one-block) and adopted by `c`: `None` if no class within reach has one,
/// or if the OS refused to grow it (the span then goes back to its class,
/// free, and the caller maps as before). A span cut down keeps its tail as
/// a free span ([`keep_tail`]); a span grown takes the pages of other free
/// spans into its new part ([`gather_from`]) before any fresh page.
pub(crate) fn steal(pool: &PoolShared, c: usize) -> Option<*mut FreeBlock> {
    let need = span_bytes(c);
    let reserved = pool.reserved.current() as usize;
    let cached = pool.cached.load(Ordering::Relaxed);
    let peak = note_used(
        pool.peak_used.load(Ordering::Relaxed),
        reserved + need,
        cached,
    );
    pool.peak_used.fetch_max(peak, Ordering::Relaxed);
    let (rec, p) = match from_donor(pool, c, need)? {
        Some(got) => got,
        None => fresh_gathered(pool, need)?,
    };
    // SAFETY: ours, on no list, one span's length of class `c`.
    unsafe { adopt_as(pool, rec, c) };
    Some(p.as_ptr().cast())
}

/// Makes the record `rec` describe the one block of class `c` and links it
/// into `c`'s span list. Atomic stores: a lock-free reader with a stale
/// pointer (`owns`, `usable_size`) may be looking at the record meanwhile.
///
/// # Safety
/// - `rec` is a live record of `pool`, on no span list, registered for
///   exactly its range, which is `span_bytes(c)` long; `c` is one-block.
unsafe fn adopt_as(pool: &PoolShared, rec: *mut SpanMeta, c: usize) {
    // SAFETY: the record is the caller's (contract).
    unsafe {
        (*rec).block.store(class_size(c), Ordering::Relaxed);
        (*rec).nblocks.store(1, Ordering::Relaxed);
        (*rec).class.store(c as u16, Ordering::Relaxed);
        pool.central(c).adopt_span(pool, c, rec);
    }
}

/// Moves the live block `p` of one-block class `c` down into the smaller
/// one-block class `to` where it is, keeping its bytes: its span is cut to
/// `to`'s span and the tail kept as a free span ([`cut`], as for a donor).
/// A realloc into a smaller big class thus neither copies nor holds two
/// blocks at once (up to 64 MiB each).
///
/// Growing stays with the caller (a copy): the pages of free spans moved
/// into a *live* block have no safe way back if the kernel refuses a move
/// half-way ([`gather`] gives such a span up, which a live block cannot be).
///
/// # Safety
/// - `p` is a live block of class `c` of `pool`, owned by the caller;
///   `to < c`, both one-block classes.
pub(crate) unsafe fn shrink_in_place(pool: &PoolShared, c: usize, p: NonNull<u8>, to: usize) {
    debug_assert!(is_one_block(to) && to < c);
    let rec = pagemap::lookup(p.as_ptr() as usize);
    debug_assert!(!rec.is_null());
    let need = span_bytes(to);
    // SAFETY: the block is the caller's, so its span (one block) is live,
    // on class `c`'s span list, and no other thread changes its length.
    let len = unsafe { (*rec).len() };
    debug_assert!(need <= len);
    pool.central(c).disown_span(rec);
    if need < len {
        // SAFETY: off every list now; the block's bytes past `need` are not
        // part of the smaller block (the caller gives them up).
        unsafe { cut(pool, rec, p, need) };
    }
    // SAFETY: ours (off every list, its block the caller's), cut to one
    // span's length of class `to`.
    unsafe { adopt_as(pool, rec, to) };
}

/// The span of a [`donor`] of class `c`, resized to `need` bytes:
/// `Some(None)` if no class within reach has a free span, `None` if the OS
/// refused to grow it (the span then goes back to its class, free, or is
/// given up; the caller maps as before).
#[allow(clippy::option_option)]
fn from_donor(
    pool: &PoolShared,
    c: usize,
    need: usize,
) -> Option<Option<(*mut SpanMeta, NonNull<u8>)>> {
    // Each failed try clears a bit, unless blocks keep arriving in that
    // class meanwhile: bounded, so a busy neighbour cannot keep us here.
    for _ in 0..2 * (NUM_CLASSES - FIRST) {
        let Some(d) = donor(c, |d| pool.large_free.get(d)) else {
            break;
        };
        let Some(rec) = take_free_span(pool, d) else {
            continue;
        };
        // SAFETY: `take_span` handed us the span: on no list, no block of it
        // in use, so its record and pages are ours until adopted.
        let (base, len) = unsafe { ((*rec).base(), (*rec).len()) };
        // SAFETY: base is a mapped span start, non-null.
        let p = unsafe { NonNull::new_unchecked(base as *mut u8) };
        let p = if len > need {
            // SAFETY: the span is ours and nothing refers to its tail.
            unsafe { cut(pool, rec, p, need) };
            p
        } else if len < need {
            // SAFETY: as above: a span of ours whose record describes it.
            if let Some((q, from, to)) = unsafe { grow_into_hole(pool, rec, base, len, need) } {
                // SAFETY: `rec` now describes `[q, q + need)`, ours, its
                // part `[q + from, q + to)` fresh.
                if !unsafe { gather(pool, rec, q, from, to, need, true) } {
                    return None;
                }
                return Some(Some((rec, q)));
            }
            // Something is mapped on both sides: move it (a try in place
            // would fail the same way).
            // SAFETY: as above: a span of ours whose record describes it.
            match unsafe { pool.huge.grow(pool, p, need, false) } {
                Some(q) => {
                    // SAFETY: `q` is the grown span of `rec`, ours.
                    if !unsafe { gather(pool, rec, q, len, need, need, true) } {
                        return None;
                    }
                    q
                }
                None => {
                    // SAFETY: ours, unchanged by the failed grow.
                    unsafe { relist(pool, rec, d) };
                    return None;
                }
            }
        } else {
            p
        };
        return Some(Some((rec, p)));
    }
    Some(None)
}

/// Grows the free span `rec` (`[base, base + len)`) to `need` bytes where
/// it is, if nothing is mapped right after it, or else right before it:
/// the new part is mapped fresh there (`MAP_FIXED_NOREPLACE`) for
/// [`gather`] to fill. Returns the span's new start `q` and its fresh part
/// `[q + from, q + to)`, or `None` with nothing changed.
///
/// Most grown spans are made of several kernel mappings (pages gathered
/// before), which `mremap` cannot resize in place; without this, such a
/// span is first moved whole to a fresh range (one more mapping, and every
/// page table entry moved once more) even when the address range next to
/// it is free, as it is for about two grows in three in the mixed-large
/// workload.
///
/// # Safety
/// - `rec` is the caller's span, on no list, its block not in use,
///   registered for exactly `[base, base + len)`; `len < need`, both
///   granule multiples (of 2 MiB from 2 MiB up: the span stays in whole
///   huge pages either way).
unsafe fn grow_into_hole(
    pool: &PoolShared,
    rec: *mut SpanMeta,
    base: usize,
    len: usize,
    need: usize,
) -> Option<(NonNull<u8>, usize, usize)> {
    let more = need - len;
    // After the span (it keeps its start), else before it (it starts
    // there); as `(fresh part, new start, fresh part's offset)`.
    let after = Some((base + len, base, len));
    let before = base
        .checked_sub(more)
        .filter(|&a| a != 0)
        .map(|a| (a, a, 0));
    let (at, q, from) = [after, before]
        .into_iter()
        .flatten()
        // A span of ours at either end: taken, no need to ask the kernel.
        .filter(|&(at, ..)| {
            pagemap::lookup(at).is_null() && pagemap::lookup(at + more - 1).is_null()
        })
        // SAFETY: a range is taken only if nothing is mapped there, so no
        // one else's mapping is touched; taken, it is ours.
        .find(|&(at, ..)| unsafe { crate::os::map_fixed_noreplace(at, more) })?;
    if !pagemap::register(at, more, rec) {
        // SAFETY: just mapped by us, published nowhere.
        unsafe { crate::os::unmap(NonNull::new_unchecked(at as *mut u8), more) };
        return None;
    }
    if pool.huge_pages.load(Ordering::Relaxed) {
        // SAFETY: our fresh mapping (pages gathered into it keep their huge
        // pages either way).
        unsafe { crate::os::advise_huge(at, more) };
    }
    // SAFETY: the span is the caller's; its record now covers the new part
    // (a reader with a stale pointer gets some answer about a free span,
    // as for any record change).
    unsafe {
        (*rec).base.store(q, Ordering::Relaxed);
        (*rec).set_len(need);
    }
    pool.reserved.add(more as u64);
    // SAFETY: a mapped span start, non-null.
    Some((
        unsafe { NonNull::new_unchecked(q as *mut u8) },
        from,
        from + more,
    ))
}

/// A fresh span of `need` bytes filled with the pages of free spans, when
/// there is any: smaller ones only within the budget, any (cutting bigger
/// ones) over it ([`over_budget`], [`gather_from`]); `None` if there is
/// none, or if the OS refused a mapping or a move.
fn fresh_gathered(pool: &PoolShared, need: usize) -> Option<(*mut SpanMeta, NonNull<u8>)> {
    let cut = over_budget(
        pool.reserved.current() as usize,
        need,
        pool.peak_used.load(Ordering::Relaxed),
    );
    gather_from(need, cut, |e| pool.large_free.get(e))?;
    let p = super::huge::map_huge(pool, need, false)?;
    let rec = pagemap::lookup(p.as_ptr() as usize);
    // SAFETY: the fresh span's record, ours, on no list.
    if !unsafe { gather(pool, rec, p, 0, need, need, cut) } {
        return None;
    }
    Some((rec, p))
}

/// Takes a free span of class `d` off its class, or clears `d`'s hint bit
/// when it has none.
fn take_free_span(pool: &PoolShared, d: usize) -> Option<*mut SpanMeta> {
    let rec = pool.central(d).take_span(pool, d);
    if rec.is_none() {
        pool.large_free.clear(d);
        // A block given back after `take_span` looked keeps its bit (its
        // own `set` may have run before our `clear`).
        if pool.central(d).has_incoming() {
            pool.large_free.set(d);
        }
    }
    rec
}

/// Makes the span `rec` (starting at its base, one block of class `t`'s
/// span length) a free span of class `t`, listed centrally.
///
/// # Safety
/// - `rec` is a live record of `pool`, on no list, registered for exactly
///   its range, `span_bytes(t)` bytes long; nothing uses its block.
unsafe fn relist(pool: &PoolShared, rec: *mut SpanMeta, t: usize) {
    // SAFETY: the span is the caller's; its one block is free, so it carries
    // the key, as every block on a free list does.
    unsafe {
        let b = (*rec).base() as *mut FreeBlock;
        adopt_as(pool, rec, t);
        set_key(b, pool.key());
        (*b).next = core::ptr::null_mut();
        pool.central(t).give_back(pool, t, b, b, 1);
    }
}

/// Unregisters and unmaps `[base, base + len)` (nothing when `len` is 0).
///
/// # Safety
/// - The range is a part of one of `pool`'s spans that its record no longer
///   covers, and nothing refers to it.
unsafe fn drop_range(pool: &PoolShared, base: usize, len: usize) {
    if len > 0 {
        pagemap::unregister(base, len);
        // SAFETY: forwarded from the caller.
        unsafe { crate::os::unmap(NonNull::new_unchecked(base as *mut u8), len) };
        pool.reserved.sub(len as u64);
    }
}

/// Cuts the span `rec` (starting at `p`) to `need` bytes: its tail becomes
/// a free span of the class [`keep_tail`] says, listed centrally, and the
/// rest of the tail is unmapped (all of it when no class is kept, or if no
/// record can be had).
///
/// # Safety
/// - `rec` is a one-block span of `pool`, on no list, its block not in use:
///   the caller's; `need` is a granule multiple below its length.
unsafe fn cut(pool: &PoolShared, rec: *mut SpanMeta, p: NonNull<u8>, need: usize) {
    // SAFETY: the span is the caller's (contract).
    let len = unsafe { (*rec).len() };
    let keep = keep_tail(
        len - need,
        pool.retained.load(Ordering::Relaxed),
        pool.reserved.current() as usize,
        pool.peak_used.load(Ordering::Relaxed),
    );
    if let Some(t) = keep {
        let k = span_bytes(t);
        let r2 = span::alloc_record();
        let tb = p.as_ptr() as usize + need;
        if !r2.is_null() {
            // SAFETY: a fresh record, ours; once registered, lock-free readers
            // find a correct description of the tail (ours, one free block).
            unsafe {
                (*r2).init(
                    tb,
                    k,
                    class_size(t),
                    1,
                    t as u16,
                    pool as *const PoolShared as usize,
                )
            };
            if pagemap::register(tb, k, r2) {
                // SAFETY: `rec` is ours; its pages beyond `need + k` are
                // nobody's once it is cut.
                unsafe {
                    (*rec).set_len(need);
                    drop_range(pool, tb + k, len - need - k);
                }
                pool.segments.add(1);
                // SAFETY: the tail's span, registered for exactly its range.
                unsafe { relist(pool, r2, t) };
                return;
            }
            // SAFETY: never published (`register` rolled back).
            unsafe { span::free_record(r2) };
        }
    }
    // SAFETY: forwarded from the caller: ours, nothing refers to the tail.
    unsafe { pool.huge.shrink(pool, p, need) };
}

/// Fills the part `[q + from, q + to)` of a span of `need` bytes just grown
/// (fresh, not yet faulted) with the pages of other free spans, moved there without
/// copying, as [`gather_from`] picks them, while any is free; what no free
/// span covers stays fresh. Returns `false` if the OS refused a move: the
/// span is then given up (see [`abandon`]) and must not be used.
///
/// Moves of ranges that span several kernel mappings (a span gathered
/// before) need Linux 6.17; older kernels refuse them, and the span is
/// given up.
///
/// # Safety
/// - `rec` is the caller's span, on no list, mapped and registered for
///   `[q, q + need)`, its block not in use; `from ≤ to ≤ need`.
#[must_use]
unsafe fn gather(
    pool: &PoolShared,
    rec: *mut SpanMeta,
    q: NonNull<u8>,
    from: usize,
    to: usize,
    need: usize,
    cut: bool,
) -> bool {
    debug_assert!(from <= to && to <= need);
    let mut off = from;
    for _ in 0..2 * (NUM_CLASSES - FIRST) {
        if off >= to {
            break;
        }
        let gap = to - off;
        let Some(e) = gather_from(gap, cut, |e| pool.large_free.get(e)) else {
            break;
        };
        let Some(z) = take_free_span(pool, e) else {
            continue;
        };
        // SAFETY: `take_span` handed us `z`: ours, on no list, unused.
        let (zb, zl) = unsafe { ((*z).base(), (*z).len()) };
        let k = gap.min(zl);
        let dst = q.as_ptr() as usize + off;
        // Unregistered before the kernel moves the pages away (a range once
        // unmapped may be mapped and registered by another thread).
        pagemap::unregister(zb, k);
        // SAFETY: both ranges are ours: `[zb, zb + k)` a part of `z`,
        // unused; `[dst, dst + k)` a fresh part of `rec`'s span, which the
        // pages replace.
        let moved = unsafe {
            crate::os::remap(
                NonNull::new_unchecked(zb as *mut u8),
                k,
                k,
                Some(NonNull::new_unchecked(dst as *mut u8)),
            )
        };
        if !moved {
            // Nothing moved: `z` is whole and ours again.
            let back = pagemap::register(zb, k, z);
            debug_assert!(back, "leaves of a registered range are never unmapped");
            // SAFETY: `z` is ours, `zl` bytes: its class's span.
            unsafe { relist(pool, z, e) };
            // SAFETY: with `MREMAP_FIXED` the kernel may have unmapped our
            // destination before failing; if it can be mapped again
            // (fresh), the span is whole and usable. If something is mapped
            // there (ours, left by a kernel that failed early, or another
            // thread's: the two cannot be told apart), the span is given up.
            if unsafe { crate::os::map_fixed_noreplace(dst, k) } {
                return true;
            }
            // SAFETY: the span is the caller's, on no list, unused.
            unsafe { abandon(pool, rec, q.as_ptr() as usize, need, dst, k) };
            return false;
        }
        pool.reserved.sub(k as u64);
        off += k;
        let rest = zl - k;
        match fitting_class(rest) {
            Some(t) => {
                let nb = zb + k;
                // SAFETY: `z` is ours; the part after its kept span is
                // nobody's, and its base moves past the pages moved away
                // (a reader with a stale pointer gets some answer about
                // a free span, as for any record change).
                unsafe {
                    drop_range(pool, nb + span_bytes(t), rest - span_bytes(t));
                    (*z).base.store(nb, Ordering::Relaxed);
                    (*z).len.store(span_bytes(t), Ordering::Relaxed);
                    relist(pool, z, t);
                }
            }
            None => {
                // SAFETY: `z`'s rest is nobody's; then its record is unused.
                unsafe {
                    drop_range(pool, zb + k, rest);
                    span::free_record(z);
                }
                pool.segments.sub(1);
            }
        }
    }
    true
}

/// Gives up the span `rec` of `len` bytes at `base` after a move onto its
/// part `[hole, hole + k)` failed: with `MREMAP_FIXED` the kernel may have
/// unmapped that part first, and another thread may have mapped it since,
/// so it is left alone (at worst `k` bytes of address space, never touched,
/// stay mapped); the rest is unregistered and unmapped, the record freed.
///
/// # Safety
/// - `rec` is the caller's span, on no list, its block not in use; nothing
///   refers to its bytes.
unsafe fn abandon(
    pool: &PoolShared,
    rec: *mut SpanMeta,
    base: usize,
    len: usize,
    hole: usize,
    k: usize,
) {
    pagemap::unregister_if(base, len, rec);
    // SAFETY: the parts around the hole are ours and unused (caller); the
    // record is unregistered, so nothing finds it any more.
    unsafe {
        if hole > base {
            crate::os::unmap(NonNull::new_unchecked(base as *mut u8), hole - base);
        }
        if hole + k < base + len {
            crate::os::unmap(
                NonNull::new_unchecked((hole + k) as *mut u8),
                base + len - hole - k,
            );
        }
        span::free_record(rec);
    }
    pool.reserved.sub(len as u64);
    pool.segments.sub(1);
}

#[cfg(test)]
mod tests {
    use super::{FIRST, donor, fitting_class, gather_from, keep_tail, note_used, over_budget};
    use crate::host::HostPool;
    use crate::host::size_class::{NUM_CLASSES, blocks_per_span, class_of, class_size, span_bytes};
    use core::alloc::Layout;
    use core::ptr::NonNull;

    const MIB: usize = 1 << 20;

    fn layout(size: usize) -> Layout {
        Layout::from_size_align(size, 64).unwrap()
    }

    /// Writes `seed ^ page` into the first byte of every page and the last byte.
    fn fill(p: NonNull<u8>, len: usize, seed: u8) {
        for o in (0..len).step_by(4096).chain([len - 1]) {
            // SAFETY: `o < len`, a live block of ≥ len bytes.
            unsafe { p.as_ptr().add(o).write(seed ^ (o >> 12) as u8) };
        }
    }

    fn check(p: NonNull<u8>, len: usize, seed: u8) {
        for o in (0..len).step_by(4096).chain([len - 1]) {
            // SAFETY: as in `fill`.
            let b = unsafe { p.as_ptr().add(o).read() };
            assert_eq!(b, seed ^ (o >> 12) as u8, "offset {o}");
        }
    }

    /// Allocates `first`, frees it (it stays in the thread cache), then
    /// allocates `second`; returns both addresses and the stats around the
    /// second allocation, after checking the second block is whole and
    /// freeing it.
    fn reuse(first: usize, second: usize) -> (NonNull<u8>, NonNull<u8>, usize, usize) {
        let pool = HostPool::new();
        let a = pool.allocate(layout(first)).unwrap();
        fill(a, first, 1);
        // SAFETY: allocated above with this layout.
        unsafe { pool.deallocate(a, layout(first)) };
        let maps = pool.stats().os_maps;
        let b = pool.allocate(layout(second)).unwrap();
        let reserved = pool.stats().reserved_bytes;
        assert_eq!(
            pool.usable_size(b.as_ptr()),
            Some(class_size(class_of(second)))
        );
        fill(b, second, 2);
        check(b, second, 2);
        let maps = pool.stats().os_maps - maps;
        // SAFETY: allocated above with this layout.
        unsafe { pool.deallocate(b, layout(second)) };
        // It comes back from its new class.
        let c = pool.allocate(layout(second)).unwrap();
        assert_eq!(c, b);
        // SAFETY: size-less free of a live block of ours.
        unsafe { pool.free(c).unwrap() };
        assert_eq!(pool.stats().os_maps, 1, "one mapping in all");
        assert!(pool.trim() > 0);
        assert_eq!(pool.stats().reserved_bytes, 0);
        (a, b, maps, reserved)
    }

    #[test]
    fn a_free_span_serves_a_smaller_class_in_place() {
        let (a, b, maps, reserved) = reuse(20 * MIB, 12 * MIB);
        assert_eq!(maps, 0);
        assert_eq!(a, b, "the span keeps its address");
        // Its 8 MiB tail stays mapped, a free span of the 8 MiB class.
        assert_eq!(reserved, 20 * MIB);
        assert_eq!(keep_tail(8 * MIB, 0, 20 * MIB, 0), Some(class_of(8 * MIB)));
    }

    /// The tail of a cut span is a free span of its own class: resident (its
    /// pages kept, the bytes still there) and handed out without a mapping;
    /// a tail too small to keep, or what a kept one leaves over, is unmapped.
    #[test]
    fn a_cut_spans_tail_serves_its_own_class_without_a_mapping() {
        let pool = HostPool::new();
        let a = pool.allocate(layout(20 * MIB)).unwrap();
        fill(a, 20 * MIB, 3);
        // SAFETY: a live block of ours, freed once.
        unsafe { pool.free(a).unwrap() };
        pool.flush_thread_cache();
        let b = pool.allocate(layout(12 * MIB)).unwrap();
        assert_eq!(b, a);
        let t = pool.allocate(layout(8 * MIB)).unwrap();
        assert_eq!(t.as_ptr() as usize, a.as_ptr() as usize + 12 * MIB);
        assert_eq!(pool.usable_size(t.as_ptr()), Some(8 * MIB));
        assert_eq!(pool.stats().os_maps, 1, "the tail needed no mapping");
        // Its pages were kept: the bytes the first block wrote are there.
        // (Past the first page: a free block's first words hold its links.)
        for o in (4096..8 * MIB).step_by(4096) {
            // SAFETY: inside the live 8 MiB block `t`.
            let v = unsafe { t.as_ptr().add(o).read() };
            assert_eq!(v, 3 ^ ((12 * MIB + o) >> 12) as u8, "offset {o}");
        }
        assert!(pool.owns(t.as_ptr()) && !pool.owns(t.as_ptr().wrapping_add(4096)));
        // SAFETY: allocated above, freed once each.
        unsafe {
            pool.free(t).unwrap();
            pool.free(b).unwrap();
        }
        pool.flush_thread_cache();
        assert!(pool.trim() > 0);
        assert_eq!(pool.stats().reserved_bytes, 0);
        // What no class fits is unmapped; past the bound a tail is not kept.
        assert_eq!(fitting_class(span_bytes(FIRST) - (64 << 10)), None);
        assert_eq!(fitting_class(6 * MIB + (64 << 10)), Some(class_of(6 * MIB)));
        assert_eq!(keep_tail(8 * MIB, 30 * MIB, 100 * MIB, 0), None);
        assert_eq!(
            keep_tail(8 * MIB, 30 * MIB, 400 * MIB, 0),
            Some(class_of(8 * MIB))
        );
    }

    /// Frees a 10 MiB and a 6 MiB block (filled), then allocates 18 MiB: the
    /// 10 MiB span grows and takes the 6 MiB span's pages; returns the three
    /// blocks' addresses.
    fn grow_and_gather(pool: &HostPool) -> (NonNull<u8>, NonNull<u8>, NonNull<u8>) {
        let x = pool.allocate(layout(10 * MIB)).unwrap();
        let z = pool.allocate(layout(6 * MIB)).unwrap();
        fill(x, 10 * MIB, 5);
        fill(z, 6 * MIB, 6);
        // SAFETY: live blocks of ours, freed once.
        unsafe {
            pool.free(x).unwrap();
            pool.free(z).unwrap();
        }
        pool.flush_thread_cache();
        let b = pool.allocate(layout(18 * MIB)).unwrap();
        (x, z, b)
    }

    /// Where the 10 MiB span's pages (`x`), the 6 MiB span's pages and the
    /// fresh pages lie in the 18 MiB block `b` of [`grow_and_gather`]: the
    /// span grew down into a free range before it (`b` starts 8 MiB below
    /// `x`; the 6 MiB first, then 2 MiB fresh, then `x`'s pages), or up
    /// (in place, or moved whole first: `x`'s pages, the 6 MiB, fresh).
    fn grown_layout(x: NonNull<u8>, b: NonNull<u8>) -> (usize, usize, usize) {
        if x.as_ptr() as usize == b.as_ptr() as usize + 8 * MIB {
            (8 * MIB, 0, 6 * MIB)
        } else {
            (0, 10 * MIB, 16 * MIB)
        }
    }

    /// Checks the pages of [`grow_and_gather`]'s block `b` (see
    /// [`grown_layout`]). Past each first page: a free block's first words
    /// hold its links.
    fn check_grown(x: NonNull<u8>, b: NonNull<u8>) {
        let (xo, zo, fo) = grown_layout(x, b);
        for o in (4096..10 * MIB).step_by(4096) {
            // SAFETY: inside the live 18 MiB block `b`.
            let v = unsafe { b.as_ptr().add(xo + o).read() };
            assert_eq!(v, 5 ^ (o >> 12) as u8, "the grown span's page at {o}");
        }
        for o in (4096..6 * MIB).step_by(4096) {
            // SAFETY: as above.
            let v = unsafe { b.as_ptr().add(zo + o).read() };
            assert_eq!(v, 6 ^ (o >> 12) as u8, "moved page at offset {o}");
        }
        for o in (fo..fo + 2 * MIB).step_by(4096) {
            // SAFETY: as above.
            assert_eq!(unsafe { b.as_ptr().add(o).read() }, 0, "fresh at {o}");
        }
    }

    /// A span grown for a bigger class is filled with the pages of other
    /// free spans, moved (their bytes come along), not faulted fresh; only
    /// what no free span covers is fresh (zero). No mapping is made.
    #[test]
    fn a_grown_span_gathers_the_pages_of_free_spans() {
        let pool = HostPool::new();
        let (x, z, b) = grow_and_gather(&pool);
        assert_eq!(pool.stats().os_maps, 2, "no mapping for the 18 MiB block");
        assert_eq!(pool.stats().reserved_bytes, 18 * MIB);
        check_grown(x, b);
        // The 6 MiB span is gone (its pages are `b`'s now), unless `b` was
        // moved over its old range.
        let inside = (z.as_ptr() as usize).wrapping_sub(b.as_ptr() as usize) < 18 * MIB;
        assert!(inside || !pool.manages(z.as_ptr()));
        assert_eq!(pool.usable_size(b.as_ptr()), Some(18 * MIB));
        fill(b, 18 * MIB, 7);
        check(b, 18 * MIB, 7);
        // SAFETY: a live block of ours, freed once.
        unsafe { pool.free(b).unwrap() };
        pool.flush_thread_cache();
        assert!(pool.trim() > 0);
        assert_eq!(pool.stats().reserved_bytes, 0);
    }

    /// A move the OS refuses (after unmapping its destination, as the
    /// kernel may) puts the free span back untouched. The grown span stays
    /// whole if its part can be mapped again; if another thread mapped it
    /// meanwhile, that mapping is left alone, the grown span is given up and
    /// the request is served by a fresh mapping.
    #[test]
    fn a_refused_move_keeps_the_donor_and_never_a_foreign_range() {
        use core::sync::atomic::{AtomicUsize, Ordering::SeqCst};
        static TAKEN: AtomicUsize = AtomicUsize::new(0);
        fn other_thread_takes(dst: usize, len: usize) {
            // SAFETY: `dst..dst+len` was just unmapped by the hook.
            let taken = unsafe { crate::os::map_fixed_noreplace(dst, len) };
            assert!(taken, "could not take the range");
            // SAFETY: our fresh mapping.
            unsafe { (dst as *mut u8).write(0xAB) };
            TAKEN.store(dst, SeqCst);
        }
        let _hook = crate::os::REMAP_FAULT_LOCK
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        for foreign in [false, true] {
            let hook = if foreign {
                other_thread_takes as fn(usize, usize) as usize
            } else {
                0
            };
            crate::os::REMAP_FAULT_HOOK.store(hook, SeqCst);
            TAKEN.store(0, SeqCst);
            let pool = HostPool::new();
            let z0 = pool.allocate(layout(6 * MIB)).unwrap();
            // The ranges right after and right before `z0` taken, so that
            // growing it must move it (in place, or into a free range next
            // to it, which the hook does not see, it would succeed whenever
            // a test running beside this one left that range free).
            let guards = [z0.as_ptr() as usize + 6 * MIB, z0.as_ptr() as usize - 4096]
                // SAFETY: maps only if nothing is mapped there.
                .map(|at| (at, unsafe { crate::os::map_fixed_noreplace(at, 4096) }));
            crate::os::REMAP_FAULT_AT.store(z0.as_ptr() as usize, SeqCst);
            // SAFETY: a live block of ours, freed once; it comes back below.
            unsafe { pool.free(z0).unwrap() };
            let (x, z, b) = grow_and_gather(&pool);
            crate::os::REMAP_FAULT_AT.store(0, SeqCst);
            crate::os::REMAP_FAULT_HOOK.store(0, SeqCst);
            for (at, ours) in guards {
                if ours {
                    // SAFETY: our page, mapped above, nobody else's.
                    unsafe { libc::munmap(at as *mut libc::c_void, 4096) };
                }
            }
            assert_eq!(z, z0);
            let taken = TAKEN.load(SeqCst);
            assert_eq!(taken != 0, foreign, "the injected failure happened");
            if foreign {
                assert_eq!(pool.stats().os_maps, 3, "a fresh mapping after giving up");
                // SAFETY: the "other thread's" mapping, left alone.
                assert_eq!(unsafe { (taken as *const u8).read() }, 0xAB);
                assert!(!pool.manages(taken as *const u8));
                // The 10 MiB span is gone, unless the fresh one took its range.
                let inside = (x.as_ptr() as usize).wrapping_sub(b.as_ptr() as usize) < 18 * MIB;
                assert!(inside || !pool.manages(x.as_ptr()));
            } else {
                assert_eq!(pool.stats().os_maps, 2, "the grown span is whole");
                let (xo, ..) = grown_layout(x, b);
                for o in (4096..10 * MIB).step_by(4096) {
                    // SAFETY: inside the live block `b`.
                    let v = unsafe { b.as_ptr().add(xo + o).read() };
                    assert_eq!(v, 5 ^ (o >> 12) as u8, "offset {o}");
                }
            }
            // 18 MiB for `b` and the 6 MiB span, back in its class.
            assert_eq!(pool.stats().reserved_bytes, 24 * MIB);
            fill(b, 18 * MIB, 8);
            check(b, 18 * MIB, 8);
            let z2 = pool.allocate(layout(6 * MIB)).unwrap();
            assert_eq!(z2, z0);
            for o in (4096..6 * MIB).step_by(4096) {
                // SAFETY: inside the live block `z2`.
                let v = unsafe { z2.as_ptr().add(o).read() };
                assert_eq!(v, 6 ^ (o >> 12) as u8, "offset {o}");
            }
            // SAFETY: live blocks of ours, freed once.
            unsafe {
                pool.free(z2).unwrap();
                pool.free(b).unwrap();
            }
            pool.flush_thread_cache();
            pool.trim();
            assert_eq!(pool.stats().reserved_bytes, 0);
            if foreign {
                // SAFETY: the hook's mapping, nobody else's.
                unsafe { libc::munmap(taken as *mut libc::c_void, 6 * MIB) };
            }
        }
    }

    #[test]
    fn classes_more_than_twice_apart_keep_their_spans() {
        let pool = HostPool::new();
        let big = layout(40 * MIB);
        let a = pool.allocate(big).unwrap();
        // SAFETY: allocated above with `big`.
        unsafe { pool.deallocate(a, big) };
        let small = layout(MIB);
        let b = pool.allocate(small).unwrap();
        assert_eq!(pool.stats().os_maps, 2);
        assert_eq!(
            pool.stats().reserved_bytes,
            span_bytes(class_of(40 * MIB)) + span_bytes(class_of(MIB))
        );
        // SAFETY: allocated above with `small`.
        unsafe { pool.deallocate(b, small) };
        // The big span is still there for the next big request.
        let c = pool.allocate(big).unwrap();
        assert_eq!(c, a);
        // SAFETY: allocated above with `big`.
        unsafe { pool.deallocate(c, big) };
    }

    #[test]
    fn spans_freed_on_another_thread_are_reused_too() {
        let pool = HostPool::new();
        let l = layout(18 * MIB);
        let a = pool.allocate(l).unwrap();
        let addr = a.as_ptr() as usize;
        std::thread::scope(|s| {
            s.spawn(|| {
                // SAFETY: the block is handed to this thread, freed once.
                unsafe { pool.deallocate(NonNull::new(addr as *mut u8).unwrap(), l) };
                pool.flush_thread_cache();
            });
        });
        let b = pool.allocate(layout(13 * MIB)).unwrap();
        assert_eq!(b.as_ptr() as usize, addr);
        assert_eq!(pool.stats().os_maps, 1);
        // SAFETY: allocated above with this layout.
        unsafe { pool.deallocate(b, layout(13 * MIB)) };
    }

    #[test]
    fn live_set_of_varying_big_sizes_stays_near_its_peak() {
        // 8 live blocks of 5–25 MiB, each replaced 200 times at random.
        let pool = HostPool::new();
        let mut rng = 0x1234_5678u64;
        let mut next = |n: usize| {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            (rng % n as u64) as usize
        };
        let mut live: Vec<(NonNull<u8>, Layout)> = Vec::new();
        let (mut bytes, mut peak) = (0usize, 0usize);
        for step in 0..200 {
            if live.len() == 8 {
                let (p, l) = live.swap_remove(next(8));
                bytes -= l.size();
                // SAFETY: allocated below with `l`.
                unsafe { pool.deallocate(p, l) };
            }
            let l = layout(5 * MIB + next(20 * MIB));
            let p = pool.allocate(l).unwrap();
            fill(p, l.size(), step as u8);
            live.push((p, l));
            bytes += l.size();
            peak = peak.max(bytes);
        }
        let reserved = pool.stats().reserved.peak as usize;
        // Without reuse across classes this was several times the peak.
        assert!(
            reserved <= peak + peak / 2,
            "peak reserved {reserved} for a live peak of {peak}"
        );
        for (p, l) in live {
            // SAFETY: allocated above with `l`.
            unsafe { pool.deallocate(p, l) };
        }
    }

    /// Word 1 of a block (where a free block carries its pool's key).
    fn key_word(p: NonNull<u8>) -> usize {
        // SAFETY: a live block of ≥ 16 bytes, 8-aligned.
        unsafe { p.as_ptr().cast::<usize>().add(1).read() }
    }

    /// A span that moves to another class (shrunk or grown, its block taken
    /// off the donor's free list, key and all) is handed out with a clear
    /// key word, frees normally as a block of its new class however the
    /// program filled it, and a second free of it is still detected: no
    /// stale key makes a first free look like a double one, and the span is
    /// on its new class's lists only.
    #[test]
    fn an_adopted_span_frees_as_its_new_class_and_double_frees_are_caught() {
        // Down (tail unmapped), checked in the thread cache; up (grown with
        // mremap), checked on the central list.
        for (from, to, flush) in [(20 * MIB, 11 * MIB, false), (9 * MIB, 15 * MIB, true)] {
            let what = format!("{from} -> {to}");
            let pool = HostPool::new();
            let a = pool.allocate(layout(from)).unwrap();
            // SAFETY: a live block of ours: word 1 now carries the key.
            unsafe { pool.free(a).unwrap() };
            let l = layout(to);
            let b = pool.allocate(l).unwrap();
            assert_eq!(pool.stats().os_maps, 1, "{what}: the span was reused");
            assert_eq!(key_word(b), 0, "{what}: handed out with the key cleared");
            assert_eq!(pool.usable_size(b.as_ptr()), Some(class_size(class_of(to))));
            // The program fills all of it, word 1 included.
            // SAFETY: a live block of `to` bytes.
            unsafe { b.as_ptr().write_bytes(0xA5, to) };
            // SAFETY: a live block of ours, freed once.
            unsafe { pool.free(b) }.expect("a first free is not a double free");
            if flush {
                pool.flush_thread_cache();
            }
            // SAFETY: `b` is free: the pool must refuse it and change nothing.
            let e = unsafe { pool.free(b) }.unwrap_err();
            assert_eq!(
                e,
                crate::error::AllocError::DoubleFree {
                    addr: b.as_ptr() as usize
                },
                "{what}"
            );
            // The block is on its new class's lists once, on no other's.
            let c = pool.allocate(l).unwrap();
            let d = pool.allocate(l).unwrap();
            assert_eq!(c, b, "{what}");
            assert_ne!(c, d, "{what}: one block handed out twice");
            // Cut down, the span left a 9 MiB tail that `d` grew from.
            let maps = if from > to { 1 } else { 2 };
            assert_eq!(pool.stats().os_maps, maps, "{what}");
            // SAFETY: allocated above with `l`.
            unsafe {
                pool.free(d).unwrap();
                pool.free(c).unwrap();
            }
            pool.flush_thread_cache();
            assert!(pool.trim() > 0);
            assert_eq!(pool.stats().reserved_bytes, 0, "{what}");
        }
    }

    /// Spans change class (shrunk, grown, moved by `mremap`) while another
    /// thread frees into the donor classes and a third reads span records
    /// lock-free (`owns`, `usable_size`, `manages` on addresses that were
    /// blocks a moment ago). Every block the allocating thread gets is whole
    /// and sized for its class; run under ThreadSanitizer by `ci/tsan.sh`
    /// (the records' fields are atomics).
    #[test]
    fn steals_race_lock_free_readers_and_cross_thread_frees() {
        use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
        use std::sync::{Arc, mpsc};
        use std::time::{Duration, Instant};
        let pool = HostPool::new();
        let seen: Arc<[AtomicUsize; 8]> = Arc::new([const { AtomicUsize::new(0) }; 8]);
        let sweeps = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, rx) = mpsc::channel::<(usize, usize)>();
        let freer = {
            let pool = pool.clone();
            std::thread::spawn(move || {
                for (p, size) in rx {
                    // SAFETY: handed over whole by the allocating thread.
                    unsafe { pool.deallocate(NonNull::new(p as *mut u8).unwrap(), layout(size)) };
                }
                pool.flush_thread_cache();
            })
        };
        let reader = {
            let (pool, seen, sweeps, stop) =
                (pool.clone(), seen.clone(), sweeps.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut hits = 0usize;
                while !stop.load(Ordering::Relaxed) {
                    for s in seen.iter() {
                        let p = s.load(Ordering::Relaxed) as *const u8;
                        hits += usize::from(pool.owns(p));
                        hits += pool.usable_size(p).unwrap_or(0) & 1;
                        hits += usize::from(pool.manages(p.wrapping_add(4096)));
                    }
                    sweeps.fetch_add(1, Ordering::Relaxed);
                }
                hits
            })
        };
        let mut rng = 0x9E37_79B9u64;
        let mut next = |n: usize| {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            (rng % n as u64) as usize
        };
        for round in 0..24 {
            let mut blocks = Vec::new();
            for slot in seen.iter() {
                let size = 5 * MIB + next(20 * MIB);
                let p = pool.allocate(layout(size)).unwrap();
                assert_eq!(
                    pool.usable_size(p.as_ptr()),
                    Some(class_size(class_of(size)))
                );
                // SAFETY: a live block of `size` bytes.
                unsafe {
                    p.as_ptr().write(round as u8);
                    p.as_ptr().add(size - 1).write(round as u8);
                }
                slot.store(p.as_ptr() as usize, Ordering::Relaxed);
                blocks.push((p, size));
            }
            for &(p, size) in &blocks {
                // SAFETY: live blocks written above; none overlaps another.
                unsafe {
                    assert_eq!(p.as_ptr().read(), round as u8);
                    assert_eq!(p.as_ptr().add(size - 1).read(), round as u8);
                }
            }
            // Waits for progress (the reader swept at least once), not time.
            let (start, t) = (sweeps.load(Ordering::Relaxed), Instant::now());
            while sweeps.load(Ordering::Relaxed) <= start {
                assert!(t.elapsed() < Duration::from_secs(120), "reader stuck");
                std::thread::yield_now();
            }
            for (i, (p, size)) in blocks.into_iter().enumerate() {
                // Every third block is first shrunk in place (its span cut
                // while the reader looks it up and the freer frees others).
                let (p, size) = if i % 3 == 1 {
                    use allocator_api2::alloc::Allocator;
                    let small = size / 2;
                    // SAFETY: live with `layout(size)`; the new one is smaller.
                    let q = unsafe { Allocator::shrink(&pool, p, layout(size), layout(small)) };
                    let q = q.unwrap().cast::<u8>();
                    // SAFETY: the block's first byte, kept by the shrink.
                    assert_eq!(unsafe { q.as_ptr().read() }, round as u8);
                    (q, small)
                } else {
                    (p, size)
                };
                if i % 2 == 0 {
                    tx.send((p.as_ptr() as usize, size)).unwrap();
                } else {
                    // SAFETY: allocated above with this layout.
                    unsafe { pool.deallocate(p, layout(size)) };
                }
            }
        }
        drop(tx);
        freer.join().unwrap();
        stop.store(true, Ordering::Relaxed);
        reader.join().unwrap();
        pool.flush_thread_cache();
        pool.trim();
        assert_eq!(pool.stats().reserved_bytes, 0, "every span accounted for");
    }

    /// Big blocks of random sizes (600 KiB – 40 MiB, across cuts, kept
    /// tails, grows and gathers), freed at random: every page of every live block keeps what was written to it
    /// until its free, every block is `usable_size` of its class and owned,
    /// and, with the model, the pool's reserved bytes are predicted exactly.
    #[test]
    fn moved_pages_never_disturb_live_blocks() {
        use super::super::model::PoolModel;
        use proptest::prelude::*;
        use proptest::test_runner::{Config, TestRunner};
        let mut runner = TestRunner::new(Config {
            cases: 16,
            failure_persistence: None,
            ..Config::default()
        });
        let ops = proptest::collection::vec(
            (any::<bool>(), 600usize << 10..40 << 20, any::<u8>()),
            60..120,
        );
        runner
            .run(&ops, |ops| {
                let pool = HostPool::new();
                let mut model = PoolModel::new(None);
                let mut live: Vec<(NonNull<u8>, usize, u8, usize)> = Vec::new();
                for (free, size, seed) in ops {
                    if free && !live.is_empty() {
                        let (p, size, seed, len) = live.swap_remove(seed as usize % live.len());
                        check(p, size, seed);
                        // SAFETY: allocated below with this layout, freed once.
                        unsafe { pool.deallocate(p, layout(size)) };
                        model.free(size, 64, len);
                    } else {
                        let p = pool.allocate(layout(size)).unwrap();
                        let len = model.alloc(size, 64);
                        prop_assert_eq!(
                            pool.usable_size(p.as_ptr()),
                            Some(class_size(class_of(size)))
                        );
                        fill(p, size, seed);
                        live.push((p, size, seed, len));
                    }
                    prop_assert_eq!(model.reserved().current, pool.stats().reserved.current);
                }
                for &(p, size, seed, _) in &live {
                    check(p, size, seed);
                    prop_assert!(pool.owns(p.as_ptr()));
                }
                Ok(())
            })
            .unwrap();
    }

    #[test]
    fn gather_from_prefers_the_biggest_span_in_the_gap_then_the_smallest_over_it() {
        let gap = 6 * MIB;
        let (c5, c6, c7, c9) = (
            class_of(5 * MIB),
            class_of(6 * MIB),
            class_of(7 * MIB),
            class_of(9 * MIB),
        );
        assert_eq!(gather_from(gap, true, |_| false), None);
        assert_eq!(
            gather_from(gap, true, |e| e == c5 || e == c6 || e == c9),
            Some(c6)
        );
        assert_eq!(gather_from(gap, true, |e| e == c5 || e == c9), Some(c5));
        assert_eq!(gather_from(gap, true, |e| e == c9 || e == c7), Some(c7));
        assert_eq!(
            gather_from(gap, true, |e| e < FIRST),
            None,
            "one-block classes only"
        );
    }

    #[test]
    fn donor_prefers_the_nearest_bigger_then_smaller_within_twice() {
        let c = class_of(12 * MIB);
        assert!(c >= FIRST && blocks_per_span(FIRST) == 1 && blocks_per_span(FIRST - 1) > 1);
        assert_eq!(donor(c, |_| false), None);
        assert_eq!(donor(c, |d| d == c + 1 || d == c + 3), Some(c + 1));
        assert_eq!(donor(c, |d| d == c - 1 || d == c + 3), Some(c + 3));
        assert_eq!(donor(c, |d| d == c - 1 || d == c - 4), Some(c - 1));
        // Never itself, never beyond 2× either way.
        assert_eq!(donor(c, |d| d == c), None);
        let far: Vec<usize> = (FIRST..NUM_CLASSES)
            .filter(|&d| span_bytes(d) > 2 * span_bytes(c) || 2 * span_bytes(d) < span_bytes(c))
            .collect();
        assert!(!far.is_empty());
        assert_eq!(donor(c, |d| far.contains(&d)), None);
        // Only one-block classes donate to the first one-block class.
        assert!(donor(FIRST, |d| d < FIRST).is_none());
    }

    /// Within budget (a quarter above the most ever in use) every tail is
    /// kept, however much is already free; over it, the old bound applies.
    #[test]
    fn tails_are_kept_within_budget_and_bounded_beyond_it() {
        // 100 MiB reserved, 30 MiB of it free: past the 32 MiB bound.
        assert_eq!(keep_tail(8 * MIB, 30 * MIB, 100 * MIB, 0), None);
        // The pool once had 80 MiB in use: 100 ≤ 80 + 20, within budget.
        assert_eq!(
            keep_tail(8 * MIB, 30 * MIB, 100 * MIB, 80 * MIB),
            Some(class_of(8 * MIB))
        );
        assert!(!over_budget(100 * MIB, 0, 80 * MIB));
        assert!(over_budget(100 * MIB, 1, 80 * MIB));
        // Bytes in use: reserved minus what lies free centrally, never below
        // the old peak.
        assert_eq!(note_used(50 * MIB, 100 * MIB, 30 * MIB), 70 * MIB);
        assert_eq!(note_used(90 * MIB, 100 * MIB, 30 * MIB), 90 * MIB);
        assert_eq!(note_used(0, 10 * MIB, 30 * MIB), 0);
    }

    /// Over budget, a request no class within 2× serves takes the pages of
    /// a far bigger free span instead of mapping fresh ones: the pool does
    /// not grow past a quarter above its peak use while it holds free
    /// memory enough.
    #[test]
    fn over_budget_a_far_bigger_free_span_gives_its_pages() {
        let pool = HostPool::new();
        let big = layout(40 * MIB);
        let a = pool.allocate(big).unwrap();
        fill(a, 40 * MIB, 5);
        // SAFETY: allocated above with `big`.
        unsafe { pool.deallocate(a, big) };
        pool.flush_thread_cache();
        let small = layout(MIB);
        let held: Vec<_> = (0..30)
            .map(|_| {
                let h = pool.allocate(small).unwrap();
                fill(h, MIB, 7);
                h
            })
            .collect();
        // The first ten are mapped fresh (within budget: the 40 MiB span
        // stays for the next 40 MiB request), the rest take its pages.
        // Without the budget the pool would reserve 40 + 30 MiB.
        let peak = pool.stats().reserved.peak as usize;
        assert!(peak <= 51 * MIB, "peak reserved {} MiB", peak >> 20);
        for h in held {
            check(h, MIB, 7);
            // SAFETY: allocated above with `small`, freed once.
            unsafe { pool.deallocate(h, small) };
        }
    }

    /// A realloc into a smaller big class keeps the block where it is, its
    /// bytes untouched, and its tail serves the next request of the tail's
    /// class without a mapping; a realloc into a bigger one copies.
    #[test]
    fn a_big_block_shrinks_in_place_and_its_tail_serves_without_a_mapping() {
        use allocator_api2::alloc::Allocator;
        let pool = HostPool::new();
        let a = pool.allocate(layout(20 * MIB)).unwrap();
        fill(a, 20 * MIB, 9);
        let maps = pool.stats().os_maps;
        // SAFETY: `a` is live with this layout; the new one is smaller.
        let b = unsafe { Allocator::shrink(&pool, a, layout(20 * MIB), layout(12 * MIB)) }.unwrap();
        assert_eq!(b.cast::<u8>(), a, "shrunk in place");
        assert_eq!(
            pool.usable_size(a.as_ptr()),
            Some(class_size(class_of(12 * MIB)))
        );
        // Its first 12 MiB are as they were.
        let kept = |p: NonNull<u8>| {
            for o in (0..12 * MIB).step_by(4096) {
                // SAFETY: inside a live block of at least 12 MiB.
                let v = unsafe { p.as_ptr().add(o).read() };
                assert_eq!(v, 9 ^ (o >> 12) as u8, "offset {o}");
            }
        };
        kept(a);
        let t = pool.allocate(layout(8 * MIB)).unwrap();
        assert_eq!(t.as_ptr() as usize, a.as_ptr() as usize + 12 * MIB);
        assert_eq!(
            pool.stats().os_maps,
            maps,
            "no mapping for the shrink or the tail"
        );
        // Grown back to 20 MiB: a new block, the 12 MiB copied.
        // SAFETY: `a` is live with the 12 MiB layout.
        let c = unsafe { Allocator::grow(&pool, a, layout(12 * MIB), layout(20 * MIB)) }.unwrap();
        let c = c.cast::<u8>();
        kept(c);
        // SAFETY: live blocks of ours, freed once each with their layouts.
        unsafe {
            pool.deallocate(t, layout(8 * MIB));
            pool.deallocate(c, layout(20 * MIB));
        }
        // The resized block frees into its new class, and a second free of
        // it is caught.
        // SAFETY: `a` was freed (moved by `grow`): a double free, detected.
        assert!(unsafe { pool.free(a) }.is_err());
        pool.flush_thread_cache();
        assert!(pool.trim() > 0);
        assert_eq!(pool.stats().reserved_bytes, 0);
    }
}
