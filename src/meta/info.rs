//! [`TensorInfo`]: everything the metadata table keeps about one tensor —
//! the 64-byte hot record plus the cold side words (address, alignment and
//! the whole shape) that no scan reads.
//!
//! The hot record ([`TensorMeta`]) stays one cache line: it holds rank,
//! element count and the first two dimensions saturated at `u32::MAX`,
//! enough for the batch operations. What a backend needs to verify a free
//! (address, alignment) and what the offload and remote backends need to
//! describe a tensor (every dimension, dtype, strides) lives in a cold
//! array beside the hot columns, keyed by the same slot, written by
//! `MetaTable::insert` and read under the same seqlock as the record.
//!
//! Cold words of a slot (`COLD_WORDS` of them):
//!
//! | word | meaning                                                   |
//! |-----:|-----------------------------------------------------------|
//! |    0 | the address (raw; 0 for none)                             |
//! |    1 | bits 0..8: log2 of the alignment; bits 8..16: [`AddrKind`] |
//! | 2..10| the dimensions, `rank` of them (rank is in the hot record) |

use crate::allocator::{Addr, DType, Device, Shape, TensorFlags};
use crate::meta::id::TensorId;
use crate::meta::record::TensorMeta;

/// Words per slot in the cold side table.
pub(crate) const COLD_WORDS: usize = 2 + Shape::MAX_RANK;

/// What kind of address an allocation carries (the variant of [`Addr`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[repr(u8)]
pub enum AddrKind {
    /// No bytes ([`Addr::None`]).
    #[default]
    None = 0,
    /// A host pointer ([`Addr::Host`]).
    Host = 1,
    /// A device address ([`Addr::Device`]).
    Device = 2,
    /// A remote-store id ([`Addr::Remote`]).
    Remote = 3,
}

impl AddrKind {
    /// The kind and raw value of `a` (a host pointer as its address).
    pub fn split(a: Addr) -> (AddrKind, u64) {
        match a {
            Addr::None => (AddrKind::None, 0),
            Addr::Host(p) => (AddrKind::Host, p.as_ptr().addr() as u64),
            Addr::Device(v) => (AddrKind::Device, v),
            Addr::Remote(v) => (AddrKind::Remote, v),
        }
    }

    fn from_code(c: u8) -> AddrKind {
        match c {
            1 => AddrKind::Host,
            2 => AddrKind::Device,
            3 => AddrKind::Remote,
            _ => AddrKind::None,
        }
    }
}

/// One tensor as the table recorded it: the hot record plus address,
/// alignment and the whole shape. Read with `MetaTable::info`, or from an
/// [`Allocation`](crate::Allocation) with the backends' `meta` methods.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TensorInfo {
    meta: TensorMeta,
    /// The cold words as stored; dimensions past the rank are 0.
    cold: [u64; COLD_WORDS],
}

impl TensorInfo {
    /// The second cold word: log2 of the alignment and the address kind.
    #[inline]
    pub(crate) fn cold_align_kind(align: u64, kind: AddrKind) -> u64 {
        // Alignments are powers of two (the backends check), so the log fits a byte.
        u64::from(align.trailing_zeros()) | u64::from(kind as u8) << 8
    }

    /// The info from a record and its cold words (dimensions past the
    /// record's rank must be 0).
    pub(crate) fn from_parts(meta: TensorMeta, cold: [u64; COLD_WORDS]) -> Self {
        TensorInfo { meta, cold }
    }

    /// How many cold words a record of this rank uses.
    #[inline]
    pub(crate) fn cold_len(meta: &TensorMeta) -> usize {
        2 + meta.rank().unwrap_or(0).min(Shape::MAX_RANK)
    }

    /// The 64-byte hot record (with its current access counters).
    pub fn record(&self) -> &TensorMeta {
        &self.meta
    }
    /// The tensor id.
    pub fn id(&self) -> TensorId {
        self.meta.id()
    }
    /// Requested size in bytes.
    pub fn size(&self) -> u64 {
        self.meta.size()
    }
    /// Alignment in bytes.
    pub fn align(&self) -> u64 {
        1u64 << (self.cold[1] & 63)
    }
    /// The device.
    pub fn device(&self) -> Device {
        self.meta.device()
    }
    /// The raw address recorded (a host pointer's address, a device
    /// address, a remote id; 0 with no bytes).
    pub fn address(&self) -> u64 {
        self.cold[0]
    }
    /// What kind of address was recorded.
    pub fn addr_kind(&self) -> AddrKind {
        AddrKind::from_code((self.cold[1] >> 8) as u8)
    }
    /// The whole shape, if one was given (every dimension, exactly).
    pub fn shape(&self) -> Option<Shape> {
        let n = Self::cold_len(&self.meta);
        self.meta
            .rank()
            .and_then(|_| Shape::from_u64(&self.cold[2..n]))
    }
    /// Element type, if one was given.
    pub fn dtype(&self) -> Option<DType> {
        self.meta.dtype()
    }
    /// Row-major strides in elements, one per dimension (tensors are
    /// allocated contiguous), if a shape was given.
    pub fn strides(&self) -> Option<Vec<u64>> {
        self.shape()
            .map(|s| s.contiguous_strides()[..s.rank()].to_vec())
    }
    /// The flags given at allocation.
    pub fn flags(&self) -> TensorFlags {
        self.meta.flags()
    }
}
