//! What every backend does besides moving bytes: validate requests, issue
//! ids, record metadata, keep PyTorch-style counters, and check frees.

use crate::allocator::{Addr, AllocRequest, Allocation, Device};
use crate::error::{AllocError, LayoutProblem};
use crate::host::size_class::{MAX_ALIGN, usable_size_for};
use crate::meta::{AddrKind, MetaTable, NewTensor, TensorInfo, TensorKey, TensorMeta, next_id};
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
        let (addr_kind, raw) = AddrKind::split(addr);
        let t = NewTensor {
            size: req.size as u64,
            align: req.align as u64,
            device: self.device,
            shape: req.shape,
            dtype: req.dtype,
            flags: req.flags,
            addr: raw,
            addr_kind,
        };
        let key = self.table.insert(id, &t)?;
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

    /// Checks that `a` is a live allocation of this ledger exactly as
    /// recorded: device, id and slot, size and alignment
    /// ([`AllocError::LayoutMismatch`]), address kind and address
    /// ([`AllocError::Mismatch`]). Changes nothing.
    pub fn verify(&self, a: &Allocation) -> Result<(TensorKey, TensorInfo), AllocError> {
        let id = a.id().get();
        if a.device() != self.device {
            return Err(AllocError::WrongDevice {
                id,
                expected: self.device,
                found: a.device(),
            });
        }
        let unknown = || AllocError::UnknownId {
            id,
            device: self.device,
        };
        let key = TensorKey::of(a).ok_or_else(unknown)?;
        let info = self.table.info(key).ok_or_else(unknown)?;
        if info.size() != a.size() as u64 || info.align() != a.align() as u64 {
            return Err(AllocError::LayoutMismatch {
                id,
                size: a.size(),
                align: a.align(),
                recorded_size: info.size() as usize,
                recorded_align: info.align() as usize,
            });
        }
        let mismatch = |field, given, recorded| {
            Err(AllocError::Mismatch {
                id,
                field,
                given,
                recorded,
            })
        };
        if info.device() != a.device() {
            return mismatch(
                "device",
                u64::from(a.device().code()),
                u64::from(info.device().code()),
            );
        }
        let (kind, raw) = AddrKind::split(a.addr());
        if kind != info.addr_kind() {
            return mismatch("address kind", kind as u64, info.addr_kind() as u64);
        }
        if raw != info.address() {
            return mismatch("address", raw, info.address());
        }
        Ok((key, info))
    }

    /// The recorded metadata of `a`, after [`verify`](Self::verify).
    pub fn info(&self, a: &Allocation) -> Result<TensorInfo, AllocError> {
        self.verify(a).map(|(_, info)| info)
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
