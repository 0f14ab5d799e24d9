//! Hostile and broken clients: every one gets the contract's answer and nobody else notices.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use tungstenite::protocol::frame::coding::{CloseCode, Data, OpCode};
use tungstenite::protocol::frame::Frame;
use tungstenite::Message;

use crate::util::{
    connect, during_control_floods, http_get, recv_json, recv_until_close, send, server,
    test_config, Watchdog,
};

#[test]
fn hostile_messages_before_hello() {
    let _w = Watchdog::new("hostile_messages_before_hello", 30);
    let server = server(test_config());
    let mut ws = connect(server.local_addr(), "/ws/doc-a");
    send(&mut ws, "not json");
    let reply = recv_json(&mut ws);
    assert_eq!(
        (reply["type"].as_str(), reply["code"].as_str()),
        (Some("error"), Some("bad_message")),
        "{reply}"
    );
    send(
        &mut ws,
        r#"{"type":"op","client_seq":7,"ops":[{"kind":"ins","id":[1,1],"after":null,"text":"x"}]}"#,
    );
    let reply = recv_json(&mut ws);
    assert_eq!(reply["code"], "not_joined", "{reply}");
    assert_eq!(reply["client_seq"], 7, "{reply}");
    send(&mut ws, r#"{"type":"presence","state":{"x":1}}"#);
    assert_eq!(recv_json(&mut ws)["code"], "not_joined");
    ws.send(Message::binary(vec![1u8, 2, 3]))
        .expect("send binary");
    assert_eq!(recv_json(&mut ws)["code"], "bad_message");
    send(&mut ws, r#"{"type":"nope"}"#);
    assert_eq!(recv_json(&mut ws)["code"], "bad_message");
    send(&mut ws, "[1,2]");
    assert_eq!(recv_json(&mut ws)["code"], "bad_message");
    server.shutdown().expect("clean shutdown");
}

#[test]
fn hostile_hundred_refusals_close_1008() {
    let _w = Watchdog::new("hostile_hundred_refusals_close_1008", 30);
    let server = server(test_config());
    let mut ws = connect(server.local_addr(), "/ws/doc-b");
    for _ in 0..100 {
        send(&mut ws, "{");
    }
    let (code, seen) = recv_until_close(&mut ws);
    assert_eq!(
        seen.len(),
        100,
        "every refusal is answered before the close"
    );
    assert!(seen.iter().all(|m| m["code"] == "bad_message"));
    assert_eq!(code, Some(CloseCode::Policy));
    server.shutdown().expect("clean shutdown");
}

#[test]
fn hostile_hello_doc_must_match_path() {
    let _w = Watchdog::new("hostile_hello_doc_must_match_path", 30);
    let server = server(test_config());
    let mut ws = connect(server.local_addr(), "/ws/a%2Fb");
    send(&mut ws, r#"{"type":"hello","doc":"a/c"}"#);
    let (code, seen) = recv_until_close(&mut ws);
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0]["code"], "bad_message");
    assert_eq!(code, Some(CloseCode::Policy));
    server.shutdown().expect("clean shutdown");
}

#[test]
fn hostile_oversize_message_closes_1009() {
    let _w = Watchdog::new("hostile_oversize_message_closes_1009", 30);
    let mut config = test_config();
    config.message_bytes_max = 64 * 1024;
    let server = server(config);
    let mut ws = connect(server.local_addr(), "/ws/doc-big");
    send(&mut ws, &"x".repeat(70 * 1024));
    let (code, _) = recv_until_close(&mut ws);
    assert_eq!(code, Some(CloseCode::Size));
    // Fragmented: each frame small, the reassembled message too big.
    let mut ws = connect(server.local_addr(), "/ws/doc-big");
    let part = "y".repeat(40 * 1024);
    ws.send(Message::Frame(Frame::message(
        part.clone(),
        OpCode::Data(Data::Text),
        false,
    )))
    .expect("first fragment");
    ws.send(Message::Frame(Frame::message(
        part,
        OpCode::Data(Data::Continue),
        true,
    )))
    .expect("last fragment");
    let (code, _) = recv_until_close(&mut ws);
    assert_eq!(code, Some(CloseCode::Size));
    server.shutdown().expect("clean shutdown");
}

#[test]
fn hostile_invalid_utf8_closes_1007() {
    let _w = Watchdog::new("hostile_invalid_utf8_closes_1007", 30);
    let server = server(test_config());
    let mut ws = connect(server.local_addr(), "/ws/doc-utf8");
    let bad: Vec<u8> = vec![b'{', 0xff, 0xfe, b'}'];
    ws.send(Message::Frame(Frame::message(
        bad,
        OpCode::Data(Data::Text),
        true,
    )))
    .expect("send");
    let (code, _) = recv_until_close(&mut ws);
    assert_eq!(code, Some(CloseCode::Invalid));
    server.shutdown().expect("clean shutdown");
}

#[test]
fn hostile_trickling_handshake_is_cut_at_the_deadline() {
    let _w = Watchdog::new("hostile_trickling_handshake_is_cut_at_the_deadline", 60);
    let mut config = test_config();
    config.handshake_timeout = Duration::from_millis(500);
    let server = server(config);
    let addr = server.local_addr();
    let mut stream = TcpStream::connect(addr).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    let mut writer = stream.try_clone().expect("clone");
    let request = format!(
        "GET /health HTTP/1.1\r\nX-Slow: {}\r\n\r\n",
        "a".repeat(200)
    );
    let trickle = std::thread::spawn(move || {
        for byte in request.as_bytes() {
            if writer.write_all(&[*byte]).is_err() {
                return true; // Cut off.
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        false
    });
    // Meanwhile the acceptor serves everyone else.
    assert!(http_get(addr, "GET /health HTTP/1.1\r\n\r\n").starts_with("HTTP/1.1 200 "));
    let mut response = Vec::new();
    let _ = stream.read_to_end(&mut response);
    assert!(
        response.is_empty(),
        "the trickler got an answer: {}",
        String::from_utf8_lossy(&response)
    );
    assert!(
        trickle.join().expect("trickle thread"),
        "the request completed before the cut"
    );
    server.shutdown().expect("clean shutdown");
}

#[test]
fn shutdown_closes_clients_with_1001() {
    let _w = Watchdog::new("shutdown_closes_clients_with_1001", 30);
    let server = server(test_config());
    let mut clients: Vec<_> = (0..4)
        .map(|i| connect(server.local_addr(), &format!("/ws/doc-{i}")))
        .collect();
    // Make sure each one reached its shard: a refused message comes back from there.
    for ws in &mut clients {
        send(ws, "x");
        assert_eq!(recv_json(ws)["code"], "bad_message");
    }
    let stopping = std::thread::spawn(move || server.shutdown());
    for ws in &mut clients {
        let (code, _) = recv_until_close(ws);
        assert_eq!(code, Some(CloseCode::Away));
    }
    stopping
        .join()
        .expect("shutdown thread")
        .expect("clean shutdown");
}

#[test]
fn hostile_hundred_refusals_by_the_room_close_1008() {
    let _w = Watchdog::new("hostile_hundred_refusals_by_the_room_close_1008", 30);
    let server = server(test_config());
    let mut ws = connect(server.local_addr(), "/ws/doc-c");
    send(&mut ws, r#"{"type":"hello"}"#);
    assert_eq!(recv_json(&mut ws)["type"], "hello_ack");
    // Alternate shard-level (unparsable) and room-level (unknown target) refusals.
    for i in 0..100 {
        if i % 2 == 0 {
            send(&mut ws, "nope");
        } else {
            send(
                &mut ws,
                &format!(
                    r#"{{"type":"op","client_seq":{i},"ops":[{{"kind":"del","id":[5,5],"len":1}}]}}"#
                ),
            );
        }
    }
    let (code, seen) = recv_until_close(&mut ws);
    assert_eq!(
        seen.len(),
        100,
        "every refusal is answered before the close"
    );
    assert_eq!(
        seen.iter().filter(|m| m["code"] == "unknown_id").count(),
        50
    );
    assert_eq!(code, Some(CloseCode::Policy));
    server.shutdown().expect("clean shutdown");
}

#[test]
fn client_close_is_answered_with_close() {
    let _w = Watchdog::new("client_close_is_answered_with_close", 30);
    let server = server(test_config());
    let mut ws = connect(server.local_addr(), "/ws/doc-close");
    send(&mut ws, r#"{"type":"hello"}"#);
    assert_eq!(recv_json(&mut ws)["type"], "hello_ack");
    ws.close(None).expect("send close");
    let mut answered = false;
    loop {
        match ws.read() {
            Ok(Message::Close(_)) => answered = true,
            Ok(_) => {}
            Err(tungstenite::Error::ConnectionClosed) => break,
            Err(e) => panic!("unexpected end: {e}"),
        }
    }
    assert!(answered, "the server answered the Close with a Close");
    server.shutdown().expect("clean shutdown");
}

/// A handler that panics on the text "boom", standing in for any bug on a shard's hot path.
struct PanicOnBoom;

impl collab_engine::shard::Handler for PanicOnBoom {
    fn on_open(
        &mut self,
        _net: &mut collab_engine::shard::Net,
        _conn: collab_engine::ids::ConnToken,
        _info: collab_engine::shard::OpenInfo,
    ) {
    }
    fn on_message(
        &mut self,
        net: &mut collab_engine::shard::Net,
        conn: collab_engine::ids::ConnToken,
        message: Message,
    ) {
        if let Message::Text(text) = message {
            assert_ne!(text.as_str(), "boom", "a bug in the handler");
            net.send(conn, text);
        }
    }
    fn on_closed(
        &mut self,
        _net: &mut collab_engine::shard::Net,
        _conn: collab_engine::ids::ConnToken,
    ) {
    }
    fn end_turn(&mut self, _net: &mut collab_engine::shard::Net) {}
}

/// A panic on a shard thread (a bug) closes every client of that shard with 1011 after what
/// was already queued for it, instead of resetting them silently.
#[test]
fn shard_panic_closes_its_clients_with_1011() {
    let _w = Watchdog::new("shard_panic_closes_its_clients_with_1011", 30);
    let config = test_config();
    let server = collab_engine::server::start_with(
        &config,
        collab_engine::acceptor::PlainWs::RoundRobin,
        vec![PanicOnBoom],
    )
    .expect("server");
    let mut bystander = connect(server.local_addr(), "/ws");
    send(&mut bystander, r#"{"hi":1}"#);
    assert_eq!(
        recv_json(&mut bystander)["hi"],
        1,
        "served before the panic"
    );
    let mut ws = connect(server.local_addr(), "/ws");
    send(&mut ws, "boom");
    let (code, _) = recv_until_close(&mut ws);
    assert_eq!(
        code,
        Some(CloseCode::Error),
        "the panicking connection gets 1011"
    );
    let (code, _) = recv_until_close(&mut bystander);
    assert_eq!(
        code,
        Some(CloseCode::Error),
        "so does every client of that shard"
    );
    server.shutdown().expect_err("a shard panicked");
}

/// A document path that hashes to shard `shard` of `n_shards`.
fn doc_on_shard(shard: usize, n_shards: usize) -> String {
    (0..)
        .map(|i| format!("doc-{i}"))
        .find(|doc| collab_engine::ids::shard_for_doc(doc, n_shards).0 == shard)
        .expect("some name hashes to every shard")
}

/// After a shard panicked, the acceptor answers new connections for its documents with
/// `unavailable` and a close 1011 instead of routing them into a dead shard; documents on the
/// other shards, and plain `/ws`, keep being served.
#[test]
fn dead_shard_is_not_routed_to() {
    let _w = Watchdog::new("dead_shard_is_not_routed_to", 30);
    let config = test_config();
    let server = collab_engine::server::start_with(
        &config,
        collab_engine::acceptor::PlainWs::RoundRobin,
        vec![PanicOnBoom, PanicOnBoom],
    )
    .expect("server");
    let (dead_doc, live_doc) = (doc_on_shard(0, 2), doc_on_shard(1, 2));
    let mut ws = connect(server.local_addr(), &format!("/ws/{dead_doc}"));
    send(&mut ws, "boom");
    let (code, _) = recv_until_close(&mut ws);
    assert_eq!(code, Some(CloseCode::Error));
    // The shard marked itself dead before it closed anything, so this is refused for sure.
    let health = http_get(server.local_addr(), "GET /health HTTP/1.1\r\n\r\n");
    assert!(health.starts_with("HTTP/1.1 503"), "{health}");
    assert!(health.contains("\"dead_shards\":1"), "{health}");
    let mut ws = connect(server.local_addr(), &format!("/ws/{dead_doc}"));
    let (code, seen) = recv_until_close(&mut ws);
    assert_eq!(code, Some(CloseCode::Error), "refused by the acceptor");
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_eq!(seen[0]["code"], "unavailable");
    let mut ws = connect(server.local_addr(), &format!("/ws/{live_doc}"));
    send(&mut ws, r#"{"still":"served"}"#);
    assert_eq!(recv_json(&mut ws)["still"], "served");
    for _ in 0..4 {
        let mut ws = connect(server.local_addr(), "/ws");
        send(&mut ws, r#"{"round":"robin"}"#);
        assert_eq!(
            recv_json(&mut ws)["round"],
            "robin",
            "plain /ws goes to live shards only"
        );
    }
    server.shutdown().expect_err("a shard panicked");
}

/// Like the room host: holds the turn's frames until `end_turn` (where the group commit would
/// make them durable), and panics on "boom".
#[derive(Default)]
struct HoldThenPanic {
    held: Vec<(collab_engine::ids::ConnToken, tungstenite::Utf8Bytes)>,
}

impl collab_engine::shard::Handler for HoldThenPanic {
    fn on_open(
        &mut self,
        _net: &mut collab_engine::shard::Net,
        _conn: collab_engine::ids::ConnToken,
        _info: collab_engine::shard::OpenInfo,
    ) {
    }
    fn on_message(
        &mut self,
        _net: &mut collab_engine::shard::Net,
        conn: collab_engine::ids::ConnToken,
        message: Message,
    ) {
        if let Message::Text(text) = message {
            assert_ne!(text.as_str(), "boom", "a bug in the handler");
            self.held.push((conn, text));
        }
    }
    fn on_closed(
        &mut self,
        _net: &mut collab_engine::shard::Net,
        _conn: collab_engine::ids::ConnToken,
    ) {
    }
    fn end_turn(&mut self, net: &mut collab_engine::shard::Net) {
        for (conn, frame) in self.held.drain(..) {
            net.send(conn, frame);
        }
    }
}

/// A frame the handler still held when it panicked (its turn's records would not be durable)
/// is never released: the client gets the 1011 close and nothing else.
#[test]
fn shard_panic_releases_nothing_of_its_turn() {
    let _w = Watchdog::new("shard_panic_releases_nothing_of_its_turn", 30);
    let config = test_config();
    let server = collab_engine::server::start_with(
        &config,
        collab_engine::acceptor::PlainWs::RoundRobin,
        vec![HoldThenPanic::default()],
    )
    .expect("server");
    let mut ws = connect(server.local_addr(), "/ws");
    send(&mut ws, r#"{"turn":1}"#);
    assert_eq!(
        recv_json(&mut ws)["turn"],
        1,
        "released at the end of its turn"
    );
    // One write: both messages reach the shard in the same read, so the same turn.
    ws.write(Message::text(r#"{"turn":2}"#)).expect("write");
    ws.write(Message::text("boom")).expect("write");
    ws.flush().expect("flush");
    let (code, seen) = recv_until_close(&mut ws);
    assert_eq!(code, Some(CloseCode::Error));
    assert!(seen.is_empty(), "nothing of the panicking turn: {seen:?}");
    server.shutdown().expect_err("a shard panicked");
}

/// Regression: before its `hello` on plain `/ws` a connection lives in the acceptor, which read
/// pings and pongs without any budget: a client streaming them held the acceptor thread, so no
/// other connection was accepted, upgraded or answered (`/health` included) until it stopped.
/// The 15 s bound is not a latency figure: it only tells "served during the flood" from "served
/// after it".
#[test]
fn hostile_ping_and_pong_floods_before_hello_do_not_stall_the_acceptor() {
    let _w = Watchdog::new(
        "hostile_ping_and_pong_floods_before_hello_do_not_stall_the_acceptor",
        120,
    );
    let server = server(test_config());
    let addr = server.local_addr();
    let outcomes = during_control_floods(addr, |what| {
        let health = http_get(addr, "GET /health HTTP/1.1\r\nHost: x\r\n\r\n");
        assert!(health.starts_with("HTTP/1.1 200"), "{what}: {health}");
        let mut ws = connect(addr, "/ws");
        send(&mut ws, r#"{"type":"hello","doc":"flooded"}"#);
        assert_eq!(recv_json(&mut ws)["type"], "hello_ack", "{what}");
    });
    for (what, during) in outcomes {
        assert!(
            during,
            "{what}: served only after the flood ended: one connection stalled the acceptor"
        );
    }
    server.shutdown().expect("clean shutdown");
}
