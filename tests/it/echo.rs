//! The connection layer alone, under the echo handler (the one of `examples/echo_server.rs`,
//! which `tests/autobahn/run.sh` runs the Autobahn|Testsuite against): pipelined text and binary
//! messages of up to 64 KiB per connection, read back in order, with a tiny kernel send buffer
//! forcing partial writes; fragmented messages with pings between the fragments; invalid UTF-8
//! and the close-code rules of RFC 6455.

use std::net::TcpStream;

use collab_engine::acceptor::PlainWs;
use collab_engine::ids::ConnToken;
use collab_engine::server::{start_with, ServerHandle};
use collab_engine::shard::{Handler, Net, OpenInfo};
use tungstenite::protocol::frame::coding::{CloseCode, Control, Data, OpCode};
use tungstenite::protocol::frame::{CloseFrame, Frame, FrameHeader};
use tungstenite::protocol::Role;
use tungstenite::{Bytes, Message, WebSocket};

use crate::util::{connect, during_control_floods, test_config, Watchdog, Ws, READ_TIMEOUT};

/// Sends every text or binary message back as a message of the same kind.
struct Echo;

impl Handler for Echo {
    fn on_open(&mut self, net: &mut Net, conn: ConnToken, _info: OpenInfo) {
        net.set_send_buffer_bytes(conn, 4096).expect("SO_SNDBUF");
    }
    fn on_message(&mut self, net: &mut Net, conn: ConnToken, message: Message) {
        match message {
            Message::Text(text) => net.send(conn, text),
            Message::Binary(payload) => net.send_binary(conn, payload),
            other => panic!("the connection layer handed over a control message: {other:?}"),
        }
    }
    fn on_closed(&mut self, _net: &mut Net, _conn: ConnToken) {}
    fn end_turn(&mut self, _net: &mut Net) {}
}

/// An echo server with two shards.
fn echo_server() -> ServerHandle {
    crate::util::init_logging();
    start_with(&test_config(), PlainWs::RoundRobin, vec![Echo, Echo]).expect("echo server")
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

/// Message `i` of connection `c` for the mixed test: text for even `i`; for odd `i`, binary
/// with bytes that are not UTF-8 (so a binary payload sent as text would be refused).
fn mixed_message(c: usize, i: usize) -> Message {
    let text = message(c, i);
    if i % 2 == 0 {
        Message::text(text)
    } else {
        let mut bytes = text.into_bytes();
        for (byte_idx, byte) in bytes.iter_mut().enumerate().skip(8) {
            *byte = 0x80 | (byte_idx % 0x7f) as u8;
        }
        Message::binary(bytes)
    }
}

#[test]
fn echo_binary_and_text_messages_come_back_in_kind_and_order() {
    let _w = Watchdog::new(
        "echo_binary_and_text_messages_come_back_in_kind_and_order",
        120,
    );
    let server = echo_server();
    let addr = server.local_addr();
    const CONNS: usize = 2;
    const MESSAGES: usize = 200;
    let clients: Vec<_> = (0..CONNS)
        .map(|c| {
            std::thread::spawn(move || {
                let stream = TcpStream::connect(addr).expect("connect");
                stream
                    .set_read_timeout(Some(READ_TIMEOUT))
                    .expect("timeout");
                let (mut writer, _) =
                    tungstenite::client::client(format!("ws://{addr}/ws"), stream)
                        .expect("handshake");
                let read_half = writer.get_ref().try_clone().expect("clone");
                let mut reader = WebSocket::from_raw_socket(read_half, Role::Client, None);
                let sending = std::thread::spawn(move || {
                    for i in 0..MESSAGES {
                        writer.write(mixed_message(c, i)).expect("write");
                    }
                    writer.flush().expect("flush");
                    writer
                });
                for i in 0..MESSAGES {
                    let got = reader.read().expect("read echo");
                    assert!(got == mixed_message(c, i), "conn {c} message {i} differs");
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

/// Sends `frame` as it is (tungstenite masks it; nothing else is checked or added).
fn send_frame(ws: &mut Ws, frame: Frame) {
    ws.send(Message::Frame(frame)).expect("send frame");
}

/// Reads the next message, whatever its kind.
fn next(ws: &mut Ws) -> Message {
    ws.read().expect("read")
}

#[test]
fn echo_fragmented_messages_with_pings_between_fragments() {
    let _w = Watchdog::new("echo_fragmented_messages_with_pings_between_fragments", 30);
    let server = echo_server();
    let mut ws = connect(server.local_addr(), "/ws");
    // "κόσμε" split inside a code point: each fragment alone is not valid UTF-8, the message is.
    let text = "κόσμε".as_bytes();
    send_frame(
        &mut ws,
        Frame::message(text[..3].to_vec(), OpCode::Data(Data::Text), false),
    );
    send_frame(&mut ws, Frame::ping(&b"first"[..]));
    send_frame(
        &mut ws,
        Frame::message(text[3..7].to_vec(), OpCode::Data(Data::Continue), false),
    );
    send_frame(&mut ws, Frame::ping(vec![0xab; 125]));
    send_frame(
        &mut ws,
        Frame::message(text[7..].to_vec(), OpCode::Data(Data::Continue), true),
    );
    // Each ping is answered with its own payload, at once, before the message is complete.
    assert_eq!(next(&mut ws), Message::Pong(Bytes::from_static(b"first")));
    assert_eq!(next(&mut ws), Message::Pong(Bytes::from(vec![0xab; 125])));
    assert_eq!(next(&mut ws), Message::text("κόσμε"));
    // A binary message in fragments, one of them empty, comes back whole and binary.
    send_frame(
        &mut ws,
        Frame::message(vec![0xff, 0x00], OpCode::Data(Data::Binary), false),
    );
    send_frame(
        &mut ws,
        Frame::message(Vec::new(), OpCode::Data(Data::Continue), false),
    );
    send_frame(
        &mut ws,
        Frame::message(vec![0xfe], OpCode::Data(Data::Continue), true),
    );
    assert_eq!(next(&mut ws), Message::binary(vec![0xff, 0x00, 0xfe]));
    // A data frame in the middle of a fragmented message is a protocol error: 1002.
    send_frame(
        &mut ws,
        Frame::message(&b"a"[..], OpCode::Data(Data::Text), false),
    );
    send_frame(
        &mut ws,
        Frame::message(&b"b"[..], OpCode::Data(Data::Text), true),
    );
    assert_eq!(close_code(&mut ws), Some(CloseCode::Protocol));
    server.shutdown().expect("clean shutdown");
}

/// Reads until the server's close frame and returns its code (`None`: no code, or no frame).
fn close_code(ws: &mut Ws) -> Option<CloseCode> {
    loop {
        match ws.read() {
            Ok(Message::Close(frame)) => return frame.map(|f| f.code),
            Ok(Message::Text(_) | Message::Binary(_)) => panic!("a data message before the close"),
            Ok(_) => {}
            Err(e) => panic!("read while waiting for the close frame: {e}"),
        }
    }
}

#[test]
fn echo_invalid_utf8_closes_1007() {
    let _w = Watchdog::new("echo_invalid_utf8_closes_1007", 30);
    let server = echo_server();
    let addr = server.local_addr();
    // In one frame.
    let mut ws = connect(addr, "/ws");
    send_frame(
        &mut ws,
        Frame::message(vec![b'a', 0xc0, 0xaf], OpCode::Data(Data::Text), true),
    );
    assert_eq!(close_code(&mut ws), Some(CloseCode::Invalid));
    // In the second fragment of three (a code point past U+10FFFF), the first being fine.
    let mut ws = connect(addr, "/ws");
    send_frame(
        &mut ws,
        Frame::message(&b"ok"[..], OpCode::Data(Data::Text), false),
    );
    send_frame(
        &mut ws,
        Frame::message(
            vec![0xf4, 0x90, 0x80, 0x80],
            OpCode::Data(Data::Continue),
            false,
        ),
    );
    send_frame(
        &mut ws,
        Frame::message(&b"end"[..], OpCode::Data(Data::Continue), true),
    );
    assert_eq!(close_code(&mut ws), Some(CloseCode::Invalid));
    // A message cut inside a code point.
    let mut ws = connect(addr, "/ws");
    send_frame(
        &mut ws,
        Frame::message(vec![0xce, 0xba, 0xe1], OpCode::Data(Data::Text), true),
    );
    assert_eq!(close_code(&mut ws), Some(CloseCode::Invalid));
    // The same bytes as a binary message are fine.
    let mut ws = connect(addr, "/ws");
    send_frame(
        &mut ws,
        Frame::message(vec![0xce, 0xba, 0xe1], OpCode::Data(Data::Binary), true),
    );
    assert_eq!(next(&mut ws), Message::binary(vec![0xce, 0xba, 0xe1]));
    server.shutdown().expect("clean shutdown");
}

/// A close frame with exactly `payload` (a code and a reason, or anything else).
fn raw_close(payload: Vec<u8>) -> Frame {
    let header = FrameHeader {
        opcode: OpCode::Control(Control::Close),
        ..FrameHeader::default()
    };
    Frame::from_payload(header, Bytes::from(payload))
}

/// The close frame of `code` with `reason`.
fn close_payload(code: u16, reason: &[u8]) -> Vec<u8> {
    let mut payload = code.to_be_bytes().to_vec();
    payload.extend_from_slice(reason);
    payload
}

#[test]
fn echo_close_codes_follow_rfc_6455() {
    let _w = Watchdog::new("echo_close_codes_follow_rfc_6455", 60);
    let server = echo_server();
    let addr = server.local_addr();
    // A valid code comes back as the reply's code (RFC 6455 section 5.5.1), also from the
    // registered and private ranges; no code at all gets a close without one.
    for code in [1000, 1001, 1003, 1007, 1011, 3000, 3999, 4000, 4999] {
        let mut ws = connect(addr, "/ws");
        send_frame(&mut ws, raw_close(close_payload(code, b"bye")));
        assert_eq!(
            close_code(&mut ws),
            Some(CloseCode::from(code)),
            "close {code}"
        );
    }
    let mut ws = connect(addr, "/ws");
    send_frame(&mut ws, raw_close(Vec::new()));
    assert_eq!(close_code(&mut ws), None, "a close without a code");
    // Codes an endpoint must never send (section 7.4), a one-byte payload, and a reason that
    // is not UTF-8 are protocol errors.
    for code in [0, 999, 1004, 1005, 1006, 1015, 1016, 1100, 2000, 2999] {
        let mut ws = connect(addr, "/ws");
        send_frame(&mut ws, raw_close(close_payload(code, b"")));
        assert_eq!(
            close_code(&mut ws),
            Some(CloseCode::Protocol),
            "close {code}"
        );
    }
    let mut ws = connect(addr, "/ws");
    send_frame(&mut ws, raw_close(vec![0x03]));
    assert_eq!(close_code(&mut ws), Some(CloseCode::Protocol), "one byte");
    let mut ws = connect(addr, "/ws");
    send_frame(
        &mut ws,
        raw_close(close_payload(
            1000,
            &[0xce, 0xba, 0xe1, 0xbd, 0xb9, 0xf4, 0x90],
        )),
    );
    let code = close_code(&mut ws);
    assert!(
        matches!(code, Some(CloseCode::Invalid | CloseCode::Protocol)),
        "a reason that is not UTF-8: {code:?}"
    );
    // A ping payload over 125 bytes is a protocol error too (section 5.5).
    let mut ws = connect(addr, "/ws");
    send_frame(&mut ws, Frame::ping(vec![0; 126]));
    assert_eq!(close_code(&mut ws), Some(CloseCode::Protocol), "long ping");
    // After the close handshake the server closes the TCP connection (section 7.1.1).
    let mut ws = connect(addr, "/ws");
    ws.close(Some(CloseFrame {
        code: CloseCode::Normal,
        reason: "done".into(),
    }))
    .expect("close");
    loop {
        match ws.read() {
            Ok(Message::Close(frame)) => {
                assert_eq!(frame.map(|f| f.code), Some(CloseCode::Normal));
            }
            Ok(other) => panic!("unexpected {other:?}"),
            Err(tungstenite::Error::ConnectionClosed) => break,
            Err(e) => panic!("the server did not end the connection cleanly: {e}"),
        }
    }
    server.shutdown().expect("clean shutdown");
}

/// Regression: the connection layer read pings and pongs (which the handler never sees) without
/// any budget, so a client streaming them held its shard inside one `read_one` call: the other
/// connections, new ones and the timers waited until the stream stopped. The 15 s bound is not
/// a latency figure: it only tells "served during the flood" from "served after it".
#[test]
fn echo_ping_and_pong_floods_do_not_starve_the_shard() {
    let _w = Watchdog::new("echo_ping_and_pong_floods_do_not_starve_the_shard", 120);
    crate::util::init_logging();
    let server = start_with(&test_config(), PlainWs::RoundRobin, vec![Echo]).expect("echo server");
    let addr = server.local_addr();
    // Unsolicited pongs (which the RFC allows), and pings whose pongs the flooder never reads.
    let outcomes = during_control_floods(addr, |_| {
        let mut ws = connect(addr, "/ws");
        ws.send(Message::text("still served")).expect("send");
        assert_eq!(next(&mut ws), Message::text("still served"));
    });
    for (what, during) in outcomes {
        assert!(
            during,
            "{what}: the echo came only after the flood ended: one connection starved the shard"
        );
    }
    server.shutdown().expect("clean shutdown");
}
