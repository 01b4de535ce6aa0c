//! Replays allocation traces on glibc, mimalloc and jemalloc (with
//! `--features peers`), the pool (`HostBackend`) and the meta backend's
//! prediction, as one table: time per operation (median and minimum over
//! interleaved repetitions) and peak reserved ÷ peak allocated.
//!
//! ```text
//! cargo run --release --example replay --features peers -- [--reps N] [--alloc NAME] [TRACE ...]
//! ```
//!
//! Without TRACE arguments it replays the committed real traces in
//! `tests/data/`. A TRACE is a file written by `Traced` or with
//! `TENSORPOOL_TRACE=path`, optionally gzip-compressed (`.gz`).

mod table;

use std::path::PathBuf;

/// The example's own allocations (the replay's slot table, strings) go to
/// tensorpool's global pool, so that they do not count in glibc's
/// reserved bytes.
#[global_allocator]
static A: tensorpool::TensorGlobalAlloc = tensorpool::TensorGlobalAlloc::new();

fn main() {
    let mut reps = 11usize;
    let mut paths = Vec::new();
    let mut only: Option<String> = None;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--reps" => {
                reps = match args.next().and_then(|v| v.parse().ok()) {
                    Some(n) if n > 0 => n,
                    _ => {
                        eprintln!("--reps needs a positive number");
                        std::process::exit(2);
                    }
                }
            }
            "--alloc" => match args.next() {
                Some(s) => only = Some(s),
                None => {
                    eprintln!("--alloc needs a name (or part of one)");
                    std::process::exit(2);
                }
            },
            "--bench" => {}
            "-h" | "--help" => {
                eprintln!("usage: replay [--reps N] [--alloc NAME-SUBSTRING] [TRACE ...]");
                return;
            }
            p => paths.push((p.to_string(), PathBuf::from(p))),
        }
    }
    let result = if paths.is_empty() {
        table::committed_table(reps, only.as_deref())
    } else {
        load_all(paths).and_then(|ts| table::table(&ts, reps, only.as_deref()))
    };
    match result {
        Ok(t) => print!("{t}"),
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(1);
        }
    }
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!("\n{reps} repetitions; load average {}", load.trim());
}

fn load_all(
    paths: Vec<(String, PathBuf)>,
) -> Result<Vec<(String, tensorpool::adapt::Trace)>, String> {
    let mut traces = Vec::new();
    for (name, path) in paths {
        traces.push((name, table::load(&path)?));
    }
    Ok(traces)
}
