//! `TensorGlobalAlloc` against `System` (glibc), and mimalloc / jemalloc with
//! `--features peers`, each called as a `GlobalAlloc` value:
//!
//! - `small_pair/{16,64,256}`: one alloc + free, warm;
//! - `tensor_pair/{4K … 64M}`: one alloc + free at 64 B alignment, warm;
//! - `fifo_burst/1000x64`: 1,000 blocks of 64 B allocated, then freed in
//!   the order they were allocated (the comparison's `fifo-1000x64B`);
//!   time per burst, and per block in the throughput line;
//! - `touch_16m`: alloc 16 MiB, write one byte per 4 KiB page, free (and
//!   `resident` touching an already-resident buffer, the floor);
//! - `cross_thread/{64,65536}`: one thread allocates, another frees
//!   (a single-producer ring between them); time per block, and
//!   `ring-floor`, the handoff alone with no allocator.
//!
//! `TensorGlobalAlloc` is also this binary's `#[global_allocator]`; the
//! `tensorpool-global` rows call it through `std::alloc` (the
//! `__rust_alloc` shim), as a program that installs it does.
//!
//! `cargo bench --bench global_alloc [--features peers]`

#![allow(missing_docs)] // `criterion_group!` generates an undocumented `pub fn`.

use criterion::{
    BenchmarkGroup, Criterion, criterion_group, criterion_main, measurement::WallTime,
};
use std::alloc::{GlobalAlloc, Layout, System};
use std::hint::black_box;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use tensorpool::TensorGlobalAlloc;

#[global_allocator]
static TP: TensorGlobalAlloc = TensorGlobalAlloc::new();

/// The installed global allocator, reached through `std::alloc`.
struct ViaStd;

// SAFETY: forwards to the global allocator, which upholds the contract.
unsafe impl GlobalAlloc for ViaStd {
    #[inline]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded from the caller.
        unsafe { std::alloc::alloc(layout) }
    }
    #[inline]
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded from the caller.
        unsafe { std::alloc::dealloc(ptr, layout) }
    }
}

#[cfg(feature = "peers")]
static MI: mimalloc::MiMalloc = mimalloc::MiMalloc;
#[cfg(feature = "peers")]
static JE: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// One workload, run for each allocator (generic, so calls inline as they
/// would in a program that installs that allocator).
trait Workload {
    fn run<G: GlobalAlloc + Sync + 'static>(&mut self, name: &str, g: &'static G);
}

fn for_each_allocator(w: &mut impl Workload) {
    w.run("tensorpool", &TP);
    w.run("tensorpool-global", &ViaStd);
    w.run("system", &System);
    #[cfg(feature = "peers")]
    {
        w.run("mimalloc", &MI);
        w.run("jemalloc", &JE);
    }
}

/// Alloc + free of one layout per iteration.
struct Pairs<'a, 'c> {
    group: &'a mut BenchmarkGroup<'c, WallTime>,
    layout: Layout,
    label: String,
}

impl Workload for Pairs<'_, '_> {
    fn run<G: GlobalAlloc + Sync + 'static>(&mut self, name: &str, g: &'static G) {
        let layout = self.layout;
        // Warm: the first pair maps, later ones reuse.
        // SAFETY: non-zero size; freed with the same layout.
        unsafe { g.dealloc(g.alloc(layout), layout) };
        self.group
            .bench_function(criterion::BenchmarkId::new(name, &self.label), |b| {
                b.iter(|| {
                    // SAFETY: non-zero size; the block is freed with its layout.
                    unsafe {
                        let p = g.alloc(black_box(layout));
                        black_box(p);
                        g.dealloc(p, layout);
                    }
                })
            });
    }
}

fn label(bytes: usize) -> String {
    match bytes {
        b if b >= 1 << 20 => format!("{}M", b >> 20),
        b if b >= 1 << 10 => format!("{}K", b >> 10),
        b => format!("{b}"),
    }
}

fn small_pairs(c: &mut Criterion) {
    let mut group = c.benchmark_group("small_pair");
    for size in [16usize, 64, 256] {
        let layout = Layout::from_size_align(size, 8).unwrap();
        for_each_allocator(&mut Pairs {
            group: &mut group,
            layout,
            label: label(size),
        });
    }
    group.finish();
}

fn tensor_pairs(c: &mut Criterion) {
    let mut group = c.benchmark_group("tensor_pair");
    for size in [4usize << 10, 64 << 10, 1 << 20, 16 << 20, 64 << 20] {
        let layout = Layout::from_size_align(size, 64).unwrap();
        for_each_allocator(&mut Pairs {
            group: &mut group,
            layout,
            label: label(size),
        });
    }
    group.finish();
}

/// Blocks per FIFO burst.
const FIFO: usize = 1000;
/// Each FIFO block: 64 B at 8 B alignment, as the comparison's `fifo-1000x64B`.
const FIFO_BLOCK: Layout = Layout::new::<[u64; 8]>();

/// A burst of `FIFO` blocks of 64 B, freed in allocation order.
struct Fifo<'a, 'c> {
    group: &'a mut BenchmarkGroup<'c, WallTime>,
    /// The burst's block addresses, allocated once outside the timing.
    slots: Vec<*mut u8>,
}

/// Allocates every slot from `g`, then frees them in the same order.
fn fifo_burst<G: GlobalAlloc>(g: &G, slots: &mut [*mut u8]) {
    let layout = FIFO_BLOCK;
    for s in slots.iter_mut() {
        // SAFETY: non-zero size; null checked; freed below with its layout.
        *s = unsafe { g.alloc(layout) };
        assert!(!s.is_null(), "out of memory in the FIFO burst");
    }
    for &p in slots.iter() {
        // SAFETY: allocated just above by `g` with `layout`, freed once.
        unsafe { g.dealloc(p, layout) };
    }
}

impl Workload for Fifo<'_, '_> {
    fn run<G: GlobalAlloc + Sync + 'static>(&mut self, name: &str, g: &'static G) {
        let slots = &mut self.slots;
        // Warm: the first burst carves, later ones reuse.
        fifo_burst(g, slots);
        self.group.bench_function(
            criterion::BenchmarkId::new(name, format!("{FIFO}x{}", FIFO_BLOCK.size())),
            |b| b.iter(|| fifo_burst(g, black_box(&mut slots[..]))),
        );
    }
}

fn fifo(c: &mut Criterion) {
    let mut group = c.benchmark_group("fifo_burst");
    group.throughput(criterion::Throughput::Elements(FIFO as u64));
    for_each_allocator(&mut Fifo {
        group: &mut group,
        slots: vec![core::ptr::null_mut(); FIFO],
    });
    group.finish();
}

const TOUCH: usize = 16 << 20;

fn touch_pages(p: *mut u8) {
    for off in (0..TOUCH).step_by(4096) {
        // SAFETY: `p` holds `TOUCH` bytes.
        unsafe { p.add(off).write_volatile(off as u8) };
    }
}

struct Touch<'a, 'c> {
    group: &'a mut BenchmarkGroup<'c, WallTime>,
}

impl Workload for Touch<'_, '_> {
    fn run<G: GlobalAlloc + Sync + 'static>(&mut self, name: &str, g: &'static G) {
        let layout = Layout::from_size_align(TOUCH, 64).unwrap();
        self.group.bench_function(name, |b| {
            b.iter(|| {
                // SAFETY: non-zero size; null checked; freed with its layout.
                unsafe {
                    let p = g.alloc(layout);
                    assert!(!p.is_null());
                    touch_pages(p);
                    g.dealloc(p, layout);
                }
            })
        });
    }
}

fn touch_16m(c: &mut Criterion) {
    let mut group = c.benchmark_group("touch_16m");
    let mut resident = vec![1u8; TOUCH];
    group.bench_function("resident", |b| {
        b.iter(|| touch_pages(black_box(resident.as_mut_ptr())))
    });
    for_each_allocator(&mut Touch { group: &mut group });
    group.finish();
}

/// A single-producer single-consumer ring of block addresses (0 = empty
/// slot) with a consumer thread that frees what arrives.
struct Ring {
    slots: Vec<Slot>,
    /// Blocks the consumer has freed so far.
    freed: AtomicUsize,
    stop: AtomicBool,
}

/// A ring slot on its own 128-byte line, so the producer filling one slot
/// and the consumer emptying another do not share a cache line.
#[repr(align(128))]
struct Slot(AtomicUsize);

impl std::ops::Deref for Slot {
    type Target = AtomicUsize;
    fn deref(&self) -> &AtomicUsize {
        &self.0
    }
}

const RING: usize = 256;

/// Spins briefly, then yields: on a loaded 2-core machine the other side
/// may not be running.
fn wait_until(mut ready: impl FnMut() -> bool) {
    let mut spins = 0u32;
    while !ready() {
        if spins < 200 {
            spins += 1;
            std::hint::spin_loop();
        } else {
            std::thread::yield_now();
        }
    }
}

/// Starts the consumer: it frees every block it receives with `layout`.
fn consumer<G: GlobalAlloc + Sync + 'static>(
    g: &'static G,
    layout: Layout,
) -> (Arc<Ring>, std::thread::JoinHandle<()>) {
    let ring = Arc::new(Ring {
        slots: (0..RING).map(|_| Slot(AtomicUsize::new(0))).collect(),
        freed: AtomicUsize::new(0),
        stop: AtomicBool::new(false),
    });
    let r = ring.clone();
    let h = std::thread::spawn(move || {
        let mut i = 0usize;
        loop {
            let slot = &r.slots[i % RING];
            let mut p = 0;
            wait_until(|| {
                p = slot.load(Ordering::Acquire);
                p != 0 || r.stop.load(Ordering::Relaxed)
            });
            if p == 0 {
                return;
            }
            slot.store(0, Ordering::Release);
            // SAFETY: the producer allocated `p` with `layout` and gave it up.
            unsafe { g.dealloc(p as *mut u8, layout) };
            i += 1;
            r.freed.store(i, Ordering::Release);
        }
    });
    (ring, h)
}

struct Cross<'a, 'c> {
    group: &'a mut BenchmarkGroup<'c, WallTime>,
    layout: Layout,
}

impl Workload for Cross<'_, '_> {
    fn run<G: GlobalAlloc + Sync + 'static>(&mut self, name: &str, g: &'static G) {
        let layout = self.layout;
        let (ring, h) = consumer(g, layout);
        let mut sent = 0usize;
        self.group.bench_function(
            criterion::BenchmarkId::new(name, label(layout.size())),
            |b| {
                b.iter_custom(|iters| {
                    let start = Instant::now();
                    for _ in 0..iters {
                        // SAFETY: non-zero size; null checked; the consumer frees it.
                        let p = unsafe { g.alloc(layout) };
                        assert!(!p.is_null());
                        // SAFETY: at least one byte.
                        unsafe { p.write(sent as u8) };
                        let slot = &ring.slots[sent % RING];
                        wait_until(|| slot.load(Ordering::Acquire) == 0);
                        slot.store(p as usize, Ordering::Release);
                        sent += 1;
                    }
                    // Time until every block of this batch is freed.
                    wait_until(|| ring.freed.load(Ordering::Acquire) == sent);
                    start.elapsed()
                })
            },
        );
        ring.stop.store(true, Ordering::Relaxed);
        h.join().unwrap();
    }
}

/// No allocator at all: hands out addresses inside one static buffer and
/// frees nothing, so `cross_thread/ring-floor` is the cost of the handoff
/// itself, which every allocator's row includes.
struct Floor;

static FLOOR_BUF: [AtomicUsize; RING] = [const { AtomicUsize::new(0) }; RING];
static FLOOR_NEXT: AtomicUsize = AtomicUsize::new(0);

// SAFETY: blocks lie in a static buffer and may alias, which is sound for
// this benchmark only: it writes one byte per block and reads nothing back;
// dealloc does nothing.
unsafe impl GlobalAlloc for Floor {
    unsafe fn alloc(&self, _layout: Layout) -> *mut u8 {
        let i = FLOOR_NEXT.fetch_add(1, Ordering::Relaxed) % RING;
        FLOOR_BUF[i].as_ptr().cast()
    }
    unsafe fn dealloc(&self, _ptr: *mut u8, _layout: Layout) {}
}

fn cross_threads(c: &mut Criterion) {
    let mut group = c.benchmark_group("cross_thread");
    for size in [64usize, 64 << 10] {
        let layout = Layout::from_size_align(size, 8).unwrap();
        let mut w = Cross {
            group: &mut group,
            layout,
        };
        w.run("ring-floor", &Floor);
        for_each_allocator(&mut w);
    }
    group.finish();
}

fn config() -> Criterion {
    Criterion::default()
        .sample_size(30)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(1))
}

criterion_group! { name = benches; config = config(); targets = small_pairs, fifo, tensor_pairs, touch_16m, cross_threads }
criterion_main!(benches);
