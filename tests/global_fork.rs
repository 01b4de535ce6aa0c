//! `fork()` while other threads allocate, under `TensorGlobalAlloc`.
//! Property: the child finds every pool lock free and every list consistent
//! (the `pthread_atfork` handlers hold all of them across the fork), so it
//! can allocate and free, small, tensor-sized and huge, and exit 0. A child
//! that deadlocks is killed by `alarm` and fails the test instead of hanging.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use tensorpool::TensorGlobalAlloc;

#[global_allocator]
static A: TensorGlobalAlloc = TensorGlobalAlloc::new();

/// Allocation churn that takes the central and huge locks often: blocks of
/// 1 MiB and up bypass most of the thread cache, huge ones lock the cache.
fn churn(stop: &AtomicBool, seed: usize) {
    let sizes = [24usize, 4096, 300_000, 1 << 20, 3 << 20, 16 << 20, 70 << 20];
    let mut i = seed;
    let mut held: Vec<Vec<u8>> = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        let n = sizes[i % sizes.len()];
        let mut v = Vec::with_capacity(n);
        v.push(i as u8);
        held.push(v);
        if held.len() > 6 {
            held.remove(i % 3);
        }
        i = i.wrapping_mul(7).wrapping_add(3);
    }
}

/// What the child does; returns whether every check held.
fn child_work() -> bool {
    let mut ok = true;
    for round in 0..50usize {
        let v: Vec<u64> = (0..10_000).map(|x| x * round as u64).collect();
        ok &= v[9_999] == 9_999 * round as u64;
        let s = format!("child round {round}");
        ok &= s.ends_with(&round.to_string());
        let big = vec![round as u8; 5 << 20];
        ok &= big[(5 << 20) - 1] == round as u8;
    }
    let huge = vec![1u8; 80 << 20];
    ok &= huge.iter().step_by(4096).all(|&b| b == 1);
    drop(huge);
    let mut m = std::collections::HashMap::new();
    for i in 0..10_000 {
        m.insert(i, i.to_string());
    }
    ok && m.len() == 10_000
}

#[test]
fn child_allocates_after_fork_while_threads_allocate() {
    let stop = Arc::new(AtomicBool::new(false));
    let workers: Vec<_> = (0..3)
        .map(|t| {
            let stop = stop.clone();
            std::thread::spawn(move || churn(&stop, t * 11 + 1))
        })
        .collect();
    // Let the workers get going.
    std::thread::sleep(std::time::Duration::from_millis(50));
    for _ in 0..40 {
        // SAFETY: the child only allocates, computes and leaves with `_exit`,
        // never returning into the test harness.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork failed");
        if pid == 0 {
            // SAFETY: `alarm` and `_exit` are async-signal-safe.
            unsafe {
                libc::alarm(30);
                libc::_exit(if child_work() { 0 } else { 1 });
            }
        }
        let mut status = 0;
        // SAFETY: `pid` is our child; `status` is a valid out-pointer.
        let r = unsafe { libc::waitpid(pid, &mut status, 0) };
        assert_eq!(r, pid);
        assert!(
            libc::WIFEXITED(status),
            "child did not exit normally (status {status:#x}: signal or deadlock)"
        );
        assert_eq!(libc::WEXITSTATUS(status), 0, "child's checks failed");
    }
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.join().unwrap();
    }
}
