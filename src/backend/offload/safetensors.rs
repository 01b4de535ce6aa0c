//! safetensors files as a read-only source (feature `offload-safetensors`).
//!
//! [`OffloadBackend::open_safetensors`] reads only the file's header (the
//! 8-byte length and the JSON, parsed and validated by the `safetensors`
//! crate's `Metadata`), checks that the header's data length matches the
//! file's, and registers every tensor as a clean, not-yet-resident
//! allocation with its dtype and full shape (bf16 stays 2 bytes per
//! element: bytes are copied, never converted). A tensor is read when first
//! touched, by a positioned read (`pread`) of its byte range, or by a copy
//! out of a read-only mapping (`memmap2`) when asked; either way under the
//! budget, and either way a file that has shrunk since it was opened is an
//! integrity error (the mapping path checks the length before touching
//! pages, so it never faults on a truncated file). Clean tensors are
//! dropped on eviction and read again; a written one is spilled like any
//! other.

use super::OffloadBackend;
use super::residency::{Source, bump};
use super::spill::{IoOp, SpillDir, io_err};
use crate::allocator::{AllocRequest, Allocation, DEFAULT_ALIGN, DType, Shape, TensorAllocator};
use crate::error::AllocError;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The largest header read (the `safetensors` crate's own limit).
const MAX_HEADER: u64 = 100_000_000;

/// How to read tensors of an opened file.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SafetensorsOptions {
    /// Copy out of a read-only mapping instead of `pread`.
    pub mmap: bool,
}

/// An opened file: each tensor's name and handle, in file order.
#[derive(Debug)]
pub struct SafetensorsFile {
    /// The path.
    pub path: PathBuf,
    /// Tensors in order of their offsets.
    pub tensors: Vec<(String, Allocation)>,
    /// Bytes read to open it (the 8-byte length and the header).
    pub header_bytes: usize,
}

/// A source file shared by its tensors.
#[derive(Debug)]
pub(super) struct SourceFile {
    file: File,
    path: PathBuf,
    len: u64,
    map: Option<memmap2::Mmap>,
}

fn integrity(path: &Path, detail: String) -> AllocError {
    AllocError::Integrity {
        what: path.display().to_string(),
        detail,
    }
}

impl SourceFile {
    /// Reads `dst.len()` bytes at `offset`; returns the bytes read.
    pub fn read_at(
        &self,
        offset: u64,
        dst: &mut [u8],
        dir: &SpillDir,
    ) -> Result<usize, AllocError> {
        let rd = |e: &std::io::Error| io_err("source read", &self.path, e);
        dir.hook(IoOp::SourceRead, &self.path).map_err(|e| rd(&e))?;
        let end = offset + dst.len() as u64;
        match &self.map {
            Some(m) => {
                let now = self.file.metadata().map_err(|e| rd(&e))?.len();
                if now < end || now != self.len {
                    return Err(integrity(
                        &self.path,
                        format!("file is {now} B, was {} B when opened", self.len),
                    ));
                }
                dst.copy_from_slice(&m[offset as usize..end as usize]);
            }
            None => self.file.read_exact_at(dst, offset).map_err(|e| {
                if e.kind() == std::io::ErrorKind::UnexpectedEof {
                    integrity(
                        &self.path,
                        format!(
                            "file ends before byte {end} (was {} B when opened)",
                            self.len
                        ),
                    )
                } else {
                    rd(&e)
                }
            })?,
        }
        Ok(dst.len())
    }
}

fn dtype(d: ::safetensors::Dtype) -> Option<DType> {
    use ::safetensors::Dtype as S;
    Some(match d {
        S::BOOL => DType::Bool,
        S::U8 => DType::U8,
        S::I8 => DType::I8,
        S::F8_E4M3 => DType::F8E4M3,
        S::F8_E5M2 => DType::F8E5M2,
        S::I16 => DType::I16,
        S::U16 => DType::U16,
        S::F16 => DType::F16,
        S::BF16 => DType::BF16,
        S::I32 => DType::I32,
        S::U32 => DType::U32,
        S::F32 => DType::F32,
        S::I64 => DType::I64,
        S::U64 => DType::U64,
        S::F64 => DType::F64,
        // Sub-byte and complex types: bytes only, no element type.
        _ => return None,
    })
}

impl<B: TensorAllocator + 'static> OffloadBackend<B> {
    /// Opens a `.safetensors` file reading only its header, and registers
    /// every tensor as a clean allocation that is not resident yet.
    pub fn open_safetensors(
        &self,
        path: impl AsRef<Path>,
        opts: SafetensorsOptions,
    ) -> Result<SafetensorsFile, AllocError> {
        let path = path.as_ref().to_path_buf();
        let op = |e: &std::io::Error| io_err("open safetensors", &path, e);
        let file = File::open(&path).map_err(|e| op(&e))?;
        let len = file.metadata().map_err(|e| op(&e))?.len();
        let mut n8 = [0u8; 8];
        file.read_exact_at(&mut n8, 0)
            .map_err(|_| integrity(&path, format!("{len} B: too short for a header length")))?;
        let n = u64::from_le_bytes(n8);
        if n > MAX_HEADER || 8 + n > len {
            return Err(integrity(
                &path,
                format!("header length {n} B in a file of {len} B"),
            ));
        }
        let mut h = vec![0u8; n as usize];
        file.read_exact_at(&mut h, 8).map_err(|e| op(&e))?;
        bump(&self.sh.n.bytes_read, 8 + n);
        let meta: ::safetensors::tensor::Metadata =
            serde_json::from_slice(&h).map_err(|e| integrity(&path, format!("header: {e}")))?;
        let base = 8 + n;
        if base + meta.data_len() as u64 != len {
            return Err(integrity(
                &path,
                format!(
                    "header describes {} B of data, the file holds {} B",
                    meta.data_len(),
                    len - base
                ),
            ));
        }
        let map = if opts.mmap {
            // SAFETY: the mapping is read-only and private to this backend;
            // a file changed underneath is caught by the length check in
            // `read_at` before any page is touched (a shrink), and a change
            // of contents yields wrong bytes but no memory unsafety, as the
            // bytes are only copied.
            Some(unsafe { memmap2::Mmap::map(&file) }.map_err(|e| op(&e))?)
        } else {
            None
        };
        let src = Arc::new(SourceFile {
            file,
            path: path.clone(),
            len,
            map,
        });
        let mut tensors = Vec::new();
        for name in meta.offset_keys() {
            let info = meta.info(&name).expect("offset_keys lists its tensors");
            let (start, end) = info.data_offsets;
            let req = AllocRequest {
                shape: Shape::new(&info.shape),
                dtype: dtype(info.dtype),
                ..AllocRequest::new(end - start, DEFAULT_ALIGN)
            };
            let a = self.register(
                &req,
                Source::Range {
                    file: src.clone(),
                    offset: base + start as u64,
                },
            )?;
            tensors.push((name, a));
        }
        Ok(SafetensorsFile {
            path,
            tensors,
            header_bytes: base as usize,
        })
    }
}
