//! Tests that read the process's resident set: they live in their own test
//! binary (so no test of another file allocates meanwhile) and take a lock,
//! so that within it they run one at a time.
//!
//! - `dropping_pools_unmaps_them`: dropped pools give their memory back.
//! - `item6_worker_cache_does_not_keep_dropped_pools_mapped`: a long-lived
//!   worker that cached eight successive 64 MiB pools holds none of them.
//! - `item7_live_huge_blocks_go_back_with_their_pool`: huge blocks still in
//!   use when the last handle drops are unmapped with it.

use core::alloc::Layout;
use std::sync::mpsc;
use std::sync::{Mutex, MutexGuard};
use tensorpool::host::HostPool;
use tensorpool::resident_bytes;

static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner())
}

fn rss() -> usize {
    resident_bytes().expect("/proc/self/statm")
}

#[test]
fn dropping_pools_unmaps_them() {
    let _g = serial();
    let before = rss();
    for _ in 0..20 {
        let pool = HostPool::new();
        let l = Layout::from_size_align(8 << 20, 64).unwrap();
        let p = pool.allocate(l).unwrap();
        // SAFETY: 8 MiB live block.
        unsafe {
            p.as_ptr().write_bytes(1, 8 << 20);
            pool.deallocate(p, l);
        }
    }
    let after = rss();
    assert!(
        after < before + (64 << 20),
        "RSS grew from {before} to {after}"
    );
}

/// Issue 7 item 6: each pool is handed to a long-lived worker, which
/// allocates 64 MiB from it (touched), frees it and keeps running; the
/// main thread then drops the last handle. The worker's cache slots must
/// not keep the pools' memory mapped.
#[test]
fn item6_worker_cache_does_not_keep_dropped_pools_mapped() {
    let _g = serial();
    let (to_worker, jobs) = mpsc::channel::<HostPool>();
    let (done, finished) = mpsc::channel::<HostPool>();
    let worker = std::thread::spawn(move || {
        for pool in jobs {
            // Blocks of 4 MiB (classes, one thread-cache slot each) and one
            // huge block: together 64 MiB.
            let l = Layout::from_size_align(4 << 20, 64).unwrap();
            let ps: Vec<_> = (0..8).map(|_| pool.allocate(l).unwrap()).collect();
            let h = Layout::from_size_align(32 << 20, 64).unwrap();
            let big = pool.allocate(h).unwrap();
            // SAFETY: live blocks of these layouts; freed right after.
            unsafe {
                big.as_ptr().write_bytes(7, 32 << 20);
                for &p in &ps {
                    p.as_ptr().write_bytes(7, 4 << 20);
                }
                for p in ps {
                    pool.deallocate(p, l);
                }
                pool.deallocate(big, h);
            }
            done.send(pool).unwrap();
        }
    });
    let before = rss();
    for _ in 0..8 {
        to_worker.send(HostPool::new()).unwrap();
        // The worker has used the pool and cached it; drop the last handle here.
        let pool = finished.recv().unwrap();
        drop(pool);
    }
    let after = rss();
    drop(to_worker);
    worker.join().unwrap();
    assert!(
        after < before + (64 << 20),
        "RSS grew from {} MiB to {} MiB while the worker lives",
        before >> 20,
        after >> 20
    );
}

/// Issue 7 item 7: huge blocks still in use when the pool's last handle
/// drops are unmapped with it (the pool's memory is gone; pointers dangle).
#[test]
fn item7_live_huge_blocks_go_back_with_their_pool() {
    let _g = serial();
    let before = rss();
    for _ in 0..4 {
        let pool = HostPool::new();
        let l = Layout::from_size_align(100 << 20, 64).unwrap();
        let p = pool.allocate(l).unwrap();
        // SAFETY: a live 100 MiB block; never freed, the pool drops under it.
        unsafe { p.as_ptr().write_bytes(3, 100 << 20) };
        let later = HostPool::new();
        drop(pool);
        assert!(!later.owns(p.as_ptr()) && !later.manages(p.as_ptr()));
    }
    let after = rss();
    assert!(
        after < before + (100 << 20),
        "RSS grew from {} MiB to {} MiB",
        before >> 20,
        after >> 20
    );
}
