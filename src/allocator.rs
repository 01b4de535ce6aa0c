//! The contract every backend implements: [`TensorAllocator`], the request
//! and allocation types, and the owning handle [`TensorBuf`].
//!
//! Size and alignment travel back on free (RMM style), so pools need no
//! headers. The trait is object safe: `Arc<dyn TensorAllocator>` works.

use crate::error::{AllocError, LayoutProblem};
use crate::meta::id::TensorId;
use crate::stats::MemoryStats;
use core::ptr::NonNull;
use std::sync::Arc;

/// Where an allocation's bytes live.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Device {
    /// Host memory.
    Host,
    /// A CUDA device, by ordinal.
    Cuda(u32),
    /// A remote store node.
    Remote(u32),
    /// Nowhere: shape and size only.
    Meta,
    /// On disk (offload tier).
    Disk,
}

impl Device {
    /// A small dense code for tables: Host 0, Meta 1, Disk 2, Cuda n → 16+n,
    /// Remote n → 1024+n (saturating).
    pub fn code(self) -> u16 {
        match self {
            Device::Host => 0,
            Device::Meta => 1,
            Device::Disk => 2,
            Device::Cuda(n) => 16u16.saturating_add(n.min(1000) as u16),
            Device::Remote(n) => 1024u16.saturating_add(n.min(60000) as u16),
        }
    }
    /// Inverse of [`Device::code`].
    pub fn from_code(c: u16) -> Device {
        match c {
            0 => Device::Host,
            1 => Device::Meta,
            2 => Device::Disk,
            16..=1023 => Device::Cuda(u32::from(c - 16)),
            _ if c >= 1024 => Device::Remote(u32::from(c - 1024)),
            _ => Device::Meta,
        }
    }
}

impl core::fmt::Display for Device {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Device::Host => write!(f, "host"),
            Device::Cuda(n) => write!(f, "cuda:{n}"),
            Device::Remote(n) => write!(f, "remote:{n}"),
            Device::Meta => write!(f, "meta"),
            Device::Disk => write!(f, "disk"),
        }
    }
}

/// Element type of a tensor.
#[repr(u8)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[allow(missing_docs)]
pub enum DType {
    #[default]
    U8 = 0,
    I8,
    Bool,
    F8E4M3,
    F8E5M2,
    I16,
    U16,
    F16,
    BF16,
    I32,
    U32,
    F32,
    I64,
    U64,
    F64,
}

impl DType {
    /// Bytes per element.
    pub fn size(self) -> usize {
        use DType::*;
        match self {
            U8 | I8 | Bool | F8E4M3 | F8E5M2 => 1,
            I16 | U16 | F16 | BF16 => 2,
            I32 | U32 | F32 => 4,
            I64 | U64 | F64 => 8,
        }
    }
}

/// Up to [`Shape::MAX_RANK`] dimensions, stored inline (no allocation).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Shape {
    dims: [u64; Shape::MAX_RANK],
    rank: u8,
}

impl Shape {
    /// The largest rank stored.
    pub const MAX_RANK: usize = 8;

    /// A shape from its dimensions; `None` if the rank is above [`Shape::MAX_RANK`].
    pub fn new(dims: &[usize]) -> Option<Shape> {
        let mut wide = [0u64; Self::MAX_RANK];
        for (d, &v) in wide.iter_mut().zip(dims) {
            *d = v as u64;
        }
        Self::from_u64(wide.get(..dims.len())?)
    }
    /// A shape from dimensions given as `u64` (lossless on every target);
    /// `None` if the rank is above [`Shape::MAX_RANK`].
    pub fn from_u64(dims: &[u64]) -> Option<Shape> {
        if dims.len() > Self::MAX_RANK {
            return None;
        }
        let mut s = Shape {
            dims: [0; Self::MAX_RANK],
            rank: dims.len() as u8,
        };
        s.dims[..dims.len()].copy_from_slice(dims);
        Some(s)
    }
    /// The dimensions.
    pub fn dims(&self) -> &[u64] {
        &self.dims[..self.rank as usize]
    }
    /// Number of dimensions.
    pub fn rank(&self) -> usize {
        self.rank as usize
    }
    /// Element count; `None` on overflow.
    pub fn numel(&self) -> Option<u64> {
        self.dims().iter().try_fold(1u64, |a, &d| a.checked_mul(d))
    }
    /// Row-major (C-contiguous) strides in elements.
    pub fn contiguous_strides(&self) -> [u64; Self::MAX_RANK] {
        let mut st = [0u64; Self::MAX_RANK];
        let mut acc = 1u64;
        for i in (0..self.rank()).rev() {
            st[i] = acc;
            acc = acc.saturating_mul(self.dims[i]);
        }
        st
    }
}

/// Flags recorded with a tensor's metadata.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct TensorFlags(pub u8);

impl TensorFlags {
    /// Never evicted or offloaded.
    pub const PINNED: u8 = 1;
    /// A model weight (long-lived, read-mostly).
    pub const WEIGHT: u8 = 2;
    /// A temporary (short-lived).
    pub const TEMPORARY: u8 = 4;
    /// Whether every bit of `f` is set.
    pub fn has(self, f: u8) -> bool {
        self.0 & f == f
    }
}

/// The default alignment of tensor requests: one cache line, enough for
/// AVX-512 loads.
pub const DEFAULT_ALIGN: usize = 64;

/// What a caller asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AllocRequest {
    /// Bytes (0 is valid: a unique id, no memory).
    pub size: usize,
    /// Alignment in bytes (a power of two).
    pub align: usize,
    /// Zero the memory.
    pub zeroed: bool,
    /// Stream for stream-ordered device backends (ignored on the host).
    pub stream: Option<u64>,
    /// Shape, for metadata.
    pub shape: Option<Shape>,
    /// Element type, for metadata.
    pub dtype: Option<DType>,
    /// Flags, for metadata and eviction policy.
    pub flags: TensorFlags,
}

impl AllocRequest {
    /// `size` bytes at [`DEFAULT_ALIGN`].
    pub fn bytes(size: usize) -> Self {
        Self::new(size, DEFAULT_ALIGN)
    }

    /// `size` bytes at `align` (checked when allocating, not here).
    pub fn new(size: usize, align: usize) -> Self {
        Self {
            size,
            align,
            zeroed: false,
            stream: None,
            shape: None,
            dtype: None,
            flags: TensorFlags::default(),
        }
    }

    /// A tensor of `shape` and `dtype`, at [`DEFAULT_ALIGN`].
    pub fn tensor(shape: &[usize], dtype: DType) -> Result<Self, AllocError> {
        let overflow = || AllocError::InvalidLayout {
            size: usize::MAX,
            align: DEFAULT_ALIGN,
            problem: LayoutProblem::ShapeOverflow,
        };
        let s = Shape::new(shape).ok_or(AllocError::Unsupported {
            what: "tensor rank above 8",
        })?;
        let numel = s.numel().ok_or_else(overflow)?;
        let bytes = numel
            .checked_mul(dtype.size() as u64)
            .ok_or_else(overflow)?;
        let size = usize::try_from(bytes).map_err(|_| overflow())?;
        let mut r = Self::bytes(size);
        r.shape = Some(s);
        r.dtype = Some(dtype);
        Ok(r)
    }

    /// Asks for zeroed memory.
    pub fn zeroed(mut self) -> Self {
        self.zeroed = true;
        self
    }
    /// Sets the alignment.
    pub fn align(mut self, align: usize) -> Self {
        self.align = align;
        self
    }
    /// Adds metadata flags.
    pub fn flags(mut self, f: u8) -> Self {
        self.flags.0 |= f;
        self
    }
    /// Sets the stream.
    pub fn stream(mut self, s: u64) -> Self {
        self.stream = Some(s);
        self
    }

    /// Checks what every backend checks: a power-of-two alignment.
    pub fn check_align(&self) -> Result<(), AllocError> {
        if !self.align.is_power_of_two() {
            return Err(AllocError::InvalidLayout {
                size: self.size,
                align: self.align,
                problem: LayoutProblem::AlignNotPowerOfTwo,
            });
        }
        Ok(())
    }
}

/// Where an allocation's bytes are, in the backend's terms.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Addr {
    /// No bytes (meta backend, or a zero-size allocation).
    None,
    /// A host pointer.
    Host(NonNull<u8>),
    /// A device address.
    Device(u64),
    /// An id in a remote store.
    Remote(u64),
}

/// A live allocation, as handed out by a backend. Plain data: holding one
/// does not keep the memory alive and dropping one frees nothing (use
/// [`TensorBuf`] for that).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Allocation {
    id: TensorId,
    addr: Addr,
    size: usize,
    align: usize,
    device: Device,
    tag: u64,
}

// SAFETY: an `Allocation` is a description (numbers and an address). Sending or
// sharing it gives no access to the memory by itself: reading or writing
// through `host_ptr` is `unsafe` and the caller argues it there.
unsafe impl Send for Allocation {}
// SAFETY: as for `Send`; all fields are immutable after construction.
unsafe impl Sync for Allocation {}

impl Allocation {
    /// For backend implementors: `tag` is the backend's own (a table slot, say).
    pub fn new(
        id: TensorId,
        addr: Addr,
        size: usize,
        align: usize,
        device: Device,
        tag: u64,
    ) -> Self {
        Self {
            id,
            addr,
            size,
            align,
            device,
            tag,
        }
    }
    /// The tensor id.
    pub fn id(&self) -> TensorId {
        self.id
    }
    /// The address.
    pub fn addr(&self) -> Addr {
        self.addr
    }
    /// The host pointer, if the bytes are in host memory.
    pub fn host_ptr(&self) -> Option<NonNull<u8>> {
        match self.addr {
            Addr::Host(p) => Some(p),
            _ => None,
        }
    }
    /// Requested size in bytes.
    pub fn size(&self) -> usize {
        self.size
    }
    /// Alignment in bytes.
    pub fn align(&self) -> usize {
        self.align
    }
    /// The device.
    pub fn device(&self) -> Device {
        self.device
    }
    /// The backend's own tag.
    pub fn tag(&self) -> u64 {
        self.tag
    }
    /// Checks that `len` bytes at `offset` lie inside the allocation:
    /// [`AllocError::OutOfRange`] (naming offset, length and size) if not.
    pub fn check_range(&self, offset: usize, len: usize) -> Result<(), AllocError> {
        match offset.checked_add(len) {
            Some(end) if end <= self.size => Ok(()),
            _ => Err(AllocError::OutOfRange {
                id: self.id.get(),
                offset,
                len,
                size: self.size,
            }),
        }
    }
}

/// A tensor memory backend.
///
/// # Safety
/// Implementors promise, for every `Ok(a)` from [`allocate`](Self::allocate):
/// - if `a.addr()` is `Addr::Host(p)`, then `p` is aligned to `a.align() ≥
///   req.align` and valid for reads and writes of `a.size() ≥ req.size` bytes
///   until `a` is deallocated, and no other live allocation overlaps it;
/// - if `req.zeroed`, those bytes read as zero;
/// - `a.id()` is unique among live allocations of the process.
pub unsafe trait TensorAllocator: Send + Sync {
    /// The device this backend serves.
    fn device(&self) -> Device;

    /// Allocates. Bad input is an [`AllocError`], never a panic.
    fn allocate(&self, req: &AllocRequest) -> Result<Allocation, AllocError>;

    /// Frees. A stale id, double free or allocation of another backend is an
    /// error and changes nothing.
    ///
    /// # Safety
    /// - No reference into `a`'s memory is used after this returns `Ok`.
    unsafe fn deallocate(&self, a: &Allocation) -> Result<(), AllocError>;

    /// A statistics snapshot. Never slows the hot path.
    fn stats(&self) -> MemoryStats;

    /// Returns cached memory to the OS or driver; the bytes returned.
    fn trim(&self) -> usize;

    /// Copies `src` into the allocation at byte `offset`.
    ///
    /// Bounds-checked: `offset + src.len() ≤ a.size()`, else
    /// [`AllocError::OutOfRange`]. A stale, freed, forged or foreign
    /// allocation is an error and no byte is written. Backends that queue
    /// work (remote, device streams) may return before the bytes land; a
    /// later [`read`](Self::read) of the same bytes sees them
    /// (read-your-writes) and [`synchronize`](Self::synchronize) surfaces
    /// any deferred failure. Backends without bytes return
    /// [`AllocError::Unsupported`].
    fn write(&self, a: &Allocation, offset: usize, src: &[u8]) -> Result<(), AllocError> {
        let _ = (a, offset, src);
        Err(AllocError::Unsupported {
            what: "write: this backend holds no bytes",
        })
    }

    /// Copies `dst.len()` bytes at byte `offset` of the allocation into `dst`.
    ///
    /// The same checks as [`write`](Self::write); a stale or forged
    /// allocation never reads someone else's bytes.
    fn read(&self, a: &Allocation, offset: usize, dst: &mut [u8]) -> Result<(), AllocError> {
        let _ = (a, offset, dst);
        Err(AllocError::Unsupported {
            what: "read: this backend holds no bytes",
        })
    }

    /// Completes queued work (batched writes and frees, device streams) and
    /// returns the first error it deferred. Backends with nothing queued
    /// return `Ok(())`.
    fn synchronize(&self) -> Result<(), AllocError> {
        Ok(())
    }

    /// The bytes this backend would count for `req` after its rounding
    /// (what its `active_bytes` grows by), or the layout error `allocate`
    /// would return; changes nothing. Adaptors that count bytes (such as
    /// [`Limited`](crate::Limited)) use it. The default checks the
    /// alignment and does not round.
    fn rounded_size(&self, req: &AllocRequest) -> Result<usize, AllocError> {
        req.check_align()?;
        Ok(req.size)
    }
}

/// Why a typed view was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ViewError {
    /// The bytes are not in host memory.
    #[error("typed views need host memory; this allocation is on {0}")]
    NotHost(Device),
    /// Size or alignment does not fit the element type.
    #[error("cannot view as the element type: {0}")]
    Cast(bytemuck::PodCastError),
}

/// An owning handle: frees its allocation on drop, gives typed views of host
/// memory.
pub struct TensorBuf {
    alloc: Allocation,
    backend: Arc<dyn TensorAllocator>,
}

impl core::fmt::Debug for TensorBuf {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("TensorBuf")
            .field("alloc", &self.alloc)
            .finish_non_exhaustive()
    }
}

impl TensorBuf {
    /// Allocates `req` from `backend`.
    pub fn new(backend: &Arc<dyn TensorAllocator>, req: &AllocRequest) -> Result<Self, AllocError> {
        let alloc = backend.allocate(req)?;
        Ok(Self {
            alloc,
            backend: backend.clone(),
        })
    }
    /// The allocation.
    pub fn allocation(&self) -> &Allocation {
        &self.alloc
    }
    /// Size in bytes.
    pub fn len_bytes(&self) -> usize {
        self.alloc.size
    }
    fn bytes_ptr(&self) -> Result<*mut u8, ViewError> {
        match self.alloc.addr {
            Addr::Host(p) => Ok(p.as_ptr()),
            // A zero-size host allocation has no pointer; an empty view is fine.
            Addr::None if self.alloc.size == 0 => Ok(NonNull::<u64>::dangling().as_ptr().cast()),
            _ => Err(ViewError::NotHost(self.alloc.device)),
        }
    }
    /// The bytes as `&[T]`.
    pub fn as_slice<T: bytemuck::Pod>(&self) -> Result<&[T], ViewError> {
        let p = self.bytes_ptr()?;
        // SAFETY: 1. the backend's contract (`TensorAllocator` # Safety) makes
        // `p` valid for `size` bytes while `self.alloc` is live, which it is
        // until `self` drops; 2. `&self` excludes `&mut` views; 3. a dangling
        // pointer is used only with length 0.
        let bytes = unsafe { core::slice::from_raw_parts(p, self.alloc.size) };
        bytemuck::try_cast_slice(bytes).map_err(ViewError::Cast)
    }
    /// The bytes as `&mut [T]`.
    pub fn as_mut_slice<T: bytemuck::Pod>(&mut self) -> Result<&mut [T], ViewError> {
        let p = self.bytes_ptr()?;
        // SAFETY: as in `as_slice`, and `&mut self` makes this view unique.
        let bytes = unsafe { core::slice::from_raw_parts_mut(p, self.alloc.size) };
        bytemuck::try_cast_slice_mut(bytes).map_err(ViewError::Cast)
    }
    /// The backend that owns the allocation.
    pub fn backend(&self) -> &Arc<dyn TensorAllocator> {
        &self.backend
    }
    /// Copies the first `dst.len()` elements of the tensor into `dst`,
    /// through the backend's [`TensorAllocator::read`], so it works on every
    /// backend that holds bytes (host, device, remote, offload).
    pub fn read_into<T: bytemuck::Pod>(&self, dst: &mut [T]) -> Result<(), AllocError> {
        self.backend
            .read(&self.alloc, 0, bytemuck::cast_slice_mut(dst))
    }
    /// Copies `src` into the start of the tensor through the backend's
    /// [`TensorAllocator::write`].
    pub fn write_from<T: bytemuck::Pod>(&self, src: &[T]) -> Result<(), AllocError> {
        self.backend
            .write(&self.alloc, 0, bytemuck::cast_slice(src))
    }
    /// Gives up ownership without freeing.
    pub fn into_allocation(self) -> Allocation {
        let a = self.alloc;
        let me = core::mem::ManuallyDrop::new(self);
        // SAFETY: `me` is never used or dropped again; this moves the Arc out
        // exactly once so its count is released.
        drop(unsafe { core::ptr::read(&me.backend) });
        a
    }
}

impl Drop for TensorBuf {
    fn drop(&mut self) {
        // SAFETY: every view borrows `self`, so none outlives this call.
        let r = unsafe { self.backend.deallocate(&self.alloc) };
        debug_assert!(r.is_ok(), "TensorBuf drop: {r:?}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_codes_round_trip() {
        for d in [
            Device::Host,
            Device::Meta,
            Device::Disk,
            Device::Cuda(0),
            Device::Cuda(7),
            Device::Remote(3),
        ] {
            assert_eq!(Device::from_code(d.code()), d);
        }
    }

    #[test]
    fn tensor_request_sizes_and_overflow() {
        let r = AllocRequest::tensor(&[2, 3, 4], DType::F32).unwrap();
        assert_eq!(r.size, 96);
        assert_eq!(r.shape.unwrap().dims(), &[2, 3, 4]);
        assert_eq!(r.shape.unwrap().contiguous_strides()[..3], [12, 4, 1]);
        let e = AllocRequest::tensor(&[usize::MAX, 2], DType::F32).unwrap_err();
        assert!(matches!(
            e,
            AllocError::InvalidLayout {
                problem: LayoutProblem::ShapeOverflow,
                ..
            }
        ));
        assert!(AllocRequest::new(8, 3).check_align().is_err());
    }
}
