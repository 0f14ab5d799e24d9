//! Integration tests: real servers on 127.0.0.1:0, real WebSocket clients, a watchdog per test.

mod api;
mod auth;
mod binary;
mod client;
mod cluster;
mod contract;
mod door;
mod echo;
mod export;
mod hostile;
mod http;
mod interop;
mod metrics;
#[path = "../support/pg.rs"]
mod pg;
mod pipeline;
mod rate;
mod relay;
mod relay_contract;
mod storage_failure;
mod util;
#[path = "../support/watchdog.rs"]
mod watchdog;
mod webhooks;
mod ws;

/// What `contract.rs` tests against here: one node.
use util::server as contract_server;
