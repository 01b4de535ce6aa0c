//! Residency: which tensors hold inner-backend memory, the budget, the
//! per-tensor states and the moves between them (load, spill, drop).
//!
//! # States
//! ```text
//!            acquire (miss) / prefetch                 evict (clean: free)
//!   Absent ───────────────────────► Loading ──► Resident ─────────────────► Absent
//!      ▲                                          │  ▲
//!      │              evict (dirty): spill file   ▼  │ spill failed: nothing lost
//!      └────────────────────────────────────── Spilling
//! ```
//! A tensor is *pinned* while `readers > 0`, `writer` or `permanent`; a
//! pinned, loading or spilling tensor is never chosen for eviction.
//!
//! # Invariants (checked by [`Shared::check_invariants`])
//! - `resident == Σ charge over entries in Resident | Loading | Spilling ≤ budget`
//!   (a load reserves its charge before it allocates, so the inner backend
//!   never holds more than the budget, as the inner backend rounds sizes);
//! - `pinned == Σ charge over pinned entries`;
//! - `spilled == Σ size over entries with a spill file`;
//! - an entry has an LRU key iff it is Resident or Spilling with charge > 0,
//!   and `lru.live()` is their count.
//!
//! # Locking
//! One mutex (`Shared::st`) guards the entry map and the counters. It is
//! never held across file I/O or an inner allocation: a thread marks the
//! entry Loading or Spilling, unlocks (`MutexGuard::unlocked`), does the
//! work, relocks and publishes the result. Anyone who finds an entry
//! Loading or Spilling waits on one condition variable (`changed`, notified
//! on every state change) and re-checks, so concurrent requests for one
//! spilled tensor load it once. Every wait has a deadline
//! ([`super::OffloadConfig::wait_timeout`]) and ends in
//! [`AllocError::Timeout`], never a hang.

use super::prefetch::PrefetchState;
use super::spill::{SpillDir, SpillMeta};
use super::{BudgetMode, OffloadConfig};
use crate::allocator::{
    Addr, AllocRequest, Allocation, DType, Device, Shape, TensorAllocator, TensorFlags,
};
use crate::error::AllocError;
use crate::meta::info::AddrKind;
use crate::meta::{MetaTable, NewTensor, TensorKey};
use crate::stats::AtomicStat;
use parking_lot::{Condvar, Mutex, MutexGuard};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

/// Where a tensor's bytes are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Res {
    /// In the inner backend.
    Resident(Allocation),
    /// Budget reserved; a thread is reading the bytes in.
    Loading,
    /// Still in the inner backend, being written to its spill file.
    Spilling(Allocation),
    /// Not in memory: in its spill file or source, or all zero.
    Absent,
}

/// Where a clean, absent tensor's bytes come from.
#[derive(Debug, Clone)]
pub(super) enum Source {
    /// Never written: zeros.
    Zero,
    /// The tensor's spill file.
    Spill,
    /// A byte range of a read-only source file (safetensors).
    #[cfg(feature = "offload-safetensors")]
    Range {
        file: std::sync::Arc<super::safetensors::SourceFile>,
        offset: u64,
    },
}

/// One tensor.
#[derive(Debug)]
pub(super) struct Entry {
    pub size: usize,
    pub align: usize,
    /// Bytes charged against the budget while in memory (inner rounding).
    pub charge: usize,
    pub dtype: Option<DType>,
    pub shape: Option<Shape>,
    pub flags: TensorFlags,
    pub res: Res,
    pub readers: u32,
    pub writer: bool,
    /// Never evicted (requested with `TensorFlags::PINNED`).
    pub permanent: bool,
    /// Written since it was last loaded or spilled.
    pub dirty: bool,
    pub source: Source,
    /// A spill file exists (possibly stale while dirty).
    pub has_file: bool,
    /// The tensor's key in the LRU table while in memory.
    pub key: Option<TensorKey>,
    /// Loaded by the prefetcher and not accessed since.
    pub prefetched: bool,
}

impl Entry {
    pub fn pinned(&self) -> bool {
        self.readers > 0 || self.writer || self.permanent
    }
    pub fn spill_meta(&self) -> SpillMeta {
        SpillMeta {
            dtype: self.dtype,
            shape: self.shape,
            len: self.size,
        }
    }
    fn inner_request(&self) -> AllocRequest {
        AllocRequest {
            size: self.size,
            align: self.align,
            zeroed: matches!(self.source, Source::Zero),
            stream: None,
            shape: self.shape,
            dtype: self.dtype,
            flags: self.flags,
        }
    }
}

/// Everything under the lock.
#[derive(Debug, Default)]
pub(super) struct State {
    pub entries: HashMap<u64, Entry>,
    /// Charged bytes of Resident, Loading and Spilling entries.
    pub resident: usize,
    pub pinned: usize,
    pub spilled: usize,
    /// Loads and spills in progress.
    pub inflight: usize,
    pub pf: PrefetchState,
}

/// Event counters (relaxed atomics; read by `stats`).
#[derive(Debug, Default)]
pub(super) struct Counters {
    pub evictions: AtomicU64,
    pub spills: AtomicU64,
    pub loads: AtomicU64,
    pub prefetch_hits: AtomicU64,
    pub prefetch_misses: AtomicU64,
    pub prefetch_loads: AtomicU64,
    pub prefetch_dropped: AtomicU64,
    pub bytes_read: AtomicU64,
    pub bytes_written: AtomicU64,
    pub hits: AtomicU64,
    pub budget_refusals: AtomicU64,
    /// Reservations that succeeded only after evicting.
    pub retries: AtomicU64,
    pub integrity_errors: AtomicU64,
}

pub(super) fn bump(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

/// Who is asking for room.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Who {
    /// A caller's allocate or access: may evict any unpinned tensor.
    Demand,
    /// The prefetcher: may evict only tensors last used before `before`
    /// (the access that triggered it); `before == 0` means free budget only.
    Prefetch { before: u64 },
}

/// How a caller pins a tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Mode {
    Read,
    Write,
}

/// The backend's state, shared with the prefetch thread.
pub(super) struct Shared<B: TensorAllocator> {
    pub inner: B,
    pub cfg: OffloadConfig,
    pub st: Mutex<State>,
    pub changed: Condvar,
    /// Wakes the prefetch thread.
    pub work: Condvar,
    /// Resident tensors only: last access and the SIMD LRU scan.
    pub lru: MetaTable,
    pub clock: AtomicU64,
    pub spill: SpillDir,
    pub n: Counters,
    pub resident_stat: AtomicStat,
    pub allocated_stat: AtomicStat,
    /// Charged bytes of every live tensor, resident or not.
    pub active_stat: AtomicStat,
    pub count_stat: AtomicStat,
}

impl<B: TensorAllocator> core::fmt::Debug for Shared<B> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Shared")
            .field("budget", &self.cfg.budget)
            .field("spill", &self.spill)
            .finish_non_exhaustive()
    }
}

/// The device an offload allocation reports: its bytes move between the
/// inner backend and disk, so the handle never carries an address.
pub(super) const DEVICE: Device = Device::Disk;

impl<B: TensorAllocator> Shared<B> {
    pub fn new(inner: B, cfg: OffloadConfig, spill: SpillDir) -> Self {
        Shared {
            inner,
            cfg,
            st: Mutex::new(State::default()),
            changed: Condvar::new(),
            work: Condvar::new(),
            lru: MetaTable::new(),
            clock: AtomicU64::new(0),
            spill,
            n: Counters::default(),
            resident_stat: AtomicStat::new(),
            allocated_stat: AtomicStat::new(),
            active_stat: AtomicStat::new(),
            count_stat: AtomicStat::new(),
        }
    }

    pub fn deadline(&self) -> Instant {
        Instant::now() + self.cfg.wait_timeout
    }

    /// Waits for any state change, or fails at `deadline`.
    pub fn wait(
        &self,
        g: &mut MutexGuard<'_, State>,
        deadline: Instant,
        what: &'static str,
    ) -> Result<(), AllocError> {
        if Instant::now() >= deadline || self.changed.wait_until(g, deadline).timed_out() {
            return Err(AllocError::Timeout {
                what,
                waited_ms: self.cfg.wait_timeout.as_millis() as u64,
            });
        }
        Ok(())
    }

    fn reserve(&self, st: &mut State, n: usize) {
        st.resident += n;
        self.resident_stat.add(n as u64);
    }

    pub fn unreserve(&self, st: &mut State, n: usize) {
        st.resident -= n;
        self.resident_stat.sub(n as u64);
    }

    /// Checks that `a` is a live allocation of this backend as recorded.
    /// Changes nothing.
    pub fn verify(&self, st: &State, a: &Allocation) -> Result<(), AllocError> {
        let id = a.id().get();
        if a.device() != DEVICE {
            return Err(AllocError::WrongDevice {
                id,
                expected: DEVICE,
                found: a.device(),
            });
        }
        let e = st
            .entries
            .get(&id)
            .ok_or(AllocError::UnknownId { id, device: DEVICE })?;
        let mismatch = |field, given: usize, recorded: usize| AllocError::Mismatch {
            id,
            field,
            given: given as u64,
            recorded: recorded as u64,
        };
        if a.size() != e.size {
            return Err(mismatch("size", a.size(), e.size));
        }
        if a.align() != e.align {
            return Err(mismatch("align", a.align(), e.align));
        }
        if a.addr() != Addr::None {
            let given = a.host_ptr().map_or(1, |p| p.as_ptr() as usize);
            return Err(mismatch("address", given, 0));
        }
        if a.tag() != self.cfg_tag() {
            return Err(mismatch("tag", a.tag() as usize, self.cfg_tag() as usize));
        }
        Ok(())
    }

    /// The tag every allocation of this backend carries: the spill
    /// directory's sequence number makes handles of two backends differ.
    pub fn cfg_tag(&self) -> u64 {
        self.spill.seq()
    }

    /// Reserves `need` bytes of budget, evicting as `who` may. On `Ok` the
    /// bytes are counted in `resident`; on error nothing is reserved.
    pub fn make_room(
        &self,
        g: &mut MutexGuard<'_, State>,
        need: usize,
        who: Who,
        deadline: Instant,
    ) -> Result<(), AllocError> {
        let budget = self.cfg.budget;
        if need > budget {
            return Err(AllocError::NeverFits {
                device: DEVICE,
                requested: need,
                limit: budget,
            });
        }
        let mut failed = Vec::new();
        let mut first_err = None;
        let mut evicted = false;
        loop {
            if g.resident + need <= budget {
                self.reserve(g, need);
                if evicted {
                    bump(&self.n.retries, 1);
                }
                return Ok(());
            }
            if let Some(id) = self.pick_victim(g, who, &failed) {
                // A dirty victim whose spill fails stays resident (nothing
                // lost); try the others, and report the error only if no
                // victim is left.
                match self.evict(g, id) {
                    Ok(()) => evicted = true,
                    Err(e) => {
                        failed.push(id);
                        first_err.get_or_insert(e);
                    }
                }
                continue;
            }
            if let Some(e) = first_err {
                return Err(e);
            }
            match who {
                Who::Prefetch { .. } => {
                    return Err(AllocError::Unsupported {
                        what: "prefetch: no free budget",
                    });
                }
                Who::Demand if g.inflight > 0 || self.cfg.mode == BudgetMode::Adaptive => self
                    .wait(
                        g,
                        deadline,
                        "offload budget: a tensor to unpin or finish loading",
                    )?,
                Who::Demand => {
                    bump(&self.n.budget_refusals, 1);
                    return Err(AllocError::BudgetExceeded {
                        device: DEVICE,
                        requested: need,
                        resident: g.resident,
                        pinned: g.pinned,
                        budget,
                    });
                }
            }
        }
    }

    /// The least recently used tensor that may be evicted, from the LRU
    /// table's SIMD scan; `None` if there is none.
    fn pick_victim(&self, st: &State, who: Who, skip: &[u64]) -> Option<u64> {
        let mut k = 8;
        let mut buf = Vec::new();
        loop {
            self.lru.lru(k, &mut buf);
            for key in &buf {
                if let Who::Prefetch { before } = who
                    && self.lru.get(*key).is_none_or(|m| m.last_access() >= before)
                {
                    // Oldest first: every later candidate is newer still.
                    return None;
                }
                let id = key.id.get();
                if let Some(e) = st.entries.get(&id)
                    && e.key == Some(*key)
                    && matches!(e.res, Res::Resident(_))
                    && !e.pinned()
                    && !skip.contains(&id)
                {
                    return Some(id);
                }
            }
            if buf.len() < k {
                return None;
            }
            k *= 4;
        }
    }

    /// Takes an unpinned Resident entry out of memory: a clean one is freed
    /// at once, a dirty one is spilled first (lock released during the
    /// write). If the spill fails the tensor stays resident and dirty.
    fn evict(&self, g: &mut MutexGuard<'_, State>, id: u64) -> Result<(), AllocError> {
        let e = g.entries.get_mut(&id).expect("victim is live");
        let Res::Resident(inner) = e.res else {
            unreachable!("victims are resident")
        };
        if e.dirty {
            e.res = Res::Spilling(inner);
            let meta = e.spill_meta();
            g.inflight += 1;
            let r = MutexGuard::unlocked(g, || {
                self.with_inner_bytes(&inner, meta.len, |bytes| self.spill.write(id, &meta, bytes))
            });
            g.inflight -= 1;
            let st = &mut **g;
            let e = st
                .entries
                .get_mut(&id)
                .expect("spilling entries are not freed");
            match r {
                Ok(n) => {
                    bump(&self.n.spills, 1);
                    bump(&self.n.bytes_written, n as u64);
                    if !e.has_file {
                        e.has_file = true;
                        st.spilled += e.size;
                    }
                    e.source = Source::Spill;
                    e.dirty = false;
                    e.res = Res::Resident(inner);
                }
                Err(err) => {
                    e.res = Res::Resident(inner);
                    self.changed.notify_all();
                    return Err(err);
                }
            }
        }
        self.drop_resident(g, id);
        bump(&self.n.evictions, 1);
        Ok(())
    }

    /// Evicts every unpinned resident tensor; returns the bytes freed.
    pub fn evict_all(&self) -> Result<usize, AllocError> {
        let mut g = self.st.lock();
        let before = g.resident;
        while let Some(id) = self.pick_victim(&g, Who::Demand, &[]) {
            self.evict(&mut g, id)?;
        }
        Ok(before.saturating_sub(g.resident))
    }

    /// Frees a clean Resident entry's inner memory; it becomes Absent.
    fn drop_resident(&self, st: &mut State, id: u64) {
        let e = st.entries.get_mut(&id).expect("live entry");
        let Res::Resident(inner) = e.res else {
            unreachable!("only resident entries are dropped")
        };
        if let Some(k) = e.key.take() {
            self.lru.remove(k);
        }
        e.res = Res::Absent;
        let charge = e.charge;
        // SAFETY: `inner` came from `self.inner.allocate` and is freed once:
        // the entry no longer refers to it, and no pin exists (victims are
        // unpinned; pins are taken only under this lock).
        let r = unsafe { self.inner.deallocate(&inner) };
        debug_assert!(r.is_ok(), "inner deallocate: {r:?}");
        self.unreserve(st, charge);
        self.changed.notify_all();
    }

    /// Publishes a freshly filled inner allocation as Resident.
    fn publish(&self, st: &mut State, id: u64, inner: Allocation) {
        let device = self.inner.device();
        let e = st.entries.get_mut(&id).expect("live entry");
        e.res = Res::Resident(inner);
        if e.charge > 0 {
            let mut flags = e.flags;
            if !e.permanent {
                flags.0 &= !TensorFlags::PINNED;
            }
            let (addr_kind, addr) = AddrKind::split(inner.addr());
            let key = self.lru.insert(
                tensor_id(id),
                &NewTensor {
                    size: e.charge as u64,
                    align: e.align as u64,
                    device,
                    shape: e.shape,
                    dtype: e.dtype,
                    flags,
                    addr,
                    addr_kind,
                },
            );
            // A full LRU table (as many resident tensors as the table has
            // slots) leaves this tensor out of the eviction order: it stays
            // resident, counted against the budget, until freed.
            if let Ok(key) = key {
                self.lru.touch(&[key], self.tick());
                e.key = Some(key);
            }
        }
        self.changed.notify_all();
    }

    /// The next logical time (strictly increasing: eviction order depends
    /// only on the order of accesses).
    pub fn tick(&self) -> u64 {
        self.clock.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// Registers a new entry already in memory (allocate).
    pub fn insert_resident(&self, st: &mut State, id: u64, e: Entry, inner: Allocation) {
        st.entries.insert(id, e);
        self.publish(st, id, inner);
    }

    /// Loads an Absent entry whose charge is already reserved: marks it
    /// Loading, unlocks, allocates and fills, relocks, publishes. On error
    /// the reservation is released and the entry is Absent again.
    pub fn load(
        &self,
        g: &mut MutexGuard<'_, State>,
        id: u64,
        prefetch: bool,
    ) -> Result<(), AllocError> {
        let e = g.entries.get_mut(&id).expect("live entry");
        debug_assert_eq!(e.res, Res::Absent);
        e.res = Res::Loading;
        let (req, source, meta, charge) = (
            e.inner_request(),
            e.source.clone(),
            e.spill_meta(),
            e.charge,
        );
        g.inflight += 1;
        let r = MutexGuard::unlocked(g, || self.fill(id, &req, &source, &meta));
        g.inflight -= 1;
        match r {
            Ok((inner, n)) => {
                bump(&self.n.loads, 1);
                bump(&self.n.bytes_read, n as u64);
                if prefetch {
                    bump(&self.n.prefetch_loads, 1);
                }
                self.publish(g, id, inner);
                g.entries.get_mut(&id).expect("live entry").prefetched = prefetch;
                Ok(())
            }
            Err(err) => {
                if matches!(err, AllocError::Integrity { .. }) {
                    bump(&self.n.integrity_errors, 1);
                }
                g.entries.get_mut(&id).expect("live entry").res = Res::Absent;
                self.unreserve(g, charge);
                self.changed.notify_all();
                Err(err)
            }
        }
    }

    /// Allocates the inner memory and reads the tensor's bytes into it.
    /// Returns the allocation and the bytes read from files.
    fn fill(
        &self,
        id: u64,
        req: &AllocRequest,
        source: &Source,
        meta: &SpillMeta,
    ) -> Result<(Allocation, usize), AllocError> {
        let inner = self.inner.allocate(req)?;
        let r = match source {
            Source::Zero => Ok(0),
            Source::Spill => {
                self.with_inner_bytes_mut(&inner, meta.len, |b| self.spill.read(id, meta, b))
            }
            #[cfg(feature = "offload-safetensors")]
            Source::Range { file, offset } => self
                .with_inner_bytes_mut(&inner, meta.len, |b| file.read_at(*offset, b, &self.spill)),
        };
        match r {
            Ok(n) => Ok((inner, n)),
            Err(e) => {
                // SAFETY: allocated above, never published.
                let _ = unsafe { self.inner.deallocate(&inner) };
                Err(e)
            }
        }
    }

    /// Runs `f` on the inner allocation's bytes: in place for host memory,
    /// through a staging copy (`inner.read`) otherwise.
    fn with_inner_bytes<R>(
        &self,
        inner: &Allocation,
        len: usize,
        f: impl FnOnce(&[u8]) -> Result<R, AllocError>,
    ) -> Result<R, AllocError> {
        match inner.host_ptr() {
            // SAFETY: 1. the inner backend's contract makes `p` valid for
            // `len ≤ inner.size()` bytes while `inner` is live; 2. it stays
            // live: the entry is Spilling, which no pin, free or eviction
            // touches; 3. no writer exists (Spilling excludes pins).
            Some(p) => f(unsafe { core::slice::from_raw_parts(p.as_ptr(), len) }),
            None if len == 0 => f(&[]),
            None => {
                let mut v = vec![0u8; len];
                self.inner.read(inner, 0, &mut v)?;
                f(&v)
            }
        }
    }

    /// Runs `f` on the inner allocation's bytes for writing: in place for
    /// host memory, through a staging buffer (`inner.write`) otherwise.
    fn with_inner_bytes_mut(
        &self,
        inner: &Allocation,
        len: usize,
        f: impl FnOnce(&mut [u8]) -> Result<usize, AllocError>,
    ) -> Result<usize, AllocError> {
        match inner.host_ptr() {
            // SAFETY: as in `with_inner_bytes`; the allocation is not yet
            // published, so this is the only reference to its bytes.
            Some(p) => f(unsafe { core::slice::from_raw_parts_mut(p.as_ptr(), len) }),
            None if len == 0 => f(&mut []),
            None => {
                let mut v = vec![0u8; len];
                let n = f(&mut v)?;
                self.inner.write(inner, 0, &v)?;
                Ok(n)
            }
        }
    }

    /// Makes the tensor resident and pins it for `mode`; returns the inner
    /// allocation. Waits (bounded) for loads, spills and conflicting pins.
    pub fn acquire(
        &self,
        a: &Allocation,
        mode: Mode,
        range: (usize, usize),
    ) -> Result<Allocation, AllocError> {
        let id = a.id().get();
        let deadline = self.deadline();
        let mut g = self.st.lock();
        self.verify(&g, a)?;
        a.check_range(range.0, range.1)?;
        let mut missed = false;
        loop {
            let st = &mut *g;
            let Some(e) = st.entries.get_mut(&id) else {
                return Err(AllocError::UnknownId { id, device: DEVICE });
            };
            match e.res {
                Res::Resident(inner) => {
                    let free = match mode {
                        Mode::Read => !e.writer,
                        Mode::Write => !e.writer && e.readers == 0,
                    };
                    if !free {
                        self.wait(&mut g, deadline, "offload: a conflicting pin to end")?;
                        continue;
                    }
                    let was = e.pinned();
                    match mode {
                        Mode::Read => e.readers += 1,
                        Mode::Write => {
                            e.writer = true;
                            e.dirty = true;
                        }
                    }
                    if !was {
                        st.pinned += e.charge;
                    }
                    if e.prefetched {
                        e.prefetched = false;
                        bump(&self.n.prefetch_hits, 1);
                    }
                    if !missed {
                        bump(&self.n.hits, 1);
                    }
                    let now = self.tick();
                    if let Some(k) = e.key {
                        self.lru.touch(&[k], now);
                    }
                    self.follow_order(st, id, now);
                    return Ok(inner);
                }
                Res::Loading | Res::Spilling(_) => {
                    self.wait(&mut g, deadline, "offload: a load or spill to finish")?;
                }
                Res::Absent => {
                    if !missed {
                        missed = true;
                        bump(&self.n.prefetch_misses, 1);
                    }
                    let charge = e.charge;
                    self.make_room(&mut g, charge, Who::Demand, deadline)?;
                    // make_room may have unlocked (to spill): re-check.
                    if g.entries.get(&id).map(|e| e.res) != Some(Res::Absent) {
                        self.unreserve(&mut g, charge);
                        self.changed.notify_all();
                        continue;
                    }
                    self.load(&mut g, id, false)?;
                }
            }
        }
    }

    /// Ends a pin taken by [`Self::acquire`].
    pub fn release(&self, id: u64, mode: Mode) {
        let mut g = self.st.lock();
        let st = &mut *g;
        let Some(e) = st.entries.get_mut(&id) else {
            debug_assert!(false, "released a pin of a freed tensor");
            return;
        };
        match mode {
            Mode::Read => e.readers -= 1,
            Mode::Write => e.writer = false,
        }
        if !e.pinned() {
            st.pinned -= e.charge;
        }
        self.changed.notify_all();
    }

    /// Removes a tensor: waits out a load or spill, refuses a pinned one,
    /// frees its memory and (after unlocking) its spill file.
    pub fn free(&self, a: &Allocation) -> Result<(), AllocError> {
        let id = a.id().get();
        let deadline = self.deadline();
        let mut g = self.st.lock();
        self.verify(&g, a)?;
        loop {
            let e = &g.entries[&id];
            match e.res {
                Res::Loading | Res::Spilling(_) => {
                    self.wait(&mut g, deadline, "offload free: a load or spill to finish")?
                }
                _ if e.readers > 0 || e.writer => {
                    return Err(AllocError::Backend {
                        backend: "offload",
                        op: "deallocate",
                        message: format!(
                            "tensor {id} is pinned ({} readers, writer: {}); drop its guards first",
                            e.readers, e.writer
                        ),
                    });
                }
                _ => break,
            }
        }
        let st = &mut *g;
        let e = st.entries.remove(&id).expect("verified above");
        if let Res::Resident(inner) = e.res {
            if let Some(k) = e.key {
                self.lru.remove(k);
            }
            self.unreserve(st, e.charge);
            // SAFETY: the entry held the only reference; the caller's
            // `deallocate` contract ends every use of the tensor.
            let r = unsafe { self.inner.deallocate(&inner) };
            debug_assert!(r.is_ok(), "inner deallocate: {r:?}");
        }
        if e.permanent {
            st.pinned -= e.charge;
        }
        if e.has_file {
            st.spilled -= e.size;
        }
        self.allocated_stat.sub(e.size as u64);
        self.active_stat.sub(e.charge as u64);
        self.count_stat.sub(1);
        self.changed.notify_all();
        drop(g);
        if e.has_file {
            self.spill.remove(id);
        }
        Ok(())
    }

    /// Checks the module invariants. For tests and debug builds.
    pub fn check_invariants(&self) {
        let st = self.st.lock();
        let (mut res, mut pin, mut spilled, mut keyed) = (0, 0, 0, 0);
        for e in st.entries.values() {
            let in_mem = !matches!(e.res, Res::Absent);
            if in_mem {
                res += e.charge;
            }
            if e.pinned() {
                pin += e.charge;
            }
            if e.has_file {
                spilled += e.size;
            }
            let want_key = matches!(e.res, Res::Resident(_) | Res::Spilling(_)) && e.charge > 0;
            assert_eq!(e.key.is_some(), want_key, "{e:?}");
            keyed += usize::from(want_key);
        }
        assert_eq!(st.resident, res, "resident bytes");
        assert!(st.resident <= self.cfg.budget, "over budget");
        assert_eq!(st.pinned, pin, "pinned bytes");
        assert_eq!(st.spilled, spilled, "spilled bytes");
        assert_eq!(self.lru.live(), keyed, "LRU table");
    }
}

impl<B: TensorAllocator> Drop for Shared<B> {
    fn drop(&mut self) {
        for e in self.st.get_mut().entries.values() {
            if let Res::Resident(inner) | Res::Spilling(inner) = e.res {
                // SAFETY: the backend is being dropped, so no handle or pin
                // of it is left (guards borrow it); each inner allocation is
                // freed once.
                let _ = unsafe { self.inner.deallocate(&inner) };
            }
        }
    }
}

fn tensor_id(id: u64) -> crate::meta::TensorId {
    crate::meta::TensorId::from_raw(id).expect("ids are non-zero")
}
