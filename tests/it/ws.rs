//! The contract end to end over real sockets: every message type, routing over shards,
//! concurrent editing, reconnects, takeover, slow consumers.

use std::time::Duration;

use collab_engine::protocol::ServerMessage;
use tungstenite::protocol::frame::coding::CloseCode;

use crate::util::{
    connect, connect_with_small_rcvbuf, http_get, recv_json, recv_until_close, send, server,
    test_config, warnings_containing, Editor, Watchdog,
};

const INS_A: &str = r#"{"type":"op","client_seq":1,"ops":[{"kind":"ins","id":[0,REPLICA],"after":null,"text":"ab"}]}"#;

fn hello(doc: &str) -> String {
    collab_engine::protocol::encode_hello(Some(doc), None, None, None, None)
}

#[test]
fn ws_every_message_type_and_field() {
    let _w = Watchdog::new("ws_every_message_type_and_field", 30);
    let server = server(test_config());
    let addr = server.local_addr();
    let mut a = connect(addr, "/ws/fields");
    send(&mut a, r#"{"type":"hello","unknown":1}"#);
    let ack = recv_json(&mut a);
    assert_eq!(ack["type"], "hello_ack");
    assert_eq!(ack["doc"], "fields");
    assert_eq!(ack["head"], 0);
    assert_eq!(ack["strategy"], "snapshot");
    assert_eq!(ack["snapshot"]["runs"], serde_json::json!([]));
    assert_eq!(ack["presence"], serde_json::json!([]));
    assert!(
        ack["epoch"].as_str().is_some_and(|e| !e.is_empty()),
        "{ack}"
    );
    let replica_a = ack["replica"].as_u64().expect("replica");
    assert!(replica_a >= 1);

    let mut b = connect(addr, "/ws");
    send(&mut b, r#"{"type":"hello","doc":"fields"}"#);
    let ack_b = recv_json(&mut b);
    assert_eq!(ack_b["epoch"], ack["epoch"]);
    let replica_b = ack_b["replica"].as_u64().expect("replica");
    assert_ne!(replica_a, replica_b, "assigned replicas are fresh");

    // op -> op_echo to both, with every field.
    send(&mut a, &INS_A.replace("REPLICA", &replica_a.to_string()));
    for ws in [&mut a, &mut b] {
        let echo = recv_json(ws);
        assert_eq!(echo["type"], "op_echo", "{echo}");
        assert_eq!(echo["server_seq"], 1);
        assert_eq!(echo["replica"], replica_a);
        assert_eq!(echo["client_seq"], 1);
        assert_eq!(echo["ops"][0]["text"], "ab");
        assert_eq!(echo["ops"][0]["id"], serde_json::json!([0, replica_a]));
        assert!(echo["ops"][0]["after"].is_null());
    }
    // The same message again changes nothing: ack to the sender alone.
    send(&mut a, &INS_A.replace("REPLICA", &replica_a.to_string()));
    let ack_msg = recv_json(&mut a);
    assert_eq!(
        ack_msg,
        serde_json::json!({"type":"ack","client_seq":1,"server_seq":1})
    );

    // presence: to the others, not back to the sender.
    send(&mut b, r#"{"type":"presence","state":{"cursor": 1}}"#);
    let p = recv_json(&mut a);
    assert_eq!(
        p,
        serde_json::json!({"type":"presence","replica":replica_b,"state":{"cursor":1}})
    );

    // Refusals with client_seq; the connection stays usable.
    let foreign = format!(
        r#"{{"type":"op","client_seq":5,"ops":[{{"kind":"ins","id":[9,{}],"after":null,"text":"x"}}]}}"#,
        replica_a + 1000
    );
    send(&mut a, &foreign);
    let err = recv_json(&mut a);
    assert_eq!(
        (
            err["type"].as_str(),
            err["code"].as_str(),
            err["client_seq"].as_u64()
        ),
        (Some("error"), Some("invalid_op"), Some(5)),
        "{err}"
    );
    assert!(err["message"].is_string());
    let unknown = format!(
        r#"{{"type":"op","client_seq":6,"ops":[{{"kind":"ins","id":[50,{replica_a}],"after":[40,77],"text":"x"}}]}}"#
    );
    send(&mut a, &unknown);
    let err = recv_json(&mut a);
    assert_eq!(
        (err["code"].as_str(), err["client_seq"].as_u64()),
        (Some("unknown_id"), Some(6)),
        "{err}"
    );
    send(&mut a, r#"{"type":"op","client_seq":7,"ops":[]}"#);
    assert_eq!(recv_json(&mut a)["code"], "bad_message");
    send(&mut a, &hello("fields"));
    assert_eq!(recv_json(&mut a)["code"], "bad_message", "second hello");
    // Still usable: a delete is echoed to both.
    send(
        &mut a,
        &format!(
            r#"{{"type":"op","client_seq":8,"ops":[{{"kind":"del","id":[1,{replica_a}],"len":1}}]}}"#
        ),
    );
    assert_eq!(recv_json(&mut a)["server_seq"], 2);
    assert_eq!(recv_json(&mut b)["server_seq"], 2);

    // A late joiner sees the text and b's presence.
    let mut c = connect(addr, "/ws/fields");
    send(&mut c, r#"{"type":"hello","doc":"fields"}"#);
    let ack_c = recv_json(&mut c);
    assert_eq!(ack_c["head"], 2);
    assert_eq!(
        ack_c["snapshot"]["runs"],
        serde_json::json!([{"id":[0,replica_a],"text":"a"},{"id":[1,replica_a],"deleted":1}])
    );
    assert_eq!(
        ack_c["presence"],
        serde_json::json!([{"replica":replica_b,"state":{"cursor":1}}])
    );

    // b leaves: the others get its presence cleared.
    drop(b);
    for ws in [&mut a, &mut c] {
        let p = recv_json(ws);
        assert_eq!(
            p,
            serde_json::json!({"type":"presence","replica":replica_b,"state":null})
        );
    }
    server.shutdown().expect("clean shutdown");
}

#[test]
fn ws_many_docs_over_several_shards() {
    let _w = Watchdog::new("ws_many_docs_over_several_shards", 60);
    let mut config = test_config();
    config.shards = 4;
    let server = server(config);
    let addr = server.local_addr();
    const DOCS: usize = 24;
    let mut editors = Vec::new();
    for d in 0..DOCS {
        let doc = format!("many/doc {d}");
        let path = match d % 3 {
            0 => format!("/ws/many%2Fdoc%20{d}"),
            1 => "/ws".to_owned(),
            _ => "/ws/?ignored=query".to_owned(), // An empty name is plain /ws.
        };
        let first = Editor::join(addr, &path, &hello(&doc));
        let second = Editor::join(addr, "/ws", &hello(&doc));
        editors.push((doc, first, second));
    }
    for (doc, first, second) in &mut editors {
        first.edit(0, 0, doc);
        first.settle();
        second.catch_up(1);
        assert_eq!(second.doc.text(), *doc);
    }
    // /health counts the documents once the shards publish (every 250 ms).
    loop {
        let health = http_get(addr, "GET /health HTTP/1.1\r\n\r\n");
        let body = health.split("\r\n\r\n").nth(1).expect("body").to_owned();
        let json: serde_json::Value = serde_json::from_str(&body).expect("json");
        if json["documents"] == DOCS && json["connections"] == 2 * DOCS {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    drop(editors);
    server.shutdown().expect("clean shutdown");
}

/// `(pos, del, ins)` patches: from a real trace when `tests/data` has one, else generated.
fn patches(n: usize) -> Vec<(usize, usize, String)> {
    if let Ok(trace) = collab_engine::trace::EditingTrace::bundled("seph-blog1") {
        return trace
            .patches
            .into_iter()
            .take(n)
            .map(|p| (p.pos, p.delete, p.insert))
            .collect();
    }
    let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let mut len = 0usize;
    (0..n)
        .map(|_| {
            let pos = (next() as usize) % (len + 1);
            let del = if next() % 4 == 0 {
                (next() as usize % 3).min(len - pos)
            } else {
                0
            };
            let ins: String = (0..(next() % 5))
                .map(|i| char::from(b'a' + ((i + next()) % 26) as u8))
                .collect();
            len = len - del + ins.chars().count();
            (pos, del, ins)
        })
        .collect()
}

#[test]
fn ws_concurrent_editors_converge() {
    let _w = Watchdog::new("ws_concurrent_editors_converge", 120);
    let server = server(test_config());
    let addr = server.local_addr();
    const EDITORS: usize = 4;
    const PER_EDITOR: usize = 150;
    const WINDOW: usize = 4;
    let all = patches(EDITORS * PER_EDITOR);
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    let mut target_txs = Vec::new();
    let mut threads = Vec::new();
    for e in 0..EDITORS {
        let mine: Vec<_> = all.iter().skip(e).step_by(EDITORS).cloned().collect();
        let done_tx = done_tx.clone();
        let (target_tx, target_rx) = std::sync::mpsc::channel::<u64>();
        target_txs.push(target_tx);
        threads.push(std::thread::spawn(move || {
            let mut editor = Editor::join(addr, "/ws/converge", &hello("converge"));
            for (pos, del, ins) in mine {
                while editor.unacked.len() >= WINDOW {
                    editor.recv();
                }
                editor.edit(pos, del, &ins);
            }
            editor.settle();
            done_tx.send(()).expect("main waits");
            let target = target_rx.recv().expect("target head");
            editor.catch_up(target);
            let seqs = editor.seqs.clone();
            (editor.doc.text(), seqs, editor.head)
        }));
    }
    for _ in 0..EDITORS {
        done_rx.recv().expect("editor done");
    }
    let late = Editor::join(addr, "/ws/converge", &hello("converge"));
    assert!(late.head > 0);
    for tx in &target_txs {
        tx.send(late.head).expect("editor waits");
    }
    for thread in threads {
        let (text, seqs, head) = thread.join().expect("editor passes");
        assert_eq!(head, late.head);
        assert_eq!(
            text,
            late.doc.text(),
            "every replica converges to the late joiner's snapshot"
        );
        let first = seqs.first().copied().unwrap_or(1);
        assert!(
            seqs.iter().zip(first..).all(|(s, expected)| *s == expected),
            "gap-free, ordered"
        );
    }
    server.shutdown().expect("clean shutdown");
}

#[test]
fn ws_reconnect_with_since_replays_or_snapshots_and_resends_apply_once() {
    let _w = Watchdog::new("ws_reconnect_with_since", 60);
    let mut config = test_config();
    config.replay_window_ops = 5;
    let server = server(config);
    let addr = server.local_addr();
    let mut a = Editor::join(addr, "/ws/reconnect", &hello("reconnect"));
    let mut b = Editor::join(addr, "/ws/reconnect", &hello("reconnect"));
    a.edit(0, 0, "hello");
    a.settle();
    b.catch_up(1);
    let (since, epoch, replica) = (b.head, b.epoch.clone(), b.replica);
    // b goes away with an op it never saw acknowledged (sent, then dropped before reading).
    b.edit(5, 0, " world");
    let resend = b.unacked.values().next().expect("unacked").clone();
    b.ws.close(None).expect("close");
    drop(b);
    a.catch_up(2);
    // Two more ops while b is away: still within the window.
    a.edit(0, 0, ">");
    a.edit(0, 0, ">");
    a.settle();
    let hello_back = collab_engine::protocol::encode_hello(
        Some("reconnect"),
        Some(replica),
        Some(since),
        Some(&epoch),
        None,
    );
    let mut ws = connect(addr, "/ws/reconnect");
    send(&mut ws, &hello_back);
    let ack = recv_json(&mut ws);
    assert_eq!(ack["strategy"], "replay", "{ack}");
    assert_eq!(ack["ops"].as_array().map(Vec::len), Some(3));
    assert_eq!(ack["ops"][0]["type"], "op_echo");
    assert_eq!(ack["ops"][0]["server_seq"], since + 1);
    // The resend is already integrated: ack, no new server_seq, no duplicated text.
    send(&mut ws, &resend);
    let reply = recv_json(&mut ws);
    assert_eq!(reply["type"], "ack", "{reply}");
    assert_eq!(reply["server_seq"], 4);
    drop(ws);

    // Far behind: more ops than the window holds -> snapshot.
    for _ in 0..6 {
        a.edit(0, 0, "x");
    }
    a.settle();
    let mut back = Editor::join(
        addr,
        "/ws/reconnect",
        &collab_engine::protocol::encode_hello(
            Some("reconnect"),
            Some(replica),
            Some(since),
            Some(&epoch),
            None,
        ),
    );
    assert_eq!(
        back.doc.text(),
        a.doc.text(),
        "snapshot carries the whole text"
    );
    assert_eq!(back.doc.text().matches("world").count(), 1);
    // Wrong epoch -> snapshot too; since past head -> snapshot.
    for (since, epoch) in [(1, "not-the-epoch"), (1_000, epoch.as_str())] {
        let mut ws = connect(addr, "/ws/reconnect");
        send(
            &mut ws,
            &collab_engine::protocol::encode_hello(None, None, Some(since), Some(epoch), None),
        );
        assert_eq!(recv_json(&mut ws)["strategy"], "snapshot");
    }
    back.edit(0, 0, "!");
    back.settle();
    server.shutdown().expect("clean shutdown");
}

#[test]
fn ws_takeover_closes_the_old_connection_replaced() {
    let _w = Watchdog::new("ws_takeover", 30);
    let server = server(test_config());
    let addr = server.local_addr();
    let mut watcher = Editor::join(addr, "/ws/takeover", &hello("takeover"));
    let mut old = Editor::join(addr, "/ws/takeover", &hello("takeover"));
    send(&mut old.ws, r#"{"type":"presence","state":"here"}"#);
    match watcher.recv() {
        ServerMessage::Presence {
            replica,
            state_json,
        } => assert_eq!((replica, state_json.as_str()), (old.replica, "\"here\"")),
        other => panic!("{other:?}"),
    }
    let new = Editor::join(
        addr,
        "/ws/takeover",
        &collab_engine::protocol::encode_hello(
            Some("takeover"),
            Some(old.replica),
            None,
            None,
            None,
        ),
    );
    assert_eq!(new.replica, old.replica);
    let (code, _) = recv_until_close(&mut old.ws);
    assert_eq!(code, Some(CloseCode::Policy));
    match watcher.recv() {
        ServerMessage::Presence {
            replica,
            state_json,
        } => assert_eq!((replica, state_json.as_str()), (old.replica, "null")),
        other => panic!("{other:?}"),
    }
    server.shutdown().expect("clean shutdown");
}

#[test]
fn ws_slow_reader_is_closed_1013_and_others_are_undisturbed() {
    let _w = Watchdog::new("ws_slow_reader", 120);
    let mut config = test_config();
    config.outbound_bytes_max = 64 * 1024;
    config.handshake_timeout = Duration::from_secs(60); // Also the close linger.
    let server = server(config);
    let addr = server.local_addr();
    let mut slow = Editor::join(addr, "/ws/slow", &hello("slow"));
    let mut writer = Editor::join(addr, "/ws/slow", &hello("slow"));
    let observer = Editor::join(addr, "/ws/slow", &hello("slow"));
    const PRESENCE: usize = 3000;
    // The observer keeps up (the writer stays a few messages ahead of it), so only the
    // reader that never reads falls behind, however slowly this machine runs the test.
    const AHEAD_MAX: usize = 8;
    let observed = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let state = format!("\"{}\"", "p".repeat(4000));
    let observed_by_thread = observed.clone();
    let observing = std::thread::spawn(move || {
        let mut observer = observer;
        let mut n_presence = 0;
        while n_presence < PRESENCE || observer.head < 20 {
            if let ServerMessage::Presence { .. } = observer.recv() {
                n_presence += 1;
                observed_by_thread.store(n_presence, std::sync::atomic::Ordering::Release);
            }
        }
        observer
    });
    for i in 0..PRESENCE {
        while i > observed.load(std::sync::atomic::Ordering::Acquire) + AHEAD_MAX {
            std::thread::sleep(Duration::from_millis(1));
        }
        send(
            &mut writer.ws,
            &format!(r#"{{"type":"presence","state":{state}}}"#),
        );
        if i % 150 == 0 {
            writer.edit(0, 0, "edit");
        }
    }
    writer.settle();
    let observer = observing.join().expect("observer gets everything");
    assert_eq!(observer.doc.text(), writer.doc.text());
    let (code, _) = recv_until_close(&mut slow.ws);
    assert_eq!(code, Some(CloseCode::Again));
    server.shutdown().expect("clean shutdown");
}

#[test]
fn ws_idle_document_unloads_and_reloads_from_storage() {
    let _w = Watchdog::new("ws_idle_document_unloads_and_reloads_from_storage", 60);
    let mut config = test_config();
    config.idle_unload = Duration::from_millis(100);
    config.snapshot_every_ops = 3;
    let server = server(config);
    let addr = server.local_addr();
    let mut a = Editor::join(addr, "/ws/unload", &hello("unload"));
    for i in 0..7 {
        a.edit(i, 0, "z");
    }
    a.edit(2, 3, "");
    a.settle();
    let (text, head, epoch) = (a.doc.text(), a.head, a.epoch.clone());
    a.ws.close(None).expect("close");
    drop(a);
    loop {
        let health = http_get(addr, "GET /health HTTP/1.1\r\n\r\n");
        if health.contains("\"documents\":0") {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let b = Editor::join(addr, "/ws/unload", &hello("unload"));
    assert_eq!(
        (b.doc.text(), b.head, b.epoch.as_str()),
        (text, head, epoch.as_str())
    );
    server.shutdown().expect("clean shutdown");
}

#[test]
fn ws_connection_limit_per_shard_closes_1013() {
    let _w = Watchdog::new("ws_connection_limit_per_shard_closes_1013", 30);
    let mut config = test_config();
    config.shards = 1;
    config.conns_per_shard_max = 2;
    let server = server(config);
    let addr = server.local_addr();
    let _a = Editor::join(addr, "/ws/full", &hello("full"));
    let _b = Editor::join(addr, "/ws/full", &hello("full"));
    let mut c = connect(addr, "/ws/full");
    let (code, seen) = recv_until_close(&mut c);
    assert!(seen.is_empty());
    assert_eq!(code, Some(CloseCode::Again));
    server.shutdown().expect("clean shutdown");
}

/// A connection flood at the per-shard limit gets one warning line a second (with a count),
/// not one per refused connection.
#[test]
fn ws_connection_limit_refusals_do_not_flood_the_log() {
    let _w = Watchdog::new("ws_connection_limit_refusals_do_not_flood_the_log", 60);
    let mut config = test_config();
    config.shards = 1;
    // A limit no other test uses, so that only this test's lines match.
    config.conns_per_shard_max = 3;
    let server = server(config);
    let addr = server.local_addr();
    let _held: Vec<Editor> = (0..3)
        .map(|_| Editor::join(addr, "/ws/flood", &hello("flood")))
        .collect();
    let started = std::time::Instant::now();
    const REFUSED: usize = 100;
    for _ in 0..REFUSED {
        let mut ws = connect(addr, "/ws/flood");
        let (code, _) = recv_until_close(&mut ws);
        assert_eq!(code, Some(CloseCode::Again));
    }
    let elapsed = started.elapsed();
    let lines = warnings_containing("at the limit of 3 connections");
    assert!(!lines.is_empty(), "the refusals are logged");
    // One line a second at most: a bound that follows from the limiter, whatever the speed.
    assert!(
        lines.len() as u64 <= elapsed.as_secs() + 1,
        "{} lines for {REFUSED} refusals in {elapsed:?}: {lines:?}",
        lines.len()
    );
    server.shutdown().expect("clean shutdown");
}

/// Past `--docs-per-shard-max` loaded documents, a hello for another one first unloads a
/// document without clients; when every one has clients it gets `overloaded` and a close 1013,
/// and documents already loaded keep serving.
#[test]
fn ws_document_limit_per_shard() {
    let _w = Watchdog::new("ws_document_limit_per_shard", 30);
    let mut config = test_config();
    config.shards = 1;
    config.docs_per_shard_max = 2;
    let server = server(config);
    let addr = server.local_addr();
    let mut a = Editor::join(addr, "/ws/cap-a", &hello("cap-a"));
    a.edit(0, 0, "kept");
    a.settle();
    let mut b = Editor::join(addr, "/ws/cap-b", &hello("cap-b"));
    // Both loaded documents have clients: a third is refused, on both routes.
    for (path, doc) in [("/ws/cap-c", "cap-c"), ("/ws", "cap-c")] {
        let mut c = connect(addr, path);
        send(&mut c, &hello(doc));
        let (code, seen) = recv_until_close(&mut c);
        assert_eq!(seen.len(), 1, "{seen:?}");
        assert_eq!(seen[0]["type"], "error");
        assert_eq!(seen[0]["code"], "overloaded");
        assert_eq!(code, Some(CloseCode::Again));
    }
    // A second client of a loaded document is no new document.
    let b2 = Editor::join(addr, "/ws/cap-b", &hello("cap-b"));
    assert!(b2.replica >= 1);
    b.edit(0, 0, "b");
    b.settle();
    // cap-a loses its only client (close handshake finished: the server processed it), so
    // it is unloaded to make room for cap-c.
    a.ws.close(None).expect("close");
    while a.ws.read().is_ok() {}
    let mut c = Editor::join(addr, "/ws/cap-c", &hello("cap-c"));
    assert!(c.replica >= 1);
    // cap-a's state was durable when it left memory: free cap-c the same way and reload it.
    c.ws.close(None).expect("close");
    while c.ws.read().is_ok() {}
    let a2 = Editor::join(addr, "/ws/cap-a", &hello("cap-a"));
    assert_eq!(a2.doc.text(), "kept");
    server.shutdown().expect("clean shutdown");
}

#[test]
fn ws_silent_connection_is_pinged_then_dropped() {
    let _w = Watchdog::new("ws_silent_connection_is_pinged_then_dropped", 30);
    let mut config = test_config();
    config.idle_timeout = Duration::from_millis(200);
    let server = server(config);
    let addr = server.local_addr();
    let mut ws = connect(addr, "/ws/idle");
    send(&mut ws, r#"{"type":"hello"}"#);
    // Never read (so never answer the ping) until the server gave up on us: /health shows
    // the connection (metrics are published every 250 ms), then no more.
    for connections in ["\"connections\":1", "\"connections\":0"] {
        while !http_get(addr, "GET /health HTTP/1.1\r\n\r\n").contains(connections) {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    let mut saw_ping = false;
    loop {
        match ws.read() {
            Ok(tungstenite::Message::Ping(_)) => saw_ping = true,
            Ok(_) => {}
            Err(_) => break,
        }
    }
    assert!(saw_ping, "the server pinged before dropping");
    server.shutdown().expect("clean shutdown");
}

#[test]
fn ws_snapshot_larger_than_the_message_limit_reaches_a_joiner() {
    let _w = Watchdog::new("ws_snapshot_larger_than_the_message_limit", 60);
    let mut config = test_config();
    config.message_bytes_max = 64 * 1024;
    config.outbound_bytes_max = 64 * 1024;
    let server = server(config);
    let addr = server.local_addr();
    let mut writer = Editor::join(addr, "/ws/big", &hello("big"));
    for i in 0..6 {
        let chunk: String = std::iter::repeat(char::from(b'a' + i))
            .take(30_000)
            .collect();
        let end = writer.doc.len();
        writer.edit(end, 0, &chunk);
        writer.settle();
    }
    // The limit bounds what clients send; the server's own frames (a 180 KB snapshot here)
    // may be bigger, and one frame alone never counts as falling behind.
    let joiner = Editor::join(addr, "/ws/big", &hello("big"));
    assert_eq!(joiner.doc.text(), writer.doc.text());
    assert_eq!(joiner.doc.len(), 180_000);
    server.shutdown().expect("clean shutdown");
}

/// A `hello_ack` bigger than what one `sendmsg` takes (loopback takes at most about 4 MB) is
/// written over several flushes; while it is the only frame queued it never counts against
/// `--outbound-bytes-max`, so the joiner is not closed 1013 (found in review).
#[test]
fn ws_snapshot_larger_than_one_send_and_the_outbound_limit_reaches_a_joiner() {
    let _w = Watchdog::new("ws_snapshot_larger_than_one_send", 120);
    let mut config = test_config();
    config.outbound_bytes_max = 64 * 1024;
    let server = server(config);
    let addr = server.local_addr();
    let mut writer = Editor::join(addr, "/ws/huge", &hello("huge"));
    for i in 0..6 {
        let chunk: String = std::iter::repeat(char::from(b'a' + i))
            .take(1_000_000)
            .collect();
        let end = writer.doc.len();
        writer.edit(end, 0, &chunk);
        writer.settle();
    }
    // A joiner that does not read for a while: the server's flush stops mid-frame on
    // WouldBlock, with millions of bytes of the one frame still queued.
    let mut slow = connect_with_small_rcvbuf(addr, "/ws/huge");
    send(&mut slow, &hello("huge"));
    std::thread::sleep(std::time::Duration::from_millis(800));
    let ack = recv_json(&mut slow);
    assert_eq!(ack["type"], "hello_ack", "{}", ack["type"]);
    assert_eq!(ack["head"], 6);
    // The connection is still served: its op is echoed (a 1013 close would end it here).
    let replica = ack["replica"].as_u64().expect("replica");
    send(
        &mut slow,
        &format!(
            r#"{{"type":"op","client_seq":1,"ops":[{{"kind":"ins","id":[10000000,{replica}],"after":null,"text":"z"}}]}}"#
        ),
    );
    let echo = recv_json(&mut slow);
    assert_eq!(echo["type"], "op_echo", "{echo}");
    assert_eq!(echo["server_seq"], 7);
    // A big document's joiner may get a snapshot a few ops old and the echoes since.
    let mut joiner = Editor::join(addr, "/ws/huge", &hello("huge"));
    joiner.catch_up(7);
    assert_eq!(joiner.doc.len(), 6_000_001);
    writer.catch_up(7);
    assert_eq!(joiner.doc.text(), writer.doc.text());
    server.shutdown().expect("clean shutdown");
}

#[test]
fn ws_replay_windows_stay_within_the_shard_budget() {
    let _w = Watchdog::new("ws_replay_windows_stay_within_the_shard_budget", 60);
    let budget = 4096;
    let mut config = test_config();
    config.shards = 1;
    config.replay_window_shard_bytes = budget;
    let server = server(config);
    let addr = server.local_addr();
    let mut editors: Vec<Editor> = ["budget-a", "budget-b", "budget-c"]
        .iter()
        .map(|doc| Editor::join(addr, &format!("/ws/{doc}"), &hello(doc)))
        .collect();
    // 3 rooms x 60 echoes of well over 24 bytes each: more than the budget together.
    for editor in &mut editors {
        for i in 0..60 {
            editor.edit(i, 0, "w");
        }
        editor.settle();
    }
    let a = &editors[0];
    let (epoch, head) = (a.epoch.clone(), a.head);
    let strategy = |since: u64| -> String {
        let mut ws = connect(addr, "/ws/budget-a");
        let hello_back = collab_engine::protocol::encode_hello(
            Some("budget-a"),
            None,
            Some(since),
            Some(&epoch),
            None,
        );
        send(&mut ws, &hello_back);
        let ack = recv_json(&mut ws);
        ack["strategy"].as_str().unwrap_or("").to_owned()
    };
    // The shard trims on its tick (the watchdog bounds the wait): then a client from the start
    // gets a snapshot, which nothing else here would give it (60 echoes are far inside the
    // per-room window of 10,000 ops and 16 MiB).
    while strategy(1) != "snapshot" {
        std::thread::sleep(Duration::from_millis(50));
    }
    // The oldest echoes went, the newest stayed: one just behind head gets a replay.
    assert_eq!(strategy(head - 1), "replay");
    let window_bytes = |text: &str| -> Option<u64> {
        text.lines()
            .filter_map(|l| l.strip_prefix("collab_replay_window_bytes{shard=\"0\"} "))
            .find_map(|v| v.trim().parse().ok())
    };
    loop {
        let text = http_get(addr, "GET /metrics HTTP/1.1\r\nConnection: close\r\n\r\n");
        let bytes = window_bytes(&text).expect("the gauge is exported");
        if bytes > 0 && bytes <= budget as u64 {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    drop(editors);
    server.shutdown().expect("clean shutdown");
}
