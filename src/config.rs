//! Server configuration: every limit and its default lives here, parsed from the command line,
//! the `COLLAB_*` environment variables and the `--config` file (see `cli`).
//!
//! Each field's doc says why its default is safe; `collab-engine --help` prints them.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, ValueEnum};

use crate::units::{parse_bytes, parse_bytes_usize, parse_duration};

/// Largest message the contract lets a server refuse to go below (64 KiB).
pub const MESSAGE_BYTES_FLOOR: usize = 64 * 1024;
/// Ops per `op` message allowed by the contract.
pub const OPS_PER_MESSAGE_MAX: usize = 10_000;
/// Longest document name in bytes (contract).
pub const DOC_NAME_BYTES_MAX: usize = 512;
/// Largest presence state in bytes of compact JSON (contract).
pub const PRESENCE_BYTES_MAX: usize = 4096;
/// Default of `--docs-per-shard-max`.
pub const DOCS_PER_SHARD_MAX_DEFAULT: usize = 100_000;
/// Default of `--replay-window-shard-bytes` (8 MiB): with 100 busy documents on a shard, about
/// 80 KiB of recent echoes each, hundreds of op messages, enough for a client that reconnects
/// within seconds; one further behind gets a snapshot.
pub const REPLAY_WINDOW_SHARD_BYTES_DEFAULT: usize = 8 * 1024 * 1024;
/// Refused messages after which a connection may be closed with 1008 (contract).
pub const REFUSALS_BEFORE_CLOSE: u32 = 100;

/// When an accepted op counts as durable.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum FsyncMode {
    /// fsync the log once per shard loop turn before any echo or ack is released (the default).
    Always,
    /// Never fsync: acknowledged ops live in the OS page cache and a crash of the machine can lose them.
    /// For benchmarks only.
    Never,
}

/// Where documents are kept.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum StorageKind {
    /// Op log and snapshots in `--data-dir` (the default).
    Disk,
    /// Nothing survives a restart. For tests and benchmarks.
    Memory,
}

/// Command-line configuration of the server.
#[derive(Clone, Debug, Parser)]
#[command(
    name = "collab-engine",
    version,
    about = "Real-time collaboration server (RGA CRDT over WebSocket)",
    after_help = "Tokens: `collab-engine token --help` prints a signed access token (docs/security.md)."
)]
pub struct Config {
    /// A TOML file with any of these settings, keyed by flag name (`idle-timeout = "30s"`);
    /// flags and environment variables win over it.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// Address to listen on; port 0 picks a free port (the bound address is printed).
    #[arg(long, default_value = "127.0.0.1:8000")]
    pub listen: SocketAddr,

    /// Worker shards (threads pinned to cores); 0 means one per available core.
    #[arg(long, default_value_t = 0)]
    pub shards: usize,

    /// Folder that holds the op logs and snapshots.
    #[arg(long, default_value = "./data")]
    pub data_dir: PathBuf,

    /// Storage backend.
    #[arg(long, value_enum, default_value = "disk")]
    pub storage: StorageKind,

    /// Durability of acknowledged ops. With `--database-url`, `never` sets the sessions'
    /// `synchronous_commit` to `off`.
    #[arg(long, value_enum, default_value = "always")]
    pub fsync: FsyncMode,

    /// Keep documents in PostgreSQL instead of `--data-dir`:
    /// `postgres://USER[:PASSWORD]@HOST[:PORT]/DB` (or libpq `key=value` pairs). One connection
    /// per shard; the schema is created or upgraded at start. The URL's `sslmode` (`disable`,
    /// `prefer`, `require`) and `--database-ca-file` select TLS. `--data-dir` still holds local
    /// files.
    #[arg(long, env = "COLLAB_DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<String>,

    /// PEM file of the CA that signed the database server's certificate. With it, TLS is used
    /// (`sslmode=prefer`: when the server offers it; `require`: always) and the certificate must
    /// chain to this CA and name the URL's host. `sslmode=require` without it is refused;
    /// `prefer` without it connects unencrypted.
    #[arg(long, value_name = "PATH")]
    pub database_ca_file: Option<PathBuf>,

    /// Deadline of each database statement, COMMIT and connection attempt. A COMMIT without
    /// an answer by then is cancelled and its outcome counts as unknown (its document is
    /// reloaded before it serves again). 5 s rides out a checkpoint spike and still reports a
    /// dead database quickly.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub database_timeout: Duration,

    /// Largest reassembled WebSocket message; bigger ones are closed with 1009.
    /// The contract allows 64KiB to 1MiB.
    #[arg(long, value_name = "SIZE", default_value = "1MiB", value_parser = parse_message_bytes)]
    pub message_bytes_max: usize,

    /// Largest document in visible plus deleted characters (16Mi = 16,777,216); ops past it get
    /// `too_large`. Bounds a room's memory (about 16 bytes per character in runs of one).
    #[arg(long, value_name = "COUNT", default_value = "16Mi", value_parser = parse_bytes_usize)]
    pub doc_chars_max: usize,

    /// Bytes queued for one connection before it counts as too slow and is closed with 1013.
    /// 4MiB covers a snapshot of a large document plus a burst of echoes.
    #[arg(long, value_name = "SIZE", default_value = "4MiB", value_parser = parse_bytes_usize)]
    pub outbound_bytes_max: usize,

    /// Connections one shard serves; past it new connections get 1013.
    #[arg(long, default_value_t = 250_000)]
    pub conns_per_shard_max: usize,

    /// Time a client has to finish the HTTP request and the WebSocket handshake (and, on
    /// plain `/ws`, to send its `hello`).
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = parse_duration)]
    pub handshake_timeout: Duration,

    /// A connection silent for this long gets a ping; silent for twice as long, it is closed.
    #[arg(long, value_name = "DURATION", default_value = "60s", value_parser = parse_duration)]
    pub idle_timeout: Duration,

    /// A document with no clients leaves memory after this long, once its state is durable.
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = parse_duration)]
    pub idle_unload: Duration,

    /// Documents one shard keeps loaded. A `hello` that would load one more first unloads a
    /// document without clients; when every loaded document has clients it gets `overloaded`
    /// and a close 1013. Bounds a shard's memory together with `--doc-chars-max`.
    #[arg(long, default_value_t = DOCS_PER_SHARD_MAX_DEFAULT, value_parser = parse_at_least_one)]
    pub docs_per_shard_max: usize,

    /// A room writes a snapshot after this many accepted op messages since the last one.
    #[arg(long, default_value_t = 10_000)]
    pub snapshot_every_ops: u64,

    /// A room writes a snapshot after this many bytes of log since the last one.
    #[arg(long, value_name = "SIZE", default_value = "8MiB", value_parser = parse_bytes)]
    pub snapshot_every_bytes: u64,

    /// Op messages kept in memory per room to serve `replay` to reconnecting clients.
    #[arg(long, default_value_t = 10_000)]
    pub replay_window_ops: usize,

    /// Bytes of replay-window echoes one shard keeps in memory over all its documents. Above
    /// it, every room's window loses its oldest echoes in proportion to its size on the shard's
    /// tick, down to three quarters of this: a shard's memory stays bounded however many busy
    /// documents it has. A client whose `since` fell out of its window gets a snapshot, as the
    /// contract allows.
    #[arg(long, value_name = "SIZE", default_value = "8MiB", value_parser = parse_bytes_usize)]
    pub replay_window_shard_bytes: usize,

    /// Incoming WebSocket messages handled per connection per loop turn, so one busy
    /// client cannot starve the others.
    #[arg(long, default_value_t = 64)]
    pub reads_per_turn_max: usize,

    /// Sustained `op` and `presence` messages per second one connection may send (a token
    /// bucket refilled at this rate); an `op` message costs 1 token plus 1 per 100 ops or
    /// deleted characters. A message over the budget gets `rate_limited` and is not applied
    /// (it counts as a refusal). 0 disables the limit.
    /// Safe default: 2,000/s is 200 times what a fast typist sends (about 10 edits a second),
    /// yet it caps what one connection can make its shard integrate.
    #[arg(long, default_value_t = 2_000)]
    pub msgs_per_second_max: u32,

    /// Tokens a connection can bank for a burst (a new connection starts with all of them).
    /// 0 disables the limit. Safe default: 4,000 covers a client resending a backlog of
    /// thousands of offline edits after a reconnect, or a select-all delete of a
    /// 100,000-character document (1,001 tokens), without a refusal.
    #[arg(long, default_value_t = 4_000)]
    pub msgs_burst_max: u32,

    /// Access control: token keys, the metrics and admin surface (`src/auth/config.rs`).
    #[command(flatten)]
    pub auth: crate::auth::AuthConfig,

    /// Browser origins allowed to open WebSockets (`https://docs.example.com`: scheme, host,
    /// optional port), repeatable or comma-separated. When any is set, an upgrade whose
    /// `Origin` header is present and not listed gets HTTP 403, against cross-site WebSocket
    /// hijacking; list the server's own address too if browsers load the demo page from it.
    /// Clients that send no `Origin` (non-browsers) are unaffected. Default: every origin.
    #[arg(
        long = "allowed-origin",
        value_name = "URL",
        value_delimiter = ',',
        value_parser = parse_origin
    )]
    pub allowed_origins: Vec<String>,

    /// Connections one client address holds at once (an IPv6 address counts by its /64), from
    /// accept until the connection ends; past it new ones get HTTP 429. 0 disables the limit.
    /// Safe default: a few hundred people behind one NAT with a couple of tabs each, while one
    /// host cannot take a shard's whole connection budget.
    #[arg(long, value_name = "N", default_value_t = 1_000)]
    pub conns_per_ip_max: u32,

    /// New connections per second one client address may open, sustained (a token bucket
    /// refilled at this rate); past it they get HTTP 429. 0 disables the limit. Safe default:
    /// a reconnecting client opens one every few seconds, and 50 handshakes a second from one
    /// address cost the acceptor little.
    #[arg(long, value_name = "N", default_value_t = 50)]
    pub connects_per_ip_per_second: u32,

    /// New connections one client address may open at once before
    /// --connects-per-ip-per-second applies (the bucket's size; an address seen for the first
    /// time starts full). 0 disables the limit. Safe default: an office reconnecting after a
    /// restart gets 200 at once, then 50 a second.
    #[arg(long, value_name = "N", default_value_t = 200)]
    pub connects_per_ip_burst: u32,

    /// Do not pin each shard thread to a core (pinning is the default).
    #[arg(long)]
    pub no_pin_cores: bool,

    // Webhooks (the change feed, `src/webhooks`).
    /// The change feed: `--webhook-url`, `--webhook-secret-file` and their limits.
    #[command(flatten)]
    pub webhooks: crate::webhooks::WebhookConfig,

    // Cluster (issue 11): membership, leases and fencing over --database-url (src/cluster/).
    /// Cluster flags: `--cluster-node`, `--advertise`, `--lease-ttl`.
    #[command(flatten)]
    pub cluster: crate::cluster::ClusterConfig,

    // Cluster relay (issue 11, any-node entry: src/cluster/relay.rs, src/cluster/forwarded.rs).
    /// A file holding the secret (at least 16 bytes; surrounding whitespace is ignored) that
    /// every node of a cluster shares: a relaying node signs the client's address with it in
    /// `X-Collab-Forwarded-For`, and an owner trusts that header only with a valid signature.
    /// Without it a node neither sends nor trusts the header, so the owner counts relayed
    /// clients against the relaying node's address (docs/cluster.md).
    #[arg(long, value_name = "FILE")]
    pub cluster_secret_file: Option<PathBuf>,

    /// Connections this node relays to their documents' owners at once; past it a new one gets
    /// HTTP 503, or `unavailable` and close 1013. Safe default: each holds at most 32 KiB of
    /// relay buffers, so 8,192 hold at most 256 MiB.
    #[arg(long, value_name = "N", default_value_t = crate::cluster::relay::RELAY_CONNS_MAX_DEFAULT)]
    pub relay_conns_max: usize,

    // Document API history (docs/api.md): how far back `?at=`, `base`, `/history` and
    // `/events?since` reach.
    /// Op messages each document keeps behind its head, in its log and in memory: snapshots
    /// are written this far behind the head, so compaction keeps the log after them (and a
    /// load replays it). At most --replay-window-ops. Default 0: snapshots at the head, and
    /// history only within the in-memory replay window; a retained snapshot is rebuilt item by
    /// item from the document in memory, which a shard pays for at every snapshot of a large
    /// document (docs/api.md), so it is something to opt into.
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub history_retain_ops: u64,

    /// Also keep every op message accepted within this time of the document's newest one
    /// (`0s`: off, the default, which bounds the log by --history-retain-ops alone; a long
    /// time on a busy document keeps that many more ops, within --replay-window-ops).
    #[arg(long, value_name = "DURATION", default_value = "0s", value_parser = parse_duration)]
    pub history_retain: Duration,
}

impl Config {
    /// The configuration with every default, listening on `listen`, keeping data in memory:
    /// what tests start from.
    pub fn for_tests(listen: SocketAddr) -> Config {
        let mut config = Config::parse_from(["collab-engine"]);
        config.listen = listen;
        config.storage = StorageKind::Memory;
        config.database_url = None;
        config.database_ca_file = None;
        config.shards = 2;
        config.no_pin_cores = true;
        config
    }

    /// Shard count with 0 resolved to the number of cores.
    pub fn shard_count(&self) -> usize {
        if self.shards > 0 {
            self.shards
        } else {
            std::thread::available_parallelism().map_or(1, |n| n.get())
        }
    }
}

fn parse_message_bytes(text: &str) -> Result<usize, String> {
    let bytes = parse_bytes_usize(text)?;
    if bytes < MESSAGE_BYTES_FLOOR {
        return Err(format!(
            "must be at least {} (the contract's floor)",
            crate::units::format_bytes(MESSAGE_BYTES_FLOOR as u64)
        ));
    }
    Ok(bytes)
}

/// Checks and normalises an `--allowed-origin`: `scheme://host[:port]`, lower case, without a
/// default port (browsers omit it from `Origin`).
fn parse_origin(text: &str) -> Result<String, String> {
    crate::acceptor::door::normalize_origin(text.trim()).ok_or_else(|| {
        format!(
            "{text:?} is not an origin: write scheme://host[:port], e.g. https://docs.example.com (no path)"
        )
    })
}

fn parse_at_least_one(text: &str) -> Result<usize, String> {
    match text.parse::<usize>() {
        Ok(0) => Err("must be at least 1".to_owned()),
        Ok(n) => Ok(n),
        Err(e) => Err(format!("{e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_limit_respects_contract_floor() {
        assert!(parse_message_bytes("1000").is_err());
        assert!(parse_message_bytes("63KiB").is_err());
        assert_eq!(parse_message_bytes("65536"), Ok(65536));
        assert_eq!(parse_message_bytes("64KiB"), Ok(65536));
    }

    #[test]
    fn defaults_parse() {
        let config = Config::parse_from(["collab-engine"]);
        assert_eq!(config.listen.port(), 8000);
        assert_eq!(config.fsync, FsyncMode::Always);
        assert_eq!(config.storage, StorageKind::Disk);
        assert_eq!(config.docs_per_shard_max, DOCS_PER_SHARD_MAX_DEFAULT);
        assert_eq!(config.database_timeout, Duration::from_secs(5));
        let pg = Config::try_parse_from([
            "collab-engine",
            "--database-url",
            "postgres://u@127.0.0.1:5432/db",
            "--database-timeout",
            "250ms",
        ])
        .expect("database flags");
        assert_eq!(
            pg.database_url.as_deref(),
            Some("postgres://u@127.0.0.1:5432/db")
        );
        assert_eq!(pg.database_timeout, Duration::from_millis(250));
        assert_eq!(
            config.replay_window_shard_bytes,
            REPLAY_WINDOW_SHARD_BYTES_DEFAULT
        );
        assert!(Config::try_parse_from(["collab-engine", "--docs-per-shard-max", "0"]).is_err());
        assert_eq!(
            (config.msgs_per_second_max, config.msgs_burst_max),
            (2_000, 4_000)
        );
        assert_eq!(config.message_bytes_max, 1 << 20);
        assert_eq!(config.doc_chars_max, 16 << 20);
        assert_eq!(config.outbound_bytes_max, 4 << 20);
        assert_eq!(config.snapshot_every_bytes, 8 << 20);
        assert!(!config.no_pin_cores);
        assert!(config.allowed_origins.is_empty());
        assert_eq!(
            (
                config.conns_per_ip_max,
                config.connects_per_ip_per_second,
                config.connects_per_ip_burst
            ),
            (1_000, 50, 200)
        );
        let off = Config::try_parse_from([
            "collab-engine",
            "--msgs-per-second-max",
            "0",
            "--msgs-burst-max",
            "0",
        ])
        .expect("0 disables");
        assert_eq!((off.msgs_per_second_max, off.msgs_burst_max), (0, 0));
    }

    /// A settings file in the temporary folder, removed when dropped.
    struct TempFile(PathBuf);

    impl TempFile {
        fn new(name: &str, text: &str) -> TempFile {
            let path = std::env::temp_dir()
                .join(format!("collab-config-{}-{name}.toml", std::process::id()));
            std::fs::write(&path, text).expect("write the settings file");
            TempFile(path)
        }

        fn arg(&self) -> String {
            self.0.display().to_string()
        }
    }

    impl Drop for TempFile {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    fn parse_with(file: &TempFile, flags: &[&str]) -> Result<Config, String> {
        let path = file.arg();
        let mut args = vec!["collab-engine", "--config", path.as_str()];
        args.extend_from_slice(flags);
        crate::cli::try_parse_from::<Config, _, _>(args).map_err(|e| e.to_string())
    }

    #[test]
    fn a_config_file_sets_defaults_and_flags_win() {
        let file = TempFile::new(
            "good",
            r#"
listen = "127.0.0.1:9100"
idle-timeout = "1.5s"
idle_unload = "1h"
message-bytes-max = "64KiB"
storage = "memory"
shards = 3
allowed-origin = ["https://Docs.Example.com", "http://127.0.0.1:9100"]
no-pin-cores = true
connects-per-ip-per-second = 0
"#,
        );
        let config = parse_with(&file, &[]).expect("valid file");
        assert_eq!(config.listen.port(), 9100);
        assert_eq!(config.idle_timeout, Duration::from_millis(1500));
        assert_eq!(config.idle_unload, Duration::from_secs(3600));
        assert_eq!(config.message_bytes_max, 64 << 10);
        assert_eq!(config.storage, StorageKind::Memory);
        assert_eq!(config.shards, 3);
        assert_eq!(
            config.allowed_origins,
            ["https://docs.example.com", "http://127.0.0.1:9100"]
        );
        assert!(config.no_pin_cores);
        assert_eq!(config.connects_per_ip_per_second, 0);
        assert_eq!(
            config.conns_per_ip_max, 1_000,
            "not in the file: the default"
        );
        let config = parse_with(
            &file,
            &["--shards", "5", "--allowed-origin", "https://other.example"],
        )
        .expect("flags over the file");
        assert_eq!(config.shards, 5);
        assert_eq!(config.allowed_origins, ["https://other.example"]);
        assert_eq!(config.idle_timeout, Duration::from_millis(1500));
    }

    #[test]
    fn bad_config_files_get_errors_naming_the_setting() {
        let check = |name: &str, text: &str, expected: &[&str]| {
            let file = TempFile::new(name, text);
            let err = parse_with(&file, &[]).expect_err(name);
            for part in expected {
                assert!(err.contains(part), "{name}: {err:?} lacks {part:?}");
            }
            assert!(err.contains(&file.arg()), "{name}: {err:?} names the file");
        };
        check(
            "unknown",
            "idle-timout = \"1s\"\n",
            &["unknown setting `idle-timout`"],
        );
        check(
            "duration",
            "idle-timeout = \"30\"\n",
            &["setting `idle-timeout`", "no unit"],
        );
        check(
            "size",
            "message-bytes-max = \"1KiB\"\n",
            &["setting `message-bytes-max`", "at least 64KiB"],
        );
        check("number", "shards = \"many\"\n", &["setting `shards`"]);
        check(
            "origin",
            "allowed-origin = [\"docs.example.com\"]\n",
            &["setting `allowed-origin`", "not an origin"],
        );
        check(
            "array",
            "shards = [1, 2]\n",
            &["setting `shards`", "not an array"],
        );
        check(
            "switch",
            "no-pin-cores = \"yes\"\n",
            &["setting `no-pin-cores`", "true or false"],
        );
        check("table", "[listen]\nport = 1\n", &["setting `listen`"]);
        check(
            "twice",
            "idle-timeout = \"1s\"\nidle_timeout = \"2s\"\n",
            &["given twice"],
        );
        check("toml", "shards = \n", &["not valid TOML"]);
        check("help", "help = true\n", &["unknown setting `help`"]);
        let missing = crate::cli::try_parse_from::<Config, _, _>([
            "collab-engine",
            "--config",
            "/nonexistent/collab.toml",
        ])
        .expect_err("missing file")
        .to_string();
        assert!(
            missing.contains("cannot read --config /nonexistent/collab.toml"),
            "{missing}"
        );
    }

    #[test]
    fn every_flag_has_an_environment_variable() {
        let cmd = crate::cli::command::<Config>();
        for arg in cmd.get_arguments() {
            let Some(long) = arg.get_long() else { continue };
            if matches!(long, "help" | "version") {
                continue;
            }
            let env = arg.get_env().map(|e| e.to_string_lossy().into_owned());
            assert_eq!(env, Some(crate::cli::env_name(long)), "--{long}");
        }
        assert_eq!(crate::cli::env_name("no-pin-cores"), "COLLAB_NO_PIN_CORES");
        let load = crate::cli::command::<crate::loadgen::LoadConfig>();
        assert!(load
            .get_arguments()
            .filter(|a| !matches!(a.get_id().as_str(), "help" | "version"))
            .all(|a| a.get_env().is_some()));
    }
}
