//! Property test of the host pool against a simple oracle.
//!
//! Properties:
//! 1. every live block keeps the pattern written into it until it is freed
//!    (no overlap, no corruption by other operations, trim or prewarm);
//! 2. `usable_size` of a live block is its class size, ≥ the request (a huge
//!    block may be a reused mapping up to 1/8 larger);
//! 3. every live block is aligned as asked (and 64 B from 4 KiB up);
//! 4. the pool owns exactly the live blocks handed out (freed ones may be
//!    reused, foreign ones are refused);
//! 5. after freeing everything and trimming, the pool holds no memory.
//!
//! The oracle is a `Vec` of live `(ptr, layout, seed)`.

use core::alloc::Layout;
use core::ptr::NonNull;
use proptest::prelude::*;
use tensorpool::host::size_class::MAX_CLASS_SIZE;
use tensorpool::host::{HostPool, Prewarm};

#[derive(Debug, Clone)]
enum Op {
    Alloc { size: usize, align_shift: u8 },
    Write { idx: usize, seed: u8 },
    Verify { idx: usize },
    Free { idx: usize },
    FreeUnsized { idx: usize },
    Trim,
    Prewarm { size: usize, count: usize },
}

fn size_strategy() -> impl Strategy<Value = usize> {
    prop_oneof![
        8 => 1usize..=256,
        6 => 257usize..=16384,
        3 => 16385usize..=(2 << 20),
        // One-block classes of neighbouring sizes: their spans change class.
        2 => (600usize << 10)..=(24 << 20),
        1 => (2usize << 20)..=(70 << 20),
    ]
}

fn op_strategy() -> impl Strategy<Value = Op> {
    prop_oneof![
        10 => (size_strategy(), 0u8..=13).prop_map(|(size, align_shift)| Op::Alloc { size, align_shift }),
        4 => (any::<usize>(), any::<u8>()).prop_map(|(idx, seed)| Op::Write { idx, seed }),
        4 => any::<usize>().prop_map(|idx| Op::Verify { idx }),
        6 => any::<usize>().prop_map(|idx| Op::Free { idx }),
        2 => any::<usize>().prop_map(|idx| Op::FreeUnsized { idx }),
        1 => Just(Op::Trim),
        1 => ((1usize..=(1 << 20)), 1usize..=8).prop_map(|(size, count)| Op::Prewarm { size, count }),
    ]
}

/// Pattern bytes: first and last 64 bytes and one in every 4 KiB (sizes go to 70 MiB).
fn offsets(len: usize) -> impl Iterator<Item = usize> {
    (0..len.min(64))
        .chain(len.saturating_sub(64)..len)
        .chain((0..len).step_by(4096))
}

fn write(p: NonNull<u8>, len: usize, seed: u8) {
    for o in offsets(len) {
        // SAFETY: `o < len` and the block is live with ≥ len bytes.
        unsafe { p.as_ptr().add(o).write(seed.wrapping_add(o as u8)) };
    }
}

fn verify(p: NonNull<u8>, len: usize, seed: u8) -> Result<(), TestCaseError> {
    for o in offsets(len) {
        // SAFETY: as in `write`.
        let b = unsafe { p.as_ptr().add(o).read() };
        prop_assert_eq!(
            b,
            seed.wrapping_add(o as u8),
            "block {:p} len {} offset {}",
            p,
            len,
            o
        );
    }
    Ok(())
}

fn run(ops: Vec<Op>) -> Result<(), TestCaseError> {
    let pool = HostPool::new();
    let mut live: Vec<(NonNull<u8>, Layout, u8)> = Vec::new();
    for op in ops {
        match op {
            Op::Alloc { size, align_shift } => {
                let l = Layout::from_size_align(size, 1 << align_shift).unwrap();
                let p = pool
                    .allocate(l)
                    .map_err(|e| TestCaseError::fail(e.to_string()))?;
                prop_assert_eq!(p.as_ptr() as usize % l.align(), 0);
                if size >= 4096 {
                    prop_assert_eq!(p.as_ptr() as usize % 64, 0);
                }
                let us = pool.usable_size(p.as_ptr()).unwrap();
                let rounded = HostPool::rounded_size(l).unwrap();
                prop_assert!(us >= size);
                if size <= MAX_CLASS_SIZE {
                    prop_assert_eq!(us, rounded);
                } else {
                    // A huge request may reuse a cached mapping up to 1/8 larger.
                    prop_assert!(
                        us >= rounded && us - rounded <= rounded / 8,
                        "huge {} got {}",
                        rounded,
                        us
                    );
                }
                for &(q, ql, _) in &live {
                    let (a, b) = (p.as_ptr() as usize, q.as_ptr() as usize);
                    prop_assert!(a + size <= b || b + ql.size() <= a, "overlap");
                }
                let seed = live.len() as u8;
                write(p, size, seed);
                live.push((p, l, seed));
            }
            Op::Write { idx, seed } if !live.is_empty() => {
                let i = idx % live.len();
                write(live[i].0, live[i].1.size(), seed);
                live[i].2 = seed;
            }
            Op::Verify { idx } if !live.is_empty() => {
                let (p, l, s) = live[idx % live.len()];
                verify(p, l.size(), s)?;
            }
            Op::Free { idx } if !live.is_empty() => {
                let (p, l, s) = live.swap_remove(idx % live.len());
                verify(p, l.size(), s)?;
                // SAFETY: live block allocated with `l`, removed from the oracle.
                unsafe { pool.deallocate(p, l) };
            }
            Op::FreeUnsized { idx } if !live.is_empty() => {
                let (p, l, s) = live.swap_remove(idx % live.len());
                verify(p, l.size(), s)?;
                // SAFETY: live block of this pool, removed from the oracle.
                unsafe { pool.free(p) }.map_err(|e| TestCaseError::fail(e.to_string()))?;
            }
            Op::Trim => {
                pool.trim();
            }
            Op::Prewarm { size, count } => {
                pool.prewarm(&Prewarm::new().blocks(size, count))
                    .map_err(|e| TestCaseError::fail(e.to_string()))?;
            }
            _ => {}
        }
    }
    for (p, l, s) in live.drain(..) {
        verify(p, l.size(), s)?;
        prop_assert!(pool.owns(p.as_ptr()));
        // SAFETY: live block allocated with `l`.
        unsafe { pool.deallocate(p, l) };
    }
    pool.trim();
    let st = pool.stats();
    prop_assert_eq!(
        st.reserved_bytes,
        0,
        "memory left after free-all + trim: {:?}",
        st
    );
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(1000),
        failure_persistence: None,
        ..ProptestConfig::default()
    })]
    #[test]
    fn pool_matches_oracle(ops in proptest::collection::vec(op_strategy(), 1..120)) {
        run(ops)?;
    }
}
