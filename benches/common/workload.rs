//! The workloads, each one generic piece run for every allocator.
//!
//! A [`Workload`] times `iters` repetitions of its unit and reports `ops`
//! operations per unit (one alloc+free pair, one item, one MLP step...), so
//! `elapsed / (iters * ops)` is the figure per operation. Setup that is not
//! the thing measured (churn before a cold batch, the state a trim or a
//! prewarm starts from) runs outside the timed region.

use super::alloc::{BenchAlloc, PAGE, checked, touch_pages};
use core::alloc::Layout;
use std::hint::black_box;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

const KIB: usize = 1 << 10;
const MIB: usize = 1 << 20;

/// splitmix64: a tiny, fixed-seed PRNG, good enough for sizes and orders.
#[derive(Debug, Clone)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    /// A generator from `seed`.
    pub fn new(seed: u64) -> Self {
        SplitMix64(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `[0, 1)`.
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Log-uniform in `[lo, hi]`.
    pub fn log_uniform(&mut self, lo: usize, hi: usize) -> usize {
        let (a, b) = ((lo as f64).ln(), (hi as f64).ln());
        ((a + self.next_f64() * (b - a)).exp() as usize).clamp(lo, hi)
    }

    /// A random permutation of `0..n` (Fisher–Yates).
    pub fn permutation(&mut self, n: usize) -> Vec<usize> {
        let mut v: Vec<usize> = (0..n).collect();
        for i in (1..n).rev() {
            v.swap(i, (self.next_u64() % (i as u64 + 1)) as usize);
        }
        v
    }
}

/// One step of an allocation program.
#[derive(Debug, Clone, Copy)]
enum Step {
    Alloc { slot: usize, layout: Layout },
    Free { slot: usize },
}

/// A recorded sequence of allocations and frees over numbered slots; every
/// slot is free again at the end. With `touch`, every page of every block is
/// written once after it is allocated (as a kernel writing its output would).
#[derive(Debug, Clone, Default)]
pub struct Program {
    steps: Vec<Step>,
    slots: usize,
    allocs: u64,
    touch: bool,
}

impl Program {
    fn alloc(&mut self, size: usize, align: usize) -> usize {
        let slot = self.slots;
        self.slots += 1;
        self.allocs += 1;
        let layout = Layout::from_size_align(size, align).expect("program layout");
        self.steps.push(Step::Alloc { slot, layout });
        slot
    }

    fn free(&mut self, slot: usize) {
        self.steps.push(Step::Free { slot });
    }

    /// `n` buffers of log-uniform sizes in `[lo, hi]`, all allocated, then
    /// freed in a random order (fixed seed).
    pub fn mixed(n: usize, lo: usize, hi: usize, seed: u64) -> Self {
        let mut rng = SplitMix64::new(seed);
        let mut p = Program::default();
        let slots: Vec<usize> = (0..n)
            .map(|_| p.alloc(rng.log_uniform(lo, hi), 64))
            .collect();
        for i in rng.permutation(n) {
            p.free(slots[i]);
        }
        p
    }

    /// `live` buffers of uniform random sizes in `[lo, hi]`, then `steps`
    /// times one of them, chosen at random, freed and replaced by a new one
    /// of a new random size; then all freed. Every page is touched (as the
    /// activations of a model with varying shapes would be).
    pub fn replace(live: usize, steps: usize, lo: usize, hi: usize, seed: u64) -> Self {
        let mut rng = SplitMix64::new(seed);
        let mut p = Program {
            touch: true,
            ..Program::default()
        };
        let size = |rng: &mut SplitMix64| lo + (rng.next_u64() % (hi - lo + 1) as u64) as usize;
        let mut held: Vec<usize> = (0..live).map(|_| p.alloc(size(&mut rng), 64)).collect();
        for _ in 0..steps {
            let i = (rng.next_u64() % live as u64) as usize;
            p.free(held[i]);
            held[i] = p.alloc(size(&mut rng), 64);
        }
        held.into_iter().for_each(|s| p.free(s));
        p
    }

    /// `n` blocks of `size` allocated, then freed in allocation order.
    pub fn fifo(n: usize, size: usize) -> Self {
        let mut p = Program::default();
        let slots: Vec<usize> = (0..n).map(|_| p.alloc(size, 8)).collect();
        slots.into_iter().for_each(|s| p.free(s));
        p
    }

    /// One training step of an MLP in eager style (batch `batch`, f32, layer
    /// widths `dims`): the buffers a framework allocates and frees, in its
    /// order, every page touched.
    ///
    /// Forward: the input batch; per layer a pre-activation `z` and an
    /// activation `a` (kept for backward); a loss temporary. Backward, layer
    /// by layer from the top: the incoming gradient, `dz` (gradient through
    /// the activation), the weight and bias gradients `dW` (in×out) and `db`,
    /// the gradient for the layer below; each freed once its last reader is
    /// done. Optimizer: one `lr * dW` temporary per layer (eager SGD), then
    /// the gradients are freed (`zero_grad(set_to_none=True)`).
    pub fn mlp_step(batch: usize, dims: &[usize]) -> Self {
        const F32: usize = 4;
        let mut p = Program {
            touch: true,
            ..Program::default()
        };
        let layers = dims.len() - 1;
        let mut acts = vec![p.alloc(batch * dims[0] * F32, 64)];
        let mut pre = Vec::new();
        for i in 0..layers {
            pre.push(p.alloc(batch * dims[i + 1] * F32, 64));
            acts.push(p.alloc(batch * dims[i + 1] * F32, 64));
        }
        let loss_tmp = p.alloc(batch * dims[layers] * F32, 64);
        let mut grad = p.alloc(batch * dims[layers] * F32, 64);
        p.free(loss_tmp);
        let mut grads = Vec::new();
        for i in (0..layers).rev() {
            let dz = p.alloc(batch * dims[i + 1] * F32, 64);
            p.free(grad);
            p.free(pre[i]);
            p.free(acts[i + 1]);
            for size in [dims[i] * dims[i + 1] * F32, dims[i + 1] * F32] {
                grads.push((p.alloc(size, 64), size));
            }
            if i > 0 {
                grad = p.alloc(batch * dims[i] * F32, 64);
            }
            p.free(dz);
        }
        p.free(acts[0]);
        for &(_, size) in &grads {
            let tmp = p.alloc(size, 64);
            p.free(tmp);
        }
        grads.into_iter().for_each(|(g, _)| p.free(g));
        p
    }

    /// Allocations per run.
    pub fn allocs(&self) -> u64 {
        self.allocs
    }

    /// Bytes live at the program's peak.
    pub fn peak_bytes(&self) -> usize {
        let mut sizes = vec![0; self.slots];
        let (mut live, mut peak) = (0usize, 0usize);
        for s in &self.steps {
            match *s {
                Step::Alloc { slot, layout } => {
                    sizes[slot] = layout.size();
                    live += layout.size();
                    peak = peak.max(live);
                }
                Step::Free { slot } => live -= sizes[slot],
            }
        }
        peak
    }

    /// Runs the program once. `slots` has at least `self.slots` entries.
    #[inline(always)]
    fn run<A: BenchAlloc + ?Sized>(&self, a: &A, slots: &mut [(*mut u8, Layout)]) {
        for s in &self.steps {
            match *s {
                Step::Alloc { slot, layout } => {
                    let p = checked(a.alloc(layout), layout);
                    if self.touch {
                        touch_pages(p, layout.size());
                    }
                    slots[slot] = (black_box(p), layout);
                }
                Step::Free { slot } => {
                    let (p, l) = slots[slot];
                    // SAFETY: the slot was filled by the matching `Alloc`
                    // step with `l` and is freed once.
                    unsafe { a.dealloc(p, l) };
                }
            }
        }
    }

    fn slots(&self) -> Vec<(*mut u8, Layout)> {
        vec![(core::ptr::null_mut(), Layout::new::<u8>()); self.slots]
    }
}

/// What a workload does per unit.
#[derive(Debug, Clone)]
pub enum Kind {
    /// Allocate and free one block.
    Pair(Layout),
    /// Allocate, write every page, free (`resident: false`); or write every
    /// page of a block allocated once before timing (`resident: true`, the
    /// baseline with no page faults).
    Touch { layout: Layout, resident: bool },
    /// Run a program; with `cold`, untimed churn runs before each unit.
    Program { program: Program, cold: bool },
    /// One item allocated on this thread and freed on a consumer thread.
    CrossThread(Layout),
    /// Prewarm this plan, starting from a trimmed allocator.
    Prewarm(Vec<(usize, usize)>),
    /// Trim after the program has run (and freed everything).
    Trim(Program),
    /// `threads` threads started, each running `program` once, and joined.
    ThreadChurn { threads: usize, program: Program },
    /// `pairs` producer threads, each handing blocks of the sizes in `sizes`
    /// (cycled) through a ring to its own consumer thread, which frees them.
    ProdCons { pairs: usize, sizes: Vec<usize> },
    /// `threads` threads each doing `iters` random operations on a shared
    /// table of `slots` blocks (log-uniform sizes `lo..=hi`): take a slot
    /// (skip it if another thread holds it); empty: allocate and touch a block; else free it or realloc it to a
    /// new size (touching a grown tail) and put it back. Any thread may take
    /// any slot, so frees and reallocs cross threads; the live set is bounded
    /// by the table. The peak of live bytes is measured ([`Workload::measured_peak_live`]).
    Churn {
        threads: usize,
        slots: usize,
        lo: usize,
        hi: usize,
    },
}

/// A named workload.
#[derive(Debug, Clone)]
pub struct Workload {
    /// Short id, also the criterion group name and the `--only` key.
    pub name: String,
    /// What one operation is, for the table.
    pub unit: &'static str,
    /// Operations per unit.
    pub ops: u64,
    /// The fewest units a sample should have, so that fixed costs per
    /// sample (a consumer thread being scheduled) stay small beside it.
    pub min_units: u64,
    /// The fewest units the peak-RSS child process runs (enough for the
    /// live set to reach its steady state).
    pub rss_units: u64,
    /// What runs.
    pub kind: Kind,
}

impl Workload {
    fn new(name: impl Into<String>, unit: &'static str, ops: u64, kind: Kind) -> Self {
        let min_units = match kind {
            Kind::CrossThread(_) | Kind::ProdCons { .. } => 20_000,
            Kind::Churn { .. } => 50,
            _ => 1,
        };
        Workload {
            name: name.into(),
            unit,
            ops,
            min_units,
            rss_units: if matches!(kind, Kind::Churn { .. }) {
                2_000
            } else {
                1
            },
            kind,
        }
    }

    /// Bytes the workload holds live at its peak (what an ideal allocator
    /// would need resident).
    pub fn peak_live(&self) -> usize {
        match &self.kind {
            Kind::Pair(l) | Kind::Touch { layout: l, .. } => l.size(),
            Kind::Program { program, .. } | Kind::Trim(program) => program.peak_bytes(),
            Kind::CrossThread(l) => l.size() * (ring_cap(l.size()) + 1),
            Kind::Prewarm(plan) => plan.iter().map(|&(s, n)| s * n).sum(),
            Kind::ThreadChurn { threads, program } => threads * program.peak_bytes(),
            // Rings full of blocks of the mean size (an upper bound in time).
            Kind::ProdCons { pairs, sizes } => {
                let max = sizes.iter().copied().max().unwrap_or(0);
                let mean = sizes.iter().sum::<usize>() / sizes.len().max(1);
                pairs * mean * (ring_cap(max) + 1)
            }
            // Bounded by the table; the real peak is measured.
            Kind::Churn { slots, hi, .. } => slots * hi,
        }
    }

    /// The peak of live bytes of the last run where the workload measures
    /// it (the churn), else [`peak_live`](Self::peak_live).
    pub fn measured_peak_live(&self) -> usize {
        match self.kind {
            Kind::Churn { .. } => CHURN_PEAK.load(Ordering::Relaxed),
            _ => self.peak_live(),
        }
    }

    /// Times `iters` units on `a`.
    pub fn run<A: BenchAlloc + ?Sized>(&self, a: &A, iters: u64) -> Duration {
        match &self.kind {
            Kind::Pair(l) => {
                let l = *l;
                let t = Instant::now();
                for _ in 0..iters {
                    let p = checked(a.alloc(l), l);
                    // SAFETY: allocated just above with `l`, freed once.
                    unsafe { a.dealloc(black_box(p), l) };
                }
                t.elapsed()
            }
            Kind::Touch {
                layout,
                resident: false,
            } => {
                let l = *layout;
                let t = Instant::now();
                for _ in 0..iters {
                    let p = checked(a.alloc(l), l);
                    touch_pages(p, l.size());
                    // SAFETY: allocated just above with `l`, freed once.
                    unsafe { a.dealloc(black_box(p), l) };
                }
                t.elapsed()
            }
            Kind::Touch {
                layout,
                resident: true,
            } => {
                let l = *layout;
                let p = checked(a.alloc(l), l);
                touch_pages(p, l.size());
                let t = Instant::now();
                for _ in 0..iters {
                    touch_pages(black_box(p), l.size());
                }
                let d = t.elapsed();
                // SAFETY: allocated above with `l`, freed once.
                unsafe { a.dealloc(p, l) };
                d
            }
            Kind::Program { program, cold } => {
                let mut slots = program.slots();
                if !cold {
                    let t = Instant::now();
                    for _ in 0..iters {
                        program.run(a, &mut slots);
                    }
                    return t.elapsed();
                }
                let churn = Churn::new();
                let mut d = Duration::ZERO;
                for _ in 0..iters {
                    churn.run(a);
                    let t = Instant::now();
                    program.run(a, &mut slots);
                    d += t.elapsed();
                }
                d
            }
            Kind::CrossThread(l) => cross_thread(a, *l, iters),
            Kind::Prewarm(plan) => {
                let mut d = Duration::ZERO;
                for _ in 0..iters {
                    a.trim();
                    let t = Instant::now();
                    a.prewarm(plan);
                    d += t.elapsed();
                }
                d
            }
            Kind::ThreadChurn { threads, program } => {
                let t = Instant::now();
                for _ in 0..iters {
                    std::thread::scope(|s| {
                        for _ in 0..*threads {
                            s.spawn(|| program.run(a, &mut program.slots()));
                        }
                    });
                }
                t.elapsed()
            }
            Kind::ProdCons { pairs, sizes } => prod_cons(a, *pairs, sizes, iters),
            Kind::Churn {
                threads,
                slots,
                lo,
                hi,
            } => churn(a, *threads, *slots, (*lo, *hi), iters),
            Kind::Trim(program) => {
                let mut slots = program.slots();
                let mut d = Duration::ZERO;
                for _ in 0..iters {
                    program.run(a, &mut slots);
                    let t = Instant::now();
                    a.trim();
                    d += t.elapsed();
                }
                d
            }
        }
    }
}

/// Untimed work before a cold batch: another allocation pattern on the same
/// allocator (so its free lists are no longer the batch's) and a sweep over
/// a buffer larger than the last-level cache (so its metadata is not cached).
struct Churn {
    program: Program,
    sweep: Vec<u8>,
}

impl Churn {
    fn new() -> Self {
        Churn {
            program: Program::mixed(2_000, 16, 64 * KIB, 0xC0FFEE),
            sweep: vec![0; 32 * MIB],
        }
    }

    fn run<A: BenchAlloc + ?Sized>(&self, a: &A) {
        let mut slots = self.program.slots();
        self.program.run(a, &mut slots);
        let mut x = 0u8;
        for i in (0..self.sweep.len()).step_by(64) {
            x = x.wrapping_add(self.sweep[i]);
        }
        black_box(x);
    }
}

/// Capacity of the cross-thread ring for items of `size` bytes: deep enough
/// that the producer rarely waits for a descheduled consumer on a loaded
/// machine (at most 32 MiB in flight, 256 to 16,384 items).
fn ring_cap(size: usize) -> usize {
    (32 * MIB / size).clamp(256, 16_384)
}

/// A bounded single-producer single-consumer ring of pointers (as `usize`).
///
/// Each side keeps the other side's index as it last read it, on its own
/// cache line, and reads the shared one again only when that copy says the
/// ring is full (producer) or empty (consumer), as Lamport-style rings with
/// cached indices do (folly's `ProducerConsumerQueue`, rigtorp's
/// `SPSCQueue`). Re-reading it on every item would move its line between the
/// cores on every item, a cost of the harness that every allocator's time
/// would carry.
///
/// A side that has to wait waits for a [`slack`](Ring::slack) of items (the
/// consumer) or of room (the producer), not for one. Waiting for one, the
/// faster side ran at the other's heels from then on: it polled the other
/// side's index and read or wrote each slot line while the other was still
/// on it, which slowed the slower side, so the run stayed in that state.
/// Which allocator fell into it changed from sample to sample: in eleven
/// samples of `xthread-64B`, jemalloc took 17 to 68 ns per item, mimalloc
/// 32 to 92 and the pool 12 to 44, the slow ones with the ring full. With
/// the slack, the same build gave jemalloc 15.5 to 20.4, mimalloc 19 to 28
/// and the pool 11.5 to 14.3 ns, and a side waits once per slack of items:
/// the time is each side's own cost (the slower of the allocation and the
/// free, each with the cache line transfers the allocator causes).
struct Ring {
    slots: Box<[AtomicUsize]>,
    /// How many items a waiting side waits for: an eighth of the ring.
    slack: usize,
    /// The consumer's: the next slot to read, and the producer's index as
    /// the consumer last read it.
    head: Side,
    /// The producer's: the next slot to write, and the consumer's index as
    /// the producer last read it.
    tail: Side,
}

#[repr(align(128))]
struct Side {
    /// This side's index (written by this side only, read by the other).
    at: AtomicUsize,
    /// The other side's index as this side last read it (this side only).
    seen: AtomicUsize,
}

impl Side {
    fn new() -> Self {
        Side {
            at: AtomicUsize::new(0),
            seen: AtomicUsize::new(0),
        }
    }

    /// Returns at once if this side's copy of `other`'s index satisfies
    /// `go`; else once a fresh read of it (remembered) satisfies `resume`,
    /// which implies `go`.
    fn wait_for(&self, other: &Side, go: impl Fn(usize) -> bool, resume: impl Fn(usize) -> bool) {
        if !go(self.seen.load(Ordering::Relaxed)) {
            wait_until(|| {
                let at = other.at.load(Ordering::Acquire);
                self.seen.store(at, Ordering::Relaxed);
                resume(at)
            });
        }
    }
}

impl Ring {
    fn new(cap: usize) -> Self {
        Ring {
            slots: (0..cap).map(|_| AtomicUsize::new(0)).collect(),
            slack: (cap / 8).max(1),
            head: Side::new(),
            tail: Side::new(),
        }
    }

    /// Appends `v`; a full ring is first waited on until a
    /// [`slack`](Self::slack) of slots is free.
    fn push(&self, v: usize) {
        let n = self.slots.len();
        let tail = self.tail.at.load(Ordering::Relaxed);
        self.tail.wait_for(
            &self.head,
            |head| tail - head < n,
            |head| tail - head <= n - self.slack,
        );
        self.slots[tail % n].store(v, Ordering::Relaxed);
        self.tail.at.store(tail + 1, Ordering::Release);
    }

    /// Takes the oldest item; an empty ring is first waited on until it
    /// holds a [`slack`](Self::slack) of items, or `left ≥ 1`, the items
    /// still to come.
    fn pop(&self, left: usize) -> usize {
        let head = self.head.at.load(Ordering::Relaxed);
        self.head.wait_for(
            &self.tail,
            |tail| tail != head,
            |tail| tail - head >= self.slack.min(left),
        );
        let v = self.slots[head % self.slots.len()].load(Ordering::Relaxed);
        self.head.at.store(head + 1, Ordering::Release);
        v
    }
}

/// Spins briefly, then yields (the machine may have fewer free cores than
/// threads).
#[inline(always)]
fn wait_until(mut ready: impl FnMut() -> bool) {
    let mut spins = 0u32;
    while !ready() {
        spins += 1;
        if spins < 1_000 {
            std::hint::spin_loop();
        } else {
            std::thread::yield_now();
        }
    }
}

/// `iters` blocks allocated here, handed through a ring to a consumer thread
/// that frees them. The clock starts once the consumer is running (thread
/// start-up is not the allocator's cost) and stops when it has freed the
/// last item.
fn cross_thread<A: BenchAlloc + ?Sized>(a: &A, l: Layout, iters: u64) -> Duration {
    let ring = Ring::new(ring_cap(l.size()));
    let ready = AtomicUsize::new(0);
    std::thread::scope(|s| {
        let consumer = s.spawn(|| {
            ready.store(1, Ordering::Release);
            for i in 0..iters {
                let p = ring.pop((iters - i) as usize) as *mut u8;
                // SAFETY: the producer allocated `p` with `l` and sent it
                // once; it is freed once, here.
                unsafe { a.dealloc(p, l) };
            }
        });
        wait_until(|| ready.load(Ordering::Acquire) == 1);
        let t = Instant::now();
        for _ in 0..iters {
            ring.push(checked(a.alloc(l), l) as usize);
        }
        consumer.join().expect("consumer thread");
        t.elapsed()
    })
}

/// `pairs` producer→consumer pairs, each as [`cross_thread`] with sizes
/// cycling through `sizes`; `iters` items per producer.
fn prod_cons<A: BenchAlloc + ?Sized>(a: &A, pairs: usize, sizes: &[usize], iters: u64) -> Duration {
    let layouts: Vec<Layout> = sizes.iter().map(|&s| layout(s, 8)).collect();
    let max = sizes.iter().copied().max().unwrap_or(8);
    let rings: Vec<Ring> = (0..pairs).map(|_| Ring::new(ring_cap(max))).collect();
    let ready = AtomicUsize::new(0);
    let go = AtomicUsize::new(0);
    let layouts = &layouts;
    std::thread::scope(|s| {
        let mut handles = Vec::new();
        for (k, ring) in rings.iter().enumerate() {
            let (ready, go) = (&ready, &go);
            s.spawn(move || {
                ready.fetch_add(1, Ordering::AcqRel);
                let iters = iters as usize;
                for i in 0..iters {
                    let l = layouts[(i + k) % layouts.len()];
                    let p = ring.pop(iters - i) as *mut u8;
                    // SAFETY: the producer allocated `p` with `l` (the same
                    // cycle position) and sent it once; freed once, here.
                    unsafe { a.dealloc(p, l) };
                }
            });
            handles.push(s.spawn(move || {
                ready.fetch_add(1, Ordering::AcqRel);
                wait_until(|| go.load(Ordering::Acquire) == 1);
                for i in 0..iters as usize {
                    let l = layouts[(i + k) % layouts.len()];
                    ring.push(checked(a.alloc(l), l) as usize);
                }
            }));
        }
        wait_until(|| ready.load(Ordering::Acquire) == 2 * pairs);
        let t = Instant::now();
        go.store(1, Ordering::Release);
        handles
            .into_iter()
            .for_each(|h| h.join().expect("producer"));
        // The clock stops after the scope has joined the consumers too.
        t
    })
    .elapsed()
}

/// The peak of live bytes of the last [`churn`] run.
static CHURN_PEAK: AtomicUsize = AtomicUsize::new(0);

/// One slot of the churn table: a block's address (0: empty, [`BUSY`]: a
/// thread is working on it) and size.
struct Slot {
    ptr: AtomicUsize,
    size: AtomicUsize,
}

/// A churn slot's address while one thread owns it: the others skip it, so
/// a block is never stored over another (leaked, and counted live for
/// good) nor paired with another block's size.
const BUSY: usize = 1;

/// See [`Kind::Churn`].
fn churn<A: BenchAlloc + ?Sized>(
    a: &A,
    threads: usize,
    slots: usize,
    (lo, hi): (usize, usize),
    iters: u64,
) -> Duration {
    const ALIGN: usize = 16;
    let table: Vec<Slot> = (0..slots)
        .map(|_| Slot {
            ptr: AtomicUsize::new(0),
            size: AtomicUsize::new(0),
        })
        .collect();
    let live = AtomicUsize::new(0);
    let peak = AtomicUsize::new(0);
    let grow =
        |n: usize| peak.fetch_max(live.fetch_add(n, Ordering::Relaxed) + n, Ordering::Relaxed);
    let t = Instant::now();
    std::thread::scope(|s| {
        for k in 0..threads {
            let (table, live, grow) = (&table, &live, &grow);
            s.spawn(move || {
                let mut rng = SplitMix64::new(0x5EED ^ k as u64);
                for _ in 0..iters {
                    let slot = &table[(rng.next_u64() % slots as u64) as usize];
                    let p = slot.ptr.swap(BUSY, Ordering::Acquire);
                    if p == BUSY {
                        continue;
                    }
                    let p = p as *mut u8;
                    if p.is_null() {
                        let size = rng.log_uniform(lo, hi);
                        let l = layout(size, ALIGN);
                        // Live from the moment the allocator hands it
                        // out: its pages are resident while they are
                        // written, so the writing counts too.
                        let q = checked(a.alloc(l), l);
                        grow(size);
                        touch_pages(q, size);
                        slot.size.store(size, Ordering::Relaxed);
                        slot.ptr.store(q as usize, Ordering::Release);
                        continue;
                    }
                    let old = slot.size.load(Ordering::Relaxed);
                    let l = layout(old, ALIGN);
                    if rng.next_u64().is_multiple_of(2) {
                        live.fetch_sub(old, Ordering::Relaxed);
                        // SAFETY: taken from the table (we own it), allocated
                        // with `l`; freed once.
                        unsafe { a.dealloc(p, l) };
                        slot.ptr.store(0, Ordering::Release);
                        continue;
                    }
                    let size = rng.log_uniform(lo, hi);
                    // SAFETY: we own `p`, allocated with `l`; `size > 0`.
                    let q = unsafe { a.realloc(p, l, size) };
                    let q = checked(q, layout(size, ALIGN));
                    if size > old {
                        grow(size - old);
                        // SAFETY: the grown tail lies inside the new block.
                        touch_pages(unsafe { q.add(old) }, size - old);
                    } else {
                        live.fetch_sub(old - size, Ordering::Relaxed);
                    }
                    slot.size.store(size, Ordering::Relaxed);
                    slot.ptr.store(q as usize, Ordering::Release);
                }
            });
        }
    });
    for slot in &table {
        let p = slot.ptr.load(Ordering::Acquire) as *mut u8;
        if !p.is_null() {
            let size = slot.size.load(Ordering::Relaxed);
            // SAFETY: the threads are done; the table owns `p`, allocated
            // with this layout; freed once.
            unsafe { a.dealloc(p, layout(size, ALIGN)) };
        }
    }
    let d = t.elapsed();
    CHURN_PEAK.store(peak.load(Ordering::Relaxed), Ordering::Relaxed);
    d
}

fn size_name(size: usize) -> String {
    match size {
        s if s >= MIB && s % MIB == 0 => format!("{}MiB", s / MIB),
        s if s >= KIB && s % KIB == 0 => format!("{}KiB", s / KIB),
        s => format!("{s}B"),
    }
}

fn layout(size: usize, align: usize) -> Layout {
    Layout::from_size_align(size, align).expect("workload layout")
}

/// Which workloads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Suite {
    /// The criterion bench's set (the foundation issue's workloads).
    Bench,
    /// Everything: the bench's set plus small pairs, a FIFO burst, cold
    /// mixed batches and the MLP step (the comparison example).
    Compare,
}

/// The mixed-large-sizes workload: live blocks, replacements per unit.
pub const LARGE_MIXED: (usize, usize) = (20, 100);

/// The MLP of the tensor-program workload: batch 64, 1024→4096→4096→1024.
pub const MLP_BATCH: usize = 64;
/// Layer widths of the MLP.
pub const MLP_DIMS: [usize; 4] = [1024, 4096, 4096, 1024];

/// The workloads of `suite`, in a fixed order.
pub fn workloads(suite: Suite) -> Vec<Workload> {
    let compare = suite == Suite::Compare;
    let mut w = Vec::new();
    if compare {
        for size in [16, 64, 256] {
            w.push(Workload::new(
                format!("pair-{}", size_name(size)),
                "alloc+free",
                1,
                Kind::Pair(layout(size, 8)),
            ));
        }
        w.push(Workload::new(
            "fifo-1000x64B",
            "alloc+free",
            1_000,
            Kind::Program {
                program: Program::fifo(1_000, 64),
                cold: false,
            },
        ));
    }
    for size in [4 * KIB, 64 * KIB, MIB, 16 * MIB, 64 * MIB] {
        for align in [64, PAGE] {
            w.push(Workload::new(
                format!("pair-{}-a{align}", size_name(size)),
                "alloc+free",
                1,
                Kind::Pair(layout(size, align)),
            ));
        }
    }
    let touch = layout(16 * MIB, 64);
    w.push(Workload::new(
        "touch-16MiB",
        "alloc+touch+free",
        1,
        Kind::Touch {
            layout: touch,
            resident: false,
        },
    ));
    w.push(Workload::new(
        "touch-16MiB-resident",
        "touch",
        1,
        Kind::Touch {
            layout: touch,
            resident: true,
        },
    ));
    let mixed = Program::mixed(1_000, 256, 4 * MIB, 42);
    w.push(Workload::new(
        "mixed-1000",
        "alloc+free",
        mixed.allocs(),
        Kind::Program {
            program: mixed.clone(),
            cold: false,
        },
    ));
    if compare {
        w.push(Workload::new(
            "mixed-1000-cold",
            "alloc+free",
            mixed.allocs(),
            Kind::Program {
                program: mixed.clone(),
                cold: true,
            },
        ));
    }
    for size in [64, 64 * KIB] {
        let align = if size >= PAGE { 64 } else { 8 };
        w.push(Workload::new(
            format!("xthread-{}", size_name(size)),
            "item",
            1,
            Kind::CrossThread(layout(size, align)),
        ));
    }
    let plan = vec![(64 * KIB, 64), (MIB, 16), (16 * MIB, 2)];
    w.push(Workload::new(
        "prewarm-52MiB",
        "prewarm",
        1,
        Kind::Prewarm(plan),
    ));
    w.push(Workload::new(
        "trim-after-mixed",
        "trim",
        1,
        Kind::Trim(mixed),
    ));
    if compare {
        // The general-purpose patterns of issue 8.
        let large = Program::replace(LARGE_MIXED.0, LARGE_MIXED.1, 5 * MIB, 25 * MIB, 7);
        w.push(Workload::new(
            "large-mixed-20x5-25MiB",
            "alloc+touch+free",
            large.allocs(),
            Kind::Program {
                program: large,
                cold: false,
            },
        ));
        w.push(Workload::new(
            "thread-churn-8",
            "round of 8 threads",
            1,
            Kind::ThreadChurn {
                threads: 8,
                program: Program::mixed(500, 16, 4 * KIB, 11),
            },
        ));
        let mut rng = SplitMix64::new(13);
        w.push(Workload::new(
            "prodcons-2x2",
            "item",
            2,
            Kind::ProdCons {
                pairs: 2,
                sizes: (0..64).map(|_| rng.log_uniform(16, 4 * KIB)).collect(),
            },
        ));
        w.push(Workload::new(
            "churn-realloc-4t",
            "operation",
            4,
            Kind::Churn {
                threads: 4,
                slots: 64,
                lo: 16,
                hi: 32 * MIB,
            },
        ));
    }
    if compare {
        let step = Program::mlp_step(MLP_BATCH, &MLP_DIMS);
        w.push(Workload::new(
            "mlp-step",
            "step",
            1,
            Kind::Program {
                program: step,
                cold: false,
            },
        ));
    }
    w
}
