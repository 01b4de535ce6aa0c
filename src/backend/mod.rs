//! Backends implementing [`crate::TensorAllocator`].
//!
//! - [`HostBackend`]: host memory from the pool, with metadata and stats.
//! - [`MetaBackend`]: metadata only; predicts what the host backend reserves.
//! - `RemoteBackend` (feature `remote`): ids locally, bytes in a store
//!   (in-process, Redis or Redis Cluster).
mod host;
mod ledger;
mod meta;
#[cfg(feature = "remote")]
pub mod remote;

pub use host::HostBackend;
pub use meta::MetaBackend;
#[cfg(feature = "remote")]
pub use remote::{MemoryStore, RedisConfig, RedisStore, RemoteBackend, RemoteConfig, RemoteStore};
