//! The trace file format (version 1) and its reader, writer and CSV export.
//!
//! A trace is a 16-byte header followed by 32-byte records, all little-endian:
//!
//! | offset | size | header field |
//! |---:|---:|---|
//! | 0 | 8 | magic `b"TPTRACE\0"` |
//! | 8 | 4 | version, `1` |
//! | 12 | 4 | record length, `32` |
//!
//! | offset | size | record field |
//! |---:|---:|---|
//! | 0 | 8 | time in ns since recording started (see below) |
//! | 8 | 8 | id: a host pointer (global allocator, C ABI) or a tensor id ([`Traced`](super::Traced)) |
//! | 16 | 8 | size in bytes as requested; `0` on a free whose size the caller did not give (C `free`) |
//! | 24 | 1 | op: `1` alloc, `2` free |
//! | 25 | 1 | log2 of the alignment |
//! | 26 | 2 | stream: `0` none, else the request's stream + 1 (saturating) |
//! | 28 | 4 | thread: a small per-process thread number, from 1 in order of first record |
//!
//! A `realloc` is recorded as a free of the old block and an alloc of the
//! new one. Times are sampled: the recorder reads the clock once every
//! [`TIME_SAMPLE`](super::TIME_SAMPLE) records and stamps the
//! records in between with the last reading (a clock read costs 20–100 ns
//! on the project's VMs, which is more than the whole budget of a record).
//! Within one thread, records are in program order; across threads, a free
//! is always recorded before the address can be handed out again.
//!
//! The CSV export follows RMM's logging resource
//! (`Thread,Time,Action,Pointer,Size,Stream`), with `allocate`/`free`
//! actions, the time in seconds and the pointer in hex.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use thiserror::Error;

/// The first 8 bytes of every trace file.
pub const MAGIC: [u8; 8] = *b"TPTRACE\0";
/// The format version this crate reads and writes.
pub const VERSION: u32 = 1;
/// Header length in bytes.
pub const HEADER_LEN: usize = 16;
/// Record length in bytes.
pub const RECORD_LEN: usize = 32;

/// What a record says happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum TraceOp {
    /// A block was handed out.
    Alloc = 1,
    /// A block was given back.
    Free = 2,
}

/// One allocate or free.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceRecord {
    /// Alloc or free.
    pub op: TraceOp,
    /// The block: a pointer or a tensor id.
    pub id: u64,
    /// Requested size in bytes (0 on a free of unknown size).
    pub size: u64,
    /// log2 of the alignment.
    pub align_log2: u8,
    /// 0 = no stream, else stream + 1.
    pub stream: u16,
    /// Nanoseconds since recording started (sampled, see the module docs).
    pub time_ns: u64,
    /// Thread number, from 1.
    pub thread: u32,
}

impl TraceRecord {
    /// The alignment in bytes.
    pub fn align(&self) -> usize {
        1usize << self.align_log2
    }

    /// The record's 32 bytes.
    pub fn encode(&self) -> [u8; RECORD_LEN] {
        let mut b = [0u8; RECORD_LEN];
        b[0..8].copy_from_slice(&self.time_ns.to_le_bytes());
        b[8..16].copy_from_slice(&self.id.to_le_bytes());
        b[16..24].copy_from_slice(&self.size.to_le_bytes());
        b[24..32].copy_from_slice(&self.packed().to_le_bytes());
        b
    }

    /// Bytes 24..32 as one little-endian word (op, align, stream, thread).
    #[inline(always)]
    pub(crate) fn packed(&self) -> u64 {
        pack(self.op, self.align_log2, self.stream, self.thread)
    }

    /// Decodes 32 bytes; `Err` says what is wrong with them.
    fn decode(b: &[u8; RECORD_LEN]) -> Result<TraceRecord, String> {
        let word = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().expect("8 bytes"));
        let op = match b[24] {
            1 => TraceOp::Alloc,
            2 => TraceOp::Free,
            other => return Err(format!("op byte {other} is neither 1 (alloc) nor 2 (free)")),
        };
        let align_log2 = b[25];
        if align_log2 >= usize::BITS as u8 {
            return Err(format!("alignment 2^{align_log2} does not fit a usize"));
        }
        Ok(TraceRecord {
            op,
            id: word(8),
            size: word(16),
            align_log2,
            stream: u16::from_le_bytes([b[26], b[27]]),
            time_ns: word(0),
            thread: u32::from_le_bytes([b[28], b[29], b[30], b[31]]),
        })
    }
}

/// Packs op, alignment, stream and thread into the record's last word.
#[inline(always)]
pub(crate) const fn pack(op: TraceOp, align_log2: u8, stream: u16, thread: u32) -> u64 {
    op as u64 | (align_log2 as u64) << 8 | (stream as u64) << 16 | (thread as u64) << 32
}

/// The header's 16 bytes.
pub const fn header() -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    let mut i = 0;
    while i < 8 {
        h[i] = MAGIC[i];
        i += 1;
    }
    let v = VERSION.to_le_bytes();
    let r = (RECORD_LEN as u32).to_le_bytes();
    let mut j = 0;
    while j < 4 {
        h[8 + j] = v[j];
        h[12 + j] = r[j];
        j += 1;
    }
    h
}

/// A trace that could not be read. Every variant names the file.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum TraceError {
    /// The file could not be opened, read or written.
    #[error("trace {path}: {op}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What was being done (`open`, `read`, `write`).
        op: &'static str,
        /// The OS error.
        source: std::io::Error,
    },
    /// The file is shorter than its header, or ends inside a record.
    #[error(
        "trace {path}: truncated at byte {offset}: {len} B is not a {HEADER_LEN}-byte header plus whole {RECORD_LEN}-byte records (the last record, index {record}, is cut short)"
    )]
    Truncated {
        /// The file.
        path: PathBuf,
        /// Where the incomplete header or record starts.
        offset: u64,
        /// The file length.
        len: u64,
        /// Index of the incomplete record (0 if the header itself is cut).
        record: u64,
    },
    /// The first 8 bytes are not [`MAGIC`].
    #[error(
        "trace {path}: byte 0: magic {found:02x?} is not {MAGIC:02x?} (\"TPTRACE\\0\"): not a tensorpool trace"
    )]
    BadMagic {
        /// The file.
        path: PathBuf,
        /// The bytes found.
        found: [u8; 8],
    },
    /// A version or record length this crate does not read.
    #[error(
        "trace {path}: byte 8: version {version} with {record_len}-byte records; this build reads version {VERSION} with {RECORD_LEN}-byte records"
    )]
    BadVersion {
        /// The file.
        path: PathBuf,
        /// The version found.
        version: u32,
        /// The record length found.
        record_len: u32,
    },
    /// A record that cannot be decoded.
    #[error("trace {path}: record {index} (byte {offset}): {detail}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// Record index, from 0.
        index: u64,
        /// Byte offset of the record.
        offset: u64,
        /// What is wrong.
        detail: String,
    },
}

impl TraceError {
    /// The error as the crate's [`AllocError`](crate::AllocError): I/O
    /// failures become `Io`, malformed contents `Integrity`.
    pub fn into_alloc_error(self) -> crate::AllocError {
        match &self {
            TraceError::Io { path, op, source } => crate::AllocError::Io {
                op,
                path: path.display().to_string(),
                message: source.to_string(),
            },
            _ => crate::AllocError::Integrity {
                what: "trace file".into(),
                detail: self.to_string(),
            },
        }
    }
}

impl From<TraceError> for crate::AllocError {
    fn from(e: TraceError) -> Self {
        e.into_alloc_error()
    }
}

/// A whole trace in memory.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Trace {
    /// The records, in file order.
    pub records: Vec<TraceRecord>,
}

impl Trace {
    /// Reads and checks a trace file.
    pub fn read(path: impl AsRef<Path>) -> Result<Trace, TraceError> {
        let path = path.as_ref();
        let bytes = std::fs::read(path).map_err(|source| TraceError::Io {
            path: path.to_path_buf(),
            op: "read",
            source,
        })?;
        Trace::from_bytes(&bytes, path)
    }

    /// Decodes a trace held in memory; `origin` names it in errors.
    pub fn from_bytes(bytes: &[u8], origin: impl AsRef<Path>) -> Result<Trace, TraceError> {
        let path = || origin.as_ref().to_path_buf();
        let len = bytes.len() as u64;
        if bytes.len() < HEADER_LEN {
            if bytes.len() >= 8 && bytes[..8] != MAGIC {
                return Err(TraceError::BadMagic {
                    path: path(),
                    found: bytes[..8].try_into().expect("8 bytes"),
                });
            }
            return Err(TraceError::Truncated {
                path: path(),
                offset: 0,
                len,
                record: 0,
            });
        }
        if bytes[..8] != MAGIC {
            return Err(TraceError::BadMagic {
                path: path(),
                found: bytes[..8].try_into().expect("8 bytes"),
            });
        }
        let version = u32::from_le_bytes(bytes[8..12].try_into().expect("4 bytes"));
        let record_len = u32::from_le_bytes(bytes[12..16].try_into().expect("4 bytes"));
        if version != VERSION || record_len as usize != RECORD_LEN {
            return Err(TraceError::BadVersion {
                path: path(),
                version,
                record_len,
            });
        }
        let body = &bytes[HEADER_LEN..];
        let whole = body.len() / RECORD_LEN;
        if !body.len().is_multiple_of(RECORD_LEN) {
            return Err(TraceError::Truncated {
                path: path(),
                offset: (HEADER_LEN + whole * RECORD_LEN) as u64,
                len,
                record: whole as u64,
            });
        }
        let mut records = Vec::with_capacity(whole);
        for (i, chunk) in body.chunks_exact(RECORD_LEN).enumerate() {
            let rec =
                TraceRecord::decode(chunk.try_into().expect("32 bytes")).map_err(|detail| {
                    TraceError::Corrupt {
                        path: path(),
                        index: i as u64,
                        offset: (HEADER_LEN + i * RECORD_LEN) as u64,
                        detail,
                    }
                })?;
            records.push(rec);
        }
        Ok(Trace { records })
    }

    /// The file image: header and records.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER_LEN + self.records.len() * RECORD_LEN);
        out.extend_from_slice(&header());
        for r in &self.records {
            out.extend_from_slice(&r.encode());
        }
        out
    }

    /// Writes the file image to `path`.
    pub fn write(&self, path: impl AsRef<Path>) -> Result<(), TraceError> {
        let path = path.as_ref();
        std::fs::write(path, self.to_bytes()).map_err(|source| TraceError::Io {
            path: path.to_path_buf(),
            op: "write",
            source,
        })
    }

    /// Number of records.
    pub fn len(&self) -> usize {
        self.records.len()
    }

    /// Whether there are no records.
    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    /// The largest sum of requested bytes of live blocks at any point of the
    /// trace (frees of ids not live are ignored here; `replay` reports them).
    pub fn peak_live_bytes(&self) -> u64 {
        let mut live = std::collections::HashMap::with_capacity(1024);
        let (mut now, mut peak) = (0u64, 0u64);
        for r in &self.records {
            match r.op {
                TraceOp::Alloc => {
                    if let Some(old) = live.insert(r.id, r.size) {
                        now -= old;
                    }
                    now += r.size;
                    peak = peak.max(now);
                }
                TraceOp::Free => now -= live.remove(&r.id).unwrap_or(0),
            }
        }
        peak
    }

    /// The trace as CSV in RMM's logging style:
    /// `Thread,Time,Action,Pointer,Size,Stream` (time in seconds).
    pub fn to_csv(&self) -> String {
        let mut s = String::from("Thread,Time,Action,Pointer,Size,Stream\n");
        for r in &self.records {
            let action = match r.op {
                TraceOp::Alloc => "allocate",
                TraceOp::Free => "free",
            };
            let _ = writeln!(
                s,
                "{},{}.{:09},{},0x{:x},{},{}",
                r.thread,
                r.time_ns / 1_000_000_000,
                r.time_ns % 1_000_000_000,
                action,
                r.id,
                r.size,
                r.stream
            );
        }
        s
    }
}
