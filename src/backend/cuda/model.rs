//! [`CudaModel`]: the caching pool's policy as a meta backend — shapes and
//! sizes only, no bytes anywhere — so a CUDA workload's peak reserved bytes
//! can be predicted on a machine without a GPU.
//!
//! It runs the very same [`CachingPool`](super::CachingPool) over a
//! [`SimDriver`] of the device's capacity (the simulation stores bytes only
//! when written, and the model never writes), so its `reserved_bytes` equal
//! the real pool's for the same sequence of requests on one stream.

use super::backend::CudaBackend;
use super::config::{CudaConfig, CudaConfigError};
use super::sim::SimDriver;
use super::stats::CudaStats;
use crate::allocator::{Addr, AllocRequest, Allocation, Device, TensorAllocator};
use crate::error::AllocError;
use crate::stats::MemoryStats;

/// Predicts a CUDA device's pool. See the module docs.
#[derive(Debug)]
pub struct CudaModel {
    inner: CudaBackend<SimDriver>,
}

impl CudaModel {
    /// A model of a device with `capacity` bytes and pool configuration `cfg`.
    pub fn new(capacity: usize, cfg: CudaConfig) -> Result<Self, CudaConfigError> {
        Ok(CudaModel {
            inner: CudaBackend::with_driver(SimDriver::new(capacity), cfg)?,
        })
    }
    /// PyTorch-named statistics of the modelled pool.
    pub fn memory_stats(&self) -> CudaStats {
        self.inner.memory_stats()
    }
    /// The modelled pool's backend.
    pub fn pool_backend(&self) -> &CudaBackend<SimDriver> {
        &self.inner
    }

    /// The pool-side handle of a model allocation (its address rides in the tag).
    fn inner_alloc(&self, a: &Allocation) -> Result<Allocation, AllocError> {
        if a.device() != Device::Meta {
            return Err(AllocError::WrongDevice {
                id: a.id().get(),
                expected: Device::Meta,
                found: a.device(),
            });
        }
        let addr = if a.tag() == 0 {
            Addr::None
        } else {
            Addr::Device(a.tag())
        };
        Ok(Allocation::new(
            a.id(),
            addr,
            a.size(),
            a.align(),
            self.inner.device(),
            0,
        ))
    }
}

// SAFETY: every allocation is `Addr::None`; ids come from the process-wide
// issuer through the inner backend.
unsafe impl TensorAllocator for CudaModel {
    fn device(&self) -> Device {
        Device::Meta
    }
    fn allocate(&self, req: &AllocRequest) -> Result<Allocation, AllocError> {
        let mut r = *req;
        r.zeroed = false;
        let a = self.inner.allocate(&r)?;
        let tag = match a.addr() {
            Addr::Device(p) => p,
            _ => 0,
        };
        Ok(Allocation::new(
            a.id(),
            Addr::None,
            a.size(),
            a.align(),
            Device::Meta,
            tag,
        ))
    }
    unsafe fn deallocate(&self, a: &Allocation) -> Result<(), AllocError> {
        let inner = self.inner_alloc(a)?;
        // SAFETY: the model has no bytes; nothing can be used after free.
        unsafe { self.inner.deallocate(&inner) }
    }
    fn stats(&self) -> MemoryStats {
        let mut s = self.inner.stats();
        s.device = Some(Device::Meta);
        s
    }
    fn trim(&self) -> usize {
        self.inner.trim()
    }
}
