//! Typed allocation errors. Every variant names what was asked and what stood
//! in the way; [`AllocError::is_retryable`] separates "retry may help" (out of
//! memory now) from "will never fit" (bad layout, over a hard limit, wrong
//! device).

use crate::allocator::Device;
use thiserror::Error;

/// Why a layout was rejected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayoutProblem {
    /// The alignment is not a power of two.
    AlignNotPowerOfTwo,
    /// The alignment is above what the backend serves.
    AlignTooLarge {
        /// The largest alignment served.
        max: usize,
    },
    /// Rounding the size up to the backend's granularity overflows.
    SizeOverflow,
    /// Element count × element size overflows `usize`.
    ShapeOverflow,
}

impl core::fmt::Display for LayoutProblem {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            LayoutProblem::AlignNotPowerOfTwo => write!(f, "alignment is not a power of two"),
            LayoutProblem::AlignTooLarge { max } => {
                write!(f, "alignment is above the maximum of {max} bytes")
            }
            LayoutProblem::SizeOverflow => write!(
                f,
                "size overflows when rounded up to the backend's granularity"
            ),
            LayoutProblem::ShapeOverflow => write!(f, "element count times element size overflows"),
        }
    }
}

/// An allocation or deallocation failure.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum AllocError {
    /// The size/alignment pair can never be served.
    #[error("invalid layout: size {size} B, align {align} B: {problem}")]
    InvalidLayout {
        /// Requested size in bytes.
        size: usize,
        /// Requested alignment in bytes.
        align: usize,
        /// What is wrong with it.
        problem: LayoutProblem,
    },
    /// The device (or OS) has no memory for this request right now.
    #[error(
        "out of memory on {device}: requested {requested} B with {allocated} B allocated and {reserved} B reserved{}",
        hint.map(|h| format!("; {h}")).unwrap_or_default()
    )]
    OutOfMemory {
        /// The device.
        device: Device,
        /// Requested size in bytes.
        requested: usize,
        /// Bytes allocated (live) at the time.
        allocated: usize,
        /// Bytes reserved (held from the OS/driver) at the time.
        reserved: usize,
        /// What to try.
        hint: Option<&'static str>,
    },
    /// The request would take the backend over its configured byte limit.
    #[error(
        "limit exceeded on {device}: requested {requested} B with {allocated} B allocated and {reserved} B reserved; limit {limit} B"
    )]
    LimitExceeded {
        /// The device.
        device: Device,
        /// Requested size in bytes (after rounding).
        requested: usize,
        /// Bytes allocated at the time.
        allocated: usize,
        /// Bytes reserved at the time.
        reserved: usize,
        /// The configured limit in bytes.
        limit: usize,
    },
    /// The request is larger than the limit itself: it will never fit.
    #[error("request of {requested} B on {device} can never fit under the limit of {limit} B")]
    NeverFits {
        /// The device.
        device: Device,
        /// Requested size in bytes (after rounding).
        requested: usize,
        /// The limit.
        limit: usize,
    },
    /// The id is not live: freed already (double free), never issued here, or
    /// its slot now belongs to another tensor.
    #[error(
        "unknown or stale tensor id {id} on {device} (double free, or not allocated by this backend)"
    )]
    UnknownId {
        /// The id as given.
        id: u64,
        /// The backend's device.
        device: Device,
    },
    /// The allocation belongs to another device or backend.
    #[error("allocation {id} belongs to {found}, not to this backend's {expected}")]
    WrongDevice {
        /// The allocation's id.
        id: u64,
        /// This backend's device.
        expected: Device,
        /// The allocation's device.
        found: Device,
    },
    /// The pointer was not handed out by this pool, or not at a block start.
    #[error("pointer {addr:#x} is not a live block of this pool")]
    ForeignPointer {
        /// The address.
        addr: usize,
    },
    /// The block is free already (a double free); nothing was changed.
    #[error("double free detected: block {addr:#x} of this pool is free already")]
    DoubleFree {
        /// The address.
        addr: usize,
    },
    /// The allocation's recorded size/alignment disagree with the backend's.
    #[error(
        "allocation {id} says {size} B / align {align}, but the backend recorded {recorded_size} B / align {recorded_align}"
    )]
    LayoutMismatch {
        /// The id.
        id: u64,
        /// Size claimed by the caller.
        size: usize,
        /// Alignment claimed by the caller.
        align: usize,
        /// Size recorded at allocation.
        recorded_size: usize,
        /// Alignment recorded at allocation.
        recorded_align: usize,
    },
    /// The operation or backend is not available in this build or on this machine.
    #[error("unsupported: {what}")]
    Unsupported {
        /// What is missing.
        what: &'static str,
    },
    /// A read or write reaches past the end of the allocation.
    #[error(
        "out of range on allocation {id}: offset {offset} B + length {len} B is past its size of {size} B"
    )]
    OutOfRange {
        /// The allocation's id.
        id: u64,
        /// Byte offset asked for.
        offset: usize,
        /// Length asked for.
        len: usize,
        /// The allocation's size in bytes.
        size: usize,
    },
    /// A field of the given allocation disagrees with what the backend
    /// recorded when it handed the allocation out (forged or mixed-up handle).
    #[error(
        "allocation {id} does not match the backend's record: {field} given {given:#x}, recorded {recorded:#x}"
    )]
    Mismatch {
        /// The allocation's id.
        id: u64,
        /// Which field disagrees: "address", "size", "align", "device" …
        field: &'static str,
        /// The value in the given allocation.
        given: u64,
        /// The value the backend recorded.
        recorded: u64,
    },
    /// Bytes were asked for that were never written (a backend that defines
    /// this as an error, such as the remote backend's lazy storage).
    #[error("allocation {id}: bytes {offset}..{end} were never written")]
    NotWritten {
        /// The allocation's id.
        id: u64,
        /// First byte asked for.
        offset: usize,
        /// One past the last byte asked for.
        end: usize,
    },
    /// The backend cannot run here: no driver, no library, store unreachable.
    #[error("backend {backend} is unavailable: {reason}")]
    BackendUnavailable {
        /// Which backend.
        backend: &'static str,
        /// Why (library missing, connection refused, …).
        reason: String,
    },
    /// A file or device operation failed.
    #[error("I/O error during {op} on {path}: {message}")]
    Io {
        /// What was being done ("spill write", "load", "open" …).
        op: &'static str,
        /// The file (or device) path.
        path: String,
        /// The OS error, as text.
        message: String,
    },
    /// Stored bytes failed verification (checksum, length, header).
    #[error("integrity check failed for {what}: {detail}")]
    Integrity {
        /// What was checked: a file path, a store key.
        what: String,
        /// What did not match.
        detail: String,
    },
    /// A remote store or device driver reported a failure.
    #[error("{backend} failure during {op}: {message}")]
    Backend {
        /// Which backend or driver ("redis", "cuda" …).
        backend: &'static str,
        /// The operation.
        op: &'static str,
        /// The error as reported.
        message: String,
    },
    /// A residency budget (offload) has no room for the request and nothing
    /// can be evicted: everything resident is pinned or loading.
    #[error(
        "budget exceeded on {device}: requested {requested} B with {resident} B resident ({pinned} B pinned); budget {budget} B"
    )]
    BudgetExceeded {
        /// The device.
        device: Device,
        /// Bytes needed (as the inner backend rounds them).
        requested: usize,
        /// Bytes resident at the time (loading included).
        resident: usize,
        /// Of those, bytes pinned (not evictable).
        pinned: usize,
        /// The budget.
        budget: usize,
    },
    /// The metadata table has no slot for another tensor: `capacity`
    /// tensors are live or waiting out their grace period. Freeing tensors
    /// makes room (retryable). None of the other variants fits: no bytes
    /// are short, and the limit is a count of tensors, not of bytes.
    #[error(
        "metadata table full: {live} live tensors, capacity {capacity} slots (free tensors to make room)"
    )]
    TableFull {
        /// Live tensors at the time.
        live: usize,
        /// The most slots the table holds.
        capacity: usize,
    },
    /// A wait did not finish in time.
    #[error("timed out after {waited_ms} ms waiting for {what}")]
    Timeout {
        /// What was waited for.
        what: &'static str,
        /// How long it waited.
        waited_ms: u64,
    },
    /// A device caching pool could not serve a request: the figures PyTorch's
    /// "CUDA out of memory" message gives, and whether it can never fit.
    /// (A variant of its own because `OutOfMemory` has no room for the
    /// capacity, free, rounded and limit figures, and a `Box` keeps
    /// `AllocError` small.)
    #[error("{0}")]
    DeviceOutOfMemory(Box<DeviceOom>),
}

/// The figures of a device out-of-memory failure. `Display` reads like
/// PyTorch's message, with "tensorpool" for "PyTorch".
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceOom {
    /// The device.
    pub device: Device,
    /// Bytes asked for.
    pub requested: usize,
    /// Bytes after the pool's rounding.
    pub rounded: usize,
    /// Bytes the pool asked the driver for (the segment size).
    pub segment: usize,
    /// The device's total memory.
    pub total: usize,
    /// Free device memory at the time (as the driver reports it).
    pub free: usize,
    /// Bytes allocated by the pool (rounded block sizes).
    pub allocated: usize,
    /// Bytes the pool held from the driver.
    pub reserved: usize,
    /// The pool's byte limit (memory fraction or limit), if set.
    pub limit: Option<usize>,
    /// The request exceeds the total capacity or the limit: it will never fit.
    pub never_fits: bool,
}

impl DeviceOom {
    /// Bytes reserved but not allocated (cached).
    pub fn cached(&self) -> usize {
        self.reserved.saturating_sub(self.allocated)
    }
    /// What to try: never fits, fragmentation, or real exhaustion.
    pub fn hint(&self) -> &'static str {
        if self.never_fits {
            "This request can never fit: it is larger than the device's total capacity or the configured limit."
        } else if self.cached() >= self.rounded {
            "Reserved but unallocated memory is large: the cache is fragmented; set max_split_size or call trim()/empty_cache()."
        } else {
            "The device is exhausted: free tensors or lower the memory fraction of other users."
        }
    }
}

/// PyTorch's `format_size`: bytes up to 1 KiB, then KiB, MiB, GiB with two decimals.
pub fn format_size(size: usize) -> String {
    let s = size as f64;
    if size <= 1024 {
        format!("{size} bytes")
    } else if size <= 1 << 20 {
        format!("{:.2} KiB", s / 1024.0)
    } else if size <= 1 << 30 {
        format!("{:.2} MiB", s / 1048576.0)
    } else {
        format!("{:.2} GiB", s / 1073741824.0)
    }
}

impl core::fmt::Display for DeviceOom {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        let gpu = match self.device {
            Device::Cuda(n) => n,
            _ => 0,
        };
        write!(
            f,
            "CUDA out of memory. Tried to allocate {}. GPU {gpu} has a total capacity of {} of which {} is free. ",
            format_size(self.segment),
            format_size(self.total),
            format_size(self.free)
        )?;
        if let Some(l) = self.limit {
            write!(f, "{} allowed; ", format_size(l))?;
        }
        write!(
            f,
            "Of the allocated memory {} is allocated by tensorpool, and {} is reserved by tensorpool but unallocated. {} (requested {} B, rounded to {} B)",
            format_size(self.allocated),
            format_size(self.cached()),
            self.hint(),
            self.requested,
            self.rounded
        )
    }
}

impl AllocError {
    /// Whether retrying later (after frees or a `trim`) may succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            AllocError::OutOfMemory { .. }
                | AllocError::LimitExceeded { .. }
                | AllocError::Timeout { .. }
                | AllocError::TableFull { .. }
                | AllocError::Backend { .. }
                | AllocError::BudgetExceeded { .. }
        ) || matches!(self, AllocError::DeviceOutOfMemory(o) if !o.never_fits)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_name_request_and_limit() {
        let e = AllocError::LimitExceeded {
            device: Device::Host,
            requested: 4096,
            allocated: 100,
            reserved: 200,
            limit: 1000,
        };
        let s = e.to_string();
        for part in ["4096", "100", "200", "1000", "host"] {
            assert!(s.contains(part), "{s}");
        }
        assert!(e.is_retryable());
        let e = AllocError::InvalidLayout {
            size: 3,
            align: 3,
            problem: LayoutProblem::AlignNotPowerOfTwo,
        };
        assert!(e.to_string().contains("power of two"));
        assert!(!e.is_retryable());
    }
}
