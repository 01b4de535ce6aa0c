//! Eviction frees memory: the process's resident set stays near the budget
//! while 4× the budget is written, and falls when everything is evicted.
//! In its own test binary so no other test's memory moves the RSS.

mod common;

use common::rss;
use tensorpool::backend::{HostBackend, OffloadBackend, OffloadConfig};
use tensorpool::{AllocRequest, TensorAllocator};

const MIB: usize = 1 << 20;

#[test]
fn eviction_frees_and_rss_falls() {
    let (t, budget) = (8 * MIB, 32 * MIB);
    let b = OffloadBackend::new(
        HostBackend::new(),
        OffloadConfig {
            prefetch_thread: false,
            ..OffloadConfig::with_budget(budget)
        },
    )
    .unwrap();
    let base = rss();
    let mut ts = Vec::new();
    let mut high = 0;
    for i in 0..16u8 {
        let a = b.allocate(&AllocRequest::bytes(t)).unwrap();
        b.write(&a, 0, &vec![i | 1; t]).unwrap();
        // Freed inner blocks go back to the pool; trim hands them to the OS.
        b.trim();
        high = high.max(rss().saturating_sub(base));
        ts.push(a);
    }
    let s = b.offload_stats();
    assert!(s.evictions >= 12, "{s:?}");
    // 128 MiB written through a 32 MiB budget: RSS grew by about the budget
    // (plus a staging vector of 8 MiB and slack), never by what was written.
    assert!(
        high <= budget + 24 * MIB,
        "RSS grew by {} MiB for a {} MiB budget",
        high / MIB,
        budget / MIB
    );
    let before = rss();
    b.evict_all().unwrap();
    b.trim();
    let after = rss();
    eprintln!(
        "RSS: +{} MiB at most while writing 128 MiB; {} → {} MiB on evict_all",
        high / MIB,
        before / MIB,
        after / MIB
    );
    assert!(
        before.saturating_sub(after) >= budget / 2,
        "evicting {} MiB resident lowered RSS only from {} to {} MiB",
        s.resident_bytes / MIB,
        before / MIB,
        after / MIB
    );
    let mut v = vec![0u8; t];
    for (i, a) in ts.iter().enumerate() {
        b.read(a, 0, &mut v).unwrap();
        assert!(v.iter().all(|&x| x == (i as u8) | 1), "tensor {i}");
    }
}
