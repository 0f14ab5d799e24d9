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
//! - [`metrics`]: per-shard counters and histograms, rendered as Prometheus text on scrape.
//! - [`auth`]: tokens (JWT), roles, keys and revocations; what a token grants, decided once.
//! - [`acceptor`]: TCP accept, plain HTTP, WebSocket handshake, handoff to shards.
//! - [`shard`]: per-core event loops owning connections and documents.
//! - [`sim`]: the deterministic simulator of a whole shard (docs/simulation.md).
//! - [`server`]: starting and stopping it all in-process.
//! - [`client`]: the Rust client (`Replica`, transport-free, and the blocking `Client`).
//! - [`crdt`], [`room`], [`protocol`]: the RGA, one document's rules, the wire format.
//! - [`loadgen`]: the `collab-load` load generator (real WebSocket clients, HDR latency reports).
#![warn(missing_docs)]

pub mod acceptor;
pub mod auth;
pub mod cli;
pub mod client;
pub mod config;
pub mod copy;
pub mod crdt;
pub mod ids;
pub mod loadgen;
pub mod metrics;
pub mod protocol;
pub mod room;
pub mod server;
pub mod shard;
pub mod sim;
pub mod storage;
pub mod units;
