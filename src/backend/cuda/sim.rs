//! [`SimDriver`]: a simulated CUDA device, so the pool's policy, its
//! stream-ordered reuse and its error paths are testable without a GPU
//! (RMM's `simulated_memory_resource`, with bytes and streams added).
//!
//! - **Memory**: a capacity; segments get fake, non-overlapping, 2 MiB
//!   aligned addresses (a bump pointer, never reused); their bytes are
//!   really stored (allocated on first touch, untouched bytes read `0xA5`,
//!   like uninitialised device memory), so write/read round trips mean
//!   something. `outstanding() + occupied ≤ capacity`, where
//!   `outstanding() == Σ live segment sizes`.
//! - **Streams**: each stream has a logical clock, `submitted ≥ completed`.
//!   [`SimDriver::enqueue`] adds work to a stream (it is then "busy");
//!   an event recorded on it completes when the test calls
//!   [`SimDriver::advance`] (or something synchronizes that stream).
//! - **Faults**: fail the n-th call of any [`Call`] from now, or every
//!   malloc above a size; [`SimDriver::calls`] counts every call.

use super::driver::{CudaDriver, DevPtr, DeviceInfo, DriverError, EventId, StreamId};
use parking_lot::Mutex;
use std::collections::{BTreeMap, HashMap};

/// Where segment addresses start (device-looking, never 0).
const BASE: u64 = 0x7f00_0000_0000;
/// Segment address granularity.
const GRANULE: u64 = 2 << 20;
/// What never-written device bytes read as.
pub const UNINIT_BYTE: u8 = 0xA5;

/// A driver call site, for fault injection and call counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[allow(missing_docs)]
pub enum Call {
    MemGetInfo,
    Malloc,
    Free,
    EventCreate,
    EventDestroy,
    EventRecord,
    EventQuery,
    EventSynchronize,
    StreamWaitEvent,
    StreamSynchronize,
    DeviceSynchronize,
    CopyHtoD,
    CopyDtoH,
    Memset,
}

impl Call {
    /// Every call site.
    pub const ALL: [Call; 14] = [
        Call::MemGetInfo,
        Call::Malloc,
        Call::Free,
        Call::EventCreate,
        Call::EventDestroy,
        Call::EventRecord,
        Call::EventQuery,
        Call::EventSynchronize,
        Call::StreamWaitEvent,
        Call::StreamSynchronize,
        Call::DeviceSynchronize,
        Call::CopyHtoD,
        Call::CopyDtoH,
        Call::Memset,
    ];
    fn name(self) -> &'static str {
        match self {
            Call::MemGetInfo => "cuMemGetInfo",
            Call::Malloc => "cuMemAlloc",
            Call::Free => "cuMemFree",
            Call::EventCreate => "cuEventCreate",
            Call::EventDestroy => "cuEventDestroy",
            Call::EventRecord => "cuEventRecord",
            Call::EventQuery => "cuEventQuery",
            Call::EventSynchronize => "cuEventSynchronize",
            Call::StreamWaitEvent => "cuStreamWaitEvent",
            Call::StreamSynchronize => "cuStreamSynchronize",
            Call::DeviceSynchronize => "cuCtxSynchronize",
            Call::CopyHtoD => "cuMemcpyHtoD",
            Call::CopyDtoH => "cuMemcpyDtoH",
            Call::Memset => "cuMemsetD8",
        }
    }
}

/// What an injected fault returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// `DriverError::OutOfMemory` (meaningful for malloc).
    OutOfMemory,
    /// `DriverError::Driver` with code 999 (`CUDA_ERROR_UNKNOWN`).
    Error,
}

#[derive(Debug)]
struct Segment {
    size: usize,
    /// Allocated on first touch.
    bytes: Option<Vec<u8>>,
}

#[derive(Debug, Default, Clone, Copy)]
struct Clock {
    submitted: u64,
    completed: u64,
}

#[derive(Debug, Default)]
struct State {
    next_addr: u64,
    outstanding: usize,
    /// Bytes used by others (`occupy`).
    others: usize,
    peak_outstanding: usize,
    segments: BTreeMap<DevPtr, Segment>,
    streams: HashMap<StreamId, Clock>,
    next_stream: StreamId,
    /// Event → (stream, clock value it waits for); `None` until recorded.
    events: HashMap<u64, Option<(StreamId, u64)>>,
    next_event: u64,
    /// Stream → events its later work waits for.
    waits: HashMap<StreamId, Vec<(StreamId, u64)>>,
    calls: HashMap<Call, u64>,
    /// Call → countdown; the call that brings it to 0 fails.
    faults: HashMap<Call, (u64, Fault)>,
    fail_malloc_above: Option<usize>,
}

/// A simulated device. See the module docs.
#[derive(Debug)]
pub struct SimDriver {
    info: DeviceInfo,
    capacity: usize,
    state: Mutex<State>,
}

impl SimDriver {
    /// A device of `capacity` bytes, ordinal 0.
    pub fn new(capacity: usize) -> Self {
        Self::with_ordinal(0, capacity)
    }

    /// A device of `capacity` bytes with this ordinal.
    pub fn with_ordinal(ordinal: u32, capacity: usize) -> Self {
        SimDriver {
            info: DeviceInfo {
                ordinal,
                name: "simulated".into(),
                total_memory: capacity,
                memory_pools: false,
                virtual_memory: false,
                driver_version: 0,
            },
            capacity,
            state: Mutex::new(State {
                next_addr: BASE,
                next_stream: 1,
                next_event: 1,
                ..State::default()
            }),
        }
    }

    /// Takes `bytes` of the device for someone else (a CUDA context, another
    /// process): they count as used in `mem_get_info` and mallocs cannot
    /// have them. Replaces the previous amount.
    pub fn occupy(&self, bytes: usize) {
        self.state.lock().others = bytes.min(self.capacity);
    }
    /// Bytes in live segments.
    pub fn outstanding(&self) -> usize {
        self.state.lock().outstanding
    }
    /// The most bytes ever in live segments.
    pub fn peak_outstanding(&self) -> usize {
        self.state.lock().peak_outstanding
    }
    /// Live segments as `(address, size)`, in address order.
    pub fn segments(&self) -> Vec<(DevPtr, usize)> {
        let s = self.state.lock();
        s.segments.iter().map(|(&p, g)| (p, g.size)).collect()
    }
    /// Events created and not destroyed.
    pub fn live_events(&self) -> usize {
        self.state.lock().events.len()
    }
    /// How many times `c` was called (failed calls included).
    pub fn calls(&self, c: Call) -> u64 {
        self.state.lock().calls.get(&c).copied().unwrap_or(0)
    }

    /// Makes the `n`-th call of `c` from now fail (n ≥ 1) with `fault`.
    pub fn fail_nth(&self, c: Call, n: u64, fault: Fault) {
        self.state.lock().faults.insert(c, (n.max(1), fault));
    }
    /// Makes every malloc of more than `size` bytes fail with out of memory
    /// (`None` lifts it).
    pub fn fail_malloc_above(&self, size: Option<usize>) {
        self.state.lock().fail_malloc_above = size;
    }
    /// Clears every pending injected fault.
    pub fn clear_faults(&self) {
        let mut s = self.state.lock();
        s.faults.clear();
        s.fail_malloc_above = None;
    }

    /// A new stream (ids start at 1; 0 is the default stream).
    pub fn create_stream(&self) -> StreamId {
        let mut s = self.state.lock();
        let id = s.next_stream;
        s.next_stream += 1;
        s.streams.insert(id, Clock::default());
        id
    }
    /// Completes a stream's work and forgets it (RMM's DeletedStream).
    pub fn destroy_stream(&self, stream: StreamId) {
        let mut s = self.state.lock();
        complete(&mut s, stream, u64::MAX);
        s.streams.remove(&stream);
    }
    /// Queues `units` of work on `stream`: events recorded after this stay
    /// pending until the stream advances past it.
    pub fn enqueue(&self, stream: StreamId, units: u64) {
        let mut s = self.state.lock();
        let c = s.streams.entry(stream).or_default();
        c.submitted += units;
    }
    /// Completes all of `stream`'s queued work.
    pub fn advance(&self, stream: StreamId) {
        let mut s = self.state.lock();
        complete(&mut s, stream, u64::MAX);
    }
    /// Whether `stream` has queued work not yet completed.
    pub fn busy(&self, stream: StreamId) -> bool {
        let s = self.state.lock();
        s.streams
            .get(&stream)
            .is_some_and(|c| c.completed < c.submitted)
    }

    /// Counts the call and fires an injected fault if one is due.
    fn enter(&self, s: &mut State, c: Call) -> Result<(), DriverError> {
        *s.calls.entry(c).or_default() += 1;
        if let Some((n, fault)) = s.faults.get_mut(&c) {
            *n -= 1;
            if *n == 0 {
                let fault = *fault;
                s.faults.remove(&c);
                return Err(match fault {
                    Fault::OutOfMemory => DriverError::OutOfMemory { requested: 0 },
                    Fault::Error => DriverError::Driver {
                        op: c.name(),
                        code: 999,
                        name: "CUDA_ERROR_UNKNOWN (injected)".into(),
                    },
                });
            }
        }
        Ok(())
    }

    /// The stored bytes of `len` bytes at `p`, or an invalid-value error.
    fn range<'s>(
        s: &'s mut State,
        op: &'static str,
        p: DevPtr,
        len: usize,
    ) -> Result<&'s mut [u8], DriverError> {
        let invalid = || DriverError::Driver {
            op,
            code: 1,
            name: "CUDA_ERROR_INVALID_VALUE".into(),
        };
        let (&base, seg) = s.segments.range_mut(..=p).next_back().ok_or_else(invalid)?;
        let off = (p - base) as usize;
        if off.checked_add(len).is_none_or(|end| end > seg.size) {
            return Err(invalid());
        }
        let bytes = seg.bytes.get_or_insert_with(|| vec![UNINIT_BYTE; seg.size]);
        Ok(&mut bytes[off..off + len])
    }
}

/// Completes `stream` up to `until` (its submitted work at most), first
/// completing the work of every event it waits on.
fn complete(s: &mut State, stream: StreamId, until: u64) {
    if let Some(ws) = s.waits.remove(&stream) {
        for (other, target) in ws {
            if other != stream {
                complete(s, other, target);
            }
        }
    }
    let c = s.streams.entry(stream).or_default();
    c.completed = c.completed.max(until.min(c.submitted));
}

// SAFETY: addresses come from a bump pointer that only grows, by at least
// the segment's size rounded up to 2 MiB, so live ranges never overlap and
// are 2 MiB aligned; copies touch only the stored bytes named.
unsafe impl CudaDriver for SimDriver {
    fn info(&self) -> &DeviceInfo {
        &self.info
    }

    fn mem_get_info(&self) -> Result<(usize, usize), DriverError> {
        let mut s = self.state.lock();
        self.enter(&mut s, Call::MemGetInfo)?;
        Ok((
            self.capacity.saturating_sub(s.outstanding + s.others),
            self.capacity,
        ))
    }

    fn malloc(&self, size: usize) -> Result<DevPtr, DriverError> {
        let mut s = self.state.lock();
        self.enter(&mut s, Call::Malloc).map_err(|e| match e {
            DriverError::OutOfMemory { .. } => DriverError::OutOfMemory { requested: size },
            e => e,
        })?;
        let oom = DriverError::OutOfMemory { requested: size };
        if s.fail_malloc_above.is_some_and(|m| size > m) || size == 0 {
            return Err(oom);
        }
        if size > self.capacity.saturating_sub(s.outstanding + s.others) {
            return Err(oom);
        }
        let span = (size as u64).div_ceil(GRANULE) * GRANULE;
        let p = s.next_addr;
        s.next_addr = p.checked_add(span).ok_or(oom)?;
        s.outstanding += size;
        s.peak_outstanding = s.peak_outstanding.max(s.outstanding);
        s.segments.insert(p, Segment { size, bytes: None });
        Ok(p)
    }

    unsafe fn free(&self, ptr: DevPtr) -> Result<(), DriverError> {
        let mut s = self.state.lock();
        self.enter(&mut s, Call::Free)?;
        let seg = s.segments.remove(&ptr).ok_or(DriverError::Driver {
            op: "cuMemFree",
            code: 1,
            name: "CUDA_ERROR_INVALID_VALUE".into(),
        })?;
        s.outstanding -= seg.size;
        Ok(())
    }

    fn event_create(&self) -> Result<EventId, DriverError> {
        let mut s = self.state.lock();
        self.enter(&mut s, Call::EventCreate)?;
        let id = s.next_event;
        s.next_event += 1;
        s.events.insert(id, None);
        Ok(EventId(id))
    }

    fn event_destroy(&self, e: EventId) -> Result<(), DriverError> {
        let mut s = self.state.lock();
        self.enter(&mut s, Call::EventDestroy)?;
        s.events
            .remove(&e.0)
            .map(|_| ())
            .ok_or(bad_handle("cuEventDestroy"))
    }

    fn event_record(&self, e: EventId, stream: StreamId) -> Result<(), DriverError> {
        let mut s = self.state.lock();
        self.enter(&mut s, Call::EventRecord)?;
        let at = s.streams.entry(stream).or_default().submitted;
        let slot = s.events.get_mut(&e.0).ok_or(bad_handle("cuEventRecord"))?;
        *slot = Some((stream, at));
        Ok(())
    }

    fn event_query(&self, e: EventId) -> Result<bool, DriverError> {
        let mut s = self.state.lock();
        self.enter(&mut s, Call::EventQuery)?;
        match s.events.get(&e.0).ok_or(bad_handle("cuEventQuery"))? {
            None => Ok(true),
            Some((stream, at)) => Ok(s.streams.get(stream).is_none_or(|c| c.completed >= *at)),
        }
    }

    fn event_synchronize(&self, e: EventId) -> Result<(), DriverError> {
        let mut s = self.state.lock();
        self.enter(&mut s, Call::EventSynchronize)?;
        match *s.events.get(&e.0).ok_or(bad_handle("cuEventSynchronize"))? {
            None => Ok(()),
            Some((stream, at)) => {
                complete(&mut s, stream, at);
                Ok(())
            }
        }
    }

    fn stream_wait_event(&self, stream: StreamId, e: EventId) -> Result<(), DriverError> {
        let mut s = self.state.lock();
        self.enter(&mut s, Call::StreamWaitEvent)?;
        if let Some(w) = *s.events.get(&e.0).ok_or(bad_handle("cuStreamWaitEvent"))? {
            s.waits.entry(stream).or_default().push(w);
        }
        Ok(())
    }

    fn stream_synchronize(&self, stream: StreamId) -> Result<(), DriverError> {
        let mut s = self.state.lock();
        self.enter(&mut s, Call::StreamSynchronize)?;
        complete(&mut s, stream, u64::MAX);
        Ok(())
    }

    fn device_synchronize(&self) -> Result<(), DriverError> {
        let mut s = self.state.lock();
        self.enter(&mut s, Call::DeviceSynchronize)?;
        let all: Vec<StreamId> = s.streams.keys().copied().collect();
        for st in all {
            complete(&mut s, st, u64::MAX);
        }
        Ok(())
    }

    unsafe fn copy_htod(&self, dst: DevPtr, src: &[u8]) -> Result<(), DriverError> {
        let mut s = self.state.lock();
        self.enter(&mut s, Call::CopyHtoD)?;
        Self::range(&mut s, "cuMemcpyHtoD", dst, src.len())?.copy_from_slice(src);
        Ok(())
    }

    unsafe fn copy_dtoh(&self, dst: &mut [u8], src: DevPtr) -> Result<(), DriverError> {
        let mut s = self.state.lock();
        self.enter(&mut s, Call::CopyDtoH)?;
        dst.copy_from_slice(Self::range(&mut s, "cuMemcpyDtoH", src, dst.len())?);
        Ok(())
    }

    unsafe fn memset(&self, dst: DevPtr, value: u8, len: usize) -> Result<(), DriverError> {
        let mut s = self.state.lock();
        self.enter(&mut s, Call::Memset)?;
        Self::range(&mut s, "cuMemsetD8", dst, len)?.fill(value);
        Ok(())
    }
}

fn bad_handle(op: &'static str) -> DriverError {
    DriverError::Driver {
        op,
        code: 400,
        name: "CUDA_ERROR_INVALID_HANDLE".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capacity_addresses_bytes_and_clocks() {
        let d = SimDriver::new(8 << 20);
        let a = d.malloc(3 << 20).unwrap();
        let b = d.malloc(4 << 20).unwrap();
        assert!(a + (3 << 20) <= b, "segments overlap");
        assert_eq!(
            d.malloc(2 << 20),
            Err(DriverError::OutOfMemory { requested: 2 << 20 })
        );
        assert_eq!(d.mem_get_info().unwrap(), (1 << 20, 8 << 20));
        // SAFETY: inside the live segment `a`.
        unsafe { d.copy_htod(a + 10, b"hello").unwrap() };
        let mut out = [0u8; 7];
        // SAFETY: inside `a`.
        unsafe { d.copy_dtoh(&mut out, a + 9).unwrap() };
        assert_eq!(&out, b"\xA5hello\xA5");
        // SAFETY: a range past the segment is refused, not touched.
        assert!(unsafe { d.copy_htod(a + (3 << 20) - 2, b"abc") }.is_err());
        let s = d.create_stream();
        let e = d.event_create().unwrap();
        d.enqueue(s, 1);
        d.event_record(e, s).unwrap();
        assert!(!d.event_query(e).unwrap());
        d.advance(s);
        assert!(d.event_query(e).unwrap());
        d.fail_nth(Call::EventQuery, 2, Fault::Error);
        assert!(d.event_query(e).is_ok());
        assert!(d.event_query(e).is_err());
        assert!(d.event_query(e).is_ok());
        // SAFETY: both from malloc above.
        unsafe {
            d.free(a).unwrap();
            d.free(b).unwrap();
        }
        assert_eq!(d.outstanding(), 0);
    }
}
