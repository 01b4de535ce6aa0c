//! Loom models of every lock-free structure: the cross-thread free list
//! (`TransferStack`), the central list protocol built on it (`CentralList`:
//! give back, refill, drain and the byte counter), the id issuer, the spin
//! lock guarding slow paths, and the metadata table's epoch grace periods
//! for slot reuse (`Grace`, `Limbo`).
//! Run by `ci/loom.sh` (`RUSTFLAGS="--cfg tensorpool_loom"`); empty otherwise.
#![cfg(tensorpool_loom)]

use loom::sync::Arc;
use loom::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use loom::thread;
use tensorpool::host::transfer::FreeBlock;
use tensorpool::loom_exports::{CentralList, Grace, IdIssuer, Limbo, RawLock, TransferStack};

/// A block as the pool sees it (link word first) plus a payload that loom
/// tracks: the pusher writes it before publishing, the taker reads it after
/// taking, so a missing Release/Acquire edge is reported as a data race.
#[repr(C)]
struct Node {
    link: FreeBlock,
    payload: loom::cell::UnsafeCell<usize>,
}

fn node() -> *mut FreeBlock {
    Box::into_raw(Box::new(Node {
        link: FreeBlock {
            next: core::ptr::null_mut(),
        },
        payload: loom::cell::UnsafeCell::new(0),
    }))
    .cast()
}

/// Walks and frees a chain; returns the payloads.
fn drain(mut h: *mut FreeBlock) -> Vec<usize> {
    let mut v = Vec::new();
    while !h.is_null() {
        // SAFETY: taken chains are ours; nodes came from `Box::into_raw` of a
        // `Node`, whose first field is the link.
        let b = unsafe { Box::from_raw(h.cast::<Node>()) };
        // SAFETY: the node is ours now; loom checks the access is ordered
        // after the pusher's write.
        v.push(b.payload.with(|p| unsafe { *p }));
        h = b.link.next;
    }
    v
}

/// Two threads push chains while a third takes: every node comes out
/// exactly once, chains intact.
#[test]
fn transfer_stack_pushes_and_takes() {
    loom::model(|| {
        let s = Arc::new(TransferStack::new());
        let mut hs = Vec::new();
        let mut pushed = Vec::new();
        for len in [2usize, 1] {
            let nodes: Vec<*mut FreeBlock> = (0..len).map(|_| node()).collect();
            for w in nodes.windows(2) {
                // SAFETY: fresh nodes, ours.
                unsafe { (*w[0]).next = w[1] };
            }
            pushed.extend(nodes.iter().map(|&n| n as usize));
            let (h, t) = (nodes[0] as usize, *nodes.last().unwrap() as usize);
            let s = s.clone();
            hs.push(thread::spawn(move || {
                let mut n = h as *mut FreeBlock;
                while !n.is_null() {
                    // SAFETY: the chain is this thread's alone until pushed.
                    unsafe {
                        (*n.cast::<Node>()).payload.with_mut(|p| *p = n as usize);
                        n = (*n).next;
                    }
                }
                // SAFETY: the chain h..t is this thread's alone.
                unsafe { s.push_chain(h as *mut FreeBlock, t as *mut FreeBlock) };
            }));
        }
        let s2 = s.clone();
        let taker = thread::spawn(move || drain(s2.take_all()));
        for h in hs {
            h.join().unwrap();
        }
        let mut got = taker.join().unwrap();
        got.extend(drain(s.take_all()));
        got.sort_unstable();
        pushed.sort_unstable();
        assert_eq!(got, pushed);
    });
}

/// Ids are distinct and dense from 1 under concurrent issue.
#[test]
fn ids_are_unique() {
    loom::model(|| {
        let i = Arc::new(IdIssuer::new());
        let hs: Vec<_> = (0..2)
            .map(|_| {
                let i = i.clone();
                thread::spawn(move || [i.issue().unwrap().get(), i.issue().unwrap().get()])
            })
            .collect();
        let mut all: Vec<u64> = hs.into_iter().flat_map(|h| h.join().unwrap()).collect();
        all.push(i.issue().unwrap().get());
        all.sort_unstable();
        assert_eq!(all, vec![1, 2, 3, 4, 5]);
    });
}

/// The spin lock excludes: increments under it are never lost, and the
/// data written under it is visible to the next holder.
#[test]
fn raw_lock_excludes() {
    loom::model(|| {
        let l = Arc::new((RawLock::new(), loom::cell::UnsafeCell::new(0u32)));
        let hs: Vec<_> = (0..2)
            .map(|_| {
                let l = l.clone();
                thread::spawn(move || {
                    l.0.with(|| {
                        l.1.with_mut(|p| {
                            // SAFETY: the lock is held, so this is the only access.
                            unsafe { *p += 1 }
                        })
                    })
                })
            })
            .collect();
        for h in hs {
            h.join().unwrap();
        }
        // SAFETY: all writers joined.
        assert_eq!(l.0.with(|| l.1.with(|p| unsafe { *p })), 2);
    });
}

/// Links `len` fresh nodes, writes each one's payload (its address), and
/// returns (head, tail) as addresses.
fn chain(len: usize) -> (usize, usize, Vec<usize>) {
    let nodes: Vec<*mut FreeBlock> = (0..len).map(|_| node()).collect();
    for w in nodes.windows(2) {
        // SAFETY: fresh nodes, ours.
        unsafe { (*w[0]).next = w[1] };
    }
    (
        nodes[0] as usize,
        *nodes.last().unwrap() as usize,
        nodes.iter().map(|&n| n as usize).collect(),
    )
}

/// Writes every node's payload (after the chain is handed to this thread).
fn stamp(mut n: *mut FreeBlock) {
    while !n.is_null() {
        // SAFETY: the chain is this thread's alone until given back.
        unsafe {
            (*n.cast::<Node>()).payload.with_mut(|p| *p = n as usize);
            n = (*n).next;
        }
    }
}

const SIZE: usize = 16;

/// A refill of up to `want` blocks as the pool does it: the locked state
/// records what was taken, the counter is lowered after and must never
/// go below what is taken.
fn take(list: &CentralList<usize>, cached: &AtomicUsize, want: usize) -> Vec<usize> {
    let got = list.take(
        want,
        want,
        |st, got| {
            st.x += got.n;
            got
        },
        |n| {
            let before = cached.fetch_sub(n * SIZE, Ordering::Relaxed);
            assert!(
                before >= n * SIZE,
                "cached wrapped: {before} - {}",
                n * SIZE
            );
        },
    );
    drain(got.head)
}

/// The central list protocol (`host::central_list`, what every size class of
/// the pool runs): one thread gives a chain of two blocks back (kept whole in
/// a batch slot when the lock is free, else on the transfer stack) while
/// another gives one back through the transfer stack, each then refills (one
/// and two blocks: a batch may be cut), and the main thread takes the rest.
/// Checked: the byte counter is never lowered below what is taken (it is
/// raised before blocks are pushed and lowered after they are taken: issue 7
/// item 14), payloads written before a give-back are seen after the take
/// (Release/Acquire through the batch slots under the lock, or through the
/// transfer stack when the lock was busy), the locked state is never
/// touched by two threads at once (the lock's Acquire/Release; loom tracks
/// the cell), and every block comes out exactly once.
#[test]
fn central_list_give_back_refill_drain() {
    loom::model(|| {
        let list = Arc::new(CentralList::new(0usize));
        let cached = Arc::new(AtomicUsize::new(0));
        let (h2, t2, mut all) = chain(2);
        let (h1, t1, one) = chain(1);
        all.extend(one);
        let giver = {
            let (list, cached) = (list.clone(), cached.clone());
            thread::spawn(move || {
                stamp(h2 as *mut FreeBlock);
                // SAFETY: the chain h2..t2 is this thread's alone.
                unsafe {
                    list.give_back(h2 as *mut FreeBlock, t2 as *mut FreeBlock, 2, true, || {
                        cached.fetch_add(2 * SIZE, Ordering::Relaxed)
                    })
                };
                take(&list, &cached, 1)
            })
        };
        let refiller = {
            let (list, cached) = (list.clone(), cached.clone());
            thread::spawn(move || {
                stamp(h1 as *mut FreeBlock);
                // SAFETY: the chain h1..t1 is this thread's alone.
                unsafe {
                    list.give_back(h1 as *mut FreeBlock, t1 as *mut FreeBlock, 1, false, || {
                        cached.fetch_add(SIZE, Ordering::Relaxed)
                    })
                };
                take(&list, &cached, 2)
            })
        };
        let mut got = giver.join().unwrap();
        got.extend(refiller.join().unwrap());
        got.extend(take(&list, &cached, 3));
        got.sort_unstable();
        all.sort_unstable();
        assert_eq!(got, all, "a block lost or duplicated");
        assert_eq!(cached.load(Ordering::Relaxed), 0);
        // Every block taken was counted in the locked state.
        assert!(
            list.locked(|st| st.free.is_null()
                && st.free_len == 0
                && st.batched() == 0
                && st.x == 3)
        );
        assert_eq!(list.incoming_len(), 0);
    });
}

/// The metadata table's slot reuse, as `MetaTable` runs it: a toucher pins,
/// checks that slot 0 still holds tensor 1 and adds to its access count
/// (`touch_one`); meanwhile the slot-lock holder removes tensor 1 (id store,
/// retire into limbo) and inserts tensor 2, which takes slot 0 only if the
/// grace period let it go (`Limbo::take`), resetting the count and
/// publishing the new id. Whatever the interleaving, tensor 2 must start
/// with a count of 0: no touch of tensor 1 lands on it. A second toucher
/// pins and unpins meanwhile, to move the shard counts under the advancer.
#[test]
fn grace_period_keeps_touches_off_the_next_tenant() {
    loom::model(|| {
        let g = Arc::new(Grace::new());
        // Slot 0: id column and access count column.
        let slot = Arc::new((AtomicU64::new(1), AtomicU64::new(0)));
        let toucher = {
            let (g, slot) = (g.clone(), slot.clone());
            thread::spawn(move || {
                let _pin = g.pin();
                if slot.0.load(Ordering::Acquire) == 1 {
                    slot.1.fetch_add(1, Ordering::Relaxed);
                }
            })
        };
        let other = {
            let g = g.clone();
            thread::spawn(move || drop(g.pin()))
        };
        // The slot-lock holder: remove tensor 1, then insert tensor 2.
        let mut limbo = Limbo::default();
        slot.0.store(0, Ordering::Relaxed);
        limbo.retire(0);
        let reused = match limbo.take(&g) {
            Some(s) => {
                assert_eq!(s, 0);
                slot.1.store(0, Ordering::Relaxed);
                slot.0.store(2, Ordering::Release);
                true
            }
            None => false,
        };
        toucher.join().unwrap();
        other.join().unwrap();
        if reused {
            assert_eq!(
                slot.1.load(Ordering::Relaxed),
                0,
                "a touch of tensor 1 landed on tensor 2"
            );
        }
        // With every reader gone the slot is always reusable.
        assert_eq!(limbo.take(&g).is_some(), !reused);
    });
}
