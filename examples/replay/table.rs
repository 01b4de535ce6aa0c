//! The replay table: every trace × every allocator, interleaved per
//! repetition, medians. Shared by `examples/replay` and `examples/compare`.
//!
//! Time: one long-lived instance per allocator (warm after an untimed first
//! run), each repetition replays the trace once on every allocator in an
//! order rotated by one per repetition. Memory: one more replay per
//! allocator on a fresh instance (a fresh backend; for `GlobalAlloc` peers,
//! their own reserved-bytes counter sampled every 64 allocations, relative
//! to its value before the replay): peak reserved ÷ peak allocated.

use std::fmt::Write as _;
use std::path::Path;
use tensorpool::TensorAllocator;
use tensorpool::adapt::{GlobalAllocBackend, ReplayPlan, Trace};
use tensorpool::backend::{HostBackend, MetaBackend};

/// An allocator in the table: its name and a maker (`true`: sample
/// reserved bytes for the memory run).
pub struct Contender {
    pub name: &'static str,
    pub make: fn(bool) -> Box<dyn TensorAllocator>,
}

/// glibc's reserved bytes: `mallinfo2` arena (sbrk heap) + mmapped blocks.
fn glibc_reserved() -> usize {
    // SAFETY: no preconditions; reads glibc's counters.
    let m = unsafe { libc::mallinfo2() };
    m.arena + m.hblkhd
}

/// mimalloc's committed bytes (`mi_process_info`).
#[cfg(feature = "peers")]
fn mimalloc_reserved() -> usize {
    let mut v = [0usize; 8];
    let [a, b, c, d, e, f, g, h] = &mut v;
    // SAFETY: eight valid out-pointers.
    unsafe { libmimalloc_sys::mi_process_info(a, b, c, d, e, f, g, h) };
    v[5]
}

/// jemalloc's mapped bytes (`stats.mapped`, after refreshing `epoch`).
#[cfg(feature = "peers")]
fn jemalloc_reserved() -> usize {
    let mut epoch: u64 = 1;
    let mut mapped: usize = 0;
    let mut len = size_of::<usize>();
    // SAFETY: NUL-terminated names; `epoch` takes a u64 in, `stats.mapped`
    // gives a size_t out, with matching lengths.
    unsafe {
        tikv_jemalloc_sys::mallctl(
            c"epoch".as_ptr(),
            core::ptr::null_mut(),
            core::ptr::null_mut(),
            (&raw mut epoch).cast(),
            size_of::<u64>(),
        );
        tikv_jemalloc_sys::mallctl(
            c"stats.mapped".as_ptr(),
            (&raw mut mapped).cast(),
            &mut len,
            core::ptr::null_mut(),
            0,
        );
    }
    mapped
}

fn every(sample: bool) -> usize {
    if sample { 64 } else { 0 }
}

/// The allocators compared: glibc, mimalloc, jemalloc (with `peers`), the
/// pool (`HostBackend`) and the meta backend's prediction.
pub fn contenders() -> Vec<Contender> {
    vec![
        Contender {
            name: "glibc",
            make: |s| {
                Box::new(GlobalAllocBackend::new(
                    std::alloc::System,
                    Some(glibc_reserved),
                    every(s),
                ))
            },
        },
        #[cfg(feature = "peers")]
        Contender {
            name: "mimalloc",
            make: |s| {
                Box::new(GlobalAllocBackend::new(
                    mimalloc::MiMalloc,
                    Some(mimalloc_reserved),
                    every(s),
                ))
            },
        },
        #[cfg(feature = "peers")]
        Contender {
            name: "jemalloc",
            make: |s| {
                Box::new(GlobalAllocBackend::new(
                    tikv_jemallocator::Jemalloc,
                    Some(jemalloc_reserved),
                    every(s),
                ))
            },
        },
        Contender {
            name: "tensorpool",
            make: |_| Box::new(HostBackend::new()),
        },
        Contender {
            name: "meta",
            make: |_| Box::new(MetaBackend::new()),
        },
    ]
}

/// Reads a trace file, gunzipping it if its name ends in `.gz`.
pub fn load(path: &Path) -> Result<Trace, String> {
    let raw = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let bytes = if path.extension().is_some_and(|e| e == "gz") {
        let mut out = Vec::new();
        std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(&raw[..]), &mut out)
            .map_err(|e| format!("{}: gzip: {e}", path.display()))?;
        out
    } else {
        raw
    };
    Trace::from_bytes(&bytes, path).map_err(|e| e.to_string())
}

/// The committed real traces, as (name, path).
pub fn committed() -> Vec<(&'static str, std::path::PathBuf)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data");
    vec![
        (
            "candle (MLP step + transformer block)",
            dir.join("candle.tpt.gz"),
        ),
        ("python (dicts, sort, JSON)", dir.join("python.tpt.gz")),
        (
            "python, PYTHONMALLOC=malloc",
            dir.join("python-malloc.tpt.gz"),
        ),
    ]
}

/// The table of the committed traces.
pub fn committed_table(reps: usize) -> Result<String, String> {
    let traces = committed()
        .into_iter()
        .map(|(n, p)| load(&p).map(|t| (n.to_string(), t)))
        .collect::<Result<Vec<_>, _>>()?;
    table(&traces, reps)
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Replays each trace on every contender and returns the markdown table.
pub fn table(traces: &[(String, Trace)], reps: usize) -> Result<String, String> {
    let cs = contenders();
    let mut out = String::new();
    let _ = writeln!(
        out,
        "| trace | ops | peak live | allocator | median ns/op | min ns/op | peak reserved | reserved ÷ live | failures |"
    );
    let _ = writeln!(out, "|---|---:|---:|---|---:|---:|---:|---:|---:|");
    for (name, trace) in traces {
        let plan = ReplayPlan::new(trace).map_err(|e| format!("{name}: {e}"))?;
        let timed: Vec<_> = cs.iter().map(|c| (c.make)(false)).collect();
        for b in &timed {
            plan.run(b.as_ref()); // warm-up
        }
        let mut ns = vec![Vec::with_capacity(reps); cs.len()];
        let mut failures = vec![0u64; cs.len()];
        for r in 0..reps {
            for k in 0..cs.len() {
                let i = (k + r) % cs.len();
                let rep = plan.run(timed[i].as_ref());
                ns[i].push(rep.ns_per_op);
                failures[i] += rep.failures;
            }
        }
        for (i, c) in cs.iter().enumerate() {
            let mem = plan.run((c.make)(true).as_ref());
            let min = ns[i].iter().copied().fold(f64::INFINITY, f64::min);
            let _ = writeln!(
                out,
                "| {name} | {} | {:.2} MiB | {} | {:.1} | {:.1} | {:.2} MiB | {:.2} | {} |",
                plan.len(),
                plan.peak_live_bytes() as f64 / (1 << 20) as f64,
                c.name,
                median(&mut ns[i]),
                min,
                mem.peak_reserved as f64 / (1 << 20) as f64,
                mem.fragmentation(),
                failures[i] + mem.failures,
            );
        }
    }
    Ok(out)
}
