//! [`Limited`]: a byte limit around any backend.
//!
//! Counts requested bytes of live allocations made through it. A request
//! that would take the total over the limit is refused with
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
        let size = req.size;
        let device = self.device();
        if size > self.limit {
            return Err(self.refuse(AllocError::NeverFits {
                device,
                requested: size,
                limit: self.limit,
            }));
        }
        let mut cur = self.used.load(Ordering::Relaxed);
        loop {
            if cur + size > self.limit {
                let reserved = self.inner.stats().reserved_bytes.current as usize;
                return Err(self.refuse(AllocError::LimitExceeded {
                    device,
                    requested: size,
                    allocated: cur,
                    reserved,
                    limit: self.limit,
                }));
            }
            match self.used.compare_exchange_weak(
                cur,
                cur + size,
                Ordering::AcqRel,
                Ordering::Relaxed,
            ) {
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
        self.used.fetch_sub(a.size(), Ordering::AcqRel);
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
}
