//! Backends implementing [`crate::TensorAllocator`].
//!
//! - [`HostBackend`]: host memory from the pool, with metadata and stats.
//! - [`MetaBackend`]: metadata only; predicts what the host backend reserves.
//! - [`OffloadBackend`]: any backend under a residency budget, the rest on disk.
//! - [`cuda::CudaBackend`] (feature `cuda`): device memory through PyTorch's
//!   caching-allocator policy.
//! - `RemoteBackend` (feature `remote`): ids locally, bytes in a store
//!   (in-process, Redis or Redis Cluster).
#[cfg(feature = "cuda")]
pub mod cuda;
mod host;
mod ledger;
mod meta;
pub mod offload;
#[cfg(feature = "remote")]
pub mod remote;

pub use host::HostBackend;
pub use meta::MetaBackend;
pub use offload::{BudgetMode, OffloadBackend, OffloadConfig, OffloadStats, TensorState};
#[cfg(feature = "remote")]
pub use remote::{MemoryStore, RedisConfig, RedisStore, RemoteBackend, RemoteConfig, RemoteStore};
