//! What the pool looks like from outside: [`Snapshot`] (every segment with
//! its blocks, like `torch.cuda.memory_snapshot()`) and the bounded
//! [`History`] ring of allocator events (PyTorch's trace entries).

use super::block::PoolKind;
use super::driver::{DevPtr, StreamId};
use std::collections::VecDeque;

/// A block's state in a snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockState {
    /// Handed out.
    ActiveAllocated,
    /// Freed by the caller, waiting for other streams' events.
    ActivePendingFree,
    /// Free and cached.
    Inactive,
}

/// One block of a segment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockInfo {
    /// Start address.
    pub address: DevPtr,
    /// Bytes.
    pub size: usize,
    /// Bytes the caller asked for (0 unless allocated or pending).
    pub requested_size: usize,
    /// State.
    pub state: BlockState,
}

/// One segment (driver allocation).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SegmentInfo {
    /// Start address.
    pub address: DevPtr,
    /// Bytes.
    pub total_size: usize,
    /// The stream it serves.
    pub stream: StreamId,
    /// Its pool.
    pub pool: PoolKind,
    /// Bytes of allocated blocks.
    pub allocated_size: usize,
    /// Bytes of allocated or pending-free blocks.
    pub active_size: usize,
    /// Requested bytes of active (allocated or pending-free) blocks.
    pub requested_size: usize,
    /// Blocks in address order; their sizes sum to `total_size`.
    pub blocks: Vec<BlockInfo>,
}

/// Every segment, in address order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Snapshot {
    /// The segments.
    pub segments: Vec<SegmentInfo>,
}

impl Snapshot {
    /// Σ segment sizes.
    pub fn reserved(&self) -> usize {
        self.segments.iter().map(|s| s.total_size).sum()
    }
    /// Σ allocated block sizes.
    pub fn allocated(&self) -> usize {
        self.segments.iter().map(|s| s.allocated_size).sum()
    }
    /// Σ active block sizes.
    pub fn active(&self) -> usize {
        self.segments.iter().map(|s| s.active_size).sum()
    }
    /// Σ requested sizes of active blocks.
    pub fn requested(&self) -> usize {
        self.segments.iter().map(|s| s.requested_size).sum()
    }
}

/// What happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// A block was handed out.
    Alloc,
    /// The caller freed a block (it may wait for events).
    FreeRequested,
    /// The block went back to its pool.
    FreeCompleted,
    /// A segment came from the driver.
    SegmentAlloc,
    /// A segment went back to the driver.
    SegmentFree,
    /// An allocation failed for lack of memory (`size` is the request).
    Oom,
}

/// One history entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceEntry {
    /// Sequence number (counts every entry ever made, kept or not).
    pub seq: u64,
    /// What happened.
    pub action: Action,
    /// The block or segment address (0 for an OOM).
    pub addr: DevPtr,
    /// Bytes.
    pub size: usize,
    /// The stream.
    pub stream: StreamId,
}

/// A ring of the last `capacity` entries (0 records nothing).
#[derive(Debug, Default)]
pub struct History {
    ring: VecDeque<TraceEntry>,
    capacity: usize,
    seq: u64,
}

impl History {
    /// A ring keeping `capacity` entries.
    pub fn new(capacity: usize) -> Self {
        History {
            ring: VecDeque::with_capacity(capacity.min(1 << 16)),
            capacity,
            seq: 0,
        }
    }
    /// Records an entry, dropping the oldest when full.
    pub fn push(&mut self, action: Action, addr: DevPtr, size: usize, stream: StreamId) {
        self.seq += 1;
        if self.capacity == 0 {
            return;
        }
        if self.ring.len() == self.capacity {
            self.ring.pop_front();
        }
        self.ring.push_back(TraceEntry {
            seq: self.seq,
            action,
            addr,
            size,
            stream,
        });
    }
    /// The kept entries, oldest first.
    pub fn entries(&self) -> Vec<TraceEntry> {
        self.ring.iter().copied().collect()
    }
}
