//! The connection layer alone, under the echo handler: pipelined messages of up to 64 KiB
//! per connection, read back in order, with a tiny kernel send buffer forcing partial writes.

use std::net::TcpStream;

use collab_engine::acceptor::PlainWs;
use collab_engine::ids::ConnToken;
use collab_engine::server::start_with;
use collab_engine::shard::{Handler, Net, OpenInfo};
use tungstenite::protocol::Role;
use tungstenite::{Message, WebSocket};

use crate::util::{test_config, Watchdog, READ_TIMEOUT};

struct Echo;

impl Handler for Echo {
    fn on_open(&mut self, net: &mut Net, conn: ConnToken, _info: OpenInfo) {
        net.set_send_buffer_bytes(conn, 4096).expect("SO_SNDBUF");
    }
    fn on_message(&mut self, net: &mut Net, conn: ConnToken, message: Message) {
        if let Message::Text(text) = message {
            net.send(conn, text);
        }
    }
    fn on_closed(&mut self, _net: &mut Net, _conn: ConnToken) {}
    fn end_turn(&mut self, _net: &mut Net) {}
}

/// Message `i` of connection `c`: a header plus filler, up to 64 KiB.
fn message(c: usize, i: usize) -> String {
    let len = match i % 4 {
        0 => 10,
        1 => 1000,
        2 => 20_000,
        _ => 64 * 1024 - 32,
    };
    let mut text = format!("{c}:{i}:");
    let filler = (b'a' + ((c * 7 + i) % 26) as u8) as char;
    while text.len() < len {
        text.push(filler);
    }
    text
}

#[test]
fn echo_pipelined_messages_come_back_in_order() {
    let _w = Watchdog::new("echo_pipelined_messages_come_back_in_order", 120);
    let config = test_config();
    let server = start_with(&config, PlainWs::RoundRobin, vec![Echo, Echo]).expect("echo server");
    let addr = server.local_addr();
    const CONNS: usize = 4;
    const MESSAGES: usize = 300;
    let clients: Vec<_> = (0..CONNS)
        .map(|c| {
            std::thread::spawn(move || {
                let stream = TcpStream::connect(addr).expect("connect");
                stream
                    .set_read_timeout(Some(READ_TIMEOUT))
                    .expect("timeout");
                let (writer, _) = tungstenite::client::client(format!("ws://{addr}/ws"), stream)
                    .expect("handshake");
                let read_half = writer.get_ref().try_clone().expect("clone");
                let mut reader = WebSocket::from_raw_socket(read_half, Role::Client, None);
                let mut writer = writer;
                let sending = std::thread::spawn(move || {
                    for i in 0..MESSAGES {
                        writer.write(Message::text(message(c, i))).expect("write");
                    }
                    writer.flush().expect("flush");
                    writer
                });
                for i in 0..MESSAGES {
                    match reader.read().expect("read echo") {
                        Message::Text(text) => assert!(
                            text.as_str() == message(c, i),
                            "conn {c} message {i} differs"
                        ),
                        other => panic!("unexpected {other:?}"),
                    }
                }
                let mut writer = sending.join().expect("sender");
                writer.close(None).expect("close");
            })
        })
        .collect();
    for client in clients {
        client.join().expect("client passes");
    }
    server.shutdown().expect("clean shutdown");
}
