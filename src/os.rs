//! Pages from the OS: `mmap`/`munmap`/`madvise` through `libc`.
//!
//! Nothing here allocates, locks or panics, so all of it is usable inside
//! `GlobalAlloc`.

use core::ptr::NonNull;

/// The OS page size assumed for alignment promises. Checked against
/// `sysconf(_SC_PAGESIZE)` in tests; larger pages only make blocks *more*
/// aligned than promised, never less, because spans are granule aligned.
pub(crate) const PAGE: usize = 4096;

/// Maps `len` bytes (a multiple of `align`, `align` a power of two ≥ PAGE),
/// read-write, private, aligned to `align`. With `populate`, the kernel
/// faults every page in up front (`MAP_POPULATE`). `None` if the OS refuses.
/// A fresh private anonymous read-write mapping of `len` bytes where the
/// kernel chooses (`MAP_NORESERVE`; `MAP_POPULATE` with `populate`).
fn mmap_anon(len: usize, populate: bool) -> Option<*mut libc::c_void> {
    let mut flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE;
    if populate {
        flags |= libc::MAP_POPULATE;
    }
    // SAFETY: an anonymous private mapping at an address of the kernel's
    // choosing touches no existing memory.
    let raw = unsafe {
        libc::mmap(
            core::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            flags,
            -1,
            0,
        )
    };
    (raw != libc::MAP_FAILED).then_some(raw)
}

pub(crate) fn map_aligned(len: usize, align: usize, populate: bool) -> Option<NonNull<u8>> {
    debug_assert!(align.is_power_of_two() && align >= PAGE && len.is_multiple_of(PAGE));
    let over = len.checked_add(align - PAGE)?;
    if align > PAGE && !populate {
        // Exact size first: the kernel tends to place a mapping right below
        // the previous one, so when every span is a multiple of the alignment
        // most come out aligned and one syscall suffices (mimalloc does the
        // same). Otherwise fall back to over-mapping and trimming.
        let raw = mmap_anon(len, false)?;
        if (raw as usize).is_multiple_of(align) {
            return NonNull::new(raw.cast());
        }
        // SAFETY: the misaligned mapping we just made; nobody knows of it.
        unsafe { libc::munmap(raw, len) };
    }
    let raw = mmap_anon(over, populate)?;
    let start = raw as usize;
    let aligned = (start + align - 1) & !(align - 1);
    let head = aligned - start;
    let tail = over - head - len;
    if head > 0 {
        // SAFETY: [start, aligned) is the unaligned head of the mapping we
        // just made, a whole number of pages; nobody else knows of it.
        unsafe { libc::munmap(raw, head) };
    }
    if tail > 0 {
        // SAFETY: [aligned+len, start+over) is our mapping's unused tail,
        // page aligned because `len` and `aligned` are.
        unsafe { libc::munmap((aligned + len) as *mut libc::c_void, tail) };
    }
    NonNull::new(aligned as *mut u8)
}

/// The transparent huge page size assumed (x86-64 and aarch64 with 4 KiB base pages).
pub(crate) const HUGE_PAGE: usize = crate::host::size_class::HUGE_PAGE;

/// Maps a span of `len` bytes (a multiple of `GRANULE`) for the pool: aligned to
/// `granule`, or, with `huge` and `len ≥ HUGE_PAGE`, to 2 MiB and advised
/// `MADV_HUGEPAGE`, so the kernel can back it with huge pages (one fault per
/// 2 MiB instead of 512). With `populate`, every page is faulted in up front —
/// after the advice, so the pages it faults in can be huge ones.
pub(crate) fn map_span(
    len: usize,
    granule: usize,
    populate: bool,
    huge: bool,
) -> Option<NonNull<u8>> {
    if !(huge && len >= HUGE_PAGE) {
        return map_aligned(len, granule, populate);
    }
    let p = map_aligned(len, HUGE_PAGE.max(granule), false)?;
    // SAFETY: our fresh mapping.
    unsafe { advise_huge(p.as_ptr() as usize, len) };
    if populate {
        populate_pages(p.as_ptr(), len);
    }
    Some(p)
}

/// Advises `[p, p + len)` `MADV_HUGEPAGE`: pages faulted there later may be
/// huge ones. The advice only changes how the range is backed.
///
/// # Safety
/// - The range is one of the caller's mappings.
pub(crate) unsafe fn advise_huge(p: usize, len: usize) {
    // SAFETY: the caller's mapping (contract); advice moves no data.
    unsafe { libc::madvise(p as *mut libc::c_void, len, libc::MADV_HUGEPAGE) };
}

/// Faults in every page of a fresh mapping: `MADV_POPULATE_WRITE` (Linux 5.14),
/// or one write per page where the kernel lacks it.
fn populate_pages(p: *mut u8, len: usize) {
    const MADV_POPULATE_WRITE: libc::c_int = 23;
    // SAFETY: `[p, p+len)` is our fresh private mapping.
    if unsafe { libc::madvise(p.cast(), len, MADV_POPULATE_WRITE) } == 0 {
        return;
    }
    let mut off = 0;
    while off < len {
        // SAFETY: inside our fresh mapping; fresh anonymous memory is zero,
        // so writing zero changes nothing but residency.
        unsafe { p.add(off).write_volatile(0) };
        off += PAGE;
    }
}

/// Ranges waiting to be unmapped, coalesced when flushed.
///
/// The kernel merges neighbouring anonymous mappings into one VMA, so
/// unmapping spans one by one splits that VMA (and shoots down TLBs) every
/// time. Trim collects the ranges it releases here (a fixed array: no
/// allocation while pool locks are held), sorts them, joins the adjacent
/// ones and unmaps each run with one call. Flushed on drop.
pub(crate) struct UnmapBatch {
    ranges: [(usize, usize); 128],
    n: usize,
}

impl UnmapBatch {
    pub(crate) const fn new() -> Self {
        UnmapBatch {
            ranges: [(0, 0); 128],
            n: 0,
        }
    }

    /// Queues `[base, base+len)` for unmapping.
    ///
    /// # Safety
    /// - As for [`unmap`]: the range is a page-aligned part of a mapping from
    ///   [`map_aligned`] that nothing refers to any more. It stays mapped
    ///   until the flush, so no other mapping can take its place before.
    pub(crate) unsafe fn push(&mut self, base: usize, len: usize) {
        if self.n == self.ranges.len() {
            self.flush();
        }
        self.ranges[self.n] = (base, len);
        self.n += 1;
    }

    /// Unmaps everything queued.
    pub(crate) fn flush(&mut self) {
        let r = &mut self.ranges[..self.n];
        r.sort_unstable_by_key(|&(b, _)| b);
        let mut i = 0;
        while i < r.len() {
            let (start, mut end) = (r[i].0, r[i].0 + r[i].1);
            i += 1;
            while i < r.len() && r[i].0 == end {
                end += r[i].1;
                i += 1;
            }
            // SAFETY: every queued range met `unmap`'s contract (see `push`),
            // and adjacent ones together are one such range.
            unsafe { unmap(NonNull::new_unchecked(start as *mut u8), end - start) };
        }
        self.n = 0;
    }
}

impl Drop for UnmapBatch {
    fn drop(&mut self) {
        self.flush();
    }
}

/// Unmaps a region.
///
/// # Safety
/// - `[ptr, ptr+len)` was mapped by [`map_aligned`] (whole, or a page-aligned
///   part of it) and nothing refers to its memory any more.
pub(crate) unsafe fn unmap(ptr: NonNull<u8>, len: usize) {
    // SAFETY: the caller guarantees the range is ours and unused.
    let r = unsafe { libc::munmap(ptr.as_ptr().cast(), len) };
    debug_assert_eq!(r, 0);
}

/// Resizes the mapping `[old, old+old_len)` to `new_len` bytes with
/// `mremap`: in place (`dst` is `None`; fails if the range after it is
/// taken), or by moving its pages, without copying, over `dst`, a mapping
/// of `new_len` bytes that it replaces. On success the old range is gone
/// when moved; on failure nothing changed. Returns whether it worked.
///
/// # Safety
/// - `[old, old+old_len)` was mapped by [`map_aligned`] and the caller owns
///   it; `dst`, if any, is a whole mapping of `new_len` bytes from
///   `map_aligned` that nothing refers to.
pub(crate) unsafe fn remap(
    old: NonNull<u8>,
    old_len: usize,
    new_len: usize,
    dst: Option<NonNull<u8>>,
) -> bool {
    #[cfg(test)]
    if let Some(d) = dst {
        use core::sync::atomic::Ordering::SeqCst;
        if REMAP_FAULT_AT.load(SeqCst) == old.as_ptr() as usize {
            // What the kernel may do: unmap the destination, then fail.
            // SAFETY: `d` is the caller's fresh mapping.
            unsafe { libc::munmap(d.as_ptr().cast(), new_len) };
            let hook = REMAP_FAULT_HOOK.load(SeqCst);
            if hook != 0 {
                // SAFETY: the test stored a `fn(usize, usize)` there.
                let f: fn(usize, usize) = unsafe { core::mem::transmute(hook) };
                f(d.as_ptr() as usize, new_len);
            }
            return false;
        }
    }
    let old = old.as_ptr().cast();
    // SAFETY: the caller owns both ranges; `mremap` either resizes/moves
    // them as asked or fails without touching them.
    let r = unsafe {
        match dst {
            None => libc::mremap(old, old_len, new_len, 0),
            Some(d) => libc::mremap(
                old,
                old_len,
                new_len,
                libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED,
                d.as_ptr().cast::<libc::c_void>(),
            ),
        }
    };
    r != libc::MAP_FAILED
}

/// Gives back the destination of a failed moving [`remap`] without touching
/// anything that is not ours. With `MREMAP_FIXED` the kernel unmaps the
/// destination before it can still fail, and another thread may have mapped
/// the range since; so the range is taken back only where nothing is mapped
/// (`MAP_FIXED_NOREPLACE`) and then unmapped. Where something is mapped, it
/// cannot be told apart from our own untouched reservation (which the kernel
/// left in place if it failed early), so it is left alone: at worst that
/// leaks address space that was never touched (no memory).
///
/// # Safety
/// - `[dst, dst+len)` was a whole mapping from [`map_aligned`] passed to a
///   moving `remap` that failed, and nothing of ours refers to it.
pub(crate) unsafe fn release_failed_remap_target(dst: NonNull<u8>, len: usize) {
    // SAFETY: MAP_FIXED_NOREPLACE never replaces an existing mapping; on a
    // kernel before 4.17 it is a hint, and a mapping elsewhere is ours alone.
    let raw = unsafe {
        libc::mmap(
            dst.as_ptr().cast(),
            len,
            libc::PROT_NONE,
            libc::MAP_PRIVATE
                | libc::MAP_ANONYMOUS
                | libc::MAP_NORESERVE
                | libc::MAP_FIXED_NOREPLACE,
            -1,
            0,
        )
    };
    if raw != libc::MAP_FAILED {
        // SAFETY: the mapping we just made (at `dst` or, on an old kernel,
        // wherever it landed): nothing else knows of it.
        unsafe { libc::munmap(raw, len) };
    }
}

/// Test hook: a moving [`remap`] of the mapping at this address fails after
/// unmapping its destination, and calls [`REMAP_FAULT_HOOK`] in between.
#[cfg(test)]
pub(crate) static REMAP_FAULT_AT: core::sync::atomic::AtomicUsize =
    core::sync::atomic::AtomicUsize::new(0);
/// Maps `[dst, dst + len)` (page aligned), readable and writable, fresh,
/// only if nothing is mapped there (`MAP_FIXED_NOREPLACE`, Linux 4.17; an
/// older kernel's mapping elsewhere is undone). Returns whether it did.
///
/// # Safety
/// - If the range is free, the caller may take it (it was the caller's
///   before, it extends one of the caller's mappings, or the caller is a
///   test standing in for another thread).
pub(crate) unsafe fn map_fixed_noreplace(dst: usize, len: usize) -> bool {
    // SAFETY: MAP_FIXED_NOREPLACE never replaces an existing mapping.
    let raw = unsafe {
        libc::mmap(
            dst as *mut libc::c_void,
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED_NOREPLACE,
            -1,
            0,
        )
    };
    if raw == libc::MAP_FAILED {
        return false;
    }
    if raw as usize != dst {
        // An old kernel took the address as a hint: not ours to keep.
        // SAFETY: the mapping just made, known to nobody else.
        unsafe { libc::munmap(raw, len) };
        return false;
    }
    true
}

/// Held by each test that sets [`REMAP_FAULT_AT`] (tests run in parallel).
#[cfg(test)]
pub(crate) static REMAP_FAULT_LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
/// Test hook: what "another thread" does with the destination meanwhile
/// (a `fn(usize, usize)` as `usize`).
#[cfg(test)]
pub(crate) static REMAP_FAULT_HOOK: core::sync::atomic::AtomicUsize =
    core::sync::atomic::AtomicUsize::new(0);

/// Tells the OS it may drop the physical pages in the page-aligned interior of
/// `[ptr, ptr+len)`; they read as zero when touched again. Returns the bytes
/// advised.
///
/// # Safety
/// - The range lies inside a mapping from [`map_aligned`] and nobody relies
///   on its contents any more.
pub(crate) unsafe fn discard(ptr: *mut u8, len: usize) -> usize {
    let start = (ptr as usize + PAGE - 1) & !(PAGE - 1);
    let end = (ptr as usize + len) & !(PAGE - 1);
    if end <= start {
        return 0;
    }
    // SAFETY: the caller guarantees the range is our mapping and unused;
    // MADV_DONTNEED on private anonymous memory only drops page contents.
    let r = unsafe { libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_DONTNEED) };
    if r == 0 { end - start } else { 0 }
}

/// Resident set size of this process in bytes (Linux `/proc/self/statm`),
/// read with raw syscalls so it allocates nothing. `None` where unavailable.
pub fn resident_bytes() -> Option<usize> {
    let mut buf = [0u8; 128];
    // SAFETY: a NUL-terminated literal path; the fd is closed below.
    let fd = unsafe {
        libc::open(
            c"/proc/self/statm".as_ptr(),
            libc::O_RDONLY | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return None;
    }
    // SAFETY: `buf` is valid for `buf.len()` bytes of writes.
    let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
    // SAFETY: `fd` is ours and open.
    unsafe { libc::close(fd) };
    if n <= 0 {
        return None;
    }
    let text = &buf[..n as usize];
    let mut fields = text.split(|&b| b == b' ');
    fields.next()?;
    let pages = fields
        .next()?
        .iter()
        .take_while(|b| b.is_ascii_digit())
        .fold(0usize, |a, &b| a * 10 + usize::from(b - b'0'));
    Some(pages * PAGE)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_size_matches() {
        // SAFETY: sysconf has no preconditions.
        let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as usize;
        assert!(p >= PAGE && p.is_multiple_of(PAGE), "page size {p}");
    }

    #[test]
    fn map_is_aligned_and_writable() {
        let len = 256 << 10;
        let p = map_aligned(len, 64 << 10, false).unwrap();
        assert_eq!(p.as_ptr() as usize % (64 << 10), 0);
        // SAFETY: freshly mapped, `len` bytes, ours.
        unsafe {
            p.as_ptr().write_bytes(0xAB, len);
            assert_eq!(*p.as_ptr().add(len - 1), 0xAB);
            assert_eq!(discard(p.as_ptr(), len), len);
            assert_eq!(*p.as_ptr().add(len - 1), 0, "discarded pages read as zero");
            unmap(p, len);
        }
        assert!(resident_bytes().unwrap() > 0);
    }
}
