//! The write/free queue and the one flusher thread that drains it.
//!
//! Writers and frees add to the open batch ([`Queue`]); the flusher takes
//! the whole batch when any trigger fires — queued bytes ≥ `flush_bytes`,
//! queued operations ≥ `flush_ops`, the oldest entry older than
//! `flush_interval`, a read that depends on a queued write, `synchronize`,
//! or drop — and sends it to the store in one `apply` call.
//!
//! Invariants:
//! - every batch has one [`Ticket`]; its result is set exactly once, after
//!   the store answered (or failed), and every waiter of the batch sees that
//!   same result;
//! - batches are applied in order by one thread, so a batch's read of a
//!   chunk written by an earlier batch sees that write;
//! - `bytes == Σ pending buffer lengths`, `ops == writes merged + frees`
//!   of the open batch (reset when taken).

use super::Shared;
use super::store::{ChunkKey, HEADER, RemoteStore, decode, encode_header};
use crate::error::AllocError;
use parking_lot::{Condvar, Mutex};
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

/// Why a batch was sent; indexes `RemoteStats::flushes`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Reason {
    Size = 0,
    Count = 1,
    Timer = 2,
    Read = 3,
    Sync = 4,
    Drop = 5,
    Backpressure = 6,
}

/// The completion of one batch.
#[derive(Debug, Default)]
pub(super) struct Ticket {
    result: Mutex<Option<Result<(), AllocError>>>,
    cv: Condvar,
}

impl Ticket {
    pub fn is_done(&self) -> bool {
        self.result.lock().is_some()
    }
    fn complete(&self, r: Result<(), AllocError>) {
        *self.result.lock() = Some(r);
        self.cv.notify_all();
    }
    /// Waits for the batch's result, at most `timeout`.
    pub fn wait(&self, timeout: Duration, what: &'static str) -> Result<(), AllocError> {
        let start = Instant::now();
        let deadline = start + timeout;
        let mut r = self.result.lock();
        loop {
            if let Some(r) = r.as_ref() {
                return r.clone();
            }
            if self.cv.wait_until(&mut r, deadline).timed_out() && r.is_none() {
                return Err(AllocError::Timeout {
                    what,
                    waited_ms: start.elapsed().as_millis() as u64,
                });
            }
        }
    }
}

/// A queued write of one chunk: the whole chunk's bytes with the header
/// room in front, and which byte ranges of it were written.
#[derive(Debug)]
pub(super) struct Pending {
    /// `HEADER + chunk length` bytes; the payload starts at `HEADER`.
    pub buf: Vec<u8>,
    /// Written ranges of the payload, sorted, disjoint, not adjacent.
    pub dirty: Vec<(u32, u32)>,
    /// Whether the store may hold earlier bytes of this chunk (then a
    /// partial write is merged onto them: read-modify-write at flush).
    pub base_in_store: bool,
}

impl Pending {
    /// Marks `start..end` of the payload written.
    pub fn mark(&mut self, start: u32, end: u32) {
        let (mut s, mut e) = (start, end);
        self.dirty.retain(|&(a, b)| {
            if b < s || a > e {
                true
            } else {
                s = s.min(a);
                e = e.max(b);
                false
            }
        });
        let at = self.dirty.partition_point(|&(a, _)| a < s);
        self.dirty.insert(at, (s, e));
    }
    fn payload_len(&self) -> usize {
        self.buf.len() - HEADER
    }
    /// Whether every payload byte was written.
    pub fn full(&self) -> bool {
        self.dirty == [(0, self.payload_len() as u32)]
    }
}

/// The open batch and the flusher's controls.
#[derive(Debug)]
pub(super) struct Queue {
    pub writes: HashMap<(u64, u32), Pending>,
    pub frees: Vec<ChunkKey>,
    pub bytes: usize,
    pub ops: usize,
    pub oldest: Option<Instant>,
    pub ticket: Arc<Ticket>,
    pub wanted: Option<Reason>,
    pub shutdown: bool,
    pub in_flight: bool,
    /// After a failed batch, timer flushes wait until then (explicit
    /// flushes do not).
    pub not_before: Option<Instant>,
    /// The first error of a failed batch not yet returned by `synchronize`.
    pub deferred: Option<AllocError>,
}

impl Queue {
    pub fn new() -> Self {
        Queue {
            writes: HashMap::new(),
            frees: Vec::new(),
            bytes: 0,
            ops: 0,
            oldest: None,
            ticket: Arc::new(Ticket::default()),
            wanted: None,
            shutdown: false,
            in_flight: false,
            not_before: None,
            deferred: None,
        }
    }
    fn is_empty(&self) -> bool {
        self.writes.is_empty() && self.frees.is_empty()
    }
    /// Notes one queued operation.
    pub fn touch(&mut self) {
        self.ops += 1;
        self.oldest.get_or_insert_with(Instant::now);
    }
    /// Whether the size or count threshold is reached.
    pub fn over(&self, flush_bytes: usize, flush_ops: usize) -> bool {
        self.bytes >= flush_bytes || self.ops >= flush_ops
    }
    /// Asks for a flush (the first reason wins).
    pub fn want(&mut self, r: Reason) {
        self.wanted.get_or_insert(r);
    }
}

/// One batch taken off the queue.
struct Batch {
    writes: Vec<(ChunkKey, Pending)>,
    frees: Vec<ChunkKey>,
    /// Tensors whose partial writes could not be merged (their stored chunk
    /// is missing or fails its checksum): left out of the batch, so one bad
    /// tensor does not fail the others, and told on their next use.
    bad: Vec<(u64, AllocError)>,
}

/// The flusher thread's body. Returns on shutdown once the queue is empty.
pub(super) fn run<S: RemoteStore>(sh: Arc<Shared<S>>) {
    loop {
        let (mut batch, ticket, shutdown) = {
            let mut q = sh.queue.lock();
            let reason = loop {
                if let Some(r) = trigger(&sh, &q) {
                    break r;
                }
                match deadline(&sh, &q) {
                    Some(d) => {
                        sh.wake.wait_until(&mut q, d);
                    }
                    None => sh.wake.wait(&mut q),
                }
            };
            sh.counters.flushes[reason as usize].fetch_add(1, Ordering::Relaxed);
            let batch = Batch {
                writes: q
                    .writes
                    .drain()
                    .map(|((id, chunk), p)| {
                        let key = ChunkKey {
                            ns: sh.ns,
                            id,
                            chunk,
                        };
                        (key, p)
                    })
                    .collect(),
                frees: core::mem::take(&mut q.frees),
                bad: Vec::new(),
            };
            q.bytes = 0;
            q.ops = 0;
            q.oldest = None;
            q.wanted = None;
            q.in_flight = true;
            let ticket = core::mem::replace(&mut q.ticket, Arc::new(Ticket::default()));
            (batch, ticket, q.shutdown)
        };
        let r = if batch.writes.is_empty() && batch.frees.is_empty() {
            Ok(())
        } else {
            sh.counters.batches.fetch_add(1, Ordering::Relaxed);
            apply(&sh, &mut batch)
        };
        for (id, e) in &batch.bad {
            sh.mark_failed(*id, e);
        }
        if let Err(e) = &r {
            sh.counters.failed_batches.fetch_add(1, Ordering::Relaxed);
            // The ids whose writes this batch carried report it on next use.
            for (k, _) in &batch.writes {
                sh.mark_failed(k.id, e);
            }
        }
        {
            let mut q = sh.queue.lock();
            q.in_flight = false;
            if let Err(e) = &r {
                q.deferred.get_or_insert_with(|| e.clone());
                if !shutdown {
                    // Frees are retried (deleting twice is harmless), after
                    // a back-off so a dead store is not hammered.
                    q.frees.extend_from_slice(&batch.frees);
                    if !batch.frees.is_empty() {
                        q.touch();
                    }
                    q.not_before = Some(Instant::now() + sh.cfg.retry_backoff);
                }
            } else {
                q.not_before = None;
            }
        }
        ticket.complete(r);
        if shutdown {
            let q = sh.queue.lock();
            if q.is_empty() {
                // Nobody can queue after shutdown; complete the open ticket.
                q.ticket.complete(Ok(()));
                return;
            }
        }
    }
}

fn trigger<S: RemoteStore>(sh: &Shared<S>, q: &Queue) -> Option<Reason> {
    if let Some(r) = q.wanted {
        return Some(r);
    }
    if q.shutdown {
        return Some(Reason::Drop);
    }
    if q.is_empty() {
        return None;
    }
    if q.bytes >= sh.cfg.flush_bytes {
        return Some(Reason::Size);
    }
    if q.ops >= sh.cfg.flush_ops {
        return Some(Reason::Count);
    }
    match deadline(sh, q) {
        Some(d) if Instant::now() >= d => Some(Reason::Timer),
        _ => None,
    }
}

fn deadline<S: RemoteStore>(sh: &Shared<S>, q: &Queue) -> Option<Instant> {
    let t = q.oldest? + sh.cfg.flush_interval;
    Some(q.not_before.map_or(t, |nb| nb.max(t)))
}

/// Sends one batch: merges partial chunks onto the stored bytes
/// (read-modify-write, one `get` for all of them), fills the headers in
/// place, then one `apply` call.
fn apply<S: RemoteStore>(sh: &Shared<S>, b: &mut Batch) -> Result<(), AllocError> {
    let rmw: Vec<usize> = (0..b.writes.len())
        .filter(|&i| {
            let p = &b.writes[i].1;
            p.base_in_store && !p.full()
        })
        .collect();
    if !rmw.is_empty() {
        let keys: Vec<ChunkKey> = rmw.iter().map(|&i| b.writes[i].0).collect();
        sh.counters.store_gets.fetch_add(1, Ordering::Relaxed);
        let vals = sh.store.get(&keys)?;
        for (&i, v) in rmw.iter().zip(vals) {
            let (key, p) = &mut b.writes[i];
            let merged = v.ok_or_else(|| missing(key)).and_then(|mut base| {
                decode(key, &base, p.payload_len())?;
                for &(s, e) in &p.dirty {
                    let r = HEADER + s as usize..HEADER + e as usize;
                    base[r.clone()].copy_from_slice(&p.buf[r]);
                }
                Ok(base)
            });
            match merged {
                Ok(base) => p.buf = base,
                Err(e) => b.bad.push((key.id, e)),
            }
        }
        if !b.bad.is_empty() {
            let bad: Vec<u64> = b.bad.iter().map(|(id, _)| *id).collect();
            b.writes.retain(|(k, _)| !bad.contains(&k.id));
        }
    }
    for (_, p) in &mut b.writes {
        encode_header(&mut p.buf);
    }
    let items: Vec<(ChunkKey, &[u8])> = b
        .writes
        .iter()
        .map(|(k, p)| (*k, p.buf.as_slice()))
        .collect();
    sh.counters
        .chunks_put
        .fetch_add(items.len() as u64, Ordering::Relaxed);
    sh.counters
        .keys_deleted
        .fetch_add(b.frees.len() as u64, Ordering::Relaxed);
    sh.store.apply(&items, &b.frees)
}

fn missing(key: &ChunkKey) -> AllocError {
    AllocError::Integrity {
        what: format!("remote chunk {key}"),
        detail: "written earlier but missing from the store (evicted, flushed or deleted outside tensorpool)".into(),
    }
}
