//! Tensor ids: non-zero, sequential from 1 per process, never reused.
//!
//! One `fetch_add` per id. The counter is 64-bit: at 10^9 ids a second it
//! would take 584 years to wrap, and [`IdIssuer::issue`] refuses (returns
//! `None`) rather than wrap, so "never reused" holds unconditionally.

use crate::sync::{AtomicU64, Ordering};
use core::num::NonZeroU64;

/// A tensor's identity: non-zero, unique within the process.
#[repr(transparent)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TensorId(NonZeroU64);

impl TensorId {
    /// The raw value (≥ 1).
    #[inline]
    pub fn get(self) -> u64 {
        self.0.get()
    }
    /// Rebuilds an id from its raw value (`None` for 0). An id made this way
    /// is only as good as the number: backends check it against their table.
    #[inline]
    pub fn from_raw(v: u64) -> Option<Self> {
        NonZeroU64::new(v).map(TensorId)
    }
}

impl core::fmt::Display for TensorId {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "#{}", self.0)
    }
}

/// Issues ids 1, 2, 3, … Lock-free; loom-modelled in `tests/loom.rs`.
#[derive(Debug)]
pub struct IdIssuer {
    next: AtomicU64,
}

impl IdIssuer {
    /// An issuer whose first id is 1.
    #[cfg(not(tensorpool_loom))]
    pub const fn new() -> Self {
        Self {
            next: AtomicU64::new(1),
        }
    }
    /// An issuer whose first id is 1.
    #[cfg(tensorpool_loom)]
    pub fn new() -> Self {
        Self {
            next: AtomicU64::new(1),
        }
    }

    /// The next id; `None` once 2^64 - 1 ids have been issued.
    #[inline]
    pub fn issue(&self) -> Option<TensorId> {
        // Relaxed is enough: uniqueness comes from the RMW's total order on
        // this one location; no other memory is published through it.
        let v = self.next.fetch_add(1, Ordering::Relaxed);
        if v == 0 {
            // Wrapped: pin the counter at 0 so every later call fails too.
            self.next.store(0, Ordering::Relaxed);
            return None;
        }
        TensorId::from_raw(v)
    }

    /// How many ids have been issued.
    pub fn issued(&self) -> u64 {
        self.next.load(Ordering::Relaxed).saturating_sub(1)
    }
}

impl Default for IdIssuer {
    fn default() -> Self {
        Self::new()
    }
}

/// The process-wide issuer every backend draws from.
#[cfg(not(tensorpool_loom))]
pub(crate) static GLOBAL_IDS: IdIssuer = IdIssuer::new();

/// The next process-wide id.
#[cfg(not(tensorpool_loom))]
#[inline]
pub fn next_id() -> Option<TensorId> {
    GLOBAL_IDS.issue()
}

#[cfg(all(test, not(tensorpool_loom)))]
mod tests {
    use super::*;

    #[test]
    fn sequential_from_one() {
        let i = IdIssuer::new();
        assert_eq!(i.issue().unwrap().get(), 1);
        assert_eq!(i.issue().unwrap().get(), 2);
        assert_eq!(i.issued(), 2);
    }

    #[test]
    fn eight_threads_distinct() {
        let i = std::sync::Arc::new(IdIssuer::new());
        let hs: Vec<_> = (0..8)
            .map(|_| {
                let i = i.clone();
                std::thread::spawn(move || {
                    (0..10_000)
                        .map(|_| i.issue().unwrap().get())
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        let mut all: Vec<u64> = hs.into_iter().flat_map(|h| h.join().unwrap()).collect();
        all.sort_unstable();
        all.dedup();
        assert_eq!(all.len(), 80_000);
        assert_eq!(*all.first().unwrap(), 1);
        assert_eq!(*all.last().unwrap(), 80_000);
    }
}
