//! `allocator-api2` 0.2 support: `&HostPool` and `HostPool` are
//! [`allocator_api2::alloc::Allocator`]s, so `allocator_api2::vec::Vec::new_in(&pool)`
//! and `hashbrown::HashMap::new_in(&pool)` work on stable Rust.

use super::HostPool;
use allocator_api2::alloc::{AllocError, Allocator};
use core::alloc::Layout;
use core::ptr::NonNull;

// SAFETY: 1. blocks come from `HostPool::allocate`, valid for at least
// `layout.size()` bytes at `layout.align()` until deallocated; 2. a block is
// only freed through `deallocate` with its layout (allocator-api2's caller
// contract), and any clone of the pool may free it (they share one pool);
// 3. zero-size layouts get a dangling aligned pointer that owns nothing.
unsafe impl Allocator for HostPool {
    #[inline]
    fn allocate(&self, layout: Layout) -> Result<NonNull<[u8]>, AllocError> {
        let p = HostPool::allocate(self, layout).map_err(|_| AllocError)?;
        Ok(NonNull::slice_from_raw_parts(p, layout.size()))
    }

    #[inline]
    fn allocate_zeroed(&self, layout: Layout) -> Result<NonNull<[u8]>, AllocError> {
        let p = HostPool::allocate_zeroed(self, layout).map_err(|_| AllocError)?;
        Ok(NonNull::slice_from_raw_parts(p, layout.size()))
    }

    #[inline]
    unsafe fn deallocate(&self, ptr: NonNull<u8>, layout: Layout) {
        // SAFETY: the Allocator contract: `ptr` is a live block of this
        // allocator allocated with `layout`.
        unsafe { HostPool::deallocate(self, ptr, layout) }
    }

    unsafe fn grow(
        &self,
        ptr: NonNull<u8>,
        old: Layout,
        new: Layout,
    ) -> Result<NonNull<[u8]>, AllocError> {
        // SAFETY: forwarded: `ptr` is live with `old` (allocator-api2 contract).
        unsafe { move_block(self, ptr, old, new) }
    }

    unsafe fn shrink(
        &self,
        ptr: NonNull<u8>,
        old: Layout,
        new: Layout,
    ) -> Result<NonNull<[u8]>, AllocError> {
        // SAFETY: as in `grow`.
        unsafe { move_block(self, ptr, old, new) }
    }
}

/// Resizes: in place when the new layout rounds to the same class, else a
/// new block, a copy of the bytes kept, and a free of the old one.
///
/// # Safety
/// - `ptr` is a live block of `pool` allocated with `old`.
unsafe fn move_block(
    pool: &HostPool,
    ptr: NonNull<u8>,
    old: Layout,
    new: Layout,
) -> Result<NonNull<[u8]>, AllocError> {
    if old.align() == new.align() && HostPool::rounded_size(old) == HostPool::rounded_size(new) {
        return Ok(NonNull::slice_from_raw_parts(ptr, new.size()));
    }
    // SAFETY: forwarded from the caller.
    if let Some(q) = unsafe { pool.realloc_big(ptr, old, new) } {
        return Ok(NonNull::slice_from_raw_parts(q, new.size()));
    }
    let q = HostPool::allocate(pool, new).map_err(|_| AllocError)?;
    // SAFETY: 1. `ptr` is live with `old.size()` bytes (caller); 2. `q` is a
    // fresh, disjoint block of ≥ new.size() bytes; 3. the copy takes the
    // smaller of the two; 4. `ptr` is freed with its own layout, once.
    unsafe {
        core::ptr::copy_nonoverlapping(ptr.as_ptr(), q.as_ptr(), old.size().min(new.size()));
        HostPool::deallocate(pool, ptr, old);
    }
    Ok(NonNull::slice_from_raw_parts(q, new.size()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vec_and_hashmap_in_pool() {
        let pool = HostPool::new();
        let mut v = allocator_api2::vec::Vec::new_in(&pool);
        for i in 0..100_000u32 {
            v.push(i);
        }
        assert_eq!(
            v.iter().map(|&x| u64::from(x)).sum::<u64>(),
            99_999 * 100_000 / 2
        );
        assert!(pool.owns(v.as_ptr().cast()));
        let mut m = hashbrown::HashMap::new_in(&pool);
        for i in 0..10_000u64 {
            m.insert(i, i * 3);
        }
        assert_eq!(m[&9_999], 29_997);
        drop(m);
        v.truncate(10);
        v.shrink_to_fit();
        assert_eq!(&v[..3], &[0, 1, 2]);
        drop(v);
        // Owned pool as allocator too.
        let mut w = allocator_api2::vec::Vec::<u8, HostPool>::with_capacity_in(10, pool.clone());
        w.extend_from_slice(b"tensor");
        assert_eq!(&w[..], b"tensor");
    }
}
