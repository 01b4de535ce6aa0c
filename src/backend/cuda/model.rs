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
use parking_lot::Mutex;
use std::collections::HashMap;

/// Predicts a CUDA device's pool. See the module docs.
#[derive(Debug)]
pub struct CudaModel {
    inner: CudaBackend<SimDriver>,
    /// Tensor id → the pool-side handle (the model's handles carry no address).
    live: Mutex<HashMap<u64, Allocation>>,
}

impl CudaModel {
    /// A model of a device with `capacity` bytes and pool configuration `cfg`.
    pub fn new(capacity: usize, cfg: CudaConfig) -> Result<Self, CudaConfigError> {
        Ok(CudaModel {
            inner: CudaBackend::with_driver(SimDriver::new(capacity), cfg)?,
            live: Mutex::new(HashMap::new()),
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

    /// The pool-side handle for a model handle: the recorded address with
    /// the given size, alignment and tag, so the pool checks those.
    fn inner_alloc(&self, a: &Allocation) -> Result<Allocation, AllocError> {
        let id = a.id().get();
        if a.device() != Device::Meta {
            return Err(AllocError::WrongDevice {
                id,
                expected: Device::Meta,
                found: a.device(),
            });
        }
        let inner = *self.live.lock().get(&id).ok_or(AllocError::UnknownId {
            id,
            device: Device::Meta,
        })?;
        let given = match a.addr() {
            Addr::None => None,
            Addr::Host(p) => Some(p.as_ptr() as u64),
            Addr::Device(p) | Addr::Remote(p) => Some(p),
        };
        if let Some(g) = given {
            return Err(AllocError::Mismatch {
                id,
                field: "address",
                given: g,
                recorded: 0,
            });
        }
        Ok(Allocation::new(
            a.id(),
            inner.addr(),
            a.size(),
            a.align(),
            inner.device(),
            a.tag(),
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
        self.live.lock().insert(a.id().get(), a);
        Ok(Allocation::new(
            a.id(),
            Addr::None,
            a.size(),
            a.align(),
            Device::Meta,
            a.tag(),
        ))
    }
    unsafe fn deallocate(&self, a: &Allocation) -> Result<(), AllocError> {
        let inner = self.inner_alloc(a)?;
        // SAFETY: the model has no bytes; nothing can be used after free.
        unsafe { self.inner.deallocate(&inner) }?;
        self.live.lock().remove(&a.id().get());
        Ok(())
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
