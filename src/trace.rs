//! Real editing traces: the JSON format of the `editing-traces` collection (`tests/data/*.json.gz`),
//! read once here for the load generator, the tests and the benchmarks.
//!
//! A trace is the text before and after plus transactions of patches `[pos, delete, insert]`,
//! positions in code points, each against the result of the patches before it. This module only
//! reads files; it never touches a document.

use std::io::Read;
use std::path::{Path, PathBuf};

/// One patch: delete `delete` code points at `pos`, then insert `insert` there.
#[derive(Clone, Debug, PartialEq, Eq, serde::Deserialize)]
#[serde(from = "(usize, usize, String)")]
pub struct Patch {
    /// Position in code points, in the text as the previous patches left it.
    pub pos: usize,
    /// Code points deleted at `pos`.
    pub delete: usize,
    /// Text inserted at `pos` after the deletion.
    pub insert: String,
}

impl From<(usize, usize, String)> for Patch {
    fn from((pos, delete, insert): (usize, usize, String)) -> Patch {
        Patch {
            pos,
            delete,
            insert,
        }
    }
}

/// A whole trace, its transactions flattened into patches in order.
#[derive(Clone, Debug)]
pub struct EditingTrace {
    /// The text before the first patch.
    pub start_content: String,
    /// The text after the last patch.
    pub end_content: String,
    /// Every patch, in order.
    pub patches: Vec<Patch>,
}

/// Why a trace could not be read.
#[derive(Debug, thiserror::Error)]
#[error("{path}: {reason}")]
pub struct TraceError {
    /// The file.
    pub path: PathBuf,
    /// What was wrong with it.
    pub reason: String,
}

#[derive(serde::Deserialize)]
struct TraceFile {
    #[serde(rename = "startContent", default)]
    start_content: String,
    #[serde(rename = "endContent")]
    end_content: String,
    #[serde(default)]
    txns: Vec<Txn>,
}

#[derive(serde::Deserialize)]
struct Txn {
    patches: Vec<Patch>,
}

/// Only the final text, for callers that need nothing else (the patches are skipped unparsed).
#[derive(serde::Deserialize)]
struct EndOnly {
    #[serde(rename = "endContent")]
    end_content: String,
}

impl EditingTrace {
    /// Reads a trace from `path`: gzipped when its name ends in `.gz`, else plain JSON.
    ///
    /// # Errors
    /// The file is missing or unreadable, not gzip when named `.gz`, or not a trace.
    pub fn read(path: &Path) -> Result<EditingTrace, TraceError> {
        let file: TraceFile = parse(path)?;
        Ok(EditingTrace {
            start_content: file.start_content,
            end_content: file.end_content,
            patches: file.txns.into_iter().flat_map(|t| t.patches).collect(),
        })
    }

    /// Reads only the final text of the trace at `path` (as [`EditingTrace::read`]).
    ///
    /// # Errors
    /// As [`EditingTrace::read`].
    pub fn read_end_content(path: &Path) -> Result<String, TraceError> {
        Ok(parse::<EndOnly>(path)?.end_content)
    }

    /// Reads `tests/data/<name>.json.gz` of this source tree (for tests and benchmarks).
    ///
    /// # Errors
    /// As [`EditingTrace::read`].
    pub fn bundled(name: &str) -> Result<EditingTrace, TraceError> {
        EditingTrace::read(&bundled_path(name))
    }
}

/// The path of the bundled trace `name` (`tests/data/<name>.json.gz`).
pub fn bundled_path(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data")
        .join(format!("{name}.json.gz"))
}

fn parse<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, TraceError> {
    let err = |reason: String| TraceError {
        path: path.to_owned(),
        reason,
    };
    let file = std::fs::File::open(path).map_err(|e| err(e.to_string()))?;
    let mut text = String::new();
    let reader = std::io::BufReader::new(file);
    if path.extension().is_some_and(|ext| ext == "gz") {
        flate2::read::GzDecoder::new(reader)
            .read_to_string(&mut text)
            .map_err(|e| err(format!("gunzip: {e}")))?;
    } else {
        let mut reader = reader;
        reader
            .read_to_string(&mut text)
            .map_err(|e| err(e.to_string()))?;
    }
    serde_json::from_str(&text).map_err(|e| err(format!("not a trace: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bundled_trace_replays_to_its_end_content() {
        let trace = EditingTrace::bundled("seph-blog1").expect("bundled trace");
        let mut text: Vec<char> = trace.start_content.chars().collect();
        for p in &trace.patches {
            text.splice(p.pos..p.pos + p.delete, p.insert.chars());
        }
        assert_eq!(text.into_iter().collect::<String>(), trace.end_content);
        assert_eq!(
            EditingTrace::read_end_content(&bundled_path("seph-blog1")).expect("end"),
            trace.end_content
        );
    }

    #[test]
    fn bad_files_are_errors_naming_the_file() {
        let dir = std::env::temp_dir().join(format!("collab-trace-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let missing = dir.join("missing.json");
        let e = EditingTrace::read(&missing).expect_err("missing");
        assert!(e.to_string().contains("missing.json"), "{e}");
        let not_gz = dir.join("plain.json.gz");
        std::fs::write(&not_gz, b"{}").expect("write");
        assert!(EditingTrace::read(&not_gz)
            .expect_err("not gzip")
            .reason
            .starts_with("gunzip"));
        let not_trace = dir.join("other.json");
        std::fs::write(&not_trace, br#"{"txns":[{"patches":[[1,"x"]]}]}"#).expect("write");
        assert!(EditingTrace::read(&not_trace)
            .expect_err("not a trace")
            .reason
            .starts_with("not a trace"));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
