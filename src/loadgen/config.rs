//! The load generator's command line: the workload, the target and where reports go.
//!
//! Owns flag parsing and validation only; it never opens a socket.

use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, ValueEnum};

use crate::units::parse_duration;

/// How a writer spaces its edits.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ArrivalKind {
    /// Exactly one edit every `--edit-interval`.
    Fixed,
    /// Exponentially distributed gaps with mean `--edit-interval` (a Poisson process).
    Poisson,
}

/// Command-line configuration of `collab-load`.
#[derive(Clone, Debug, Parser)]
#[command(
    // A later flag overrides an earlier one, so scripts can append to common defaults.
    args_override_self = true,
    name = "collab-load",
    version,
    about = "Drives many real WebSocket clients against collab-engine and reports end-to-end latency percentiles"
)]
pub struct LoadConfig {
    /// A TOML file with any of these settings, keyed by flag name (`rooms = 100`); flags and
    /// environment variables win over it.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// Server base URL; client i of room r connects to `<url>/ws/<doc-prefix>-<r>`.
    #[arg(long, default_value = "ws://127.0.0.1:8000")]
    pub url: String,

    /// Documents (rooms) to load.
    #[arg(long, default_value_t = 1)]
    pub rooms: usize,

    /// Clients joined to each room.
    #[arg(long, default_value_t = 2)]
    pub clients_per_room: usize,

    /// Clients per room that edit; the rest only read. Default: every client.
    #[arg(long)]
    pub writers_per_room: Option<usize>,

    /// Mean time between two edits of one writer (`20ms`, `1s`, ...).
    #[arg(long, value_name = "DURATION", default_value = "100ms", value_parser = parse_duration)]
    pub edit_interval: Duration,

    /// Spacing of a writer's edits.
    #[arg(long, value_enum, default_value = "fixed")]
    pub arrivals: ArrivalKind,

    /// Characters inserted (or deleted) by one edit.
    #[arg(long, default_value_t = 1)]
    pub edit_size: usize,

    /// Share of edits that delete `--edit-size` characters instead of inserting (0-100).
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u8).range(0..=100))]
    pub delete_percent: u8,

    /// Editing time before measuring starts (not recorded).
    #[arg(long, value_name = "DURATION", default_value = "2s", value_parser = parse_duration)]
    pub warmup: Duration,

    /// Measured editing time.
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = parse_duration)]
    pub duration: Duration,

    /// A trace `.json.gz` (or `.json`) whose `endContent` is inserted into every room, in one op,
    /// before the other clients join.
    #[arg(long)]
    pub preload: Option<PathBuf>,

    /// Source addresses to spread connections over (`127.0.0.2,127.0.0.3`): each gives about
    /// 28k ephemeral ports towards one server address.
    #[arg(long, value_delimiter = ',')]
    pub bind: Vec<IpAddr>,

    /// Event-loop threads; 0 means one per core.
    #[arg(long, default_value_t = 0)]
    pub threads: usize,

    /// Process id of the server, to report its CPU seconds and RSS from /proc.
    #[arg(long)]
    pub server_pid: Option<u32>,

    /// Folder for summary.json, *.hgrm, latency.svg and the server's /metrics text.
    #[arg(long)]
    pub out: Option<PathBuf>,

    /// Document name prefix.
    #[arg(long, default_value = "load")]
    pub doc_prefix: String,

    /// Connections per thread allowed between TCP connect and hello_ack at once (keeps the
    /// server's accept queue from overflowing, which would cost a 1 s SYN retransmit).
    #[arg(long, default_value_t = 256)]
    pub connect_concurrency: usize,

    /// Give up waiting for every client to join after this long.
    #[arg(long, value_name = "DURATION", default_value = "60s", value_parser = parse_duration)]
    pub join_timeout: Duration,

    /// After the measured time, wait this long at most for in-flight edits to arrive everywhere.
    #[arg(long, value_name = "DURATION", default_value = "5s", value_parser = parse_duration)]
    pub drain_timeout: Duration,

    /// Seed of the edit positions, texts and Poisson gaps.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,

    /// Name of this run in reports.
    #[arg(long, default_value = "run")]
    pub label: String,

    /// Skip the end-of-run convergence check (which copies every client's text).
    #[arg(long)]
    pub no_check: bool,

    /// Token every client sends as `hello.token` (servers with access control).
    #[arg(long, conflicts_with_all = ["token_file", "mint_key_file"])]
    pub token: Option<String>,

    /// File holding the token every client sends (trailing whitespace ignored).
    #[arg(long, conflicts_with = "mint_key_file")]
    pub token_file: Option<PathBuf>,

    /// Mint one token per client from this key file (an HS256 secret or an Ed25519 private
    /// key in PEM): `sub` `load-<client>`, `doc` its document, role `write`, 1 h. Measures
    /// what verification costs the server per connection.
    #[arg(long)]
    pub mint_key_file: Option<PathBuf>,
}

/// Where clients' tokens come from.
#[derive(Clone, Debug)]
pub enum ClientTokens {
    /// No token.
    None,
    /// The same token for every client.
    Fixed(String),
    /// One minted per client.
    Mint(std::sync::Arc<crate::auth::mint::MintKey>),
}

impl ClientTokens {
    /// The token of client `global_idx` on `doc`.
    pub fn for_client(&self, global_idx: usize, doc: &str) -> Option<String> {
        match self {
            ClientTokens::None => None,
            ClientTokens::Fixed(token) => Some(token.clone()),
            ClientTokens::Mint(key) => {
                let claims = crate::auth::mint::MintClaims::new(
                    &format!("load-{global_idx}"),
                    doc,
                    crate::auth::Role::Write,
                    crate::auth::now_unix(),
                    3600,
                );
                key.sign(&claims, None).ok()
            }
        }
    }
}

/// Where and how to reach the server, resolved from `--url`.
#[derive(Clone, Debug)]
pub struct Target {
    /// The server's socket address.
    pub addr: SocketAddr,
    /// `ws://host:port` plus any path prefix, without a trailing slash.
    pub base_url: String,
}

impl LoadConfig {
    /// The clients' tokens, from `--token`, `--token-file` or `--mint-key-file`.
    ///
    /// # Errors
    /// When the file cannot be read or holds no usable key.
    pub fn client_tokens(&self) -> Result<ClientTokens, String> {
        if let Some(token) = &self.token {
            return Ok(ClientTokens::Fixed(token.clone()));
        }
        if let Some(path) = &self.token_file {
            let text = std::fs::read_to_string(path)
                .map_err(|e| format!("--token-file {}: {e}", path.display()))?;
            return Ok(ClientTokens::Fixed(text.trim().to_owned()));
        }
        if let Some(path) = &self.mint_key_file {
            let key = crate::auth::mint::MintKey::from_file(path)
                .map_err(|e| format!("--mint-key-file: {e}"))?;
            return Ok(ClientTokens::Mint(std::sync::Arc::new(key)));
        }
        Ok(ClientTokens::None)
    }

    /// Writers per room with the default applied.
    pub fn writers(&self) -> usize {
        self.writers_per_room
            .unwrap_or(self.clients_per_room)
            .min(self.clients_per_room)
    }

    /// Thread count with 0 resolved to the number of cores.
    pub fn thread_count(&self) -> usize {
        let n = if self.threads > 0 {
            self.threads
        } else {
            std::thread::available_parallelism().map_or(1, |n| n.get())
        };
        n.min(self.total_clients().max(1))
    }

    /// Total connections the run opens.
    pub fn total_clients(&self) -> usize {
        self.rooms * self.clients_per_room
    }

    /// Checks the flags against each other.
    ///
    /// # Errors
    /// A message naming the flag that is out of range.
    pub fn validate(&self) -> Result<(), String> {
        if self.rooms == 0 || self.clients_per_room == 0 {
            return Err("--rooms and --clients-per-room must be at least 1".into());
        }
        if self.edit_size == 0 {
            return Err("--edit-size must be at least 1".into());
        }
        if self.edit_interval.is_zero() {
            return Err("--edit-interval must be above 0".into());
        }
        if self.connect_concurrency == 0 {
            return Err("--connect-concurrency must be at least 1".into());
        }
        if self.bind.iter().any(|ip| !ip.is_ipv4()) {
            return Err("--bind takes IPv4 addresses".into());
        }
        Ok(())
    }

    /// Resolves `--url` to an address.
    ///
    /// # Errors
    /// When the URL is not `ws://host:port[/prefix]` or the host does not resolve.
    pub fn target(&self) -> Result<Target, String> {
        let rest = self
            .url
            .strip_prefix("ws://")
            .ok_or_else(|| format!("--url must start with ws://: {}", self.url))?;
        let (authority, path) = match rest.find('/') {
            Some(i) => rest.split_at(i),
            None => (rest, ""),
        };
        let authority_with_port = if authority.contains(':') {
            authority.to_owned()
        } else {
            format!("{authority}:80")
        };
        let addr = authority_with_port
            .to_socket_addrs()
            .map_err(|e| format!("cannot resolve {authority}: {e}"))?
            .next()
            .ok_or_else(|| format!("{authority} resolves to nothing"))?;
        let base_url = format!("ws://{authority}{}", path.trim_end_matches('/'));
        Ok(Target { addr, base_url })
    }

    /// The name of room `room_idx`'s document.
    pub fn doc_name(&self, room_idx: usize) -> String {
        format!("{}-{room_idx}", self.doc_prefix)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_take_the_shared_syntax() {
        let config =
            LoadConfig::parse_from(["collab-load", "--edit-interval", "1.5s", "--warmup", "1h"]);
        assert_eq!(config.edit_interval, Duration::from_millis(1500));
        assert_eq!(config.warmup, Duration::from_secs(3600));
        let err =
            LoadConfig::try_parse_from(["collab-load", "--duration", "3"]).expect_err("no unit");
        assert!(err.to_string().contains("3s"), "{err}");
    }

    #[test]
    fn url_resolves_to_addr_and_base() {
        let config = LoadConfig::parse_from(["collab-load", "--url", "ws://127.0.0.1:9001/"]);
        let target = config.target().expect("valid url");
        assert_eq!(target.addr, "127.0.0.1:9001".parse().expect("addr"));
        assert_eq!(target.base_url, "ws://127.0.0.1:9001");
        let bad = LoadConfig::parse_from(["collab-load", "--url", "http://127.0.0.1:1"]);
        assert!(bad.target().is_err());
    }

    #[test]
    fn writers_default_to_every_client() {
        let config = LoadConfig::parse_from(["collab-load", "--clients-per-room", "5"]);
        assert_eq!(config.writers(), 5);
        let config = LoadConfig::parse_from([
            "collab-load",
            "--clients-per-room",
            "5",
            "--writers-per-room",
            "9",
        ]);
        assert_eq!(config.writers(), 5);
    }
}
