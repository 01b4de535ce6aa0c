//! The offload backend's safetensors source (feature `offload-safetensors`).
//!
//! 1. Opening reads only the header (bytes read counted) and registers every
//!    tensor, not resident, with its dtype and full shape; bf16 stays 2 bytes
//!    per element.
//! 2. A generated file 3× the budget round-trips exactly, tensor by tensor,
//!    with resident bytes never above the budget; clean tensors are dropped
//!    (no spill) and read again; by `pread` and by mmap.
//! 3. A file truncated after opening is an integrity error, never wrong
//!    bytes; a written file tensor is spilled and keeps the written bytes.
//! 4. A registered order prefetches the next tensors (counted hits).
#![cfg(feature = "offload-safetensors")]

mod common;

use common::Rng;
use safetensors::Dtype;
use safetensors::tensor::TensorView;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tensorpool::backend::offload::{SafetensorsOptions, host_rounding};
use tensorpool::backend::{HostBackend, OffloadBackend, OffloadConfig, TensorState};
use tensorpool::{AllocError, AllocRequest, DType, TensorAllocator};

type Off = OffloadBackend<HostBackend>;

struct TempDir(PathBuf);
impl TempDir {
    fn new(tag: &str) -> Self {
        let p = std::env::temp_dir().join(format!("tp-st-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
}
impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Layer `i`: a bf16 [rows, 256] weight and an f32 [256] bias, random bytes.
fn model(n: usize, rows: usize) -> Vec<(String, Dtype, Vec<usize>, Vec<u8>)> {
    let mut r = Rng(42);
    let mut bytes = |len: usize| (0..len).map(|_| r.next() as u8).collect::<Vec<u8>>();
    let mut v = Vec::new();
    for i in 0..n {
        v.push((
            format!("layers.{i:02}.weight"),
            Dtype::BF16,
            vec![rows, 256],
            bytes(rows * 256 * 2),
        ));
        v.push((
            format!("layers.{i:02}.bias"),
            Dtype::F32,
            vec![256],
            bytes(1024),
        ));
    }
    v
}

fn write_model(path: &Path, m: &[(String, Dtype, Vec<usize>, Vec<u8>)]) {
    let views: Vec<(String, TensorView<'_>)> = m
        .iter()
        .map(|(n, d, s, b)| (n.clone(), TensorView::new(*d, s.clone(), b).unwrap()))
        .collect();
    safetensors::serialize_to_file(views, None, path).unwrap();
}

fn off(budget: usize) -> Off {
    OffloadBackend::new(
        HostBackend::new(),
        OffloadConfig {
            wait_timeout: Duration::from_secs(60),
            ..OffloadConfig::with_budget(budget)
        },
    )
    .unwrap()
}

fn weight_charge(rows: usize) -> usize {
    host_rounding(&AllocRequest::bytes(rows * 512)).unwrap()
        + host_rounding(&AllocRequest::bytes(1024)).unwrap()
}

fn round_trip(mmap: bool) {
    let dir = TempDir::new(if mmap { "mmap" } else { "pread" });
    let path = dir.0.join("model.safetensors");
    let (n, rows) = (12, 64);
    let m = model(n, rows);
    write_model(&path, &m);
    let file_len = std::fs::metadata(&path).unwrap().len() as usize;
    // Budget: 4 of 12 layers → the file is 3× the budget.
    let b = off(4 * weight_charge(rows));
    let f = b
        .open_safetensors(&path, SafetensorsOptions { mmap })
        .unwrap();
    let s = b.offload_stats();
    assert_eq!(
        s.bytes_read as usize, f.header_bytes,
        "opening reads only the header"
    );
    assert!(f.header_bytes < file_len / 10);
    assert!(file_len > 3 * s.budget - 4096, "{file_len} vs {}", s.budget);
    assert_eq!(s.resident_bytes, 0);
    assert_eq!(f.tensors.len(), 2 * n);
    let by_name: std::collections::HashMap<_, _> = m.iter().map(|t| (t.0.clone(), t)).collect();
    for (name, a) in &f.tensors {
        let t = by_name[name];
        assert_eq!(a.size(), t.3.len(), "{name}: bytes as stored");
        assert_eq!(b.state(a).unwrap(), TensorState::NotResident);
    }
    // (safetensors orders data by dtype alignment, then name.)
    let w0 = &f
        .tensors
        .iter()
        .find(|t| t.0 == "layers.00.weight")
        .unwrap()
        .1;
    assert_eq!(w0.size(), rows * 256 * 2, "bf16 stays 2 bytes per element");
    for pass in 0..2 {
        for (name, a) in &f.tensors {
            let mut v = vec![0u8; a.size()];
            b.read(a, 0, &mut v).unwrap();
            assert!(v == by_name[name].3, "pass {pass}: {name} differs");
            b.check_invariants();
            assert!(b.offload_stats().resident_bytes <= b.offload_stats().budget);
        }
    }
    let s = b.offload_stats();
    assert_eq!(s.spills, 0, "clean tensors are dropped, not spilled");
    assert!(s.evictions >= (2 * n - 8) as u64, "{s:?}");
    assert_eq!(
        s.loads,
        2 * 2 * n as u64,
        "every access of a 3×-budget sweep misses"
    );
    assert_eq!(s.loads, s.prefetch_misses);
    assert!(s.peak_resident_bytes <= s.budget);
    assert_eq!(
        s.bytes_read as usize,
        f.header_bytes + 2 * (file_len - f.header_bytes),
        "each pass reads the data once"
    );
    // A pinned view of a bf16 tensor, as u16.
    let g = b.pin(w0).unwrap();
    assert_eq!(g.as_slice::<u16>().unwrap().len(), rows * 256);
    drop(g);
    // Shrink the file under the backend: an integrity error, not wrong bytes.
    b.evict_all().unwrap();
    let fh = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    fh.set_len(file_len as u64 - 100).unwrap();
    let (name, last) = f.tensors.last().unwrap();
    let mut v = vec![0u8; last.size()];
    let e = b.read(last, 0, &mut v).unwrap_err();
    assert!(
        matches!(&e, AllocError::Integrity { what, .. } if what.ends_with("model.safetensors")),
        "{name}: {e}"
    );
    b.check_invariants();
}

#[test]
fn round_trip_three_times_the_budget_by_pread() {
    round_trip(false);
}

#[test]
fn round_trip_three_times_the_budget_by_mmap() {
    round_trip(true);
}

#[test]
fn written_file_tensors_spill_and_keep_their_bytes() {
    let dir = TempDir::new("write");
    let path = dir.0.join("m.safetensors");
    let m = model(6, 32);
    write_model(&path, &m);
    let b = off(2 * weight_charge(32));
    let f = b
        .open_safetensors(&path, SafetensorsOptions::default())
        .unwrap();
    let (name, a) = &f.tensors[0];
    let orig = &m.iter().find(|t| &t.0 == name).unwrap().3;
    b.write(a, 10, &[0xAB; 6]).unwrap();
    b.evict_all().unwrap();
    assert_eq!(b.state(a).unwrap(), TensorState::Spilled);
    let mut v = vec![0u8; a.size()];
    b.read(a, 0, &mut v).unwrap();
    let mut want = orig.clone();
    want[10..16].fill(0xAB);
    assert!(v == want);
    assert_eq!(b.offload_stats().spills, 1);
    // The source file is untouched.
    let mut again = vec![0u8; 6];
    let raw = std::fs::read(&path).unwrap();
    again.copy_from_slice(&raw[f.header_bytes + 10..f.header_bytes + 16]);
    assert_eq!(again, orig[10..16]);
}

#[test]
fn bad_headers_are_integrity_errors() {
    let dir = TempDir::new("bad");
    let b = off(1 << 20);
    for (what, bytes) in [
        ("short", vec![1u8, 2, 3]),
        ("huge length", u64::MAX.to_le_bytes().to_vec()),
        ("not json", {
            let mut v = 4u64.to_le_bytes().to_vec();
            v.extend_from_slice(b"{{{{");
            v
        }),
        ("data length mismatch", {
            let h = br#"{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}"#;
            let mut v = (h.len() as u64).to_le_bytes().to_vec();
            v.extend_from_slice(h);
            v.extend_from_slice(&[0; 8]);
            v
        }),
    ] {
        let p = dir.0.join("x.safetensors");
        std::fs::write(&p, &bytes).unwrap();
        let e = b
            .open_safetensors(&p, SafetensorsOptions::default())
            .unwrap_err();
        assert!(matches!(e, AllocError::Integrity { .. }), "{what}: {e}");
    }
    assert_eq!(b.stats().allocation.current, 0);
    let _ = DType::BF16;
}

#[test]
fn set_order_prefetches_the_next_layers() {
    let dir = TempDir::new("order");
    let path = dir.0.join("m.safetensors");
    let (n, rows) = (8, 64);
    let m = model(n, rows);
    write_model(&path, &m);
    let b = off(4 * weight_charge(rows));
    let f = b
        .open_safetensors(&path, SafetensorsOptions::default())
        .unwrap();
    let order: Vec<_> = f.tensors.iter().map(|t| t.1).collect();
    b.set_order(&order).unwrap();
    let mut v = Vec::new();
    for (name, a) in &f.tensors {
        v.resize(a.size(), 0);
        b.read(a, 0, &mut v).unwrap();
        assert!(v == m.iter().find(|t| &t.0 == name).unwrap().3);
        b.wait_prefetch_idle().unwrap();
        b.check_invariants();
    }
    let s = b.offload_stats();
    assert_eq!(s.prefetch_misses, 1, "only the first tensor misses: {s:?}");
    assert_eq!(s.prefetch_hits, 2 * n as u64 - 1, "{s:?}");
    assert!(s.peak_resident_bytes <= s.budget);
}

#[test]
fn a_file_tensor_larger_than_the_budget_never_fits() {
    let dir = TempDir::new("big");
    let path = dir.0.join("m.safetensors");
    let m = model(1, 64);
    write_model(&path, &m);
    let b = off(16 << 10);
    let f = b
        .open_safetensors(&path, SafetensorsOptions::default())
        .unwrap();
    let (_, w) = f.tensors.iter().find(|t| t.0.ends_with("weight")).unwrap();
    let mut v = vec![0u8; 16];
    let e = b.read(w, 0, &mut v).unwrap_err();
    assert!(
        matches!(e, AllocError::NeverFits { limit, .. } if limit == 16 << 10),
        "{e}"
    );
    assert!(!e.is_retryable());
    // The small bias still loads.
    let (_, bias) = f.tensors.iter().find(|t| t.0.ends_with("bias")).unwrap();
    b.read(bias, 0, &mut v).unwrap();
    b.check_invariants();
}
