//! PostgreSQL backend figures for `docs/benchmarks.md` (section `## Storage: PostgreSQL`):
//! group-commit latency (one `PgStorage::sync` = one autocommit statement = one COMMIT) for 1,
//! 10 and 100 documents per commit, beside DiskStorage's `--fsync always` sync on the same
//! machine in the same run; bytes per op in the database; recovery of 1,000 documents /
//! 1,000,000 ops.
//!
//! Run: `cargo bench --bench storage_pg` (starts a private PostgreSQL with
//! `scripts/pg-local.sh`, or uses `$COLLAB_BENCH_DATABASE_URL`, whose database must be empty or
//! hold only earlier runs of this bench). `quick`: fewer commits and a 100,000-op recovery.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use collab_engine::config::FsyncMode;
use collab_engine::storage::{DiskStorage, LogRecord, PgOptions, PgStorage, Storage};
use hdrhistogram::Histogram;
use tungstenite::Utf8Bytes;

/// Runs of each group-commit row.
const RUNS: usize = 3;

fn main() {
    let quick = std::env::args().any(|a| a == "quick");
    let (url, _server) = database();
    let disk_root = std::env::var_os("STORAGE_BENCH_DIR")
        .map_or_else(|| PathBuf::from("target/bench-storage-pg"), PathBuf::from);
    let _ = std::fs::remove_dir_all(&disk_root);
    std::fs::create_dir_all(&disk_root).expect("bench dir");
    reset(&url);

    println!("\n## group commit: one sync per turn, one ~150-byte op per touched document");
    println!("| backend | docs per commit | commits per run | runs | sync p50 us (min-max over runs) | sync p99 us (min-max) | ops/s (min-max) |");
    println!("|---|---|---|---|---|---|---|");
    let commits = if quick { 300 } else { 2_000 };
    for docs in [1usize, 10, 100] {
        let n = if docs == 100 { commits / 4 } else { commits };
        let mut pg_runs = Vec::new();
        let mut disk_runs = Vec::new();
        for run in 0..RUNS {
            let mut pg = open_pg(&url);
            pg_runs.push(group_commit(&mut pg, &format!("pg-{docs}-{run}"), docs, n));
            let dir = disk_root.join(format!("disk-{docs}-{run}"));
            let mut disk = DiskStorage::open(&dir, FsyncMode::Always).expect("disk");
            disk_runs.push(group_commit(&mut disk, "disk", docs, n));
        }
        row("PostgreSQL synchronous_commit=on", docs, n, &pg_runs);
        row("disk --fsync always", docs, n, &disk_runs);
    }

    recovery(&url, if quick { 100 } else { 1_000 });
    let _ = std::fs::remove_dir_all(&disk_root);
}

/// `(p50 us, p99 us, ops/s)` of `n` commits of one op to each of `docs` documents.
fn group_commit(storage: &mut dyn Storage, tag: &str, docs: usize, n: usize) -> (u64, u64, u64) {
    let names: Vec<String> = (0..docs).map(|i| format!("{tag}-doc-{i}")).collect();
    let mut hist = Histogram::<u64>::new(3).expect("histogram");
    // The first commit creates the documents; it is not measured.
    for name in &names {
        storage
            .append(name, "EPOCH", &LogRecord::ReplicasReserved { last: 16 })
            .expect("append");
    }
    storage.sync().expect("sync");
    let started = Instant::now();
    for seq in 1..=n as u64 {
        for name in &names {
            storage
                .append(
                    name,
                    "EPOCH",
                    &LogRecord::Ops {
                        server_seq: seq,
                        echo: echo(seq, 1, seq),
                    },
                )
                .expect("append");
        }
        let t = Instant::now();
        storage.sync().expect("sync");
        let _ = hist.record(t.elapsed().as_micros() as u64);
    }
    let elapsed = started.elapsed().as_secs_f64();
    (
        hist.value_at_quantile(0.5),
        hist.value_at_quantile(0.99),
        ((n * docs) as f64 / elapsed) as u64,
    )
}

fn row(backend: &str, docs: usize, n: usize, runs: &[(u64, u64, u64)]) {
    let span = |f: fn(&(u64, u64, u64)) -> u64| {
        let values: Vec<u64> = runs.iter().map(f).collect();
        let mut sorted = values.clone();
        sorted.sort_unstable();
        format!(
            "{} ({}-{})",
            sorted[sorted.len() / 2],
            sorted[0],
            sorted[sorted.len() - 1]
        )
    };
    println!(
        "| {backend} | {docs} | {n} | {} | {} | {} | {} |",
        runs.len(),
        span(|r| r.0),
        span(|r| r.1),
        span(|r| r.2)
    );
}

/// Writes `docs` documents of 1,000 ops each in big commits, then loads every one with a
/// fresh storage; prints bytes per op.
fn recovery(url: &str, docs: usize) {
    let ops_per_doc = 1_000u64;
    let mut storage = open_pg(url);
    let names: Vec<String> = (0..docs).map(|i| format!("recovery-doc-{i}")).collect();
    let started = Instant::now();
    for chunk in names.chunks(50) {
        for seq in 1..=ops_per_doc {
            for name in chunk {
                storage
                    .append(
                        name,
                        "EPOCH",
                        &LogRecord::Ops {
                            server_seq: seq,
                            echo: echo(seq, 1, seq),
                        },
                    )
                    .expect("append");
            }
            if seq % 100 == 0 {
                storage.sync().expect("sync");
            }
        }
        storage.sync().expect("sync");
    }
    let write_s = started.elapsed().as_secs_f64();
    drop(storage);
    let mut client = postgres::Client::connect(url, postgres::NoTls).expect("client");
    client
        .batch_execute("VACUUM ANALYZE collab_ops")
        .expect("vacuum");
    let row = client
        .query_one(
            "SELECT count(*), pg_total_relation_size('collab_ops'), pg_relation_size('collab_ops'), \
             sum(octet_length(echo))::bigint FROM collab_ops WHERE doc_id IN \
             (SELECT id FROM collab_docs WHERE name LIKE 'recovery-doc-%'::bytea)",
            &[],
        )
        .expect("sizes");
    let (rows, total, heap, echo_bytes): (i64, i64, i64, i64) =
        (row.get(0), row.get(1), row.get(2), row.get(3));
    let started = Instant::now();
    let mut storage = open_pg(url);
    let mut loaded_ops = 0;
    for name in &names {
        let doc = storage.load(name).expect("load").expect("stored");
        loaded_ops += doc.tail.len();
        storage.release(name);
    }
    let load_s = started.elapsed().as_secs_f64();
    assert_eq!(loaded_ops as u64, docs as u64 * ops_per_doc);
    println!("\n## recovery and bytes per op (PostgreSQL)");
    println!("| docs | ops | write s (commits of 50 docs x 100 ops) | load all s (fresh PgStorage) | echo bytes per op | table+index bytes per op (all rows) | heap bytes per op |");
    println!("|---|---|---|---|---|---|---|");
    let all_rows: i64 = client
        .query_one("SELECT count(*) FROM collab_ops", &[])
        .expect("count")
        .get(0);
    println!(
        "| {docs} | {} | {write_s:.1} | {load_s:.1} | {:.0} | {:.0} | {:.0} |",
        rows,
        echo_bytes as f64 / rows as f64,
        total as f64 / all_rows as f64,
        heap as f64 / all_rows as f64
    );
}

/// An op_echo of one typed character, shaped like the server's.
fn echo(seq: u64, replica: u64, lamport: u64) -> Utf8Bytes {
    let after = if lamport <= 1 {
        "null".to_owned()
    } else {
        format!("[{},{replica}]", lamport - 1)
    };
    Utf8Bytes::from(format!(
        r#"{{"type":"op_echo","server_seq":{seq},"replica":{replica},"client_seq":{seq},"ops":[{{"kind":"ins","id":[{lamport},{replica}],"after":{after},"text":"a"}}]}}"#
    ))
}

fn open_pg(url: &str) -> PgStorage {
    PgStorage::open(&PgOptions {
        url: url.to_owned(),
        timeout: Duration::from_secs(30),
        synchronous_commit: true,
        ca_file: None,
    })
    .expect("PgStorage")
}

/// Empties the bench's tables (a database reused from an earlier run).
fn reset(url: &str) {
    drop(open_pg(url));
    let mut client = postgres::Client::connect(url, postgres::NoTls).expect("client");
    client
        .batch_execute("TRUNCATE collab_ops, collab_docs")
        .expect("truncate");
}

/// Stops the private server when the bench ends.
struct Server(Option<String>);

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(dir) = self.0.take() {
            let _ = std::process::Command::new(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/scripts/pg-local.sh"
            ))
            .args(["stop", &dir])
            .status();
        }
    }
}

/// The database to measure: `$COLLAB_BENCH_DATABASE_URL`, or a private server.
fn database() -> (String, Server) {
    if let Ok(url) = std::env::var("COLLAB_BENCH_DATABASE_URL") {
        return (url, Server(None));
    }
    let dir = std::env::temp_dir().join(format!("collab-bench-pg-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let output =
        std::process::Command::new(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/pg-local.sh"))
            .args(["start", "--dir"])
            .arg(&dir)
            .args(["--owner-pid", &std::process::id().to_string()])
            .stderr(std::process::Stdio::inherit())
            .output()
            .expect("pg-local.sh");
    assert!(output.status.success(), "pg-local.sh start failed");
    let url = String::from_utf8_lossy(&output.stdout)
        .lines()
        .last()
        .unwrap_or_default()
        .to_owned();
    println!("PostgreSQL: {url} (data in {})", dir.display());
    (url, Server(Some(dir.display().to_string())))
}
