//! [`UsageCounters`]: live count and requested bytes per size category and
//! per device, kept exactly by [`MetaTable`]'s insert and remove so that
//! `usage_by_category` and `usage_by_device` are O(1) reads, not scans.
//!
//! # Invariants
//! Outside insert/remove (both hold the table's slot lock, so there is one
//! writer at a time), with `scan` the column scans of [`MetaTable`]:
//!
//! - `cat[c] == scan_by_category()[c]` for every category `c`;
//! - `dev[e] == scan_by_device()[code[e]]` for every entry `e` whose code
//!   is assigned, and each code is in at most one entry;
//! - `overflow == Σ scan_by_device()[d].count` over the devices `d` that
//!   have no entry. While `overflow > 0` no entry changes its code, so a
//!   device with tensors in `overflow` never has an entry, and remove
//!   finds each tensor where insert counted it.
//!
//! # Reads
//! The counters are a seqlock: the writer makes `seq` odd, updates, and
//! makes it even again; a reader copies the counters between two equal
//! even reads of `seq` (retrying otherwise), so it sees the state between
//! two whole inserts or removes — never a tensor counted in neither or
//! both categories, or with its count but not its bytes.
//!
//! [`MetaTable`]: crate::meta::MetaTable

use crate::host::size_class::Category;
use crate::meta::table::DEVICE_SLOTS;
use crate::stats::CategoryUsage;
use crate::sync::{AtomicU32, AtomicU64, Ordering, fence, spin_hint};

/// The code of an entry no device has claimed yet (device codes are u16).
const UNASSIGNED: u32 = u32::MAX;

/// One count and byte total.
#[derive(Debug, Default)]
struct Counter {
    count: AtomicU64,
    bytes: AtomicU64,
}

impl Counter {
    /// Adds (or takes away) one tensor of `size` bytes. Writer only.
    #[inline]
    fn step(&self, size: u64, add: bool) {
        let (n, b) = (
            self.count.load(Ordering::Relaxed),
            self.bytes.load(Ordering::Relaxed),
        );
        let (n, b) = if add {
            (n + 1, b.wrapping_add(size))
        } else {
            debug_assert!(n > 0, "removing from an empty counter");
            (n - 1, b.wrapping_sub(size))
        };
        self.count.store(n, Ordering::Relaxed);
        self.bytes.store(b, Ordering::Relaxed);
    }

    #[inline]
    fn get(&self) -> CategoryUsage {
        CategoryUsage {
            count: self.count.load(Ordering::Relaxed),
            bytes: self.bytes.load(Ordering::Relaxed),
        }
    }
}

/// Per-device counters, as read: up to [`DEVICE_SLOTS`] `(code, usage)`
/// entries with a non-zero count, and the tensors on devices with no entry.
#[derive(Debug, Clone, Copy)]
pub(crate) struct DeviceCounts {
    /// `(device code, usage)`; only the first `len` are meaningful.
    pub(crate) entries: [(u16, CategoryUsage); DEVICE_SLOTS],
    /// Entries in use.
    pub(crate) len: usize,
    /// Live tensors on devices that found no entry (all entries were taken
    /// by other devices' live tensors when they were inserted).
    pub(crate) overflow: u64,
}

/// See the module docs.
#[derive(Debug)]
pub(crate) struct UsageCounters {
    /// Odd while the writer is updating.
    seq: AtomicU64,
    cat: [Counter; Category::COUNT],
    /// Device code per entry, or [`UNASSIGNED`].
    code: [AtomicU32; DEVICE_SLOTS],
    dev: [Counter; DEVICE_SLOTS],
    /// Live tensors counted in no device entry.
    overflow: AtomicU64,
}

impl UsageCounters {
    pub(crate) fn new() -> Self {
        UsageCounters {
            seq: AtomicU64::new(0),
            cat: Default::default(),
            code: core::array::from_fn(|_| AtomicU32::new(UNASSIGNED)),
            dev: Default::default(),
            overflow: AtomicU64::new(0),
        }
    }

    /// Counts a tensor in (`add`) or out of category `cat` and device
    /// `device`. Only with the table's slot lock held: one writer at a time.
    pub(crate) fn update(&self, cat: usize, device: u16, size: u64, add: bool) {
        let s = self.seq.load(Ordering::Relaxed);
        debug_assert!(s & 1 == 0, "two usage writers at once");
        self.seq.store(s.wrapping_add(1), Ordering::Relaxed);
        // Orders the odd `seq` before every counter store below: a reader
        // that sees any of them sees `seq` changed (its Acquire fence).
        fence(Ordering::Release);
        if let Some(c) = self.cat.get(cat) {
            c.step(size, add);
        }
        match self.entry_for(device, add) {
            Some(e) => self.dev[e].step(size, add),
            None => {
                let o = self.overflow.load(Ordering::Relaxed);
                debug_assert!(add || o > 0, "removing from an empty overflow");
                let o = if add { o + 1 } else { o.wrapping_sub(1) };
                self.overflow.store(o, Ordering::Relaxed);
            }
        }
        // Publishes the update: a reader that sees `s + 2` sees all of it.
        self.seq.store(s.wrapping_add(2), Ordering::Release);
    }

    /// The entry that counts `device`: its own; on insert (`add`) with no
    /// tensor in overflow, else a free entry (count 0), claimed; `None`:
    /// the tensor goes to (or comes from) `overflow`. Writer only.
    fn entry_for(&self, device: u16, add: bool) -> Option<usize> {
        let want = u32::from(device);
        if let Some(e) = self
            .code
            .iter()
            .position(|c| c.load(Ordering::Relaxed) == want)
        {
            return Some(e);
        }
        // Claiming an entry while tensors sit in overflow could give one of
        // their devices an entry, and their removal would then be taken
        // from it (see the module docs).
        if !add || self.overflow.load(Ordering::Relaxed) != 0 {
            return None;
        }
        let e = self
            .dev
            .iter()
            .position(|d| d.count.load(Ordering::Relaxed) == 0)?;
        self.code[e].store(want, Ordering::Relaxed);
        Some(e)
    }

    /// Runs `f` on a consistent state of the counters (between two whole
    /// updates); `f` must only load them.
    #[inline]
    fn read<R>(&self, f: impl Fn() -> R) -> R {
        loop {
            let s = self.seq.load(Ordering::Acquire);
            if s & 1 == 0 {
                let r = f();
                // The seqlock's reader side: if `f` saw any store of a later
                // update, the `seq` load below sees that update's odd store.
                fence(Ordering::Acquire);
                if self.seq.load(Ordering::Relaxed) == s {
                    return r;
                }
            }
            spin_hint();
        }
    }

    /// Live count and bytes per category, by [`Category::index`].
    #[inline]
    pub(crate) fn by_category(&self) -> [CategoryUsage; Category::COUNT] {
        self.read(|| core::array::from_fn(|c| self.cat[c].get()))
    }

    /// The device entries with a live tensor, and the overflow.
    pub(crate) fn by_device(&self) -> DeviceCounts {
        self.read(|| {
            let mut out = DeviceCounts {
                entries: [(0, CategoryUsage::default()); DEVICE_SLOTS],
                len: 0,
                overflow: self.overflow.load(Ordering::Relaxed),
            };
            for (code, d) in self.code.iter().zip(&self.dev) {
                let u = d.get();
                if u.count != 0 {
                    // A counted entry has a code, and codes are u16.
                    out.entries[out.len] = (code.load(Ordering::Relaxed) as u16, u);
                    out.len += 1;
                }
            }
            out
        })
    }
}
