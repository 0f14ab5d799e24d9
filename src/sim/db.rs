//! [`DbBackend`]: a simulated database for the shard's storage, with lost commits.
//!
//! Committed state lives in a [`MemoryStorage`] shared by every process incarnation (the
//! database outlives the shard); each incarnation's connection buffers its appends until
//! `sync`, which commits them as one transaction. Faults, armed by the simulator: a commit
//! whose answer is lost (`OutcomeUnknown`; it was applied or not, by the seed), and an outage
//! (`Unavailable`, nothing committed, the next probes fail too). A crash drops what the
//! connection had not committed, and the dead incarnation's connection is refused from then on.

use std::sync::{Arc, Mutex, MutexGuard};

use crate::storage::{LogRecord, MemoryStorage, Storage, StorageError, StoredDoc, StoredSnapshot};

use super::rng::SimRng;
use super::Backend;

#[derive(Debug)]
struct Db {
    committed: MemoryStorage,
    incarnation: u64,
    /// Commits still to lose the answer of.
    lose_answers: u32,
    /// Commits still to refuse as unavailable, and probes to fail after each.
    outages: u32,
    probes_down: u32,
    rng: SimRng,
}

fn lock(db: &Mutex<Db>) -> MutexGuard<'_, Db> {
    db.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The simulated database (see the module docs).
#[derive(Debug)]
pub struct DbBackend {
    db: Arc<Mutex<Db>>,
}

impl DbBackend {
    /// An empty database; `seed` decides whether a commit whose answer was lost happened.
    pub fn new(seed: u64) -> DbBackend {
        DbBackend {
            db: Arc::new(Mutex::new(Db {
                committed: MemoryStorage::new(),
                incarnation: 0,
                lose_answers: 0,
                outages: 0,
                probes_down: 0,
                rng: SimRng::new(seed),
            })),
        }
    }
}

impl DbBackend {
    /// The next commit's answer is lost (`OutcomeUnknown`); whether it happened is the seed's.
    pub fn lose_next_answer(&self) {
        lock(&self.db).lose_answers += 1;
    }

    /// The database goes down at the next commit (`Unavailable`, nothing committed), and stays
    /// down for the next two probes.
    pub fn go_down_at_next_commit(&self) {
        lock(&self.db).outages += 1;
    }
}

impl Backend for DbBackend {
    fn open(&mut self, _rng: &mut SimRng) -> Result<Box<dyn Storage>, String> {
        let incarnation = lock(&self.db).incarnation;
        Ok(Box::new(DbConn {
            db: self.db.clone(),
            incarnation,
            pending: Vec::new(),
        }))
    }

    fn crash(&mut self, _power_cut: bool) {
        let mut db = lock(&self.db);
        db.incarnation += 1;
        db.lose_answers = 0;
        db.outages = 0;
        db.probes_down = 0;
    }

    fn arm_fault(&mut self, rng: &mut SimRng) -> String {
        if rng.chance(500) {
            self.lose_next_answer();
            "the next commit's answer is lost".into()
        } else {
            self.go_down_at_next_commit();
            "the database is down for the next commit".into()
        }
    }
}

/// One shard process's connection to the database.
struct DbConn {
    db: Arc<Mutex<Db>>,
    incarnation: u64,
    /// Appended, not committed: `(doc, epoch, record)`.
    pending: Vec<(String, String, LogRecord)>,
}

fn unavailable(reason: &str) -> StorageError {
    StorageError::Unavailable {
        reason: reason.to_owned(),
    }
}

impl DbConn {
    fn db(&self) -> Result<MutexGuard<'_, Db>, StorageError> {
        let db = lock(&self.db);
        if db.incarnation != self.incarnation {
            return Err(unavailable("this process is gone"));
        }
        Ok(db)
    }
}

impl Storage for DbConn {
    fn load(&mut self, doc: &str) -> Result<Option<StoredDoc>, StorageError> {
        let mut db = self.db()?;
        if db.probes_down > 0 {
            return Err(unavailable("the database is down"));
        }
        db.committed.load(doc)
    }

    fn append(&mut self, doc: &str, epoch: &str, record: &LogRecord) -> Result<(), StorageError> {
        self.pending
            .push((doc.to_owned(), epoch.to_owned(), record.clone()));
        Ok(())
    }

    fn sync(&mut self) -> Result<(), StorageError> {
        let pending = std::mem::take(&mut self.pending);
        let mut db = self.db()?;
        if db.probes_down > 0 {
            return Err(unavailable("the database is down"));
        }
        if db.outages > 0 {
            db.outages -= 1;
            db.probes_down = 2;
            return Err(unavailable("the database went down"));
        }
        let lost = db.lose_answers > 0;
        let applied = !lost || db.rng.chance(500);
        if lost {
            db.lose_answers -= 1;
        }
        if applied {
            for (doc, epoch, record) in &pending {
                db.committed.append(doc, epoch, record)?;
            }
        }
        if lost {
            return Err(StorageError::OutcomeUnknown {
                reason: format!(
                    "the commit's answer was lost (it was {}applied)",
                    if applied { "" } else { "not " }
                ),
            });
        }
        Ok(())
    }

    fn write_snapshot(&mut self, doc: &str, snapshot: &StoredSnapshot) -> Result<(), StorageError> {
        let mut db = self.db()?;
        if db.probes_down > 0 {
            return Err(unavailable("the database is down"));
        }
        db.committed.write_snapshot(doc, snapshot)
    }

    fn release(&mut self, _doc: &str) {}

    fn probe(&mut self) -> Result<(), StorageError> {
        let mut db = self.db()?;
        if db.probes_down > 0 {
            db.probes_down -= 1;
            return Err(unavailable("the database is still down"));
        }
        Ok(())
    }
}
