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

use crate::offline::{default_room_config, verify, write_doc, Store};

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
    let room_config = default_room_config();
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
