//! One URL's state file, `<data-dir>/webhooks/<url hash>.jsonl`: what survives a restart.
//!
//! JSON lines: a [`StateHeader`], then one [`DocState`] per change of a document's pending
//! deliveries (the last line of a document wins; one with nothing pending forgets it).
//! Changes are appended and fsynced (`fdatasync`) once per batch, so the cost of a change does
//! not grow with the queue; when the file holds more than twice as many lines as documents
//! pending (and at least [`COMPACT_LINES_MIN`]), or after a failed write, it is rewritten
//! whole: a temporary file, fsynced, renamed over it, the folder fsynced. A torn last line
//! (a crash during an append) is skipped when the file is read; damage anywhere else stops
//! the server at startup with the file's name.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};

use super::queue::{DocState, StateHeader, STATE_VERSION};

/// Lines below which the file is never compacted.
pub const COMPACT_LINES_MIN: usize = 4096;
/// Largest state file read at start.
const STATE_BYTES_MAX: u64 = 1 << 30;

/// The state file of one URL.
pub struct StateFile {
    path: PathBuf,
    url: String,
    /// Open for appends once the file was (re)written by this process.
    append: Option<File>,
    /// Lines in the file (header excluded).
    lines: usize,
    /// Documents written by the last rewrite: the file is compacted once it holds more than
    /// twice as many lines (and at least `compact_min`).
    live_at_rewrite: usize,
    /// [`COMPACT_LINES_MIN`] (smaller in tests).
    compact_min: usize,
}

impl StateFile {
    /// The state file for `url` in `dir` (nothing is read or written yet).
    pub fn new(dir: &Path, url: &str) -> StateFile {
        StateFile {
            path: dir.join(format!("{:016x}.jsonl", fnv64(url.as_bytes()))),
            url: url.to_owned(),
            append: None,
            lines: 0,
            live_at_rewrite: 0,
            compact_min: COMPACT_LINES_MIN,
        }
    }

    /// Its path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// What a previous process left pending: the last state of each document with something
    /// pending, by name.
    ///
    /// # Errors
    /// When the file cannot be read, belongs to another URL or version, or is damaged before
    /// its last line.
    pub fn load(&self) -> anyhow::Result<Vec<DocState>> {
        let path = &self.path;
        let file = match File::open(path) {
            Ok(file) => file,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        let mut bytes = Vec::new();
        file.take(STATE_BYTES_MAX)
            .read_to_end(&mut bytes)
            .with_context(|| format!("reading {}", path.display()))?;
        let damaged = || {
            format!(
                "{} is not a webhook queue state (remove it to drop its pending deliveries)",
                path.display()
            )
        };
        let mut lines = bytes.split(|&b| b == b'\n').peekable();
        let header: StateHeader = lines
            .next()
            .and_then(|line| serde_json::from_slice(line).ok())
            .with_context(damaged)?;
        if header.version != STATE_VERSION {
            bail!(
                "{}: state version {} (this server reads {STATE_VERSION})",
                path.display(),
                header.version
            );
        }
        if header.url != self.url {
            bail!(
                "{} belongs to {:?}, not {:?} (a hash collision; move it away)",
                path.display(),
                header.url,
                self.url
            );
        }
        let mut docs: BTreeMap<String, DocState> = BTreeMap::new();
        while let Some(line) = lines.next() {
            let last = lines.peek().is_none();
            if line.is_empty() && last {
                break;
            }
            match serde_json::from_slice::<DocState>(line) {
                Ok(state) => {
                    docs.insert(state.doc.clone(), state);
                }
                Err(_) if last => {
                    log::warn!(
                        "{}: a torn last line (a crash while writing) was skipped",
                        path.display()
                    );
                }
                Err(e) => return Err(e).with_context(damaged),
            }
        }
        Ok(docs
            .into_values()
            .filter(|d| d.sealed.is_some() || !d.queued.is_empty())
            .collect())
    }

    /// Records `changes`: appended when the file is open and small enough, else the file is
    /// rewritten from `all` (every document pending, which includes the changes).
    ///
    /// # Errors
    /// When a write or fsync fails; the next call then rewrites the file whole.
    pub fn write(
        &mut self,
        changes: &[DocState],
        all: impl FnOnce() -> Vec<DocState>,
    ) -> anyhow::Result<()> {
        if changes.is_empty() && self.append.is_some() {
            return Ok(());
        }
        let compact_at = self.compact_min.max(2 * self.live_at_rewrite);
        if self.append.is_none() || self.lines + changes.len() > compact_at {
            return self.rewrite(&all());
        }
        let mut buf = Vec::new();
        for change in changes {
            serde_json::to_writer(&mut buf, change).context("encoding the webhook queue")?;
            buf.push(b'\n');
        }
        let result = self.append.as_mut().map_or(Ok(()), |file| {
            file.write_all(&buf).and_then(|()| file.sync_data())
        });
        if let Err(e) = result {
            // The file may end in a partial line now: rewrite it whole next time.
            self.append = None;
            return Err(e).with_context(|| format!("appending to {}", self.path.display()));
        }
        self.lines += changes.len();
        Ok(())
    }

    /// Replaces the file with the header and `docs`, atomically.
    fn rewrite(&mut self, docs: &[DocState]) -> anyhow::Result<()> {
        self.append = None;
        let mut buf = serde_json::to_vec(&StateHeader {
            version: STATE_VERSION,
            url: self.url.clone(),
        })
        .context("encoding the webhook queue")?;
        buf.push(b'\n');
        for doc in docs {
            serde_json::to_writer(&mut buf, doc).context("encoding the webhook queue")?;
            buf.push(b'\n');
        }
        let tmp = self.path.with_extension("jsonl.tmp");
        let mut file = File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        file.write_all(&buf)
            .and_then(|()| file.sync_all())
            .with_context(|| format!("writing {}", tmp.display()))?;
        drop(file);
        std::fs::rename(&tmp, &self.path)
            .with_context(|| format!("renaming to {}", self.path.display()))?;
        if let Some(dir) = self.path.parent() {
            File::open(dir)
                .and_then(|d| d.sync_all())
                .with_context(|| format!("syncing {}", dir.display()))?;
        }
        let append = std::fs::OpenOptions::new()
            .append(true)
            .open(&self.path)
            .with_context(|| format!("opening {}", self.path.display()))?;
        self.append = Some(append);
        self.lines = docs.len();
        self.live_at_rewrite = docs.len();
        Ok(())
    }
}

/// FNV-1a, 64 bits: the state file's name for a URL (the URL never becomes a path).
fn fnv64(bytes: &[u8]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        hash ^= u64::from(b);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    hash
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::webhooks::queue::{EventState, SealedState};

    fn doc(name: &str, head: Option<u64>) -> DocState {
        DocState {
            doc: name.to_owned(),
            sealed: head.map(|h| SealedState {
                id: format!("id-{h}"),
                event: "changed".to_owned(),
                body: format!("{{\"head\":{h}}}"),
                attempts: 1,
            }),
            queued: vec![EventState {
                event: "deleted".to_owned(),
                epoch: "e".to_owned(),
                head: None,
                time_ms: 9,
            }]
            .into_iter()
            .filter(|_| head.is_some())
            .collect(),
        }
    }

    fn temp(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("collab-hook-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("dir");
        dir
    }

    #[test]
    fn appends_replay_to_the_last_state_of_each_document() {
        let dir = temp("append");
        let mut file = StateFile::new(&dir, "http://h/");
        assert!(file.load().expect("missing is empty").is_empty());
        file.write(&[doc("a", Some(1))], || vec![doc("a", Some(1))])
            .expect("first write rewrites");
        file.write(&[doc("b", Some(2))], || unreachable!("appended"))
            .expect("append");
        file.write(&[doc("a", None), doc("c", Some(3))], || {
            unreachable!("appended")
        })
        .expect("append");
        let text = std::fs::read_to_string(file.path()).expect("read");
        assert_eq!(text.lines().count(), 5, "{text}");
        let loaded = StateFile::new(&dir, "http://h/").load().expect("load");
        assert_eq!(loaded, vec![doc("b", Some(2)), doc("c", Some(3))]);
        // A torn last line is skipped; a damaged line before it is not.
        let mut torn = text.clone();
        torn.push_str("{\"doc\":\"d\",\"sea");
        std::fs::write(file.path(), &torn).expect("write");
        assert_eq!(
            StateFile::new(&dir, "http://h/").load().expect("torn tail"),
            loaded
        );
        let damaged = text.replacen("{\"doc\":\"b\"", "{\"doc\":b", 1);
        std::fs::write(file.path(), damaged).expect("write");
        let err = StateFile::new(&dir, "http://h/")
            .load()
            .expect_err("damaged");
        assert!(
            format!("{err:#}").contains("not a webhook queue state"),
            "{err:#}"
        );
        std::fs::write(file.path(), &text).expect("restore");
        let err = StateFile::new(&dir, "http://other/");
        std::fs::rename(file.path(), err.path()).expect("as another URL's file");
        assert!(format!("{:#}", err.load().expect_err("other URL")).contains("belongs to"));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_long_file_is_compacted_to_what_is_pending() {
        let dir = temp("compact");
        let mut file = StateFile::new(&dir, "http://h/");
        let min = 64;
        file.compact_min = min;
        file.write(&[], Vec::new).expect("first write");
        let mut rewrites = 0;
        for n in 0..(3 * min) {
            let lines_before = file.lines;
            file.write(&[doc("same", Some(n as u64))], || {
                rewrites += 1;
                vec![doc("same", Some(n as u64))]
            })
            .expect("write");
            assert!(file.lines <= lines_before + 1);
        }
        assert!((1..=3).contains(&rewrites), "{rewrites} rewrites");
        let loaded = file.load().expect("load");
        assert_eq!(loaded, vec![doc("same", Some(3 * min as u64 - 1))]);
        assert!(
            std::fs::read_to_string(file.path())
                .expect("read")
                .lines()
                .count()
                <= min + 1
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
