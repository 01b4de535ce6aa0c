//! The offload backend: properties tested here.
//!
//! 1. Resident bytes (as the host pool rounds them) never exceed the budget:
//!    `check_invariants` after every operation, and the peak in the stats.
//! 2. Bytes round-trip exactly through eviction, spill and reload.
//! 3. Eviction is least-recently-used, deterministic for an access sequence,
//!    and never takes a pinned tensor.
//! 4. Strict mode refuses with the numbers; adaptive mode waits for an unpin;
//!    a tensor larger than the budget never fits.
//! 5. A forged, stale, foreign or double-freed handle is a typed error and
//!    changes nothing.
//! 6. A corrupted, truncated or foreign spill file is an integrity error
//!    naming the file; a failing or full disk is an I/O error and loses
//!    nothing.
//! 7. Concurrent requests for one spilled tensor load it once; 8 threads over
//!    a working set 4× the budget finish with every byte verified.
//! 8. Prefetch turns a miss into a hit (counted); the spill directory is gone
//!    after drop.

mod common;

use common::Rng;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier};
use std::time::Duration;
use tensorpool::backend::offload::{FaultHook, IoOp, host_rounding};
use tensorpool::backend::{BudgetMode, HostBackend, OffloadBackend, OffloadConfig, TensorState};
use tensorpool::{
    AllocError, AllocRequest, Allocation, DType, Device, TensorAllocator, TensorFlags,
};

type Off = OffloadBackend<HostBackend>;

const T: usize = 64 << 10;

fn charge(size: usize) -> usize {
    host_rounding(&AllocRequest::bytes(size)).unwrap()
}

fn cfg(budget: usize) -> OffloadConfig {
    OffloadConfig {
        wait_timeout: Duration::from_secs(60),
        ..OffloadConfig::with_budget(budget)
    }
}

fn off(budget: usize) -> Off {
    OffloadBackend::new(HostBackend::new(), cfg(budget)).unwrap()
}

fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut r = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
    (0..len).map(|_| r.next() as u8).collect()
}

fn read_all(b: &Off, a: &Allocation) -> Vec<u8> {
    let mut v = vec![0u8; a.size()];
    b.read(a, 0, &mut v).unwrap();
    v
}

#[test]
fn round_trip_under_budget_with_eviction_and_spill() {
    let b = off(3 * charge(T));
    let ts: Vec<Allocation> = (0..12)
        .map(|_| b.allocate(&AllocRequest::bytes(T)).unwrap())
        .collect();
    for (i, a) in ts.iter().enumerate() {
        b.write(a, 0, &pattern(i as u64, T)).unwrap();
        b.check_invariants();
    }
    for round in 0..2 {
        for (i, a) in ts.iter().enumerate().rev() {
            assert_eq!(
                read_all(&b, a),
                pattern(i as u64, T),
                "round {round} tensor {i}"
            );
            b.check_invariants();
        }
    }
    let s = b.offload_stats();
    assert!(s.peak_resident_bytes <= s.budget, "{s:?}");
    assert!(s.spills >= 9 && s.evictions >= 9 && s.loads >= 9, "{s:?}");
    assert_eq!(
        s.spilled_bytes,
        12 * T,
        "every tensor has a spill file: {s:?}"
    );
    assert!(s.bytes_written >= 9 * T as u64 && s.bytes_read >= 9 * T as u64);
    let m = b.stats();
    assert_eq!(m.device, Some(Device::Disk));
    assert_eq!(m.allocation.current, 12);
    assert!(
        m.num_alloc_retries >= 9,
        "allocations and loads that evicted first"
    );
    assert_eq!(m.allocated_bytes.current, 12 * T as u64);
    assert_eq!(m.active_bytes.current, 12 * charge(T) as u64);
    for a in &ts {
        // SAFETY: no view of `a` is alive.
        unsafe { b.deallocate(a) }.unwrap();
        b.check_invariants();
    }
    let s = b.offload_stats();
    assert_eq!(
        (s.resident_bytes, s.spilled_bytes, s.pinned_bytes),
        (0, 0, 0)
    );
    assert_eq!(std::fs::read_dir(b.spill_dir()).unwrap().count(), 0);
}

#[test]
fn pin_gives_typed_views_and_blocks_eviction() {
    let b = off(2 * charge(T));
    let a = b
        .allocate(&AllocRequest::tensor(&[T / 4], DType::F32).unwrap())
        .unwrap();
    {
        let mut g = b.pin_mut(&a).unwrap();
        for (i, x) in g.as_mut_slice::<f32>().unwrap().iter_mut().enumerate() {
            *x = i as f32;
        }
    }
    let g = b.pin(&a).unwrap();
    assert_eq!(b.state(&a).unwrap(), TensorState::Pinned);
    assert_eq!(b.offload_stats().pinned_bytes, charge(T));
    // Two more tensors need room: the pinned one must not go.
    let x = b.allocate(&AllocRequest::bytes(T)).unwrap();
    b.write(&x, 0, &[1; T]).unwrap();
    let y = b.allocate(&AllocRequest::bytes(T)).unwrap();
    assert_eq!(b.state(&a).unwrap(), TensorState::Pinned);
    assert_eq!(b.state(&x).unwrap(), TensorState::Spilled);
    assert_eq!(g.as_slice::<f32>().unwrap()[1000], 1000.0);
    // Pinned tensors cannot be freed.
    // SAFETY: the call fails; `g` stays valid.
    let r = unsafe { b.deallocate(&a) };
    assert!(matches!(r, Err(AllocError::Backend { .. })));
    drop(g);
    assert_eq!(b.offload_stats().pinned_bytes, 0);
    b.check_invariants();
    for t in [a, x, y] {
        // SAFETY: no guard alive.
        unsafe { b.deallocate(&t) }.unwrap();
    }
}

#[test]
fn eviction_order_is_lru_and_deterministic() {
    let run = || {
        let b = off(3 * charge(T));
        let t: Vec<Allocation> = (0..3)
            .map(|_| b.allocate(&AllocRequest::bytes(T)).unwrap())
            .collect();
        // Access order: 0, 2, 1, 0 → least recently used is 2.
        for &i in &[0usize, 2, 1, 0] {
            b.write(&t[i], 0, &[i as u8; 8]).unwrap();
        }
        let mut order = Vec::new();
        let mut all = t.clone();
        for _ in 0..3 {
            let n = b.allocate(&AllocRequest::bytes(T)).unwrap();
            b.write(&n, 0, &[9; 8]).unwrap();
            let gone: Vec<usize> = all
                .iter()
                .enumerate()
                .filter(|(_, a)| b.state(a).unwrap() == TensorState::Spilled)
                .map(|(i, _)| i)
                .filter(|i| !order.contains(i))
                .collect();
            assert_eq!(gone.len(), 1, "one victim per new tensor");
            order.push(gone[0]);
            all.push(n);
        }
        order
    };
    let first = run();
    assert_eq!(first, vec![2, 1, 0]);
    assert_eq!(run(), first);
}

#[test]
fn strict_refuses_with_numbers_and_never_fits() {
    let c = charge(T);
    let b = off(2 * c);
    let e = b.allocate(&AllocRequest::bytes(3 * T)).unwrap_err();
    assert!(
        matches!(e, AllocError::NeverFits { requested, limit, .. } if requested >= 3 * T && limit == 2 * c),
        "{e}"
    );
    let x = b.allocate(&AllocRequest::bytes(T)).unwrap();
    let y = b.allocate(&AllocRequest::bytes(T)).unwrap();
    let (gx, gy) = (b.pin(&x).unwrap(), b.pin(&y).unwrap());
    let before = b.stats();
    let e = b.allocate(&AllocRequest::bytes(T)).unwrap_err();
    match &e {
        AllocError::BudgetExceeded {
            requested,
            resident,
            pinned,
            budget,
            ..
        } => {
            assert_eq!(
                (*requested, *resident, *pinned, *budget),
                (c, 2 * c, 2 * c, 2 * c)
            );
        }
        e => panic!("{e}"),
    }
    assert!(e.is_retryable());
    assert_eq!(b.stats().allocation, before.allocation);
    drop((gx, gy));
    let z = b.allocate(&AllocRequest::bytes(T)).unwrap();
    b.check_invariants();
    for t in [x, y, z] {
        // SAFETY: no guard alive.
        unsafe { b.deallocate(&t) }.unwrap();
    }
}

#[test]
fn adaptive_waits_for_an_unpin() {
    let c = charge(T);
    let b = Arc::new(
        OffloadBackend::new(
            HostBackend::new(),
            OffloadConfig {
                mode: BudgetMode::Adaptive,
                ..cfg(c)
            },
        )
        .unwrap(),
    );
    let x = b.allocate(&AllocRequest::bytes(T)).unwrap();
    let g = b.pin(&x).unwrap();
    let started = Arc::new(AtomicBool::new(false));
    let h = {
        let (b, started) = (b.clone(), started.clone());
        std::thread::spawn(move || {
            started.store(true, Ordering::SeqCst);
            b.allocate(&AllocRequest::bytes(T))
        })
    };
    while !started.load(Ordering::SeqCst) {
        std::thread::yield_now();
    }
    // Whether or not the other thread is already waiting, it must succeed
    // once the pin ends (and could not before: the budget holds one tensor).
    assert_eq!(b.state(&x).unwrap(), TensorState::Pinned);
    drop(g);
    let y = h.join().unwrap().unwrap();
    assert_eq!(b.state(&x).unwrap(), TensorState::NotResident);
    b.check_invariants();
    // Adaptive with nothing ever unpinned ends in a timeout, not a hang.
    let b2 = OffloadBackend::new(
        HostBackend::new(),
        OffloadConfig {
            mode: BudgetMode::Adaptive,
            wait_timeout: Duration::from_millis(50),
            ..cfg(c)
        },
    )
    .unwrap();
    let p = b2.allocate(&AllocRequest::bytes(T)).unwrap();
    let _g = b2.pin(&p).unwrap();
    assert!(matches!(
        b2.allocate(&AllocRequest::bytes(T)),
        Err(AllocError::Timeout { .. })
    ));
    // SAFETY: no guard alive.
    unsafe { b.deallocate(&y) }.unwrap();
}

#[test]
fn forged_stale_and_foreign_handles_change_nothing() {
    let b = off(4 * charge(T));
    let a = b.allocate(&AllocRequest::bytes(T)).unwrap();
    b.write(&a, 0, &[7; 16]).unwrap();
    let before = (b.stats(), b.offload_stats());
    let forged = [
        Allocation::new(a.id(), a.addr(), T + 1, a.align(), a.device(), a.tag()),
        Allocation::new(a.id(), a.addr(), T, 128, a.device(), a.tag()),
        Allocation::new(a.id(), a.addr(), T, a.align(), Device::Host, a.tag()),
        Allocation::new(a.id(), a.addr(), T, a.align(), a.device(), a.tag() ^ 1),
        Allocation::new(
            a.id(),
            tensorpool::Addr::Host(core::ptr::NonNull::<u64>::dangling().cast()),
            T,
            a.align(),
            a.device(),
            a.tag(),
        ),
    ];
    for f in &forged {
        let mut buf = [0u8; 4];
        assert!(b.read(f, 0, &mut buf).is_err());
        assert!(b.write(f, 0, &buf).is_err());
        assert!(b.pin(f).is_err());
        // SAFETY: forged handles are refused.
        assert!(unsafe { b.deallocate(f) }.is_err());
    }
    let mut buf = [0u8; 4];
    assert!(matches!(
        b.read(&a, T - 2, &mut buf),
        Err(AllocError::OutOfRange { .. })
    ));
    assert!(matches!(
        b.write(&a, usize::MAX, &buf),
        Err(AllocError::OutOfRange { .. })
    ));
    let host = HostBackend::new();
    let h = host.allocate(&AllocRequest::bytes(64)).unwrap();
    assert!(matches!(
        b.read(&h, 0, &mut buf),
        Err(AllocError::WrongDevice { .. })
    ));
    let after = (b.stats(), b.offload_stats());
    assert_eq!(before.0.allocation, after.0.allocation);
    assert_eq!(before.1.resident_bytes, after.1.resident_bytes);
    assert_eq!(read_all(&b, &a)[..16], [7; 16]);
    // SAFETY: no guard alive.
    unsafe { b.deallocate(&a) }.unwrap();
    // SAFETY: double free is refused.
    let r = unsafe { b.deallocate(&a) };
    assert!(matches!(r, Err(AllocError::UnknownId { .. })));
    assert!(matches!(
        b.read(&a, 0, &mut buf),
        Err(AllocError::UnknownId { .. })
    ));
    // SAFETY: `h` is host's.
    unsafe { host.deallocate(&h) }.unwrap();
}

/// Writes tensor 0, pushes it out with others, and returns its spill file.
fn spilled_one(b: &Off) -> (Allocation, std::path::PathBuf, Vec<Allocation>) {
    let a = b
        .allocate(&AllocRequest::tensor(&[T / 2], DType::BF16).unwrap())
        .unwrap();
    b.write(&a, 0, &pattern(1, T)).unwrap();
    let others: Vec<Allocation> = (0..2)
        .map(|i| {
            let o = b.allocate(&AllocRequest::bytes(T)).unwrap();
            b.write(&o, 0, &pattern(10 + i, T)).unwrap();
            o
        })
        .collect();
    assert_eq!(b.state(&a).unwrap(), TensorState::Spilled);
    let path = b.spill_dir().join(format!("{:016x}.spill", a.id().get()));
    assert!(path.exists());
    (a, path, others)
}

#[test]
fn corrupted_spill_files_are_integrity_errors_naming_the_file() {
    let b = off(2 * charge(T));
    let (a, path, _o) = spilled_one(&b);
    let good = std::fs::read(&path).unwrap();
    assert_eq!(good.len(), 96 + T);
    assert_eq!(&good[..8], b"TPSPILL\0");
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("flipped payload byte", {
            let mut v = good.clone();
            v[96 + 1234] ^= 1;
            v
        }),
        ("truncated", good[..good.len() - 1].to_vec()),
        ("wrong magic", {
            let mut v = good.clone();
            v[0] = b'X';
            v
        }),
    ];
    let mut buf = vec![0u8; T];
    for (what, bytes) in cases {
        std::fs::write(&path, &bytes).unwrap();
        let e = b.read(&a, 0, &mut buf).unwrap_err();
        match &e {
            AllocError::Integrity { what: file, .. } => {
                assert_eq!(file, &path.display().to_string(), "{what}")
            }
            e => panic!("{what}: {e}"),
        }
        assert_eq!(b.state(&a).unwrap(), TensorState::Spilled, "{what}");
        b.check_invariants();
    }
    assert_eq!(b.offload_stats().integrity_errors, 3);
    std::fs::write(&path, &good).unwrap();
    assert_eq!(read_all(&b, &a), pattern(1, T));
}

#[test]
fn disk_full_while_spilling_loses_nothing() {
    let full = Arc::new(AtomicBool::new(false));
    let hook: FaultHook = {
        let full = full.clone();
        Arc::new(move |op, _| {
            if op == IoOp::SpillWrite && full.load(Ordering::SeqCst) {
                Err(std::io::Error::from_raw_os_error(libc::ENOSPC))
            } else {
                Ok(())
            }
        })
    };
    let b = OffloadBackend::new(
        HostBackend::new(),
        OffloadConfig {
            fault: Some(hook),
            ..cfg(2 * charge(T))
        },
    )
    .unwrap();
    let t: Vec<Allocation> = (0..2)
        .map(|i| {
            let a = b.allocate(&AllocRequest::bytes(T)).unwrap();
            b.write(&a, 0, &pattern(i, T)).unwrap();
            a
        })
        .collect();
    full.store(true, Ordering::SeqCst);
    let e = b.allocate(&AllocRequest::bytes(T)).unwrap_err();
    assert!(
        matches!(&e, AllocError::Io { op: "spill write", message, .. } if message.contains("space")),
        "{e}"
    );
    assert_eq!(b.state(&t[0]).unwrap(), TensorState::Resident);
    for (i, a) in t.iter().enumerate() {
        assert_eq!(read_all(&b, a), pattern(i as u64, T));
    }
    assert_eq!(
        std::fs::read_dir(b.spill_dir()).unwrap().count(),
        0,
        "no temp file left"
    );
    b.check_invariants();
    full.store(false, Ordering::SeqCst);
    let n = b.allocate(&AllocRequest::bytes(T)).unwrap();
    b.write(&n, 0, &[3; 8]).unwrap();
    for (i, a) in t.iter().enumerate() {
        assert_eq!(read_all(&b, a), pattern(i as u64, T));
    }
}

/// A real full disk: a 1 MiB tmpfs. Needs root and a kernel that lets this
/// process mount; skipped with a message otherwise.
#[test]
fn real_tiny_tmpfs_full_is_a_typed_error() {
    let dir = std::env::temp_dir().join(format!("tp-offload-tmpfs-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let ok = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=1m", "tmpfs"])
        .arg(&dir)
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !ok {
        eprintln!("skipped: cannot mount a tmpfs here (needs root and CAP_SYS_ADMIN)");
        let _ = std::fs::remove_dir(&dir);
        return;
    }
    let result = std::panic::catch_unwind(|| {
        let big = 256 << 10;
        let b = OffloadBackend::new(
            HostBackend::new(),
            OffloadConfig {
                spill_root: dir.clone(),
                ..cfg(2 * charge(big))
            },
        )
        .unwrap();
        let mut ts = Vec::new();
        let mut err = None;
        // 1 MiB of disk holds three 256 KiB spill files: the fourth spill fails.
        for i in 0..8u64 {
            let a = match b.allocate(&AllocRequest::bytes(big)) {
                Ok(a) => a,
                Err(e) => {
                    err = Some(e);
                    break;
                }
            };
            b.write(&a, 0, &pattern(i, big)).unwrap();
            ts.push(a);
        }
        let e = err.expect("a 1 MiB tmpfs cannot hold 8 × 256 KiB");
        assert!(
            matches!(
                e,
                AllocError::Io {
                    op: "spill write",
                    ..
                }
            ),
            "{e}"
        );
        // Nothing lost: free one spilled tensor (its file) and every other
        // tensor reads back exactly; clean victims are taken when a dirty
        // one cannot be spilled.
        // SAFETY: no guard alive.
        unsafe { b.deallocate(&ts[0]) }.unwrap();
        for (i, a) in ts.iter().enumerate().skip(1) {
            assert!(read_all(&b, a) == pattern(i as u64, big), "tensor {i}");
        }
        b.check_invariants();
    });
    let _ = std::process::Command::new("umount").arg(&dir).status();
    let _ = std::fs::remove_dir(&dir);
    result.unwrap();
}

#[test]
fn concurrent_requests_for_one_spilled_tensor_load_it_once() {
    let b = Arc::new(off(3 * charge(T)));
    let a = b.allocate(&AllocRequest::bytes(T)).unwrap();
    b.write(&a, 0, &pattern(5, T)).unwrap();
    b.evict_all().unwrap();
    assert_eq!(b.state(&a).unwrap(), TensorState::Spilled);
    let loads = b.offload_stats().loads;
    let bar = Arc::new(Barrier::new(8));
    let hs: Vec<_> = (0..8)
        .map(|_| {
            let (b, bar) = (b.clone(), bar.clone());
            std::thread::spawn(move || {
                bar.wait();
                read_all(&b, &a)
            })
        })
        .collect();
    for h in hs {
        assert_eq!(h.join().unwrap(), pattern(5, T));
    }
    assert_eq!(b.offload_stats().loads - loads, 1);
}

/// Runs `f` on a thread; fails (instead of hanging) if it takes longer than
/// `limit`.
fn with_timeout<F: FnOnce() + Send + 'static>(limit: Duration, f: F) {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        f();
        let _ = tx.send(());
    });
    match rx.recv_timeout(limit) {
        Ok(()) => {}
        Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
            panic!("no progress in {limit:?}: deadlock?")
        }
        Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => panic!("worker panicked"),
    }
}

#[test]
fn eight_threads_over_four_times_the_budget() {
    with_timeout(Duration::from_secs(300), || {
        const S: usize = 16 << 10;
        let b = Arc::new(off(8 * charge(S)));
        // 4 tensors per thread, owned (read-write), and 8 shared read-only ones.
        let shared: Vec<Allocation> = (0..8)
            .map(|i| {
                let a = b.allocate(&AllocRequest::bytes(S)).unwrap();
                b.write(&a, 0, &pattern(1000 + i, S)).unwrap();
                a
            })
            .collect();
        let shared = Arc::new(shared);
        let hs: Vec<_> = (0..8u64)
            .map(|t| {
                let (b, shared) = (b.clone(), shared.clone());
                std::thread::spawn(move || {
                    let mut rng = Rng(t + 1);
                    let own: Vec<Allocation> = (0..3)
                        .map(|_| b.allocate(&AllocRequest::bytes(S)).unwrap())
                        .collect();
                    let mut oracle: Vec<Vec<u8>> = vec![vec![0; S]; own.len()];
                    let mut buf = vec![0u8; S];
                    for step in 0..1000u64 {
                        match rng.below(4) {
                            0 => {
                                let i = rng.below(own.len() as u64) as usize;
                                let v = pattern(t * 1_000_000 + step, S);
                                b.write(&own[i], 0, &v).unwrap();
                                oracle[i] = v;
                            }
                            1 => {
                                let i = rng.below(own.len() as u64) as usize;
                                b.read(&own[i], 0, &mut buf).unwrap();
                                assert!(buf == oracle[i], "thread {t} own {i} step {step}");
                            }
                            2 => {
                                let i = rng.below(shared.len() as u64) as usize;
                                b.read(&shared[i], 0, &mut buf).unwrap();
                                assert!(
                                    buf == pattern(1000 + i as u64, S),
                                    "thread {t} shared {i}"
                                );
                            }
                            _ => {
                                let i = rng.below(shared.len() as u64) as usize;
                                let g = b.pin(&shared[i]).unwrap();
                                assert!(
                                    g.as_bytes() == &pattern(1000 + i as u64, S)[..],
                                    "pinned {i}"
                                );
                            }
                        }
                    }
                    for a in own {
                        // SAFETY: no guard alive.
                        unsafe { b.deallocate(&a) }.unwrap();
                    }
                })
            })
            .collect();
        for h in hs {
            h.join().unwrap();
        }
        b.check_invariants();
        let s = b.offload_stats();
        assert!(s.peak_resident_bytes <= s.budget);
        assert!(s.evictions > 0 && s.loads > 0, "{s:?}");
    });
}

#[test]
fn prefetch_turns_the_next_miss_into_a_hit() {
    let c = charge(T);
    let b = off(4 * c);
    let t: Vec<Allocation> = (0..8)
        .map(|i| {
            let a = b.allocate(&AllocRequest::bytes(T)).unwrap();
            b.write(&a, 0, &pattern(i, T)).unwrap();
            a
        })
        .collect();
    b.evict_all().unwrap();
    // Without an order: every access misses.
    let s0 = b.offload_stats();
    assert_eq!(read_all(&b, &t[0]), pattern(0, T));
    assert_eq!(read_all(&b, &t[1]), pattern(1, T));
    let s1 = b.offload_stats();
    assert_eq!(
        (s1.prefetch_misses - s0.prefetch_misses, s1.prefetch_hits),
        (2, 0)
    );
    // With an order: touching t[2] prefetches t[3] (and t[4]).
    b.set_order(&t).unwrap();
    assert_eq!(read_all(&b, &t[2]), pattern(2, T));
    b.wait_prefetch_idle().unwrap();
    assert_eq!(b.state(&t[3]).unwrap(), TensorState::Resident);
    assert_eq!(read_all(&b, &t[3]), pattern(3, T));
    let s2 = b.offload_stats();
    assert_eq!(
        s2.prefetch_misses - s1.prefetch_misses,
        1,
        "only t[2] missed"
    );
    assert!(s2.prefetch_hits >= 1 && s2.prefetch_loads >= 1, "{s2:?}");
    assert!(s2.peak_resident_bytes <= s2.budget);
    // A hint loads into free budget only: with the budget full of pinned
    // tensors it is dropped, evicting nothing.
    b.set_order(&[]).unwrap();
    b.wait_prefetch_idle().unwrap();
    b.evict_all().unwrap();
    let gs: Vec<_> = t[..4].iter().map(|a| b.pin(a).unwrap()).collect();
    b.wait_prefetch_idle().unwrap();
    let dropped = b.offload_stats().prefetch_dropped;
    b.prefetch(&t[4..5]).unwrap();
    b.wait_prefetch_idle().unwrap();
    assert_eq!(b.state(&t[4]).unwrap(), TensorState::Spilled);
    assert_eq!(b.offload_stats().prefetch_dropped, dropped + 1);
    drop(gs);
    b.prefetch(&t[4..5]).unwrap();
    b.wait_prefetch_idle().unwrap();
    // Free budget exists only after eviction, which a hint does not do.
    assert_ne!(b.state(&t[4]).unwrap(), TensorState::Loading);
    b.check_invariants();
}

#[test]
fn prefetch_never_evicts_more_recently_used_tensors() {
    let b = off(2 * charge(T));
    let t: Vec<Allocation> = (0..4)
        .map(|i| {
            let a = b.allocate(&AllocRequest::bytes(T)).unwrap();
            b.write(&a, 0, &pattern(i, T)).unwrap();
            a
        })
        .collect();
    b.evict_all().unwrap();
    // x is used first, then the trigger t[0]: the window t[1], t[2] may
    // evict x (used before the trigger), but neither the trigger nor t[1]
    // (loaded by this very prefetch, so newer), so t[2] is dropped.
    let x = t[3];
    read_all(&b, &x);
    b.set_order(&t[..3]).unwrap();
    let before = b.offload_stats();
    read_all(&b, &t[0]);
    b.wait_prefetch_idle().unwrap();
    let s = b.offload_stats();
    assert_eq!(b.state(&x).unwrap(), TensorState::Spilled, "x was older");
    assert_eq!(
        b.state(&t[0]).unwrap(),
        TensorState::Resident,
        "trigger kept"
    );
    assert_eq!(b.state(&t[1]).unwrap(), TensorState::Resident);
    assert_eq!(b.state(&t[2]).unwrap(), TensorState::Spilled);
    assert_eq!(s.prefetch_loads - before.prefetch_loads, 1);
    assert_eq!(s.prefetch_dropped - before.prefetch_dropped, 1);
    // A pinned tensor is never a prefetch victim either, however old.
    let g = b.pin(&t[1]).unwrap();
    read_all(&b, &t[0]);
    b.wait_prefetch_idle().unwrap();
    assert_eq!(b.state(&t[1]).unwrap(), TensorState::Pinned);
    drop(g);
    b.check_invariants();
}

#[test]
fn spill_dir_is_removed_on_drop_unless_kept() {
    let b = off(charge(T));
    let a = b.allocate(&AllocRequest::bytes(T)).unwrap();
    b.write(&a, 0, &[1; 8]).unwrap();
    let a2 = b.allocate(&AllocRequest::bytes(T)).unwrap();
    let dir = b.spill_dir().to_path_buf();
    assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 1);
    let _ = a2;
    drop(b);
    assert!(!dir.exists(), "spill dir left behind");
    let b = OffloadBackend::new(
        HostBackend::new(),
        OffloadConfig {
            keep_spill_dir: true,
            ..cfg(charge(T))
        },
    )
    .unwrap();
    let dir = b.spill_dir().to_path_buf();
    drop(b);
    assert!(dir.exists());
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn permanently_pinned_and_zero_size_tensors() {
    let c = charge(T);
    let b = off(2 * c);
    let p = b
        .allocate(&AllocRequest::bytes(T).flags(TensorFlags::PINNED))
        .unwrap();
    let z = b.allocate(&AllocRequest::bytes(0)).unwrap();
    assert_eq!(b.pin(&z).unwrap().as_bytes().len(), 0);
    for _ in 0..3 {
        let a = b.allocate(&AllocRequest::bytes(T)).unwrap();
        b.write(&a, 0, &[1; 8]).unwrap();
    }
    assert_eq!(b.state(&p).unwrap(), TensorState::Pinned);
    b.check_invariants();
}

#[test]
fn conformance_kit_with_a_small_budget() {
    use tensorpool::testkit::{Caps, check};
    let b = off(4 << 20);
    check(
        &b,
        Caps {
            max_size: 1 << 20,
            random_ops: 2_000,
            ops_per_thread: 300,

            churn_max_size: 64 << 10,
            ..Caps::host()
        },
    );
    b.check_invariants();
    let inner = b.inner().stats();
    assert_eq!(inner.allocation.current, 0, "inner allocations leaked");
    let s = b.offload_stats();
    assert!(s.peak_resident_bytes <= s.budget);
}

#[test]
fn a_write_pin_waits_for_readers_and_excludes_them() {
    let b = Arc::new(off(2 * charge(T)));
    let a = b.allocate(&AllocRequest::bytes(T)).unwrap();
    let r = b.pin(&a).unwrap();
    let wrote = Arc::new(AtomicBool::new(false));
    let h = {
        let (b, wrote) = (b.clone(), wrote.clone());
        std::thread::spawn(move || {
            b.write(&a, 0, &[5; 8]).unwrap();
            wrote.store(true, Ordering::SeqCst);
        })
    };
    // While the read pin lives the writer cannot have written.
    assert_eq!(&r.as_bytes()[..8], &[0; 8]);
    assert!(!wrote.load(Ordering::SeqCst));
    drop(r);
    h.join().unwrap();
    assert_eq!(read_all(&b, &a)[..8], [5; 8]);
    // A write pin held: the same thread asking again times out, no hang.
    let b2 = OffloadBackend::new(
        HostBackend::new(),
        OffloadConfig {
            wait_timeout: Duration::from_millis(30),
            ..cfg(2 * charge(T))
        },
    )
    .unwrap();
    let x = b2.allocate(&AllocRequest::bytes(T)).unwrap();
    let mut w = b2.pin_mut(&x).unwrap();
    w.as_bytes_mut()[0] = 9;
    assert!(matches!(b2.pin(&x), Err(AllocError::Timeout { .. })));
    drop(w);
    assert_eq!(b2.pin(&x).unwrap().as_bytes()[0], 9);
}
