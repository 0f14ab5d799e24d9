//! Storage-level figures for `docs/benchmarks.md` (section `## Storage`):
//! group-commit fsync cost (one journal fsync per turn) and checkpoint cost, recovery time for
//! 1,000 documents / 1,000,000 ops, startup redo of a full journal, and write amplification
//! (journal included) of a typing workload with snapshots.
//!
//! Run: `cargo bench --bench storage` (data in `target/bench-storage`, or `$STORAGE_BENCH_DIR`;
//! it must be on the disk you want to measure, not a tmpfs). Pass `quick` for a smaller run.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use collab_engine::config::{Config, FsyncMode};
use collab_engine::room::{Room, RoomConfig};
use collab_engine::storage::fs::{Fs, OsFs};
use collab_engine::storage::{DiskStorage, LogRecord, Storage, StoredSnapshot};
use hdrhistogram::Histogram;
use tungstenite::Utf8Bytes;

fn main() {
    let quick = std::env::args().any(|a| a == "quick");
    let root = std::env::var_os("STORAGE_BENCH_DIR")
        .map_or_else(|| PathBuf::from("target/bench-storage"), PathBuf::from);
    let _ = fs::remove_dir_all(&root);
    fs::create_dir_all(&root).expect("bench dir");
    println!("data in {}", root.display());

    group_commit(&root, quick);
    recovery(&root, quick);
    redo(&root, quick);
    write_amplification(&root, quick);
    let _ = fs::remove_dir_all(&root);
}

/// An op_echo of one typed character, shaped like the server's.
fn echo(seq: u64, replica: u64, lamport: u64) -> Utf8Bytes {
    let after = if lamport <= 1 {
        "null".to_owned()
    } else {
        format!("[{},{replica}]", lamport - 1)
    };
    Utf8Bytes::from(format!(
        r#"{{"type":"op_echo","server_seq":{seq},"replica":{replica},"client_seq":{seq},"ops":[{{"kind":"ins","id":[{lamport},{replica}],"after":{after},"text":"a"}}]}}"#
    ))
}

fn us(d: Duration) -> u64 {
    d.as_micros() as u64
}

/// One loop turn = one op appended to each of `n_docs` documents, then one `sync`.
fn group_commit(root: &Path, quick: bool) {
    println!("\n## group commit: one sync per turn, one ~150-byte op per touched doc");
    println!("| fsync | docs per turn | turns | sync p50 us | sync p99 us | sync max us | ops/s | then one checkpoint ms |");
    println!("|---|---|---|---|---|---|---|---|");
    for mode in [FsyncMode::Always, FsyncMode::Never] {
        for n_docs in [1u64, 10, 100] {
            let dir = root.join(format!("commit-{mode:?}-{n_docs}"));
            let mut storage = DiskStorage::open(&dir, mode).expect("open");
            // Checkpoints are measured on their own below, not inside the turns.
            storage.set_checkpoint_limits(u64::MAX, Duration::from_secs(3600));
            let turns = if quick {
                50
            } else {
                2000 / n_docs.max(1) + 200
            };
            let mut hist = Histogram::<u64>::new(3).expect("histogram");
            let started = Instant::now();
            for turn in 1..=turns {
                for doc in 0..n_docs {
                    let record = LogRecord::Ops {
                        server_seq: turn,
                        echo: echo(turn, 1, turn),
                    };
                    storage
                        .append(&format!("doc-{doc}"), "E", &record)
                        .expect("append");
                }
                let t = Instant::now();
                storage.sync().expect("sync");
                hist.record(us(t.elapsed()).max(1)).expect("record");
            }
            let secs = started.elapsed().as_secs_f64();
            // Every touched segment fsynced once, the journal emptied.
            let t = Instant::now();
            storage.checkpoint().expect("checkpoint");
            let checkpoint = t.elapsed();
            println!(
                "| {mode:?} | {n_docs} | {turns} | {} | {} | {} | {:.0} | {:.2} |",
                hist.value_at_quantile(0.5),
                hist.value_at_quantile(0.99),
                hist.max(),
                (turns * n_docs) as f64 / secs,
                checkpoint.as_secs_f64() * 1e3
            );
            let _ = fs::remove_dir_all(&dir);
        }
    }
}

/// Drops the page cache of every file under `dir` (only ours), so reads come from the disk.
fn evict(dir: &Path) {
    for entry in fs::read_dir(dir).expect("read_dir").flatten() {
        let path = entry.path();
        if path.is_dir() {
            evict(&path);
        } else if let Ok(file) = fs::File::open(&path) {
            use std::os::fd::AsRawFd;
            // Dirty pages cannot be dropped: write them back first.
            let _ = file.sync_all();
            // SAFETY: a plain advisory call on a file descriptor we own for its duration.
            unsafe {
                libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED);
            }
        }
    }
}

fn dir_bytes(dir: &Path) -> u64 {
    let mut total = 0;
    for entry in fs::read_dir(dir).expect("read_dir").flatten() {
        let path = entry.path();
        total += if path.is_dir() {
            dir_bytes(&path)
        } else {
            entry.metadata().map_or(0, |m| m.len())
        };
    }
    total
}

/// 1,000 documents x 1,000 ops; load them all with a fresh storage (what a restart does
/// lazily, one document per first hello).
fn recovery(root: &Path, quick: bool) {
    println!("\n## recovery: load every document with a fresh DiskStorage");
    println!("| layout | docs | ops | bytes on disk | first doc ms (cold) | all docs: load ms (cold) | load ms (warm) | load + Room::open ms (warm) |");
    println!("|---|---|---|---|---|---|---|---|");
    let n_docs: u64 = if quick { 100 } else { 1000 };
    let ops_per_doc: u64 = 1000;
    for snapshot_every in [0u64, 100] {
        let dir = root.join(format!("recovery-{snapshot_every}"));
        {
            let mut storage = DiskStorage::open(&dir, FsyncMode::Never).expect("open");
            for seq in 1..=ops_per_doc {
                for doc in 0..n_docs {
                    storage
                        .append(
                            &format!("doc-{doc}"),
                            "E",
                            &LogRecord::Ops {
                                server_seq: seq,
                                echo: echo(seq, 1, seq),
                            },
                        )
                        .expect("append");
                }
                storage.sync().expect("sync");
                if snapshot_every > 0 && seq % snapshot_every == 0 {
                    for doc in 0..n_docs {
                        let snapshot = StoredSnapshot {
                            epoch: "E".to_owned(),
                            head: seq,
                            replicas_reserved: 16,
                            owners: Vec::new(),
                            runs_json: Utf8Bytes::from(format!(
                                r#"{{"runs":[{{"id":[1,1],"text":"{}"}}]}}"#,
                                "a".repeat(seq as usize)
                            )),
                        };
                        storage
                            .write_snapshot(&format!("doc-{doc}"), &snapshot)
                            .expect("snapshot");
                    }
                }
            }
        }
        let label = if snapshot_every == 0 {
            "log only".to_owned()
        } else {
            format!("snapshot every {snapshot_every} ops")
        };
        let bytes = dir_bytes(&dir);
        let mut times = Vec::new();
        let mut first = Duration::ZERO;
        for cold in [true, false] {
            if cold {
                evict(&dir);
            }
            let started = Instant::now();
            let mut storage = DiskStorage::open(&dir, FsyncMode::Always).expect("open");
            let mut n_records = 0;
            for doc in 0..n_docs {
                let stored = storage
                    .load(&format!("doc-{doc}"))
                    .expect("load")
                    .expect("stored");
                n_records += stored.tail.len() as u64 + stored.snapshot.map_or(0, |s| s.head);
                if doc == 0 && cold {
                    first = started.elapsed();
                }
                storage.release(&format!("doc-{doc}"));
            }
            assert_eq!(n_records, n_docs * ops_per_doc);
            times.push(started.elapsed());
        }
        // The whole recovery path of a document: load, then the room decodes the snapshot and
        // replays the tail into the CRDT (whichever CRDT is in the tree).
        let started = Instant::now();
        let mut storage = DiskStorage::open(&dir, FsyncMode::Always).expect("open");
        let room_config = RoomConfig::from_config(&Config::parse_from(["collab-engine"]));
        for doc in 0..n_docs {
            let name = format!("doc-{doc}");
            let stored = storage.load(&name).expect("load");
            let room = Room::open(name.clone(), stored, room_config.clone()).expect("room opens");
            assert_eq!(room.head(), ops_per_doc);
            storage.release(&name);
        }
        let with_rooms = started.elapsed();
        println!(
            "| {label} | {n_docs} | {} | {bytes} | {:.2} | {} | {} | {} |",
            n_docs * ops_per_doc,
            first.as_secs_f64() * 1e3,
            times[0].as_millis(),
            times[1].as_millis(),
            with_rooms.as_millis(),
        );
        let _ = fs::remove_dir_all(&dir);
    }
}

/// Startup after `kill -9` with a full journal: `n_docs` documents written in turns of 100
/// documents until the journal holds `CHECKPOINT_BYTES`, then the storage is abandoned and a
/// fresh `DiskStorage::open` redoes the journal (warm: the segments are in the page cache, as
/// after a process crash; cold: evicted, as after a reboot with the segments intact).
fn redo(root: &Path, quick: bool) {
    println!("\n## startup redo of a full journal (kill -9 at the checkpoint limit)");
    println!("| journal bytes | docs | records | open ms (warm) | open ms (cold) |");
    println!("|---|---|---|---|---|");
    let n_docs: u64 = if quick { 100 } else { 1000 };
    let limit = if quick {
        1 << 20
    } else {
        collab_engine::storage::CHECKPOINT_BYTES
    };
    let mut times = Vec::new();
    let mut journal_bytes = 0;
    let mut n_records = 0;
    for cold in [false, true] {
        let dir = root.join(format!("redo-{cold}"));
        let mut storage = DiskStorage::open(&dir, FsyncMode::Always).expect("open");
        storage.set_checkpoint_limits(u64::MAX, Duration::from_secs(3600));
        let mut seqs = vec![0u64; n_docs as usize];
        let mut turn = 0;
        n_records = 0;
        while storage.journal_len() < limit {
            // A turn touches 100 documents, round robin over all of them.
            for doc in (0..100).map(|i| (turn * 100 + i) % n_docs) {
                let seq = &mut seqs[doc as usize];
                *seq += 1;
                let record = LogRecord::Ops {
                    server_seq: *seq,
                    echo: echo(*seq, 1, *seq),
                };
                storage
                    .append(&format!("doc-{doc}"), "E", &record)
                    .expect("append");
                n_records += 1;
            }
            storage.sync().expect("sync");
            turn += 1;
        }
        journal_bytes = storage.journal_len();
        storage.abandon();
        if cold {
            evict(&dir);
        }
        let started = Instant::now();
        let storage = DiskStorage::open(&dir, FsyncMode::Always).expect("open");
        times.push(started.elapsed());
        drop(storage);
        let _ = fs::remove_dir_all(&dir);
    }
    println!(
        "| {journal_bytes} | {n_docs} | {n_records} | {:.1} | {:.1} |",
        times[0].as_secs_f64() * 1e3,
        times[1].as_secs_f64() * 1e3
    );
}

/// Counts the bytes every write hands to the OS.
#[derive(Clone)]
struct CountingFs {
    written: Arc<AtomicU64>,
}

impl CountingFs {
    fn add(&self, n: usize) {
        self.written.fetch_add(n as u64, Ordering::Relaxed);
    }

    fn get(&self) -> u64 {
        self.written.load(Ordering::Relaxed)
    }
}

impl Fs for CountingFs {
    type File = fs::File;
    fn open_append(&self, path: &Path) -> io::Result<fs::File> {
        OsFs.open_append(path)
    }
    fn append(&self, file: &mut fs::File, bytes: &[u8]) -> io::Result<()> {
        self.add(bytes.len());
        OsFs.append(file, bytes)
    }
    fn sync(&self, file: &mut fs::File) -> io::Result<()> {
        OsFs.sync(file)
    }
    fn truncate(&self, file: &mut fs::File, len: u64) -> io::Result<()> {
        OsFs.truncate(file, len)
    }
    fn write_file(&self, path: &Path, bytes: &[u8], fsync: bool) -> io::Result<()> {
        self.add(bytes.len());
        OsFs.write_file(path, bytes, fsync)
    }
    fn read_file(&self, path: &Path) -> io::Result<Option<Vec<u8>>> {
        OsFs.read_file(path)
    }
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        OsFs.rename(from, to)
    }
    fn remove_file(&self, path: &Path) -> io::Result<()> {
        OsFs.remove_file(path)
    }
    fn create_dir_all(&self, path: &Path) -> io::Result<()> {
        OsFs.create_dir_all(path)
    }
    fn sync_dir(&self, path: &Path) -> io::Result<()> {
        OsFs.sync_dir(path)
    }
    fn list_dir(&self, path: &Path) -> io::Result<Option<Vec<String>>> {
        OsFs.list_dir(path)
    }
}

/// A model of a document's snapshot under typing by 4 replicas: sessions of ~50 typed
/// characters at random places, 10% backspaces. Only the size of the runs JSON matters here.
struct TypingModel {
    /// (lamport, replica, visible characters, or tombstones when `deleted`).
    runs: Vec<(u64, u64, u64, bool)>,
    cursor: usize,
    rng: u64,
}

impl TypingModel {
    fn next_rand(&mut self) -> u64 {
        // xorshift64*: deterministic, good enough for a workload shape.
        self.rng ^= self.rng >> 12;
        self.rng ^= self.rng << 25;
        self.rng ^= self.rng >> 27;
        self.rng.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Applies op number `seq` and returns its replica.
    fn step(&mut self, seq: u64) -> u64 {
        if seq % 50 == 1 || self.runs.is_empty() {
            // A new typing session somewhere: splits a run and starts a new one.
            let at = if self.runs.is_empty() {
                0
            } else {
                (self.next_rand() % self.runs.len() as u64) as usize
            };
            let replica = 1 + self.next_rand() % 4;
            self.runs.insert(at, (seq, replica, 1, false));
            if !self.runs.is_empty() && at > 0 {
                let split = self.runs[at - 1];
                self.runs.insert(at + 1, (split.0 + 1, split.1, 1, split.3));
            }
            self.cursor = at;
            return replica;
        }
        let (_, replica, _, _) = self.runs[self.cursor];
        if self.next_rand() % 10 == 0 {
            // Backspace: the last typed character becomes a tombstone run, typing resumes in a new run.
            self.runs.insert(self.cursor + 1, (seq, replica, 1, true));
            self.runs
                .insert(self.cursor + 2, (seq + 1, replica, 0, false));
            self.cursor += 2;
        } else {
            self.runs[self.cursor].2 += 1;
        }
        replica
    }

    fn runs_json(&self) -> String {
        let mut out = String::from(r#"{"runs":["#);
        let mut first = true;
        for &(lamport, replica, n, deleted) in &self.runs {
            if n == 0 {
                continue;
            }
            if !first {
                out.push(',');
            }
            first = false;
            if deleted {
                out.push_str(&format!(r#"{{"id":[{lamport},{replica}],"deleted":{n}}}"#));
            } else {
                out.push_str(&format!(
                    r#"{{"id":[{lamport},{replica}],"text":"{}"}}"#,
                    "a".repeat(n as usize)
                ));
            }
        }
        out.push_str("]}");
        out
    }
}

/// Bytes handed to the OS (log frames + snapshots) per byte of op_echo JSON.
fn write_amplification(root: &Path, quick: bool) {
    println!(
        "\n## write amplification: typing workload, snapshot every N ops (server default 10,000)"
    );
    println!("| fsync | ops | snapshot every | op JSON bytes | log + journal bytes written | snapshot bytes written | amplification | bytes on disk at end |");
    println!("|---|---|---|---|---|---|---|---|");
    // `never` writes no journal (the layout is the same, see docs/storage.md); `always` adds
    // the journal copy of every record, at one fsync per op, so it runs fewer ops.
    let runs = [
        (
            FsyncMode::Never,
            if quick { 20_000u64 } else { 200_000 },
            10_000u64,
        ),
        (
            FsyncMode::Never,
            if quick { 20_000 } else { 200_000 },
            1_000,
        ),
        (
            FsyncMode::Always,
            if quick { 5_000 } else { 20_000 },
            10_000,
        ),
        (FsyncMode::Always, if quick { 5_000 } else { 20_000 }, 1_000),
    ];
    for (mode, n_ops, snapshot_every) in runs {
        let dir = root.join(format!("amp-{mode:?}-{snapshot_every}"));
        let counting = CountingFs {
            written: Arc::new(AtomicU64::new(0)),
        };
        let mut storage = DiskStorage::with_fs(&dir, mode, counting.clone()).expect("open");
        let mut model = TypingModel {
            runs: Vec::new(),
            cursor: 0,
            rng: 0x9e37_79b9_7f4a_7c15,
        };
        let mut json_bytes = 0;
        let mut snapshot_bytes = 0;
        for seq in 1..=n_ops {
            let replica = model.step(seq);
            let echo = echo(seq, replica, seq);
            json_bytes += echo.len() as u64;
            storage
                .append(
                    "doc",
                    "E",
                    &LogRecord::Ops {
                        server_seq: seq,
                        echo,
                    },
                )
                .expect("append");
            storage.sync().expect("sync");
            if seq % snapshot_every == 0 {
                let before = counting.get();
                let snapshot = StoredSnapshot {
                    epoch: "E".to_owned(),
                    head: seq,
                    replicas_reserved: 16,
                    owners: Vec::new(),
                    runs_json: Utf8Bytes::from(model.runs_json()),
                };
                storage.write_snapshot("doc", &snapshot).expect("snapshot");
                snapshot_bytes += counting.get() - before;
            }
        }
        let total = counting.get();
        drop(storage);
        println!(
            "| {mode:?} | {n_ops} | {snapshot_every} | {json_bytes} | {} | {snapshot_bytes} | {:.2} | {} |",
            total - snapshot_bytes,
            total as f64 / json_bytes as f64,
            dir_bytes(&dir)
        );
        let _ = fs::remove_dir_all(&dir);
    }
}
