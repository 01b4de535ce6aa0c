//! `Traced` and `replay`:
//! - `Traced` records exactly what was done through it (op, id, size,
//!   alignment, stream, thread), from several threads, across buffer drains;
//!   failed calls are not recorded;
//! - replay of a trace naming a free of an unknown pointer, or an alloc of a
//!   live one, is a typed error with the record index;
//! - replay invariants on the committed real traces (candle, Python) and on
//!   a recorded one, on the host and meta backends and on `System` through
//!   `GlobalAllocBackend`: no failure, peak allocated equals the trace's own
//!   peak live bytes, the meta backend's predicted peak reserved equals the
//!   host backend's; and on the CUDA pool (simulated driver) beside its
//!   meta model (`MetaBackend::cuda_policy`), whose peak reserved is equal.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use tensorpool::adapt::{
    GlobalAllocBackend, ReplayError, ReplayPlan, Trace, TraceOp, TraceRecord, Traced, replay,
};
use tensorpool::backend::{HostBackend, MetaBackend};
use tensorpool::{AllocError, AllocRequest, TensorAllocator};

fn tmp(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("tp-trace-replay-{}-{name}", std::process::id()))
}

fn rec(op: TraceOp, id: u64, size: u64) -> TraceRecord {
    TraceRecord {
        op,
        id,
        size,
        align_log2: 6,
        stream: 0,
        time_ns: 0,
        thread: 1,
    }
}

#[test]
fn traced_records_exactly_what_was_done() {
    let path = tmp("exact.tpt");
    // A tiny buffer, so that records go through several drains.
    let t = Traced::with_capacity(HostBackend::new(), &path, 8).unwrap();
    let mut expect = Vec::new();
    let mut live = Vec::new();
    for i in 0..50usize {
        let req = AllocRequest::new(100 + i * 13, 1 << (i % 8)).stream(i as u64 % 3);
        let a = t.allocate(&req).unwrap();
        expect.push((
            TraceOp::Alloc,
            a.id().get(),
            req.size as u64,
            a.align(),
            (i % 3) as u16 + 1,
        ));
        live.push(a);
        if i % 3 == 2 {
            let a = live.remove(0);
            // SAFETY: `a` is not used afterwards.
            unsafe { t.deallocate(&a).unwrap() };
            expect.push((TraceOp::Free, a.id().get(), a.size() as u64, a.align(), 0));
        }
    }
    // A failed free (double free) and a failed allocation are not recorded.
    let gone = {
        let a = t.allocate(&AllocRequest::bytes(64)).unwrap();
        // SAFETY: not used afterwards.
        unsafe { t.deallocate(&a).unwrap() };
        expect.push((TraceOp::Alloc, a.id().get(), 64, a.align(), 0));
        expect.push((TraceOp::Free, a.id().get(), a.size() as u64, a.align(), 0));
        a
    };
    // SAFETY: a double free must be refused, touching nothing.
    assert!(unsafe { t.deallocate(&gone) }.is_err());
    assert!(t.allocate(&AllocRequest::new(64, 3)).is_err());
    for a in live.drain(..) {
        // SAFETY: not used afterwards.
        unsafe { t.deallocate(&a).unwrap() };
        expect.push((TraceOp::Free, a.id().get(), a.size() as u64, a.align(), 0));
    }
    t.flush().unwrap();
    assert!(t.written() as usize == expect.len());
    let trace = Trace::read(&path).unwrap();
    let got: Vec<_> = trace
        .records
        .iter()
        .map(|r| (r.op, r.id, r.size, r.align(), r.stream))
        .collect();
    assert_eq!(got, expect);
    let me = trace.records[0].thread;
    assert!(me != 0 && trace.records.iter().all(|r| r.thread == me));
    drop(t);
    std::fs::remove_file(&path).unwrap();
}

#[test]
fn traced_from_threads_loses_nothing() {
    let path = tmp("threads.tpt");
    let t = Traced::with_capacity(HostBackend::new(), &path, 64).unwrap();
    let per = 2_000usize;
    let ids: Vec<Vec<u64>> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..4)
            .map(|k| {
                let t = &t;
                s.spawn(move || {
                    let mut ids = Vec::new();
                    for i in 0..per {
                        let a = t.allocate(&AllocRequest::bytes(8 + (i + k) % 500)).unwrap();
                        ids.push(a.id().get());
                        // SAFETY: not used afterwards.
                        unsafe { t.deallocate(&a).unwrap() };
                    }
                    ids
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    drop(t); // flushes
    let trace = Trace::read(&path).unwrap();
    assert_eq!(trace.len(), 4 * per * 2);
    // Each thread's records are in its program order: alloc then free of
    // each id, ids in the order that thread got them.
    let mut by_thread: HashMap<u32, Vec<&TraceRecord>> = HashMap::new();
    for r in &trace.records {
        by_thread.entry(r.thread).or_default().push(r);
    }
    assert_eq!(by_thread.len(), 4);
    let mut seen: Vec<Vec<u64>> = by_thread
        .values()
        .map(|rs| {
            rs.chunks(2)
                .map(|p| {
                    assert_eq!((p[0].op, p[1].op), (TraceOp::Alloc, TraceOp::Free));
                    assert_eq!(p[0].id, p[1].id);
                    p[0].id
                })
                .collect()
        })
        .collect();
    let mut want = ids;
    seen.sort();
    want.sort();
    assert_eq!(seen, want);
    let report = replay(&trace, &HostBackend::new()).unwrap();
    assert_eq!(report.failures, 0);
    std::fs::remove_file(&path).unwrap();
}

#[test]
fn free_of_unknown_pointer_is_an_error_with_the_index() {
    let trace = Trace {
        records: vec![
            rec(TraceOp::Alloc, 1, 100),
            rec(TraceOp::Free, 1, 0),
            rec(TraceOp::Alloc, 2, 100),
            rec(TraceOp::Free, 1, 0), // double free
        ],
    };
    let e = replay(&trace, &HostBackend::new()).unwrap_err();
    assert_eq!(e, ReplayError::UnknownFree { index: 3, id: 1 });
    assert!(e.to_string().contains("record 3"), "{e}");
    assert!(matches!(AllocError::from(e), AllocError::Integrity { .. }));
    let never = Trace {
        records: vec![rec(TraceOp::Free, 0xdead, 8)],
    };
    assert_eq!(
        ReplayPlan::new(&never).unwrap_err(),
        ReplayError::UnknownFree {
            index: 0,
            id: 0xdead
        }
    );
    let dup = Trace {
        records: vec![
            rec(TraceOp::Alloc, 5, 1),
            rec(TraceOp::Alloc, 6, 1),
            rec(TraceOp::Alloc, 5, 1),
        ],
    };
    assert_eq!(
        replay(&dup, &MetaBackend::new()).unwrap_err(),
        ReplayError::DuplicateAlloc {
            index: 2,
            id: 5,
            first: 0
        }
    );
}

#[test]
fn allocation_failures_are_counted_not_fatal() {
    let trace = Trace {
        records: vec![
            rec(TraceOp::Alloc, 1, 100),
            rec(TraceOp::Alloc, 2, 10_000),
            rec(TraceOp::Free, 2, 0),
            rec(TraceOp::Free, 1, 0),
        ],
    };
    let limited = tensorpool::Limited::new(HostBackend::new(), 1000);
    let r = replay(&trace, &limited).unwrap();
    assert_eq!(r.failures, 1);
    assert_eq!(r.ops, 2);
    assert_eq!(r.first_failure.as_ref().map(|f| f.0), Some(1));
    assert_eq!(limited.used(), 0, "replay frees what it allocated");
}

/// Replays `plan` on `backend` (called `b`): no failure, every op done,
/// peak allocated equal to the trace's peak live bytes, all freed after.
/// The backend's peak reserved.
fn replay_checked(name: &str, plan: &ReplayPlan, b: &str, backend: &dyn TensorAllocator) -> u64 {
    let r = plan.run(backend);
    assert_eq!(r.failures, 0, "{name} on {b}: {:?}", r.first_failure);
    assert_eq!(r.ops as usize, plan.len(), "{name} on {b}");
    assert_eq!(
        r.peak_allocated,
        plan.peak_live_bytes(),
        "{name} on {b}: peak allocated"
    );
    assert_eq!(
        backend.stats().allocated_bytes.current,
        0,
        "{name} on {b}: all freed"
    );
    r.peak_reserved
}

/// Checks the replay invariants of one trace on every backend here.
fn check_invariants(name: &str, trace: &Trace) {
    let plan = ReplayPlan::new(trace).unwrap_or_else(|e| panic!("{name}: {e}"));
    let peak = trace.peak_live_bytes();
    assert_eq!(plan.peak_live_bytes(), peak);
    assert!(peak > 0, "{name}: empty trace");
    let host = HostBackend::new();
    let meta = MetaBackend::new();
    let system = GlobalAllocBackend::new(std::alloc::System, None, 0);
    let backends: [(&str, &dyn TensorAllocator); 3] =
        [("host", &host), ("meta", &meta), ("system", &system)];
    let mut reserved = HashMap::new();
    for (b, backend) in backends {
        reserved.insert(b, replay_checked(name, &plan, b, backend));
    }
    assert!(
        reserved["host"] >= peak,
        "{name}: host reserved {} < live {peak}",
        reserved["host"]
    );
    assert_eq!(
        reserved["meta"], reserved["host"],
        "{name}: the meta backend's predicted peak reserved must equal the host backend's"
    );
}

/// The committed traces (gzip-compressed trace files).
pub fn committed(name: &str) -> Trace {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data")
        .join(name);
    let gz = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut bytes = Vec::new();
    std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(&gz[..]), &mut bytes)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    Trace::from_bytes(&bytes, &path).unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn replay_invariants_on_a_recorded_trace() {
    let path = tmp("recorded.tpt");
    let t = Traced::create(HostBackend::new(), &path).unwrap();
    let mut live = Vec::new();
    let mut x = 12345u64;
    for _ in 0..5_000 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        if live.len() < 200 && !x.is_multiple_of(3) {
            let size = [24, 1000, 4096, 70_000, 300_000, 3 << 20][(x >> 8) as usize % 6];
            live.push(t.allocate(&AllocRequest::bytes(size)).unwrap());
        } else if !live.is_empty() {
            let a = live.swap_remove((x >> 16) as usize % live.len());
            // SAFETY: not used afterwards.
            unsafe { t.deallocate(&a).unwrap() };
        }
    }
    t.flush().unwrap();
    check_invariants("recorded", &Trace::read(&path).unwrap());
    drop(t);
    std::fs::remove_file(&path).unwrap();
}

#[test]
fn replay_invariants_on_the_python_trace() {
    check_invariants("python", &committed("python.tpt.gz"));
}

#[test]
fn replay_invariants_on_the_python_malloc_trace() {
    check_invariants("python-malloc", &committed("python-malloc.tpt.gz"));
}

#[test]
fn replay_invariants_on_the_candle_trace() {
    check_invariants("candle", &committed("candle.tpt.gz"));
}

/// `Traced` is a backend like any other: the conformance kit passes through
/// it (it forwards everything), and what it recorded replays cleanly.
#[test]
fn traced_passes_the_conformance_kit() {
    let path = tmp("kit.tpt");
    let t = Traced::create(HostBackend::new(), &path).unwrap();
    tensorpool::testkit::check(&t, tensorpool::testkit::Caps::host());
    t.flush().unwrap();
    let trace = Trace::read(&path).unwrap();
    assert!(trace.len() > 10_000, "{} records", trace.len());
    let r = replay(&trace, &MetaBackend::new()).unwrap();
    assert_eq!(r.failures, 0);
    drop(t);
    std::fs::remove_file(&path).unwrap();
}

/// The committed traces on the CUDA pool (simulated driver) and on the
/// meta backend under the pool's policy: no failure, peak allocated equals
/// the trace's own peak live bytes, the prediction's peak reserved equals
/// the pool's, the pool's equals the driver's peak outstanding, and the
/// pool's invariants hold after every block is freed.
#[cfg(feature = "cuda")]
#[test]
fn committed_traces_on_the_cuda_pool_and_its_meta_model() {
    use tensorpool::backend::cuda::{CudaBackend, CudaConfig, SimDriver};
    const CAPACITY: usize = 80 << 30;
    for name in ["candle.tpt.gz", "python.tpt.gz", "python-malloc.tpt.gz"] {
        let trace = committed(name);
        let plan = ReplayPlan::new(&trace).unwrap_or_else(|e| panic!("{name}: {e}"));
        let peak = trace.peak_live_bytes();
        assert!(peak > 0 && plan.peak_live_bytes() == peak, "{name}");
        let pool =
            CudaBackend::with_driver(SimDriver::new(CAPACITY), CudaConfig::default()).unwrap();
        let model = MetaBackend::cuda_policy(CAPACITY, CudaConfig::default()).unwrap();
        let backends: [(&str, &dyn TensorAllocator); 2] = [("pool", &pool), ("model", &model)];
        let mut reserved = Vec::new();
        for (b, backend) in backends {
            let r = replay_checked(name, &plan, b, backend);
            assert!(r >= peak, "{name} on {b}: reserved {r} < live {peak}");
            reserved.push(r);
        }
        assert_eq!(
            reserved[0], reserved[1],
            "{name}: the model's predicted peak reserved must equal the pool's"
        );
        assert_eq!(
            pool.driver().peak_outstanding() as u64,
            reserved[0],
            "{name}: the pool's peak reserved is what the driver had out"
        );
        pool.pool().check_invariants();
    }
}
