//! Server configuration: every limit and its default lives here, parsed from the command line.
//!
//! Each field's doc says why its default is safe; `collab-engine --help` prints them.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, ValueEnum};

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
    about = "Real-time collaboration server (RGA CRDT over WebSocket)"
)]
pub struct Config {
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
    /// per shard; the schema is created or upgraded at start. No TLS: use a local socket
    /// (`host=/run/postgresql`) or a trusted network. `--data-dir` still holds local files.
    #[arg(long, env = "COLLAB_DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<String>,

    /// Deadline of each database statement, COMMIT and connection attempt. A COMMIT without
    /// an answer by then is cancelled and its outcome counts as unknown (its document is
    /// reloaded before it serves again). 5 s rides out a checkpoint spike and still reports a
    /// dead database quickly.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub database_timeout: Duration,

    /// Largest reassembled WebSocket message in bytes; bigger ones are closed with 1009.
    /// The contract allows 64 KiB to 1 MiB.
    #[arg(long, default_value_t = 1024 * 1024, value_parser = parse_message_bytes)]
    pub message_bytes_max: usize,

    /// Largest document in visible plus deleted characters; ops past it get `too_large`.
    /// Bounds a room's memory (about 16 bytes per character in runs of one).
    #[arg(long, default_value_t = 16 * 1024 * 1024)]
    pub doc_chars_max: usize,

    /// Bytes queued for one connection before it counts as too slow and is closed with 1013.
    /// 4 MiB covers a snapshot of a large document plus a burst of echoes.
    #[arg(long, default_value_t = 4 * 1024 * 1024)]
    pub outbound_bytes_max: usize,

    /// Connections one shard serves; past it new connections get 1013.
    #[arg(long, default_value_t = 250_000)]
    pub conns_per_shard_max: usize,

    /// Time a client has to finish the HTTP request and the WebSocket handshake (and, on
    /// plain `/ws`, to send its `hello`).
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub handshake_timeout: Duration,

    /// A connection silent for this long gets a ping; silent for twice as long, it is closed.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    pub idle_timeout: Duration,

    /// A document with no clients leaves memory after this long, once its state is durable.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
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
    #[arg(long, default_value_t = 8 * 1024 * 1024)]
    pub snapshot_every_bytes: u64,

    /// Op messages kept in memory per room to serve `replay` to reconnecting clients.
    #[arg(long, default_value_t = 10_000)]
    pub replay_window_ops: usize,

    /// Incoming WebSocket messages handled per connection per loop turn, so one busy
    /// client cannot starve the others.
    #[arg(long, default_value_t = 64)]
    pub reads_per_turn_max: usize,

    /// Sustained `op` and `presence` messages per second one connection may send (a token
    /// bucket refilled at this rate); an `op` message costs 1 token plus 1 per 100 ops or
    /// deleted items (`shard::rate_limit::op_message_cost`). A message over the budget gets
    /// `rate_limited` and is not applied (it counts as a refusal). 0 disables the limit.
    /// Safe default: 2,000/s is 200 times what a fast typist sends (the s2 load scenario sends
    /// 10 edits/s per client), yet it caps what one connection can make its shard integrate.
    #[arg(long, default_value_t = 2_000)]
    pub msgs_per_second_max: u32,

    /// Tokens a connection can bank for a burst (a new connection starts with all of them).
    /// 0 disables the limit. Safe default: 4,000 covers a client resending a backlog of
    /// thousands of offline edits after a reconnect, or a select-all delete of a
    /// 100,000-character document (1,001 tokens), without a refusal.
    #[arg(long, default_value_t = 4_000)]
    pub msgs_burst_max: u32,

    /// Shared secret clients must send as `hello.token`; none means no authentication.
    #[arg(long)]
    pub token: Option<String>,

    /// Pin each shard thread to a core.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub pin_cores: bool,
}

impl Config {
    /// The configuration with every default, listening on `listen`, keeping data in memory:
    /// what tests start from.
    pub fn for_tests(listen: SocketAddr) -> Config {
        let mut config = Config::parse_from(["collab-engine"]);
        config.listen = listen;
        config.storage = StorageKind::Memory;
        config.database_url = None;
        config.shards = 2;
        config.pin_cores = false;
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
    let bytes: usize = text.parse().map_err(|e| format!("{e}"))?;
    if bytes < MESSAGE_BYTES_FLOOR {
        return Err(format!(
            "must be at least {MESSAGE_BYTES_FLOOR} (the contract's floor)"
        ));
    }
    Ok(bytes)
}

fn parse_at_least_one(text: &str) -> Result<usize, String> {
    match text.parse::<usize>() {
        Ok(0) => Err("must be at least 1".to_owned()),
        Ok(n) => Ok(n),
        Err(e) => Err(format!("{e}")),
    }
}

/// Parses `250ms`, `10s`, `5m` or a bare number of seconds.
///
/// # Errors
/// A message naming the text when it is not such a duration.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let (number, unit) = match text.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => text.split_at(i),
        None => (text, "s"),
    };
    let n: u64 = number
        .parse()
        .map_err(|_| format!("not a duration: {text:?}"))?;
    match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "s" => Ok(Duration::from_secs(n)),
        "m" => Ok(Duration::from_secs(n * 60)),
        _ => Err(format!("unknown unit in {text:?}: use ms, s or m")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("7"), Ok(Duration::from_secs(7)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert!(parse_duration("2h").is_err());
    }

    #[test]
    fn message_limit_respects_contract_floor() {
        assert!(parse_message_bytes("1000").is_err());
        assert_eq!(parse_message_bytes("65536"), Ok(65536));
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
        assert!(Config::try_parse_from(["collab-engine", "--docs-per-shard-max", "0"]).is_err());
        assert_eq!(
            (config.msgs_per_second_max, config.msgs_burst_max),
            (2_000, 4_000)
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
}
