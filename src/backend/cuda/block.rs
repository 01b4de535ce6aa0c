//! Blocks, segments and the two free-block pools, with PyTorch's constants
//! and size rules (c10/cuda/CUDACachingAllocator.cpp).
//!
//! A segment is one driver allocation; it is tiled by blocks linked by
//! `prev`/`next` in address order:
//! `Σ block.size over a segment == segment size`,
//! `next.ptr == ptr + size`, and every block of a segment has the segment's
//! stream and pool. A free block sits in exactly one [`FreeSet`], keyed by
//! `(stream, size, ptr)` — PyTorch's `BlockComparatorSize` — so a
//! `lower_bound` on `(stream, size, 0)` is the best fit on that stream.

use super::driver::{DevPtr, StreamId};
use std::collections::BTreeMap;

/// Smallest block; every size is a multiple of it (`kMinBlockSize`).
pub const MIN_BLOCK_SIZE: usize = 512;
/// Largest request served from the small pool (`kSmallSize`).
pub const SMALL_SIZE: usize = 1 << 20;
/// Segment size of the small pool (`kSmallBuffer`).
pub const SMALL_BUFFER: usize = 2 << 20;
/// Segment size for 1–10 MiB requests (`kLargeBuffer`).
pub const LARGE_BUFFER: usize = 20 << 20;
/// Requests from here on get their own segment (`kMinLargeAlloc`).
pub const MIN_LARGE_ALLOC: usize = 10 << 20;
/// Rounding of those segments (`kRoundLarge`).
pub const ROUND_LARGE: usize = 2 << 20;

/// Which of the two pools.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PoolKind {
    /// Requests ≤ 1 MiB, 2 MiB segments.
    Small,
    /// Everything else.
    Large,
}

impl PoolKind {
    /// The pool a rounded size is served from (`get_pool`).
    pub fn for_size(size: usize) -> PoolKind {
        if size <= SMALL_SIZE {
            PoolKind::Small
        } else {
            PoolKind::Large
        }
    }
    /// Index into per-pool stat arrays: all = 0, small = 1, large = 2.
    pub fn stat_index(self) -> usize {
        match self {
            PoolKind::Small => 1,
            PoolKind::Large => 2,
        }
    }
}

/// `round_size`: < 512 B → 512; else up to a multiple of 512, or with
/// `divisions > 1` up to the next of `divisions` equal steps between powers
/// of two (`roundup_power2_divisions`). `None` on overflow.
pub fn round_size(size: usize, divisions: usize) -> Option<usize> {
    if size < MIN_BLOCK_SIZE {
        return Some(MIN_BLOCK_SIZE);
    }
    if divisions > 1 && size > MIN_BLOCK_SIZE * divisions {
        return roundup_power2_next_division(size, divisions);
    }
    size.checked_next_multiple_of(MIN_BLOCK_SIZE)
}

fn roundup_power2_next_division(size: usize, divisions: usize) -> Option<usize> {
    if size.is_power_of_two() {
        return Some(size);
    }
    let floor = 1usize << (usize::BITS - 1 - size.leading_zeros());
    let step = floor >> (usize::BITS - 1 - divisions.leading_zeros());
    if step == 0 {
        return floor.checked_mul(2);
    }
    let down = size & !(step - 1);
    if down == size {
        Some(size)
    } else {
        down.checked_add(step)
    }
}

/// `get_allocation_size`: the segment size for a rounded request.
pub fn allocation_size(size: usize) -> Option<usize> {
    if size <= SMALL_SIZE {
        Some(SMALL_BUFFER)
    } else if size < MIN_LARGE_ALLOC {
        Some(LARGE_BUFFER)
    } else {
        size.checked_next_multiple_of(ROUND_LARGE)
    }
}

/// A hasher for `u64` keys (addresses, tensor ids): one multiply and a
/// rotate (Fibonacci hashing), several times cheaper than SipHash on the
/// pool's hot path. Keys are not attacker-chosen: addresses come from the
/// driver and ids from the process-wide issuer.
#[derive(Debug, Default, Clone, Copy)]
pub struct U64Hasher(u64);

impl core::hash::Hasher for U64Hasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.write_u64(u64::from(b));
        }
    }
    fn write_u64(&mut self, x: u64) {
        self.0 = (self.0 ^ x)
            .wrapping_mul(0x9E37_79B9_7F4A_7C15)
            .rotate_left(29);
    }
}

/// A map keyed by `u64` with [`U64Hasher`].
pub type U64Map<V> = std::collections::HashMap<u64, V, core::hash::BuildHasherDefault<U64Hasher>>;

/// An index into the block arena.
pub type BlockIdx = u32;

/// One block. See the module docs for the tiling invariants.
#[derive(Debug, Clone)]
pub struct Block {
    /// Start address.
    pub ptr: DevPtr,
    /// Bytes (a multiple of 512).
    pub size: usize,
    /// Bytes the caller asked for (0 when free).
    pub requested: usize,
    /// The stream the segment was allocated for.
    pub stream: StreamId,
    /// The pool the segment belongs to.
    pub pool: PoolKind,
    /// Handed out and not freed.
    pub allocated: bool,
    /// Previous block of the segment.
    pub prev: Option<BlockIdx>,
    /// Next block of the segment.
    pub next: Option<BlockIdx>,
    /// Events not yet completed that guard this block's reuse.
    pub event_count: u32,
    /// Other streams that used the block (`record_stream`).
    pub stream_uses: Vec<StreamId>,
    /// The owner's tensor id and alignment (for verifying handles).
    pub owner: u64,
    /// The owner's alignment.
    pub align: usize,
    /// Pool search count when the block was last handed out (GC age base).
    pub gc_base: u64,
}

impl Block {
    /// Part of a segment that has been split.
    pub fn is_split(&self) -> bool {
        self.prev.is_some() || self.next.is_some()
    }
}

/// A slab of blocks with a free-slot list.
#[derive(Debug, Default)]
pub struct Arena {
    slots: Vec<Option<Block>>,
    free: Vec<BlockIdx>,
}

impl Arena {
    /// Stores `b`; its index.
    pub fn insert(&mut self, b: Block) -> BlockIdx {
        if let Some(i) = self.free.pop() {
            self.slots[i as usize] = Some(b);
            i
        } else {
            self.slots.push(Some(b));
            (self.slots.len() - 1) as BlockIdx
        }
    }
    /// Removes block `i`.
    pub fn remove(&mut self, i: BlockIdx) -> Block {
        let b = self.slots[i as usize].take().expect("live block index");
        self.free.push(i);
        b
    }
    /// Block `i`.
    pub fn get(&self, i: BlockIdx) -> &Block {
        self.slots[i as usize].as_ref().expect("live block index")
    }
    /// Block `i` if that slot is live (for checking untrusted indices).
    pub fn try_get(&self, i: BlockIdx) -> Option<&Block> {
        self.slots.get(i as usize)?.as_ref()
    }
    /// Block `i`, mutably.
    pub fn get_mut(&mut self, i: BlockIdx) -> &mut Block {
        self.slots[i as usize].as_mut().expect("live block index")
    }
    /// Every live block with its index.
    pub fn iter(&self) -> impl Iterator<Item = (BlockIdx, &Block)> {
        self.slots
            .iter()
            .enumerate()
            .filter_map(|(i, b)| b.as_ref().map(|b| (i as BlockIdx, b)))
    }
}

/// A stream's free blocks below this count are a sorted vector (a search
/// is a binary search, an insert or remove a short `memmove`, no node
/// allocation); at it they move to a `BTreeMap`, and back below a quarter of
/// it, so the cost stays `O(log n)` for pools with many free blocks.
const VEC_MAX: usize = 256;

/// One stream's free blocks, keyed by `size << 64 | ptr`, in key order.
#[derive(Debug)]
enum OrdMap {
    Vec(Vec<(u128, BlockIdx)>),
    Tree(BTreeMap<u128, BlockIdx>),
}

impl OrdMap {
    fn insert(&mut self, k: u128, i: BlockIdx) -> bool {
        match self {
            OrdMap::Vec(v) => match v.binary_search_by_key(&k, |e| e.0) {
                Ok(_) => false,
                Err(at) => {
                    v.insert(at, (k, i));
                    if v.len() >= VEC_MAX {
                        *self = OrdMap::Tree(v.drain(..).collect());
                    }
                    true
                }
            },
            OrdMap::Tree(m) => m.insert(k, i).is_none(),
        }
    }
    fn remove(&mut self, k: u128) -> bool {
        match self {
            OrdMap::Vec(v) => match v.binary_search_by_key(&k, |e| e.0) {
                Ok(at) => {
                    v.remove(at);
                    true
                }
                Err(_) => false,
            },
            OrdMap::Tree(m) => {
                let there = m.remove(&k).is_some();
                if m.len() < VEC_MAX / 4 {
                    *self = OrdMap::Vec(std::mem::take(m).into_iter().collect());
                }
                there
            }
        }
    }
    fn get(&self, k: u128) -> Option<BlockIdx> {
        match self {
            OrdMap::Vec(v) => v.binary_search_by_key(&k, |e| e.0).ok().map(|at| v[at].1),
            OrdMap::Tree(m) => m.get(&k).copied(),
        }
    }
    /// The first entry with a key of at least `k`.
    fn first_at_least(&self, k: u128) -> Option<(u128, BlockIdx)> {
        match self {
            OrdMap::Vec(v) => v.get(v.partition_point(|e| e.0 < k)).copied(),
            OrdMap::Tree(m) => m.range(k..).next().map(|(&k, &i)| (k, i)),
        }
    }
    /// Entries with keys of at least `k`, in key order (slow paths only).
    fn from(&self, k: u128) -> Box<dyn DoubleEndedIterator<Item = (u128, BlockIdx)> + '_> {
        match self {
            OrdMap::Vec(v) => Box::new(v[v.partition_point(|e| e.0 < k)..].iter().copied()),
            OrdMap::Tree(m) => Box::new(m.range(k..).map(|(&k, &i)| (k, i))),
        }
    }
    fn len(&self) -> usize {
        match self {
            OrdMap::Vec(v) => v.len(),
            OrdMap::Tree(m) => m.len(),
        }
    }
}

/// Free blocks of one pool ordered by `(stream, size, ptr)`.
///
/// Stored as one ordered map per stream, in stream order, keyed by
/// `size << 64 | ptr` as one `u128`: the order is PyTorch's
/// `(stream, size, ptr)` exactly, but a search compares one integer instead
/// of a three-field tuple, and the hot path finds its stream's map with
/// one compare (streams are few; the last one used is tried first). Each
/// map is a sorted vector while small, a `BTreeMap` once large.
#[derive(Debug, Default)]
pub struct FreeSet {
    /// `(stream, blocks by size << 64 | ptr)`, sorted by stream. A stream's
    /// map stays (possibly empty) once created.
    streams: Vec<(StreamId, OrdMap)>,
    /// Index into `streams` of the last stream looked up.
    last: usize,
    /// Searches so far (`get_free_blocks_call_count`, the GC clock).
    pub searches: u64,
}

fn key(size: usize, ptr: DevPtr) -> u128 {
    ((size as u128) << 64) | u128::from(ptr)
}

fn size_of_key(k: u128) -> usize {
    (k >> 64) as usize
}

impl FreeSet {
    fn find(&self, stream: StreamId) -> Result<usize, usize> {
        match self.streams.get(self.last) {
            Some((s, _)) if *s == stream => Ok(self.last),
            _ => self.streams.binary_search_by_key(&stream, |(s, _)| *s),
        }
    }
    fn map(&self, stream: StreamId) -> Option<&OrdMap> {
        self.find(stream).ok().map(|i| &self.streams[i].1)
    }
    /// Adds a free block.
    pub fn insert(&mut self, b: &Block, i: BlockIdx) {
        let at = match self.find(b.stream) {
            Ok(at) => at,
            Err(at) => {
                self.streams.insert(at, (b.stream, OrdMap::Vec(Vec::new())));
                at
            }
        };
        self.last = at;
        let new = self.streams[at].1.insert(key(b.size, b.ptr), i);
        debug_assert!(new, "block in a free set twice");
    }
    /// Removes a free block; whether it was there.
    pub fn remove(&mut self, b: &Block) -> bool {
        let Ok(at) = self.find(b.stream) else {
            return false;
        };
        self.last = at;
        self.streams[at].1.remove(key(b.size, b.ptr))
    }
    /// The smallest free block on `stream` of at least `size` bytes.
    pub fn lower_bound(&self, stream: StreamId, size: usize) -> Option<(usize, BlockIdx)> {
        self.map(stream)?
            .first_at_least(key(size, 0))
            .map(|(k, i)| (size_of_key(k), i))
    }
    /// Free blocks on `stream`, largest first, with sizes ≥ `min`.
    pub fn largest_first(&self, stream: StreamId, min: usize) -> Vec<(usize, BlockIdx)> {
        self.map(stream).map_or_else(Vec::new, |m| {
            m.from(key(min, 0))
                .rev()
                .map(|(k, i)| (size_of_key(k), i))
                .collect()
        })
    }
    /// Free blocks on every stream but `not`, each stream's of at least
    /// `size` bytes, smallest first: `(stream, iterator of (size, index))`.
    pub fn other_streams(
        &self,
        not: StreamId,
        size: usize,
    ) -> impl Iterator<Item = impl Iterator<Item = (usize, BlockIdx)> + '_> + '_ {
        self.streams
            .iter()
            .filter(move |(s, _)| *s != not)
            .map(move |(_, m)| m.from(key(size, 0)).map(|(k, i)| (size_of_key(k), i)))
    }
    /// Every free block, in `(stream, size, ptr)` order.
    pub fn all(&self) -> impl Iterator<Item = BlockIdx> + '_ {
        self.streams
            .iter()
            .flat_map(|(_, m)| m.from(0).map(|(_, i)| i))
    }
    /// Number of free blocks.
    #[allow(clippy::len_without_is_empty)]
    pub fn len(&self) -> usize {
        self.streams.iter().map(|(_, m)| m.len()).sum()
    }
    /// Whether block `i` (as `b`) is in the set.
    pub fn contains(&self, b: &Block, i: BlockIdx) -> bool {
        self.map(b.stream).and_then(|m| m.get(key(b.size, b.ptr))) == Some(i)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The free-block map against a `BTreeMap` oracle across the switch
    /// from vector to tree and back (hysteresis included).
    #[test]
    fn ord_map_matches_a_btreemap_across_representations() {
        let mut m = OrdMap::Vec(Vec::new());
        let mut oracle = BTreeMap::new();
        let mut x = 0x2545_F491_4F6C_DD1Du64;
        let mut rnd = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let (mut promoted, mut demoted, mut was_tree) = (0, 0, false);
        for step in 0..5000u32 {
            // Grow for 1,000 steps, shrink for 1,500, twice.
            let grow = step % 2500 < 1000;
            let k = key((rnd() % 64) as usize * 512, rnd() % 4096 * 512);
            if grow || rnd() % 8 == 0 {
                assert_eq!(m.insert(k, step), oracle.insert(k, step).is_none());
            } else if let Some((&k, _)) = oracle.range(k..).next().or(oracle.iter().next()) {
                assert_eq!(m.remove(k), oracle.remove(&k).is_some());
            }
            assert_eq!(m.len(), oracle.len());
            let probe = key((rnd() % 64) as usize * 512, 0);
            let want = oracle.range(probe..).next().map(|(&k, &i)| (k, i));
            assert_eq!(m.first_at_least(probe), want);
            assert_eq!(m.get(k), oracle.get(&k).copied());
            let is_tree = matches!(m, OrdMap::Tree(_));
            promoted += u32::from(is_tree && !was_tree);
            demoted += u32::from(!is_tree && was_tree);
            was_tree = is_tree;
        }
        assert_eq!((promoted, demoted), (2, 2), "both switches, both ways");
        let got: Vec<_> = m.from(0).collect();
        let want: Vec<_> = oracle.iter().map(|(&k, &i)| (k, i)).collect();
        assert_eq!(got, want);
        let got: Vec<_> = m.from(key(4096, 0)).rev().collect();
        let want: Vec<_> = oracle
            .range(key(4096, 0)..)
            .rev()
            .map(|(&k, &i)| (k, i))
            .collect();
        assert_eq!(got, want);
    }

    #[test]
    fn pytorch_rounding_and_segment_sizes() {
        assert_eq!(round_size(1, 0), Some(512));
        assert_eq!(round_size(512, 0), Some(512));
        assert_eq!(round_size(513, 0), Some(1024));
        assert_eq!(round_size(usize::MAX, 0), None);
        // roundup_power2_divisions = 4: 1200 MiB → 1280 MiB (steps of 256 MiB).
        assert_eq!(round_size(1200 << 20, 4), Some(1280 << 20));
        assert_eq!(round_size(1024 << 20, 4), Some(1024 << 20));
        // Below 512 × divisions the plain rule holds.
        assert_eq!(round_size(1500, 4), Some(1536));
        assert_eq!(allocation_size(1 << 20), Some(2 << 20));
        assert_eq!(allocation_size((1 << 20) + 512), Some(20 << 20));
        assert_eq!(allocation_size((10 << 20) - 512), Some(20 << 20));
        assert_eq!(allocation_size(10 << 20), Some(10 << 20));
        assert_eq!(allocation_size((10 << 20) + 512), Some(12 << 20));
        assert_eq!(PoolKind::for_size(1 << 20), PoolKind::Small);
        assert_eq!(PoolKind::for_size((1 << 20) + 512), PoolKind::Large);
    }
}
