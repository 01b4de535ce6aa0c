//! The backends through the `TensorAllocator` contract: bad input gets a
//! typed error and changes nothing; regression cases of the original system;
//! the meta backend's predictions.

use std::sync::Arc;
use tensorpool::backend::{HostBackend, MetaBackend};
use tensorpool::host::Category;
use tensorpool::{
    AllocError, AllocRequest, Allocation, DType, Device, LayoutProblem, Limited, TensorAllocator,
    TensorBuf, TensorFlags,
};

fn host() -> Arc<dyn TensorAllocator> {
    Arc::new(HostBackend::new())
}

#[test]
fn object_safe_and_typed_views() {
    let b = host();
    let mut t = TensorBuf::new(
        &b,
        &AllocRequest::tensor(&[4, 256], DType::F32)
            .unwrap()
            .zeroed(),
    )
    .unwrap();
    assert!(t.as_slice::<f32>().unwrap().iter().all(|&x| x == 0.0));
    t.as_mut_slice::<f32>()
        .unwrap()
        .iter_mut()
        .enumerate()
        .for_each(|(i, x)| *x = i as f32);
    assert_eq!(t.as_slice::<f32>().unwrap()[1023], 1023.0);
    assert_eq!(t.as_slice::<u8>().unwrap().len(), 4096);
    assert_eq!(b.stats().allocation.current, 1);
    drop(t);
    let s = b.stats();
    assert_eq!(
        (
            s.allocation.current,
            s.allocated_bytes.current,
            s.allocated_bytes.peak
        ),
        (0, 0, 4096)
    );
}

#[test]
fn meta_views_are_refused() {
    let b: Arc<dyn TensorAllocator> = Arc::new(MetaBackend::new());
    let t = TensorBuf::new(&b, &AllocRequest::bytes(64)).unwrap();
    assert!(matches!(
        t.as_slice::<u8>(),
        Err(tensorpool::ViewError::NotHost(Device::Meta))
    ));
}

#[test]
fn zero_size_is_a_unique_id_without_memory() {
    let b = HostBackend::new();
    let a1 = b.allocate(&AllocRequest::bytes(0)).unwrap();
    let a2 = b.allocate(&AllocRequest::bytes(0)).unwrap();
    assert_ne!(a1.id(), a2.id());
    assert_eq!(a1.host_ptr(), None);
    assert_eq!(
        b.pool().stats().reserved_bytes,
        0,
        "zero-size touched memory"
    );
    // SAFETY: no memory involved.
    unsafe {
        b.deallocate(&a1).unwrap();
        b.deallocate(&a2).unwrap();
    }
}

#[test]
fn bad_layouts_are_typed_errors() {
    for b in [
        host(),
        Arc::new(MetaBackend::new()) as Arc<dyn TensorAllocator>,
    ] {
        let e = b.allocate(&AllocRequest::new(64, 48)).unwrap_err();
        assert!(
            matches!(
                e,
                AllocError::InvalidLayout {
                    size: 64,
                    align: 48,
                    problem: LayoutProblem::AlignNotPowerOfTwo
                }
            ),
            "{e}"
        );
        let e = b.allocate(&AllocRequest::new(64, 1 << 20)).unwrap_err();
        assert!(
            matches!(
                e,
                AllocError::InvalidLayout {
                    problem: LayoutProblem::AlignTooLarge { max: 65536 },
                    ..
                }
            ),
            "{e}"
        );
        assert!(e.to_string().contains("65536"));
        let e = b
            .allocate(&AllocRequest::new(usize::MAX - 100, 64))
            .unwrap_err();
        assert!(
            matches!(
                e,
                AllocError::InvalidLayout {
                    problem: LayoutProblem::SizeOverflow,
                    ..
                }
            ),
            "{e}"
        );
        assert!(!e.is_retryable());
        assert!(AllocRequest::tensor(&[1 << 40, 1 << 40], DType::F64).is_err());
        assert_eq!(b.stats().allocation.current, 0);
    }
}

#[test]
fn limit_errors_name_request_allocated_reserved_limit() {
    let b = Limited::new(HostBackend::new(), 1 << 20);
    let a = b.allocate(&AllocRequest::bytes(700 << 10)).unwrap();
    let e = b.allocate(&AllocRequest::bytes(400 << 10)).unwrap_err();
    match &e {
        AllocError::LimitExceeded {
            requested,
            allocated,
            reserved,
            limit,
            device,
        } => {
            // Counted as the backend rounds them (its active bytes).
            let r = |n: usize| {
                tensorpool::host::HostPool::rounded_size(
                    core::alloc::Layout::from_size_align(n, 64).unwrap(),
                )
                .unwrap()
            };
            assert_eq!(
                (*requested, *allocated, *limit, *device),
                (r(400 << 10), r(700 << 10), 1 << 20, Device::Host)
            );
            assert!(*reserved >= 700 << 10);
        }
        e => panic!("{e}"),
    }
    assert!(e.is_retryable());
    let e = b.allocate(&AllocRequest::bytes(2 << 20)).unwrap_err();
    assert!(
        matches!(
            e,
            AllocError::NeverFits {
                requested: 2097152,
                limit: 1048576,
                ..
            }
        ),
        "{e}"
    );
    assert!(!e.is_retryable());
    assert_eq!(b.stats().num_ooms, 2);
    // SAFETY: live allocation, not used afterwards.
    unsafe { b.deallocate(&a) }.unwrap();
    assert_eq!(b.used(), 0);
    let a = b.allocate(&AllocRequest::bytes(400 << 10)).unwrap();
    // SAFETY: as above.
    unsafe { b.deallocate(&a) }.unwrap();
}

#[test]
fn double_free_and_stale_ids_change_nothing() {
    let b = HostBackend::new();
    let a = b.allocate(&AllocRequest::bytes(4096)).unwrap();
    let keep = b.allocate(&AllocRequest::bytes(4096)).unwrap();
    // SAFETY: `a` is live and not used afterwards.
    unsafe { b.deallocate(&a) }.unwrap();
    let before = (b.stats(), b.table().live());
    // SAFETY: a double free is refused before anything is touched.
    let e = unsafe { b.deallocate(&a) }.unwrap_err();
    assert!(
        matches!(
            e,
            AllocError::UnknownId {
                device: Device::Host,
                ..
            }
        ),
        "{e}"
    );
    assert_eq!((b.stats(), b.table().live()), before);
    // The slot is reused by a new tensor: the old id still cannot free it.
    let c = b.allocate(&AllocRequest::bytes(4096)).unwrap();
    assert_eq!(c.tag(), a.tag(), "slot reused");
    // SAFETY: refused: stale id.
    assert!(unsafe { b.deallocate(&a) }.is_err());
    // A forged allocation with a live id but the wrong size is refused too.
    let forged = Allocation::new(keep.id(), keep.addr(), 8, 64, Device::Host, keep.tag());
    // SAFETY: refused before anything is freed.
    let r = unsafe { b.deallocate(&forged) };
    assert!(matches!(r, Err(AllocError::LayoutMismatch { .. })));
    // SAFETY: live, not used afterwards.
    unsafe {
        b.deallocate(&c).unwrap();
        b.deallocate(&keep).unwrap();
    }
    assert_eq!(b.table().live(), 0);
}

#[test]
fn wrong_backend_is_refused() {
    let h = HostBackend::new();
    let m = MetaBackend::new();
    let h2 = HostBackend::new();
    let a = h.allocate(&AllocRequest::bytes(128)).unwrap();
    let x = m.allocate(&AllocRequest::bytes(128)).unwrap();
    // SAFETY: each call is refused before anything is freed.
    unsafe {
        assert!(matches!(
            m.deallocate(&a),
            Err(AllocError::WrongDevice {
                expected: Device::Meta,
                found: Device::Host,
                ..
            })
        ));
        assert!(matches!(
            h.deallocate(&x),
            Err(AllocError::WrongDevice { .. })
        ));
        // Same device, other backend: its table does not know the id.
        assert!(matches!(
            h2.deallocate(&a),
            Err(AllocError::UnknownId { .. })
        ));
        h.deallocate(&a).unwrap();
        m.deallocate(&x).unwrap();
    }
}

#[test]
fn six_hundred_kib_and_every_category() {
    let b = HostBackend::new();
    let sizes = [100usize, 5000, 600 << 10, 3 << 20, 40 << 20];
    let allocs: Vec<_> = sizes
        .iter()
        .map(|&s| b.allocate(&AllocRequest::bytes(s)).unwrap())
        .collect();
    let per = b.stats().per_category;
    for (i, &s) in sizes.iter().enumerate() {
        let c = Category::of_size(s).index();
        assert_eq!((per[c].count, per[c].bytes), (1, s as u64), "category {i}");
    }
    for a in &allocs {
        // SAFETY: live allocations, not used afterwards.
        unsafe { b.deallocate(a) }.unwrap();
    }
}

#[test]
fn eight_threads_ten_thousand_each_distinct_ids() {
    let b = Arc::new(HostBackend::new());
    let hs: Vec<_> = (0..8)
        .map(|_| {
            let b = b.clone();
            std::thread::spawn(move || {
                let mut ids = Vec::with_capacity(10_000);
                for i in 0..10_000 {
                    let a = b.allocate(&AllocRequest::bytes(16 + i % 300)).unwrap();
                    ids.push(a.id().get());
                    // SAFETY: live, not used afterwards.
                    unsafe { b.deallocate(&a) }.unwrap();
                }
                ids
            })
        })
        .collect();
    let mut all: Vec<u64> = hs.into_iter().flat_map(|h| h.join().unwrap()).collect();
    all.sort_unstable();
    all.dedup();
    assert_eq!(all.len(), 80_000);
}

#[test]
fn ten_thousand_cycles_return_to_zero() {
    let b = HostBackend::new();
    let mut live: Vec<Allocation> = Vec::new();
    let mut x = 7u64;
    for i in 0..10_000usize {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        if !x.is_multiple_of(3) || live.is_empty() {
            live.push(
                b.allocate(&AllocRequest::bytes(1 + (x as usize % (256 << 10))))
                    .unwrap(),
            );
        } else {
            let a = live.swap_remove(x as usize % live.len());
            // SAFETY: live, not used afterwards.
            unsafe { b.deallocate(&a) }.unwrap();
        }
        if i % 1000 == 0 {
            assert_eq!(b.table().live(), live.len());
            assert_eq!(b.stats().allocation.current, live.len() as u64);
        }
    }
    for a in live.drain(..) {
        // SAFETY: live, not used afterwards.
        unsafe { b.deallocate(&a) }.unwrap();
    }
    let s = b.stats();
    assert_eq!(
        (
            s.allocated_bytes.current,
            s.active_bytes.current,
            s.allocation.current
        ),
        (0, 0, 0)
    );
    assert_eq!(b.table().live(), 0);
    assert_eq!(s.per_category.iter().map(|c| c.count).sum::<u64>(), 0);
}

#[test]
fn meta_forty_gigabytes_keeps_shape_without_rss() {
    let rss = || {
        std::fs::read_to_string("/proc/self/statm")
            .unwrap()
            .split(' ')
            .nth(1)
            .unwrap()
            .parse::<usize>()
            .unwrap()
            * 4096
    };
    let m = MetaBackend::new();
    let before = rss();
    let req = AllocRequest::tensor(&[100_000, 100_000], DType::F32).unwrap();
    assert_eq!(req.size, 40_000_000_000);
    let a = m.allocate(&req).unwrap();
    let rec = m
        .table()
        .get(tensorpool::meta::TensorKey {
            id: a.id(),
            slot: a.tag() as u32,
        })
        .unwrap();
    assert_eq!(rec.numel(), Some(10_000_000_000));
    assert_eq!(rec.dtype(), Some(DType::F32));
    assert_eq!(rec.leading_dims(), [100_000, 100_000]);
    let s = m.stats();
    assert!(s.reserved_bytes.current >= 40_000_000_000);
    assert!(
        rss() < before + (16 << 20),
        "RSS grew by {}",
        rss() - before
    );
    // SAFETY: no memory involved.
    unsafe { m.deallocate(&a) }.unwrap();
}

#[test]
fn meta_predicts_host_reserved_and_peak() {
    let h = HostBackend::new();
    let m = MetaBackend::new();
    let mut hl = Vec::new();
    let mut ml = Vec::new();
    let mut x = 99u64;
    for step in 0..4000 {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let r = x >> 33;
        if r % 5 < 3 || hl.is_empty() {
            let size = match r % 6 {
                0..=2 => 1 + (r as usize >> 3) % 4096,
                3 | 4 => 1 + (r as usize >> 3) % (2 << 20),
                _ => 1 + (r as usize >> 3) % (90 << 20),
            };
            let req = AllocRequest::new(size, 1 << (r % 9)).flags(if r.is_multiple_of(11) {
                TensorFlags::PINNED
            } else {
                0
            });
            hl.push(h.allocate(&req).unwrap());
            ml.push(m.allocate(&req).unwrap());
        } else {
            let i = (r as usize >> 5) % hl.len();
            // SAFETY: live allocations, not used afterwards.
            unsafe {
                h.deallocate(&hl.swap_remove(i)).unwrap();
                m.deallocate(&ml.swap_remove(i)).unwrap();
            }
        }
        let (hs, ms) = (h.stats(), m.stats());
        assert_eq!(hs.reserved_bytes, ms.reserved_bytes, "step {step}");
        assert_eq!(hs.allocated_bytes, ms.allocated_bytes);
        assert_eq!(hs.per_category, ms.per_category);
    }
}

#[test]
fn contract_v2_write_read_round_trip_and_bounds() {
    use std::sync::Arc;
    use tensorpool::backend::{HostBackend, MetaBackend};
    use tensorpool::{AllocError, AllocRequest, TensorAllocator, TensorBuf};
    let b = HostBackend::new();
    let a = b.allocate(&AllocRequest::bytes(1000)).unwrap();
    let src: Vec<u8> = (0..997u32).map(|i| (i * 7 + 3) as u8).collect();
    b.write(&a, 3, &src).unwrap();
    let mut back = vec![0u8; 997];
    b.read(&a, 3, &mut back).unwrap();
    assert_eq!(back, src);
    let e = b.write(&a, 4, &src).unwrap_err();
    assert!(
        matches!(
            e,
            AllocError::OutOfRange {
                offset: 4,
                len: 997,
                size: 1000,
                ..
            }
        ),
        "{e}"
    );
    let e = b.read(&a, usize::MAX, &mut back[..2]).unwrap_err();
    assert!(matches!(e, AllocError::OutOfRange { .. }), "{e}");
    // SAFETY: no view of `a` is held.
    unsafe { b.deallocate(&a).unwrap() };
    let e = b.read(&a, 0, &mut back[..1]).unwrap_err();
    assert!(matches!(e, AllocError::UnknownId { .. }), "{e}");
    let m = MetaBackend::new();
    let a = m.allocate(&AllocRequest::bytes(16)).unwrap();
    assert!(matches!(
        m.write(&a, 0, &[1]),
        Err(AllocError::Unsupported { .. })
    ));
    assert!(m.synchronize().is_ok());
    // Typed copies through the owning handle.
    let host: Arc<dyn TensorAllocator> = Arc::new(HostBackend::new());
    let t = TensorBuf::new(&host, &AllocRequest::bytes(64)).unwrap();
    let xs: Vec<f32> = (0..16).map(|i| i as f32 * 0.5).collect();
    t.write_from(&xs).unwrap();
    let mut ys = [0f32; 16];
    t.read_into(&mut ys).unwrap();
    assert_eq!(&ys[..], &xs[..]);
}
