//! Local memory of the remote backend: metadata only. Its own test binary
//! (one test), so the process's RSS is this test's alone.
//!
//! 1. Bytes per live tensor: 200,000 lazy tensors on the in-process store
//!    (which then holds nothing), RSS before and after.
//! 2. With Redis (when `TENSORPOOL_REDIS_URL` names one): after a 256 MiB
//!    warm-up, writing 1 GiB more of tensors grows this process's RSS by
//!    far less than 1 GiB — the bytes are in the server; local memory is
//!    bounded by the queue and cache limits, not by the data.
#![cfg(feature = "remote")]

mod remote_common;

use tensorpool::backend::remote::{CHUNK, RedisStore, RemoteBackend, RemoteConfig};
use tensorpool::{AllocRequest, Allocation, DType, TensorAllocator, resident_bytes};

#[test]
fn local_memory_is_metadata_only() {
    let Some(r0) = resident_bytes() else {
        eprintln!("SKIP local_memory_is_metadata_only: no RSS on this OS");
        return;
    };
    let b = RemoteBackend::in_memory().unwrap();
    let n = 200_000;
    let req = AllocRequest::tensor(&[64, 1024], DType::F32).unwrap(); // 256 KiB each
    let v: Vec<Allocation> = (0..n).map(|_| b.allocate(&req).unwrap()).collect();
    let r1 = resident_bytes().unwrap();
    // The Vec of handles is the test's, not the backend's.
    let handles = n * core::mem::size_of::<Allocation>();
    let per = (r1.saturating_sub(r0).saturating_sub(handles)) as f64 / n as f64;
    eprintln!(
        "remote backend: {per:.0} B of local memory per live tensor ({n} tensors of 256 KiB, \
         {} GiB remote-sized)",
        (n * req.size) >> 30
    );
    assert!(per < 1024.0, "{per} B per tensor");
    assert!(b.store().is_empty());
    for a in &v {
        // SAFETY: allocated above, freed once.
        unsafe { b.deallocate(a).unwrap() };
    }
    drop(v);

    let Some(cfg) = remote_common::single("local_memory_is_metadata_only (Redis part)") else {
        return;
    };
    let b = RemoteBackend::new(RedisStore::open(cfg).unwrap(), RemoteConfig::default()).unwrap();
    let src = vec![0x5Au8; 4 * CHUNK];
    let mut ts: Vec<Allocation> = Vec::new();
    let mut put = |count: usize| {
        for _ in 0..count {
            let a = b.allocate(&AllocRequest::bytes(src.len())).unwrap();
            b.write(&a, 0, &src).unwrap();
            ts.push(a);
        }
        b.synchronize().unwrap();
        b.trim();
    };
    // Warm up with the same workload: the queue (64 MiB bound), the batch
    // in flight with the client's copy of it, the read cache and the
    // allocator's free lists reach their peak here, not below.
    put(64);
    let before = resident_bytes().unwrap();
    // 1 GiB more, in four rounds: RSS stays on the plateau the warm-up
    // reached (it varied by up to ~70 MiB from run to run, never with the
    // bytes sent).
    for _ in 0..4 {
        put(64);
        eprintln!(
            "after 256 MiB more: RSS {} MiB",
            resident_bytes().unwrap() >> 20
        );
    }
    let after = resident_bytes().unwrap();
    let remote = 4 * 64 * src.len();
    let grew = after.saturating_sub(before);
    eprintln!(
        "remote backend on Redis: RSS grew {} MiB while {} MiB more went to the server",
        grew >> 20,
        remote >> 20
    );
    assert!(grew < remote / 8, "RSS grew {grew} B for {remote} B remote");
    for a in &ts {
        // SAFETY: allocated above, freed once.
        unsafe { b.deallocate(a).unwrap() };
    }
    b.synchronize().unwrap();
}
