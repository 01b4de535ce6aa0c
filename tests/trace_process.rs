//! Whole-program recording (`TENSORPOOL_TRACE`) through the global allocator,
//! in a child process (this binary re-run with the variable set):
//!
//! 1. the trace the child wrote parses, and replays as a consistent program
//!    (no free of an unknown pointer, no alloc of a live one), even though
//!    four threads allocated, freed and handed blocks to each other and
//!    vectors grew by `realloc`;
//! 2. marker allocations appear exactly once, with their size, alignment
//!    and a thread number of the thread that made them;
//! 3. across a `fork()`: the grandchild records to `path.<pid>`, its own
//!    marker is there and not in the parent's file, and none of the
//!    parent's unwritten records is written twice (the parent's pre-fork
//!    marker is not in the grandchild's file);
//! 4. recording is off when the variable is unset.
//!
//! `harness = false`: one process, this `main`, its own global allocator.

use std::process::Command;
use tensorpool::TensorGlobalAlloc;
use tensorpool::adapt::{ReplayPlan, Trace, TraceOp, TraceRecord};

#[global_allocator]
static A: TensorGlobalAlloc = TensorGlobalAlloc::new();

const MAIN_MARK: usize = 123_457;
const THREAD_MARK: usize = 77_771;
const FORK_MARK: usize = 55_555;
const THREADS: usize = 4;

/// What the traced child does.
fn workload() {
    assert!(tensorpool::adapt::process::is_recording());
    let marker = Vec::<u8>::with_capacity(MAIN_MARK);
    std::hint::black_box(&marker);
    let (tx, rx) = std::sync::mpsc::channel::<Box<[u8]>>();
    let handles: Vec<_> = (0..THREADS)
        .map(|t| {
            let tx = tx.clone();
            std::thread::spawn(move || {
                let m = vec![t as u8; THREAD_MARK + t].into_boxed_slice();
                std::hint::black_box(&m);
                drop(m);
                let mut grow = Vec::new();
                for i in 0..10_000u32 {
                    grow.push(i); // reallocs
                    let b = vec![1u8; 16 + (i as usize * 37) % 3000];
                    if i % 10 == 0 {
                        tx.send(b.into_boxed_slice()).unwrap(); // freed by main
                    }
                }
                grow.len()
            })
        })
        .collect();
    drop(tx);
    let mut received = 0;
    for b in rx {
        received += b.len().min(1);
    }
    let total: usize = handles.into_iter().map(|h| h.join().unwrap()).sum();
    assert_eq!(total, THREADS * 10_000);
    assert_eq!(received, THREADS * 1_000);

    // SAFETY: `fork` in a process whose other threads have all been joined.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork failed");
    if pid == 0 {
        let v = Vec::<u8>::with_capacity(FORK_MARK);
        std::hint::black_box(&v);
        drop(v);
        println!("grandchild {}", std::process::id());
        // `exit` runs the atexit flush, which writes the grandchild's file.
        // SAFETY: ends this process.
        unsafe { libc::exit(0) };
    }
    let mut status = 0;
    // SAFETY: waits for our own child.
    assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
    assert!(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0);
    drop(marker);
}

fn allocs_of(t: &Trace, size: usize) -> Vec<TraceRecord> {
    t.records
        .iter()
        .filter(|r| r.op == TraceOp::Alloc && r.size == size as u64)
        .copied()
        .collect()
}

fn check(name: &str, ok: bool, detail: impl std::fmt::Display) -> bool {
    println!(
        "{} {name}{}",
        if ok { "ok  " } else { "FAIL" },
        if ok {
            String::new()
        } else {
            format!(": {detail}")
        }
    );
    ok
}

fn main() {
    if std::env::var_os("TP_TRACE_CHILD").is_some() {
        workload();
        return;
    }
    if std::env::var_os("TP_TRACE_OFF").is_some() {
        let v = vec![0u8; 1000];
        std::hint::black_box(&v);
        std::process::exit(if tensorpool::adapt::process::is_recording() {
            3
        } else {
            0
        });
    }
    let exe = std::env::current_exe().unwrap();
    let dir = std::env::temp_dir().join(format!("tp-trace-process-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("child.tpt");
    let out = Command::new(&exe)
        .env("TP_TRACE_CHILD", "1")
        .env("TENSORPOOL_TRACE", &path)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "child failed: {:?}\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let gpid: u32 = stdout
        .lines()
        .find_map(|l| l.strip_prefix("grandchild "))
        .expect("grandchild pid")
        .trim()
        .parse()
        .unwrap();
    let mut ok = true;
    let parent = Trace::read(&path).unwrap();
    let fork_path = dir.join(format!("child.tpt.{gpid}"));
    let forked = Trace::read(&fork_path).unwrap();
    ok &= check(
        "trace has records, more than one buffer of them",
        parent.len() > tensorpool::adapt::process::SLOTS,
        parent.len(),
    );

    let plan = ReplayPlan::new(&parent);
    ok &= check(
        "whole-program trace is consistent",
        plan.is_ok(),
        format!("{plan:?}"),
    );

    let main_mark = allocs_of(&parent, MAIN_MARK);
    ok &= check(
        "main marker once",
        main_mark.len() == 1,
        format!("{main_mark:?}"),
    );
    let main_thread = main_mark.first().map_or(0, |r| r.thread);
    ok &= check(
        "main marker freed",
        parent.records.iter().any(|r| {
            r.op == TraceOp::Free
                && Some(r.id) == main_mark.first().map(|m| m.id)
                && r.size == MAIN_MARK as u64
        }),
        "no free",
    );
    let mut threads = vec![main_thread];
    for t in 0..THREADS {
        let m = allocs_of(&parent, THREAD_MARK + t);
        ok &= check(
            &format!("thread {t} marker once"),
            m.len() == 1,
            format!("{m:?}"),
        );
        if let Some(r) = m.first() {
            ok &= check(
                &format!("thread {t} marker alignment"),
                r.align() == 1,
                r.align(),
            );
            threads.push(r.thread);
        }
    }
    threads.sort();
    threads.dedup();
    ok &= check(
        "five distinct thread numbers",
        threads.len() == THREADS + 1 && threads[0] != 0,
        format!("{threads:?}"),
    );

    ok &= check(
        "fork marker in the grandchild's file",
        allocs_of(&forked, FORK_MARK).len() == 1,
        forked.len(),
    );
    ok &= check(
        "fork marker not in the parent's file",
        allocs_of(&parent, FORK_MARK).is_empty(),
        "present",
    );
    ok &= check(
        "parent's records not written again by the grandchild",
        allocs_of(&forked, MAIN_MARK).is_empty() && allocs_of(&forked, THREAD_MARK).is_empty(),
        "duplicated",
    );
    ok &= check(
        "grandchild trace is small",
        forked.len() < 1000,
        forked.len(),
    );

    // Off without the variable, and with an empty one.
    for value in [None, Some("")] {
        let mut cmd = Command::new(&exe);
        cmd.env("TP_TRACE_OFF", "1").env_remove("TENSORPOOL_TRACE");
        if let Some(v) = value {
            cmd.env("TENSORPOOL_TRACE", v);
        }
        let st = cmd.status().unwrap();
        ok &= check(
            &format!("not recording with TENSORPOOL_TRACE={value:?}"),
            st.success(),
            st,
        );
    }
    // An uncreatable path: a message on stderr, no recording, no failure.
    let st = Command::new(&exe)
        .env("TP_TRACE_OFF", "1")
        .env("TENSORPOOL_TRACE", dir.join("no/such/dir/t.tpt"))
        .output()
        .unwrap();
    ok &= check(
        "uncreatable trace path: not recording, said so",
        st.status.success() && String::from_utf8_lossy(&st.stderr).contains("TENSORPOOL_TRACE"),
        format!("{:?} {}", st.status, String::from_utf8_lossy(&st.stderr)),
    );

    std::fs::remove_dir_all(&dir).unwrap();
    if !ok {
        std::process::exit(1);
    }
    println!("trace_process: all checks passed");
}
