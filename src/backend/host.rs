//! [`HostBackend`]: the host pool plus tensor metadata and statistics.

use super::ledger::{self, Ledger};
use crate::allocator::{Addr, AllocRequest, Allocation, Device, TensorAllocator};
use crate::error::AllocError;
use crate::host::{HostPool, Prewarm};
use crate::meta::MetaTable;
use crate::stats::MemoryStats;
use core::alloc::Layout;

/// Host memory from a [`HostPool`], with every tensor recorded in a
/// [`MetaTable`] (so double frees and stale ids are errors, and per-category
/// usage comes from the table's aggregate).
#[derive(Debug)]
pub struct HostBackend {
    pool: HostPool,
    ledger: Ledger,
}

impl Default for HostBackend {
    fn default() -> Self {
        Self::new()
    }
}

impl HostBackend {
    /// A backend on a fresh pool. Maps nothing.
    pub fn new() -> Self {
        Self::with_pool(HostPool::new())
    }
    /// A backend on `pool` (which may be shared with other users).
    pub fn with_pool(pool: HostPool) -> Self {
        HostBackend {
            pool,
            ledger: Ledger::new(Device::Host),
        }
    }
    /// The pool.
    pub fn pool(&self) -> &HostPool {
        &self.pool
    }
    /// The metadata table.
    pub fn table(&self) -> &MetaTable {
        &self.ledger.table
    }
    /// Maps and faults in the blocks of `plan`.
    pub fn prewarm(&self, plan: &Prewarm) -> Result<usize, AllocError> {
        self.pool.prewarm(plan)
    }
}

// SAFETY: 1. host blocks come from `HostPool::allocate` with the request's
// size and alignment, valid until deallocated, and the pool never hands out
// a live block twice; 2. zeroed requests come from `allocate_zeroed`; 3. ids come from
// the process-wide issuer (unique, never reused).
unsafe impl TensorAllocator for HostBackend {
    fn device(&self) -> Device {
        Device::Host
    }

    fn allocate(&self, req: &AllocRequest) -> Result<Allocation, AllocError> {
        let c = ledger::check(req)?;
        let addr = match c.layout {
            None => Addr::None,
            Some(l) => {
                let p = if req.zeroed {
                    self.pool.allocate_zeroed(l)
                } else {
                    self.pool.allocate(l)
                };
                Addr::Host(p.map_err(|e| self.ledger.oom(e))?)
            }
        };
        self.ledger.record(req, c, addr).inspect_err(|_| {
            if let (Addr::Host(p), Some(l)) = (addr, c.layout) {
                // SAFETY: allocated just above with `l`, never handed out.
                unsafe { self.pool.deallocate(p, l) };
            }
        })
    }

    unsafe fn deallocate(&self, a: &Allocation) -> Result<(), AllocError> {
        self.ledger.release(a)?;
        if let Some(p) = a.host_ptr() {
            let l = Layout::from_size_align(a.size(), a.align()).map_err(|_| {
                AllocError::UnknownId {
                    id: a.id().get(),
                    device: Device::Host,
                }
            })?;
            // SAFETY: the ledger confirmed `a` was live here with this size;
            // it was allocated with this layout, and the caller stops using it.
            unsafe { self.pool.deallocate(p, l) };
        }
        Ok(())
    }

    fn stats(&self) -> MemoryStats {
        let mut s = MemoryStats::default();
        self.ledger.fill(&mut s);
        let p = self.pool.stats();
        s.reserved_bytes = p.reserved;
        s.segment = p.segment;
        s.cache_misses = p.os_maps as u64;
        s.cache_hits = self
            .ledger
            .total_allocations()
            .saturating_sub(s.cache_misses);
        s
    }

    fn trim(&self) -> usize {
        self.pool.trim()
    }
}
