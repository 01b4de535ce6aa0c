//! [`MetaTable`]: tensor id → 64-byte record, generation-checked, with exact
//! concurrent batch operations.
//!
//! # Slots and keys
//! A tensor lives in a *slot*; its [`TensorKey`] is `(id, slot)`. Ids are
//! never reused, so the id is the slot's generation: a key is valid iff the
//! slot's id column holds `key.id` (vacant slots hold 0). A stale key is
//! therefore an error (`None`, nothing changes), never another tensor's
//! record.
//!
//! Slots never move: storage is a fixed directory of [`DIR_LEN`] pointers to
//! lazily allocated chunks of [`CHUNK`] slots, so readers index without a
//! lock. Insert and remove take a mutex (slow path); `get`, `touch` and the
//! scans take none.
//!
//! # Layout
//! Each chunk holds, per slot, a 64-byte record cell (eight atomic words,
//! `TensorMeta::to_words`), a cold side cell (address, alignment and the
//! whole shape: [`crate::meta::info`], read only by [`MetaTable::info`]
//! and never by a scan) and beside them structure-of-arrays hot columns:
//! `ids` (u64), `last` (last access, u64), `count` (access count, u64),
//! `size` (u64) and `tag` (u32: live, pinned, size category, flags, device;
//! see [`crate::meta::batch`]). The counters live only in the columns; a
//! record read out of the table carries their current values.
//!
//! **Why columns beside the records.** `benches/meta_simd.rs`, group
//! `layout`, measures both layouts on this machine (2-core AMD EPYC, 48 KiB
//! L1d / 1 MiB L2 per core, 32 MiB L3; other jobs running, so two runs are
//! quoted):
//!
//! | operation                                   | slots | 64 B records (AoS) | columns (SoA) |
//! |---------------------------------------------|------:|-------------------:|--------------:|
//! | filter scan (live and last < t)             | 16 Ki | 9.1 / 12.3 µs      | 9.0 / 7.7 µs  |
//! | filter scan (live and last < t)             |  1 Mi | 2.57 / 2.68 ms     | 0.58 / 0.52 ms|
//! | touch, 64 Ki random ids (fetch_add + max)   | 16 Ki | 12.3 / 13.9 ns/id  | 14.2 / 13.7 ns/id |
//! | touch, 64 Ki random ids (fetch_add + max)   |  1 Mi | 16.9 / 16.2 ns/id  | 15.9 / 13.6 ns/id |
//!
//! Scans read 12 bytes a slot from columns against a 64-byte line from
//! records: 4.4–5.1× faster once the table leaves the caches, never slower;
//! touch costs the same either way (it is bound by its two atomic
//! read-modify-writes, not by lines). Columns are also what the SIMD
//! backends need (contiguous lanes). So the hot fields live in columns and
//! the 64-byte record keeps the cold ones for `get` and `remove`.
//!
//! # Usage counters
//! `usage_by_category` and `usage_by_device` read counters that insert and
//! remove keep under the slot lock they already take; readers take no lock
//! (`meta::usage`: a seqlock over per-category and per-device count and
//! bytes, with [`DEVICE_SLOTS`] device entries). They used to scan the
//! columns, and `HostBackend::stats()` calls `usage_by_category` on every
//! read, so stats cost O(live tensors): the AVX2 scan took 422–423 ns at
//! 1 Ki slots and 441–451 µs at 1 Mi (two runs), 3.5–4.5× a sequential read
//! of the same bytes (95 ns / 118–126 µs), bound by its five masked
//! accumulations per lane; it missed the target of 1.5× the floor. Reading
//! the counters takes 2.0 ns at every size from 1 Ki to 1 Mi slots
//! (`benches/meta_simd.rs`, `scan/usage/counters`), and `usage_by_device`
//! 37 ns (it sorts into a new `Vec`) where its scan took 1.6 µs at 1 Ki and
//! 1.7 ms at 1 Mi. In exchange insert and remove, under the lock they
//! already hold, update one category and one device entry (found among at
//! most [`DEVICE_SLOTS`]); no bench here measures that cost separately. The
//! scans stay as [`MetaTable::usage_by_category_scan`] and
//! [`MetaTable::usage_by_device_scan`], the reference for tests and
//! benches.
//!
//! # Concurrency
//! Invariants (checked by [`MetaTable::check_invariants`]):
//! `live == |{slot < hw : ids[slot] != 0}|`,
//! `hw == live + |free| + |limbo_cur| + |limbo_prev|`,
//! `tag[slot] & LIVE != 0 ⇔ ids[slot] != 0` (outside insert/remove),
//! `usage_by_category() == usage_by_category_scan()` and
//! `usage_by_device() == usage_by_device_scan()` (outside insert/remove).
//!
//! - **get** is a seqlock read: id (Acquire) = key.id, the words, an Acquire
//!   fence, id again = key.id. Insert writes a reused slot's words only
//!   after a Release fence that follows the removal's id store, so a read
//!   that saw any new word sees the id change and returns `None`.
//! - **touch** checks `ids[slot] == key.id` and then adds with one atomic
//!   `fetch_add` per *distinct* slot (duplicates are counted first), and a
//!   `fetch_max` on `last` only when it would raise it. No increment is
//!   lost. A slot that was checked must not be handed to another tensor
//!   before the add lands: removed slots wait in *limbo* for a grace
//!   period. Touch and scans *pin* the current epoch (a counter in one of
//!   [`SHARDS`] cache-padded cells, picked by the thread's stack address);
//!   insert advances the epoch only when nobody is pinned in the previous
//!   one, and reuses a slot only two epochs after its removal. Insert never
//!   waits: with no reusable slot it takes a fresh one. The protocol lives
//!   in `meta/grace.rs` and is model-checked by loom (`tests/loom.rs`,
//!   `grace_period_keeps_touches_off_the_next_tenant`).
//! - **Scans** (lru, touched_before, the usage scans, decay) pin too, read the
//!   columns through the chosen [`BatchBackend`], and under concurrent
//!   insert/remove report each tensor as it was at some moment of the scan
//!   (they are not snapshots). Decay calls are serialized with each other.

use crate::allocator::Allocation;
use crate::allocator::{DType, Device, Shape, TensorFlags};
use crate::error::AllocError;
use crate::host::size_class::Category;
use crate::meta::batch::{self, BatchBackend, LIVE, PINNED, UnsupportedBackend};
use crate::meta::grace::{Grace, Limbo};
use crate::meta::id::TensorId;
use crate::meta::info::{AddrKind, COLD_WORDS, TensorInfo};
use crate::meta::record::TensorMeta;
use crate::meta::usage::UsageCounters;
use crate::stats::CategoryUsage;
use crate::sync::{AtomicPtr, AtomicU32, AtomicU64, AtomicUsize, Ordering, fence};
use parking_lot::Mutex;
use std::collections::BinaryHeap;

/// log2 of [`CHUNK`].
const CHUNK_BITS: u32 = 12;
/// Slots per chunk.
pub const CHUNK: usize = 1 << CHUNK_BITS;
/// Chunks in the directory.
pub const DIR_LEN: usize = 1 << 14;
/// The most slots a table can hold (64 Mi).
pub const MAX_SLOTS: usize = CHUNK * DIR_LEN;
/// Epoch counter shards (threads pin one each, by stack address).
pub use crate::meta::grace::SHARDS;
/// Devices the usage counters keep an entry for at once (see
/// [`MetaTable::usage_by_device`]).
pub const DEVICE_SLOTS: usize = 16;
/// Batches at least this long count duplicates before adding (fewer atomics);
/// shorter ones add per key. Chosen by `benches/meta_simd.rs` (touch group).
const AGGREGATE_FROM: usize = 64;
/// ... and at least `1 / SPARSE_RATIO` of the table's slots long; sparser
/// batches have few duplicates and the tally would only add a cache miss.
const SPARSE_RATIO: usize = 8;
/// With more than `1 / DENSE_RATIO` of the slots touched, the adds walk the
/// tally in slot order instead of in first-seen order.
const DENSE_RATIO: usize = 8;

/// Identifies a tensor in a [`MetaTable`]: its id and its slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct TensorKey {
    /// The tensor id (the slot's generation).
    pub id: TensorId,
    /// The slot.
    pub slot: u32,
}

impl TensorKey {
    /// The key of an allocation made by a backend that records its tensors
    /// in a table (the host and meta backends keep the slot in
    /// [`Allocation::tag`]); `None` if the tag cannot be a slot. Whether the
    /// key is live is the table's to say ([`MetaTable::info`]).
    pub fn of(a: &Allocation) -> Option<TensorKey> {
        Some(TensorKey {
            id: a.id(),
            slot: u32::try_from(a.tag()).ok()?,
        })
    }
}

/// What [`MetaTable::insert`] records about a new tensor.
#[derive(Clone, Copy, Debug)]
pub struct NewTensor {
    /// Requested bytes.
    pub size: u64,
    /// Alignment in bytes.
    pub align: u64,
    /// Where the bytes live.
    pub device: Device,
    /// Shape, if known.
    pub shape: Option<Shape>,
    /// Element type, if known.
    pub dtype: Option<DType>,
    /// Flags (pinned, weight, temporary).
    pub flags: TensorFlags,
    /// The address (or offset) of the bytes; hashed into the record and
    /// kept in the cold side table.
    pub addr: u64,
    /// What kind of address `addr` is.
    pub addr_kind: AddrKind,
}

impl NewTensor {
    /// `size` bytes on `device`, default alignment, no shape, no flags.
    pub fn bytes(size: u64, device: Device) -> Self {
        NewTensor {
            size,
            align: crate::allocator::DEFAULT_ALIGN as u64,
            device,
            shape: None,
            dtype: None,
            flags: TensorFlags::default(),
            addr: 0,
            addr_kind: AddrKind::None,
        }
    }
}

/// One 64-byte record, stored as atomic words so that readers may copy it
/// while insert rewrites a reused slot (the seqlock in [`MetaTable::get`]).
#[repr(C, align(64))]
struct RecordCell([AtomicU64; 8]);

/// One slot's cold words ([`crate::meta::info`]), atomic for the same
/// reason as [`RecordCell`].
#[repr(C)]
struct ColdCell([AtomicU64; COLD_WORDS]);

/// [`CHUNK`] slots: hot columns and record cells. Zeroed memory is a valid
/// chunk of vacant slots.
#[repr(C)]
struct Chunk {
    ids: [AtomicU64; CHUNK],
    last: [AtomicU64; CHUNK],
    count: [AtomicU64; CHUNK],
    size: [AtomicU64; CHUNK],
    tag: [AtomicU32; CHUNK],
    records: [RecordCell; CHUNK],
    /// The cold side table: written by insert, read by `info`, never scanned.
    cold: [ColdCell; CHUNK],
}

/// Scratch space for counting duplicates in a touch batch.
#[derive(Debug, Default)]
struct TouchScratch {
    /// Per slot: the id seen first in this batch and its occurrences. All
    /// counts are zero between batches.
    ent: Vec<Seen>,
    /// Slots with a non-zero count, in first-seen order.
    distinct: Vec<u32>,
    /// Keys whose slot was first seen with another id (one of them is
    /// stale): touched one by one.
    odd: Vec<TensorKey>,
}

/// One slot's tally in [`TouchScratch::ent`].
#[derive(Clone, Copy, Debug, Default)]
struct Seen {
    id: u64,
    n: u64,
}

/// Tensor id → metadata, with exact concurrent batch operations. See the
/// module docs for layout and concurrency. Every method takes `&self`.
///
/// `Send + Sync` without an `unsafe impl`: the chunks behind the directory
/// hold only atomics, and a chunk is freed only in `Drop` (`&mut self`).
pub struct MetaTable {
    /// Chunk pointers: null until allocated, then fixed until drop.
    dir: Box<[AtomicPtr<Chunk>]>,
    /// Slots ever handed out (the high-water mark); slots `>= hw` are vacant.
    hw: AtomicUsize,
    /// The most slots this table hands out (at most [`MAX_SLOTS`]).
    max_slots: usize,
    /// Live tensors.
    live: AtomicUsize,
    /// Live count and bytes per category and device (written under `slots`).
    usage: UsageCounters,
    /// The [`BatchBackend`] code the scans use.
    backend: AtomicUsize,
    grace: Grace,
    slots: Mutex<Limbo>,
    scratch: Mutex<Vec<TouchScratch>>,
    decay_lock: Mutex<()>,
}

impl core::fmt::Debug for MetaTable {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("MetaTable")
            .field("live", &self.live())
            .field("high_water", &self.high_water())
            .field("backend", &self.backend())
            .finish_non_exhaustive()
    }
}

impl Default for MetaTable {
    fn default() -> Self {
        Self::new()
    }
}

#[inline]
fn split(slot: u32) -> (usize, usize) {
    ((slot >> CHUNK_BITS) as usize, slot as usize & (CHUNK - 1))
}

#[inline]
fn bump_last(last: &AtomicU64, now: u64) {
    // Most touches in a batch share `now`: skip the RMW when it would not raise.
    if last.load(Ordering::Relaxed) < now {
        last.fetch_max(now, Ordering::Relaxed);
    }
}

impl MetaTable {
    /// An empty table. Reserves only the chunk directory (128 KiB); chunks
    /// (about 400 KiB per 4096 slots) are allocated as slots are first used.
    pub fn new() -> Self {
        Self::with_max_slots(MAX_SLOTS)
    }

    /// An empty table that holds at most `max_slots` tensors (live or
    /// waiting out a grace period; capped at [`MAX_SLOTS`]). Past that,
    /// [`insert`](Self::insert) returns [`AllocError::TableFull`].
    pub fn with_max_slots(max_slots: usize) -> Self {
        let max_slots = max_slots.min(MAX_SLOTS);
        MetaTable {
            dir: (0..max_slots.div_ceil(CHUNK))
                .map(|_| AtomicPtr::new(core::ptr::null_mut()))
                .collect(),
            hw: AtomicUsize::new(0),
            max_slots,
            live: AtomicUsize::new(0),
            usage: UsageCounters::new(),
            backend: AtomicUsize::new(BatchBackend::detected().to_code()),
            grace: Grace::new(),
            slots: Mutex::new(Limbo::default()),
            scratch: Mutex::new(Vec::new()),
            decay_lock: Mutex::new(()),
        }
    }

    /// The backend the scans use (initially [`BatchBackend::detected`]).
    pub fn backend(&self) -> BatchBackend {
        BatchBackend::from_code(self.backend.load(Ordering::Relaxed))
    }

    /// Makes the scans use `b` from now on (e.g. `BatchBackend::Scalar` to
    /// compare, or to avoid SIMD); an error, changing nothing, if this CPU
    /// or build cannot run it.
    pub fn set_backend(&self, b: BatchBackend) -> Result<(), UnsupportedBackend> {
        if !b.is_supported() {
            return Err(UnsupportedBackend(b));
        }
        self.backend.store(b.to_code(), Ordering::Relaxed);
        Ok(())
    }

    /// Live tensors.
    pub fn live(&self) -> usize {
        self.live.load(Ordering::Relaxed)
    }

    /// Slots ever handed out (live, freed and waiting); the scans read this many.
    pub fn high_water(&self) -> usize {
        self.hw.load(Ordering::Acquire)
    }

    #[inline]
    fn chunk(&self, ci: usize) -> Option<&Chunk> {
        let p = self.dir.get(ci)?.load(Ordering::Acquire);
        // SAFETY: 1. a non-null directory entry points to a zero-initialized
        // `Chunk` allocated by `alloc_chunk` and published with Release (the
        // Acquire above pairs with it); 2. it is freed only in `Drop`, which
        // has `&mut self`, so it outlives this `&self` borrow; 3. all its
        // fields are atomics, so shared references are fine.
        unsafe { p.as_ref() }
    }

    /// The chunk and index of `key`'s slot if the key is live now.
    #[inline]
    fn live_slot(&self, key: TensorKey) -> Option<(&Chunk, usize)> {
        let (ci, i) = split(key.slot);
        let c = self.chunk(ci)?;
        (c.ids[i].load(Ordering::Acquire) == key.id.get()).then_some((c, i))
    }

    /// Calls `f(first_slot, chunk, len)` for each allocated chunk below the
    /// high-water mark.
    #[inline]
    fn for_each_chunk(&self, mut f: impl FnMut(usize, &Chunk, usize)) {
        let hw = self.high_water();
        for ci in 0..hw.div_ceil(CHUNK) {
            if let Some(c) = self.chunk(ci) {
                f(ci * CHUNK, c, (hw - ci * CHUNK).min(CHUNK));
            }
        }
    }

    /// The most slots this table hands out.
    pub fn capacity(&self) -> usize {
        self.max_slots
    }

    /// Allocates chunk `ci` if it is not yet; `false` if the allocator
    /// refused. Slot lock held.
    fn alloc_chunk(&self, ci: usize) -> bool {
        let entry = &self.dir[ci];
        if !entry.load(Ordering::Relaxed).is_null() {
            return true;
        }
        let layout = std::alloc::Layout::new::<Chunk>();
        // SAFETY: 1. `Chunk` has non-zero size.
        let p = unsafe { std::alloc::alloc_zeroed(layout) }.cast::<Chunk>();
        if p.is_null() {
            return false;
        }
        entry.store(p, Ordering::Release);
        true
    }

    /// A slot for a new tensor. Slot lock held. [`AllocError::TableFull`]
    /// when every slot is live or in limbo, [`AllocError::OutOfMemory`] if
    /// a new chunk cannot be allocated; nothing changes on error.
    fn take_slot(&self, st: &mut Limbo, device: Device) -> Result<u32, AllocError> {
        if let Some(s) = st.take(&self.grace) {
            return Ok(s);
        }
        let s = self.hw.load(Ordering::Relaxed);
        if s >= self.max_slots {
            return Err(AllocError::TableFull {
                live: self.live(),
                capacity: self.max_slots,
            });
        }
        if !self.alloc_chunk(s >> CHUNK_BITS) {
            return Err(AllocError::OutOfMemory {
                device,
                requested: core::mem::size_of::<Chunk>(),
                allocated: 0,
                reserved: 0,
                hint: Some("the metadata table could not allocate a chunk of slots"),
            });
        }
        // Release: a scan that reads the new high-water mark sees the chunk.
        self.hw.store(s + 1, Ordering::Release);
        Ok(s as u32)
    }

    /// Records a new tensor; reuses freed slots once no reader can still
    /// hold them. [`AllocError::TableFull`] (nothing changes) when the
    /// table holds [`capacity`](Self::capacity) slots already.
    pub fn insert(&self, id: TensorId, t: &NewTensor) -> Result<TensorKey, AllocError> {
        let words = TensorMeta::new(id, t).to_words();
        let align_kind = TensorInfo::cold_align_kind(t.align, t.addr_kind);
        let cat = Category::of_size(usize::try_from(t.size).unwrap_or(usize::MAX));
        let tag = batch::live_tag(t.flags.0, cat, t.device.code());
        let mut st = self.slots.lock();
        let slot = self.take_slot(&mut st, t.device)?;
        let (ci, i) = split(slot);
        let Some(c) = self.chunk(ci) else {
            unreachable!("take_slot allocates the chunk")
        };
        // The seqlock's writer side: the removal's id store (before the lock
        // we hold) is ordered before every word written below.
        fence(Ordering::Release);
        for (cell, w) in c.records[i].0.iter().zip(words) {
            cell.store(w, Ordering::Relaxed);
        }
        // The cold words (only the dimensions up to the rank are ever read).
        let cold = &c.cold[i].0;
        cold[0].store(t.addr, Ordering::Relaxed);
        cold[1].store(align_kind, Ordering::Relaxed);
        if let Some(shape) = &t.shape {
            for (cell, &d) in cold[2..].iter().zip(shape.dims()) {
                cell.store(d, Ordering::Relaxed);
            }
        }
        c.count[i].store(0, Ordering::Relaxed);
        c.last[i].store(0, Ordering::Relaxed);
        c.size[i].store(t.size, Ordering::Relaxed);
        c.tag[i].store(tag, Ordering::Release);
        // Publishes the slot: a reader that sees this id sees all of the above.
        c.ids[i].store(id.get(), Ordering::Release);
        self.live.fetch_add(1, Ordering::Relaxed);
        self.usage
            .update(cat.index(), t.device.code(), t.size, true);
        drop(st);
        Ok(TensorKey { id, slot })
    }

    /// Removes a tensor and returns its last record; `None` (and nothing
    /// changes) for a stale, freed or unknown key.
    pub fn remove(&self, key: TensorKey) -> Option<TensorMeta> {
        let (ci, i) = split(key.slot);
        let mut st = self.slots.lock();
        let c = self.chunk(ci)?;
        if c.ids[i].load(Ordering::Relaxed) != key.id.get() {
            return None;
        }
        let m = Self::read_record(c, i);
        // The lock orders us after the insert that wrote these.
        let tag = c.tag[i].load(Ordering::Relaxed);
        let size = c.size[i].load(Ordering::Relaxed);
        c.ids[i].store(0, Ordering::Relaxed);
        c.tag[i].store(0, Ordering::Release);
        st.retire(key.slot);
        self.live.fetch_sub(1, Ordering::Relaxed);
        self.usage.update(
            batch::tag_category(tag),
            batch::tag_device(tag),
            size,
            false,
        );
        Some(m)
    }

    fn read_record(c: &Chunk, i: usize) -> TensorMeta {
        let w: [u64; 8] = core::array::from_fn(|j| c.records[i].0[j].load(Ordering::Relaxed));
        TensorMeta::from_words(w).with_counters(
            c.count[i].load(Ordering::Relaxed),
            c.last[i].load(Ordering::Relaxed),
        )
    }

    /// The record and the cold words (address, alignment, whole shape) of
    /// a live tensor; `None` if the key is stale. Lock-free: the same
    /// seqlock read as [`get`](Self::get), over both.
    pub fn info(&self, key: TensorKey) -> Option<TensorInfo> {
        let (c, i) = self.live_slot(key)?;
        let m = Self::read_record(c, i);
        // Only the rank's dimensions: words past it may hold an earlier
        // tenant's (and are left 0 here).
        let mut w = [0u64; COLD_WORDS];
        let n = TensorInfo::cold_len(&m);
        for (v, cell) in w[..n].iter_mut().zip(&c.cold[i].0) {
            *v = cell.load(Ordering::Relaxed);
        }
        // As in `get`.
        fence(Ordering::Acquire);
        (c.ids[i].load(Ordering::Relaxed) == key.id.get()).then(|| TensorInfo::from_parts(m, w))
    }

    /// The record of a live tensor, with its current counters; `None` if
    /// the key is stale. Lock-free.
    pub fn get(&self, key: TensorKey) -> Option<TensorMeta> {
        let (c, i) = self.live_slot(key)?;
        let m = Self::read_record(c, i);
        // The seqlock's reader side: if any load above saw a write of a
        // later tenant, this fence makes the id load below see the change.
        fence(Ordering::Acquire);
        (c.ids[i].load(Ordering::Relaxed) == key.id.get()).then_some(m)
    }

    /// Counts one access per occurrence of each key (duplicates count every
    /// time) and raises `last_access` to `now`; stale keys are ignored.
    /// Exact when many threads touch the same tensors at once.
    pub fn touch(&self, keys: &[TensorKey], now: u64) {
        if keys.is_empty() {
            return;
        }
        let _pin = self.grace.pin();
        let hw = self.high_water();
        // Counting duplicates first pays when there are some to count: the
        // batch is long and not much sparser than the table.
        if keys.len() < AGGREGATE_FROM || keys.len().saturating_mul(SPARSE_RATIO) < hw {
            for &k in keys {
                self.touch_one(k, 1, now);
            }
            return;
        }
        let mut sc = self.scratch.lock().pop().unwrap_or_default();
        if sc.ent.len() < hw {
            sc.ent.resize(hw, Seen::default());
        }
        self.touch_counted(keys, now, &mut sc);
        self.scratch.lock().push(sc);
    }

    /// Adds `n` accesses to `k` if it is live. The caller has pinned.
    #[inline]
    fn touch_one(&self, k: TensorKey, n: u64, now: u64) {
        if let Some((c, i)) = self.live_slot(k) {
            // The slot held `k.id` just now and the caller's pin keeps it
            // from being reused, so the add lands on that tensor (or on a
            // vacant slot, if it was removed meanwhile: a touch after the
            // removal, ignored).
            c.count[i].fetch_add(n, Ordering::Relaxed);
            bump_last(&c.last[i], now);
        }
    }

    /// Touch by counting duplicates first: per key only a tally in
    /// `sc.ent`; then one check and one `fetch_add` per distinct slot.
    fn touch_counted(&self, keys: &[TensorKey], now: u64, sc: &mut TouchScratch) {
        for &k in keys {
            let Some(e) = sc.ent.get_mut(k.slot as usize) else {
                // A slot inserted after we read the high-water mark, or junk.
                sc.odd.push(k);
                continue;
            };
            // Fast path first: a repeat of the id this slot was first seen
            // with (an untouched entry holds id 0, which no key has).
            if e.id == k.id.get() {
                e.n += 1;
            } else if e.n == 0 {
                *e = Seen {
                    id: k.id.get(),
                    n: 1,
                };
                sc.distinct.push(k.slot);
            } else {
                sc.odd.push(k);
            }
        }
        if sc.distinct.len() < sc.ent.len() / DENSE_RATIO {
            for &slot in &sc.distinct {
                let e = core::mem::take(&mut sc.ent[slot as usize]);
                if let Some(id) = TensorId::from_raw(e.id) {
                    self.touch_one(TensorKey { id, slot }, e.n, now);
                }
            }
        } else {
            // Many distinct slots: walk the tally in slot order, so the
            // columns are read sequentially rather than at random.
            for (ci, ents) in sc.ent.chunks_mut(CHUNK).enumerate() {
                let c = self.chunk(ci);
                for (i, e) in ents.iter_mut().enumerate().filter(|(_, e)| e.n != 0) {
                    let e = core::mem::take(e);
                    // As in `touch_one`.
                    if let Some(c) = c
                        && c.ids[i].load(Ordering::Acquire) == e.id
                    {
                        c.count[i].fetch_add(e.n, Ordering::Relaxed);
                        bump_last(&c.last[i], now);
                    }
                }
            }
        }
        for &k in &sc.odd {
            self.touch_one(k, 1, now);
        }
        sc.distinct.clear();
        sc.odd.clear();
    }

    /// Into `out` (cleared first): the `k` least-recently-used live,
    /// unpinned tensors, oldest first (ties by slot).
    pub fn lru(&self, k: usize, out: &mut Vec<TensorKey>) {
        out.clear();
        if k == 0 {
            return;
        }
        let _pin = self.grace.pin();
        let b = self.backend();
        // Max-heap of the k best (last, slot, id) so far.
        let mut heap: BinaryHeap<(u64, u32, u64)> = BinaryHeap::with_capacity(k.min(1 << 16) + 1);
        let mut thr = u64::MAX;
        self.for_each_chunk(|base, c, n| {
            thr = batch::select_le(
                b,
                &c.tag[..n],
                &c.last[..n],
                LIVE | PINNED,
                LIVE,
                thr,
                |i, l| {
                    let id = c.ids[i].load(Ordering::Acquire);
                    let cand = (l, (base + i) as u32, id);
                    if id != 0 {
                        if heap.len() < k {
                            heap.push(cand);
                        } else if let Some(mut top) = heap.peek_mut().filter(|top| cand < **top) {
                            // One sift-down instead of a pop and a push.
                            *top = cand;
                        }
                    }
                    // Later slots only win with a strictly older last access.
                    match heap.peek() {
                        Some(top) if heap.len() == k => top.0.saturating_sub(1),
                        _ => u64::MAX,
                    }
                },
            );
        });
        out.extend(
            heap.into_sorted_vec()
                .into_iter()
                .filter_map(|(_, slot, id)| {
                    Some(TensorKey {
                        id: TensorId::from_raw(id)?,
                        slot,
                    })
                }),
        );
    }

    /// Into `out` (cleared first): every live tensor with `last_access < t`,
    /// by slot.
    pub fn touched_before(&self, t: u64, out: &mut Vec<TensorKey>) {
        out.clear();
        let Some(thr) = t.checked_sub(1) else { return };
        let _pin = self.grace.pin();
        let b = self.backend();
        self.for_each_chunk(|base, c, n| {
            batch::select_le(b, &c.tag[..n], &c.last[..n], LIVE, LIVE, thr, |i, _| {
                if let Some(id) = TensorId::from_raw(c.ids[i].load(Ordering::Acquire)) {
                    out.push(TensorKey {
                        id,
                        slot: (base + i) as u32,
                    });
                }
                thr
            });
        });
    }

    /// Live tensors and requested bytes per size category
    /// ([`Category::of_size`] of the requested size), indexed by
    /// [`Category::index`]. O(1): reads the counters insert and remove
    /// keep; the result is the state between two inserts or removes.
    #[inline]
    pub fn usage_by_category(&self) -> [CategoryUsage; Category::COUNT] {
        self.usage.by_category()
    }

    /// Live tensors and requested bytes per device, sorted by
    /// [`Device::code`]. O(1) while at most [`DEVICE_SLOTS`] devices have
    /// live tensors (it reads the counters insert and remove keep, a state
    /// between two inserts or removes); with more, the tensors that found
    /// no device entry make it fall back to [`Self::usage_by_device_scan`].
    pub fn usage_by_device(&self) -> Vec<(Device, CategoryUsage)> {
        let d = self.usage.by_device();
        if d.overflow != 0 {
            return self.usage_by_device_scan();
        }
        let mut v = d.entries[..d.len].to_vec();
        v.sort_unstable_by_key(|e| e.0);
        v.into_iter()
            .map(|(code, u)| (Device::from_code(code), u))
            .collect()
    }

    /// [`Self::usage_by_category`] computed by scanning the columns with
    /// the chosen [`BatchBackend`]: O(live slots). The reference the
    /// counters are checked against ([`Self::check_invariants`], tests)
    /// and the SIMD scans are benchmarked by. Under concurrent
    /// insert/remove it reports each tensor as it was at some moment of
    /// the scan.
    pub fn usage_by_category_scan(&self) -> [CategoryUsage; Category::COUNT] {
        let _pin = self.grace.pin();
        let b = self.backend();
        let mut acc = [CategoryUsage::default(); Category::COUNT];
        self.for_each_chunk(|_, c, n| batch::usage(b, &c.tag[..n], &c.size[..n], &mut acc));
        acc
    }

    /// [`Self::usage_by_device`] computed by scanning the columns (one
    /// scalar loop, see [`crate::meta::batch`]): O(live slots). The
    /// reference for the counters, as [`Self::usage_by_category_scan`].
    pub fn usage_by_device_scan(&self) -> Vec<(Device, CategoryUsage)> {
        let _pin = self.grace.pin();
        let mut acc = Vec::new();
        self.for_each_chunk(|_, c, n| batch::usage_by_device(&c.tag[..n], &c.size[..n], &mut acc));
        acc.into_iter()
            .map(|(code, u)| (Device::from_code(code), u))
            .collect()
    }

    /// `access_count >>= shift` for every tensor (`shift >= 64` zeroes).
    /// Touches running meanwhile are not lost (see [`crate::meta::batch`]).
    pub fn decay(&self, shift: u32) {
        if shift == 0 {
            return;
        }
        let _serial = self.decay_lock.lock();
        let _pin = self.grace.pin();
        let b = self.backend();
        self.for_each_chunk(|_, c, n| batch::decay(b, &c.count[..n], shift));
    }

    /// Checks the invariants in the module docs; panics with the first one
    /// broken. Takes the slot lock; meant for tests and debug builds.
    pub fn check_invariants(&self) {
        let st = self.slots.lock();
        let hw = self.high_water();
        let mut live = 0;
        self.for_each_chunk(|base, c, n| {
            for i in 0..n {
                let id = c.ids[i].load(Ordering::Acquire);
                let tag = c.tag[i].load(Ordering::Acquire);
                assert_eq!(
                    id != 0,
                    tag & LIVE != 0,
                    "slot {}: id {id} but tag {tag:#x}",
                    base + i
                );
                if id != 0 {
                    live += 1;
                    let rec = TensorMeta::from_words(core::array::from_fn(|j| {
                        c.records[i].0[j].load(Ordering::Relaxed)
                    }));
                    assert_eq!(rec.id().get(), id, "slot {}: record id", base + i);
                    assert_eq!(
                        rec.size(),
                        c.size[i].load(Ordering::Relaxed),
                        "slot {}: size column",
                        base + i
                    );
                    assert_eq!(
                        rec.pinned(),
                        tag & PINNED != 0,
                        "slot {}: pinned bit",
                        base + i
                    );
                }
            }
        });
        assert_eq!(live, self.live(), "live counter");
        // With the lock held nothing changes, so the scans are exact.
        assert_eq!(
            self.usage_by_category(),
            self.usage_by_category_scan(),
            "category counters == scan"
        );
        let scan = self.usage_by_device_scan();
        let d = self.usage.by_device();
        let mut overflow = 0;
        for &(dev, u) in &scan {
            match d.entries[..d.len].iter().find(|e| e.0 == dev.code()) {
                Some(e) => assert_eq!(e.1, u, "device {dev} counter == scan"),
                None => overflow += u.count,
            }
        }
        for e in &d.entries[..d.len] {
            assert!(
                scan.iter().any(|s| s.0.code() == e.0),
                "device code {} counted but has no live tensor",
                e.0
            );
        }
        assert_eq!(
            overflow, d.overflow,
            "device overflow == scan of devices without an entry"
        );
        assert_eq!(self.usage_by_device(), scan, "device counters == scan");
        let waiting = st.waiting();
        assert_eq!(hw, live + waiting, "hw == live + free + limbo");
    }
}

impl Drop for MetaTable {
    fn drop(&mut self) {
        for e in self.dir.iter() {
            let p = e.load(Ordering::Relaxed);
            if !p.is_null() {
                // SAFETY: 1. `p` came from `alloc_zeroed` with this layout in
                // `alloc_chunk` and is freed only here, once; 2. `&mut self`:
                // no reference into the chunk is alive.
                unsafe { std::alloc::dealloc(p.cast(), std::alloc::Layout::new::<Chunk>()) };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(v: u64) -> TensorId {
        TensorId::from_raw(v).unwrap()
    }

    #[test]
    fn table_is_send_sync_and_record_is_one_line() {
        fn send_sync<T: Send + Sync>() {}
        send_sync::<MetaTable>();
        assert_eq!(core::mem::size_of::<RecordCell>(), 64);
        assert_eq!(core::mem::align_of::<RecordCell>(), 64);
    }

    #[test]
    fn insert_get_remove_and_stale_keys() {
        let t = MetaTable::new();
        let a = t
            .insert(id(1), &NewTensor::bytes(100, Device::Host))
            .unwrap();
        let b = t
            .insert(id(2), &NewTensor::bytes(5000, Device::Cuda(1)))
            .unwrap();
        assert_eq!(t.live(), 2);
        assert_eq!(t.get(a).unwrap().size(), 100);
        assert_eq!(t.get(b).unwrap().device(), Device::Cuda(1));
        assert_eq!(t.remove(a).unwrap().id(), id(1));
        assert!(t.remove(a).is_none() && t.get(a).is_none());
        // The slot is reused for a new id; the old key stays stale.
        let c = t.insert(id(3), &NewTensor::bytes(7, Device::Host)).unwrap();
        assert_eq!(c.slot, a.slot);
        assert!(t.get(a).is_none() && t.remove(a).is_none());
        assert_eq!(t.get(c).unwrap().size(), 7);
        assert!(
            t.get(TensorKey {
                id: id(2),
                slot: 1_000_000
            })
            .is_none()
        );
        t.check_invariants();
    }

    #[test]
    fn touch_counts_duplicates_and_keeps_max_time() {
        let t = MetaTable::new();
        let a = t
            .insert(id(10), &NewTensor::bytes(1, Device::Host))
            .unwrap();
        t.touch(&[a; 8], 5);
        t.touch(&[a], 3);
        let m = t.get(a).unwrap();
        assert_eq!((m.access_count(), m.last_access()), (9, 5));
        let many = vec![a; AGGREGATE_FROM * 3];
        t.touch(&many, 9);
        assert_eq!(t.get(a).unwrap().access_count(), 9 + many.len() as u64);
        t.decay(1);
        assert_eq!(
            t.get(a).unwrap().access_count(),
            (9 + many.len() as u64) >> 1
        );
    }

    #[test]
    fn long_batch_with_stale_and_live_key_of_one_slot() {
        let t = MetaTable::new();
        let a = t.insert(id(1), &NewTensor::bytes(1, Device::Host)).unwrap();
        t.remove(a).unwrap();
        let b = t.insert(id(2), &NewTensor::bytes(1, Device::Host)).unwrap();
        assert_eq!(a.slot, b.slot);
        // Stale first, so the tally sees the stale id first and `b` goes the odd way.
        let batch: Vec<TensorKey> = (0..AGGREGATE_FROM * 2)
            .map(|i| if i % 2 == 0 { a } else { b })
            .collect();
        t.touch(&batch, 4);
        let m = t.get(b).unwrap();
        assert_eq!(
            (m.access_count(), m.last_access()),
            (AGGREGATE_FROM as u64, 4)
        );
        // A slot past the high-water mark is ignored.
        t.touch(
            &vec![
                TensorKey {
                    id: id(9),
                    slot: 5000
                };
                AGGREGATE_FROM
            ],
            5,
        );
        assert_eq!(t.get(b).unwrap().last_access(), 4);
    }

    #[test]
    fn device_counters_overflow_and_recover() {
        let t = MetaTable::new();
        let n = DEVICE_SLOTS as u32 + 4;
        let keys: Vec<TensorKey> = (0..n)
            .map(|d| {
                let size = 100 + u64::from(d);
                t.insert(
                    id(u64::from(d) + 1),
                    &NewTensor::bytes(size, Device::Cuda(d)),
                )
                .unwrap()
            })
            .collect();
        t.check_invariants();
        assert_eq!(t.usage.by_device().overflow, 4);
        assert_eq!(t.usage_by_device().len(), n as usize);
        // A freed entry is not claimed while tensors sit in overflow.
        t.remove(keys[0]).unwrap();
        let x = t
            .insert(id(100), &NewTensor::bytes(7, Device::Remote(9)))
            .unwrap();
        t.check_invariants();
        assert_eq!(t.usage.by_device().overflow, 5);
        for k in &keys[DEVICE_SLOTS..] {
            t.remove(*k).unwrap();
        }
        t.remove(x).unwrap();
        t.check_invariants();
        assert_eq!(t.usage.by_device().overflow, 0);
        // Now a new device claims the free entry.
        t.insert(id(101), &NewTensor::bytes(9, Device::Disk))
            .unwrap();
        t.check_invariants();
        let d = t.usage.by_device();
        assert_eq!((d.overflow, d.len), (0, DEVICE_SLOTS));
        assert!(
            t.usage_by_device()
                .contains(&(Device::Disk, CategoryUsage { count: 1, bytes: 9 }))
        );
    }

    #[test]
    fn reuse_waits_for_pinned_readers() {
        let t = MetaTable::new();
        let a = t.insert(id(1), &NewTensor::bytes(1, Device::Host)).unwrap();
        let pin = t.grace.pin();
        t.remove(a).unwrap();
        let b = t.insert(id(2), &NewTensor::bytes(1, Device::Host)).unwrap();
        assert_ne!(
            b.slot, a.slot,
            "a pinned reader may still hold slot {}",
            a.slot
        );
        drop(pin);
        t.remove(b).unwrap();
        let c = t.insert(id(3), &NewTensor::bytes(1, Device::Host)).unwrap();
        assert!(c.slot == a.slot || c.slot == b.slot);
        t.check_invariants();
    }
}
