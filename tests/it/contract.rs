//! The contract's "Rules in detail", one real-socket test per group of rules: each refusal gets
//! its code (with `client_seq` when the refused message was an op that carried one) and the
//! connection stays usable unless the rule names a close.

use serde_json::{json, Value};
use tungstenite::protocol::frame::coding::{CloseCode, Data, OpCode};
use tungstenite::protocol::frame::Frame;
use tungstenite::Message;

use crate::util::{connect, recv_json, recv_until_close, send, test_config, Watchdog, Ws};
// A single node (`util::server`), or, where `relay.rs` includes this file again, a node that owns
// none of the documents and relays every connection to the owner.
use super::contract_server as server;

/// Reads the next frame and checks it is an `error` with `code` and `client_seq`.
fn expect_error(ws: &mut Ws, code: &str, client_seq: Option<u64>, why: &str) {
    let reply = recv_json(ws);
    assert_eq!(reply["type"], "error", "{why}: {reply}");
    assert_eq!(reply["code"], code, "{why}: {reply}");
    assert!(reply["message"].is_string(), "{why}: {reply}");
    assert_eq!(reply["client_seq"].as_u64(), client_seq, "{why}: {reply}");
}

/// Joins `path` with `hello` and returns the socket and its `hello_ack`.
fn join(addr: std::net::SocketAddr, path: &str, hello: &str) -> (Ws, Value) {
    let mut ws = connect(addr, path);
    send(&mut ws, hello);
    let ack = recv_json(&mut ws);
    assert_eq!(ack["type"], "hello_ack", "{ack}");
    (ws, ack)
}

fn op(client_seq: u64, ops: &str) -> String {
    format!(r#"{{"type":"op","client_seq":{client_seq},"ops":[{ops}]}}"#)
}

#[test]
fn contract_paths_name_documents() {
    let _w = Watchdog::new("contract_paths_name_documents", 30);
    let server = server(test_config());
    let addr = server.local_addr();
    // Percent-decoded, `/` allowed, the query ignored; an explicit equal doc is fine.
    let (_a, ack) = join(
        addr,
        "/ws/a%2Fb/c%20%C3%BC?x=1&doc=zz",
        r#"{"type":"hello"}"#,
    );
    assert_eq!(ack["doc"], "a/b/c ü");
    let (_b, ack) = join(
        addr,
        "/ws/a%2Fb/c%20%C3%BC",
        r#"{"type":"hello","doc":"a/b/c ü"}"#,
    );
    assert_eq!(ack["doc"], "a/b/c ü");
    // `/ws/` and `/ws/?q` are plain `/ws`: the hello names the document.
    for path in ["/ws/", "/ws/?doc=x", "/ws?doc=x"] {
        let mut ws = connect(addr, path);
        send(&mut ws, r#"{"type":"hello"}"#);
        expect_error(&mut ws, "bad_message", None, path);
        send(&mut ws, r#"{"type":"hello","doc":"a/b/c ü"}"#);
        let ack = recv_json(&mut ws);
        assert_eq!(
            (&ack["type"], &ack["doc"]),
            (&json!("hello_ack"), &json!("a/b/c ü"))
        );
    }
    // The longest name fits in the path and in a hello.
    let long = "é".repeat(256);
    let encoded: String = long.bytes().map(|b| format!("%{b:02X}")).collect();
    let (_c, ack) = join(addr, &format!("/ws/{encoded}"), r#"{"type":"hello"}"#);
    assert_eq!(ack["doc"], long.as_str());
    let (_d, ack) = join(addr, "/ws", &json!({"type":"hello","doc":long}).to_string());
    assert_eq!(ack["doc"], long.as_str());
    server.shutdown().expect("clean shutdown");
}

#[test]
fn contract_hello_fields_are_validated_and_the_connection_stays_usable() {
    let _w = Watchdog::new("contract_hello_fields", 30);
    let server = server(test_config());
    let addr = server.local_addr();
    let too_long = "x".repeat(513);
    let bad_hellos = [
        r#"{"type":"hello","doc":""}"#.to_string(),
        json!({"type":"hello","doc":too_long}).to_string(),
        r#"{"type":"hello","doc":5}"#.to_string(),
        r#"{"type":"hello","doc":"d\ud800"}"#.to_string(),
        r#"{"type":"hello","replica":0}"#.to_string(),
        r#"{"type":"hello","replica":9007199254740992}"#.to_string(),
        r#"{"type":"hello","replica":-1}"#.to_string(),
        r#"{"type":"hello","replica":1.5}"#.to_string(),
        r#"{"type":"hello","replica":"1"}"#.to_string(),
        r#"{"type":"hello","since":-1}"#.to_string(),
        r#"{"type":"hello","since":"3"}"#.to_string(),
        r#"{"type":"hello","epoch":5}"#.to_string(),
        r#"{"type":"hello","epoch":["e"]}"#.to_string(),
    ];
    for (lamport, path) in [(0, "/ws/hello-fields"), (1, "/ws")] {
        let mut ws = connect(addr, path);
        for hello in &bad_hellos {
            send(&mut ws, hello);
            expect_error(&mut ws, "bad_message", None, hello);
        }
        // Still usable; the largest replica is valid, and `token` is ignored without auth.
        send(
            &mut ws,
            r#"{"type":"hello","doc":"hello-fields","replica":9007199254740991,"token":"t","x":{"y":1}}"#,
        );
        let ack = recv_json(&mut ws);
        assert_eq!(ack["type"], "hello_ack", "{ack}");
        assert_eq!(ack["replica"], 9007199254740991u64);
        assert!(ack.get("x").is_none(), "unknown fields are not echoed");
        // A second hello is refused and changes nothing.
        send(
            &mut ws,
            r#"{"type":"hello","doc":"hello-fields","replica":3}"#,
        );
        expect_error(&mut ws, "bad_message", None, "second hello");
        send(
            &mut ws,
            &op(
                1,
                &format!(
                    r#"{{"kind":"ins","id":[{lamport},9007199254740991],"after":null,"text":"a"}}"#
                ),
            ),
        );
        let echo = recv_json(&mut ws);
        assert_eq!(echo["replica"], 9007199254740991u64, "{echo}");
        drop(ws);
    }
    server.shutdown().expect("clean shutdown");
}

#[test]
fn contract_plain_ws_refusals_before_hello_keep_the_connection() {
    let _w = Watchdog::new("contract_plain_ws_refusals_before_hello", 30);
    let server = server(test_config());
    let addr = server.local_addr();
    let mut ws = connect(addr, "/ws");
    send(&mut ws, &op(4, r#"{"kind":"del","id":[1,1],"len":1}"#));
    expect_error(&mut ws, "not_joined", Some(4), "op before hello");
    send(&mut ws, r#"{"type":"presence","state":1}"#);
    expect_error(&mut ws, "not_joined", None, "presence before hello");
    send(&mut ws, "garbage");
    expect_error(&mut ws, "bad_message", None, "garbage");
    send(&mut ws, r#"{"type":"op","client_seq":5,"ops":[]}"#);
    expect_error(&mut ws, "bad_message", Some(5), "empty ops");
    ws.send(Message::binary(vec![1u8, 2])).expect("binary");
    expect_error(&mut ws, "bad_message", None, "binary");
    send(&mut ws, r#"{"type":"hello"}"#);
    expect_error(&mut ws, "bad_message", None, "hello without doc");
    ws.send(Message::Ping(vec![7u8].into())).expect("ping");
    send(&mut ws, r#"{"type":"hello","doc":"plain-ws"}"#);
    let ack = loop {
        match ws.read().expect("read") {
            Message::Text(text) => break serde_json::from_str::<Value>(&text).expect("JSON"),
            Message::Pong(payload) => assert_eq!(payload.as_ref(), &[7u8]),
            other => panic!("{other:?}"),
        }
    };
    assert_eq!(
        (&ack["type"], &ack["doc"]),
        (&json!("hello_ack"), &json!("plain-ws"))
    );

    // 100 refusals before a hello: the last is followed by a close 1008.
    let mut ws = connect(addr, "/ws");
    for _ in 0..100 {
        send(&mut ws, "{");
    }
    let (code, seen) = recv_until_close(&mut ws);
    assert_eq!(seen.len(), 100, "every refusal is answered");
    assert!(seen.iter().all(|m| m["code"] == "bad_message"));
    assert_eq!(code, Some(CloseCode::Policy));

    // Transport errors before a hello close as they do after it.
    let mut ws = connect(addr, "/ws");
    ws.send(Message::Frame(Frame::message(
        vec![b'{', 0xc3, b'}'],
        OpCode::Data(Data::Text),
        true,
    )))
    .expect("send");
    assert_eq!(recv_until_close(&mut ws).0, Some(CloseCode::Invalid));
    server.shutdown().expect("clean shutdown");
}

#[test]
fn contract_op_refusals_have_their_codes_and_change_nothing() {
    let _w = Watchdog::new("contract_op_refusals", 30);
    let server = server(test_config());
    let addr = server.local_addr();
    let (mut a, _) = join(addr, "/ws/op-codes", r#"{"type":"hello","replica":7}"#);
    let (mut b, _) = join(addr, "/ws/op-codes", r#"{"type":"hello","replica":8}"#);
    send(
        &mut a,
        &op(1, r#"{"kind":"ins","id":[0,7],"after":null,"text":"ab"}"#),
    );
    assert_eq!(recv_json(&mut a)["server_seq"], 1);
    assert_eq!(recv_json(&mut b)["server_seq"], 1);
    send(
        &mut b,
        &op(1, r#"{"kind":"ins","id":[10,8],"after":null,"text":"Z"}"#),
    );
    assert_eq!(recv_json(&mut a)["server_seq"], 2);
    assert_eq!(recv_json(&mut b)["server_seq"], 2);
    let del = r#"{"kind":"del","id":[0,7],"len":1}"#;
    let too_many = vec![del; 10_001].join(",");
    let cases: Vec<(String, &str)> = vec![
        // Shape: bad_message.
        (
            op(
                10,
                r#"{"kind":"ins","id":[9007199254740992,7],"after":null,"text":"x"}"#,
            ),
            "bad_message",
        ),
        (
            op(
                10,
                r#"{"kind":"ins","id":[5,7],"after":[0,9007199254740992],"text":"x"}"#,
            ),
            "bad_message",
        ),
        (
            op(10, r#"{"kind":"ins","id":[-1,7],"after":null,"text":"x"}"#),
            "bad_message",
        ),
        (
            op(10, r#"{"kind":"ins","id":[5,7,1],"after":null,"text":"x"}"#),
            "bad_message",
        ),
        (
            op(10, r#"{"kind":"ins","id":[5,7],"text":"x"}"#),
            "bad_message",
        ),
        (
            op(
                10,
                r#"{"kind":"ins","id":[5,7],"after":null,"text":"\ud800"}"#,
            ),
            "bad_message",
        ),
        (
            op(10, r#"{"kind":"ins","id":[5,7],"after":null,"text":5}"#),
            "bad_message",
        ),
        (op(10, r#"{"kind":"mv","id":[5,7],"len":1}"#), "bad_message"),
        (
            op(10, r#"{"kind":"del","id":[0,7],"len":1,"note":"\udbff"}"#),
            "bad_message",
        ),
        (
            op(10, r#"{"kind":"del","id":[0,7],"len":1.5}"#),
            "bad_message",
        ),
        (
            op(10, r#"{"kind":"del","id":[0,7],"len":"1"}"#),
            "bad_message",
        ),
        (op(10, r#"[1]"#), "bad_message"),
        (op(10, ""), "bad_message"),
        // Targets: unknown_id.
        (op(10, r#"{"kind":"del","id":[9,9],"len":1}"#), "unknown_id"),
        (op(10, r#"{"kind":"del","id":[0,7],"len":3}"#), "unknown_id"),
        (
            op(10, r#"{"kind":"ins","id":[5,7],"after":[4,9],"text":"x"}"#),
            "unknown_id",
        ),
        // Ids reused: id_conflict.
        (
            op(10, r#"{"kind":"ins","id":[0,7],"after":null,"text":"zz"}"#),
            "id_conflict",
        ),
        (
            op(10, r#"{"kind":"ins","id":[1,7],"after":null,"text":"bc"}"#),
            "id_conflict",
        ),
        // Invalid ops.
        (
            op(10, r#"{"kind":"ins","id":[5,8],"after":null,"text":"x"}"#),
            "invalid_op",
        ),
        (
            op(10, r#"{"kind":"ins","id":[5,7],"after":[10,8],"text":"x"}"#),
            "invalid_op",
        ),
        (
            op(10, r#"{"kind":"ins","id":[5,7],"after":null,"text":""}"#),
            "invalid_op",
        ),
        (op(10, r#"{"kind":"del","id":[0,7],"len":0}"#), "invalid_op"),
        (
            op(10, r#"{"kind":"del","id":[0,7],"len":-1}"#),
            "invalid_op",
        ),
        (
            op(
                10,
                r#"{"kind":"del","id":[0,7],"len":18446744073709551616}"#,
            ),
            "invalid_op",
        ),
        (
            op(
                10,
                r#"{"kind":"ins","id":[9007199254740990,7],"after":null,"text":"xyz"}"#,
            ),
            "invalid_op",
        ),
        (
            op(10, r#"{"kind":"del","id":[9007199254740990,7],"len":3}"#),
            "invalid_op",
        ),
        // Atomic: a valid op followed by an invalid one applies nothing.
        (
            op(
                10,
                r#"{"kind":"ins","id":[20,7],"after":[1,7],"text":"q"},{"kind":"del","id":[99,7],"len":1}"#,
            ),
            "unknown_id",
        ),
        (op(10, &too_many), "too_large"),
    ];
    for (message, code) in &cases {
        send(&mut a, message);
        let why = &message[..message.len().min(120)];
        expect_error(&mut a, code, Some(10), why);
    }
    // Not an op that carried a client_seq: no client_seq in the error.
    send(
        &mut a,
        r#"{"type":"op","ops":[{"kind":"del","id":[0,7],"len":1}]}"#,
    );
    expect_error(&mut a, "bad_message", None, "no client_seq");
    send(&mut a, r#"{"type":"op","client_seq":-3,"ops":[]}"#);
    expect_error(&mut a, "bad_message", None, "negative client_seq");
    // Nothing changed: the next op is server_seq 3, and only it reaches b.
    send(
        &mut a,
        &op(
            11,
            r#"{"kind":"ins","id":[2,7],"after":[1,7],"text":"c","extra":1}"#,
        ),
    );
    let echo = recv_json(&mut b);
    assert_eq!(
        echo,
        json!({"type":"op_echo","server_seq":3,"replica":7,"client_seq":11,
               "ops":[{"kind":"ins","id":[2,7],"after":[1,7],"text":"c"}]})
    );
    assert_eq!(recv_json(&mut a), echo, "the origin gets the same echo");
    // A delete that raced another (both targets already tombstones) and a resend: ack with
    // the current head to the sender alone, no server_seq taken.
    send(&mut b, &op(3, r#"{"kind":"del","id":[0,7],"len":1}"#));
    assert_eq!(recv_json(&mut b)["server_seq"], 4);
    assert_eq!(recv_json(&mut a)["server_seq"], 4);
    send(&mut a, &op(12, r#"{"kind":"del","id":[0,7],"len":1}"#));
    assert_eq!(
        recv_json(&mut a),
        json!({"type":"ack","client_seq":12,"server_seq":4})
    );
    send(
        &mut a,
        &op(11, r#"{"kind":"ins","id":[2,7],"after":[1,7],"text":"c"}"#),
    );
    assert_eq!(
        recv_json(&mut a),
        json!({"type":"ack","client_seq":11,"server_seq":4})
    );
    // Binary after joining: bad_message, still usable; b saw none of it.
    a.send(Message::binary(vec![0u8])).expect("binary");
    expect_error(&mut a, "bad_message", None, "binary");
    send(
        &mut a,
        &op(13, r#"{"kind":"ins","id":[3,7],"after":[2,7],"text":"d"}"#),
    );
    assert_eq!(recv_json(&mut b)["server_seq"], 5);
    assert_eq!(recv_json(&mut a)["server_seq"], 5);
    // Lamport 0 and the largest client_seq are valid.
    send(
        &mut b,
        &op(
            u64::MAX,
            r#"{"kind":"ins","id":[0,8],"after":null,"text":"z"}"#,
        ),
    );
    let echo = recv_json(&mut a);
    assert_eq!(
        (echo["server_seq"].as_u64(), echo["client_seq"].as_u64()),
        (Some(6), Some(u64::MAX))
    );
    server.shutdown().expect("clean shutdown");
}

#[test]
fn contract_presence_rules() {
    let _w = Watchdog::new("contract_presence_rules", 30);
    let server = server(test_config());
    let addr = server.local_addr();
    let (mut a, ack) = join(addr, "/ws/presence", r#"{"type":"hello","replica":1}"#);
    assert_eq!(ack["presence"], json!([]), "always present");
    let (mut b, _) = join(addr, "/ws/presence", r#"{"type":"hello","replica":2}"#);
    let (mut c, _) = join(addr, "/ws/presence", r#"{"type":"hello","replica":3}"#);
    // Exactly 4096 bytes re-encoded compactly fits, however much whitespace was sent.
    let fits = format!("\"{}\"", "x".repeat(4094));
    send(
        &mut a,
        &format!(r#"{{"type":"presence", "state" :   {fits}  }}"#),
    );
    for ws in [&mut b, &mut c] {
        assert_eq!(
            recv_json(ws),
            json!({"type":"presence","replica":1,"state":fits.trim_matches('"')})
        );
    }
    let spaced = format!("[{}1]", " ".repeat(8_000));
    send(
        &mut b,
        &format!(r#"{{"type":"presence","state":{spaced}}}"#),
    );
    assert_eq!(
        recv_json(&mut a),
        json!({"type":"presence","replica":2,"state":[1]})
    );
    assert_eq!(
        recv_json(&mut c),
        json!({"type":"presence","replica":2,"state":[1]})
    );
    let over = format!("\"{}\"", "x".repeat(4095));
    send(&mut a, &format!(r#"{{"type":"presence","state":{over}}}"#));
    expect_error(&mut a, "too_large", None, "presence over 4096");
    send(&mut a, r#"{"type":"presence","state":{"n":"\udc00"}}"#);
    expect_error(&mut a, "bad_message", None, "lone surrogate");
    send(&mut a, r#"{"type":"presence","state":{"n":1e400}}"#);
    expect_error(&mut a, "bad_message", None, "number out of range");
    send(&mut a, r#"{"type":"presence"}"#);
    expect_error(&mut a, "bad_message", None, "no state");
    // c clears its (never set) state: relayed as null, and c is never listed.
    send(&mut c, r#"{"type":"presence","state":null}"#);
    assert_eq!(
        recv_json(&mut a),
        json!({"type":"presence","replica":3,"state":null})
    );
    assert_eq!(
        recv_json(&mut b),
        json!({"type":"presence","replica":3,"state":null})
    );
    // Not back to the sender: a's next frame is the echo of its own op, after b's presence.
    send(
        &mut a,
        &op(1, r#"{"kind":"ins","id":[0,1],"after":null,"text":"a"}"#),
    );
    let echo = recv_json(&mut a);
    assert_eq!(echo["type"], "op_echo", "{echo}");
    assert_eq!(echo["server_seq"], 1, "presence takes no server_seq");
    assert_eq!(recv_json(&mut b)["server_seq"], 1);
    assert_eq!(recv_json(&mut c)["server_seq"], 1);
    // A joiner sees only the others with a non-null state (a and b), not c's null.
    let (mut d, ack) = join(addr, "/ws/presence", r#"{"type":"hello","replica":4}"#);
    assert_eq!(
        ack["presence"],
        json!([{"replica":1,"state":fits.trim_matches('"')},{"replica":2,"state":[1]}])
    );
    // c leaves without a state: nobody hears; b leaves with one: the others get null.
    drop(c);
    drop(b);
    for ws in [&mut a, &mut d] {
        assert_eq!(
            recv_json(ws),
            json!({"type":"presence","replica":2,"state":null})
        );
    }
    server.shutdown().expect("clean shutdown");
}

#[test]
fn contract_takeover_drops_the_old_connections_later_ops() {
    let _w = Watchdog::new("contract_takeover", 30);
    let server = server(test_config());
    let addr = server.local_addr();
    let (mut watcher, _) = join(addr, "/ws/takeover-ops", r#"{"type":"hello","replica":1}"#);
    let (mut old, _) = join(addr, "/ws/takeover-ops", r#"{"type":"hello","replica":5}"#);
    send(
        &mut old,
        &op(1, r#"{"kind":"ins","id":[0,5],"after":null,"text":"a"}"#),
    );
    assert_eq!(recv_json(&mut watcher)["server_seq"], 1);
    let (mut new, ack) = join(addr, "/ws/takeover-ops", r#"{"type":"hello","replica":5}"#);
    assert_eq!(
        (ack["replica"].as_u64(), ack["head"].as_u64()),
        (Some(5), Some(1))
    );
    // The old connection, after the new hello_ack: its op is never applied.
    let _ = old.send(Message::text(op(
        2,
        r#"{"kind":"ins","id":[1,5],"after":[0,5],"text":"OLD"}"#,
    )));
    let (code, seen) = recv_until_close(&mut old);
    assert_eq!(code, Some(CloseCode::Policy));
    assert!(
        seen.iter()
            .all(|m| m["type"] == "op_echo" && m["server_seq"] == 1),
        "{seen:?}"
    );
    send(
        &mut new,
        &op(2, r#"{"kind":"ins","id":[1,5],"after":[0,5],"text":"new"}"#),
    );
    let echo = recv_json(&mut watcher);
    assert_eq!(
        (echo["server_seq"].as_u64(), echo["ops"][0]["text"].as_str()),
        (Some(2), Some("new"))
    );
    assert_eq!(recv_json(&mut new)["server_seq"], 2);
    // A joiner sees "anew", never "OLD".
    let (_late, ack) = join(addr, "/ws/takeover-ops", r#"{"type":"hello"}"#);
    let runs = ack["snapshot"]["runs"].as_array().expect("runs");
    let text: String = runs.iter().filter_map(|run| run["text"].as_str()).collect();
    assert_eq!(text, "anew", "{ack}");
    server.shutdown().expect("clean shutdown");
}

#[test]
fn contract_message_limits_close_1009() {
    let _w = Watchdog::new("contract_message_limits_close_1009", 30);
    let mut config = test_config();
    config.message_bytes_max = 64 * 1024;
    let server = server(config);
    let addr = server.local_addr();
    // A message just under the limit is served (and refused for its content, not its size).
    let (mut ws, _) = join(addr, "/ws/limits", r#"{"type":"hello"}"#);
    let filler = "x".repeat(64 * 1024 - 200);
    send(
        &mut ws,
        &format!(r#"{{"type":"presence","state":"{filler}"}}"#),
    );
    expect_error(&mut ws, "too_large", None, "big presence");
    // Over it: 1009, on a joined connection and before a hello on plain /ws.
    send(&mut ws, &"y".repeat(64 * 1024 + 1));
    assert_eq!(recv_until_close(&mut ws).0, Some(CloseCode::Size));
    let mut ws = connect(addr, "/ws");
    send(&mut ws, &"y".repeat(64 * 1024 + 1));
    assert_eq!(recv_until_close(&mut ws).0, Some(CloseCode::Size));
    server.shutdown().expect("clean shutdown");
}

#[test]
fn contract_assigned_replicas_survive_an_edit_by_the_top_replica() {
    let _w = Watchdog::new("contract_assigned_replicas_top", 30);
    let server = server(test_config());
    let addr = server.local_addr();
    let (mut top, _) = join(
        addr,
        "/ws/top-replica",
        r#"{"type":"hello","replica":9007199254740991}"#,
    );
    send(
        &mut top,
        &op(
            1,
            r#"{"kind":"ins","id":[0,9007199254740991],"after":null,"text":"a"}"#,
        ),
    );
    assert_eq!(recv_json(&mut top)["server_seq"], 1);
    // A replica is still assigned, fresh, and it can edit.
    let (mut fresh, ack) = join(addr, "/ws/top-replica", r#"{"type":"hello"}"#);
    let replica = ack["replica"].as_u64().expect("replica");
    assert!((1..9007199254740991).contains(&replica), "{ack}");
    send(
        &mut fresh,
        &op(
            1,
            &format!(
                r#"{{"kind":"ins","id":[1,{replica}],"after":[0,9007199254740991],"text":"b"}}"#
            ),
        ),
    );
    assert_eq!(recv_json(&mut fresh)["server_seq"], 2);
    server.shutdown().expect("clean shutdown");
}

#[test]
fn contract_resend_at_the_document_size_limit_is_acked() {
    let _w = Watchdog::new("contract_resend_at_the_size_limit", 30);
    let mut config = test_config();
    config.doc_chars_max = 3;
    let server = server(config);
    let addr = server.local_addr();
    let (mut ws, _) = join(addr, "/ws/size-limit", r#"{"type":"hello","replica":1}"#);
    let fill = op(1, r#"{"kind":"ins","id":[0,1],"after":null,"text":"abc"}"#);
    send(&mut ws, &fill);
    assert_eq!(recv_json(&mut ws)["server_seq"], 1);
    send(&mut ws, &fill);
    assert_eq!(
        recv_json(&mut ws),
        json!({"type":"ack","client_seq":1,"server_seq":1})
    );
    send(
        &mut ws,
        &op(2, r#"{"kind":"ins","id":[3,1],"after":[2,1],"text":"d"}"#),
    );
    expect_error(&mut ws, "too_large", Some(2), "over the size limit");
    server.shutdown().expect("clean shutdown");
}
