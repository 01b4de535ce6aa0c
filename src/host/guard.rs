//! Double-free detection, the way glibc's tcache does it.
//!
//! Every pool has a random nonzero *key*. Freeing a block writes the key into
//! the block's second word (the first holds the free-list link); handing a
//! block out clears that word again. So a free whose block already carries
//! the key is almost certainly a second free of a block that is free now: only
//! then does the pool take the slow path and walk the lists where the block
//! could be (this thread's cache for the class, the class's central list, the
//! huge cache). Found there: a double free, refused with nothing changed. Not
//! found: the program stored the key value itself, or the block sits in
//! *another* thread's cache, which no thread may walk; the free goes ahead,
//! as glibc's does. The hot path pays one load and one compare.
//!
//! The same word tells a block that was handed out before (it carries the
//! key while free) from a fresh one (carved from a never-used span tail or a
//! new mapping: it reads zero): that is how cache hits and misses are
//! counted per request, at no extra load.
//!
//! Blocks of class 0 (8 bytes) have no second word: they carry no key, their
//! double frees are not detected, and their hits and misses are counted when
//! a batch enters a thread cache rather than per request.
//!
//! Invariant: a block on a free list of class `c > 0` or in the huge cache
//! has `word 1 == key` (blocks never handed out, zero); a block in use has
//! whatever its owner wrote.

use super::transfer::FreeBlock;
use crate::sync::{AtomicUsize, Ordering};

/// Whether blocks of class `c` have room for the key (16 bytes and more).
#[inline(always)]
pub(crate) const fn has_key(c: usize) -> bool {
    c != 0
}

/// The key word of a free (or freed) block.
///
/// # Safety
/// - `b` is a block of at least 16 bytes, 8-aligned, readable.
#[inline(always)]
pub(crate) unsafe fn key_of(b: *mut FreeBlock) -> usize {
    // SAFETY: per the contract, the second word is inside the block.
    unsafe { b.cast::<usize>().add(1).read() }
}

/// Writes the key word.
///
/// # Safety
/// - As for [`key_of`], and the block is the caller's (free or being freed).
#[inline(always)]
pub(crate) unsafe fn set_key(b: *mut FreeBlock, key: usize) {
    // SAFETY: per the contract.
    unsafe { b.cast::<usize>().add(1).write(key) }
}

/// A fresh key: a 64-bit mix of the pool's address, the clock, a counter
/// and the address of a stack variable (ASLR), never zero. Not a
/// cryptographic secret: it only has to be a value no program writes into a
/// block by accident.
pub(crate) fn fresh_key(seed: usize) -> usize {
    static COUNTER: AtomicUsize = AtomicUsize::new(0);
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid out-pointer; clock_gettime does not allocate.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    let local = 0u8;
    let mut z = (seed as u64)
        ^ (ts.tv_nsec as u64).rotate_left(17)
        ^ (ts.tv_sec as u64).rotate_left(41)
        ^ (COUNTER.fetch_add(1, Ordering::Relaxed) as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)
        ^ (&local as *const u8 as u64).rotate_left(29);
    // splitmix64's finaliser.
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    (z as usize) | 1
}

#[cfg(test)]
mod tests {
    #[test]
    fn keys_are_nonzero_and_differ() {
        let a = super::fresh_key(0x1000);
        let b = super::fresh_key(0x1000);
        assert!(a != 0 && b != 0 && a != b);
    }
}
