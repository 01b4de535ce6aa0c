//! # tensorpool
//!
//! A memory allocator and tensor pool for Rust ML code: one contract,
//! [`TensorAllocator`], with interchangeable backends behind it.
//!
//! - [`host::HostPool`]: size-class pools with per-thread caches, prewarm and
//!   trim, for host memory; also an `allocator-api2` allocator.
//! - [`backend::HostBackend`]: the pool plus tensor metadata and statistics.
//! - [`backend::MetaBackend`]: shape and size only, zero bytes of data; it
//!   predicts the reserved bytes a host backend would hold for a workload.
//! - [`meta`]: tensor ids, 64-byte metadata records and the metadata table.
//! - [`Limited`]: a byte limit around any backend.
//! - [`adapt`]: trace record ([`adapt::Traced`], `TENSORPOOL_TRACE`) and replay.
//! - [`TensorGlobalAlloc`]: the process-wide pool as a `#[global_allocator]`.
//! - `testkit` (feature `testkit`): the conformance kit every backend passes.
//!
//! See `DESIGN.md` in the repository for the layering; each layer calls only
//! down.
#![deny(unsafe_op_in_unsafe_fn)]
#![warn(
    missing_docs,
    missing_debug_implementations,
    clippy::undocumented_unsafe_blocks
)]

pub(crate) mod sync;

#[cfg(not(tensorpool_loom))]
pub mod adapt;
#[cfg(not(tensorpool_loom))]
pub mod allocator;
#[cfg(not(tensorpool_loom))]
pub mod backend;
#[cfg(not(tensorpool_loom))]
pub mod error;
#[cfg(not(tensorpool_loom))]
pub mod global;
pub mod host;
#[cfg(not(tensorpool_loom))]
pub mod limit;
pub mod meta;
#[cfg(not(tensorpool_loom))]
pub(crate) mod os;
#[cfg(not(tensorpool_loom))]
pub mod stats;
#[cfg(all(feature = "testkit", not(tensorpool_loom)))]
pub mod testkit;

/// Resident set size of this process in bytes (Linux; `None` elsewhere).
/// Reads `/proc/self/statm` with raw syscalls: it never allocates.
#[cfg(not(tensorpool_loom))]
pub use crate::os::resident_bytes;
#[cfg(not(tensorpool_loom))]
pub use crate::{
    allocator::{
        Addr, AllocRequest, Allocation, DType, Device, Shape, TensorAllocator, TensorBuf,
        TensorFlags, ViewError,
    },
    error::{AllocError, DeviceOom, LayoutProblem},
    global::TensorGlobalAlloc,
    limit::Limited,
    meta::id::TensorId,
    stats::{MemoryStats, Stat},
};

/// Loom-only re-exports of the lock-free structures, for `tests/loom.rs`.
#[cfg(tensorpool_loom)]
#[doc(hidden)]
pub mod loom_exports {
    pub use crate::host::central_list::{CentralList, Locked};
    pub use crate::host::transfer::TransferStack;
    pub use crate::meta::grace::{Grace, Limbo};
    pub use crate::meta::id::IdIssuer;
    pub use crate::sync::RawLock;
}

/// The README's examples, compiled and run as doctests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
