//! [`StorageWorker`]: the storage pipeline of one shard. A thread owns the shard's
//! [`Storage`] (any backend: disk, memory, a database) and runs every call on it, so the
//! shard thread never waits on a write, an fsync, a checkpoint, a snapshot or a load.
//!
//! The seam is two channels of typed values: the shard sends [`StorageRequest`]s in order,
//! the worker answers with [`StorageCompletion`]s in the same order and wakes the shard's
//! `mio::Waker` after each burst of them. The worker never sees a socket and decides
//! nothing about clients; the shard never calls the storage.
//!
//! Group commit across turns: the worker takes every request already queued when it wakes;
//! consecutive [`StorageRequest::Commit`]s (one per shard turn) are appended together and
//! synced once, answered by one [`StorageCompletion::Synced`] naming the first and last batch
//! it carried. While one sync is in flight the next turns' batches queue up in the channel and
//! go to the next sync, so throughput never falls to one sync per turn.
//!
//! Fencing: when a sync fails (or its outcome is unknown), every document with records in it
//! is fenced: records for it in later commits are not written (they would follow a gap in its
//! log), until the shard's [`StorageRequest::Release`] for it, which the shard sends when it
//! drops the room. The shard fails those later records too (their room is gone).
//!
//! Availability: after every attempt the worker stores whether storage answered in a
//! [`StorageAvailable`] flag the shard (before applying an op) and `/health` read; while it is
//! down the worker probes it every [`PROBE_INTERVAL`].

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, TryRecvError};
use log::{debug, error, warn};

use super::{LogRecord, Storage, StorageError, StoredDoc, StoredSnapshot};

/// How often the worker probes a storage that is unavailable.
pub const PROBE_INTERVAL: Duration = Duration::from_millis(250);

/// Longest a dropped [`StorageWorker`] waits for its thread to finish (a final disk
/// checkpoint takes well under a second; a storage that hangs is left behind).
const WORKER_EXIT_WAIT: Duration = Duration::from_secs(10);

/// One shard turn's records, numbered in submission order (1, 2, ...), per shard.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BatchId(pub u64);

/// The records of one document in one batch, in log order.
#[derive(Debug)]
pub struct DocAppend {
    /// The document (shared with its room: no copy per turn).
    pub doc: Arc<str>,
    /// Its epoch (persisted with its first record).
    pub epoch: Arc<str>,
    /// Its records of the turn, `server_seq` ascending.
    pub records: Vec<LogRecord>,
}

/// What the shard asks of its storage worker; carried out strictly in order.
#[derive(Debug)]
pub enum StorageRequest {
    /// Append these records; they are durable once a [`StorageCompletion::Synced`] whose
    /// range holds `batch` reports success.
    Commit {
        /// This turn's batch; strictly increasing from one commit to the next.
        batch: BatchId,
        /// Every document of the turn with records.
        appends: Vec<DocAppend>,
    },
    /// Load a document (answered by [`StorageCompletion::Loaded`]).
    Load {
        /// The document.
        doc: String,
    },
    /// Replace a document's snapshot (answered by [`StorageCompletion::SnapshotWritten`]).
    /// Sent only once every record it covers was reported durable.
    Snapshot {
        /// The document.
        doc: String,
        /// The snapshot.
        snapshot: StoredSnapshot,
    },
    /// The document left the shard's memory (also lifts its fence). Not answered.
    Release {
        /// The document.
        doc: String,
    },
    /// Delete the document durably (`DELETE /api/docs/{doc}`), then answer `reply` directly
    /// (not through the shard). Sent after the document left the shard's memory, so every
    /// record of it the shard sent before is written first and deleted with it.
    Delete {
        /// The document.
        doc: String,
        /// Its epoch (for the change feed).
        epoch: String,
        /// Where the HTTP answer goes.
        reply: crate::api::ApiReply,
        /// Told `deleted` once the deletion is durable (the change feed).
        webhooks: crate::webhooks::WebhookSink,
    },
    /// One shard's part of `GET /api/docs`: the first documents it owns after the cursor,
    /// with their durable head and length, answered directly through `reply`.
    List {
        /// The listing.
        query: crate::api::ListQuery,
        /// This shard's index (it lists the documents `shard_for_doc` gives it).
        shard_idx: usize,
        /// Where the part goes.
        reply: crate::api::ApiReply,
    },
}

/// What the worker reports back, in the order of the requests.
#[derive(Debug)]
pub enum StorageCompletion {
    /// One sync carried the batches `first..=last` (every commit between them, none skipped).
    Synced {
        /// The first batch of the sync.
        first: BatchId,
        /// The last batch of the sync.
        last: BatchId,
        /// `Ok`: every record of those batches is durable, except records of documents
        /// fenced by an earlier failure (never written; the shard dropped those rooms).
        /// `Err(OutcomeUnknown)`: they may or may not be. Any other `Err`: none of them is.
        result: Result<(), StorageError>,
        /// Time spent appending and syncing.
        sync_time: Duration,
        /// The commits' vectors, records drained, for the shard to reuse (no allocation per
        /// turn once the pools are warm).
        spent: Vec<Vec<DocAppend>>,
    },
    /// The answer to [`StorageRequest::Load`].
    Loaded {
        /// The document.
        doc: String,
        /// What storage holds for it.
        result: Result<Option<StoredDoc>, StorageError>,
    },
    /// Cluster mode: the next `Synced` committed none of these documents' records (their
    /// lease's fence refused them), whatever its result says for the others. Sent just before
    /// that `Synced`; the worker fences the documents until their `Release`.
    Fenced {
        /// The documents refused.
        docs: Vec<String>,
    },
    /// The answer to [`StorageRequest::Snapshot`].
    SnapshotWritten {
        /// The document.
        doc: String,
        /// `Err` leaves the previous snapshot and the log valid.
        result: Result<(), StorageError>,
    },
}

/// Whether a shard's storage answered its last attempt: written by the storage worker, read
/// by the shard (before applying an op or loading a document) and by `/health`.
#[derive(Clone, Debug)]
pub struct StorageAvailable(Arc<AtomicBool>);

impl StorageAvailable {
    /// Available until an attempt says otherwise.
    pub fn new() -> StorageAvailable {
        StorageAvailable(Arc::new(AtomicBool::new(true)))
    }

    /// Whether the last attempt reached the storage.
    pub fn get(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }

    /// Records the outcome of an attempt.
    pub fn set(&self, available: bool) {
        self.0.store(available, Ordering::Release);
    }
}

impl Default for StorageAvailable {
    fn default() -> StorageAvailable {
        StorageAvailable::new()
    }
}

/// Whether an attempt that ended with `result` found the storage reachable.
fn reached<T>(result: &Result<T, StorageError>) -> bool {
    !matches!(
        result,
        Err(StorageError::Unavailable { .. } | StorageError::OutcomeUnknown { .. })
    )
}

/// The shard's end of the pipeline: sends requests, takes completions, and joins the worker
/// thread when dropped (after it has finished every request sent).
pub struct StorageWorker {
    /// `None` only while dropping.
    requests: Option<Sender<StorageRequest>>,
    completions: Receiver<StorageCompletion>,
    available: StorageAvailable,
    thread: Option<JoinHandle<()>>,
}

/// The worker is gone (it panicked: a bug in a storage backend).
#[derive(Debug, thiserror::Error)]
#[error("the storage worker thread is gone")]
pub struct WorkerGone;

impl StorageWorker {
    /// Starts the worker thread `name` owning `storage`; it wakes the shard through `waker`
    /// after each burst of completions and keeps `available` up to date.
    ///
    /// # Errors
    /// When the thread cannot be spawned.
    pub fn spawn(
        name: String,
        storage: Box<dyn Storage>,
        waker: Arc<mio::Waker>,
        available: StorageAvailable,
    ) -> std::io::Result<StorageWorker> {
        let (mut worker, state) = StorageWorker::unstarted(storage, Some(waker), available);
        let thread = std::thread::Builder::new()
            .name(name)
            .spawn(move || state.run())?;
        worker.thread = Some(thread);
        Ok(worker)
    }

    /// A worker without a thread: the caller runs its requests, in the calling thread, with
    /// [`WorkerSteps::step`] (the simulator, which decides when each sync happens and which
    /// turns it groups). The same code serves the requests as on the worker thread.
    pub fn stepped(
        storage: Box<dyn Storage>,
        available: StorageAvailable,
    ) -> (StorageWorker, WorkerSteps) {
        let (worker, state) = StorageWorker::unstarted(storage, None, available);
        (worker, WorkerSteps { state })
    }

    fn unstarted(
        storage: Box<dyn Storage>,
        waker: Option<Arc<mio::Waker>>,
        available: StorageAvailable,
    ) -> (StorageWorker, WorkerLoop) {
        let (request_tx, request_rx) = crossbeam_channel::unbounded();
        let (completion_tx, completion_rx) = crossbeam_channel::unbounded();
        let state = WorkerLoop {
            storage,
            requests: request_rx,
            completions: completion_tx,
            waker,
            available: available.clone(),
            fenced: HashSet::new(),
            queue: Vec::new(),
            docs_spare: Vec::new(),
            loaded: HashSet::new(),
        };
        let worker = StorageWorker {
            requests: Some(request_tx),
            completions: completion_rx,
            available,
            thread: None,
        };
        (worker, state)
    }

    /// Queues a request.
    ///
    /// # Errors
    /// [`WorkerGone`] when the worker thread has exited.
    pub fn send(&self, request: StorageRequest) -> Result<(), WorkerGone> {
        match &self.requests {
            Some(requests) => requests.send(request).map_err(|_| WorkerGone)?,
            None => return Err(WorkerGone),
        }
        // The worker parks when it has nothing to do (no spinning on a busy machine); an
        // unpark of a thread that is not parked is one atomic operation, no system call.
        if let Some(thread) = &self.thread {
            thread.thread().unpark();
        }
        Ok(())
    }

    /// The next completion if one is ready (`Ok(None)` when none is).
    ///
    /// # Errors
    /// [`WorkerGone`] when the worker exited with requests unanswered.
    pub fn try_recv(&self) -> Result<Option<StorageCompletion>, WorkerGone> {
        match self.completions.try_recv() {
            Ok(completion) => Ok(Some(completion)),
            Err(TryRecvError::Empty) => Ok(None),
            Err(TryRecvError::Disconnected) => Err(WorkerGone),
        }
    }

    /// Waits up to `timeout` for the next completion (shutdown only: the shard never waits
    /// on storage while it serves).
    ///
    /// # Errors
    /// [`WorkerGone`] when the worker exited with requests unanswered.
    pub fn recv_timeout(&self, timeout: Duration) -> Result<Option<StorageCompletion>, WorkerGone> {
        match self.completions.recv_timeout(timeout) {
            Ok(completion) => Ok(Some(completion)),
            Err(RecvTimeoutError::Timeout) => Ok(None),
            Err(RecvTimeoutError::Disconnected) => Err(WorkerGone),
        }
    }

    /// Whether the storage answered its last attempt.
    pub fn available(&self) -> bool {
        self.available.get()
    }
}

impl Drop for StorageWorker {
    fn drop(&mut self) {
        // Closing the channel ends the worker once it has done everything sent before.
        self.requests = None;
        let Some(thread) = self.thread.take() else {
            return;
        };
        thread.thread().unpark();
        // The worker drops its end of the completions as it exits; a storage that hangs
        // (a database that never answers) must not hang the shutdown with it.
        let deadline = Instant::now() + WORKER_EXIT_WAIT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.completions.recv_timeout(left) {
                Ok(_) => continue, // Answers nobody waits for any more.
                Err(RecvTimeoutError::Disconnected) => break,
                Err(RecvTimeoutError::Timeout) => {
                    error!(
                        "storage worker: still busy after {WORKER_EXIT_WAIT:?}; leaving it behind \
                         (what it had not synced was never acknowledged)"
                    );
                    return;
                }
            }
        }
        if thread.join().is_err() {
            error!("storage worker: the thread panicked");
        }
    }
}

/// The worker's side of a [`StorageWorker::stepped`] pipeline, run by its caller.
pub struct WorkerSteps {
    state: WorkerLoop,
}

impl WorkerSteps {
    /// Requests sent and not served yet.
    pub fn queued(&self) -> usize {
        self.state.requests.len()
    }

    /// Serves at most `max_requests` of the queued requests, in order, as one wake-up of the
    /// worker thread would (consecutive commits grouped into one sync); with none queued and
    /// the storage unavailable, probes it. Returns how many requests were served.
    pub fn step(&mut self, max_requests: usize) -> usize {
        let mut queue = std::mem::take(&mut self.state.queue);
        while queue.len() < max_requests {
            match self.state.requests.try_recv() {
                Ok(request) => queue.push(request),
                Err(_) => break,
            }
        }
        let n = queue.len();
        if n == 0 {
            self.state.queue = queue;
            if !self.state.available.get() {
                self.state.probe();
            }
            return 0;
        }
        self.state.serve_all(queue);
        n
    }

    /// The storage, for inspection between steps.
    pub fn storage(&self) -> &dyn Storage {
        &*self.state.storage
    }
}

/// The worker thread's state.
struct WorkerLoop {
    storage: Box<dyn Storage>,
    requests: Receiver<StorageRequest>,
    completions: Sender<StorageCompletion>,
    /// Woken after each burst of completions (`None` for a stepped worker: its caller knows).
    waker: Option<Arc<mio::Waker>>,
    available: StorageAvailable,
    /// Documents whose records must not be written: an earlier sync holding some of their
    /// records failed. Lifted by their `Release`.
    fenced: HashSet<String>,
    /// The requests taken in one wake-up, reused.
    queue: Vec<StorageRequest>,
    /// A group's document list, reused from one sync to the next.
    docs_spare: Vec<Arc<str>>,
    /// Documents the shard loaded and has not released: a listing's loads leave their
    /// storage state alone.
    loaded: HashSet<String>,
}

/// A group of consecutive commits being gathered for one sync.
struct Group {
    first: BatchId,
    last: BatchId,
    /// Documents with records in the group (fenced if it fails).
    docs: Vec<Arc<str>>,
    /// The first append error; the group then fails whatever the sync says.
    append_error: Option<StorageError>,
    /// The commits' vectors, handed back with the completion.
    spent: Vec<Vec<DocAppend>>,
    started: Instant,
}

impl WorkerLoop {
    fn run(mut self) {
        loop {
            // Parked, not blocked in the channel: crossbeam's blocking receive spins and
            // yields before it sleeps, several system calls per turn on a busy machine. The
            // shard unparks the worker after each send (and when it drops its end).
            let first = match self.requests.try_recv() {
                Ok(request) => request,
                Err(TryRecvError::Disconnected) => break,
                Err(TryRecvError::Empty) if self.available.get() => {
                    std::thread::park();
                    continue;
                }
                Err(TryRecvError::Empty) => {
                    let parked = Instant::now();
                    std::thread::park_timeout(PROBE_INTERVAL);
                    if parked.elapsed() >= PROBE_INTERVAL && self.requests.is_empty() {
                        self.probe();
                    }
                    continue;
                }
            };
            let mut queue = std::mem::take(&mut self.queue);
            queue.push(first);
            while let Ok(request) = self.requests.try_recv() {
                queue.push(request);
            }
            self.serve_all(queue);
        }
        debug!("storage worker: stopped");
        // Dropping the storage here (DiskStorage checkpoints on drop), off the shard thread.
    }

    /// Asks an unavailable storage whether it is back.
    fn probe(&mut self) {
        let probed = self.storage.probe();
        if let Err(e) = &probed {
            debug!("storage worker: still unavailable: {e}");
        }
        self.available.set(probed.is_ok());
    }

    /// Serves the requests of one wake-up in order: consecutive commits are appended together
    /// and synced once. Keeps `queue`'s allocation for the next wake-up.
    fn serve_all(&mut self, mut queue: Vec<StorageRequest>) {
        let mut group: Option<Group> = None;
        for request in queue.drain(..) {
            match request {
                StorageRequest::Commit { batch, appends } => {
                    let group = group.get_or_insert_with(|| Group {
                        first: batch,
                        last: batch,
                        docs: std::mem::take(&mut self.docs_spare),
                        append_error: None,
                        spent: Vec::new(),
                        started: Instant::now(),
                    });
                    debug_assert!(batch >= group.last, "batches in order");
                    group.last = batch;
                    self.append(group, appends);
                }
                other => {
                    if let Some(group) = group.take() {
                        self.sync(group);
                    }
                    self.serve(other);
                }
            }
        }
        if let Some(group) = group.take() {
            self.sync(group);
        }
        self.queue = queue;
        // One wake-up for the whole burst; a failed wake means the shard's Poll is gone.
        if let Some(waker) = &self.waker {
            let _ = waker.wake();
        }
    }

    fn append(&mut self, group: &mut Group, mut appends: Vec<DocAppend>) {
        for append in appends.iter_mut() {
            if self.fenced.contains(&*append.doc) {
                // Its room is being dropped by the shard; nothing of it may follow the gap.
                continue;
            }
            if group.append_error.is_none() {
                for record in &append.records {
                    if let Err(e) = self.storage.append(&append.doc, &append.epoch, record) {
                        group.append_error = Some(e);
                        break;
                    }
                }
            }
            append.records.clear();
            group.docs.push(append.doc.clone());
        }
        group.spent.push(appends);
    }

    fn sync(&mut self, mut group: Group) {
        // Even after a failed append: the storage settles (durable or rolled back) before
        // anything is loaded from it again.
        let synced = self.storage.sync();
        let result = match group.append_error.take() {
            Some(e) => {
                if let Err(sync_error) = synced {
                    debug!("storage worker: sync after a failed append: {sync_error}");
                }
                Err(e)
            }
            None => synced,
        };
        self.available.set(reached(&result));
        let fenced = self.storage.take_fenced();
        if !fenced.is_empty() {
            warn!(
                "storage worker: {} document(s) refused by their lease's fence",
                fenced.len()
            );
            self.fenced.extend(fenced.iter().cloned());
            let _ = self
                .completions
                .send(StorageCompletion::Fenced { docs: fenced });
        }
        if let Err(e) = &result {
            warn!(
                "storage worker: sync of batches {}..={} failed: {e}",
                group.first.0, group.last.0
            );
            self.fenced
                .extend(group.docs.drain(..).map(|doc| doc.to_string()));
        }
        group.docs.clear();
        self.docs_spare = std::mem::take(&mut group.docs);
        let _ = self.completions.send(StorageCompletion::Synced {
            first: group.first,
            last: group.last,
            result,
            sync_time: group.started.elapsed(),
            spent: std::mem::take(&mut group.spent),
        });
    }

    /// This shard's documents of a listing, each loaded for its durable head and length.
    fn list(
        &mut self,
        query: &crate::api::ListQuery,
        shard_idx: usize,
    ) -> Result<crate::api::ListPart, StorageError> {
        let n_shards = query.n_shards.max(1);
        let keep = |name: &str| crate::ids::shard_for_doc(name, n_shards).0 == shard_idx;
        let (names, more) =
            self.storage
                .list_names(&query.prefix, query.after.as_deref(), query.limit, &keep)?;
        let mut docs = Vec::with_capacity(names.len());
        for name in names {
            let Some(stored) = self.storage.load(&name)? else {
                continue; // Deleted since it was listed.
            };
            if !self.loaded.contains(&name) {
                self.storage.release(&name);
            }
            let config = crate::room::RoomConfig {
                snapshot_every_ops: u64::MAX,
                snapshot_every_bytes: u64::MAX,
                replay_window_ops: 0,
                doc_chars_max: usize::MAX,
            };
            let updated_at = stored
                .tail
                .iter()
                .filter_map(|record| match record {
                    LogRecord::Accepted { time_ms, .. } => Some(*time_ms),
                    _ => None,
                })
                .max();
            match crate::room::Room::open(name.clone(), Some(stored), config) {
                Ok(room) => docs.push(crate::api::DocSummary {
                    doc: name,
                    head: room.head(),
                    length: room.length(),
                    updated_at,
                }),
                Err(e) => warn!("storage worker: listing skips a corrupt document: {e}"),
            }
        }
        Ok(crate::api::ListPart { docs, more })
    }

    fn serve(&mut self, request: StorageRequest) {
        let completion = match request {
            StorageRequest::Commit { .. } => unreachable!("commits are grouped by the caller"),
            StorageRequest::Load { doc } => {
                debug_assert!(
                    !self.fenced.contains(&doc),
                    "a fenced doc is released first"
                );
                let result = self.storage.load(&doc);
                self.available.set(reached(&result));
                self.loaded.insert(doc.clone());
                StorageCompletion::Loaded { doc, result }
            }
            StorageRequest::Snapshot { doc, snapshot } => {
                let result = self.storage.write_snapshot(&doc, &snapshot);
                self.available.set(reached(&result));
                StorageCompletion::SnapshotWritten { doc, result }
            }
            StorageRequest::Release { doc } => {
                self.fenced.remove(&doc);
                self.loaded.remove(&doc);
                self.storage.release(&doc);
                return;
            }
            StorageRequest::Delete {
                doc,
                epoch,
                reply,
                webhooks,
            } => {
                let result = self.storage.delete(&doc);
                self.available.set(reached(&result));
                let answer = match result {
                    Ok(_) => {
                        webhooks.deleted(&doc, &epoch);
                        let mut body = String::from("{\"deleted\":");
                        crate::protocol::codec::write_json_str(&mut body, &doc);
                        body.push('}');
                        crate::api::json_answer(200, &body)
                    }
                    Err(e) => {
                        warn!("storage worker: deleting a document failed: {e}");
                        crate::api::json_error(503, &format!("deleting failed: {e}"))
                    }
                };
                reply.answer(answer);
                return;
            }
            StorageRequest::List {
                query,
                shard_idx,
                reply,
            } => {
                let part = self.list(&query, shard_idx);
                if let Err(e) = &part {
                    warn!("storage worker: listing documents failed: {e}");
                }
                reply.list(part.map_err(|e| e.to_string()));
                return;
            }
        };
        let _ = self.completions.send(completion);
    }
}
