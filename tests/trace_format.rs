//! The trace file format: round trip, CSV export, and a typed error (naming
//! the file and the byte offset or record index) for every kind of bad
//! input: missing file, truncated header, truncated record, wrong magic,
//! wrong version, wrong record length, corrupt op, corrupt alignment.

use tensorpool::AllocError;
use tensorpool::adapt::format::{HEADER_LEN, RECORD_LEN, header};
use tensorpool::adapt::{Trace, TraceError, TraceOp, TraceRecord};

fn sample() -> Trace {
    let rec = |op, id, size, align_log2, stream, time_ns, thread| TraceRecord {
        op,
        id,
        size,
        align_log2,
        stream,
        time_ns,
        thread,
    };
    Trace {
        records: vec![
            rec(TraceOp::Alloc, 0x7f00_0000_1000, 4096, 6, 0, 10, 1),
            rec(TraceOp::Alloc, 0x7f00_0000_2000, 1, 3, 5, 1_500_000_123, 2),
            rec(TraceOp::Free, 0x7f00_0000_1000, 0, 0, 0, 1_500_000_124, 1),
            rec(
                TraceOp::Alloc,
                u64::MAX,
                u64::MAX,
                63,
                u16::MAX,
                u64::MAX,
                u32::MAX,
            ),
        ],
    }
}

fn tmp(name: &str) -> std::path::PathBuf {
    std::env::temp_dir().join(format!("tp-trace-format-{}-{name}", std::process::id()))
}

#[test]
fn round_trip_through_bytes_and_file() {
    let t = sample();
    let bytes = t.to_bytes();
    assert_eq!(bytes.len(), HEADER_LEN + 4 * RECORD_LEN);
    assert_eq!(&bytes[..8], b"TPTRACE\0");
    assert_eq!(&bytes[..HEADER_LEN], &header());
    assert_eq!(Trace::from_bytes(&bytes, "mem").unwrap(), t);
    let p = tmp("rt.tpt");
    t.write(&p).unwrap();
    assert_eq!(Trace::read(&p).unwrap(), t);
    std::fs::remove_file(&p).unwrap();
    // An empty trace is a header alone.
    let empty = Trace::default().to_bytes();
    assert_eq!(empty.len(), HEADER_LEN);
    assert!(Trace::from_bytes(&empty, "mem").unwrap().is_empty());
}

#[test]
fn record_layout_is_the_documented_one() {
    let r = sample().records[1];
    let b = r.encode();
    assert_eq!(
        u64::from_le_bytes(b[0..8].try_into().unwrap()),
        1_500_000_123
    );
    assert_eq!(
        u64::from_le_bytes(b[8..16].try_into().unwrap()),
        0x7f00_0000_2000
    );
    assert_eq!(u64::from_le_bytes(b[16..24].try_into().unwrap()), 1);
    assert_eq!(b[24], 1, "op alloc");
    assert_eq!(b[25], 3, "log2 align");
    assert_eq!(u16::from_le_bytes([b[26], b[27]]), 5, "stream");
    assert_eq!(
        u32::from_le_bytes(b[28..32].try_into().unwrap()),
        2,
        "thread"
    );
}

#[test]
fn csv_export_is_rmm_style() {
    let csv = sample().to_csv();
    let lines: Vec<&str> = csv.lines().collect();
    assert_eq!(lines[0], "Thread,Time,Action,Pointer,Size,Stream");
    assert_eq!(lines[1], "1,0.000000010,allocate,0x7f0000001000,4096,0");
    assert_eq!(lines[2], "2,1.500000123,allocate,0x7f0000002000,1,5");
    assert_eq!(lines[3], "1,1.500000124,free,0x7f0000001000,0,0");
    assert_eq!(lines.len(), 5);
}

#[test]
fn peak_live_bytes_follows_allocs_and_frees() {
    // 4096 live, then 4096 + 1, then 1 (the fourth record is left out: its
    // size is u64::MAX).
    let small = Trace {
        records: sample().records[..3].to_vec(),
    };
    assert_eq!(small.peak_live_bytes(), 4097);
}

#[test]
fn missing_file_is_an_io_error_naming_the_path() {
    let p = tmp("does-not-exist.tpt");
    let e = Trace::read(&p).unwrap_err();
    assert!(
        matches!(&e, TraceError::Io { path, op: "read", .. } if *path == p),
        "{e:?}"
    );
    assert!(e.to_string().contains(&p.display().to_string()), "{e}");
    match e.into_alloc_error() {
        AllocError::Io { path, op, .. } => {
            assert_eq!(op, "read");
            assert_eq!(path, p.display().to_string());
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn truncated_header_and_truncated_record() {
    let bytes = sample().to_bytes();
    let e = Trace::from_bytes(&bytes[..10], "t.tpt").unwrap_err();
    assert!(
        matches!(
            e,
            TraceError::Truncated {
                offset: 0,
                len: 10,
                record: 0,
                ..
            }
        ),
        "{e:?}"
    );
    let e = Trace::from_bytes(&[], "t.tpt").unwrap_err();
    assert!(
        matches!(
            e,
            TraceError::Truncated {
                offset: 0,
                len: 0,
                ..
            }
        ),
        "{e:?}"
    );
    // Cut inside the third record.
    let cut = HEADER_LEN + 2 * RECORD_LEN + 7;
    let e = Trace::from_bytes(&bytes[..cut], "t.tpt").unwrap_err();
    match &e {
        TraceError::Truncated {
            path,
            offset,
            len,
            record,
        } => {
            assert_eq!(path.to_str(), Some("t.tpt"));
            assert_eq!(*offset, (HEADER_LEN + 2 * RECORD_LEN) as u64);
            assert_eq!(*len, cut as u64);
            assert_eq!(*record, 2);
        }
        other => panic!("{other:?}"),
    }
    let msg = e.to_string();
    assert!(
        msg.contains("t.tpt") && msg.contains(&format!("byte {}", HEADER_LEN + 2 * RECORD_LEN)),
        "{msg}"
    );
    assert!(matches!(e.into_alloc_error(), AllocError::Integrity { .. }));
}

#[test]
fn wrong_magic() {
    let mut bytes = sample().to_bytes();
    bytes[0..8].copy_from_slice(b"GIF89a\0\0");
    let e = Trace::from_bytes(&bytes, "x.tpt").unwrap_err();
    assert!(
        matches!(e, TraceError::BadMagic { found, .. } if &found == b"GIF89a\0\0"),
        "{e:?}"
    );
    assert!(e.to_string().contains("x.tpt"));
    // A short file with the wrong magic says magic, not truncated.
    let e = Trace::from_bytes(b"PK\x03\x04abcdXY", "x.zip").unwrap_err();
    assert!(matches!(e, TraceError::BadMagic { .. }), "{e:?}");
}

#[test]
fn wrong_version_and_record_length() {
    let mut bytes = sample().to_bytes();
    bytes[8..12].copy_from_slice(&2u32.to_le_bytes());
    let e = Trace::from_bytes(&bytes, "v.tpt").unwrap_err();
    assert!(
        matches!(
            e,
            TraceError::BadVersion {
                version: 2,
                record_len: 32,
                ..
            }
        ),
        "{e:?}"
    );
    let mut bytes = sample().to_bytes();
    bytes[12..16].copy_from_slice(&40u32.to_le_bytes());
    let e = Trace::from_bytes(&bytes, "v.tpt").unwrap_err();
    assert!(
        matches!(
            e,
            TraceError::BadVersion {
                version: 1,
                record_len: 40,
                ..
            }
        ),
        "{e:?}"
    );
    assert!(e.to_string().contains("v.tpt"));
}

#[test]
fn corrupt_records_name_index_and_offset() {
    let mut bytes = sample().to_bytes();
    let at = HEADER_LEN + 2 * RECORD_LEN;
    bytes[at + 24] = 9; // op
    let e = Trace::from_bytes(&bytes, "c.tpt").unwrap_err();
    match &e {
        TraceError::Corrupt {
            index,
            offset,
            detail,
            ..
        } => {
            assert_eq!(*index, 2);
            assert_eq!(*offset, at as u64);
            assert!(detail.contains("op byte 9"), "{detail}");
        }
        other => panic!("{other:?}"),
    }
    assert!(e.to_string().contains("record 2"));
    let mut bytes = sample().to_bytes();
    bytes[HEADER_LEN + RECORD_LEN + 25] = 64; // alignment 2^64
    let e = Trace::from_bytes(&bytes, "c.tpt").unwrap_err();
    assert!(matches!(e, TraceError::Corrupt { index: 1, .. }), "{e:?}");
    let mut bytes = sample().to_bytes();
    bytes[HEADER_LEN + 24] = 0; // op 0: an unpublished slot
    let e = Trace::from_bytes(&bytes, "c.tpt").unwrap_err();
    assert!(
        matches!(
            e,
            TraceError::Corrupt {
                index: 0,
                offset: 16,
                ..
            }
        ),
        "{e:?}"
    );
}
