//! The CUDA caching pool on the simulated driver: PyTorch's policy and its
//! own tests ported by name (`test_cuda.py`), RMM's pool tests by name,
//! stream-ordered reuse, the OOM message, fault injection at every driver
//! call site, handle verification and the no-CUDA path.
#![cfg(feature = "cuda")]

use tensorpool::backend::MetaBackend;
use tensorpool::backend::cuda::{
    Action, BlockState, Call, CudaBackend, CudaConfig, CudarcDriver, Fault, SimDriver, UNINIT_BYTE,
    libcuda_present,
};
use tensorpool::{Addr, AllocError, AllocRequest, Allocation, Device, TensorAllocator};

const MIB: usize = 1 << 20;
const GIB: usize = 1 << 30;

fn sim(capacity: usize) -> CudaBackend<SimDriver> {
    CudaBackend::with_driver(SimDriver::new(capacity), CudaConfig::default()).unwrap()
}

fn sim_cfg(capacity: usize, cfg: CudaConfig) -> CudaBackend<SimDriver> {
    CudaBackend::with_driver(SimDriver::new(capacity), cfg).unwrap()
}

fn ptr(a: &Allocation) -> u64 {
    match a.addr() {
        Addr::Device(p) => p,
        other => panic!("not a device address: {other:?}"),
    }
}

fn free(b: &CudaBackend<SimDriver>, a: &Allocation) {
    // SAFETY: simulated memory; nothing uses `a` afterwards.
    unsafe { b.deallocate(a) }.unwrap();
}

/// Reserved equals what the driver holds, and every pool invariant holds.
fn consistent(b: &CudaBackend<SimDriver>) {
    b.pool().check_invariants();
    assert_eq!(
        b.memory_stats().reserved_bytes[0].current as usize,
        b.driver().outstanding(),
        "reserved != driver outstanding"
    );
}

#[test]
fn no_cuda_here_is_backend_unavailable_not_a_panic() {
    if libcuda_present().is_ok() {
        eprintln!("libcuda is present: skipping the no-driver check");
        return;
    }
    let e = CudaBackend::new(0).unwrap_err();
    assert!(
        matches!(&e, AllocError::BackendUnavailable { backend: "cuda", reason } if reason.contains("libcuda")),
        "{e}"
    );
    assert!(!e.is_retryable());
    assert!(matches!(
        CudarcDriver::new(3),
        Err(AllocError::BackendUnavailable { .. })
    ));
}

#[test]
fn small_and_large_pools_segment_sizes_and_splitting() {
    let b = sim(GIB);
    let a = b.allocate(&AllocRequest::bytes(100)).unwrap();
    let s = b.memory_stats();
    assert_eq!(
        s.reserved_bytes[1].current,
        2 * MIB as u64,
        "small segment is 2 MiB"
    );
    assert_eq!(s.allocated_bytes[1].current, 512, "rounded to 512");
    assert_eq!(s.requested_bytes[0].current, 100);
    assert_eq!(s.inactive_split[1].current, 1, "remainder split off");
    let c = b.allocate(&AllocRequest::bytes(3 * MIB)).unwrap();
    let s = b.memory_stats();
    assert_eq!(
        s.reserved_bytes[2].current,
        20 * MIB as u64,
        "1–10 MiB → 20 MiB segment"
    );
    // 11 MiB is best-fitted into the 17 MiB remainder of that segment and
    // split again (6 MiB left > 1 MiB).
    let d = b.allocate(&AllocRequest::bytes(11 * MIB)).unwrap();
    let s = b.memory_stats();
    assert_eq!(s.reserved_bytes[2].current, 20 * MIB as u64);
    assert_eq!(s.allocated_bytes[2].current, 14 * MIB as u64);
    assert_eq!(s.inactive_split_bytes[2].current, 6 * MIB as u64);
    // A 7 MiB request does not fit the 6 MiB remainder: a new 20 MiB segment.
    let big = b.allocate(&AllocRequest::bytes(7 * MIB)).unwrap();
    assert_eq!(b.memory_stats().reserved_bytes[2].current, 40 * MIB as u64);
    free(&b, &big);
    consistent(&b);
    // Best fit on the same stream: the freed 3 MiB block comes back.
    let p = ptr(&c);
    free(&b, &c);
    let c2 = b.allocate(&AllocRequest::bytes(3 * MIB)).unwrap();
    assert_eq!(ptr(&c2), p);
    // ...but not on another stream.
    let e = b.allocate(&AllocRequest::bytes(3 * MIB).stream(7)).unwrap();
    assert_ne!(ptr(&e), p);
    for x in [a, c2, d, e] {
        free(&b, &x);
    }
    consistent(&b);
    let s = b.memory_stats();
    assert_eq!(s.allocated_bytes[0].current, 0);
    assert_eq!(s.inactive_split[0].current, 0, "all merged back");
    assert_eq!(b.empty_cache().unwrap(), (2 + 20 + 20 + 20) * MIB);
    assert_eq!(b.driver().outstanding(), 0);
    consistent(&b);
}

#[test]
fn merge_on_free_restores_whole_segment() {
    let b = sim(GIB);
    let xs: Vec<_> = (0..4)
        .map(|_| b.allocate(&AllocRequest::bytes(256 * 1024)).unwrap())
        .collect();
    let base = ptr(&xs[0]);
    for (i, x) in xs.iter().enumerate() {
        assert_eq!(
            ptr(x),
            base + (i as u64) * 256 * 1024,
            "packed in address order"
        );
    }
    for i in [1, 3, 0, 2] {
        free(&b, &xs[i]);
        consistent(&b);
    }
    let snap = b.snapshot();
    assert_eq!(snap.segments.len(), 1);
    assert_eq!(
        snap.segments[0].blocks.len(),
        1,
        "one free block after merging"
    );
    assert_eq!(snap.segments[0].blocks[0].state, BlockState::Inactive);
}

#[test]
fn max_split_size_rules() {
    let cfg = CudaConfig {
        max_split_size: 40 * MIB,
        ..CudaConfig::default()
    };
    let b = sim_cfg(GIB, cfg);
    let big = b.allocate(&AllocRequest::bytes(100 * MIB)).unwrap();
    let p = ptr(&big);
    free(&b, &big);
    // A request below max_split_size never takes an oversize block.
    let small = b.allocate(&AllocRequest::bytes(12 * MIB)).unwrap();
    assert_ne!(ptr(&small), p);
    // A request above it takes one only within 20 MiB.
    let near = b.allocate(&AllocRequest::bytes(90 * MIB)).unwrap();
    assert_eq!(
        ptr(&near),
        p,
        "90 MiB fits the cached 100 MiB block (< +20 MiB)"
    );
    let s = b.memory_stats();
    assert_eq!(s.oversize_allocations.current, 1);
    assert_eq!(
        s.inactive_split[0].current, 0,
        "oversize blocks are never split"
    );
    free(&b, &near);
    let far = b.allocate(&AllocRequest::bytes(50 * MIB)).unwrap();
    assert_ne!(ptr(&far), p, "100 MiB ≥ 50 + 20 MiB: not reused");
    free(&b, &far);
    free(&b, &small);
    consistent(&b);
}

#[test]
fn release_available_cached_blocks_frees_oversize_largest_first() {
    let cfg = CudaConfig {
        max_split_size: 40 * MIB,
        ..CudaConfig::default()
    };
    let b = sim_cfg(300 * MIB, cfg);
    let x = b.allocate(&AllocRequest::bytes(100 * MIB)).unwrap();
    let y = b.allocate(&AllocRequest::bytes(120 * MIB)).unwrap();
    free(&b, &x);
    free(&b, &y);
    // 200 MiB does not fit next to 220 MiB cached: the pool frees cached
    // oversize blocks (largest first) before it would give up.
    let z = b.allocate(&AllocRequest::bytes(200 * MIB)).unwrap();
    let s = b.memory_stats();
    assert_eq!(s.num_alloc_retries, 0, "freed without the full release");
    assert_eq!(s.num_device_free, 2);
    free(&b, &z);
    consistent(&b);
}

/// test_cuda.py `test_out_of_memory`: the message format.
#[test]
fn test_out_of_memory() {
    let b = sim(8 * GIB);
    let _keep = b.allocate(&AllocRequest::bytes(3 * MIB)).unwrap();
    let e = b
        .allocate(&AllocRequest::bytes(1024 * 1024 * 1024 * 800000000))
        .unwrap_err();
    let AllocError::DeviceOutOfMemory(o) = &e else {
        panic!("{e:?}")
    };
    let msg = e.to_string();
    assert!(
        msg.starts_with("CUDA out of memory. Tried to allocate 800000000.00 GiB. GPU 0 has a total capacity of 8.00 GiB of which 7.98 GiB is free. Of the allocated memory 3.00 MiB is allocated by tensorpool, and 17.00 MiB is reserved by tensorpool but unallocated."),
        "{msg}"
    );
    assert!(o.never_fits && !e.is_retryable(), "{msg}");
    assert_eq!(
        (o.allocated, o.reserved, o.total),
        (3 * MIB, 20 * MIB, 8 * GIB)
    );
    // 1 EiB and more never fits, with no driver malloc tried.
    let mallocs = b.driver().calls(Call::Malloc);
    let e = b.allocate(&AllocRequest::bytes(1 << 60)).unwrap_err();
    assert!(
        matches!(&e, AllocError::DeviceOutOfMemory(o) if o.never_fits),
        "{e}"
    );
    assert_eq!(b.driver().calls(Call::Malloc), mallocs);
    assert!(b.allocate(&AllocRequest::bytes(usize::MAX)).is_err());
    assert_eq!(b.memory_stats().num_ooms, 3);
    consistent(&b);
}

/// test_cuda.py `test_out_of_memory_retry`: 50 % + 50 % fails, then
/// succeeds after the first is freed.
#[test]
fn test_out_of_memory_retry() {
    let total = 16 * GIB;
    let b = sim(total);
    b.driver().occupy(512 * MIB); // the CUDA context and other users
    let size = total / 2;
    let a = b.allocate(&AllocRequest::bytes(size)).unwrap();
    let e = b.allocate(&AllocRequest::bytes(size)).unwrap_err();
    assert!(e.to_string().contains("Tried to allocate"), "{e}");
    assert!(e.is_retryable(), "it can fit once memory is freed");
    let s = b.memory_stats();
    assert_eq!((s.num_ooms, s.num_alloc_retries), (1, 1));
    free(&b, &a);
    let b2 = b.allocate(&AllocRequest::bytes(size)).unwrap();
    free(&b, &b2);
    b.empty_cache().unwrap();
    assert_eq!(b.driver().outstanding(), 0);
    consistent(&b);
}

/// test_cuda.py `test_caching_allocator_record_stream_oom`: 100 × 160 MiB
/// requests each recorded on a busy side stream fit a 16 GiB device,
/// because the OOM path synchronizes the events and releases the blocks.
#[test]
fn test_caching_allocator_record_stream_oom() {
    let b = sim(16_000_000_000); // 16 GB: 95 such blocks fit, not 101
    let side = b.driver().create_stream();
    let n = 40 * 1024 * 1024 * 4;
    let y = b.allocate(&AllocRequest::bytes(n).stream(side)).unwrap();
    for _ in 0..100 {
        let x = b.allocate(&AllocRequest::bytes(n)).unwrap();
        b.driver().enqueue(side, 1); // y += x on the side stream
        b.record_stream(&x, side).unwrap();
        free(&b, &x);
        consistent(&b);
    }
    let s = b.memory_stats();
    assert!(
        s.num_sync_all_streams >= 1,
        "the OOM path synchronized events"
    );
    assert_eq!(s.num_ooms, 0);
    free(&b, &y);
    b.empty_cache().unwrap();
    assert_eq!(b.driver().outstanding(), 0);
    consistent(&b);
}

/// test_cuda.py `test_record_stream`: a block used on another stream is
/// not reused before that stream's work completes, and is after.
#[test]
fn test_record_stream() {
    let b = sim(GIB);
    let side = b.driver().create_stream();
    let main = 0;
    let tmp = b.allocate(&AllocRequest::bytes(16).stream(side)).unwrap();
    b.write(&tmp, 0, &[1, 2, 3, 4]).unwrap();
    let p = ptr(&tmp);
    b.record_stream(&tmp, main).unwrap();
    b.driver().enqueue(main, 1); // _sleep, then result.copy_(tmp)
    free(&b, &tmp);
    let tmp2 = b.allocate(&AllocRequest::bytes(16).stream(side)).unwrap();
    assert_ne!(ptr(&tmp2), p, "allocation re-used too soon");
    let snap = b.snapshot();
    assert!(
        snap.segments[0]
            .blocks
            .iter()
            .any(|x| x.address == p && x.state == BlockState::ActivePendingFree)
    );
    b.driver().advance(main); // current_stream().synchronize()
    let tmp3 = b.allocate(&AllocRequest::bytes(16).stream(side)).unwrap();
    assert_eq!(ptr(&tmp3), p, "reused once the main stream's work is done");
    free(&b, &tmp2);
    free(&b, &tmp3);
    assert_eq!(
        b.driver().live_events(),
        1,
        "the event went back to the pool"
    );
    consistent(&b);
}

/// RMM `PoolTest.ForceGrowth`: the pool grows on demand up to its limit;
/// past it a request fails with a typed, retryable error.
#[test]
fn force_growth() {
    let cfg = CudaConfig {
        byte_limit: Some(48 * MIB),
        ..CudaConfig::default()
    };
    let b = sim_cfg(GIB, cfg);
    let a = b.allocate(&AllocRequest::bytes(1000)).unwrap();
    let c = b.allocate(&AllocRequest::bytes(4 * MIB)).unwrap();
    let d = b.allocate(&AllocRequest::bytes(18 * MIB)).unwrap();
    assert_eq!(b.memory_stats().segment[0].current, 3, "grew three times");
    assert_eq!(b.memory_stats().reserved_bytes[0].current, 40 * MIB as u64);
    let e = b.allocate(&AllocRequest::bytes(20 * MIB)).unwrap_err();
    assert!(
        matches!(&e, AllocError::DeviceOutOfMemory(o) if o.limit == Some(48 * MIB) && !o.never_fits),
        "{e}"
    );
    assert!(e.to_string().contains("48.00 MiB allowed; "), "{e}");
    free(&b, &d);
    let f = b.allocate(&AllocRequest::bytes(20 * MIB)).unwrap();
    for x in [a, c, f] {
        free(&b, &x);
    }
    let e = b.allocate(&AllocRequest::bytes(64 * MIB)).unwrap_err();
    assert!(!e.is_retryable(), "over the limit itself: never fits: {e}");
    consistent(&b);
}

/// RMM `PoolTest.DeletedStream`: memory cached for a stream that no longer
/// exists is still usable by the pool.
#[test]
fn deleted_stream() {
    let b = sim(64 * MIB);
    let s = b.driver().create_stream();
    let a = b.allocate(&AllocRequest::bytes(10000).stream(s)).unwrap();
    free(&b, &a);
    b.driver().destroy_stream(s);
    let big = b.allocate(&AllocRequest::bytes(40 * MIB)).unwrap();
    let x = b.allocate(&AllocRequest::bytes(10000)).unwrap();
    free(&b, &x);
    free(&b, &big);
    // A request that needs the dead stream's segment gets it released.
    let all = b.allocate(&AllocRequest::bytes(62 * MIB)).unwrap();
    free(&b, &all);
    consistent(&b);
}

/// RMM `PoolTest.AllocateNinetyPercent`.
#[test]
fn allocate_ninety_percent() {
    let b = sim(8 * GIB);
    let (free_bytes, _) = {
        use tensorpool::backend::cuda::CudaDriver;
        b.driver().mem_get_info().unwrap()
    };
    let ninety = free_bytes / 10 * 9;
    let a = b.allocate(&AllocRequest::bytes(ninety)).unwrap();
    assert!(b.memory_stats().reserved_bytes[0].current as usize >= ninety);
    free(&b, &a);
    consistent(&b);
}

/// RMM `PoolTest.TwoLargeBuffers`.
#[test]
fn two_large_buffers() {
    let b = sim(8 * GIB);
    let x = b.allocate(&AllocRequest::bytes(2 * GIB)).unwrap();
    let y = b.allocate(&AllocRequest::bytes(2 * GIB)).unwrap();
    assert!(ptr(&x) + 2 * GIB as u64 <= ptr(&y) || ptr(&y) + 2 * GIB as u64 <= ptr(&x));
    free(&b, &x);
    free(&b, &y);
    consistent(&b);
}

#[test]
fn write_read_round_trip_zeroed_and_bounds() {
    let b = sim(GIB);
    let a = b.allocate(&AllocRequest::bytes(4000)).unwrap();
    let data: Vec<u8> = (0..4000u32).map(|i| (i * 7) as u8).collect();
    b.write(&a, 0, &data).unwrap();
    let mut back = vec![0u8; 4000];
    b.read(&a, 0, &mut back).unwrap();
    assert_eq!(back, data);
    let e = b.write(&a, 3999, &[1, 2]).unwrap_err();
    assert!(matches!(
        e,
        AllocError::OutOfRange {
            offset: 3999,
            len: 2,
            size: 4000,
            ..
        }
    ));
    b.synchronize().unwrap();
    free(&b, &a);
    // Reuse of the same block as zeroed memory reads zero.
    let z = b.allocate(&AllocRequest::bytes(4000).zeroed()).unwrap();
    b.read(&z, 0, &mut back).unwrap();
    assert!(back.iter().all(|&x| x == 0));
    let u = b.allocate(&AllocRequest::bytes(64)).unwrap();
    let mut raw = [0u8; 64];
    b.read(&u, 0, &mut raw).unwrap();
    assert!(
        raw.iter().all(|&x| x == UNINIT_BYTE),
        "fresh device bytes are not zeroed"
    );
    // Freed handles cannot read.
    free(&b, &u);
    assert!(matches!(
        b.read(&u, 0, &mut raw),
        Err(AllocError::UnknownId { .. })
    ));
    free(&b, &z);
    consistent(&b);
}

#[test]
fn forged_handles_are_typed_errors_and_change_nothing() {
    let b = sim(GIB);
    let a = b.allocate(&AllocRequest::bytes(1000)).unwrap();
    let before = b.memory_stats();
    let forged = [
        (
            Allocation::new(
                a.id(),
                Addr::Device(ptr(&a) + 512),
                1000,
                64,
                a.device(),
                a.tag(),
            ),
            "address",
        ),
        (
            Allocation::new(a.id(), a.addr(), 999, 64, a.device(), a.tag()),
            "size",
        ),
        (
            Allocation::new(a.id(), a.addr(), 1000, 128, a.device(), a.tag()),
            "align",
        ),
        (
            Allocation::new(a.id(), a.addr(), 1000, 64, a.device(), a.tag() + 1),
            "tag",
        ),
    ];
    for (f, field) in forged {
        // SAFETY: the free is refused; nothing is freed.
        let e = unsafe { b.deallocate(&f) }.unwrap_err();
        if field == "tag" {
            assert!(matches!(&e, AllocError::UnknownId { .. }), "{e}");
        } else {
            assert!(
                matches!(&e, AllocError::Mismatch { field: got, .. } if *got == field),
                "{e}"
            );
        }
        assert!(b.write(&f, 0, &[1]).is_err());
    }
    let other = Allocation::new(a.id(), a.addr(), 1000, 64, Device::Cuda(1), a.tag());
    // SAFETY: refused (another device's handle): nothing is freed.
    let r = unsafe { b.deallocate(&other) };
    assert!(matches!(r, Err(AllocError::WrongDevice { .. })));
    assert_eq!(b.memory_stats(), before, "stats unchanged");
    free(&b, &a);
    // SAFETY: a double free is refused: nothing is freed.
    let r = unsafe { b.deallocate(&a) };
    assert!(matches!(r, Err(AllocError::UnknownId { .. })));
    assert!(matches!(
        b.allocate(&AllocRequest::new(8, 1024)),
        Err(AllocError::InvalidLayout { .. })
    ));
    assert!(b.allocate(&AllocRequest::new(8, 3)).is_err());
    let zero = b.allocate(&AllocRequest::bytes(0)).unwrap();
    assert_eq!(zero.addr(), Addr::None);
    free(&b, &zero);
    consistent(&b);
}

#[test]
fn memory_fraction_and_garbage_collection() {
    let b = sim(GIB);
    b.set_memory_fraction(0.25).unwrap();
    assert!(b.set_memory_fraction(1.5).is_err());
    let a = b.allocate(&AllocRequest::bytes(200 * MIB)).unwrap();
    let e = b.allocate(&AllocRequest::bytes(100 * MIB)).unwrap_err();
    assert!(matches!(&e, AllocError::DeviceOutOfMemory(o) if o.limit == Some(256 * MIB)));
    free(&b, &a);

    let cfg = CudaConfig {
        memory_fraction: Some(0.5),
        garbage_collection_threshold: 0.5,
        ..CudaConfig::default()
    };
    let g = sim_cfg(GIB, cfg);
    // Cache 300 MiB of unsplit blocks, then ask for a size none fits: GC
    // frees old cached blocks before the driver is asked.
    let xs: Vec<_> = (0..3)
        .map(|_| g.allocate(&AllocRequest::bytes(100 * MIB)).unwrap())
        .collect();
    for x in &xs {
        free(&g, x);
    }
    let y = g.allocate(&AllocRequest::bytes(150 * MIB)).unwrap();
    let s = g.memory_stats();
    assert!(
        s.num_device_free >= 1,
        "garbage collection released cached blocks"
    );
    assert!(s.reserved_bytes[0].current <= 512 * MIB as u64);
    free(&g, &y);
    consistent(&g);
    assert!(
        CudaConfig {
            max_split_size: MIB,
            ..CudaConfig::default()
        }
        .validate()
        .is_err()
    );
}

#[test]
fn history_ring_is_bounded_and_ordered() {
    let cfg = CudaConfig {
        history_capacity: 8,
        ..CudaConfig::default()
    };
    let b = sim_cfg(GIB, cfg);
    let a = b.allocate(&AllocRequest::bytes(100)).unwrap();
    free(&b, &a);
    let h = b.history();
    let acts: Vec<Action> = h.iter().map(|e| e.action).collect();
    assert_eq!(
        acts,
        [
            Action::SegmentAlloc,
            Action::Alloc,
            Action::FreeRequested,
            Action::FreeCompleted
        ]
    );
    for _ in 0..10 {
        let a = b.allocate(&AllocRequest::bytes(100)).unwrap();
        free(&b, &a);
    }
    let h = b.history();
    assert_eq!(h.len(), 8);
    assert!(h.windows(2).all(|w| w[1].seq == w[0].seq + 1));
}

/// A driver error at any call site, at any point of a workload, leaves the
/// pool consistent: invariants hold and reserved equals the driver's.
#[test]
fn fault_injection_at_every_call_site_leaves_the_pool_consistent() {
    for call in Call::ALL {
        for nth in 1..=6 {
            for fault in [Fault::Error, Fault::OutOfMemory] {
                let b = sim(96 * MIB);
                let side = b.driver().create_stream();
                b.driver().fail_nth(call, nth, fault);
                let mut live = Vec::new();
                for step in 0..24usize {
                    let size = [100, 3 * MIB, 700 * 1024, 30 * MIB][step % 4];
                    match b.allocate(&AllocRequest::bytes(size).zeroed()) {
                        Ok(a) => {
                            let _ = b.write(&a, 0, &[9; 16]);
                            let mut back = [0u8; 16];
                            let _ = b.read(&a, 0, &mut back);
                            if step % 3 == 0 {
                                b.record_stream(&a, side).unwrap();
                                b.driver().enqueue(side, 1);
                            }
                            live.push(a);
                        }
                        Err(e) => assert!(
                            matches!(
                                e,
                                AllocError::Backend { .. } | AllocError::DeviceOutOfMemory(_)
                            ),
                            "{call:?}: {e}"
                        ),
                    }
                    if step % 2 == 1 && !live.is_empty() {
                        let a = live.remove(0);
                        // SAFETY: simulated memory.
                        if unsafe { b.deallocate(&a) }.is_err() {
                            live.push(a); // still live: free it later
                        }
                    }
                    if step % 7 == 6 {
                        let _ = b.empty_cache();
                    }
                    if step % 5 == 4 {
                        b.driver().advance(side);
                    }
                    consistent(&b);
                }
                b.driver().clear_faults();
                for a in live {
                    free(&b, &a);
                }
                b.empty_cache().unwrap();
                consistent(&b);
                assert_eq!(
                    b.driver().outstanding(),
                    0,
                    "{call:?} #{nth}: segments leaked"
                );
            }
        }
    }
}

#[test]
fn meta_backend_cuda_policy_predicts_the_pool() {
    let model = MetaBackend::cuda_policy(64 * GIB, CudaConfig::default()).unwrap();
    let pool = sim(64 * GIB);
    let mut rng = 0x9E3779B97F4A7C15u64;
    let mut next = || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let (mut lm, mut lp) = (Vec::new(), Vec::new());
    for _ in 0..2000 {
        if next() % 3 != 0 || lm.is_empty() {
            let size = match next() % 4 {
                0 => (next() % 4096) as usize,
                1 => (next() % (2 * MIB as u64)) as usize,
                2 => (next() % (12 * MIB as u64)) as usize,
                _ => (next() % (64 * MIB as u64)) as usize,
            };
            lm.push(model.allocate(&AllocRequest::bytes(size)).unwrap());
            lp.push(pool.allocate(&AllocRequest::bytes(size)).unwrap());
        } else {
            let i = (next() as usize) % lm.len();
            // SAFETY: meta and simulated memory.
            unsafe {
                model.deallocate(&lm.swap_remove(i)).unwrap();
                pool.deallocate(&lp.swap_remove(i)).unwrap();
            }
        }
        assert_eq!(model.stats().reserved_bytes, pool.stats().reserved_bytes);
    }
    assert!(model.stats().reserved_bytes.peak > 0);
    assert_eq!(model.device(), Device::Meta);
}

#[test]
fn per_device_pools_are_independent_across_threads() {
    use std::sync::Arc;
    let pools: Vec<Arc<CudaBackend<SimDriver>>> = (0..2)
        .map(|d| {
            Arc::new(
                CudaBackend::with_driver(SimDriver::with_ordinal(d, GIB), CudaConfig::default())
                    .unwrap(),
            )
        })
        .collect();
    let handles: Vec<_> = (0..4)
        .map(|t| {
            let b = pools[t % 2].clone();
            std::thread::spawn(move || {
                for i in 0..500 {
                    let a = b
                        .allocate(&AllocRequest::bytes(512 + (i % 9) * 4096))
                        .unwrap();
                    b.write(&a, 0, &[t as u8; 8]).unwrap();
                    let mut back = [0u8; 8];
                    b.read(&a, 0, &mut back).unwrap();
                    assert_eq!(back, [t as u8; 8]);
                    // SAFETY: simulated memory, not used afterwards.
                    unsafe { b.deallocate(&a) }.unwrap();
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    for (d, b) in pools.iter().enumerate() {
        assert_eq!(b.device(), Device::Cuda(d as u32));
        assert_eq!(b.memory_stats().allocation[0].current, 0);
        consistent(b);
    }
}

fn cuda_caps() -> tensorpool::testkit::Caps {
    tensorpool::testkit::Caps {
        max_align: tensorpool::backend::cuda::MAX_ALIGN,
        refuses_above_max_align: true,
        random_ops: 3_000,
        threads: 4,
        ops_per_thread: 500,
        ..tensorpool::testkit::Caps::host()
    }
}

/// The contract's conformance kit on the pool over the simulated driver.
#[test]
fn conformance_kit_on_the_simulated_device() {
    let b = sim(4 * GIB);
    tensorpool::testkit::check(&b, cuda_caps());
    consistent(&b);
    assert_eq!(b.driver().outstanding(), 0, "trim returned every segment");
}

/// The kit on the CUDA policy's meta backend (no bytes).
#[test]
fn conformance_kit_on_the_cuda_model() {
    let m = MetaBackend::cuda_policy(4 * GIB, CudaConfig::default()).unwrap();
    let caps = tensorpool::testkit::Caps {
        holds_bytes: false,
        ..cuda_caps()
    };
    tensorpool::testkit::check(&m, caps);
}

/// The flat stats carry `torch.cuda.memory_stats()`'s key names, and
/// `all == small_pool + large_pool`; peaks reset to current.
#[test]
fn stats_use_pytorch_names_and_pools_sum_to_all() {
    let cfg = CudaConfig {
        roundup_power2_divisions: 4,
        ..CudaConfig::default()
    };
    let b = sim_cfg(GIB, cfg);
    let small = b.allocate(&AllocRequest::bytes(1000)).unwrap();
    let large = b.allocate(&AllocRequest::bytes(1200 * 1024)).unwrap();
    let s = b.memory_stats();
    // roundup_power2_divisions = 4: 1200 KiB → 1280 KiB (steps of 256 KiB).
    assert_eq!(s.allocated_bytes[2].current, 1280 * 1024);
    assert_eq!(s.allocated_bytes[1].current, 1024);
    let flat: std::collections::HashMap<String, u64> = s.to_flat().into_iter().collect();
    for key in [
        "allocated_bytes.all.current",
        "reserved_bytes.small_pool.peak",
        "active_bytes.large_pool.freed",
        "inactive_split_bytes.all.allocated",
        "requested_bytes.all.current",
        "segment.all.current",
        "num_alloc_retries",
        "num_ooms",
        "num_sync_all_streams",
        "num_device_alloc",
        "num_device_free",
    ] {
        assert!(flat.contains_key(key), "missing {key}");
    }
    assert_eq!(flat["requested_bytes.all.current"], 1000 + 1200 * 1024);
    for name in [
        "allocated_bytes",
        "reserved_bytes",
        "active_bytes",
        "segment",
    ] {
        let get = |t: &str| flat[&format!("{name}.{t}.current")];
        assert_eq!(get("all"), get("small_pool") + get("large_pool"), "{name}");
    }
    free(&b, &large);
    b.pool().reset_peak_stats();
    let s = b.memory_stats();
    assert_eq!(s.allocated_bytes[0].peak, s.allocated_bytes[0].current);
    free(&b, &small);
    consistent(&b);
}

/// Events are queued per stream: a block waiting on a busy stream does not
/// hold up a block whose other stream is done (no head-of-line blocking),
/// and a block used on two streams waits for both.
#[test]
fn record_stream_waits_per_stream_and_for_every_stream() {
    let b = sim(GIB);
    let (s1, s2, s3) = (
        b.driver().create_stream(),
        b.driver().create_stream(),
        b.driver().create_stream(),
    );
    let x = b.allocate(&AllocRequest::bytes(4 * MIB)).unwrap();
    let y = b.allocate(&AllocRequest::bytes(6 * MIB)).unwrap();
    let z = b.allocate(&AllocRequest::bytes(3 * MIB)).unwrap();
    b.record_stream(&x, s1).unwrap();
    b.record_stream(&y, s2).unwrap();
    b.record_stream(&z, s2).unwrap();
    b.record_stream(&z, s3).unwrap();
    for s in [s1, s2, s3] {
        b.driver().enqueue(s, 1);
    }
    let (px, py, pz) = (ptr(&x), ptr(&y), ptr(&z));
    for a in [&x, &y, &z] {
        free(&b, a);
    }
    assert_eq!(b.memory_stats().active[0].current, 3, "all three pending");
    b.driver().advance(s2);
    // y is back (its only other stream is done); x waits on s1, z on s3.
    let y2 = b.allocate(&AllocRequest::bytes(6 * MIB)).unwrap();
    assert_eq!(ptr(&y2), py);
    let snap = b.snapshot();
    let pending: Vec<u64> = snap
        .segments
        .iter()
        .flat_map(|s| &s.blocks)
        .filter(|bl| bl.state == BlockState::ActivePendingFree)
        .map(|bl| bl.address)
        .collect();
    assert_eq!(pending, vec![px, px + 4 * MIB as u64 + 6 * MIB as u64]);
    assert_eq!(pending[1], pz);
    b.driver().advance(s1);
    b.driver().advance(s3);
    let x2 = b.allocate(&AllocRequest::bytes(4 * MIB)).unwrap();
    assert_eq!(ptr(&x2), px);
    free(&b, &x2);
    free(&b, &y2);
    consistent(&b);
    assert_eq!(b.memory_stats().active[0].current, 0);
}

/// Host-side synchronizations the driver was asked for so far.
fn host_syncs(d: &SimDriver) -> u64 {
    [
        Call::EventSynchronize,
        Call::StreamSynchronize,
        Call::DeviceSynchronize,
    ]
    .map(|c| d.calls(c))
    .iter()
    .sum()
}

/// A pool with `reuse_other_streams` set to `on`, and two new streams.
fn reuse_sim(on: bool) -> (CudaBackend<SimDriver>, u64, u64) {
    let cfg = CudaConfig {
        reuse_other_streams: on,
        ..CudaConfig::default()
    };
    let b = sim_cfg(GIB, cfg);
    let (old, new) = (b.driver().create_stream(), b.driver().create_stream());
    (b, old, new)
}

/// `reuse_other_streams` (RMM's stream-ordered reuse): with no free block
/// on its own stream, a request takes another stream's cached segment
/// instead of a new one, ordered on the GPU: the new stream's work cannot
/// complete before the work queued on the old stream before the reuse, and
/// the host never waits. Off (the default), a new segment is allocated and
/// the streams stay independent.
#[test]
fn reuse_other_streams_orders_on_the_gpu_without_a_host_wait() {
    use tensorpool::backend::cuda::CudaDriver;
    for on in [true, false] {
        let (b, old, new) = reuse_sim(on);
        let d = b.driver();
        let x = b
            .allocate(&AllocRequest::bytes(4 * MIB).stream(old))
            .unwrap();
        let p = ptr(&x);
        d.enqueue(old, 1); // a kernel using x, still running
        free(&b, &x); // cached on `old` at once (stream-ordered)
        let syncs = host_syncs(d);
        let y = b
            .allocate(&AllocRequest::bytes(4 * MIB).stream(new))
            .unwrap();
        assert_eq!(host_syncs(d), syncs, "on={on}: no host wait");
        assert!(d.busy(old), "on={on}: the old stream's work is not done");
        assert_eq!(ptr(&y) == p, on, "on={on}: reuse of the old stream's block");
        assert_eq!(d.calls(Call::Malloc), if on { 1 } else { 2 }, "on={on}");
        assert_eq!(d.calls(Call::StreamWaitEvent), u64::from(on), "on={on}");
        // Work on the new stream after the reuse, and an event after it.
        d.enqueue(new, 1);
        let e = d.event_create().unwrap();
        d.event_record(e, new).unwrap();
        assert!(!d.event_query(e).unwrap(), "on={on}");
        d.advance(new);
        assert!(d.event_query(e).unwrap(), "on={on}");
        // Completing the new stream's work completed the old stream's work
        // queued before the reuse (the GPU-side wait); without reuse the
        // streams are independent.
        assert_eq!(!d.busy(old), on, "on={on}: ordering on the GPU");
        d.event_destroy(e).unwrap();
        let snap = b.snapshot();
        let seg = snap.segments.iter().find(|s| s.address == p).unwrap();
        assert_eq!(seg.stream, if on { new } else { old }, "on={on}");
        free(&b, &y);
        consistent(&b);
        // The event went back to the pool.
        assert_eq!(d.live_events(), usize::from(on), "on={on}");
    }
}

/// Only whole cached segments change stream (a segment's blocks share one
/// stream), and a driver error while ordering the reuse moves nothing.
#[test]
fn reuse_other_streams_takes_whole_segments_and_survives_driver_errors() {
    let (b, old, new) = reuse_sim(true);
    let d = b.driver();
    // A split small segment on `old`: one block live, the rest cached.
    let keep = b.allocate(&AllocRequest::bytes(512).stream(old)).unwrap();
    let y = b.allocate(&AllocRequest::bytes(512).stream(new)).unwrap();
    assert_eq!(d.calls(Call::Malloc), 2, "a split segment is not taken");
    assert_eq!(d.calls(Call::StreamWaitEvent), 0);
    free(&b, &y);
    free(&b, &keep);
    // A whole large segment on `old`; the wait fails: error, nothing moved.
    let x = b
        .allocate(&AllocRequest::bytes(4 * MIB).stream(old))
        .unwrap();
    let p = ptr(&x);
    free(&b, &x);
    d.fail_nth(Call::StreamWaitEvent, 1, Fault::Error);
    let e = b
        .allocate(&AllocRequest::bytes(4 * MIB).stream(new))
        .unwrap_err();
    assert!(matches!(e, AllocError::Backend { .. }), "{e}");
    consistent(&b);
    let again = b
        .allocate(&AllocRequest::bytes(4 * MIB).stream(old))
        .unwrap();
    assert_eq!(ptr(&again), p, "still cached on the old stream");
    free(&b, &again);
    // And the reuse works once the driver does.
    let z = b
        .allocate(&AllocRequest::bytes(4 * MIB).stream(new))
        .unwrap();
    assert_eq!(ptr(&z), p);
    free(&b, &z);
    consistent(&b);
}
