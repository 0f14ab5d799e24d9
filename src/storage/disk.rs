//! [`DiskStorage`]: the durable [`Storage`]: per-document append-only log segments plus one
//! snapshot file, group-committed through a per-storage write-ahead journal with one fsync
//! per [`Storage::sync`] however many documents the turn touched (`journal.rs`).
//!
//! Layout (see `docs/storage.md`), independent of the shard count:
//! `<data_dir>/docs/<h2>/<h32>/` where `h32` is the hex 128-bit FNV-1a hash of the document name
//! (the raw name never becomes a path) holding `log-<n>` segments (first record: a header
//! with the full name and the epoch) and `snapshot` (atomically replaced).
//!
//! Each sync appends the turn's bytes to the touched segments (no fsync) and the same bytes,
//! tagged with document, segment and offset, to the journal, which alone is fsynced. A
//! checkpoint (every [`CHECKPOINT_BYTES`] of journal, [`CHECKPOINT_INTERVAL`], and on drop)
//! fsyncs the segments written since the previous one and empties the journal; at open, the
//! journals of dead storages are redone into the segments before anything is served.
//!
//! This module never acknowledges anything: it tells the shard whether a sync succeeded.
//! It takes no lock on the hot path (only `<data_dir>/LOCK` against other processes, and a
//! process-wide mutex while opening) and never touches a document that its shard does not
//! own, so any number of `DiskStorage` values (one per shard) can share one data directory.

use std::collections::{HashMap, HashSet};
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::format::{self, Body, Frame};
use super::fs::{Fs, OsFs};
use super::journal::{self, Journal};
use super::{LogRecord, Storage, StorageError, StoredDoc, StoredSnapshot};
use crate::config::FsyncMode;

/// Open segment handles kept per storage before idle ones are closed (stays well under the
/// usual 1024 file descriptor limit with sockets beside it).
const FILES_OPEN_MAX: usize = 256;
/// Capacity of a document's pending buffer kept across syncs; bigger ones are freed.
const PENDING_BYTES_KEPT_MAX: usize = 64 * 1024;
/// Files from which a checkpoint fsyncs in parallel (below it, helper threads cost more
/// than they save).
const PARALLEL_SYNC_FILES_MIN: usize = 8;
/// Most helper threads one checkpoint starts.
const SYNC_THREADS_MAX: usize = 16;
/// Journal size that triggers a checkpoint; it bounds the redo work at startup per shard.
pub const CHECKPOINT_BYTES: u64 = 16 << 20;
/// Longest time between checkpoints while the journal is not empty.
pub const CHECKPOINT_INTERVAL: Duration = Duration::from_secs(30);
const SNAPSHOT_FILE: &str = "snapshot";
const SNAPSHOT_TEMP_FILE: &str = "snapshot.tmp";
const SEGMENT_PREFIX: &str = "log-";

/// The log state of one document while its shard has it loaded.
#[derive(Debug)]
struct DocLog<H> {
    /// `docs/<h2>/<h32>`, relative to the data directory.
    rel_dir: String,
    /// Whether the directory exists on disk (else a first append creates it and its parents).
    dir_exists: bool,
    /// Set by the first append or snapshot of a new document, or by load.
    epoch: Option<String>,
    /// Highest segment number used or seen; a new segment takes the next one.
    seg_no: u64,
    /// Segment receiving appends; `None` until the next append starts a new one.
    current: Option<u64>,
    /// Open handle on `current`, opened lazily and closed when too many are open.
    file: Option<H>,
    /// Bytes of `current` that survived the last successful sync (or load).
    durable_len: u64,
    /// Framed records appended since the last sync; written and fsynced by `sync`.
    pending: Vec<u8>,
    /// Highest `server_seq` appended, pending included.
    last_seq: u64,
    /// Highest replica reservation appended, pending included.
    last_reserved: u64,
    /// Replica owners known (the snapshot's plus `ReplicaOwner` records after it): a
    /// snapshot with fewer does not cover the log.
    n_owners: usize,
    /// Segments before `current` still on disk (holding records a snapshot did not cover).
    old_segments: Vec<u64>,
    /// Listed in `DiskStorage::touched`.
    touched: bool,
    /// `release` came while records were pending: drop after the next sync.
    release_after_sync: bool,
}

impl<H> DocLog<H> {
    fn new(doc: &str) -> DocLog<H> {
        let hex = format!("{:032x}", format::name_hash(doc));
        DocLog {
            rel_dir: format!("docs/{}/{}", &hex[..2], hex),
            dir_exists: false,
            epoch: None,
            seg_no: 0,
            current: None,
            file: None,
            durable_len: 0,
            pending: Vec::new(),
            last_seq: 0,
            last_reserved: 0,
            n_owners: 0,
            old_segments: Vec::new(),
            touched: false,
            release_after_sync: false,
        }
    }

    fn segment_rel(&self, no: u64) -> String {
        segment_rel(&self.rel_dir, no)
    }
}

/// Where deleted documents' directories go (under the data directory, outside `docs/`).
const TRASH_DIR: &str = "trash";

/// The durable op log and snapshots, one value per shard, all sharing one data directory.
///
/// Write path: [`Storage::append`] only frames the record into the document's pending buffer;
/// [`Storage::sync`] writes the turn's entries to the journal with one write, every touched
/// document's buffer to its segment, then fsyncs the journal once. A failed write or fsync
/// truncates the journal and every touched file back to their last good lengths and forgets
/// the documents' cached state, so the next use reads the disk again.
///
/// Dropping it checkpoints (a clean shutdown leaves no journal); [`DiskStorage::abandon`]
/// drops it as `kill -9` would.
pub struct DiskStorage<F: Fs = OsFs> {
    fs: F,
    root: PathBuf,
    fsync: FsyncMode,
    /// Documents loaded or written by this shard; removed by `release` and after failures.
    docs: HashMap<String, DocLog<F::File>>,
    /// Documents with pending records, in first-append order; drained by `sync`.
    touched: Vec<String>,
    /// Directories that gained an entry in this turn.
    dirs_to_sync: Vec<PathBuf>,
    /// This storage's write-ahead journal.
    journal: Journal<F::File>,
    /// The turn's journal entries, reused across syncs.
    journal_buf: Vec<u8>,
    /// Segments (relative paths) written since the last checkpoint.
    dirty_segments: HashSet<String>,
    /// Directories that gained an entry since the last checkpoint.
    dirty_dirs: Vec<PathBuf>,
    /// When the journal was last emptied.
    last_checkpoint: Instant,
    /// Journal size that triggers a checkpoint.
    checkpoint_bytes: u64,
    /// Time that triggers a checkpoint of a non-empty journal.
    checkpoint_interval: Duration,
    /// Drop without the final checkpoint ([`DiskStorage::abandon`]).
    abandoned: bool,
    /// Set when fsyncing segments at a checkpoint failed. The kernel reports a write-back
    /// error once and may mark the failed pages clean, so a retried fsync can succeed without
    /// the bytes being on disk: from then on the journal is the only durable copy of what it
    /// holds. It is never truncated again in this process and every later `sync` fails (no
    /// more acknowledgements) until a restart redoes the journal into the segments.
    checkpoint_failed: bool,
    /// Segment handles currently open.
    n_files_open: usize,
    /// `<data_dir>/LOCK`, held with a POSIX record lock so a second server process cannot
    /// use the same directory (the shards of one process share it).
    _lock: std::fs::File,
}

impl DiskStorage<OsFs> {
    /// Opens (creating it when absent) the data directory `data_dir`. Nothing is read until a
    /// document is loaded: recovery is lazy and per document.
    ///
    /// # Errors
    /// `Io` when the directory cannot be created.
    pub fn open(data_dir: &Path, fsync: FsyncMode) -> Result<DiskStorage<OsFs>, StorageError> {
        DiskStorage::with_fs(data_dir, fsync, OsFs)
    }
}

impl<F: Fs> DiskStorage<F> {
    /// Like [`DiskStorage::open`] over another file layer (tests inject faults with it).
    ///
    /// # Errors
    /// `Io` when the directory cannot be created.
    pub fn with_fs(
        data_dir: &Path,
        fsync: FsyncMode,
        fs: F,
    ) -> Result<DiskStorage<F>, StorageError> {
        let docs_dir = data_dir.join("docs");
        fs.create_dir_all(&docs_dir)
            .map_err(|e| io_error(format!("creating {}", docs_dir.display()), e))?;
        let lock = lock_data_dir(data_dir)?;
        let journal = journal::recover_and_open(&fs, data_dir, fsync == FsyncMode::Always)?;
        Ok(DiskStorage {
            fs,
            root: data_dir.to_path_buf(),
            fsync,
            docs: HashMap::new(),
            touched: Vec::new(),
            dirs_to_sync: Vec::new(),
            journal,
            journal_buf: Vec::new(),
            dirty_segments: HashSet::new(),
            dirty_dirs: Vec::new(),
            last_checkpoint: Instant::now(),
            checkpoint_bytes: CHECKPOINT_BYTES,
            checkpoint_interval: CHECKPOINT_INTERVAL,
            n_files_open: 0,
            _lock: lock,
            abandoned: false,
            checkpoint_failed: false,
        })
    }

    /// Sets when checkpoints happen: once the journal holds `bytes`, or `interval` after the
    /// previous one (tests and benchmarks; the defaults are [`CHECKPOINT_BYTES`] and
    /// [`CHECKPOINT_INTERVAL`]).
    pub fn set_checkpoint_limits(&mut self, bytes: u64, interval: Duration) {
        self.checkpoint_bytes = bytes;
        self.checkpoint_interval = interval;
    }

    /// Syncs anything pending, then makes every segment written since the last checkpoint
    /// durable and empties the journal.
    ///
    /// # Errors
    /// `Io` when a write or fsync fails; the journal then still holds everything.
    pub fn checkpoint(&mut self) -> Result<(), StorageError> {
        self.sync()?;
        self.checkpoint_inner()
    }

    /// Bytes in the journal since the last checkpoint.
    pub fn journal_len(&self) -> u64 {
        self.journal.len
    }

    /// FOR CRASH TESTS: drops the storage as `kill -9` would: no checkpoint, the journal
    /// stays for the next open to redo, pending records are lost.
    pub fn abandon(mut self) {
        self.abandoned = true;
    }

    /// Fsyncs the segments and directories written since the last checkpoint, then empties
    /// the journal. Does not touch pending records.
    fn checkpoint_inner(&mut self) -> Result<(), StorageError> {
        if self.checkpoint_failed {
            return Err(checkpoint_failed_error());
        }
        if self.fsync_on() {
            // One fsync per file (on helper threads from 8 on), not syncfs: on a file system
            // shared with other writers syncfs also flushes their data (84 ms against 12 ms
            // for 100 segments on the benchmark machine).
            let paths: Vec<String> = self.dirty_segments.iter().cloned().collect();
            let mut synced = sync_paths(&self.fs, &self.root, &paths);
            if synced.is_ok() {
                self.dirty_dirs.sort_unstable();
                self.dirty_dirs.dedup();
                for dir in &self.dirty_dirs {
                    if let Err(e) = self.fs.sync_dir(dir) {
                        synced = Err(io_error(format!("syncing directory {}", dir.display()), e));
                        break;
                    }
                }
            }
            if let Err(e) = synced {
                // Never retry: a second fsync can report success for pages the kernel already
                // gave up on. Keep the journal for the next start's redo and stop acknowledging.
                self.checkpoint_failed = true;
                log::error!(
                    "checkpoint fsync failed; the journal {} is kept for redo and this storage \
                     refuses writes until the server restarts: {e}",
                    self.journal.rel
                );
                return Err(e);
            }
        }
        // Everything the journal holds is now durable in the segments.
        self.dirty_segments.clear();
        self.dirty_dirs.clear();
        if self.journal.len > 0 || self.journal.poisoned {
            self.journal.poisoned = true;
            self.fs
                .truncate(&mut self.journal.file, 0)
                .map_err(|e| io_error(format!("truncating {}", self.journal.rel), e))?;
            if self.fsync_on() {
                self.fs
                    .sync(&mut self.journal.file)
                    .map_err(|e| io_error(format!("syncing {}", self.journal.rel), e))?;
            }
            self.journal.len = 0;
            self.journal.poisoned = false;
        }
        self.last_checkpoint = Instant::now();
        Ok(())
    }

    /// Every document stored in the data directory, by name, sorted (for `collab-engine
    /// copy`). A document directory whose snapshot and first segment name no document is
    /// skipped with a warning (a crash before its first record was complete).
    ///
    /// # Errors
    /// `Io` when listing or reading fails; `Corrupt` when a record naming the document is
    /// damaged or names a document that does not belong in its directory.
    pub fn list_docs(&self) -> Result<Vec<String>, StorageError> {
        let mut names = Vec::new();
        let docs = self.root.join("docs");
        let outer = self
            .fs
            .list_dir(&docs)
            .map_err(|e| io_error("listing docs".to_owned(), e))?
            .unwrap_or_default();
        for h2 in outer {
            let rel_h2 = format!("docs/{h2}");
            let inner = self
                .fs
                .list_dir(&self.root.join(&rel_h2))
                .map_err(|e| io_error(format!("listing {rel_h2}"), e))?
                .unwrap_or_default();
            for h32 in inner {
                let rel_dir = format!("{rel_h2}/{h32}");
                match self.doc_name_in(&rel_dir)? {
                    Some(name) if format!("{:032x}", format::name_hash(&name)) == h32 => {
                        names.push(name)
                    }
                    Some(_) => {
                        return Err(corrupt(&rel_dir, 0, "holds another document's records"))
                    }
                    None => log::warn!("{rel_dir}: no record names a document; skipped"),
                }
            }
        }
        names.sort();
        Ok(names)
    }

    /// The name in a document directory's snapshot, else in its first segment's header.
    fn doc_name_in(&self, rel_dir: &str) -> Result<Option<String>, StorageError> {
        let files = self
            .fs
            .list_dir(&self.root.join(rel_dir))
            .map_err(|e| io_error(format!("listing {rel_dir}"), e))?
            .unwrap_or_default();
        let mut segments: Vec<&String> = files
            .iter()
            .filter(|n| n.starts_with(SEGMENT_PREFIX))
            .collect();
        segments.sort();
        let candidates = files
            .iter()
            .filter(|n| *n == SNAPSHOT_FILE)
            .chain(segments.into_iter().take(1));
        for file in candidates {
            let rel = format!("{rel_dir}/{file}");
            let Some(data) = self
                .fs
                .read_file(&self.root.join(&rel))
                .map_err(|e| io_error(format!("reading {rel}"), e))?
            else {
                continue;
            };
            if data.is_empty() {
                continue;
            }
            let body = match format::read_frame(&data, 0) {
                Frame::Ok { body, .. } => body,
                Frame::Bad { detail, .. } => return Err(corrupt(&rel, 0, detail)),
            };
            if let Some(name) =
                format::decode_name(body).map_err(|detail| corrupt(&rel, 0, detail))?
            {
                return Ok(Some(name));
            }
        }
        Ok(None)
    }

    /// The data directory.
    pub fn data_dir(&self) -> &Path {
        &self.root
    }

    fn fsync_on(&self) -> bool {
        self.fsync == FsyncMode::Always
    }

    /// The cached log of `doc`, reading the disk first when it is not loaded.
    fn doc_log(&mut self, doc: &str) -> Result<&mut DocLog<F::File>, StorageError> {
        if !self.docs.contains_key(doc) {
            let (_, log) = self.scan(doc)?;
            self.docs.insert(doc.to_owned(), log);
        }
        self.docs.get_mut(doc).ok_or_else(|| {
            io_error(
                format!("document {doc:?} vanished"),
                io::ErrorKind::NotFound.into(),
            )
        })
    }

    /// Reads a document from disk: its snapshot and every log record after it, verifying each
    /// checksum; cuts a torn final record; cleans up files a crash left behind.
    fn scan(&mut self, doc: &str) -> Result<(Option<StoredDoc>, DocLog<F::File>), StorageError> {
        let mut log = DocLog::new(doc);
        let dir = self.root.join(&log.rel_dir);
        let names = self
            .fs
            .list_dir(&dir)
            .map_err(|e| io_error(format!("listing {}", log.rel_dir), e))?;
        let Some(names) = names else {
            return Ok((None, log));
        };
        log.dir_exists = true;
        if names.iter().any(|n| n == SNAPSHOT_TEMP_FILE) {
            // An interrupted snapshot write: the previous snapshot (or none) is still the valid one.
            let tmp = dir.join(SNAPSHOT_TEMP_FILE);
            self.fs.remove_file(&tmp).map_err(|e| {
                io_error(format!("removing {}/{SNAPSHOT_TEMP_FILE}", log.rel_dir), e)
            })?;
        }

        let mut snapshot = None;
        let mut seg_floor = 0;
        if names.iter().any(|n| n == SNAPSHOT_FILE) {
            let (snap, floor) = self.read_snapshot(doc, &log.rel_dir)?;
            seg_floor = floor;
            snapshot = snap;
        }
        let mut segments: Vec<u64> = names
            .iter()
            .filter_map(|n| n.strip_prefix(SEGMENT_PREFIX))
            .filter(|digits| !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()))
            .filter_map(|digits| digits.parse().ok())
            .collect();
        segments.sort_unstable();

        let covered_head = snapshot.as_ref().map_or(0, |s: &StoredSnapshot| s.head);
        let covered_reserved = snapshot.as_ref().map_or(0, |s| s.replicas_reserved);
        let mut epoch = snapshot.as_ref().map(|s| s.epoch.clone());
        let mut tail = Vec::new();
        let mut last_seq = covered_head;
        let mut last_reserved = covered_reserved;
        let covered_owners: Vec<u64> = snapshot
            .as_ref()
            .map_or_else(Vec::new, |s| s.owners.iter().map(|(r, _)| *r).collect());
        let mut n_owners = covered_owners.len();
        // Segments whose every record the snapshot covers: deleted once loading succeeded.
        let mut covered_segments = Vec::new();
        let mut last_len = 0;
        for (idx, &no) in segments.iter().enumerate() {
            let is_last = idx + 1 == segments.len();
            let rel = log.segment_rel(no);
            let data = self
                .fs
                .read_file(&self.root.join(&rel))
                .map_err(|e| io_error(format!("reading {rel}"), e))?
                .unwrap_or_default();
            let mut offset = 0;
            let mut n_tail_records = 0;
            while offset < data.len() {
                let (body, next) = match format::read_frame(&data, offset) {
                    Frame::Ok { body, next } => (body, next),
                    Frame::Bad {
                        detail,
                        reaches_end,
                    } if is_last && reaches_end => {
                        log::warn!(
                            "{rel}: torn record at byte {offset} ({detail}); cutting {} bytes off the end",
                            data.len() - offset
                        );
                        self.cut(&rel, offset as u64)?;
                        break;
                    }
                    Frame::Bad { detail, .. } => return Err(corrupt(&rel, offset, detail)),
                };
                let body = format::decode_body(body, doc)
                    .map_err(|detail| corrupt(&rel, offset, detail))?;
                match body {
                    Body::Header {
                        doc: name,
                        epoch: seg_epoch,
                    } => {
                        if offset != 0 {
                            return Err(corrupt(
                                &rel,
                                offset,
                                "segment header in the middle of a segment",
                            ));
                        }
                        if name != doc {
                            return Err(corrupt(
                                &rel,
                                offset,
                                "segment belongs to another document",
                            ));
                        }
                        match &epoch {
                            Some(e) if *e != seg_epoch => {
                                return Err(corrupt(
                                    &rel,
                                    offset,
                                    "segment epoch differs from the document's",
                                ))
                            }
                            Some(_) => {}
                            None => epoch = Some(seg_epoch),
                        }
                    }
                    Body::Log(_) | Body::Snapshot { .. } if offset == 0 => {
                        return Err(corrupt(
                            &rel,
                            offset,
                            "segment does not start with a header",
                        ));
                    }
                    Body::Snapshot { .. } => {
                        return Err(corrupt(
                            &rel,
                            offset,
                            "snapshot record inside a log segment",
                        ))
                    }
                    Body::Log(LogRecord::Ops { server_seq, echo }) => {
                        if server_seq > covered_head {
                            if server_seq != last_seq + 1 {
                                return Err(corrupt(
                                    &rel,
                                    offset,
                                    format!("server_seq {server_seq} follows {last_seq}"),
                                ));
                            }
                            last_seq = server_seq;
                            n_tail_records += 1;
                            tail.push(LogRecord::Ops { server_seq, echo });
                        }
                    }
                    Body::Log(LogRecord::ReplicasReserved { last }) => {
                        if last > covered_reserved {
                            last_reserved = last_reserved.max(last);
                            n_tail_records += 1;
                            tail.push(LogRecord::ReplicasReserved { last });
                        }
                    }
                    Body::Log(LogRecord::ReplicaOwner { replica, user }) => {
                        if !covered_owners.contains(&replica) {
                            n_owners += 1;
                            n_tail_records += 1;
                            tail.push(LogRecord::ReplicaOwner { replica, user });
                        }
                    }
                    Body::Log(LogRecord::Accepted {
                        server_seq,
                        time_ms,
                    }) => {
                        // Only meaningful with its op message, which the snapshot may cover.
                        if server_seq > covered_head {
                            tail.push(LogRecord::Accepted {
                                server_seq,
                                time_ms,
                            });
                        }
                    }
                }
                offset = next;
            }
            if n_tail_records == 0 {
                covered_segments.push(no);
            }
            if is_last {
                last_len = offset as u64;
            }
        }

        log.seg_no = seg_floor.max(segments.last().copied().unwrap_or(0));
        log.last_seq = last_seq;
        log.last_reserved = last_reserved;
        log.n_owners = n_owners;
        if snapshot.is_none() && tail.is_empty() {
            // Nothing of value (a crash before the first record was complete): start afresh,
            // so the next append writes a header with the new epoch.
            self.remove_segments(&log, &segments);
            return Ok((None, log));
        }
        let stored_epoch = epoch.clone().unwrap_or_default();
        log.epoch = epoch;
        // Whole segments the snapshot covers are left over from a crash during compaction.
        let covered_all = covered_segments.len() == segments.len();
        let stale: Vec<u64> = covered_segments
            .iter()
            .copied()
            .filter(|no| covered_all || Some(no) != segments.last())
            .collect();
        self.remove_segments(&log, &stale);
        for no in segments {
            if stale.contains(&no) {
                continue;
            }
            if log.current.is_some() {
                log.old_segments.extend(log.current);
            }
            log.current = Some(no);
        }
        if log.current.is_some() {
            log.durable_len = last_len;
        }
        Ok((
            Some(StoredDoc {
                epoch: stored_epoch,
                snapshot,
                tail,
            }),
            log,
        ))
    }

    /// Reads and checks `<rel_dir>/snapshot`: exactly one record, of this document.
    fn read_snapshot(
        &mut self,
        doc: &str,
        rel_dir: &str,
    ) -> Result<(Option<StoredSnapshot>, u64), StorageError> {
        let rel = format!("{rel_dir}/{SNAPSHOT_FILE}");
        let Some(data) = self
            .fs
            .read_file(&self.root.join(&rel))
            .map_err(|e| io_error(format!("reading {rel}"), e))?
        else {
            return Ok((None, 0));
        };
        let body = match format::read_frame(&data, 0) {
            Frame::Ok { body, next } if next == data.len() => body,
            Frame::Ok { next, .. } => {
                return Err(corrupt(&rel, next, "bytes after the snapshot record"))
            }
            Frame::Bad { detail, .. } => return Err(corrupt(&rel, 0, detail)),
        };
        match format::decode_body(body, doc).map_err(|detail| corrupt(&rel, 0, detail))? {
            Body::Snapshot {
                doc: name,
                snapshot,
                seg_floor,
            } if name == doc => Ok((Some(snapshot), seg_floor)),
            Body::Snapshot { .. } => Err(corrupt(&rel, 0, "snapshot belongs to another document")),
            _ => Err(corrupt(&rel, 0, "not a snapshot record")),
        }
    }

    /// Cuts a torn tail off segment `rel` at `len`.
    fn cut(&mut self, rel: &str, len: u64) -> Result<(), StorageError> {
        let path = self.root.join(rel);
        let mut file = self
            .fs
            .open_append(&path)
            .map_err(|e| io_error(format!("opening {rel}"), e))?;
        self.fs
            .truncate(&mut file, len)
            .map_err(|e| io_error(format!("truncating {rel}"), e))?;
        if self.fsync_on() {
            self.fs
                .sync(&mut file)
                .map_err(|e| io_error(format!("syncing {rel}"), e))?;
        }
        Ok(())
    }

    /// Best-effort removal of segments that hold nothing needed; failures only leave files
    /// that the next load skips again.
    fn remove_segments(&mut self, log: &DocLog<F::File>, segments: &[u64]) {
        if segments.is_empty() {
            return;
        }
        for &no in segments {
            let rel = log.segment_rel(no);
            if let Err(e) = self.fs.remove_file(&self.root.join(&rel)) {
                log::warn!("could not remove {rel}: {e}");
            }
        }
        if self.fsync_on() {
            if let Err(e) = self.fs.sync_dir(&self.root.join(&log.rel_dir)) {
                log::warn!("could not sync {}: {e}", log.rel_dir);
            }
        }
    }

    /// Forgets every pending record, cuts each touched file back to its durable length and
    /// drops the touched documents' cached state so their next use reads the disk.
    fn abort_pending(&mut self) {
        for name in std::mem::take(&mut self.touched) {
            let Some(mut log) = self.docs.remove(&name) else {
                continue;
            };
            let rel = log
                .current
                .map(|no| log.segment_rel(no))
                .unwrap_or_default();
            if let Some(file) = log.file.as_mut() {
                let cut = self.fs.truncate(file, log.durable_len).and_then(|()| {
                    if self.fsync == FsyncMode::Always {
                        self.fs.sync(file)
                    } else {
                        Ok(())
                    }
                });
                if let Err(e) = cut {
                    // The bytes past durable_len were never acknowledged; if they survive, the
                    // next load either finds whole records (harmless: resends are acked) or a
                    // torn tail, which it cuts.
                    log::error!(
                        "rolling back {rel} to {} bytes failed: {e}",
                        log.durable_len
                    );
                }
            }
            if log.file.is_some() {
                self.n_files_open -= 1;
            }
        }
        // The files this turn created stay (cut to their durable length), and the next use of
        // their documents finds them as existing segments: their directory entries must still
        // be made durable by the next checkpoint, before the journal that could rebuild them is
        // emptied (found by the simulator: a power cut after that checkpoint lost a segment
        // with acknowledged records).
        if self.fsync_on() {
            self.dirty_dirs.append(&mut self.dirs_to_sync);
        }
        self.dirs_to_sync.clear();
        if self.fsync_on() {
            let journal = &mut self.journal;
            let cut = self
                .fs
                .truncate(&mut journal.file, journal.len)
                .and_then(|()| self.fs.sync(&mut journal.file));
            if let Err(e) = cut {
                // Its tail may hold entries of this refused turn: empty it (after a checkpoint)
                // before the next turn can be acknowledged.
                log::error!(
                    "rolling back {} to {} bytes failed: {e}",
                    journal.rel,
                    journal.len
                );
                journal.poisoned = true;
            }
        }
    }

    /// Writes everything pending: the turn's journal entries with one write, each touched
    /// segment with one write, then one fsync of the journal. Leaves state untouched on error.
    fn commit(&mut self) -> Result<(), StorageError> {
        let journal_on = self.fsync_on();
        if journal_on {
            // Journal first: a write that fails half-way is cut off again by the rollback,
            // and redo never meets a segment write that the journal does not describe.
            self.journal_buf.clear();
            for name in &self.touched {
                let Some(log) = self.docs.get(name) else {
                    continue;
                };
                if log.pending.is_empty() {
                    continue;
                }
                format::encode_journal(
                    &mut self.journal_buf,
                    name,
                    log.current.unwrap_or(0),
                    log.durable_len,
                    &log.pending,
                );
            }
            self.fs
                .append(&mut self.journal.file, &self.journal_buf)
                .map_err(|e| io_error(format!("appending to {}", self.journal.rel), e))?;
        }
        for name in &self.touched {
            let Some(log) = self.docs.get_mut(name) else {
                continue;
            };
            if log.pending.is_empty() {
                continue;
            }
            let Some(file) = log.file.as_mut() else {
                return Err(io_error(
                    format!("{}: no open segment", log.rel_dir),
                    io::ErrorKind::NotFound.into(),
                ));
            };
            let (rel_dir, no) = (&log.rel_dir, log.current.unwrap_or(0));
            self.fs
                .append(file, &log.pending)
                .map_err(|e| io_error(format!("appending to {}", segment_rel(rel_dir, no)), e))?;
        }
        if journal_on {
            // The one fsync of the turn. The segments and new directory entries are made
            // durable by the next checkpoint; until then the journal can rebuild them.
            self.fs
                .sync(&mut self.journal.file)
                .map_err(|e| io_error(format!("syncing {}", self.journal.rel), e))?;
        }
        Ok(())
    }

    /// Drops a document's cached state and its file handle.
    fn forget(&mut self, doc: &str) {
        if self.docs.remove(doc).is_some_and(|log| log.file.is_some()) {
            self.n_files_open -= 1;
        }
    }

    /// Closes the handles of documents with nothing pending when too many are open.
    fn close_idle_files(&mut self) {
        if self.n_files_open < FILES_OPEN_MAX {
            return;
        }
        for log in self.docs.values_mut() {
            if !log.touched && log.file.take().is_some() {
                self.n_files_open -= 1;
            }
        }
    }
}

impl<F: Fs> Storage for DiskStorage<F> {
    fn load(&mut self, doc: &str) -> Result<Option<StoredDoc>, StorageError> {
        if let Some(old) = self.docs.remove(doc) {
            if old.touched {
                // The shard reloads a document only after dropping it; records it appended but
                // never synced were never acknowledged.
                log::warn!("{}: dropping unsynced records on reload", old.rel_dir);
                self.touched.retain(|name| name != doc);
            }
            if old.file.is_some() {
                self.n_files_open -= 1;
            }
        }
        let (stored, log) = self.scan(doc)?;
        self.docs.insert(doc.to_owned(), log);
        Ok(stored)
    }

    fn append(&mut self, doc: &str, epoch: &str, record: &LogRecord) -> Result<(), StorageError> {
        match self.append_inner(doc, epoch, record) {
            Ok(()) => Ok(()),
            Err(e) => {
                // The whole turn fails: nothing pending may reach the disk later behind a
                // room that the shard reloads from disk.
                self.abort_pending();
                self.forget(doc);
                Err(e)
            }
        }
    }

    fn sync(&mut self) -> Result<(), StorageError> {
        if self.checkpoint_failed {
            self.abort_pending();
            return Err(checkpoint_failed_error());
        }
        if self.journal.poisoned {
            if let Err(e) = self.checkpoint_inner() {
                self.abort_pending();
                return Err(e);
            }
        }
        if self.touched.is_empty() && self.dirs_to_sync.is_empty() {
            return Ok(());
        }
        if let Err(e) = self.commit() {
            self.abort_pending();
            return Err(e);
        }
        let journal_on = self.fsync_on();
        if journal_on {
            self.journal.len += self.journal_buf.len() as u64;
            self.dirty_dirs.append(&mut self.dirs_to_sync);
        }
        if self.journal_buf.capacity() > PENDING_BYTES_KEPT_MAX {
            self.journal_buf = Vec::new();
        }
        for name in std::mem::take(&mut self.touched) {
            let Some(log) = self.docs.get_mut(&name) else {
                continue;
            };
            if journal_on && !log.pending.is_empty() {
                self.dirty_segments
                    .insert(log.segment_rel(log.current.unwrap_or(0)));
            }
            log.durable_len += log.pending.len() as u64;
            log.pending.clear();
            if log.pending.capacity() > PENDING_BYTES_KEPT_MAX {
                // One big message must not pin its buffer in every document it touched.
                log.pending = Vec::new();
            }
            log.touched = false;
            if log.release_after_sync {
                self.forget(&name);
            }
        }
        self.dirs_to_sync.clear();
        if journal_on
            && (self.journal.len >= self.checkpoint_bytes
                || self.last_checkpoint.elapsed() >= self.checkpoint_interval)
        {
            // The turn is durable in the journal whatever happens here.
            if let Err(e) = self.checkpoint_inner() {
                log::warn!("checkpoint failed (the journal keeps everything): {e}");
            }
        }
        Ok(())
    }

    fn delete(&mut self, doc: &str) -> Result<bool, StorageError> {
        // Journal entries of the document must not be redone after a crash: make the
        // segments durable and empty the journal first.
        self.checkpoint_inner()?;
        self.forget(doc);
        let log = DocLog::<F::File>::new(doc);
        let dir = self.root.join(&log.rel_dir);
        let Some(files) = self
            .fs
            .list_dir(&dir)
            .map_err(|e| io_error(format!("listing {}", log.rel_dir), e))?
        else {
            return Ok(false);
        };
        // One rename takes the directory out of `docs/` atomically; the files are removed
        // from the trash afterwards (what a crash leaves there is never read).
        let trash = self.root.join(TRASH_DIR);
        self.fs
            .create_dir_all(&trash)
            .map_err(|e| io_error(format!("creating {TRASH_DIR}"), e))?;
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let hex = log.rel_dir.rsplit('/').next().unwrap_or_default();
        let gone = trash.join(format!("{hex}-{nanos}"));
        self.fs
            .rename(&dir, &gone)
            .map_err(|e| io_error(format!("moving {} to {TRASH_DIR}", log.rel_dir), e))?;
        if self.fsync_on() {
            let parent = dir.parent().unwrap_or(&self.root).to_path_buf();
            self.fs
                .sync_dir(&parent)
                .map_err(|e| io_error(format!("syncing the parent of {}", log.rel_dir), e))?;
        }
        for file in files {
            if let Err(e) = self.fs.remove_file(&gone.join(&file)) {
                log::warn!("could not remove {TRASH_DIR}/{hex}-{nanos}/{file}: {e}");
            }
        }
        if let Err(e) = self.fs.remove_dir(&gone) {
            log::warn!("could not remove {TRASH_DIR}/{hex}-{nanos}: {e}");
        }
        Ok(true)
    }

    fn list_names(
        &mut self,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
        keep: &dyn Fn(&str) -> bool,
    ) -> Result<(Vec<String>, bool), StorageError> {
        let names = self.list_docs()?;
        Ok(super::page_of_names(names, prefix, after, limit, keep))
    }

    fn write_snapshot(&mut self, doc: &str, snapshot: &StoredSnapshot) -> Result<(), StorageError> {
        if self.docs.get(doc).is_some_and(|log| log.touched) {
            // A snapshot must never cover records that could still be rolled back.
            self.sync()?;
        }
        // Snapshots are fsynced even with `--fsync never`: they are rare, and a power cut must
        // not leave a compacted document with a half-written snapshot and no log behind it.
        let fsync = true;
        let (rel_dir, seg_floor, dir_existed) = {
            let log = self.doc_log(doc)?;
            (log.rel_dir.clone(), log.seg_no, log.dir_exists)
        };
        let dir = self.root.join(&rel_dir);
        let mut bytes = Vec::with_capacity(snapshot.runs_json.len() + 128);
        format::encode_snapshot(&mut bytes, doc, snapshot, seg_floor);
        if !dir_existed {
            self.fs
                .create_dir_all(&dir)
                .map_err(|e| io_error(format!("creating {rel_dir}"), e))?;
        }
        let tmp = dir.join(SNAPSHOT_TEMP_FILE);
        if let Err(e) = self.fs.write_file(&tmp, &bytes, fsync) {
            // Best effort: a leftover temp file is removed by the next load anyway.
            let _ = self.fs.remove_file(&tmp);
            return Err(io_error(
                format!("writing {rel_dir}/{SNAPSHOT_TEMP_FILE}"),
                e,
            ));
        }
        self.fs
            .rename(&tmp, &dir.join(SNAPSHOT_FILE))
            .map_err(|e| io_error(format!("renaming {rel_dir}/{SNAPSHOT_TEMP_FILE}"), e))?;
        if fsync {
            self.fs
                .sync_dir(&dir)
                .map_err(|e| io_error(format!("syncing directory {rel_dir}"), e))?;
            // The document's own entries may be new since the last checkpoint (segments and
            // directories are made durable there), so its parents are synced every time.
            for parent in dir.ancestors().skip(1).take(2) {
                self.fs
                    .sync_dir(parent)
                    .map_err(|e| io_error(format!("syncing directory {}", parent.display()), e))?;
            }
        }
        // The snapshot is durable; now reclaim the log it covers.
        let Some(mut log) = self.docs.remove(doc) else {
            return Ok(());
        };
        log.dir_exists = true;
        if log.epoch.is_none() {
            log.epoch = Some(snapshot.epoch.clone());
        }
        let covers_all = snapshot.head >= log.last_seq
            && snapshot.replicas_reserved >= log.last_reserved
            && snapshot.owners.len() >= log.n_owners;
        log.n_owners = log.n_owners.max(snapshot.owners.len());
        log.last_seq = log.last_seq.max(snapshot.head);
        log.last_reserved = log.last_reserved.max(snapshot.replicas_reserved);
        // Either way the next append starts a new segment, so compaction never cuts a live file.
        let mut segments = std::mem::take(&mut log.old_segments);
        segments.extend(log.current.take());
        if log.file.take().is_some() {
            self.n_files_open -= 1;
        }
        log.durable_len = 0;
        if covers_all {
            self.remove_segments(&log, &segments);
        } else {
            log.old_segments = segments;
        }
        self.docs.insert(doc.to_owned(), log);
        Ok(())
    }

    fn release(&mut self, doc: &str) {
        match self.docs.get_mut(doc) {
            Some(log) if log.touched => log.release_after_sync = true,
            Some(_) => self.forget(doc),
            None => {}
        }
    }
}

impl<F: Fs> DiskStorage<F> {
    fn append_inner(
        &mut self,
        doc: &str,
        epoch: &str,
        record: &LogRecord,
    ) -> Result<(), StorageError> {
        if !self.docs.get(doc).is_some_and(|log| log.file.is_some()) {
            self.close_idle_files();
        }
        // Not loaded: read it first, so appends continue its log (and its torn tail is cut).
        self.doc_log(doc)?;
        let Some(log) = self.docs.get_mut(doc) else {
            return Ok(());
        };
        match &log.epoch {
            None => log.epoch = Some(epoch.to_owned()),
            Some(stored) => {
                debug_assert_eq!(stored, epoch, "room epoch differs from the stored one")
            }
        }
        if let LogRecord::Ops { server_seq, .. } = record {
            debug_assert_eq!(*server_seq, log.last_seq + 1, "server_seq out of order");
        }
        if log.current.is_none() {
            let dir = self.root.join(&log.rel_dir);
            if !log.dir_exists {
                self.fs
                    .create_dir_all(&dir)
                    .map_err(|e| io_error(format!("creating {}", log.rel_dir), e))?;
                log.dir_exists = true;
            }
            log.seg_no += 1;
            log.current = Some(log.seg_no);
            log.durable_len = 0;
            // The new segment's entry, and (cheaply, as this is rare) the entries of the
            // document's directory in case an earlier failed sync left them in doubt.
            self.dirs_to_sync
                .extend(dir.ancestors().take(3).map(Path::to_path_buf));
        }
        if log.file.is_none() {
            let Some(no) = log.current else { return Ok(()) };
            let rel = log.segment_rel(no);
            let file = self
                .fs
                .open_append(&self.root.join(&rel))
                .map_err(|e| io_error(format!("opening {rel}"), e))?;
            log.file = Some(file);
            self.n_files_open += 1;
        }
        if log.durable_len == 0 && log.pending.is_empty() {
            format::encode_header(&mut log.pending, doc, log.epoch.as_deref().unwrap_or(epoch));
        }
        format::encode_log(&mut log.pending, doc, record);
        match record {
            LogRecord::Ops { server_seq, .. } => log.last_seq = log.last_seq.max(*server_seq),
            LogRecord::ReplicasReserved { last } => {
                log.last_reserved = log.last_reserved.max(*last)
            }
            LogRecord::ReplicaOwner { .. } => log.n_owners += 1,
            LogRecord::Accepted { .. } => {}
        }
        if !log.touched {
            log.touched = true;
            self.touched.push(doc.to_owned());
        }
        Ok(())
    }
}

/// Takes the process-wide write lock on `<data_dir>/LOCK`.
///
/// POSIX record locks (`fcntl`) belong to the process, so every shard of one server can take
/// it while another process gets an error. (They are dropped when the process closes any
/// descriptor of the file, i.e. when a shard's storage is dropped at shutdown.)
///
/// # Errors
/// `Io` when the file cannot be opened or another process holds the lock.
pub fn lock_data_dir(data_dir: &Path) -> Result<std::fs::File, StorageError> {
    use std::os::fd::AsRawFd;
    let path = data_dir.join("LOCK");
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(|e| io_error(format!("opening {}", path.display()), e))?;
    // SAFETY: `flock` is plain old data; zeroed is a valid value before the fields are set.
    let mut lock: libc::flock = unsafe { std::mem::zeroed() };
    lock.l_type = libc::F_WRLCK as libc::c_short;
    lock.l_whence = libc::SEEK_SET as libc::c_short;
    // SAFETY: a valid descriptor and a valid pointer to an initialized `flock` for the call.
    let rc = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_SETLK, &lock) };
    if rc != 0 {
        let e = io::Error::last_os_error();
        return Err(io_error(
            format!(
                "locking {} (is another collab-engine using this data directory?)",
                path.display()
            ),
            e,
        ));
    }
    Ok(file)
}

/// Fsyncs the files `rels` (relative to `root`; missing ones are skipped). Many files are
/// synced from a few scoped helper threads at once: the file system then commits its journal
/// once for several of them instead of once each. The caller waits either way.
fn sync_paths<F: Fs>(fs: &F, root: &Path, rels: &[String]) -> Result<(), StorageError> {
    let sync_one = |rel: &String| {
        fs.sync_path(&root.join(rel))
            .map_err(|e| io_error(format!("syncing {rel}"), e))
    };
    if rels.len() < PARALLEL_SYNC_FILES_MIN {
        return rels.iter().try_for_each(sync_one);
    }
    let n_threads = (rels.len() / 4).clamp(2, SYNC_THREADS_MAX);
    let chunk = rels.len().div_ceil(n_threads);
    std::thread::scope(|scope| {
        let mut handles = Vec::with_capacity(n_threads);
        let mut results = Vec::new();
        for part in rels.chunks(chunk) {
            let spawned = std::thread::Builder::new()
                .name("fsync".to_owned())
                .spawn_scoped(scope, move || part.iter().try_for_each(sync_one));
            match spawned {
                Ok(handle) => handles.push(handle),
                // No thread to be had: the checkpoint fails (the journal keeps everything)
                // rather than emptying the journal over files whose fsync never ran.
                Err(e) => results.push(Err(io_error(
                    "starting an fsync helper thread".to_owned(),
                    e,
                ))),
            }
        }
        for handle in handles {
            results.push(handle.join().unwrap_or_else(|_| {
                Err(io_error(
                    "fsync helper thread panicked".to_owned(),
                    io::ErrorKind::Other.into(),
                ))
            }));
        }
        results.into_iter().collect()
    })
}

impl<F: Fs> Drop for DiskStorage<F> {
    fn drop(&mut self) {
        if self.abandoned {
            return;
        }
        // A clean shutdown: records never synced are dropped (never acknowledged); everything
        // synced goes to the segments for good and the journal is removed.
        match self.checkpoint_inner() {
            Ok(()) => {
                if let Err(e) = self.fs.remove_file(&self.journal.path) {
                    log::warn!("could not remove {}: {e}", self.journal.rel);
                }
            }
            Err(e) => log::warn!("final checkpoint failed; the next start redoes the journal: {e}"),
        }
    }
}

/// The error every write gets after a failed checkpoint fsync.
fn checkpoint_failed_error() -> StorageError {
    StorageError::Io {
        context: "an earlier checkpoint fsync failed; restart the server to redo the journal"
            .to_owned(),
        source: std::io::Error::other("storage fenced after a failed fsync"),
    }
}

fn segment_rel(rel_dir: &str, no: u64) -> String {
    format!("{rel_dir}/{SEGMENT_PREFIX}{no:020}")
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
