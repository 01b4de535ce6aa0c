//! The CUDA pool's measurements, for `ci/gpu.sh`. Build once with
//! `cargo build --release --features cuda --example cuda_bench` and carry
//! the binary; the GPU machine needs no Rust.
//!
//! **Text traces** (`DIR/NAME.trace`, the one format the GPU run reads, here
//! and in `ci/cuda/torch_replay.py`): one op a line, `a ID SIZE` allocates
//! SIZE bytes as block ID, `f ID` frees block ID; an ID may be reused after
//! its free. Blocks still live at the end are freed after the measurement.
//! Exported from the binary trace format (spec: `src/adapt/format.rs`),
//! these lines keep op, id and size; alignment (at most 512 on the pool and
//! in PyTorch alike), stream, thread and time are dropped.
//!
//! - `cuda_bench traces DIR` writes the synthetic replay traces (no GPU
//!   needed): `transformer.trace` (a synthetic transformer training run:
//!   weights, saved activations, temporaries, gradients) and `churn.trace`
//!   (random sizes 512 B … 256 MiB with random lifetimes).
//! - `cuda_bench export DIR FILE…` converts binary traces (`.tpt`, or
//!   gzip-compressed `.tpt.gz`, e.g. the committed `tests/data/*.tpt.gz`)
//!   to `DIR/NAME.trace` after checking them (no GPU needed).
//! - `cuda_bench predict DIR` writes the synthetic traces to DIR, replays
//!   every `DIR/*.trace` on the pool's meta model (the simulated driver)
//!   and prints the predicted peaks as JSON (no GPU).
//! - `cuda_bench gpu DIR OUT.json` measures on GPU 0: host-side cost per
//!   alloc+free for 512 B … 1 GiB (median, p99 in ns) of the pool's cache
//!   hit, the pool's miss, `cuMemAlloc`+`cuMemFree`, `cuMemAllocAsync`+
//!   `cuMemFreeAsync` on the default pool with release threshold 0 and
//!   `u64::MAX`, and cudarc's `stream.alloc` + drop; then writes the
//!   synthetic traces to DIR and replays every `DIR/*.trace` on the pool
//!   (time per op, peak reserved, peak allocated).
//!
//! Stream synchronization (for the async allocators) and `empty_cache`
//! (for the pool's miss) happen between timed pairs, outside the timing.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::Path;
use std::time::Instant;
use tensorpool::backend::MetaBackend;
use tensorpool::backend::cuda::{CudaBackend, CudaConfig, CudaDriver};
use tensorpool::{AllocRequest, Allocation, TensorAllocator};

const SIZES: [usize; 7] = [
    512,
    4 << 10,
    64 << 10,
    1 << 20,
    16 << 20,
    256 << 20,
    1 << 30,
];

type Trace = Vec<(bool, u64, usize)>;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let r = match args.get(1).map(String::as_str) {
        Some("traces") if args.len() == 3 => write_traces(Path::new(&args[2])),
        Some("export") if args.len() >= 4 => export(Path::new(&args[2]), &args[3..]),
        Some("predict") if args.len() == 3 => predict(Path::new(&args[2])),
        Some("gpu") if args.len() == 4 => gpu(Path::new(&args[2]), Path::new(&args[3])),
        Some("sim") => sim_hits(),
        _ => Err("usage: cuda_bench traces DIR | export DIR FILE... | predict DIR | gpu DIR OUT.json | sim".into()),
    };
    if let Err(e) = r {
        eprintln!("cuda_bench: {e}");
        std::process::exit(1);
    }
}

type Res<T> = Result<T, Box<dyn std::error::Error>>;

fn transformer() -> Trace {
    let (layers, h, t, heads, s, b, steps) = (16usize, 4096usize, 4096usize, 32, 2048, 2, 3);
    let mut tr = Trace::new();
    let mut id = 0u64;
    let mut alloc = |tr: &mut Trace, n: usize| {
        id += 1;
        tr.push((true, id, n));
        id
    };
    let weights: Vec<u64> = (0..layers)
        .flat_map(|_| {
            [
                3 * h * h * 2,
                h * h * 2,
                4 * h * h * 2,
                4 * h * h * 2,
                h * 4,
                h * 4,
            ]
        })
        .collect::<Vec<_>>()
        .into_iter()
        .map(|n| alloc(&mut tr, n))
        .collect();
    for _ in 0..steps {
        let mut saved: Vec<Vec<u64>> = Vec::new();
        let x = alloc(&mut tr, t * h * 2);
        for _ in 0..layers {
            let mut keep = Vec::new();
            for n in [
                t * h * 2,
                3 * t * h * 2,
                t * h * 2,
                b * heads * s * 4,
                t * h * 2,
            ] {
                keep.push(alloc(&mut tr, n));
            }
            let ws = alloc(&mut tr, 8 << 20); // GEMM workspace
            tr.push((false, ws, 0));
            for n in [4 * t * h * 2, 4 * t * h * 2, t * h * 2] {
                keep.push(alloc(&mut tr, n));
            }
            let tmp = alloc(&mut tr, 4 * t * h * 2); // dropout mask, freed at once
            tr.push((false, tmp, 0));
            saved.push(keep);
        }
        let loss = alloc(&mut tr, 4);
        let mut grads = Vec::new();
        for keep in saved.into_iter().rev() {
            let g = alloc(&mut tr, t * h * 2);
            for n in [
                3 * h * h * 2,
                h * h * 2,
                4 * h * h * 2,
                4 * h * h * 2,
                h * 4,
                h * 4,
            ] {
                grads.push(alloc(&mut tr, n));
            }
            let g2 = alloc(&mut tr, 4 * t * h * 2);
            tr.push((false, g2, 0));
            for k in keep {
                tr.push((false, k, 0));
            }
            tr.push((false, g, 0));
        }
        tr.push((false, loss, 0));
        tr.push((false, x, 0));
        for g in grads {
            tr.push((false, g, 0)); // optimizer step consumed them
        }
    }
    for w in weights {
        tr.push((false, w, 0));
    }
    tr
}

fn churn() -> Trace {
    let mut x = 0x2545_F491_4F6C_DD1Du64;
    let mut rnd = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let mut tr = Trace::new();
    let mut live: Vec<(u64, usize)> = Vec::new();
    let mut bytes = 0usize;
    for id in 1..=6000u64 {
        let exp = 9 + rnd() % 20; // 512 B … 256 MiB, log-uniform
        let n = (1usize << exp) + (rnd() as usize % (1usize << exp));
        while bytes + n > 8 << 30 || (!live.is_empty() && rnd() % 3 == 0) {
            let (i, m) = live.swap_remove(rnd() as usize % live.len());
            tr.push((false, i, 0));
            bytes -= m;
            if live.is_empty() {
                break;
            }
        }
        tr.push((true, id, n));
        live.push((id, n));
        bytes += n;
    }
    for (i, _) in live {
        tr.push((false, i, 0));
    }
    tr
}

fn traces() -> [(&'static str, Trace); 2] {
    [("transformer", transformer()), ("churn", churn())]
}

fn write_traces(dir: &Path) -> Res<()> {
    std::fs::create_dir_all(dir)?;
    for (name, tr) in traces() {
        write_text(&dir.join(format!("{name}.trace")), &tr)?;
    }
    Ok(())
}

/// Writes `tr` as a text trace (see the module docs).
fn write_text(path: &Path, tr: &Trace) -> Res<()> {
    let mut s = String::with_capacity(tr.len() * 16);
    for (a, id, n) in tr {
        if *a {
            writeln!(s, "a {id} {n}")?;
        } else {
            writeln!(s, "f {id}")?;
        }
    }
    std::fs::write(path, s)?;
    println!("wrote {} ({} ops)", path.display(), tr.len());
    Ok(())
}

/// Binary traces (`.tpt`, `.tpt.gz`) to `dir/NAME.trace`.
fn export(dir: &Path, files: &[String]) -> Res<()> {
    use std::io::Read as _;
    use tensorpool::adapt::{ReplayPlan, TraceOp};
    std::fs::create_dir_all(dir)?;
    for f in files {
        let path = Path::new(f);
        let raw = std::fs::read(path).map_err(|e| format!("{f}: {e}"))?;
        let bytes = if f.ends_with(".gz") {
            let mut v = Vec::new();
            flate2::read::GzDecoder::new(&raw[..])
                .read_to_end(&mut v)
                .map_err(|e| format!("{f}: {e}"))?;
            v
        } else {
            raw
        };
        let trace = tensorpool::adapt::Trace::from_bytes(&bytes, path)?;
        ReplayPlan::new(&trace).map_err(|e| format!("{f}: {e}"))?;
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .map(|n| n.trim_end_matches(".gz").trim_end_matches(".tpt"))
            .filter(|n| !n.is_empty())
            .ok_or_else(|| format!("{f}: no file name"))?;
        let tr: Trace = trace
            .records
            .iter()
            .map(|r| (r.op == TraceOp::Alloc, r.id, r.size as usize))
            .collect();
        write_text(&dir.join(format!("{name}.trace")), &tr)?;
    }
    Ok(())
}

/// Every `dir/*.trace`, by name.
fn load_traces(dir: &Path) -> Res<Vec<(String, Trace)>> {
    let mut names: Vec<String> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter_map(|n| n.strip_suffix(".trace").map(str::to_owned))
        .collect();
    names.sort();
    let mut out = Vec::new();
    for name in names {
        let path = dir.join(format!("{name}.trace"));
        let text = std::fs::read_to_string(&path)?;
        let mut tr = Trace::new();
        for (n, line) in text.lines().enumerate() {
            let bad = || format!("{}:{}: bad line {line:?}", path.display(), n + 1);
            let p: Vec<&str> = line.split_whitespace().collect();
            let num = |s: &str| s.parse::<u64>().map_err(|_| bad());
            match p[..] {
                ["a", id, size] => tr.push((true, num(id)?, num(size)? as usize)),
                ["f", id] => tr.push((false, num(id)?, 0)),
                _ => return Err(bad().into()),
            }
        }
        out.push((name, tr));
    }
    Ok(out)
}

/// Replays `tr`; (ns per op, peak reserved, peak allocated (rounded)).
fn replay(b: &dyn TensorAllocator, tr: &Trace) -> Res<(f64, u64, u64)> {
    let mut live: HashMap<u64, Allocation> = HashMap::with_capacity(4096);
    let t0 = Instant::now();
    for &(a, id, n) in tr {
        if a {
            live.insert(id, b.allocate(&AllocRequest::bytes(n))?);
        } else if let Some(x) = live.remove(&id) {
            // SAFETY: replayed handles are never used after their free.
            unsafe { b.deallocate(&x)? };
        }
    }
    let ns = t0.elapsed().as_nanos() as f64 / tr.len() as f64;
    let s = b.stats();
    Ok((ns, s.reserved_bytes.peak, s.active_bytes.peak))
}

fn predict(dir: &Path) -> Res<()> {
    write_traces(dir)?;
    let mut out = String::from("{");
    for (i, (name, tr)) in load_traces(dir)?.iter().enumerate() {
        let m = MetaBackend::cuda_policy(141 << 30, CudaConfig::default())?;
        let (_, reserved, allocated) = replay(&m, tr)?;
        let sep = if i > 0 { "," } else { "" };
        write!(
            out,
            "{sep}\"{name}\":{{\"predicted_peak_reserved\":{reserved},\"predicted_peak_allocated\":{allocated}}}"
        )?;
    }
    out.push('}');
    println!("{out}");
    Ok(())
}

/// The pool's host-side hit cost on the simulated driver (the same code
/// path as on a GPU: a hit makes no driver call), interleaved per
/// repetition with the host backend's alloc+free of the same size.
fn sim_hits() -> Res<()> {
    use tensorpool::backend::HostBackend;
    use tensorpool::backend::cuda::SimDriver;
    let pool = CudaBackend::with_driver(SimDriver::new(4 << 30), CudaConfig::default())?;
    let host = HostBackend::new();
    println!(
        "size,pool_hit_p50_ns,pool_hit_p99_ns,pool_hit_batch_p50_ns,host_p50_ns,host_p99_ns,host_batch_p50_ns"
    );
    let pair = |b: &dyn TensorAllocator, req: &AllocRequest| -> Res<()> {
        let a = b.allocate(req)?;
        // SAFETY: never used.
        unsafe { b.deallocate(&a)? };
        Ok(())
    };
    for &size in &SIZES[..6] {
        let req = AllocRequest::bytes(size);
        let (mut p, mut h, mut pb, mut hb) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for rep in 0..20_001 {
            for (b, v) in [(&pool as &dyn TensorAllocator, &mut p), (&host, &mut h)] {
                let t = Instant::now();
                pair(b, &req)?;
                if rep > 0 {
                    v.push(t.elapsed().as_nanos() as u64);
                }
            }
            // Every 100th repetition: 100 pairs under one timer (no
            // per-pair timer cost), as a per-pair mean.
            if rep % 100 == 0 {
                for (b, v) in [(&pool as &dyn TensorAllocator, &mut pb), (&host, &mut hb)] {
                    let t = Instant::now();
                    for _ in 0..100 {
                        pair(b, &req)?;
                    }
                    v.push(t.elapsed().as_nanos() as u64 / 100);
                }
            }
        }
        let (p, h, pb, hb) = (stats(p), stats(h), stats(pb), stats(hb));
        println!("{size},{},{},{},{},{},{}", p.0, p.1, pb.0, h.0, h.1, hb.0);
    }
    Ok(())
}

fn stats(mut v: Vec<u64>) -> (u64, u64) {
    v.sort_unstable();
    let p = |q: f64| v[((v.len() - 1) as f64 * q).round() as usize];
    (p(0.5), p(0.99))
}

fn reps(size: usize, many: usize) -> usize {
    if size >= 256 << 20 {
        many.min(50)
    } else {
        many
    }
}

fn gpu(dir: &Path, out: &Path) -> Res<()> {
    use cudarc::driver::result as cr;
    use cudarc::driver::sys;
    let pool = CudaBackend::new(0)?;
    let info = pool.driver().info().clone();
    let ctx = pool.driver().context().clone();
    let stream = ctx.default_stream();
    ctx.bind_to_thread()?;
    let mut rows = Vec::new();
    for &size in &SIZES {
        let req = AllocRequest::bytes(size);
        let time = |f: &mut dyn FnMut() -> Res<()>,
                    n: usize,
                    between: &mut dyn FnMut() -> Res<()>|
         -> Res<Vec<u64>> {
            let mut v = Vec::with_capacity(n);
            for _ in 0..n {
                let t = Instant::now();
                f()?;
                v.push(t.elapsed().as_nanos() as u64);
                between()?;
            }
            Ok(v)
        };
        let nothing = &mut || -> Res<()> { Ok(()) };
        // Pool hit: the block is cached after the first pair.
        let pair = &mut || -> Res<()> {
            let a = pool.allocate(&req)?;
            // SAFETY: not used after the free.
            unsafe { pool.deallocate(&a)? };
            Ok(())
        };
        pair()?;
        let hit = time(pair, reps(size, 5000), nothing)?;
        // Pool miss: the cache is emptied between pairs.
        let empty = &mut || -> Res<()> {
            pool.empty_cache()?;
            Ok(())
        };
        empty()?;
        let miss = time(pair, reps(size, 200), empty)?;
        // Raw cuMemAlloc + cuMemFree.
        let raw = time(
            &mut || -> Res<()> {
                // SAFETY: a fresh allocation freed at once, never used.
                unsafe {
                    let p = cr::malloc_sync(size)?;
                    cr::free_sync(p)?;
                }
                Ok(())
            },
            reps(size, 200),
            nothing,
        )?;
        // cuMemAllocAsync + cuMemFreeAsync on the default pool.
        let mut asyncs = Vec::new();
        for threshold in [0u64, u64::MAX] {
            // SAFETY: the device's default pool; the attribute takes a u64.
            unsafe {
                let mp = cr::device::get_default_mem_pool(ctx.cu_device())?;
                let mut v = threshold;
                sys::cuMemPoolSetAttribute(
                    mp,
                    sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
                    (&mut v as *mut u64).cast(),
                )
                .result()?;
            }
            let cs = stream.cu_stream();
            let v = time(
                &mut || -> Res<()> {
                    // SAFETY: stream-ordered alloc and free, never used.
                    unsafe {
                        let p = cr::malloc_async(cs, size)?;
                        cr::free_async(p, cs)?;
                    }
                    Ok(())
                },
                reps(size, 1000),
                &mut || -> Res<()> {
                    stream.synchronize()?;
                    Ok(())
                },
            )?;
            asyncs.push(stats(v));
        }
        // cudarc's stream.alloc + drop (candle's path).
        let cud = time(
            &mut || -> Res<()> {
                // SAFETY: uninitialised device memory, never read.
                let s = unsafe { stream.alloc::<u8>(size)? };
                drop(s);
                Ok(())
            },
            reps(size, 1000),
            &mut || -> Res<()> {
                stream.synchronize()?;
                Ok(())
            },
        )?;
        let (h, m, r, c) = (stats(hit), stats(miss), stats(raw), stats(cud));
        rows.push(format!(
            "{{\"size\":{size},\"pool_hit\":[{},{}],\"pool_miss\":[{},{}],\"cuMemAlloc\":[{},{}],\"cuMemAllocAsync_threshold0\":[{},{}],\"cuMemAllocAsync_thresholdMax\":[{},{}],\"cudarc_alloc\":[{},{}]}}",
            h.0, h.1, m.0, m.1, r.0, r.1, asyncs[0].0, asyncs[0].1, asyncs[1].0, asyncs[1].1, c.0, c.1
        ));
        eprintln!(
            "size {size}: pool hit p50 {} ns, cuMemAllocAsync(0) p50 {} ns",
            h.0, asyncs[0].0
        );
    }
    pool.empty_cache()?;
    write_traces(dir)?;
    let mut reps_json = Vec::new();
    for (name, tr) in load_traces(dir)? {
        let b = CudaBackend::new(0)?;
        let (ns, reserved, allocated) = replay(&b, &tr)?;
        let m = MetaBackend::cuda_policy(info.total_memory, CudaConfig::default())?;
        let (_, predicted, _) = replay(&m, &tr)?;
        reps_json.push(format!(
            "\"{name}\":{{\"ops\":{},\"ns_per_op\":{ns:.1},\"peak_reserved\":{reserved},\"peak_allocated\":{allocated},\"predicted_peak_reserved\":{predicted}}}",
            tr.len()
        ));
        b.empty_cache()?;
    }
    let json = format!(
        "{{\"device\":{:?},\"total_memory\":{},\"driver_version\":{},\"memory_pools\":{},\"costs_ns_p50_p99\":[{}],\"replay\":{{{}}}}}\n",
        info.name,
        info.total_memory,
        info.driver_version,
        info.memory_pools,
        rows.join(","),
        reps_json.join(",")
    );
    std::fs::write(out, json)?;
    println!("wrote {}", out.display());
    Ok(())
}
