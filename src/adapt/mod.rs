//! Adaptors that wrap any backend: trace record ([`Traced`], and
//! whole-program recording with `TENSORPOOL_TRACE`) and [`replay`].
//!
//! - [`format`]: the trace file (a versioned binary of fixed 32-byte
//!   records, with a CSV export in RMM's logging style) and its typed
//!   errors ([`TraceError`]).
//! - [`Traced`]: records every allocate / free of a backend.
//! - [`process`]: the global allocator's and C ABI's recording of a whole
//!   program, without allocating.
//! - [`replay`](replay()): a trace run on any [`TensorAllocator`](crate::TensorAllocator), or
//!   any `GlobalAlloc` through [`GlobalAllocBackend`], with time per
//!   operation, peak allocated and peak reserved bytes.
//!
//! [`Limited`](crate::Limited), the byte-limit adaptor, lives in `src/limit.rs`.

pub mod format;
pub mod process;
pub(crate) mod recorder;
pub mod replay;
pub mod trace;

pub use format::{Trace, TraceError, TraceOp, TraceRecord};
pub use recorder::TIME_SAMPLE;
pub use replay::{GlobalAllocBackend, ReplayError, ReplayPlan, ReplayReport, replay};
pub use trace::Traced;
