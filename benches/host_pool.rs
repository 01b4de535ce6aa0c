//! Criterion benches: the pool against its peers, every workload of the
//! foundation issue for every allocator in one run (group = workload,
//! function = allocator).
//!
//! `cargo bench --bench host_pool` compares the pool with glibc;
//! `--features peers` adds mimalloc and jemalloc. Times are per unit
//! (one pair, one item, one batch of 1,000 for `mixed-1000`, one prewarm,
//! one trim); the throughput shown is operations per second.

mod common;

use common::{Suite, allocators, workloads};
use criterion::{Criterion, SamplingMode, Throughput};
use std::time::Duration;

fn bench(c: &mut Criterion) {
    let allocs = allocators();
    for w in workloads(Suite::Bench) {
        let mut g = c.benchmark_group(&w.name);
        g.throughput(Throughput::Elements(w.ops));
        // Units of a millisecond and more (touching 16 MiB, prewarm, trim
        // after a batch) would not fit the default linear sampling.
        g.sampling_mode(SamplingMode::Flat);
        for a in &allocs {
            // Criterion may ask for fewer units than a sample needs (a
            // consumer thread's start-up would dominate): run at least
            // `min_units` and scale the time back to the units asked for.
            g.bench_function(a.name(), |b| {
                b.iter_custom(|iters| {
                    let n = iters.max(w.min_units);
                    a.run(&w, n).mul_f64(iters as f64 / n as f64)
                })
            });
            a.trim();
        }
        g.finish();
    }
}

/// Alloc+free pairs through `HostPool`'s own API in a tight loop: the hot
/// path with nothing of the harness around it (the "pool hit" target).
fn pool_api_pairs(c: &mut Criterion) {
    use std::hint::black_box;
    let pool = tensorpool::host::HostPool::new();
    let mut g = c.benchmark_group("pool-api-pair");
    for size in [64usize, 4 << 10, 64 << 10, 1 << 20, 16 << 20, 64 << 20] {
        let l = core::alloc::Layout::from_size_align(size, 64).unwrap();
        g.bench_function(format!("{size}B"), |b| {
            b.iter(|| {
                let p = pool.allocate(black_box(l)).unwrap();
                // SAFETY: allocated just above with `l`, freed once.
                unsafe { pool.deallocate(black_box(p), l) };
            })
        });
    }
    g.finish();
}

/// Constructing a pool maps nothing; the issue asks for well under 1 ms.
fn construction(c: &mut Criterion) {
    c.bench_function("pool-construct+drop", |b| {
        b.iter(|| drop(std::hint::black_box(tensorpool::host::HostPool::new())))
    });
}

fn config() -> Criterion {
    Criterion::default()
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_millis(1500))
        .sample_size(20)
        .configure_from_args()
}

fn main() {
    let mut c = config();
    construction(&mut c);
    pool_api_pairs(&mut c);
    bench(&mut c);
    c.final_summary();
}
