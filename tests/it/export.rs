//! `collab-engine export` and `import` with the real binary: a document edited over WebSocket
//! goes to a JSON file and back into another data directory or PostgreSQL, where a restarted
//! server serves the same text, head and epoch; a data directory a running server holds is
//! refused; a damaged file or an existing document is refused and nothing is written.

use std::path::{Path, PathBuf};
use std::process::Output;

use collab_engine::config::{Config, StorageKind};

use crate::pg;
use crate::util::{server, Editor, Watchdog};

/// The document the tests edit (a name with a slash and a non-ASCII character).
const DOC: &str = "exports/ü doc";
const DOC_PATH: &str = "/ws/exports%2F%C3%BC%20doc";

fn temp_dir(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("export-{name}"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}

/// `collab-engine <args>` with the real binary.
fn cli(args: &[&str]) -> Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_collab-engine"))
        .args(args)
        .env_remove("COLLAB_DATABASE_URL")
        .output()
        .expect("run collab-engine")
}

fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn refused(out: &Output, expected: &str) {
    assert!(!out.status.success(), "should have failed");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains(expected), "{stderr:?} lacks {expected:?}");
}

fn disk_config(data_dir: &Path) -> Config {
    let mut config = Config::for_tests("127.0.0.1:0".parse().expect("address"));
    config.storage = StorageKind::Disk;
    config.data_dir = data_dir.to_path_buf();
    // A snapshot every few ops: the export then has a snapshot and a log after it.
    config.snapshot_every_ops = 7;
    // ...taken at the head, not a retained history behind it (--history-retain-ops).
    config.history_retain_ops = 0;
    config
}

/// What two editors leave in `DOC`: (text, head, epoch).
fn edit_doc(addr: std::net::SocketAddr) -> (String, u64, String) {
    let mut a = Editor::join(addr, DOC_PATH, r#"{"type":"hello"}"#);
    let mut b = Editor::join(addr, DOC_PATH, r#"{"type":"hello"}"#);
    for i in 0..12 {
        a.edit(i, 0, "ab");
        b.edit(0, usize::from(i % 3 == 0), "é");
    }
    a.settle();
    b.settle();
    b.catch_up(a.head);
    a.catch_up(b.head);
    assert_eq!(a.doc.text(), b.doc.text());
    (a.doc.text(), a.head, a.epoch.clone())
}

/// Joins `DOC` on `addr` and returns what the server serves: (text, head, epoch).
fn served(addr: std::net::SocketAddr, path: &str) -> (String, u64, String) {
    let editor = Editor::join(addr, path, r#"{"type":"hello"}"#);
    (editor.doc.text(), editor.head, editor.epoch.clone())
}

fn read_export(path: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(path).expect("read the export")).expect("JSON")
}

#[test]
fn export_and_import_round_trip_on_disk_and_refuse_a_held_data_dir() {
    let _watchdog = Watchdog::new("export_import_disk", 120);
    let dir = temp_dir("disk");
    let data = dir.join("data");
    let data_s = data.to_str().expect("utf-8");
    let running = server(disk_config(&data));
    let (text, head, epoch) = edit_doc(running.local_addr());
    // The server holds the data directory: both commands refuse it and write nothing.
    let out_file = dir.join("doc.json");
    let out_s = out_file.to_str().expect("utf-8");
    refused(
        &cli(&["export", "--doc", DOC, "--data-dir", data_s, "--out", out_s]),
        "another collab-engine",
    );
    assert!(!out_file.exists());
    running.shutdown().expect("clean shutdown");

    ok(&cli(&[
        "export",
        "--doc",
        DOC,
        "--data-dir",
        data_s,
        "--out",
        out_s,
    ]));
    let export = read_export(&out_file);
    assert_eq!(export["format"], "collab-engine-export");
    assert_eq!(export["doc"], DOC);
    assert_eq!(export["epoch"], epoch.as_str());
    assert_eq!(export["head"], head);
    assert_eq!(export["text"], text.as_str());
    assert!(export["replicas_reserved"].as_u64() >= Some(2));
    // Snapshots are requested in order before later commits: one covers at least 7 ops.
    let snapshot_head = export["snapshot"]["head"].as_u64().expect("a snapshot");
    assert!(snapshot_head >= 7, "{}", export["snapshot"]);
    assert!(export["snapshot"]["runs"].is_array());
    let seqs: Vec<u64> = export["log"]
        .as_array()
        .expect("log")
        .iter()
        .map(|e| {
            assert!(
                e["replica"].as_u64().is_some() && e["ops"].is_array(),
                "{e}"
            );
            e["server_seq"].as_u64().expect("server_seq")
        })
        .collect();
    let after_snapshot: Vec<u64> = seqs
        .iter()
        .copied()
        .filter(|s| *s > snapshot_head)
        .collect();
    assert_eq!(
        after_snapshot,
        (snapshot_head + 1..=head).collect::<Vec<_>>()
    );
    // To standard output, the same bytes.
    let stdout = ok(&cli(&["export", "--doc", DOC, "--data-dir", data_s]));
    assert_eq!(stdout.as_bytes(), std::fs::read(&out_file).expect("read"));
    refused(
        &cli(&["export", "--doc", "nope", "--data-dir", data_s]),
        "no document \"nope\"",
    );

    // Into a new data directory, and under a new name beside the original.
    let copy = dir.join("copy");
    let copy_s = copy.to_str().expect("utf-8");
    let said = ok(&cli(&["import", "--in", out_s, "--data-dir", copy_s]));
    assert!(said.contains("imported and verified"), "{said}");
    refused(
        &cli(&["import", "--in", out_s, "--data-dir", copy_s]),
        "already exists",
    );
    ok(&cli(&[
        "import",
        "--in",
        out_s,
        "--data-dir",
        data_s,
        "--doc",
        "renamed",
    ]));

    // A damaged file is refused before anything is written.
    let mut damaged = export.clone();
    damaged["text"] = serde_json::Value::from(format!("{text}!"));
    let damaged_file = dir.join("damaged.json");
    std::fs::write(&damaged_file, damaged.to_string()).expect("write");
    let damaged_s = damaged_file.to_str().expect("utf-8");
    refused(
        &cli(&[
            "import",
            "--in",
            damaged_s,
            "--data-dir",
            copy_s,
            "--doc",
            "other",
        ]),
        "replays to head",
    );
    refused(
        &cli(&[
            "import",
            "--in",
            damaged_s,
            "--data-dir",
            copy_s,
            "--database-url",
            "x",
        ]),
        "cannot be used with",
    );

    // Servers on both directories serve the same document.
    let original = server(disk_config(&data));
    assert_eq!(
        served(original.local_addr(), DOC_PATH),
        (text.clone(), head, epoch.clone())
    );
    assert_eq!(
        served(original.local_addr(), "/ws/renamed"),
        (text.clone(), head, epoch.clone())
    );
    // Import refuses a held data directory too.
    refused(
        &cli(&[
            "import",
            "--in",
            out_s,
            "--data-dir",
            data_s,
            "--doc",
            "while-held",
        ]),
        "another collab-engine",
    );
    original.shutdown().expect("clean shutdown");
    let copied = server(disk_config(&copy));
    assert_eq!(
        served(copied.local_addr(), DOC_PATH),
        (text.clone(), head, epoch.clone())
    );
    let (_, other_head, _) = served(copied.local_addr(), "/ws/other");
    assert_eq!(other_head, 0, "the damaged import wrote nothing");
    copied.shutdown().expect("clean shutdown");
}

#[test]
fn export_and_import_round_trip_through_postgres() {
    let _watchdog = Watchdog::new("export_import_pg", 180);
    let dir = temp_dir("pg");
    let data = dir.join("data");
    let running = server(disk_config(&data));
    let (text, head, epoch) = edit_doc(running.local_addr());
    running.shutdown().expect("clean shutdown");
    let file = dir.join("doc.json");
    let file_s = file.to_str().expect("utf-8");
    ok(&cli(&[
        "export",
        "--doc",
        DOC,
        "--data-dir",
        data.to_str().expect("utf-8"),
        "--out",
        file_s,
    ]));

    let url = pg::fresh_database("export");
    ok(&cli(&["import", "--in", file_s, "--database-url", &url]));
    refused(
        &cli(&["import", "--in", file_s, "--database-url", &url]),
        "already exists in the database",
    );
    // Out of the database again: the same document.
    let again = dir.join("again.json");
    let again_s = again.to_str().expect("utf-8");
    ok(&cli(&[
        "export",
        "--doc",
        DOC,
        "--database-url",
        &url,
        "--out",
        again_s,
    ]));
    let (a, b) = (read_export(&file), read_export(&again));
    for field in [
        "doc",
        "epoch",
        "head",
        "text",
        "replicas_reserved",
        "owners",
    ] {
        assert_eq!(a[field], b[field], "{field}");
    }
    // A server on the database serves it.
    let mut config = disk_config(&dir.join("pg-local"));
    config.database_url = Some(url);
    let on_pg = server(config);
    assert_eq!(served(on_pg.local_addr(), DOC_PATH), (text, head, epoch));
    on_pg.shutdown().expect("clean shutdown");
}
