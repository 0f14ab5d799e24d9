//! The deterministic simulator of whole shards, in the spirit of TigerBeetle's VOPR and
//! FoundationDB's simulation (docs/simulation.md).
//!
//! One seed fixes a whole run: the real shard ([`crate::shard::Shard`]'s phases, `Net`,
//! `RoomHost`, the rooms), its storage worker stepped in the same thread over the real
//! `DiskStorage` on an in-memory disk that models power cuts, and client
//! [`crate::client::Replica`]s over simulated sockets; a simulated clock; crashes, power cuts,
//! storage faults, slow and deaf clients, disconnects and garbage. The contract's guarantees
//! are checked as invariants as the run goes; a failure names its seed, and [`run_seed`] with
//! that seed replays it exactly.
//!
//! - [`rng`]: the seeded generator every random choice comes from.
//! - [`socket`]: simulated sockets and a simulated shard's readiness queue.
//! - [`disk`]: the in-memory file system with power cuts.
//! - [`db`]: a simulated database with lost commit answers and outages.
//! - `world`: one run: the scenario, the checks.
//!
//! Extension points: a [`Backend`] is the storage a shard runs over and what a crash does to
//! it ([`DiskBackend`], and [`db::DbBackend`], a simulated database with lost commits);
//! a [`Lease`] decides when the shard loses its documents (a cluster's lease expiry: the world
//! then stops the shard and starts a new one from storage).

use std::fmt;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use crate::config::FsyncMode;
use crate::storage::fs::FaultyFs;
use crate::storage::{DiskStorage, Storage};

pub mod db;
pub mod disk;
pub mod rng;
pub mod socket;
mod world;

#[cfg(test)]
pub(crate) mod harness;
#[cfg(test)]
mod tests;

pub use world::Counts;

use disk::SimDisk;
use rng::SimRng;

/// An invariant that did not hold (or a run that could not be set up).
#[derive(Clone, Debug)]
pub struct Violation {
    /// The run's seed: `SIM_SEED=<seed>` replays it.
    pub seed: u64,
    /// The step at which it was found.
    pub step: usize,
    /// What went wrong.
    pub what: String,
    /// The last events before it.
    pub trace: Vec<String>,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "seed {} failed at step {}: {}",
            self.seed, self.step, self.what
        )?;
        writeln!(f, "replay: SIM_SEED={} cargo test --test sim", self.seed)?;
        writeln!(f, "last events:")?;
        for line in &self.trace {
            writeln!(f, "  {line}")?;
        }
        Ok(())
    }
}

/// The storage a simulated shard runs over, and what a crash does to it.
pub trait Backend {
    /// The storage of a new shard process, over whatever survived the last crash.
    ///
    /// # Errors
    /// Why it does not open (a violation: the storage must always recover).
    fn open(&mut self, rng: &mut SimRng) -> Result<Box<dyn Storage>, String>;
    /// The shard process died; with `power_cut`, the machine too (unsynced writes are lost).
    /// The dying process's storage must not reach the surviving state afterwards.
    fn crash(&mut self, power_cut: bool);
    /// Arms a storage fault for the coming calls; returns what, for the trace.
    fn arm_fault(&mut self, rng: &mut SimRng) -> String;
    /// Arms a crash in the middle of the storage's work (after a few more calls); returns what,
    /// for the trace, or `None` when the backend cannot.
    fn arm_death(&mut self, _rng: &mut SimRng) -> Option<String> {
        None
    }
    /// Whether the armed crash happened: the world then crashes the shard.
    fn died(&self) -> bool {
        false
    }
    /// A storage over what would survive if the power failed now, leaving the running one
    /// untouched; `None` when the backend cannot tell.
    ///
    /// # Errors
    /// Why it does not open (a violation: the storage must always recover).
    fn durable_view(&mut self, _rng: &mut SimRng) -> Option<Result<Box<dyn Storage>, String>> {
        None
    }
}

/// The real `DiskStorage` (fsync on) over [`FaultyFs`] over a [`SimDisk`].
pub struct DiskBackend {
    disk: SimDisk,
    faults: FaultyFs<SimDisk>,
    /// A real directory for the storage's lock files (`LOCK`, and the `flock`s that tell a
    /// live journal from a dead one); everything else is on `disk`.
    dir: PathBuf,
}

impl DiskBackend {
    /// An empty disk; `seed` decides what torn writes keep.
    ///
    /// # Errors
    /// When the lock directory cannot be created.
    pub fn new(seed: u64) -> std::io::Result<DiskBackend> {
        let dir = unique_dir(&format!("collab-sim-{seed}"));
        std::fs::create_dir_all(dir.join("journal"))?;
        let disk = SimDisk::new(seed);
        Ok(DiskBackend {
            faults: FaultyFs::over(disk.clone()),
            disk,
            dir,
        })
    }
}

impl Backend for DiskBackend {
    fn open(&mut self, rng: &mut SimRng) -> Result<Box<dyn Storage>, String> {
        self.faults = FaultyFs::over(self.disk.clone());
        let mut storage = DiskStorage::with_fs(&self.dir, FsyncMode::Always, self.faults.clone())
            .map_err(|e| e.to_string())?;
        // Checkpoints by size only (small, so they happen often); never by wall time.
        storage.set_checkpoint_limits(rng.range(512, 1 << 16), Duration::from_secs(1 << 30));
        Ok(Box::new(storage))
    }

    fn crash(&mut self, power_cut: bool) {
        self.disk = if power_cut {
            self.disk.power_cut()
        } else {
            self.disk.restart()
        };
    }

    fn arm_fault(&mut self, rng: &mut SimRng) -> String {
        let n = rng.range(1, 2) as u32;
        if rng.chance(500) {
            self.faults.fail_syncs(n);
            format!("the next {n} fsyncs fail with EIO")
        } else {
            self.faults.fail_writes(n);
            format!("the next {n} writes fail with ENOSPC")
        }
    }

    fn arm_death(&mut self, rng: &mut SimRng) -> Option<String> {
        let n = rng.range(0, 30);
        self.disk.die_after(n);
        Some(format!("the process dies after {n} more file system calls"))
    }

    fn died(&self) -> bool {
        self.disk.died()
    }

    fn durable_view(&mut self, _rng: &mut SimRng) -> Option<Result<Box<dyn Storage>, String>> {
        let dir = unique_dir("collab-sim-view");
        let copy = self.disk.durable_copy(&self.dir, &dir);
        Some(open_view(copy, dir).map(|view| Box::new(view) as Box<dyn Storage>))
    }
}

/// A directory name under the system's temporary directory that no other run of this process
/// uses (two runs of one seed may run side by side).
fn unique_dir(prefix: &str) -> PathBuf {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    std::env::temp_dir().join(format!("{prefix}-{}-{n}", std::process::id()))
}

/// A storage over a [`SimDisk::durable_copy`], in its own lock directory (removed on drop).
struct DurableView {
    storage: DiskStorage<FaultyFs<SimDisk>>,
    dir: PathBuf,
}

fn open_view(disk: SimDisk, dir: PathBuf) -> Result<DurableView, String> {
    use crate::storage::fs::Fs;
    let journal = dir.join("journal");
    std::fs::create_dir_all(&journal).map_err(|e| e.to_string())?;
    // The journals' liveness locks are real files: dead ones (unlocked) for every journal
    // the copy holds, so that the view redoes them as a restart would.
    let names = disk
        .list_dir(&dir.join("journal"))
        .ok()
        .flatten()
        .unwrap_or_default();
    for name in names {
        std::fs::write(journal.join(name), b"").map_err(|e| e.to_string())?;
    }
    let storage = DiskStorage::with_fs(&dir, FsyncMode::Always, FaultyFs::over(disk));
    match storage {
        Ok(storage) => Ok(DurableView { storage, dir }),
        Err(e) => {
            let _ = std::fs::remove_dir_all(&dir);
            Err(e.to_string())
        }
    }
}

impl Drop for DurableView {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Storage for DurableView {
    fn load(
        &mut self,
        doc: &str,
    ) -> Result<Option<crate::storage::StoredDoc>, crate::storage::StorageError> {
        self.storage.load(doc)
    }
    fn append(
        &mut self,
        doc: &str,
        epoch: &str,
        record: &crate::storage::LogRecord,
    ) -> Result<(), crate::storage::StorageError> {
        self.storage.append(doc, epoch, record)
    }
    fn sync(&mut self) -> Result<(), crate::storage::StorageError> {
        self.storage.sync()
    }
    fn write_snapshot(
        &mut self,
        doc: &str,
        snapshot: &crate::storage::StoredSnapshot,
    ) -> Result<(), crate::storage::StorageError> {
        self.storage.write_snapshot(doc, snapshot)
    }
    fn release(&mut self, doc: &str) {
        self.storage.release(doc);
    }
}

impl Drop for DiskBackend {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// When the shard loses its documents to another node (a cluster's lease).
pub trait Lease {
    /// Whether the lease ran out at `now` (the node was paused or cut off past its TTL); the
    /// world then stops the shard and starts a new one from storage, as a failover would.
    fn expired(&mut self, now: Instant, rng: &mut SimRng) -> bool;
}

/// A single node: its lease never expires.
#[derive(Clone, Copy, Debug, Default)]
pub struct SingleNode;

impl Lease for SingleNode {
    fn expired(&mut self, _now: Instant, _rng: &mut SimRng) -> bool {
        false
    }
}

/// A lease lost now and then (`per_mille` per step): the stand-in for a cluster's expiry until
/// the cluster's own fencing is simulated.
#[derive(Clone, Copy, Debug)]
pub struct FlakyLease {
    /// Chance per step, per mille.
    pub per_mille: u64,
}

impl Lease for FlakyLease {
    fn expired(&mut self, _now: Instant, rng: &mut SimRng) -> bool {
        rng.chance(self.per_mille)
    }
}

/// Runs the simulation of `seed` on the disk backend, a single node.
///
/// # Errors
/// The first invariant that did not hold.
pub fn run_seed(seed: u64) -> Result<Counts, Violation> {
    let backend = DiskBackend::new(seed).map_err(|e| Violation {
        seed,
        step: 0,
        what: format!("no lock directory: {e}"),
        trace: Vec::new(),
    })?;
    run_with(seed, Box::new(backend), Box::new(SingleNode))
}

/// Runs the simulation of `seed` over the simulated database ([`db::DbBackend`]), with a
/// lease that expires now and then ([`FlakyLease`]).
///
/// # Errors
/// The first invariant that did not hold.
pub fn run_seed_on_db(seed: u64) -> Result<Counts, Violation> {
    let backend = db::DbBackend::new(seed ^ 0xdb);
    run_with(
        seed,
        Box::new(backend),
        Box::new(FlakyLease { per_mille: 3 }),
    )
}

/// Runs the simulation of `seed` over `backend` with `lease`.
///
/// # Errors
/// The first invariant that did not hold.
pub fn run_with(
    seed: u64,
    backend: Box<dyn Backend>,
    lease: Box<dyn Lease>,
) -> Result<Counts, Violation> {
    let mut world = world::World::new(seed, backend, lease)?;
    world.run()?;
    Ok(world.counts.clone())
}
