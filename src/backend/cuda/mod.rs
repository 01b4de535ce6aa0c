//! The CUDA device caching pool (feature `cuda`).
//!
//! PyTorch's CUDACachingAllocator policy in plain Rust ([`CachingPool`], `pool.rs`), over a
//! driver seam ([`CudaDriver`]) with two implementations: [`SimDriver`], a
//! simulated device for tests (capacity, fault injection, logical stream
//! clocks), and [`CudarcDriver`], the real driver through cudarc, loaded at
//! run time so the crate builds and runs without CUDA (a missing driver is
//! [`AllocError::BackendUnavailable`](crate::AllocError::BackendUnavailable)).
//!
//! Layout, one concern a file: `driver.rs` (the trait), `sim.rs`,
//! `cudarc.rs`, `block.rs` (blocks, free sets, size rules), `events.rs`
//! (pooled events), `pool.rs` (the policy), `stats.rs`, `snapshot.rs`
//! (snapshot and history), `config.rs`, `backend.rs` ([`CudaBackend`]),
//! `model.rs` ([`CudaModel`], the policy as a meta backend).

mod backend;
mod block;
mod config;
mod cudarc;
mod driver;
mod events;
mod model;
mod pool;
mod sim;
mod snapshot;
mod stats;

pub use self::cudarc::{CudarcDriver, PoolView, libcuda_present};
pub use backend::{CudaBackend, MAX_ALIGN};
pub use block::{
    LARGE_BUFFER, MIN_BLOCK_SIZE, MIN_LARGE_ALLOC, PoolKind, ROUND_LARGE, SMALL_BUFFER, SMALL_SIZE,
    allocation_size, round_size,
};
pub use config::{CudaConfig, CudaConfigError};
pub use driver::{CudaDriver, DevPtr, DeviceInfo, DriverError, EventId, StreamId};
pub use model::CudaModel;
pub use pool::{CachingPool, NEVER_FITS};
pub use sim::{Call, Fault, SimDriver, UNINIT_BYTE};
pub use snapshot::{Action, BlockInfo, BlockState, SegmentInfo, Snapshot, TraceEntry};
pub use stats::{CudaStats, STAT_TYPES, StatArray};
