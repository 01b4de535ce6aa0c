//! A proptest model of the CUDA caching pool on the simulated driver.
//!
//! Properties, after every action of a random sequence (alloc on one of
//! three streams, free, record_stream, queue and complete stream work,
//! empty_cache, memory fraction), under random pool configurations:
//! 1. no two live blocks overlap, and each lies inside a driver segment;
//! 2. blocks tile their segments exactly; no two adjacent free blocks stay
//!    unmerged; the free sets hold exactly the free blocks;
//! 3. the stats equal the snapshot's sums, per pool (PyTorch's
//!    `_check_memory_stat_consistency`);
//! 4. reserved bytes equal what the driver has outstanding;
//! 5. every live block still holds the pattern written at allocation.
#![cfg(feature = "cuda")]

use proptest::prelude::*;
use tensorpool::backend::cuda::{CudaBackend, CudaConfig, SimDriver};
use tensorpool::{Addr, AllocRequest, Allocation, TensorAllocator};

const MIB: usize = 1 << 20;

#[derive(Debug, Clone)]
enum Op {
    Alloc { size: usize, stream: u64 },
    Free(usize),
    Record(usize, u64),
    Enqueue(u64),
    Advance(u64),
    EmptyCache,
}

fn op() -> impl Strategy<Value = Op> {
    let size = prop_oneof![
        3 => 0usize..4096,
        3 => 4096usize..(2 * MIB),
        2 => (2 * MIB)..(12 * MIB),
        1 => (12 * MIB)..(80 * MIB),
    ];
    prop_oneof![
        6 => (size, 0u64..3).prop_map(|(size, stream)| Op::Alloc { size, stream }),
        4 => any::<usize>().prop_map(Op::Free),
        1 => (any::<usize>(), 0u64..3).prop_map(|(i, s)| Op::Record(i, s)),
        1 => (0u64..3).prop_map(Op::Enqueue),
        1 => (0u64..3).prop_map(Op::Advance),
        1 => Just(Op::EmptyCache),
    ]
}

fn config() -> impl Strategy<Value = CudaConfig> {
    (
        prop_oneof![Just(usize::MAX), Just(40 * MIB)],
        prop_oneof![Just(0usize), Just(4)],
        prop_oneof![Just(None), Just(Some(0.6))],
        prop_oneof![Just(0.0f64), Just(0.5)],
        any::<bool>(),
    )
        .prop_map(|(msp, div, frac, gc, reuse)| CudaConfig {
            max_split_size: msp,
            roundup_power2_divisions: div,
            memory_fraction: frac,
            garbage_collection_threshold: gc,
            reuse_other_streams: reuse,
            ..CudaConfig::default()
        })
}

fn pattern(a: &Allocation) -> [u8; 8] {
    (a.id().get().wrapping_mul(0x9E37_79B9_7F4A_7C15)).to_le_bytes()
}

fn check(b: &CudaBackend<SimDriver>, live: &[Allocation]) {
    b.pool().check_invariants();
    let segs = b.driver().segments();
    assert_eq!(
        b.memory_stats().reserved_bytes[0].current as usize,
        b.driver().outstanding()
    );
    let mut ranges: Vec<(u64, u64)> = live
        .iter()
        .filter_map(|a| match a.addr() {
            Addr::Device(p) => Some((p, p + a.size() as u64)),
            _ => None,
        })
        .collect();
    ranges.sort();
    for w in ranges.windows(2) {
        assert!(w[0].1 <= w[1].0, "live blocks overlap: {w:?}");
    }
    for &(s, e) in &ranges {
        assert!(
            segs.iter().any(|&(p, n)| p <= s && e <= p + n as u64),
            "block {s:#x}..{e:#x} outside every segment"
        );
    }
    for a in live {
        let n = a.size().min(8);
        let mut got = [0u8; 8];
        b.read(a, 0, &mut got[..n]).unwrap();
        assert_eq!(got[..n], pattern(a)[..n], "pattern lost in {a:?}");
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn pool_matches_its_invariants(cfg in config(), ops in prop::collection::vec(op(), 1..120)) {
        let b = CudaBackend::with_driver(SimDriver::new(512 * MIB), cfg).unwrap();
        let mut live: Vec<Allocation> = Vec::new();
        for op in ops {
            match op {
                Op::Alloc { size, stream } => {
                    match b.allocate(&AllocRequest::bytes(size).stream(stream)) {
                        Ok(a) => {
                            let n = a.size().min(8);
                            b.write(&a, 0, &pattern(&a)[..n]).unwrap();
                            live.push(a);
                        }
                        Err(e) => prop_assert!(
                            matches!(e, tensorpool::AllocError::DeviceOutOfMemory(_)),
                            "{e}"
                        ),
                    }
                }
                Op::Free(i) if !live.is_empty() => {
                    let a = live.swap_remove(i % live.len());
                    // SAFETY: simulated memory, not used afterwards.
                    unsafe { b.deallocate(&a) }.unwrap();
                }
                Op::Record(i, s) if !live.is_empty() => {
                    b.record_stream(&live[i % live.len()], s).unwrap();
                }
                Op::Enqueue(s) => b.driver().enqueue(s, 1),
                Op::Advance(s) => b.driver().advance(s),
                Op::EmptyCache => {
                    b.empty_cache().unwrap();
                }
                _ => {}
            }
            check(&b, &live);
        }
        for a in live.drain(..) {
            // SAFETY: as above.
            unsafe { b.deallocate(&a) }.unwrap();
        }
        b.empty_cache().unwrap();
        check(&b, &live);
        prop_assert_eq!(b.driver().outstanding(), 0);
        prop_assert_eq!(b.memory_stats().active_bytes[0].current, 0);
    }
}
