//! `collab-engine export` and `collab-engine import`: one document of a stopped server to a
//! JSON file and back, to back up, move or inspect it offline.
//!
//! The file holds the document's epoch, head and text, its newest snapshot in the contract's
//! run format, its retained log (each op message with its `server_seq`, `replica`,
//! `client_seq` and `ops`), and its replica reservations and owners. Import rebuilds the
//! stored document from it, replays it before writing anything (it must reach the file's head
//! and text), refuses a document that already exists, writes it in one sync, and reads it back
//! from a fresh storage to compare. Both open the data directory with its `LOCK`
//! (`crate::offline`), so a directory a running server holds is refused; on a live server use
//! the snapshot and history endpoints instead.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use clap::Parser;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::offline::{self, Store};
use crate::protocol::{
    self, encode_op_echo, encode_snapshot_runs, parse_op_echo, parse_snapshot_runs,
};
use crate::storage::{LogRecord, StoredDoc, StoredSnapshot};

/// `format` of an export file.
pub const FORMAT: &str = "collab-engine-export";
/// `version` of the export files this build writes and reads.
pub const VERSION: u32 = 1;
/// Largest export file `import` reads (a mistyped path to a huge file must not be slurped).
pub const IMPORT_BYTES_MAX: u64 = 4 << 30;

/// Where the document is kept (both commands).
#[derive(Clone, Debug, clap::Args)]
pub struct StoreArgs {
    /// The server's data directory (refused while a server holds it).
    #[arg(long, conflicts_with = "database_url")]
    pub data_dir: Option<PathBuf>,
    /// The server's PostgreSQL database (no server may be using it).
    #[arg(long)]
    pub database_url: Option<String>,
    /// Deadline of each database statement.
    #[arg(long, default_value = "30s", value_parser = crate::units::parse_duration)]
    pub database_timeout: Duration,
    /// PEM CA the database server's certificate must chain to (see the server's flag).
    #[arg(long, value_name = "PATH", env = "COLLAB_DATABASE_CA_FILE")]
    pub database_ca_file: Option<PathBuf>,
}

impl StoreArgs {
    fn open(&self) -> anyhow::Result<Store> {
        Store::open_either(
            self.data_dir.as_deref(),
            self.database_url.as_deref(),
            self.database_timeout,
            self.database_ca_file.as_ref(),
        )
    }
}

/// Arguments of `collab-engine export`.
#[derive(Clone, Debug, Parser)]
#[command(
    name = "collab-engine export",
    about = "Write one document (epoch, head, snapshot, retained log) as JSON"
)]
pub struct ExportArgs {
    /// The document.
    #[arg(long)]
    pub doc: String,
    /// Where it is kept.
    #[command(flatten)]
    pub store: StoreArgs,
    /// Write to this file (replaced atomically) instead of standard output.
    #[arg(long, value_name = "FILE")]
    pub out: Option<PathBuf>,
}

/// Arguments of `collab-engine import`.
#[derive(Clone, Debug, Parser)]
#[command(
    name = "collab-engine import",
    about = "Write a document from an export file, then verify it"
)]
pub struct ImportArgs {
    /// The export file (`-` for standard input).
    #[arg(long = "in", value_name = "FILE")]
    pub input: PathBuf,
    /// Where to write it.
    #[command(flatten)]
    pub store: StoreArgs,
    /// Store it under this name instead of the exported one.
    #[arg(long)]
    pub doc: Option<String>,
}

/// An export file.
#[derive(Debug, Serialize, Deserialize)]
pub struct ExportFile {
    /// [`FORMAT`].
    pub format: String,
    /// [`VERSION`].
    pub version: u32,
    /// The document's name.
    pub doc: String,
    /// Its epoch.
    pub epoch: String,
    /// The `server_seq` of its last op message.
    pub head: u64,
    /// Its visible text at `head` (checked on import).
    pub text: String,
    /// The highest replica id reserved.
    pub replicas_reserved: u64,
    /// Each replica's owner (access control's replica binding), by replica.
    pub owners: Vec<ExportOwner>,
    /// The newest snapshot, if the document has one.
    pub snapshot: Option<ExportSnapshot>,
    /// The retained log after (and possibly overlapping) the snapshot, in order.
    pub log: Vec<ExportOp>,
}

/// A replica's owner.
#[derive(Debug, Serialize, Deserialize)]
pub struct ExportOwner {
    /// The replica.
    pub replica: u64,
    /// The token's `sub`.
    pub user: String,
}

/// A snapshot in the contract's run format.
#[derive(Debug, Serialize, Deserialize)]
pub struct ExportSnapshot {
    /// The `server_seq` it includes.
    pub head: u64,
    /// Replicas reserved when it was taken.
    pub replicas_reserved: u64,
    /// Owners known when it was taken.
    pub owners: Vec<ExportOwner>,
    /// The runs, as in a `hello_ack`'s `snapshot.runs`.
    pub runs: Box<RawValue>,
}

/// One op message of the log.
#[derive(Debug, Serialize, Deserialize)]
pub struct ExportOp {
    /// Its position in the history.
    pub server_seq: u64,
    /// The replica that sent it.
    pub replica: u64,
    /// The sender's `client_seq`.
    pub client_seq: u64,
    /// The ops, as in its `op_echo`.
    pub ops: Box<RawValue>,
}

fn owners_of(owners: impl IntoIterator<Item = (u64, String)>) -> Vec<ExportOwner> {
    owners
        .into_iter()
        .map(|(replica, user)| ExportOwner { replica, user })
        .collect()
}

/// The export of `doc` as stored.
///
/// # Errors
/// When it does not replay or a record does not decode.
pub fn export_doc(doc: &str, stored: StoredDoc) -> anyhow::Result<ExportFile> {
    let snapshot = match &stored.snapshot {
        Some(s) => {
            #[derive(Deserialize)]
            struct Runs {
                runs: Box<RawValue>,
            }
            let runs: Runs = serde_json::from_str(&s.runs_json)
                .map_err(|e| anyhow!("document {doc:?}: the snapshot does not decode: {e}"))?;
            Some(ExportSnapshot {
                head: s.head,
                replicas_reserved: s.replicas_reserved,
                owners: owners_of(s.owners.iter().cloned()),
                runs: runs.runs,
            })
        }
        None => None,
    };
    let mut log = Vec::new();
    for record in &stored.tail {
        if let LogRecord::Ops { echo, .. } = record {
            log.push(export_op(echo).map_err(|e| anyhow!("document {doc:?}: {e}"))?);
        }
    }
    let replicas_reserved = offline::reserved(&stored);
    let owners = owners_of(offline::owners(&stored));
    let room = offline::replay(
        doc,
        stored,
        &offline::default_room_config(),
        "stored document",
    )?;
    Ok(ExportFile {
        format: FORMAT.to_owned(),
        version: VERSION,
        doc: doc.to_owned(),
        epoch: room.epoch().to_owned(),
        head: room.head(),
        text: room.text(),
        replicas_reserved,
        owners,
        snapshot,
        log,
    })
}

/// An `op_echo` log record as an [`ExportOp`] (its ops kept as they were stored).
fn export_op(echo: &str) -> anyhow::Result<ExportOp> {
    #[derive(Deserialize)]
    struct Echo {
        server_seq: u64,
        replica: u64,
        client_seq: u64,
        ops: Box<RawValue>,
    }
    let fields: Echo =
        serde_json::from_str(echo).map_err(|e| anyhow!("a log record does not decode: {e}"))?;
    Ok(ExportOp {
        server_seq: fields.server_seq,
        replica: fields.replica,
        client_seq: fields.client_seq,
        ops: fields.ops,
    })
}

/// The stored document an export file stands for, in the server's own encoding (every
/// snapshot and echo decoded and encoded again).
///
/// # Errors
/// A message naming the first part of the file that is not valid.
pub fn stored_doc(file: &ExportFile) -> anyhow::Result<StoredDoc> {
    if file.format != FORMAT {
        bail!(
            "not an export file (format {:?}, expected {FORMAT:?})",
            file.format
        );
    }
    if file.version != VERSION {
        bail!(
            "export version {} (this build reads {VERSION})",
            file.version
        );
    }
    if file.epoch.is_empty() {
        bail!("the export's epoch is empty");
    }
    let snapshot = match &file.snapshot {
        Some(s) => {
            let runs_json = format!("{{\"runs\":{}}}", s.runs.get());
            let runs = parse_snapshot_runs(&runs_json)
                .map_err(|e| anyhow!("the snapshot's runs are not valid: {e}"))?;
            Some(StoredSnapshot {
                epoch: file.epoch.clone(),
                head: s.head,
                replicas_reserved: s.replicas_reserved,
                owners: s
                    .owners
                    .iter()
                    .map(|o| (o.replica, o.user.clone()))
                    .collect(),
                runs_json: encode_snapshot_runs(&runs).into(),
            })
        }
        None => None,
    };
    let mut tail = Vec::with_capacity(file.log.len() + 1 + file.owners.len());
    let mut last_seq = 0;
    for op in &file.log {
        if op.server_seq <= last_seq {
            bail!(
                "log entry server_seq {} after {last_seq}: the log must be in order",
                op.server_seq
            );
        }
        last_seq = op.server_seq;
        let text = format!(
            "{{\"type\":\"op_echo\",\"server_seq\":{},\"replica\":{},\"client_seq\":{},\"ops\":{}}}",
            op.server_seq,
            op.replica,
            op.client_seq,
            op.ops.get()
        );
        let echo: protocol::OpEcho = parse_op_echo(&text).map_err(|e| {
            anyhow!(
                "log entry server_seq {}: not a valid op message: {e}",
                op.server_seq
            )
        })?;
        tail.push(LogRecord::Ops {
            server_seq: op.server_seq,
            echo: encode_op_echo(echo.server_seq, echo.replica, echo.client_seq, &echo.ops),
        });
    }
    let in_snapshot = snapshot.as_ref().map_or(0, |s| s.replicas_reserved);
    if file.replicas_reserved > in_snapshot {
        tail.push(LogRecord::ReplicasReserved {
            last: file.replicas_reserved,
        });
    }
    let snapshot_owners: Vec<u64> = snapshot
        .iter()
        .flat_map(|s| s.owners.iter().map(|(replica, _)| *replica))
        .collect();
    for owner in &file.owners {
        if !snapshot_owners.contains(&owner.replica) {
            tail.push(LogRecord::ReplicaOwner {
                replica: owner.replica,
                user: owner.user.clone(),
            });
        }
    }
    Ok(StoredDoc {
        epoch: file.epoch.clone(),
        snapshot,
        tail,
    })
}

/// Runs `collab-engine export`; returns the document's head.
///
/// # Errors
/// When the store cannot be opened (a held data directory included), the document does not
/// exist or does not replay, or the output cannot be written.
pub fn run_export(args: &ExportArgs) -> anyhow::Result<ExportFile> {
    let mut store = args.store.open()?;
    let label = store.label();
    let stored = store
        .storage()
        .load(&args.doc)
        .with_context(|| format!("reading document {:?} from {label}", args.doc))?
        .ok_or_else(|| anyhow!("no document {:?} in {label}", args.doc))?;
    store.storage().release(&args.doc);
    let file = export_doc(&args.doc, stored)?;
    let mut bytes = serde_json::to_vec(&file).context("encoding the export")?;
    bytes.push(b'\n');
    match &args.out {
        Some(path) => write_atomically(path, &bytes)?,
        None => {
            let mut stdout = std::io::stdout().lock();
            stdout
                .write_all(&bytes)
                .and_then(|()| stdout.flush())
                .context("writing to standard output")?;
        }
    }
    Ok(file)
}

/// What an import wrote.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Imported {
    /// The name it was stored under.
    pub doc: String,
    /// Its head.
    pub head: u64,
    /// Op messages written.
    pub ops: usize,
}

/// Runs `collab-engine import`.
///
/// # Errors
/// When the file cannot be read or is not valid, does not replay to its own head and text,
/// the document already exists, a write fails, or the document read back differs.
pub fn run_import(args: &ImportArgs) -> anyhow::Result<Imported> {
    let bytes = read_input(&args.input)?;
    let file: ExportFile = serde_json::from_slice(&bytes)
        .with_context(|| format!("{} is not an export file", args.input.display()))?;
    let source = stored_doc(&file).with_context(|| format!("{}", args.input.display()))?;
    let name = args.doc.clone().unwrap_or_else(|| file.doc.clone());
    if name.is_empty() || name.len() > crate::config::DOC_NAME_BYTES_MAX {
        bail!(
            "a document name has 1 to {} bytes, not {}",
            crate::config::DOC_NAME_BYTES_MAX,
            name.len()
        );
    }
    let config = offline::default_room_config();
    // Before anything is written: the file must replay to what it says.
    let room = offline::replay(&name, source.clone(), &config, "export file")?;
    if room.head() != file.head || room.text() != file.text {
        bail!(
            "{}: the log replays to head {} and {} characters, the file says head {} and {}",
            args.input.display(),
            room.head(),
            room.text().chars().count(),
            file.head,
            file.text.chars().count()
        );
    }
    drop(room);
    let mut store = args.store.open()?;
    let label = store.label();
    let existing = store
        .storage()
        .load(&name)
        .with_context(|| format!("looking for document {name:?} in {label}"))?;
    // A `--replace` flag would delete the existing document here first, through the document
    // API's `Storage::delete` (issue 12, another branch); until then an import never overwrites.
    if existing.is_some() {
        bail!("document {name:?} already exists in {label}; import into a new name (--doc)");
    }
    offline::write_doc(store.storage(), &name, &source)
        .with_context(|| format!("writing document {name:?} into {label}"))?;
    store.storage().release(&name);
    drop(store);
    // Read back from a fresh storage, as the server would load it.
    let mut check = args.store.open()?;
    let written = check
        .storage()
        .load(&name)
        .with_context(|| format!("reading back document {name:?}"))?
        .ok_or_else(|| anyhow!("document {name:?} missing after the import"))?;
    check.storage().release(&name);
    let ops = file.log.len();
    offline::verify(&name, source, written, &config)?;
    Ok(Imported {
        doc: name,
        head: file.head,
        ops,
    })
}

fn read_input(path: &Path) -> anyhow::Result<Vec<u8>> {
    let mut bytes = Vec::new();
    if path == Path::new("-") {
        std::io::stdin()
            .lock()
            .take(IMPORT_BYTES_MAX + 1)
            .read_to_end(&mut bytes)
            .context("reading standard input")?;
    } else {
        std::fs::File::open(path)
            .and_then(|f| f.take(IMPORT_BYTES_MAX + 1).read_to_end(&mut bytes))
            .with_context(|| format!("reading {}", path.display()))?;
    }
    if bytes.len() as u64 > IMPORT_BYTES_MAX {
        bail!("{} is larger than {IMPORT_BYTES_MAX} bytes", path.display());
    }
    Ok(bytes)
}

/// Writes `bytes` to `path` through a temporary file beside it, fsynced, then renamed.
fn write_atomically(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let mut tmp_name = path
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_default();
    tmp_name.push(".tmp");
    let tmp = path.with_file_name(tmp_name);
    let mut file =
        std::fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    file.write_all(bytes)
        .and_then(|()| file.sync_all())
        .with_context(|| format!("writing {}", tmp.display()))?;
    drop(file);
    std::fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crdt::Doc;

    /// A stored document of `n` op messages typing `text`, with a snapshot after `snap_at`.
    fn stored(text: &str, snap_at: Option<usize>) -> StoredDoc {
        let mut doc = Doc::new();
        let mut tail = Vec::new();
        let mut snapshot = None;
        for (i, ch) in text.chars().enumerate() {
            let op = doc.insert_local(1, i, &ch.to_string());
            let seq = i as u64 + 1;
            tail.push(LogRecord::Ops {
                server_seq: seq,
                echo: encode_op_echo(seq, 1, seq, &[op]),
            });
            if snap_at == Some(i + 1) {
                snapshot = Some(StoredSnapshot {
                    epoch: "E".to_owned(),
                    head: seq,
                    replicas_reserved: 16,
                    owners: vec![(1, "alice".to_owned())],
                    runs_json: encode_snapshot_runs(&doc.snapshot()).into(),
                });
                tail.clear();
            }
        }
        tail.push(LogRecord::ReplicasReserved { last: 32 });
        tail.push(LogRecord::ReplicaOwner {
            replica: 2,
            user: "bob".to_owned(),
        });
        StoredDoc {
            epoch: "E".to_owned(),
            snapshot,
            tail,
        }
    }

    #[test]
    fn export_then_import_is_the_same_document() {
        for snap_at in [None, Some(3), Some(6)] {
            let source = stored("héllo!", snap_at);
            let file = export_doc("d", source.clone()).expect("export");
            assert_eq!((file.head, file.text.as_str()), (6, "héllo!"));
            let text = serde_json::to_string(&file).expect("encode");
            let back: ExportFile = serde_json::from_str(&text).expect("decode");
            let rebuilt = stored_doc(&back).expect("valid");
            assert_eq!(offline::reserved(&rebuilt), 32);
            assert_eq!(offline::owners(&rebuilt), offline::owners(&source));
            offline::verify(
                "d",
                source.clone(),
                rebuilt,
                &offline::default_room_config(),
            )
            .expect("same document");
        }
    }

    #[test]
    fn bad_files_are_refused_with_the_reason() {
        let file = export_doc("d", stored("abc", None)).expect("export");
        let text = serde_json::to_string(&file).expect("encode");
        let check = |edit: &dyn Fn(&mut serde_json::Value), expected: &str| {
            let mut value: serde_json::Value = serde_json::from_str(&text).expect("json");
            edit(&mut value);
            let file: ExportFile = serde_json::from_value(value).expect("shape");
            let err = stored_doc(&file).expect_err(expected);
            assert!(
                format!("{err:#}").contains(expected),
                "{err:#} lacks {expected:?}"
            );
        };
        check(&|v| v["format"] = "other".into(), "not an export file");
        check(&|v| v["version"] = 9.into(), "export version 9");
        check(&|v| v["epoch"] = "".into(), "epoch is empty");
        check(
            &|v| v["log"][1]["server_seq"] = 1.into(),
            "must be in order",
        );
        check(
            &|v| v["log"][0]["ops"] = serde_json::json!([{"kind": "nope"}]),
            "not a valid op message",
        );
    }
}
