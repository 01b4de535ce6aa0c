//! [`OffloadBackend`]: tensors beyond a memory budget live on disk.
//!
//! The backend wraps an inner backend (the host backend first) and keeps
//! tensors' bytes in it under a **residency budget**: the bytes the inner
//! backend holds for resident tensors, as it rounds them, never exceed
//! [`OffloadConfig::budget`]. What does not fit is evicted, least recently
//! used first (the metadata table's SIMD `lru` scan over `touch`ed access
//! times): clean tensors are freed (and re-read from their source or spill
//! file when next touched), dirty ones are written to a checksummed spill
//! file first. A background thread prefetches. safetensors files open
//! lazily (feature `offload-safetensors`).
//!
//! Handles ([`Allocation`]) of this backend report [`Device::Disk`] and
//! carry no address: the bytes move. Reach them with
//! [`TensorAllocator::read`]/[`write`](TensorAllocator::write) or a pin
//! guard ([`OffloadBackend::pin`], [`OffloadBackend::pin_mut`]), which
//! keeps the tensor resident and gives host slices and `bytemuck` views.
//!
//! Files: `residency.rs` (states, budget, eviction, loads), [`spill`]
//! (spill files), `prefetch.rs` (the I/O thread), `safetensors.rs` (sources).

mod prefetch;
mod residency;
#[cfg(feature = "offload-safetensors")]
mod safetensors;
pub mod spill;

#[cfg(feature = "offload-safetensors")]
pub use safetensors::{SafetensorsFile, SafetensorsOptions};
pub use spill::{FaultHook, IoOp};

use crate::allocator::{
    Addr, AllocRequest, Allocation, Device, TensorAllocator, TensorFlags, ViewError,
};
use crate::error::AllocError;
use crate::stats::MemoryStats;
use core::ptr::NonNull;
use residency::{DEVICE, Entry, Mode, Res, Shared, Source, Who};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::thread::JoinHandle;
use std::time::Duration;

/// What happens when a request needs room and nothing can be evicted
/// (everything resident is pinned or loading).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BudgetMode {
    /// Fail at once with [`AllocError::BudgetExceeded`] (naming the bytes
    /// required, resident, pinned and the budget).
    #[default]
    Strict,
    /// Wait for a pin to end or a load to finish, then evict and retry; fail
    /// with [`AllocError::Timeout`] after [`OffloadConfig::wait_timeout`].
    Adaptive,
}

/// How many bytes a request occupies in the inner backend.
pub type Rounding = fn(&AllocRequest) -> Result<usize, AllocError>;

/// The host pool's rounding (its size classes), the default.
pub fn host_rounding(req: &AllocRequest) -> Result<usize, AllocError> {
    super::ledger::check(req).map(|c| c.rounded)
}

/// Configuration. `OffloadConfig { budget, ..Default::default() }`.
#[derive(Clone)]
pub struct OffloadConfig {
    /// Resident bytes allowed in the inner backend (as it rounds them).
    pub budget: usize,
    /// What to do when nothing can be evicted.
    pub mode: BudgetMode,
    /// Where to create the spill directory (default: the system temp dir).
    pub spill_root: PathBuf,
    /// Keep the spill directory after drop (default: remove it).
    pub keep_spill_dir: bool,
    /// Tensors queued after each access in the registered order.
    pub prefetch_depth: usize,
    /// Start the background prefetch thread.
    pub prefetch_thread: bool,
    /// Longest wait for a load, spill, pin or the budget.
    pub wait_timeout: Duration,
    /// The inner backend's rounding (default [`host_rounding`]).
    pub rounding: Rounding,
    /// Called before every file operation (tests inject errors with it).
    pub fault: Option<FaultHook>,
}

impl core::fmt::Debug for OffloadConfig {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("OffloadConfig")
            .field("budget", &self.budget)
            .field("mode", &self.mode)
            .field("spill_root", &self.spill_root)
            .field("keep_spill_dir", &self.keep_spill_dir)
            .field("prefetch_depth", &self.prefetch_depth)
            .field("prefetch_thread", &self.prefetch_thread)
            .field("wait_timeout", &self.wait_timeout)
            .field("fault", &self.fault.is_some())
            .finish_non_exhaustive()
    }
}

impl Default for OffloadConfig {
    fn default() -> Self {
        OffloadConfig {
            budget: 1 << 30,
            mode: BudgetMode::Strict,
            spill_root: std::env::temp_dir(),
            keep_spill_dir: false,
            prefetch_depth: 2,
            prefetch_thread: true,
            wait_timeout: Duration::from_secs(60),
            rounding: host_rounding,
            fault: None,
        }
    }
}

impl OffloadConfig {
    /// A configuration with `budget` bytes and defaults otherwise.
    pub fn with_budget(budget: usize) -> Self {
        OffloadConfig {
            budget,
            ..Default::default()
        }
    }
    /// Checks the configuration: a budget above zero, a wait above zero.
    pub fn validate(&self) -> Result<(), AllocError> {
        if self.budget == 0 {
            return Err(AllocError::Unsupported {
                what: "offload budget of 0 bytes",
            });
        }
        if self.wait_timeout.is_zero() {
            return Err(AllocError::Unsupported {
                what: "offload wait_timeout of 0",
            });
        }
        Ok(())
    }
}

/// Where one tensor is now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TensorState {
    /// In the inner backend, evictable.
    Resident,
    /// In the inner backend and pinned (a guard, a read or write in
    /// progress, or `TensorFlags::PINNED`).
    Pinned,
    /// Being read in.
    Loading,
    /// Being written to its spill file.
    Spilling,
    /// Not in memory: in its spill file.
    Spilled,
    /// Not in memory: in its source file, or never written (zeros).
    NotResident,
}

/// Offload counters, beside the usual [`MemoryStats`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OffloadStats {
    /// The budget in bytes.
    pub budget: usize,
    /// Bytes charged for tensors in memory (loading included), now.
    pub resident_bytes: usize,
    /// Highest `resident_bytes` seen.
    pub peak_resident_bytes: usize,
    /// Bytes of tensors with a spill file.
    pub spilled_bytes: usize,
    /// Bytes charged for pinned tensors, now.
    pub pinned_bytes: usize,
    /// Tensors taken out of memory.
    pub evictions: u64,
    /// Spill files written.
    pub spills: u64,
    /// Tensors read in (by callers and the prefetcher).
    pub loads: u64,
    /// First accesses to a tensor the prefetcher loaded.
    pub prefetch_hits: u64,
    /// Accesses that found the tensor out of memory and loaded it.
    pub prefetch_misses: u64,
    /// Loads done by the prefetcher.
    pub prefetch_loads: u64,
    /// Prefetches dropped (no room without evicting what they may not).
    pub prefetch_dropped: u64,
    /// Bytes read from spill and source files (headers included).
    pub bytes_read: u64,
    /// Bytes written to spill files (headers included).
    pub bytes_written: u64,
    /// Loads refused by verification.
    pub integrity_errors: u64,
}

/// A backend that keeps at most a budget of tensor bytes in `B` and the
/// rest on disk. See the module docs.
pub struct OffloadBackend<B: TensorAllocator + 'static> {
    sh: Arc<Shared<B>>,
    io: Option<JoinHandle<()>>,
}

impl<B: TensorAllocator + 'static> core::fmt::Debug for OffloadBackend<B> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("OffloadBackend")
            .field("shared", &self.sh)
            .finish_non_exhaustive()
    }
}

impl<B: TensorAllocator + 'static> OffloadBackend<B> {
    /// Wraps `inner` under `cfg` and creates the spill directory.
    pub fn new(inner: B, cfg: OffloadConfig) -> Result<Self, AllocError> {
        cfg.validate()?;
        let dir = spill::SpillDir::create(&cfg.spill_root, cfg.keep_spill_dir, cfg.fault.clone())?;
        let start = cfg.prefetch_thread;
        let sh = Arc::new(Shared::new(inner, cfg, dir));
        let io = if start {
            let s = sh.clone();
            Some(
                std::thread::Builder::new()
                    .name("tensorpool-offload-io".into())
                    .spawn(move || prefetch::run(s))
                    .map_err(|e| AllocError::Io {
                        op: "spawn prefetch thread",
                        path: String::new(),
                        message: e.to_string(),
                    })?,
            )
        } else {
            None
        };
        Ok(OffloadBackend { sh, io })
    }

    /// The inner backend.
    pub fn inner(&self) -> &B {
        &self.sh.inner
    }

    /// The configuration.
    pub fn config(&self) -> &OffloadConfig {
        &self.sh.cfg
    }

    /// The spill directory.
    pub fn spill_dir(&self) -> &Path {
        self.sh.spill.path()
    }

    /// Pins `a` for reading: loads it if needed and keeps it resident until
    /// the guard drops.
    pub fn pin(&self, a: &Allocation) -> Result<Resident<'_, B>, AllocError> {
        self.guard(a, Mode::Read)
    }

    /// Pins `a` for writing (exclusive: waits for other pins), and marks it
    /// dirty. A thread that already holds a pin of `a` and asks for this
    /// one waits for itself: it gets [`AllocError::Timeout`] after
    /// [`OffloadConfig::wait_timeout`].
    pub fn pin_mut(&self, a: &Allocation) -> Result<ResidentMut<'_, B>, AllocError> {
        self.guard(a, Mode::Write).map(ResidentMut)
    }

    fn guard(&self, a: &Allocation, mode: Mode) -> Result<Resident<'_, B>, AllocError> {
        let inner = self.sh.acquire(a, mode, (0, 0))?;
        let g = Resident {
            sh: &self.sh,
            id: a.id().get(),
            mode,
            ptr: match inner.addr() {
                Addr::Host(p) => p,
                _ => NonNull::<u64>::dangling().cast(),
            },
            len: a.size(),
        };
        if a.size() > 0 && inner.host_ptr().is_none() {
            drop(g);
            return Err(AllocError::Unsupported {
                what: "offload pin: the inner backend's memory is not host memory; use read/write",
            });
        }
        Ok(g)
    }

    /// Where `a` is now.
    pub fn state(&self, a: &Allocation) -> Result<TensorState, AllocError> {
        let st = self.sh.st.lock();
        self.sh.verify(&st, a)?;
        let e = &st.entries[&a.id().get()];
        Ok(match e.res {
            Res::Resident(_) if e.pinned() => TensorState::Pinned,
            Res::Resident(_) => TensorState::Resident,
            Res::Loading => TensorState::Loading,
            Res::Spilling(_) => TensorState::Spilling,
            Res::Absent if matches!(e.source, Source::Spill) => TensorState::Spilled,
            Res::Absent => TensorState::NotResident,
        })
    }

    /// Hints that `tensors` will be used soon: the I/O thread loads those
    /// not in memory, into free budget only (it evicts nothing for a hint).
    pub fn prefetch(&self, tensors: &[Allocation]) -> Result<(), AllocError> {
        let mut st = self.sh.st.lock();
        for a in tensors {
            self.sh.verify(&st, a)?;
        }
        let ids: Vec<u64> = tensors.iter().map(|a| a.id().get()).collect();
        self.sh.hint(&mut st, &ids);
        Ok(())
    }

    /// Registers an access order: each access to `order[i]` queues
    /// `order[i+1 ..= i+prefetch_depth]` for prefetch. Replaces any earlier
    /// order; an empty slice clears it.
    pub fn set_order(&self, order: &[Allocation]) -> Result<(), AllocError> {
        let mut st = self.sh.st.lock();
        for a in order {
            self.sh.verify(&st, a)?;
        }
        st.pf.order = order.iter().map(|a| a.id().get()).collect();
        st.pf.pos = st
            .pf
            .order
            .iter()
            .enumerate()
            .map(|(i, &id)| (id, i))
            .collect();
        Ok(())
    }

    /// Waits until the prefetch queue is empty and no prefetch is running
    /// (for tests and benchmarks; gives up after the wait timeout).
    pub fn wait_prefetch_idle(&self) -> Result<(), AllocError> {
        self.sh.wait_idle(self.sh.deadline())
    }

    /// Takes every unpinned tensor out of memory (spilling dirty ones).
    /// Returns the charged bytes freed.
    pub fn evict_all(&self) -> Result<usize, AllocError> {
        self.sh.evict_all()
    }

    /// The offload counters.
    pub fn offload_stats(&self) -> OffloadStats {
        let st = self.sh.st.lock();
        let n = &self.sh.n;
        let l = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed);
        OffloadStats {
            budget: self.sh.cfg.budget,
            resident_bytes: st.resident,
            peak_resident_bytes: self.sh.resident_stat.get().peak as usize,
            spilled_bytes: st.spilled,
            pinned_bytes: st.pinned,
            evictions: l(&n.evictions),
            spills: l(&n.spills),
            loads: l(&n.loads),
            prefetch_hits: l(&n.prefetch_hits),
            prefetch_misses: l(&n.prefetch_misses),
            prefetch_loads: l(&n.prefetch_loads),
            prefetch_dropped: l(&n.prefetch_dropped),
            bytes_read: l(&n.bytes_read),
            bytes_written: l(&n.bytes_written),
            integrity_errors: l(&n.integrity_errors),
        }
    }

    /// Checks the residency invariants (panics on a violation). For tests.
    pub fn check_invariants(&self) {
        self.sh.check_invariants();
    }

    fn new_entry(req: &AllocRequest, charge: usize) -> Entry {
        Entry {
            size: req.size,
            align: req.align,
            charge,
            dtype: req.dtype,
            shape: req.shape,
            flags: req.flags,
            res: Res::Absent,
            readers: 0,
            writer: false,
            permanent: req.flags.has(TensorFlags::PINNED),
            dirty: false,
            source: Source::Zero,
            has_file: false,
            key: None,
            prefetched: false,
        }
    }

    /// Registers a tensor that is not in memory, with `source` (files).
    #[cfg_attr(not(feature = "offload-safetensors"), allow(dead_code))]
    fn register(&self, req: &AllocRequest, source: Source) -> Result<Allocation, AllocError> {
        req.check_align()?;
        let charge = (self.sh.cfg.rounding)(req)?;
        let id = crate::meta::next_id().ok_or(AllocError::Unsupported {
            what: "tensor id space exhausted (2^64 ids issued)",
        })?;
        let mut e = Self::new_entry(req, charge);
        e.permanent = false;
        e.source = source;
        self.sh.st.lock().entries.insert(id.get(), e);
        self.sh.allocated_stat.add(req.size as u64);
        self.sh.active_stat.add(charge as u64);
        self.sh.count_stat.add(1);
        Ok(self.handle(id, req))
    }

    fn handle(&self, id: crate::meta::TensorId, req: &AllocRequest) -> Allocation {
        Allocation::new(
            id,
            Addr::None,
            req.size,
            req.align,
            DEVICE,
            self.sh.cfg_tag(),
        )
    }
}

impl<B: TensorAllocator + 'static> Drop for OffloadBackend<B> {
    fn drop(&mut self) {
        self.sh.st.lock().pf.shutdown = true;
        self.sh.work.notify_all();
        if let Some(h) = self.io.take() {
            let _ = h.join();
        }
    }
}

// SAFETY: every allocation handed out has `Addr::None` (no pointer is
// promised; bytes are reached through read/write and pin guards, which check
// liveness and bounds), and ids come from the process-wide issuer (unique,
// never reused).
unsafe impl<B: TensorAllocator + 'static> TensorAllocator for OffloadBackend<B> {
    fn device(&self) -> Device {
        DEVICE
    }

    fn allocate(&self, req: &AllocRequest) -> Result<Allocation, AllocError> {
        req.check_align()?;
        let charge = (self.sh.cfg.rounding)(req)?;
        let sh = &self.sh;
        let mut g = sh.st.lock();
        sh.make_room(&mut g, charge, Who::Demand, sh.deadline())?;
        let r = parking_lot::MutexGuard::unlocked(&mut g, || {
            let id = crate::meta::next_id().ok_or(AllocError::Unsupported {
                what: "tensor id space exhausted (2^64 ids issued)",
            })?;
            // Always zeroed: a never-written tensor reads as zeros before
            // and after an eviction (its reload is zeros).
            Ok((id, sh.inner.allocate(&req.zeroed())?))
        });
        let (id, inner) = match r {
            Ok(x) => x,
            Err(e) => {
                sh.unreserve(&mut g, charge);
                sh.changed.notify_all();
                return Err(e);
            }
        };
        let mut e = Self::new_entry(req, charge);
        if e.permanent {
            g.pinned += charge;
        }
        // Never written: a clean tensor whose reload is zeros.
        e.source = Source::Zero;
        sh.insert_resident(&mut g, id.get(), e, inner);
        drop(g);
        sh.allocated_stat.add(req.size as u64);
        sh.active_stat.add(charge as u64);
        sh.count_stat.add(1);
        Ok(self.handle(id, req))
    }

    unsafe fn deallocate(&self, a: &Allocation) -> Result<(), AllocError> {
        self.sh.free(a)
    }

    fn stats(&self) -> MemoryStats {
        let inner = self.sh.inner.stats();
        let n = &self.sh.n;
        MemoryStats {
            device: Some(DEVICE),
            allocated_bytes: self.sh.allocated_stat.get(),
            reserved_bytes: inner.reserved_bytes,
            // Every live tensor, in memory or on disk (resident bytes are
            // in `offload_stats`).
            active_bytes: self.sh.active_stat.get(),
            allocation: self.sh.count_stat.get(),
            segment: inner.segment,
            num_ooms: n.budget_refusals.load(Ordering::Relaxed),
            num_alloc_retries: n.retries.load(Ordering::Relaxed),
            cache_hits: n.hits.load(Ordering::Relaxed),
            cache_misses: n.prefetch_misses.load(Ordering::Relaxed),
            per_category: Default::default(),
        }
    }

    fn trim(&self) -> usize {
        self.sh.inner.trim()
    }

    fn write(&self, a: &Allocation, offset: usize, src: &[u8]) -> Result<(), AllocError> {
        let inner = self.sh.acquire(a, Mode::Write, (offset, src.len()))?;
        let r = self.sh.inner.write(&inner, offset, src);
        self.sh.release(a.id().get(), Mode::Write);
        r
    }

    fn read(&self, a: &Allocation, offset: usize, dst: &mut [u8]) -> Result<(), AllocError> {
        let inner = self.sh.acquire(a, Mode::Read, (offset, dst.len()))?;
        let r = self.sh.inner.read(&inner, offset, dst);
        self.sh.release(a.id().get(), Mode::Read);
        r
    }

    fn synchronize(&self) -> Result<(), AllocError> {
        self.sh.inner.synchronize()
    }
}

/// A pinned tensor: resident until the guard drops. Host slices and
/// `bytemuck` views of its bytes.
pub struct Resident<'a, B: TensorAllocator> {
    sh: &'a Shared<B>,
    id: u64,
    mode: Mode,
    ptr: NonNull<u8>,
    len: usize,
}

impl<B: TensorAllocator> core::fmt::Debug for Resident<'_, B> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Resident")
            .field("id", &self.id)
            .field("len", &self.len)
            .field("mode", &self.mode)
            .finish()
    }
}

impl<B: TensorAllocator> Resident<'_, B> {
    /// The bytes.
    pub fn as_bytes(&self) -> &[u8] {
        // SAFETY: 1. `ptr` is the inner allocation's host pointer, valid for
        // `len` bytes while it is live (the inner backend's contract); 2. the
        // pin keeps it live and in place: pinned tensors are never evicted
        // and `deallocate` refuses them; 3. a read pin excludes the write
        // pin (`acquire`), and a write guard hands out `&mut` only through
        // `&mut self`; 4. a dangling pointer is used only with `len == 0`.
        unsafe { core::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
    /// The bytes as `&[T]`.
    pub fn as_slice<T: bytemuck::Pod>(&self) -> Result<&[T], ViewError> {
        bytemuck::try_cast_slice(self.as_bytes()).map_err(ViewError::Cast)
    }
}

impl<B: TensorAllocator> Drop for Resident<'_, B> {
    fn drop(&mut self) {
        self.sh.release(self.id, self.mode);
    }
}

/// An exclusively pinned tensor (see [`OffloadBackend::pin_mut`]).
#[derive(Debug)]
pub struct ResidentMut<'a, B: TensorAllocator>(Resident<'a, B>);

impl<'a, B: TensorAllocator> core::ops::Deref for ResidentMut<'a, B> {
    type Target = Resident<'a, B>;
    fn deref(&self) -> &Resident<'a, B> {
        &self.0
    }
}

impl<B: TensorAllocator> ResidentMut<'_, B> {
    /// The bytes, writable.
    pub fn as_bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `Resident::as_bytes`; the write pin is exclusive
        // (no other pin of this tensor exists) and `&mut self` makes this
        // view unique among this guard's views.
        unsafe { core::slice::from_raw_parts_mut(self.0.ptr.as_ptr(), self.0.len) }
    }
    /// The bytes as `&mut [T]`.
    pub fn as_mut_slice<T: bytemuck::Pod>(&mut self) -> Result<&mut [T], ViewError> {
        bytemuck::try_cast_slice_mut(self.as_bytes_mut()).map_err(ViewError::Cast)
    }
}
