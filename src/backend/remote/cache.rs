//! The bounded read cache: decoded chunk values keyed by (id, chunk) and
//! tagged with the tensor's write generation.
//!
//! Invariant: `bytes == Σ value lengths in map ≤ cap` and `order` holds
//! every key of `map` (plus stale keys already removed, skipped on evict).
//! A hit needs the generation the tensor has now, so a value fetched before
//! a write can never be returned after it; writes and frees also remove
//! entries so the memory goes back at once.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

/// A stored value (header + payload), shared between the cache and readers.
pub(super) type Value = Arc<Vec<u8>>;

#[derive(Debug)]
pub(super) struct ReadCache {
    map: HashMap<(u64, u32), (u32, Value)>,
    order: VecDeque<(u64, u32)>,
    bytes: usize,
    cap: usize,
}

impl ReadCache {
    pub fn new(cap: usize) -> Self {
        ReadCache {
            map: HashMap::new(),
            order: VecDeque::new(),
            bytes: 0,
            cap,
        }
    }

    /// The value of chunk `c` of `id` if it was cached at generation `generation`.
    pub fn get(&self, id: u64, c: u32, generation: u32) -> Option<Value> {
        match self.map.get(&(id, c)) {
            Some((g, v)) if *g == generation => Some(v.clone()),
            _ => None,
        }
    }

    /// Caches a value, evicting the oldest entries to stay under the cap.
    pub fn insert(&mut self, id: u64, c: u32, generation: u32, v: Value) {
        let len = v.len();
        if len > self.cap {
            return;
        }
        self.remove(id, c);
        while self.bytes + len > self.cap {
            let Some(k) = self.order.pop_front() else {
                break;
            };
            if let Some((_, old)) = self.map.remove(&k) {
                self.bytes -= old.len();
            }
        }
        self.bytes += len;
        self.map.insert((id, c), (generation, v));
        self.order.push_back((id, c));
    }

    /// Drops chunk `c` of `id`.
    pub fn remove(&mut self, id: u64, c: u32) {
        if let Some((_, v)) = self.map.remove(&(id, c)) {
            self.bytes -= v.len();
        }
        // `order` keeps the stale key; eviction skips it. Bound it.
        if self.order.len() > 4 * self.map.len() + 64 {
            let map = &self.map;
            self.order.retain(|k| map.contains_key(k));
        }
    }

    /// Drops everything; returns the bytes freed.
    pub fn clear(&mut self) -> usize {
        let b = self.bytes;
        self.map.clear();
        self.order.clear();
        self.bytes = 0;
        b
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounded_and_generation_checked() {
        let mut c = ReadCache::new(100);
        c.insert(1, 0, 7, Arc::new(vec![0; 60]));
        assert!(c.get(1, 0, 7).is_some());
        assert!(c.get(1, 0, 8).is_none(), "another generation never hits");
        c.insert(2, 0, 1, Arc::new(vec![0; 60]));
        assert!(c.get(1, 0, 7).is_none(), "oldest evicted");
        assert_eq!(c.bytes(), 60);
        c.insert(3, 0, 1, Arc::new(vec![0; 101]));
        assert!(c.get(3, 0, 1).is_none(), "larger than the cap: not cached");
        c.remove(2, 0);
        assert_eq!(c.bytes(), 0);
    }
}
