//! Prewarm plans: which blocks to map (and fault in) before the hot loop.
//!
//! Prewarming is always explicit: constructing a pool maps nothing.

use super::size_class::Category;

/// A plan: `count` blocks of `size` bytes for each entry.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Prewarm {
    entries: Vec<(usize, usize)>,
}

impl Prewarm {
    /// The counts per category the original system prewarmed by default
    /// (VerySmall, Small, Medium, Large, VeryLarge). With
    /// [`Prewarm::per_category`] that is 256×4 KiB + 128×64 KiB + 64×1 MiB +
    /// 32×16 MiB + 16×64 MiB ≈ 1.6 GiB: use it only on a machine that wants it.
    pub const ORIGINAL_COUNTS: [usize; Category::COUNT] = [256, 128, 64, 32, 16];

    /// An empty plan.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `count` blocks of `size` bytes.
    pub fn blocks(mut self, size: usize, count: usize) -> Self {
        if count > 0 {
            self.entries.push((size, count));
        }
        self
    }

    /// `counts[i]` blocks of category `i`'s largest size (4 KiB, 64 KiB,
    /// 1 MiB, 16 MiB; 64 MiB for VeryLarge).
    pub fn per_category(counts: [usize; Category::COUNT]) -> Self {
        let sizes = [4 << 10, 64 << 10, 1 << 20, 16 << 20, 64 << 20];
        sizes
            .into_iter()
            .zip(counts)
            .fold(Self::new(), |p, (s, n)| p.blocks(s, n))
    }

    /// Exactly what a recorded workload needs: its peak number of live blocks
    /// of each size, from a sequence of `(size, +1 alloc / -1 free)` events.
    pub fn from_events(events: impl IntoIterator<Item = (usize, i64)>) -> Self {
        use std::collections::BTreeMap;
        let mut live: BTreeMap<usize, (i64, i64)> = BTreeMap::new();
        for (size, d) in events {
            let e = live.entry(size).or_default();
            e.0 += d;
            e.1 = e.1.max(e.0);
        }
        live.into_iter().fold(Self::new(), |p, (s, (_, peak))| {
            p.blocks(s, peak.max(0) as usize)
        })
    }

    /// The `(size, count)` entries.
    pub fn entries(&self) -> &[(usize, usize)] {
        &self.entries
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plans() {
        assert_eq!(
            Prewarm::per_category([1, 0, 2, 0, 0]).entries(),
            &[(4096, 1), (1 << 20, 2)]
        );
        let p = Prewarm::from_events([
            (64, 1),
            (64, 1),
            (64, -1),
            (64, 1),
            (64, 1),
            (8, 1),
            (8, -1),
        ]);
        assert_eq!(p.entries(), &[(8, 1), (64, 3)]);
    }
}
