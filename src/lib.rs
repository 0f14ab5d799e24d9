//! collab-engine: a thread-per-core real-time collaboration server.
//!
//! Codemap (see `docs/ARCHITECTURE.md` for the whole picture):
//! - [`config`]: every limit and its default, parsed from the command line.
//! - [`ids`]: newtypes for shard, connection, replica and sequence ids; doc -> shard hashing.
//! - [`storage`]: the op log and snapshots behind the `Storage` trait.
//! - [`metrics`]: per-shard counters and histograms, merged on scrape.
//! - [`acceptor`]: TCP accept, plain HTTP, WebSocket handshake, handoff to shards.
//! - [`shard`]: per-core event loops owning connections and documents.
//! - [`server`]: starting and stopping it all in-process.
//! - [`loadgen`]: the `collab-load` load generator (real WebSocket clients, HDR latency reports).
#![warn(missing_docs)]

pub mod acceptor;
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
pub mod storage;
