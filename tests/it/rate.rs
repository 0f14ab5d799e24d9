//! Per-connection rate limits (`--msgs-per-second-max`, `--msgs-burst-max`): a message over the
//! budget gets `rate_limited` (with its `client_seq`), is not applied, counts as a refusal, and
//! other clients of the same document keep their own budgets.
//!
//! No timing assertions: the rate is 1 message a second and every burst is written with one
//! `write` (one flush) and read by the server within one turn (`reads_per_turn_max` above the
//! burst's size), on one reading of its clock.

use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::Message;

use collab_engine::crdt::Doc;
use collab_engine::protocol as proto;

use crate::util::{
    connect, recv_json, recv_until_close, send, server, test_config, Editor, Watchdog, Ws,
};

/// A server whose connections may send 1 message a second, 5 at once, and that reads a whole
/// burst in one turn.
fn limited_server() -> collab_engine::server::ServerHandle {
    let mut config = test_config();
    config.msgs_per_second_max = 1;
    config.msgs_burst_max = 5;
    config.reads_per_turn_max = 1_000;
    server(config)
}

/// Joins `doc` over a raw socket; returns the socket and the replica id it was given.
fn join_raw(addr: std::net::SocketAddr, doc: &str) -> (Ws, u64) {
    let mut ws = connect(addr, &format!("/ws/{doc}"));
    send(&mut ws, r#"{"type":"hello"}"#);
    let ack = recv_json(&mut ws);
    assert_eq!(ack["type"], "hello_ack", "{ack}");
    let replica = ack["replica"].as_u64().expect("hello_ack.replica");
    (ws, replica)
}

/// Writes every frame of `frames` and flushes once: one burst on the wire.
fn send_burst(ws: &mut Ws, frames: &[String]) {
    for frame in frames {
        ws.write(Message::text(frame.as_str()))
            .expect("queue a frame");
    }
    ws.flush().expect("flush the burst");
}

/// `n` op messages, client_seq 1..=n, each inserting one character at the end of `doc`.
fn inserts(doc: &mut Doc, replica: u64, chars: &str) -> Vec<String> {
    chars
        .chars()
        .enumerate()
        .map(|(i, c)| {
            let op = doc.insert_local(replica, doc.len(), &c.to_string());
            proto::encode_op(i as u64 + 1, &[op])
        })
        .collect()
}

#[test]
fn rate_limit_refuses_past_the_burst_and_spares_other_clients() {
    let _w = Watchdog::new(
        "rate_limit_refuses_past_the_burst_and_spares_other_clients",
        60,
    );
    let server = limited_server();
    let addr = server.local_addr();
    let (mut fast, fast_replica) = join_raw(addr, "rated");
    let (mut calm, calm_replica) = join_raw(addr, "rated");

    // 20 op messages back to back: the first 5 are applied, the other 15 refused in order.
    let mut fast_doc = Doc::new();
    let burst = inserts(&mut fast_doc, fast_replica, "abcdefghijklmnopqrst");
    send_burst(&mut fast, &burst);
    for client_seq in 1..=20u64 {
        let reply = recv_json(&mut fast);
        if client_seq <= 5 {
            assert_eq!(reply["type"], "op_echo", "{reply}");
            assert_eq!(reply["client_seq"], client_seq, "{reply}");
            assert_eq!(reply["server_seq"], client_seq, "{reply}");
        } else {
            assert_eq!(
                (reply["type"].as_str(), reply["code"].as_str()),
                (Some("error"), Some("rate_limited")),
                "{reply}"
            );
            assert_eq!(reply["client_seq"], client_seq, "{reply}");
        }
    }
    // Presence is limited too (no client_seq: it has none).
    send(&mut fast, r#"{"type":"presence","state":{"cursor":1}}"#);
    let reply = recv_json(&mut fast);
    assert_eq!(reply["code"], "rate_limited", "{reply}");
    assert!(reply.get("client_seq").is_none(), "{reply}");

    // The other client saw the 5 accepted ops only, and has its own full budget.
    for server_seq in 1..=5u64 {
        let echo = recv_json(&mut calm);
        assert_eq!(echo["type"], "op_echo", "{echo}");
        assert_eq!(echo["server_seq"], server_seq, "{echo}");
    }
    let mut calm_doc = Doc::new();
    let calm_burst = inserts(&mut calm_doc, calm_replica, "12345");
    send_burst(&mut calm, &calm_burst);
    for client_seq in 1..=5u64 {
        let echo = recv_json(&mut calm);
        assert_eq!(echo["type"], "op_echo", "{echo}");
        assert_eq!(echo["client_seq"], client_seq, "{echo}");
        assert_eq!(echo["server_seq"], 5 + client_seq, "{echo}");
    }

    // The document holds the 5 accepted ops of each and nothing of the refused ones.
    let reader = Editor::join(addr, "/ws/rated", r#"{"type":"hello"}"#);
    assert_eq!(reader.head, 10);
    let text = reader.doc.text();
    assert_eq!(text.len(), 10, "{text:?}");
    assert!(text.contains("abcde"), "{text:?}");
    assert!(text.contains("12345"), "{text:?}");
    assert!(!text.contains('f'), "{text:?}");
    server.shutdown().expect("clean shutdown");
}

#[test]
fn rate_limited_messages_count_as_refusals() {
    let _w = Watchdog::new("rate_limited_messages_count_as_refusals", 60);
    let server = limited_server();
    let (mut ws, replica) = join_raw(server.local_addr(), "rated-close");
    let mut doc = Doc::new();
    // 5 within the burst, then 100 over it: the 100th refusal closes with 1008.
    let burst = inserts(&mut doc, replica, &"x".repeat(105));
    send_burst(&mut ws, &burst);
    let (code, seen) = recv_until_close(&mut ws);
    assert_eq!(
        seen.len(),
        105,
        "every message is answered before the close"
    );
    assert!(seen[..5].iter().all(|m| m["type"] == "op_echo"));
    assert!(seen[5..].iter().all(|m| m["code"] == "rate_limited"));
    assert_eq!(code, Some(CloseCode::Policy));
    server.shutdown().expect("clean shutdown");
}
