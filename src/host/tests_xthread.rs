//! Tests of cross-thread frees (issue 8): blocks handed between threads in
//! whole batches (the central lists' batch slots) and hand-backs that cut a
//! thread's list at its remembered last node (`thread_cache`'s marks).
//! Properties: no block is handed out twice while live, no live block is
//! written by the pool, and once every thread is gone every block is free
//! again (trim then releases every span: a lost or duplicated block would
//! keep its span).

use super::HostPool;
use core::alloc::Layout;
use core::ptr::NonNull;
use std::collections::HashSet;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};

/// 16 B to 4 KiB, several classes, as `prodcons-2x2` allocates.
const SIZES: [usize; 6] = [16, 48, 200, 640, 1500, 4096];

fn layout_of(i: usize) -> Layout {
    Layout::from_size_align(SIZES[i % SIZES.len()], 8).unwrap()
}

/// A tiny xorshift generator: the test's choices, reproducible.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// Live blocks of every thread; inserting one already live fails.
type Live = Arc<Mutex<HashSet<usize>>>;

fn take_live(live: &Live, p: NonNull<u8>) {
    let fresh = live.lock().unwrap().insert(p.as_ptr() as usize);
    assert!(fresh, "block {p:p} handed out while live");
}

fn stamp(p: NonNull<u8>, l: Layout) {
    // SAFETY: a live block of `l.size()` bytes, ours.
    unsafe { core::slice::from_raw_parts_mut(p.as_ptr(), l.size()) }.fill(p.as_ptr() as u8 ^ 0x5a);
}

/// Checks the stamp, forgets the block as live and frees it.
fn release(pool: &HostPool, live: &Live, p: NonNull<u8>, l: Layout) {
    // SAFETY: as in `stamp`.
    let s = unsafe { core::slice::from_raw_parts(p.as_ptr(), l.size()) };
    let want = p.as_ptr() as u8 ^ 0x5a;
    assert!(s.iter().all(|&b| b == want), "live block {p:p} overwritten");
    assert!(live.lock().unwrap().remove(&(p.as_ptr() as usize)));
    // SAFETY: allocated from `pool` with `l`, freed once.
    unsafe { pool.deallocate(p, l) };
}

#[test]
fn producers_and_consumers_lose_and_duplicate_no_block() {
    let pool = HostPool::new();
    let live: Live = Arc::default();
    for round in 0..3u64 {
        let mut handles = Vec::new();
        for k in 0..2u64 {
            let (tx, rx) = mpsc::sync_channel::<(usize, usize)>(256);
            let (pool_p, live_p) = (pool.clone(), live.clone());
            // The producer also frees some blocks itself, keeps some a while
            // and runs bursts, so its lists are popped, pushed and cut in
            // any order.
            handles.push(std::thread::spawn(move || {
                let mut rng = Rng(0x9e37_79b9 ^ (round << 8) ^ k);
                let mut kept = Vec::new();
                for i in 0..6_000usize {
                    let l = layout_of(i);
                    let p = pool_p.allocate(l).unwrap().cast::<u8>();
                    take_live(&live_p, p);
                    stamp(p, l);
                    match rng.next() % 8 {
                        0 => kept.push((p, l)),
                        1 => release(&pool_p, &live_p, p, l),
                        _ => tx.send((p.as_ptr() as usize, i)).unwrap(),
                    }
                    if i.is_multiple_of(50) {
                        // A burst of random length: some end with the list
                        // just emptied (its last node handed out), whose
                        // frees then overflow it with no pop between.
                        let burst: Vec<_> = (0..1 + rng.next() % 700)
                            .map(|_| {
                                let q = pool_p.allocate(l).unwrap().cast::<u8>();
                                take_live(&live_p, q);
                                stamp(q, l);
                                q
                            })
                            .collect();
                        for q in burst {
                            release(&pool_p, &live_p, q, l);
                        }
                    }
                    if kept.len() > 40 {
                        let (q, lq) = kept.swap_remove((rng.next() % 40) as usize);
                        release(&pool_p, &live_p, q, lq);
                    }
                }
                for (q, lq) in kept {
                    release(&pool_p, &live_p, q, lq);
                }
            }));
            let (pool_c, live_c) = (pool.clone(), live.clone());
            // The consumer frees what it receives and now and then
            // allocates and frees a block of its own (a pop of its list).
            handles.push(std::thread::spawn(move || {
                let mut rng = Rng(0x1234_5678 ^ (round << 8) ^ k);
                for (p, i) in rx {
                    let p = NonNull::new(p as *mut u8).unwrap();
                    release(&pool_c, &live_c, p, layout_of(i));
                    if rng.next().is_multiple_of(16) {
                        let l = layout_of(i + 1);
                        let q = pool_c.allocate(l).unwrap().cast::<u8>();
                        take_live(&live_c, q);
                        stamp(q, l);
                        release(&pool_c, &live_c, q, l);
                    }
                }
            }));
        }
        for h in handles {
            h.join().unwrap();
        }
        assert!(live.lock().unwrap().is_empty());
    }
    // Every thread is gone (its caches handed back at exit): every block is
    // free, so trim releases every span.
    pool.trim();
    let s = pool.stats();
    assert_eq!(
        s.reserved_bytes, 0,
        "spans kept: a block lost or listed twice"
    );
    assert_eq!(s.cached_bytes, 0);
}

/// A refill that brought a whole batch handed back by another thread lifts
/// the cap to hold it (the slow start skips ahead), within the cache cap;
/// one that brought a few blocks only advances the slow start one step.
#[test]
fn a_whole_batch_lifts_the_cap_within_the_cache_cap() {
    use super::size_class::{cache_cap, cap_after_refill, class_of, initial_cap, next_cap};
    for size in [16, 64, 1024, 4096, 64 << 10, 8 << 20] {
        let c = class_of(size);
        let cap = initial_cap(c);
        assert_eq!(cap_after_refill(c, cap, 0), next_cap(c, cap));
        let full = cache_cap(c) as usize;
        assert_eq!(cap_after_refill(c, cap, full), cache_cap(c));
        for held in [1, full / 3, full / 2 + 1] {
            let got = cap_after_refill(c, cap, held);
            assert!(
                got as usize >= held && got <= cache_cap(c),
                "{size}: {held} → {got}"
            );
        }
    }
}
