//! Spill files: the on-disk home of evicted dirty tensors.
//!
//! One directory per backend (`SpillDir`), created at construction and
//! removed on drop unless the configuration keeps it. One file per tensor,
//! `<id as 16 hex digits>.spill`, laid out as a fixed 96-byte header and the
//! payload (all integers little-endian):
//!
//! | offset | bytes | field |
//! |-------:|------:|-------|
//! | 0  | 8  | magic `TPSPILL\0` |
//! | 8  | 4  | format version (1) |
//! | 12 | 1  | dtype code (`DType as u8`, 255 = none) |
//! | 13 | 1  | rank (0–8; 255 = no shape) |
//! | 14 | 2  | reserved, zero |
//! | 16 | 64 | shape: 8 × u64, unused dims zero |
//! | 80 | 8  | payload length in bytes |
//! | 88 | 4  | crc32c of the payload |
//! | 92 | 4  | crc32c of header bytes 0..92 |
//!
//! A file is written to `<name>.tmp` and renamed over `<name>`, so a reader
//! sees either the old complete file or the new complete file. Every load
//! checks the file length, magic, version, header checksum, that dtype,
//! shape and length are the tensor's, and the payload checksum: any
//! mismatch is [`AllocError::Integrity`] naming the file, never wrong data.
//! No `fsync`: spill files are scratch space for this process, not durable
//! storage, so only the rename's atomicity matters.
//!
//! All file operations go through [`FaultHook`] first, so tests can inject
//! `ENOSPC` or `EIO` at any step.

use crate::allocator::{DType, Shape};
use crate::error::AllocError;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

/// The spill file magic.
pub const MAGIC: [u8; 8] = *b"TPSPILL\0";
/// The spill file format version.
pub const VERSION: u32 = 1;
/// Header length in bytes.
pub const HEADER_LEN: usize = 96;

/// A file operation, as passed to a [`FaultHook`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoOp {
    /// Writing a spill file (before each `write` call: header, then payload).
    SpillWrite,
    /// Renaming a finished spill file into place.
    SpillRename,
    /// Reading a spill file back.
    SpillRead,
    /// Reading a tensor's bytes from a source file (safetensors).
    SourceRead,
}

/// Called before every file operation with the operation and the path; an
/// `Err` is reported as if the OS had returned it. For tests: simulate a
/// full disk or a failing device without one.
pub type FaultHook = Arc<dyn Fn(IoOp, &Path) -> std::io::Result<()> + Send + Sync>;

pub(super) fn io_err(op: &'static str, path: &Path, e: &std::io::Error) -> AllocError {
    AllocError::Io {
        op,
        path: path.display().to_string(),
        message: e.to_string(),
    }
}

fn integrity(path: &Path, detail: String) -> AllocError {
    AllocError::Integrity {
        what: path.display().to_string(),
        detail,
    }
}

/// What the header records about a tensor besides its payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct SpillMeta {
    pub dtype: Option<DType>,
    pub shape: Option<Shape>,
    pub len: usize,
}

impl SpillMeta {
    fn header(&self, payload_crc: u32) -> [u8; HEADER_LEN] {
        let mut h = [0u8; HEADER_LEN];
        h[0..8].copy_from_slice(&MAGIC);
        h[8..12].copy_from_slice(&VERSION.to_le_bytes());
        h[12] = self.dtype.map_or(255, |d| d as u8);
        h[13] = self.shape.map_or(255, |s| s.rank() as u8);
        if let Some(s) = self.shape {
            for (i, d) in s.dims().iter().enumerate() {
                h[16 + 8 * i..24 + 8 * i].copy_from_slice(&d.to_le_bytes());
            }
        }
        h[80..88].copy_from_slice(&(self.len as u64).to_le_bytes());
        h[88..92].copy_from_slice(&payload_crc.to_le_bytes());
        let hc = crc32c::crc32c(&h[..92]);
        h[92..96].copy_from_slice(&hc.to_le_bytes());
        h
    }

    /// Checks `h` against this tensor; returns the payload checksum.
    fn check(&self, path: &Path, h: &[u8; HEADER_LEN]) -> Result<u32, AllocError> {
        let u32_at = |o: usize| u32::from_le_bytes(h[o..o + 4].try_into().unwrap_or([0; 4]));
        if h[0..8] != MAGIC {
            return Err(integrity(path, format!("bad magic {:02x?}", &h[0..8])));
        }
        if u32_at(8) != VERSION {
            return Err(integrity(
                path,
                format!("format version {} where {VERSION} is supported", u32_at(8)),
            ));
        }
        let hc = crc32c::crc32c(&h[..92]);
        if hc != u32_at(92) {
            return Err(integrity(
                path,
                format!("header checksum {:#010x}, stored {:#010x}", hc, u32_at(92)),
            ));
        }
        let want = self.header(0);
        if h[12..88] != want[12..88] {
            return Err(integrity(
                path,
                format!(
                    "header describes another tensor (dtype/shape/length differ from {:?}, {:?}, {} B)",
                    self.dtype,
                    self.shape.as_ref().map(Shape::dims),
                    self.len
                ),
            ));
        }
        Ok(u32_at(88))
    }
}

/// The backend's spill directory.
pub(super) struct SpillDir {
    dir: PathBuf,
    seq: u64,
    keep: bool,
    hook: Option<FaultHook>,
}

impl core::fmt::Debug for SpillDir {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("SpillDir")
            .field("dir", &self.dir)
            .field("keep", &self.keep)
            .field("hook", &self.hook.is_some())
            .finish()
    }
}

static DIR_SEQ: AtomicU64 = AtomicU64::new(0);

impl SpillDir {
    /// Creates a fresh directory `tensorpool-offload-<pid>-<n>` under `root`.
    pub fn create(root: &Path, keep: bool, hook: Option<FaultHook>) -> Result<Self, AllocError> {
        let seq = DIR_SEQ.fetch_add(1, Ordering::Relaxed);
        let name = format!("tensorpool-offload-{}-{seq}", std::process::id());
        let dir = root.join(name);
        std::fs::create_dir_all(root).map_err(|e| io_err("create spill root", root, &e))?;
        std::fs::create_dir(&dir).map_err(|e| io_err("create spill dir", &dir, &e))?;
        Ok(SpillDir {
            dir,
            seq,
            keep,
            hook,
        })
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// This directory's number, unique in the process.
    pub fn seq(&self) -> u64 {
        self.seq
    }

    /// The file for tensor `id`.
    pub fn file(&self, id: u64) -> PathBuf {
        self.dir.join(format!("{id:016x}.spill"))
    }

    pub(super) fn hook(&self, op: IoOp, path: &Path) -> std::io::Result<()> {
        match &self.hook {
            Some(h) => h(op, path),
            None => Ok(()),
        }
    }

    /// Writes `payload` as tensor `id`'s spill file (temporary name, then
    /// rename). On error the temporary file is removed and any previous
    /// file for `id` is untouched. Returns the bytes written.
    pub fn write(&self, id: u64, m: &SpillMeta, payload: &[u8]) -> Result<usize, AllocError> {
        debug_assert_eq!(m.len, payload.len());
        let path = self.file(id);
        let tmp = path.with_extension("spill.tmp");
        let res = (|| {
            let mut f = OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .open(&tmp)?;
            let h = m.header(crc32c::crc32c(payload));
            self.hook(IoOp::SpillWrite, &tmp)?;
            f.write_all(&h)?;
            self.hook(IoOp::SpillWrite, &tmp)?;
            f.write_all(payload)?;
            drop(f);
            self.hook(IoOp::SpillRename, &path)?;
            std::fs::rename(&tmp, &path)
        })();
        match res {
            Ok(()) => Ok(HEADER_LEN + payload.len()),
            Err(e) => {
                let _ = std::fs::remove_file(&tmp);
                Err(io_err("spill write", &path, &e))
            }
        }
    }

    /// Reads tensor `id`'s spill file into `dst` (exactly `m.len` bytes) and
    /// verifies it. Returns the bytes read.
    pub fn read(&self, id: u64, m: &SpillMeta, dst: &mut [u8]) -> Result<usize, AllocError> {
        debug_assert_eq!(m.len, dst.len());
        let path = self.file(id);
        let rd = |e: std::io::Error| io_err("spill read", &path, &e);
        self.hook(IoOp::SpillRead, &path).map_err(rd)?;
        let f = File::open(&path).map_err(rd)?;
        let flen = f.metadata().map_err(rd)?.len();
        let want = (HEADER_LEN + m.len) as u64;
        if flen != want {
            return Err(integrity(
                &path,
                format!(
                    "file is {flen} B, expected {want} B (header {HEADER_LEN} B + payload {} B)",
                    m.len
                ),
            ));
        }
        let mut h = [0u8; HEADER_LEN];
        f.read_exact_at(&mut h, 0).map_err(rd)?;
        let crc = m.check(&path, &h)?;
        f.read_exact_at(dst, HEADER_LEN as u64).map_err(rd)?;
        let got = crc32c::crc32c(dst);
        if got != crc {
            return Err(integrity(
                &path,
                format!("payload checksum {got:#010x}, header says {crc:#010x}"),
            ));
        }
        Ok(HEADER_LEN + m.len)
    }

    /// Removes tensor `id`'s file, if any.
    pub fn remove(&self, id: u64) {
        let _ = std::fs::remove_file(self.file(id));
    }
}

impl Drop for SpillDir {
    fn drop(&mut self) {
        if !self.keep {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(len: usize) -> SpillMeta {
        SpillMeta {
            dtype: Some(DType::BF16),
            shape: Shape::new(&[len / 2]),
            len,
        }
    }

    #[test]
    fn round_trip_and_every_corruption_is_caught() {
        let d = SpillDir::create(&std::env::temp_dir(), false, None).unwrap();
        let payload: Vec<u8> = (0..1000u32).map(|i| (i * 7) as u8).collect();
        let m = meta(payload.len());
        assert_eq!(d.write(5, &m, &payload).unwrap(), HEADER_LEN + 1000);
        let mut back = vec![0u8; 1000];
        d.read(5, &m, &mut back).unwrap();
        assert_eq!(back, payload);
        let path = d.file(5);
        let good = std::fs::read(&path).unwrap();
        // A flipped byte anywhere: header fields, header checksum, payload.
        for at in [0, 8, 12, 13, 20, 80, 88, 92, 96, 500, good.len() - 1] {
            let mut bad = good.clone();
            bad[at] ^= 0x10;
            std::fs::write(&path, &bad).unwrap();
            let e = d.read(5, &m, &mut back).unwrap_err();
            assert!(
                matches!(&e, AllocError::Integrity { what, .. } if what.ends_with(".spill")),
                "byte {at}: {e}"
            );
        }
        // Truncated, and a header for another tensor.
        std::fs::write(&path, &good[..good.len() - 3]).unwrap();
        assert!(matches!(
            d.read(5, &m, &mut back),
            Err(AllocError::Integrity { .. })
        ));
        std::fs::write(&path, &good).unwrap();
        let mut other = vec![0u8; 1000];
        let e = d
            .read(
                5,
                &SpillMeta {
                    dtype: Some(DType::U8),
                    ..m
                },
                &mut other,
            )
            .unwrap_err();
        assert!(e.to_string().contains("another tensor"), "{e}");
        let dir = d.path().to_path_buf();
        drop(d);
        assert!(!dir.exists());
    }

    #[test]
    fn injected_write_error_leaves_no_file() {
        let hook: FaultHook = Arc::new(|op, _| {
            if op == IoOp::SpillWrite {
                Err(std::io::Error::from_raw_os_error(libc::ENOSPC))
            } else {
                Ok(())
            }
        });
        let d = SpillDir::create(&std::env::temp_dir(), false, Some(hook)).unwrap();
        let e = d.write(1, &meta(10), &[0; 10]).unwrap_err();
        assert!(
            matches!(
                e,
                AllocError::Io {
                    op: "spill write",
                    ..
                }
            ),
            "{e}"
        );
        assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 0);
    }
}
