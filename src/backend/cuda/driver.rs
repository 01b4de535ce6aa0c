//! The seam between the caching pool and a CUDA driver: [`CudaDriver`].
//!
//! The pool asks the driver for exactly what PyTorch's caching allocator
//! asks CUDA for — segments (`malloc`/`free`), events (pooled, recorded on a
//! stream, queried, synchronized), stream waits and synchronization, memory
//! info — plus host↔device copies and memset for the backend's
//! `write`/`read` and for zeroed requests. Streams and events are opaque
//! `u64` handles: for the real driver a stream is the `CUstream` pointer
//! (0 is the legacy default stream), for the simulated one a number it
//! issued.

use core::fmt;

/// A device address.
pub type DevPtr = u64;

/// A stream handle (0 is the default stream).
pub type StreamId = u64;

/// An event handle issued by [`CudaDriver::event_create`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EventId(pub u64);

/// What the pool needs to know about its device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceInfo {
    /// Device ordinal.
    pub ordinal: u32,
    /// Device name ("NVIDIA H200", "simulated").
    pub name: String,
    /// Total device memory in bytes.
    pub total_memory: usize,
    /// Whether stream-ordered memory pools (`cuMemAllocAsync`) are supported.
    pub memory_pools: bool,
    /// Whether virtual memory management (`cuMemCreate`/`cuMemMap`) is supported.
    pub virtual_memory: bool,
    /// Driver version as CUDA encodes it (12040 = 12.4); 0 for the simulation.
    pub driver_version: i32,
}

/// A driver call that failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DriverError {
    /// The device has no memory for this request now.
    OutOfMemory {
        /// Bytes asked of the driver.
        requested: usize,
    },
    /// Work is still pending (only `event_query` returns this as an error
    /// internally; the trait maps it to `Ok(false)`).
    NotReady,
    /// No driver or device here.
    Unavailable {
        /// Why.
        reason: String,
    },
    /// The driver lacks the feature.
    Unsupported {
        /// What is missing.
        what: &'static str,
    },
    /// Any other driver failure, with CUDA's code and name.
    Driver {
        /// The call that failed ("cuMemAlloc", "cuEventRecord" …).
        op: &'static str,
        /// The `CUresult` code.
        code: i32,
        /// The code's name ("CUDA_ERROR_ILLEGAL_ADDRESS").
        name: String,
    },
}

impl fmt::Display for DriverError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DriverError::OutOfMemory { requested } => {
                write!(f, "the driver has no memory for {requested} B")
            }
            DriverError::NotReady => write!(f, "not ready"),
            DriverError::Unavailable { reason } => write!(f, "unavailable: {reason}"),
            DriverError::Unsupported { what } => write!(f, "unsupported: {what}"),
            DriverError::Driver { op, code, name } => write!(f, "{op} failed: {name} ({code})"),
        }
    }
}

impl std::error::Error for DriverError {}

impl DriverError {
    /// The call's name for error messages.
    pub fn op(&self) -> &'static str {
        match self {
            DriverError::Driver { op, .. } => op,
            DriverError::OutOfMemory { .. } => "malloc",
            _ => "driver",
        }
    }
}

/// The driver calls the caching pool makes.
///
/// # Safety
/// Implementors promise:
/// - every `Ok(p)` from [`malloc(size)`](Self::malloc) is a range
///   `p .. p + size` that overlaps no other range the driver has handed out
///   and not yet freed, aligned to at least 512 bytes;
/// - [`free`](Self::free) releases exactly one such range;
/// - copies and memsets touch only the bytes named.
///
/// The pool relies on the first point for its no-overlap invariant.
pub unsafe trait CudaDriver: Send + Sync + 'static {
    /// The device.
    fn info(&self) -> &DeviceInfo;
    /// `(free, total)` device bytes, as `cuMemGetInfo` reports them.
    fn mem_get_info(&self) -> Result<(usize, usize), DriverError>;
    /// Allocates a segment of `size` bytes.
    fn malloc(&self, size: usize) -> Result<DevPtr, DriverError>;
    /// Frees a segment.
    ///
    /// # Safety
    /// - `ptr` came from [`malloc`](Self::malloc) on this driver and was not
    ///   freed since;
    /// - no queued device work still uses it.
    unsafe fn free(&self, ptr: DevPtr) -> Result<(), DriverError>;
    /// A new event (the pool keeps its own free list of them).
    fn event_create(&self) -> Result<EventId, DriverError>;
    /// Destroys an event.
    fn event_destroy(&self, e: EventId) -> Result<(), DriverError>;
    /// Records `e` at the current end of `stream`'s work.
    fn event_record(&self, e: EventId, stream: StreamId) -> Result<(), DriverError>;
    /// Whether the work before `e`'s last record has completed.
    fn event_query(&self, e: EventId) -> Result<bool, DriverError>;
    /// Waits on the host for `e`.
    fn event_synchronize(&self, e: EventId) -> Result<(), DriverError>;
    /// Makes `stream`'s later work wait for `e` (device side, no host wait).
    fn stream_wait_event(&self, stream: StreamId, e: EventId) -> Result<(), DriverError>;
    /// Waits on the host for all of `stream`'s work.
    fn stream_synchronize(&self, stream: StreamId) -> Result<(), DriverError>;
    /// Waits on the host for all work on the device.
    fn device_synchronize(&self) -> Result<(), DriverError>;
    /// Copies `src` to device address `dst` (complete when this returns).
    ///
    /// # Safety
    /// - `dst .. dst + src.len()` lies inside a live segment of this driver.
    unsafe fn copy_htod(&self, dst: DevPtr, src: &[u8]) -> Result<(), DriverError>;
    /// Copies `dst.len()` bytes from device address `src` into `dst`.
    ///
    /// # Safety
    /// - `src .. src + dst.len()` lies inside a live segment of this driver.
    unsafe fn copy_dtoh(&self, dst: &mut [u8], src: DevPtr) -> Result<(), DriverError>;
    /// Sets `len` bytes at `dst` to `value` (complete when this returns).
    ///
    /// # Safety
    /// - `dst .. dst + len` lies inside a live segment of this driver.
    unsafe fn memset(&self, dst: DevPtr, value: u8, len: usize) -> Result<(), DriverError>;
}
