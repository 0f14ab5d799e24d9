//! [`SimDisk`]: an in-memory file system for the real `DiskStorage` (through
//! [`crate::storage::fs::FaultyFs`]) that models what a power cut keeps.
//!
//! Each file has its current bytes and its durable bytes (as of its last fsync); each
//! directory's entries are durable as of its last fsync (`sync_dir`), and `sync_fs` makes
//! everything durable. [`SimDisk::power_cut`] reverts the namespace to its durable entries and
//! every file to its durable bytes, keeping a random prefix of bytes appended since (a torn
//! write, as a disk that wrote some sectors of an unsynced append may). A crash without a power
//! cut ([`SimDisk::restart`] alone) keeps everything, as the page cache does for `kill -9`.
//! Either way the old process's handles stop working (every call fails with EIO), so the
//! storage of a crashed shard can be dropped without touching the next one's files.

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::storage::fs::Fs;

use super::rng::SimRng;

/// One file's bytes.
#[derive(Debug, Default)]
struct Node {
    data: Vec<u8>,
    /// What a power cut keeps (plus, at most, a prefix of what was appended since).
    durable: Vec<u8>,
}

type NodeRef = Arc<Mutex<Node>>;

#[derive(Debug)]
struct State {
    /// Bumped by every restart: handles of an older one fail.
    incarnation: u64,
    /// Directories (durable once created: `create_dir_all` is followed by a sync of the
    /// parent in the storage, and the model keeps directories simple).
    dirs: BTreeSet<PathBuf>,
    /// The namespace as it is.
    files: BTreeMap<PathBuf, NodeRef>,
    /// The namespace as a power cut would leave it.
    durable_files: BTreeMap<PathBuf, NodeRef>,
    rng: SimRng,
    /// fsyncs (files, directories, file systems) so far.
    n_syncs: u64,
    /// Calls left before the process dies in the middle of its work ([`SimDisk::die_after`]).
    calls_left: Option<u64>,
    /// The process died that way (cleared by the next restart).
    died: bool,
}

/// A handle on the simulated disk for one process incarnation (cheap to clone).
#[derive(Clone, Debug)]
pub struct SimDisk {
    state: Arc<Mutex<State>>,
    incarnation: u64,
}

/// An open file of a [`SimDisk`].
#[derive(Debug)]
pub struct SimFile {
    node: NodeRef,
    incarnation: u64,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn eio() -> io::Error {
    io::Error::from_raw_os_error(libc::EIO)
}

impl SimDisk {
    /// An empty disk; `seed` decides what torn writes keep.
    pub fn new(seed: u64) -> SimDisk {
        SimDisk {
            state: Arc::new(Mutex::new(State {
                incarnation: 0,
                dirs: BTreeSet::new(),
                files: BTreeMap::new(),
                durable_files: BTreeMap::new(),
                rng: SimRng::new(seed),
                n_syncs: 0,
                calls_left: None,
                died: false,
            })),
            incarnation: 0,
        }
    }

    /// The process died (`kill -9`): unsynced data stays (it is in the page cache), and a new
    /// handle serves the next process.
    pub fn restart(&self) -> SimDisk {
        let mut state = lock(&self.state);
        state.incarnation += 1;
        state.calls_left = None;
        state.died = false;
        SimDisk {
            state: self.state.clone(),
            incarnation: state.incarnation,
        }
    }

    /// The machine lost power: only what was made durable survives (see the module docs);
    /// returns the handle for the next process.
    pub fn power_cut(&self) -> SimDisk {
        {
            let mut state = lock(&self.state);
            let files = state.after_power_cut();
            state.durable_files = files.clone();
            state.files = files;
        }
        self.restart()
    }

    /// A separate disk holding what a power cut would leave now (this one is untouched), with
    /// every path under `from` moved under `to`: the simulator opens a storage on it, in
    /// another directory, to check what is durable at any moment.
    pub fn durable_copy(&self, from: &Path, to: &Path) -> SimDisk {
        let mut state = lock(&self.state);
        let rebase = |path: &Path| match path.strip_prefix(from) {
            Ok(rest) => to.join(rest),
            Err(_) => path.to_path_buf(),
        };
        let files: BTreeMap<PathBuf, NodeRef> = state
            .after_power_cut()
            .into_iter()
            .map(|(path, node)| (rebase(&path), node))
            .collect();
        let mut dirs: BTreeSet<PathBuf> = state.dirs.iter().map(|d| rebase(d)).collect();
        for dir in to.ancestors() {
            dirs.insert(dir.to_path_buf());
        }
        let seed = state.rng.next_u64();
        SimDisk {
            state: Arc::new(Mutex::new(State {
                incarnation: 0,
                dirs,
                durable_files: files.clone(),
                files,
                rng: SimRng::new(seed),
                n_syncs: 0,
                calls_left: None,
                died: false,
            })),
            incarnation: 0,
        }
    }

    /// fsyncs so far (for the simulator's report).
    pub fn n_syncs(&self) -> u64 {
        lock(&self.state).n_syncs
    }

    /// The process dies after `n_calls` more file system calls (the one that would be the
    /// next fails, and every later one): a crash in the middle of a sync or a checkpoint. The
    /// caller then restarts the disk, with or without a power cut.
    pub fn die_after(&self, n_calls: u64) {
        lock(&self.state).calls_left = Some(n_calls);
    }

    /// Whether the process died through [`SimDisk::die_after`].
    pub fn died(&self) -> bool {
        lock(&self.state).died
    }

    fn state(&self) -> io::Result<MutexGuard<'_, State>> {
        let mut state = lock(&self.state);
        if state.incarnation != self.incarnation {
            return Err(eio());
        }
        if let Some(left) = state.calls_left {
            if left == 0 {
                state.calls_left = None;
                state.died = true;
                state.incarnation += 1;
                return Err(eio());
            }
            state.calls_left = Some(left - 1);
        }
        Ok(state)
    }

    fn check(&self, file: &SimFile) -> io::Result<()> {
        if file.incarnation != self.incarnation || self.state()?.incarnation != file.incarnation {
            return Err(eio());
        }
        Ok(())
    }
}

impl State {
    /// The namespace and the bytes a power cut leaves, as fresh nodes (see the module docs).
    fn after_power_cut(&mut self) -> BTreeMap<PathBuf, NodeRef> {
        let durable: Vec<(PathBuf, NodeRef)> = self
            .durable_files
            .iter()
            .map(|(path, node)| (path.clone(), node.clone()))
            .collect();
        let mut files = BTreeMap::new();
        for (path, node) in durable {
            let node = lock(&node);
            let mut data = node.durable.clone();
            if node.data.len() > data.len() && node.data.starts_with(&data) {
                // A torn append: some of the unsynced bytes made it.
                let extra = node.data.len() - data.len();
                let kept = self.rng.below(extra as u64 + 1) as usize;
                let kept = if self.rng.chance(500) { 0 } else { kept };
                data.extend_from_slice(&node.data[node.durable.len()..][..kept]);
            }
            let fresh = Arc::new(Mutex::new(Node {
                durable: data.clone(),
                data,
            }));
            files.insert(path, fresh);
        }
        files
    }

    /// Makes the entries of `dir` durable as they are.
    fn sync_entries(&mut self, dir: &Path) {
        self.durable_files
            .retain(|path, _| path.parent() != Some(dir));
        for (path, node) in &self.files {
            if path.parent() == Some(dir) {
                self.durable_files.insert(path.clone(), node.clone());
            }
        }
    }

    fn parent_exists(&self, path: &Path) -> io::Result<()> {
        match path.parent() {
            Some(parent) if self.dirs.contains(parent) => Ok(()),
            _ => Err(io::ErrorKind::NotFound.into()),
        }
    }
}

impl Fs for SimDisk {
    type File = SimFile;

    fn open_append(&self, path: &Path) -> io::Result<SimFile> {
        let mut state = self.state()?;
        state.parent_exists(path)?;
        let node = state.files.entry(path.to_path_buf()).or_default().clone();
        Ok(SimFile {
            node,
            incarnation: self.incarnation,
        })
    }

    fn append(&self, file: &mut SimFile, bytes: &[u8]) -> io::Result<()> {
        self.check(file)?;
        lock(&file.node).data.extend_from_slice(bytes);
        Ok(())
    }

    fn sync(&self, file: &mut SimFile) -> io::Result<()> {
        self.check(file)?;
        self.state()?.n_syncs += 1;
        let mut node = lock(&file.node);
        node.durable = node.data.clone();
        Ok(())
    }

    fn truncate(&self, file: &mut SimFile, len: u64) -> io::Result<()> {
        self.check(file)?;
        let len = usize::try_from(len).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        lock(&file.node).data.truncate(len);
        Ok(())
    }

    fn write_file(&self, path: &Path, bytes: &[u8], fsync: bool) -> io::Result<()> {
        let mut state = self.state()?;
        state.parent_exists(path)?;
        // Like File::create: the same inode, truncated and rewritten.
        let node = state.files.entry(path.to_path_buf()).or_default().clone();
        let mut node = lock(&node);
        node.data = bytes.to_vec();
        if fsync {
            state.n_syncs += 1;
            node.durable = node.data.clone();
        }
        Ok(())
    }

    fn read_file(&self, path: &Path) -> io::Result<Option<Vec<u8>>> {
        let state = self.state()?;
        Ok(state.files.get(path).map(|node| lock(node).data.clone()))
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        let mut state = self.state()?;
        state.parent_exists(to)?;
        let node = state
            .files
            .remove(from)
            .ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))?;
        state.files.insert(to.to_path_buf(), node);
        Ok(())
    }

    fn remove_file(&self, path: &Path) -> io::Result<()> {
        self.state()?.files.remove(path);
        Ok(())
    }

    fn create_dir_all(&self, path: &Path) -> io::Result<()> {
        let mut state = self.state()?;
        for dir in path.ancestors() {
            if dir.as_os_str().is_empty() {
                break;
            }
            state.dirs.insert(dir.to_path_buf());
        }
        Ok(())
    }

    fn sync_dir(&self, path: &Path) -> io::Result<()> {
        let mut state = self.state()?;
        if !state.dirs.contains(path) {
            return Err(io::ErrorKind::NotFound.into());
        }
        state.n_syncs += 1;
        state.sync_entries(path);
        Ok(())
    }

    fn list_dir(&self, path: &Path) -> io::Result<Option<Vec<String>>> {
        let state = self.state()?;
        if !state.dirs.contains(path) {
            return Ok(None);
        }
        let mut names = BTreeSet::new();
        let children = state
            .files
            .keys()
            .chain(state.dirs.iter())
            .filter(|p| p.parent() == Some(path));
        for child in children {
            if let Some(name) = child.file_name().and_then(|n| n.to_str()) {
                names.insert(name.to_owned());
            }
        }
        Ok(Some(names.into_iter().collect()))
    }

    fn sync_path(&self, path: &Path) -> io::Result<()> {
        let mut state = self.state()?;
        state.n_syncs += 1;
        if let Some(node) = state.files.get(path) {
            let mut node = lock(node);
            node.durable = node.data.clone();
        }
        Ok(())
    }

    fn sync_fs(&self, _path: &Path) -> io::Result<()> {
        let mut state = self.state()?;
        state.n_syncs += 1;
        for node in state.files.values() {
            let mut node = lock(node);
            node.durable = node.data.clone();
        }
        state.durable_files = state.files.clone();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_power_cut_keeps_what_was_synced() {
        let disk = SimDisk::new(1);
        let dir = Path::new("/d");
        disk.create_dir_all(dir).expect("mkdir");
        let mut file = disk.open_append(&dir.join("a")).expect("open");
        disk.append(&mut file, b"kept").expect("append");
        disk.sync(&mut file).expect("sync");
        disk.write_file(&dir.join("b"), b"unsynced entry", true)
            .expect("write");
        disk.sync_dir(dir).expect("sync dir");
        disk.write_file(&dir.join("c"), b"entry never synced", true)
            .expect("write");
        disk.append(&mut file, b"-lost-or-torn").expect("append");
        let after = disk.power_cut();
        assert!(disk.read_file(&dir.join("a")).is_err(), "old handles fail");
        let a = after.read_file(&dir.join("a")).expect("read").expect("a");
        assert!(a.starts_with(b"kept") && b"kept-lost-or-torn".starts_with(&a[..]));
        assert_eq!(
            after.read_file(&dir.join("b")).expect("read").as_deref(),
            Some(&b"unsynced entry"[..])
        );
        assert_eq!(after.read_file(&dir.join("c")).expect("read"), None);
        assert_eq!(
            after.list_dir(dir).expect("list"),
            Some(vec!["a".to_owned(), "b".to_owned()])
        );
    }
}
