//! Integration tests: real servers on 127.0.0.1:0, real WebSocket clients, a watchdog per test.

mod api;
mod auth;
mod binary;
mod client;
mod contract;
mod door;
mod echo;
mod hostile;
mod http;
mod interop;
mod metrics;
#[path = "../support/pg.rs"]
mod pg;
mod pipeline;
mod rate;
mod storage_failure;
mod util;
mod ws;
