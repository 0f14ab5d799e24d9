//! Durable state of documents: the op log and snapshots, behind the [`Storage`] trait.
//!
//! Each shard's storage worker ([`worker::StorageWorker`]) owns one `Storage` value outright:
//! rooms produce [`LogRecord`]s, the shard hands every record of a loop turn to the worker,
//! which appends the records of every turn queued since its last sync and calls
//! [`Storage::sync`] once (group commit); only when it reports success does the shard
//! release the echoes and acks that those records cover.
//! Storage never sees a socket, and rooms never see a file.
//!
//! - [`DiskStorage`] (`disk.rs`): the durable default; per-document log segments and snapshot
//!   (`docs/storage.md` has the formats and guarantees).
//! - `journal.rs`: the per-storage write-ahead journal (one fsync per turn) and its redo at open.
//! - `format.rs`: CRC32C-checked record framing, bytes only.
//! - [`fs`]: the file operations behind a trait, with a fault-injecting layer for tests.
//! - [`PgStorage`] (`postgres/`): documents in PostgreSQL (`--database-url`), one connection
//!   per shard, one autocommit statement per sync.
//! - [`MemoryStorage`] (`memory.rs`): nothing survives the process; tests and benchmarks.
//! - [`worker`]: the storage pipeline: a thread per shard owns its `Storage` and runs every
//!   call on it, so the shard never waits on storage.

mod disk;
mod format;
pub mod fs;
mod journal;
mod memory;
pub mod postgres;
pub mod worker;

pub use disk::{lock_data_dir, DiskStorage, CHECKPOINT_BYTES, CHECKPOINT_INTERVAL};
pub use memory::MemoryStorage;
pub use postgres::{PgOptions, PgStorage};

use tungstenite::Utf8Bytes;

/// One entry of a document's op log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LogRecord {
    /// An accepted op message: its `server_seq` and its `op_echo` JSON exactly as broadcast.
    Ops {
        /// The op message's position in the document's history.
        server_seq: u64,
        /// The complete `op_echo` object, `type` included.
        echo: Utf8Bytes,
    },
    /// Replica ids up to and including `last` may have been handed out in this document;
    /// after a restart the next assigned replica is above it.
    ReplicasReserved {
        /// Highest replica id reserved so far.
        last: u64,
    },
    /// Replica `replica` belongs to `user` (a token's `sub`) from now on: the first user to
    /// use a replica owns it, and another user's `hello` naming it is refused. Written once
    /// per replica, only with access control on.
    ReplicaOwner {
        /// The replica.
        replica: u64,
        /// The token's `sub`.
        user: String,
    },
    /// The op message `server_seq` was accepted at `time_ms` (unix milliseconds, the
    /// server's clock): the `time` of history entries. Written in the same batch as its
    /// `Ops` record (after it); logs written before it existed simply have none.
    Accepted {
        /// The op message.
        server_seq: u64,
        /// When the server accepted it.
        time_ms: u64,
    },
}

/// A document's state at `head`, from which its log tail is replayed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredSnapshot {
    /// The document's epoch (contract: names this incarnation of its history).
    pub epoch: String,
    /// `server_seq` of the last op message the snapshot includes (0 for none).
    pub head: u64,
    /// Highest replica id reserved when the snapshot was taken.
    pub replicas_reserved: u64,
    /// Every replica's owner (`LogRecord::ReplicaOwner`) known when the snapshot was taken,
    /// by replica. Empty without access control, and in snapshots of format 1.
    pub owners: Vec<(u64, String)>,
    /// The contract's snapshot object, `{"runs":[...]}`, as JSON text.
    pub runs_json: Utf8Bytes,
}

/// What [`Storage::load`] finds for a document.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredDoc {
    /// The document's epoch.
    pub epoch: String,
    /// The newest snapshot, if one was written.
    pub snapshot: Option<StoredSnapshot>,
    /// Every record after the snapshot (or since creation), in log order.
    pub tail: Vec<LogRecord>,
}

/// Why storage refused; the shard turns each into an `unavailable` error for the clients
/// concerned and never acknowledges what failed.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// A read, write or fsync failed (ENOSPC, EIO, ...). Nothing since the last successful
    /// sync is durable.
    #[error("storage I/O failed: {context}: {source}")]
    Io {
        /// What was being done, naming the file.
        context: String,
        /// The operating system's error.
        source: std::io::Error,
    },
    /// Stored data failed its checksum or did not decode, somewhere other than a torn tail.
    #[error("corrupt data in {file} at byte {offset}: {detail}")]
    Corrupt {
        /// The file, relative to the data directory.
        file: String,
        /// Byte offset of the bad record.
        offset: u64,
        /// What was wrong.
        detail: String,
    },
    /// The storage could not be reached (a database down, restarting or refusing
    /// connections): nothing was done. The shard refuses ops with `unavailable` before
    /// applying them until an attempt (or [`Storage::probe`]) succeeds again.
    #[error("storage unavailable: {reason}")]
    Unavailable {
        /// What failed, for the log.
        reason: String,
    },
    /// A sync (commit) whose outcome is unknown: the connection was lost during it, or it
    /// timed out and was cancelled. Its records may or may not be durable. The shard sends
    /// their senders neither an echo nor an error, closes the document's clients with 1013 and
    /// reloads the document from storage before serving it again.
    #[error("storage outcome unknown: {reason}")]
    OutcomeUnknown {
        /// What happened, for the log.
        reason: String,
    },
    /// Cluster mode: this node does not hold the document's lease (another node took it over,
    /// or it could not be acquired), so nothing of it was read or written. The shard drops the
    /// document and closes its clients with 1013; they come back through the owner.
    #[error("document fenced: {reason}")]
    Fenced {
        /// Why, for the log.
        reason: String,
    },
}

/// The op log and snapshots of the documents of one shard.
///
/// Implementations must not depend on the shard count: a restart with another `--shards`
/// finds every document.
pub trait Storage: Send {
    /// Loads a document's snapshot and log tail, or `Ok(None)` when nothing is stored.
    ///
    /// # Errors
    /// `Corrupt` when a checksum fails anywhere but a torn last record (which is cut off with
    /// a warning); `Io` when reading fails; `Unavailable` when the storage cannot be reached
    /// (the hello waiting for it gets `unavailable` and a close 1013).
    fn load(&mut self, doc: &str) -> Result<Option<StoredDoc>, StorageError>;

    /// Buffers `record` for `doc`, durable after the next successful [`Storage::sync`].
    /// `epoch` is persisted with the document's first record.
    ///
    /// # Errors
    /// `Io` when the write fails; the record is then not durable and must not be acknowledged.
    fn append(&mut self, doc: &str, epoch: &str, record: &LogRecord) -> Result<(), StorageError>;

    /// Makes every record appended so far durable (one fsync per touched file at most).
    ///
    /// Runs on the shard's storage worker thread, never on the shard.
    ///
    /// # Errors
    /// `Io` when a write or fsync fails: none of the records appended since the previous
    /// successful sync may be acknowledged, and the storage rolls its files back to that point.
    /// `Unavailable` when the storage could not be reached (nothing was committed).
    /// `OutcomeUnknown` when the commit may or may not have happened; the next `load` of each
    /// document concerned must return what was really committed.
    fn sync(&mut self) -> Result<(), StorageError>;

    /// Atomically replaces the document's snapshot; the log it covers may then be reclaimed.
    ///
    /// # Errors
    /// `Io`; the previous snapshot and log stay valid.
    fn write_snapshot(&mut self, doc: &str, snapshot: &StoredSnapshot) -> Result<(), StorageError>;

    /// The document left memory: release its file handles and caches.
    fn release(&mut self, doc: &str);

    /// Checks whether the storage can be reached again; called by the storage worker every
    /// [`worker::PROBE_INTERVAL`] while the last attempt returned `Unavailable` or
    /// `OutcomeUnknown`. Backends that are never unreachable keep the default.
    ///
    /// # Errors
    /// `Unavailable` while it still cannot be reached.
    fn probe(&mut self) -> Result<(), StorageError> {
        Ok(())
    }

    /// The documents whose records the last [`Storage::sync`] refused by their lease's fence
    /// (cluster mode): nothing of theirs in it was written, while the sync's other documents
    /// were committed. The worker reports them before the sync's completion. Backends without
    /// leases keep the default (none).
    fn take_fenced(&mut self) -> Vec<String> {
        Vec::new()
    }

    /// Removes everything stored for `doc` (log, snapshot, replica owners), durably: a later
    /// [`Storage::load`] finds nothing, after a crash too. `Ok(false)` when nothing was
    /// stored. Called only with nothing of `doc` pending (after a sync). Backends that cannot
    /// delete keep the default, which refuses.
    ///
    /// # Errors
    /// `Io` or `Unavailable`; the document may then still be there.
    fn delete(&mut self, doc: &str) -> Result<bool, StorageError> {
        let _ = doc;
        Err(StorageError::Unavailable {
            reason: "this storage cannot delete documents".to_owned(),
        })
    }

    /// The stored documents' names in order, starting with `prefix`, after `after`, for which
    /// `keep` holds (a shard keeps the ones it owns), at most `limit`; and whether more follow.
    ///
    /// # Errors
    /// `Io`, `Corrupt` or `Unavailable` when the names cannot be read.
    fn list_names(
        &mut self,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
        keep: &dyn Fn(&str) -> bool,
    ) -> Result<(Vec<String>, bool), StorageError> {
        let _ = (prefix, after, limit, keep);
        Ok((Vec::new(), false))
    }
}

/// [`Storage::list_names`] over every name in order: the page after `after`.
pub(crate) fn page_of_names(
    names: impl IntoIterator<Item = String>,
    prefix: &str,
    after: Option<&str>,
    limit: usize,
    keep: &dyn Fn(&str) -> bool,
) -> (Vec<String>, bool) {
    let mut page = Vec::new();
    for name in names {
        if !name.starts_with(prefix) || after.is_some_and(|after| name.as_str() <= after) {
            continue;
        }
        if !keep(&name) {
            continue;
        }
        if page.len() == limit {
            return (page, true);
        }
        page.push(name);
    }
    (page, false)
}
