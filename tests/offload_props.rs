//! The offload backend against an oracle of bytes, by proptest.
//!
//! Properties, after every operation of a random sequence (alloc / write /
//! read / pin / unpin / free / prefetch / evict-all):
//! 1. the residency invariants hold, resident bytes within the budget;
//! 2. every read (and every pinned view) returns the oracle's bytes;
//! 3. an operation fails only for a reason the sequence explains (the
//!    budget held by our own pins, a write or free of a tensor we pinned)
//!    with the typed error for it, and then changes no byte.

use proptest::prelude::*;
use std::time::Duration;
use tensorpool::backend::offload::{Resident, host_rounding};
use tensorpool::backend::{HostBackend, OffloadBackend, OffloadConfig};
use tensorpool::{AllocError, AllocRequest, Allocation, TensorAllocator};

const SIZES: [usize; 4] = [1, 100, 4096, 20_000];

#[derive(Debug, Clone)]
enum Op {
    Alloc(usize),
    Write {
        i: usize,
        off: usize,
        len: usize,
        val: u8,
    },
    Read(usize),
    Pin(usize),
    Unpin(usize),
    Free(usize),
    Prefetch(usize),
    EvictAll,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (0..SIZES.len()).prop_map(Op::Alloc),
        4 => (any::<usize>(), any::<usize>(), any::<usize>(), any::<u8>())
            .prop_map(|(i, off, len, val)| Op::Write { i, off, len, val }),
        4 => any::<usize>().prop_map(Op::Read),
        1 => any::<usize>().prop_map(Op::Pin),
        1 => any::<usize>().prop_map(Op::Unpin),
        1 => any::<usize>().prop_map(Op::Free),
        1 => any::<usize>().prop_map(Op::Prefetch),
        1 => Just(Op::EvictAll),
    ]
}

fn allowed(e: &AllocError, pinned_any: bool) -> bool {
    pinned_any
        && matches!(
            e,
            AllocError::BudgetExceeded { .. }
                | AllocError::Timeout { .. }
                | AllocError::Backend { .. }
        )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]
    #[test]
    fn ops_match_the_oracle_within_budget(ops in proptest::collection::vec(op(), 1..60)) {
        let big = host_rounding(&AllocRequest::bytes(20_000)).unwrap();
        let b = OffloadBackend::new(
            HostBackend::new(),
            OffloadConfig {
                wait_timeout: Duration::from_millis(20),
                prefetch_depth: 1,
                ..OffloadConfig::with_budget(3 * big)
            },
        )
        .unwrap();
        let mut live: Vec<(Allocation, Vec<u8>)> = Vec::new();
        let mut pins: Vec<(u64, Resident<'_, HostBackend>)> = Vec::new();
        for op in ops {
            let pinned_any = !pins.is_empty();
            match op {
                Op::Alloc(s) => match b.allocate(&AllocRequest::bytes(SIZES[s])) {
                    Ok(a) => live.push((a, vec![0; SIZES[s]])),
                    Err(e) => prop_assert!(allowed(&e, pinned_any), "alloc: {e}"),
                },
                Op::Write { i, off, len, val } if !live.is_empty() => {
                    let i = i % live.len();
                    let (a, o) = &mut live[i];
                    let off = off % (a.size() + 1);
                    let len = len % (a.size() - off + 1);
                    match b.write(a, off, &vec![val; len]) {
                        Ok(()) => o[off..off + len].fill(val),
                        Err(e) => prop_assert!(allowed(&e, pinned_any), "write: {e}"),
                    }
                }
                Op::Read(i) if !live.is_empty() => {
                    let (a, o) = &live[i % live.len()];
                    let mut v = vec![0xEEu8; a.size()];
                    match b.read(a, 0, &mut v) {
                        Ok(()) => prop_assert!(&v == o, "read differs from the oracle"),
                        Err(e) => prop_assert!(allowed(&e, pinned_any), "read: {e}"),
                    }
                }
                Op::Pin(i) if !live.is_empty() => {
                    let (a, o) = &live[i % live.len()];
                    match b.pin(a) {
                        Ok(g) => {
                            prop_assert!(g.as_bytes() == &o[..]);
                            pins.push((a.id().get(), g));
                        }
                        Err(e) => prop_assert!(allowed(&e, pinned_any), "pin: {e}"),
                    }
                }
                Op::Unpin(j) if !pins.is_empty() => {
                    pins.swap_remove(j % pins.len());
                }
                Op::Free(i) if !live.is_empty() => {
                    let i = i % live.len();
                    let id = live[i].0.id().get();
                    // SAFETY: a pinned tensor's free is refused, so no view
                    // outlives a successful free.
                    match unsafe { b.deallocate(&live[i].0) } {
                        Ok(()) => {
                            prop_assert!(!pins.iter().any(|p| p.0 == id), "freed a pinned tensor");
                            live.swap_remove(i);
                        }
                        Err(e) => prop_assert!(
                            pins.iter().any(|p| p.0 == id) && matches!(e, AllocError::Backend { .. }),
                            "free: {e}"
                        ),
                    }
                }
                Op::Prefetch(i) if !live.is_empty() => {
                    b.prefetch(&[live[i % live.len()].0]).unwrap();
                }
                Op::EvictAll => {
                    b.evict_all().unwrap();
                }
                _ => {}
            }
            b.check_invariants();
            for (id, g) in &pins {
                let o = &live.iter().find(|t| t.0.id().get() == *id).unwrap().1;
                prop_assert!(g.as_bytes() == &o[..], "a pinned view changed");
            }
        }
        b.wait_prefetch_idle().unwrap();
        b.check_invariants();
        drop(pins);
        for (a, o) in &live {
            let mut v = vec![0u8; a.size()];
            b.read(a, 0, &mut v).unwrap();
            prop_assert!(&v == o);
        }
        prop_assert!(b.offload_stats().peak_resident_bytes <= 3 * big);
    }
}
