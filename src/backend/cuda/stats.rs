//! PyTorch-named statistics of the caching pool (`torch.cuda.memory_stats()`).
//!
//! Every array stat has three entries — `[all, small_pool, large_pool]` —
//! and each entry is a [`Stat`] (current, peak, allocated, freed), so
//! `current == allocated - freed`, and `all == small_pool + large_pool` for
//! every current value. They change only under the pool's lock.

use super::block::PoolKind;
use crate::stats::Stat;

/// The three stat types PyTorch keeps per quantity.
pub const STAT_TYPES: [&str; 3] = ["all", "small_pool", "large_pool"];

/// One quantity per stat type.
pub type StatArray = [Stat; 3];

/// The pool's statistics, named as PyTorch names them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[allow(missing_docs)]
pub struct CudaStats {
    pub allocation: StatArray,
    pub segment: StatArray,
    pub active: StatArray,
    pub inactive_split: StatArray,
    pub allocated_bytes: StatArray,
    pub reserved_bytes: StatArray,
    pub active_bytes: StatArray,
    pub inactive_split_bytes: StatArray,
    pub requested_bytes: StatArray,
    /// Allocations that succeeded (or failed) only after releasing every cached block.
    pub num_alloc_retries: u64,
    /// Allocations that failed for lack of memory.
    pub num_ooms: u64,
    /// Times every outstanding event was synchronized.
    pub num_sync_all_streams: u64,
    /// Successful driver mallocs.
    pub num_device_alloc: u64,
    /// Successful driver frees.
    pub num_device_free: u64,
    /// Live allocations of `max_split_size` or more.
    pub oversize_allocations: Stat,
    /// Segments of `max_split_size` or more.
    pub oversize_segments: Stat,
}

pub(crate) fn increase(s: &mut Stat, n: u64) {
    s.current += n;
    s.allocated += n;
    s.peak = s.peak.max(s.current);
}

pub(crate) fn decrease(s: &mut Stat, n: u64) {
    debug_assert!(s.current >= n, "stat underflow");
    s.current -= n;
    s.freed += n;
}

/// Adds `n` to the aggregate and to `pool`'s entry.
pub(crate) fn up(a: &mut StatArray, pool: PoolKind, n: u64) {
    increase(&mut a[0], n);
    increase(&mut a[pool.stat_index()], n);
}

/// Removes `n` from the aggregate and from `pool`'s entry.
pub(crate) fn down(a: &mut StatArray, pool: PoolKind, n: u64) {
    decrease(&mut a[0], n);
    decrease(&mut a[pool.stat_index()], n);
}

impl CudaStats {
    /// The stats as `torch.cuda.memory_stats()` keys
    /// (`"allocated_bytes.all.current"` …), sorted by key.
    pub fn to_flat(&self) -> Vec<(String, u64)> {
        let arrays: [(&str, &StatArray); 9] = [
            ("allocation", &self.allocation),
            ("segment", &self.segment),
            ("active", &self.active),
            ("inactive_split", &self.inactive_split),
            ("allocated_bytes", &self.allocated_bytes),
            ("reserved_bytes", &self.reserved_bytes),
            ("active_bytes", &self.active_bytes),
            ("inactive_split_bytes", &self.inactive_split_bytes),
            ("requested_bytes", &self.requested_bytes),
        ];
        let mut out = Vec::new();
        for (name, arr) in arrays {
            for (ty, s) in STAT_TYPES.iter().zip(arr) {
                for (field, v) in [
                    ("current", s.current),
                    ("peak", s.peak),
                    ("allocated", s.allocated),
                    ("freed", s.freed),
                ] {
                    out.push((format!("{name}.{ty}.{field}"), v));
                }
            }
        }
        for (name, s) in [
            ("oversize_allocations", &self.oversize_allocations),
            ("oversize_segments", &self.oversize_segments),
        ] {
            for (field, v) in [
                ("current", s.current),
                ("peak", s.peak),
                ("allocated", s.allocated),
                ("freed", s.freed),
            ] {
                out.push((format!("{name}.{field}"), v));
            }
        }
        out.push(("num_alloc_retries".into(), self.num_alloc_retries));
        out.push(("num_ooms".into(), self.num_ooms));
        out.push(("num_sync_all_streams".into(), self.num_sync_all_streams));
        out.push(("num_device_alloc".into(), self.num_device_alloc));
        out.push(("num_device_free".into(), self.num_device_free));
        out.sort();
        out
    }

    /// Sets every peak to its current value (`reset_peak_memory_stats`).
    pub fn reset_peaks(&mut self) {
        for arr in [
            &mut self.allocation,
            &mut self.segment,
            &mut self.active,
            &mut self.inactive_split,
            &mut self.allocated_bytes,
            &mut self.reserved_bytes,
            &mut self.active_bytes,
            &mut self.inactive_split_bytes,
            &mut self.requested_bytes,
        ] {
            for s in arr.iter_mut() {
                s.peak = s.current;
            }
        }
        self.oversize_allocations.peak = self.oversize_allocations.current;
        self.oversize_segments.peak = self.oversize_segments.current;
    }
}
