//! Does block alignment change the speed of SIMD kernels on tensor buffers?
//!
//! An AVX2+FMA saxpy (`y += a·x`) and dot product over `f32` buffers whose
//! start sits at page + 0, page + 16 (where glibc's malloc puts large blocks)
//! and page + 64 (cache-line aligned, not page aligned), for buffer sizes
//! 4 KiB … 1 MiB. The pool's alignment rules (≥ 64 B from 4 KiB, page aligned
//! from 32 KiB) were chosen from this bench; the README quotes its medians.
//! Run: `cargo bench --bench alignment`.

#![allow(missing_docs)] // criterion_group! generates undocumented items

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use std::hint::black_box;

/// A page-aligned buffer with `off` bytes of lead-in, holding `n` floats.
struct Buf {
    base: *mut u8,
    layout: std::alloc::Layout,
    off: usize,
    n: usize,
}

impl Buf {
    fn new(n: usize, off: usize) -> Buf {
        let layout = std::alloc::Layout::from_size_align(n * 4 + off, 4096).unwrap();
        // SAFETY: non-zero size.
        let base = unsafe { std::alloc::alloc_zeroed(layout) };
        assert!(!base.is_null());
        Buf {
            base,
            layout,
            off,
            n,
        }
    }
    fn slice(&mut self) -> &mut [f32] {
        // SAFETY: `off` is a multiple of 4 and the allocation holds `off + 4n`
        // zeroed bytes, so this is `n` valid, aligned f32s, borrowed uniquely.
        unsafe { core::slice::from_raw_parts_mut(self.base.add(self.off).cast(), self.n) }
    }
}

impl Drop for Buf {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout.
        unsafe { std::alloc::dealloc(self.base, self.layout) }
    }
}

#[cfg(target_arch = "x86_64")]
mod kernels {
    use core::arch::x86_64::*;

    /// # Safety
    /// - The CPU supports AVX2 and FMA; `x.len() == y.len()`.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn saxpy(a: f32, x: &[f32], y: &mut [f32]) {
        let n = x.len() / 8 * 8;
        let va = _mm256_set1_ps(a);
        let mut i = 0;
        while i < n {
            // SAFETY: i + 8 ≤ n ≤ len for both slices; unaligned loads/stores.
            unsafe {
                let vx = _mm256_loadu_ps(x.as_ptr().add(i));
                let vy = _mm256_loadu_ps(y.as_ptr().add(i));
                _mm256_storeu_ps(y.as_mut_ptr().add(i), _mm256_fmadd_ps(va, vx, vy));
            }
            i += 8;
        }
    }

    /// # Safety
    /// - The CPU supports AVX2 and FMA; `x.len() == y.len()`.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dot(x: &[f32], y: &[f32]) -> f32 {
        let n = x.len() / 32 * 32;
        let mut acc = [_mm256_setzero_ps(); 4];
        let mut i = 0;
        while i < n {
            for (k, a) in acc.iter_mut().enumerate() {
                // SAFETY: i + 32 ≤ n ≤ len for both slices.
                unsafe {
                    *a = _mm256_fmadd_ps(
                        _mm256_loadu_ps(x.as_ptr().add(i + 8 * k)),
                        _mm256_loadu_ps(y.as_ptr().add(i + 8 * k)),
                        *a,
                    );
                }
            }
            i += 32;
        }
        let s = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
        let mut out = [0f32; 8];
        // SAFETY: `out` holds 8 floats.
        unsafe { _mm256_storeu_ps(out.as_mut_ptr(), s) };
        out.iter().sum()
    }
}

fn alignment(c: &mut Criterion) {
    #[cfg(target_arch = "x86_64")]
    {
        if !(is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")) {
            eprintln!("alignment bench: needs AVX2+FMA, skipped");
            return;
        }
        for (name, which) in [("saxpy", 0), ("dot", 1)] {
            let mut g = c.benchmark_group(format!("alignment/{name}"));
            g.sample_size(30)
                .warm_up_time(std::time::Duration::from_millis(300))
                .measurement_time(std::time::Duration::from_secs(1));
            for kib in [4usize, 16, 32, 64, 256, 1024] {
                let n = kib * 1024 / 4;
                g.throughput(Throughput::Bytes((2 * n * 4) as u64));
                for off in [0usize, 16, 64] {
                    let (mut x, mut y) = (Buf::new(n, off), Buf::new(n, off));
                    x.slice()
                        .iter_mut()
                        .enumerate()
                        .for_each(|(i, v)| *v = i as f32 * 0.5);
                    g.bench_function(
                        BenchmarkId::new(format!("page+{off}"), format!("{kib}KiB")),
                        |b| {
                            let xs: &[f32] = x.slice();
                            let ys = y.slice();
                            b.iter(|| {
                                // SAFETY: AVX2 and FMA detected above; equal lengths.
                                unsafe {
                                    if which == 0 {
                                        kernels::saxpy(black_box(1.0001), xs, ys);
                                    } else {
                                        black_box(kernels::dot(xs, ys));
                                    }
                                }
                            })
                        },
                    );
                }
            }
            g.finish();
        }
    }
}

criterion_group!(benches, alignment);
criterion_main!(benches);
