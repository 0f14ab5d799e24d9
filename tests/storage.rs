//! Storage behaviour, one suite for both durable backends: DiskStorage against a real file
//! system and PgStorage against a real PostgreSQL (`scripts/pg-local.sh`, started once for
//! this test binary; see tests/support/pg.rs). Round trips, restarts with other shard counts,
//! corruption of one document, failed commits, compaction and replay windows, unload and
//! reload run for both (`mod disk` and `mod postgres` at the end); torn tails, the journal and
//! power cuts are DiskStorage's own; lost connections, a paused server and the schema
//! version are PgStorage's own.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use collab_engine::config::FsyncMode;
use collab_engine::ids::shard_for_doc;
use collab_engine::storage::fs::FaultyFs;
use collab_engine::storage::{
    DiskStorage, LogRecord, PgOptions, PgStorage, Storage, StorageError, StoredDoc, StoredSnapshot,
};
use tungstenite::Utf8Bytes;

#[path = "support/pg.rs"]
mod pg;

/// A fresh, empty directory under cargo's per-target temp dir.
fn temp_dir(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("storage-{name}-{}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).expect("temp dir");
    dir
}

fn ops(seq: u64) -> LogRecord {
    let echo = format!(
        r#"{{"type":"op_echo","server_seq":{seq},"replica":1,"client_seq":{seq},"ops":[{{"kind":"ins","id":[{seq},1],"after":null,"text":"x"}}]}}"#
    );
    LogRecord::Ops {
        server_seq: seq,
        echo: Utf8Bytes::from(echo),
    }
}

fn snapshot(epoch: &str, head: u64, reserved: u64) -> StoredSnapshot {
    StoredSnapshot {
        epoch: epoch.to_owned(),
        head,
        replicas_reserved: reserved,
        owners: Vec::new(),
        runs_json: Utf8Bytes::from(format!(
            r#"{{"runs":[{{"id":[1,1],"text":"{}"}}]}}"#,
            "x".repeat(head as usize)
        )),
    }
}

fn open(dir: &Path) -> DiskStorage {
    DiskStorage::open(dir, FsyncMode::Always).expect("open")
}

fn seqs(doc: &StoredDoc) -> Vec<u64> {
    doc.tail
        .iter()
        .filter_map(|r| match r {
            LogRecord::Ops { server_seq, .. } => Some(*server_seq),
            LogRecord::ReplicasReserved { .. }
            | LogRecord::ReplicaOwner { .. }
            | LogRecord::Accepted { .. } => None,
        })
        .collect()
}

/// Every file under `dir`, relative to it, with its size.
fn files(dir: &Path) -> Vec<(String, u64)> {
    fn walk(root: &Path, dir: &Path, out: &mut Vec<(String, u64)>) {
        for entry in fs::read_dir(dir).expect("read_dir") {
            let entry = entry.expect("entry");
            let path = entry.path();
            if path.is_dir() {
                walk(root, &path, out);
            } else {
                let rel = path
                    .strip_prefix(root)
                    .expect("under root")
                    .to_string_lossy()
                    .into_owned();
                out.push((rel, entry.metadata().expect("metadata").len()));
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, dir, &mut out);
    out.sort();
    out
}

fn files_of(dir: &Path, suffix_start: &str) -> Vec<(String, u64)> {
    files(dir)
        .into_iter()
        .filter(|(name, _)| {
            name.rsplit('/')
                .next()
                .is_some_and(|f| f.starts_with(suffix_start))
        })
        .collect()
}

fn write_doc(storage: &mut (impl Storage + ?Sized), doc: &str, epoch: &str, n: u64) {
    storage
        .append(doc, epoch, &LogRecord::ReplicasReserved { last: 16 })
        .expect("append");
    for seq in 1..=n {
        storage.append(doc, epoch, &ops(seq)).expect("append");
    }
    storage.sync().expect("sync");
}

#[test]
fn torn_last_record_is_cut_and_appends_continue() {
    let dir = temp_dir("torn");
    let mut storage = open(&dir);
    write_doc(&mut storage, "doc", "E", 3);
    let segments = files_of(&dir, "log-");
    assert_eq!(segments.len(), 1);
    let (segment, len) = segments[0].clone();
    let path = dir.join(&segment);
    storage.append("doc", "E", &ops(4)).expect("append");
    storage.sync().expect("sync");
    drop(storage);
    // A crash in the middle of writing record 4: part of its frame made it to disk.
    let bytes = fs::read(&path).expect("read");
    let frame_len = bytes.len() - len as usize;
    for cut in [1, 11, 12, 20, frame_len - 1] {
        fs::write(&path, &bytes[..len as usize + cut]).expect("write");
        let doc = open(&dir)
            .load("doc")
            .expect("torn tail is not an error")
            .expect("stored");
        assert_eq!(seqs(&doc), vec![1, 2, 3], "cut {cut}");
        assert_eq!(
            fs::metadata(&path).expect("meta").len(),
            len,
            "tail cut off"
        );
    }
    fs::write(&path, &bytes[..len as usize + 5]).expect("write");
    let mut storage = open(&dir);
    let doc = storage
        .load("doc")
        .expect("torn tail is not an error")
        .expect("stored");
    assert_eq!(seqs(&doc), vec![1, 2, 3]);
    assert_eq!(
        fs::metadata(&path).expect("meta").len(),
        len,
        "tail cut off"
    );
    storage.append("doc", "E", &ops(4)).expect("append");
    storage.sync().expect("sync");
    assert_eq!(
        seqs(&open(&dir).load("doc").expect("load").expect("stored")),
        vec![1, 2, 3, 4]
    );

    // Zeros past the end (a file extended but never written) count as torn too.
    let mut zeros = fs::read(&path).expect("read");
    zeros.extend_from_slice(&[0; 100]);
    fs::write(&path, &zeros).expect("write");
    assert_eq!(
        seqs(&open(&dir).load("doc").expect("load").expect("stored")),
        vec![1, 2, 3, 4]
    );
}

fn expect_corrupt(
    result: Result<Option<StoredDoc>, StorageError>,
    file_suffix: &str,
) -> (String, u64) {
    match result {
        Err(StorageError::Corrupt {
            file,
            offset,
            detail,
        }) => {
            assert!(file.ends_with(file_suffix), "{file} {detail}");
            (file, offset)
        }
        other => panic!("expected Corrupt, got {other:?}"),
    }
}

#[test]
fn flipped_byte_in_a_log_is_corrupt_and_other_docs_load() {
    let dir = temp_dir("flip-log");
    let mut storage = open(&dir);
    write_doc(&mut storage, "bad", "E", 10);
    write_doc(&mut storage, "good", "E", 10);
    drop(storage);
    let mut bad_storage = open(&dir);
    let _ = bad_storage.load("bad").expect("load before damage");
    let bad_dir = files_of(&dir, "log-")
        .into_iter()
        .map(|(f, _)| f)
        .find(|f| {
            let bytes = fs::read(dir.join(f)).expect("read");
            bytes.windows(3).any(|w| w == b"bad")
        })
        .expect("bad doc's segment");
    let path = dir.join(&bad_dir);
    let mut bytes = fs::read(&path).expect("read");
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x01;
    fs::write(&path, &bytes).expect("write");
    for _ in 0..2 {
        let mut storage = open(&dir);
        let (file, offset) = expect_corrupt(storage.load("bad"), &bad_dir);
        assert_eq!(file, bad_dir);
        assert!(
            offset > 0 && offset as usize <= middle,
            "offset {offset} names the damaged record"
        );
        assert_eq!(
            seqs(&storage.load("good").expect("load").expect("stored")).len(),
            10
        );
    }
    // The corrupt file is left as it was for the operator.
    assert_eq!(fs::read(&path).expect("read"), bytes);
    // The documented repair: cut the file at the named offset; the prefix loads and the log
    // goes on from there.
    let (_, offset) = expect_corrupt(open(&dir).load("bad"), &bad_dir);
    fs::write(&path, &bytes[..offset as usize]).expect("write");
    let mut storage = open(&dir);
    let doc = storage.load("bad").expect("load").expect("stored");
    let kept = seqs(&doc);
    assert!(!kept.is_empty() && kept.len() < 10);
    assert_eq!(kept, (1..=kept.len() as u64).collect::<Vec<_>>());
    storage
        .append("bad", "E", &ops(kept.len() as u64 + 1))
        .expect("append");
    storage.sync().expect("sync");
    assert_eq!(
        seqs(&open(&dir).load("bad").expect("load").expect("stored")).len(),
        kept.len() + 1
    );
}

#[test]
fn flipped_byte_in_a_snapshot_is_corrupt() {
    let dir = temp_dir("flip-snapshot");
    let mut storage = open(&dir);
    write_doc(&mut storage, "bad", "E", 10);
    write_doc(&mut storage, "good", "E", 10);
    storage
        .write_snapshot("bad", &snapshot("E", 10, 16))
        .expect("snapshot");
    storage
        .write_snapshot("good", &snapshot("E", 10, 16))
        .expect("snapshot");
    drop(storage);
    let snaps = files_of(&dir, "snapshot");
    assert_eq!(snaps.len(), 2);
    for (file, _) in &snaps {
        let path = dir.join(file);
        let mut bytes = fs::read(&path).expect("read");
        if !bytes.windows(3).any(|w| w == b"bad") {
            continue;
        }
        let middle = bytes.len() / 2;
        bytes[middle] ^= 0x40;
        fs::write(&path, &bytes).expect("write");
        let mut storage = open(&dir);
        let (corrupt_file, offset) = expect_corrupt(storage.load("bad"), "/snapshot");
        assert_eq!(&corrupt_file, file);
        assert_eq!(offset, 0);
        let good = storage.load("good").expect("load").expect("stored");
        assert_eq!(good.snapshot, Some(snapshot("E", 10, 16)));
        return;
    }
    panic!("no snapshot of the bad doc");
}

#[test]
fn failed_snapshot_keeps_the_previous_state() {
    let dir = temp_dir("fail-snapshot");
    let faults = FaultyFs::new();
    let mut storage = DiskStorage::with_fs(&dir, FsyncMode::Always, faults.clone()).expect("open");
    write_doc(&mut storage, "a", "E", 5);
    faults.fail_writes(1);
    assert!(storage.write_snapshot("a", &snapshot("E", 5, 16)).is_err());
    let doc = open(&dir).load("a").expect("load").expect("stored");
    assert_eq!(doc.snapshot, None);
    assert_eq!(seqs(&doc), vec![1, 2, 3, 4, 5]);
    faults.fail_syncs(1);
    assert!(storage.write_snapshot("a", &snapshot("E", 5, 16)).is_err());
    storage.append("a", "E", &ops(6)).expect("append");
    storage.sync().expect("sync");
    let doc = open(&dir).load("a").expect("load").expect("stored");
    assert_eq!(doc.epoch, "E");
    let head = doc.snapshot.as_ref().map_or(0, |s| s.head);
    assert_eq!(seqs(&doc), ((head + 1)..=6).collect::<Vec<_>>());
}

#[test]
fn crash_leftovers_of_a_compaction_are_harmless() {
    let dir = temp_dir("leftovers");
    let mut storage = open(&dir);
    write_doc(&mut storage, "doc", "E", 5);
    let segment = files_of(&dir, "log-").remove(0).0;
    let old_bytes = fs::read(dir.join(&segment)).expect("read");
    storage
        .write_snapshot("doc", &snapshot("E", 5, 16))
        .expect("snapshot");
    write_doc(&mut storage, "doc-other", "E", 1);
    storage.append("doc", "E", &ops(6)).expect("append");
    storage.sync().expect("sync");
    drop(storage);
    // As if the crash came after the rename but before the old segment's removal, and
    // in the middle of writing the next snapshot.
    fs::write(dir.join(&segment), &old_bytes).expect("write");
    let snapshot_dir = Path::new(&segment).parent().expect("dir").to_path_buf();
    fs::write(dir.join(&snapshot_dir).join("snapshot.tmp"), b"half a snap").expect("write");
    let doc = open(&dir).load("doc").expect("load").expect("stored");
    assert_eq!(doc.snapshot.as_ref().map(|s| s.head), Some(5));
    assert_eq!(seqs(&doc), vec![6]);
    assert!(!dir.join(&segment).exists(), "covered segment removed");
    assert!(!dir.join(&snapshot_dir).join("snapshot.tmp").exists());
}

/// A tiny deterministic generator for the randomized test below.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

/// What the disk must hold for one document.
#[derive(Clone, Debug, Default)]
struct ModelDoc {
    /// Highest server_seq durable.
    durable: u64,
    /// Highest server_seq appended (durable or pending).
    appended: u64,
    /// Head of the newest durable snapshot.
    snapshot: u64,
}

fn check_model(storage: &mut impl Storage, docs: &[String], model: &[ModelDoc], seed: u64) {
    for (doc, m) in docs.iter().zip(model) {
        let stored = storage
            .load(doc)
            .unwrap_or_else(|e| panic!("seed {seed} {doc}: {e}"));
        let Some(stored) = stored else {
            assert_eq!(m.durable, 0, "seed {seed} {doc}: lost");
            continue;
        };
        assert_eq!(stored.epoch, format!("E-{doc}"), "seed {seed}");
        let head = stored.snapshot.as_ref().map_or(0, |s| s.head);
        assert_eq!(head, m.snapshot, "seed {seed} {doc}: snapshot head");
        assert_eq!(
            seqs(&stored),
            ((head + 1)..=m.durable).collect::<Vec<_>>(),
            "seed {seed} {doc}"
        );
    }
}

/// Sizes of the segment files (relative path -> length) that a power cut cannot take back:
/// taken whenever the storage's journal is empty (everything checkpointed).
type SafeSizes = std::collections::HashMap<String, u64>;

fn note_checkpoint(storage: &DiskStorage<FaultyFs>, dir: &Path, safe: &mut SafeSizes) {
    if storage.journal_len() == 0 {
        *safe = files_of(dir, "log-").into_iter().collect();
    }
}

/// What a power cut may do to files written since the last checkpoint: a segment keeps at
/// least what the checkpoint made durable, the rest is cut or reads as zeros; a segment the
/// checkpoint did not know may vanish (its directory entry was never synced); the journal
/// keeps what was fsynced and may end in a torn write.
fn power_cut(dir: &Path, safe: &SafeSizes, rng: &mut Rng) {
    for (file, len) in files_of(dir, "log-") {
        let path = dir.join(&file);
        match safe.get(&file) {
            None if rng.below(2) == 0 => fs::remove_file(&path).expect("remove"),
            kept => {
                let keep = kept.copied().unwrap_or(0).min(len);
                if len == keep {
                    continue;
                }
                let at = keep + rng.below(len - keep + 1);
                let mut bytes = fs::read(&path).expect("read");
                if rng.below(2) == 0 {
                    bytes.truncate(at as usize);
                } else {
                    bytes[at as usize..].fill(0);
                }
                fs::write(&path, bytes).expect("write");
            }
        }
    }
    for (file, _) in files_of(dir, "j-") {
        let path = dir.join(file);
        let mut bytes = fs::read(&path).expect("read");
        match rng.below(3) {
            0 => bytes.extend_from_slice(&[0; 40]),
            1 => {
                // The start of a frame whose body never made it.
                bytes.extend_from_slice(&500u32.to_le_bytes());
                bytes.extend_from_slice(&(!500u32).to_le_bytes());
                bytes.extend_from_slice(&[7; 20]);
            }
            _ => {}
        }
        fs::write(&path, bytes).expect("write");
    }
}

#[test]
fn random_appends_failures_snapshots_and_crashes_keep_exactly_the_durable_records() {
    let only: Option<u64> = std::env::var("STORAGE_SEED")
        .ok()
        .and_then(|s| s.parse().ok());
    // STORAGE_SEEDS=500 for a longer search; STORAGE_SEED=n STORAGE_TRACE=1 to replay one.
    let n_seeds: u64 = std::env::var("STORAGE_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(15);
    for seed in 1..=n_seeds {
        if only.is_some_and(|o| o != seed) {
            continue;
        }
        let trace = std::env::var_os("STORAGE_TRACE").is_some();
        eprintln!("seed {seed}");
        let dir = temp_dir(&format!("random-{seed}"));
        let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
        let docs: Vec<String> = (0..4).map(|i| format!("d{i}")).collect();
        let mut model = vec![ModelDoc::default(); docs.len()];
        let mut junk_outstanding = false;
        let faults = FaultyFs::new();
        let mut storage =
            DiskStorage::with_fs(&dir, FsyncMode::Always, faults.clone()).expect("open");
        let mut safe = SafeSizes::new();
        // Checkpoints also come from the journal size limit, in the middle of syncs.
        let checkpoint_bytes = [300, 2_000, 1 << 30][rng.below(3) as usize];
        storage.set_checkpoint_limits(checkpoint_bytes, std::time::Duration::from_secs(3600));
        for step in 0..160 {
            let action = rng.below(12);
            if trace {
                eprintln!("step {step}: action {action} model {model:?}");
            }
            match action {
                0..=4 => {
                    let i = rng.below(docs.len() as u64) as usize;
                    model[i].appended += 1;
                    storage
                        .append(&docs[i], &format!("E-{}", docs[i]), &ops(model[i].appended))
                        .expect("append");
                }
                5 | 6 => {
                    match rng.below(6) {
                        0 => faults.fail_writes(1),
                        1 => faults.fail_syncs(1),
                        _ => {}
                    }
                    let ok = storage.sync().is_ok();
                    for m in &mut model {
                        if ok {
                            m.durable = m.appended;
                        } else {
                            m.appended = m.durable;
                        }
                    }
                    faults.fail_writes(0);
                    faults.fail_syncs(0);
                    note_checkpoint(&storage, &dir, &mut safe);
                }
                7 => {
                    // A snapshot of what is durable (the shard writes them after a good sync).
                    if storage.sync().is_ok() {
                        for m in &mut model {
                            m.durable = m.appended;
                        }
                    }
                    let i = rng.below(docs.len() as u64) as usize;
                    if model[i].durable > 0 {
                        let snap = snapshot(&format!("E-{}", docs[i]), model[i].durable, 16);
                        let fail = rng.below(4) == 0;
                        if fail {
                            faults.fail_writes(1);
                        }
                        if storage.write_snapshot(&docs[i], &snap).is_ok() {
                            model[i].snapshot = model[i].durable;
                        }
                        faults.fail_writes(0);
                    }
                }
                10 => {
                    // An explicit checkpoint (a clean shutdown does one too).
                    if storage.checkpoint().is_ok() {
                        for m in &mut model {
                            m.durable = m.appended;
                        }
                    }
                    note_checkpoint(&storage, &dir, &mut safe);
                }
                8 | 11 => {
                    // Crash: unsynced records vanish, and a torn write may be left behind.
                    // 8: clean drop (checkpoint) or kill -9 (journal left for redo);
                    // 11: a power cut after kill -9 (only what was fsynced survives).
                    let power = action == 11;
                    let kill = power || rng.below(2) == 0;
                    if junk_outstanding {
                        // A torn tail is cut before its document is written again; two torn
                        // writes on one file without a load in between cannot happen.
                        for doc in &docs {
                            storage
                                .load(doc)
                                .unwrap_or_else(|e| panic!("seed {seed}: {e}"));
                        }
                        junk_outstanding = false;
                    }
                    if trace {
                        eprintln!("crash: kill {kill} power {power}");
                    }
                    if kill {
                        storage.abandon();
                    } else {
                        drop(storage);
                    }
                    for m in &mut model {
                        m.appended = m.durable;
                    }
                    if power {
                        power_cut(&dir, &safe, &mut rng);
                    } else if rng.below(2) == 0 {
                        let segments = files_of(&dir, "log-");
                        if !segments.is_empty() {
                            let (file, _) = &segments[rng.below(segments.len() as u64) as usize];
                            let newest = segments
                                .iter()
                                .filter(|(f, _)| Path::new(f).parent() == Path::new(file).parent())
                                .map(|(f, _)| f.clone())
                                .max()
                                .expect("a segment");
                            let mut frame = Vec::new();
                            let junk = ops(999);
                            if let LogRecord::Ops { echo, .. } = junk {
                                frame.extend_from_slice(&(echo.len() as u32 + 17).to_le_bytes());
                                frame.extend_from_slice(&(!(echo.len() as u32 + 17)).to_le_bytes());
                                frame.extend_from_slice(&[0; 4]);
                                frame.extend_from_slice(echo.as_bytes());
                            }
                            let cut = 1 + rng.below(frame.len() as u64 - 1) as usize;
                            let path = dir.join(&newest);
                            let mut bytes = fs::read(&path).expect("read");
                            bytes.extend_from_slice(&frame[..cut]);
                            fs::write(&path, bytes).expect("write");
                            junk_outstanding = true;
                        }
                    }
                    storage = DiskStorage::with_fs(&dir, FsyncMode::Always, faults.clone())
                        .unwrap_or_else(|e| panic!("seed {seed}: open: {e}"));
                    storage.set_checkpoint_limits(
                        checkpoint_bytes,
                        std::time::Duration::from_secs(3600),
                    );
                    // Redo left every journal applied, durable and gone.
                    assert_eq!(
                        files_of(&dir, "j-").len(),
                        1,
                        "seed {seed}: only the new journal"
                    );
                    note_checkpoint(&storage, &dir, &mut safe);
                }
                _ => {
                    if storage.sync().is_ok() {
                        for m in &mut model {
                            m.durable = m.appended;
                        }
                    }
                    check_model(&mut storage, &docs, &model, seed);
                }
            }
            // Any sync may have checkpointed (journal size limit).
            note_checkpoint(&storage, &dir, &mut safe);
        }
        drop(storage);
        check_model(&mut open(&dir), &docs, &model, seed);
        let _ = fs::remove_dir_all(&dir);
    }
}

#[test]
fn power_cut_after_the_journal_sync_is_redone_under_other_shard_counts() {
    let dir = temp_dir("redo-shards");
    let names: Vec<String> = (0..30).map(|i| format!("doc-{i}")).collect();
    let open_shards = |n: usize| -> Vec<DiskStorage> { (0..n).map(|_| open(&dir)).collect() };
    let mut shards = open_shards(3);
    for name in &names {
        write_doc(&mut shards[shard_for_doc(name, 3).0], name, "E", 3);
    }
    for shard in &mut shards {
        shard.checkpoint().expect("checkpoint");
        assert_eq!(shard.journal_len(), 0);
    }
    // What the checkpoint made durable.
    let safe: std::collections::HashMap<String, u64> = files_of(&dir, "log-").into_iter().collect();
    // More turns, durable only through the journals: ops on every document, a snapshot with
    // compaction and more ops after it, and a document created after the checkpoint.
    for seq in 4..=8 {
        for name in &names {
            let shard = &mut shards[shard_for_doc(name, 3).0];
            shard.append(name, "E", &ops(seq)).expect("append");
        }
        for shard in &mut shards {
            shard.sync().expect("sync");
        }
        if seq == 5 {
            let shard = &mut shards[shard_for_doc(&names[0], 3).0];
            shard
                .write_snapshot(&names[0], &snapshot("E", 5, 16))
                .expect("snapshot");
        }
    }
    write_doc(&mut shards[shard_for_doc("late", 3).0], "late", "E-late", 4);
    for shard in shards {
        shard.abandon();
    }
    assert_eq!(files_of(&dir, "j-").len(), 3);
    // The power cut: every segment loses what the checkpoint did not sync (new ones vanish),
    // and one keeps a flipped byte in its unsynced tail.
    for (i, (file, len)) in files_of(&dir, "log-").into_iter().enumerate() {
        let path = dir.join(&file);
        match safe.get(&file) {
            None => fs::remove_file(&path).expect("remove"),
            Some(&keep) if i == 1 => {
                let mut bytes = fs::read(&path).expect("read");
                let at = (keep + len) as usize / 2;
                bytes[at] ^= 0x08;
                fs::write(&path, bytes).expect("write");
            }
            Some(&keep) => {
                let mut bytes = fs::read(&path).expect("read");
                bytes.truncate(keep as usize);
                fs::write(&path, bytes).expect("write");
            }
        }
    }
    // Two shards now; the first open redoes all three journals.
    let mut shards = open_shards(2);
    assert_eq!(files_of(&dir, "j-").len(), 2, "old journals removed");
    for name in &names {
        let doc = shards[shard_for_doc(name, 2).0]
            .load(name)
            .expect("load")
            .expect("stored");
        let head = doc.snapshot.as_ref().map_or(0, |s| s.head);
        assert_eq!(seqs(&doc), ((head + 1)..=8).collect::<Vec<_>>(), "{name}");
    }
    let late = shards[shard_for_doc("late", 2).0]
        .load("late")
        .expect("load")
        .expect("stored");
    assert_eq!(
        (late.epoch.as_str(), seqs(&late)),
        ("E-late", vec![1, 2, 3, 4])
    );
    // Redo is idempotent and the segments it rebuilt are durable: another kill and another
    // shard count change nothing.
    for shard in shards {
        shard.abandon();
    }
    let mut one = open(&dir);
    for name in &names {
        let doc = one.load(name).expect("load").expect("stored");
        assert_eq!(seqs(&doc).last(), Some(&8), "{name}");
    }
}

#[test]
fn damaged_journal_stops_startup_with_file_and_offset() {
    let dir = temp_dir("bad-journal");
    let mut storage = open(&dir);
    for seq in 1..=6 {
        storage.append("a", "E", &ops(seq)).expect("append");
        storage.append("b", "E", &ops(seq)).expect("append");
        storage.sync().expect("sync");
    }
    storage.abandon();
    let (journal, _) = files_of(&dir, "j-").remove(0);
    let path = dir.join(&journal);
    let mut bytes = fs::read(&path).expect("read");
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x01;
    fs::write(&path, &bytes).expect("write");
    let offset = match DiskStorage::open(&dir, FsyncMode::Always) {
        Err(StorageError::Corrupt { file, offset, .. }) => {
            assert_eq!(file, journal);
            assert!(offset > 0 && offset as usize <= middle);
            offset
        }
        Err(e) => panic!("expected Corrupt, got {e}"),
        Ok(_) => panic!("a damaged journal was accepted"),
    };
    // Untouched for the operator; the documented repair (cut it at the offset) starts again,
    // and the segments still hold every record (no power cut here).
    assert_eq!(fs::read(&path).expect("read"), bytes);
    bytes.truncate(offset as usize);
    fs::write(&path, &bytes).expect("write");
    let mut storage = open(&dir);
    for doc in ["a", "b"] {
        assert_eq!(
            seqs(&storage.load(doc).expect("load").expect("stored")),
            (1..=6).collect::<Vec<_>>()
        );
    }
}

#[test]
fn journal_tail_with_a_hole_is_torn_not_corrupt() {
    let dir = temp_dir("journal-hole");
    let mut storage = open(&dir);
    for seq in 1..=4 {
        storage.append("a", "E", &ops(seq)).expect("append");
        storage.sync().expect("sync");
    }
    storage.abandon();
    let (journal, _) = files_of(&dir, "j-").remove(0);
    let path = dir.join(&journal);
    // The unsynced tail after a power cut: a block of zeros, then the end of a frame.
    let mut bytes = fs::read(&path).expect("read");
    bytes.extend_from_slice(&[0; 64]);
    bytes.extend_from_slice(b"tail of an entry whose start never reached the disk");
    fs::write(&path, &bytes).expect("write");
    let mut storage = open(&dir);
    assert_eq!(
        seqs(&storage.load("a").expect("load").expect("stored")),
        vec![1, 2, 3, 4]
    );
}

/// A checkpoint whose segment fsync fails must not be retried: on Linux a second fsync can
/// report success for pages the kernel already gave up on, and truncating the journal then
/// would drop the only durable copy of acknowledged records. The storage keeps the journal,
/// refuses every later sync, and the next open redoes the journal.
#[test]
fn failed_checkpoint_fsync_keeps_the_journal_and_fences_writes() {
    let dir = temp_dir("fail-checkpoint");
    let faults = FaultyFs::new();
    let mut storage = DiskStorage::with_fs(&dir, FsyncMode::Always, faults.clone()).expect("open");
    for seq in 1..=3 {
        storage.append("a", "E", &ops(seq)).expect("append");
        storage.sync().expect("sync");
    }
    let journal_len = storage.journal_len();
    assert!(journal_len > 0, "the synced turns are in the journal");
    faults.fail_syncs(1);
    assert!(storage.checkpoint().is_err(), "the segment fsync fails");
    assert_eq!(storage.journal_len(), journal_len, "the journal is kept");
    assert!(storage.checkpoint().is_err(), "a retry is never trusted");
    assert_eq!(
        storage.journal_len(),
        journal_len,
        "the journal is still kept"
    );
    let _ = storage.append("a", "E", &ops(4));
    assert!(storage.sync().is_err(), "nothing more is acknowledged");
    drop(storage);
    let doc = open(&dir).load("a").expect("load").expect("stored");
    assert_eq!(
        seqs(&doc),
        vec![1, 2, 3],
        "acknowledged records survive, the refused one does not"
    );
}

// ---------------------------------------------------------------------------------------------
// The suite both backends run.

/// Where a test's documents live, and the backend-specific ways to look at or damage them.
enum Backend {
    /// A data directory; `faults` is the file layer of storages opened by `open_faulty`.
    Disk { dir: PathBuf, faults: FaultyFs },
    /// A database of its own on the test PostgreSQL.
    Pg { url: String },
}

impl Backend {
    fn disk(name: &str) -> Backend {
        Backend::Disk {
            dir: temp_dir(name),
            faults: FaultyFs::new(),
        }
    }

    fn postgres(name: &str) -> Backend {
        Backend::Pg {
            url: pg::fresh_database(name),
        }
    }

    /// A new storage over the same documents (a restart, or another shard).
    fn open(&self) -> Box<dyn Storage> {
        self.open_with(FsyncMode::Always)
    }

    fn open_with(&self, fsync: FsyncMode) -> Box<dyn Storage> {
        match self {
            Backend::Disk { dir, .. } => Box::new(DiskStorage::open(dir, fsync).expect("open")),
            Backend::Pg { url } => Box::new(open_pg(url, fsync, Duration::from_secs(5))),
        }
    }

    /// A storage whose commits [`Backend::fail_next_commit`] can make fail.
    fn open_faulty(&self) -> Box<dyn Storage> {
        match self {
            Backend::Disk { dir, faults } => Box::new(
                DiskStorage::with_fs(dir, FsyncMode::Always, faults.clone()).expect("open"),
            ),
            Backend::Pg { .. } => self.open(),
        }
    }

    /// The next commit of a faulty storage fails (disk: its fsync; PostgreSQL: a constraint
    /// that every op row violates, until [`Backend::heal`]).
    fn fail_next_commit(&self) {
        match self {
            Backend::Disk { faults, .. } => faults.fail_syncs(1),
            Backend::Pg { url } => pg::client(url)
                .batch_execute(
                    "ALTER TABLE collab_ops ADD CONSTRAINT test_fault CHECK (server_seq < 0) NOT VALID",
                )
                .expect("add the fault"),
        }
    }

    /// Undoes [`Backend::fail_next_commit`] where it does not wear off by itself.
    fn heal(&self) {
        if let Backend::Pg { url } = self {
            pg::client(url)
                .batch_execute("ALTER TABLE collab_ops DROP CONSTRAINT IF EXISTS test_fault")
                .expect("drop the fault");
        }
    }

    /// Damages one op record of `doc` in the middle of its log, as bit rot would.
    fn damage_log(&self, doc: &str) {
        match self {
            Backend::Disk { dir, .. } => {
                let segment = files_of(dir, "log-")
                    .into_iter()
                    .map(|(f, _)| f)
                    .find(|f| {
                        let bytes = fs::read(dir.join(f)).expect("read");
                        bytes.windows(doc.len()).any(|w| w == doc.as_bytes())
                    })
                    .expect("the doc's segment");
                let path = dir.join(&segment);
                let mut bytes = fs::read(&path).expect("read");
                let middle = bytes.len() / 2;
                bytes[middle] ^= 0x01;
                fs::write(&path, &bytes).expect("write");
            }
            Backend::Pg { url } => {
                let n = pg::client(url)
                    .execute(
                        "UPDATE collab_ops SET echo = replace(echo, '\"x\"', '\"y\"') \
                         WHERE doc_id = (SELECT id FROM collab_docs WHERE name = $1) \
                         AND server_seq = 5",
                        &[&doc.as_bytes()],
                    )
                    .expect("damage");
                assert_eq!(n, 1);
            }
        }
    }

    /// How much log is stored: bytes of segments (disk), op rows (PostgreSQL).
    fn log_size(&self) -> u64 {
        match self {
            Backend::Disk { dir, .. } => files_of(dir, "log-").iter().map(|(_, len)| len).sum(),
            Backend::Pg { url } => {
                let n: i64 = pg::client(url)
                    .query_one("SELECT count(*) FROM collab_ops", &[])
                    .expect("count")
                    .get(0);
                n as u64
            }
        }
    }

    /// The log size that `n` op records of [`ops`] take at most.
    fn log_size_of(&self, n: u64) -> u64 {
        match self {
            Backend::Disk { .. } => {
                let echo_bytes = match ops(1) {
                    LogRecord::Ops { echo, .. } => echo.len() as u64,
                    LogRecord::ReplicasReserved { .. }
                    | LogRecord::ReplicaOwner { .. }
                    | LogRecord::Accepted { .. } => 0,
                };
                n * (echo_bytes + 40)
            }
            Backend::Pg { .. } => n,
        }
    }
}

fn open_pg(url: &str, fsync: FsyncMode, timeout: Duration) -> PgStorage {
    PgStorage::open(&PgOptions {
        url: url.to_owned(),
        timeout,
        synchronous_commit: fsync == FsyncMode::Always,
        ca_file: None,
    })
    .unwrap_or_else(|e| panic!("opening PgStorage: {e}"))
}

fn round_trip(b: &Backend) {
    let mut storage = b.open();
    assert_eq!(storage.load("doc").expect("load"), None);
    write_doc(&mut *storage, "doc", "E1", 5);
    let mut again = b.open();
    let doc = again.load("doc").expect("load").expect("stored");
    assert_eq!(doc.epoch, "E1");
    assert_eq!(doc.snapshot, None);
    let mut expected = vec![LogRecord::ReplicasReserved { last: 16 }];
    expected.extend((1..=5).map(ops));
    assert_eq!(doc.tail, expected);
    // The reloading storage continues the same log.
    again.append("doc", "E1", &ops(6)).expect("append");
    again.sync().expect("sync");
    assert_eq!(
        seqs(&b.open().load("doc").expect("load").expect("stored")),
        (1..=6).collect::<Vec<_>>()
    );
}

fn restart_with_other_shard_counts_finds_every_doc(b: &Backend) {
    let long = "ü".repeat(256);
    let mut names: Vec<String> = (0..40).map(|i| format!("doc-{i}")).collect();
    names.extend(
        [
            "../../etc/passwd",
            "a/b/c",
            "",
            ".",
            "con",
            "NUL\0x",
            "'); DROP TABLE collab_ops; --",
            "$1",
            long.as_str(),
        ]
        .map(String::from),
    );
    // Written by 3 shards.
    let mut shards: Vec<Box<dyn Storage>> = (0..3).map(|_| b.open()).collect();
    for (i, name) in names.iter().enumerate() {
        let shard = &mut shards[shard_for_doc(name, 3).0];
        write_doc(&mut **shard, name, &format!("epoch-{i}"), i as u64 % 7 + 1);
    }
    drop(shards);
    match b {
        Backend::Disk { dir, .. } => {
            // Nothing escaped the data directory, and no raw name became a path.
            for (file, _) in files(dir) {
                assert!(file.starts_with("docs/") || file == "LOCK", "{file}");
                assert!(!file.contains("etc") && !file.contains("doc-"), "{file}");
            }
        }
        Backend::Pg { url } => {
            // Names are data: every one stored exactly as given, the tables intact.
            let stored: Vec<Vec<u8>> = pg::client(url)
                .query("SELECT name FROM collab_docs ORDER BY name", &[])
                .expect("names")
                .iter()
                .map(|row| row.get(0))
                .collect();
            let mut expected: Vec<Vec<u8>> = names.iter().map(|n| n.as_bytes().to_vec()).collect();
            expected.sort();
            assert_eq!(stored, expected);
        }
    }
    // Read by 1 and by 2 shards.
    for n_shards in [1, 2] {
        let mut shards: Vec<Box<dyn Storage>> = (0..n_shards).map(|_| b.open()).collect();
        for (i, name) in names.iter().enumerate() {
            let doc = shards[shard_for_doc(name, n_shards).0]
                .load(name)
                .expect("load")
                .expect("stored");
            assert_eq!(doc.epoch, format!("epoch-{i}"));
            assert_eq!(seqs(&doc), (1..=(i as u64 % 7 + 1)).collect::<Vec<_>>());
        }
    }
}

fn one_corrupt_doc_is_refused_and_others_load(b: &Backend) {
    let mut storage = b.open();
    write_doc(&mut *storage, "bad", "E", 10);
    write_doc(&mut *storage, "good", "E", 10);
    drop(storage);
    b.damage_log("bad");
    for _ in 0..2 {
        let mut storage = b.open();
        match storage.load("bad") {
            Err(StorageError::Corrupt { offset, .. }) => assert!(offset > 0, "names a record"),
            other => panic!("expected Corrupt, got {other:?}"),
        }
        assert_eq!(
            seqs(&storage.load("good").expect("load").expect("stored")),
            (1..=10).collect::<Vec<_>>()
        );
    }
    // The good document goes on being written beside the corrupt one.
    let mut storage = b.open();
    let _ = storage.load("good").expect("load");
    storage.append("good", "E", &ops(11)).expect("append");
    storage.sync().expect("sync");
    assert!(matches!(
        b.open().load("bad"),
        Err(StorageError::Corrupt { .. })
    ));
    assert_eq!(
        seqs(&b.open().load("good").expect("load").expect("stored")).len(),
        11
    );
}

fn failed_commits_are_rolled_back(b: &Backend) {
    let mut storage = b.open_faulty();
    write_doc(&mut *storage, "a", "E", 3);
    write_doc(&mut *storage, "b", "E", 3);
    // One turn touching both docs, plus a brand-new doc; the commit fails.
    storage.append("a", "E", &ops(4)).expect("append");
    storage.append("a", "E", &ops(5)).expect("append");
    storage.append("b", "E", &ops(4)).expect("append");
    storage
        .append("new", "E-lost", &LogRecord::ReplicasReserved { last: 16 })
        .expect("append");
    b.fail_next_commit();
    assert!(matches!(storage.sync(), Err(StorageError::Io { .. })));
    b.heal();
    // Storage is back to the last good sync.
    let mut fresh = b.open();
    assert_eq!(
        seqs(&fresh.load("a").expect("load").expect("stored")),
        vec![1, 2, 3]
    );
    assert_eq!(
        seqs(&fresh.load("b").expect("load").expect("stored")),
        vec![1, 2, 3]
    );
    assert_eq!(fresh.load("new").expect("load"), None);
    // The same storage goes on: the shard reuses the sequence numbers that were refused.
    storage.append("a", "E", &ops(4)).expect("append");
    storage
        .append("new", "E-new", &LogRecord::ReplicasReserved { last: 16 })
        .expect("append");
    storage.sync().expect("sync");
    let a = b.open().load("a").expect("load").expect("stored");
    assert_eq!(seqs(&a), vec![1, 2, 3, 4]);
    assert_eq!(
        storage.load("b").expect("load").map(|d| seqs(&d)),
        Some(vec![1, 2, 3])
    );
    let new = b.open().load("new").expect("load").expect("stored");
    assert_eq!(new.epoch, "E-new");
    assert_eq!(new.tail, vec![LogRecord::ReplicasReserved { last: 16 }]);
}

fn many_docs_per_sync_commit_or_roll_back_together(b: &Backend) {
    let mut storage = b.open_faulty();
    let docs: Vec<String> = (0..40).map(|i| format!("doc-{i}")).collect();
    // Enough touched files per sync to take the disk's parallel fsync path.
    for doc in &docs {
        storage.append(doc, "E", &ops(1)).expect("append");
    }
    storage.sync().expect("sync");
    for doc in &docs {
        storage.append(doc, "E", &ops(2)).expect("append");
    }
    b.fail_next_commit();
    assert!(storage.sync().is_err());
    b.heal();
    for doc in &docs {
        storage.append(doc, "E", &ops(2)).expect("append");
        storage.append(doc, "E", &ops(3)).expect("append");
    }
    storage.sync().expect("sync");
    let mut fresh = b.open();
    for doc in &docs {
        assert_eq!(
            seqs(&fresh.load(doc).expect("load").expect("stored")),
            vec![1, 2, 3],
            "{doc}"
        );
    }
}

fn snapshot_compacts_the_log_and_keeps_the_replay_window(b: &Backend) {
    // Layout only: fsync (synchronous_commit) would just slow the thousands of syncs down.
    let mut storage = b.open_with(FsyncMode::Never);
    let mut seq = 0;
    let rounds = 12;
    let per_round = 300;
    let mut size_max = 0;
    for round in 0..rounds {
        for _ in 0..per_round {
            seq += 1;
            storage.append("doc", "EPOCH", &ops(seq)).expect("append");
            storage.sync().expect("sync");
        }
        storage
            .append(
                "doc",
                "EPOCH",
                &LogRecord::ReplicasReserved { last: round + 1 },
            )
            .expect("append");
        storage.sync().expect("sync");
        // Snapshot of a document that does not grow (runs_json of fixed size).
        let snap = StoredSnapshot {
            runs_json: Utf8Bytes::from_static(r#"{"runs":[]}"#),
            ..snapshot("EPOCH", seq, round + 1)
        };
        storage.write_snapshot("doc", &snap).expect("snapshot");
        // A few ops after the snapshot stay in the log: the replay window after a restart.
        seq += 1;
        storage.append("doc", "EPOCH", &ops(seq)).expect("append");
        storage.sync().expect("sync");
        size_max = size_max.max(b.log_size());
    }
    // The store tracks one window of log, never the whole history.
    assert!(
        size_max <= b.log_size_of(per_round + 10),
        "{size_max} of log stored for {seq} records of history"
    );
    let doc = b.open().load("doc").expect("load").expect("stored");
    assert_eq!(doc.epoch, "EPOCH");
    assert_eq!(doc.snapshot.as_ref().map(|s| s.head), Some(seq - 1));
    assert_eq!(
        doc.snapshot.as_ref().map(|s| s.replicas_reserved),
        Some(rounds)
    );
    assert_eq!(doc.tail, vec![ops(seq)]);

    // Snapshot only (the log fully covered): the epoch still comes back.
    let mut storage = b.open();
    let _ = storage.load("doc").expect("load");
    let snap = StoredSnapshot {
        runs_json: Utf8Bytes::from_static(r#"{"runs":[]}"#),
        ..snapshot("EPOCH", seq, rounds)
    };
    storage.write_snapshot("doc", &snap).expect("snapshot");
    assert_eq!(b.log_size(), 0);
    let doc = b.open().load("doc").expect("load").expect("stored");
    assert_eq!((doc.epoch.as_str(), doc.tail.len()), ("EPOCH", 0));
    storage
        .append("doc", "EPOCH", &ops(seq + 1))
        .expect("append");
    storage.sync().expect("sync");
    let doc = b.open().load("doc").expect("load").expect("stored");
    assert_eq!(seqs(&doc), vec![seq + 1]);
}

fn snapshot_of_a_new_document_and_reservations_after_it(b: &Backend) {
    let mut storage = b.open();
    // A document whose first durable state is a snapshot (as the copy tool writes them).
    storage
        .write_snapshot("fresh", &snapshot("EF", 3, 4))
        .expect("snapshot");
    storage
        .append("fresh", "EF", &LogRecord::ReplicasReserved { last: 9 })
        .expect("append");
    storage.append("fresh", "EF", &ops(4)).expect("append");
    storage.sync().expect("sync");
    let doc = b.open().load("fresh").expect("load").expect("stored");
    assert_eq!(doc.epoch, "EF");
    assert_eq!(doc.snapshot, Some(snapshot("EF", 3, 4)));
    assert_eq!(
        doc.tail,
        vec![LogRecord::ReplicasReserved { last: 9 }, ops(4)]
    );
}

fn release_then_load(b: &Backend) {
    let mut storage = b.open_with(FsyncMode::Never);
    write_doc(&mut *storage, "doc", "E", 3);
    storage.release("doc");
    let doc = storage.load("doc").expect("load").expect("stored");
    assert_eq!(seqs(&doc), vec![1, 2, 3]);
    storage.append("doc", "E", &ops(4)).expect("append");
    // Released with a record pending: it is still written by the next sync.
    storage.release("doc");
    storage.sync().expect("sync");
    assert_eq!(
        seqs(&b.open().load("doc").expect("load").expect("stored")),
        vec![1, 2, 3, 4]
    );
}

fn more_docs_than_open_files_kept(b: &Backend) {
    let mut storage = b.open_with(FsyncMode::Never);
    let docs: Vec<String> = (0..600).map(|i| format!("doc-{i}")).collect();
    for round in 1..=3 {
        for doc in &docs {
            storage.append(doc, "E", &ops(round)).expect("append");
            if round == 2 {
                storage.sync().expect("sync");
            }
        }
        storage.sync().expect("sync");
    }
    let mut fresh = b.open();
    for doc in &docs {
        assert_eq!(
            seqs(&fresh.load(doc).expect("load").expect("stored")),
            vec![1, 2, 3]
        );
    }
}

/// Which user owns each replica, as a room rebuilds it: the snapshot's owners, then the
/// tail's `ReplicaOwner` records.
fn owners_of(doc: &StoredDoc) -> Vec<(u64, String)> {
    let mut owners: std::collections::BTreeMap<u64, String> = doc
        .snapshot
        .iter()
        .flat_map(|s| s.owners.iter().cloned())
        .collect();
    for record in &doc.tail {
        if let LogRecord::ReplicaOwner { replica, user } = record {
            owners.entry(*replica).or_insert_with(|| user.clone());
        }
    }
    owners.into_iter().collect()
}

fn replica_owners_survive_restarts_and_snapshots(b: &Backend) {
    let owner = |replica: u64, user: &str| LogRecord::ReplicaOwner {
        replica,
        user: user.to_owned(),
    };
    let mut storage = b.open();
    storage
        .append("doc", "E", &owner(1, "alice"))
        .expect("append");
    storage.append("doc", "E", &ops(1)).expect("append");
    storage
        .append("doc", "E", &owner(2, "bob"))
        .expect("append");
    storage.append("doc", "E", &ops(2)).expect("append");
    storage.sync().expect("sync");
    let expected = vec![(1, "alice".to_owned()), (2, "bob".to_owned())];
    let doc = b.open().load("doc").expect("load").expect("stored");
    assert_eq!(owners_of(&doc), expected);
    assert_eq!(seqs(&doc), vec![1, 2]);
    // A snapshot covering everything carries the owners; the log it covers may go.
    let snap = StoredSnapshot {
        owners: expected.clone(),
        ..snapshot("E", 2, 0)
    };
    storage.write_snapshot("doc", &snap).expect("snapshot");
    storage
        .append("doc", "E", &owner(3, "carol"))
        .expect("append");
    storage.append("doc", "E", &ops(3)).expect("append");
    storage.sync().expect("sync");
    let doc = b.open().load("doc").expect("load").expect("stored");
    let mut all = expected;
    all.push((3, "carol".to_owned()));
    assert_eq!(owners_of(&doc), all);
    assert_eq!(seqs(&doc), vec![3]);
}

/// One `#[test]` per backend for each function of the suite.
macro_rules! both_backends {
    ($($name:ident),* $(,)?) => {
        mod disk {
            $(
                #[test]
                fn $name() {
                    super::$name(&super::Backend::disk(stringify!($name)));
                }
            )*
        }
        mod postgres {
            $(
                #[test]
                fn $name() {
                    super::$name(&super::Backend::postgres(stringify!($name)));
                }
            )*
        }
    };
}

both_backends!(
    round_trip,
    restart_with_other_shard_counts_finds_every_doc,
    one_corrupt_doc_is_refused_and_others_load,
    failed_commits_are_rolled_back,
    many_docs_per_sync_commit_or_roll_back_together,
    snapshot_compacts_the_log_and_keeps_the_replay_window,
    snapshot_of_a_new_document_and_reservations_after_it,
    release_then_load,
    more_docs_than_open_files_kept,
    replica_owners_survive_restarts_and_snapshots,
);

// ---------------------------------------------------------------------------------------------
// PgStorage's own: the schema version, lost connections, a paused server, a server down.

/// The server processes of the storages connected to the database of `url`.
fn storage_backends(url: &str) -> Vec<i32> {
    pg::client(url)
        .query(
            "SELECT pid FROM pg_stat_activity \
             WHERE datname = current_database() AND application_name = 'collab-engine'",
            &[],
        )
        .expect("pg_stat_activity")
        .iter()
        .map(|row| row.get(0))
        .collect()
}

/// What the shard does after a failed sync: reload the document, then go on from its head.
/// Returns the head that storage holds.
fn reload_head(storage: &mut dyn Storage, doc: &str) -> Option<u64> {
    match storage.load(doc) {
        Ok(Some(stored)) => Some(seqs(&stored).last().copied().unwrap_or(0)),
        Ok(None) => Some(0),
        Err(_) => None,
    }
}

/// Appends ops `from..` one sync at a time until `until` is durable, reloading after every
/// failure as the shard does; each op is appended again only after a reload showed that it
/// is not there. Gives up (panics) after `attempts_max` failures.
fn write_through_failures(
    storage: &mut dyn Storage,
    doc: &str,
    until: u64,
    attempts_max: u32,
    mut between: impl FnMut(u64),
) -> u32 {
    let mut failures = 0;
    let mut head = loop {
        if let Some(head) = reload_head(storage, doc) {
            break head;
        }
        failures += 1;
        assert!(failures <= attempts_max, "the first load keeps failing");
        std::thread::sleep(Duration::from_millis(200));
    };
    while head < until {
        between(head);
        let seq = head + 1;
        storage.append(doc, "E", &ops(seq)).expect("append");
        match storage.sync() {
            Ok(()) => head = seq,
            Err(e) => {
                failures += 1;
                assert!(failures <= attempts_max, "still failing: {e}");
                eprintln!("sync of {seq} failed ({e}); reloading");
                loop {
                    if let Some(stored) = reload_head(storage, doc) {
                        assert!(
                            stored == seq - 1 || stored == seq,
                            "head {stored} after {seq}"
                        );
                        head = stored;
                        break;
                    }
                    failures += 1;
                    assert!(failures <= attempts_max, "reload keeps failing");
                    std::thread::sleep(Duration::from_millis(200));
                }
            }
        }
    }
    failures
}

#[test]
fn postgres_schema_is_recorded_and_a_newer_one_refused() {
    let url = pg::fresh_database("schema");
    drop(open_pg(&url, FsyncMode::Always, Duration::from_secs(5)));
    // A second open (another shard, a restart) applies nothing again.
    drop(open_pg(&url, FsyncMode::Always, Duration::from_secs(5)));
    let mut client = pg::client(&url);
    let versions: Vec<i32> = client
        .query(
            "SELECT version FROM collab_schema_version ORDER BY version",
            &[],
        )
        .expect("versions")
        .iter()
        .map(|row| row.get(0))
        .collect();
    let known: Vec<i32> = collab_engine::storage::postgres::MIGRATIONS
        .iter()
        .map(|m| m.0)
        .collect();
    assert_eq!(versions, known);
    client
        .execute(
            "INSERT INTO collab_schema_version (version, name) VALUES (999, '0999_future.sql')",
            &[],
        )
        .expect("insert");
    let refused = PgStorage::open(&PgOptions {
        url: url.clone(),
        timeout: Duration::from_secs(5),
        synchronous_commit: true,
        ca_file: None,
    });
    match refused {
        Err(e) => {
            let text = e.to_string();
            assert!(text.contains("999") && text.contains("newer"), "{text}");
        }
        Ok(_) => panic!("a newer schema was accepted"),
    }
}

#[test]
fn postgres_terminated_sessions_reconnect_and_lose_or_repeat_nothing() {
    let url = pg::fresh_database("terminate");
    let mut storage = open_pg(&url, FsyncMode::Always, Duration::from_secs(5));
    write_doc(&mut storage, "doc", "E", 3);
    let admin = std::cell::RefCell::new(pg::client(&url));
    // Every few ops the storage's session is terminated, between syncs or during one.
    let mut terminated_at = 0;
    let failures = write_through_failures(&mut storage, "doc", 60, 40, |head| {
        if head % 7 == 0 && head != terminated_at {
            terminated_at = head;
            for pid in storage_backends(&url) {
                admin
                    .borrow_mut()
                    .execute("SELECT pg_terminate_backend($1)", &[&pid])
                    .expect("terminate");
            }
        }
    });
    eprintln!("{failures} failed syncs");
    let doc = open_pg(&url, FsyncMode::Always, Duration::from_secs(5))
        .load("doc")
        .expect("load")
        .expect("stored");
    assert_eq!(seqs(&doc), (1..=60).collect::<Vec<_>>());
}

#[test]
fn postgres_paused_session_is_an_unknown_outcome_then_settled() {
    let url = pg::fresh_database("paused");
    let mut storage = open_pg(&url, FsyncMode::Always, Duration::from_millis(500));
    write_doc(&mut storage, "doc", "E", 3);
    let pids = storage_backends(&url);
    assert_eq!(pids.len(), 1, "{pids:?}");
    // The session stops answering (as a frozen or overloaded server would).
    pg::signal(pids[0], "-STOP");
    storage.append("doc", "E", &ops(4)).expect("append");
    let result = storage.sync();
    assert!(
        matches!(result, Err(StorageError::OutcomeUnknown { .. })),
        "{result:?}"
    );
    // While the old session may still commit, nothing is read: a reload now could miss ops 4.
    assert!(storage.load("doc").is_err());
    pg::signal(pids[0], "-CONT");
    // Once it is gone, the outcome is settled and the log goes on from whatever it holds.
    let failures = write_through_failures(&mut storage, "doc", 10, 50, |_| {});
    eprintln!("{failures} failed attempts after the pause");
    let doc = open_pg(&url, FsyncMode::Always, Duration::from_secs(5))
        .load("doc")
        .expect("load")
        .expect("stored");
    assert_eq!(seqs(&doc), (1..=10).collect::<Vec<_>>());
}

#[test]
fn postgres_server_down_restarted_and_crashed_loses_and_repeats_nothing() {
    let server = pg::OwnServer::start("down");
    let mut storage = open_pg(&server.url, FsyncMode::Always, Duration::from_secs(2));
    write_doc(&mut storage, "doc", "E", 3);
    write_doc(&mut storage, "other", "E", 3);
    // Down: calls fail fast with errors, nothing panics, and the storage recovers after.
    server.ctl(&["stop", "-m", "fast"]);
    storage.append("doc", "E", &ops(4)).expect("append");
    assert!(storage.sync().is_err());
    assert!(storage.load("other").is_err());
    server.ctl(&["start"]);
    let mut restarted = Vec::new();
    write_through_failures(&mut storage, "doc", 40, 60, |head| {
        // Restarts under load, once each: a fast shutdown, then a crash (immediate: no
        // checkpoint, WAL replay at start).
        if restarted.contains(&head) {
            return;
        }
        match head {
            12 => server.ctl(&["restart", "-m", "fast"]),
            25 => server.ctl(&["restart", "-m", "immediate"]),
            _ => return,
        }
        restarted.push(head);
    });
    let mut fresh = open_pg(&server.url, FsyncMode::Always, Duration::from_secs(5));
    let doc = fresh.load("doc").expect("load").expect("stored");
    assert_eq!(seqs(&doc), (1..=40).collect::<Vec<_>>());
    let other = fresh.load("other").expect("load").expect("stored");
    assert_eq!(seqs(&other), vec![1, 2, 3]);
}

/// `collab-engine copy` with the real binary.
fn copy(args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_collab-engine"))
        .arg("copy")
        .args(args)
        .env_remove("COLLAB_DATABASE_URL")
        .output()
        .expect("run collab-engine copy")
}

/// What a document must keep through a copy.
fn essence(doc: &StoredDoc) -> (String, Option<StoredSnapshot>, Vec<u64>, u64) {
    let reserved = doc
        .tail
        .iter()
        .filter_map(|r| match r {
            LogRecord::ReplicasReserved { last } => Some(*last),
            LogRecord::Ops { .. } | LogRecord::ReplicaOwner { .. } | LogRecord::Accepted { .. } => {
                None
            }
        })
        .fold(
            doc.snapshot.as_ref().map_or(0, |s| s.replicas_reserved),
            u64::max,
        );
    (doc.epoch.clone(), doc.snapshot.clone(), seqs(doc), reserved)
}

#[test]
fn copy_moves_every_document_to_postgres_and_back() {
    let dir = temp_dir("copy-from");
    let names = [
        "with-snapshot",
        "log-only",
        "reservation/only ü",
        "NUL\0name",
    ];
    {
        let mut storage = open(&dir);
        write_doc(&mut storage, names[0], "E0", 3);
        storage
            .write_snapshot(names[0], &snapshot("E0", 3, 16))
            .expect("snapshot");
        for seq in 4..=6 {
            storage.append(names[0], "E0", &ops(seq)).expect("append");
        }
        storage
            .append(names[0], "E0", &LogRecord::ReplicasReserved { last: 32 })
            .expect("append");
        storage.sync().expect("sync");
        write_doc(&mut storage, names[1], "E1", 5);
        storage
            .append(names[2], "E2", &LogRecord::ReplicasReserved { last: 16 })
            .expect("append");
        storage.sync().expect("sync");
        write_doc(&mut storage, names[3], "E3", 1);
    }
    let url = pg::fresh_database("copy");
    let out = copy(&[
        "--from-data-dir",
        dir.to_str().expect("utf-8"),
        "--to-database-url",
        &url,
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("copied and verified 4 documents"),
        "{stdout}"
    );

    let mut disk = open(&dir);
    let mut db = open_pg(&url, FsyncMode::Always, Duration::from_secs(5));
    for name in names {
        let a = disk.load(name).expect("load").expect("on disk");
        let b = db.load(name).expect("load").expect("in the database");
        assert_eq!(essence(&a), essence(&b), "{name:?}");
    }
    drop(disk);

    // Never into a destination that already holds one of the documents.
    let again = copy(&[
        "--from-data-dir",
        dir.to_str().expect("utf-8"),
        "--to-database-url",
        &url,
    ]);
    assert!(!again.status.success());
    assert!(
        String::from_utf8_lossy(&again.stderr).contains("already in the destination"),
        "{}",
        String::from_utf8_lossy(&again.stderr)
    );

    // And back, into a new data directory.
    let back = temp_dir("copy-back");
    let out = copy(&[
        "--from-database-url",
        &url,
        "--to-data-dir",
        back.to_str().expect("utf-8"),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut original = open(&dir);
    let mut returned = open(&back);
    for name in names {
        let a = original.load(name).expect("load").expect("original");
        let b = returned.load(name).expect("load").expect("copied back");
        assert_eq!(essence(&a), essence(&b), "{name:?}");
    }
    // Two sides of one kind are refused.
    let same = copy(&[
        "--from-data-dir",
        dir.to_str().expect("utf-8"),
        "--to-data-dir",
        back.to_str().expect("utf-8"),
    ]);
    assert!(!same.status.success());
}

/// `url` with `sslmode=MODE` added.
fn with_sslmode(url: &str, mode: &str) -> String {
    let sep = if url.contains('?') { '&' } else { '?' };
    format!("{url}{sep}sslmode={mode}")
}

fn open_pg_tls(url: &str, ca_file: Option<&Path>) -> Result<PgStorage, String> {
    PgStorage::open(&PgOptions {
        url: url.to_owned(),
        timeout: Duration::from_secs(5),
        synchronous_commit: true,
        ca_file: ca_file.map(Path::to_path_buf),
    })
    .map_err(|e| e.to_string())
}

#[test]
fn postgres_tls_is_verified_against_the_ca_file_and_refusals_are_clear() {
    let server = pg::OwnServer::start_tls("tls");
    let ca = server.ca_file();
    let url = with_sslmode(&server.url, "require");
    let mut storage = open_pg_tls(&url, Some(&ca)).expect("open over TLS");
    write_doc(&mut storage, "doc", "E", 5);
    // On the server's side: the storage's session is encrypted.
    let sessions: Vec<(bool, String)> = pg::client(&server.url)
        .query(
            "SELECT s.ssl, coalesce(s.version, '') FROM pg_stat_ssl s \
             JOIN pg_stat_activity a USING (pid) \
             WHERE a.datname = current_database() AND a.application_name = 'collab-engine'",
            &[],
        )
        .expect("pg_stat_ssl")
        .iter()
        .map(|row| (row.get(0), row.get(1)))
        .collect();
    assert_eq!(sessions.len(), 1, "{sessions:?}");
    assert!(sessions[0].0, "storage session not encrypted: {sessions:?}");
    assert!(sessions[0].1.starts_with("TLSv1."), "{sessions:?}");
    drop(storage);
    // A fresh storage over TLS reads back what was written.
    let doc = open_pg_tls(&url, Some(&ca))
        .expect("reopen over TLS")
        .load("doc")
        .expect("load")
        .expect("stored");
    assert_eq!(seqs(&doc), (1..=5).collect::<Vec<_>>());
    // `collab-engine copy` takes the same flag; without it, sslmode=require is refused.
    let from = temp_dir("tls-copy");
    write_doc(&mut open(&from), "copied", "E", 2);
    let args = [
        "--from-data-dir",
        from.to_str().expect("utf-8"),
        "--to-database-url",
        &url,
    ];
    let out = copy(&args);
    assert!(!out.status.success(), "copy without a CA file succeeded");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("needs --database-ca-file"), "{stderr}");
    let ca_arg = ca.to_str().expect("utf-8");
    let out = copy(&[&args[..], &["--database-ca-file", ca_arg]].concat());
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("copied and verified 1 documents"),
        "{stdout}"
    );
    fs::remove_dir_all(&from).expect("cleanup");

    // A CA that did not sign the server's certificate: refused at start, with the reason.
    let wrong = temp_dir("wrong-ca");
    let status = std::process::Command::new("openssl")
        .args(["req", "-x509", "-new", "-nodes", "-newkey", "ec"])
        .args(["-pkeyopt", "ec_paramgen_curve:P-256", "-days", "1"])
        .args([
            "-subj",
            "/CN=some other CA",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
        ])
        .arg("-keyout")
        .arg(wrong.join("ca.key"))
        .arg("-out")
        .arg(wrong.join("ca.pem"))
        .stderr(std::process::Stdio::null())
        .status()
        .expect("running openssl");
    assert!(status.success(), "openssl req failed");
    let refused = open_pg_tls(&url, Some(&wrong.join("ca.pem"))).err();
    let text = refused.expect("a foreign CA was accepted");
    eprintln!("refusal of a foreign CA: {text}");
    assert!(
        text.contains("connecting to the database") && text.contains("certificate"),
        "{text}"
    );
    // The same foreign CA with sslmode=prefer: still refused (TLS is offered, so it is used
    // and verified; never a silent fallback to an unverified or plain session).
    let prefer = open_pg_tls(
        &with_sslmode(&server.url, "prefer"),
        Some(&wrong.join("ca.pem")),
    );
    assert!(prefer.is_err(), "prefer accepted an unverifiable server");
    // A CA file that is not a certificate.
    let text = open_pg_tls(&url, Some(&wrong.join("ca.key")))
        .err()
        .expect("a key file was accepted as CA");
    assert!(text.contains("--database-ca-file"), "{text}");
    // sslmode=require without a CA file: refused before connecting.
    let text = open_pg_tls(&url, None)
        .err()
        .expect("require without a CA file was accepted");
    assert!(
        text.contains("sslmode=require needs --database-ca-file"),
        "{text}"
    );
    // sslmode=require against a server without TLS (the shared test server has ssl off).
    let plain = with_sslmode(pg::server_url(), "require");
    let text = open_pg_tls(&plain, Some(&ca))
        .err()
        .expect("require connected to a server without TLS");
    assert!(text.contains("connecting to the database"), "{text}");
    eprintln!("refusal against a server without TLS: {text}");
    fs::remove_dir_all(&wrong).expect("cleanup");
}
