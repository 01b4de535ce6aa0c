//! [`MemoryStore`]: the in-process store — the embedded default and the
//! store of the semantic tests.
//!
//! A map from key to value behind one lock, with per-operation counters
//! (so tests can count commands the way they count `INFO commandstats` on
//! Redis) and fault injection: make the next calls fail, stall calls, or
//! alter a stored value.

use super::store::{ChunkKey, RemoteStore};
use crate::error::AllocError;
use parking_lot::{Condvar, Mutex};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Commands a [`MemoryStore`] has served.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MemoryStoreCounts {
    /// `put` calls (a batch of chunks each).
    pub puts: u64,
    /// Chunks written.
    pub chunks_put: u64,
    /// `get` calls.
    pub gets: u64,
    /// Chunks fetched.
    pub chunks_got: u64,
    /// `delete` calls (one batched delete each).
    pub deletes: u64,
    /// Keys deleted (present or not).
    pub keys_deleted: u64,
    /// `health` calls.
    pub health: u64,
}

#[derive(Debug, Default)]
struct Faults {
    /// Calls still to fail, and with what.
    fail: Option<(u32, AllocError)>,
    /// While set, every call blocks until [`MemoryStore::release`].
    stalled: bool,
}

/// An in-process [`RemoteStore`].
#[derive(Debug, Default)]
pub struct MemoryStore {
    map: Mutex<HashMap<ChunkKey, Vec<u8>>>,
    faults: Mutex<Faults>,
    unstall: Condvar,
    stalled_calls: AtomicU64,
    puts: AtomicU64,
    chunks_put: AtomicU64,
    gets: AtomicU64,
    chunks_got: AtomicU64,
    deletes: AtomicU64,
    keys_deleted: AtomicU64,
    health: AtomicU64,
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }
    /// Keys held (Redis's `DBSIZE`).
    pub fn len(&self) -> usize {
        self.map.lock().len()
    }
    /// Whether no key is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Value bytes held (headers included).
    pub fn bytes(&self) -> usize {
        self.map.lock().values().map(Vec::len).sum()
    }
    /// The keys held, sorted.
    pub fn keys(&self) -> Vec<ChunkKey> {
        let mut k: Vec<_> = self.map.lock().keys().copied().collect();
        k.sort_unstable();
        k
    }
    /// The commands served so far.
    pub fn counts(&self) -> MemoryStoreCounts {
        let r = |a: &AtomicU64| a.load(Ordering::Relaxed);
        MemoryStoreCounts {
            puts: r(&self.puts),
            chunks_put: r(&self.chunks_put),
            gets: r(&self.gets),
            chunks_got: r(&self.chunks_got),
            deletes: r(&self.deletes),
            keys_deleted: r(&self.keys_deleted),
            health: r(&self.health),
        }
    }
    /// Fault injection: the next `n` calls (any operation) fail with `e`.
    pub fn fail_next(&self, n: u32, e: AllocError) {
        self.faults.lock().fail = (n > 0).then_some((n, e));
    }
    /// Fault injection: every call blocks until [`release`](Self::release).
    pub fn stall(&self) {
        self.faults.lock().stalled = true;
    }
    /// Ends a [`stall`](Self::stall).
    pub fn release(&self) {
        self.faults.lock().stalled = false;
        self.unstall.notify_all();
    }
    /// Calls that are blocked in a stall right now.
    pub fn stalled_calls(&self) -> u64 {
        self.stalled_calls.load(Ordering::Acquire)
    }
    /// Fault injection: flips one bit of the stored value of `key` at byte
    /// `at` (modulo its length). Returns whether the key was present.
    pub fn corrupt(&self, key: &ChunkKey, at: usize) -> bool {
        let mut m = self.map.lock();
        match m.get_mut(key) {
            Some(v) if !v.is_empty() => {
                let i = at % v.len();
                v[i] ^= 1;
                true
            }
            _ => false,
        }
    }

    /// Runs the fault schedule for one call.
    fn gate(&self) -> Result<(), AllocError> {
        let mut f = self.faults.lock();
        if f.stalled {
            self.stalled_calls.fetch_add(1, Ordering::AcqRel);
            // Bounded: a forgotten stall cannot hang a test run for ever.
            let deadline = std::time::Instant::now() + Duration::from_secs(60);
            while f.stalled && !self.unstall.wait_until(&mut f, deadline).timed_out() {}
            self.stalled_calls.fetch_sub(1, Ordering::AcqRel);
        }
        if let Some((n, e)) = f.fail.take() {
            if n > 1 {
                f.fail = Some((n - 1, e.clone()));
            }
            return Err(e);
        }
        Ok(())
    }
}

impl RemoteStore for MemoryStore {
    fn name(&self) -> &'static str {
        "memory"
    }

    fn put(&self, items: &[(ChunkKey, &[u8])]) -> Result<(), AllocError> {
        self.gate()?;
        self.puts.fetch_add(1, Ordering::Relaxed);
        self.chunks_put
            .fetch_add(items.len() as u64, Ordering::Relaxed);
        let mut m = self.map.lock();
        for (k, v) in items {
            m.insert(*k, v.to_vec());
        }
        Ok(())
    }

    fn get(&self, keys: &[ChunkKey]) -> Result<Vec<Option<Vec<u8>>>, AllocError> {
        self.gate()?;
        self.gets.fetch_add(1, Ordering::Relaxed);
        self.chunks_got
            .fetch_add(keys.len() as u64, Ordering::Relaxed);
        let m = self.map.lock();
        Ok(keys.iter().map(|k| m.get(k).cloned()).collect())
    }

    fn delete(&self, keys: &[ChunkKey]) -> Result<(), AllocError> {
        self.gate()?;
        self.deletes.fetch_add(1, Ordering::Relaxed);
        self.keys_deleted
            .fetch_add(keys.len() as u64, Ordering::Relaxed);
        let mut m = self.map.lock();
        for k in keys {
            m.remove(k);
        }
        Ok(())
    }

    fn health(&self) -> Result<(), AllocError> {
        self.health.fetch_add(1, Ordering::Relaxed);
        self.gate()
    }
}
