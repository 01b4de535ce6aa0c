//! 8 threads allocate, fill, hand blocks to each other and free them after
//! checking the pattern: cross-thread frees never lose or corrupt a block,
//! and memory flows back (the pool stays bounded).

use core::alloc::Layout;
use std::sync::mpsc;
use tensorpool::host::HostPool;

const THREADS: usize = 8;
const ROUNDS: usize = 3_000;

fn splitmix(x: &mut u64) -> u64 {
    *x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *x;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

struct Block(usize, Layout, u8);

fn fill(b: &Block) {
    // SAFETY: `b` is a live block of ≥ b.1.size() bytes owned by this thread.
    unsafe { core::slice::from_raw_parts_mut(b.0 as *mut u8, b.1.size()) }.fill(b.2);
}

fn check(b: &Block) {
    // SAFETY: as in `fill`.
    let s = unsafe { core::slice::from_raw_parts(b.0 as *const u8, b.1.size()) };
    assert!(
        s.iter().all(|&x| x == b.2),
        "corrupted block {:#x} ({} B)",
        b.0,
        b.1.size()
    );
}

#[test]
fn eight_threads_cross_thread_frees() {
    let pool = HostPool::new();
    let (txs, rxs): (Vec<_>, Vec<_>) = (0..THREADS).map(|_| mpsc::channel::<Block>()).unzip();
    let handles: Vec<_> = rxs
        .into_iter()
        .enumerate()
        .map(|(t, rx)| {
            let pool = pool.clone();
            let txs = txs.clone();
            std::thread::spawn(move || {
                let mut rng = 0x1234 + t as u64;
                let mut mine: Vec<Block> = Vec::new();
                for r in 0..ROUNDS {
                    let x = splitmix(&mut rng);
                    let size = match x % 10 {
                        0..=5 => 1 + (x >> 8) as usize % 512,
                        6..=8 => 512 + (x >> 8) as usize % (64 << 10),
                        _ => (64 << 10) + (x >> 8) as usize % (2 << 20),
                    };
                    let l = Layout::from_size_align(size, 8 << (x % 4)).unwrap();
                    let b = Block(
                        pool.allocate(l).unwrap().as_ptr() as usize,
                        l,
                        (t * 31 + r) as u8,
                    );
                    fill(&b);
                    if x.is_multiple_of(3) {
                        txs[(t + 1 + (x as usize >> 4) % (THREADS - 1)) % THREADS]
                            .send(b)
                            .unwrap();
                    } else {
                        mine.push(b);
                    }
                    if mine.len() > 64 || x.is_multiple_of(7) {
                        for b in mine.drain(..mine.len() / 2) {
                            check(&b);
                            // SAFETY: live block of this pool, allocated with `b.1`.
                            unsafe {
                                pool.deallocate(
                                    core::ptr::NonNull::new(b.0 as *mut u8).unwrap(),
                                    b.1,
                                )
                            };
                        }
                    }
                    while let Ok(b) = rx.try_recv() {
                        check(&b);
                        // SAFETY: a block another thread allocated and sent us whole.
                        unsafe {
                            pool.deallocate(core::ptr::NonNull::new(b.0 as *mut u8).unwrap(), b.1)
                        };
                    }
                }
                (mine, rx)
            })
        })
        .collect();
    drop(txs);
    let rest: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    for (mine, rx) in rest {
        for b in mine.into_iter().chain(rx.try_iter()) {
            check(&b);
            // SAFETY: live blocks of this pool.
            unsafe { pool.deallocate(core::ptr::NonNull::new(b.0 as *mut u8).unwrap(), b.1) };
        }
    }
    // Every thread has exited (caches flushed); everything is free.
    pool.trim();
    let s = pool.stats();
    assert_eq!(s.reserved_bytes, 0, "{s:?}");
}
