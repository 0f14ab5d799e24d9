//! `collab-engine copy`: moves every document between the disk backend and PostgreSQL, with
//! its epoch, head, snapshot, replica reservations and log window, then verifies the result.
//!
//! The source is only read. Nothing is written unless every document is absent from the
//! destination (a copy never merges into or overwrites a history). Each document is copied
//! as its snapshot (when it has one) followed by its log tail, then read back from a fresh
//! storage over the destination and replayed beside the source: the text, head and epoch must
//! be the same. Run it with the server stopped (the data directory's LOCK enforces that for
//! the disk side).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use clap::Parser;

use crate::config::{Config, FsyncMode};
use crate::room::{Room, RoomConfig};
use crate::storage::{DiskStorage, PgOptions, PgStorage, Storage, StoredDoc};

/// Arguments of `collab-engine copy`.
#[derive(Clone, Debug, Parser)]
#[command(
    name = "collab-engine copy",
    about = "Copy every document between a data directory and PostgreSQL, then verify it"
)]
pub struct CopyArgs {
    /// Read documents from this data directory.
    #[arg(long, conflicts_with = "from_database_url")]
    pub from_data_dir: Option<PathBuf>,
    /// Read documents from this PostgreSQL database.
    #[arg(long)]
    pub from_database_url: Option<String>,
    /// Write documents into this data directory.
    #[arg(long, conflicts_with = "to_database_url")]
    pub to_data_dir: Option<PathBuf>,
    /// Write documents into this PostgreSQL database.
    #[arg(long)]
    pub to_database_url: Option<String>,
    /// Deadline of each database statement.
    #[arg(long, default_value = "30s", value_parser = crate::units::parse_duration)]
    pub database_timeout: Duration,
    /// PEM CA the database servers' certificates must chain to (both sides); see the server's
    /// `--database-ca-file` for how it combines with the URL's `sslmode`.
    #[arg(long, value_name = "PATH", env = "COLLAB_DATABASE_CA_FILE")]
    pub database_ca_file: Option<PathBuf>,
}

/// What a copy did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CopyReport {
    /// Documents copied and verified.
    pub docs: usize,
    /// Op records copied (log tails).
    pub ops: usize,
    /// Snapshots copied.
    pub snapshots: usize,
}

/// One side of a copy (boxed: one of each lives for the whole copy).
enum Store {
    Disk(Box<DiskStorage>),
    Pg(Box<PgStorage>),
}

impl Store {
    fn open_disk(dir: &std::path::Path) -> anyhow::Result<Store> {
        let storage = DiskStorage::open(dir, FsyncMode::Always)
            .with_context(|| format!("opening the data directory {}", dir.display()))?;
        Ok(Store::Disk(Box::new(storage)))
    }

    fn open_pg(url: &str, timeout: Duration, ca_file: Option<&PathBuf>) -> anyhow::Result<Store> {
        let storage = PgStorage::open(&PgOptions {
            url: url.to_owned(),
            timeout,
            synchronous_commit: true,
            ca_file: ca_file.cloned(),
        })?;
        Ok(Store::Pg(Box::new(storage)))
    }

    fn list_docs(&mut self) -> anyhow::Result<Vec<String>> {
        Ok(match self {
            Store::Disk(storage) => storage.list_docs()?,
            Store::Pg(storage) => storage.list_docs()?,
        })
    }

    fn storage(&mut self) -> &mut dyn Storage {
        match self {
            Store::Disk(storage) => &mut **storage,
            Store::Pg(storage) => &mut **storage,
        }
    }
}

/// Runs a copy.
///
/// # Errors
/// When the arguments do not name one source and one destination of different kinds, a side
/// cannot be opened, a document is already in the destination, a read or write fails, or a
/// copied document does not verify.
pub fn run(args: &CopyArgs) -> anyhow::Result<CopyReport> {
    let timeout = args.database_timeout;
    let ca_file = args.database_ca_file.as_ref();
    let (mut from, from_label) = match (&args.from_data_dir, &args.from_database_url) {
        (Some(dir), None) => (Store::open_disk(dir)?, format!("{}", dir.display())),
        (None, Some(url)) => (
            Store::open_pg(url, timeout, ca_file)?,
            "the database".to_owned(),
        ),
        _ => bail!("give one of --from-data-dir and --from-database-url"),
    };
    let open_to = || -> anyhow::Result<Store> {
        match (&args.to_data_dir, &args.to_database_url) {
            (Some(dir), None) => Store::open_disk(dir),
            (None, Some(url)) => Store::open_pg(url, timeout, ca_file),
            _ => bail!("give one of --to-data-dir and --to-database-url"),
        }
    };
    if args.from_data_dir.is_some() == args.to_data_dir.is_some() {
        bail!("copy goes from a data directory to a database or back");
    }
    let mut to = open_to()?;
    let names = from.list_docs()?;
    let existing = to.list_docs()?;
    if let Some(name) = names.iter().find(|n| existing.binary_search(n).is_ok()) {
        bail!(
            "document {name:?} is already in the destination; copy only into an empty one \
             ({} documents there)",
            existing.len()
        );
    }
    let room_config = RoomConfig::from_config(&Config::parse_from(["collab-engine"]));
    let mut report = CopyReport::default();
    let mut sources = Vec::with_capacity(names.len());
    for name in &names {
        let stored = from
            .storage()
            .load(name)
            .with_context(|| format!("reading document {name:?} from {from_label}"))?;
        let Some(stored) = stored else {
            log::warn!("document {name:?}: nothing stored; skipped");
            continue;
        };
        write_doc(to.storage(), name, &stored)
            .with_context(|| format!("writing document {name:?}"))?;
        from.storage().release(name);
        to.storage().release(name);
        report.docs += 1;
        report.snapshots += usize::from(stored.snapshot.is_some());
        report.ops += stored
            .tail
            .iter()
            .filter(|r| matches!(r, crate::storage::LogRecord::Ops { .. }))
            .count();
        sources.push((name, stored));
    }
    // Verify from a fresh storage, as the server would load them.
    drop(to);
    let mut check = open_to()?;
    for (name, source) in sources {
        let copied = check
            .storage()
            .load(name)
            .with_context(|| format!("reading back document {name:?}"))?
            .ok_or_else(|| anyhow!("document {name:?} missing after the copy"))?;
        verify(name, source, copied, &room_config)?;
        check.storage().release(name);
    }
    Ok(report)
}

/// Writes one document: its snapshot, then its log tail in one sync.
fn write_doc(to: &mut dyn Storage, name: &str, stored: &StoredDoc) -> anyhow::Result<()> {
    if let Some(snapshot) = &stored.snapshot {
        to.write_snapshot(name, snapshot)?;
    }
    for record in &stored.tail {
        to.append(name, &stored.epoch, record)?;
    }
    to.sync()?;
    Ok(())
}

/// The copy replays to the same document as the source.
fn verify(
    name: &str,
    source: StoredDoc,
    copied: StoredDoc,
    config: &RoomConfig,
) -> anyhow::Result<()> {
    if reserved(&source) != reserved(&copied) {
        bail!("document {name:?}: replica reservations differ after the copy");
    }
    if owners(&source) != owners(&copied) {
        bail!("document {name:?}: replica owners differ after the copy");
    }
    let open = |stored: StoredDoc, side: &str| {
        Room::open(name.to_owned(), Some(stored), config.clone())
            .map_err(|e| anyhow!("document {name:?}: the {side} does not replay: {e}"))
    };
    let source = open(source, "source")?;
    let copied = open(copied, "copy")?;
    if source.epoch() != copied.epoch() {
        bail!("document {name:?}: epoch differs after the copy");
    }
    if source.head() != copied.head() {
        bail!(
            "document {name:?}: head {} in the source, {} in the copy",
            source.head(),
            copied.head()
        );
    }
    if source.text() != copied.text() {
        bail!("document {name:?}: the copy's text differs from the source's");
    }
    Ok(())
}

/// Highest replica reservation a stored document holds.
fn reserved(stored: &StoredDoc) -> u64 {
    let in_snapshot = stored.snapshot.as_ref().map_or(0, |s| s.replicas_reserved);
    stored
        .tail
        .iter()
        .filter_map(|r| match r {
            crate::storage::LogRecord::ReplicasReserved { last } => Some(*last),
            crate::storage::LogRecord::Ops { .. }
            | crate::storage::LogRecord::ReplicaOwner { .. }
            | crate::storage::LogRecord::Accepted { .. } => None,
        })
        .fold(in_snapshot, u64::max)
}

/// Which user owns each replica of a stored document (access control's replica binding), from
/// its snapshot and its log tail.
fn owners(stored: &StoredDoc) -> std::collections::BTreeMap<u64, String> {
    let mut owners: std::collections::BTreeMap<u64, String> = stored
        .snapshot
        .iter()
        .flat_map(|s| s.owners.iter().cloned())
        .collect();
    for record in &stored.tail {
        if let crate::storage::LogRecord::ReplicaOwner { replica, user } = record {
            owners.entry(*replica).or_insert_with(|| user.clone());
        }
    }
    owners
}
