//! Streaming a safetensors model through the offload tier, layer by layer,
//! against the ways to read the same file without it.
//!
//! `cargo bench --features offload-safetensors --bench offload`
//! (env: `OFFLOAD_BENCH_LAYERS` = layers of 32 MiB, default 32 → 1 GiB;
//! `OFFLOAD_BENCH_REPS`, default 3; `OFFLOAD_BENCH_DIR`, default the temp dir;
//! `OFFLOAD_BENCH_DEBUG` set: print the offload counters after each pass).
//!
//! A model of bf16 [4096, 4096] layers is generated into a temporary
//! directory (deleted at the end) on the disk the temp dir lives on. Each
//! repetition runs every method once, interleaved, in two cache states:
//! - **warm**: the file is in the page cache (read once before);
//! - **cold**: `fsync` then `posix_fadvise(POSIX_FADV_DONTNEED)` on the whole
//!   file before the run, so the pages come from the disk.
//!
//! Methods, each reading every layer once, in order:
//! - `pread` — one `read_exact_at` per layer into a reused buffer: the floor
//!   (cold: the disk's own sequential read);
//! - `mmap touch` — `memmap2` map, one byte read per 4 KiB page;
//! - `safetensors mmap` — `SafeTensors::deserialize` over the map and a copy
//!   of each tensor out of it (how candle loads a file);
//! - `offload` — `OffloadBackend<HostBackend>` with a budget of ¼ of the
//!   file, `open_safetensors`, `pin` per layer (one backend for the whole
//!   run, its pool's pages faulted in by a first, unmeasured pass — a
//!   fresh pool's page faults cost more than the reads on this machine);
//! - `offload + order` — the same with `set_order` (prefetch depth 2).
//!
//! Then prefetch hiding: every layer followed by a timed spin ("compute")
//! as long as the measured per-layer load time; the share of the load time
//! hidden is `(t_plain − t_order) / (t_plain − t_compute)`.
//!
//! Medians of the repetitions are printed as a Markdown table.

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tensorpool::TensorAllocator;
use tensorpool::backend::offload::SafetensorsOptions;
use tensorpool::backend::{HostBackend, OffloadBackend, OffloadConfig};

const ROWS: usize = 4096;
const COLS: usize = 4096;
const LAYER: usize = ROWS * COLS * 2;

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Writes the model; returns the header length (data starts after it).
fn generate(path: &Path, layers: usize) -> usize {
    let mut h = String::from("{");
    for i in 0..layers {
        if i > 0 {
            h.push(',');
        }
        h += &format!(
            "\"layers.{i:03}.weight\":{{\"dtype\":\"BF16\",\"shape\":[{ROWS},{COLS}],\"data_offsets\":[{},{}]}}",
            i * LAYER,
            (i + 1) * LAYER
        );
    }
    h.push('}');
    while h.len() % 8 != 0 {
        h.push(' ');
    }
    let mut f = std::io::BufWriter::with_capacity(8 << 20, File::create(path).unwrap());
    f.write_all(&(h.len() as u64).to_le_bytes()).unwrap();
    f.write_all(h.as_bytes()).unwrap();
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    let mut buf = vec![0u8; LAYER];
    for _ in 0..layers {
        for c in buf.chunks_exact_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            c.copy_from_slice(&x.to_le_bytes());
        }
        f.write_all(&buf).unwrap();
    }
    let f = f.into_inner().unwrap();
    f.sync_all().unwrap();
    8 + h.len()
}

/// Drops the file's pages from the page cache (after `fsync`).
fn drop_cache(path: &Path) {
    let f = File::open(path).unwrap();
    f.sync_all().unwrap();
    // SAFETY: a valid open descriptor; advice only, no memory is touched.
    let r = unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    assert_eq!(r, 0, "posix_fadvise");
}

fn spin(d: Duration) {
    let t = Instant::now();
    while t.elapsed() < d {
        std::hint::spin_loop();
    }
}

fn run_pread(path: &Path, base: usize, layers: usize, buf: &mut [u8]) -> u64 {
    let f = File::open(path).unwrap();
    let mut sum = 0u64;
    for i in 0..layers {
        f.read_exact_at(buf, (base + i * LAYER) as u64).unwrap();
        sum = sum.wrapping_add(u64::from(buf[i % LAYER]));
    }
    sum
}

fn run_mmap_touch(path: &Path, base: usize, layers: usize) -> u64 {
    let f = File::open(path).unwrap();
    // SAFETY: read-only map of a file this process does not modify meanwhile.
    let m = unsafe { memmap2::Mmap::map(&f) }.unwrap();
    let mut sum = 0u64;
    for i in 0..layers {
        let l = &m[base + i * LAYER..base + (i + 1) * LAYER];
        for p in l.iter().step_by(4096) {
            sum = sum.wrapping_add(u64::from(*p));
        }
    }
    std::hint::black_box(sum)
}

fn run_safetensors_mmap(path: &Path, buf: &mut [u8]) -> u64 {
    let f = File::open(path).unwrap();
    // SAFETY: as in `run_mmap_touch`.
    let m = unsafe { memmap2::Mmap::map(&f) }.unwrap();
    let st = safetensors::SafeTensors::deserialize(&m).unwrap();
    let mut names = st.names();
    names.sort();
    let mut sum = 0u64;
    for n in names {
        let t = st.tensor(n).unwrap();
        buf.copy_from_slice(t.data());
        sum = sum.wrapping_add(u64::from(buf[7]));
    }
    sum
}

type Off = OffloadBackend<HostBackend>;

/// One pass over the file through `b` (a long-lived backend, as in an
/// inference server: its pool has faulted in the budget's pages once);
/// the file's tensors are registered for the pass and freed after it.
fn run_offload(b: &Off, path: &Path, order: bool, compute: Duration) -> u64 {
    let f = b
        .open_safetensors(path, SafetensorsOptions::default())
        .unwrap();
    let o: Vec<_> = f.tensors.iter().map(|t| t.1).collect();
    b.set_order(if order { &o } else { &[] }).unwrap();
    let mut sum = 0u64;
    for a in &o {
        let g = b.pin(a).unwrap();
        sum = sum.wrapping_add(u64::from(g.as_bytes()[7]));
        spin(compute);
        drop(g);
    }
    b.wait_prefetch_idle().unwrap();
    let s = b.offload_stats();
    assert!(s.peak_resident_bytes <= s.budget);
    if std::env::var_os("OFFLOAD_BENCH_DEBUG").is_some() {
        eprintln!("  {s:?}");
    }
    for a in &o {
        // SAFETY: no guard of `a` is alive.
        unsafe { b.deallocate(a) }.unwrap();
    }
    sum
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let layers = env("OFFLOAD_BENCH_LAYERS", 32);
    let reps = env("OFFLOAD_BENCH_REPS", 3);
    let root = std::env::var_os("OFFLOAD_BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    let dir = root.join(format!("tp-offload-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("model.safetensors");
    let t = Instant::now();
    let base = generate(&path, layers);
    let bytes = layers * LAYER;
    let budget = bytes / 4 + (1 << 20);
    eprintln!(
        "generated {} MiB ({layers} layers of 32 MiB) in {:.1} s; budget {} MiB",
        bytes >> 20,
        t.elapsed().as_secs_f64(),
        budget >> 20
    );
    let mut buf = vec![0u8; LAYER];
    let off = OffloadBackend::new(HostBackend::new(), OffloadConfig::with_budget(budget)).unwrap();
    // Fault the budget's pages in once (a long-lived backend's state).
    run_offload(&off, &path, false, Duration::ZERO);
    let methods = [
        "pread",
        "mmap touch",
        "safetensors mmap",
        "offload",
        "offload + order",
    ];
    // times[cold][method] in seconds
    let mut times = vec![vec![Vec::new(); methods.len()]; 2];
    for rep in 0..reps {
        for (cold, row) in times.iter_mut().enumerate() {
            for (m, name) in methods.iter().enumerate() {
                if cold == 1 {
                    drop_cache(&path);
                } else {
                    run_pread(&path, base, layers, &mut buf);
                }
                let t = Instant::now();
                let s = match m {
                    0 => run_pread(&path, base, layers, &mut buf),
                    1 => run_mmap_touch(&path, base, layers),
                    2 => run_safetensors_mmap(&path, &mut buf),
                    3 => run_offload(&off, &path, false, Duration::ZERO),
                    _ => run_offload(&off, &path, true, Duration::ZERO),
                };
                let dt = t.elapsed().as_secs_f64();
                std::hint::black_box(s);
                row[m].push(dt);
                eprintln!("rep {rep} {} {name}: {:.3} s", ["warm", "cold"][cold], dt);
            }
        }
    }
    let gbs = |s: f64| bytes as f64 / s / 1e9;
    println!(
        "\n| method | warm GB/s | warm ms/layer | cold GB/s | cold ms/layer | warm ÷ pread | cold ÷ pread |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|");
    let med: Vec<[f64; 2]> = (0..methods.len())
        .map(|m| [median(&mut times[0][m]), median(&mut times[1][m])])
        .collect();
    for (m, name) in methods.iter().enumerate() {
        let [w, c] = med[m];
        println!(
            "| {name} | {:.2} | {:.1} | {:.2} | {:.1} | {:.2} | {:.2} |",
            gbs(w),
            w * 1e3 / layers as f64,
            gbs(c),
            c * 1e3 / layers as f64,
            gbs(w) / gbs(med[0][0]),
            gbs(c) / gbs(med[0][1]),
        );
    }
    // Prefetch hiding: compute per layer = the measured load per layer.
    for (cold, state) in ["warm", "cold"].iter().enumerate() {
        let load = Duration::from_secs_f64(med[3][cold] / layers as f64);
        let (mut plain, mut ordered) = (Vec::new(), Vec::new());
        for _ in 0..reps {
            for (order, out) in [(false, &mut plain), (true, &mut ordered)] {
                if cold == 1 {
                    drop_cache(&path);
                } else {
                    run_pread(&path, base, layers, &mut buf);
                }
                let t = Instant::now();
                run_offload(&off, &path, order, load);
                out.push(t.elapsed().as_secs_f64());
            }
        }
        let (p, o) = (median(&mut plain), median(&mut ordered));
        let compute = load.as_secs_f64() * layers as f64;
        println!(
            "\nprefetch hiding ({state}, compute {:.1} ms/layer = the load time): plain {:.3} s, with order {:.3} s, compute alone {:.3} s → {:.0} % of the load time hidden",
            load.as_secs_f64() * 1e3,
            p,
            o,
            compute,
            100.0 * (p - o) / (p - compute).max(1e-9)
        );
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
