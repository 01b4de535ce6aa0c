//! FNV-1a (64-bit) over a tensor's identity: shape, strides, dtype, offset
//! and id.
//!
//! FNV-1a is not a cryptographic hash; it is here for debugging and for a
//! cheap identity check of a record (two records with different shapes,
//! strides, dtypes, offsets or ids almost surely hash differently). Every
//! integer is fed little-endian so the value is the same on every target.

use crate::allocator::DType;
use crate::meta::id::TensorId;

/// The FNV-1a 64-bit offset basis.
pub const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
/// The FNV-1a 64-bit prime.
pub const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

/// An FNV-1a 64-bit hasher state.
#[derive(Debug, Clone, Copy)]
pub struct Fnv1a(u64);

impl Fnv1a {
    /// A fresh state (the offset basis).
    #[inline]
    pub const fn new() -> Self {
        Self(FNV_OFFSET)
    }
    /// Feeds bytes.
    #[inline]
    pub fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 ^= u64::from(b);
            self.0 = self.0.wrapping_mul(FNV_PRIME);
        }
    }
    /// Feeds a `u64`, little-endian.
    #[inline]
    pub fn write_u64(&mut self, v: u64) {
        self.write(&v.to_le_bytes());
    }
    /// The hash so far.
    #[inline]
    pub const fn finish(self) -> u64 {
        self.0
    }
}

impl Default for Fnv1a {
    fn default() -> Self {
        Self::new()
    }
}

/// FNV-1a 64 of a byte string.
pub fn fnv1a64(bytes: &[u8]) -> u64 {
    let mut h = Fnv1a::new();
    h.write(bytes);
    h.finish()
}

/// The identity hash of a tensor record.
///
/// Fed in order: rank, then each dimension, then each stride (as many as
/// dims), then the dtype code (`0xFF` when unknown), the offset and the id.
/// Rank and lengths go in so that `[2, 3]` and `[2], strides [3]` differ.
pub fn fnv1a_tensor(
    dims: &[u64],
    strides: &[u64],
    dtype: Option<DType>,
    offset: u64,
    id: TensorId,
) -> u64 {
    let mut h = Fnv1a::new();
    h.write_u64(dims.len() as u64);
    for &d in dims {
        h.write_u64(d);
    }
    h.write_u64(strides.len() as u64);
    for &s in strides {
        h.write_u64(s);
    }
    h.write(&[dtype.map_or(0xFF, |d| d as u8)]);
    h.write_u64(offset);
    h.write_u64(id.get());
    h.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Known answers from the FNV reference test suite (isthe.com/chongo/tech/comp/fnv).
    #[test]
    fn fnv1a64_known_answers() {
        assert_eq!(fnv1a64(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a64(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a64(b"foobar"), 0x8594_4171_f739_67e8);
    }

    #[test]
    fn tensor_hash_separates_fields() {
        let id = TensorId::from_raw(7).unwrap();
        let base = fnv1a_tensor(&[2, 3], &[3, 1], Some(DType::F32), 0, id);
        assert_eq!(
            base,
            fnv1a_tensor(&[2, 3], &[3, 1], Some(DType::F32), 0, id)
        );
        assert_ne!(
            base,
            fnv1a_tensor(&[3, 2], &[2, 1], Some(DType::F32), 0, id)
        );
        assert_ne!(
            base,
            fnv1a_tensor(&[2, 3], &[1, 2], Some(DType::F32), 0, id)
        );
        assert_ne!(
            base,
            fnv1a_tensor(&[2, 3], &[3, 1], Some(DType::F16), 0, id)
        );
        assert_ne!(base, fnv1a_tensor(&[2, 3], &[3, 1], None, 0, id));
        assert_ne!(
            base,
            fnv1a_tensor(&[2, 3], &[3, 1], Some(DType::F32), 64, id)
        );
        assert_ne!(
            base,
            fnv1a_tensor(
                &[2, 3],
                &[3, 1],
                Some(DType::F32),
                0,
                TensorId::from_raw(8).unwrap()
            )
        );
        assert_ne!(
            fnv1a_tensor(&[2, 3], &[], None, 0, id),
            fnv1a_tensor(&[2], &[3], None, 0, id)
        );
    }
}
