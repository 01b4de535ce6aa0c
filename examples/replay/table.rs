//! The replay table: every trace × every allocator, interleaved per
//! repetition, medians. Shared by `examples/replay` and `examples/compare`.
//!
//! Memory first: for each trace and allocator, every allocator is trimmed,
//! then the trace is replayed once on a fresh instance (the backends) or
//! the trimmed one (the `GlobalAlloc`s) writing one byte per page of every
//! block (`ReplayPlan::run_touching`). Reported: the allocator's own peak
//! reserved bytes where it counts them (the pool and meta backend's
//! `reserved_bytes.peak`; glibc's `mallinfo2` arena + mmapped bytes and
//! jemalloc's `stats.mapped`, sampled after every allocation, relative to
//! before the replay; mimalloc commits its arenas up front, so it has no
//! such figure), and the growth of the process's peak resident set.
//!
//! Time: one long-lived instance per allocator (warm after an untimed first
//! run); each repetition replays the trace once on every allocator, in an
//! order rotated by one per repetition; median and minimum ns per op.

use std::alloc::{GlobalAlloc, Layout};
use std::fmt::Write as _;
use std::path::Path;
use std::sync::LazyLock;
use tensorpool::TensorAllocator;
use tensorpool::adapt::{GlobalAllocBackend, ReplayPlan, Trace};
use tensorpool::backend::{HostBackend, MetaBackend};
use tensorpool::host::HostPool;

/// An allocator in the table.
pub struct Contender {
    pub name: &'static str,
    /// A ready instance (`true`: sample reserved bytes, for the memory run).
    pub make: fn(bool) -> Box<dyn TensorAllocator>,
    /// Hands cached memory back to the OS before a memory run.
    pub trim: fn(),
    /// Whether it counts reserved bytes (else the column shows "–").
    pub counts_reserved: bool,
    /// Whether its blocks have host memory to touch.
    pub has_bytes: bool,
}

/// glibc's reserved bytes: `mallinfo2` arena (sbrk heap) + mmapped blocks.
fn glibc_reserved() -> usize {
    // SAFETY: no preconditions; reads glibc's counters.
    let m = unsafe { libc::mallinfo2() };
    m.arena + m.hblkhd
}

fn glibc_trim() {
    // SAFETY: no preconditions.
    unsafe { libc::malloc_trim(0) };
}

#[cfg(feature = "peers")]
fn mimalloc_trim() {
    // SAFETY: no preconditions.
    unsafe { libmimalloc_sys::mi_collect(true) };
}

/// A void or read jemalloc `mallctl`.
#[cfg(feature = "peers")]
fn mallctl(name: &std::ffi::CStr, out: *mut usize, new: *mut u64) {
    let mut len = size_of::<usize>();
    // SAFETY: a NUL-terminated name; `out` (if non-null) takes a size_t,
    // `new` (if non-null) is a u64 input, with matching lengths.
    unsafe {
        tikv_jemalloc_sys::mallctl(
            name.as_ptr(),
            out.cast(),
            if out.is_null() {
                core::ptr::null_mut()
            } else {
                &mut len
            },
            new.cast(),
            if new.is_null() { 0 } else { size_of::<u64>() },
        )
    };
}

/// jemalloc's mapped bytes (`stats.mapped`, after refreshing `epoch`).
#[cfg(feature = "peers")]
fn jemalloc_reserved() -> usize {
    let (mut epoch, mut mapped) = (1u64, 0usize);
    mallctl(c"epoch", core::ptr::null_mut(), &mut epoch);
    mallctl(c"stats.mapped", &mut mapped, core::ptr::null_mut());
    mapped
}

#[cfg(feature = "peers")]
fn jemalloc_trim() {
    for name in [c"thread.tcache.flush", c"arena.4096.purge"] {
        mallctl(name, core::ptr::null_mut(), core::ptr::null_mut());
    }
}

/// The pool itself (no tensor metadata), one per process, as a `GlobalAlloc`.
static POOL: LazyLock<HostPool> = LazyLock::new(HostPool::new);

struct Pool;

// SAFETY: the pool returns blocks of at least `layout.size()` bytes at
// `layout.align()` or an error (null); `dealloc` gets back what `alloc` gave
// with the same layout.
unsafe impl GlobalAlloc for Pool {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        POOL.allocate(layout)
            .map_or(core::ptr::null_mut(), |p| p.as_ptr())
    }
    unsafe fn dealloc(&self, p: *mut u8, layout: Layout) {
        if let Some(p) = core::ptr::NonNull::new(p) {
            // SAFETY: a block of `POOL` allocated with `layout` (caller).
            unsafe { POOL.deallocate(p, layout) }
        }
    }
}

fn every(sample: bool) -> usize {
    if sample { 1 } else { 0 }
}

/// The allocators compared: glibc, mimalloc, jemalloc (with `peers`), the
/// pool (`HostPool`, as the peers: a bare allocator), the pool with tensor
/// metadata (`HostBackend`) and the meta backend's prediction.
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
            trim: glibc_trim,
            counts_reserved: true,
            has_bytes: true,
        },
        #[cfg(feature = "peers")]
        Contender {
            name: "mimalloc",
            make: |_| Box::new(GlobalAllocBackend::new(mimalloc::MiMalloc, None, 0)),
            trim: mimalloc_trim,
            counts_reserved: false,
            has_bytes: true,
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
            trim: jemalloc_trim,
            counts_reserved: true,
            has_bytes: true,
        },
        Contender {
            name: "tensorpool (pool)",
            make: |s| {
                Box::new(GlobalAllocBackend::new(
                    Pool,
                    Some(|| POOL.stats().reserved_bytes),
                    every(s),
                ))
            },
            trim: || {
                POOL.trim();
            },
            counts_reserved: true,
            has_bytes: true,
        },
        Contender {
            name: "tensorpool (HostBackend)",
            make: |_| Box::new(HostBackend::new()),
            trim: || {},
            counts_reserved: true,
            has_bytes: true,
        },
        Contender {
            name: "meta (prediction)",
            make: |_| Box::new(MetaBackend::new()),
            trim: || {},
            counts_reserved: true,
            has_bytes: false,
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
pub fn committed_table(reps: usize, only: Option<&str>) -> Result<String, String> {
    let traces = committed()
        .into_iter()
        .map(|(n, p)| load(&p).map(|t| (n.to_string(), t)))
        .collect::<Result<Vec<_>, _>>()?;
    table(&traces, reps, only)
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Replays each trace on every contender (whose name contains `only`, if
/// given) and returns the markdown table.
pub fn table(
    traces: &[(String, Trace)],
    reps: usize,
    only: Option<&str>,
) -> Result<String, String> {
    let cs: Vec<Contender> = contenders()
        .into_iter()
        .filter(|c| only.is_none_or(|s| c.name.contains(s)))
        .collect();
    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "| trace | ops | peak live | allocator | median ns/op | min ns/op | peak reserved | reserved ÷ live | resident growth ÷ live | failures |"
    );
    let _ = writeln!(out, "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|");
    let plans = traces
        .iter()
        .map(|(name, t)| ReplayPlan::new(t).map_err(|e| format!("{name}: {e}")))
        .collect::<Result<Vec<_>, _>>()?;
    // Memory, before anything warms the allocators up.
    let mut memory = Vec::new();
    for plan in &plans {
        let mut row = Vec::new();
        for c in &cs {
            for other in &cs {
                (other.trim)();
            }
            row.push(plan.run_touching((c.make)(true).as_ref()));
        }
        memory.push(row);
    }
    for (t, (name, _)) in traces.iter().enumerate() {
        let plan = &plans[t];
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
            let mem = &memory[t][i];
            let live = plan.peak_live_bytes().max(1) as f64;
            let min = ns[i].iter().copied().fold(f64::INFINITY, f64::min);
            let (reserved, ratio) = if c.counts_reserved {
                (
                    format!("{:.2} MiB", mib(mem.peak_reserved)),
                    format!("{:.2}", mem.fragmentation()),
                )
            } else {
                ("–".into(), "–".into())
            };
            let resident = match mem.peak_resident_growth {
                Some(g) if c.has_bytes => format!("{:.2}", g as f64 / live),
                _ => "–".into(),
            };
            let _ = writeln!(
                out,
                "| {name} | {} | {:.2} MiB | {} | {:.1} | {:.1} | {reserved} | {ratio} | {resident} | {} |",
                plan.len(),
                mib(plan.peak_live_bytes()),
                c.name,
                median(&mut ns[i]),
                min,
                failures[i] + mem.failures,
            );
        }
    }
    let _ = writeln!(
        out,
        "\nPeak reserved: the allocator's own count; for glibc and jemalloc only what they mapped beyond what they held before the replay (0 where memory the process had already used sufficed, e.g. glibc in `compare`, whose own allocator it is); mimalloc commits its arenas up front and has no such count. Resident growth: peak RSS during a replay that writes every page, minus RSS before it."
    );
    Ok(out)
}
