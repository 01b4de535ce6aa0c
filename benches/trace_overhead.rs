//! What recording costs: `HostBackend` against `Traced<HostBackend>`, one
//! `allocate` + `deallocate` pair of 256 B at a time, from one thread; and
//! the same over a backend that does nothing (`Null`: it hands out one
//! fixed allocation), which isolates the recording from the backend's own
//! cost and noise.
//!
//! ```text
//! cargo bench --bench trace_overhead [-- --reps N]
//! ```
//!
//! `TP_OVERHEAD_PATH=/dev/null` sends the `Null` rows' trace there (no file
//! I/O in the figure); `TP_OVERHEAD_NULL_ONLY=1` skips the `HostBackend`
//! rows (for profiling the recorder alone); `TP_OVERHEAD_CAPACITY=N` sets
//! the buffer (records; default `trace::DEFAULT_CAPACITY`).
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
use tensorpool::{
    AllocError, AllocRequest, Allocation, Device, MemoryStats, TensorAllocator, TensorId,
};

/// A backend that does no work: every allocation is the same description.
#[derive(Debug)]
struct Null(Allocation);

// SAFETY: `Null` hands out an allocation without host memory (`Addr::None`)
// whose id is unique in the process (freshly issued); the bench never holds
// two of them at once.
unsafe impl TensorAllocator for Null {
    fn device(&self) -> Device {
        Device::Meta
    }
    fn allocate(&self, _: &AllocRequest) -> Result<Allocation, AllocError> {
        Ok(self.0)
    }
    unsafe fn deallocate(&self, _: &Allocation) -> Result<(), AllocError> {
        Ok(())
    }
    fn stats(&self) -> MemoryStats {
        MemoryStats::default()
    }
    fn trim(&self) -> usize {
        0
    }
}

fn null() -> Null {
    let id = TensorId::from_raw(u64::MAX >> 1).expect("id");
    Null(Allocation::new(
        id,
        tensorpool::Addr::None,
        256,
        64,
        Device::Meta,
        0,
    ))
}

/// Pairs a sample, at least: short (tens of µs), so that on a loaded
/// machine most samples run without being preempted and the median ignores
/// those that are. A sample is never shorter than one buffer of records
/// (`capacity / 2` pairs), so every sample pays for whole drains (write
/// included) and the median cannot leave them out.
const MIN_PAIRS: usize = 4096;

fn batch(b: &dyn TensorAllocator, req: &AllocRequest, pairs: usize) -> f64 {
    let t = Instant::now();
    for _ in 0..pairs {
        let a = b.allocate(black_box(req)).expect("allocate");
        // SAFETY: `a` is not used afterwards.
        unsafe { b.deallocate(black_box(&a)).expect("deallocate") };
    }
    t.elapsed().as_nanos() as f64 / pairs as f64
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Times `plain` against `traced`, interleaved; prints two table rows and
/// returns the median per-repetition difference in ns per pair.
fn compare(
    name: &str,
    plain: &dyn TensorAllocator,
    traced: &dyn TensorAllocator,
    reps: usize,
    pairs: usize,
) -> f64 {
    let req = AllocRequest::bytes(256);
    // Warm both (classes, caches, metadata table).
    batch(plain, &req, pairs);
    batch(traced, &req, pairs);
    let (mut p, mut t, mut d) = (Vec::new(), Vec::new(), Vec::new());
    for r in 0..reps {
        let (a, b) = if r % 2 == 0 {
            let a = batch(plain, &req, pairs);
            (a, batch(traced, &req, pairs))
        } else {
            let b = batch(traced, &req, pairs);
            (batch(plain, &req, pairs), b)
        };
        p.push(a);
        t.push(b);
        d.push(b - a);
    }
    let (pm, tm, dm) = (median(&mut p), median(&mut t), median(&mut d));
    println!(
        "| {name} | {pm:.1} | {:.1} | {tm:.1} | {:.1} | {dm:.1} | {:.1} |",
        p[0],
        t[0],
        dm / 2.0
    );
    dm
}

fn main() {
    let mut reps = 2001usize;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        if a == "--reps" {
            reps = args.next().and_then(|v| v.parse().ok()).expect("--reps N");
        }
    }
    let dir = std::env::temp_dir();
    let pid = std::process::id();
    let (p1, p2) = (
        dir.join(format!("tp-overhead-{pid}-a.tpt")),
        dir.join(format!("tp-overhead-{pid}-b.tpt")),
    );
    let cap = std::env::var("TP_OVERHEAD_CAPACITY")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(tensorpool::adapt::trace::DEFAULT_CAPACITY);
    let pairs = MIN_PAIRS.max(cap / 2);
    println!(
        "alloc+free pairs of 256 B, {pairs} pairs a sample, {reps} interleaved repetitions, buffer of {cap} records, ns per pair"
    );
    println!(
        "| backend B | B median | B min | Traced<B> median | Traced<B> min | median difference | per recorded op |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|");
    // A path given by the user (say /dev/null) is theirs: never removed.
    let given = std::env::var_os("TP_OVERHEAD_PATH").map(std::path::PathBuf::from);
    let null_path = given.clone().unwrap_or_else(|| p1.clone());
    let traced = Traced::with_capacity(null(), &null_path, cap).expect("trace file");
    compare("Null (no work)", &null(), &traced, reps, pairs);
    drop(traced);
    if std::env::var_os("TP_OVERHEAD_NULL_ONLY").is_none() {
        let traced = Traced::with_capacity(HostBackend::new(), &p2, cap).expect("trace file");
        compare("HostBackend", &HostBackend::new(), &traced, reps, pairs);
        drop(traced);
    }
    let loadavg = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!("load average {}", loadavg.trim());
    if given.is_none() {
        let _ = std::fs::remove_file(&p1);
    }
    let _ = std::fs::remove_file(&p2);
}
