//! [`CachingPool`]: PyTorch's CUDA caching allocator policy over any
//! [`CudaDriver`], one per device.
//!
//! Each step follows `DeviceCachingAllocator` in
//! c10/cuda/CUDACachingAllocator.cpp and keeps its name:
//! `malloc` = `process_events` → `get_free_block` → (`garbage_collect_cached_blocks`)
//! → `alloc_block` → `release_available_cached_blocks` + `alloc_block` →
//! `release_cached_blocks` + `alloc_block(retry)` → OOM; then
//! `alloc_found_block` (split when `should_split`). `free` → `insert_events`
//! (blocks used on other streams) or `free_block` (merge with free
//! neighbours).
//!
//! Invariants (checked by [`CachingPool::check_invariants`]):
//! - blocks tile their segments: `Σ block sizes == segment size`, in address order;
//! - no two adjacent blocks are both free (mergeable) after an operation;
//! - a block is in its pool's free set ⇔ it is not allocated and has no pending events;
//! - `reserved_bytes.all.current == Σ segment sizes == driver outstanding`
//!   (for drivers that report it), `allocated_bytes == Σ allocated block sizes`,
//!   `active_bytes == Σ (allocated or pending) block sizes`, and the same per pool;
//! - `Σ block.event_count == outstanding events`.
//!
//! One mutex per device: a free on another device never contends.

use super::block::{
    Arena, Block, BlockIdx, FreeSet, MIN_BLOCK_SIZE, PoolKind, SMALL_SIZE, U64Map, allocation_size,
    round_size,
};
use super::config::{CudaConfig, CudaConfigError};
use super::driver::{CudaDriver, DevPtr, DriverError, StreamId};
use super::events::Events;
use super::snapshot::{Action, BlockInfo, BlockState, History, SegmentInfo, Snapshot, TraceEntry};
use super::stats::{self, CudaStats};
use crate::allocator::{Allocation, Device};
use crate::error::{AllocError, DeviceOom};
use parking_lot::Mutex;
use std::collections::BTreeMap;

/// Requests of this size or more are refused as never fitting (1 EiB).
pub const NEVER_FITS: usize = 1 << 60;

/// What the pool records about a live allocation (for verifying handles).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Live {
    pub ptr: DevPtr,
    pub size: usize,
    pub align: usize,
}

/// An allocation's tag: its block index + 1, or 0 for a zero-size one.
/// Allocated blocks never move in the arena (only free blocks are split or
/// absorbed), so the tag finds the block without a lookup; the block's
/// owner id, address, size and alignment are then compared with the handle.
pub(crate) fn tag_of(i: Option<BlockIdx>) -> u64 {
    i.map_or(0, |i| u64::from(i) + 1)
}

#[derive(Debug)]
struct State {
    cfg: CudaConfig,
    allowed_max: Option<usize>,
    blocks: Arena,
    small: FreeSet,
    large: FreeSet,
    /// Segments: base → size.
    segments: BTreeMap<DevPtr, usize>,
    /// Live zero-size allocations by tensor id (no block).
    zero: U64Map<Live>,
    events: Events,
    stats: CudaStats,
    history: History,
    /// Σ segment sizes (`total_allocated_memory`).
    reserved: usize,
    /// Live allocations including zero-size ones (PyTorch's `allocation`
    /// stat counts only blocks; the contract's count includes every handle).
    handles: crate::stats::Stat,
}

/// The caching pool of one device. See the module docs.
#[derive(Debug)]
pub struct CachingPool<D: CudaDriver> {
    driver: D,
    device: Device,
    state: Mutex<State>,
}

pub(crate) fn driver_error(e: DriverError) -> AllocError {
    match e {
        DriverError::Unavailable { reason } => AllocError::BackendUnavailable {
            backend: "cuda",
            reason,
        },
        DriverError::Unsupported { what } => AllocError::Unsupported { what },
        e => AllocError::Backend {
            backend: "cuda",
            op: e.op(),
            message: e.to_string(),
        },
    }
}

impl State {
    fn set(&mut self, k: PoolKind) -> &mut FreeSet {
        match k {
            PoolKind::Small => &mut self.small,
            PoolKind::Large => &mut self.large,
        }
    }

    fn gc_enabled(&self) -> bool {
        self.allowed_max.is_some() && self.cfg.garbage_collection_threshold > 0.0
    }

    /// `get_free_block`: best fit on the same stream, with the
    /// `max_split_size` rules. Removes the block from its free set.
    fn get_free_block(
        &mut self,
        kind: PoolKind,
        stream: StreamId,
        size: usize,
    ) -> Option<BlockIdx> {
        let gc = self.gc_enabled();
        let msp = self.cfg.max_split_size;
        let set = self.set(kind);
        if gc {
            set.searches += 1;
        }
        let (bsize, i) = set.lower_bound(stream, size)?;
        if size < msp && bsize >= msp {
            return None;
        }
        if size >= msp && bsize >= size.saturating_add(super::block::LARGE_BUFFER) {
            return None;
        }
        let b = self.blocks.get(i);
        let removed = match kind {
            PoolKind::Small => self.small.remove(b),
            PoolKind::Large => self.large.remove(b),
        };
        debug_assert!(removed);
        Some(i)
    }

    /// RMM-style reuse (`reuse_other_streams`): the best-fitting unsplit
    /// free block of another stream, under the same `max_split_size`
    /// rules, moved to `stream` after `stream` is made to wait on the GPU for
    /// the work queued so far on the block's old stream (an event recorded
    /// there now, which covers every use before the free; the event goes
    /// straight back to the pool: a wait captures the event as recorded).
    /// Only whole segments move, so a segment's blocks keep one stream. On a
    /// driver error nothing moves.
    fn reuse_other_stream<D: CudaDriver>(
        &mut self,
        d: &D,
        kind: PoolKind,
        stream: StreamId,
        size: usize,
    ) -> Result<Option<BlockIdx>, AllocError> {
        let msp = self.cfg.max_split_size;
        let set = match kind {
            PoolKind::Small => &self.small,
            PoolKind::Large => &self.large,
        };
        let mut best: Option<(usize, BlockIdx)> = None;
        for candidates in set.other_streams(stream, size) {
            for (bsize, i) in candidates {
                let too_big = (size < msp && bsize >= msp)
                    || (size >= msp && bsize >= size.saturating_add(super::block::LARGE_BUFFER))
                    || best.is_some_and(|(b, _)| b <= bsize);
                if too_big {
                    break;
                }
                if !self.blocks.get(i).is_split() {
                    best = Some((bsize, i));
                    break;
                }
            }
        }
        let Some((_, i)) = best else {
            return Ok(None);
        };
        let old = self.blocks.get(i).stream;
        let e = self.events.get(d).map_err(driver_error)?;
        let r = d
            .event_record(e, old)
            .and_then(|()| d.stream_wait_event(stream, e));
        self.events.put(e);
        r.map_err(driver_error)?;
        let b = self.blocks.get(i);
        let removed = match kind {
            PoolKind::Small => self.small.remove(b),
            PoolKind::Large => self.large.remove(b),
        };
        debug_assert!(removed);
        self.blocks.get_mut(i).stream = stream;
        Ok(Some(i))
    }

    fn should_split(&self, b: &Block, size: usize) -> bool {
        let remaining = b.size - size;
        match b.pool {
            PoolKind::Small => remaining >= MIN_BLOCK_SIZE,
            PoolKind::Large => size < self.cfg.max_split_size && remaining > SMALL_SIZE,
        }
    }

    /// `alloc_block`: a new segment from the driver. `Ok(None)` when the
    /// driver (or the limit) has no room; other driver errors are errors.
    fn alloc_block<D: CudaDriver>(
        &mut self,
        d: &D,
        kind: PoolKind,
        stream: StreamId,
        alloc_size: usize,
        retry: bool,
    ) -> Result<Option<BlockIdx>, AllocError> {
        if retry {
            self.stats.num_alloc_retries += 1;
        }
        if let Some(max) = self.allowed_max
            && self.reserved.saturating_add(alloc_size) > max
        {
            return Ok(None);
        }
        let ptr = match d.malloc(alloc_size) {
            Ok(p) => p,
            Err(DriverError::OutOfMemory { .. }) => return Ok(None),
            Err(e) => return Err(driver_error(e)),
        };
        self.reserved += alloc_size;
        self.stats.num_device_alloc += 1;
        stats::up(&mut self.stats.segment, kind, 1);
        stats::up(&mut self.stats.reserved_bytes, kind, alloc_size as u64);
        if alloc_size >= self.cfg.max_split_size {
            stats::increase(&mut self.stats.oversize_segments, 1);
        }
        let i = self.blocks.insert(Block {
            ptr,
            size: alloc_size,
            requested: 0,
            stream,
            pool: kind,
            allocated: false,
            prev: None,
            next: None,
            event_count: 0,
            stream_uses: Vec::new(),
            owner: 0,
            align: 0,
            gc_base: 0,
        });
        self.segments.insert(ptr, alloc_size);
        self.history
            .push(Action::SegmentAlloc, ptr, alloc_size, stream);
        Ok(Some(i))
    }

    /// `release_block`: returns an unsplit free block's segment to the
    /// driver. On a driver error the block stays cached.
    fn release_block<D: CudaDriver>(&mut self, d: &D, i: BlockIdx) -> Result<usize, AllocError> {
        let b = self.blocks.get(i).clone();
        debug_assert!(!b.is_split() && !b.allocated && b.event_count == 0);
        // SAFETY: 1. `b` is an unsplit block, so `b.ptr` is a segment base
        // from `malloc` on this driver, still live (it is in `segments`);
        // 2. it is free with no pending events, so no queued work uses it.
        unsafe { d.free(b.ptr) }.map_err(driver_error)?;
        self.stats.num_device_free += 1;
        self.reserved -= b.size;
        stats::down(&mut self.stats.segment, b.pool, 1);
        stats::down(&mut self.stats.reserved_bytes, b.pool, b.size as u64);
        if b.size >= self.cfg.max_split_size {
            stats::decrease(&mut self.stats.oversize_segments, 1);
        }
        self.set(b.pool).remove(&b);
        self.segments.remove(&b.ptr);
        self.blocks.remove(i);
        self.history
            .push(Action::SegmentFree, b.ptr, b.size, b.stream);
        Ok(b.size)
    }

    /// `release_available_cached_blocks`: frees one cached block big enough
    /// for the request, else oversize blocks largest first until enough is
    /// freed. Only with a `max_split_size`.
    fn release_available_cached_blocks<D: CudaDriver>(
        &mut self,
        d: &D,
        kind: PoolKind,
        stream: StreamId,
        size: usize,
    ) -> Result<bool, AllocError> {
        let msp = self.cfg.max_split_size;
        if msp == usize::MAX {
            return Ok(false);
        }
        let key = size.max(msp);
        if let Some((_, i)) = self.set(kind).lower_bound(stream, key)
            && !self.blocks.get(i).is_split()
        {
            self.release_block(d, i)?;
            return Ok(true);
        }
        let mut released = 0usize;
        for (_, i) in self.set(kind).largest_first(stream, msp) {
            if released >= key {
                break;
            }
            if !self.blocks.get(i).is_split() {
                released += self.release_block(d, i)?;
            }
        }
        Ok(released >= key)
    }

    /// `release_cached_blocks`: synchronize every outstanding event, then
    /// free every unsplit cached block. The bytes freed.
    fn release_cached_blocks<D: CudaDriver>(&mut self, d: &D) -> Result<usize, AllocError> {
        self.synchronize_and_free_events(d)?;
        let mut freed = 0;
        for kind in [PoolKind::Large, PoolKind::Small] {
            let idx: Vec<BlockIdx> = self.set(kind).all().collect();
            for i in idx {
                if !self.blocks.get(i).is_split() {
                    freed += self.release_block(d, i)?;
                }
            }
        }
        Ok(freed)
    }

    fn synchronize_and_free_events<D: CudaDriver>(&mut self, d: &D) -> Result<(), AllocError> {
        self.stats.num_sync_all_streams += 1;
        let mut done = Vec::new();
        let r = self.events.synchronize_all(d, |b| done.push(b));
        self.events_done(done);
        r.map_err(driver_error)
    }

    /// `process_events`: completed events release their blocks.
    fn process_events<D: CudaDriver>(&mut self, d: &D) -> Result<(), AllocError> {
        if self.events.outstanding() == 0 {
            return Ok(());
        }
        let mut done = Vec::new();
        let r = self.events.process(d, |b| done.push(b));
        self.events_done(done);
        r.map_err(driver_error)
    }

    fn events_done(&mut self, done: Vec<BlockIdx>) {
        for i in done {
            let b = self.blocks.get_mut(i);
            b.event_count -= 1;
            if b.event_count == 0 {
                self.free_block(i);
            }
        }
    }

    /// `garbage_collect_cached_blocks`: with reserved memory above the
    /// threshold, frees unsplit large cached blocks of above-average age.
    fn garbage_collect<D: CudaDriver>(&mut self, d: &D) -> Result<(), AllocError> {
        let Some(max) = self.allowed_max else {
            return Ok(());
        };
        let threshold = (self.cfg.garbage_collection_threshold * max as f64) as usize;
        if self.reserved <= threshold {
            return Ok(());
        }
        let target = self.reserved - threshold;
        let now = self.large.searches;
        let age = |b: &Block| now - b.gc_base.min(now);
        let mut total_age = 0u64;
        let mut count = 0u64;
        for i in self.large.all() {
            let b = self.blocks.get(i);
            if !b.is_split() {
                total_age += age(b);
                count += 1;
            }
        }
        let mut reclaimed = 0usize;
        let mut freed_one = true;
        while reclaimed < target && freed_one && count > 0 {
            let threshold_age = total_age as f64 / count as f64;
            freed_one = false;
            let idx: Vec<BlockIdx> = self.large.all().collect();
            for i in idx {
                let b = self.blocks.get(i);
                let a = age(b);
                if !b.is_split() && a as f64 >= threshold_age {
                    freed_one = true;
                    total_age -= a;
                    count -= 1;
                    reclaimed += self.release_block(d, i)?;
                }
            }
        }
        Ok(())
    }

    /// `alloc_found_block`: splits off the remainder if asked, marks the
    /// block allocated and counts it.
    fn alloc_found_block(
        &mut self,
        i: BlockIdx,
        size: usize,
        requested: usize,
        split: bool,
    ) -> BlockIdx {
        let already_split = self.blocks.get(i).is_split();
        let kind = self.blocks.get(i).pool;
        let mut out = i;
        if split {
            let rem = self.blocks.get(i);
            let (ptr, prev, stream) = (rem.ptr, rem.prev, rem.stream);
            let front = Block {
                ptr,
                size,
                requested: 0,
                stream,
                pool: kind,
                allocated: false,
                prev,
                next: Some(i),
                event_count: 0,
                stream_uses: Vec::new(),
                owner: 0,
                align: 0,
                gc_base: 0,
            };
            let f = self.blocks.insert(front);
            if let Some(p) = prev {
                self.blocks.get_mut(p).next = Some(f);
            }
            let r = self.blocks.get_mut(i);
            r.prev = Some(f);
            r.ptr += size as u64;
            r.size -= size;
            let rest = r.size;
            match kind {
                PoolKind::Small => self.small.insert(self.blocks.get(i), i),
                PoolKind::Large => self.large.insert(self.blocks.get(i), i),
            }
            if already_split {
                stats::down(&mut self.stats.inactive_split_bytes, kind, size as u64);
            } else {
                stats::up(&mut self.stats.inactive_split_bytes, kind, rest as u64);
                stats::up(&mut self.stats.inactive_split, kind, 1);
            }
            out = f;
        } else if already_split {
            let bs = self.blocks.get(i).size as u64;
            stats::down(&mut self.stats.inactive_split_bytes, kind, bs);
            stats::down(&mut self.stats.inactive_split, kind, 1);
        }
        let searches = self.set(kind).searches;
        let b = self.blocks.get_mut(out);
        b.allocated = true;
        b.requested = requested;
        b.gc_base = searches;
        let (bsize, ptr, stream) = (b.size as u64, b.ptr, b.stream);
        let st = &mut self.stats;
        stats::up(&mut st.allocation, kind, 1);
        stats::up(&mut st.allocated_bytes, kind, bsize);
        stats::up(&mut st.active, kind, 1);
        stats::up(&mut st.active_bytes, kind, bsize);
        stats::up(&mut st.requested_bytes, kind, requested as u64);
        if bsize as usize >= self.cfg.max_split_size {
            stats::increase(&mut st.oversize_allocations, 1);
        }
        self.history
            .push(Action::Alloc, ptr, bsize as usize, stream);
        out
    }

    /// Whether block `j` can merge into a neighbour being freed.
    fn mergeable(&self, j: Option<BlockIdx>) -> Option<BlockIdx> {
        let j = j?;
        let b = self.blocks.get(j);
        (!b.allocated && b.event_count == 0 && b.stream_uses.is_empty()).then_some(j)
    }

    /// `free_block`: merges with free neighbours and returns the block to
    /// its pool.
    fn free_block(&mut self, i: BlockIdx) {
        let (orig_size, requested, kind, ptr, stream) = {
            let b = self.blocks.get(i);
            debug_assert!(!b.allocated && b.event_count == 0 && b.stream_uses.is_empty());
            (b.size as u64, b.requested as u64, b.pool, b.ptr, b.stream)
        };
        self.history
            .push(Action::FreeCompleted, ptr, orig_size as usize, stream);
        let mut net_blocks: i64 = 0;
        let mut net_bytes: i64 = 0;
        // [prev, i]: i absorbs prev and takes its address.
        if let Some(p) = self.mergeable(self.blocks.get(i).prev) {
            let pb = self.blocks.remove(p);
            self.set(kind).remove(&pb);
            let b = self.blocks.get_mut(i);
            b.ptr = pb.ptr;
            b.size += pb.size;
            b.prev = pb.prev;
            if let Some(pp) = pb.prev {
                self.blocks.get_mut(pp).next = Some(i);
            }
            net_blocks -= 1;
            net_bytes -= pb.size as i64;
        }
        // [i, next]: i absorbs next.
        if let Some(n) = self.mergeable(self.blocks.get(i).next) {
            let nb = self.blocks.remove(n);
            self.set(kind).remove(&nb);
            let b = self.blocks.get_mut(i);
            b.size += nb.size;
            b.next = nb.next;
            if let Some(nn) = nb.next {
                self.blocks.get_mut(nn).prev = Some(i);
            }
            net_blocks -= 1;
            net_bytes -= nb.size as i64;
        }
        let b = self.blocks.get_mut(i);
        b.requested = 0;
        b.owner = 0;
        let b = self.blocks.get(i);
        if b.is_split() {
            net_blocks += 1;
            net_bytes += b.size as i64;
        }
        match kind {
            PoolKind::Small => self.small.insert(b, i),
            PoolKind::Large => self.large.insert(b, i),
        }
        let st = &mut self.stats;
        apply(&mut st.inactive_split, kind, net_blocks);
        apply(&mut st.inactive_split_bytes, kind, net_bytes);
        stats::down(&mut st.active, kind, 1);
        stats::down(&mut st.active_bytes, kind, orig_size);
        stats::down(&mut st.requested_bytes, kind, requested);
    }
}

fn apply(a: &mut stats::StatArray, kind: PoolKind, n: i64) {
    if n > 0 {
        stats::up(a, kind, n as u64);
    } else if n < 0 {
        stats::down(a, kind, n.unsigned_abs());
    }
}

impl<D: CudaDriver> CachingPool<D> {
    /// A pool over `driver` with `cfg` (validated).
    pub fn new(driver: D, cfg: CudaConfig) -> Result<Self, CudaConfigError> {
        cfg.validate()?;
        let device = Device::Cuda(driver.info().ordinal);
        let allowed_max = cfg.allowed_maximum(driver.info().total_memory);
        Ok(CachingPool {
            device,
            state: Mutex::new(State {
                allowed_max,
                history: History::new(cfg.history_capacity),
                cfg,
                blocks: Arena::default(),
                small: FreeSet::default(),
                large: FreeSet::default(),
                segments: BTreeMap::new(),
                zero: U64Map::default(),
                events: Events::default(),
                stats: CudaStats::default(),
                reserved: 0,
                handles: crate::stats::Stat::default(),
            }),
            driver,
        })
    }

    /// The driver.
    pub fn driver(&self) -> &D {
        &self.driver
    }
    /// The device.
    pub fn device(&self) -> Device {
        self.device
    }

    /// Allocates `size` bytes for tensor `id` on `stream` (PyTorch's
    /// `malloc`). Size 0 records the id and takes no memory (address 0).
    pub(crate) fn malloc(
        &self,
        size: usize,
        stream: StreamId,
        id: u64,
        align: usize,
    ) -> Result<(DevPtr, u64), AllocError> {
        if size == 0 {
            let mut st = self.state.lock();
            st.zero.insert(
                id,
                Live {
                    ptr: 0,
                    size,
                    align,
                },
            );
            stats::increase(&mut st.handles, 1);
            return Ok((0, 0));
        }
        let mut st = self.state.lock();
        let div = st.cfg.roundup_power2_divisions;
        let (rounded, alloc_size) = match round_size(size, div)
            .filter(|_| size < NEVER_FITS)
            .and_then(|r| Some((r, allocation_size(r)?)))
        {
            Some(x) => x,
            None => return Err(self.oom(&mut st, size, size, size, true)),
        };
        // Over the capacity or the limit: refused before the cache is
        // emptied for a request that cannot succeed.
        let total = self.driver.info().total_memory;
        if alloc_size > st.allowed_max.unwrap_or(total).min(total) {
            return Err(self.oom(&mut st, size, rounded, alloc_size, true));
        }
        st.process_events(&self.driver)?;
        let kind = PoolKind::for_size(rounded);
        let d = &self.driver;
        let mut found = st.get_free_block(kind, stream, rounded);
        if found.is_none() && st.cfg.reuse_other_streams {
            found = st.reuse_other_stream(d, kind, stream, rounded)?;
        }
        if found.is_none() {
            if st.gc_enabled() {
                st.garbage_collect(d)?;
            }
            found = st.alloc_block(d, kind, stream, alloc_size, false)?;
            if found.is_none() && st.release_available_cached_blocks(d, kind, stream, rounded)? {
                found = st.alloc_block(d, kind, stream, alloc_size, false)?;
            }
            if found.is_none() {
                st.release_cached_blocks(d)?;
                found = st.alloc_block(d, kind, stream, alloc_size, true)?;
            }
        }
        let Some(i) = found else {
            return Err(self.oom(&mut st, size, rounded, alloc_size, false));
        };
        let split = st.should_split(st.blocks.get(i), rounded);
        let b = st.alloc_found_block(i, rounded, size, split);
        let blk = st.blocks.get_mut(b);
        blk.owner = id;
        blk.align = align;
        let ptr = blk.ptr;
        stats::increase(&mut st.handles, 1);
        Ok((ptr, tag_of(Some(b))))
    }

    /// Counts an OOM and builds its error.
    fn oom(
        &self,
        st: &mut State,
        size: usize,
        rounded: usize,
        segment: usize,
        never: bool,
    ) -> AllocError {
        st.stats.num_ooms += 1;
        st.history.push(Action::Oom, 0, size, 0);
        let info = self.driver.info();
        let (free, total) = self.driver.mem_get_info().unwrap_or((0, info.total_memory));
        AllocError::DeviceOutOfMemory(Box::new(DeviceOom {
            device: self.device,
            requested: size,
            rounded,
            segment,
            total,
            free,
            allocated: st.stats.allocated_bytes[0].current as usize,
            reserved: st.reserved,
            limit: st.allowed_max,
            never_fits: never,
        }))
    }

    /// Checks `a` against the record: live here, same address, size and
    /// alignment. Changes nothing.
    pub(crate) fn verify(&self, a: &Allocation) -> Result<Live, AllocError> {
        let st = self.state.lock();
        verify(&st, self.device, a).map(|(l, _)| l)
    }

    /// Frees `a` (PyTorch's `free`): blocks used on other streams wait for
    /// events recorded now; the others go back to their pool at once. On
    /// error nothing changes.
    pub(crate) fn free(&self, a: &Allocation) -> Result<(), AllocError> {
        let mut st = self.state.lock();
        let Some(i) = verify(&st, self.device, a)?.1 else {
            st.zero.remove(&a.id().get());
            stats::decrease(&mut st.handles, 1);
            return Ok(());
        };
        let uses = st.blocks.get(i).stream_uses.clone();
        // insert_events: record every event first, so a driver error leaves
        // the block allocated and the pool as it was.
        let mut recorded = Vec::with_capacity(uses.len());
        for &s in &uses {
            let r = st.events.get(&self.driver).and_then(|e| {
                self.driver
                    .event_record(e, s)
                    .map(|()| e)
                    .inspect_err(|_| st.events.put(e))
            });
            match r {
                Ok(e) => recorded.push((s, e)),
                Err(err) => {
                    for (_, e) in recorded {
                        st.events.put(e);
                    }
                    return Err(driver_error(err));
                }
            }
        }
        stats::decrease(&mut st.handles, 1);
        let b = st.blocks.get_mut(i);
        b.allocated = false;
        b.stream_uses.clear();
        b.event_count = recorded.len() as u32;
        let (kind, size, ptr, stream) = (b.pool, b.size, b.ptr, b.stream);
        stats::down(&mut st.stats.allocation, kind, 1);
        stats::down(&mut st.stats.allocated_bytes, kind, size as u64);
        if size >= st.cfg.max_split_size {
            stats::decrease(&mut st.stats.oversize_allocations, 1);
        }
        st.history.push(Action::FreeRequested, ptr, size, stream);
        if recorded.is_empty() {
            st.free_block(i);
        } else {
            for (s, e) in recorded {
                st.events.push(s, e, i);
            }
        }
        Ok(())
    }

    /// `recordStream`: the block of `a` is used on `stream` too; its reuse
    /// waits for that stream's work queued before the free.
    pub(crate) fn record_stream(&self, a: &Allocation, stream: StreamId) -> Result<(), AllocError> {
        let mut st = self.state.lock();
        let Some(i) = verify(&st, self.device, a)?.1 else {
            return Ok(());
        };
        let b = st.blocks.get_mut(i);
        if b.stream != stream && !b.stream_uses.contains(&stream) {
            b.stream_uses.push(stream);
        }
        Ok(())
    }

    /// `emptyCache`: waits for outstanding events and returns every unsplit
    /// cached block to the driver. The bytes returned.
    pub fn empty_cache(&self) -> Result<usize, AllocError> {
        let mut st = self.state.lock();
        st.release_cached_blocks(&self.driver)
    }

    /// Sets the memory fraction (`set_per_process_memory_fraction`).
    pub fn set_memory_fraction(&self, f: f64) -> Result<(), CudaConfigError> {
        let mut st = self.state.lock();
        let mut cfg = st.cfg.clone();
        cfg.memory_fraction = Some(f);
        cfg.validate()?;
        st.allowed_max = cfg.allowed_maximum(self.driver.info().total_memory);
        st.cfg = cfg;
        Ok(())
    }

    /// A copy of the statistics.
    pub fn stats(&self) -> CudaStats {
        self.state.lock().stats.clone()
    }
    /// The statistics plus the count of live handles (zero-size included).
    pub(crate) fn stats_and_handles(&self) -> (CudaStats, crate::stats::Stat) {
        let st = self.state.lock();
        (st.stats.clone(), st.handles)
    }
    /// Sets every peak to its current value.
    pub fn reset_peak_stats(&self) {
        self.state.lock().stats.reset_peaks();
    }
    /// The history ring, oldest first.
    pub fn history(&self) -> Vec<TraceEntry> {
        self.state.lock().history.entries()
    }

    /// Every segment with its blocks (`torch.cuda.memory_snapshot()`).
    pub fn snapshot(&self) -> Snapshot {
        let st = self.state.lock();
        snapshot(&st)
    }

    /// Checks every invariant of the module docs; panics with the broken
    /// one (tests and debug tooling only).
    pub fn check_invariants(&self) {
        let st = self.state.lock();
        check(&st);
    }
}

impl<D: CudaDriver> Drop for CachingPool<D> {
    /// Waits for the device, then returns every segment and event to the
    /// driver (best effort: errors are ignored, nothing panics). Handles
    /// still held by callers become dangling, as their backend is gone.
    fn drop(&mut self) {
        let st = self.state.get_mut();
        let _ = self.driver.device_synchronize();
        st.events.destroy_all(&self.driver);
        for &base in st.segments.keys() {
            // SAFETY: `base` is a live segment from `malloc` on this driver;
            // the device is idle and the pool is going away.
            let _ = unsafe { self.driver.free(base) };
        }
        st.segments.clear();
    }
}

fn verify(
    st: &State,
    device: Device,
    a: &Allocation,
) -> Result<(Live, Option<BlockIdx>), AllocError> {
    let id = a.id().get();
    if a.device() != device {
        return Err(AllocError::WrongDevice {
            id,
            expected: device,
            found: a.device(),
        });
    }
    // Built only on failure: this runs on every free.
    let unknown = || AllocError::UnknownId { id, device };
    let (live, idx) = match a.tag() {
        0 => (*st.zero.get(&id).ok_or_else(unknown)?, None),
        t => {
            let i = BlockIdx::try_from(t - 1).map_err(|_| unknown())?;
            let b = st.blocks.try_get(i).ok_or_else(unknown)?;
            if !b.allocated || b.owner != id {
                return Err(unknown());
            }
            let live = Live {
                ptr: b.ptr,
                size: b.requested,
                align: b.align,
            };
            (live, Some(i))
        }
    };
    let given = match a.addr() {
        crate::allocator::Addr::Device(p) => p,
        crate::allocator::Addr::None => 0,
        crate::allocator::Addr::Host(p) => p.as_ptr() as u64,
        crate::allocator::Addr::Remote(r) => r,
    };
    let mismatch = |field, given: u64, recorded: u64| AllocError::Mismatch {
        id,
        field,
        given,
        recorded,
    };
    if given != live.ptr {
        return Err(mismatch("address", given, live.ptr));
    }
    if a.size() != live.size {
        return Err(mismatch("size", a.size() as u64, live.size as u64));
    }
    if a.align() != live.align {
        return Err(mismatch("align", a.align() as u64, live.align as u64));
    }
    Ok((live, idx))
}

/// Segment base → its first block (slow path: snapshots and checks).
fn heads(st: &State) -> U64Map<BlockIdx> {
    st.blocks
        .iter()
        .filter(|(_, b)| b.prev.is_none())
        .map(|(i, b)| (b.ptr, i))
        .collect()
}

fn snapshot(st: &State) -> Snapshot {
    let heads = heads(st);
    let mut segments = Vec::with_capacity(st.segments.len());
    for (&base, &total) in &st.segments {
        let mut i = Some(heads[&base]);
        let first = st.blocks.get(i.unwrap_or_default());
        let mut seg = SegmentInfo {
            address: base,
            total_size: total,
            stream: first.stream,
            pool: first.pool,
            allocated_size: 0,
            active_size: 0,
            requested_size: 0,
            blocks: Vec::new(),
        };
        while let Some(j) = i {
            let b = st.blocks.get(j);
            let state = if b.allocated {
                BlockState::ActiveAllocated
            } else if b.event_count > 0 {
                BlockState::ActivePendingFree
            } else {
                BlockState::Inactive
            };
            if b.allocated {
                seg.allocated_size += b.size;
            }
            if state != BlockState::Inactive {
                seg.active_size += b.size;
                seg.requested_size += b.requested;
            }
            seg.blocks.push(BlockInfo {
                address: b.ptr,
                size: b.size,
                requested_size: b.requested,
                state,
            });
            i = b.next;
        }
        segments.push(seg);
    }
    Snapshot { segments }
}

fn check(st: &State) {
    let snap = snapshot(st);
    let by_ptr: U64Map<BlockIdx> = st.blocks.iter().map(|(i, b)| (b.ptr, i)).collect();
    // reserved, allocated, active, requested, inactive split count, bytes
    // active count, allocation count
    let mut per_pool = [[0u64; 8]; 3];
    let mut blocks_seen = 0;
    for seg in &snap.segments {
        let mut at = seg.address;
        let mut prev_free = false;
        for b in &seg.blocks {
            assert_eq!(
                b.address, at,
                "blocks do not tile segment {:#x}",
                seg.address
            );
            at += b.size as u64;
            let free = b.state == BlockState::Inactive;
            assert!(
                !(free && prev_free),
                "adjacent free blocks unmerged at {:#x}",
                b.address
            );
            prev_free = free;
            blocks_seen += 1;
            let i = by_ptr[&b.address];
            let blk = st.blocks.get(i);
            assert_eq!(
                (blk.stream, blk.pool),
                (seg.stream, seg.pool),
                "block stream/pool"
            );
            let key_present = match blk.pool {
                PoolKind::Small => st.small.contains(blk, i),
                PoolKind::Large => st.large.contains(blk, i),
            };
            assert_eq!(key_present, free, "free-set membership of {:#x}", b.address);
        }
        assert_eq!(
            at,
            seg.address + seg.total_size as u64,
            "segment {:#x} not tiled",
            seg.address
        );
        let split_free: Vec<u64> = if seg.blocks.len() > 1 {
            seg.blocks
                .iter()
                .filter(|b| b.state == BlockState::Inactive)
                .map(|b| b.size as u64)
                .collect()
        } else {
            Vec::new()
        };
        for k in [0, seg.pool.stat_index()] {
            per_pool[k][0] += seg.total_size as u64;
            per_pool[k][1] += seg.allocated_size as u64;
            per_pool[k][2] += seg.active_size as u64;
            per_pool[k][3] += seg.requested_size as u64;
            per_pool[k][4] += split_free.len() as u64;
            per_pool[k][5] += split_free.iter().sum::<u64>();
            for b in &seg.blocks {
                per_pool[k][6] += u64::from(b.state != BlockState::Inactive);
                per_pool[k][7] += u64::from(b.state == BlockState::ActiveAllocated);
            }
        }
    }
    assert_eq!(blocks_seen, by_ptr.len(), "stray blocks");
    assert_eq!(
        st.small.len() + st.large.len(),
        snap.segments
            .iter()
            .flat_map(|s| &s.blocks)
            .filter(|b| b.state == BlockState::Inactive)
            .count()
    );
    let s = &st.stats;
    for (k, pp) in per_pool.iter().enumerate() {
        assert_eq!(s.reserved_bytes[k].current, pp[0], "reserved_bytes[{k}]");
        assert_eq!(s.allocated_bytes[k].current, pp[1], "allocated_bytes[{k}]");
        assert_eq!(s.active_bytes[k].current, pp[2], "active_bytes[{k}]");
        assert_eq!(s.requested_bytes[k].current, pp[3], "requested_bytes[{k}]");
        assert_eq!(s.inactive_split[k].current, pp[4], "inactive_split[{k}]");
        assert_eq!(s.active[k].current, pp[6], "active[{k}]");
        assert_eq!(s.allocation[k].current, pp[7], "allocation[{k}]");
        assert_eq!(
            s.inactive_split_bytes[k].current, pp[5],
            "inactive_split_bytes[{k}]"
        );
    }
    assert_eq!(st.reserved as u64, s.reserved_bytes[0].current);
    assert_eq!(s.segment[0].current as usize, snap.segments.len());
    let pending: u32 = st.blocks.iter().map(|(_, b)| b.event_count).sum();
    assert_eq!(pending as usize, st.events.outstanding(), "event counts");
    let live_blocks = st.blocks.iter().filter(|(_, b)| b.allocated).count();
    assert_eq!(
        s.allocation[0].current as usize, live_blocks,
        "allocation count"
    );
    assert_eq!(
        st.handles.current as usize,
        live_blocks + st.zero.len(),
        "handle count"
    );
}
