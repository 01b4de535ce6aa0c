//! Backends implementing [`crate::TensorAllocator`].
//!
//! - [`HostBackend`]: host memory from the pool, with metadata and stats.
//! - [`MetaBackend`]: metadata only; predicts what the host backend reserves.
//! - [`cuda::CudaBackend`] (feature `cuda`): device memory through PyTorch's
//!   caching-allocator policy.
#[cfg(feature = "cuda")]
pub mod cuda;
mod host;
mod ledger;
mod meta;

pub use host::HostBackend;
pub use meta::MetaBackend;
