//! The allocator comparison: every workload × every allocator, interleaved,
//! as a markdown table (median and minimum time per operation, retained RSS)
//! and a CSV.
//!
//! ```text
//! cargo run --release --example compare --features peers -- [--quick] [--reps N] [--only WORKLOAD[|WORKLOAD…]] [--alloc NAME] [--csv PATH]
//! ```
//!
//! Without `--features peers` it compares the pool with glibc only.
//! `--only` and `--alloc` keep the workloads and allocators whose names
//! contain the given text (`--alloc` is for profiling one allocator);
//! `--only a|b` keeps those matching either (one process, one pool: run
//! `thread-churn|prodcons` to see one workload after another, as in the
//! full run).
//!
//! Method: each workload is first calibrated per allocator (units per
//! sample, so that a sample lasts about the sample time). Then, for each
//! repetition, every allocator takes one sample, in an order rotated by
//! one each repetition (rep 1: A B C D, rep 2: B C D A, ...), so drift in
//! machine load falls on all of them alike. Reported: the median and the
//! minimum over repetitions, per operation; and, per workload, in how many
//! repetitions the pool's sample took at most [`PAIRED_FACTOR`] × the best
//! peer's sample of the same repetition (samples of one repetition run
//! back to back, so they share the machine's load: on a loaded machine the
//! medians drift with it, this count does less). Retained RSS: see [`rss_phase`].
//! Peak RSS: see [`peak_rss`] (each allocator runs the workload in fresh
//! child processes, since RSS is process-wide; the median of three).

#[path = "../benches/common/mod.rs"]
mod common;
#[path = "replay/table.rs"]
mod replay_table;

use common::{Runner, Suite, Workload, allocators, workloads};
use std::fmt::Write as _;
use std::io::Write as _;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

const MIB: f64 = (1 << 20) as f64;

/// Command-line options.
#[derive(Debug)]
struct Opts {
    reps: usize,
    sample: Duration,
    only: Option<String>,
    alloc: Option<String>,
    csv: String,
}

impl Opts {
    fn parse() -> Result<Self, String> {
        let mut o = Opts {
            reps: 21,
            sample: Duration::from_millis(10),
            only: None,
            alloc: None,
            csv: "target/compare.csv".into(),
        };
        let mut args = std::env::args().skip(1);
        while let Some(a) = args.next() {
            let mut value = |flag: &str| args.next().ok_or(format!("{flag} needs a value"));
            match a.as_str() {
                "--quick" => {
                    o.reps = 3;
                    o.sample = Duration::from_millis(2);
                }
                "--reps" => {
                    o.reps = value("--reps")?
                        .parse()
                        .map_err(|e| format!("--reps: {e}"))?
                }
                "--only" => o.only = Some(value("--only")?),
                "--alloc" => o.alloc = Some(value("--alloc")?),
                "--csv" => o.csv = value("--csv")?,
                // `cargo bench`/`cargo test` may pass this to examples.
                "--bench" => {}
                "-h" | "--help" => {
                    return Err("usage: compare [--quick] [--reps N] [--only SUBSTRING[|SUBSTRING...]] [--alloc NAME-SUBSTRING] [--csv PATH]".into());
                }
                other => return Err(format!("unknown argument {other:?} (try --help)")),
            }
        }
        if o.reps == 0 {
            return Err("--reps must be at least 1".into());
        }
        Ok(o)
    }
}

/// One table row.
#[derive(Debug)]
struct Row {
    workload: String,
    unit: &'static str,
    alloc: &'static str,
    peak_live: usize,
    iters: u64,
    median_ns: f64,
    min_ns: f64,
    rss_after: i64,
    rss_trimmed: i64,
    /// Peak RSS above the child's start while it ran the workload, and the
    /// peak live bytes it measured; `None` if the child failed.
    peak: Option<(i64, usize)>,
    /// The pool's row, with peers: the repetitions in which the pool's
    /// sample was within [`PAIRED_FACTOR`] of the best peer's, and how many
    /// repetitions there were.
    paired: Option<(usize, usize)>,
}

/// The goal's bound on the pool's time over the best peer's (issue 8).
const PAIRED_FACTOR: f64 = 1.2;

/// In how many repetitions `pool[r] ≤ factor × min(peers[·][r])`, and of
/// how many (repetitions every peer has a sample of); `None` without peers.
fn paired_within(pool: &[f64], peers: &[&[f64]], factor: f64) -> Option<(usize, usize)> {
    if peers.is_empty() {
        return None;
    }
    let reps = peers.iter().map(|p| p.len()).fold(pool.len(), usize::min);
    let within = (0..reps)
        .filter(|&r| {
            let best = peers.iter().map(|p| p[r]).fold(f64::INFINITY, f64::min);
            pool[r] <= factor * best
        })
        .count();
    Some((within, reps))
}

fn main() {
    if std::env::args().nth(1).as_deref() == Some(CHILD_FLAG) {
        std::process::exit(child_main());
    }
    let opts = match Opts::parse() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(2);
        }
    };
    let allocs: Vec<_> = allocators()
        .into_iter()
        .filter(|a| opts.alloc.as_deref().is_none_or(|s| a.name().contains(s)))
        .collect();
    if allocs.is_empty() {
        eprintln!("no allocator matches {:?}", opts.alloc);
        std::process::exit(2);
    }
    let suite: Vec<Workload> = workloads(Suite::Compare)
        .into_iter()
        .filter(|w| opts.only.as_deref().is_none_or(|s| matches_any(&w.name, s)))
        .collect();
    if suite.is_empty() {
        eprintln!(
            "no workload matches {:?}; workloads: {}",
            opts.only,
            names(&workloads(Suite::Compare))
        );
        std::process::exit(2);
    }

    println!("# Allocator comparison\n");
    println!("- date: {}", utc_now());
    println!(
        "- machine: {} CPUs, {}; kernel {}",
        nproc(),
        cpu_model(),
        read_trim("/proc/sys/kernel/osrelease")
    );
    println!(
        "- transparent huge pages: {}",
        read_trim("/sys/kernel/mm/transparent_hugepage/enabled")
    );
    println!("- load average at start: {}", read_trim("/proc/loadavg"));
    println!(
        "- allocators: {}{}",
        allocs
            .iter()
            .map(|a| a.name())
            .collect::<Vec<_>>()
            .join(", "),
        if cfg!(feature = "peers") {
            ""
        } else {
            " (build with `--features peers` for mimalloc and jemalloc)"
        }
    );
    println!(
        "- {} repetitions, allocators interleaved (order rotated every repetition), ~{:?} per sample",
        opts.reps, opts.sample
    );
    println!();

    let start = Instant::now();
    let mut rows = Vec::new();
    for (i, w) in suite.iter().enumerate() {
        eprintln!(
            "[{}/{}] {} ({:.0} s elapsed, load {})",
            i + 1,
            suite.len(),
            w.name,
            start.elapsed().as_secs_f64(),
            read_trim("/proc/loadavg")
        );
        rows.extend(measure(w, &allocs, &opts));
    }

    print_table(&rows);
    print_paired(&rows);
    println!();
    println!("- load average at end: {}", read_trim("/proc/loadavg"));
    println!("- total time: {:.0} s", start.elapsed().as_secs_f64());
    match write_csv(&opts.csv, &rows) {
        Ok(()) => println!("- CSV: {}", opts.csv),
        Err(e) => eprintln!("could not write {}: {e}", opts.csv),
    }
    println!("\n## Replay of the committed real traces (examples/replay)\n");
    match replay_table::committed_table(opts.reps.min(11), opts.alloc.as_deref()) {
        Ok(t) => print!("{t}"),
        Err(e) => eprintln!("replay: {e}"),
    }
}

/// Whether `name` contains any of the `|`-separated parts of `filter`.
fn matches_any(name: &str, filter: &str) -> bool {
    filter.split('|').any(|part| name.contains(part))
}

fn names(ws: &[Workload]) -> String {
    ws.iter()
        .map(|w| w.name.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

/// Units per sample for `a` so that a sample lasts about `target`: the
/// count is grown until a run takes a quarter of it, then the fastest of
/// three runs at that count sets the rate (one stall must not shrink every
/// later sample), never below the workload's `min_units`.
fn calibrate(w: &Workload, a: &dyn Runner, target: Duration) -> u64 {
    let mut iters = 1u64;
    while a.run(w, iters) < target / 4 && iters < 1 << 32 {
        iters *= 4;
    }
    let best = (0..3).map(|_| a.run(w, iters)).min().unwrap_or(target);
    let per = best.as_secs_f64() / iters as f64;
    ((target.as_secs_f64() / per.max(1e-12)) as u64).clamp(w.min_units, 1 << 34)
}

/// Times `w` on every allocator, interleaved, then measures retained RSS.
fn measure(w: &Workload, allocs: &[Box<dyn Runner>], opts: &Opts) -> Vec<Row> {
    let n = allocs.len();
    let iters: Vec<u64> = allocs
        .iter()
        .map(|a| calibrate(w, a.as_ref(), opts.sample))
        .collect();
    let mut samples = vec![Vec::with_capacity(opts.reps); n];
    for rep in 0..opts.reps {
        for k in 0..n {
            let i = (rep + k) % n;
            let d = allocs[i].run(w, iters[i]);
            samples[i].push(d.as_secs_f64() * 1e9 / (iters[i] * w.ops) as f64);
        }
    }
    let rss = rss_phase(w, allocs, &iters);
    let peaks: Vec<_> = allocs
        .iter()
        .zip(&iters)
        .map(|(a, &it)| median_peak_rss(w, a.name(), it.max(w.rss_units)))
        .collect();
    let pool_at = allocs
        .iter()
        .position(|a| a.name() == common::alloc::POOL_NAME);
    let paired = pool_at.and_then(|p| {
        let peers: Vec<&[f64]> = (0..n)
            .filter(|&i| i != p)
            .map(|i| samples[i].as_slice())
            .collect();
        paired_within(&samples[p], &peers, PAIRED_FACTOR)
    });
    (0..n)
        .map(|i| {
            let s = &mut samples[i];
            s.sort_by(f64::total_cmp);
            Row {
                workload: w.name.clone(),
                unit: w.unit,
                alloc: allocs[i].name(),
                peak_live: w.peak_live(),
                iters: iters[i],
                median_ns: median(s),
                min_ns: s[0],
                rss_after: rss[i].0,
                rss_trimmed: rss[i].1,
                peak: peaks[i],
                paired: if Some(i) == pool_at { paired } else { None },
            }
        })
        .collect()
}

/// Retained RSS per allocator, one allocator at a time, in one process:
/// every allocator is trimmed, RSS is read (`r0`), the allocator runs one
/// sample of the workload (which frees all it allocates), RSS is read
/// again (`after - r0`), the allocator trims, and RSS is read a third time
/// (`trimmed - r0`). Trimming all allocators first means the others' cached
/// memory does not move during the measurement; the harness allocates
/// nothing between the reads. RSS comes from `/proc/self/statm`.
fn rss_phase(w: &Workload, allocs: &[Box<dyn Runner>], iters: &[u64]) -> Vec<(i64, i64)> {
    let rss = || tensorpool::resident_bytes().unwrap_or(0) as i64;
    allocs
        .iter()
        .zip(iters)
        .map(|(a, &it)| {
            allocs.iter().for_each(|b| b.trim());
            let r0 = rss();
            a.run(w, it);
            let after = rss();
            a.trim();
            (after - r0, rss() - r0)
        })
        .collect()
}

/// The first argument that makes the example a peak-RSS child.
const CHILD_FLAG: &str = "--peak-rss-child";

/// Fresh child processes [`peak_rss`] runs per allocator and workload.
const PEAK_RUNS: usize = 3;

/// The median of [`PEAK_RUNS`] [`peak_rss`] runs, by peak RSS ÷ peak live
/// bytes (by peak RSS where nothing is live): threaded workloads (churn)
/// vary by a third from one run to the next, for every allocator alike.
fn median_peak_rss(w: &Workload, alloc: &str, units: u64) -> Option<(i64, usize)> {
    let mut runs: Vec<(i64, usize)> = (0..PEAK_RUNS)
        .filter_map(|_| peak_rss(w, alloc, units))
        .collect();
    runs.sort_by(|a, b| {
        let r = |&(rss, live): &(i64, usize)| rss as f64 / live.max(1) as f64;
        r(a).total_cmp(&r(b))
    });
    runs.get(runs.len() / 2).copied()
}

/// Peak RSS of `units` units of `w` on allocator `alloc`, in a fresh child
/// process (this example re-executed with [`CHILD_FLAG`]): RSS is
/// process-wide, so one allocator's cached memory must not count against
/// another's. Returns the peak above the child's level just before the
/// workload, and the peak live bytes it measured.
fn peak_rss(w: &Workload, alloc: &str, units: u64) -> Option<(i64, usize)> {
    let exe = std::env::current_exe().ok()?;
    let out = std::process::Command::new(exe)
        .args([CHILD_FLAG, &w.name, alloc, &units.to_string()])
        .output()
        .ok()?;
    if !out.status.success() {
        eprintln!(
            "peak-RSS child for {} on {alloc} failed: {}",
            w.name,
            String::from_utf8_lossy(&out.stderr)
        );
        return None;
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let mut it = text.split_whitespace();
    let base: i64 = it.next()?.parse().ok()?;
    let hwm: i64 = it.next()?.parse().ok()?;
    let live: usize = it.next()?.parse().ok()?;
    Some((hwm - base, live))
}

/// The child side of [`peak_rss`]: `--peak-rss-child WORKLOAD ALLOC UNITS`.
/// Resets the kernel's high-water mark (`/proc/self/clear_refs` ← 5), reads
/// RSS, runs the workload, and prints `base_bytes hwm_bytes peak_live_bytes`.
fn child_main() -> i32 {
    let args: Vec<String> = std::env::args().skip(2).collect();
    let [name, alloc, units] = args.as_slice() else {
        eprintln!("usage: {CHILD_FLAG} WORKLOAD ALLOC UNITS");
        return 2;
    };
    let Some(w) = workloads(Suite::Compare)
        .into_iter()
        .find(|w| &w.name == name)
    else {
        eprintln!("no workload {name}");
        return 2;
    };
    let Some(a) = allocators().into_iter().find(|a| a.name() == alloc) else {
        eprintln!("no allocator {alloc}");
        return 2;
    };
    let Ok(units) = units.parse::<u64>() else {
        eprintln!("bad unit count {units}");
        return 2;
    };
    // Without the reset (kernels before 4.0) the mark includes start-up,
    // a few hundred KiB.
    let _ = std::fs::write("/proc/self/clear_refs", "5");
    let base = tensorpool::resident_bytes().unwrap_or(0);
    a.run(&w, units);
    let Some(hwm) = vm_hwm() else {
        eprintln!("no VmHWM in /proc/self/status");
        return 1;
    };
    println!("{base} {hwm} {}", w.measured_peak_live());
    0
}

/// The process's peak resident set (`VmHWM`), in bytes.
fn vm_hwm() -> Option<usize> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse::<usize>()
        .ok()?;
    Some(kib << 10)
}

fn median(sorted: &[f64]) -> f64 {
    let m = sorted.len() / 2;
    if sorted.len() % 2 == 1 {
        sorted[m]
    } else {
        (sorted[m - 1] + sorted[m]) / 2.0
    }
}

/// `12.3 ns`, `4.56 µs`, `7.89 ms`.
fn fmt_time(ns: f64) -> String {
    let (v, unit) = match ns {
        x if x >= 1e6 => (x / 1e6, "ms"),
        x if x >= 1e3 => (x / 1e3, "µs"),
        x => (x, "ns"),
    };
    if v >= 100.0 {
        format!("{v:.0} {unit}")
    } else if v >= 10.0 {
        format!("{v:.1} {unit}")
    } else {
        format!("{v:.2} {unit}")
    }
}

fn fmt_mib(bytes: i64) -> String {
    format!("{:+.1}", bytes as f64 / MIB)
}

fn print_table(rows: &[Row]) {
    let pool = common::alloc::POOL_NAME;
    println!(
        "Times are per operation (the unit column); `vs {pool}` is this allocator's median divided by {pool}'s"
    );
    println!(
        "(above 1: {pool} is faster). RSS columns: MiB resident above the level before the allocator ran the"
    );
    println!(
        "workload once (all allocators trimmed first), right after the workload freed everything, and after"
    );
    println!(
        "that allocator's own trim (glibc `malloc_trim(0)`, mimalloc `mi_collect(true)`, jemalloc tcache"
    );
    println!(
        "flush + `arena.<ALL>.purge`, tensorpool `trim()`). Peak live is what the workload holds at once."
    );
    println!(
        "Peak RSS: the high-water mark above the start level of a fresh child process running the workload"
    );
    println!(
        "on that allocator alone (at least one sample's units); the median of {PEAK_RUNS} such children by their ratio. ÷ live: that peak over the peak live bytes."
    );
    println!();
    println!(
        "| workload | unit | peak live MiB | allocator | median | min | vs {pool} | RSS after MiB | RSS after trim MiB | peak RSS MiB | peak RSS ÷ live |"
    );
    println!("|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|");
    for r in rows {
        let ratio = rows
            .iter()
            .find(|p| p.workload == r.workload && p.alloc == pool)
            .map_or("–".into(), |p| {
                format!("{:.2}", r.median_ns / p.median_ns)
            });
        let (peak, per_live) = match r.peak {
            Some((p, live)) if live > 0 => (fmt_mib(p), format!("{:.2}", p as f64 / live as f64)),
            Some((p, _)) => (fmt_mib(p), "–".into()),
            None => ("–".into(), "–".into()),
        };
        let live = r.peak.map_or(r.peak_live, |(_, l)| l);
        println!(
            "| {} | {} | {:.2} | {} | {} | {} | {} | {} | {} | {peak} | {per_live} |",
            r.workload,
            r.unit,
            live as f64 / MIB,
            r.alloc,
            fmt_time(r.median_ns),
            fmt_time(r.min_ns),
            ratio,
            fmt_mib(r.rss_after),
            fmt_mib(r.rss_trimmed)
        );
    }
}

/// One line per workload: the repetitions in which the pool's sample was
/// within [`PAIRED_FACTOR`] of the best peer's sample of that repetition.
fn print_paired(rows: &[Row]) {
    let lines: Vec<String> = rows
        .iter()
        .filter_map(|r| {
            r.paired
                .map(|(k, n)| format!("  - {}: {k} of {n}", r.workload))
        })
        .collect();
    if lines.is_empty() {
        return;
    }
    println!();
    println!(
        "- repetitions in which {}'s sample took at most {PAIRED_FACTOR}× the best peer's sample of the same repetition:",
        common::alloc::POOL_NAME
    );
    lines.iter().for_each(|l| println!("{l}"));
}

fn write_csv(path: &str, rows: &[Row]) -> std::io::Result<()> {
    if let Some(dir) = std::path::Path::new(path)
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
    {
        std::fs::create_dir_all(dir)?;
    }
    let mut out = String::from(
        "workload,unit,allocator,peak_live_bytes,units_per_sample,median_ns,min_ns,rss_after_bytes,rss_after_trim_bytes,peak_rss_bytes,measured_peak_live_bytes\n",
    );
    for r in rows {
        let _ = writeln!(
            out,
            "{},{},{},{},{},{:.3},{:.3},{},{},{},{}",
            r.workload,
            r.unit,
            r.alloc,
            r.peak_live,
            r.iters,
            r.median_ns,
            r.min_ns,
            r.rss_after,
            r.rss_trimmed,
            r.peak.map_or(String::new(), |p| p.0.to_string()),
            r.peak.map_or(String::new(), |p| p.1.to_string())
        );
    }
    std::fs::File::create(path)?.write_all(out.as_bytes())
}

fn read_trim(path: &str) -> String {
    std::fs::read_to_string(path).map_or_else(|_| "unavailable".into(), |s| s.trim().to_string())
}

fn nproc() -> usize {
    std::thread::available_parallelism().map_or(0, |n| n.get())
}

fn cpu_model() -> String {
    let info = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    info.lines()
        .find_map(|l| {
            l.strip_prefix("model name")
                .and_then(|r| r.split_once(':'))
                .map(|(_, m)| m.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into())
}

/// The current UTC time as `YYYY-MM-DD HH:MM UTC` (civil-from-days).
fn utc_now() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs()) as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02} UTC",
        rem / 3_600,
        rem % 3_600 / 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paired_counts_repetitions_against_the_best_peer_of_each() {
        let pool = [10.0, 13.0, 30.0, 12.0];
        let a = [10.0, 10.0, 20.0, 100.0];
        let b = [50.0, 11.0, 24.0, 9.0];
        // Best peer per repetition: 10, 10, 20, 9; bound ×1.2: 12, 12, 24, 10.8.
        assert_eq!(paired_within(&pool, &[&a, &b], 1.2), Some((1, 4)));
        assert_eq!(paired_within(&pool, &[&a], 1.2), Some((2, 4)));
        // Only repetitions every allocator has a sample of count.
        assert_eq!(paired_within(&pool, &[&a[..2]], 1.2), Some((1, 2)));
        assert_eq!(paired_within(&pool, &[], 1.2), None);
    }

    #[test]
    fn only_matches_any_alternative() {
        assert!(matches_any("prodcons-2x2", "prodcons"));
        assert!(matches_any("prodcons-2x2", "thread-churn|prodcons"));
        assert!(matches_any("thread-churn-8", "thread-churn|prodcons"));
        assert!(!matches_any("pair-16B", "thread-churn|prodcons"));
    }
}
