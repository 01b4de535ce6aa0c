//! Every free and every access is checked against what the backend
//! recorded, and the record keeps what later layers need:
//!
//! - a forged allocation (other alignment, pointer shifted by 64 B, other
//!   address kind, other device, other size) is refused by `deallocate`,
//!   `write` and `read` of the host and meta backends with an error naming
//!   the given and the recorded value; stats, table and bytes are unchanged,
//!   and later allocations are correct (issue 7, item 1);
//! - a tensor's whole shape, dtype and strides come back from its
//!   `Allocation` (a 1-D [10^10] tensor, rank 8 with a dimension above
//!   `u32::MAX`), and a freed allocation has no metadata (item 16);
//! - a full metadata table is an error, never a panic (item 13);
//! - `Limited` counts rounded bytes, checks the layout first and never
//!   overflows near `usize::MAX` (item 10).

use core::ptr::NonNull;
use tensorpool::backend::{HostBackend, MetaBackend};
use tensorpool::host::HostPool;
use tensorpool::meta::{AddrKind, MetaTable, NewTensor, TensorKey, next_id};
use tensorpool::{
    Addr, AllocError, AllocRequest, Allocation, DType, Device, LayoutProblem, Limited,
    TensorAllocator,
};

/// A forgery: what it is, the allocation, and whether an error is the right one.
type Case = (&'static str, Allocation, Box<dyn Fn(&AllocError) -> bool>);

/// `a` with some fields replaced.
fn forge(a: &Allocation, addr: Addr, size: usize, align: usize, device: Device) -> Allocation {
    Allocation::new(a.id(), addr, size, align, device, a.tag())
}

/// Checks that every forgery of `a` is refused by free, write and read with
/// `expect`'s error, and that nothing changed.
fn refuse_forgeries(b: &dyn TensorAllocator, a: &Allocation, table_live: &dyn Fn() -> usize) {
    let dev = b.device();
    let shifted = match a.addr() {
        Addr::Host(p) => Addr::Host(NonNull::new(p.as_ptr().wrapping_add(64)).unwrap()),
        _ => Addr::Host(NonNull::new(64 as *mut u8).unwrap()),
    };
    let raw = match a.addr() {
        Addr::Host(p) => p.as_ptr() as u64,
        _ => 0,
    };
    let cases: Vec<Case> = vec![
        (
            "align 4096",
            forge(a, a.addr(), a.size(), 4096, dev),
            Box::new(|e| {
                matches!(
                    e,
                    AllocError::LayoutMismatch {
                        align: 4096,
                        recorded_align: 8,
                        recorded_size: 100,
                        ..
                    }
                )
            }),
        ),
        (
            "size 101",
            forge(a, a.addr(), 101, a.align(), dev),
            Box::new(|e| {
                matches!(
                    e,
                    AllocError::LayoutMismatch {
                        size: 101,
                        recorded_size: 100,
                        recorded_align: 8,
                        ..
                    }
                )
            }),
        ),
        (
            "pointer + 64",
            forge(a, shifted, a.size(), a.align(), dev),
            Box::new(move |e| match (dev, e) {
                (
                    Device::Host,
                    AllocError::Mismatch {
                        field: "address",
                        given,
                        recorded,
                        ..
                    },
                ) => *given == raw + 64 && *recorded == raw,
                (
                    Device::Meta,
                    AllocError::Mismatch {
                        field: "address kind",
                        given,
                        recorded,
                        ..
                    },
                ) => *given == AddrKind::Host as u64 && *recorded == AddrKind::None as u64,
                _ => false,
            }),
        ),
        (
            "device address",
            forge(a, Addr::Device(raw), a.size(), a.align(), dev),
            Box::new(|e| {
                matches!(
                    e,
                    AllocError::Mismatch {
                        field: "address kind",
                        given: 2,
                        ..
                    }
                )
            }),
        ),
        (
            "other device",
            forge(a, a.addr(), a.size(), a.align(), Device::Cuda(0)),
            Box::new(
                move |e| matches!(e, AllocError::WrongDevice { expected, found: Device::Cuda(0), .. } if *expected == dev),
            ),
        ),
    ];
    for (what, f, ok) in &cases {
        let before = (b.stats(), table_live());
        // SAFETY: refused before anything is freed (checked below).
        let e = unsafe { b.deallocate(f) }.expect_err(what);
        assert!(ok(&e), "{what}: deallocate gave {e:?}");
        assert!(e.to_string().contains(&a.id().get().to_string()), "{e}");
        assert_eq!(
            (b.stats(), table_live()),
            before,
            "{what}: free changed state"
        );
        if dev == Device::Host {
            let e = b.write(f, 0, &[0xEE; 8]).expect_err(what);
            assert!(ok(&e), "{what}: write gave {e:?}");
            let mut buf = [0u8; 8];
            let e = b.read(f, 0, &mut buf).expect_err(what);
            assert!(ok(&e), "{what}: read gave {e:?}");
        }
        assert_eq!(
            (b.stats(), table_live()),
            before,
            "{what}: access changed state"
        );
    }
}

#[test]
fn host_forged_allocations_are_refused_and_change_nothing() {
    let b = HostBackend::new();
    let a = b.allocate(&AllocRequest::new(100, 8)).unwrap();
    b.write(&a, 0, &[0x5A; 100]).unwrap();
    refuse_forgeries(&b, &a, &|| b.table().live());
    // No forged write landed; the block is intact and still `a`'s.
    let mut got = [0u8; 100];
    b.read(&a, 0, &mut got).unwrap();
    assert!(got.iter().all(|&x| x == 0x5A));
    // Later allocations are right: 4096-aligned 4 KiB blocks are 4 KiB
    // blocks at 4096, none overlapping `a` or each other (the forged-align
    // free used to put `a`'s 112-byte block on the 4 KiB list).
    let big: Vec<Allocation> = (0..64)
        .map(|i| {
            let x = b.allocate(&AllocRequest::new(4096, 4096)).unwrap();
            let p = x.host_ptr().unwrap().as_ptr() as usize;
            assert_eq!(p % 4096, 0);
            assert!(b.pool().usable_size(p as *const u8).unwrap() >= 4096);
            b.write(&x, 0, &[i as u8; 4096]).unwrap();
            x
        })
        .collect();
    b.read(&a, 0, &mut got).unwrap();
    assert!(got.iter().all(|&x| x == 0x5A), "a 4 KiB block overlaps `a`");
    for (i, x) in big.iter().enumerate() {
        let mut buf = vec![0u8; 4096];
        b.read(x, 0, &mut buf).unwrap();
        assert!(
            buf.iter().all(|&v| v == i as u8),
            "block {i} overlaps another"
        );
    }
    // SAFETY: all live, not used afterwards.
    unsafe {
        b.deallocate(&a).unwrap();
        for x in &big {
            b.deallocate(x).unwrap();
        }
    }
    let s = b.stats();
    assert_eq!((s.active_bytes.current, s.allocation.current), (0, 0));
    assert_eq!(b.table().live(), 0);
}

#[test]
fn meta_forged_allocations_are_refused_and_change_nothing() {
    let b = MetaBackend::new();
    let a = b.allocate(&AllocRequest::new(100, 8)).unwrap();
    refuse_forgeries(&b, &a, &|| b.table().live());
    // SAFETY: live; no bytes involved.
    unsafe { b.deallocate(&a) }.unwrap();
    assert_eq!(b.stats().active_bytes.current, 0);
}

#[test]
fn whole_shape_dtype_and_strides_come_back_from_the_allocation() {
    let m = MetaBackend::new();
    // 1-D [10^10]: the hot record saturates dimensions at u32::MAX.
    let a = m
        .allocate(&AllocRequest::tensor(&[10_000_000_000], DType::U8).unwrap())
        .unwrap();
    let i = m.meta(&a).unwrap();
    assert_eq!(i.shape().unwrap().dims(), &[10_000_000_000]);
    assert_eq!(i.dtype(), Some(DType::U8));
    assert_eq!(i.strides().unwrap(), vec![1]);
    assert_eq!(
        (i.size(), i.align(), i.device()),
        (10_000_000_000, 64, Device::Meta)
    );
    assert_eq!(i.record().leading_dims(), [u32::MAX, 0]);
    // Rank 8, one dimension above u32::MAX.
    let dims = [2, 3, 5, 7, 1, 1, 3, (1 << 32) + 5];
    let b = m
        .allocate(&AllocRequest::tensor(&dims, DType::BF16).unwrap())
        .unwrap();
    let i = m.meta(&b).unwrap();
    let want: Vec<u64> = dims.iter().map(|&d| d as u64).collect();
    assert_eq!(i.shape().unwrap().dims(), &want[..]);
    let d = (1u64 << 32) + 5;
    assert_eq!(
        i.strides().unwrap(),
        vec![315 * d, 105 * d, 21 * d, 3 * d, 3 * d, 3 * d, d, 1]
    );
    assert_eq!(i.dtype(), Some(DType::BF16));
    // The same through the table, by the allocation's key.
    let k = TensorKey::of(&b).unwrap();
    assert_eq!(m.table().info(k).unwrap(), i);
    // SAFETY: live; no bytes involved.
    unsafe {
        m.deallocate(&a).unwrap();
        m.deallocate(&b).unwrap();
    }
    assert!(matches!(m.meta(&a), Err(AllocError::UnknownId { .. })));
    assert!(m.table().info(k).is_none());

    // The host backend: address, alignment, shape; none left after free.
    let h = HostBackend::new();
    let mut req = AllocRequest::tensor(&[3, 4, 5], DType::F32).unwrap();
    req.align = 256;
    let x = h.allocate(&req).unwrap();
    let i = h.meta(&x).unwrap();
    assert_eq!(i.address(), x.host_ptr().unwrap().as_ptr() as u64);
    assert_eq!(
        (i.addr_kind(), i.align(), i.size()),
        (AddrKind::Host, 256, 240)
    );
    assert_eq!(i.shape().unwrap().dims(), &[3, 4, 5]);
    assert_eq!(i.strides().unwrap(), vec![20, 5, 1]);
    // A shapeless request has no shape, and a reused slot shows none of
    // the previous tenant's dimensions.
    // SAFETY: live, not used afterwards.
    unsafe { h.deallocate(&x) }.unwrap();
    assert!(h.meta(&x).is_err());
    let y = h.allocate(&AllocRequest::bytes(64)).unwrap();
    let i = h.meta(&y).unwrap();
    assert_eq!((i.shape(), i.dtype(), i.strides()), (None, None, None));
    let z = h
        .allocate(&AllocRequest::tensor(&[7], DType::U8).unwrap())
        .unwrap();
    assert_eq!(h.meta(&z).unwrap().shape().unwrap().dims(), &[7]);
    // SAFETY: live, not used afterwards.
    unsafe {
        h.deallocate(&y).unwrap();
        h.deallocate(&z).unwrap();
    }
}

#[test]
fn a_full_table_is_an_error_and_frees_make_room() {
    let t = MetaTable::with_max_slots(3);
    let keys: Vec<TensorKey> = (0..3)
        .map(|_| {
            t.insert(next_id().unwrap(), &NewTensor::bytes(64, Device::Host))
                .unwrap()
        })
        .collect();
    let e = t
        .insert(next_id().unwrap(), &NewTensor::bytes(64, Device::Host))
        .unwrap_err();
    assert!(
        matches!(
            e,
            AllocError::TableFull {
                live: 3,
                capacity: 3
            }
        ),
        "{e}"
    );
    assert!(e.is_retryable());
    assert!(e.to_string().contains("capacity 3"), "{e}");
    assert_eq!(t.live(), 3);
    t.check_invariants();
    t.remove(keys[1]).unwrap();
    // No reader is pinned, so the freed slot is reusable at once.
    let k = t
        .insert(next_id().unwrap(), &NewTensor::bytes(64, Device::Host))
        .unwrap();
    assert_eq!(k.slot, keys[1].slot);
    t.check_invariants();
}

fn rounded(size: usize) -> usize {
    HostPool::rounded_size(core::alloc::Layout::from_size_align(size, 64).unwrap()).unwrap()
}

#[test]
fn limited_counts_rounded_bytes_and_checks_the_layout_first() {
    assert_ne!(rounded(100), 100, "the test needs a size that rounds");
    let b = Limited::new(HostBackend::new(), 1 << 20);
    let a = b.allocate(&AllocRequest::bytes(100)).unwrap();
    assert_eq!(b.used(), rounded(100));
    assert_eq!(b.used() as u64, b.inner().stats().active_bytes.current);
    // Fill to the limit: never more active bytes than the limit.
    let mut live = vec![a];
    let e = loop {
        match b.allocate(&AllocRequest::bytes(3000)) {
            Ok(x) => live.push(x),
            Err(e) => break e,
        }
        assert!(b.inner().stats().active_bytes.current <= 1 << 20);
    };
    match e {
        AllocError::LimitExceeded {
            requested,
            allocated,
            ..
        } => {
            assert_eq!(requested, rounded(3000));
            assert_eq!(allocated, b.used());
            assert!(allocated + requested > 1 << 20);
        }
        e => panic!("{e}"),
    }
    // A size that cannot be rounded is an invalid layout, not "never fits".
    let e = b
        .allocate(&AllocRequest::bytes(usize::MAX - 10))
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
    for x in &live {
        // SAFETY: live, not used afterwards.
        unsafe { b.deallocate(x) }.unwrap();
    }
    assert_eq!(b.used(), 0);
}

#[test]
fn limited_near_usize_max_does_not_overflow() {
    let b = Limited::new(HostBackend::new(), usize::MAX);
    let a = b.allocate(&AllocRequest::bytes(64)).unwrap();
    for size in [
        usize::MAX,
        usize::MAX - 10,
        usize::MAX - 64,
        isize::MAX as usize,
    ] {
        let e = b.allocate(&AllocRequest::bytes(size)).unwrap_err();
        assert!(
            matches!(e, AllocError::InvalidLayout { .. }),
            "size {size}: {e}"
        );
    }
    assert_eq!(b.used(), rounded(64));
    // Through the meta backend, which accepts sizes the host could not map:
    // a limit near usize::MAX still refuses cleanly when full.
    let m = Limited::new(MetaBackend::new(), usize::MAX - 4096);
    let big = (1usize << 62) - 4096;
    let x = m.allocate(&AllocRequest::bytes(big)).unwrap();
    let y = m.allocate(&AllocRequest::bytes(big)).unwrap();
    let z = m.allocate(&AllocRequest::bytes(big)).unwrap();
    let e = m.allocate(&AllocRequest::bytes(big)).unwrap_err();
    assert!(matches!(e, AllocError::LimitExceeded { .. }), "{e}");
    // SAFETY: all live, not used afterwards.
    unsafe {
        b.deallocate(&a).unwrap();
        for v in [&x, &y, &z] {
            m.deallocate(v).unwrap();
        }
    }
    assert_eq!((b.used(), m.used()), (0, 0));
}
