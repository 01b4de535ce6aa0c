//! What every backend does besides moving bytes: validate requests, issue
//! ids, record metadata, keep PyTorch-style counters, and check frees.

use crate::allocator::{Addr, AllocRequest, Allocation, Device};
use crate::error::{AllocError, LayoutProblem};
use crate::host::size_class::{MAX_ALIGN, usable_size_for};
use crate::meta::{MetaTable, NewTensor, TensorKey, TensorMeta, next_id};
use crate::stats::{AtomicStat, MemoryStats};
use core::alloc::Layout;
use std::sync::atomic::{AtomicU64, Ordering};

/// A checked request: its layout (size ≥ 1; `None` for size 0) and the
/// bytes the host pool rounds it to.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Checked {
    pub layout: Option<Layout>,
    pub rounded: usize,
}

/// Validates size and alignment against the host pool's rules.
pub(crate) fn check(req: &AllocRequest) -> Result<Checked, AllocError> {
    req.check_align()?;
    let (size, align) = (req.size, req.align);
    let bad = |problem| AllocError::InvalidLayout {
        size,
        align,
        problem,
    };
    if align > MAX_ALIGN {
        return Err(bad(LayoutProblem::AlignTooLarge { max: MAX_ALIGN }));
    }
    if size == 0 {
        return Ok(Checked {
            layout: None,
            rounded: 0,
        });
    }
    let rounded = usable_size_for(size, align).ok_or(bad(LayoutProblem::SizeOverflow))?;
    let layout =
        Layout::from_size_align(size, align).map_err(|_| bad(LayoutProblem::SizeOverflow))?;
    Ok(Checked {
        layout: Some(layout),
        rounded,
    })
}

/// The metadata table plus counters.
#[derive(Debug)]
pub(crate) struct Ledger {
    pub table: MetaTable,
    device: Device,
    allocated: AtomicStat,
    active: AtomicStat,
    count: AtomicStat,
    ooms: AtomicU64,
}

impl Ledger {
    pub fn new(device: Device) -> Self {
        Ledger {
            table: MetaTable::new(),
            device,
            allocated: AtomicStat::new(),
            active: AtomicStat::new(),
            count: AtomicStat::new(),
            ooms: AtomicU64::new(0),
        }
    }

    /// Counts an out-of-memory failure and passes the error on, with the
    /// ledger's allocated bytes filled in.
    pub fn oom(&self, e: AllocError) -> AllocError {
        self.ooms.fetch_add(1, Ordering::Relaxed);
        match e {
            AllocError::OutOfMemory {
                device,
                requested,
                reserved,
                hint,
                ..
            } => AllocError::OutOfMemory {
                device,
                requested,
                allocated: self.allocated.current() as usize,
                reserved,
                hint,
            },
            e => e,
        }
    }

    /// Issues an id, records the tensor and counts it.
    pub fn record(
        &self,
        req: &AllocRequest,
        c: Checked,
        addr: Addr,
    ) -> Result<Allocation, AllocError> {
        let id = next_id().ok_or(AllocError::Unsupported {
            what: "tensor id space exhausted (2^64 ids issued)",
        })?;
        let raw = match addr {
            Addr::Host(p) => p.as_ptr() as u64,
            Addr::Device(a) | Addr::Remote(a) => a,
            Addr::None => 0,
        };
        let t = NewTensor {
            size: req.size as u64,
            align: req.align as u64,
            device: self.device,
            shape: req.shape,
            dtype: req.dtype,
            flags: req.flags,
            addr: raw,
        };
        let key = self.table.insert(id, &t);
        self.allocated.add(req.size as u64);
        self.active.add(c.rounded as u64);
        self.count.add(1);
        Ok(Allocation::new(
            id,
            addr,
            req.size,
            req.align,
            self.device,
            u64::from(key.slot),
        ))
    }

    /// Checks that `a` is a live allocation of this ledger, as recorded.
    /// Changes nothing.
    pub fn verify(&self, a: &Allocation) -> Result<(TensorKey, TensorMeta), AllocError> {
        if a.device() != self.device {
            return Err(AllocError::WrongDevice {
                id: a.id().get(),
                expected: self.device,
                found: a.device(),
            });
        }
        let unknown = AllocError::UnknownId {
            id: a.id().get(),
            device: self.device,
        };
        let slot = u32::try_from(a.tag()).map_err(|_| unknown.clone())?;
        let key = TensorKey { id: a.id(), slot };
        let m = self.table.get(key).ok_or(unknown.clone())?;
        if m.size() != a.size() as u64 {
            return Err(AllocError::LayoutMismatch {
                id: a.id().get(),
                size: a.size(),
                align: a.align(),
                recorded_size: m.size() as usize,
                recorded_align: a.align(),
            });
        }
        Ok((key, m))
    }

    /// Checks that `a` is a live allocation of this ledger and removes it.
    /// On error nothing changes.
    pub fn release(&self, a: &Allocation) -> Result<TensorMeta, AllocError> {
        let (key, _) = self.verify(a)?;
        // A racing double free loses here: exactly one `remove` succeeds.
        let m = self.table.remove(key).ok_or(AllocError::UnknownId {
            id: a.id().get(),
            device: self.device,
        })?;
        let rounded = if a.size() == 0 {
            0
        } else {
            usable_size_for(a.size(), a.align()).unwrap_or(0)
        };
        self.allocated.sub(a.size() as u64);
        self.active.sub(rounded as u64);
        self.count.sub(1);
        Ok(m)
    }

    /// Fills the ledger's part of a stats snapshot.
    pub fn fill(&self, s: &mut MemoryStats) {
        s.device = Some(self.device);
        s.allocated_bytes = self.allocated.get();
        s.active_bytes = self.active.get();
        s.allocation = self.count.get();
        s.num_ooms = self.ooms.load(Ordering::Relaxed);
        s.per_category = self.table.usage_by_category();
    }

    /// Allocations ever made.
    pub fn total_allocations(&self) -> u64 {
        self.count.get().allocated
    }
}
