//! [`MetaBackend`]: shape and size only, zero bytes of data.
//!
//! Every allocation gets an id and a metadata record, and the backend runs a
//! [`PoolModel`] of the host pool, so its `reserved_bytes` (current and peak)
//! are what a [`HostBackend`](super::HostBackend) would reserve for the same
//! requests from one thread (exact for alloc/free sequences; an upper bound
//! after `trim`, see the model's docs). Requests the host pool would refuse
//! are refused here with the same error.

use super::ledger::{self, Ledger};
use crate::allocator::{Addr, AllocRequest, Allocation, Device, TensorAllocator};
use crate::error::AllocError;
use crate::host::Prewarm;
use crate::host::model::PoolModel;
use crate::meta::{MetaTable, TensorId, TensorInfo};
use crate::stats::MemoryStats;
use parking_lot::Mutex;
use std::collections::HashMap;

#[derive(Debug)]
struct Sim {
    model: PoolModel,
    /// Mapped length of each live huge block (reuse may hand out more than asked).
    huge_len: HashMap<TensorId, usize>,
}

/// Metadata only: no bytes anywhere, reserved bytes predicted.
#[derive(Debug)]
pub struct MetaBackend {
    ledger: Ledger,
    sim: Mutex<Sim>,
}

impl Default for MetaBackend {
    fn default() -> Self {
        Self::new()
    }
}

impl MetaBackend {
    /// A backend predicting a host pool without a retained limit.
    pub fn new() -> Self {
        Self::with_retain_limit(None)
    }
    /// A backend predicting a host pool with this retained-bytes limit.
    pub fn with_retain_limit(limit: Option<usize>) -> Self {
        MetaBackend {
            ledger: Ledger::new(Device::Meta),
            sim: Mutex::new(Sim {
                model: PoolModel::new(limit),
                huge_len: HashMap::new(),
            }),
        }
    }
    /// The metadata table.
    pub fn table(&self) -> &MetaTable {
        &self.ledger.table
    }
    /// A meta backend applying the CUDA caching pool's policy (PyTorch's)
    /// to a device of `capacity` bytes: it predicts the pool's reserved
    /// bytes, peak included.
    #[cfg(feature = "cuda")]
    pub fn cuda_policy(
        capacity: usize,
        cfg: super::cuda::CudaConfig,
    ) -> Result<super::cuda::CudaModel, super::cuda::CudaConfigError> {
        super::cuda::CudaModel::new(capacity, cfg)
    }
    /// What the table recorded for `a`: size, alignment, address, device,
    /// the whole shape, dtype and strides, flags and access counters. `a`
    /// is verified first, as for a free: a stale, freed, forged or foreign
    /// allocation is an error.
    pub fn meta(&self, a: &Allocation) -> Result<TensorInfo, AllocError> {
        self.ledger.info(a)
    }
    /// Models `HostPool::prewarm(plan)`.
    pub fn prewarm(&self, plan: &Prewarm) {
        let mut s = self.sim.lock();
        for &(size, count) in plan.entries() {
            s.model.prewarm(size, count);
        }
    }
}

// SAFETY: no allocation carries a host address (`Addr::None` always), so
// the trait's address guarantees hold vacuously; ids come from the
// process-wide issuer.
unsafe impl TensorAllocator for MetaBackend {
    fn device(&self) -> Device {
        Device::Meta
    }

    fn allocate(&self, req: &AllocRequest) -> Result<Allocation, AllocError> {
        let c = ledger::check(req)?;
        let a = self.ledger.record(req, c, Addr::None)?;
        if let Some(l) = c.layout {
            let mut s = self.sim.lock();
            let len = s.model.alloc(l.size(), l.align());
            if len != c.rounded {
                s.huge_len.insert(a.id(), len);
            }
        }
        Ok(a)
    }

    unsafe fn deallocate(&self, a: &Allocation) -> Result<(), AllocError> {
        self.ledger.release(a)?;
        if a.size() > 0 {
            let mut s = self.sim.lock();
            let len = s.huge_len.remove(&a.id()).unwrap_or_else(|| {
                crate::host::size_class::usable_size_for(a.size(), a.align()).unwrap_or(0)
            });
            s.model.free(a.size(), a.align(), len);
        }
        Ok(())
    }

    fn stats(&self) -> MemoryStats {
        let mut st = MemoryStats::default();
        self.ledger.fill(&mut st);
        let s = self.sim.lock();
        st.reserved_bytes = s.model.reserved();
        st.segment = s.model.segments();
        st.cache_misses = s.model.maps();
        st.cache_hits = self
            .ledger
            .total_allocations()
            .saturating_sub(st.cache_misses);
        st
    }

    fn rounded_size(&self, req: &AllocRequest) -> Result<usize, AllocError> {
        ledger::check(req).map(|c| c.rounded)
    }

    fn trim(&self) -> usize {
        let mut s = self.sim.lock();
        let before = s.model.reserved().current;
        s.model.trim();
        (before - s.model.reserved().current) as usize
    }
}
