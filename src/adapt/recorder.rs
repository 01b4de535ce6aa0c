//! [`Recorder`]: a fixed buffer of trace records filled without locks or
//! allocation, and written to a file descriptor with raw `write(2)`.
//!
//! Writers reserve a slot with one `fetch_add` on `reserved`, fill its first
//! three words, then publish it by storing the fourth (op, alignment, stream,
//! thread: never zero, because the op is 1 or 2) with `Release`. A writer
//! that finds the buffer full (`reserved ≥ capacity`) takes the flush lock (a
//! [`RawLock`]: a flag, no heap) and, if the buffer is still full, drains it.
//! Draining closes the buffer to writers (`reserved := capacity`), waits
//! until every reserved slot is published, writes the slots' bytes with
//! `write(2)`, clears the publish words and reopens it (`reserved := 0`).
//!
//! Invariants, with `n = min(reserved, capacity)`:
//! - slots `n..capacity` have a zero publish word;
//! - a slot's publish word is non-zero iff its writer has finished it;
//! - while the flush lock's holder drains, `reserved ≥ capacity`, so nobody
//!   writes a slot.
//!
//! The slots hold their words little-endian (`to_le`), so the buffer's bytes
//! are the file format's records (see [`format`](super::format)) on every
//! host.

use super::format::{HEADER_LEN, RECORD_LEN, TraceOp, header, pack};
use crate::sync::{AtomicU64, AtomicUsize, Ordering, RawLock, spin_hint, thread_number, yield_now};

/// The clock is read once every this many records (by the record whose slot
/// index is a multiple of it); the others carry the last reading.
pub const TIME_SAMPLE: usize = 64;

/// No file descriptor.
const NO_FD: usize = usize::MAX;

/// One record in the buffer: four little-endian words (time, id, size, and
/// op/align/stream/thread, which publishes the slot).
#[repr(C, align(32))]
#[derive(Debug)]
pub(crate) struct Slot {
    w: [AtomicU64; 4],
}

const _: () = assert!(size_of::<Slot>() == RECORD_LEN);

impl Slot {
    /// An unpublished slot (`const` so that static buffers live in `.bss`).
    #[allow(clippy::declare_interior_mutable_const)]
    pub(crate) const EMPTY: Slot = Slot {
        w: [const { AtomicU64::new(0) }; 4],
    };
}

/// A record buffer over the slots `S` (a static array or a boxed slice).
#[derive(Debug)]
pub(crate) struct Recorder<S: AsRef<[Slot]>> {
    slots: S,
    /// Slots handed out since the last drain (may run past the capacity
    /// while the buffer is full).
    reserved: AtomicUsize,
    /// Serialises drains.
    lock: RawLock,
    /// The file descriptor records go to, or [`NO_FD`].
    fd: AtomicUsize,
    /// The last clock reading, in ns since `base`.
    time: AtomicU64,
    /// The clock at the start, in ns (`CLOCK_MONOTONIC`).
    base: AtomicU64,
    /// Records written to the file so far.
    written: AtomicU64,
    /// The `errno` of the first failed write, 0 if none.
    write_error: AtomicUsize,
}

/// `CLOCK_MONOTONIC` in ns, without allocating.
fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid out-pointer; `clock_gettime` does not allocate.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64)
        .wrapping_mul(1_000_000_000)
        .wrapping_add(ts.tv_nsec as u64)
}

/// `errno` of the calling thread.
fn errno() -> i32 {
    // SAFETY: `__errno_location` returns this thread's errno slot.
    unsafe { *libc::__errno_location() }
}

/// Writes all of `buf` to `fd` (retrying short writes and `EINTR`); the
/// `errno` on failure.
pub(crate) fn write_all(fd: i32, mut buf: &[u8]) -> Result<(), i32> {
    while !buf.is_empty() {
        // SAFETY: `buf` is valid for reads of its length.
        let n = unsafe { libc::write(fd, buf.as_ptr().cast(), buf.len()) };
        if n < 0 {
            let e = errno();
            if e == libc::EINTR {
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            return Err(libc::EIO);
        }
        buf = &buf[n as usize..];
    }
    Ok(())
}

impl<S: AsRef<[Slot]>> Recorder<S> {
    /// A recorder over `slots` (all unpublished), not yet attached to a file.
    pub(crate) const fn new(slots: S) -> Self {
        Recorder {
            slots,
            reserved: AtomicUsize::new(0),
            lock: RawLock::new(),
            fd: AtomicUsize::new(NO_FD),
            time: AtomicU64::new(0),
            base: AtomicU64::new(0),
            written: AtomicU64::new(0),
            write_error: AtomicUsize::new(0),
        }
    }

    /// Attaches `fd` (the caller has written the header) and starts the clock.
    pub(crate) fn start(&self, fd: i32) {
        self.base.store(monotonic_ns(), Ordering::Relaxed);
        self.time.store(0, Ordering::Relaxed);
        self.fd.store(fd as usize, Ordering::Release);
    }

    /// Writes the file header to `fd`.
    pub(crate) fn write_header(fd: i32) -> Result<(), i32> {
        const H: [u8; HEADER_LEN] = header();
        write_all(fd, &H)
    }

    /// The attached file descriptor, if any.
    pub(crate) fn fd(&self) -> Option<i32> {
        match self.fd.load(Ordering::Acquire) {
            NO_FD => None,
            fd => Some(fd as i32),
        }
    }

    /// Records written to the file so far.
    pub(crate) fn written(&self) -> u64 {
        self.written.load(Ordering::Relaxed)
    }

    /// The `errno` of the first failed write, if any.
    pub(crate) fn write_error(&self) -> Option<i32> {
        match self.write_error.load(Ordering::Relaxed) {
            0 => None,
            e => Some(e as i32),
        }
    }

    /// Appends one record. Never allocates, never panics; blocks only while
    /// another thread drains a full buffer.
    #[inline]
    pub(crate) fn record(&self, op: TraceOp, id: u64, size: u64, align: usize, stream: u16) {
        let packed = pack(op, align.trailing_zeros() as u8, stream, thread_number());
        let slots = self.slots.as_ref();
        loop {
            let i = self.reserved.fetch_add(1, Ordering::Acquire);
            if let Some(slot) = slots.get(i) {
                let t = if i.is_multiple_of(TIME_SAMPLE) {
                    let t = monotonic_ns().wrapping_sub(self.base.load(Ordering::Relaxed));
                    self.time.store(t, Ordering::Relaxed);
                    t
                } else {
                    self.time.load(Ordering::Relaxed)
                };
                slot.w[0].store(t.to_le(), Ordering::Relaxed);
                slot.w[1].store(id.to_le(), Ordering::Relaxed);
                slot.w[2].store(size.to_le(), Ordering::Relaxed);
                slot.w[3].store(packed.to_le(), Ordering::Release);
                return;
            }
            self.drain_full();
        }
    }

    #[cold]
    #[inline(never)]
    fn drain_full(&self) {
        let cap = self.slots.as_ref().len();
        self.lock.with(|| {
            if self.reserved.load(Ordering::Acquire) >= cap {
                self.drain_locked(usize::MAX);
            }
        });
    }

    /// Writes every published record to the file and empties the buffer.
    /// `patience` bounds the yields spent waiting for a writer that reserved
    /// a slot but has not published it (at exit such a thread may never run
    /// again): records from the first unpublished slot on are then dropped.
    pub(crate) fn flush(&self, patience: usize) {
        self.lock.with(|| self.drain_locked(patience));
    }

    /// The drain; the caller holds `lock`.
    fn drain_locked(&self, patience: usize) {
        let slots = self.slots.as_ref();
        let cap = slots.len();
        let n = self.reserved.swap(cap, Ordering::AcqRel).min(cap);
        let mut ready = n;
        let mut waited = 0usize;
        for (i, slot) in slots[..n].iter().enumerate() {
            let mut spins = 0u32;
            while slot.w[3].load(Ordering::Acquire) == 0 {
                if spins < 64 {
                    spins += 1;
                    spin_hint();
                } else if waited < patience {
                    waited += 1;
                    yield_now();
                } else {
                    break;
                }
            }
            if slot.w[3].load(Ordering::Acquire) == 0 {
                ready = i;
                break;
            }
        }
        if let Some(fd) = self.fd() {
            // SAFETY: 1. `Slot` is `repr(C)`, four `AtomicU64`s with the
            // size and layout of `u64`, no padding (asserted), so `ready`
            // slots are `ready * RECORD_LEN` initialised bytes; 2. no thread
            // writes a slot while `reserved ≥ cap` (type invariant) and the
            // first `ready` slots are published, so nothing changes them
            // while we read.
            let bytes = unsafe {
                core::slice::from_raw_parts(slots.as_ptr().cast::<u8>(), ready * RECORD_LEN)
            };
            match write_all(fd, bytes) {
                Ok(()) => {
                    self.written.fetch_add(ready as u64, Ordering::Relaxed);
                }
                Err(e) => {
                    let _ = self.write_error.compare_exchange(
                        0,
                        e as usize,
                        Ordering::Relaxed,
                        Ordering::Relaxed,
                    );
                }
            }
        }
        for slot in &slots[..n] {
            slot.w[3].store(0, Ordering::Relaxed);
        }
        self.reserved.store(0, Ordering::Release);
    }

    /// In the child of a `fork()`: forgets the parent's unwritten records
    /// (they are the parent's to write), detaches the file and releases the
    /// flush lock whoever held it (that thread does not exist here).
    ///
    /// # Safety
    /// - The calling process has one thread (the child right after `fork`).
    pub(crate) unsafe fn reset_in_child(&self) {
        let slots = self.slots.as_ref();
        let n = self.reserved.load(Ordering::Relaxed).min(slots.len());
        for slot in &slots[..n] {
            slot.w[3].store(0, Ordering::Relaxed);
        }
        self.reserved.store(0, Ordering::Relaxed);
        self.written.store(0, Ordering::Relaxed);
        self.write_error.store(0, Ordering::Relaxed);
        self.fd.store(NO_FD, Ordering::Relaxed);
        if !self.lock.try_lock() {
            // Held by a parent thread that is not in this process.
        }
        // SAFETY: held now, either by the `try_lock` above or by a thread
        // that does not exist in the child; we are the only thread.
        unsafe { self.lock.unlock() };
    }
}
