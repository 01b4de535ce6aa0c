//! The CUDA pool on a real GPU. Every test is `#[ignore]`d: `ci/gpu.sh`
//! runs them (`--ignored`) on a machine with a GPU; on one without, they
//! fail at `CudaBackend::new(0)` with `BackendUnavailable`.
#![cfg(feature = "cuda")]

use tensorpool::backend::cuda::{CudaBackend, CudaDriver, CudarcDriver};
use tensorpool::{AllocError, AllocRequest, Allocation, TensorAllocator};

fn gpu() -> CudaBackend<CudarcDriver> {
    CudaBackend::new(0).unwrap_or_else(|e| panic!("no GPU: {e}"))
}

fn pattern(seed: u64, n: usize) -> Vec<u8> {
    let mut x = seed | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn free(b: &CudaBackend<CudarcDriver>, a: &Allocation) {
    // SAFETY: the device work on `a` is complete (copies are synchronous).
    unsafe { b.deallocate(a) }.unwrap();
}

/// Patterns written to live blocks read back bit exact, from small-pool
/// blocks to a 256 MiB block, while the others stay live.
#[test]
#[ignore = "needs a CUDA GPU (ci/gpu.sh)"]
fn gpu_patterns_round_trip_in_live_blocks() {
    let b = gpu();
    let sizes = [
        1usize,
        511,
        512,
        4097,
        1 << 20,
        (1 << 20) + 1,
        5 << 20,
        33 << 20,
        256 << 20,
    ];
    let live: Vec<(Allocation, Vec<u8>)> = sizes
        .iter()
        .enumerate()
        .map(|(i, &n)| {
            let a = b.allocate(&AllocRequest::bytes(n)).unwrap();
            let p = pattern(i as u64 + 7, n);
            b.write(&a, 0, &p).unwrap();
            (a, p)
        })
        .collect();
    for (a, p) in &live {
        let mut back = vec![0u8; p.len()];
        b.read(a, 0, &mut back).unwrap();
        assert!(back == *p, "pattern lost in {a:?}");
    }
    let z = b.allocate(&AllocRequest::bytes(3 << 20).zeroed()).unwrap();
    let mut back = vec![1u8; 3 << 20];
    b.read(&z, 0, &mut back).unwrap();
    assert!(back.iter().all(|&x| x == 0), "zeroed block not zero");
    free(&b, &z);
    for (a, _) in &live {
        free(&b, a);
    }
    b.pool().check_invariants();
    b.empty_cache().unwrap();
    assert_eq!(b.memory_stats().reserved_bytes[0].current, 0);
}

/// A real OOM round trip: take 60 % of the device, ask 60 % again → typed,
/// retryable error in PyTorch's words; free → the same request succeeds.
#[test]
#[ignore = "needs a CUDA GPU (ci/gpu.sh)"]
fn gpu_out_of_memory_round_trip() {
    let b = gpu();
    let total = b.driver().info().total_memory;
    let n = total / 10 * 6;
    let a = b.allocate(&AllocRequest::bytes(n)).unwrap();
    let e = b.allocate(&AllocRequest::bytes(n)).unwrap_err();
    match &e {
        AllocError::DeviceOutOfMemory(o) => {
            assert!(!o.never_fits && e.is_retryable(), "{e}");
            // cuMemGetInfo's total, which may differ from cuDeviceTotalMem's by a little.
            assert!(o.total >= n && o.requested == n, "{e}");
        }
        other => panic!("expected DeviceOutOfMemory, got {other}"),
    }
    let msg = e.to_string();
    assert!(
        msg.starts_with("CUDA out of memory. Tried to allocate"),
        "{msg}"
    );
    eprintln!("OOM message: {msg}");
    free(&b, &a);
    let c = b.allocate(&AllocRequest::bytes(n)).unwrap();
    free(&b, &c);
    let s = b.memory_stats();
    assert_eq!(s.num_ooms, 1);
    b.pool().check_invariants();
    b.empty_cache().unwrap();
}

/// A pool block through cudarc: `memset_zeros` on a `PoolView`, then the
/// bytes read back through the backend.
#[test]
#[ignore = "needs a CUDA GPU (ci/gpu.sh)"]
fn gpu_cudarc_view_memset() {
    let b = gpu();
    let stream = b.driver().context().default_stream();
    let a = b.allocate(&AllocRequest::bytes(1 << 20)).unwrap();
    b.write(&a, 0, &vec![0xEE; 1 << 20]).unwrap();
    {
        let mut v = b.view::<u8>(&a, &stream).unwrap();
        stream.memset_zeros(&mut v).unwrap();
    }
    stream.synchronize().unwrap();
    let mut back = vec![1u8; 1 << 20];
    b.read(&a, 0, &mut back).unwrap();
    assert!(back.iter().all(|&x| x == 0));
    free(&b, &a);
}

/// The conformance kit on the real device.
#[test]
#[ignore = "needs a CUDA GPU (ci/gpu.sh)"]
fn gpu_conformance_kit() {
    let b = gpu();
    let caps = tensorpool::testkit::Caps {
        max_align: tensorpool::backend::cuda::MAX_ALIGN,
        refuses_above_max_align: true,
        random_ops: 2_000,
        threads: 4,
        ops_per_thread: 300,
        ..tensorpool::testkit::Caps::host()
    };
    tensorpool::testkit::check(&b, caps);
    b.pool().check_invariants();
}
