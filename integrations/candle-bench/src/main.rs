//! Three candle 0.11 CPU workloads timed under one `#[global_allocator]`,
//! chosen at build time by a cargo feature (`glibc`, `mimalloc`, `jemalloc`
//! or `tensorpool`; exactly one). `run.sh` builds all four and runs them
//! interleaved; see README.md.
//!
//! One process runs one workload (`--workload NAME`), so that its peak RSS
//! (VmHWM) is that workload's alone:
//!
//! - `mlp-infer`: forward pass of an MLP 784 → 1024 → 1024 → 10 (ReLU),
//!   batch 128, weights as plain tensors (as loaded from safetensors), no
//!   gradient tracking.
//! - `transformer`: forward pass of two pre-norm transformer blocks
//!   (d_model 256, 4 heads of 64, GELU MLP 256 → 1024 → 256), sequence 128,
//!   batch 4: layer norm, Q/K/V projections, scaled dot-product attention with
//!   softmax, output projection, residual, layer norm, MLP, residual. The block
//!   is candle-trace's, at a realistic size and stacked twice.
//! - `mlp-train`: one training step of the `mlp-infer` MLP with trainable
//!   variables: forward, cross-entropy, backward, AdamW update (the optimizer
//!   keeps two moment tensors per parameter).
//!
//! After `--warmup` untimed repetitions it times `--reps` repetitions of
//! `--steps` steps each and prints one `key=value` line: the median, minimum
//! and maximum steps/s over the repetitions, the CPU time (user + system, all
//! threads) and minor page faults per step over all timed steps (getrusage;
//! less disturbed than wall time on a loaded machine, and the faults show
//! memory handed back to the kernel and faulted in again), and the process's
//! peak RSS (VmHWM from /proc/self/status) at the end.

use std::hint::black_box;
use std::process::ExitCode;
use std::time::Instant;

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{AdamW, LayerNorm, Linear, Optimizer, ParamsAdamW, VarBuilder, VarMap};

#[cfg(not(any(
    feature = "glibc",
    feature = "mimalloc",
    feature = "jemalloc",
    feature = "tensorpool"
)))]
compile_error!("pick the global allocator: --features glibc|mimalloc|jemalloc|tensorpool");

#[cfg(any(
    all(
        feature = "glibc",
        any(feature = "mimalloc", feature = "jemalloc", feature = "tensorpool")
    ),
    all(
        feature = "mimalloc",
        any(feature = "jemalloc", feature = "tensorpool")
    ),
    all(feature = "jemalloc", feature = "tensorpool"),
))]
compile_error!("exactly one allocator feature: glibc, mimalloc, jemalloc or tensorpool");

#[cfg(feature = "glibc")]
const ALLOC: &str = "glibc";
#[cfg(feature = "glibc")]
#[global_allocator]
static A: std::alloc::System = std::alloc::System;

#[cfg(feature = "mimalloc")]
const ALLOC: &str = "mimalloc";
#[cfg(feature = "mimalloc")]
#[global_allocator]
static A: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[cfg(feature = "jemalloc")]
const ALLOC: &str = "jemalloc";
#[cfg(feature = "jemalloc")]
#[global_allocator]
static A: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[cfg(feature = "tensorpool")]
const ALLOC: &str = "tensorpool";
#[cfg(feature = "tensorpool")]
#[global_allocator]
static A: tensorpool::TensorGlobalAlloc = tensorpool::TensorGlobalAlloc::new();

type Error = Box<dyn std::error::Error>;

const WORKLOADS: [&str; 3] = ["mlp-infer", "transformer", "mlp-train"];

// MLP shape (both MLP workloads).
const MLP_IN: usize = 784;
const MLP_HIDDEN: usize = 1024;
const MLP_OUT: usize = 10;
const MLP_BATCH: usize = 128;

// Transformer shape.
const D_MODEL: usize = 256;
const HEADS: usize = 4;
const SEQ: usize = 128;
const BATCH: usize = 4;
const BLOCKS: usize = 2;

/// A linear layer with plain (untracked) weights, scaled like candle's
/// default init so activations stay finite.
fn linear(in_dim: usize, out_dim: usize, dev: &Device) -> candle_core::Result<Linear> {
    let bound = 1.0 / (in_dim as f64).sqrt();
    let w = Tensor::rand(-bound as f32, bound as f32, (out_dim, in_dim), dev)?;
    let b = Tensor::rand(-bound as f32, bound as f32, out_dim, dev)?;
    Ok(Linear::new(w, Some(b)))
}

fn layer_norm(dim: usize, dev: &Device) -> candle_core::Result<LayerNorm> {
    Ok(LayerNorm::new(
        Tensor::ones(dim, DType::F32, dev)?,
        Tensor::zeros(dim, DType::F32, dev)?,
        1e-5,
    ))
}

struct Mlp {
    l1: Linear,
    l2: Linear,
    l3: Linear,
}

impl Mlp {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let h = self.l1.forward(x)?.relu()?;
        let h = self.l2.forward(&h)?.relu()?;
        self.l3.forward(&h)
    }
}

/// One pre-norm transformer block (candle-trace's, with weights built once).
struct Block {
    ln1: LayerNorm,
    ln2: LayerNorm,
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    up: Linear,
    down: Linear,
}

impl Block {
    fn new(dev: &Device) -> candle_core::Result<Self> {
        Ok(Self {
            ln1: layer_norm(D_MODEL, dev)?,
            ln2: layer_norm(D_MODEL, dev)?,
            q: linear(D_MODEL, D_MODEL, dev)?,
            k: linear(D_MODEL, D_MODEL, dev)?,
            v: linear(D_MODEL, D_MODEL, dev)?,
            o: linear(D_MODEL, D_MODEL, dev)?,
            up: linear(D_MODEL, 4 * D_MODEL, dev)?,
            down: linear(4 * D_MODEL, D_MODEL, dev)?,
        })
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let (batch, seq, d_model) = x.dims3()?;
        let head_dim = d_model / HEADS;
        let h = self.ln1.forward(x)?;
        let split = |t: Tensor| -> candle_core::Result<Tensor> {
            t.reshape((batch, seq, HEADS, head_dim))?
                .transpose(1, 2)?
                .contiguous()
        };
        let (qh, kh, vh) = (
            split(self.q.forward(&h)?)?,
            split(self.k.forward(&h)?)?,
            split(self.v.forward(&h)?)?,
        );
        let scores = (qh.matmul(&kh.t()?.contiguous()?)? / (head_dim as f64).sqrt())?;
        let probs = candle_nn::ops::softmax_last_dim(&scores)?;
        let ctx = probs
            .matmul(&vh)?
            .transpose(1, 2)?
            .contiguous()?
            .reshape((batch, seq, d_model))?;
        let x = (x + self.o.forward(&ctx)?)?;
        let h = self.ln2.forward(&x)?;
        &x + self.down.forward(&self.up.forward(&h)?.gelu()?)?
    }
}

/// A workload set up once, then stepped repeatedly.
enum Workload {
    MlpInfer {
        mlp: Mlp,
        x: Tensor,
    },
    Transformer {
        blocks: Vec<Block>,
        x: Tensor,
    },
    MlpTrain {
        mlp: Mlp,
        opt: AdamW,
        x: Tensor,
        y: Tensor,
        first_loss: Option<f32>,
        last_loss: f32,
    },
}

impl Workload {
    fn new(name: &str, dev: &Device) -> Result<Self, Error> {
        Ok(match name {
            "mlp-infer" => Workload::MlpInfer {
                mlp: Mlp {
                    l1: linear(MLP_IN, MLP_HIDDEN, dev)?,
                    l2: linear(MLP_HIDDEN, MLP_HIDDEN, dev)?,
                    l3: linear(MLP_HIDDEN, MLP_OUT, dev)?,
                },
                x: Tensor::randn(0f32, 1.0, (MLP_BATCH, MLP_IN), dev)?,
            },
            "transformer" => Workload::Transformer {
                blocks: (0..BLOCKS)
                    .map(|_| Block::new(dev))
                    .collect::<candle_core::Result<_>>()?,
                x: Tensor::randn(0f32, 1.0, (BATCH, SEQ, D_MODEL), dev)?,
            },
            "mlp-train" => {
                let varmap = VarMap::new();
                let vb = VarBuilder::from_varmap(&varmap, DType::F32, dev);
                let mlp = Mlp {
                    l1: candle_nn::linear(MLP_IN, MLP_HIDDEN, vb.pp("l1"))?,
                    l2: candle_nn::linear(MLP_HIDDEN, MLP_HIDDEN, vb.pp("l2"))?,
                    l3: candle_nn::linear(MLP_HIDDEN, MLP_OUT, vb.pp("l3"))?,
                };
                let opt = AdamW::new(
                    varmap.all_vars(),
                    ParamsAdamW {
                        lr: 1e-3,
                        ..ParamsAdamW::default()
                    },
                )?;
                let labels: Vec<u32> = (0..MLP_BATCH as u32)
                    .map(|i| (i * 7) % MLP_OUT as u32)
                    .collect();
                Workload::MlpTrain {
                    mlp,
                    opt,
                    x: Tensor::randn(0f32, 1.0, (MLP_BATCH, MLP_IN), dev)?,
                    y: Tensor::new(labels.as_slice(), dev)?,
                    first_loss: None,
                    last_loss: f32::NAN,
                }
            }
            other => {
                return Err(format!(
                    "unknown workload {other:?}; expected one of {}",
                    WORKLOADS.join(", ")
                )
                .into());
            }
        })
    }

    fn step(&mut self) -> candle_core::Result<()> {
        match self {
            Workload::MlpInfer { mlp, x } => {
                black_box(mlp.forward(x)?);
            }
            Workload::Transformer { blocks, x } => {
                let mut h = x.clone();
                for b in blocks.iter() {
                    h = b.forward(&h)?;
                }
                black_box(h);
            }
            Workload::MlpTrain {
                mlp,
                opt,
                x,
                y,
                first_loss,
                last_loss,
            } => {
                let logits = mlp.forward(x)?;
                let loss = candle_nn::loss::cross_entropy(&logits, y)?;
                opt.backward_step(&loss)?;
                let l = loss.to_scalar::<f32>()?;
                first_loss.get_or_insert(l);
                *last_loss = l;
            }
        }
        Ok(())
    }

    /// A one-line check that the work was done (the training loss must fall).
    fn check(&self) -> Result<String, Error> {
        match self {
            Workload::MlpTrain {
                first_loss: Some(first),
                last_loss,
                ..
            } => {
                if !(last_loss.is_finite() && last_loss < first) {
                    return Err(format!(
                        "training did not reduce the loss: first {first}, last {last_loss}"
                    )
                    .into());
                }
                Ok(format!("loss_first={first:.4} loss_last={last_loss:.4}"))
            }
            _ => Ok(String::from("check=none")),
        }
    }
}

struct Args {
    workload: String,
    warmup: usize,
    reps: usize,
    steps: Option<usize>,
}

const USAGE: &str = "usage: candle-bench --workload mlp-infer|transformer|mlp-train \
[--reps N (default 7)] [--warmup N (default 2)] [--steps N per repetition]";

fn parse_args() -> Result<Args, Error> {
    let mut args = Args {
        workload: String::new(),
        warmup: 2,
        reps: 7,
        steps: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        if flag == "--help" || flag == "-h" {
            println!("{USAGE}");
            std::process::exit(0);
        }
        let value = it
            .next()
            .ok_or_else(|| format!("{flag} needs a value; {USAGE}"))?;
        let count = |v: &str, min: usize| -> Result<usize, Error> {
            match v.parse::<usize>() {
                Ok(n) if n >= min => Ok(n),
                _ => Err(format!("{flag} {v:?}: expected an integer ≥ {min}").into()),
            }
        };
        match flag.as_str() {
            "--workload" => args.workload = value,
            "--warmup" => args.warmup = count(&value, 0)?,
            "--reps" => args.reps = count(&value, 1)?,
            "--steps" => args.steps = Some(count(&value, 1)?),
            _ => return Err(format!("unknown argument {flag:?}; {USAGE}").into()),
        }
    }
    if args.workload.is_empty() {
        return Err(format!("--workload is required; {USAGE}").into());
    }
    Ok(args)
}

/// Steps per timed repetition: about 0.2–0.7 s on 2 threads of this
/// 2-core machine, idle to loaded. Fixed (not calibrated per run) so every
/// allocator does the same work and its peak RSS covers the same steps.
fn default_steps(workload: &str) -> usize {
    match workload {
        "mlp-infer" => 10,
        "transformer" => 4,
        _ => 3,
    }
}

/// Peak resident set size of this process in KiB (VmHWM).
fn peak_rss_kib() -> Result<u64, Error> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .ok_or_else(|| "no VmHWM line in /proc/self/status".into())
}

/// CPU time (user + system, every thread) in seconds and minor page faults
/// of this process so far.
fn cpu_and_faults() -> Result<(f64, u64), Error> {
    let mut ru = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: `ru` is a writable, properly aligned `rusage`; getrusage only
    // writes into it and RUSAGE_SELF is a valid `who`.
    let rc = unsafe { libc::getrusage(libc::RUSAGE_SELF, ru.as_mut_ptr()) };
    if rc != 0 {
        return Err(format!("getrusage: {}", std::io::Error::last_os_error()).into());
    }
    // SAFETY: getrusage returned 0, so it filled the struct (and it was
    // zeroed before, a valid `rusage` in any case).
    let ru = unsafe { ru.assume_init() };
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 * 1e-6;
    Ok((secs(ru.ru_utime) + secs(ru.ru_stime), ru.ru_minflt as u64))
}

/// The pool's own counters (tensorpool variant only): mappings made, bytes
/// unmapped, fresh-block requests (cache misses), bytes reserved now.
#[cfg(feature = "tensorpool")]
fn pool_counters() -> [u64; 4] {
    let s = A.stats();
    [
        s.os_maps as u64,
        s.reserved.freed,
        s.cache_misses,
        s.reserved_bytes as u64,
    ]
}

/// `key=value` fields on the pool's work during the timed steps (per step)
/// and its reservation at the end; empty for the other allocators.
#[cfg(feature = "tensorpool")]
fn pool_fields(before: [u64; 4], steps: f64) -> String {
    let after = pool_counters();
    format!(
        " pool_maps_per_step={:.2} pool_unmapped_kib_per_step={:.1} \
         pool_misses_per_step={:.1} pool_reserved_kib={}",
        (after[0] - before[0]) as f64 / steps,
        (after[1] - before[1]) as f64 / 1024.0 / steps,
        (after[2] - before[2]) as f64 / steps,
        after[3] / 1024,
    )
}

#[cfg(not(feature = "tensorpool"))]
fn pool_counters() -> [u64; 4] {
    [0; 4]
}

#[cfg(not(feature = "tensorpool"))]
fn pool_fields(_before: [u64; 4], _steps: f64) -> String {
    String::new()
}

fn median(sorted: &[f64]) -> f64 {
    let n = sorted.len();
    if n % 2 == 1 {
        sorted[n / 2]
    } else {
        (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0
    }
}

fn run() -> Result<(), Error> {
    let args = parse_args()?;
    let dev = Device::Cpu;
    let mut w = Workload::new(&args.workload, &dev)?;
    let steps = args.steps.unwrap_or_else(|| default_steps(&args.workload));
    for _ in 0..args.warmup * steps {
        w.step()?;
    }
    let mut rates = Vec::with_capacity(args.reps);
    let pool0 = pool_counters();
    let (cpu0, faults0) = cpu_and_faults()?;
    for _ in 0..args.reps {
        let t = Instant::now();
        for _ in 0..steps {
            w.step()?;
        }
        rates.push(steps as f64 / t.elapsed().as_secs_f64());
    }
    let (cpu1, faults1) = cpu_and_faults()?;
    let timed_steps = (args.reps * steps) as f64;
    let pool = pool_fields(pool0, timed_steps);
    rates.sort_by(f64::total_cmp);
    let check = w.check()?;
    let peak = peak_rss_kib()?;
    println!(
        "workload={} alloc={ALLOC} threads={} reps={} steps_per_rep={steps} \
         steps_per_s={:.3} min={:.3} max={:.3} cpu_ms_per_step={:.3} \
         minflt_per_step={:.1} peak_rss_kib={peak} {check}{pool}",
        args.workload,
        candle_core::utils::get_num_threads(),
        args.reps,
        median(&rates),
        rates[0],
        rates[rates.len() - 1],
        (cpu1 - cpu0) * 1e3 / timed_steps,
        (faults1 - faults0) as f64 / timed_steps,
    );
    Ok(())
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("candle-bench: {e}");
            ExitCode::FAILURE
        }
    }
}
