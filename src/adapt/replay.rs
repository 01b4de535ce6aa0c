//! [`replay`]: runs a trace against any [`TensorAllocator`] and reports time
//! per operation, peak allocated and reserved bytes, and failures.
//!
//! A trace is first checked and turned into a [`ReplayPlan`]: ids become
//! dense slot numbers (reused as blocks die), so the timed loop indexes a
//! vector instead of hashing. A free of an id that is not live, or an alloc
//! of an id that is already live, is a [`ReplayError`] naming the record
//! index; nothing panics. [`GlobalAllocBackend`] lets any `GlobalAlloc`
//! (glibc's `System`, mimalloc, jemalloc) be replayed the same way.

use super::format::{Trace, TraceOp};
use crate::allocator::{Addr, AllocRequest, Allocation, Device, TensorAllocator};
use crate::error::AllocError;
use crate::stats::{MemoryStats, Stat};
use core::alloc::{GlobalAlloc, Layout};
use core::ptr::NonNull;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use thiserror::Error;

/// A trace that cannot be replayed as it stands.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum ReplayError {
    /// A free of an id that no earlier record allocated (or that was freed already).
    #[error("record {index}: free of 0x{id:x}, which is not live at that point of the trace")]
    UnknownFree {
        /// Record index, from 0.
        index: usize,
        /// The id or pointer.
        id: u64,
    },
    /// An alloc of an id that is still live.
    #[error(
        "record {index}: alloc of 0x{id:x}, which is already live (allocated at record {first})"
    )]
    DuplicateAlloc {
        /// Record index, from 0.
        index: usize,
        /// The id or pointer.
        id: u64,
        /// Where it was allocated.
        first: usize,
    },
    /// A size or alignment this platform cannot express.
    #[error("record {index}: size {size} B at alignment 2^{align_log2} is not a valid layout here")]
    BadLayout {
        /// Record index, from 0.
        index: usize,
        /// Size in bytes.
        size: u64,
        /// log2 of the alignment.
        align_log2: u8,
    },
}

impl From<ReplayError> for AllocError {
    fn from(e: ReplayError) -> Self {
        AllocError::Integrity {
            what: "trace replay".into(),
            detail: e.to_string(),
        }
    }
}

/// One step of a plan.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    Alloc {
        slot: u32,
        size: usize,
        align: usize,
        stream: u16,
    },
    Free {
        slot: u32,
    },
}

/// A checked trace, ready to replay many times.
#[derive(Debug, Clone)]
pub struct ReplayPlan {
    steps: Vec<Step>,
    slots: usize,
    peak_live_bytes: u64,
    live_at_end: usize,
}

impl ReplayPlan {
    /// Checks `trace` and numbers its blocks.
    pub fn new(trace: &Trace) -> Result<ReplayPlan, ReplayError> {
        let mut live: HashMap<u64, (u32, usize, u64)> = HashMap::with_capacity(1024);
        let mut free_slots: Vec<u32> = Vec::new();
        let mut slots = 0u32;
        let mut steps = Vec::with_capacity(trace.records.len());
        let (mut now, mut peak) = (0u64, 0u64);
        for (index, r) in trace.records.iter().enumerate() {
            match r.op {
                TraceOp::Alloc => {
                    if let Some(&(_, first, _)) = live.get(&r.id) {
                        return Err(ReplayError::DuplicateAlloc {
                            index,
                            id: r.id,
                            first,
                        });
                    }
                    let size = usize::try_from(r.size).ok();
                    let align = r.align();
                    if size.is_none_or(|s| Layout::from_size_align(s, align).is_err()) {
                        return Err(ReplayError::BadLayout {
                            index,
                            size: r.size,
                            align_log2: r.align_log2,
                        });
                    }
                    let slot = free_slots.pop().unwrap_or_else(|| {
                        slots += 1;
                        slots - 1
                    });
                    live.insert(r.id, (slot, index, r.size));
                    now += r.size;
                    peak = peak.max(now);
                    steps.push(Step::Alloc {
                        slot,
                        size: r.size as usize,
                        align,
                        stream: r.stream,
                    });
                }
                TraceOp::Free => {
                    let Some((slot, _, size)) = live.remove(&r.id) else {
                        return Err(ReplayError::UnknownFree { index, id: r.id });
                    };
                    now -= size;
                    free_slots.push(slot);
                    steps.push(Step::Free { slot });
                }
            }
        }
        Ok(ReplayPlan {
            steps,
            slots: slots as usize,
            peak_live_bytes: peak,
            live_at_end: live.len(),
        })
    }

    /// Operations (records) in the plan.
    pub fn len(&self) -> usize {
        self.steps.len()
    }

    /// Whether the plan is empty.
    pub fn is_empty(&self) -> bool {
        self.steps.is_empty()
    }

    /// The most requested bytes live at once in the trace.
    pub fn peak_live_bytes(&self) -> u64 {
        self.peak_live_bytes
    }

    /// The most blocks live at once.
    pub fn peak_live_blocks(&self) -> usize {
        self.slots
    }

    /// Blocks the trace never frees.
    pub fn live_at_end(&self) -> usize {
        self.live_at_end
    }

    /// Replays the plan on `backend` (see [`replay`]).
    pub fn run(&self, backend: &dyn TensorAllocator) -> ReplayReport {
        self.run_inner(backend, false)
    }

    /// Replays the plan writing one byte in every 4 KiB page of each host
    /// allocation (as a program that uses its memory would), and reports the
    /// growth of the process's peak resident set over the replay
    /// ([`ReplayReport::peak_resident_growth`], Linux: the peak is reset
    /// through `/proc/self/clear_refs` first). The time includes the page
    /// faults. Measure one allocator per process, or trim the others first.
    pub fn run_touching(&self, backend: &dyn TensorAllocator) -> ReplayReport {
        self.run_inner(backend, true)
    }

    fn run_inner(&self, backend: &dyn TensorAllocator, touch: bool) -> ReplayReport {
        let mut table: Vec<Option<Allocation>> = vec![None; self.slots];
        let base_rss = if touch { reset_peak_rss() } else { None };
        let (mut now, mut peak) = (0u64, 0u64);
        let mut failures = 0u64;
        let mut first_failure = None;
        let (mut allocs, mut frees) = (0u64, 0u64);
        let start = Instant::now();
        for (i, step) in self.steps.iter().enumerate() {
            match *step {
                Step::Alloc {
                    slot,
                    size,
                    align,
                    stream,
                } => {
                    let mut req = AllocRequest::new(size, align);
                    if stream != 0 {
                        req = req.stream(u64::from(stream) - 1);
                    }
                    match backend.allocate(&req) {
                        Ok(a) => {
                            if touch {
                                touch_pages(&a);
                            }
                            table[slot as usize] = Some(a);
                            allocs += 1;
                            now += size as u64;
                            peak = peak.max(now);
                        }
                        Err(e) => {
                            failures += 1;
                            first_failure.get_or_insert((i, e));
                        }
                    }
                }
                Step::Free { slot } => {
                    // A block whose alloc failed has nothing to free.
                    if let Some(a) = table[slot as usize].take() {
                        now -= a.size() as u64;
                        // SAFETY: `a` came from `backend.allocate` in this
                        // run and is freed once (taken out of the table);
                        // replay never touches its memory.
                        match unsafe { backend.deallocate(&a) } {
                            Ok(()) => frees += 1,
                            Err(e) => {
                                failures += 1;
                                first_failure.get_or_insert((i, e));
                            }
                        }
                    }
                }
            }
        }
        let elapsed = start.elapsed();
        let stats = backend.stats();
        let peak_resident_growth =
            base_rss.and_then(|base| Some(peak_rss()?.saturating_sub(base) as u64));
        // Leave the backend as we found it: free what the trace leaves live.
        for a in table.into_iter().flatten() {
            // SAFETY: as above; each left-over allocation is freed once.
            let _ = unsafe { backend.deallocate(&a) };
        }
        let ops = allocs + frees;
        ReplayReport {
            ops,
            failures,
            first_failure,
            elapsed,
            ns_per_op: if ops == 0 {
                0.0
            } else {
                elapsed.as_nanos() as f64 / ops as f64
            },
            peak_allocated: peak,
            peak_reserved: stats.reserved_bytes.peak,
            peak_resident_growth,
        }
    }
}

/// Writes a byte in every 4 KiB page of a host allocation.
fn touch_pages(a: &Allocation) {
    if let Addr::Host(p) = a.addr() {
        let mut off = 0;
        while off < a.size() {
            // SAFETY: `TensorAllocator`'s contract: a host allocation is
            // valid for writes of `a.size()` bytes until freed, and
            // `off < a.size()`; nothing else uses these bytes.
            unsafe { p.as_ptr().add(off).write_volatile(1) };
            off += 4096;
        }
    }
}

/// Resets the process's peak resident set (Linux `clear_refs` 5) and
/// returns the current resident bytes; `None` where that is not possible.
fn reset_peak_rss() -> Option<usize> {
    std::fs::write("/proc/self/clear_refs", "5").ok()?;
    crate::resident_bytes()
}

/// The process's peak resident bytes since the last reset (`VmHWM`).
fn peak_rss() -> Option<usize> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: usize = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// What a replay measured.
#[derive(Debug, Clone, PartialEq)]
pub struct ReplayReport {
    /// Allocations and frees that succeeded.
    pub ops: u64,
    /// Allocations and frees that failed (counted, the replay goes on).
    pub failures: u64,
    /// The first failure: plan step and error.
    pub first_failure: Option<(usize, AllocError)>,
    /// Wall time of the replay loop (bookkeeping included: a vector index
    /// and an `Option` a step, the same for every backend).
    pub elapsed: Duration,
    /// `elapsed` per successful operation.
    pub ns_per_op: f64,
    /// The most requested bytes live at once during the replay.
    pub peak_allocated: u64,
    /// The backend's peak reserved bytes (`stats().reserved_bytes.peak`),
    /// since the backend was made: replay on a fresh backend.
    pub peak_reserved: u64,
    /// From [`ReplayPlan::run_touching`]: peak resident bytes of the
    /// process during the replay minus resident bytes before it.
    pub peak_resident_growth: Option<u64>,
}

impl ReplayReport {
    /// Peak reserved ÷ peak allocated (1.0 = no overhead; 0 if nothing was
    /// allocated).
    pub fn fragmentation(&self) -> f64 {
        if self.peak_allocated == 0 {
            0.0
        } else {
            self.peak_reserved as f64 / self.peak_allocated as f64
        }
    }
}

/// Replays `trace` on `backend`: every alloc and free in order, from one
/// thread. Allocation failures are counted, not fatal; a trace that frees
/// what is not live is an error before anything runs. Blocks the trace
/// leaves live are freed after the measurement.
///
/// ```
/// use tensorpool::adapt::{Trace, TraceOp, TraceRecord, replay};
/// use tensorpool::backend::{HostBackend, MetaBackend};
///
/// let rec = |op, id, size| TraceRecord { op, id, size, align_log2: 6, stream: 0, time_ns: 0, thread: 1 };
/// let trace = Trace { records: vec![rec(TraceOp::Alloc, 1, 4096), rec(TraceOp::Alloc, 2, 100), rec(TraceOp::Free, 1, 0)] };
/// let host = replay(&trace, &HostBackend::new()).unwrap();
/// let meta = replay(&trace, &MetaBackend::new()).unwrap();
/// assert_eq!(host.peak_allocated, 4196);
/// assert_eq!(host.peak_reserved, meta.peak_reserved);
/// ```
pub fn replay(trace: &Trace, backend: &dyn TensorAllocator) -> Result<ReplayReport, ReplayError> {
    Ok(ReplayPlan::new(trace)?.run(backend))
}

/// Any `GlobalAlloc` as a [`TensorAllocator`], for replaying traces on
/// allocators that are not backends (glibc, mimalloc, jemalloc).
///
/// `reserved` (optional) reports the allocator's own reserved bytes (e.g.
/// glibc's `mallinfo2`, mimalloc's committed bytes, jemalloc's
/// `stats.mapped`); when given, it is sampled every `sample_every`
/// allocations (and on every `stats()` call) and the peak kept, relative to
/// its value at construction. Sampling costs time: measure time with
/// sampling off (`sample_every = 0`) and memory in a separate run.
///
/// Not a verifying backend: `deallocate` trusts that the allocation came
/// from this adaptor (as [`replay`] guarantees); it is for benchmarks.
pub struct GlobalAllocBackend<A> {
    inner: A,
    reserved: Option<fn() -> usize>,
    base: usize,
    sample_every: usize,
    count: AtomicUsize,
    peak: AtomicU64,
    live: AtomicU64,
}

impl<A> core::fmt::Debug for GlobalAllocBackend<A> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("GlobalAllocBackend")
            .field("sample_every", &self.sample_every)
            .field("peak_reserved", &self.peak.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl<A: GlobalAlloc> GlobalAllocBackend<A> {
    /// Wraps `inner`; see the type docs for `reserved` and `sample_every`.
    pub fn new(inner: A, reserved: Option<fn() -> usize>, sample_every: usize) -> Self {
        GlobalAllocBackend {
            inner,
            base: reserved.map_or(0, |f| f()),
            reserved,
            sample_every,
            count: AtomicUsize::new(0),
            peak: AtomicU64::new(0),
            live: AtomicU64::new(0),
        }
    }

    fn sample(&self) -> u64 {
        let Some(f) = self.reserved else { return 0 };
        let now = f().saturating_sub(self.base) as u64;
        self.peak.fetch_max(now, Ordering::Relaxed);
        now
    }
}

fn layout_of(size: usize, align: usize) -> Result<Layout, AllocError> {
    Layout::from_size_align(size.max(1), align).map_err(|_| AllocError::InvalidLayout {
        size,
        align,
        problem: if align.is_power_of_two() {
            crate::error::LayoutProblem::SizeOverflow
        } else {
            crate::error::LayoutProblem::AlignNotPowerOfTwo
        },
    })
}

// SAFETY: a non-null block from `GlobalAlloc::alloc` is valid for `size`
// bytes at `align` until `dealloc` and does not overlap another live block;
// zeroed requests use `alloc_zeroed`; ids come from the process-wide issuer.
unsafe impl<A: GlobalAlloc + Send + Sync> TensorAllocator for GlobalAllocBackend<A> {
    fn device(&self) -> Device {
        Device::Host
    }

    #[inline]
    fn allocate(&self, req: &AllocRequest) -> Result<Allocation, AllocError> {
        let layout = layout_of(req.size, req.align)?;
        // SAFETY: the layout's size is at least 1.
        let p = unsafe {
            if req.zeroed {
                self.inner.alloc_zeroed(layout)
            } else {
                self.inner.alloc(layout)
            }
        };
        let oom = || AllocError::OutOfMemory {
            device: Device::Host,
            requested: req.size,
            allocated: self.live.load(Ordering::Relaxed) as usize,
            reserved: 0,
            hint: None,
        };
        let p = NonNull::new(p).ok_or_else(oom)?;
        let id = crate::meta::id::next_id().ok_or_else(oom)?;
        self.live.fetch_add(req.size as u64, Ordering::Relaxed);
        if self.sample_every != 0
            && self
                .count
                .fetch_add(1, Ordering::Relaxed)
                .is_multiple_of(self.sample_every)
        {
            self.sample();
        }
        Ok(Allocation::new(
            id,
            Addr::Host(p),
            req.size,
            layout.align(),
            Device::Host,
            0,
        ))
    }

    unsafe fn deallocate(&self, a: &Allocation) -> Result<(), AllocError> {
        let Addr::Host(p) = a.addr() else {
            return Err(AllocError::Unsupported {
                what: "GlobalAllocBackend: deallocate of an allocation without a host pointer",
            });
        };
        let layout = layout_of(a.size(), a.align())?;
        // SAFETY: `a` came from `allocate` above with this layout (caller).
        unsafe { self.inner.dealloc(p.as_ptr(), layout) };
        self.live.fetch_sub(a.size() as u64, Ordering::Relaxed);
        Ok(())
    }

    fn stats(&self) -> MemoryStats {
        let now = self.sample();
        let live = self.live.load(Ordering::Relaxed);
        MemoryStats {
            device: Some(Device::Host),
            allocated_bytes: Stat {
                current: live,
                ..Stat::default()
            },
            reserved_bytes: Stat {
                current: now,
                peak: self.peak.load(Ordering::Relaxed),
                ..Stat::default()
            },
            ..MemoryStats::default()
        }
    }

    fn trim(&self) -> usize {
        0
    }
}
