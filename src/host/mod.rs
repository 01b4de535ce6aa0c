//! The host pool: size classes → categories, spans, per-thread caches,
//! cross-thread frees, prewarm and trim.
//!
//! - [`size_class`]: the classes and categories.
//! - `pagemap`, `span`: a pointer alone finds its span record (owner pool,
//!   class, size): size-less free, `usable_size`, foreign-pointer checks.
//! - `central`: per-class central lists (lock-free frees in, locked refills
//!   out); their protocol is [`central_list`], loom-modelled.
//! - `thread_cache`: the hot path.
//! - `huge`: blocks above 64 MiB, cached by size.
//! - `large`: a one-block class with no free span takes a neighbouring
//!   class's and resizes it (cross-class reuse of big spans).
//! - `guard`: double-free detection (a per-pool key in each freed block).
//! - [`transfer`]: the lock-free cross-thread free list.
#[cfg(not(tensorpool_loom))]
mod api2;
pub mod size_class;
pub mod transfer;

#[cfg(not(tensorpool_loom))]
mod central;
pub mod central_list;
#[cfg(not(tensorpool_loom))]
mod guard;
#[cfg(not(tensorpool_loom))]
pub mod huge;
#[cfg(not(tensorpool_loom))]
pub(crate) mod large;
#[cfg(not(tensorpool_loom))]
pub mod model;
#[cfg(not(tensorpool_loom))]
pub(crate) mod pagemap;
#[cfg(not(tensorpool_loom))]
mod pool;
#[cfg(not(tensorpool_loom))]
mod prewarm;
#[cfg(not(tensorpool_loom))]
pub(crate) mod span;
#[cfg(not(tensorpool_loom))]
pub(crate) mod thread_cache;

#[cfg(not(tensorpool_loom))]
pub use pool::{HostPool, HostPoolConfig, PoolStats};
// The global allocator (src/global.rs) is built on these.
#[cfg(not(tensorpool_loom))]
#[allow(unused_imports)]
pub(crate) use pool::{PoolShared, global_pool};
#[cfg(not(tensorpool_loom))]
pub use prewarm::Prewarm;
pub use size_class::Category;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_general;
#[cfg(test)]
mod tests_xthread;
