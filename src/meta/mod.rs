//! Tensor metadata: ids ([`id`]), 64-byte records ([`record`]) and their
//! cold side words ([`info`]), the
//! metadata table ([`table`]), its batch scans in scalar, AVX2 and NEON
//! versions ([`batch`]) and its usage counters (`usage`).
//!
//! Under `--cfg tensorpool_loom` only [`id`] and the table's grace periods
//! (`grace`) are built (they are loom-modelled).
pub(crate) mod grace;
pub mod id;

#[cfg(not(tensorpool_loom))]
pub mod batch;
#[cfg(not(tensorpool_loom))]
pub mod hash;
#[cfg(not(tensorpool_loom))]
pub mod info;
#[cfg(not(tensorpool_loom))]
pub mod record;
#[cfg(not(tensorpool_loom))]
pub mod table;
#[cfg(not(tensorpool_loom))]
mod usage;

pub use id::{IdIssuer, TensorId};
#[cfg(not(tensorpool_loom))]
pub use {
    batch::{BatchBackend, UnsupportedBackend},
    id::next_id,
    info::{AddrKind, TensorInfo},
    record::TensorMeta,
    table::{MetaTable, NewTensor, TensorKey},
};
