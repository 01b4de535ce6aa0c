//! What recording costs: `HostBackend` against `Traced<HostBackend>`, one
//! `allocate` + `deallocate` pair of 256 B at a time, from one thread.
//!
//! ```text
//! cargo bench --bench trace_overhead [-- --reps N]
//! ```
//!
//! Interleaved: each repetition times a batch on the plain backend, then on
//! the traced one (order alternating), so machine load falls on both alike.
//! Prints the median and minimum ns per pair of each and the median of the
//! per-repetition differences, per pair and per recorded op (a pair is two
//! records). The trace goes to a temporary file, drained every 4096 records
//! (the write is in the measurement).

use std::hint::black_box;
use std::time::Instant;
use tensorpool::adapt::Traced;
use tensorpool::backend::HostBackend;
use tensorpool::{AllocRequest, TensorAllocator};

const PAIRS: usize = 200_000;

fn batch(b: &dyn TensorAllocator, req: &AllocRequest) -> f64 {
    let t = Instant::now();
    for _ in 0..PAIRS {
        let a = b.allocate(black_box(req)).expect("allocate");
        // SAFETY: `a` is not used afterwards.
        unsafe { b.deallocate(black_box(&a)).expect("deallocate") };
    }
    t.elapsed().as_nanos() as f64 / PAIRS as f64
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let mut reps = 31usize;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        if a == "--reps" {
            reps = args.next().and_then(|v| v.parse().ok()).expect("--reps N");
        }
    }
    let path = std::env::temp_dir().join(format!("tp-trace-overhead-{}.tpt", std::process::id()));
    let plain = HostBackend::new();
    let traced = Traced::create(HostBackend::new(), &path).expect("trace file");
    let req = AllocRequest::bytes(256);
    // Warm both (classes, caches, metadata table).
    batch(&plain, &req);
    batch(&traced, &req);
    let (mut p, mut t, mut d) = (Vec::new(), Vec::new(), Vec::new());
    for r in 0..reps {
        let (a, b) = if r % 2 == 0 {
            let a = batch(&plain, &req);
            (a, batch(&traced, &req))
        } else {
            let b = batch(&traced, &req);
            (batch(&plain, &req), b)
        };
        p.push(a);
        t.push(b);
        d.push(b - a);
    }
    let (pm, tm, dm) = (median(&mut p), median(&mut t), median(&mut d));
    let loadavg = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!("alloc+free pair of 256 B, {PAIRS} pairs a sample, {reps} interleaved repetitions");
    println!("| backend | median ns/pair | min ns/pair |");
    println!("|---|---:|---:|");
    println!("| HostBackend | {pm:.1} | {:.1} |", p[0]);
    println!("| Traced<HostBackend> | {tm:.1} | {:.1} |", t[0]);
    println!(
        "recording overhead: median {dm:.1} ns per pair = {:.1} ns per recorded op ({} records written); load average {}",
        dm / 2.0,
        traced.written(),
        loadavg.trim()
    );
    drop(traced);
    let _ = std::fs::remove_file(&path);
}
