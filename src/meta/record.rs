//! [`TensorMeta`]: one tensor's metadata in one 64-byte cache line.
//!
//! Layout (byte offsets, `repr(C)`, no padding; const-asserted below):
//!
//! | off | field          | type  | notes                                        |
//! |----:|----------------|-------|----------------------------------------------|
//! |   0 | `id`           | u64   | the tensor id, also the slot's generation    |
//! |   8 | `size`         | u64   | requested bytes                              |
//! |  16 | `access_count` | u64   | touches (decayed by `MetaTable::decay`)      |
//! |  24 | `last_access`  | u64   | largest `now` any touch passed               |
//! |  32 | `refcount`     | u32   | references (1 at insert)                     |
//! |  36 | `device`       | u16   | [`Device::code`]                             |
//! |  38 | `dtype`        | u8    | `DType as u8`, `0xFF` when unknown           |
//! |  39 | `rank_flags`   | u8    | low nibble: rank 0..=8, `0xF` = no shape; high nibble: `TensorFlags` bits 0..3 |
//! |  40 | `numel`        | u64   | element count (0 without a shape; saturates) |
//! |  48 | `dims`         | 2×u32 | first two dimensions, saturated at `u32::MAX`|
//! |  56 | `hash`         | u64   | [`fnv1a_tensor`] of shape, strides, dtype, offset (the address), id |
//!
//! The hot fields (the first 32 bytes) are the ones the batch operations
//! read; in the table they also live in structure-of-arrays columns (see
//! [`crate::meta::table`] for why), and a record read from the table carries
//! the columns' current values.

use crate::allocator::{DType, Device, TensorFlags};
use crate::meta::hash::fnv1a_tensor;
use crate::meta::id::TensorId;
use crate::meta::table::NewTensor;

/// One tensor's metadata: 64 bytes, one cache line.
#[repr(C, align(64))]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct TensorMeta {
    id: u64,
    size: u64,
    access_count: u64,
    last_access: u64,
    refcount: u32,
    device: u16,
    dtype: u8,
    rank_flags: u8,
    numel: u64,
    dims: [u32; 2],
    hash: u64,
}

const _: () = assert!(core::mem::size_of::<TensorMeta>() == 64);
const _: () = assert!(core::mem::align_of::<TensorMeta>() == 64);
const _: () = assert!(core::mem::offset_of!(TensorMeta, refcount) == 32);
const _: () = assert!(core::mem::offset_of!(TensorMeta, hash) == 56);

/// `DType` by its `u8` discriminant.
const DTYPES: [DType; 15] = [
    DType::U8,
    DType::I8,
    DType::Bool,
    DType::F8E4M3,
    DType::F8E5M2,
    DType::I16,
    DType::U16,
    DType::F16,
    DType::BF16,
    DType::I32,
    DType::U32,
    DType::F32,
    DType::I64,
    DType::U64,
    DType::F64,
];

const NO_SHAPE: u8 = 0xF;
const NO_DTYPE: u8 = 0xFF;

impl TensorMeta {
    /// The record for a new tensor: access count 0, last access 0, refcount 1.
    pub fn new(id: TensorId, t: &NewTensor) -> Self {
        let (rank, numel, dims, hash) = match &t.shape {
            Some(s) => {
                let strides = s.contiguous_strides();
                let d = s.dims();
                let sat = |i: usize| {
                    d.get(i)
                        .map_or(0, |&v| u32::try_from(v).unwrap_or(u32::MAX))
                };
                let hash = fnv1a_tensor(d, &strides[..s.rank()], t.dtype, t.addr, id);
                (
                    s.rank() as u8,
                    s.numel().unwrap_or(u64::MAX),
                    [sat(0), sat(1)],
                    hash,
                )
            }
            None => (
                NO_SHAPE,
                0,
                [0, 0],
                fnv1a_tensor(&[], &[], t.dtype, t.addr, id),
            ),
        };
        TensorMeta {
            id: id.get(),
            size: t.size,
            access_count: 0,
            last_access: 0,
            refcount: 1,
            device: t.device.code(),
            dtype: t.dtype.map_or(NO_DTYPE, |d| d as u8),
            rank_flags: rank | ((t.flags.0 & 0xF) << 4),
            numel,
            dims,
            hash,
        }
    }

    /// The tensor id.
    #[inline]
    pub fn id(&self) -> TensorId {
        // Records are built only by `new` (a real id) or `from_words` of a
        // live slot, whose id word is non-zero.
        TensorId::from_raw(self.id).expect("TensorMeta with id 0")
    }
    /// Requested size in bytes.
    #[inline]
    pub fn size(&self) -> u64 {
        self.size
    }
    /// Access count (touches since insert, halved by each `decay(1)`).
    #[inline]
    pub fn access_count(&self) -> u64 {
        self.access_count
    }
    /// The largest `now` passed to a touch of this tensor (0 if never).
    #[inline]
    pub fn last_access(&self) -> u64 {
        self.last_access
    }
    /// Reference count.
    #[inline]
    pub fn refcount(&self) -> u32 {
        self.refcount
    }
    /// The device.
    #[inline]
    pub fn device(&self) -> Device {
        Device::from_code(self.device)
    }
    /// The device code ([`Device::code`]).
    #[inline]
    pub fn device_code(&self) -> u16 {
        self.device
    }
    /// Element type, if it was given.
    #[inline]
    pub fn dtype(&self) -> Option<DType> {
        DTYPES.get(usize::from(self.dtype)).copied()
    }
    /// Rank, if a shape was given.
    #[inline]
    pub fn rank(&self) -> Option<usize> {
        let r = self.rank_flags & 0xF;
        (r != NO_SHAPE).then_some(usize::from(r))
    }
    /// The first two dimensions (0 past the rank), each saturated at `u32::MAX`.
    #[inline]
    pub fn leading_dims(&self) -> [u32; 2] {
        self.dims
    }
    /// Element count, if a shape was given (`u64::MAX` if it overflowed).
    #[inline]
    pub fn numel(&self) -> Option<u64> {
        self.rank().map(|_| self.numel)
    }
    /// The flags (bits 0..3 of what was inserted: pinned, weight, temporary).
    #[inline]
    pub fn flags(&self) -> TensorFlags {
        TensorFlags(self.rank_flags >> 4)
    }
    /// Never evicted: excluded from [`crate::meta::MetaTable::lru`].
    #[inline]
    pub fn pinned(&self) -> bool {
        self.flags().has(TensorFlags::PINNED)
    }
    /// The FNV-1a identity hash.
    #[inline]
    pub fn hash(&self) -> u64 {
        self.hash
    }

    /// The record as eight words (the table's storage form). Fields are
    /// packed by value, so the words mean the same on every endianness.
    #[inline]
    pub(crate) fn to_words(self) -> [u64; 8] {
        [
            self.id,
            self.size,
            self.access_count,
            self.last_access,
            u64::from(self.refcount)
                | u64::from(self.device) << 32
                | u64::from(self.dtype) << 48
                | u64::from(self.rank_flags) << 56,
            self.numel,
            u64::from(self.dims[0]) | u64::from(self.dims[1]) << 32,
            self.hash,
        ]
    }

    /// Inverse of [`to_words`](Self::to_words).
    #[inline]
    pub(crate) fn from_words(w: [u64; 8]) -> Self {
        TensorMeta {
            id: w[0],
            size: w[1],
            access_count: w[2],
            last_access: w[3],
            refcount: w[4] as u32,
            device: (w[4] >> 32) as u16,
            dtype: (w[4] >> 48) as u8,
            rank_flags: (w[4] >> 56) as u8,
            numel: w[5],
            dims: [w[6] as u32, (w[6] >> 32) as u32],
            hash: w[7],
        }
    }

    /// Replaces the hot counters (the table keeps them in columns).
    #[inline]
    pub(crate) fn with_counters(mut self, access_count: u64, last_access: u64) -> Self {
        self.access_count = access_count;
        self.last_access = last_access;
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::allocator::Shape;

    fn nt(shape: Option<&[usize]>, dtype: Option<DType>, flags: u8) -> NewTensor {
        NewTensor {
            size: 96,
            align: 64,
            device: Device::Cuda(3),
            shape: shape.map(|s| Shape::new(s).unwrap()),
            dtype,
            flags: TensorFlags(flags),
            addr: 0x1000,
            addr_kind: crate::meta::AddrKind::Host,
        }
    }

    #[test]
    fn summary_fields_and_round_trip() {
        let id = TensorId::from_raw(42).unwrap();
        let m = TensorMeta::new(
            id,
            &nt(
                Some(&[2, 3, 4]),
                Some(DType::F32),
                TensorFlags::PINNED | TensorFlags::WEIGHT,
            ),
        );
        assert_eq!(m.id(), id);
        assert_eq!(m.size(), 96);
        assert_eq!((m.access_count(), m.last_access(), m.refcount()), (0, 0, 1));
        assert_eq!(m.device(), Device::Cuda(3));
        assert_eq!(m.dtype(), Some(DType::F32));
        assert_eq!(m.rank(), Some(3));
        assert_eq!(m.numel(), Some(24));
        assert_eq!(m.leading_dims(), [2, 3]);
        assert!(
            m.pinned()
                && m.flags().has(TensorFlags::WEIGHT)
                && !m.flags().has(TensorFlags::TEMPORARY)
        );
        assert_eq!(
            m.hash(),
            fnv1a_tensor(&[2, 3, 4], &[12, 4, 1], Some(DType::F32), 0x1000, id)
        );
        assert_eq!(TensorMeta::from_words(m.to_words()), m);
    }

    #[test]
    fn no_shape_no_dtype_and_every_dtype_round_trips() {
        let id = TensorId::from_raw(1).unwrap();
        let m = TensorMeta::new(id, &nt(None, None, 0));
        assert_eq!((m.rank(), m.numel(), m.dtype()), (None, None, None));
        let scalar = TensorMeta::new(id, &nt(Some(&[]), Some(DType::BF16), 0));
        assert_eq!((scalar.rank(), scalar.numel()), (Some(0), Some(1)));
        for (i, d) in DTYPES.iter().enumerate() {
            assert_eq!(*d as usize, i);
            let m = TensorMeta::new(id, &nt(Some(&[5]), Some(*d), 0));
            assert_eq!(TensorMeta::from_words(m.to_words()).dtype(), Some(*d));
        }
    }
}
