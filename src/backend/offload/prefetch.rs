//! Prefetch: one background I/O thread that loads tensors before they are
//! asked for.
//!
//! Work comes from two places: explicit hints ([`super::OffloadBackend::prefetch`])
//! and a registered access order ([`super::OffloadBackend::set_order`]):
//! an access to the `i`-th tensor of the order queues tensors `i+1 … i+depth`.
//!
//! Prefetch never takes what a caller needs: a hint loads only into free
//! budget; an order-driven prefetch may evict only tensors last used
//! *before* the access that triggered it, never a pinned, loading or more
//! recently used one (the tensors it loads itself are touched when
//! loaded, so one window does not evict its own members). A prefetch that
//! cannot make room is dropped and counted. The first access to a
//! prefetched tensor counts a prefetch hit; an access that has to load
//! counts a miss.

use super::residency::{Res, Shared, State, Who, bump};
use crate::allocator::TensorAllocator;
use parking_lot::MutexGuard;
use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Instant;

/// The prefetcher's part of the backend state (under the backend's lock).
#[derive(Debug, Default)]
pub(super) struct PrefetchState {
    /// (tensor id, evict-before time) to load, oldest first.
    pub queue: VecDeque<(u64, u64)>,
    /// The thread is loading one now.
    pub busy: bool,
    pub shutdown: bool,
    /// The registered access order and each id's position in it.
    pub order: Vec<u64>,
    pub pos: HashMap<u64, usize>,
}

impl PrefetchState {
    fn push(&mut self, id: u64, before: u64) {
        if !self.queue.iter().any(|&(q, _)| q == id) {
            self.queue.push_back((id, before));
        }
    }
}

impl<B: TensorAllocator> Shared<B> {
    /// Queues the tensors after `id` in the registered order. Lock held.
    pub(super) fn follow_order(&self, st: &mut State, id: u64, now: u64) {
        let depth = self.cfg.prefetch_depth;
        let Some(&i) = st.pf.pos.get(&id) else { return };
        let end = (i + 1 + depth).min(st.pf.order.len());
        let mut queued = false;
        for j in i + 1..end {
            let next = st.pf.order[j];
            if st.entries.get(&next).is_some_and(|e| e.res == Res::Absent) {
                st.pf.push(next, now);
                queued = true;
            }
        }
        if queued {
            self.work.notify_one();
        }
    }

    /// Queues explicit hints (free budget only). Lock held.
    pub(super) fn hint(&self, st: &mut State, ids: &[u64]) {
        for &id in ids {
            st.pf.push(id, 0);
        }
        self.work.notify_one();
    }

    /// Loads one queued tensor if it is still absent and room can be made.
    fn prefetch_one(&self, g: &mut MutexGuard<'_, State>, id: u64, before: u64) {
        let Some(e) = g.entries.get(&id) else { return };
        if e.res != Res::Absent {
            return;
        }
        let charge = e.charge;
        let deadline = Instant::now() + self.cfg.wait_timeout;
        if self
            .make_room(g, charge, Who::Prefetch { before }, deadline)
            .is_err()
        {
            bump(&self.n.prefetch_dropped, 1);
            return;
        }
        if g.entries.get(&id).map(|e| e.res) != Some(Res::Absent) {
            // Loaded by a caller while make_room spilled.
            self.unreserve(g, charge);
            self.changed.notify_all();
            return;
        }
        if self.load(g, id, true).is_err() {
            // The caller that needs it will load it and see the error.
            bump(&self.n.prefetch_dropped, 1);
        }
    }

    /// Waits until the queue is empty and nothing is being prefetched.
    pub(super) fn wait_idle(&self, deadline: Instant) -> Result<(), crate::AllocError> {
        let mut g = self.st.lock();
        while !g.pf.queue.is_empty() || g.pf.busy {
            self.wait(&mut g, deadline, "offload: the prefetch queue to drain")?;
        }
        Ok(())
    }
}

/// The I/O thread's body: runs until `shutdown`.
pub(super) fn run<B: TensorAllocator>(sh: Arc<Shared<B>>) {
    let mut g = sh.st.lock();
    loop {
        if g.pf.shutdown {
            return;
        }
        match g.pf.queue.pop_front() {
            Some((id, before)) => {
                g.pf.busy = true;
                sh.prefetch_one(&mut g, id, before);
                g.pf.busy = false;
                sh.changed.notify_all();
            }
            None => sh.work.wait(&mut g),
        }
    }
}
