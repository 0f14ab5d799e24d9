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

const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/pg-local.sh");

/// A PostgreSQL of the test's own (it is stopped, restarted, paused), stopped when dropped
/// (and by the script's watcher if this process dies first).
pub struct OwnServer {
    /// The cluster's directory.
    pub dir: std::path::PathBuf,
    /// URL of its `collab` database.
    pub url: String,
}

impl OwnServer {
    /// Starts one in a new directory named after `name`, under the system temp directory
    /// (the server's unprivileged owner must reach it, which a checkout under /root is not).
    pub fn start(name: &str) -> OwnServer {
        OwnServer::start_with(name, &[])
    }

    /// Like [`OwnServer::start`], with TLS on (`pg-local.sh start --tls`): the CA that signed
    /// its certificate is [`OwnServer::ca_file`].
    pub fn start_tls(name: &str) -> OwnServer {
        OwnServer::start_with(name, &["--tls"])
    }

    /// The CA certificate of a server started with [`OwnServer::start_tls`].
    pub fn ca_file(&self) -> std::path::PathBuf {
        self.dir.join("ca.pem")
    }

    fn start_with(name: &str, extra: &[&str]) -> OwnServer {
        let dir = std::env::temp_dir().join(format!("collab-pg-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let output = std::process::Command::new(SCRIPT)
            .args(["start", "--dir"])
            .arg(&dir)
            .args(["--owner-pid", &std::process::id().to_string()])
            .args(extra)
            .stderr(std::process::Stdio::inherit())
            .output()
            .unwrap_or_else(|e| panic!("running {SCRIPT}: {e}"));
        assert!(output.status.success(), "{SCRIPT} start failed");
        let url = String::from_utf8_lossy(&output.stdout)
            .lines()
            .last()
            .unwrap_or_default()
            .to_owned();
        assert!(url.starts_with("postgres://"), "{url:?}");
        OwnServer { dir, url }
    }

    /// `pg_ctl ARGS` on this cluster, as its owner (`restart -m immediate`, `stop`, `start`).
    pub fn ctl(&self, args: &[&str]) {
        let status = std::process::Command::new(SCRIPT)
            .arg("ctl")
            .arg(&self.dir)
            .args(args)
            .status()
            .unwrap_or_else(|e| panic!("running {SCRIPT}: {e}"));
        assert!(status.success(), "pg_ctl {args:?} failed");
    }

    /// The postmaster and every process it started (the whole server), by pid.
    pub fn pids(&self) -> Vec<i32> {
        let pid_file = self.dir.join("data/postmaster.pid");
        let text = std::fs::read_to_string(&pid_file)
            .unwrap_or_else(|e| panic!("reading {}: {e}", pid_file.display()));
        let postmaster: i32 = text
            .lines()
            .next()
            .and_then(|l| l.trim().parse().ok())
            .expect("postmaster pid");
        let mut pids = vec![postmaster];
        for entry in std::fs::read_dir("/proc").expect("/proc").flatten() {
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
                continue;
            };
            let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
                continue;
            };
            // Field 4, after the parenthesised command name (which may contain spaces).
            let ppid = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().nth(1))
                .and_then(|p| p.parse::<i32>().ok());
            if ppid == Some(postmaster) {
                pids.push(pid);
            }
        }
        pids
    }

    /// Freezes the whole server (SIGSTOP to the postmaster and its children) for `pause`,
    /// then lets it go on.
    pub fn pause(&self, pause: std::time::Duration) {
        let pids = self.pids();
        for pid in &pids {
            signal(*pid, "-STOP");
        }
        std::thread::sleep(pause);
        for pid in &pids {
            signal(*pid, "-CONT");
        }
    }

    /// `pg_terminate_backend` on every collab-engine session.
    pub fn terminate_sessions(&self) -> usize {
        let mut admin = client(&self.url);
        admin
            .query(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
                 WHERE application_name = 'collab-engine'",
                &[],
            )
            .expect("terminate")
            .len()
    }
}

impl Drop for OwnServer {
    fn drop(&mut self) {
        let _ = std::process::Command::new(SCRIPT)
            .arg("stop")
            .arg(&self.dir)
            .status();
    }
}

/// `kill SIG PID`.
pub fn signal(pid: i32, sig: &str) {
    let status = std::process::Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .expect("kill");
    assert!(status.success(), "kill {sig} {pid}");
}
