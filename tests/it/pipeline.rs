//! The storage pipeline: the shard hands each turn's records to its storage worker and keeps
//! serving. A test storage (memory storage behind a gate the test controls) holds a sync
//! on a barrier, fails it, reports its outcome unknown, or is unreachable; every assertion
//! follows from causality (what arrived while the sync was provably held), never timing.

use std::collections::BTreeSet;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use collab_engine::protocol::{encode_hello, encode_op, encode_presence_update, ServerMessage};
use collab_engine::server::start_with_storages;
use collab_engine::storage::{
    LogRecord, MemoryStorage, Storage, StorageError, StoredDoc, StoredSnapshot,
};
use tungstenite::protocol::frame::coding::CloseCode;

use crate::util::{
    connect, http_get, recv_json, recv_until_close, send, test_config, Editor, Watchdog,
};

/// How the next sync ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum NextSync {
    /// Durable.
    Ok,
    /// An I/O error: nothing of it is kept.
    Fail,
    /// `OutcomeUnknown`, the records kept (the commit happened).
    UnknownCommitted,
    /// `OutcomeUnknown`, the records dropped (it did not).
    UnknownLost,
}

#[derive(Debug)]
struct GateState {
    /// Syncs wait while set.
    hold: bool,
    /// Syncs waiting at the gate now.
    n_waiting: usize,
    /// Syncs finished.
    n_syncs: u64,
    /// Records appended in total (before any outcome).
    n_appended: u64,
    /// How the next syncs end, oldest first (then `Ok`).
    next: Vec<NextSync>,
    /// Unreachable: load, sync and probe return `Unavailable`.
    down: bool,
    /// The next sync panics (a bug in a backend).
    panic: bool,
}

/// What the test controls of its storage, shared with the storage worker's thread.
#[derive(Debug)]
struct Gate {
    state: Mutex<GateState>,
    changed: Condvar,
}

impl Gate {
    fn new() -> Arc<Gate> {
        Arc::new(Gate {
            state: Mutex::new(GateState {
                hold: false,
                n_waiting: 0,
                n_syncs: 0,
                n_appended: 0,
                next: Vec::new(),
                down: false,
                panic: false,
            }),
            changed: Condvar::new(),
        })
    }

    fn with<T>(&self, f: impl FnOnce(&mut GateState) -> T) -> T {
        let mut state = self.state.lock().expect("gate");
        let out = f(&mut state);
        self.changed.notify_all();
        out
    }

    /// Waits (the watchdog bounds it) until `done` holds.
    fn wait_until(&self, done: impl Fn(&GateState) -> bool) {
        let mut state = self.state.lock().expect("gate");
        while !done(&state) {
            state = self.changed.wait(state).expect("gate");
        }
    }
}

/// Memory storage behind a [`Gate`]: appends are buffered and reach the memory only when a
/// sync succeeds (or ends `UnknownCommitted`), as a real backend's rollback does.
struct Gated {
    inner: MemoryStorage,
    pending: Vec<(String, String, LogRecord)>,
    gate: Arc<Gate>,
}

impl Gated {
    fn boxed(gate: &Arc<Gate>) -> Box<dyn Storage> {
        Box::new(Gated {
            inner: MemoryStorage::new(),
            pending: Vec::new(),
            gate: gate.clone(),
        })
    }
}

fn unavailable() -> StorageError {
    StorageError::Unavailable {
        reason: "test storage is down".into(),
    }
}

impl Storage for Gated {
    fn load(&mut self, doc: &str) -> Result<Option<StoredDoc>, StorageError> {
        if self.gate.with(|s| s.down) {
            return Err(unavailable());
        }
        self.inner.load(doc)
    }

    fn append(&mut self, doc: &str, epoch: &str, record: &LogRecord) -> Result<(), StorageError> {
        self.gate.with(|s| s.n_appended += 1);
        self.pending
            .push((doc.to_owned(), epoch.to_owned(), record.clone()));
        Ok(())
    }

    fn sync(&mut self) -> Result<(), StorageError> {
        let (outcome, down) = {
            let mut state = self.gate.state.lock().expect("gate");
            state.n_waiting += 1;
            self.gate.changed.notify_all();
            while state.hold {
                state = self.gate.changed.wait(state).expect("gate");
            }
            state.n_waiting -= 1;
            state.n_syncs += 1;
            if state.panic {
                drop(state);
                panic!("test storage: a bug in the backend");
            }
            let outcome = if state.next.is_empty() {
                NextSync::Ok
            } else {
                state.next.remove(0)
            };
            self.gate.changed.notify_all();
            (outcome, state.down)
        };
        let pending = std::mem::take(&mut self.pending);
        if down {
            return Err(unavailable());
        }
        if matches!(outcome, NextSync::Ok | NextSync::UnknownCommitted) {
            for (doc, epoch, record) in &pending {
                self.inner.append(doc, epoch, record)?;
            }
        }
        match outcome {
            NextSync::Ok => Ok(()),
            NextSync::Fail => Err(StorageError::Io {
                context: "test sync".into(),
                source: std::io::Error::other("injected"),
            }),
            NextSync::UnknownCommitted | NextSync::UnknownLost => {
                Err(StorageError::OutcomeUnknown {
                    reason: "test: connection lost during commit".into(),
                })
            }
        }
    }

    fn write_snapshot(&mut self, doc: &str, snapshot: &StoredSnapshot) -> Result<(), StorageError> {
        self.inner.write_snapshot(doc, snapshot)
    }

    fn release(&mut self, doc: &str) {
        self.inner.release(doc)
    }

    fn probe(&mut self) -> Result<(), StorageError> {
        if self.gate.with(|s| s.down) {
            return Err(unavailable());
        }
        Ok(())
    }
}

fn hello(doc: &str) -> String {
    encode_hello(Some(doc), None, None, None, None)
}

/// A server of one shard (every document on it) over a gated storage.
fn gated_server(gate: &Arc<Gate>) -> collab_engine::server::ServerHandle {
    crate::util::init_logging();
    let mut config = test_config();
    config.shards = 1;
    start_with_storages(&config, vec![Gated::boxed(gate)]).expect("server")
}

/// Polls `/metrics` until `collab_storage_batches_in_flight` reaches `n` (the shard publishes
/// it every 250 ms): the shard has handed `n` batches to the worker.
fn wait_batches_in_flight(addr: std::net::SocketAddr, n: u64) {
    let needle = format!("collab_storage_batches_in_flight{{shard=\"0\"}} {n}\n");
    while !http_get(addr, "GET /metrics HTTP/1.1\r\n\r\n").contains(&needle) {
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Polls `/health` until it answers 200 (the storage worker probes every 250 ms).
fn wait_healthy(addr: std::net::SocketAddr) {
    while !http_get(addr, "GET /health HTTP/1.1\r\n\r\n").starts_with("HTTP/1.1 200") {
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Reads frames until one satisfies `want`; returns it.
fn recv_until(editor: &mut Editor, want: impl Fn(&ServerMessage) -> bool) -> ServerMessage {
    loop {
        let message = editor.recv();
        if want(&message) {
            return message;
        }
    }
}

/// (a) While one document's sync is held on a barrier, the shard keeps serving another
/// document of the same shard: presence relayed, a resend acked, a new client joined. Its
/// new op is integrated meanwhile and echoed with the next sync, after the held one.
#[test]
fn held_sync_does_not_stop_another_document_on_the_shard() {
    let _w = Watchdog::new("held_sync_does_not_stop_another_document_on_the_shard", 60);
    let gate = Gate::new();
    let server = gated_server(&gate);
    let addr = server.local_addr();
    let mut a = Editor::join(addr, "/ws/slow-a", &hello("slow-a"));
    let mut b1 = Editor::join(addr, "/ws/slow-b", &hello("slow-b"));
    let mut b2 = Editor::join(addr, "/ws/slow-b", &hello("slow-b"));
    b1.edit(0, 0, "b");
    let resend = b1.unacked.values().next().expect("sent").clone();
    b1.settle();
    b2.catch_up(1);

    let syncs_before = gate.with(|s| {
        s.hold = true;
        s.n_syncs
    });
    a.edit(0, 0, "a");
    gate.wait_until(|s| s.n_waiting == 1);
    // A's sync is inside the storage, held. Document B is still served:
    send(&mut b1.ws, &encode_presence_update(r#"{"cursor":1}"#));
    recv_until(&mut b2, |m| matches!(m, ServerMessage::Presence { .. }));
    send(&mut b1.ws, &resend);
    let acked = recv_until(&mut b1, |m| matches!(m, ServerMessage::Ack { .. }));
    assert!(
        matches!(
            acked,
            ServerMessage::Ack {
                client_seq: 1,
                server_seq: 1
            }
        ),
        "{acked:?}"
    );
    let mut b3 = Editor::join(addr, "/ws/slow-b", &hello("slow-b"));
    assert_eq!(b3.doc.text(), "b", "the joiner sees B's durable state");
    b1.edit(1, 0, "!");
    wait_batches_in_flight(addr, 2);
    assert_eq!(
        gate.with(|s| (s.n_waiting, s.n_syncs)),
        (1, syncs_before),
        "all of that while A's sync was held"
    );

    gate.with(|s| s.hold = false);
    a.settle();
    b1.settle();
    b2.catch_up(2);
    b3.catch_up(2);
    assert_eq!(a.doc.text(), "a");
    assert_eq!(b2.doc.text(), "b!");
    assert_eq!(b3.doc.text(), "b!");
    server.shutdown().expect("clean shutdown");
}

/// (b) Many batches pipelined behind held syncs: every client sees its document's echoes
/// in `server_seq` order without a gap, and the batches were synced together (fewer syncs
/// than turns with records).
#[test]
fn pipelined_batches_release_frames_in_server_seq_order() {
    let _w = Watchdog::new("pipelined_batches_release_frames_in_server_seq_order", 90);
    let gate = Gate::new();
    let server = gated_server(&gate);
    let addr = server.local_addr();
    let docs = ["order-1", "order-2", "order-3"];
    let mut editors: Vec<Editor> = docs
        .iter()
        .flat_map(|doc| {
            let path = format!("/ws/{doc}");
            [
                Editor::join(addr, &path, &hello(doc)),
                Editor::join(addr, &path, &hello(doc)),
            ]
        })
        .collect();
    let syncs_before = gate.with(|s| s.n_syncs);
    const ROUNDS: usize = 20;
    for round in 0..ROUNDS {
        // Hold the storage every other round, so batches pile up behind a sync in flight.
        if round % 2 == 0 {
            gate.with(|s| s.hold = true);
        }
        for editor in editors.iter_mut() {
            editor.edit(0, 0, "x");
            editor.edit(0, 0, "y");
        }
        if round % 2 == 1 {
            gate.with(|s| s.hold = false);
        }
    }
    gate.with(|s| s.hold = false);
    let per_doc = (2 * 2 * ROUNDS) as u64;
    for editor in editors.iter_mut() {
        editor.settle();
        editor.catch_up(per_doc);
        // Editor::recv asserted on every echo that server_seq was head + 1.
        assert_eq!(editor.seqs, (1..=per_doc).collect::<Vec<_>>());
    }
    for pair in editors.chunks(2) {
        assert_eq!(pair[0].doc.text(), pair[1].doc.text());
    }
    let syncs = gate.with(|s| s.n_syncs) - syncs_before;
    let op_messages = (editors.len() * 2 * ROUNDS) as u64;
    assert!(
        syncs < op_messages,
        "{syncs} syncs for {op_messages} op messages: turns were grouped"
    );
    server.shutdown().expect("clean shutdown");
}

/// (c) A failed sync fails exactly the ops it carried and every later op of that document
/// already handed to the worker (never written: its log would have a gap), and nothing else:
/// another document in the later batch is echoed; after reconnecting, storage has none of
/// the failed ops and resends apply once.
#[test]
fn failed_batch_fails_its_ops_and_nothing_later_is_acknowledged() {
    let _w = Watchdog::new(
        "failed_batch_fails_its_ops_and_nothing_later_is_acknowledged",
        60,
    );
    let gate = Gate::new();
    let server = gated_server(&gate);
    let addr = server.local_addr();
    let mut a = Editor::join(addr, "/ws/fail-a", &hello("fail-a"));
    let mut watcher = Editor::join(addr, "/ws/fail-a", &hello("fail-a"));
    let mut c = Editor::join(addr, "/ws/fail-c", &hello("fail-c"));
    a.edit(0, 0, "kept");
    a.settle();
    watcher.catch_up(1);

    gate.with(|s| {
        s.hold = true;
        s.next = vec![NextSync::Fail];
    });
    a.edit(4, 0, "1"); // client_seq 2, in the sync that fails
    gate.wait_until(|s| s.n_waiting == 1);
    a.edit(5, 0, "2"); // client_seq 3, a later batch of the same document
    wait_batches_in_flight(addr, 2);
    c.edit(0, 0, "other"); // a later batch of another document
    wait_batches_in_flight(addr, 3);
    let resends: Vec<String> = a.unacked.values().cloned().collect();
    gate.with(|s| s.hold = false);

    let (code, seen) = recv_until_close(&mut a.ws);
    assert_eq!(code, Some(CloseCode::Again), "{seen:?}");
    assert!(
        seen.iter()
            .all(|m| m["type"] == "error" && m["code"] == "unavailable"),
        "no echo or ack of a failed op: {seen:?}"
    );
    let refused: BTreeSet<u64> = seen
        .iter()
        .filter_map(|m| m["client_seq"].as_u64())
        .collect();
    assert_eq!(
        refused,
        BTreeSet::from([2, 3]),
        "the failed op and the later one: {seen:?}"
    );
    let (code, seen) = recv_until_close(&mut watcher.ws);
    assert_eq!(code, Some(CloseCode::Again));
    assert!(seen.iter().all(|m| m["type"] != "op_echo"), "{seen:?}");
    c.settle();
    assert_eq!(c.doc.text(), "other", "the other document was not failed");

    // Storage holds exactly what was acknowledged; resends apply once.
    let mut back = Editor::join(addr, "/ws/fail-a", &hello("fail-a"));
    assert_eq!(back.doc.text(), "kept");
    assert_eq!(back.head, 1);
    let mut ws = connect(addr, "/ws/fail-a");
    send(
        &mut ws,
        &encode_hello(None, Some(a.replica), Some(1), Some(&a.epoch), None),
    );
    assert_eq!(recv_json(&mut ws)["type"], "hello_ack");
    for resend in &resends {
        send(&mut ws, resend);
        assert_eq!(recv_json(&mut ws)["type"], "op_echo");
    }
    back.catch_up(3);
    assert_eq!(back.doc.text(), "kept12");
    server.shutdown().expect("clean shutdown");
}

/// (d) A sync whose outcome is unknown: its sender gets neither an echo nor an error, the
/// document's clients are closed with 1013, and the document is reloaded from storage, so the
/// op is there exactly once if it was committed and can be resent once if it was not.
#[test]
fn outcome_unknown_closes_1013_and_reload_serves_the_committed_state() {
    let _w = Watchdog::new(
        "outcome_unknown_closes_1013_and_reload_serves_the_committed_state",
        60,
    );
    let gate = Gate::new();
    let server = gated_server(&gate);
    let addr = server.local_addr();
    for (doc, outcome) in [
        ("unknown-committed", NextSync::UnknownCommitted),
        ("unknown-lost", NextSync::UnknownLost),
    ] {
        let path = format!("/ws/{doc}");
        let mut a = Editor::join(addr, &path, &hello(doc));
        let mut watcher = Editor::join(addr, &path, &hello(doc));
        a.edit(0, 0, "one");
        a.settle();
        watcher.catch_up(1);
        gate.with(|s| s.next = vec![outcome]);
        a.edit(3, 0, "two");
        let resend = a.unacked.values().next().expect("sent").clone();
        for ws in [&mut a.ws, &mut watcher.ws] {
            let (code, seen) = recv_until_close(ws);
            assert_eq!(code, Some(CloseCode::Again), "{doc}: {seen:?}");
            assert!(
                seen.iter().all(|m| m["type"] == "error"
                    && m["code"] == "unavailable"
                    && m.get("client_seq").is_none()),
                "{doc}: neither an echo nor a per-op error: {seen:?}"
            );
        }
        // Unknown counts as unreachable until the worker's probe gets an answer; then the
        // document is reloaded from storage before it serves again.
        wait_healthy(addr);
        let mut ws = connect(addr, &path);
        send(
            &mut ws,
            &encode_hello(None, Some(a.replica), Some(1), Some(&a.epoch), None),
        );
        let ack = recv_json(&mut ws);
        assert_eq!(ack["type"], "hello_ack", "{ack}");
        let committed = outcome == NextSync::UnknownCommitted;
        assert_eq!(ack["head"], if committed { 2 } else { 1 }, "{doc}: {ack}");
        send(&mut ws, &resend);
        let reply = recv_json(&mut ws);
        assert_eq!(
            reply["type"],
            if committed { "ack" } else { "op_echo" },
            "{doc}: the resend is applied once: {reply}"
        );
        let late = Editor::join(addr, &path, &hello(doc));
        assert_eq!(late.doc.text(), "onetwo", "{doc}");
        assert_eq!(late.head, 2, "{doc}: applied exactly once");
    }
    server.shutdown().expect("clean shutdown");
}

/// (e) Storage unreachable: the batch in flight fails; then an op of a connected client is
/// refused with `unavailable` and its `client_seq` before anything is applied, and its
/// connection is closed with 1013 (nothing it sent after is applied: a later op may depend on
/// the refused one); a hello for a document not in memory gets `unavailable` and 1013,
/// `/health` answers 503 degraded; once storage answers again everything works.
#[test]
fn unavailable_storage_refuses_ops_and_hellos_until_it_answers() {
    let _w = Watchdog::new(
        "unavailable_storage_refuses_ops_and_hellos_until_it_answers",
        60,
    );
    let gate = Gate::new();
    let server = gated_server(&gate);
    let addr = server.local_addr();
    let mut a = Editor::join(addr, "/ws/down-a", &hello("down-a"));
    let mut b = Editor::join(addr, "/ws/down-b", &hello("down-b"));
    b.edit(0, 0, "b");
    b.settle();
    assert!(http_get(addr, "GET /health HTTP/1.1\r\n\r\n").starts_with("HTTP/1.1 200"));

    gate.with(|s| s.down = true);
    a.edit(0, 0, "lost");
    let (code, seen) = recv_until_close(&mut a.ws);
    assert_eq!(code, Some(CloseCode::Again), "{seen:?}");
    assert!(seen.iter().any(|m| m["client_seq"] == 1), "{seen:?}");
    let appended = gate.with(|s| s.n_appended);

    // The failure set the shard's flag before its completion came back.
    let text = encode_op(
        b.next_client_seq,
        &[collab_engine::crdt::Op::Insert {
            id: collab_engine::crdt::OpId {
                lamport: 50,
                replica: b.replica,
            },
            after: None,
            text: "refused".into(),
        }],
    );
    send(&mut b.ws, &text);
    // An op right behind it, which builds on it: never applied either.
    let behind = encode_op(
        b.next_client_seq + 1,
        &[collab_engine::crdt::Op::Insert {
            id: collab_engine::crdt::OpId {
                lamport: 57,
                replica: b.replica,
            },
            after: Some(collab_engine::crdt::OpId {
                lamport: 56,
                replica: b.replica,
            }),
            text: "behind".into(),
        }],
    );
    send(&mut b.ws, &behind);
    let (code, seen) = recv_until_close(&mut b.ws);
    assert_eq!(code, Some(CloseCode::Again), "{seen:?}");
    assert_eq!(
        seen.len(),
        1,
        "one refusal, nothing for the op behind it: {seen:?}"
    );
    let refused = &seen[0];
    assert_eq!(refused["type"], "error", "{refused}");
    assert_eq!(refused["code"], "unavailable", "{refused}");
    assert_eq!(refused["client_seq"], b.next_client_seq, "{refused}");
    assert_eq!(
        gate.with(|s| s.n_appended),
        appended,
        "refused before anything was applied or appended"
    );
    let health = http_get(addr, "GET /health HTTP/1.1\r\n\r\n");
    assert!(health.starts_with("HTTP/1.1 503"), "{health}");
    assert!(health.contains("\"status\":\"degraded\""), "{health}");
    assert!(
        health.contains("\"storage_unavailable_shards\":1"),
        "{health}"
    );
    let mut newcomer = connect(addr, "/ws/down-new");
    send(&mut newcomer, &hello("down-new"));
    let (code, seen) = recv_until_close(&mut newcomer);
    assert_eq!(code, Some(CloseCode::Again), "{seen:?}");
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_eq!(seen[0]["code"], "unavailable", "{seen:?}");

    // Storage answers again: the worker's probe notices it.
    gate.with(|s| s.down = false);
    wait_healthy(addr);
    // The refused messages are not resent here; a new connection edits on.
    let mut b = Editor::join(addr, "/ws/down-b", &hello("down-b"));
    assert_eq!(b.doc.text(), "b", "nothing of the refused ops was applied");
    b.edit(1, 0, "!");
    b.settle();
    assert_eq!(b.doc.text(), "b!");
    let fresh = Editor::join(addr, "/ws/down-a", &hello("down-a"));
    assert_eq!(fresh.doc.text(), "", "nothing of the failed batch was kept");
    let newcomer = Editor::join(addr, "/ws/down-new", &hello("down-new"));
    assert_eq!(newcomer.head, 0);
    server.shutdown().expect("clean shutdown");
}

/// A hello for a document not in memory waits for its load on the worker (queued here
/// behind a held sync); an op sent right behind the hello is handled after the join, in
/// order, and another document's hello meanwhile is not refused.
#[test]
fn hello_waits_for_its_load_and_messages_behind_it_keep_their_order() {
    let _w = Watchdog::new(
        "hello_waits_for_its_load_and_messages_behind_it_keep_their_order",
        60,
    );
    let gate = Gate::new();
    let server = gated_server(&gate);
    let addr = server.local_addr();
    let mut a = Editor::join(addr, "/ws/load-a", &hello("load-a"));
    a.edit(0, 0, "a");
    a.settle();
    gate.with(|s| s.hold = true);
    a.edit(1, 0, "b");
    gate.wait_until(|s| s.n_waiting == 1);

    // The load of load-z is queued behind the held sync; the op behind the hello waits too.
    let mut z = connect(addr, "/ws/load-z");
    send(&mut z, &hello("load-z"));
    let op = encode_op(
        1,
        &[collab_engine::crdt::Op::Insert {
            id: collab_engine::crdt::OpId {
                lamport: 1,
                replica: 1,
            },
            after: None,
            text: "z".into(),
        }],
    );
    send(&mut z, &op);
    wait_batches_in_flight(addr, 1);
    gate.with(|s| s.hold = false);
    let ack = recv_json(&mut z);
    assert_eq!(ack["type"], "hello_ack", "{ack}");
    assert_eq!(ack["replica"], 1, "{ack}");
    let echo = recv_json(&mut z);
    assert_eq!(
        echo["type"], "op_echo",
        "the op was applied after the join: {echo}"
    );
    assert_eq!(echo["server_seq"], 1, "{echo}");
    a.settle();
    assert_eq!(a.doc.text(), "ab");
    server.shutdown().expect("clean shutdown");
}

/// A storage worker that dies (its backend panicked) takes its shard down the way a handler
/// panic does: the shard's clients are closed with 1011, nothing of the batch is echoed,
/// `/health` reports the dead shard and new connections for its documents are refused.
#[test]
fn a_panicking_storage_backend_kills_its_shard_loudly() {
    let _w = Watchdog::new("a_panicking_storage_backend_kills_its_shard_loudly", 60);
    let gate = Gate::new();
    let server = gated_server(&gate);
    let addr = server.local_addr();
    let mut a = Editor::join(addr, "/ws/panic-a", &hello("panic-a"));
    a.edit(0, 0, "ok");
    a.settle();
    gate.with(|s| s.panic = true);
    a.edit(2, 0, "!");
    let (code, seen) = recv_until_close(&mut a.ws);
    assert_eq!(code, Some(CloseCode::Error), "{seen:?}");
    assert!(seen.iter().all(|m| m["type"] != "op_echo"), "{seen:?}");
    let health = http_get(addr, "GET /health HTTP/1.1\r\n\r\n");
    assert!(health.starts_with("HTTP/1.1 503"), "{health}");
    assert!(health.contains("\"dead_shards\":1"), "{health}");
    let mut late = connect(addr, "/ws/panic-a");
    let (code, seen) = recv_until_close(&mut late);
    assert_eq!(code, Some(CloseCode::Error), "{seen:?}");
    assert!(
        server.shutdown().is_err(),
        "the shutdown reports the dead shard"
    );
}
