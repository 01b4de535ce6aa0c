//! PyTorch-style memory statistics.
//!
//! Names follow `torch.cuda.memory_stats()`: every quantity is a [`Stat`] with
//! `current`, `peak`, `allocated` (total ever added) and `freed` (total ever
//! removed), so `current == allocated - freed` always holds.

use crate::allocator::Device;
use crate::host::size_class::Category;
use crate::sync::{AtomicU64, Ordering};

/// One statistic: current value, peak, totals added and removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stat {
    /// Value now.
    pub current: u64,
    /// Highest value seen (since creation or the last `reset_peak`).
    pub peak: u64,
    /// Total ever added.
    pub allocated: u64,
    /// Total ever removed.
    pub freed: u64,
}

/// Live bytes and tensor count in one size category.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CategoryUsage {
    /// Live tensors in the category.
    pub count: u64,
    /// Their requested bytes.
    pub bytes: u64,
}

/// A snapshot of a backend's memory use.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MemoryStats {
    /// The backend's device (None only for a default-constructed value).
    pub device: Option<Device>,
    /// Bytes handed to callers (requested sizes).
    pub allocated_bytes: Stat,
    /// Bytes held from the OS or driver, cached blocks included.
    pub reserved_bytes: Stat,
    /// Bytes in blocks in use (rounded block sizes; on the host, allocations
    /// are active from allocate to deallocate).
    pub active_bytes: Stat,
    /// Number of live allocations.
    pub allocation: Stat,
    /// Number of segments (mappings / driver allocations) held.
    pub segment: Stat,
    /// Allocations that failed for lack of memory or over a limit.
    pub num_ooms: u64,
    /// Allocations that succeeded only after freeing cached memory.
    pub num_alloc_retries: u64,
    /// Requests served from cached memory.
    pub cache_hits: u64,
    /// Requests that had to take new memory from the OS or driver.
    pub cache_misses: u64,
    /// Live tensors and bytes per size category (from the metadata table).
    pub per_category: [CategoryUsage; Category::COUNT],
}

/// A [`Stat`] that many threads update. Reads are relaxed snapshots.
#[derive(Debug, Default)]
pub struct AtomicStat {
    current: AtomicU64,
    peak: AtomicU64,
    allocated: AtomicU64,
    freed: AtomicU64,
}

impl AtomicStat {
    /// All zero.
    #[cfg(not(tensorpool_loom))]
    pub const fn new() -> Self {
        Self {
            current: AtomicU64::new(0),
            peak: AtomicU64::new(0),
            allocated: AtomicU64::new(0),
            freed: AtomicU64::new(0),
        }
    }

    /// Adds `n`; returns the new current value.
    #[inline]
    pub fn add(&self, n: u64) -> u64 {
        self.allocated.fetch_add(n, Ordering::Relaxed);
        let now = self.current.fetch_add(n, Ordering::Relaxed) + n;
        self.peak.fetch_max(now, Ordering::Relaxed);
        now
    }

    /// Removes `n`; returns the new current value.
    #[inline]
    pub fn sub(&self, n: u64) -> u64 {
        self.freed.fetch_add(n, Ordering::Relaxed);
        self.current.fetch_sub(n, Ordering::Relaxed) - n
    }

    /// Current value.
    #[inline]
    pub fn current(&self) -> u64 {
        self.current.load(Ordering::Relaxed)
    }

    /// Sets the peak to the current value.
    pub fn reset_peak(&self) {
        self.peak
            .store(self.current.load(Ordering::Relaxed), Ordering::Relaxed);
    }

    /// A snapshot.
    pub fn get(&self) -> Stat {
        Stat {
            current: self.current.load(Ordering::Relaxed),
            peak: self.peak.load(Ordering::Relaxed),
            allocated: self.allocated.load(Ordering::Relaxed),
            freed: self.freed.load(Ordering::Relaxed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_identity() {
        let s = AtomicStat::new();
        s.add(10);
        s.add(5);
        s.sub(12);
        let g = s.get();
        assert_eq!(
            g,
            Stat {
                current: 3,
                peak: 15,
                allocated: 15,
                freed: 12
            }
        );
        s.reset_peak();
        assert_eq!(s.get().peak, 3);
    }
}
