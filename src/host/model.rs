//! A model of the pool's memory accounting for one thread: no bytes, only
//! the counts the pool keeps (thread-cache lengths, central free and
//! uncarved blocks, spans, the huge cache), moved by the same rules as the
//! real code in `thread_cache`, `central` and `huge`. The meta backend runs
//! it to predict the reserved (and peak reserved) bytes a host backend would
//! hold for the same requests; `tests::model_matches_pool` holds the two to
//! equality.
//!
//! Exactness: alloc and free sequences from one thread are predicted exactly.
//! After `trim`, the prediction is exact for classes of one block per span
//! and for classes with nothing live, and an upper bound otherwise (which
//! spans of a partly used class are wholly free depends on block placement,
//! which the model does not track).

use super::huge::{HUGE_SLOTS, pick, pick_resize};
use super::large::{
    FIRST, donor, fitting_class, gather_from, is_one_block, keep_tail, note_used, over_budget,
};
use super::size_class::{
    NUM_CLASSES, SPARE_CLASSES, batch_at, blocks_per_span, class_for, class_size,
    counts_against_limit, huge_size, initial_cap, next_cap, span_bytes,
};
use crate::stats::Stat;

#[derive(Debug, Clone, Copy, Default)]
struct ClassModel {
    tc: usize,
    /// Blocks on the thread cache's spare list (classes below `SPARE_CLASSES`).
    spare: usize,
    /// The thread cache's cap (slow start).
    cap: u32,
    free: usize,
    bump: usize,
    spans: usize,
    live: usize,
}

/// The model.
#[derive(Debug, Clone)]
pub struct PoolModel {
    classes: [ClassModel; NUM_CLASSES],
    huge: Vec<usize>,
    cached: usize,
    /// The part of `cached` the retain limit bounds (classes of 1 MiB and
    /// up, huge blocks).
    retained: usize,
    retain_limit: usize,
    /// As `PoolShared::peak_used`.
    peak_used: usize,
    reserved: Stat,
    segments: Stat,
    maps: u64,
}

impl PoolModel {
    /// An empty pool with the given retained-bytes limit.
    pub fn new(retain_limit: Option<usize>) -> Self {
        PoolModel {
            classes: core::array::from_fn(|c| ClassModel {
                cap: initial_cap(c),
                ..ClassModel::default()
            }),
            huge: Vec::new(),
            cached: 0,
            retained: 0,
            retain_limit: retain_limit.unwrap_or(usize::MAX),
            peak_used: 0,
            reserved: Stat::default(),
            segments: Stat::default(),
            maps: 0,
        }
    }

    fn map(&mut self, len: usize) {
        self.reserved.current += len as u64;
        self.reserved.allocated += len as u64;
        self.reserved.peak = self.reserved.peak.max(self.reserved.current);
        self.segments.current += 1;
        self.segments.allocated += 1;
        self.segments.peak = self.segments.peak.max(self.segments.current);
        self.maps += 1;
    }

    fn unmap(&mut self, len: usize, n: usize) {
        self.reserved.current -= (len * n) as u64;
        self.reserved.freed += (len * n) as u64;
        self.segments.current -= n as u64;
        self.segments.freed += n as u64;
    }

    /// A span resized from `from` to `to` bytes (tail unmapped, or grown).
    fn resize(&mut self, from: usize, to: usize) {
        if to > from {
            self.reserved.current += (to - from) as u64;
            self.reserved.allocated += (to - from) as u64;
            self.reserved.peak = self.reserved.peak.max(self.reserved.current);
        } else {
            self.reserved.current -= (from - to) as u64;
            self.reserved.freed += (from - to) as u64;
        }
    }

    /// One free span of class `d` off its class (`Central::take_span`).
    fn take_span(&mut self, d: usize) {
        let m = &mut self.classes[d];
        if m.free > 0 {
            m.free -= 1;
        } else {
            m.bump -= 1;
        }
        m.spans -= 1;
        self.uncache(d, class_size(d));
    }

    /// `bytes` of spans unmapped (or moved into another span).
    fn release(&mut self, bytes: usize) {
        self.reserved.current -= bytes as u64;
        self.reserved.freed += bytes as u64;
    }

    /// A span just grown takes `gap` bytes of pages from free spans
    /// (`large::gather`).
    fn gather(&mut self, mut gap: usize, cut: bool) {
        while gap > 0 {
            let has_free = |e: usize| self.classes[e].free + self.classes[e].bump > 0;
            let Some(e) = gather_from(gap, cut, has_free) else {
                break;
            };
            self.take_span(e);
            let zl = span_bytes(e);
            let k = gap.min(zl);
            self.release(k);
            gap -= k;
            match fitting_class(zl - k) {
                Some(t) => {
                    self.release(zl - k - span_bytes(t));
                    self.classes[t].spans += 1;
                    self.list(t, 1);
                }
                None => {
                    self.release(zl - k);
                    self.segments.current -= 1;
                    self.segments.freed += 1;
                }
            }
        }
    }

    fn grow(&mut self, c: usize) {
        let m = &mut self.classes[c];
        m.free += m.bump;
        m.bump = blocks_per_span(c);
        m.spans += 1;
        self.cache(c, blocks_per_span(c) * class_size(c));
        self.map(span_bytes(c));
    }

    fn cache(&mut self, c: usize, bytes: usize) {
        self.cached += bytes;
        if counts_against_limit(c) {
            self.retained += bytes;
        }
    }

    fn uncache(&mut self, c: usize, bytes: usize) {
        self.cached -= bytes;
        if counts_against_limit(c) {
            self.retained -= bytes;
        }
    }

    /// Allocates `size`/`align` (both valid for the pool, size ≥ 1); returns
    /// the mapped length of the block (its class size, or the huge mapping).
    pub fn alloc(&mut self, size: usize, align: usize) -> usize {
        let Some(c) = class_for(size, align) else {
            let need = huge_size(size).unwrap_or(usize::MAX);
            if let Some(i) = pick(&self.huge, need) {
                let len = self.huge.swap_remove(i);
                self.cached -= len;
                self.retained -= len;
                return len;
            }
            if let Some(i) = pick_resize(&self.huge, need) {
                let len = self.huge.swap_remove(i);
                self.cached -= len;
                self.retained -= len;
                self.resize(len, need);
                return need;
            }
            self.map(need);
            return need;
        };
        self.classes[c].live += 1;
        if self.classes[c].tc > 0 {
            self.classes[c].tc -= 1;
            return class_size(c);
        }
        // The spare list, as `ThreadCache::unpark`.
        if self.classes[c].spare > 0 {
            let m = &mut self.classes[c];
            m.tc = core::mem::take(&mut m.spare) - 1;
            return class_size(c);
        }
        // Refill, as `ThreadCache::refill` and `Central::refill`.
        let want = batch_at(self.classes[c].cap) as usize;
        self.classes[c].cap = next_cap(c, self.classes[c].cap);
        if is_one_block(c) && self.classes[c].free + self.classes[c].bump == 0 {
            // The thread cache hands back its idle big blocks, then a
            // neighbouring class may lend its span (`large::steal`).
            for d in FIRST..NUM_CLASSES {
                let k = self.classes[d].tc;
                if k > 0 {
                    self.give_back(d, k);
                }
            }
            self.peak_used = note_used(
                self.peak_used,
                self.reserved.current as usize + span_bytes(c),
                self.cached,
            );
            let has_free = |d: usize| self.classes[d].free + self.classes[d].bump > 0;
            if let Some(d) = donor(c, has_free) {
                self.take_span(d);
                self.classes[c].spans += 1;
                let (from, to) = (span_bytes(d), span_bytes(c));
                if from > to {
                    // The tail may stay, a free span (`large::cut`).
                    let retained = self.retained;
                    let reserved = self.reserved.current as usize;
                    match keep_tail(from - to, retained, reserved, self.peak_used) {
                        Some(t) => {
                            self.release(from - to - span_bytes(t));
                            self.segments.current += 1;
                            self.segments.allocated += 1;
                            self.segments.peak = self.segments.peak.max(self.segments.current);
                            self.classes[t].spans += 1;
                            self.list(t, 1);
                        }
                        None => self.release(from - to),
                    }
                } else if from < to {
                    self.resize(from, to);
                    self.gather(to - from, true);
                }
                return class_size(c);
            }
            // No donor: a fresh span takes the pages of smaller free spans
            // (`large::fresh_gathered`).
            let need = span_bytes(c);
            let cut = over_budget(self.reserved.current as usize, need, self.peak_used);
            if gather_from(need, cut, has_free).is_some() {
                self.map(need);
                self.classes[c].spans += 1;
                self.gather(need, cut);
                return class_size(c);
            }
        }
        let m = &mut self.classes[c];
        let mut n = want.min(m.free);
        m.free -= n;
        if n == 0 && m.bump == 0 {
            self.grow(c);
        }
        let m = &mut self.classes[c];
        let carve = (want - n).min(m.bump);
        m.bump -= carve;
        n += carve;
        m.tc = n - 1;
        self.uncache(c, n * class_size(c));
        class_size(c)
    }

    /// Frees a block allocated with `size`/`align` whose mapped length was `len`.
    pub fn free(&mut self, size: usize, align: usize, len: usize) {
        let Some(c) = class_for(size, align) else {
            if self.huge.len() == HUGE_SLOTS
                || self.retained.saturating_add(len) > self.retain_limit
            {
                self.unmap(len, 1);
            } else {
                self.huge.push(len);
                self.cached += len;
                self.retained += len;
            }
            return;
        };
        self.classes[c].live -= 1;
        let cap = self.classes[c].cap;
        if self.classes[c].tc as u32 >= cap {
            if c < SPARE_CLASSES && self.classes[c].spare == 0 {
                // Parked whole, as `ThreadCache::overflow`.
                let m = &mut self.classes[c];
                m.spare = core::mem::take(&mut m.tc);
            } else {
                let k = (batch_at(cap) as usize).min(self.classes[c].tc);
                self.give_back(c, k);
            }
            self.classes[c].cap = next_cap(c, cap);
        }
        self.classes[c].tc += 1;
    }

    fn give_back(&mut self, c: usize, k: usize) {
        self.classes[c].tc -= k;
        self.list(c, k);
    }

    /// `k` free blocks of class `c` onto its central list (`Central::give_back`).
    fn list(&mut self, c: usize, k: usize) {
        self.classes[c].free += k;
        self.cache(c, k * class_size(c));
        if counts_against_limit(c) {
            while self.retained > self.retain_limit && self.classes[c].free > 0 {
                self.classes[c].free -= 1;
                self.classes[c].spans -= 1;
                self.uncache(c, class_size(c));
                self.unmap(span_bytes(c), 1);
            }
        }
    }

    /// `HostPool::trim` from the modelled thread.
    pub fn trim(&mut self) {
        for c in 0..NUM_CLASSES {
            let m = &mut self.classes[c];
            let k = m.tc + core::mem::take(&mut m.spare);
            m.tc = k;
            if k > 0 {
                self.give_back(c, k);
            }
        }
        let huge = core::mem::take(&mut self.huge);
        for &l in &huge {
            self.unmap(l, 1);
        }
        self.cached -= huge.iter().sum::<usize>();
        self.retained -= huge.iter().sum::<usize>();
        for c in 0..NUM_CLASSES {
            let m = self.classes[c];
            let released = if m.live == 0 {
                m.spans
            } else if blocks_per_span(c) == 1 {
                m.free + m.bump
            } else {
                0
            };
            if released > 0 {
                let free_blocks = if m.live == 0 {
                    m.free + m.bump
                } else {
                    released
                };
                self.uncache(c, free_blocks * class_size(c));
                let m = &mut self.classes[c];
                m.spans -= released;
                m.free = 0;
                m.bump = 0;
                self.unmap(span_bytes(c), released);
            }
        }
    }

    /// Prewarms `count` blocks of `size`, as `HostPool::prewarm`.
    pub fn prewarm(&mut self, size: usize, count: usize) {
        match class_for(size, 8) {
            Some(c) => {
                while self.classes[c].free + self.classes[c].bump < count {
                    self.grow(c);
                }
            }
            None => {
                let need = huge_size(size).unwrap_or(usize::MAX);
                let have = self.huge.iter().filter(|&&l| l == need).count();
                for _ in have..count.min(HUGE_SLOTS) {
                    self.map(need);
                    if self.huge.len() == HUGE_SLOTS {
                        self.unmap(need, 1);
                        break;
                    }
                    self.huge.push(need);
                    self.cached += need;
                    self.retained += need;
                }
            }
        }
    }

    /// Reserved bytes: current, peak, totals.
    pub fn reserved(&self) -> Stat {
        self.reserved
    }
    /// Segments: current, peak, totals.
    pub fn segments(&self) -> Stat {
        self.segments
    }
    /// Mappings made.
    pub fn maps(&self) -> u64 {
        self.maps
    }
}
