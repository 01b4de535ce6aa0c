//! 1,000 short-lived threads allocate under `TensorGlobalAlloc` and exit.
//! Property: a thread's cache goes back to the central lists when it exits,
//! so later threads reuse those blocks and the memory the pool holds stays
//! bounded, instead of growing by a stranded cache per thread (each thread
//! below leaves several hundred KiB in its cache when it exits).

use tensorpool::TensorGlobalAlloc;

mod common;
use common::rss;

#[global_allocator]
static A: TensorGlobalAlloc = TensorGlobalAlloc::new();

/// What one short-lived thread does: allocate blocks of several classes,
/// free them (so they sit in its cache) and keep a few until it exits.
fn work(seed: usize) -> usize {
    let mut keep = Vec::new();
    let mut sum = 0usize;
    for round in 0..4 {
        let blocks: Vec<Vec<u8>> = [16usize, 64, 256, 1000, 4096, 20_000, 100_000, 300_000]
            .iter()
            .map(|&n| vec![(seed + round) as u8; n])
            .collect();
        sum += blocks.iter().map(|b| b.len()).sum::<usize>();
        keep.push(blocks[round % blocks.len()].clone());
    }
    let s: String = (0..200)
        .map(|i| char::from(b'a' + ((seed + i) % 26) as u8))
        .collect();
    sum + s.len() + keep.len()
}

fn run_threads(count: usize, concurrent: usize) {
    let mut done = 0;
    while done < count {
        let n = concurrent.min(count - done);
        let hs: Vec<_> = (0..n)
            .map(|i| std::thread::spawn(move || work(done + i)))
            .collect();
        for h in hs {
            assert!(h.join().unwrap() > 0);
        }
        done += n;
    }
}

#[test]
fn thousand_short_lived_threads_retain_bounded_memory() {
    // Warm up: the first threads map the spans everybody reuses afterwards.
    run_threads(16, 8);
    let warm = A.stats();
    let warm_rss = rss();
    run_threads(1_000, 8);
    let after = A.stats();
    let after_rss = rss();
    // One stranded cache per thread would be ≥ 1,000 × ~600 KiB ≈ 600 MiB.
    let grew = after.reserved_bytes.saturating_sub(warm.reserved_bytes);
    assert!(
        grew <= 64 << 20,
        "pool grew by {grew} B over 1,000 threads ({warm:?} → {after:?})"
    );
    let rss_grew = after_rss.saturating_sub(warm_rss);
    assert!(
        rss_grew <= 96 << 20,
        "RSS grew by {rss_grew} B ({warm_rss} → {after_rss})"
    );
    // And the exited threads' blocks are central (not stranded): trim can
    // give most of the pool back.
    eprintln!("warm {warm:?} rss {warm_rss}; after {after:?} rss {after_rss}");
    let trimmed = A.trim();
    let s = A.stats();
    assert!(
        trimmed > 0 && s.reserved_bytes < after.reserved_bytes,
        "trim gave back {trimmed} B; {after:?} → {s:?}"
    );
}
