//! Tensor metadata: ids, 64-byte records and the metadata table.
pub mod id;
