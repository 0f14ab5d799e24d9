//! An echo server on the real acceptor and shard connection layer: every text or binary
//! message comes back on the same connection, in order.
//!
//! Exercises the transport alone (read budget, queued writes, WRITABLE on `WouldBlock`,
//! partial writes with `--small-sndbuf`), without documents or storage.
//!
//! `cargo run --release --example echo_server -- --listen 127.0.0.1:9000 --small-sndbuf`

use std::io::Write;

use clap::Parser;
use collab_engine::acceptor::PlainWs;
use collab_engine::config::Config;
use collab_engine::ids::ConnToken;
use collab_engine::server::start_with;
use collab_engine::shard::{Handler, Net, OpenInfo};
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::Signals;
use tungstenite::Message;

/// Command line of the echo server.
#[derive(Parser, Debug)]
struct Args {
    /// Address to listen on; port 0 picks a free port.
    #[arg(long, default_value = "127.0.0.1:9000")]
    listen: std::net::SocketAddr,
    /// Shards (threads).
    #[arg(long, default_value_t = 2)]
    shards: usize,
    /// Give every connection a 4 KiB kernel send buffer, forcing partial writes.
    #[arg(long)]
    small_sndbuf: bool,
}

/// Sends every message back where it came from.
struct Echo {
    small_sndbuf: bool,
}

impl Handler for Echo {
    fn on_open(&mut self, net: &mut Net, conn: ConnToken, _info: OpenInfo) {
        if self.small_sndbuf {
            if let Err(e) = net.set_send_buffer_bytes(conn, 4096) {
                log::warn!("SO_SNDBUF: {e}");
            }
        }
    }

    fn on_message(&mut self, net: &mut Net, conn: ConnToken, message: Message) {
        match message {
            Message::Text(text) => net.send(conn, text),
            _ => net.close(conn, 1003, "text frames only"),
        }
    }

    fn on_closed(&mut self, _net: &mut Net, _conn: ConnToken) {}

    fn end_turn(&mut self, _net: &mut Net) {}
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let mut signals = Signals::new([SIGINT, SIGTERM])?;
    let mut config = Config::for_tests(args.listen);
    config.shards = args.shards;
    // The door belongs to the acceptor, not to the connection layer this example exercises, and
    // a conformance run opens hundreds of connections in a row from one address.
    config.conns_per_ip_max = 0;
    config.connects_per_ip_per_second = 0;
    let handlers = (0..args.shards)
        .map(|_| Echo {
            small_sndbuf: args.small_sndbuf,
        })
        .collect();
    let server = start_with(&config, PlainWs::RoundRobin, handlers)?;
    let mut stdout = std::io::stdout();
    writeln!(stdout, "listening on http://{}", server.local_addr())?;
    stdout.flush()?;
    signals.forever().next();
    server.shutdown()
}
