//! Any-node entry (issue 11's data plane): a node that owns none of the documents relays each
//! connection to the owner, byte for byte. Two real servers on 127.0.0.1 (the owner sometimes a
//! real process, to be killed), real clients; the entry node's router is a test router that
//! sends documents wherever the test says.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use collab_engine::cluster::forwarded::ClusterSecret;
use collab_engine::cluster::{Route, Router};
use collab_engine::config::Config;
use collab_engine::server::{start_routed, RouterOptions, ServerHandle};
use serde_json::Value;
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::protocol::Role;
use tungstenite::stream::MaybeTlsStream;
use tungstenite::WebSocket;

use crate::util::{
    connect, connect_with_small_rcvbuf, init_logging, recv_json, recv_until_close, send, server,
    spawn_server, test_config, Watchdog, Ws, READ_TIMEOUT,
};

/// A router the test steers: a route per document, a default for the others.
pub struct TestRouter {
    routes: Mutex<HashMap<String, Route>>,
    default: Mutex<Route>,
    waker: Mutex<Option<Arc<mio::Waker>>>,
}

impl TestRouter {
    pub fn new(default: Route) -> Arc<TestRouter> {
        Arc::new(TestRouter {
            routes: Mutex::new(HashMap::new()),
            default: Mutex::new(default),
            waker: Mutex::new(None),
        })
    }

    /// Routes every document to `route` from now on, and wakes the acceptor.
    pub fn set_default(&self, route: Route) {
        *self.default.lock().expect("lock") = route;
        if let Some(waker) = self.waker.lock().expect("lock").as_ref() {
            waker.wake().expect("wake");
        }
    }
}

impl Router for TestRouter {
    fn route(&self, doc: &str) -> Route {
        if let Some(route) = self.routes.lock().expect("lock").get(doc) {
            return route.clone();
        }
        self.default.lock().expect("lock").clone()
    }

    fn set_waker(&self, waker: Arc<mio::Waker>) {
        *self.waker.lock().expect("lock") = Some(waker);
    }
}

/// An entry node whose router sends every document to `owner`.
pub fn entry_node(owner: SocketAddr) -> (ServerHandle, Arc<TestRouter>) {
    entry_node_with(test_config(), Route::Relay(owner))
}

fn entry_node_with(config: Config, route: Route) -> (ServerHandle, Arc<TestRouter>) {
    init_logging();
    let router = TestRouter::new(route);
    let options = RouterOptions {
        router: router.clone(),
        route_wait: Duration::from_secs(1),
    };
    let node = start_routed(config, Some(options)).expect("entry node starts");
    (node, router)
}

fn join(addr: SocketAddr, path: &str, hello: &str) -> (Ws, Value) {
    let mut ws = connect(addr, path);
    send(&mut ws, hello);
    let ack = recv_json(&mut ws);
    assert_eq!(ack["type"], "hello_ack", "{ack}");
    (ws, ack)
}

fn ins(client_seq: u64, lamport: u64, replica: u64, after: &str, text: &str) -> String {
    format!(
        r#"{{"type":"op","client_seq":{client_seq},"ops":[{{"kind":"ins","id":[{lamport},{replica}],"after":{after},"text":"{text}"}}]}}"#
    )
}

/// A masked client text frame.
fn client_text_frame(text: &str) -> Vec<u8> {
    let mask = [0x11u8, 0x22, 0x33, 0x44];
    let payload = text.as_bytes();
    let mut frame = vec![0x81];
    match payload.len() {
        n if n < 126 => frame.push(0x80 | n as u8),
        n => {
            frame.push(0x80 | 126);
            frame.extend_from_slice(&(n as u16).to_be_bytes());
        }
    }
    frame.extend_from_slice(&mask);
    frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    frame
}

/// Writes `bytes` (a request head and frames, all at once), reads the `101`, and returns the
/// client WebSocket over the rest.
fn raw_upgrade(addr: SocketAddr, bytes: &[u8]) -> (Ws, String) {
    let mut stream = TcpStream::connect(addr).expect("connect");
    stream
        .set_read_timeout(Some(READ_TIMEOUT))
        .expect("timeout");
    stream.write_all(bytes).expect("write");
    let mut got = Vec::new();
    let mut byte = [0u8; 1];
    while !got.ends_with(b"\r\n\r\n") {
        let n = stream.read(&mut byte).expect("read the response head");
        assert_eq!(n, 1, "closed during the response head: {got:?}");
        got.push(byte[0]);
    }
    let head = String::from_utf8(got).expect("ASCII head");
    let ws = WebSocket::from_raw_socket(MaybeTlsStream::Plain(stream), Role::Client, None);
    (ws, head)
}

fn upgrade_head(path: &str, extra: &str) -> String {
    format!(
        "GET {path} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n"
    )
}

fn metric(addr: SocketAddr, name: &str) -> u64 {
    let text = crate::util::http_get(addr, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
    text.lines()
        .find_map(|line| {
            line.strip_prefix(name)?
                .strip_prefix(' ')?
                .trim()
                .parse()
                .ok()
        })
        .unwrap_or_else(|| panic!("{name} in /metrics"))
}

#[test]
fn relay_carries_a_session_on_ws_doc_to_the_owner() {
    let _w = Watchdog::new("relay_carries_a_session_on_ws_doc", 60);
    let owner = server(test_config());
    let (entry, _router) = entry_node(owner.local_addr());
    let (a, b) = (entry.local_addr(), owner.local_addr());
    // One client through the entry node, one on the owner: the same room.
    let (mut relayed, ack) = join(a, "/ws/relayed", r#"{"type":"hello"}"#);
    assert_eq!(ack["doc"], "relayed");
    let replica = ack["replica"].as_u64().expect("replica");
    let (mut direct, direct_ack) = join(b, "/ws/relayed", r#"{"type":"hello"}"#);
    let direct_replica = direct_ack["replica"].as_u64().expect("replica");
    send(&mut relayed, &ins(1, 1, replica, "null", "hi"));
    let echo = recv_json(&mut relayed);
    assert_eq!(
        (echo["type"].as_str(), echo["client_seq"].as_u64()),
        (Some("op_echo"), Some(1)),
        "{echo}"
    );
    let seen = recv_json(&mut direct);
    assert_eq!(seen["server_seq"], echo["server_seq"], "{seen}");
    // Presence crosses the relay both ways.
    send(&mut direct, r#"{"type":"presence","state":{"cursor":2}}"#);
    let presence = recv_json(&mut relayed);
    assert_eq!(presence["type"], "presence", "{presence}");
    assert_eq!(presence["state"]["cursor"], 2);
    // A refusal passes through as the owner sent it, and the session goes on.
    send(
        &mut relayed,
        r#"{"type":"op","client_seq":2,"ops":[{"kind":"del","id":[99,99],"len":1}]}"#,
    );
    let refusal = recv_json(&mut relayed);
    assert_eq!(refusal["code"], "unknown_id", "{refusal}");
    assert_eq!(refusal["client_seq"], 2, "{refusal}");
    // Resume with `since` through the relay: the missed op is replayed.
    drop(relayed);
    send(
        &mut direct,
        &ins(1, 3, direct_replica, &format!("[2,{replica}]"), "!"),
    );
    let head = loop {
        // (The relayed client's departure may come first: its presence turns null.)
        let msg = recv_json(&mut direct);
        assert_ne!(msg["type"], "error", "{msg}");
        if msg["type"] == "op_echo" {
            break msg["server_seq"].as_u64().expect("seq");
        }
    };
    let hello = format!(
        r#"{{"type":"hello","since":{},"epoch":{}}}"#,
        head - 1,
        ack["epoch"]
    );
    let (back, ack) = join(a, "/ws/relayed", &hello);
    assert_eq!(ack["head"].as_u64(), Some(head), "{ack}");
    assert_eq!(ack["strategy"], "replay", "{ack}");
    assert_eq!(ack["ops"][0]["server_seq"].as_u64(), Some(head), "{ack}");
    assert!(metric(a, "collab_relay_connections_total") >= 2);
    assert!(metric(a, "collab_relay_bytes_to_owner_total") > 0);
    assert!(metric(a, "collab_relay_bytes_to_client_total") > 0);
    assert_eq!(entry.metrics().relay().active(), 1);
    // The entry node's shards never saw the document.
    assert_eq!(entry.metrics().totals().docs_loaded, 0);
    drop(back);
    drop(direct);
    entry.shutdown().expect("entry shuts down");
    owner.shutdown().expect("owner shuts down");
}

#[test]
fn relay_plain_ws_keeps_a_pipelined_hello_and_op() {
    let _w = Watchdog::new("relay_plain_ws_keeps_a_pipelined_hello", 60);
    let owner = server(test_config());
    let (entry, _router) = entry_node(owner.local_addr());
    // The head, a ping, the hello and an op in one write: nothing may be lost or reordered.
    let mut bytes = upgrade_head("/ws", "").into_bytes();
    bytes.extend_from_slice(&[0x89, 0x80, 1, 2, 3, 4]);
    bytes.extend_from_slice(&client_text_frame(
        r#"{"type":"hello","doc":"plain","replica":7}"#,
    ));
    bytes.extend_from_slice(&client_text_frame(&ins(1, 1, 7, "null", "x")));
    let (mut ws, head) = raw_upgrade(entry.local_addr(), &bytes);
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert!(
        head.contains("Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n"),
        "{head}"
    );
    assert_eq!(
        head.matches("HTTP/1.1").count(),
        1,
        "one handshake answer: {head}"
    );
    let ack = recv_json(&mut ws);
    assert_eq!(
        (ack["type"].as_str(), ack["doc"].as_str()),
        (Some("hello_ack"), Some("plain")),
        "{ack}"
    );
    let echo = recv_json(&mut ws);
    assert_eq!(echo["client_seq"].as_u64(), Some(1), "{echo}");
    // The owner served it; the entry node only relayed.
    assert_eq!(entry.metrics().totals().docs_loaded, 0);
    assert_eq!(owner.metrics().relay().started(), 0);
    assert_eq!(entry.metrics().relay().started(), 1);
    // Refusals before the hello come from the entry node, as a shard would send them.
    let mut ws = connect(entry.local_addr(), "/ws");
    send(&mut ws, &ins(4, 1, 1, "null", "x"));
    let refusal = recv_json(&mut ws);
    assert_eq!(
        (refusal["code"].as_str(), refusal["client_seq"].as_u64()),
        (Some("not_joined"), Some(4))
    );
    send(&mut ws, r#"{"type":"hello"}"#);
    assert_eq!(recv_json(&mut ws)["code"], "bad_message");
    send(&mut ws, r#"{"type":"hello","doc":"plain"}"#);
    let ack = recv_json(&mut ws);
    assert_eq!(ack["type"], "hello_ack", "{ack}");
    assert_eq!(
        ack["head"].as_u64(),
        Some(1),
        "the op through the first connection: {ack}"
    );
    drop(ws);
    entry.shutdown().expect("entry shuts down");
    owner.shutdown().expect("owner shuts down");
}

#[test]
fn relay_closes_1013_when_the_owner_is_killed() {
    let _w = Watchdog::new("relay_closes_1013_when_the_owner_is_killed", 60);
    let (mut owner, owner_addr) = spawn_server();
    let (entry, _router) = entry_node(owner_addr);
    let (mut doc_ws, _) = join(entry.local_addr(), "/ws/killed", r#"{"type":"hello"}"#);
    let (mut plain_ws, _) = join(
        entry.local_addr(),
        "/ws",
        r#"{"type":"hello","doc":"killed2"}"#,
    );
    owner.kill().expect("kill -9 the owner");
    owner.wait().expect("reaped");
    for ws in [&mut doc_ws, &mut plain_ws] {
        let (code, _) = recv_until_close(ws);
        assert_eq!(code, Some(CloseCode::Again));
    }
    assert!(entry.metrics().relay().upstream_failures() >= 2);
    entry.shutdown().expect("entry shuts down");
}

#[test]
fn relay_passes_the_owners_own_close_through() {
    let _w = Watchdog::new("relay_passes_the_owners_own_close_through", 60);
    let owner = server(test_config());
    let (entry, _router) = entry_node(owner.local_addr());
    let (mut ws, _) = join(entry.local_addr(), "/ws/drained", r#"{"type":"hello"}"#);
    // A drained owner closes its clients with 1001; relayed ones see exactly that.
    owner.shutdown().expect("owner shuts down");
    let (code, _) = recv_until_close(&mut ws);
    assert_eq!(code, Some(CloseCode::Away));
    assert_eq!(entry.metrics().relay().upstream_failures(), 0);
    entry.shutdown().expect("entry shuts down");
}

#[test]
fn relay_closes_1013_when_the_document_moves_to_another_owner() {
    let _w = Watchdog::new("relay_closes_1013_when_the_document_moves", 60);
    let (old, new) = (server(test_config()), server(test_config()));
    let (entry, router) = entry_node(old.local_addr());
    let a = entry.local_addr();
    let (mut ws, _) = join(a, "/ws/moving", r#"{"type":"hello"}"#);
    // The old owner says nothing (as if paused or cut off); the router names the new one.
    router.set_default(Route::Relay(new.local_addr()));
    let (code, _) = recv_until_close(&mut ws);
    assert_eq!(code, Some(CloseCode::Again));
    assert_eq!(entry.metrics().relay().owner_moves(), 1);
    // Coming back, the client reaches the new owner.
    let (_ws, ack) = join(a, "/ws/moving", r#"{"type":"hello"}"#);
    assert_eq!(ack["head"], 0, "a fresh document on the new owner: {ack}");
    drop(_ws);
    entry.shutdown().expect("entry shuts down");
    old.shutdown().expect("old owner shuts down");
    new.shutdown().expect("new owner shuts down");
}

#[test]
fn relay_to_an_unreachable_owner_answers_unavailable_1013() {
    let _w = Watchdog::new("relay_to_an_unreachable_owner", 60);
    // A port nobody listens on.
    let dead = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let dead_addr = dead.local_addr().expect("addr");
    drop(dead);
    let (entry, router) = entry_node(dead_addr);
    let a = entry.local_addr();
    for path in ["/ws/nowhere", "/ws"] {
        let mut ws = connect(a, path);
        send(&mut ws, r#"{"type":"hello","doc":"nowhere"}"#);
        let (code, seen) = recv_until_close(&mut ws);
        assert_eq!(code, Some(CloseCode::Again), "{path}");
        assert_eq!(seen.len(), 1, "{path}: {seen:?}");
        assert_eq!(seen[0]["code"], "unavailable", "{path}");
    }
    // No route before the deadline: the same answer, after the wait.
    router.set_default(Route::Pending);
    for path in ["/ws/pending", "/ws"] {
        let mut ws = connect(a, path);
        send(&mut ws, r#"{"type":"hello","doc":"pending"}"#);
        let (code, seen) = recv_until_close(&mut ws);
        assert_eq!(code, Some(CloseCode::Again), "{path}");
        assert_eq!(
            seen.first().map(|e| e["code"].clone()),
            Some("unavailable".into()),
            "{path}"
        );
    }
    let api = crate::util::http_get(a, "GET /api/docs/pending HTTP/1.1\r\nHost: x\r\n\r\n");
    assert!(api.starts_with("HTTP/1.1 503"), "{api}");
    // Unavailable at once.
    router.set_default(Route::Unavailable("no nodes".into()));
    let mut ws = connect(a, "/ws/gone");
    let (code, seen) = recv_until_close(&mut ws);
    assert_eq!(code, Some(CloseCode::Again));
    assert_eq!(seen[0]["code"], "unavailable");
    entry.shutdown().expect("entry shuts down");
}

#[test]
fn relay_waits_for_a_pending_route_and_then_serves() {
    let _w = Watchdog::new("relay_waits_for_a_pending_route", 60);
    let owner = server(test_config());
    let (entry, router) = entry_node_with(test_config(), Route::Pending);
    let a = entry.local_addr();
    // Both kinds of connection wait; the router's answer (with a wake) releases them.
    let doc = std::thread::spawn(move || {
        let (ws, ack) = join(a, "/ws/later", r#"{"type":"hello"}"#);
        (ws, ack)
    });
    let plain = std::thread::spawn(move || join(a, "/ws", r#"{"type":"hello","doc":"later"}"#));
    // Both wait in the acceptor (it counts them) until the router answers.
    while entry.metrics().relay().route_waits() < 2 {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(
        entry.metrics().relay().started(),
        0,
        "nothing relayed before the answer"
    );
    router.set_default(Route::Relay(owner.local_addr()));
    let (_doc_ws, ack) = doc.join().expect("doc client");
    assert_eq!(ack["doc"], "later");
    let (_plain_ws, ack) = plain.join().expect("plain client");
    assert_eq!(ack["doc"], "later");
    assert_eq!(entry.metrics().relay().started(), 2);
    drop((_doc_ws, _plain_ws));
    entry.shutdown().expect("entry shuts down");
    owner.shutdown().expect("owner shuts down");
}

/// A secret file for both nodes' `--cluster-secret-file`.
fn secret_file(tag: &str, text: &str) -> std::path::PathBuf {
    let path =
        std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("relay-secret-{tag}"));
    std::fs::write(&path, text).expect("write the secret");
    path
}

fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs()
}

#[test]
fn relay_forwarded_for_is_trusted_only_when_signed_by_a_peer() {
    let _w = Watchdog::new("relay_forwarded_for_is_trusted_only", 60);
    let secret_text = "a-cluster-secret-of-some-length\n";
    let path = secret_file("trust", secret_text);
    let mut config = test_config();
    config.conns_per_ip_max = 1;
    config.cluster_secret_file = Some(path.clone());
    let owner = server(config);
    let b = owner.local_addr();
    // 127.0.0.1 holds its one connection.
    let (_held, _) = join(b, "/ws/ip", r#"{"type":"hello"}"#);
    let claim: SocketAddr = "10.9.8.7:4321".parse().expect("addr");
    let attempt = |header: &str| -> String {
        let mut stream = TcpStream::connect(b).expect("connect");
        stream
            .set_read_timeout(Some(READ_TIMEOUT))
            .expect("timeout");
        let head = upgrade_head("/ws/ip", &format!("X-Collab-Forwarded-For: {header}\r\n"));
        stream.write_all(head.as_bytes()).expect("write");
        let mut answer = vec![0u8; 512];
        let n = stream.read(&mut answer).expect("read");
        String::from_utf8_lossy(&answer[..n]).into_owned()
    };
    // Forged: no mac, a wrong mac, another secret's mac, a stale one: counted as 127.0.0.1.
    let other = ClusterSecret::new(b"not-the-cluster-secret").expect("secret");
    let good = ClusterSecret::new(secret_text.as_bytes()).expect("secret");
    let forged = [
        format!("{claim}"),
        format!("{claim}; ts={}; mac={}", now_unix(), "0".repeat(64)),
        other.stamp(claim, now_unix()),
        good.stamp(claim, now_unix() - 3600),
    ];
    for header in &forged {
        let answer = attempt(header);
        assert!(answer.starts_with("HTTP/1.1 429"), "{header}: {answer}");
    }
    // Signed by a peer: counted against the client it names, so admitted.
    let answer = attempt(&good.stamp(claim, now_unix()));
    assert!(answer.starts_with("HTTP/1.1 101"), "{answer}");
    // Through a relaying node with the secret: the owner counts the real client (127.0.0.1,
    // full), and the 429 reaches the client through the relay.
    let mut entry_config = test_config();
    entry_config.cluster_secret_file = Some(path);
    let (entry, _router) = entry_node_with(entry_config, Route::Relay(b));
    let relayed = crate::util::http_get(entry.local_addr(), &upgrade_head("/ws/ip", ""));
    assert!(relayed.starts_with("HTTP/1.1 429"), "{relayed}");
    // A client that sends the header to a relaying node itself is not trusted and not relayed
    // (a request that claims to come through a relay is never relayed again): it gets
    // `unavailable` and 1013 from the relaying node.
    let relayed_before = entry.metrics().relay().started();
    let forged_line = format!("X-Collab-Forwarded-For: {}\r\n", forged[1]);
    let mut ws = raw_upgrade(
        entry.local_addr(),
        upgrade_head("/ws/ip", &forged_line).as_bytes(),
    )
    .0;
    let (code, seen) = recv_until_close(&mut ws);
    assert_eq!(code, Some(CloseCode::Again));
    assert_eq!(seen[0]["code"], "unavailable");
    assert_eq!(entry.metrics().relay().started(), relayed_before);
    entry.shutdown().expect("entry shuts down");
    owner.shutdown().expect("owner shuts down");
}

#[test]
fn relay_buffers_stay_bounded_for_a_client_that_does_not_read() {
    let _w = Watchdog::new("relay_buffers_stay_bounded", 90);
    let mut config = test_config();
    // The owner drops a client whose outbound queue passes 256 KiB.
    config.outbound_bytes_max = 256 * 1024;
    config.doc_chars_max = 32 << 20;
    let owner = server(config);
    let (entry, _router) = entry_node(owner.local_addr());
    // A reader that never reads, through the relay, with a small receive buffer.
    let mut sleeper = connect_with_small_rcvbuf(entry.local_addr(), "/ws/flood");
    send(&mut sleeper, r#"{"type":"hello"}"#);
    // A writer on the owner floods the room with 64 KiB inserts (25 MiB in all).
    let (mut writer, ack) = join(owner.local_addr(), "/ws/flood", r#"{"type":"hello"}"#);
    let replica = ack["replica"].as_u64().expect("replica");
    let text = "y".repeat(64 * 1024);
    let mut after = "null".to_owned();
    let mut lamport = 1;
    for seq in 1..=400u64 {
        send(&mut writer, &ins(seq, lamport, replica, &after, &text));
        after = format!("[{},{replica}]", lamport + text.len() as u64 - 1);
        lamport += text.len() as u64;
        // The writer reads its own echo, so only the sleeper falls behind.
        let echo = recv_json(&mut writer);
        assert_eq!(echo["type"], "op_echo", "{}", echo["message"]);
        assert_eq!(echo["client_seq"].as_u64(), Some(seq));
    }
    let relay = entry.metrics().relay();
    // The relay never held more than its two buffers (plus a close frame) for the sleeper.
    let bound = 2 * collab_engine::cluster::relay::RELAY_BUFFER_BYTES as u64 + 1024;
    assert!(
        relay.conn_buffered_bytes_peak() <= bound,
        "{} > {bound}",
        relay.conn_buffered_bytes_peak()
    );
    // And it did not read what it could not deliver: of the 25 MiB, what reached the client's
    // socket is what its kernel buffers took (the send buffer grows to `tcp_wmem`'s 4 MiB), and
    // the owner saw the backpressure and dropped its slow consumer.
    assert!(
        relay.bytes_to_client() < 10 << 20,
        "{}",
        relay.bytes_to_client()
    );
    let mut dropped = 0;
    for _ in 0..200 {
        dropped = owner.metrics().totals().conns;
        if dropped == 1 {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(
        dropped, 1,
        "the owner closed the slow client that the relay pushed back on"
    );
    drop(sleeper);
    drop(writer);
    entry.shutdown().expect("entry shuts down");
    owner.shutdown().expect("owner shuts down");
}

#[test]
fn relay_dials_the_next_owner_when_the_first_is_unreachable() {
    let _w = Watchdog::new("relay_dials_the_next_owner", 60);
    let dead = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let dead_addr = dead.local_addr().expect("addr");
    drop(dead);
    let owner = server(test_config());
    let mut config = test_config();
    config.handshake_timeout = Duration::from_secs(20);
    init_logging();
    let router = TestRouter::new(Route::Relay(dead_addr));
    let options = RouterOptions {
        router: router.clone(),
        // Long enough for the test to change the route while both clients wait.
        route_wait: Duration::from_secs(20),
    };
    let entry = start_routed(config, Some(options)).expect("entry node starts");
    let a = entry.local_addr();
    // The router names a dead owner; the relay keeps both clients and asks again.
    let doc = std::thread::spawn(move || join(a, "/ws/moved", r#"{"type":"hello"}"#));
    let plain = std::thread::spawn(move || join(a, "/ws", r#"{"type":"hello","doc":"moved"}"#));
    while entry.metrics().relay().owner_retries() < 2 {
        std::thread::sleep(Duration::from_millis(10));
    }
    // The lease moved: the next answer names the live owner, and both are served there.
    router.set_default(Route::Relay(owner.local_addr()));
    let (doc_ws, ack) = doc.join().expect("doc client");
    assert_eq!(ack["doc"], "moved");
    let (plain_ws, ack) = plain.join().expect("plain client");
    assert_eq!(ack["doc"], "moved");
    assert_eq!(entry.metrics().relay().upstream_failures(), 0);
    drop((doc_ws, plain_ws));
    entry.shutdown().expect("entry shuts down");
    owner.shutdown().expect("owner shuts down");
}

#[test]
fn relay_serves_here_when_the_router_names_this_node() {
    let _w = Watchdog::new("relay_serves_here_when_the_router_names_this_node", 60);
    let (entry, router) = entry_node_with(test_config(), Route::Pending);
    let a = entry.local_addr();
    // A router that answers with this node's own address means "local", never a relay loop.
    router.set_default(Route::Relay(a));
    let (_ws, ack) = join(a, "/ws/self", r#"{"type":"hello"}"#);
    assert_eq!(ack["doc"], "self");
    assert_eq!(entry.metrics().relay().started(), 0);
    drop(_ws);
    entry.shutdown().expect("entry shuts down");
}

#[test]
fn relay_to_an_owner_that_is_itself_a_cluster_node() {
    let _w = Watchdog::new("relay_to_an_owner_that_is_itself_a_cluster_node", 60);
    let path = secret_file("both", "a-secret-both-nodes-share");
    let mut owner_config = test_config();
    owner_config.cluster_secret_file = Some(path.clone());
    // As in a real cluster: the owner routes too (every document is local to it).
    let (owner, _owner_router) = entry_node_with(owner_config, Route::Local);
    let mut entry_config = test_config();
    entry_config.cluster_secret_file = Some(path);
    let (entry, _router) = entry_node_with(entry_config, Route::Relay(owner.local_addr()));
    let a = entry.local_addr();
    let (mut doc_ws, ack) = join(a, "/ws/both", r#"{"type":"hello"}"#);
    let replica = ack["replica"].as_u64().expect("replica");
    let (mut plain_ws, _) = join(a, "/ws", r#"{"type":"hello","doc":"both"}"#);
    send(&mut doc_ws, &ins(1, 1, replica, "null", "z"));
    assert_eq!(recv_json(&mut doc_ws)["type"], "op_echo");
    let seen = recv_json(&mut plain_ws);
    assert_eq!(seen["type"], "op_echo", "{seen}");
    assert_eq!(
        owner.metrics().relay().started(),
        0,
        "the owner relays nothing on"
    );
    assert_eq!(entry.metrics().relay().started(), 2);
    drop((doc_ws, plain_ws));
    entry.shutdown().expect("entry shuts down");
    owner.shutdown().expect("owner shuts down");
}

#[test]
fn relay_carries_tokens_and_their_refusals() {
    use collab_engine::auth::mint::{MintClaims, MintKey};
    use collab_engine::auth::{now_unix as auth_now, Role};
    let _w = Watchdog::new("relay_carries_tokens_and_their_refusals", 60);
    let secret = b"an HS256 secret for the relay tests, 32+ bytes\n";
    let key_file = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("relay-hs.key");
    std::fs::write(&key_file, secret).expect("write the key");
    let key = MintKey::hs256(secret).expect("key");
    let token = |doc: &str| {
        key.sign(
            &MintClaims::new("alice", doc, Role::Write, auth_now(), 3600),
            None,
        )
        .expect("sign")
    };
    // Every node has the same keys; the owner decides, the relaying node only relays.
    let mut owner_config = test_config();
    owner_config.auth.key_files = vec![key_file.clone()];
    let owner = server(owner_config);
    let mut entry_config = test_config();
    entry_config.auth.key_files = vec![key_file];
    let (entry, _router) = entry_node_with(entry_config, Route::Relay(owner.local_addr()));
    let a = entry.local_addr();
    let (_q, ack) = join(
        a,
        &format!("/ws/tok?token={}", token("tok")),
        r#"{"type":"hello"}"#,
    );
    assert_eq!(
        (ack["role"].as_str(), ack["user"].as_str()),
        (Some("write"), Some("alice"))
    );
    let hello = format!(
        r#"{{"type":"hello","doc":"tok","token":"{}"}}"#,
        token("tok")
    );
    let (_h, ack) = join(a, "/ws", &hello);
    assert_eq!(ack["role"], "write", "{ack}");
    // A token for another document: the owner's refusal reaches the client unchanged.
    for path in [
        format!("/ws/tok?token={}", token("other")),
        "/ws".to_owned(),
    ] {
        let mut ws = connect(a, &path);
        let hello = format!(
            r#"{{"type":"hello","doc":"tok","token":"{}"}}"#,
            token("other")
        );
        send(&mut ws, &hello);
        let (code, seen) = recv_until_close(&mut ws);
        assert_eq!(code, Some(CloseCode::Policy), "{path}");
        assert_eq!(seen[0]["code"], "unauthorized", "{path}: {seen:?}");
    }
    assert_eq!(entry.metrics().totals().docs_loaded, 0);
    drop((_q, _h));
    entry.shutdown().expect("entry shuts down");
    owner.shutdown().expect("owner shuts down");
}

#[test]
fn relay_refuses_past_relay_conns_max() {
    let _w = Watchdog::new("relay_refuses_past_relay_conns_max", 60);
    let owner = server(test_config());
    let mut config = test_config();
    config.relay_conns_max = 1;
    let (entry, _router) = entry_node_with(config, Route::Relay(owner.local_addr()));
    let a = entry.local_addr();
    let (_first, _) = join(a, "/ws/full", r#"{"type":"hello"}"#);
    for path in ["/ws/full", "/ws"] {
        let mut ws = connect(a, path);
        send(&mut ws, r#"{"type":"hello","doc":"full"}"#);
        let (code, seen) = recv_until_close(&mut ws);
        assert_eq!(code, Some(CloseCode::Again), "{path}");
        assert_eq!(seen[0]["code"], "unavailable", "{path}");
    }
    assert_eq!(entry.metrics().relay().refused_full(), 2);
    assert_eq!(metric(a, "collab_relay_refused_total"), 2);
    drop(_first);
    entry.shutdown().expect("entry shuts down");
    owner.shutdown().expect("owner shuts down");
}

/// An owner and an entry node that relays every document to it: what `relay_contract.rs` runs
/// the contract's tests against.
pub struct Pair {
    entry: ServerHandle,
    owner: ServerHandle,
}

impl Pair {
    /// The entry node's address: where the clients connect.
    pub fn local_addr(&self) -> SocketAddr {
        self.entry.local_addr()
    }

    /// Stops both nodes.
    pub fn shutdown(self) -> anyhow::Result<()> {
        self.entry.shutdown()?;
        self.owner.shutdown()
    }
}

/// Both nodes get `config`'s limits; the entry node keeps nothing (memory storage).
pub fn contract_pair(config: Config) -> Pair {
    let mut entry_config = config.clone();
    entry_config.storage = collab_engine::config::StorageKind::Memory;
    entry_config.database_url = None;
    let owner = server(config);
    let (entry, _router) = entry_node_with(entry_config, Route::Relay(owner.local_addr()));
    Pair { entry, owner }
}

#[test]
fn relay_carries_api_requests_and_ends_both_sides_on_a_half_close() {
    let _w = Watchdog::new("relay_carries_api_requests", 60);
    let owner = server(test_config());
    let (entry, _router) = entry_node(owner.local_addr());
    let a = entry.local_addr();
    // An HTTP request naming a document under /api/docs goes to the owner and its answer comes
    // back byte for byte (whatever the owner serves there).
    let request = "GET /api/docs/some%2Fdoc HTTP/1.1\r\nHost: x\r\nConnection: keep-alive\r\n\r\n";
    let direct = crate::util::http_get(owner.local_addr(), request);
    let relayed = crate::util::http_get(a, request);
    let status = |text: &str| text.lines().next().unwrap_or("").to_owned();
    assert_eq!(status(&relayed), status(&direct), "{relayed}");
    assert_eq!(entry.metrics().relay().started(), 1);
    // Other HTTP is answered by the entry node itself.
    let health = crate::util::http_get(a, "GET /health HTTP/1.1\r\nHost: x\r\n\r\n");
    assert!(health.starts_with("HTTP/1.1 200"), "{health}");
    assert_eq!(entry.metrics().relay().started(), 1);
    // A client that half-closes a relayed session ends it on both sides.
    let mut bytes = upgrade_head("/ws/half", "").into_bytes();
    bytes.extend_from_slice(&client_text_frame(r#"{"type":"hello"}"#));
    let (mut ws, head) = raw_upgrade(a, &bytes);
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert_eq!(recv_json(&mut ws)["type"], "hello_ack");
    let MaybeTlsStream::Plain(stream) = ws.get_mut() else {
        panic!("plain TCP");
    };
    stream
        .shutdown(std::net::Shutdown::Write)
        .expect("half-close");
    let mut rest = Vec::new();
    let _ = stream.read_to_end(&mut rest); // EOF (or a reset) ends it; a hang fails the watchdog.
    while entry.metrics().relay().active() > 0 {
        std::thread::sleep(Duration::from_millis(10));
    }
    entry.shutdown().expect("entry shuts down");
    owner.shutdown().expect("owner shuts down");
}
