//! Eight threads of random alloc / realloc / free under `TensorGlobalAlloc`,
//! with cross-thread frees. Properties checked:
//! - every block keeps the pattern written into it until it is freed, also
//!   across `realloc` (the common prefix) and when another thread frees it;
//! - blocks are aligned as asked, for every alignment up to and beyond
//!   `MAX_ALIGN` (the latter served by the inner allocator);
//! - the pool owns exactly the blocks aligned up to `MAX_ALIGN`.

use std::alloc::{Layout, alloc, dealloc, realloc};
use std::sync::mpsc;
use tensorpool::TensorGlobalAlloc;

mod common;
use common::Rng;
use tensorpool::host::size_class::MAX_ALIGN;

#[global_allocator]
static A: TensorGlobalAlloc = TensorGlobalAlloc::new();

/// A live block and the seed of its pattern.
struct Block {
    addr: usize,
    layout: Layout,
    seed: u8,
}

/// Offsets that carry the pattern: every byte of small blocks; the first and
/// last 256 bytes and one byte per 1 KiB of bigger ones (debug builds).
fn marked(size: usize) -> impl Iterator<Item = usize> {
    let dense = size.min(4096);
    let (mid, tail) = if size > 4096 {
        (4096..size - 256, size - 256..size)
    } else {
        (0..0, 0..0)
    };
    (0..dense).chain(mid.step_by(1024)).chain(tail)
}

fn pattern(seed: u8, i: usize) -> u8 {
    seed.wrapping_add((i as u8).wrapping_mul(31)) ^ ((i >> 8) as u8)
}

impl Block {
    fn fill(&self, upto: usize) {
        let p = self.addr as *mut u8;
        for i in marked(upto) {
            // SAFETY: `i < upto ≤ layout.size()`; the block is ours.
            unsafe { *p.add(i) = pattern(self.seed, i) };
        }
    }
    /// Checks the pattern written by `fill(size)`, below `limit`.
    fn check(&self, size: usize, limit: usize) {
        let p = self.addr as *const u8;
        for i in marked(size).filter(|&i| i < limit) {
            // SAFETY: as in `fill`.
            let got = unsafe { *p.add(i) };
            assert_eq!(
                got,
                pattern(self.seed, i),
                "block {:#x} {:?} byte {i}",
                self.addr,
                self.layout
            );
        }
    }
}

fn random_layout(r: &mut Rng) -> Layout {
    // Log-uniform sizes 1 B – 2 MiB, now and then a tensor-sized or huge one.
    let size = match r.below(100) {
        0 => (64 << 20) + r.below(16 << 20) as usize,
        1..=3 => (2 << 20) + r.below(30 << 20) as usize,
        _ => {
            let bits = 1 + r.below(21);
            1 + r.below(1 << bits) as usize
        }
    };
    let align = match r.below(20) {
        0 => MAX_ALIGN << (1 + r.below(2)),
        1..=5 => 1 << r.below(17),
        _ => 8,
    };
    Layout::from_size_align(size, align).unwrap()
}

fn new_block(r: &mut Rng) -> Block {
    let layout = random_layout(r);
    // SAFETY: non-zero size.
    let p = unsafe { alloc(layout) };
    assert!(!p.is_null(), "{layout:?}");
    assert_eq!(p as usize % layout.align(), 0, "{layout:?}");
    assert_eq!(A.owns(p), layout.align() <= MAX_ALIGN, "{layout:?}");
    if layout.align() <= MAX_ALIGN {
        assert!(A.usable_size(p).unwrap() >= layout.size());
    }
    let b = Block {
        addr: p as usize,
        layout,
        seed: r.next() as u8,
    };
    b.fill(layout.size());
    b
}

fn free_block(b: Block) {
    b.check(b.layout.size(), usize::MAX);
    // SAFETY: allocated with `b.layout`, not used again.
    unsafe { dealloc(b.addr as *mut u8, b.layout) };
}

fn realloc_block(r: &mut Rng, mut b: Block) -> Block {
    let old = b.layout.size();
    let new_size = match r.below(3) {
        0 => (old / 2).max(1),
        1 => old + 1 + r.below(old as u64 / 4 + 8) as usize,
        _ => old * 2,
    };
    b.check(old, usize::MAX);
    // SAFETY: a live block of `b.layout`; `new_size > 0` and small enough.
    let p = unsafe { realloc(b.addr as *mut u8, b.layout, new_size) };
    assert!(!p.is_null());
    assert_eq!(p as usize % b.layout.align(), 0);
    b.addr = p as usize;
    b.layout = Layout::from_size_align(new_size, b.layout.align()).unwrap();
    b.check(old, new_size);
    b.fill(new_size);
    b
}

#[test]
fn eight_threads_random_ops_with_cross_thread_frees() {
    const THREADS: usize = 8;
    const OPS: usize = 3_000;
    let (txs, rxs): (Vec<_>, Vec<_>) = (0..THREADS).map(|_| mpsc::channel::<Block>()).unzip();
    let handles: Vec<_> = rxs
        .into_iter()
        .enumerate()
        .map(|(t, rx)| {
            let next = txs[(t + 1) % THREADS].clone();
            std::thread::spawn(move || {
                let mut r = Rng(0x9E37_79B9_7F4A_7C15 ^ (t as u64 + 1));
                let mut live: Vec<Block> = Vec::new();
                for _ in 0..OPS {
                    // Free what the previous thread sent us.
                    while let Ok(b) = rx.try_recv() {
                        free_block(b);
                    }
                    match r.below(10) {
                        0..=3 => live.push(new_block(&mut r)),
                        4..=5 if !live.is_empty() => {
                            let i = r.below(live.len() as u64) as usize;
                            free_block(live.swap_remove(i));
                        }
                        6..=7 if !live.is_empty() => {
                            let i = r.below(live.len() as u64) as usize;
                            let b = live.swap_remove(i);
                            live.push(realloc_block(&mut r, b));
                        }
                        8 if !live.is_empty() => {
                            let i = r.below(live.len() as u64) as usize;
                            next.send(live.swap_remove(i)).unwrap();
                        }
                        _ => {}
                    }
                    // Keep the live set (and the huge blocks in it) bounded.
                    while live.len() > 64 {
                        free_block(live.swap_remove(0));
                    }
                }
                drop(next);
                for b in live {
                    free_block(b);
                }
                rx
            })
        })
        .collect();
    drop(txs);
    let rxs: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    // Blocks sent after their receiver finished its loop.
    for rx in rxs {
        for b in rx.try_iter() {
            free_block(b);
        }
    }
    let s = A.stats();
    assert!(s.reserved_bytes > 0 && s.segments > 0);
}
