//! The few file operations [`DiskStorage`](super::DiskStorage) uses, behind the [`Fs`] trait,
//! so tests can inject disk errors deterministically with [`FaultyFs`].
//!
//! [`OsFs`] is the production implementation: plain `std::fs` calls, statically dispatched.
//! Nothing here buffers, retries or decides policy; callers own error handling.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::Path;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

/// File operations used by the disk storage. Paths are absolute or relative to the process.
pub trait Fs: Send + Sync + 'static {
    /// An open log segment.
    type File: Send;

    /// Opens `path` for appending, creating it when absent.
    ///
    /// # Errors
    /// The operating system's error.
    fn open_append(&self, path: &Path) -> io::Result<Self::File>;
    /// Writes all of `bytes` at the end of `file`.
    ///
    /// # Errors
    /// The operating system's error; part of `bytes` may have been written.
    fn append(&self, file: &mut Self::File, bytes: &[u8]) -> io::Result<()>;
    /// Makes `file`'s data and length durable (fdatasync).
    ///
    /// # Errors
    /// The operating system's error; what was written since the last sync is then in doubt.
    fn sync(&self, file: &mut Self::File) -> io::Result<()>;
    /// Cuts `file` to `len` bytes.
    ///
    /// # Errors
    /// The operating system's error.
    fn truncate(&self, file: &mut Self::File, len: u64) -> io::Result<()>;
    /// Creates or replaces `path` with `bytes`, fsyncing it when `fsync`.
    ///
    /// # Errors
    /// The operating system's error.
    fn write_file(&self, path: &Path, bytes: &[u8], fsync: bool) -> io::Result<()>;
    /// Reads the whole of `path`; `Ok(None)` when it does not exist.
    ///
    /// # Errors
    /// The operating system's error.
    fn read_file(&self, path: &Path) -> io::Result<Option<Vec<u8>>>;
    /// Renames `from` to `to`, replacing `to`.
    ///
    /// # Errors
    /// The operating system's error.
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()>;
    /// Deletes `path`; a missing file is not an error.
    ///
    /// # Errors
    /// The operating system's error.
    fn remove_file(&self, path: &Path) -> io::Result<()>;
    /// Creates `path` and its parents; existing ones are fine.
    ///
    /// # Errors
    /// The operating system's error.
    fn create_dir_all(&self, path: &Path) -> io::Result<()>;
    /// Makes the entries of directory `path` durable (fsync on the directory).
    ///
    /// # Errors
    /// The operating system's error.
    fn sync_dir(&self, path: &Path) -> io::Result<()>;
    /// Names of the entries of directory `path`; `Ok(None)` when it does not exist.
    ///
    /// # Errors
    /// The operating system's error.
    fn list_dir(&self, path: &Path) -> io::Result<Option<Vec<String>>>;

    /// Removes the empty directory `path`.
    fn remove_dir(&self, path: &Path) -> io::Result<()> {
        std::fs::remove_dir(path)
    }
    /// Makes the data of the file at `path` durable (fdatasync through a fresh handle); a
    /// missing file is not an error (compaction removed it). The provided version does it
    /// with `std::fs`.
    ///
    /// # Errors
    /// The operating system's error.
    fn sync_path(&self, path: &Path) -> io::Result<()> {
        match none_if_missing(File::open(path))? {
            Some(file) => file.sync_data(),
            None => Ok(()),
        }
    }
    /// Makes everything written to the file system holding `path` durable, with one
    /// `syncfs` (one device flush instead of one per file). The provided version calls
    /// `libc::syncfs`.
    ///
    /// # Errors
    /// The operating system's error (Linux reports write-back errors since 5.8).
    fn sync_fs(&self, path: &Path) -> io::Result<()> {
        use std::os::fd::AsRawFd;
        let dir = File::open(path)?;
        // SAFETY: a valid open descriptor for the duration of the call.
        if unsafe { libc::syncfs(dir.as_raw_fd()) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

/// The real file system.
#[derive(Clone, Copy, Debug, Default)]
pub struct OsFs;

fn none_if_missing<T>(result: io::Result<T>) -> io::Result<Option<T>> {
    match result {
        Ok(value) => Ok(Some(value)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

impl Fs for OsFs {
    type File = File;

    fn open_append(&self, path: &Path) -> io::Result<File> {
        OpenOptions::new().append(true).create(true).open(path)
    }

    fn append(&self, file: &mut File, bytes: &[u8]) -> io::Result<()> {
        file.write_all(bytes)
    }

    fn sync(&self, file: &mut File) -> io::Result<()> {
        file.sync_data()
    }

    fn truncate(&self, file: &mut File, len: u64) -> io::Result<()> {
        file.set_len(len)
    }

    fn write_file(&self, path: &Path, bytes: &[u8], fsync: bool) -> io::Result<()> {
        let mut file = File::create(path)?;
        file.write_all(bytes)?;
        if fsync {
            file.sync_all()?;
        }
        Ok(())
    }

    fn read_file(&self, path: &Path) -> io::Result<Option<Vec<u8>>> {
        let Some(mut file) = none_if_missing(File::open(path))? else {
            return Ok(None);
        };
        let mut data = Vec::new();
        file.read_to_end(&mut data)?;
        Ok(Some(data))
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        std::fs::rename(from, to)
    }

    fn remove_file(&self, path: &Path) -> io::Result<()> {
        none_if_missing(std::fs::remove_file(path)).map(|_| ())
    }

    fn create_dir_all(&self, path: &Path) -> io::Result<()> {
        std::fs::create_dir_all(path)
    }

    fn sync_dir(&self, path: &Path) -> io::Result<()> {
        File::open(path)?.sync_all()
    }

    fn list_dir(&self, path: &Path) -> io::Result<Option<Vec<String>>> {
        let Some(entries) = none_if_missing(std::fs::read_dir(path))? else {
            return Ok(None);
        };
        let mut names = Vec::new();
        for entry in entries {
            // Names that are not UTF-8 were not written by us; skip them.
            if let Ok(name) = entry?.file_name().into_string() {
                names.push(name);
            }
        }
        Ok(Some(names))
    }
}

/// Failures a [`FaultyFs`] can inject, each for a number of calls.
#[derive(Debug, Default)]
struct Faults {
    writes: AtomicU32,
    syncs: AtomicU32,
}

/// FOR TESTS: the real file system (or another [`Fs`], such as the simulator's in-memory
/// disk), except that the next `n` appends/whole-file writes fail with ENOSPC (after writing
/// half their bytes) or the next `n` fsyncs fail with EIO, on command. Clones share their
/// fault switches, so a test keeps one to steer a storage it handed another to.
#[derive(Clone, Debug, Default)]
pub struct FaultyFs<F: Fs = OsFs> {
    faults: Arc<Faults>,
    inner: F,
}

impl FaultyFs {
    /// The real file system with no fault armed.
    pub fn new() -> FaultyFs {
        FaultyFs::default()
    }
}

impl<F: Fs> FaultyFs<F> {
    /// `inner` with no fault armed.
    pub fn over(inner: F) -> FaultyFs<F> {
        FaultyFs {
            faults: Arc::default(),
            inner,
        }
    }

    /// The file system under the faults.
    pub fn inner(&self) -> &F {
        &self.inner
    }

    /// The next `n` data writes fail with ENOSPC after writing half of their bytes.
    pub fn fail_writes(&self, n: u32) {
        self.faults.writes.store(n, Ordering::SeqCst);
    }

    /// The next `n` fsyncs (files or directories) fail with EIO.
    pub fn fail_syncs(&self, n: u32) {
        self.faults.syncs.store(n, Ordering::SeqCst);
    }

    fn take(counter: &AtomicU32) -> bool {
        counter
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
    }

    fn write_fault(&self) -> bool {
        Self::take(&self.faults.writes)
    }

    fn sync_fault(&self) -> io::Result<()> {
        if Self::take(&self.faults.syncs) {
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        Ok(())
    }
}

fn enospc() -> io::Error {
    io::Error::from_raw_os_error(libc::ENOSPC)
}

impl<F: Fs> Fs for FaultyFs<F> {
    type File = F::File;

    fn open_append(&self, path: &Path) -> io::Result<F::File> {
        self.inner.open_append(path)
    }

    fn append(&self, file: &mut F::File, bytes: &[u8]) -> io::Result<()> {
        if self.write_fault() {
            self.inner.append(file, &bytes[..bytes.len() / 2])?;
            return Err(enospc());
        }
        self.inner.append(file, bytes)
    }

    fn sync(&self, file: &mut F::File) -> io::Result<()> {
        self.sync_fault()?;
        self.inner.sync(file)
    }

    fn truncate(&self, file: &mut F::File, len: u64) -> io::Result<()> {
        self.inner.truncate(file, len)
    }

    fn write_file(&self, path: &Path, bytes: &[u8], fsync: bool) -> io::Result<()> {
        if self.write_fault() {
            self.inner
                .write_file(path, &bytes[..bytes.len() / 2], false)?;
            return Err(enospc());
        }
        if fsync {
            self.sync_fault()?;
        }
        self.inner.write_file(path, bytes, fsync)
    }

    fn read_file(&self, path: &Path) -> io::Result<Option<Vec<u8>>> {
        self.inner.read_file(path)
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        self.inner.rename(from, to)
    }

    fn remove_file(&self, path: &Path) -> io::Result<()> {
        self.inner.remove_file(path)
    }

    fn create_dir_all(&self, path: &Path) -> io::Result<()> {
        self.inner.create_dir_all(path)
    }

    fn sync_dir(&self, path: &Path) -> io::Result<()> {
        self.sync_fault()?;
        self.inner.sync_dir(path)
    }

    fn list_dir(&self, path: &Path) -> io::Result<Option<Vec<String>>> {
        self.inner.list_dir(path)
    }

    fn sync_path(&self, path: &Path) -> io::Result<()> {
        self.sync_fault()?;
        self.inner.sync_path(path)
    }

    fn sync_fs(&self, path: &Path) -> io::Result<()> {
        self.sync_fault()?;
        self.inner.sync_fs(path)
    }
}
