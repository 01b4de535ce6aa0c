//! `libtensorpool.so`: the tensorpool global pool behind the C allocation
//! ABI, so that `LD_PRELOAD=target/release/libtensorpool.so program` runs a
//! program on it.
//!
//! Exports `malloc`, `free`, `calloc`, `realloc`, `reallocarray`,
//! `posix_memalign`, `aligned_alloc`, `memalign`, `valloc`, `pvalloc`,
//! `malloc_usable_size` and `malloc_trim`. All of them go through one
//! [`TensorGlobalAlloc`], which is also this library's own
//! `#[global_allocator]`.
//!
//! # Alignment
//! `malloc` and friends return 16-byte aligned blocks from 16 bytes up (what
//! glibc promises and SSE code relies on) and 8-byte aligned ones below.
//! Alignments up to `MAX_ALIGN` (64 KiB) come from the pool; larger ones from
//! the C library's own `posix_memalign`.
//!
//! # Pointers the pool does not own
//! `free`, `realloc` and `malloc_usable_size` look a pointer up in the pool's
//! pagemap. A pointer **inside** memory the pool manages that does not start
//! a live block (an interior pointer such as `block + 16`, or one into a
//! free block) never reaches the C library: the call writes
//! `tensorpool: free(): invalid pointer` (`realloc(): …`,
//! `malloc_usable_size(): …`) to stderr with `write(2)` and aborts, as glibc
//! does for a pointer it did not hand out. Any other error the pool reports
//! for a free (a detected double free) aborts the same way with the error's
//! own message. A pointer outside the pool's memory (over-aligned blocks the
//! C library served, or memory allocated before this library was loaded) is
//! **forwarded** to the next definition of the same function, found with
//! `dlsym(RTLD_NEXT, …)` (glibc's), which treats it exactly as it would
//! without this library: a glibc block is freed, garbage makes glibc abort
//! with its own message. Nothing of the pool's is touched either way. The
//! next definitions are resolved in a constructor, before `main`; a
//! re-entrant `free` of a foreign pointer while `dlsym` runs (or in a static
//! binary, where there is no next definition) leaks the block rather than
//! guess.
//!
//! # Errors
//! On failure `malloc`, `calloc`, `realloc`, `reallocarray`, `aligned_alloc`,
//! `memalign`, `valloc` and `pvalloc` return null with `errno = ENOMEM`
//! (`EINVAL` for an invalid alignment); `posix_memalign` returns the code.
//!
//! # Giving memory back
//! `malloc_trim(pad)` trims the pool (this thread's cache is flushed, free
//! spans and cached huge blocks are unmapped, pages of other free blocks of
//! 8 KiB and up discarded) and then calls the C library's `malloc_trim`;
//! it returns 1 if either released memory. Two settings are read from the
//! environment once, before `main` (with `getenv`, no allocation), as a
//! byte count with an optional `K`/`M`/`G`/`T` suffix (powers of 1024):
//! - `TENSORPOOL_RETAIN_LIMIT`: the pool's retained-bytes limit (free
//!   memory kept cached; above it, frees of blocks of 1 MiB and up and of
//!   huge blocks unmap instead of caching).
//! - `TENSORPOOL_RETURN_ABOVE`: freeing a block of at least this many bytes
//!   that is a huge block (above 64 MiB) unmaps the pool's cached huge
//!   blocks, that one included, right away.
//!
//! A value that is not a byte count is ignored with a line on stderr.
//!
//! # Statistics
//! With `TENSORPOOL_CAPI_STATS=1` in the environment, the library writes one
//! line to stderr at exit (with `write(2)`, no allocation): the pool's
//! reserved bytes, segments and OS mappings, and how many calls were
//! forwarded to the C library. It proves the program really ran on the pool.
//!
//! # Thread-local storage
//! A `cdylib`'s thread-locals use the general-dynamic TLS model (a call to
//! `__tls_get_addr` per access) on stable Rust. Measured with
//! `ci/capi/bench.c` (a C loop of 2·10^7 `malloc(64)`+`free` pairs, best of
//! 5, 2-core VM, 2026-11-21): glibc 5.4–5.7 ns, this library 7.1–7.7 ns as
//! built on stable, 5.6–5.8 ns built with nightly
//! `RUSTFLAGS="-Z tls-model=initial-exec"` (`ci/capi.sh --tls` builds and
//! measures both). It matters (~2 ns a pair); initial-exec is safe here
//! because the library is loaded at start-up (`LD_PRELOAD`), not `dlopen`ed.
//! The size-less `free` also pays a pagemap lookup (three dependent loads).

use core::alloc::{GlobalAlloc, Layout};
use core::ffi::{CStr, c_int, c_void};
use core::ptr::null_mut;
use core::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use tp::host::size_class::{MAX_ALIGN, MAX_CLASS_SIZE};
use tp::{AllocError, TensorGlobalAlloc};

/// The C library's allocator, reached through `dlsym(RTLD_NEXT, …)`: the
/// inner allocator for alignments above `MAX_ALIGN`.
#[derive(Debug, Clone, Copy)]
pub struct NextLibc;

// SAFETY: `posix_memalign` returns blocks of at least `size` bytes at
// `align` (a power of two ≥ 64 KiB here, so a valid `posix_memalign`
// alignment) or fails, reported as null; `free` takes them back.
unsafe impl GlobalAlloc for NextLibc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let Some(f) = next::<PosixMemalignFn>(&NEXT_POSIX_MEMALIGN, c"posix_memalign") else {
            return null_mut();
        };
        let mut out = null_mut();
        // SAFETY: `out` is a valid out-pointer; the alignment is a power of
        // two and a multiple of `sizeof(void*)`.
        let r = unsafe { f(&mut out, layout.align(), layout.size()) };
        if r == 0 { out.cast() } else { null_mut() }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, _layout: Layout) {
        // SAFETY: `ptr` came from the next `posix_memalign` (caller).
        unsafe { next_free(ptr.cast()) }
    }
}

#[global_allocator]
static A: TensorGlobalAlloc<NextLibc> = TensorGlobalAlloc::with_inner(NextLibc);

type FreeFn = unsafe extern "C" fn(*mut c_void);
type ReallocFn = unsafe extern "C" fn(*mut c_void, usize) -> *mut c_void;
type PosixMemalignFn = unsafe extern "C" fn(*mut *mut c_void, usize, usize) -> c_int;
type UsableFn = unsafe extern "C" fn(*mut c_void) -> usize;
type TrimFn = unsafe extern "C" fn(usize) -> c_int;

static NEXT_FREE: AtomicUsize = AtomicUsize::new(0);
static NEXT_REALLOC: AtomicUsize = AtomicUsize::new(0);
static NEXT_POSIX_MEMALIGN: AtomicUsize = AtomicUsize::new(0);
static NEXT_USABLE: AtomicUsize = AtomicUsize::new(0);
static NEXT_TRIM: AtomicUsize = AtomicUsize::new(0);
/// `TENSORPOOL_RETURN_ABOVE`, or `usize::MAX` when unset.
static RETURN_ABOVE: AtomicUsize = AtomicUsize::new(usize::MAX);
/// Set while `dlsym` runs, so that a re-entrant call does not recurse.
static RESOLVING: AtomicBool = AtomicBool::new(false);

static STATS: AtomicBool = AtomicBool::new(false);
static FORWARDED: AtomicUsize = AtomicUsize::new(0);

/// The next definition of `name` as an `F` (a C function pointer type), or
/// `None` while another lookup runs or if there is none.
fn next<F: Copy>(slot: &AtomicUsize, name: &CStr) -> Option<F> {
    const { assert!(size_of::<F>() == size_of::<usize>()) };
    let mut f = slot.load(Ordering::Acquire);
    if f == 0 {
        if RESOLVING.swap(true, Ordering::Acquire) {
            return None;
        }
        // SAFETY: `RTLD_NEXT` with a NUL-terminated name; dlsym may call
        // back into malloc/calloc/free, which `RESOLVING` keeps from recursing.
        f = unsafe { libc::dlsym(libc::RTLD_NEXT, name.as_ptr()) } as usize;
        RESOLVING.store(false, Ordering::Release);
        if f == 0 {
            return None;
        }
        slot.store(f, Ordering::Release);
    }
    // SAFETY: `f` is the address of the C function `name`, whose type the
    // caller names as `F`; `F` is a pointer-sized fn pointer (asserted).
    Some(unsafe { core::mem::transmute_copy::<usize, F>(&f) })
}

/// Frees a block the pool does not own through the next `free`.
///
/// # Safety
/// - `p` is not the pool's and is what the next `free` accepts.
unsafe fn next_free(p: *mut c_void) {
    FORWARDED.fetch_add(1, Ordering::Relaxed);
    if let Some(f) = next::<FreeFn>(&NEXT_FREE, c"free") {
        // SAFETY: forwarded from the caller.
        unsafe { f(p) }
    }
}

#[used]
#[unsafe(link_section = ".init_array")]
static INIT: extern "C" fn() = init;

#[used]
#[unsafe(link_section = ".fini_array")]
static FINI: extern "C" fn() = fini;

/// Resolves the next definitions before `main` and reads the environment.
extern "C" fn init() {
    let _ = next::<FreeFn>(&NEXT_FREE, c"free");
    let _ = next::<ReallocFn>(&NEXT_REALLOC, c"realloc");
    let _ = next::<PosixMemalignFn>(&NEXT_POSIX_MEMALIGN, c"posix_memalign");
    let _ = next::<UsableFn>(&NEXT_USABLE, c"malloc_usable_size");
    let _ = next::<TrimFn>(&NEXT_TRIM, c"malloc_trim");
    if env(c"TENSORPOOL_CAPI_STATS").is_some_and(|v| v == b"1") {
        STATS.store(true, Ordering::Relaxed);
    }
    if let Some(n) = env_size(c"TENSORPOOL_RETAIN_LIMIT") {
        A.set_retain_limit(Some(n));
    }
    if let Some(n) = env_size(c"TENSORPOOL_RETURN_ABOVE") {
        RETURN_ABOVE.store(n, Ordering::Relaxed);
    }
}

/// The value of the environment variable `name`, if set. Called only from
/// the constructor, before any other thread can run `setenv`.
fn env(name: &CStr) -> Option<&'static [u8]> {
    // SAFETY: a NUL-terminated name.
    let v = unsafe { libc::getenv(name.as_ptr()) };
    if v.is_null() {
        return None;
    }
    // SAFETY: a non-null `getenv` result is a NUL-terminated string that
    // stays valid while the environment is not changed (see above).
    Some(unsafe { CStr::from_ptr(v) }.to_bytes())
}

/// The byte count in `name` (see the crate docs); a line on stderr and
/// `None` for a value that is not one.
fn env_size(name: &CStr) -> Option<usize> {
    let v = env(name)?;
    let n = tp::global::parse_size(v);
    if n.is_none() {
        let mut line = Line::new();
        line.push(b"tensorpool: ignoring ");
        line.push(name.to_bytes());
        line.push(b"=");
        line.push(v);
        line.push(b": not a byte count (digits, optionally K, M, G or T)\n");
        line.write_to_stderr();
    }
    n
}

/// Writes `tensorpool: {what}: {why}` to stderr (no allocation) and aborts
/// with `SIGABRT`, as glibc does when a program frees what it must not.
#[cold]
#[inline(never)]
fn die(what: &[u8], why: &dyn core::fmt::Display) -> ! {
    let mut line = Line::new();
    line.push(b"tensorpool: ");
    line.push(what);
    line.push(b": ");
    // `Line` never fails and never allocates; an error's `Display` writes
    // its fields into it.
    let _ = core::fmt::write(&mut line, format_args!("{why}"));
    line.push(b"\n");
    line.write_to_stderr();
    // SAFETY: no preconditions; never returns.
    unsafe { libc::abort() }
}

/// The message for a pointer inside the pool's memory that starts no live block.
struct InvalidPointer;

impl core::fmt::Display for InvalidPointer {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str("invalid pointer")
    }
}

/// Writes the statistics line if asked to.
extern "C" fn fini() {
    if !STATS.load(Ordering::Relaxed) {
        return;
    }
    let s = A.stats();
    let mut line = Line::new();
    line.push(b"tensorpool: reserved_bytes=");
    line.num(s.reserved_bytes);
    line.push(b" segments=");
    line.num(s.segments);
    line.push(b" os_maps=");
    line.num(s.os_maps);
    line.push(b" forwarded=");
    line.num(FORWARDED.load(Ordering::Relaxed));
    line.push(b"\n");
    line.write_to_stderr();
}

/// A fixed buffer for one line of text: no allocation, no formatting machinery.
struct Line {
    buf: [u8; 256],
    len: usize,
}

impl Line {
    fn new() -> Self {
        Line {
            buf: [0; 256],
            len: 0,
        }
    }

    fn write_to_stderr(&self) {
        // SAFETY: `buf[..len]` is initialised; fd 2 may be closed, then
        // `write` fails harmlessly.
        let _ = unsafe { libc::write(2, self.buf.as_ptr().cast(), self.len) };
    }

    fn push(&mut self, s: &[u8]) {
        let n = s.len().min(self.buf.len() - self.len);
        self.buf[self.len..self.len + n].copy_from_slice(&s[..n]);
        self.len += n;
    }

    fn num(&mut self, v: usize) {
        let mut buf = [0u8; 20];
        self.push(tp::global::decimal(v as u64, &mut buf));
    }
}

impl core::fmt::Write for Line {
    fn write_str(&mut self, s: &str) -> core::fmt::Result {
        self.push(s.as_bytes());
        Ok(())
    }
}

fn set_errno(e: c_int) {
    // SAFETY: `__errno_location` returns this thread's errno slot.
    unsafe { *libc::__errno_location() = e };
}

/// The alignment C callers may rely on for `size` bytes.
#[inline(always)]
fn malloc_align(size: usize) -> usize {
    if size >= 16 { 16 } else { 8 }
}

/// Allocates `size` bytes at `align` (a power of two), null with `ENOMEM`.
#[inline(always)]
fn alloc_aligned(size: usize, align: usize, zeroed: bool) -> *mut c_void {
    let Ok(layout) = Layout::from_size_align(size.max(1), align) else {
        set_errno(libc::ENOMEM);
        return null_mut();
    };
    // SAFETY: the size is non-zero.
    let p = unsafe {
        if zeroed {
            A.alloc_zeroed(layout)
        } else {
            A.alloc(layout)
        }
    };
    if p.is_null() {
        set_errno(libc::ENOMEM);
    }
    p.cast()
}

/// C `malloc`.
///
/// # Safety
/// - None beyond C's: the result is freed with this library's `free`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn malloc(size: usize) -> *mut c_void {
    alloc_aligned(size, malloc_align(size), false)
}

/// C `calloc`: zeroed, and `ENOMEM` if `n * size` overflows.
///
/// # Safety
/// - None beyond C's.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn calloc(n: usize, size: usize) -> *mut c_void {
    let Some(bytes) = n.checked_mul(size) else {
        set_errno(libc::ENOMEM);
        return null_mut();
    };
    alloc_aligned(bytes, malloc_align(bytes), true)
}

/// C `free`: the pool's blocks go back to the pool; a pointer inside the
/// pool's memory that starts no live block aborts; any other non-null
/// pointer goes to the next `free` (see the crate docs).
///
/// # Safety
/// - `p` is null or a live block from this library or the C library, not
///   used afterwards.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn free(p: *mut c_void) {
    if p.is_null() {
        return;
    }
    // One relaxed load when `TENSORPOOL_RETURN_ABOVE` is unset.
    let above = RETURN_ABOVE.load(Ordering::Relaxed);
    let give_back = above != usize::MAX
        && A.usable_size(p.cast())
            .is_some_and(|n| n > MAX_CLASS_SIZE && n >= above);
    // SAFETY: forwarded from the caller.
    match unsafe { A.try_free_unsized(p.cast()) } {
        Ok(()) => {
            if give_back {
                A.trim_huge();
            }
        }
        Err(AllocError::ForeignPointer { .. }) => {
            if A.manages(p.cast()) {
                die(b"free()", &InvalidPointer);
            }
            // SAFETY: outside the pool's memory, so the C library's (caller).
            unsafe { next_free(p) }
        }
        Err(e) => die(b"free()", &e),
    }
}

/// `malloc_trim` (glibc): trims the pool, then the C library; 1 if either
/// gave memory back, else 0. `pad` is passed on to the C library.
///
/// # Safety
/// - None beyond C's.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn malloc_trim(pad: usize) -> c_int {
    let ours = A.trim() > 0;
    let theirs = match next::<TrimFn>(&NEXT_TRIM, c"malloc_trim") {
        // SAFETY: glibc's `malloc_trim`, which takes any `pad`.
        Some(f) => (unsafe { f(pad) }) != 0,
        None => false,
    };
    c_int::from(ours || theirs)
}

/// C `realloc`: null `p` is `malloc`, size 0 frees and returns null (as
/// glibc does); a block the pool does not own goes to the next `realloc`.
///
/// # Safety
/// - `p` is null or a live block from this library or the C library; on
///   success it is not used afterwards.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn realloc(p: *mut c_void, size: usize) -> *mut c_void {
    if p.is_null() {
        // SAFETY: no preconditions.
        return unsafe { malloc(size) };
    }
    if size == 0 {
        // SAFETY: forwarded from the caller.
        unsafe { free(p) };
        return null_mut();
    }
    if !A.owns(p.cast()) {
        if A.manages(p.cast()) {
            die(b"realloc()", &InvalidPointer);
        }
        FORWARDED.fetch_add(1, Ordering::Relaxed);
        let Some(f) = next::<ReallocFn>(&NEXT_REALLOC, c"realloc") else {
            set_errno(libc::ENOMEM);
            return null_mut();
        };
        // SAFETY: a C library block (caller); the next `realloc` sets errno.
        return unsafe { f(p, size) };
    }
    if size > isize::MAX as usize - 16 {
        set_errno(libc::ENOMEM);
        return null_mut();
    }
    // SAFETY: 1. the pool owns `p` and the caller gives it up on success;
    // 2. `size > 0`, the alignment is 8 or 16, and `size + 16 ≤ isize::MAX`.
    let q = unsafe { A.realloc_unsized(p.cast(), size, malloc_align(size)) };
    if q.is_null() {
        set_errno(libc::ENOMEM);
    }
    q.cast()
}

/// `reallocarray` (glibc, BSD): `realloc` with an overflow-checked product.
///
/// # Safety
/// - As for [`realloc`].
#[unsafe(no_mangle)]
pub unsafe extern "C" fn reallocarray(p: *mut c_void, n: usize, size: usize) -> *mut c_void {
    let Some(bytes) = n.checked_mul(size) else {
        set_errno(libc::ENOMEM);
        return null_mut();
    };
    // SAFETY: forwarded from the caller.
    unsafe { realloc(p, bytes) }
}

/// POSIX `posix_memalign`: `EINVAL` unless `align` is a power of two and a
/// multiple of `sizeof(void*)`, `ENOMEM` when out of memory; `*out` is set
/// only on success.
///
/// # Safety
/// - `out` is valid for a pointer write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn posix_memalign(out: *mut *mut c_void, align: usize, size: usize) -> c_int {
    if !align.is_power_of_two() || !align.is_multiple_of(size_of::<*mut c_void>()) {
        return libc::EINVAL;
    }
    let saved = errno();
    let p = alloc_aligned(size, align, false);
    if p.is_null() {
        set_errno(saved);
        return libc::ENOMEM;
    }
    // SAFETY: `out` is valid for writes (caller).
    unsafe { *out = p };
    0
}

fn errno() -> c_int {
    // SAFETY: `__errno_location` returns this thread's errno slot.
    unsafe { *libc::__errno_location() }
}

/// C11 `aligned_alloc`: `EINVAL` unless `align` is a power of two (glibc
/// accepts any power of two and any size, and so do we).
///
/// # Safety
/// - None beyond C's.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn aligned_alloc(align: usize, size: usize) -> *mut c_void {
    if !align.is_power_of_two() {
        set_errno(libc::EINVAL);
        return null_mut();
    }
    alloc_aligned(size, align.max(malloc_align(size)), false)
}

/// Obsolete `memalign`: like glibc, an alignment that is not a power of two
/// is rounded up to one.
///
/// # Safety
/// - None beyond C's.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memalign(align: usize, size: usize) -> *mut c_void {
    let Some(align) = align.checked_next_power_of_two() else {
        set_errno(libc::EINVAL);
        return null_mut();
    };
    alloc_aligned(size, align.max(malloc_align(size)), false)
}

/// Obsolete `valloc`: page aligned.
///
/// # Safety
/// - None beyond C's.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn valloc(size: usize) -> *mut c_void {
    alloc_aligned(size, page_size(), false)
}

/// Obsolete `pvalloc`: page aligned, size rounded up to whole pages.
///
/// # Safety
/// - None beyond C's.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn pvalloc(size: usize) -> *mut c_void {
    let page = page_size();
    let Some(rounded) = size.max(1).checked_next_multiple_of(page) else {
        set_errno(libc::ENOMEM);
        return null_mut();
    };
    alloc_aligned(rounded, page, false)
}

fn page_size() -> usize {
    // SAFETY: `sysconf` has no preconditions.
    let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if p > 0 { p as usize } else { 4096 }
}

/// `malloc_usable_size`: the pool block's class size, 0 for null, an abort
/// for a pointer inside the pool's memory that starts no block, and the
/// next definition's answer for any other pointer.
///
/// # Safety
/// - `p` is null or a live block from this library or the C library.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn malloc_usable_size(p: *mut c_void) -> usize {
    if p.is_null() {
        return 0;
    }
    if let Some(n) = A.usable_size(p.cast()) {
        return n;
    }
    if A.manages(p.cast()) {
        die(b"malloc_usable_size()", &InvalidPointer);
    }
    FORWARDED.fetch_add(1, Ordering::Relaxed);
    match next::<UsableFn>(&NEXT_USABLE, c"malloc_usable_size") {
        // SAFETY: a C library block (caller).
        Some(f) => unsafe { f(p) },
        None => 0,
    }
}

// `MAX_ALIGN` is where the pool stops; keep the docs above honest.
const _: () = assert!(MAX_ALIGN == 64 << 10);
