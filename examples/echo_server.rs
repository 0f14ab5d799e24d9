//! An echo server on the real acceptor and shard connection layer: every text or binary
//! message comes back on the same connection, in order, as a message of the same kind.
//!
//! It serves WebSocket upgrades on `/ws` (`ws://127.0.0.1:9000/ws`), spread round-robin over
//! the shards, and the acceptor's plain HTTP routes (`/health`) on the same port.
//! Exercises the transport alone (read budget, queued writes, WRITABLE on `WouldBlock`,
//! partial writes with `--small-sndbuf`, fragmented messages, pings, close handshakes),
//! without documents or storage. It is the server that `tests/autobahn/run.sh` runs the
//! Autobahn|Testsuite conformance cases against.
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

/// Command line of the echo server. A flag given twice takes its last value, so scripts can
/// append overrides to their defaults.
#[derive(Parser, Debug)]
#[command(
    args_override_self = true,
    about = "WebSocket echo server on collab-engine's acceptor and shard connection layer: \
             upgrades on /ws (ws://ADDR/ws); every text or binary message comes back as it came"
)]
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
    /// Largest message (and frame) in bytes; bigger ones are closed with 1009. Autobahn's 9.*
    /// cases send messages of up to 16 MiB.
    #[arg(long, default_value_t = 1024 * 1024, value_parser = parse_at_least_one)]
    max_message_bytes: usize,
}

/// Parses a count that must not be 0.
fn parse_at_least_one(text: &str) -> Result<usize, String> {
    match text.parse::<usize>() {
        Ok(0) => Err("must be at least 1".to_owned()),
        Ok(n) => Ok(n),
        Err(e) => Err(e.to_string()),
    }
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
            Message::Binary(payload) => net.send_binary(conn, payload),
            // The connection layer hands over data messages only; pings, pongs and closes are
            // its own business.
            other => log::debug!("echo: ignoring {} byte control message", other.len()),
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
    config.message_bytes_max = args.max_message_bytes;
    // An echo queues what it reads: let one largest message wait behind another without the
    // connection counting as a slow consumer.
    config.outbound_bytes_max = config.outbound_bytes_max.max(2 * args.max_message_bytes);
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
