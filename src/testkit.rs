//! The conformance kit: one function, [`check`], that runs the contract's
//! checks on any [`TensorAllocator`] — the backends in this crate call it
//! from their tests, and an outside implementor can too (feature
//! `testkit`).
//!
//! Each check asserts, so a backend that breaks the contract fails with a
//! message naming the check, the request and what came back. What a backend
//! claims to support travels in [`Caps`]; everything else is required of
//! every backend:
//!
//! | check | what must hold |
//! |---|---|
//! | `zero_size` | size-0 allocations get distinct ids, move 0 bytes, free once |
//! | `alignment` | every power of two up to `max_align` honoured (host pointers and device addresses) ; a non-power of two is `InvalidLayout` |
//! | `round_trip` | write/read bit exact for 1 B … `max_size`, at odd offsets; zeroed requests read as zero |
//! | `out_of_range` | `offset + len > size` is `OutOfRange`, and nothing is written |
//! | `double_free` | a second free and any use after free are errors; stats unchanged |
//! | `forged` | other alignment, shifted address, other device, other size, unknown id: errors, stats unchanged |
//! | `stats_consistency` | after each of `random_ops` random ops, allocated bytes and allocation count equal the live set's sums |
//! | `threads` | `threads` × `ops_per_thread` alloc/write/read/free with cross-thread frees keep every pattern intact |
//! | `trim` | after freeing everything, `trim()` leaves reserved bytes ≤ `reserved_after_trim` |
//!
//! ```
//! use tensorpool::backend::HostBackend;
//! use tensorpool::testkit::{check, Caps};
//!
//! let backend = HostBackend::new();
//! // Small sizes and few ops keep a doctest quick; real tests use `Caps::host()`.
//! check(&backend, Caps { max_size: 1 << 16, random_ops: 500, ops_per_thread: 100, ..Caps::host() });
//! ```

use crate::allocator::{Addr, AllocRequest, Allocation, Device, TensorAllocator};
use crate::error::AllocError;
use crate::meta::id::TensorId;
use crate::stats::MemoryStats;
use core::ptr::NonNull;
use std::sync::Mutex;

/// What the backend under test claims; the kit checks exactly that.
#[derive(Debug, Clone, Copy)]
pub struct Caps {
    /// The largest alignment to check (every power of two from 1 up to it).
    pub max_align: usize,
    /// Whether an alignment above `max_align` must be refused with
    /// `InvalidLayout` (true for backends with a hard maximum).
    pub refuses_above_max_align: bool,
    /// Whether the backend holds bytes (`write`/`read` work). When false,
    /// both must answer `Unsupported` and the byte checks are skipped.
    pub holds_bytes: bool,
    /// The largest size in the round-trip check (64 MiB in the contract).
    pub max_size: usize,
    /// Random single-thread ops in the stats-consistency check.
    pub random_ops: usize,
    /// Threads in the churn check.
    pub threads: usize,
    /// Ops per thread in the churn check.
    pub ops_per_thread: usize,
    /// Largest request in the random and threaded checks.
    pub churn_max_size: usize,
    /// Reserved bytes the backend documents after everything is freed and
    /// `trim()` has run (0 for a backend that returns everything).
    pub reserved_after_trim: u64,
    /// Seed of the kit's random choices (the same seed, the same ops).
    pub seed: u64,
}

impl Caps {
    /// What the host backend claims: alignments to 64 KiB (refused above),
    /// bytes, everything returned by `trim`.
    pub fn host() -> Self {
        Caps {
            max_align: 1 << 16,
            refuses_above_max_align: true,
            holds_bytes: true,
            max_size: 64 << 20,
            random_ops: 10_000,
            threads: 8,
            ops_per_thread: 2_000,
            churn_max_size: 256 << 10,
            reserved_after_trim: 0,
            seed: 0x7e45_0f00_1234_5678,
        }
    }
    /// What the meta backend claims: as the host, but no bytes.
    pub fn meta() -> Self {
        Caps {
            holds_bytes: false,
            ..Caps::host()
        }
    }
}

/// Runs every check on `backend`. Panics with a message naming the check
/// at the first broken promise.
///
/// The backend should be fresh (no live allocations of other users): the
/// stats checks compare its counters with the kit's own live set.
pub fn check(backend: &dyn TensorAllocator, caps: Caps) {
    zero_size(backend, &caps);
    alignment(backend, &caps);
    round_trip(backend, &caps);
    out_of_range(backend, &caps);
    double_free(backend, &caps);
    forged(backend, &caps);
    stats_consistency(backend, &caps);
    threads(backend, &caps);
    trim(backend, &caps);
}

/// A small deterministic generator (xorshift64*), so a failing seed repeats.
#[derive(Debug, Clone)]
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Rng(seed | 1)
    }
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// The byte pattern the kit writes: a function of a seed and the position,
/// so any misplaced or stale byte shows.
fn pattern(seed: u64, start: usize, out: &mut [u8]) {
    for (i, b) in out.iter_mut().enumerate() {
        let x = (seed ^ (start + i) as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        *b = (x >> 56) as u8;
    }
}

fn alloc(b: &dyn TensorAllocator, req: &AllocRequest, check: &str) -> Allocation {
    b.allocate(req).unwrap_or_else(|e| {
        panic!(
            "{check}: allocate({} B, align {}) failed: {e}",
            req.size, req.align
        )
    })
}

fn free(b: &dyn TensorAllocator, a: &Allocation, check: &str) {
    // SAFETY: the kit holds no reference into `a`'s memory (it copies with
    // `read`/`write` only).
    let r = unsafe { b.deallocate(a) };
    if let Err(e) = r {
        panic!("{check}: deallocate of live allocation {a:?} failed: {e}");
    }
}

/// The numbers a refused operation must leave unchanged.
fn counters(s: &MemoryStats) -> [u64; 6] {
    [
        s.allocated_bytes.current,
        s.allocated_bytes.freed,
        s.active_bytes.current,
        s.allocation.current,
        s.allocation.freed,
        s.reserved_bytes.current,
    ]
}

/// Asserts that `r` is an error and that the stats counters did not move.
fn refused(b: &dyn TensorAllocator, before: &MemoryStats, r: Result<(), AllocError>, what: &str) {
    assert!(r.is_err(), "{what}: expected an error, got Ok");
    assert_eq!(
        counters(before),
        counters(&b.stats()),
        "{what}: refused operation changed the stats ({})",
        r.unwrap_err()
    );
}

fn write_pattern(b: &dyn TensorAllocator, a: &Allocation, seed: u64, check: &str) {
    let mut chunk = vec![0u8; a.size().min(1 << 20)];
    let mut off = 0;
    while off < a.size() {
        let n = chunk.len().min(a.size() - off);
        pattern(seed, off, &mut chunk[..n]);
        b.write(a, off, &chunk[..n])
            .unwrap_or_else(|e| panic!("{check}: write of {n} B at {off} to {a:?}: {e}"));
        off += n;
    }
}

fn verify_pattern(b: &dyn TensorAllocator, a: &Allocation, seed: u64, check: &str) {
    let mut got = vec![0u8; a.size().min(1 << 20)];
    let mut want = got.clone();
    let mut off = 0;
    while off < a.size() {
        let n = got.len().min(a.size() - off);
        b.read(a, off, &mut got[..n])
            .unwrap_or_else(|e| panic!("{check}: read of {n} B at {off} from {a:?}: {e}"));
        pattern(seed, off, &mut want[..n]);
        if got[..n] != want[..n] {
            let i = (0..n).find(|&i| got[i] != want[i]).unwrap_or(0);
            panic!(
                "{check}: byte {} of allocation {a:?} reads {:#04x}, wrote {:#04x}",
                off + i,
                got[i],
                want[i]
            );
        }
        off += n;
    }
}

fn zero_size(b: &dyn TensorAllocator, caps: &Caps) {
    let c = "zero_size";
    let xs: Vec<Allocation> = (0..16)
        .map(|_| alloc(b, &AllocRequest::bytes(0), c))
        .collect();
    for (i, x) in xs.iter().enumerate() {
        assert_eq!(x.size(), 0, "{c}: size-0 allocation reports {} B", x.size());
        assert_eq!(x.device(), b.device(), "{c}: device");
        for y in &xs[..i] {
            assert_ne!(
                x.id(),
                y.id(),
                "{c}: two size-0 allocations share id {}",
                x.id()
            );
        }
        if caps.holds_bytes {
            b.write(x, 0, &[])
                .unwrap_or_else(|e| panic!("{c}: empty write: {e}"));
            b.read(x, 0, &mut [])
                .unwrap_or_else(|e| panic!("{c}: empty read: {e}"));
            assert!(
                matches!(b.write(x, 0, &[1]), Err(AllocError::OutOfRange { .. })),
                "{c}: a 1-byte write into a size-0 allocation must be OutOfRange"
            );
        }
    }
    for x in &xs {
        free(b, x, c);
    }
}

fn alignment(b: &dyn TensorAllocator, caps: &Caps) {
    let c = "alignment";
    let mut align = 1usize;
    while align <= caps.max_align {
        for size in [1, align, 3 * align + 1] {
            let a = alloc(b, &AllocRequest::new(size, align), c);
            assert!(
                a.align() >= align,
                "{c}: asked align {align}, allocation says {}",
                a.align()
            );
            assert!(
                a.size() >= size,
                "{c}: asked {size} B, allocation says {}",
                a.size()
            );
            let addr = match a.addr() {
                Addr::Host(p) => Some(p.as_ptr() as u64),
                Addr::Device(d) => Some(d),
                Addr::None | Addr::Remote(_) => None,
            };
            if let Some(addr) = addr {
                assert_eq!(
                    addr % align as u64,
                    0,
                    "{c}: {size} B at align {align} got address {addr:#x}"
                );
            }
            if caps.holds_bytes {
                write_pattern(b, &a, align as u64, c);
                verify_pattern(b, &a, align as u64, c);
            }
            free(b, &a, c);
        }
        align *= 2;
    }
    for bad in [0usize, 3, 48, (1 << 20) + 1] {
        let r = b.allocate(&AllocRequest::new(64, bad));
        assert!(
            matches!(r, Err(AllocError::InvalidLayout { .. })),
            "{c}: alignment {bad} (not a power of two) must be InvalidLayout, got {r:?}"
        );
    }
    if caps.refuses_above_max_align {
        let over = caps.max_align * 2;
        let r = b.allocate(&AllocRequest::new(64, over));
        assert!(
            matches!(r, Err(AllocError::InvalidLayout { .. })),
            "{c}: alignment {over} above the maximum {} must be InvalidLayout, got {r:?}",
            caps.max_align
        );
    }
}

fn round_trip(b: &dyn TensorAllocator, caps: &Caps) {
    let c = "round_trip";
    if !caps.holds_bytes {
        let a = alloc(b, &AllocRequest::bytes(16), c);
        assert!(
            matches!(b.write(&a, 0, &[1]), Err(AllocError::Unsupported { .. })),
            "{c}: a backend without bytes must answer write with Unsupported"
        );
        assert!(
            matches!(b.read(&a, 0, &mut [0]), Err(AllocError::Unsupported { .. })),
            "{c}: a backend without bytes must answer read with Unsupported"
        );
        free(b, &a, c);
        return;
    }
    let mut sizes = vec![
        1usize,
        7,
        63,
        64,
        65,
        4095,
        4096,
        4097,
        65_537,
        (1 << 20) + 3,
    ];
    let mut s = 4 << 20;
    while s <= caps.max_size {
        sizes.push(s);
        s *= 4;
    }
    if !sizes.contains(&caps.max_size) {
        sizes.push(caps.max_size);
    }
    sizes.retain(|&s| s <= caps.max_size);
    for (k, &size) in sizes.iter().enumerate() {
        let seed = 0xA5A5_0000 + k as u64;
        let a = alloc(b, &AllocRequest::bytes(size), c);
        write_pattern(b, &a, seed, c);
        verify_pattern(b, &a, seed, c);
        // Odd offsets and lengths inside the tensor, each checked against
        // the pattern around it.
        for (off, len) in [
            (1, size / 3),
            ((size / 2) | 1, size / 4),
            (size - 1, 1),
            (size / 7, 0),
        ] {
            let len = len.min(size - off.min(size));
            let off = off.min(size);
            let mut got = vec![0u8; len];
            b.read(&a, off, &mut got).unwrap_or_else(|e| {
                panic!("{c}: read {len} B at odd offset {off} of {size} B: {e}")
            });
            let mut want = vec![0u8; len];
            pattern(seed, off, &mut want);
            assert!(
                got == want,
                "{c}: {len} B at offset {off} of {size} B differ from what was written"
            );
            // Overwrite that range with another pattern and read the whole back.
            pattern(seed ^ 0xFF, off, &mut want);
            b.write(&a, off, &want)
                .unwrap_or_else(|e| panic!("{c}: write {len} B at odd offset {off}: {e}"));
            b.read(&a, off, &mut got)
                .unwrap_or_else(|e| panic!("{c}: read back: {e}"));
            assert!(
                got == want,
                "{c}: rewrite of {len} B at offset {off} of {size} B did not read back"
            );
            pattern(seed, off, &mut want);
            b.write(&a, off, &want)
                .unwrap_or_else(|e| panic!("{c}: restore: {e}"));
        }
        verify_pattern(b, &a, seed, c);
        free(b, &a, c);
    }
    // Zeroed requests read as zero, also on reuse of dirty memory.
    for size in [100usize, 5000, 1 << 20] {
        let dirty = alloc(b, &AllocRequest::bytes(size), c);
        write_pattern(b, &dirty, 3, c);
        free(b, &dirty, c);
        let z = alloc(b, &AllocRequest::bytes(size).zeroed(), c);
        let mut got = vec![1u8; size];
        b.read(&z, 0, &mut got)
            .unwrap_or_else(|e| panic!("{c}: read zeroed: {e}"));
        assert!(
            got.iter().all(|&x| x == 0),
            "{c}: zeroed {size} B allocation has non-zero bytes"
        );
        free(b, &z, c);
    }
}

fn out_of_range(b: &dyn TensorAllocator, caps: &Caps) {
    let c = "out_of_range";
    if !caps.holds_bytes {
        return;
    }
    let a = alloc(b, &AllocRequest::bytes(100), c);
    write_pattern(b, &a, 11, c);
    let cases: [(usize, usize); 4] = [(99, 2), (100, 1), (usize::MAX, 1), (0, 101)];
    for (off, len) in cases {
        let src = vec![0xEEu8; len];
        let r = b.write(&a, off, &src);
        assert!(
            matches!(r, Err(AllocError::OutOfRange { offset, len: l, size: 100, .. }) if offset == off && l == len),
            "{c}: write of {len} B at offset {off} into 100 B must be OutOfRange naming them, got {r:?}"
        );
        let mut dst = vec![0u8; len];
        let r = b.read(&a, off, &mut dst);
        assert!(
            matches!(r, Err(AllocError::OutOfRange { .. })),
            "{c}: read of {len} B at offset {off} from 100 B must be OutOfRange, got {r:?}"
        );
    }
    // The boundary itself is fine, and no refused write landed.
    b.read(&a, 100, &mut [])
        .unwrap_or_else(|e| panic!("{c}: empty read at the end: {e}"));
    verify_pattern(b, &a, 11, c);
    free(b, &a, c);
}

fn double_free(b: &dyn TensorAllocator, caps: &Caps) {
    let c = "double_free";
    for size in [0usize, 64, 5000, 2 << 20] {
        let a = alloc(b, &AllocRequest::bytes(size), c);
        let keep = alloc(b, &AllocRequest::bytes(size), c);
        if caps.holds_bytes {
            write_pattern(b, &keep, 5, c);
        }
        free(b, &a, c);
        let before = b.stats();
        // SAFETY: `a` is freed already; the backend must refuse it.
        let r = unsafe { b.deallocate(&a) };
        refused(b, &before, r, &format!("{c}: second free of {size} B"));
        if caps.holds_bytes {
            let r = b.write(&a, 0, &[]);
            refused(b, &before, r, &format!("{c}: write after free of {size} B"));
            let r = b.read(&a, 0, &mut []);
            refused(b, &before, r, &format!("{c}: read after free of {size} B"));
            verify_pattern(b, &keep, 5, c);
        }
        free(b, &keep, c);
    }
}

/// `a` with one field changed.
fn forge(
    a: &Allocation,
    addr: Addr,
    size: usize,
    align: usize,
    device: Device,
    id: TensorId,
) -> Allocation {
    Allocation::new(id, addr, size, align, device, a.tag())
}

fn shifted(addr: Addr, by: usize) -> Option<Addr> {
    match addr {
        Addr::Host(p) => NonNull::new(p.as_ptr().wrapping_add(by)).map(Addr::Host),
        Addr::Device(d) => Some(Addr::Device(d.wrapping_add(by as u64))),
        Addr::Remote(r) => Some(Addr::Remote(r.wrapping_add(1))),
        Addr::None => None,
    }
}

fn forged(b: &dyn TensorAllocator, caps: &Caps) {
    let c = "forged";
    for size in [64usize, 4096, 100_000, 3 << 20] {
        let a = alloc(b, &AllocRequest::new(size, 64), c);
        if caps.holds_bytes {
            write_pattern(b, &a, 17, c);
        }
        let other_device = if b.device() == Device::Cuda(99) {
            Device::Cuda(98)
        } else {
            Device::Cuda(99)
        };
        let mut fakes = vec![
            (
                "other alignment",
                forge(&a, a.addr(), a.size(), 4096 * 16, a.device(), a.id()),
            ),
            (
                "smaller alignment",
                forge(&a, a.addr(), a.size(), 1, a.device(), a.id()),
            ),
            (
                "other device",
                forge(&a, a.addr(), a.size(), a.align(), other_device, a.id()),
            ),
            (
                "other size",
                forge(&a, a.addr(), a.size() + 1, a.align(), a.device(), a.id()),
            ),
        ];
        if let Some(id) = TensorId::from_raw(a.id().get() ^ (1 << 40)) {
            fakes.push((
                "other id",
                forge(&a, a.addr(), a.size(), a.align(), a.device(), id),
            ));
        }
        if let Some(s) = shifted(a.addr(), 64) {
            fakes.push((
                "address shifted by 64 B",
                forge(&a, s, a.size(), a.align(), a.device(), a.id()),
            ));
        }
        for (what, f) in &fakes {
            let before = b.stats();
            // SAFETY: the forged allocation names memory the kit does not
            // use; the backend must refuse it without touching anything.
            let r = unsafe { b.deallocate(f) };
            refused(b, &before, r, &format!("{c}: free with {what} ({size} B)"));
            if caps.holds_bytes {
                let r = b.write(f, 0, &[0xCC; 8]);
                refused(b, &before, r, &format!("{c}: write with {what} ({size} B)"));
                let r = b.read(f, 0, &mut [0u8; 8]);
                refused(b, &before, r, &format!("{c}: read with {what} ({size} B)"));
            }
        }
        if caps.holds_bytes {
            verify_pattern(b, &a, 17, c);
        }
        free(b, &a, c);
    }
}

fn random_size(rng: &mut Rng, max: usize) -> usize {
    match rng.below(10) {
        0 => 0,
        1..=6 => rng.below(512.min(max) + 1),
        7 | 8 => rng.below(65_536.min(max) + 1),
        _ => rng.below(max + 1),
    }
}

fn stats_consistency(b: &dyn TensorAllocator, caps: &Caps) {
    let c = "stats_consistency";
    let mut rng = Rng::new(caps.seed);
    let base = b.stats();
    let mut live: Vec<Allocation> = Vec::new();
    let mut live_bytes = 0u64;
    for op in 0..caps.random_ops {
        if live.is_empty() || rng.below(100) < 55 {
            let size = random_size(&mut rng, caps.churn_max_size);
            let align = 1usize << rng.below(8);
            let a = alloc(b, &AllocRequest::new(size, align), c);
            live_bytes += size as u64;
            live.push(a);
        } else {
            let a = live.swap_remove(rng.below(live.len()));
            free(b, &a, c);
            live_bytes -= a.size() as u64;
        }
        let s = b.stats();
        assert_eq!(
            s.allocated_bytes.current - base.allocated_bytes.current,
            live_bytes,
            "{c}: after op {op}, allocated_bytes.current disagrees with the live set"
        );
        assert_eq!(
            s.allocation.current - base.allocation.current,
            live.len() as u64,
            "{c}: after op {op}, allocation.current disagrees with the live set"
        );
        assert!(
            s.active_bytes.current >= s.allocated_bytes.current,
            "{c}: after op {op}, active bytes {} below allocated {}",
            s.active_bytes.current,
            s.allocated_bytes.current
        );
        assert!(
            s.allocated_bytes.peak >= s.allocated_bytes.current,
            "{c}: after op {op}, peak below current"
        );
    }
    for a in live.drain(..) {
        free(b, &a, c);
    }
    back_to_base(b, &base, c);
}

/// Asserts that the live bytes and count are back where `base` had them.
fn back_to_base(b: &dyn TensorAllocator, base: &MemoryStats, c: &str) {
    let s = b.stats();
    assert_eq!(
        s.allocated_bytes.current, base.allocated_bytes.current,
        "{c}: bytes left after everything was freed"
    );
    assert_eq!(
        s.allocation.current, base.allocation.current,
        "{c}: allocations left after everything was freed"
    );
}

fn threads(b: &dyn TensorAllocator, caps: &Caps) {
    let c = "threads";
    // Allocations handed between threads, with the seed of their pattern.
    let shared: Mutex<Vec<(Allocation, u64)>> = Mutex::new(Vec::new());
    let base = b.stats();
    std::thread::scope(|s| {
        let mut handles = Vec::with_capacity(caps.threads);
        for t in 0..caps.threads {
            let shared = &shared;
            handles.push(s.spawn(move || {
                let mut rng = Rng::new(caps.seed ^ ((t as u64 + 1) * 0x1000_0001));
                let mut mine: Vec<(Allocation, u64)> = Vec::new();
                for i in 0..caps.ops_per_thread {
                    match rng.below(10) {
                        0..=4 => {
                            let size = random_size(&mut rng, caps.churn_max_size);
                            let a = alloc(b, &AllocRequest::bytes(size), c);
                            let seed = ((t as u64) << 32) | i as u64;
                            if caps.holds_bytes {
                                write_pattern(b, &a, seed, c);
                            }
                            if rng.below(2) == 0 {
                                shared
                                    .lock()
                                    .unwrap_or_else(|e| e.into_inner())
                                    .push((a, seed));
                            } else {
                                mine.push((a, seed));
                            }
                        }
                        5..=7 if !mine.is_empty() => {
                            let (a, seed) = mine.swap_remove(rng.below(mine.len()));
                            if caps.holds_bytes {
                                verify_pattern(b, &a, seed, c);
                            }
                            free(b, &a, c);
                        }
                        _ => {
                            // Free one another thread made (cross-thread free).
                            let taken = shared.lock().unwrap_or_else(|e| e.into_inner()).pop();
                            if let Some((a, seed)) = taken {
                                if caps.holds_bytes {
                                    verify_pattern(b, &a, seed, c);
                                }
                                free(b, &a, c);
                            }
                        }
                    }
                }
                for (a, seed) in mine {
                    if caps.holds_bytes {
                        verify_pattern(b, &a, seed, c);
                    }
                    free(b, &a, c);
                }
            }));
        }
        // Joined one by one, not left to the scope: the scope's own wait
        // ends when each closure returns, before the thread's exit handlers
        // (thread-local destructors, a pool's thread-cache flush) have run,
        // and `trim` below must see what those hand back.
        for h in handles {
            if let Err(p) = h.join() {
                std::panic::resume_unwind(p);
            }
        }
    });
    for (a, seed) in shared.into_inner().unwrap_or_else(|e| e.into_inner()) {
        if caps.holds_bytes {
            verify_pattern(b, &a, seed, c);
        }
        free(b, &a, c);
    }
    back_to_base(b, &base, c);
}

fn trim(b: &dyn TensorAllocator, caps: &Caps) {
    let c = "trim";
    let xs: Vec<Allocation> = [100usize, 70_000, 3 << 20]
        .iter()
        .map(|&s| alloc(b, &AllocRequest::bytes(s), c))
        .collect();
    for a in &xs {
        free(b, a, c);
    }
    b.synchronize()
        .unwrap_or_else(|e| panic!("{c}: synchronize: {e}"));
    b.trim();
    let s = b.stats();
    assert!(
        s.reserved_bytes.current <= caps.reserved_after_trim,
        "{c}: {} B still reserved after freeing everything and trim(); the backend documents at most {}",
        s.reserved_bytes.current,
        caps.reserved_after_trim
    );
}
