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
    addr: u64,
    addr_kind: AddrKind,
    align: u64,
    shape: Option<Shape>,
}

impl TensorInfo {
    /// Cold words for a new tensor (see the module docs).
    pub(crate) fn cold_words(
        addr: u64,
        kind: AddrKind,
        align: u64,
        shape: Option<&Shape>,
    ) -> [u64; COLD_WORDS] {
        let mut w = [0u64; COLD_WORDS];
        w[0] = addr;
        // Alignments are powers of two (the backends check), so the log fits a byte.
        w[1] = u64::from(align.trailing_zeros()) | u64::from(kind as u8) << 8;
        if let Some(s) = shape {
            w[2..2 + s.rank()].copy_from_slice(s.dims());
        }
        w
    }

    /// Rebuilds the info from a record and its cold words.
    pub(crate) fn from_parts(meta: TensorMeta, w: &[u64; COLD_WORDS]) -> Self {
        let shape = meta.rank().and_then(|r| Shape::from_u64(&w[2..2 + r]));
        TensorInfo {
            meta,
            addr: w[0],
            addr_kind: AddrKind::from_code((w[1] >> 8) as u8),
            align: 1u64 << (w[1] & 63),
            shape,
        }
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
        self.align
    }
    /// The device.
    pub fn device(&self) -> Device {
        self.meta.device()
    }
    /// The raw address recorded (a host pointer's address, a device
    /// address, a remote id; 0 with no bytes).
    pub fn address(&self) -> u64 {
        self.addr
    }
    /// What kind of address was recorded.
    pub fn addr_kind(&self) -> AddrKind {
        self.addr_kind
    }
    /// The whole shape, if one was given (every dimension, exactly).
    pub fn shape(&self) -> Option<Shape> {
        self.shape
    }
    /// Element type, if one was given.
    pub fn dtype(&self) -> Option<DType> {
        self.meta.dtype()
    }
    /// Row-major strides in elements, one per dimension (tensors are
    /// allocated contiguous), if a shape was given.
    pub fn strides(&self) -> Option<Vec<u64>> {
        self.shape
            .map(|s| s.contiguous_strides()[..s.rank()].to_vec())
    }
    /// The flags given at allocation.
    pub fn flags(&self) -> TensorFlags {
        self.meta.flags()
    }
}
