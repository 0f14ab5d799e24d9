//! On-disk record framing: every log and snapshot record is
//! `[len u32][!len u32][crc32c u32][body]` (little endian), where `crc32c` covers the body.
//!
//! This module only turns records into bytes and back; it never touches a file.
//! The body always starts with a kind byte and the document's 64-bit key (a hash of its name),
//! so a record found in the wrong document's directory is caught.

use super::{LogRecord, StoredSnapshot};
use tungstenite::Utf8Bytes;

/// Bytes before a record's body: length, inverted length, checksum.
pub(crate) const FRAME_HEADER_BYTES: usize = 12;
/// Largest body accepted: a snapshot of a document at the default 16 Mi character limit in
/// runs of one character is far below this; anything bigger is corruption.
pub(crate) const BODY_BYTES_MAX: usize = 1 << 30;

const KIND_HEADER: u8 = 1;
const KIND_OPS: u8 = 2;
const KIND_REPLICAS: u8 = 3;
const KIND_SNAPSHOT: u8 = 4;
const KIND_JOURNAL: u8 = 5;
const KIND_OWNER: u8 = 6;
/// `LogRecord::Accepted`: an op message's acceptance time (older logs have none).
const KIND_ACCEPTED: u8 = 8;
/// A snapshot with its replica owners (format 2); format 1 (`KIND_SNAPSHOT`) is still read,
/// with no owners.
const KIND_SNAPSHOT_OWNERS: u8 = 7;

/// One entry of a shard's write-ahead journal: bytes written to a document's segment at a
/// known offset (physical redo: replaying it twice gives the same file).
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct JournalEntry {
    /// Full document name (its directory is derived from it).
    pub doc: String,
    /// Segment number the bytes went to.
    pub seg_no: u64,
    /// Byte offset in that segment where they start.
    pub offset: u64,
    /// The framed segment records, exactly as appended.
    pub bytes: Vec<u8>,
}

/// A decoded record body.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Body {
    /// First record of every log segment: names the document and its epoch.
    Header {
        /// Full document name.
        doc: String,
        /// The document's epoch.
        epoch: String,
    },
    /// An op log record.
    Log(LogRecord),
    /// The whole content of a snapshot file.
    Snapshot {
        /// Full document name.
        doc: String,
        /// The snapshot.
        snapshot: StoredSnapshot,
        /// Log segments up to this number existed when it was written; new ones go above.
        seg_floor: u64,
    },
}

/// Result of reading one frame at some offset of a file.
#[derive(Debug)]
pub(crate) enum Frame<'a> {
    /// A complete frame whose checksum matches; the next frame starts at `next`.
    Ok {
        /// The body bytes.
        body: &'a [u8],
        /// Offset of the next frame.
        next: usize,
    },
    /// The bytes at this offset are not a valid frame; `reaches_end` tells whether the bad
    /// frame extends to (or past) the end of the data, as a torn final write does.
    Bad {
        /// What is wrong, for the error message.
        detail: String,
        /// Whether the damage could be an interrupted final write.
        reaches_end: bool,
    },
}

/// The 64-bit key of a document stored in each of its records.
pub(crate) fn doc_key(doc: &str) -> u64 {
    name_hash(doc) as u64
}

/// A stable 128-bit FNV-1a hash of a document name: names its directory.
pub(crate) fn name_hash(doc: &str) -> u128 {
    const OFFSET: u128 = 0x6c62_272e_07bb_0142_62b8_2175_6295_c58d;
    const PRIME: u128 = 0x0000_0000_0100_0000_0000_0000_0000_013b;
    let mut hash = OFFSET;
    for byte in doc.as_bytes() {
        hash ^= u128::from(*byte);
        hash = hash.wrapping_mul(PRIME);
    }
    hash
}

/// Appends one framed record to `out`.
pub(crate) fn encode_log(out: &mut Vec<u8>, doc: &str, record: &LogRecord) {
    let start = begin(
        out,
        doc,
        match record {
            LogRecord::Ops { .. } => KIND_OPS,
            LogRecord::ReplicasReserved { .. } => KIND_REPLICAS,
            LogRecord::ReplicaOwner { .. } => KIND_OWNER,
            LogRecord::Accepted { .. } => KIND_ACCEPTED,
        },
    );
    match record {
        LogRecord::Ops { server_seq, echo } => {
            out.extend_from_slice(&server_seq.to_le_bytes());
            out.extend_from_slice(echo.as_bytes());
        }
        LogRecord::ReplicasReserved { last } => out.extend_from_slice(&last.to_le_bytes()),
        LogRecord::ReplicaOwner { replica, user } => {
            out.extend_from_slice(&replica.to_le_bytes());
            out.extend_from_slice(user.as_bytes());
        }
        LogRecord::Accepted {
            server_seq,
            time_ms,
        } => {
            out.extend_from_slice(&server_seq.to_le_bytes());
            out.extend_from_slice(&time_ms.to_le_bytes());
        }
    }
    finish(out, start);
}

/// Appends a segment header record to `out`.
pub(crate) fn encode_header(out: &mut Vec<u8>, doc: &str, epoch: &str) {
    let start = begin(out, doc, KIND_HEADER);
    put_str(out, epoch);
    put_str(out, doc);
    finish(out, start);
}

/// Appends a snapshot record to `out`.
pub(crate) fn encode_snapshot(
    out: &mut Vec<u8>,
    doc: &str,
    snapshot: &StoredSnapshot,
    seg_floor: u64,
) {
    // Format 1 while there are no owners, so a server without access control keeps writing
    // what older versions read.
    let with_owners = !snapshot.owners.is_empty();
    let kind = if with_owners {
        KIND_SNAPSHOT_OWNERS
    } else {
        KIND_SNAPSHOT
    };
    let start = begin(out, doc, kind);
    out.extend_from_slice(&seg_floor.to_le_bytes());
    out.extend_from_slice(&snapshot.head.to_le_bytes());
    out.extend_from_slice(&snapshot.replicas_reserved.to_le_bytes());
    put_str(out, &snapshot.epoch);
    put_str(out, doc);
    if with_owners {
        out.extend_from_slice(&(snapshot.owners.len() as u32).to_le_bytes());
        for (replica, user) in &snapshot.owners {
            out.extend_from_slice(&replica.to_le_bytes());
            put_str(out, user);
        }
    }
    out.extend_from_slice(snapshot.runs_json.as_bytes());
    finish(out, start);
}

/// Appends one framed journal entry to `out`: `bytes` written to segment `seg_no` of `doc`
/// at `offset`.
pub(crate) fn encode_journal(out: &mut Vec<u8>, doc: &str, seg_no: u64, offset: u64, bytes: &[u8]) {
    let start = begin(out, doc, KIND_JOURNAL);
    put_str(out, doc);
    out.extend_from_slice(&seg_no.to_le_bytes());
    out.extend_from_slice(&offset.to_le_bytes());
    out.extend_from_slice(bytes);
    finish(out, start);
}

/// Decodes a journal entry body whose checksum already matched.
pub(crate) fn decode_journal(body: &[u8]) -> Result<JournalEntry, String> {
    let mut reader = Reader { data: body };
    let kind = reader.u8()?;
    if kind != KIND_JOURNAL {
        return Err(format!("record kind {kind} in a journal"));
    }
    let key = reader.u64()?;
    let doc = reader.str()?;
    if key != doc_key(&doc) {
        return Err("journal entry key does not match its document name".to_owned());
    }
    let seg_no = reader.u64()?;
    let offset = reader.u64()?;
    let bytes = std::mem::take(&mut reader.data).to_vec();
    Ok(JournalEntry {
        doc,
        seg_no,
        offset,
        bytes,
    })
}

fn begin(out: &mut Vec<u8>, doc: &str, kind: u8) -> usize {
    let start = out.len();
    out.extend_from_slice(&[0; FRAME_HEADER_BYTES]);
    out.push(kind);
    out.extend_from_slice(&doc_key(doc).to_le_bytes());
    start
}

fn finish(out: &mut [u8], start: usize) {
    let body = &out[start + FRAME_HEADER_BYTES..];
    assert!(
        body.len() <= BODY_BYTES_MAX,
        "record body of {} bytes",
        body.len()
    );
    let len = body.len() as u32;
    let crc = crc32c::crc32c(body);
    out[start..start + 4].copy_from_slice(&len.to_le_bytes());
    out[start + 4..start + 8].copy_from_slice(&(!len).to_le_bytes());
    out[start + 8..start + 12].copy_from_slice(&crc.to_le_bytes());
}

fn put_str(out: &mut Vec<u8>, text: &str) {
    out.extend_from_slice(&(text.len() as u32).to_le_bytes());
    out.extend_from_slice(text.as_bytes());
}

/// Reads the frame at `offset` of `data`.
pub(crate) fn read_frame(data: &[u8], offset: usize) -> Frame<'_> {
    let rest = &data[offset..];
    if rest.len() < FRAME_HEADER_BYTES {
        return Frame::Bad {
            detail: format!("{} stray bytes, shorter than a frame header", rest.len()),
            reaches_end: true,
        };
    }
    let len = u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]);
    let len_inv = u32::from_le_bytes([rest[4], rest[5], rest[6], rest[7]]);
    let crc = u32::from_le_bytes([rest[8], rest[9], rest[10], rest[11]]);
    if len != !len_inv {
        // A torn write past the old end reads as zeros (or nothing); anything else is damage.
        let zeros = rest.iter().all(|b| *b == 0);
        return Frame::Bad {
            detail: "frame length check failed".to_owned(),
            reaches_end: zeros,
        };
    }
    let len = len as usize;
    if len > BODY_BYTES_MAX {
        return Frame::Bad {
            detail: format!("frame length {len} over the limit"),
            reaches_end: false,
        };
    }
    let end = FRAME_HEADER_BYTES + len;
    if end > rest.len() {
        return Frame::Bad {
            detail: format!("frame of {len} bytes runs past the end of the file"),
            reaches_end: true,
        };
    }
    let body = &rest[FRAME_HEADER_BYTES..end];
    if crc32c::crc32c(body) != crc {
        return Frame::Bad {
            detail: "checksum mismatch".to_owned(),
            reaches_end: end == rest.len(),
        };
    }
    Frame::Ok {
        body,
        next: offset + end,
    }
}

/// Decodes a body whose checksum already matched, checking it belongs to `doc`.
/// The document name a segment header or snapshot record carries, without knowing the
/// document beforehand (listing a data directory); `None` for other records.
pub(crate) fn decode_name(body: &[u8]) -> Result<Option<String>, String> {
    let mut reader = Reader { data: body };
    let kind = reader.u8()?;
    let key = reader.u64()?;
    let name = match kind {
        KIND_HEADER => {
            let _epoch = reader.str()?;
            reader.str()?
        }
        KIND_SNAPSHOT => {
            for _ in 0..3 {
                reader.u64()?;
            }
            let _epoch = reader.str()?;
            reader.str()?
        }
        _ => return Ok(None),
    };
    if key != doc_key(&name) {
        return Err(format!("record key {key:016x} does not match its name"));
    }
    Ok(Some(name))
}

pub(crate) fn decode_body(body: &[u8], doc: &str) -> Result<Body, String> {
    let mut reader = Reader { data: body };
    let kind = reader.u8()?;
    let key = reader.u64()?;
    if key != doc_key(doc) {
        return Err(format!(
            "record belongs to another document (key {key:016x})"
        ));
    }
    match kind {
        KIND_HEADER => {
            let epoch = reader.str()?;
            let name = reader.str()?;
            reader.end()?;
            Ok(Body::Header { doc: name, epoch })
        }
        KIND_OPS => {
            let server_seq = reader.u64()?;
            let echo = reader.rest_str()?;
            Ok(Body::Log(LogRecord::Ops {
                server_seq,
                echo: Utf8Bytes::from(echo),
            }))
        }
        KIND_REPLICAS => {
            let last = reader.u64()?;
            reader.end()?;
            Ok(Body::Log(LogRecord::ReplicasReserved { last }))
        }
        KIND_OWNER => {
            let replica = reader.u64()?;
            let user = reader.rest_str()?;
            Ok(Body::Log(LogRecord::ReplicaOwner { replica, user }))
        }
        KIND_ACCEPTED => {
            let server_seq = reader.u64()?;
            let time_ms = reader.u64()?;
            reader.end()?;
            Ok(Body::Log(LogRecord::Accepted {
                server_seq,
                time_ms,
            }))
        }
        KIND_SNAPSHOT | KIND_SNAPSHOT_OWNERS => {
            let seg_floor = reader.u64()?;
            let head = reader.u64()?;
            let replicas_reserved = reader.u64()?;
            let epoch = reader.str()?;
            let name = reader.str()?;
            let mut owners = Vec::new();
            if kind == KIND_SNAPSHOT_OWNERS {
                let n = reader.u32()? as usize;
                // Each entry takes at least 12 bytes: a corrupt count cannot allocate much.
                owners.reserve(n.min(reader.data.len() / 12));
                for _ in 0..n {
                    let replica = reader.u64()?;
                    owners.push((replica, reader.str()?));
                }
            }
            let runs_json = reader.rest_str()?;
            Ok(Body::Snapshot {
                doc: name,
                snapshot: StoredSnapshot {
                    epoch,
                    head,
                    replicas_reserved,
                    owners,
                    runs_json: Utf8Bytes::from(runs_json),
                },
                seg_floor,
            })
        }
        other => Err(format!("unknown record kind {other}")),
    }
}

struct Reader<'a> {
    data: &'a [u8],
}

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8], String> {
        if self.data.len() < n {
            return Err("record body too short".to_owned());
        }
        let (head, tail) = self.data.split_at(n);
        self.data = tail;
        Ok(head)
    }

    fn u8(&mut self) -> Result<u8, String> {
        Ok(self.take(1)?[0])
    }

    fn u32(&mut self) -> Result<u32, String> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn u64(&mut self) -> Result<u64, String> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_le_bytes(a))
    }

    fn str(&mut self) -> Result<String, String> {
        let n = self.u32()? as usize;
        let b = self.take(n)?;
        String::from_utf8(b.to_vec()).map_err(|_| "string is not UTF-8".to_owned())
    }

    fn rest_str(&mut self) -> Result<String, String> {
        let b = std::mem::take(&mut self.data);
        String::from_utf8(b.to_vec()).map_err(|_| "payload is not UTF-8".to_owned())
    }

    fn end(&self) -> Result<(), String> {
        if self.data.is_empty() {
            Ok(())
        } else {
            Err(format!(
                "{} unexpected bytes at the end of a record",
                self.data.len()
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(record: LogRecord) {
        let mut out = Vec::new();
        encode_log(&mut out, "doc", &record);
        match read_frame(&out, 0) {
            Frame::Ok { body, next } => {
                assert_eq!(next, out.len());
                assert_eq!(decode_body(body, "doc"), Ok(Body::Log(record)));
                assert!(decode_body(body, "other").is_err());
            }
            Frame::Bad { detail, .. } => panic!("{detail}"),
        }
    }

    #[test]
    fn records_round_trip() {
        check(LogRecord::Ops {
            server_seq: 7,
            echo: Utf8Bytes::from_static("{\"type\":\"op_echo\"}"),
        });
        check(LogRecord::ReplicasReserved { last: 1 << 40 });
        check(LogRecord::ReplicaOwner {
            replica: 9,
            user: "alice@example.com".to_owned(),
        });
        check(LogRecord::Accepted {
            server_seq: 7,
            time_ms: 1_764_880_000_123,
        });
    }

    #[test]
    fn snapshots_round_trip_with_owners_and_format_1_still_reads() {
        let snapshot = StoredSnapshot {
            epoch: "e".to_owned(),
            head: 4,
            replicas_reserved: 16,
            owners: vec![(1, "alice".to_owned()), (3, "bob".to_owned())],
            runs_json: Utf8Bytes::from_static("{\"runs\":[]}"),
        };
        let mut out = Vec::new();
        encode_snapshot(&mut out, "d", &snapshot, 2);
        let Frame::Ok { body, .. } = read_frame(&out, 0) else {
            panic!("frame")
        };
        assert_eq!(
            decode_body(body, "d"),
            Ok(Body::Snapshot {
                doc: "d".to_owned(),
                snapshot: snapshot.clone(),
                seg_floor: 2,
            })
        );
        // Format 1, as written before owners existed.
        let mut old = Vec::new();
        let start = begin(&mut old, "d", KIND_SNAPSHOT);
        old.extend_from_slice(&2u64.to_le_bytes());
        old.extend_from_slice(&4u64.to_le_bytes());
        old.extend_from_slice(&16u64.to_le_bytes());
        put_str(&mut old, "e");
        put_str(&mut old, "d");
        old.extend_from_slice(snapshot.runs_json.as_bytes());
        finish(&mut old, start);
        let Frame::Ok { body, .. } = read_frame(&old, 0) else {
            panic!("frame")
        };
        assert_eq!(
            decode_body(body, "d"),
            Ok(Body::Snapshot {
                doc: "d".to_owned(),
                snapshot: StoredSnapshot {
                    owners: Vec::new(),
                    ..snapshot
                },
                seg_floor: 2,
            })
        );
    }

    #[test]
    fn every_prefix_of_a_frame_reads_as_torn() {
        let mut out = Vec::new();
        encode_header(&mut out, "d", "e");
        for cut in 0..out.len() {
            match read_frame(&out[..cut], 0) {
                Frame::Bad { reaches_end, .. } => assert!(reaches_end || cut == 0, "cut {cut}"),
                Frame::Ok { .. } => panic!("prefix {cut} read as a frame"),
            }
        }
    }

    #[test]
    fn journal_entries_round_trip() {
        let mut out = Vec::new();
        encode_journal(&mut out, "d/x", 3, 77, b"seg bytes");
        match read_frame(&out, 0) {
            Frame::Ok { body, next } => {
                assert_eq!(next, out.len());
                assert_eq!(
                    decode_journal(body),
                    Ok(JournalEntry {
                        doc: "d/x".to_owned(),
                        seg_no: 3,
                        offset: 77,
                        bytes: b"seg bytes".to_vec(),
                    })
                );
                assert!(decode_body(body, "d/x").is_err());
            }
            Frame::Bad { detail, .. } => panic!("{detail}"),
        }
    }

    #[test]
    fn a_flipped_bit_is_caught() {
        let mut out = Vec::new();
        encode_header(&mut out, "doc", "epoch");
        let n = out.len();
        encode_header(&mut out, "doc", "epoch");
        for i in 0..n {
            let mut bad = out.clone();
            bad[i] ^= 0x10;
            match read_frame(&bad, 0) {
                Frame::Bad { reaches_end, .. } => assert!(!reaches_end, "byte {i}"),
                Frame::Ok { .. } => panic!("flip at {i} went unnoticed"),
            }
        }
    }
}
