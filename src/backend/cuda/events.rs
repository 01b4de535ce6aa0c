//! Pooled events and the per-stream queues of outstanding ones
//! (PyTorch's `EventPool` and `cuda_events`).
//!
//! A block freed after use on other streams (`record_stream`) gets one event
//! recorded on each of those streams; `block.event_count` counts them, and
//! the block goes back to its pool when the count reaches 0. Events are
//! queued per stream so one slow stream does not hold up the others; an
//! event leaves its queue when it completes (`process`) or is synchronized
//! (`synchronize_all`), and then returns to the free list for reuse.
//! Invariant: `Σ queue lengths == Σ block.event_count`.

use super::block::BlockIdx;
use super::driver::{CudaDriver, DriverError, EventId, StreamId};
use std::collections::{BTreeMap, VecDeque};

/// Free events plus the outstanding queues.
#[derive(Debug, Default)]
pub struct Events {
    free: Vec<EventId>,
    queues: BTreeMap<StreamId, VecDeque<(EventId, BlockIdx)>>,
    /// Σ queue lengths, so the hot path's "anything outstanding?" is one load.
    outstanding: usize,
}

impl Events {
    /// A pooled event, creating one if none is free.
    pub fn get<D: CudaDriver>(&mut self, d: &D) -> Result<EventId, DriverError> {
        match self.free.pop() {
            Some(e) => Ok(e),
            None => d.event_create(),
        }
    }
    /// Returns an event to the free list.
    pub fn put(&mut self, e: EventId) {
        self.free.push(e);
    }
    /// Queues a recorded event guarding block `b` on `stream`.
    pub fn push(&mut self, stream: StreamId, e: EventId, b: BlockIdx) {
        self.queues.entry(stream).or_default().push_back((e, b));
        self.outstanding += 1;
    }
    /// Outstanding events.
    pub fn outstanding(&self) -> usize {
        debug_assert_eq!(
            self.outstanding,
            self.queues.values().map(VecDeque::len).sum::<usize>()
        );
        self.outstanding
    }
    /// Pops completed events from the front of every queue, calling
    /// `done(block)` for each. Stops a queue at its first pending event;
    /// stops everything at a driver error (the failed event stays queued).
    pub fn process<D: CudaDriver>(
        &mut self,
        d: &D,
        done: impl FnMut(BlockIdx),
    ) -> Result<(), DriverError> {
        self.drain(|e| d.event_query(e), done)
    }

    /// Synchronizes every outstanding event (`synchronize_and_free_events`),
    /// calling `done(block)` for each; on a driver error the failed event and
    /// those after it stay queued.
    pub fn synchronize_all<D: CudaDriver>(
        &mut self,
        d: &D,
        done: impl FnMut(BlockIdx),
    ) -> Result<(), DriverError> {
        self.drain(|e| d.event_synchronize(e).map(|()| true), done)
    }

    /// The walk both share: `complete(e)` says whether the event at a
    /// queue's front has completed (`Ok(false)` stops that queue, an error
    /// stops everything with the event still queued); a completed event is
    /// popped, returned to the free list, and its block passed to `done`.
    fn drain(
        &mut self,
        mut complete: impl FnMut(EventId) -> Result<bool, DriverError>,
        mut done: impl FnMut(BlockIdx),
    ) -> Result<(), DriverError> {
        let mut result = Ok(());
        'queues: for q in self.queues.values_mut() {
            while let Some(&(e, b)) = q.front() {
                match complete(e) {
                    Ok(true) => {
                        q.pop_front();
                        self.outstanding -= 1;
                        self.free.push(e);
                        done(b);
                    }
                    Ok(false) => break,
                    Err(err) => {
                        result = Err(err);
                        break 'queues;
                    }
                }
            }
        }
        self.queues.retain(|_, q| !q.is_empty());
        result
    }

    /// Destroys every event, free or queued (on drop of the pool).
    pub fn destroy_all<D: CudaDriver>(&mut self, d: &D) {
        self.outstanding = 0;
        let queued = self
            .queues
            .values_mut()
            .flat_map(|q| q.drain(..).map(|(e, _)| e));
        for e in self.free.drain(..).chain(queued) {
            let _ = d.event_destroy(e);
        }
    }
}
