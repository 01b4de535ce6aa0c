//! The metadata table under concurrency (regressions the original system
//! failed, plus the slot-reuse race the grace period exists for):
//!
//! - 4 threads × 1,000 touch batches over the same 1,024 tensors lose no
//!   increment (exact totals, exact last access);
//! - a batch of 8 copies of one key counts 8;
//! - 8 threads × 10,000 inserts yield 80,000 distinct ids and slots;
//! - after 10,000 insert/remove cycles the live count equals the live
//!   allocations, on one thread and with two threads churning at once;
//! - a touch racing the removal of its tensor never lands on the tensor
//!   that reuses the slot;
//! - 4 threads inserting and removing at once leave the usage counters
//!   equal to the column scans and to the threads' own tally, and a reader
//!   meanwhile never sees a torn counter snapshot (a count without its
//!   bytes).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use tensorpool::meta::{IdIssuer, MetaTable, NewTensor, TensorKey, next_id};
use tensorpool::stats::CategoryUsage;
use tensorpool::{Device, TensorFlags};

fn nt(size: u64) -> NewTensor {
    NewTensor::bytes(size, Device::Host)
}

mod meta_common;
use meta_common::Rng;

#[test]
fn four_threads_overlapping_batches_exact_totals() {
    let t = Arc::new(MetaTable::new());
    let ids = IdIssuer::new();
    let keys: Arc<Vec<TensorKey>> = Arc::new(
        (0..1024)
            .map(|_| t.insert(ids.issue().unwrap(), &nt(64)).unwrap())
            .collect(),
    );
    let hs: Vec<_> = (0..4u64)
        .map(|th| {
            let (t, keys) = (t.clone(), keys.clone());
            std::thread::spawn(move || {
                let mut rng = Rng(th + 1);
                let mut mine = vec![0u64; 1024];
                let mut batch = Vec::new();
                for b in 0..1000u64 {
                    batch.clear();
                    // Lengths on both sides of the duplicate-counting threshold.
                    let len = if b % 2 == 0 {
                        1 + rng.below(48)
                    } else {
                        64 + rng.below(400)
                    };
                    for _ in 0..len {
                        let i = rng.below(1024) as usize;
                        mine[i] += 1;
                        batch.push(keys[i]);
                    }
                    t.touch(&batch, th * 1000 + b);
                }
                mine
            })
        })
        .collect();
    let mut want = vec![0u64; 1024];
    for h in hs {
        for (w, m) in want.iter_mut().zip(h.join().unwrap()) {
            *w += m;
        }
    }
    let mut total = 0;
    for (i, k) in keys.iter().enumerate() {
        let m = t.get(*k).unwrap();
        assert_eq!(m.access_count(), want[i], "tensor {i}");
        total += m.access_count();
    }
    assert_eq!(total, want.iter().sum::<u64>());
    // Thread 3's last batch has the largest `now`; some tensor got it.
    assert_eq!(
        keys.iter().map(|k| t.get(*k).unwrap().last_access()).max(),
        Some(3999)
    );
    t.check_invariants();
}

#[test]
fn batch_of_eight_copies_counts_eight() {
    let t = MetaTable::new();
    let k = t.insert(next_id().unwrap(), &nt(1)).unwrap();
    t.touch(&[k; 8], 42);
    let m = t.get(k).unwrap();
    assert_eq!((m.access_count(), m.last_access()), (8, 42));
}

#[test]
fn eight_threads_ten_thousand_inserts_distinct() {
    let t = Arc::new(MetaTable::new());
    let hs: Vec<_> = (0..8)
        .map(|_| {
            let t = t.clone();
            std::thread::spawn(move || {
                (0..10_000)
                    .map(|i| t.insert(next_id().unwrap(), &nt(i)).unwrap())
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    let keys: Vec<TensorKey> = hs.into_iter().flat_map(|h| h.join().unwrap()).collect();
    let mut idv: Vec<u64> = keys.iter().map(|k| k.id.get()).collect();
    idv.sort_unstable();
    idv.dedup();
    assert_eq!(idv.len(), 80_000);
    let mut slots: Vec<u32> = keys.iter().map(|k| k.slot).collect();
    slots.sort_unstable();
    slots.dedup();
    assert_eq!(slots.len(), 80_000);
    assert_eq!(t.live(), 80_000);
    assert!(
        keys.iter()
            .all(|k| t.get(*k).is_some_and(|m| m.id() == k.id))
    );
    t.check_invariants();
}

/// `cycles` random insert/remove steps on `t`; returns the keys still live.
fn churn(t: &MetaTable, seed: u64, cycles: usize) -> Vec<TensorKey> {
    let mut rng = Rng(seed);
    let mut live: Vec<TensorKey> = Vec::new();
    for _ in 0..cycles {
        if live.is_empty() || rng.below(2) == 0 {
            live.push(
                t.insert(next_id().unwrap(), &nt(rng.below(1 << 20)))
                    .unwrap(),
            );
        }
        let i = rng.below(live.len() as u64) as usize;
        let k = live.swap_remove(i);
        assert!(t.remove(k).is_some());
        assert!(t.remove(k).is_none(), "double remove is an error");
        if rng.below(3) == 0 {
            live.push(t.insert(next_id().unwrap(), &nt(8)).unwrap());
        }
    }
    live
}

#[test]
fn live_count_after_ten_thousand_cycles() {
    let t = MetaTable::new();
    let live = churn(&t, 7, 10_000);
    assert_eq!(t.live(), live.len());
    let bytes: u64 = t.usage_by_category().iter().map(|c| c.count).sum();
    assert_eq!(bytes as usize, live.len());
    t.check_invariants();

    // Two threads at once, with a third scanning.
    let t = Arc::new(MetaTable::new());
    let stop = Arc::new(AtomicBool::new(false));
    let scanner = {
        let (t, stop) = (t.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut out = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                t.lru(8, &mut out);
                t.touched_before(1, &mut out);
                t.touch(&out, 1);
            }
        })
    };
    let hs: Vec<_> = (0..2)
        .map(|s| {
            let t = t.clone();
            std::thread::spawn(move || churn(&t, 100 + s, 10_000))
        })
        .collect();
    let n: usize = hs.into_iter().map(|h| h.join().unwrap().len()).sum();
    stop.store(true, Ordering::Relaxed);
    scanner.join().unwrap();
    assert_eq!(t.live(), n);
    t.check_invariants();
}

/// A churner inserts tensors in turn "public" (its key shared with a
/// toucher, then removed while being touched) and "private" (nobody has
/// the key). A private tensor must end with access count 0: a touch of a
/// removed public tensor that landed in its reused slot would show here.
#[test]
fn touch_racing_removal_never_reaches_the_next_tenant() {
    let t = Arc::new(MetaTable::new());
    let public: Arc<Mutex<Vec<TensorKey>>> = Arc::new(Mutex::new(Vec::new()));
    let stop = Arc::new(AtomicBool::new(false));
    // Touch batches done, per toucher.
    let touches: Arc<[AtomicU64; 2]> = Arc::new([AtomicU64::new(0), AtomicU64::new(0)]);
    let touchers: Vec<_> = (0..2)
        .map(|th| {
            let (t, public, stop, touches) =
                (t.clone(), public.clone(), stop.clone(), touches.clone());
            std::thread::spawn(move || {
                let mut batch = Vec::new();
                let mut now = 0;
                while !stop.load(Ordering::Relaxed) {
                    batch.clear();
                    batch.extend(public.lock().unwrap().iter().copied());
                    // Long batches take the duplicate-counting path, short ones the direct one.
                    let reps = if th == 0 { 40 } else { 1 };
                    let b: Vec<TensorKey> = batch
                        .iter()
                        .flat_map(|k| std::iter::repeat_n(*k, reps))
                        .collect();
                    now += 1;
                    t.touch(&b, now);
                    touches[th].fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    // Waits until both touchers have run a few more batches, so that the
    // removals below really race with touches however loaded the machine
    // is (a liveness wait on progress, not on time; the deadline only turns
    // a hang into a failure).
    let wait_for_touches = || {
        let start: Vec<u64> = touches.iter().map(|c| c.load(Ordering::Relaxed)).collect();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
        while touches
            .iter()
            .zip(&start)
            .any(|(c, &s)| c.load(Ordering::Relaxed) < s + 3)
        {
            assert!(
                std::time::Instant::now() < deadline,
                "a toucher made no progress in 120 s"
            );
            std::thread::yield_now();
        }
    };
    let mut private_checked = 0;
    for i in 0..20_000u64 {
        if i % 1000 == 0 {
            wait_for_touches();
        }
        let pinned = if i % 7 == 0 { TensorFlags::PINNED } else { 0 };
        let k = t
            .insert(
                next_id().unwrap(),
                &NewTensor {
                    flags: TensorFlags(pinned),
                    ..nt(i)
                },
            )
            .unwrap();
        if i % 2 == 0 {
            let mut p = public.lock().unwrap();
            p.push(k);
            if p.len() > 4 {
                let old = p.remove(0);
                drop(p);
                assert!(t.remove(old).is_some());
            }
        } else {
            std::hint::spin_loop();
            let m = t.remove(k).unwrap();
            assert_eq!(
                m.access_count(),
                0,
                "a stale touch reached private tensor {i} in slot {}",
                k.slot
            );
            assert_eq!(m.last_access(), 0);
            private_checked += 1;
        }
    }
    wait_for_touches();
    stop.store(true, Ordering::Relaxed);
    for h in touchers {
        h.join().unwrap();
    }
    assert_eq!(private_checked, 10_000);
    // 21 waits of 3 batches each, per toucher.
    assert!(touches.iter().all(|c| c.load(Ordering::Relaxed) >= 63));
    t.check_invariants();
}

/// One size per category, so that in any consistent snapshot a category's
/// bytes are its count times this.
const CAT_SIZES: [u64; 5] = [64, 8 << 10, 100_000, 2 << 20, 32 << 20];

#[test]
fn usage_counters_equal_the_scan_after_four_threads_churn() {
    let t = Arc::new(MetaTable::new());
    let stop = Arc::new(AtomicBool::new(false));
    let reader = {
        let (t, stop) = (t.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut reads = 0u64;
            while !stop.load(Ordering::Relaxed) {
                for (u, size) in t.usage_by_category().iter().zip(CAT_SIZES) {
                    assert_eq!(u.bytes, u.count * size, "torn category snapshot {u:?}");
                }
                for (d, u) in t.usage_by_device() {
                    assert!(
                        (u.count * CAT_SIZES[0]..=u.count * CAT_SIZES[4]).contains(&u.bytes),
                        "torn device snapshot {d}: {u:?}"
                    );
                }
                reads += 1;
            }
            reads
        })
    };
    let start = Arc::new(std::sync::Barrier::new(4));
    let hs: Vec<_> = (0..4u32)
        .map(|th| {
            let (t, start) = (t.clone(), start.clone());
            std::thread::spawn(move || {
                let mut rng = Rng(u64::from(th) + 11);
                start.wait();
                let devices = [Device::Host, Device::Cuda(th), Device::Remote(th)];
                let mut live: Vec<(TensorKey, u64, Device)> = Vec::new();
                for _ in 0..100_000 {
                    if live.len() < 32 || rng.below(2) == 0 {
                        let size = CAT_SIZES[rng.below(5) as usize];
                        let dev = devices[rng.below(3) as usize];
                        let k = t
                            .insert(next_id().unwrap(), &NewTensor::bytes(size, dev))
                            .unwrap();
                        live.push((k, size, dev));
                    } else {
                        let (k, _, _) = live.swap_remove(rng.below(live.len() as u64) as usize);
                        assert!(t.remove(k).is_some());
                    }
                }
                live
            })
        })
        .collect();
    let mut by_dev: std::collections::BTreeMap<u16, CategoryUsage> = Default::default();
    let mut total = CategoryUsage::default();
    for h in hs {
        for (_, size, dev) in h.join().unwrap() {
            for u in [by_dev.entry(dev.code()).or_default(), &mut total] {
                u.count += 1;
                u.bytes += size;
            }
        }
    }
    stop.store(true, Ordering::Relaxed);
    assert!(reader.join().unwrap() > 0);
    t.check_invariants();
    let cat = t.usage_by_category();
    assert_eq!(cat, t.usage_by_category_scan());
    assert_eq!(t.usage_by_device(), t.usage_by_device_scan());
    let want: Vec<(Device, CategoryUsage)> = by_dev
        .into_iter()
        .map(|(c, u)| (Device::from_code(c), u))
        .collect();
    assert_eq!(t.usage_by_device(), want);
    assert_eq!(cat.iter().map(|u| u.count).sum::<u64>(), total.count);
    assert_eq!(cat.iter().map(|u| u.bytes).sum::<u64>(), total.bytes);
}
