//! Whole-program recording: with `TENSORPOOL_TRACE=path` in the environment
//! at start, [`TensorGlobalAlloc`](crate::TensorGlobalAlloc) (and so the C
//! ABI library, which runs on it) records every allocation, free and
//! realloc of the process to `path`.
//!
//! Nothing here allocates, panics or takes an allocating lock: the records
//! go to a static buffer of [`SLOTS`] records (2 MiB of `.bss`, touched only
//! when tracing) through a [`Recorder`], which writes them with raw
//! `write(2)` when the buffer is full and at exit (`atexit`). The state is
//! decided on the first allocation of the process (`getenv`, `open`), by
//! that thread; others wait for it, and allocations the recording machinery
//! itself makes meanwhile (glibc's `atexit` may) are not recorded.
//!
//! After a `fork()`, the child forgets the parent's unwritten records (the
//! parent writes them), and records its own to `path.<child pid>` (or stops
//! recording if that cannot be created). Records of threads still running
//! when `exit` flushes are lost, as are those of a process that ends with
//! `_exit` or a signal.

use super::format::TraceOp;
use super::recorder::{Recorder, Slot, write_all};
use crate::sync::{AtomicUsize, Ordering, yield_now};
use core::cell::UnsafeCell;

/// Records held before a write (2 MiB).
pub const SLOTS: usize = 1 << 16;

/// Longest `TENSORPOOL_TRACE` value accepted (longer ones: no recording).
const PATH_MAX: usize = 4000;

static BUFFER: [Slot; SLOTS] = [Slot::EMPTY; SLOTS];
static RECORDER: Recorder<&'static [Slot]> = Recorder::new(&BUFFER);

/// [`UNKNOWN`] → [`DECIDING`] → [`OFF`] or [`ON`].
static STATE: AtomicUsize = AtomicUsize::new(UNKNOWN);
/// The thread deciding (its `pthread_self`), so that re-entrant calls pass.
static DECIDER: AtomicUsize = AtomicUsize::new(0);
const UNKNOWN: usize = 0;
const DECIDING: usize = 1;
const OFF: usize = 2;
const ON: usize = 3;

/// The path, NUL-terminated, written once while deciding.
struct PathBuf(UnsafeCell<[u8; PATH_MAX + 32]>);
// SAFETY: written only by the deciding thread before `STATE` becomes `ON`
// (a release store), and by the child after `fork` (one thread); read only
// after an acquire load of `ON`.
unsafe impl Sync for PathBuf {}
static PATH: PathBuf = PathBuf(UnsafeCell::new([0; PATH_MAX + 32]));
/// Length of the path in `PATH` (without the NUL).
static PATH_LEN: AtomicUsize = AtomicUsize::new(0);

/// Whether this process records. One relaxed load once decided.
#[inline(always)]
pub(crate) fn enabled() -> bool {
    match STATE.load(Ordering::Relaxed) {
        ON => true,
        OFF => false,
        _ => decide(),
    }
}

/// Whether this process decided not to record: final (nothing turns
/// recording on after it was decided off), so a thread may remember it.
#[inline]
pub(crate) fn off_for_good() -> bool {
    STATE.load(Ordering::Relaxed) == OFF
}

/// Records an event (call [`enabled`] first).
#[inline(always)]
pub(crate) fn record(op: TraceOp, ptr: *const u8, size: usize, align: usize) {
    RECORDER.record(op, ptr as u64, size as u64, align, 0);
}

#[cold]
#[inline(never)]
fn decide() -> bool {
    // SAFETY: `pthread_self` has no preconditions and does not allocate.
    let me = unsafe { libc::pthread_self() } as usize;
    match STATE.compare_exchange(UNKNOWN, DECIDING, Ordering::Acquire, Ordering::Acquire) {
        Ok(_) => {
            DECIDER.store(me, Ordering::Relaxed);
            let on = open_from_env();
            STATE.store(if on { ON } else { OFF }, Ordering::Release);
            on
        }
        Err(DECIDING) if DECIDER.load(Ordering::Relaxed) == me => false,
        Err(_) => {
            while STATE.load(Ordering::Acquire) == DECIDING {
                yield_now();
            }
            STATE.load(Ordering::Relaxed) == ON
        }
    }
}

/// Reads `TENSORPOOL_TRACE`, creates the file, writes the header, registers
/// the exit flush. `false`: no recording (unset, empty, too long, or the
/// file cannot be created — then a line on stderr says so).
fn open_from_env() -> bool {
    // SAFETY: a NUL-terminated name; `getenv` does not allocate. The value
    // is copied out before anything could call `setenv`.
    let v = unsafe { libc::getenv(c"TENSORPOOL_TRACE".as_ptr()) };
    if v.is_null() {
        return false;
    }
    // SAFETY: a non-null `getenv` result is a NUL-terminated string.
    let bytes = unsafe { core::ffi::CStr::from_ptr(v) }.to_bytes();
    if bytes.is_empty() || bytes.len() > PATH_MAX {
        return false;
    }
    // SAFETY: only the deciding thread writes `PATH` (see `PathBuf`).
    let path = unsafe { &mut *PATH.0.get() };
    path[..bytes.len()].copy_from_slice(bytes);
    path[bytes.len()] = 0;
    PATH_LEN.store(bytes.len(), Ordering::Relaxed);
    if !create(path.as_ptr()) {
        return false;
    }
    // SAFETY: `flush_at_exit` is an `extern "C" fn()` valid for the life of
    // the process. glibc may allocate for the handler list; that allocation
    // sees `DECIDING` from this thread and is not recorded.
    unsafe { libc::atexit(flush_at_exit) };
    true
}

/// Creates the trace file at the NUL-terminated `path`, writes the header
/// and attaches it. `false` (and a line on stderr) if that fails.
fn create(path: *const u8) -> bool {
    // SAFETY: `path` is NUL-terminated; `open` does not allocate.
    let fd = unsafe {
        libc::open(
            path.cast(),
            libc::O_WRONLY | libc::O_CREAT | libc::O_TRUNC | libc::O_CLOEXEC,
            0o644,
        )
    };
    if fd < 0 || Recorder::<&[Slot]>::write_header(fd).is_err() {
        let _ = write_all(
            2,
            b"tensorpool: TENSORPOOL_TRACE: cannot create the trace file; not recording\n",
        );
        if fd >= 0 {
            // SAFETY: our own descriptor.
            unsafe { libc::close(fd) };
        }
        return false;
    }
    RECORDER.start(fd);
    true
}

extern "C" fn flush_at_exit() {
    if STATE.load(Ordering::Acquire) == ON {
        // Other threads may still be recording; wait a little for a slot
        // reserved but not yet published, then drop the rest.
        RECORDER.flush(1000);
    }
}

/// Writes the buffered records now (for tests and programs that end with
/// `_exit`). Does nothing when not recording.
pub fn flush() {
    if STATE.load(Ordering::Acquire) == ON {
        RECORDER.flush(usize::MAX);
    }
}

/// Whether this process is recording a trace (decides it if not yet).
pub fn is_recording() -> bool {
    enabled()
}

/// The `fork` child handler: forget the parent's records and record to
/// `path.<pid>`.
///
/// # Safety
/// - Called in the child of `fork()`, which has one thread.
pub(crate) unsafe fn after_fork_in_child() {
    if STATE.load(Ordering::Acquire) != ON {
        return;
    }
    if let Some(fd) = RECORDER.fd() {
        // SAFETY: the child's copy of the parent's descriptor; closing it
        // does not affect the parent.
        unsafe { libc::close(fd) };
    }
    // SAFETY: the child has one thread (caller).
    unsafe { RECORDER.reset_in_child() };
    let len = PATH_LEN.load(Ordering::Relaxed);
    // SAFETY: one thread; `PATH` has room for `PATH_MAX + 32` bytes and
    // `len ≤ PATH_MAX`.
    let path = unsafe { &mut *PATH.0.get() };
    // SAFETY: no preconditions.
    let pid = unsafe { libc::getpid() } as u64;
    if len + 23 > path.len() {
        // No room for ".<pid>" (a deep chain of forks of a long path).
        STATE.store(OFF, Ordering::Release);
        return;
    }
    let mut end = len;
    path[end] = b'.';
    end += 1;
    let mut buf = [0u8; 20];
    let digits = crate::global::decimal(pid, &mut buf);
    path[end..end + digits.len()].copy_from_slice(digits);
    end += digits.len();
    path[end] = 0;
    // The child's own path stays in `PATH` (a grandchild appends its pid).
    PATH_LEN.store(end, Ordering::Relaxed);
    if !create(path.as_ptr()) {
        STATE.store(OFF, Ordering::Release);
    }
}
