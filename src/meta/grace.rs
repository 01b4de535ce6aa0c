//! Epoch-based grace periods for the metadata table's slot reuse
//! ([`Grace`], [`Limbo`]), apart from the table so that loom can check
//! them (`tests/loom.rs`, `ci/loom.sh`).
//!
//! A reader that checked a slot's id and then writes to the slot (touch)
//! or reads it (scans) *pins* the current epoch for the duration. The table
//! retires a removed slot into [`Limbo`] and hands it out again only after
//! the epoch has advanced twice, and [`Grace::try_advance`] moves the epoch
//! from `e` to `e + 1` only when nobody is pinned in `e - 1`. So a slot
//! retired in epoch `r` is reused only once the epoch is `r + 2`, which
//! needed nobody pinned in `r` (and, before, in `r - 1`): every pin that
//! could have seen the old tenant has been dropped, and its writes happen
//! before the reuse (the unpin is a release, the advancer's check an
//! acquire).
//!
//! Invariant: `active[s][p]` is the number of live pins of shard `s` taken
//! in an epoch of parity `p`; the epoch only grows, and only under the
//! table's slot lock (one advancer at a time).
//!
//! Ordering: pinning is a store-load pattern (count the pin, then re-read
//! the epoch) against the advancer's (store the epoch, later read the
//! counts). Every access is `SeqCst`, which orders them in the memory
//! model: if the pinner re-read the old epoch, its increment precedes the
//! advancer's epoch store in the single `SeqCst` order, and so the
//! advancer's later read of the counts sees it. Loom models `SeqCst`
//! accesses as acquire/release only, so the two points where this matters
//! carry `sync::seqcst_fence_for_loom` (a real `SeqCst` fence under loom, a
//! compiler fence elsewhere); the unpin must be a release (it is `SeqCst`).
//! `tests/loom.rs` checks the protocol, and fails with the unpin
//! `Relaxed` or with either fence removed.

use crate::sync::{AtomicU64, AtomicUsize, CachePadded, Ordering, seqcst_fence_for_loom};

/// Epoch counter shards (threads pin one each, by stack address).
pub const SHARDS: usize = 8;

/// The epoch and the pin counts (see the module docs).
#[derive(Debug)]
pub struct Grace {
    epoch: AtomicU64,
    /// `active[shard][epoch & 1]`: threads pinned in that epoch parity.
    active: [CachePadded<[AtomicUsize; 2]>; SHARDS],
}

/// A pinned epoch; unpins on drop.
#[derive(Debug)]
pub struct Pin<'a> {
    cell: &'a AtomicUsize,
}

impl Drop for Pin<'_> {
    #[inline]
    fn drop(&mut self) {
        // Release: the pinned reader's accesses to the slots it checked
        // happen before an advancer that sees the count drop.
        self.cell.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Default for Grace {
    fn default() -> Self {
        Self::new()
    }
}

impl Grace {
    /// Epoch 0, nobody pinned.
    pub fn new() -> Self {
        Grace {
            epoch: AtomicU64::new(0),
            active: core::array::from_fn(|_| {
                CachePadded::new([AtomicUsize::new(0), AtomicUsize::new(0)])
            }),
        }
    }

    /// Pins the current epoch: until the guard drops, no slot retired while
    /// (or after) it is held is handed out again.
    #[inline]
    pub fn pin(&self) -> Pin<'_> {
        // Threads' stacks are megabytes apart, so the stack address picks a
        // shard that is stable for the thread and rarely shared.
        let probe = 0u8;
        let shard = ((core::ptr::addr_of!(probe).addr() >> 20).wrapping_mul(0x9E37_79B9_7F4A_7C15)
            >> 61)
            % SHARDS;
        loop {
            let e = self.epoch.load(Ordering::SeqCst);
            let cell = &self.active[shard][(e & 1) as usize];
            cell.fetch_add(1, Ordering::SeqCst);
            // The count is visible before the epoch is read again (store-load).
            seqcst_fence_for_loom();
            // Re-check: if the epoch moved between the load and the
            // increment, the advancer may have missed us; retry.
            if self.epoch.load(Ordering::SeqCst) == e {
                return Pin { cell };
            }
            cell.fetch_sub(1, Ordering::SeqCst);
        }
    }

    /// Advances the epoch if nobody is pinned in the previous one. Called
    /// only with the table's slot lock held (one advancer at a time).
    pub fn try_advance(&self) -> bool {
        // Pairs with the fence in `pin`: either that pin's count is seen
        // below, or the pinner re-reads an epoch stored before this point.
        seqcst_fence_for_loom();
        let e = self.epoch.load(Ordering::SeqCst);
        // The previous epoch, e - 1, has the parity of e + 1.
        let prev = ((e + 1) & 1) as usize;
        if self
            .active
            .iter()
            .any(|a| a[prev].load(Ordering::SeqCst) != 0)
        {
            return false;
        }
        self.epoch.store(e + 1, Ordering::SeqCst);
        true
    }
}

/// Retired slots waiting out their grace period, and reusable ones. Kept
/// under the table's slot lock.
///
/// Invariant: `free` holds slots retired at least two epoch advances ago,
/// `limbo_prev` those retired during the previous epoch, `limbo_cur` those
/// retired during the current one.
#[derive(Debug, Default)]
pub struct Limbo {
    /// Reusable now.
    free: Vec<u32>,
    /// Removed during the current epoch.
    limbo_cur: Vec<u32>,
    /// Removed during the previous epoch.
    limbo_prev: Vec<u32>,
}

impl Limbo {
    /// Retires a slot whose tenant was just removed.
    #[inline]
    pub fn retire(&mut self, slot: u32) {
        self.limbo_cur.push(slot);
    }

    /// A slot that no pinned reader can still hold, trying up to two epoch
    /// advances; `None` if there is none (the table then takes a fresh one).
    #[inline]
    pub fn take(&mut self, grace: &Grace) -> Option<u32> {
        for _ in 0..2 {
            if let Some(s) = self.free.pop() {
                return Some(s);
            }
            if grace.try_advance() {
                self.free.append(&mut self.limbo_prev);
                core::mem::swap(&mut self.limbo_prev, &mut self.limbo_cur);
            }
        }
        self.free.pop()
    }

    /// Slots retired and not handed out again yet.
    pub fn waiting(&self) -> usize {
        self.free.len() + self.limbo_cur.len() + self.limbo_prev.len()
    }
}
