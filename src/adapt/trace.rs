//! [`Traced`]: records every allocate and free of a backend to a trace file.

use super::format::{TraceError, TraceOp};
use super::recorder::{Recorder, Slot};
use crate::allocator::{AllocRequest, Allocation, Device, TensorAllocator};
use crate::error::AllocError;
use crate::stats::MemoryStats;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

/// Records buffered before a write, by default (128 KiB).
pub const DEFAULT_CAPACITY: usize = 4096;

/// A backend that records what is done through it.
///
/// Every successful `allocate` is recorded (after it succeeded) as an alloc
/// of the tensor id with the requested size, the allocation's alignment and
/// the request's stream; every successful `deallocate` as a free of the id
/// with the allocation's size. Failed calls are not recorded (they changed
/// nothing). The records go to a lock-free buffer (one `fetch_add` and four
/// stores a record, see `recorder.rs`), written to the file when full, on
/// [`flush`](Self::flush) and on drop.
///
/// ```
/// use tensorpool::adapt::{Trace, Traced};
/// use tensorpool::backend::HostBackend;
/// use tensorpool::{AllocRequest, TensorAllocator};
///
/// let path = std::env::temp_dir().join(format!("doc-{}.tpt", std::process::id()));
/// let traced = Traced::create(HostBackend::new(), &path).unwrap();
/// let a = traced.allocate(&AllocRequest::bytes(1000)).unwrap();
/// // SAFETY: `a` is not used afterwards.
/// unsafe { traced.deallocate(&a).unwrap() };
/// traced.flush().unwrap();
/// assert_eq!(Trace::read(&path).unwrap().len(), 2);
/// # std::fs::remove_file(&path).unwrap();
/// ```
#[derive(Debug)]
pub struct Traced<B> {
    inner: B,
    rec: Recorder<Box<[Slot]>>,
    /// Kept open: the recorder writes to its descriptor.
    _file: File,
    path: PathBuf,
}

impl<B: TensorAllocator> Traced<B> {
    /// Wraps `inner`, recording to a new file at `path` (truncated if it
    /// exists) with the default buffer.
    pub fn create(inner: B, path: impl AsRef<Path>) -> Result<Self, TraceError> {
        Self::with_capacity(inner, path, DEFAULT_CAPACITY)
    }

    /// As [`create`](Self::create), buffering `capacity` records (at least 1).
    pub fn with_capacity(
        inner: B,
        path: impl AsRef<Path>,
        capacity: usize,
    ) -> Result<Self, TraceError> {
        let path = path.as_ref().to_path_buf();
        let io = |op, source| TraceError::Io {
            path: path.clone(),
            op,
            source,
        };
        let file = File::create(&path).map_err(|e| io("create", e))?;
        Recorder::<Box<[Slot]>>::write_header(file.as_raw_fd())
            .map_err(|e| io("write", std::io::Error::from_raw_os_error(e)))?;
        let slots: Box<[Slot]> = (0..capacity.max(1)).map(|_| Slot::EMPTY).collect();
        let rec = Recorder::new(slots);
        rec.start(file.as_raw_fd());
        Ok(Traced {
            inner,
            rec,
            _file: file,
            path,
        })
    }

    /// The wrapped backend.
    pub fn inner(&self) -> &B {
        &self.inner
    }

    /// The trace file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes the buffered records to the file. An error if any write so
    /// far failed.
    pub fn flush(&self) -> Result<(), TraceError> {
        self.rec.flush(usize::MAX);
        match self.rec.write_error() {
            None => Ok(()),
            Some(e) => Err(TraceError::Io {
                path: self.path.clone(),
                op: "write",
                source: std::io::Error::from_raw_os_error(e),
            }),
        }
    }

    /// Records written to the file so far (not counting buffered ones).
    pub fn written(&self) -> u64 {
        self.rec.written()
    }
}

impl<B> Drop for Traced<B> {
    fn drop(&mut self) {
        // `file` closes after this, with every record written.
        self.rec.flush(usize::MAX);
    }
}

/// The record's stream field: 0 for none, else the stream + 1, saturating.
fn stream_code(s: Option<u64>) -> u16 {
    s.map_or(0, |s| s.saturating_add(1).min(u16::MAX as u64) as u16)
}

// SAFETY: every allocation handed out is the inner backend's, unchanged, and
// every call is forwarded to it, so its guarantees carry over.
unsafe impl<B: TensorAllocator> TensorAllocator for Traced<B> {
    fn device(&self) -> Device {
        self.inner.device()
    }

    #[inline]
    fn allocate(&self, req: &AllocRequest) -> Result<Allocation, AllocError> {
        let a = self.inner.allocate(req)?;
        self.rec.record(
            TraceOp::Alloc,
            a.id().get(),
            req.size as u64,
            a.align(),
            stream_code(req.stream),
        );
        Ok(a)
    }

    #[inline]
    unsafe fn deallocate(&self, a: &Allocation) -> Result<(), AllocError> {
        // SAFETY: forwarded from the caller.
        unsafe { self.inner.deallocate(a)? };
        self.rec
            .record(TraceOp::Free, a.id().get(), a.size() as u64, a.align(), 0);
        Ok(())
    }

    fn stats(&self) -> MemoryStats {
        self.inner.stats()
    }

    fn trim(&self) -> usize {
        self.inner.trim()
    }

    fn write(&self, a: &Allocation, offset: usize, src: &[u8]) -> Result<(), AllocError> {
        self.inner.write(a, offset, src)
    }

    fn read(&self, a: &Allocation, offset: usize, dst: &mut [u8]) -> Result<(), AllocError> {
        self.inner.read(a, offset, dst)
    }

    fn synchronize(&self) -> Result<(), AllocError> {
        self.inner.synchronize()
    }
}
