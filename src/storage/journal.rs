//! The per-shard write-ahead journal of [`DiskStorage`](super::DiskStorage): one file that
//! receives every segment write of a loop turn with one `write` and one `fdatasync`, so a turn
//! costs one fsync however many documents it touched; and the startup redo of the journals
//! that dead storages left behind.
//!
//! A journal entry is physical: "these bytes were appended to segment `n` of document `d` at
//! byte `o`". Redo cuts the segment at `o` and writes the bytes again, so it is idempotent,
//! repairs a segment tail that a power cut left torn or stale, and needs no knowledge of the
//! shard count. Journal names are unique per process start and storage instance
//! (`j-<start ns>-<pid>-<n>`), never tied to a shard index.
//!
//! A live journal holds a `flock` on its file; redo only touches journals whose lock it can
//! take (their owner is dead or dropped), under a process-wide mutex so that the shards of one
//! process opening at once never race on them. This module never decides what is acknowledged.

use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

use super::format::{self, Body, Frame};
use super::fs::Fs;
use super::StorageError;

/// Directory of the journals, under the data directory.
pub(crate) const JOURNAL_DIR: &str = "journal";
const JOURNAL_PREFIX: &str = "j-";

/// Serializes redo and journal creation between the storages of one process.
static RECOVERY: parking_lot::Mutex<()> = parking_lot::Mutex::new(());
/// Numbers the journals created by this process.
static NEXT_INSTANCE: AtomicU64 = AtomicU64::new(0);
/// Nanoseconds since the Unix epoch when this process created its first journal.
static PROCESS_STAMP: OnceLock<u128> = OnceLock::new();

/// A storage's own journal, open for appending.
pub(crate) struct Journal<H> {
    /// Handle used for the appends, truncations and fsyncs.
    pub file: H,
    /// `journal/<name>`, relative to the data directory.
    pub rel: String,
    /// Absolute path.
    pub path: PathBuf,
    /// Bytes of the journal that belong to successful syncs.
    pub len: u64,
    /// A rollback or checkpoint left the journal's content in doubt: the next sync must
    /// checkpoint (and empty it) first.
    pub poisoned: bool,
    /// Holds the `flock` that marks this journal as live.
    _lock: std::fs::File,
}

/// Redoes every journal no live storage holds, then creates a new journal for the caller.
///
/// # Errors
/// `Io` when a file operation fails; `Corrupt` when a dead journal is damaged before its end
/// (naming the journal and the offset): its entries cannot be attributed to documents, so
/// nothing is served until an operator looked at it.
pub(crate) fn recover_and_open<F: Fs>(
    fs: &F,
    root: &Path,
    fsync: bool,
) -> Result<Journal<F::File>, StorageError> {
    let _guard = RECOVERY.lock();
    let dir = root.join(JOURNAL_DIR);
    fs.create_dir_all(&dir)
        .map_err(|e| io_error(format!("creating {}", dir.display()), e))?;
    redo(fs, root, fsync)?;
    let stamp = PROCESS_STAMP.get_or_init(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos())
    });
    let n = NEXT_INSTANCE.fetch_add(1, Ordering::Relaxed);
    let name = format!(
        "{JOURNAL_PREFIX}{stamp:032}-{:010}-{n:020}",
        std::process::id()
    );
    let rel = format!("{JOURNAL_DIR}/{name}");
    let path = dir.join(&name);
    let lock = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&path)
        .map_err(|e| io_error(format!("creating {rel}"), e))?;
    if !flock_exclusive(&lock).map_err(|e| io_error(format!("locking {rel}"), e))? {
        return Err(io_error(
            format!("locking {rel}"),
            io::ErrorKind::WouldBlock.into(),
        ));
    }
    let file = fs
        .open_append(&path)
        .map_err(|e| io_error(format!("opening {rel}"), e))?;
    if fsync {
        for d in [dir.as_path(), root] {
            fs.sync_dir(d)
                .map_err(|e| io_error(format!("syncing directory {}", d.display()), e))?;
        }
    }
    Ok(Journal {
        file,
        rel,
        path,
        len: 0,
        poisoned: false,
        _lock: lock,
    })
}

/// Takes an exclusive `flock` without waiting; `Ok(false)` when another open file holds it.
fn flock_exclusive(file: &std::fs::File) -> io::Result<bool> {
    use std::os::fd::AsRawFd;
    // SAFETY: a valid open descriptor; flock has no memory arguments.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc == 0 {
        return Ok(true);
    }
    let e = io::Error::last_os_error();
    if e.kind() == io::ErrorKind::WouldBlock {
        Ok(false)
    } else {
        Err(e)
    }
}

/// One entry read back, with its place in the replay order.
struct Redo {
    seg_no: u64,
    offset: u64,
    order: usize,
    bytes: Vec<u8>,
}

/// Replays the dead journals into the document segments, makes the segments durable, then
/// deletes the journals.
fn redo<F: Fs>(fs: &F, root: &Path, fsync: bool) -> Result<(), StorageError> {
    let dir = root.join(JOURNAL_DIR);
    let Some(mut names) = fs
        .list_dir(&dir)
        .map_err(|e| io_error(format!("listing {JOURNAL_DIR}"), e))?
    else {
        return Ok(());
    };
    names.retain(|n| n.starts_with(JOURNAL_PREFIX));
    // Names sort by process start, then storage instance: the order they were written in.
    names.sort();
    let mut dead = Vec::new();
    for name in names {
        let rel = format!("{JOURNAL_DIR}/{name}");
        let path = dir.join(&name);
        let lock = match std::fs::OpenOptions::new().read(true).open(&path) {
            Ok(file) => file,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(io_error(format!("opening {rel}"), e)),
        };
        // Held by a live storage of this process: its owner checkpoints it.
        if flock_exclusive(&lock).map_err(|e| io_error(format!("locking {rel}"), e))? {
            dead.push((rel, path, lock));
        }
    }
    if dead.is_empty() {
        return Ok(());
    }
    let mut by_doc: HashMap<String, Vec<Redo>> = HashMap::new();
    let mut order = 0;
    for (rel, path, _) in &dead {
        let data = fs
            .read_file(path)
            .map_err(|e| io_error(format!("reading {rel}"), e))?
            .unwrap_or_default();
        let mut offset = 0;
        while offset < data.len() {
            match format::read_frame(&data, offset) {
                Frame::Ok { body, next } => {
                    let entry =
                        format::decode_journal(body).map_err(|d| corrupt(rel, offset, d))?;
                    by_doc.entry(entry.doc).or_default().push(Redo {
                        seg_no: entry.seg_no,
                        offset: entry.offset,
                        order,
                        bytes: entry.bytes,
                    });
                    order += 1;
                    offset = next;
                }
                Frame::Bad {
                    detail,
                    reaches_end,
                } if reaches_end || !any_frame_after(&data, offset) => {
                    // An interrupted journal write (cut short, zeros, or a hole a power cut
                    // left in the unsynced tail): that turn was never acknowledged.
                    log::warn!("{rel}: torn entry at byte {offset} ({detail}); ignored");
                    break;
                }
                Frame::Bad { detail, .. } => return Err(corrupt(rel, offset, detail)),
            }
        }
    }
    let n_docs = by_doc.len();
    for (doc, mut entries) in by_doc {
        entries.sort_by_key(|e| (e.seg_no, e.offset, e.order));
        let hex = format!("{:032x}", format::name_hash(&doc));
        let rel_dir = format!("docs/{}/{}", &hex[..2], hex);
        let doc_dir = root.join(&rel_dir);
        let existing = fs
            .list_dir(&doc_dir)
            .map_err(|e| io_error(format!("listing {rel_dir}"), e))?
            .unwrap_or_default();
        let floor = snapshot_floor(fs, &doc_dir, &doc);
        let mut idx = 0;
        while idx < entries.len() {
            let seg_no = entries[idx].seg_no;
            let end = idx + entries[idx..].partition_point(|e| e.seg_no == seg_no);
            let group = &entries[idx..end];
            idx = end;
            let name = format!("log-{seg_no:020}");
            let rel = format!("{rel_dir}/{name}");
            if !existing.contains(&name) {
                if seg_no <= floor {
                    // Compaction removed it: a durable snapshot covers these records.
                    continue;
                }
                fs.create_dir_all(&doc_dir)
                    .map_err(|e| io_error(format!("creating {rel_dir}"), e))?;
            }
            redo_segment(fs, &root.join(&rel), &rel, group)?;
        }
    }
    if fsync {
        // One syncfs makes every redone segment, the segments the dead storages wrote since
        // their last checkpoint and the new directory entries durable at once (one fsync per
        // segment cost ~3.7 s for 1,000 of them on the benchmark disk).
        fs.sync_fs(root)
            .map_err(|e| io_error("syncing the data directory's file system".to_owned(), e))?;
    }
    for (rel, path, _) in &dead {
        fs.remove_file(path)
            .map_err(|e| io_error(format!("removing {rel}"), e))?;
    }
    if fsync {
        fs.sync_dir(&dir)
            .map_err(|e| io_error(format!("syncing directory {JOURNAL_DIR}"), e))?;
    }
    log::info!(
        "redid {} journal(s) covering {n_docs} document(s)",
        dead.len()
    );
    Ok(())
}

/// Whether a valid frame starts anywhere after `offset`: damage followed by valid entries is
/// corruption; damage with nothing valid after it is a torn tail.
fn any_frame_after(data: &[u8], offset: usize) -> bool {
    (offset + 1..data.len()).any(|pos| matches!(format::read_frame(data, pos), Frame::Ok { .. }))
}

/// Rebuilds one segment from its journal entries (sorted by offset, later journals last);
/// the caller makes it durable.
///
/// Each entry's bytes are put at its offset: bytes that already match are left alone, so the
/// common case after `kill -9` writes nothing; a tail that a power cut left short, stale
/// (a rolled-back turn's bytes where an acknowledged turn's now belong) or zeroed is
/// rewritten. After the last entry, complete frames are kept (records never journaled; only
/// an interrupted, unacknowledged turn or a journal an operator cut short leaves them) and
/// anything else is cut. A segment shorter than the first entry's offset gets zeros there,
/// which its next load reports as corruption at that offset, confined to the document.
fn redo_segment<F: Fs>(fs: &F, path: &Path, rel: &str, group: &[Redo]) -> Result<(), StorageError> {
    let original = fs
        .read_file(path)
        .map_err(|e| io_error(format!("reading {rel}"), e))?;
    let existed = original.is_some();
    let mut data = original.unwrap_or_default();
    let original_len = data.len();
    let mut first_diff = usize::MAX;
    let mut last_end = 0;
    for entry in group {
        let (Ok(off), Ok(len)) = (
            usize::try_from(entry.offset),
            u32::try_from(entry.bytes.len()),
        ) else {
            return Err(corrupt(rel, 0, "journal entry offset out of range"));
        };
        let end = off + len as usize;
        if data.len() < end {
            // Everything from the current end on is new (zeros up to `off` included).
            first_diff = first_diff.min(data.len());
            data.resize(end, 0);
        }
        if let Some(i) = data[off..end]
            .iter()
            .zip(&entry.bytes)
            .position(|(a, b)| a != b)
        {
            first_diff = first_diff.min(off + i);
            data[off..end].copy_from_slice(&entry.bytes);
        }
        last_end = end;
    }
    let mut pos = last_end;
    while pos < data.len() {
        match format::read_frame(&data, pos) {
            Frame::Ok { next, .. } => pos = next,
            Frame::Bad { .. } => break,
        }
    }
    if pos < data.len() {
        first_diff = first_diff.min(pos);
        data.truncate(pos);
    }
    if first_diff != usize::MAX || !existed {
        let cut = first_diff.min(original_len).min(data.len());
        let mut file = fs
            .open_append(path)
            .map_err(|e| io_error(format!("opening {rel}"), e))?;
        fs.truncate(&mut file, cut as u64)
            .map_err(|e| io_error(format!("truncating {rel}"), e))?;
        fs.append(&mut file, &data[cut..])
            .map_err(|e| io_error(format!("redoing {rel}"), e))?;
        log::info!("{rel}: rebuilt from byte {cut} by redo");
    }
    Ok(())
}

/// The segment floor of `doc`'s snapshot (0 when it has none or it does not read).
fn snapshot_floor<F: Fs>(fs: &F, doc_dir: &Path, doc: &str) -> u64 {
    let Ok(Some(data)) = fs.read_file(&doc_dir.join("snapshot")) else {
        return 0;
    };
    match format::read_frame(&data, 0) {
        Frame::Ok { body, .. } => match format::decode_body(body, doc) {
            Ok(Body::Snapshot { seg_floor, .. }) => seg_floor,
            _ => 0,
        },
        Frame::Bad { .. } => 0,
    }
}

fn io_error(context: String, source: io::Error) -> StorageError {
    StorageError::Io { context, source }
}

fn corrupt(file: &str, offset: usize, detail: impl Into<String>) -> StorageError {
    StorageError::Corrupt {
        file: file.to_owned(),
        offset: offset as u64,
        detail: detail.into(),
    }
}
