//! Fuzzes the host pool with alloc / free / realloc / size-less free / trim
//! sequences. Every block is filled with a pattern derived from its index
//! and checked before it is freed or moved.
#![no_main]

use arbitrary::Arbitrary;
use core::alloc::Layout;
use core::ptr::NonNull;
use libfuzzer_sys::fuzz_target;
use tensorpool::host::HostPool;

#[derive(Arbitrary, Debug)]
enum Op {
    Alloc { size: u32, align_shift: u8 },
    Free { i: u16 },
    FreeUnsized { i: u16 },
    Realloc { i: u16, size: u32 },
    Trim,
}

struct Live {
    p: NonNull<u8>,
    l: Layout,
    seed: u8,
}

fn fill(b: &Live) {
    // SAFETY: `b.p` is a live block of ≥ b.l.size() bytes.
    unsafe { core::slice::from_raw_parts_mut(b.p.as_ptr(), b.l.size()) }.fill(b.seed);
}

fn check(b: &Live) {
    // SAFETY: as in `fill`.
    let s = unsafe { core::slice::from_raw_parts(b.p.as_ptr(), b.l.size()) };
    assert!(s.iter().all(|&x| x == b.seed), "corrupted block");
}

fuzz_target!(|ops: Vec<Op>| {
    let pool = HostPool::new();
    let mut live: Vec<Live> = Vec::new();
    for (n, op) in ops.into_iter().enumerate() {
        match op {
            Op::Alloc { size, align_shift } => {
                // Up to 8 MiB keeps each run fast; the huge path has unit tests.
                let size = (size % (8 << 20)) as usize;
                let Ok(l) = Layout::from_size_align(size, 1 << (align_shift % 17)) else { continue };
                match pool.allocate(l) {
                    Ok(p) => {
                        assert_eq!(p.as_ptr() as usize % l.align(), 0);
                        let b = Live { p, l, seed: n as u8 };
                        fill(&b);
                        live.push(b);
                    }
                    // Alignments above the pool's maximum are refused, not served.
                    Err(e) => assert!(l.align() > tensorpool::host::size_class::MAX_ALIGN, "{e}"),
                }
            }
            Op::Free { i } if !live.is_empty() => {
                let b = live.swap_remove(i as usize % live.len());
                check(&b);
                // SAFETY: live block allocated with `b.l`, removed from the list.
                unsafe { pool.deallocate(b.p, b.l) };
            }
            Op::FreeUnsized { i } if !live.is_empty() => {
                let b = live.swap_remove(i as usize % live.len());
                check(&b);
                if b.l.size() == 0 {
                    continue; // owns no memory
                }
                // SAFETY: live block of this pool.
                unsafe { pool.free(b.p) }.expect("size-less free of a live block");
            }
            Op::Realloc { i, size } if !live.is_empty() => {
                let k = i as usize % live.len();
                check(&live[k]);
                let nl = Layout::from_size_align((size % (8 << 20)) as usize, live[k].l.align()).unwrap();
                let q = pool.allocate(nl).expect("realloc target");
                let keep = nl.size().min(live[k].l.size());
                // SAFETY: distinct live blocks of ≥ keep bytes each.
                unsafe {
                    core::ptr::copy_nonoverlapping(live[k].p.as_ptr(), q.as_ptr(), keep);
                    pool.deallocate(live[k].p, live[k].l);
                }
                live[k] = Live { p: q, l: nl, seed: live[k].seed };
                // The copied prefix must carry the old pattern; refill the rest.
                // SAFETY: `q` is live with ≥ keep bytes.
                assert!(unsafe { core::slice::from_raw_parts(q.as_ptr(), keep) }.iter().all(|&x| x == live[k].seed));
                fill(&live[k]);
            }
            Op::Trim => {
                pool.trim();
            }
            _ => {}
        }
    }
    for b in live {
        check(&b);
        // SAFETY: live block allocated with `b.l`.
        unsafe { pool.deallocate(b.p, b.l) };
    }
});
