//! [`MemoryStorage`]: keeps everything in memory; for tests and `--storage memory`.

use std::collections::HashMap;

use super::{LogRecord, Storage, StorageError, StoredDoc, StoredSnapshot};

/// A [`Storage`] that keeps documents in a map; nothing survives the process.
#[derive(Debug, Default)]
pub struct MemoryStorage {
    docs: HashMap<String, StoredDoc>,
}

impl MemoryStorage {
    /// An empty store.
    pub fn new() -> MemoryStorage {
        MemoryStorage::default()
    }
}

impl Storage for MemoryStorage {
    fn delete(&mut self, doc: &str) -> Result<bool, StorageError> {
        Ok(self.docs.remove(doc).is_some())
    }

    fn list_names(
        &mut self,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
        keep: &dyn Fn(&str) -> bool,
    ) -> Result<(Vec<String>, bool), StorageError> {
        let mut names: Vec<String> = self.docs.keys().cloned().collect();
        names.sort();
        Ok(super::page_of_names(names, prefix, after, limit, keep))
    }

    fn load(&mut self, doc: &str) -> Result<Option<StoredDoc>, StorageError> {
        Ok(self.docs.get(doc).cloned())
    }

    fn append(&mut self, doc: &str, epoch: &str, record: &LogRecord) -> Result<(), StorageError> {
        let stored = self
            .docs
            .entry(doc.to_owned())
            .or_insert_with(|| StoredDoc {
                epoch: epoch.to_owned(),
                snapshot: None,
                tail: Vec::new(),
            });
        stored.tail.push(record.clone());
        Ok(())
    }

    fn sync(&mut self) -> Result<(), StorageError> {
        Ok(())
    }

    fn write_snapshot(&mut self, doc: &str, snapshot: &StoredSnapshot) -> Result<(), StorageError> {
        let stored = self
            .docs
            .entry(doc.to_owned())
            .or_insert_with(|| StoredDoc {
                epoch: snapshot.epoch.clone(),
                snapshot: None,
                tail: Vec::new(),
            });
        let head = snapshot.head;
        stored.tail.retain(|record| match record {
            LogRecord::Ops { server_seq, .. } | LogRecord::Accepted { server_seq, .. } => {
                *server_seq > head
            }
            LogRecord::ReplicasReserved { last } => *last > snapshot.replicas_reserved,
            LogRecord::ReplicaOwner { replica, .. } => {
                !snapshot.owners.iter().any(|(owned, _)| owned == replica)
            }
        });
        stored.snapshot = Some(snapshot.clone());
        Ok(())
    }

    fn release(&mut self, _doc: &str) {}
}
