//! [`CudaBackend`]: the caching pool behind [`TensorAllocator`].
//!
//! Requests go to the device's [`CachingPool`]; `AllocRequest::stream` is
//! the stream (default 0). Every handle given back (free, write, read,
//! `record_stream`) is checked against the pool's record — live, same
//! address, size, alignment and device — and a mismatch is a typed error
//! that changes nothing.

use super::config::{CudaConfig, CudaConfigError};
use super::driver::{CudaDriver, StreamId};
use super::pool::{CachingPool, driver_error};
use super::snapshot::{Snapshot, TraceEntry};
use super::stats::CudaStats;
use crate::allocator::{Addr, AllocRequest, Allocation, Device, TensorAllocator};
use crate::error::{AllocError, LayoutProblem};
use crate::meta::next_id;
use crate::stats::MemoryStats;

/// The largest alignment served: blocks start at multiples of 512 bytes
/// from a segment base the driver aligns to at least 512.
pub const MAX_ALIGN: usize = 512;

/// A CUDA device's memory through PyTorch's caching-allocator policy.
#[derive(Debug)]
pub struct CudaBackend<D: CudaDriver> {
    pool: CachingPool<D>,
}

impl<D: CudaDriver> CudaBackend<D> {
    /// A backend over `driver` with `cfg`.
    pub fn with_driver(driver: D, cfg: CudaConfig) -> Result<Self, CudaConfigError> {
        Ok(CudaBackend {
            pool: CachingPool::new(driver, cfg)?,
        })
    }

    /// The pool.
    pub fn pool(&self) -> &CachingPool<D> {
        &self.pool
    }
    /// The driver.
    pub fn driver(&self) -> &D {
        self.pool.driver()
    }
    /// PyTorch-named statistics.
    pub fn memory_stats(&self) -> CudaStats {
        self.pool.stats()
    }
    /// Every segment and block.
    pub fn snapshot(&self) -> Snapshot {
        self.pool.snapshot()
    }
    /// The history ring.
    pub fn history(&self) -> Vec<TraceEntry> {
        self.pool.history()
    }
    /// Returns every unsplit cached block to the driver (`empty_cache`),
    /// reporting driver errors (`trim` swallows them and returns 0).
    pub fn empty_cache(&self) -> Result<usize, AllocError> {
        self.pool.empty_cache()
    }
    /// `set_per_process_memory_fraction`.
    pub fn set_memory_fraction(&self, f: f64) -> Result<(), CudaConfigError> {
        self.pool.set_memory_fraction(f)
    }
    /// Marks `a` as used on `stream` (`Tensor.record_stream`): its block is
    /// not reused until the work queued on `stream` before its free is done.
    pub fn record_stream(&self, a: &Allocation, stream: StreamId) -> Result<(), AllocError> {
        self.pool.record_stream(a, stream)
    }
    /// The device address of `a` after checking it, for kernels (`None` for
    /// a zero-size allocation).
    pub fn device_ptr(&self, a: &Allocation) -> Result<Option<u64>, AllocError> {
        let live = self.pool.verify(a)?;
        Ok((live.ptr != 0).then_some(live.ptr))
    }

    fn checked_ptr(&self, a: &Allocation, offset: usize, len: usize) -> Result<u64, AllocError> {
        let live = self.pool.verify(a)?;
        a.check_range(offset, len)?;
        Ok(live.ptr + offset as u64)
    }
}

// SAFETY: no allocation carries `Addr::Host`, so the trait's host-pointer
// guarantees hold vacuously; device ranges never overlap (the pool tiles
// driver segments, which `CudaDriver` promises are disjoint); zeroed
// requests are memset before they are returned; ids come from the
// process-wide issuer.
unsafe impl<D: CudaDriver> TensorAllocator for CudaBackend<D> {
    fn device(&self) -> Device {
        self.pool.device()
    }

    fn allocate(&self, req: &AllocRequest) -> Result<Allocation, AllocError> {
        req.check_align()?;
        if req.align > MAX_ALIGN {
            return Err(AllocError::InvalidLayout {
                size: req.size,
                align: req.align,
                problem: LayoutProblem::AlignTooLarge { max: MAX_ALIGN },
            });
        }
        let id = next_id().ok_or(AllocError::Unsupported {
            what: "tensor id space exhausted (2^64 ids issued)",
        })?;
        let stream = req.stream.unwrap_or(0);
        let (ptr, tag) = self.pool.malloc(req.size, stream, id.get(), req.align)?;
        let addr = if ptr == 0 {
            Addr::None
        } else {
            Addr::Device(ptr)
        };
        let a = Allocation::new(id, addr, req.size, req.align, self.device(), tag);
        if req.zeroed && req.size > 0 {
            // SAFETY: `ptr .. ptr + size` is inside the block just handed out.
            let r = unsafe { self.driver().memset(ptr, 0, req.size) };
            if let Err(e) = r {
                self.pool.free(&a)?;
                return Err(driver_error(e));
            }
        }
        Ok(a)
    }

    unsafe fn deallocate(&self, a: &Allocation) -> Result<(), AllocError> {
        self.pool.free(a)
    }

    fn stats(&self) -> MemoryStats {
        let (s, handles) = self.pool.stats_and_handles();
        MemoryStats {
            device: Some(self.device()),
            allocated_bytes: s.requested_bytes[0],
            reserved_bytes: s.reserved_bytes[0],
            active_bytes: s.active_bytes[0],
            allocation: handles,
            segment: s.segment[0],
            num_ooms: s.num_ooms,
            num_alloc_retries: s.num_alloc_retries,
            cache_misses: s.num_device_alloc,
            cache_hits: s.allocation[0].allocated.saturating_sub(s.num_device_alloc),
            per_category: Default::default(),
        }
    }

    fn trim(&self) -> usize {
        self.pool.empty_cache().unwrap_or(0)
    }

    fn write(&self, a: &Allocation, offset: usize, src: &[u8]) -> Result<(), AllocError> {
        let p = self.checked_ptr(a, offset, src.len())?;
        if src.is_empty() {
            return Ok(());
        }
        // SAFETY: `checked_ptr` confirmed `a` is live with this address and
        // that `offset + len ≤ size`, so the range lies inside its block,
        // inside a live segment; the caller does not free `a` meanwhile.
        unsafe { self.driver().copy_htod(p, src) }.map_err(driver_error)
    }

    fn read(&self, a: &Allocation, offset: usize, dst: &mut [u8]) -> Result<(), AllocError> {
        let p = self.checked_ptr(a, offset, dst.len())?;
        if dst.is_empty() {
            return Ok(());
        }
        // SAFETY: as in `write`.
        unsafe { self.driver().copy_dtoh(dst, p) }.map_err(driver_error)
    }

    fn synchronize(&self) -> Result<(), AllocError> {
        self.driver().device_synchronize().map_err(driver_error)
    }
}
