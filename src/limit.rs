//! [`Limited`]: a byte limit around any backend.
//!
//! Counts the bytes of live allocations made through it, as the inner
//! backend rounds them ([`TensorAllocator::rounded_size`]: what its
//! `active_bytes` grows by). A request whose layout is invalid gets the
//! inner backend's [`AllocError::InvalidLayout`]; one that would take the
//! total over the limit is refused with
//! [`AllocError::LimitExceeded`] (retryable: free something) or, if it is
//! larger than the limit itself, [`AllocError::NeverFits`]. The check and the
//! reservation are one atomic step, so concurrent callers cannot overshoot.

use crate::allocator::{AllocRequest, Allocation, Device, TensorAllocator};
use crate::error::AllocError;
use crate::stats::MemoryStats;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

/// A backend with a byte limit.
#[derive(Debug)]
pub struct Limited<A> {
    inner: A,
    limit: usize,
    used: AtomicUsize,
    refused: AtomicU64,
}

impl<A: TensorAllocator> Limited<A> {
    /// Wraps `inner` with a limit of `limit` bytes.
    pub fn new(inner: A, limit: usize) -> Self {
        Self {
            inner,
            limit,
            used: AtomicUsize::new(0),
            refused: AtomicU64::new(0),
        }
    }
    /// The limit in bytes.
    pub fn limit(&self) -> usize {
        self.limit
    }
    /// Bytes currently counted against the limit.
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }
    /// The wrapped backend.
    pub fn inner(&self) -> &A {
        &self.inner
    }

    /// The bytes `allocate` counted for `a` (the inner backend's rounding).
    fn counted(&self, a: &Allocation) -> usize {
        let req = AllocRequest::new(a.size(), a.align());
        self.inner.rounded_size(&req).unwrap_or(a.size())
    }

    fn refuse(&self, e: AllocError) -> AllocError {
        self.refused.fetch_add(1, Ordering::Relaxed);
        e
    }
}

// SAFETY: every allocation handed out is the inner backend's, unchanged, so
// the inner backend's guarantees carry over.
unsafe impl<A: TensorAllocator> TensorAllocator for Limited<A> {
    fn device(&self) -> Device {
        self.inner.device()
    }

    fn allocate(&self, req: &AllocRequest) -> Result<Allocation, AllocError> {
        let device = self.device();
        // The layout first: a size that cannot be rounded is invalid, not
        // too large for the limit.
        let size = self.inner.rounded_size(req)?;
        if size > self.limit {
            return Err(self.refuse(AllocError::NeverFits {
                device,
                requested: size,
                limit: self.limit,
            }));
        }
        let mut cur = self.used.load(Ordering::Relaxed);
        loop {
            let Some(new) = cur.checked_add(size).filter(|&n| n <= self.limit) else {
                let reserved = self.inner.stats().reserved_bytes.current as usize;
                return Err(self.refuse(AllocError::LimitExceeded {
                    device,
                    requested: size,
                    allocated: cur,
                    reserved,
                    limit: self.limit,
                }));
            };
            match self
                .used
                .compare_exchange_weak(cur, new, Ordering::AcqRel, Ordering::Relaxed)
            {
                Ok(_) => break,
                Err(a) => cur = a,
            }
        }
        self.inner.allocate(req).inspect_err(|_| {
            self.used.fetch_sub(size, Ordering::AcqRel);
        })
    }

    unsafe fn deallocate(&self, a: &Allocation) -> Result<(), AllocError> {
        // SAFETY: forwarded from the caller.
        unsafe { self.inner.deallocate(a) }?;
        // The inner backend verified `a`'s size and alignment against its
        // record, so this is the amount `allocate` counted.
        self.used.fetch_sub(self.counted(a), Ordering::AcqRel);
        Ok(())
    }

    fn stats(&self) -> MemoryStats {
        let mut s = self.inner.stats();
        s.num_ooms += self.refused.load(Ordering::Relaxed);
        s
    }

    fn trim(&self) -> usize {
        self.inner.trim()
    }

    fn write(&self, a: &Allocation, offset: usize, src: &[u8]) -> Result<(), AllocError> {
        self.inner.write(a, offset, src)
    }

    fn read(&self, a: &Allocation, offset: usize, dst: &mut [u8]) -> Result<(), AllocError> {
        self.inner.read(a, offset, dst)
    }

    fn synchronize(&self) -> Result<(), AllocError> {
        self.inner.synchronize()
    }

    fn rounded_size(&self, req: &AllocRequest) -> Result<usize, AllocError> {
        self.inner.rounded_size(req)
    }
}
