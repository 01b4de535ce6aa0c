//! Backends implementing [`crate::TensorAllocator`].
//!
//! - [`HostBackend`]: host memory from the pool, with metadata and stats.
//! - [`MetaBackend`]: metadata only; predicts what the host backend reserves.
//! - [`OffloadBackend`]: any backend under a residency budget, the rest on disk.
//! - [`cuda::CudaBackend`] (feature `cuda`): device memory through PyTorch's
//!   caching-allocator policy.
#[cfg(feature = "cuda")]
pub mod cuda;
mod host;
mod ledger;
mod meta;
pub mod offload;

pub use host::HostBackend;
pub use meta::MetaBackend;
pub use offload::{BudgetMode, OffloadBackend, OffloadConfig, OffloadStats, TensorState};
