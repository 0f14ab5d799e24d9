//! Documents of a stopped server, for the offline tools (`collab-engine copy`, `export`,
//! `import`): opening a data directory or a database, writing one document, and checking that
//! what was written replays to the same document.
//!
//! Opening a data directory takes its `LOCK` ([`crate::storage::lock_data_dir`]), so a data
//! directory that a running server holds is refused. A database has no such lock: the tools
//! must run while no server uses it (docs/storage.md).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{anyhow, bail, Context};

use crate::config::FsyncMode;
use crate::room::{Room, RoomConfig};
use crate::storage::{DiskStorage, LogRecord, PgOptions, PgStorage, Storage, StoredDoc};

/// A data directory or a database, opened by an offline tool (boxed: one or two live for the
/// whole run).
pub enum Store {
    /// A data directory, locked.
    Disk(Box<DiskStorage>),
    /// A PostgreSQL database.
    Pg(Box<PgStorage>),
}

impl Store {
    /// Opens (and locks) a data directory.
    ///
    /// # Errors
    /// When it cannot be created or opened, or a running server holds it.
    pub fn open_disk(dir: &Path) -> anyhow::Result<Store> {
        let storage = DiskStorage::open(dir, FsyncMode::Always)
            .with_context(|| format!("opening the data directory {}", dir.display()))?;
        Ok(Store::Disk(Box::new(storage)))
    }

    /// Connects to a database (creating or upgrading its schema), with synchronous commits.
    ///
    /// # Errors
    /// When it cannot be reached or its schema cannot be used.
    pub fn open_pg(
        url: &str,
        timeout: Duration,
        ca_file: Option<&PathBuf>,
    ) -> anyhow::Result<Store> {
        let storage = PgStorage::open(&PgOptions {
            url: url.to_owned(),
            timeout,
            synchronous_commit: true,
            ca_file: ca_file.cloned(),
        })?;
        Ok(Store::Pg(Box::new(storage)))
    }

    /// Opens exactly one of `data_dir` and `url` (the flag names are for the error).
    ///
    /// # Errors
    /// When both or neither are given, or opening fails.
    pub fn open_either(
        data_dir: Option<&Path>,
        url: Option<&str>,
        timeout: Duration,
        ca_file: Option<&PathBuf>,
    ) -> anyhow::Result<Store> {
        match (data_dir, url) {
            (Some(dir), None) => Store::open_disk(dir),
            (None, Some(url)) => Store::open_pg(url, timeout, ca_file),
            _ => bail!("give one of --data-dir and --database-url"),
        }
    }

    /// Every stored document, sorted.
    ///
    /// # Errors
    /// When listing fails.
    pub fn list_docs(&mut self) -> anyhow::Result<Vec<String>> {
        Ok(match self {
            Store::Disk(storage) => storage.list_docs()?,
            Store::Pg(storage) => storage.list_docs()?,
        })
    }

    /// The storage behind it.
    pub fn storage(&mut self) -> &mut dyn Storage {
        match self {
            Store::Disk(storage) => &mut **storage,
            Store::Pg(storage) => &mut **storage,
        }
    }

    /// `data directory DIR` or `the database`, for messages.
    pub fn label(&self) -> String {
        match self {
            Store::Disk(storage) => format!("the data directory {}", storage.data_dir().display()),
            Store::Pg(_) => "the database".to_owned(),
        }
    }
}

/// The room limits the tools replay with: the server's defaults.
pub fn default_room_config() -> RoomConfig {
    use clap::Parser;
    RoomConfig::from_config(&crate::config::Config::parse_from(["collab-engine"]))
}

/// Writes one document: its snapshot, then its log tail in one sync.
///
/// # Errors
/// When a write or the sync fails.
pub fn write_doc(to: &mut dyn Storage, name: &str, stored: &StoredDoc) -> anyhow::Result<()> {
    if let Some(snapshot) = &stored.snapshot {
        to.write_snapshot(name, snapshot)?;
    }
    for record in &stored.tail {
        to.append(name, &stored.epoch, record)?;
    }
    to.sync()?;
    Ok(())
}

/// Replays a stored document as the server would load it.
///
/// # Errors
/// When it does not replay (`side` names it in the message).
pub fn replay(
    name: &str,
    stored: StoredDoc,
    config: &RoomConfig,
    side: &str,
) -> anyhow::Result<Room> {
    Room::open(name.to_owned(), Some(stored), config.clone())
        .map_err(|e| anyhow!("document {name:?}: the {side} does not replay: {e}"))
}

/// Checks that `written` (read back from storage) is the same document as `source`: replica
/// reservations and owners, epoch, head and text.
///
/// # Errors
/// Naming the first difference.
pub fn verify(
    name: &str,
    source: StoredDoc,
    written: StoredDoc,
    config: &RoomConfig,
) -> anyhow::Result<()> {
    if reserved(&source) != reserved(&written) {
        bail!("document {name:?}: replica reservations differ after writing");
    }
    if owners(&source) != owners(&written) {
        bail!("document {name:?}: replica owners differ after writing");
    }
    let source = replay(name, source, config, "source")?;
    let written = replay(name, written, config, "copy")?;
    if source.epoch() != written.epoch() {
        bail!("document {name:?}: epoch differs after writing");
    }
    if source.head() != written.head() {
        bail!(
            "document {name:?}: head {} in the source, {} once written",
            source.head(),
            written.head()
        );
    }
    if source.text() != written.text() {
        bail!("document {name:?}: the written text differs from the source's");
    }
    Ok(())
}

/// Highest replica reservation a stored document holds.
pub fn reserved(stored: &StoredDoc) -> u64 {
    let in_snapshot = stored.snapshot.as_ref().map_or(0, |s| s.replicas_reserved);
    stored
        .tail
        .iter()
        .filter_map(|r| match r {
            LogRecord::ReplicasReserved { last } => Some(*last),
            LogRecord::Ops { .. } | LogRecord::ReplicaOwner { .. } | LogRecord::Accepted { .. } => {
                None
            }
        })
        .fold(in_snapshot, u64::max)
}

/// Which user owns each replica of a stored document (access control's replica binding), from
/// its snapshot and its log tail.
pub fn owners(stored: &StoredDoc) -> BTreeMap<u64, String> {
    let mut owners: BTreeMap<u64, String> = stored
        .snapshot
        .iter()
        .flat_map(|s| s.owners.iter().cloned())
        .collect();
    for record in &stored.tail {
        if let LogRecord::ReplicaOwner { replica, user } = record {
            owners.entry(*replica).or_insert_with(|| user.clone());
        }
    }
    owners
}
