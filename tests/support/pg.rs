//! The real PostgreSQL the tests use: `scripts/pg-local.sh start`, once per test binary, or
//! the server named by `COLLAB_TEST_DATABASE_URL` (scripts/test.sh starts one and shares it).
//! A test that needs it and cannot get it fails: nothing is skipped.
#![allow(dead_code)]

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;

static SERVER: OnceLock<String> = OnceLock::new();
static NEXT_DB: AtomicU32 = AtomicU32::new(0);

/// The URL of the test server's `collab` database, starting the server on first use. The
/// server is stopped by the script's watcher when this process exits.
pub fn server_url() -> &'static str {
    SERVER.get_or_init(|| {
        if let Ok(url) = std::env::var("COLLAB_TEST_DATABASE_URL") {
            if !url.is_empty() {
                return url;
            }
        }
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/pg-local.sh");
        let output = std::process::Command::new(script)
            .args(["start", "--owner-pid", &std::process::id().to_string()])
            .stderr(std::process::Stdio::inherit())
            .output()
            .unwrap_or_else(|e| panic!("running {script}: {e}"));
        assert!(
            output.status.success(),
            "{script} start failed ({}): PostgreSQL is required by this test",
            output.status
        );
        let stdout = String::from_utf8_lossy(&output.stdout);
        let url = stdout.lines().last().unwrap_or_default().trim().to_owned();
        assert!(
            url.starts_with("postgres://"),
            "{script} printed {stdout:?}"
        );
        url
    })
}

/// `url` with its database replaced by `db`.
pub fn with_database(url: &str, db: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((base, query)) => (base, Some(query)),
        None => (url, None),
    };
    let authority_end = base
        .find("://")
        .map(|i| i + 3)
        .and_then(|start| base[start..].find('/').map(|i| start + i))
        .unwrap_or(base.len());
    let mut out = format!("{}/{db}", &base[..authority_end]);
    if let Some(query) = query {
        out.push('?');
        out.push_str(query);
    }
    out
}

/// A blocking client on `url`.
pub fn client(url: &str) -> postgres::Client {
    postgres::Client::connect(url, postgres::NoTls)
        .unwrap_or_else(|e| panic!("connecting to the test database: {e}"))
}

/// A new, empty database on the test server (named after `tag`, this process and a counter),
/// and its URL.
pub fn fresh_database(tag: &str) -> String {
    let n = NEXT_DB.fetch_add(1, Ordering::Relaxed);
    let clean: String = tag
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '_'
            }
        })
        .take(30)
        .collect();
    let name = format!("t_{clean}_{}_{n}", std::process::id());
    let mut admin = client(server_url());
    // Two statements: a multi-statement string would run as one transaction, which
    // CREATE DATABASE refuses.
    for sql in [
        format!("DROP DATABASE IF EXISTS {name}"),
        format!("CREATE DATABASE {name} ENCODING 'UTF8' TEMPLATE template0"),
    ] {
        admin
            .batch_execute(&sql)
            .unwrap_or_else(|e| panic!("creating the test database {name}: {e:?}"));
    }
    with_database(server_url(), &name)
}
