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
pub(crate) fn map_aligned(len: usize, align: usize, populate: bool) -> Option<NonNull<u8>> {
    debug_assert!(align.is_power_of_two() && align >= PAGE && len % PAGE == 0);
    let over = len.checked_add(align - PAGE)?;
    let mut flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE;
    if populate {
        flags |= libc::MAP_POPULATE;
    }
    // SAFETY: an anonymous private mapping at an address of the kernel's
    // choosing touches no existing memory.
    let raw = unsafe {
        libc::mmap(
            core::ptr::null_mut(),
            over,
            libc::PROT_READ | libc::PROT_WRITE,
            flags,
            -1,
            0,
        )
    };
    if raw == libc::MAP_FAILED {
        return None;
    }
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
        assert!(p >= PAGE && p % PAGE == 0, "page size {p}");
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
