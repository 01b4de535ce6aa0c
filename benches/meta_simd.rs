//! Batch operations of the metadata table: `cargo bench --bench meta_simd`.
//!
//! Groups (ids are uniform random over the table; fixed seeds):
//! - `touch/{table}/{batch}`: `MetaTable::touch` (one implementation for
//!   every backend) against `naive`, a per-id atomic `fetch_add` loop over a
//!   plain column (what the original system's batch update amounts to,
//!   without its lost increments). Throughput in elements (ids).
//! - `scan/{op}/{table}`: `lru(16)`, `touched_before` (≈1 % match),
//!   `usage_by_category_scan`, `decay(1)` with every count changing
//!   (`decay_all`) and with none changing (`decay_none`), each on the
//!   scalar and the AVX2/NEON backend; against `floor`, a plain sequential
//!   read (auto-vectorized sum) of as many bytes as the op must read
//!   (12 B/slot: tag + last or tag + size; 8 B/slot for decay).
//!   Throughput in bytes, so criterion prints GB/s for all of them.
//!   Beside them `usage/counters` and `usage_dev/counters`: what
//!   `usage_by_category` and `usage_by_device` cost (O(1) counter reads;
//!   their GB/s is of the bytes a scan would read), and `usage_dev/scan`,
//!   the per-device scan.
//! - `layout/…`: the measurement behind the table's layout: a filter scan
//!   and a touch over 64-byte records (AoS) against the same over columns
//!   (SoA).

// `criterion_group!` generates an undocumented `pub fn`.
#![allow(missing_docs)]

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tensorpool::meta::{BatchBackend, IdIssuer, MetaTable, NewTensor, TensorKey};
use tensorpool::{Device, TensorFlags};

#[path = "../tests/meta_common/mod.rs"]
mod meta_common;
use meta_common::Rng;

const KI: usize = 1 << 10;
const MI: usize = 1 << 20;

fn label(n: usize) -> String {
    if n >= MI {
        format!("{}Mi", n / MI)
    } else if n >= KI {
        format!("{}Ki", n / KI)
    } else {
        n.to_string()
    }
}

/// A table of `n` tensors: sizes over all categories, 1 in 16 pinned, 1 in
/// 32 removed (dead slots), last access uniform in 0..n.
fn table(n: usize) -> (MetaTable, Vec<TensorKey>) {
    let t = MetaTable::new();
    let ids = IdIssuer::new();
    let mut rng = Rng(n as u64);
    let mut keys = Vec::with_capacity(n);
    for i in 0..n {
        let size = 1u64 << (rng.next() % 28);
        let flags = if i % 16 == 0 { TensorFlags::PINNED } else { 0 };
        let dev = if i % 3 == 0 {
            Device::Cuda(0)
        } else {
            Device::Host
        };
        let k = t
            .insert(
                ids.issue().unwrap(),
                &NewTensor {
                    flags: TensorFlags(flags),
                    ..NewTensor::bytes(size, dev)
                },
            )
            .unwrap();
        t.touch(&[k], rng.next() % n as u64 + 1);
        keys.push(k);
    }
    for k in keys.iter().step_by(32) {
        t.remove(*k);
    }
    (t, keys)
}

fn random_keys(keys: &[TensorKey], len: usize, seed: u64) -> Vec<TensorKey> {
    let mut rng = Rng(seed);
    (0..len)
        .map(|_| keys[(rng.next() % keys.len() as u64) as usize])
        .collect()
}

fn simd() -> Option<BatchBackend> {
    [BatchBackend::Avx2, BatchBackend::Neon]
        .into_iter()
        .find(|b| b.is_supported())
}

fn config() -> Criterion {
    Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_millis(200))
        .measurement_time(Duration::from_millis(700))
}

fn touch(c: &mut Criterion) {
    let mut g = c.benchmark_group("touch");
    for n in [KI, 64 * KI, MI] {
        let (t, keys) = table(n);
        let naive: Vec<AtomicU64> = (0..n).map(|_| AtomicU64::new(0)).collect();
        for batch in [16, 64, 256, KI, 64 * KI, MI] {
            let b = random_keys(&keys, batch, 7);
            g.throughput(Throughput::Elements(batch as u64));
            let mut now = n as u64;
            g.bench_function(
                BenchmarkId::new(format!("table/{}", label(n)), label(batch)),
                |bch| {
                    bch.iter(|| {
                        now += 1;
                        t.touch(black_box(&b), now)
                    })
                },
            );
            g.bench_function(
                BenchmarkId::new(format!("naive/{}", label(n)), label(batch)),
                |bch| {
                    bch.iter(|| {
                        for k in black_box(&b) {
                            naive[k.slot as usize].fetch_add(1, Ordering::Relaxed);
                        }
                    })
                },
            );
        }
    }
    g.finish();
}

/// The bandwidth floor: a plain sequential read of `w`, summed with eight
/// independent accumulators so the loads, not the adds, set the pace.
fn floor(w: &[u64]) -> u64 {
    let mut acc = [0u64; 8];
    let mut it = w.chunks_exact(8);
    for c in &mut it {
        for (a, x) in acc.iter_mut().zip(c) {
            *a = a.wrapping_add(*x);
        }
    }
    it.remainder()
        .iter()
        .chain(&acc)
        .fold(0, |a, &x| a.wrapping_add(x))
}

fn scans(c: &mut Criterion) {
    let mut g = c.benchmark_group("scan");
    let mut backends = vec![BatchBackend::Scalar];
    backends.extend(simd());
    for n in [KI, 16 * KI, 256 * KI, MI] {
        let (t, keys) = table(n);
        // The floors read 12 and 8 bytes per slot as whole u64 words.
        let words: Vec<u64> = (0..n as u64 * 3 / 2).collect();
        let mut out = Vec::new();
        g.throughput(Throughput::Bytes(12 * n as u64));
        g.bench_function(BenchmarkId::new("floor12", label(n)), |b| {
            b.iter(|| floor(black_box(&words)))
        });
        for &be in &backends {
            t.set_backend(be).unwrap();
            g.bench_function(
                BenchmarkId::new(format!("lru16/{}", be.name()), label(n)),
                |b| b.iter(|| t.lru(16, &mut out)),
            );
            g.bench_function(
                BenchmarkId::new(format!("touched_before/{}", be.name()), label(n)),
                |b| b.iter(|| t.touched_before(n as u64 / 100 + 1, &mut out)),
            );
            g.bench_function(
                BenchmarkId::new(format!("usage/{}", be.name()), label(n)),
                |b| b.iter(|| t.usage_by_category_scan()),
            );
        }
        // What `usage_by_category` and `usage_by_device` cost now: reads of
        // the counters insert and remove keep (no scan, so no backend), and
        // the per-device scan they replace.
        g.bench_function(BenchmarkId::new("usage/counters", label(n)), |b| {
            b.iter(|| t.usage_by_category())
        });
        g.bench_function(BenchmarkId::new("usage_dev/counters", label(n)), |b| {
            b.iter(|| t.usage_by_device())
        });
        g.bench_function(BenchmarkId::new("usage_dev/scan", label(n)), |b| {
            b.iter(|| t.usage_by_device_scan())
        });
        g.throughput(Throughput::Bytes(8 * n as u64));
        g.bench_function(BenchmarkId::new("floor8", label(n)), |b| {
            b.iter(|| floor(black_box(&words[..n])))
        });
        let naive: Vec<AtomicU64> = (0..n).map(|_| AtomicU64::new(0)).collect();
        g.bench_function(BenchmarkId::new("decay_all/naive", label(n)), |b| {
            b.iter_custom(|iters| {
                let mut spent = Duration::ZERO;
                for _ in 0..iters {
                    naive.iter().for_each(|c| c.store(1000, Ordering::Relaxed));
                    let t0 = Instant::now();
                    for c in &naive {
                        let _ =
                            c.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| Some(v >> 1));
                    }
                    spent += t0.elapsed();
                }
                spent
            })
        });
        // Every count ≥ 2 before each timed decay: every element changes.
        let refill: Vec<TensorKey> = keys.iter().flat_map(|k| [*k; 2]).collect();
        for &be in &backends {
            t.set_backend(be).unwrap();
            g.bench_function(
                BenchmarkId::new(format!("decay_all/{}", be.name()), label(n)),
                |b| {
                    b.iter_custom(|iters| {
                        let mut spent = Duration::ZERO;
                        for _ in 0..iters {
                            t.touch(&refill, 1);
                            let t0 = Instant::now();
                            t.decay(1);
                            spent += t0.elapsed();
                        }
                        spent
                    })
                },
            );
            t.decay(64);
            g.bench_function(
                BenchmarkId::new(format!("decay_none/{}", be.name()), label(n)),
                |b| b.iter(|| t.decay(1)),
            );
        }
    }
    g.finish();
}

/// A 64-byte record as the AoS alternative would store it.
#[repr(C, align(64))]
struct Rec([AtomicU64; 8]);

fn layout(c: &mut Criterion) {
    let mut g = c.benchmark_group("layout");
    for n in [16 * KI, MI] {
        let mut rng = Rng(1);
        let aos: Vec<Rec> = (0..n)
            .map(|_| {
                Rec(core::array::from_fn(|w| {
                    AtomicU64::new(if w == 4 { 1 } else { rng.next() % n as u64 })
                }))
            })
            .collect();
        let tag: Vec<std::sync::atomic::AtomicU32> = (0..n)
            .map(|_| std::sync::atomic::AtomicU32::new(1))
            .collect();
        let last: Vec<AtomicU64> = (0..n)
            .map(|_| AtomicU64::new(rng.next() % n as u64))
            .collect();
        let count: Vec<AtomicU64> = (0..n).map(|_| AtomicU64::new(0)).collect();
        let t = n as u64 / 100;
        g.throughput(Throughput::Elements(n as u64));
        g.bench_function(BenchmarkId::new("scan_aos", label(n)), |b| {
            b.iter(|| {
                aos.iter()
                    .filter(|r| {
                        r.0[4].load(Ordering::Relaxed) & 1 == 1
                            && r.0[3].load(Ordering::Relaxed) < t
                    })
                    .count()
            })
        });
        g.bench_function(BenchmarkId::new("scan_soa", label(n)), |b| {
            b.iter(|| {
                tag.iter()
                    .zip(&last)
                    .filter(|(g, l)| {
                        g.load(Ordering::Relaxed) & 1 == 1 && l.load(Ordering::Relaxed) < t
                    })
                    .count()
            })
        });
        let slots: Vec<usize> = (0..64 * KI)
            .map(|_| (rng.next() % n as u64) as usize)
            .collect();
        g.throughput(Throughput::Elements(slots.len() as u64));
        let mut now = 0u64;
        g.bench_function(BenchmarkId::new("touch_aos", label(n)), |b| {
            b.iter(|| {
                now += 1;
                for &s in &slots {
                    aos[s].0[2].fetch_add(1, Ordering::Relaxed);
                    aos[s].0[3].fetch_max(now, Ordering::Relaxed);
                }
            })
        });
        g.bench_function(BenchmarkId::new("touch_soa", label(n)), |b| {
            b.iter(|| {
                now += 1;
                for &s in &slots {
                    count[s].fetch_add(1, Ordering::Relaxed);
                    last[s].fetch_max(now, Ordering::Relaxed);
                }
            })
        });
    }
    g.finish();
}

criterion_group! { name = benches; config = config(); targets = touch, scans, layout }
criterion_main!(benches);
