//! [`HostBackend`]: the host pool plus tensor metadata and statistics.

use super::ledger::{self, Ledger};
use crate::allocator::{Addr, AllocRequest, Allocation, Device, TensorAllocator};
use crate::error::AllocError;
use crate::host::{HostPool, Prewarm};
use crate::meta::{MetaTable, TensorInfo};
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
    /// What the table recorded for `a`: size, alignment, address, device,
    /// the whole shape, dtype and strides, flags and access counters. `a`
    /// is verified first, as for a free: a stale, freed, forged or foreign
    /// allocation is an error.
    pub fn meta(&self, a: &Allocation) -> Result<TensorInfo, AllocError> {
        self.ledger.info(a)
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
            // SAFETY: the ledger confirmed that `a` is live here with this
            // address, size and alignment, as recorded when it was allocated
            // with this layout; the caller stops using it.
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
        (s.cache_hits, s.cache_misses) = (p.cache_hits, p.cache_misses);
        s
    }

    fn rounded_size(&self, req: &AllocRequest) -> Result<usize, AllocError> {
        ledger::check(req).map(|c| c.rounded)
    }

    fn trim(&self) -> usize {
        self.pool.trim()
    }

    fn write(&self, a: &Allocation, offset: usize, src: &[u8]) -> Result<(), AllocError> {
        let p = self.live_range(a, offset, src.len())?;
        // SAFETY: 1. `live_range` checked that `a` is live here and that
        // `offset + len ≤ a.size()`, so `p .. p + len` lies inside a block the
        // pool handed out for `a`; 2. `deallocate`'s contract forbids freeing
        // `a` while it is in use, so the block stays live for this copy;
        // 3. `src` is a distinct borrow, so the ranges do not overlap.
        unsafe { core::ptr::copy_nonoverlapping(src.as_ptr(), p, src.len()) };
        Ok(())
    }

    fn read(&self, a: &Allocation, offset: usize, dst: &mut [u8]) -> Result<(), AllocError> {
        let p = self.live_range(a, offset, dst.len())?;
        // SAFETY: as in `write`, with the copy going the other way.
        unsafe { core::ptr::copy_nonoverlapping(p, dst.as_mut_ptr(), dst.len()) };
        Ok(())
    }
}

impl HostBackend {
    /// The host address of `len` bytes at `offset` of `a`, after checking
    /// that `a` is live as recorded and the range lies inside it. For a
    /// zero-length range a dangling (never dereferenced) pointer.
    fn live_range(&self, a: &Allocation, offset: usize, len: usize) -> Result<*mut u8, AllocError> {
        self.ledger.verify(a)?;
        a.check_range(offset, len)?;
        Ok(match a.host_ptr() {
            // `offset ≤ size`, so the sum stays inside (or one past) the block.
            Some(p) => p.as_ptr().wrapping_add(offset),
            None => core::ptr::NonNull::<u8>::dangling().as_ptr(),
        })
    }
}
