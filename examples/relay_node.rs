//! A cluster entry node that relays every document to one owner: what the relay-hop benchmark
//! runs (docs/benchmarks.md, "The relay hop"), with `collab-load` pointed at it instead of at the
//! owner.
//!
//! Usage: `cargo run --release --example relay_node -- LISTEN OWNER` (both `HOST:PORT`).
//! It keeps no documents itself (memory storage, never used) and stops on Ctrl-C or SIGTERM.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use collab_engine::cluster::{Route, Router};
use collab_engine::config::Config;
use collab_engine::server::{start_routed, RouterOptions};

/// Routes every document to one owner.
struct ToOwner(SocketAddr);

impl Router for ToOwner {
    fn route(&self, _doc: &str) -> Route {
        Route::Relay(self.0)
    }

    fn set_waker(&self, _waker: Arc<mio::Waker>) {}
}

fn main() -> anyhow::Result<()> {
    env_logger::init();
    let args: Vec<String> = std::env::args().collect();
    let [_, listen, owner] = args.as_slice() else {
        anyhow::bail!("usage: relay_node LISTEN OWNER");
    };
    let owner: SocketAddr = owner.parse().context("OWNER must be HOST:PORT")?;
    let config = Config::parse_from([
        "collab-engine",
        "--listen",
        listen,
        "--storage",
        "memory",
        "--no-pin-cores",
    ]);
    let router = RouterOptions {
        router: Arc::new(ToOwner(owner)),
        route_wait: Duration::from_secs(1),
    };
    let server = start_routed(config, Some(router))?;
    println!(
        "listening on http://{} (relaying to {owner})",
        server.local_addr()
    );
    let mut signals = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGTERM,
    ])?;
    let _ = signals.forever().next();
    server.shutdown()
}
