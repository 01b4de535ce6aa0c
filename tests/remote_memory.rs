//! The remote backend's semantics on the in-process store.
//!
//! Properties checked:
//! - allocation and freeing of never-written tensors send no store command;
//!   ids are distinct across threads and increase within a thread;
//! - zero-size tensors are valid and keep their shape;
//! - a lazy read is `NotWritten` with no round trip;
//! - round trips are bit exact across chunk boundaries at odd offsets, with
//!   partial chunk writes merged (in the queue and onto stored bytes);
//! - N frees become one batched delete, sent by the timer with no later
//!   operation, and the store ends empty;
//! - a failed batch fails every waiter with the same error, the ids it
//!   covered report it on next use, and the backend recovers;
//! - every wait ends by its timeout; altered bytes are an integrity error;
//! - forged or mismatched allocations are typed errors and change nothing.
#![cfg(feature = "remote")]

mod remote_common;

use remote_common::{eventually, pattern};
use std::sync::Arc;
use std::time::Duration;
use tensorpool::backend::remote::{CHUNK, MemoryStore, RemoteBackend, RemoteConfig};
use tensorpool::{
    Addr, AllocError, AllocRequest, Allocation, DType, Device, TensorAllocator, TensorBuf,
};

type Mem = RemoteBackend<Arc<MemoryStore>>;

fn backend(cfg: RemoteConfig) -> (Arc<MemoryStore>, Mem) {
    let store = Arc::new(MemoryStore::new());
    let b = RemoteBackend::new(store.clone(), cfg).unwrap();
    (store, b)
}

#[test]
fn lazy_allocations_send_nothing_and_ids_are_distinct() {
    let (store, b) = backend(RemoteConfig::default());
    let before = store.counts();
    let b = Arc::new(b);
    let hs: Vec<_> = (0..8)
        .map(|_| {
            let b = b.clone();
            std::thread::spawn(move || {
                let v: Vec<Allocation> = (0..10_000)
                    .map(|_| b.allocate(&AllocRequest::bytes(4096)).unwrap())
                    .collect();
                let ids: Vec<u64> = v.iter().map(|a| a.id().get()).collect();
                assert!(ids.windows(2).all(|w| w[0] < w[1]), "increasing per thread");
                for a in &v {
                    // SAFETY: allocated above, freed once.
                    unsafe { b.deallocate(a).unwrap() };
                }
                ids
            })
        })
        .collect();
    let mut all: Vec<u64> = hs.into_iter().flat_map(|h| h.join().unwrap()).collect();
    all.sort_unstable();
    all.dedup();
    assert_eq!(all.len(), 80_000);
    b.synchronize().unwrap();
    assert_eq!(store.counts(), before, "no store command for lazy tensors");
    assert_eq!(b.stats().allocation.current, 0);
}

#[test]
fn zero_size_is_valid_and_keeps_its_shape() {
    let (store, b) = backend(RemoteConfig::default());
    let a = b
        .allocate(&AllocRequest::tensor(&[0, 2], DType::F32).unwrap())
        .unwrap();
    assert_eq!(a.size(), 0);
    assert_eq!(a.device(), Device::Remote(0));
    let (shape, dtype) = b.shape(&a).unwrap();
    assert_eq!(shape.unwrap().dims(), &[0, 2]);
    assert_eq!(dtype, Some(DType::F32));
    b.write(&a, 0, &[]).unwrap();
    b.read(&a, 0, &mut []).unwrap();
    assert!(matches!(
        b.write(&a, 0, &[1]),
        Err(AllocError::OutOfRange { .. })
    ));
    // SAFETY: allocated above, freed once.
    unsafe { b.deallocate(&a).unwrap() };
    b.synchronize().unwrap();
    assert!(store.is_empty());
}

#[test]
fn lazy_read_is_an_immediate_error() {
    let (store, b) = backend(RemoteConfig::default());
    let a = b.allocate(&AllocRequest::bytes(100)).unwrap();
    let before = store.counts();
    let mut buf = [0u8; 10];
    let e = b.read(&a, 5, &mut buf).unwrap_err();
    assert_eq!(
        e,
        AllocError::NotWritten {
            id: a.id().get(),
            offset: 5,
            end: 15
        }
    );
    assert_eq!(store.counts(), before, "no round trip");
    assert!(!b.is_realized(&a).unwrap());
    // A zeroed request starts realized: zeros, still no round trip.
    let z = b
        .allocate(&AllocRequest::bytes(3 * CHUNK).zeroed())
        .unwrap();
    let mut big = vec![1u8; 3 * CHUNK];
    b.read(&z, 0, &mut big).unwrap();
    assert!(big.iter().all(|&x| x == 0));
    assert_eq!(store.counts(), before);
}

#[test]
fn f32_50x50_round_trip_is_bit_exact() {
    let (_store, b) = backend(RemoteConfig::default());
    let b: Arc<dyn TensorAllocator> = Arc::new(b);
    let t = TensorBuf::new(&b, &AllocRequest::tensor(&[50, 50], DType::F32).unwrap()).unwrap();
    let src: Vec<f32> = (0..2500)
        .map(|i| match i {
            0 => f32::NAN,
            1 => f32::from_bits(0x7fc0_1234), // a NaN with a payload
            2 => -0.0,
            3 => f32::INFINITY,
            _ => (i as f32).sin() * 1e-3,
        })
        .collect();
    t.write_from(&src).unwrap();
    let mut out = vec![0f32; 2500];
    t.read_into(&mut out).unwrap();
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(&out), bits(&src));
}

#[test]
fn round_trips_across_chunk_boundaries_at_odd_offsets() {
    let (store, b) = backend(RemoteConfig::default());
    for (i, size) in [4096, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK + 5, 64 * CHUNK]
        .into_iter()
        .enumerate()
    {
        let a = b.allocate(&AllocRequest::bytes(size)).unwrap();
        let mut model = pattern(size, i as u64 + 1);
        b.write(&a, 0, &model).unwrap();
        // Overwrite a window at an odd offset straddling a chunk boundary
        // (or the middle of a small tensor), before and after a sync.
        let off = if size > CHUNK {
            CHUNK - 7
        } else {
            size / 3 + 1
        };
        let len = (size - off).min(CHUNK / 2 + 13);
        let win = pattern(len, 99 + i as u64);
        b.write(&a, off, &win).unwrap();
        model[off..off + len].copy_from_slice(&win);
        // Read-your-writes: no synchronize before this read.
        let mut got = vec![0u8; size];
        b.read(&a, 0, &mut got).unwrap();
        assert!(got == model, "size {size}: full read after queued writes");
        b.synchronize().unwrap();
        let off2 = (size / 2) | 1;
        let win2 = pattern(size - off2, 7 + i as u64);
        b.write(&a, off2, &win2).unwrap(); // merged onto stored bytes
        model[off2..].copy_from_slice(&win2);
        b.synchronize().unwrap();
        b.trim(); // read from the store, not the cache
        let (ro, rl) = (off | 1, (size - (off | 1)).min(2 * CHUNK + 3));
        let mut part = vec![0u8; rl];
        b.read(&a, ro, &mut part).unwrap();
        assert!(part == model[ro..ro + rl], "size {size}: odd-offset read");
        b.read(&a, 0, &mut got).unwrap();
        assert!(got == model, "size {size}: full read after merge");
        // SAFETY: allocated above, freed once.
        unsafe { b.deallocate(&a).unwrap() };
    }
    b.synchronize().unwrap();
    assert!(eventually(|| store.is_empty()), "{:?}", store.keys());
}

#[test]
fn partial_writes_merge_and_unwritten_bytes_read_as_zero() {
    let (_store, b) = backend(remote_common::slow_timer());
    let a = b.allocate(&AllocRequest::bytes(2 * CHUNK)).unwrap();
    // Two partial writes to one chunk in the same batch, one to a chunk
    // never stored: the rest of each chunk reads as zero.
    b.write(&a, 10, b"hello").unwrap();
    b.write(&a, 13, b"XYZW").unwrap();
    b.write(&a, CHUNK + 100, b"tail").unwrap();
    let mut got = vec![9u8; 2 * CHUNK];
    b.read(&a, 0, &mut got).unwrap();
    let mut model = vec![0u8; 2 * CHUNK];
    model[10..15].copy_from_slice(b"hello");
    model[13..17].copy_from_slice(b"XYZW");
    model[CHUNK + 100..CHUNK + 104].copy_from_slice(b"tail");
    assert!(got == model);
    // A partial write onto a stored chunk: read-modify-write at flush.
    b.write(&a, 11, b"__").unwrap();
    model[11..13].copy_from_slice(b"__");
    b.synchronize().unwrap();
    b.trim();
    b.read(&a, 0, &mut got).unwrap();
    assert!(got == model);
}

#[test]
fn frees_become_one_batched_delete_without_a_later_operation() {
    let (store, b) = backend(remote_common::slow_timer());
    let v: Vec<Allocation> = (0..100)
        .map(|i| {
            let a = b.allocate(&AllocRequest::bytes(1000 + i)).unwrap();
            b.write(&a, 0, &pattern(1000 + i, i as u64)).unwrap();
            a
        })
        .collect();
    b.synchronize().unwrap();
    assert_eq!(store.len(), 100);
    let before = store.counts();
    for a in &v {
        // SAFETY: allocated above, freed once.
        unsafe { b.deallocate(a).unwrap() };
    }
    // No synchronize, no other call: the timer sends the frees.
    assert!(eventually(|| store.is_empty()), "{} keys left", store.len());
    let after = store.counts();
    assert_eq!(after.deletes - before.deletes, 1, "one batched delete");
    assert_eq!(after.keys_deleted - before.keys_deleted, 100);
    assert_eq!(b.stats().reserved_bytes.current, 0);
}

#[test]
fn default_timer_sends_writes_without_a_call() {
    let (store, b) = backend(RemoteConfig::default());
    let a = b.allocate(&AllocRequest::bytes(64)).unwrap();
    b.write(&a, 0, &[7; 64]).unwrap();
    assert!(eventually(|| store.len() == 1));
    assert!(b.remote_stats().flushes[2] >= 1, "sent by the timer");
}

#[test]
fn small_writes_are_batched() {
    let (store, b) = backend(remote_common::slow_timer());
    let before = store.counts();
    let v: Vec<Allocation> = (0..500)
        .map(|_| b.allocate(&AllocRequest::bytes(256)).unwrap())
        .collect();
    for a in &v {
        b.write(a, 0, &[3; 256]).unwrap();
    }
    b.synchronize().unwrap();
    let d = store.counts().puts - before.puts;
    assert!((1..=5).contains(&d), "500 writes took {d} put commands");
    assert_eq!(store.len(), 500);
}

#[test]
fn a_failed_batch_fails_every_waiter_with_the_same_error() {
    let (store, b) = backend(remote_common::slow_timer());
    let b = Arc::new(b);
    let ts: Vec<Allocation> = (0..3)
        .map(|i| {
            let a = b.allocate(&AllocRequest::bytes(CHUNK + 10)).unwrap();
            a.check_range(0, 1).unwrap();
            let _ = i;
            a
        })
        .collect();
    let data: Vec<Vec<u8>> = (0..3).map(|i| pattern(CHUNK + 10, i)).collect();
    store.stall();
    for (a, d) in ts.iter().zip(&data) {
        b.write(a, 0, d).unwrap();
    }
    let waiters = remote_common::waiters(&b, ts[0], ts[1], CHUNK - 3, 12);
    assert!(
        eventually(|| store.stalled_calls() == 1),
        "flusher in flight"
    );
    let injected = AllocError::Backend {
        backend: "memory",
        op: "put",
        message: "injected failure".into(),
    };
    store.fail_next(1, injected.clone());
    store.release();
    for r in remote_common::join_all(waiters) {
        assert_eq!(r, Err(injected.clone()));
    }
    // The third tensor had no waiter: it reports the failure on next use.
    let mut buf = [0u8; 4];
    assert_eq!(b.read(&ts[2], 0, &mut buf), Err(injected.clone()));
    // Its bytes never reached the store: an integrity error, not zeros.
    assert!(matches!(
        b.read(&ts[2], 0, &mut buf),
        Err(AllocError::Integrity { .. })
    ));
    // Recovery: rewrite, synchronize, read back.
    for (i, a) in ts.iter().enumerate() {
        let p = pattern(CHUNK + 10, 50 + i as u64);
        // The first use may report the batch error once more; then it works.
        if b.write(a, 0, &p).is_err() {
            b.write(a, 0, &p).unwrap();
        }
        b.synchronize().unwrap();
        let mut got = vec![0u8; CHUNK + 10];
        b.read(a, 0, &mut got).unwrap();
        assert!(got == p);
    }
    assert_eq!(b.remote_stats().failed_batches, 1);
}

#[test]
fn failed_frees_are_reported_and_retried() {
    let (store, b) = backend(RemoteConfig::default());
    let a = b.allocate(&AllocRequest::bytes(10)).unwrap();
    b.write(&a, 0, &[1; 10]).unwrap();
    b.synchronize().unwrap();
    let injected = AllocError::Backend {
        backend: "memory",
        op: "delete",
        message: "injected".into(),
    };
    store.fail_next(1, injected.clone());
    // SAFETY: allocated above, freed once.
    unsafe { b.deallocate(&a).unwrap() };
    assert_eq!(b.synchronize(), Err(injected));
    assert!(eventually(|| store.is_empty()), "the delete is retried");
    b.synchronize().unwrap();
}

#[test]
fn waits_end_with_a_timeout() {
    let cfg = RemoteConfig {
        wait_timeout: Duration::from_millis(100),
        ..RemoteConfig::default()
    };
    let (store, b) = backend(cfg);
    let a = b.allocate(&AllocRequest::bytes(10)).unwrap();
    store.stall();
    b.write(&a, 0, &[1; 10]).unwrap();
    let mut buf = [0u8; 10];
    let e = b.read(&a, 0, &mut buf).unwrap_err();
    assert!(matches!(e, AllocError::Timeout { .. }), "{e}");
    assert!(matches!(b.synchronize(), Err(AllocError::Timeout { .. })));
    store.release();
    assert!(eventually(|| b.synchronize().is_ok()));
    b.read(&a, 0, &mut buf).unwrap();
    assert_eq!(buf, [1; 10]);
}

#[test]
fn altered_bytes_are_an_integrity_error() {
    let (store, b) = backend(RemoteConfig::default());
    let a = b.allocate(&AllocRequest::bytes(3000)).unwrap();
    b.write(&a, 0, &pattern(3000, 5)).unwrap();
    b.synchronize().unwrap();
    assert!(store.corrupt(&b.chunk_key(&a, 0), 100));
    let mut buf = vec![0u8; 3000];
    let e = b.read(&a, 0, &mut buf).unwrap_err();
    assert!(matches!(e, AllocError::Integrity { .. }), "{e}");
    assert!(e.to_string().contains("crc32c"), "{e}");
}

#[test]
fn reads_use_the_cache_until_a_write() {
    let (store, b) = backend(RemoteConfig::default());
    let a = b.allocate(&AllocRequest::bytes(2 * CHUNK)).unwrap();
    b.write(&a, 0, &pattern(2 * CHUNK, 1)).unwrap();
    let mut buf = vec![0u8; 100];
    b.read(&a, CHUNK + 5, &mut buf).unwrap();
    let gets = store.counts().chunks_got;
    assert_eq!(gets, 1, "only the chunk the read needs");
    b.read(&a, CHUNK + 5, &mut buf).unwrap();
    assert_eq!(
        store.counts().chunks_got,
        gets,
        "second read from the cache"
    );
    assert!(b.remote_stats().cache_hits >= 1);
    b.write(&a, CHUNK + 5, &[0xAB; 100]).unwrap();
    b.read(&a, CHUNK + 5, &mut buf).unwrap();
    assert_eq!(buf, vec![0xAB; 100], "a write invalidates the cache");
    assert!(b.trim() > 0);
}

#[test]
fn forged_and_foreign_allocations_are_typed_errors() {
    let (_store, b) = backend(RemoteConfig::default());
    let (_s2, other) = backend(RemoteConfig {
        node: 1,
        ..RemoteConfig::default()
    });
    let a = b.allocate(&AllocRequest::bytes(100).align(128)).unwrap();
    b.write(&a, 0, &[5; 100]).unwrap();
    let stats = b.stats();
    let forge =
        |addr, size, align, device, tag| Allocation::new(a.id(), addr, size, align, device, tag);
    let id = a.id().get();
    let ns = b.namespace();
    let cases = [
        forge(Addr::Remote(id), 101, 128, Device::Remote(0), ns),
        forge(Addr::Remote(id), 100, 64, Device::Remote(0), ns),
        forge(Addr::Remote(id + 1), 100, 128, Device::Remote(0), ns),
        forge(Addr::Remote(id), 100, 128, Device::Remote(0), ns ^ 1),
    ];
    for f in &cases {
        let mut buf = [0u8; 1];
        assert!(matches!(
            b.read(f, 0, &mut buf),
            Err(AllocError::Mismatch { .. })
        ));
        assert!(matches!(
            b.write(f, 0, &[1]),
            Err(AllocError::Mismatch { .. })
        ));
        // SAFETY: a forged handle; the backend must refuse it.
        let r = unsafe { b.deallocate(f) };
        assert!(matches!(r, Err(AllocError::Mismatch { .. })));
    }
    let wrong = forge(Addr::Remote(id), 100, 128, Device::Remote(1), ns);
    assert!(matches!(
        b.write(&wrong, 0, &[1]),
        Err(AllocError::WrongDevice { .. })
    ));
    // SAFETY: `a` belongs to `b`; `other` must refuse it.
    let r = unsafe { other.deallocate(&a) };
    assert!(matches!(r, Err(AllocError::WrongDevice { .. })));
    assert_eq!(b.stats(), stats, "nothing changed");
    let mut buf = [0u8; 100];
    b.read(&a, 0, &mut buf).unwrap();
    assert_eq!(buf, [5; 100]);
    assert!(matches!(
        b.read(&a, 1, &mut buf),
        Err(AllocError::OutOfRange { .. })
    ));
    // SAFETY: allocated above; the second free must be refused.
    unsafe {
        b.deallocate(&a).unwrap();
        assert!(matches!(
            b.deallocate(&a),
            Err(AllocError::UnknownId { .. })
        ));
    }
}

#[test]
fn config_is_validated() {
    let bad = RemoteConfig {
        flush_interval: Duration::ZERO,
        ..RemoteConfig::default()
    };
    assert!(matches!(
        RemoteBackend::new(MemoryStore::new(), bad),
        Err(AllocError::Unsupported { .. })
    ));
    let b = RemoteBackend::in_memory().unwrap();
    assert!(b.allocate(&AllocRequest::new(8, 3)).is_err());
}

#[test]
fn read_many_is_one_store_round_trip() {
    let (store, b) = backend(RemoteConfig::default());
    let ts: Vec<Allocation> = (0..20)
        .map(|i| {
            let a = b.allocate(&AllocRequest::bytes(CHUNK + 100)).unwrap();
            b.write(&a, 0, &pattern(CHUNK + 100, i)).unwrap();
            a
        })
        .collect();
    b.synchronize().unwrap();
    b.trim();
    let before = store.counts().gets;
    let mut bufs = vec![vec![0u8; 150]; ts.len()];
    let mut reads: Vec<(Allocation, usize, &mut [u8])> = ts
        .iter()
        .zip(bufs.iter_mut())
        .map(|(a, buf)| (*a, CHUNK - 50, &mut buf[..]))
        .collect();
    b.read_many(&mut reads).unwrap();
    assert_eq!(store.counts().gets - before, 1, "one get for 40 chunks");
    for (i, buf) in bufs.iter().enumerate() {
        assert!(buf[..] == pattern(CHUNK + 100, i as u64)[CHUNK - 50..CHUNK + 100]);
    }
    // A lazy tensor among them: NotWritten, nothing fetched.
    let lazy = b.allocate(&AllocRequest::bytes(10)).unwrap();
    let (mut x, mut y) = ([0u8; 4], [0u8; 4]);
    let gets = store.counts().gets;
    let r = b.read_many(&mut [(ts[0], 0, &mut x[..]), (lazy, 0, &mut y[..])]);
    assert!(matches!(r, Err(AllocError::NotWritten { .. })), "{r:?}");
    assert_eq!(store.counts().gets, gets);
}

#[test]
fn a_chunk_lost_in_the_store_fails_only_its_tensor() {
    use tensorpool::backend::remote::RemoteStore;
    let (store, b) = backend(remote_common::slow_timer());
    let (a, other) = (
        b.allocate(&AllocRequest::bytes(100)).unwrap(),
        b.allocate(&AllocRequest::bytes(100)).unwrap(),
    );
    b.write(&a, 0, &[1; 100]).unwrap();
    b.synchronize().unwrap();
    store.delete(&[b.chunk_key(&a, 0)]).unwrap(); // lost outside tensorpool
    // In one batch: a partial write of `a` (needs its stored chunk) and a
    // write of `other`.
    b.write(&a, 10, &[2; 5]).unwrap();
    b.write(&other, 0, &[3; 100]).unwrap();
    b.synchronize().unwrap();
    let mut buf = [0u8; 100];
    b.read(&other, 0, &mut buf).unwrap();
    assert_eq!(buf, [3; 100]);
    let e = b.read(&a, 0, &mut buf).unwrap_err();
    assert!(matches!(e, AllocError::Integrity { .. }), "{e}");
    assert!(e.to_string().contains("missing"), "{e}");
}

#[test]
fn drop_sends_what_is_queued() {
    let store = Arc::new(MemoryStore::new());
    let b = RemoteBackend::new(store.clone(), remote_common::slow_timer()).unwrap();
    let a = b.allocate(&AllocRequest::bytes(10)).unwrap();
    b.write(&a, 0, &[9; 10]).unwrap();
    assert!(store.is_empty(), "still queued (1 s timer)");
    drop(b);
    assert_eq!(store.len(), 1, "the drop flushed the write");
    assert!(store.counts().puts >= 1);
}
