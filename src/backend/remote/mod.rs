//! [`RemoteBackend`]: tensors as 64-bit ids whose bytes live in a
//! [`RemoteStore`] — in-process ([`MemoryStore`]) or Redis / Redis Cluster
//! ([`RedisStore`]).
//!
//! - **Ids and state are local.** `allocate` takes an id from the
//!   process-wide issuer and records the tensor in a sharded table: no store
//!   command. A tensor is *Lazy* (size known, nothing written; reading it is
//!   [`AllocError::NotWritten`] at once) until its first write makes it
//!   *Realized*; bytes of a realized tensor never written read as zero
//!   (without a round trip). A `zeroed` request starts realized.
//! - **Local memory is metadata only**: one [`Entry`] per live tensor, the
//!   bounded read cache, and the queue of writes not yet sent.
//! - **Writes and frees are queued** and sent by one flusher thread
//!   ([`flusher`]) on a size, count or timer trigger, when a read depends on
//!   a queued write, on `synchronize` and on drop. Freeing a lazy tensor
//!   sends nothing; N frees within the timer are one batched delete.
//! - **Errors**: a failed batch fails every waiter of that batch with the
//!   same error, the ids whose writes it carried report it on their next
//!   use (once), and `synchronize` returns it; every wait is bounded by
//!   [`RemoteConfig::wait_timeout`].
//!
//! ```
//! use tensorpool::backend::remote::RemoteBackend;
//! use tensorpool::{AllocError, AllocRequest, TensorAllocator};
//! # fn main() -> Result<(), AllocError> {
//! let b = RemoteBackend::in_memory()?;
//! let a = b.allocate(&AllocRequest::bytes(4 << 20))?; // no round trip
//! assert!(matches!(b.read(&a, 0, &mut [0u8; 4]), Err(AllocError::NotWritten { .. })));
//! b.write(&a, 0, &vec![1u8; 4 << 20])?; // queued
//! let mut out = vec![0u8; 100];
//! b.read(&a, 4000, &mut out)?; // flushes the write, then reads chunk 0
//! assert_eq!(out, vec![1u8; 100]);
//! b.synchronize()?; // surfaces any deferred error
//! # Ok(()) }
//! ```
//!
//! With Redis (the same calls; `RedisConfig::cluster([...])` for a cluster):
//!
//! ```no_run
//! use tensorpool::backend::remote::{RedisConfig, RedisStore, RemoteBackend, RemoteConfig};
//! # fn main() -> Result<(), tensorpool::AllocError> {
//! let store = RedisStore::open(RedisConfig::single("redis://127.0.0.1:6379/"))?;
//! let b = RemoteBackend::new(store, RemoteConfig::default())?; // PINGs the server
//! # Ok(()) }
//! ```
//!
//! Invariants (per shard, under its lock): an id is in at most one shard
//! (`id % SHARDS`); `present` has a bit set only for chunks queued or stored
//! since allocation; `reserved_bytes == Σ lengths of present chunks` over
//! live entries.

mod cache;
mod flusher;
mod memory;
mod redis;
mod store;

pub use memory::{MemoryStore, MemoryStoreCounts};
pub use redis::{RedisConfig, RedisStore, redact};
pub use store::{CHUNK, ChunkKey, HEADER, RemoteStore, decode, encode, encode_header};

use crate::allocator::{Addr, AllocRequest, Allocation, DType, Device, Shape, TensorAllocator};
use crate::error::{AllocError, LayoutProblem};
use crate::meta::next_id;
use crate::stats::{AtomicStat, MemoryStats, Stat};
use cache::ReadCache;
use flusher::{Pending, Queue, Reason, Ticket};
use parking_lot::{Condvar, Mutex};
use std::collections::HashMap;
use std::hash::{BuildHasher, Hasher};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// How a [`RemoteBackend`] batches and waits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteConfig {
    /// The node number in [`Device::Remote`].
    pub node: u32,
    /// Send a batch when its oldest entry is this old (default 2 ms).
    pub flush_interval: Duration,
    /// Send a batch when it holds this many bytes (default 8 MiB).
    pub flush_bytes: usize,
    /// Send a batch when it holds this many writes and frees (default 1024).
    pub flush_ops: usize,
    /// A writer that finds more than this queued waits for the flush
    /// (default 64 MiB; at least `flush_bytes`). With `cache_bytes` it
    /// bounds the local memory that tensor bytes can take.
    pub max_queued_bytes: usize,
    /// The longest any call waits for the flusher (default 30 s).
    pub wait_timeout: Duration,
    /// Bytes of decoded chunks kept for reads (default 16 MiB; 0 disables).
    pub cache_bytes: usize,
    /// After a failed batch, timer flushes wait this long (default 50 ms).
    pub retry_backoff: Duration,
    /// The key namespace; `None` (default) draws a random one, so backends
    /// sharing a store never collide.
    pub namespace: Option<u64>,
}

impl Default for RemoteConfig {
    fn default() -> Self {
        RemoteConfig {
            node: 0,
            flush_interval: Duration::from_millis(2),
            flush_bytes: 8 << 20,
            flush_ops: 1024,
            max_queued_bytes: 64 << 20,
            wait_timeout: Duration::from_secs(30),
            cache_bytes: 16 << 20,
            retry_backoff: Duration::from_millis(50),
            namespace: None,
        }
    }
}

impl RemoteConfig {
    /// Checks the settings; the error names the rule broken.
    pub fn validate(&self) -> Result<(), AllocError> {
        let bad = |what| Err(AllocError::Unsupported { what });
        if self.flush_interval.is_zero() || self.flush_interval > Duration::from_secs(1) {
            return bad("RemoteConfig: flush_interval must be above 0 and at most 1 s");
        }
        if self.flush_bytes == 0 || self.flush_ops == 0 {
            return bad("RemoteConfig: flush_bytes and flush_ops must be at least 1");
        }
        if self.max_queued_bytes < self.flush_bytes {
            return bad("RemoteConfig: max_queued_bytes must be at least flush_bytes");
        }
        if self.wait_timeout.is_zero() {
            return bad("RemoteConfig: wait_timeout must be above 0");
        }
        Ok(())
    }
}

/// Counters of what the backend sent and served.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RemoteStats {
    /// Batches sent to the store (empty flushes excluded).
    pub batches: u64,
    /// Batches the store failed.
    pub failed_batches: u64,
    /// Flushes by trigger: size, count, timer, read, synchronize, drop,
    /// back-pressure.
    pub flushes: [u64; 7],
    /// Chunks written to the store.
    pub chunks_put: u64,
    /// Chunk keys deleted.
    pub keys_deleted: u64,
    /// `get` calls to the store (reads and read-modify-writes).
    pub store_gets: u64,
    /// Chunks read from the cache.
    pub cache_hits: u64,
    /// Chunks fetched from the store by reads.
    pub cache_misses: u64,
    /// Bytes in the read cache now.
    pub cache_bytes: usize,
    /// Live tensors now.
    pub live: usize,
}

#[derive(Debug, Default)]
struct Counters {
    batches: AtomicU64,
    failed_batches: AtomicU64,
    flushes: [AtomicU64; 7],
    chunks_put: AtomicU64,
    keys_deleted: AtomicU64,
    store_gets: AtomicU64,
    cache_hits: AtomicU64,
    cache_misses: AtomicU64,
}

/// Which chunks of a tensor are queued or stored: one word inline (tensors
/// up to 64 chunks = 64 MiB), a boxed bitmap beyond.
#[derive(Debug)]
enum Bits {
    Inline(u64),
    Heap(Box<[u64]>),
}

impl Bits {
    fn new(chunks: usize) -> Self {
        if chunks <= 64 {
            Bits::Inline(0)
        } else {
            Bits::Heap(vec![0; chunks.div_ceil(64)].into_boxed_slice())
        }
    }
    fn get(&self, i: u32) -> bool {
        let (w, b) = ((i / 64) as usize, i % 64);
        match self {
            Bits::Inline(x) => w == 0 && x >> b & 1 == 1,
            Bits::Heap(v) => v.get(w).is_some_and(|x| x >> b & 1 == 1),
        }
    }
    /// Sets bit `i`; whether it was clear.
    fn set(&mut self, i: u32) -> bool {
        let (w, b) = ((i / 64) as usize, i % 64);
        let word = match self {
            Bits::Inline(x) => x,
            Bits::Heap(v) => &mut v[w],
        };
        let was = *word >> b & 1 == 1;
        *word |= 1 << b;
        !was
    }
}

/// One live tensor: metadata only.
#[derive(Debug)]
struct Entry {
    size: u64,
    align_log2: u8,
    realized: bool,
    /// Bumped by every write; read-cache hits need the current value.
    generation: u32,
    present: Bits,
    /// The batch holding this tensor's latest queued write.
    pending: Option<Arc<Ticket>>,
    /// A failed batch's error, reported on the next use.
    failed: Option<Box<AllocError>>,
    /// Shape and dtype, boxed so an entry stays small (56 B) when the
    /// request carries neither.
    meta: Option<Box<(Option<Shape>, Option<DType>)>>,
}

const _: () = assert!(core::mem::size_of::<Entry>() <= 64);

impl Entry {
    fn chunks(&self) -> usize {
        (self.size as usize).div_ceil(CHUNK)
    }
    fn chunk_len(&self, c: u32) -> usize {
        let start = c as usize * CHUNK;
        CHUNK.min(self.size as usize - start)
    }
}

/// Spreads sequential ids over hash-table buckets (one multiply + fold).
#[derive(Debug, Clone, Copy, Default)]
struct IdHash;
#[derive(Debug, Default)]
struct IdHasher(u64);
impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.write_u64(self.0 ^ u64::from(b));
        }
    }
    fn write_u64(&mut self, v: u64) {
        let h = v.wrapping_mul(0x9E37_79B9_7F4A_7C15);
        self.0 = h ^ (h >> 29);
    }
}
impl BuildHasher for IdHash {
    type Hasher = IdHasher;
    fn build_hasher(&self) -> IdHasher {
        IdHasher(0)
    }
}

const SHARDS: usize = 64;
/// One shard: its tensors and their byte and count statistics, all under
/// the shard's lock, so an allocation touches no shared atomic.
#[derive(Debug, Default)]
struct ShardState {
    map: HashMap<u64, Entry, IdHash>,
    bytes: Stat,
    count: Stat,
}

impl ShardState {
    fn add(&mut self, size: u64) {
        for (s, n) in [(&mut self.bytes, size), (&mut self.count, 1)] {
            s.current += n;
            s.allocated += n;
            s.peak = s.peak.max(s.current);
        }
    }
    fn sub(&mut self, size: u64) {
        for (s, n) in [(&mut self.bytes, size), (&mut self.count, 1)] {
            s.current -= n;
            s.freed += n;
        }
    }
}

impl core::ops::Deref for ShardState {
    type Target = HashMap<u64, Entry, IdHash>;
    fn deref(&self) -> &Self::Target {
        &self.map
    }
}
impl core::ops::DerefMut for ShardState {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.map
    }
}

/// Sums per-shard statistics. `peak` is the sum of the shards' peaks: an
/// upper bound of the true peak (equal when one shard dominates).
fn sum_stats<'a>(it: impl Iterator<Item = &'a Stat>) -> Stat {
    it.fold(Stat::default(), |a, s| Stat {
        current: a.current + s.current,
        peak: a.peak + s.peak,
        allocated: a.allocated + s.allocated,
        freed: a.freed + s.freed,
    })
}

type Shard = Mutex<ShardState>;

/// State shared with the flusher thread.
struct Shared<S> {
    store: S,
    ns: u64,
    cfg: RemoteConfig,
    shards: [Shard; SHARDS],
    queue: Mutex<Queue>,
    /// Wakes the flusher.
    wake: Condvar,
    cache: Mutex<ReadCache>,
    counters: Counters,
    reserved: AtomicStat,
}

impl<S> core::fmt::Debug for Shared<S> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Shared")
            .field("ns", &self.ns)
            .field("cfg", &self.cfg)
            .finish_non_exhaustive()
    }
}

impl<S: RemoteStore> Shared<S> {
    fn shard(&self, id: u64) -> &Shard {
        &self.shards[id as usize % SHARDS]
    }
    fn device(&self) -> Device {
        Device::Remote(self.cfg.node)
    }
    /// Records a failed batch's error on `id` (if still live).
    fn mark_failed(&self, id: u64, e: &AllocError) {
        if let Some(en) = self.shard(id).lock().get_mut(&id) {
            en.failed.get_or_insert_with(|| Box::new(e.clone()));
        }
    }
    /// `err` has been returned to a waiter of `id`'s batch: the id need not
    /// report it again on its next use.
    fn told(&self, id: u64, err: AllocError) -> AllocError {
        if let Some(e) = self.shard(id).lock().get_mut(&id)
            && e.failed.as_deref() == Some(&err)
        {
            e.failed = None;
        }
        err
    }
    /// Checks `a` against the record of its id: device, id, address, size,
    /// alignment and backend tag. Changes nothing.
    fn verify<'m>(
        &self,
        map: &'m mut HashMap<u64, Entry, IdHash>,
        a: &Allocation,
    ) -> Result<&'m mut Entry, AllocError> {
        let id = a.id().get();
        if a.device() != self.device() {
            return Err(AllocError::WrongDevice {
                id,
                expected: self.device(),
                found: a.device(),
            });
        }
        let e = map.get_mut(&id).ok_or(AllocError::UnknownId {
            id,
            device: self.device(),
        })?;
        let mismatch = |field, given: u64, recorded: u64| {
            Err(AllocError::Mismatch {
                id,
                field,
                given,
                recorded,
            })
        };
        if a.tag() != self.ns {
            return mismatch("backend namespace", a.tag(), self.ns);
        }
        if a.addr() != Addr::Remote(id) {
            let given = match a.addr() {
                Addr::Remote(x) | Addr::Device(x) => x,
                Addr::Host(p) => p.as_ptr() as u64,
                Addr::None => 0,
            };
            return mismatch("address", given, id);
        }
        if a.size() as u64 != e.size {
            return mismatch("size", a.size() as u64, e.size);
        }
        if a.align() != 1usize << e.align_log2 {
            return mismatch("align", a.align() as u64, 1u64 << e.align_log2);
        }
        Ok(e)
    }
}

/// Tensors in a [`RemoteStore`], addressed by locally issued ids.
/// See the [module docs](self).
pub struct RemoteBackend<S: RemoteStore = MemoryStore> {
    sh: Arc<Shared<S>>,
    flusher: Option<std::thread::JoinHandle<()>>,
}

impl<S: RemoteStore> core::fmt::Debug for RemoteBackend<S> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("RemoteBackend")
            .field("store", &self.sh.store.name())
            .field("namespace", &format_args!("{:016x}", self.sh.ns))
            .field("node", &self.sh.cfg.node)
            .finish_non_exhaustive()
    }
}

impl RemoteBackend<MemoryStore> {
    /// A backend on a fresh in-process store with the default settings.
    pub fn in_memory() -> Result<Self, AllocError> {
        Self::new(MemoryStore::new(), RemoteConfig::default())
    }
}

/// A namespace no other backend in this or another process draws (with
/// overwhelming probability): std's randomly keyed hasher over the time,
/// the process id and a counter.
fn random_namespace() -> u64 {
    static N: AtomicU64 = AtomicU64::new(0);
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    h.write_u128(t);
    h.write_u32(std::process::id());
    h.write_u64(N.fetch_add(1, Ordering::Relaxed));
    h.finish()
}

impl<S: RemoteStore> RemoteBackend<S> {
    /// A backend on `store`: validates `cfg`, checks the store answers
    /// (`health`), and starts the flusher thread.
    pub fn new(store: S, cfg: RemoteConfig) -> Result<Self, AllocError> {
        cfg.validate()?;
        store.health()?;
        let sh = Arc::new(Shared {
            store,
            ns: cfg.namespace.unwrap_or_else(random_namespace),
            cache: Mutex::new(ReadCache::new(cfg.cache_bytes)),
            cfg,
            shards: std::array::from_fn(|_| Mutex::new(ShardState::default())),
            queue: Mutex::new(Queue::new()),
            wake: Condvar::new(),
            counters: Counters::default(),
            reserved: AtomicStat::new(),
        });
        let s2 = sh.clone();
        let flusher = std::thread::Builder::new()
            .name("tensorpool-remote-flush".into())
            .spawn(move || flusher::run(s2))
            .map_err(|e| AllocError::BackendUnavailable {
                backend: "remote",
                reason: format!("cannot start the flusher thread: {e}"),
            })?;
        Ok(RemoteBackend {
            sh,
            flusher: Some(flusher),
        })
    }

    /// The store.
    pub fn store(&self) -> &S {
        &self.sh.store
    }
    /// This backend's key namespace.
    pub fn namespace(&self) -> u64 {
        self.sh.ns
    }
    /// The settings.
    pub fn config(&self) -> &RemoteConfig {
        &self.sh.cfg
    }
    /// The store key of chunk `chunk` of `a` (for tools and tests).
    pub fn chunk_key(&self, a: &Allocation, chunk: u32) -> ChunkKey {
        ChunkKey {
            ns: self.sh.ns,
            id: a.id().get(),
            chunk,
        }
    }
    /// Whether `a` has been written (Realized) rather than Lazy.
    pub fn is_realized(&self, a: &Allocation) -> Result<bool, AllocError> {
        let mut m = self.sh.shard(a.id().get()).lock();
        Ok(self.sh.verify(&mut m, a)?.realized)
    }
    /// The shape and dtype recorded at allocation.
    pub fn shape(&self, a: &Allocation) -> Result<(Option<Shape>, Option<DType>), AllocError> {
        let mut m = self.sh.shard(a.id().get()).lock();
        let e = self.sh.verify(&mut m, a)?;
        Ok(e.meta.as_deref().copied().unwrap_or_default())
    }
    /// Counters of batches, flushes, chunks and cache use.
    pub fn remote_stats(&self) -> RemoteStats {
        let c = &self.sh.counters;
        let r = |a: &AtomicU64| a.load(Ordering::Relaxed);
        RemoteStats {
            batches: r(&c.batches),
            failed_batches: r(&c.failed_batches),
            flushes: core::array::from_fn(|i| r(&c.flushes[i])),
            chunks_put: r(&c.chunks_put),
            keys_deleted: r(&c.keys_deleted),
            store_gets: r(&c.store_gets),
            cache_hits: r(&c.cache_hits),
            cache_misses: r(&c.cache_misses),
            cache_bytes: self.sh.cache.lock().bytes(),
            live: self.sh.shards.iter().map(|s| s.lock().map.len()).sum(),
        }
    }

    /// Asks the flusher to send the open batch now and returns its ticket.
    fn flush_now(&self, r: Reason) -> Arc<Ticket> {
        let mut q = self.sh.queue.lock();
        q.want(r);
        self.sh.wake.notify_one();
        q.ticket.clone()
    }

    fn wait(&self, t: &Ticket, what: &'static str) -> Result<(), AllocError> {
        t.wait(self.sh.cfg.wait_timeout, what)
    }

    /// Checks a read of `dst.len()` bytes at `offset` of `a` and notes what
    /// it needs: `None` for an empty read; the batch to wait for if the
    /// tensor has a queued write.
    fn plan<'d>(
        &self,
        a: &Allocation,
        offset: usize,
        dst: &'d mut [u8],
    ) -> Result<Option<ReadPlan<'d>>, AllocError> {
        let id = a.id().get();
        let mut m = self.sh.shard(id).lock();
        let e = self.sh.verify(&mut m, a)?;
        if let Some(f) = e.failed.take() {
            return Err(*f);
        }
        a.check_range(offset, dst.len())?;
        if dst.is_empty() {
            return Ok(None);
        }
        if !e.realized {
            return Err(AllocError::NotWritten {
                id,
                offset,
                end: offset + dst.len(),
            });
        }
        let chunks = chunk_span(offset, dst.len())
            .map(|c| (c, e.chunk_len(c), e.present.get(c)))
            .collect();
        let pending = e.pending.take().filter(|t| !t.is_done());
        e.pending.clone_from(&pending);
        let plan = ReadPlan {
            id,
            generation: e.generation,
            offset,
            dst,
            chunks,
            pending,
        };
        Ok(Some(plan))
    }

    /// Read-your-writes: sends the open batch if it holds one of `pending`,
    /// then waits for each. A waiter told of a failure is not told again.
    fn await_writes(&self, pending: &[(u64, Arc<Ticket>)]) -> Result<(), AllocError> {
        if pending.is_empty() {
            return Ok(());
        }
        {
            let mut q = self.sh.queue.lock();
            if pending.iter().any(|(_, t)| Arc::ptr_eq(t, &q.ticket)) {
                q.want(Reason::Read);
                self.sh.wake.notify_one();
            }
        }
        for (id, t) in pending {
            self.wait(t, "remote read waiting for its pending write")
                .map_err(|err| self.sh.told(*id, err))?;
        }
        Ok(())
    }

    /// Fills every plan's `dst`: cached chunks from the cache, the others in
    /// one store `get` (verified, then cached if no write came in since the
    /// plan was made), never-written chunks as zeros.
    fn fetch(&self, plans: &mut [ReadPlan<'_>]) -> Result<(), AllocError> {
        // (plan, chunk, length) of every stored chunk not in the cache.
        let mut need: Vec<(usize, u32, usize)> = Vec::new();
        let mut got: HashMap<(u64, u32), cache::Value> = HashMap::new();
        let mut seen: std::collections::HashSet<(u64, u32)> = Default::default();
        {
            let cache = self.sh.cache.lock();
            for (i, p) in plans.iter().enumerate() {
                for &(c, len, stored) in &p.chunks {
                    if !stored || !seen.insert((p.id, c)) {
                        continue;
                    }
                    match cache.get(p.id, c, p.generation) {
                        Some(v) => {
                            got.insert((p.id, c), v);
                        }
                        None => need.push((i, c, len)),
                    }
                }
            }
        }
        self.sh
            .counters
            .cache_hits
            .fetch_add(got.len() as u64, Ordering::Relaxed);
        if !need.is_empty() {
            let keys: Vec<ChunkKey> = need
                .iter()
                .map(|&(i, chunk, _)| ChunkKey {
                    ns: self.sh.ns,
                    id: plans[i].id,
                    chunk,
                })
                .collect();
            self.sh.counters.store_gets.fetch_add(1, Ordering::Relaxed);
            self.sh
                .counters
                .cache_misses
                .fetch_add(keys.len() as u64, Ordering::Relaxed);
            let vals = self.sh.store.get(&keys)?;
            let mut fresh = Vec::with_capacity(keys.len());
            for ((key, &(i, c, len)), v) in keys.iter().zip(&need).zip(vals) {
                let v = v.ok_or_else(|| AllocError::Integrity {
                    what: format!("remote chunk {key}"),
                    detail: "written and flushed but missing from the store (evicted, flushed or deleted outside tensorpool)".into(),
                })?;
                decode(key, &v, len)?;
                fresh.push((i, c, Arc::new(v)));
            }
            for (i, c, v) in fresh {
                let (id, generation) = (plans[i].id, plans[i].generation);
                if self.sh.cfg.cache_bytes > 0 {
                    // Cache only if no write came in since the plan was made.
                    let m = self.sh.shard(id).lock();
                    if m.get(&id).is_some_and(|e| e.generation == generation) {
                        self.sh.cache.lock().insert(id, c, generation, v.clone());
                    }
                }
                got.insert((id, c), v);
            }
        }
        for p in plans.iter_mut() {
            let end = p.offset + p.dst.len();
            for &(c, _, stored) in &p.chunks {
                let cs = c as usize * CHUNK;
                let (s, e) = (p.offset.max(cs), end.min(cs + CHUNK));
                let out = &mut p.dst[s - p.offset..e - p.offset];
                if !stored {
                    out.fill(0);
                    continue;
                }
                let v = got.get(&(p.id, c)).ok_or(AllocError::Backend {
                    backend: "remote",
                    op: "read",
                    message: format!("chunk {c} of tensor {} not fetched", p.id),
                })?;
                out.copy_from_slice(&v[HEADER + s - cs..HEADER + e - cs]);
            }
        }
        Ok(())
    }

    /// Many reads in one store round trip (one pipeline of `GET`s): each
    /// `(allocation, offset, dst)` is checked as [`TensorAllocator::read`]
    /// checks it; the first error stops the call before anything is fetched.
    ///
    /// ```
    /// # use tensorpool::backend::remote::RemoteBackend;
    /// # use tensorpool::{AllocRequest, TensorAllocator};
    /// let b = RemoteBackend::in_memory().unwrap();
    /// let (x, y) = (b.allocate(&AllocRequest::bytes(8)).unwrap(), b.allocate(&AllocRequest::bytes(8)).unwrap());
    /// b.write(&x, 0, &[1; 8]).unwrap();
    /// b.write(&y, 0, &[2; 8]).unwrap();
    /// let (mut bx, mut by) = ([0u8; 8], [0u8; 4]);
    /// b.read_many(&mut [(x, 0, &mut bx[..]), (y, 4, &mut by[..])]).unwrap();
    /// assert_eq!((bx, by), ([1; 8], [2; 4]));
    /// ```
    pub fn read_many(
        &self,
        reads: &mut [(Allocation, usize, &mut [u8])],
    ) -> Result<(), AllocError> {
        let mut plans = Vec::with_capacity(reads.len());
        let mut pending = Vec::new();
        for (a, off, dst) in reads.iter_mut() {
            if let Some(mut p) = self.plan(a, *off, dst)? {
                if let Some(t) = p.pending.take() {
                    pending.push((p.id, t));
                }
                plans.push(p);
            }
        }
        self.await_writes(&pending)?;
        self.fetch(&mut plans)
    }
}

/// One read: which tensor, at which write generation, where, and the
/// covering chunks as (index, length, stored?).
#[derive(Debug)]
struct ReadPlan<'d> {
    id: u64,
    generation: u32,
    offset: usize,
    dst: &'d mut [u8],
    chunks: Vec<(u32, usize, bool)>,
    /// The batch holding the tensor's queued write, if not yet sent.
    pending: Option<Arc<Ticket>>,
}

impl<S: RemoteStore> Drop for RemoteBackend<S> {
    fn drop(&mut self) {
        {
            let mut q = self.sh.queue.lock();
            q.shutdown = true;
            self.sh.wake.notify_one();
        }
        if let Some(h) = self.flusher.take() {
            let _ = h.join();
        }
    }
}

/// Chunk indices covering `offset..offset+len` (len ≥ 1).
fn chunk_span(offset: usize, len: usize) -> core::ops::RangeInclusive<u32> {
    (offset / CHUNK) as u32..=((offset + len - 1) / CHUNK) as u32
}

// SAFETY: no allocation carries a host address (`Addr::Remote` always), so
// the trait's address guarantees hold vacuously; ids come from the
// process-wide issuer (unique, never reused).
unsafe impl<S: RemoteStore> TensorAllocator for RemoteBackend<S> {
    fn device(&self) -> Device {
        self.sh.device()
    }

    fn allocate(&self, req: &AllocRequest) -> Result<Allocation, AllocError> {
        req.check_align()?;
        let bad = |problem| AllocError::InvalidLayout {
            size: req.size,
            align: req.align,
            problem,
        };
        if req.align > 1 << 30 {
            return Err(bad(LayoutProblem::AlignTooLarge { max: 1 << 30 }));
        }
        // Chunk indices are u32 and chunk offsets must fit usize.
        let chunks = req.size.div_ceil(CHUNK);
        if u32::try_from(chunks).is_err() || req.size > isize::MAX as usize {
            return Err(bad(LayoutProblem::SizeOverflow));
        }
        let id = next_id().ok_or(AllocError::Unsupported {
            what: "tensor id space exhausted (2^64 ids issued)",
        })?;
        let e = Entry {
            size: req.size as u64,
            align_log2: req.align.trailing_zeros() as u8,
            realized: req.zeroed,
            generation: 0,
            present: Bits::new(chunks),
            pending: None,
            failed: None,
            meta: (req.shape.is_some() || req.dtype.is_some())
                .then(|| Box::new((req.shape, req.dtype))),
        };
        let mut m = self.sh.shard(id.get()).lock();
        m.insert(id.get(), e);
        m.add(req.size as u64);
        drop(m);
        Ok(Allocation::new(
            id,
            Addr::Remote(id.get()),
            req.size,
            req.align,
            self.device(),
            self.sh.ns,
        ))
    }

    unsafe fn deallocate(&self, a: &Allocation) -> Result<(), AllocError> {
        let id = a.id().get();
        let e = {
            let mut m = self.sh.shard(id).lock();
            self.sh.verify(&mut m, a)?;
            let e = m.remove(&id).ok_or(AllocError::UnknownId {
                id,
                device: self.device(),
            })?;
            m.sub(e.size);
            e
        };
        let chunks = e.chunks() as u32;
        let present: Vec<u32> = (0..chunks).filter(|&c| e.present.get(c)).collect();
        if present.is_empty() {
            // Lazy, zeroed-and-never-written or zero-size: nothing stored.
            return Ok(());
        }
        let stored: u64 = present.iter().map(|&c| e.chunk_len(c) as u64).sum();
        self.sh.reserved.sub(stored);
        {
            let mut cache = self.sh.cache.lock();
            for &c in &present {
                cache.remove(id, c);
            }
        }
        let mut q = self.sh.queue.lock();
        let first = q.oldest.is_none();
        for &c in &present {
            if let Some(p) = q.writes.remove(&(id, c)) {
                q.bytes -= p.buf.len();
            }
            q.frees.push(ChunkKey {
                ns: self.sh.ns,
                id,
                chunk: c,
            });
        }
        q.touch();
        // The first entry of a batch arms the timer; a threshold sends it.
        if first || q.over(self.sh.cfg.flush_bytes, self.sh.cfg.flush_ops) {
            self.sh.wake.notify_one();
        }
        Ok(())
    }

    /// Allocated bytes and counts are summed over the table's shards (their
    /// `peak` is the sum of per-shard peaks: an upper bound); reserved bytes
    /// are the bytes of chunks queued or stored.
    fn stats(&self) -> MemoryStats {
        let (bytes, count): (Vec<Stat>, Vec<Stat>) = self
            .sh
            .shards
            .iter()
            .map(|s| {
                let s = s.lock();
                (s.bytes, s.count)
            })
            .unzip();
        let bytes = sum_stats(bytes.iter());
        MemoryStats {
            device: Some(self.device()),
            allocated_bytes: bytes,
            active_bytes: bytes,
            reserved_bytes: self.sh.reserved.get(),
            allocation: sum_stats(count.iter()),
            cache_hits: self.sh.counters.cache_hits.load(Ordering::Relaxed),
            cache_misses: self.sh.counters.cache_misses.load(Ordering::Relaxed),
            ..MemoryStats::default()
        }
    }

    /// Empties the read cache; returns the bytes it held.
    fn trim(&self) -> usize {
        self.sh.cache.lock().clear()
    }

    fn write(&self, a: &Allocation, offset: usize, src: &[u8]) -> Result<(), AllocError> {
        let id = a.id().get();
        {
            let mut m = self.sh.shard(id).lock();
            let e = self.sh.verify(&mut m, a)?;
            if let Some(f) = e.failed.take() {
                return Err(*f);
            }
        }
        a.check_range(offset, src.len())?;
        if src.is_empty() {
            return Ok(());
        }
        let size = a.size();
        // Whole chunks are copied here, outside any lock; partial ones are
        // merged under the queue lock (at most two per write).
        let pieces: Vec<(u32, usize, usize, Option<Vec<u8>>)> = chunk_span(offset, src.len())
            .map(|c| {
                let cs = c as usize * CHUNK;
                let clen = CHUNK.min(size - cs);
                let (s, e) = (offset.max(cs), (offset + src.len()).min(cs + clen));
                let whole = (s == cs && e == cs + clen).then(|| {
                    let mut v = vec![0u8; HEADER + clen];
                    v[HEADER..].copy_from_slice(&src[s - offset..e - offset]);
                    v
                });
                (c, s - cs, e - cs, whole)
            })
            .collect();
        let mut m = self.sh.shard(id).lock();
        let e = self.sh.verify(&mut m, a)?;
        e.realized = true;
        e.generation = e.generation.wrapping_add(1);
        let mut newly = 0u64;
        let mut base = Vec::with_capacity(pieces.len());
        for &(c, ..) in &pieces {
            let fresh = e.present.set(c);
            if fresh {
                newly += e.chunk_len(c) as u64;
            }
            base.push(!fresh);
        }
        let chunk_lens: Vec<usize> = pieces.iter().map(|&(c, ..)| e.chunk_len(c)).collect();
        {
            let mut cache = self.sh.cache.lock();
            for &(c, ..) in &pieces {
                cache.remove(id, c);
            }
        }
        let mut q = self.sh.queue.lock();
        let first = q.oldest.is_none();
        for (((c, s, en, whole), in_store), clen) in pieces.into_iter().zip(base).zip(chunk_lens) {
            let slice = &src[c as usize * CHUNK + s - offset..c as usize * CHUNK + en - offset];
            let old = q.writes.remove(&(id, c));
            let old_len = old.as_ref().map_or(0, |p| p.buf.len());
            let p = match (whole, old) {
                (Some(buf), _) => Pending {
                    buf,
                    dirty: vec![(0, clen as u32)],
                    base_in_store: false,
                },
                (None, Some(mut p)) => {
                    p.buf[HEADER + s..HEADER + en].copy_from_slice(slice);
                    p.mark(s as u32, en as u32);
                    p
                }
                (None, None) => {
                    let mut buf = vec![0u8; HEADER + clen];
                    buf[HEADER + s..HEADER + en].copy_from_slice(slice);
                    Pending {
                        buf,
                        dirty: vec![(s as u32, en as u32)],
                        base_in_store: in_store,
                    }
                }
            };
            q.bytes = q.bytes - old_len + p.buf.len();
            q.writes.insert((id, c), p);
            q.touch();
        }
        e.pending = Some(q.ticket.clone());
        drop(m);
        self.sh.reserved.add(newly);
        let over_limit = q.bytes > self.sh.cfg.max_queued_bytes;
        if over_limit {
            q.want(Reason::Backpressure);
        }
        // The flusher is woken when the batch starts (to arm its timer) or
        // crosses a threshold; otherwise its timer is already running.
        if first || over_limit || q.over(self.sh.cfg.flush_bytes, self.sh.cfg.flush_ops) {
            self.sh.wake.notify_one();
        }
        let t = q.ticket.clone();
        drop(q);
        if over_limit {
            // Back-pressure: this writer waits for its batch.
            self.wait(
                &t,
                "remote write back-pressure (queued bytes over max_queued_bytes)",
            )
            .map_err(|err| self.sh.told(id, err))?;
        }
        Ok(())
    }

    fn read(&self, a: &Allocation, offset: usize, dst: &mut [u8]) -> Result<(), AllocError> {
        let Some(mut plan) = self.plan(a, offset, dst)? else {
            return Ok(());
        };
        if let Some(t) = plan.pending.take() {
            self.await_writes(&[(plan.id, t)])?;
        }
        self.fetch(&mut [plan])
    }

    fn synchronize(&self) -> Result<(), AllocError> {
        let t = self.flush_now(Reason::Sync);
        let r = self.wait(&t, "remote synchronize");
        let deferred = self.sh.queue.lock().deferred.take();
        r.and(deferred.map_or(Ok(()), Err))
    }
}
