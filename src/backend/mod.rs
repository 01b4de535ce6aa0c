//! Backends implementing [`crate::TensorAllocator`].
