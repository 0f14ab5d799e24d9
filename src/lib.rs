//! collab-engine: a thread-per-core real-time collaboration server.
//!
//! Codemap (see `docs/ARCHITECTURE.md` for the whole picture):
//! - [`config`]: every limit and its default, parsed from the command line.
//! - [`cli`]: where a setting comes from: flag, `COLLAB_*` environment variable, `--config` file.
//! - [`units`]: the duration and size syntax of every flag.
//! - [`ids`]: newtypes for shard, connection, replica and sequence ids; doc -> shard hashing.
//! - [`storage`]: the op log and snapshots behind the `Storage` trait (disk, PostgreSQL, memory)
//!   and the storage worker that runs it off the shard thread.
//! - [`copy`]: `collab-engine copy`, documents between a data directory and PostgreSQL.
//! - [`offline`]: a stopped server's documents for the offline tools (open, write one, verify).
//! - [`export`]: `collab-engine export` and `import`, one document to and from a JSON file.
//! - [`metrics`]: per-shard counters and histograms, rendered as Prometheus text on scrape.
//! - [`auth`]: tokens (JWT), roles, keys and revocations; what a token grants, decided once.
//! - [`acceptor`]: TCP accept, plain HTTP, WebSocket handshake, handoff to shards.
//! - [`api`]: the HTTP document API's requests and answers (`docs/api.md`).
//! - [`shard`]: per-core event loops owning connections and documents.
//! - [`cluster`]: several nodes, one owner per document: routing and the relay to the owner.
//! - [`sim`]: the deterministic simulator of a whole shard (docs/simulation.md).
//! - [`server`]: starting and stopping it all in-process.
//! - [`client`]: the Rust client (`Replica`, transport-free, and the blocking `Client`).
//! - [`crdt`], [`room`], [`protocol`]: the RGA, one document's rules, the wire format.
//! - [`tls`]: the TLS client settings of outgoing connections (PostgreSQL, webhooks).
//! - [`webhooks`]: the change feed: signed `changed`/`deleted` POSTs, debounced, retried, persisted.
//! - [`loadgen`]: the `collab-load` load generator (real WebSocket clients, HDR latency reports).
//! - [`trace`]: real editing traces (`tests/data`), read for the load generator, tests and benches.
#![warn(missing_docs)]

pub mod acceptor;
pub mod api;
pub mod auth;
pub mod cli;
pub mod client;
pub mod cluster;
pub mod config;
pub mod copy;
pub mod crdt;
pub mod export;
pub mod ids;
pub mod loadgen;
pub mod metrics;
pub mod offline;
pub mod protocol;
pub mod room;
pub mod server;
pub mod shard;
pub mod sim;
pub mod storage;
pub mod tls;
pub mod trace;
pub mod units;
pub mod webhooks;
