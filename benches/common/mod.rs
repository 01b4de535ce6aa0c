//! Shared harness of the allocator comparison: `benches/host_pool.rs`
//! (criterion) and `examples/compare.rs` (the table) both include it, so the
//! allocators and workloads are the same code in both.
//!
//! - [`alloc`]: the [`BenchAlloc`] trait and the allocators compared.
//! - [`workload`]: the workloads, each a generic function of the allocator.
//!
//! Each target uses part of it, hence the `dead_code` allowance.
#![allow(dead_code)]

pub mod alloc;
pub mod workload;

pub use alloc::{BenchAlloc, allocators};
pub use workload::{Suite, Workload, workloads};

use std::time::Duration;

/// An allocator with its workloads compiled in: one dynamic call per timed
/// batch, none per allocation.
pub trait Runner: Sync {
    /// The allocator's name.
    fn name(&self) -> &'static str;
    /// Times `iters` units of `w`.
    fn run(&self, w: &Workload, iters: u64) -> Duration;
    /// Hands cached memory back to the OS.
    fn trim(&self);
}

impl<A: BenchAlloc> Runner for A {
    fn name(&self) -> &'static str {
        BenchAlloc::name(self)
    }

    fn run(&self, w: &Workload, iters: u64) -> Duration {
        w.run(self, iters)
    }

    fn trim(&self) {
        BenchAlloc::trim(self)
    }
}
